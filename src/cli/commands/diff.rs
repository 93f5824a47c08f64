//! `coin diff`: score deltas and tensor changes between two checkpoints.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::diff_checkpoints;

use super::history_util::{open_repo, short};

/// Compare two checkpoints: per-task score deltas (forgetting marked), then tensor changes
///
/// Changed tensors show the relative L2 norm of the change, ‖B − A‖ / ‖A‖.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The older checkpoint
    pub a: String,
    /// The newer checkpoint
    pub b: String,
    /// Print JSON instead of tables
    #[arg(long)]
    pub json: bool,
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.2}"))
}

pub fn cmd_diff(ui: &mut Ui, helper: &CommandHelper, args: &DiffArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let a = repo.resolve(&args.a)?;
    let b = repo.resolve(&args.b)?;
    let d = diff_checkpoints(&repo, a, b)?;
    if args.json {
        return ui.json(&d);
    }
    let out = ui.out();
    writeln!(out, "A {}  B {}", short(a), short(b))?;
    writeln!(out)?;
    if d.eval.is_empty() {
        writeln!(out, "No eval records in either checkpoint.")?;
    } else {
        let w = d
            .eval
            .iter()
            .map(|e| e.task.chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            out,
            "{:<w$}  {:>8}  {:>8}  {:>8}",
            "task", "A", "B", "delta"
        )?;
        for e in &d.eval {
            let delta = e
                .delta
                .map_or_else(|| "—".to_string(), |v| format!("{v:+.2}"));
            let mark = if e.forgetting { "  forgetting" } else { "" };
            writeln!(
                out,
                "{:<w$}  {:>8}  {:>8}  {:>8}{mark}",
                e.task,
                opt(e.a),
                opt(e.b),
                delta
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
