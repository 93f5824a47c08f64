//! A training batch: rows of prompt segments (text ids and images) with per-position labels,
//! run through the model to full-sequence logits.
//!
//! Rows are right-padded (LLaVA's training collator): padding positions get the pad token's
//! embedding, label [`IGNORE_INDEX`] and are hidden from attention; positions are 0..len.

use candle_core::{Tensor, D};

use super::loss::IGNORE_INDEX;
use crate::ml::llama::attention_mask;
use crate::ml::llava::{Llava, Segment};
use crate::ml::{MlError, Result};

/// One training sequence.
#[derive(Clone, Debug)]
pub struct TrainExample {
    /// The prompt pieces in order (text ids, image places).
    pub segments: Vec<Segment>,
    /// One label per text token, in order over all text segments ([`IGNORE_INDEX`] for
    /// non-assistant tokens); image places are labelled [`IGNORE_INDEX`] automatically.
    pub text_labels: Vec<i64>,
}

impl TrainExample {
    /// Labels for every position of the row (images expanded to `image_seq_len` positions).
    pub fn position_labels(&self, image_seq_len: usize) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        let mut next = 0;
        for s in &self.segments {
            match s {
                Segment::Text(ids) => {
                    let end = next + ids.len();
                    let labels = self.text_labels.get(next..end).ok_or_else(|| {
                        MlError::Input(format!(
                            "{} text labels for at least {end} text tokens",
                            self.text_labels.len()
                        ))
                    })?;
                    out.extend_from_slice(labels);
                    next = end;
                }
                Segment::Image => out.extend(std::iter::repeat_n(IGNORE_INDEX, image_seq_len)),
            }
        }
        if next != self.text_labels.len() {
            return Err(MlError::Input(format!(
                "{} text labels for {next} text tokens",
                self.text_labels.len()
            )));
        }
        Ok(out)
    }
}

/// A batch ready for the decoder: the padded input embeddings, positions, mask and labels.
pub struct BatchInputs {
    /// Input embeddings (b, t, hidden): text embeddings and projected image features
    /// (tracked when the projector or the embeddings train).
    pub embeds: Tensor,
    /// Positions (b, t), 0..t in every row.
    pub positions: Tensor,
    /// The additive causal + padding mask (b, 1, t, t).
    pub mask: Tensor,
    /// Labels, b rows of t ([`IGNORE_INDEX`] on padding).
    pub labels: Vec<Vec<i64>>,
}

/// Full-sequence logits (b, s, vocab) of a batch and its padded labels (b × s).
/// `pixels` holds one (3, H, W) tensor per image place, in row order.
pub fn forward_batch(
    model: &Llava,
    examples: &[TrainExample],
    pixels: &[Tensor],
) -> Result<(Tensor, Vec<Vec<i64>>)> {
    let inputs = prepare_batch(model, examples, pixels)?;
    let hidden = super::checkpoint::decoder(model, &inputs)?;
    Ok((model.llm.logits(&hidden)?, inputs.labels))
}

/// Embed and pad a batch (the vision tower and projector run here, with their graph) for the
/// decoder.
pub fn prepare_batch(
    model: &Llava,
    examples: &[TrainExample],
    pixels: &[Tensor],
) -> Result<BatchInputs> {
    if examples.is_empty() {
        return Err(MlError::Input("empty training batch".into()));
    }
    let features = if pixels.is_empty() {
        None
    } else {
        Some(super::checkpoint::image_features(
            model,
            &Tensor::stack(pixels, 0)?,
        )?)
    };
    embed_batch(model, examples, features)
}

/// Embed and pad a batch whose image features (n_images, image_seq_len, hidden), projected,
/// are given (`None` without images).
pub(crate) fn embed_batch(
    model: &Llava,
    examples: &[TrainExample],
    features: Option<Tensor>,
) -> Result<BatchInputs> {
    if examples.is_empty() {
        return Err(MlError::Input("empty training batch".into()));
    }
    let dev = &model.device;
    let features: Vec<Tensor> = match features {
        None => Vec::new(),
        Some(f) => (0..f.dim(0)?)
            .map(|i| f.get(i))
            .collect::<candle_core::Result<_>>()?,
    };
    let n_features = features.len();
    let mut feat_iter = features.into_iter();
    let seq_len = model.config.image_seq_len();
    let mut embeds = Vec::with_capacity(examples.len());
    let mut labels = Vec::with_capacity(examples.len());
    for ex in examples {
        let e = model.embed_row(&ex.segments, &mut feat_iter)?;
        let l = ex.position_labels(seq_len)?;
        if l.len() != e.dim(0)? {
            return Err(MlError::Input(format!(
                "{} labels for a row of {} positions",
                l.len(),
                e.dim(0)?
            )));
        }
        embeds.push(e);
        labels.push(l);
    }
    if feat_iter.next().is_some() {
        return Err(MlError::Input(format!(
            "{n_features} images for fewer <image> places"
        )));
    }
    let t = labels.iter().map(Vec::len).max().unwrap_or(0);
    let pad = model
        .llm
        .embed(&Tensor::new(&[model.config.pad_token_id], dev)?)?;
    let mut rows = Vec::with_capacity(embeds.len());
    let mut valid = Vec::with_capacity(embeds.len());
    for (e, l) in embeds.iter().zip(labels.iter_mut()) {
        let len = l.len();
        let row = if len < t {
            let p = pad
                .to_dtype(e.dtype())?
                .broadcast_as((t - len, e.dim(D::Minus1)?))?;
            Tensor::cat(&[e, &p], 0)?
        } else {
            e.clone()
        };
        rows.push(row);
        let mut v = vec![true; len];
        v.resize(t, false);
        valid.push(v);
        l.resize(t, IGNORE_INDEX);
    }
    let x = Tensor::stack(&rows, 0)?;
    let b = rows.len();
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let positions = Tensor::from_vec(positions, (b, t), dev)?;
    let mask = attention_mask(&valid, t, dev)?;
    Ok(BatchInputs {
        embeds: x,
        positions,
        mask,
        labels,
    })
}
