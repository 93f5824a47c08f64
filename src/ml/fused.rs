//! Fused CPU kernels with an analytic backward for the decoder's element-wise hot spots.
//!
//! candle 0.11's own fused ops (`rms_norm`, `softmax_last_dim`, `rope`) have no backward, so the
//! decoder used to compose RMSNorm, the masked attention softmax, RoPE and SwiGLU from 5–15
//! small tensor ops each. On the CPU every one of them is a full pass over memory, a fresh
//! buffer, and in the backward one more zero-filled gradient buffer plus an add per node. The
//! ops here do each in one forward pass and one backward pass:
//!
//! - [`rms_norm`]: `x / √(mean(x²) + ε) · w` over the last dimension;
//! - [`masked_softmax`]: `softmax(s · scale + mask)` over the last dimension, the additive mask
//!   broadcast over the head dimension (the attention probabilities);
//! - [`rope`]: HF's rotate-half rotary embedding `x·cos + rotate_half(x)·sin`, reading a strided
//!   (transposed) `x` directly;
//! - [`swiglu`]: `silu(g) · u`.
//!
//! They run for f32 and f64 tensors on the CPU and, in a build with the `cuda` feature, for f32,
//! bf16 and f16 tensors on a GPU ([`supported`]; the CUDA kernels of `src/ml/cuda/fused.cu`,
//! launched by `fused_cuda.rs`, accumulate in f32 whatever the dtype), as the run's
//! `runtime.kernels` setting says ([`kernels`], [`with_kernels`]); callers keep the composed ops
//! for every other device or dtype, which also serve as the tests' reference. The
//! backward kernels return a gradient only for arguments that need one (`track_op`), so a frozen
//! norm weight gets none. Gradients are checked against central finite differences in f64 and
//! against the composed ops' gradients in the tests below.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor, WithDType,
};
use rayon::prelude::*;

pub use super::runtime::Kernels;

thread_local! {
    static KERNELS: std::cell::Cell<Option<Kernels>> = const { std::cell::Cell::new(None) };
}

/// The kernels the calling thread runs: what [`with_kernels`] set for it, else `auto`
/// ([`Kernels::build_default`]: all of them in optimised builds, only [`lora_linear`] in debug
/// builds, where the `coin` crate is compiled at opt-level 0 and the element loops ran ~1.9×
/// slower per training step than candle's optimised kernels). The setting comes from the run's
/// `runtime.kernels` (docs/config.md); nothing here reads the environment.
pub fn kernels() -> Kernels {
    KERNELS
        .with(|k| k.get())
        .unwrap_or_else(Kernels::build_default)
}

/// Whether the fused ops may handle `t`: the kernels are not [`Kernels::Off`], and `t` is f32
/// or f64 on the CPU, or (with the `cuda` feature) f32, bf16 or f16 on a GPU. [`lora_linear`] is
/// gated by this alone.
pub fn supported(t: &Tensor) -> bool {
    kernels() != Kernels::Off && device_supported(t)
}

/// Whether kernels exist for `t`'s device and dtype (whatever the setting).
fn device_supported(t: &Tensor) -> bool {
    if t.device().is_cpu() {
        return matches!(t.dtype(), DType::F32 | DType::F64);
    }
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        return super::fused_cuda::dtype_supported(t.dtype());
    }
    false
}

/// Whether the hand-written element loops ([`rms_norm`], [`masked_softmax`], [`rope`],
/// [`swiglu`], [`mul_const`]) run for `t`: [`Kernels::On`] and [`supported`].
pub fn loop_kernels(t: &Tensor) -> bool {
    kernels() == Kernels::On && supported(t)
}

/// The calling thread's setting (`None`: `auto`); work handed to another thread passes it on
/// with [`with_kernels`].
pub fn kernels_override() -> Option<Kernels> {
    KERNELS.with(|k| k.get())
}

/// Run `f` with the calling thread's kernels set to `kernels` (`None`: `auto`), restoring the
/// previous setting afterwards (also when `f` panics).
pub fn with_kernels<R>(kernels: Option<Kernels>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            KERNELS.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(KERNELS.with(|k| k.replace(kernels)));
    f()
}

/// Set the calling thread's kernels for the rest of its life: `Some(true)` all of them
/// ([`Kernels::On`]), `Some(false)` only [`lora_linear`] ([`Kernels::Lora`]), `None` back to
/// `auto`. The whole-model tests use it to run the fused loops in debug builds too.
pub fn set_loop_kernels_for_this_thread(on: Option<bool>) {
    KERNELS.with(|k| k.set(on.map(|on| if on { Kernels::On } else { Kernels::Lora })));
}

/// The float types the kernels are written for.
trait Real:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + PartialOrd
{
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn lowest() -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn lowest() -> Self {
        f32::MIN
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn lowest() -> Self {
        f64::MIN
    }
}

/// Elements per parallel task.
const MIN_TASK_ELEMS: usize = 1 << 15;

fn rows_per_task(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

/// Run `f(first_row, block)` on blocks of whole rows of `out` (≥ [`MIN_TASK_ELEMS`] elements
/// each): on the calling thread when there is a single block (a hand-off to the pool costs more
/// than a small tensor's work), on rayon's pool otherwise.
fn for_row_blocks<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = rows_per_task(row_len);
    let block = rows * row_len.max(1);
    if out.len() <= block {
        f(0, out)
    } else {
        out.par_chunks_mut(block)
            .enumerate()
            .for_each(|(b, c)| f(b * rows, c))
    }
}

/// [`for_row_blocks`] over two outputs of one shape.
fn for_row_blocks2<T: Send>(
    a: &mut [T],
    b: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    let rows = rows_per_task(row_len);
    let block = rows * row_len.max(1);
    if a.len() <= block {
        f(0, a, b)
    } else {
        a.par_chunks_mut(block)
            .zip(b.par_chunks_mut(block))
            .enumerate()
            .for_each(|(i, (x, y))| f(i * rows, x, y))
    }
}

/// The contiguous slice of a CPU storage under `layout`.
fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// Run a kernel that is generic over f32/f64 on two contiguous CPU storages of one dtype;
/// `$a` and `$b` are bound to their slices.
macro_rules! float_pair {
    ($op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let $a = cpu_slice::<f32>($s1, $l1, $op)?;
                let $b = cpu_slice::<f32>($s2, $l2, $op)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let $a = cpu_slice::<f64>($s1, $l1, $op)?;
                let $b = cpu_slice::<f64>($s2, $l2, $op)?;
                CpuStorage::F64($body)
            }
            _ => bail!("{}: f32 or f64 inputs of one dtype", $op),
        }
    };
}

/// Run `f` on the contiguous values of a CPU tensor (copied first when strided).
fn with_values<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("fused ops run on the CPU only")
    };
    f(cpu_slice::<T>(cpu, layout, "fused op")?)
}

fn tensor_like<T: WithDType>(v: Vec<T>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f64,
}

fn rms_norm_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let mut y = vec![T::zero(); x.len()];
    let inv_h = T::from_f64(1.0 / h as f64);
    let eps = T::from_f64(eps);
    for_row_blocks(&mut y, h, |r0, yb| {
        for (k, yr) in yb.chunks_mut(h).enumerate() {
            let xr = &x[(r0 + k) * h..][..h];
            let mut ss = T::zero();
            for &v in xr {
                ss += v * v;
            }
            let r = T::one() / (ss * inv_h + eps).sqrt();
            for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * r * wi;
            }
        }
    });
    y
}

/// dx (and dw when asked) of RMSNorm: with `r = 1/√(mean(x²)+ε)`, `x̂ = x·r`,
/// `dx = r·(g·w − x̂·mean(g·w·x̂))`, `dw = Σ_rows g·x̂`.
fn rms_norm_bwd<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64, want_dw: bool) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let inv_h = T::from_f64(1.0 / h as f64);
    let eps = T::from_f64(eps);
    let mut dx = vec![T::zero(); x.len()];
    for_row_blocks(&mut dx, h, |r0, db| {
        for (k, dr) in db.chunks_mut(h).enumerate() {
            let xr = &x[(r0 + k) * h..][..h];
            let gr = &g[(r0 + k) * h..][..h];
            let mut ss = T::zero();
            for &v in xr {
                ss += v * v;
            }
            let r = T::one() / (ss * inv_h + eps).sqrt();
            let mut dot = T::zero();
            for ((&v, &gi), &wi) in xr.iter().zip(gr).zip(w) {
                dot += gi * wi * v;
            }
            // mean(g·w·x̂) = r · mean(g·w·x)
            let c = dot * r * inv_h;
            for (((o, &v), &gi), &wi) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = r * (gi * wi - v * r * c);
            }
        }
    });
    let mut dw = Vec::new();
    if want_dw {
        dw = vec![T::zero(); h];
        for (xr, gr) in x.chunks(h).zip(g.chunks(h)) {
            let mut ss = T::zero();
            for &v in xr {
                ss += v * v;
            }
            let r = T::one() / (ss * inv_h + eps).sqrt();
            for ((d, &v), &gi) in dw.iter_mut().zip(xr).zip(gr) {
                *d += gi * v * r;
            }
        }
    }
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = l2.shape().elem_count();
        if l1.shape().dims().last() != Some(&h) {
            bail!("rms norm: weight of {h} for input {:?}", l1.shape());
        }
        let out = float_pair!(self.name(), (s1, l1), (s2, l2), |x, w| rms_norm_fwd(
            x, w, self.eps
        ));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let h = l2.shape().elem_count();
        if l1.shape().dims().last() != Some(&h) {
            bail!("rms norm: weight of {h} for input {:?}", l1.shape());
        }
        let y = super::fused_cuda::rms_norm_fwd(s1, l1, s2, l2, self.eps)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_dw = w.track_op();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let g = grad.contiguous()?;
            let dx = x.apply_op3_no_bwd(w, &g, &CudaBwd::RmsNormDx { eps: self.eps })?;
            let dw = want_dw
                .then(|| {
                    let h = w.elem_count();
                    x.apply_op2_no_bwd(&g, &CudaBwd::RmsNormDw { eps: self.eps, h })
                })
                .transpose()?;
            return Ok((Some(dx), dw));
        }
        macro_rules! run {
            ($t:ty) => {
                with_values::<$t, _>(x, |xv| {
                    with_values::<$t, _>(w, |wv| {
                        with_values::<$t, _>(grad, |gv| {
                            let (dx, dw) = rms_norm_bwd(xv, wv, gv, self.eps, want_dw);
                            let dx = tensor_like(dx, x)?;
                            let dw = if want_dw {
                                Some(tensor_like(dw, w)?)
                            } else {
                                None
                            };
                            Ok((Some(dx), dw))
                        })
                    })
                })
            };
        }
        match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => bail!("rms norm backward: unsupported dtype {d:?}"),
        }
    }
}

/// RMSNorm over the last dimension of `x` with weight `w` (shape (hidden)), f32/f64 on the CPU.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = if x.is_contiguous() {
        x.clone()
    } else {
        x.contiguous()?
    };
    let w = if w.is_contiguous() {
        w.clone()
    } else {
        w.contiguous()?
    };
    x.apply_op2(&w, RmsNorm { eps })
}

// ---------------------------------------------------------------------------------------------
// Strided 4-D access (a transposed view, a mask broadcast over heads).

/// Element offsets of a 4-D layout, a size-1 dimension broadcast against `dims` (stride 0).
#[derive(Clone, Copy)]
struct Strided4 {
    start: usize,
    strides: [usize; 4],
}

impl Strided4 {
    fn new(layout: &Layout, dims: [usize; 4], what: &str) -> Result<Self> {
        let ld = layout.dims();
        if ld.len() != 4 {
            bail!("{what}: expected 4 dimensions, got {ld:?}");
        }
        let mut strides = [0usize; 4];
        for k in 0..4 {
            if ld[k] == dims[k] {
                strides[k] = layout.stride()[k];
            } else if ld[k] == 1 {
                strides[k] = 0;
            } else {
                bail!("{what}: shape {ld:?} does not broadcast to {dims:?}");
            }
        }
        Ok(Strided4 {
            start: layout.start_offset(),
            strides,
        })
    }

    /// Start and strides as the CUDA kernels take them.
    #[cfg(feature = "cuda")]
    fn off4(&self) -> [u64; 5] {
        let s = self.strides;
        [self.start, s[0], s[1], s[2], s[3]].map(|v| v as u64)
    }

    /// Offset of the start of row `r` (rows = the first three dimensions flattened).
    fn row(&self, r: usize, dims: [usize; 4]) -> usize {
        let i2 = r % dims[2];
        let i1 = (r / dims[2]) % dims[1];
        let i0 = r / (dims[2] * dims[1]);
        self.start + i0 * self.strides[0] + i1 * self.strides[1] + i2 * self.strides[2]
    }
}

fn dims4(shape: &Shape) -> Result<[usize; 4]> {
    let (a, b, c, d) = shape.dims4()?;
    Ok([a, b, c, d])
}

// ---------------------------------------------------------------------------------------------
// Masked, scaled softmax (attention probabilities)

struct MaskedSoftmax {
    scale: f64,
}

fn masked_softmax_fwd<T: Real>(
    s: &[T],
    dims: [usize; 4],
    mask: &[T],
    ml: Strided4,
    scale: f64,
) -> Vec<T> {
    let t = dims[3];
    let scale = T::from_f64(scale);
    let mut p = vec![T::zero(); s.len()];
    for_row_blocks(&mut p, t, |r0, pb| {
        for (k, pr) in pb.chunks_mut(t).enumerate() {
            let r = r0 + k;
            let sr = &s[r * t..][..t];
            let base = ml.row(r, dims);
            let st = ml.strides[3];
            let mut max = T::lowest();
            for (j, (o, &v)) in pr.iter_mut().zip(sr).enumerate() {
                let z = v * scale + mask[base + j * st];
                *o = z;
                if z > max {
                    max = z;
                }
            }
            let mut sum = T::zero();
            for o in pr.iter_mut() {
                let e = (*o - max).exp();
                *o = e;
                sum += e;
            }
            let inv = T::one() / sum;
            for o in pr.iter_mut() {
                *o *= inv;
            }
        }
    });
    p
}

/// `ds = scale · p · (g − Σ g·p)` per row.
fn masked_softmax_bwd<T: Real>(p: &[T], g: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut ds = vec![T::zero(); p.len()];
    for_row_blocks(&mut ds, t, |r0, db| {
        for (k, dr) in db.chunks_mut(t).enumerate() {
            let pr = &p[(r0 + k) * t..][..t];
            let gr = &g[(r0 + k) * t..][..t];
            let mut dot = T::zero();
            for (&pi, &gi) in pr.iter().zip(gr) {
                dot += pi * gi;
            }
            for ((o, &pi), &gi) in dr.iter_mut().zip(pr).zip(gr) {
                *o = scale * pi * (gi - dot);
            }
        }
    });
    ds
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims4(l1.shape())?;
        let ml = Strided4::new(l2, dims, "attention mask")?;
        if ml.strides[3] == 0 && l2.dims()[3] != dims[3] {
            bail!("attention mask: the key dimension must not be broadcast");
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(m)) => CpuStorage::F32(masked_softmax_fwd(
                cpu_slice(s1, l1, self.name())?,
                dims,
                m,
                ml,
                self.scale,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(m)) => CpuStorage::F64(masked_softmax_fwd(
                cpu_slice(s1, l1, self.name())?,
                dims,
                m,
                ml,
                self.scale,
            )),
            _ => bail!("masked softmax: f32 or f64 scores and mask of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = dims4(l1.shape())?;
        let ml = Strided4::new(l2, dims, "attention mask")?;
        if ml.strides[3] == 0 && l2.dims()[3] != dims[3] {
            bail!("attention mask: the key dimension must not be broadcast");
        }
        let p = super::fused_cuda::masked_softmax_fwd((s1, l1), s2, ml.off4(), dims, self.scale)?;
        Ok((p, l1.shape().clone()))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !scores.track_op() {
            return Ok((None, None));
        }
        let t = scores.dim(candle_core::D::Minus1)?;
        #[cfg(feature = "cuda")]
        if scores.device().is_cuda() {
            let (p, g) = (res.contiguous()?, grad.contiguous()?);
            let scale = self.scale;
            return Ok((
                Some(p.apply_op2_no_bwd(&g, &CudaBwd::Softmax { scale, t })?),
                None,
            ));
        }
        macro_rules! run {
            ($t:ty) => {
                with_values::<$t, _>(res, |pv| {
                    with_values::<$t, _>(grad, |gv| {
                        tensor_like(masked_softmax_bwd(pv, gv, t, self.scale), scores)
                    })
                })
            };
        }
        let ds = match scores.dtype() {
            DType::F32 => run!(f32)?,
            DType::F64 => run!(f64)?,
            d => bail!("masked softmax backward: unsupported dtype {d:?}"),
        };
        Ok((Some(ds), None))
    }
}

/// `softmax(scores · scale + mask)` over the last dimension; `scores` (b, h, s, t), `mask`
/// additive, broadcastable to it (usually (b, 1, s, t)), of the scores' dtype. The mask gets no
/// gradient.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = if scores.is_contiguous() {
        scores.clone()
    } else {
        scores.contiguous()?
    };
    scores.apply_op2(mask, MaskedSoftmax { scale })
}

// ---------------------------------------------------------------------------------------------
// RoPE (HF rotate-half layout)

struct Rope;

fn rope_fwd<T: Real>(
    x: &[T],
    xl: Strided4,
    dims: [usize; 4],
    cos: &[T],
    cl: Strided4,
    sin: &[T],
    sl: Strided4,
) -> Vec<T> {
    let d = dims[3];
    let half = d / 2;
    let mut y = vec![T::zero(); dims.iter().product()];
    for_row_blocks(&mut y, d, |r0, yb| {
        for (i, yr) in yb.chunks_mut(d).enumerate() {
            let r = r0 + i;
            let xb = xl.row(r, dims);
            let cb = cl.row(r, dims);
            let sb = sl.row(r, dims);
            let xs = xl.strides[3];
            let (cs, ss) = (cl.strides[3], sl.strides[3]);
            for k in 0..half {
                let x1 = x[xb + k * xs];
                let x2 = x[xb + (k + half) * xs];
                yr[k] = x1 * cos[cb + k * cs] - x2 * sin[sb + k * ss];
                yr[k + half] = x2 * cos[cb + (k + half) * cs] + x1 * sin[sb + (k + half) * ss];
            }
        }
    });
    y
}

/// `dx[k] = g[k]·cos[k] + g[k+½]·sin[k+½]` (first half), `g[k]·cos[k] − g[k−½]·sin[k−½]`
/// (second half); `g` contiguous (b, h, s, d).
fn rope_bwd<T: Real>(
    g: &[T],
    dims: [usize; 4],
    cos: &[T],
    cl: Strided4,
    sin: &[T],
    sl: Strided4,
) -> Vec<T> {
    let d = dims[3];
    let half = d / 2;
    let mut dx = vec![T::zero(); g.len()];
    for_row_blocks(&mut dx, d, |r0, db| {
        for (i, dr) in db.chunks_mut(d).enumerate() {
            let r = r0 + i;
            let gr = &g[r * d..][..d];
            let cb = cl.row(r, dims);
            let sb = sl.row(r, dims);
            let (cs, ss) = (cl.strides[3], sl.strides[3]);
            for k in 0..half {
                let (g1, g2) = (gr[k], gr[k + half]);
                dr[k] = g1 * cos[cb + k * cs] + g2 * sin[sb + (k + half) * ss];
                dr[k + half] = g2 * cos[cb + (k + half) * cs] - g1 * sin[sb + k * ss];
            }
        }
    });
    dx
}

/// The 4-D dims of a rope input `l1` and the strided access to it and to its tables `l2`, `l3`.
fn rope_layouts(
    l1: &Layout,
    l2: &Layout,
    l3: &Layout,
) -> Result<([usize; 4], Strided4, Strided4, Strided4)> {
    let dims = dims4(l1.shape())?;
    if dims[3] % 2 != 0 {
        bail!("rope: odd head dimension {}", dims[3]);
    }
    let xl = Strided4::new(l1, dims, "rope input")?;
    let cl = Strided4::new(l2, dims, "rope cos")?;
    let sl = Strided4::new(l3, dims, "rope sin")?;
    if l2.dims()[3] != dims[3] || l3.dims()[3] != dims[3] {
        bail!(
            "rope: tables of width {} for head dim {}",
            l2.dims()[3],
            dims[3]
        );
    }
    Ok((dims, xl, cl, sl))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dims, xl, cl, sl) = rope_layouts(l1, l2, l3)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(rope_fwd(x, xl, dims, c, cl, s, sl))
            }
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(s)) => {
                CpuStorage::F64(rope_fwd(x, xl, dims, c, cl, s, sl))
            }
            _ => bail!("rope: f32 or f64 input and tables of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims, xl, cl, sl) = rope_layouts(l1, l2, l3)?;
        let y =
            super::fused_cuda::rope(s1, xl.off4(), (s2, cl.off4()), (s3, sl.off4()), dims, false)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let g = grad.contiguous()?;
            return Ok((
                Some(g.apply_op3_no_bwd(cos, sin, &CudaBwd::Rope)?),
                None,
                None,
            ));
        }
        let dims = dims4(x.shape())?;
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let cl = Strided4::new(cl, dims, "rope cos")?;
        let sl = Strided4::new(sl, dims, "rope sin")?;
        let dx = match (&*cs, &*ss, x.dtype()) {
            (Storage::Cpu(CpuStorage::F32(c)), Storage::Cpu(CpuStorage::F32(s)), DType::F32) => {
                with_values::<f32, _>(grad, |g| {
                    Tensor::from_vec(rope_bwd(g, dims, c, cl, s, sl), x.shape(), x.device())
                })?
            }
            (Storage::Cpu(CpuStorage::F64(c)), Storage::Cpu(CpuStorage::F64(s)), DType::F64) => {
                with_values::<f64, _>(grad, |g| {
                    Tensor::from_vec(rope_bwd(g, dims, c, cl, s, sl), x.shape(), x.device())
                })?
            }
            _ => bail!("rope backward: f32 or f64 CPU tensors of one dtype"),
        };
        Ok((Some(dx), None, None))
    }
}

/// HF's rotary embedding `x·cos + rotate_half(x)·sin` of `x` (b, h, s, d), which may be a
/// strided view (e.g. the transpose of (b, s, h, d)); `cos`/`sin` broadcastable to it (usually
/// (b, 1, s, d)), of `x`'s dtype. The result is contiguous; the tables get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let unit_inner = |t: &Tensor| t.stride().last() == Some(&1) || t.dim(3).ok() == Some(1);
    let x = if unit_inner(x) {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op3(cos, sin, Rope)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

struct SwiGlu;

fn sigmoid<T: Real>(v: T) -> T {
    T::one() / (T::one() + (-v).exp())
}

fn swiglu_fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); g.len()];
    for_row_blocks(&mut y, 1, |i0, yb| {
        let n = yb.len();
        for ((o, &gi), &ui) in yb.iter_mut().zip(&g[i0..i0 + n]).zip(&u[i0..i0 + n]) {
            *o = gi * sigmoid(gi) * ui;
        }
    });
    y
}

/// `dg = grad·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = grad·g·σ(g)`.
fn swiglu_bwd<T: Real>(g: &[T], u: &[T], grad: &[T], want_du: bool) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::zero(); g.len()];
    if want_du {
        let mut du = vec![T::zero(); g.len()];
        for_row_blocks2(&mut dg, &mut du, 1, |i0, a, b| {
            let r = i0..i0 + a.len();
            let inputs = g[r.clone()].iter().zip(&u[r.clone()]).zip(&grad[r]);
            for ((da, db), ((&gi, &ui), &gr)) in a.iter_mut().zip(b.iter_mut()).zip(inputs) {
                let s = sigmoid(gi);
                *da = gr * ui * s * (T::one() + gi * (T::one() - s));
                *db = gr * gi * s;
            }
        });
        (dg, du)
    } else {
        for_row_blocks(&mut dg, 1, |i0, a| {
            let r = i0..i0 + a.len();
            let inputs = g[r.clone()].iter().zip(&u[r.clone()]).zip(&grad[r]);
            for (da, ((&gi, &ui), &gr)) in a.iter_mut().zip(inputs) {
                let s = sigmoid(gi);
                *da = gr * ui * s * (T::one() + gi * (T::one() - s));
            }
        });
        (dg, Vec::new())
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let out = float_pair!(self.name(), (s1, l1), (s2, l2), |g, u| swiglu_fwd(g, u));
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let y = super::fused_cuda::swiglu_fwd((s1, l1), (s2, l2))?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_dg, want_du) = (g.track_op(), u.track_op());
        if !want_dg && !want_du {
            return Ok((None, None));
        }
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            let grad = grad.contiguous()?;
            let out = g.apply_op3_no_bwd(u, &grad, &CudaBwd::SwiGlu { want_du })?;
            if !want_du {
                return Ok((Some(out), None));
            }
            let dg = want_dg.then(|| out.get(0)).transpose()?;
            return Ok((dg, Some(out.get(1)?)));
        }
        macro_rules! run {
            ($t:ty) => {
                with_values::<$t, _>(g, |gv| {
                    with_values::<$t, _>(u, |uv| {
                        with_values::<$t, _>(grad, |grv| {
                            let (dg, du) = swiglu_bwd(gv, uv, grv, want_du);
                            let dg = if want_dg {
                                Some(tensor_like(dg, g)?)
                            } else {
                                None
                            };
                            let du = if want_du {
                                Some(tensor_like(du, u)?)
                            } else {
                                None
                            };
                            Ok((dg, du))
                        })
                    })
                })
            };
        }
        match g.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => bail!("swiglu backward: unsupported dtype {d:?}"),
        }
    }
}

/// `silu(g) · u` for two tensors of one shape.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let c = |t: &Tensor| {
        if t.is_contiguous() {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    c(g)?.apply_op2(&c(u)?, SwiGlu)
}

// ---------------------------------------------------------------------------------------------
// Multiplication by a constant mask (dropout)

struct MulConst {
    mask: Tensor,
}

impl CustomOp1 for MulConst {
    fn name(&self) -> &'static str {
        "fused-mul-const"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ms, ml) = self.mask.storage_and_layout();
        let Storage::Cpu(m) = &*ms else {
            bail!("mul-const: the mask must be on the CPU")
        };
        if ml.shape() != l.shape() {
            bail!("mul-const: mask {:?} for input {:?}", ml.shape(), l.shape());
        }
        fn mul<T: Real>(x: &[T], m: &[T]) -> Vec<T> {
            let mut y = vec![T::zero(); x.len()];
            for_row_blocks(&mut y, 1, |i0, yb| {
                let n = yb.len();
                for ((o, &a), &b) in yb.iter_mut().zip(&x[i0..i0 + n]).zip(&m[i0..i0 + n]) {
                    *o = a * b;
                }
            });
            y
        }
        let out = float_pair!(self.name(), (s, l), (m, ml), |x, mask| mul(x, mask));
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ms, ml) = self.mask.storage_and_layout();
        let Storage::Cuda(m) = &*ms else {
            bail!("mul-const: the mask must be on the input's GPU")
        };
        if ml.shape() != l.shape() {
            bail!("mul-const: mask {:?} for input {:?}", ml.shape(), l.shape());
        }
        Ok((
            super::fused_cuda::mul_const((s, l), (m, ml))?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        Ok(Some(grad.mul(&self.mask)?))
    }
}

/// `x · mask` for a constant `mask` of `x`'s shape and dtype: the backward computes `x`'s
/// gradient only (a plain `mul` also computes and stores one for the mask).
pub fn mul_const(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let c = |t: &Tensor| {
        if t.is_contiguous() {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    c(x)?.apply_op1(MulConst { mask: c(mask)? })
}

// ---------------------------------------------------------------------------------------------
// A frozen linear layer with a LoRA adapter, as one node

/// `y = x Wᵀ + s · (xd Aᵀ) Bᵀ` with `xd = x ∘ mask` (dropout) and a frozen W. The value is
/// computed by the caller from detached tensors (the same GEMMs as the composed ops); this op
/// only hands it out (one copy) and carries the backward, so the graph gets one node per linear
/// instead of six (frozen matmul, dropout, two matmuls, scale, add), each of which cost the
/// backward a zero-filled gradient buffer and an add.
struct LoraLinear {
    /// The value, taken (not kept) by the forward.
    y: std::sync::Mutex<Option<Tensor>>,
    w: Tensor,
    xd: Tensor,
    mask: Option<Tensor>,
    h_scaled: Tensor,
    scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self
            .y
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(y) = y else {
            bail!("lora linear: the forward ran twice")
        };
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            bail!("lora linear: the value must be on the CPU")
        };
        let out = match cpu {
            CpuStorage::F32(_) => {
                CpuStorage::F32(cpu_slice::<f32>(cpu, layout, self.name())?.to_vec())
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(cpu_slice::<f64>(cpu, layout, self.name())?.to_vec())
            }
            _ => bail!("lora linear: f32 or f64 only"),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self
            .y
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(y) = y else {
            bail!("lora linear: the forward ran twice")
        };
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cuda(c) = &*storage else {
            bail!("lora linear: the value must be on the GPU")
        };
        Ok((super::fused_cuda::copy(c, layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (want_da, want_db) = (a.track_op(), b.track_op());
        let (a, b) = (a.detach(), b.detach());
        // dh (before the scale) = s · g B, (n × r).
        let dh = (g.matmul(&b)? * self.scale)?;
        let da = want_da.then(|| dh.t()?.matmul(&self.xd)).transpose()?;
        let db = want_db.then(|| g.t()?.matmul(&self.h_scaled)).transpose()?;
        let dx = if x.track_op() {
            let dxd = dh.matmul(&a)?;
            let dxd = match &self.mask {
                Some(m) => (dxd * m)?,
                None => dxd,
            };
            Some((g.matmul(&self.w)? + dxd)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// The output of a frozen linear `w` (out × in, not a var) with a LoRA adapter `a` (r × in), `b`
/// (out × r) and scale `s` on a 2-D `x` (n × in): `x wᵀ + s·((x∘mask) aᵀ) bᵀ`, one graph node
/// with an analytic backward for `x`, `a` and `b`. All of one dtype (f32/f64) on the CPU.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let xd_ = x.detach();
    let xd = match &mask {
        Some(m) => (&xd_ * m)?,
        None => xd_.clone(),
    };
    let h_scaled = (xd.matmul(&a.detach().t()?)? * scale)?;
    let base = xd_.matmul(&w.t()?)?;
    let y = (base + h_scaled.matmul(&b.detach().t()?)?)?;
    x.apply_op3(
        a,
        b,
        LoraLinear {
            y: std::sync::Mutex::new(Some(y)),
            w: w.clone(),
            xd,
            mask,
            h_scaled,
            scale,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The backward kernels on a GPU, as graph-less ops (`apply_op*_no_bwd`)

#[cfg(feature = "cuda")]
enum CudaBwd {
    /// (x, w, g) → dx.
    RmsNormDx { eps: f64 },
    /// (x, g) → dw of `h` values.
    RmsNormDw { eps: f64, h: usize },
    /// (p, g) → ds over rows of `t`.
    Softmax { scale: f64, t: usize },
    /// (g, cos, sin) → dx.
    Rope,
    /// (g, u, grad) → dg, or (2, …) holding dg and du.
    SwiGlu { want_du: bool },
}

#[cfg(feature = "cuda")]
impl CustomOp2 for CudaBwd {
    fn name(&self) -> &'static str {
        "fused-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("fused backward: this op runs on a GPU only")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::fused_cuda as k;
        match *self {
            CudaBwd::RmsNormDw { eps, h } => Ok((
                k::rms_norm_bwd_dw((s1, l1), (s2, l2), h, eps)?,
                Shape::from(h),
            )),
            CudaBwd::Softmax { scale, t } => Ok((
                k::masked_softmax_bwd((s1, l1), (s2, l2), t, scale)?,
                l1.shape().clone(),
            )),
            _ => bail!("fused backward: a three-input op applied to two inputs"),
        }
    }
}

#[cfg(feature = "cuda")]
impl CustomOp3 for CudaBwd {
    fn name(&self) -> &'static str {
        "fused-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("fused backward: this op runs on a GPU only")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::fused_cuda as k;
        match *self {
            CudaBwd::RmsNormDx { eps } => Ok((
                k::rms_norm_bwd_dx((s1, l1), (s2, l2), (s3, l3), eps)?,
                l1.shape().clone(),
            )),
            CudaBwd::Rope => {
                let (dims, gl, cl, sl) = rope_layouts(l1, l2, l3)?;
                let dx = k::rope(s1, gl.off4(), (s2, cl.off4()), (s3, sl.off4()), dims, true)?;
                Ok((dx, l1.shape().clone()))
            }
            CudaBwd::SwiGlu { want_du } => {
                let out = k::swiglu_bwd((s1, l1), (s2, l2), (s3, l3), want_du)?;
                let shape = if want_du {
                    let mut d = vec![2];
                    d.extend_from_slice(l1.dims());
                    Shape::from(d)
                } else {
                    l1.shape().clone()
                };
                Ok((out, shape))
            }
            _ => bail!("fused backward: a two-input op applied to three inputs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::llama::{
        apply_rope_composed, attention_mask, attention_probs_composed, rope_tables,
        swiglu_composed, RmsNorm as ComposedNorm,
    };
    use crate::ml::rng::Rng;
    use candle_core::{Device, Var};

    fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n, 1.0), shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .expect("random tensor")
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        values(a)
            .iter()
            .zip(values(b))
            .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    /// `f` applied to `inputs`, of which those flagged in `diff` are vars: checks that the fused
    /// op `f` equals the composed `reference` (values and gradients of `Σ f(x)·up`), that
    /// unflagged inputs get no gradient from the fused op, and that the fused gradients match
    /// central finite differences in f64 on every entry.
    fn check(
        inputs: &[Tensor],
        diff: &[bool],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let vars: Vec<Option<Var>> = inputs
            .iter()
            .zip(diff)
            .map(|(t, &d)| d.then(|| Var::from_tensor(t).expect("var")))
            .collect();
        let args: Vec<Tensor> = inputs
            .iter()
            .zip(&vars)
            .map(|(t, v)| {
                v.as_ref()
                    .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
            })
            .collect();
        let y = f(&args).expect("fused forward");
        let y_ref = reference(&args).expect("composed forward");
        assert!(max_diff(&y, &y_ref) < 1e-12, "forward differs");
        let mut rng = Rng::new(99);
        let up = randn(&mut rng, y.dims());
        let g = (&y * &up)
            .and_then(|t| t.sum_all())
            .expect("loss")
            .backward()
            .expect("bwd");
        let g_ref = (&y_ref * &up)
            .and_then(|t| t.sum_all())
            .expect("loss")
            .backward()
            .expect("bwd");
        for (k, v) in vars.iter().enumerate() {
            let Some(v) = v else {
                assert!(g.get(&inputs[k]).is_none());
                continue;
            };
            let ga = g.get(v.as_tensor()).expect("fused gradient");
            let gr = g_ref.get(v.as_tensor()).expect("composed gradient");
            assert!(
                max_diff(ga, gr) < 1e-10,
                "input {k}: gradient differs from composed"
            );
            let analytic = values(ga);
            let base = values(v.as_tensor());
            let eps = 1e-6;
            let loss_at = |vals: &[f64]| -> f64 {
                let mut a = args.clone();
                a[k] = Tensor::from_vec(vals.to_vec(), v.dims(), &Device::Cpu).expect("t");
                let y = f(&a).expect("forward");
                values(&(&y * &up).and_then(|t| t.sum_all()).expect("loss"))[0]
            };
            for i in 0..base.len() {
                let mut p = base.clone();
                p[i] += eps;
                let plus = loss_at(&p);
                p[i] = base[i] - eps;
                let minus = loss_at(&p);
                let numeric = (plus - minus) / (2.0 * eps);
                let err = (numeric - analytic[i]).abs() / analytic[i].abs().max(1.0);
                assert!(err < 1e-6, "input {k}[{i}]: {} vs {numeric}", analytic[i]);
            }
        }
    }

    #[test]
    fn rms_norm_matches_composed_and_finite_differences() {
        let mut rng = Rng::new(1);
        let x = randn(&mut rng, &[2, 3, 8]);
        let w = randn(&mut rng, &[8]);
        let fused = |a: &[Tensor]| rms_norm(&a[0], &a[1], 1e-5);
        let composed = |a: &[Tensor]| ComposedNorm::new(a[1].clone(), 1e-5).forward_composed(&a[0]);
        // Frozen weight (no gradient for it) and trainable weight.
        check(&[x.clone(), w.clone()], &[true, false], fused, composed);
        check(&[x, w], &[true, true], fused, composed);
    }

    #[test]
    fn masked_softmax_matches_composed_and_finite_differences() {
        let mut rng = Rng::new(2);
        // b 2, heads 3, 4 new positions after 1 cached one, the second row padded at the end.
        let valid = vec![vec![true; 5], vec![true, true, true, true, false]];
        let mask = attention_mask(&valid, 4, &Device::Cpu)
            .and_then(|m| m.to_dtype(DType::F64))
            .expect("mask");
        let s = randn(&mut rng, &[2, 3, 4, 5]);
        check(
            &[s, mask],
            &[true, false],
            |a| masked_softmax(&a[0], &a[1], 0.35),
            |a| attention_probs_composed(&a[0], &a[1], 0.35),
        );
    }

    #[test]
    fn rope_on_a_transposed_view_matches_composed_and_finite_differences() {
        let mut rng = Rng::new(3);
        let pos = Tensor::new(&[[0u32, 1, 2], [3, 4, 5]], &Device::Cpu).expect("pos");
        let (cos, sin) = rope_tables(&pos, 6, 10000.0).expect("tables");
        let (cos, sin) = (
            cos.to_dtype(DType::F64).expect("cos"),
            sin.to_dtype(DType::F64).expect("sin"),
        );
        // (b, s, h, d) → (b, h, s, d) as in attention: a strided input.
        let x = randn(&mut rng, &[2, 3, 2, 6]);
        check(
            &[x, cos, sin],
            &[true, false, false],
            |a| rope(&a[0].transpose(1, 2)?, &a[1], &a[2]),
            |a| apply_rope_composed(&a[0].transpose(1, 2)?.contiguous()?, &a[1], &a[2]),
        );
    }

    #[test]
    fn swiglu_matches_composed_and_finite_differences() {
        let mut rng = Rng::new(4);
        let g = randn(&mut rng, &[3, 7]);
        let u = randn(&mut rng, &[3, 7]);
        let (f, c) = (
            |a: &[Tensor]| swiglu(&a[0], &a[1]),
            |a: &[Tensor]| swiglu_composed(&a[0], &a[1]),
        );
        check(&[g.clone(), u.clone()], &[true, true], f, c);
        check(&[g, u], &[true, false], f, c);
    }

    #[test]
    fn mul_const_gives_the_input_gradient_only() {
        let mut rng = Rng::new(5);
        let x = randn(&mut rng, &[4, 5]);
        let m = randn(&mut rng, &[4, 5]);
        check(
            &[x, m],
            &[true, false],
            |a| mul_const(&a[0], &a[1]),
            |a| &a[0] * &a[1],
        );
    }

    #[test]
    fn lora_linear_matches_composed_and_finite_differences() {
        let mut rng = Rng::new(7);
        let x = randn(&mut rng, &[5, 6]);
        let a = randn(&mut rng, &[2, 6]);
        let b = randn(&mut rng, &[4, 2]);
        let w = randn(&mut rng, &[4, 6]);
        let keep: Vec<f64> = (0..30)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
            .collect();
        let mask = Tensor::from_vec(keep, (5, 6), &Device::Cpu).expect("mask");
        for m in [Some(mask), None] {
            let fused = |t: &[Tensor]| lora_linear(&t[0], &w, &t[1], &t[2], 0.75, m.clone());
            let composed = |t: &[Tensor]| {
                let xd = match &m {
                    Some(m) => (&t[0] * m)?,
                    None => t[0].clone(),
                };
                let h = (xd.matmul(&t[1].t()?)? * 0.75)?;
                t[0].matmul(&w.t()?)? + h.matmul(&t[2].t()?)?
            };
            check(
                &[x.clone(), a.clone(), b.clone()],
                &[true, true, true],
                fused,
                composed,
            );
            check(
                &[x.clone(), a.clone(), b.clone()],
                &[true, false, true],
                fused,
                composed,
            );
        }
    }

    /// The f32 kernels (the production dtype) agree with the composed f32 ops to rounding, on
    /// shapes large enough to split into several parallel blocks (> `MIN_TASK_ELEMS`).
    #[test]
    fn f32_kernels_match_composed_ops() -> Result<()> {
        let mut rng = Rng::new(6);
        let f32t = |rng: &mut Rng, shape: &[usize]| randn(rng, shape).to_dtype(DType::F32);
        let x = f32t(&mut rng, &[4, 70, 160])?;
        let w = f32t(&mut rng, &[160])?;
        let a = rms_norm(&x, &w, 1e-6)?;
        let b = ComposedNorm::new(w.clone(), 1e-6).forward_composed(&x)?;
        assert!(max_diff(&a, &b) < 1e-5);
        let valid = vec![vec![true; 70]; 4];
        let mask = attention_mask(&valid, 70, &Device::Cpu)?;
        let s = f32t(&mut rng, &[4, 3, 70, 70])?;
        let a = masked_softmax(&s, &mask, 0.125)?;
        let b = attention_probs_composed(&s, &mask, 0.125)?;
        assert!(max_diff(&a, &b) < 1e-6);
        let pos = Tensor::from_vec((0..280u32).map(|i| i % 70).collect(), (4, 70), &Device::Cpu)?;
        let (cos, sin) = rope_tables(&pos, 64, 10000.0)?;
        let q = f32t(&mut rng, &[4, 70, 3, 64])?.transpose(1, 2)?;
        let a = rope(&q, &cos, &sin)?;
        let b = apply_rope_composed(&q.contiguous()?, &cos, &sin)?;
        assert!(max_diff(&a, &b) < 1e-5);
        let (g, u) = (f32t(&mut rng, &[280, 160])?, f32t(&mut rng, &[280, 160])?);
        assert!(max_diff(&swiglu(&g, &u)?, &swiglu_composed(&g, &u)?) < 1e-5);
        Ok(())
    }

    /// The CUDA side cannot run here, so its plumbing is checked as text: every kernel that
    /// `fused_cuda.rs` launches is defined in `cuda/fused.cu` (for every dtype, by the
    /// instantiation macro) and every defined kernel is launched; each dtype is instantiated.
    #[test]
    fn the_cuda_kernels_launched_are_the_ones_defined() {
        let cu = include_str!("cuda/fused.cu");
        let rs = include_str!("fused_cuda.rs");
        let defined: std::collections::BTreeSet<&str> = cu
            .split("__global__ void ")
            .skip(1)
            .filter_map(|rest| rest.split("_##SFX(").next())
            .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        assert!(
            defined.len() >= 12,
            "kernels found in fused.cu: {defined:?}"
        );
        for name in &defined {
            assert!(
                rs.contains(&format!("\"{name}\"")),
                "fused.cu defines {name}, fused_cuda.rs never launches it"
            );
        }
        let launched = [
            "rms_norm_fwd",
            "rms_norm_bwd",
            "rms_norm_rrow",
            "rms_norm_dw",
            "cast_from_f32",
            "masked_softmax_fwd",
            "masked_softmax_bwd",
            "rope_fwd",
            "rope_bwd",
            "swiglu_fwd",
            "swiglu_bwd",
            "swiglu_bwd_dg",
            "mul_const",
        ];
        for name in launched {
            assert!(defined.contains(name), "{name} is not defined in fused.cu");
        }
        assert_eq!(defined.len(), launched.len(), "{defined:?}");
        for (ty, sfx) in [
            ("float", "f32"),
            ("__nv_bfloat16", "bf16"),
            ("__half", "f16"),
        ] {
            assert!(
                cu.contains(&format!("INSTANTIATE({ty}, {sfx})")),
                "{sfx} instances"
            );
            assert!(rs.contains(&format!("const SUFFIX: &'static str = \"{sfx}\"")));
        }
    }

    #[test]
    fn the_kernels_setting_gates_the_ops_and_is_restored() {
        let cpu = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).expect("tensor");
        let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).expect("tensor");
        with_kernels(Some(Kernels::On), || {
            assert!(supported(&cpu) && loop_kernels(&cpu));
            assert!(!supported(&ints));
            with_kernels(Some(Kernels::Lora), || {
                assert!(supported(&cpu) && !loop_kernels(&cpu));
            });
            assert_eq!(kernels_override(), Some(Kernels::On), "restored");
            with_kernels(Some(Kernels::Off), || {
                assert!(!supported(&cpu) && !loop_kernels(&cpu));
            });
        });
        assert_eq!(kernels_override(), None);
        assert_eq!(kernels(), Kernels::build_default());
        let other = with_kernels(Some(Kernels::Off), || {
            std::thread::spawn(kernels_override).join().expect("thread")
        });
        assert_eq!(other, None, "the setting is the calling thread's");
    }
}
