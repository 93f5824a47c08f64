//! `coin matrix`: the accuracy matrix of a branch and its continual-learning metrics.

use std::io::Write as _;
use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::workflow::matrix::{build_matrix_of, paper_table, MatrixMetric, PaperRow};

use super::history_util::open_repo;
use super::metrics::{write_metrics_table, ForgettingArg};

/// The accuracy matrix of a branch: row k = after training task k, column j = task j
///
/// Rows are the checkpoints of BRANCH's first-parent history that trained a task (oldest
/// first); columns are the tasks in training order, then tasks evaluated but never trained;
/// a cell is that checkpoint's eval score on that task (`coin eval`; notes win over records
/// made with the commit). A checkpoint whose train record has `"kind": "base"` is the
/// zero-shot row. Metrics (MFT, MFN, MAA, BWT over T−1, FWT when the zero-shot row and upper
/// triangle exist, forgetting) as `coin metrics` computes them; see docs/metrics.md.
///
/// `--metric gk` shows the general-knowledge matrix instead: the same rows, cells from the
/// `GK:<task>` records of `coin judge --record` (CoIN's LLM-judge axis), same metrics.
#[derive(clap::Args, Debug)]
pub struct MatrixArgs {
    /// A branch, tag or checkpoint (default: HEAD)
    pub branch: Option<String>,
    /// Which scores fill the cells: each task's own metric, or the judge's general knowledge
    #[arg(long, value_enum, default_value_t = MetricArg::Accuracy)]
    pub metric: MetricArg,
    /// Print {"tasks", "checkpoints", "matrix", "metrics"} (plus "zero_shot" when present)
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print the matrix as CSV (what `coin metrics` reads)
    #[arg(long)]
    pub csv: bool,
    /// Text layout: the full matrix and metrics, or the final row + summary as papers print it
    #[arg(long, value_enum, default_value_t = FormatArg::Table, conflicts_with_all = ["json", "csv"])]
    pub format: FormatArg,
    /// How forgetting is measured: best earlier score − final, or first score − final
    #[arg(long, value_enum, default_value_t = ForgettingArg::MaxEarlier)]
    pub forgetting: ForgettingArg,
    /// Also draw the matrix (heatmap + per-task curves) to FILE.svg or FILE.png
    #[arg(long, value_name = "FILE.svg|FILE.png")]
    pub plot: Option<PathBuf>,
}

/// `--metric` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricArg {
    /// each task's eval record (accuracy or the task's own metric)
    Accuracy,
    /// the GK:<task> records of `coin judge --record` (general knowledge, LLM judge)
    Gk,
}

impl From<MetricArg> for MatrixMetric {
    fn from(m: MetricArg) -> Self {
        match m {
            MetricArg::Accuracy => MatrixMetric::Accuracy,
            MetricArg::Gk => MatrixMetric::GeneralKnowledge,
        }
    }
}

/// `--format` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    /// the matrix, the metrics and per-task forgetting
    Table,
    /// one line: final score per task, then MFT MFN MAA BWT FWT F
    Paper,
}

pub fn cmd_matrix(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &MatrixArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let (name, tip) = match &args.branch {
        Some(b) => (b.clone(), repo.resolve(b)?),
        None => {
            let branch = repo.current_branch()?;
            let tip = repo
                .head()?
                .ok_or_else(|| crate::history::HistoryError::EmptyBranch(branch.clone()))?;
            (branch, tip)
        }
    };
    let metric = MatrixMetric::from(args.metric);
    let bm = build_matrix_of(&repo, tip, metric)?;
    let m = bm.metrics(args.forgetting.into())?;
    if let Some(plot) = &args.plot {
        let path = helper.cwd.join(plot);
        let title = match metric {
            MatrixMetric::Accuracy => format!("{name} ({})", tip.short()),
            MatrixMetric::GeneralKnowledge => {
                format!("{name} ({}), general knowledge", tip.short())
            }
        };
        crate::workflow::plot::plot_matrix(&bm, &title, &path)?;
        ui.status(&format!("Wrote the plot to '{}'.", plot.display()));
    }
    if args.json {
        let mut v = bm.to_json(&m);
        v["metric"] = serde_json::to_value(metric)?;
        return ui.json(&v);
    }
    if args.csv {
        write!(ui.out(), "{}", bm.to_csv())?;
        return Ok(());
    }
    if bm.checkpoints.is_empty() {
        ui.status(&format!(
            "{name} has no checkpoint with a trained task yet; the matrix is empty."
        ));
    } else if metric == MatrixMetric::GeneralKnowledge
        && bm.matrix.rows.iter().flatten().all(Option::is_none)
    {
        ui.status(&format!(
            "No checkpoint of {name} has a general-knowledge record yet; record one with `coin judge --record`."
        ));
    }
    if metric == MatrixMetric::GeneralKnowledge && args.format == FormatArg::Table {
        writeln!(ui.out(), "General knowledge (LLM judge, 0-100)")?;
    }
    match args.format {
        FormatArg::Paper => {
            let rows = vec![PaperRow {
                label: name.clone(),
                tasks: bm.matrix.tasks.as_slice(),
                final_row: bm.final_row(),
                metrics: &m,
            }];
            write!(ui.out(), "{}", paper_table(&rows))?;
        }
        FormatArg::Table => {
            write!(ui.out(), "{}", bm.to_table())?;
            writeln!(ui.out())?;
            let what = match metric {
                MatrixMetric::Accuracy => "accuracy",
                MatrixMetric::GeneralKnowledge => "GK score",
            };
            write_metrics_table(ui.out(), &bm.matrix, &m, what)?;
        }
    }
    Ok(())
}
