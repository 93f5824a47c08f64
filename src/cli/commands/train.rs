//! `coin train`: fine-tune the adapter of a checkpoint on one task, evaluate, commit.

use std::io::Write as _;

use crate::cli::train_progress::{CommandLine, TrainBar};
use crate::cli::{CommandError, CommandHelper, Ui};
use crate::ml::train::trainer::TrainProgress;
use crate::workflow::eval::EvalProgress;
use crate::workflow::external::CommandProgress;
use crate::workflow::train::{
    plan_train, train_task, EvalTasks, TrainOutcome, TrainPlan, TrainRequest, TrainWorkflowProgress,
};

use super::history_util::open_repo;
use super::workflow_util::{ConfigArgs, StatusProgress};

/// Fine-tune on one task, evaluate, and commit the adapter as a checkpoint
///
/// Starts from the adapter (and projector) of REV (default: the current branch's head; a fresh
/// adapter on the base model when the branch is empty), trains on TASK's training data with
/// the resolved configuration (preset → .coin/config.toml → environment → --config → --set;
/// docs/config.md), evaluates the new checkpoint, and makes it the branch head after the
/// pre-checkpoint gate. A checkpoint with the same training key (parent, data, template,
/// settings, the runtime's shards, kernels, device and dtype, coin version) anywhere in the
/// repository is reused instead of training again. An interrupted run resumes
/// from its last saved step when the same command is run again.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The task (a registered name or alias; see `coin task list`)
    pub task: String,
    /// The checkpoint to continue from (default: the branch head)
    #[arg(long, value_name = "REV")]
    pub from: Option<String>,
    /// Adapter kind (shorthand for --set train.method=...)
    #[arg(long, value_parser = ["lora", "moelora"])]
    pub method: Option<String>,
    /// Tasks to evaluate afterwards: seen (trained on this history, plus TASK), all, none, or a
    /// comma-separated list
    #[arg(long, default_value = "seen", value_name = "seen|all|none|T,...")]
    pub eval_tasks: String,
    /// Commit message
    #[arg(short, long)]
    pub message: Option<String>,
    /// Train even when a checkpoint with the same training key exists
    #[arg(long)]
    pub retrain: bool,
    /// Skip the pre-checkpoint gate
    #[arg(long)]
    pub no_verify: bool,
    /// Say what would happen (reuse or train, the training key, an external trainer's command
    /// as it would run) and stop: nothing is loaded, run or written
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the outcome as JSON
    #[arg(long)]
    pub json: bool,
}

/// Print a step's plan (`--dry-run`), the command's data, on stdout.
pub fn show_plan(out: &mut impl std::io::Write, label: &str, p: &TrainPlan) -> std::io::Result<()> {
    let key = &p.training_key[..12];
    let from = match p.parent {
        Some(id) => format!("from {}", id.short()),
        None => "from the base model".to_string(),
    };
    match (p.reuse, &p.command) {
        (Some(id), _) => writeln!(
            out,
            "{label}{}: would reuse {} (training key {key}); nothing is trained",
            p.task,
            id.short()
        ),
        (None, None) => writeln!(
            out,
            "{label}{}: would train with coin's engine {from} (training key {key})",
            p.task
        ),
        (None, Some(cmd)) => {
            writeln!(
                out,
                "{label}{}: would run the [trainer] command {from} (training key {key}) in {}:",
                p.task,
                p.workdir
                    .as_ref()
                    .map_or_else(String::new, |w| w.display().to_string())
            )?;
            writeln!(out, "    {cmd}")?;
            match p.code.as_ref().filter(|c| !c.is_null()) {
                Some(code) => writeln!(
                    out,
                    "    code: {} at {}{}",
                    code["repository"].as_str().unwrap_or("?"),
                    code["commit"].as_str().unwrap_or("(no commit)"),
                    if code["dirty"].as_bool() == Some(true) {
                        format!(", {} changed file(s)", code["changed_files"])
                    } else {
                        String::new()
                    }
                ),
                None => Ok(()),
            }
        }
    }
}

/// Parse `--eval-tasks`.
pub fn parse_eval_tasks(s: &str) -> EvalTasks {
    match s {
        "seen" => EvalTasks::Seen,
        "all" => EvalTasks::All,
        "none" => EvalTasks::None,
        list => EvalTasks::List(
            list.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
        ),
    }
}

/// The CLI's progress for the training workflow: status lines, a training bar, eval lines.
pub struct CliTrainProgress<'a> {
    /// The bar of the current training run.
    pub bar: TrainBar,
    /// Eval status lines.
    pub evals: StatusProgress<'a>,
    /// Where notes go.
    pub ui: &'a Ui,
    /// An external command's display.
    pub command: CommandLine<'a>,
}

impl<'a> CliTrainProgress<'a> {
    /// The progress of training `label` (a task name), drawn through `ui`.
    pub fn new(label: &str, ui: &'a Ui) -> Self {
        CliTrainProgress {
            bar: TrainBar::new(label, ui.show_progress(), ui.is_quiet()),
            evals: StatusProgress { ui },
            ui,
            command: CommandLine::new(ui),
        }
    }
}

impl TrainWorkflowProgress for CliTrainProgress<'_> {
    fn note(&mut self, message: &str) {
        self.bar.finish();
        self.ui.status(message);
    }
    fn trainer(&mut self) -> &mut dyn TrainProgress {
        &mut self.bar
    }
    fn evals(&mut self) -> &mut dyn EvalProgress {
        self.bar.finish();
        &mut self.evals
    }
    fn command(&mut self) -> &mut dyn CommandProgress {
        self.bar.finish();
        &mut self.command
    }
}

/// The JSON of an outcome.
pub fn outcome_json(o: &TrainOutcome) -> serde_json::Value {
    serde_json::json!({
        "checkpoint": o.checkpoint.to_string(),
        "branch": o.branch,
        "reused": o.reused,
        "training_key": o.key,
        "report": o.report,
        "evals": o.evals,
    })
}

pub fn cmd_train(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &TrainArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let mut config = args.config.clone();
    if let Some(m) = &args.method {
        config.set.push(format!("train.method={m}"));
    }
    let cfg = config.resolve(helper, &repo, None)?;
    let from = args.from.as_deref().map(|r| repo.resolve(r)).transpose()?;
    let req = TrainRequest {
        task: args.task.clone(),
        from,
        eval_tasks: parse_eval_tasks(&args.eval_tasks),
        message: args.message.clone(),
        retrain: args.retrain,
        skip_hooks: args.no_verify,
    };
    if args.dry_run {
        let plan = plan_train(&repo, &cfg, &req, None)?;
        if args.json {
            return ui.json(&plan);
        }
        show_plan(ui.out(), "", &plan)?;
        return Ok(());
    }
    let outcome = {
        let mut progress = CliTrainProgress::new(&args.task, ui);
        let o = train_task(&repo, &cfg, &req, &mut progress);
        progress.bar.finish();
        o?
    };
    if args.json {
        return ui.json(&outcome_json(&outcome));
    }
    writeln!(
        ui.out(),
        "{} {} on {}{}",
        outcome.checkpoint.short(),
        args.task,
        outcome.branch,
        if outcome.reused { " (reused)" } else { "" }
    )?;
    write_evals(ui.out(), &outcome.evals)
}

/// The eval lines of a new checkpoint (`coin train`, `coin merge`).
pub fn write_evals(
    out: &mut impl std::io::Write,
    evals: &[crate::workflow::eval::TaskEval],
) -> Result<(), CommandError> {
    for e in evals {
        writeln!(
            out,
            "  {:<20} {:>6.2}  n={}",
            e.task, e.record.score, e.record.n
        )?;
    }
    Ok(())
}
