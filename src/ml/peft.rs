//! PEFT adapter directories for inference and for further training: LoRA (`peft_type` `LORA`)
//! and CoIN's MoELoRA (`MOE_LORA_CoIN`), `adapter_config.json` + `adapter_model.safetensors`
//! (or the legacy / CoIN `adapter_model.bin` torch pickle), plus the trained projector in
//! `non_lora_trainables.{safetensors,bin}` beside them when present (LLaVA/CoIN).
//!
//! Keys follow the in-memory module names of whatever trained them; all of these map onto our
//! canonical linear names ([`super::llava::Llava::linears_mut`]):
//! `base_model.model.model.language_model.layers.N…` (transformers ≥ 4.52),
//! `base_model.model.language_model.model.layers.N…` (older llava-hf),
//! `base_model.model.model.layers.N…` (CoIN/LLaVA), plus vision-tower, projector and lm_head
//! modules; the adapter name (`.default`) may be present or stripped.
//!
//! Per module: LoRA `….lora_A.weight` (r × in), `….lora_B.weight` (out × r), scale
//! `lora_alpha / r` (rsLoRA `/ √r`); MoELoRA with E = `expert_num` experts
//! `….lora_A.loraA.<e>.weight` (r/E × in), `….lora_B.loraB.<e>.weight` (out × r/E),
//! `….lora_router.weight` (E × in), scale `lora_alpha / r` with the total r (CoIN). CoIN's expert
//! modules register their weight twice (`loraA.<e>.weight` and `loraA.<e>.mlp.weight`, the same
//! tensor); both spellings are read and must agree. The experts are stacked into one
//! [`MoeLora`] (`a` = the A_e one under another, `b` = the B_e side by side).
//!
//! Options we do not implement (DoRA, fan_in_fan_out, biases, modules_to_save, other tuners) are
//! refused with the key that caused it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::config::read_json;
use super::error::escape_name;
use super::linear::{Adapter, Linear, Lora, MoeLora};
use super::llava::Llava;
use super::load::{check_inside, read_tensor_file};
use super::train::params::AdapterKind;
use super::{MlError, Result};

/// `peft_type` of plain LoRA.
pub const PEFT_TYPE_LORA: &str = "LORA";
/// `peft_type` of CoIN's MoELoRA (its vendored PEFT fork).
pub const PEFT_TYPE_MOELORA: &str = "MOE_LORA_CoIN";

/// PEFT's default rank when `adapter_config.json` has no `r`.
pub const DEFAULT_R: usize = 8;

/// `target_modules`: module names (matched as a suffix of a module path) or one regular
/// expression (matched against the whole path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names, e.g. `["q_proj", "v_proj"]`.
    Names(Vec<String>),
    /// A regular expression, e.g. `.*language_model.*\.(q_proj|v_proj)`.
    Regex(String),
}

/// Deserialize a field that is present (even as `null`) into `Some`.
fn present<'de, T, D>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    T::deserialize(d).map(Some)
}

/// A serde mirror of PEFT's `adapter_config.json`, LoRA's fields and CoIN's MoELoRA ones
/// (`CoINMOELoraConfig`: `expert_num`, `task_embedding_dim`), read by [`PeftAdapter::load`] and
/// written by [`crate::ml::train::save`]. Each field is `None` when the file lacks it; the
/// nullable ones are `Some(None)` for a `null`; unknown fields are kept in `other`. So a file
/// read and written back keeps every key and value (numbers may change spelling, `8` → `8.0`
/// for `lora_alpha`), and the defaults PEFT applies to absent fields are the accessors'
/// ([`AdapterConfig::r`], [`AdapterConfig::peft_type`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `LORA` or `MOE_LORA_CoIN` (absent: LORA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_type: Option<String>,
    /// `CAUSAL_LM`, `CAUSAL_LM_CoIN`, or null.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub task_type: Option<Option<String>>,
    /// Where the base model came from.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_model_name_or_path: Option<Option<String>>,
    /// The rank (for MoELoRA, of all experts together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<usize>,
    /// α of the scale α/r.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapter input during training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// Which modules carry adapters.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub target_modules: Option<Option<TargetModules>>,
    /// Bias training: only `none` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    /// Transposed base weights (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_in_fan_out: Option<bool>,
    /// Scale α/√r instead of α/r.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_rslora: Option<bool>,
    /// DoRA (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_dora: Option<bool>,
    /// Fully trained modules saved beside the adapter (not supported unless empty).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub modules_to_save: Option<Option<Vec<String>>>,
    /// Per-module ranks (module-name suffix → r).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_pattern: Option<BTreeMap<String, usize>>,
    /// Per-module α (module-name suffix → α).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_pattern: Option<BTreeMap<String, f64>>,
    /// Layer indices to adapt (an int, a list, or null).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub layers_to_transform: Option<Value>,
    /// The layer module name pattern (a string, a list, or null).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub layers_pattern: Option<Value>,
    /// How PEFT initialised the weights (a bool or a method name).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub init_lora_weights: Option<Value>,
    /// Saved for inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_mode: Option<bool>,
    /// The base model revision.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub revision: Option<Option<String>>,
    /// MoELoRA: number of experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_num: Option<usize>,
    /// MoELoRA: CoIN's unused task embedding width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_embedding_dim: Option<usize>,
    /// A bias on lora_B (newer PEFT; not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_bias: Option<bool>,
    /// Every other field, as found.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl AdapterConfig {
    /// Parse the JSON of `adapter_config.json` (`path` names it in errors; a field of the wrong
    /// type is named).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let parse_error = |message: String| MlError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let map = v
            .as_object()
            .ok_or_else(|| parse_error("not a JSON object".into()))?;
        serde_json::from_value(v.clone()).map_err(|e| {
            // Name the field: the first key that fails on its own.
            let culprit = map.iter().find_map(|(k, x)| {
                let one = Value::Object([(k.clone(), x.clone())].into_iter().collect());
                serde_json::from_value::<AdapterConfig>(one)
                    .err()
                    .map(|e| format!("'{}': {e}", escape_name(k)))
            });
            parse_error(culprit.unwrap_or_else(|| e.to_string()))
        })
    }

    /// Read `adapter_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::from_json(&read_json(path)?, path)
    }

    /// `peft_type`, PEFT's default `LORA` when absent.
    pub fn peft_type(&self) -> &str {
        self.peft_type.as_deref().unwrap_or(PEFT_TYPE_LORA)
    }

    /// `r`, PEFT's default 8 when absent.
    pub fn r(&self) -> usize {
        self.r.unwrap_or(DEFAULT_R)
    }

    /// The rank of one module: its `rank_pattern` entry (a dotted suffix of any of `names`,
    /// the module's spellings) or `r`.
    pub fn r_of(&self, names: &[&str]) -> usize {
        names
            .iter()
            .find_map(|n| pattern_value(self.rank_pattern.as_ref(), n))
            .unwrap_or(self.r())
    }

    /// The α of one module: its `alpha_pattern` entry or `lora_alpha` (0 when absent; see
    /// [`AdapterConfig::check`]).
    pub fn alpha_of(&self, names: &[&str]) -> f64 {
        names
            .iter()
            .find_map(|n| pattern_value(self.alpha_pattern.as_ref(), n))
            .unwrap_or(self.lora_alpha.unwrap_or_default())
    }

    /// The adapter kind, with every field coin interprets checked: the errors name the file and
    /// the field.
    pub fn check(&self, path: &Path) -> Result<AdapterKind> {
        let bad = |message: String| MlError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let kind = match self.peft_type() {
            PEFT_TYPE_LORA => AdapterKind::Lora,
            PEFT_TYPE_MOELORA => {
                let experts = self.expert_num.filter(|&e| e > 0).ok_or_else(|| {
                    bad(format!(
                        "peft_type {PEFT_TYPE_MOELORA} needs a positive integer 'expert_num'"
                    ))
                })?;
                AdapterKind::MoeLora { experts }
            }
            other => {
                return Err(unsupported(
                    path,
                    format!(
                        "peft_type \"{}\" (only {PEFT_TYPE_LORA} and {PEFT_TYPE_MOELORA})",
                        escape_name(other)
                    ),
                ))
            }
        };
        for (key, on) in [
            ("use_dora", self.use_dora),
            ("fan_in_fan_out", self.fan_in_fan_out),
            ("lora_bias", self.lora_bias),
        ] {
            if on == Some(true) {
                return Err(unsupported(path, format!("{key} = true")));
            }
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(unsupported(
                path,
                format!("bias = \"{}\" (only none)", escape_name(b)),
            ));
        }
        if self
            .modules_to_save
            .as_ref()
            .is_some_and(|m| m.as_ref().is_some_and(|m| !m.is_empty()))
        {
            return Err(unsupported(path, "modules_to_save is not empty".into()));
        }
        if self.r() == 0 {
            return Err(bad("'r' is 0; an adapter needs a rank of at least 1".into()));
        }
        let alpha = self
            .lora_alpha
            .ok_or_else(|| bad("no numeric 'lora_alpha'".into()))?;
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(bad(format!(
                "'lora_alpha' is {alpha}; the scale α/r needs a positive α"
            )));
        }
        if let Some(d) = self.lora_dropout {
            if !(0.0..1.0).contains(&d) {
                return Err(bad(format!(
                    "'lora_dropout' is {d}; a dropout probability is in [0, 1)"
                )));
            }
        }
        for (k, &a) in self.alpha_pattern.iter().flatten() {
            if !(a.is_finite() && a > 0.0) {
                return Err(bad(format!(
                    "'alpha_pattern' gives '{}' the α {a}; it must be positive",
                    escape_name(k)
                )));
            }
        }
        for (k, &r) in self.rank_pattern.iter().flatten() {
            if r == 0 {
                return Err(bad(format!(
                    "'rank_pattern' gives '{}' the rank 0",
                    escape_name(k)
                )));
            }
        }
        Ok(kind)
    }
}

/// The value of the first pattern key that is `module` or a dotted suffix of it.
fn pattern_value<T: Copy>(pattern: Option<&BTreeMap<String, T>>, module: &str) -> Option<T> {
    pattern?
        .iter()
        .find(|(p, _)| module == p.as_str() || module.ends_with(&format!(".{p}")))
        .map(|(_, v)| *v)
}

/// A loaded adapter directory.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    /// The adapter directory.
    pub dir: PathBuf,
    /// The adapter_config.json.
    pub config: AdapterConfig,
    /// LoRA or MoELoRA (with its expert count).
    pub kind: AdapterKind,
    /// `lora_alpha` of the config.
    pub alpha: f64,
    /// The weights file read (`adapter_model.safetensors` or `.bin`).
    pub weights_file: PathBuf,
    /// Canonical linear name → adapter.
    pub layers: BTreeMap<String, Adapter>,
    /// Canonical linear name → the module's key prefix as stored in the weights file (for
    /// messages).
    pub module_keys: BTreeMap<String, String>,
    /// The projector from `non_lora_trainables.*`, when the directory has one.
    pub projector: Option<ProjectorWeights>,
}

/// A trained projector stored beside an adapter (`non_lora_trainables.{safetensors,bin}`).
#[derive(Clone, Debug)]
pub struct ProjectorWeights {
    /// The file it came from.
    pub file: PathBuf,
    /// `multi_modal_projector.linear_{1,2}.{weight,bias}` → tensor.
    pub tensors: BTreeMap<String, Tensor>,
}

fn unsupported(path: &Path, message: String) -> MlError {
    MlError::Unsupported {
        path: path.to_path_buf(),
        message,
    }
}

/// Map a PEFT module path (without `base_model.model.`) to our canonical linear name.
pub fn canonical_module(module: &str) -> Option<String> {
    let lm_prefixes = ["model.language_model.", "language_model.model.", "model."];
    let vis_prefixes = [
        "model.vision_tower.vision_model.",
        "vision_tower.vision_model.",
        "model.vision_tower.vision_tower.vision_model.",
        "model.vision_tower.",
        "vision_tower.",
    ];
    for p in vis_prefixes {
        if let Some(rest) = module.strip_prefix(p) {
            if rest.starts_with("encoder.layers.") {
                return Some(format!("vision_tower.{rest}"));
            }
        }
    }
    for (from, to) in [
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("multi_modal_projector.", "multi_modal_projector."),
    ] {
        if let Some(rest) = module.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    match module {
        "model.mm_projector.0" => return Some("multi_modal_projector.linear_1".into()),
        "model.mm_projector.2" => return Some("multi_modal_projector.linear_2".into()),
        "lm_head" | "language_model.lm_head" => return Some("lm_head".into()),
        _ => {}
    }
    for p in lm_prefixes {
        if let Some(rest) = module.strip_prefix(p) {
            if rest.starts_with("layers.") {
                return Some(format!("language_model.{rest}"));
            }
        }
    }
    None
}

/// Which adapter tensor a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    LoraA,
    LoraB,
    ExpertA(usize),
    ExpertB(usize),
    Router,
}

/// Split a key (without `base_model.model.` and `.default`) into module path and part.
fn split_key(k: &str) -> Option<(&str, Part)> {
    if let Some(m) = k.strip_suffix(".lora_A.weight") {
        return Some((m, Part::LoraA));
    }
    if let Some(m) = k.strip_suffix(".lora_B.weight") {
        return Some((m, Part::LoraB));
    }
    if let Some(m) = k.strip_suffix(".lora_router.weight") {
        return Some((m, Part::Router));
    }
    for (mid, is_a) in [(".lora_A.loraA.", true), (".lora_B.loraB.", false)] {
        if let Some(i) = k.find(mid) {
            let rest = &k[i + mid.len()..];
            let e = rest
                .strip_suffix(".mlp.weight")
                .or_else(|| rest.strip_suffix(".weight"))?
                .parse::<usize>()
                .ok()?;
            let part = if is_a {
                Part::ExpertA(e)
            } else {
                Part::ExpertB(e)
            };
            return Some((&k[..i], part));
        }
    }
    None
}

/// The tensors of one adapted module as read.
#[derive(Default)]
struct ModuleTensors {
    key: String,
    a: Option<Tensor>,
    b: Option<Tensor>,
    experts_a: BTreeMap<usize, Tensor>,
    experts_b: BTreeMap<usize, Tensor>,
    router: Option<Tensor>,
}

fn same_values(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    Ok(d == 0.0)
}

/// The files of an adapter directory: the first of `names` that exists.
fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.exists())
}

impl PeftAdapter {
    /// Read an adapter directory onto `device` in `dtype` (keep f32 for training).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let config = AdapterConfig::read(&cfg_path)?;
        let kind = config.check(&cfg_path)?;
        let peft_type = config.peft_type().to_string();
        let alpha = config.lora_alpha.unwrap_or_default();
        let rslora = config.use_rslora == Some(true);

        let weights = first_existing(dir, &["adapter_model.safetensors", "adapter_model.bin"])
            .ok_or_else(|| MlError::NotAModel {
                path: dir.to_path_buf(),
                message: "no adapter_model.safetensors or adapter_model.bin".into(),
            })?;
        let src = format!("'{}'", weights.display());
        let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
        check_inside(dir, &weights)?;
        for (key, t) in read_tensor_file(&weights)? {
            if key.chars().any(char::is_control) {
                return Err(unsupported(
                    &weights,
                    format!(
                        "tensor '{}' has control characters in its name",
                        escape_name(&key)
                    ),
                ));
            }
            let k = key.strip_prefix("base_model.model.").unwrap_or(&key);
            let k = k.replace(".default.", ".");
            let (module, part) = split_key(&k).ok_or_else(|| {
                unsupported(
                    &weights,
                    format!(
                        "tensor '{}' is not a LoRA or MoELoRA weight (other tuners are not supported)",
                        escape_name(&key)
                    ),
                )
            })?;
            let is_moe_part = matches!(part, Part::ExpertA(_) | Part::ExpertB(_) | Part::Router);
            if is_moe_part != matches!(kind, AdapterKind::MoeLora { .. }) {
                return Err(unsupported(
                    &weights,
                    format!(
                        "tensor '{}' is a {} tensor but adapter_config.json says peft_type \"{}\"",
                        escape_name(&key),
                        if is_moe_part { "MoELoRA" } else { "plain LoRA" },
                        escape_name(&peft_type)
                    ),
                ));
            }
            let name = canonical_module(module).ok_or_else(|| {
                unsupported(
                    &weights,
                    format!(
                        "tensor '{}': unknown module '{}'",
                        escape_name(&key),
                        escape_name(module)
                    ),
                )
            })?;
            let t = t.to_dtype(dtype)?.to_device(device)?;
            let entry = modules.entry(name).or_default();
            if entry.key.is_empty() {
                entry.key = if key.starts_with("base_model.model.") {
                    format!("base_model.model.{module}")
                } else {
                    module.to_string()
                };
            }
            let slot = match part {
                Part::LoraA => &mut entry.a,
                Part::LoraB => &mut entry.b,
                Part::Router => &mut entry.router,
                Part::ExpertA(e) | Part::ExpertB(e) => {
                    let map = if matches!(part, Part::ExpertA(_)) {
                        &mut entry.experts_a
                    } else {
                        &mut entry.experts_b
                    };
                    if let Some(prev) = map.get(&e) {
                        // CoIN stores every expert weight twice (`.weight`, `.mlp.weight`).
                        if !same_values(prev, &t)? {
                            return Err(unsupported(
                                &weights,
                                format!(
                                    "tensor '{}' differs from the other spelling of the same expert weight",
                                    escape_name(&key)
                                ),
                            ));
                        }
                        continue;
                    }
                    map.insert(e, t);
                    continue;
                }
            };
            *slot = Some(t);
        }

        let mut layers = BTreeMap::new();
        let mut module_keys = BTreeMap::new();
        for (name, m) in modules {
            let adapter = match kind {
                AdapterKind::Lora => {
                    let a = m.a.ok_or_else(|| MlError::MissingTensor {
                        name: format!("{}.lora_A.weight", m.key),
                        source_desc: src.clone(),
                    })?;
                    let b = m.b.ok_or_else(|| MlError::MissingTensor {
                        name: format!("{}.lora_B.weight", m.key),
                        source_desc: src.clone(),
                    })?;
                    let (r, in_f) = a.dims2()?;
                    let (out_f, rb) = b.dims2()?;
                    let path = m.key.strip_prefix("base_model.model.").unwrap_or(&m.key);
                    let config_r = config.r_of(&[path, &name]);
                    if r != config_r {
                        return Err(MlError::ShapeMismatch {
                            name: format!("{}.lora_A.weight", m.key),
                            source_desc: format!(
                                "{src} (adapter_config.json: r = {config_r} for this module)"
                            ),
                            expected: vec![config_r, in_f],
                            actual: a.dims().to_vec(),
                        });
                    }
                    if r != rb {
                        return Err(MlError::ShapeMismatch {
                            name: format!("{}.lora_B.weight", m.key),
                            source_desc: src.clone(),
                            expected: vec![out_f, r],
                            actual: b.dims().to_vec(),
                        });
                    }
                    let a_alpha = config.alpha_of(&[&name, path]);
                    let scale = if rslora {
                        a_alpha / (r as f64).sqrt()
                    } else {
                        a_alpha / r as f64
                    };
                    Adapter::Lora(Lora {
                        a,
                        b,
                        scale,
                        dropout: None,
                    })
                }
                AdapterKind::MoeLora { experts } => {
                    let path = m.key.strip_prefix("base_model.model.").unwrap_or(&m.key);
                    let config_r = config.r_of(&[path, &name]);
                    moe_from_parts(&m, experts, alpha, Some(config_r), &src)?
                }
            };
            module_keys.insert(name.clone(), m.key);
            layers.insert(name, adapter);
        }
        if layers.is_empty() {
            return Err(MlError::NotAModel {
                path: weights.clone(),
                message: "the adapter file holds no adapter tensor".into(),
            });
        }
        let projector = ProjectorWeights::find(dir, device, dtype)?;
        Ok(PeftAdapter {
            dir: dir.to_path_buf(),
            config,
            kind,
            alpha,
            weights_file: weights,
            layers,
            module_keys,
            projector,
        })
    }

    /// The total rank r of the adapter (the same for every module, or the config's `r`).
    pub fn rank(&self) -> Option<usize> {
        let mut ranks = self.layers.values().map(Adapter::rank);
        let first = ranks.next()?;
        ranks.all(|r| r == first).then_some(first)
    }

    /// Attach to the model's linears (replacing any adapter) and, when the directory has a
    /// trained projector, replace the model's projector weights with it (CoIN chaining
    /// semantics). Adapters on vision layers past the selected feature layer are skipped (those
    /// layers never run). Returns how many adapters were attached. On error the model may be
    /// partly changed: use [`PeftAdapter::with_attached`] to have it restored.
    pub fn attach(&self, model: &mut Llava) -> Result<usize> {
        let vision_layers = model.vision.layers.len();
        let mut linears: BTreeMap<String, &mut Linear> = model.linears_mut().into_iter().collect();
        let mut n = 0;
        for (name, adapter) in &self.layers {
            match linears.get_mut(name) {
                Some(lin) => {
                    let (out_f, in_f) = lin.weight.dims2()?;
                    let (a_in, b_out) = adapter.in_out()?;
                    let router_in = match adapter {
                        Adapter::MoeLora(m) => m.router.dim(1)?,
                        _ => in_f,
                    };
                    if a_in != in_f || b_out != out_f || router_in != in_f {
                        let key = self.module_keys.get(name).unwrap_or(name);
                        return Err(MlError::ShapeMismatch {
                            name: format!("{key}.lora_A/B (out × in)"),
                            source_desc: format!("'{}'", self.weights_file.display()),
                            expected: vec![out_f, in_f],
                            actual: vec![b_out, a_in],
                        });
                    }
                    lin.adapter = Some(adapter.clone());
                    n += 1;
                }
                None => {
                    let skipped_vision = name
                        .strip_prefix("vision_tower.encoder.layers.")
                        .and_then(|r| r.split('.').next())
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i >= vision_layers);
                    if !skipped_vision {
                        return Err(MlError::Unsupported {
                            path: self.dir.clone(),
                            message: format!(
                                "the adapter targets '{}', which the model does not have",
                                escape_name(name)
                            ),
                        });
                    }
                }
            }
        }
        drop(linears);
        if let Some(p) = &self.projector {
            p.replace_in(model, model.dtype)?;
        }
        Ok(n)
    }

    /// Run `f` with the adapter (and its projector) attached; afterwards every adapter is
    /// removed and the model's own projector restored, also when attaching fails.
    pub fn with_attached<T>(&self, model: &mut Llava, f: impl FnOnce(&Llava) -> T) -> Result<T> {
        let saved = (
            model.projector.linear_1.clone(),
            model.projector.linear_2.clone(),
        );
        let result = self.attach(model).map(|_| f(model));
        model.clear_adapters();
        model.projector.linear_1 = saved.0;
        model.projector.linear_2 = saved.1;
        result
    }
}

/// Stack one module's MoELoRA experts.
fn moe_from_parts(
    m: &ModuleTensors,
    experts: usize,
    alpha: f64,
    config_r: Option<usize>,
    src: &str,
) -> Result<Adapter> {
    let missing = |what: String| MlError::MissingTensor {
        name: format!("{}.{what}", m.key),
        source_desc: src.to_string(),
    };
    let mut a_parts = Vec::with_capacity(experts);
    let mut b_parts = Vec::with_capacity(experts);
    for e in 0..experts {
        a_parts.push(
            m.experts_a
                .get(&e)
                .ok_or_else(|| missing(format!("lora_A.loraA.{e}.weight")))?
                .clone(),
        );
        b_parts.push(
            m.experts_b
                .get(&e)
                .ok_or_else(|| missing(format!("lora_B.loraB.{e}.weight")))?
                .clone(),
        );
    }
    if let Some(e) = m
        .experts_a
        .keys()
        .chain(m.experts_b.keys())
        .find(|&&e| e >= experts)
    {
        return Err(unsupported(
            Path::new(src.trim_matches('\'')),
            format!(
                "'{}' has expert {e}, but expert_num is {experts}",
                escape_name(&m.key)
            ),
        ));
    }
    let router = m
        .router
        .clone()
        .ok_or_else(|| missing("lora_router.weight".into()))?;
    let (re, in_f) = a_parts[0].dims2()?;
    let (out_f, _) = b_parts[0].dims2()?;
    for e in 0..experts {
        if a_parts[e].dims() != [re, in_f] {
            return Err(MlError::ShapeMismatch {
                name: format!("{}.lora_A.loraA.{e}.weight", m.key),
                source_desc: src.to_string(),
                expected: vec![re, in_f],
                actual: a_parts[e].dims().to_vec(),
            });
        }
        if b_parts[e].dims() != [out_f, re] {
            return Err(MlError::ShapeMismatch {
                name: format!("{}.lora_B.loraB.{e}.weight", m.key),
                source_desc: src.to_string(),
                expected: vec![out_f, re],
                actual: b_parts[e].dims().to_vec(),
            });
        }
    }
    if router.dims() != [experts, in_f] {
        return Err(MlError::ShapeMismatch {
            name: format!("{}.lora_router.weight", m.key),
            source_desc: src.to_string(),
            expected: vec![experts, in_f],
            actual: router.dims().to_vec(),
        });
    }
    let r = re * experts;
    if let Some(cr) = config_r {
        if cr != r {
            return Err(MlError::ShapeMismatch {
                name: format!("{}.lora_A.loraA.0.weight", m.key),
                source_desc: format!(
                    "{src} (adapter_config.json r = {cr}, expert_num = {experts})"
                ),
                expected: vec![cr / experts.max(1), in_f],
                actual: vec![re, in_f],
            });
        }
    }
    Ok(Adapter::MoeLora(MoeLora {
        a: Tensor::cat(&a_parts, 0)?,
        b: Tensor::cat(&b_parts, 1)?,
        router,
        experts,
        scale: alpha / r as f64,
        dropout: None,
    }))
}

impl ProjectorWeights {
    /// The canonical names a full mlp2x projector has.
    pub const NAMES: [&'static str; 4] = [
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_2.weight",
        "multi_modal_projector.linear_2.bias",
    ];

    /// Read `non_lora_trainables.safetensors` (or `.bin`) of an adapter directory, if any.
    /// Keys: CoIN's `base_model.model.model.mm_projector.{0,2}.{weight,bias}` or any layout's
    /// projector names; any other tensor is refused (we would silently drop it).
    pub fn find(dir: &Path, device: &Device, dtype: DType) -> Result<Option<Self>> {
        let Some(file) = first_existing(
            dir,
            &["non_lora_trainables.safetensors", "non_lora_trainables.bin"],
        ) else {
            return Ok(None);
        };
        check_inside(dir, &file)?;
        let mut tensors = BTreeMap::new();
        for (key, t) in read_tensor_file(&file)? {
            let k = key.strip_prefix("base_model.model.").unwrap_or(&key);
            let name = k
                .rsplit_once('.')
                .and_then(|(module, leaf)| {
                    let m = canonical_module(module)?;
                    (m.starts_with("multi_modal_projector.")
                        && (leaf == "weight" || leaf == "bias"))
                        .then(|| format!("{m}.{leaf}"))
                })
                .ok_or_else(|| {
                    unsupported(
                        &file,
                        format!(
                            "tensor '{}' is not a projector weight (only the projector is supported in non_lora_trainables)",
                            escape_name(&key)
                        ),
                    )
                })?;
            tensors.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
        for must in [Self::NAMES[0], Self::NAMES[2]] {
            if !tensors.contains_key(must) {
                return Err(MlError::MissingTensor {
                    name: must.into(),
                    source_desc: format!("'{}'", file.display()),
                });
            }
        }
        Ok(Some(ProjectorWeights { file, tensors }))
    }

    /// Replace the model's projector weights (shape-checked) with these, in `dtype`.
    pub fn replace_in(&self, model: &mut Llava, dtype: DType) -> Result<()> {
        let src = format!("'{}'", self.file.display());
        let p = &mut model.projector;
        for (lin, base) in [
            (&mut p.linear_1, "multi_modal_projector.linear_1"),
            (&mut p.linear_2, "multi_modal_projector.linear_2"),
        ] {
            let w = self.tensors.get(&format!("{base}.weight")).ok_or_else(|| {
                MlError::MissingTensor {
                    name: format!("{base}.weight"),
                    source_desc: src.clone(),
                }
            })?;
            if w.dims() != lin.weight.dims() {
                return Err(MlError::ShapeMismatch {
                    name: format!("{base}.weight"),
                    source_desc: src,
                    expected: lin.weight.dims().to_vec(),
                    actual: w.dims().to_vec(),
                });
            }
            let b = self.tensors.get(&format!("{base}.bias"));
            match (&lin.bias, b) {
                (Some(have), Some(b)) if have.dims() == b.dims() => {
                    lin.bias = Some(b.to_dtype(dtype)?)
                }
                (None, None) => {}
                (have, _) => {
                    return Err(MlError::ShapeMismatch {
                        name: format!("{base}.bias"),
                        source_desc: src,
                        expected: have.as_ref().map(|t| t.dims().to_vec()).unwrap_or_default(),
                        actual: b.map(|t| t.dims().to_vec()).unwrap_or_default(),
                    })
                }
            }
            lin.weight = w.to_dtype(dtype)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_module_names_of_every_layout_map_to_one_name() {
        let want = "language_model.layers.3.self_attn.q_proj";
        for m in [
            "model.language_model.layers.3.self_attn.q_proj",
            "language_model.model.layers.3.self_attn.q_proj",
            "model.layers.3.self_attn.q_proj",
        ] {
            assert_eq!(canonical_module(m).as_deref(), Some(want), "{m}");
        }
        assert_eq!(
            canonical_module("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1").as_deref(),
            Some("vision_tower.encoder.layers.0.mlp.fc1")
        );
        assert_eq!(
            canonical_module("model.mm_projector.2").as_deref(),
            Some("multi_modal_projector.linear_2")
        );
        assert_eq!(canonical_module("something.else"), None);
    }

    /// JSON equality with numbers compared by value (`8` = `8.0`).
    fn same_json(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
            }
            _ => a == b,
        }
    }

    #[test]
    fn adapter_configs_round_trip_without_losing_a_field() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut inputs: Vec<Value> = [
            "parity/adapter/adapter_config.json",
            "train/coin_lora/adapter_config.json",
            "train/moelora/adapter_config.json",
        ]
        .iter()
        .map(|f| read_json(&fixtures.join(f)).expect("fixture"))
        .collect();
        inputs.push(serde_json::json!({
            "r": 16, "lora_alpha": 32, "rank_pattern": {"q_proj": 8},
            "alpha_pattern": {"layers.0.mlp.down_proj": 4.5}, "layers_to_transform": [0, 1],
            "init_lora_weights": "gaussian", "target_modules": null, "future_field": {"x": [1]}
        }));
        for v in &inputs {
            let cfg = AdapterConfig::from_json(v, Path::new("c.json")).expect("parses");
            let back = serde_json::to_value(&cfg).expect("serializes");
            assert!(same_json(v, &back), "{v}\n{back}");
        }
        let parity = AdapterConfig::from_json(&inputs[0], Path::new("c.json")).expect("p");
        assert_eq!(parity.task_type, Some(None), "a null stays null");
        assert_eq!(
            parity.other["peft_version"], "0.21.2",
            "unknown fields are kept"
        );
        let moe = AdapterConfig::from_json(&inputs[2], Path::new("c.json")).expect("m");
        assert_eq!(
            moe.check(Path::new("c.json")).expect("ok"),
            AdapterKind::MoeLora { experts: 4 }
        );
        let free = AdapterConfig::from_json(&inputs[3], Path::new("c.json")).expect("f");
        assert_eq!(free.r_of(&["model.layers.3.self_attn.q_proj"]), 8);
        assert_eq!(free.r_of(&["model.layers.3.self_attn.k_proj"]), 16);
        assert_eq!(
            free.alpha_of(&["language_model.layers.0.mlp.down_proj"]),
            4.5
        );
        assert_eq!(free.peft_type(), PEFT_TYPE_LORA);
        // A field of the wrong type is named.
        let e = AdapterConfig::from_json(
            &serde_json::json!({"r": "eight", "lora_alpha": 8}),
            Path::new("c.json"),
        )
        .expect_err("bad r");
        assert!(e.to_string().contains("'r'"), "{e}");
    }

    #[test]
    fn nonsense_adapter_numbers_are_refused_naming_the_field() {
        let check = |v: Value| {
            AdapterConfig::from_json(&v, Path::new("adapter_config.json"))
                .and_then(|c| c.check(Path::new("adapter_config.json")))
        };
        check(serde_json::json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.1})).expect("fine");
        for (v, field) in [
            (
                serde_json::json!({"r": 4, "lora_alpha": -8}),
                "'lora_alpha'",
            ),
            (serde_json::json!({"r": 4, "lora_alpha": 0}), "'lora_alpha'"),
            (serde_json::json!({"r": 4}), "'lora_alpha'"),
            (serde_json::json!({"r": 0, "lora_alpha": 8}), "'r'"),
            (serde_json::json!({"r": -1, "lora_alpha": 8}), "'r'"),
            (
                serde_json::json!({"r": 4, "lora_alpha": 8, "lora_dropout": 1.5}),
                "'lora_dropout'",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": -1}}),
                "'alpha_pattern'",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 0}}),
                "'rank_pattern'",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 8, "peft_type": "MOE_LORA_CoIN", "expert_num": 0}),
                "'expert_num'",
            ),
            (
                serde_json::json!({"r": 4, "lora_alpha": 8, "lora_bias": true}),
                "lora_bias",
            ),
        ] {
            let e = check(v.clone()).expect_err("refused");
            assert!(e.to_string().contains(field), "{v}: {e}");
            assert!(e.to_string().contains("adapter_config.json"), "{e}");
        }
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn an_adapter_whose_r_disagrees_with_its_tensors_is_refused() {
        use crate::ml::load::write_safetensors;
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path();
        let dev = Device::Cpu;
        let key = "base_model.model.model.layers.0.self_attn.q_proj";
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            &[
                (
                    format!("{key}.lora_A.weight"),
                    Tensor::zeros((2, 8), DType::F32, &dev).expect("a"),
                ),
                (
                    format!("{key}.lora_B.weight"),
                    Tensor::ones((4, 2), DType::F32, &dev).expect("b"),
                ),
            ],
        )
        .expect("w");
        let cfg =
            |v: Value| std::fs::write(dir.join("adapter_config.json"), v.to_string()).expect("w");
        cfg(serde_json::json!({"r": 2, "lora_alpha": 8}));
        PeftAdapter::load(dir, &dev, DType::F32).expect("r agrees");
        for v in [
            serde_json::json!({"r": 4, "lora_alpha": 8}),
            serde_json::json!({"lora_alpha": 8}),
            serde_json::json!({"r": 2, "lora_alpha": 8, "rank_pattern": {"q_proj": 3}}),
        ] {
            cfg(v.clone());
            let e = PeftAdapter::load(dir, &dev, DType::F32).expect_err("r disagrees");
            assert!(
                matches!(&e, MlError::ShapeMismatch { name, .. } if name == &format!("{key}.lora_A.weight")),
                "{v}: {e}"
            );
            assert!(e.to_string().contains("adapter_config.json: r = "), "{e}");
        }
        cfg(
            serde_json::json!({"r": 4, "lora_alpha": 8, "rank_pattern": {"model.layers.0.self_attn.q_proj": 2}}),
        );
        PeftAdapter::load(dir, &dev, DType::F32).expect("the pattern's r agrees");
        // A tensor name with control characters is refused, escaped.
        cfg(serde_json::json!({"r": 2, "lora_alpha": 8}));
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            &[(
                "evil\u{1b}[2J.lora_A.weight".into(),
                Tensor::zeros((2, 8), DType::F32, &dev).expect("a"),
            )],
        )
        .expect("w");
        let e = PeftAdapter::load(dir, &dev, DType::F32).expect_err("refused");
        assert!(e.to_string().contains("evil\\u{1b}[2J"), "{e}");
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn unsupported_adapters_are_refused_naming_the_cause() {
        use crate::ml::load::write_safetensors;
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path();
        let write_cfg = |v: serde_json::Value| {
            std::fs::write(dir.join("adapter_config.json"), v.to_string()).expect("w")
        };
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 8), DType::F32, &dev).expect("a");
        let b = Tensor::ones((4, 2), DType::F32, &dev).expect("b");
        let key = "base_model.model.model.layers.0.self_attn.q_proj";
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            &[
                (format!("{key}.lora_A.weight"), a.clone()),
                (format!("{key}.lora_B.weight"), b.clone()),
            ],
        )
        .expect("w");
        write_cfg(
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "use_rslora": true}),
        );
        let ok = PeftAdapter::load(dir, &dev, DType::F32).expect("loads");
        let Adapter::Lora(l) = &ok.layers["language_model.layers.0.self_attn.q_proj"] else {
            panic!("a LoRA adapter");
        };
        assert_eq!(l.scale, 8.0 / 2f64.sqrt());
        write_cfg(
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "use_dora": true}),
        );
        let e = PeftAdapter::load(dir, &dev, DType::F32).expect_err("dora refused");
        assert!(e.to_string().contains("use_dora"), "{e}");
        write_cfg(serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8}));
        write_safetensors(
            &dir.join("adapter_model.safetensors"),
            &[
                (format!("{key}.lora_A.weight"), a),
                (format!("{key}.lora_B.weight"), b),
                (
                    "base_model.model.model.layers.0.mlp.lora_router.weight".into(),
                    Tensor::zeros((8, 4), DType::F32, &dev).expect("r"),
                ),
            ],
        )
        .expect("w");
        let e = PeftAdapter::load(dir, &dev, DType::F32).expect_err("router refused");
        assert!(e.to_string().contains("lora_router"), "{e}");
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn coin_moelora_files_are_read_and_malformed_ones_refused_by_name() {
        use crate::ml::load::write_safetensors;
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path();
        let dev = Device::Cpu;
        let cfg = |r: usize| {
            std::fs::write(
                dir.join("adapter_config.json"),
                serde_json::json!({"peft_type": "MOE_LORA_CoIN", "r": r, "lora_alpha": 8,
                                   "expert_num": 2, "task_type": "CAUSAL_LM_CoIN"})
                .to_string(),
            )
            .expect("w")
        };
        let val = |rows: usize, cols: usize, start: f32| {
            Tensor::arange(start, start + (rows * cols) as f32, &dev)
                .and_then(|t| t.reshape((rows, cols)))
                .expect("t")
        };
        // CoIN's spelling: `.default` kept here, each expert under `.weight` and `.mlp.weight`.
        let m = "base_model.model.model.layers.0.self_attn.q_proj";
        let good = || {
            let mut v = Vec::new();
            for e in 0..2 {
                let a = val(2, 8, 100.0 * e as f32);
                let b = val(4, 2, -100.0 * e as f32);
                v.push((format!("{m}.lora_A.default.loraA.{e}.weight"), a.clone()));
                v.push((format!("{m}.lora_A.default.loraA.{e}.mlp.weight"), a));
                v.push((format!("{m}.lora_B.default.loraB.{e}.weight"), b.clone()));
                v.push((format!("{m}.lora_B.default.loraB.{e}.mlp.weight"), b));
            }
            v.push((format!("{m}.lora_router.default.weight"), val(2, 8, 0.5)));
            v
        };
        let write = |v: &[(String, Tensor)]| {
            write_safetensors(&dir.join("adapter_model.safetensors"), v).expect("w")
        };
        cfg(4);
        write(&good());
        let ok = PeftAdapter::load(dir, &dev, DType::F32).expect("loads");
        assert_eq!(ok.kind, AdapterKind::MoeLora { experts: 2 });
        let Adapter::MoeLora(moe) = &ok.layers["language_model.layers.0.self_attn.q_proj"] else {
            panic!("a MoELoRA adapter");
        };
        assert_eq!(moe.scale, 2.0, "alpha / total r");
        assert_eq!(moe.a.dims(), [4, 8]);
        assert_eq!(moe.b.dims(), [4, 4]);
        // Expert 1 is rows 2..4 of A and columns 2..4 of B.
        let a1: Vec<f32> = moe.a.get(2).and_then(|r| r.to_vec1()).expect("row");
        assert_eq!(a1[0], 100.0);
        let b_row: Vec<f32> = moe.b.get(0).and_then(|r| r.to_vec1()).expect("row");
        assert_eq!(b_row, vec![0.0, 1.0, -100.0, -99.0]);

        let refused = |v: Vec<(String, Tensor)>, r: usize, want: &str| {
            cfg(r);
            write(&v);
            let e = PeftAdapter::load(dir, &dev, DType::F32).expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
        };
        let mut differing = good();
        differing[1].1 = val(2, 8, 7.0);
        refused(
            differing,
            4,
            "loraA.0.weight' differs from the other spelling",
        );
        let no_expert: Vec<_> = good()
            .into_iter()
            .filter(|(k, _)| !k.contains("loraB.1."))
            .collect();
        refused(no_expert, 4, &format!("{m}.lora_B.loraB.1.weight"));
        let mut extra = good();
        extra.push((format!("{m}.lora_A.loraA.2.weight"), val(2, 8, 0.0)));
        refused(extra, 4, "has expert 2, but expert_num is 2");
        refused(good(), 6, "adapter_config.json r = 6");
        let no_router: Vec<_> = good()
            .into_iter()
            .filter(|(k, _)| !k.contains("router"))
            .collect();
        refused(no_router, 4, &format!("{m}.lora_router.weight"));
        let mut plain = good();
        plain.push((format!("{m}.lora_A.weight"), val(2, 8, 0.0)));
        refused(
            plain,
            4,
            "is a plain LoRA tensor but adapter_config.json says peft_type \"MOE_LORA_CoIN\"",
        );

        // A projector file with anything but the projector is refused, naming the tensor.
        cfg(4);
        write(&good());
        write_safetensors(
            &dir.join("non_lora_trainables.safetensors"),
            &[
                (
                    "base_model.model.model.mm_projector.0.weight".into(),
                    val(4, 8, 0.0),
                ),
                (
                    "base_model.model.model.mm_projector.2.weight".into(),
                    val(4, 4, 0.0),
                ),
                (
                    "base_model.model.model.embed_tokens.weight".into(),
                    val(4, 4, 0.0),
                ),
            ],
        )
        .expect("w");
        let e = PeftAdapter::load(dir, &dev, DType::F32).expect_err("non-projector tensor");
        assert!(
            e.to_string()
                .contains("'base_model.model.model.embed_tokens.weight' is not a projector weight"),
            "{e}"
        );
        write_safetensors(
            &dir.join("non_lora_trainables.safetensors"),
            &[
                (
                    "base_model.model.model.mm_projector.0.weight".into(),
                    val(4, 8, 0.0),
                ),
                (
                    "base_model.model.model.mm_projector.2.weight".into(),
                    val(4, 4, 0.0),
                ),
            ],
        )
        .expect("w");
        let p = PeftAdapter::load(dir, &dev, DType::F32)
            .expect("loads")
            .projector
            .expect("projector found");
        let names: Vec<&str> = p.tensors.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "multi_modal_projector.linear_1.weight",
                "multi_modal_projector.linear_2.weight"
            ]
        );
    }
}
