//! One scorer per CoIN task, each in two modes.
//!
//! - [`ScoreMode::Compat`] computes what CoIN's Python scorers compute, quirks included, so
//!   numbers compare with published ones.
//! - [`ScoreMode::Strict`] computes the same metric with the quirks fixed.
//!
//! Every difference is listed in docs/scoring.md; the rules are cited on each function.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::formats::{mixed_id_kinds, AnswerRecord, IdKind, PyKey, Qid, TestRecord};
use super::normalize::{normalize_answer, soft_scores};
use super::TaskError;

/// How faithfully to reproduce CoIN's scorers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ScoreMode {
    /// CoIN's numbers, quirks included.
    Compat,
    /// The same metric with the quirks fixed.
    Strict,
}

impl fmt::Display for ScoreMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScoreMode::Compat => "compat",
            ScoreMode::Strict => "strict",
        })
    }
}

impl std::str::FromStr for ScoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "compat" => Ok(ScoreMode::Compat),
            "strict" => Ok(ScoreMode::Strict),
            _ => Err(format!(
                "unknown scoring mode '{s}' (expected compat or strict)"
            )),
        }
    }
}

/// The eight CoIN scorers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScorerKind {
    /// Letter answers to multiple-choice problems.
    ScienceQA,
    /// Reading text; soft VQA accuracy over 10 human answers.
    TextVQA,
    /// Naming the object class.
    ImageNet,
    /// Compositional questions; exact match.
    GQA,
    /// Questions about blind users' photos; exact match in CoIN.
    VizWiz,
    /// Referring-expression boxes; IoU > 0.5.
    Grounding,
    /// VQA v2; exact match in CoIN.
    VQAv2,
    /// Book covers; exact match.
    OCRVQA,
}

impl ScorerKind {
    /// All eight, in CoIN's default order.
    pub const ALL: [ScorerKind; 8] = [
        ScorerKind::ScienceQA,
        ScorerKind::TextVQA,
        ScorerKind::ImageNet,
        ScorerKind::GQA,
        ScorerKind::VizWiz,
        ScorerKind::Grounding,
        ScorerKind::VQAv2,
        ScorerKind::OCRVQA,
    ];

    /// The canonical task name.
    pub fn name(self) -> &'static str {
        match self {
            ScorerKind::ScienceQA => "ScienceQA",
            ScorerKind::TextVQA => "TextVQA",
            ScorerKind::ImageNet => "ImageNet",
            ScorerKind::GQA => "GQA",
            ScorerKind::VizWiz => "VizWiz",
            ScorerKind::Grounding => "Grounding",
            ScorerKind::VQAv2 => "VQAv2",
            ScorerKind::OCRVQA => "OCR-VQA",
        }
    }

    /// Parse a task or scorer name: case-insensitive, `-`, `_` and spaces ignored, CoIN's
    /// spellings accepted (`OCRVQA`, `OCR-VQA`, `vqav2`, `Science`, `ImagetNet`, …).
    pub fn from_name(name: &str) -> Option<Self> {
        let key: String = name
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .flat_map(char::to_lowercase)
            .collect();
        Some(match key.as_str() {
            "scienceqa" | "science" | "sqa" => ScorerKind::ScienceQA,
            "textvqa" => ScorerKind::TextVQA,
            "imagenet" | "imagetnet" => ScorerKind::ImageNet,
            "gqa" => ScorerKind::GQA,
            "vizwiz" => ScorerKind::VizWiz,
            "grounding" | "refcoco" => ScorerKind::Grounding,
            "vqav2" | "vqa2" => ScorerKind::VQAv2,
            "ocrvqa" => ScorerKind::OCRVQA,
            _ => return None,
        })
    }

    /// What the score measures.
    pub fn metric(self) -> &'static str {
        match self {
            ScorerKind::TextVQA => "vqa_accuracy",
            ScorerKind::Grounding => "iou>0.5",
            _ => "accuracy",
        }
    }

    /// How CoIN's scorer for this task matches an answer line to its question, and where.
    pub fn compat_id_match(self) -> (IdMatch, &'static str) {
        match self {
            ScorerKind::ScienceQA => (IdMatch::AsWritten, "eval_science_qa.py L46, L58"),
            ScorerKind::TextVQA => (IdMatch::Str, "eval_textvqa.py L37, L42"),
            ScorerKind::ImageNet => (IdMatch::Position, "eval_ImagetNet.py L23-26"),
            ScorerKind::GQA => (IdMatch::AsWritten, "eval_gqa.py L135, L349"),
            ScorerKind::VizWiz => (IdMatch::AsWritten, "eval_vizwiz.py L18, L25"),
            ScorerKind::Grounding => (IdMatch::AsWritten, "eval_grounding.py L55, L62"),
            ScorerKind::VQAv2 => (IdMatch::Str, "eval_vqav2.py L19, L25"),
            ScorerKind::OCRVQA => (IdMatch::AsWritten, "eval_ocrvqa.py L18, L25"),
        }
    }

    /// What `--annotations` must be for this task, if it takes one.
    pub fn annotations_hint(self) -> Option<&'static str> {
        match self {
            ScorerKind::ScienceQA => {
                Some("the ScienceQA folder with problems.json and pid_splits.json")
            }
            ScorerKind::TextVQA => Some("TextVQA_0.5.1_val.json"),
            ScorerKind::GQA => Some("testdev_balanced_questions.json"),
            _ => None,
        }
    }
}

/// How a CoIN scorer finds the question of an answer line (see [`ScorerKind::compat_id_match`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdMatch {
    /// A Python dict lookup with the id as parsed from JSON: `132` and `"132"` differ, `132`
    /// and `132.0` are equal ([`Qid::py_key`]).
    AsWritten,
    /// `str()` on both sides: `132` and `"132"` are equal, `132.0` is `"132.0"` ([`Qid::py_str`]).
    Str,
    /// By line number; the ids are not read.
    Position,
}

/// The key a compat scorer looks `id` up by.
fn compat_key(kind: ScorerKind, id: &Qid) -> PyKey {
    match kind.compat_id_match().0 {
        IdMatch::Str => PyKey::Str(id.py_str()),
        IdMatch::AsWritten | IdMatch::Position => id.py_key(),
    }
}

/// A warning for an answer file whose ids CoIN's scorer would treat unlike coin's strict mode:
/// ids written both as strings and as numbers, or (compat ScienceQA) numbers at all, which
/// CoIN never matches to a problem id. `None` when there is nothing to say. The text names
/// `file`.
pub fn id_warning(
    kind: ScorerKind,
    mode: ScoreMode,
    answers: &[AnswerRecord],
    file: &Path,
) -> Option<String> {
    let (how, source) = kind.compat_id_match();
    let file = file.display();
    let mixed = mixed_id_kinds(answers.iter().map(|a| &a.question_id));
    if mode == ScoreMode::Compat && kind == ScorerKind::ScienceQA {
        let numbers = answers
            .iter()
            .filter(|a| a.question_id.kind() != IdKind::Text)
            .count();
        if numbers > 0 {
            return Some(format!(
                "{numbers} answer line(s) of '{file}' have a number as question_id; CoIN's \
                 {source} looks problem ids (strings) up as written, so they count as \
                 unanswered, here too (--mode strict matches 12 and \"12\")."
            ));
        }
    }
    let (text, number) = mixed?;
    let consequence = match (mode, how) {
        (ScoreMode::Strict, _) => "strict mode treats 12 and \"12\" as the same question.",
        (ScoreMode::Compat, IdMatch::Str) => {
            "CoIN's scorer converts both sides with str(), so they still match."
        }
        (ScoreMode::Compat, IdMatch::Position) => {
            "CoIN's scorer pairs answers with questions by line, so ids are not read."
        }
        (ScoreMode::Compat, IdMatch::AsWritten) => {
            "CoIN's scorer looks ids up as written (12 is not \"12\"), and so does compat \
             mode; --mode strict treats them alike."
        }
    };
    Some(format!(
        "'{file}' mixes question ids written as strings (\"{text}\") and as numbers ({number}) \
         [{source}]: {consequence}"
    ))
}

/// A warning for an answer file whose ids are of a type the questions file does not use, where
/// CoIN's scorer looks answers up in the questions file (VizWiz, Grounding, OCR-VQA as written;
/// VQAv2 through `str()`, so only a float such as `132.0` differs): CoIN stops there with a
/// `KeyError`, and compat mode with an error. `None` in strict mode and when the types agree.
/// The text names both files.
pub fn id_type_warning(
    kind: ScorerKind,
    mode: ScoreMode,
    questions: &[TestRecord],
    answers: &[AnswerRecord],
    answers_file: &Path,
    questions_file: &Path,
) -> Option<String> {
    let (how, source) = kind.compat_id_match();
    let looks_up_questions = matches!(
        kind,
        ScorerKind::VizWiz | ScorerKind::Grounding | ScorerKind::OCRVQA | ScorerKind::VQAv2
    );
    if mode != ScoreMode::Compat || !looks_up_questions {
        return None;
    }
    // The types the scorer tells apart.
    let class = |k: IdKind| -> &'static str {
        match (how, k) {
            (IdMatch::Str, IdKind::Float) => "a float (str() writes 12.0 as \"12.0\")",
            (IdMatch::Str, _) => "a string or an integer",
            (_, k) => k.describe(),
        }
    };
    let known: HashSet<&str> = questions
        .iter()
        .map(|q| class(q.question_id.kind()))
        .collect();
    let odd = answers
        .iter()
        .find(|a| !known.contains(class(a.question_id.kind())))?;
    Some(format!(
        "'{}' writes question id {} as {}, and no id of '{}' is written so [{source}]: CoIN's \
         scorer stops there with a KeyError, and so does compat mode (--mode strict matches \
         ids by their text).",
        answers_file.display(),
        odd.question_id,
        class(odd.question_id.kind()),
        questions_file.display()
    ))
}

/// One ScienceQA problem from `problems.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct SqaProblem {
    /// The number of choices (only the count is used; the choices are not kept).
    #[serde(rename = "choices", deserialize_with = "count_list")]
    pub n_choices: usize,
    /// Index of the correct choice.
    pub answer: usize,
}

/// The length of a JSON list, its elements skipped without being built.
fn count_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    Ok(Vec::<serde::de::IgnoredAny>::deserialize(d)?.len())
}

/// One question of GQA's `testdev_balanced_questions.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct GqaQuestion {
    /// The answer.
    pub answer: String,
    /// Whether the question belongs to the balanced set.
    #[serde(default = "yes", rename = "isBalanced")]
    pub is_balanced: bool,
}

fn yes() -> bool {
    true
}

/// Ground truth that lives outside CoIN's test files.
#[derive(Clone, Debug)]
pub enum Annotations {
    /// ScienceQA `problems.json` and the `test` list of `pid_splits.json`.
    ScienceQA {
        /// Problems by id.
        problems: HashMap<String, SqaProblem>,
        /// The test split's problem ids, in file order.
        test_ids: Vec<String>,
    },
    /// TextVQA answers by question id (`str(question_id)`, as CoIN's `eval_textvqa.py` keys them).
    TextVQA(HashMap<String, Vec<String>>),
    /// GQA questions by id.
    GQA(HashMap<String, GqaQuestion>),
}

fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<T, TaskError> {
    let f = std::fs::File::open(path).map_err(|e| TaskError::io("open", path, e))?;
    serde_json::from_reader(std::io::BufReader::new(f)).map_err(|e| TaskError::Format {
        path: path.to_path_buf(),
        what,
        message: e.to_string(),
    })
}

/// Load the annotations `kind` needs from `path` (a folder for ScienceQA, a file otherwise).
pub fn load_annotations(kind: ScorerKind, path: &Path) -> Result<Annotations, TaskError> {
    match kind {
        ScorerKind::ScienceQA => {
            let dir = if path.is_dir() {
                path.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).to_path_buf()
            };
            let problems: HashMap<String, SqaProblem> =
                read_json(&dir.join("problems.json"), "ScienceQA problems.json")?;
            // Only the test split is read; the others are skipped without being built.
            #[derive(Deserialize)]
            struct Splits {
                test: Option<Vec<Qid>>,
            }
            let splits: Splits =
                read_json(&dir.join("pid_splits.json"), "ScienceQA pid_splits.json")?;
            let test = splits.test.ok_or_else(|| TaskError::Format {
                path: dir.join("pid_splits.json"),
                what: "ScienceQA pid_splits.json",
                message: "it has no \"test\" split".into(),
            })?;
            let test_ids = test.into_iter().map(|q| q.0).collect();
            Ok(Annotations::ScienceQA { problems, test_ids })
        }
        ScorerKind::TextVQA => {
            #[derive(Deserialize)]
            struct File {
                data: Vec<Entry>,
            }
            #[derive(Deserialize)]
            struct Entry {
                question_id: Qid,
                #[serde(default)]
                answers: Vec<String>,
            }
            let f: File = read_json(path, "TextVQA annotation file")?;
            Ok(Annotations::TextVQA(
                f.data
                    .into_iter()
                    .map(|e| (e.question_id.py_str(), e.answers))
                    .collect(),
            ))
        }
        ScorerKind::GQA => Ok(Annotations::GQA(read_json(path, "GQA questions file")?)),
        other => Err(TaskError::Scoring {
            task: other.name().into(),
            message: "this task takes no annotation file".into(),
        }),
    }
}

/// The score of one question (0..=1).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ItemScore {
    /// The question.
    pub question_id: Qid,
    /// 0..=1.
    pub score: f64,
}

/// The result of scoring an answer file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoreReport {
    /// Task name.
    pub task: String,
    /// What the score measures.
    pub metric: String,
    /// The scoring mode.
    pub mode: ScoreMode,
    /// 0..=100.
    pub score: f64,
    /// Number of questions in the denominator.
    pub n: usize,
    /// Per-question scores, in the order the scorer visited them.
    #[serde(skip)]
    pub items: Vec<ItemScore>,
}

/// What a scorer gets.
#[derive(Clone, Copy, Debug)]
pub struct ScoreInput<'a> {
    /// The task's test/val records.
    pub questions: &'a [TestRecord],
    /// The answer file's records.
    pub answers: &'a [AnswerRecord],
    /// Annotations, where the task uses them.
    pub annotations: Option<&'a Annotations>,
}

/// Score an answer file. No answer at all, or no question scored, is
/// [`TaskError::NothingScored`]: a score over nothing is not a score.
pub fn score(
    kind: ScorerKind,
    mode: ScoreMode,
    input: ScoreInput,
) -> Result<ScoreReport, TaskError> {
    if input.answers.is_empty() {
        // Strict mode would score every question 0 and compat ScienceQA every problem FAILED:
        // no answer at all is a mistake (a crashed run, a wrong file), not a score.
        return Err(TaskError::NothingScored {
            task: kind.name().to_string(),
            reason: "the answer file holds no answers",
        });
    }
    let items = match (kind, mode) {
        (ScorerKind::ScienceQA, ScoreMode::Compat) => scienceqa_compat(input)?,
        (ScorerKind::ScienceQA, ScoreMode::Strict) => scienceqa_strict(input)?,
        (ScorerKind::TextVQA, ScoreMode::Compat) => textvqa_compat(input)?,
        (ScorerKind::TextVQA, ScoreMode::Strict) => textvqa_strict(input)?,
        (ScorerKind::ImageNet, ScoreMode::Compat) => imagenet_compat(input)?,
        (ScorerKind::GQA, ScoreMode::Compat) => gqa_compat(input)?,
        (ScorerKind::VizWiz | ScorerKind::VQAv2, ScoreMode::Compat) => {
            per_answer(kind, input, |gt, pred| {
                gt.to_uppercase() == pred.to_uppercase()
            })?
        }
        (ScorerKind::VizWiz | ScorerKind::VQAv2, ScoreMode::Strict) => vqa_strict(kind, input)?,
        (ScorerKind::OCRVQA, ScoreMode::Compat) => per_answer(kind, input, |gt, pred| {
            !pred.contains("Unanswerable") && pred.to_lowercase() == gt.to_lowercase()
        })?,
        (ScorerKind::Grounding, ScoreMode::Compat) => grounding_compat(input)?,
        (ScorerKind::Grounding, ScoreMode::Strict) => grounding_strict(input)?,
        (ScorerKind::ImageNet | ScorerKind::GQA | ScorerKind::OCRVQA, ScoreMode::Strict) => {
            per_question(kind, input, |rec, pred| {
                let gt = gt_answer(kind, rec)?;
                let p = plain_normalize(pred);
                Ok(f64::from(u8::from(
                    !p.is_empty() && p == plain_normalize(gt),
                )))
            })?
        }
    };
    let n = items.len();
    if n == 0 {
        return Err(TaskError::NothingScored {
            task: kind.name().to_string(),
            reason: nothing_scored(kind, mode, &input),
        });
    }
    let total: f64 = items.iter().map(|i| i.score).sum();
    Ok(ScoreReport {
        task: kind.name().to_string(),
        metric: kind.metric().to_string(),
        mode,
        score: percent(kind, mode, total, n),
        n,
        items,
    })
}

/// The score in percent, computed in CoIN's order of operations in compat mode: float64
/// results differ in the last bit between `c / n * 100` and `100 * c / n` (23 of 160 is
/// 14.374999… one way and 14.375 the other), and CoIN prints them with `%.2f`, so the order
/// decides the printed number (14.37 vs 14.38).
fn percent(kind: ScorerKind, mode: ScoreMode, total: f64, n: usize) -> f64 {
    let n = n as f64;
    match (mode, kind) {
        // eval_science_qa.py L106 `correct / total * 100`; eval_gqa.py L161 + L425
        // `float(sum(l)) / len(l)` then `* 100`.
        (ScoreMode::Compat, ScorerKind::ScienceQA | ScorerKind::GQA) => total / n * 100.0,
        // eval_textvqa.py L49 `100. * evaluator.eval_pred_list(…)`, which returns
        // `sum(pred_scores) / len(pred_scores)` (m4c_evaluator.py L256).
        (ScoreMode::Compat, ScorerKind::TextVQA) => 100.0 * (total / n),
        // eval_ImagetNet.py L32, eval_vizwiz.py L31, eval_grounding.py L97, eval_vqav2.py L31,
        // eval_ocrvqa.py L32: `100. * right / total`; strict mode uses the same order.
        _ => 100.0 * total / n,
    }
}

/// Why a scorer visited no question.
fn nothing_scored(kind: ScorerKind, mode: ScoreMode, input: &ScoreInput) -> &'static str {
    match (kind, mode) {
        // Compat ScienceQA scores the test split, answered or not.
        (ScorerKind::ScienceQA, ScoreMode::Compat) => "the test split of pid_splits.json is empty",
        (ScorerKind::GQA, ScoreMode::Compat) if !input.answers.is_empty() => {
            "no answered question is a balanced question of the annotation file"
        }
        _ => "the questions file holds no questions",
    }
}

fn err(kind: ScorerKind, message: impl Into<String>) -> TaskError {
    TaskError::Scoring {
        task: kind.name().to_string(),
        message: message.into(),
    }
}

fn gt_answer(kind: ScorerKind, rec: &TestRecord) -> Result<&str, TaskError> {
    rec.answer.as_deref().ok_or_else(|| {
        err(
            kind,
            format!("question {} has no \"answer\"", rec.question_id),
        )
    })
}

/// Compat: the questions keyed as CoIN's scorer keys them ([`compat_key`]). Two questions with
/// one key: the later one wins, as in CoIN's `{q['question_id']: q for q in …}` (eval_vizwiz.py
/// L18, eval_vqav2.py L19, eval_grounding.py L55, eval_ocrvqa.py L18); [`questions_warning`]
/// says so.
fn compat_questions(kind: ScorerKind, questions: &[TestRecord]) -> HashMap<PyKey, &TestRecord> {
    questions
        .iter()
        .map(|q| (compat_key(kind, &q.question_id), q))
        .collect()
}

/// A warning for a questions file in which two records share a question id as the compat
/// scorer of `kind` keys them: CoIN's dict keeps the later record and so does compat mode.
/// `None` when there is nothing to say (or the scorer does not look questions up by id).
/// The text names `file`.
pub fn questions_warning(
    kind: ScorerKind,
    mode: ScoreMode,
    questions: &[TestRecord],
    file: &Path,
) -> Option<String> {
    let (how, source) = kind.compat_id_match();
    let by_id = matches!(
        kind,
        ScorerKind::VizWiz | ScorerKind::VQAv2 | ScorerKind::Grounding | ScorerKind::OCRVQA
    );
    if mode != ScoreMode::Compat || !by_id || how == IdMatch::Position {
        return None;
    }
    let mut seen = HashSet::with_capacity(questions.len());
    let repeated = questions
        .iter()
        .filter(|q| !seen.insert(compat_key(kind, &q.question_id)))
        .collect::<Vec<_>>();
    let first = repeated.first()?;
    Some(format!(
        "{} record(s) of '{}' repeat a question id (first: {}); CoIN's {source} keeps the \
         later record of each id, and so does compat mode.",
        repeated.len(),
        file.display(),
        first.question_id
    ))
}

/// Compat: the question of an answer line, found as CoIN finds it; a miss is CoIN's `KeyError`.
fn compat_question<'a>(
    kind: ScorerKind,
    qs: &HashMap<PyKey, &'a TestRecord>,
    id: &Qid,
) -> Result<&'a TestRecord, TaskError> {
    qs.get(&compat_key(kind, id)).copied().ok_or_else(|| {
        let (how, source) = kind.compat_id_match();
        let as_written = if how == IdMatch::AsWritten {
            format!(
                " as written ({}; CoIN's {source} matches ids without converting them, \
                 use --mode strict to match 12 and \"12\")",
                id.kind().describe()
            )
        } else {
            String::new()
        };
        err(
            kind,
            format!("question {id} of the answer file is not in the questions file{as_written}"),
        )
    })
}

/// Compat: the text of an answer line CoIN's scorer reads. A line without `text` (or with
/// `null`) stops CoIN's scripts (`KeyError`, or `None.upper()`, `len(None)`, `x in None`), so
/// it is an error here; Grounding alone catches it and counts the line wrong
/// (eval_grounding.py L69-75), and reads `bbox_parse_compat("")` the same way.
fn compat_text(kind: ScorerKind, a: &AnswerRecord) -> Result<&str, TaskError> {
    a.text.as_deref().ok_or_else(|| {
        err(
            kind,
            format!(
                "the answer line for question {} has no \"text\" (CoIN's scorer stops there; \
                 --mode strict scores it as an empty answer)",
                a.question_id
            ),
        )
    })
}

/// Strict: every answer must name a known question, at most once.
fn strict_answers<'a>(
    kind: ScorerKind,
    input: &ScoreInput<'a>,
) -> Result<HashMap<&'a Qid, &'a AnswerRecord>, TaskError> {
    let known: HashSet<&Qid> = input.questions.iter().map(|q| &q.question_id).collect();
    let mut map = HashMap::new();
    for a in input.answers {
        if !known.contains(&a.question_id) {
            return Err(err(
                kind,
                format!(
                    "the answer file answers question {}, which is not in the questions file",
                    a.question_id
                ),
            ));
        }
        if map.insert(&a.question_id, a).is_some() {
            return Err(err(
                kind,
                format!("question {} is answered twice", a.question_id),
            ));
        }
    }
    Ok(map)
}

/// Compat: iterate the answer file (CoIN's loop), look each ground truth up by question id.
fn per_answer(
    kind: ScorerKind,
    input: ScoreInput,
    correct: impl Fn(&str, &str) -> bool,
) -> Result<Vec<ItemScore>, TaskError> {
    let qs = compat_questions(kind, input.questions);
    input
        .answers
        .iter()
        .map(|a| {
            let q = compat_question(kind, &qs, &a.question_id)?;
            let gt = gt_answer(kind, q)?;
            Ok(ItemScore {
                question_id: a.question_id.clone(),
                score: f64::from(u8::from(correct(gt, compat_text(kind, a)?))),
            })
        })
        .collect()
}

/// Strict: iterate the questions file; a question without an answer scores 0.
fn per_question(
    kind: ScorerKind,
    input: ScoreInput,
    score: impl Fn(&TestRecord, &str) -> Result<f64, TaskError>,
) -> Result<Vec<ItemScore>, TaskError> {
    let answers = strict_answers(kind, &input)?;
    input
        .questions
        .iter()
        .map(|q| {
            let s = match answers.get(&q.question_id) {
                Some(a) => score(q, a.answer())?,
                None => 0.0,
            };
            Ok(ItemScore {
                question_id: q.question_id.clone(),
                score: s,
            })
        })
        .collect()
}

/// Strict normalisation for short answers: trim, lower-case, drop trailing periods, collapse
/// whitespace.
pub fn plain_normalize(s: &str) -> String {
    let lowered = s.trim().to_lowercase();
    let words: Vec<&str> = lowered.trim_end_matches('.').split_whitespace().collect();
    words.join(" ")
}

// ---------------------------------------------------------------- ScienceQA

const OPTIONS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// CoIN's ScienceQA answer parser: the text itself if it is one of A–E; the first character if
/// the text starts with `X. `; else the first single-character word (`\b(\w)\b`) upper-cased;
/// else `None` (FAILED).
pub fn sqa_parse_compat(text: &str) -> Option<char> {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() == 1 && OPTIONS.contains(&chars[0]) {
        return Some(chars[0]);
    }
    if chars.len() >= 3 && OPTIONS.contains(&chars[0]) && chars[1] == '.' && chars[2] == ' ' {
        return Some(chars[0]);
    }
    for (i, &c) in chars.iter().enumerate() {
        let before = i == 0 || !is_word_char(chars[i - 1]);
        let after = i + 1 == chars.len() || !is_word_char(chars[i + 1]);
        if is_word_char(c) && before && after {
            // `res[0].upper()` may be longer than one character ("ß" → "SS"), which is no
            // option: wrong, as in CoIN.
            let mut up = c.to_uppercase();
            return match (up.next(), up.next()) {
                (Some(u), None) => Some(u),
                _ => None,
            };
        }
    }
    None
}

/// Strict parser: an upper-case letter alone, `X.`/`X)`/`(X)` at the start, or
/// `The answer is X`; nothing else (no stray single-letter words such as "a").
pub fn sqa_parse_strict(text: &str) -> Option<char> {
    let t = text.trim();
    let chars: Vec<char> = t.chars().collect();
    let letter = |c: char| c.is_ascii_uppercase();
    match chars.as_slice() {
        [c] if letter(*c) => return Some(*c),
        [c, '.' | ')', ..] if letter(*c) && (chars.len() == 2 || chars[2] == ' ') => {
            return Some(*c)
        }
        ['(', c, ')', ..] if letter(*c) => return Some(*c),
        _ => {}
    }
    let lower = t.to_lowercase();
    if let Some(i) = lower.find("the answer is ") {
        let rest: Vec<char> = t[i + "the answer is ".len()..].chars().collect();
        let rest = if rest.first() == Some(&'(') {
            &rest[1..]
        } else {
            &rest[..]
        };
        if let Some(&c) = rest.first() {
            if letter(c) && rest.get(1).is_none_or(|n| !is_word_char(*n)) {
                return Some(c);
            }
        }
    }
    None
}

fn scienceqa_compat(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    let kind = ScorerKind::ScienceQA;
    let Some(Annotations::ScienceQA { problems, test_ids }) = input.annotations else {
        return Err(err(kind, "compat mode needs --annotations: the ScienceQA folder with problems.json and pid_splits.json (or use --mode strict to score against the questions file)"));
    };
    // eval_science_qa.py L46: a dict keyed by question_id as parsed (last line wins); L58 looks
    // the problem ids (strings) up in it, so an id written as a number is never found.
    let preds: HashMap<PyKey, &AnswerRecord> = input
        .answers
        .iter()
        .map(|a| (a.question_id.py_key(), a))
        .collect();
    let mut out = Vec::with_capacity(test_ids.len());
    for pid in test_ids {
        let prob = problems.get(pid).ok_or_else(|| {
            err(
                kind,
                format!("problem {pid} of the test split is not in problems.json"),
            )
        })?;
        let qid = Qid::text(pid.clone());
        let text = match preds.get(&PyKey::Str(pid.clone())) {
            Some(a) => compat_text(kind, a)?,
            None => "FAILED",
        };
        let idx = sqa_parse_compat(text).and_then(|c| {
            OPTIONS[..prob.n_choices.min(5)]
                .iter()
                .position(|o| *o == c)
        });
        out.push(ItemScore {
            question_id: qid,
            score: f64::from(u8::from(idx == Some(prob.answer))),
        });
    }
    Ok(out)
}

/// The number of lettered options (`A. …` lines) in a ScienceQA question.
fn option_count(text: &str) -> usize {
    text.lines()
        .filter(|l| {
            let c: Vec<char> = l.trim_start().chars().take(3).collect();
            c.len() >= 2 && c[0].is_ascii_uppercase() && c[1] == '.'
        })
        .count()
}

fn scienceqa_strict(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    let kind = ScorerKind::ScienceQA;
    let problems = match input.annotations {
        Some(Annotations::ScienceQA { problems, .. }) => Some(problems),
        _ => None,
    };
    per_question(kind, input, |q, pred| {
        let (answer_idx, n_choices) = match problems.and_then(|p| p.get(&q.question_id.0)) {
            Some(p) => (p.answer, p.n_choices),
            None => {
                let gt = gt_answer(kind, q)?.trim();
                let idx = match (gt.parse::<usize>(), sqa_parse_strict(gt)) {
                    (Ok(i), _) => i,
                    (_, Some(c)) => (c as u8 - b'A') as usize,
                    _ => {
                        return Err(err(
                            kind,
                            format!("question {}: answer '{gt}' is not a letter", q.question_id),
                        ))
                    }
                };
                let n = option_count(&q.text);
                (idx, if n == 0 { 26 } else { n })
            }
        };
        let got = sqa_parse_strict(pred).map(|c| (c as u8 - b'A') as usize);
        Ok(f64::from(u8::from(
            got.is_some_and(|i| i < n_choices && i == answer_idx),
        )))
    })
}

// ---------------------------------------------------------------- TextVQA

fn textvqa_compat(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    let kind = ScorerKind::TextVQA;
    let Some(Annotations::TextVQA(ann)) = input.annotations else {
        return Err(err(kind, "compat mode needs --annotations TextVQA_0.5.1_val.json (or use --mode strict to score against the questions file)"));
    };
    input
        .answers
        .iter()
        .map(|a| {
            let gts = ann.get(&a.question_id.py_str()).ok_or_else(|| {
                err(
                    kind,
                    format!("question {} is not in the annotation file", a.question_id),
                )
            })?;
            if gts.len() != 10 {
                return Err(err(
                    kind,
                    format!(
                        "question {}: {} ground-truth answers, the evaluator requires 10",
                        a.question_id,
                        gts.len()
                    ),
                ));
            }
            let norm: Vec<String> = gts.iter().map(|g| normalize_answer(g)).collect();
            let s = soft_scores(&norm)
                .get(&normalize_answer(compat_text(kind, a)?))
                .copied()
                .unwrap_or(0.0);
            Ok(ItemScore {
                question_id: a.question_id.clone(),
                score: s,
            })
        })
        .collect()
}

/// Strict VQA accuracy of a prediction against the human answers: the leave-one-out soft score
/// with 10 answers, `min(1, matches/3)` with 2–9, exact match with 1 (all normalised).
pub fn vqa_accuracy(gts: &[String], pred: &str) -> f64 {
    let norm: Vec<String> = gts.iter().map(|g| normalize_answer(g)).collect();
    let p = normalize_answer(pred);
    if p.is_empty() {
        return 0.0;
    }
    match norm.len() {
        0 => 0.0,
        1 => f64::from(u8::from(norm[0] == p)),
        10 => soft_scores(&norm).get(&p).copied().unwrap_or(0.0),
        _ => (norm.iter().filter(|g| **g == p).count() as f64 / 3.0).min(1.0),
    }
}

fn record_gts(kind: ScorerKind, q: &TestRecord) -> Result<Vec<String>, TaskError> {
    match &q.answers {
        Some(a) if !a.is_empty() => Ok(a.clone()),
        _ => Ok(vec![gt_answer(kind, q)?.to_string()]),
    }
}

fn textvqa_strict(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    let kind = ScorerKind::TextVQA;
    let ann = match input.annotations {
        Some(Annotations::TextVQA(a)) => Some(a),
        _ => None,
    };
    per_question(kind, input, |q, pred| {
        let gts = match ann.and_then(|a| a.get(&q.question_id.py_str())) {
            Some(g) => g.clone(),
            None => record_gts(kind, q)?,
        };
        Ok(vqa_accuracy(&gts, pred))
    })
}

fn vqa_strict(kind: ScorerKind, input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    per_question(kind, input, |q, pred| {
        Ok(vqa_accuracy(&record_gts(kind, q)?, pred))
    })
}

// ---------------------------------------------------------------- ImageNet, GQA

fn imagenet_compat(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    let kind = ScorerKind::ImageNet;
    // eval_ImagetNet.py: answer line i against question i, for every answer line.
    if input.answers.len() > input.questions.len() {
        return Err(err(
            kind,
            format!(
                "{} answer lines but only {} questions (CoIN pairs them by position)",
                input.answers.len(),
                input.questions.len()
            ),
        ));
    }
    // eval_ImagetNet.py L17 reads the `answer` of every question, answered or not.
    for q in input.questions {
        gt_answer(kind, q)?;
    }
    input
        .questions
        .iter()
        .zip(input.answers)
        .map(|(q, a)| {
            let gt = gt_answer(kind, q)?;
            let pred = compat_text(kind, a)?;
            Ok(ItemScore {
                question_id: q.question_id.clone(),
                score: f64::from(u8::from(gt.contains(pred) || pred.contains(gt))),
            })
        })
        .collect()
}

fn gqa_compat(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    let kind = ScorerKind::GQA;
    let Some(Annotations::GQA(ann)) = input.annotations else {
        return Err(err(kind, "compat mode needs --annotations testdev_balanced_questions.json (or use --mode strict to score against the questions file)"));
    };
    // convert_gqa_for_eval.py L14: prediction = text.rstrip('.').lower(), no other trimming
    // (" yes" stays " yes"); eval_gqa.py L135: a dict keyed by question_id as parsed (last one
    // per id wins), L348-349: loop over it and look each id up in the annotation file, whose
    // keys are strings (KeyError for an unknown id or one written as a number), L359: only
    // balanced questions count.
    let mut preds: Vec<(&Qid, String)> = Vec::new();
    let mut seen: HashMap<PyKey, usize> = HashMap::new();
    for a in input.answers {
        let t = compat_text(kind, a)?.trim_end_matches('.').to_lowercase();
        match seen.get(&a.question_id.py_key()) {
            Some(&i) => preds[i].1 = t,
            None => {
                seen.insert(a.question_id.py_key(), preds.len());
                preds.push((&a.question_id, t));
            }
        }
    }
    let mut out = Vec::new();
    for (qid, pred) in preds {
        let found = match qid.kind() {
            IdKind::Text => ann.get(&qid.0),
            IdKind::Int | IdKind::Float => None,
        };
        let q = found.ok_or_else(|| {
            let note = if qid.kind() == IdKind::Text {
                String::new()
            } else {
                " (it is written as a number, the annotation file's ids are strings, and CoIN's \
                 eval_gqa.py L349 does not convert it; use --mode strict to match 12 and \"12\")"
                    .to_string()
            };
            err(
                kind,
                format!("question {qid} is not in the annotation file{note}"),
            )
        })?;
        if q.is_balanced {
            out.push(ItemScore {
                question_id: qid.clone(),
                score: f64::from(u8::from(pred == q.answer)),
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- Grounding

/// Python's `float()` on a token: surrounding whitespace allowed, and single underscores
/// between digits (PEP 515: `0.1_0` is 0.1, `1__0`, `_1`, `1_` and `1_.5` are errors). Not
/// reproduced: Python also reads non-ASCII decimal digits (`float('１２')` is 12.0).
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    if !t.contains('_') {
        return t.parse::<f64>().ok();
    }
    let b = t.as_bytes();
    let mut plain = String::with_capacity(t.len());
    for (i, c) in t.char_indices() {
        if c == '_' {
            let digit = |j: Option<usize>| j.and_then(|j| b.get(j)).is_some_and(u8::is_ascii_digit);
            if !digit(i.checked_sub(1)) || !digit(Some(i + 1)) {
                return None;
            }
        } else {
            plain.push(c);
        }
    }
    plain.parse::<f64>().ok()
}

/// Parse a box the way CoIN's `eval_grounding.py` L70-73 parses predictions: delete every `[`
/// and `]`, then drop the first and the last character (`s[1:-1]`, no trimming before it),
/// split on commas; four floats or nothing. This loses the last digit of y2 (and the first
/// character of x1, harmless for `0.x` but `1.0` becomes `.0`; a leading space is what gets
/// dropped from " [1.0, …").
pub fn bbox_parse_compat(text: &str) -> Option<[f64; 4]> {
    let s: Vec<char> = text.chars().filter(|c| *c != '[' && *c != ']').collect();
    if s.len() < 2 {
        return None;
    }
    let inner: String = s[1..s.len() - 1].iter().collect();
    let parts: Vec<&str> = inner.split(',').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut b = [0.0; 4];
    for (slot, p) in b.iter_mut().zip(parts) {
        *slot = py_float(p)?;
    }
    Some(b)
}

/// Parse a ground-truth box string `"[x1, y1, x2, y2]"` (brackets optional).
pub fn bbox_parse_gt(text: &str) -> Option<[f64; 4]> {
    let s: String = text.chars().filter(|c| *c != '[' && *c != ']').collect();
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut b = [0.0; 4];
    for (slot, p) in b.iter_mut().zip(parts) {
        *slot = py_float(p)?;
    }
    Some(b)
}

/// Strict box parser: every number in the text (digits with an optional decimal part), keeping
/// every digit; exactly four or nothing.
pub fn bbox_parse_strict(text: &str) -> Option<[f64; 4]> {
    let mut nums = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if starts {
            let neg = i > 0 && chars[i - 1] == '-';
            let mut j = i;
            let mut dot = false;
            while j < chars.len() && (chars[j].is_ascii_digit() || (chars[j] == '.' && !dot)) {
                dot |= chars[j] == '.';
                j += 1;
            }
            let s: String = chars[i..j].iter().collect();
            let v: f64 = s.trim_end_matches('.').parse().ok()?;
            nums.push(if neg { -v } else { v });
            i = j;
        } else {
            i += 1;
        }
    }
    <[f64; 4]>::try_from(nums).ok()
}

/// Python's `min(a, b)`: `a` unless `b < a` (so a NaN in `b` is never taken).
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// Python's `max(a, b)`: `a` unless `b > a`.
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// CoIN's `calculate_iou(bbox1, bbox2)` (eval_grounding.py L44-50), operation for operation in
/// float64: the intersection is clamped at 0 but the areas are not (an inverted box has a
/// negative area), union = area1 + area2 - intersection, 0 unless union > 0.
pub fn iou_compat(a: [f64; 4], b: [f64; 4]) -> f64 {
    let inter = py_max(0.0, py_min(a[2], b[2]) - py_max(a[0], b[0]))
        * py_max(0.0, py_min(a[3], b[3]) - py_max(a[1], b[1]));
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// CoIN's grounding verdict (eval_grounding.py L79-84): both boxes multiplied by `max(size)`,
/// then `calculate_iou(pred, gt) > 0.5`. The scaling is not a no-op in floating point: an IoU
/// that is 0.5 up to rounding lands where CoIN's lands.
pub fn grounding_hit_compat(pred: [f64; 4], gt: [f64; 4], size: [f64; 2]) -> bool {
    let max_wh = py_max(size[0], size[1]);
    iou_compat(pred.map(|x| x * max_wh), gt.map(|x| x * max_wh)) > 0.5
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 for empty or inverted boxes.
pub fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let area = |x: [f64; 4]| (x[2] - x[0]).max(0.0) * (x[3] - x[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 && inter.is_finite() {
        inter / union
    } else {
        0.0
    }
}

fn grounding_gt(q: &TestRecord) -> Result<[f64; 4], TaskError> {
    let kind = ScorerKind::Grounding;
    let s = q
        .answer_bbox
        .as_deref()
        .or(q.answer.as_deref())
        .ok_or_else(|| {
            err(
                kind,
                format!("question {} has no \"answer_bbox\"", q.question_id),
            )
        })?;
    bbox_parse_gt(s).ok_or_else(|| {
        err(
            kind,
            format!("question {}: '{s}' is not a box", q.question_id),
        )
    })
}

// eval_grounding.py L61-84: per answer line, the question by id as written, its box and
// `size` (KeyError without one), the parsed prediction (wrong when unparsable), both boxes
// scaled by max(size), IoU > 0.5.
fn grounding_compat(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    let kind = ScorerKind::Grounding;
    let qs = compat_questions(kind, input.questions);
    input
        .answers
        .iter()
        .map(|a| {
            let q = compat_question(kind, &qs, &a.question_id)?;
            // L63 reads `answer_bbox` (KeyError without it); strict also takes `answer`.
            if q.answer_bbox.is_none() {
                return Err(err(
                    kind,
                    format!("question {} has no \"answer_bbox\"", q.question_id),
                ));
            }
            let gt = grounding_gt(q)?;
            let size = q.size.ok_or_else(|| {
                err(
                    kind,
                    format!(
                        "question {} has no \"size\" (CoIN scales both boxes by max(size))",
                        q.question_id
                    ),
                )
            })?;
            let s = bbox_parse_compat(a.answer()).map_or(0.0, |p| {
                f64::from(u8::from(grounding_hit_compat(p, gt, size)))
            });
            Ok(ItemScore {
                question_id: a.question_id.clone(),
                score: s,
            })
        })
        .collect()
}

fn grounding_strict(input: ScoreInput) -> Result<Vec<ItemScore>, TaskError> {
    per_question(ScorerKind::Grounding, input, |q, pred| {
        let gt = grounding_gt(q)?;
        Ok(bbox_parse_strict(pred).map_or(0.0, |p| f64::from(u8::from(iou(p, gt) > 0.5))))
    })
}

#[cfg(test)]
mod tests;
