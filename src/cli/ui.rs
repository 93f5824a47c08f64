//! Where output goes: data on stdout, status and errors on stderr.

use std::io::{self, IsTerminal, Write};

use super::{ColorChoice, CommandError, GlobalArgs};

/// Output channels of a command. Data goes to [`Ui::out`]; status lines go to
/// [`Ui::status`], which `--quiet` silences.
pub struct Ui {
    out: io::BufWriter<io::Stdout>,
    quiet: bool,
    color: bool,
}

impl Ui {
    /// A Ui for the given global options.
    pub fn new(global: &GlobalArgs) -> Self {
        let color = match global.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        Ui {
            out: io::BufWriter::new(io::stdout()),
            quiet: global.quiet,
            color,
        }
    }

    /// stdout, for data.
    pub fn out(&mut self) -> &mut impl Write {
        &mut self.out
    }

    /// Whether status lines are shown.
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Whether to colour stdout.
    pub fn color(&self) -> bool {
        self.color
    }

    /// Whether progress bars should be drawn (stderr is a terminal and not quiet).
    pub fn show_progress(&self) -> bool {
        !self.quiet && io::stderr().is_terminal()
    }

    /// A status line on stderr (a sentence ending in a period).
    pub fn status(&self, msg: &str) {
        if !self.quiet {
            let _ = writeln!(io::stderr(), "{msg}");
        }
    }

    /// A warning on stderr, shown even with `--quiet`.
    pub fn warn(&self, msg: &str) {
        let _ = writeln!(io::stderr(), "Warning: {msg}");
    }

    /// An error line on stderr.
    pub fn error(&self, msg: &str) {
        let _ = writeln!(io::stderr(), "Error: {msg}");
    }

    /// Print `value` as pretty JSON on stdout, followed by a newline.
    pub fn json<T: serde::Serialize>(&mut self, value: &T) -> Result<(), CommandError> {
        serde_json::to_writer_pretty(&mut self.out, value)?;
        writeln!(self.out)?;
        Ok(())
    }

    /// Flush stdout.
    pub fn flush(&mut self) -> Result<(), CommandError> {
        self.out.flush()?;
        Ok(())
    }

    /// Print a failed command's error and hints on stderr.
    pub fn report(&mut self, err: &CommandError) {
        let _ = self.out.flush();
        let mut e = io::stderr().lock();
        let _ = writeln!(e, "Error: {err}");
        for h in &err.hints {
            let _ = writeln!(e, "Hint: {h}");
        }
    }
}
