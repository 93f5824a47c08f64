//! Model and adapter folders from a stranger: hostile `.bin` checkpoints and shard indexes end
//! `coin generate` with a clean user error (exit 1, the file named), never a crash.

use std::io::Write;

use crate::common::{Output, TestEnvironment};

/// A torch.save-shaped zip whose data.pkl is `pkl` (entries stored, as torch writes them).
fn torch_zip(pkl: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in [
        ("archive/data.pkl", pkl),
        ("archive/byteorder", b"little"),
        ("archive/version", b"3\n"),
    ] {
        w.start_file(name, opts).expect("entry");
        w.write_all(data).expect("data");
    }
    w.finish().expect("zip").into_inner()
}

/// The attacker's data.pkl: 200,000 nested MARKs (a recursive unpickler overflows its stack).
fn deep_marks() -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b'(', 200_000));
    p.push(b'.');
    p
}

/// A data.pkl that calls `os.system("touch pwned")`.
fn os_system() -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"cos\nsystem\n");
    p.push(b'X');
    p.extend_from_slice(&11u32.to_le_bytes());
    p.extend_from_slice(b"touch pwned");
    p.extend_from_slice(&[0x85, b'R', b'.']);
    p
}

fn setup(env: &TestEnvironment) {
    env.coin(&["model", "init", "--tiny", "m", "--seed", "3"])
        .success();
    let img =
        image::RgbImage::from_fn(24, 24, |x, y| image::Rgb([(x * 9) as u8, (y * 9) as u8, 7]));
    img.save(env.path("i.png")).expect("png");
}

fn generate(env: &TestEnvironment, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        "m",
        "--image",
        "i.png",
        "--prompt",
        "What?",
        "--max-new-tokens",
        "2",
    ];
    args.extend_from_slice(extra);
    env.coin(&args)
}

/// Exit 1 with one error naming `file` and `what`.
fn refused(out: Output, file: &str, what: &str) {
    let out = out.code(1);
    assert!(
        out.stderr.contains(file) && out.stderr.contains(what),
        "want '{file}' and '{what}' in:\n{}",
        out.stderr
    );
}

#[test]
fn hostile_adapter_and_projector_bins_fail_cleanly() {
    let env = TestEnvironment::new();
    setup(&env);
    env.write(
        "a/adapter_config.json",
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#,
    );
    env.write("a/adapter_model.bin", torch_zip(&deep_marks()));
    refused(
        generate(&env, &["--adapter", "a"]),
        "adapter_model.bin",
        "nested MARKs",
    );
    env.write("a/adapter_model.bin", torch_zip(&os_system()));
    refused(
        generate(&env, &["--adapter", "a"]),
        "adapter_model.bin",
        "'os.system'",
    );
    assert!(!env.path("pwned").exists() && !env.path("a/pwned").exists());
    // Nothing was written beside the user's files (no conversion cache).
    let mut names: Vec<String> = std::fs::read_dir(env.path("a"))
        .expect("ls")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.bin"]);
    // A valid adapter (.bin, read by coin's reader) loads; a hostile projector beside it fails.
    let dev = candle_core::Device::Cpu;
    let m = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
    let lora = [
        (
            format!("{m}.lora_A.weight"),
            candle_core::Tensor::ones((2, 64), candle_core::DType::F32, &dev).expect("a"),
        ),
        (
            format!("{m}.lora_B.weight"),
            candle_core::Tensor::ones((64, 2), candle_core::DType::F32, &dev).expect("b"),
        ),
    ];
    let bytes = coin::ml::train::torch_save::torch_save_bytes(&lora).expect("bin");
    env.write("a/adapter_model.bin", bytes);
    generate(&env, &["--adapter", "a"]).success();
    env.write("a/non_lora_trainables.bin", torch_zip(&deep_marks()));
    refused(
        generate(&env, &["--adapter", "a"]),
        "non_lora_trainables.bin",
        "nested MARKs",
    );
}

#[test]
fn hostile_model_weights_and_shard_indexes_fail_cleanly() {
    let env = TestEnvironment::new();
    setup(&env);
    // The model's own weights as a hostile pytorch_model.bin.
    std::fs::remove_file(env.path("m/model.safetensors")).expect("rm");
    env.write("m/pytorch_model.bin", torch_zip(&deep_marks()));
    refused(generate(&env, &[]), "pytorch_model.bin", "nested MARKs");
    // A truncated checkpoint.
    let whole = torch_zip(&os_system());
    env.write("m/pytorch_model.bin", &whole[..whole.len() / 2]);
    refused(
        generate(&env, &[]),
        "pytorch_model.bin",
        "truncated or damaged",
    );
    // A shard index naming a file outside the model folder.
    std::fs::remove_file(env.path("m/pytorch_model.bin")).expect("rm");
    env.write("outside/x.bin", torch_zip(&os_system()));
    env.write(
        "m/pytorch_model.bin.index.json",
        r#"{"weight_map": {"w": "../outside/x.bin"}}"#,
    );
    refused(
        generate(&env, &[]),
        "pytorch_model.bin.index.json",
        "'../outside/x.bin'",
    );
}

#[test]
fn a_hostile_split_projector_fails_cleanly() {
    let env = TestEnvironment::new();
    env.coin(&[
        "model", "init", "--tiny", "s", "--layout", "split", "--seed", "3",
    ])
    .success();
    let img =
        image::RgbImage::from_fn(24, 24, |x, y| image::Rgb([(x * 9) as u8, (y * 9) as u8, 7]));
    img.save(env.path("i.png")).expect("png");
    env.write("evil/mm_projector.bin", torch_zip(&deep_marks()));
    let out = env.coin(&[
        "generate",
        "--model",
        "s/llm",
        "--vision-tower",
        "s/clip",
        "--projector",
        "evil/mm_projector.bin",
        "--image",
        "i.png",
        "--prompt",
        "What?",
    ]);
    refused(out, "evil/mm_projector.bin", "nested MARKs");
}
