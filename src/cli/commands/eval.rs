//! `coin eval`: attach eval records to an existing checkpoint.

use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::hooks::HookContext;

use super::history_util::{open_repo, read_eval_file, short};

/// Attach eval results to a checkpoint without changing its id
///
/// The records go into a git note (refs/notes/coin); a task recorded again replaces the
/// earlier record, and notes win over records made with the commit when shown. Runs the
/// post-eval hook (.coin/hooks/post-eval) afterwards, when there is one.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The checkpoint
    pub rev: String,
    /// Eval results: {"<task>": {"metric": ..., "score": 0-100, "n": N}, ...}
    #[arg(long, value_name = "RESULTS.json")]
    pub record: PathBuf,
}

pub fn cmd_eval(ui: &mut Ui, helper: &CommandHelper, args: &EvalArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let id = repo.resolve(&args.rev)?;
    let records = read_eval_file(helper, &args.record)?;
    repo.add_eval_records(id, &records)?;
    ui.status(&format!(
        "Recorded {} eval result(s) on {}.",
        records.len(),
        short(id)
    ));
    let parent = repo
        .git()
        .find_commit(id)
        .ok()
        .and_then(|c| c.parent_ids().next());
    let ctx = HookContext {
        checkpoint: Some(id),
        parent,
        extra_args: records.keys().cloned().collect(),
        ..HookContext::default()
    };
    if let Some(hook) = repo.run_event("post-eval", &ctx)? {
        let output = hook.output();
        if !output.is_empty() {
            ui.status(&output);
        }
        if !hook.success() {
            ui.warn(&format!(
                "the post-eval hook failed ({}); the records are kept",
                hook.code
                    .map_or("killed by a signal".to_string(), |c| format!(
                        "exit status {c}"
                    ))
            ));
        }
    }
    Ok(())
}
