//! Continual-learning methods that change a step's objective or what its checkpoint holds
//! (`train.strategy`; docs/methods.md). `replay` changes only the data and lives in
//! [`super::train`]; `ewc` holds the adapter near the parent's, weighted by a stored Fisher
//! ([`crate::ml::train::ewc`]); `lwf` distils toward the parent's outputs
//! ([`crate::ml::train::lwf`]). The methods here plug into a step of coin's engine at two points:
//!
//! 1. before training, [`prepare`] builds the method's run from the parent checkpoint's files
//!    (e.g. the Fisher an `ewc` parent stored) and the step's model, adapter and samples; its
//!    [`MethodRun::regularizer`] is the objective's extra term;
//! 2. after training, [`MethodRun::finish`] writes the method's own files into the checkpoint
//!    folder (committed with the adapter, stored per tensor like any safetensors file) and
//!    returns what the train record keeps under `method`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use super::config::{ProjectorInit, RunConfig, Strategy};
use super::WorkflowError;
use crate::ml::llava::LoadedModel;
use crate::ml::load::{read_tensor_file, write_safetensors};
use crate::ml::train::data::Sample;
use crate::ml::train::ewc::{
    consolidate, diagonal_fisher, fisher_sample_indices, fisher_sum_max, EwcPenalty, FISHER_FILE,
};
use crate::ml::train::lwf::{teacher_outputs, Lwf, LwfSettings, TeacherPass};
use crate::ml::train::olora::{write_olora, OloraPenalty, OloraStack};
use crate::ml::train::params::TrainableParams;
use crate::ml::train::trainer::Regularizer;

/// What a method sees of the step it runs in.
pub struct MethodContext<'a> {
    /// The step's configuration.
    pub cfg: &'a RunConfig,
    /// The task being trained.
    pub task: &'a str,
    /// The parent checkpoint's files as checked out, when the parent has an adapter (`None` at
    /// a branch's first step).
    pub parent_dir: Option<&'a Path>,
    /// The model, with `params` attached.
    pub loaded: &'a LoadedModel,
    /// The trainable adapter (and projector).
    pub params: &'a TrainableParams,
    /// The step's training samples (replayed ones included).
    pub samples: &'a [Sample],
    /// `olora`: the earlier tasks' frozen adapters the new one is stacked on (attached by
    /// [`crate::ml::train::olora::attach_olora`]).
    pub olora: Option<&'a OloraStack>,
}

/// One step's run of a method.
pub trait MethodRun {
    /// A sentence for the user about what the method does in this step (`None`: nothing to
    /// say), shown before training.
    fn summary(&self) -> Option<String> {
        None
    }

    /// The objective's extra term while training (`None`: cross-entropy only).
    fn regularizer(&self) -> Option<&dyn Regularizer> {
        None
    }

    /// After training, before the checkpoint is written: put the method's files into `out`
    /// (the folder that becomes the checkpoint) and return what the train record keeps under
    /// `method` (`Value::Null`: nothing). `note` takes sentences about long work (progress).
    fn finish(
        &mut self,
        _ctx: &MethodContext<'_>,
        _out: &Path,
        _note: &mut dyn FnMut(&str),
    ) -> Result<Value, WorkflowError> {
        Ok(Value::Null)
    }
}

/// The run of a method that adds nothing to the objective (`sequential`, `replay`).
struct Plain;
impl MethodRun for Plain {}

/// The method run of `ctx.cfg.train.strategy` for this step; `note` gets a sentence about
/// each long part of the preparation (start, progress, end).
pub fn prepare(
    ctx: &MethodContext<'_>,
    note: &mut dyn FnMut(&str),
) -> Result<Box<dyn MethodRun>, WorkflowError> {
    match ctx.cfg.train.strategy {
        Strategy::Sequential | Strategy::Replay => Ok(Box::new(Plain)),
        Strategy::Ewc => Ok(Box::new(Ewc::prepare(ctx)?)),
        // A first step has no teacher: it trains as sequential (and has its key).
        Strategy::Lwf if ctx.parent_dir.is_none() => Ok(Box::new(Plain)),
        Strategy::Lwf => Ok(Box::new(LwfRun::prepare(ctx, note)?)),
        Strategy::Olora => {
            let stack = ctx.olora.ok_or_else(|| {
                WorkflowError::Input(
                    "train.strategy = olora: the step's adapters were not attached as O-LoRA"
                        .into(),
                )
            })?;
            let t = &ctx.cfg.train;
            let penalty = OloraPenalty::new(t.olora_lambda1, t.olora_lambda2, ctx.params, stack);
            let start = scalar(penalty.orthogonality(ctx.params)?)?;
            Ok(Box::new(OloraRun { penalty, start }))
        }
    }
}

/// Whether `name` is a var that this step starts afresh (the projector under
/// `train.projector_init = "as-coin"`), so the parent's Fisher says nothing about it.
fn started_afresh(cfg: &RunConfig, has_parent: bool, name: &str) -> bool {
    has_parent
        && cfg.train.projector_init == ProjectorInit::AsCoin
        && name.starts_with("multi_modal_projector.")
}

/// `train.strategy = ewc` (docs/methods.md): the penalty from the parent's stored Fisher while
/// training, this task's Fisher consolidated into the checkpoint's `ewc.safetensors` after.
struct Ewc {
    /// The parent's Fisher, when it stored one (vars started afresh left out).
    parent: Option<BTreeMap<String, Tensor>>,
    /// Why there is no penalty this step.
    why_not: Option<String>,
    penalty: Option<EwcPenalty>,
    /// Fisher tensors of the parent whose var this step does not train.
    unmatched: usize,
}

impl Ewc {
    fn prepare(ctx: &MethodContext<'_>) -> Result<Self, WorkflowError> {
        let t = &ctx.cfg.train;
        let Some(dir) = ctx.parent_dir else {
            return Ok(Ewc {
                parent: None,
                why_not: Some("the first step of the branch has no parent adapter".into()),
                penalty: None,
                unmatched: 0,
            });
        };
        let file = dir.join(FISHER_FILE);
        if !file.is_file() {
            return Ok(Ewc {
                parent: None,
                why_not: Some(format!(
                    "the parent checkpoint has no {FISHER_FILE} (it was not trained with \
                     train.strategy = ewc)"
                )),
                penalty: None,
                unmatched: 0,
            });
        }
        let shown = format!("the parent's {FISHER_FILE}");
        let bad = |e: crate::ml::MlError| {
            WorkflowError::Input(format!(
                "{shown}: {e} (retrain the parent with train.strategy = ewc, or train this \
                 step with another strategy)"
            ))
        };
        let mut parent = BTreeMap::new();
        let mut unmatched = 0;
        for (name, f) in read_tensor_file(&file).map_err(bad)? {
            if ctx.params.get(&name).is_none() {
                unmatched += 1;
                continue;
            }
            if started_afresh(ctx.cfg, true, &name) {
                continue;
            }
            let bad_values = f
                .to_dtype(DType::F64)
                .and_then(|v| v.flatten_all()?.to_vec1::<f64>())
                .map_err(|e| bad(e.into()))?
                .iter()
                .any(|v| !v.is_finite() || *v < 0.0);
            if bad_values {
                return Err(WorkflowError::Input(format!(
                    "{shown}: the Fisher of '{name}' has a negative or non-finite entry (the \
                     file is damaged; retrain the parent)"
                )));
            }
            parent.insert(name, f);
        }
        let penalty = EwcPenalty::new(t.ewc_lambda, ctx.params, &parent, &shown).map_err(bad)?;
        let why_not = if penalty.vars() == 0 {
            Some(format!(
                "the parent's {FISHER_FILE} has no tensor of a trained var"
            ))
        } else if t.ewc_lambda == 0.0 {
            Some("train.ewc_lambda is 0".into())
        } else {
            None
        };
        Ok(Ewc {
            parent: Some(parent),
            why_not,
            penalty: Some(penalty),
            unmatched,
        })
    }
}

impl MethodRun for Ewc {
    fn summary(&self) -> Option<String> {
        Some(match (&self.why_not, &self.penalty) {
            (None, Some(p)) => format!(
                "EWC: holding {} var(s) near the parent's adapter, weighted by its Fisher \
                 (train.strategy = ewc).",
                p.vars()
            ),
            (why, _) => format!(
                "EWC: no penalty this step: {} (train.strategy = ewc).",
                why.as_deref().unwrap_or("nothing to hold")
            ),
        })
    }

    fn regularizer(&self) -> Option<&dyn Regularizer> {
        match (&self.why_not, &self.penalty) {
            (None, Some(p)) => Some(p as &dyn Regularizer),
            _ => None,
        }
    }

    fn finish(
        &mut self,
        ctx: &MethodContext<'_>,
        out: &Path,
        note: &mut dyn FnMut(&str),
    ) -> Result<Value, WorkflowError> {
        let t = &ctx.cfg.train;
        let which = fisher_sample_indices(ctx.samples, t.ewc_samples, t.seed);
        note(&format!(
            "Computing the diagonal Fisher of {} on {} of its {} samples (train.strategy = ewc).",
            ctx.task,
            which.len(),
            ctx.samples.len()
        ));
        let t0 = Instant::now();
        let mut last = Instant::now();
        let mut on_sample = |done: usize, total: usize| {
            if done < total && last.elapsed().as_secs_f64() >= 30.0 {
                last = Instant::now();
                note(&format!("Fisher: {done} of {total} samples."));
            }
        };
        let task = diagonal_fisher(
            &ctx.loaded.model,
            ctx.params,
            ctx.samples,
            &ctx.loaded.image,
            ctx.cfg.train.image_aspect_ratio,
            &which,
            &mut on_sample,
        )?;
        let seconds = t0.elapsed().as_secs_f64();
        let has_parent = ctx.parent_dir.is_some();
        let merged = consolidate(self.parent.as_ref(), &task, t.ewc_gamma, |n| {
            started_afresh(ctx.cfg, has_parent, n)
        })?;
        let stored: Vec<(String, Tensor)> = merged
            .iter()
            .map(|(n, f)| Ok((n.clone(), f.to_dtype(DType::F32)?)))
            .collect::<Result<_, crate::ml::MlError>>()?;
        write_safetensors(&out.join(FISHER_FILE), &stored)?;
        let (task_sum, task_max) = fisher_sum_max(&task)?;
        let (sum, max) = fisher_sum_max(&merged)?;
        let mut record = json!({
            "name": "ewc",
            "lambda": t.ewc_lambda,
            "gamma": t.ewc_gamma,
            "fisher_samples": which.len(),
            "of_samples": ctx.samples.len(),
            "fisher_seconds": seconds,
            "penalty": self.why_not.is_none(),
            "fisher": {
                "file": FISHER_FILE, "tensors": merged.len(),
                "task_sum": task_sum, "task_max": task_max, "sum": sum, "max": max,
            },
        });
        if let Some(o) = record.as_object_mut() {
            if let Some(why) = &self.why_not {
                o.insert("why".into(), json!(why));
            }
            if let (Some(p), Some(pen)) = (&self.parent, &self.penalty) {
                let (psum, pmax) = fisher_sum_max(p)?;
                o.insert(
                    "parent_fisher".into(),
                    json!({
                        "tensors": p.len(), "penalised_vars": pen.vars(),
                        "sum": psum, "max": pmax, "unmatched": self.unmatched,
                    }),
                );
            }
        }
        Ok(record)
    }
}

/// Seconds between two progress notes of a long preparation.
const NOTE_EVERY_S: f64 = 30.0;

/// `lwf`: the parent's outputs on the step's samples, and the distillation toward them.
struct LwfRun {
    term: Lwf,
}

impl LwfRun {
    fn prepare(ctx: &MethodContext<'_>, note: &mut dyn FnMut(&str)) -> Result<Self, WorkflowError> {
        let t = &ctx.cfg.train;
        let settings = LwfSettings {
            lambda: t.lwf_lambda,
            temperature: t.lwf_temperature,
            top_k: t.lwf_top_k,
        };
        settings
            .check()
            .map_err(|e| WorkflowError::Config(format!("train.lwf_*: {e}")))?;
        let n = ctx.samples.len();
        note(&format!(
            "Computing the teacher's outputs (the parent's model) on {n} samples of {} \
             (train.strategy = lwf, T = {}, {}).",
            ctx.task,
            settings.temperature,
            if settings.top_k == 0 {
                "the whole vocabulary".to_string()
            } else {
                format!("top {} tokens", settings.top_k)
            }
        ));
        let rt = ctx.cfg.resolved_runtime()?;
        let t0 = Instant::now();
        let mut last = 0.0;
        let teacher = teacher_outputs(
            &ctx.loaded.model,
            ctx.params,
            ctx.samples,
            &ctx.loaded.image,
            &settings,
            TeacherPass {
                aspect: t.image_aspect_ratio,
                batch_size: ctx.cfg.train_batch_size(ctx.task),
                kernels: Some(rt.kernels),
                progress: &mut |done, all| {
                    let s = t0.elapsed().as_secs_f64();
                    if s - last >= NOTE_EVERY_S && done < all {
                        last = s;
                        let eta = s / done.max(1) as f64 * (all - done) as f64;
                        note(&format!(
                            "Teacher outputs: {done} of {all} samples ({:.0} s, about {eta:.0} s \
                             left).",
                            s
                        ));
                    }
                },
            },
        )?;
        note(&format!(
            "Teacher outputs kept for {} supervised positions ({:.1} MiB) in {:.1} s.",
            teacher.positions(),
            teacher.bytes() as f64 / (1u64 << 20) as f64,
            teacher.seconds
        ));
        Ok(LwfRun {
            term: Lwf::new(settings, teacher)?,
        })
    }
}

impl MethodRun for LwfRun {
    fn regularizer(&self) -> Option<&dyn Regularizer> {
        Some(&self.term)
    }

    fn finish(
        &mut self,
        ctx: &MethodContext<'_>,
        _out: &Path,
        _note: &mut dyn FnMut(&str),
    ) -> Result<Value, WorkflowError> {
        let s = self.term.settings();
        let teacher = self.term.teacher();
        let (first, last) = self
            .term
            .kl_first_last(ctx.samples.len())
            .map_or((Value::Null, Value::Null), |(a, b)| (json!(a), json!(b)));
        Ok(json!({
            "name": "lwf",
            "lambda": s.lambda,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "teacher": {
                "samples": teacher.len(),
                "positions": teacher.positions(),
                "bytes": teacher.bytes(),
                "seconds": teacher.seconds,
            },
            "kl_first_epoch": first,
            "kl_last_epoch": last,
        }))
    }
}

fn scalar(t: Option<candle_core::Tensor>) -> Result<Option<f64>, WorkflowError> {
    Ok(match t {
        Some(t) => Some(
            t.to_dtype(candle_core::DType::F64)
                .and_then(|t| t.to_scalar::<f64>())
                .map_err(crate::ml::MlError::from)?,
        ),
        None => None,
    })
}

/// `olora` (docs/methods.md): the orthogonality penalty while training, the concatenated
/// adapter and each task's own factors in the checkpoint.
struct OloraRun {
    penalty: OloraPenalty,
    /// The orthogonality sum before training (`None` at a first step).
    start: Option<f64>,
}

impl MethodRun for OloraRun {
    fn regularizer(&self) -> Option<&dyn Regularizer> {
        Some(&self.penalty)
    }

    fn finish(
        &mut self,
        ctx: &MethodContext<'_>,
        out: &Path,
        _note: &mut dyn FnMut(&str),
    ) -> Result<Value, WorkflowError> {
        let stack = ctx.olora.ok_or_else(|| {
            WorkflowError::Input("train.strategy = olora: no O-LoRA stack to save".into())
        })?;
        let end = scalar(self.penalty.orthogonality(ctx.params)?)?;
        let saved = write_olora(ctx.params, stack, ctx.task, out, &ctx.cfg.model.name)?;
        let tasks: Vec<Value> = saved
            .tasks
            .iter()
            .map(|t| json!({"task": t.task, "key": t.key, "rank": t.rank, "alpha": t.alpha}))
            .collect();
        Ok(json!({
            "name": "olora",
            "lambda1": self.penalty.lambda1,
            "lambda2": self.penalty.lambda2,
            "tasks": tasks,
            "total_rank": saved.total_rank,
            "frozen_rank": stack.frozen_rank(),
            "orthogonality_start": self.start,
            "orthogonality_end": end,
        }))
    }
}
