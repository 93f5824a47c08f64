//! The one linear layer type of the model: a frozen weight (and bias) that can carry an adapter.
//!
//! Adapters are layers, not weight patches: `y = x Wᵀ + b + adapter(x)`. The forward uses only
//! differentiable ops (matmul, add, mul), so gradients reach adapter tensors that are `Var`s.
//! [`Adapter::MoeLora`] is CoIN's MoELoRA. Frozen weights (tensors that are not `Var`s) go
//! through [`super::train::frozen::frozen_matmul_t`], whose backward skips the weight gradient.

use candle_core::{DType, Module, Result, Tensor, D};

use super::fused;
use super::train::dropout::Dropout;

/// `x` in the adapter's dtype (an f32 adapter under a bf16 model).
fn to_dtype_of(x: &Tensor, like: &Tensor) -> Result<Tensor> {
    if x.dtype() == like.dtype() {
        Ok(x.clone())
    } else {
        x.to_dtype(like.dtype())
    }
}

/// `x` after the adapter's dropout, if any (training only).
fn dropped(dropout: &Option<Dropout>, x: &Tensor) -> Result<Tensor> {
    match dropout {
        Some(d) => d.forward(x),
        None => Ok(x.clone()),
    }
}

/// A LoRA adapter: `scale · B (A x)` with A (r × in) and B (out × r).
#[derive(Clone, Debug)]
pub struct Lora {
    /// Down projection, shape (r, in_features).
    pub a: Tensor,
    /// Up projection, shape (out_features, r).
    pub b: Tensor,
    /// `lora_alpha / r` (or `/ √r` with rsLoRA).
    pub scale: f64,
    /// Dropout on the adapter's input (training only; `None` at inference).
    pub dropout: Option<Dropout>,
}

impl Lora {
    /// The adapter's contribution for input `x` (…, in).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = dropped(&self.dropout, &to_dtype_of(x, &self.a)?)?;
        // The scale goes on the rank-r intermediate, not on the (…, out) result: one pass over
        // r columns instead of `out` (forward and backward).
        let h = (matmul_t(&x, &self.a)? * self.scale)?;
        matmul_t(&h, &self.b)
    }

    /// The exact rank concatenation of `self` and `other` (ranks r₁ + r₂), a LoRA with
    /// `self`'s scale s₁ whose update s₁·B·A is the sum of both: A = [A₁; A₂],
    /// B = [B₁, (s₂/s₁)·B₂] (as `coin merge` does). No dropout.
    pub fn concat(&self, other: &Lora) -> Result<Lora> {
        let c = other.scale / self.scale;
        let b2 = if c == 1.0 {
            other.b.clone()
        } else {
            (&other.b * c)?
        };
        Ok(Lora {
            a: Tensor::cat(&[&self.a, &other.a], 0)?.contiguous()?,
            b: Tensor::cat(&[&self.b, &b2], 1)?.contiguous()?,
            scale: self.scale,
            dropout: None,
        })
    }
}

/// CoIN's MoELoRA: E experts of rank r/E and a token-wise dense softmax router,
/// `scale · Σ_e softmax(R x)_e · B_e A_e dropout_e(x)` with `scale = lora_alpha / r` (total r).
/// In training every expert sees its own dropout mask: CoIN calls its one `nn.Dropout` inside
/// the loop over the experts (`coinmoelora.py` L389-396), so each call draws a new mask.
///
/// The experts are stored stacked: `a` is (E·r/E × in) = the A_e one under another, `b` is
/// (out × E·r/E) = the B_e side by side, so the sum is two GEMMs with the gates applied to the
/// rank-r/E blocks of `A x` in between.
#[derive(Clone, Debug)]
pub struct MoeLora {
    /// Stacked down projections, shape (r, in_features); rows `e·r/E..(e+1)·r/E` are expert e.
    pub a: Tensor,
    /// Stacked up projections, shape (out_features, r); columns `e·r/E..` are expert e.
    pub b: Tensor,
    /// Router weight (no bias), shape (E, in_features).
    pub router: Tensor,
    /// Number of experts E.
    pub experts: usize,
    /// `lora_alpha / r`.
    pub scale: f64,
    /// Dropout on the experts' input, a mask per expert (the router sees the undropped input,
    /// as in CoIN).
    pub dropout: Option<Dropout>,
}

impl MoeLora {
    /// The adapter's contribution for input `x` (…, in).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = to_dtype_of(x, &self.a)?;
        let gates = candle_nn::ops::softmax(&matmul_t(&x, &self.router)?, D::Minus1)?;
        let h = match &self.dropout {
            Some(d) if d.is_training() && d.p() > 0.0 => self.experts_with_masks(d, &x)?,
            _ => matmul_t(&x, &self.a)?, // (…, r)
        };
        let dims = h.dims().to_vec();
        let r = *dims.last().unwrap_or(&0);
        let e = self.experts;
        let mut blocks = dims[..dims.len() - 1].to_vec();
        blocks.extend([e, r / e]);
        let mut gate_shape = dims[..dims.len() - 1].to_vec();
        gate_shape.extend([e, 1]);
        let h = h
            .reshape(blocks)?
            .broadcast_mul(&gates.reshape(gate_shape)?)?
            .reshape(dims)?;
        matmul_t(&h, &self.b)? * self.scale
    }
}

impl MoeLora {
    /// `A x` (…, r) with expert e's block computed from `dropout(x)` under its own mask.
    fn experts_with_masks(&self, d: &Dropout, x: &Tensor) -> Result<Tensor> {
        let (r, in_f) = self.a.dims2()?;
        let per = r / self.experts.max(1);
        let dims = x.dims().to_vec();
        let x2 = x.reshape((x.elem_count() / in_f.max(1), in_f))?;
        let blocks = (0..self.experts)
            .map(|e| {
                // `narrow` of the var keeps the gradient path to it (not the frozen matmul).
                d.forward(&x2)?
                    .matmul(&self.a.narrow(0, e * per, per)?.t()?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = dims;
        let n = out.len();
        out[n - 1] = r;
        Tensor::cat(&blocks, 1)?.reshape(out)
    }
}

/// What a linear layer may carry besides its frozen weight.
#[derive(Clone, Debug)]
pub enum Adapter {
    /// Plain LoRA.
    Lora(Lora),
    /// CoIN's MoELoRA.
    MoeLora(MoeLora),
    /// O-LoRA while training (`train.strategy = olora`): the earlier tasks' LoRA, frozen
    /// (plain tensors, no dropout), plus the task's own trainable one; the layer adds both.
    /// Saved as their exact rank concatenation, a plain [`Adapter::Lora`].
    Olora {
        /// The earlier tasks' adapters, concatenated (rank R).
        frozen: Lora,
        /// The task's own adapter (rank r), the one that is trained.
        new: Lora,
    },
}

impl Adapter {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Adapter::Lora(l) => l.forward(x),
            Adapter::MoeLora(m) => m.forward(x),
            Adapter::Olora { frozen, new } => frozen.forward(x)? + new.forward(x)?,
        }
    }

    /// The adapter's input and output widths (A's columns, B's rows).
    pub fn in_out(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Adapter::Lora(l) | Adapter::Olora { new: l, .. } => (l.a.dim(1)?, l.b.dim(0)?),
            Adapter::MoeLora(m) => (m.a.dim(1)?, m.b.dim(0)?),
        })
    }

    /// The adapter's total rank (frozen and trained ranks together for O-LoRA).
    pub fn rank(&self) -> usize {
        match self {
            Adapter::Lora(l) => l.a.dim(0).unwrap_or(0),
            Adapter::MoeLora(m) => m.a.dim(0).unwrap_or(0),
            Adapter::Olora { frozen, new } => {
                frozen.a.dim(0).unwrap_or(0) + new.a.dim(0).unwrap_or(0)
            }
        }
    }
}

/// `y = x Wᵀ + b (+ adapter(x))`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Weight, shape (out_features, in_features).
    pub weight: Tensor,
    /// Optional bias, shape (out_features).
    pub bias: Option<Tensor>,
    /// Optional adapter.
    pub adapter: Option<Adapter>,
}

impl Linear {
    /// A linear layer without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            adapter: None,
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims2().map(|d| d.1).unwrap_or(0)
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims2().map(|d| d.0).unwrap_or(0)
    }
}

/// `x @ wᵀ` for x of any rank ≥ 2 (flattened to 2-D for a single GEMM). A `w` that is not a
/// `Var` is frozen: its backward computes the input gradient only.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.rank() == 2 {
        // Already 2-D: no reshape nodes (each would cost a gradient pass in the backward).
        return if w.is_variable() {
            x.matmul(&w.t()?)
        } else {
            super::train::frozen::frozen_matmul_t(x, w)
        };
    }
    let dims = x.dims().to_vec();
    let last = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / last.max(1);
    let x2 = x.reshape((rows, last))?;
    let y = if w.is_variable() {
        x2.matmul(&w.t()?)?
    } else {
        super::train::frozen::frozen_matmul_t(&x2, w)?
    };
    let mut out = dims;
    let n = out.len();
    out[n - 1] = w.dim(0)?;
    y.reshape(out)
}

impl Linear {
    /// The fused path of a frozen weight with a LoRA adapter ([`fused::lora_linear`]), when it
    /// applies: x, weight and adapter of one dtype the kernels support ([`fused::supported`]:
    /// f32/f64 on the CPU, f32/bf16/f16 on a GPU), a 2-D `x`, a frozen weight. `None`: use the
    /// composed ops (e.g. a bf16 model with f32 adapters).
    fn forward_fused_lora(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (l, frozen) = match &self.adapter {
            Some(Adapter::Lora(l)) => (l, None),
            // O-LoRA: the trained adapter fused, the frozen one added by composed ops.
            Some(Adapter::Olora { frozen, new }) => (new, Some(frozen)),
            _ => return Ok(None),
        };
        let dt = x.dtype();
        if !fused::supported(x)
            || x.rank() != 2
            || self.weight.is_variable()
            || self.weight.dtype() != dt
            || l.a.dtype() != dt
            || l.b.dtype() != dt
        {
            return Ok(None);
        }
        let mask = match &l.dropout {
            Some(d) => d.next_mask(x)?,
            None => None,
        };
        let mut y = fused::lora_linear(x, &self.weight, &l.a, &l.b, l.scale, mask)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(f) = frozen {
            y = (y + f.forward(x)?)?;
        }
        Ok(Some(y))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_fused_lora(x)? {
            return Ok(y);
        }
        // A trained projector keeps f32 weights under a bf16 model: compute in the weight's dtype.
        let mut y = if x.dtype() != self.weight.dtype() {
            matmul_t(&x.to_dtype(self.weight.dtype())?, &self.weight)?
        } else {
            matmul_t(x, &self.weight)?
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(a) = &self.adapter {
            let delta = a.forward(x)?.to_dtype(y.dtype())?;
            y = (y + delta)?;
        }
        Ok(y)
    }
}

/// Index of the largest value along the last dimension, as u32 (greedy decoding).
pub fn argmax_last(logits: &Tensor) -> Result<Tensor> {
    logits.to_dtype(DType::F32)?.argmax(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn moelora_draws_a_dropout_mask_per_expert_in_training() -> Result<()> {
        // Two experts of rank 1 with the same A (a sum of the input) and B picking each
        // expert's output: one shared mask would make both outputs equal.
        let dev = Device::Cpu;
        let n = 64;
        let x = Tensor::ones((1, 1, n), DType::F32, &dev)?;
        let a = candle_core::Var::ones((2, n), DType::F32, &dev)?;
        let moe = MoeLora {
            a: a.as_tensor().clone(),
            b: Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?,
            router: Tensor::zeros((2, n), DType::F32, &dev)?,
            experts: 2,
            scale: 1.0,
            dropout: Some(Dropout::new(0.5, 3)),
        };
        let y = moe.forward(&x)?;
        let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
        assert_ne!(v[0], v[1], "each expert masks its own input: {v:?}");
        // The gradient still reaches every expert's A.
        let g = y.sum_all()?.backward()?;
        let ga = g.get(a.as_tensor()).expect("a gradient for A");
        assert_eq!(ga.dims(), &[2, n]);
        // In eval both see the whole input: 0.5 · 64 each.
        moe.dropout.as_ref().expect("dropout").set_training(false);
        let v: Vec<f32> = moe.forward(&x)?.flatten_all()?.to_vec1()?;
        assert_eq!(v, vec![32.0, 32.0]);
        Ok(())
    }

    #[test]
    fn lora_adds_scaled_low_rank_update() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
        let b = Tensor::new(&[0.5f32, -0.5, 1.0], &dev)?;
        let mut l = Linear::new(w, Some(b));
        let x = Tensor::new(&[[[1f32, -1.]]], &dev)?;
        let y: Vec<f32> = l.forward(&x)?.flatten_all()?.to_vec1()?;
        assert_eq!(y, vec![-0.5, -1.5, 0.0]);
        l.adapter = Some(Adapter::Lora(Lora {
            a: Tensor::new(&[[1f32, 1.]], &dev)?, // r = 1: a·x = 0 for this x
            b: Tensor::new(&[[1f32], [2.], [3.]], &dev)?,
            scale: 2.0,
            dropout: None,
        }));
        let x2 = Tensor::new(&[[[1f32, 0.]]], &dev)?;
        let y2: Vec<f32> = l.forward(&x2)?.flatten_all()?.to_vec1()?;
        // base: [1.5, 2.5, 6.0]; lora: 2 * [1, 2, 3] * 1
        assert_eq!(y2, vec![3.5, 6.5, 12.0]);
        Ok(())
    }
}
