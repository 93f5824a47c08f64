//! `coin fsck`: verify the repository.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;
use super::remote::{human_bytes, TransferProgress};

/// Verify every object, checkpoint and ref; exit 1 when anything is wrong
///
/// Every store object is re-hashed; every checkpoint reachable from coin branches, tags,
/// notes and their reflogs must parse and reference objects that exist. With --remote NAME,
/// the remote's object store is checked instead (docs/remotes.md).
#[derive(clap::Args, Debug)]
pub struct FsckArgs {
    /// First remove notes fsck calls bad (unparsable, on a missing commit, or naming missing
    /// objects) from refs/notes/coin; checkpoints are never rewritten
    #[arg(long)]
    pub drop_bad_notes: bool,
    /// Check the remote's object store instead: every object the remote's coin refs and
    /// notes reach must be there and hash right (each is downloaded and hashed)
    #[arg(long, value_name = "NAME")]
    pub remote: Option<String>,
    /// With --remote: check only that each object exists with the right size (no download)
    #[arg(long, requires = "remote")]
    pub quick: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

fn fsck_remote(
    ui: &mut Ui,
    repo: &crate::history::CoinRepo,
    remote: &str,
    args: &FsckArgs,
) -> Result<(), CommandError> {
    let mut progress = TransferProgress::new(ui, "Checking objects");
    let report = repo.fsck_remote(remote, args.quick, &mut |p| progress.update(p))?;
    drop(progress);
    if args.json {
        ui.json(&report)?;
    } else {
        let out = ui.out();
        for p in &report.problems {
            match &p.detail {
                Some(d) => writeln!(out, "{} {}: {d}", p.problem, p.object)?,
                None => writeln!(out, "{} {}", p.problem, p.object)?,
            }
        }
    }
    let how = if report.quick {
        "existence and size"
    } else {
        "downloaded and hashed"
    };
    if report.problems.is_empty() {
        ui.status(&format!(
            "Checked {} objects of {} checkpoints on '{}' ({how}, {}): no problems.",
            report.objects,
            report.checkpoints,
            report.objects_at,
            human_bytes(report.bytes)
        ));
        Ok(())
    } else {
        Err(CommandError::user(format!(
            "{} of {} objects on '{}' are missing or corrupt",
            report.problems.len(),
            report.objects,
            report.objects_at
        ))
        .hint(
            "Push again from a repository that has them intact (`coin push NAME`): a missing \
             object is sent again; a corrupt one must first be deleted on the server (e.g. \
             `aws s3 rm s3://BUCKET/PREFIX/objects/ab/cdef…`).",
        ))
    }
}

pub fn cmd_fsck(ui: &mut Ui, helper: &CommandHelper, args: &FsckArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    if let Some(remote) = &args.remote {
        return fsck_remote(ui, &repo, remote, args);
    }
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
