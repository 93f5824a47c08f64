//! The CoIN split setup against LLaVA's own code: tests/fixtures/split_setup was made by its
//! make_fixture.py with CoIN's `ETrain/` (LLaVA) and transformers 4.31.0 (README.md there): a
//! tiny vicuna dir (`.bin` shards, tokenizer.model, no tokenizer.json), a CLIP tower dir and a
//! `mm_projector.bin`, loaded as CoIN's training loads them, with the prompt ids
//! (`tokenizer_image_token`, slow `LlamaTokenizer`) and greedy tokens (temperature 0, vicuna_v1,
//! image_aspect_ratio pad) of three images. This test only reads the fixture.
//!
//! Two tokenizers: the fixture as it is (coin reads tokenizer.model itself, as LLaVA's
//! `use_fast=False`) and a copy with converted/tokenizer.json in place of tokenizer.model (the
//! fast tokenizer CoIN's training converts tokenizer.model into), which keeps the engine's check
//! apart from the SentencePiece reader's.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use coin::ml::config::ImageToken;
use coin::ml::llava::{load_model, ModelSource, Segment};
use coin::ml::template::PromptTokenizer;
use serde_json::Value;

use crate::common::TestEnvironment;
use crate::test_parity::LOGIT_TOL;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/split_setup")
}

fn goldens() -> Value {
    let bytes = std::fs::read(fixture().join("generate.json")).expect("generate.json exists");
    serde_json::from_slice(&bytes).expect("generate.json parses")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("uint")).expect("u32"))
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// LLaVA's `input_ids`: text ids, -200 for the image.
fn llava_ids(segments: &[Segment]) -> Vec<i64> {
    segments
        .iter()
        .flat_map(|s| match s {
            Segment::Text(t) => t.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
            Segment::Image => vec![-200],
        })
        .collect()
}

fn check_prompt_ids(tok: &PromptTokenizer) {
    for case in goldens()["cases"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want: Vec<i64> = case["prompt_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_i64().expect("int"))
            .collect();
        let got = llava_ids(&tok.encode_prompt(prompt).expect("encodes"));
        assert_eq!(got, want, "prompt ids of {}", case["image"]);
    }
}

/// `coin generate` on a split setup in `vicuna` against LLaVA's greedy tokens and first-step
/// logits.
fn check_generate(env: &TestEnvironment, vicuna: &Path) {
    let f = fixture();
    let g = goldens();
    let max_new = g["max_new_tokens"].to_string();
    assert_eq!(g["image_aspect"], "pad");
    for case in g["cases"].as_array().expect("cases") {
        let image = f.join(case["image"].as_str().expect("image"));
        let out = env
            .coin(&[
                "generate",
                "--model",
                vicuna.to_str().expect("utf8"),
                "--vision-tower",
                f.join("clip").to_str().expect("utf8"),
                "--projector",
                f.join("mm_projector.bin").to_str().expect("utf8"),
                "--image",
                image.to_str().expect("utf8"),
                "--prompt",
                case["question"].as_str().expect("question"),
                "--image-aspect",
                "pad",
                "--max-new-tokens",
                &max_new,
                "--json",
                "--logits",
            ])
            .success()
            .json();
        let logits = f32s(&out["first_step_logits"]);
        let want = f32s(&case["first_step_logits"]);
        assert_eq!(logits.len(), want.len());
        let d = logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{}: max |first-step logit diff| = {d:e}", case["image"]);
        assert!(d < LOGIT_TOL, "{}: logits differ by {d}", case["image"]);
        assert_eq!(
            u32s(&out["token_ids"]),
            u32s(&case["greedy_ids"]),
            "greedy tokens of {}",
            case["image"]
        );
    }
}

/// The fixture's vicuna dir copied with CoIN's converted tokenizer.json in place of
/// tokenizer.model (so that the SentencePiece reader plays no part).
fn vicuna_with_converted_tokenizer(env: &TestEnvironment) -> PathBuf {
    let dir = env.path("vicuna");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for entry in std::fs::read_dir(fixture().join("vicuna")).expect("vicuna dir") {
        let p = entry.expect("entry").path();
        if p.file_name().is_some_and(|n| n != "tokenizer.model") {
            std::fs::copy(&p, dir.join(p.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::copy(
        fixture().join("converted/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .expect("copy tokenizer.json");
    dir
}

#[test]
fn engine_matches_llava_with_coins_converted_tokenizer() {
    let env = TestEnvironment::new();
    let t = tokenizers::Tokenizer::from_file(fixture().join("converted/tokenizer.json"))
        .expect("tokenizer.json");
    check_prompt_ids(&PromptTokenizer::new(
        t,
        ImageToken::Placeholder,
        1,
        vec![2],
    ));
    let vicuna = vicuna_with_converted_tokenizer(&env);
    check_generate(&env, &vicuna);
}

/// Needs coin's SentencePiece reader: the vicuna dir has tokenizer.model and no tokenizer.json,
/// as a real one.
#[test]
fn coin_generate_on_the_split_setup_matches_llava() {
    let env = TestEnvironment::new();
    let f = fixture();
    let src = ModelSource::resolve(
        &f.join("vicuna"),
        Some(&f.join("clip")),
        Some(&f.join("mm_projector.bin")),
    )
    .expect("split setup resolves");
    let loaded = load_model(&src, &Device::Cpu, DType::F32)
        .expect("split setup loads (tokenizer.model read as a SentencePiece model)");
    check_prompt_ids(&loaded.tokenizer);
    check_generate(&env, &f.join("vicuna"));
}

/// A projector file holding a tensor that is not the projector's is refused, naming the file
/// and the tensor (LLaVA's strict load refuses it too).
#[test]
fn a_projector_file_with_an_unexpected_key_is_refused() {
    let env = TestEnvironment::new();
    let f = fixture();
    let good = coin::ml::load::read_tensor_file(&f.join("mm_projector.bin")).expect("reads");
    let mut extra = good.clone();
    extra.push((
        "model.mm_projector.extra.weight".to_string(),
        candle_core::Tensor::zeros(2, DType::F32, &Device::Cpu).expect("tensor"),
    ));
    let bytes = coin::ml::train::torch_save::torch_save_bytes(&extra).expect("torch save");
    let bad = env.write("extra/mm_projector.bin", bytes);
    let out = env
        .coin(&[
            "generate",
            "--model",
            f.join("vicuna").to_str().expect("utf8"),
            "--vision-tower",
            f.join("clip").to_str().expect("utf8"),
            "--projector",
            bad.to_str().expect("utf8"),
            "--image",
            f.join("image_a.png").to_str().expect("utf8"),
            "--prompt",
            "hi",
        ])
        .code(1);
    assert!(
        out.stderr.contains(&*bad.to_string_lossy())
            && out.stderr.contains("model.mm_projector.extra.weight"),
        "{}",
        out.stderr
    );
}
