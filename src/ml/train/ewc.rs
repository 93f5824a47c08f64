//! Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in
//! neural networks", PNAS 2017; online form: Schwarz et al., "Progress & Compress", ICML 2018):
//! the diagonal Fisher of the trainable vars after a task ([`diagonal_fisher`]) and the
//! quadratic penalty that holds them near their values at the start of the next task,
//! weighted by that Fisher ([`EwcPenalty`]).
//!
//! Normalisation: each sample's log-likelihood is the *mean* log-probability of its supervised
//! tokens (the training loss's unit, nats per token), so the Fisher — the mean over samples of
//! the squared gradient of that log-likelihood — does not grow with answer length or with the
//! number of samples it is computed on, and one λ works across tasks of different lengths.
//! It is the empirical Fisher (the samples' own answers, not answers drawn from the model), as
//! is usual for language models. Only device-agnostic candle ops are used (CPU and CUDA alike).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::batch::forward_batch;
use super::data::{batch_pixels, PixelCache, Sample};
use super::loss::masked_cross_entropy;
use super::params::TrainableParams;
use super::trainer::Regularizer;
use crate::ml::image::{AspectMode, ImageProcessor};
use crate::ml::llava::Llava;
use crate::ml::rng::Rng;
use crate::ml::{MlError, Result};

/// The checkpoint file holding the consolidated diagonal Fisher (one f32 tensor per var, named
/// like the var).
pub const FISHER_FILE: &str = "ewc.safetensors";

/// Images kept in memory while the Fisher is computed.
const FISHER_PIXEL_CACHE_BYTES: usize = 64 << 20;

/// The samples the Fisher is computed on: those with a supervised token, all of them when
/// `limit` is 0 or at least their number, else `limit` of them drawn by `seed` (a partial
/// Fisher–Yates shuffle), in sample order.
pub fn fisher_sample_indices(samples: &[Sample], limit: usize, seed: u64) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..samples.len())
        .filter(|&i| samples[i].supervised > 0)
        .collect();
    if limit == 0 || limit >= pool.len() {
        return pool;
    }
    let mut rng = Rng::new(seed ^ 0xE3C0_F15E_u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for i in 0..limit {
        let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(limit);
    pool.sort_unstable();
    pool
}

/// The dtype the Fisher is accumulated in for a var of `dtype` (f64 stays f64, else f32).
fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The diagonal empirical Fisher of every var of `params` on the samples `which`: the mean over
/// those samples of the squared gradient of each sample's mean supervised-token log-likelihood
/// (one forward and backward per sample, dropout off). A var a sample does not reach (the
/// projector, for a sample without image) gets 0 from it. `on_sample(done, total)` is called
/// after each sample. Returns one tensor per var, by name, on the vars' device, in f32 (f64
/// for f64 vars).
pub fn diagonal_fisher(
    model: &Llava,
    params: &TrainableParams,
    samples: &[Sample],
    images: &ImageProcessor,
    aspect: AspectMode,
    which: &[usize],
    on_sample: &mut dyn FnMut(usize, usize),
) -> Result<BTreeMap<String, Tensor>> {
    if which.is_empty() {
        return Err(MlError::Input(
            "the Fisher needs at least one sample with a supervised (assistant) token".into(),
        ));
    }
    params.set_training(false);
    let mut cache = PixelCache::new(FISHER_PIXEL_CACHE_BYTES);
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    for (done, &k) in which.iter().enumerate() {
        let s = samples.get(k).ok_or_else(|| {
            MlError::Input(format!(
                "Fisher sample {k} is outside the {} samples",
                samples.len()
            ))
        })?;
        let pixels = batch_pixels(&[s], images, aspect, &model.device, &mut cache)?;
        let (logits, labels) = forward_batch(model, std::slice::from_ref(&s.example), &pixels)?;
        // −(mean log-likelihood): its gradient squared is the log-likelihood's.
        let nll = masked_cross_entropy(&logits, &labels)?;
        let grads = nll.backward()?;
        for (name, var) in &params.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let sq = g.to_dtype(acc_dtype(var.dtype()))?.sqr()?;
                let next = match sums.remove(name) {
                    Some(acc) => (acc + sq)?,
                    None => sq,
                };
                sums.insert(name.clone(), next);
            }
        }
        on_sample(done + 1, which.len());
    }
    let n = which.len() as f64;
    let mut out = BTreeMap::new();
    for (name, var) in &params.vars {
        let f = match sums.remove(name) {
            Some(t) => (t / n)?,
            None => Tensor::zeros(var.shape(), acc_dtype(var.dtype()), var.device())?,
        };
        out.insert(name.clone(), f);
    }
    Ok(out)
}

/// The sum and the largest entry of a set of Fisher tensors.
pub fn fisher_sum_max(fisher: &BTreeMap<String, Tensor>) -> Result<(f64, f64)> {
    let (mut sum, mut max) = (0.0f64, 0.0f64);
    for t in fisher.values() {
        let t = t.to_dtype(DType::F64)?;
        sum += t.sum_all()?.to_scalar::<f64>()?;
        if t.elem_count() > 0 {
            max = max.max(t.max_all()?.to_scalar::<f64>()?);
        }
    }
    Ok((sum, max))
}

/// EWC's penalty (λ/2)·Σ_vars Σ F ⊙ (θ − θ*)² as a [`Regularizer`] parameters term: θ* are
/// the vars' values when the penalty is made (the parent's adapter, before training), F the
/// parent's Fisher. Its gradient is λ·F ⊙ (θ − θ*).
#[derive(Debug)]
pub struct EwcPenalty {
    lambda: f64,
    /// (var name, F, θ*), each on the var's device in its dtype.
    terms: Vec<(String, Tensor, Tensor)>,
    digest: String,
}

impl EwcPenalty {
    /// A penalty of weight `lambda` on the vars of `params` that `fisher` has a tensor for
    /// (others get none), anchored at their current values. A Fisher tensor whose shape is not
    /// its var's is an error naming `source`.
    pub fn new(
        lambda: f64,
        params: &TrainableParams,
        fisher: &BTreeMap<String, Tensor>,
        source: &str,
    ) -> Result<Self> {
        if !(lambda.is_finite() && lambda >= 0.0) {
            return Err(MlError::Input(format!(
                "the EWC weight λ must be a finite number ≥ 0, got {lambda}"
            )));
        }
        let mut terms = Vec::new();
        let mut h = blake3::Hasher::new();
        h.update(format!("ewc lambda={lambda:e};").as_bytes());
        for (name, var) in &params.vars {
            let Some(f) = fisher.get(name) else { continue };
            if f.dims() != var.dims() {
                return Err(MlError::Input(format!(
                    "{source}: the Fisher of '{name}' has shape {:?}, its var {:?} (was the \
                     parent trained with other adapter settings?)",
                    f.dims(),
                    var.dims()
                )));
            }
            let f = f.to_device(var.device())?.to_dtype(var.dtype())?;
            let anchor = var.as_tensor().detach().copy()?;
            let (fs, fq) = moments(&f)?;
            let (ts, tq) = moments(&anchor)?;
            h.update(format!("{name}:{fs:e},{fq:e},{ts:e},{tq:e};").as_bytes());
            terms.push((name.clone(), f, anchor));
        }
        Ok(EwcPenalty {
            lambda,
            terms,
            digest: h.finalize().to_hex().to_string(),
        })
    }

    /// Vars the penalty reaches.
    pub fn vars(&self) -> usize {
        self.terms.len()
    }
}

/// Sum and sum of squares of a tensor (what the fingerprint hashes of F and θ*).
fn moments(t: &Tensor) -> Result<(f64, f64)> {
    let t = t.to_dtype(DType::F64)?;
    Ok((
        t.sum_all()?.to_scalar::<f64>()?,
        t.sqr()?.sum_all()?.to_scalar::<f64>()?,
    ))
}

impl Regularizer for EwcPenalty {
    fn fingerprint(&self) -> String {
        format!("ewc {}", self.digest)
    }

    fn params_term(&self, params: &TrainableParams) -> Result<Option<Tensor>> {
        if self.terms.is_empty() {
            return Ok(None);
        }
        let mut total: Option<Tensor> = None;
        for (name, f, anchor) in &self.terms {
            let var = params.get(name).ok_or_else(|| {
                MlError::Input(format!("the EWC penalty's var '{name}' is not trainable"))
            })?;
            let term = (var.as_tensor() - anchor)?
                .sqr()?
                .mul(f)?
                .sum_all()?
                .to_dtype(acc_dtype(var.dtype()))?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        match total {
            Some(t) => Ok(Some((t * (self.lambda / 2.0))?)),
            None => Ok(None),
        }
    }
}

/// The consolidated Fisher after a task: γ·F_parent + F_task for every var of `task` (a var
/// the parent has no Fisher for, or one `fresh` names, keeps F_task).
pub fn consolidate(
    parent: Option<&BTreeMap<String, Tensor>>,
    task: &BTreeMap<String, Tensor>,
    gamma: f64,
    fresh: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, f) in task {
        let merged = match parent.and_then(|p| p.get(name)) {
            Some(old) if !fresh(name) && old.dims() == f.dims() => {
                let old = old.to_device(f.device())?.to_dtype(f.dtype())?;
                ((old * gamma)? + f)?
            }
            _ => f.clone(),
        };
        out.insert(name.clone(), merged);
    }
    Ok(out)
}
