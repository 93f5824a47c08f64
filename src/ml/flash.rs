//! Attention that never holds the (s × t) score matrix: `O = softmax(q·kᵀ·scale + mask)·v`
//! computed in blocks of queries × keys with an online softmax, and a backward that recomputes
//! each block's probabilities from q, k and two saved numbers per query row.
//!
//! The algorithm is flash-attention's (Dao et al., "FlashAttention: Fast and Memory-Efficient
//! Exact Attention with IO-Awareness", 2022; the loop order and the saved row statistics follow
//! FlashAttention-2, Dao 2023). For a block of queries the forward walks the key blocks keeping,
//! per query row, the running maximum `m` of the scaled, masked scores and the running sum
//! `l = Σ exp(x − m)`; a later block with a larger maximum rescales the partial output by
//! `exp(m_old − m_new)`. At the end `O = acc / l`. The op keeps `m` and `l` (b·h·s numbers each)
//! instead of their combination `m + ln l`: in f32, `f32::MIN + ln l` rounds to `f32::MIN`, which
//! would give a fully masked row (a left-padded query that sees only padding) probabilities of 1
//! instead of the composed ops' uniform `1/t`.
//!
//! The backward (FlashAttention-2's algorithm 2) per query block and key block: recompute
//! `P = exp(q·kᵀ·scale + mask − m) / l`, then with `D = rowsum(dO ⊙ O)`:
//! `dV += Pᵀ·dO`, `dP = dO·vᵀ`, `dS = P ⊙ (dP − D)`, `dQ += scale·dS·k`, `dK += scale·dSᵀ·q`.
//!
//! Each block step runs over all (batch, head) pairs at once: the block products are batched
//! candle matmuls on block views (candle's optimised GEMM, no `unsafe` here), the element-wise
//! steps (mask, running max, exponentials, rescaling) are loops over rows on rayon's pool. A
//! block holds at most [`BLOCK_ELEMS`] scores for all heads together, so memory is O(b·h·s·d)
//! for the inputs, output and gradients plus a fixed block workspace, never O(b·h·s·t).
//!
//! Grouped-query attention (`heads` a multiple of `kv_heads`) runs without expanding k and v:
//! the queries of the heads that share a key head are stacked as rows of one block.
//!
//! Masks: an optional additive mask broadcastable to (b, h, s, t) (each of b, h, s may be 1),
//! usually the model's causal + key-padding mask (b, 1, s, t). Key ranges a whole query block
//! cannot see (the causal future, left padding) are skipped: a key whose mask is below
//! `lowest / 2` contributes `exp(mask − max) = 0` to every row that sees any key, so skipping it
//! changes nothing. A row that sees no key at all is computed over all keys, as the composed ops
//! do (uniform probabilities).
//!
//! On the CPU, f32 and f64 (the tiny model's gradient checks run in f64); bf16/f16 inputs are
//! computed in f32. On a GPU (the `cuda` feature) the same op runs the kernels of
//! `src/ml/cuda/flash.cu` (`flash_cuda.rs` launches them): f32, bf16 or f16 storage with f32
//! accumulation, head dimension ≤ 128, one thread block per (batch, head, 16 query rows) in the
//! forward and per (batch, key head, 16 keys) in the backward, which recomputes the
//! probabilities from the saved `m` and `l` and adds dq up with f32 atomics. The GPU kernels
//! skip masked keys by the same rule (per tile, only for rows that have seen a key) and clamp
//! each masked score at `f32::MIN`, so a −∞ mask (`f32::MIN` rounded to bf16) behaves like the
//! f32 one. [`device_supported`] says where the op runs; elsewhere the model keeps its composed
//! attention.

use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

static OFF_FOR_PROCESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turn the blocked attention off (or back on) for the whole process, so that a benchmark can
/// compare it with the score-matrix path in one binary (`examples/train_bench.rs --attention
/// scores`). Not a user setting: `runtime.kernels` decides everywhere else.
pub fn set_enabled_for_process(on: bool) {
    OFF_FOR_PROCESS.store(!on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_enabled_for_process`] left the blocked attention on (the default).
pub fn enabled_for_process() -> bool {
    !OFF_FOR_PROCESS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Scores per block step, over all (batch, head) pairs together (4 Mi: 16 MiB in f32).
pub const BLOCK_ELEMS: usize = 1 << 22;

/// Rows per parallel task in the element-wise loops (at least this many elements each).
const MIN_TASK_ELEMS: usize = 1 << 14;

/// The query and key block sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocks {
    /// Query rows per block.
    pub queries: usize,
    /// Keys per block.
    pub keys: usize,
}

impl Blocks {
    /// Square-ish blocks holding at most [`BLOCK_ELEMS`] scores over `pairs` (batch, head)
    /// pairs: 128 × 128 for 256 pairs; a single query (generation with a KV cache) takes all
    /// keys in one block when they fit.
    pub fn auto(pairs: usize, s: usize, t: usize) -> Blocks {
        let per_pair = (BLOCK_ELEMS / pairs.max(1)).max(1);
        let side = ((per_pair as f64).sqrt() as usize).clamp(16, 512);
        let queries = side.min(s).max(1);
        let keys = (per_pair / queries).max(16).min(t).max(1);
        Blocks { queries, keys }
    }
}

/// The float types the kernel is written for.
trait Float:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + PartialOrd
{
    fn exp(self) -> Self;
    fn lowest() -> Self;
}

impl Float for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn lowest() -> Self {
        f32::MIN
    }
}

impl Float for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn lowest() -> Self {
        f64::MIN
    }
}

/// Run `f` on the contiguous values of a CPU tensor of dtype `T` (copied first when strided).
fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("flash attention: the CPU kernel got a tensor on another device")
    };
    let all = T::cpu_storage_as_slice(cpu)?;
    match layout.contiguous_offsets() {
        Some((a, b)) => f(&all[a..b]),
        None => bail!("flash attention: a contiguous tensor has no contiguous offsets"),
    }
}

/// `f(row, out_row, state)` for every row of `out` (rows of `row_len`), with one `state` entry
/// per row, on rayon's pool in tasks of ≥ [`MIN_TASK_ELEMS`] elements.
fn par_rows<T: Send, S: Send>(
    out: &mut [T],
    row_len: usize,
    state: &mut [S],
    f: impl Fn(usize, &mut [T], &mut S) + Sync + Send,
) {
    let per_task = (MIN_TASK_ELEMS / row_len.max(1)).max(1);
    out.par_chunks_mut(row_len.max(1))
        .zip(state.par_iter_mut())
        .enumerate()
        .with_min_len(per_task)
        .for_each(|(r, (o, st))| f(r, o, st));
}

/// The additive mask, broadcast to (b, h, s, t) by zero strides.
struct MaskView<T> {
    data: Vec<T>,
    /// Strides of the batch, head and query dimensions (the key stride is 1).
    strides: [usize; 3],
}

impl<T: Float> MaskView<T> {
    fn row(&self, b: usize, h: usize, i: usize) -> &[T] {
        let [sb, sh, ss] = self.strides;
        &self.data[b * sb + h * sh + i * ss..]
    }
}

/// The validated shapes of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    s: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

fn dims_of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    let (b, heads, s, d) = q.dims4()?;
    let (kb, kv_heads, t, kd) = k.dims4()?;
    if kb != b || kd != d || kv_heads == 0 || heads % kv_heads != 0 {
        bail!(
            "flash attention: queries {:?} and keys {:?} do not fit (same batch and head \
             dimension, heads a multiple of key heads)",
            q.dims(),
            k.dims()
        );
    }
    if v.dims() != k.dims() {
        bail!(
            "flash attention: values {:?} differ from keys {:?}",
            v.dims(),
            k.dims()
        );
    }
    if t == 0 {
        bail!("flash attention: no keys to attend to");
    }
    Ok(Dims {
        b,
        heads,
        kv_heads,
        s,
        t,
        d,
    })
}

/// The mask's values in `T` with broadcast strides, checked against `dims`.
fn mask_view<T: Float>(mask: &Tensor, dims: Dims) -> Result<MaskView<T>> {
    let strides = mask_strides(mask.dims(), dims)?;
    let data = with_slice::<T, _>(&mask.to_dtype(T::DTYPE)?, |m| Ok(m.to_vec()))?;
    Ok(MaskView { data, strides })
}

/// The element strides of the batch, head and query dimensions of a contiguous mask of shape
/// `md` broadcast to (b, h, s, t) (0 for a broadcast dimension), checked against `dims`.
fn mask_strides(md: &[usize], dims: Dims) -> Result<[usize; 3]> {
    let want = [dims.b, dims.heads, dims.s, dims.t];
    if md.len() != 4 || md[3] != dims.t || (0..3).any(|k| md[k] != want[k] && md[k] != 1) {
        bail!("flash attention: mask {md:?} does not broadcast to {want:?}");
    }
    let st = [md[1] * md[2] * md[3], md[2] * md[3], md[3]];
    Ok([0, 1, 2].map(|k| if md[k] == 1 { 0 } else { st[k] }))
}

/// Per query block, the key range `[lo, hi)` any of its rows (in any batch row or head) can
/// see; a row that sees no key widens it to all keys.
fn key_ranges<T: Float>(mask: Option<&MaskView<T>>, dims: Dims, br: usize) -> Vec<(usize, usize)> {
    let Dims { b, heads, s, t, .. } = dims;
    let Some(mask) = mask else {
        return vec![(0, t); s.div_ceil(br)];
    };
    let limit = T::lowest() / T::from_f64(2.0);
    let hs = if mask.strides[1] == 0 { 1 } else { heads };
    let bs = if mask.strides[0] == 0 { 1 } else { b };
    (0..s)
        .step_by(br)
        .map(|i0| {
            let (mut lo, mut hi) = (t, 0);
            for bi in 0..bs {
                for h in 0..hs {
                    for i in i0..(i0 + br).min(s) {
                        let row = &mask.row(bi, h, i)[..t];
                        match row.iter().position(|&m| m > limit) {
                            Some(first) => {
                                let last = row.iter().rposition(|&m| m > limit).unwrap_or(first);
                                lo = lo.min(first);
                                hi = hi.max(last + 1);
                            }
                            None => {
                                lo = 0;
                                hi = t;
                            }
                        }
                    }
                }
            }
            (lo, hi.max(lo + 1).min(t))
        })
        .collect()
}

/// `x` (b, heads, n, d) → rows `[i0, i0 + r)` as (b, kv_heads, rep·r, d), contiguous: the
/// queries of the heads sharing a key head stacked.
fn query_block(x: &Tensor, dims: Dims, i0: usize, r: usize) -> Result<Tensor> {
    let Dims {
        b, kv_heads, s, d, ..
    } = dims;
    let rep = dims.rep();
    x.reshape((b, kv_heads, rep, s, d))?
        .narrow(3, i0, r)?
        .contiguous()?
        .reshape((b, kv_heads, rep * r, d))
}

/// The scaled, masked scores of one block row: `x_j = s_j · scale + mask_j`.
fn masked_row<T: Float>(out: &mut [T], scores: &[T], mask: Option<&[T]>, scale: T) {
    match mask {
        Some(m) => {
            for ((o, &sv), &mv) in out.iter_mut().zip(scores).zip(m) {
                *o = sv * scale + mv;
            }
        }
        None => {
            for (o, &sv) in out.iter_mut().zip(scores) {
                *o = sv * scale;
            }
        }
    }
}

/// Running statistics of one query row.
#[derive(Clone, Copy)]
struct RowState<T> {
    m: T,
    l: T,
    /// The factor the row's partial output is rescaled by at this block.
    alpha: T,
}

/// The forward: (output (b, h, s, d), row maxima (b, h, s), row sums (b, h, s)).
#[allow(clippy::too_many_arguments)]
fn forward<T: Float>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&MaskView<T>>,
    dims: Dims,
    scale: f64,
    blocks: Blocks,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let Dims { b, heads, s, d, .. } = dims;
    let (br, bc) = (blocks.queries.max(1), blocks.keys.max(1));
    let scale_t = T::from_f64(scale);
    let mut out = vec![T::zero(); b * heads * s * d];
    let mut m_all = vec![T::lowest(); b * heads * s];
    let mut l_all = vec![T::zero(); b * heads * s];
    let ranges = key_ranges(mask, dims, br);
    for (bi, i0) in (0..s).step_by(br).enumerate() {
        let r = br.min(s - i0);
        let qi = query_block(q, dims, i0, r)?;
        let rows = b * heads * r;
        let mut acc = vec![T::zero(); rows * d];
        let mut state = vec![
            RowState {
                m: T::lowest(),
                l: T::zero(),
                alpha: T::one(),
            };
            rows
        ];
        let (klo, khi) = ranges[bi];
        for j0 in (klo..khi).step_by(bc) {
            let c = bc.min(khi - j0);
            let scores = qi.matmul(&k.narrow(2, j0, c)?.t()?)?;
            let mut p = vec![T::zero(); rows * c];
            with_slice::<T, _>(&scores, |sc| {
                par_rows(&mut p, c, &mut state, |row, pr, st| {
                    let (bb, h, ii) = (row / (heads * r), (row / r) % heads, row % r);
                    let mrow = mask.map(|m| &m.row(bb, h, i0 + ii)[j0..j0 + c]);
                    masked_row(pr, &sc[row * c..][..c], mrow, scale_t);
                    let mut mx = T::lowest();
                    for &x in pr.iter() {
                        if x > mx {
                            mx = x;
                        }
                    }
                    let m_new = if st.m > mx { st.m } else { mx };
                    let mut sum = T::zero();
                    for x in pr.iter_mut() {
                        *x = (*x - m_new).exp();
                        sum += *x;
                    }
                    st.alpha = (st.m - m_new).exp();
                    st.l = st.l * st.alpha + sum;
                    st.m = m_new;
                });
                Ok(())
            })?;
            let p = Tensor::from_vec(p, (b, dims.kv_heads, dims.rep() * r, c), q.device())?;
            let pv = p.matmul(&v.narrow(2, j0, c)?)?;
            with_slice::<T, _>(&pv, |pv| {
                par_rows(&mut acc, d, &mut state, |row, ar, st| {
                    for (a, &x) in ar.iter_mut().zip(&pv[row * d..][..d]) {
                        *a = *a * st.alpha + x;
                    }
                });
                Ok(())
            })?;
        }
        // Normalise and scatter the block's rows into (b, h, s, d).
        for (row, st) in state.iter().enumerate() {
            let (bh, ii) = (row / r, row % r);
            let g = bh * s + i0 + ii;
            m_all[g] = st.m;
            l_all[g] = st.l;
            let inv = T::one() / st.l;
            for (o, &a) in out[g * d..][..d].iter_mut().zip(&acc[row * d..][..d]) {
                *o = a * inv;
            }
        }
    }
    Ok((out, m_all, l_all))
}

/// Which gradients the backward computes.
#[derive(Clone, Copy)]
struct Want {
    q: bool,
    k: bool,
    v: bool,
}

/// Add `src` (b, kv_heads, c, d) into rows `[j0, j0 + c)` of `dst` (b, kv_heads, t, d).
fn add_key_rows<T: Float>(dst: &mut [T], src: &[T], dims: Dims, j0: usize, c: usize) {
    let (t, d) = (dims.t, dims.d);
    dst.par_chunks_mut(t * d)
        .zip(src.par_chunks(c * d))
        .for_each(|(dr, sr)| {
            for (o, &x) in dr[j0 * d..(j0 + c) * d].iter_mut().zip(sr) {
                *o += x;
            }
        });
}

/// The backward: (dq, dk, dv), each empty when not wanted.
#[allow(clippy::too_many_arguments)]
fn backward<T: Float>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    grad: &Tensor,
    m_all: &[T],
    l_all: &[T],
    mask: Option<&MaskView<T>>,
    dims: Dims,
    scale: f64,
    blocks: Blocks,
    want: Want,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let Dims {
        b,
        heads,
        kv_heads,
        s,
        t,
        d,
    } = dims;
    let rep = dims.rep();
    let (br, bc) = (blocks.queries.max(1), blocks.keys.max(1));
    let scale_t = T::from_f64(scale);
    // D = rowsum(dO ⊙ O), (b, h, s).
    let mut big_d = vec![T::zero(); b * heads * s];
    with_slice::<T, _>(grad, |g| {
        with_slice::<T, _>(o, |ov| {
            let mut unit = vec![(); big_d.len()];
            par_rows(&mut big_d, 1, &mut unit, |row, dd, _| {
                let mut acc = T::zero();
                for (&x, &y) in g[row * d..][..d].iter().zip(&ov[row * d..][..d]) {
                    acc += x * y;
                }
                dd[0] = acc;
            });
            Ok(())
        })
    })?;
    let mut dq = if want.q {
        vec![T::zero(); b * heads * s * d]
    } else {
        Vec::new()
    };
    let mut dk = if want.k {
        vec![T::zero(); b * kv_heads * t * d]
    } else {
        Vec::new()
    };
    let mut dv = if want.v {
        vec![T::zero(); b * kv_heads * t * d]
    } else {
        Vec::new()
    };
    let ranges = key_ranges(mask, dims, br);
    for (bi, i0) in (0..s).step_by(br).enumerate() {
        let r = br.min(s - i0);
        let qi = query_block(q, dims, i0, r)?;
        let gi = query_block(grad, dims, i0, r)?;
        let rows = b * heads * r;
        let shape = (b, kv_heads, rep * r);
        let (klo, khi) = ranges[bi];
        for j0 in (klo..khi).step_by(bc) {
            let c = bc.min(khi - j0);
            let kj = k.narrow(2, j0, c)?;
            let vj = v.narrow(2, j0, c)?;
            // P, recomputed from the saved row statistics.
            let scores = qi.matmul(&kj.t()?)?;
            let mut p = vec![T::zero(); rows * c];
            let mut unit = vec![(); rows];
            with_slice::<T, _>(&scores, |sc| {
                par_rows(&mut p, c, &mut unit, |row, pr, _| {
                    let (bb, h, ii) = (row / (heads * r), (row / r) % heads, row % r);
                    let g = (bb * heads + h) * s + i0 + ii;
                    let mrow = mask.map(|m| &m.row(bb, h, i0 + ii)[j0..j0 + c]);
                    masked_row(pr, &sc[row * c..][..c], mrow, scale_t);
                    let (mx, inv) = (m_all[g], T::one() / l_all[g]);
                    for x in pr.iter_mut() {
                        *x = (*x - mx).exp() * inv;
                    }
                });
                Ok(())
            })?;
            let p = Tensor::from_vec(p, (shape.0, shape.1, shape.2, c), q.device())?;
            if want.v {
                let dvj = p.t()?.matmul(&gi)?;
                with_slice::<T, _>(&dvj, |x| {
                    add_key_rows(&mut dv, x, dims, j0, c);
                    Ok(())
                })?;
            }
            if !(want.q || want.k) {
                continue;
            }
            // dS = P ⊙ (dP − D) · scale, with dP = dO·vᵀ.
            let dp = gi.matmul(&vj.t()?)?;
            let mut ds = vec![T::zero(); rows * c];
            with_slice::<T, _>(&p, |pv| {
                with_slice::<T, _>(&dp, |dpv| {
                    par_rows(&mut ds, c, &mut unit, |row, dr, _| {
                        let (bb, h, ii) = (row / (heads * r), (row / r) % heads, row % r);
                        let dd = big_d[(bb * heads + h) * s + i0 + ii];
                        let (pr, dpr) = (&pv[row * c..][..c], &dpv[row * c..][..c]);
                        for ((o, &pi), &gpi) in dr.iter_mut().zip(pr).zip(dpr) {
                            *o = pi * (gpi - dd) * scale_t;
                        }
                    });
                    Ok(())
                })
            })?;
            let ds = Tensor::from_vec(ds, (shape.0, shape.1, shape.2, c), q.device())?;
            if want.q {
                let dqi = ds.matmul(&kj)?;
                with_slice::<T, _>(&dqi, |x| {
                    // x rows are (b, h, ii); dq rows (b, h, s).
                    dq.par_chunks_mut(s * d)
                        .zip(x.par_chunks(r * d))
                        .for_each(|(dr, xr)| {
                            for (o, &y) in dr[i0 * d..(i0 + r) * d].iter_mut().zip(xr) {
                                *o += y;
                            }
                        });
                    Ok(())
                })?;
            }
            if want.k {
                let dkj = ds.t()?.matmul(&qi)?;
                with_slice::<T, _>(&dkj, |x| {
                    add_key_rows(&mut dk, x, dims, j0, c);
                    Ok(())
                })?;
            }
        }
    }
    Ok((dq, dk, dv))
}

/// The forward's value, computed before the op is applied and handed out by its forward.
enum Value {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(Tensor),
}

/// The op: the forward is computed by [`flash_attention_with_blocks`] on detached inputs and
/// handed out by `cpu_fwd` (moved, not copied) or `cuda_fwd` (one copy); the backward recomputes
/// from the inputs, the output and the saved row statistics.
struct FlashAttention {
    value: Mutex<Option<Value>>,
    /// Row maxima and sums, (b, h, s) each, of the compute dtype (f32 on a GPU).
    m: Tensor,
    l: Tensor,
    mask: Option<Tensor>,
    scale: f64,
    blocks: Blocks,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let value = self
            .value
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match value {
            Some(Value::Cpu(v)) => Ok((v, l1.shape().clone())),
            #[cfg(feature = "cuda")]
            Some(Value::Cuda(_)) => bail!("flash attention: a GPU value on the CPU"),
            None => bail!("flash attention: the forward ran twice"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let value = self
            .value
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let o = match value {
            Some(Value::Cuda(o)) => o,
            Some(Value::Cpu(_)) => bail!("flash attention: a CPU value on the GPU"),
            None => bail!("flash attention: the forward ran twice"),
        };
        let (storage, layout) = o.storage_and_layout();
        let Storage::Cuda(c) = &*storage else {
            bail!("flash attention: the GPU value is not on the GPU")
        };
        Ok((super::fused_cuda::copy(c, layout)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = Want {
            q: q.track_op(),
            k: k.track_op(),
            v: v.track_op(),
        };
        if !(want.q || want.k || want.v) {
            return Ok((None, None, None));
        }
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), res.detach());
        let grad = grad.detach().to_dtype(q.dtype())?.contiguous()?;
        let dims = dims_of(&q, &k, &v)?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            return gpu::backward(self, (&q, &k, &v), &o.contiguous()?, &grad, dims, want);
        }
        macro_rules! run {
            ($t:ty) => {{
                let mask = self
                    .mask
                    .as_ref()
                    .map(|m| mask_view::<$t>(m, dims))
                    .transpose()?;
                with_slice::<$t, _>(&self.m, |m| {
                    with_slice::<$t, _>(&self.l, |l| {
                        let (dq, dk, dv) = backward::<$t>(
                            &q,
                            &k,
                            &v,
                            &o,
                            &grad,
                            m,
                            l,
                            mask.as_ref(),
                            dims,
                            self.scale,
                            self.blocks,
                            want,
                        )?;
                        let t = |x: Vec<$t>, like: &Tensor, on: bool| {
                            on.then(|| Tensor::from_vec(x, like.shape(), like.device()))
                                .transpose()
                        };
                        Ok((t(dq, &q, want.q)?, t(dk, &k, want.k)?, t(dv, &v, want.v)?))
                    })
                })
            }};
        }
        match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => bail!("flash attention backward: unsupported dtype {d:?}"),
        }
    }
}

/// Whether [`flash_attention`] runs for queries `q` (b, heads, s, d) on their device: any float
/// dtype on the CPU; with the `cuda` feature, f32, bf16 or f16 with a head dimension of at most
/// 128 on a GPU (the kernels of `src/ml/cuda/flash.cu`). Elsewhere the model keeps its composed
/// attention.
pub fn device_supported(q: &Tensor) -> bool {
    if q.device().is_cpu() {
        return q.dtype().is_float();
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return gpu::supported(q);
    }
    false
}

/// The op on a GPU: the kernels of `src/ml/cuda/flash.cu` (launched by `flash_cuda.rs`) as
/// graph-less ops, the forward's value handed to [`FlashAttention`] as on the CPU. The tiles are
/// the kernels' own (16 queries × 32 keys forward, 16 keys per block backward); `blocks` only
/// matters on the CPU.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::ml::flash_cuda as kern;

    pub(super) fn supported(q: &Tensor) -> bool {
        kern::dtype_supported(q.dtype())
            && q.dims4()
                .is_ok_and(|(b, h, _, d)| (1..=kern::MAX_HEAD_DIM).contains(&d) && b * h <= 65535)
    }

    fn kdims(d: Dims) -> kern::Dims {
        kern::Dims {
            b: d.b,
            heads: d.heads,
            kv_heads: d.kv_heads,
            s: d.s,
            t: d.t,
            d: d.d,
        }
    }

    fn cuda_of(s: &Storage) -> Result<&candle_core::CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => bail!("flash attention: a tensor of the GPU op is not on the GPU"),
        }
    }

    /// Run `f` with the mask (f32, contiguous) as the kernels' argument.
    fn with_mask<R>(
        mask: Option<&Tensor>,
        dims: Dims,
        f: impl FnOnce(Option<kern::Mask<'_>>) -> Result<R>,
    ) -> Result<R> {
        let Some(m) = mask else { return f(None) };
        let strides = mask_strides(m.dims(), dims)?;
        if m.dtype() != DType::F32 {
            bail!("flash attention: the GPU kernels take an f32 mask");
        }
        let (storage, layout) = m.storage_and_layout();
        let Some((start, _)) = layout.contiguous_offsets() else {
            bail!("flash attention: the mask must be contiguous")
        };
        f(Some(kern::Mask {
            storage: cuda_of(&storage)?,
            start,
            strides,
        }))
    }

    /// (q, k, v) → (b, heads, s, d + 2) f32: each output row, then its `m` and `l`.
    struct Forward {
        mask: Option<Tensor>,
        dims: Dims,
        scale: f64,
    }

    impl CustomOp3 for Forward {
        fn name(&self) -> &'static str {
            "flash-attention-cuda-forward"
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
            bail!("flash attention: this op runs on a GPU only")
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
            let Dims { b, heads, s, d, .. } = self.dims;
            let out = with_mask(self.mask.as_ref(), self.dims, |m| {
                kern::forward(
                    (s1, l1),
                    (s2, l2),
                    (s3, l3),
                    m,
                    kdims(self.dims),
                    self.scale,
                )
            })?;
            Ok((out, Shape::from((b, heads, s, d + 2))))
        }
    }

    /// (q, k, v) → one vector of q's dtype: dq, dk, dv flattened one after another.
    struct Backward {
        o: Tensor,
        grad: Tensor,
        m: Tensor,
        l: Tensor,
        mask: Option<Tensor>,
        dims: Dims,
        scale: f64,
    }

    impl CustomOp3 for Backward {
        fn name(&self) -> &'static str {
            "flash-attention-cuda-backward"
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
            bail!("flash attention backward: this op runs on a GPU only")
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
            let (os, ol) = self.o.storage_and_layout();
            let (gs, gl) = self.grad.storage_and_layout();
            let (ms, ml) = self.m.storage_and_layout();
            let (ls, ll) = self.l.storage_and_layout();
            let x = kern::Backward {
                q: (s1, l1),
                k: (s2, l2),
                v: (s3, l3),
                o: (cuda_of(&os)?, ol),
                g: (cuda_of(&gs)?, gl),
                m: (cuda_of(&ms)?, ml),
                l: (cuda_of(&ls)?, ll),
            };
            let n = l1.shape().elem_count() + 2 * l2.shape().elem_count();
            let out = with_mask(self.mask.as_ref(), self.dims, |m| {
                kern::backward(x, m, kdims(self.dims), self.scale)
            })?;
            Ok((out, Shape::from(n)))
        }
    }

    fn contiguous(x: &Tensor) -> Result<Tensor> {
        if x.is_contiguous() {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    }

    pub(super) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f64,
        dims: Dims,
        blocks: Blocks,
    ) -> Result<Tensor> {
        let dtype = q.dtype();
        if !supported(q) {
            bail!(
                "flash attention: no CUDA kernel for {dtype:?} queries {:?} (f32, bf16 or f16, \
                 head dimension at most {}); set runtime.kernels to \"lora\" or \"off\" to use \
                 the composed attention",
                q.dims(),
                kern::MAX_HEAD_DIM
            );
        }
        let prep = |x: &Tensor| contiguous(&x.to_dtype(dtype)?);
        let (q, k, v) = (prep(q)?, prep(k)?, prep(v)?);
        if dims.s == 0 {
            return Tensor::zeros(q.shape(), dtype, q.device());
        }
        let mask = mask
            .map(|m| contiguous(&m.to_dtype(DType::F32)?.detach()))
            .transpose()?;
        let work = q.detach().apply_op3_no_bwd(
            &k.detach(),
            &v.detach(),
            &Forward {
                mask: mask.clone(),
                dims,
                scale,
            },
        )?;
        let d = dims.d;
        let stats = (dims.b, dims.heads, dims.s);
        let o = contiguous(&work.narrow(3, 0, d)?.to_dtype(dtype)?)?;
        let m = work.narrow(3, d, 1)?.contiguous()?.reshape(stats)?;
        let l = work.narrow(3, d + 1, 1)?.contiguous()?.reshape(stats)?;
        drop(work);
        let op = FlashAttention {
            value: Mutex::new(Some(Value::Cuda(o))),
            m,
            l,
            mask,
            scale,
            blocks,
        };
        q.apply_op3(&k, &v, op)
    }

    type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

    pub(super) fn backward(
        op: &FlashAttention,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        grad: &Tensor,
        dims: Dims,
        want: Want,
    ) -> Result<Grads> {
        let packed = contiguous(q)?.apply_op3_no_bwd(
            &contiguous(k)?,
            &contiguous(v)?,
            &Backward {
                o: o.clone(),
                grad: grad.clone(),
                m: op.m.clone(),
                l: op.l.clone(),
                mask: op.mask.clone(),
                dims,
                scale: op.scale,
            },
        )?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let part = |on: bool, at: usize, n: usize, like: &Tensor| {
            on.then(|| {
                packed
                    .narrow(0, at, n)
                    .and_then(|x| x.reshape(like.shape()))
            })
            .transpose()
        };
        Ok((
            part(want.q, 0, nq, q)?,
            part(want.k, nq, nk, k)?,
            part(want.v, nq + nk, nk, v)?,
        ))
    }
}

/// `softmax(q·kᵀ·scale + mask)·v` without the score matrix: `q` (b, heads, s, d), `k` and `v`
/// (b, kv_heads, t, d) with `heads` a multiple of `kv_heads`, `mask` additive and broadcastable
/// to (b, heads, s, t). Differentiable in q, k and v (the mask gets no gradient). On the CPU
/// f32 and f64 are computed in their own dtype, other dtypes in f32, and the result has q's
/// dtype; block sizes from [`Blocks::auto`]. On a GPU (where [`device_supported`]) the CUDA
/// kernels run in q's dtype with f32 accumulation.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let dims = dims_of(q, k, v)?;
    let blocks = Blocks::auto(dims.b * dims.heads, dims.s, dims.t);
    flash_attention_with_blocks(q, k, v, mask, scale, blocks)
}

/// [`flash_attention`] with explicit block sizes (the tests use small ones to cross many block
/// edges).
pub fn flash_attention_with_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    blocks: Blocks,
) -> Result<Tensor> {
    let dims = dims_of(q, k, v)?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return gpu::forward(q, k, v, mask, scale, dims, blocks);
    }
    if !q.device().is_cpu() {
        bail!(
            "flash attention: no kernel for {:?} in this build; set runtime.kernels to \"lora\" \
             or \"off\" to use the composed attention on this device",
            q.device()
        );
    }
    let dtype = q.dtype();
    let cd = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let prep = |x: &Tensor| -> Result<Tensor> {
        let x = x.to_dtype(cd)?;
        if x.is_contiguous() {
            Ok(x)
        } else {
            x.contiguous()
        }
    };
    let (q, k, v) = (prep(q)?, prep(k)?, prep(v)?);
    if dims.s == 0 {
        return Tensor::zeros(q.shape(), dtype, q.device());
    }
    let mask = mask.map(|m| m.to_dtype(cd)).transpose()?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let stats_shape = (dims.b, dims.heads, dims.s);
    macro_rules! run {
        ($t:ty, $variant:ident) => {{
            let mv = mask
                .as_ref()
                .map(|m| mask_view::<$t>(m, dims))
                .transpose()?;
            let (o, m, l) = forward::<$t>(&qd, &kd, &vd, mv.as_ref(), dims, scale, blocks)?;
            (
                CpuStorage::$variant(o),
                Tensor::from_vec(m, stats_shape, q.device())?,
                Tensor::from_vec(l, stats_shape, q.device())?,
            )
        }};
    }
    let (value, m, l) = match cd {
        DType::F64 => run!(f64, F64),
        _ => run!(f32, F32),
    };
    let op = FlashAttention {
        value: Mutex::new(Some(Value::Cpu(value))),
        m,
        l,
        mask,
        scale,
        blocks,
    };
    q.apply_op3(&k, &v, op)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::llama::{attention_mask, attention_probs_composed};
    use crate::ml::rng::Rng;
    use candle_core::{Device, Var};

    fn randn(rng: &mut Rng, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n, 1.0), shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
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

    /// The composed reference: k, v expanded over the grouped heads, the full score matrix,
    /// the composed masked softmax, `p·v`.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, h, _, d) = q.dims4()?;
        let (_, kvh, t, _) = k.dims4()?;
        let expand = |z: &Tensor| -> Result<Tensor> {
            z.unsqueeze(2)?
                .broadcast_as((b, kvh, h / kvh, t, d))?
                .reshape((b, h, t, d))
        };
        let scores = q.matmul(&expand(k)?.t()?)?;
        attention_probs_composed(&scores, mask, scale)?.matmul(&expand(v)?)
    }

    /// A case: b 2, heads 4 over 2 key heads, s new positions after t − s cached ones, the
    /// second row left-padded by `pad` (its first query rows see no key at all when s = t).
    struct Case {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor,
    }

    fn case(seed: u64, s: usize, t: usize, pad: usize, d: usize, dtype: DType) -> Case {
        let mut rng = Rng::new(seed);
        let valid = vec![vec![true; t], (0..t).map(|j| j >= pad).collect()];
        let mask = attention_mask(&valid, s, &Device::Cpu)
            .and_then(|m| m.to_dtype(dtype))
            .expect("mask");
        Case {
            q: randn(&mut rng, &[2, 4, s, d], dtype),
            k: randn(&mut rng, &[2, 2, t, d], dtype),
            v: randn(&mut rng, &[2, 2, t, d], dtype),
            mask,
        }
    }

    const SMALL: Blocks = Blocks {
        queries: 3,
        keys: 4,
    };

    #[test]
    fn forward_matches_composed_attention() -> Result<()> {
        // (s, t, pad): training (s = t, padding at the start so some rows see nothing), a
        // prefill, KV-cache steps with one and several new positions; sizes not multiples of
        // the blocks.
        for (s, t, pad) in [(7, 7, 3), (10, 10, 0), (1, 9, 2), (4, 11, 5), (5, 5, 0)] {
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
                let c = case(s as u64 * 31 + t as u64, s, t, pad, 6, dtype);
                let want = composed(&c.q, &c.k, &c.v, &c.mask, 0.4)?;
                for blocks in [
                    SMALL,
                    Blocks {
                        queries: 1,
                        keys: 1,
                    },
                    Blocks::auto(8, s, t),
                ] {
                    let got =
                        flash_attention_with_blocks(&c.q, &c.k, &c.v, Some(&c.mask), 0.4, blocks)?;
                    assert_eq!(got.dtype(), dtype);
                    let err = max_diff(&got, &want);
                    assert!(
                        err < tol,
                        "s {s} t {t} pad {pad} {dtype:?} {blocks:?}: {err}"
                    );
                }
            }
        }
        // No mask, and a mask broadcast over the batch; bf16 inputs computed in f32.
        let c = case(5, 6, 8, 0, 4, DType::F32);
        let zero = Tensor::zeros((1, 1, 6, 8), DType::F32, &Device::Cpu)?;
        let want = composed(&c.q, &c.k, &c.v, &zero, 0.5)?;
        let got = flash_attention_with_blocks(&c.q, &c.k, &c.v, None, 0.5, SMALL)?;
        assert!(max_diff(&got, &want) < 2e-6);
        let got = flash_attention_with_blocks(&c.q, &c.k, &c.v, Some(&zero), 0.5, SMALL)?;
        assert!(max_diff(&got, &want) < 2e-6);
        let bf = |x: &Tensor| x.to_dtype(DType::BF16);
        let got = flash_attention(&bf(&c.q)?, &bf(&c.k)?, &bf(&c.v)?, None, 0.5)?;
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_diff(&got, &want) < 0.05);
        Ok(())
    }

    #[test]
    fn block_ranges_skip_the_causal_future_and_the_padding() {
        let dims = Dims {
            b: 2,
            heads: 4,
            kv_heads: 2,
            s: 6,
            t: 9,
            d: 2,
        };
        let one = Dims { b: 1, ..dims };
        for (pad, both, padded_only) in [
            // Query i sees keys ≤ 3 + i (3 cached positions): block [0, 2) sees [0, 5), block
            // [2, 4) [0, 7); the padded row alone starts at its first valid key.
            (2, [(0, 5), (0, 7), (0, 9)], [(2, 5), (2, 7), (2, 9)]),
            // Queries 0 and 1 of the padded row see only padding: their block takes all keys.
            (5, [(0, 9), (0, 7), (0, 9)], [(0, 9), (5, 7), (5, 9)]),
        ] {
            let valid = vec![vec![true; 9], (0..9).map(|j| j >= pad).collect()];
            let mask = attention_mask(&valid, 6, &Device::Cpu).expect("mask");
            let mv = mask_view::<f32>(&mask, dims).expect("view");
            assert_eq!(key_ranges(Some(&mv), dims, 2), both);
            let row = mask.narrow(0, 1, 1).expect("row");
            let mv = mask_view::<f32>(&row, one).expect("view");
            assert_eq!(key_ranges(Some(&mv), one, 2), padded_only);
        }
        assert_eq!(key_ranges::<f32>(None, dims, 4), [(0, 9), (0, 9)]);
    }

    /// Gradients of `Σ attention(q, k, v) ⊙ up` for q, k and v: flash vs composed, and flash vs
    /// central finite differences on every entry (f64). With left padding and s = t the first
    /// queries of the padded row see no key: their scores plus `f32::MIN` round to the mask
    /// value, so finite differences see a zero slope there while both autograd paths
    /// differentiate `x·scale + mask` (slope `scale`); that case is checked against the
    /// composed gradients only.
    #[test]
    fn backward_matches_composed_and_finite_differences() -> Result<()> {
        for (s, t, pad, fd) in [(5, 5, 2, false), (5, 5, 0, true), (3, 7, 2, true)] {
            let c = case(40 + s as u64, s, t, pad, 4, DType::F64);
            let vars = [&c.q, &c.k, &c.v].map(|x| Var::from_tensor(x).expect("var"));
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
            let mut rng = Rng::new(9);
            let up = randn(&mut rng, q.dims(), DType::F64);
            let flash = |q: &Tensor, k: &Tensor, v: &Tensor| {
                flash_attention_with_blocks(q, k, v, Some(&c.mask), 0.45, SMALL)
            };
            let loss = |y: Tensor| (y * &up)?.sum_all();
            let g = loss(flash(&q, &k, &v)?)?.backward()?;
            let g_ref = loss(composed(&q, &k, &v, &c.mask, 0.45)?)?.backward()?;
            for (i, var) in vars.iter().enumerate() {
                let ga = g.get(var.as_tensor()).expect("flash gradient");
                let gr = g_ref.get(var.as_tensor()).expect("composed gradient");
                let err = max_diff(ga, gr);
                assert!(err < 1e-10, "s {s} t {t} input {i}: {err} from composed");
                if !fd {
                    continue;
                }
                let analytic = values(ga);
                let base = values(var.as_tensor());
                let eps = 1e-6;
                let at = |vals: &[f64]| -> f64 {
                    let x = Tensor::from_vec(vals.to_vec(), var.dims(), &Device::Cpu).expect("x");
                    let mut args = [q.detach(), k.detach(), v.detach()];
                    args[i] = x;
                    let y = flash(&args[0], &args[1], &args[2]).expect("forward");
                    values(&loss(y).expect("loss"))[0]
                };
                for j in 0..base.len() {
                    let mut p = base.clone();
                    p[j] += eps;
                    let plus = at(&p);
                    p[j] = base[j] - eps;
                    let numeric = (plus - at(&p)) / (2.0 * eps);
                    let err = (numeric - analytic[j]).abs() / analytic[j].abs().max(1.0);
                    assert!(err < 1e-7, "input {i}[{j}]: {} vs {numeric}", analytic[j]);
                }
            }
        }
        Ok(())
    }

    /// Only the inputs that need a gradient get one; f32 gradients agree with the composed ops
    /// on a shape that splits into several blocks with the automatic block sizes.
    #[test]
    fn f32_gradients_match_composed_and_frozen_inputs_get_none() -> Result<()> {
        let c = case(77, 40, 40, 9, 8, DType::F32);
        let q = Var::from_tensor(&c.q)?;
        let v = Var::from_tensor(&c.v)?;
        let blocks = Blocks {
            queries: 16,
            keys: 12,
        };
        let y = flash_attention_with_blocks(
            q.as_tensor(),
            &c.k,
            v.as_tensor(),
            Some(&c.mask),
            0.3,
            blocks,
        )?;
        let y_ref = composed(q.as_tensor(), &c.k, v.as_tensor(), &c.mask, 0.3)?;
        assert!(max_diff(&y, &y_ref) < 2e-6);
        let g = y.sum_all()?.backward()?;
        let g_ref = y_ref.sum_all()?.backward()?;
        assert!(g.get(&c.k).is_none(), "k is no var: no gradient");
        for var in [&q, &v] {
            let (a, b) = (g.get(var.as_tensor()), g_ref.get(var.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("a gradient is missing")
            };
            assert!(max_diff(a, b) < 1e-5);
        }
        Ok(())
    }

    /// The CUDA side cannot run here, so its plumbing is checked as text: every kernel of
    /// `cuda/flash.cu` is instantiated for each dtype and launched by `flash_cuda.rs` with as many
    /// arguments as its declaration has parameters, and the tile sizes the launches use for the
    /// grid and the shared memory are the ones the kernels are compiled with.
    #[test]
    fn the_cuda_launches_match_the_kernels() {
        let cu = include_str!("cuda/flash.cu");
        let rs = include_str!("flash_cuda.rs");
        let mut kernels = Vec::new();
        for rest in cu.split("extern \"C\" __global__ void ").skip(1) {
            let (name, params) = rest.split_once("_##SFX(").expect("a kernel name");
            let params = params.split_once(')').expect("a parameter list").0;
            kernels.push((name, params.matches(',').count() + 1));
        }
        let names: Vec<&str> = kernels.iter().map(|k| k.0).collect();
        assert_eq!(
            names,
            ["flash_fwd", "flash_bwd_dot", "flash_bwd", "flash_cast"]
        );
        for (name, params) in kernels {
            let at = rs
                .find(&format!("func(&dev, \"{name}\", T::SUFFIX)"))
                .unwrap_or_else(|| panic!("flash_cuda.rs never loads {name}"));
            let launch = &rs[at..];
            let launch = &launch[..launch.find(".launch(").expect("a launch")];
            assert_eq!(
                launch.matches(".arg(").count(),
                params,
                "{name}: arguments pushed vs parameters declared"
            );
        }
        for sfx in ["(float, f32)", "(__nv_bfloat16, bf16)", "(__half, f16)"] {
            assert!(cu.contains(&format!("INSTANTIATE{sfx}")), "{sfx}");
        }
        let define = |name: &str| -> usize {
            let line = cu
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("#define {name}"));
            let value = line.split_whitespace().nth(2).expect("a value");
            value.parse().unwrap_or_else(|_| panic!("{name} = {value}"))
        };
        for (cu_name, rs_const) in [
            ("FL_RPW", "const FWD_ROWS: usize = 16;"),
            ("FL_BC", "const FWD_KEYS: usize = 32;"),
            ("FB_BC", "const BWD_KEYS: usize = 16;"),
            ("FL_DMAX", "pub const MAX_HEAD_DIM: usize = 128;"),
            ("FL_WARPS", "const THREADS: usize = 128;"),
        ] {
            assert!(rs.contains(rs_const), "{rs_const}");
            let want: usize = rs_const
                .trim_end_matches(';')
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("a number");
            let got = match cu_name {
                "FL_RPW" => define("FL_RPW") * define("FL_WARPS"),
                "FL_WARPS" => define("FL_WARPS") * 32,
                other => define(other),
            };
            assert_eq!(got, want, "{cu_name} vs {rs_const}");
        }
        // The forward's shared memory at the largest head dimension stays under the 48 KiB a
        // launch gets without opting in.
        let d = define("FL_DMAX");
        let fwd = (16 * d + 32 * (d + 1) + 32 * d) * 4;
        let bwd = (2 * 16 * (d + 1) + 2 * 16 * d + 2 * define("FL_WARPS") * d) * 4;
        assert!(fwd <= 48 * 1024 && bwd <= 48 * 1024, "{fwd} {bwd}");
    }

    /// On the CPU the op takes every float dtype; a GPU has its own rule (flash_cuda.rs).
    #[test]
    fn the_cpu_takes_every_float_dtype() -> Result<()> {
        for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            assert!(device_supported(&Tensor::zeros(
                (1, 2, 3, 4),
                dt,
                &Device::Cpu
            )?));
        }
        let ids = Tensor::zeros((1, 2, 3, 4), DType::U32, &Device::Cpu)?;
        assert!(!device_supported(&ids));
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let mut rng = Rng::new(1);
        let q = randn(&mut rng, &[1, 3, 2, 4], DType::F32);
        let k = randn(&mut rng, &[1, 2, 5, 4], DType::F32);
        let err = flash_attention(&q, &k, &k, None, 1.0).expect_err("3 heads over 2");
        assert!(err.to_string().contains("heads a multiple"), "{err}");
        let k = randn(&mut rng, &[1, 1, 5, 4], DType::F32);
        let bad = Tensor::zeros((1, 1, 2, 4), DType::F32, &Device::Cpu).expect("mask");
        let err = flash_attention(&q, &k, &k, Some(&bad), 1.0).expect_err("mask of 4 keys");
        assert!(err.to_string().contains("does not broadcast"), "{err}");
    }
}
