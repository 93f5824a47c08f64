//! End to end: CoIN-like stages whose checkpoints are torch `.bin` files (`adapter_model.bin`,
//! `non_lora_trainables.bin`) are stored per storage, diffed per tensor and checked out byte
//! for byte.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use candle_core::{DType, Device, Tensor};

use crate::common::{assert_same_tree, TestEnvironment};

const LAYERS: usize = 4;
const PROJ: [&str; 2] = ["q_proj", "v_proj"];

/// A CoIN LoRA stage dir: `adapter_model.bin` (lora_A/lora_B of q/v in `LAYERS` layers, f32,
/// r = 4, hidden 32; the tensors whose layer is in `changed` get `shift` added),
/// `non_lora_trainables.bin` (the projector, bf16, never changed) and `adapter_config.json`.
fn stage(env: &TestEnvironment, name: &str, changed: &[usize], shift: f32) -> std::path::PathBuf {
    let dev = Device::Cpu;
    let mut lora = Vec::new();
    for layer in 0..LAYERS {
        for (p, proj) in PROJ.iter().enumerate() {
            for (b, (ab, shape)) in [("lora_A", (4, 32)), ("lora_B", (32, 4))]
                .into_iter()
                .enumerate()
            {
                let base = (layer * 10 + p * 3 + b) as f64;
                let delta = if changed.contains(&layer) { shift } else { 0.0 };
                let t = Tensor::arange(0f32, 128f32, &dev)
                    .unwrap()
                    .affine(0.01, base + f64::from(delta))
                    .unwrap()
                    .reshape(shape)
                    .unwrap();
                lora.push((
                    format!("base_model.model.model.layers.{layer}.self_attn.{proj}.{ab}.weight"),
                    t,
                ));
            }
        }
    }
    let projector: Vec<(String, Tensor)> = [("0.weight", (32, 16)), ("2.weight", (32, 32))]
        .into_iter()
        .map(|(n, s)| {
            let t = Tensor::ones(s, DType::BF16, &dev).unwrap();
            (format!("base_model.model.model.mm_projector.{n}"), t)
        })
        .collect();
    let save = coin::ml::train::torch_save::torch_save_bytes;
    env.write(format!("{name}/adapter_model.bin"), save(&lora).unwrap());
    env.write(
        format!("{name}/non_lora_trainables.bin"),
        save(&projector).unwrap(),
    );
    env.write(
        format!("{name}/adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8}"#,
    );
    env.path(name)
}

fn objects(env: &TestEnvironment) -> (u64, u64) {
    let s = env.coin(&["stats", "--json"]).success().json();
    (
        s["objects"].as_u64().unwrap(),
        s["stored_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn bin_checkpoints_are_stored_per_storage_diffed_per_tensor_and_rebuilt() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    stage(&env, "ScienceQA", &[], 0.0);
    let out = env
        .coin(&["commit", "ScienceQA", "--task", "ScienceQA"])
        .success();
    let id1 = out.stdout.trim().to_string();
    let (o1, _) = objects(&env);
    // 16 LoRA storages + layout, 2 projector storages + layout, the config blob.
    assert_eq!(o1, 16 + 1 + 2 + 1 + 1);
    let show = env.coin(&["show", "--json"]).success().json();
    let files = show["files"].as_array().unwrap();
    let bin = files
        .iter()
        .find(|f| f["path"] == "adapter_model.bin")
        .unwrap();
    assert_eq!(bin["kind"], "torchbin");
    assert_eq!(bin["tensors"].as_array().unwrap().len(), 16);

    // Stage 2 trains layer 1 only: its 4 tensors are the new storages, plus the new layout
    // (the zip headers carry each entry's CRC).
    stage(&env, "TextVQA", &[1], 0.5);
    let id2 = env
        .coin(&["commit", "TextVQA", "--task", "TextVQA"])
        .success()
        .stdout
        .trim()
        .to_string();
    let (o2, _) = objects(&env);
    assert_eq!(o2, o1 + 4 + 1);

    let d = env.coin(&["diff", &id1, &id2, "--json"]).success().json();
    let mut changed: Vec<String> = d["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["change"] == "changed")
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    changed.sort();
    let mut want: Vec<String> = PROJ
        .iter()
        .flat_map(|p| {
            ["lora_A", "lora_B"]
                .map(|ab| format!("base_model.model.model.layers.1.self_attn.{p}.{ab}.weight"))
        })
        .collect();
    want.sort();
    assert_eq!(changed, want);
    assert_eq!(d["unchanged_tensors"], 12 + 2);
    let text = env.coin(&["diff", &id1, &id2]).success().stdout;
    assert!(
        text.contains("layers.1.self_attn.q_proj.lora_B.weight"),
        "{text}"
    );

    env.coin(&["checkout", &id1, "--output", "out1"]).success();
    env.coin(&["checkout", &id2, "--output", "out2"]).success();
    assert_same_tree(&env.path("ScienceQA"), &env.path("out1"));
    assert_same_tree(&env.path("TextVQA"), &env.path("out2"));
    env.coin(&["fsck"]).success();
    // gc keeps every storage and layout the checkpoints reach.
    env.coin(&["gc"]).success();
    assert_eq!(objects(&env).0, o2);
    std::fs::remove_dir_all(env.path("out1")).unwrap();
    env.coin(&["checkout", &id1, "--output", "out1"]).success();
    assert_same_tree(&env.path("ScienceQA"), &env.path("out1"));
}

/// Store growth over an 8-stage LoRA-shaped sequence (tiny dims: 4 layers, hidden 32, r 4),
/// each stage training one layer, against the whole files a blob store keeps. Prints the
/// numbers for docs/benchmarks.md.
#[test]
fn eight_stage_store_growth_with_dedupe_is_below_whole_files() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    let mut prev = objects(&env).1;
    let mut logical = 0u64;
    // What a store of whole files (each distinct file one blob) would hold.
    let mut whole = std::collections::HashSet::new();
    let mut whole_bytes = 0u64;
    for i in 0..8 {
        let name = format!("stage{i}");
        let dir = stage(&env, &name, &[i % LAYERS], i as f32);
        for f in [
            "adapter_model.bin",
            "non_lora_trainables.bin",
            "adapter_config.json",
        ] {
            let bytes = std::fs::read(dir.join(f)).unwrap();
            logical += bytes.len() as u64;
            if whole.insert(bytes.clone()) {
                whole_bytes += bytes.len() as u64;
            }
        }
        env.coin(&["commit", &name, "--task", &name]).success();
        let now = objects(&env).1;
        eprintln!(
            "stage {i}: +{} stored bytes (whole-file blobs so far: {whole_bytes})",
            now - prev
        );
        prev = now;
    }
    eprintln!(
        "8 stages: {prev} stored bytes with dedupe, {whole_bytes} as whole-file blobs, \
         {logical} bytes checked in"
    );
    assert!(prev < whole_bytes, "{prev} vs {whole_bytes}");
}

#[test]
fn bin_storages_travel_with_push_and_clone() {
    let env = TestEnvironment::new();
    env.coin(&["init", "a"]).success();
    let a = env.path("a");
    let mut ids = Vec::new();
    for (i, task) in ["ScienceQA", "TextVQA"].iter().enumerate() {
        let dir = stage(&env, task, &[i], 1.0);
        let out = env
            .coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", task])
            .success();
        ids.push(out.stdout.trim().to_string());
    }
    env.git_in(&env.work(), &["init", "-q", "--bare", "shared.git"])
        .success();
    env.coin_in(&a, &["remote", "add", "origin", "../shared.git"])
        .success();
    let push = env.coin_in(&a, &["push", "--json"]).success().json();
    let local = env.coin_in(&a, &["stats", "--json"]).success().json();
    assert_eq!(push["objects"]["transferred"], local["objects"]);
    env.coin(&["clone", "shared.git", "b"]).success();
    let b = env.path("b");
    env.coin_in(&b, &["fsck"]).success();
    for (id, task) in ids.iter().zip(["ScienceQA", "TextVQA"]) {
        let out = b.join(format!("out-{task}"));
        env.coin_in(&b, &["checkout", id, "--output", out.to_str().unwrap()])
            .success();
        for f in ["adapter_model.bin", "non_lora_trainables.bin"] {
            assert!(
                std::fs::read(out.join(f)).unwrap()
                    == std::fs::read(env.path(task).join(f)).unwrap(),
                "{task}/{f} differs after push and clone"
            );
        }
    }
}
