//! `coin eval`: evaluate a checkpoint (generate + score) or attach given results, as notes.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::hooks::HookContext;
use crate::history::CheckpointId;
use crate::tasks::formats::{read_answer_file, read_test_file};
use crate::tasks::registry::Registry;
use crate::tasks::{scoring, ScoreMode};
use crate::workflow::eval::{self as weval, EvalOptions, TaskEval};

use super::history_util::{open_repo, read_eval_file};
use super::workflow_util::{ConfigArgs, StatusProgress};

/// Evaluate a checkpoint and attach the records to it without changing its id
///
/// Generates answers for each task's test set with the base model (`model.base` of the
/// configuration) plus the checkpoint's adapter, scores them, stores the predictions as a
/// store blob and records `{metric, score, n, mode, predictions, eval_set, decoding,
/// generation_key, cache_key}` in a git note (refs/notes/coin). A task whose record has the
/// same cache key (adapter content, base model, eval set, decoding settings, scorer mode) is
/// not run again; one with the same predictions but another mode is re-scored without
/// generating. Default tasks: those trained on the checkpoint's history.
///
/// `--answers FILE --task T` scores an answer file instead (no model); `--rescore` re-scores
/// stored predictions (e.g. with another `--mode`); `--record RESULTS.json` attaches results
/// computed elsewhere. Notes win over records made with the commit when shown.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The checkpoint (default: HEAD)
    pub rev: Option<String>,
    /// Tasks to evaluate, comma-separated (default: the tasks trained on REV's history)
    #[arg(long, value_delimiter = ',', value_name = "T,...")]
    pub tasks: Vec<String>,
    /// Scoring mode (default: eval.mode of the configuration; auto = compat for CoIN's
    /// eight tasks, strict otherwise)
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Generate and score again even when cached
    #[arg(long)]
    pub force: bool,
    /// Score this JSONL answer file (CoIN's format) instead of generating; needs --task
    #[arg(long, value_name = "FILE", requires = "task", conflicts_with_all = ["record", "rescore", "tasks"])]
    pub answers: Option<PathBuf>,
    /// The task of --answers
    #[arg(long, value_name = "T", requires = "answers")]
    pub task: Option<String>,
    /// Re-score the stored predictions (of --tasks, default all) without generating
    #[arg(long, conflicts_with_all = ["record", "force"])]
    pub rescore: bool,
    /// Attach results computed elsewhere: {"<task>": {"metric": ..., "score": 0-100, "n": N}, ...}
    #[arg(long, value_name = "RESULTS.json", conflicts_with_all = ["tasks", "mode", "force"])]
    pub record: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the records as JSON: [{"task", "status", "record"}]
    #[arg(long)]
    pub json: bool,
}

/// `--mode` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ModeArg {
    /// CoIN's scorers, quirks included
    Compat,
    /// the same metrics with the quirks fixed
    Strict,
}

impl From<ModeArg> for ScoreMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Compat => ScoreMode::Compat,
            ModeArg::Strict => ScoreMode::Strict,
        }
    }
}

pub fn cmd_eval(ui: &mut Ui, helper: &CommandHelper, args: &EvalArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let id = repo.resolve(args.rev.as_deref().unwrap_or("HEAD"))?;
    if let Some(path) = &args.record {
        let records = read_eval_file(helper, path)?;
        repo.add_eval_records(id, &records)?;
        ui.status(&format!(
            "Recorded {} eval result(s) on {}.",
            records.len(),
            id.short()
        ));
        return post_eval(ui, &repo, id, records.keys().cloned().collect());
    }
    let cfg = args.config.resolve(helper, &repo, None)?;
    let mode = args.mode.map(ScoreMode::from);
    let evals: Vec<TaskEval> = if let (Some(answers), Some(task)) = (&args.answers, &args.task) {
        for w in answer_id_warnings(&repo, task, &helper.cwd.join(answers), mode) {
            ui.warn(&w);
        }
        vec![weval::score_answer_file(
            &repo,
            id,
            task,
            &helper.cwd.join(answers),
            &cfg,
            mode,
            std::collections::BTreeMap::new(),
        )?]
    } else if args.rescore {
        weval::rescore(&repo, id, &args.tasks, &cfg, mode)?
    } else if !cfg.evaluator.command.trim().is_empty() {
        if mode.is_some() {
            return Err(CommandError::usage(
                "--mode applies to coin's own engine; the [evaluator] command's answers are \
                 scored in each task's default mode (use --rescore --mode afterwards)",
            ));
        }
        let mut progress = crate::cli::train_progress::CommandLine::new(ui);
        crate::workflow::external::evaluate_external(
            &repo,
            id,
            &args.tasks,
            &cfg,
            args.force,
            &mut progress,
        )?
    } else {
        let opts = EvalOptions {
            mode,
            force: args.force,
        };
        let mut progress = StatusProgress { ui: &*ui };
        weval::evaluate(&repo, id, &args.tasks, &cfg, &opts, &mut progress)?
    };
    let tasks: Vec<String> = evals.iter().map(|e| e.task.clone()).collect();
    if args.json {
        ui.json(&evals)?;
        return post_eval(ui, &repo, id, tasks);
    }
    let width = evals
        .iter()
        .map(|e| e.task.chars().count())
        .max()
        .unwrap_or(4);
    for e in &evals {
        let mode = e
            .record
            .extra
            .get("mode")
            .and_then(|m| m.as_str())
            .unwrap_or("?");
        let status = serde_json::to_value(e.status)?;
        writeln!(
            ui.out(),
            "{:<width$}  {:>6.2}  n={:<5} {mode:<6}  {}",
            e.task,
            e.record.score,
            e.record.n,
            status.as_str().unwrap_or("")
        )?;
    }
    let cached = evals
        .iter()
        .filter(|e| e.status == weval::TaskStatus::Cached)
        .count();
    ui.status(&format!(
        "Recorded {} eval result(s) on {} ({cached} already cached).",
        evals.len() - cached,
        id.short()
    ));
    post_eval(ui, &repo, id, tasks)
}

/// The question-id warnings `coin score` prints, for `coin eval --answers FILE --task T`: ids
/// that mix strings and numbers, are of a type the task's questions file does not use, or
/// (compat ScienceQA) are numbers. A task or file that cannot be read gives none here; scoring
/// reports it.
fn answer_id_warnings(
    repo: &crate::history::CoinRepo,
    task: &str,
    answers_path: &Path,
    mode: Option<ScoreMode>,
) -> Vec<String> {
    let Ok(reg) = Registry::load(&repo.coin_dir().join("tasks")) else {
        return Vec::new();
    };
    let Some(def) = reg.get(task) else {
        return Vec::new();
    };
    let (Ok(kind), Ok(answers)) = (def.scorer_kind(), read_answer_file(answers_path)) else {
        return Vec::new();
    };
    let mode = mode.unwrap_or_else(|| def.default_mode());
    let questions_path = def.resolve(repo.root(), &def.test);
    let questions = read_test_file(&questions_path).unwrap_or_default();
    scoring::id_warning(kind, mode, &answers, answers_path)
        .into_iter()
        .chain(scoring::id_type_warning(
            kind,
            mode,
            &questions,
            &answers,
            answers_path,
            &questions_path,
        ))
        .collect()
}

/// Run `.coin/hooks/post-eval` (when there is one) with the checkpoint, its parent and the
/// tasks; a failing hook is reported, the records are kept.
pub fn post_eval(
    ui: &mut Ui,
    repo: &crate::history::CoinRepo,
    id: CheckpointId,
    tasks: Vec<String>,
) -> Result<(), CommandError> {
    let parent = repo
        .read_checkpoint(id)
        .ok()
        .and_then(|c| c.parents.first().copied());
    let ctx = HookContext {
        checkpoint: Some(id),
        parent,
        extra_args: tasks,
        ..HookContext::default()
    };
    if let Some(hook) = repo.run_event("post-eval", &ctx)? {
        let output = hook.output();
        if !output.is_empty() {
            ui.status(&output);
        }
        if !hook.success() {
            ui.warn(&format!(
                "the post-eval hook failed ({}); the records are kept",
                hook.code
                    .map_or("killed by a signal".to_string(), |c| format!(
                        "exit status {c}"
                    ))
            ));
        }
    }
    Ok(())
}
