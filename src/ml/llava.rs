//! LLaVA-1.5: vision tower → projector → image features spliced into the decoder's input
//! embeddings at the `<image>` position; plus loading a whole model (weights, tokenizer, image
//! processor) from a llava-hf directory or the CoIN split setup.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::clip::ClipVision;
use super::config::{read_json, LlavaConfig};
use super::image::ImageProcessor;
use super::linear::Linear;
use super::llama::Llama;
use super::load::{self, Layout, Prefixes, SplitPaths, TensorStore};
use super::projector::Projector;
use super::template::{PromptTokenizer, TokenizerChoice};
use super::{MlError, Result};

/// One piece of a tokenized prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Token ids.
    Text(Vec<u32>),
    /// One image's features go here (`image_seq_len` positions).
    Image,
}

/// The model.
pub struct Llava {
    /// Configuration.
    pub config: LlavaConfig,
    /// Vision tower (frozen).
    pub vision: ClipVision,
    /// Projector.
    pub projector: Projector,
    /// Decoder.
    pub llm: Llama,
    /// Layout the weights came from.
    pub layout: Layout,
    /// Device of the weights.
    pub device: Device,
    /// Dtype of the weights.
    pub dtype: DType,
}

impl Llava {
    /// Build from loaded tensors.
    pub fn from_store(
        config: LlavaConfig,
        store: &TensorStore,
        prefixes: &Prefixes,
        layout: Layout,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let vision = ClipVision::load(
            &store.vb(&prefixes.vision),
            &config.vision,
            config.vision_layers_used()?,
        )?;
        let projector = Projector::load(
            &store.vb(&prefixes.projector[0]),
            &store.vb(&prefixes.projector[1]),
            config.vision.hidden_size,
            config.text.hidden_size,
            config.projector_bias,
            config.projector_act,
        )?;
        let lm_head_name = if store.contains(&prefixes.lm_head) || !config.text.tie_word_embeddings
        {
            prefixes.lm_head.clone()
        } else {
            format!("{}.embed_tokens.weight", prefixes.llm)
        };
        let lm_head = store.get(
            &lm_head_name,
            &[config.text.vocab_size, config.text.hidden_size],
        )?;
        let llm = Llama::load(&store.vb(&prefixes.llm), &lm_head, &config.text)?;
        Ok(Llava {
            config,
            vision,
            projector,
            llm,
            layout,
            device: device.clone(),
            dtype,
        })
    }

    /// Projected image features (b, image_seq_len, text_hidden) of pixel values (b, 3, H, W).
    pub fn image_features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let f = self.vision.forward(pixels, self.config.feature_select)?;
        self.projector.forward(&f)
    }

    /// Input embeddings of one row: text embeddings with image features spliced in; each
    /// `Segment::Image` takes the next tensor of `features` (image_seq_len, hidden).
    pub fn embed_row(
        &self,
        segments: &[Segment],
        features: &mut dyn Iterator<Item = Tensor>,
    ) -> Result<Tensor> {
        let mut parts = Vec::new();
        for s in segments {
            match s {
                Segment::Text(ids) if ids.is_empty() => {}
                Segment::Text(ids) => {
                    let t = Tensor::new(ids.as_slice(), &self.device)?;
                    parts.push(self.llm.embed(&t)?);
                }
                Segment::Image => {
                    let f = features.next().ok_or_else(|| {
                        MlError::Input("the prompt has more <image> places than images".into())
                    })?;
                    parts.push(f.to_dtype(self.dtype)?);
                }
            }
        }
        if parts.is_empty() {
            return Err(MlError::Input("empty prompt".into()));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Every linear layer with a canonical name, for attaching adapters:
    /// `language_model.layers.N.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj}`,
    /// `vision_tower.encoder.layers.N.{self_attn.{q,k,v,out}_proj,mlp.fc{1,2}}`,
    /// `multi_modal_projector.linear_{1,2}`, `lm_head`.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v: Vec<(String, &mut Linear)> = Vec::new();
        for (i, l) in self.llm.layers.iter_mut().enumerate() {
            let p = format!("language_model.layers.{i}");
            let a = &mut l.self_attn;
            v.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            v.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            v.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            v.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut l.mlp;
            v.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            v.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            v.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        for (i, l) in self.vision.layers.iter_mut().enumerate() {
            let p = format!("vision_tower.encoder.layers.{i}");
            v.push((format!("{p}.self_attn.q_proj"), &mut l.q_proj));
            v.push((format!("{p}.self_attn.k_proj"), &mut l.k_proj));
            v.push((format!("{p}.self_attn.v_proj"), &mut l.v_proj));
            v.push((format!("{p}.self_attn.out_proj"), &mut l.out_proj));
            v.push((format!("{p}.mlp.fc1"), &mut l.fc1));
            v.push((format!("{p}.mlp.fc2"), &mut l.fc2));
        }
        v.push((
            "multi_modal_projector.linear_1".into(),
            &mut self.projector.linear_1,
        ));
        v.push((
            "multi_modal_projector.linear_2".into(),
            &mut self.projector.linear_2,
        ));
        v.push(("lm_head".into(), &mut self.llm.lm_head));
        v
    }

    /// Remove every adapter.
    pub fn clear_adapters(&mut self) {
        for (_, l) in self.linears_mut() {
            l.adapter = None;
        }
    }
}

/// Where a model comes from.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A llava-hf directory (config.json with `vision_config`/`text_config`).
    Hf(PathBuf),
    /// The CoIN split setup.
    Split(SplitPaths),
}

impl ModelSource {
    /// `--model DIR` with optional `--vision-tower DIR` / `--projector FILE`: a llava-hf dir
    /// when its config has a `vision_config`, otherwise the split setup (the vision tower must
    /// then be given, or be a local directory named by `mm_vision_tower`).
    pub fn resolve(model: &Path, vision: Option<&Path>, projector: Option<&Path>) -> Result<Self> {
        let cfg_path = model.join("config.json");
        if !cfg_path.exists() {
            return Err(MlError::NotAModel {
                path: model.to_path_buf(),
                message: "no config.json".into(),
            });
        }
        let cfg = read_json(&cfg_path)?;
        if vision.is_none() && cfg.get("vision_config").is_some() {
            return Ok(ModelSource::Hf(model.to_path_buf()));
        }
        let vision = match vision {
            Some(v) => v.to_path_buf(),
            None => {
                let named = cfg
                    .get("mm_vision_tower")
                    .and_then(|v| v.as_str())
                    .map(|s| model.join(s))
                    .filter(|p| p.join("config.json").exists());
                named.ok_or_else(|| MlError::NotAModel {
                    path: model.to_path_buf(),
                    message: "config.json has no vision_config (not llava-hf); for the CoIN \
                              setup give the CLIP directory with --vision-tower"
                        .into(),
                })?
            }
        };
        Ok(ModelSource::Split(SplitPaths {
            llm: model.to_path_buf(),
            vision,
            projector: projector.map(Path::to_path_buf),
        }))
    }

    /// The directory holding the tokenizer and preprocessor config.
    pub fn main_dir(&self) -> &Path {
        match self {
            ModelSource::Hf(d) => d,
            ModelSource::Split(s) => &s.llm,
        }
    }
}

/// A model ready to use: weights, tokenizer and image preprocessing.
pub struct LoadedModel {
    /// The network.
    pub model: Llava,
    /// Prompt → token ids / segments, ids → text.
    pub tokenizer: PromptTokenizer,
    /// Image → pixel values.
    pub image: ImageProcessor,
    /// Where it came from.
    pub source: ModelSource,
}

/// Load a model on `device` in `dtype`.
pub fn load_model(source: &ModelSource, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let (config, store, prefixes, layout) = match source {
        ModelSource::Hf(dir) => {
            let cfg_path = dir.join("config.json");
            let config = LlavaConfig::from_hf_json(&read_json(&cfg_path)?, &cfg_path)?;
            let files = load::checkpoint_files(dir)?;
            let store = TensorStore::from_files(&files, device, dtype)?;
            let (layout, prefixes) = load::hf_prefixes(&store, dir)?;
            (config, store, prefixes, layout)
        }
        ModelSource::Split(paths) => {
            let (config, store, prefixes) = load::load_split(paths, device, dtype)?;
            (config, store, prefixes, Layout::Split)
        }
    };
    let model = Llava::from_store(config, &store, &prefixes, layout, device, dtype)?;
    drop(store);
    let main = source.main_dir();
    // LLaVA loads the split setup's tokenizer with `use_fast=False` (the slow SentencePiece
    // tokenizer when the folder has `tokenizer.model`); llava-hf folders use `tokenizer.json`.
    let choice = match source {
        ModelSource::Hf(_) => TokenizerChoice::PreferFast,
        ModelSource::Split(_) => TokenizerChoice::PreferSlow,
    };
    let tokenizer = PromptTokenizer::from_dir_with(main, &model.config, choice)?;
    let image_dir = match source {
        ModelSource::Hf(d) => d.clone(),
        ModelSource::Split(s) => {
            if s.llm.join("preprocessor_config.json").exists() {
                s.llm.clone()
            } else {
                s.vision.clone()
            }
        }
    };
    let image = ImageProcessor::from_dir(&image_dir, model.config.vision.image_size)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        image,
        source: source.clone(),
    })
}
