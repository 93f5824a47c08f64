//! `coin tokenize` end to end against the slow-tokenizer goldens in `tests/fixtures/spm`
//! (sentencepiece 0.1.99, transformers 4.31.0; see its README).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::TestEnvironment;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm")
}

fn goldens() -> Value {
    let text = std::fs::read_to_string(fixtures().join("goldens.json")).expect("goldens");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn every_text_and_prompt_golden_through_the_cli() {
    let env = TestEnvironment::new();
    let g = goldens();
    let mut checked = 0;
    for (name, s) in g["settings"].as_object().expect("settings") {
        let dir = fixtures().join(name);
        let dir = dir.to_str().expect("utf-8 path");
        for case in s["texts"].as_array().expect("texts") {
            let text = case["text"].as_str().expect("text");
            if text.contains('\0') {
                continue; // not passable as an argument; the unit tests cover it
            }
            let out = env
                .coin(&["tokenize", "--model", dir, "--text", text, "--json"])
                .success()
                .json();
            assert_eq!(out["ids"], case["ids"], "{name}: {text:?}");
            assert_eq!(
                out["decoded"], case["decoded"],
                "{name}: decode of {text:?}"
            );
            checked += 1;
        }
        for case in s["prompts"].as_array().expect("prompts") {
            let prompt = case["prompt"].as_str().expect("prompt");
            let out = env
                .coin(&[
                    "tokenize", "--model", dir, "--prompt", prompt, "--raw", "--json",
                ])
                .success()
                .json();
            assert_eq!(out["ids"], case["ids"], "{name}: {prompt:?}");
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked} goldens");
}

#[test]
fn prompt_with_image_is_the_vicuna_generation_prompt() {
    let env = TestEnvironment::new();
    let g = goldens();
    let dir = fixtures().join("legacy_false");
    let dir = dir.to_str().expect("utf-8 path");
    let want = &g["settings"]["legacy_false"]["prompts"][0];
    assert!(want["prompt"]
        .as_str()
        .expect("s")
        .ends_with("USER: <image>\nWhat color is the cube? ASSISTANT:"));
    let out = env
        .coin(&[
            "tokenize",
            "--model",
            dir,
            "--prompt",
            "What color is the cube?",
            "--image",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(out["ids"], want["ids"]);
    assert_eq!(out["input"], want["prompt"]);
    let ids = out["ids"].as_array().expect("ids");
    let at = ids.iter().position(|v| v == -200).expect("an image place");
    assert_eq!(out["pieces"][at], "<image>");
    assert_eq!(out["pieces"][0], "<s>");
    // The plain output: one `id<TAB>piece` line per token.
    let plain = env
        .coin(&[
            "tokenize",
            "--model",
            dir,
            "--prompt",
            "What color is the cube?",
            "--image",
        ])
        .success();
    let lines: Vec<&str> = plain.stdout.lines().collect();
    assert_eq!(lines.len(), ids.len());
    assert_eq!(lines[0], "1\t<s>");
    assert_eq!(lines[at], "-200\t<image>");
}

#[test]
fn a_corrupt_tokenizer_model_is_a_user_error_naming_the_file() {
    let env = TestEnvironment::new();
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        let bytes = std::fs::read(fixtures().join("legacy_true").join(f)).expect("read");
        env.write(Path::new("m").join(f), bytes);
    }
    let model = env.write("m/tokenizer.model", b"\x0a\x05\x0a\x03abc\xff\xff");
    let out = env
        .coin(&["tokenize", "--model", "m", "--text", "hi"])
        .code(1);
    assert!(
        out.stderr.contains(&*model.to_string_lossy()) || out.stderr.contains("m/tokenizer.model"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("SentencePiece"), "{}", out.stderr);
    assert!(
        out.stderr.contains("Copy tokenizer.model again"),
        "{}",
        out.stderr
    );
    // A unigram model is refused with the reason, not misread.
    let good = std::fs::read(fixtures().join("tiny.model")).expect("model");
    let mut unigram = good.clone();
    // TrainerSpec.model_type (field 3, varint) = 2 (BPE) → 1 (unigram).
    let at = find_model_type(&unigram).expect("model_type in the trainer spec");
    unigram[at] = 1;
    env.write("m/tokenizer.model", unigram);
    let out = env
        .coin(&["tokenize", "--model", "m", "--text", "hi"])
        .code(1);
    assert!(out.stderr.contains("unigram"), "{}", out.stderr);
}

/// The offset of the model_type value byte inside the serialized TrainerSpec (field 2 of
/// ModelProto): the bytes `0x18 0x02` after the TrainerSpec's tag and length.
fn find_model_type(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    // Skip top-level fields until field 2 (tag 0x12).
    while i < bytes.len() {
        let tag = bytes[i];
        i += 1;
        let (len, n) = varint(&bytes[i..])?;
        i += n;
        if tag == 0x12 {
            let spec = &bytes[i..i + len as usize];
            let p = spec.windows(2).position(|w| w == [0x18, 0x02])?;
            return Some(i + p + 1);
        }
        i += len as usize;
    }
    None
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (k, &x) in b.iter().enumerate().take(10) {
        v |= u64::from(x & 0x7f) << (7 * k);
        if x & 0x80 == 0 {
            return Some((v, k + 1));
        }
    }
    None
}
