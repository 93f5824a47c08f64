//! The vicuna_v1 conversation template and prompt tokenization with `<image>` places.
//!
//! vicuna_v1 (LLaVA `conv_vicuna_v1`, separator style TWO): system message, `" "`, then
//! `"USER: " + message + " "` and `"ASSISTANT: " + answer + "</s>"`; an open assistant turn ends
//! in `"ASSISTANT:"`. The question of an image turn is `"<image>\n" + question`.

use std::path::Path;

use tokenizers::Tokenizer;

use super::config::{ImageToken, LlavaConfig};
use super::llava::Segment;
use super::spm::slow::{self, SlowTokenizer};
use super::{MlError, Result};

/// The vicuna_v1 system message.
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// The image placeholder in prompt text.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// A conversation: (user, assistant) turns; the last assistant answer may be `None` (open).
pub fn vicuna_v1(turns: &[(&str, Option<&str>)]) -> String {
    let mut s = format!("{VICUNA_V1_SYSTEM} ");
    for (user, answer) in turns {
        s.push_str("USER: ");
        s.push_str(user);
        s.push(' ');
        match answer {
            Some(a) => {
                s.push_str("ASSISTANT: ");
                s.push_str(a);
                s.push_str("</s>");
            }
            None => s.push_str("ASSISTANT:"),
        }
    }
    s
}

/// The generation prompt for one question about one image.
pub fn image_question_prompt(question: &str) -> String {
    vicuna_v1(&[(&format!("{IMAGE_PLACEHOLDER}\n{question}"), None)])
}

/// The byte range `(start, end)` of a token in the text it was encoded from.
pub type TokenSpan = (usize, usize);

/// The tokenizer behind a [`PromptTokenizer`].
pub enum TokenizerBackend {
    /// An HF `tokenizer.json` (the `tokenizers` crate).
    Hf(Box<Tokenizer>),
    /// `tokenizer.model` read as transformers 4.31's slow `LlamaTokenizer` (the CoIN split
    /// setup: Vicuna has no `tokenizer.json`, and LLaVA loads it with `use_fast=False`).
    Slow(Box<SlowTokenizer>),
}

/// A tokenizer that knows how the model represents `<image>`.
pub struct PromptTokenizer {
    /// The tokenizer.
    pub backend: TokenizerBackend,
    image_token: ImageToken,
    /// Beginning-of-sequence id.
    pub bos: u32,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> MlError {
    MlError::Tokenizer {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// Which tokenizer file of a model folder [`PromptTokenizer::from_dir_with`] reads first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerChoice {
    /// `tokenizer.json` when present, else `tokenizer.model` (llava-hf folders).
    PreferFast,
    /// `tokenizer.model` when present, else `tokenizer.json`: LLaVA builds the split setup's
    /// tokenizer with `use_fast=False`.
    PreferSlow,
}

/// Whether `tokenizer_config.json` in `dir` says `"use_fast": false`.
fn config_says_slow(dir: &Path) -> bool {
    std::fs::read(dir.join(slow::CONFIG_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("use_fast").and_then(serde_json::Value::as_bool))
        == Some(false)
}

impl PromptTokenizer {
    /// Read the tokenizer of a model directory: `tokenizer.json` when it exists (unless
    /// `tokenizer_config.json` says `"use_fast": false` and there is a `tokenizer.model`),
    /// else `tokenizer.model` with `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_dir(dir: &Path, config: &LlavaConfig) -> Result<Self> {
        Self::from_dir_with(dir, config, TokenizerChoice::PreferFast)
    }

    /// [`PromptTokenizer::from_dir`] with a choice of which file wins when both exist.
    pub fn from_dir_with(
        dir: &Path,
        config: &LlavaConfig,
        choice: TokenizerChoice,
    ) -> Result<Self> {
        let fast = dir.join("tokenizer.json");
        let slow_model = dir.join(slow::MODEL_FILE);
        let use_slow = slow_model.exists()
            && (!fast.exists() || choice == TokenizerChoice::PreferSlow || config_says_slow(dir));
        if use_slow {
            let mut tok = Self::from_spm_dir(dir, config.image_token)?;
            tok.eos = config.text.eos_token_ids.clone();
            tok.bos = config.text.bos_token_id;
            return Ok(tok);
        }
        if !fast.exists() {
            return Err(MlError::NotAModel {
                path: dir.to_path_buf(),
                message: "no tokenizer.json or tokenizer.model".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&fast)
            .map_err(|e| tok_err(&format!("reading '{}'", fast.display()), e))?;
        Ok(PromptTokenizer {
            backend: TokenizerBackend::Hf(Box::new(tokenizer)),
            image_token: config.image_token,
            bos: config.text.bos_token_id,
            eos: config.text.eos_token_ids.clone(),
        })
    }

    /// The slow tokenizer of a folder with `tokenizer.model`; BOS and EOS from its config.
    pub fn from_spm_dir(dir: &Path, image_token: ImageToken) -> Result<Self> {
        let slow = SlowTokenizer::from_dir(dir)?;
        let bos = slow.bos().unwrap_or(1);
        let eos = slow.eos().into_iter().collect();
        Ok(PromptTokenizer {
            backend: TokenizerBackend::Slow(Box::new(slow)),
            image_token,
            bos,
            eos,
        })
    }

    /// The tokenizer of a model or tokenizer folder without a model config (for inspection):
    /// `tokenizer.model` when present (LLaVA's `use_fast=False`), else `tokenizer.json` with
    /// BOS and EOS from `tokenizer_config.json` (`<s>`, `</s>` by default). `<image>` is
    /// LLaVA's split placeholder.
    pub fn from_tokenizer_dir(dir: &Path) -> Result<Self> {
        if dir.join(slow::MODEL_FILE).exists() {
            return Self::from_spm_dir(dir, ImageToken::Placeholder);
        }
        let fast = dir.join("tokenizer.json");
        if !fast.exists() {
            return Err(MlError::NotAModel {
                path: dir.to_path_buf(),
                message: "no tokenizer.json or tokenizer.model".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&fast)
            .map_err(|e| tok_err(&format!("reading '{}'", fast.display()), e))?;
        let cfg = std::fs::read(dir.join(slow::CONFIG_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let named = |key: &str, default: &str| {
            let v = cfg.as_ref().and_then(|c| c.get(key));
            let content = v
                .and_then(|v| {
                    v.as_str()
                        .or_else(|| v.get("content").and_then(|c| c.as_str()))
                })
                .unwrap_or(default);
            tokenizer.token_to_id(content)
        };
        let bos = named("bos_token", "<s>").ok_or_else(|| MlError::NotAModel {
            path: fast.clone(),
            message: "the tokenizer has no BOS token".into(),
        })?;
        let eos = named("eos_token", "</s>").into_iter().collect();
        Ok(PromptTokenizer {
            backend: TokenizerBackend::Hf(Box::new(tokenizer)),
            image_token: ImageToken::Placeholder,
            bos,
            eos,
        })
    }

    /// A tokenizer from parts (tests, tiny models).
    pub fn new(tokenizer: Tokenizer, image_token: ImageToken, bos: u32, eos: Vec<u32>) -> Self {
        PromptTokenizer {
            backend: TokenizerBackend::Hf(Box::new(tokenizer)),
            image_token,
            bos,
            eos,
        }
    }

    /// The HF tokenizer, when that is the backend.
    pub fn hf(&self) -> Option<&Tokenizer> {
        match &self.backend {
            TokenizerBackend::Hf(t) => Some(t),
            TokenizerBackend::Slow(_) => None,
        }
    }

    /// The text of a token id, for display (`None` outside the vocabulary).
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        match &self.backend {
            TokenizerBackend::Hf(t) => t.id_to_token(id),
            TokenizerBackend::Slow(t) => t.model().id_to_piece(id).map(str::to_string),
        }
    }

    /// Token ids of text (with the tokenizer's special-token template, e.g. BOS, when asked).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_ranges(text, special)?.0)
    }

    /// Token ids of text and the byte range of each in `text`.
    fn encode_with_ranges(&self, text: &str, special: bool) -> Result<(Vec<u32>, Vec<TokenSpan>)> {
        match &self.backend {
            TokenizerBackend::Hf(t) => {
                let enc = t
                    .encode(text, special)
                    .map_err(|e| tok_err("encoding", e))?;
                Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
            }
            TokenizerBackend::Slow(t) => Ok(t.encode_with_ranges(text, special)),
        }
    }

    /// A full prompt (containing `<image>` places) as segments. llava-hf: the whole text is
    /// encoded and each `<image>` token becomes an image place; split setup: LLaVA's
    /// `tokenizer_image_token` (chunks encoded separately, BOS only on the first).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<Segment>> {
        Ok(self.encode_prompt_with_offsets(prompt)?.0)
    }

    /// Like [`PromptTokenizer::encode_prompt`], plus the byte range in `prompt` that each text
    /// token came from, in order over all text segments (`(0, 0)`-style empty ranges for tokens
    /// the tokenizer inserted, such as BOS). Training uses the ranges to label assistant tokens.
    pub fn encode_prompt_with_offsets(
        &self,
        prompt: &str,
    ) -> Result<(Vec<Segment>, Vec<TokenSpan>)> {
        let mut segments = Vec::new();
        let mut ranges = Vec::new();
        let mut cur: Vec<u32> = Vec::new();
        match self.image_token {
            ImageToken::Id(image_id) => {
                let (ids, offs) = self.encode_with_ranges(prompt, true)?;
                for (id, (a, b)) in ids.into_iter().zip(offs) {
                    if id == image_id {
                        segments.push(Segment::Text(std::mem::take(&mut cur)));
                        segments.push(Segment::Image);
                    } else {
                        cur.push(id);
                        ranges.push((a, b));
                    }
                }
                segments.push(Segment::Text(cur));
            }
            ImageToken::Placeholder => {
                let slow_bos = match &self.backend {
                    TokenizerBackend::Slow(t) => Some(t.bos()),
                    TokenizerBackend::Hf(_) => None,
                };
                // LLaVA's `tokenizer_image_token`: when the first chunk starts with BOS, every
                // chunk's first token (its BOS) is dropped and the first chunk's BOS kept once.
                let mut offset = 0;
                let mut base = 0;
                for (i, chunk) in prompt.split(IMAGE_PLACEHOLDER).enumerate() {
                    if i > 0 {
                        segments.push(Segment::Image);
                        base += IMAGE_PLACEHOLDER.len();
                    }
                    let (mut ids, offs) = self.encode_with_ranges(chunk, true)?;
                    let mut offs: Vec<TokenSpan> = offs
                        .into_iter()
                        .map(|(a, b)| if b > a { (a + base, b + base) } else { (0, 0) })
                        .collect();
                    if let Some(bos) = slow_bos {
                        if i == 0 && bos.is_some() && ids.first().copied() == bos {
                            offset = 1;
                        } else {
                            let n = offset.min(ids.len());
                            ids.drain(..n);
                            offs.drain(..n);
                        }
                    } else {
                        if ids.first() == Some(&self.bos) && i > 0 {
                            ids.remove(0);
                            offs.remove(0);
                        }
                        if i == 0 && ids.first() != Some(&self.bos) {
                            ids.insert(0, self.bos);
                            offs.insert(0, (0, 0));
                        }
                    }
                    ranges.extend(offs);
                    segments.push(Segment::Text(ids));
                    base += chunk.len();
                }
            }
        }
        segments.retain(|s| !matches!(s, Segment::Text(t) if t.is_empty()));
        Ok((segments, ranges))
    }

    /// Decode generated ids to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            TokenizerBackend::Hf(t) => t.decode(ids, true).map_err(|e| tok_err("decoding", e)),
            TokenizerBackend::Slow(t) => t.decode(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vicuna_v1_matches_llava_get_prompt() {
        let p = image_question_prompt("What color is the cube?");
        assert_eq!(
            p,
            format!("{VICUNA_V1_SYSTEM} USER: <image>\nWhat color is the cube? ASSISTANT:")
        );
        let t = vicuna_v1(&[("q1", Some("a1")), ("q2", None)]);
        assert!(
            t.ends_with("USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"),
            "{t}"
        );
    }
}
