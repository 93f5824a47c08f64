//! Checkpoint history on git (git2): commits, coin refs, notes, manifests, revisions, diff.
//! Core module: no terminal I/O, no ML engine.
//!
//! A checkpoint is a real git commit whose tree holds `manifest`, `train` and `eval/<task>`
//! (see [`records`]); its parent is the checkpoint it was trained from. Refs live under
//! `refs/coin/` so coin can share a repository with code without touching its branches; the
//! current branch is the symbolic ref `refs/coin/HEAD`. Eval records attached later are git
//! notes under `refs/notes/coin`. The weights themselves are store objects (`crate::store`),
//! referenced by id from the manifest. The layout is documented in docs/history.md.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod checkpoint;
mod diff;
mod forgetting;
pub mod hooks;
mod id;
mod maintenance;
pub mod records;
pub mod remote;
mod repo;
mod revision;

use std::path::PathBuf;

pub use checkpoint::{
    Checkpoint, CommitOutcome, CommitRequest, EvalSource, SourceFile, LOG_ATTACHMENT,
    MAX_ATTACHMENT_BYTES,
};
pub use diff::{diff_checkpoints, CheckpointDiff, EvalDelta, FileChange, TensorChange};
pub use forgetting::{
    forgetting_along_path, forgetting_from_scores, ForgettingReport, TaskForgetting, TaskScores,
};
pub use id::{CheckpointId, InvalidCheckpointId};
pub use maintenance::{DroppedNote, FsckProblem, FsckReport, GcReport, RepoStats};
pub use records::{
    parse_eval_file, parse_manifest, AdapterInfo, BaseModel, EvalRecord, Manifest, TrainRecord,
};
pub use repo::{
    CoinRepo, InitOptions, InitOutcome, BRANCH_PREFIX, DEFAULT_BRANCH, HEAD_REF, NOTES_REF,
    TAG_PREFIX,
};

/// Every fault-injection point on the `commit` and `gc` paths of the history side, in the
/// order they are reached. Setting `COIN_FAULT=<point>` (or `<point>:N`, the N-th time) aborts
/// the process there; the crash tests run every one of them (and the store's own points).
pub const FAULT_POINTS: &[&str] = &[
    "commit.after_lock",
    "commit.after_objects",
    "commit.after_git_objects",
    "commit.after_ref",
    "note.after_lock",
    "note.after_write",
    "gc.after_mark",
    "gc.after_remove",
    "gc.after_prune",
];

/// Errors of the history module.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// No `.coin/` directory above the start directory.
    #[error("'{0}' is not inside a coin repository (no .coin/ directory found here or above)")]
    NotARepo(PathBuf),
    /// `coin init` where a coin repository already exists.
    #[error("'{0}' is already a coin repository")]
    AlreadyInitialized(PathBuf),
    /// A git operation failed.
    #[error("could not {op}")]
    Git {
        /// What coin was doing.
        op: String,
        /// The libgit2 error.
        #[source]
        source: GitCause,
    },
    /// A git lock file is in the way: another process is changing that file, or one was
    /// killed while doing so.
    #[error(
        "could not {op}: '{path}' exists; another git or coin process is changing it, or one \
         was killed while doing so. If none is running, delete '{path}' and run the command again"
    )]
    GitLocked {
        /// What coin was doing.
        op: String,
        /// The lock file.
        path: String,
    },
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A file operation failed.
    #[error("could not {op} '{path}'")]
    Io {
        /// What coin was doing.
        op: String,
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file of a checkpoint whose manifest entry disagrees with the store (a missing or
    /// wrong object, a size or header that does not add up).
    #[error("file '{path}' of checkpoint {checkpoint} cannot be rebuilt")]
    BadFile {
        /// The checkpoint (short id).
        checkpoint: String,
        /// The file's path in the checkpoint (escaped).
        path: String,
        /// What is wrong.
        #[source]
        source: Box<crate::store::StoreError>,
    },
    /// A revision that names nothing.
    #[error("unknown revision '{0}'")]
    UnknownRevision(String),
    /// A hex prefix that matches several checkpoints.
    #[error("revision '{rev}' is ambiguous: it matches {}", candidates.join(", "))]
    AmbiguousRevision {
        /// The revision as given.
        rev: String,
        /// The matching ids (short).
        candidates: Vec<String>,
    },
    /// A revision with bad syntax or that walks past the first checkpoint.
    #[error("invalid revision '{rev}': {message}")]
    BadRevision {
        /// The revision as given.
        rev: String,
        /// What is wrong.
        message: String,
    },
    /// The current branch has no checkpoint yet.
    #[error("branch '{0}' has no checkpoints yet")]
    EmptyBranch(String),
    /// A branch name that is not known.
    #[error("no branch named '{0}'")]
    NoSuchBranch(String),
    /// Creating a branch or tag that exists.
    #[error("{kind} '{name}' already exists")]
    RefExists {
        /// `branch` or `tag`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A branch or tag name git would not accept.
    #[error("'{name}' is not a valid {kind} name: {reason}")]
    InvalidName {
        /// `branch` or `tag`.
        kind: &'static str,
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The branch moved while a commit was being made (compare-and-swap failed).
    #[error(
        "branch '{branch}' moved from {expected} to {actual} while committing; nothing was changed, re-run the command to commit on top of the new head"
    )]
    BranchMoved {
        /// The branch.
        branch: String,
        /// The head the commit was based on (`(none)` for a new branch).
        expected: String,
        /// The head found when updating.
        actual: String,
    },
    /// A commit that is not a coin checkpoint.
    #[error("{0} is not a coin checkpoint (its tree has no coin manifest)")]
    NotACheckpoint(String),
    /// A malformed record or manifest stored in the history (damage, or a forged checkpoint).
    #[error("invalid {what}: {message}")]
    Record {
        /// Which record.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// A malformed file the user edits (`.coin/config.toml`, a pointer file).
    #[error("invalid {what}: {message}")]
    Config {
        /// Which file.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Bad user input (paths, names, options).
    #[error("{0}")]
    Input(String),
    /// The repository is damaged in a way that makes the operation unsafe.
    #[error("{0}")]
    Corrupt(String),
    /// A `pre-*` hook vetoed the operation; nothing was recorded.
    #[error("the {event} hook refused ({}); nothing was recorded{}", code.map_or("killed by a signal".to_string(), |c| format!("exit status {c}")), if output.is_empty() { String::new() } else { format!(":\n{output}") })]
    HookRefused {
        /// The event (`pre-checkpoint`).
        event: String,
        /// The hook's exit code.
        code: Option<i32>,
        /// What it printed (stdout, then stderr).
        output: String,
    },
}

/// A libgit2 error as the cause of a [`HistoryError::Git`]: shown by its message alone
/// (libgit2's own text repeats the class and code, which say nothing to a user).
#[derive(Debug)]
pub struct GitCause(pub git2::Error);

impl std::fmt::Display for GitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
}

impl std::error::Error for GitCause {}

impl HistoryError {
    pub(crate) fn git(op: impl Into<String>) -> impl FnOnce(git2::Error) -> HistoryError {
        let op = op.into();
        move |source| {
            if source.code() == git2::ErrorCode::Locked {
                // libgit2: "failed to lock file '<path>.lock' for writing: ..."
                let msg = source.message();
                let path = msg
                    .split('\'')
                    .nth(1)
                    .filter(|p| p.ends_with(".lock"))
                    .map(str::to_string);
                if let Some(path) = path {
                    return HistoryError::GitLocked { op, path };
                }
            }
            HistoryError::Git {
                op,
                source: GitCause(source),
            }
        }
    }

    pub(crate) fn io(
        op: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> HistoryError {
        let op = op.into();
        let path = path.into();
        move |source| HistoryError::Io { op, path, source }
    }
}

/// Fuzz body of the manifest parser (`fuzz/fuzz_targets/manifest.rs`, also run by the unit
/// tests on hostile input): never panics; an accepted manifest passes the path checks as a
/// whole and round-trips through its canonical text.
pub fn fuzz_manifest(data: &[u8]) {
    if let Ok(m) = parse_manifest(data) {
        records::validate_manifest_paths(m.files.keys()).expect("accepted paths are valid");
        for p in m.files.keys() {
            crate::store::fuzz::relative_path(p.as_bytes());
        }
        let text = records::to_canonical_json(&m).expect("a manifest serialises");
        let back = parse_manifest(text.as_bytes()).expect("its canonical text parses");
        assert_eq!(back, m);
    }
}

/// Test hook for deterministic concurrency tests: when `COIN_TEST_PAUSE=<name>:<dir>` names
/// this point, create `<dir>/<name>.reached` and wait (up to 120 s) until `<dir>/<name>.go`
/// exists. A no-op otherwise.
pub fn pause(name: &str) {
    let Ok(spec) = std::env::var("COIN_TEST_PAUSE") else {
        return;
    };
    for item in spec.split(',') {
        let Some((point, dir)) = item.split_once(':') else {
            continue;
        };
        if point != name {
            continue;
        }
        let dir = std::path::Path::new(dir);
        let _ = crate::store::fsutil::write_atomic(dir.join(format!("{name}.reached")), b"");
        let go = dir.join(format!("{name}.go"));
        let start = std::time::Instant::now();
        while !go.exists() && start.elapsed() < std::time::Duration::from_secs(120) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
