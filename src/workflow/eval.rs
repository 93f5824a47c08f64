//! Evaluating a checkpoint: generate answers for each task's test set with the base model plus
//! the checkpoint's adapter, score them with the task's scorer, store the predictions as a
//! store blob and attach the records to the checkpoint as a git note (its id never changes).
//!
//! Work is cached: a record whose `cache_key` equals the one computed now is kept as it is; a
//! record whose `generation_key` matches (same adapter, base model and dtype, eval set and
//! decoding) but was scored in another mode is re-scored from its stored predictions without
//! generating. A generated record carries the resolved runtime it ran with (`runtime`); the
//! device, kernels and thread counts are recorded but not keyed (use `--force` to regenerate
//! after changing them). Key definitions: docs/workflow.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::history::CheckpointId;
use serde::Serialize;
use serde_json::{json, Value};

use crate::history::{Checkpoint, CoinRepo, EvalRecord};
use crate::ml::generate::{generate, GenerateRequest, GenerateSettings};
use crate::ml::image::Rgb8;
use crate::ml::llava::{load_model, LoadedModel, ModelSource};
use crate::ml::peft::PeftAdapter;
use crate::ml::runtime::Runtime;
use crate::store::ObjectId;
use crate::tasks::formats::{self, AnswerRecord};
use crate::tasks::registry::{self, Registry, TaskDef};
use crate::tasks::{ScoreMode, ScoreReport};

use super::config::RunConfig;
use super::WorkflowError;

mod plan;

use plan::{cache_key, plan, question_and_prompt, Action, TaskPlan};
pub use plan::{GENERATION_VERSION, SCORING_VERSION};

/// How a task's record was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskStatus {
    /// Answers were generated and scored.
    Generated,
    /// An identical record (same cache key) was already attached; nothing was done.
    Cached,
    /// Stored predictions were scored again (another mode), without generating.
    Rescored,
    /// An answer file given by the user was scored.
    ScoredFile,
}

/// What happened for one task.
#[derive(Clone, Debug, Serialize)]
pub struct TaskEval {
    /// The task (its registered name).
    pub task: String,
    /// The record now attached to the checkpoint.
    pub record: EvalRecord,
    /// How it was obtained.
    pub status: TaskStatus,
}

/// Progress of an eval, reported to the caller (the command line shows it; tests ignore it).
#[derive(Clone, Debug)]
pub enum EvalEvent<'a> {
    /// Every task's data was checked; `to_generate` tasks need the model.
    Planned {
        /// Tasks in order.
        tasks: &'a [String],
        /// How many of them need generation.
        to_generate: usize,
    },
    /// The base model is being loaded.
    LoadingModel {
        /// Its directory.
        base: &'a Path,
    },
    /// Generation for a task starts.
    TaskStarted {
        /// The task.
        task: &'a str,
        /// Test items.
        items: usize,
    },
    /// `done` of `total` answers generated for `task`.
    Generated {
        /// The task.
        task: &'a str,
        /// Answers so far.
        done: usize,
        /// Test items.
        total: usize,
    },
    /// A task's record is attached (or was already).
    TaskDone {
        /// The outcome.
        eval: &'a TaskEval,
    },
}

/// Receives [`EvalEvent`]s.
pub trait EvalProgress {
    /// Called for every event.
    fn event(&mut self, event: &EvalEvent<'_>);
}

/// A progress sink that ignores everything.
pub struct NoProgress;

impl EvalProgress for NoProgress {
    fn event(&mut self, _event: &EvalEvent<'_>) {}
}

/// Options of one eval.
#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// Scoring mode; `None` = `eval.mode` of the configuration (`auto` = the task's default).
    pub mode: Option<ScoreMode>,
    /// Generate and score again even when a record with the same key exists.
    pub force: bool,
}

/// The adapter of a checkpoint, ready to attach. The one place that knows adapter kinds:
/// MoELoRA gets its variant here when its loader exists.
pub enum CheckpointAdapter {
    /// The checkpoint holds no adapter (a zero-shot / base checkpoint): the base model runs.
    None,
    /// A PEFT LoRA or CoIN MoELoRA adapter (with its projector, when the checkpoint has one).
    Adapter(Box<PeftAdapter>),
}

impl CheckpointAdapter {
    /// Attach to the model's linears (replacing any adapter).
    pub fn attach(&self, model: &mut crate::ml::llava::Llava) -> Result<(), WorkflowError> {
        match self {
            CheckpointAdapter::None => model.clear_adapters(),
            CheckpointAdapter::Adapter(l) => {
                l.attach(model)?;
            }
        }
        Ok(())
    }
}

/// Materialise checkpoint `cp`'s files into a temporary folder and load its adapter onto
/// `device` in `dtype`. A checkpoint without `adapter_config.json` has no adapter.
pub fn load_checkpoint_adapter(
    repo: &CoinRepo,
    cp: &Checkpoint,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<CheckpointAdapter, WorkflowError> {
    if !cp.manifest.files.contains_key("adapter_config.json") {
        return Ok(CheckpointAdapter::None);
    }
    // The adapter loader knows the kinds (PEFT LoRA, CoIN MoELoRA) and refuses the rest by name.
    let tmp = tempfile::Builder::new()
        .prefix("coin-eval-adapter-")
        .tempdir()
        .map_err(WorkflowError::io(
            "create a temporary folder in",
            std::env::temp_dir(),
        ))?;
    let dir = tmp.path().join("adapter");
    repo.checkout(cp.id, &dir)?;
    let adapter = PeftAdapter::load(&dir, device, dtype)?;
    Ok(CheckpointAdapter::Adapter(Box::new(adapter)))
}

/// The registry of the repository, with a clear error when a task is unknown.
pub fn find_task<'a>(reg: &'a Registry, name: &str) -> Result<&'a TaskDef, WorkflowError> {
    reg.get(name).ok_or_else(|| {
        let known: Vec<&str> = reg.tasks.iter().map(|t| t.name.as_str()).collect();
        WorkflowError::Input(if known.is_empty() {
            format!("unknown task '{name}': this repository has no tasks registered (add them with `coin task add`)")
        } else {
            format!(
                "unknown task '{name}'; registered tasks: {} (add one with `coin task add`)",
                known.join(", ")
            )
        })
    })
}

/// The tasks trained on the first-parent chain ending at `id`, oldest first, each once: what
/// `coin eval REV` evaluates when no tasks are named (the row of the accuracy matrix). A merge
/// checkpoint's record lists the union of its inputs' tasks.
pub fn trained_tasks(repo: &CoinRepo, id: CheckpointId) -> Result<Vec<String>, WorkflowError> {
    // A merge checkpoint (`coin merge`) counts as the tasks of both its inputs.
    super::merge::merged_trained_tasks(repo, id)
}

/// Parse a predictions blob (JSONL answer lines).
fn parse_predictions(bytes: &[u8], id: &ObjectId) -> Result<Vec<AnswerRecord>, WorkflowError> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        WorkflowError::Input(format!("the predictions blob {id} is not UTF-8 text"))
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| {
            WorkflowError::Input(format!(
                "line {} of the predictions blob {id} is broken: {e}",
                i + 1
            ))
        })?);
    }
    Ok(out)
}

/// The eval-record field that holds the wall seconds of generating and scoring the answers
/// (`coin compare` sums it into a branch's wall time).
pub const SECONDS_FIELD: &str = "seconds";

fn make_record(
    plan: &TaskPlan,
    report: &ScoreReport,
    predictions: ObjectId,
    cfg: &RunConfig,
    generation_key: Option<&str>,
    runtime: Option<&Value>,
) -> EvalRecord {
    let mut extra = BTreeMap::new();
    extra.insert("mode".into(), json!(report.mode.to_string()));
    extra.insert("scorer".into(), json!(plan.def.scorer));
    extra.insert("predictions".into(), json!(predictions.to_string()));
    extra.insert("eval_set".into(), plan.eval_set.clone());
    extra.insert("coin_version".into(), json!(crate::VERSION));
    match generation_key {
        Some(g) => {
            extra.insert("decoding".into(), plan.decoding.clone());
            extra.insert("base_model".into(), json!(cfg.model.name));
            extra.insert("generation_key".into(), json!(g));
            extra.insert("cache_key".into(), json!(plan.cache_key));
            if let Some(rt) = runtime {
                extra.insert("runtime".into(), rt.clone());
            }
        }
        None => {
            extra.insert("source".into(), json!("answers-file"));
        }
    }
    EvalRecord {
        metric: report.metric.clone(),
        score: report.score,
        n: report.n as u64,
        extra,
    }
}

fn score_answers(
    repo: &CoinRepo,
    plan: &TaskPlan,
    answers: &[AnswerRecord],
) -> Result<ScoreReport, WorkflowError> {
    Ok(registry::score_task(
        &plan.def,
        repo.root(),
        answers,
        Some(plan.mode),
    )?)
}

/// Evaluate checkpoint `checkpoint` on `tasks` (registered names or aliases; empty = the tasks
/// trained on its first-parent chain): loads the base model named by `cfg.model` and the
/// checkpoint's adapter only when some task is not cached. Returns one outcome per task, in
/// order; every record is attached to the checkpoint as soon as its task is done.
pub fn evaluate(
    repo: &CoinRepo,
    checkpoint: CheckpointId,
    tasks: &[String],
    cfg: &RunConfig,
    opts: &EvalOptions,
    progress: &mut dyn EvalProgress,
) -> Result<Vec<TaskEval>, WorkflowError> {
    run(
        repo,
        checkpoint,
        tasks,
        cfg,
        opts,
        progress,
        ModelSlot::Load,
    )
}

/// A model already in memory, for [`evaluate_loaded`].
pub struct InMemoryModel<'m> {
    /// The loaded base model.
    pub model: &'m mut LoadedModel,
    /// `None`: the model runs as it is (e.g. the trainer's adapter still attached);
    /// `Some`: attached for the eval and removed afterwards.
    pub adapter: Option<&'m CheckpointAdapter>,
}

/// [`evaluate`] with a model already in memory (the trainer after a training step), so the
/// base model is not loaded again. `checkpoint` must be the committed checkpoint whose weights
/// the model carries (its files give the cache key).
pub fn evaluate_loaded(
    repo: &CoinRepo,
    checkpoint: CheckpointId,
    tasks: &[String],
    cfg: &RunConfig,
    opts: &EvalOptions,
    model: InMemoryModel<'_>,
    progress: &mut dyn EvalProgress,
) -> Result<Vec<TaskEval>, WorkflowError> {
    run(
        repo,
        checkpoint,
        tasks,
        cfg,
        opts,
        progress,
        ModelSlot::Given(model.model, model.adapter),
    )
}

enum ModelSlot<'m> {
    Load,
    Given(&'m mut LoadedModel, Option<&'m CheckpointAdapter>),
}

/// Load the base model `cfg.model` names, on the device and in the dtype of the resolved
/// `[runtime]`.
pub fn load_base_model(repo_root: &Path, cfg: &RunConfig) -> Result<LoadedModel, WorkflowError> {
    let base = cfg.base_dir(repo_root).ok_or_else(|| {
        WorkflowError::Input(
            "no base model configured: set [model] base = \"DIR\" in .coin/config.toml or pass --set model.base=DIR".into(),
        )
    })?;
    if !base.is_dir() {
        return Err(WorkflowError::Input(format!(
            "the base model directory '{}' (model.base) does not exist",
            base.display()
        )));
    }
    let vision = cfg.vision_tower_dir(repo_root);
    let projector = cfg.projector_file(repo_root);
    let source = ModelSource::resolve(&base, vision.as_deref(), projector.as_deref())?;
    let rt = cfg.resolved_runtime()?;
    Ok(load_model(&source, &rt.device()?, rt.dtype())?)
}

fn run(
    repo: &CoinRepo,
    checkpoint: CheckpointId,
    tasks: &[String],
    cfg: &RunConfig,
    opts: &EvalOptions,
    progress: &mut dyn EvalProgress,
    slot: ModelSlot<'_>,
) -> Result<Vec<TaskEval>, WorkflowError> {
    let cp = repo.read_checkpoint(checkpoint)?;
    let tasks = if tasks.is_empty() {
        let t = trained_tasks(repo, checkpoint)?;
        if t.is_empty() {
            return Err(WorkflowError::Input(format!(
                "checkpoint {} has no trained task on its history; name the tasks with --tasks",
                checkpoint.short()
            )));
        }
        t
    } else {
        tasks.to_vec()
    };
    super::config::check_parent_base(&cp, cfg)?;
    let rt = cfg.resolved_runtime()?;
    let rt_json = json!(rt);
    let plans = plan(repo, &cp, &tasks, cfg, opts, true)?;
    let names: Vec<String> = plans.iter().map(|p| p.def.name.clone()).collect();
    let to_generate = plans
        .iter()
        .filter(|p| matches!(p.action, Action::Generate))
        .count();
    progress.event(&EvalEvent::Planned {
        tasks: &names,
        to_generate,
    });

    let mut owned_model: Option<LoadedModel> = None;
    let mut owned_adapter: Option<CheckpointAdapter> = None;
    let (model, adapter): (Option<&mut LoadedModel>, Option<&CheckpointAdapter>) = if to_generate
        == 0
    {
        (None, None)
    } else {
        match slot {
            ModelSlot::Given(m, a) => (Some(m), a),
            ModelSlot::Load => {
                let base = cfg.base_dir(repo.root()).unwrap_or_default();
                progress.event(&EvalEvent::LoadingModel { base: &base });
                let loaded = owned_model.insert(load_base_model(repo.root(), cfg)?);
                let a =
                    load_checkpoint_adapter(repo, &cp, &loaded.model.device, loaded.model.dtype)?;
                (Some(loaded), Some(&*owned_adapter.insert(a)))
            }
        }
    };
    let mut model = model;
    // An adapter directory may carry its own projector (CoIN's non_lora_trainables): keep the
    // model's to put back afterwards.
    let saved_projector = match (model.as_deref(), adapter) {
        (Some(m), Some(_)) => Some((
            m.model.projector.linear_1.clone(),
            m.model.projector.linear_2.clone(),
        )),
        _ => None,
    };
    if let (Some(m), Some(a)) = (model.as_deref_mut(), adapter) {
        a.attach(&mut m.model)?;
    }

    let mut out = Vec::new();
    let result = (|| -> Result<(), WorkflowError> {
        for plan in &plans {
            let (record, status) = match &plan.action {
                Action::Keep(r) => (r.clone(), TaskStatus::Cached),
                Action::Rescore(id) => {
                    let answers = parse_predictions(&repo.store().read_blob(id)?, id)?;
                    let report = score_answers(repo, plan, &answers)?;
                    // The answers were generated earlier: their record says with what.
                    let ran = cp
                        .evals
                        .get(&plan.def.name)
                        .and_then(|(r, _)| r.extra.get("runtime"));
                    let mut rec =
                        make_record(plan, &report, *id, cfg, Some(&plan.generation_key), ran);
                    // ... and how long generating them took.
                    if let Some(secs) = cp
                        .evals
                        .get(&plan.def.name)
                        .and_then(|(r, _)| r.extra.get(SECONDS_FIELD))
                    {
                        rec.extra.insert(SECONDS_FIELD.into(), secs.clone());
                    }
                    (rec, TaskStatus::Rescored)
                }
                Action::Generate => {
                    let m = model
                        .as_deref_mut()
                        .expect("a model is loaded whenever a task needs generation");
                    let started = std::time::Instant::now();
                    let answers = generate_answers(repo.root(), m, plan, cfg, &rt, progress)?;
                    let jsonl = formats::answers_to_jsonl(&answers);
                    let id = repo.store().put_blob_bytes(jsonl.as_bytes())?;
                    let report = score_answers(repo, plan, &answers)?;
                    let mut rec = make_record(
                        plan,
                        &report,
                        id,
                        cfg,
                        Some(&plan.generation_key),
                        Some(&rt_json),
                    );
                    rec.extra
                        .insert(SECONDS_FIELD.into(), json!(started.elapsed().as_secs_f64()));
                    (rec, TaskStatus::Generated)
                }
            };
            if status != TaskStatus::Cached {
                let mut one = BTreeMap::new();
                one.insert(plan.def.name.clone(), record.clone());
                repo.add_eval_records(checkpoint, &one)?;
            }
            let eval = TaskEval {
                task: plan.def.name.clone(),
                record,
                status,
            };
            progress.event(&EvalEvent::TaskDone { eval: &eval });
            out.push(eval);
        }
        Ok(())
    })();
    if let (Some(m), Some(_)) = (model, adapter) {
        m.model.clear_adapters();
        if let Some((l1, l2)) = saved_projector {
            m.model.projector.linear_1 = l1;
            m.model.projector.linear_2 = l2;
        }
    }
    result?;
    Ok(out)
}

/// Generate one answer per test record, in batches of `eval.batch_size`; answer lines as
/// CoIN's `model_*.py` write them (`prompt` = the record's `text`, which CoIN's compat TextVQA
/// scorer needs).
fn generate_answers(
    repo_root: &Path,
    model: &mut LoadedModel,
    plan: &TaskPlan,
    cfg: &RunConfig,
    rt: &Runtime,
    progress: &mut dyn EvalProgress,
) -> Result<Vec<AnswerRecord>, WorkflowError> {
    let image_root: PathBuf = plan.def.resolve(repo_root, &plan.def.image_root);
    let total = plan.questions.len();
    progress.event(&EvalEvent::TaskStarted {
        task: &plan.def.name,
        items: total,
    });
    let settings = GenerateSettings {
        max_new_tokens: plan.max_new_tokens,
        aspect: plan.aspect,
        return_logits: false,
        ignore_eos: false,
    };
    let mut answers = Vec::with_capacity(total);
    for chunk in plan.questions.chunks(cfg.eval.batch_size.max(1)) {
        let mut batch = Vec::with_capacity(chunk.len());
        let mut shown = Vec::with_capacity(chunk.len());
        for q in chunk {
            let (question, prompt) = question_and_prompt(plan.prompt, &q.text, q.image.is_some());
            let req = match &q.image {
                Some(img) => {
                    let path = formats::resolve_image(&image_root, img)?;
                    GenerateRequest::question(&question, Rgb8::open(&path)?)
                }
                None => GenerateRequest {
                    prompt: crate::ml::template::vicuna_v1(&[(question.as_str(), None)]),
                    image: None,
                },
            };
            batch.push(req);
            shown.push(prompt);
        }
        let outs = crate::ml::fused::with_kernels(Some(rt.kernels), || {
            generate(model, None, &batch, &settings)
        })?;
        for ((q, o), prompt) in chunk.iter().zip(outs).zip(shown) {
            answers.push(AnswerRecord {
                question_id: q.question_id.clone(),
                prompt,
                // CoIN's generators keep `outputs.strip()` (Python's whitespace).
                text: Some(crate::tasks::normalize::python_strip(&o.text).to_string()),
                answer_id: json!(format!("{}-{}", plan.def.name, q.question_id)),
                model_id: json!(cfg.model.name),
                metadata: json!({}),
            });
        }
        progress.event(&EvalEvent::Generated {
            task: &plan.def.name,
            done: answers.len(),
            total,
        });
    }
    Ok(answers)
}

/// Score an answer file made elsewhere (`coin eval REV --answers FILE --task T`): the answers
/// are stored as the predictions blob and the record attached to `checkpoint`, marked
/// `"source": "answers-file"` (no generation key, so a later `coin eval` regenerates).
/// `extra` fields are added to the record (an external evaluator's command, status and key).
pub fn score_answer_file(
    repo: &CoinRepo,
    checkpoint: CheckpointId,
    task: &str,
    answers_path: &Path,
    cfg: &RunConfig,
    mode: Option<ScoreMode>,
    extra: BTreeMap<String, Value>,
) -> Result<TaskEval, WorkflowError> {
    let cp = repo.read_checkpoint(checkpoint)?;
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let def = find_task(&reg, task)?.clone();
    // Parse first: the bounded reader refuses an empty, oversized or broken file before the
    // whole file is read into memory to be stored.
    let answers = formats::read_answer_file(answers_path)?;
    let bytes = std::fs::read(answers_path)
        .map_err(WorkflowError::io("read the answer file", answers_path))?;
    let opts = EvalOptions { mode, force: true };
    // The plan checks the task's data; its keys are not used for an answer file.
    let plans = plan(
        repo,
        &cp,
        std::slice::from_ref(&def.name),
        cfg,
        &opts,
        false,
    )?;
    let plan = plans
        .into_iter()
        .next()
        .expect("plan returns one entry per distinct task");
    let report = score_answers(repo, &plan, &answers)?;
    let id = repo.store().put_blob_bytes(&bytes)?;
    let mut record = make_record(&plan, &report, id, cfg, None, None);
    record.extra.extend(extra);
    let mut one = BTreeMap::new();
    one.insert(def.name.clone(), record.clone());
    repo.add_eval_records(checkpoint, &one)?;
    Ok(TaskEval {
        task: def.name,
        record,
        status: TaskStatus::ScoredFile,
    })
}

/// Re-score the stored predictions of `checkpoint`'s records for `tasks` (empty = every record
/// with a predictions blob) in `mode`, without a model; the new records replace the old ones.
pub fn rescore(
    repo: &CoinRepo,
    checkpoint: CheckpointId,
    tasks: &[String],
    cfg: &RunConfig,
    mode: Option<ScoreMode>,
) -> Result<Vec<TaskEval>, WorkflowError> {
    let cp = repo.read_checkpoint(checkpoint)?;
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let names: Vec<String> = if tasks.is_empty() {
        cp.evals
            .iter()
            .filter(|(_, (r, _))| !r.object_ids().is_empty())
            .map(|(t, _)| t.clone())
            .collect()
    } else {
        tasks
            .iter()
            .map(|t| find_task(&reg, t).map(|d| d.name.clone()))
            .collect::<Result<_, _>>()?
    };
    if names.is_empty() {
        return Err(WorkflowError::Input(format!(
            "checkpoint {} has no stored predictions to re-score; run `coin eval` first",
            checkpoint.short()
        )));
    }
    let opts = EvalOptions { mode, force: true };
    let plans = plan(repo, &cp, &names, cfg, &opts, false)?;
    let mut out = Vec::new();
    for plan in &plans {
        let Some((old, _)) = cp.evals.get(&plan.def.name) else {
            return Err(WorkflowError::Input(format!(
                "checkpoint {} has no eval record for '{}' to re-score",
                checkpoint.short(),
                plan.def.name
            )));
        };
        let Some(id) = old.object_ids().first().copied() else {
            return Err(WorkflowError::Input(format!(
                "the '{}' record of {} has no stored predictions; run `coin eval` to generate them",
                plan.def.name,
                checkpoint.short()
            )));
        };
        let answers = parse_predictions(&repo.store().read_blob(&id)?, &id)?;
        let report = score_answers(repo, plan, &answers)?;
        let mut record = old.clone();
        record.metric = report.metric.clone();
        record.score = report.score;
        record.n = report.n as u64;
        record
            .extra
            .insert("mode".into(), json!(report.mode.to_string()));
        if let Some(Value::String(g)) = old.extra.get("generation_key") {
            record
                .extra
                .insert("cache_key".into(), json!(cache_key(g, &plan.scoring)?));
        }
        let mut one = BTreeMap::new();
        one.insert(plan.def.name.clone(), record.clone());
        repo.add_eval_records(checkpoint, &one)?;
        out.push(TaskEval {
            task: plan.def.name.clone(),
            record,
            status: TaskStatus::Rescored,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
