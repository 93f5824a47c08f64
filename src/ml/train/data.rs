//! CoIN / LLaVA instruction data → training examples.
//!
//! A `train.json` record (`{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`)
//! becomes one vicuna_v1 conversation, as LLaVA's `preprocess_multimodal` + `preprocess_v1` do:
//! `<image>` is moved to the front of the first human turn followed by `\n`; the text is
//! `SYSTEM USER: q ASSISTANT: a</s>USER: …`; the whole conversation is tokenized once.
//!
//! Labels come in two schemes ([`Labeling`], chosen by how the model represents `<image>`):
//!
//! - **LLaVA's `preprocess_v1`** ([`Labeling::LlavaV1`], the CoIN split setup, whose `<image>` is a
//!   placeholder): the text is split at `</s>` into rounds; each round's token count is that of
//!   the round encoded on its own (BOS included, standing for the `</s>` that the split removed),
//!   the instruction part `… ASSISTANT: ` counts its own tokens minus 2 (BOS and the trailing
//!   `▁` that SentencePiece merges into the reply's first token), and those instruction tokens
//!   are masked. When the rounds' total differs from the conversation's token count (pad tokens,
//!   i.e. `<unk>`, not counted), LLaVA masks the whole example and prints "tokenization
//!   mismatch": so do we, and [`PrepareStats::mismatched`] counts it. Same labels as LLaVA's
//!   code for the same tokens (tests/fixtures/split_setup/labels.json).
//! - **Character spans** ([`Labeling::Spans`], llava-hf models): a token is supervised iff its
//!   span in the text overlaps an assistant reply: the separating space after `ASSISTANT:`, the
//!   reply text and its `</s>` — exactly what generation, prompted with `… ASSISTANT:`, has to
//!   produce. With LLaMA's tokenizer this supervises the tokens LLaVA supervises (the reply's
//!   first token carries the space, `▁word`, and `</s>`). A byte-level BPE without a merge for
//!   ` word` makes the space a token of its own: it is supervised too (leaving it out taught the
//!   tiny demo models every reply except its first token, so greedy decoding after `ASSISTANT:`
//!   started from an untrained position). BOS, image places and padding are never supervised.
//!
//! docs/training.md ("Labels") lists where the two schemes differ.
//!
//! Sequences longer than `max_positions` (image patches counted) are cut at the end, as LLaVA
//! truncates to `model_max_length`; an example left with no supervised token is skipped and
//! counted.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::batch::TrainExample;
use super::loss::IGNORE_INDEX;
use crate::ml::config::{ImageToken, LlavaConfig};
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
    /// Records left out whole because their round lengths did not add up to their token count
    /// (LLaVA's "tokenization mismatch", [`Labeling::LlavaV1`] only; not counted in `skipped`).
    pub mismatched: usize,
}

/// How the supervised tokens of a conversation are chosen (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labeling {
    /// A token is supervised iff its text span overlaps an assistant reply.
    Spans,
    /// LLaVA's `preprocess_v1` with `tokenizer_image_token` lengths; `pad` is the id LLaVA's
    /// token count leaves out (its pad token, `<unk>`).
    LlavaV1 {
        /// The pad token id.
        pad: u32,
    },
}

impl Labeling {
    /// The scheme of a model: LLaVA's `preprocess_v1` for the split setup (`<image>` as a
    /// placeholder, pad = the config's `pad_token_id`, 0 = LLaMA's `<unk>` when the LLaMA config
    /// has none), character spans for llava-hf models (`<image>` as a token).
    pub fn for_model(config: &LlavaConfig) -> Labeling {
        match config.image_token {
            ImageToken::Placeholder => Labeling::LlavaV1 {
                pad: config.pad_token_id,
            },
            ImageToken::Id(_) => Labeling::Spans,
        }
    }
}

/// A tokenized record and whether LLaVA's length check failed on it.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// Token segments and labels (all [`IGNORE_INDEX`] after a mismatch).
    pub example: TrainExample,
    /// The rounds' token counts did not add up to the conversation's ([`Labeling::LlavaV1`]).
    pub mismatch: bool,
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

/// Tokenize one record and label it with `labeling`. `model_max_length` is LLaVA's
/// `tokenizer.model_max_length`: its length check only runs on conversations shorter than that
/// (an image counts one position there, as in LLaVA's `input_ids`).
pub fn encode_record_with(
    tok: &PromptTokenizer,
    record: &TrainRecord,
    labeling: Labeling,
    model_max_length: usize,
) -> Result<Encoded> {
    match labeling {
        Labeling::Spans => Ok(Encoded {
            example: encode_record(tok, record)?,
            mismatch: false,
        }),
        Labeling::LlavaV1 { pad } => encode_record_llava_v1(tok, record, pad, model_max_length),
    }
}

/// Length of `text` as LLaVA's `tokenizer_image_token` returns it: text tokens (BOS included)
/// plus one per image.
fn llava_len(tok: &PromptTokenizer, text: &str) -> Result<usize> {
    Ok(tok
        .encode_prompt(text)?
        .iter()
        .map(|s| match s {
            Segment::Text(t) => t.len(),
            Segment::Image => 1,
        })
        .sum())
}

/// LLaVA's `preprocess_v1` labels (module docs), computed over LLaVA's `input_ids` (one place
/// per image) and returned for the text tokens only.
fn encode_record_llava_v1(
    tok: &PromptTokenizer,
    record: &TrainRecord,
    pad: u32,
    model_max_length: usize,
) -> Result<Encoded> {
    // vicuna_v1's separators: sep2 ends an assistant turn, `sep + roles[1] + ": "` opens it.
    const SEP2: &str = "</s>";
    const ASSISTANT_SEP: &str = " ASSISTANT: ";
    let (text, _) = conversation_text(record)?;
    let segments = tok.encode_prompt(&text)?;
    // LLaVA's input_ids: None marks an image place.
    let ids: Vec<Option<u32>> = segments
        .iter()
        .flat_map(|s| match s {
            Segment::Text(t) => t.iter().map(|&id| Some(id)).collect::<Vec<_>>(),
            Segment::Image => vec![None],
        })
        .collect();
    let n = ids.len();
    let total_len = ids.iter().filter(|&&id| id != Some(pad)).count();
    let mut supervised = vec![true; n];
    let mut mask = |from: usize, to: usize| {
        for s in &mut supervised[from.min(n)..to.min(n)] {
            *s = false;
        }
    };
    let mut cur_len = 1;
    mask(0, cur_len);
    for round in text.split(SEP2) {
        if round.is_empty() {
            break;
        }
        let parts: Vec<&str> = round.split(ASSISTANT_SEP).collect();
        if parts.len() != 2 {
            break;
        }
        let round_len = llava_len(tok, round)?;
        // Python's `target[a : a + k]` with k < 0 selects nothing.
        let instruction_len =
            llava_len(tok, &format!("{}{ASSISTANT_SEP}", parts[0]))?.saturating_sub(2);
        mask(cur_len, cur_len + instruction_len);
        cur_len += round_len;
    }
    mask(cur_len, n);
    let mismatch = cur_len < model_max_length && cur_len != total_len;
    if mismatch {
        mask(0, n);
    }
    let text_labels = ids
        .iter()
        .zip(&supervised)
        .filter_map(|(id, &sup)| id.map(|id| if sup { i64::from(id) } else { IGNORE_INDEX }))
        .collect();
    Ok(Encoded {
        example: TrainExample {
            segments,
            text_labels,
        },
        mismatch,
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

/// Prepare CoIN train records: tokenize, label with `labeling`, cut to `max_positions` (also
/// LLaVA's `model_max_length`), resolve images against `image_root` (their existence is checked
/// here, before any training starts).
pub fn prepare_samples(
    records: &[TrainRecord],
    image_root: &Path,
    tok: &PromptTokenizer,
    labeling: Labeling,
    image_seq_len: usize,
    max_positions: usize,
) -> Result<(Vec<Sample>, PrepareStats)> {
    let mut out = Vec::with_capacity(records.len());
    let mut stats = PrepareStats::default();
    for r in records {
        let Encoded {
            mut example,
            mismatch,
        } = encode_record_with(tok, r, labeling, max_positions)?;
        if mismatch {
            stats.mismatched += 1;
            continue;
        }
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

    /// tests/fixtures/split_setup: labels.json holds LLaVA's preprocess_v1 output (CoIN's code)
    /// for CoIN-style records, with the training tokenizer CoIN uses (`fast`: the conversion of
    /// tokenizer.model that `AutoTokenizer(use_fast=True)` makes, saved as
    /// converted/tokenizer.json) and with the slow `LlamaTokenizer` (`slow`).
    mod llava_v1 {
        use super::*;
        use serde_json::Value;

        fn fixture() -> PathBuf {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/split_setup")
        }

        fn goldens() -> Vec<Value> {
            let text = std::fs::read_to_string(fixture().join("labels.json")).expect("labels.json");
            let v: Value = serde_json::from_str(&text).expect("json");
            v["cases"].as_array().expect("cases").clone()
        }

        /// CoIN's training tokenizer: the fast conversion of the fixture's tokenizer.model.
        fn converted() -> PromptTokenizer {
            let t = tokenizers::Tokenizer::from_file(fixture().join("converted/tokenizer.json"))
                .expect("tokenizer.json");
            PromptTokenizer::new(t, ImageToken::Placeholder, 1, vec![2])
        }

        /// The split setup's own tokenizer (tokenizer.model, no tokenizer.json), as `coin`
        /// loads it.
        fn sentencepiece() -> PromptTokenizer {
            let f = fixture();
            let src = crate::ml::llava::ModelSource::resolve(
                &f.join("vicuna"),
                Some(&f.join("clip")),
                Some(&f.join("mm_projector.bin")),
            )
            .expect("split setup resolves");
            crate::ml::llava::load_model(&src, &Device::Cpu, candle_core::DType::F32)
                .expect("split setup loads (tokenizer.model read as a SentencePiece model)")
                .tokenizer
        }

        fn record_of(case: &Value) -> TrainRecord {
            serde_json::from_value(case["record"].clone()).expect("record")
        }

        /// LLaVA's input_ids (image = -200) and the labels of its text positions.
        fn golden(case: &Value, which: &str) -> (Vec<i64>, Vec<i64>, bool) {
            let g = &case[which];
            let nums = |k: &str| -> Vec<i64> {
                g[k].as_array()
                    .expect("array")
                    .iter()
                    .map(|x| x.as_i64().expect("int"))
                    .collect()
            };
            let (ids, labels) = (nums("input_ids"), nums("labels"));
            let text_labels = ids
                .iter()
                .zip(&labels)
                .filter(|(&id, _)| id != -200)
                .map(|(_, &l)| l)
                .collect();
            let mismatch = g["mismatch_warning"].as_bool().expect("bool");
            (ids, text_labels, mismatch)
        }

        fn llava_ids(ex: &TrainExample) -> Vec<i64> {
            ex.segments
                .iter()
                .flat_map(|s| match s {
                    Segment::Text(t) => t.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
                    Segment::Image => vec![-200],
                })
                .collect()
        }

        fn check_all(tok: &PromptTokenizer, which: &str) {
            let cases = goldens();
            assert!(cases.len() >= 10);
            for case in &cases {
                let id = case["record"]["id"].as_str().expect("id");
                let r = record_of(case);
                let (text, _) = conversation_text(&r).expect("valid record");
                assert_eq!(text, case["conversation"].as_str().expect("text"), "{id}");
                let enc = encode_record_with(tok, &r, Labeling::LlavaV1 { pad: 0 }, 2048)
                    .expect("encodes");
                let (ids, labels, mismatch) = golden(case, which);
                assert_eq!(llava_ids(&enc.example), ids, "{id}: input_ids");
                assert_eq!(enc.example.text_labels, labels, "{id}: labels");
                assert_eq!(enc.mismatch, mismatch, "{id}: mismatch");
            }
        }

        #[test]
        fn labels_equal_preprocess_v1_with_coins_training_tokenizer() {
            check_all(&converted(), "fast");
        }

        /// Needs the SentencePiece `PromptTokenizer` (tokenizer.model without tokenizer.json).
        #[test]
        fn labels_equal_preprocess_v1_with_the_sentencepiece_tokenizer() {
            check_all(&sentencepiece(), "slow");
        }

        #[test]
        fn a_mismatch_masks_the_record_and_is_counted() {
            let tok = converted();
            let records: Vec<TrainRecord> = goldens().iter().map(record_of).collect();
            let expected_mismatches = goldens()
                .iter()
                .filter(|c| c["fast"]["mismatch_warning"].as_bool() == Some(true))
                .count();
            assert_eq!(
                expected_mismatches, 2,
                "the fixture's unk and ASSISTANT cases"
            );
            let (samples, stats) = prepare_samples(
                &records,
                &fixture(),
                &tok,
                Labeling::LlavaV1 { pad: 0 },
                16,
                2048,
            )
            .expect("prepares");
            assert_eq!(stats.mismatched, expected_mismatches);
            assert_eq!(stats.skipped, 0);
            assert_eq!(stats.samples, records.len() - expected_mismatches);
            assert!(samples.iter().all(|s| s.id != "unk_in_answer"));
            // The same records with span labels: nothing is left out.
            let (_, spans) = prepare_samples(&records, &fixture(), &tok, Labeling::Spans, 16, 2048)
                .expect("prepares");
            assert_eq!((spans.samples, spans.mismatched), (records.len(), 0));
        }

        /// Where LLaVA's labels and the span labels part (documented in docs/training.md,
        /// "Labels"): in this fixture only the two records LLaVA masks whole (`<unk>` in the
        /// reply, a question quoting ` ASSISTANT: `).
        #[test]
        fn span_labels_differ_from_preprocess_v1_only_where_documented() {
            let tok = converted();
            let mut differ = Vec::new();
            for case in goldens() {
                let r = record_of(&case);
                let spans = encode_record(&tok, &r).expect("encodes");
                let (_, labels, _) = golden(&case, "fast");
                if spans.text_labels != labels {
                    differ.push(case["record"]["id"].as_str().expect("id").to_string());
                }
            }
            assert_eq!(differ, ["unk_in_answer", "assistant_in_question"]);
        }

        #[test]
        fn the_split_setup_gets_llava_labels_and_llava_hf_spans() {
            let mut c = crate::ml::tiny::tiny_config(64);
            c.image_token = ImageToken::Placeholder;
            c.pad_token_id = 0;
            assert_eq!(Labeling::for_model(&c), Labeling::LlavaV1 { pad: 0 });
            c.image_token = ImageToken::Id(3);
            assert_eq!(Labeling::for_model(&c), Labeling::Spans);
        }

        /// The tiny models' byte-level BPE (`--layout split` gets `LlavaV1`): BOS added and a
        /// lone trailing space token after `ASSISTANT:`, so LLaVA's lengths give the span labels.
        #[test]
        fn tiny_byte_level_models_get_the_same_labels_either_way() {
            let opts = crate::ml::tiny::TinyOptions::default();
            let t = crate::ml::tiny::tiny_tokenizer(&opts.corpus, opts.vocab_size)
                .expect("tiny tokenizer");
            let tok = PromptTokenizer::new(t, ImageToken::Placeholder, 1, vec![2]);
            let mut records: Vec<TrainRecord> = goldens().iter().map(record_of).collect();
            records.retain(|r| r.id.0 != "unk_in_answer" && r.id.0 != "assistant_in_question");
            records.push(record(
                true,
                &[("What is it?\n<image>", "A cat"), ("Sure?", "Yes")],
            ));
            for r in &records {
                let v1 = encode_record_with(&tok, r, Labeling::LlavaV1 { pad: 0 }, 2048)
                    .expect("encodes");
                let spans = encode_record(&tok, r).expect("encodes");
                assert!(!v1.mismatch, "{}", r.id.0);
                assert_eq!(v1.example.segments, spans.segments, "{}", r.id.0);
                assert_eq!(v1.example.text_labels, spans.text_labels, "{}", r.id.0);
            }
        }

        #[test]
        fn no_length_check_at_or_past_model_max_length() {
            let tok = converted();
            let case = goldens()
                .into_iter()
                .find(|c| c["record"]["id"] == "unk_in_answer")
                .expect("case");
            let r = record_of(&case);
            let n = llava_ids(
                &encode_record_with(&tok, &r, Labeling::LlavaV1 { pad: 0 }, 2048)
                    .expect("encodes")
                    .example,
            )
            .len();
            // LLaVA checks only when cur_len < model_max_length.
            let short =
                encode_record_with(&tok, &r, Labeling::LlavaV1 { pad: 0 }, n).expect("encodes");
            assert!(!short.mismatch);
            assert!(short.example.text_labels.iter().any(|&l| l != IGNORE_INDEX));
        }
    }
}
