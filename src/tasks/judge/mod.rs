//! The general-knowledge LLM judge of CoIN: prompt writing (`prompt_to_eval.json`), score
//! parsing with CoIN's rules (`evaluate_score.py`), and a small client for any
//! OpenAI-compatible chat endpoint, with timeouts, retries and resumable progress.
//!
//! The layout of the messages and the rule texts are those of CoIN's `create_prompt.py` and
//! `rule.json`; the score parsing is that of `evaluate_score.py`.

pub mod http;

pub use http::JudgeFailure;

use std::io::BufReader;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::formats::{for_each_jsonl, AnswerRecord, Qid, TestRecord};
use super::TaskError;
use crate::store::fsutil::write_atomic;

/// The system message CoIN's `create_prompt.py` writes into `prompt_to_eval.json`.
pub const PROMPT_SYSTEM: &str =
    "You are a helpful and precise assistant for checking the quality of the answer.";
/// The system message CoIN's judge script actually sends (it sends the user content only).
pub const JUDGE_SYSTEM: &str = "You are a helpful assistant.";

/// Which rule text ends the prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JudgeRule {
    /// `CoIN`: every task but Grounding.
    CoIN,
    /// `CoIN_Grounding`: the ground truth is a normalised box.
    CoINGrounding,
}

impl JudgeRule {
    /// The rule text, verbatim from CoIN's `ETrain/Eval/LLaVA/CoIN/rule.json` (typos included:
    /// the judge model saw exactly these words).
    pub fn text(self) -> &'static str {
        match self {
            JudgeRule::CoIN => "We would like to request your feedback on the performance of an AI assistants in response to the user question displayed above.\nPlease rate the accuracy of its responses according to the ground truth answer displayed above. The assistant receives an overall score on a scale of 0 to 10, where a higher score indicates better overall performance.\nPlease output a single line containing only a values indicating the scores for the Assistant.",
            JudgeRule::CoINGrounding => "We would like to request your feedback on the performance of an AI assistants in response to the user question displayed above. The user asks the question on observing an image. For your reference, the visual content in the image is represented with one descriptive sentence describing the same image and the bounding box coordinates of each object in the scene. These coordinates are in the form of bounding boxes, represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These values correspond to the top left x, top left y, bottom right x, and bottom right y. \nPlease rate the accuracy of its responses according to the ground truth answer displayed above. The assistant receives an overall score on a scale of 0 to 10, where a higher score indicates better overall performance.\nPlease output a single line containing only a values indicating the scores for the Assistant.",
        }
    }
}

impl JudgeRule {
    /// The rule's key in CoIN's `rule.json` (`--rule_temp` of `create_prompt.py`).
    pub fn name(self) -> &'static str {
        match self {
            JudgeRule::CoIN => "CoIN",
            JudgeRule::CoINGrounding => "CoIN_Grounding",
        }
    }

    /// The prompt version recorded with a score: the rule's name and the first 12 hex digits
    /// of the blake3 hash of its text, e.g. `CoIN@1a2b3c4d5e6f` (another wording, another
    /// version).
    pub fn prompt_version(self) -> String {
        let hash = blake3::hash(self.text().as_bytes()).to_hex();
        format!("{}@{}", self.name(), &hash.as_str()[..12])
    }
}

/// The judge's sampling settings. [`Sampling::COIN`] (the default) is what CoIN's judge
/// script (`eval_GenealKnowledge.py`) hard-codes; [`Sampling::DETERMINISTIC`] (temperature 0,
/// greedy decoding) makes a score repeatable.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Sampling temperature (0 = greedy).
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// vLLM's repetition penalty (1 = none; then it is not sent, so endpoints that do not know
    /// the field accept the request).
    pub repetition_penalty: f64,
    /// Maximum reply tokens.
    pub max_tokens: u32,
}

impl Sampling {
    /// CoIN's settings: `SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.05,
    /// max_tokens=20)`.
    pub const COIN: Sampling = Sampling {
        temperature: 0.7,
        top_p: 0.8,
        repetition_penalty: 1.05,
        max_tokens: 20,
    };

    /// Greedy decoding: the same prompt always gets the same reply from the same judge.
    pub const DETERMINISTIC: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        max_tokens: 20,
    };

    /// Check the ranges an OpenAI-compatible server accepts; the message names the setting.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "the temperature must be a number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "the repetition penalty must be a number > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".to_string());
        }
        Ok(())
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::COIN
    }
}

/// Where a recorded score's replies came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JudgeSource {
    /// `coin judge --endpoint`: coin asked the judge.
    Endpoint,
    /// `coin judge --replies`: a judge output file made elsewhere (CoIN's script).
    RepliesFile,
}

/// What a general-knowledge record says about its judge (the `judge` field of the record):
/// enough to tell scores made under other settings apart. Never holds a secret: the endpoint
/// is kept as its host only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeMeta {
    /// The judge model's name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The rule's name (`CoIN`, `CoIN_Grounding`).
    pub rule: String,
    /// [`JudgeRule::prompt_version`].
    pub prompt_version: String,
    /// The sampling settings.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// The endpoint's host (and port), for scores coin asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_host: Option<String>,
    /// Where the replies came from.
    pub source: JudgeSource,
}

/// The host (and port) of an endpoint URL, without scheme, credentials, path or query, e.g.
/// `api.example.com` for `https://user:key@api.example.com/v1?x=1`.
pub fn endpoint_host(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_string()
}

/// One judged reply as coin writes it to `prompt_eval_merge.jsonl` (CoIN's judge output name;
/// CoIN's `evaluate_score.py` reads its `text`).
#[derive(Clone, Debug, PartialEq, Serialize)]
struct ReplyLine<'a> {
    question_id: &'a Qid,
    text: &'a str,
    score: f64,
}

/// The judge output file of judged items, one JSON line each, in CoIN's layout (reply in
/// `text`), so CoIN's `evaluate_score.py` and [`read_reply_scores`] score it alike.
pub fn replies_file(done: &[Judged]) -> String {
    let mut s = String::new();
    for j in done {
        let line = ReplyLine {
            question_id: &j.question_id,
            text: &j.reply,
            score: j.score,
        };
        s.push_str(&serde_json::to_string(&line).expect("a reply line always serialises"));
        s.push('\n');
    }
    s
}

/// One answer to judge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeItem {
    /// The question.
    pub question_id: Qid,
    /// The question without its instruction line.
    pub question: String,
    /// The ground truth (Grounding: `answer_bbox`).
    pub ground_truth: String,
    /// The model's answer.
    pub prediction: String,
}

/// Pair answers with their questions (answer-file order). Questions without an answer are
/// left out, as in CoIN (the judge sees the answer file). As in `create_prompt.py`, the
/// question is `text` without its last (instruction) line, except for Grounding, whose whole
/// `text` is kept.
pub fn judge_items(
    questions: &[TestRecord],
    answers: &[AnswerRecord],
    rule: JudgeRule,
) -> Result<Vec<JudgeItem>, TaskError> {
    let by_id: std::collections::HashMap<&Qid, &TestRecord> =
        questions.iter().map(|q| (&q.question_id, q)).collect();
    answers
        .iter()
        .map(|a| {
            let q = by_id
                .get(&a.question_id)
                .ok_or_else(|| TaskError::Scoring {
                    task: "judge".into(),
                    message: format!(
                        "question {} of the answer file is not in the questions file",
                        a.question_id
                    ),
                })?;
            let gt = match rule {
                JudgeRule::CoINGrounding => q.answer_bbox.clone(),
                JudgeRule::CoIN => q.answer.clone(),
            }
            .ok_or_else(|| TaskError::Scoring {
                task: "judge".into(),
                message: format!("question {} has no ground truth", q.question_id),
            })?;
            Ok(JudgeItem {
                question_id: a.question_id.clone(),
                question: match rule {
                    JudgeRule::CoIN => q.question_without_instruction().to_string(),
                    JudgeRule::CoINGrounding => q.text.clone(),
                },
                ground_truth: gt,
                prediction: a.answer().to_string(),
            })
        })
        .collect()
}

/// The user message of one item, in CoIN's layout.
pub fn user_prompt(item: &JudgeItem, rule: JudgeRule) -> String {
    format!(
        "[Context]\n[Question]\n{}\n\n[Ground truth answer]\n{}\n\n[End of ground truth answer]\n\n[Assistant]\n{}\n\n[End of Assistant]\n\n[System]\n{}\n\n",
        item.question,
        item.ground_truth,
        item.prediction,
        rule.text()
    )
}

/// `prompt_to_eval.json` byte for byte as CoIN's `create_prompt.py` writes it: a list with one
/// `[{"role": "system", ...}, {"role": "user", ...}]` pair per item, written by Python's
/// `json.dump(..., indent=4)` (ASCII only, non-ASCII as `\uXXXX` escapes, no final newline),
/// so CoIN's judge script (`eval_GenealKnowledge.py`) reads coin's file as its own.
pub fn prompt_file(items: &[JudgeItem], rule: JudgeRule) -> String {
    if items.is_empty() {
        return "[]".to_string();
    }
    let mut s = String::from("[\n");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        s.push_str("    [\n");
        let messages = [
            ("system", PROMPT_SYSTEM.to_string()),
            ("user", user_prompt(item, rule)),
        ];
        for (j, (role, content)) in messages.iter().enumerate() {
            if j > 0 {
                s.push_str(",\n");
            }
            s.push_str("        {\n            \"role\": ");
            push_py_json_str(&mut s, role);
            s.push_str(",\n            \"content\": ");
            push_py_json_str(&mut s, content);
            s.push_str("\n        }");
        }
        s.push_str("\n    ]");
    }
    s.push_str("\n]");
    s
}

/// Append `text` as a JSON string the way Python's `json.dump` writes it with its default
/// `ensure_ascii=True`: `"` and `\\` escaped, `\n \r \t \b \f` by name, every other
/// character outside printable ASCII as `\uXXXX` (lower-case hex; UTF-16 surrogate pairs
/// above U+FFFF).
fn push_py_json_str(s: &mut String, text: &str) {
    use std::fmt::Write as _;
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            ' '..='~' => s.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(s, "\\u{u:04x}");
                }
            }
        }
    }
    s.push('"');
}

/// Parse a judge reply with CoIN's rules (`evaluate_score.py`):
/// - the whole reply parses as a number (Python `float`, surrounding whitespace allowed): that
///   number if ≤ 10, else 0 (no other rule is tried);
/// - else, if it contains `/`: the part before the first `/` if it is all digits and ≤ 10, else 0;
/// - else the first digit 1–9 anywhere; else 0.
pub fn parse_score(reply: &str) -> f64 {
    if let Ok(v) = reply.trim().parse::<f64>() {
        return if v <= 10.0 { v } else { 0.0 };
    }
    if let Some((num, _)) = reply.split_once('/') {
        let numeric = !num.is_empty() && num.chars().all(|c| c.is_numeric());
        return match num.parse::<f64>() {
            Ok(v) if numeric && v <= 10.0 => v,
            _ => 0.0,
        };
    }
    reply
        .chars()
        .find(|c| ('1'..='9').contains(c))
        .and_then(|c| c.to_digit(10))
        .map_or(0.0, f64::from)
}

/// Per-item scores of a CoIN judge output file (`prompt_eval_merge.jsonl`: one JSON object per
/// line with the reply in `text`). Read with the bounded JSONL reader
/// ([`formats::for_each_jsonl`](super::formats::for_each_jsonl)); a file without a reply is an
/// error (a score over no reply is no score).
pub fn read_reply_scores(path: &Path) -> Result<Vec<f64>, TaskError> {
    /// One line of a judge output file: only the reply is read, other fields are skipped.
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default)]
        text: Option<String>,
    }
    let file = std::fs::File::open(path).map_err(|e| TaskError::io("open", path, e))?;
    let mut scores = Vec::new();
    for_each_jsonl(BufReader::new(file), path, |line, r: Reply| {
        let text = r.text.ok_or_else(|| TaskError::Line {
            path: path.to_path_buf(),
            line,
            message: "no \"text\" string".into(),
        })?;
        scores.push(parse_score(&text));
        Ok(())
    })?;
    if scores.is_empty() {
        return Err(TaskError::Format {
            path: path.to_path_buf(),
            what: "judge output file",
            message: "it holds no replies (a score over no reply is not a score of 0)".into(),
        });
    }
    Ok(scores)
}

/// The judge's summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JudgeScore {
    /// Number of items.
    pub n: usize,
    /// Σ per-item scores (0–10 each).
    pub sum: f64,
    /// 100·Σs/(10·N).
    pub score: f64,
    /// CoIN's printed value: `round(score)`.
    pub rounded: f64,
}

/// Summarise per-item scores.
pub fn summarise(scores: &[f64]) -> JudgeScore {
    let sum: f64 = scores.iter().sum();
    let n = scores.len();
    let score = if n == 0 {
        0.0
    } else {
        100.0 * sum / (10.0 * n as f64)
    };
    JudgeScore {
        n,
        sum,
        score,
        rounded: score.round(),
    }
}

/// How to reach the judge.
#[derive(Clone, Debug)]
pub struct JudgeClient {
    /// `http(s)://host[:port]/v1` (or the full `/chat/completions` URL).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …` when set (hosted endpoints need one).
    pub api_key: Option<String>,
    /// The model name sent in each request.
    pub model: String,
    /// Sampling settings (CoIN's by default).
    pub sampling: Sampling,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Extra attempts after a failed request.
    pub retries: u32,
    /// Pause before the first retry (doubled each time).
    pub backoff: Duration,
}

impl JudgeClient {
    fn url(&self) -> String {
        let e = self.endpoint.trim_end_matches('/');
        if e.ends_with("/chat/completions") {
            e.to_string()
        } else {
            format!("{e}/chat/completions")
        }
    }

    fn fail(&self, attempts: u32, source: JudgeFailure) -> TaskError {
        TaskError::Judge {
            endpoint: self.endpoint.clone(),
            attempts,
            source: Box::new(source),
        }
    }

    /// Ask once (with retries); the reply text.
    pub fn ask(&self, user: &str) -> Result<String, TaskError> {
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": user},
            ],
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_tokens,
        });
        // vLLM takes `repetition_penalty` as an extra field; other servers may refuse it, so a
        // penalty of 1 (none) is not sent.
        if self.sampling.repetition_penalty != 1.0 {
            body["repetition_penalty"] = serde_json::json!(self.sampling.repetition_penalty);
        }
        let body = serde_json::to_vec(&body).expect("a JSON value always serialises");
        let mut pause = self.backoff;
        let mut attempts = 0;
        loop {
            if attempts > 0 {
                std::thread::sleep(pause);
                pause *= 2;
            }
            attempts += 1;
            let last =
                match http::post_json(&self.url(), &body, self.timeout, self.api_key.as_deref()) {
                    Ok((200, reply)) => {
                        return reply_content(&reply)
                            .map_err(|m| self.fail(attempts, JudgeFailure::BadReply(m)));
                    }
                    Ok((status, reply)) => {
                        let failure = JudgeFailure::Status {
                            status,
                            body: String::from_utf8_lossy(&reply).chars().take(200).collect(),
                        };
                        if (400..500).contains(&status) && status != 429 && status != 408 {
                            return Err(self.fail(attempts, failure));
                        }
                        failure
                    }
                    Err(e) => e,
                };
            if attempts > self.retries {
                return Err(self.fail(attempts, last));
            }
        }
    }
}

/// `choices[0].message.content` of an OpenAI chat reply, read into typed structs: the other
/// choices and fields are skipped without being built.
fn reply_content(reply: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Chat {
        #[serde(default, deserialize_with = "first_only")]
        choices: Option<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: Option<Message>,
    }
    #[derive(Deserialize)]
    struct Message {
        content: Option<String>,
    }
    let chat: Chat = serde_json::from_slice(reply).map_err(|e| {
        let e = e.to_string();
        format!(
            "the reply is not a chat completion: {}",
            e.chars().take(200).collect::<String>()
        )
    })?;
    chat.choices
        .and_then(|c| c.message)
        .and_then(|m| m.content)
        .ok_or_else(|| "the reply has no choices[0].message.content".to_string())
}

/// The first element of a JSON list; the rest are skipped.
fn first_only<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let first = seq.next_element()?;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }
    d.deserialize_seq(V(std::marker::PhantomData))
}

/// One judged item, as saved in the progress file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    /// Position in the item list.
    pub index: usize,
    /// The question.
    pub question_id: Qid,
    /// The judge's reply.
    pub reply: String,
    /// The parsed score (0–10).
    pub score: f64,
}

/// Read a progress file (JSONL of [`Judged`], bounded like every JSONL reader); missing file =
/// nothing done.
pub fn read_progress(path: &Path) -> Result<Vec<Judged>, TaskError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TaskError::io("open", path, e)),
    };
    let mut done = Vec::new();
    for_each_jsonl(BufReader::new(file), path, |_, j: Judged| {
        done.push(j);
        Ok(())
    })?;
    Ok(done)
}

fn save_progress(path: &Path, done: &[Judged]) -> Result<(), TaskError> {
    let mut s = String::new();
    for j in done {
        s.push_str(&serde_json::to_string(j).expect("a Judged always serialises"));
        s.push('\n');
    }
    write_atomic(path, s).map_err(|e| TaskError::io("write", path, e))
}

/// Judge every item not yet in the progress file, saving progress atomically every few items
/// and on failure, so a rerun resumes where it stopped. Returns all judged items in order.
pub fn run_judge(
    client: &JudgeClient,
    items: &[JudgeItem],
    rule: JudgeRule,
    progress_path: &Path,
    mut on_item: impl FnMut(usize, usize),
) -> Result<Vec<Judged>, TaskError> {
    let mut done = read_progress(progress_path)?;
    done.retain(|j| {
        items
            .get(j.index)
            .is_some_and(|i| i.question_id == j.question_id)
    });
    let have: std::collections::HashSet<usize> = done.iter().map(|j| j.index).collect();
    let mut since_save = 0;
    for (index, item) in items.iter().enumerate() {
        if have.contains(&index) {
            continue;
        }
        match client.ask(&user_prompt(item, rule)) {
            Ok(reply) => {
                let score = parse_score(&reply);
                done.push(Judged {
                    index,
                    question_id: item.question_id.clone(),
                    reply,
                    score,
                });
                since_save += 1;
                on_item(done.len(), items.len());
                if since_save >= 16 {
                    save_progress(progress_path, &done)?;
                    since_save = 0;
                }
            }
            Err(e) => {
                save_progress(progress_path, &done)?;
                return Err(e);
            }
        }
    }
    done.sort_by_key(|j| j.index);
    save_progress(progress_path, &done)?;
    Ok(done)
}

#[cfg(test)]
mod tests;
