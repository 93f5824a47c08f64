//! The CUDA side of [`super::flash`] (built with the `cuda` feature only): launches the kernels
//! of `src/ml/cuda/flash.cu`, which build.rs compiles to PTX with nvcc and which are embedded
//! here and loaded once per device through candle's `CudaDevice::get_or_load_custom_func`.
//!
//! The inputs are contiguous CUDA storages of one dtype (f32, bf16 or f16); the mask and the
//! saved row statistics are f32. The kernels widen every load to f32 and accumulate in f32.
//!
//! Launching a kernel is `unsafe` in cudarc (the argument list must match the kernel's
//! signature); each launch below passes exactly the parameters declared in flash.cu, in order.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const MODULE: &str = "coin-flash";

/// The largest head dimension the kernels take (`FL_DMAX` in flash.cu).
pub const MAX_HEAD_DIM: usize = 128;
/// Threads per block (`FL_WARPS` · 32).
const THREADS: usize = 128;
/// Query rows per forward block (`FL_BR`), keys per forward tile (`FL_BC`) and per backward
/// block (`FB_BC`).
const FWD_ROWS: usize = 16;
const FWD_KEYS: usize = 32;
const BWD_KEYS: usize = 16;
/// Warps per block (`FL_WARPS`).
const WARPS: usize = THREADS / 32;
/// The largest grid y dimension.
const GRID_Y: usize = 65535;

pub use super::fused_cuda::dtype_supported;
use super::fused_cuda::Elem;

/// The shapes of one call: q (b, heads, s, d), k and v (b, kv_heads, t, d).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
}

/// The additive f32 mask: its storage, the start of its contiguous elements, and the element
/// strides of its batch, head and query dimensions (0 where broadcast; keys are contiguous).
pub struct Mask<'a> {
    pub storage: &'a CudaStorage,
    pub start: usize,
    pub strides: [usize; 3],
}

/// A storage and its layout.
pub type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// Run `$f::<T>($args)` for the storage dtype `$dt`.
macro_rules! by_dtype {
    ($dt:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dt {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            d => bail!("flash attention: no CUDA kernel for {d:?} (f32, bf16 and f16 only)"),
        }
    };
}

fn func(dev: &CudaDevice, base: &str, sfx: &str) -> Result<CudaFunction> {
    let f = dev.get_or_load_custom_func(&format!("{base}_{sfx}"), MODULE, PTX)?;
    Ok(f.into_cuda_function())
}

/// The contiguous elements of `(s, l)` as `T`.
fn view<'a, T: Elem>((s, l): Arg<'a>, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("flash attention: {what} must be contiguous"),
    }
}

fn check(dims: Dims, grid_y: usize) -> Result<()> {
    if dims.d == 0 || dims.d > MAX_HEAD_DIM {
        bail!(
            "flash attention: head dimension {} is outside the CUDA kernel's 1..={MAX_HEAD_DIM}",
            dims.d
        );
    }
    if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
        bail!(
            "flash attention: {} heads are not a multiple of {} key heads",
            dims.heads,
            dims.kv_heads
        );
    }
    if grid_y > GRID_Y {
        bail!("flash attention: {grid_y} (batch, head) pairs exceed one CUDA grid ({GRID_Y})");
    }
    Ok(())
}

/// The mask's view and its (has_mask, strides) arguments; without a mask a one-element dummy.
fn mask_args<'a>(
    mask: Option<&Mask<'a>>,
    dims: Dims,
    dummy: &'a CudaSlice<f32>,
) -> Result<(CudaView<'a, f32>, [u64; 4])> {
    match mask {
        Some(m) => {
            let all = m.storage.as_cuda_slice::<f32>()?;
            let [sb, sh, ss] = m.strides;
            // The last element any kernel reads, plus one.
            let end = m.start
                + (dims.b.max(1) - 1) * sb
                + (dims.heads.max(1) - 1) * sh
                + (dims.s.max(1) - 1) * ss
                + dims.t;
            if end > all.len() {
                bail!(
                    "flash attention: the mask holds {} values, the strides {:?} reach {end}",
                    all.len(),
                    m.strides
                );
            }
            Ok((all.slice(m.start..), [1, sb as u64, sh as u64, ss as u64]))
        }
        None => Ok((dummy.slice(0..1), [0; 4])),
    }
}

/// The forward: one f32 buffer of b·heads·s rows of `d + 2` values, the output row then the
/// row's maximum `m` and sum `l`.
pub fn forward(
    q: Arg,
    k: Arg,
    v: Arg,
    mask: Option<Mask>,
    dims: Dims,
    scale: f64,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        q: Arg,
        k: Arg,
        v: Arg,
        mask: Option<Mask>,
        dims: Dims,
        scale: f64,
    ) -> Result<CudaStorage> {
        let Dims {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        } = dims;
        check(dims, b * heads)?;
        let dev = q.0.device().clone();
        let (qv, kv, vv) = (view::<T>(q, "q")?, view::<T>(k, "k")?, view::<T>(v, "v")?);
        let (nq, nk) = (b * heads * s * d, b * kv_heads * t * d);
        for (what, len, want) in [
            ("q", qv.len(), nq),
            ("k", kv.len(), nk),
            ("v", vv.len(), nk),
        ] {
            if len != want {
                bail!("flash attention: {what} has {len} values, not {want}");
            }
        }
        let out = dev.alloc_zeros::<f32>((b * heads * s * (d + 2)).max(1))?;
        if b * heads * s == 0 || t == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev));
        }
        let dummy = dev.alloc_zeros::<f32>(1)?;
        let (mv, [has, sb, sh, ss]) = mask_args(mask.as_ref(), dims, &dummy)?;
        let f = func(&dev, "flash_fwd", T::SUFFIX)?;
        let (h64, kvh64, s64, t64, d64) =
            (heads as u64, kv_heads as u64, s as u64, t as u64, d as u64);
        let scale32 = scale as f32;
        let shared = (FWD_ROWS * d + FWD_KEYS * (d + 1) + FWD_KEYS * d) * 4;
        let cfg = LaunchConfig {
            grid_dim: (s.div_ceil(FWD_ROWS) as u32, (b * heads) as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&mv).arg(&out);
        bld.arg(&h64).arg(&kvh64).arg(&s64).arg(&t64).arg(&d64);
        bld.arg(&has).arg(&sb).arg(&sh).arg(&ss).arg(&scale32);
        // SAFETY: (q, k, v, mask, out, heads, kv_heads, s, t, d, has_mask, ms_b, ms_h, ms_s,
        // scale) as declared in flash.cu; out holds b·heads·s·(d + 2) values, q, k, v and the
        // mask were checked contiguous of the shapes in `dims` by the caller.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(q.0.dtype(), run(q, k, v, mask, dims, scale))
}

/// The inputs of the backward: q, k, v, the output `o` and its gradient `g` (all of one dtype,
/// contiguous), the forward's row maxima `m` and sums `l` (f32, b·heads·s each).
pub struct Backward<'a> {
    pub q: Arg<'a>,
    pub k: Arg<'a>,
    pub v: Arg<'a>,
    pub o: Arg<'a>,
    pub g: Arg<'a>,
    pub m: Arg<'a>,
    pub l: Arg<'a>,
}

/// The backward: one buffer of q's dtype holding dq (b·heads·s·d), then dk and dv
/// (b·kv_heads·t·d each).
pub fn backward(x: Backward, mask: Option<Mask>, dims: Dims, scale: f64) -> Result<CudaStorage> {
    fn run<T: Elem>(
        x: Backward,
        mask: Option<Mask>,
        dims: Dims,
        scale: f64,
    ) -> Result<CudaStorage> {
        let Dims {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        } = dims;
        check(dims, b * kv_heads)?;
        let dev = x.q.0.device().clone();
        let (nq, nk) = (b * heads * s * d, b * kv_heads * t * d);
        let rows = b * heads * s;
        let (qv, kv, vv, ov, gv) = (
            view::<T>(x.q, "q")?,
            view::<T>(x.k, "k")?,
            view::<T>(x.v, "v")?,
            view::<T>(x.o, "the output")?,
            view::<T>(x.g, "the output gradient")?,
        );
        let (mv_, lv) = (
            view::<f32>(x.m, "the row maxima")?,
            view::<f32>(x.l, "the row sums")?,
        );
        for (what, len, want) in [
            ("q", qv.len(), nq),
            ("k", kv.len(), nk),
            ("v", vv.len(), nk),
            ("the output", ov.len(), nq),
            ("the output gradient", gv.len(), nq),
            ("the row maxima", mv_.len(), rows),
            ("the row sums", lv.len(), rows),
        ] {
            if len != want {
                bail!("flash attention backward: {what} has {len} values, not {want}");
            }
        }
        let out = dev.alloc_zeros::<T>((nq + 2 * nk).max(1))?;
        if rows == 0 || nk == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev));
        }
        let stream = dev.cuda_stream();
        // D = rowsum(dO ⊙ O).
        let dd = dev.alloc_zeros::<f32>(rows)?;
        {
            let f = func(&dev, "flash_bwd_dot", T::SUFFIX)?;
            let (rows64, d64) = (rows as u64, d as u64);
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            if rows.div_ceil(WARPS) > i32::MAX as usize {
                bail!("flash attention backward: {rows} rows exceed one CUDA grid");
            }
            let mut bld = stream.launch_builder(&f);
            bld.arg(&gv).arg(&ov).arg(&dd).arg(&rows64).arg(&d64);
            // SAFETY: (g, o, dd, rows, d) as declared in flash.cu; g and o hold rows·d values,
            // dd rows.
            unsafe { bld.launch(cfg) }.w()?;
        }
        // dq (f32, atomics across key blocks), dk and dv (into out).
        let dq = dev.alloc_zeros::<f32>(nq)?;
        {
            let dummy = dev.alloc_zeros::<f32>(1)?;
            let (maskv, [has, sb, sh, ss]) = mask_args(mask.as_ref(), dims, &dummy)?;
            let f = func(&dev, "flash_bwd", T::SUFFIX)?;
            let (dk_off, dv_off) = (nq as u64, (nq + nk) as u64);
            let (h64, kvh64, s64, t64, d64) =
                (heads as u64, kv_heads as u64, s as u64, t as u64, d as u64);
            let scale32 = scale as f32;
            let shared = (2 * BWD_KEYS * (d + 1) + 2 * BWD_KEYS * d + 2 * WARPS * d) * 4;
            let cfg = LaunchConfig {
                grid_dim: (t.div_ceil(BWD_KEYS) as u32, (b * kv_heads) as u32, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            let mut bld = stream.launch_builder(&f);
            bld.arg(&qv).arg(&kv).arg(&vv).arg(&gv);
            bld.arg(&mv_)
                .arg(&lv)
                .arg(&dd)
                .arg(&maskv)
                .arg(&dq)
                .arg(&out);
            bld.arg(&dk_off).arg(&dv_off);
            bld.arg(&h64).arg(&kvh64).arg(&s64).arg(&t64).arg(&d64);
            bld.arg(&has).arg(&sb).arg(&sh).arg(&ss).arg(&scale32);
            // SAFETY: (q, k, v, g, ms, ls, dd, mask, dq, out, dk_off, dv_off, heads, kv_heads, s,
            // t, d, has_mask, ms_b, ms_h, ms_s, scale) as declared in flash.cu; the lengths were
            // checked above, out holds nq + 2·nk values.
            unsafe { bld.launch(cfg) }.w()?;
        }
        {
            let f = func(&dev, "flash_cast", T::SUFFIX)?;
            let n64 = nq as u64;
            let cfg = LaunchConfig {
                grid_dim: (nq.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            if nq.div_ceil(256) > i32::MAX as usize {
                bail!("flash attention backward: {nq} values exceed one CUDA grid");
            }
            let mut bld = stream.launch_builder(&f);
            bld.arg(&dq).arg(&out).arg(&n64);
            // SAFETY: (src, dst, n) as declared in flash.cu; dq has nq values and out at least
            // nq (its first nq are dq's place).
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(x.q.0.dtype(), run(x, mask, dims, scale))
}
