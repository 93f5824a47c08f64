//! Tasks: CoIN data formats, instruction templates, scorers, the LLM judge, CoIN-mini.
//! Core module: no terminal I/O, no ML engine.
//!
//! - [`formats`]: readers for CoIN's `train.json`, `test.json`/`val.json` and answer files
//!   (JSONL), streaming, with image-path checks and dataset identity.
//! - [`normalize`]: the EvalAI/VQA answer normaliser used by TextVQA (and by strict VQA scorers).
//! - [`scoring`]: one scorer per CoIN task, in `compat` (what CoIN computes) and `strict` modes.
//! - [`registry`]: the task registry (`.coin/tasks/*.toml`) and the instruction templates.
//! - [`mini`]: the CoIN-mini generator (eight small CoIN-shaped tasks, real PNG images).
//! - [`judge`]: the general-knowledge LLM judge (prompts, score parsing, an HTTP client).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod formats;
pub mod judge;
pub mod mini;
pub mod normalize;
pub mod registry;
pub mod rng;
pub mod scoring;

use std::path::PathBuf;

pub use mini::{chance_level, coin_mini_corpus};
pub use scoring::{ScoreMode, ScoreReport, ScorerKind};

/// Everything that can go wrong in the tasks module.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A file could not be read, written or listed.
    #[error("could not {op} '{path}'")]
    Io {
        /// What was being done ("read", "write", "create the folder", …).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what its reader expects as a whole (not a JSON list, bad TOML, …).
    #[error("'{path}' is not a valid {what}: {}", formats::Escaped(message))]
    Format {
        /// The file.
        path: PathBuf,
        /// What the file should be ("CoIN test file", "task definition", …).
        what: &'static str,
        /// The parser's message.
        message: String,
    },
    /// One record of a file is broken.
    #[error("record {index} of '{path}' is broken: {}", formats::Escaped(message))]
    Record {
        /// The file.
        path: PathBuf,
        /// 0-based index of the record in the list.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// One line of a JSONL file (answers, judge replies, judge progress) is broken.
    #[error("line {line} of '{path}' is broken: {}", formats::Escaped(message))]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A line or a record is longer than the readers' limit ([`formats::MAX_RECORD_BYTES`]).
    #[error(
        "{place} of '{path}' is longer than {}, the most coin reads as one record",
        formats::size_text(*limit)
    )]
    TooLong {
        /// The file.
        path: PathBuf,
        /// Where: "line 7" (JSONL) or "record 3" (0-based, JSON list).
        place: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// An image path points outside the image root.
    #[error(
        "image path '{}' escapes the image root '{root}'",
        formats::Escaped(image)
    )]
    ImagePathEscapes {
        /// The path as written in the record.
        image: String,
        /// The image root.
        root: PathBuf,
    },
    /// Images named by a data file do not exist.
    #[error("{count} image(s) missing under '{root}', e.g. {}", formats::Escaped(&first.join(", ")))]
    MissingImages {
        /// How many are missing.
        count: usize,
        /// The first few missing paths.
        first: Vec<String>,
        /// The image root.
        root: PathBuf,
    },
    /// A task name that is neither a CoIN task nor a registered one.
    #[error("unknown task '{}'", formats::Escaped(.0))]
    UnknownTask(String),
    /// Scoring is impossible with the inputs given.
    #[error(
        "cannot score {}: {}",
        formats::Escaped(task),
        formats::Escaped(message)
    )]
    Scoring {
        /// The task.
        task: String,
        /// Why.
        message: String,
    },
    /// A scorer visited no question: a score over nothing would read as 0 (or as anything).
    #[error(
        "cannot score {}: no question was scored, {reason}",
        formats::Escaped(task)
    )]
    NothingScored {
        /// The task.
        task: String,
        /// Why nothing was scored.
        reason: &'static str,
    },
    /// The writer threads could not be started.
    #[error("could not start the writer threads")]
    Threads(#[source] rayon::ThreadPoolBuildError),
    /// The task registry or a template is inconsistent.
    #[error("{0}")]
    Registry(String),
    /// The judge endpoint gave no usable reply.
    #[error("the judge endpoint '{endpoint}' gave no usable reply ({attempts} attempt(s))")]
    Judge {
        /// The endpoint URL.
        endpoint: String,
        /// How many requests were made.
        attempts: u32,
        /// What went wrong with the last one.
        #[source]
        source: Box<judge::JudgeFailure>,
    },
}

impl TaskError {
    /// An I/O error with its operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TaskError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
