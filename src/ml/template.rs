//! The vicuna_v1 conversation template and prompt tokenization with `<image>` places.
//!
//! vicuna_v1 (LLaVA `conv_vicuna_v1`, separator style TWO): system message, `" "`, then
//! `"USER: " + message + " "` and `"ASSISTANT: " + answer + "</s>"`; an open assistant turn ends
//! in `"ASSISTANT:"`. The question of an image turn is `"<image>\n" + question`.

use std::path::Path;

use tokenizers::Tokenizer;

use super::config::{ImageToken, LlavaConfig};
use super::llava::Segment;
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

/// A tokenizer that knows how the model represents `<image>`.
pub struct PromptTokenizer {
    /// The HF tokenizer.
    pub tokenizer: Tokenizer,
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

impl PromptTokenizer {
    /// Read `tokenizer.json` from a model directory.
    pub fn from_dir(dir: &Path, config: &LlavaConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(MlError::NotAModel {
                path: dir.to_path_buf(),
                message: "no tokenizer.json (only the `tokenizers` JSON format is read)".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| tok_err(&format!("reading '{}'", path.display()), e))?;
        Ok(PromptTokenizer {
            tokenizer,
            image_token: config.image_token,
            bos: config.text.bos_token_id,
            eos: config.text.eos_token_ids.clone(),
        })
    }

    /// A tokenizer from parts (tests, tiny models).
    pub fn new(tokenizer: Tokenizer, image_token: ImageToken, bos: u32, eos: Vec<u32>) -> Self {
        PromptTokenizer {
            tokenizer,
            image_token,
            bos,
            eos,
        }
    }

    /// Token ids of text (with the tokenizer's special-token template, e.g. BOS, when asked).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A full prompt (containing `<image>` places) as segments. llava-hf: the whole text is
    /// encoded and each `<image>` token becomes an image place; split setup: LLaVA's
    /// `tokenizer_image_token` (chunks encoded separately, BOS only on the first).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<Segment>> {
        let mut out = Vec::new();
        match self.image_token {
            ImageToken::Id(image_id) => {
                let ids = self.encode(prompt, true)?;
                let mut cur = Vec::new();
                for id in ids {
                    if id == image_id {
                        out.push(Segment::Text(std::mem::take(&mut cur)));
                        out.push(Segment::Image);
                    } else {
                        cur.push(id);
                    }
                }
                out.push(Segment::Text(cur));
            }
            ImageToken::Placeholder => {
                for (i, chunk) in prompt.split(IMAGE_PLACEHOLDER).enumerate() {
                    if i > 0 {
                        out.push(Segment::Image);
                    }
                    let mut ids = self.encode(chunk, true)?;
                    if ids.first() == Some(&self.bos) && i > 0 {
                        ids.remove(0);
                    }
                    if i == 0 && ids.first() != Some(&self.bos) {
                        ids.insert(0, self.bos);
                    }
                    out.push(Segment::Text(ids));
                }
            }
        }
        out.retain(|s| !matches!(s, Segment::Text(t) if t.is_empty()));
        Ok(out)
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
                let enc = self
                    .tokenizer
                    .encode(prompt, true)
                    .map_err(|e| tok_err("encoding", e))?;
                for (&id, &(a, b)) in enc.get_ids().iter().zip(enc.get_offsets()) {
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
                let mut base = 0;
                for (i, chunk) in prompt.split(IMAGE_PLACEHOLDER).enumerate() {
                    if i > 0 {
                        segments.push(Segment::Image);
                        base += IMAGE_PLACEHOLDER.len();
                    }
                    let enc = self
                        .tokenizer
                        .encode(chunk, true)
                        .map_err(|e| tok_err("encoding", e))?;
                    let mut ids: Vec<u32> = enc.get_ids().to_vec();
                    let mut offs: Vec<(usize, usize)> = enc
                        .get_offsets()
                        .iter()
                        .map(|&(a, b)| if b > a { (a + base, b + base) } else { (0, 0) })
                        .collect();
                    if ids.first() == Some(&self.bos) && i > 0 {
                        ids.remove(0);
                        offs.remove(0);
                    }
                    if i == 0 && ids.first() != Some(&self.bos) {
                        ids.insert(0, self.bos);
                        offs.insert(0, (0, 0));
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
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| tok_err("decoding", e))
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
