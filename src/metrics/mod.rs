//! Continual-learning metrics over an accuracy matrix: MFT, MFN, MAA, BWT, FWT and
//! forgetting, with the definitions written out in docs/metrics.md.
//!
//! Row `k` of the matrix is the checkpoint after training task `k` (0-based here), column
//! `j` is task `j`'s test score (0–100). Cells may be missing (`None`): the lower triangle
//! and diagonal are what a run produces, the upper triangle is optional and only feeds FWT.
//! Core module: no terminal I/O, no ML engine.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod io;

use serde::{Deserialize, Serialize};

pub use io::{parse_matrix_csv, parse_matrix_json, MatrixFileError};

/// An accuracy matrix: `rows[k][j]` = score on task `j` after training through task `k`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccuracyMatrix {
    /// Task names, in training order (the columns).
    pub tasks: Vec<String>,
    /// One row per training step; each row has one cell per task.
    pub rows: Vec<Vec<Option<f64>>>,
    /// Scores before any training step (the zero-shot base model), one per task, if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_shot: Option<Vec<Option<f64>>>,
}

/// How forgetting of a task is measured at the end of the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForgettingMode {
    /// Best score on the task at any earlier step (from the step that trained it on) minus
    /// the final score (Chaudhry et al. 2018, "RWalk").
    #[default]
    MaxEarlier,
    /// Score right after training the task minus the final score (Avalanche's definition).
    First,
}

/// The summary metrics of a matrix. A metric is `None` when the cells it needs are missing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean fine-tune accuracy: mean of the diagonal (plasticity).
    pub mft: Option<f64>,
    /// Mean final accuracy: mean of the last row over the trained tasks.
    pub mfn: Option<f64>,
    /// Mean average accuracy: mean over steps `k` of the mean of row `k` over tasks `≤ k`.
    pub maa: Option<f64>,
    /// Backward transfer over the first T−1 tasks: mean of final − diagonal (negative = forgetting).
    pub bwt: Option<f64>,
    /// Forward transfer: mean over tasks `j ≥ 2` of (score before training `j`) − zero-shot score.
    pub fwt: Option<f64>,
    /// Mean forgetting over the first T−1 tasks (positive = forgetting).
    pub forgetting: Option<f64>,
    /// Forgetting of each task (`None` for the last task and for tasks with missing cells).
    pub forgetting_per_task: Vec<Option<f64>>,
    /// The definition of forgetting used.
    pub forgetting_mode: ForgettingMode,
}

/// Why a matrix cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MatrixError {
    /// A row does not have one cell per task.
    #[error("row {row} has {got} cells but there are {tasks} tasks")]
    RowLength {
        /// 0-based row index.
        row: usize,
        /// Cells in that row.
        got: usize,
        /// Number of tasks.
        tasks: usize,
    },
    /// More training steps than tasks.
    #[error("the matrix has {rows} rows but only {tasks} tasks: each row is the step that trained one task")]
    TooManyRows {
        /// Number of rows.
        rows: usize,
        /// Number of tasks.
        tasks: usize,
    },
    /// A score outside 0–100 or not finite.
    #[error("cell ({row}, {col}) holds {value}, which is not a score between 0 and 100")]
    BadScore {
        /// 0-based row.
        row: usize,
        /// 0-based column.
        col: usize,
        /// The value.
        value: f64,
    },
    /// The zero-shot row does not have one cell per task.
    #[error("the zero-shot row has {got} cells but there are {tasks} tasks")]
    ZeroShotLength {
        /// Cells in the zero-shot row.
        got: usize,
        /// Number of tasks.
        tasks: usize,
    },
}

fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

impl AccuracyMatrix {
    /// Check the shape and the range of every cell.
    pub fn validate(&self) -> Result<(), MatrixError> {
        let t = self.tasks.len();
        if self.rows.len() > t {
            return Err(MatrixError::TooManyRows {
                rows: self.rows.len(),
                tasks: t,
            });
        }
        let check = |row: usize, col: usize, v: f64| {
            if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                Err(MatrixError::BadScore { row, col, value: v })
            } else {
                Ok(())
            }
        };
        for (k, row) in self.rows.iter().enumerate() {
            if row.len() != t {
                return Err(MatrixError::RowLength {
                    row: k,
                    got: row.len(),
                    tasks: t,
                });
            }
            for (j, v) in row.iter().enumerate() {
                if let Some(v) = v {
                    check(k, j, *v)?;
                }
            }
        }
        if let Some(z) = &self.zero_shot {
            if z.len() != t {
                return Err(MatrixError::ZeroShotLength {
                    got: z.len(),
                    tasks: t,
                });
            }
            for (j, v) in z.iter().enumerate() {
                if let Some(v) = v {
                    check(usize::MAX, j, *v)?;
                }
            }
        }
        Ok(())
    }

    /// Score on task `j` after step `k`, if present.
    pub fn get(&self, k: usize, j: usize) -> Option<f64> {
        self.rows.get(k).and_then(|r| r.get(j)).copied().flatten()
    }

    /// Number of training steps so far (rows).
    pub fn steps(&self) -> usize {
        self.rows.len()
    }

    /// Mean over tasks `j ≤ k` of row `k` (the average accuracy at stage `k`).
    pub fn stage_average(&self, k: usize) -> Option<f64> {
        mean((0..=k).filter_map(|j| self.get(k, j)))
    }

    /// Compute every summary metric with the given forgetting definition.
    pub fn metrics(&self, mode: ForgettingMode) -> Result<Metrics, MatrixError> {
        self.validate()?;
        let t = self.steps();
        let last = t.checked_sub(1);
        let mft = mean((0..t).filter_map(|j| self.get(j, j)));
        let mfn = last.and_then(|l| mean((0..t).filter_map(|j| self.get(l, j))));
        let maa = mean((0..t).filter_map(|k| self.stage_average(k)));
        let bwt = match last {
            Some(l) if l > 0 => {
                mean((0..l).filter_map(|j| Some(self.get(l, j)? - self.get(j, j)?)))
            }
            _ => None,
        };
        let fwt = self.zero_shot.as_ref().and_then(|z| {
            mean((1..t).filter_map(|j| Some(self.get(j - 1, j)? - z.get(j).copied().flatten()?)))
        });
        let forgetting_per_task: Vec<Option<f64>> = (0..self.tasks.len())
            .map(|j| {
                let l = last?;
                if j >= l {
                    return None;
                }
                let final_score = self.get(l, j)?;
                let reference = match mode {
                    ForgettingMode::First => self.get(j, j)?,
                    ForgettingMode::MaxEarlier => (j..l)
                        .filter_map(|k| self.get(k, j))
                        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))?,
                };
                Some(reference - final_score)
            })
            .collect();
        let forgetting = mean(forgetting_per_task.iter().flatten().copied());
        Ok(Metrics {
            mft,
            mfn,
            maa,
            bwt,
            fwt,
            forgetting,
            forgetting_per_task,
            forgetting_mode: mode,
        })
    }
}

#[cfg(test)]
mod tests;
