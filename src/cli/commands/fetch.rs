//! `coin fetch`: bring a remote's coin history and objects here without moving local branches.

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::remote::FetchReport;

use super::history_util::open_repo;
use super::remote::{human_bytes, TransferProgress};

/// Fetch a remote's branches, tags, notes and the objects of new checkpoints
///
/// Branches become remote-tracking refs (`<remote>/<branch>` in revisions); tags are created
/// when absent; notes are merged (a task recorded on both sides keeps the local record).
/// Every object is verified by its hash before it becomes visible, and the refs appear only
/// after all objects are in; an interrupted fetch can be re-run.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// The remote [default: origin, or the only remote]
    pub remote: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// One status line about a fetch.
pub fn fetch_summary(r: &FetchReport) -> String {
    let mut s = format!(
        "Fetched '{}': {} branch(es), {} new checkpoint(s), {} of {} object(s) received ({})",
        r.remote,
        r.branches.len(),
        r.checkpoints,
        r.objects.transferred,
        r.objects.objects,
        human_bytes(r.objects.bytes)
    );
    if !r.tags.is_empty() {
        s.push_str(&format!(", new tags {}", r.tags.join(", ")));
    }
    s.push('.');
    s
}

/// Warnings about what a fetch did not take or could not find (stderr, before any JSON).
pub fn warn_fetch_problems(ui: &Ui, r: &FetchReport) {
    for t in &r.tag_conflicts {
        ui.warn(&format!(
            "tag '{t}' exists here with another target; kept the local one"
        ));
    }
    for refused in &r.refused {
        ui.warn(&format!("not taken from '{}': {refused}", r.remote));
    }
    if !r.missing.is_empty() {
        let mut shown: Vec<&str> = r.missing.iter().take(3).map(|s| &s[..12]).collect();
        if r.missing.len() > 3 {
            shown.push("…");
        }
        ui.warn(&format!(
            "{} object(s) of checkpoints in this repository are neither here nor on '{}' ({}); \
             `coin fsck` lists the checkpoints that need them — fetch from where they were made",
            r.missing.len(),
            r.remote,
            shown.join(", ")
        ));
    }
}

pub fn cmd_fetch(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &FetchArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let remote = match &args.remote {
        Some(r) => r.clone(),
        None => repo.default_remote()?,
    };
    let mut progress = TransferProgress::new(ui, "Receiving objects");
    let report = repo.fetch(&remote, &mut |p| progress.update(p))?;
    drop(progress);
    warn_fetch_problems(ui, &report);
    if args.json {
        return ui.json(&report);
    }
    ui.status(&fetch_summary(&report));
    Ok(())
}
