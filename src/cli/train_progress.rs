//! The training progress display: a bar with step, loss, learning rate, tokens/s and ETA on a
//! terminal; one status line every ~10 % of the run otherwise (logs, CI). Ctrl-C is not caught
//! here: a killed run resumes from its last checkpoint.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::ml::train::trainer::{StepInfo, TrainProgress};

/// Draws training progress on stderr.
pub struct TrainBar {
    bar: Option<ProgressBar>,
    quiet: bool,
    label: String,
    last_logged: usize,
    total: usize,
}

impl TrainBar {
    /// A display for the training of `label` (e.g. the task name). `interactive`: draw a bar
    /// (a terminal); otherwise print occasional lines unless `quiet`.
    pub fn new(label: &str, interactive: bool, quiet: bool) -> Self {
        let bar = (interactive && !quiet).then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        TrainBar {
            bar,
            quiet,
            label: label.to_string(),
            last_logged: 0,
            total: 0,
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn message(info: &StepInfo) -> String {
    format!(
        "loss {:.4}  lr {:.2e}  {:.0} tok/s",
        info.loss, info.lr, info.tokens_per_s
    )
}

impl TrainProgress for TrainBar {
    fn begin(&mut self, total_steps: usize, start_step: usize) {
        self.total = total_steps;
        self.last_logged = start_step;
        if let Some(b) = &self.bar {
            b.set_length(total_steps as u64);
            b.set_position(start_step as u64);
            if start_step > 0 {
                b.println(format!(
                    "Resuming {} at step {start_step} of {total_steps}.",
                    self.label
                ));
            }
        } else if !self.quiet && start_step > 0 {
            eprintln!(
                "Resuming {} at step {start_step} of {total_steps}.",
                self.label
            );
        }
    }

    fn step(&mut self, info: &StepInfo) {
        match &self.bar {
            Some(b) => {
                b.set_position(info.step as u64);
                b.set_message(message(info));
            }
            None => {
                let every = (self.total / 10).max(1);
                if !self.quiet && (info.step - self.last_logged >= every || info.step == info.total)
                {
                    self.last_logged = info.step;
                    eprintln!(
                        "{}: step {}/{}  {}  ETA {:.0} s",
                        self.label,
                        info.step,
                        info.total,
                        message(info),
                        info.eta_s
                    );
                }
            }
        }
    }

    fn checkpoint(&mut self, _step: usize, _dir: &Path) {}
}

/// The display of an external trainer or evaluator command: on a terminal a spinner with the
/// elapsed time and the command's last output line; otherwise a line when it starts, one
/// every [`QUIET_EVERY`] seconds with its last output line, and one when it ends.
pub struct CommandLine<'a> {
    ui: &'a crate::cli::Ui,
    spinner: Option<ProgressBar>,
    next_line_at: f64,
}

/// Seconds between the status lines of a running command when no terminal is attached.
pub const QUIET_EVERY: f64 = 60.0;

impl<'a> CommandLine<'a> {
    /// A display writing through `ui`.
    pub fn new(ui: &'a crate::cli::Ui) -> Self {
        CommandLine {
            ui,
            spinner: None,
            next_line_at: QUIET_EVERY,
        }
    }
}

/// At most `n` characters of `s` (an ellipsis marks a cut).
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

impl crate::workflow::external::CommandProgress for CommandLine<'_> {
    fn started(&mut self, what: &str, command: &str, log: &Path) {
        self.ui.status(&format!(
            "Running {what}: {} (log: {}).",
            clip(command, 300),
            log.display()
        ));
        self.next_line_at = QUIET_EVERY;
        if self.ui.show_progress() {
            let s = ProgressBar::new_spinner();
            s.set_style(
                ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            s.set_prefix(what.to_string());
            s.enable_steady_tick(Duration::from_millis(200));
            self.spinner = Some(s);
        }
    }

    fn running(&mut self, _what: &str, seconds: f64, last_line: &str) {
        match &self.spinner {
            Some(s) => s.set_message(clip(last_line, 100)),
            None if seconds >= self.next_line_at => {
                self.next_line_at = seconds + QUIET_EVERY;
                if !last_line.is_empty() {
                    self.ui
                        .status(&format!("  {seconds:.0} s: {}", clip(last_line, 200)));
                }
            }
            None => {}
        }
    }

    fn finished(&mut self, what: &str, seconds: f64, ok: bool) {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
        if ok {
            self.ui
                .status(&format!("Finished {what} in {seconds:.1} s."));
        }
    }
}
