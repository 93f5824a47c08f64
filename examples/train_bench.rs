//! Time training steps of coin's library trainer on a model directory: the benchmark harness
//! behind `bench/train.sh` (beside PyTorch+PEFT, `scripts/bench_train_hf.py`) and the training
//! steps of `scripts/gpu-check.sh`. Not part of the `coin` binary.
//!
//! ```text
//! cargo run --release --example train_bench -- --model DIR [--batch 8] [--seq-len 64] …
//! cargo build --release --features cuda --example train_bench   # the GPU build
//! ```
//!
//! Two data sources: synthetic rows (`--seq-len` text tokens around one image, the second half
//! supervised, token ids from the seed — the shape bench/train.sh gives PyTorch too), or a
//! CoIN task folder (`--data DIR --task-dir NAME`, e.g. CoIN-mini) for loss comparisons.
//! Prints one JSON object on stdout (pretty-printed): engine, device, dtype, losses, gradient
//! norms, step times, steps/s, tokens/s, CPU seconds per step, the process's peak RSS and the
//! steps' own peak (`steps_peak_rss_bytes`, `VmHWM` reset when the steps start; minus
//! `rss_before_steps_bytes`: what the steps add to the loaded model). Activation
//! checkpointing follows `runtime.checkpointing` (`--set runtime.checkpointing=on|off`, or
//! `COIN_CHECKPOINTING`); `bench/train.sh checkpointing` runs both and prints the ratios.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use coin::ml::image::{AspectMode, ImageProcessor};
use coin::ml::llava::{load_model, ModelSource, Segment};
use coin::ml::rng::Rng;
use coin::ml::runtime::Runtime;
use coin::ml::train::batch::TrainExample;
use coin::ml::train::data::{positions, prepare_samples, Labeling, Sample};
use coin::ml::train::loss::IGNORE_INDEX;
use coin::ml::train::optim::Schedule;
use coin::ml::train::params::{AdapterKind, AdapterSettings, TrainableParams};
use coin::ml::train::trainer::{train, StepInfo, TrainConfig, TrainProgress};
use coin::store::fsutil::write_atomic;
use coin::tasks::formats::read_train_file;
use coin::workflow::config::{ConfigSources, RunConfig};

/// The allocator of the `coin` binary, so the numbers are those of coin's own commands.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Time training steps of the built-in trainer (benchmarks, GPU checks)
#[derive(Parser, Debug)]
#[command(name = "train_bench")]
struct Args {
    /// The model directory (llava-hf layout)
    #[arg(long)]
    model: PathBuf,
    /// lora or moelora
    #[arg(long, default_value = "lora", value_parser = ["lora", "moelora"])]
    method: String,
    /// Total rank r
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// lora_alpha
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// MoELoRA experts
    #[arg(long, default_value_t = 2)]
    experts: usize,
    /// Adapter dropout
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// Rows per step
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Text tokens per synthetic row (the image adds its patches)
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Timed steps
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Learning rate (constant)
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// cpu or cuda (shorthand for --set runtime.device=...; default: cuda when built with it
    /// and present)
    #[arg(long, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
    /// Weight dtype: f32, bf16 or f16 (shorthand for --set runtime.dtype=...; default: bf16 on
    /// a GPU, f32 on the CPU)
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
    /// Override a [runtime] setting, e.g. --set runtime.shards=1 (the environment variables of
    /// docs/config.md apply too); repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A CoIN-format data folder instead of synthetic rows (with --task-dir)
    #[arg(long, requires = "task_dir")]
    data: Option<PathBuf>,
    /// The task folder under DATA/Instructions_Original (e.g. VizWiz)
    #[arg(long, requires = "data")]
    task_dir: Option<String>,
    /// Seed of data, adapter init and dropout
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The decoder's attention with runtime.kernels = on: flash (blocked, no score matrix, the
    /// default) or scores (q·kᵀ, fused softmax, p·v), to measure one against the other
    #[arg(long, default_value = "flash", value_parser = ["flash", "scores"])]
    attention: String,
}

type Error = Box<dyn std::error::Error>;

struct Timer {
    last: Instant,
    last_cpu: f64,
    times: Vec<f64>,
    cpu_times: Vec<f64>,
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
}

impl TrainProgress for Timer {
    fn begin(&mut self, _total: usize, _start: usize) {
        self.last = Instant::now();
        self.last_cpu = process_cpu_seconds().unwrap_or(0.0);
    }
    fn step(&mut self, info: &StepInfo) {
        let now = Instant::now();
        let cpu = process_cpu_seconds().unwrap_or(0.0);
        self.times.push((now - self.last).as_secs_f64());
        self.cpu_times.push(cpu - self.last_cpu);
        self.losses.push(info.loss);
        self.grad_norms.push(info.grad_norm);
        self.last = now;
        self.last_cpu = cpu;
    }
}

/// CPU time (user + system, all threads) this process has used, from Linux `/proc/self/stat`
/// (clock ticks of 1/100 s); on a shared machine it is steadier than the wall clock.
fn process_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory of this process now (Linux `VmRSS`), in bytes.
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reset `VmHWM` to the current resident memory (Linux: writing 5 to `/proc/self/clear_refs`),
/// so that a later `VmHWM` is the peak of what ran since. Whether it worked.
fn reset_peak_rss() -> bool {
    use std::io::Write;
    // A control file of the kernel, not data: opened for writing, never created.
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"5"))
        .is_ok()
}

/// Synthetic rows: BOS + half the text, the image, the other (supervised) half.
fn synthetic_samples(a: &Args, image: PathBuf, vocab: u64, bos: u32, n_img: usize) -> Vec<Sample> {
    let mut rng = Rng::new(a.seed);
    let n_rows = a.batch * (a.steps + a.warmup);
    let half = a.seq_len / 2;
    (0..n_rows)
        .map(|i| {
            let mut ids = |n: usize| -> Vec<u32> {
                (0..n)
                    .map(|_| 4 + (rng.next_u64() % (vocab - 4)) as u32)
                    .collect()
            };
            let mut head = vec![bos];
            head.extend(ids(half.saturating_sub(1)));
            let tail = ids(a.seq_len - half);
            let mut labels = vec![IGNORE_INDEX; head.len()];
            labels.extend(tail.iter().map(|&t| i64::from(t)));
            let example = TrainExample {
                segments: vec![Segment::Text(head), Segment::Image, Segment::Text(tail)],
                text_labels: labels,
            };
            Sample {
                id: i.to_string(),
                positions: positions(&example, n_img),
                supervised: a.seq_len - half,
                example,
                image: Some(image.clone()),
            }
        })
        .collect()
}

/// The configuration of the run, as `coin` resolves it for a command without a repository:
/// the presets' runtime, the environment, `--device`, `--dtype`, then `--set`.
fn run_config(a: &Args) -> Result<RunConfig, Error> {
    let mut sets: Vec<String> = Vec::new();
    if let Some(d) = &a.device {
        sets.push(format!("runtime.device={d}"));
    }
    if let Some(d) = &a.dtype {
        sets.push(format!("runtime.dtype={d}"));
    }
    sets.extend(a.set.iter().cloned());
    let sources = ConfigSources {
        sets,
        env: std::env::vars().collect(),
        ..ConfigSources::default()
    };
    Ok(sources.resolve()?)
}

fn run(a: &Args, rt: &Runtime) -> Result<serde_json::Value, Error> {
    let device = rt.device()?;
    let dtype = rt.dtype();
    let kind = match a.method.as_str() {
        "moelora" => AdapterKind::MoeLora { experts: a.experts },
        _ => AdapterKind::Lora,
    };
    let t_load = Instant::now();
    let source = ModelSource::resolve(&a.model, None, None)?;
    let mut loaded = load_model(&source, &device, dtype)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let tmp = tempfile::tempdir()?;
    let samples: Vec<Sample> = match (&a.data, &a.task_dir) {
        (Some(data), Some(task)) => {
            let records = read_train_file(
                &data
                    .join("Instructions_Original")
                    .join(task)
                    .join("train.json"),
            )?;
            let (s, _) = prepare_samples(
                &records,
                &data.join("cl_dataset"),
                &loaded.tokenizer,
                Labeling::for_model(&loaded.model.config),
                loaded.model.config.image_seq_len(),
                2048,
            )?;
            s
        }
        _ => {
            let img = tmp.path().join("image.png");
            let mut png = Vec::new();
            image::RgbImage::from_fn(64, 48, |x, y| {
                image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
            })
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            write_atomic(&img, png)?;
            let config = &loaded.model.config;
            synthetic_samples(
                a,
                img,
                config.text.vocab_size as u64,
                config.text.bos_token_id,
                config.image_seq_len(),
            )
        }
    };
    let params = TrainableParams::attach(
        &mut loaded.model,
        &AdapterSettings {
            kind,
            r: a.r,
            alpha: a.alpha,
            dropout: a.dropout,
            seed: a.seed,
            ..AdapterSettings::default()
        },
    )?;
    let cfg = TrainConfig {
        epochs: 1000,
        batch_size: a.batch,
        grad_accum: 1,
        learning_rate: a.lr,
        warmup_ratio: 0.0,
        schedule: Schedule::Constant,
        seed: a.seed,
        image_aspect: AspectMode::Pad,
        max_steps: Some(a.steps + a.warmup),
        shards: rt.shards,
        kernels: Some(rt.kernels),
        checkpointing: rt.checkpointing,
        ..TrainConfig::default()
    };
    let images: &ImageProcessor = &loaded.image;
    let mut timer = Timer {
        last: Instant::now(),
        last_cpu: 0.0,
        times: Vec::new(),
        cpu_times: Vec::new(),
        losses: Vec::new(),
        grad_norms: Vec::new(),
    };
    // The peak of the load (weights read, converted) is not the steps': measure the steps'
    // peak above what is resident when they start.
    let peak_before_steps = peak_rss_bytes();
    let rss_before_steps = rss_bytes();
    let reset = reset_peak_rss();
    let report = train(
        &loaded.model,
        &params,
        &samples,
        images,
        &cfg,
        None,
        &mut timer,
    )?;
    let timed: Vec<f64> = timer.times.iter().skip(a.warmup).copied().collect();
    let secs: f64 = timed.iter().sum();
    let per_step_positions = samples
        .iter()
        .take(a.batch)
        .map(|s| s.positions)
        .sum::<usize>() as f64;
    let cpu_secs: f64 = timer.cpu_times.iter().skip(a.warmup).sum();
    let steps_per_s = timed.len() as f64 / secs.max(1e-12);
    Ok(serde_json::json!({
        "engine": "coin",
        "attention": a.attention,
        "device": format!("{:?}", device.location()),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "method": a.method,
        "r": a.r,
        "batch": a.batch,
        "positions_per_row": per_step_positions / a.batch.max(1) as f64,
        "trainable_parameters": report.trainable_parameters,
        "load_seconds": load_s,
        "losses": timer.losses,
        "grad_norms": timer.grad_norms,
        "checkpointing": rt.checkpointing,
        "checkpointed_layers": report.checkpointed_layers,
        "step_seconds": timer.times,
        "timed_steps": timed.len(),
        "steps_per_s": steps_per_s,
        "tokens_per_s": steps_per_s * per_step_positions,
        "threads": rt.threads,
        "runtime": rt,
        "cpu_seconds_per_step": cpu_secs / timed.len().max(1) as f64,
        "peak_rss_bytes": peak_rss_bytes().max(peak_before_steps),
        "rss_before_steps_bytes": rss_before_steps,
        "steps_peak_rss_bytes": if reset { peak_rss_bytes() } else { None },
    }))
}

fn main() -> ExitCode {
    let args = Args::parse();
    coin::ml::flash::set_enabled_for_process(args.attention == "flash");
    // The runtime as `coin` resolves and applies it, before the first tensor op.
    let rt = match run_config(&args).and_then(|c| Ok(c.resolved_runtime()?)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    coin::cli::set_engine_threads(&rt);
    match run(&args, &rt).and_then(|v| Ok(serde_json::to_string_pretty(&v)?)) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
