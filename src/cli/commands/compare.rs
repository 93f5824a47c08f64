//! `coin compare`: several task orders (branches) side by side.

use std::io::Write as _;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::workflow::compare::compare;

use super::history_util::open_repo;
use super::metrics::ForgettingArg;

/// Compare task orders: final row, summary metrics and shared history of branches
///
/// For each BRANCH: its task order, the final score per task and MFT, MFN, MAA, BWT, FWT and
/// mean forgetting (as `coin matrix` computes them); for each pair: how many checkpoints their
/// first-parent histories share and which training steps (the common task prefix).
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Branches (or tags, checkpoints) to compare
    #[arg(required = true, num_args = 1..)]
    pub branches: Vec<String>,
    /// How forgetting is measured: best earlier score − final, or first score − final
    #[arg(long, value_enum, default_value_t = ForgettingArg::MaxEarlier)]
    pub forgetting: ForgettingArg,
    /// Print {"branches": [{"name", "tip", "tasks", "final", "metrics", "matrix"}],
    /// "shared": [{"a", "b", "last_shared", "shared_checkpoints", "shared_tasks"}]}
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_compare(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &CompareArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let c = compare(&repo, &args.branches, args.forgetting.into())?;
    if args.json {
        return ui.json(&c.to_json());
    }
    write!(ui.out(), "{}", c.to_text())?;
    Ok(())
}
