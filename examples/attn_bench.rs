//! Time and peak memory of one attention forward + backward on the CPU: the blocked
//! online-softmax op (`coin::ml::flash`, what `runtime.kernels = "on"` runs) against the
//! score-matrix path (q·kᵀ, the fused masked softmax, p·v) and the fully composed one. Each
//! invocation measures one path, so the peak resident memory (`VmHWM`) is that path's; run the
//! paths in separate processes (bench/attention.sh does).
//!
//! ```text
//! cargo run --release --example attn_bench -- --path flash --batch 8 --heads 32 --seq 704 --head-dim 64
//! ```
//!
//! Prints one JSON object: the path, the shape, seconds per forward + backward (median of the
//! timed repetitions), the resident memory before the first pass and its peak.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;

use coin::ml::flash::flash_attention;
use coin::ml::fused::{with_kernels, Kernels};
use coin::ml::llama::{attention_mask, attention_probs};
use coin::ml::rng::Rng;

/// The allocator of the `coin` binary, so the numbers are those of coin's own commands.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One attention forward + backward, timed
#[derive(Parser, Debug)]
#[command(name = "attn_bench")]
struct Args {
    /// flash, scores (q·kᵀ + fused softmax + p·v) or composed (all plain tensor ops)
    #[arg(long, value_parser = ["flash", "scores", "composed"])]
    path: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// Key/value heads (grouped-query attention); default: as many as heads
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Positions (s = t, causal mask)
    #[arg(long, default_value_t = 528)]
    seq: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed repetitions (after one untimed)
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

type Error = Box<dyn std::error::Error>;

/// Resident memory now and at its peak (Linux `VmRSS`, `VmHWM`), in bytes.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> Result<(), Error> {
    let a = Args::parse();
    let kvh = a.kv_heads.unwrap_or(a.heads);
    let (b, h, s, d) = (a.batch, a.heads, a.seq, a.head_dim);
    let dev = Device::Cpu;
    let mut rng = Rng::new(0);
    let mut randn = |shape: (usize, usize, usize, usize)| -> Result<Var, Error> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Ok(Var::from_tensor(
            &Tensor::from_vec(rng.normal_vec(n, 1.0), shape, &dev)?.to_dtype(DType::F32)?,
        )?)
    };
    let q = randn((b, h, s, d))?;
    let k = randn((b, kvh, s, d))?;
    let v = randn((b, kvh, s, d))?;
    let up = randn((b, h, s, d))?.as_tensor().detach();
    let mask = attention_mask(&vec![vec![true; s]; b], s, &dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let kernels = if a.path == "composed" {
        Kernels::Lora
    } else {
        Kernels::On
    };
    let pass = || -> Result<f64, Error> {
        let start = Instant::now();
        let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let o = if a.path == "flash" {
            flash_attention(q, k, v, Some(&mask), scale)?
        } else {
            let expand = |z: &Tensor| -> candle_core::Result<Tensor> {
                z.unsqueeze(2)?
                    .broadcast_as((b, kvh, h / kvh, s, d))?
                    .reshape((b, h, s, d))
            };
            let p = attention_probs(&q.matmul(&expand(k)?.t()?)?, &mask, scale)?;
            p.matmul(&expand(v)?)?
        };
        let grads = (o * &up)?.sum_all()?.backward()?;
        if grads.get(q).is_none() {
            return Err("no query gradient".into());
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let (rss_before, _) = rss();
    let mut times = with_kernels(Some(kernels), || -> Result<Vec<f64>, Error> {
        pass()?;
        (0..a.reps).map(|_| pass()).collect()
    })?;
    times.sort_by(f64::total_cmp);
    let (_, peak) = rss();
    let out = serde_json::json!({
        "path": a.path,
        "batch": b, "heads": h, "kv_heads": kvh, "seq": s, "head_dim": d,
        "seconds_fwd_bwd": times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "threads": rayon::current_num_threads(),
    });
    println!("{out}");
    Ok(())
}
