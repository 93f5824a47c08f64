//! PEFT LoRA adapters for inference: `adapter_config.json` + `adapter_model.safetensors`
//! (or the legacy `adapter_model.bin`), PEFT key names, scale `lora_alpha / r` (rsLoRA:
//! `/ √r`).
//!
//! Keys follow the in-memory module names of whatever trained them; all of these map onto our
//! canonical linear names ([`super::llava::Llava::linears_mut`]):
//! `base_model.model.model.language_model.layers.N…` (transformers ≥ 4.52),
//! `base_model.model.language_model.model.layers.N…` (older llava-hf),
//! `base_model.model.model.layers.N…` (CoIN/LLaVA), plus vision-tower, projector and lm_head
//! modules. Options we do not implement (DoRA, fan_in_fan_out, biases, modules_to_save,
//! MoELoRA routers) are refused with the key that caused it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::read_json;
use super::linear::{Adapter, Lora};
use super::llava::Llava;
use super::load::read_tensor_file;
use super::{MlError, Result};

/// A loaded PEFT LoRA adapter.
#[derive(Clone, Debug)]
pub struct PeftLora {
    /// The adapter directory.
    pub dir: PathBuf,
    /// The raw adapter_config.json.
    pub config: Value,
    /// Canonical linear name → LoRA.
    pub layers: BTreeMap<String, Lora>,
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

impl PeftLora {
    /// Read an adapter directory onto `device` in `dtype` (keep f32 for training).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let config = read_json(&cfg_path)?;
        let peft_type = config
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(unsupported(
                &cfg_path,
                format!("peft_type \"{peft_type}\" (only LORA)"),
            ));
        }
        for key in ["use_dora", "fan_in_fan_out"] {
            if config.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(&cfg_path, format!("{key} = true")));
            }
        }
        if let Some(b) = config.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(unsupported(
                    &cfg_path,
                    format!("bias = \"{b}\" (only none)"),
                ));
            }
        }
        if let Some(m) = config.get("modules_to_save").and_then(Value::as_array) {
            if !m.is_empty() {
                return Err(unsupported(
                    &cfg_path,
                    "modules_to_save is not empty".into(),
                ));
            }
        }
        let alpha = config
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| MlError::Parse {
                path: cfg_path.clone(),
                message: "no numeric 'lora_alpha'".into(),
            })?;
        let rslora = config.get("use_rslora").and_then(Value::as_bool) == Some(true);
        let alpha_pattern: Vec<(String, f64)> = config
            .get("alpha_pattern")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a)))
                    .collect()
            })
            .unwrap_or_default();

        let weights = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| MlError::NotAModel {
                path: dir.to_path_buf(),
                message: "no adapter_model.safetensors or adapter_model.bin".into(),
            })?;
        let mut a_map: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut b_map: BTreeMap<String, Tensor> = BTreeMap::new();
        for (key, t) in read_tensor_file(&weights)? {
            let k = key.strip_prefix("base_model.model.").unwrap_or(&key);
            let k = k.replace(".default.", ".");
            let (module, which) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, 'A')
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, 'B')
            } else {
                return Err(unsupported(
                    &weights,
                    format!("tensor '{key}' is not a LoRA A/B weight (MoELoRA and other tuners are not supported here)"),
                ));
            };
            let name = canonical_module(module).ok_or_else(|| {
                unsupported(
                    &weights,
                    format!("tensor '{key}': unknown module '{module}'"),
                )
            })?;
            let t = t.to_dtype(dtype)?.to_device(device)?;
            if which == 'A' {
                a_map.insert(name, t);
            } else {
                b_map.insert(name, t);
            }
        }
        let mut layers = BTreeMap::new();
        for (name, a) in a_map {
            let b = b_map.remove(&name).ok_or_else(|| MlError::MissingTensor {
                name: format!("{name}.lora_B.weight"),
                source_desc: format!("'{}'", weights.display()),
            })?;
            let (r, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            if r != rb {
                return Err(MlError::ShapeMismatch {
                    name: format!("{name}.lora_B.weight"),
                    source_desc: format!("'{}'", weights.display()),
                    expected: vec![b.dim(0)?, r],
                    actual: b.dims().to_vec(),
                });
            }
            let a_alpha = alpha_pattern
                .iter()
                .find(|(p, _)| name == *p || name.ends_with(&format!(".{p}")))
                .map(|(_, a)| *a)
                .unwrap_or(alpha);
            let scale = if rslora {
                a_alpha / (r as f64).sqrt()
            } else {
                a_alpha / r as f64
            };
            layers.insert(
                name,
                Lora {
                    a,
                    b,
                    scale,
                    dropout: None,
                },
            );
        }
        if let Some((name, _)) = b_map.into_iter().next() {
            return Err(MlError::MissingTensor {
                name: format!("{name}.lora_A.weight"),
                source_desc: format!("'{}'", weights.display()),
            });
        }
        Ok(PeftLora {
            dir: dir.to_path_buf(),
            config,
            layers,
        })
    }

    /// Attach to the model's linears (replacing any adapter). Adapters on vision layers past the
    /// selected feature layer are skipped (those layers never run). Returns how many were
    /// attached.
    pub fn attach(&self, model: &mut Llava) -> Result<usize> {
        let vision_layers = model.vision.layers.len();
        let mut linears: BTreeMap<String, &mut super::linear::Linear> =
            model.linears_mut().into_iter().collect();
        let mut n = 0;
        for (name, lora) in &self.layers {
            match linears.get_mut(name) {
                Some(lin) => {
                    let (out_f, in_f) = lin.weight.dims2()?;
                    if lora.a.dim(1)? != in_f || lora.b.dim(0)? != out_f {
                        return Err(MlError::ShapeMismatch {
                            name: format!("{name}.lora_A/B"),
                            source_desc: format!("'{}'", self.dir.display()),
                            expected: vec![out_f, in_f],
                            actual: vec![lora.b.dim(0)?, lora.a.dim(1)?],
                        });
                    }
                    lin.adapter = Some(Adapter::Lora(lora.clone()));
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
                                "the adapter targets '{name}', which the model does not have"
                            ),
                        });
                    }
                }
            }
        }
        Ok(n)
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
        let ok = PeftLora::load(dir, &dev, DType::F32).expect("loads");
        let l = &ok.layers["language_model.layers.0.self_attn.q_proj"];
        assert_eq!(l.scale, 8.0 / 2f64.sqrt());
        write_cfg(
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "use_dora": true}),
        );
        let e = PeftLora::load(dir, &dev, DType::F32).expect_err("dora refused");
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
        let e = PeftLora::load(dir, &dev, DType::F32).expect_err("router refused");
        assert!(e.to_string().contains("lora_router"), "{e}");
    }
}
