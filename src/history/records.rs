//! The small text files in a checkpoint's git tree: `manifest`, `train` and `eval/<task>`,
//! their canonical serialisation, and validation of names and eval result files.
//!
//! Every record is a JSON object with a `schema` version. It is written canonically (keys
//! sorted at every level, two-space indentation, a final newline) so that identical content
//! always gives identical git blobs, trees and therefore checkpoint ids. Unknown fields are
//! kept (`extra`) so later versions can add information without breaking older readers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{FileEntry, ObjectId};

use super::HistoryError;

/// The schema version of manifests, train and eval records written by this version.
pub const SCHEMA_VERSION: u64 = 1;

/// The newest manifest schema this version reads and writes. Schema 2 adds `torchbin` file
/// entries; a manifest without one is still written as schema 1 (so its checkpoint id and
/// older coins are unaffected), one with one as schema 2 (so an older coin says "upgrade"
/// instead of failing on an unknown entry kind).
pub const MANIFEST_SCHEMA_VERSION: u64 = 2;

/// The marker every manifest carries, so coin can tell its commits from other commits.
pub const MANIFEST_FORMAT: &str = "coin.manifest";

/// What a checkpoint holds: the adapter's files as store objects, plus what is known about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Schema version ([`SCHEMA_VERSION`] when written by this version).
    pub schema: u64,
    /// The adapter kind and its configuration, when known (from `adapter_config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterInfo>,
    /// The base model the adapter applies to, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<BaseModel>,
    /// Every committed file: relative path (`/`-separated) → store entry.
    pub files: BTreeMap<String, FileEntry>,
    /// Fields written by later versions, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The adapter kind (`lora`, `moelora`, ...) and its configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    /// Lower-case adapter kind, e.g. `lora` (from PEFT's `peft_type`), or `unknown`.
    pub kind: String,
    /// The adapter configuration as found in `adapter_config.json`.
    pub config: Value,
}

/// Identity of the base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// A human name, e.g. `llava-v1.5-7b`.
    pub name: String,
    /// The blake3 id of the base model's manifest, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ObjectId>,
}

/// The store objects one file entry references (its header and tensors, or its blob).
pub fn entry_object_ids(entry: &FileEntry) -> Vec<ObjectId> {
    entry.object_ids()
}

impl Manifest {
    /// An empty manifest of the current schema.
    pub fn new() -> Self {
        Manifest {
            format: MANIFEST_FORMAT.to_string(),
            schema: SCHEMA_VERSION,
            adapter: None,
            base_model: None,
            files: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// The lowest schema that can express this manifest: 2 when a file is a `torchbin`
    /// entry, else 1.
    pub fn required_schema(&self) -> u64 {
        if self
            .files
            .values()
            .any(|e| matches!(e, FileEntry::Torchbin { .. }))
        {
            MANIFEST_SCHEMA_VERSION
        } else {
            SCHEMA_VERSION
        }
    }

    /// Every store object this manifest references (headers, tensors, blobs).
    pub fn object_ids(&self) -> Vec<ObjectId> {
        self.files.values().flat_map(entry_object_ids).collect()
    }

    /// The sum of the sizes of all files (what a checkout writes).
    pub fn logical_bytes(&self) -> u64 {
        self.files.values().map(FileEntry::size).sum()
    }
}

impl Default for Manifest {
    fn default() -> Self {
        Self::new()
    }
}

/// What is known about how a checkpoint was made. Later issues add fields (dataset identity,
/// hyperparameters, seed, loss summary, ...); they land in `extra` for older readers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Schema version.
    pub schema: u64,
    /// The task this checkpoint was trained on.
    pub task: String,
    /// The user's message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The coin version that made the commit.
    pub coin_version: String,
    /// Everything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The prefix of a general-knowledge record's task: `GK:<task>` holds the LLM judge's score of
/// the checkpoint's answers on `<task>` (CoIN's second axis), beside `<task>`'s accuracy.
pub const GK_PREFIX: &str = "GK:";

/// The metric every `GK:` record carries.
pub const GK_METRIC: &str = "general_knowledge";

/// The record fields that name store objects: the answers (`predictions`) and, for a
/// general-knowledge record, the judge's replies (`replies`).
pub const OBJECT_FIELDS: [&str; 2] = ["predictions", "replies"];

/// The task name of a general-knowledge record: `GK:<task>`.
pub fn gk_task(task: &str) -> String {
    format!("{GK_PREFIX}{task}")
}

/// The task a `GK:<task>` record judges; `None` for any other record.
pub fn gk_base_task(task: &str) -> Option<&str> {
    task.strip_prefix(GK_PREFIX)
}

/// One evaluation result of a checkpoint on one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The metric name, e.g. `accuracy`.
    pub metric: String,
    /// The score, 0–100.
    pub score: f64,
    /// How many samples were scored.
    pub n: u64,
    /// Optional fields (eval-set hash, decoding settings, scorer mode, predictions blob id, ...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl EvalRecord {
    /// Store objects this record references (the `predictions` and `replies` blob ids, when
    /// present).
    pub fn object_ids(&self) -> Vec<ObjectId> {
        OBJECT_FIELDS
            .iter()
            .filter_map(|f| match self.extra.get(*f) {
                Some(Value::String(s)) => s.parse::<ObjectId>().ok(),
                _ => None,
            })
            .collect()
    }

    /// What every stored record must satisfy (checked on every read).
    fn validate(&self, task: &str) -> Result<(), String> {
        let task = task.escape_debug();
        if self.metric.trim().is_empty() {
            return Err(format!("task '{task}': \"metric\" is empty"));
        }
        if !self.score.is_finite() || !(0.0..=100.0).contains(&self.score) {
            return Err(format!(
                "task '{task}': \"score\" must be between 0 and 100, got {}",
                self.score
            ));
        }
        for field in OBJECT_FIELDS {
            if let Some(p) = self.extra.get(field) {
                let ok = p.as_str().is_some_and(|s| s.parse::<ObjectId>().is_ok());
                if !ok {
                    return Err(format!(
                        "task '{task}': \"{field}\" must be a store object id (64 lowercase \
                         hex digits), got {}",
                        shown_value(p)
                    ));
                }
            }
        }
        Ok(())
    }

    /// What a record must satisfy to be written: [`EvalRecord::validate`] plus a score over
    /// at least one sample (a score over none is not a result), and for a `GK:<task>` record
    /// a task after the prefix and the metric [`GK_METRIC`].
    pub fn validate_new(&self, task: &str) -> Result<(), String> {
        self.validate(task)?;
        if self.n == 0 {
            return Err(format!(
                "task '{}': \"n\" is 0; a score needs at least one scored sample",
                task.escape_debug()
            ));
        }
        if let Some(base) = gk_base_task(task) {
            if base.is_empty() || gk_base_task(base).is_some() {
                return Err(format!(
                    "task '{}': a general-knowledge record is named {GK_PREFIX}<task>, with the \
                     judged task after the prefix",
                    task.escape_debug()
                ));
            }
            if self.metric != GK_METRIC {
                return Err(format!(
                    "task '{}': a {GK_PREFIX} record holds the metric \"{GK_METRIC}\", not \"{}\"",
                    task.escape_debug(),
                    self.metric.escape_debug()
                ));
            }
        }
        Ok(())
    }
}

/// The eval records attached later to a checkpoint, kept in a git note (`refs/notes/coin`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NoteRecord {
    /// Schema version.
    pub schema: u64,
    /// Task → record.
    #[serde(default)]
    pub eval: BTreeMap<String, EvalRecord>,
    /// Everything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Sort the keys of every object in `v`, recursively.
fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// The canonical text of a record: sorted keys, two-space indentation, final newline.
pub fn to_canonical_json<T: Serialize>(value: &T) -> Result<String, HistoryError> {
    let v = serde_json::to_value(value).map_err(|e| HistoryError::Record {
        what: "record".to_string(),
        message: e.to_string(),
    })?;
    let mut s = serde_json::to_string_pretty(&sort_keys(v)).map_err(|e| HistoryError::Record {
        what: "record".to_string(),
        message: e.to_string(),
    })?;
    s.push('\n');
    Ok(s)
}

fn bad(what: &str, message: impl Into<String>) -> HistoryError {
    HistoryError::Record {
        what: what.to_string(),
        message: message.into(),
    }
}

/// Parse and validate a manifest (the `manifest` file of a checkpoint tree). Never panics, on
/// any input; this is the fuzz target of the history side.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, HistoryError> {
    let m: Manifest =
        serde_json::from_slice(bytes).map_err(|e| bad("manifest", format!("not valid: {e}")))?;
    if m.format != MANIFEST_FORMAT {
        return Err(bad(
            "manifest",
            format!("format is '{}', expected '{MANIFEST_FORMAT}'", m.format),
        ));
    }
    if m.schema == 0 || m.schema > MANIFEST_SCHEMA_VERSION {
        return Err(bad(
            "manifest",
            format!(
                "schema version {} is not supported by this coin (which reads 1..={MANIFEST_SCHEMA_VERSION}); upgrade coin",
                m.schema
            ),
        ));
    }
    if m.schema < m.required_schema() {
        return Err(bad(
            "manifest",
            format!(
                "schema version {} cannot hold 'torchbin' file entries (schema {MANIFEST_SCHEMA_VERSION} can)",
                m.schema
            ),
        ));
    }
    validate_manifest_paths(m.files.keys()).map_err(|e| bad("manifest", e))?;
    for (path, entry) in &m.files {
        entry
            .check()
            .map_err(|e| bad("manifest", format!("'{}': {e}", path.escape_debug())))?;
    }
    Ok(m)
}

/// Parse a `train` record.
pub fn parse_train(bytes: &[u8]) -> Result<TrainRecord, HistoryError> {
    serde_json::from_slice(bytes).map_err(|e| bad("train record", format!("not valid: {e}")))
}

/// Parse one `eval/<task>` record.
pub fn parse_eval_record(task: &str, bytes: &[u8]) -> Result<EvalRecord, HistoryError> {
    let r: EvalRecord = serde_json::from_slice(bytes)
        .map_err(|e| bad(&format!("eval record '{task}'"), format!("not valid: {e}")))?;
    r.validate(task)
        .map_err(|e| bad(&format!("eval record '{task}'"), e))?;
    Ok(r)
}

/// Parse a note (eval records attached later).
pub fn parse_note(bytes: &[u8]) -> Result<NoteRecord, HistoryError> {
    let n: NoteRecord =
        serde_json::from_slice(bytes).map_err(|e| bad("eval note", format!("not valid: {e}")))?;
    for (task, r) in &n.eval {
        validate_task_name(task).map_err(|e| bad("eval note", e))?;
        r.validate(task).map_err(|e| bad("eval note", e))?;
    }
    Ok(n)
}

/// A JSON value for an error message: short, escaped.
fn shown_value(v: &Value) -> String {
    let s = v.to_string();
    let short: String = s.chars().take(80).collect();
    let more = if short.len() < s.len() { "…" } else { "" };
    format!("{}{more}", short.escape_debug())
}

/// Refuse JSON text in which an object has the same key twice, at any depth (serde_json keeps
/// the last one silently, so `{"A": {...}, "A": {...}}` would drop a result unseen).
pub fn reject_duplicate_keys(text: &str) -> Result<(), String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Walk;
    impl<'de> DeserializeSeed<'de> for Walk {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(Walk)
        }
    }
    impl<'de> Visitor<'de> for Walk {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::BTreeSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key.clone()) {
                    return Err(serde::de::Error::custom(format!(
                        "the key \"{}\" appears twice in one object",
                        key.escape_debug()
                    )));
                }
                map.next_value_seed(Walk)?;
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    Walk.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

/// Parse an eval results file: `{"<task>": {"metric": "...", "score": 0-100, "n": N}, ...}`.
/// Errors name the task and field that is wrong; a key given twice is refused.
pub fn parse_eval_file(text: &str) -> Result<BTreeMap<String, EvalRecord>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    reject_duplicate_keys(text)?;
    let Value::Object(map) = v else {
        return Err(
            "expected a JSON object {\"<task>\": {\"metric\": ..., \"score\": ..., \"n\": ...}}"
                .to_string(),
        );
    };
    if map.is_empty() {
        return Err("holds no results".to_string());
    }
    let mut out = BTreeMap::new();
    for (task, rec) in map {
        validate_task_name(&task)?;
        if !rec.is_object() {
            return Err(format!("task '{task}': expected an object"));
        }
        for field in ["metric", "score", "n"] {
            if rec.get(field).is_none() {
                return Err(format!("task '{task}': missing \"{field}\""));
            }
        }
        let r: EvalRecord =
            serde_json::from_value(rec).map_err(|e| format!("task '{task}': {e}"))?;
        r.validate_new(&task)?;
        out.insert(task, r);
    }
    Ok(out)
}

/// Check a task name: it becomes a file name in the checkpoint tree (`eval/<task>`).
pub fn validate_task_name(task: &str) -> Result<(), String> {
    if task.is_empty() {
        return Err("a task name must not be empty".to_string());
    }
    if task.len() > 200 {
        return Err(format!("task name '{task}' is longer than 200 bytes"));
    }
    if task.starts_with('.') {
        return Err(format!("task name '{task}' must not start with '.'"));
    }
    if task
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "task name '{}' must not contain '/', '\\' or control characters",
            task.escape_debug()
        ));
    }
    Ok(())
}

/// Check a file path recorded in a manifest with the store's one path validator
/// ([`crate::store::check_relative_path`]): relative, `/`-separated, no `.`/`..`/empty parts,
/// no `.git` component in any spelling, no control characters.
pub fn validate_rel_path(path: &str) -> Result<(), String> {
    crate::store::check_relative_path(path).map_err(|e| e.to_string())
}

/// Most files one manifest may list.
pub const MAX_MANIFEST_FILES: usize = 1_000_000;

/// Check a manifest's set of paths as a whole: every path valid, and no two paths that cannot
/// both exist in one folder (`a` and `a/b`; names equal but for letter case, which clash on
/// macOS and Windows).
pub fn validate_manifest_paths<'a>(
    paths: impl IntoIterator<Item = &'a String>,
) -> Result<(), String> {
    let mut files: BTreeMap<String, &str> = BTreeMap::new();
    let mut dirs: BTreeMap<String, &str> = BTreeMap::new();
    let mut count = 0usize;
    for path in paths {
        count += 1;
        if count > MAX_MANIFEST_FILES {
            return Err(format!("more than {MAX_MANIFEST_FILES} files"));
        }
        validate_rel_path(path)?;
        let folded = path.to_lowercase();
        if let Some(other) = files.insert(folded.clone(), path) {
            return Err(format!(
                "file paths '{}' and '{}' differ only in letter case",
                other.escape_debug(),
                path.escape_debug()
            ));
        }
        // Every folder the path needs: "a/b/c" needs "a" and "a/b".
        let mut end = 0;
        while let Some(i) = folded[end..].find('/') {
            end += i;
            dirs.entry(folded[..end].to_string()).or_insert(path);
            end += 1;
        }
    }
    for (dir, under) in &dirs {
        if let Some(file) = files.get(dir) {
            return Err(format!(
                "'{}' is a file, but '{}' needs it to be a folder",
                file.escape_debug(),
                under.escape_debug()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v = serde_json::json!({"b": 1, "a": {"z": [ {"y": 1, "x": 2} ], "c": null}});
        let s = to_canonical_json(&v).unwrap();
        assert_eq!(
            s,
            "{\n  \"a\": {\n    \"c\": null,\n    \"z\": [\n      {\n        \"x\": 2,\n        \"y\": 1\n      }\n    ]\n  },\n  \"b\": 1\n}\n"
        );
    }

    #[test]
    fn manifest_round_trips_and_is_canonical() {
        let mut m = Manifest::new();
        m.adapter = Some(AdapterInfo {
            kind: "lora".into(),
            config: serde_json::json!({"r": 8, "peft_type": "LORA"}),
        });
        m.extra.insert("later".into(), serde_json::json!({"k": 1}));
        let text = to_canonical_json(&m).unwrap();
        let back = parse_manifest(text.as_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(to_canonical_json(&back).unwrap(), text);
    }

    #[test]
    fn manifest_rejects_bad_input() {
        for bad in [
            &b""[..],
            b"{}",
            b"[1,2]",
            b"\xff\xfe",
            br#"{"format":"other","schema":1,"files":{}}"#,
            br#"{"format":"coin.manifest","schema":99,"files":{}}"#,
            br#"{"format":"coin.manifest","schema":1,"files":{"../x":{"kind":"blob"}}}"#,
        ] {
            assert!(
                parse_manifest(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_manifest(br#"{"format":"coin.manifest","schema":1,"files":{}}"#).is_ok());
    }

    #[test]
    fn eval_file_validation() {
        let ok = parse_eval_file(
            r#"{"ScienceQA": {"metric": "accuracy", "score": 71.5, "n": 10, "extra": true}}"#,
        )
        .unwrap();
        assert_eq!(ok["ScienceQA"].score, 71.5);
        assert_eq!(ok["ScienceQA"].extra["extra"], serde_json::json!(true));
        let cases = [
            ("not json", "not valid JSON"),
            ("[]", "expected a JSON object"),
            ("{}", "no results"),
            (r#"{"A": 3}"#, "expected an object"),
            (r#"{"A": {"metric": "acc", "n": 1}}"#, "missing \"score\""),
            (
                r#"{"A": {"metric": "acc", "score": 101, "n": 1}}"#,
                "between 0 and 100",
            ),
            (
                r#"{"A": {"metric": "acc", "score": 1, "n": -1}}"#,
                "task 'A'",
            ),
            (
                r#"{"A": {"metric": "acc", "score": "x", "n": 1}}"#,
                "task 'A'",
            ),
            (
                r#"{"a/b": {"metric": "acc", "score": 1, "n": 1}}"#,
                "must not contain",
            ),
            (
                r#"{"": {"metric": "acc", "score": 1, "n": 1}}"#,
                "must not be empty",
            ),
        ];
        for (text, expect) in cases {
            let err = parse_eval_file(text).unwrap_err();
            assert!(err.contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn hostile_eval_files_are_refused() {
        let id = "ab".repeat(32);
        let cases = [
            (
                r#"{"A": {"metric": "acc", "score": 1, "n": 1}, "A": {"metric": "acc", "score": 99, "n": 1}}"#.to_string(),
                "appears twice",
            ),
            (
                r#"{"A": {"metric": "acc", "score": 1, "score": 2, "n": 1}}"#.to_string(),
                "appears twice",
            ),
            (
                r#"{"A": {"metric": "acc", "score": 100, "n": 0}}"#.to_string(),
                "at least one",
            ),
            (
                r#"{"A": {"metric": "acc", "score": 1, "n": 1, "predictions": "zz"}}"#.to_string(),
                "store object id",
            ),
            (
                r#"{"A": {"metric": "acc", "score": 1, "n": 1, "predictions": 7}}"#.to_string(),
                "store object id",
            ),
        ];
        for (text, expect) in cases {
            let err = parse_eval_file(&text).unwrap_err();
            assert!(err.contains(expect), "{text}: {err}");
        }
        let gk_cases = [
            (
                r#"{"GK:": {"metric": "general_knowledge", "score": 1, "n": 1}}"#,
                "judged task after the prefix",
            ),
            (
                r#"{"GK:GK:A": {"metric": "general_knowledge", "score": 1, "n": 1}}"#,
                "judged task after the prefix",
            ),
            (
                r#"{"GK:A": {"metric": "accuracy", "score": 1, "n": 1}}"#,
                "holds the metric \"general_knowledge\"",
            ),
            (
                r#"{"GK:A": {"metric": "general_knowledge", "score": 1, "n": 1, "replies": "x"}}"#,
                "\"replies\" must be a store object id",
            ),
        ];
        for (text, expect) in gk_cases {
            let err = parse_eval_file(text).unwrap_err();
            assert!(err.contains(expect), "{text}: {err}");
        }
        let gk = parse_eval_file(&format!(
            r#"{{"GK:ScienceQA": {{"metric": "general_knowledge", "score": 43.3, "n": 3, "replies": "{id}", "predictions": "{}"}}}}"#,
            "cd".repeat(32)
        ))
        .unwrap();
        let ids: Vec<String> = gk["GK:ScienceQA"]
            .object_ids()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ids, vec!["cd".repeat(32), id.clone()]);
        assert_eq!(gk_base_task(&gk_task("GQA")), Some("GQA"));
        assert_eq!(gk_base_task("GQA"), None);
        let ok = format!(
            r#"{{"A": {{"metric": "acc", "score": 1, "n": 1, "predictions": "{id}", "x": [{{"a": 1}}, {{"a": 2}}]}}}}"#
        );
        parse_eval_file(&ok).unwrap();
        assert!(reject_duplicate_keys(r#"[{"a": 1, "b": {"c": 1, "c": 2}}]"#).is_err());
        assert!(reject_duplicate_keys(r#"{"a": 1} x"#).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_manifest_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_manifest(&bytes);
        }

        #[test]
        fn parse_eval_file_never_panics(text in ".{0,200}") {
            let _ = parse_eval_file(&text);
        }

        #[test]
        fn manifest_fuzz_body_holds(paths in proptest::collection::vec("[a-zA-Z./~ \u{200c}:]{1,12}", 1..5)) {
            let files: serde_json::Map<String, Value> = paths
                .iter()
                .map(|p| (p.clone(), serde_json::json!({"kind": "blob", "id": "ab".repeat(32), "size": 1})))
                .collect();
            let text = serde_json::json!({"format": MANIFEST_FORMAT, "schema": 1, "files": files}).to_string();
            crate::history::fuzz_manifest(text.as_bytes());
        }

        #[test]
        fn path_fuzz_body_holds(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            crate::store::fuzz::relative_path(&bytes);
        }
    }

    #[test]
    fn torchbin_entries_need_manifest_schema_2() {
        let id = "ab".repeat(32);
        let torchbin = serde_json::json!({
            "kind": "torchbin", "layout": id, "size": 100, "file_hash": id,
            "storages": [{"key": "0", "dtype": "F32", "offset": 40, "bytes": 16, "id": id}],
            "tensors": [{"name": "w", "dtype": "F32", "shape": [2, 2], "strides": [2, 1],
                         "storage": "0", "offset": 0}],
        });
        let manifest = |schema: u64, entry: &Value| {
            serde_json::json!({"format": MANIFEST_FORMAT, "schema": schema,
                               "files": {"adapter_model.bin": entry}})
            .to_string()
        };
        let m = parse_manifest(manifest(2, &torchbin).as_bytes()).unwrap();
        assert_eq!(m.required_schema(), 2);
        assert_eq!(m.object_ids().len(), 2);
        let e = parse_manifest(manifest(1, &torchbin).as_bytes()).unwrap_err();
        assert!(e.to_string().contains("cannot hold 'torchbin'"), "{e}");
        let e = parse_manifest(manifest(3, &torchbin).as_bytes()).unwrap_err();
        assert!(e.to_string().contains("upgrade coin"), "{e}");
        // Old manifests still read, and a manifest without torchbin stays schema 1.
        let blob = serde_json::json!({"kind": "blob", "id": id, "size": 1});
        let m = parse_manifest(manifest(1, &blob).as_bytes()).unwrap();
        assert_eq!(m.required_schema(), 1);
        // An entry that lies about its storages is refused on read.
        let mut bad = torchbin.clone();
        bad["storages"][0]["offset"] = serde_json::json!(90);
        let e = parse_manifest(manifest(2, &bad).as_bytes()).unwrap_err();
        assert!(e.to_string().contains("beyond the file"), "{e}");
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let entry = format!(
            r#"{{"kind": "blob", "id": "{}", "size": 1}}"#,
            "ab".repeat(32)
        );
        let tensor = |name: &str, bytes: u64| {
            format!(
                r#"{{"kind": "safetensors", "header": "{}", "size": 100, "tensors": [{{"name": "{name}", "dtype": "F32", "shape": [2], "id": "{}", "bytes": {bytes}}}]}}"#,
                "cd".repeat(32),
                "ef".repeat(32)
            )
        };
        let manifest = |files: &str| {
            format!(r#"{{"format": "coin.manifest", "schema": 1, "files": {{{files}}}}}"#)
        };
        for (files, why) in [
            (format!(r#"".git/config": {entry}"#), ".git"),
            (format!(r#""a/.Git/hooks/x": {entry}"#), ".git"),
            (
                format!(r#""a": {entry}, "a/b": {entry}"#),
                "needs it to be a folder",
            ),
            (
                format!(r#""A.json": {entry}, "a.JSON": {entry}"#),
                "letter case",
            ),
            (format!(r#""w": {}"#, tensor("x", 9)), "do not hold"),
        ] {
            let err = parse_manifest(manifest(&files).as_bytes()).unwrap_err();
            assert!(err.to_string().contains(why), "{files}: {err}");
        }
        parse_manifest(manifest(&format!(r#""w": {}"#, tensor("x", 8))).as_bytes()).unwrap();
        crate::history::fuzz_manifest(
            manifest(&format!(r#""a/b": {entry}, "a/c": {entry}"#)).as_bytes(),
        );
    }

    #[test]
    fn rel_paths() {
        assert!(validate_rel_path("a/b.safetensors").is_ok());
        for p in ["", "/a", "a//b", "a/../b", "./a", "a\\b", "a/"] {
            assert!(validate_rel_path(p).is_err(), "{p}");
        }
    }
}
