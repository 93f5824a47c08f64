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
    #[error("could not {op} '{path}': {source}")]
    Io {
        /// What was being done ("read", "write", "create the folder", …).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not what its reader expects as a whole (not a JSON list, bad TOML, …).
    #[error("'{path}' is not a valid {what}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the file should be ("CoIN test file", "task definition", …).
        what: &'static str,
        /// The parser's message.
        message: String,
    },
    /// One record of a file is broken.
    #[error("record {index} of '{path}' is broken: {message}")]
    Record {
        /// The file.
        path: PathBuf,
        /// 0-based index of the record in the list (or line number, 1-based, for JSONL).
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// An image path points outside the image root.
    #[error("image path '{image}' escapes the image root '{root}'")]
    ImagePathEscapes {
        /// The path as written in the record.
        image: String,
        /// The image root.
        root: PathBuf,
    },
    /// Images named by a data file do not exist.
    #[error("{count} image(s) missing under '{root}', e.g. {}", first.join(", "))]
    MissingImages {
        /// How many are missing.
        count: usize,
        /// The first few missing paths.
        first: Vec<String>,
        /// The image root.
        root: PathBuf,
    },
    /// A task name that is neither a CoIN task nor a registered one.
    #[error("unknown task '{0}'")]
    UnknownTask(String),
    /// Scoring is impossible with the inputs given.
    #[error("cannot score {task}: {message}")]
    Scoring {
        /// The task.
        task: String,
        /// Why.
        message: String,
    },
    /// The task registry or a template is inconsistent.
    #[error("{0}")]
    Registry(String),
    /// The judge endpoint failed.
    #[error("judge endpoint '{endpoint}': {message}")]
    Judge {
        /// The endpoint URL.
        endpoint: String,
        /// What went wrong.
        message: String,
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
