//! `coin model init --tiny` and `coin generate` end to end on the tiny model.

use crate::common::TestEnvironment;

fn write_png(env: &TestEnvironment, rel: &str) {
    let img = image::RgbImage::from_fn(40, 24, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 10) as u8, 99])
    });
    img.save(env.path(rel)).expect("png written");
}

#[test]
fn model_init_tiny_then_generate() {
    let env = TestEnvironment::new();
    let out = env
        .coin(&["model", "init", "--tiny", "m", "--seed", "4", "--json"])
        .success()
        .json();
    assert!(out["model"].as_str().expect("path").ends_with("m"));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        assert!(env.path("m").join(f).exists(), "{f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.path("m/config.json")).expect("r"))
            .expect("json");
    assert_eq!(cfg["architectures"][0], "LlavaForConditionalGeneration");
    assert_eq!(cfg["image_token_index"], 3);
    write_png(&env, "cube.png");
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            "m",
            "--image",
            "cube.png",
            "--prompt",
            "What is it?",
            "--max-new-tokens",
            "5",
        ];
        a.extend_from_slice(extra);
        env.coin(&a)
    };
    let j = gen(&["--json", "--logits"]).success().json();
    let ids = j["token_ids"].as_array().expect("ids");
    assert!(!ids.is_empty() && ids.len() <= 5);
    assert_eq!(
        j["first_step_logits"].as_array().expect("logits").len(),
        cfg["text_config"]["vocab_size"].as_u64().expect("n") as usize
    );
    let j2 = gen(&["--json"]).success().json();
    assert_eq!(j2["token_ids"], j["token_ids"], "deterministic");
    assert!(j2.get("first_step_logits").is_none());
    let plain = gen(&[]).success();
    assert_eq!(
        plain.stdout.trim_end_matches('\n'),
        j["text"].as_str().expect("text")
    );
    for m in ["resize", "crop"] {
        gen(&["--image-aspect", m, "--json"]).success();
    }
    // Usage and user errors.
    insta::assert_snapshot!(env.render(&gen(&["--logits"])), @r"
    ------- stderr -------
    Error: --logits needs --json
    [exit status: 2]
    ");
    insta::assert_snapshot!(env.render(&gen(&["--raw"])), @r"
    ------- stderr -------
    Error: with --raw the prompt must contain <image>
    [exit status: 2]
    ");
    insta::assert_snapshot!(env.coin_render(&[
        "generate", "--model", "nope", "--image", "cube.png", "--prompt", "x",
    ]), @r"
    ------- stderr -------
    Error: '$TEST_ENV/work/nope' is not a model directory: no config.json
    [exit status: 1]
    ");
    insta::assert_snapshot!(env.coin_render(&[
        "generate", "--model", "m", "--image", "missing.png", "--prompt", "x",
    ]), @"
    ------- stderr -------
    Error: the image '$TEST_ENV/work/missing.png' does not exist
    [exit status: 1]
    ");
}

#[test]
fn model_init_other_layouts_load() {
    let env = TestEnvironment::new();
    write_png(&env, "i.png");
    env.coin(&["model", "init", "--tiny", "n", "--layout", "hf-new"])
        .success();
    let a = env
        .coin(&[
            "generate",
            "--model",
            "n",
            "--image",
            "i.png",
            "--prompt",
            "q",
            "--json",
            "--max-new-tokens",
            "3",
        ])
        .success()
        .json();
    env.coin(&["model", "init", "--tiny", "h"]).success();
    let b = env
        .coin(&[
            "generate",
            "--model",
            "h",
            "--image",
            "i.png",
            "--prompt",
            "q",
            "--json",
            "--max-new-tokens",
            "3",
        ])
        .success()
        .json();
    assert_eq!(a["token_ids"], b["token_ids"]);
    env.coin(&["model", "init", "--tiny", "s", "--layout", "split"])
        .success();
    assert!(env.path("s/llm/model.safetensors.index.json").exists());
    let c = env
        .coin(&[
            "generate",
            "--model",
            "s/llm",
            "--vision-tower",
            "s/clip",
            "--projector",
            "s/mm_projector.safetensors",
            "--image",
            "i.png",
            "--prompt",
            "q",
            "--json",
            "--max-new-tokens",
            "3",
        ])
        .success()
        .json();
    assert_eq!(c["token_ids"], b["token_ids"]);
    let corpus = env.path("corpus.txt");
    #[allow(clippy::disallowed_methods)]
    std::fs::write(&corpus, "red green blue cube sphere cone\n".repeat(5)).expect("w");
    env.coin(&["model", "init", "--tiny", "c", "--corpus", "corpus.txt"])
        .success();
    // The corpus changes the tokenizer's merges (and nothing makes it fail to load).
    let tok = |dir: &str| std::fs::read(env.path(dir).join("tokenizer.json")).expect("tokenizer");
    assert_ne!(tok("c"), tok("h"), "--corpus made no difference");
    env.coin(&[
        "generate",
        "--model",
        "c",
        "--image",
        "i.png",
        "--prompt",
        "red cube",
        "--max-new-tokens",
        "2",
    ])
    .success();
}
