//! A bounded, strict reader for safetensors headers (no dependency on the safetensors crate,
//! so every hostile input gets our own clear error).
//!
//! A safetensors file is `N` (u64 little-endian), `N` bytes of JSON header, then the data.
//! The header maps tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}`
//! (offsets relative to the data start) plus an optional `"__metadata__"` map of strings.
//! coin accepts only files whose tensors cover the data exactly: no overlap, no gap, no
//! trailing bytes (the format requires this), so that the header blob followed by the
//! tensors in offset order rebuilds the file byte for byte.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::Dtype;

/// Largest JSON header accepted (the safetensors crate's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor of a parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The key in the header.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// Offset of the first byte, relative to the data start.
    pub begin: u64,
    /// Offset one past the last byte, relative to the data start.
    pub end: u64,
}

impl TensorInfo {
    /// Byte count.
    pub fn len(&self) -> u64 {
        self.end - self.begin
    }

    /// Whether the tensor has no bytes.
    pub fn is_empty(&self) -> bool {
        self.end == self.begin
    }
}

/// A parsed and validated safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON header (`N`).
    pub json_len: u64,
    /// Tensors sorted by data offset; they tile `0..data_len` exactly.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` entries, in file order.
    pub metadata: Vec<(String, String)>,
}

impl Header {
    /// Where the data starts in the file: `8 + N`.
    pub fn data_start(&self) -> u64 {
        8 + self.json_len
    }
}

/// Why a file is not an acceptable safetensors file. The Display text names the tensor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than the 8-byte length prefix.
    #[error("file is {0} bytes, shorter than the 8-byte header length")]
    TooShort(u64),
    /// `N` is beyond the file or the limit.
    #[error("header length {len} is larger than {what} ({limit} bytes)")]
    HeaderTooLong {
        /// N.
        len: u64,
        /// "the file" or "the limit".
        what: &'static str,
        /// The bound.
        limit: u64,
    },
    /// Not UTF-8.
    #[error("header is not valid UTF-8 (byte {0})")]
    NotUtf8(usize),
    /// JSON syntax or shape error.
    #[error("header is not valid JSON: {0}")]
    Json(String),
    /// The same key twice.
    #[error("tensor '{}' appears twice in the header", .0.escape_debug())]
    Duplicate(String),
    /// A problem with one tensor.
    #[error("tensor '{}': {reason}", name.escape_debug())]
    Tensor {
        /// The tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// `__metadata__` is not a map of strings.
    #[error("__metadata__ must map strings to strings: {0}")]
    Metadata(String),
    /// Two tensors share bytes.
    #[error("tensors '{}' and '{}' overlap", .0.escape_debug(), .1.escape_debug())]
    Overlap(String, String),
    /// Bytes not covered by any tensor.
    #[error("{what} bytes {begin}..{end} of the data belong to no tensor (coin refuses files with gaps or trailing bytes)")]
    Uncovered {
        /// "gap" or "trailing".
        what: &'static str,
        /// First uncovered byte.
        begin: u64,
        /// One past.
        end: u64,
    },
}

/// Read the 8-byte prefix: the JSON header length `N`, checked against the file length and
/// [`MAX_HEADER_LEN`].
pub fn parse_prefix(prefix: &[u8], file_len: u64) -> Result<u64, HeaderError> {
    let bytes: [u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(HeaderError::TooShort(file_len.min(prefix.len() as u64)))?;
    if file_len < 8 {
        return Err(HeaderError::TooShort(file_len));
    }
    let n = u64::from_le_bytes(bytes);
    if n > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLong {
            len: n,
            what: "the limit",
            limit: MAX_HEADER_LEN,
        });
    }
    if n > file_len - 8 {
        return Err(HeaderError::HeaderTooLong {
            len: n,
            what: "the rest of the file",
            limit: file_len - 8,
        });
    }
    Ok(n)
}

/// Parse and validate the JSON header against `data_len` (file length − 8 − N).
pub fn parse_json(json: &[u8], data_len: u64) -> Result<Header, HeaderError> {
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8(e.valid_up_to()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = de
        .deserialize_map(EntriesVisitor)
        .and_then(|e| de.end().map(|_| e))
        .map_err(|e| HeaderError::Json(e.to_string()))?;
    let mut seen = HashSet::new();
    let mut tensors = Vec::new();
    let mut metadata = Vec::new();
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(HeaderError::Duplicate(name));
        }
        if name == "__metadata__" {
            let serde_json::Value::Object(map) = value else {
                return Err(HeaderError::Metadata("not an object".into()));
            };
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) => metadata.push((k, s)),
                    _ => {
                        return Err(HeaderError::Metadata(format!(
                            "value of '{}'",
                            k.escape_debug()
                        )))
                    }
                }
            }
            continue;
        }
        tensors.push(tensor_info(name, value, data_len)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut pos = 0u64;
    let mut prev: Option<&TensorInfo> = None;
    for t in &tensors {
        if t.begin < pos {
            let p = prev.map(|p| p.name.clone()).unwrap_or_default();
            return Err(HeaderError::Overlap(p, t.name.clone()));
        }
        if t.begin > pos {
            return Err(HeaderError::Uncovered {
                what: "gap",
                begin: pos,
                end: t.begin,
            });
        }
        pos = t.end;
        prev = Some(t);
    }
    if pos != data_len {
        return Err(HeaderError::Uncovered {
            what: "trailing",
            begin: pos,
            end: data_len,
        });
    }
    Ok(Header {
        json_len: json.len() as u64,
        tensors,
        metadata,
    })
}

/// Parse a whole safetensors file held in memory (tests and fuzzing; ingest streams).
pub fn parse_bytes(file: &[u8]) -> Result<Header, HeaderError> {
    let n = parse_prefix(file, file.len() as u64)?;
    let json = &file[8..8 + n as usize];
    parse_json(json, file.len() as u64 - 8 - n)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

fn tensor_info(
    name: String,
    value: serde_json::Value,
    data_len: u64,
) -> Result<TensorInfo, HeaderError> {
    let fail = |name: &str, reason: String| HeaderError::Tensor {
        name: name.to_string(),
        reason,
    };
    let raw: RawTensor = serde_json::from_value(value).map_err(|e| fail(&name, e.to_string()))?;
    let dtype: Dtype = raw.dtype.parse().map_err(|e| fail(&name, format!("{e}")))?;
    let (begin, end) = raw.data_offsets;
    if begin > end {
        return Err(fail(
            &name,
            format!("data offsets [{begin}, {end}] are reversed"),
        ));
    }
    if end > data_len {
        return Err(fail(
            &name,
            format!(
                "data offsets [{begin}, {end}] are past the end of the data ({data_len} bytes)"
            ),
        ));
    }
    let elements = raw.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let expected = elements.and_then(|n| dtype.byte_len(n));
    match expected {
        Some(bytes) if bytes == end - begin => {}
        Some(bytes) => {
            return Err(fail(
                &name,
                format!(
                    "shape {:?} of {dtype} needs {bytes} bytes but data offsets [{begin}, {end}] hold {}",
                    raw.shape,
                    end - begin
                ),
            ))
        }
        None => {
            return Err(fail(
                &name,
                format!(
                    "shape {:?} of {dtype} has no valid byte size (overflow or not a whole number of bytes)",
                    raw.shape
                ),
            ))
        }
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape: raw.shape,
        begin,
        end,
    })
}

/// The top-level JSON object as an ordered list, so duplicate keys are seen (a map would
/// silently keep the last one).
struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, serde_json::Value)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
            out.push(entry);
        }
        Ok(out)
    }
}

/// Build a safetensors file (tests, benchmarks, fuzz seeds): tensors are laid out in the
/// given order, the header padded with spaces to a multiple of 8 as the reference writer does.
pub fn build_file(tensors: &[(&str, Dtype, &[u64], &[u8])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offset = 0u64;
    for (name, dtype, shape, data) in tensors {
        let end = offset + data.len() as u64;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).expect("a JSON map always serializes");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(json: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_a_valid_file_in_offset_order() {
        let f = build_file(
            &[
                ("b", Dtype::F32, &[2], &[0; 8]),
                ("a", Dtype::BF16, &[3], &[1; 6]),
                ("s", Dtype::F64, &[], &[2; 8]),
                ("z", Dtype::I8, &[0, 4], &[]),
            ],
            &[("format", "pt")],
        );
        let h = parse_bytes(&f).unwrap();
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "s", "z"]);
        assert_eq!(h.metadata, vec![("format".into(), "pt".into())]);
        assert_eq!(h.tensors[1].begin, 8);
        assert_eq!(h.data_start() % 8, 0);
    }

    fn err(bytes: &[u8]) -> String {
        parse_bytes(bytes).unwrap_err().to_string()
    }

    #[test]
    fn names_with_control_characters_are_shown_escaped() {
        let name = "w\\u001b[31m\\u0007";
        let dup = format!(
            r#"{{"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}}}"#
        );
        let bad_shape =
            format!(r#"{{"{name}":{{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}}}"#);
        for json in [dup, bad_shape] {
            let e = err(&file_with_header(&json, &[0; 8]));
            assert!(e.contains("w\\u{1b}[31m"), "{e}");
            assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
        }
    }

    #[test]
    fn hostile_inputs_get_clear_errors() {
        let t = r#""w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
        assert!(err(b"abc").contains("shorter than the 8-byte"));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(err(&huge).contains("larger than the limit"));
        let mut long = 50u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        assert!(err(&long).contains("larger than the rest of the file"));
        assert!(err(&file_with_header("{\"w\":\u{0}", &[])).contains("not valid JSON"));
        let mut bad_utf8 = 4u64.to_le_bytes().to_vec();
        bad_utf8.extend_from_slice(b"{\"\xff\"");
        assert!(err(&bad_utf8).contains("not valid UTF-8"));
        assert!(err(&file_with_header("[]", &[])).contains("not valid JSON"));
        // truncated data
        assert!(err(&file_with_header(&format!("{{{t}}}"), &[0; 4])).contains("past the end"));
        let unknown = r#"{"w":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}"#;
        let e = err(&file_with_header(unknown, &[0; 8]));
        assert!(
            e.contains("tensor 'w'") && e.contains("unknown dtype 'F7'"),
            "{e}"
        );
        let mismatch = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let e = err(&file_with_header(mismatch, &[0; 8]));
        assert!(
            e.contains("tensor 'w'") && e.contains("needs 12 bytes"),
            "{e}"
        );
        let reversed = r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#;
        assert!(err(&file_with_header(reversed, &[0; 8])).contains("reversed"));
        let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        assert!(err(&file_with_header(overlap, &[0; 6])).contains("overlap"));
        let gap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
        assert!(err(&file_with_header(gap, &[0; 6])).contains("gap"));
        assert!(err(&file_with_header(&format!("{{{t}}}"), &[0; 9])).contains("trailing"));
        let dup = format!("{{{t},{t}}}");
        assert!(err(&file_with_header(&dup, &[0; 8])).contains("appears twice"));
        let overflow =
            r#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        assert!(err(&file_with_header(overflow, &[0; 8])).contains("no valid byte size"));
        let meta = r#"{"__metadata__":{"a":1}}"#;
        assert!(err(&file_with_header(meta, &[])).contains("__metadata__"));
        let extra = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}"#;
        assert!(err(&file_with_header(extra, &[0])).contains("unknown field"));
        let neg = r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#;
        assert!(err(&file_with_header(neg, &[0])).contains("tensor 'w'"));
        assert!(err(&file_with_header("{} x", &[])).contains("not valid JSON"));
    }

    #[test]
    fn padding_after_the_json_is_accepted() {
        let h = parse_bytes(&file_with_header("{}      ", &[])).unwrap();
        assert!(h.tensors.is_empty());
        assert_eq!(h.json_len, 8);
    }
}
