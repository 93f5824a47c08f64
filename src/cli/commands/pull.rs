//! `coin pull`: fetch, then fast-forward a local branch to the remote's.

use crate::cli::{CommandError, CommandHelper, Ui};

use super::fetch::fetch_summary;
use super::history_util::open_repo;
use super::remote::TransferProgress;

/// Fetch a remote and fast-forward a branch to it (created when missing)
///
/// Refused when the local and remote branch have diverged; keep both with
/// `coin branch NAME <remote>/<branch>`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    #[command(flatten)]
    pub target: super::remote::RemoteBranchArgs,
}

pub fn cmd_pull(ui: &mut Ui, helper: &CommandHelper, args: &PullArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let (remote, branch) = args.target.resolve(&repo)?;
    let mut progress = TransferProgress::new(ui, "Receiving objects");
    let report = repo.pull(&remote, &branch, &mut |p| progress.update(p))?;
    drop(progress);
    super::fetch::warn_fetch_problems(ui, &report.fetch);
    if args.target.json {
        return ui.json(&report);
    }
    ui.status(&fetch_summary(&report.fetch));
    let to = report.new.map_or("(none)".to_string(), |id| id.short());
    let msg = match report.update.as_str() {
        "created" => format!("Created branch '{branch}' at {to}."),
        "fast-forward" => format!(
            "Fast-forwarded '{branch}' from {} to {to}.",
            report.old.map_or("(none)".to_string(), |id| id.short())
        ),
        "ahead" => format!("Branch '{branch}' is ahead of {remote}/{branch}; nothing to pull."),
        _ => format!("Branch '{branch}' is up to date."),
    };
    ui.status(&msg);
    Ok(())
}
