//! Saving trained adapters in PEFT's format: `adapter_config.json` +
//! `adapter_model.safetensors`, keys `base_model.model.model.language_model.layers.N.….lora_{A,B}.weight`
//! (transformers ≥ 4.52 llava-hf module names; [`crate::ml::peft`] reads every layout back), and
//! the trained projector beside it as `non_lora_trainables.safetensors` with CoIN's key names
//! `base_model.model.model.mm_projector.{0,2}.{weight,bias}`.

use std::path::Path;

use candle_core::Tensor;

use super::params::{AdapterKind, TrainableParams};
use crate::ml::load::write_safetensors;
use crate::ml::{MlError, Result};
use crate::store::fsutil::write_atomic;

/// PEFT key of a trainable LoRA var name, `None` for non-LoRA vars.
pub fn peft_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("language_model.")?;
    if name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight") {
        Some(format!("base_model.model.model.language_model.{rest}"))
    } else {
        None
    }
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

/// Write a LoRA adapter (and the projector, when trained) into `dir` (created if missing).
/// MoELoRA has no PEFT format and is refused.
pub fn save_peft_lora(params: &TrainableParams, dir: &Path, base_model: &str) -> Result<()> {
    let s = &params.settings;
    if s.kind != AdapterKind::Lora {
        return Err(MlError::Input(
            "only plain LoRA adapters can be saved in PEFT format (MoELoRA is not yet supported)"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| MlError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut lora: Vec<(String, Tensor)> = Vec::new();
    let mut projector: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in &params.vars {
        if let Some(k) = peft_key(name) {
            lora.push((k, var.as_tensor().clone()));
        } else if let Some(k) = projector_key(name) {
            projector.push((k, var.as_tensor().clone()));
        } else {
            return Err(MlError::Input(format!(
                "no saved name for the trainable tensor '{name}'"
            )));
        }
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": s.r,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "target_modules": s.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "init_lora_weights": true,
        "inference_mode": true,
        "revision": null,
    });
    let mut text =
        serde_json::to_string_pretty(&config).map_err(|e| MlError::Input(e.to_string()))?;
    text.push('\n');
    let cfg_path = dir.join("adapter_config.json");
    write_atomic(&cfg_path, text).map_err(|source| MlError::Write {
        path: cfg_path.clone(),
        source,
    })?;
    write_safetensors(&dir.join("adapter_model.safetensors"), &lora)?;
    if !projector.is_empty() {
        write_safetensors(&dir.join("non_lora_trainables.safetensors"), &projector)?;
    }
    Ok(())
}
