use std::io::Write;
use std::path::PathBuf;

use crate::cli::{io_kind, CommandError, CommandHelper, ErrorKind, Ui};
use crate::metrics::{self, AccuracyMatrix, ForgettingMode, Metrics};

/// Compute continual-learning metrics from an accuracy matrix made elsewhere
///
/// FILE is CSV (a header naming the tasks, one row per training step, empty cells allowed,
/// an optional first column of row labels where a row labelled `zero-shot` holds the base
/// model's scores) or JSON (`{"tasks": [...], "matrix": [[score or null]], "zero_shot": [...]}`).
/// The definitions are those of `coin matrix`; see docs/metrics.md.
#[derive(clap::Args, Debug)]
pub struct MetricsArgs {
    /// The matrix file (.csv or .json; `-` reads CSV or JSON from stdin)
    pub file: PathBuf,
    /// How forgetting is measured: best earlier score − final, or first score − final
    #[arg(long, value_enum, default_value_t = ForgettingArg::MaxEarlier)]
    pub forgetting: ForgettingArg,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `--forgetting` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ForgettingArg {
    /// max over earlier steps (from the step that trained the task) − final
    MaxEarlier,
    /// score right after training the task − final
    First,
}

impl From<ForgettingArg> for ForgettingMode {
    fn from(a: ForgettingArg) -> Self {
        match a {
            ForgettingArg::MaxEarlier => ForgettingMode::MaxEarlier,
            ForgettingArg::First => ForgettingMode::First,
        }
    }
}

pub fn cmd_metrics(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &MetricsArgs,
) -> Result<(), CommandError> {
    let (text, shown) = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| {
            CommandError::caused(io_kind(&e), "could not read the matrix from stdin", e)
        })?;
        (s, "<stdin>".to_string())
    } else {
        let path = helper.cwd.join(&args.file);
        let bytes = std::fs::read(&path)
            .map_err(|e| CommandError::io("read the matrix file", &args.file, e))?;
        let s = String::from_utf8(bytes).map_err(|_| {
            CommandError::user(format!(
                "the matrix file '{}' is not UTF-8 text",
                args.file.display()
            ))
        })?;
        (s, args.file.display().to_string())
    };
    let is_json = args
        .file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || (args.file.as_os_str() == "-" && text.trim_start().starts_with('{'));
    let parsed = if is_json {
        metrics::parse_matrix_json(&text)
    } else {
        metrics::parse_matrix_csv(&text)
    };
    let matrix = parsed.map_err(|e| {
        CommandError::caused(
            ErrorKind::User,
            format!("could not read the matrix in '{shown}'"),
            e,
        )
    })?;
    let m = matrix.metrics(args.forgetting.into()).map_err(|e| {
        CommandError::caused(
            ErrorKind::User,
            format!("the matrix in '{shown}' is not usable"),
            e,
        )
    })?;
    if args.json {
        ui.json(&serde_json::json!({
            "tasks": matrix.tasks,
            "matrix": matrix.rows,
            "metrics": m,
        }))
    } else {
        write_metrics_table(ui.out(), &matrix, &m, "accuracy")?;
        Ok(())
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.2}"))
}

/// Print the summary metrics and per-task forgetting as aligned text; `what` names the
/// matrix's score ("accuracy", "GK score").
pub fn write_metrics_table(
    out: &mut impl Write,
    matrix: &AccuracyMatrix,
    m: &Metrics,
    what: &str,
) -> std::io::Result<()> {
    writeln!(
        out,
        "MFT  {:>8}   mean {what} right after training each task",
        fmt_opt(m.mft)
    )?;
    writeln!(out, "MFN  {:>8}   mean final {what}", fmt_opt(m.mfn))?;
    writeln!(
        out,
        "MAA  {:>8}   mean average {what} over steps",
        fmt_opt(m.maa)
    )?;
    writeln!(
        out,
        "BWT  {:>8}   backward transfer (negative = forgetting)",
        fmt_opt(m.bwt)
    )?;
    writeln!(
        out,
        "FWT  {:>8}   forward transfer (needs zero-shot row and upper triangle)",
        fmt_opt(m.fwt)
    )?;
    let mode = match m.forgetting_mode {
        ForgettingMode::MaxEarlier => "best earlier − final",
        ForgettingMode::First => "first − final",
    };
    writeln!(
        out,
        "F    {:>8}   mean forgetting ({mode})",
        fmt_opt(m.forgetting)
    )?;
    let width = matrix
        .tasks
        .iter()
        .map(|t| t.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(out)?;
    writeln!(out, "{:<width$}  forgetting", "task")?;
    for (task, f) in matrix.tasks.iter().zip(&m.forgetting_per_task) {
        writeln!(out, "{task:<width$}  {:>10}", fmt_opt(*f))?;
    }
    Ok(())
}
