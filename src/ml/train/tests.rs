//! Training-core tests on the tiny model (loaded in f64): analytic gradients of the masked loss against central
//! finite differences for every trainable parameter kind, every trainable var reached, and no
//! weight-sized gradient kept for frozen linears.

use std::collections::{BTreeMap, HashSet};

use candle_core::{DType, Device, Tensor, Var};

use super::batch::{forward_batch, TrainExample};
use super::loss::{masked_cross_entropy, IGNORE_INDEX};
use super::params::{AdapterKind, AdapterSettings, TrainableParams};
use crate::ml::llava::{load_model, Llava, ModelSource, Segment};
use crate::ml::rng::Rng;
use crate::ml::tiny::{write_tiny, TinyOptions};

pub(super) fn tiny_model() -> (tempfile::TempDir, Llava) {
    let dir = tempfile::tempdir().expect("temp dir");
    let m = write_tiny(dir.path(), &TinyOptions::default()).expect("tiny model writes");
    let src = ModelSource::resolve(&m, None, None).expect("tiny model resolves");
    let loaded = load_model(&src, &Device::Cpu, DType::F64).expect("tiny model loads");
    (dir, loaded.model)
}

/// Two rows of different lengths (so padding is exercised), each: BOS + prompt text (masked),
/// image, more prompt (masked), an assistant answer (supervised).
pub(super) fn batch(vocab: u32) -> (Vec<TrainExample>, Vec<Tensor>) {
    let mut rng = Rng::new(11);
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| 4 + (rng.next_u64() % (vocab as u64 - 4)) as u32)
            .collect()
    };
    let mut examples = Vec::new();
    for (pre, post, answer) in [(5usize, 4usize, 6usize), (3, 2, 3)] {
        let mut head = vec![1u32];
        head.extend(ids(pre));
        let tail_prompt = ids(post);
        let ans = ids(answer);
        let mut tail = tail_prompt.clone();
        tail.extend(&ans);
        let mut labels = vec![IGNORE_INDEX; head.len() + tail_prompt.len()];
        labels.extend(ans.iter().map(|&t| t as i64));
        examples.push(TrainExample {
            segments: vec![Segment::Text(head), Segment::Image, Segment::Text(tail)],
            text_labels: labels,
        });
    }
    let mut prng = Rng::new(12);
    let pixels = (0..2)
        .map(|_| {
            Tensor::from_vec(prng.normal_vec(3 * 32 * 32, 1.0), (3, 32, 32), &Device::Cpu)
                .expect("pixel tensor")
        })
        .collect();
    (examples, pixels)
}

pub(super) fn loss_of(model: &Llava, examples: &[TrainExample], pixels: &[Tensor]) -> Tensor {
    let (logits, labels) = forward_batch(model, examples, pixels).expect("forward");
    masked_cross_entropy(&logits, &labels).expect("loss")
}

pub(super) fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .expect("scalar")
}

pub(super) fn attach(model: &mut Llava, kind: AdapterKind) -> TrainableParams {
    let settings = AdapterSettings {
        kind,
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        seed: 5,
        ..AdapterSettings::default()
    };
    let params = TrainableParams::attach(model, &settings).expect("adapters attach");
    params.set_training(false); // deterministic forward for the finite differences
                                // B = 0 would leave A and the router without gradient: give every B small random values.
    let mut rng = Rng::new(21);
    for (name, var) in &params.vars {
        if name.contains("lora_B") {
            let t = Tensor::from_vec(
                rng.normal_vec(var.elem_count(), 0.2),
                var.shape(),
                &Device::Cpu,
            )
            .and_then(|t| t.to_dtype(var.dtype()))
            .expect("B values");
            var.set(&t).expect("B set");
        }
    }
    params
}

/// The parameter kind of a var name, for reporting.
fn kind_of(name: &str) -> &'static str {
    if name.ends_with("lora_A.weight") {
        "lora_A"
    } else if name.ends_with("lora_B.weight") {
        "lora_B"
    } else if name.ends_with("lora_A.experts") {
        "moe_expert_A"
    } else if name.ends_with("lora_B.experts") {
        "moe_expert_B"
    } else if name.ends_with("lora_router.weight") {
        "moe_router"
    } else if name.starts_with("multi_modal_projector.") && name.ends_with(".weight") {
        "projector_weight"
    } else if name.starts_with("multi_modal_projector.") && name.ends_with(".bias") {
        "projector_bias"
    } else {
        "other"
    }
}

fn set_entry(var: &Var, values: &[f64], i: usize, v: f64) {
    let mut w = values.to_vec();
    w[i] = v;
    let t = Tensor::from_vec(w, var.shape(), &Device::Cpu).expect("perturbed tensor");
    var.set(&t).expect("var set");
}

/// Compare analytic and central-difference gradients (ε 1e-5, bound 1e-5 relative) on the
/// `per_var` largest-|grad| entries of every var of `params`; every var must have a present,
/// not-all-zero gradient. Returns the max relative error per `kind_of(name)`.
pub(super) fn check_against_finite_differences(
    model: &Llava,
    params: &TrainableParams,
    examples: &[TrainExample],
    pixels: &[Tensor],
    per_var: usize,
    kind_of: impl Fn(&str) -> &'static str,
) -> BTreeMap<&'static str, f64> {
    let loss = loss_of(model, examples, pixels);
    let grads = loss.backward().expect("backward");
    assert_eq!(params.missing_gradients(&grads), Vec::<String>::new());

    let eps = 1e-5f64;
    let mut worst: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (name, var) in &params.vars {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("checked above")
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("grad values");
        let max_g = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(max_g > 0.0, "{name}: all-zero gradient (severed path?)");
        let values: Vec<f64> = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("var values");
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in order.iter().take(per_var) {
            set_entry(var, &values, i, values[i] + eps);
            let plus = scalar(&loss_of(model, examples, pixels));
            set_entry(var, &values, i, values[i] - eps);
            let minus = scalar(&loss_of(model, examples, pixels));
            set_entry(var, &values, i, values[i]);
            let numeric = (plus - minus) / (2.0 * eps);
            let analytic = g[i];
            // A gradient that is zero in exact arithmetic (e.g. a key bias: softmax ignores
            // a shift shared by every key) is compared absolutely.
            let scale = analytic.abs().max(numeric.abs());
            let rel = if scale < 1e-9 {
                (analytic - numeric).abs()
            } else {
                (analytic - numeric).abs() / scale
            };
            assert!(
                rel < 1e-5,
                "{name}[{i}]: analytic {analytic:e} vs numeric {numeric:e} (rel {rel:e})"
            );
            let w = worst.entry(kind_of(name)).or_insert(0.0);
            *w = w.max(rel);
        }
    }
    worst
}

/// [`check_against_finite_differences`] for LoRA / MoELoRA adapters on the tiny model.
fn gradient_check(kind: AdapterKind, per_var: usize) -> BTreeMap<&'static str, f64> {
    let (_dir, mut model) = tiny_model();
    let params = attach(&mut model, kind);
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let worst =
        check_against_finite_differences(&model, &params, &examples, &pixels, per_var, kind_of);
    eprintln!("{kind:?}: max relative error per kind {worst:?}");
    worst
}

#[test]
fn lora_and_projector_gradients_match_finite_differences() {
    let worst = gradient_check(AdapterKind::Lora, 2);
    let kinds: Vec<&str> = worst.keys().copied().collect();
    assert_eq!(
        kinds,
        ["lora_A", "lora_B", "projector_bias", "projector_weight"]
    );
}

/// The LoRA check with the fused CPU loop kernels forced on (release builds run them; debug
/// builds default to the composed ops, see `fused::loop_kernels`).
#[test]
fn lora_gradients_match_finite_differences_with_the_fused_loop_kernels() {
    crate::ml::fused::set_loop_kernels_for_this_thread(Some(true));
    let worst = gradient_check(AdapterKind::Lora, 2);
    assert_eq!(worst.len(), 4);
}

#[test]
fn moelora_and_projector_gradients_match_finite_differences() {
    let worst = gradient_check(AdapterKind::MoeLora { experts: 4 }, 2);
    let kinds: Vec<&str> = worst.keys().copied().collect();
    assert_eq!(
        kinds,
        [
            "moe_expert_A",
            "moe_expert_B",
            "moe_router",
            "projector_bias",
            "projector_weight"
        ]
    );
}

#[test]
fn adapters_target_only_decoder_linears_and_name_every_var() {
    let (_dir, mut model) = tiny_model();
    let params = attach(&mut model, AdapterKind::MoeLora { experts: 4 });
    // 2 layers × 7 targets × (A, B, router) + projector 2 × (weight, bias).
    assert_eq!(params.vars.len(), 2 * 7 * 3 + 4);
    let names: HashSet<&str> = params.names().collect();
    assert_eq!(names.len(), params.vars.len(), "names are unique");
    assert!(names.contains("language_model.layers.1.mlp.down_proj.lora_router.weight"));
    for (name, lin) in model.linears_mut() {
        let adapted = lin.adapter.is_some();
        assert_eq!(
            adapted,
            name.starts_with("language_model.layers."),
            "{name}"
        );
    }
    let bad = AdapterSettings {
        r: 6,
        kind: AdapterKind::MoeLora { experts: 4 },
        ..AdapterSettings::default()
    };
    assert!(TrainableParams::attach(&mut model, &bad).is_err());
    let (_dir2, mut fresh) = tiny_model();
    let bad = AdapterSettings {
        targets: vec!["q_proj".into(), "qkv_proj".into()],
        ..AdapterSettings::default()
    };
    let err = TrainableParams::attach(&mut fresh, &bad).expect_err("unknown target");
    assert!(err.to_string().contains("'qkv_proj'"), "{err}");
    // The failed attach left the model untouched.
    for (name, lin) in fresh.linears_mut() {
        assert!(lin.adapter.is_none() && !lin.weight.is_variable(), "{name}");
    }
}

#[test]
fn a_var_without_gradient_is_reported() {
    let (_dir, mut model) = tiny_model();
    let params = attach(&mut model, AdapterKind::Lora);
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    // Without images the projector is off the path: its four vars must be reported.
    let text_only: Vec<TrainExample> = examples
        .iter()
        .map(|e| {
            let mut segments = Vec::new();
            let mut labels = Vec::new();
            let mut next = 0;
            for s in &e.segments {
                if let Segment::Text(ids) = s {
                    segments.push(s.clone());
                    labels.extend_from_slice(&e.text_labels[next..next + ids.len()]);
                    next += ids.len();
                }
            }
            TrainExample {
                segments,
                text_labels: labels,
            }
        })
        .collect();
    let _ = pixels;
    let loss = loss_of(&model, &text_only, &[]);
    let grads = loss.backward().expect("backward");
    let missing = params.missing_gradients(&grads);
    assert_eq!(
        missing,
        [
            "multi_modal_projector.linear_1.weight",
            "multi_modal_projector.linear_1.bias",
            "multi_modal_projector.linear_2.weight",
            "multi_modal_projector.linear_2.bias"
        ]
    );
}

#[test]
fn frozen_linears_leave_no_weight_sized_gradient() {
    let (_dir, mut model) = tiny_model();
    let params = attach(&mut model, AdapterKind::Lora);
    let var_ids: HashSet<_> = params
        .vars
        .iter()
        .map(|(_, v)| v.as_tensor().id())
        .collect();
    let mut frozen_shapes = HashSet::new();
    // The decoder's frozen linears (the vision tower is off the gradient path: nothing upstream
    // of it is trainable; its 32 × 32 weights would also collide with the projector input).
    for (name, lin) in model.linears_mut() {
        if name.starts_with("language_model.") || name == "lm_head" {
            assert!(!lin.weight.is_variable(), "{name}");
            let (o, i) = lin.weight.dims2().expect("2-D weight");
            frozen_shapes.insert((o, i));
            frozen_shapes.insert((i, o));
        }
    }
    let (mut examples, pixels) = batch(model.config.text.vocab_size as u32);
    // The decoder runs on the flattened (b·s, hidden) stream: with this batch's b·s = 2 × 32 = 64
    // = hidden, activation gradients would be (64, 64) like the q/k/v/o weights. One more
    // supervised token makes b·s = 66, so a weight-shaped gradient can only be a weight's.
    if let Some(Segment::Text(ids)) = examples[0].segments.last_mut() {
        ids.push(7);
    }
    examples[0].text_labels.push(7);
    let loss = loss_of(&model, &examples, &pixels);
    let grads = loss.backward().expect("backward");
    let mut weight_sized = Vec::new();
    let mut stored = 0usize;
    for id in grads.get_ids() {
        let t = grads.get_id(*id).expect("listed id");
        stored += t.elem_count();
        if var_ids.contains(id) {
            continue;
        }
        if let Ok(d) = t.dims2() {
            if frozen_shapes.contains(&d) {
                weight_sized.push(d);
            }
        }
    }
    assert!(
        weight_sized.is_empty(),
        "weight-shaped gradients kept for frozen linears: {weight_sized:?}"
    );
    // For the report: what is kept (activations and trainable vars' gradients) against what a
    // plain matmul would add on top (one weight-sized tensor per frozen decoder linear).
    let frozen_elems: usize = model
        .linears_mut()
        .iter()
        .filter(|(n, _)| n.starts_with("language_model.") || n == "lm_head")
        .map(|(_, l)| l.weight.elem_count())
        .sum();
    eprintln!("grad store: {stored} elements; frozen decoder weights: {frozen_elems}");
}

fn tiny_model_f32() -> (tempfile::TempDir, Llava) {
    let dir = tempfile::tempdir().expect("temp dir");
    let m = write_tiny(dir.path(), &TinyOptions::default()).expect("tiny model writes");
    let src = ModelSource::resolve(&m, None, None).expect("tiny model resolves");
    let loaded = load_model(&src, &Device::Cpu, DType::F32).expect("tiny model loads");
    (dir, loaded.model)
}

fn learns(kind: AdapterKind) -> (f64, f64) {
    let (_dir, mut model) = tiny_model_f32();
    let settings = AdapterSettings {
        kind,
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        seed: 3,
        ..AdapterSettings::default()
    };
    let params = TrainableParams::attach(&mut model, &settings).expect("adapters attach");
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let mut opt = super::step::adamw(&params, 1e-2, 0.0).expect("optimiser");
    let mut losses = Vec::new();
    for _ in 0..30 {
        losses.push(
            super::step::train_step(&model, &params, &mut opt, &examples, &pixels)
                .expect("train step"),
        );
    }
    params.set_training(false);
    let last = scalar(&loss_of(&model, &examples, &pixels));
    eprintln!(
        "{kind:?}: loss {:.4} → {last:.4} (first steps {:?})",
        losses[0],
        &losses[..3]
    );
    (losses[0], last)
}

#[test]
fn a_few_adamw_steps_make_the_masked_loss_fall() {
    for kind in [AdapterKind::Lora, AdapterKind::MoeLora { experts: 4 }] {
        let (first, last) = learns(kind);
        assert!(last < 0.5 * first, "{kind:?}: {first} → {last}");
    }
}

#[test]
fn saved_peft_adapter_reads_back_with_identical_outputs() {
    let (_dir, mut model) = tiny_model_f32();
    let params = attach(&mut model, AdapterKind::Lora);
    let out = tempfile::tempdir().expect("temp dir");
    super::save::save_adapter(&params, out.path(), "tiny").expect("adapter saves");
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let (want, _) = forward_batch(&model, &examples, &pixels).expect("forward");

    // A fresh model, the saved LoRA through the inference loader, the saved projector by hand.
    let (_dir2, mut fresh) = tiny_model_f32();
    let peft = crate::ml::peft::PeftAdapter::load(out.path(), &Device::Cpu, DType::F32)
        .expect("adapter loads");
    assert_eq!(peft.attach(&mut fresh).expect("attaches"), 2 * 7);
    let proj =
        crate::ml::load::read_tensor_file(&out.path().join("non_lora_trainables.safetensors"))
            .expect("projector file reads");
    assert_eq!(proj.len(), 4);
    for (k, t) in proj {
        let p = &mut fresh.projector;
        match k.as_str() {
            "base_model.model.model.mm_projector.0.weight" => p.linear_1.weight = t,
            "base_model.model.model.mm_projector.0.bias" => p.linear_1.bias = Some(t),
            "base_model.model.model.mm_projector.2.weight" => p.linear_2.weight = t,
            "base_model.model.model.mm_projector.2.bias" => p.linear_2.bias = Some(t),
            other => panic!("unexpected projector key {other}"),
        }
    }
    let (got, _) = forward_batch(&fresh, &examples, &pixels).expect("forward");
    let diff = scalar(
        &(&want - &got)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .expect("diff"),
    );
    assert_eq!(diff, 0.0, "saved adapter changes the logits by {diff}");
    // The B values were made non-zero, so the adapter does change the logits.
    fresh.clear_adapters();
    let (base, _) = forward_batch(&fresh, &examples, &pixels).expect("forward");
    let moved = scalar(
        &(&want - &base)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .expect("diff"),
    );
    assert!(moved > 1e-3, "{moved}");
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("adapter_config.json")).expect("config reads"),
    )
    .expect("config parses");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["peft_type"], "LORA");
}
