//! Check the CUDA kernels of coin's fused ops (src/ml/cuda/fused.cu) against the CPU kernels:
//! the first step of `scripts/gpu-check.sh`. Built only with the `cuda` feature:
//!
//! ```text
//! cargo build --release --features cuda --example cuda_kernel_check
//! cuda_kernel_check [--no-timing]
//! ```
//!
//! For each op (RMSNorm with a frozen and a trained weight, masked softmax, RoPE on a transposed
//! view, SwiGLU, the dropout mask product, the LoRA linear with and without a dropout mask, the
//! blocked attention of src/ml/cuda/flash.cu) and each dtype (f32, bf16, f16): random inputs rounded to the dtype, the op on the GPU in that
//! dtype and on the CPU in f32 from the same values; the value and the gradients of
//! `Σ y·up` (through candle's backward) compared. Prints the largest absolute error and the
//! largest error relative to the reference's largest magnitude, PASS or FAIL against the
//! dtype's tolerance; exits 1 on any FAIL. Then (unless `--no-timing`) times forward + backward
//! of the fused ops and of the blocked attention against candle's composed ops on the GPU, bf16,
//! at LLaVA-7B shapes.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use coin::ml::flash;
use coin::ml::fused::{self, Kernels};
use coin::ml::llama::{
    apply_rope_composed, attention_mask, attention_probs_composed, flash_enabled, rope_tables,
    swiglu_composed, RmsNorm,
};
use coin::ml::rng::Rng;

/// Tolerance on the error relative to the reference's largest magnitude, per dtype: f32 sums in
/// another order; bf16 keeps 8 significant bits, f16 11, and the backward sees the upstream
/// gradient and saved values rounded too.
fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::BF16 => 3e-2,
        DType::F16 => 5e-3,
        _ => 1e-4,
    }
}

fn randn(rng: &mut Rng, shape: &[usize], std: f64) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(rng.normal_vec(n, std), shape, &Device::Cpu)
}

fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// (largest |a − b|, that over the largest |b|).
fn errors(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let (a, b) = (f32_values(a)?, f32_values(b)?);
    let mut abs = 0f64;
    let mut scale = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (*x as f64 - *y as f64).abs();
        abs = if d.is_nan() {
            f64::INFINITY
        } else {
            abs.max(d)
        };
        scale = scale.max((*y as f64).abs());
    }
    Ok((abs, abs / scale.max(1e-30)))
}

struct Report {
    failures: usize,
    checks: usize,
}

impl Report {
    fn line(&mut self, op: &str, dt: DType, what: &str, (abs, rel): (f64, f64)) {
        let tol = tolerance(dt);
        let ok = rel <= tol;
        self.checks += 1;
        if !ok {
            self.failures += 1;
        }
        println!(
            "{op:<22} {:<5} {what:<10} max_abs {abs:<12.3e} max_rel {rel:<12.3e} tol {tol:<8.0e} {}",
            format!("{dt:?}").to_lowercase(),
            if ok { "PASS" } else { "FAIL" }
        );
    }
}

/// Run `f` on `inputs` (CPU f32 tensors) on the GPU in `dt` and on the CPU in f32 from the same
/// rounded values; inputs flagged in `diff` are vars. Compares the value and the gradients of
/// `Σ f(x)·up`.
fn compare(
    report: &mut Report,
    op: &str,
    dt: DType,
    gpu: &Device,
    inputs: &[Tensor],
    diff: &[bool],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let rounded: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(dt)?.to_dtype(DType::F32))
        .collect::<Result<_>>()?;
    let run = |dev: &Device, dtype: DType| -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let vars: Vec<Option<Var>> = rounded
            .iter()
            .zip(diff)
            .map(|(t, &d)| {
                let t = t.to_dtype(dtype)?.to_device(dev)?;
                if d {
                    Var::from_tensor(&t).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<_>>()?;
        let args: Vec<Tensor> = rounded
            .iter()
            .zip(&vars)
            .map(|(t, v)| match v {
                Some(v) => Ok(v.as_tensor().clone()),
                None => t.to_dtype(dtype)?.to_device(dev),
            })
            .collect::<Result<_>>()?;
        let y = fused::with_kernels(Some(Kernels::On), || f(&args))?;
        let mut rng = Rng::new(99);
        let up = randn(&mut rng, y.dims(), 1.0)?
            .to_dtype(dt)?
            .to_dtype(DType::F32)?
            .to_device(dev)?;
        let loss = (y.to_dtype(DType::F32)? * up)?.sum_all()?;
        let grads = loss.backward()?;
        let g = vars
            .iter()
            .map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned()))
            .collect();
        Ok((y, g))
    };
    let (y_gpu, g_gpu) = run(gpu, dt)?;
    let (y_cpu, g_cpu) = run(&Device::Cpu, DType::F32)?;
    if y_gpu.dtype() != dt || !y_gpu.device().is_cuda() {
        candle_core::bail!(
            "{op}: the GPU result is {:?} on {:?}",
            y_gpu.dtype(),
            y_gpu.device()
        );
    }
    report.line(op, dt, "forward", errors(&y_gpu, &y_cpu)?);
    for (k, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => report.line(op, dt, &format!("grad[{k}]"), errors(a, b)?),
            (None, None) => {}
            _ => {
                report.failures += 1;
                println!("{op:<22} {dt:?} grad[{k}]: present on one device only  FAIL");
            }
        }
    }
    Ok(())
}

fn correctness(gpu: &Device) -> Result<Report> {
    let mut report = Report {
        failures: 0,
        checks: 0,
    };
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let mut rng = Rng::new(1);
        // RMSNorm: 2 × 67 rows of 1000 (not a multiple of the block), weight frozen, then trained.
        let x = randn(&mut rng, &[2, 67, 1000], 1.0)?;
        let w = (randn(&mut rng, &[1000], 0.1)? + 1.0)?;
        let norm = |a: &[Tensor]| fused::rms_norm(&a[0], &a[1], 1e-5);
        let (xw, d) = ([x.clone(), w.clone()], [true, false]);
        compare(&mut report, "rms_norm", dt, gpu, &xw, &d, &norm)?;
        compare(
            &mut report,
            "rms_norm+weight",
            dt,
            gpu,
            &[x, w],
            &[true, true],
            &norm,
        )?;

        // Masked softmax: (b 2, heads 3, 45 queries after 5 cached keys), row 2 padded at the end.
        let valid = vec![vec![true; 50], (0..50).map(|j| j < 41).collect()];
        let mask = attention_mask(&valid, 45, &Device::Cpu)?;
        let s = randn(&mut rng, &[2, 3, 45, 50], 3.0)?;
        let sm = |a: &[Tensor]| fused::masked_softmax(&a[0], &a[1], 0.125);
        compare(
            &mut report,
            "masked_softmax",
            dt,
            gpu,
            &[s, mask],
            &[true, false],
            &sm,
        )?;

        // RoPE on the (b, s, h, d) → (b, h, s, d) transposed view, tables broadcast over heads.
        let pos = Tensor::from_vec((0..74u32).map(|i| i % 37).collect(), (2, 37), &Device::Cpu)?;
        let (cos, sin) = rope_tables(&pos, 64, 10000.0)?;
        let q = randn(&mut rng, &[2, 37, 4, 64], 1.0)?;
        let rope = |a: &[Tensor]| fused::rope(&a[0].transpose(1, 2)?, &a[1], &a[2]);
        compare(
            &mut report,
            "rope",
            dt,
            gpu,
            &[q, cos, sin],
            &[true, false, false],
            &rope,
        )?;

        // SwiGLU on an odd element count, both inputs trained, then the gate only.
        let g = randn(&mut rng, &[201, 103], 2.0)?;
        let u = randn(&mut rng, &[201, 103], 1.0)?;
        let sw = |a: &[Tensor]| fused::swiglu(&a[0], &a[1]);
        compare(
            &mut report,
            "swiglu",
            dt,
            gpu,
            &[g.clone(), u.clone()],
            &[true, true],
            &sw,
        )?;
        compare(
            &mut report,
            "swiglu(gate only)",
            dt,
            gpu,
            &[g, u],
            &[true, false],
            &sw,
        )?;

        // The dropout product with a constant 0 / (1/(1 − p)) mask, p = 0.25.
        let x = randn(&mut rng, &[97, 300], 1.0)?;
        let keep: Vec<f32> = (0..97 * 300)
            .map(|_| if rng.uniform() < 0.25 { 0.0 } else { 4.0 / 3.0 })
            .collect();
        let m = Tensor::from_vec(keep, (97, 300), &Device::Cpu)?;
        let mc = |a: &[Tensor]| fused::mul_const(&a[0], &a[1]);
        compare(
            &mut report,
            "dropout_mask",
            dt,
            gpu,
            &[x, m.clone()],
            &[true, false],
            &mc,
        )?;

        // The LoRA linear: x (50 × 64), frozen w (96 × 64), a (8 × 64), b (96 × 8), s = 2.
        let x = randn(&mut rng, &[50, 64], 1.0)?;
        let w = randn(&mut rng, &[96, 64], 0.125)?;
        let a = randn(&mut rng, &[8, 64], 0.125)?;
        let b = randn(&mut rng, &[96, 8], 0.125)?;
        let keep: Vec<f32> = (0..50 * 64)
            .map(|_| if rng.uniform() < 0.1 { 0.0 } else { 1.0 / 0.9 })
            .collect();
        let m = Tensor::from_vec(keep, (50, 64), &Device::Cpu)?;
        let lora = |t: &[Tensor]| fused::lora_linear(&t[0], &t[1], &t[2], &t[3], 2.0, None);
        let lora_masked = |t: &[Tensor]| {
            let mask = t[4].detach();
            fused::lora_linear(&t[0], &t[1], &t[2], &t[3], 2.0, Some(mask))
        };
        let inputs = [x, w, a, b, m];
        let d = [true, false, true, true];
        compare(&mut report, "lora_linear", dt, gpu, &inputs[..4], &d, &lora)?;
        let d = [true, false, true, true, false];
        compare(
            &mut report,
            "lora_linear+dropout",
            dt,
            gpu,
            &inputs,
            &d,
            &lora_masked,
        )?;
    }
    flash_checks(&mut report, gpu)?;
    // The setting gates the GPU path as it does the CPU one.
    let t = Tensor::zeros((2, 2), DType::BF16, gpu)?;
    let gate_on = fused::with_kernels(Some(Kernels::On), || fused::loop_kernels(&t));
    let gate_off = fused::with_kernels(Some(Kernels::Off), || fused::supported(&t));
    report.checks += 1;
    if gate_on && !gate_off {
        println!("runtime.kernels gates the GPU kernels (on: used, off: composed)   PASS");
    } else {
        report.failures += 1;
        println!("runtime.kernels gate on GPU: on={gate_on} off-supported={gate_off}   FAIL");
    }
    let q = Tensor::zeros((1, 32, 4, 128), DType::BF16, gpu)?;
    let flash_on = fused::with_kernels(Some(Kernels::On), || flash_enabled(&q));
    let flash_off = fused::with_kernels(Some(Kernels::Off), || flash_enabled(&q));
    let wide = Tensor::zeros((1, 2, 4, 256), DType::BF16, gpu)?;
    let wide_on = fused::with_kernels(Some(Kernels::On), || flash_enabled(&wide));
    report.checks += 1;
    if flash_on && !flash_off && !wide_on {
        println!(
            "runtime.kernels gates the GPU attention (on: blocked, off or d > 128: composed) PASS"
        );
    } else {
        report.failures += 1;
        println!("GPU attention gate: on={flash_on} off={flash_off} head-dim-256={wide_on}   FAIL");
    }
    Ok(report)
}

/// The blocked attention on the GPU (src/ml/cuda/flash.cu) against the CPU op of
/// src/ml/flash.rs on the same rounded q, k, v: the value and dq, dk, dv. The mask is f32 on both
/// devices (f32::MIN rounds to −∞ in bf16/f16, which the CPU reference would turn into NaN for a
/// row that sees nothing); one case also hands the GPU the mask in the run's dtype (−∞), which the
/// kernels clamp to f32::MIN.
fn flash_checks(report: &mut Report, gpu: &Device) -> Result<()> {
    // (name, b, heads, kv_heads, s, t, d, left padding of batch row 1, masked, mask in dtype):
    // training shapes with s = t not a multiple of the 16 × 32 tiles, left padding so the first
    // queries of row 1 see no key at all, grouped heads; KV-cache steps (s < t) with a head
    // dimension not a multiple of 32; one query; no mask at the largest head dimension.
    type Case = (
        &'static str,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        bool,
    );
    let cases: [Case; 6] = [
        ("flash gqa causal+pad", 2, 4, 2, 37, 37, 64, 5, true, false),
        ("flash -inf mask", 2, 4, 2, 37, 37, 64, 5, true, true),
        ("flash mha", 1, 3, 3, 70, 70, 32, 0, true, false),
        ("flash kv-cache d80", 2, 4, 1, 5, 45, 80, 3, true, false),
        ("flash one query", 2, 2, 2, 1, 19, 16, 4, true, false),
        ("flash no mask d128", 1, 2, 2, 20, 33, 128, 0, false, false),
    ];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let mut rng = Rng::new(3);
        for (name, b, heads, kv, s, t, d, pad, masked, mask_in_dt) in cases {
            let q = randn(&mut rng, &[b, heads, s, d], 1.0)?;
            let k = randn(&mut rng, &[b, kv, t, d], 1.0)?;
            let v = randn(&mut rng, &[b, kv, t, d], 1.0)?;
            let mut valid = vec![vec![true; t]; b];
            if b > 1 {
                valid[1] = (0..t).map(|j| j >= pad).collect();
            }
            let mask = attention_mask(&valid, s, &Device::Cpu)?;
            let scale = 1.0 / (d as f64).sqrt();
            let op = |a: &[Tensor]| {
                let dev = a[0].device();
                let m = if !masked {
                    None
                } else if mask_in_dt && dev.is_cuda() {
                    Some(mask.to_dtype(a[0].dtype())?.to_device(dev)?)
                } else {
                    Some(mask.to_device(dev)?)
                };
                flash::flash_attention(&a[0], &a[1], &a[2], m.as_ref(), scale)
            };
            compare(report, name, dt, gpu, &[q, k, v], &[true, true, true], &op)?;
        }
    }
    Ok(())
}

/// Seconds per call of `f` (forward and backward), after one warm-up call.
fn time(gpu: &Device, iters: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    gpu.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

/// Forward + backward (`Σ y`) of `op` on a var built from `x`.
fn fwd_bwd(x: &Var, op: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let y = op(x.as_tensor())?;
    let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    if g.get(x.as_tensor()).is_none() {
        candle_core::bail!("no gradient");
    }
    Ok(())
}

/// Fused vs composed on the GPU, bf16, LLaVA-7B shapes: batch 2 × 704 positions, hidden 4096,
/// 32 heads of 128, intermediate 11008.
fn timing(gpu: &Device) -> Result<()> {
    let dt = DType::BF16;
    let mut rng = Rng::new(5);
    let (b, s, heads, hd, hidden, inter) = (2, 704, 32, 128, 4096, 11008);
    let dev = |t: Tensor| -> Result<Tensor> { t.to_dtype(dt)?.to_device(gpu) };
    let x = Var::from_tensor(&dev(randn(&mut rng, &[b * s, hidden], 1.0)?)?)?;
    let w = dev((randn(&mut rng, &[hidden], 0.1)? + 1.0)?)?;
    let scores = Var::from_tensor(&dev(randn(&mut rng, &[b, heads, s, s], 1.0)?)?)?;
    let mask = attention_mask(&vec![vec![true; s]; b], s, &Device::Cpu)?;
    let mask = dev(mask)?;
    let pos = Tensor::from_vec(
        (0..(b * s) as u32).map(|i| i % s as u32).collect(),
        (b, s),
        gpu,
    )?;
    let (cos, sin) = rope_tables(&pos, hd, 10000.0)?;
    let (cos, sin) = (cos.to_dtype(dt)?, sin.to_dtype(dt)?);
    let q = Var::from_tensor(&dev(randn(&mut rng, &[b, s, heads, hd], 1.0)?)?)?;
    let gate = Var::from_tensor(&dev(randn(&mut rng, &[b * s, inter], 1.0)?)?)?;
    let up = dev(randn(&mut rng, &[b * s, inter], 1.0)?)?;
    let norm = RmsNorm::new(w.clone(), 1e-5);
    type Op<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;
    let cases: Vec<(&str, &Var, Op, Op)> = vec![
        (
            "rms_norm",
            &x,
            Box::new(|t| fused::rms_norm(t, &w, 1e-5)),
            Box::new(|t| norm.forward_composed(t)),
        ),
        (
            "masked_softmax",
            &scores,
            Box::new(|t| fused::masked_softmax(t, &mask, 0.088)),
            Box::new(|t| attention_probs_composed(t, &mask, 0.088)),
        ),
        (
            "rope",
            &q,
            Box::new(|t| fused::rope(&t.transpose(1, 2)?, &cos, &sin)),
            Box::new(|t| apply_rope_composed(&t.transpose(1, 2)?.contiguous()?, &cos, &sin)),
        ),
        (
            "swiglu",
            &gate,
            Box::new(|t| fused::swiglu(t, &up)),
            Box::new(|t| swiglu_composed(t, &up)),
        ),
    ];
    println!("\nforward + backward, bf16, batch {b} × {s} positions (LLaVA-7B shapes):");
    attention_timing(gpu, &mut rng)?;
    for (name, var, fused_op, composed_op) in &cases {
        let tf = time(gpu, 20, &|| fwd_bwd(var, fused_op.as_ref()))?;
        let tc = time(gpu, 20, &|| fwd_bwd(var, composed_op.as_ref()))?;
        println!(
            "{name:<16} fused {:>8.3} ms  composed {:>8.3} ms  speed-up {:.2}x",
            tf * 1e3,
            tc * 1e3,
            tc / tf
        );
    }
    Ok(())
}

/// Attention forward + backward (q, k, v trained) at LLaVA-7B shapes, bf16: the blocked kernels
/// against the composed scores → masked softmax (composed) → `p·v`.
fn attention_timing(gpu: &Device, rng: &mut Rng) -> Result<()> {
    let dt = DType::BF16;
    let (b, s, heads, hd) = (2, 704, 32, 128);
    let var = |rng: &mut Rng| -> Result<Var> {
        Var::from_tensor(
            &randn(rng, &[b, heads, s, hd], 1.0)?
                .to_dtype(dt)?
                .to_device(gpu)?,
        )
    };
    let (q, k, v) = (var(rng)?, var(rng)?, var(rng)?);
    let mask = attention_mask(&vec![vec![true; s]; b], s, gpu)?;
    let mask_dt = mask.to_dtype(dt)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let step = |blocked: bool| -> Result<()> {
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let y = if blocked {
            flash::flash_attention(qt, kt, vt, Some(&mask), scale)?
        } else {
            let scores = qt.matmul(&kt.t()?)?;
            attention_probs_composed(&scores, &mask_dt, scale)?.matmul(vt)?
        };
        let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        if g.get(qt).is_none() || g.get(kt).is_none() || g.get(vt).is_none() {
            candle_core::bail!("attention timing: a gradient is missing");
        }
        Ok(())
    };
    let tf = time(gpu, 10, &|| step(true))?;
    let tc = time(gpu, 10, &|| step(false))?;
    println!(
        "{:<16} fused {:>8.3} ms  composed {:>8.3} ms  speed-up {:.2}x  (32 heads of 128)",
        "attention",
        tf * 1e3,
        tc * 1e3,
        tc / tf
    );
    Ok(())
}

fn main() -> ExitCode {
    let timing_on = !std::env::args().any(|a| a == "--no-timing");
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: no CUDA device: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match correctness(&gpu) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "\n{} checks, {} failed: {}",
        report.checks,
        report.failures,
        if report.failures == 0 { "PASS" } else { "FAIL" }
    );
    if timing_on {
        if let Err(e) = timing(&gpu) {
            eprintln!("error: timing: {e}");
        }
    }
    if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
