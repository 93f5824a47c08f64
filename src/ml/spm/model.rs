//! A SentencePiece BPE model read from `tokenizer.model`: its vocabulary, the encoder
//! (normalize, then merge adjacent symbols by piece score as sentencepiece's `bpe_model.cc`
//! does, then byte fallback) and the decoder (`▁` → space, byte pieces → UTF-8).
//!
//! Supported: model type BPE, an identity normalizer (no precompiled character map) with
//! `add_dummy_prefix` and `escape_whitespaces` either way, `remove_extra_whitespaces` off,
//! user-defined, unused, control and byte pieces. Anything else is refused when the model is
//! read, so that no text is ever encoded to ids sentencepiece would not give.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use prost::Message;

use super::proto::ModelProto;

/// The whitespace mark (U+2581).
pub const SPACE_MARK: char = '▁';
const SPACE_MARK_STR: &str = "▁";
/// What `<unk>` decodes to unless the model says otherwise.
const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";
/// The largest `tokenizer.model` read (LLaMA's is 500 KB).
pub const MAX_MODEL_BYTES: u64 = 64 << 20;
/// The most pieces a model may have.
pub const MAX_PIECES: usize = 1 << 21;

/// Why a `tokenizer.model` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpmError {
    /// The file is implausibly large.
    #[error("the file is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// The protobuf does not decode.
    #[error("it is not a SentencePiece model protobuf")]
    Decode(#[source] prost::DecodeError),
    /// The model breaks a rule sentencepiece itself enforces.
    #[error("{0}")]
    Invalid(String),
    /// The model uses a feature coin does not implement.
    #[error(
        "{0} is not supported (coin reads BPE models with an identity normalizer, as LLaMA's)"
    )]
    Unsupported(String),
}

/// The type of a vocabulary entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceKind {
    /// An ordinary piece.
    Normal,
    /// `<unk>`.
    Unknown,
    /// `<s>`, `</s>`: never produced by encoding, decoded to nothing.
    Control,
    /// Matched whole before merging.
    UserDefined,
    /// In the vocabulary but split back into the pieces it was merged from.
    Unused,
    /// `<0xNN>`, for byte fallback.
    Byte,
}

struct Entry {
    text: String,
    score: f32,
    kind: PieceKind,
}

/// One piece of an encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedPiece {
    /// The piece id.
    pub id: u32,
    /// The piece text as sentencepiece reports it (for `<unk>`: the unknown text itself).
    pub piece: String,
    /// The byte range of the input it came from (empty for the dummy prefix).
    pub range: (usize, usize),
}

/// A loaded SentencePiece BPE model.
pub struct SpmModel {
    entries: Vec<Entry>,
    /// NORMAL, USER_DEFINED and UNUSED pieces (sentencepiece's `pieces_`).
    normal: HashMap<String, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces (sentencepiece's `reserved_id_map_`).
    reserved: HashMap<String, u32>,
    user_defined: Vec<String>,
    unk: u32,
    bytes: Option<Vec<u32>>,
    add_dummy_prefix: bool,
    escape_whitespaces: bool,
    unk_surface: String,
}

fn byte_piece(b: u8) -> String {
    format!("<0x{b:02X}>")
}

fn parse_byte_piece(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2
        || !hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
    {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A merge candidate: the highest score first, then the leftmost.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A symbol during merging: a byte range of the normalized text, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    frozen: bool,
}

impl SpmModel {
    /// Parse and check a serialized `ModelProto`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SpmError> {
        if bytes.len() as u64 > MAX_MODEL_BYTES {
            return Err(SpmError::TooLarge {
                max: MAX_MODEL_BYTES,
            });
        }
        let proto = ModelProto::decode(bytes).map_err(SpmError::Decode)?;
        let trainer = proto.trainer_spec.unwrap_or_default();
        match trainer.model_type.unwrap_or(1) {
            2 => {}
            1 => return Err(SpmError::Unsupported("the unigram model type".into())),
            3 => return Err(SpmError::Unsupported("the word model type".into())),
            4 => return Err(SpmError::Unsupported("the char model type".into())),
            t => return Err(SpmError::Invalid(format!("unknown model type {t}"))),
        }
        if trainer.treat_whitespace_as_suffix.unwrap_or(false) {
            return Err(SpmError::Unsupported("treat_whitespace_as_suffix".into()));
        }
        let norm = proto.normalizer_spec.unwrap_or_default();
        if norm
            .precompiled_charsmap
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            return Err(SpmError::Unsupported(format!(
                "the normalizer '{}' (a precompiled character map)",
                norm.name.as_deref().unwrap_or("").escape_debug()
            )));
        }
        if norm.remove_extra_whitespaces.unwrap_or(true) {
            return Err(SpmError::Unsupported(
                "a normalizer with remove_extra_whitespaces".into(),
            ));
        }
        if let Some(d) = &proto.denormalizer_spec {
            if d.precompiled_charsmap
                .as_ref()
                .is_some_and(|m| !m.is_empty())
            {
                return Err(SpmError::Unsupported("a denormalizer".into()));
            }
        }
        let byte_fallback = trainer.byte_fallback.unwrap_or(false);
        if proto.pieces.is_empty() || proto.pieces.len() > MAX_PIECES {
            return Err(SpmError::Invalid(format!(
                "it has {} pieces (1 to {MAX_PIECES} expected)",
                proto.pieces.len()
            )));
        }
        let mut entries = Vec::with_capacity(proto.pieces.len());
        let mut normal = HashMap::new();
        let mut reserved = HashMap::new();
        let mut user_defined = Vec::new();
        let mut unk = None;
        let mut bytes_ids = vec![u32::MAX; 256];
        let mut any_byte = false;
        for (i, p) in proto.pieces.into_iter().enumerate() {
            let id = i as u32;
            let text = p.piece.unwrap_or_default();
            if text.is_empty() {
                return Err(SpmError::Invalid(format!("piece {i} is empty")));
            }
            let kind = match p.r#type.unwrap_or(1) {
                1 => PieceKind::Normal,
                2 => PieceKind::Unknown,
                3 => PieceKind::Control,
                4 => PieceKind::UserDefined,
                5 => PieceKind::Unused,
                6 => PieceKind::Byte,
                t => return Err(SpmError::Invalid(format!("piece {i} has unknown type {t}"))),
            };
            let score = p.score.unwrap_or(0.0);
            if score.is_nan() {
                return Err(SpmError::Invalid(format!("piece {i} has a NaN score")));
            }
            let map = match kind {
                PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused => &mut normal,
                _ => &mut reserved,
            };
            if map.insert(text.clone(), id).is_some() {
                return Err(SpmError::Invalid(format!(
                    "the piece '{}' (id {i}) is defined twice",
                    text.escape_debug()
                )));
            }
            match kind {
                PieceKind::Unknown => {
                    let previous = unk.replace(id);
                    if previous.is_some() {
                        return Err(SpmError::Invalid("it has two <unk> pieces".into()));
                    }
                }
                PieceKind::UserDefined => user_defined.push(text.clone()),
                PieceKind::Byte => {
                    if !byte_fallback {
                        return Err(SpmError::Invalid(format!(
                            "piece {i} is a byte piece but byte_fallback is off"
                        )));
                    }
                    let b = parse_byte_piece(&text).ok_or_else(|| {
                        SpmError::Invalid(format!(
                            "the byte piece {i} '{}' is not of the form <0xNN>",
                            text.escape_debug()
                        ))
                    })?;
                    bytes_ids[usize::from(b)] = id;
                    any_byte = true;
                }
                _ => {}
            }
            entries.push(Entry { text, score, kind });
        }
        let unk = unk.ok_or_else(|| SpmError::Invalid("it has no <unk> piece".into()))?;
        let bytes = if byte_fallback {
            if let Some(b) = bytes_ids.iter().position(|&id| id == u32::MAX) {
                return Err(SpmError::Invalid(format!(
                    "byte_fallback is on but the byte piece {} is missing{}",
                    byte_piece(b as u8),
                    if any_byte { "" } else { " (and every other)" }
                )));
            }
            Some(bytes_ids)
        } else {
            None
        };
        // Longest user-defined symbols first, so the first match is the longest.
        user_defined.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Ok(SpmModel {
            entries,
            normal,
            reserved,
            user_defined,
            unk,
            bytes,
            add_dummy_prefix: norm.add_dummy_prefix.unwrap_or(true),
            escape_whitespaces: norm.escape_whitespaces.unwrap_or(true),
            unk_surface: trainer
                .unk_surface
                .unwrap_or_else(|| DEFAULT_UNK_SURFACE.to_string()),
        })
    }

    /// The number of pieces (the vocabulary size).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the vocabulary is empty (never: a model has at least `<unk>`).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The id of `<unk>`.
    pub fn unk_id(&self) -> u32 {
        self.unk
    }

    /// The id of a piece, `<unk>`'s when it is not in the vocabulary (sentencepiece's
    /// `PieceToId`).
    pub fn piece_to_id(&self, piece: &str) -> u32 {
        self.normal
            .get(piece)
            .or_else(|| self.reserved.get(piece))
            .copied()
            .unwrap_or(self.unk)
    }

    /// The text of a piece, if the id is in range.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.entries.get(id as usize).map(|e| e.text.as_str())
    }

    /// The kind of a piece, if the id is in range.
    pub fn kind(&self, id: u32) -> Option<PieceKind> {
        self.entries.get(id as usize).map(|e| e.kind)
    }

    /// Normalize: the dummy prefix, spaces escaped. Returns the normalized text and, for each
    /// of its bytes and one past the end, the byte offset in `text` it came from.
    fn normalize(&self, text: &str) -> (String, Vec<usize>) {
        let mut norm = String::with_capacity(text.len() + 3);
        let mut orig = Vec::with_capacity(text.len() + 4);
        if text.is_empty() {
            orig.push(0);
            return (norm, orig);
        }
        if self.add_dummy_prefix {
            norm.push(SPACE_MARK);
            orig.extend([0; SPACE_MARK_STR.len()]);
        }
        for (i, c) in text.char_indices() {
            if c == ' ' && self.escape_whitespaces {
                norm.push(SPACE_MARK);
                orig.extend([i; SPACE_MARK_STR.len()]);
            } else {
                norm.push(c);
                orig.extend(std::iter::repeat_n(i, c.len_utf8()));
            }
        }
        orig.push(text.len());
        (norm, orig)
    }

    /// The length of the user-defined symbol or character that starts `s` (non-empty).
    fn symbol_len(&self, s: &str) -> (usize, bool) {
        for u in &self.user_defined {
            if s.starts_with(u.as_str()) {
                return (u.len(), true);
            }
        }
        (s.chars().next().map_or(1, char::len_utf8), false)
    }

    /// Encode text to pieces, as sentencepiece's `Encode` (no sampling).
    pub fn encode(&self, text: &str) -> Vec<EncodedPiece> {
        let (norm, orig) = self.normalize(text);
        if norm.is_empty() {
            return Vec::new();
        }
        let mut syms: Vec<Symbol> = Vec::new();
        let mut pos = 0;
        while pos < norm.len() {
            let (len, frozen) = self.symbol_len(&norm[pos..]);
            let i = syms.len();
            syms.push(Symbol {
                start: pos,
                end: pos + len,
                prev: i.checked_sub(1),
                next: (pos + len < norm.len()).then_some(i + 1),
                frozen,
            });
            pos += len;
        }
        let mut agenda = BinaryHeap::new();
        let mut rev_merge: HashMap<String, usize> = HashMap::new();
        let add_pair = |syms: &[Symbol],
                        agenda: &mut BinaryHeap<Candidate>,
                        rev: &mut HashMap<String, usize>,
                        left: Option<usize>,
                        right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            if syms[l].frozen || syms[r].frozen {
                return;
            }
            let piece = &norm[syms[l].start..syms[r].end];
            let Some(&id) = self.normal.get(piece) else {
                return;
            };
            let e = &self.entries[id as usize];
            agenda.push(Candidate {
                score: e.score,
                left: l,
                right: r,
                size: piece.len(),
            });
            if e.kind == PieceKind::Unused {
                rev.insert(piece.to_string(), syms[l].end - syms[l].start);
            }
        };
        for i in 1..syms.len() {
            add_pair(&syms, &mut agenda, &mut rev_merge, Some(i - 1), Some(i));
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (top.left, top.right);
            let (ls, rs) = (syms[l], syms[r]);
            if ls.start == ls.end
                || rs.start == rs.end
                || (ls.end - ls.start) + (rs.end - rs.start) != top.size
            {
                continue;
            }
            syms[l].end = rs.end;
            syms[l].next = rs.next;
            if let Some(n) = rs.next {
                syms[n].prev = Some(l);
            }
            syms[r].end = syms[r].start;
            add_pair(&syms, &mut agenda, &mut rev_merge, syms[l].prev, Some(l));
            add_pair(&syms, &mut agenda, &mut rev_merge, Some(l), syms[l].next);
        }
        let mut raw: Vec<(u32, usize, usize)> = Vec::new();
        let mut cur = Some(0);
        while let Some(i) = cur {
            self.resegment(&norm, syms[i].start, syms[i].end, &rev_merge, &mut raw);
            cur = syms[i].next;
        }
        let mut out: Vec<EncodedPiece> = Vec::with_capacity(raw.len());
        let mut prev_unk = false;
        for (id, s, e) in raw {
            let w = &norm[s..e];
            let range = (orig[s], orig[e]);
            let is_unk = self.entries[id as usize].kind == PieceKind::Unknown;
            match (&self.bytes, is_unk) {
                (Some(bytes), true) => {
                    for b in w.bytes() {
                        out.push(EncodedPiece {
                            id: bytes[usize::from(b)],
                            piece: byte_piece(b),
                            range,
                        });
                    }
                }
                (None, true) if prev_unk => {
                    if let Some(last) = out.last_mut() {
                        last.piece.push_str(w);
                        last.range.1 = range.1;
                    }
                }
                _ => out.push(EncodedPiece {
                    id,
                    piece: if is_unk {
                        w.to_string()
                    } else {
                        self.entries[id as usize].text.clone()
                    },
                    range,
                }),
            }
            prev_unk = is_unk;
        }
        out
    }

    fn resegment(
        &self,
        norm: &str,
        start: usize,
        end: usize,
        rev_merge: &HashMap<String, usize>,
        out: &mut Vec<(u32, usize, usize)>,
    ) {
        let w = &norm[start..end];
        let id = self.piece_to_id(w);
        if self.entries[id as usize].kind == PieceKind::Unused {
            if let Some(&left_len) = rev_merge.get(w) {
                self.resegment(norm, start, start + left_len, rev_merge, out);
                self.resegment(norm, start + left_len, end, rev_merge, out);
                return;
            }
        }
        out.push((id, start, end));
    }

    /// Decode ids as sentencepiece's `DecodeIds`: control pieces vanish, `<unk>` becomes the
    /// unknown surface, runs of byte pieces become UTF-8 (U+FFFD for each byte that is not
    /// part of a valid character), `▁` becomes a space, and the first `▁` of the text (the
    /// dummy prefix) is dropped. An id out of range is returned as the error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, u32> {
        let mut text = String::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        for &id in ids {
            let e = self.entries.get(id as usize).ok_or(id)?;
            if e.kind == PieceKind::Byte {
                pending.push(parse_byte_piece(&e.text).unwrap_or(0));
                continue;
            }
            flush_bytes(&mut pending, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = false;
            match e.kind {
                PieceKind::Control => {}
                PieceKind::Unknown => text.push_str(&self.unk_surface),
                _ => {
                    let mut piece = e.text.as_str();
                    if is_bos_ws && self.add_dummy_prefix {
                        if let Some(rest) = piece.strip_prefix(SPACE_MARK) {
                            piece = rest;
                            bos_ws_seen = true;
                        }
                    }
                    text.push_str(&piece.replace(SPACE_MARK, " "));
                }
            }
        }
        flush_bytes(&mut pending, &mut text);
        Ok(text)
    }
}

/// Append a run of byte pieces as UTF-8: each valid character as itself, each byte that does
/// not start one as U+FFFD.
fn flush_bytes(pending: &mut Vec<u8>, text: &mut String) {
    let mut rest = pending.as_slice();
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                break;
            }
            Err(e) => {
                let good = e.valid_up_to();
                // `good` bytes are valid UTF-8 by the error's contract.
                text.push_str(std::str::from_utf8(&rest[..good]).unwrap_or_default());
                text.push(char::REPLACEMENT_CHARACTER);
                rest = &rest[good + 1..];
            }
        }
    }
    pending.clear();
}
