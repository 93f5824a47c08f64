//! Continual-learning methods that change a step's objective or what its checkpoint holds
//! (`train.strategy`; docs/methods.md). `replay` changes only the data and lives in
//! [`super::train`]; `lwf` distils toward the parent's outputs ([`crate::ml::train::lwf`]).
//! The methods here plug into a step of coin's engine at two points:
//!
//! 1. before training, [`prepare`] builds the method's run from the parent checkpoint's files
//!    (e.g. the Fisher an `ewc` parent stored) and the step's model, adapter and samples; its
//!    [`MethodRun::regularizer`] is the objective's extra term;
//! 2. after training, [`MethodRun::finish`] writes the method's own files into the checkpoint
//!    folder (committed with the adapter, stored per tensor like any safetensors file) and
//!    returns what the train record keeps under `method`.

use std::path::Path;

use std::time::Instant;

use serde_json::{json, Value};

use super::config::{RunConfig, Strategy};
use super::WorkflowError;
use crate::ml::llava::LoadedModel;
use crate::ml::train::data::Sample;
use crate::ml::train::lwf::{teacher_outputs, Lwf, LwfSettings, TeacherPass};
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
}

/// One step's run of a method.
pub trait MethodRun {
    /// The objective's extra term while training (`None`: cross-entropy only).
    fn regularizer(&self) -> Option<&dyn Regularizer> {
        None
    }

    /// After training, before the checkpoint is written: put the method's files into `out`
    /// (the folder that becomes the checkpoint) and return what the train record keeps under
    /// `method` (`Value::Null`: nothing).
    fn finish(&mut self, _ctx: &MethodContext<'_>, _out: &Path) -> Result<Value, WorkflowError> {
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
        // A first step has no teacher: it trains as sequential (and has its key).
        Strategy::Lwf if ctx.parent_dir.is_none() => Ok(Box::new(Plain)),
        Strategy::Lwf => Ok(Box::new(LwfRun::prepare(ctx, note)?)),
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

    fn finish(&mut self, ctx: &MethodContext<'_>, _out: &Path) -> Result<Value, WorkflowError> {
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
