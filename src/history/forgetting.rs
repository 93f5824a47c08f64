//! Forgetting along a path: for every task scored on A's first-parent chain (A included),
//! the best score it ever had there versus its score in B. `coin diff A B` reports it and
//! `--fail-on-forgetting X` turns it into a check (the sample `pre-checkpoint` gate uses it).

use std::collections::BTreeMap;

use serde::Serialize;

use super::records::gk_base_task;
use super::repo::CoinRepo;
use super::{CheckpointId, HistoryError};

/// How much one task has forgotten: its best score on the path versus its score in B.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskForgetting {
    /// The task.
    pub task: String,
    /// The metric of the best record.
    pub metric: String,
    /// The best score of the task on A's first-parent chain (A included).
    pub best: f64,
    /// The checkpoint that holds that best score (the newest one, on ties).
    pub best_at: CheckpointId,
    /// The task's score in B, when B has one.
    pub b: Option<f64>,
    /// `best − b` in points (positive: forgotten); `None` when B has no score for the task.
    pub forgetting: Option<f64>,
}

/// Forgetting of B relative to the best earlier scores on A's first-parent chain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForgettingReport {
    /// One entry per task scored anywhere on the chain, sorted by task.
    pub tasks: Vec<TaskForgetting>,
    /// The largest `forgetting` over the tasks B scores, LLM-judge `GK:` records left out
    /// (`None` when there is none).
    pub max_forgetting: Option<f64>,
    /// How many checkpoints of the chain were read.
    pub checkpoints_scanned: usize,
}

impl ForgettingReport {
    /// The tasks that dropped by more than `threshold` points: task scores when `judge` is
    /// false, the LLM judge's `GK:<task>` scores when it is true (the judge samples, so its
    /// scores move by chance and get a threshold of their own).
    pub fn exceeding(&self, threshold: f64, judge: bool) -> Vec<&TaskForgetting> {
        self.tasks
            .iter()
            .filter(|t| gk_base_task(&t.task).is_some() == judge)
            .filter(|t| t.forgetting.is_some_and(|f| f > threshold))
            .collect()
    }
}

/// Per-task `(metric, score)` of one checkpoint.
pub type TaskScores = BTreeMap<String, (String, f64)>;

/// Compute forgetting from scores: `chain` is newest first (A, A's first parent, …), each
/// with its per-task `(metric, score)`; `b` is B's scores.
pub fn forgetting_from_scores(
    chain: &[(CheckpointId, TaskScores)],
    b: &TaskScores,
) -> ForgettingReport {
    let mut best: BTreeMap<&str, (&str, f64, CheckpointId)> = BTreeMap::new();
    for (id, scores) in chain {
        for (task, (metric, score)) in scores {
            // Newest first: an older checkpoint replaces the best only when strictly better.
            match best.get(task.as_str()) {
                Some((_, s, _)) if *s >= *score => {}
                _ => {
                    best.insert(task, (metric, *score, *id));
                }
            }
        }
    }
    let tasks: Vec<TaskForgetting> = best
        .into_iter()
        .map(|(task, (metric, score, at))| {
            let bs = b.get(task).map(|(_, s)| *s);
            TaskForgetting {
                task: task.to_string(),
                metric: metric.to_string(),
                best: score,
                best_at: at,
                b: bs,
                forgetting: bs.map(|s| score - s),
            }
        })
        .collect();
    let max_forgetting = tasks
        .iter()
        .filter(|t| gk_base_task(&t.task).is_none())
        .filter_map(|t| t.forgetting)
        .fold(None, |m: Option<f64>, f| Some(m.map_or(f, |m| m.max(f))));
    ForgettingReport {
        tasks,
        max_forgetting,
        checkpoints_scanned: chain.len(),
    }
}

fn scores(repo: &CoinRepo, id: CheckpointId) -> Result<TaskScores, HistoryError> {
    Ok(repo
        .read_checkpoint(id)?
        .evals
        .into_iter()
        .map(|(task, (rec, _))| (task, (rec.metric, rec.score)))
        .collect())
}

/// Forgetting of checkpoint `b` relative to the best score of every task on `a`'s
/// first-parent chain (`a` and all its first-parent ancestors).
pub fn forgetting_along_path(
    repo: &CoinRepo,
    a: CheckpointId,
    b: CheckpointId,
) -> Result<ForgettingReport, HistoryError> {
    let mut chain = Vec::new();
    for id in repo.first_parent_chain(a, None)? {
        chain.push((id, scores(repo, id)?));
    }
    Ok(forgetting_from_scores(&chain, &scores(repo, b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(n: u8) -> CheckpointId {
        CheckpointId::from(git2::Oid::from_bytes(&[n; 20]).expect("20 bytes make an oid"))
    }

    fn s(pairs: &[(&str, f64)]) -> BTreeMap<String, (String, f64)> {
        pairs
            .iter()
            .map(|(t, v)| (t.to_string(), ("accuracy".to_string(), *v)))
            .collect()
    }

    #[test]
    fn best_earlier_score_not_just_the_parent() {
        // Oldest: ScienceQA 80; then 75; A (newest) 78 and TextVQA 60. B: ScienceQA 70.
        let chain = vec![
            (oid(3), s(&[("ScienceQA", 78.0), ("TextVQA", 60.0)])),
            (oid(2), s(&[("ScienceQA", 75.0)])),
            (oid(1), s(&[("ScienceQA", 80.0)])),
        ];
        let r = forgetting_from_scores(&chain, &s(&[("ScienceQA", 70.0), ("GQA", 50.0)]));
        assert_eq!(r.checkpoints_scanned, 3);
        assert_eq!(r.tasks.len(), 2, "GQA was never scored before B");
        let sqa = &r.tasks[0];
        assert_eq!(
            (sqa.task.as_str(), sqa.best, sqa.best_at),
            ("ScienceQA", 80.0, oid(1))
        );
        assert_eq!(sqa.forgetting, Some(10.0));
        let tvqa = &r.tasks[1];
        assert_eq!((tvqa.b, tvqa.forgetting), (None, None));
        assert_eq!(r.max_forgetting, Some(10.0));
        assert_eq!(r.exceeding(9.99, false).len(), 1);
        assert!(
            r.exceeding(10.0, false).is_empty(),
            "exactly the threshold passes"
        );
    }

    #[test]
    fn ties_keep_the_newest_and_gains_are_negative() {
        let chain = vec![
            (oid(2), s(&[("VQAv2", 50.0)])),
            (oid(1), s(&[("VQAv2", 50.0)])),
        ];
        let r = forgetting_from_scores(&chain, &s(&[("VQAv2", 55.5)]));
        assert_eq!(r.tasks[0].best_at, oid(2));
        assert_eq!(r.tasks[0].forgetting, Some(-5.5));
        assert_eq!(r.max_forgetting, Some(-5.5));
        assert!(r.exceeding(0.0, false).is_empty());
    }

    #[test]
    fn judge_scores_have_a_gate_of_their_own() {
        let chain = vec![(oid(1), s(&[("GQA", 60.0), ("GK:GQA", 70.0)]))];
        let r = forgetting_from_scores(&chain, &s(&[("GQA", 58.0), ("GK:GQA", 40.0)]));
        assert_eq!(r.tasks.len(), 2, "both are reported");
        assert_eq!(
            r.max_forgetting,
            Some(2.0),
            "the judge's drop is not a task's"
        );
        let tasks: Vec<&str> = r
            .exceeding(1.0, false)
            .iter()
            .map(|t| t.task.as_str())
            .collect();
        assert_eq!(tasks, ["GQA"]);
        let judged: Vec<&str> = r
            .exceeding(1.0, true)
            .iter()
            .map(|t| t.task.as_str())
            .collect();
        assert_eq!(judged, ["GK:GQA"]);
        assert!(r.exceeding(30.0, true).is_empty());
    }

    #[test]
    fn nothing_scored() {
        let r = forgetting_from_scores(&[], &BTreeMap::new());
        assert!(r.tasks.is_empty());
        assert_eq!(r.max_forgetting, None);
    }
}
