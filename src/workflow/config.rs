//! The resolved run configuration ([`RunConfig`]): CoIN's hyperparameters as per-model presets,
//! overridden in order by `.coin/config.toml`, the environment ([`ENV_VARS`]), `--config
//! FILE.toml` and `--set key=value`.
//!
//! Every layer is merged as a TOML table onto the preset, key by key; a key that is not part of
//! the configuration is refused with the list of valid keys (a typo never silently drops a
//! setting), and a value that is not one of its key's spellings is refused naming the key.
//! Then serde parses the merged table once into typed values. The `[runtime]` section
//! ([`RuntimeConfig`]) holds the settings that change how (and, by float rounding, what) the
//! engine computes; [`RuntimeConfig::resolve`] turns its `auto` values into a concrete
//! [`Runtime`]. The `[gates]` table of the same file is parsed by
//! [`crate::history::hooks::GatesConfig`], here only to refuse a broken one early. The resolved
//! configuration is stored canonically in the train record ([`RunConfig::to_record_value`]).
//! Format and presets: docs/config.md.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::WorkflowError;
use crate::history::hooks::GatesConfig;
use crate::ml::image::AspectMode;
use crate::ml::runtime::{self, Checkpointing, DeviceKind, Dtype, Kernels, Machine, Runtime};
use crate::ml::train::optim::Schedule;

/// The preset used when no layer names one.
pub const DEFAULT_PRESET: &str = "llava-7b";

/// The names of the built-in presets.
pub const PRESETS: &[&str] = &["tiny", "llava-7b", "coin-paper"];

/// The top-level table of `.coin/config.toml` that is not a run setting: the hooks' gates
/// (docs/hooks.md), parsed by [`GatesConfig`].
pub const GATES_TABLE: &str = "gates";

/// Dotted keys whose value is a table with free keys (task names).
const MAP_KEYS: &[&str] = &[
    "train.batch_size_per_task",
    "eval.image_aspect_per_task",
    "eval.max_new_tokens_per_task",
    "eval.prompt_per_task",
];

/// Keys that were renamed: (old, new, what to write). An old key is refused with this advice.
const RENAMED_KEYS: &[(&str, &str, &str)] = &[(
    "model.dtype",
    "runtime.dtype",
    "auto | f32 | bf16 | f16; auto = bf16 on a GPU, f32 on the CPU",
)];

/// Environment variables that feed the configuration (a layer above `.coin/config.toml` and
/// below `--config`/`--set`), and the key each sets. The caller passes the environment in
/// ([`ConfigSources::env`]); the library reads none. `COIN_FUSED=0|1` is also accepted, as
/// `runtime.kernels` off/on, below `COIN_KERNELS`.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("COIN_THREADS", "runtime.threads"),
    ("COIN_ELEMENTWISE_THREADS", "runtime.elementwise_threads"),
    ("COIN_TRAIN_SHARDS", "runtime.shards"),
    ("COIN_KERNELS", "runtime.kernels"),
    ("COIN_DEVICE", "runtime.device"),
    ("COIN_DTYPE", "runtime.dtype"),
    ("COIN_CHECKPOINTING", "runtime.checkpointing"),
];

/// The older name of `COIN_KERNELS` (`0`: off, `1`: on).
const LEGACY_FUSED_VAR: &str = "COIN_FUSED";

/// The whole configuration of a training or eval run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Which base model.
    pub model: ModelConfig,
    /// Training hyperparameters (the trainer maps these to its own settings).
    pub train: TrainConfig,
    /// Generation and scoring settings of evals.
    pub eval: EvalConfig,
    /// How the engine runs: threads, shards, kernels, device, dtype.
    pub runtime: RuntimeConfig,
    /// An external training command (empty: coin's own engine trains).
    #[serde(default)]
    pub trainer: ExternalTrainer,
    /// An external eval command (empty: coin's own engine evaluates).
    #[serde(default)]
    pub evaluator: ExternalEvaluator,
}

/// How a checkpoint is laid out for an external command (`trainer.parent_format`,
/// `evaluator.checkpoint_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointLayout {
    /// The checkpoint's files as they were committed (what the trainer itself wrote).
    #[default]
    Stored,
    /// A PEFT adapter for a llava-hf model (`coin checkout --format peft`).
    Peft,
    /// CoIN's own files (`coin checkout --format coin`), in a folder named as CoIN's loader
    /// requires (`<Task>_llava_lora`).
    Coin,
    /// One safetensors file with coin's names (`coin checkout --format safetensors`).
    Safetensors,
}

/// The environment variables whose values an external command's record keeps (and its key
/// covers) unless `env` says otherwise.
pub const DEFAULT_RECORDED_ENV: &[&str] = &["CUDA_VISIBLE_DEVICES"];

fn default_env() -> Vec<String> {
    DEFAULT_RECORDED_ENV.iter().map(|s| s.to_string()).collect()
}

fn default_answers() -> String {
    "{results_dir}/{task}/{stage}/merge.jsonl".to_string()
}

/// `[trainer]`: a program that trains one step instead of coin's engine (DeepSpeed, torchrun,
/// CoIN's scripts; docs/external.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalTrainer {
    /// The command line, run by `sh -c` with its `{placeholders}` replaced by shell-quoted
    /// values (empty: coin's own engine).
    pub command: String,
    /// Where it runs (empty: the repository root; relative: to it). Its git commit and dirty
    /// state are recorded and keyed.
    pub workdir: PathBuf,
    /// How the parent checkpoint is written for `{parent_dir}`.
    pub parent_format: CheckpointLayout,
    /// Where the new adapter is when the command has finished (templated; empty:
    /// `{output_dir}`).
    pub output: String,
    /// Environment variables whose values are recorded and keyed.
    pub env: Vec<String>,
}

impl Default for ExternalTrainer {
    fn default() -> Self {
        ExternalTrainer {
            command: String::new(),
            workdir: PathBuf::new(),
            parent_format: CheckpointLayout::Stored,
            output: String::new(),
            env: default_env(),
        }
    }
}

/// `[evaluator]`: a program that writes answer files instead of coin's engine generating them;
/// coin scores them with its own scorers (docs/external.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalEvaluator {
    /// The command line, run once per evaluated task (empty: coin's own engine).
    pub command: String,
    /// Where it runs (empty: the repository root; relative: to it).
    pub workdir: PathBuf,
    /// How the evaluated checkpoint is written for `{checkpoint_dir}`.
    pub checkpoint_format: CheckpointLayout,
    /// The answer file the command leaves (templated; CoIN's `merge.jsonl` line format).
    pub answers: String,
    /// Environment variables whose values are recorded and keyed.
    pub env: Vec<String>,
}

impl Default for ExternalEvaluator {
    fn default() -> Self {
        ExternalEvaluator {
            command: String::new(),
            workdir: PathBuf::new(),
            checkpoint_format: CheckpointLayout::Stored,
            answers: default_answers(),
            env: default_env(),
        }
    }
}

/// The base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The preset the defaults came from (`tiny`, `llava-7b` or `coin-paper`).
    pub preset: String,
    /// A human name of the base model, recorded in checkpoints and compared with the parent's
    /// before training (e.g. `llava-v1.5-7b`).
    pub name: String,
    /// The base model directory (llava-hf layout, or the LLaMA/Vicuna dir of the CoIN split
    /// setup); relative paths are resolved against the repository root. Empty = not set.
    pub base: PathBuf,
    /// CoIN split setup: the CLIP vision tower directory (empty = not used).
    pub vision_tower: PathBuf,
    /// CoIN split setup: the stage-1 projector file (`mm_projector.bin`; empty = not used).
    pub projector: PathBuf,
}

/// Training hyperparameters, named as in CoIN's scripts (LLaVA's `train.py` flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Adapter kind: `lora` or `moelora`.
    pub method: Method,
    /// LoRA rank (MoELoRA: the total rank, split over the experts).
    pub lora_r: usize,
    /// LoRA alpha (scale = alpha / r).
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    pub lora_dropout: f64,
    /// MoELoRA experts (unused by `lora`); `lora_r` must be a multiple of it.
    pub expert_num: usize,
    /// Peak learning rate of the adapter.
    pub learning_rate: f64,
    /// Learning rate of the multimodal projector (0 = projector frozen).
    pub mm_projector_lr: f64,
    /// Where a task's projector starts: `continue` (the parent's) or `as-coin` (CoIN's code:
    /// the base's for the first task, a freshly initialised one after). Left out of the
    /// training key while `continue` ([`TrainConfig::keyed_value`]).
    #[serde(default)]
    pub projector_init: ProjectorInit,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Linear warm-up as a fraction of the optimiser steps.
    pub warmup_ratio: f64,
    /// Learning-rate schedule: `cosine`, `linear` or `constant` after a linear warm-up (HF's
    /// Trainer), or `deepspeed-warmup` (DeepSpeed's `WarmupLR`, what CoIN's runs applied).
    pub lr_scheduler: Schedule,
    /// Epochs over each task's training set.
    pub num_train_epochs: f64,
    /// Samples per forward pass (CoIN: per GPU).
    pub per_device_batch_size: usize,
    /// Per-task batch sizes, overriding `per_device_batch_size` (CoIN's scripts differ per task).
    pub batch_size_per_task: BTreeMap<String, usize>,
    /// Forward passes per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Leave out an epoch's last optimiser step when it has fewer than
    /// `gradient_accumulation_steps` micro-batches, as DeepSpeed does (CoIN). Left out of the
    /// training key while false.
    #[serde(default)]
    pub drop_partial_step: bool,
    /// Gradient clipping by global norm (0 = off).
    pub max_grad_norm: f64,
    /// Longest tokenized sample; longer samples are truncated.
    pub model_max_length: usize,
    /// Image preprocessing for training: `pad`, `crop` or `resize`.
    pub image_aspect_ratio: AspectMode,
    /// Seed of initialisation, dropout and data order.
    pub seed: u64,
    /// The linear layers that get adapters (module name suffixes).
    pub targets: Vec<String>,
    /// The continual-learning method: `sequential` (each task trained on its own data),
    /// `replay` (earlier tasks' training items mixed in), `ewc` (a Fisher-weighted penalty
    /// towards the parent's adapter) or `lwf` (distillation toward the parent's outputs). Left
    /// out of the training key while `sequential`.
    #[serde(default)]
    pub strategy: Strategy,
    /// `replay`: items replayed from each earlier task, unless `replay_share` is set.
    #[serde(default = "default_replay_items")]
    pub replay_items: usize,
    /// `replay`: the share (0–1] of each earlier task's items replayed instead of
    /// `replay_items` (0 = use `replay_items`).
    #[serde(default)]
    pub replay_share: f64,
    /// `ewc`: the weight λ of the quadratic penalty (λ/2)·Σ F·(θ − θ*)² (docs/methods.md).
    #[serde(default = "default_ewc_lambda")]
    pub ewc_lambda: f64,
    /// `ewc`: the factor γ ∈ [0, 1] on the parent's Fisher when this task's is added (1: plain
    /// EWC's sum over tasks; < 1: online EWC).
    #[serde(default = "default_ewc_gamma")]
    pub ewc_gamma: f64,
    /// `ewc`: training samples (a seeded choice) the Fisher is computed on; 0 = all.
    #[serde(default = "default_ewc_samples")]
    pub ewc_samples: usize,
    /// `lwf`: λ, the weight of the distillation term (Li & Hoiem's λ_o = 1).
    #[serde(default = "default_lwf_lambda")]
    pub lwf_lambda: f64,
    /// `lwf`: T, the temperature that softens teacher and student (Li & Hoiem: 2).
    #[serde(default = "default_lwf_temperature")]
    pub lwf_temperature: f64,
    /// `lwf`: keep only the teacher's `lwf_top_k` largest probabilities per position,
    /// renormalised (0 = the whole vocabulary; the memory is samples × supervised tokens × k).
    #[serde(default)]
    pub lwf_top_k: usize,
    /// `olora`: weight λ1 of the orthogonality term Σ|A_earlier · A_newᵀ| (O-LoRA's default
    /// 0.5).
    #[serde(default = "default_olora_lambda1")]
    pub olora_lambda1: f64,
    /// `olora`: weight λ2 of the new adapter's squared L2 norm (O-LoRA's default 0).
    #[serde(default)]
    pub olora_lambda2: f64,
}

fn default_lwf_lambda() -> f64 {
    1.0
}

fn default_lwf_temperature() -> f64 {
    2.0
}

fn default_replay_items() -> usize {
    100
}

/// `train.ewc_lambda`'s default (docs/methods.md: measured on CoIN-mini).
pub const DEFAULT_EWC_LAMBDA: f64 = 100.0;

fn default_ewc_lambda() -> f64 {
    DEFAULT_EWC_LAMBDA
}

fn default_ewc_gamma() -> f64 {
    1.0
}

fn default_ewc_samples() -> usize {
    200
}

/// O-LoRA's λ1 (Wang et al. 2023; `lamda_1` in their scripts).
pub fn default_olora_lambda1() -> f64 {
    0.5
}

/// The `train` settings that belong to one method: in the training key only while that method
/// is the strategy (so adding a method's setting keeps every other method's keys).
pub const METHOD_FIELDS: &[(Strategy, &[&str])] = &[
    (Strategy::Replay, &["replay_items", "replay_share"]),
    (Strategy::Ewc, &["ewc_lambda", "ewc_gamma", "ewc_samples"]),
    (
        Strategy::Lwf,
        &["lwf_lambda", "lwf_temperature", "lwf_top_k"],
    ),
    (Strategy::Olora, &["olora_lambda1", "olora_lambda2"]),
];

/// The continual-learning method (`train.strategy`; docs/methods.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Each task trained on its own data only (CoIN's sequential fine-tuning).
    #[default]
    Sequential,
    /// Experience replay: a fixed number or share of each earlier task's training items mixed
    /// into the task's data (which items is recorded).
    Replay,
    /// Elastic Weight Consolidation: a quadratic penalty, weighted by the diagonal Fisher the
    /// parent stored, that holds the adapter near the parent's (each checkpoint stores its own).
    Ewc,
    /// Learning without Forgetting: distillation toward the parent checkpoint's outputs on the
    /// task's own inputs.
    Lwf,
    /// O-LoRA: a new LoRA per task, trained orthogonal to the earlier tasks' frozen ones;
    /// inference uses all of them (their exact concatenation).
    Olora,
}

/// Eval settings: greedy decoding and scoring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Stop generating after this many tokens, for tasks not in `max_new_tokens_per_task`.
    pub max_new_tokens: usize,
    /// Stop generating after this many tokens, per task (CoIN's generators differ). Keys
    /// match task names as in `image_aspect_per_task`.
    #[serde(default)]
    pub max_new_tokens_per_task: BTreeMap<String, usize>,
    /// Samples per generation batch.
    pub batch_size: usize,
    /// Scoring mode: `auto` (the task's default: compat for CoIN's eight, strict otherwise),
    /// `compat` or `strict`.
    pub mode: EvalMode,
    /// Image preprocessing when a task has no entry in `image_aspect_per_task`.
    pub image_aspect: AspectMode,
    /// Image preprocessing per task (CoIN's eval scripts pad for some tasks and center-crop
    /// for others). Keys match task names ignoring case, `-`, `_` and spaces.
    pub image_aspect_per_task: BTreeMap<String, AspectMode>,
    /// How a test record's text becomes the prompt, per task (`text` when not listed).
    #[serde(default)]
    pub prompt_per_task: BTreeMap<String, PromptStyle>,
}

/// Where a task's training starts the projector from (`train.projector_init`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProjectorInit {
    /// The parent checkpoint's projector carries over (the base model's for a first task).
    #[default]
    Continue,
    /// What CoIN's code does: the first task starts from the base model's projector (CoIN's
    /// stage-1 `mm_projector.bin`); every later task from a freshly initialised projector
    /// (torch's `nn.Linear` init), because CoIN's load of the previous task's projector
    /// matches no key (docs/training.md). The LoRA still continues from the parent.
    AsCoin,
}

/// How a test record's `text` becomes the user turn of the prompt (`eval.prompt_per_task`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// The text as it is, after `<image>\n` when the record has an image (CoIN's
    /// `model_vqa.py` and the loader-based generators).
    #[default]
    Text,
    /// CoIN's `model_vqa_science.py`: every `<image>` removed from the text, whitespace
    /// trimmed, then `<image>\n` in front when the record has an image.
    Science,
}

/// The adapter kind (`train.method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Plain LoRA.
    Lora,
    /// CoIN's MoELoRA (`train.expert_num` experts).
    Moelora,
}

/// The scoring mode of evals (`eval.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// The task's default: compat for CoIN's eight tasks, strict otherwise.
    Auto,
    /// CoIN's scorers, quirks included.
    Compat,
    /// The same metrics with the quirks fixed.
    Strict,
}

/// A runtime setting: `auto` (resolved once per run, [`RuntimeConfig::resolve`]) or a value.
/// Written as the word `auto` or as the value itself (`threads = 2`, `kernels = "on"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Setting<T> {
    /// Chosen for this machine and build.
    #[default]
    Auto,
    /// This value.
    Is(T),
}

impl<T: Copy> Setting<T> {
    /// The value, or `auto()` for [`Setting::Auto`].
    pub fn or_auto(self, auto: impl FnOnce() -> T) -> T {
        match self {
            Setting::Auto => auto(),
            Setting::Is(v) => v,
        }
    }
}

impl<T: Serialize> Serialize for Setting<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Setting::Auto => s.serialize_str("auto"),
            Setting::Is(v) => v.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Word {
            Auto,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            Word(Word),
            Value(T),
        }
        Ok(match Raw::<T>::deserialize(d)? {
            Raw::Word(Word::Auto) => Setting::Auto,
            Raw::Value(v) => Setting::Is(v),
        })
    }
}

/// The `[runtime]` section: how the engine runs. Every value may be `auto`; the resolved values
/// ([`Runtime`]) are recorded in train and eval records, and those that change the numbers
/// ([`Runtime::keyed`]) are part of the training key. docs/config.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads of rayon's pool: GEMMs, fused kernels, training shards (auto: candle's default,
    /// one per physical core). Process-wide: the `coin` binary applies it at start.
    pub threads: Setting<usize>,
    /// Threads of candle's element-wise pool (auto: 1 with ≤ 2 threads, else `threads`).
    /// Process-wide like `threads`.
    pub elementwise_threads: Setting<usize>,
    /// Data-parallel shards per training micro-batch on the CPU (auto: `threads` when the
    /// element-wise pool has one thread, else 1; always 1 on a GPU).
    pub shards: Setting<usize>,
    /// Fused kernels: `on`, `off`, `lora` (only the fused LoRA linear) or auto (`on` in
    /// optimised builds, `lora` in debug builds; `off` on a GPU, where the CUDA kernels run
    /// only when set explicitly).
    pub kernels: Setting<Kernels>,
    /// `cpu` or `cuda` (auto: the first CUDA GPU when coin is built with it and one is present).
    pub device: Setting<DeviceKind>,
    /// Weight dtype: `f32`, `bf16` or `f16` (auto: bf16 on a GPU, f32 on the CPU).
    pub dtype: Setting<Dtype>,
    /// Activation checkpointing in training: `on`, `off` or auto (as many decoder layers as
    /// the free memory asks for, often none). Same gradients, so not in the training key.
    #[serde(default)]
    pub checkpointing: Setting<Checkpointing>,
}

impl RuntimeConfig {
    /// Every setting `auto`.
    pub const AUTO: RuntimeConfig = RuntimeConfig {
        threads: Setting::Auto,
        elementwise_threads: Setting::Auto,
        shards: Setting::Auto,
        kernels: Setting::Auto,
        device: Setting::Auto,
        dtype: Setting::Auto,
        checkpointing: Setting::Auto,
    };

    /// Resolve `auto` against `machine` (the policies of [`crate::ml::runtime`]) and check
    /// what the machine cannot do (a CUDA device without one, shards on a GPU).
    pub fn resolve(&self, machine: &Machine) -> Result<Runtime, WorkflowError> {
        let device = self.device.or_auto(|| runtime::auto_device(machine));
        if device == DeviceKind::Cuda && !machine.cuda {
            return Err(WorkflowError::Config(format!(
                "runtime.device: cuda, but {}; set it to cpu or auto",
                if cfg!(feature = "cuda") {
                    "no CUDA device could be opened"
                } else {
                    "this coin was built without the cuda feature (docs/cuda.md)"
                }
            )));
        }
        let threads = self.threads.or_auto(|| machine.threads);
        let elementwise_threads = self
            .elementwise_threads
            .or_auto(|| runtime::auto_elementwise_threads(threads));
        let shards = match (self.shards, device) {
            (Setting::Is(n), DeviceKind::Cuda) if n > 1 => {
                return Err(WorkflowError::Config(format!(
                    "runtime.shards: {n} shards, but the shards are a CPU setting and                      runtime.device is cuda; set it to auto or 1"
                )))
            }
            (s, _) => s.or_auto(|| runtime::auto_shards(device, threads, elementwise_threads)),
        };
        let kernels = match device {
            // The CUDA kernels (src/ml/cuda/fused.cu) run when asked for; `auto` keeps candle's
            // composed ops on a GPU until scripts/gpu-check.sh has checked them on one
            // (docs/cuda.md).
            DeviceKind::Cuda => self.kernels.or_auto(|| Kernels::Off),
            DeviceKind::Cpu => self.kernels.or_auto(Kernels::build_default),
        };
        let dtype = self.dtype.or_auto(|| runtime::auto_dtype(device));
        let rt = Runtime {
            threads,
            elementwise_threads,
            shards,
            kernels,
            device,
            dtype,
            checkpointing: self.checkpointing.or_auto(|| Checkpointing::Auto),
        };
        check_counts(&RuntimeConfig::from(rt))?;
        Ok(rt)
    }
}

impl From<Runtime> for RuntimeConfig {
    /// The settings that resolve to `rt` on any machine (no `auto`).
    fn from(rt: Runtime) -> RuntimeConfig {
        RuntimeConfig {
            threads: Setting::Is(rt.threads),
            elementwise_threads: Setting::Is(rt.elementwise_threads),
            shards: Setting::Is(rt.shards),
            kernels: Setting::Is(rt.kernels),
            device: Setting::Is(rt.device),
            dtype: Setting::Is(rt.dtype),
            checkpointing: match rt.checkpointing {
                Checkpointing::Auto => Setting::Auto,
                c => Setting::Is(c),
            },
        }
    }
}

fn check_counts(r: &RuntimeConfig) -> Result<(), WorkflowError> {
    for (key, v) in [
        ("runtime.threads", r.threads),
        ("runtime.elementwise_threads", r.elementwise_threads),
        ("runtime.shards", r.shards),
    ] {
        if v == Setting::Is(0) {
            return Err(WorkflowError::Config(format!(
                "{key}: must be auto or at least 1"
            )));
        }
    }
    Ok(())
}

/// Typed settings with a closed set of spellings: every value, to list the spellings.
trait Choices: Serialize + Sized + 'static {
    const ALL: &'static [Self];
}

impl Choices for CheckpointLayout {
    const ALL: &'static [Self] = &[
        CheckpointLayout::Stored,
        CheckpointLayout::Peft,
        CheckpointLayout::Coin,
        CheckpointLayout::Safetensors,
    ];
}
impl Choices for Strategy {
    const ALL: &'static [Self] = &[
        Strategy::Sequential,
        Strategy::Replay,
        Strategy::Ewc,
        Strategy::Lwf,
        Strategy::Olora,
    ];
}
impl Choices for Method {
    const ALL: &'static [Self] = &[Method::Lora, Method::Moelora];
}
impl Choices for EvalMode {
    const ALL: &'static [Self] = &[EvalMode::Auto, EvalMode::Compat, EvalMode::Strict];
}
impl Choices for Schedule {
    const ALL: &'static [Self] = &[
        Schedule::Cosine,
        Schedule::Linear,
        Schedule::Constant,
        Schedule::DeepspeedWarmup,
    ];
}
impl Choices for ProjectorInit {
    const ALL: &'static [Self] = &[ProjectorInit::Continue, ProjectorInit::AsCoin];
}
impl Choices for PromptStyle {
    const ALL: &'static [Self] = &[PromptStyle::Text, PromptStyle::Science];
}
impl Choices for AspectMode {
    const ALL: &'static [Self] = &[AspectMode::Pad, AspectMode::Crop, AspectMode::Resize];
}
impl Choices for Kernels {
    const ALL: &'static [Self] = &[Kernels::On, Kernels::Off, Kernels::Lora];
}
impl Choices for Checkpointing {
    const ALL: &'static [Self] = &[Checkpointing::On, Checkpointing::Off];
}
impl Choices for DeviceKind {
    const ALL: &'static [Self] = &[DeviceKind::Cpu, DeviceKind::Cuda];
}
impl Choices for Dtype {
    const ALL: &'static [Self] = &[Dtype::F32, Dtype::Bf16, Dtype::F16];
}

/// The spellings of `T` (its serde names).
fn names<T: Choices>() -> Vec<String> {
    T::ALL
        .iter()
        .filter_map(|v| match serde_json::to_value(v) {
            Ok(serde_json::Value::String(s)) => Some(s),
            _ => None,
        })
        .collect()
}

/// What a key with a closed set of values accepts.
enum Rule {
    /// One of these words.
    OneOf(Vec<String>),
    /// `auto` or one of these words.
    AutoOr(Vec<String>),
    /// `auto` or a whole number ≥ 1.
    AutoOrCount,
}

fn rule(key: &str) -> Option<Rule> {
    Some(match key {
        "train.method" => Rule::OneOf(names::<Method>()),
        "train.strategy" => Rule::OneOf(names::<Strategy>()),
        "trainer.parent_format" | "evaluator.checkpoint_format" => {
            Rule::OneOf(names::<CheckpointLayout>())
        }
        "train.lr_scheduler" => Rule::OneOf(names::<Schedule>()),
        "train.projector_init" => Rule::OneOf(names::<ProjectorInit>()),
        k if k.starts_with("eval.prompt_per_task.") => Rule::OneOf(names::<PromptStyle>()),
        "train.image_aspect_ratio" | "eval.image_aspect" => Rule::OneOf(names::<AspectMode>()),
        k if k.starts_with("eval.image_aspect_per_task.") => Rule::OneOf(names::<AspectMode>()),
        "eval.mode" => Rule::OneOf(names::<EvalMode>()),
        "runtime.kernels" => Rule::AutoOr(names::<Kernels>()),
        "runtime.device" => Rule::AutoOr(names::<DeviceKind>()),
        "runtime.dtype" => Rule::AutoOr(names::<Dtype>()),
        "runtime.checkpointing" => Rule::AutoOr(names::<Checkpointing>()),
        "runtime.threads" | "runtime.elementwise_threads" | "runtime.shards" => Rule::AutoOrCount,
        _ => return None,
    })
}

/// Check `v` against the rule of `key` (named in the error with its layer).
fn check_rule(
    rule: &Rule,
    key: &str,
    v: &toml::Value,
    source: &LayerSource,
) -> Result<(), WorkflowError> {
    let word = v.as_str();
    let (ok, expected) = match rule {
        Rule::OneOf(names) => (
            word.is_some_and(|w| names.iter().any(|n| n == w)),
            format!("one of {}", names.join(", ")),
        ),
        Rule::AutoOr(names) => (
            word.is_some_and(|w| w == "auto" || names.iter().any(|n| n == w)),
            format!("one of auto, {}", names.join(", ")),
        ),
        Rule::AutoOrCount => (
            word == Some("auto") || v.as_integer().is_some_and(|i| i >= 1),
            "auto or a whole number ≥ 1".to_string(),
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(WorkflowError::Config(format!(
            "{source}: '{key}' must be {expected}, got {v}"
        )))
    }
}

/// The GPUs of CoIN's training scripts (`deepspeed --include localhost:0,1,2,3,4,5,6,7`).
pub const COIN_GPUS: usize = 8;

/// The seven linear layers of a LLaMA block (CoIN's `find_all_linear_names`).
pub const ALL_LLM_LINEARS: &[&str] = &crate::ml::train::params::DEFAULT_TARGETS;

fn task_key(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

impl RunConfig {
    /// A built-in preset by name (`tiny`, `llava-7b`, `coin-paper`).
    pub fn preset(name: &str) -> Result<RunConfig, WorkflowError> {
        match name {
            "llava-7b" => Ok(Self::llava_7b()),
            "coin-paper" => Ok(Self::coin_paper()),
            "tiny" => Ok(Self::tiny()),
            other => Err(WorkflowError::Config(format!(
                "unknown preset '{other}'; the presets are {}",
                PRESETS.join(", ")
            ))),
        }
    }

    /// CoIN's hyperparameters for LLaVA-1.5-7B (zackschen/CoIN `scripts/LLaVA/Train/*.sh`).
    fn llava_7b() -> RunConfig {
        let batch: BTreeMap<String, usize> = [
            ("ScienceQA", 14),
            ("TextVQA", 14),
            ("ImageNet", 16),
            ("GQA", 6),
            ("VizWiz", 14),
            ("Grounding", 6),
            ("VQAv2", 8),
            ("OCR-VQA", 10),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // CoIN's generators: model_vqa_science / model_vqa (ImageNet, Grounding, VQAv2) use the
        // CLIP center crop; the loader-based ones (TextVQA, GQA, VizWiz, OCR-VQA) pad.
        let aspect: BTreeMap<String, AspectMode> = [
            ("ScienceQA", AspectMode::Crop),
            ("TextVQA", AspectMode::Pad),
            ("ImageNet", AspectMode::Crop),
            ("GQA", AspectMode::Pad),
            ("VizWiz", AspectMode::Pad),
            ("Grounding", AspectMode::Crop),
            ("VQAv2", AspectMode::Crop),
            ("OCR-VQA", AspectMode::Pad),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        RunConfig {
            model: ModelConfig {
                preset: "llava-7b".into(),
                name: "llava-v1.5-7b".into(),
                base: PathBuf::new(),
                vision_tower: PathBuf::new(),
                projector: PathBuf::new(),
            },
            train: TrainConfig {
                method: Method::Lora,
                lora_r: 128,
                lora_alpha: 256.0,
                lora_dropout: 0.05,
                expert_num: 8,
                learning_rate: 2e-4,
                mm_projector_lr: 2e-5,
                projector_init: ProjectorInit::Continue,
                weight_decay: 0.0,
                warmup_ratio: 0.03,
                lr_scheduler: Schedule::Cosine,
                num_train_epochs: 1.0,
                per_device_batch_size: 8,
                batch_size_per_task: batch,
                gradient_accumulation_steps: 8,
                drop_partial_step: false,
                max_grad_norm: 1.0,
                model_max_length: 2048,
                image_aspect_ratio: AspectMode::Pad,
                seed: 42,
                targets: ALL_LLM_LINEARS.iter().map(|s| s.to_string()).collect(),
                strategy: Strategy::Sequential,
                replay_items: default_replay_items(),
                replay_share: 0.0,
                ewc_lambda: default_ewc_lambda(),
                ewc_gamma: default_ewc_gamma(),
                ewc_samples: default_ewc_samples(),
                lwf_lambda: default_lwf_lambda(),
                lwf_temperature: default_lwf_temperature(),
                lwf_top_k: 0,
                olora_lambda1: default_olora_lambda1(),
                olora_lambda2: 0.0,
            },
            eval: EvalConfig {
                max_new_tokens: 128,
                max_new_tokens_per_task: BTreeMap::new(),
                batch_size: 16,
                mode: EvalMode::Auto,
                image_aspect: AspectMode::Pad,
                image_aspect_per_task: aspect,
                prompt_per_task: BTreeMap::new(),
            },
            // CoIN trains in bf16 on GPUs; the CPU runs f32 (auto).
            runtime: RuntimeConfig::AUTO,
            trainer: ExternalTrainer::default(),
            evaluator: ExternalEvaluator::default(),
        }
    }

    /// What CoIN's runs effectively did (zackschen/CoIN at 4122465 with transformers 4.31.0 and
    /// DeepSpeed 0.9.5; every value's source is in docs/config.md): the `llava-7b` values
    /// except that the DeepSpeed config's optimizer and scheduler replace the command line's
    /// (one learning rate for the projector too, `WarmupLR`), one device reaches CoIN's global
    /// batch of 8 GPUs by accumulation (8 × 8), every task after the first starts from a fresh
    /// projector, and evals use each CoIN generator's token limit and ScienceQA prompt.
    fn coin_paper() -> RunConfig {
        let mut c = Self::llava_7b();
        c.model.preset = "coin-paper".into();
        let t = &mut c.train;
        // DeepSpeed builds AdamW from one flat parameter list at the configured rate (the
        // trainer's param groups, and so --mm_projector_lr, are never used).
        t.mm_projector_lr = t.learning_rate;
        t.lr_scheduler = Schedule::DeepspeedWarmup;
        // 8 GPUs × --gradient_accumulation_steps 8 micro-batches of the per-GPU batch.
        t.gradient_accumulation_steps = COIN_GPUS * 8;
        // DeepSpeed applies only whole accumulation steps.
        t.drop_partial_step = true;
        t.projector_init = ProjectorInit::AsCoin;
        let e = &mut c.eval;
        // model_vqa_science.py and model_vqa.py hard-code 1024; the loader-based generators
        // default --max_new_tokens to 128 and the eval scripts do not pass it.
        e.max_new_tokens_per_task = [
            ("ScienceQA", 1024),
            ("TextVQA", 128),
            ("ImageNet", 1024),
            ("GQA", 128),
            ("VizWiz", 128),
            ("Grounding", 1024),
            ("VQAv2", 1024),
            ("OCR-VQA", 128),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        e.prompt_per_task = [("ScienceQA".to_string(), PromptStyle::Science)]
            .into_iter()
            .collect();
        c
    }

    /// The demo preset for the tiny random model (`coin model init --tiny`): small rank, a
    /// higher learning rate and several epochs so that a few hundred samples move the model.
    fn tiny() -> RunConfig {
        RunConfig {
            model: ModelConfig {
                preset: "tiny".into(),
                name: "coin-tiny".into(),
                base: PathBuf::new(),
                vision_tower: PathBuf::new(),
                projector: PathBuf::new(),
            },
            train: TrainConfig {
                method: Method::Lora,
                lora_r: 8,
                lora_alpha: 16.0,
                lora_dropout: 0.05,
                expert_num: 4,
                learning_rate: 2e-3,
                mm_projector_lr: 2e-3,
                projector_init: ProjectorInit::Continue,
                weight_decay: 0.0,
                warmup_ratio: 0.03,
                lr_scheduler: Schedule::Cosine,
                num_train_epochs: 3.0,
                per_device_batch_size: 16,
                batch_size_per_task: BTreeMap::new(),
                gradient_accumulation_steps: 1,
                drop_partial_step: false,
                max_grad_norm: 1.0,
                model_max_length: 256,
                image_aspect_ratio: AspectMode::Pad,
                seed: 0,
                targets: ALL_LLM_LINEARS.iter().map(|s| s.to_string()).collect(),
                strategy: Strategy::Sequential,
                replay_items: default_replay_items(),
                replay_share: 0.0,
                ewc_lambda: default_ewc_lambda(),
                ewc_gamma: default_ewc_gamma(),
                ewc_samples: default_ewc_samples(),
                lwf_lambda: default_lwf_lambda(),
                lwf_temperature: default_lwf_temperature(),
                lwf_top_k: 0,
                olora_lambda1: default_olora_lambda1(),
                olora_lambda2: 0.0,
            },
            eval: EvalConfig {
                // Grounding answers ("[0.25, 0.50, 0.50, 0.75]") are the longest in CoIN-mini.
                max_new_tokens: 32,
                max_new_tokens_per_task: BTreeMap::new(),
                batch_size: 16,
                mode: EvalMode::Auto,
                image_aspect: AspectMode::Pad,
                image_aspect_per_task: BTreeMap::new(),
                prompt_per_task: BTreeMap::new(),
            },
            // The tiny model runs in f32 on any device.
            runtime: RuntimeConfig {
                dtype: Setting::Is(Dtype::F32),
                ..RuntimeConfig::AUTO
            },
            trainer: ExternalTrainer::default(),
            evaluator: ExternalEvaluator::default(),
        }
    }

    /// Check the ranges (the spellings are checked when the layers merge, and typed here).
    pub fn validate(&self) -> Result<(), WorkflowError> {
        let bad = |key: &str, msg: String| Err(WorkflowError::Config(format!("{key}: {msg}")));
        if !PRESETS.contains(&self.model.preset.as_str()) {
            return bad(
                "model.preset",
                format!(
                    "'{}' is not one of {}",
                    self.model.preset,
                    PRESETS.join(", ")
                ),
            );
        }
        let t = &self.train;
        if t.lora_r == 0 {
            return bad("train.lora_r", "must be at least 1".into());
        }
        if t.method == Method::Moelora
            && (t.expert_num == 0 || !t.lora_r.is_multiple_of(t.expert_num))
        {
            return bad(
                "train.expert_num",
                format!(
                    "MoELoRA splits lora_r = {} over the experts, so it must be a non-zero divisor of it (got {})",
                    t.lora_r, t.expert_num
                ),
            );
        }
        for (key, v) in [
            ("train.lora_dropout", t.lora_dropout),
            ("train.warmup_ratio", t.warmup_ratio),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("must be in [0, 1), got {v}"));
            }
        }
        for (key, v) in [
            ("train.learning_rate", t.learning_rate),
            ("train.mm_projector_lr", t.mm_projector_lr),
            ("train.weight_decay", t.weight_decay),
            ("train.max_grad_norm", t.max_grad_norm),
            ("train.lora_alpha", t.lora_alpha),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(key, format!("must be a finite number ≥ 0, got {v}"));
            }
        }
        if !(t.num_train_epochs.is_finite() && t.num_train_epochs > 0.0) {
            return bad(
                "train.num_train_epochs",
                format!("must be > 0, got {}", t.num_train_epochs),
            );
        }
        for (key, v) in [
            ("train.per_device_batch_size", t.per_device_batch_size),
            (
                "train.gradient_accumulation_steps",
                t.gradient_accumulation_steps,
            ),
            ("train.model_max_length", t.model_max_length),
            ("eval.max_new_tokens", self.eval.max_new_tokens),
            ("eval.batch_size", self.eval.batch_size),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if let Some((task, _)) = t.batch_size_per_task.iter().find(|(_, v)| **v == 0) {
            return bad(
                &format!("train.batch_size_per_task.{task}"),
                "must be at least 1".into(),
            );
        }
        if let Some((task, _)) = self
            .eval
            .max_new_tokens_per_task
            .iter()
            .find(|(_, v)| **v == 0)
        {
            return bad(
                &format!("eval.max_new_tokens_per_task.{task}"),
                "must be at least 1".into(),
            );
        }
        if t.targets.is_empty() {
            return bad("train.targets", "name at least one linear layer".into());
        }
        if !(0.0..=1.0).contains(&t.replay_share) || !t.replay_share.is_finite() {
            return bad(
                "train.replay_share",
                format!("must be in [0, 1], got {}", t.replay_share),
            );
        }
        if !(t.lwf_lambda.is_finite() && t.lwf_lambda > 0.0) {
            return bad(
                "train.lwf_lambda",
                format!(
                    "must be a finite number > 0, got {} (train.strategy = sequential trains \
                     without the distillation)",
                    t.lwf_lambda
                ),
            );
        }
        if !(t.lwf_temperature.is_finite() && t.lwf_temperature > 0.0) {
            return bad(
                "train.lwf_temperature",
                format!("must be a finite number > 0, got {}", t.lwf_temperature),
            );
        }
        for (key, v) in [
            ("train.olora_lambda1", t.olora_lambda1),
            ("train.olora_lambda2", t.olora_lambda2),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(key, format!("must be a number ≥ 0, got {v}"));
            }
        }
        if t.strategy == Strategy::Olora && t.method == Method::Moelora {
            return bad(
                "train.strategy",
                "olora stacks a new plain LoRA per task and cannot be combined with \
                 train.method = \"moelora\" (the router mixes its experts per token); use \
                 train.method = \"lora\""
                    .into(),
            );
        }
        if t.strategy == Strategy::Replay && t.replay_items == 0 && t.replay_share == 0.0 {
            return bad(
                "train.replay_items",
                "replay needs replay_items ≥ 1 or replay_share > 0".into(),
            );
        }
        if !(t.ewc_lambda.is_finite() && t.ewc_lambda >= 0.0) {
            return bad(
                "train.ewc_lambda",
                format!("must be a finite number ≥ 0, got {}", t.ewc_lambda),
            );
        }
        if !(t.ewc_gamma.is_finite() && (0.0..=1.0).contains(&t.ewc_gamma)) {
            return bad(
                "train.ewc_gamma",
                format!(
                    "must be in [0, 1] (1: plain EWC, < 1: online EWC), got {}",
                    t.ewc_gamma
                ),
            );
        }
        check_counts(&self.runtime)
    }

    /// The runtime of this configuration, resolved against this machine ([`Machine::detect`],
    /// probed once per process, so every call gives the same answer).
    pub fn resolved_runtime(&self) -> Result<Runtime, WorkflowError> {
        self.runtime.resolve(&Machine::detect())
    }

    /// This configuration with `[runtime]` replaced by the resolved `rt` (what records store:
    /// fed back as a layer it asks for the same runtime on any machine).
    pub fn with_runtime(&self, rt: Runtime) -> RunConfig {
        RunConfig {
            runtime: RuntimeConfig::from(rt),
            ..self.clone()
        }
    }

    /// The per-device batch size for `task` (its `batch_size_per_task` entry, or the default).
    pub fn train_batch_size(&self, task: &str) -> usize {
        per_task(&self.train.batch_size_per_task, task).unwrap_or(self.train.per_device_batch_size)
    }

    /// The resolved configuration as canonical JSON (keys sorted), as stored in the train
    /// record under `config`.
    pub fn to_record_value(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("RunConfig always serialises to JSON");
        // Records of coin's own engine stay as they were before external commands existed.
        if let Some(o) = v.as_object_mut() {
            if self.trainer == ExternalTrainer::default() {
                o.remove("trainer");
            }
            if self.evaluator == ExternalEvaluator::default() {
                o.remove("evaluator");
            }
        }
        let text =
            crate::history::records::to_canonical_json(&v).expect("a JSON value always serialises");
        serde_json::from_str(&text).expect("canonical JSON parses back")
    }

    /// Read a configuration back from a train record's `config` value. Records written before
    /// the `[runtime]` section existed read back with `model.dtype` dropped and every runtime
    /// setting `auto` (what ran then was not recorded).
    pub fn from_record_value(v: &serde_json::Value) -> Result<RunConfig, WorkflowError> {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            if let Some(m) = o
                .get_mut("model")
                .and_then(serde_json::Value::as_object_mut)
            {
                m.remove("dtype");
            }
            if !o.contains_key("runtime") {
                let auto = serde_json::to_value(RuntimeConfig::AUTO)
                    .expect("RuntimeConfig always serialises to JSON");
                o.insert("runtime".into(), auto);
            }
        }
        serde_json::from_value(v).map_err(|e| {
            WorkflowError::Config(format!("the stored configuration does not parse: {e}"))
        })
    }

    /// The configuration as TOML text (`coin config`-style display, docs).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("RunConfig always serialises to TOML")
    }

    /// The base model directory resolved against the repository root (None when not set).
    pub fn base_dir(&self, repo_root: &Path) -> Option<PathBuf> {
        resolve_opt(repo_root, &self.model.base)
    }

    /// The CoIN split setup's vision tower, resolved (None when not set).
    pub fn vision_tower_dir(&self, repo_root: &Path) -> Option<PathBuf> {
        resolve_opt(repo_root, &self.model.vision_tower)
    }

    /// The CoIN split setup's projector file, resolved (None when not set).
    pub fn projector_file(&self, repo_root: &Path) -> Option<PathBuf> {
        resolve_opt(repo_root, &self.model.projector)
    }

    /// Every valid dotted key, sorted (what an unknown-key error lists).
    pub fn valid_keys() -> Vec<String> {
        let table = to_table(&Self::llava_7b());
        let mut keys = Vec::new();
        collect_keys(&table, "", &mut keys);
        keys.sort();
        keys
    }
}

fn resolve_opt(root: &Path, p: &Path) -> Option<PathBuf> {
    if p.as_os_str().is_empty() {
        None
    } else if p.is_absolute() {
        Some(p.to_path_buf())
    } else {
        Some(root.join(p))
    }
}

/// The entry of `task` in a per-task map (names compared ignoring case, `-`, `_`, spaces).
fn per_task<T: Copy>(map: &BTreeMap<String, T>, task: &str) -> Option<T> {
    let key = task_key(task);
    map.iter()
        .find(|(k, _)| task_key(k) == key)
        .map(|(_, v)| *v)
}

impl EvalConfig {
    /// The image preprocessing for `task`: its `image_aspect_per_task` entry (names compared
    /// ignoring case, `-`, `_`, spaces), else `image_aspect`.
    pub fn aspect_for(&self, task: &str) -> AspectMode {
        per_task(&self.image_aspect_per_task, task).unwrap_or(self.image_aspect)
    }

    /// The token limit for `task`: its `max_new_tokens_per_task` entry, else `max_new_tokens`.
    pub fn max_new_tokens_for(&self, task: &str) -> usize {
        per_task(&self.max_new_tokens_per_task, task).unwrap_or(self.max_new_tokens)
    }

    /// How `task`'s prompts are made: its `prompt_per_task` entry, else `text`.
    pub fn prompt_for(&self, task: &str) -> PromptStyle {
        per_task(&self.prompt_per_task, task).unwrap_or_default()
    }
}

impl TrainConfig {
    /// The settings as the training key hashes them: a setting added after keys were first
    /// stored is left out while it has its default, so a configuration that does not use it
    /// keeps its key (and reuses its checkpoints).
    pub fn keyed_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        let mut v = serde_json::to_value(self)?;
        if let Some(o) = v.as_object_mut() {
            if self.projector_init == ProjectorInit::Continue {
                o.remove("projector_init");
            }
            if !self.drop_partial_step {
                o.remove("drop_partial_step");
            }
            if self.strategy == Strategy::Sequential {
                o.remove("strategy");
            }
            // A method's settings are keyed only while it is the strategy.
            for (strategy, fields) in METHOD_FIELDS {
                if *strategy != self.strategy {
                    for f in *fields {
                        o.remove(*f);
                    }
                }
            }
        }
        Ok(v)
    }
}

fn to_table(cfg: &RunConfig) -> toml::Table {
    match toml::Value::try_from(cfg).expect("RunConfig always converts to a TOML value") {
        toml::Value::Table(t) => t,
        _ => unreachable!("a struct converts to a TOML table"),
    }
}

fn collect_keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) if !MAP_KEYS.contains(&key.as_str()) => {
                collect_keys(sub, &key, out)
            }
            _ => out.push(key),
        }
    }
}

/// Where a configuration layer came from (named in errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSource {
    /// `.coin/config.toml` of the repository.
    RepoFile(PathBuf),
    /// A `--config FILE.toml`.
    File(PathBuf),
    /// A `--set key=value`.
    Set(String),
    /// An environment variable ([`ENV_VARS`]): `NAME=value`.
    Env(String),
    /// Set by a command (e.g. `coin demo` choosing the tiny preset).
    Command(String),
}

impl LayerSource {
    /// The value as typed, for a `--set` or an environment variable.
    fn raw_value(&self) -> Option<&str> {
        match self {
            LayerSource::Set(s) | LayerSource::Env(s) => s.split_once('=').map(|(_, v)| v.trim()),
            _ => None,
        }
    }
}

impl fmt::Display for LayerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSource::RepoFile(p) | LayerSource::File(p) => write!(f, "'{}'", p.display()),
            LayerSource::Set(s) => write!(f, "--set {s}"),
            LayerSource::Env(s) => write!(f, "the environment variable {s}"),
            LayerSource::Command(s) => write!(f, "{s}"),
        }
    }
}

/// One override layer: a TOML table and where it came from.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Where it came from.
    pub source: LayerSource,
    /// The values.
    pub table: toml::Table,
}

impl Layer {
    /// Read a TOML file (`.coin/config.toml` when `repo_file`, else a `--config` file).
    pub fn from_file(path: &Path, repo_file: bool) -> Result<Layer, WorkflowError> {
        let text = std::fs::read_to_string(path)
            .map_err(WorkflowError::io("read the configuration file", path))?;
        let source = if repo_file {
            LayerSource::RepoFile(path.to_path_buf())
        } else {
            LayerSource::File(path.to_path_buf())
        };
        Self::from_toml(&text, source)
    }

    /// Parse TOML text as a layer. A `[gates]` table (the hooks' settings, read by
    /// [`GatesConfig`]) is checked by the same parser as the hooks use and left out.
    pub fn from_toml(text: &str, source: LayerSource) -> Result<Layer, WorkflowError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            WorkflowError::Config(format!("{source} is not valid TOML: {}", e.message()))
        })?;
        if let Some(gates) = table.remove(GATES_TABLE) {
            GatesConfig::from_value(gates).map_err(|message| {
                WorkflowError::Config(format!("{source}: [{GATES_TABLE}]: {message}"))
            })?;
        }
        Ok(Layer { source, table })
    }

    /// A `key=value` override (`train.lora_r=64`, `eval.mode=strict`,
    /// `train.targets=["q_proj","v_proj"]`). The value is read as a TOML value when it parses
    /// as one (numbers, booleans, arrays, quoted strings), otherwise as a bare string.
    pub fn from_set(assignment: &str) -> Result<Layer, WorkflowError> {
        let (key, value) = assignment.split_once('=').ok_or_else(|| {
            WorkflowError::Config(format!(
                "--set {assignment}: expected key=value, e.g. --set train.lora_r=64"
            ))
        })?;
        let key = key.trim();
        let parts: Vec<&str> = key.split('.').collect();
        if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
            return Err(WorkflowError::Config(format!(
                "--set {assignment}: '{key}' is not a dotted key such as train.lora_r"
            )));
        }
        Ok(Layer {
            source: LayerSource::Set(assignment.to_string()),
            table: leaf_table(&parts, value.trim()),
        })
    }

    /// The layers of the environment variables in `vars` that feed the configuration
    /// ([`ENV_VARS`], and `COIN_FUSED`), one per variable, lowest precedence first. The value
    /// is read as in [`Layer::from_set`]; an empty variable counts as unset.
    pub fn from_env(vars: &[(String, String)]) -> Result<Vec<Layer>, WorkflowError> {
        let get = |name: &str| {
            vars.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let mut layers = Vec::new();
        if let Some(v) = get(LEGACY_FUSED_VAR) {
            let kernels = match v {
                "0" => "off",
                "1" => "on",
                _ => {
                    return Err(WorkflowError::Config(format!(
                        "the environment variable {LEGACY_FUSED_VAR}={v}: it must be 0 or 1 \
                         (or use COIN_KERNELS=auto|on|off|lora)"
                    )))
                }
            };
            layers.push(Layer {
                source: LayerSource::Env(format!("{LEGACY_FUSED_VAR}={v}")),
                table: leaf_table(&["runtime", "kernels"], kernels),
            });
        }
        for (name, key) in ENV_VARS {
            if let Some(v) = get(name) {
                let parts: Vec<&str> = key.split('.').collect();
                layers.push(Layer {
                    source: LayerSource::Env(format!("{name}={v}")),
                    table: leaf_table(&parts, v),
                });
            }
        }
        Ok(layers)
    }

    /// The preset this layer selects (`model.preset`), if any.
    fn preset(&self) -> Option<&str> {
        self.table
            .get("model")
            .and_then(|m| m.get("preset"))
            .and_then(toml::Value::as_str)
    }
}

/// The table `{parts[0]: {parts[1]: … value}}`, the value read as a TOML value when it parses
/// as one (numbers, booleans, arrays, quoted strings), otherwise as a bare string.
fn leaf_table(parts: &[&str], value: &str) -> toml::Table {
    let mut leaf = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    for p in parts.iter().rev() {
        let mut t = toml::Table::new();
        t.insert((*p).to_string(), leaf);
        leaf = toml::Value::Table(t);
    }
    match leaf {
        toml::Value::Table(t) => t,
        _ => toml::Table::new(),
    }
}

/// Merge `layer` into `base`, refusing keys the configuration does not have and converting
/// values to the type the key already has (an integer where a float is expected, a bare word
/// where a string is expected).
fn merge(
    base: &mut toml::Table,
    layer: &toml::Table,
    prefix: &str,
    source: &LayerSource,
) -> Result<(), WorkflowError> {
    for (k, v) in layer {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let is_map = MAP_KEYS.contains(&prefix);
        if let Some(r) = rule(&key) {
            check_rule(&r, &key, v, source)?;
            if is_map || base.contains_key(k) {
                base.insert(k.clone(), v.clone());
                continue;
            }
        }
        match base.get_mut(k) {
            None if is_map => {
                base.insert(k.clone(), v.clone());
            }
            None => {
                if let Some((_, new, values)) = RENAMED_KEYS.iter().find(|(old, ..)| *old == key) {
                    return Err(WorkflowError::Config(format!(
                        "{source} sets '{key}', which is now '{new}' ({values}); rename it \
                         (in a file: move it to the [{}] table as '{}')",
                        new.split('.').next().unwrap_or_default(),
                        new.split('.').nth(1).unwrap_or_default(),
                    )));
                }
                return Err(WorkflowError::UnknownKey {
                    key,
                    layer: source.to_string(),
                    valid: RunConfig::valid_keys(),
                });
            }
            Some(toml::Value::Table(sub)) => match v {
                toml::Value::Table(vt) => merge(sub, vt, &key, source)?,
                _ => {
                    return Err(WorkflowError::Config(format!(
                        "{source}: '{key}' is a table of settings, not a single value"
                    )))
                }
            },
            Some(existing) => {
                let new = match (&*existing, v) {
                    (toml::Value::Float(_), toml::Value::Integer(i)) => {
                        toml::Value::Float(*i as f64)
                    }
                    // `--set model.base=123` or a bare word: keep strings as typed.
                    (toml::Value::String(_), toml::Value::Integer(_))
                    | (toml::Value::String(_), toml::Value::Float(_))
                    | (toml::Value::String(_), toml::Value::Boolean(_))
                        if source.raw_value().is_some() =>
                    {
                        toml::Value::String(source.raw_value().unwrap_or_default().to_string())
                    }
                    (toml::Value::Array(_), toml::Value::String(s))
                        if source.raw_value().is_some() =>
                    {
                        // `--set train.targets=q_proj,v_proj`
                        toml::Value::Array(
                            s.split(',')
                                .map(|x| toml::Value::String(x.trim().to_string()))
                                .filter(|x| x.as_str() != Some(""))
                                .collect(),
                        )
                    }
                    _ => v.clone(),
                };
                if std::mem::discriminant(&*existing) != std::mem::discriminant(&new) {
                    return Err(WorkflowError::Config(format!(
                        "{source}: '{key}' must be {}, got {}",
                        type_name(existing),
                        v
                    )));
                }
                *existing = new;
            }
        }
    }
    Ok(())
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

/// Resolve the configuration from its layers, in order of increasing precedence: the preset
/// (the last `model.preset` any layer sets, else `default_preset`, else [`DEFAULT_PRESET`]),
/// then each layer.
pub fn resolve(layers: &[Layer], default_preset: Option<&str>) -> Result<RunConfig, WorkflowError> {
    let preset = layers
        .iter()
        .rev()
        .find_map(Layer::preset)
        .or(default_preset)
        .unwrap_or(DEFAULT_PRESET);
    let mut table = to_table(&RunConfig::preset(preset)?);
    for layer in layers {
        merge(&mut table, &layer.table, "", &layer.source)?;
    }
    let cfg: RunConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| {
            WorkflowError::Config(format!("the merged settings do not parse: {}", e.message()))
        })?;
    cfg.validate()?;
    Ok(cfg)
}

/// What a command collects from the repository and its flags.
#[derive(Clone, Debug, Default)]
pub struct ConfigSources {
    /// The repository's `.coin/config.toml` (read when it exists).
    pub repo_file: Option<PathBuf>,
    /// `--config FILE.toml`, in the order given.
    pub files: Vec<PathBuf>,
    /// `--set key=value`, in the order given.
    pub sets: Vec<String>,
    /// The process environment as (name, value) pairs; the variables of [`ENV_VARS`] make a
    /// layer between the repository file and `--config`. Empty: none (the library reads no
    /// environment itself; the command line passes its own).
    pub env: Vec<(String, String)>,
    /// The preset when no layer names one (e.g. `coin demo` asks for `tiny`).
    pub default_preset: Option<String>,
}

impl ConfigSources {
    /// The sources of a repository whose `.coin` folder is `coin_dir`, plus flags.
    pub fn for_repo(coin_dir: &Path, files: Vec<PathBuf>, sets: Vec<String>) -> ConfigSources {
        ConfigSources {
            repo_file: Some(coin_dir.join("config.toml")),
            files,
            sets,
            env: Vec::new(),
            default_preset: None,
        }
    }

    /// Read every layer and resolve: repository file, environment, `--config`, `--set`.
    pub fn resolve(&self) -> Result<RunConfig, WorkflowError> {
        let mut layers = Vec::new();
        if let Some(p) = &self.repo_file {
            if p.is_file() {
                layers.push(Layer::from_file(p, true)?);
            }
        }
        layers.extend(Layer::from_env(&self.env)?);
        for f in &self.files {
            layers.push(Layer::from_file(f, false)?);
        }
        for s in &self.sets {
            layers.push(Layer::from_set(s)?);
        }
        resolve(&layers, self.default_preset.as_deref())
    }
}

/// Refuse to continue from a parent trained for another base model: compares the parent
/// checkpoint's recorded base model name (manifest `base_model.name`, else the train record's
/// `config.model.name`) with `cfg.model.name`. A parent with no record of its base passes.
pub fn check_parent_base(
    parent: &crate::history::Checkpoint,
    cfg: &RunConfig,
) -> Result<(), WorkflowError> {
    let recorded = parent
        .manifest
        .base_model
        .as_ref()
        .map(|b| b.name.clone())
        .or_else(|| {
            parent
                .train
                .as_ref()
                .and_then(|t| t.extra.get("config"))
                .and_then(|c| c.pointer("/model/name"))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        });
    match recorded {
        Some(name) if name != cfg.model.name => Err(WorkflowError::BaseMismatch {
            parent: parent.id.short(),
            parent_base: name,
            config_base: cfg.model.name.clone(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> Layer {
        Layer::from_set(s).expect("valid --set")
    }

    #[test]
    fn llava_preset_is_coins_hyperparameters() {
        let c = resolve(&[], None).expect("default");
        assert_eq!(c.model.preset, "llava-7b");
        let t = &c.train;
        assert_eq!((t.lora_r, t.lora_alpha, t.lora_dropout), (128, 256.0, 0.05));
        assert_eq!((t.learning_rate, t.mm_projector_lr), (2e-4, 2e-5));
        assert_eq!((t.weight_decay, t.warmup_ratio), (0.0, 0.03));
        assert_eq!(t.lr_scheduler, Schedule::Cosine);
        assert_eq!(t.num_train_epochs, 1.0);
        assert_eq!(t.gradient_accumulation_steps, 8);
        assert_eq!(t.model_max_length, 2048);
        assert_eq!(t.expert_num, 8);
        assert_eq!(
            c.runtime,
            RuntimeConfig::AUTO,
            "bf16 on a GPU, f32 on the CPU"
        );
        assert_eq!(c.train_batch_size("gqa"), 6);
        assert_eq!(c.train_batch_size("OCRVQA"), 10);
        assert_eq!(c.train_batch_size("mini-GQA"), 8);
        assert_eq!(c.eval.aspect_for("imagenet"), AspectMode::Crop);
        assert_eq!(c.eval.aspect_for("TextVQA"), AspectMode::Pad);
        assert_eq!(c.eval.aspect_for("mini-ImageNet"), AspectMode::Pad);
    }

    #[test]
    fn coin_paper_preset_is_what_coin_effectively_ran() {
        let c = resolve(&[set("model.preset=coin-paper")], None).expect("coin-paper");
        c.validate().expect("valid");
        assert_eq!(c.model.preset, "coin-paper");
        let t = &c.train;
        assert_eq!(t.lr_scheduler, Schedule::DeepspeedWarmup);
        assert_eq!(
            t.mm_projector_lr, t.learning_rate,
            "one rate for every parameter"
        );
        assert_eq!(t.projector_init, ProjectorInit::AsCoin);
        assert!(t.drop_partial_step);
        // One device accumulates CoIN's global batch: 8 GPUs × 8 × per-GPU batch.
        for (task, global) in [
            ("ScienceQA", 896),
            ("TextVQA", 896),
            ("ImageNet", 1024),
            ("GQA", 384),
            ("VizWiz", 896),
            ("Grounding", 384),
            ("VQAv2", 512),
            ("OCR-VQA", 640),
        ] {
            assert_eq!(
                c.train_batch_size(task) * t.gradient_accumulation_steps,
                global,
                "{task}"
            );
        }
        for (task, tokens, aspect) in [
            ("ScienceQA", 1024, AspectMode::Crop),
            ("TextVQA", 128, AspectMode::Pad),
            ("ImageNet", 1024, AspectMode::Crop),
            ("GQA", 128, AspectMode::Pad),
            ("VizWiz", 128, AspectMode::Pad),
            ("Grounding", 1024, AspectMode::Crop),
            ("VQAv2", 1024, AspectMode::Crop),
            ("ocr_vqa", 128, AspectMode::Pad),
        ] {
            assert_eq!(c.eval.max_new_tokens_for(task), tokens, "{task}");
            assert_eq!(c.eval.aspect_for(task), aspect, "{task}");
        }
        assert_eq!(
            c.eval.prompt_for("sqa "),
            PromptStyle::Text,
            "not ScienceQA"
        );
        assert_eq!(c.eval.prompt_for("science-qa"), PromptStyle::Science);
        assert_eq!(c.eval.prompt_for("GQA"), PromptStyle::Text);
        // Everything else is the llava-7b preset's, which stays the default.
        let d = resolve(&[], None).expect("default");
        assert_eq!(d.model.preset, DEFAULT_PRESET);
        assert_eq!(d.train.lr_scheduler, Schedule::Cosine);
        assert_eq!(d.train.projector_init, ProjectorInit::Continue);
        assert_eq!(d.eval.max_new_tokens_for("ScienceQA"), 128);
        assert_eq!(d.eval.prompt_for("ScienceQA"), PromptStyle::Text);
        let mut same = c.clone();
        same.model.preset = d.model.preset.clone();
        same.train.mm_projector_lr = d.train.mm_projector_lr;
        same.train.lr_scheduler = d.train.lr_scheduler;
        same.train.gradient_accumulation_steps = d.train.gradient_accumulation_steps;
        same.train.projector_init = d.train.projector_init;
        same.train.drop_partial_step = d.train.drop_partial_step;
        same.eval.max_new_tokens_per_task.clear();
        same.eval.prompt_per_task.clear();
        assert_eq!(same, d);
        // The new keys take --set like the others, and refuse other words by name.
        let e = resolve(
            &[
                set("eval.max_new_tokens_per_task.GQA=7"),
                set("eval.prompt_per_task.GQA=science"),
                set("train.lr_scheduler=deepspeed-warmup"),
            ],
            None,
        )
        .expect("set");
        assert_eq!(e.eval.max_new_tokens_for("gqa"), 7);
        assert_eq!(e.eval.prompt_for("gqa"), PromptStyle::Science);
        let msg = resolve(&[set("eval.prompt_per_task.GQA=plain")], None)
            .expect_err("word")
            .to_string();
        assert!(msg.contains("text, science"), "{msg}");
        let msg = resolve(&[set("eval.max_new_tokens_per_task.GQA=0")], None)
            .expect_err("zero")
            .to_string();
        assert!(msg.contains("eval.max_new_tokens_per_task.GQA"), "{msg}");
    }

    #[test]
    fn tiny_preset_differs_and_validates() {
        let c = resolve(&[set("model.preset=tiny")], None).expect("tiny");
        assert_eq!(c.model.preset, "tiny");
        assert!(c.train.lora_r < 128);
        assert!(c.train.learning_rate > 2e-4);
        let d = resolve(&[], Some("tiny")).expect("default tiny");
        assert_eq!(c, d);
    }

    #[test]
    fn layers_apply_in_order() {
        let repo = Layer::from_toml(
            "[model]\nbase = \"models/tiny\"\n[train]\nlora_r = 16\nlearning_rate = 1\n",
            LayerSource::RepoFile("config.toml".into()),
        )
        .expect("toml");
        let file = Layer::from_toml(
            "[train]\nlora_r = 32\n[eval]\nmode = \"strict\"\n",
            LayerSource::File("run.toml".into()),
        )
        .expect("toml");
        let c = resolve(
            &[repo, file, set("train.lora_r=64"), set("train.seed=7")],
            None,
        )
        .expect("resolve");
        assert_eq!(c.model.base, Path::new("models/tiny"));
        assert_eq!(c.train.lora_r, 64);
        assert_eq!(
            c.train.learning_rate, 1.0,
            "an integer is accepted as a float"
        );
        assert_eq!(c.train.seed, 7);
        assert_eq!(c.eval.mode, EvalMode::Strict);
        assert_eq!(c.train.lora_alpha, 256.0, "untouched keys keep the preset");
    }

    #[test]
    fn set_parses_types() {
        let c = resolve(
            &[
                set("train.targets=q_proj,v_proj"),
                set("eval.image_aspect_per_task.mini-GQA=crop"),
                set("model.base=123"),
                set("train.lora_dropout=0.1"),
                set("train.batch_size_per_task.GQA=3"),
            ],
            None,
        )
        .expect("resolve");
        assert_eq!(c.train.targets, vec!["q_proj", "v_proj"]);
        assert_eq!(c.eval.aspect_for("mini_gqa"), AspectMode::Crop);
        assert_eq!(c.model.base, Path::new("123"));
        assert_eq!(c.train.lora_dropout, 0.1);
        assert_eq!(c.train_batch_size("GQA"), 3);
        let c = resolve(&[set(r#"train.targets=["o_proj"]"#)], None).expect("array");
        assert_eq!(c.train.targets, vec!["o_proj"]);
    }

    #[test]
    fn unknown_key_lists_valid_keys() {
        let err = resolve(&[set("train.lora_rank=4")], None).expect_err("unknown");
        let msg = err.to_string();
        assert!(msg.contains("train.lora_rank"), "{msg}");
        assert!(msg.contains("train.lora_r,"), "{msg}");
        assert!(msg.contains("eval.max_new_tokens"), "{msg}");
        let file =
            Layer::from_toml("[trian]\nx = 1\n", LayerSource::File("f.toml".into())).expect("toml");
        let msg = resolve(&[file], None).expect_err("unknown").to_string();
        assert!(msg.contains("'f.toml'") && msg.contains("trian"), "{msg}");
    }

    #[test]
    fn type_and_range_errors_name_the_key() {
        let msg = resolve(&[set("train.lora_r=big")], None)
            .expect_err("type")
            .to_string();
        assert!(
            msg.contains("train.lora_r") && msg.contains("integer"),
            "{msg}"
        );
        let msg = resolve(&[set("train.method=adapter")], None)
            .expect_err("enum")
            .to_string();
        assert!(
            msg.contains("train.method") && msg.contains("moelora"),
            "{msg}"
        );
        let msg = resolve(
            &[set("train.method=moelora"), set("train.expert_num=3")],
            None,
        )
        .expect_err("divisor")
        .to_string();
        assert!(msg.contains("expert_num"), "{msg}");
        let msg = resolve(&[set("model.preset=huge")], None)
            .expect_err("preset")
            .to_string();
        assert!(msg.contains("huge") && msg.contains("tiny"), "{msg}");
        assert!(Layer::from_set("train.lora_r").is_err());
        assert!(Layer::from_set(".x=1").is_err());
        let msg = resolve(&[set("train=1")], None)
            .expect_err("table")
            .to_string();
        assert!(msg.contains("table"), "{msg}");
    }

    #[test]
    fn record_value_round_trips_and_is_canonical() {
        let c = resolve(&[set("model.preset=tiny")], None).expect("tiny");
        let v = c.to_record_value();
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["eval", "model", "runtime", "train"]);
        assert_eq!(RunConfig::from_record_value(&v).expect("back"), c);
        // External commands are recorded when set.
        let ext = resolve(
            &[
                set("model.preset=tiny"),
                set("trainer.command=sh t.sh {task}"),
            ],
            None,
        )
        .expect("external");
        let v = ext.to_record_value();
        assert_eq!(v["trainer"]["command"], "sh t.sh {task}");
        assert!(v.get("evaluator").is_none());
        assert_eq!(RunConfig::from_record_value(&v).expect("back"), ext);
        // The TOML form reads back as a layer too.
        let layer =
            Layer::from_toml(&c.to_toml(), LayerSource::Command("test".into())).expect("toml");
        assert_eq!(resolve(&[layer], None).expect("again"), c);
    }

    #[test]
    fn sources_read_repo_file_and_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        #[allow(clippy::disallowed_methods)]
        {
            std::fs::write(dir.path().join("config.toml"), "[train]\nlora_r = 4\n").expect("write");
            std::fs::write(dir.path().join("run.toml"), "[train]\nseed = 9\n").expect("write");
        }
        let src = ConfigSources::for_repo(
            dir.path(),
            vec![dir.path().join("run.toml")],
            vec!["eval.batch_size=2".into()],
        );
        let c = src.resolve().expect("resolve");
        assert_eq!((c.train.lora_r, c.train.seed, c.eval.batch_size), (4, 9, 2));
        let missing = ConfigSources {
            files: vec![dir.path().join("nope.toml")],
            ..ConfigSources::default()
        };
        assert!(missing
            .resolve()
            .expect_err("missing")
            .to_string()
            .contains("nope.toml"));
        // No repo file is fine.
        let none = ConfigSources::for_repo(&dir.path().join("sub"), vec![], vec![]);
        assert_eq!(none.resolve().expect("defaults").train.lora_r, 128);
    }

    #[test]
    fn template_settings_are_valid_keys_when_uncommented() {
        let template = include_str!("../../templates/config.toml");
        let mut text = String::new();
        let mut n = 0;
        for line in template.lines() {
            let Some(rest) = line.strip_prefix("# ") else {
                continue;
            };
            let is_setting = rest.starts_with('[')
                || rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if is_setting {
                text.push_str(rest);
                text.push('\n');
                n += 1;
            }
        }
        assert!(n > 25, "only {n} settings found");
        let layer = Layer::from_toml(&text, LayerSource::File("template".into())).expect("toml");
        let c = resolve(&[layer], None).expect("the template's settings resolve");
        assert_eq!(c.model.base, Path::new("models/llava-v1.5-7b"));
        assert_eq!(
            c,
            {
                let mut d = RunConfig::preset("llava-7b").expect("preset");
                d.model.base = "models/llava-v1.5-7b".into();
                d
            },
            "the template shows the llava-7b values"
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn parent_base_mismatch_is_refused() {
        use crate::workflow::matrix::tests::Fixture;
        let mut f = Fixture::new();
        let plain = f.commit("A", false, &[]);
        let cfg = resolve(&[], Some("tiny")).expect("tiny");
        let parent = f.repo.read_checkpoint(plain).expect("read");
        check_parent_base(&parent, &cfg).expect("no recorded base passes");
        // A train record whose stored configuration names another base model.
        let file = f.dir.path().join("w.bin");
        std::fs::write(&file, "w").expect("write");
        let other = RunConfig::preset("llava-7b").expect("preset");
        let mut train_extra = BTreeMap::new();
        train_extra.insert("config".to_string(), other.to_record_value());
        let id = f
            .repo
            .commit(&crate::history::CommitRequest {
                paths: vec![file],
                task: "B".into(),
                train_extra,
                ..Default::default()
            })
            .expect("commit")
            .id;
        let parent = f.repo.read_checkpoint(id).expect("read");
        let msg = check_parent_base(&parent, &cfg)
            .expect_err("mismatch")
            .to_string();
        assert!(
            msg.contains("'llava-v1.5-7b'") && msg.contains("'coin-tiny'"),
            "{msg}"
        );
        check_parent_base(&parent, &other).expect("same base passes");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn typed_values_keep_their_record_text() {
        // The strings stored in train records (and hashed into training keys) before the
        // settings were typed: the same settings must give the same text.
        let c = resolve(&[], None).expect("default");
        assert_eq!(
            c.train.keyed_value().expect("json"),
            serde_json::json!({
                "method": "lora", "lora_r": 128, "lora_alpha": 256.0, "lora_dropout": 0.05,
                "expert_num": 8, "learning_rate": 2e-4, "mm_projector_lr": 2e-5,
                "weight_decay": 0.0, "warmup_ratio": 0.03, "lr_scheduler": "cosine",
                "num_train_epochs": 1.0, "per_device_batch_size": 8,
                "batch_size_per_task": {"ScienceQA": 14, "TextVQA": 14, "ImageNet": 16,
                    "GQA": 6, "VizWiz": 14, "Grounding": 6, "VQAv2": 8, "OCR-VQA": 10},
                "gradient_accumulation_steps": 8, "max_grad_norm": 1.0,
                "model_max_length": 2048, "image_aspect_ratio": "pad", "seed": 42,
                "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj"],
            })
        );
        assert_eq!(
            serde_json::to_value(&c.eval).expect("json"),
            serde_json::json!({
                "max_new_tokens": 128, "batch_size": 16, "mode": "auto", "image_aspect": "pad",
                "image_aspect_per_task": {"ScienceQA": "crop", "TextVQA": "pad",
                    "ImageNet": "crop", "GQA": "pad", "VizWiz": "pad", "Grounding": "crop",
                    "VQAv2": "crop", "OCR-VQA": "pad"},
                "max_new_tokens_per_task": {}, "prompt_per_task": {},
            })
        );
        // A later setting at its default is not hashed; another value is.
        assert_eq!(
            serde_json::to_value(&c.train).expect("json")["projector_init"],
            serde_json::json!("continue")
        );
        let c = resolve(
            &[
                set("train.projector_init=as-coin"),
                set("train.drop_partial_step=true"),
            ],
            None,
        )
        .expect("as-coin");
        let keyed = c.train.keyed_value().expect("json");
        assert_eq!(keyed["projector_init"], serde_json::json!("as-coin"));
        assert_eq!(keyed["drop_partial_step"], serde_json::json!(true));
        let c = resolve(
            &[
                set("model.base=models/x"),
                set("train.method=moelora"),
                set("train.lr_scheduler=linear"),
                set("train.image_aspect_ratio=resize"),
                set("eval.mode=compat"),
            ],
            Some("tiny"),
        )
        .expect("tiny");
        let v = c.to_record_value();
        assert_eq!(
            v["model"],
            serde_json::json!({"preset": "tiny", "name": "coin-tiny", "base": "models/x",
                "vision_tower": "", "projector": ""})
        );
        assert_eq!(
            (
                &v["train"]["method"],
                &v["train"]["lr_scheduler"],
                &v["train"]["image_aspect_ratio"],
                &v["eval"]["mode"]
            ),
            (
                &serde_json::json!("moelora"),
                &serde_json::json!("linear"),
                &serde_json::json!("resize"),
                &serde_json::json!("compat")
            )
        );
    }

    #[test]
    fn an_old_record_reads_back() {
        let c = resolve(&[], Some("tiny")).expect("tiny");
        let mut v = c.to_record_value();
        let o = v.as_object_mut().expect("object");
        o.remove("runtime");
        o["model"]
            .as_object_mut()
            .expect("model")
            .insert("dtype".into(), serde_json::json!("f32"));
        let back = RunConfig::from_record_value(&v).expect("old record");
        assert_eq!(back.runtime, RuntimeConfig::AUTO);
        assert_eq!((back.model, back.train), (c.model, c.train));
    }

    #[test]
    fn runtime_layers_apply_in_order() {
        let c = resolve(&[], None).expect("default");
        assert_eq!(c.runtime, RuntimeConfig::AUTO);
        let tiny = resolve(&[], Some("tiny")).expect("tiny");
        assert_eq!(
            tiny.runtime.dtype,
            Setting::Is(Dtype::F32),
            "tiny runs f32 anywhere"
        );

        let repo = Layer::from_toml(
            "[runtime]\nthreads = 2\nshards = 2\nkernels = \"on\"\ndevice = \"cpu\"\n",
            LayerSource::RepoFile("config.toml".into()),
        )
        .expect("toml");
        let c = resolve(std::slice::from_ref(&repo), None).expect("file");
        assert_eq!(c.runtime.threads, Setting::Is(2));
        assert_eq!(c.runtime.shards, Setting::Is(2));
        assert_eq!(c.runtime.kernels, Setting::Is(Kernels::On));
        assert_eq!(c.runtime.device, Setting::Is(DeviceKind::Cpu));
        assert_eq!(c.runtime.dtype, Setting::Auto);

        // The environment beats the repository file …
        let vars = env(&[
            ("COIN_THREADS", "3"),
            ("COIN_TRAIN_SHARDS", "auto"),
            ("COIN_FUSED", "0"),
            ("COIN_DTYPE", "bf16"),
            ("RAYON_NUM_THREADS", "1"),
            ("COIN_DEVICE", ""),
        ]);
        let mut layers = vec![repo.clone()];
        layers.extend(Layer::from_env(&vars).expect("env"));
        let c = resolve(&layers, None).expect("env");
        assert_eq!(c.runtime.threads, Setting::Is(3));
        assert_eq!(c.runtime.shards, Setting::Auto);
        assert_eq!(c.runtime.kernels, Setting::Is(Kernels::Off), "COIN_FUSED=0");
        assert_eq!(c.runtime.dtype, Setting::Is(Dtype::Bf16));
        assert_eq!(
            c.runtime.device,
            Setting::Is(DeviceKind::Cpu),
            "an empty variable is unset"
        );
        // … COIN_KERNELS beats COIN_FUSED …
        let vars = env(&[("COIN_KERNELS", "lora"), ("COIN_FUSED", "1")]);
        let c = resolve(&Layer::from_env(&vars).expect("env"), None).expect("env");
        assert_eq!(c.runtime.kernels, Setting::Is(Kernels::Lora));
        // … and the command line beats the environment.
        let file = Layer::from_toml(
            "[runtime]\nthreads = \"auto\"\nelementwise_threads = 4\n",
            LayerSource::File("run.toml".into()),
        )
        .expect("toml");
        layers.push(file);
        layers.push(set("runtime.shards=5"));
        layers.push(set("runtime.kernels=lora"));
        let c = resolve(&layers, None).expect("cli");
        assert_eq!(c.runtime.threads, Setting::Auto);
        assert_eq!(c.runtime.elementwise_threads, Setting::Is(4));
        assert_eq!(c.runtime.shards, Setting::Is(5));
        assert_eq!(c.runtime.kernels, Setting::Is(Kernels::Lora));

        // The sources put the environment between the repository file and the flags.
        let dir = tempfile::tempdir().expect("tempdir");
        #[allow(clippy::disallowed_methods)]
        std::fs::write(dir.path().join("config.toml"), "[runtime]\nshards = 2\n").expect("write");
        let mut src = ConfigSources::for_repo(dir.path(), vec![], vec![]);
        src.env = env(&[("COIN_TRAIN_SHARDS", "3")]);
        assert_eq!(src.resolve().expect("env").runtime.shards, Setting::Is(3));
        src.sets = vec!["runtime.shards=4".into()];
        assert_eq!(src.resolve().expect("set").runtime.shards, Setting::Is(4));
        src.env.clear();
        src.sets.clear();
        assert_eq!(src.resolve().expect("file").runtime.shards, Setting::Is(2));
    }

    #[test]
    fn runtime_type_errors_name_the_key() {
        let err = |layers: &[Layer]| resolve(layers, None).expect_err("refused").to_string();
        let msg = err(&[set("runtime.shards=0")]);
        assert!(
            msg.contains("runtime.shards") && msg.contains("auto"),
            "{msg}"
        );
        let msg = err(&[set("runtime.threads=many")]);
        assert!(
            msg.contains("runtime.threads") && msg.contains("many"),
            "{msg}"
        );
        let msg = err(&[set("runtime.kernels=fast")]);
        assert!(
            msg.contains("runtime.kernels") && msg.contains("on, off, lora"),
            "{msg}"
        );
        let msg = err(&[set("runtime.device=tpu")]);
        assert!(
            msg.contains("runtime.device") && msg.contains("cuda"),
            "{msg}"
        );
        let msg = err(&[set("runtime.dtype=f64")]);
        assert!(
            msg.contains("runtime.dtype") && msg.contains("bf16"),
            "{msg}"
        );
        let file = Layer::from_toml(
            "[runtime]\nthreads = 1.5\n",
            LayerSource::File("run.toml".into()),
        )
        .expect("toml");
        let msg = err(&[file]);
        assert!(
            msg.contains("'run.toml'") && msg.contains("runtime.threads"),
            "{msg}"
        );
        let msg = err(&Layer::from_env(&env(&[("COIN_TRAIN_SHARDS", "x")])).expect("env"));
        assert!(
            msg.contains("COIN_TRAIN_SHARDS=x") && msg.contains("runtime.shards"),
            "{msg}"
        );
        let msg = Layer::from_env(&env(&[("COIN_FUSED", "yes")]))
            .expect_err("0 or 1")
            .to_string();
        assert!(
            msg.contains("COIN_FUSED") && msg.contains("COIN_KERNELS"),
            "{msg}"
        );
        let msg = err(&[set("runtime.fast=1")]);
        assert!(
            msg.contains("runtime.fast") && msg.contains("runtime.shards"),
            "{msg}"
        );
    }

    #[test]
    fn every_word_setting_refuses_a_typo_by_its_key() {
        // A key whose value is one of a few words must be checked when the layers merge;
        // otherwise serde would refuse it without saying which key.
        let c = RunConfig::preset("llava-7b").expect("preset");
        let table = to_table(&c);
        for key in RunConfig::valid_keys() {
            let mut v = &toml::Value::Table(table.clone());
            for part in key.split('.') {
                v = &v[part];
            }
            if !v.is_str() {
                continue;
            }
            match resolve(&[set(&format!("{key}=no-such-word"))], None) {
                Ok(c) => assert!(
                    [
                        "model.name",
                        "model.base",
                        "model.vision_tower",
                        "model.projector",
                        "trainer.command",
                        "trainer.workdir",
                        "trainer.output",
                        "evaluator.command",
                        "evaluator.workdir",
                        "evaluator.answers",
                    ]
                    .contains(&key.as_str()),
                    "{key} accepted a typo: {c:?}"
                ),
                Err(e) => {
                    let msg = e.to_string();
                    let names_it = msg.contains(&key)
                        || (key == "model.preset" && msg.contains("unknown preset"));
                    assert!(names_it, "{key}: {msg}");
                }
            }
        }
    }

    #[test]
    fn the_old_dtype_key_says_what_to_rename() {
        let file = Layer::from_toml(
            "[model]\ndtype = \"bf16\"\n",
            LayerSource::RepoFile(".coin/config.toml".into()),
        )
        .expect("toml");
        let msg = resolve(&[file], None).expect_err("moved").to_string();
        assert!(
            msg.contains("'.coin/config.toml'")
                && msg.contains("model.dtype")
                && msg.contains("runtime.dtype")
                && msg.contains("[runtime]"),
            "{msg}"
        );
        let msg = resolve(&[set("model.dtype=f32")], None)
            .expect_err("moved")
            .to_string();
        assert!(msg.contains("runtime.dtype"), "{msg}");
    }

    #[test]
    fn runtime_resolves_auto_against_the_machine() {
        let two = Machine {
            threads: 2,
            cuda: false,
        };
        let rt = RuntimeConfig::AUTO.resolve(&two).expect("auto");
        assert_eq!(
            rt,
            Runtime {
                threads: 2,
                elementwise_threads: 1,
                shards: 2,
                kernels: Kernels::build_default(),
                device: DeviceKind::Cpu,
                dtype: Dtype::F32,
                checkpointing: Checkpointing::Auto,
            }
        );
        let big = Machine {
            threads: 16,
            cuda: false,
        };
        let rt = RuntimeConfig::AUTO.resolve(&big).expect("auto");
        assert_eq!((rt.elementwise_threads, rt.shards), (16, 1));
        let rt = RuntimeConfig {
            elementwise_threads: Setting::Is(1),
            ..RuntimeConfig::AUTO
        }
        .resolve(&big)
        .expect("pool off");
        assert_eq!(rt.shards, 16, "one shard per thread with the pool off");
        let gpu = Machine {
            threads: 8,
            cuda: true,
        };
        let rt = RuntimeConfig::AUTO.resolve(&gpu).expect("gpu");
        assert_eq!(
            (rt.device, rt.dtype, rt.shards, rt.kernels),
            (DeviceKind::Cuda, Dtype::Bf16, 1, Kernels::Off)
        );
        let on = RuntimeConfig {
            kernels: Setting::Is(Kernels::On),
            ..RuntimeConfig::AUTO
        };
        assert_eq!(
            on.resolve(&gpu).expect("gpu").kernels,
            Kernels::On,
            "the CUDA kernels when asked for"
        );
        let tiny = RunConfig::preset("tiny").expect("tiny");
        assert_eq!(tiny.runtime.resolve(&gpu).expect("gpu").dtype, Dtype::F32);
        let cpu = RuntimeConfig {
            device: Setting::Is(DeviceKind::Cpu),
            ..RuntimeConfig::AUTO
        };
        assert_eq!(cpu.resolve(&gpu).expect("cpu").device, DeviceKind::Cpu);
        let msg = RuntimeConfig {
            device: Setting::Is(DeviceKind::Cuda),
            ..RuntimeConfig::AUTO
        }
        .resolve(&two)
        .expect_err("no gpu")
        .to_string();
        assert!(msg.contains("runtime.device"), "{msg}");
        let msg = RuntimeConfig {
            shards: Setting::Is(2),
            ..RuntimeConfig::AUTO
        }
        .resolve(&gpu)
        .expect_err("shards on a gpu")
        .to_string();
        assert!(msg.contains("runtime.shards"), "{msg}");
        // Resolved values fed back as settings resolve to themselves on any machine.
        let rt = RuntimeConfig::AUTO.resolve(&two).expect("auto");
        assert_eq!(RuntimeConfig::from(rt).resolve(&big).expect("fixed"), rt);
        let c = RunConfig::preset("tiny").expect("tiny").with_runtime(rt);
        let layer =
            Layer::from_toml(&c.to_toml(), LayerSource::Command("record".into())).expect("toml");
        assert_eq!(resolve(&[layer], None).expect("again"), c);
    }

    #[test]
    fn the_gates_table_is_checked_by_the_hooks_parser() {
        let ok = Layer::from_toml(
            "[gates]\nmax_forgetting = 5\n[train]\nlora_r = 4\n",
            LayerSource::RepoFile("config.toml".into()),
        )
        .expect("valid gates");
        assert!(!ok.table.contains_key(GATES_TABLE));
        assert_eq!(resolve(&[ok], None).expect("resolve").train.lora_r, 4);
        for (bad, says) in [
            ("[gates]\nmax_forgeting = 5\n", "max_forgeting"),
            ("[gates]\nmax_forgetting = -1\n", ">= 0"),
            ("gates = 1\n", "not a table"),
        ] {
            let msg = Layer::from_toml(bad, LayerSource::RepoFile("config.toml".into()))
                .expect_err(bad)
                .to_string();
            assert!(
                msg.contains("'config.toml'") && msg.contains("[gates]") && msg.contains(says),
                "{msg}"
            );
        }
    }
}
