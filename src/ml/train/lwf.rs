//! Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017): while a new task trains,
//! the model's outputs on the new task's own inputs are pulled toward those the previous model
//! gave (knowledge distillation, Hinton et al. 2015).
//!
//! [`teacher_outputs`] runs the model as it stands before training (the parent's adapter,
//! dropout off, no gradient) over every training sample and keeps, for each position whose
//! logits predict a supervised label (position t for label t+1, as [`masked_cross_entropy`]),
//! the teacher's distribution softened with temperature T: `p = softmax(z / T)` over the whole
//! vocabulary, or only its `top_k` largest probabilities renormalised to sum to 1.
//!
//! [`Lwf`] is the [`Regularizer`]: on each shard it adds
//! `λ · T² · mean over the shard's supervised positions of KL(p ‖ q)`, `q = softmax(z_s / T)`
//! of the student's logits `z_s` (the T² keeps the gradient's scale independent of T, Hinton et
//! al.). With `top_k` the sum runs over the teacher's kept tokens and `q` is the student's full
//! softmax at them, which is still ≥ 0 (Gibbs' inequality) and 0 only when the student puts all
//! its mass on them in the teacher's proportions. Built from differentiable ops only
//! (`index_select`, composed `log_softmax`, `gather`, products and sums), the same on any
//! device.
//!
//! [`masked_cross_entropy`]: super::loss::masked_cross_entropy

use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};

use super::batch::forward_batch;
use super::data::{batch_pixels, PixelCache, Sample};
use super::loss::IGNORE_INDEX;
use super::params::TrainableParams;
use super::trainer::Regularizer;
use crate::ml::image::{AspectMode, ImageProcessor};
use crate::ml::llama::compute_dtype;
use crate::ml::llava::Llava;
use crate::ml::runtime::Kernels;
use crate::ml::{MlError, Result};

/// The settings of the distillation (`train.lwf_*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LwfSettings {
    /// λ, the weight of the distillation term (the paper's λ_o = 1).
    pub lambda: f64,
    /// T, the softening temperature (the paper's 2).
    pub temperature: f64,
    /// Keep only the teacher's `top_k` largest probabilities per position (0: all).
    pub top_k: usize,
}

impl LwfSettings {
    /// Check the values (λ > 0 and T > 0, both finite).
    pub fn check(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda > 0.0) {
            return Err(MlError::Input(format!(
                "the distillation weight λ must be a finite number > 0, got {}",
                self.lambda
            )));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(MlError::Input(format!(
                "the distillation temperature must be a finite number > 0, got {}",
                self.temperature
            )));
        }
        Ok(())
    }
}

/// The teacher's softened distributions of one sample, on the CPU.
#[derive(Debug)]
struct SampleTeacher {
    /// (positions, k) probabilities (k = vocabulary without `top_k`), in the compute dtype.
    probs: Tensor,
    /// (positions, k) token ids of the kept probabilities (`top_k` only).
    ids: Option<Tensor>,
    /// Σ over the positions of Σ p log p (the teacher's negative entropy).
    neg_entropy: f64,
}

impl SampleTeacher {
    fn positions(&self) -> usize {
        self.probs.dims().first().copied().unwrap_or(0)
    }
}

/// The teacher's outputs on every training sample ([`teacher_outputs`]).
#[derive(Debug)]
pub struct Teacher {
    samples: Vec<SampleTeacher>,
    vocab: usize,
    /// Seconds the pass took.
    pub seconds: f64,
}

impl Teacher {
    /// Supervised positions held over all samples.
    pub fn positions(&self) -> usize {
        self.samples.iter().map(SampleTeacher::positions).sum()
    }

    /// Bytes the kept distributions take (probabilities and token ids).
    pub fn bytes(&self) -> usize {
        self.samples
            .iter()
            .map(|s| {
                s.probs.elem_count() * s.probs.dtype().size_in_bytes()
                    + s.ids.as_ref().map_or(0, |i| i.elem_count() * 4)
            })
            .sum()
    }

    /// Samples covered.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is covered.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// A blake3 of every kept value (the run's fingerprint includes it).
    pub fn digest(&self) -> Result<String> {
        let mut h = blake3::Hasher::new();
        for s in &self.samples {
            let p = s
                .probs
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            h.update(&(p.len() as u64).to_le_bytes());
            for v in p {
                h.update(&v.to_le_bytes());
            }
            if let Some(ids) = &s.ids {
                for v in ids.flatten_all()?.to_vec1::<u32>()? {
                    h.update(&v.to_le_bytes());
                }
            }
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

/// Row `bi * s + t` of every position t of a (b × s) label grid whose logits predict a
/// supervised label (`labels[bi][t + 1]`), grouped by row; `counts[bi]` per row.
fn supervised_rows(labels: &[Vec<i64>], s: usize) -> (Vec<u32>, Vec<usize>) {
    let mut rows = Vec::new();
    let mut counts = Vec::with_capacity(labels.len());
    for (bi, row) in labels.iter().enumerate() {
        let before = rows.len();
        for t in 0..s.saturating_sub(1) {
            if row.get(t + 1).is_some_and(|&y| y != IGNORE_INDEX) {
                rows.push((bi * s + t) as u32);
            }
        }
        counts.push(rows.len() - before);
    }
    (rows, counts)
}

/// How the teacher pass runs.
pub struct TeacherPass<'a> {
    /// Images' preprocessing (the training's).
    pub aspect: AspectMode,
    /// Samples per forward pass.
    pub batch_size: usize,
    /// The fused CPU kernels (the training's, so teacher and student round alike).
    pub kernels: Option<Kernels>,
    /// Called with (samples done, samples in all) after each batch.
    pub progress: &'a mut dyn FnMut(usize, usize),
}

/// Run `model` as it stands (dropout off, no gradient kept) over `samples` and keep the
/// softened distributions at their supervised positions (see the module docs).
pub fn teacher_outputs(
    model: &Llava,
    params: &TrainableParams,
    samples: &[Sample],
    images: &ImageProcessor,
    settings: &LwfSettings,
    pass: TeacherPass<'_>,
) -> Result<Teacher> {
    settings.check()?;
    let t0 = Instant::now();
    params.set_training(false);
    let vocab = model.config.text.vocab_size;
    let mut cache = PixelCache::new(64 << 20);
    let mut out = Vec::with_capacity(samples.len());
    let bs = pass.batch_size.max(1);
    crate::ml::fused::with_kernels(pass.kernels, || -> Result<()> {
        for (done, chunk) in samples.chunks(bs).enumerate() {
            let batch: Vec<&Sample> = chunk.iter().collect();
            let pixels = batch_pixels(&batch, images, pass.aspect, &model.device, &mut cache)?;
            let examples: Vec<_> = chunk.iter().map(|s| s.example.clone()).collect();
            let (logits, labels) = forward_batch(model, &examples, &pixels)?;
            let logits = logits.detach();
            let (b, s, v) = logits.dims3()?;
            let (rows, counts) = supervised_rows(&labels, s);
            let dt = compute_dtype(logits.dtype());
            let logp = if rows.is_empty() {
                None
            } else {
                let n = rows.len();
                let rows = Tensor::from_vec(rows, n, &model.device)?;
                let z = logits
                    .reshape((b * s, v))?
                    .index_select(&rows, 0)?
                    .to_dtype(dt)?;
                Some(
                    candle_nn::ops::log_softmax(&(z / settings.temperature)?, D::Minus1)?
                        .to_device(&Device::Cpu)?,
                )
            };
            let mut at = 0;
            for &c in &counts {
                if c == 0 {
                    let k = if settings.top_k == 0 {
                        v
                    } else {
                        settings.top_k.min(v)
                    };
                    out.push(SampleTeacher {
                        probs: Tensor::zeros((0, k), dt, &Device::Cpu)?,
                        ids: None,
                        neg_entropy: 0.0,
                    });
                    continue;
                }
                let Some(logp) = &logp else { continue };
                let lp = logp.narrow(0, at, c)?;
                at += c;
                out.push(keep(&lp, settings.top_k, dt)?);
            }
            (pass.progress)((done * bs + chunk.len()).min(samples.len()), samples.len());
        }
        Ok(())
    })?;
    Ok(Teacher {
        samples: out,
        vocab,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One sample's kept distribution from its (positions, vocab) log-probabilities.
fn keep(logp: &Tensor, top_k: usize, dt: DType) -> Result<SampleTeacher> {
    let (n, v) = logp.dims2()?;
    if top_k == 0 || top_k >= v {
        let p = logp.exp()?;
        let neg_entropy = if n == 0 {
            0.0
        } else {
            (&p * logp)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        };
        return Ok(SampleTeacher {
            probs: p,
            ids: None,
            neg_entropy,
        });
    }
    let rows = logp.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut probs = Vec::with_capacity(n * top_k);
    let mut ids = Vec::with_capacity(n * top_k);
    let mut neg_entropy = 0.0;
    for row in rows {
        let mut order: Vec<u32> = (0..v as u32).collect();
        // Largest first; ties by token id, so the choice is deterministic.
        order.select_nth_unstable_by(top_k - 1, |&a, &b| {
            row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
        });
        order.truncate(top_k);
        order.sort_unstable();
        let mass: f64 = order.iter().map(|&i| row[i as usize].exp()).sum();
        for &i in &order {
            let p = row[i as usize].exp() / mass;
            if p > 0.0 {
                neg_entropy += p * p.ln();
            }
            probs.push(p);
            ids.push(i);
        }
    }
    Ok(SampleTeacher {
        probs: Tensor::from_vec(probs, (n, top_k), &Device::Cpu)?.to_dtype(dt)?,
        ids: Some(Tensor::from_vec(ids, (n, top_k), &Device::Cpu)?),
        neg_entropy,
    })
}

/// The distillation term ([`Regularizer`]) toward a [`Teacher`].
#[derive(Debug)]
pub struct Lwf {
    settings: LwfSettings,
    teacher: Teacher,
    digest: String,
    /// (Σ KL, positions, samples) of every shard the term ran on, in order.
    log: Mutex<Vec<(f64, usize, usize)>>,
}

impl Lwf {
    /// The term with `settings` toward `teacher`.
    pub fn new(settings: LwfSettings, teacher: Teacher) -> Result<Self> {
        settings.check()?;
        let digest = teacher.digest()?;
        Ok(Lwf {
            settings,
            teacher,
            digest,
            log: Mutex::new(Vec::new()),
        })
    }

    /// The teacher.
    pub fn teacher(&self) -> &Teacher {
        &self.teacher
    }

    /// The settings.
    pub fn settings(&self) -> LwfSettings {
        self.settings
    }

    /// The mean KL(p ‖ q) per supervised position over the first and over the last shards that
    /// together cover `samples` samples (the first and last epoch when `samples` is the number
    /// of training samples), as trained (dropout on). `None` before any shard ran.
    pub fn kl_first_last(&self, samples: usize) -> Option<(f64, f64)> {
        let log = self.log.lock().ok()?;
        if log.is_empty() {
            return None;
        }
        let mean = |it: &mut dyn Iterator<Item = &(f64, usize, usize)>| {
            let (mut kl, mut n, mut seen) = (0.0, 0usize, 0usize);
            for (k, p, s) in it {
                if seen >= samples.max(1) {
                    break;
                }
                kl += k;
                n += p;
                seen += s;
            }
            kl / n.max(1) as f64
        };
        Some((mean(&mut log.iter()), mean(&mut log.iter().rev())))
    }

    /// λ · T² · mean KL over the supervised positions of a shard, and Σ KL and the position
    /// count (the building block of [`Regularizer::logits_term`]).
    pub fn term(
        &self,
        ids: &[usize],
        logits: &Tensor,
        labels: &[Vec<i64>],
    ) -> Result<Option<(Tensor, f64, usize)>> {
        let (b, s, v) = logits.dims3()?;
        if ids.len() != b || labels.len() != b {
            return Err(MlError::Input(format!(
                "the distillation got {} sample ids and {} label rows for {b} rows of logits",
                ids.len(),
                labels.len()
            )));
        }
        if v != self.teacher.vocab {
            return Err(MlError::Input(format!(
                "the logits have {v} classes, the teacher's outputs {}",
                self.teacher.vocab
            )));
        }
        let (rows, counts) = supervised_rows(labels, s);
        let mut parts = Vec::with_capacity(b);
        let mut ids_parts = Vec::new();
        let mut neg_entropy = 0.0;
        for (bi, (&id, &c)) in ids.iter().zip(&counts).enumerate() {
            let t = self.teacher.samples.get(id).ok_or_else(|| {
                MlError::Input(format!(
                    "sample {id} has no teacher output ({} samples were run)",
                    self.teacher.samples.len()
                ))
            })?;
            if t.positions() != c {
                return Err(MlError::Input(format!(
                    "sample {id} (row {bi}) has {c} supervised positions, its teacher output \
                     {}: the samples changed after the teacher ran",
                    t.positions()
                )));
            }
            if c > 0 {
                parts.push(&t.probs);
                if let Some(i) = &t.ids {
                    ids_parts.push(i);
                }
                neg_entropy += t.neg_entropy;
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let n = rows.len();
        let dev = logits.device();
        let dt = compute_dtype(logits.dtype());
        let rows = Tensor::from_vec(rows, n, dev)?;
        let z = logits
            .reshape((b * s, v))?
            .index_select(&rows, 0)?
            .to_dtype(dt)?;
        let logq = candle_nn::ops::log_softmax(&(z / self.settings.temperature)?, D::Minus1)?;
        let p = Tensor::cat(&parts, 0)?.to_device(dev)?.to_dtype(dt)?;
        let logq = if ids_parts.is_empty() {
            logq
        } else {
            let idx = Tensor::cat(&ids_parts, 0)?.to_device(dev)?;
            logq.gather(&idx, 1)?
        };
        // Σ KL = Σ p log p − Σ p log q.
        let kl_sum = (&p * &logq)?.sum_all()?.neg()?.affine(1.0, neg_entropy)?;
        let t = self.settings.temperature;
        let term = kl_sum.affine(self.settings.lambda * t * t / n as f64, 0.0)?;
        let kl = kl_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(Some((term, kl, n)))
    }
}

impl Regularizer for Lwf {
    fn fingerprint(&self) -> String {
        format!(
            "lwf lambda={} temperature={} top_k={} teacher={}",
            self.settings.lambda, self.settings.temperature, self.settings.top_k, self.digest
        )
    }

    fn logits_term(
        &self,
        ids: &[usize],
        logits: &Tensor,
        labels: &[Vec<i64>],
    ) -> Result<Option<Tensor>> {
        Ok(match self.term(ids, logits, labels)? {
            Some((term, kl, n)) => {
                if let Ok(mut log) = self.log.lock() {
                    log.push((kl, n, ids.len()));
                }
                Some(term)
            }
            None => None,
        })
    }
}

#[cfg(test)]
#[path = "lwf_tests.rs"]
mod tests;
