//! End-to-end tests of `coin checkout --format coin|peft|safetensors`: the exported directory,
//! read back with coin's own readers (the torch pickle reader, the PEFT/CoIN adapter loader).
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::Path;

use coin::ml::load::read_tensor_file;
use coin::ml::peft::PeftAdapter;

use crate::common::st::{safetensors, T};
use crate::common::{assert_same_tree, TestEnvironment};

/// A CoIN-style stage dir: LoRA (r 2) on q_proj and down_proj of layer 0 of a hidden-4 model,
/// a projector, and CoIN's config.json.
fn coin_stage(env: &TestEnvironment, name: &str) {
    let v = |n: usize, k: f32| (0..n).map(|i| i as f32 * 0.25 + k).collect::<Vec<f32>>();
    let p = "base_model.model.model.layers.0";
    env.write(
        format!("{name}/adapter_model.safetensors"),
        safetensors(&[
            T::bf16(
                &format!("{p}.self_attn.q_proj.lora_A.weight"),
                &[2, 4],
                &v(8, 0.0),
            ),
            T::bf16(
                &format!("{p}.self_attn.q_proj.lora_B.weight"),
                &[4, 2],
                &v(8, 1.0),
            ),
            T::bf16(
                &format!("{p}.mlp.down_proj.lora_A.weight"),
                &[2, 6],
                &v(12, 2.0),
            ),
            T::bf16(
                &format!("{p}.mlp.down_proj.lora_B.weight"),
                &[4, 2],
                &v(8, 3.0),
            ),
        ]),
    );
    let m = "base_model.model.model.mm_projector";
    env.write(
        format!("{name}/non_lora_trainables.safetensors"),
        safetensors(&[
            T::bf16(&format!("{m}.0.weight"), &[4, 3], &v(12, 0.5)),
            T::bf16(&format!("{m}.0.bias"), &[4], &v(4, 0.5)),
            T::bf16(&format!("{m}.2.weight"), &[4, 4], &v(16, 0.5)),
            T::bf16(&format!("{m}.2.bias"), &[4], &v(4, 0.5)),
        ]),
    );
    env.write(
        format!("{name}/adapter_config.json"),
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
            "target_modules": ["down_proj", "q_proj"]}"#,
    );
    env.write(
        format!("{name}/config.json"),
        "{\n  \"model_type\": \"llava\"\n}\n",
    );
}

fn tensors(file: &Path) -> BTreeMap<String, Vec<f32>> {
    read_tensor_file(file)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (k, v)
        })
        .collect()
}

#[test]
fn checkout_format_coin_peft_and_safetensors() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    coin_stage(&env, "stage");
    env.coin(&["commit", "stage", "--task", "ScienceQA"])
        .success();
    let src = tensors(&env.path("stage/adapter_model.safetensors"));

    // Default: the byte-identical checkout, unchanged.
    env.coin(&["checkout", "HEAD", "--output", "plain"])
        .success();
    assert_same_tree(&env.path("stage"), &env.path("plain"));

    // coin: CoIN's file names, keys and values; the name warning offers a CoIN-style name.
    let out = env
        .coin(&["checkout", "HEAD", "--output", "out", "--format", "coin"])
        .success();
    assert!(out.stderr.contains("'out_llava_lora'"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("Exported 2 adapted module(s) and the projector"),
        "{}",
        out.stderr
    );
    let mut names: Vec<String> = std::fs::read_dir(env.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.bin",
            "config.json",
            "non_lora_trainables.bin"
        ]
    );
    assert_eq!(tensors(&env.path("out/adapter_model.bin")), src);
    assert_eq!(
        tensors(&env.path("out/non_lora_trainables.bin")),
        tensors(&env.path("stage/non_lora_trainables.safetensors"))
    );
    assert_eq!(
        std::fs::read(env.path("out/config.json")).unwrap(),
        std::fs::read(env.path("stage/config.json")).unwrap()
    );
    let dev = candle_core::Device::Cpu;
    let back = PeftAdapter::load(&env.path("out"), &dev, candle_core::DType::F32).unwrap();
    assert_eq!(back.layers.len(), 2);
    assert!(back.projector.is_some());
    // A CoIN-style name: no warning about it.
    let out = env
        .coin(&[
            "checkout",
            "HEAD",
            "--output",
            "ScienceQA_llava_lora",
            "--format",
            "coin",
        ])
        .success();
    assert!(!out.stderr.contains("rename"), "{}", out.stderr);

    // peft: llava-hf module names.
    env.coin(&["checkout", "HEAD", "--output", "hf", "--format", "peft"])
        .success();
    let hf = tensors(&env.path("hf/adapter_model.safetensors"));
    let renamed: BTreeMap<String, Vec<f32>> = src
        .iter()
        .map(|(k, v)| {
            (
                k.replace(
                    "base_model.model.model.layers",
                    "base_model.model.language_model.model.layers",
                ),
                v.clone(),
            )
        })
        .collect();
    assert_eq!(hf, renamed);
    assert!(env.path("hf/non_lora_trainables.safetensors").is_file());

    // safetensors: coin's names.
    env.coin(&[
        "checkout",
        "HEAD",
        "--output",
        "st",
        "--format",
        "safetensors",
    ])
    .success();
    let st = tensors(&env.path("st/adapter.safetensors"));
    assert!(st.contains_key("language_model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(st.contains_key("multi_modal_projector.linear_1.weight"));

    // Nothing but the output directories was left beside them (no staging folders).
    let leftovers: Vec<String> = std::fs::read_dir(env.work())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".coin-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_failed_export_leaves_nothing_and_a_full_directory_is_refused() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    env.write("notes/readme.txt", "no adapter here\n");
    env.coin(&["commit", "notes", "--task", "ScienceQA"])
        .success();
    let err = env
        .coin(&["checkout", "HEAD", "--output", "out", "--format", "coin"])
        .code(1);
    assert!(err.stderr.contains("adapter_model"), "{}", err.stderr);
    assert!(!env.path("out").exists());
    let leftovers = std::fs::read_dir(env.work())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".coin-")
        })
        .count();
    assert_eq!(leftovers, 0);

    env.write("full/x", "x");
    let err = env
        .coin(&["checkout", "HEAD", "--output", "full", "--format", "peft"])
        .code(1);
    assert!(err.stderr.contains("not empty"), "{}", err.stderr);
}
