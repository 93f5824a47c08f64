//! The one error type of the command line, with hints and exit codes, and the one place where
//! library errors become command errors: each `From` impl below maps the variants of one
//! library error to a kind (user mistake or backend failure, see [`MESSAGES_AND_EXIT_CODES`])
//! and adds the hints that say what to do.
//!
//! Library errors keep their cause out of their message and in `source()`; a command error
//! prints the message, then each cause once, after ": " (see `Display for CommandError`).

use std::fmt;
use std::path::Path;

use crate::history::HistoryError;
use crate::metrics::{MatrixError, MatrixFileError};
use crate::ml::MlError;
use crate::store::pickle::PickleError;
use crate::store::StoreError;
use crate::tasks::scoring::ScorerKind;
use crate::tasks::TaskError;
use crate::workflow::WorkflowError;

/// The "Messages" and "Exit codes" part of docs/cli.md (the rest of that page is generated
/// from the clap definitions).
pub const MESSAGES_AND_EXIT_CODES: &str = "\
## Messages

A failed command prints one `Error: …` line on stderr, then zero or more `Hint: …` lines.

- The error line is the message of what failed, then each cause once, after `: ` (`Error: could \
not read the eval results file 'a.json': No such file or directory (os error 2)`). A message starts lowercase and has \
no final period; it names the file, object or revision concerned.
- A hint says what to do about it. It is a sentence: it starts with a capital letter and ends \
with a period (``Hint: Run `coin init` to create a coin repository here, or pass -R PATH.``).
- Status lines (stderr) are sentences ending in a period, except right after an id. Data goes \
to stdout.

## Exit codes

- 0: the command did what it was asked.
- 1: a user mistake coin can explain: bad input or options that parse but make no sense \
(unknown revision, task or setting, a malformed file, a path that does not exist or that coin \
may not read), a configuration that does not fit, a hook that refused, a repository in a state \
that forbids the operation (an existing folder, a lock held by another process), and a check \
that found problems (`coin fsck`, `coin diff --fail-on-forgetting`, `coin demo --check`).
- 2: the arguments do not parse (clap) or do not make sense together.
- 3: stdout was closed by its reader (`coin log | head`); nothing is printed.
- 255: an internal error: a backend failure (I/O other than a missing path or a permission \
problem, such as a full disk; a git failure; a damaged store or history, with a hint to run \
`coin fsck`) or a bug (a tensor operation or an encoding that failed, a plot that could not be \
drawn).
";

/// What kind of failure a command ended with; decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input, configuration or repository state the user can fix (exit 1).
    User,
    /// The arguments do not make sense together (exit 2).
    Usage,
    /// stdout was closed by the reader, e.g. `coin log | head` (exit 3, no message).
    BrokenPipe,
    /// A backend failure (I/O, git, a damaged store) or a bug (exit 255).
    Internal,
}

impl ErrorKind {
    /// The process exit code of this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::User => 1,
            ErrorKind::Usage => 2,
            ErrorKind::BrokenPipe => 3,
            ErrorKind::Internal => 255,
        }
    }
}

/// A failed command: what went wrong, and hints on what to do about it.
#[derive(Debug)]
pub struct CommandError {
    /// Decides the exit code.
    pub kind: ErrorKind,
    /// The cause, printed as `Error: {error}` followed by its source chain.
    pub error: Box<dyn std::error::Error + Send + Sync>,
    /// Printed as `Hint: …` lines.
    pub hints: Vec<String>,
}

/// A message of the command line with the error that caused it (printed after it, once).
#[derive(Debug)]
struct Caused {
    message: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl fmt::Display for Caused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Caused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

impl CommandError {
    /// A new error of `kind` from any error value.
    pub fn new(
        kind: ErrorKind,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        CommandError {
            kind,
            error: error.into(),
            hints: Vec::new(),
        }
    }

    /// An error of `kind`: `message`, caused by `cause` (which is printed after it).
    pub fn caused(
        kind: ErrorKind,
        message: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::new(
            kind,
            Caused {
                message: message.into(),
                source: cause.into(),
            },
        )
    }

    /// A failed file operation: "could not {op} '{path}'", caused by `source`; a user error
    /// when the path is at fault ([`io_kind`]).
    pub fn io(op: &str, path: &Path, source: std::io::Error) -> Self {
        Self::caused(
            io_kind(&source),
            format!("could not {op} '{}'", path.display()),
            source,
        )
    }

    /// A user error with a message.
    pub fn user(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::User, msg.into())
    }

    /// A usage error with a message.
    pub fn usage(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, msg.into())
    }

    /// An internal error with a message.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, msg.into())
    }

    /// Add a hint line (a sentence: capital first letter, final period).
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
        self
    }
}

impl fmt::Display for CommandError {
    /// The message, then each cause after ": ". A cause whose text the error before it already
    /// ends with is skipped: some errors of other crates (rayon's, for one) print their source
    /// in their own message too.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.error.to_string();
        f.write_str(&last)?;
        let mut source = self.error.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = s.source();
        }
        Ok(())
    }
}

/// The kind of a failed file operation: a user error when the path is at fault (it does not
/// exist, coin may not read it, it is a folder where a file is expected or the reverse, it
/// exists where it must not), an internal error otherwise (a full disk, a device error, …).
pub fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound
        | K::PermissionDenied
        | K::IsADirectory
        | K::NotADirectory
        | K::AlreadyExists
        | K::InvalidFilename => ErrorKind::User,
        K::BrokenPipe => ErrorKind::BrokenPipe,
        _ => ErrorKind::Internal,
    }
}

const FSCK_HINT: &str = "Run `coin fsck` for details.";

/// For `?` on writes to stdout; a command that reads or writes a file names it with
/// [`CommandError::io`].
impl From<std::io::Error> for CommandError {
    fn from(e: std::io::Error) -> Self {
        CommandError::caused(io_kind(&e), "could not write the output", e)
    }
}

/// For `?` on JSON written to stdout (`--json`).
impl From<serde_json::Error> for CommandError {
    fn from(e: serde_json::Error) -> Self {
        let kind = match e.io_error_kind() {
            Some(std::io::ErrorKind::BrokenPipe) => ErrorKind::BrokenPipe,
            _ => ErrorKind::Internal,
        };
        CommandError::caused(kind, "could not write the JSON output", e)
    }
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        use StoreError as E;
        match &e {
            E::Io { source, .. } => CommandError::new(io_kind(source), e),
            E::Corrupt { path, .. }
                if crate::store::s3::is_object_store_url(&path.to_string_lossy()) =>
            {
                CommandError::new(ErrorKind::Internal, e).hint(
                    "The copy on the object store is damaged and was not kept here. \
                     `coin fsck --remote NAME` lists every damaged object there; delete them on \
                     the server and push again from a repository that has them intact.",
                )
            }
            E::ObjectMissing { .. }
            | E::Corrupt { .. }
            | E::WrongKind { .. }
            | E::EntryMismatch { .. }
            | E::BadEntry { .. } => CommandError::new(ErrorKind::Internal, e).hint(FSCK_HINT),
            E::NotInitialized { .. } => CommandError::new(ErrorKind::User, e)
                .hint("Run `coin init` to create a coin repository here, or pass -R PATH."),
            E::UnsupportedFormat { .. }
            | E::InvalidObjectId { .. }
            | E::InvalidSafetensors { .. }
            | E::FileChanged { .. }
            | E::UnsafePath { .. }
            | E::Locked { .. } => CommandError::new(ErrorKind::User, e),
            E::Remote { kind, .. } => {
                use crate::store::RemoteErrorKind as K;
                let hint = match kind {
                    K::Credentials => {
                        "Check the credentials in the environment (AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; GOOGLE_SERVICE_ACCOUNT for gs://, \
                         AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY for az://); see \
                         docs/remotes.md."
                    }
                    K::NoBucket => {
                        "Create the bucket first (e.g. `aws s3 mb s3://BUCKET`), or fix the \
                         bucket name with `git config remote.NAME.coinobjects s3://BUCKET/PREFIX`."
                    }
                    K::Unreachable => {
                        "Check that the server is up and the endpoint (AWS_ENDPOINT_URL) is \
                         right, then re-run: objects already sent are skipped."
                    }
                    K::Config => {
                        "See docs/remotes.md for the object store URLs and settings coin \
                         understands."
                    }
                    K::Other => "Re-run the command: objects already sent are skipped.",
                };
                // A refused key, a missing bucket or a server that is down is the user's to fix;
                // anything else the store said is reported as an internal error.
                let kind = match kind {
                    K::Other => ErrorKind::Internal,
                    _ => ErrorKind::User,
                };
                CommandError::new(kind, e).hint(hint)
            }
        }
    }
}

impl From<HistoryError> for CommandError {
    fn from(e: HistoryError) -> Self {
        use HistoryError as E;
        let user = |e| CommandError::new(ErrorKind::User, e);
        match e {
            E::Store(s) => s.into(),
            E::Io { ref source, .. } => CommandError::new(io_kind(source), e),
            E::Git { .. } => CommandError::new(ErrorKind::Internal, e),
            E::BadFile { .. } => CommandError::new(ErrorKind::Internal, e).hint(FSCK_HINT),
            // Some of these messages already say what to do.
            E::Corrupt(ref m) if m.contains("run `") || m.contains("run the command") => {
                CommandError::new(ErrorKind::Internal, e)
            }
            E::Corrupt(_) | E::Record { .. } => {
                CommandError::new(ErrorKind::Internal, e).hint(FSCK_HINT)
            }
            E::NotARepo(_) => {
                user(e).hint("Run `coin init` to create a coin repository here, or pass -R PATH.")
            }
            E::AmbiguousRevision { .. } => user(e).hint(
                "Give more hex digits of the id. A branch or tag named like an id (made with plain \
                 git) is removed with `git update-ref -d refs/coin/heads/NAME`.",
            ),
            E::UnknownRevision(_) => user(e).hint(
                "A revision is a checkpoint id (or a unique prefix of 4+ hex digits), a branch, \
                 a tag or HEAD, optionally followed by ~N; see `coin log`.",
            ),
            E::EmptyBranch(_) => {
                user(e).hint("Commit a checkpoint first with `coin commit PATH --task NAME`.")
            }
            E::NoSuchBranch(_) => user(e)
                .hint("List branches with `coin branch`; create one with `coin switch -c NAME`."),
            E::AlreadyInitialized(_)
            | E::GitLocked { .. }
            | E::BadRevision { .. }
            | E::RefExists { .. }
            | E::InvalidName { .. }
            | E::BranchMoved { .. }
            | E::NotACheckpoint(_)
            | E::Config { .. }
            | E::Input(_)
            | E::HookRefused { .. } => user(e),
        }
    }
}

impl From<TaskError> for CommandError {
    fn from(e: TaskError) -> Self {
        use TaskError as E;
        let user = |e| CommandError::new(ErrorKind::User, e);
        match e {
            E::Io { ref source, .. } => CommandError::new(io_kind(source), e),
            E::Threads(_) => CommandError::new(ErrorKind::Internal, e),
            E::UnknownTask(_) => user(e).hint(format!(
                "CoIN tasks: {}; `coin task list` shows registered ones.",
                ScorerKind::ALL.map(|k| k.name()).join(", ")
            )),
            E::MissingImages { .. } => {
                user(e).hint("Check the image root of the task (`coin task show TASK`).")
            }
            E::TooLong { .. } => user(e).hint(
                "Is this the right file? Answer lines and data records are a few KiB at most.",
            ),
            E::Format { .. }
            | E::Record { .. }
            | E::Line { .. }
            | E::ImagePathEscapes { .. }
            | E::Scoring { .. }
            | E::NothingScored { .. }
            | E::Registry(_)
            | E::Judge { .. } => user(e),
        }
    }
}

impl From<PickleError> for CommandError {
    fn from(e: PickleError) -> Self {
        match &e {
            PickleError::Io { source, .. } => CommandError::new(io_kind(source), e),
            PickleError::Zip { .. } | PickleError::Invalid { .. } => {
                CommandError::new(ErrorKind::User, e)
            }
        }
    }
}

impl From<MlError> for CommandError {
    fn from(e: MlError) -> Self {
        use MlError as E;
        match e {
            E::Read { ref source, .. } | E::Write { ref source, .. } => {
                CommandError::new(io_kind(source), e)
            }
            E::Checkpoint(p) => (*p).into(),
            E::Candle(_) | E::Encode { .. } => CommandError::new(ErrorKind::Internal, e),
            E::SentencePiece { .. } => CommandError::new(ErrorKind::User, e).hint(
                "Copy tokenizer.model again from the model's source if it is damaged; coin reads \
                 LLaMA-style SentencePiece BPE models only (docs/model.md, Tokenizers), so for \
                 another kind give the folder a tokenizer.json.",
            ),
            E::Parse { .. }
            | E::MissingTensor { .. }
            | E::ShapeMismatch { .. }
            | E::Unsupported { .. }
            | E::NotAModel { .. }
            | E::Tokenizer { .. }
            | E::MissingImage { .. }
            | E::Image { .. }
            | E::AdapterMismatch { .. }
            | E::NonFinite { .. }
            | E::UnsafeShard { .. }
            | E::OutsideFolder { .. }
            | E::Input(_) => CommandError::new(ErrorKind::User, e),
        }
    }
}

impl From<MatrixError> for CommandError {
    fn from(e: MatrixError) -> Self {
        CommandError::new(ErrorKind::User, e)
    }
}

impl From<MatrixFileError> for CommandError {
    fn from(e: MatrixFileError) -> Self {
        CommandError::new(ErrorKind::User, e)
    }
}

impl From<WorkflowError> for CommandError {
    fn from(e: WorkflowError) -> Self {
        use WorkflowError as E;
        match e {
            E::History(h) => h.into(),
            E::Store(s) => s.into(),
            E::Task(t) => t.into(),
            E::Ml(m) => m.into(),
            E::Matrix(m) => m.into(),
            E::Io { ref source, .. } => CommandError::new(io_kind(source), e),
            E::Encode { .. } | E::Plot { .. } => CommandError::new(ErrorKind::Internal, e),
            E::UnknownKey { .. } => CommandError::new(ErrorKind::User, e)
                .hint("See docs/config.md for every setting and its default."),
            E::BaseMismatch { .. } => CommandError::new(ErrorKind::User, e).hint(
                "Set model.name (and model.base) to the parent's base model, or start a new \
                 branch from a checkpoint of this base.",
            ),
            E::External { .. } => CommandError::new(ErrorKind::User, e).hint(
                "Fix the command or its input, then run the same coin command again: the step \
                 runs again (its output folder is kept, so a trainer that resumes from its own \
                 checkpoints continues); steps already committed are not repeated.",
            ),
            E::Config(_) | E::Input(_) => CommandError::new(ErrorKind::User, e),
        }
    }
}

#[cfg(test)]
mod tests;
