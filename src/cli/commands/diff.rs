//! `coin diff`: score deltas and tensor changes between two checkpoints.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use crate::history::records::gk_base_task;
use crate::history::{diff_checkpoints, CheckpointDiff, EvalDelta, ForgettingReport};

use super::history_util::open_repo;

/// Compare two checkpoints: per-task score deltas (forgetting marked), then tensor changes
///
/// General-knowledge scores of the LLM judge (`GK:<task>` records) get their own table.
///
/// Changed tensors show the relative L2 norm of the change, ‖B − A‖ / ‖A‖. Forgetting is also
/// measured against the best earlier score of each task on A's first-parent chain (A and its
/// ancestors), not only against A.
///
/// With --fail-on-forgetting X the command exits with status 1 (after printing the report)
/// when any task's score in B is more than X points below its best earlier score, so scripts
/// and hooks (the sample pre-checkpoint gate) can use it as a check.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The older checkpoint
    pub a: String,
    /// The newer checkpoint
    pub b: String,
    /// Print JSON instead of tables
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when a task drops more than POINTS below its best earlier score
    /// (task scores; the LLM judge's GK scores have --fail-on-gk-forgetting)
    #[arg(long, value_name = "POINTS")]
    pub fail_on_forgetting: Option<f64>,
    /// Exit with status 1 when a general-knowledge (GK:<task>) score drops more than POINTS
    /// below its best earlier score (the judge samples: leave room for its noise)
    #[arg(long, value_name = "POINTS")]
    pub fail_on_gk_forgetting: Option<f64>,
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.2}"))
}

pub fn cmd_diff(ui: &mut Ui, helper: &CommandHelper, args: &DiffArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let a = repo.resolve(&args.a)?;
    let b = repo.resolve(&args.b)?;
    for (flag, value) in [
        ("--fail-on-forgetting", args.fail_on_forgetting),
        ("--fail-on-gk-forgetting", args.fail_on_gk_forgetting),
    ] {
        if let Some(x) = value {
            if !x.is_finite() || x < 0.0 {
                return Err(CommandError::usage(format!(
                    "{flag} needs a number of points >= 0, got {x}"
                )));
            }
        }
    }
    let d = diff_checkpoints(&repo, a, b)?;
    if args.json {
        ui.json(&d)?;
    } else {
        print_tables(ui, &d)?;
    }
    let mut over = Vec::new();
    if let Some(x) = args.fail_on_forgetting {
        over.extend(over_threshold(&d.forgetting, x, false));
    }
    if let Some(x) = args.fail_on_gk_forgetting {
        over.extend(over_threshold(&d.forgetting, x, true));
    }
    if over.is_empty() {
        return Ok(());
    }
    Err(CommandError::user(format!(
        "{} forgets too much: {}",
        b.short(),
        over.join("; ")
    ))
    .hint("See `coin diff --json` for every task's best earlier score."))
}

/// The `--fail-on-forgetting` (`judge` false) or `--fail-on-gk-forgetting` verdict: one line
/// per task over the threshold.
fn over_threshold(r: &ForgettingReport, threshold: f64, judge: bool) -> Vec<String> {
    r.exceeding(threshold, judge)
        .iter()
        .map(|t| {
            format!(
                "{} dropped {:.2} points, more than {threshold} (best {:.2} at {}, now {:.2})",
                t.task,
                t.forgetting.unwrap_or_default(),
                t.best,
                t.best_at.short(),
                t.b.unwrap_or_default()
            )
        })
        .collect()
}

/// One table of score deltas (task, A, B, delta, a forgetting mark); `label` names the row.
fn write_deltas(
    out: &mut dyn Write,
    rows: &[&EvalDelta],
    label: impl Fn(&str) -> &str,
) -> Result<(), CommandError> {
    let w = rows
        .iter()
        .map(|e| label(&e.task).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "{:<w$}  {:>8}  {:>8}  {:>8}",
        "task", "A", "B", "delta"
    )?;
    for e in rows {
        let delta = e
            .delta
            .map_or_else(|| "—".to_string(), |v| format!("{v:+.2}"));
        let mark = if e.forgetting { "  forgetting" } else { "" };
        writeln!(
            out,
            "{:<w$}  {:>8}  {:>8}  {:>8}{mark}",
            label(&e.task),
            opt(e.a),
            opt(e.b),
            delta
        )?;
    }
    Ok(())
}

fn print_tables(ui: &mut Ui, d: &CheckpointDiff) -> Result<(), CommandError> {
    let (a, b) = (d.a, d.b);
    let out = ui.out();
    writeln!(out, "A {}  B {}", a.short(), b.short())?;
    writeln!(out)?;
    if d.eval.is_empty() {
        writeln!(out, "No eval records in either checkpoint.")?;
    } else {
        // Each task's own scores, then the judge's general-knowledge scores (`GK:<task>`).
        let (gk, own): (Vec<&EvalDelta>, Vec<&EvalDelta>) =
            d.eval.iter().partition(|e| gk_base_task(&e.task).is_some());
        if !own.is_empty() {
            write_deltas(out, &own, |t| t)?;
        }
        if !gk.is_empty() {
            if !own.is_empty() {
                writeln!(out)?;
            }
            writeln!(out, "General knowledge (LLM judge):")?;
            write_deltas(out, &gk, |t| gk_base_task(t).unwrap_or(t))?;
        }
    }
    let f = &d.forgetting;
    if f.tasks.iter().any(|t| t.forgetting.is_some()) {
        writeln!(out)?;
        writeln!(
            out,
            "Forgetting vs the best earlier score on A's path ({} checkpoint{}):",
            f.checkpoints_scanned,
            if f.checkpoints_scanned == 1 { "" } else { "s" }
        )?;
        let w = f
            .tasks
            .iter()
            .map(|e| e.task.chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            out,
            "{:<w$}  {:>8}  {:>12}  {:>8}  {:>8}",
            "task", "best", "at", "B", "drop"
        )?;
        for t in f.tasks.iter().filter(|t| t.forgetting.is_some()) {
            writeln!(
                out,
                "{:<w$}  {:>8.2}  {:>12}  {:>8}  {:>8}",
                t.task,
                t.best,
                t.best_at.short(),
                opt(t.b),
                t.forgetting
                    .map_or_else(|| "—".to_string(), |v| format!("{v:.2}"))
            )?;
        }
    }
    writeln!(out)?;
    for f in &d.files {
        writeln!(out, "{:<8} {}", f.change, f.path)?;
    }
    if d.tensors.is_empty() {
        writeln!(
            out,
            "No tensor changes ({} unchanged).",
            d.unchanged_tensors
        )?;
    } else {
        writeln!(
            out,
            "{} tensor change(s), {} unchanged:",
            d.tensors.len(),
            d.unchanged_tensors
        )?;
        for t in &d.tensors {
            let rel = match (t.rel_l2, &t.note) {
                (Some(r), _) => format!("rel_l2 {r:.4}"),
                (None, Some(n)) => n.clone(),
                (None, None) => String::new(),
            };
            writeln!(
                out,
                "  {:<8} {}:{}  {} {:?}  {rel}",
                t.change, t.file, t.name, t.dtype, t.shape
            )?;
        }
    }
    Ok(())
}
