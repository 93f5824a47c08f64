//! Activation checkpointing ([`super::checkpoint`]): the gradients of every trainable var equal
//! the plain pass's (LoRA, MoELoRA with its router, the projector; full training with the
//! vision tower) with dropout on, in f64 and f32, and match central finite differences.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{activation_bytes, batch_gradients, TowerTape, TOWER_RECOMPUTES};

/// `batch_gradients`' `checkpointed` for every decoder layer.
const ALL: usize = usize::MAX;
use super::dropout::with_rows;
use super::full::FullScope;
use super::loss::masked_cross_entropy;
use super::params::{AdapterKind, TrainableParams};
use super::tests::{attach, batch};
use crate::ml::llava::{load_model, Llava, ModelSource};
use crate::ml::tiny::{write_tiny, TinyOptions};
use crate::ml::train::batch::TrainExample;

fn tiny(dtype: DType) -> (tempfile::TempDir, Llava) {
    tiny_with_tower_layers(dtype, None)
}

/// The tiny model; with `Some(k)` its `vision_feature_layer` set to `k` (−1: both tower layers
/// run, so the tower's backward walks more than one layer).
fn tiny_with_tower_layers(dtype: DType, feature_layer: Option<i64>) -> (tempfile::TempDir, Llava) {
    let dir = tempfile::tempdir().expect("temp dir");
    let m = write_tiny(dir.path(), &TinyOptions::default()).expect("tiny model writes");
    if let Some(k) = feature_layer {
        let path = m.join("config.json");
        let text = std::fs::read_to_string(&path).expect("config.json reads");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("config.json parses");
        v["vision_feature_layer"] = serde_json::json!(k);
        crate::store::fsutil::write_atomic(&path, v.to_string().as_bytes())
            .expect("config.json writes");
    }
    let src = ModelSource::resolve(&m, None, None).expect("tiny model resolves");
    let loaded = load_model(&src, &Device::Cpu, dtype).expect("tiny model loads");
    (dir, loaded.model)
}

/// (loss, gradient of every var by name) of the masked cross-entropy, with the row-keyed
/// dropout masks of step key `key`.
fn grads(
    model: &Llava,
    params: &TrainableParams,
    examples: &[TrainExample],
    pixels: &[Tensor],
    checkpointed: usize,
    key: u64,
) -> (f64, BTreeMap<String, Vec<f64>>) {
    let (store, loss) = with_rows(key, 0, examples.len(), || {
        batch_gradients(
            model,
            &params.vars,
            examples,
            pixels,
            checkpointed,
            |logits, labels| {
                let loss = masked_cross_entropy(logits, labels)?;
                let v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                Ok((loss, v))
            },
        )
    })
    .expect("gradients");
    let mut out = BTreeMap::new();
    for (name, var) in &params.vars {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name} (checkpointed {checkpointed})"));
        let v: Vec<f64> = g
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values");
        out.insert(name.clone(), v);
    }
    (loss, out)
}

/// The largest difference of any var's gradient relative to its largest entry; every
/// gradient must be non-zero.
fn worst(a: &BTreeMap<String, Vec<f64>>, b: &BTreeMap<String, Vec<f64>>) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (name, ga) in a {
        let gb = &b[name];
        let scale = ga.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: all-zero gradient");
        let diff = ga
            .iter()
            .zip(gb)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

/// Checkpointed and plain gradients of `params` agree within `tol`, with dropout on (the
/// recompute must draw the forward's masks) and off; another dropout key changes them (the
/// masks are really applied, when the model has any: `has_dropout`).
fn assert_same_gradients(
    model: &Llava,
    params: &TrainableParams,
    tol: f64,
    has_dropout: bool,
    what: &str,
) {
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let pixels: Vec<Tensor> = pixels
        .iter()
        .map(|p| p.to_dtype(model.dtype).expect("pixels"))
        .collect();
    for training in [true, false] {
        params.set_training(training);
        let (l0, g0) = grads(model, params, &examples, &pixels, 0, 7);
        // All layers, and (the tiny model has two) only the first: the rest run with their
        // graph on the checkpointed part's output.
        for k in [ALL, 1] {
            let (l1, g1) = grads(model, params, &examples, &pixels, k, 7);
            let w = worst(&g0, &g1);
            eprintln!("{what}, dropout {training}, {k} layers: loss {l0} vs {l1}, worst {w:e}");
            assert!(
                (l0 - l1).abs() <= tol * l0.abs(),
                "{what}: loss {l0} vs {l1}"
            );
            assert!(
                w <= tol,
                "{what}, dropout {training}, {k} layers: worst {w:e}"
            );
        }
        if training && has_dropout {
            let (_, g2) = grads(model, params, &examples, &pixels, ALL, 8);
            assert!(worst(&g0, &g2) > 1e-6, "{what}: dropout had no effect");
        }
    }
    params.set_training(false);
}

#[test]
fn checkpointed_adapter_gradients_equal_the_plain_pass() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for kind in [AdapterKind::Lora, AdapterKind::MoeLora { experts: 2 }] {
            for fused in [false, true] {
                crate::ml::fused::set_loop_kernels_for_this_thread(Some(fused));
                let (_dir, mut model) = tiny(dtype);
                let params = attach(&mut model, kind);
                let names: Vec<&str> = params.vars.iter().map(|(n, _)| n.as_str()).collect();
                assert!(names
                    .iter()
                    .any(|n| n.starts_with("multi_modal_projector.")));
                if matches!(kind, AdapterKind::MoeLora { .. }) {
                    assert!(names.iter().any(|n| n.contains("lora_router")), "{names:?}");
                }
                assert_same_gradients(
                    &model,
                    &params,
                    tol,
                    true,
                    &format!("{kind:?} {dtype:?} fused {fused}"),
                );
            }
        }
    }
    crate::ml::fused::set_loop_kernels_for_this_thread(None);
}

#[test]
fn checkpointed_full_training_gradients_equal_the_plain_pass() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for feature_layer in [None, Some(-1)] {
            for scope in [FullScope::LanguageModel, FullScope::WithVisionTower] {
                let (_dir, mut model) = tiny_with_tower_layers(dtype, feature_layer);
                let params =
                    TrainableParams::attach_full(&mut model, 3, scope).expect("attach_full");
                let tower = params
                    .vars
                    .iter()
                    .filter(|(n, _)| n.starts_with("vision_tower."))
                    .count();
                assert_eq!(tower > 0, scope == FullScope::WithVisionTower, "{scope:?}");
                let what = format!("full {scope:?} {dtype:?} tower layers {feature_layer:?}");
                let before = TOWER_RECOMPUTES.with(|c| c.get());
                assert_same_gradients(&model, &params, tol, false, &what);
                // Four checkpointed passes (dropout on and off; all decoder layers and the
                // first), each recomputing every tower layer when the tower trains, none when
                // it is frozen.
                let recomputed = TOWER_RECOMPUTES.with(|c| c.get()) - before;
                let expected = if tower > 0 {
                    4 * model.vision.layers.len()
                } else {
                    0
                };
                assert_eq!(recomputed, expected, "{what}: tower layers recomputed");
            }
        }
    }
}

/// With the tower trained, the checkpointed pass keeps each tower layer's input detached,
/// recomputes every layer once in the backward, and its gradients equal the tower's plain
/// backward of `sum(features ⊙ G)`; a frozen tower keeps nothing and recomputes nothing.
#[test]
fn the_tower_is_recomputed_layer_by_layer() {
    let (_dir, mut model) = tiny_with_tower_layers(DType::F64, Some(-1));
    assert_eq!(model.vision.layers.len(), 2);
    let (_, pixels) = batch(model.config.text.vocab_size as u32);
    let pixels = Tensor::stack(&pixels, 0).expect("stack");
    let frozen = TowerTape::forward(&model, &pixels).expect("frozen forward");
    assert!(frozen.output().is_none());
    assert!(frozen.saved_inputs().is_empty());
    assert!(!frozen.features(&model).expect("features").track_op());

    let params = TrainableParams::attach_full(&mut model, 3, FullScope::WithVisionTower)
        .expect("attach_full");
    let tape = TowerTape::forward(&model, &pixels).expect("forward");
    let saved = tape.saved_inputs();
    assert_eq!(saved.len(), model.vision.layers.len());
    for (i, x) in saved.iter().enumerate() {
        assert!(
            !x.track_op() && !x.is_variable(),
            "tower layer {i}'s saved input keeps a graph"
        );
    }
    let out = tape.output().expect("a tracked output").clone();
    let features = tape.features(&model).expect("features");
    assert!(features.track_op());
    // A fixed upstream gradient G of the features: the plain tower's backward of
    // sum(features ⊙ G) against the tape's.
    let n = features.elem_count();
    let weights: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 23) as f64 / 23.0 - 0.5)
        .collect();
    let g_features = Tensor::from_vec(weights, features.shape(), &Device::Cpu).expect("G");
    let g_out = (features * &g_features)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("backward to the output")
        .get(out.as_tensor())
        .cloned()
        .expect("the output's gradient");
    let tower: Vec<(String, candle_core::Var)> = params
        .vars
        .iter()
        .filter(|(n, _)| n.starts_with("vision_tower."))
        .cloned()
        .collect();
    let keep = |store: &mut candle_core::backprop::GradStore| {
        let mut only = candle_core::backprop::GradStore::default();
        for (_, v) in &tower {
            if let Some(g) = store.remove(v.as_tensor()) {
                only.insert(v.as_tensor(), g);
            }
        }
        *store = only;
    };
    let (checkpointed, recomputed) = tape.backward(&model, g_out, keep).expect("tape backward");
    assert_eq!(recomputed, model.vision.layers.len());
    let plain = {
        let v = &model.vision;
        let mut x = v.embed(&pixels).expect("embed");
        for layer in &v.layers {
            x = layer.forward(&x).expect("layer");
        }
        let f = v.select(&x, model.config.feature_select).expect("select");
        (f * &g_features)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("plain backward")
    };
    for (name, var) in &tower {
        let a = checkpointed
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no checkpointed gradient for {name}"));
        let b = plain
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no plain gradient for {name}"));
        let scale = b
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f64>())
            .expect("scale");
        let diff = (a - b)
            .and_then(|t| t.abs())
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f64>())
            .expect("diff");
        assert!(scale > 0.0, "{name}: all-zero gradient");
        assert!(diff <= 1e-12 * scale, "{name}: {diff:e} vs scale {scale:e}");
    }
}

/// Checkpointed gradients against central differences (ε 1e-5) on the largest-|grad| entry of
/// every var, dropout on (the row-keyed masks are the same in every evaluation).
#[test]
fn checkpointed_gradients_match_finite_differences() {
    for kind in [AdapterKind::Lora, AdapterKind::MoeLora { experts: 2 }] {
        let (_dir, mut model) = tiny(DType::F64);
        let params = attach(&mut model, kind);
        assert_matches_finite_differences(&model, &params, |_| true, &format!("{kind:?}"));
    }
}

/// Full training with the tower trained (both tower layers run): checkpointed gradients
/// against central differences on the largest-|grad| entry of a sample of vars: every tower
/// var, the projector, and the first decoder layer's and the head's.
#[test]
fn checkpointed_tower_gradients_match_finite_differences() {
    let (_dir, mut model) = tiny_with_tower_layers(DType::F64, Some(-1));
    let params = TrainableParams::attach_full(&mut model, 3, FullScope::WithVisionTower)
        .expect("attach_full");
    let sample = |name: &str| {
        name.starts_with("vision_tower.")
            || name.starts_with("multi_modal_projector.")
            || name.contains("layers.0.")
            || name.contains("lm_head")
    };
    let tested = params.vars.iter().filter(|(n, _)| sample(n)).count();
    assert!(tested >= 5 + 16 * 2 + 4, "{tested} vars sampled");
    assert_matches_finite_differences(&model, &params, sample, "full with tower");
}

fn assert_matches_finite_differences(
    model: &Llava,
    params: &TrainableParams,
    sample: impl Fn(&str) -> bool,
    what: &str,
) {
    params.set_training(true);
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let (_, g) = grads(model, params, &examples, &pixels, ALL, 3);
    let loss = |m: &Llava| grads(m, params, &examples, &pixels, ALL, 3).0;
    let eps = 1e-5;
    for (name, var) in params.vars.iter().filter(|(n, _)| sample(n)) {
        let gv = &g[name];
        let (i, analytic) = gv
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .expect("entries");
        let values: Vec<f64> = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        let set = |v: f64| {
            let mut w = values.clone();
            w[i] = v;
            let t = Tensor::from_vec(w, var.shape(), &Device::Cpu).expect("tensor");
            var.set(&t).expect("set");
        };
        set(values[i] + eps);
        let plus = loss(model);
        set(values[i] - eps);
        let minus = loss(model);
        set(values[i]);
        let numeric = (plus - minus) / (2.0 * eps);
        if analytic.abs() < 1e-12 {
            // A gradient that is zero in exact arithmetic (a key bias: softmax is invariant
            // to it): the loss must not move either.
            assert!(
                numeric.abs() < 1e-9,
                "{what} {name}[{i}]: analytic {analytic:e} vs numeric {numeric:e}"
            );
            continue;
        }
        let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs());
        assert!(
            rel < 1e-5,
            "{what} {name}[{i}]: analytic {analytic:e} vs numeric {numeric:e}"
        );
    }
    params.set_training(false);
}

#[test]
fn the_activation_estimate_grows_with_rows_and_squares_with_positions() {
    use crate::ml::fused::{with_kernels, Kernels};
    let (_dir, model) = tiny(DType::F32);
    // The composed attention keeps its scores: they grow with the square of the positions.
    let one = with_kernels(Some(Kernels::Off), || {
        assert!(super::checkpoint::keeps_scores(&model));
        let one = activation_bytes(&model, 1, 64);
        assert!(one > 0);
        assert_eq!(activation_bytes(&model, 4, 64), 4 * one);
        assert!(activation_bytes(&model, 1, 128) > 2 * one);
        one
    });
    // The blocked attention (the CPU with the kernels on) keeps none: linear in the positions.
    with_kernels(Some(Kernels::On), || {
        assert!(!super::checkpoint::keeps_scores(&model));
        let lean = activation_bytes(&model, 1, 64);
        assert!(0 < lean && lean < one);
        assert_eq!(activation_bytes(&model, 1, 128), 2 * lean);
    });
    use super::checkpoint::{layers_to_checkpoint as layers, resolve};
    use crate::ml::runtime::Checkpointing;
    let n = model.llm.layers.len();
    assert_eq!(resolve(Checkpointing::On, &model, 1, 1, 1), n);
    assert_eq!(resolve(Checkpointing::Off, &model, 64, 64, 4096), 0);
    // `auto`: only the excess over half of the free memory, plus one layer, at most all.
    let gib = 1u64 << 30;
    assert_eq!(layers(32 * gib, 32, None), 0, "unknown free memory: none");
    assert_eq!(
        layers(32 * gib, 32, Some(64 * gib)),
        0,
        "fits in half: none"
    );
    assert_eq!(layers(32 * gib, 32, Some(u64::MAX)), 0);
    assert_eq!(
        layers(32 * gib, 32, Some(64 * gib - 2)),
        2,
        "a byte over: one layer + one"
    );
    assert_eq!(
        layers(32 * gib, 32, Some(40 * gib)),
        13,
        "12 GiB over at 1 GiB a layer"
    );
    assert_eq!(layers(32 * gib, 32, Some(2 * gib)), 32, "far over: all");
    assert_eq!(layers(32 * gib, 0, Some(2 * gib)), 0);
    // The tiny model at one short row never needs it here; a batch far beyond the machine does.
    assert_eq!(resolve(Checkpointing::Auto, &model, 1, 1, 64), 0);
    if super::checkpoint::free_bytes(&model.device).is_some() {
        assert_eq!(
            resolve(Checkpointing::Auto, &model, 1 << 20, 1 << 10, 4096),
            n
        );
    }
}

#[test]
fn mem_available_is_read_from_meminfo() {
    use super::checkpoint::mem_available;
    let text = "MemTotal:       24580000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
    assert_eq!(mem_available(text), Some(20_000_000 * 1024));
    assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    assert_eq!(mem_available("MemAvailable: 5 MB\n"), None);
    if cfg!(target_os = "linux") {
        let free = super::checkpoint::free_bytes(&candle_core::Device::Cpu);
        assert!(
            free.is_some_and(|f| f > 0),
            "this Linux machine reports MemAvailable"
        );
    }
}

/// Peak memory (VmHWM) of one step of the small model (4 layers, 2 rows × 512 positions):
/// checkpointed first, then plain, in this process. Ignored by default: VmHWM is process-wide,
/// so other tests running beside it would blur it. Run it alone:
/// `cargo test --lib checkpointing_lowers_the_peak -- --ignored --nocapture`.
#[test]
#[ignore]
fn checkpointing_lowers_the_peak() {
    let dir = tempfile::tempdir().expect("dir");
    let m = write_tiny(
        dir.path(),
        &TinyOptions {
            size: crate::ml::tiny::TinySize::Small,
            ..TinyOptions::default()
        },
    )
    .expect("small model writes");
    let src = ModelSource::resolve(&m, None, None).expect("resolves");
    let mut model = load_model(&src, &Device::Cpu, DType::F32)
        .expect("loads")
        .model;
    let params = attach(&mut model, AdapterKind::Lora);
    params.set_training(true);
    let ids: Vec<u32> = (0..512).map(|i| 4 + (i % 300) as u32).collect();
    let mut labels = vec![super::loss::IGNORE_INDEX; 256];
    labels.extend(ids[256..].iter().map(|&t| i64::from(t)));
    let ex = TrainExample {
        segments: vec![crate::ml::llava::Segment::Text(ids)],
        text_labels: labels,
    };
    let examples = vec![ex.clone(), ex];
    let step = |ck: usize| {
        with_rows(1, 0, 2, || {
            batch_gradients(
                &model,
                &params.vars,
                &examples,
                &[],
                ck,
                |logits, labels| Ok((masked_cross_entropy(logits, labels)?, ())),
            )
        })
        .expect("gradients")
    };
    let base = hwm();
    drop(step(ALL));
    let on = hwm() - base;
    drop(step(0));
    let off = hwm() - base;
    eprintln!("peak above the loaded model: checkpointed {on:.0} MiB, plain {off:.0} MiB");
    assert!(
        on < 0.6 * off,
        "checkpointed {on:.0} MiB vs plain {off:.0} MiB"
    );
    params.set_training(false);
}

/// The process's peak resident memory (VmHWM) in MiB.
fn hwm() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kb / 1024.0
}

/// Peak memory (VmHWM) of one full-training step with the tower trained: a tower of
/// width 256 (MLP 1024, 8 heads, 224 px, patch 14: 257 positions, 7 of 8 layers run) under the
/// tiny decoder, 8 rows of one image each; checkpointed first, then plain. Ignored by default
/// (VmHWM is process-wide); run it alone:
/// `cargo test --lib checkpointing_the_tower_lowers_the_peak -- --ignored --nocapture`.
#[test]
#[ignore]
fn checkpointing_the_tower_lowers_the_peak() {
    use crate::ml::load::{hf_prefixes, TensorStore};
    let dir = tempfile::tempdir().expect("dir");
    let mut config = crate::ml::tiny::tiny_config(384);
    config.vision.hidden_size = 256;
    config.vision.intermediate_size = 1024;
    config.vision.num_hidden_layers = 8;
    config.vision.num_attention_heads = 8;
    config.vision.image_size = 224;
    config.vision.patch_size = 14;
    let mut store = TensorStore::new("the probe's random weights");
    for (name, t) in crate::ml::tiny::tiny_weights(&config, 0).expect("weights") {
        store.insert(name, t);
    }
    let (layout, prefixes) = hf_prefixes(&store, dir.path()).expect("prefixes");
    let mut model = Llava::from_store(config, &store, &prefixes, layout, &Device::Cpu, DType::F32)
        .expect("model");
    drop(store);
    let params = TrainableParams::attach_full(&mut model, 3, FullScope::WithVisionTower)
        .expect("attach_full");
    let rows = 8;
    let ids: Vec<u32> = (0..16).map(|i| 4 + i as u32).collect();
    let ex = TrainExample {
        segments: vec![
            crate::ml::llava::Segment::Text(vec![1, 5, 6]),
            crate::ml::llava::Segment::Image,
            crate::ml::llava::Segment::Text(ids.clone()),
        ],
        text_labels: [super::loss::IGNORE_INDEX; 3]
            .into_iter()
            .chain(ids.iter().map(|&t| i64::from(t)))
            .collect(),
    };
    let examples = vec![ex; rows];
    let mut rng = crate::ml::rng::Rng::new(5);
    let pixels: Vec<Tensor> = (0..rows)
        .map(|_| {
            Tensor::from_vec(
                rng.normal_vec(3 * 224 * 224, 1.0),
                (3, 224, 224),
                &Device::Cpu,
            )
            .expect("pixels")
        })
        .collect();
    let step = |ck: usize| {
        with_rows(1, 0, rows, || {
            batch_gradients(
                &model,
                &params.vars,
                &examples,
                &pixels,
                ck,
                |logits, labels| Ok((masked_cross_entropy(logits, labels)?, ())),
            )
        })
        .expect("gradients")
    };
    let base = hwm();
    drop(step(ALL));
    let on = hwm() - base;
    drop(step(0));
    let off = hwm() - base;
    eprintln!("peak above the loaded model: checkpointed {on:.0} MiB, plain {off:.0} MiB");
    assert!(
        on < 0.6 * off,
        "checkpointed {on:.0} MiB vs plain {off:.0} MiB"
    );
}
