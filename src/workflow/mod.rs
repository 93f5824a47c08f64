//! The continual-instruction-tuning workflow on top of the core modules: the resolved run
//! configuration ([`config`], its `[runtime]` resolved once per run and recorded with every
//! train and eval record), evaluating checkpoints and attaching the records ([`eval`]),
//! the accuracy matrix of a branch ([`matrix`]), comparing task orders ([`compare`]) and
//! plotting ([`plot`]).
//!
//! This module may use the ML engine, history, tasks and metrics; it never prints. Long work
//! reports progress through [`eval::EvalProgress`], which the command line implements.
//! Commands: docs/workflow.md; configuration: docs/config.md.
#![warn(missing_docs)]

pub mod bisect;
pub mod compare;
pub mod config;
pub mod demo;
pub mod eval;
pub mod external;
pub mod import;
pub mod matrix;
pub mod merge;
pub mod methods;
pub mod plot;
pub mod plot_compare;
mod plot_font;
pub mod train;

pub use config::RunConfig;

/// Errors of the workflow.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// A configuration value or layer is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A configuration key that does not exist.
    #[error("configuration: {layer} sets '{key}', which is not a setting; valid keys: {}", valid.join(", "))]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// Which layer set it.
        layer: String,
        /// Every valid dotted key.
        valid: Vec<String>,
    },
    /// The parent checkpoint was made for another base model.
    #[error("checkpoint {parent} was trained on base model '{parent_base}', but the configuration names '{config_base}'")]
    BaseMismatch {
        /// The parent (short id).
        parent: String,
        /// Its recorded base model.
        parent_base: String,
        /// The configured base model name (`model.name`).
        config_base: String,
    },
    /// Wrong input from the user (unknown task, missing data, ...), said in words.
    #[error("{0}")]
    Input(String),
    /// A file operation failed.
    #[error("could not {op} '{path}'")]
    Io {
        /// What was being done ("read", "create", "read the answer file", ...).
        op: &'static str,
        /// The file or folder.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document the workflow made could not be encoded (a bug).
    #[error("could not encode {what} as JSON")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// History failed.
    #[error(transparent)]
    History(#[from] crate::history::HistoryError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Reading or scoring task data failed.
    #[error(transparent)]
    Task(#[from] crate::tasks::TaskError),
    /// The model engine failed.
    #[error(transparent)]
    Ml(#[from] crate::ml::MlError),
    /// The metrics could not be computed.
    #[error(transparent)]
    Matrix(#[from] crate::metrics::MatrixError),
    /// An external trainer or evaluator command did not exit with status 0.
    #[error("{what} {status}; the end of its log '{}':\n{tail}", log.display())]
    External {
        /// Which command ("the trainer of mini-GQA").
        what: String,
        /// How it ended ("exited with status 3", "was killed by signal 9").
        status: String,
        /// Its whole log.
        log: std::path::PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// The plotting backend failed (a bug: bad input is [`WorkflowError::Input`]).
    #[error("could not draw the plot '{path}': {message}")]
    Plot {
        /// The output file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl WorkflowError {
    /// A failed file operation `op` on `path`, for `map_err`.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<std::path::PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> WorkflowError {
        let path = path.into();
        move |source| WorkflowError::Io { op, path, source }
    }
}
