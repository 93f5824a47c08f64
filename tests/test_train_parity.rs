//! Training parity with PyTorch: tests/fixtures/train was made by scripts/make_train_fixtures.py
//! from the tiny llava-hf parity model. For a PEFT LoRA (tests/fixtures/parity/adapter) and a CoIN
//! MoELoRA written by torch.save in CoIN's own layout (tests/fixtures/train/moelora), the masked
//! loss of a right-padded batch of two (image, prompt, answer) rows must equal HF's
//! `model(..., labels=...).loss` within the bound docs/training.md and README.md claim, and the
//! gradients of adapter and projector tensors must equal torch's. This test only reads the
//! fixtures (in a temp copy, so nothing here could touch the committed files).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use coin::ml::generate::{generate, GenerateRequest, GenerateSettings};
use coin::ml::image::{AspectMode, Rgb8};
use coin::ml::llava::{load_model, Llava, ModelSource, Segment};
use coin::ml::peft::PeftAdapter;
use coin::ml::train::batch::{forward_batch, TrainExample};
use coin::ml::train::loss::{masked_cross_entropy, IGNORE_INDEX};
use coin::ml::train::params::{AdapterKind, AdapterSettings, TrainableParams};
use coin::ml::train::save::save_adapter;
use serde_json::Value;

use crate::common::TestEnvironment;

/// Bound on the loss difference. Claimed: within 5e-7 (measured 0 for LoRA, 4.8e-7 for MoELoRA:
/// one f32 rounding of a loss of 6.2, whose spacing is 4.77e-7); asserted at two roundings.
const LOSS_TOL: f64 = 1e-6;
/// Bound on max |ours − torch| of a gradient tensor, relative to max |torch| of that tensor.
/// Claimed: below 2e-6 (measured worst 1.7e-6); asserted with a 2.5× margin.
const GRAD_REL_TOL: f64 = 5e-6;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &Path) -> Value {
    let bytes = std::fs::read(path).expect("fixture exists");
    serde_json::from_slice(&bytes).expect("fixture parses")
}

fn goldens() -> Value {
    json(&fixtures().join("train/goldens.json"))
}

fn model() -> Llava {
    let src = ModelSource::Hf(fixtures().join("parity/model"));
    load_model(&src, &Device::Cpu, DType::F32)
        .expect("parity model loads")
        .model
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

/// The fixture batch as `TrainExample`s, built straight from HF's input_ids and labels: the run
/// of image tokens becomes one `Segment::Image`, padding (attention mask 0) is dropped (our
/// batcher pads again), every other position keeps its label.
fn examples(g: &Value) -> (Vec<TrainExample>, Vec<Tensor>) {
    let b = &g["batch"];
    let image_id = g["image_token_id"].as_i64().expect("int");
    let seq = g["image_seq_len"].as_u64().expect("int") as usize;
    let mut out = Vec::new();
    for ((ids, labels), mask) in b["input_ids"]
        .as_array()
        .expect("rows")
        .iter()
        .zip(b["labels"].as_array().expect("rows"))
        .zip(b["attention_mask"].as_array().expect("rows"))
    {
        let (ids, labels, mask) = (ints(ids), ints(labels), ints(mask));
        let mut segments = Vec::new();
        let mut text = Vec::new();
        let mut text_labels = Vec::new();
        let mut i = 0;
        while i < ids.len() && mask[i] == 1 {
            if ids[i] == image_id {
                assert!(ids[i..i + seq].iter().all(|&t| t == image_id), "image run");
                assert!(labels[i..i + seq].iter().all(|&l| l == IGNORE_INDEX));
                segments.push(Segment::Text(std::mem::take(&mut text)));
                segments.push(Segment::Image);
                i += seq;
            } else {
                text.push(ids[i] as u32);
                text_labels.push(labels[i]);
                i += 1;
            }
        }
        assert!(labels[i..].iter().all(|&l| l == IGNORE_INDEX), "padding");
        segments.push(Segment::Text(text));
        out.push(TrainExample {
            segments,
            text_labels,
        });
    }
    let pv = json(&fixtures().join("parity/goldens.json"));
    let pixels = b["pixel_keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            let v: Vec<f32> = f64s(&pv["pixel_values"][k.as_str().expect("s")])
                .into_iter()
                .map(|x| x as f32)
                .collect();
            Tensor::from_vec(v, (3, 32, 32), &Device::Cpu).expect("pixels")
        })
        .collect();
    (out, pixels)
}

/// A copy of a fixture adapter dir in a temp dir.
fn copied(rel: &str, into: &Path) -> PathBuf {
    let to = into.join(rel.replace('/', "_"));
    std::fs::create_dir_all(&to).expect("mkdir");
    for e in std::fs::read_dir(fixtures().join(rel)).expect("fixture dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
    to
}

/// Loss and gradient comparison for one adapter kind; returns (loss diff, max rel grad diff).
fn check(kind_key: &str, kind: AdapterKind) -> (f64, f64) {
    let g = goldens();
    let want = &g[kind_key];
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = copied(want["adapter"].as_str().expect("s"), tmp.path());
    let settings = AdapterSettings {
        kind,
        r: want["r"].as_u64().expect("int") as usize,
        alpha: want["alpha"].as_f64().expect("num"),
        dropout: 0.0,
        ..AdapterSettings::default()
    };
    let mut m = model();
    let params = TrainableParams::attach_from(&mut m, &settings, &dir).expect("attach_from");
    let (ex, px) = examples(&g);
    let (logits, labels) = forward_batch(&m, &ex, &px).expect("forward");
    let loss = masked_cross_entropy(&logits, &labels).expect("loss");
    let ours = loss.to_scalar::<f32>().expect("scalar") as f64;
    let golden = want["loss"].as_f64().expect("num");
    let loss_diff = (ours - golden).abs();
    eprintln!("{kind_key}: loss ours {ours:.7} HF {golden:.7} |diff| {loss_diff:e}");
    assert!(loss_diff < LOSS_TOL, "{kind_key}: loss {ours} vs {golden}");

    let grads = loss.backward().expect("backward");
    assert_eq!(params.missing_gradients(&grads), Vec::<String>::new());
    let mut worst = 0f64;
    let golden_grads = want["grads"].as_object().expect("grads");
    assert!(
        golden_grads.len() >= 7,
        "a few adapter and projector tensors"
    );
    for (name, gv) in golden_grads {
        let var = params.get(name).unwrap_or_else(|| panic!("no var {name}"));
        let ours: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1())
            .expect("values");
        let theirs = f64s(gv);
        assert_eq!(ours.len(), theirs.len(), "{name}: size");
        let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name}: zero golden gradient");
        let d = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        let rel = d / scale;
        eprintln!(
            "{kind_key}: {name}: max |grad diff| {d:e} (rel. to max |grad| {scale:e}: {rel:e})"
        );
        assert!(
            rel < GRAD_REL_TOL,
            "{kind_key}: {name}: gradient differs by {d} (max |grad| {scale})"
        );
        worst = worst.max(rel);
    }
    // The inference loader on the same directory gives the same loss (no vars).
    let mut fresh = model();
    let adapter = PeftAdapter::load(&dir, &Device::Cpu, DType::F32).expect("adapter loads");
    let inf = adapter
        .with_attached(&mut fresh, |m| {
            let (l, lab) = forward_batch(m, &ex, &px).expect("forward");
            masked_cross_entropy(&l, &lab)
                .and_then(|t| Ok(t.to_scalar::<f32>()?))
                .expect("loss")
        })
        .expect("attaches");
    eprintln!(
        "{kind_key}: inference-path loss |diff| {:e}",
        (inf as f64 - golden).abs()
    );
    assert!(
        (inf as f64 - golden).abs() < LOSS_TOL,
        "{kind_key}: inference-path loss {inf} vs {golden}"
    );
    (loss_diff, worst)
}

#[test]
fn masked_loss_and_gradients_match_hf_with_peft_lora() {
    check("lora", AdapterKind::Lora);
}

#[test]
fn masked_loss_and_gradients_match_torch_with_coin_moelora() {
    check("moelora", AdapterKind::MoeLora { experts: 4 });
}

#[test]
fn fixture_labels_supervise_exactly_the_answers_and_eos() {
    let g = goldens();
    let (ex, _) = examples(&g);
    // Row 0: "A red cube on a table." + </s>, row 1: "No." + </s>: the supervised labels are the
    // last tokens of each row's text, ending with EOS, everything before them masked.
    for e in &ex {
        let sup: Vec<usize> = (0..e.text_labels.len())
            .filter(|&i| e.text_labels[i] != IGNORE_INDEX)
            .collect();
        assert!(!sup.is_empty());
        assert_eq!(*sup.last().expect("one"), e.text_labels.len() - 1);
        assert_eq!(
            sup.len(),
            sup.last().expect("one") - sup[0] + 1,
            "contiguous"
        );
        assert_eq!(*e.text_labels.last().expect("one"), 2, "</s> supervised");
    }
    // HF PEFT loads the llava-hf key spellings coin writes and ignores CoIN's on llava-hf.
    let reads = &g["hf_peft_reads"];
    assert_eq!(
        reads["model.language_model.layers (transformers >= 4.52)"],
        true
    );
    assert_eq!(reads["model.layers (CoIN/LLaVA)"], false);
}

/// `coin generate --adapter DIR` with CoIN's MoELoRA `.bin` files (and its projector): the same
/// greedy tokens and last-position logits as the PyTorch reimplementation.
#[test]
fn coin_generate_with_a_coin_moelora_dir_matches_torch() {
    let g = goldens();
    let want = &g["moelora"];
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = copied("train/moelora", tmp.path());
    let pg = json(&fixtures().join("parity/goldens.json"));
    let case = &pg["cases"][0];
    let image = fixtures()
        .join("parity")
        .join(case["image"].as_str().expect("s"));

    // Library path.
    let src = ModelSource::Hf(fixtures().join("parity/model"));
    let mut loaded = load_model(&src, &Device::Cpu, DType::F32).expect("loads");
    let adapter = PeftAdapter::load(&dir, &Device::Cpu, DType::F32).expect("adapter loads");
    assert_eq!(adapter.kind, AdapterKind::MoeLora { experts: 4 });
    assert_eq!(adapter.layers.len(), 2 * 7);
    assert!(adapter.projector.is_some());
    let settings = GenerateSettings {
        max_new_tokens: 8,
        aspect: AspectMode::Pad,
        return_logits: true,
        ignore_eos: false,
    };
    let req = GenerateRequest::question(
        case["question"].as_str().expect("s"),
        Rgb8::open(&image).expect("png"),
    );
    let out = generate(&mut loaded, Some(&adapter), &[req], &settings).expect("generates");
    let logits = out[0].first_step_logits.as_deref().expect("logits");
    let golden = f64s(&want["case0_logits"]);
    let d = logits
        .iter()
        .zip(&golden)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0f64, f64::max);
    eprintln!("moelora generate: max |logit diff| {d:e}");
    assert!(
        d < crate::test_parity::LOGIT_TOL as f64,
        "logits differ by {d}"
    );
    let tokens: Vec<u32> = ints(&want["case0_tokens"])
        .into_iter()
        .map(|t| t as u32)
        .collect();
    assert_eq!(out[0].token_ids, tokens);

    // CLI path.
    let env = TestEnvironment::new();
    let model_dir = fixtures().join("parity/model");
    let out = env
        .coin(&[
            "generate",
            "--model",
            model_dir.to_str().expect("utf8"),
            "--adapter",
            dir.to_str().expect("utf8"),
            "--image",
            image.to_str().expect("utf8"),
            "--prompt",
            case["question"].as_str().expect("s"),
            "--max-new-tokens",
            "8",
            "--json",
        ])
        .success()
        .json();
    let got: Vec<u32> = out["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("int") as u32)
        .collect();
    assert_eq!(got, tokens);
}

/// What coin writes for the parity LoRA (read with `attach_from`, saved with `save_adapter`) is
/// byte-for-byte the committed tests/fixtures/train/coin_lora, which make_train_fixtures.py
/// loaded with HF PEFT onto the llava-hf model: logits identical to PEFT's own adapter, no
/// missing/unexpected-key warning. `COIN_UPDATE_FIXTURES=1` rewrites the directory (then rerun the
/// script).
#[test]
#[allow(clippy::disallowed_methods)]
fn the_lora_dir_coin_writes_is_the_one_hf_peft_read() {
    let settings = AdapterSettings {
        kind: AdapterKind::Lora,
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        ..AdapterSettings::default()
    };
    let mut m = model();
    let p = TrainableParams::attach_from(&mut m, &settings, &fixtures().join("parity/adapter"))
        .expect("attach_from");
    let committed = fixtures().join("train/coin_lora");
    let tmp = tempfile::tempdir().expect("tmp");
    let out = if std::env::var_os("COIN_UPDATE_FIXTURES").is_some() {
        committed.clone()
    } else {
        tmp.path().join("coin_lora")
    };
    save_adapter(&p, &out, "tests/fixtures/parity/model").expect("saves");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "non_lora_trainables.safetensors",
    ] {
        let want = std::fs::read(committed.join(f)).expect("committed fixture file");
        let got = std::fs::read(out.join(f)).expect("written file");
        assert!(
            want == got,
            "{f} differs from tests/fixtures/train/coin_lora (format changed? rerun with \
             COIN_UPDATE_FIXTURES=1, then scripts/make_train_fixtures.py)"
        );
    }
    let reads = &goldens()["hf_reads_coin_lora"];
    assert_eq!(reads["max_logit_diff_vs_peft_adapter"], 0.0, "{reads}");
    assert_eq!(reads["key_warnings"], serde_json::json!([]), "{reads}");
    assert!(reads["max_logit_diff_vs_base"].as_f64().expect("num") > 1e-2);
}
