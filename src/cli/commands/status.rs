//! `coin status`: where the repository stands.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// Show the current branch, its head checkpoint and the repository's location
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_status(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &StatusArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let branch = repo.current_branch()?;
    let head = repo.head()?;
    let (task, message, depth) = match head {
        Some(id) => {
            let cp = repo.read_checkpoint(id)?;
            let depth = repo.first_parent_chain(id, None)?.len();
            (
                cp.train.as_ref().map(|t| t.task.clone()),
                cp.train.and_then(|t| t.message),
                depth,
            )
        }
        None => (None, None, 0),
    };
    if args.json {
        return ui.json(&serde_json::json!({
            "root": repo.root().display().to_string(),
            "branch": branch,
            "head": head.map(|h| h.to_string()),
            "task": task,
            "message": message,
            "checkpoints": depth,
        }));
    }
    let out = ui.out();
    writeln!(out, "On branch {branch}")?;
    match head {
        Some(id) => {
            let what = match (&task, &message) {
                (Some(t), Some(m)) => format!("{t}: {m}"),
                (Some(t), None) => t.clone(),
                _ => String::new(),
            };
            writeln!(out, "Head: {} {what}", id.short())?;
            writeln!(out, "{depth} checkpoint(s) on this branch")?;
        }
        None => writeln!(out, "No checkpoints yet")?,
    }
    Ok(())
}
