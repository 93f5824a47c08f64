//! Merging two checkpoints (`coin merge A B`, docs/merge.md): a checkpoint whose git parents
//! are both inputs (A first, so first-parent walks follow A), whose adapter is the merge of
//! theirs ([`crate::ml::merge`]: exact for average and task arithmetic, TIES on the factors for
//! `ties`), evaluated on the union of both inputs' trained tasks by
//! coin's own engine, and then made the head of the current branch through the
//! `pre-checkpoint` gate, as `coin train` does (commit detached, evaluate, publish).
//!
//! The merge key (blake3 of the inputs, method, effective weights, TIES' density and coin's
//! version) is
//! recorded in the train record; a merge with the same key anywhere in the repository is reused,
//! so running the same merge again is idempotent.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::config::check_parent_base;
use super::eval::{evaluate, EvalOptions, TaskEval};
use super::matrix::{is_base_record, KIND_FIELD};
use super::train::TrainWorkflowProgress;
use super::{RunConfig, WorkflowError};
use crate::history::records::to_canonical_json;
use crate::history::{BaseModel, Checkpoint, CheckpointId, CoinRepo, CommitRequest};
use crate::ml::merge::FactorMerge;

/// `kind` of a merge checkpoint's train record.
pub const KIND_MERGE: &str = "merge";

/// The task name a merge checkpoint is committed under (its train record's `task`).
pub const MERGE_TASK: &str = "merge";

/// The train-record field holding the merge key.
pub const MERGE_KEY_FIELD: &str = "merge_key";

/// The train-record field listing the tasks a merge checkpoint was trained on (the union of
/// its inputs').
pub const MERGED_TASKS_FIELD: &str = "tasks";

/// The version tag of the merge key's JSON.
pub const MERGE_KEY_FORMAT: &str = "coin.merge-key.v1";

/// How the two adapters are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergeMethod {
    /// The weighted average: the weights (default ½, ½) normalised to sum 1.
    Average,
    /// Task arithmetic: the adapters' updates added with the weights as given (default 1, 1).
    TaskArithmetic,
    /// TIES-Merging on the LoRA factors (equal ranks), the weights as given (default 1, 1),
    /// each factor trimmed to the `--density` share of its largest entries.
    Ties,
}

/// TIES' default density: the share of each factor's entries kept (the paper's k = 20 %).
pub const DEFAULT_TIES_DENSITY: f64 = 0.2;

impl MergeMethod {
    /// Parse a method name (`average`, `task-arithmetic`, `ties`).
    pub fn parse(s: &str) -> Result<Self, WorkflowError> {
        match s {
            "average" => Ok(MergeMethod::Average),
            "task-arithmetic" => Ok(MergeMethod::TaskArithmetic),
            "ties" => Ok(MergeMethod::Ties),
            other => Err(WorkflowError::Input(format!(
                "unknown merge method '{}'; use average, task-arithmetic or ties",
                other.escape_debug()
            ))),
        }
    }

    /// The density the factors are trimmed to: `given` (or the default) for
    /// [`MergeMethod::Ties`], checked to lie in (0, 1]; `None` for the other methods, which
    /// refuse a given one.
    pub fn effective_density(self, given: Option<f64>) -> Result<Option<f64>, WorkflowError> {
        match (self, given) {
            (MergeMethod::Ties, None) => Ok(Some(DEFAULT_TIES_DENSITY)),
            (MergeMethod::Ties, Some(d)) if d > 0.0 && d <= 1.0 => Ok(Some(d)),
            (MergeMethod::Ties, Some(d)) => Err(WorkflowError::Input(format!(
                "--density {d} is outside (0, 1]: it is the share of each factor's entries \
                 TIES keeps, e.g. --density 0.2"
            ))),
            (_, None) => Ok(None),
            (m, Some(_)) => Err(WorkflowError::Input(format!(
                "--density is a setting of --method ties; {} trims nothing",
                m.name()
            ))),
        }
    }

    /// The name on the command line and in the record.
    pub fn name(self) -> &'static str {
        match self {
            MergeMethod::Average => "average",
            MergeMethod::TaskArithmetic => "task-arithmetic",
            MergeMethod::Ties => "ties",
        }
    }

    /// The weights the adapters are merged with: `given` (or the default) checked, and
    /// normalised to sum 1 for [`MergeMethod::Average`].
    pub fn effective_weights(self, given: Option<&[f64]>) -> Result<[f64; 2], WorkflowError> {
        let w: [f64; 2] = match given {
            None => [1.0, 1.0],
            Some(&[a, b]) => [a, b],
            Some(other) => {
                return Err(WorkflowError::Input(format!(
                    "--weights gives {} weight(s); a merge of two checkpoints needs two, e.g. \
                     --weights 0.5,0.5",
                    other.len()
                )))
            }
        };
        if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
            return Err(WorkflowError::Input(format!(
                "merge weight {bad} is not a finite number; give two finite weights, e.g. \
                 --weights 0.5,0.5"
            )));
        }
        match self {
            MergeMethod::TaskArithmetic | MergeMethod::Ties => Ok(w),
            MergeMethod::Average => {
                let sum = w[0] + w[1];
                if w.iter().any(|x| *x < 0.0) || sum <= 0.0 {
                    return Err(WorkflowError::Input(format!(
                        "average weights must be non-negative with a positive sum, got {} and \
                         {}; use --method task-arithmetic for negative weights",
                        w[0], w[1]
                    )));
                }
                Ok([w[0] / sum, w[1] / sum])
            }
        }
    }
}

/// Which tasks the merged checkpoint is evaluated on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergeEvalTasks {
    /// Every task either input was trained on.
    Union,
    /// No eval.
    None,
    /// These tasks.
    List(Vec<String>),
}

/// What to merge.
#[derive(Clone, Debug)]
pub struct MergeRequest {
    /// The first input (the first git parent).
    pub a: CheckpointId,
    /// The second input.
    pub b: CheckpointId,
    /// How.
    pub method: MergeMethod,
    /// The weights as given (`None`: the method's default).
    pub weights: Option<Vec<f64>>,
    /// TIES' density as given (`None`: the default for ties; refused for other methods).
    pub density: Option<f64>,
    /// Commit message.
    pub message: Option<String>,
    /// Skip the `pre-checkpoint` gate.
    pub skip_hooks: bool,
    /// The evals of the merged checkpoint.
    pub eval_tasks: MergeEvalTasks,
}

/// What [`merge_checkpoints`] did.
#[derive(Clone, Debug, Serialize)]
pub struct MergeOutcome {
    /// The merged checkpoint, now the branch head.
    pub checkpoint: CheckpointId,
    /// The branch moved.
    pub branch: String,
    /// Whether an existing merge with the same key was reused.
    pub reused: bool,
    /// The merge key.
    pub merge_key: String,
    /// The method.
    pub method: MergeMethod,
    /// The weights the adapters were merged with.
    pub weights: [f64; 2],
    /// TIES' density (absent for the other methods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    /// The merged adapter's rank.
    pub rank: Option<u64>,
    /// Eval outcomes, in task order.
    pub evals: Vec<TaskEval>,
}

/// The base model a checkpoint records (its manifest, else its train record's config).
fn recorded_base(cp: &Checkpoint) -> Option<String> {
    cp.manifest
        .base_model
        .as_ref()
        .map(|b| b.name.clone())
        .or_else(|| {
            cp.train
                .as_ref()
                .and_then(|t| t.extra.get("config"))
                .and_then(|c| c.pointer("/model/name"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}

/// The tasks trained on the first-parent history up to `id`, oldest first; a merge checkpoint
/// contributes the tasks its record lists.
pub fn merged_trained_tasks(
    repo: &CoinRepo,
    id: CheckpointId,
) -> Result<Vec<String>, WorkflowError> {
    let mut chain = repo.first_parent_chain(id, None)?;
    chain.reverse();
    let mut tasks: Vec<String> = Vec::new();
    for c in chain {
        let cp = repo.read_checkpoint(c)?;
        let Some(t) = &cp.train else { continue };
        if is_base_record(t) {
            continue;
        }
        if t.extra.get(KIND_FIELD).and_then(Value::as_str) == Some(KIND_MERGE) {
            tasks.clear();
            for x in t
                .extra
                .get(MERGED_TASKS_FIELD)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !tasks.iter().any(|y| y == x) {
                    tasks.push(x.to_string());
                }
            }
        } else if !tasks.iter().any(|x| x == &t.task) {
            tasks.push(t.task.clone());
        }
    }
    Ok(tasks)
}

/// Check that `a` and `b` can be merged: both carry a LoRA adapter, for the same base model,
/// on the same target modules.
fn check_compatible(a: &Checkpoint, b: &Checkpoint, cfg: &RunConfig) -> Result<(), WorkflowError> {
    let (sa, sb) = (a.id.short(), b.id.short());
    let adapter = |cp: &'_ Checkpoint| {
        cp.manifest.adapter.clone().ok_or_else(|| {
            WorkflowError::Input(format!(
                "checkpoint {} has no adapter (no adapter_config.json; a zero-shot or base \
                 checkpoint?), so there is nothing to merge; merge two trained checkpoints",
                cp.id.short()
            ))
        })
    };
    let (ad_a, ad_b) = (adapter(a)?, adapter(b)?);
    let (base_a, base_b) = (recorded_base(a), recorded_base(b));
    if base_a != base_b {
        let show = |b: &Option<String>| b.clone().unwrap_or_else(|| "(none recorded)".into());
        return Err(WorkflowError::Input(format!(
            "checkpoints {sa} and {sb} were trained on different base models ('{}' and '{}'); \
             only adapters of the same base model can be merged",
            show(&base_a),
            show(&base_b)
        )));
    }
    check_parent_base(a, cfg)?;
    for (cp, ad) in [(a, &ad_a), (b, &ad_b)] {
        if ad.kind != "lora" {
            return Err(WorkflowError::Input(format!(
                "checkpoint {} holds a {} adapter; merging is supported for LoRA only (not \
                 supported yet for MoELoRA: its router weighs the experts per token, so two \
                 MoELoRA adapters do not add up to one)",
                cp.id.short(),
                ad.kind
            )));
        }
    }
    let targets = |ad: &crate::history::records::AdapterInfo| {
        ad.config
            .get("target_modules")
            .cloned()
            .unwrap_or(Value::Null)
    };
    if targets(&ad_a) != targets(&ad_b) {
        return Err(WorkflowError::Input(format!(
            "checkpoints {sa} and {sb} adapt different target modules ({} and {}); merge \
             adapters trained with the same train.targets",
            targets(&ad_a),
            targets(&ad_b)
        )));
    }
    Ok(())
}

fn merge_key(
    req: &MergeRequest,
    weights: [f64; 2],
    density: Option<f64>,
) -> Result<String, WorkflowError> {
    let mut key_json = json!({
        "format": MERGE_KEY_FORMAT,
        "inputs": [req.a.to_string(), req.b.to_string()],
        "method": req.method.name(),
        "weights": weights,
        "coin_version": env!("CARGO_PKG_VERSION"),
    });
    // Only TIES has a density: the other methods' keys stay as they were.
    if let Some(d) = density {
        key_json["density"] = json!(d);
    }
    Ok(blake3::hash(to_canonical_json(&key_json)?.as_bytes())
        .to_hex()
        .to_string())
}

fn find_by_key(repo: &CoinRepo, key: &str) -> Result<Option<CheckpointId>, WorkflowError> {
    for id in repo.known_checkpoints()? {
        let Ok(cp) = repo.read_checkpoint(id) else {
            continue; // not a coin checkpoint
        };
        if cp
            .train
            .as_ref()
            .and_then(|t| t.extra.get(MERGE_KEY_FIELD))
            .and_then(Value::as_str)
            == Some(key)
        {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Merge `req.a` and `req.b` on the current branch (see the module docs).
pub fn merge_checkpoints(
    repo: &CoinRepo,
    cfg: &RunConfig,
    req: &MergeRequest,
    progress: &mut dyn TrainWorkflowProgress,
) -> Result<MergeOutcome, WorkflowError> {
    let cfg = &cfg.with_runtime(cfg.resolved_runtime()?);
    let weights = req.method.effective_weights(req.weights.as_deref())?;
    let density = req.method.effective_density(req.density)?;
    if req.a == req.b {
        return Err(WorkflowError::Input(format!(
            "both inputs are checkpoint {}; merge two different checkpoints",
            req.a.short()
        )));
    }
    let a = repo.read_checkpoint(req.a)?;
    let b = repo.read_checkpoint(req.b)?;
    check_compatible(&a, &b, cfg)?;
    let branch = repo.current_branch()?;
    let head = repo.branch_target(&branch)?;
    let key = merge_key(req, weights, density)?;
    let tasks = {
        let mut t = merged_trained_tasks(repo, req.a)?;
        for x in merged_trained_tasks(repo, req.b)? {
            if !t.contains(&x) {
                t.push(x);
            }
        }
        t
    };
    let (id, reused) = match find_by_key(repo, &key)? {
        Some(found) => {
            progress.note(&format!(
                "Reusing checkpoint {} (the same merge: merge key {}).",
                found.short(),
                &key[..12]
            ));
            (found, true)
        }
        None => {
            let work = repo.coin_dir().join("tmp").join("merge").join(&key[..16]);
            if work.exists() {
                std::fs::remove_dir_all(&work).map_err(WorkflowError::io("remove", &work))?;
            }
            std::fs::create_dir_all(&work).map_err(WorkflowError::io("create", &work))?;
            let (da, db, out) = (work.join("a"), work.join("b"), work.join("merged"));
            repo.checkout(req.a, &da)?;
            repo.checkout(req.b, &db)?;
            progress.note(&format!(
                "Merging the adapters of {} and {} ({}, weights {} and {}{}).",
                a.id.short(),
                b.id.short(),
                req.method.name(),
                weights[0],
                weights[1],
                density.map_or_else(String::new, |d| format!(", density {d}"))
            ));
            let how = match density {
                Some(density) => FactorMerge::Ties { density },
                None => FactorMerge::Concat,
            };
            let merged = crate::ml::merge::merge_lora([&da, &db], weights, how, &out)?;
            let mut extra: BTreeMap<String, Value> = BTreeMap::new();
            extra.insert(KIND_FIELD.into(), json!(KIND_MERGE));
            extra.insert(MERGE_KEY_FIELD.into(), json!(key));
            extra.insert("method".into(), json!(req.method.name()));
            extra.insert("weights".into(), json!(weights));
            if let Some(d) = density {
                extra.insert("density".into(), json!(d));
            }
            extra.insert(
                "inputs".into(),
                json!([req.a.to_string(), req.b.to_string()]),
            );
            extra.insert("rank".into(), json!(merged.rank));
            extra.insert("scale".into(), json!(merged.scale));
            extra.insert(MERGED_TASKS_FIELD.into(), json!(tasks));
            extra.insert("config".into(), cfg.to_record_value());
            let base_model = a.manifest.base_model.clone().or_else(|| {
                recorded_base(&a).map(|name| BaseModel {
                    name,
                    manifest: None,
                })
            });
            let message = req.message.clone().or_else(|| {
                Some(format!(
                    "{} of {} and {}",
                    req.method.name(),
                    a.id.short(),
                    b.id.short()
                ))
            });
            let outcome = repo.commit_merge(
                &CommitRequest {
                    paths: vec![out],
                    task: MERGE_TASK.into(),
                    message,
                    parent: Some(req.a),
                    base_model,
                    train_extra: extra,
                    skip_hooks: req.skip_hooks,
                    detached: true,
                    ..CommitRequest::default()
                },
                req.b,
            )?;
            let _ = std::fs::remove_dir_all(&work);
            progress.note(&format!(
                "Wrote checkpoint {} (rank {}, parents {} and {}).",
                outcome.id.short(),
                merged.rank,
                a.id.short(),
                b.id.short()
            ));
            (outcome.id, false)
        }
    };
    let eval_tasks = match &req.eval_tasks {
        MergeEvalTasks::Union => tasks,
        MergeEvalTasks::None => Vec::new(),
        MergeEvalTasks::List(l) => l.clone(),
    };
    // The records are attached before the gate runs, so that it sees the merged scores.
    let evals = if eval_tasks.is_empty() {
        Vec::new()
    } else {
        evaluate(
            repo,
            id,
            &eval_tasks,
            cfg,
            &EvalOptions::default(),
            progress.evals(),
        )?
    };
    if head != Some(id) {
        if let Some(g) = repo.publish_checkpoint(&branch, head, id, req.skip_hooks)? {
            let text = g.output();
            if !text.is_empty() {
                progress.note(&text);
            }
        }
        progress.note(&format!("{} is now the head of {branch}.", id.short()));
    }
    let rank = repo
        .read_checkpoint(id)?
        .train
        .and_then(|t| t.extra.get("rank").and_then(Value::as_u64));
    Ok(MergeOutcome {
        checkpoint: id,
        branch,
        reused,
        merge_key: key,
        method: req.method,
        weights,
        density,
        rank,
        evals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_checked_and_averages_normalised() {
        let avg = MergeMethod::Average;
        let ta = MergeMethod::TaskArithmetic;
        assert_eq!(avg.effective_weights(None).expect("ok"), [0.5, 0.5]);
        assert_eq!(
            avg.effective_weights(Some(&[3.0, 1.0])).expect("ok"),
            [0.75, 0.25]
        );
        assert_eq!(ta.effective_weights(None).expect("ok"), [1.0, 1.0]);
        assert_eq!(
            ta.effective_weights(Some(&[1.0, -0.5])).expect("ok"),
            [1.0, -0.5]
        );
        for (m, w, want) in [
            (avg, vec![1.0], "needs two"),
            (ta, vec![1.0, 2.0, 3.0], "needs two"),
            (ta, vec![f64::NAN, 1.0], "not a finite number"),
            (avg, vec![f64::INFINITY, 1.0], "not a finite number"),
            (avg, vec![1.0, -1.0], "non-negative"),
            (avg, vec![0.0, 0.0], "positive sum"),
        ] {
            let e = m
                .effective_weights(Some(&w))
                .expect_err("refused")
                .to_string();
            assert!(e.contains(want), "{w:?}: {e}");
        }
        assert_eq!(MergeMethod::parse("ties").expect("ties"), MergeMethod::Ties);
        let ties = MergeMethod::Ties;
        assert_eq!(ties.effective_weights(None).expect("ok"), [1.0, 1.0]);
        assert_eq!(
            ties.effective_weights(Some(&[0.7, -0.2])).expect("ok"),
            [0.7, -0.2]
        );
        assert_eq!(ties.effective_density(None).expect("ok"), Some(0.2));
        assert_eq!(ties.effective_density(Some(1.0)).expect("ok"), Some(1.0));
        assert_eq!(avg.effective_density(None).expect("ok"), None);
        for (m, d, want) in [
            (ties, 0.0, "outside (0, 1]"),
            (ties, 1.5, "outside (0, 1]"),
            (ties, f64::NAN, "outside (0, 1]"),
            (avg, 0.5, "setting of --method ties"),
            (ta, 0.5, "setting of --method ties"),
        ] {
            let e = m
                .effective_density(Some(d))
                .expect_err("refused")
                .to_string();
            assert!(e.contains(want), "{d}: {e}");
        }
        assert!(MergeMethod::parse("slerp").is_err());
        assert_eq!(
            MergeMethod::parse("task-arithmetic").expect("ok"),
            MergeMethod::TaskArithmetic
        );
    }
}
