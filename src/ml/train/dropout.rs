//! Inverted dropout driven by our seeded RNG on the CPU (candle's CPU RNG cannot be seeded) and
//! by candle's seeded device generator on a GPU.
//!
//! One [`Dropout`] is shared (cloned) by every adapter of a model, so a single
//! [`Dropout::set_training`] switches them all between training (masking) and eval (identity).
//!
//! Row-keyed masks (the trainer's data-parallel shards): inside [`with_rows`] a CPU mask is drawn
//! row by row, row `g` of the `k`-th dropout call from the stream [`sub_seed`]`(key, k, g)`, so
//! it depends on the step's key, the sample's place in the step and the layer, not on which
//! shard (or thread, or micro-batch) the row runs in, nor on the padding after it. Outside
//! [`with_rows`] masks continue the shared seeded stream.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};

use crate::ml::rng::{sub_seed, Rng};

/// The row-keyed mask context of the current thread.
#[derive(Clone, Copy, Debug)]
struct RowKeys {
    key: u64,
    first_row: u64,
    rows: usize,
    calls: u64,
}

thread_local! {
    static ROW_KEYS: RefCell<Option<RowKeys>> = const { RefCell::new(None) };
}

/// Run `f` (the forward of `rows` batch rows whose first is row `first_row` of the step) with
/// row-keyed CPU masks drawn from `key`. Nested calls on the same thread (a rayon worker that
/// runs another shard while it waits) restore the outer context when they return.
pub fn with_rows<R>(key: u64, first_row: usize, rows: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<RowKeys>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            ROW_KEYS.with(|k| *k.borrow_mut() = prev);
        }
    }
    let ctx = RowKeys {
        key,
        first_row: first_row as u64,
        rows,
        calls: 0,
    };
    let _restore = Restore(ROW_KEYS.with(|k| k.borrow_mut().replace(ctx)));
    f()
}

/// The current row context, counting this call.
fn next_row_call() -> Option<RowKeys> {
    ROW_KEYS.with(|k| {
        let mut k = k.borrow_mut();
        let ctx = k.as_mut()?;
        let now = *ctx;
        ctx.calls += 1;
        Some(now)
    })
}

/// The number of dropout calls made so far in the current [`with_rows`] context (`None`
/// outside one). Activation checkpointing ([`super::checkpoint`]) saves it before a layer's
/// forward and restores it with [`set_row_calls`] before the layer's recompute, so the
/// recompute draws exactly the forward's masks.
pub fn row_calls() -> Option<u64> {
    ROW_KEYS.with(|k| k.borrow().as_ref().map(|c| c.calls))
}

/// Set the call count of the current [`with_rows`] context (no effect outside one, or with
/// `None`).
pub fn set_row_calls(calls: Option<u64>) {
    if let Some(n) = calls {
        ROW_KEYS.with(|k| {
            if let Some(c) = k.borrow_mut().as_mut() {
                c.calls = n;
            }
        });
    }
}

/// A seed for the `salt`-th unit of work (a decoder layer) of the current [`with_rows`] context:
/// a function of the step's key, the salt and the context's first row (`None` outside one).
pub fn row_seed(salt: u64) -> Option<u64> {
    ROW_KEYS.with(|k| {
        k.borrow()
            .as_ref()
            .map(|c| sub_seed(c.key ^ 0x5EED_C4EC_4B01_7A7E, salt, c.first_row))
    })
}

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

    /// The next mask for `x` on any device (0 or `1/(1−p)` per element, `x`'s dtype): drawn as
    /// [`Dropout::forward`] would, on the CPU from the seeded stream ([`Dropout::next_cpu_mask`]),
    /// on a GPU by the device's generator; `None` in eval mode or for p = 0.
    pub fn next_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.is_training() || self.p <= 0.0 {
            return Ok(None);
        }
        if x.device().is_cpu() {
            return Ok(Some(self.cpu_mask(x)?));
        }
        Ok(Some(self.device_mask(x)?))
    }

    fn device_mask(&self, x: &Tensor) -> Result<Tensor> {
        let keep = 1.0 / (1.0 - self.p);
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        u.ge(self.p)?.to_dtype(x.dtype())? * keep
    }

    /// A key for one optimiser step's row-keyed masks ([`with_rows`]), advancing the shared
    /// stream by one draw (so a saved [`Dropout::rng_state`] resumes the same keys).
    pub fn next_key(&self) -> u64 {
        self.lock_rng().next_u64()
    }

    fn cpu_mask(&self, x: &Tensor) -> Result<Tensor> {
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let mut mask = vec![0f32; x.elem_count()];
        let p = self.p;
        let draw = |u: f64| if u < p { 0.0 } else { keep };
        match next_row_call() {
            Some(ctx) => {
                if ctx.rows == 0 || !mask.len().is_multiple_of(ctx.rows) {
                    candle_core::bail!(
                        "dropout on a tensor of shape {:?} that does not split into the \
                         shard's {} rows",
                        x.dims(),
                        ctx.rows
                    );
                }
                let per_row = mask.len() / ctx.rows;
                for (j, row) in mask.chunks_mut(per_row.max(1)).enumerate() {
                    let seed = sub_seed(ctx.key, ctx.calls, ctx.first_row + j as u64);
                    Rng::new(seed).fill_uniform(row, draw);
                }
            }
            None => self.lock_rng().fill_uniform(&mut mask, draw),
        }
        Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
    }

    /// Apply to `x` (a fresh mask per call in training).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_training() || self.p <= 0.0 {
            return Ok(x.clone());
        }
        if !x.device().is_cpu() {
            // On a GPU the mask is drawn there (candle's seeded device generator; the trainer
            // re-seeds it from the run's seed and the step number before every step, so runs
            // and resumed runs are reproducible). Drawing hundreds of millions of uniforms on
            // the CPU and copying them over made a 1B model's step CPU-bound.
            let mask = self.device_mask(x)?;
            if crate::ml::fused::loop_kernels(x) {
                // The GPU kernel; no gradient computed for the constant mask.
                return crate::ml::fused::mul_const(x, &mask);
            }
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

    /// On the CPU, `next_mask` (the fused LoRA linear's, any device) draws what `forward` and
    /// `next_cpu_mask` draw from the same seed; `None` in eval.
    #[test]
    fn next_mask_on_the_cpu_is_the_forward_mask() -> Result<()> {
        let x = Tensor::ones((30, 40), candle_core::DType::F32, &Device::Cpu)?;
        let values = |t: Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let via_forward = values(Dropout::new(0.3, 4).forward(&x)?)?;
        let d = Dropout::new(0.3, 4);
        let m = d.next_mask(&x)?.expect("a mask in training");
        assert_eq!(values(m)?, via_forward);
        let m2 = Dropout::new(0.3, 4).next_cpu_mask(&x)?.expect("mask");
        assert_eq!(values(m2)?, via_forward);
        assert!(via_forward.contains(&0.0) && via_forward.iter().any(|&v| v > 1.0));
        d.set_training(false);
        assert!(d.next_mask(&x)?.is_none());
        Ok(())
    }

    #[test]
    fn row_keyed_masks_depend_on_the_row_not_the_shard_or_padding() -> Result<()> {
        let d = Dropout::new(0.5, 9);
        let mask = |first: usize, rows: usize, seq: usize| -> Result<Vec<Vec<f32>>> {
            // Two dropout calls (two layers) of a (rows·seq, 3) activation; the second's.
            let x = Tensor::ones((rows * seq, 3), candle_core::DType::F32, &Device::Cpu)?;
            let m = with_rows(77, first, rows, || -> Result<Tensor> {
                d.forward(&x)?;
                d.forward(&x)
            })?;
            m.reshape((rows, seq * 3))?.to_vec2()
        };
        let whole = mask(0, 4, 5)?;
        // Rows 0–1 and 2–3 as two shards give the same rows.
        let mut halves = mask(0, 2, 5)?;
        halves.extend(mask(2, 2, 5)?);
        assert_eq!(whole, halves);
        // A shard padded to 7 positions: the first 5 of each row are unchanged.
        let padded = mask(2, 2, 7)?;
        for (j, row) in padded.iter().enumerate() {
            assert_eq!(&row[..15], &whole[2 + j][..]);
        }
        // Rows differ from each other, layers from each other, keys from each other.
        assert_ne!(whole[0], whole[1]);
        let x = Tensor::ones((4 * 5, 3), candle_core::DType::F32, &Device::Cpu)?;
        let first_call: Vec<Vec<f32>> = with_rows(77, 0, 4, || d.forward(&x))?
            .reshape((4, 15))?
            .to_vec2()?;
        assert_ne!(first_call, whole);
        let other_key: Vec<Vec<f32>> = with_rows(78, 0, 4, || {
            d.forward(&x)?;
            d.forward(&x)
        })?
        .reshape((4, 15))?
        .to_vec2()?;
        assert_ne!(other_key, whole);
        // The shared stream is untouched by keyed masks; a shape that does not split into the
        // shard's rows is an error, not a silent mask.
        let state = d.rng_state();
        assert_eq!(state, Dropout::new(0.5, 9).rng_state());
        assert!(with_rows(1, 0, 7, || d.forward(&x)).is_err());
        Ok(())
    }

    #[test]
    fn a_nested_context_restores_the_outer_one() -> Result<()> {
        let d = Dropout::new(0.5, 2);
        let x = Tensor::ones((2, 8), candle_core::DType::F32, &Device::Cpu)?;
        let plain: Vec<Vec<f32>> = with_rows(5, 0, 2, || -> Result<_> {
            d.forward(&x)?;
            d.forward(&x)
        })?
        .to_vec2()?;
        let nested: Vec<Vec<f32>> = with_rows(5, 0, 2, || -> Result<_> {
            d.forward(&x)?;
            // Another shard runs on this thread in between (rayon work stealing).
            with_rows(6, 4, 2, || d.forward(&x))?;
            d.forward(&x)
        })?
        .to_vec2()?;
        assert_eq!(plain, nested);
        Ok(())
    }
}
