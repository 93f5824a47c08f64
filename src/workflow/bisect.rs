//! `coin bisect`: find the first checkpoint of a branch where a task fell by more than a
//! threshold below its best earlier score, evaluating only the checkpoints the search needs.
//!
//! The chain is the branch's first-parent history from the checkpoint that trained the task
//! (its score there is the first reference) to the tip. A checkpoint is *bad* when the task's
//! score there is more than `drop` points below the best score known on the chain before it;
//! the search assumes that once bad, later checkpoints stay bad (as `git bisect` assumes), so it
//! is a binary search between the training checkpoint (good by definition) and the tip. Scores
//! come from the checkpoints' eval records when they have one, else from an eval run now (its
//! record is attached, so the next search reads it). Library code: events go to a
//! [`BisectProgress`], the CLI prints.

use serde::Serialize;

use super::config::RunConfig;
use super::eval::{evaluate, find_task, EvalOptions, EvalProgress};
use super::external::{evaluate_external, CommandProgress};
use super::WorkflowError;
use crate::history::{CheckpointId, CoinRepo};
use crate::tasks::registry::Registry;

/// Where a step's score came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreSource {
    /// An eval record the checkpoint already had.
    Recorded,
    /// Evaluated by this search (the record is attached now).
    Evaluated,
}

/// One checkpoint the search looked at.
#[derive(Clone, Debug, Serialize)]
pub struct BisectStep {
    /// The checkpoint.
    pub checkpoint: CheckpointId,
    /// Its position on the chain (0 = the checkpoint that trained the task).
    pub position: usize,
    /// The task trained at this checkpoint.
    pub trained_task: String,
    /// The task's score there.
    pub score: f64,
    /// The best score known before it on the chain (the reference).
    pub best_earlier: f64,
    /// Whether it is more than `drop` points below the reference.
    pub bad: bool,
    /// Where the score came from.
    pub source: ScoreSource,
}

/// What a search found.
#[derive(Clone, Debug, Serialize)]
pub struct BisectReport {
    /// The task.
    pub task: String,
    /// The threshold in points.
    pub drop: f64,
    /// The chain searched, oldest first (from the checkpoint that trained the task).
    pub chain: Vec<CheckpointId>,
    /// The checkpoints looked at, in the order of the search.
    pub steps: Vec<BisectStep>,
    /// The first bad checkpoint (`None`: the tip is not bad).
    pub first_bad: Option<BisectStep>,
    /// How many evals the search ran.
    pub evaluated: usize,
}

/// Events of a search (the CLI prints them).
pub trait BisectProgress {
    /// A checkpoint was judged.
    fn step(&mut self, step: &BisectStep, remaining: usize);
    /// The sink of an eval run by coin's engine.
    fn evals(&mut self) -> &mut dyn EvalProgress;
    /// The sink of an eval run by the `[evaluator]` command.
    fn command(&mut self) -> &mut dyn CommandProgress;
}

/// Search `tip`'s first-parent chain for the first checkpoint where `task` is more than
/// `drop` points below its best earlier score (module docs).
pub fn bisect(
    repo: &CoinRepo,
    tip: CheckpointId,
    task: &str,
    drop: f64,
    cfg: &RunConfig,
    progress: &mut dyn BisectProgress,
) -> Result<BisectReport, WorkflowError> {
    if !drop.is_finite() || drop < 0.0 {
        return Err(WorkflowError::Input(format!(
            "--drop must be a number of points >= 0, got {drop}"
        )));
    }
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let task = find_task(&reg, task)?.name.clone();
    let mut newest_first = repo.first_parent_chain(tip, None)?;
    newest_first.reverse();
    let trained: Vec<String> = newest_first
        .iter()
        .map(|id| {
            repo.read_checkpoint(*id)
                .map(|cp| cp.train.map(|t| t.task).unwrap_or_default())
        })
        .collect::<Result<_, _>>()?;
    let Some(start) = trained.iter().position(|t| *t == task) else {
        return Err(WorkflowError::Input(format!(
            "task '{task}' is not trained on the history of {}: there is no score right \
             after training it to fall from (coin log shows the tasks of a branch)",
            tip.short()
        )));
    };
    let chain: Vec<CheckpointId> = newest_first[start..].to_vec();
    let trained: Vec<String> = trained[start..].to_vec();
    // Known scores by chain position: existing records first.
    let mut known: Vec<Option<(f64, ScoreSource)>> = chain
        .iter()
        .map(|id| {
            repo.read_checkpoint(*id).map(|cp| {
                cp.evals
                    .get(&task)
                    .map(|(r, _)| (r.score, ScoreSource::Recorded))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut evaluated = 0usize;
    let mut steps = Vec::new();
    let mut score_at = |i: usize,
                        known: &mut Vec<Option<(f64, ScoreSource)>>,
                        progress: &mut dyn BisectProgress|
     -> Result<(f64, ScoreSource), WorkflowError> {
        if let Some(k) = known[i] {
            return Ok(k);
        }
        let tasks = [task.clone()];
        let evals = if cfg.evaluator.command.trim().is_empty() {
            evaluate(
                repo,
                chain[i],
                &tasks,
                cfg,
                &EvalOptions::default(),
                progress.evals(),
            )?
        } else {
            evaluate_external(repo, chain[i], &tasks, cfg, false, progress.command())?
        };
        let score = evals
            .iter()
            .find(|e| e.task == task)
            .map(|e| e.record.score)
            .ok_or_else(|| {
                WorkflowError::Input(format!(
                    "evaluating {} gave no score for '{task}'",
                    chain[i].short()
                ))
            })?;
        evaluated += 1;
        known[i] = Some((score, ScoreSource::Evaluated));
        Ok((score, ScoreSource::Evaluated))
    };
    let mut judge = |i: usize,
                     known: &mut Vec<Option<(f64, ScoreSource)>>,
                     steps: &mut Vec<BisectStep>,
                     progress: &mut dyn BisectProgress|
     -> Result<BisectStep, WorkflowError> {
        let (score, source) = score_at(i, known, progress)?;
        let best_earlier = (0..i)
            .filter_map(|j| known[j].map(|(s, _)| s))
            .fold(f64::NEG_INFINITY, f64::max);
        let step = BisectStep {
            checkpoint: chain[i],
            position: i,
            trained_task: trained[i].clone(),
            score,
            best_earlier,
            bad: i > 0 && score < best_earlier - drop,
            source,
        };
        steps.push(step.clone());
        Ok(step)
    };
    // Steps left to judge when the first bad one lies in (lo, hi].
    let left = |lo: usize, hi: usize| match hi - lo {
        0 | 1 => 0,
        n => (n - 1).ilog2() as usize + 1,
    };
    // The checkpoint that trained the task is the first reference (good by definition).
    let last = chain.len() - 1;
    let start_step = judge(0, &mut known, &mut steps, progress)?;
    progress.step(&start_step, if last == 0 { 0 } else { left(0, last) + 1 });
    let tip_step = if last == 0 {
        None
    } else {
        let t = judge(last, &mut known, &mut steps, progress)?;
        progress.step(&t, if t.bad { left(0, last) } else { 0 });
        Some(t)
    };
    let Some(tip_step) = tip_step.filter(|t| t.bad) else {
        return Ok(BisectReport {
            task,
            drop,
            chain,
            steps,
            first_bad: None,
            evaluated,
        });
    };
    let (mut lo, mut hi) = (0usize, last);
    let mut first_bad = tip_step;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let s = judge(mid, &mut known, &mut steps, progress)?;
        if s.bad {
            hi = mid;
        } else {
            lo = mid;
        }
        progress.step(&s, left(lo, hi));
        if s.bad {
            first_bad = s;
        }
    }
    // The reference of the answer may have risen since it was judged (scores found later
    // between the start and it): judge it again with everything known.
    let again = judge(hi, &mut known, &mut Vec::new(), progress)?;
    if again.bad {
        first_bad = again;
    }
    Ok(BisectReport {
        task,
        drop,
        chain,
        steps,
        first_bad: Some(first_bad),
        evaluated,
    })
}
