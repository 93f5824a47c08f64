//! Adapter files on the tiny model: LoRA and MoELoRA saved by [`super::save::save_adapter`] read
//! back by the inference loader ([`PeftAdapter`]) and by [`TrainableParams::attach_from`] with
//! identical vars and logits; saved key names per model layout; mismatches refused.
#![allow(clippy::disallowed_methods)]

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::batch::{forward_batch, TrainExample};
use super::loss::IGNORE_INDEX;
use super::params::{AdapterKind, AdapterSettings, TrainableParams};
use super::save::{save_adapter, save_adapter_as, AdapterFormat};
use crate::ml::llava::{load_model, Llava, ModelSource, Segment};
use crate::ml::load::{read_tensor_file, Layout};
use crate::ml::peft::PeftAdapter;
use crate::ml::rng::Rng;
use crate::ml::tiny::{write_tiny, TinyLayout, TinyOptions};
use crate::ml::MlError;

/// A tiny model (f32) of `layout`, always the same weights for the same layout.
fn tiny(dir: &Path, layout: TinyLayout) -> Llava {
    let m = write_tiny(
        dir,
        &TinyOptions {
            layout,
            ..TinyOptions::default()
        },
    )
    .expect("tiny model writes");
    let src = if layout == TinyLayout::Split {
        ModelSource::resolve(
            &m,
            Some(&dir.join("clip")),
            Some(&dir.join("mm_projector.safetensors")),
        )
    } else {
        ModelSource::resolve(&m, None, None)
    }
    .expect("tiny model resolves");
    load_model(&src, &Device::Cpu, DType::F32)
        .expect("tiny model loads")
        .model
}

fn settings(kind: AdapterKind) -> AdapterSettings {
    AdapterSettings {
        kind,
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        seed: 9,
        ..AdapterSettings::default()
    }
}

/// Every var (adapters and projector) set to N(0, 0.2²) values, so nothing is at its init (and
/// B ≠ 0 gives A a gradient path).
pub(super) fn randomise(params: &TrainableParams, seed: u64) {
    let mut rng = Rng::new(seed);
    for (_, var) in &params.vars {
        let t = Tensor::from_vec(
            rng.normal_vec(var.elem_count(), 0.2),
            var.shape(),
            &Device::Cpu,
        )
        .and_then(|t| t.to_dtype(var.dtype()))
        .expect("random values");
        var.set(&t).expect("var set");
    }
}

/// One row: BOS + prompt, image, prompt + supervised answer.
fn batch(vocab: u32) -> (Vec<TrainExample>, Vec<Tensor>) {
    let mut rng = Rng::new(31);
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| 4 + (rng.next_u64() % (vocab as u64 - 4)) as u32)
            .collect()
    };
    let mut head = vec![1u32];
    head.extend(ids(4));
    let prompt = ids(3);
    let answer = ids(5);
    let mut tail = prompt.clone();
    tail.extend(&answer);
    let mut labels = vec![IGNORE_INDEX; head.len() + prompt.len()];
    labels.extend(answer.iter().map(|&t| t as i64));
    let ex = TrainExample {
        segments: vec![Segment::Text(head), Segment::Image, Segment::Text(tail)],
        text_labels: labels,
    };
    let pixels = Tensor::from_vec(
        Rng::new(32).normal_vec(3 * 32 * 32, 1.0),
        (3, 32, 32),
        &Device::Cpu,
    )
    .expect("pixels");
    (vec![ex], vec![pixels])
}

fn logits(model: &Llava) -> Vec<f32> {
    let (ex, px) = batch(model.config.text.vocab_size as u32);
    let (l, _) = forward_batch(model, &ex, &px).expect("forward");
    l.flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("logit values")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("tensor values")
}

#[test]
fn moelora_saves_in_coin_layout_and_the_generate_loader_reproduces_the_logits() {
    let t = tempfile::tempdir().expect("tmp");
    for (layout, prefix) in [
        (
            TinyLayout::Hf,
            "base_model.model.model.language_model.layers.",
        ),
        (TinyLayout::Split, "base_model.model.model.layers."),
    ] {
        let sub = t.path().join(format!("{layout:?}"));
        let mut model = tiny(&sub.join("m"), layout);
        let params =
            TrainableParams::attach(&mut model, &settings(AdapterKind::MoeLora { experts: 4 }))
                .expect("attach");
        randomise(&params, 1);
        let want = logits(&model);
        let out = sub.join("adapter");
        save_adapter(&params, &out, "tiny").expect("saves");

        // The CoIN layout: E experts of rank r/E per module, router, projector keys.
        let file: std::collections::BTreeMap<String, Tensor> =
            read_tensor_file(&out.join("adapter_model.safetensors"))
                .expect("reads")
                .into_iter()
                .collect();
        assert_eq!(file.len(), 2 * 7 * (4 + 4 + 1), "{:?}", file.keys());
        let q = format!("{prefix}0.self_attn.q_proj");
        assert_eq!(file[&format!("{q}.lora_A.loraA.3.weight")].dims(), [2, 64]);
        assert_eq!(file[&format!("{q}.lora_B.loraB.0.weight")].dims(), [64, 2]);
        assert_eq!(file[&format!("{q}.lora_router.weight")].dims(), [4, 64]);
        // Expert 1's A is rows 2..4 of the stacked var, its B columns 2..4.
        let a = params
            .get("language_model.layers.0.self_attn.q_proj.lora_A.experts")
            .expect("var");
        assert_eq!(
            values(&file[&format!("{q}.lora_A.loraA.1.weight")]),
            values(&a.narrow(0, 2, 2).expect("narrow"))
        );
        let b = params
            .get("language_model.layers.0.self_attn.q_proj.lora_B.experts")
            .expect("var");
        assert_eq!(
            values(&file[&format!("{q}.lora_B.loraB.1.weight")]),
            values(&b.narrow(1, 2, 2).expect("narrow"))
        );
        let proj = read_tensor_file(&out.join("non_lora_trainables.safetensors")).expect("reads");
        let keys: Vec<&str> = proj.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "base_model.model.model.mm_projector.0.bias",
                "base_model.model.model.mm_projector.0.weight",
                "base_model.model.model.mm_projector.2.bias",
                "base_model.model.model.mm_projector.2.weight"
            ]
        );
        let cfg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("adapter_config.json")).expect("config"),
        )
        .expect("json");
        assert_eq!(cfg["peft_type"], "MOE_LORA_CoIN");
        assert_eq!(cfg["task_type"], "CAUSAL_LM_CoIN");
        assert_eq!(cfg["expert_num"], 4);
        assert_eq!(cfg["r"], 8);

        // A fresh model + the generate loader (adapters and projector): identical logits.
        let mut fresh = tiny(&sub.join("m2"), layout);
        let base = logits(&fresh);
        let loaded = PeftAdapter::load(&out, &Device::Cpu, DType::F32).expect("loads");
        assert_eq!(loaded.kind, AdapterKind::MoeLora { experts: 4 });
        assert!(loaded.projector.is_some());
        let got = loaded.with_attached(&mut fresh, logits).expect("attaches");
        assert_eq!(max_diff(&want, &got), 0.0, "{layout:?}");
        assert!(
            max_diff(&want, &base) > 1e-2,
            "the adapter changes the logits"
        );
        // Detached afterwards, the model's own projector back.
        assert_eq!(max_diff(&logits(&fresh), &base), 0.0);
        assert!(fresh.linears_mut().iter().all(|(_, l)| l.adapter.is_none()));
        assert!(!fresh.projector.linear_1.weight.is_variable());
    }
}

#[test]
fn attach_from_round_trips_every_var_bit_exactly() {
    let t = tempfile::tempdir().expect("tmp");
    for kind in [AdapterKind::Lora, AdapterKind::MoeLora { experts: 2 }] {
        let sub = t.path().join(format!("{kind:?}"));
        let mut model = tiny(&sub.join("m"), TinyLayout::HfNew);
        let params = TrainableParams::attach(&mut model, &settings(kind)).expect("attach");
        randomise(&params, 2);
        let want = logits(&model);
        let out = sub.join("adapter");
        save_adapter(&params, &out, "tiny").expect("saves");

        let mut fresh = tiny(&sub.join("m2"), TinyLayout::HfNew);
        let again =
            TrainableParams::attach_from(&mut fresh, &settings(kind), &out).expect("attach_from");
        let names: Vec<&str> = again.names().collect();
        assert_eq!(names, params.names().collect::<Vec<_>>());
        for ((name, v), (_, w)) in params.vars.iter().zip(&again.vars) {
            assert_eq!(v.dtype(), w.dtype(), "{name}");
            let (a, b) = (values(v.as_tensor()), values(w.as_tensor()));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{kind:?} {name} differs after the round trip"
            );
        }
        assert_eq!(max_diff(&want, &logits(&fresh)), 0.0, "{kind:?}");
        assert_eq!(again.layout, Layout::HfNew);
        // The loaded vars are trainable: a backward reaches every one of them.
        let (ex, px) = batch(fresh.config.text.vocab_size as u32);
        let (l, labels) = forward_batch(&fresh, &ex, &px).expect("forward");
        let loss = super::loss::masked_cross_entropy(&l, &labels).expect("loss");
        let grads = loss.backward().expect("backward");
        assert_eq!(again.missing_gradients(&grads), Vec::<String>::new());
    }
}

#[test]
fn attach_from_with_a_frozen_projector_still_takes_the_saved_projector() {
    let t = tempfile::tempdir().expect("tmp");
    let mut model = tiny(&t.path().join("m"), TinyLayout::Hf);
    let params = TrainableParams::attach(&mut model, &settings(AdapterKind::Lora)).expect("a");
    randomise(&params, 3);
    let want = logits(&model);
    save_adapter(&params, &t.path().join("ad"), "tiny").expect("saves");
    let mut fresh = tiny(&t.path().join("m2"), TinyLayout::Hf);
    let frozen = AdapterSettings {
        train_projector: false,
        ..settings(AdapterKind::Lora)
    };
    let again = TrainableParams::attach_from(&mut fresh, &frozen, &t.path().join("ad"))
        .expect("attach_from");
    assert_eq!(again.vars.len(), 2 * 7 * 2, "adapters only");
    assert!(!fresh.projector.linear_1.weight.is_variable());
    assert_eq!(max_diff(&want, &logits(&fresh)), 0.0);
    // Saving without a trained projector removes the stale projector file.
    save_adapter(&again, &t.path().join("ad"), "tiny").expect("saves");
    assert!(!t.path().join("ad/non_lora_trainables.safetensors").exists());
}

#[test]
fn attach_from_refuses_an_adapter_that_does_not_match_the_settings() {
    let t = tempfile::tempdir().expect("tmp");
    let mut model = tiny(&t.path().join("m"), TinyLayout::Hf);
    let moe = AdapterKind::MoeLora { experts: 4 };
    let params = TrainableParams::attach(&mut model, &settings(moe)).expect("attach");
    let dir = t.path().join("ad");
    save_adapter(&params, &dir, "tiny").expect("saves");
    let mut fresh = tiny(&t.path().join("m2"), TinyLayout::Hf);
    let cases: Vec<(AdapterSettings, &str, &str)> = vec![
        (
            settings(AdapterKind::Lora),
            "adapter_config.json",
            "MoELoRA with 4 experts (peft_type/expert_num), the settings ask for LoRA",
        ),
        (
            settings(AdapterKind::MoeLora { experts: 2 }),
            "adapter_config.json",
            "the settings ask for MoELoRA with 2 experts",
        ),
        (
            AdapterSettings {
                r: 16,
                ..settings(moe)
            },
            "adapter_model.safetensors",
            "its rank r is 8, the settings' r is 16",
        ),
        (
            AdapterSettings {
                alpha: 32.0,
                ..settings(moe)
            },
            "adapter_config.json",
            "lora_alpha is 16",
        ),
        (
            AdapterSettings {
                targets: vec!["q_proj".into(), "v_proj".into()],
                ..settings(moe)
            },
            "adapter_model.safetensors",
            "it adapts 'base_model.model.model.language_model.layers.0.mlp.down_proj', which the settings' targets",
        ),
    ];
    for (s, file, msg) in cases {
        let e = TrainableParams::attach_from(&mut fresh, &s, &dir).expect_err("mismatch");
        assert!(matches!(e, MlError::AdapterMismatch { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains(file) && text.contains(msg), "{text}");
        assert!(fresh.linears_mut().iter().all(|(_, l)| l.adapter.is_none()));
        assert!(!fresh.projector.linear_1.weight.is_variable());
    }
    // rsLoRA changes the scale (α/√r): refused, naming the module.
    let mut m4 = tiny(&t.path().join("m4"), TinyLayout::Hf);
    let p4 = TrainableParams::attach(&mut m4, &settings(AdapterKind::Lora)).expect("attach");
    let rs = t.path().join("rs");
    save_adapter(&p4, &rs, "tiny").expect("saves");
    let cfg_path = rs.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).expect("r")).expect("json");
    cfg["use_rslora"] = serde_json::json!(true);
    std::fs::write(&cfg_path, cfg.to_string()).expect("w");
    let e = TrainableParams::attach_from(&mut fresh, &settings(AdapterKind::Lora), &rs)
        .expect_err("rslora scale");
    assert!(
        e.to_string().contains("has the scale 5.65") && e.to_string().contains("α/r = 2"),
        "{e}"
    );
    // A target the file lacks: an adapter saved for q_proj and v_proj only.
    let few = AdapterSettings {
        targets: vec!["q_proj".into(), "v_proj".into()],
        ..settings(AdapterKind::Lora)
    };
    let mut m3 = tiny(&t.path().join("m3"), TinyLayout::Hf);
    let p3 = TrainableParams::attach(&mut m3, &few).expect("attach");
    save_adapter(&p3, &t.path().join("few"), "tiny").expect("saves");
    let e = TrainableParams::attach_from(
        &mut fresh,
        &settings(AdapterKind::Lora),
        &t.path().join("few"),
    )
    .expect_err("missing target");
    assert!(
        e.to_string()
            .contains("it has no adapter for 'language_model.layers.0.self_attn.k_proj', which the settings target ('k_proj')"),
        "{e}"
    );
}

#[test]
fn torch_bin_format_reads_back_and_switching_formats_leaves_no_stale_file() {
    let t = tempfile::tempdir().expect("tmp");
    let mut model = tiny(&t.path().join("m"), TinyLayout::Split);
    let moe = settings(AdapterKind::MoeLora { experts: 4 });
    let params = TrainableParams::attach(&mut model, &moe).expect("attach");
    randomise(&params, 5);
    let want = logits(&model);
    let dir = t.path().join("ad");
    save_adapter(&params, &dir, "tiny").expect("safetensors");
    save_adapter_as(&params, &dir, "tiny", AdapterFormat::TorchBin).expect("bin");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.bin",
            "non_lora_trainables.bin"
        ]
    );
    let mut fresh = tiny(&t.path().join("m2"), TinyLayout::Split);
    let again = TrainableParams::attach_from(&mut fresh, &moe, &dir).expect("attach_from");
    for ((name, v), (_, w)) in params.vars.iter().zip(&again.vars) {
        assert_eq!(values(v.as_tensor()), values(w.as_tensor()), "{name}");
    }
    assert_eq!(max_diff(&want, &logits(&fresh)), 0.0);
    // Back to safetensors: the .bin files and their converted caches go.
    save_adapter(&params, &dir, "tiny").expect("safetensors");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "non_lora_trainables.safetensors"
        ]
    );
}
