//! The error type of the model engine.
//!
//! Tensor and key names that come from a file are shown escaped ([`escape_name`]): a name with
//! control characters cannot rewrite the terminal.

use std::path::PathBuf;

use crate::store::pickle::PickleError;
use crate::store::StoreError;

/// A name taken from a file, escaped for messages (`str::escape_debug`).
pub fn escape_name(name: &str) -> String {
    name.escape_debug().to_string()
}

/// Everything that can go wrong while loading, preparing inputs for or running a model.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    /// A file could not be read.
    #[error("could not read '{path}'")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("could not write '{path}'")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse or lacks a field.
    #[error("could not parse '{path}': {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A checkpoint lacks a tensor the model needs.
    #[error("the tensor '{}' is missing from {source_desc}", .name.escape_debug())]
    MissingTensor {
        /// The tensor name (as looked up, after layout resolution).
        name: String,
        /// Which files were searched.
        source_desc: String,
    },
    /// A tensor has the wrong shape.
    #[error(
        "the tensor '{}' in {source_desc} has shape {actual:?}, expected {expected:?}",
        .name.escape_debug()
    )]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// Which files were searched.
        source_desc: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape on disk.
        actual: Vec<usize>,
    },
    /// The model configuration is something this engine does not implement.
    #[error("unsupported model configuration in '{path}': {message}")]
    Unsupported {
        /// The config (or adapter config) file.
        path: PathBuf,
        /// What is unsupported.
        message: String,
    },
    /// The directory does not look like any supported model layout.
    #[error("'{path}' is not a model directory: {message}")]
    NotAModel {
        /// The directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Tokenizer failure.
    #[error("tokenizer error ({context}): {message}")]
    Tokenizer {
        /// What was being done.
        context: String,
        /// The tokenizers crate's message.
        message: String,
    },
    /// A SentencePiece `tokenizer.model` that cannot be used (corrupt, or a kind of model coin
    /// does not implement).
    #[error("could not load the SentencePiece model '{path}'")]
    SentencePiece {
        /// The `tokenizer.model` file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: super::spm::SpmError,
    },
    /// An image file is missing.
    #[error("the image '{path}' does not exist")]
    MissingImage {
        /// The image file.
        path: PathBuf,
    },
    /// An image could not be read or decoded.
    #[error("could not decode the image '{path}'")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// An adapter directory read for further training does not match the training settings.
    #[error("the adapter '{path}' does not match the training settings: {message}")]
    AdapterMismatch {
        /// The adapter file (config or weights) that disagrees.
        path: PathBuf,
        /// What disagrees, naming the tensor or config key.
        message: String,
    },
    /// A PyTorch `.bin` checkpoint that cannot be read safely (the message names the file and
    /// what is wrong).
    #[error(transparent)]
    Checkpoint(Box<PickleError>),
    /// A floating-point tensor holds NaN or an infinity.
    #[error(
        "the tensor '{}' in '{path}' holds {value} at element {index}; the checkpoint is damaged \
         or the training that wrote it diverged",
        .name.escape_debug()
    )]
    NonFinite {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The first bad element (row-major).
        index: usize,
        /// `NaN` or `an infinity`.
        value: &'static str,
    },
    /// A shard named by an index file is not a plain relative path.
    #[error(
        "'{index}' names the shard '{}', which is not a plain relative path inside the model \
         folder; fix or remove the index",
        .name.escape_debug()
    )]
    UnsafeShard {
        /// The `*.index.json` file.
        index: PathBuf,
        /// The shard name as written.
        name: String,
        /// Why the path is refused.
        #[source]
        source: Box<StoreError>,
    },
    /// A weight file of a model or adapter folder resolves outside it (a link or `..`), or is not
    /// a regular file.
    #[error("'{path}' {problem} '{dir}'; weight files must be regular files inside their folder")]
    OutsideFolder {
        /// The file as found or named.
        path: PathBuf,
        /// The folder.
        dir: PathBuf,
        /// "resolves outside the folder" or "is not a regular file in".
        problem: &'static str,
    },
    /// A JSON document coin made could not be encoded (a bug).
    #[error("could not encode {what} as JSON")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// Inputs that do not fit the model (e.g. image token count).
    #[error("invalid input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error("a tensor operation failed")]
    Candle(#[from] candle_core::Error),
}

impl From<PickleError> for MlError {
    fn from(e: PickleError) -> Self {
        MlError::Checkpoint(Box::new(e))
    }
}
