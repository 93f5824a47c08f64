//! `coin stats`: store size and dedupe.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// Show how many objects the store holds, their size, and the size without dedupe
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
    writeln!(out, "stored bytes   {}", s.stored_bytes)?;
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
