//! `coin gc`: remove unreachable objects.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use crate::store::codec;

use super::history_util::open_repo;
use super::repack::{repack_summary, repack_with_progress};

/// Remove store objects that no branch, tag, note or reflog entry reaches
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// List what would be removed without removing it
    #[arg(long)]
    pub dry_run: bool,
    /// Then compress the objects that remain (what `coin repack` does)
    #[arg(long, conflicts_with = "dry_run")]
    pub compress: bool,
    /// zstd level for --compress (1 = fastest, 19 = smallest)
    #[arg(long, default_value_t = codec::DEFAULT_LEVEL, requires = "compress",
          value_parser = clap::value_parser!(i32).range(1..=codec::MAX_LEVEL as i64))]
    pub level: i32,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_gc(ui: &mut Ui, helper: &CommandHelper, args: &GcArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let report = repo.gc(args.dry_run)?;
    let repack = if args.compress {
        Some(repack_with_progress(ui, &repo, args.level)?)
    } else {
        None
    };
    if args.json {
        return match &repack {
            None => ui.json(&report),
            Some(r) => {
                let mut v = serde_json::to_value(&report)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("repack".into(), serde_json::to_value(r)?);
                }
                ui.json(&v)
            }
        };
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
    if let Some(r) = &repack {
        ui.status(&repack_summary(r));
    }
    Ok(())
}
