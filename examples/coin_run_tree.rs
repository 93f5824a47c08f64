//! Write a synthetic CoIN experiment as CoIN's scripts leave it on disk (current layout, LoRA),
//! for `bench/import.sh`.
//!
//! `cargo run --release --example coin_run_tree -- MINI_DIR OUT_DIR [SCALE] [LAYERS] [RANK] [KEEP]`
//!
//! MINI_DIR is a `coin bench-data coin-mini` folder: its question files and annotation files
//! become the tree's `playground/Instructions_Original/` and `cl_dataset/`. OUT_DIR gets eight
//! stage dirs `checkpoints/LLaVA/CoIN/<Task>_llava_lora/` (`adapter_model.bin` and
//! `non_lora_trainables.bin` as torch zips of bf16 tensors, `adapter_config.json`,
//! `config.json`, `trainer_state.json`) and the 36 results dirs of CoIN's `Eval_all.sh`
//! (`results/CoIN/LLaVA/<EvalTask>/<STAGE>/merge.jsonl`, the stage's own task and every earlier
//! one; `model_id` = the stage dir name).
//!
//! The shape is LLaVA-7B's (LAYERS=32 layers, q/k/v/o/gate/up/down LoRA of rank RANK=16, the
//! two-layer projector) with every width divided by SCALE (default 4: hidden 1024,
//! intermediate 2752, vision width 256). Every stage retrains every tensor, as CoIN does, so
//! no tensor repeats across stages; KEEP (default 0) keeps the LoRA tensors of the first KEEP
//! layers equal to stage 1's (a synthetic case that shows what per-tensor dedupe saves).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use coin::ml::train::torch_save::torch_save_bytes;
use coin::store::fsutil::write_atomic;

const TASKS: [&str; 8] = [
    "ScienceQA",
    "TextVQA",
    "ImageNet",
    "GQA",
    "VizWiz",
    "Grounding",
    "VQAv2",
    "OCRVQA",
];

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A bf16 tensor of small pseudo-random values, the same for the same seed.
fn tensor(rows: usize, cols: usize, seed: u64) -> Res<Tensor> {
    let mut s = seed;
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| ((splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?.to_dtype(DType::BF16)?)
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Res<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    write_atomic(path, bytes)?;
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Res<()> {
    write(to, std::fs::read(from)?)
}

struct Shape {
    layers: usize,
    hidden: usize,
    inter: usize,
    vision: usize,
    rank: usize,
    keep: usize,
}

/// One stage dir: `stage` is 0-based.
fn stage_dir(dir: &Path, shape: &Shape, stage: usize, task: &str) -> Res<()> {
    let (h, i, r) = (shape.hidden, shape.inter, shape.rank);
    let mut lora = Vec::new();
    let mut n = 0u64;
    for layer in 0..shape.layers {
        let seed_stage = if layer < shape.keep { 0 } else { stage as u64 };
        for (part, m, inp, out) in [
            ("self_attn", "q_proj", h, h),
            ("self_attn", "k_proj", h, h),
            ("self_attn", "v_proj", h, h),
            ("self_attn", "o_proj", h, h),
            ("mlp", "gate_proj", h, i),
            ("mlp", "up_proj", h, i),
            ("mlp", "down_proj", i, h),
        ] {
            let name = format!("base_model.model.model.layers.{layer}.{part}.{m}");
            n += 1;
            let seed = (seed_stage << 32) | (n << 1);
            lora.push((format!("{name}.lora_A.weight"), tensor(r, inp, seed)?));
            lora.push((format!("{name}.lora_B.weight"), tensor(out, r, seed | 1)?));
        }
    }
    write(&dir.join("adapter_model.bin"), torch_save_bytes(&lora)?)?;
    let p = "base_model.model.model.mm_projector";
    let s = (stage as u64) << 32;
    let proj = vec![
        (format!("{p}.0.weight"), tensor(h, shape.vision, s | 0xf0)?),
        (
            format!("{p}.0.bias"),
            tensor(1, h, s | 0xf1)?.reshape(h)?.contiguous()?,
        ),
        (format!("{p}.2.weight"), tensor(h, h, s | 0xf2)?),
        (
            format!("{p}.2.bias"),
            tensor(1, h, s | 0xf3)?.reshape(h)?.contiguous()?,
        ),
    ];
    write(
        &dir.join("non_lora_trainables.bin"),
        torch_save_bytes(&proj)?,
    )?;
    // peft 0.4.0's key set, without a trailing newline (as CoIN's run writes it).
    write(
        &dir.join("adapter_config.json"),
        format!(
            "{{\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\": \
             \"./checkpoints/LLaVA/Vicuna/vicuna-7b-v1.5\",\n  \"bias\": \"none\",\n  \
             \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n  \"init_lora_weights\": \
             true,\n  \"layers_pattern\": null,\n  \"layers_to_transform\": null,\n  \
             \"lora_alpha\": {},\n  \"lora_dropout\": 0.05,\n  \"modules_to_save\": null,\n  \
             \"peft_type\": \"LORA\",\n  \"r\": {r},\n  \"revision\": null,\n  \
             \"target_modules\": [\n    \"q_proj\",\n    \"k_proj\",\n    \"v_proj\",\n    \
             \"o_proj\",\n    \"gate_proj\",\n    \"up_proj\",\n    \"down_proj\"\n  ],\n  \
             \"task_type\": \"CAUSAL_LM\"\n}}",
            2 * r
        ),
    )?;
    write(
        &dir.join("config.json"),
        format!(
            "{{\n  \"_name_or_path\": \"./checkpoints/LLaVA/Vicuna/vicuna-7b-v1.5\",\n  \
             \"hidden_size\": {h},\n  \"intermediate_size\": {i},\n  \"mm_hidden_size\": {},\n  \
             \"model_type\": \"llava\",\n  \"num_hidden_layers\": {}\n}}\n",
            shape.vision, shape.layers
        ),
    )?;
    let steps = 100 * (stage + 1);
    let log: Vec<String> = (1..=steps)
        .map(|s| {
            format!(
                "    {{\n      \"epoch\": {:.2},\n      \"learning_rate\": 0.0002,\n      \
                 \"loss\": {:.4},\n      \"step\": {s}\n    }}",
                s as f64 / steps as f64,
                2.0 / (1.0 + s as f64 / 10.0)
            )
        })
        .collect();
    write(
        &dir.join("trainer_state.json"),
        format!(
            "{{\n  \"epoch\": 1.0,\n  \"global_step\": {steps},\n  \"log_history\": [\n{}\n  \
             ],\n  \"task\": \"{task}\"\n}}\n",
            log.join(",\n")
        ),
    )?;
    Ok(())
}

/// The question file of a task in the coin-mini folder (`val.json` for three tasks).
fn question_file(mini: &Path, task: &str) -> PathBuf {
    let d = mini.join("Instructions_Original").join(task);
    if d.join("val.json").is_file() {
        d.join("val.json")
    } else {
        d.join("test.json")
    }
}

/// A `merge.jsonl` of `questions` answered by `model_id`, a fraction `frac` of them right.
fn merge_lines(questions: &[serde_json::Value], model_id: &str, frac: f64) -> String {
    let mut out = String::new();
    for (i, q) in questions.iter().enumerate() {
        let right = (((i as u64 * 7919) % 100) as f64) < frac * 100.0;
        let answer = q
            .get("answer")
            .or_else(|| q.get("answer_bbox"))
            .and_then(|a| a.as_str())
            .unwrap_or("");
        let text = if right { answer } else { "zzz" };
        out.push_str(
            &serde_json::json!({
                "question_id": q["question_id"], "prompt": q["text"], "text": text,
                "answer_id": format!("{i:022}"), "model_id": model_id, "metadata": {}
            })
            .to_string(),
        );
        out.push('\n');
    }
    out
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: coin_run_tree MINI_DIR OUT_DIR [SCALE=4] [LAYERS=32] [RANK=16] [KEEP=0]";
    let mini = PathBuf::from(args.first().ok_or(usage)?);
    let out = PathBuf::from(args.get(1).ok_or(usage)?);
    let scale: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let shape = Shape {
        layers: args.get(3).map_or(Ok(32), |s| s.parse())?,
        hidden: 4096 / scale,
        inter: 11008 / scale,
        vision: 1024 / scale,
        rank: args.get(4).map_or(Ok(16), |s| s.parse())?,
        keep: args.get(5).map_or(Ok(0), |s| s.parse())?,
    };
    for rel in [
        "ScienceQA/problems.json",
        "ScienceQA/pid_splits.json",
        "TextVQA/TextVQA_0.5.1_val.json",
        "GQA/testdev_balanced_questions.json",
    ] {
        copy(
            &mini.join("cl_dataset").join(rel),
            &out.join("cl_dataset").join(rel),
        )?;
    }
    let mut questions = Vec::new();
    for task in TASKS {
        let q = question_file(&mini, task);
        let name = q.file_name().ok_or("no file name")?;
        copy(
            &q,
            &out.join("playground/Instructions_Original")
                .join(task)
                .join(name),
        )?;
        let v: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&q)?)?;
        questions.push(v);
    }
    for (k, task) in TASKS.iter().enumerate() {
        let model_id = format!("{task}_llava_lora");
        stage_dir(
            &out.join("checkpoints/LLaVA/CoIN").join(&model_id),
            &shape,
            k,
            task,
        )?;
        // Eval_all.sh: this checkpoint on its own task (Finetune) and every earlier one.
        for (e, eval) in TASKS.iter().enumerate().take(k + 1) {
            let stage = if e == k { "Finetune" } else { task };
            let frac = (0.9 - 0.08 * (k - e) as f64 - 0.02 * e as f64).max(0.05);
            write(
                &out.join("results/CoIN/LLaVA")
                    .join(eval)
                    .join(stage)
                    .join("merge.jsonl"),
                merge_lines(&questions[e], &model_id, frac),
            )?;
        }
    }
    eprintln!(
        "wrote an 8-stage CoIN run to {} (LLaVA-7B widths / {scale}: hidden {}, rank {}, {} layers)",
        out.display(),
        shape.hidden,
        shape.rank,
        shape.layers
    );
    Ok(())
}
