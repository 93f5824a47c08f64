//! Readers for CoIN's data files.
//!
//! - `train.json`: a JSON list of LLaVA conversation records ([`TrainRecord`]).
//! - `test.json` / `val.json`: a JSON list of [`TestRecord`] (`question_id`, `image`, `text` whose
//!   last line is the instruction, `answer`; Grounding has `answer_bbox` and `size`).
//! - answer files: JSONL, one [`AnswerRecord`] per line, as written by CoIN's `model_*.py`.
//!
//! JSON lists are read element by element (a 400 MB `train.json` never sits in memory as one
//! `Value`), and a broken element is reported with its file and index.
//!
//! These files come from outside, so every reader is bounded: one JSONL line or one element of
//! a JSON list holds at most [`MAX_RECORD_BYTES`], a file at most [`MAX_RECORDS`] records, and
//! the free-form fields of an answer line at most [`MAX_FIELD_VALUES`] JSON values. Records are
//! parsed into typed structs (no `serde_json::Value` tree for the fields coin reads), and text
//! from a file that reaches an error message is shown through [`Escaped`] (`TaskError`'s
//! messages do it).

use std::cell::Cell;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::TaskError;

/// The longest JSONL line (answer files, judge replies, judge progress) and the largest element
/// of a JSON list (`train.json`, `test.json`; counted with the `,` before it) coin reads: 4 MiB.
/// A CoIN answer line or test record is well under 10 KiB; a longer one is a broken or hostile
/// file, refused before it is held in memory (a list element once it needs more than 4 MiB;
/// the list reader's 64 KiB buffer may read that much further first).
pub const MAX_RECORD_BYTES: usize = 4 << 20;

/// The most records coin reads from one file: 10 million (CoIN's largest instruction file has
/// well under one million).
pub const MAX_RECORDS: usize = 10_000_000;

/// The most JSON values kept in one free-form field of an answer line (`answer_id`, `model_id`,
/// `metadata`; CoIN writes a string, a string and `{}`).
pub const MAX_FIELD_VALUES: usize = 4096;

/// The bounds of a reader (the constants above; tests shrink them).
#[derive(Clone, Copy, Debug)]
struct Limits {
    record_bytes: usize,
    records: usize,
    /// The read buffer in front of a JSON list's meter: an element is refused once it needs
    /// more than `record_bytes`, and at most `read_ahead` bytes past that are ever read.
    read_ahead: usize,
}

const LIMITS: Limits = Limits {
    record_bytes: MAX_RECORD_BYTES,
    records: MAX_RECORDS,
    read_ahead: 64 << 10,
};

/// The longest parser message kept in an error (characters); the rest is cut off.
const MAX_MESSAGE_CHARS: usize = 300;

/// Text from a data file shown in a message: every character that `str::escape_debug` would
/// escape is escaped (control characters, line breaks, backslashes, invisible and combining
/// characters) except quotes, so a hostile file cannot write to the terminal through an error.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            if matches!(c, '"' | '\'') {
                f.write_char(c)?;
            } else {
                write!(f, "{}", c.escape_debug())?;
            }
        }
        Ok(())
    }
}

/// A byte count for a message: whole MiB when it is one, else bytes.
pub(crate) fn size_text(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// A parser's message, cut to [`MAX_MESSAGE_CHARS`] (serde quotes the offending value, which
/// may be megabytes long).
fn brief(message: impl fmt::Display) -> String {
    let m = message.to_string();
    match m.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &m[..i]),
        None => m,
    }
}

/// A question id as written in a CoIN file: a string or a number. Compared, hashed and
/// ordered by its text, so `5` and `"5"` are the same question; the JSON type is kept
/// ([`Qid::kind`]) for the compat scorers, which look ids up the way CoIN's Python does
/// ([`Qid::py_key`], [`Qid::py_str`]). It is written back as it was read: a string as a
/// string, a number as a number, as CoIN's `model_*.py` copy the test record's id into the
/// answer line (so CoIN's scorers, which look ids up unconverted, accept coin's answer files).
#[derive(Clone, Debug)]
pub struct Qid(pub String, IdKind);

/// How a question id was written in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// A JSON string (and every id coin makes itself).
    #[default]
    Text,
    /// A JSON integer.
    Int,
    /// A JSON number with a fraction or an exponent (`5.0`, `1e3`): a Python float.
    Float,
}

impl IdKind {
    /// "a string" or "a number", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            IdKind::Text => "a string",
            IdKind::Int | IdKind::Float => "a number",
        }
    }
}

/// A question id as a Python dict key: strings equal strings, numbers equal numbers by value
/// (`5 == 5.0`), and a string never equals a number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PyKey {
    /// A string id.
    Str(String),
    /// An integer, or a float with an integral value in range (Python's `5 == 5.0`).
    Int(i128),
    /// Any other float, by its bits.
    Float(u64),
}

impl Qid {
    /// An id written as a string.
    pub fn text(s: impl Into<String>) -> Self {
        Qid(s.into(), IdKind::Text)
    }

    /// How the id was written in JSON.
    pub fn kind(&self) -> IdKind {
        self.1
    }

    /// The id as a key of a Python dict built from the parsed JSON (`{q['question_id']: q}`),
    /// as CoIN's scorers that look ids up without converting them use it.
    pub fn py_key(&self) -> PyKey {
        let float = |v: f64| {
            if v.fract() == 0.0 && v.abs() < 1e38 {
                // Integral and in range: exact as i128 (-0.0 is 0, as in Python).
                #[allow(clippy::cast_possible_truncation)]
                PyKey::Int(v as i128)
            } else {
                PyKey::Float(v.to_bits())
            }
        };
        match self.1 {
            IdKind::Text => PyKey::Str(self.0.clone()),
            IdKind::Int => self
                .0
                .parse::<i128>()
                .map_or_else(|_| PyKey::Str(self.0.clone()), PyKey::Int),
            IdKind::Float => self
                .0
                .parse::<f64>()
                .map_or_else(|_| PyKey::Str(self.0.clone()), float),
        }
    }

    /// Python's `str()` of the id (`5` → "5", `5.0` → "5.0", `1e16` → "1e+16"), as CoIN's
    /// scorers that key by `str(question_id)` see it.
    pub fn py_str(&self) -> String {
        match self.1 {
            IdKind::Text | IdKind::Int => self.0.clone(),
            IdKind::Float => self
                .0
                .parse::<f64>()
                .map_or_else(|_| self.0.clone(), py_float_repr),
        }
    }
}

impl From<String> for Qid {
    fn from(s: String) -> Self {
        Qid::text(s)
    }
}

impl From<&str> for Qid {
    fn from(s: &str) -> Self {
        Qid::text(s)
    }
}

impl PartialEq for Qid {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Qid {}

impl std::hash::Hash for Qid {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialOrd for Qid {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Qid {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl fmt::Display for Qid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Python's `repr()` of a finite float: the shortest digits that read back to the same value,
/// positional when the decimal exponent is in -4..16 (with ".0" when integral), else
/// `d.ddde±XX`.
pub fn py_float_repr(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "-1.25e-7", "5e0".
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let n = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    if (-4..16).contains(&exp) {
        if exp < 0 {
            let zeros = "0".repeat(usize::try_from(-exp - 1).unwrap_or(0));
            format!("{sign}0.{zeros}{digits}")
        } else if exp + 1 >= n {
            let zeros = "0".repeat(usize::try_from(exp + 1 - n).unwrap_or(0));
            format!("{sign}{digits}{zeros}.0")
        } else {
            let point = usize::try_from(exp + 1).unwrap_or(0);
            format!("{sign}{}.{}", &digits[..point], &digits[point..])
        }
    } else {
        let rest = if digits.len() > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{}{rest}e{esign}{:02}", &digits[..1], exp.abs())
    }
}

/// serde_json's text of a float (`5.0`, `1e20`), so a number reads as it did through `Value`.
fn float_text(v: f64) -> String {
    serde_json::Number::from_f64(v).map_or_else(|| v.to_string(), |n| n.to_string())
}

impl Serialize for Qid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The text of a number id is what serde_json read (an i64/u64 or a float's text), so
        // it parses back; should it not, the id is written as a string rather than lost.
        match self.1 {
            IdKind::Text => s.serialize_str(&self.0),
            IdKind::Int => match (self.0.parse::<u64>(), self.0.parse::<i64>()) {
                (Ok(v), _) => s.serialize_u64(v),
                (_, Ok(v)) => s.serialize_i64(v),
                _ => s.serialize_str(&self.0),
            },
            IdKind::Float => match self.0.parse::<f64>() {
                Ok(v) if v.is_finite() => s.serialize_f64(v),
                _ => s.serialize_str(&self.0),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Qid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Qid;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a question id (a string or a number)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Qid, E> {
                Ok(Qid(v.to_string(), IdKind::Text))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Qid, E> {
                Ok(Qid(v, IdKind::Text))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Qid, E> {
                Ok(Qid(v.to_string(), IdKind::Int))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Qid, E> {
                Ok(Qid(v.to_string(), IdKind::Int))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Qid, E> {
                Ok(Qid(float_text(v), IdKind::Float))
            }
        }
        d.deserialize_any(V)
    }
}

/// The first id written as a string and the first written as a number, when `ids` has both
/// (an answer file whose ids CoIN's scorers would see as different types).
pub fn mixed_id_kinds<'a>(ids: impl IntoIterator<Item = &'a Qid>) -> Option<(&'a Qid, &'a Qid)> {
    let mut text = None;
    let mut number = None;
    for id in ids {
        match id.kind() {
            IdKind::Text => text = text.or(Some(id)),
            IdKind::Int | IdKind::Float => number = number.or(Some(id)),
        }
        if let (Some(t), Some(n)) = (text, number) {
            return Some((t, n));
        }
    }
    None
}

/// A value that CoIN writes as a string but that sometimes is a number (answers like `2`) or a
/// boolean; `null` is no value. Read without building a `Value`, so a list or an object here is
/// refused before its elements are parsed.
fn de_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string, a number or a boolean")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(float_text(v)))
        }
    }
    d.deserialize_any(V)
}

/// A free-form JSON field of an answer line, kept as a `Value` of at most [`MAX_FIELD_VALUES`]
/// values (a larger one is refused while it is parsed, before it is built).
fn de_small_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
    let mut left = MAX_FIELD_VALUES;
    SmallValue { left: &mut left }.deserialize(d)
}

struct SmallValue<'a> {
    left: &'a mut usize,
}

impl SmallValue<'_> {
    fn take<E: serde::de::Error>(&mut self) -> Result<(), E> {
        match self.left.checked_sub(1) {
            Some(l) => {
                *self.left = l;
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "a free-form field (answer_id, model_id, metadata) holds more than {MAX_FIELD_VALUES} JSON values"
            ))),
        }
    }
}

impl<'de> DeserializeSeed<'de> for SmallValue<'_> {
    type Value = serde_json::Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SmallValue<'_> {
    type Value = serde_json::Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: serde::de::Error>(mut self) -> Result<Self::Value, E> {
        self.take()?;
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E: serde::de::Error>(mut self, v: bool) -> Result<Self::Value, E> {
        self.take()?;
        Ok(v.into())
    }
    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> Result<Self::Value, E> {
        self.take()?;
        Ok(v.into())
    }
    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> Result<Self::Value, E> {
        self.take()?;
        Ok(v.into())
    }
    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> Result<Self::Value, E> {
        self.take()?;
        Ok(v.into())
    }
    fn visit_str<E: serde::de::Error>(mut self, v: &str) -> Result<Self::Value, E> {
        self.take()?;
        Ok(v.into())
    }
    fn visit_string<E: serde::de::Error>(mut self, v: String) -> Result<Self::Value, E> {
        self.take()?;
        Ok(v.into())
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.take()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(SmallValue {
            left: &mut *self.left,
        })? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        self.take()?;
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            self.take()?;
            let v = map.next_value_seed(SmallValue {
                left: &mut *self.left,
            })?;
            out.insert(k, v);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// One turn of a LLaVA conversation.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct Turn {
    /// `human` or `gpt`.
    pub from: String,
    /// The text; the first human turn starts with `<image>\n` when the record has an image.
    pub value: String,
}

/// One record of a CoIN `train.json`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct TrainRecord {
    /// The sample id (string or number in the wild; kept as text).
    pub id: Qid,
    /// The image path relative to the image root; absent for text-only samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Alternating human/gpt turns.
    pub conversations: Vec<Turn>,
}

impl TrainRecord {
    /// Check the conversation shape: non-empty, alternating human/gpt starting with human.
    pub fn validate(&self) -> Result<(), String> {
        if self.conversations.is_empty() {
            return Err("the conversation is empty".into());
        }
        for (i, t) in self.conversations.iter().enumerate() {
            let want = if i % 2 == 0 { "human" } else { "gpt" };
            if t.from != want {
                return Err(format!("turn {i} is from '{}', expected '{want}'", t.from));
            }
        }
        if !self.conversations.len().is_multiple_of(2) {
            return Err("the last turn is not an answer from 'gpt'".into());
        }
        Ok(())
    }
}

/// One record of a CoIN `test.json` / `val.json`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct TestRecord {
    /// The question id (ScienceQA: the problem id).
    pub question_id: Qid,
    /// The image path relative to the image root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The question; its last line is the instruction.
    pub text: String,
    /// The ground-truth answer (all tasks but Grounding).
    #[serde(
        default,
        deserialize_with = "de_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub answer: Option<String>,
    /// Grounding: `"[x1, y1, x2, y2]"` normalised to the padded square image.
    #[serde(
        default,
        deserialize_with = "de_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub answer_bbox: Option<String>,
    /// Grounding: the image size `[w, h]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[f64; 2]>,
    /// Optional: all human answers (10 for VQA-style data), used by strict soft accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<Vec<String>>,
}

impl TestRecord {
    /// The question without its instruction line (what CoIN's `create_prompt.py` keeps).
    pub fn question_without_instruction(&self) -> &str {
        match self.text.rfind('\n') {
            Some(i) => &self.text[..i],
            None => "",
        }
    }

    /// The instruction: the last line of `text`.
    pub fn instruction(&self) -> &str {
        match self.text.rfind('\n') {
            Some(i) => &self.text[i + 1..],
            None => &self.text,
        }
    }
}

/// One line of a CoIN answer file (`merge.jsonl`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct AnswerRecord {
    /// The question id it answers.
    pub question_id: Qid,
    /// The prompt the model saw (CoIN writes the test record's `text`).
    #[serde(default)]
    pub prompt: String,
    /// The model's answer.
    #[serde(default, deserialize_with = "de_text")]
    pub text: Option<String>,
    /// A random id (shortuuid in CoIN).
    #[serde(default, deserialize_with = "de_small_value")]
    pub answer_id: serde_json::Value,
    /// The model name.
    #[serde(default, deserialize_with = "de_small_value")]
    pub model_id: serde_json::Value,
    /// Anything else (at most [`MAX_FIELD_VALUES`] values per field).
    #[serde(default, deserialize_with = "de_small_value")]
    pub metadata: serde_json::Value,
}

impl AnswerRecord {
    /// The answer text ("" when absent).
    pub fn answer(&self) -> &str {
        self.text.as_deref().unwrap_or("")
    }
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, TaskError> {
    std::fs::File::open(path)
        .map(|f| BufReader::with_capacity(1 << 20, f))
        .map_err(|e| TaskError::io("open", path, e))
}

/// How far a JSON-list reader has read and where the current element must end.
struct Meter {
    /// The most bytes one element may take.
    record_bytes: u64,
    /// Bytes handed to the parser's read buffer so far.
    pos: Cell<u64>,
    /// The parser may not read past this offset.
    limit: Cell<u64>,
    /// The limit was reached (so a parser error is really "element too large").
    hit: Cell<bool>,
}

impl Meter {
    fn new(record_bytes: usize) -> Self {
        let record_bytes = record_bytes as u64;
        Meter {
            record_bytes,
            pos: Cell::new(0),
            limit: Cell::new(record_bytes),
            hit: Cell::new(false),
        }
    }

    /// The next element starts here: it may take `record_bytes` from now on.
    fn start_element(&self) {
        self.limit.set(self.pos.get() + self.record_bytes);
    }
}

/// A reader that refuses to read past the meter's limit, so one element of a JSON list never
/// takes more than [`MAX_RECORD_BYTES`] of input (and so of memory) before it is refused.
///
/// It sits behind the parser's `BufReader` (serde_json reads byte by byte, and only a
/// `BufReader` makes that fast), so it counts the bytes handed to that buffer: an element's
/// start is known to within one buffer, which can only make the meter later, never earlier.
/// When the meter refuses a refill, the parser has consumed everything read so far, at least
/// `record_bytes` past the element's true start, and still wants more: the element is longer
/// than the limit. An element within the limit is never refused.
struct Metered<'m, R> {
    inner: R,
    meter: &'m Meter,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let pos = self.meter.pos.get();
        let room = self.meter.limit.get().saturating_sub(pos);
        if room == 0 && !buf.is_empty() {
            self.meter.hit.set(true);
            return Err(std::io::Error::other("a record is too large"));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.meter.pos.set(pos + n as u64);
        Ok(n)
    }
}

struct EachSeed<'a, T, F> {
    f: &'a mut F,
    count: usize,
    failure: Option<TaskError>,
    path: &'a Path,
    meter: &'a Meter,
    limits: Limits,
    _t: std::marker::PhantomData<T>,
}

impl<'de, T, F> Visitor<'de> for &mut EachSeed<'_, T, F>
where
    T: DeserializeOwned,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON list of records")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let index = self.count;
            self.meter.start_element();
            match seq.next_element::<T>() {
                Ok(Some(item)) => {
                    if index >= self.limits.records {
                        self.failure = Some(too_many_records(self.path, self.limits));
                        return Err(serde::de::Error::custom("stopped"));
                    }
                    self.count += 1;
                    if let Err(e) = (self.f)(index, item) {
                        self.failure = Some(e);
                        return Err(serde::de::Error::custom("stopped"));
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.failure = Some(if self.meter.hit.get() {
                        TaskError::TooLong {
                            path: self.path.to_path_buf(),
                            place: format!("record {index}"),
                            limit: self.limits.record_bytes,
                        }
                    } else {
                        TaskError::Record {
                            path: self.path.to_path_buf(),
                            index,
                            message: brief(e.to_string()),
                        }
                    });
                    return Err(e);
                }
            }
        }
    }
}

impl<'de, T, F> DeserializeSeed<'de> for &mut EachSeed<'_, T, F>
where
    T: DeserializeOwned,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

fn too_many_records(path: &Path, limits: Limits) -> TaskError {
    TaskError::Format {
        path: path.to_path_buf(),
        what: "data file",
        message: format!(
            "it has more than {} records, the most coin reads from one file",
            limits.records
        ),
    }
}

/// Stream the elements of a JSON list from `reader`, calling `f(index, item)` for each.
/// Returns the number of elements. `path` names the source in errors. An element longer than
/// [`MAX_RECORD_BYTES`] or a list of more than [`MAX_RECORDS`] elements is an error.
pub fn for_each_in_json_list<T, R, F>(reader: R, path: &Path, f: F) -> Result<usize, TaskError>
where
    T: DeserializeOwned,
    R: Read,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    json_list_limited(reader, path, LIMITS, f)
}

fn json_list_limited<T, R, F>(
    reader: R,
    path: &Path,
    limits: Limits,
    mut f: F,
) -> Result<usize, TaskError>
where
    T: DeserializeOwned,
    R: Read,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    let meter = Meter::new(limits.record_bytes);
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(
        limits.read_ahead,
        Metered {
            inner: reader,
            meter: &meter,
        },
    ));
    let mut seed = EachSeed {
        f: &mut f,
        count: 0,
        failure: None,
        path,
        meter: &meter,
        limits,
        _t: std::marker::PhantomData,
    };
    let res = (&mut seed).deserialize(&mut de);
    if let Some(failure) = seed.failure.take() {
        return Err(failure);
    }
    if meter.hit.get() {
        // Refused before the first element (a huge value that is not a list).
        return Err(TaskError::TooLong {
            path: path.to_path_buf(),
            place: "the start".into(),
            limit: limits.record_bytes,
        });
    }
    // Trailing whitespace costs no memory: no limit for the end check.
    meter.limit.set(u64::MAX);
    res.and_then(|()| de.end()).map_err(|e| TaskError::Format {
        path: path.to_path_buf(),
        what: "JSON list",
        message: brief(e),
    })?;
    Ok(seed.count)
}

/// Stream a JSON-list file.
pub fn for_each_in_file<T, F>(path: &Path, f: F) -> Result<usize, TaskError>
where
    T: DeserializeOwned,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    // Unbuffered: the list reader has its own buffer.
    let file = std::fs::File::open(path).map_err(|e| TaskError::io("open", path, e))?;
    for_each_in_json_list(file, path, f)
}

/// Read a whole CoIN `test.json`/`val.json`.
pub fn read_test_file(path: &Path) -> Result<Vec<TestRecord>, TaskError> {
    let mut out = Vec::new();
    for_each_in_file(path, |_, r: TestRecord| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

/// Read a whole CoIN `train.json`, checking each conversation's shape.
pub fn read_train_file(path: &Path) -> Result<Vec<TrainRecord>, TaskError> {
    let mut out = Vec::new();
    for_each_in_file(path, |index, r: TrainRecord| {
        r.validate().map_err(|message| TaskError::Record {
            path: path.to_path_buf(),
            index,
            message,
        })?;
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

/// Read one line into `buf` (without its `\n`), reading at most `max` bytes of it: `Ok(false)`
/// at the end of the input, `Err(None)` when the line is longer than `max`.
fn read_line_bounded(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, Option<std::io::Error>> {
    buf.clear();
    let mut any = false;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Some(e)),
        };
        if chunk.is_empty() {
            return Ok(any);
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take > max {
            return Err(None);
        }
        buf.extend_from_slice(&chunk[..take]);
        reader.consume(take + usize::from(done));
        if done {
            return Ok(true);
        }
    }
}

/// Stream a JSONL input: `f(line_number, record)` (1-based) for each non-blank line, each read
/// into a `T`. A line longer than [`MAX_RECORD_BYTES`], more than [`MAX_RECORDS`] records, a
/// line that is not UTF-8 or not a `T` is an error naming `path` and the line. Returns the
/// number of records.
pub fn for_each_jsonl<T, F>(reader: impl BufRead, path: &Path, f: F) -> Result<usize, TaskError>
where
    T: DeserializeOwned,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    jsonl_limited(reader, path, LIMITS, f)
}

fn jsonl_limited<T, F>(
    mut reader: impl BufRead,
    path: &Path,
    limits: Limits,
    mut f: F,
) -> Result<usize, TaskError>
where
    T: DeserializeOwned,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    let mut buf = Vec::new();
    let mut n = 0;
    let mut line_no = 0;
    loop {
        line_no += 1;
        match read_line_bounded(&mut reader, &mut buf, limits.record_bytes) {
            Ok(false) => return Ok(n),
            Ok(true) => {}
            Err(Some(e)) => return Err(TaskError::io("read", path, e)),
            Err(None) => {
                return Err(TaskError::TooLong {
                    path: path.to_path_buf(),
                    place: format!("line {line_no}"),
                    limit: limits.record_bytes,
                })
            }
        }
        let line = std::str::from_utf8(&buf).map_err(|_| TaskError::Line {
            path: path.to_path_buf(),
            line: line_no,
            message: "it is not UTF-8 text".into(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        if n >= limits.records {
            return Err(too_many_records(path, limits));
        }
        let rec: T = serde_json::from_str(line).map_err(|e| TaskError::Line {
            path: path.to_path_buf(),
            line: line_no,
            message: brief(e),
        })?;
        f(line_no, rec)?;
        n += 1;
    }
}

/// Stream a JSONL answer file; `f(line_number, record)` (1-based). Blank lines are skipped.
pub fn for_each_answer<F>(path: &Path, f: F) -> Result<usize, TaskError>
where
    F: FnMut(usize, AnswerRecord) -> Result<(), TaskError>,
{
    for_each_jsonl(open(path)?, path, f)
}

/// Read a whole answer file to score it. A file without a single answer is an error naming the
/// file: an empty answer file is a mistake (a crashed run, a wrong path), not a score of 0.
pub fn read_answer_file(path: &Path) -> Result<Vec<AnswerRecord>, TaskError> {
    let mut out = Vec::new();
    for_each_answer(path, |_, r| {
        out.push(r);
        Ok(())
    })?;
    if out.is_empty() {
        return Err(TaskError::Format {
            path: path.to_path_buf(),
            what: "answer file",
            message: "it holds no answers (an empty answer file is not a score of 0)".into(),
        });
    }
    Ok(out)
}

/// Write answer records as JSONL (CoIN's layout, one object per line).
pub fn answers_to_jsonl(records: &[AnswerRecord]) -> String {
    let mut s = String::new();
    for r in records {
        s.push_str(&serde_json::to_string(r).expect("an AnswerRecord always serialises"));
        s.push('\n');
    }
    s
}

/// Resolve an image path from a record against `root`, refusing absolute paths and `..`
/// components that would leave the root.
pub fn resolve_image(root: &Path, image: &str) -> Result<PathBuf, TaskError> {
    let rel = Path::new(image);
    let escapes = || TaskError::ImagePathEscapes {
        image: image.to_string(),
        root: root.to_path_buf(),
    };
    let mut depth: usize = 0;
    for c in rel.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => depth = depth.checked_sub(1).ok_or_else(escapes)?,
            Component::RootDir | Component::Prefix(_) => return Err(escapes()),
        }
    }
    if image.is_empty() {
        return Err(escapes());
    }
    Ok(root.join(rel))
}

/// How many of the images exist; the first few missing ones.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ImageCheck {
    /// Distinct images referenced.
    pub referenced: usize,
    /// How many of them are missing.
    pub missing: usize,
    /// Up to ten missing paths, in file order.
    pub first_missing: Vec<String>,
}

impl ImageCheck {
    /// Turn missing images into an error.
    pub fn into_result(self, root: &Path) -> Result<Self, TaskError> {
        if self.missing == 0 {
            Ok(self)
        } else {
            Err(TaskError::MissingImages {
                count: self.missing,
                first: self.first_missing,
                root: root.to_path_buf(),
            })
        }
    }
}

/// Check that every image exists under `root` (each distinct path once). Escaping paths are an
/// error at once; missing ones are collected.
pub fn check_images<'a>(
    root: &Path,
    images: impl IntoIterator<Item = &'a str>,
) -> Result<ImageCheck, TaskError> {
    let mut seen = std::collections::HashSet::new();
    let mut check = ImageCheck::default();
    for image in images {
        if !seen.insert(image.to_string()) {
            continue;
        }
        check.referenced += 1;
        let p = resolve_image(root, image)?;
        if !p.is_file() {
            check.missing += 1;
            if check.first_missing.len() < 10 {
                check.first_missing.push(image.to_string());
            }
        }
    }
    Ok(check)
}

/// The identity of an instruction file as recorded with a training step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetIdentity {
    /// blake3 of the file's bytes, hex.
    pub blake3: String,
    /// Number of records in the list.
    pub items: usize,
    /// File size in bytes.
    pub bytes: u64,
}

/// Hash an instruction file and count its records (streaming both).
pub fn dataset_identity(path: &Path) -> Result<DatasetIdentity, TaskError> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .map_err(|e| TaskError::io("hash", path, e))?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| TaskError::io("read", path, e))?
        .len();
    let items = for_each_in_file(path, |_, _: serde::de::IgnoredAny| Ok(()))?;
    Ok(DatasetIdentity {
        blake3: hasher.finalize().to_hex().to_string(),
        items,
        bytes,
    })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn tmpfile(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_coin_test_records_including_grounding() {
        let d = tempfile::tempdir().unwrap();
        let p = tmpfile(
            &d,
            "test.json",
            r#"[{"question_id": 12, "image": "COCO2014/train2014/a.jpg",
                 "text": "What color?\nAnswer the question using a single word or phrase.",
                 "answer": "red"},
                {"question_id": "g1", "image": "b.jpg", "text": "man left\nPlease provide the bounding box coordinate of the region this sentence describes.",
                 "answer_bbox": "[0.1, 0.2, 0.5, 0.9]", "size": [640, 480]}]"#,
        );
        let recs = read_test_file(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].question_id, Qid::text("12"));
        assert_eq!(recs[0].question_without_instruction(), "What color?");
        assert_eq!(
            recs[0].instruction(),
            "Answer the question using a single word or phrase."
        );
        assert_eq!(recs[1].size, Some([640.0, 480.0]));
        assert_eq!(recs[1].answer, None);
        assert_eq!(recs[1].answer_bbox.as_deref(), Some("[0.1, 0.2, 0.5, 0.9]"));
    }

    #[test]
    fn broken_record_names_file_and_index() {
        let d = tempfile::tempdir().unwrap();
        let p = tmpfile(
            &d,
            "test.json",
            r#"[{"question_id": 1, "text": "a\nb", "answer": "x"}, {"question_id": 2}]"#,
        );
        let err = read_test_file(&p).unwrap_err().to_string();
        assert!(err.contains("record 1 of"), "{err}");
        assert!(err.contains("test.json"), "{err}");
        assert!(err.contains("text"), "{err}");
        let p2 = tmpfile(&d, "obj.json", r#"{"a": 1}"#);
        assert!(read_test_file(&p2).is_err());
        let p3 = tmpfile(&d, "trail.json", r#"[] x"#);
        assert!(read_test_file(&p3).is_err());
    }

    #[test]
    fn train_records_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let good = r#"[{"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nQ?\nAnswer."}, {"from": "gpt", "value": "A"}]}]"#;
        let p = tmpfile(&d, "train.json", good);
        assert_eq!(read_train_file(&p).unwrap()[0].conversations[1].value, "A");
        let bad = r#"[{"id": 1, "conversations": [{"from": "gpt", "value": "A"}]}]"#;
        let p = tmpfile(&d, "bad.json", bad);
        let err = read_train_file(&p).unwrap_err().to_string();
        assert!(err.contains("record 0") && err.contains("turn 0"), "{err}");
    }

    #[test]
    fn answer_files_jsonl() {
        let d = tempfile::tempdir().unwrap();
        let p = tmpfile(
            &d,
            "merge.jsonl",
            "{\"question_id\": 1, \"prompt\": \"Q\\nI\", \"text\": \"yes\", \"answer_id\": \"x\", \"model_id\": \"m\", \"metadata\": {}}\n\n{\"question_id\": \"2\", \"text\": 3}\n",
        );
        let a = read_answer_file(&p).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].answer(), "3");
        let round = answers_to_jsonl(&a);
        let p2 = tmpfile(&d, "again.jsonl", &round);
        assert_eq!(read_answer_file(&p2).unwrap(), a);
        let p3 = tmpfile(&d, "bad.jsonl", "{\"question_id\": 1}\nnot json\n");
        let err = read_answer_file(&p3).unwrap_err().to_string();
        assert!(err.starts_with("line 2 of '"), "{err}");
        assert!(err.contains("bad.jsonl"), "{err}");
    }

    #[test]
    fn an_empty_answer_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\r\n")] {
            let p = tmpfile(&d, name, text);
            let err = read_answer_file(&p).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
            assert!(err.contains("holds no answers"), "{err}");
            // The streaming reader itself just counts: zero records is not its business.
            assert_eq!(for_each_answer(&p, |_, _| Ok(())).unwrap(), 0);
        }
    }

    fn line_of(len: usize) -> String {
        let head = "{\"question_id\": 1, \"text\": \"";
        let tail = "\"}";
        format!("{head}{}{tail}", "y".repeat(len - head.len() - tail.len()))
    }

    #[test]
    fn an_answer_line_over_the_limit_is_refused_with_its_line_number() {
        let d = tempfile::tempdir().unwrap();
        // Exactly the limit is read; one byte more is refused, naming the file and the line.
        let at = line_of(MAX_RECORD_BYTES);
        let p = tmpfile(&d, "at.jsonl", &format!("{at}\n"));
        assert_eq!(
            read_answer_file(&p).unwrap()[0].answer().len(),
            MAX_RECORD_BYTES - 30
        );
        let over = line_of(MAX_RECORD_BYTES + 1);
        let text = format!("{}\n\n{over}\n", line_of(40));
        let p = tmpfile(&d, "over.jsonl", &text);
        let err = read_answer_file(&p).unwrap_err();
        assert!(matches!(err, TaskError::TooLong { .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.starts_with("line 3 of '"), "{err}");
        assert!(err.contains("over.jsonl") && err.contains("4 MiB"), "{err}");
        // The same without a final newline.
        let p = tmpfile(&d, "last.jsonl", &over);
        let err = read_answer_file(&p).unwrap_err().to_string();
        assert!(err.starts_with("line 1 of '"), "{err}");
    }

    #[test]
    fn jsonl_limits_count_lines_and_records() {
        let limits = Limits {
            record_bytes: 64,
            records: 2,
            read_ahead: 8,
        };
        let path = Path::new("x.jsonl");
        let read = |text: &str| {
            let mut ids = Vec::new();
            jsonl_limited(text.as_bytes(), path, limits, |line, r: AnswerRecord| {
                ids.push((line, r.question_id.0));
                Ok(())
            })
            .map(|n| (n, ids))
        };
        let (n, ids) = read("{\"question_id\": 1}\r\n\n{\"question_id\": \"b\"}").unwrap();
        assert_eq!(n, 2);
        assert_eq!(ids, vec![(1, "1".to_string()), (3, "b".to_string())]);
        // Blank lines do not count as records; a third record does.
        let err = read("{\"question_id\": 1}\n{\"question_id\": 2}\n\n{\"question_id\": 3}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 2 records"), "{err}");
        let long = format!("{{\"question_id\": 1, \"text\": \"{}\"}}", "z".repeat(64));
        let err = read(&format!("{{\"question_id\": 1}}\n{long}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("line 2 of 'x.jsonl' is longer than 64 bytes"),
            "{err}"
        );
        let err = jsonl_limited(
            &b"{\"question_id\": 1}\n{\"text\": \"\xff\"}\n"[..],
            path,
            limits,
            |_, _: AnswerRecord| Ok(()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2") && err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn a_json_list_element_over_the_limit_is_refused_with_its_index() {
        let limits = Limits {
            record_bytes: 64,
            records: 3,
            read_ahead: 1,
        };
        let path = Path::new("test.json");
        let rec = |text: &str| format!("{{\"question_id\": 1, \"text\": \"{text}\"}}");
        let read = |text: String| {
            json_list_limited(text.as_bytes(), path, limits, |_, _: TestRecord| Ok(()))
        };
        // Many elements, each under the limit, make a list longer than the limit: fine.
        let ok = format!("[{}, {}, {}]", rec("a"), rec("b"), rec(&"c".repeat(30)));
        assert!(ok.len() > 64);
        assert_eq!(read(ok).unwrap(), 3);
        let err = read(format!("[{}, {}]", rec("a"), rec(&"d".repeat(80)))).unwrap_err();
        assert!(matches!(err, TaskError::TooLong { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("record 1 of 'test.json' is longer than 64 bytes"),
            "{err}"
        );
        let four = format!("[{}, {}, {}, {}]", rec("a"), rec("b"), rec("c"), rec("d"));
        let err = read(four).unwrap_err().to_string();
        assert!(err.contains("more than 3 records"), "{err}");
        // A huge value that is not a list is refused at its start.
        let err = read(format!("\"{}\"", "x".repeat(100)))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the start of 'test.json' is longer"),
            "{err}"
        );
        // Whitespace after the list costs nothing and is not limited.
        assert_eq!(read(format!("[]{}", " ".repeat(100))).unwrap(), 0);
    }

    #[test]
    fn a_json_list_element_within_the_limit_is_never_refused_whatever_the_buffer() {
        // The meter counts from where the previous element ended, so an element's cost is its
        // text plus the ", " before it. Within the limit: always read. Over the limit plus the
        // read-ahead buffer: always refused.
        let path = Path::new("t.json");
        let rec = |n: usize| format!("{{\"question_id\": 1, \"text\": \"{}\"}}", "e".repeat(n));
        let base = rec(0).len();
        for read_ahead in [1, 2, 7, 16, 50, 200] {
            let limits = Limits {
                record_bytes: 60,
                records: 10,
                read_ahead,
            };
            for n in 0..70 {
                let cost = 2 + base + n;
                let text = format!("[{}, {}, {}]", rec(1), rec(n), rec(2));
                let got =
                    json_list_limited(text.as_bytes(), path, limits, |_, _: TestRecord| Ok(()));
                if cost <= limits.record_bytes {
                    assert_eq!(got.unwrap(), 3, "cost {cost}, buffer {read_ahead}");
                } else if cost > limits.record_bytes + read_ahead {
                    let err = got.unwrap_err().to_string();
                    assert!(err.starts_with("record 1 of"), "cost {cost}: {err}");
                }
            }
        }
    }

    #[test]
    fn a_real_test_file_element_over_4_mib_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let rec = |id: usize, n: usize| {
            format!("{{\"question_id\": {id}, \"text\": \"{}\"}}", "w".repeat(n))
        };
        // Within the limit (with its ", "): read.
        let at = MAX_RECORD_BYTES - rec(2, 0).len() - 2;
        let p = tmpfile(&d, "at.json", &format!("[{}, {}]", rec(1, 1), rec(2, at)));
        let read = read_test_file(&p).map(|r| r.iter().map(|q| q.text.len()).collect::<Vec<_>>());
        assert_eq!(read.ok(), Some(vec![1, at]));
        // Past the limit and the read-ahead buffer: refused, naming the file and the record.
        let over = MAX_RECORD_BYTES + LIMITS.read_ahead;
        let p = tmpfile(
            &d,
            "test.json",
            &format!("[{}, {}]", rec(1, 1), rec(2, over)),
        );
        let err = read_test_file(&p).map(|r| r.len()).unwrap_err().to_string();
        assert!(
            err.starts_with("record 1 of '") && err.contains("test.json") && err.contains("4 MiB"),
            "{err}"
        );
    }

    #[test]
    fn ids_keep_their_json_type_for_python_lookups() {
        let id = |j: &str| serde_json::from_str::<Qid>(j).unwrap();
        // Equal as coin compares them (by text) …
        assert_eq!(id("132"), id("\"132\""));
        assert_eq!(
            (id("132").kind(), id("\"132\"").kind()),
            (IdKind::Int, IdKind::Text)
        );
        // … but not as Python dict keys: a string never equals a number, 132 equals 132.0.
        assert_ne!(id("132").py_key(), id("\"132\"").py_key());
        assert_eq!(id("132").py_key(), id("132.0").py_key());
        assert_eq!(id("-0.0").py_key(), id("0").py_key());
        assert_ne!(id("0.5").py_key(), id("\"0.5\"").py_key());
        // str(): ints and strings as written, floats as Python's repr.
        assert_eq!(id("132").py_str(), "132");
        assert_eq!(id("132.0").py_str(), "132.0");
        assert_eq!(id("1e16").py_str(), "1e+16");
        assert_eq!(id("\"1e16\"").py_str(), "1e16");
        let ids = [id("\"a\""), id("\"b\""), id("7"), id("\"c\"")];
        let (t, n) = mixed_id_kinds(&ids).unwrap();
        assert_eq!((t.0.as_str(), n.0.as_str()), ("a", "7"));
        assert!(mixed_id_kinds(&ids[..2]).is_none());
    }

    #[test]
    fn python_float_repr() {
        // Checked against CPython 3.11's repr().
        for (v, want) in [
            (5.0, "5.0"),
            (0.0, "0.0"),
            (-0.5, "-0.5"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-1.5e-7, "-1.5e-07"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
        ] {
            assert_eq!(py_float_repr(v), want, "{v:e}");
        }
    }

    #[test]
    fn answer_lines_write_ids_back_as_read() {
        // A questions file with integer, float and string ids yields answer lines with the same
        // JSON types, as CoIN's model_*.py write them, and they read back with the same kinds.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.json");
        crate::store::fsutil::write_atomic(
            &path,
            br#"[{"question_id": 132, "text": "t"}, {"question_id": -4, "text": "t"},
                 {"question_id": 7.0, "text": "t"}, {"question_id": 1e20, "text": "t"},
                 {"question_id": "0132", "text": "t"},
                 {"question_id": 18446744073709551615, "text": "t"}]"#,
        )
        .unwrap();
        let qs = read_test_file(&path).unwrap();
        let answers: Vec<AnswerRecord> = qs
            .iter()
            .map(|q| AnswerRecord {
                question_id: q.question_id.clone(),
                prompt: q.text.clone(),
                text: Some("x".into()),
                answer_id: serde_json::Value::Null,
                model_id: serde_json::Value::Null,
                metadata: serde_json::Value::Null,
            })
            .collect();
        let jsonl = answers_to_jsonl(&answers);
        let ids: Vec<&str> = jsonl
            .lines()
            .map(|l| {
                let rest = l.strip_prefix("{\"question_id\":").unwrap();
                &rest[..rest.find(',').unwrap()]
            })
            .collect();
        assert_eq!(
            ids,
            [
                "132",
                "-4",
                "7.0",
                "1e+20",
                "\"0132\"",
                "18446744073709551615"
            ]
        );
        let back = dir.path().join("merge.jsonl");
        crate::store::fsutil::write_atomic(&back, jsonl.as_bytes()).unwrap();
        let read = read_answer_file(&back).unwrap();
        for (q, a) in qs.iter().zip(&read) {
            assert_eq!(a.question_id, q.question_id);
            assert_eq!(
                a.question_id.kind(),
                q.question_id.kind(),
                "{}",
                q.question_id
            );
            assert_eq!(a.question_id.py_key(), q.question_id.py_key());
        }
    }

    #[test]
    fn ids_and_texts_are_typed_and_never_build_a_tree() {
        let q: TestRecord = serde_json::from_str(
            r#"{"question_id": 5.0, "text": "t", "answer": 1e20, "answer_bbox": null}"#,
        )
        .unwrap();
        // Numbers read as they did through serde_json's Value.
        assert_eq!(q.question_id, Qid::text("5.0"));
        assert_eq!(q.question_id.kind(), IdKind::Float);
        assert_eq!(q.answer.as_deref(), Some("1e+20"));
        assert_eq!(q.answer_bbox, None);
        let a: AnswerRecord = serde_json::from_str(r#"{"question_id": -3, "text": true}"#).unwrap();
        assert_eq!((a.question_id.0.as_str(), a.answer()), ("-3", "true"));
        // A list where a string belongs is refused by its type, not printed back whole.
        let list = format!("[{}]", vec!["0"; 10_000].join(","));
        for line in [
            format!(r#"{{"question_id": {list}}}"#),
            format!(r#"{{"question_id": 1, "text": {list}}}"#),
        ] {
            let err = serde_json::from_str::<AnswerRecord>(&line)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("invalid type: sequence"), "{err}");
            assert!(err.len() < 200, "{err}");
        }
    }

    #[test]
    fn free_form_answer_fields_keep_at_most_max_field_values() {
        let list = |n: usize| format!("[{}]", vec!["0"; n].join(","));
        // The list itself is one value.
        let ok = format!(
            r#"{{"question_id": 1, "answer_id": "x", "metadata": {{"a": {}}}}}"#,
            list(MAX_FIELD_VALUES - 3)
        );
        let a: AnswerRecord = serde_json::from_str(&ok).unwrap();
        assert_eq!(a.answer_id, serde_json::json!("x"));
        assert_eq!(
            a.metadata["a"].as_array().unwrap().len(),
            MAX_FIELD_VALUES - 3
        );
        let over = format!(
            r#"{{"question_id": 1, "metadata": {{"a": {}}}}}"#,
            list(MAX_FIELD_VALUES - 2)
        );
        let err = serde_json::from_str::<AnswerRecord>(&over)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 4096 JSON values"), "{err}");
        // Each field has its own budget, and the usual CoIN line round-trips.
        let line = r#"{"question_id":"q","prompt":"p","text":"t","answer_id":"id","model_id":"m","metadata":{"k":[1,2.5,null,true]}}"#;
        let a: AnswerRecord = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), line);
    }

    #[test]
    fn file_text_in_messages_is_escaped() {
        assert_eq!(
            Escaped("a\u{1b}[31m\n\u{202e}\"'\\").to_string(),
            "a\\u{1b}[31m\\n\\u{202e}\"'\\\\"
        );
        let e = TaskError::Record {
            path: "t.json".into(),
            index: 0,
            message: "id \u{7}\r".into(),
        };
        assert_eq!(
            e.to_string(),
            "record 0 of 't.json' is broken: id \\u{7}\\r"
        );
        let e = TaskError::ImagePathEscapes {
            image: "../\u{1b}]0;x\u{7}".into(),
            root: "r".into(),
        };
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
        let e = TaskError::UnknownTask("a\u{1b}b".into());
        assert_eq!(e.to_string(), "unknown task 'a\\u{1b}b'");
    }

    #[test]
    fn long_parser_messages_are_cut() {
        let m = brief("x".repeat(1000));
        assert_eq!(m.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(m.ends_with('…'));
        assert_eq!(brief("short"), "short");
        assert_eq!(size_text(4 << 20), "4 MiB");
        assert_eq!(size_text(64), "64 bytes");
    }

    #[test]
    fn image_paths_cannot_escape_and_missing_are_listed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("imgs/sub")).unwrap();
        std::fs::write(d.path().join("imgs/sub/a.png"), b"x").unwrap();
        let root = d.path().join("imgs");
        assert!(resolve_image(&root, "sub/../sub/a.png").is_ok());
        assert!(resolve_image(&root, "../secret.png").is_err());
        assert!(resolve_image(&root, "sub/../../x.png").is_err());
        assert!(resolve_image(&root, "/etc/passwd").is_err());
        let c = check_images(&root, ["sub/a.png", "b.png", "b.png", "c.png"]).unwrap();
        assert_eq!(c.referenced, 3);
        assert_eq!(c.missing, 2);
        assert_eq!(c.first_missing, vec!["b.png", "c.png"]);
        let err = c.into_result(&root).unwrap_err().to_string();
        assert!(err.starts_with("2 image(s) missing"), "{err}");
    }

    #[test]
    fn dataset_identity_hashes_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let p = tmpfile(&d, "t.json", r#"[{"a": [1, 2]}, 3, "x"]"#);
        let id = dataset_identity(&p).unwrap();
        assert_eq!(id.items, 3);
        assert_eq!(
            id.blake3,
            blake3::hash(br#"[{"a": [1, 2]}, 3, "x"]"#)
                .to_hex()
                .to_string()
        );
    }
}
