//! LwF's distillation term: its value by hand on small logits (the T² factor, the shift of
//! the supervised positions, top-k), its gradient against central finite differences on the
//! tiny model in f64, zero value and gradient while the student is the teacher, KL ≥ 0.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::ml::llava::{load_model, LoadedModel, ModelSource};
use crate::ml::rng::Rng;
use crate::ml::tiny::{write_tiny, TinyOptions};
use crate::ml::train::batch::forward_batch;
use crate::ml::train::data::{prepare_samples, Labeling};
use crate::ml::train::params::{AdapterKind, AdapterSettings};
use crate::ml::train::trainer::{train_with, NoProgress, TrainConfig};
use crate::tasks::formats::read_train_file;
use crate::tasks::mini::{self, MiniConfig};

struct Fixture {
    _dir: tempfile::TempDir,
    model: LoadedModel,
    samples: Vec<Sample>,
}

/// The tiny model in f64 with CoIN-mini's words, and `n` samples of mini-GQA (with images).
fn fixture(n: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let model_dir = write_tiny(
        &dir.path().join("model"),
        &TinyOptions {
            corpus: mini::coin_mini_corpus(),
            ..TinyOptions::default()
        },
    )
    .expect("tiny model");
    let data: PathBuf = dir.path().join("mini");
    mini::generate(
        &data,
        &MiniConfig {
            train: n,
            test: 1,
            ..MiniConfig::default()
        },
        |_| {},
    )
    .expect("coin-mini");
    let src = ModelSource::resolve(&model_dir, None, None).expect("resolves");
    let model = load_model(&src, &Device::Cpu, DType::F64).expect("loads");
    let gqa = mini::TASKS
        .iter()
        .find(|t| t.name == "mini-GQA")
        .expect("mini-GQA");
    let records = read_train_file(
        &data
            .join("Instructions_Original")
            .join(gqa.dir)
            .join("train.json"),
    )
    .expect("train.json");
    let (samples, _) = prepare_samples(
        &records,
        &data.join("cl_dataset"),
        &model.tokenizer,
        Labeling::for_model(&model.model.config),
        model.model.config.image_seq_len(),
        2048,
    )
    .expect("samples");
    Fixture {
        _dir: dir,
        model,
        samples,
    }
}

/// LoRA (dropout off) with random B, so every var has a gradient path.
fn attach(f: &mut Fixture) -> TrainableParams {
    let params = TrainableParams::attach(
        &mut f.model.model,
        &AdapterSettings {
            kind: AdapterKind::Lora,
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            seed: 3,
            ..AdapterSettings::default()
        },
    )
    .expect("attach");
    shift(&params, 7, 0.2, |n| n.contains("lora_B"));
    params.set_training(false);
    params
}

/// Add N(0, std²) noise to the vars whose name `pick` accepts.
fn shift(params: &TrainableParams, seed: u64, std: f64, pick: impl Fn(&str) -> bool) {
    let mut rng = Rng::new(seed);
    for (name, var) in &params.vars {
        if !pick(name) {
            continue;
        }
        let noise = Tensor::from_vec(
            rng.normal_vec(var.elem_count(), std),
            var.shape(),
            &Device::Cpu,
        )
        .and_then(|t| t.to_dtype(var.dtype()))
        .expect("noise");
        var.set(&(var.as_tensor() + noise).expect("add"))
            .expect("set");
    }
}

fn teacher(f: &Fixture, params: &TrainableParams, s: &LwfSettings) -> Teacher {
    let mut seen = Vec::new();
    let t = teacher_outputs(
        &f.model.model,
        params,
        &f.samples,
        &f.model.image,
        s,
        TeacherPass {
            aspect: AspectMode::Pad,
            batch_size: 3,
            kernels: None,
            progress: &mut |done, all| seen.push((done, all)),
        },
    )
    .expect("teacher");
    let n = f.samples.len();
    assert_eq!(seen.last(), Some(&(n, n)), "progress reaches the end");
    assert_eq!(t.len(), n);
    t
}

fn value(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .expect("scalar")
}

/// The distillation term of samples `ids` (one batch) with the current vars.
fn term_of(f: &Fixture, lwf: &Lwf, ids: &[usize]) -> (Tensor, f64, usize) {
    let batch: Vec<&Sample> = ids.iter().map(|&i| &f.samples[i]).collect();
    let pixels = batch_pixels(
        &batch,
        &f.model.image,
        AspectMode::Pad,
        &Device::Cpu,
        &mut PixelCache::new(0),
    )
    .expect("pixels");
    let examples: Vec<_> = batch.iter().map(|s| s.example.clone()).collect();
    let (logits, labels) = forward_batch(&f.model.model, &examples, &pixels).expect("forward");
    lwf.term(ids, &logits, &labels)
        .expect("term")
        .expect("supervised positions")
}

#[test]
fn the_term_is_lambda_t_squared_times_the_mean_kl_at_the_shifted_supervised_positions() {
    // b = 2, s = 3, vocab = 3; the positions whose logits predict a label: row 0 t = 0,
    // row 1 t = 1 (masked_cross_entropy's shift).
    let labels = vec![
        vec![7, 1, IGNORE_INDEX],
        vec![IGNORE_INDEX, IGNORE_INDEX, 0],
    ];
    assert_eq!(supervised_rows(&labels, 3), (vec![0, 4], vec![1, 1]));
    let teacher_z = [[1.0, -0.5, 2.0], [0.3, 0.0, -1.0]];
    let student: Vec<f64> = vec![
        0.5, 0.5, 1.0, /**/ 9.0, 9.0, 9.0, /**/ 9.0, 9.0, 9.0, //
        9.0, 9.0, 9.0, /**/ -1.0, 2.0, 0.25, /**/ 9.0, 9.0, 9.0,
    ];
    let student_z = [[0.5, 0.5, 1.0], [-1.0, 2.0, 0.25]];
    let logits = Tensor::from_vec(student, (2, 3, 3), &Device::Cpu).expect("logits");
    let softmax = |z: &[f64; 3], t: f64| -> Vec<f64> {
        let e: Vec<f64> = z.iter().map(|v| (v / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    for (top_k, lambda, temperature) in [(0, 1.0, 2.0), (0, 0.3, 1.0), (2, 1.0, 2.0)] {
        let settings = LwfSettings {
            lambda,
            temperature,
            top_k,
        };
        let samples = teacher_z
            .iter()
            .map(|z| {
                let zt = Tensor::new(&[*z], &Device::Cpu).expect("z");
                let logp =
                    candle_nn::ops::log_softmax(&(zt / temperature).expect("div"), D::Minus1)
                        .expect("logp");
                keep(&logp, top_k, DType::F64).expect("keep")
            })
            .collect();
        let lwf = Lwf::new(
            settings,
            Teacher {
                samples,
                vocab: 3,
                seconds: 0.0,
            },
        )
        .expect("lwf");
        let (term, kl_sum, n) = lwf
            .term(&[0, 1], &logits, &labels)
            .expect("term")
            .expect("positions");
        assert_eq!(n, 2);
        let mut want = 0.0;
        for (tz, sz) in teacher_z.iter().zip(&student_z) {
            let mut p = softmax(tz, temperature);
            let q = softmax(sz, temperature);
            if top_k > 0 {
                // The two largest teacher probabilities, renormalised.
                let mut order = [0usize, 1, 2];
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                p[order[2]] = 0.0;
                let m: f64 = p.iter().sum();
                p.iter_mut().for_each(|v| *v /= m);
            }
            want += p
                .iter()
                .zip(&q)
                .filter(|(pi, _)| **pi > 0.0)
                .map(|(pi, qi)| pi * (pi / qi).ln())
                .sum::<f64>();
        }
        assert!((kl_sum - want).abs() < 1e-12, "{kl_sum} vs {want}");
        let got = value(&term);
        let expect = lambda * temperature * temperature * want / 2.0;
        assert!(
            (got - expect).abs() < 1e-12,
            "top_k {top_k}: {got} vs {expect}"
        );
        assert!(got > 0.0);
        // A shard whose sample ids do not match the teacher's positions is refused.
        assert!(lwf.term(&[1, 0], &logits, &labels).is_ok());
        assert!(lwf.term(&[0, 5], &logits, &labels).is_err());
    }
    // Bad settings are refused.
    for (lambda, temperature) in [(0.0, 2.0), (-1.0, 2.0), (1.0, 0.0), (f64::NAN, 2.0)] {
        let s = LwfSettings {
            lambda,
            temperature,
            top_k: 0,
        };
        assert!(s.check().is_err(), "{lambda} {temperature}");
    }
}

/// Central differences (ε 1e-5) on the `per_var` largest-|grad| entries of every var against
/// the analytic gradient of the term over samples `ids`.
fn check_gradient(f: &Fixture, params: &TrainableParams, lwf: &Lwf, ids: &[usize], per_var: usize) {
    let (term, _, _) = term_of(f, lwf, ids);
    let grads = term.backward().expect("backward");
    let eps = 1e-5;
    let mut checked = 0;
    for (name, var) in &params.vars {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("grad values");
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{name}: all-zero gradient (severed path?)"
        );
        let values: Vec<f64> = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let set = |i: usize, v: f64| {
            let mut w = values.clone();
            w[i] = v;
            let t = Tensor::from_vec(w, var.shape(), &Device::Cpu).expect("tensor");
            var.set(&t).expect("set");
        };
        for &i in order.iter().take(per_var) {
            set(i, values[i] + eps);
            let plus = value(&term_of(f, lwf, ids).0);
            set(i, values[i] - eps);
            let minus = value(&term_of(f, lwf, ids).0);
            set(i, values[i]);
            let numeric = (plus - minus) / (2.0 * eps);
            let analytic = g[i];
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
            checked += 1;
        }
    }
    assert!(checked >= params.vars.len() * per_var.min(1));
}

#[test]
fn the_distillation_gradient_matches_finite_differences() {
    let mut f = fixture(4);
    let params = attach(&mut f);
    let lora = params
        .vars
        .iter()
        .filter(|(n, _)| n.contains("lora_"))
        .count();
    assert!(lora > 0 && params.vars.iter().any(|(n, _)| n.contains("projector")));
    for (top_k, per_var) in [(0, 2), (5, 1)] {
        let settings = LwfSettings {
            lambda: 0.7,
            temperature: 2.0,
            top_k,
        };
        let t = teacher(&f, &params, &settings);
        assert!(t.positions() > 0);
        let lwf = Lwf::new(settings, t).expect("lwf");
        // The student moves away from the teacher: the term is positive.
        shift(&params, 11 + top_k as u64, 0.05, |_| true);
        let (term, kl, _) = term_of(&f, &lwf, &[0, 2, 3]);
        assert!(value(&term) > 0.0 && kl > 0.0, "{} {kl}", value(&term));
        check_gradient(&f, &params, &lwf, &[0, 2, 3], per_var);
    }
}

#[test]
fn the_term_and_its_gradient_vanish_while_the_student_is_the_teacher_and_kl_is_never_negative() {
    let mut f = fixture(5);
    let params = attach(&mut f);
    let settings = LwfSettings {
        lambda: 1.0,
        temperature: 2.0,
        top_k: 0,
    };
    let t = teacher(&f, &params, &settings);
    let lwf = Lwf::new(settings, t).expect("lwf");
    // Other batches than the teacher's (padding differs): still the teacher's outputs.
    let (term, kl, _) = term_of(&f, &lwf, &[4, 1]);
    assert!(value(&term).abs() < 1e-12, "{}", value(&term));
    assert!(kl.abs() < 1e-12);
    let grads = term.backward().expect("backward");
    for (name, var) in &params.vars {
        let g = grads.get(var.as_tensor()).expect("a gradient");
        let max = value(&g.abs().and_then(|a| a.max_all()).expect("max"));
        assert!(max < 1e-10, "{name}: |grad| {max}");
    }
    // The first optimiser step from the parent's adapter (dropout off): its penalty is 0.
    let cfg = TrainConfig {
        batch_size: 5,
        grad_accum: 1,
        learning_rate: 0.0,
        max_steps: Some(1),
        ..TrainConfig::default()
    };
    let report = train_with(
        &f.model.model,
        &params,
        &f.samples,
        &f.model.image,
        &cfg,
        None,
        &mut NoProgress,
        Some(&lwf),
    )
    .expect("train");
    assert_eq!(report.penalties.len(), 1);
    assert!(report.penalties[0].abs() < 1e-12, "{:?}", report.penalties);
    let (first, last) = lwf.kl_first_last(f.samples.len()).expect("logged");
    assert!(first.abs() < 1e-12 && last.abs() < 1e-12);
    // KL ≥ 0 wherever the student goes (full and top-k teachers).
    for top_k in [0, 3] {
        let s = LwfSettings { top_k, ..settings };
        let lwf = Lwf::new(s, teacher(&f, &params, &s)).expect("lwf");
        for seed in 0..3 {
            let saved: Vec<Tensor> = params
                .vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy().expect("copy"))
                .collect();
            shift(&params, 100 + seed, 0.1 * (seed + 1) as f64, |_| true);
            let (term, kl, n) = term_of(&f, &lwf, &[0, 1, 2, 3, 4]);
            assert!(
                n > 0 && kl >= 0.0 && value(&term) >= 0.0,
                "top_k {top_k}: {kl}"
            );
            for ((_, v), t) in params.vars.iter().zip(&saved) {
                v.set(t).expect("restore");
            }
        }
    }
}
