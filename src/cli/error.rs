//! The one error type of the command line, with hints and exit codes.

use std::fmt;

/// What kind of failure a command ended with; decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input, configuration or repository state the user can fix (exit 1).
    User,
    /// The arguments do not make sense together (exit 2).
    Usage,
    /// stdout was closed by the reader, e.g. `coin log | head` (exit 3, no message).
    BrokenPipe,
    /// A bug or an environment failure coin cannot explain (exit 255).
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

    /// Add a hint line.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
        self
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        let mut source = self.error.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl From<std::io::Error> for CommandError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CommandError::new(ErrorKind::BrokenPipe, e)
        } else {
            CommandError::new(ErrorKind::User, e)
        }
    }
}

impl From<serde_json::Error> for CommandError {
    fn from(e: serde_json::Error) -> Self {
        CommandError::new(ErrorKind::Internal, e)
    }
}
