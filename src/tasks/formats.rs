//! Readers for CoIN's data files.
//!
//! - `train.json`: a JSON list of LLaVA conversation records ([`TrainRecord`]).
//! - `test.json` / `val.json`: a JSON list of [`TestRecord`] (`question_id`, `image`, `text` whose
//!   last line is the instruction, `answer`; Grounding has `answer_bbox` and `size`).
//! - answer files: JSONL, one [`AnswerRecord`] per line, as written by CoIN's `model_*.py`.
//!
//! JSON lists are read element by element (a 400 MB `train.json` never sits in memory as one
//! `Value`), and a broken element is reported with its file and index.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::de::{DeserializeOwned, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::TaskError;

/// A question id as written in a CoIN file: a string or an integer. Compared by its text, so
/// `5` and `"5"` are the same question.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Qid(pub String);

impl fmt::Display for Qid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Qid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(Qid(s)),
            serde_json::Value::Number(n) => Ok(Qid(n.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "question_id must be a string or a number, not {other}"
            ))),
        }
    }
}

/// A value that CoIN writes as a string but that sometimes is a number (answers like `2`).
fn de_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        Some(serde_json::Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected a string, found {other}"
        ))),
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
    #[serde(default)]
    pub answer_id: serde_json::Value,
    /// The model name.
    #[serde(default)]
    pub model_id: serde_json::Value,
    /// Anything else.
    #[serde(default)]
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

struct EachSeed<'a, T, F> {
    f: &'a mut F,
    count: usize,
    failure: Option<TaskError>,
    path: &'a Path,
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
            match seq.next_element::<T>() {
                Ok(Some(item)) => {
                    self.count += 1;
                    if let Err(e) = (self.f)(index, item) {
                        self.failure = Some(e);
                        return Err(serde::de::Error::custom("stopped"));
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.failure = Some(TaskError::Record {
                        path: self.path.to_path_buf(),
                        index,
                        message: e.to_string(),
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

/// Stream the elements of a JSON list from `reader`, calling `f(index, item)` for each.
/// Returns the number of elements. `path` names the source in errors.
pub fn for_each_in_json_list<T, R, F>(reader: R, path: &Path, mut f: F) -> Result<usize, TaskError>
where
    T: DeserializeOwned,
    R: Read,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut seed = EachSeed {
        f: &mut f,
        count: 0,
        failure: None,
        path,
        _t: std::marker::PhantomData,
    };
    let res = (&mut seed).deserialize(&mut de);
    if let Some(failure) = seed.failure.take() {
        return Err(failure);
    }
    res.and_then(|()| de.end()).map_err(|e| TaskError::Format {
        path: path.to_path_buf(),
        what: "JSON list",
        message: e.to_string(),
    })?;
    Ok(seed.count)
}

/// Stream a JSON-list file.
pub fn for_each_in_file<T, F>(path: &Path, f: F) -> Result<usize, TaskError>
where
    T: DeserializeOwned,
    F: FnMut(usize, T) -> Result<(), TaskError>,
{
    for_each_in_json_list(open(path)?, path, f)
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

/// Stream a JSONL answer file; `f(line_number, record)` (1-based). Blank lines are skipped.
pub fn for_each_answer<F>(path: &Path, mut f: F) -> Result<usize, TaskError>
where
    F: FnMut(usize, AnswerRecord) -> Result<(), TaskError>,
{
    let reader = open(path)?;
    let mut n = 0;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| TaskError::io("read", path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: AnswerRecord = serde_json::from_str(&line).map_err(|e| TaskError::Record {
            path: path.to_path_buf(),
            index: i + 1,
            message: e.to_string(),
        })?;
        f(i + 1, rec)?;
        n += 1;
    }
    Ok(n)
}

/// Read a whole answer file.
pub fn read_answer_file(path: &Path) -> Result<Vec<AnswerRecord>, TaskError> {
    let mut out = Vec::new();
    for_each_answer(path, |_, r| {
        out.push(r);
        Ok(())
    })?;
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
        assert_eq!(recs[0].question_id, Qid("12".into()));
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
        assert!(err.contains("record 2"), "{err}");
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
