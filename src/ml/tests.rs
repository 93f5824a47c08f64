//! Engine tests on tiny models: the three on-disk layouts load to the same numbers, the KV
//! cache and batching change nothing but float rounding (measured ≤ 1.4e-6 on logits of
//! magnitude ~8, asserted < [`ROUNDING`]), errors name the tensor.
#![allow(clippy::disallowed_methods)]

use candle_core::{DType, Device, Tensor};

use super::config::ImageToken;
use super::generate::{generate, generate_segments, GenerateRequest, GenerateSettings};
use super::image::{AspectMode, Rgb8};
use super::llama::{attention_mask, KvCache};
use super::llava::{load_model, LoadedModel, ModelSource, Segment};
use super::load::{read_tensor_file, write_safetensors};
use super::tiny::{write_tiny, TinyLayout, TinyOptions};
use super::MlError;

/// Two computations that differ only in summation order (a padded batch, a cached prefix):
/// measured ≤ 1.4e-6 apart, the bound HF parity uses too (tests/test_parity.rs `LOGIT_TOL`).
const ROUNDING: f32 = 5e-6;

fn tiny(dir: &std::path::Path, layout: TinyLayout, seed: u64) -> std::path::PathBuf {
    write_tiny(
        dir,
        &TinyOptions {
            seed,
            layout,
            ..TinyOptions::default()
        },
    )
    .expect("tiny model writes")
}

fn load(
    dir: &std::path::Path,
    vision: Option<&std::path::Path>,
    proj: Option<&std::path::Path>,
) -> super::Result<LoadedModel> {
    let src = ModelSource::resolve(dir, vision, proj)?;
    load_model(&src, &Device::Cpu, DType::F32)
}

fn test_image() -> Rgb8 {
    let (w, h) = (41usize, 27usize);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[(x * 6) as u8, (y * 9) as u8, ((x * y) % 251) as u8]);
        }
    }
    Rgb8 {
        width: w,
        height: h,
        data,
    }
}

fn first_logits(m: &mut LoadedModel, q: &str) -> Vec<f32> {
    let s = GenerateSettings {
        max_new_tokens: 1,
        aspect: AspectMode::Pad,
        return_logits: true,
        ignore_eos: false,
    };
    let o =
        generate(m, None, &[GenerateRequest::question(q, test_image())], &s).expect("generates");
    o[0].first_step_logits.clone().expect("logits asked for")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn all_layouts_load_to_the_same_model() {
    let t = tempfile::tempdir().expect("tmp");
    let hf = tiny(&t.path().join("hf"), TinyLayout::Hf, 5);
    let new = tiny(&t.path().join("new"), TinyLayout::HfNew, 5);
    let split = tiny(&t.path().join("split"), TinyLayout::Split, 5);
    let mut a = load(&hf, None, None).expect("hf loads");
    let mut b = load(&new, None, None).expect("hf-new loads");
    let mut c = load(
        &split,
        Some(&t.path().join("split/clip")),
        Some(&t.path().join("split/mm_projector.safetensors")),
    )
    .expect("split loads");
    assert_eq!(a.model.layout, super::load::Layout::HfOld);
    assert_eq!(b.model.layout, super::load::Layout::HfNew);
    assert_eq!(c.model.layout, super::load::Layout::Split);
    assert_eq!(c.model.config.image_token, ImageToken::Placeholder);
    // Without --projector, `mm_projector.safetensors` next to the LLaMA weights is found.
    std::fs::copy(
        t.path().join("split/mm_projector.safetensors"),
        split.join("mm_projector.safetensors"),
    )
    .expect("cp");
    let mut c2 = load(&split, Some(&t.path().join("split/clip")), None).expect("split loads");
    let la = first_logits(&mut a, "What color is the cube?");
    let lc2 = first_logits(&mut c2, "What color is the cube?");
    let lb = first_logits(&mut b, "What color is the cube?");
    let lc = first_logits(&mut c, "What color is the cube?");
    assert_eq!(la.len(), a.model.config.text.vocab_size);
    assert!(max_diff(&la, &lb) == 0.0);
    // The split setup tokenizes around <image> chunk by chunk; with a byte-level BPE the ids are
    // the same, and so are the ops: the numbers agree bit for bit.
    assert_eq!(la, lc, "split setup vs llava-hf");
    assert_eq!(lc, lc2, "found projector = given projector");
    // A different seed is a different model.
    let other = tiny(&t.path().join("other"), TinyLayout::Hf, 6);
    let mut d = load(&other, None, None).expect("loads");
    assert!(max_diff(&la, &first_logits(&mut d, "What color is the cube?")) > 1e-3);
}

#[test]
fn tiny_model_is_deterministic_and_tokenizer_encodes_any_ascii() {
    let t = tempfile::tempdir().expect("tmp");
    tiny(&t.path().join("a"), TinyLayout::Hf, 9);
    tiny(&t.path().join("b"), TinyLayout::Hf, 9);
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert_eq!(
            std::fs::read(t.path().join("a").join(f)).expect("a"),
            std::fs::read(t.path().join("b").join(f)).expect("b"),
            "{f} differs between two runs with the same seed"
        );
    }
    let m = load(&t.path().join("a"), None, None).expect("loads");
    let ascii: String =
        (32u8..127).map(char::from).collect::<String>() + "\n\tzebra QUIXOTIC 12345";
    let ids = m.tokenizer.encode(&ascii, false).expect("encodes");
    assert!(!ids.contains(&0), "no <unk> for ASCII: {ids:?}");
    assert_eq!(m.tokenizer.decode(&ids).expect("decodes"), ascii);
    let segs = m
        .tokenizer
        .encode_prompt("hi <image>\nthere")
        .expect("prompt");
    assert_eq!(segs.len(), 3);
    assert_eq!(segs[1], Segment::Image);
    assert!(
        matches!(&segs[0], Segment::Text(t) if t[0] == 1),
        "BOS first: {segs:?}"
    );
}

#[test]
fn kv_cache_matches_full_recompute_and_batching_changes_nothing() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = tiny(&t.path().join("m"), TinyLayout::Hf, 2);
    let mut m = load(&dir, None, None).expect("loads");
    let s = GenerateSettings {
        max_new_tokens: 6,
        aspect: AspectMode::Pad,
        return_logits: true,
        ignore_eos: false,
    };
    let reqs = [
        GenerateRequest::question("What is it?", test_image()),
        GenerateRequest::question(
            "A much longer question about the picture, please?",
            Rgb8::filled(30, 50, [200, 10, 40]),
        ),
    ];
    let batched = generate(&mut m, None, &reqs, &s).expect("batch");
    for (i, r) in reqs.iter().enumerate() {
        let single = generate(&mut m, None, std::slice::from_ref(r), &s).expect("single");
        assert_eq!(single[0].token_ids, batched[i].token_ids, "row {i}");
        let d = max_diff(
            single[0].first_step_logits.as_deref().expect("l"),
            batched[i].first_step_logits.as_deref().expect("l"),
        );
        eprintln!("row {i}: batched vs single max |logit diff| {d:e}");
        assert!(d < ROUNDING, "row {i}: {d}");
    }
    // Incremental decoding with the cache equals a full forward over the whole sequence.
    let model = &m.model;
    let ids: Vec<u32> = vec![1, 40, 50, 60, 70, 80];
    let full_x = model
        .llm
        .embed(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .expect("t")
                .unsqueeze(0)
                .expect("u"),
        )
        .expect("e");
    let n = ids.len();
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5]], &Device::Cpu).expect("pos");
    let mask = attention_mask(&[vec![true; n]], n, &Device::Cpu).expect("mask");
    let full = model
        .llm
        .forward_embeds(&full_x, &pos, &mask, None)
        .expect("full");
    let full_last: Vec<f32> = model
        .llm
        .logits(&full.narrow(1, n - 1, 1).expect("n"))
        .expect("l")
        .flatten_all()
        .expect("f")
        .to_vec1()
        .expect("v");
    let mut cache = KvCache::new();
    let mut last = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let x = model
            .llm
            .embed(&Tensor::new(&[[*id]], &Device::Cpu).expect("t"))
            .expect("e");
        let pos = Tensor::new(&[[i as u32]], &Device::Cpu).expect("p");
        let mask = attention_mask(&[vec![true; i + 1]], 1, &Device::Cpu).expect("m");
        let h = model
            .llm
            .forward_embeds(&x, &pos, &mask, Some(&mut cache))
            .expect("step");
        last = model
            .llm
            .logits(&h)
            .expect("l")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
    }
    assert_eq!(cache.len(), n);
    let d = max_diff(&full_last, &last);
    eprintln!("kv cache vs full recompute: max |logit diff| {d:e}");
    assert!(d < ROUNDING, "{d}");
    // generate_segments with zero new tokens produces nothing.
    let out = generate_segments(
        model,
        &[vec![Segment::Text(vec![1, 5])]],
        &[],
        0,
        &[2],
        false,
    )
    .expect("gen");
    assert!(out[0].0.is_empty());
}

#[test]
fn missing_tensor_and_shape_mismatch_name_the_tensor() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = tiny(&t.path().join("m"), TinyLayout::Hf, 1);
    let file = dir.join("model.safetensors");
    let tensors = read_tensor_file(&file).expect("reads");
    let victim = "language_model.model.layers.1.mlp.up_proj.weight";
    let without: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k != victim)
        .cloned()
        .collect();
    write_safetensors(&file, &without).expect("writes");
    let err = load(&dir, None, None).err().expect("must fail");
    assert!(
        matches!(&err, MlError::MissingTensor { name, .. } if name == victim),
        "{err}"
    );
    assert!(err.to_string().contains(victim));

    let mut wrong = tensors.clone();
    for (k, v) in wrong.iter_mut() {
        if k == victim {
            *v = Tensor::zeros((3, 64), DType::F32, &Device::Cpu).expect("z");
        }
    }
    write_safetensors(&file, &wrong).expect("writes");
    let err = load(&dir, None, None).err().expect("must fail");
    match &err {
        MlError::ShapeMismatch {
            name,
            expected,
            actual,
            ..
        } => {
            assert_eq!(name, victim);
            assert_eq!(expected, &vec![128, 64]);
            assert_eq!(actual, &vec![3, 64]);
        }
        other => panic!("wrong error: {other}"),
    }
    // An unsupported config names the key.
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).expect("r")).expect("json");
    cfg["projector_hidden_act"] = "relu6".into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("s")).expect("w");
    let err = load(&dir, None, None).err().expect("must fail");
    assert!(err.to_string().contains("projector_hidden_act"), "{err}");
    // A split setup without the CLIP directory says what to pass.
    let split = tiny(&t.path().join("s"), TinyLayout::Split, 1);
    let err = load(&split, None, None).err().expect("must fail");
    assert!(err.to_string().contains("--vision-tower"), "{err}");
}
