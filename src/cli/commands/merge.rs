//! `coin merge`: merge the adapters of two checkpoints into a checkpoint with both as parents.

use std::io::Write as _;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::workflow::merge::{merge_checkpoints, MergeEvalTasks, MergeMethod, MergeRequest};
use crate::workflow::WorkflowError;

use super::history_util::open_repo;
use super::train::CliTrainProgress;
use super::workflow_util::ConfigArgs;

/// Merge the adapters of two checkpoints into a new checkpoint whose parents are both
///
/// With `average` and `task-arithmetic` the merged LoRA adapter is exact: its update is
/// w₁·ΔW₁ + w₂·ΔW₂, stored with rank r₁ + r₂ (no SVD, no approximation). `average` normalises
/// the weights to sum 1 (default ½, ½); `task-arithmetic` uses them as given (default 1, 1).
/// `ties` applies TIES-Merging to the A factors and to the B factors separately, as PEFT's
/// `add_weighted_adapter(combination_type="ties")` does (equal ranks; rank kept; weights as
/// given, default 1, 1): an approximation whose ΔW is not the TIES of the inputs' ΔWs. A
/// trained projector is the weighted average for every method. The inputs must share the base model, the adapter kind (LoRA; MoELoRA is not
/// supported yet) and the target modules. The new checkpoint is evaluated on the union of the
/// tasks both inputs were trained on and becomes the head of the current branch after the
/// pre-checkpoint gate; its first parent is A. The same merge run again reuses its checkpoint
/// (the merge key). See docs/merge.md.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The first checkpoint (the first parent)
    pub a: String,
    /// The second checkpoint
    pub b: String,
    /// How to combine the adapters: average, task-arithmetic or ties (TIES on the LoRA factors)
    #[arg(
        long,
        default_value = "average",
        value_name = "average|task-arithmetic|ties"
    )]
    pub method: String,
    /// ties only: the share of each factor's entries kept, by magnitude (0 < D ≤ 1; default
    /// 0.2, the TIES paper's k = 20 %)
    #[arg(long, value_name = "D")]
    pub density: Option<f64>,
    /// The two weights, comma-separated, e.g. 0.7,0.3 (default: 0.5,0.5 for average, 1,1 for
    /// task-arithmetic)
    #[arg(long, value_name = "W1,W2")]
    pub weights: Option<String>,
    /// Commit message
    #[arg(short, long)]
    pub message: Option<String>,
    /// Skip the pre-checkpoint gate
    #[arg(long)]
    pub no_verify: bool,
    /// Tasks to evaluate the merged checkpoint on: union (every task either input was trained
    /// on), none, or a comma-separated list
    #[arg(long, default_value = "union", value_name = "union|none|T,...")]
    pub eval_tasks: String,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the outcome as JSON
    #[arg(long)]
    pub json: bool,
}

/// Parse `--weights`.
fn parse_weights(s: &str) -> Result<Vec<f64>, WorkflowError> {
    s.split(',')
        .map(|w| {
            w.trim().parse::<f64>().map_err(|_| {
                WorkflowError::Input(format!(
                    "--weights: '{}' is not a number; give two numbers, e.g. --weights 0.5,0.5",
                    w.trim().escape_debug()
                ))
            })
        })
        .collect()
}

/// Parse `--eval-tasks`.
fn parse_eval_tasks(s: &str) -> MergeEvalTasks {
    match s {
        "union" => MergeEvalTasks::Union,
        "none" => MergeEvalTasks::None,
        list => MergeEvalTasks::List(
            list.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
        ),
    }
}

pub fn cmd_merge(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &MergeArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let method = MergeMethod::parse(&args.method)?;
    let weights = args.weights.as_deref().map(parse_weights).transpose()?;
    // Checked before the configuration and the inputs are read.
    method.effective_density(args.density)?;
    let cfg = args.config.resolve(helper, &repo, None)?;
    let req = MergeRequest {
        a: repo.resolve(&args.a)?,
        b: repo.resolve(&args.b)?,
        method,
        weights,
        density: args.density,
        message: args.message.clone(),
        skip_hooks: args.no_verify,
        eval_tasks: parse_eval_tasks(&args.eval_tasks),
    };
    let outcome = {
        let mut progress = CliTrainProgress::new("merge", ui);
        let o = merge_checkpoints(&repo, &cfg, &req, &mut progress);
        progress.bar.finish();
        o?
    };
    if args.json {
        return ui.json(&outcome);
    }
    writeln!(
        ui.out(),
        "{} merge of {} and {} on {}{}",
        outcome.checkpoint.short(),
        req.a.short(),
        req.b.short(),
        outcome.branch,
        if outcome.reused { " (reused)" } else { "" }
    )?;
    super::train::write_evals(ui.out(), &outcome.evals)
}
