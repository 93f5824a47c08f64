//! The multimodal projector, mlp2x_gelu: `linear_2(gelu_erf(linear_1(x)))`.
//!
//! Differentiable (the projector is trained in CoIN); GELU is the erf form of torch's
//! `nn.GELU()`, as LLaVA and llava-hf ("gelu") use.

use candle_core::{Module, Tensor};

use super::config::Activation;
use super::linear::Linear;
use super::load::Vb;
use super::Result;

/// Two linears with an activation between them.
pub struct Projector {
    /// vision hidden → text hidden.
    pub linear_1: Linear,
    /// text hidden → text hidden.
    pub linear_2: Linear,
    act: Activation,
}

impl Projector {
    /// Load from two linear prefixes (`multi_modal_projector.linear_{1,2}` or
    /// `model.mm_projector.{0,2}`).
    pub fn load(
        vb1: &Vb,
        vb2: &Vb,
        vision_hidden: usize,
        text_hidden: usize,
        bias: bool,
        act: Activation,
    ) -> Result<Self> {
        Ok(Projector {
            linear_1: vb1.linear(vision_hidden, text_hidden, bias)?,
            linear_2: vb2.linear(text_hidden, text_hidden, bias)?,
            act,
        })
    }

    /// Project vision features (…, vision_hidden) → (…, text_hidden).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }
}
