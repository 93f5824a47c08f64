//! Continual-learning methods that change a step's objective or what its checkpoint holds
//! (`train.strategy`; docs/methods.md). `replay` changes only the data and lives in
//! [`super::train`]; the methods here plug into a step of coin's engine at two points:
//!
//! 1. before training, [`prepare`] builds the method's run from the parent checkpoint's files
//!    (e.g. the Fisher an `ewc` parent stored) and the step's model, adapter and samples; its
//!    [`MethodRun::regularizer`] is the objective's extra term;
//! 2. after training, [`MethodRun::finish`] writes the method's own files into the checkpoint
//!    folder (committed with the adapter, stored per tensor like any safetensors file) and
//!    returns what the train record keeps under `method`.

use std::path::Path;

use serde_json::{json, Value};

use super::config::{RunConfig, Strategy};
use super::WorkflowError;
use crate::ml::llava::LoadedModel;
use crate::ml::train::data::Sample;
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

/// The method run of `ctx.cfg.train.strategy` for this step.
pub fn prepare(ctx: &MethodContext<'_>) -> Result<Box<dyn MethodRun>, WorkflowError> {
    match ctx.cfg.train.strategy {
        Strategy::Sequential | Strategy::Replay => Ok(Box::new(Plain)),
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

    fn finish(&mut self, ctx: &MethodContext<'_>, out: &Path) -> Result<Value, WorkflowError> {
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
            "strategy": "olora",
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
