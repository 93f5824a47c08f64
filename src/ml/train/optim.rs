//! The optimiser side of training: AdamW with inspectable, saveable state (candle_nn's keeps
//! its moments private, so a run could not be resumed), the learning-rate schedules of HF's
//! `Trainer` (linear warmup, then cosine / linear decay / constant) and DeepSpeed's `WarmupLR`
//! (what CoIN's runs really applied, [`Schedule::DeepspeedWarmup`]), global-norm gradient
//! clipping (`torch.nn.utils.clip_grad_norm_`), and gradient accumulation over micro-batches.
//!
//! AdamW is torch's (decoupled weight decay): `p ← p·(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`,
//! `v ← β₂v + (1−β₂)g²`, `p ← p − lr·(m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)`. Moments live in the
//! var's dtype (f32 adapters), on the var's device.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::ml::{MlError, Result};

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine from the peak to 0 (CoIN: `--lr_scheduler_type cosine`).
    Cosine,
    /// Straight line from the peak to 0.
    Linear,
    /// The peak throughout.
    Constant,
    /// DeepSpeed 0.9.5's `WarmupLR` as its engine steps it, which is what CoIN's runs applied
    /// (the `scheduler` section of `scripts/zero3_offload.json` replaces HF's schedule): a
    /// logarithmic warmup over `W = max(2, warmup)` steps, then the peak to the end (no decay).
    /// The engine steps the scheduler after each optimiser step and `WarmupLR` does not set
    /// the rate when it is built, so step 0 runs at the optimiser's configured rate (the peak)
    /// and step `i ≥ 1` at `peak · ln(i) / ln(W)` while `i − 1 < W` (so step 1 runs at 0).
    #[serde(rename = "deepspeed-warmup")]
    DeepspeedWarmup,
}

/// HF `get_*_schedule_with_warmup`: the multiplier of the peak learning rate at optimiser step
/// `step` (0-based) of `total`, with `warmup` warmup steps.
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if schedule == Schedule::DeepspeedWarmup {
        return deepspeed_warmup_factor(step, warmup);
    }
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match schedule {
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Constant => 1.0,
        Schedule::DeepspeedWarmup => deepspeed_warmup_factor(step, warmup),
    }
}

/// [`Schedule::DeepspeedWarmup`] at optimiser step `step` (0-based): DeepSpeed's
/// `WarmupLR._get_gamma` (`warmup_type` "log", the default) of the scheduler's
/// `last_batch_iteration`, which is `step − 1` when step `step` runs; before the first
/// `scheduler.step()` the optimiser keeps its configured rate (the peak).
fn deepspeed_warmup_factor(step: usize, warmup: usize) -> f64 {
    let Some(iteration) = step.checked_sub(1) else {
        return 1.0;
    };
    let w = warmup.max(2);
    if iteration < w {
        ((iteration + 1) as f64).ln() / (w as f64).ln()
    } else {
        1.0
    }
}

/// Warmup steps for a ratio, as HF: `ceil(total · ratio)`.
pub fn warmup_steps(total: usize, ratio: f64) -> usize {
    (total as f64 * ratio).ceil() as usize
}

/// AdamW hyper-parameters (torch defaults β 0.9 / 0.999, ε 1e-8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (CoIN: 0).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter under AdamW.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named vars, with per-var learning-rate multipliers (param groups).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    /// Completed optimiser steps (the `t` of the bias corrections).
    pub t: u64,
}

impl AdamW {
    /// Fresh moments (zeros) for every var.
    pub fn new(vars: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            slots,
            t: 0,
        })
    }

    /// One update with learning rate `lr(name)` for each var; every var must have a gradient.
    pub fn step(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: impl Fn(&str) -> f64,
    ) -> Result<()> {
        let c = self.config;
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for s in &mut self.slots {
            let g = grads.get(&s.name).ok_or_else(|| {
                MlError::Input(format!("no gradient for the trainable tensor '{}'", s.name))
            })?;
            let g = g.to_dtype(s.var.dtype())?;
            let lr = lr(&s.name);
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&s.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&s.m / bc1)? / denom)?;
            let p = s.var.as_tensor();
            let decayed = if c.weight_decay != 0.0 {
                (p * (1.0 - lr * c.weight_decay))?
            } else {
                p.clone()
            };
            s.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<var>`, `v.<var>`), for saving.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("m.{}", s.name), s.m.clone()),
                    (format!("v.{}", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restore moments saved by [`AdamW::state_tensors`] and the step count; every var's
    /// moments must be present with the var's shape.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, t: u64) -> Result<()> {
        for s in &mut self.slots {
            for (kind, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{kind}.{}", s.name);
                let saved = tensors
                    .get(&key)
                    .ok_or_else(|| MlError::Input(format!("the optimizer state has no '{key}'")))?;
                if saved.dims() != s.var.dims() {
                    return Err(MlError::Input(format!(
                        "the optimizer state's '{key}' has shape {:?}, the parameter {:?}",
                        saved.dims(),
                        s.var.dims()
                    )));
                }
                *slot = saved.to_device(s.var.device())?.to_dtype(s.var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Gradients summed over the micro-batches of one optimiser step, by var name.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sums: BTreeMap<String, Tensor>,
}

impl GradAccumulator {
    /// Add one micro-batch's (or shard's) gradients. A var without a gradient is an error
    /// (candle's backward silently stops at ops without a backward: better to fail than to not
    /// train) unless `may_miss(name)` (the projector of a part without images).
    pub fn add(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        may_miss: impl Fn(&str) -> bool,
    ) -> Result<()> {
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                if may_miss(name) {
                    continue;
                }
                return Err(MlError::Input(format!(
                    "no gradient reached the trainable tensor '{name}' (is the part of the \
                     model it belongs to used by this batch?)"
                )));
            };
            let g = g.detach();
            let sum = match self.sums.remove(name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            self.sums.insert(name.clone(), sum);
        }
        Ok(())
    }

    /// Give every var that no part reached a zero gradient (AdamW then still decays its
    /// moments, as torch does for LLaVA's projector on a text-only batch).
    pub fn fill_missing(&mut self, vars: &[(String, Var)]) -> Result<()> {
        for (name, var) in vars {
            if !self.sums.contains_key(name) {
                self.sums
                    .insert(name.clone(), var.as_tensor().zeros_like()?);
            }
        }
        Ok(())
    }

    /// Clip to a global L2 norm of `max_norm` (torch: scale by `max_norm / (norm + 1e-6)` when
    /// that is below 1); returns the norm before clipping.
    pub fn clip(&mut self, max_norm: Option<f64>) -> Result<f64> {
        let mut sq = 0.0f64;
        for g in self.sums.values() {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        if let Some(max) = max_norm {
            let coef = max / (norm + 1e-6);
            if coef < 1.0 {
                for g in self.sums.values_mut() {
                    *g = (&*g * coef)?;
                }
            }
        }
        Ok(norm)
    }

    /// Take the sums (leaving the accumulator empty).
    pub fn take(&mut self) -> BTreeMap<String, Tensor> {
        std::mem::take(&mut self.sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_match_hf_shapes() {
        // warmup 3 of 13: 0, 1/3, 2/3, then 1 at the peak, cosine to 0 at the end.
        let f = |s| lr_factor(Schedule::Cosine, s, 3, 13);
        assert_eq!(f(0), 0.0);
        assert!((f(1) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(f(3), 1.0);
        assert!((f(8) - 0.5).abs() < 1e-12);
        assert!(f(13).abs() < 1e-12);
        assert!((lr_factor(Schedule::Linear, 8, 3, 13) - 0.5).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Constant, 12, 3, 13), 1.0);
        assert_eq!(warmup_steps(100, 0.03), 3);
        assert_eq!(warmup_steps(10, 0.03), 1);
        assert_eq!(warmup_steps(10, 0.0), 0);
    }

    #[test]
    fn deepspeed_warmup_is_log_then_constant_from_the_engines_first_step() {
        // W = ceil(0.03 · 100) = 3 warmup steps.
        let w = warmup_steps(100, 0.03);
        let f = |s| lr_factor(Schedule::DeepspeedWarmup, s, w, 100);
        // Step 0 runs before the first scheduler.step(): the optimiser's own (peak) rate.
        assert_eq!(f(0), 1.0);
        // Then last_batch_iteration = step − 1: gamma = ln(it + 1) / ln(W).
        assert_eq!(f(1), 0.0);
        assert!((f(2) - 2f64.ln() / 3f64.ln()).abs() < 1e-15);
        assert!((f(3) - 1.0).abs() < 1e-15);
        // From it = W on: the peak to the last step (no decay).
        assert_eq!(f(4), 1.0);
        assert_eq!(f(99), 1.0);
        // WarmupLR warms up over at least 2 steps, also with warmup 0 or 1.
        for warm in [0, 1] {
            let g = |s| lr_factor(Schedule::DeepspeedWarmup, s, warm, 10);
            assert_eq!((g(0), g(1)), (1.0, 0.0));
            assert!((g(2) - 1.0).abs() < 1e-15);
            assert_eq!(g(3), 1.0);
        }
        // Its name in a configuration.
        assert_eq!(
            serde_json::to_value(Schedule::DeepspeedWarmup).expect("json"),
            serde_json::json!("deepspeed-warmup")
        );
    }

    /// Reference AdamW in plain f64 (torch's formulas), two steps, with weight decay.
    #[test]
    fn adamw_matches_the_reference_formulas() {
        let dev = Device::Cpu;
        let p0 = [0.5f64, -1.0, 2.0];
        let var = Var::from_tensor(&Tensor::new(&p0, &dev).expect("t")).expect("var");
        let vars = vec![("w".to_string(), var.clone())];
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&vars, cfg).expect("adamw");
        let grads_seq = [[0.1f64, -0.2, 0.3], [0.05, 0.4, -0.1]];
        let lr = 0.01;
        let (mut p, mut m, mut v) = (p0.to_vec(), [0.0f64; 3], [0.0f64; 3]);
        for (k, g) in grads_seq.iter().enumerate() {
            let t = (k + 1) as i32;
            for i in 0..3 {
                p[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
            let mut grads = BTreeMap::new();
            grads.insert("w".to_string(), Tensor::new(g, &dev).expect("g"));
            opt.step(&grads, |_| lr).expect("step");
        }
        let got = var.as_tensor().to_vec1::<f64>().expect("vec");
        for (a, b) in got.iter().zip(&p) {
            assert!((a - b).abs() < 1e-14, "{got:?} vs {p:?}");
        }
        assert_eq!(opt.t, 2);
        // Saved state restores into a fresh optimiser.
        let saved: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut fresh = AdamW::new(&vars, cfg).expect("adamw");
        fresh.load_state(&saved, opt.t).expect("load");
        assert_eq!(fresh.t, 2);
        assert_eq!(
            fresh.slots[0].m.to_vec1::<f64>().expect("m"),
            opt.slots[0].m.to_vec1::<f64>().expect("m")
        );
        let mut missing = saved.clone();
        missing.remove("v.w");
        assert!(fresh.load_state(&missing, 2).is_err());
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let dev = Device::Cpu;
        let mut acc = GradAccumulator::default();
        acc.sums
            .insert("a".into(), Tensor::new(&[3.0f64, 0.0], &dev).expect("t"));
        acc.sums
            .insert("b".into(), Tensor::new(&[0.0f64, 4.0], &dev).expect("t"));
        let norm = acc.clip(Some(1.0)).expect("clip");
        assert!((norm - 5.0).abs() < 1e-12);
        let g = acc.take();
        let a = g["a"].to_vec1::<f64>().expect("a");
        let b = g["b"].to_vec1::<f64>().expect("b");
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[1] - 0.8).abs() < 1e-6);
        // Under the limit nothing changes.
        let mut acc = GradAccumulator::default();
        acc.sums
            .insert("a".into(), Tensor::new(&[0.3f64], &dev).expect("t"));
        assert!((acc.clip(Some(1.0)).expect("clip") - 0.3).abs() < 1e-12);
        assert_eq!(acc.take()["a"].to_vec1::<f64>().expect("a"), vec![0.3]);
    }
}
