//! Saving trained adapters in a PEFT-like layout: `adapter_config.json` +
//! `adapter_model.safetensors`, and the trained projector beside them as
//! `non_lora_trainables.safetensors` with CoIN's key names
//! `base_model.model.model.mm_projector.{0,2}.{weight,bias}`.
//!
//! Module keys follow PEFT's own rule: they are the module paths of the model that was trained,
//! so the adapter loads where that model loads:
//! - a llava-hf model (either on-disk layout): `base_model.model.model.language_model.layers.N.…`
//!   (what PEFT writes under transformers ≥ 4.52; HF PEFT 0.21 loads it, and also maps the old
//!   `base_model.model.language_model.model.layers.N.…` spelling, but not CoIN's);
//! - the CoIN split setup (LLaVA's `LlavaLlamaForCausalLM`): `base_model.model.model.layers.N.…`,
//!   what CoIN's and LLaVA's loaders expect (HF PEFT silently leaves such keys unloaded on a
//!   llava-hf model).
//!
//! LoRA: `{module}.lora_A.weight` (r × in), `{module}.lora_B.weight` (out × r), `peft_type`
//! `LORA`. MoELoRA (CoIN's `CoINMOELoraLinear`, `peft_type` `MOE_LORA_CoIN`, `task_type`
//! `CAUSAL_LM_CoIN`): `{module}.lora_A.loraA.<e>.weight` (r/E × in),
//! `{module}.lora_B.loraB.<e>.weight` (out × r/E), `{module}.lora_router.weight` (E × in), the
//! stacked in-memory experts split back (A rows / B columns `e·r/E..(e+1)·r/E`). Tensors are
//! written in the vars' dtype (f32). [`crate::ml::peft::PeftAdapter`] reads every layout back.
//! [`save_adapter_as`] with [`AdapterFormat::TorchBin`] writes `adapter_model.bin` /
//! `non_lora_trainables.bin` (torch.save zip pickles) instead, the names CoIN's loaders
//! hard-code.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::params::{AdapterKind, TrainableParams};
use super::torch_save::torch_save_bytes;
use crate::ml::load::{write_safetensors, Layout};
use crate::ml::peft::{AdapterConfig, TargetModules, PEFT_TYPE_LORA, PEFT_TYPE_MOELORA};
use crate::ml::{MlError, Result};
use crate::store::fsutil::write_atomic;

/// The saved key prefix of a canonical decoder linear (`language_model.layers.N.…`) for a model
/// of `layout`; `None` for anything else.
pub fn module_key(linear: &str, layout: Layout) -> Option<String> {
    let rest = linear.strip_prefix("language_model.")?;
    if !rest.starts_with("layers.") {
        return None;
    }
    Some(match layout {
        Layout::HfOld | Layout::HfNew => format!("base_model.model.model.language_model.{rest}"),
        Layout::Split => format!("base_model.model.model.{rest}"),
    })
}

/// CoIN key of a projector var name.
fn projector_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("multi_modal_projector.")?;
    let rest = rest
        .strip_prefix("linear_1.")
        .map(|r| format!("0.{r}"))
        .or_else(|| rest.strip_prefix("linear_2.").map(|r| format!("2.{r}")))?;
    Some(format!("base_model.model.model.mm_projector.{rest}"))
}

/// The saved (key, tensor) pairs of one trainable var: one pair for LoRA, router and projector
/// vars, E pairs for stacked MoELoRA experts. Errors for a name with no saved form.
pub fn saved_tensors(
    name: &str,
    t: &Tensor,
    kind: AdapterKind,
    layout: Layout,
) -> Result<Vec<(String, Tensor)>> {
    let no_name = || MlError::Input(format!("no saved name for the trainable tensor '{name}'"));
    if let Some(k) = projector_key(name) {
        return Ok(vec![(k, t.clone())]);
    }
    for (suffix, part) in [
        (".lora_A.weight", "lora_A.weight"),
        (".lora_B.weight", "lora_B.weight"),
        (".lora_router.weight", "lora_router.weight"),
    ] {
        if let Some(linear) = name.strip_suffix(suffix) {
            let m = module_key(linear, layout).ok_or_else(no_name)?;
            return Ok(vec![(format!("{m}.{part}"), t.clone())]);
        }
    }
    for (suffix, is_a) in [(".lora_A.experts", true), (".lora_B.experts", false)] {
        if let Some(linear) = name.strip_suffix(suffix) {
            let m = module_key(linear, layout).ok_or_else(no_name)?;
            let AdapterKind::MoeLora { experts } = kind else {
                return Err(no_name());
            };
            let (dim, part) = if is_a {
                (0, "lora_A.loraA")
            } else {
                (1, "lora_B.loraB")
            };
            let per = t.dim(dim)? / experts;
            return (0..experts)
                .map(|e| {
                    Ok((
                        format!("{m}.{part}.{e}.weight"),
                        t.narrow(dim, e * per, per)?.contiguous()?,
                    ))
                })
                .collect();
        }
    }
    Err(no_name())
}

/// The `adapter_config.json` of `params` (the mirror [`PeftAdapter`](crate::ml::peft::PeftAdapter)
/// reads): PEFT's LoRA fields, or CoIN's `CoINMOELoraConfig` fields only (its PEFT fork predates rslora/DoRA and would not know them).
///
/// LoRA `target_modules` on a llava-hf model is the regex
/// `.*language_model.*\.(q_proj|…)`: a list of short names would also match the CLIP tower's
/// `q_proj`/`k_proj`/`v_proj` in PEFT (it then adds untrained LoRA layers there and warns about
/// their missing keys). For the CoIN split setup, and for MoELoRA, the list of short names, as
/// CoIN writes it.
pub fn adapter_config(params: &TrainableParams, base_model: &str) -> AdapterConfig {
    let s = &params.settings;
    let targets = match (s.kind, params.layout) {
        (AdapterKind::Lora, Layout::HfOld | Layout::HfNew) => {
            TargetModules::Regex(format!(".*language_model.*\\.({})", s.targets.join("|")))
        }
        _ => TargetModules::Names(s.targets.clone()),
    };
    let common = AdapterConfig {
        base_model_name_or_path: Some(Some(base_model.to_string())),
        r: Some(s.r),
        lora_alpha: Some(s.alpha),
        lora_dropout: Some(s.dropout),
        target_modules: Some(Some(targets)),
        bias: Some("none".into()),
        fan_in_fan_out: Some(false),
        modules_to_save: Some(None),
        layers_to_transform: Some(Value::Null),
        init_lora_weights: Some(Value::Bool(true)),
        inference_mode: Some(true),
        revision: Some(None),
        ..AdapterConfig::default()
    };
    match s.kind {
        AdapterKind::Lora => AdapterConfig {
            peft_type: Some(PEFT_TYPE_LORA.into()),
            task_type: Some(Some("CAUSAL_LM".into())),
            use_rslora: Some(false),
            use_dora: Some(false),
            rank_pattern: Some(BTreeMap::new()),
            alpha_pattern: Some(BTreeMap::new()),
            ..common
        },
        AdapterKind::MoeLora { experts } => AdapterConfig {
            peft_type: Some(PEFT_TYPE_MOELORA.into()),
            task_type: Some(Some("CAUSAL_LM_CoIN".into())),
            layers_pattern: Some(Value::Null),
            expert_num: Some(experts),
            task_embedding_dim: Some(64),
            ..common
        },
    }
}

/// The file format of saved tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdapterFormat {
    /// `adapter_model.safetensors` + `non_lora_trainables.safetensors` (PEFT's default).
    #[default]
    Safetensors,
    /// `adapter_model.bin` + `non_lora_trainables.bin` (`torch.save` zip pickles): what CoIN's
    /// and LLaVA's loaders hard-code.
    TorchBin,
}

impl AdapterFormat {
    fn extension(self) -> &'static str {
        match self {
            AdapterFormat::Safetensors => "safetensors",
            AdapterFormat::TorchBin => "bin",
        }
    }
}

/// Write the adapter of `params` (LoRA or MoELoRA) into `dir` (created if missing):
/// `adapter_config.json`, `adapter_model.safetensors` and, when the projector is trained,
/// `non_lora_trainables.safetensors`. `base_model` goes into `base_model_name_or_path`.
pub fn save_adapter(params: &TrainableParams, dir: &Path, base_model: &str) -> Result<()> {
    save_adapter_as(params, dir, base_model, AdapterFormat::Safetensors)
}

/// [`save_adapter`] in a chosen tensor file format. Files of the other format (and converted
/// `.bin` caches) left in `dir` by an earlier save are removed, so that a reader cannot pick up
/// a stale adapter or projector.
pub fn save_adapter_as(
    params: &TrainableParams,
    dir: &Path,
    base_model: &str,
    format: AdapterFormat,
) -> Result<()> {
    let s = &params.settings;
    std::fs::create_dir_all(dir).map_err(|source| MlError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut adapter: Vec<(String, Tensor)> = Vec::new();
    let mut projector: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in &params.vars {
        let pairs = saved_tensors(name, var.as_tensor(), s.kind, params.layout)?;
        if name.starts_with("multi_modal_projector.") {
            projector.extend(pairs);
        } else {
            adapter.extend(pairs);
        }
    }
    let mut keep = vec![format!("adapter_model.{}", format.extension())];
    if !projector.is_empty() {
        keep.push(format!("non_lora_trainables.{}", format.extension()));
    }
    for stale in [
        "adapter_model.safetensors",
        "adapter_model.bin",
        "adapter_model.bin.coin.safetensors",
        "non_lora_trainables.safetensors",
        "non_lora_trainables.bin",
        "non_lora_trainables.bin.coin.safetensors",
    ] {
        let p = dir.join(stale);
        if !keep.iter().any(|k| k == stale) && p.exists() {
            std::fs::remove_file(&p).map_err(|source| MlError::Write { path: p, source })?;
        }
    }
    let mut text =
        serde_json::to_string_pretty(&adapter_config(params, base_model)).map_err(|source| {
            MlError::Encode {
                what: "the adapter config",
                source,
            }
        })?;
    text.push('\n');
    let cfg_path = dir.join("adapter_config.json");
    write_atomic(&cfg_path, text).map_err(|source| MlError::Write {
        path: cfg_path.clone(),
        source,
    })?;
    let write = |file: &str, tensors: &[(String, Tensor)]| -> Result<()> {
        let path = dir.join(file);
        match format {
            AdapterFormat::Safetensors => write_safetensors(&path, tensors),
            AdapterFormat::TorchBin => write_atomic(&path, torch_save_bytes(tensors)?)
                .map_err(|source| MlError::Write { path, source }),
        }
    };
    write(&keep[0], &adapter)?;
    if let Some(p) = keep.get(1) {
        write(p, &projector)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::train::dropout::Dropout;
    use crate::ml::train::params::AdapterSettings;

    /// The config as this module wrote it with `serde_json::json!` before the typed mirror.
    fn written_before(params: &TrainableParams, base_model: &str) -> Value {
        let s = &params.settings;
        let targets = match (s.kind, params.layout) {
            (AdapterKind::Lora, Layout::HfOld | Layout::HfNew) => {
                serde_json::json!(format!(".*language_model.*\\.({})", s.targets.join("|")))
            }
            _ => serde_json::json!(s.targets),
        };
        match s.kind {
            AdapterKind::Lora => serde_json::json!({
                "peft_type": PEFT_TYPE_LORA, "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model, "r": s.r, "lora_alpha": s.alpha,
                "lora_dropout": s.dropout, "target_modules": targets, "bias": "none",
                "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
                "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": null, "init_lora_weights": true, "inference_mode": true,
                "revision": null,
            }),
            AdapterKind::MoeLora { experts } => serde_json::json!({
                "peft_type": PEFT_TYPE_MOELORA, "task_type": "CAUSAL_LM_CoIN",
                "base_model_name_or_path": base_model, "r": s.r, "lora_alpha": s.alpha,
                "lora_dropout": s.dropout, "target_modules": s.targets, "bias": "none",
                "fan_in_fan_out": false, "modules_to_save": null, "layers_to_transform": null,
                "layers_pattern": null, "init_lora_weights": true, "inference_mode": true,
                "revision": null, "expert_num": experts, "task_embedding_dim": 64,
            }),
        }
    }

    #[test]
    fn the_typed_config_is_written_byte_for_byte_as_before_and_reads_back() {
        for kind in [AdapterKind::Lora, AdapterKind::MoeLora { experts: 4 }] {
            for layout in [Layout::HfOld, Layout::HfNew, Layout::Split] {
                let params = TrainableParams {
                    vars: Vec::new(),
                    dropout: Dropout::new(0.05, 0),
                    settings: AdapterSettings {
                        kind,
                        ..AdapterSettings::default()
                    },
                    layout,
                };
                let cfg = adapter_config(&params, "models/base");
                let text = serde_json::to_string_pretty(&cfg).expect("json");
                let before = serde_json::to_string_pretty(&written_before(&params, "models/base"))
                    .expect("json");
                assert_eq!(text, before, "{kind:?} {layout:?}");
                let v: Value = serde_json::from_str(&text).expect("parses");
                let back =
                    AdapterConfig::from_json(&v, Path::new("adapter_config.json")).expect("reads");
                assert_eq!(back, cfg);
                assert_eq!(
                    back.check(Path::new("adapter_config.json")).expect("ok"),
                    kind
                );
            }
        }
    }
}
