//! `coin repack`: compress the store's loose raw objects (deferred compression), then pack the
//! small ones.

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::CoinRepo;
use crate::store::{codec, RepackReport};

use super::history_util::open_repo;
use super::remote::{human_bytes, TransferProgress};

/// Compress stored objects that shrink (zstd after grouping each tensor element's bytes by
/// significance); ids, dedupe and verification are unchanged, and objects that do not shrink
/// stay raw; then small loose objects are written into a pack. Safe to interrupt and to repeat
#[derive(clap::Args, Debug)]
pub struct RepackArgs {
    /// zstd level (1 = fastest, 19 = smallest)
    #[arg(long, default_value_t = codec::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=codec::MAX_LEVEL as i64))]
    pub level: i32,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Run the repack with a progress bar; shared with `coin gc --compress`.
pub fn repack_with_progress(
    ui: &Ui,
    repo: &CoinRepo,
    level: i32,
) -> Result<RepackReport, CommandError> {
    let mut progress = TransferProgress::new(ui, "Compressing objects");
    let report = repo.repack(level, &mut |done, total| {
        progress.update(&crate::store::transport::TransferProgress {
            done: done as usize,
            total: total as usize,
            bytes: 0,
            bytes_total: None,
        })
    })?;
    Ok(report)
}

/// The status line for a repack.
pub fn repack_summary(r: &RepackReport) -> String {
    let ratio = if r.bytes_before == 0 {
        String::new()
    } else {
        format!(
            " ({} -> {}, {:.3}x)",
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after),
            r.bytes_after as f64 / r.bytes_before as f64
        )
    };
    let packed = if r.pack.packed == 0 {
        String::new()
    } else {
        format!(
            " Packed {} small objects into {} pack(s).",
            r.pack.packed, r.pack.packs_written
        )
    };
    format!(
        "Compressed {} objects{ratio}; {} were already compressed, {} stay raw.{packed}",
        r.compressed, r.already_compressed, r.kept_raw
    )
}

pub fn cmd_repack(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &RepackArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let report = repack_with_progress(ui, &repo, args.level)?;
    if args.json {
        return ui.json(&report);
    }
    ui.status(&repack_summary(&report));
    Ok(())
}
