//! Comparing task orders: the matrix and metrics of several branches side by side, and which
//! checkpoints their histories share (a common prefix of training steps).

use std::collections::HashSet;

use crate::history::CheckpointId;
use serde_json::{json, Value};

use crate::history::CoinRepo;
use crate::metrics::{ForgettingMode, Metrics};

use super::matrix::{build_matrix, metrics_json, BranchMatrix, PaperRow};
use super::WorkflowError;

/// One compared branch.
#[derive(Clone, Debug)]
pub struct BranchSummary {
    /// The name as given (branch, tag or revision).
    pub name: String,
    /// The checkpoint it resolved to.
    pub tip: CheckpointId,
    /// Its matrix.
    pub matrix: BranchMatrix,
    /// Its metrics.
    pub metrics: Metrics,
}

/// What two branches' histories share.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedHistory {
    /// Index of the first branch in [`Comparison::branches`].
    pub a: usize,
    /// Index of the second branch.
    pub b: usize,
    /// The newest checkpoint on both first-parent histories, if any.
    pub last_shared: Option<CheckpointId>,
    /// How many checkpoints both first-parent histories contain.
    pub shared_checkpoints: usize,
    /// The training steps (matrix rows) both share, in order: the common task prefix.
    pub shared_tasks: Vec<String>,
}

/// The result of `coin compare`.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// The branches in the order given.
    pub branches: Vec<BranchSummary>,
    /// Every pair (i < j).
    pub shared: Vec<SharedHistory>,
}

/// Compare the histories that `revs` name (branches, tags or revisions).
pub fn compare(
    repo: &CoinRepo,
    revs: &[String],
    mode: ForgettingMode,
) -> Result<Comparison, WorkflowError> {
    if revs.is_empty() {
        return Err(WorkflowError::Input(
            "name at least one branch to compare".into(),
        ));
    }
    let mut branches = Vec::new();
    let mut chains: Vec<Vec<CheckpointId>> = Vec::new();
    for name in revs {
        let tip = repo.resolve(name)?;
        let matrix = build_matrix(repo, tip)?;
        let metrics = matrix.metrics(mode)?;
        chains.push(repo.first_parent_chain(tip, None)?);
        branches.push(BranchSummary {
            name: name.clone(),
            tip,
            matrix,
            metrics,
        });
    }
    let mut shared = Vec::new();
    for a in 0..branches.len() {
        for b in a + 1..branches.len() {
            let set_b: HashSet<CheckpointId> = chains[b].iter().copied().collect();
            let common: Vec<CheckpointId> = chains[a]
                .iter()
                .copied()
                .filter(|id| set_b.contains(id))
                .collect();
            let common_set: HashSet<CheckpointId> = common.iter().copied().collect();
            let shared_tasks = branches[a]
                .matrix
                .checkpoints
                .iter()
                .take_while(|r| common_set.contains(&r.id))
                .map(|r| r.task.clone())
                .collect();
            shared.push(SharedHistory {
                a,
                b,
                last_shared: common.first().copied(),
                shared_checkpoints: common.len(),
                shared_tasks,
            });
        }
    }
    Ok(Comparison { branches, shared })
}

impl Comparison {
    /// `coin compare --json`: `{"branches": [{"name", "tip", "tasks", "final", "metrics",
    /// "matrix"}], "shared": [{"a", "b", "last_shared", "shared_checkpoints", "shared_tasks"}]}`.
    pub fn to_json(&self) -> Value {
        json!({
            "branches": self.branches.iter().map(|b| json!({
                "name": b.name,
                "tip": b.tip.to_string(),
                "tasks": b.matrix.matrix.tasks,
                "final": b.matrix.final_row(),
                "metrics": metrics_json(&b.metrics),
                "matrix": b.matrix.to_json(&b.metrics),
            })).collect::<Vec<_>>(),
            "shared": self.shared.iter().map(|s| json!({
                "a": self.branches[s.a].name,
                "b": self.branches[s.b].name,
                "last_shared": s.last_shared.map(|o| o.to_string()),
                "shared_checkpoints": s.shared_checkpoints,
                "shared_tasks": s.shared_tasks,
            })).collect::<Vec<_>>(),
        })
    }

    /// The text report: the task order of each branch, the paper-style table (final row and
    /// summary metrics) and the shared history of each pair.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for b in &self.branches {
            let order: Vec<&str> = b
                .matrix
                .checkpoints
                .iter()
                .map(|r| r.task.as_str())
                .collect();
            s.push_str(&format!(
                "{} ({}): {}\n",
                b.name,
                b.tip.short(),
                if order.is_empty() {
                    "no training steps".to_string()
                } else {
                    order.join(" → ")
                }
            ));
        }
        s.push('\n');
        let rows: Vec<PaperRow<'_>> = self
            .branches
            .iter()
            .map(|b| PaperRow {
                label: b.name.clone(),
                tasks: b.matrix.matrix.tasks.as_slice(),
                final_row: b.matrix.final_row(),
                metrics: &b.metrics,
            })
            .collect();
        s.push_str(&super::matrix::paper_table(&rows));
        if !self.shared.is_empty() {
            s.push('\n');
        }
        for sh in &self.shared {
            let (a, b) = (&self.branches[sh.a].name, &self.branches[sh.b].name);
            match sh.last_shared {
                None => s.push_str(&format!("{a} and {b} share no checkpoint\n")),
                Some(id) => {
                    let tasks = if sh.shared_tasks.is_empty() {
                        "no training step".to_string()
                    } else {
                        format!(
                            "{} step(s): {}",
                            sh.shared_tasks.len(),
                            sh.shared_tasks.join(" → ")
                        )
                    };
                    s.push_str(&format!(
                        "{a} and {b} share {} checkpoint(s) up to {} ({tasks})\n",
                        sh.shared_checkpoints,
                        id.short()
                    ));
                }
            }
        }
        s
    }
}
