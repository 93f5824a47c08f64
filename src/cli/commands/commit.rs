//! `coin commit`: record a checkpoint.

use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::{BaseModel, CommitRequest};

use super::history_util::{open_repo, read_eval_file};

/// Record an adapter checkpoint on the current branch and print its id
///
/// PATH is a safetensors file or a directory (a PEFT adapter directory: adapter_model.safetensors,
/// adapter_config.json and anything else in it, recursively). Tensors are stored once across
/// all checkpoints; every file is rebuilt byte-identical by `coin checkout`.
#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// Files or adapter directories to commit
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The task this checkpoint was trained on
    #[arg(long)]
    pub task: String,
    /// A message describing the checkpoint
    #[arg(short, long)]
    pub message: Option<String>,
    /// Eval results to record with it: {"<task>": {"metric": ..., "score": 0-100, "n": N}}
    #[arg(long, value_name = "RESULTS.json")]
    pub eval: Option<PathBuf>,
    /// The checkpoint it was trained from [default: the current branch's head]
    #[arg(long, value_name = "REV")]
    pub parent: Option<String>,
    /// The base model's name, recorded in the manifest
    #[arg(long, value_name = "NAME")]
    pub base_model: Option<String>,
    /// Do not run the pre-checkpoint hook (.coin/hooks/pre-checkpoint)
    #[arg(long)]
    pub no_verify: bool,
}

pub fn cmd_commit(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &CommitArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let evals = match &args.eval {
        Some(p) => read_eval_file(helper, p)?,
        None => Default::default(),
    };
    let parent = match &args.parent {
        Some(rev) => Some(repo.resolve(rev)?),
        None => None,
    };
    let req = CommitRequest {
        paths: args.paths.iter().map(|p| helper.cwd.join(p)).collect(),
        task: args.task.clone(),
        message: args.message.clone(),
        evals,
        parent,
        base_model: args.base_model.as_ref().map(|name| BaseModel {
            name: name.clone(),
            manifest: None,
        }),
        train_extra: Default::default(),
        skip_hooks: args.no_verify,
        detached: false,
    };
    let outcome = repo.commit(&req)?;
    if let Some(output) = outcome.gate.as_ref().map(|g| g.output()) {
        if !output.is_empty() {
            ui.status(&output);
        }
    }
    use std::io::Write;
    writeln!(ui.out(), "{}", outcome.id)?;
    ui.status(&format!(
        "Committed {} on branch '{}' ({} files, {} tensors).",
        outcome.id.short(),
        outcome.branch,
        outcome.files,
        outcome.tensors
    ));
    Ok(())
}
