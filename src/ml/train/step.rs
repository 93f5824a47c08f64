//! One optimisation step: forward a batch, masked loss, backward, check that every trainable var
//! got a gradient (candle's AdamW silently skips vars without one), AdamW update.

use candle_core::Tensor;
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::batch::{forward_batch, TrainExample};
use super::loss::masked_cross_entropy;
use super::params::TrainableParams;
use crate::ml::llava::Llava;
use crate::ml::{MlError, Result};

/// AdamW over every trainable var (β 0.9 / 0.999, ε 1e-8; CoIN trains with weight decay 0).
pub fn adamw(params: &TrainableParams, lr: f64, weight_decay: f64) -> Result<AdamW> {
    Ok(AdamW::new(
        params.all_vars(),
        ParamsAdamW {
            lr,
            weight_decay,
            ..ParamsAdamW::default()
        },
    )?)
}

/// Run one step on a batch; returns the loss before the update.
pub fn train_step(
    model: &Llava,
    params: &TrainableParams,
    optimizer: &mut AdamW,
    examples: &[TrainExample],
    pixels: &[Tensor],
) -> Result<f64> {
    let (logits, labels) = forward_batch(model, examples, pixels)?;
    let loss = masked_cross_entropy(&logits, &labels)?;
    let grads = loss.backward()?;
    let missing = params.missing_gradients(&grads);
    if !missing.is_empty() {
        return Err(MlError::Input(format!(
            "no gradient reached {} trainable tensor(s), first '{}' (is the part of the model \
             they belong to used by this batch?)",
            missing.len(),
            missing[0]
        )));
    }
    optimizer.step(&grads)?;
    Ok(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}
