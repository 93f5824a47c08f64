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

use serde_json::Value;

use super::config::{RunConfig, Strategy};
use super::WorkflowError;
use crate::ml::llava::LoadedModel;
use crate::ml::train::data::Sample;
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

/// The method run of `ctx.cfg.train.strategy` for this step.
pub fn prepare(ctx: &MethodContext<'_>) -> Result<Box<dyn MethodRun>, WorkflowError> {
    match ctx.cfg.train.strategy {
        Strategy::Sequential | Strategy::Replay => Ok(Box::new(Plain)),
    }
}
