//! The CUDA side of [`super::fused`] (built with the `cuda` feature only): launches the kernels
//! of `src/ml/cuda/fused.cu`, which build.rs compiles to PTX with nvcc and which are embedded
//! here and loaded once per device through candle's `CudaDevice::get_or_load_custom_func`.
//!
//! Each function takes contiguous (or, where named, strided) CUDA storages of one dtype — f32,
//! bf16 or f16 — and returns a fresh contiguous storage. The kernels widen every load to f32 and
//! accumulate in f32; only the stored value is rounded to the dtype.
//!
//! Launching a kernel is `unsafe` in cudarc (the argument list must match the kernel's
//! signature); each launch below passes exactly the parameters declared in fused.cu, in order.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "coin-fused";

/// The element types the kernels (these and `flash_cuda.rs`'s) are instantiated for.
pub(super) trait Elem: DeviceRepr + ValidAsZeroBits + CudaDType + Copy + 'static {
    const SUFFIX: &'static str;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl Elem for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// Whether the kernels (these and `flash_cuda.rs`'s) exist for `dtype`.
pub fn dtype_supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Run `$f::<T>($args)` for the storage dtype `$dt`.
macro_rules! by_dtype {
    ($dt:expr, $op:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dt {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            d => bail!("{}: no CUDA kernel for {d:?} (f32, bf16 and f16 only)", $op),
        }
    };
}

/// The kernel `{base}_{sfx}` of the embedded module (loaded once per device).
fn func(dev: &CudaDevice, base: &str, sfx: &str) -> Result<CudaFunction> {
    let f = dev.get_or_load_custom_func(&format!("{base}_{sfx}"), MODULE, PTX)?;
    Ok(f.into_cuda_function())
}

/// The contiguous elements of `s` under `l`.
fn view<'a, T: Elem>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// The whole buffer of `s` (for strided access with the layout's offsets).
fn whole<T: Elem>(s: &CudaStorage) -> Result<&CudaSlice<T>> {
    s.as_cuda_slice::<T>()
}

fn alloc<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel launched next (callers launch over all n).
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// One block per row: a multiple of 32 threads, at most 256, no more than the row needs.
fn rows_config(rows: usize, cols: usize) -> LaunchConfig {
    let threads = cols.div_ceil(32).clamp(1, 8) * 32;
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elems_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_grid(rows: usize, op: &str) -> Result<()> {
    if rows > i32::MAX as usize {
        bail!("{op}: {rows} rows exceed one CUDA grid");
    }
    Ok(())
}

/// Offsets of a 4-D strided operand, as the kernels' `Off4` (start, four strides).
pub type Off4 = [u64; 5];

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `y = x·r·w` per row of `h` (`x` contiguous rows × h, `w` contiguous h).
pub fn rms_norm_fwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        eps: f64,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let h = wl.shape().elem_count();
        let n = xl.shape().elem_count();
        let rows = n / h.max(1);
        check_grid(rows, "rms norm")?;
        let (xv, wv) = (view::<T>(x, xl, "rms norm")?, view::<T>(w, wl, "rms norm")?);
        let out = alloc::<T>(&dev, n)?;
        if rows > 0 && h > 0 {
            let f = func(&dev, "rms_norm_fwd", T::SUFFIX)?;
            let (h64, eps32) = (h as u64, eps as f32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&out).arg(&h64).arg(&eps32);
            // SAFETY: (x, w, y, h, eps) as declared in fused.cu; y has rows·h elements.
            unsafe { b.launch(rows_config(rows, h)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(x.dtype(), "rms norm", run(x, xl, w, wl, eps))
}

/// RMSNorm's input gradient `dx` for contiguous `x`, `w`, `g`.
pub fn rms_norm_bwd_dx(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        eps: f64,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let h = wl.shape().elem_count();
        let n = xl.shape().elem_count();
        let rows = n / h.max(1);
        check_grid(rows, "rms norm backward")?;
        let op = "rms norm backward";
        let (xv, wv, gv) = (
            view::<T>(x, xl, op)?,
            view::<T>(w, wl, op)?,
            view::<T>(g, gl, op)?,
        );
        let out = alloc::<T>(&dev, n)?;
        if rows > 0 && h > 0 {
            let f = func(&dev, "rms_norm_bwd", T::SUFFIX)?;
            let (h64, eps32) = (h as u64, eps as f32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&gv).arg(&out).arg(&h64).arg(&eps32);
            // SAFETY: (x, w, g, dx, h, eps) as declared in fused.cu.
            unsafe { b.launch(rows_config(rows, h)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(
        x.dtype(),
        "rms norm backward",
        run((x, xl), (w, wl), (g, gl), eps)
    )
}

/// RMSNorm's weight gradient `dw[j] = Σ_rows g·x·r` (h values), accumulated in f32.
pub fn rms_norm_bwd_dw(
    (x, xl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    h: usize,
    eps: f64,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        (x, xl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        h: usize,
        eps: f64,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        let rows = n / h.max(1);
        check_grid(rows, "rms norm weight gradient")?;
        let op = "rms norm weight gradient";
        let (xv, gv) = (view::<T>(x, xl, op)?, view::<T>(g, gl, op)?);
        let rrow = alloc::<f32>(&dev, rows)?;
        let dw32 = dev.alloc_zeros::<f32>(h.max(1))?;
        if rows > 0 && h > 0 {
            let (h64, eps32, rows64) = (h as u64, eps as f32, rows as u64);
            let f = func(&dev, "rms_norm_rrow", T::SUFFIX)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&rrow).arg(&h64).arg(&eps32);
            // SAFETY: (x, rrow, h, eps) as declared in fused.cu; rrow has one value per row.
            unsafe { b.launch(rows_config(rows, h)) }.w()?;
            // Columns across threads (coalesced), rows split into chunks of 64 over grid.y.
            let per_block = 64usize;
            let chunks = rows.div_ceil(per_block);
            let per64 = per_block as u64;
            let cfg = LaunchConfig {
                grid_dim: (h.div_ceil(256) as u32, chunks as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            if chunks > 65535 {
                bail!("rms norm weight gradient: {rows} rows exceed one CUDA grid");
            }
            let f = func(&dev, "rms_norm_dw", T::SUFFIX)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv)
                .arg(&gv)
                .arg(&rrow)
                .arg(&dw32)
                .arg(&rows64)
                .arg(&h64)
                .arg(&per64);
            // SAFETY: (x, g, rrow, dw, rows, h, rows_per_block) as declared in fused.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        cast_from_f32::<T>(&dev, dw32, h)
    }
    by_dtype!(
        x.dtype(),
        "rms norm weight gradient",
        run((x, xl), (g, gl), h, eps)
    )
}

/// An f32 buffer of `n` values as a storage of `T`.
fn cast_from_f32<T: Elem>(dev: &CudaDevice, src: CudaSlice<f32>, n: usize) -> Result<CudaStorage> {
    if T::SUFFIX == "f32" {
        return Ok(CudaStorage::wrap_cuda_slice(src, dev.clone()));
    }
    let out = alloc::<T>(dev, n)?;
    if n > 0 {
        let f = func(dev, "cast_from_f32", T::SUFFIX)?;
        let n64 = n as u64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&src).arg(&out).arg(&n64);
        // SAFETY: (src, dst, n) as declared in fused.cu.
        unsafe { b.launch(elems_config(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

// ---------------------------------------------------------------------------------------------
// Masked softmax

/// `softmax(s·scale + mask)` over the last dimension of contiguous scores (d0, d1, d2, t); the
/// mask addressed by `mask_off` (start and strides, 0 for a broadcast dimension).
pub fn masked_softmax_fwd(
    (s, sl): (&CudaStorage, &Layout),
    mask: &CudaStorage,
    mask_off: Off4,
    dims: [usize; 4],
    scale: f64,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        (s, sl): (&CudaStorage, &Layout),
        mask: &CudaStorage,
        mo: Off4,
        dims: [usize; 4],
        scale: f64,
    ) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let n = sl.shape().elem_count();
        let rows = dims[0] * dims[1] * dims[2];
        check_grid(rows, "masked softmax")?;
        let sv = view::<T>(s, sl, "masked softmax")?;
        let mv = whole::<T>(mask)?;
        let out = alloc::<T>(&dev, n)?;
        if rows > 0 && dims[3] > 0 {
            let f = func(&dev, "masked_softmax_fwd", T::SUFFIX)?;
            let (d1, d2, t) = (dims[1] as u64, dims[2] as u64, dims[3] as u64);
            let scale32 = scale as f32;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&sv).arg(mv).arg(&out).arg(&d1).arg(&d2).arg(&t);
            b.arg(&mo[0])
                .arg(&mo[1])
                .arg(&mo[2])
                .arg(&mo[3])
                .arg(&mo[4]);
            b.arg(&scale32);
            // SAFETY: (s, mask, p, d1, d2, t, mstart, m0..m3, scale) as declared in fused.cu.
            unsafe { b.launch(rows_config(rows, dims[3])) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(
        s.dtype(),
        "masked softmax",
        run((s, sl), mask, mask_off, dims, scale)
    )
}

/// `ds = scale·p·(g − Σ g·p)` per row of `t`, `p` and `g` contiguous.
pub fn masked_softmax_bwd(
    (p, pl): (&CudaStorage, &Layout),
    (g, gl): (&CudaStorage, &Layout),
    t: usize,
    scale: f64,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        (p, pl): (&CudaStorage, &Layout),
        (g, gl): (&CudaStorage, &Layout),
        t: usize,
        scale: f64,
    ) -> Result<CudaStorage> {
        let dev = p.device().clone();
        let n = pl.shape().elem_count();
        let rows = n / t.max(1);
        check_grid(rows, "masked softmax backward")?;
        let op = "masked softmax backward";
        let (pv, gv) = (view::<T>(p, pl, op)?, view::<T>(g, gl, op)?);
        let out = alloc::<T>(&dev, n)?;
        if rows > 0 && t > 0 {
            let f = func(&dev, "masked_softmax_bwd", T::SUFFIX)?;
            let (t64, scale32) = (t as u64, scale as f32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&pv).arg(&gv).arg(&out).arg(&t64).arg(&scale32);
            // SAFETY: (p, g, ds, t, scale) as declared in fused.cu.
            unsafe { b.launch(rows_config(rows, t)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(
        p.dtype(),
        "masked softmax backward",
        run((p, pl), (g, gl), t, scale)
    )
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// The rotate-half rotary embedding of a strided `x` (d0, d1, d2, d) into a contiguous result;
/// `cos` and `sin` strided. With `backward`, `x` is the contiguous output gradient and the
/// result is the input gradient.
pub fn rope(
    x: &CudaStorage,
    x_off: Off4,
    (cos, cos_off): (&CudaStorage, Off4),
    (sin, sin_off): (&CudaStorage, Off4),
    dims: [usize; 4],
    backward: bool,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        x: &CudaStorage,
        xo: Off4,
        (cos, co): (&CudaStorage, Off4),
        (sin, so): (&CudaStorage, Off4),
        dims: [usize; 4],
        backward: bool,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let n: usize = dims.iter().product();
        let pairs = n / 2;
        check_grid(pairs.div_ceil(256), "rope")?;
        let (xv, cv, sv) = (whole::<T>(x)?, whole::<T>(cos)?, whole::<T>(sin)?);
        let out = alloc::<T>(&dev, n)?;
        if pairs > 0 {
            let (np, d1, d2, d) = (pairs as u64, dims[1] as u64, dims[2] as u64, dims[3] as u64);
            let name = if backward { "rope_bwd" } else { "rope_fwd" };
            let f = func(&dev, name, T::SUFFIX)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(xv).arg(cv).arg(sv).arg(&out);
            b.arg(&np).arg(&d1).arg(&d2).arg(&d);
            if !backward {
                b.arg(&xo);
            }
            b.arg(&co).arg(&so);
            // SAFETY: rope_fwd (x, cos, sin, y, n_pairs, d1, d2, d, xo, co, so) and rope_bwd
            // (g, cos, sin, dx, n_pairs, d1, d2, d, co, so) as declared in fused.cu, Off4 being
            // five u64 (start, strides).
            unsafe { b.launch(elems_config(pairs)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(
        x.dtype(),
        "rope",
        run(x, x_off, (cos, cos_off), (sin, sin_off), dims, backward)
    )
}

// ---------------------------------------------------------------------------------------------
// SwiGLU and the constant-mask product

/// `silu(g)·u` elementwise (contiguous, one shape).
pub fn swiglu_fwd(
    (g, gl): (&CudaStorage, &Layout),
    (u, ul): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    binary("swiglu_fwd", (g, gl), (u, ul))
}

/// `x·m` elementwise (contiguous, one shape).
pub fn mul_const(
    (x, xl): (&CudaStorage, &Layout),
    (m, ml): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    binary("mul_const", (x, xl), (m, ml))
}

fn binary(
    kernel: &'static str,
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        kernel: &'static str,
        (a, al): (&CudaStorage, &Layout),
        (b, bl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = a.device().clone();
        let n = al.shape().elem_count();
        if a.dtype() != b.dtype() {
            bail!("{kernel}: operands of {:?} and {:?}", a.dtype(), b.dtype());
        }
        if bl.shape().elem_count() != n {
            bail!(
                "{kernel}: operands of {:?} and {:?}",
                al.shape(),
                bl.shape()
            );
        }
        check_grid(n.div_ceil(256), kernel)?;
        let (av, bv) = (view::<T>(a, al, kernel)?, view::<T>(b, bl, kernel)?);
        let out = alloc::<T>(&dev, n)?;
        if n > 0 {
            let f = func(&dev, kernel, T::SUFFIX)?;
            let n64 = n as u64;
            let stream = dev.cuda_stream();
            let mut bld = stream.launch_builder(&f);
            bld.arg(&av).arg(&bv).arg(&out).arg(&n64);
            // SAFETY: (a, b, y, n) as declared in fused.cu.
            unsafe { bld.launch(elems_config(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(a.dtype(), kernel, run(kernel, (a, al), (b, bl)))
}

/// SwiGLU's gradients in one buffer of 2n values (`dg` then `du`), or n (`dg` only).
pub fn swiglu_bwd(
    (g, gl): (&CudaStorage, &Layout),
    (u, ul): (&CudaStorage, &Layout),
    (grad, grl): (&CudaStorage, &Layout),
    want_du: bool,
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        (g, gl): (&CudaStorage, &Layout),
        (u, ul): (&CudaStorage, &Layout),
        (grad, grl): (&CudaStorage, &Layout),
        want_du: bool,
    ) -> Result<CudaStorage> {
        let dev = g.device().clone();
        let n = gl.shape().elem_count();
        check_grid(n.div_ceil(256), "swiglu backward")?;
        let op = "swiglu backward";
        let (gv, uv, rv) = (
            view::<T>(g, gl, op)?,
            view::<T>(u, ul, op)?,
            view::<T>(grad, grl, op)?,
        );
        let out = alloc::<T>(&dev, if want_du { 2 * n } else { n })?;
        if n > 0 {
            let name = if want_du {
                "swiglu_bwd"
            } else {
                "swiglu_bwd_dg"
            };
            let f = func(&dev, name, T::SUFFIX)?;
            let n64 = n as u64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&gv).arg(&uv).arg(&rv).arg(&out).arg(&n64);
            // SAFETY: (g, u, grad, out, n) as declared in fused.cu; out holds 2n (or n) values.
            unsafe { b.launch(elems_config(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(
        g.dtype(),
        "swiglu backward",
        run((g, gl), (u, ul), (grad, grl), want_du)
    )
}

/// A copy of a contiguous storage (the LoRA linear hands out its precomputed value).
pub fn copy(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    fn run<T: Elem>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let v = view::<T>(s, l, "copy")?;
        let n = l.shape().elem_count();
        let mut out = alloc::<T>(&dev, n)?;
        if n > 0 {
            dev.memcpy_dtod(&v, &mut out)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    by_dtype!(s.dtype(), "copy", run(s, l))
}
