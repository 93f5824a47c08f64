//! The command line: clap parsing, output, exit codes. The only module that prints.
//!
//! Conventions (see docs/cli.md): stdout carries data (tables, `--json`), stderr carries
//! status and progress. Every read command takes `--json`. Exit codes: 0 ok, 1 user or
//! configuration error, 2 usage error, 3 broken pipe, 255 internal error.

pub mod commands;
mod error;
pub mod train_progress;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

pub use error::{io_kind, CommandError, ErrorKind};
pub use ui::Ui;

/// Version control for continual instruction tuning of multimodal LLMs
#[derive(Parser, Debug)]
#[command(name = "coin", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Options that every command takes
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command to run
    #[command(subcommand)]
    pub command: commands::Command,
}

/// When to colour output.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColorChoice {
    /// Colour when stdout is a terminal
    #[default]
    Auto,
    /// Always colour
    Always,
    /// Never colour
    Never,
}

/// Options accepted by every command.
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "Global Options")]
pub struct GlobalArgs {
    /// Path to the coin repository [default: search upward from the current directory]
    #[arg(short = 'R', long, global = true, value_name = "PATH")]
    pub repo: Option<PathBuf>,
    /// When to colour output
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Print no status messages on stderr
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// What every command gets besides its own arguments.
#[derive(Debug)]
pub struct CommandHelper {
    /// The global options.
    pub global: GlobalArgs,
    /// The directory the command runs in.
    pub cwd: PathBuf,
}

impl CommandHelper {
    /// The directory from which to look for a repository: `--repo` or the current directory.
    pub fn start_dir(&self) -> PathBuf {
        match &self.global.repo {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.cwd.join(p),
            None => self.cwd.clone(),
        }
    }
}

/// Parse the arguments, run the command and map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let mut ui = Ui::new(&cli.global);
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            let err = CommandError::caused(io_kind(&e), "could not read the current directory", e);
            ui.report(&err);
            return ExitCode::from(err.kind.exit_code());
        }
    };
    let helper = CommandHelper {
        global: cli.global,
        cwd,
    };
    if let Err(err) = apply_runtime(&helper, &cli.command) {
        ui.report(&err);
        return ExitCode::from(err.kind.exit_code());
    }
    match commands::run(&mut ui, &helper, cli.command).and_then(|()| ui.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if err.kind != ErrorKind::BrokenPipe {
                ui.report(&err);
            }
            ExitCode::from(err.kind.exit_code())
        }
    }
}

/// Apply the resolved `[runtime]` thread counts of a command that runs the model to this
/// process, once, before any thread exists. candle 0.11 takes them only from its own
/// environment variables (`RAYON_NUM_THREADS`: GEMM parallelism and rayon's global pool;
/// `CANDLE_NUM_THREADS`: its element-wise pool, sized at the first element-wise op), so this is
/// the one place coin sets environment variables: values found there are replaced (they are
/// not coin settings; `COIN_THREADS` and `COIN_ELEMENTWISE_THREADS` are, docs/config.md). The
/// library gets every other runtime value passed in.
fn apply_runtime(helper: &CommandHelper, command: &commands::Command) -> Result<(), CommandError> {
    let Some(cfg) = command.model_config(helper)? else {
        return Ok(());
    };
    // `auto` threads = candle's own default (one per physical core), not an inherited value
    // (e.g. the RAYON_NUM_THREADS=1 that .cargo/config.toml gives every process cargo starts).
    std::env::remove_var("RAYON_NUM_THREADS");
    std::env::remove_var("CANDLE_NUM_THREADS");
    let rt = cfg.resolved_runtime()?;
    set_engine_threads(&rt);
    Ok(())
}

/// Give candle and rayon the resolved thread counts: candle 0.11 reads them only from its own
/// environment variables, so they are set here, at process start, before any thread exists
/// (also used by the benchmark harnesses in `examples/`).
pub fn set_engine_threads(rt: &crate::ml::runtime::Runtime) {
    std::env::set_var("RAYON_NUM_THREADS", rt.threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", rt.elementwise_threads.to_string());
    // rayon reads the same variable; building its global pool here makes the size explicit.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(rt.threads)
        .build_global();
}
