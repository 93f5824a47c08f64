//! `coin compare`: several task orders (branches) side by side.

use std::io::Write as _;
use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::workflow::compare::compare;
use crate::workflow::plot_compare::plot_comparison;

use super::history_util::open_repo;
use super::metrics::ForgettingArg;

/// Compare task orders or methods: final row, summary metrics, wall time and shared history
///
/// For each BRANCH: its task order, the final score per task and MFT, MFN, MAA, BWT, FWT and
/// mean forgetting (as `coin matrix` computes them); its method (`train.method`, and
/// `train.strategy` when not sequential) and wall time: the seconds its history's train and
/// eval records hold, summed (a shared checkpoint counts for every branch), and as a multiple
/// of the first branch's; for each pair: how many checkpoints their first-parent histories
/// share and which training steps (the common task prefix).
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Branches (or tags, checkpoints) to compare
    #[arg(required = true, num_args = 1..)]
    pub branches: Vec<String>,
    /// How forgetting is measured: best earlier score − final, or first score − final
    #[arg(long, value_enum, default_value_t = ForgettingArg::MaxEarlier)]
    pub forgetting: ForgettingArg,
    /// Print {"branches": [{"name", "tip", "tasks", "final", "metrics", "matrix", "method",
    /// "train_methods", "strategies", "wall": {"seconds", "train_seconds", "eval_seconds",
    /// "ratio_to_first", "steps", "untimed_steps", "evals", "untimed_evals"}}], "shared": [{"a",
    /// "b", "last_shared", "shared_checkpoints", "shared_tasks"}]}
    #[arg(long)]
    pub json: bool,
    /// Also draw the comparison to FILE (.svg or .png): per task, the score right after
    /// training it and after the last step, per branch; and mean forgetting against wall time
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

pub fn cmd_compare(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &CompareArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let c = compare(&repo, &args.branches, args.forgetting.into())?;
    if let Some(plot) = &args.plot {
        plot_comparison(&c, &helper.cwd.join(plot))?;
        ui.status(&format!("Wrote the plot to '{}'.", plot.display()));
    }
    if args.json {
        return ui.json(&c.to_json());
    }
    write!(ui.out(), "{}", c.to_text())?;
    Ok(())
}
