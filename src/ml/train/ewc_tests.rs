//! EWC checked numerically on the tiny model in f64: the penalty's value and gradient against
//! its closed form λ·F ⊙ (θ − θ*) and central finite differences, through the training loop
//! too; the diagonal Fisher against squared finite-difference gradients of each sample's mean
//! log-likelihood; the seeded choice of Fisher samples and the consolidation γ·F_parent + F_task.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::batch::forward_batch;
use super::data::{batch_pixels, PixelCache, Sample};
use super::ewc::{consolidate, diagonal_fisher, fisher_sample_indices, EwcPenalty};
use super::loop_tests::{fixture, load, nonzero_lora_b, samples_of, settings, task};
use super::loss::masked_cross_entropy;
use super::params::{AdapterKind, TrainableParams};
use super::trainer::{train_with, NoProgress, Regularizer, TrainConfig};
use crate::ml::image::AspectMode;
use crate::ml::llava::LoadedModel;
use crate::ml::rng::Rng;

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("values")
}

fn set_entry(var: &Var, base: &[f64], i: usize, v: f64) {
    let mut w = base.to_vec();
    w[i] = v;
    let t = Tensor::from_vec(w, var.shape(), &Device::Cpu).expect("tensor");
    var.set(&t).expect("set");
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .expect("scalar")
}

/// A positive pseudo-Fisher for every `k`-th var of `params` (others left out).
fn some_fisher(params: &TrainableParams, k: usize) -> BTreeMap<String, Tensor> {
    let mut rng = Rng::new(77);
    params
        .vars
        .iter()
        .step_by(k)
        .map(|(name, var)| {
            let v: Vec<f64> = (0..var.elem_count())
                .map(|_| rng.uniform() * 3.0 + 0.01)
                .collect();
            let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).expect("fisher");
            (name.clone(), t)
        })
        .collect()
}

/// Move every var by a seeded random amount (θ ≠ θ*).
fn nudge(params: &TrainableParams, seed: u64) {
    let mut rng = Rng::new(seed);
    for (_, var) in &params.vars {
        let d = Tensor::from_vec(
            rng.normal_vec(var.elem_count(), 0.1),
            var.shape(),
            &Device::Cpu,
        )
        .and_then(|t| t.to_dtype(DType::F64))
        .expect("delta");
        let moved = (var.as_tensor() + d).expect("moved");
        var.set(&moved).expect("set");
    }
}

fn lora_model() -> (super::loop_tests::Fixture, LoadedModel, TrainableParams) {
    let f = fixture(4, 1);
    let mut m = load(&f.model_dir, DType::F64);
    let params =
        TrainableParams::attach(&mut m.model, &settings(AdapterKind::Lora, 3)).expect("attach");
    nonzero_lora_b(&params);
    params.set_training(false);
    (f, m, params)
}

#[test]
fn the_penalty_and_its_gradient_match_the_closed_form_and_finite_differences() {
    let (f, m, params) = lora_model();
    let fisher = some_fisher(&params, 2);
    let anchor: BTreeMap<String, Vec<f64>> = params
        .vars
        .iter()
        .map(|(n, v)| (n.clone(), values(v.as_tensor())))
        .collect();
    let lambda = 3.5;
    let pen = EwcPenalty::new(lambda, &params, &fisher, "test").expect("penalty");
    assert_eq!(pen.vars(), fisher.len());
    // At θ = θ* the penalty is 0.
    let at_anchor = pen.params_term(&params).expect("term").expect("some");
    assert_eq!(scalar(&at_anchor), 0.0);
    nudge(&params, 5);
    let term = pen.params_term(&params).expect("term").expect("some");
    let value = scalar(&term);
    let grads = term.backward().expect("backward");
    let mut expected_value = 0.0;
    for (name, var) in &params.vars {
        let theta = values(var.as_tensor());
        let g = grads.get(var.as_tensor()).map(values);
        let Some(fv) = fisher.get(name).map(values) else {
            // No Fisher, no penalty: no gradient (or a zero one).
            assert!(
                g.is_none_or(|g| g.iter().all(|x| *x == 0.0)),
                "{name} has no Fisher but a gradient"
            );
            continue;
        };
        let g = g.expect("a penalised var has a gradient");
        let star = &anchor[name];
        for i in 0..theta.len() {
            let d = theta[i] - star[i];
            expected_value += lambda / 2.0 * fv[i] * d * d;
            let want = lambda * fv[i] * d;
            assert!(
                (g[i] - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{name}[{i}]: {} vs λF(θ−θ*) {want}",
                g[i]
            );
        }
        // Central differences of the penalty on the largest-gradient entries.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let eps = 1e-5;
        for &i in order.iter().take(2) {
            set_entry(var, &theta, i, theta[i] + eps);
            let plus = scalar(&pen.params_term(&params).expect("t").expect("s"));
            set_entry(var, &theta, i, theta[i] - eps);
            let minus = scalar(&pen.params_term(&params).expect("t").expect("s"));
            set_entry(var, &theta, i, theta[i]);
            let numeric = (plus - minus) / (2.0 * eps);
            let rel = (numeric - g[i]).abs() / g[i].abs().max(1e-12);
            assert!(rel < 1e-6, "{name}[{i}]: FD {numeric} vs {} ({rel})", g[i]);
        }
    }
    assert!(
        (value - expected_value).abs() <= 1e-10 * expected_value,
        "{value} vs {expected_value}"
    );
    assert!(value > 0.0);

    // Through the training loop: one step at learning rate 0 reports the same penalty, and the
    // fingerprint names the method and changes with λ.
    let samples = samples_of(&f, &m, &task("mini-GQA"));
    let cfg = TrainConfig {
        batch_size: samples.len(),
        grad_accum: 1,
        learning_rate: 0.0,
        max_steps: Some(1),
        ..TrainConfig::default()
    };
    let report = train_with(
        &m.model,
        &params,
        &samples,
        &m.image,
        &cfg,
        None,
        &mut NoProgress,
        Some(&pen),
    )
    .expect("train");
    assert_eq!(report.penalties.len(), 1);
    assert!(
        (report.penalties[0] - value).abs() <= 1e-10 * value,
        "{} vs {value}",
        report.penalties[0]
    );
    let other = EwcPenalty::new(1.0, &params, &fisher, "test").expect("penalty");
    assert!(pen.fingerprint().starts_with("ewc "));
    assert_ne!(pen.fingerprint(), other.fingerprint());
    // A Fisher of the wrong shape is refused, naming its source; so is a bad λ.
    let (name, var) = &params.vars[0];
    let mut wrong = BTreeMap::new();
    wrong.insert(
        name.clone(),
        Tensor::zeros(var.elem_count() + 1, DType::F64, &Device::Cpu).expect("zeros"),
    );
    let e = EwcPenalty::new(1.0, &params, &wrong, "parent.safetensors").expect_err("shape");
    assert!(e.to_string().contains("parent.safetensors"), "{e}");
    assert!(EwcPenalty::new(f64::NAN, &params, &fisher, "x").is_err());
    assert!(EwcPenalty::new(-1.0, &params, &fisher, "x").is_err());
}

/// Sample `k`'s mean supervised-token log-likelihood.
fn log_likelihood(m: &LoadedModel, s: &Sample) -> f64 {
    let mut cache = PixelCache::new(0);
    let px =
        batch_pixels(&[s], &m.image, AspectMode::Pad, &m.model.device, &mut cache).expect("pixels");
    let (logits, labels) =
        forward_batch(&m.model, std::slice::from_ref(&s.example), &px).expect("forward");
    -scalar(&masked_cross_entropy(&logits, &labels).expect("loss"))
}

#[test]
fn the_fisher_is_the_mean_squared_finite_difference_gradient_of_each_samples_log_likelihood() {
    let (f, m, params) = lora_model();
    let samples = samples_of(&f, &m, &task("mini-GQA"));
    let which: Vec<usize> = (0..3).collect();
    let mut calls = Vec::new();
    let fisher = diagonal_fisher(
        &m.model,
        &params,
        &samples,
        &m.image,
        AspectMode::Pad,
        &which,
        &mut |done, total| calls.push((done, total)),
    )
    .expect("fisher");
    assert_eq!(calls, vec![(1, 3), (2, 3), (3, 3)]);
    assert_eq!(fisher.len(), params.vars.len(), "one tensor per var");
    let eps = 1e-5;
    let mut checked = BTreeMap::new();
    for (name, var) in &params.vars {
        let fv = values(&fisher[name]);
        assert_eq!(fv.len(), var.elem_count());
        assert!(fv.iter().all(|x| *x >= 0.0), "{name}: negative Fisher");
        let max = fv.iter().fold(0f64, |a, b| a.max(*b));
        assert!(max > 0.0, "{name}: all-zero Fisher");
        let kind = if name.contains("lora_A") {
            "lora_A"
        } else if name.contains("lora_B") {
            "lora_B"
        } else {
            "projector"
        };
        // Two vars of each kind, the largest entry of each: the mean over samples of the
        // squared central difference of the log-likelihood.
        let n = checked.entry(kind).or_insert(0);
        if *n >= 2 {
            continue;
        }
        *n += 1;
        let theta = values(var.as_tensor());
        let i = (0..fv.len())
            .max_by(|&a, &b| fv[a].total_cmp(&fv[b]))
            .expect("an entry");
        let mut sq = 0.0;
        for &k in &which {
            set_entry(var, &theta, i, theta[i] + eps);
            let plus = log_likelihood(&m, &samples[k]);
            set_entry(var, &theta, i, theta[i] - eps);
            let minus = log_likelihood(&m, &samples[k]);
            set_entry(var, &theta, i, theta[i]);
            let g = (plus - minus) / (2.0 * eps);
            sq += g * g;
        }
        let numeric = sq / which.len() as f64;
        let rel = (numeric - fv[i]).abs() / fv[i];
        assert!(
            rel < 1e-5,
            "{name}[{i}]: Fisher {} vs FD {numeric} ({rel})",
            fv[i]
        );
    }
    assert_eq!(checked.len(), 3, "{checked:?}");
    // The Fisher is a mean: the same samples twice give the same Fisher.
    let twice: Vec<usize> = which.iter().chain(&which).copied().collect();
    let again = diagonal_fisher(
        &m.model,
        &params,
        &samples,
        &m.image,
        AspectMode::Pad,
        &twice,
        &mut |_, _| {},
    )
    .expect("fisher");
    for (name, t) in &fisher {
        let (a, b) = (values(t), values(&again[name]));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1e-30))
            .fold(0f64, f64::max);
        assert!(worst < 1e-9, "{name}: {worst}");
    }
    assert!(diagonal_fisher(
        &m.model,
        &params,
        &samples,
        &m.image,
        AspectMode::Pad,
        &[],
        &mut |_, _| {}
    )
    .is_err());
}

#[test]
fn fisher_samples_are_a_seeded_choice_and_the_consolidation_weights_the_parent_by_gamma() {
    let (f, m, _params) = lora_model();
    let samples = samples_of(&f, &m, &task("mini-GQA"));
    let n = samples.len();
    assert_eq!(
        fisher_sample_indices(&samples, 0, 1),
        (0..n).collect::<Vec<_>>()
    );
    assert_eq!(fisher_sample_indices(&samples, n + 5, 1).len(), n);
    let a = fisher_sample_indices(&samples, 2, 1);
    assert_eq!(a.len(), 2);
    assert!(a[0] < a[1] && a[1] < n, "{a:?}");
    assert_eq!(
        a,
        fisher_sample_indices(&samples, 2, 1),
        "same seed, same choice"
    );
    let seeds: std::collections::BTreeSet<Vec<usize>> = (0..20)
        .map(|s| fisher_sample_indices(&samples, 2, s))
        .collect();
    assert!(seeds.len() > 1, "the seed changes the choice");

    let t = |v: &[f64]| Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).expect("t");
    let mut parent = BTreeMap::new();
    parent.insert("a".to_string(), t(&[1.0, 2.0]));
    parent.insert("p".to_string(), t(&[5.0]));
    parent.insert("gone".to_string(), t(&[9.0]));
    let mut task_f = BTreeMap::new();
    task_f.insert("a".to_string(), t(&[0.5, 0.25]));
    task_f.insert("p".to_string(), t(&[1.0]));
    task_f.insert("new".to_string(), t(&[3.0]));
    let out = consolidate(Some(&parent), &task_f, 0.5, |n| n == "p").expect("merge");
    assert_eq!(values(&out["a"]), vec![1.0, 1.25]);
    assert_eq!(
        values(&out["p"]),
        vec![1.0],
        "a var started afresh keeps the task's"
    );
    assert_eq!(values(&out["new"]), vec![3.0]);
    assert!(!out.contains_key("gone"), "only the vars trained now");
    let plain = consolidate(Some(&parent), &task_f, 1.0, |_| false).expect("merge");
    assert_eq!(values(&plain["a"]), vec![1.5, 2.25]);
    assert_eq!(values(&plain["p"]), vec![6.0]);
}
