//! CoIN-mini on the tiny model, with the library only: one LoRA adapter (and the projector)
//! trained task after task in CoIN's order, every task evaluated after every step (greedy
//! answers, the task's own scorer, strict mode), then the accuracy matrix and its metrics.
//! It checks what CoIN-mini promises (docs/coin-mini.md): each task is learnable in a short CPU
//! run (diagonal far above chance) and sequential training interferes (BWT < 0).
//!
//!     cargo run --release --example mini_sequence -- [STEPS] [TRAIN] [TEST] [TASKS]
//!
//! Defaults: 100 steps of batch 8 per task, 400 train / 50 test items per task, all 8 tasks
//! (TASKS: comma-separated names such as mini-VizWiz,mini-GQA).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use coin::metrics::{AccuracyMatrix, ForgettingMode};
use coin::ml::generate::{generate, GenerateRequest, GenerateSettings};
use coin::ml::image::Rgb8;
use coin::ml::llava::{load_model, LoadedModel, ModelSource};
use coin::ml::tiny::{write_tiny, TinyOptions};
use coin::ml::train::data::prepare_samples;
use coin::ml::train::params::{AdapterKind, AdapterSettings, TrainableParams};
use coin::ml::train::trainer::{train, NoProgress, TrainConfig};
use coin::tasks::formats::{read_test_file, read_train_file, AnswerRecord};
use coin::tasks::mini::{self, MiniConfig};
use coin::tasks::registry::score_task;
use coin::tasks::scoring::ScoreMode;

type Error = Box<dyn std::error::Error>;

fn answers(
    m: &mut LoadedModel,
    data: &Path,
    t: &mini::MiniTask,
) -> Result<Vec<AnswerRecord>, Error> {
    let test = read_test_file(
        &data
            .join("Instructions_Original")
            .join(t.dir)
            .join(t.test_file),
    )?;
    let mut out = Vec::new();
    for chunk in test.chunks(25) {
        let reqs = chunk
            .iter()
            .map(|r| {
                let rel = r.image.as_deref().ok_or("test record without image")?;
                Ok(GenerateRequest::question(
                    &r.text,
                    Rgb8::open(&data.join("cl_dataset").join(rel))?,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let gen = generate(
            m,
            None,
            &reqs,
            &GenerateSettings {
                max_new_tokens: 24,
                ..GenerateSettings::default()
            },
        )?;
        for (r, g) in chunk.iter().zip(gen) {
            out.push(AnswerRecord {
                question_id: r.question_id.clone(),
                prompt: r.text.clone(),
                text: Some(g.text.trim().to_string()),
                answer_id: serde_json::Value::Null,
                model_id: serde_json::Value::Null,
                metadata: serde_json::Value::Null,
            });
        }
    }
    Ok(out)
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(100);
    let n_train: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(400);
    let n_test: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(50);
    let tasks: Vec<mini::MiniTask> = match args.get(3) {
        Some(list) => list
            .split(',')
            .map(|n| {
                mini::TASKS
                    .iter()
                    .find(|t| t.name == n)
                    .copied()
                    .ok_or_else(|| format!("unknown task {n}"))
            })
            .collect::<Result<_, _>>()?,
        None => mini::TASKS.to_vec(),
    };
    let dir = tempfile::tempdir()?;
    let t0 = Instant::now();
    let model_dir = write_tiny(
        &dir.path().join("model"),
        &TinyOptions {
            corpus: mini::coin_mini_corpus(),
            ..TinyOptions::default()
        },
    )?;
    let data = dir.path().join("mini");
    mini::generate(
        &data,
        &MiniConfig {
            train: n_train,
            test: n_test,
            ..MiniConfig::default()
        },
        |_| {},
    )?;
    let defs = mini::task_defs(&data.to_string_lossy());
    let mut m = load_model(
        &ModelSource::resolve(&model_dir, None, None)?,
        &Device::Cpu,
        DType::F32,
    )?;
    let params = TrainableParams::attach(
        &mut m.model,
        &AdapterSettings {
            kind: AdapterKind::Lora,
            r: 8,
            alpha: 16.0,
            ..AdapterSettings::default()
        },
    )?;
    let cfg = TrainConfig {
        epochs: 100,
        batch_size: 8,
        grad_accum: 1,
        learning_rate: 3e-3,
        warmup_ratio: 0.05,
        max_steps: Some(steps),
        seed: 2,
        ..TrainConfig::default()
    };
    let names: Vec<String> = tasks.iter().map(|t| t.name.to_string()).collect();
    let mut rows = Vec::new();
    for (k, t) in tasks.iter().enumerate() {
        let records = read_train_file(
            &data
                .join("Instructions_Original")
                .join(t.dir)
                .join("train.json"),
        )?;
        let (samples, _) = prepare_samples(
            &records,
            &data.join("cl_dataset"),
            &m.tokenizer,
            m.model.config.image_seq_len(),
            2048,
        )?;
        let report = train(
            &m.model,
            &params,
            &samples,
            &m.image,
            &cfg,
            None,
            &mut NoProgress,
        )?;
        let (first, last) = report.loss_drop(10).ok_or("no steps")?;
        let mut row = vec![None; tasks.len()];
        for (j, u) in tasks.iter().enumerate().take(k + 1) {
            let def = defs.iter().find(|d| d.name == u.name).ok_or("no def")?;
            let ans = answers(&mut m, &data, u)?;
            let s = score_task(def, Path::new("/"), &ans, Some(ScoreMode::Strict))?;
            row[j] = Some(s.score);
        }
        eprintln!(
            "after {:16} loss {first:.2} -> {last:.2} | {} | {:.0}s",
            t.name,
            row.iter()
                .map(|c| c
                    .map(|v| format!("{v:5.1}"))
                    .unwrap_or_else(|| "    -".into()))
                .collect::<Vec<_>>()
                .join(" "),
            t0.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    let matrix = AccuracyMatrix {
        tasks: names.clone(),
        rows,
        zero_shot: None,
    };
    let metrics = matrix.metrics(ForgettingMode::MaxEarlier)?;
    println!("task            chance  after-own-step  final");
    for (j, t) in tasks.iter().enumerate() {
        println!(
            "{:16} {:5.1}  {:14.1}  {:5.1}",
            t.name,
            100.0 * t.chance,
            matrix.get(j, j).unwrap_or(f64::NAN),
            matrix.get(tasks.len() - 1, j).unwrap_or(f64::NAN)
        );
    }
    println!("{}", serde_json::to_string(&metrics)?);
    println!("wall {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}
