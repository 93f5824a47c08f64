//! `coin run`: train and evaluate a whole task order on a branch, resumably.

use std::collections::BTreeMap;
use std::io::Write as _;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::metrics::ForgettingMode;
use crate::workflow::eval::trained_tasks;
use crate::workflow::matrix::{build_matrix, is_base_record};
use crate::workflow::train::{
    commit_zero_shot, plan_train, read_order, train_task, EvalTasks, TrainRequest,
};

use super::history_util::open_repo;
use super::train::{outcome_json, CliTrainProgress};
use super::workflow_util::{ConfigArgs, StatusProgress};

/// Train and evaluate a task order step by step on a branch
///
/// Each task of the order is trained on top of the previous step (`coin train`), evaluated on
/// every task seen so far (all tasks of the order with --full-grid), and committed. The run is
/// resumable and idempotent: steps already on the branch are skipped, so the same command after
/// an interruption continues where it stopped, and steps shared with another order (same
/// parent, data and settings) are reused without training. Prints the accuracy matrix at the end.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The order: a name from .coin/orders/ (coin, alphabet, reversed, ...) or a TOML file with
    /// `tasks = [...]`
    #[arg(required_unless_present = "order")]
    pub order_name: Option<String>,
    /// The order as a comma-separated task list instead
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "A,B,C",
        conflicts_with = "order_name"
    )]
    pub order: Vec<String>,
    /// The branch to run on (created empty when missing; default: the current branch)
    #[arg(long)]
    pub branch: Option<String>,
    /// Adapter kind (shorthand for --set train.method=...)
    #[arg(long, value_parser = ["lora", "moelora"])]
    pub method: Option<String>,
    /// First evaluate the base model on every task of the order (a zero-shot row, for FWT)
    #[arg(long)]
    pub zero_shot: bool,
    /// Evaluate every step on every task of the order (the upper triangle too)
    #[arg(long)]
    pub full_grid: bool,
    /// Skip the pre-checkpoint gate
    #[arg(long)]
    pub no_verify: bool,
    /// Say what each step would do (already on the branch, reused by training key, trained;
    /// an external trainer's command as it would run) up to the first step that trains, and
    /// stop: nothing is switched, loaded, run or written
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the steps and the matrix as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_run(ui: &mut Ui, helper: &CommandHelper, args: &RunArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let order: Vec<String> = if args.order.is_empty() {
        let name = args
            .order_name
            .as_deref()
            .ok_or_else(|| CommandError::usage("give an order name or --order A,B,C"))?;
        read_order(&repo, &helper.cwd.join(name).to_string_lossy())
            .or_else(|_| read_order(&repo, name))?
    } else {
        args.order.clone()
    };
    let mut config = args.config.clone();
    if let Some(m) = &args.method {
        config.set.push(format!("train.method={m}"));
    }
    let cfg = config.resolve(helper, &repo, None)?;
    if args.dry_run {
        return dry_run(ui, &repo, &cfg, args, &order);
    }
    if let Some(b) = &args.branch {
        let exists = repo.branch_target(b)?.is_some();
        if repo.current_branch()? != *b {
            repo.switch(b, !exists)?;
            ui.status(&format!(
                "On branch {b}{}.",
                if exists { "" } else { " (new, empty)" }
            ));
        }
    }
    let branch = repo.current_branch()?;
    // What the branch already holds: it must be a prefix of the order.
    let head = repo.branch_target(&branch)?;
    let done = match head {
        Some(h) => trained_tasks(&repo, h)?,
        None => Vec::new(),
    };
    if done.len() > order.len() || done.iter().zip(&order).any(|(a, b)| a != b) {
        return Err(CommandError::user(format!(
            "branch {branch} has trained [{}], which is not a start of the order [{}]",
            done.join(", "),
            order.join(", ")
        ))
        .hint("Run the order on another branch: --branch NAME."));
    }
    let grid = EvalTasks::List(order.clone());
    if args.zero_shot {
        let has_base = match head {
            Some(h) => repo
                .first_parent_chain(h, None)?
                .iter()
                .filter_map(|c| repo.read_checkpoint(*c).ok())
                .any(|cp| cp.train.as_ref().is_some_and(is_base_record)),
            None => false,
        };
        if !has_base {
            if head.is_some() {
                ui.warn("--zero-shot: the branch already has steps; a zero-shot row must come first, so none is added");
            } else {
                ui.status(&format!(
                    "Zero-shot row: evaluating the base model on {} tasks.",
                    order.len()
                ));
                commit_zero_shot(
                    &repo,
                    &cfg,
                    &order,
                    BTreeMap::new(),
                    &mut StatusProgress { ui: &*ui },
                )?;
            }
        }
    }
    let mut steps = Vec::new();
    for (k, task) in order.iter().enumerate() {
        if k < done.len() {
            continue;
        }
        ui.status(&format!("Step {}/{}: {task}.", k + 1, order.len()));
        let req = TrainRequest {
            task: task.clone(),
            from: None,
            eval_tasks: if args.full_grid {
                grid.clone()
            } else {
                EvalTasks::Seen
            },
            message: Some(format!("step {} of {}", k + 1, order.len())),
            retrain: false,
            skip_hooks: args.no_verify,
        };
        let outcome = {
            let mut progress = CliTrainProgress::new(task, ui);
            let o = train_task(&repo, &cfg, &req, &mut progress);
            progress.bar.finish();
            o?
        };
        steps.push(outcome);
    }
    if !done.is_empty() {
        ui.status(&format!(
            "{} of {} steps were already on {branch}.",
            done.len(),
            order.len()
        ));
    }
    let tip = repo
        .branch_target(&branch)?
        .ok_or_else(|| CommandError::user(format!("branch {branch} has no checkpoint")))?;
    let bm = build_matrix(&repo, tip)?;
    let metrics = bm.metrics(ForgettingMode::MaxEarlier)?;
    if args.json {
        return ui.json(&serde_json::json!({
            "branch": branch,
            "order": order,
            "steps": steps.iter().map(outcome_json).collect::<Vec<_>>(),
            "matrix": bm.to_json(&metrics),
        }));
    }
    write!(ui.out(), "{}", bm.to_table())?;
    Ok(())
}

/// `coin run --dry-run`: the steps already on the branch, then each next step's plan while
/// it would be reused (its checkpoint is the next step's parent); planning stops at the first
/// step that would train, since the later ones start from its result.
fn dry_run(
    ui: &mut Ui,
    repo: &crate::history::CoinRepo,
    cfg: &crate::workflow::config::RunConfig,
    args: &RunArgs,
    order: &[String],
) -> Result<(), CommandError> {
    let branch = match &args.branch {
        Some(b) => b.clone(),
        None => repo.current_branch()?,
    };
    let head = repo.branch_target(&branch)?;
    let done = match head {
        Some(h) => trained_tasks(repo, h)?,
        None => Vec::new(),
    };
    if done.len() > order.len() || done.iter().zip(order).any(|(a, b)| a != b) {
        return Err(CommandError::user(format!(
            "branch {branch} has trained [{}], which is not a start of the order [{}]",
            done.join(", "),
            order.join(", ")
        ))
        .hint("Run the order on another branch: --branch NAME."));
    }
    let mut plans = Vec::new();
    let mut stopped_at = None;
    if args.zero_shot && head.is_none() {
        stopped_at = Some(0);
    } else {
        let mut parent = head;
        for (k, task) in order.iter().enumerate().skip(done.len()) {
            let req = TrainRequest {
                task: task.clone(),
                from: parent,
                eval_tasks: EvalTasks::None,
                message: None,
                retrain: false,
                skip_hooks: args.no_verify,
            };
            let plan = plan_train(repo, cfg, &req, Some(&branch))?;
            let reused = plan.reuse;
            plans.push(plan);
            match reused {
                Some(id) => parent = Some(id),
                None => {
                    if k + 1 < order.len() {
                        stopped_at = Some(k + 1);
                    }
                    break;
                }
            }
        }
    }
    if args.json {
        return ui.json(&serde_json::json!({
            "branch": branch,
            "order": order,
            "done": done,
            "steps": plans,
            "planned_until": stopped_at,
        }));
    }
    ui.status(&format!(
        "Branch {branch}{}: {} of {} steps already there.",
        if repo.branch_target(&branch)?.is_none() && args.branch.is_some() {
            " (would be created)"
        } else {
            ""
        },
        done.len(),
        order.len()
    ));
    if stopped_at == Some(0) {
        ui.status(
            "--zero-shot: the base model's row would be committed first; the steps start from \
             it, so they are planned once it exists.",
        );
    }
    for (i, p) in plans.iter().enumerate() {
        let k = done.len() + i + 1;
        super::train::show_plan(ui.out(), &format!("Step {k}/{}: ", order.len()), p)?;
    }
    if let Some(k) = stopped_at.filter(|&k| k > 0) {
        ui.status(&format!(
            "Steps {}–{} start from step {k}'s result: their keys are known once it exists.",
            k + 1,
            order.len()
        ));
    }
    Ok(())
}
