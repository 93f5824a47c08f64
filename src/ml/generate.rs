//! Greedy decoding with a KV cache, batched (left padding), stopping at EOS or after
//! `max_new_tokens`; the library entry point [`generate`] used by `coin generate` and the
//! workflow.

use candle_core::{Tensor, D};
use serde::Serialize;

use super::image::{AspectMode, Rgb8};
use super::llama::{attention_mask, KvCache};
use super::llava::{Llava, LoadedModel, Segment};
use super::peft::PeftAdapter;
use super::template::image_question_prompt;
use super::{MlError, Result};

/// Decoding settings.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateSettings {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Image preprocessing.
    pub aspect: AspectMode,
    /// Return the logits of the first generated position.
    pub return_logits: bool,
    /// Keep generating past EOS until `max_new_tokens` (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateSettings {
    fn default() -> Self {
        GenerateSettings {
            max_new_tokens: 64,
            aspect: AspectMode::Pad,
            return_logits: false,
            ignore_eos: false,
        }
    }
}

/// One sample to generate for.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The full prompt text, with `<image>` where the image goes.
    pub prompt: String,
    /// The image (required when the prompt has `<image>`).
    pub image: Option<Rgb8>,
}

impl GenerateRequest {
    /// A question about an image, wrapped in the vicuna_v1 template with `<image>\n`.
    pub fn question(question: &str, image: Rgb8) -> Self {
        GenerateRequest {
            prompt: image_question_prompt(question),
            image: Some(image),
        }
    }
}

/// What was generated for one sample.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GenerateOutput {
    /// Generated ids (including the EOS that stopped it, as transformers returns them).
    pub token_ids: Vec<u32>,
    /// The decoded text (special tokens skipped).
    pub text: String,
    /// Logits at the last prompt position, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_step_logits: Option<Vec<f32>>,
}

/// Generate for a batch; `adapter` (and its projector, if it has one) is attached for the call
/// and removed afterwards.
pub fn generate(
    loaded: &mut LoadedModel,
    adapter: Option<&PeftAdapter>,
    batch: &[GenerateRequest],
    settings: &GenerateSettings,
) -> Result<Vec<GenerateOutput>> {
    let mut rows = Vec::with_capacity(batch.len());
    let mut pixels = Vec::new();
    for req in batch {
        let segs = loaded.tokenizer.encode_prompt(&req.prompt)?;
        let n_img = segs.iter().filter(|s| matches!(s, Segment::Image)).count();
        match (&req.image, n_img) {
            (Some(img), 1) => pixels.push(loaded.image.preprocess(
                img,
                settings.aspect,
                &loaded.model.device,
            )?),
            (None, 0) => {}
            (Some(_), 0) => {
                return Err(MlError::Input(
                    "an image was given but the prompt has no <image>".into(),
                ))
            }
            (None, _) => {
                return Err(MlError::Input(
                    "the prompt has <image> but no image was given".into(),
                ))
            }
            (Some(_), n) => {
                return Err(MlError::Input(format!(
                    "the prompt has {n} <image> places; one image per sample is supported"
                )))
            }
        }
        rows.push(segs);
    }
    let eos: &[u32] = if settings.ignore_eos {
        &[]
    } else {
        &loaded.tokenizer.eos
    };
    let run = |model: &Llava| {
        generate_segments(
            model,
            &rows,
            &pixels,
            settings.max_new_tokens,
            eos,
            settings.return_logits,
        )
    };
    let result = match adapter {
        Some(a) => a.with_attached(&mut loaded.model, run)?,
        None => run(&loaded.model),
    };
    let result = result?;
    result
        .into_iter()
        .map(|(ids, logits)| {
            let text = loaded.tokenizer.decode(&ids)?;
            Ok(GenerateOutput {
                token_ids: ids,
                text,
                first_step_logits: logits,
            })
        })
        .collect()
}

/// Generated ids of one row and, when asked for, its first-step logits.
pub type RowOutput = (Vec<u32>, Option<Vec<f32>>);

/// Greedy decoding on tokenized rows; `pixels` holds one (3, H, W) tensor per `Segment::Image`
/// in row order. Returns per row the generated ids and optionally the first-step logits.
pub fn generate_segments(
    model: &Llava,
    rows: &[Vec<Segment>],
    pixels: &[Tensor],
    max_new_tokens: usize,
    eos: &[u32],
    return_logits: bool,
) -> Result<Vec<RowOutput>> {
    let b = rows.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let dev = &model.device;
    let features: Vec<Tensor> = if pixels.is_empty() {
        Vec::new()
    } else {
        let f = model.image_features(&Tensor::stack(pixels, 0)?)?;
        (0..pixels.len())
            .map(|i| f.get(i))
            .collect::<candle_core::Result<_>>()?
    };
    let mut feat_iter = features.into_iter();
    let mut embeds = Vec::with_capacity(b);
    for row in rows {
        embeds.push(model.embed_row(row, &mut feat_iter)?);
    }
    let lens: Vec<usize> = embeds
        .iter()
        .map(|e| e.dim(0))
        .collect::<candle_core::Result<_>>()?;
    let t = lens.iter().copied().max().unwrap_or(0);
    let pad_emb = model
        .llm
        .embed(&Tensor::new(&[model.config.pad_token_id], dev)?)?;
    let mut padded = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    let mut positions = Vec::with_capacity(b * t);
    let mut next_pos = Vec::with_capacity(b);
    for (e, &len) in embeds.iter().zip(&lens) {
        let p = t - len;
        let row = if p > 0 {
            Tensor::cat(&[&pad_emb.broadcast_as((p, e.dim(1)?))?, e], 0)?
        } else {
            e.clone()
        };
        padded.push(row);
        let mut v = vec![false; p];
        v.extend(std::iter::repeat_n(true, len));
        valid.push(v);
        // transformers: position_ids = cumsum(mask) − 1, padding set to 1.
        positions.extend((0..t).map(|j| if j < p { 1u32 } else { (j - p) as u32 }));
        next_pos.push(len as u32);
    }
    let x = Tensor::stack(&padded, 0)?;
    let pos = Tensor::from_vec(positions, (b, t), dev)?;
    let mask = attention_mask(&valid, t, dev)?;
    let mut cache = KvCache::new();
    let hidden = model
        .llm
        .forward_embeds(&x, &pos, &mask, Some(&mut cache))?;
    let mut logits = model.llm.logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1)?;

    let mut out: Vec<RowOutput> = (0..b).map(|_| (Vec::new(), None)).collect();
    if return_logits {
        let l: Vec<Vec<f32>> = logits.to_vec2()?;
        for (o, row) in out.iter_mut().zip(l) {
            o.1 = Some(row);
        }
    }
    let mut done = vec![false; b];
    for step in 0..max_new_tokens {
        let next: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let mut feed = Vec::with_capacity(b);
        for i in 0..b {
            if done[i] {
                feed.push(model.config.pad_token_id);
                continue;
            }
            out[i].0.push(next[i]);
            feed.push(next[i]);
            if eos.contains(&next[i]) {
                done[i] = true;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
            break;
        }
        let ids = Tensor::from_vec(feed, (b, 1), dev)?;
        let x = model.llm.embed(&ids)?;
        for v in valid.iter_mut() {
            v.push(true);
        }
        let pos = Tensor::from_vec(next_pos.clone(), (b, 1), dev)?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let mask = attention_mask(&valid, 1, dev)?;
        let hidden = model
            .llm
            .forward_embeds(&x, &pos, &mask, Some(&mut cache))?;
        logits = model.llm.logits(&hidden)?.squeeze(1)?;
    }
    Ok(out)
}
