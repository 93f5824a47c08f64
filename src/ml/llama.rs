//! The LLaMA decoder: RMSNorm, RoPE (HF's rotate-half layout), grouped-query attention with a
//! causal + padding mask, SwiGLU MLP, a KV cache for generation and `lm_head`.
//!
//! Every op on this path has a backward (no candle `softmax_last_dim`, `rms_norm` or `rope`,
//! which have none): norms, softmax and RoPE are computed in f32, as transformers does, so the
//! same forward serves training. On the CPU in f32/f64 RMSNorm, RoPE, the masked attention
//! softmax and SwiGLU are [`super::fused`] kernels with an analytic backward; elsewhere (CUDA,
//! bf16/f16) the same functions compose plain tensor ops (the `*_composed` references). With
//! `runtime.kernels = "on"` on the CPU the attention core (scores → probabilities → `p·v`) is
//! [`super::flash::flash_attention`] instead, which never keeps the (s × t) score matrix.

use candle_core::{DType, Device, Module, Tensor, D};

use super::config::LlamaConfig;
use super::fused;
use super::linear::Linear;
use super::load::Vb;
use super::Result;

/// The dtype norms, RoPE, attention scores and logits are computed in: f32, or f64 for f64
/// weights (the gradient checks run the tiny model in f64).
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm with the HF semantics: normalise in f32, cast back, multiply by the weight.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// Scale, shape (hidden).
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm with this weight and ε.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(&[dim], "weight")?,
            eps,
        })
    }

    /// Normalise the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if fused::loop_kernels(x) && self.weight.dtype() == x.dtype() {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        self.forward_composed(x)
    }

    /// [`RmsNorm::forward`] from plain tensor ops (any device and dtype; the fused op's
    /// reference).
    pub fn forward_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(compute_dtype(dtype))?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// Self-attention with grouped-query heads.
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

/// One decoder layer.
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// One layer on the flattened residual stream `x` (b·s, hidden) of `b` rows of `s`
    /// positions: `x + attn(norm(x))`, then `+ mlp(norm(·))`. `cos`/`sin` from
    /// [`Llama::rope`], `mask` as in [`Llama::forward_embeds`].
    pub fn forward(
        &self,
        x: &Tensor,
        (b, s): (usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self.self_attn.forward(&h, (b, s), cos, sin, mask, slot)?;
        let x = (x + h)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        &x + self.mlp.forward(&h)?
    }
}

/// Cached keys and values of every layer, shape (b, kv_heads, t, head_dim) each.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        KvCache::default()
    }
    /// Cached length (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// RoPE tables for given positions: cos and sin of shape (b, 1, s, head_dim).
pub fn rope_tables(
    positions: &Tensor,
    head_dim: usize,
    theta: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = positions.device();
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, (1, 1, half), dev)?;
    let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (b, s, 1)
    let freqs = pos.broadcast_mul(&inv)?; // (b, s, half)
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
    Ok((emb.cos()?, emb.sin()?))
}

fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// HF's `apply_rotary_pos_emb` on `x` (b, h, s, head_dim), which may be a strided view; the
/// result is contiguous. Fused on the CPU for f32/f64.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if fused::loop_kernels(x) {
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        return fused::rope(x, &cos, &sin);
    }
    apply_rope_composed(&x.contiguous()?, cos, sin)
}

/// [`apply_rope`] from plain tensor ops (any device and dtype; the fused op's reference).
pub fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(compute_dtype(dtype))?;
    let (cos, sin) = (cos.to_dtype(xf.dtype())?, sin.to_dtype(xf.dtype())?);
    let y = (xf.broadcast_mul(&cos)? + rotate_half(&xf)?.broadcast_mul(&sin)?)?;
    y.to_dtype(dtype)
}

impl Attention {
    /// `x` is the flattened (b·s, hidden) stream of `b` rows of `s` positions.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        (b, s): (usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let hd = self.head_dim;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, s, self.heads, hd))?
            .transpose(1, 2)?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, s, self.kv_heads, hd))?
            .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, s, self.kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        if flash_enabled(&q) {
            // Blocked attention: no (s × t) scores kept, grouped heads without expanding k/v.
            let o = super::flash::flash_attention(&q, &k, &v, Some(mask), scale)?
                .transpose(1, 2)?
                .reshape((b * s, self.heads * hd))?;
            return self.o_proj.forward(&o);
        }
        let t = k.dim(2)?;
        let rep = self.heads / self.kv_heads;
        let (k, v) = if rep > 1 {
            let expand = |z: &Tensor| -> candle_core::Result<Tensor> {
                z.unsqueeze(2)?
                    .broadcast_as((b, self.kv_heads, rep, t, hd))?
                    .reshape((b, self.heads, t, hd))
            };
            (expand(&k)?, expand(&v)?)
        } else {
            (k, v)
        };
        let dtype = q.dtype();
        let scores = q
            .to_dtype(compute_dtype(dtype))?
            .matmul(&k.to_dtype(compute_dtype(dtype))?.t()?)?;
        let p = attention_probs(&scores, mask, scale)?.to_dtype(dtype)?;
        let o = p
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b * s, self.heads * hd))?;
        self.o_proj.forward(&o)
    }
}

/// Whether attention runs as [`super::flash::flash_attention`]: the loop kernels are on
/// (`runtime.kernels = "on"`, [`fused::loop_kernels`]) and the op has a kernel for `q`
/// ([`super::flash::device_supported`]: any float dtype on the CPU, bf16/f16 computed in f32;
/// f32/bf16/f16 with head dimension ≤ 128 on a GPU in a `cuda` build). Elsewhere the composed
/// scores → probabilities → `p·v`.
pub fn flash_enabled(q: &Tensor) -> bool {
    fused::kernels() == fused::Kernels::On
        && super::flash::device_supported(q)
        && super::flash::enabled_for_process()
}

/// `softmax(scores · scale + mask)` over the keys; fused on the CPU for f32/f64.
pub fn attention_probs(scores: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let mask = mask.to_dtype(scores.dtype())?;
    if fused::loop_kernels(scores) {
        return fused::masked_softmax(scores, &mask, scale);
    }
    attention_probs_composed(scores, &mask, scale)
}

/// [`attention_probs`] from plain tensor ops (any device and dtype; the fused op's reference).
pub fn attention_probs_composed(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let scores = (scores * scale)?.broadcast_add(mask)?;
    candle_nn::ops::softmax(&scores, D::Minus1)
}

/// `silu(gate) · up`; fused on the CPU for f32/f64.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if fused::loop_kernels(gate) && gate.dtype() == up.dtype() {
        return fused::swiglu(gate, up);
    }
    swiglu_composed(gate, up)
}

/// [`swiglu`] from plain tensor ops (any device and dtype; the fused op's reference).
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.silu()? * up
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// The decoder with embeddings and `lm_head`.
pub struct Llama {
    /// Token embeddings (vocab, hidden).
    pub embed_tokens: Tensor,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output head (vocab ← hidden).
    pub lm_head: Linear,
    /// Configuration.
    pub config: LlamaConfig,
}

impl Llama {
    /// Load the body from `vb` (`embed_tokens`, `layers.N`, `norm`) and `lm_head`'s weight.
    pub fn load(vb: &Vb, lm_head: &Tensor, config: &LlamaConfig) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let embed_tokens = vb.pp("embed_tokens").get(&[c.vocab_size, h], "weight")?;
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(&l.pp("input_layernorm"), h, c.rms_norm_eps)?,
                self_attn: Attention {
                    q_proj: a.pp("q_proj").linear(h, q_out, c.attention_bias)?,
                    k_proj: a.pp("k_proj").linear(h, kv_out, c.attention_bias)?,
                    v_proj: a.pp("v_proj").linear(h, kv_out, c.attention_bias)?,
                    o_proj: a.pp("o_proj").linear(q_out, h, c.attention_bias)?,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                post_attention_layernorm: RmsNorm::load(
                    &l.pp("post_attention_layernorm"),
                    h,
                    c.rms_norm_eps,
                )?,
                mlp: Mlp {
                    gate_proj: m
                        .pp("gate_proj")
                        .linear(h, c.intermediate_size, c.mlp_bias)?,
                    up_proj: m.pp("up_proj").linear(h, c.intermediate_size, c.mlp_bias)?,
                    down_proj: m
                        .pp("down_proj")
                        .linear(c.intermediate_size, h, c.mlp_bias)?,
                },
            });
        }
        let norm = RmsNorm::load(&vb.pp("norm"), h, c.rms_norm_eps)?;
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head: Linear::new(lm_head.clone(), None),
            config: config.clone(),
        })
    }

    /// Embeddings of token ids (any shape of u32 ids → shape + (hidden)).
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let shape = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let e = self.embed_tokens.index_select(&flat, 0)?;
        let mut out = shape;
        out.push(self.config.hidden_size);
        e.reshape(out)
    }

    /// Run the decoder on input embeddings (b, s, hidden) at `positions` (b, s) with an additive
    /// mask (b, 1, s, t) where t = cached + s. Returns the final-normed hidden states (b, s, h).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (cos, sin) = self.rope(positions)?;
        // The residual stream runs flattened to (b·s, hidden): the linears then need no reshape
        // (each reshape is one more node, and in the backward one more gradient pass).
        let (b, s, h) = embeds.dims3()?;
        let mut x = embeds.reshape((b * s, h))?;
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = (0..self.layers.len()).map(|_| None).collect();
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, (b, s), &cos, &sin, mask, slot)?;
        }
        self.norm.forward(&x)?.reshape((b, s, h))
    }

    /// The RoPE tables (cos, sin) of `positions` (b, s) for [`DecoderLayer::forward`].
    pub fn rope(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        rope_tables(positions, self.config.head_dim, self.config.rope_theta)
    }

    /// Logits (…, vocab) of hidden states, in f32 (f64 for an f64 model).
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.lm_head.forward(hidden)?;
        let dtype = compute_dtype(y.dtype());
        y.to_dtype(dtype)
    }
}

/// The additive attention mask (b, 1, s, t) for `s` new positions after `past` cached ones:
/// key j is visible to query i when `j <= past + i` and `valid[b][j]` (padding is invalid).
pub fn attention_mask(
    valid: &[Vec<bool>],
    s: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let b = valid.len();
    let t = valid.first().map(Vec::len).unwrap_or(0);
    let past = t - s;
    let mut m = vec![0f32; b * s * t];
    for (bi, row) in valid.iter().enumerate() {
        for i in 0..s {
            for (j, &ok) in row.iter().enumerate() {
                if !(ok && j <= past + i) {
                    m[(bi * s + i) * t + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, t), device)
}
