//! `coin bisect`: the first checkpoint of a branch where a task was forgotten.

use std::io::Write as _;

use crate::cli::train_progress::CommandLine;
use crate::cli::{CommandError, CommandHelper, Ui};
use crate::workflow::bisect::{bisect, BisectProgress, BisectReport, BisectStep, ScoreSource};
use crate::workflow::eval::EvalProgress;
use crate::workflow::external::CommandProgress;

use super::history_util::open_repo;
use super::workflow_util::{ConfigArgs, StatusProgress};

/// Find the first checkpoint where TASK fell more than --drop points below its best earlier score
///
/// Searches the first-parent history of BRANCH (default: the current branch) from the
/// checkpoint that trained TASK to the tip, by bisection: a checkpoint is bad when TASK's score
/// there is more than --drop points below the best score known before it, and once bad the
/// later ones are assumed bad too. Scores come from existing eval records first; a checkpoint
/// without one is evaluated (coin's engine, or the [evaluator] command) and its record kept.
/// The answer names the task trained at the first bad checkpoint: the step that caused the
/// forgetting.
#[derive(clap::Args, Debug)]
pub struct BisectArgs {
    /// The task whose forgetting to locate
    #[arg(long)]
    pub task: String,
    /// Points below the best earlier score that count as forgotten
    #[arg(long, default_value_t = 5.0, value_name = "POINTS")]
    pub drop: f64,
    /// The branch or checkpoint whose history to search [default: the current branch]
    pub branch: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the search and its answer as JSON
    #[arg(long)]
    pub json: bool,
}

struct Lines<'a> {
    ui: &'a Ui,
    evals: StatusProgress<'a>,
    command: CommandLine<'a>,
}

fn step_line(s: &BisectStep) -> String {
    let reference = if s.best_earlier.is_finite() {
        format!("best earlier {:.2}", s.best_earlier)
    } else {
        "the reference".to_string()
    };
    format!(
        "{} #{} ({}): {:.2}, {reference}, {}{}",
        s.checkpoint.short(),
        s.position,
        s.trained_task,
        s.score,
        if s.bad { "bad" } else { "good" },
        match s.source {
            ScoreSource::Recorded => " (recorded)",
            ScoreSource::Evaluated => " (evaluated now)",
        }
    )
}

impl BisectProgress for Lines<'_> {
    fn step(&mut self, step: &BisectStep, remaining: usize) {
        self.ui.status(&format!(
            "{}; about {remaining} more step(s).",
            step_line(step)
        ));
    }
    fn evals(&mut self) -> &mut dyn EvalProgress {
        &mut self.evals
    }
    fn command(&mut self) -> &mut dyn CommandProgress {
        &mut self.command
    }
}

pub fn cmd_bisect(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &BisectArgs,
) -> Result<(), CommandError> {
    if !args.drop.is_finite() || args.drop < 0.0 {
        return Err(CommandError::usage(format!(
            "--drop needs a number of points >= 0, got {}",
            args.drop
        )));
    }
    let repo = open_repo(helper)?;
    let cfg = args.config.resolve(helper, &repo, None)?;
    let tip = repo.resolve(args.branch.as_deref().unwrap_or("HEAD"))?;
    let report: BisectReport = {
        let mut lines = Lines {
            ui: &*ui,
            evals: StatusProgress { ui: &*ui },
            command: CommandLine::new(ui),
        };
        bisect(&repo, tip, &args.task, args.drop, &cfg, &mut lines)?
    };
    if args.json {
        return ui.json(&report);
    }
    let out = ui.out();
    match &report.first_bad {
        Some(s) => writeln!(
            out,
            "{} ({}) is the first checkpoint where {} is more than {} points below its best \
             earlier score: {:.2} vs {:.2} ({} checkpoint(s) looked at, {} evaluated now)",
            s.checkpoint.short(),
            s.trained_task,
            report.task,
            report.drop,
            s.score,
            s.best_earlier,
            report.steps.len(),
            report.evaluated
        )?,
        None => writeln!(
            out,
            "{} is within {} points of its best earlier score at the tip ({} checkpoint(s) \
             looked at, {} evaluated now): nothing to find",
            report.task,
            report.drop,
            report.steps.len(),
            report.evaluated
        )?,
    }
    Ok(())
}
