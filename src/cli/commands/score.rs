use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::tasks::formats::{read_answer_file, read_test_file};
use crate::tasks::scoring::{self, load_annotations, ScoreInput, ScoreMode, ScorerKind};
use crate::tasks::{registry, TaskError};

/// Score an answer file made by coin or by CoIN's own eval scripts
///
/// The questions file is the task's CoIN test/val JSON; the answer file is CoIN's JSONL
/// (`question_id`, `prompt`, `text`, …). The default mode is `compat` (CoIN's numbers, quirks
/// included) for the eight CoIN tasks and `strict` for every other task; docs/scoring.md lists
/// every difference.
#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// The task (a CoIN task, any spelling such as OCRVQA or OCR-VQA, or a registered task)
    #[arg(long)]
    pub task: String,
    /// The task's test/val JSON (CoIN format)
    #[arg(long)]
    pub questions: PathBuf,
    /// The answer file (JSONL)
    #[arg(long)]
    pub answers: PathBuf,
    /// What the task needs besides the questions: TextVQA_0.5.1_val.json, the ScienceQA folder
    /// with problems.json and pid_splits.json, or GQA's testdev_balanced_questions.json
    #[arg(long, value_name = "PATH")]
    pub annotations: Option<PathBuf>,
    /// compat: what CoIN computes; strict: the same metric with CoIN's quirks fixed
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Print JSON: {"task", "metric", "mode", "score", "n"}
    #[arg(long)]
    pub json: bool,
}

/// `--mode` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ModeArg {
    /// CoIN's numbers, quirks included
    Compat,
    /// The same metric with the quirks fixed
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

/// The scorer and default mode of a task name: a CoIN task, else a registered task.
pub(crate) fn resolve_scorer(
    helper: &CommandHelper,
    task: &str,
) -> Result<(String, ScorerKind, ScoreMode), CommandError> {
    if let Some(kind) = ScorerKind::from_name(task) {
        return Ok((kind.name().to_string(), kind, ScoreMode::Compat));
    }
    if let Some(dir) = registry::find_registry_dir(&helper.start_dir()) {
        if let Some(def) = registry::Registry::load(&dir)?.get(task) {
            return Ok((def.name.clone(), def.scorer_kind()?, def.default_mode()));
        }
    }
    Err(TaskError::UnknownTask(task.to_string()).into())
}

pub fn cmd_score(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &ScoreArgs,
) -> Result<(), CommandError> {
    let (name, kind, default_mode) = resolve_scorer(helper, &args.task)?;
    let mode = args.mode.map_or(default_mode, ScoreMode::from);
    let questions = read_test_file(&helper.cwd.join(&args.questions))?;
    let answers = read_answer_file(&helper.cwd.join(&args.answers))?;
    let annotations = match &args.annotations {
        Some(p) => Some(load_annotations(kind, &helper.cwd.join(p))?),
        None => None,
    };
    for w in scoring::id_warning(kind, mode, &answers, &args.answers)
        .into_iter()
        .chain(scoring::id_type_warning(
            kind,
            mode,
            &questions,
            &answers,
            &args.answers,
            &args.questions,
        ))
        .chain(scoring::questions_warning(
            kind,
            mode,
            &questions,
            &args.questions,
        ))
    {
        ui.warn(&w);
    }
    let mut report = scoring::score(
        kind,
        mode,
        ScoreInput {
            questions: &questions,
            answers: &answers,
            annotations: annotations.as_ref(),
        },
    )
    .map_err(|e| {
        // These errors speak of "the answer file" and "the questions file": name them.
        let names_files = match &e {
            TaskError::NothingScored { .. } => true,
            TaskError::Scoring { message, .. } => message.contains("the answer file"),
            _ => false,
        };
        let err = CommandError::from(e);
        if names_files {
            err.hint(format!(
                "Check the files: --questions '{}', --answers '{}'.",
                args.questions.display(),
                args.answers.display()
            ))
        } else {
            err
        }
    })?;
    report.task = name;
    if args.json {
        ui.json(&serde_json::json!({
            "task": report.task,
            "metric": report.metric,
            "mode": report.mode,
            "score": report.score,
            "n": report.n,
        }))
    } else {
        use std::io::Write;
        writeln!(
            ui.out(),
            "{} {} ({}): {:.2} over {} questions",
            report.task,
            report.metric,
            report.mode,
            report.score,
            report.n
        )?;
        Ok(())
    }
}
