//! O-LoRA on the tiny model (f64): the penalty's and the full objective's gradients against
//! central finite differences, the frozen adapters untouched by training, the saved
//! concatenation reproducing the stacked forward, per-task tensors carried over unchanged, and
//! the refusals.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::adapter_tests::randomise;
use super::olora::{attach_olora, read_index, write_olora, OloraPenalty, OLORA_TENSORS};
use super::params::{AdapterKind, AdapterSettings, TrainableParams};
use super::save::save_adapter;
use super::tests::{batch, loss_of, scalar, tiny_model};
use super::trainer::Regularizer;
use crate::ml::linear::Adapter;
use crate::ml::llava::Llava;
use crate::ml::load::read_tensor_file;
use crate::ml::peft::PeftAdapter;
use crate::ml::MlError;

fn settings(r: usize, alpha: f64) -> AdapterSettings {
    AdapterSettings {
        kind: AdapterKind::Lora,
        r,
        alpha,
        dropout: 0.0,
        seed: 3,
        ..AdapterSettings::default()
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

/// One O-LoRA step on `model` (adapters cleared first): attach on `parent`, random values,
/// saved into `out` as task `task`. Returns the params (still attached).
fn step(
    model: &mut Llava,
    s: &AdapterSettings,
    parent: Option<(&Path, &str)>,
    task: &str,
    out: &Path,
    seed: u64,
) -> TrainableParams {
    model.clear_adapters();
    let (params, stack) = attach_olora(model, s, parent).expect("attach");
    randomise(&params, seed);
    save_adapter(&params, out, "tiny").expect("save");
    write_olora(&params, &stack, task, out, "tiny").expect("write olora");
    params
}

/// The objective `loss` built by `f` against central differences on the `per_var` entries of
/// largest gradient of every new LoRA var.
fn check_fd(params: &TrainableParams, per_var: usize, f: &dyn Fn() -> Tensor) -> f64 {
    let grads = f().backward().expect("backward");
    let eps = 1e-5;
    let mut worst = 0f64;
    for (name, var) in params.vars.iter().filter(|(n, _)| n.contains(".lora_")) {
        let g = values(grads.get(var.as_tensor()).expect("a gradient"));
        let v = values(var.as_tensor());
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let set = |var: &Var, i: usize, x: f64| {
            let mut w = v.clone();
            w[i] = x;
            var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).expect("tensor"))
                .expect("set");
        };
        for &i in order.iter().take(per_var) {
            set(var, i, v[i] + eps);
            let plus = scalar(&f());
            set(var, i, v[i] - eps);
            let minus = scalar(&f());
            set(var, i, v[i]);
            let numeric = (plus - minus) / (2.0 * eps);
            let scale = g[i].abs().max(numeric.abs()).max(1e-12);
            let rel = (g[i] - numeric).abs() / scale;
            assert!(
                rel < 1e-5,
                "{name}[{i}]: analytic {:e} vs numeric {numeric:e}",
                g[i]
            );
            worst = worst.max(rel);
        }
    }
    worst
}

#[test]
fn penalty_and_full_loss_gradients_match_finite_differences_and_the_frozen_part_gets_none() {
    let (dir, mut model) = tiny_model();
    let t1 = dir.path().join("t1");
    step(&mut model, &settings(4, 8.0), None, "one", &t1, 7);
    model.clear_adapters();
    let (params, stack) =
        attach_olora(&mut model, &settings(4, 12.0), Some((&t1, "one"))).expect("attach");
    randomise(&params, 8);
    params.set_training(false);
    assert_eq!(stack.frozen_rank(), 4);
    assert!(!stack.frozen.is_empty());
    // Only the new adapter (and the projector) are vars.
    let linears = stack.frozen.len();
    assert_eq!(
        params.names().filter(|n| n.contains(".lora_")).count(),
        2 * linears
    );
    let penalty = OloraPenalty::new(0.5, 0.1, &params, &stack);
    // The penalty alone, then cross-entropy + penalty.
    let p = || {
        penalty
            .params_term(&params)
            .expect("term")
            .expect("a term with earlier tasks")
    };
    let worst_p = check_fd(&params, 3, &p);
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let full = || (loss_of(&model, &examples, &pixels) + p()).expect("sum");
    let worst_full = check_fd(&params, 2, &full);
    eprintln!("O-LoRA FD: penalty {worst_p:e}, full loss {worst_full:e}");
    // The penalty is what the module docs say: λ1 Σ|A_f A_newᵀ| + λ2 Σ(A² + B²).
    let mut want = 0.0;
    for (linear, f) in &stack.frozen {
        let a = params
            .get(&format!("{linear}.lora_A.weight"))
            .expect("A")
            .as_tensor();
        let b = params
            .get(&format!("{linear}.lora_B.weight"))
            .expect("B")
            .as_tensor();
        let prod = values(&f.a.matmul(&a.t().expect("t")).expect("mm"));
        want += 0.5 * prod.iter().map(|x| x.abs()).sum::<f64>();
        want += 0.1
            * values(a)
                .iter()
                .chain(&values(b))
                .map(|x| x * x)
                .sum::<f64>();
    }
    let got = scalar(&p());
    assert!((got - want).abs() < 1e-9 * want.abs(), "{got} vs {want}");
    // The frozen factors get no gradient from the loss.
    let grads = full().backward().expect("backward");
    for f in stack.frozen.values() {
        assert!(grads.get(&f.a).is_none() && grads.get(&f.b).is_none());
    }
}

#[test]
fn training_steps_move_only_the_new_adapter_and_lower_the_objective() {
    let (dir, mut model) = tiny_model();
    let t1 = dir.path().join("t1");
    step(&mut model, &settings(4, 8.0), None, "one", &t1, 7);
    let before: BTreeMap<String, Vec<f64>> = read_tensor_file(&t1.join(OLORA_TENSORS))
        .expect("read")
        .into_iter()
        .map(|(n, t)| (n, values(&t)))
        .collect();
    model.clear_adapters();
    let (params, stack) =
        attach_olora(&mut model, &settings(4, 8.0), Some((&t1, "one"))).expect("attach");
    randomise(&params, 9);
    let frozen_before: Vec<Vec<f64>> = stack.frozen.values().map(|l| values(&l.a)).collect();
    let penalty = OloraPenalty::new(0.5, 0.0, &params, &stack);
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let objective = || {
        let ce = loss_of(&model, &examples, &pixels);
        let p = penalty.params_term(&params).expect("term").expect("some");
        (ce + p).expect("sum")
    };
    let first = scalar(&objective());
    let orth0 = scalar(&penalty.orthogonality(&params).expect("o").expect("some"));
    for _ in 0..5 {
        let grads = objective().backward().expect("backward");
        for (_, var) in &params.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let next = (var.as_tensor() - (g * 0.02).expect("scaled")).expect("step");
                var.set(&next).expect("set");
            }
        }
    }
    let last = scalar(&objective());
    let orth1 = scalar(&penalty.orthogonality(&params).expect("o").expect("some"));
    assert!(last < first, "objective {first} → {last}");
    assert!(orth1 < orth0, "orthogonality {orth0} → {orth1}");
    let frozen_after: Vec<Vec<f64>> = stack.frozen.values().map(|l| values(&l.a)).collect();
    assert_eq!(frozen_before, frozen_after);
    // The earlier task's own tensors go into the next checkpoint unchanged.
    let t2 = dir.path().join("t2");
    save_adapter(&params, &t2, "tiny").expect("save");
    let saved = write_olora(&params, &stack, "two", &t2, "tiny").expect("write");
    assert_eq!(saved.total_rank, 8);
    let after: BTreeMap<String, Vec<f64>> = read_tensor_file(&t2.join(OLORA_TENSORS))
        .expect("read")
        .into_iter()
        .map(|(n, t)| (n, values(&t)))
        .collect();
    for (name, v) in &before {
        assert_eq!(after.get(name), Some(v), "{name}");
    }
    assert_eq!(after.len(), 2 * before.len());
    assert!(after
        .keys()
        .any(|k| k.starts_with("two.language_model.layers.0.")));
}

#[test]
fn the_saved_concatenation_reproduces_the_stacked_forward_and_chains() {
    let (dir, mut model) = tiny_model();
    let (examples, pixels) = batch(model.config.text.vocab_size as u32);
    let t1 = dir.path().join("t1");
    step(&mut model, &settings(4, 8.0), None, "one", &t1, 7);
    let t2 = dir.path().join("t2");
    // Another scale for task 2 (α/r = 3 vs 2): its B is folded into the concatenation.
    step(
        &mut model,
        &settings(4, 12.0),
        Some((&t1, "one")),
        "two",
        &t2,
        8,
    );
    let t3 = dir.path().join("t3");
    step(
        &mut model,
        &settings(2, 4.0),
        Some((&t2, "two")),
        "one",
        &t3,
        9,
    );
    let stacked = values(&loss_of(&model, &examples, &pixels));
    let logits = |m: &Llava| {
        let (l, _) = super::batch::forward_batch(m, &examples, &pixels).expect("forward");
        values(&l)
    };
    let stacked_logits = logits(&model);
    // Task 3's checkpoint read back as one plain LoRA (rank 4 + 4 + 2).
    model.clear_adapters();
    let saved = PeftAdapter::load(&t3, &Device::Cpu, DType::F64).expect("load");
    assert_eq!(saved.rank(), Some(10));
    saved.attach(&mut model).expect("attach");
    assert!(matches!(
        saved.layers.values().next(),
        Some(Adapter::Lora(_))
    ));
    let plain_logits = logits(&model);
    let diff = stacked_logits
        .iter()
        .zip(&plain_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-5, "max |Δlogit| {diff}");
    assert!((values(&loss_of(&model, &examples, &pixels))[0] - stacked[0]).abs() < 1e-8);
    // The index names every task in order, a repeated task under its own key.
    let index = read_index(&t3).expect("read").expect("an index");
    let keys: Vec<(&str, &str, usize)> = index
        .tasks
        .iter()
        .map(|t| (t.task.as_str(), t.key.as_str(), t.rank))
        .collect();
    assert_eq!(
        keys,
        vec![("one", "one", 4), ("two", "two", 4), ("one", "one~2", 2)]
    );
    // Task 1's and 2's tensors are the same bytes in every later checkpoint.
    let file = |d: &Path| -> BTreeMap<String, Vec<f64>> {
        read_tensor_file(&d.join(OLORA_TENSORS))
            .expect("read")
            .into_iter()
            .map(|(n, t)| (n, values(&t)))
            .collect()
    };
    let (f1, f2, f3) = (file(&t1), file(&t2), file(&t3));
    for (n, v) in &f1 {
        assert_eq!(f2.get(n), Some(v));
        assert_eq!(f3.get(n), Some(v));
    }
    for (n, v) in &f2 {
        assert_eq!(f3.get(n), Some(v));
    }
}

#[test]
fn moelora_is_refused_as_settings_and_as_parent() {
    let (dir, mut model) = tiny_model();
    let moe = AdapterSettings {
        kind: AdapterKind::MoeLora { experts: 2 },
        ..settings(4, 8.0)
    };
    let e = attach_olora(&mut model, &moe, None).expect_err("refused");
    assert!(e.to_string().contains("plain LoRA"), "{e}");
    let p = TrainableParams::attach(&mut model, &moe).expect("moe attach");
    let m = dir.path().join("moe");
    save_adapter(&p, &m, "tiny").expect("save");
    model.clear_adapters();
    let e = attach_olora(&mut model, &settings(4, 8.0), Some((&m, "moe"))).expect_err("refused");
    assert!(matches!(e, MlError::AdapterMismatch { .. }), "{e}");
    assert!(e.to_string().contains("MoELoRA"), "{e}");
    // The model is left without adapters.
    assert!(model.linears_mut().iter().all(|(_, l)| l.adapter.is_none()));
}
