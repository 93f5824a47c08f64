//! Full-parameter training of the language model and the projector (the demo's "pre-training"
//! of a tiny base), and saving the result as a new llava-hf model directory.
//!
//! [`TrainableParams::attach_full`] turns every weight of the LLM — token embeddings, every
//! decoder linear, both RMSNorms of every layer, the final norm and `lm_head` — plus the
//! projector's weights and biases into trainable `Var`s (f32, f64 for an f64 model) that the
//! ordinary [`super::trainer::train`] loop updates. With [`FullScope::WithVisionTower`] every
//! tensor of the CLIP tower that runs (patch and position embeddings, class embedding, every
//! layer norm, every encoder linear) is trained too: the demo's tiny base starts from a
//! random tower, whose 32-wide random features lose the shapes and written words of the
//! pictures. (Real LLaVA keeps CLIP frozen: use [`FullScope::LanguageModel`] there.) A model
//! with tied embeddings is refused (one var would have to serve two places).
//!
//! Var names: `language_model.embed_tokens.weight`, `language_model.layers.N.<linear>.weight`
//! (the canonical linear names of [`Llava::linears_mut`] + `.weight`),
//! `language_model.layers.N.{input,post_attention}_layernorm.weight`,
//! `language_model.norm.weight`, `lm_head.weight`, `multi_modal_projector.linear_{1,2}.{weight,bias}`,
//! and for the tower `vision_tower.<key under the CLIP vision model>` (e.g.
//! `vision_tower.embeddings.patch_embedding.weight`, held flattened as (d, c·p·p);
//! `vision_tower.encoder.layers.N.self_attn.q_proj.weight`).
//!
//! [`save_full_model`] writes a llava-hf directory: the source model's `model.safetensors` with
//! every trained tensor replaced (same key names and layout, so the vision tower is copied
//! bit for bit), and its config, tokenizer and preprocessor files copied.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};

use super::dropout::Dropout;
use super::params::{AdapterKind, AdapterSettings, TrainableParams};
use crate::ml::llama::compute_dtype;
use crate::ml::llava::Llava;
use crate::ml::load::{checkpoint_files, read_tensor_file, write_safetensors, Layout};
use crate::ml::{MlError, Result};

/// The files of a model directory (llava-hf, or the split setup's language model with its
/// SentencePiece tokenizer) copied unchanged by [`save_full_model`] (when present).
pub const COPIED_FILES: [&str; 7] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
];

fn to_var(t: &Tensor, dtype: DType) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
}

/// Which weights full training updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullScope {
    /// The language model and the projector (the vision tower stays frozen, as in LLaVA).
    LanguageModel,
    /// The language model, the projector and the vision tower (a random tiny base).
    WithVisionTower,
}

impl TrainableParams {
    /// Make every LLM weight and the projector trainable, and the vision tower too for
    /// [`FullScope::WithVisionTower`] (see the module docs). Any adapter is removed first.
    /// `seed` only seeds the (unused: full training has no dropout) dropout stream; the
    /// recorded `settings` are placeholders (no adapter).
    pub fn attach_full(model: &mut Llava, seed: u64, scope: FullScope) -> Result<Self> {
        if model.config.text.tie_word_embeddings {
            return Err(MlError::Input(
                "full training of a model with tied embeddings is not supported".into(),
            ));
        }
        model.clear_adapters();
        let dtype = compute_dtype(model.dtype);
        let mut vars = Vec::new();
        let llm = &mut model.llm;
        let e = to_var(&llm.embed_tokens, dtype)?;
        llm.embed_tokens = e.as_tensor().clone();
        vars.push(("language_model.embed_tokens.weight".to_string(), e));
        for (i, l) in llm.layers.iter_mut().enumerate() {
            for (n, norm) in [
                ("input_layernorm", &mut l.input_layernorm),
                ("post_attention_layernorm", &mut l.post_attention_layernorm),
            ] {
                let v = to_var(&norm.weight, dtype)?;
                norm.weight = v.as_tensor().clone();
                vars.push((format!("language_model.layers.{i}.{n}.weight"), v));
            }
        }
        let v = to_var(&llm.norm.weight, dtype)?;
        llm.norm.weight = v.as_tensor().clone();
        vars.push(("language_model.norm.weight".to_string(), v));
        if scope == FullScope::WithVisionTower {
            for (name, t) in model.vision.tensors_mut() {
                let v = to_var(t, dtype)?;
                *t = v.as_tensor().clone();
                vars.push((format!("vision_tower.{name}"), v));
            }
        }
        for (name, lin) in model.linears_mut() {
            if name.starts_with("vision_tower.") && scope == FullScope::LanguageModel {
                continue;
            }
            let w = to_var(&lin.weight, dtype)?;
            lin.weight = w.as_tensor().clone();
            vars.push((format!("{name}.weight"), w));
            if let Some(b) = &lin.bias {
                let b = to_var(b, dtype)?;
                lin.bias = Some(b.as_tensor().clone());
                vars.push((format!("{name}.bias"), b));
            }
        }
        let settings = AdapterSettings {
            kind: AdapterKind::Lora,
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            targets: Vec::new(),
            seed,
            train_projector: true,
        };
        Ok(TrainableParams {
            vars,
            dropout: Dropout::new(0.0, seed ^ 0xD50F),
            settings,
            layout: model.layout,
        })
    }
}

/// The key of a full-mode var in a llava-hf weights file of `layout`.
pub fn hf_key(layout: Layout, var_name: &str) -> Result<String> {
    let key = match (layout, var_name) {
        (Layout::HfOld, "lm_head.weight") => "language_model.lm_head.weight".to_string(),
        (Layout::HfNew, "lm_head.weight") => "lm_head.weight".to_string(),
        (Layout::HfOld, n) if n.starts_with("language_model.") => {
            format!("language_model.model.{}", &n["language_model.".len()..])
        }
        (Layout::HfNew, n) if n.starts_with("language_model.") => format!("model.{n}"),
        (Layout::HfOld, n) if n.starts_with("multi_modal_projector.") => n.to_string(),
        (Layout::HfNew, n) if n.starts_with("multi_modal_projector.") => format!("model.{n}"),
        (Layout::HfOld, n) if n.starts_with("vision_tower.") => {
            format!("vision_tower.vision_model.{}", &n["vision_tower.".len()..])
        }
        (Layout::HfNew, n) if n.starts_with("vision_tower.") => {
            format!(
                "model.vision_tower.vision_model.{}",
                &n["vision_tower.".len()..]
            )
        }
        _ => {
            return Err(MlError::Input(format!(
                "cannot save '{var_name}' of a {layout:?} model as a llava-hf model (only \
                 llava-hf models can be saved in full)"
            )))
        }
    };
    Ok(key)
}

/// Write `params` (from [`TrainableParams::attach_full`]) as a new llava-hf model in `out`,
/// taking every other tensor and the config/tokenizer files from `source` (the directory the
/// model was loaded from). Returns `out`.
pub fn save_full_model(params: &TrainableParams, source: &Path, out: &Path) -> Result<PathBuf> {
    let files = checkpoint_files(source)?;
    let mut tensors = Vec::new();
    for f in &files {
        tensors.extend(read_tensor_file(f)?);
    }
    let mut replaced = 0usize;
    for (name, var) in &params.vars {
        let mut key = hf_key(params.layout, name)?;
        if !tensors.iter().any(|(k, _)| *k == key) && key.contains(".vision_model.") {
            // Some checkpoints keep the tower without the `vision_model.` level.
            key = key.replacen(".vision_model.", ".", 1);
        }
        let slot =
            tensors
                .iter_mut()
                .find(|(k, _)| *k == key)
                .ok_or_else(|| MlError::MissingTensor {
                    name: key.clone(),
                    source_desc: source.display().to_string(),
                })?;
        // The patch embedding is held flattened: (d, c·p·p) for the checkpoint's (d, c, p, p).
        let flattened = key.ends_with("patch_embedding.weight")
            && slot.1.rank() == 4
            && slot.1.elem_count() == var.elem_count();
        if slot.1.dims() != var.dims() && !flattened {
            return Err(MlError::Input(format!(
                "'{key}' has shape {:?} in '{}', the trained var {:?}",
                slot.1.dims(),
                source.display(),
                var.dims()
            )));
        }
        slot.1 = var
            .as_tensor()
            .reshape(slot.1.dims())?
            .to_dtype(slot.1.dtype())?;
        replaced += 1;
    }
    if replaced != params.vars.len() {
        return Err(MlError::Input("not every trained tensor was saved".into()));
    }
    std::fs::create_dir_all(out).map_err(|source| MlError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    write_safetensors(&out.join("model.safetensors"), &tensors)?;
    for name in COPIED_FILES {
        let from = source.join(name);
        if !from.is_file() {
            continue;
        }
        let bytes = std::fs::read(&from).map_err(|source| MlError::Read {
            path: from.clone(),
            source,
        })?;
        let to = out.join(name);
        crate::store::fsutil::write_atomic(&to, bytes)
            .map_err(|source| MlError::Write { path: to, source })?;
    }
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::ml::llava::{load_model, ModelSource};
    use crate::ml::rng::Rng;
    use crate::ml::tiny::{write_tiny, TinyOptions};
    use crate::ml::train::batch::forward_batch;

    use crate::ml::train::tests::{batch, check_against_finite_differences, scalar};

    fn kind_of(name: &str) -> &'static str {
        if name.starts_with("vision_tower.") {
            if name.contains("layer_norm") || name.contains("layrnorm") {
                "vision_norm"
            } else if name.contains(".embeddings.") {
                "vision_embedding"
            } else {
                "vision_linear"
            }
        } else if name.contains("embed_tokens") {
            "embed_tokens"
        } else if name.contains("layernorm") || name.contains(".norm.") {
            "norm"
        } else if name.starts_with("lm_head") {
            "lm_head"
        } else if name.starts_with("multi_modal_projector") {
            "projector"
        } else if name.contains("self_attn") {
            "attention_linear"
        } else if name.contains("mlp") {
            "mlp_linear"
        } else {
            "other"
        }
    }

    /// Every kind of full-mode var: the 2 largest-|grad| entries of every var against central
    /// differences in f64; every var reached with a non-zero gradient. Both scopes.
    #[test]
    fn full_mode_gradients_match_finite_differences_and_reach_every_var() {
        full_mode_gradient_check();
    }

    /// The same with the fused CPU loop kernels (norm with a trainable weight, softmax, RoPE,
    /// SwiGLU) forced on, as in release builds.
    #[test]
    fn full_mode_gradients_match_finite_differences_with_the_fused_loop_kernels() {
        crate::ml::fused::set_loop_kernels_for_this_thread(Some(true));
        full_mode_gradient_check();
    }

    fn full_mode_gradient_check() {
        let dir = tempfile::tempdir().expect("temp dir");
        let m = write_tiny(dir.path(), &TinyOptions::default()).expect("tiny model writes");
        let src = ModelSource::resolve(&m, None, None).expect("resolves");
        for scope in [FullScope::LanguageModel, FullScope::WithVisionTower] {
            let mut model = load_model(&src, &Device::Cpu, DType::F64)
                .expect("loads")
                .model;
            let params = TrainableParams::attach_full(&mut model, 3, scope).expect("attach_full");
            let c = &model.config.text;
            // embed, 2 norms per layer, final norm, 7 linears per layer, lm_head, projector (4).
            let mut expected = 1 + 2 * c.num_hidden_layers + 1 + 7 * c.num_hidden_layers + 1 + 4;
            let mut kinds_expected = vec![
                "attention_linear",
                "embed_tokens",
                "lm_head",
                "mlp_linear",
                "norm",
                "projector",
            ];
            if scope == FullScope::WithVisionTower {
                // patch, class and position embeddings, pre-LN (2); per layer that runs:
                // 2 layer norms (4) and 6 linears with biases (12).
                expected += 5 + 16 * model.vision.layers.len();
                kinds_expected.extend(["vision_embedding", "vision_linear", "vision_norm"]);
            }
            assert_eq!(params.vars.len(), expected, "{scope:?}");
            let (ex, px) = batch(c.vocab_size as u32);
            let worst = check_against_finite_differences(&model, &params, &ex, &px, 2, kind_of);
            eprintln!("full mode {scope:?}: max relative error per kind {worst:?}");
            let kinds: Vec<&str> = worst.keys().copied().collect();
            kinds_expected.sort_unstable();
            assert_eq!(kinds, kinds_expected, "{scope:?}");
        }
    }

    /// Train-mode values (random perturbation of every var) saved and loaded back: logits
    /// identical, different from the source model; the vision tower bit-identical when it
    /// was not trained, every one of its trained tensors changed when it was.
    #[test]
    fn saved_full_model_loads_back_with_identical_logits() {
        for scope in [FullScope::LanguageModel, FullScope::WithVisionTower] {
            saved_full_model_round_trip(scope);
        }
    }

    fn saved_full_model_round_trip(scope: FullScope) {
        let dir = tempfile::tempdir().expect("temp dir");
        let m = write_tiny(&dir.path().join("src"), &TinyOptions::default()).expect("tiny");
        let src = ModelSource::resolve(&m, None, None).expect("resolves");
        let mut loaded = load_model(&src, &Device::Cpu, DType::F32).expect("loads");
        let params =
            TrainableParams::attach_full(&mut loaded.model, 3, scope).expect("attach_full");
        let mut rng = Rng::new(7);
        for (_, var) in &params.vars {
            let noise = Tensor::from_vec(
                rng.normal_vec(var.elem_count(), 0.05),
                var.shape(),
                &Device::Cpu,
            )
            .and_then(|n| n.to_dtype(var.dtype()))
            .expect("noise");
            var.set(&(var.as_tensor() + noise).expect("add"))
                .expect("set");
        }
        let (ex, px) = batch(loaded.model.config.text.vocab_size as u32);
        let (trained, _) = forward_batch(&loaded.model, &ex, &px).expect("forward");
        // The split setup's tokenizer files travel too (a Vicuna folder has no tokenizer.json).
        std::fs::copy(
            m.join("tokenizer_config.json"),
            m.join("special_tokens_map.json"),
        )
        .expect("extra tokenizer file");
        let out = save_full_model(&params, &m, &dir.path().join("out")).expect("saves");
        for f in COPIED_FILES {
            assert_eq!(out.join(f).is_file(), m.join(f).is_file(), "{f} copied");
        }
        assert!(out.join("special_tokens_map.json").is_file());
        let back = load_model(
            &ModelSource::resolve(&out, None, None).expect("resolves"),
            &Device::Cpu,
            DType::F32,
        )
        .expect("saved model loads");
        let (again, _) = forward_batch(&back.model, &ex, &px).expect("forward");
        let diff = scalar(
            &(trained.clone() - again)
                .expect("sub")
                .abs()
                .and_then(|d| d.max_all())
                .expect("max"),
        );
        assert_eq!(diff, 0.0, "logits after save/load differ by {diff}");
        let fresh = load_model(&src, &Device::Cpu, DType::F32).expect("loads");
        let (base, _) = forward_batch(&fresh.model, &ex, &px).expect("forward");
        let moved = scalar(
            &(trained - base)
                .expect("sub")
                .abs()
                .and_then(|d| d.max_all())
                .expect("max"),
        );
        assert!(moved > 1e-3, "the saved model equals the source ({moved})");
        let a: BTreeMap<String, Tensor> = read_tensor_file(&m.join("model.safetensors"))
            .expect("read")
            .into_iter()
            .collect();
        let b: BTreeMap<String, Tensor> = read_tensor_file(&out.join("model.safetensors"))
            .expect("read")
            .into_iter()
            .collect();
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "same key names"
        );
        let vision_trained: Vec<String> = params
            .vars
            .iter()
            .filter(|(n, _)| n.starts_with("vision_tower."))
            .map(|(n, _)| hf_key(params.layout, n).expect("key"))
            .collect();
        assert_eq!(
            vision_trained.is_empty(),
            scope == FullScope::LanguageModel,
            "{scope:?}"
        );
        for (k, t) in &a {
            if k.starts_with("vision_tower.") {
                let d = scalar(
                    &(t - &b[k])
                        .expect("sub")
                        .abs()
                        .and_then(|d| d.max_all())
                        .expect("max"),
                );
                if vision_trained.contains(k) {
                    assert!(d > 0.0, "{k} was trained but saved unchanged");
                } else {
                    assert_eq!(d, 0.0, "{k} copied unchanged");
                }
            }
        }
    }
}
