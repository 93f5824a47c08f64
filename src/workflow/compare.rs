//! Comparing task orders or methods: the matrix and metrics of several branches side by side,
//! the method each branch trained with, its wall time (what its checkpoints' records say the
//! training steps and evals took) and which checkpoints their histories share (a common prefix
//! of training steps).

use std::collections::HashSet;

use crate::history::CheckpointId;
use serde_json::{json, Value};

use crate::history::{CoinRepo, EvalRecord, TrainRecord};
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
    /// How it trained (`config.train` of its training steps).
    pub method: BranchMethod,
    /// What its history's records say the training steps and evals took.
    pub wall: WallTime,
}

/// How a branch's training steps were made: the distinct `config.train.method` (adapter kind)
/// and `config.train.strategy` values of their train records, in order of first use. A record
/// with a `config` but no `strategy` (written before strategies existed) counts as
/// `sequential`; a record without a `config` (an import, `coin commit`) adds nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BranchMethod {
    /// The adapter kinds (`lora`, `moelora`, ...).
    pub train_methods: Vec<String>,
    /// The strategies (`sequential`, `replay`, ...).
    pub strategies: Vec<String>,
}

impl BranchMethod {
    /// `lora`, `lora+replay` (strategy other than sequential), `lora, moelora` when the steps
    /// differ, `—` when no step records its configuration.
    pub fn label(&self) -> String {
        let methods = self.train_methods.join(", ");
        let strategies: Vec<&str> = self
            .strategies
            .iter()
            .map(String::as_str)
            .filter(|s| *s != "sequential")
            .collect();
        match (methods.is_empty(), strategies.is_empty()) {
            (true, true) => "—".to_string(),
            (false, true) => methods,
            (true, false) => strategies.join(", "),
            (false, false) => format!("{methods}+{}", strategies.join(", ")),
        }
    }

    fn add(&mut self, train: &TrainRecord) {
        let Some(cfg) = train.extra.get("config").and_then(|c| c.get("train")) else {
            return;
        };
        let push = |list: &mut Vec<String>, v: &str| {
            if !list.iter().any(|x| x == v) {
                list.push(v.to_string());
            }
        };
        if let Some(m) = cfg.get("method").and_then(Value::as_str) {
            push(&mut self.train_methods, m);
        }
        let strategy = cfg
            .get("strategy")
            .and_then(Value::as_str)
            .unwrap_or("sequential");
        push(&mut self.strategies, strategy);
    }
}

/// The wall time of a branch: the seconds its first-parent history's records hold, summed.
/// A checkpoint shared with another branch counts for both (each branch's cost as if it ran
/// alone).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WallTime {
    /// Seconds of the training steps: `result.seconds` of coin's trainer, `external.seconds`
    /// of an external one.
    pub train_seconds: f64,
    /// Seconds of the evals: each eval record's `seconds` (coin's evaluator, from when it
    /// recorded them) or `evaluator.seconds` (an external evaluator).
    pub eval_seconds: f64,
    /// Training steps on the history (checkpoints with a train record that is not a zero-shot
    /// base).
    pub steps: usize,
    /// Of those, how many record no time (imports, `coin commit`): counted as 0.
    pub untimed_steps: usize,
    /// Eval records on the history's checkpoints.
    pub evals: usize,
    /// Of those, how many record no time (`eval --record`, older records): counted as 0.
    pub untimed_evals: usize,
}

impl WallTime {
    /// Training plus eval seconds.
    pub fn total(&self) -> f64 {
        self.train_seconds + self.eval_seconds
    }

    /// Whether some step or eval recorded no time.
    pub fn incomplete(&self) -> bool {
        self.untimed_steps > 0 || self.untimed_evals > 0
    }
}

fn seconds_at(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s >= 0.0)
}

/// The seconds a train record says its step took: `result.seconds` (coin's trainer) or
/// `external.seconds` (an external trainer); `None` when it holds neither.
pub fn train_record_seconds(t: &TrainRecord) -> Option<f64> {
    seconds_at(t.extra.get("result").and_then(|r| r.get("seconds"))).or_else(|| {
        seconds_at(
            t.extra
                .get(super::external::EXTERNAL_FIELD)
                .and_then(|r| r.get("seconds")),
        )
    })
}

/// The seconds an eval record says its eval took: `seconds` (coin's evaluator: generating
/// and scoring the answers) or `evaluator.seconds` (an external evaluator); `None` when it
/// holds neither.
pub fn eval_record_seconds(r: &EvalRecord) -> Option<f64> {
    seconds_at(r.extra.get(super::eval::SECONDS_FIELD)).or_else(|| {
        seconds_at(
            r.extra
                .get(super::external::EVALUATOR_FIELD)
                .and_then(|e| e.get("seconds")),
        )
    })
}

/// The wall time and method of the first-parent history `chain`.
fn wall_and_method(
    repo: &CoinRepo,
    chain: &[CheckpointId],
) -> Result<(WallTime, BranchMethod), WorkflowError> {
    let mut wall = WallTime::default();
    let mut method = BranchMethod::default();
    // Oldest first, so that methods are listed in order of first use.
    for id in chain.iter().rev() {
        let cp = repo.read_checkpoint(*id)?;
        if let Some(train) = &cp.train {
            let secs = train_record_seconds(train);
            if !super::matrix::is_base_record(train) {
                wall.steps += 1;
                if secs.is_none() {
                    wall.untimed_steps += 1;
                }
                method.add(train);
            }
            wall.train_seconds += secs.unwrap_or(0.0);
        }
        for (rec, _) in cp.evals.values() {
            wall.evals += 1;
            match eval_record_seconds(rec) {
                Some(s) => wall.eval_seconds += s,
                None => wall.untimed_evals += 1,
            }
        }
    }
    Ok((wall, method))
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
        let chain = repo.first_parent_chain(tip, None)?;
        let (wall, method) = wall_and_method(repo, &chain)?;
        chains.push(chain);
        branches.push(BranchSummary {
            name: name.clone(),
            tip,
            matrix,
            metrics,
            method,
            wall,
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
    /// Branch `i`'s wall time as a multiple of the first branch's; `None` when the first
    /// branch's records hold no time.
    pub fn wall_ratio(&self, i: usize) -> Option<f64> {
        let first = self.branches.first()?.wall.total();
        let this = self.branches.get(i)?.wall.total();
        (first > 0.0).then(|| this / first)
    }

    /// `coin compare --json`: `{"branches": [{"name", "tip", "tasks", "final", "metrics",
    /// "matrix", "method", "train_methods", "strategies", "wall"}], "shared": [{"a", "b",
    /// "last_shared", "shared_checkpoints", "shared_tasks"}]}`; `wall` is `{"seconds",
    /// "train_seconds", "eval_seconds", "ratio_to_first", "steps", "untimed_steps", "evals",
    /// "untimed_evals"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "branches": self.branches.iter().enumerate().map(|(i, b)| json!({
                "name": b.name,
                "tip": b.tip.to_string(),
                "tasks": b.matrix.matrix.tasks,
                "final": b.matrix.final_row(),
                "metrics": metrics_json(&b.metrics),
                "matrix": b.matrix.to_json(&b.metrics),
                "method": b.method.label(),
                "train_methods": b.method.train_methods,
                "strategies": b.method.strategies,
                "wall": {
                    "seconds": b.wall.total(),
                    "train_seconds": b.wall.train_seconds,
                    "eval_seconds": b.wall.eval_seconds,
                    "ratio_to_first": self.wall_ratio(i),
                    "steps": b.wall.steps,
                    "untimed_steps": b.wall.untimed_steps,
                    "evals": b.wall.evals,
                    "untimed_evals": b.wall.untimed_evals,
                },
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
        s.push('\n');
        s.push_str(&self.wall_table());
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

    /// The method and wall-time table: one line per branch with its method, the seconds of
    /// its training steps and evals, their sum, the sum as a multiple of the first branch's,
    /// and what recorded no time; then a note when something did.
    pub fn wall_table(&self) -> String {
        if self
            .branches
            .iter()
            .all(|b| b.wall.steps + b.wall.evals == b.wall.untimed_steps + b.wall.untimed_evals)
        {
            return "wall time: not recorded (no train or eval record of these branches holds \
                    its seconds: imports, `coin commit`, `eval --record`)\n"
                .to_string();
        }
        let first = self.branches.first().map_or("", |b| b.name.as_str());
        let ratio_head = format!("× {first}");
        let header = [
            "",
            "method",
            "train s",
            "eval s",
            "wall s",
            &ratio_head,
            "untimed",
        ];
        let mut lines: Vec<[String; 7]> = vec![header.map(str::to_string)];
        for (i, b) in self.branches.iter().enumerate() {
            let w = &b.wall;
            let mut untimed = Vec::new();
            if w.untimed_steps > 0 {
                untimed.push(format!("{}/{} steps", w.untimed_steps, w.steps));
            }
            if w.untimed_evals > 0 {
                untimed.push(format!("{}/{} evals", w.untimed_evals, w.evals));
            }
            lines.push([
                b.name.clone(),
                b.method.label(),
                format!("{:.1}", w.train_seconds),
                format!("{:.1}", w.eval_seconds),
                format!("{:.1}", w.total()),
                self.wall_ratio(i)
                    .map_or_else(|| "—".to_string(), |r| format!("{r:.2}")),
                if untimed.is_empty() {
                    "—".to_string()
                } else {
                    untimed.join(", ")
                },
            ]);
        }
        let widths: Vec<usize> = (0..7)
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut s = String::new();
        for l in &lines {
            let mut line = format!(
                "{:<w0$}  {:<w1$}",
                l[0],
                l[1],
                w0 = widths[0],
                w1 = widths[1]
            );
            for c in 2..6 {
                line.push_str(&format!("  {:>w$}", l[c], w = widths[c]));
            }
            line.push_str(&format!("  {}", l[6]));
            s.push_str(line.trim_end());
            s.push('\n');
        }
        if self.branches.iter().any(|b| b.wall.incomplete()) {
            s.push_str(
                "untimed: steps or evals whose records hold no time count 0 s (imports, \
                 `coin commit`,\n`eval --record`)\n",
            );
        }
        s
    }
}
