//! Training one task on top of a checkpoint (`coin train`): resolve the task and its data,
//! check the parent's base model, reuse an identical earlier run (the training key), else load
//! the base model, attach the parent's adapter as trainable parameters (or fresh ones), train
//! with resumable checkpoints under `.coin/tmp/train/<key>/`, save the adapter, commit it as
//! one checkpoint (train record = resolved config, data identity, training key, loss summary),
//! and evaluate the new checkpoint with the model still in memory.
//!
//! The training key is the blake3 of the canonical JSON of everything that determines the
//! trained weights: parent checkpoint, task name, training-data blake3 and size, instruction
//! template, the resolved `train` settings, the base model's name, the resolved runtime values
//! that change the numbers (shards, kernels, device, dtype: [`Runtime::keyed`]), and coin's
//! version. A checkpoint anywhere in the repository with the same key is reused instead of
//! training again: a second task order that shares a prefix with the first retrains nothing.
//! The train record stores the configuration with its `[runtime]` resolved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::history::CheckpointId;
use serde::Serialize;
use serde_json::{json, Value};

use super::config::{check_parent_base, Method, ProjectorInit, RunConfig, Strategy, METHOD_FIELDS};
use super::eval::{
    evaluate_loaded, find_task, load_base_model, trained_tasks, EvalOptions, EvalProgress,
    InMemoryModel, TaskEval,
};
use super::external::{self, CommandProgress, TrainerStep, EXTERNAL_FIELD};
use super::methods::{self, MethodContext};
use super::WorkflowError;
use crate::history::hooks::HookContext;
use crate::history::records::to_canonical_json;
use crate::history::{BaseModel, CoinRepo, CommitRequest};
use crate::ml::runtime::Runtime;
use crate::ml::train::data::{prepare_samples, Labeling, PrepareStats};
use crate::ml::train::olora::attach_olora;
use crate::ml::train::params::{AdapterKind, AdapterSettings, TrainableParams};
use crate::ml::train::save::save_adapter;
use crate::ml::train::trainer::{
    plan_steps, train_with, CheckpointPolicy, TrainConfig as LoopConfig, TrainProgress, TrainReport,
};
use crate::tasks::formats::{dataset_identity, read_train_file};
use crate::tasks::registry::Registry;

/// The train-record field holding the training key.
pub const TRAINING_KEY_FIELD: &str = "training_key";

/// The version tag of the training key's JSON (v2: with the runtime; v3: split-setup labels
/// as LLaVA's preprocess_v1 and one MoELoRA dropout mask per expert, so steps trained before
/// are not reused).
pub const TRAINING_KEY_FORMAT: &str = "coin.training-key.v3";

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
    pub from: Option<CheckpointId>,
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
    pub checkpoint: CheckpointId,
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
    /// The sink of an external trainer's or evaluator's progress.
    fn command(&mut self) -> &mut dyn CommandProgress;
}

/// Map the resolved configuration to the adapter settings.
pub fn adapter_settings(cfg: &RunConfig) -> Result<AdapterSettings, WorkflowError> {
    let t = &cfg.train;
    let kind = match t.method {
        Method::Lora => AdapterKind::Lora,
        Method::Moelora => AdapterKind::MoeLora {
            experts: t.expert_num,
        },
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

/// Map the resolved configuration and runtime to the training loop's settings for `n`
/// samples of `task`.
pub fn loop_config(
    cfg: &RunConfig,
    rt: &Runtime,
    task: &str,
    n: usize,
) -> Result<LoopConfig, WorkflowError> {
    let t = &cfg.train;
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
        schedule: t.lr_scheduler,
        max_grad_norm: Some(t.max_grad_norm).filter(|&m| m > 0.0),
        seed: t.seed,
        image_aspect: t.image_aspect_ratio,
        max_steps: None,
        drop_partial_step: t.drop_partial_step,
        shards: rt.shards,
        kernels: Some(rt.kernels),
        checkpointing: rt.checkpointing,
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

/// What the training key is made of (see the module docs).
struct KeyInputs<'a> {
    parent: Option<CheckpointId>,
    task: &'a str,
    data_blake3: &'a str,
    data_items: usize,
    template: Option<&'a str>,
    cfg: &'a RunConfig,
    rt: &'a Runtime,
    /// The replayed tasks' data (empty unless `train.strategy = replay`).
    replay: &'a [ReplayGroup],
    /// Whether the parent has an adapter (an `lwf` teacher).
    parent_adapter: bool,
}

/// The training key: blake3 of the canonical JSON of [`KeyInputs`] and coin's version.
fn training_key(k: &KeyInputs<'_>) -> Result<String, WorkflowError> {
    let mut train = k
        .cfg
        .train
        .keyed_value()
        .map_err(|source| WorkflowError::Encode {
            what: "the training settings",
            source,
        })?;
    // A step where the method has nothing to work with (nothing to replay, no teacher)
    // trains exactly as sequential fine-tuning: same key, so a method's branch shares its
    // first step with a sequential one.
    let active = match k.cfg.train.strategy {
        Strategy::Sequential => false,
        Strategy::Replay => !k.replay.is_empty(),
        // Even a first step stores its Fisher: never the same checkpoint as sequential's.
        Strategy::Ewc => true,
        Strategy::Lwf => k.parent_adapter,
        // Even a first step stores its task's factors (olora.safetensors).
        Strategy::Olora => true,
    };
    if !active {
        if let Some(o) = train.as_object_mut() {
            o.remove("strategy");
            for (_, fields) in METHOD_FIELDS {
                for f in *fields {
                    o.remove(*f);
                }
            }
        }
    }
    let key_json = json!({
        "format": TRAINING_KEY_FORMAT,
        "parent": k.parent.map(|p| p.to_string()),
        "task": k.task,
        "data": { "blake3": k.data_blake3, "items": k.data_items },
        "template": k.template,
        "train": train,
        "base_model": k.cfg.model.name,
        "runtime": k.rt.keyed(),
        "coin_version": env!("CARGO_PKG_VERSION"),
    });
    let mut key_json = key_json;
    if !k.replay.is_empty() {
        key_json["replay"] = json!(k
            .replay
            .iter()
            .map(|g| json!({"task": g.task, "blake3": g.data.blake3, "items": g.data.items}))
            .collect::<Vec<_>>());
    }
    Ok(blake3::hash(to_canonical_json(&key_json)?.as_bytes())
        .to_hex()
        .to_string())
}

fn find_by_key(repo: &CoinRepo, key: &str) -> Result<Option<CheckpointId>, WorkflowError> {
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

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> WorkflowError {
    WorkflowError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a training step starts from: the configuration with its runtime resolved, the task,
/// its training file and data identity, the branch, its head and the parent.
struct StepInputs {
    cfg: RunConfig,
    rt: Runtime,
    def: crate::tasks::registry::TaskDef,
    train_file: PathBuf,
    branch: String,
    head: Option<CheckpointId>,
    parent: Option<CheckpointId>,
    parent_cp: Option<crate::history::Checkpoint>,
    data: crate::tasks::formats::DatasetIdentity,
    /// What was adjusted on the way, for the user (e.g. a merged parent's rank).
    notes: Vec<String>,
}

/// Resolve and check a step's inputs, before anything is loaded or run.
fn step_inputs(
    repo: &CoinRepo,
    cfg: &RunConfig,
    req: &TrainRequest,
    branch: Option<&str>,
) -> Result<StepInputs, WorkflowError> {
    cfg.validate()?;
    let rt = cfg.resolved_runtime()?;
    let cfg = cfg.with_runtime(rt);
    if !cfg.trainer.command.trim().is_empty() {
        let why = match cfg.train.strategy {
            Strategy::Sequential => None,
            Strategy::Replay => Some(
                "train.strategy = replay needs coin's engine: an external [trainer] gets only \
                 the task's own {data}; mix the replayed items in the trainer, or leave \
                 trainer.command empty",
            ),
            Strategy::Ewc => Some(
                "train.strategy = ewc needs coin's engine: its penalty is a term of coin's \
                 training objective and its Fisher is computed by coin after training; leave \
                 trainer.command empty, or use train.strategy = sequential with the external \
                 trainer",
            ),
            Strategy::Lwf => Some(
                "train.strategy = lwf needs coin's engine: an external [trainer] trains with its \
                 own objective, without the distillation term; add it to the trainer and use \
                 train.strategy = sequential, or leave trainer.command empty",
            ),
            Strategy::Olora => Some(
                "train.strategy = olora needs coin's engine: it adds a penalty term to the loss \
                 and stores every task's adapter, which an external [trainer] does not do; leave \
                 trainer.command empty, or set train.strategy = \"sequential\"",
            ),
        };
        if let Some(why) = why {
            return Err(WorkflowError::Config(why.into()));
        }
    }
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
    let branch = match branch {
        Some(b) => b.to_string(),
        None => repo.current_branch()?,
    };
    let head = repo.branch_target(&branch)?;
    let parent = req.from.or(head);
    let parent_cp = parent.map(|p| repo.read_checkpoint(p)).transpose()?;
    if let Some(cp) = &parent_cp {
        check_parent_base(cp, &cfg)?;
    }
    let mut cfg = cfg;
    let mut notes = Vec::new();
    // (O-LoRA freezes the merged adapter and trains a fresh one of rank train.lora_r.)
    let merged = parent_cp.as_ref().and_then(merged_shape);
    if let Some((r, alpha)) = merged.filter(|_| cfg.train.strategy != Strategy::Olora) {
        if (r, alpha) != (cfg.train.lora_r, cfg.train.lora_alpha) {
            // A merge's adapter has the summed rank of its inputs: training on from it continues
            // that adapter, whatever rank a fresh one would get. The record and the key say so.
            notes.push(format!(
                "Continuing the merged adapter with its own rank {r} and lora_alpha {alpha} \
                 (train.lora_r = {} and lora_alpha = {} apply to fresh adapters).",
                cfg.train.lora_r, cfg.train.lora_alpha
            ));
            cfg.train.lora_r = r;
            cfg.train.lora_alpha = alpha;
        }
    }
    let data = dataset_identity(&train_file)?;
    Ok(StepInputs {
        notes,
        cfg,
        rt,
        def,
        train_file,
        branch,
        head,
        parent,
        parent_cp,
        data,
    })
}

/// The rank and `lora_alpha` of a merge checkpoint's adapter (`coin merge`), from its record.
fn merged_shape(cp: &crate::history::Checkpoint) -> Option<(usize, f64)> {
    let t = cp
        .train
        .as_ref()
        .filter(|t| t.task == super::merge::MERGE_TASK)?;
    let r = t.extra.get("rank")?.as_u64()? as usize;
    let scale = t.extra.get("scale")?.as_f64()?;
    (r > 0 && scale.is_finite()).then_some((r, scale * r as f64))
}

/// The training key of a step of coin's own engine.
fn own_key(
    parent: Option<CheckpointId>,
    def: &crate::tasks::registry::TaskDef,
    data: &crate::tasks::formats::DatasetIdentity,
    cfg: &RunConfig,
    rt: &Runtime,
    replay: &[ReplayGroup],
    parent_cp: Option<&crate::history::Checkpoint>,
) -> Result<String, WorkflowError> {
    training_key(&KeyInputs {
        parent_adapter: has_adapter(parent_cp),
        parent,
        task: &def.name,
        data_blake3: &data.blake3,
        data_items: data.items,
        template: def.template.as_deref(),
        cfg,
        rt,
        replay,
    })
}

/// Whether checkpoint `cp` holds an adapter (one to continue, and an `lwf` teacher).
fn has_adapter(cp: Option<&crate::history::Checkpoint>) -> bool {
    cp.is_some_and(|c| c.manifest.files.contains_key("adapter_config.json"))
}

/// The items one earlier task contributes to a `replay` step.
struct ReplayGroup {
    /// The earlier task.
    task: String,
    /// Its training file's identity.
    data: crate::tasks::formats::DatasetIdentity,
    /// Its image folder.
    image_root: PathBuf,
    /// The positions of the replayed items in its training file, ascending.
    indices: Vec<usize>,
    /// Those items.
    records: Vec<crate::tasks::formats::TrainRecord>,
}

/// Which of `n` items of `task` are replayed: `k` of them, chosen by `seed` (the items sorted
/// by blake3 of seed, task and position; the first `k`), in file order.
fn replay_indices(seed: u64, task: &str, n: usize, k: usize) -> Vec<usize> {
    let mut order: Vec<(blake3::Hash, usize)> = (0..n)
        .map(|i| {
            let mut h = blake3::Hasher::new();
            h.update(b"coin.replay.v1");
            h.update(&seed.to_le_bytes());
            h.update(task.as_bytes());
            h.update(&(i as u64).to_le_bytes());
            (h.finalize(), i)
        })
        .collect();
    order.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut picked: Vec<usize> = order.into_iter().take(k).map(|(_, i)| i).collect();
    picked.sort_unstable();
    picked
}

/// The replayed items of a step (`train.strategy = replay`): from each task trained on the
/// parent's first-parent history (the current task left out), `replay_items` items, or
/// `replay_share` of them, chosen by [`replay_indices`].
fn replay_groups(
    repo: &CoinRepo,
    cfg: &RunConfig,
    parent: Option<CheckpointId>,
    task: &str,
) -> Result<Vec<ReplayGroup>, WorkflowError> {
    use super::config::Strategy;
    let t = &cfg.train;
    if t.strategy != Strategy::Replay {
        return Ok(Vec::new());
    }
    let Some(parent) = parent else {
        return Ok(Vec::new());
    };
    let root = repo.root().to_path_buf();
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for earlier in trained_tasks(repo, parent)? {
        if earlier == task || !seen.insert(earlier.clone()) {
            continue;
        }
        let def = find_task(&reg, &earlier).map_err(|_| {
            WorkflowError::Input(format!(
                "train.strategy = replay: the earlier task '{earlier}' is not registered, so \
                 its items cannot be replayed (coin task add, or train on another branch)"
            ))
        })?;
        let file = def.resolve(&root, &def.train);
        let records = read_train_file(&file)?;
        let n = records.len();
        let k = if t.replay_share > 0.0 {
            ((n as f64) * t.replay_share).round() as usize
        } else {
            t.replay_items
        }
        .min(n);
        let indices = replay_indices(t.seed, &def.name, n, k);
        let picked = indices.iter().map(|&i| records[i].clone()).collect();
        out.push(ReplayGroup {
            task: def.name.clone(),
            data: dataset_identity(&file)?,
            image_root: def.resolve(&root, &def.image_root),
            indices,
            records: picked,
        });
    }
    Ok(out)
}

/// What [`train_task`] would do (`--dry-run`): nothing is loaded, run or written.
#[derive(Clone, Debug, Serialize)]
pub struct TrainPlan {
    /// The task.
    pub task: String,
    /// The branch that would move.
    pub branch: String,
    /// The parent checkpoint.
    pub parent: Option<CheckpointId>,
    /// The training key.
    pub training_key: String,
    /// The checkpoint with that key, which would be reused (nothing trained).
    pub reuse: Option<CheckpointId>,
    /// `coin` (its own engine) or `external` (the `[trainer]` command).
    pub engine: &'static str,
    /// The external command as it would run (paths under `.coin/tmp/external/`).
    pub command: Option<String>,
    /// Where it would run.
    pub workdir: Option<PathBuf>,
    /// The trainer code's git state.
    pub code: Option<Value>,
}

/// Plan `req` without training ([`TrainPlan`]), on `branch` (default: the current one; its
/// head is the parent unless `req.from` names one).
pub fn plan_train(
    repo: &CoinRepo,
    cfg: &RunConfig,
    req: &TrainRequest,
    branch: Option<&str>,
) -> Result<TrainPlan, WorkflowError> {
    let s = step_inputs(repo, cfg, req, branch)?;
    let (key, command, workdir, code) = if s.cfg.trainer.command.trim().is_empty() {
        let replay = replay_groups(repo, &s.cfg, s.parent, &s.def.name)?;
        let key = own_key(
            s.parent,
            &s.def,
            &s.data,
            &s.cfg,
            &s.rt,
            &replay,
            s.parent_cp.as_ref(),
        )?;
        (key, None, None, None)
    } else {
        let p = external::plan_step(&TrainerStep {
            repo,
            cfg: &s.cfg,
            def: &s.def,
            parent: s.parent_cp.as_ref(),
            train_file: &s.train_file,
            data: &s.data,
        })?;
        (p.key, Some(p.command), Some(p.workdir), Some(p.code))
    };
    let reuse = if req.retrain {
        None
    } else {
        find_by_key(repo, &key)?
    };
    Ok(TrainPlan {
        task: s.def.name,
        branch: s.branch,
        parent: s.parent,
        training_key: key,
        reuse,
        engine: if command.is_some() {
            "external"
        } else {
            "coin"
        },
        command,
        workdir,
        code,
    })
}

/// Train `req.task` on the current branch (see the module docs).
pub fn train_task(
    repo: &CoinRepo,
    cfg: &RunConfig,
    req: &TrainRequest,
    progress: &mut dyn TrainWorkflowProgress,
) -> Result<TrainOutcome, WorkflowError> {
    let StepInputs {
        cfg,
        rt,
        def,
        train_file,
        branch,
        head,
        parent,
        parent_cp,
        data,
        notes,
    } = step_inputs(repo, cfg, req, None)?;
    for n in &notes {
        progress.note(n);
    }
    let cfg = &cfg;
    let settings = adapter_settings(cfg)?;
    let root = repo.root().to_path_buf();
    if !cfg.trainer.command.trim().is_empty() {
        let step = TrainerStep {
            repo,
            cfg,
            def: &def,
            parent: parent_cp.as_ref(),
            train_file: &train_file,
            data: &data,
        };
        return train_external(&step, req, parent, &branch, head, progress);
    }
    let replay = replay_groups(repo, cfg, parent, &def.name)?;
    let key = own_key(parent, &def, &data, cfg, &rt, &replay, parent_cp.as_ref())?;
    if !req.retrain {
        if let Some(found) = find_by_key(repo, &key)? {
            return reuse(
                repo, cfg, req, &def.name, found, key, &branch, head, progress,
            );
        }
    }

    let records = read_train_file(&train_file)?;
    progress.note(&format!("Loading the base model ({}).", cfg.model.name));
    let mut loaded = load_base_model(&root, cfg)?;
    let work = repo.coin_dir().join("tmp").join("train").join(&key[..16]);
    std::fs::create_dir_all(&work).map_err(|e| io_err("create", &work, e))?;
    let mut parent_dir = None;
    let mut fresh_projector = false;
    let olora = cfg.train.strategy == super::config::Strategy::Olora;
    let mut olora_stack = None;
    let params = match &parent_cp {
        Some(cp) if olora && cp.manifest.files.contains_key("adapter_config.json") => {
            let dir = work.join("parent");
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| io_err("remove", &dir, e))?;
            }
            repo.checkout(cp.id, &dir)?;
            let parent_task = cp
                .train
                .as_ref()
                .map(|t| t.task.clone())
                .unwrap_or_else(|| cp.id.short());
            let (params, stack) =
                attach_olora(&mut loaded.model, &settings, Some((&dir, &parent_task)))?;
            progress.note(&format!(
                "O-LoRA: freezing the adapters of {} earlier task(s) of {} (rank {}) and \
                 training a new rank-{} adapter for {}.",
                stack.earlier.len(),
                cp.id.short(),
                stack.frozen_rank(),
                settings.r,
                def.name
            ));
            if cfg.train.projector_init == ProjectorInit::AsCoin {
                progress.note(
                    "Starting the projector afresh, as CoIN's code does after its first task.",
                );
                params.reinit_projector(&mut loaded.model, cfg.train.seed)?;
            }
            olora_stack = Some(stack);
            parent_dir = Some(dir);
            params
        }
        _ if olora => {
            let (params, stack) = attach_olora(&mut loaded.model, &settings, None)?;
            olora_stack = Some(stack);
            params
        }
        Some(cp) if cp.manifest.files.contains_key("adapter_config.json") => {
            let dir = work.join("parent");
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| io_err("remove", &dir, e))?;
            }
            repo.checkout(cp.id, &dir)?;
            progress.note(&format!("Continuing the adapter of {}.", cp.id.short()));
            let params = TrainableParams::attach_from(&mut loaded.model, &settings, &dir)?;
            parent_dir = Some(dir);
            // CoIN's later tasks: a new projector (its previous-task load matches no key),
            // set after the method has seen the parent's model (an `lwf` teacher is the
            // parent as it was, projector included).
            fresh_projector = cfg.train.projector_init == ProjectorInit::AsCoin;
            params
        }
        _ => TrainableParams::attach(&mut loaded.model, &settings)?,
    };
    let image_root = def.resolve(&root, &def.image_root);
    let (mut samples, prepared) = prepare_samples(
        &records,
        &image_root,
        &loaded.tokenizer,
        Labeling::for_model(&loaded.model.config),
        loaded.model.config.image_seq_len(),
        cfg.train.model_max_length,
    )?;
    let mut replayed = Vec::new();
    for g in &replay {
        let (more, stats) = prepare_samples(
            &g.records,
            &g.image_root,
            &loaded.tokenizer,
            Labeling::for_model(&loaded.model.config),
            loaded.model.config.image_seq_len(),
            cfg.train.model_max_length,
        )?;
        replayed.push(json!({
            "task": g.task, "blake3": g.data.blake3, "of": g.data.items,
            "items": g.indices.len(), "samples": more.len(), "indices": g.indices,
            "truncated": stats.truncated, "skipped": stats.skipped,
            "mismatched": stats.mismatched,
        }));
        samples.extend(more);
    }
    if !replay.is_empty() {
        let n: usize = replay.iter().map(|g| g.indices.len()).sum();
        progress.note(&format!(
            "Replaying {n} item(s) of {} earlier task(s) with {}'s {} (train.strategy = replay).",
            replay.len(),
            def.name,
            records.len()
        ));
    }
    if prepared.mismatched > 0 {
        progress.note(&format!(
            "Left out {} of {} records whose round lengths did not add up (LLaVA's \
             \"tokenization mismatch\": all their labels masked).",
            prepared.mismatched,
            records.len()
        ));
    }
    if samples.is_empty() {
        return Err(WorkflowError::Input(format!(
            "task '{}': no training sample has a supervised token within model_max_length {}",
            def.name, cfg.train.model_max_length
        )));
    }
    let lc = loop_config(cfg, &rt, &def.name, samples.len())?;
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
    let mut method = methods::prepare(
        &MethodContext {
            cfg,
            task: &def.name,
            parent_dir: parent_dir.as_deref(),
            loaded: &loaded,
            params: &params,
            samples: &samples,
            olora: olora_stack.as_ref(),
        },
        &mut |m: &str| progress.note(m),
    )?;
    if let Some(s) = method.summary() {
        progress.note(&s);
    }
    if fresh_projector {
        progress.note("Starting the projector afresh, as CoIN's code does after its first task.");
        params.reinit_projector(&mut loaded.model, cfg.train.seed)?;
    }
    let ctx = MethodContext {
        cfg,
        task: &def.name,
        parent_dir: parent_dir.as_deref(),
        loaded: &loaded,
        params: &params,
        samples: &samples,
        olora: olora_stack.as_ref(),
    };
    let report = train_with(
        &loaded.model,
        &params,
        &samples,
        &loaded.image,
        &lc,
        Some(&policy),
        progress.trainer(),
        method.regularizer(),
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
    let method_record = method.finish(&ctx, &out, &mut |m: &str| progress.note(m))?;

    let mut extra: BTreeMap<String, Value> = BTreeMap::new();
    extra.insert(TRAINING_KEY_FIELD.into(), Value::String(key.clone()));
    extra.insert("config".into(), cfg.to_record_value());
    extra.insert(
        "data".into(),
        json!({
            "file": def.train, "blake3": data.blake3, "items": data.items,
            "samples": prepared.samples, "truncated": prepared.truncated,
            "skipped": prepared.skipped, "mismatched": prepared.mismatched,
        }),
    );
    if !replayed.is_empty() {
        extra.insert("replay".into(), Value::Array(replayed));
    }
    if !method_record.is_null() {
        extra.insert("method".into(), method_record);
    }
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
    if let (Some(a), Some(b)) = first_last(&report.penalties, 10) {
        if let Some(r) = extra.get_mut("result").and_then(Value::as_object_mut) {
            r.insert("penalty_first10".into(), json!(a));
            r.insert("penalty_last10".into(), json!(b));
        }
    }
    // Written but not yet on the branch: the evals come first, so that the pre-checkpoint gate
    // (e.g. the forgetting gate) sees the new scores.
    let outcome = repo.commit(&step_request(
        cfg,
        req,
        &def.name,
        vec![out.clone()],
        parent,
        extra,
    ))?;
    progress.note(&format!(
        "Wrote checkpoint {} ({} after {} steps, loss {first:.3} → {last:.3}).",
        outcome.id.short(),
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
    publish(
        repo, req, &def.name, outcome.id, parent, &branch, head, progress,
    )?;
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

/// The mean of the first and of the last `k` values (`None` for none): the method's extra
/// objective term as the train record shows it.
fn first_last(v: &[f64], k: usize) -> (Option<f64>, Option<f64>) {
    if v.is_empty() {
        return (None, None);
    }
    let k = k.clamp(1, v.len());
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (Some(mean(&v[..k])), Some(mean(&v[v.len() - k..])))
}

/// The commit of a trained step: detached (the evals and the gate come before the branch
/// moves), on the configured base model.
fn step_request(
    cfg: &RunConfig,
    req: &TrainRequest,
    task: &str,
    paths: Vec<PathBuf>,
    parent: Option<CheckpointId>,
    train_extra: BTreeMap<String, Value>,
) -> CommitRequest {
    CommitRequest {
        paths,
        task: task.to_string(),
        message: req.message.clone(),
        evals: BTreeMap::new(),
        parent,
        base_model: Some(BaseModel {
            name: cfg.model.name.clone(),
            manifest: None,
        }),
        train_extra,
        skip_hooks: req.skip_hooks,
        detached: true,
    }
}

/// Make an existing checkpoint with the same training key the branch head (after the same
/// gate a new one passes) and evaluate it.
#[allow(clippy::too_many_arguments)]
fn reuse(
    repo: &CoinRepo,
    cfg: &RunConfig,
    req: &TrainRequest,
    task: &str,
    found: CheckpointId,
    key: String,
    branch: &str,
    head: Option<CheckpointId>,
    progress: &mut dyn TrainWorkflowProgress,
) -> Result<TrainOutcome, WorkflowError> {
    progress.note(&format!(
        "Reusing checkpoint {} (same parent, data, template and settings: training key {}).",
        found.short(),
        &key[..12]
    ));
    // A reused checkpoint passes the same gate as a new one (it may be one the gate vetoed
    // before: its eval notes keep it known to the repository).
    if head != Some(found) {
        if let Some(g) = repo.publish_checkpoint(branch, head, found, req.skip_hooks)? {
            let text = g.output();
            if !text.is_empty() {
                progress.note(&text);
            }
        }
    }
    let evals = run_evals(repo, found, cfg, req, task, None, progress)?;
    Ok(TrainOutcome {
        checkpoint: found,
        reused: true,
        key,
        report: None,
        prepared: None,
        evals,
        branch: branch.to_string(),
    })
}

/// Move the branch to the new checkpoint `id` through the `pre-checkpoint` gate, then run
/// the `post-train` event hook.
#[allow(clippy::too_many_arguments)]
fn publish(
    repo: &CoinRepo,
    req: &TrainRequest,
    task: &str,
    id: CheckpointId,
    parent: Option<CheckpointId>,
    branch: &str,
    head: Option<CheckpointId>,
    progress: &mut dyn TrainWorkflowProgress,
) -> Result<(), WorkflowError> {
    let gate = repo.publish_checkpoint(branch, head, id, req.skip_hooks)?;
    if let Some(g) = gate {
        let text = g.output();
        if !text.is_empty() {
            progress.note(&text);
        }
    }
    progress.note(&format!("{} is now the head of {branch}.", id.short()));
    let ctx = HookContext {
        checkpoint: Some(id),
        parent,
        branch: Some(branch.to_string()),
        task: Some(task.to_string()),
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
    Ok(())
}

/// A step trained by the `[trainer]` command (docs/external.md): plan and key, reuse, run,
/// commit the output with the log, evaluate, publish.
fn train_external(
    step: &TrainerStep<'_>,
    req: &TrainRequest,
    parent: Option<CheckpointId>,
    branch: &str,
    head: Option<CheckpointId>,
    progress: &mut dyn TrainWorkflowProgress,
) -> Result<TrainOutcome, WorkflowError> {
    let (repo, cfg, def) = (step.repo, step.cfg, step.def);
    let planned = external::plan_step(step)?;
    let key = planned.key.clone();
    if !req.retrain {
        if let Some(found) = find_by_key(repo, &key)? {
            return reuse(
                repo, cfg, req, &def.name, found, key, branch, head, progress,
            );
        }
    }
    if let Some(state) = planned.code.as_object() {
        if state.get("dirty") == Some(&Value::Bool(true)) {
            progress.note(&format!(
                "The trainer's code in '{}' has uncommitted changes; they are recorded (and \
                 keyed) as a hash.",
                state
                    .get("repository")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            ));
        }
    }
    // Held until the step is committed and published (or fails).
    let _lock = external::lock_work(&planned.work)?;
    let trained = external::run_step(step, &planned, progress.command())?;
    for n in &trained.notes {
        progress.note(n);
    }
    let mut extra: BTreeMap<String, Value> = BTreeMap::new();
    extra.insert(TRAINING_KEY_FIELD.into(), Value::String(key.clone()));
    extra.insert("config".into(), cfg.to_record_value());
    extra.insert(
        "data".into(),
        json!({ "file": def.train, "blake3": step.data.blake3, "items": step.data.items }),
    );
    extra.insert(EXTERNAL_FIELD.into(), trained.record.clone());
    let mut attachments = BTreeMap::new();
    attachments.insert(crate::history::LOG_ATTACHMENT.to_string(), trained.log);
    let outcome = repo.commit_attached(
        &step_request(cfg, req, &def.name, trained.files, parent, extra),
        &attachments,
    )?;
    progress.note(&format!(
        "Wrote checkpoint {} ({} by the external trainer in {:.1} s).",
        outcome.id.short(),
        def.name,
        trained.record["seconds"].as_f64().unwrap_or_default()
    ));
    let evals = run_evals(repo, outcome.id, cfg, req, &def.name, None, progress)?;
    publish(
        repo, req, &def.name, outcome.id, parent, branch, head, progress,
    )?;
    // The output is in the store and the log in the checkpoint now.
    let _ = std::fs::remove_dir_all(&planned.work);
    Ok(TrainOutcome {
        checkpoint: outcome.id,
        reused: false,
        key,
        report: None,
        prepared: None,
        evals,
        branch: branch.to_string(),
    })
}

fn run_evals(
    repo: &CoinRepo,
    id: CheckpointId,
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
    if !cfg.evaluator.command.trim().is_empty() {
        return external::evaluate_external(repo, id, &tasks, cfg, false, progress.command());
    }
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
        if e.kind() == std::io::ErrorKind::NotFound {
            WorkflowError::Input(format!(
                "no task order '{name_or_file}' ('{}' does not exist); orders live in \
                 .coin/orders/ or pass --order A,B,C",
                path.display()
            ))
        } else {
            io_err("read the task order", &path, e)
        }
    })?;
    #[derive(serde::Deserialize)]
    struct Order {
        tasks: Vec<String>,
    }
    let o: Order = toml::from_str(&text).map_err(|e| {
        WorkflowError::Input(format!("'{}' is not a task order: {e}", path.display()))
    })?;
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
) -> Result<CheckpointId, WorkflowError> {
    use super::matrix::{KIND_BASE, KIND_FIELD};
    let cfg = &cfg.with_runtime(cfg.resolved_runtime()?);
    let mut extra = BTreeMap::new();
    extra.insert(KIND_FIELD.to_string(), json!(KIND_BASE));
    extra.insert("config".to_string(), cfg.to_record_value());
    let tmp = tempfile::tempdir().map_err(WorkflowError::io(
        "create a temporary folder in",
        std::env::temp_dir(),
    ))?;
    let note = tmp.path().join("zero-shot.json");
    let mut body = serde_json::Map::new();
    body.insert("kind".into(), json!(KIND_BASE));
    body.insert("base_model".into(), json!(cfg.model.name));
    body.insert(
        "about".into(),
        json!("the zero-shot row: the base model evaluated before any task"),
    );
    body.extend(about);
    let text = serde_json::to_string_pretty(&Value::Object(body)).map_err(|source| {
        WorkflowError::Encode {
            what: "the zero-shot file",
            source,
        }
    })?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::ml::runtime::{Checkpointing, DeviceKind, Dtype, Kernels};
    use crate::tasks::mini;
    use crate::workflow::config::{resolve, Layer};
    use crate::workflow::matrix::tests::Fixture;

    struct Quiet {
        trainer: crate::ml::train::trainer::NoProgress,
        evals: super::super::eval::NoProgress,
        command: external::NoCommandProgress,
    }

    impl TrainWorkflowProgress for Quiet {
        fn note(&mut self, _message: &str) {}
        fn trainer(&mut self) -> &mut dyn TrainProgress {
            &mut self.trainer
        }
        fn evals(&mut self) -> &mut dyn EvalProgress {
            &mut self.evals
        }
        fn command(&mut self) -> &mut dyn CommandProgress {
            &mut self.command
        }
    }

    /// A repository with the tiny model and CoIN-mini (8 train / 2 test items per task).
    fn setup() -> Fixture {
        let f = Fixture::new();
        let root = f.dir.path().to_path_buf();
        crate::ml::tiny::write_tiny(&root.join("model"), &Default::default()).expect("tiny");
        let data = mini::MiniConfig {
            seed: 0,
            train: 8,
            test: 2,
            image_size: 32,
        };
        mini::generate(&root.join("mini"), &data, |_| {}).expect("mini");
        let mut reg = Registry::load(&f.repo.coin_dir().join("tasks")).expect("registry");
        for def in mini::task_defs("mini") {
            reg.add(def, true).expect("add");
        }
        f
    }

    fn config(sets: &[&str]) -> RunConfig {
        let layers: Vec<Layer> = [
            "model.base=model",
            "train.num_train_epochs=1",
            "train.per_device_batch_size=4",
            "eval.max_new_tokens=2",
            "runtime.device=cpu",
            "runtime.threads=2",
        ]
        .iter()
        .chain(sets)
        .map(|s| Layer::from_set(s).expect("set"))
        .collect();
        resolve(&layers, Some("tiny")).expect("config")
    }

    fn train(
        f: &Fixture,
        cfg: &RunConfig,
        from: Option<CheckpointId>,
        eval: EvalTasks,
    ) -> TrainOutcome {
        let req = TrainRequest {
            task: "mini-VizWiz".into(),
            from,
            eval_tasks: eval,
            message: None,
            retrain: false,
            skip_hooks: true,
        };
        let mut quiet = Quiet {
            trainer: crate::ml::train::trainer::NoProgress,
            evals: super::super::eval::NoProgress,
            command: external::NoCommandProgress,
        };
        train_task(&f.repo, cfg, &req, &mut quiet).expect("train")
    }

    #[test]
    fn as_coin_starts_later_tasks_from_a_fresh_projector_and_continue_carries_it() {
        let mut f = setup();
        let base = Some(f.commit("zero-shot", true, &[]));
        // The projector's rate is so small that its values stay those it started from.
        let sets = ["train.mm_projector_lr=1e-30"];
        let projector = |o: &TrainOutcome| {
            let cp = f.repo.read_checkpoint(o.checkpoint).expect("read");
            cp.manifest.files["non_lora_trainables.safetensors"].clone()
        };
        let cont = config(&sets);
        let coin = config(&[sets[0], "train.projector_init=as-coin"]);
        // A first task starts from the base model's projector either way.
        let first = train(&f, &cont, base, EvalTasks::None);
        let first_coin = train(&f, &coin, base, EvalTasks::None);
        assert_ne!(first.key, first_coin.key, "the setting is keyed");
        assert_eq!(projector(&first), projector(&first_coin));
        // A later task: `continue` carries the parent's projector, `as-coin` does not.
        let next = train(&f, &cont, Some(first.checkpoint), EvalTasks::None);
        assert_eq!(projector(&next), projector(&first));
        let next_coin = train(&f, &coin, Some(first.checkpoint), EvalTasks::None);
        assert_ne!(projector(&next_coin), projector(&first));
        // The fresh projector is torch's nn.Linear init: |w| ≤ 1/√fan_in.
        let dir = f.dir.path().join("next-coin");
        f.repo
            .checkout(next_coin.checkpoint, &dir)
            .expect("checkout");
        let saved = crate::ml::peft::PeftAdapter::load(
            &dir,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .expect("load");
        let tensors = saved.projector.expect("a projector").tensors;
        let (_, w1) = tensors
            .iter()
            .find(|(n, _)| n.ends_with("linear_1.weight"))
            .expect("linear_1");
        let fan_in = w1.dims2().expect("2-D").1 as f32;
        let max = w1
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max");
        assert!(max > 0.0 && max <= 1.0 / fan_in.sqrt() + 1e-6, "{max}");
    }

    #[test]
    fn replayed_items_are_chosen_by_seed_in_file_order() {
        let a = replay_indices(0, "mini-GQA", 50, 10);
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&i| i < 50));
        assert_eq!(a, replay_indices(0, "mini-GQA", 50, 10), "deterministic");
        assert_ne!(a, replay_indices(1, "mini-GQA", 50, 10), "seeded");
        assert_ne!(a, replay_indices(0, "mini-VizWiz", 50, 10), "per task");
        // More than there are: all of them; a prefix of a larger choice.
        assert_eq!(replay_indices(0, "t", 5, 9), vec![0, 1, 2, 3, 4]);
        let five = replay_indices(3, "t", 100, 5);
        let ten = replay_indices(3, "t", 100, 10);
        assert!(five.iter().all(|i| ten.contains(i)));
    }

    #[test]
    fn the_runtime_is_keyed_and_recorded() {
        let mut f = setup();
        // Every run starts from the same parent (the branch head moves with each new one).
        let base = Some(f.commit("zero-shot", true, &[]));
        let two = config(&["runtime.shards=2", "runtime.kernels=on"]);
        let first = train(&f, &two, base, EvalTasks::Seen);
        assert!(!first.reused);

        // The resolved runtime is in the train record (as the configuration's [runtime]) and
        // in the eval record.
        let cp = f.repo.read_checkpoint(first.checkpoint).expect("read");
        let record = cp.train.as_ref().expect("train record");
        let stored = RunConfig::from_record_value(&record.extra["config"]).expect("config");
        let want = Runtime {
            threads: 2,
            elementwise_threads: 1,
            shards: 2,
            kernels: Kernels::On,
            device: DeviceKind::Cpu,
            dtype: Dtype::F32,
            checkpointing: Checkpointing::Auto,
        };
        assert_eq!(stored.runtime, want.into(), "every value resolved");
        let eval = &first.evals[0].record;
        assert_eq!(eval.extra["runtime"], serde_json::json!(want));

        // The same settings (threads are not keyed) reuse the checkpoint …
        let same = config(&[
            "runtime.shards=2",
            "runtime.kernels=on",
            "runtime.threads=1",
        ]);
        let again = train(&f, &same, base, EvalTasks::None);
        assert!(again.reused);
        assert_eq!(again.checkpoint, first.checkpoint);
        assert_eq!(again.key, first.key);

        // … other shards or other kernels do not.
        let one = train(
            &f,
            &config(&["runtime.shards=1", "runtime.kernels=on"]),
            base,
            EvalTasks::None,
        );
        assert!(!one.reused);
        assert_ne!(one.key, first.key);
        let off = train(
            &f,
            &config(&["runtime.shards=2", "runtime.kernels=off"]),
            base,
            EvalTasks::None,
        );
        assert!(!off.reused);
        assert_ne!(off.key, first.key);
        assert_ne!(off.key, one.key);
        // Shards change the trained numbers by rounding: the losses show it.
        let loss = |o: &TrainOutcome| o.report.as_ref().expect("trained").losses.clone();
        assert_ne!(loss(&one), loss(&first));
    }
}
