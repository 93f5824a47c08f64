//! Tests of the training loop on the tiny model and CoIN-mini data: label masking with a real
//! tokenizer, gradient accumulation equal to one large batch, exact resumption, and a learning
//! test (loss falls, exact-match accuracy far above chance).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::data::{encode_record, prepare_samples, Labeling, Sample};
use super::loss::IGNORE_INDEX;
use super::params::{AdapterKind, AdapterSettings, TrainableParams};
use super::trainer::{
    accumulate_step, train, CheckpointPolicy, NoProgress, StepInfo, StepOptions, TrainConfig,
    TrainProgress,
};
use crate::ml::generate::{generate, GenerateRequest, GenerateSettings};
use crate::ml::image::Rgb8;
use crate::ml::llava::{load_model, LoadedModel, ModelSource, Segment};
use crate::ml::runtime::Checkpointing;
use crate::ml::tiny::{write_tiny, TinyOptions};
use crate::tasks::formats::{read_test_file, read_train_file};
use crate::tasks::mini::{self, MiniConfig};

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) model_dir: PathBuf,
    pub(super) data: PathBuf,
}

/// A tiny model whose tokenizer knows CoIN-mini's words, plus CoIN-mini data.
pub(super) fn fixture(train: usize, test: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let model_dir = write_tiny(
        &dir.path().join("model"),
        &TinyOptions {
            corpus: mini::coin_mini_corpus(),
            ..TinyOptions::default()
        },
    )
    .expect("tiny model");
    let data = dir.path().join("mini");
    mini::generate(
        &data,
        &MiniConfig {
            train,
            test,
            ..MiniConfig::default()
        },
        |_| {},
    )
    .expect("coin-mini");
    Fixture {
        _dir: dir,
        model_dir,
        data,
    }
}

pub(super) fn load(dir: &Path, dtype: DType) -> LoadedModel {
    let src = ModelSource::resolve(dir, None, None).expect("resolves");
    load_model(&src, &Device::Cpu, dtype).expect("loads")
}

pub(super) fn task(name: &str) -> mini::MiniTask {
    *mini::TASKS
        .iter()
        .find(|t| t.name == name)
        .expect("known mini task")
}

pub(super) fn samples_of(f: &Fixture, m: &LoadedModel, t: &mini::MiniTask) -> Vec<Sample> {
    let records = read_train_file(
        &f.data
            .join("Instructions_Original")
            .join(t.dir)
            .join("train.json"),
    )
    .expect("train.json");
    let (samples, stats) = prepare_samples(
        &records,
        &f.data.join("cl_dataset"),
        &m.tokenizer,
        Labeling::for_model(&m.model.config),
        m.model.config.image_seq_len(),
        2048,
    )
    .expect("samples");
    assert_eq!(stats.samples, records.len());
    samples
}

#[test]
fn labels_supervise_exactly_the_assistant_replies() {
    let f = fixture(2, 1);
    let m = load(&f.model_dir, DType::F32);
    let record = super::data::record(
        true,
        &[
            ("What color is this?\n<image>", "red"),
            ("Is it a circle?", "yes"),
        ],
    );
    let ex = encode_record(&m.tokenizer, &record).expect("encodes");
    assert!(
        matches!(ex.segments[1], Segment::Image),
        "{:?}",
        ex.segments
    );
    let ids: Vec<u32> = ex
        .segments
        .iter()
        .filter_map(|s| match s {
            Segment::Text(t) => Some(t.clone()),
            Segment::Image => None,
        })
        .flatten()
        .collect();
    assert_eq!(ids.len(), ex.text_labels.len());
    let sup: Vec<u32> = ex
        .text_labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    let unsup: Vec<u32> = ids
        .iter()
        .zip(&ex.text_labels)
        .filter(|(_, &l)| l == IGNORE_INDEX)
        .map(|(&i, _)| i)
        .collect();
    let dec = |v: &[u32]| {
        m.tokenizer
            .hf()
            .expect("an HF tokenizer")
            .decode(v, false)
            .expect("decodes")
    };
    let s = dec(&sup);
    assert_eq!(s.replace(' ', ""), "red</s>yes</s>", "supervised: {s:?}");
    let u = dec(&unsup);
    assert!(
        u.ends_with("USER: Is it a circle? ASSISTANT:"),
        "unsupervised: {u:?}"
    );
    assert!(!u.contains("red") && !u.contains("yes"), "{u:?}");
    // Supervised labels equal their token ids (no shift inside the labels).
    for (&id, &l) in ids.iter().zip(&ex.text_labels) {
        assert!(l == IGNORE_INDEX || l == i64::from(id));
    }
}

/// What training supervises is what greedy decoding must produce: the first turn's tokens
/// are the generation prompt's tokens followed by supervised tokens only. The tiny byte-level
/// BPE has no merge for ` B` or ` 3` (the space is a token of its own), so this fails if the
/// separating space after `ASSISTANT:` is left unsupervised.
#[test]
fn every_token_after_the_generation_prompt_is_supervised() {
    let f = fixture(2, 1);
    let m = load(&f.model_dir, DType::F32);
    let text_ids = |segments: &[Segment]| -> Vec<u32> {
        segments
            .iter()
            .filter_map(|s| match s {
                Segment::Text(t) => Some(t.clone()),
                Segment::Image => None,
            })
            .flatten()
            .collect()
    };
    let mut separate_space = 0;
    for (q, a) in [
        ("Which one?\nA. red\nB. blue", "B"),
        ("How many shapes are there?", "3"),
        ("What color is this?", "red"),
        ("Where is it?", "[0.25, 0.50, 0.50, 0.75]"),
    ] {
        let record = super::data::record(true, &[(&format!("<image>\n{q}"), a)]);
        let ex = encode_record(&m.tokenizer, &record).expect("encodes");
        let ids = text_ids(&ex.segments);
        let prompt = m
            .tokenizer
            .encode_prompt(&crate::ml::template::image_question_prompt(q))
            .expect("prompt encodes");
        let prompt_ids = text_ids(&prompt);
        assert_eq!(
            &ids[..prompt_ids.len()],
            &prompt_ids[..],
            "{q}: same prefix"
        );
        assert!(
            ex.text_labels[..prompt_ids.len()]
                .iter()
                .all(|&l| l == IGNORE_INDEX),
            "{q}: a prompt token is supervised"
        );
        let rest = &ex.text_labels[prompt_ids.len()..];
        assert!(
            rest.iter().all(|&l| l != IGNORE_INDEX),
            "{q} -> {a}: a token generation must produce is unsupervised: {rest:?}"
        );
        let first = m
            .tokenizer
            .hf()
            .expect("an HF tokenizer")
            .decode(&[ids[prompt_ids.len()]], false)
            .expect("decodes");
        if first == " " {
            separate_space += 1;
        }
    }
    // The case the test is about occurs with this tokenizer.
    assert!(
        separate_space > 0,
        "no reply starts with a lone space token"
    );
}

pub(super) fn settings(kind: AdapterKind, seed: u64) -> AdapterSettings {
    AdapterSettings {
        kind,
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        seed,
        ..AdapterSettings::default()
    }
}

/// Largest difference between two gradient sets relative to each tensor's largest entry
/// (every var present in both, none all-zero in `a`).
fn worst_relative_difference(
    a: &std::collections::BTreeMap<String, Tensor>,
    b: &std::collections::BTreeMap<String, Tensor>,
) -> f64 {
    assert_eq!(a.len(), b.len());
    let max_abs = |t: &Tensor| {
        t.abs()
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f64>())
            .expect("max")
    };
    let mut worst = 0.0f64;
    for (name, ga) in a {
        let diff = max_abs(&(ga - &b[name]).expect("diff"));
        let scale = max_abs(ga);
        assert!(scale > 0.0, "{name} has a zero gradient");
        worst = worst.max(diff / scale);
    }
    worst
}

/// Set every LoRA B to 0.05 (B starts at zero, which leaves A without a gradient path).
pub(super) fn nonzero_lora_b(params: &TrainableParams) {
    for (name, var) in &params.vars {
        if name.contains("lora_B") {
            let v = var.as_tensor().ones_like().expect("ones") * 0.05;
            var.set(&v.expect("scaled")).expect("set");
        }
    }
}

/// A regularizer whose outputs term is `k` × the shard's cross-entropy and whose parameters
/// term is `c/2 · Σ θ²` over the vars named `only`: its gradients are known in closed form.
#[derive(Debug)]
struct ScaledLoss {
    k: f64,
    c: f64,
    only: String,
}

impl super::trainer::Regularizer for ScaledLoss {
    fn fingerprint(&self) -> String {
        format!("scaled {} {} {}", self.k, self.c, self.only)
    }
    fn logits_term(
        &self,
        _ids: &[usize],
        logits: &Tensor,
        labels: &[Vec<i64>],
    ) -> crate::ml::Result<Option<Tensor>> {
        Ok(Some(
            (super::loss::masked_cross_entropy(logits, labels)? * self.k)?,
        ))
    }
    fn params_term(&self, params: &TrainableParams) -> crate::ml::Result<Option<Tensor>> {
        let v = params.get(&self.only).expect("named var");
        Ok(Some((v.as_tensor().sqr()?.sum_all()? * (self.c / 2.0))?))
    }
}

#[test]
fn a_regularizer_adds_its_terms_to_the_loss_and_gradients_of_every_shard_and_step() {
    let f = fixture(6, 1);
    let mut m = load(&f.model_dir, DType::F64);
    let samples = samples_of(&f, &m, &task("mini-GQA"));
    let params =
        TrainableParams::attach(&mut m.model, &settings(AdapterKind::Lora, 3)).expect("attach");
    nonzero_lora_b(&params);
    params.set_training(false);
    let micro = vec![vec![0, 1, 2], vec![3, 4, 5]];
    let (l0, g0, _) = step_grads(&m, &params, &samples, &micro, 1, Checkpointing::Off);
    let reg = ScaledLoss {
        k: 0.5,
        c: 0.0,
        only: params.vars[0].0.clone(),
    };
    for shards in [1, 3] {
        let sums = accumulate_step(
            &m.model,
            &params,
            &samples,
            &m.image,
            &micro,
            StepOptions {
                aspect: crate::ml::image::AspectMode::Pad,
                max_shards: shards,
                regularizer: Some(&reg),
                checkpointing: Checkpointing::Off,
            },
            &mut super::data::PixelCache::new(0),
        )
        .expect("step");
        assert!(
            (sums.loss - l0).abs() < 1e-10,
            "the loss stays the cross-entropy"
        );
        assert!(
            (sums.extra - 0.5 * l0).abs() < 1e-10,
            "extra {} vs {}",
            sums.extra,
            0.5 * l0
        );
        let mut g = sums.grads;
        let g = g.take();
        let scaled: std::collections::BTreeMap<String, Tensor> = g0
            .iter()
            .map(|(k, t)| (k.clone(), (t * 1.5).expect("scale")))
            .collect();
        let worst = worst_relative_difference(&g, &scaled);
        assert!(
            worst < 1e-9,
            "{shards} shards: worst relative difference {worst}"
        );
    }
    // The parameters term, through train_with: one step at learning rate 0 changes nothing,
    // and its value c/2·Σθ² is reported per step.
    let name = params.vars[1].0.clone();
    let theta = params.get(&name).expect("var").as_tensor().clone();
    let expected = theta
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        * 2.0
        / 2.0;
    let reg = ScaledLoss {
        k: 0.0,
        c: 2.0,
        only: name,
    };
    let cfg = TrainConfig {
        batch_size: 6,
        grad_accum: 1,
        learning_rate: 0.0,
        max_steps: Some(1),
        ..TrainConfig::default()
    };
    let report = super::trainer::train_with(
        &m.model,
        &params,
        &samples,
        &m.image,
        &cfg,
        None,
        &mut NoProgress,
        Some(&reg),
    )
    .expect("train");
    assert_eq!(report.penalties.len(), 1);
    assert!(
        (report.penalties[0] - expected).abs() < 1e-9 * expected.max(1.0),
        "penalty {} vs {expected}",
        report.penalties[0]
    );
}

/// One [`accumulate_step`] over `micro` in at most `shards` shards, checkpointed or not: (loss,
/// gradients by name, supervised tokens).
fn step_grads(
    m: &LoadedModel,
    params: &TrainableParams,
    samples: &[Sample],
    micro: &[Vec<usize>],
    shards: usize,
    checkpointing: Checkpointing,
) -> (f64, std::collections::BTreeMap<String, Tensor>, usize) {
    let mut sums = accumulate_step(
        &m.model,
        params,
        samples,
        &m.image,
        micro,
        StepOptions {
            aspect: crate::ml::image::AspectMode::Pad,
            max_shards: shards,
            regularizer: None,
            checkpointing,
        },
        &mut super::data::PixelCache::new(0),
    )
    .expect("step");
    assert_eq!(sums.extra, 0.0, "no regularizer, no extra term");
    // The step reports what it checkpointed: every decoder layer for `on`, none for `off`.
    let layers = m.model.llm.layers.len();
    match checkpointing {
        Checkpointing::On => assert_eq!(sums.checkpointed_layers, layers),
        Checkpointing::Off => assert_eq!(sums.checkpointed_layers, 0),
        Checkpointing::Auto => assert!(sums.checkpointed_layers <= layers),
    }
    (sums.loss, sums.grads.take(), sums.tokens)
}

#[test]
fn accumulated_micro_batches_and_shards_equal_one_large_batch() {
    // The fused CPU loop kernels on, as in release builds (debug builds default to the
    // composed ops): accumulation, sharding and bit-identical resume must hold for them (and
    // the shards, on rayon's threads, must inherit this thread's setting).
    crate::ml::fused::set_loop_kernels_for_this_thread(Some(true));
    let f = fixture(8, 1);
    let mut m = load(&f.model_dir, DType::F64);
    let t = task("mini-GQA");
    let samples = samples_of(&f, &m, &t);
    for kind in [AdapterKind::Lora, AdapterKind::MoeLora { experts: 2 }] {
        let params = TrainableParams::attach(&mut m.model, &settings(kind, 3)).expect("attach");
        nonzero_lora_b(&params);
        let rng0 = params.dropout.rng_state();
        let keyed_step = |micro: Vec<Vec<usize>>, shards: usize, rng: u64, ckpt| {
            params.dropout.set_rng_state(rng);
            step_grads(&m, &params, &samples, &micro, shards, ckpt)
        };
        // Same dropout key for every variant.
        let step = |micro, shards, ckpt| keyed_step(micro, shards, rng0, ckpt);
        for training in [false, true] {
            params.set_training(training);
            let (l1, g1, n1) = step(vec![(0..6).collect()], 1, Checkpointing::Off);
            assert_eq!(g1.len(), params.vars.len());
            for (micro, shards, ckpt) in [
                (vec![(0..6).collect()], 1, Checkpointing::On),
                (
                    vec![vec![0, 1], vec![2, 3, 4], vec![5]],
                    1,
                    Checkpointing::Off,
                ),
                (
                    vec![vec![0, 1], vec![2, 3, 4], vec![5]],
                    1,
                    Checkpointing::On,
                ),
                (vec![(0..6).collect()], 2, Checkpointing::Off),
                (vec![(0..6).collect()], 4, Checkpointing::Off),
                (vec![(0..6).collect()], 3, Checkpointing::On),
                (vec![vec![0, 1, 2, 3], vec![4, 5]], 3, Checkpointing::Off),
                (vec![vec![0, 1, 2, 3], vec![4, 5]], 3, Checkpointing::On),
            ] {
                let what =
                    format!("{kind:?}, dropout {training}, {micro:?} in {shards} shards, {ckpt:?}");
                let (l2, g2, n2) = step(micro, shards, ckpt);
                assert_eq!(n1, n2, "{what}");
                assert!((l1 - l2).abs() < 1e-10, "{what}: loss {l1} vs {l2}");
                let worst = worst_relative_difference(&g1, &g2);
                assert!(worst < 1e-9, "{what}: worst relative difference {worst}");
            }
            if training {
                // Dropout is on: another key gives another loss.
                let (l3, ..) = keyed_step(vec![(0..6).collect()], 2, rng0 ^ 1, Checkpointing::On);
                assert!(
                    (l1 - l3).abs() > 1e-6,
                    "dropout masks had no effect: {l1} {l3}"
                );
            }
        }
    }
}

#[test]
fn text_only_samples_give_the_projector_a_zero_gradient() {
    let f = fixture(6, 1);
    let mut m = load(&f.model_dir, DType::F64);
    let t = task("mini-GQA");
    let mut samples = samples_of(&f, &m, &t);
    let n_img = m.model.config.image_seq_len();
    // Samples 3.. lose their image (like ScienceQA's text-only questions).
    for s in &mut samples[3..] {
        s.image = None;
        s.example
            .segments
            .retain(|seg| !matches!(seg, Segment::Image));
        s.positions = super::data::positions(&s.example, n_img);
    }
    let params =
        TrainableParams::attach(&mut m.model, &settings(AdapterKind::Lora, 4)).expect("attach");
    params.set_training(false);
    nonzero_lora_b(&params);
    let step = |micro: Vec<Vec<usize>>, shards: usize| {
        step_grads(&m, &params, &samples, &micro, shards, Checkpointing::On).1
    };
    let is_proj = |n: &str| n.starts_with("multi_modal_projector.");
    let norm = |t: &Tensor| {
        t.sqr()
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f64>())
            .expect("norm")
    };
    // Only text-only samples: every var has a gradient, the projector's is zero.
    let g = step(vec![vec![3, 4, 5]], 2);
    assert_eq!(g.len(), params.vars.len());
    for (name, grad) in &g {
        assert_eq!(norm(grad) == 0.0, is_proj(name), "{name}");
    }
    // Mixed: the image shard's projector gradient, whatever the split.
    let mixed = step(vec![(0..6).collect()], 1);
    assert!(mixed.iter().all(|(_, g)| norm(g) > 0.0));
    let split = step(vec![(0..6).collect()], 2);
    let worst = worst_relative_difference(&mixed, &split);
    assert!(worst < 1e-9, "worst relative difference {worst}");
}

struct StopAfter(usize, usize);
impl TrainProgress for StopAfter {
    fn step(&mut self, info: &StepInfo) {
        self.1 = info.step;
    }
    fn should_stop(&mut self) -> bool {
        self.1 >= self.0
    }
}

fn var_values(p: &TrainableParams) -> Vec<(String, Vec<f32>)> {
    p.vars
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("values"),
            )
        })
        .collect()
}

#[test]
fn an_interrupted_run_resumes_exactly() {
    // The fused CPU loop kernels on, as in release builds (debug builds default to the
    // composed ops): accumulation and bit-identical resume must hold for them.
    crate::ml::fused::set_loop_kernels_for_this_thread(Some(true));
    let f = fixture(12, 1);
    let t = task("mini-VizWiz");
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 2,
        grad_accum: 2,
        learning_rate: 5e-3,
        warmup_ratio: 0.2,
        seed: 1,
        ..TrainConfig::default()
    };
    let kind = AdapterKind::MoeLora { experts: 2 };
    let run = |stop: Option<usize>, ckpt: Option<&CheckpointPolicy>| {
        let mut m = load(&f.model_dir, DType::F32);
        let samples = samples_of(&f, &m, &t);
        let params = TrainableParams::attach(&mut m.model, &settings(kind, 4)).expect("attach");
        let report = match stop {
            Some(n) => train(
                &m.model,
                &params,
                &samples,
                &m.image,
                &cfg,
                ckpt,
                &mut StopAfter(n, 0),
            ),
            None => train(
                &m.model,
                &params,
                &samples,
                &m.image,
                &cfg,
                ckpt,
                &mut NoProgress,
            ),
        }
        .expect("train");
        (report, var_values(&params))
    };
    let (straight, want) = run(None, None);
    assert_eq!(straight.steps, 6);
    assert!(!straight.stopped_early);
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = CheckpointPolicy {
        dir: dir.path().join("ckpt"),
        every: 1,
    };
    let (first, _) = run(Some(4), Some(&policy));
    assert!(first.stopped_early);
    assert_eq!(first.steps, 4);
    let (second, got) = run(None, Some(&policy));
    assert_eq!(second.resumed_from, 4);
    assert_eq!(second.steps, 6);
    assert_eq!(second.losses, straight.losses, "same losses step by step");
    assert_eq!(got, want, "bit-identical parameters after resuming");
    // Only the newest checkpoint is kept, and a different run refuses it.
    let kept: Vec<String> = std::fs::read_dir(&policy.dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(kept, ["step-6"]);
    let mut m = load(&f.model_dir, DType::F32);
    let samples = samples_of(&f, &m, &t);
    let params = TrainableParams::attach(&mut m.model, &settings(kind, 4)).expect("attach");
    let other = TrainConfig {
        learning_rate: 1e-3,
        ..cfg.clone()
    };
    let err = train(
        &m.model,
        &params,
        &samples,
        &m.image,
        &other,
        Some(&policy),
        &mut NoProgress,
    )
    .expect_err("a different run");
    assert!(err.to_string().contains("different run"), "{err}");
}

/// Exact-match accuracy of greedy answers on a CoIN-mini test file (lower-cased, trimmed).
fn exact_match(f: &Fixture, m: &mut LoadedModel, t: &mini::MiniTask) -> f64 {
    let test = read_test_file(
        &f.data
            .join("Instructions_Original")
            .join(t.dir)
            .join(t.test_file),
    )
    .expect("test file");
    let mut right = 0;
    for chunk in test.chunks(16) {
        let reqs: Vec<GenerateRequest> = chunk
            .iter()
            .map(|r| {
                let rel = r.image.as_deref().expect("an image");
                let img = Rgb8::open(&f.data.join("cl_dataset").join(rel)).expect("image");
                GenerateRequest::question(&r.text, img)
            })
            .collect();
        let out = generate(
            m,
            None,
            &reqs,
            &GenerateSettings {
                max_new_tokens: 8,
                ..GenerateSettings::default()
            },
        )
        .expect("generate");
        for (r, o) in chunk.iter().zip(out) {
            if o.text.trim().to_lowercase()
                == r.answer.as_deref().unwrap_or("").trim().to_lowercase()
            {
                right += 1;
            }
        }
    }
    right as f64 / test.len() as f64
}

#[test]
fn a_hundred_steps_learn_a_coin_mini_task() {
    let f = fixture(400, 60);
    let t = task("mini-VizWiz");
    let mut m = load(&f.model_dir, DType::F32);
    let samples = samples_of(&f, &m, &t);
    let before = exact_match(&f, &mut m, &t);
    let params =
        TrainableParams::attach(&mut m.model, &settings(AdapterKind::Lora, 7)).expect("attach");
    let cfg = TrainConfig {
        epochs: 4,
        batch_size: 8,
        grad_accum: 1,
        learning_rate: 3e-3,
        warmup_ratio: 0.05,
        max_steps: Some(100),
        seed: 2,
        ..TrainConfig::default()
    };
    let report = train(
        &m.model,
        &params,
        &samples,
        &m.image,
        &cfg,
        None,
        &mut NoProgress,
    )
    .expect("train");
    assert_eq!(report.steps, 100);
    let (first, last) = report.loss_drop(10).expect("losses");
    let after = exact_match(&f, &mut m, &t);
    eprintln!(
        "mini-VizWiz: loss {first:.3} -> {last:.3}; exact match {:.1}% -> {:.1}% (chance {:.1}%), \
         {:.0} positions/s",
        before * 100.0,
        after * 100.0,
        t.chance * 100.0,
        report.tokens_per_s
    );
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(
        after >= t.chance + 0.35,
        "accuracy {after} is not far above chance {}",
        t.chance
    );
}
