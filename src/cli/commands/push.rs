//! `coin push`: send a branch's checkpoints (objects first, then refs and notes) to a remote.

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;
use super::remote::{human_bytes, TransferProgress};

/// Push a branch to a remote: the objects it lacks, then the branch, its tags and the notes
///
/// Only objects the remote does not have are sent; each is verified by its hash before it
/// becomes visible there, and the refs move only after all objects are in, so an interrupted
/// push leaves the remote as it was (plus some objects) and can be re-run. Refused, with
/// nothing sent, when an object of a checkpoint being pushed is missing.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub target: super::remote::RemoteBranchArgs,
}

pub fn cmd_push(ui: &mut Ui, helper: &CommandHelper, args: &PushArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let (remote, branch) = args.target.resolve(&repo)?;
    let mut progress = TransferProgress::new(ui, "Sending objects");
    let report = repo.push(&remote, &branch, &mut |p| progress.update(p))?;
    drop(progress);
    if args.target.json {
        return ui.json(&report);
    }
    let old = report.old.map_or("(new)".to_string(), |id| id.short());
    ui.status(&format!(
        "Pushed '{branch}' to '{remote}': {old} -> {}, {} checkpoint(s), {} of {} object(s) sent ({}).",
        report.new.short(),
        report.checkpoints,
        report.objects.transferred,
        report.objects.objects,
        human_bytes(report.objects.bytes)
    ));
    Ok(())
}
