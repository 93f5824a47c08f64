//! Inverted dropout driven by our seeded RNG on the CPU (candle's CPU RNG cannot be seeded) and
//! by candle's seeded device generator on a GPU.
//!
//! One [`Dropout`] is shared (cloned) by every adapter of a model, so a single
//! [`Dropout::set_training`] switches them all between training (masking) and eval (identity).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};

use crate::ml::rng::Rng;

#[derive(Debug)]
struct State {
    rng: Mutex<Rng>,
    training: AtomicBool,
}

/// Dropout with probability `p`: in training each element is zeroed with probability `p` and the
/// rest scaled by `1 / (1 − p)`; in eval it is the identity.
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f64,
    state: Arc<State>,
}

impl Dropout {
    /// A dropout in training mode, drawing masks from `Rng::new(seed)`.
    pub fn new(p: f64, seed: u64) -> Self {
        Dropout {
            p,
            state: Arc::new(State {
                rng: Mutex::new(Rng::new(seed)),
                training: AtomicBool::new(true),
            }),
        }
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// Switch every clone between training (`true`) and eval (`false`).
    pub fn set_training(&self, training: bool) {
        self.state.training.store(training, Ordering::Relaxed);
    }

    /// Whether masks are applied.
    pub fn is_training(&self) -> bool {
        self.state.training.load(Ordering::Relaxed)
    }

    /// The mask generator's state (saved with a training checkpoint).
    pub fn rng_state(&self) -> u64 {
        self.lock_rng().state()
    }

    /// Continue the mask stream from a saved [`Dropout::rng_state`].
    pub fn set_rng_state(&self, state: u64) {
        *self.lock_rng() = Rng::from_state(state);
    }

    fn lock_rng(&self) -> std::sync::MutexGuard<'_, Rng> {
        self.state
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next mask for a CPU tensor like `x` (0 or `1/(1−p)` per element, `x`'s dtype), drawn
    /// from the seeded stream as [`Dropout::forward`] would; `None` in eval mode or for p = 0.
    pub fn next_cpu_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.is_training() || self.p <= 0.0 {
            return Ok(None);
        }
        Ok(Some(self.cpu_mask(x)?))
    }

    fn cpu_mask(&self, x: &Tensor) -> Result<Tensor> {
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let mut mask = vec![0f32; x.elem_count()];
        let p = self.p;
        self.lock_rng()
            .fill_uniform(&mut mask, |u| if u < p { 0.0 } else { keep });
        Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
    }

    /// Apply to `x` (a fresh mask per call in training).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_training() || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        if !x.device().is_cpu() {
            // On a GPU the mask is drawn there (candle's seeded device generator; the trainer
            // re-seeds it from the run's seed and the step number before every step, so runs
            // and resumed runs are reproducible). Drawing hundreds of millions of uniforms on
            // the CPU and copying them over made a 1B model's step CPU-bound.
            let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
            let mask = (u.ge(self.p)?.to_dtype(x.dtype())? * keep)?;
            return x * mask;
        }
        let mask = self.cpu_mask(x)?;
        if crate::ml::fused::loop_kernels(x) {
            // No gradient computed or kept for the constant mask.
            return crate::ml::fused::mul_const(x, &mask);
        }
        x * mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn drops_about_p_scales_the_rest_and_is_identity_in_eval() -> Result<()> {
        let x = Tensor::ones((100, 100), candle_core::DType::F32, &Device::Cpu)?;
        let d = Dropout::new(0.25, 1);
        let y: Vec<f32> = d.forward(&x)?.flatten_all()?.to_vec1()?;
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!((2300..2700).contains(&zeros), "{zeros} of 10000 dropped");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        // Same seed, same masks; clones share the state and the mode.
        let y2: Vec<f32> = Dropout::new(0.25, 1)
            .forward(&x)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(y, y2);
        let clone = d.clone();
        d.set_training(false);
        assert!(!clone.is_training());
        let e: Vec<f32> = clone.forward(&x)?.flatten_all()?.to_vec1()?;
        assert!(e.iter().all(|&v| v == 1.0));
        Ok(())
    }
}
