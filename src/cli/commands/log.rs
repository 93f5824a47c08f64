//! `coin log`: the checkpoints of a branch, newest first.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::records::gk_base_task;
use crate::history::HistoryError;

use super::history_util::{evals_json, format_time, open_repo, Decorations};

/// Show the checkpoints leading to a revision, newest first (first parents)
///
/// A merge (`coin merge`) shows both of its parents; the log follows the first.
///
/// Each checkpoint's eval scores follow its task; general-knowledge scores of the LLM judge
/// (`GK:<task>` records, `coin judge --record`) are shown on their own `gk:` line.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Where to start [default: HEAD]
    pub rev: Option<String>,
    /// Show at most N checkpoints
    #[arg(short = 'n', long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_log(ui: &mut Ui, helper: &CommandHelper, args: &LogArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let start = match repo.resolve(args.rev.as_deref().unwrap_or("HEAD")) {
        Ok(id) => id,
        Err(HistoryError::EmptyBranch(b)) if args.rev.is_none() => {
            if args.json {
                return ui.json(&serde_json::json!([]));
            }
            ui.status(&format!("Branch '{b}' has no checkpoints yet."));
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let deco = Decorations::of(&repo)?;
    let mut rows = Vec::new();
    for id in repo.first_parent_chain(start, args.limit)? {
        let cp = repo.read_checkpoint(id)?;
        let train = cp.train.as_ref();
        rows.push(serde_json::json!({
            "id": id.to_string(),
            "short_id": id.short(),
            "parents": cp.parents.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "branches": deco.branches(id),
            "tags": deco.tags(id),
            "time": cp.time,
            "task": train.map(|t| t.task.clone()),
            "message": train.and_then(|t| t.message.clone()),
            "summary": cp.summary,
            "eval": evals_json(&cp.evals),
        }));
        if !args.json {
            let out = ui.out();
            let mut names: Vec<String> = deco.branches(id);
            names.extend(deco.tags(id).into_iter().map(|t| format!("tag: {t}")));
            let names = if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            };
            writeln!(out, "{}{names}  {}", id.short(), format_time(cp.time))?;
            if cp.parents.len() > 1 {
                // A merge (`coin merge`): both parents, first parent first, as `git log` does.
                let ps: Vec<String> = cp.parents.iter().map(|p| p.short()).collect();
                writeln!(out, "    merge of {}", ps.join(" and "))?;
            }
            let task = train.map_or("?", |t| t.task.as_str());
            match train.and_then(|t| t.message.as_deref()) {
                Some(m) => writeln!(out, "    {task}: {m}")?,
                None => writeln!(out, "    {task}")?,
            }
            // Each task's own score, then the judge's general-knowledge scores (`GK:<task>`).
            let mut scores = Vec::new();
            let mut gk = Vec::new();
            for (t, (r, _)) in &cp.evals {
                match gk_base_task(t) {
                    Some(base) => gk.push(format!("{base} {:.2}", r.score)),
                    None => scores.push(format!("{t} {:.2}", r.score)),
                }
            }
            if !scores.is_empty() {
                writeln!(out, "    eval: {}", scores.join(", "))?;
            }
            if !gk.is_empty() {
                writeln!(out, "    gk:   {}", gk.join(", "))?;
            }
        }
    }
    if args.json {
        ui.json(&rows)?;
    }
    Ok(())
}
