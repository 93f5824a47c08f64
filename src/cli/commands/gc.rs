//! `coin gc`: remove unreachable objects.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// Remove store objects that no branch, tag, note or reflog entry reaches
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// List what would be removed without removing it
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_gc(ui: &mut Ui, helper: &CommandHelper, args: &GcArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let report = repo.gc(args.dry_run)?;
    if args.json {
        return ui.json(&report);
    }
    if args.dry_run {
        let out = ui.out();
        for id in &report.removed {
            writeln!(out, "{id}")?;
        }
        ui.status(&format!(
            "Would remove {} unreachable objects; {} are reachable.",
            report.removed.len(),
            report.kept
        ));
    } else {
        ui.status(&format!(
            "Removed {} unreachable objects ({} bytes); kept {}.",
            report.removed.len(),
            report.freed_bytes,
            report.kept
        ));
        if report.pack.loose_removed > 0 {
            ui.status(&format!(
                "Packed {} small objects into {} pack(s).",
                report.pack.loose_removed, report.pack.packs_written
            ));
        }
    }
    Ok(())
}
