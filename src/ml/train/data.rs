//! CoIN / LLaVA instruction data → training examples.
//!
//! A `train.json` record (`{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`)
//! becomes one vicuna_v1 conversation, as LLaVA's `preprocess_multimodal` + `preprocess_v1` do:
//! `<image>` is moved to the front of the first human turn followed by `\n`; the text is
//! `SYSTEM USER: q ASSISTANT: a</s>USER: …`; the whole conversation is tokenized once.
//!
//! Labels: LLaVA masks the system prompt and every `USER: … ASSISTANT: ` part by recomputing
//! token lengths of each round (with SentencePiece-specific `-2` corrections that go wrong for
//! other tokenizers: its "tokenization mismatch" warning). We label by character position
//! instead: a token is supervised iff its span in the text overlaps an assistant reply: the
//! separating space after `ASSISTANT:`, the reply text and its `</s>` — exactly what
//! generation, prompted with `… ASSISTANT:`, has to produce. With LLaMA's tokenizer this
//! supervises the tokens LLaVA supervises (the reply's first token carries the space,
//! `▁word`, and `</s>`). A byte-level BPE without a merge for ` word` makes the space a token
//! of its own: it is supervised too (leaving it out taught the tiny demo models every reply
//! except its first token, so greedy decoding after `ASSISTANT:` started from an untrained
//! position). BOS, image places and padding are never supervised.
//!
//! Sequences longer than `max_positions` (image patches counted) are cut at the end, as LLaVA
//! truncates to `model_max_length`; an example left with no supervised token is skipped and
//! counted.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::batch::TrainExample;
use super::loss::IGNORE_INDEX;
use crate::ml::image::{AspectMode, ImageProcessor, Rgb8};
use crate::ml::llava::Segment;
use crate::ml::template::{PromptTokenizer, IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM};
use crate::ml::{MlError, Result};
use crate::tasks::formats::TrainRecord;

/// One prepared training sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The record's id.
    pub id: String,
    /// Token segments and labels.
    pub example: TrainExample,
    /// The image file, when the record has one.
    pub image: Option<PathBuf>,
    /// Sequence positions (image patches included).
    pub positions: usize,
    /// Supervised tokens (labels that are not [`IGNORE_INDEX`], before the causal shift).
    pub supervised: usize,
}

/// What [`prepare_samples`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrepareStats {
    /// Records turned into samples.
    pub samples: usize,
    /// Records cut to the length limit.
    pub truncated: usize,
    /// Records skipped because no supervised token was left after the cut.
    pub skipped: usize,
}

/// The conversation text of a record and the byte ranges of its assistant replies (each
/// from the space after `ASSISTANT:` to the `</s>` that ends it).
pub fn conversation_text(record: &TrainRecord) -> Result<(String, Vec<(usize, usize)>)> {
    record
        .validate()
        .map_err(|e| MlError::Input(format!("record '{}': {e}", record.id.0)))?;
    let mut text = format!("{VICUNA_V1_SYSTEM} ");
    let mut replies = Vec::new();
    for (i, pair) in record.conversations.chunks(2).enumerate() {
        let mut user = pair[0].value.clone();
        if i == 0 && record.image.is_some() {
            // LLaVA's preprocess_multimodal: the image goes first, then a newline.
            let rest = user.replace(IMAGE_PLACEHOLDER, "");
            user = format!("{IMAGE_PLACEHOLDER}\n{}", rest.trim());
        } else if user.contains(IMAGE_PLACEHOLDER) {
            return Err(MlError::Input(format!(
                "record '{}': `<image>` in turn {} but the record {}",
                record.id.0,
                2 * i,
                if record.image.is_some() {
                    "has its image in the first turn"
                } else {
                    "has no image"
                }
            )));
        }
        text.push_str("USER: ");
        text.push_str(&user);
        text.push_str(" ASSISTANT:");
        // The reply starts at the separating space: generation is prompted with
        // `… ASSISTANT:` and must produce it (as `▁word` with LLaMA's tokenizer, or as a
        // token of its own with a byte-level BPE that has no merge for ` word`).
        let start = text.len();
        text.push(' ');
        text.push_str(&pair[1].value);
        text.push_str("</s>");
        replies.push((start, text.len()));
    }
    Ok((text, replies))
}

/// Tokenize one record into a training example (without the length limit).
pub fn encode_record(tok: &PromptTokenizer, record: &TrainRecord) -> Result<TrainExample> {
    let (text, replies) = conversation_text(record)?;
    let (segments, ranges) = tok.encode_prompt_with_offsets(&text)?;
    let text_labels = segments
        .iter()
        .filter_map(|s| match s {
            Segment::Text(ids) => Some(ids),
            Segment::Image => None,
        })
        .flatten()
        .zip(&ranges)
        .map(|(&id, &(a, b))| {
            let supervised = b > a && replies.iter().any(|&(s, e)| a < e && b > s);
            if supervised {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(TrainExample {
        segments,
        text_labels,
    })
}

/// Cut `ex` to at most `max_positions` positions (an image counts `image_seq_len`); returns
/// whether anything was cut. An image that does not fit whole is dropped with what follows.
pub fn truncate(ex: &mut TrainExample, max_positions: usize, image_seq_len: usize) -> bool {
    let mut used = 0;
    let mut labels_kept = 0;
    let mut keep_segments = 0;
    let mut cut = false;
    for s in ex.segments.iter_mut() {
        match s {
            Segment::Image => {
                if used + image_seq_len > max_positions {
                    cut = true;
                    break;
                }
                used += image_seq_len;
            }
            Segment::Text(ids) => {
                let room = max_positions - used;
                if ids.len() > room {
                    ids.truncate(room);
                    cut = true;
                }
                used += ids.len();
                labels_kept += ids.len();
            }
        }
        keep_segments += 1;
        if cut {
            break;
        }
    }
    if cut {
        ex.segments.truncate(keep_segments);
        ex.segments
            .retain(|s| !matches!(s, Segment::Text(t) if t.is_empty()));
        ex.text_labels.truncate(labels_kept);
    }
    cut
}

/// Positions of an example (images expanded).
pub fn positions(ex: &TrainExample, image_seq_len: usize) -> usize {
    ex.segments
        .iter()
        .map(|s| match s {
            Segment::Text(t) => t.len(),
            Segment::Image => image_seq_len,
        })
        .sum()
}

/// Prepare CoIN train records: tokenize, label, cut to `max_positions`, resolve images
/// against `image_root` (their existence is checked here, before any training starts).
pub fn prepare_samples(
    records: &[TrainRecord],
    image_root: &Path,
    tok: &PromptTokenizer,
    image_seq_len: usize,
    max_positions: usize,
) -> Result<(Vec<Sample>, PrepareStats)> {
    let mut out = Vec::with_capacity(records.len());
    let mut stats = PrepareStats::default();
    for r in records {
        let mut example = encode_record(tok, r)?;
        if truncate(&mut example, max_positions, image_seq_len) {
            stats.truncated += 1;
        }
        // Only labels after the first position can be predicted (causal shift).
        let supervised = example
            .text_labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
        if supervised == 0 {
            stats.skipped += 1;
            continue;
        }
        let has_image_place = example.segments.iter().any(|s| matches!(s, Segment::Image));
        let image = match (&r.image, has_image_place) {
            (Some(rel), true) => {
                let p = crate::tasks::formats::resolve_image(image_root, rel)
                    .map_err(|e| MlError::Input(format!("record '{}': {e}", r.id.0)))?;
                if !p.is_file() {
                    return Err(MlError::Input(format!(
                        "record '{}': image '{}' does not exist (image root '{}')",
                        r.id.0,
                        p.display(),
                        image_root.display()
                    )));
                }
                Some(p)
            }
            _ => None,
        };
        out.push(Sample {
            id: r.id.0.clone(),
            positions: positions(&example, image_seq_len),
            supervised,
            example,
            image,
        });
        stats.samples += 1;
    }
    Ok((out, stats))
}

/// Preprocessed images kept in memory up to a byte budget (training revisits every image once
/// per epoch; decoding and resizing is a visible share of a small model's step).
#[derive(Debug)]
pub struct PixelCache {
    map: std::collections::HashMap<PathBuf, Tensor>,
    bytes: usize,
    budget: usize,
}

impl PixelCache {
    /// A cache holding at most `budget` bytes of pixel tensors (0 disables it).
    pub fn new(budget: usize) -> Self {
        PixelCache {
            map: std::collections::HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    /// The pixels of `path`, from the cache or freshly preprocessed.
    pub fn get(
        &mut self,
        path: &Path,
        processor: &ImageProcessor,
        mode: AspectMode,
        device: &Device,
    ) -> Result<Tensor> {
        if let Some(t) = self.map.get(path) {
            return Ok(t.clone());
        }
        let t = processor.preprocess(&Rgb8::open(path)?, mode, device)?;
        let size = t.elem_count() * t.dtype().size_in_bytes();
        if self.bytes + size <= self.budget {
            self.bytes += size;
            self.map.insert(path.to_path_buf(), t.clone());
        }
        Ok(t)
    }
}

/// Load and preprocess the images of a batch of samples (one (3, H, W) tensor per sample with
/// an image, in order).
pub fn batch_pixels(
    samples: &[&Sample],
    processor: &ImageProcessor,
    mode: AspectMode,
    device: &Device,
    cache: &mut PixelCache,
) -> Result<Vec<Tensor>> {
    samples
        .iter()
        .filter_map(|s| s.image.as_ref())
        .map(|p| cache.get(p, processor, mode, device))
        .collect()
}

/// A record with an optional image and (question, answer) turns (tests).
#[cfg(test)]
pub(crate) fn record(image: bool, turns: &[(&str, &str)]) -> TrainRecord {
    use crate::tasks::formats::{Qid, Turn};
    TrainRecord {
        id: Qid::text("r1"),
        image: image.then(|| "img.png".to_string()),
        conversations: turns
            .iter()
            .flat_map(|(q, a)| {
                [
                    Turn {
                        from: "human".into(),
                        value: q.to_string(),
                    },
                    Turn {
                        from: "gpt".into(),
                        value: a.to_string(),
                    },
                ]
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_text_moves_the_image_first_and_marks_replies() {
        let r = record(true, &[("What is it?\n<image>", "A cat"), ("Sure?", "Yes")]);
        let (text, replies) = conversation_text(&r).expect("valid");
        assert_eq!(
            text,
            format!(
                "{VICUNA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat</s>USER: Sure? \
                 ASSISTANT: Yes</s>"
            )
        );
        let got: Vec<&str> = replies.iter().map(|&(a, b)| &text[a..b]).collect();
        assert_eq!(got, [" A cat</s>", " Yes</s>"]);
    }

    #[test]
    fn image_in_a_later_turn_is_refused() {
        let r = record(true, &[("Hi", "Hello"), ("<image>\nAnd this?", "No")]);
        let err = conversation_text(&r).expect_err("image in turn 2");
        assert!(err.to_string().contains("turn 2"), "{err}");
    }

    #[test]
    fn truncation_keeps_whole_images_and_matching_labels() {
        let mut ex = TrainExample {
            segments: vec![
                Segment::Text(vec![1, 2]),
                Segment::Image,
                Segment::Text(vec![3, 4, 5, 6]),
            ],
            text_labels: vec![-100, -100, -100, 4, 5, 6],
        };
        assert!(!truncate(&mut ex.clone(), 10, 4));
        assert!(truncate(&mut ex, 8, 4));
        assert_eq!(positions(&ex, 4), 8);
        assert_eq!(ex.text_labels, vec![-100, -100, -100, 4]);
        let mut ex2 = ex.clone();
        assert!(truncate(&mut ex2, 5, 4));
        assert_eq!(ex2.segments, vec![Segment::Text(vec![1, 2])]);
        assert_eq!(ex2.text_labels, vec![-100, -100]);
    }
}
