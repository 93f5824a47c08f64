//! `coin model init --tiny`: a small random LLaVA-1.5 written in llava-hf format (or, for tests,
//! the new llava-hf key layout or the CoIN split setup), read back by the same loaders.
//!
//! Tiny config: CLIP 32×32 px images, patch 8 (16 patch features), width 32, MLP 64, 2 layers,
//! 4 heads, quick_gelu; LLaMA width 64, SwiGLU 128, 2 layers, 4 query / 2 key-value heads
//! (head_dim 16), vocab = the tokenizer's (a byte-level BPE of ≤ 384 entries: 256 byte symbols,
//! `<unk>` `<s>` `</s>` `<image>` and merges learnt from the vicuna_v1 template text plus an
//! optional corpus), so any text encodes. Weights come from our seeded RNG: same seed, same bytes.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::config::{Activation, ClipConfig, FeatureSelect, ImageToken, LlamaConfig, LlavaConfig};
use super::image::ImageProcessor;
use super::load::write_safetensors;
use super::rng::Rng;
use super::template::{vicuna_v1, VICUNA_V1_SYSTEM};
use super::{MlError, Result};
use crate::store::fsutil::write_atomic;

/// Special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 4] = ["<unk>", "<s>", "</s>", "<image>"];

/// Which on-disk form to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TinyLayout {
    /// llava-hf hub layout (`language_model.model.*`): the default.
    Hf,
    /// llava-hf transformers ≥ 4.52 names (`model.language_model.*`, `lm_head.weight`).
    HfNew,
    /// CoIN split: `llm/` (sharded, with index.json), `clip/`, `mm_projector.safetensors`.
    Split,
}

/// How large the random language model is (the vision tower stays tiny: 32 px, patch 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TinySize {
    /// Width 64, 2 layers (tests, the demo): ~0.1 M parameters.
    Tiny,
    /// Width 512, 4 layers, 8 heads: ~13 M parameters (CPU benchmarks).
    Small,
    /// TinyLlama-1.1B's decoder shape (width 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632)
    /// with the tiny vocabulary: ~0.97 B parameters (GPU benchmarks).
    #[value(name = "1b")]
    Llama1b,
}

/// Options of a tiny model.
#[derive(Clone, Debug)]
pub struct TinyOptions {
    /// RNG seed.
    pub seed: u64,
    /// Extra tokenizer training text.
    pub corpus: String,
    /// On-disk form.
    pub layout: TinyLayout,
    /// Tokenizer vocabulary target (byte alphabet + specials + merges).
    pub vocab_size: usize,
    /// Language-model size.
    pub size: TinySize,
}

impl Default for TinyOptions {
    fn default() -> Self {
        TinyOptions {
            seed: 0,
            corpus: String::new(),
            layout: TinyLayout::Hf,
            vocab_size: 384,
            size: TinySize::Tiny,
        }
    }
}

fn tok_err(e: impl std::fmt::Display) -> MlError {
    MlError::Tokenizer {
        context: "building the tiny tokenizer".into(),
        message: e.to_string(),
    }
}

/// Train the tiny byte-level BPE tokenizer.
pub fn tiny_tokenizer(corpus: &str, vocab_size: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    // The template is in every prompt: weigh it like that (a pair seen once is never merged,
    // and a system prompt spelled byte by byte makes every sequence ~100 tokens longer).
    let mut lines: Vec<String> = Vec::new();
    for _ in 0..4 {
        lines.push(VICUNA_V1_SYSTEM.to_string());
        lines.push(vicuna_v1(&[(
            "<image>\nWhat is in the image?",
            Some("A picture."),
        )]));
    }
    lines.extend(corpus.lines().map(str::to_string));
    tok.train(&mut trainer, lines.iter()).map_err(tok_err)?;
    let template = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(tok_err)?
        .special_tokens(vec![("<s>".to_string(), 1u32)])
        .build()
        .map_err(tok_err)?;
    tok.with_post_processor(Some(template));
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        if tok.token_to_id(s) != Some(i as u32) {
            return Err(tok_err(format!("special token {s} did not get id {i}")));
        }
    }
    Ok(tok)
}

/// The tiny config for a vocabulary size.
pub fn tiny_config(vocab_size: usize) -> LlavaConfig {
    LlavaConfig {
        vision: ClipConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 32,
            patch_size: 8,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        },
        text: LlamaConfig {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 1024,
            tie_word_embeddings: false,
            bos_token_id: 1,
            eos_token_ids: vec![2],
            attention_bias: false,
            mlp_bias: false,
        },
        vision_feature_layer: -2,
        feature_select: FeatureSelect::Patch,
        projector_act: Activation::Gelu,
        projector_bias: true,
        image_token: ImageToken::Id(3),
        pad_token_id: 0,
    }
}

/// The config of a model size (see [`TinySize`]).
pub fn sized_config(vocab_size: usize, size: TinySize) -> LlavaConfig {
    let mut c = tiny_config(vocab_size);
    let t = &mut c.text;
    let (h, inter, layers, heads, kv) = match size {
        TinySize::Tiny => return c,
        TinySize::Small => (512, 1376, 4, 8, 8),
        TinySize::Llama1b => (2048, 5632, 22, 32, 4),
    };
    t.hidden_size = h;
    t.intermediate_size = inter;
    t.num_hidden_layers = layers;
    t.num_attention_heads = heads;
    t.num_key_value_heads = kv;
    t.head_dim = h / heads;
    t.max_position_embeddings = 2048;
    c
}

struct Init {
    rng: Rng,
    out: Vec<(String, Tensor)>,
}

impl Init {
    fn normal(&mut self, name: String, shape: &[usize], std: f64) -> Result<()> {
        let n = shape.iter().product();
        let v = self.rng.normal_vec(n, std);
        self.out
            .push((name, Tensor::from_vec(v, shape, &Device::Cpu)?));
        Ok(())
    }
    fn ones(&mut self, name: String, dim: usize) -> Result<()> {
        self.out.push((
            name,
            Tensor::ones(dim, candle_core::DType::F32, &Device::Cpu)?,
        ));
        Ok(())
    }
    fn linear(&mut self, p: &str, i: usize, o: usize, bias: bool) -> Result<()> {
        self.normal(format!("{p}.weight"), &[o, i], 1.0 / (i as f64).sqrt())?;
        if bias {
            self.normal(format!("{p}.bias"), &[o], 0.02)?;
        }
        Ok(())
    }
}

/// Random weights with canonical llava-hf (old layout) names.
pub fn tiny_weights(config: &LlavaConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut w = Init {
        rng: Rng::new(seed),
        out: Vec::new(),
    };
    let v = &config.vision;
    let d = v.hidden_size;
    let vp = "vision_tower.vision_model";
    w.normal(
        format!("{vp}.embeddings.patch_embedding.weight"),
        &[d, v.num_channels, v.patch_size, v.patch_size],
        1.0 / ((v.num_channels * v.patch_size * v.patch_size) as f64).sqrt(),
    )?;
    w.normal(format!("{vp}.embeddings.class_embedding"), &[d], 0.5)?;
    w.normal(
        format!("{vp}.embeddings.position_embedding.weight"),
        &[v.num_patches() + 1, d],
        0.5,
    )?;
    w.ones(format!("{vp}.pre_layrnorm.weight"), d)?;
    w.normal(format!("{vp}.pre_layrnorm.bias"), &[d], 0.02)?;
    for i in 0..v.num_hidden_layers {
        let l = format!("{vp}.encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            w.linear(&format!("{l}.self_attn.{n}"), d, d, true)?;
        }
        w.linear(&format!("{l}.mlp.fc1"), d, v.intermediate_size, true)?;
        w.linear(&format!("{l}.mlp.fc2"), v.intermediate_size, d, true)?;
        for n in ["layer_norm1", "layer_norm2"] {
            w.ones(format!("{l}.{n}.weight"), d)?;
            w.normal(format!("{l}.{n}.bias"), &[d], 0.02)?;
        }
    }
    w.ones(format!("{vp}.post_layernorm.weight"), d)?;
    w.normal(format!("{vp}.post_layernorm.bias"), &[d], 0.02)?;
    let t = &config.text;
    let h = t.hidden_size;
    w.linear("multi_modal_projector.linear_1", d, h, true)?;
    w.linear("multi_modal_projector.linear_2", h, h, true)?;
    let lp = "language_model.model";
    w.normal(format!("{lp}.embed_tokens.weight"), &[t.vocab_size, h], 1.0)?;
    let q = t.num_attention_heads * t.head_dim;
    let kv = t.num_key_value_heads * t.head_dim;
    for i in 0..t.num_hidden_layers {
        let l = format!("{lp}.layers.{i}");
        w.linear(&format!("{l}.self_attn.q_proj"), h, q, false)?;
        w.linear(&format!("{l}.self_attn.k_proj"), h, kv, false)?;
        w.linear(&format!("{l}.self_attn.v_proj"), h, kv, false)?;
        w.linear(&format!("{l}.self_attn.o_proj"), q, h, false)?;
        w.linear(&format!("{l}.mlp.gate_proj"), h, t.intermediate_size, false)?;
        w.linear(&format!("{l}.mlp.up_proj"), h, t.intermediate_size, false)?;
        w.linear(&format!("{l}.mlp.down_proj"), t.intermediate_size, h, false)?;
        w.ones(format!("{l}.input_layernorm.weight"), h)?;
        w.ones(format!("{l}.post_attention_layernorm.weight"), h)?;
    }
    w.ones(format!("{lp}.norm.weight"), h)?;
    w.linear("language_model.lm_head", h, t.vocab_size, false)?;
    Ok(w.out)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|source| MlError::Encode {
        what: "a model file",
        source,
    })?;
    s.push('\n');
    write_atomic(path, s).map_err(|source| MlError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|source| MlError::Write {
        path: p.to_path_buf(),
        source,
    })
}

/// Rename keys: old llava-hf layout → another.
fn rename(
    weights: Vec<(String, Tensor)>,
    f: impl Fn(&str) -> Option<String>,
) -> Vec<(String, Tensor)> {
    weights
        .into_iter()
        .filter_map(|(k, t)| f(&k).map(|k| (k, t)))
        .collect()
}

/// Write a tiny model into `dir`. Returns the directory to pass as `--model` (for the split
/// layout: `dir/llm`, with `dir/clip` and `dir/mm_projector.safetensors` beside it).
pub fn write_tiny(dir: &Path, opts: &TinyOptions) -> Result<PathBuf> {
    mkdir(dir)?;
    let tok = tiny_tokenizer(&opts.corpus, opts.vocab_size)?;
    let vocab = tok.get_vocab_size(true);
    let config = sized_config(vocab, opts.size);
    let weights = tiny_weights(&config, opts.seed)?;
    let tok_json = tok.to_string(true).map_err(tok_err)?;
    let pre = ImageProcessor::clip(config.vision.image_size).to_json();
    let write_tok = |d: &Path| -> Result<()> {
        let p = d.join("tokenizer.json");
        write_atomic(&p, &tok_json).map_err(|source| MlError::Write { path: p, source })?;
        write_json(
            &d.join("tokenizer_config.json"),
            &serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "pad_token": "<unk>", "image_token": "<image>",
                "padding_side": "left", "model_max_length": config.text.max_position_embeddings,
            }),
        )
    };
    match opts.layout {
        TinyLayout::Hf | TinyLayout::HfNew => {
            let weights = if opts.layout == TinyLayout::HfNew {
                rename(weights, |k| {
                    Some(if let Some(r) = k.strip_prefix("language_model.model.") {
                        format!("model.language_model.{r}")
                    } else if k == "language_model.lm_head.weight" {
                        "lm_head.weight".into()
                    } else {
                        format!("model.{k}")
                    })
                })
            } else {
                weights
            };
            write_safetensors(&dir.join("model.safetensors"), &weights)?;
            write_json(&dir.join("config.json"), &config.to_hf_json())?;
            write_json(&dir.join("preprocessor_config.json"), &pre)?;
            write_tok(dir)?;
            write_json(
                &dir.join("generation_config.json"),
                &serde_json::json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
            )?;
            Ok(dir.to_path_buf())
        }
        TinyLayout::Split => {
            let llm = dir.join("llm");
            let clip = dir.join("clip");
            mkdir(&llm)?;
            mkdir(&clip)?;
            let lm = rename(weights.clone(), |k| {
                if let Some(r) = k.strip_prefix("language_model.model.") {
                    Some(format!("model.{r}"))
                } else if k == "language_model.lm_head.weight" {
                    Some("lm_head.weight".into())
                } else {
                    None
                }
            });
            // Two shards + index, as real Vicuna checkpoints are stored.
            let (a, b): (Vec<_>, Vec<_>) = lm.into_iter().partition(|(k, _)| {
                k.starts_with("model.layers.0.") || k.starts_with("model.embed")
            });
            let names = [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ];
            let mut map = serde_json::Map::new();
            for (shard, file) in [(&a, names[0]), (&b, names[1])] {
                for (k, _) in shard.iter() {
                    map.insert(k.clone(), file.into());
                }
                write_safetensors(&llm.join(file), shard)?;
            }
            write_json(
                &llm.join("model.safetensors.index.json"),
                &serde_json::json!({"metadata": {}, "weight_map": map}),
            )?;
            let mut llm_cfg = config.text.to_json();
            if let Some(o) = llm_cfg.as_object_mut() {
                o.insert(
                    "architectures".into(),
                    serde_json::json!(["LlamaForCausalLM"]),
                );
                o.insert("pad_token_id".into(), serde_json::json!(0));
            }
            write_json(&llm.join("config.json"), &llm_cfg)?;
            write_tok(&llm)?;
            let vis = rename(weights.clone(), |k| {
                k.strip_prefix("vision_tower.").map(str::to_string)
            });
            write_safetensors(&clip.join("model.safetensors"), &vis)?;
            write_json(
                &clip.join("config.json"),
                &serde_json::json!({"model_type": "clip", "vision_config": config.vision.to_json()}),
            )?;
            write_json(&clip.join("preprocessor_config.json"), &pre)?;
            let proj = rename(weights, |k| {
                k.strip_prefix("multi_modal_projector.linear_1.")
                    .map(|r| format!("model.mm_projector.0.{r}"))
                    .or_else(|| {
                        k.strip_prefix("multi_modal_projector.linear_2.")
                            .map(|r| format!("model.mm_projector.2.{r}"))
                    })
            });
            write_safetensors(&dir.join("mm_projector.safetensors"), &proj)?;
            Ok(llm)
        }
    }
}
