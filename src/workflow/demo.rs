//! `coin demo`: the whole continual instruction-tuning loop on a laptop CPU, with nothing to
//! download. In a folder it creates a coin repository, generates CoIN-mini and a tiny random
//! LLaVA, "pre-trains" the tiny base on caption data (full-parameter, so that the base knows
//! the image/text format; [`crate::tasks::mini::pretrain`]), commits the base as the zero-shot
//! row, trains CoIN's order over the eight mini tasks with LoRA (or MoELoRA) through the
//! ordinary [`super::train::train_task`], and computes the matrix, the metrics, an SVG plot
//! and the facts the demo exists to show: every task is learnt (its accuracy right after
//! training is far above chance), the model reads the picture (the same checkpoint on the same
//! questions with blank pictures stays near chance: [`blind_score`]) and plain LoRA forgets
//! (BWT clearly negative).
//!
//! Every stage is cached in the folder, so a demo that was interrupted continues with the
//! same command, and another `--method` reuses the data, the base model and the repository
//! (it runs on its own branch, named after the method). Library code: nothing is printed;
//! the CLI (`src/cli/commands/demo.rs`) shows progress through [`DemoProgress`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::config::{resolve, Layer, LayerSource, RunConfig};
use super::eval::{
    find_task, load_base_model, load_checkpoint_adapter, trained_tasks, CheckpointAdapter,
};
use super::matrix::{build_matrix, BranchMatrix};
use super::train::{commit_zero_shot, train_task, EvalTasks, TrainRequest, TrainWorkflowProgress};
use super::WorkflowError;
use crate::history::{CoinRepo, InitOptions};
use crate::metrics::{ForgettingMode, Metrics};
use crate::ml::generate::{generate, GenerateRequest, GenerateSettings};
use crate::ml::image::{AspectMode, Rgb8};
use crate::ml::llava::{load_model, LoadedModel, ModelSource};
use crate::ml::runtime::Runtime;
use crate::ml::tiny::{write_tiny, TinyOptions};
use crate::ml::train::data::{prepare_samples, Labeling};
use crate::ml::train::full::{save_full_model, FullScope};
use crate::ml::train::optim::Schedule;
use crate::ml::train::params::TrainableParams;
use crate::ml::train::trainer::{train, CheckpointPolicy, TrainConfig as LoopConfig, TrainReport};
use crate::store::fsutil::write_atomic;
use crate::tasks::formats::{self, read_train_file, AnswerRecord, TestRecord};
use crate::tasks::mini::{self, pretrain, MiniConfig};
use crate::tasks::registry::{self, Registry, TaskDef};
use crate::tasks::{ScoreMode, ScoreReport};

/// The marker file of a demo folder (its presence lets a later `coin demo` resume there).
pub const MARKER: &str = "demo.json";
/// Where the tiny random model goes, relative to the folder.
pub const RANDOM_MODEL: &str = "models/tiny-random";
/// Where the pre-trained base goes, relative to the folder.
pub const BASE_MODEL: &str = "models/coin-mini-base";
/// The name of the pre-trained base (`model.name`).
pub const BASE_NAME: &str = "coin-mini-base";
/// The CoIN-mini data, relative to the folder.
pub const DATA_DIR: &str = "data/coin-mini";
/// The caption data for pre-training, relative to the folder.
pub const CAPTIONS_DIR: &str = "data/captions";
/// The file in the base model's folder that records its pre-training (and marks it done).
pub const PRETRAIN_RECORD: &str = "pretrain.json";
/// "Far above chance": every task's accuracy right after training must beat its chance level
/// by at least this many points.
pub const LEARN_MARGIN: f64 = 20.0;
/// The demo's methods, each on the branch of its name: LoRA, MoELoRA, LoRA with replay, LoRA
/// with EWC, LoRA with Learning without Forgetting, O-LoRA.
pub const DEMO_METHODS: &[&str] = &["lora", "moelora", REPLAY, EWC, LWF, OLORA];

/// The method name of LoRA with Learning without Forgetting (`train.strategy = lwf`).
pub const LWF: &str = "lwf";

/// The distillation weight λ of `--method lwf`: the paper's; on CoIN-mini a larger λ lowers BWT
/// mostly by no longer learning the new tasks (docs/methods.md).
pub const LWF_LAMBDA: f64 = 1.0;

/// The method name of LoRA with replay (`train.strategy = replay`).
pub const REPLAY: &str = "replay";

/// The method name of O-LoRA (`train.strategy = olora`, its default λ1 and λ2).
pub const OLORA: &str = "olora";

/// Items replayed per earlier task by `--method replay`: on CoIN-mini it cuts plain LoRA's
/// forgetting to about a quarter at 1.2× its wall time (docs/methods.md).
pub const REPLAY_ITEMS: usize = 20;

/// The method name of LoRA with Elastic Weight Consolidation (`train.strategy = ewc`).
pub const EWC: &str = "ewc";

/// `train.ewc_lambda` of `--method ewc`: the default, measured on CoIN-mini (docs/methods.md).
pub const EWC_LAMBDA: f64 = super::config::DEFAULT_EWC_LAMBDA;

/// "Forgets measurably": BWT must be at most this (points).
pub const FORGET_BWT: f64 = -5.0;
/// "Reads the picture": with blank pictures, every task's score on the checkpoint that trained
/// it must be at most this many points above its chance level.
pub const BLIND_MARGIN: f64 = 10.0;
/// The colour of the blind baseline's blank pictures: CoIN-mini's light-grey background
/// (225–249) with nothing drawn on it.
pub const BLIND_FILL: [u8; 3] = [237, 237, 237];

/// What the demo does and how large it is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DemoSettings {
    /// The smaller run of the tests (checks the mechanics, not the science).
    pub quick: bool,
    /// Seed of the CoIN-mini data.
    pub mini_seed: u64,
    /// Training items per task.
    pub mini_train: usize,
    /// Test items per task.
    pub mini_test: usize,
    /// Caption items for pre-training.
    pub captions: usize,
    /// Seed of the caption data (distinct from the task data's).
    pub captions_seed: u64,
    /// Share of the caption items asked as multiple choice (`pretrain::choice_prompt`).
    pub captions_choice: f64,
    /// Share of the caption items asked as a short question (`pretrain::Caption::questions`).
    pub captions_questions: f64,
    /// Whether pre-training trains the (random) vision tower too.
    pub pretrain_vision: bool,
    /// The tiny tokenizer's vocabulary size (byte alphabet + specials + merges).
    pub vocab_size: usize,
    /// Full-parameter pre-training: optimiser steps.
    pub pretrain_steps: usize,
    /// Pre-training batch size.
    pub pretrain_batch: usize,
    /// Pre-training peak learning rate (cosine, 5 % warmup).
    pub pretrain_lr: f64,
    /// The `.coin/config.toml` of the demo repository (the `tiny` preset plus these values).
    pub config_toml: String,
}

impl DemoSettings {
    /// The settings of `coin demo` (`quick`: of `coin demo --quick`).
    pub fn new(quick: bool) -> DemoSettings {
        if quick {
            DemoSettings {
                quick,
                mini_seed: 0,
                mini_train: 16,
                mini_test: 6,
                captions: 48,
                captions_seed: 1,
                captions_choice: 0.3,
                captions_questions: 0.3,
                pretrain_vision: true,
                vocab_size: 1024,
                pretrain_steps: 6,
                pretrain_batch: 8,
                pretrain_lr: 3e-3,
                config_toml: config_toml(8, 1.0, 3e-3, 8),
            }
        } else {
            DemoSettings {
                quick,
                mini_seed: 0,
                mini_train: 400,
                mini_test: 40,
                captions: 2000,
                captions_seed: 1,
                captions_choice: 0.3,
                captions_questions: 0.3,
                pretrain_vision: true,
                vocab_size: 1024,
                pretrain_steps: 250,
                pretrain_batch: 16,
                pretrain_lr: 3e-3,
                config_toml: config_toml(8, 8.0, 3e-3, 24),
            }
        }
    }
}

/// The demo repository's configuration: the `tiny` preset on the pre-trained base, LoRA r
/// `r` (α = 2r), `epochs` over each task's data in batches of 8 at `lr` (projector too),
/// `max_new_tokens` for the answers, and a fixed runtime so that the demo computes the same
/// numbers on any machine and in any build: the CPU in f32 with every fused kernel, two
/// threads, candle's element-wise pool off (its workers spin at a barrier between the tiny
/// model's small ops) and two training shards (the shard count fixes the gradients' summation
/// order; two threads on a 1-core machine only cost time). docs/demo.md.
fn config_toml(r: usize, epochs: f64, lr: f64, max_new_tokens: usize) -> String {
    format!(
        "# Written by `coin demo`: the tiny pre-trained base and the demo's training settings.\n\
         # Values here override the `tiny` preset (docs/config.md); edit and `coin train` freely.\n\
         \n\
         [model]\n\
         preset = \"tiny\"\n\
         name = \"{BASE_NAME}\"\n\
         base = \"{BASE_MODEL}\"\n\
         \n\
         [train]\n\
         lora_r = {r}\n\
         lora_alpha = {alpha:?}\n\
         lora_dropout = 0.0\n\
         learning_rate = {lr:e}\n\
         mm_projector_lr = {lr:e}\n\
         num_train_epochs = {epochs:?}\n\
         per_device_batch_size = 8\n\
         warmup_ratio = 0.05\n\
         \n\
         [eval]\n\
         max_new_tokens = {max_new_tokens}\n\
         mode = \"strict\"\n\
         \n\
         [runtime]\n\
         device = \"cpu\"\n\
         dtype = \"f32\"\n\
         kernels = \"on\"\n\
         threads = 2\n\
         elementwise_threads = 1\n\
         shards = 2\n",
        alpha = 2.0 * r as f64,
    )
}

/// Progress of the demo (the CLI shows it).
pub trait DemoProgress {
    /// A sentence about what happens next.
    fn note(&mut self, message: &str);
    /// A training stage starts (`label`: the pre-training or a task): the sink for its steps,
    /// notes and evals.
    fn stage(&mut self, label: &str) -> &mut dyn TrainWorkflowProgress;
}

/// One task's accuracy right after training it, against its chance level.
#[derive(Clone, Debug, Serialize)]
pub struct TaskFact {
    /// The task.
    pub task: String,
    /// Its score (0–100) on the checkpoint that trained it (the matrix diagonal).
    pub after_training: Option<f64>,
    /// Its score at the end of the order (the final row).
    pub final_score: Option<f64>,
    /// Chance level in points (best image-blind answer).
    pub chance: f64,
    /// `after_training − chance`.
    pub margin: Option<f64>,
    /// Its score on the same checkpoint and test items with blank pictures ([`blind_score`];
    /// `None`: not measured).
    pub blind: Option<f64>,
}

/// The facts the demo shows, computed from the matrix (and the blind baseline).
#[derive(Clone, Debug, Serialize)]
pub struct DemoFacts {
    /// Per task, in order.
    pub tasks: Vec<TaskFact>,
    /// The smallest margin over chance (`None` when a cell is missing).
    pub min_margin: Option<f64>,
    /// Backward transfer (points; negative = forgetting).
    pub bwt: Option<f64>,
    /// Every task's margin is at least [`LEARN_MARGIN`].
    pub learned: bool,
    /// BWT is at most [`FORGET_BWT`].
    pub forgets: bool,
    /// Every task's blind score is at most its chance level + [`BLIND_MARGIN`] (false until
    /// [`DemoFacts::with_blind`] gives every one).
    pub blind_near_chance: bool,
}

impl DemoFacts {
    /// Compute the facts of a matrix whose columns are CoIN-mini tasks.
    pub fn of(bm: &BranchMatrix, metrics: &Metrics) -> DemoFacts {
        let m = &bm.matrix;
        let n = m.rows.len();
        let tasks: Vec<TaskFact> = m
            .tasks
            .iter()
            .enumerate()
            .map(|(j, t)| {
                let chance = 100.0 * mini::chance_level(t).unwrap_or(0.0);
                let after = m.get(j, j);
                TaskFact {
                    task: t.clone(),
                    after_training: after,
                    final_score: n.checked_sub(1).and_then(|last| m.get(last, j)),
                    chance,
                    margin: after.map(|a| a - chance),
                    blind: None,
                }
            })
            .collect();
        let min_margin = tasks
            .iter()
            .map(|t| t.margin)
            .collect::<Option<Vec<f64>>>()
            .and_then(|v| v.into_iter().reduce(f64::min));
        DemoFacts {
            learned: min_margin.is_some_and(|v| v >= LEARN_MARGIN),
            forgets: metrics.bwt.is_some_and(|b| b <= FORGET_BWT),
            min_margin,
            bwt: metrics.bwt,
            tasks,
            blind_near_chance: false,
        }
    }

    /// The facts with the blind baseline: `blind[j]` is task `j`'s blind score (in the order of
    /// [`DemoFacts::tasks`]); the model reads the pictures when every one is measured and at
    /// most chance + [`BLIND_MARGIN`].
    pub fn with_blind(mut self, blind: &[Option<f64>]) -> DemoFacts {
        for (t, b) in self.tasks.iter_mut().zip(blind) {
            t.blind = *b;
        }
        self.blind_near_chance = blind.len() == self.tasks.len()
            && self
                .tasks
                .iter()
                .all(|t| t.blind.is_some_and(|b| b <= t.chance + BLIND_MARGIN));
        self
    }

    /// Whether all three facts hold.
    pub fn holds(&self) -> bool {
        self.learned && self.forgets && self.blind_near_chance
    }
}

/// What the pre-training did (also `models/coin-mini-base/pretrain.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainRecord {
    /// Optimiser steps.
    pub steps: usize,
    /// Caption samples.
    pub samples: usize,
    /// Mean loss of the first and last 10 steps.
    pub loss_first10: f64,
    /// See `loss_first10`.
    pub loss_last10: f64,
    /// Wall seconds of the training loop.
    pub seconds: f64,
    /// Trainable scalars.
    pub trainable_parameters: usize,
    /// The loop's settings.
    pub config: LoopConfig,
}

/// Everything the demo produced.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// The demo folder (the coin repository's root).
    pub dir: PathBuf,
    /// The branch of this method.
    pub branch: String,
    /// The adapter kind.
    pub method: String,
    /// The order.
    pub order: Vec<String>,
    /// The matrix of the branch.
    pub matrix: BranchMatrix,
    /// Its metrics.
    pub metrics: Metrics,
    /// The three facts.
    pub facts: DemoFacts,
    /// The SVG plot.
    pub plot: PathBuf,
    /// The pre-training record.
    pub pretrain: PretrainRecord,
    /// Whether the pre-training ran now (false: the cached base was used).
    pub pretrained_now: bool,
    /// Wall seconds per stage, in order.
    pub stage_seconds: Vec<(String, f64)>,
    /// Wall seconds of the whole demo (this process).
    pub seconds: f64,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> WorkflowError {
    WorkflowError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), WorkflowError> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| io_err("create", p, e))?;
    }
    write_atomic(path, text).map_err(|e| io_err("write", path, e))
}

/// Check the folder: a new or empty one is used, a previous demo's folder (same `--quick`)
/// is resumed; anything else is refused.
fn check_dir(dir: &Path, settings: &DemoSettings) -> Result<bool, WorkflowError> {
    let marker = dir.join(MARKER);
    if marker.is_file() {
        let text = std::fs::read_to_string(&marker).map_err(|e| io_err("read", &marker, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            WorkflowError::Input(format!("'{}' is not valid JSON: {e}", marker.display()))
        })?;
        let saved: DemoSettings = serde_json::from_value(v["settings"].clone()).map_err(|e| {
            WorkflowError::Input(format!(
                "'{}' is not a coin demo marker: {e}",
                marker.display()
            ))
        })?;
        if saved != *settings {
            return Err(WorkflowError::Input(format!(
                "'{}' holds a demo made with other settings ({}); use another --dir (or the \
                 same --quick choice as before)",
                dir.display(),
                if saved.quick {
                    "--quick"
                } else {
                    "without --quick"
                }
            )));
        }
        return Ok(true);
    }
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(|e| io_err("read", dir, e))?;
        if entries.next().is_some() {
            return Err(WorkflowError::Input(format!(
                "'{}' exists and is not empty (and is not a previous coin demo); give a new \
                 folder with --dir",
                dir.display()
            )));
        }
    }
    Ok(false)
}

/// The CoIN order of the eight mini tasks.
pub fn demo_order() -> Vec<String> {
    mini::TASKS.iter().map(|t| t.name.to_string()).collect()
}

/// The configuration layers of a demo in `dir`: its `.coin/config.toml` (the text of
/// `settings`, which the demo writes there), the environment variables in `env` that feed the
/// configuration, `train.method`, then `sets`.
pub fn demo_layers(
    dir: &Path,
    method: &str,
    settings: &DemoSettings,
    sets: &[String],
    env: &[(String, String)],
) -> Result<Vec<Layer>, WorkflowError> {
    let mut layers = vec![Layer::from_toml(
        &settings.config_toml,
        LayerSource::RepoFile(dir.join(".coin").join("config.toml")),
    )?];
    layers.extend(Layer::from_env(env)?);
    if method == REPLAY {
        // LoRA with replay of REPLAY_ITEMS items per earlier task (docs/methods.md).
        for set in [
            "train.method=lora".to_string(),
            "train.strategy=replay".to_string(),
            format!("train.replay_items={REPLAY_ITEMS}"),
        ] {
            layers.push(Layer::from_set(&set)?);
        }
    } else if method == EWC {
        // LoRA with EWC at EWC_LAMBDA (docs/methods.md).
        for set in [
            "train.method=lora".to_string(),
            "train.strategy=ewc".to_string(),
            format!("train.ewc_lambda={EWC_LAMBDA:?}"),
        ] {
            layers.push(Layer::from_set(&set)?);
        }
    } else if method == LWF {
        // LoRA with LwF's distillation at λ = LWF_LAMBDA, T = 2 (docs/methods.md).
        for set in [
            "train.method=lora".to_string(),
            "train.strategy=lwf".to_string(),
            format!("train.lwf_lambda={LWF_LAMBDA:?}"),
        ] {
            layers.push(Layer::from_set(&set)?);
        }
    } else if method == OLORA {
        // A new LoRA per task, orthogonal to the earlier ones (docs/methods.md).
        for set in ["train.method=lora", "train.strategy=olora"] {
            layers.push(Layer::from_set(set)?);
        }
    } else {
        layers.push(Layer::from_set(&format!("train.method={method}"))?);
    }
    for s in sets {
        layers.push(Layer::from_set(s)?);
    }
    Ok(layers)
}

/// The resolved configuration of a demo (see [`demo_layers`]).
pub fn demo_config(
    dir: &Path,
    method: &str,
    settings: &DemoSettings,
    sets: &[String],
    env: &[(String, String)],
) -> Result<RunConfig, WorkflowError> {
    resolve(
        &demo_layers(dir, method, settings, sets, env)?,
        Some("tiny"),
    )
}

/// Run (or resume) the demo in `dir` with `method` (one of [`DEMO_METHODS`]); `sets` are
/// extra `key=value` settings over the demo's `.coin/config.toml` (tuning), `env` the
/// environment variables that feed the configuration ([`super::config::ENV_VARS`]).
pub fn run_demo(
    dir: &Path,
    method: &str,
    settings: &DemoSettings,
    sets: &[String],
    env: &[(String, String)],
    progress: &mut dyn DemoProgress,
) -> Result<DemoReport, WorkflowError> {
    let t0 = Instant::now();
    let mut stages: Vec<(String, f64)> = Vec::new();
    let mut lap = {
        let mut last = Instant::now();
        move |name: &str, stages: &mut Vec<(String, f64)>| {
            stages.push((name.to_string(), last.elapsed().as_secs_f64()));
            last = Instant::now();
        }
    };
    if !DEMO_METHODS.contains(&method) {
        return Err(WorkflowError::Config(format!(
            "--method '{method}' is not one of {}",
            DEMO_METHODS.join(", ")
        )));
    }
    // Every setting is checked before anything is written.
    let cfg = demo_config(dir, method, settings, sets, env)?;
    let rt = cfg.resolved_runtime()?;
    let resumed = check_dir(dir, settings)?;
    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    let dir = dir.canonicalize().map_err(|e| io_err("resolve", dir, e))?;
    if resumed {
        progress.note(&format!("Resuming the demo in '{}'.", dir.display()));
    }

    // 1. The repository.
    let repo = if dir.join(".coin").is_dir() {
        CoinRepo::open(&dir)?
    } else {
        progress.note(&format!(
            "Creating a coin repository in '{}'.",
            dir.display()
        ));
        CoinRepo::init_with(
            &dir,
            &InitOptions {
                template: None,
                git_hooks: true,
            },
        )?;
        CoinRepo::open(&dir)?
    };
    let marker = json!({
        "format": "coin.demo.v1",
        "about": "a coin demo folder: `coin demo --dir` here resumes it",
        "settings": settings,
    });
    write_file(
        &dir.join(MARKER),
        &(serde_json::to_string_pretty(&marker).map_err(|source| WorkflowError::Encode {
            what: "the demo marker",
            source,
        })? + "\n"),
    )?;

    // 2. CoIN-mini, registered.
    let data = dir.join(DATA_DIR);
    if !data.join(mini::MANIFEST).is_file() {
        progress.note(&format!(
            "Generating CoIN-mini: 8 tasks × {} train / {} test items.",
            settings.mini_train, settings.mini_test
        ));
        mini::generate(
            &data,
            &MiniConfig {
                seed: settings.mini_seed,
                train: settings.mini_train,
                test: settings.mini_test,
                image_size: 32,
            },
            |_| {},
        )?;
    }
    let mut reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    for def in mini::task_defs(DATA_DIR) {
        if reg.get(&def.name).is_none() {
            reg.add(def, false)?;
        }
    }
    let order = demo_order();
    write_file(
        &repo.coin_dir().join("orders").join("coin-mini.toml"),
        &format!(
            "# CoIN's order over the CoIN-mini tasks (written by `coin demo`).\nname = \
             \"coin-mini\"\ntasks = [{}]\n",
            order
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    lap("data", &mut stages);

    // 3. The tiny random model (tokenizer trained on the tasks' and the captions' words).
    let random = dir.join(RANDOM_MODEL);
    if !random.join("model.safetensors").is_file() {
        progress.note("Writing a tiny random LLaVA (width 64, 2 layers, 32-px vision tower).");
        write_tiny(
            &random,
            &TinyOptions {
                corpus: mini::coin_mini_corpus() + &pretrain::caption_corpus(),
                vocab_size: settings.vocab_size,
                ..TinyOptions::default()
            },
        )?;
    }

    // 4. Pre-training (cached: the base's pretrain.json marks it done).
    let base = dir.join(BASE_MODEL);
    let record_path = base.join(PRETRAIN_RECORD);
    let pretrained_now = !record_path.is_file();
    if pretrained_now {
        let captions = dir.join(CAPTIONS_DIR);
        if !captions.join("train.json").is_file() {
            progress.note(&format!(
                "Generating {} caption items for pre-training.",
                settings.captions
            ));
            pretrain::generate_captions(
                &captions,
                settings.captions_seed,
                settings.captions,
                32,
                pretrain::CaptionMix {
                    choice: settings.captions_choice,
                    questions: settings.captions_questions,
                },
            )?;
        }
        lap("model+captions", &mut stages);
        let record = pretrain_base(&dir, &random, &captions, &base, settings, &rt, progress)?;
        write_file(
            &record_path,
            &(serde_json::to_string_pretty(&record).map_err(|source| WorkflowError::Encode {
                what: "the pretraining record",
                source,
            })? + "\n"),
        )?;
        lap("pretrain", &mut stages);
    } else {
        progress.note(&format!("Using the pre-trained base in '{BASE_MODEL}'."));
    }
    let pre_text =
        std::fs::read_to_string(&record_path).map_err(|e| io_err("read", &record_path, e))?;
    let pre: PretrainRecord = serde_json::from_str(&pre_text).map_err(|e| {
        WorkflowError::Input(format!(
            "'{}' is not valid JSON: {e}",
            record_path.display()
        ))
    })?;

    // 5. The configuration (resolved above), the branch, the zero-shot row.
    write_file(&repo.coin_dir().join("config.toml"), &settings.config_toml)?;
    let branch = method.to_string();
    if repo.current_branch()? != branch {
        let exists = repo.branch_target(&branch)?.is_some();
        repo.switch(&branch, !exists)?;
    }
    let head = repo.branch_target(&branch)?;
    let done = match head {
        Some(h) => trained_tasks(&repo, h)?,
        None => Vec::new(),
    };
    if done.len() > order.len() || done.iter().zip(&order).any(|(a, b)| a != b) {
        return Err(WorkflowError::Input(format!(
            "branch {branch} has trained [{}], which is not a start of CoIN's order; use a new \
             --dir",
            done.join(", ")
        )));
    }
    if head.is_none() {
        progress.note("Zero-shot row: evaluating the pre-trained base on the eight tasks.");
        let mut about = BTreeMap::new();
        about.insert(
            "pretraining".to_string(),
            serde_json::to_value(&pre).map_err(|source| WorkflowError::Encode {
                what: "the pretraining record",
                source,
            })?,
        );
        let p = progress.stage("zero-shot");
        commit_zero_shot(&repo, &cfg, &order, about, p.evals())?;
        lap("zero-shot", &mut stages);
    }

    // 6. CoIN's order.
    for (k, task) in order.iter().enumerate() {
        if k < done.len() {
            continue;
        }
        progress.note(&format!(
            "Step {}/{}: {task} ({method}).",
            k + 1,
            order.len()
        ));
        let req = TrainRequest {
            task: task.clone(),
            from: None,
            eval_tasks: EvalTasks::Seen,
            message: Some(format!("demo step {} of {}: {task}", k + 1, order.len())),
            retrain: false,
            skip_hooks: false,
        };
        train_task(&repo, &cfg, &req, progress.stage(task))?;
        lap(task, &mut stages);
    }

    // 7. Matrix, metrics, plot, facts.
    let tip = repo
        .branch_target(&branch)?
        .ok_or_else(|| WorkflowError::Input(format!("branch {branch} has no checkpoint")))?;
    let bm = build_matrix(&repo, tip)?;
    let metrics = bm.metrics(ForgettingMode::MaxEarlier)?;
    let plot = dir.join(format!("matrix-{branch}.svg"));
    super::plot::plot_matrix(
        &bm,
        &format!("coin demo: CoIN-mini, {method}, tiny model"),
        &plot,
    )?;
    lap("matrix", &mut stages);
    progress.note("Blind baseline: each task's checkpoint on its test items with blank pictures.");
    let blind = blind_diagonal(&repo, &cfg, &bm)?;
    let facts = DemoFacts::of(&bm, &metrics).with_blind(&blind);
    lap("blind", &mut stages);
    Ok(DemoReport {
        dir: dir.clone(),
        branch,
        method: method.to_string(),
        order,
        matrix: bm,
        metrics,
        facts,
        plot,
        pretrain: pre,
        pretrained_now,
        stage_seconds: stages,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The blind baseline of the diagonal: for each task (column `j`), the checkpoint that trained
/// it (row `j`) scored on the task's test items with [`blank_like`] pictures. `None` where row
/// `j` did not train task `j`.
fn blind_diagonal(
    repo: &CoinRepo,
    cfg: &RunConfig,
    bm: &BranchMatrix,
) -> Result<Vec<Option<f64>>, WorkflowError> {
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let mut model = load_base_model(repo.root(), cfg)?;
    let mut out = Vec::with_capacity(bm.matrix.tasks.len());
    for (j, task) in bm.matrix.tasks.iter().enumerate() {
        let Some(row) = bm.checkpoints.get(j).filter(|r| &r.task == task) else {
            out.push(None);
            continue;
        };
        let def = find_task(&reg, task)?;
        let cp = repo.read_checkpoint(row.id)?;
        let adapter = load_checkpoint_adapter(repo, &cp, &model.model.device, model.model.dtype)?;
        let report = blind_score(repo.root(), def, cfg, &mut model, &adapter)?;
        out.push(Some(report.0.score));
    }
    Ok(out)
}

/// A blank picture of `image`'s size ([`BLIND_FILL`]).
pub fn blank_like(image: &Rgb8) -> Rgb8 {
    Rgb8::filled(image.width, image.height, BLIND_FILL)
}

/// The generation requests of `questions` as the eval builds them, with every picture replaced
/// by a blank one of the same size (a question without a picture stays text-only).
pub fn blind_requests(
    questions: &[TestRecord],
    image_root: &Path,
) -> Result<Vec<GenerateRequest>, WorkflowError> {
    questions
        .iter()
        .map(|q| match &q.image {
            Some(img) => {
                let path = formats::resolve_image(image_root, img)?;
                Ok(GenerateRequest::question(
                    &q.text,
                    blank_like(&Rgb8::open(&path)?),
                ))
            }
            None => Ok(GenerateRequest {
                prompt: crate::ml::template::vicuna_v1(&[(q.text.as_str(), None)]),
                image: None,
            }),
        })
        .collect()
}

/// Score task `def` (data under `root`) with `adapter` on `model`, as `coin eval` does (the
/// configured decoding, batch size, aspect and scoring mode), but with every test picture
/// replaced by a blank one of the same size: what the model answers without seeing anything.
/// Nothing is recorded; the model is left as it was given. Returns the report and the answers.
pub fn blind_score(
    root: &Path,
    def: &TaskDef,
    cfg: &RunConfig,
    model: &mut LoadedModel,
    adapter: &CheckpointAdapter,
) -> Result<(ScoreReport, Vec<AnswerRecord>), WorkflowError> {
    let questions = formats::read_test_file(&def.resolve(root, &def.test))?;
    let requests = blind_requests(&questions, &def.resolve(root, &def.image_root))?;
    let settings = GenerateSettings {
        max_new_tokens: cfg.eval.max_new_tokens,
        aspect: cfg.eval.aspect_for(&def.name),
        return_logits: false,
        ignore_eos: false,
    };
    let projector = (
        model.model.projector.linear_1.clone(),
        model.model.projector.linear_2.clone(),
    );
    adapter.attach(&mut model.model)?;
    let generated = (|| -> Result<Vec<String>, WorkflowError> {
        let mut texts = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(cfg.eval.batch_size.max(1)) {
            for o in generate(model, None, chunk, &settings)? {
                texts.push(o.text.trim().to_string());
            }
        }
        Ok(texts)
    })();
    model.model.clear_adapters();
    (
        model.model.projector.linear_1,
        model.model.projector.linear_2,
    ) = projector;
    let answers: Vec<AnswerRecord> = questions
        .iter()
        .zip(generated?)
        .map(|(q, text)| AnswerRecord {
            question_id: q.question_id.clone(),
            prompt: q.text.clone(),
            text: Some(text),
            answer_id: json!(format!("{}-{}-blind", def.name, q.question_id)),
            model_id: json!(cfg.model.name),
            metadata: json!({}),
        })
        .collect();
    let mode = match cfg.eval.mode {
        super::config::EvalMode::Compat => ScoreMode::Compat,
        super::config::EvalMode::Strict => ScoreMode::Strict,
        super::config::EvalMode::Auto => def.default_mode(),
    };
    let report = registry::score_task(def, root, &answers, Some(mode))?;
    Ok((report, answers))
}

/// Full-parameter training of the random model on the captions, saved as the base model.
fn pretrain_base(
    dir: &Path,
    random: &Path,
    captions: &Path,
    out: &Path,
    settings: &DemoSettings,
    rt: &Runtime,
    progress: &mut dyn DemoProgress,
) -> Result<PretrainRecord, WorkflowError> {
    let src = ModelSource::resolve(random, None, None)?;
    let mut loaded = load_model(&src, &rt.device()?, rt.dtype())?;
    let records = read_train_file(&captions.join("train.json"))?;
    let (samples, _) = prepare_samples(
        &records,
        captions,
        &loaded.tokenizer,
        Labeling::for_model(&loaded.model.config),
        loaded.model.config.image_seq_len(),
        256,
    )?;
    let scope = if settings.pretrain_vision {
        FullScope::WithVisionTower
    } else {
        FullScope::LanguageModel
    };
    let params = TrainableParams::attach_full(&mut loaded.model, settings.captions_seed, scope)?;
    let lc = LoopConfig {
        epochs: (settings.pretrain_steps * settings.pretrain_batch)
            .div_ceil(samples.len().max(1))
            .max(1),
        batch_size: settings.pretrain_batch,
        grad_accum: 1,
        learning_rate: settings.pretrain_lr,
        projector_lr: None,
        weight_decay: 0.0,
        warmup_ratio: 0.05,
        schedule: Schedule::Cosine,
        max_grad_norm: Some(1.0),
        seed: settings.captions_seed,
        image_aspect: AspectMode::Pad,
        max_steps: Some(settings.pretrain_steps),
        drop_partial_step: false,
        shards: rt.shards,
        kernels: Some(rt.kernels),
        checkpointing: rt.checkpointing,
    };
    progress.note(&format!(
        "Pre-training the tiny base on {} captions: {} full-parameter steps ({} parameters; the \
         vision tower {}).",
        samples.len(),
        settings.pretrain_steps,
        params.num_elements(),
        if settings.pretrain_vision {
            "is trained too"
        } else {
            "stays frozen"
        }
    ));
    let policy = CheckpointPolicy {
        dir: dir.join(".coin").join("tmp").join("pretrain"),
        every: (settings.pretrain_steps / 10).max(1),
    };
    let report: TrainReport = {
        let p = progress.stage("pre-training");
        train(
            &loaded.model,
            &params,
            &samples,
            &loaded.image,
            &lc,
            Some(&policy),
            p.trainer(),
        )?
    };
    if report.stopped_early {
        return Err(WorkflowError::Input(
            "pre-training stopped early; run the same command to resume".into(),
        ));
    }
    save_full_model(&params, random, out)?;
    let _ = std::fs::remove_dir_all(&policy.dir);
    let (first, last) = report.loss_drop(10).unwrap_or((f64::NAN, f64::NAN));
    progress.stage("pre-training").note(&format!(
        "Pre-trained in {:.0} s: loss {first:.3} → {last:.3}; saved as '{BASE_MODEL}'.",
        report.seconds
    ));
    Ok(PretrainRecord {
        steps: report.steps,
        samples: samples.len(),
        loss_first10: first,
        loss_last10: last,
        seconds: report.seconds,
        trainable_parameters: report.trainable_parameters,
        config: lc,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::metrics::AccuracyMatrix;
    use crate::workflow::matrix::MatrixRow;

    fn bm(rows: Vec<Vec<Option<f64>>>) -> BranchMatrix {
        let tasks: Vec<String> = demo_order().into_iter().take(rows.len()).collect();
        BranchMatrix {
            checkpoints: tasks
                .iter()
                .map(|t| MatrixRow {
                    id: git2::Oid::ZERO_SHA1.into(),
                    task: t.clone(),
                })
                .collect(),
            zero_shot: None,
            matrix: AccuracyMatrix {
                tasks,
                rows,
                zero_shot: None,
            },
        }
    }

    #[test]
    fn each_demo_method_resolves_to_its_strategy_and_settings() {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = DemoSettings::new(true);
        let cfg = |m: &str, sets: &[String]| {
            demo_config(dir.path(), m, &settings, sets, &[]).expect("config")
        };
        use crate::workflow::config::{Method, Strategy};
        let lora = cfg("lora", &[]);
        assert_eq!(lora.train.strategy, Strategy::Sequential);
        assert_eq!(cfg("moelora", &[]).train.method, Method::Moelora);
        let replay = cfg(REPLAY, &[]);
        assert_eq!(replay.train.strategy, Strategy::Replay);
        assert_eq!(replay.train.replay_items, REPLAY_ITEMS);
        let ewc = cfg(EWC, &[]);
        assert_eq!(ewc.train.method, Method::Lora);
        assert_eq!(ewc.train.strategy, Strategy::Ewc);
        assert_eq!(ewc.train.ewc_lambda, EWC_LAMBDA);
        // --set still wins (tuning).
        let tuned = cfg(EWC, &["train.ewc_lambda=7".to_string()]);
        assert_eq!(tuned.train.ewc_lambda, 7.0);
    }

    #[test]
    fn facts_compare_the_diagonal_with_chance_and_bwt_with_the_bar() {
        // ScienceQA (chance 25) then TextVQA (chance 12.5).
        let good = bm(vec![vec![Some(90.0), None], vec![Some(60.0), Some(80.0)]]);
        let f = DemoFacts::of(&good, &good.metrics(ForgettingMode::MaxEarlier).unwrap());
        assert_eq!(f.tasks[0].chance, 25.0);
        assert_eq!(f.tasks[1].chance, 12.5);
        assert_eq!(f.tasks[0].margin, Some(65.0));
        assert_eq!(f.tasks[0].final_score, Some(60.0));
        assert_eq!(f.min_margin, Some(65.0));
        assert_eq!(f.bwt, Some(-30.0));
        assert!(f.learned && f.forgets);
        // The third fact needs the blind baseline: without it, nothing holds.
        assert!(!f.blind_near_chance && !f.holds());
        assert_eq!(f.tasks[0].blind, None);
        // At most chance + 10 with blank pictures (25 + 10 and 12.5 − 12.5): reads the pictures.
        let seen = f.clone().with_blind(&[Some(35.0), Some(0.0)]);
        assert_eq!(seen.tasks[0].blind, Some(35.0));
        assert_eq!(seen.tasks[1].blind, Some(0.0));
        assert!(seen.blind_near_chance && seen.holds());
        // Just over the bar, or a blind score missing: it does not.
        let over = f.clone().with_blind(&[Some(35.0), Some(22.6)]);
        assert!(!over.blind_near_chance && !over.holds());
        let missing = f.clone().with_blind(&[Some(20.0), None]);
        assert!(!missing.blind_near_chance);
        let short = f.with_blind(&[Some(20.0)]);
        assert!(!short.blind_near_chance);

        // A task barely above chance; no forgetting.
        let weak = bm(vec![vec![Some(40.0), None], vec![Some(41.0), Some(80.0)]]);
        let f = DemoFacts::of(&weak, &weak.metrics(ForgettingMode::MaxEarlier).unwrap())
            .with_blind(&[Some(25.0), Some(12.5)]);
        assert_eq!(f.min_margin, Some(15.0));
        assert!(f.blind_near_chance);
        assert!(!f.learned && !f.forgets && !f.holds());

        // A missing diagonal cell is not "learnt".
        let gap = bm(vec![vec![None, None], vec![Some(50.0), Some(80.0)]]);
        let f = DemoFacts::of(&gap, &gap.metrics(ForgettingMode::MaxEarlier).unwrap());
        assert_eq!(f.min_margin, None);
        assert!(!f.learned);
    }

    #[test]
    fn blind_scoring_answers_blank_pictures_of_the_same_size_and_scores_them() {
        let t = tempfile::tempdir().expect("temp dir");
        let root = t.path();
        mini::generate(
            &root.join("data"),
            &MiniConfig {
                seed: 0,
                train: 2,
                test: 4,
                image_size: 40,
            },
            |_| {},
        )
        .expect("CoIN-mini");
        let defs = mini::task_defs("data");
        let def = defs
            .iter()
            .find(|d| d.name == "mini-ImageNet")
            .expect("mini-ImageNet");
        let questions = formats::read_test_file(&def.resolve(root, &def.test)).expect("test file");
        assert_eq!(questions.len(), 4);
        let image_root = def.resolve(root, &def.image_root);

        // Every picture is replaced by a blank one of its size; prompts are the eval's.
        let reqs = blind_requests(&questions, &image_root).expect("requests");
        for (q, r) in questions.iter().zip(&reqs) {
            let path = formats::resolve_image(&image_root, q.image.as_deref().expect("image"))
                .expect("path");
            let real = Rgb8::open(&path).expect("png");
            let blank = r.image.as_ref().expect("a picture");
            assert_eq!((blank.width, blank.height), (40, 40));
            assert_eq!((blank.width, blank.height), (real.width, real.height));
            assert!(blank.data.chunks(3).all(|p| p == BLIND_FILL));
            assert_ne!(blank.data, real.data, "the real picture has content");
            assert_eq!(r.prompt, GenerateRequest::question(&q.text, real).prompt);
        }

        // The blind answers are the model's answers to those blank pictures, and they are
        // scored as the eval scores them (strict for CoIN-mini).
        let model_dir = write_tiny(&root.join("m"), &TinyOptions::default()).expect("tiny");
        let mut model = load_model(
            &ModelSource::resolve(&model_dir, None, None).expect("source"),
            &Device::Cpu,
            DType::F32,
        )
        .expect("loads");
        let mut cfg = RunConfig::preset("tiny").expect("tiny preset");
        cfg.eval.max_new_tokens = 3;
        cfg.eval.batch_size = 3;
        cfg.model.name = "blind-test".into();
        let settings = GenerateSettings {
            max_new_tokens: 3,
            aspect: AspectMode::Pad,
            return_logits: true,
            ignore_eos: false,
        };
        let probe = GenerateRequest::question(
            &questions[0].text,
            Rgb8::open(
                &formats::resolve_image(&image_root, questions[0].image.as_deref().expect("i"))
                    .expect("path"),
            )
            .expect("png"),
        );
        let before =
            generate(&mut model, None, std::slice::from_ref(&probe), &settings).expect("generates");
        let (report, answers) =
            blind_score(root, def, &cfg, &mut model, &CheckpointAdapter::None).expect("blind");
        assert_eq!(answers.len(), 4);
        for (a, r) in answers.iter().zip(&reqs) {
            let direct =
                generate(&mut model, None, std::slice::from_ref(r), &settings).expect("one");
            assert_eq!(a.text.as_deref(), Some(direct[0].text.trim()));
        }
        assert_eq!(report.task, def.name);
        assert_eq!(report.n, 4);
        assert_eq!(report.mode, ScoreMode::Strict);
        let rescored =
            registry::score_task(def, root, &answers, Some(ScoreMode::Strict)).expect("scores");
        assert_eq!(
            report.score, rescored.score,
            "the returned answers are the scored ones"
        );
        // The model is left as it was given.
        let after =
            generate(&mut model, None, std::slice::from_ref(&probe), &settings).expect("generates");
        assert_eq!(before[0].first_step_logits, after[0].first_step_logits);
    }

    #[test]
    fn a_foreign_folder_is_refused_and_a_demo_folder_is_resumed_only_with_its_settings() {
        let d = tempfile::tempdir().expect("temp dir");
        let quick = DemoSettings::new(true);
        assert!(!check_dir(&d.path().join("new"), &quick).expect("a new folder is fine"));
        assert!(!check_dir(d.path(), &quick).expect("an empty folder is fine"));
        write_file(&d.path().join("x.txt"), "mine").expect("write");
        let e = check_dir(d.path(), &quick).expect_err("not empty");
        assert!(e.to_string().contains("not empty"), "{e}");
        let marker = json!({"format": "coin.demo.v1", "settings": quick});
        write_file(&d.path().join(MARKER), &marker.to_string()).expect("write");
        assert!(check_dir(d.path(), &quick).expect("same settings resume"));
        let e = check_dir(d.path(), &DemoSettings::new(false)).expect_err("other settings");
        assert!(e.to_string().contains("--quick"), "{e}");
    }
}
