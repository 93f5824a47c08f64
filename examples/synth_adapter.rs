//! Write a synthetic PEFT LoRA adapter directory, for the walkthrough and benchmarks.
//!
//! `cargo run --release --example synth_adapter -- OUT_DIR STEP [LAYERS] [HIDDEN] [RANK]`
//!
//! The adapter has q_proj and v_proj LoRA pairs (f32) for LAYERS layers. Step 0 is the initial
//! adapter; each later step rewrites exactly one tensor (round-robin), the way a sequence of
//! partial updates would, so the store's per-tensor dedupe is visible.

use std::collections::BTreeMap;
use std::path::PathBuf;

use safetensors::tensor::TensorView;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn values(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        let v = (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        out.extend_from_slice(&(v * 0.02).to_le_bytes());
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: synth_adapter OUT_DIR STEP [LAYERS=4] [HIDDEN=256] [RANK=8]";
    let out = PathBuf::from(args.first().ok_or(usage)?);
    let step: usize = args.get(1).ok_or(usage)?.parse()?;
    let layers: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let hidden: usize = args.get(3).map_or(Ok(256), |s| s.parse())?;
    let rank: usize = args.get(4).map_or(Ok(8), |s| s.parse())?;

    let mut names = Vec::new();
    for l in 0..layers {
        for m in ["q_proj", "v_proj"] {
            for ab in ["lora_A", "lora_B"] {
                names.push(format!(
                    "base_model.model.model.layers.{l}.self_attn.{m}.{ab}.weight"
                ));
            }
        }
    }
    let n = names.len();
    let mut data = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        // How many of steps 1..=step rewrote tensor i (round-robin).
        let version = (1..=step).filter(|k| (k - 1) % n == i).count() as u64;
        let shape = if name.contains("lora_A") {
            vec![rank, hidden]
        } else {
            vec![hidden, rank]
        };
        let bytes = values(rank * hidden, (i as u64) << 32 | version);
        data.insert(name.clone(), (shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(k, (shape, bytes))| {
            Ok((
                k.clone(),
                TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(meta))?;

    std::fs::create_dir_all(&out)?;
    coin::store::fsutil::write_atomic(out.join("adapter_model.safetensors"), bytes)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    });
    coin::store::fsutil::write_atomic(
        out.join("adapter_config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    println!("{}: step {step}, {n} tensors", out.display());
    Ok(())
}
