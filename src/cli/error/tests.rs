#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::io;
use std::path::PathBuf;

use super::*;
use crate::history::GitCause;
use crate::store::{HeaderError, ObjectId};
use crate::tasks::judge::JudgeFailure;

/// The text every cause below carries, so a test can count how often it is printed.
const CAUSE: &str = "THE-CAUSE";

fn io_error(kind: io::ErrorKind) -> io::Error {
    io::Error::new(kind, CAUSE)
}

fn path() -> PathBuf {
    PathBuf::from("some/file")
}

fn id() -> ObjectId {
    ObjectId::from_hex(&"ab".repeat(32)).unwrap()
}

fn json_error() -> serde_json::Error {
    serde_json::from_str::<u8>("x").unwrap_err()
}

fn store_samples() -> Vec<(&'static str, StoreError, u8)> {
    vec![
        (
            "store io: missing",
            StoreError::io("read", path(), io_error(io::ErrorKind::NotFound)),
            1,
        ),
        (
            "store io: disk",
            StoreError::io("write", path(), io_error(io::ErrorKind::StorageFull)),
            255,
        ),
        (
            "store not initialized",
            StoreError::NotInitialized { path: path() },
            1,
        ),
        (
            "store unsupported format",
            StoreError::UnsupportedFormat {
                path: path(),
                found: "9".into(),
                expected: "1".into(),
            },
            1,
        ),
        (
            "store invalid id",
            StoreError::InvalidObjectId { text: "x".into() },
            1,
        ),
        (
            "store object missing",
            StoreError::ObjectMissing { id: id() },
            255,
        ),
        (
            "store corrupt",
            StoreError::Corrupt {
                id: id(),
                path: path(),
                reason: "bad".into(),
            },
            255,
        ),
        (
            "store wrong kind",
            StoreError::WrongKind {
                id: id(),
                found: "blob",
                expected: "tensor",
            },
            255,
        ),
        (
            "store entry mismatch",
            StoreError::EntryMismatch {
                path: path(),
                reason: "bad".into(),
            },
            255,
        ),
        (
            "store bad entry",
            StoreError::BadEntry {
                reason: "bad".into(),
            },
            255,
        ),
        (
            "store invalid safetensors",
            StoreError::InvalidSafetensors {
                path: path(),
                reason: HeaderError::NotUtf8(0),
            },
            1,
        ),
        (
            "store file changed",
            StoreError::FileChanged { path: path() },
            1,
        ),
        (
            "store unsafe path",
            StoreError::UnsafePath {
                path: "../x".into(),
                reason: "escapes".into(),
            },
            1,
        ),
        (
            "store locked",
            StoreError::Locked {
                path: path(),
                waited: std::time::Duration::from_secs(1),
            },
            1,
        ),
        (
            "object store: credentials",
            remote(crate::store::RemoteErrorKind::Credentials),
            1,
        ),
        (
            "object store: no bucket",
            remote(crate::store::RemoteErrorKind::NoBucket),
            1,
        ),
        (
            "object store: unreachable",
            remote(crate::store::RemoteErrorKind::Unreachable),
            1,
        ),
        (
            "object store: config",
            remote(crate::store::RemoteErrorKind::Config),
            1,
        ),
        (
            "object store: other",
            remote(crate::store::RemoteErrorKind::Other),
            255,
        ),
    ]
}

fn remote(kind: crate::store::RemoteErrorKind) -> StoreError {
    StoreError::Remote {
        op: "list the objects of".into(),
        url: "s3://bucket/prefix".into(),
        kind,
        reason: CAUSE.into(),
    }
}

fn history_samples() -> Vec<(&'static str, HistoryError, u8)> {
    let mut out: Vec<(&'static str, HistoryError, u8)> = vec![
        ("not a repo", HistoryError::NotARepo(path()), 1),
        (
            "already initialized",
            HistoryError::AlreadyInitialized(path()),
            1,
        ),
        (
            "git",
            HistoryError::Git {
                op: "write the commit".into(),
                source: GitCause(git2::Error::from_str(CAUSE)),
            },
            255,
        ),
        (
            "git locked",
            HistoryError::GitLocked {
                op: "update the ref".into(),
                path: "refs/x.lock".into(),
            },
            1,
        ),
        (
            "history io: missing",
            HistoryError::Io {
                op: "read".into(),
                path: path(),
                source: io_error(io::ErrorKind::NotFound),
            },
            1,
        ),
        (
            "history io: other",
            HistoryError::Io {
                op: "write".into(),
                path: path(),
                source: io_error(io::ErrorKind::Other),
            },
            255,
        ),
        (
            "bad file",
            HistoryError::BadFile {
                checkpoint: "abc".into(),
                path: "a".into(),
                source: Box::new(StoreError::ObjectMissing { id: id() }),
            },
            255,
        ),
        (
            "unknown revision",
            HistoryError::UnknownRevision("x".into()),
            1,
        ),
        (
            "ambiguous revision",
            HistoryError::AmbiguousRevision {
                rev: "ab".into(),
                candidates: vec!["ab1".into(), "ab2".into()],
            },
            1,
        ),
        (
            "bad revision",
            HistoryError::BadRevision {
                rev: "x~".into(),
                message: "bad".into(),
            },
            1,
        ),
        ("empty branch", HistoryError::EmptyBranch("main".into()), 1),
        ("no such branch", HistoryError::NoSuchBranch("x".into()), 1),
        (
            "ref exists",
            HistoryError::RefExists {
                kind: "tag",
                name: "v1".into(),
            },
            1,
        ),
        (
            "invalid name",
            HistoryError::InvalidName {
                kind: "branch",
                name: "a..b".into(),
                reason: "bad".into(),
            },
            1,
        ),
        (
            "branch moved",
            HistoryError::BranchMoved {
                branch: "main".into(),
                expected: "a".into(),
                actual: "b".into(),
            },
            1,
        ),
        (
            "not a checkpoint",
            HistoryError::NotACheckpoint("abc".into()),
            1,
        ),
        (
            "record",
            HistoryError::Record {
                what: "manifest".into(),
                message: "bad".into(),
            },
            255,
        ),
        (
            "config",
            HistoryError::Config {
                what: "configuration".into(),
                message: "bad".into(),
            },
            1,
        ),
        ("input", HistoryError::Input("bad".into()), 1),
        ("corrupt", HistoryError::Corrupt("bad".into()), 255),
        (
            "hook refused",
            HistoryError::HookRefused {
                event: "pre-checkpoint".into(),
                code: Some(1),
                output: String::new(),
            },
            1,
        ),
    ];
    for (name, e, code) in store_samples() {
        out.push((name, HistoryError::Store(e), code));
    }
    out
}

/// A writer whose reader went away.
struct Closed;

impl io::Write for Closed {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn thread_pool_error() -> rayon::ThreadPoolBuildError {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .spawn_handler(|_| Err(io_error(io::ErrorKind::Other)))
        .build()
        .unwrap_err()
}

fn task_samples() -> Vec<(&'static str, TaskError, u8)> {
    vec![
        (
            "task io: missing",
            TaskError::io("open", path(), io_error(io::ErrorKind::NotFound)),
            1,
        ),
        (
            "task io: other",
            TaskError::io("write", path(), io_error(io::ErrorKind::Other)),
            255,
        ),
        (
            "task format",
            TaskError::Format {
                path: path(),
                what: "CoIN test file",
                message: "bad".into(),
            },
            1,
        ),
        (
            "task record",
            TaskError::Record {
                path: path(),
                index: 0,
                message: "bad".into(),
            },
            1,
        ),
        (
            "task line",
            TaskError::Line {
                path: path(),
                line: 1,
                message: "bad".into(),
            },
            1,
        ),
        (
            "task too long",
            TaskError::TooLong {
                path: path(),
                place: "line 1".into(),
                limit: 10,
            },
            1,
        ),
        (
            "image path escapes",
            TaskError::ImagePathEscapes {
                image: "../x".into(),
                root: path(),
            },
            1,
        ),
        (
            "missing images",
            TaskError::MissingImages {
                count: 1,
                first: vec!["a.png".into()],
                root: path(),
            },
            1,
        ),
        ("unknown task", TaskError::UnknownTask("x".into()), 1),
        (
            "scoring",
            TaskError::Scoring {
                task: "T".into(),
                message: "bad".into(),
            },
            1,
        ),
        (
            "nothing scored",
            TaskError::NothingScored {
                task: "T".into(),
                reason: "no answers",
            },
            1,
        ),
        ("threads", TaskError::Threads(thread_pool_error()), 255),
        ("registry", TaskError::Registry("bad".into()), 1),
        (
            "judge",
            TaskError::Judge {
                endpoint: "http://x/v1".into(),
                attempts: 2,
                source: Box::new(JudgeFailure::ReadReply(ureq::Error::Io(io_error(
                    io::ErrorKind::Other,
                )))),
            },
            1,
        ),
    ]
}

fn pickle_samples() -> Vec<(&'static str, PickleError, u8)> {
    vec![
        (
            "pickle io",
            PickleError::Io {
                path: path(),
                source: io_error(io::ErrorKind::NotFound),
            },
            1,
        ),
        (
            "pickle zip",
            PickleError::Zip {
                path: path(),
                source: zip::result::ZipError::FileNotFound,
            },
            1,
        ),
        (
            "pickle invalid",
            PickleError::Invalid {
                path: path(),
                problem: crate::store::pickle::Problem::NoPickle,
            },
            1,
        ),
    ]
}

fn ml_samples() -> Vec<(&'static str, MlError, u8)> {
    let mut out: Vec<(&'static str, MlError, u8)> = vec![
        (
            "ml read: missing",
            MlError::Read {
                path: path(),
                source: io_error(io::ErrorKind::NotFound),
            },
            1,
        ),
        (
            "ml write: disk",
            MlError::Write {
                path: path(),
                source: io_error(io::ErrorKind::StorageFull),
            },
            255,
        ),
        (
            "ml parse",
            MlError::Parse {
                path: path(),
                message: "bad".into(),
            },
            1,
        ),
        (
            "missing tensor",
            MlError::MissingTensor {
                name: "w".into(),
                source_desc: "f".into(),
            },
            1,
        ),
        (
            "shape mismatch",
            MlError::ShapeMismatch {
                name: "w".into(),
                source_desc: "f".into(),
                expected: vec![1],
                actual: vec![2],
            },
            1,
        ),
        (
            "unsupported",
            MlError::Unsupported {
                path: path(),
                message: "bad".into(),
            },
            1,
        ),
        (
            "not a model",
            MlError::NotAModel {
                path: path(),
                message: "bad".into(),
            },
            1,
        ),
        (
            "tokenizer",
            MlError::Tokenizer {
                context: "load".into(),
                message: "bad".into(),
            },
            1,
        ),
        ("missing image", MlError::MissingImage { path: path() }, 1),
        (
            "image",
            MlError::Image {
                path: path(),
                source: image::ImageError::IoError(io_error(io::ErrorKind::InvalidData)),
            },
            1,
        ),
        (
            "adapter mismatch",
            MlError::AdapterMismatch {
                path: path(),
                message: "bad".into(),
            },
            1,
        ),
        (
            "non finite",
            MlError::NonFinite {
                path: path(),
                name: "w".into(),
                index: 0,
                value: "NaN",
            },
            1,
        ),
        (
            "unsafe shard",
            MlError::UnsafeShard {
                index: path(),
                name: "../x".into(),
                source: Box::new(StoreError::UnsafePath {
                    path: "../x".into(),
                    reason: "escapes".into(),
                }),
            },
            1,
        ),
        (
            "outside folder",
            MlError::OutsideFolder {
                path: path(),
                dir: path(),
                problem: "resolves outside the folder",
            },
            1,
        ),
        (
            "encode",
            MlError::Encode {
                what: "a file",
                source: json_error(),
            },
            255,
        ),
        ("ml input", MlError::Input("bad".into()), 1),
        (
            "candle",
            MlError::Candle(candle_core::Error::Msg(CAUSE.into())),
            255,
        ),
    ];
    for (name, e, code) in pickle_samples() {
        out.push((name, MlError::from(e), code));
    }
    out
}

fn matrix_samples() -> Vec<(&'static str, CommandError, u8)> {
    vec![
        (
            "matrix",
            MatrixError::RowLength {
                row: 0,
                got: 1,
                tasks: 2,
            }
            .into(),
            1,
        ),
        ("matrix file", MatrixFileError::NoHeader.into(), 1),
        (
            "matrix csv",
            MatrixFileError::Csv(csv::Error::from(io_error(io::ErrorKind::InvalidData))).into(),
            1,
        ),
        ("matrix json", MatrixFileError::Json(json_error()).into(), 1),
    ]
}

fn workflow_samples() -> Vec<(&'static str, WorkflowError, u8)> {
    let mut out: Vec<(&'static str, WorkflowError, u8)> = vec![
        ("config", WorkflowError::Config("bad".into()), 1),
        (
            "unknown key",
            WorkflowError::UnknownKey {
                key: "x.y".into(),
                layer: "--set".into(),
                valid: vec!["a.b".into()],
            },
            1,
        ),
        (
            "base mismatch",
            WorkflowError::BaseMismatch {
                parent: "abc".into(),
                parent_base: "a".into(),
                config_base: "b".into(),
            },
            1,
        ),
        ("workflow input", WorkflowError::Input("bad".into()), 1),
        (
            "external command",
            WorkflowError::External {
                what: "the trainer of T".into(),
                status: "exited with status 3".into(),
                log: "/w/train.log".into(),
                tail: "boom".into(),
            },
            1,
        ),
        (
            "workflow io: missing",
            WorkflowError::Io {
                op: "read",
                path: path(),
                source: io_error(io::ErrorKind::NotFound),
            },
            1,
        ),
        (
            "workflow io: disk",
            WorkflowError::Io {
                op: "write",
                path: path(),
                source: io_error(io::ErrorKind::StorageFull),
            },
            255,
        ),
        (
            "workflow encode",
            WorkflowError::Encode {
                what: "a record",
                source: json_error(),
            },
            255,
        ),
        (
            "matrix in workflow",
            WorkflowError::Matrix(MatrixError::TooManyRows { rows: 3, tasks: 2 }),
            1,
        ),
        (
            "plot",
            WorkflowError::Plot {
                path: path(),
                message: "bad".into(),
            },
            255,
        ),
    ];
    for (name, e, code) in history_samples() {
        out.push((name, WorkflowError::History(e), code));
    }
    for (name, e, code) in store_samples() {
        out.push((name, WorkflowError::Store(e), code));
    }
    for (name, e, code) in task_samples() {
        out.push((name, WorkflowError::Task(e), code));
    }
    for (name, e, code) in ml_samples() {
        out.push((name, WorkflowError::Ml(e), code));
    }
    out
}

/// Every library error, converted: its name, the command error and the exit code docs/cli.md
/// gives its kind.
fn all_samples() -> Vec<(String, CommandError, u8)> {
    let mut out: Vec<(String, CommandError, u8)> = Vec::new();
    let mut add = |layer: &str, name: &str, e: CommandError, code: u8| {
        out.push((format!("{layer}: {name}"), e, code));
    };
    for (n, e, c) in store_samples() {
        add("StoreError", n, e.into(), c);
    }
    for (n, e, c) in history_samples() {
        add("HistoryError", n, e.into(), c);
    }
    for (n, e, c) in task_samples() {
        add("TaskError", n, e.into(), c);
    }
    for (n, e, c) in pickle_samples() {
        add("PickleError", n, e.into(), c);
    }
    for (n, e, c) in ml_samples() {
        add("MlError", n, e.into(), c);
    }
    for (n, e, c) in matrix_samples() {
        add("metrics", n, e, c);
    }
    for (n, e, c) in workflow_samples() {
        add("WorkflowError", n, e.into(), c);
    }
    add("io", "missing", io_error(io::ErrorKind::NotFound).into(), 1);
    add(
        "io",
        "permission",
        io_error(io::ErrorKind::PermissionDenied).into(),
        1,
    );
    add(
        "io",
        "disk full",
        io_error(io::ErrorKind::StorageFull).into(),
        255,
    );
    add(
        "io",
        "broken pipe",
        io_error(io::ErrorKind::BrokenPipe).into(),
        3,
    );
    add("serde_json", "encode", json_error().into(), 255);
    let closed = serde_json::to_writer(Closed, &1).unwrap_err();
    add("serde_json", "broken pipe", closed.into(), 3);
    add(
        "cli",
        "io",
        CommandError::io("read", &path(), io_error(io::ErrorKind::NotFound)),
        1,
    );
    out
}

#[test]
fn every_conversion_has_the_documented_exit_code() {
    let samples = all_samples();
    assert!(samples.len() > 150, "{}", samples.len());
    for (name, e, code) in &samples {
        assert_eq!(e.kind.exit_code(), *code, "{name}: {e}");
    }
    // The codes are the ones docs/cli.md documents.
    for (code, what) in [
        (1, "- 1: a user mistake"),
        (2, "- 2: the arguments"),
        (3, "- 3: stdout was closed"),
        (255, "- 255: an internal error"),
    ] {
        assert!(MESSAGES_AND_EXIT_CODES.contains(what), "{code}");
    }
    assert_eq!(ErrorKind::User.exit_code(), 1);
    assert_eq!(ErrorKind::Usage.exit_code(), 2);
    assert_eq!(ErrorKind::BrokenPipe.exit_code(), 3);
    assert_eq!(ErrorKind::Internal.exit_code(), 255);
}

#[test]
fn a_cause_is_printed_once() {
    let mut with_cause = 0;
    for (name, e, _) in all_samples() {
        let text = e.to_string();
        let n = text.matches(CAUSE).count();
        assert!(n <= 1, "{name}: the cause is printed {n} times: {text}");
        with_cause += n;
        // Every message starts lowercase, as docs/cli.md says (a quoted path, an option or an
        // acronym may come first).
        assert!(starts_well(&text), "{name}: {text}");
        // Every hint is a sentence.
        for h in &e.hints {
            assert!(is_sentence(h), "{name}: hint {h:?}");
        }
    }
    // Every I/O, git, thread, image, CSV and tensor cause above was printed, once.
    assert!(with_cause >= 30, "{with_cause}");
}

#[test]
fn a_command_error_prints_its_chain_after_the_message() {
    let e = CommandError::io(
        "read the corpus",
        std::path::Path::new("c.txt"),
        io_error(io::ErrorKind::NotFound),
    );
    assert_eq!(
        e.to_string(),
        format!("could not read the corpus 'c.txt': {CAUSE}")
    );
    assert_eq!(e.kind, ErrorKind::User);
    let nested = CommandError::from(HistoryError::Store(StoreError::io(
        "read",
        path(),
        io_error(io::ErrorKind::Other),
    )));
    assert_eq!(
        nested.to_string(),
        format!("could not read 'some/file': {CAUSE}")
    );
    assert_eq!(nested.kind, ErrorKind::Internal);
}

/// Words a message or hint may start with although they are capitalised.
const PROPER_WORDS: &[&str] = &[
    "CoIN",
    "CoIN-mini",
    "HTTP",
    "JSON",
    "PEFT",
    "LoRA",
    "CSV",
    "TOML",
];

fn first_word(text: &str) -> &str {
    text.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
        .next()
        .unwrap_or("")
}

/// An error message starts lowercase (or with a quote, an option, a digit or a proper word).
fn starts_well(text: &str) -> bool {
    let Some(first) = text.chars().next() else {
        return false;
    };
    !first.is_uppercase() || PROPER_WORDS.contains(&first_word(text))
}

/// A hint starts uppercase and ends with a period.
fn is_sentence(text: &str) -> bool {
    let first = text.chars().next().unwrap_or(' ');
    (first.is_uppercase() || PROPER_WORDS.contains(&first_word(text)))
        && !first.is_lowercase()
        && text.trim_end().ends_with('.')
}

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The string literal at the start of `text` (after blanks and an optional `format!(`), with
/// its escapes left as written; `None` when the argument is not a literal.
fn literal_at(text: &str) -> Option<&str> {
    let t = text.trim_start();
    let t = t.strip_prefix("format!(").map_or(t, str::trim_start);
    let (body, close) = if let Some(r) = t.strip_prefix("r#\"") {
        (r, "\"#")
    } else if let Some(r) = t.strip_prefix('"') {
        (r, "\"")
    } else {
        return None;
    };
    if close == "\"#" {
        return body.find(close).map(|end| &body[..end]);
    }
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some(&body[..i]),
            _ => escaped = false,
        }
    }
    None
}

/// The rule of docs/cli.md ("Messages"), checked over the source: every literal error message
/// of the command line and every `#[error]` message of the libraries starts lowercase, every
/// literal hint is a sentence, and no message embeds its cause (`{source}`).
#[test]
fn messages_and_hints_follow_the_house_rule() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut bad = Vec::new();
    let mut checked = [0usize; 2];
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&root).unwrap().display().to_string();
        let in_cli = shown.starts_with("cli");
        let mut check = |pattern: &str, want_sentence: bool| {
            for (at, _) in text.match_indices(pattern) {
                let Some(lit) = literal_at(&text[at + pattern.len()..]) else {
                    continue;
                };
                checked[usize::from(want_sentence)] += 1;
                let ok = if want_sentence {
                    is_sentence(lit)
                } else {
                    starts_well(lit) && !lit.contains("{source}")
                };
                if !ok {
                    bad.push(format!("{shown}: {pattern}{lit:?}"));
                }
            }
        };
        check("#[error(", false);
        if in_cli && !shown.ends_with("tests.rs") {
            check(".hint(", true);
            check("CommandError::user(", false);
            check("CommandError::usage(", false);
            check("CommandError::internal(", false);
            check("ErrorKind::User,", false);
            check("ErrorKind::Internal,", false);
        }
    }
    assert!(
        bad.is_empty(),
        "messages against the rule:\n{}",
        bad.join("\n")
    );
    // The scan sees the messages and hints (a broken scan would pass vacuously).
    assert!(checked[0] > 100 && checked[1] > 15, "{checked:?}");
    assert!(!is_sentence("see `coin log`") && !is_sentence("Run it"));
    assert!(!starts_well("Could not read") && starts_well("'a' is bad") && starts_well("HTTP 503"));
    assert_eq!(literal_at(r#" format!("a \" b", x)"#), Some(r#"a \" b"#));
}
