//! `coin fsck`: verify the repository.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// Verify every object, checkpoint and ref; exit 1 when anything is wrong
///
/// Every store object is re-hashed; every checkpoint reachable from coin branches, tags,
/// notes and their reflogs must parse and reference objects that exist.
#[derive(clap::Args, Debug)]
pub struct FsckArgs {
    /// First remove notes fsck calls bad (unparsable, on a missing commit, or naming missing
    /// objects) from refs/notes/coin; checkpoints are never rewritten
    #[arg(long)]
    pub drop_bad_notes: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_fsck(ui: &mut Ui, helper: &CommandHelper, args: &FsckArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    if args.drop_bad_notes {
        for d in repo.drop_bad_notes()? {
            let what = if d.tasks.is_empty() {
                "the note".to_string()
            } else {
                format!("the records of {}", d.tasks.join(", "))
            };
            ui.status(&format!(
                "Dropped {what} on {}: {}.",
                &d.checkpoint[..12.min(d.checkpoint.len())],
                d.reason
            ));
        }
    }
    let report = repo.fsck()?;
    if args.json {
        ui.json(&report)?;
    } else {
        let out = ui.out();
        for p in &report.problems {
            writeln!(out, "{} {}: {}", p.kind, p.object, p.message)?;
        }
    }
    if report.ok {
        ui.status(&format!(
            "Checked {} objects and {} checkpoints: no problems.",
            report.objects_checked, report.checkpoints_checked
        ));
        Ok(())
    } else {
        Err(CommandError::user(format!(
            "fsck found {} problem(s) in {} objects and {} checkpoints",
            report.problems.len(),
            report.objects_checked,
            report.checkpoints_checked
        )))
    }
}
