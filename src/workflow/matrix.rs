//! The accuracy matrix of a branch: row `k` = the checkpoint after training task `k` on the
//! branch's first-parent history, column `j` = task `j` (training order, then tasks that were
//! evaluated but never trained), cell = that checkpoint's eval score on that task (a note wins
//! over the record made with the commit, as `coin show` shows). A checkpoint whose train record
//! says `"kind": "base"` is the zero-shot row (FWT's baseline). Metrics come from
//! [`crate::metrics`].
//!
//! The general-knowledge matrix ([`MatrixMetric::GeneralKnowledge`]) has the same rows and
//! takes its cells from the `GK:<task>` records (the LLM judge's scores); the accuracy matrix
//! leaves those records out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::history::CheckpointId;
use serde::Serialize;
use serde_json::{json, Value};

use crate::history::records::gk_base_task;
use crate::history::{CoinRepo, EvalRecord, EvalSource, TrainRecord};
use crate::metrics::{AccuracyMatrix, ForgettingMode, Metrics};

use super::WorkflowError;

/// The train-record field that marks a checkpoint's kind.
pub const KIND_FIELD: &str = "kind";

/// `kind` of a zero-shot checkpoint: the base model before any training step (its `task` is
/// not a training step; its eval records are the zero-shot row).
pub const KIND_BASE: &str = "base";

/// Whether a train record marks a zero-shot (base) checkpoint.
pub fn is_base_record(t: &TrainRecord) -> bool {
    t.extra.get(KIND_FIELD).and_then(Value::as_str) == Some(KIND_BASE)
}

fn task_key(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Which eval records fill the matrix's cells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatrixMetric {
    /// Each task's own record (its accuracy or other task metric); `GK:` records are left out.
    #[default]
    Accuracy,
    /// The `GK:<task>` records (the LLM judge's general-knowledge scores), as task `<task>`.
    GeneralKnowledge,
}

impl MatrixMetric {
    /// The records of one checkpoint that this matrix reads, keyed by the column's task.
    fn select(
        self,
        evals: BTreeMap<String, (EvalRecord, EvalSource)>,
    ) -> BTreeMap<String, (EvalRecord, EvalSource)> {
        evals
            .into_iter()
            .filter_map(|(task, rec)| match (self, gk_base_task(&task)) {
                (MatrixMetric::Accuracy, None) => Some((task, rec)),
                (MatrixMetric::GeneralKnowledge, Some(base)) => Some((base.to_string(), rec)),
                _ => None,
            })
            .collect()
    }
}

/// One row of the matrix: which checkpoint and which task it trained.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MatrixRow {
    /// The checkpoint id (40 hex digits).
    pub id: CheckpointId,
    /// The task trained at this step (`base` for the zero-shot row).
    pub task: String,
}

/// The matrix of a branch with the checkpoints behind its rows.
#[derive(Clone, Debug, PartialEq)]
pub struct BranchMatrix {
    /// Row labels: one checkpoint per training step, oldest first.
    pub checkpoints: Vec<MatrixRow>,
    /// The zero-shot checkpoint, if the branch has one.
    pub zero_shot: Option<MatrixRow>,
    /// The scores (`matrix.tasks` are the columns).
    pub matrix: AccuracyMatrix,
}

fn find_record<'a>(
    evals: &'a BTreeMap<String, (EvalRecord, EvalSource)>,
    task: &str,
) -> Option<&'a EvalRecord> {
    // Every record naming the task (spelling ignored); a note beats the commit's record, and
    // the exact spelling beats another one.
    let key = task_key(task);
    evals
        .iter()
        .filter(|(t, _)| task_key(t) == key)
        .max_by_key(|(t, (_, src))| (*src == EvalSource::Note, t.as_str() == task))
        .map(|(_, (r, _))| r)
}

/// Build the accuracy matrix of the first-parent history ending at `tip`
/// ([`build_matrix_of`] with [`MatrixMetric::Accuracy`]).
pub fn build_matrix(repo: &CoinRepo, tip: CheckpointId) -> Result<BranchMatrix, WorkflowError> {
    build_matrix_of(repo, tip, MatrixMetric::Accuracy)
}

/// Build the matrix of `metric` over the first-parent history ending at `tip`.
///
/// Consecutive checkpoints trained on the same task are one step (the last one counts, e.g.
/// per-epoch commits); a task trained again after another task is an error, since each row
/// must be the step that trained one task.
pub fn build_matrix_of(
    repo: &CoinRepo,
    tip: CheckpointId,
    metric: MatrixMetric,
) -> Result<BranchMatrix, WorkflowError> {
    let mut chain = repo.first_parent_chain(tip, None)?;
    chain.reverse();
    type Evals = BTreeMap<String, (EvalRecord, EvalSource)>;
    let mut rows: Vec<(MatrixRow, Evals)> = Vec::new();
    let mut zero: Option<(MatrixRow, Evals)> = None;
    for id in chain {
        let cp = repo.read_checkpoint(id)?;
        let Some(train) = &cp.train else { continue };
        if is_base_record(train) {
            let row = MatrixRow {
                id,
                task: KIND_BASE.to_string(),
            };
            zero = Some((row, metric.select(cp.evals)));
            continue;
        }
        if train.extra.get(KIND_FIELD).and_then(Value::as_str) == Some(super::merge::KIND_MERGE) {
            return Err(WorkflowError::Input(format!(
                "the history of {} holds the merge checkpoint {}: an accuracy matrix has one \
                 row per trained task, and a merge trains none; see the merge's scores with \
                 `coin show {}` and the matrix of each input branch",
                tip.short(),
                id.short(),
                id.short()
            )));
        }
        let key = task_key(&train.task);
        let row = MatrixRow {
            id,
            task: train.task.clone(),
        };
        if rows.last().is_some_and(|(r, _)| task_key(&r.task) == key) {
            let last = rows.len() - 1;
            rows[last] = (row, metric.select(cp.evals));
            continue;
        }
        if let Some((earlier, _)) = rows.iter().find(|(r, _)| task_key(&r.task) == key) {
            return Err(WorkflowError::Input(format!(
                "task '{}' is trained twice on this history ({} and again at {}); the accuracy matrix needs one step per task — branch off before the repeat",
                train.task,
                earlier.id.short(),
                id.short()
            )));
        }
        rows.push((row, metric.select(cp.evals)));
    }
    let mut tasks: Vec<String> = rows.iter().map(|(r, _)| r.task.clone()).collect();
    let mut keys: Vec<String> = tasks.iter().map(|t| task_key(t)).collect();
    for (_, evals) in rows.iter().chain(zero.iter()) {
        for t in evals.keys() {
            let k = task_key(t);
            if !keys.contains(&k) {
                keys.push(k);
                tasks.push(t.clone());
            }
        }
    }
    let cells = |evals: &Evals| -> Vec<Option<f64>> {
        tasks
            .iter()
            .map(|t| find_record(evals, t).map(|r| r.score))
            .collect()
    };
    let matrix = AccuracyMatrix {
        rows: rows.iter().map(|(_, e)| cells(e)).collect(),
        zero_shot: zero.as_ref().map(|(_, e)| cells(e)),
        tasks,
    };
    matrix.validate()?;
    Ok(BranchMatrix {
        checkpoints: rows.into_iter().map(|(r, _)| r).collect(),
        zero_shot: zero.map(|(r, _)| r),
        matrix,
    })
}

impl BranchMatrix {
    /// The summary metrics.
    pub fn metrics(&self, mode: ForgettingMode) -> Result<Metrics, WorkflowError> {
        Ok(self.matrix.metrics(mode)?)
    }

    /// The last row (the scores after the final step), empty when there are no rows.
    pub fn final_row(&self) -> Vec<Option<f64>> {
        self.matrix.rows.last().cloned().unwrap_or_default()
    }

    /// `coin matrix --json`: `{"tasks", "checkpoints", "matrix", "metrics"}` plus
    /// `"zero_shot"` when the branch has a zero-shot row.
    pub fn to_json(&self, m: &Metrics) -> Value {
        let mut v = json!({
            "tasks": self.matrix.tasks,
            "checkpoints": self.checkpoints,
            "matrix": self.matrix.rows,
            "metrics": metrics_json(m),
        });
        if let Some(z) = &self.matrix.zero_shot {
            v["zero_shot"] = json!(z);
        }
        v
    }

    /// The CSV that `coin metrics` reads: a `step` column of row labels (the trained task),
    /// the zero-shot row first as `zero-shot`, empty cells for missing scores, full precision.
    pub fn to_csv(&self) -> String {
        let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
        let mut header = vec!["step".to_string()];
        header.extend(self.matrix.tasks.iter().cloned());
        let cell = |c: &Option<f64>| c.map_or_else(String::new, |v| v.to_string());
        let mut records = vec![header];
        if let Some(z) = &self.matrix.zero_shot {
            let mut r = vec!["zero-shot".to_string()];
            r.extend(z.iter().map(cell));
            records.push(r);
        }
        for (row, label) in self.matrix.rows.iter().zip(&self.checkpoints) {
            let mut r = vec![label.task.clone()];
            r.extend(row.iter().map(cell));
            records.push(r);
        }
        for r in records {
            w.write_record(&r)
                .expect("writing CSV to memory cannot fail");
        }
        let bytes = w.into_inner().expect("flushing CSV to memory cannot fail");
        String::from_utf8(bytes).expect("CSV of UTF-8 strings is UTF-8")
    }

    /// The matrix as an aligned text table (two decimals, `—` for missing cells).
    pub fn to_table(&self) -> String {
        let mut label_rows: Vec<(String, Vec<Option<f64>>)> = Vec::new();
        if let (Some(z), Some(r)) = (&self.matrix.zero_shot, &self.zero_shot) {
            label_rows.push((format!("0 zero-shot {}", r.id.short()), z.clone()));
        }
        for (k, (row, r)) in self.matrix.rows.iter().zip(&self.checkpoints).enumerate() {
            label_rows.push((
                format!("{} {} {}", k + 1, r.task, r.id.short()),
                row.clone(),
            ));
        }
        let lw = label_rows
            .iter()
            .map(|(l, _)| l.chars().count())
            .chain(std::iter::once("after step".len()))
            .max()
            .unwrap_or(10);
        let widths: Vec<usize> = self
            .matrix
            .tasks
            .iter()
            .map(|t| t.chars().count().max(6))
            .collect();
        let mut s = String::new();
        let _ = write!(s, "{:<lw$}", "after step");
        for (t, w) in self.matrix.tasks.iter().zip(&widths) {
            let _ = write!(s, "  {t:>w$}");
        }
        s.push('\n');
        for (label, row) in &label_rows {
            let _ = write!(s, "{label:<lw$}");
            for (c, w) in row.iter().zip(&widths) {
                let _ = write!(s, "  {:>w$}", fmt_cell(*c));
            }
            s.push('\n');
        }
        s
    }
}

/// A score with two decimals, `—` when missing.
pub fn fmt_cell(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.2}"))
}

/// The metrics object of `coin matrix --json` and `coin compare --json`:
/// `{"mft", "mfn", "maa", "bwt", "fwt", "forgetting", "forgetting_per_task", "forgetting_mode"}`.
pub fn metrics_json(m: &Metrics) -> Value {
    json!({
        "mft": m.mft,
        "mfn": m.mfn,
        "maa": m.maa,
        "bwt": m.bwt,
        "fwt": m.fwt,
        "forgetting": m.forgetting,
        "forgetting_per_task": m.forgetting_per_task,
        "forgetting_mode": m.forgetting_mode,
    })
}

/// One line of [`paper_table`].
pub struct PaperRow<'a> {
    /// The row label (branch name).
    pub label: String,
    /// The columns of `final_row`.
    pub tasks: &'a [String],
    /// The scores after the last step.
    pub final_row: Vec<Option<f64>>,
    /// The summary metrics.
    pub metrics: &'a Metrics,
}

/// `--format paper`: one line per labelled final row, then MFT/MFN/MAA/BWT/FWT/F, as results
/// tables in papers print them (columns: the union of the rows' tasks).
pub fn paper_table(rows: &[PaperRow<'_>]) -> String {
    let mut tasks: Vec<String> = Vec::new();
    for PaperRow { tasks: ts, .. } in rows {
        for t in ts.iter() {
            if !tasks.contains(t) {
                tasks.push(t.clone());
            }
        }
    }
    let lw = rows
        .iter()
        .map(|r| r.label.chars().count())
        .chain(std::iter::once(6))
        .max()
        .unwrap_or(6);
    let summary = ["MFT", "MFN", "MAA", "BWT", "FWT", "F"];
    let mut s = String::new();
    let _ = write!(s, "{:<lw$}", "");
    let widths: Vec<usize> = tasks.iter().map(|t| t.chars().count().max(6)).collect();
    for (t, w) in tasks.iter().zip(&widths) {
        let _ = write!(s, "  {t:>w$}");
    }
    for h in summary {
        let _ = write!(s, "  {h:>6}");
    }
    s.push('\n');
    for PaperRow {
        label,
        tasks: ts,
        final_row: last,
        metrics: m,
    } in rows
    {
        let _ = write!(s, "{label:<lw$}");
        for (t, w) in tasks.iter().zip(&widths) {
            let v = ts
                .iter()
                .position(|x| x == t)
                .and_then(|j| last.get(j).copied().flatten());
            let _ = write!(s, "  {:>w$}", fmt_cell(v));
        }
        for v in [m.mft, m.mfn, m.maa, m.bwt, m.fwt, m.forgetting] {
            let _ = write!(s, "  {:>6}", fmt_cell(v));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
pub(crate) mod tests;
