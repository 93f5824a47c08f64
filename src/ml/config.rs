//! Model configurations: the CLIP vision tower, the LLaMA decoder and how LLaVA joins them.
//!
//! Read from llava-hf `config.json` (with the sparse `text_config` that falls back to
//! transformers' LlamaConfig defaults, and both `rope_theta` and transformers 5's
//! `rope_parameters`), or from a separate LLaMA `config.json` plus a CLIP `config.json` (the CoIN
//! setup). Unsupported options are rejected with the key that caused it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{MlError, Result};

/// Activation functions found in the configs we support.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// torch `nn.GELU()` (erf form), HF "gelu".
    Gelu,
    /// CLIP's `x * sigmoid(1.702 x)`, HF "quick_gelu".
    QuickGelu,
    /// SiLU / swish, HF "silu".
    Silu,
}

impl Activation {
    fn parse(s: &str, path: &Path, key: &str) -> Result<Self> {
        match s {
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(MlError::Unsupported {
                path: path.to_path_buf(),
                message: format!("{key} = \"{other}\" (supported: gelu, quick_gelu, silu)"),
            }),
        }
    }

    /// The HF name of the activation.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::QuickGelu => "quick_gelu",
            Activation::Silu => "silu",
        }
    }

    /// Apply the activation (all differentiable).
    pub fn forward(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::QuickGelu => x.broadcast_mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Activation::Silu => x.silu(),
        }
    }
}

/// The CLIP vision transformer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClipConfig {
    /// Width of the transformer.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Input image side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Image channels (3).
    pub num_channels: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// MLP activation.
    pub hidden_act: Activation,
}

impl ClipConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patch features per image (CLS dropped).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Parse a `CLIPVisionConfig` object (missing keys take transformers' defaults).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let g = Getter { v, path };
        let c = ClipConfig {
            hidden_size: g.positive_usize("hidden_size", 768)?,
            intermediate_size: g.positive_usize("intermediate_size", 3072)?,
            num_hidden_layers: g.positive_usize("num_hidden_layers", 12)?,
            num_attention_heads: g.positive_usize("num_attention_heads", 12)?,
            image_size: g.positive_usize("image_size", 224)?,
            patch_size: g.positive_usize("patch_size", 32)?,
            num_channels: g.usize_or("num_channels", 3)?,
            layer_norm_eps: g.positive_f64("layer_norm_eps", 1e-5)?,
            hidden_act: Activation::parse(
                &g.str_or("hidden_act", "quick_gelu")?,
                path,
                "vision hidden_act",
            )?,
        };
        if c.num_channels != 3 {
            return Err(g.nonsense(
                "num_channels",
                c.num_channels,
                "the image processor makes RGB images (3 channels)",
            ));
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads)
            || !c.image_size.is_multiple_of(c.patch_size)
        {
            return Err(MlError::Unsupported {
                path: path.to_path_buf(),
                message: "vision hidden_size must divide by heads and image_size by patch_size"
                    .into(),
            });
        }
        Ok(c)
    }

    /// The HF `vision_config` JSON of this config.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act.hf_name(),
            "projection_dim": self.hidden_size,
        })
    }
}

/// The LLaMA decoder.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding and lm_head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id.
    pub bos_token_id: u32,
    /// End-of-sequence ids (generation stops at any).
    pub eos_token_ids: Vec<u32>,
    /// Whether q/k/v/o have biases.
    pub attention_bias: bool,
    /// Whether gate/up/down have biases.
    pub mlp_bias: bool,
}

impl LlamaConfig {
    /// Parse a `LlamaConfig` object (missing keys take transformers' defaults).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let g = Getter { v, path };
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if mt != "llama" && mt != "llava" {
                return Err(MlError::Unsupported {
                    path: path.to_path_buf(),
                    message: format!("text model_type \"{mt}\" (only llama is supported)"),
                });
            }
        }
        let hidden_size = g.positive_usize("hidden_size", 4096)?;
        let heads = g.positive_usize("num_attention_heads", 32)?;
        let kv = g.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match g.opt_usize("head_dim")? {
            Some(0) => return Err(g.nonsense("head_dim", 0, "a head needs a width")),
            Some(d) => d,
            None if !hidden_size.is_multiple_of(heads) => {
                return Err(g.nonsense(
                    "num_attention_heads",
                    heads,
                    &format!(
                        "it does not divide hidden_size {hidden_size} (and no head_dim is given)"
                    ),
                ))
            }
            None => hidden_size / heads,
        };
        let act = Activation::parse(&g.str_or("hidden_act", "silu")?, path, "hidden_act")?;
        if act != Activation::Silu {
            return Err(MlError::Unsupported {
                path: path.to_path_buf(),
                message: "LLaMA hidden_act must be silu".into(),
            });
        }
        // rope_theta: top level (transformers 4) or inside rope_parameters (transformers 5).
        let mut rope_theta = g.positive_f64("rope_theta", 10000.0)?;
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(rp) = v.get(key).filter(|x| !x.is_null()) {
                let kind = rp
                    .get("rope_type")
                    .or_else(|| rp.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if kind != "default" {
                    return Err(MlError::Unsupported {
                        path: path.to_path_buf(),
                        message: format!("{key}.rope_type \"{kind}\" (only default RoPE)"),
                    });
                }
                if rp.get("rope_theta").is_some_and(|t| !t.is_null()) {
                    rope_theta = Getter { v: rp, path }.positive_f64("rope_theta", 0.0)?;
                }
            }
        }
        let token_id = |x: &Value, key: &str| -> Result<u32> {
            x.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| g.bad(key))
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => vec![2],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| token_id(x, "eos_token_id"))
                .collect::<Result<Vec<u32>>>()?,
            Some(x) => vec![token_id(x, "eos_token_id")?],
        };
        let vocab_size = g.positive_usize("vocab_size", 32000)?;
        let bos_token_id = g.usize_or("bos_token_id", 1)?;
        for (key, id) in std::iter::once(("bos_token_id", bos_token_id))
            .chain(eos_token_ids.iter().map(|&e| ("eos_token_id", e as usize)))
        {
            if id >= vocab_size {
                return Err(g.nonsense(
                    key,
                    id,
                    &format!("it is not below vocab_size {vocab_size}"),
                ));
            }
        }
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(MlError::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "num_attention_heads {heads} must be a multiple of num_key_value_heads {kv}"
                ),
            });
        }
        if head_dim % 2 != 0 {
            return Err(MlError::Unsupported {
                path: path.to_path_buf(),
                message: "head_dim must be even for RoPE".into(),
            });
        }
        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: g.positive_usize("intermediate_size", 11008)?,
            num_hidden_layers: g.positive_usize("num_hidden_layers", 32)?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: g.positive_f64("rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings: g.positive_usize("max_position_embeddings", 2048)?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: bos_token_id as u32,
            eos_token_ids,
            attention_bias: v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// The HF `text_config` JSON of this config.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first().copied().unwrap_or(2),
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
        })
    }
}

/// Which vision features feed the projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FeatureSelect {
    /// Patch features only (CLS dropped): LLaVA-1.5's "patch" / llava-hf's "default".
    Patch,
    /// CLS and patches: "cls_patch" / "full".
    Full,
}

/// How an image token is represented in the token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ImageToken {
    /// llava-hf: a real `<image>` token with this id.
    Id(u32),
    /// liuhaotian/CoIN: no such token; the prompt is split at `<image>` and the features are
    /// spliced in between the encoded chunks.
    Placeholder,
}

/// A whole LLaVA-1.5 model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlavaConfig {
    /// The vision tower.
    pub vision: ClipConfig,
    /// The decoder.
    pub text: LlamaConfig,
    /// `hidden_states[k]` of the vision tower (index 0 = embeddings; negative from the end).
    pub vision_feature_layer: i64,
    /// Patch-only or CLS+patch features.
    pub feature_select: FeatureSelect,
    /// Projector activation (between its two linears).
    pub projector_act: Activation,
    /// Whether the projector linears have biases.
    pub projector_bias: bool,
    /// How `<image>` is represented.
    pub image_token: ImageToken,
    /// Padding id for batched generation.
    pub pad_token_id: u32,
}

impl LlavaConfig {
    /// How many embedding positions one image occupies.
    pub fn image_seq_len(&self) -> usize {
        match self.feature_select {
            FeatureSelect::Patch => self.vision.num_patches(),
            FeatureSelect::Full => self.vision.num_patches() + 1,
        }
    }

    /// Check that the special token ids are inside the vocabulary (`path` is the config).
    fn check_token_ids(&self, path: &Path) -> Result<()> {
        let g = Getter {
            v: &Value::Null,
            path,
        };
        let vocab = self.text.vocab_size;
        let mut ids = vec![("pad_token_id", self.pad_token_id)];
        if let ImageToken::Id(i) = self.image_token {
            ids.push(("image_token_index", i));
        }
        for (key, id) in ids {
            if id as usize >= vocab {
                return Err(g.nonsense(key, id, &format!("it is not below vocab_size {vocab}")));
            }
        }
        Ok(())
    }

    /// How many vision layers must run to produce the selected hidden state.
    pub fn vision_layers_used(&self) -> Result<usize> {
        let n = self.vision.num_hidden_layers as i64;
        let idx = if self.vision_feature_layer < 0 {
            n + 1 + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        if idx < 0 || idx > n {
            return Err(MlError::Input(format!(
                "vision_feature_layer {} is out of range for {n} layers",
                self.vision_feature_layer
            )));
        }
        Ok(idx as usize)
    }

    /// Parse a llava-hf `config.json` (LlavaForConditionalGeneration).
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let g = Getter { v, path };
        let empty = Value::Object(Default::default());
        let vision = ClipConfig::from_json(v.get("vision_config").unwrap_or(&empty), path)?;
        let mut text = LlamaConfig::from_json(v.get("text_config").unwrap_or(&empty), path)?;
        if let Some(t) = v.get("tie_word_embeddings").and_then(Value::as_bool) {
            if v.get("text_config")
                .and_then(|t| t.get("tie_word_embeddings"))
                .is_none()
            {
                text.tie_word_embeddings = t;
            }
        }
        let layer = match v.get("vision_feature_layer") {
            None | Some(Value::Null) => -2,
            Some(Value::Number(n)) => n.as_i64().ok_or_else(|| g.bad("vision_feature_layer"))?,
            Some(_) => {
                return Err(MlError::Unsupported {
                    path: path.to_path_buf(),
                    message: "vision_feature_layer must be one integer (lists are not supported)"
                        .into(),
                })
            }
        };
        let feature_select = match g
            .str_or("vision_feature_select_strategy", "default")?
            .as_str()
        {
            "default" => FeatureSelect::Patch,
            "full" => FeatureSelect::Full,
            other => {
                return Err(MlError::Unsupported {
                    path: path.to_path_buf(),
                    message: format!("vision_feature_select_strategy \"{other}\""),
                })
            }
        };
        let image_token = g
            .opt_usize("image_token_index")?
            .or(g.opt_usize("image_token_id")?)
            .unwrap_or(32000) as u32;
        let c = LlavaConfig {
            vision,
            text,
            vision_feature_layer: layer,
            feature_select,
            projector_act: Activation::parse(
                &g.str_or("projector_hidden_act", "gelu")?,
                path,
                "projector_hidden_act",
            )?,
            projector_bias: v
                .get("multimodal_projector_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            image_token: ImageToken::Id(image_token),
            pad_token_id: g.opt_usize("pad_token_id")?.unwrap_or(0) as u32,
        };
        c.vision_layers_used()?;
        c.check_token_ids(path)?;
        Ok(c)
    }

    /// The llava-hf `config.json` of this config.
    pub fn to_hf_json(&self) -> Value {
        let image_token = match self.image_token {
            ImageToken::Id(i) => i,
            ImageToken::Placeholder => 0,
        };
        serde_json::json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": image_token,
            "pad_token_id": self.pad_token_id,
            "projector_hidden_act": self.projector_act.hf_name(),
            "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": match self.feature_select {
                FeatureSelect::Patch => "default",
                FeatureSelect::Full => "full",
            },
            "image_seq_length": self.image_seq_len(),
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "torch_dtype": "float32",
            "text_config": self.text.to_json(),
            "vision_config": self.vision.to_json(),
        })
    }

    /// Build the config of the CoIN split setup: a LLaMA (or liuhaotian llava) `config.json`
    /// and a CLIP `config.json` (a full CLIPModel config with `vision_config`, or a
    /// CLIPVisionConfig).
    pub fn from_split(
        llm: &Value,
        llm_path: &Path,
        clip: &Value,
        clip_path: &Path,
    ) -> Result<Self> {
        let text = LlamaConfig::from_json(llm, llm_path)?;
        let vision = ClipConfig::from_json(clip.get("vision_config").unwrap_or(clip), clip_path)?;
        let g = Getter {
            v: llm,
            path: llm_path,
        };
        let layer = llm
            .get("mm_vision_select_layer")
            .and_then(Value::as_i64)
            .unwrap_or(-2);
        let feature_select = match g.str_or("mm_vision_select_feature", "patch")?.as_str() {
            "patch" => FeatureSelect::Patch,
            "cls_patch" => FeatureSelect::Full,
            other => {
                return Err(MlError::Unsupported {
                    path: llm_path.to_path_buf(),
                    message: format!("mm_vision_select_feature \"{other}\""),
                })
            }
        };
        let proj = g.str_or("mm_projector_type", "mlp2x_gelu")?;
        if proj != "mlp2x_gelu" {
            return Err(MlError::Unsupported {
                path: llm_path.to_path_buf(),
                message: format!("mm_projector_type \"{proj}\" (only mlp2x_gelu)"),
            });
        }
        if llm.get("mm_use_im_start_end").and_then(Value::as_bool) == Some(true) {
            return Err(MlError::Unsupported {
                path: llm_path.to_path_buf(),
                message: "mm_use_im_start_end = true".into(),
            });
        }
        let c = LlavaConfig {
            vision,
            text,
            vision_feature_layer: layer,
            feature_select,
            projector_act: Activation::Gelu,
            projector_bias: true,
            image_token: ImageToken::Placeholder,
            pad_token_id: g.opt_usize("pad_token_id")?.unwrap_or(0) as u32,
        };
        c.vision_layers_used()?;
        c.check_token_ids(llm_path)?;
        Ok(c)
    }
}

/// Typed access to a JSON object with errors naming the file and key.
struct Getter<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Getter<'_> {
    fn bad(&self, key: &str) -> MlError {
        MlError::Parse {
            path: self.path.to_path_buf(),
            message: format!("'{key}' has the wrong type"),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|u| Some(u as usize))
                .ok_or_else(|| self.bad(key)),
        }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    /// A value that parses but makes no model: names the file, the key and why.
    fn nonsense(&self, key: &str, value: impl std::fmt::Display, why: &str) -> MlError {
        MlError::Parse {
            path: self.path.to_path_buf(),
            message: format!("'{key}' is {value}, which makes no model: {why}"),
        }
    }
    fn positive_usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.usize_or(key, default)? {
            0 => Err(self.nonsense(key, 0, "it must be at least 1")),
            n => Ok(n),
        }
    }
    fn positive_f64(&self, key: &str, default: f64) -> Result<f64> {
        let x = self.f64_or(key, default)?;
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            Err(self.nonsense(key, x, "it must be a positive number"))
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| self.bad(key)),
        }
    }
    fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(x) => x.as_str().map(str::to_string).ok_or_else(|| self.bad(key)),
        }
    }
}

/// Read a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|source| MlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| MlError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_llava_hf_config_takes_llama_defaults_and_rope_parameters() {
        let v = serde_json::json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "image_token_index": 32000, "pad_token_id": 32001,
            "text_config": {"model_type": "llama", "vocab_size": 32064,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14}
        });
        let c = LlavaConfig::from_hf_json(&v, Path::new("config.json")).expect("parses");
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.rope_theta, 5000.0);
        assert_eq!(c.text.vocab_size, 32064);
        assert_eq!(c.image_seq_len(), 576);
        assert_eq!(c.vision_layers_used().expect("in range"), 23);
        assert_eq!(c.image_token, ImageToken::Id(32000));
        assert_eq!(c.vision.hidden_act, Activation::QuickGelu);
    }

    #[test]
    fn numbers_that_make_no_model_are_refused_naming_the_key() {
        let hf = |mut text: Value, vision: Value, top: Value| {
            if text.get("vocab_size").is_none() {
                text["vocab_size"] = serde_json::json!(32064);
            }
            let mut v = serde_json::json!({"text_config": text, "vision_config": vision});
            for (k, x) in top.as_object().expect("object") {
                v[k] = x.clone();
            }
            LlavaConfig::from_hf_json(&v, Path::new("config.json"))
        };
        let none = serde_json::json!({});
        hf(none.clone(), none.clone(), none.clone()).expect("defaults are fine");
        for (text, vision, top, key) in [
            (
                serde_json::json!({"rms_norm_eps": 0.0}),
                none.clone(),
                none.clone(),
                "'rms_norm_eps' is 0",
            ),
            (
                serde_json::json!({"rms_norm_eps": -1e-6}),
                none.clone(),
                none.clone(),
                "'rms_norm_eps'",
            ),
            (
                serde_json::json!({"rope_theta": 0}),
                none.clone(),
                none.clone(),
                "'rope_theta' is 0",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}),
                none.clone(),
                none.clone(),
                "'rope_theta' is 0",
            ),
            (
                serde_json::json!({"hidden_size": 0}),
                none.clone(),
                none.clone(),
                "'hidden_size' is 0",
            ),
            (
                serde_json::json!({"num_hidden_layers": 0}),
                none.clone(),
                none.clone(),
                "'num_hidden_layers'",
            ),
            (
                serde_json::json!({"vocab_size": 0}),
                none.clone(),
                none.clone(),
                "'vocab_size'",
            ),
            (
                serde_json::json!({"intermediate_size": 0}),
                none.clone(),
                none.clone(),
                "'intermediate_size'",
            ),
            (
                serde_json::json!({"max_position_embeddings": 0}),
                none.clone(),
                none.clone(),
                "'max_position_embeddings'",
            ),
            (
                serde_json::json!({"head_dim": 0}),
                none.clone(),
                none.clone(),
                "'head_dim' is 0",
            ),
            (
                serde_json::json!({"num_attention_heads": 0}),
                none.clone(),
                none.clone(),
                "'num_attention_heads' is 0",
            ),
            (
                serde_json::json!({"hidden_size": 100, "num_attention_heads": 32}),
                none.clone(),
                none.clone(),
                "does not divide hidden_size 100",
            ),
            (
                serde_json::json!({"eos_token_id": [2, "x"]}),
                none.clone(),
                none.clone(),
                "'eos_token_id'",
            ),
            (
                serde_json::json!({"eos_token_id": 40000}),
                none.clone(),
                none.clone(),
                "'eos_token_id' is 40000",
            ),
            (
                serde_json::json!({"bos_token_id": 40000}),
                none.clone(),
                none.clone(),
                "'bos_token_id'",
            ),
            (
                none.clone(),
                serde_json::json!({"patch_size": 0}),
                none.clone(),
                "'patch_size' is 0",
            ),
            (
                none.clone(),
                serde_json::json!({"image_size": 0}),
                none.clone(),
                "'image_size' is 0",
            ),
            (
                none.clone(),
                serde_json::json!({"num_attention_heads": 0}),
                none.clone(),
                "'num_attention_heads' is 0",
            ),
            (
                none.clone(),
                serde_json::json!({"layer_norm_eps": 0}),
                none.clone(),
                "'layer_norm_eps'",
            ),
            (
                none.clone(),
                serde_json::json!({"num_channels": 4}),
                none.clone(),
                "'num_channels' is 4",
            ),
            (
                none.clone(),
                none.clone(),
                serde_json::json!({"image_token_index": 40000}),
                "'image_token_index'",
            ),
            (
                none.clone(),
                none.clone(),
                serde_json::json!({"pad_token_id": 99999}),
                "'pad_token_id'",
            ),
        ] {
            let e = hf(text.clone(), vision.clone(), top.clone()).expect_err(key);
            assert!(
                e.to_string().contains(key) && e.to_string().contains("config.json"),
                "{text} {vision} {top}: {e}"
            );
        }
        // An explicit head_dim need not divide the width (the parity model has 16 × 4 ≠ 32).
        hf(
            serde_json::json!({"hidden_size": 32, "num_attention_heads": 4, "head_dim": 16}),
            none.clone(),
            none.clone(),
        )
        .expect("explicit head_dim");
        // The split setup: the LLaMA and CLIP configs are checked the same way, naming their file.
        let e = LlavaConfig::from_split(
            &serde_json::json!({"rms_norm_eps": 0}),
            Path::new("llm/config.json"),
            &serde_json::json!({"vision_config": {"patch_size": 0}}),
            Path::new("clip/config.json"),
        )
        .expect_err("eps");
        assert!(e.to_string().contains("llm/config.json"), "{e}");
        let e = LlavaConfig::from_split(
            &none,
            Path::new("llm/config.json"),
            &serde_json::json!({"vision_config": {"patch_size": 0}}),
            Path::new("clip/config.json"),
        )
        .expect_err("patch");
        assert!(e.to_string().contains("clip/config.json"), "{e}");
    }

    #[test]
    fn unsupported_options_name_the_key() {
        let v = serde_json::json!({"text_config": {"rope_scaling": {"rope_type": "yarn"}}});
        let e = LlavaConfig::from_hf_json(&v, Path::new("c.json")).expect_err("yarn rejected");
        assert!(e.to_string().contains("rope_scaling"), "{e}");
        let v = serde_json::json!({"vision_feature_layer": [-2, -5]});
        let e = LlavaConfig::from_hf_json(&v, Path::new("c.json")).expect_err("list rejected");
        assert!(e.to_string().contains("vision_feature_layer"), "{e}");
    }
}
