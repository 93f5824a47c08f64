//! The error type of the model engine.

use std::path::PathBuf;

/// Everything that can go wrong while loading, preparing inputs for or running a model.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    /// A file could not be read.
    #[error("could not read '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("could not write '{path}': {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
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
    #[error("the tensor '{name}' is missing from {source_desc}")]
    MissingTensor {
        /// The tensor name (as looked up, after layout resolution).
        name: String,
        /// Which files were searched.
        source_desc: String,
    },
    /// A tensor has the wrong shape.
    #[error("the tensor '{name}' in {source_desc} has shape {actual:?}, expected {expected:?}")]
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
    /// An image could not be decoded.
    #[error("could not decode the image '{path}': {message}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// An adapter directory read for further training does not match the training settings.
    #[error("the adapter '{path}' does not match the training settings: {message}")]
    AdapterMismatch {
        /// The adapter file (config or weights) that disagrees.
        path: PathBuf,
        /// What disagrees, naming the tensor or config key.
        message: String,
    },
    /// Inputs that do not fit the model (e.g. image token count).
    #[error("invalid input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
