//! Exporting a checkpoint's adapter in another program's layout (`coin checkout --format`).
//!
//! The source is a checked-out adapter directory in any layout [`PeftAdapter::load`] reads
//! (coin's own training output, an imported CoIN stage, a PEFT adapter); it is read whole and
//! checked first, then written in one of three layouts:
//!
//! - [`ExportFormat::Coin`]: what CoIN's next-stage loader (`--previous_task_model_path`) and its
//!   eval model builder read: `adapter_model.bin` (a `torch.save` zip, keys as peft 0.4.0 saves
//!   them, `base_model.model.model.layers.N.….lora_A.weight`; MoELoRA
//!   `….lora_A.loraA.<e>.weight`, `….lora_B.loraB.<e>.weight`, `….lora_router.weight`),
//!   `adapter_config.json` with exactly peft 0.4.0's `LoraConfig` fields (+ `expert_num`,
//!   `task_embedding_dim` for CoIN's `MOE_LORA_CoIN`; sorted keys, no trailing newline, as peft
//!   writes it), `non_lora_trainables.bin`
//!   (`base_model.model.model.mm_projector.{0,2}.{weight,bias}`) and `config.json` (the
//!   checkpoint's own when it has one, else a LlavaConfig for Vicuna-7B v1.5 as CoIN writes it,
//!   with the sizes the tensors show).
//! - [`ExportFormat::Peft`]: a PEFT adapter for a llava-hf model (`LlavaForConditionalGeneration`):
//!   `adapter_model.safetensors` with `base_model.model.language_model.model.layers.N.…` keys
//!   (the hub layout's module names; PEFT also maps them onto transformers ≥ 4.52's),
//!   `adapter_config.json` (PEFT's `LoraConfig`, `target_modules` a regex over the language model
//!   so that the CLIP tower's `q_proj` is not adapted), and the projector, when trained, as
//!   `non_lora_trainables.safetensors` with llava-hf names (`multi_modal_projector.linear_{1,2}.…`),
//!   to load with `load_state_dict(strict=False)`: PEFT's `modules_to_save` would need the
//!   projector wrapped at training time. MoELoRA has no PEFT form and is refused.
//! - [`ExportFormat::Safetensors`]: `adapter.safetensors` with coin's own names (the trainable
//!   tensors of [`crate::ml::train`]: `language_model.layers.N.….lora_A.weight`, MoELoRA
//!   `….lora_A.experts` / `….lora_B.experts` stacked, `….lora_router.weight`,
//!   `multi_modal_projector.linear_{1,2}.…`) and `adapter_config.json` as read.
//!
//! Tensors keep the dtype of the checkpoint's adapter file. Nothing is written outside `dst`,
//! and every file is written atomically; the caller stages `dst` and renames it into place.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::error::escape_name;
use super::linear::Adapter;
use super::load::{read_tensor_file, write_safetensors, Layout};
use super::peft::{PeftAdapter, PEFT_TYPE_LORA, PEFT_TYPE_MOELORA};
use super::train::params::AdapterKind;
use super::train::save::saved_tensors;
use super::train::torch_save::torch_save_bytes;
use super::{MlError, Result};
use crate::store::fsutil::write_atomic;

/// The layout to export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// CoIN's own files (`adapter_model.bin`, `non_lora_trainables.bin`, `config.json`).
    Coin,
    /// A PEFT adapter for a llava-hf model.
    Peft,
    /// One safetensors file with coin's names.
    Safetensors,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    /// Files written into the output directory, in order.
    pub files: Vec<String>,
    /// LoRA or MoELoRA.
    pub kind: AdapterKind,
    /// Adapted modules.
    pub modules: usize,
    /// Whether a trained projector was exported.
    pub projector: bool,
    /// Things the user should know (a guessed config.json, a missing projector).
    pub warnings: Vec<String>,
}

/// CoIN's Vicuna-7B v1.5 base, as its training scripts name it.
const COIN_BASE: &str = "./checkpoints/LLaVA/Vicuna/vicuna-7b-v1.5";

/// Whether CoIN's model builder accepts `name` as an adapter directory of `kind`: it takes the
/// LoRA path only when the name contains both "llava" and "lora" (case-insensitive), and loads
/// a MoELoRA with its own PEFT fork only when the name contains "MOE" (case-sensitive).
pub fn coin_dir_name_ok(name: &str, kind: AdapterKind) -> bool {
    let n = name.to_lowercase();
    let moe_ok = match kind {
        AdapterKind::Lora => true,
        AdapterKind::MoeLora { .. } => name.contains("MOE"),
    };
    n.contains("llava") && n.contains("lora") && moe_ok
}

/// A directory name CoIN's builder accepts, derived from `name`: `<name>_llava_lora`
/// (`<name>_llava_MOE_lora` for MoELoRA), as CoIN's training scripts name theirs.
pub fn coin_dir_name(name: &str, kind: AdapterKind) -> String {
    if coin_dir_name_ok(name, kind) {
        return name.to_string();
    }
    let n = name.to_lowercase();
    match kind {
        AdapterKind::Lora => format!("{name}_llava_lora"),
        AdapterKind::MoeLora { .. } if n.contains("llava") && n.contains("lora") => {
            format!("{name}_MOE")
        }
        AdapterKind::MoeLora { .. } => format!("{name}_llava_MOE_lora"),
    }
}

/// The dtype of the adapter weights file of `dir` (that of its first tensor).
fn weights_dtype(dir: &Path) -> Result<DType> {
    for name in ["adapter_model.safetensors", "adapter_model.bin"] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(read_tensor_file(&p)?
                .first()
                .map(|(_, t)| t.dtype())
                .unwrap_or(DType::F32));
        }
    }
    Err(MlError::NotAModel {
        path: dir.to_path_buf(),
        message: "no adapter_model.safetensors or adapter_model.bin; --format exports adapter \
                  checkpoints only (use a plain checkout for other files)"
            .into(),
    })
}

/// Layer index and module order of a canonical linear name, for the order peft saves in
/// (`named_parameters()`: layer, then q, k, v, o, gate, up, down).
fn module_order(name: &str) -> (usize, usize, String) {
    let layer = name
        .strip_prefix("language_model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    let short = name.rsplit('.').next().unwrap_or_default();
    let pos = super::train::params::DEFAULT_TARGETS
        .iter()
        .position(|t| *t == short)
        .unwrap_or(usize::MAX);
    (layer, pos, name.to_string())
}

/// The in-memory (coin) names and tensors of one adapted linear.
fn coin_vars(linear: &str, adapter: &Adapter) -> Result<Vec<(String, Tensor)>> {
    Ok(match adapter {
        Adapter::Lora(l) => vec![
            (format!("{linear}.lora_A.weight"), l.a.clone()),
            (format!("{linear}.lora_B.weight"), l.b.clone()),
        ],
        Adapter::MoeLora(m) => vec![
            (format!("{linear}.lora_A.experts"), m.a.clone()),
            (format!("{linear}.lora_B.experts"), m.b.clone()),
            (format!("{linear}.lora_router.weight"), m.router.clone()),
        ],
        Adapter::Olora { frozen, new } => {
            let l = frozen.concat(new)?;
            vec![
                (format!("{linear}.lora_A.weight"), l.a),
                (format!("{linear}.lora_B.weight"), l.b),
            ]
        }
    })
}

fn write_file(dst: &Path, name: &str, bytes: impl AsRef<[u8]>) -> Result<()> {
    let path = dst.join(name);
    write_atomic(&path, bytes).map_err(|source| MlError::Write { path, source })
}

fn json_text(v: &BTreeMap<&str, Value>, what: &'static str) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|source| MlError::Encode { what, source })
}

/// The `adapter_config.json` fields both the CoIN and the PEFT layout write the same way
/// (`default_base` when the checkpoint names no base model).
fn lora_config_fields(
    c: &super::peft::AdapterConfig,
    alpha: f64,
    default_base: &str,
) -> BTreeMap<&'static str, Value> {
    let base = c
        .base_model_name_or_path
        .clone()
        .flatten()
        .unwrap_or_else(|| default_base.to_string());
    BTreeMap::from([
        ("base_model_name_or_path", Value::from(base)),
        ("bias", Value::from("none")),
        ("fan_in_fan_out", Value::Bool(false)),
        ("inference_mode", Value::Bool(true)),
        ("init_lora_weights", Value::Bool(true)),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("lora_alpha", number(alpha)),
        ("lora_dropout", Value::from(c.lora_dropout.unwrap_or(0.05))),
        ("modules_to_save", Value::Null),
        ("r", Value::from(c.r())),
    ])
}

/// A JSON number for α: an integer when it is one (as CoIN's scripts pass it).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// Read the adapter checkpoint in `src` and write it into the existing, empty directory `dst`
/// in `format`. Everything is read and checked before the first file is written.
pub fn export_adapter(src: &Path, dst: &Path, format: ExportFormat) -> Result<Exported> {
    let dtype = weights_dtype(src)?;
    let ad = PeftAdapter::load(src, &Device::Cpu, dtype)?;
    let cfg_path = src.join("adapter_config.json");
    let unsupported = |message: String| MlError::Unsupported {
        path: cfg_path.clone(),
        message,
    };
    let mut linears: Vec<(&String, &Adapter)> = ad.layers.iter().collect();
    linears.sort_by_key(|(n, _)| module_order(n));
    if format != ExportFormat::Safetensors {
        if let Some((n, _)) = linears
            .iter()
            .find(|(n, _)| !n.starts_with("language_model.layers."))
        {
            return Err(unsupported(format!(
                "the adapter on '{}' (outside the language model's layers) has no name in \
                 CoIN's or PEFT's layout; export it with --format safetensors",
                escape_name(n)
            )));
        }
    }
    let mut warnings = Vec::new();
    let projector: Vec<(String, Tensor)> = ad
        .projector
        .iter()
        .flat_map(|p| p.tensors.iter().map(|(k, t)| (k.clone(), t.clone())))
        .collect();
    let targets: Vec<String> = {
        let mut t: Vec<String> = linears
            .iter()
            .filter_map(|(n, _)| n.rsplit('.').next().map(str::to_string))
            .collect();
        t.sort_by_key(|s| module_order(&format!("x.{s}")).1);
        t.dedup();
        t
    };
    let c = &ad.config;
    let mut files = Vec::new();
    match format {
        ExportFormat::Coin => {
            let patterned = c.rank_pattern.iter().flatten().next().is_some()
                || c.alpha_pattern.iter().flatten().next().is_some();
            if c.use_rslora == Some(true) || patterned {
                return Err(unsupported(
                    "use_rslora / rank_pattern / alpha_pattern have no form in CoIN's peft 0.4.0; \
                     export with --format peft or safetensors"
                        .into(),
                ));
            }
            let mut adapter = Vec::new();
            for (linear, a) in &linears {
                for (name, t) in coin_vars(linear, a)? {
                    adapter.extend(saved_tensors(&name, &t, ad.kind, Layout::Split)?);
                }
            }
            let mut proj = Vec::new();
            for (name, t) in &projector {
                proj.extend(saved_tensors(name, t, ad.kind, Layout::Split)?);
            }
            let mut cfg = lora_config_fields(c, ad.alpha, COIN_BASE);
            cfg.insert("auto_mapping", Value::Null);
            cfg.insert("revision", Value::Null);
            cfg.insert("target_modules", Value::from(targets.clone()));
            match ad.kind {
                AdapterKind::Lora => {
                    cfg.insert("peft_type", Value::from(PEFT_TYPE_LORA));
                    cfg.insert("task_type", Value::from("CAUSAL_LM"));
                }
                AdapterKind::MoeLora { experts } => {
                    cfg.insert("peft_type", Value::from(PEFT_TYPE_MOELORA));
                    cfg.insert("task_type", Value::from("CAUSAL_LM_CoIN"));
                    cfg.insert("expert_num", Value::from(experts));
                    cfg.insert(
                        "task_embedding_dim",
                        Value::from(c.task_embedding_dim.unwrap_or(64)),
                    );
                }
            }
            let config_json = match src.join("config.json") {
                p if p.is_file() => std::fs::read(&p).map_err(|source| MlError::Read {
                    path: p.clone(),
                    source,
                })?,
                _ => {
                    let (text, guessed) = llava_config(&linears, &projector)?;
                    if guessed {
                        warnings.push(
                            "config.json: the checkpoint has none, so it was written for \
                             Vicuna-7B v1.5; this model's sizes differ: replace it with the base \
                             model's config.json plus CoIN's mm_* keys"
                                .to_string(),
                        );
                    }
                    text.into_bytes()
                }
            };
            write_file(
                dst,
                "adapter_config.json",
                json_text(&cfg, "the adapter config")?,
            )?;
            files.push("adapter_config.json".to_string());
            write_file(dst, "adapter_model.bin", torch_save_bytes(&adapter)?)?;
            files.push("adapter_model.bin".to_string());
            if proj.is_empty() {
                warnings.push(
                    "the checkpoint has no trained projector, so there is no \
                     non_lora_trainables.bin; CoIN's loaders need one (without it they try to \
                     download it from the Hugging Face hub): add the projector the stage started \
                     from, with keys base_model.model.model.mm_projector.{0,2}.{weight,bias}"
                        .to_string(),
                );
            } else {
                write_file(dst, "non_lora_trainables.bin", torch_save_bytes(&proj)?)?;
                files.push("non_lora_trainables.bin".to_string());
            }
            write_file(dst, "config.json", config_json)?;
            files.push("config.json".to_string());
        }
        ExportFormat::Peft => {
            if let AdapterKind::MoeLora { .. } = ad.kind {
                return Err(unsupported(
                    "MoELoRA (MOE_LORA_CoIN) is CoIN's own tuner, which PEFT cannot load; \
                     export it with --format coin or safetensors"
                        .into(),
                ));
            }
            let mut adapter = Vec::new();
            for (linear, a) in &linears {
                let rest = linear
                    .strip_prefix("language_model.")
                    .unwrap_or(linear.as_str());
                for (name, t) in coin_vars(linear, a)? {
                    let part = &name[linear.len()..];
                    adapter.push((
                        format!("base_model.model.language_model.model.{rest}{part}"),
                        t,
                    ));
                }
            }
            let mut cfg = lora_config_fields(c, ad.alpha, "llava-hf/llava-1.5-7b-hf");
            cfg.insert("peft_type", Value::from(PEFT_TYPE_LORA));
            let rank_pattern: serde_json::Map<String, Value> = c
                .rank_pattern
                .iter()
                .flatten()
                .map(|(k, &v)| (k.clone(), Value::from(v)))
                .collect();
            let alpha_pattern: serde_json::Map<String, Value> = c
                .alpha_pattern
                .iter()
                .flatten()
                .map(|(k, &v)| (k.clone(), number(v)))
                .collect();
            cfg.insert("rank_pattern", Value::Object(rank_pattern));
            cfg.insert("alpha_pattern", Value::Object(alpha_pattern));
            cfg.insert("revision", Value::Null);
            cfg.insert(
                "target_modules",
                Value::from(format!(".*language_model.*\\.({})", targets.join("|"))),
            );
            cfg.insert("task_type", Value::from("CAUSAL_LM"));
            cfg.insert("use_rslora", Value::Bool(c.use_rslora == Some(true)));
            cfg.insert("use_dora", Value::Bool(false));
            let mut text = json_text(&cfg, "the adapter config")?;
            text.push('\n');
            write_file(dst, "adapter_config.json", text)?;
            files.push("adapter_config.json".to_string());
            write_safetensors(&dst.join("adapter_model.safetensors"), &adapter)?;
            files.push("adapter_model.safetensors".to_string());
            if !projector.is_empty() {
                write_safetensors(&dst.join("non_lora_trainables.safetensors"), &projector)?;
                files.push("non_lora_trainables.safetensors".to_string());
            }
        }
        ExportFormat::Safetensors => {
            let mut all = Vec::new();
            for (linear, a) in &linears {
                all.extend(coin_vars(linear, a)?);
            }
            all.extend(projector.iter().cloned());
            let mut text = serde_json::to_string_pretty(c).map_err(|source| MlError::Encode {
                what: "the adapter config",
                source,
            })?;
            text.push('\n');
            write_file(dst, "adapter_config.json", text)?;
            files.push("adapter_config.json".to_string());
            write_safetensors(&dst.join("adapter.safetensors"), &all)?;
            files.push("adapter.safetensors".to_string());
        }
    }
    Ok(Exported {
        files,
        kind: ad.kind,
        modules: linears.len(),
        projector: !projector.is_empty(),
        warnings,
    })
}

/// A LlavaConfig `config.json` as CoIN writes it for Vicuna-7B v1.5 (sorted keys, indent 2,
/// trailing newline), with the hidden, intermediate and layer counts and the projector's input
/// size the tensors show. Also says whether any of those differ from Vicuna-7B's (then the
/// other sizes — heads, vocabulary — are guesses).
fn llava_config(
    linears: &[(&String, &Adapter)],
    projector: &[(String, Tensor)],
) -> Result<(String, bool)> {
    let in_out = |a: &Adapter| -> Result<(usize, usize)> { Ok(a.in_out()?) };
    let (mut hidden, mut inter, mut layers) = (4096, 11008, 32);
    let mut found_layers = 0;
    for (name, a) in linears {
        let (layer, _, _) = module_order(name);
        if layer != usize::MAX {
            found_layers = found_layers.max(layer + 1);
        }
        let (i, o) = in_out(a)?;
        if name.ends_with(".q_proj") {
            hidden = i;
        } else if name.ends_with(".up_proj") || name.ends_with(".gate_proj") {
            inter = o;
        } else if name.ends_with(".down_proj") {
            inter = i;
        }
    }
    if found_layers > 0 {
        layers = found_layers;
    }
    let mm_hidden = projector
        .iter()
        .find(|(k, _)| k == "multi_modal_projector.linear_1.weight")
        .map(|(_, t)| t.dim(1))
        .transpose()?
        .unwrap_or(1024);
    let guessed = (hidden, inter, layers, mm_hidden) != (4096, 11008, 32, 1024);
    let mut cfg: BTreeMap<&str, Value> = BTreeMap::new();
    for (k, v) in [
        ("_name_or_path", Value::from(COIN_BASE)),
        ("architectures", Value::from(vec!["LlamaForCausalLM"])),
        ("bos_token_id", Value::from(1)),
        ("eos_token_id", Value::from(2)),
        ("freeze_mm_mlp_adapter", Value::Bool(false)),
        ("hidden_act", Value::from("silu")),
        ("hidden_size", Value::from(hidden)),
        ("image_aspect_ratio", Value::from("pad")),
        ("initializer_range", Value::from(0.02)),
        ("intermediate_size", Value::from(inter)),
        ("max_position_embeddings", Value::from(4096)),
        ("mm_hidden_size", Value::from(mm_hidden)),
        ("mm_projector_lr", Value::from(2e-5)),
        ("mm_projector_type", Value::from("mlp2x_gelu")),
        ("mm_use_im_patch_token", Value::Bool(false)),
        ("mm_use_im_start_end", Value::Bool(false)),
        ("mm_vision_select_feature", Value::from("patch")),
        ("mm_vision_select_layer", Value::from(-2)),
        (
            "mm_vision_tower",
            Value::from("./checkpoints/LLaVA/clip-vit-large-patch14-336"),
        ),
        ("model_type", Value::from("llava")),
        ("num_attention_heads", Value::from(32)),
        ("num_hidden_layers", Value::from(layers)),
        ("num_key_value_heads", Value::from(32)),
        ("pad_token_id", Value::from(0)),
        ("pretraining_tp", Value::from(1)),
        ("rms_norm_eps", Value::from(1e-5)),
        ("rope_scaling", Value::Null),
        ("tie_word_embeddings", Value::Bool(false)),
        ("tokenizer_model_max_length", Value::from(2048)),
        ("tokenizer_padding_side", Value::from("right")),
        ("torch_dtype", Value::from("float16")),
        ("transformers_version", Value::from("4.31.0")),
        ("tune_mm_mlp_adapter", Value::Bool(false)),
        ("use_cache", Value::Bool(false)),
        ("use_mm_proj", Value::Bool(true)),
        ("vocab_size", Value::from(32000)),
    ] {
        cfg.insert(k, v);
    }
    let mut text = json_text(&cfg, "config.json")?;
    text.push('\n');
    Ok((text, guessed))
}

#[cfg(test)]
#[path = "export_tests.rs"]
mod tests;
