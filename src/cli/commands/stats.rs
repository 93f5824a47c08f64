//! `coin stats`: store size, compression and dedupe.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// Show how many objects the store holds, their size on disk and decoded (compression), and
/// the size of all checkpoints without dedupe
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_stats(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &StatsArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let s = repo.stats()?;
    if args.json {
        return ui.json(&s);
    }
    let out = ui.out();
    writeln!(out, "objects        {}", s.objects)?;
    writeln!(
        out,
        "stored bytes   {}  ({:.3}x of {} object bytes)",
        s.stored_bytes, s.stored_ratio, s.object_bytes
    )?;
    if s.compressed_objects > 0 {
        writeln!(
            out,
            "compressed     {} objects: {} bytes stored for {} ({:.3}x)",
            s.compressed_objects,
            s.compressed_stored_bytes,
            s.compressed_object_bytes,
            s.compressed_stored_bytes as f64 / s.compressed_object_bytes.max(1) as f64
        )?;
    }
    writeln!(
        out,
        "logical bytes  {}  ({} checkpoints)",
        s.logical_bytes, s.checkpoints
    )?;
    if s.packs > 0 {
        writeln!(
            out,
            "packed         {}  (in {} packs)",
            s.packed_objects, s.packs
        )?;
    }
    Ok(())
}
