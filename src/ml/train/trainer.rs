//! The training loop: epochs of seeded shuffles, micro-batches with gradient accumulation,
//! the token-weighted masked loss, gradient clipping, AdamW with HF's warmup + cosine schedule,
//! progress callbacks, and resumable checkpoints of the adapter and optimizer state.
//!
//! Loss over an optimiser step: the mean over every supervised token of all its micro-batches
//! (each micro-batch's mean loss weighted by its share of the step's supervised tokens), so
//! `batch_size × accumulation` behaves exactly like one large batch (HF's `num_items_in_batch`
//! normalisation).
//!
//! Order: epoch `e` visits the samples in a Fisher–Yates permutation drawn from our seeded RNG;
//! the micro-batches of an epoch are grouped `grad_accum` at a time into optimiser steps (the
//! last step of an epoch may have fewer, as HF's Trainer). Everything random (order, dropout
//! masks) comes from the seed, so a run is reproducible and a resumed run continues exactly.
//!
//! Checkpoints (`checkpoint.dir`): `step-<N>/` holds `params.safetensors` (every trainable var
//! by name), `optimizer.safetensors` (AdamW moments) and `state.json` (step, AdamW t, dropout
//! RNG state, loss history, the run's fingerprint); `latest` names the newest. Each is written
//! to a temporary directory, fsynced and renamed, then `latest` is replaced atomically, then
//! older ones are removed: a crash at any point leaves the previous checkpoint usable. A run
//! started with the same checkpoint directory resumes from `latest` when the fingerprint
//! (configuration, data, parameter names and shapes) matches, and refuses when it does not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{batch_pixels, PixelCache, Sample};
use super::loss::masked_cross_entropy;
use super::optim::{lr_factor, warmup_steps, AdamW, AdamWConfig, GradAccumulator, Schedule};
use super::params::TrainableParams;
use crate::ml::image::{AspectMode, ImageProcessor};
use crate::ml::llava::Llava;
use crate::ml::load::{read_tensor_file, write_safetensors};
use crate::ml::rng::Rng;
use crate::ml::runtime::{Checkpointing, Kernels};
use crate::ml::{MlError, Result};
use crate::store::fsutil::write_atomic;

/// Hyper-parameters of a run (defaults: CoIN's, see coin-facts §1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// A separate peak learning rate for the projector (`None`: the same; CoIN's
    /// `--mm_projector_lr` is ignored by its optimizer, so `None` is the faithful default).
    pub projector_lr: Option<f64>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Warmup steps as a fraction of all optimiser steps (rounded up).
    pub warmup_ratio: f64,
    /// The schedule after warmup.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (HF default 1.0); `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Seed of the data order (adapter init and dropout have theirs in the adapter settings).
    pub seed: u64,
    /// Image preprocessing (LLaVA-1.5 training: pad).
    #[serde(with = "aspect_serde")]
    pub image_aspect: AspectMode,
    /// Stop after this many optimiser steps in all (for quick runs).
    pub max_steps: Option<usize>,
    /// Leave out an epoch's last step when it has fewer than `grad_accum` micro-batches (unless
    /// it is the epoch's only step), as DeepSpeed does: its engine steps the optimiser only at
    /// whole accumulation boundaries, so the left-over micro-batches are never applied (CoIN).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_partial_step: bool,
    /// Data-parallel shards per micro-batch on the CPU, at most ([`accumulate_step`]; a GPU
    /// runs one). Results depend on it by float rounding (the gradients' summation order).
    /// The run configuration's `runtime.shards` (`ml::runtime::auto_shards`).
    #[serde(default = "one")]
    pub shards: usize,
    /// The fused CPU kernels of the run (`runtime.kernels`); `None`: the calling thread's
    /// setting ([`crate::ml::fused::kernels`]). Results depend on it by float rounding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels: Option<Kernels>,
    /// Activation checkpointing (`runtime.checkpointing`, [`super::checkpoint`]). The
    /// gradients are the same either way, so it is not part of the run's fingerprint.
    #[serde(skip)]
    pub checkpointing: Checkpointing,
}

fn one() -> usize {
    1
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 16,
            grad_accum: 8,
            learning_rate: 2e-4,
            projector_lr: None,
            weight_decay: 0.0,
            warmup_ratio: 0.03,
            schedule: Schedule::Cosine,
            max_grad_norm: Some(1.0),
            seed: 42,
            image_aspect: AspectMode::Pad,
            max_steps: None,
            drop_partial_step: false,
            shards: 1,
            kernels: None,
            checkpointing: Checkpointing::Auto,
        }
    }
}

mod aspect_serde {
    use crate::ml::image::AspectMode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &AspectMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match m {
            AspectMode::Pad => "pad",
            AspectMode::Resize => "resize",
            AspectMode::Crop => "crop",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AspectMode, D::Error> {
        match String::deserialize(d)?.as_str() {
            "pad" => Ok(AspectMode::Pad),
            "resize" => Ok(AspectMode::Resize),
            "crop" => Ok(AspectMode::Crop),
            other => Err(serde::de::Error::custom(format!(
                "unknown image aspect '{other}' (pad, resize or crop)"
            ))),
        }
    }
}

/// Where and how often to write resumable checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointPolicy {
    /// The directory (created when missing).
    pub dir: PathBuf,
    /// Write one every this many optimiser steps (and always after the last step).
    pub every: usize,
}

/// What one optimiser step did (passed to [`TrainProgress::step`]).
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in the run.
    pub total: usize,
    /// Epoch of this step (0-based).
    pub epoch: usize,
    /// Mean masked loss of the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Sequence positions processed in this step (padding excluded).
    pub positions: usize,
    /// Positions per second over the steps run in this process.
    pub tokens_per_s: f64,
    /// Estimated seconds left.
    pub eta_s: f64,
}

/// Progress callbacks (the CLI draws a bar; library code never prints).
pub trait TrainProgress {
    /// The run starts (or resumes at `start_step`).
    fn begin(&mut self, _total_steps: usize, _start_step: usize) {}
    /// An optimiser step finished.
    fn step(&mut self, _info: &StepInfo) {}
    /// A checkpoint was written.
    fn checkpoint(&mut self, _step: usize, _dir: &Path) {}
    /// Asked after every step (after its checkpoint, if any): `true` ends the run there
    /// (Ctrl-C, a time budget); the report then says `stopped_early`.
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl TrainProgress for NoProgress {}

/// The outcome of [`train`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainReport {
    /// Optimiser steps done (all, including those done before a resume).
    pub steps: usize,
    /// Optimiser steps the run plans in all.
    pub planned_steps: usize,
    /// The step this process started at (0 unless resumed).
    pub resumed_from: usize,
    /// Epochs (possibly partial with `max_steps`).
    pub epochs: usize,
    /// Samples in the dataset.
    pub samples: usize,
    /// Mean loss of every step, in order.
    pub losses: Vec<f64>,
    /// Sequence positions processed by this process.
    pub positions: u64,
    /// Supervised tokens processed by this process.
    pub supervised_tokens: u64,
    /// Wall seconds of this process's steps.
    pub seconds: f64,
    /// Positions per second (this process).
    pub tokens_per_s: f64,
    /// Trainable scalars.
    pub trainable_parameters: usize,
    /// Whether [`TrainProgress::should_stop`] ended the run before its last step.
    pub stopped_early: bool,
    /// The method's extra objective term of each step this process ran ([`train_with`];
    /// empty without one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub penalties: Vec<f64>,
    /// The most decoder layers a micro-batch of this process checkpointed
    /// (`runtime.checkpointing`; 0: none).
    #[serde(default)]
    pub checkpointed_layers: usize,
}

impl TrainReport {
    /// Mean loss of the first `k` and the last `k` steps.
    pub fn loss_drop(&self, k: usize) -> Option<(f64, f64)> {
        let n = self.losses.len();
        if n == 0 {
            return None;
        }
        let k = k.clamp(1, n);
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
        Some((mean(&self.losses[..k]), mean(&self.losses[n - k..])))
    }
}

/// The optimiser steps of a run: each step is a list of micro-batches of sample indices.
pub fn plan_steps(n_samples: usize, cfg: &TrainConfig) -> Vec<(usize, Vec<Vec<usize>>)> {
    let mut steps = Vec::new();
    if n_samples == 0 || cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return steps;
    }
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..n_samples).collect();
        let mut rng = Rng::new(cfg.seed ^ (epoch as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
        for i in (1..n_samples).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let micro: Vec<Vec<usize>> = order
            .chunks(cfg.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        let whole = micro.len() / cfg.grad_accum;
        for group in micro.chunks(cfg.grad_accum) {
            if cfg.drop_partial_step && group.len() < cfg.grad_accum && whole > 0 {
                continue;
            }
            steps.push((epoch, group.to_vec()));
        }
    }
    if let Some(max) = cfg.max_steps {
        steps.truncate(max);
    }
    steps
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    format: String,
    fingerprint: String,
    step: usize,
    adam_t: u64,
    dropout_rng: u64,
    losses: Vec<f64>,
}

const STATE_FORMAT: &str = "coin.train-state.v1";

/// Preprocessed images kept in memory during a run (CoIN-mini's 400 32-px images: 5 MB; a
/// 336-px image is 1.3 MB, so real data mostly streams).
const PIXEL_CACHE_BYTES: usize = 512 << 20;

/// A run's identity for resuming: configuration, adapter settings, parameter names and
/// shapes, and the samples (ids and lengths).
fn fingerprint(cfg: &TrainConfig, params: &TrainableParams, samples: &[Sample]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(serde_json::to_string(cfg).unwrap_or_default().as_bytes());
    h.update(format!("{:?}", params.settings).as_bytes());
    for (name, var) in &params.vars {
        h.update(format!("{name}{:?};", var.dims()).as_bytes());
    }
    for s in samples {
        h.update(format!("{}:{}:{};", s.id, s.positions, s.supervised).as_bytes());
    }
    h.finalize().to_hex().to_string()
}

fn io_err(path: &Path, source: std::io::Error) -> MlError {
    MlError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Write checkpoint `step` into `policy.dir` (see the module docs for the protocol).
fn write_checkpoint(
    dir: &Path,
    step: usize,
    params: &TrainableParams,
    opt: &AdamW,
    state: &SavedState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = format!("step-{step}");
    let tmp = dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let vars: Vec<(String, Tensor)> = params
        .vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    write_safetensors(&tmp.join("params.safetensors"), &vars)?;
    write_safetensors(&tmp.join("optimizer.safetensors"), &opt.state_tensors())?;
    let mut text = serde_json::to_string_pretty(state).map_err(|source| MlError::Encode {
        what: "the training state",
        source,
    })?;
    text.push('\n');
    let sp = tmp.join("state.json");
    write_atomic(&sp, text).map_err(|e| io_err(&sp, e))?;
    fsync_dir(&tmp)?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io_err(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io_err(&final_dir, e))?;
    fsync_dir(dir)?;
    let latest = dir.join("latest");
    write_atomic(&latest, format!("{name}\n")).map_err(|e| io_err(&latest, e))?;
    // Older checkpoints are no longer needed.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("step-") && n != name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(final_dir)
}

/// The newest checkpoint of `dir`, if any.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let latest = dir.join("latest");
    match std::fs::read_to_string(&latest) {
        Ok(name) => {
            let p = dir.join(name.trim());
            if !p.join("state.json").is_file() {
                return Err(MlError::Input(format!(
                    "'{}' names '{}', which is not a training checkpoint (delete '{}' to start \
                     over)",
                    latest.display(),
                    p.display(),
                    dir.display()
                )));
            }
            Ok(Some(p))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(MlError::Read {
            path: latest,
            source,
        }),
    }
}

fn load_checkpoint(
    ckpt: &Path,
    fingerprint: &str,
    params: &TrainableParams,
    opt: &mut AdamW,
) -> Result<SavedState> {
    let sp = ckpt.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|source| MlError::Read {
        path: sp.clone(),
        source,
    })?;
    let state: SavedState = serde_json::from_str(&text).map_err(|e| MlError::Parse {
        path: sp.clone(),
        message: e.to_string(),
    })?;
    if state.format != STATE_FORMAT {
        return Err(MlError::Parse {
            path: sp,
            message: format!("unknown format '{}'", state.format),
        });
    }
    if state.fingerprint != fingerprint {
        return Err(MlError::Input(format!(
            "the checkpoint '{}' belongs to a different run (other configuration, data or \
             adapter); delete it or use another checkpoint directory",
            ckpt.display()
        )));
    }
    let saved: BTreeMap<String, Tensor> = read_tensor_file(&ckpt.join("params.safetensors"))?
        .into_iter()
        .collect();
    for (name, var) in &params.vars {
        let t = saved.get(name).ok_or_else(|| {
            MlError::Input(format!(
                "the checkpoint '{}' has no tensor '{name}'",
                ckpt.display()
            ))
        })?;
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    let moments: BTreeMap<String, Tensor> = read_tensor_file(&ckpt.join("optimizer.safetensors"))?
        .into_iter()
        .collect();
    opt.load_state(&moments, state.adam_t)?;
    params.dropout.set_rng_state(state.dropout_rng);
    Ok(state)
}

/// A term of the training objective beyond the task's cross-entropy: a continual-learning
/// method's penalty or distillation (docs/methods.md). Both hooks build their term from
/// differentiable ops, so its gradient reaches the vars through candle's backward.
pub trait Regularizer: Sync + std::fmt::Debug {
    /// What makes this term what it is (its method and hyper-parameters, a hash of any data it
    /// holds): part of the run's fingerprint, so a resume with another term is refused.
    fn fingerprint(&self) -> String;

    /// A term on one shard's outputs, as a mean per supervised token of the shard (it is then
    /// weighted like the shard's cross-entropy). `ids` are the shard's sample indices into the
    /// run's samples, in batch order; `logits` (b, t, vocab) and `labels` (b rows of t) are
    /// [`super::batch::forward_batch`]'s. `None`: no term.
    fn logits_term(
        &self,
        _ids: &[usize],
        _logits: &Tensor,
        _labels: &[Vec<i64>],
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// A term on the parameters, added once per optimiser step (a scalar built from
    /// `params.vars`); vars it does not reach get no gradient from it. `None`: no term.
    fn params_term(&self, _params: &TrainableParams) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// How [`accumulate_step`] batches: the images' aspect mode and the most shards per
/// micro-batch ([`TrainConfig::shards`]), and the objective's extra term, if any.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions<'a> {
    /// How images are fitted to the tower's square input.
    pub aspect: AspectMode,
    /// Concurrent shards per micro-batch, at most.
    pub max_shards: usize,
    /// A method's extra term on each shard's outputs ([`Regularizer::logits_term`]).
    pub regularizer: Option<&'a dyn Regularizer>,
    /// Activation checkpointing ([`super::checkpoint`]; `auto` decides per micro-batch).
    pub checkpointing: Checkpointing,
}

/// What one [`accumulate_step`] did.
#[derive(Debug)]
pub struct StepSums {
    /// The mean cross-entropy over the step's supervised tokens.
    pub loss: f64,
    /// The mean of the outputs' extra term over the same tokens (0 without one).
    pub extra: f64,
    /// The summed (token-weighted) gradients of both.
    pub grads: GradAccumulator,
    /// Sequence positions covered.
    pub positions: usize,
    /// Supervised tokens covered.
    pub tokens: usize,
    /// The most decoder layers a micro-batch of the step checkpointed
    /// ([`super::checkpoint::resolve`]).
    pub checkpointed_layers: usize,
}

/// Vars that only images reach (the projector; the vision tower in full training): a part
/// without images gives them no gradient (LLaVA gives them a zero gradient then, through an
/// empty slice of image features).
fn image_only(name: &str) -> bool {
    name.starts_with("multi_modal_projector.") || name.starts_with("vision_tower.")
}

/// Forward and backward every micro-batch of one optimiser step; returns the step's mean loss
/// over its supervised tokens (and the mean of the regularizer's outputs term), the summed
/// (token-weighted) gradients, and the positions and supervised tokens it covered. Each micro-batch runs as up to `max_shards` concurrent
/// shards of consecutive samples on rayon's pool, each with the calling thread's kernels
/// setting. Splitting the same samples into more
/// micro-batches or shards gives the same loss and gradients up to rounding: dropout masks are
/// keyed by each sample's place in the step, and each part's loss is weighted by its share of
/// the step's supervised tokens. A part without supervised tokens adds nothing and is skipped;
/// the projector (and a trained vision tower) gets a zero gradient from a step without images.
pub fn accumulate_step(
    model: &Llava,
    params: &TrainableParams,
    samples: &[Sample],
    images: &ImageProcessor,
    micro: &[Vec<usize>],
    opts: StepOptions<'_>,
    cache: &mut PixelCache,
) -> Result<StepSums> {
    use rayon::prelude::*;
    let StepOptions {
        aspect,
        max_shards,
        regularizer,
        checkpointing,
    } = opts;
    let step_tokens: usize = micro.iter().flatten().map(|&k| samples[k].supervised).sum();
    let step_positions: usize = micro.iter().flatten().map(|&k| samples[k].positions).sum();
    if step_tokens == 0 {
        return Err(MlError::Input(
            "an optimiser step's samples have no supervised (assistant) token".into(),
        ));
    }
    let key = params.dropout.next_key();
    let mut acc = GradAccumulator::default();
    let mut loss_sum = 0.0;
    let mut extra_sum = 0.0;
    let mut first_row = 0;
    let mut most_checkpointed = 0;
    for mb in micro {
        let batch: Vec<&Sample> = mb.iter().map(|&k| &samples[k]).collect();
        let pixels = batch_pixels(&batch, images, aspect, &model.device, cache)?;
        // Sample i's images are pixels[img_at[i]..img_at[i + 1]].
        let mut img_at = vec![0];
        for s in &batch {
            img_at.push(img_at[img_at.len() - 1] + usize::from(s.image.is_some()));
        }
        let per = batch
            .len()
            .div_ceil(max_shards.clamp(1, batch.len().max(1)));
        let shards: Vec<(usize, usize)> = (0..batch.len())
            .step_by(per.max(1))
            .map(|a| (a, (a + per).min(batch.len())))
            .filter(|&(a, b)| batch[a..b].iter().any(|s| s.supervised > 0))
            .collect();
        let kernels = crate::ml::fused::kernels_override();
        // One decision per micro-batch, for its largest shard, all shards in flight at once
        // (the gradients are the same either way: only memory and time differ).
        let widest = shards.iter().map(|&(a, b)| b - a).max().unwrap_or(0);
        let longest = batch.iter().map(|s| s.positions).max().unwrap_or(0);
        let checkpointed =
            super::checkpoint::resolve(checkpointing, model, shards.len(), widest, longest);
        most_checkpointed = most_checkpointed.max(checkpointed);
        let run = |&(a, b): &(usize, usize)| -> Result<(f64, f64, GradStore, bool)> {
            let part = &batch[a..b];
            let px = &pixels[img_at[a]..img_at[b]];
            crate::ml::fused::with_kernels(kernels, || {
                super::dropout::with_rows(key, first_row + a, b - a, || {
                    let examples: Vec<_> = part.iter().map(|s| s.example.clone()).collect();
                    let tokens: usize = part.iter().map(|s| s.supervised).sum();
                    let weight = tokens as f64 / step_tokens as f64;
                    let (grads, (loss, extra)) = super::checkpoint::batch_gradients(
                        model,
                        &params.vars,
                        &examples,
                        px,
                        checkpointed,
                        |logits, labels| {
                            let loss = masked_cross_entropy(logits, labels)?;
                            let extra = match regularizer {
                                Some(r) => r.logits_term(&mb[a..b], logits, labels)?,
                                None => None,
                            };
                            let (objective, extra) = match extra {
                                Some(t) => {
                                    let v = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                                    ((&loss + t)?, v)
                                }
                                None => (loss.clone(), 0.0),
                            };
                            let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                            Ok(((&objective * weight)?, (loss, extra)))
                        },
                    )?;
                    Ok((
                        loss * tokens as f64,
                        extra * tokens as f64,
                        grads,
                        !px.is_empty(),
                    ))
                })
            })
        };
        let done: Vec<Result<(f64, f64, GradStore, bool)>> = if shards.len() > 1 {
            shards.par_iter().map(run).collect()
        } else {
            shards.iter().map(run).collect()
        };
        for r in done {
            let (loss, extra, grads, has_images) = r?;
            acc.add(&params.vars, &grads, |name| !has_images && image_only(name))?;
            loss_sum += loss;
            extra_sum += extra;
        }
        first_row += batch.len();
    }
    acc.fill_missing(&params.vars)?;
    Ok(StepSums {
        loss: loss_sum / step_tokens as f64,
        extra: extra_sum / step_tokens as f64,
        grads: acc,
        positions: step_positions,
        tokens: step_tokens,
        checkpointed_layers: most_checkpointed,
    })
}

/// Train `params` (already attached to `model`) on `samples`.
///
/// With a checkpoint policy the run writes resumable checkpoints and, when the directory
/// already holds one of the same run, continues from it. The trained values stay in the vars
/// (and so in the model); save them with [`super::save`]. Dropout is left off (eval mode).
pub fn train(
    model: &Llava,
    params: &TrainableParams,
    samples: &[Sample],
    images: &ImageProcessor,
    cfg: &TrainConfig,
    checkpoint: Option<&CheckpointPolicy>,
    progress: &mut dyn TrainProgress,
) -> Result<TrainReport> {
    train_with(
        model, params, samples, images, cfg, checkpoint, progress, None,
    )
}

/// [`train`] with a method's extra objective term ([`Regularizer`]): its outputs term joins
/// each shard's loss, its parameters term each optimiser step's gradient (before clipping).
/// The report's `losses` stay the task's cross-entropy; `penalties` hold the extra terms.
#[allow(clippy::too_many_arguments)]
pub fn train_with(
    model: &Llava,
    params: &TrainableParams,
    samples: &[Sample],
    images: &ImageProcessor,
    cfg: &TrainConfig,
    checkpoint: Option<&CheckpointPolicy>,
    progress: &mut dyn TrainProgress,
    regularizer: Option<&dyn Regularizer>,
) -> Result<TrainReport> {
    if samples.is_empty() {
        return Err(MlError::Input("no training samples".into()));
    }
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.epochs == 0 {
        return Err(MlError::Input(
            "batch size, gradient accumulation and epochs must be at least 1".into(),
        ));
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate >= 0.0) {
        return Err(MlError::Input(format!(
            "learning rate {} is not a non-negative number",
            cfg.learning_rate
        )));
    }
    let plan = plan_steps(samples.len(), cfg);
    let total = plan.len();
    let warmup = warmup_steps(total, cfg.warmup_ratio);
    let mut opt = AdamW::new(
        &params.vars,
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let mut fp = fingerprint(cfg, params, samples);
    if let Some(r) = regularizer {
        fp = blake3::hash(format!("{fp}\n{}", r.fingerprint()).as_bytes())
            .to_hex()
            .to_string();
    }
    let mut losses = Vec::new();
    let mut penalties = Vec::new();
    let mut checkpointed_layers = 0;
    let mut start = 0;
    if let Some(policy) = checkpoint {
        if let Some(ckpt) = latest_checkpoint(&policy.dir)? {
            let st = load_checkpoint(&ckpt, &fp, params, &mut opt)?;
            start = st.step;
            losses = st.losses;
        }
    }
    params.set_training(true);
    progress.begin(total, start);
    let mut cache = PixelCache::new(PIXEL_CACHE_BYTES);
    // Why shards: a training step is GEMMs (parallel) between many small element-wise ops and
    // graph bookkeeping (serial on the calling thread); with one shard the other cores idle
    // through the serial part. On a GPU the device is parallel already.
    let shards = if model.device.is_cpu() {
        cfg.shards.max(1)
    } else {
        1
    };
    let t0 = Instant::now();
    let (mut positions, mut supervised) = (0u64, 0u64);
    let mut stopped = false;
    let kernels = cfg.kernels.or_else(crate::ml::fused::kernels_override);
    let result = crate::ml::fused::with_kernels(kernels, || -> Result<()> {
        for (i, (epoch, micro)) in plan.iter().enumerate().skip(start) {
            if !model.device.is_cpu() {
                // Device-side dropout masks: a function of the seed and the step (resumable).
                model
                    .device
                    .set_seed(cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))?;
            }
            let StepSums {
                loss,
                extra,
                grads: mut acc,
                positions: step_positions,
                tokens: step_tokens,
                checkpointed_layers: step_checkpointed,
            } = accumulate_step(
                model,
                params,
                samples,
                images,
                micro,
                StepOptions {
                    aspect: cfg.image_aspect,
                    max_shards: shards,
                    regularizer,
                    checkpointing: cfg.checkpointing,
                },
                &mut cache,
            )?;
            let mut penalty = extra;
            if let Some(term) = regularizer
                .map(|r| r.params_term(params))
                .transpose()?
                .flatten()
            {
                let g = term.backward()?;
                acc.add(&params.vars, &g, |_| true)?;
                penalty += term.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            if !penalty.is_finite() {
                return Err(MlError::Input(format!(
                    "the method's extra term became {penalty} at step {} (lower its weight?)",
                    i + 1
                )));
            }
            if !loss.is_finite() {
                return Err(MlError::Input(format!(
                    "the loss became {loss} at step {} (lower the learning rate?)",
                    i + 1
                )));
            }
            let grad_norm = acc.clip(cfg.max_grad_norm)?;
            let factor = lr_factor(cfg.schedule, i, warmup, total);
            let lr = cfg.learning_rate * factor;
            let plr = cfg.projector_lr.map(|p| p * factor);
            opt.step(&acc.take(), |name| match plr {
                Some(p) if name.starts_with("multi_modal_projector.") => p,
                _ => lr,
            })?;
            losses.push(loss);
            if regularizer.is_some() {
                penalties.push(penalty);
            }
            positions += step_positions as u64;
            supervised += step_tokens as u64;
            checkpointed_layers = checkpointed_layers.max(step_checkpointed);
            let done = i + 1;
            let elapsed = t0.elapsed().as_secs_f64();
            let per_step = elapsed / (done - start) as f64;
            progress.step(&StepInfo {
                step: done,
                total,
                epoch: *epoch,
                loss,
                lr,
                grad_norm,
                positions: step_positions,
                tokens_per_s: positions as f64 / elapsed.max(1e-9),
                eta_s: per_step * (total - done) as f64,
            });
            if let Some(policy) = checkpoint {
                if done % policy.every.max(1) == 0 || done == total {
                    let state = SavedState {
                        format: STATE_FORMAT.into(),
                        fingerprint: fp.clone(),
                        step: done,
                        adam_t: opt.t,
                        dropout_rng: params.dropout.rng_state(),
                        losses: losses.clone(),
                    };
                    let d = write_checkpoint(&policy.dir, done, params, &opt, &state)?;
                    crate::store::fault::point("train.after_checkpoint");
                    progress.checkpoint(done, &d);
                }
            }
            if done < total && progress.should_stop() {
                stopped = true;
                break;
            }
        }
        Ok(())
    });
    params.set_training(false);
    result?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(TrainReport {
        steps: losses.len(),
        planned_steps: total,
        resumed_from: start,
        epochs: plan.last().map(|(e, _)| e + 1).unwrap_or(0),
        samples: samples.len(),
        losses,
        positions,
        supervised_tokens: supervised,
        seconds,
        tokens_per_s: positions as f64 / seconds.max(1e-9),
        trainable_parameters: params.num_elements(),
        stopped_early: stopped,
        penalties,
        checkpointed_layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_partial_step_leaves_out_an_epochs_short_last_step() {
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 3,
            grad_accum: 3,
            drop_partial_step: true,
            ..TrainConfig::default()
        };
        // 10 samples: micro-batches (3,3,3,1) → one whole step of 3 per epoch, the fourth
        // micro-batch left out; 11: (3,3,3,2) → the same; 18: six → two whole steps.
        for (n, steps) in [(10, 2), (11, 2), (18, 4)] {
            let plan = plan_steps(n, &cfg);
            assert_eq!(plan.len(), steps, "{n} samples");
            assert!(plan.iter().all(|(_, m)| m.len() == 3));
        }
        // An epoch shorter than one step keeps its only (partial) step.
        assert_eq!(plan_steps(4, &cfg).len(), 2);
        // Off (the default): the short step is kept, and the setting is not in the
        // fingerprint's text.
        let keep = TrainConfig {
            drop_partial_step: false,
            ..cfg.clone()
        };
        assert_eq!(plan_steps(10, &keep).len(), 4);
        let text = serde_json::to_string(&keep).expect("json");
        assert!(!text.contains("drop_partial_step"), "{text}");
    }

    #[test]
    fn plan_covers_each_epoch_once_in_seeded_order() {
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 3,
            grad_accum: 2,
            seed: 9,
            ..TrainConfig::default()
        };
        let plan = plan_steps(10, &cfg);
        // 4 micro-batches per epoch (3,3,3,1) → 2 steps per epoch.
        assert_eq!(plan.len(), 4);
        for epoch in 0..2 {
            let mut seen: Vec<usize> = plan
                .iter()
                .filter(|(e, _)| *e == epoch)
                .flat_map(|(_, m)| m.iter().flatten().copied())
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        assert_eq!(plan, plan_steps(10, &cfg), "same seed, same plan");
        let other = plan_steps(
            10,
            &TrainConfig {
                seed: 10,
                ..cfg.clone()
            },
        );
        assert_ne!(plan, other);
        assert_ne!(plan[0].1, plan[2].1, "epochs are shuffled differently");
        let capped = plan_steps(
            10,
            &TrainConfig {
                max_steps: Some(3),
                ..cfg
            },
        );
        assert_eq!(capped.len(), 3);
    }

    #[test]
    fn only_projector_and_tower_vars_may_miss_a_gradient_without_images() {
        assert!(image_only("multi_modal_projector.linear_1.weight"));
        assert!(image_only("vision_tower.encoder.layers.0.mlp.fc1.weight"));
        assert!(!image_only(
            "language_model.layers.0.self_attn.q_proj.lora_A.weight"
        ));
        assert!(!image_only("language_model.embed_tokens.weight"));
    }

    #[test]
    fn train_config_round_trips_through_json() {
        let cfg = TrainConfig::default();
        let text = serde_json::to_string(&cfg).expect("serialize");
        assert!(text.contains("\"image_aspect\":\"pad\""), "{text}");
        assert!(
            !text.contains("kernels"),
            "no kernels: the caller's: {text}"
        );
        let back: TrainConfig = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, cfg);
        let set = TrainConfig {
            shards: 3,
            kernels: Some(Kernels::Off),
            ..cfg.clone()
        };
        let text = serde_json::to_string(&set).expect("serialize");
        assert!(text.contains("\"kernels\":\"off\""), "{text}");
        assert_eq!(
            serde_json::from_str::<TrainConfig>(&text).expect("parse"),
            set
        );
        // A record written before shards and kernels were settings reads as one shard.
        let mut old: serde_json::Value = serde_json::from_str(&text).expect("json");
        let o = old.as_object_mut().expect("object");
        o.remove("shards");
        o.remove("kernels");
        assert_eq!(
            serde_json::from_value::<TrainConfig>(old).expect("old"),
            cfg
        );
    }
}
