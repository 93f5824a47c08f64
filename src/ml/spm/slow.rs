//! transformers 4.31.0's slow `LlamaTokenizer` (`use_fast=False`, what LLaVA and CoIN use) over
//! a [`SpmModel`], configured by `tokenizer_config.json` and `special_tokens_map.json`.
//!
//! Encoding, as `PreTrainedTokenizer.tokenize` + `LlamaTokenizer` do:
//! 1. with `legacy: false`, every `▁` in the text becomes a space and one `▁` is put in front;
//! 2. the text is split at the special tokens (`<s>`, `</s>`, `<unk>`, the pad and additional
//!    special tokens), leftmost-longest; a special token given as a plain string in
//!    `special_tokens_map.json` eats the whitespace on both sides, one given as an
//!    `AddedToken` object eats it only where its `lstrip`/`rstrip` say;
//! 3. each piece of text between them is encoded by sentencepiece on its own (so, with
//!    `legacy: true`, text after a special token gets a dummy-prefix `▁`); with
//!    `legacy: false` the leading `▁` of the first piece is dropped again (`is_first`), and for
//!    text after a special token that does not start with a space the first token loses its
//!    `▁` (its text looked up again: often `<unk>` or another piece);
//! 4. `<s>` is put first when `add_bos_token` (default true), `</s>` last when `add_eos_token`.
//!
//! `legacy` absent means true in 4.31 (later versions warn and differ); `null` acts as false.
//! Decoding with `skip_special_tokens=True`: special ids are dropped, the rest decoded by
//! sentencepiece, then `clean_up_tokenization` when the config asks for it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::model::{SpmError, SpmModel, SPACE_MARK};
use crate::ml::{MlError, Result};

/// The SentencePiece model file.
pub const MODEL_FILE: &str = "tokenizer.model";
/// The tokenizer settings.
pub const CONFIG_FILE: &str = "tokenizer_config.json";
/// The special tokens.
pub const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
/// Tokens added after training (not supported).
pub const ADDED_TOKENS_FILE: &str = "added_tokens.json";

const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A special token: never split, matched in the text before sentencepiece runs.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecialToken {
    /// Its text.
    pub content: String,
    /// Its id.
    pub id: u32,
    /// Eats whitespace on its left.
    pub lstrip: bool,
    /// Eats whitespace on its right.
    pub rstrip: bool,
}

/// One token of an encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    /// The id.
    pub id: u32,
    /// The token as the slow tokenizer's `tokenize` returns it.
    pub piece: String,
    /// The byte range of the text it came from (empty for inserted tokens).
    pub range: (usize, usize),
}

/// The slow LLaMA tokenizer of transformers 4.31.0.
pub struct SlowTokenizer {
    model: SpmModel,
    legacy: bool,
    add_bos: bool,
    add_eos: bool,
    clean_up_spaces: bool,
    specials: Vec<SpecialToken>,
    bos: Option<u32>,
    eos: Option<u32>,
}

/// A special-token declaration: its text and, for an `AddedToken` object, its strip flags.
struct Declared {
    content: String,
    flags: Option<(bool, bool)>,
}

fn parse_err(path: &Path, message: impl Into<String>) -> MlError {
    MlError::Parse {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|source| MlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| parse_err(path, e.to_string()))
}

/// A token declaration: a string (`as_added`: what `LlamaTokenizer.__init__` makes of a string
/// from `tokenizer_config.json`, an `AddedToken` without stripping), an object with `content`,
/// or null.
fn declared(v: &Value, as_added: bool, path: &Path, key: &str) -> Result<Option<Declared>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(Declared {
            content: s.clone(),
            flags: as_added.then_some((false, false)),
        })),
        Value::Object(o) => {
            let content = o
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| parse_err(path, format!("`{key}` has no string `content`")))?;
            let flag = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
            Ok(Some(Declared {
                content: content.to_string(),
                flags: Some((flag("lstrip"), flag("rstrip"))),
            }))
        }
        _ => Err(parse_err(
            path,
            format!("`{key}` is neither a string nor an object"),
        )),
    }
}

fn bool_setting(cfg: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match cfg.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        // transformers tests truthiness; null is false.
        Some(Value::Null) => Ok(false),
        Some(_) => Err(parse_err(
            path,
            format!("`{key}` is not true, false or null"),
        )),
    }
}

// Python's `str.isspace` for one character.
use crate::tasks::normalize::is_space as py_space;

impl SlowTokenizer {
    /// Read `tokenizer.model`, `tokenizer_config.json` and `special_tokens_map.json` (the last
    /// two optional) from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let model_path = dir.join(MODEL_FILE);
        let model = read_model(&model_path)?;
        let cfg_path = dir.join(CONFIG_FILE);
        let cfg = read_json_opt(&cfg_path)?.unwrap_or(Value::Object(Default::default()));
        if !cfg.is_object() {
            return Err(parse_err(&cfg_path, "not a JSON object"));
        }
        if let Some(class) = cfg.get("tokenizer_class").and_then(Value::as_str) {
            if !class.starts_with("LlamaTokenizer") {
                return Err(MlError::Unsupported {
                    path: cfg_path,
                    message: format!(
                        "the tokenizer class '{}' (only LlamaTokenizer is read from {MODEL_FILE})",
                        class.escape_debug()
                    ),
                });
            }
        }
        let added_path = dir.join(ADDED_TOKENS_FILE);
        if let Some(added) = read_json_opt(&added_path)? {
            if added.as_object().is_none_or(|o| !o.is_empty()) {
                return Err(MlError::Unsupported {
                    path: added_path,
                    message: "added tokens (tokens beyond tokenizer.model's vocabulary)".into(),
                });
            }
        }
        let map_path = dir.join(SPECIAL_TOKENS_FILE);
        let map = read_json_opt(&map_path)?;
        if map.as_ref().is_some_and(|m| !m.is_object()) {
            return Err(parse_err(&map_path, "not a JSON object"));
        }

        // `from_pretrained`: tokenizer_config.json (with LlamaTokenizer's defaults) goes to
        // `__init__`; then every key of special_tokens_map.json replaces the attribute as is.
        let mut decls: Vec<(&str, Declared)> = Vec::new();
        let mut bos_content = None;
        let mut eos_content = None;
        for key in SPECIAL_KEYS {
            let from_map = map.as_ref().and_then(|m| m.get(key));
            let d = match from_map {
                Some(v) => declared(v, false, &map_path, key)?,
                None => match cfg.get(key) {
                    Some(v) => declared(v, true, &cfg_path, key)?,
                    None => match key {
                        "bos_token" => declared(&Value::from("<s>"), true, &cfg_path, key)?,
                        "eos_token" => declared(&Value::from("</s>"), true, &cfg_path, key)?,
                        "unk_token" => declared(&Value::from("<unk>"), true, &cfg_path, key)?,
                        _ => None,
                    },
                },
            };
            if let Some(d) = d {
                match key {
                    "bos_token" => bos_content = Some(d.content.clone()),
                    "eos_token" => eos_content = Some(d.content.clone()),
                    _ => {}
                }
                decls.push((key, d));
            }
        }
        let extra_key = "additional_special_tokens";
        let (extra, extra_path) = match map.as_ref().and_then(|m| m.get(extra_key)) {
            Some(v) => (Some(v), &map_path),
            None => (cfg.get(extra_key), &cfg_path),
        };
        match extra {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for v in items {
                    if let Some(d) = declared(v, false, extra_path, extra_key)? {
                        decls.push((extra_key, d));
                    }
                }
            }
            Some(_) => {
                return Err(parse_err(
                    extra_path,
                    format!("`{extra_key}` is not a list"),
                ))
            }
        }

        let unk_content = model.id_to_piece(model.unk_id()).unwrap_or("").to_string();
        let mut specials: Vec<SpecialToken> = Vec::new();
        for (key, d) in &decls {
            if d.content.is_empty()
                || d.content.starts_with(py_space)
                || d.content.ends_with(py_space)
            {
                return Err(MlError::Unsupported {
                    path: cfg_path.clone(),
                    message: format!(
                        "the special token `{key}` '{}' (empty, or with whitespace at an end)",
                        d.content.escape_debug()
                    ),
                });
            }
            let id = model.piece_to_id(&d.content);
            if id == model.unk_id() && d.content != unk_content {
                return Err(MlError::Unsupported {
                    path: cfg_path.clone(),
                    message: format!(
                        "the special token `{key}` '{}', which is not in {MODEL_FILE} \
                         (transformers would add it as a new token)",
                        d.content.escape_debug()
                    ),
                });
            }
            // The strip flags of a content come from its last `AddedToken` declaration; a
            // content declared only as plain strings strips both sides.
            let flags = decls
                .iter()
                .rev()
                .filter(|(_, o)| o.content == d.content)
                .find_map(|(_, o)| o.flags)
                .unwrap_or((true, true));
            if !specials.iter().any(|s| s.content == d.content) {
                specials.push(SpecialToken {
                    content: d.content.clone(),
                    id,
                    lstrip: flags.0,
                    rstrip: flags.1,
                });
            }
        }
        let id_of = |c: &Option<String>| c.as_ref().map(|c| model.piece_to_id(c));
        let tok = SlowTokenizer {
            legacy: bool_setting(&cfg, "legacy", true, &cfg_path)?,
            add_bos: bool_setting(&cfg, "add_bos_token", true, &cfg_path)?,
            add_eos: bool_setting(&cfg, "add_eos_token", false, &cfg_path)?,
            clean_up_spaces: bool_setting(&cfg, "clean_up_tokenization_spaces", false, &cfg_path)?,
            bos: id_of(&bos_content),
            eos: id_of(&eos_content),
            specials,
            model,
        };
        if (tok.add_bos && tok.bos.is_none()) || (tok.add_eos && tok.eos.is_none()) {
            return Err(parse_err(
                &cfg_path,
                "add_bos_token/add_eos_token is set but the token is null",
            ));
        }
        Ok(tok)
    }

    /// The SentencePiece model.
    pub fn model(&self) -> &SpmModel {
        &self.model
    }

    /// Whether the legacy handling of text after special tokens is on.
    pub fn legacy(&self) -> bool {
        self.legacy
    }

    /// `<s>`'s id, if declared.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// `</s>`'s id, if declared.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The special tokens.
    pub fn specials(&self) -> &[SpecialToken] {
        &self.specials
    }

    /// `tokenize(text)` with ids and byte ranges in `text`.
    pub fn tokenize(&self, text: &str) -> Vec<Token> {
        // The text the splitter sees, and for each of its bytes (and the end) the offset in
        // `text` it came from.
        let (work, map): (std::borrow::Cow<'_, str>, Option<Vec<usize>>) = if self.legacy {
            (text.into(), None)
        } else {
            let mut w = String::with_capacity(text.len() + 3);
            let mut m = Vec::with_capacity(text.len() + 4);
            w.push(SPACE_MARK);
            m.extend([0; 3]);
            for (i, c) in text.char_indices() {
                if c == SPACE_MARK {
                    w.push(' ');
                    m.push(i);
                } else {
                    w.push(c);
                    m.extend(std::iter::repeat_n(i, c.len_utf8()));
                }
            }
            m.push(text.len());
            (w.into(), Some(m))
        };
        let to_orig = |r: (usize, usize)| match &map {
            Some(m) if r.0 == r.1 => (m[r.0], m[r.0]),
            Some(m) => (m[r.0], m[r.1]),
            None => r,
        };

        // Split at special tokens: (start, end, special index).
        let mut parts: Vec<(usize, usize, Option<usize>)> = Vec::new();
        let mut text_start = 0;
        let mut i = 0;
        while i < work.len() {
            let rest = &work[i..];
            let hit = self
                .specials
                .iter()
                .enumerate()
                .filter(|(_, s)| rest.starts_with(s.content.as_str()))
                .max_by_key(|(_, s)| s.content.len());
            if let Some((k, s)) = hit {
                if text_start < i {
                    parts.push((text_start, i, None));
                }
                parts.push((i, i + s.content.len(), Some(k)));
                i += s.content.len();
                text_start = i;
            } else {
                i += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
        if text_start < work.len() {
            parts.push((text_start, work.len(), None));
        }
        // Whitespace stripping around special tokens.
        for k in 0..parts.len() {
            let Some(si) = parts[k].2 else { continue };
            let sp = &self.specials[si];
            if sp.rstrip && k + 1 < parts.len() && parts[k + 1].2.is_none() {
                let (s, e, _) = parts[k + 1];
                let trimmed = work[s..e].trim_start_matches(py_space);
                parts[k + 1].0 = e - trimmed.len();
            }
            if sp.lstrip && k > 0 && parts[k - 1].2.is_none() {
                let (s, e, _) = parts[k - 1];
                let trimmed = work[s..e].trim_end_matches(py_space);
                parts[k - 1].1 = s + trimmed.len();
            }
        }
        let mut out = Vec::new();
        for (s, e, special) in parts {
            if s == e {
                continue;
            }
            if let Some(si) = special {
                let sp = &self.specials[si];
                out.push(Token {
                    id: sp.id,
                    piece: sp.content.clone(),
                    range: to_orig((s, e)),
                });
                continue;
            }
            let mut start = s;
            let is_first = !self.legacy && work[s..e].starts_with(SPACE_MARK);
            if is_first {
                start += SPACE_MARK.len_utf8();
            }
            let chunk = &work[start..e];
            let mut pieces: Vec<Token> = self
                .model
                .encode(chunk)
                .into_iter()
                .map(|p| Token {
                    id: p.id,
                    piece: p.piece,
                    range: to_orig((p.range.0 + start, p.range.1 + start)),
                })
                .collect();
            if !self.legacy && !is_first && !chunk.starts_with(' ') {
                if let Some(first) = pieces.first_mut() {
                    if let Some(rest) = first.piece.strip_prefix(SPACE_MARK) {
                        if rest.is_empty() {
                            pieces.remove(0);
                        } else {
                            first.id = self.model.piece_to_id(rest);
                            first.piece = rest.to_string();
                        }
                    }
                }
            }
            out.extend(pieces);
        }
        out
    }

    /// `tokenizer(text).input_ids` (with `<s>`/`</s>` as the config says when `special`) and the
    /// byte range of each token.
    pub fn encode_with_ranges(&self, text: &str, special: bool) -> (Vec<u32>, Vec<(usize, usize)>) {
        let toks = self.tokenize(text);
        let mut ids = Vec::with_capacity(toks.len() + 2);
        let mut ranges = Vec::with_capacity(toks.len() + 2);
        if special && self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
                ranges.push((0, 0));
            }
        }
        for t in toks {
            ids.push(t.id);
            ranges.push(t.range);
        }
        if special && self.add_eos {
            if let Some(e) = self.eos {
                ids.push(e);
                ranges.push((text.len(), text.len()));
            }
        }
        (ids, ranges)
    }

    /// `tokenizer(text).input_ids`.
    pub fn encode(&self, text: &str, special: bool) -> Vec<u32> {
        self.encode_with_ranges(text, special).0
    }

    /// `decode(ids, skip_special_tokens=True)`. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !self.specials.iter().any(|s| s.id == *id))
            .collect();
        let text = self.model.decode(&kept).map_err(|id| MlError::Tokenizer {
            context: "decoding".into(),
            message: format!(
                "the id {id} is outside the vocabulary of {} pieces",
                self.model.len()
            ),
        })?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }
}

/// transformers' `clean_up_tokenization`.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// Read and check `tokenizer.model`.
pub fn read_model(path: &Path) -> Result<SpmModel> {
    let corrupt = |source: SpmError| MlError::SentencePiece {
        path: PathBuf::from(path),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|source| MlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.len() > super::model::MAX_MODEL_BYTES {
        return Err(corrupt(SpmError::TooLarge {
            max: super::model::MAX_MODEL_BYTES,
        }));
    }
    let bytes = std::fs::read(path).map_err(|source| MlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    SpmModel::from_bytes(&bytes).map_err(corrupt)
}
