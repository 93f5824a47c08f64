//! Token cross-entropy over the supervised (assistant) tokens only.
//!
//! Labels follow LLaVA's vicuna_v1 preprocessing: one label per input position, [`IGNORE_INDEX`]
//! (−100) for system prompt, user turns, image positions and padding, the token id for assistant
//! tokens. Computed in f32 (f64 for f64 logits). Position t's logits predict label t+1 (the causal shift of `LlamaForCausalLM`), and
//! the loss is the mean over all supervised tokens of the batch. Differentiable ops only:
//! `index_select` of the supervised rows, `log_softmax`, `gather`.

use candle_core::{Tensor, D};

use crate::ml::llama::compute_dtype;

use crate::ml::{MlError, Result};

/// The label of positions that carry no loss.
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of `logits` (b, s, vocab) against `labels` (b rows of s labels).
pub fn masked_cross_entropy(logits: &Tensor, labels: &[Vec<i64>]) -> Result<Tensor> {
    let (b, s, vocab) = logits.dims3()?;
    if labels.len() != b || labels.iter().any(|l| l.len() != s) {
        return Err(MlError::Input(format!(
            "labels do not match the logits' batch × sequence {b} × {s}"
        )));
    }
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        for t in 0..s.saturating_sub(1) {
            let y = row[t + 1];
            if y == IGNORE_INDEX {
                continue;
            }
            if y < 0 || y as usize >= vocab {
                return Err(MlError::Input(format!(
                    "label {y} at row {bi}, position {} is outside the vocabulary (0..{vocab})",
                    t + 1
                )));
            }
            rows.push((bi * s + t) as u32);
            targets.push(y as u32);
        }
    }
    if rows.is_empty() {
        return Err(MlError::Input(
            "the batch has no supervised (assistant) token".into(),
        ));
    }
    let n = rows.len();
    let dev = logits.device();
    let rows = Tensor::from_vec(rows, n, dev)?;
    let targets = Tensor::from_vec(targets, (n, 1), dev)?;
    let picked = logits
        .reshape((b * s, vocab))?
        .index_select(&rows, 0)?
        .to_dtype(compute_dtype(logits.dtype()))?;
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let nll = logp.gather(&targets, 1)?.neg()?;
    Ok(nll.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_hand_computed_mean_over_unmasked_shifted_tokens() -> Result<()> {
        let dev = Device::Cpu;
        // b = 2, s = 3, vocab = 3.
        let lg: Vec<f32> = vec![
            1.0, 2.0, 0.5, /**/ 0.0, 0.0, 3.0, /**/ 9.0, 9.0, 9.0, //
            -1.0, 0.5, 0.25, /**/ 2.0, 1.0, 0.0, /**/ 5.0, 5.0, 5.0,
        ];
        let logits = Tensor::from_vec(lg.clone(), (2, 3, 3), &dev)?;
        // Row 0: position 1 label 1 (predicted by position 0), position 2 masked.
        // Row 1: position 1 masked, position 2 label 0 (predicted by position 1).
        let labels = vec![
            vec![7, 1, IGNORE_INDEX],
            vec![IGNORE_INDEX, IGNORE_INDEX, 0],
        ];
        let got = masked_cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64;
        let nll = |row: &[f32], y: usize| -> f64 {
            let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            lse - row[y] as f64
        };
        let want = (nll(&lg[0..3], 1) + nll(&lg[12..15], 0)) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Nothing supervised, or a label outside the vocabulary, is an error.
        let none = vec![vec![IGNORE_INDEX; 3]; 2];
        assert!(masked_cross_entropy(&logits, &none).is_err());
        let bad = vec![vec![0, 5, IGNORE_INDEX], vec![IGNORE_INDEX; 3]];
        assert!(masked_cross_entropy(&logits, &bad).is_err());
        Ok(())
    }
}
