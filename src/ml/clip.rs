//! The CLIP vision transformer (frozen in LLaVA, trainable in full training): patch embedding,
//! CLS token, position embedding, pre-LayerNorm and encoder layers.
//!
//! Layer selection follows HF's `hidden_states[k]`: index 0 is the embeddings after
//! `pre_layrnorm`, index i the output of layer i, so LLaVA's −2 on a 24-layer tower is layer 23's
//! output and only 23 layers run. Every op here has a backward (layer norm and softmax are
//! composed of plain tensor ops), so the tower can be trained in full
//! ([`crate::ml::train::TrainableParams::attach_full`] with the vision tower: the demo's tiny base).

use candle_core::{Module, Tensor, D};

use super::config::{ClipConfig, FeatureSelect};
use super::linear::Linear;
use super::llama::compute_dtype;
use super::load::Vb;
use super::Result;

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            w: vb.get(&[dim], "weight")?,
            b: vb.get(&[dim], "bias")?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(compute_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps as f64)?.sqrt()?)?;
        y.to_dtype(dtype)?
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)
    }
}

/// One encoder layer (the linears are public so adapters can be attached).
pub struct ClipLayer {
    ln1: LayerNorm,
    ln2: LayerNorm,
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Attention output projection.
    pub out_proj: Linear,
    /// MLP first linear.
    pub fc1: Linear,
    /// MLP second linear.
    pub fc2: Linear,
    heads: usize,
    act: super::config::Activation,
}

impl ClipLayer {
    /// One layer on hidden states (b, n, d).
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.ln1.forward(x)?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(&h)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        let dtype = q.dtype();
        let cd = compute_dtype(dtype);
        let att = q.to_dtype(cd)?.matmul(&k.to_dtype(cd)?.t()?)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?.to_dtype(dtype)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (x + self.out_proj.forward(&o)?)?;
        let h = self.ln2.forward(&x)?;
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&h)?)?)?;
        x + h
    }
}

/// The vision tower up to the selected layer.
pub struct ClipVision {
    patch_w: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    /// The encoder layers that run (those after the selected one are not loaded).
    pub layers: Vec<ClipLayer>,
    config: ClipConfig,
}

impl ClipVision {
    /// Load the embeddings, `pre_layrnorm` and the first `n_layers` encoder layers.
    pub fn load(vb: &Vb, config: &ClipConfig, n_layers: usize) -> Result<Self> {
        let c = config;
        let d = c.hidden_size;
        let emb = vb.pp("embeddings");
        let patch_w = emb
            .pp("patch_embedding")
            .get(&[d, c.num_channels, c.patch_size, c.patch_size], "weight")?
            .reshape((d, c.num_channels * c.patch_size * c.patch_size))?;
        let class_embedding = emb.get(&[d], "class_embedding")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get(&[c.num_patches() + 1, d], "weight")?;
        let pre_ln = LayerNorm::load(&vb.pp("pre_layrnorm"), d, c.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let l = vb.pp("encoder.layers").pp(i);
            let a = l.pp("self_attn");
            layers.push(ClipLayer {
                ln1: LayerNorm::load(&l.pp("layer_norm1"), d, c.layer_norm_eps)?,
                ln2: LayerNorm::load(&l.pp("layer_norm2"), d, c.layer_norm_eps)?,
                q_proj: a.pp("q_proj").linear(d, d, true)?,
                k_proj: a.pp("k_proj").linear(d, d, true)?,
                v_proj: a.pp("v_proj").linear(d, d, true)?,
                out_proj: a.pp("out_proj").linear(d, d, true)?,
                fc1: l.pp("mlp.fc1").linear(d, c.intermediate_size, true)?,
                fc2: l.pp("mlp.fc2").linear(c.intermediate_size, d, true)?,
                heads: c.num_attention_heads,
                act: c.hidden_act,
            });
        }
        Ok(ClipVision {
            patch_w,
            class_embedding,
            position_embedding,
            pre_ln,
            layers,
            config: config.clone(),
        })
    }

    /// Every tensor of the tower that is not a linear layer's, by its key under the tower's
    /// prefix (`embeddings.patch_embedding.weight` is held as (d, c·p·p), the checkpoint's
    /// (d, c, p, p) flattened), for full training.
    pub(crate) fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v: Vec<(String, &mut Tensor)> = vec![
            (
                "embeddings.patch_embedding.weight".into(),
                &mut self.patch_w,
            ),
            (
                "embeddings.class_embedding".into(),
                &mut self.class_embedding,
            ),
            (
                "embeddings.position_embedding.weight".into(),
                &mut self.position_embedding,
            ),
            ("pre_layrnorm.weight".into(), &mut self.pre_ln.w),
            ("pre_layrnorm.bias".into(), &mut self.pre_ln.b),
        ];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layers.{i}");
            v.push((format!("{p}.layer_norm1.weight"), &mut l.ln1.w));
            v.push((format!("{p}.layer_norm1.bias"), &mut l.ln1.b));
            v.push((format!("{p}.layer_norm2.weight"), &mut l.ln2.w));
            v.push((format!("{p}.layer_norm2.bias"), &mut l.ln2.b));
        }
        v
    }

    /// Pixel values (b, 3, H, W) → selected hidden state (b, n, d), CLS dropped for `Patch`.
    pub fn forward(&self, pixels: &Tensor, select: FeatureSelect) -> candle_core::Result<Tensor> {
        let mut x = self.embed(pixels)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.select(&x, select)
    }

    /// Hidden state 0 (b, n + 1, d): patch embedding, CLS token, position embedding and
    /// `pre_layrnorm`, the input of the first layer.
    pub(crate) fn embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, ch, h, w) = pixels.dims4()?;
        let p = c.patch_size;
        if h != c.image_size || w != c.image_size || ch != c.num_channels {
            candle_core::bail!(
                "pixel values have shape {:?}, the vision tower expects (b, {}, {}, {})",
                pixels.dims(),
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let g = c.grid();
        // A stride-p convolution with a p×p kernel is a matmul over flattened patches.
        let patches = pixels
            .to_dtype(self.patch_w.dtype())?
            .reshape((b, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, ch * p * p))?;
        let x = super::linear::matmul_t(&patches, &self.patch_w)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?;
        let x = Tensor::cat(&[cls, x], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        self.pre_ln.forward(&x)
    }

    /// The features of the last layer's output `x` (b, n + 1, d): without the CLS position for
    /// `Patch`.
    pub(crate) fn select(&self, x: &Tensor, select: FeatureSelect) -> candle_core::Result<Tensor> {
        match select {
            FeatureSelect::Patch => x.narrow(1, 1, self.config.grid() * self.config.grid()),
            FeatureSelect::Full => Ok(x.clone()),
        }
    }
}
