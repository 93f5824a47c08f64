//! The resolved run configuration ([`RunConfig`]): CoIN's hyperparameters as per-model presets,
//! overridden in order by `.coin/config.toml`, `--config FILE.toml` and `--set key=value`.
//!
//! Every layer is merged as a TOML table onto the preset, key by key; a key that is not part of
//! the configuration is refused with the list of valid keys (a typo never silently drops a
//! setting). The resolved configuration is stored canonically in the train record
//! ([`RunConfig::to_record_value`]). Format and presets: docs/config.md.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::WorkflowError;

/// The preset used when no layer names one.
pub const DEFAULT_PRESET: &str = "llava-7b";

/// The names of the built-in presets.
pub const PRESETS: &[&str] = &["tiny", "llava-7b"];

/// Top-level tables of `.coin/config.toml` that are not run settings (read elsewhere:
/// `[gates]` by the hooks, docs/hooks.md).
pub const OTHER_TABLES: &[&str] = &["gates"];

/// Dotted keys whose value is a table with free keys (task names).
const MAP_KEYS: &[&str] = &["train.batch_size_per_task", "eval.image_aspect_per_task"];

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
}

/// The base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The preset the defaults came from (`tiny` or `llava-7b`).
    pub preset: String,
    /// A human name of the base model, recorded in checkpoints and compared with the parent's
    /// before training (e.g. `llava-v1.5-7b`).
    pub name: String,
    /// The base model directory (llava-hf layout, or the LLaMA/Vicuna dir of the CoIN split
    /// setup); relative paths are resolved against the repository root. Empty = not set.
    pub base: String,
    /// CoIN split setup: the CLIP vision tower directory (empty = not used).
    pub vision_tower: String,
    /// CoIN split setup: the stage-1 projector file (`mm_projector.bin`; empty = not used).
    pub projector: String,
    /// Weight dtype on the GPU: `bf16` (CoIN) or `f32`. The CPU always runs f32.
    pub dtype: String,
}

/// Training hyperparameters, named as in CoIN's scripts (LLaVA's `train.py` flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Adapter kind: `lora` or `moelora`.
    pub method: String,
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
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Linear warm-up as a fraction of the optimiser steps.
    pub warmup_ratio: f64,
    /// Learning-rate schedule after warm-up: `cosine`, `linear` or `constant`.
    pub lr_scheduler: String,
    /// Epochs over each task's training set.
    pub num_train_epochs: f64,
    /// Samples per forward pass (CoIN: per GPU).
    pub per_device_batch_size: usize,
    /// Per-task batch sizes, overriding `per_device_batch_size` (CoIN's scripts differ per task).
    pub batch_size_per_task: BTreeMap<String, usize>,
    /// Forward passes per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Gradient clipping by global norm (0 = off).
    pub max_grad_norm: f64,
    /// Longest tokenized sample; longer samples are truncated.
    pub model_max_length: usize,
    /// Image preprocessing for training: `pad`, `crop` or `resize`.
    pub image_aspect_ratio: String,
    /// Seed of initialisation, dropout and data order.
    pub seed: u64,
    /// The linear layers that get adapters (module name suffixes).
    pub targets: Vec<String>,
}

/// Eval settings: greedy decoding and scoring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Stop generating after this many tokens.
    pub max_new_tokens: usize,
    /// Samples per generation batch.
    pub batch_size: usize,
    /// Scoring mode: `auto` (the task's default: compat for CoIN's eight, strict otherwise),
    /// `compat` or `strict`.
    pub mode: String,
    /// Image preprocessing when a task has no entry in `image_aspect_per_task`.
    pub image_aspect: String,
    /// Image preprocessing per task (CoIN's eval scripts pad for some tasks and center-crop
    /// for others). Keys match task names ignoring case, `-`, `_` and spaces.
    pub image_aspect_per_task: BTreeMap<String, String>,
}

/// The seven linear layers of a LLaMA block (CoIN's `find_all_linear_names`).
pub const ALL_LLM_LINEARS: &[&str] = &crate::ml::train::params::DEFAULT_TARGETS;

fn task_key(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

impl RunConfig {
    /// A built-in preset by name (`tiny`, `llava-7b`).
    pub fn preset(name: &str) -> Result<RunConfig, WorkflowError> {
        match name {
            "llava-7b" => Ok(Self::llava_7b()),
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
        let aspect: BTreeMap<String, String> = [
            ("ScienceQA", "crop"),
            ("TextVQA", "pad"),
            ("ImageNet", "crop"),
            ("GQA", "pad"),
            ("VizWiz", "pad"),
            ("Grounding", "crop"),
            ("VQAv2", "crop"),
            ("OCR-VQA", "pad"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        RunConfig {
            model: ModelConfig {
                preset: "llava-7b".into(),
                name: "llava-v1.5-7b".into(),
                base: String::new(),
                vision_tower: String::new(),
                projector: String::new(),
                dtype: "bf16".into(),
            },
            train: TrainConfig {
                method: "lora".into(),
                lora_r: 128,
                lora_alpha: 256.0,
                lora_dropout: 0.05,
                expert_num: 8,
                learning_rate: 2e-4,
                mm_projector_lr: 2e-5,
                weight_decay: 0.0,
                warmup_ratio: 0.03,
                lr_scheduler: "cosine".into(),
                num_train_epochs: 1.0,
                per_device_batch_size: 8,
                batch_size_per_task: batch,
                gradient_accumulation_steps: 8,
                max_grad_norm: 1.0,
                model_max_length: 2048,
                image_aspect_ratio: "pad".into(),
                seed: 42,
                targets: ALL_LLM_LINEARS.iter().map(|s| s.to_string()).collect(),
            },
            eval: EvalConfig {
                max_new_tokens: 128,
                batch_size: 16,
                mode: "auto".into(),
                image_aspect: "pad".into(),
                image_aspect_per_task: aspect,
            },
        }
    }

    /// The demo preset for the tiny random model (`coin model init --tiny`): small rank, a
    /// higher learning rate and several epochs so that a few hundred samples move the model.
    fn tiny() -> RunConfig {
        RunConfig {
            model: ModelConfig {
                preset: "tiny".into(),
                name: "coin-tiny".into(),
                base: String::new(),
                vision_tower: String::new(),
                projector: String::new(),
                dtype: "f32".into(),
            },
            train: TrainConfig {
                method: "lora".into(),
                lora_r: 8,
                lora_alpha: 16.0,
                lora_dropout: 0.05,
                expert_num: 4,
                learning_rate: 2e-3,
                mm_projector_lr: 2e-3,
                weight_decay: 0.0,
                warmup_ratio: 0.03,
                lr_scheduler: "cosine".into(),
                num_train_epochs: 3.0,
                per_device_batch_size: 16,
                batch_size_per_task: BTreeMap::new(),
                gradient_accumulation_steps: 1,
                max_grad_norm: 1.0,
                model_max_length: 256,
                image_aspect_ratio: "pad".into(),
                seed: 0,
                targets: ALL_LLM_LINEARS.iter().map(|s| s.to_string()).collect(),
            },
            eval: EvalConfig {
                // Grounding answers ("[0.25, 0.50, 0.50, 0.75]") are the longest in CoIN-mini.
                max_new_tokens: 32,
                batch_size: 16,
                mode: "auto".into(),
                image_aspect: "pad".into(),
                image_aspect_per_task: BTreeMap::new(),
            },
        }
    }

    /// Check the values that have a closed set of spellings or a range.
    pub fn validate(&self) -> Result<(), WorkflowError> {
        let bad = |key: &str, msg: String| Err(WorkflowError::Config(format!("{key}: {msg}")));
        let one_of = |key: &str, v: &str, allowed: &[&str]| {
            if allowed.contains(&v) {
                Ok(())
            } else {
                bad(key, format!("'{v}' is not one of {}", allowed.join(", ")))
            }
        };
        one_of("model.preset", &self.model.preset, PRESETS)?;
        one_of("model.dtype", &self.model.dtype, &["bf16", "f32"])?;
        let t = &self.train;
        one_of("train.method", &t.method, &["lora", "moelora"])?;
        one_of(
            "train.lr_scheduler",
            &t.lr_scheduler,
            &["cosine", "linear", "constant"],
        )?;
        const ASPECTS: &[&str] = &["pad", "crop", "resize"];
        one_of("train.image_aspect_ratio", &t.image_aspect_ratio, ASPECTS)?;
        if t.lora_r == 0 {
            return bad("train.lora_r", "must be at least 1".into());
        }
        if t.method == "moelora" && (t.expert_num == 0 || !t.lora_r.is_multiple_of(t.expert_num)) {
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
        if t.targets.is_empty() {
            return bad("train.targets", "name at least one linear layer".into());
        }
        one_of("eval.mode", &self.eval.mode, &["auto", "compat", "strict"])?;
        one_of("eval.image_aspect", &self.eval.image_aspect, ASPECTS)?;
        for (task, v) in &self.eval.image_aspect_per_task {
            one_of(&format!("eval.image_aspect_per_task.{task}"), v, ASPECTS)?;
        }
        Ok(())
    }

    /// The per-device batch size for `task` (its `batch_size_per_task` entry, or the default).
    pub fn train_batch_size(&self, task: &str) -> usize {
        let key = task_key(task);
        self.train
            .batch_size_per_task
            .iter()
            .find(|(k, _)| task_key(k) == key)
            .map_or(self.train.per_device_batch_size, |(_, v)| *v)
    }

    /// The resolved configuration as canonical JSON (keys sorted), as stored in the train
    /// record under `config`.
    pub fn to_record_value(&self) -> serde_json::Value {
        let text = crate::history::records::to_canonical_json(self)
            .expect("RunConfig always serialises to JSON");
        serde_json::from_str(&text).expect("canonical JSON parses back")
    }

    /// Read a configuration back from a train record's `config` value.
    pub fn from_record_value(v: &serde_json::Value) -> Result<RunConfig, WorkflowError> {
        serde_json::from_value(v.clone()).map_err(|e| {
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

fn resolve_opt(root: &Path, p: &str) -> Option<PathBuf> {
    if p.trim().is_empty() {
        None
    } else {
        let p = Path::new(p);
        Some(if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        })
    }
}

impl EvalConfig {
    /// The image preprocessing for `task`: its `image_aspect_per_task` entry (names compared
    /// ignoring case, `-`, `_`, spaces), else `image_aspect`.
    pub fn aspect_for(&self, task: &str) -> &str {
        let key = task_key(task);
        self.image_aspect_per_task
            .iter()
            .find(|(k, _)| task_key(k) == key)
            .map_or(self.image_aspect.as_str(), |(_, v)| v.as_str())
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
    /// Set by a command (e.g. `coin demo` choosing the tiny preset).
    Command(String),
}

impl fmt::Display for LayerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSource::RepoFile(p) | LayerSource::File(p) => write!(f, "'{}'", p.display()),
            LayerSource::Set(s) => write!(f, "--set {s}"),
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
        let text = std::fs::read_to_string(path).map_err(|e| {
            WorkflowError::Config(format!(
                "could not read the configuration file '{}': {e}",
                path.display()
            ))
        })?;
        let source = if repo_file {
            LayerSource::RepoFile(path.to_path_buf())
        } else {
            LayerSource::File(path.to_path_buf())
        };
        Self::from_toml(&text, source)
    }

    /// Parse TOML text as a layer.
    pub fn from_toml(text: &str, source: LayerSource) -> Result<Layer, WorkflowError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            WorkflowError::Config(format!("{source} is not valid TOML: {}", e.message()))
        })?;
        // Tables that other parts of coin read from the same file (the gates of the hooks).
        for other in OTHER_TABLES {
            table.remove(*other);
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
        let value = value.trim();
        let parts: Vec<&str> = key.split('.').collect();
        if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
            return Err(WorkflowError::Config(format!(
                "--set {assignment}: '{key}' is not a dotted key such as train.lora_r"
            )));
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut leaf = parsed;
        for p in parts.iter().rev() {
            let mut t = toml::Table::new();
            t.insert((*p).to_string(), leaf);
            leaf = toml::Value::Table(t);
        }
        let toml::Value::Table(table) = leaf else {
            unreachable!("the loop wraps the value in at least one table")
        };
        Ok(Layer {
            source: LayerSource::Set(assignment.to_string()),
            table,
        })
    }

    /// The preset this layer selects (`model.preset`), if any.
    fn preset(&self) -> Option<&str> {
        self.table
            .get("model")
            .and_then(|m| m.get("preset"))
            .and_then(toml::Value::as_str)
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
        match base.get_mut(k) {
            None if is_map => {
                base.insert(k.clone(), v.clone());
            }
            None => {
                return Err(WorkflowError::UnknownKey {
                    key,
                    layer: source.to_string(),
                    valid: RunConfig::valid_keys(),
                })
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
                        if matches!(source, LayerSource::Set(_)) =>
                    {
                        let raw = match source {
                            LayerSource::Set(s) => s
                                .split_once('=')
                                .map(|(_, v)| v.trim().to_string())
                                .unwrap_or_default(),
                            _ => unreachable!("guarded by the match"),
                        };
                        toml::Value::String(raw)
                    }
                    (toml::Value::Array(_), toml::Value::String(s))
                        if matches!(source, LayerSource::Set(_)) =>
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
        .map_err(|e: toml::de::Error| WorkflowError::Config(e.message().to_string()))?;
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
            default_preset: None,
        }
    }

    /// Read every layer and resolve.
    pub fn resolve(&self) -> Result<RunConfig, WorkflowError> {
        let mut layers = Vec::new();
        if let Some(p) = &self.repo_file {
            if p.is_file() {
                layers.push(Layer::from_file(p, true)?);
            }
        }
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
            parent: super::short(parent.id),
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
        assert_eq!(t.lr_scheduler, "cosine");
        assert_eq!(t.num_train_epochs, 1.0);
        assert_eq!(t.gradient_accumulation_steps, 8);
        assert_eq!(t.model_max_length, 2048);
        assert_eq!(t.expert_num, 8);
        assert_eq!(c.model.dtype, "bf16");
        assert_eq!(c.train_batch_size("gqa"), 6);
        assert_eq!(c.train_batch_size("OCRVQA"), 10);
        assert_eq!(c.train_batch_size("mini-GQA"), 8);
        assert_eq!(c.eval.aspect_for("imagenet"), "crop");
        assert_eq!(c.eval.aspect_for("TextVQA"), "pad");
        assert_eq!(c.eval.aspect_for("mini-ImageNet"), "pad");
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
        assert_eq!(c.model.base, "models/tiny");
        assert_eq!(c.train.lora_r, 64);
        assert_eq!(
            c.train.learning_rate, 1.0,
            "an integer is accepted as a float"
        );
        assert_eq!(c.train.seed, 7);
        assert_eq!(c.eval.mode, "strict");
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
        assert_eq!(c.eval.aspect_for("mini_gqa"), "crop");
        assert_eq!(c.model.base, "123");
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
        assert_eq!(keys, ["eval", "model", "train"]);
        assert_eq!(RunConfig::from_record_value(&v).expect("back"), c);
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
        assert_eq!(c.model.base, "models/llava-v1.5-7b");
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
}
