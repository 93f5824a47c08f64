//! Training one task on top of a checkpoint (`coin train`): resolve the task and its data,
//! check the parent's base model, reuse an identical earlier run (the training key), else load
//! the base model, attach the parent's adapter as trainable parameters (or fresh ones), train
//! with resumable checkpoints under `.coin/tmp/train/<key>/`, save the adapter, commit it as
//! one checkpoint (train record = resolved config, data identity, training key, loss summary),
//! and evaluate the new checkpoint with the model still in memory.
//!
//! The training key is the blake3 of the canonical JSON of everything that determines the
//! trained weights: parent checkpoint, task name, training-data blake3 and size, instruction
//! template, the resolved `train` settings and the base model's name, and coin's version. A
//! checkpoint anywhere in the repository with the same key is reused instead of training again:
//! a second task order that shares a prefix with the first retrains nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::Oid;
use serde_json::{json, Value};

use super::config::{check_parent_base, RunConfig};
use super::eval::{
    evaluate_loaded, find_task, load_base_model, trained_tasks, EvalOptions, EvalProgress,
    InMemoryModel, TaskEval,
};
use super::{short, WorkflowError};
use crate::history::hooks::HookContext;
use crate::history::records::to_canonical_json;
use crate::history::{BaseModel, CoinRepo, CommitRequest};
use crate::ml::image::AspectMode;
use crate::ml::train::data::{prepare_samples, PrepareStats};
use crate::ml::train::optim::Schedule;
use crate::ml::train::params::{AdapterKind, AdapterSettings, TrainableParams};
use crate::ml::train::save::save_adapter;
use crate::ml::train::trainer::{
    plan_steps, train, CheckpointPolicy, TrainConfig as LoopConfig, TrainProgress, TrainReport,
};
use crate::tasks::formats::{dataset_identity, read_train_file};
use crate::tasks::registry::Registry;

/// The train-record field holding the training key.
pub const TRAINING_KEY_FIELD: &str = "training_key";

/// Which tasks to evaluate after training.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalTasks {
    /// Every task trained on the new checkpoint's first-parent chain (the trained task included).
    Seen,
    /// Every registered task.
    All,
    /// No eval.
    None,
    /// These tasks.
    List(Vec<String>),
}

/// What to train.
#[derive(Clone, Debug)]
pub struct TrainRequest {
    /// The task (registered name or alias).
    pub task: String,
    /// The checkpoint to start from; `None`: the current branch's head (the base model when
    /// the branch is empty).
    pub from: Option<Oid>,
    /// The evals after training.
    pub eval_tasks: EvalTasks,
    /// Commit message.
    pub message: Option<String>,
    /// Train even when a checkpoint with the same training key exists.
    pub retrain: bool,
    /// Skip the `pre-checkpoint` gate.
    pub skip_hooks: bool,
}

/// What [`train_task`] did.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// The checkpoint now at the branch head.
    pub checkpoint: Oid,
    /// Whether an existing checkpoint was reused (no training ran).
    pub reused: bool,
    /// The training key.
    pub key: String,
    /// The trainer's report (when training ran).
    pub report: Option<TrainReport>,
    /// Data preparation counts (when training ran).
    pub prepared: Option<PrepareStats>,
    /// Eval outcomes, in task order.
    pub evals: Vec<TaskEval>,
    /// The branch moved.
    pub branch: String,
}

/// Progress of a training workflow (the CLI draws it; library code never prints).
pub trait TrainWorkflowProgress {
    /// A sentence about what happens next.
    fn note(&mut self, message: &str);
    /// The sink of the training steps.
    fn trainer(&mut self) -> &mut dyn TrainProgress;
    /// The sink of the eval events.
    fn evals(&mut self) -> &mut dyn EvalProgress;
}

/// Map the resolved configuration to the adapter settings.
pub fn adapter_settings(cfg: &RunConfig) -> Result<AdapterSettings, WorkflowError> {
    let t = &cfg.train;
    let kind = match t.method.as_str() {
        "lora" => AdapterKind::Lora,
        "moelora" => AdapterKind::MoeLora {
            experts: t.expert_num,
        },
        other => {
            return Err(WorkflowError::Config(format!(
                "train.method '{other}' is not lora or moelora"
            )))
        }
    };
    Ok(AdapterSettings {
        kind,
        r: t.lora_r,
        alpha: t.lora_alpha,
        dropout: t.lora_dropout,
        targets: t.targets.clone(),
        seed: t.seed,
        train_projector: t.mm_projector_lr > 0.0,
    })
}

/// Map the resolved configuration to the training loop's settings for `n` samples of `task`.
pub fn loop_config(cfg: &RunConfig, task: &str, n: usize) -> Result<LoopConfig, WorkflowError> {
    let t = &cfg.train;
    let schedule = match t.lr_scheduler.as_str() {
        "cosine" => Schedule::Cosine,
        "linear" => Schedule::Linear,
        "constant" => Schedule::Constant,
        other => {
            return Err(WorkflowError::Config(format!(
                "train.lr_scheduler '{other}' is not cosine, linear or constant"
            )))
        }
    };
    let image_aspect = match t.image_aspect_ratio.as_str() {
        "pad" => AspectMode::Pad,
        "crop" => AspectMode::Crop,
        "resize" => AspectMode::Resize,
        other => {
            return Err(WorkflowError::Config(format!(
                "train.image_aspect_ratio '{other}' is not pad, crop or resize"
            )))
        }
    };
    if !(t.num_train_epochs > 0.0 && t.num_train_epochs.is_finite()) {
        return Err(WorkflowError::Config(format!(
            "train.num_train_epochs must be positive, got {}",
            t.num_train_epochs
        )));
    }
    let epochs = t.num_train_epochs.ceil() as usize;
    let mut lc = LoopConfig {
        epochs,
        batch_size: cfg.train_batch_size(task),
        grad_accum: t.gradient_accumulation_steps,
        learning_rate: t.learning_rate,
        projector_lr: Some(t.mm_projector_lr).filter(|&p| p > 0.0),
        weight_decay: t.weight_decay,
        warmup_ratio: t.warmup_ratio,
        schedule,
        max_grad_norm: Some(t.max_grad_norm).filter(|&m| m > 0.0),
        seed: t.seed,
        image_aspect,
        max_steps: None,
    };
    // A fractional epoch count (HF allows 0.5): stop after that share of the steps.
    if t.num_train_epochs.fract() != 0.0 {
        let per_epoch = plan_steps(
            n,
            &LoopConfig {
                epochs: 1,
                ..lc.clone()
            },
        )
        .len();
        lc.max_steps = Some(((per_epoch as f64) * t.num_train_epochs).round().max(1.0) as usize);
    }
    Ok(lc)
}

fn find_by_key(repo: &CoinRepo, key: &str) -> Result<Option<Oid>, WorkflowError> {
    for oid in repo.known_checkpoints()? {
        let cp = match repo.read_checkpoint(oid) {
            Ok(cp) => cp,
            Err(_) => continue, // not a coin checkpoint
        };
        if cp
            .train
            .as_ref()
            .and_then(|t| t.extra.get(TRAINING_KEY_FIELD))
            .and_then(Value::as_str)
            == Some(key)
        {
            return Ok(Some(oid));
        }
    }
    Ok(None)
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> WorkflowError {
    WorkflowError::Input(format!("could not {what} '{}': {e}", path.display()))
}

/// Train `req.task` on the current branch (see the module docs).
pub fn train_task(
    repo: &CoinRepo,
    cfg: &RunConfig,
    req: &TrainRequest,
    progress: &mut dyn TrainWorkflowProgress,
) -> Result<TrainOutcome, WorkflowError> {
    cfg.validate()?;
    let settings = adapter_settings(cfg)?;
    let root = repo.root().to_path_buf();
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let def = find_task(&reg, &req.task)?.clone();
    let train_file = def.resolve(&root, &def.train);
    if !train_file.is_file() {
        return Err(WorkflowError::Input(format!(
            "task '{}': the training file '{}' does not exist (check data_root/train in \
             .coin/tasks/)",
            def.name,
            train_file.display()
        )));
    }
    let branch = repo.current_branch()?;
    let head = repo.branch_target(&branch)?;
    let parent = req.from.or(head);
    let parent_cp = parent.map(|p| repo.read_checkpoint(p)).transpose()?;
    if let Some(cp) = &parent_cp {
        check_parent_base(cp, cfg)?;
    }
    let data = dataset_identity(&train_file)?;
    let key_json = json!({
        "format": "coin.training-key.v1",
        "parent": parent.map(|p| p.to_string()),
        "task": def.name,
        "data": { "blake3": data.blake3, "items": data.items },
        "template": def.template,
        "train": serde_json::to_value(&cfg.train).map_err(|e| WorkflowError::Config(e.to_string()))?,
        "base_model": cfg.model.name,
        "coin_version": env!("CARGO_PKG_VERSION"),
    });
    let key = blake3::hash(to_canonical_json(&key_json)?.as_bytes())
        .to_hex()
        .to_string();

    if !req.retrain {
        if let Some(found) = find_by_key(repo, &key)? {
            progress.note(&format!(
                "Reusing checkpoint {} (same parent, data, template and settings: training key \
                 {}).",
                short(found),
                &key[..12]
            ));
            // A reused checkpoint passes the same gate as a new one (it may be one the gate
            // vetoed before: its eval notes keep it known to the repository).
            if head != Some(found) {
                if let Some(g) = repo.publish_checkpoint(&branch, head, found, req.skip_hooks)? {
                    let text = g.output();
                    if !text.is_empty() {
                        progress.note(&text);
                    }
                }
            }
            let evals = run_evals(repo, found, cfg, req, &def.name, None, progress)?;
            return Ok(TrainOutcome {
                checkpoint: found,
                reused: true,
                key,
                report: None,
                prepared: None,
                evals,
                branch,
            });
        }
    }

    let records = read_train_file(&train_file)?;
    progress.note(&format!("Loading the base model ({}).", cfg.model.name));
    let mut loaded = load_base_model(&root, cfg)?;
    let work = repo.coin_dir().join("tmp").join("train").join(&key[..16]);
    std::fs::create_dir_all(&work).map_err(|e| io_err("create", &work, e))?;
    let params = match &parent_cp {
        Some(cp) if cp.manifest.files.contains_key("adapter_config.json") => {
            let dir = work.join("parent");
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| io_err("remove", &dir, e))?;
            }
            repo.checkout(cp.id, &dir)?;
            progress.note(&format!("Continuing the adapter of {}.", short(cp.id)));
            TrainableParams::attach_from(&mut loaded.model, &settings, &dir)?
        }
        _ => TrainableParams::attach(&mut loaded.model, &settings)?,
    };
    let image_root = def.resolve(&root, &def.image_root);
    let (samples, prepared) = prepare_samples(
        &records,
        &image_root,
        &loaded.tokenizer,
        loaded.model.config.image_seq_len(),
        cfg.train.model_max_length,
    )?;
    if samples.is_empty() {
        return Err(WorkflowError::Input(format!(
            "task '{}': no training sample has a supervised token within model_max_length {}",
            def.name, cfg.train.model_max_length
        )));
    }
    let lc = loop_config(cfg, &def.name, samples.len())?;
    let total = plan_steps(samples.len(), &lc).len();
    progress.note(&format!(
        "Training {} on {} samples: {total} steps ({} trainable parameters).",
        def.name,
        samples.len(),
        params.num_elements()
    ));
    let policy = CheckpointPolicy {
        dir: work.join("resume"),
        every: (total / 10).max(1),
    };
    let report = train(
        &loaded.model,
        &params,
        &samples,
        &loaded.image,
        &lc,
        Some(&policy),
        progress.trainer(),
    )?;
    if report.stopped_early {
        return Err(WorkflowError::Input(format!(
            "training of {} stopped at step {} of {}; run the same command to resume",
            def.name, report.steps, report.planned_steps
        )));
    }
    let out = work.join("adapter");
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| io_err("remove", &out, e))?;
    }
    save_adapter(&params, &out, &cfg.model.name)?;

    let mut extra: BTreeMap<String, Value> = BTreeMap::new();
    extra.insert(TRAINING_KEY_FIELD.into(), Value::String(key.clone()));
    extra.insert("config".into(), cfg.to_record_value());
    extra.insert(
        "data".into(),
        json!({
            "file": def.train, "blake3": data.blake3, "items": data.items,
            "samples": prepared.samples, "truncated": prepared.truncated,
            "skipped": prepared.skipped,
        }),
    );
    let (first, last) = report.loss_drop(10).unwrap_or((f64::NAN, f64::NAN));
    extra.insert(
        "result".into(),
        json!({
            "steps": report.steps, "seconds": report.seconds,
            "tokens_per_s": report.tokens_per_s,
            "loss_first10": first, "loss_last10": last,
            "trainable_parameters": report.trainable_parameters,
            "device": format!("{:?}", loaded.model.device.location()),
            "dtype": format!("{:?}", loaded.model.dtype).to_lowercase(),
        }),
    );
    // Written but not yet on the branch: the evals come first, so that the pre-checkpoint gate
    // (e.g. the forgetting gate) sees the new scores.
    let outcome = repo.commit(&CommitRequest {
        paths: vec![out.clone()],
        task: def.name.clone(),
        message: req.message.clone(),
        evals: BTreeMap::new(),
        parent,
        base_model: Some(BaseModel {
            name: cfg.model.name.clone(),
            manifest: None,
        }),
        train_extra: extra,
        skip_hooks: req.skip_hooks,
        detached: true,
    })?;
    progress.note(&format!(
        "Wrote checkpoint {} ({} after {} steps, loss {first:.3} → {last:.3}).",
        short(outcome.id),
        def.name,
        report.steps
    ));
    let evals = run_evals(
        repo,
        outcome.id,
        cfg,
        req,
        &def.name,
        Some(&mut loaded),
        progress,
    )?;
    let gate = repo.publish_checkpoint(&branch, head, outcome.id, req.skip_hooks)?;
    if let Some(g) = gate {
        let text = g.output();
        if !text.is_empty() {
            progress.note(&text);
        }
    }
    progress.note(&format!(
        "{} is now the head of {branch}.",
        short(outcome.id)
    ));
    let ctx = HookContext {
        checkpoint: Some(outcome.id),
        parent,
        branch: Some(branch.clone()),
        task: Some(def.name.clone()),
        extra_args: Vec::new(),
    };
    if let Some(h) = repo.run_event("post-train", &ctx)? {
        let text = h.output();
        if !text.is_empty() {
            progress.note(&text);
        }
        if !h.success() {
            progress.note("The post-train hook failed; the checkpoint is kept.");
        }
    }
    // The resume state and the saved copy are in the store now.
    let _ = std::fs::remove_dir_all(&work);
    Ok(TrainOutcome {
        checkpoint: outcome.id,
        reused: false,
        key,
        report: Some(report),
        prepared: Some(prepared),
        evals,
        branch,
    })
}

fn run_evals(
    repo: &CoinRepo,
    id: Oid,
    cfg: &RunConfig,
    req: &TrainRequest,
    task: &str,
    model: Option<&mut crate::ml::llava::LoadedModel>,
    progress: &mut dyn TrainWorkflowProgress,
) -> Result<Vec<TaskEval>, WorkflowError> {
    let tasks: Vec<String> = match &req.eval_tasks {
        EvalTasks::None => return Ok(Vec::new()),
        EvalTasks::Seen => {
            let mut t = trained_tasks(repo, id)?;
            if !t.iter().any(|x| x == task) {
                t.push(task.to_string());
            }
            t
        }
        EvalTasks::All => Registry::load(&repo.coin_dir().join("tasks"))?
            .tasks
            .iter()
            .map(|t| t.name.clone())
            .collect(),
        EvalTasks::List(l) => l.clone(),
    };
    let opts = EvalOptions::default();
    match model {
        Some(m) => evaluate_loaded(
            repo,
            id,
            &tasks,
            cfg,
            &opts,
            InMemoryModel {
                model: m,
                adapter: None,
            },
            progress.evals(),
        ),
        None => super::eval::evaluate(repo, id, &tasks, cfg, &opts, progress.evals()),
    }
}

/// Where a task order comes from: `.coin/orders/<name>.toml` or a file.
pub fn read_order(repo: &CoinRepo, name_or_file: &str) -> Result<Vec<String>, WorkflowError> {
    let as_file = PathBuf::from(name_or_file);
    let path = if as_file.is_file() {
        as_file
    } else {
        repo.coin_dir()
            .join("orders")
            .join(format!("{name_or_file}.toml"))
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        WorkflowError::Input(format!(
            "no task order '{name_or_file}' ('{}': {e}); orders live in .coin/orders/ or pass \
             --order A,B,C",
            path.display()
        ))
    })?;
    #[derive(serde::Deserialize)]
    struct Order {
        tasks: Vec<String>,
    }
    let o: Order = toml::from_str(&text)
        .map_err(|e| WorkflowError::Input(format!("'{}': {e}", path.display())))?;
    if o.tasks.is_empty() {
        return Err(WorkflowError::Input(format!(
            "'{}' lists no tasks",
            path.display()
        )));
    }
    Ok(o.tasks)
}

/// Commit the zero-shot row on the current (empty) branch: a checkpoint without adapter whose
/// train record has `kind = "base"` (one file, `zero-shot.json`, saying what it is, with
/// `about` merged in), then evaluate the base model on `tasks` and attach the records. Returns
/// the checkpoint. `coin run --zero-shot` and `coin demo` use it.
pub fn commit_zero_shot(
    repo: &CoinRepo,
    cfg: &RunConfig,
    tasks: &[String],
    about: BTreeMap<String, Value>,
    progress: &mut dyn EvalProgress,
) -> Result<Oid, WorkflowError> {
    use super::matrix::{KIND_BASE, KIND_FIELD};
    let mut extra = BTreeMap::new();
    extra.insert(KIND_FIELD.to_string(), json!(KIND_BASE));
    extra.insert("config".to_string(), cfg.to_record_value());
    let tmp = tempfile::tempdir()
        .map_err(|e| WorkflowError::Input(format!("could not create a temporary folder: {e}")))?;
    let note = tmp.path().join("zero-shot.json");
    let mut body = serde_json::Map::new();
    body.insert("kind".into(), json!(KIND_BASE));
    body.insert("base_model".into(), json!(cfg.model.name));
    body.insert(
        "about".into(),
        json!("the zero-shot row: the base model evaluated before any task"),
    );
    body.extend(about);
    let text = serde_json::to_string_pretty(&Value::Object(body))
        .map_err(|e| WorkflowError::Input(e.to_string()))?;
    crate::store::fsutil::write_atomic(&note, format!("{text}\n"))
        .map_err(|e| io_err("write", &note, e))?;
    let out = repo.commit(&CommitRequest {
        paths: vec![note],
        task: "zero-shot".into(),
        message: Some("the base model, before any task".into()),
        train_extra: extra,
        base_model: Some(BaseModel {
            name: cfg.model.name.clone(),
            manifest: None,
        }),
        skip_hooks: true,
        ..CommitRequest::default()
    })?;
    super::eval::evaluate(repo, out.id, tasks, cfg, &EvalOptions::default(), progress)?;
    Ok(out.id)
}
