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
use super::load::{write_safetensors, write_safetensors_streaming};
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

/// How large the random model is (the vision tower stays tiny, 32 px, patch 8, except at 7b).
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
    /// LLaVA-1.5-7B's shapes throughout (for measurements): Vicuna-7B's decoder (width 4096,
    /// 32 layers, 32 heads, MLP 11008, vocab 32000), CLIP ViT-L/14-336 (width 1024, 24 layers,
    /// 16 heads, 336 px, 576 patches) and the 1024→4096→4096 projector; ~7.1 B parameters,
    /// written in bf16 (~14 GB on disk), one tensor at a time. The tokenizer stays tiny.
    #[value(name = "7b")]
    Llava7b,
}

impl TinySize {
    /// Bytes the weights take on disk (what `coin model init` warns about for large sizes).
    pub fn weight_bytes(self, vocab_size: usize) -> u64 {
        let config = sized_config(vocab_size, self);
        let elem = if self == TinySize::Llava7b { 2 } else { 4 };
        weight_specs(&config)
            .iter()
            .map(|w| w.shape.iter().product::<usize>() as u64 * elem)
            .sum()
    }
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
        TinySize::Llava7b => (4096, 11008, 32, 32, 32),
    };
    t.hidden_size = h;
    t.intermediate_size = inter;
    t.num_hidden_layers = layers;
    t.num_attention_heads = heads;
    t.num_key_value_heads = kv;
    t.head_dim = h / heads;
    t.max_position_embeddings = 2048;
    if size == TinySize::Llava7b {
        t.vocab_size = 32000;
        t.max_position_embeddings = 4096;
        c.vision = ClipConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        };
    }
    c
}

/// How one weight is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
enum InitKind {
    /// Normal with this standard deviation.
    Normal(f64),
    /// All ones (norm scales).
    Ones,
}

/// One weight of a random model: name (old llava-hf layout), shape, initialisation.
#[derive(Clone, Debug)]
struct WeightSpec {
    name: String,
    shape: Vec<usize>,
    init: InitKind,
}

#[derive(Default)]
struct Specs {
    out: Vec<WeightSpec>,
}

impl Specs {
    fn normal(&mut self, name: String, shape: &[usize], std: f64) {
        self.out.push(WeightSpec {
            name,
            shape: shape.to_vec(),
            init: InitKind::Normal(std),
        });
    }
    fn ones(&mut self, name: String, dim: usize) {
        self.out.push(WeightSpec {
            name,
            shape: vec![dim],
            init: InitKind::Ones,
        });
    }
    fn linear(&mut self, p: &str, i: usize, o: usize, bias: bool) {
        self.normal(format!("{p}.weight"), &[o, i], 1.0 / (i as f64).sqrt());
        if bias {
            self.normal(format!("{p}.bias"), &[o], 0.02);
        }
    }
}

/// Every weight of a model of `config`, in initialisation order.
fn weight_specs(config: &LlavaConfig) -> Vec<WeightSpec> {
    let mut w = Specs::default();
    let v = &config.vision;
    let d = v.hidden_size;
    let vp = "vision_tower.vision_model";
    w.normal(
        format!("{vp}.embeddings.patch_embedding.weight"),
        &[d, v.num_channels, v.patch_size, v.patch_size],
        1.0 / ((v.num_channels * v.patch_size * v.patch_size) as f64).sqrt(),
    );
    w.normal(format!("{vp}.embeddings.class_embedding"), &[d], 0.5);
    w.normal(
        format!("{vp}.embeddings.position_embedding.weight"),
        &[v.num_patches() + 1, d],
        0.5,
    );
    w.ones(format!("{vp}.pre_layrnorm.weight"), d);
    w.normal(format!("{vp}.pre_layrnorm.bias"), &[d], 0.02);
    for i in 0..v.num_hidden_layers {
        let l = format!("{vp}.encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            w.linear(&format!("{l}.self_attn.{n}"), d, d, true);
        }
        w.linear(&format!("{l}.mlp.fc1"), d, v.intermediate_size, true);
        w.linear(&format!("{l}.mlp.fc2"), v.intermediate_size, d, true);
        for n in ["layer_norm1", "layer_norm2"] {
            w.ones(format!("{l}.{n}.weight"), d);
            w.normal(format!("{l}.{n}.bias"), &[d], 0.02);
        }
    }
    w.ones(format!("{vp}.post_layernorm.weight"), d);
    w.normal(format!("{vp}.post_layernorm.bias"), &[d], 0.02);
    let t = &config.text;
    let h = t.hidden_size;
    w.linear("multi_modal_projector.linear_1", d, h, true);
    w.linear("multi_modal_projector.linear_2", h, h, true);
    let lp = "language_model.model";
    w.normal(format!("{lp}.embed_tokens.weight"), &[t.vocab_size, h], 1.0);
    let q = t.num_attention_heads * t.head_dim;
    let kv = t.num_key_value_heads * t.head_dim;
    for i in 0..t.num_hidden_layers {
        let l = format!("{lp}.layers.{i}");
        w.linear(&format!("{l}.self_attn.q_proj"), h, q, false);
        w.linear(&format!("{l}.self_attn.k_proj"), h, kv, false);
        w.linear(&format!("{l}.self_attn.v_proj"), h, kv, false);
        w.linear(&format!("{l}.self_attn.o_proj"), q, h, false);
        w.linear(&format!("{l}.mlp.gate_proj"), h, t.intermediate_size, false);
        w.linear(&format!("{l}.mlp.up_proj"), h, t.intermediate_size, false);
        w.linear(&format!("{l}.mlp.down_proj"), t.intermediate_size, h, false);
        w.ones(format!("{l}.input_layernorm.weight"), h);
        w.ones(format!("{l}.post_attention_layernorm.weight"), h);
    }
    w.ones(format!("{lp}.norm.weight"), h);
    w.linear("language_model.lm_head", h, t.vocab_size, false);
    w.out
}

/// Random weights with canonical llava-hf (old layout) names, all from one seeded stream (in
/// [`weight_specs`] order).
pub fn tiny_weights(config: &LlavaConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(seed);
    weight_specs(config)
        .into_iter()
        .map(|w| {
            let t = match w.init {
                InitKind::Normal(std) => {
                    let n = w.shape.iter().product();
                    Tensor::from_vec(rng.normal_vec(n, std), w.shape.as_slice(), &Device::Cpu)?
                }
                InitKind::Ones => {
                    Tensor::ones(w.shape.as_slice(), candle_core::DType::F32, &Device::Cpu)?
                }
            };
            Ok((w.name, t))
        })
        .collect()
}

/// Weight `i` of a large model, from its own seeded streams (1 Mi values per stream, drawn in
/// parallel), so the weights can be written one at a time in any order.
fn large_weight(spec: &WeightSpec, seed: u64, i: usize) -> Result<Tensor> {
    use rayon::prelude::*;
    let n: usize = spec.shape.iter().product();
    let shape = spec.shape.as_slice();
    match spec.init {
        InitKind::Ones => Ok(Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu)?),
        InitKind::Normal(std) => {
            const CHUNK: usize = 1 << 20;
            let mut v = vec![0f32; n];
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                let mut rng = Rng::new(super::rng::sub_seed(seed, i as u64, c as u64));
                for x in out.iter_mut() {
                    *x = (rng.normal() * std) as f32;
                }
            });
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        }
    }
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
    let large = opts.size == TinySize::Llava7b;
    if large && opts.layout != TinyLayout::Hf {
        return Err(MlError::Input(format!(
            "the 7b model is written in the llava-hf layout only, not {:?}; leave out --layout",
            opts.layout
        )));
    }
    // The 7b model is streamed to disk tensor by tensor; the others are built in memory.
    let weights = if large {
        Vec::new()
    } else {
        tiny_weights(&config, opts.seed)?
    };
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
            if large {
                let specs = weight_specs(&config);
                let entries: Vec<_> = specs
                    .iter()
                    .map(|w| (w.name.clone(), w.shape.clone(), candle_core::DType::BF16))
                    .collect();
                write_safetensors_streaming(&dir.join("model.safetensors"), &entries, |i| {
                    large_weight(&specs[i], opts.seed, i)
                })?;
            } else {
                write_safetensors(&dir.join("model.safetensors"), &weights)?;
            }
            let mut hf = config.to_hf_json();
            if large {
                hf["torch_dtype"] = serde_json::json!("bfloat16");
            }
            write_json(&dir.join("config.json"), &hf)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_7b_size_has_llava_1_5_7b_shapes() {
        let c = sized_config(384, TinySize::Llava7b);
        let t = &c.text;
        assert_eq!(
            (
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads,
                t.head_dim,
                t.intermediate_size,
                t.vocab_size
            ),
            (4096, 32, 32, 32, 128, 11008, 32000)
        );
        let v = &c.vision;
        assert_eq!(
            (
                v.hidden_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.intermediate_size,
                v.image_size,
                v.patch_size
            ),
            (1024, 24, 16, 4096, 336, 14)
        );
        assert_eq!(c.image_seq_len(), 576);
        let specs = weight_specs(&c);
        let shape = |n: &str| {
            specs
                .iter()
                .find(|w| w.name == n)
                .map(|w| w.shape.clone())
                .unwrap_or_else(|| panic!("no weight {n}"))
        };
        assert_eq!(shape("multi_modal_projector.linear_1.weight"), [4096, 1024]);
        assert_eq!(shape("multi_modal_projector.linear_2.weight"), [4096, 4096]);
        assert_eq!(
            shape("language_model.model.layers.31.mlp.down_proj.weight"),
            [4096, 11008]
        );
        assert_eq!(shape("language_model.lm_head.weight"), [32000, 4096]);
        // LLaVA-1.5-7B: 6.74 B in the LLM, 0.30 B in CLIP ViT-L/14-336, 0.02 B in the
        // projector: 7.06 B, 2 bytes each.
        let params: u64 = specs
            .iter()
            .map(|w| w.shape.iter().product::<usize>() as u64)
            .sum();
        assert!((7.0e9..7.1e9).contains(&(params as f64)), "{params}");
        assert_eq!(TinySize::Llava7b.weight_bytes(384), 2 * params);
        // Other layouts are refused before anything is written.
        let dir = tempfile::tempdir().expect("dir");
        let opts = TinyOptions {
            size: TinySize::Llava7b,
            layout: TinyLayout::Split,
            ..TinyOptions::default()
        };
        assert!(write_tiny(dir.path(), &opts).is_err());
        assert!(!dir.path().join("llm").exists());
    }

    #[test]
    fn streamed_safetensors_equal_the_in_memory_writer() {
        let dir = tempfile::tempdir().expect("dir");
        let config = tiny_config(300);
        let weights = tiny_weights(&config, 4).expect("weights");
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        write_safetensors(&a, &weights).expect("write");
        let entries: Vec<_> = weights
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec(), t.dtype()))
            .collect();
        write_safetensors_streaming(&b, &entries, |i| Ok(weights[i].1.clone())).expect("stream");
        assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        // A tensor of another shape than announced is an error, and nothing is left behind.
        let c = dir.path().join("c.safetensors");
        let bad = write_safetensors_streaming(&c, &entries, |_| Ok(weights[0].1.clone()));
        assert!(bad.is_err());
        assert!(!c.exists());
        // A large weight is reproducible and drawn with the asked spread.
        let spec = WeightSpec {
            name: "w".into(),
            shape: vec![3000, 1000],
            init: InitKind::Normal(0.5),
        };
        let w1: Vec<f32> = large_weight(&spec, 1, 7)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("w1");
        let w2: Vec<f32> = large_weight(&spec, 1, 7)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("w2");
        assert_eq!(w1, w2);
        let var = w1.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / w1.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
    }
}
