//! Content-addressed object store: blake3 tensor and blob objects, the safetensors codec,
//! atomic file writes and locks. Core module: no terminal I/O, no ML engine.
//!
//! Layout and byte formats: docs/on-disk-format.md. The API is the contract shared with
//! `history` (see [`Store`]).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod codec;
mod dtype;
mod entry;
pub mod fault;
pub mod fsutil;
pub mod fuzz;
mod id;
pub mod lock;
pub mod object;
pub mod pack;
mod paths;
pub mod pickle;
mod repack;
mod repo;
pub mod s3;
pub mod safetensors;
mod torchbin;
pub mod transport;
pub mod verify;

use std::path::PathBuf;

pub use dtype::{Dtype, UnknownDtype};
pub use entry::{FileEntry, StorageEntry, StoreStats, TensorData, TensorEntry, TorchTensorEntry};
pub use id::ObjectId;
pub use lock::Lock;
pub use object::{Codec, ObjectKind};
pub use paths::{check_output_dir, check_relative_path, is_git_component};
pub use repack::RepackReport;
pub use repo::{Store, DEAD_TEMP_AGE, FORMAT_VERSION, STORE_TYPE};
pub use s3::ObjectStoreTransport;
pub use safetensors::HeaderError;

/// Errors of the object store. Messages name the path or object and the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed (the cause is the error's source).
    #[error("could not {op} '{path}'")]
    Io {
        /// What was being done ("read", "create the object directory", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory has no store (no `format-version`).
    #[error("'{path}' is not a coin store (no format-version file)")]
    NotInitialized {
        /// The .coin directory.
        path: PathBuf,
    },
    /// The store was written by an incompatible coin.
    #[error("'{path}' says '{found}', but this coin reads {expected}")]
    UnsupportedFormat {
        /// The file holding the version or type.
        path: PathBuf,
        /// Its content.
        found: String,
        /// What this coin supports.
        expected: String,
    },
    /// Not 64 lowercase hex digits.
    #[error("'{text}' is not an object id (64 lowercase hex digits)")]
    InvalidObjectId {
        /// The text (truncated).
        text: String,
    },
    /// The object is not in the store.
    #[error("object {id} is missing from the store")]
    ObjectMissing {
        /// The object.
        id: ObjectId,
    },
    /// The object's file does not hold what its id promises.
    #[error("object {id} is corrupt ('{path}'): {reason}")]
    Corrupt {
        /// The object.
        id: ObjectId,
        /// Its file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The object exists but is of another kind than the manifest says.
    #[error("object {id} is a {found}, expected a {expected}")]
    WrongKind {
        /// The object.
        id: ObjectId,
        /// Its kind.
        found: &'static str,
        /// The kind the caller asked for.
        expected: &'static str,
    },
    /// A manifest entry disagrees with the objects it names.
    #[error("cannot rebuild '{path}': {reason}")]
    EntryMismatch {
        /// The output file.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// A manifest entry that contradicts itself or the objects it names.
    #[error("the manifest entry is inconsistent: {reason}")]
    BadEntry {
        /// What disagrees.
        reason: String,
    },
    /// A file that is (by name or content) safetensors but not a valid one.
    #[error("'{path}' is not a valid safetensors file: {reason}")]
    InvalidSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong (names the tensor).
        reason: HeaderError,
    },
    /// The file changed while it was being stored.
    #[error("'{path}' changed while it was being stored; try again when nothing writes to it")]
    FileChanged {
        /// The file.
        path: PathBuf,
    },
    /// A path from a manifest or other input would escape its directory.
    #[error("unsafe path '{path}': {reason}")]
    UnsafePath {
        /// The path (truncated).
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// An object store reached over the network (S3, GCS, Azure, HTTP) refused or failed.
    #[error("could not {op} '{url}': {reason}")]
    Remote {
        /// What was being done ("list", "upload object …").
        op: String,
        /// The store's URL (`s3://bucket/prefix`) or the object's key under it.
        url: String,
        /// What the store said, classified.
        kind: RemoteErrorKind,
        /// The error text, causes included.
        reason: String,
    },
    /// Another process holds the lock.
    #[error("'{path}' is locked by another coin process (waited {waited:?})")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: std::time::Duration,
    },
}

/// What kind of failure a network object store reported, for the hint a caller gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteErrorKind {
    /// The credentials were refused (a wrong key or secret, an expired token, no access).
    Credentials,
    /// The bucket (or container) does not exist.
    NoBucket,
    /// The server could not be reached (down, wrong endpoint, network).
    Unreachable,
    /// The URL or settings are not usable (unknown scheme, missing region or bucket).
    Config,
    /// Anything else the store reported.
    Other,
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests;
