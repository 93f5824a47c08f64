#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::history::CommitRequest;
use crate::tasks::mini;
use crate::workflow::config::{resolve, Layer};
use crate::workflow::matrix::tests::Fixture;

/// A PEFT LoRA for the tiny model on q_proj/v_proj of both layers, with non-zero B.
fn write_lora(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let r = 4usize;
    let mut state = 7u32;
    let mut values = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.8).to_le_bytes()
            })
            .collect()
    };
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for l in 0..2 {
        for (m, out) in [("q_proj", 64usize), ("v_proj", 32usize)] {
            let p = format!("base_model.model.model.language_model.layers.{l}.self_attn.{m}");
            tensors.insert(format!("{p}.lora_A.weight"), (vec![r, 64], values(r * 64)));
            tensors.insert(
                format!("{p}.lora_B.weight"),
                (vec![out, r], values(out * r)),
            );
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            let v =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("view");
            (k.clone(), v)
        })
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).expect("serialize"),
    )
    .expect("write");
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}"#,
    )
    .expect("write");
}

/// A repository with the tiny model, 4 test items per CoIN-mini task and one LoRA checkpoint.
fn setup() -> (Fixture, CheckpointId, RunConfig) {
    let f = Fixture::new();
    let root = f.dir.path().to_path_buf();
    crate::ml::tiny::write_tiny(&root.join("model"), &Default::default()).expect("tiny");
    let cfg = mini::MiniConfig {
        seed: 0,
        train: 2,
        test: 4,
        image_size: 32,
    };
    mini::generate(&root.join("mini"), &cfg, |_| {}).expect("mini");
    let mut reg = Registry::load(&f.repo.coin_dir().join("tasks")).expect("registry");
    for def in mini::task_defs("mini") {
        reg.add(def, true).expect("add");
    }
    write_lora(&root.join("lora"));
    let id = f
        .repo
        .commit(&CommitRequest {
            paths: vec![root.join("lora")],
            task: "mini-VQAv2".into(),
            ..CommitRequest::default()
        })
        .expect("commit")
        .id;
    let cfg = resolve(
        &[
            Layer::from_set("model.base=model").expect("set"),
            Layer::from_set("eval.max_new_tokens=4").expect("set"),
            Layer::from_set("eval.batch_size=3").expect("set"),
        ],
        Some("tiny"),
    )
    .expect("config");
    (f, id, cfg)
}

fn predictions(e: &TaskEval) -> Value {
    e.record.extra["predictions"].clone()
}

#[test]
fn in_memory_eval_equals_loading_eval() {
    let (f, id, cfg) = setup();
    let tasks = vec!["mini-VQAv2".to_string()];
    let force = EvalOptions {
        mode: None,
        force: true,
    };
    let loaded_run = evaluate(&f.repo, id, &tasks, &cfg, &force, &mut NoProgress).expect("eval");
    assert_eq!(loaded_run.len(), 1);
    assert_eq!(loaded_run[0].status, TaskStatus::Generated);
    assert_eq!(loaded_run[0].record.n, 4);

    let mut model = load_base_model(f.repo.root(), &cfg).expect("model");
    let cp = f.repo.read_checkpoint(id).expect("checkpoint");
    let adapter = load_checkpoint_adapter(&f.repo, &cp, &model.model.device, model.model.dtype)
        .expect("adapter");
    assert!(matches!(adapter, CheckpointAdapter::Adapter(_)));
    let given = evaluate_loaded(
        &f.repo,
        id,
        &tasks,
        &cfg,
        &force,
        InMemoryModel {
            model: &mut model,
            adapter: Some(&adapter),
        },
        &mut NoProgress,
    )
    .expect("eval in memory");
    assert_eq!(predictions(&given[0]), predictions(&loaded_run[0]));
    assert_eq!(given[0].record.score, loaded_run[0].record.score);
    assert!(
        model
            .model
            .linears_mut()
            .iter()
            .all(|(_, l)| l.adapter.is_none()),
        "the adapter is removed after the eval"
    );

    // Adapter already attached (the trainer's case): the model runs as it is.
    adapter.attach(&mut model.model).expect("attach");
    let attached = evaluate_loaded(
        &f.repo,
        id,
        &tasks,
        &cfg,
        &force,
        InMemoryModel {
            model: &mut model,
            adapter: None,
        },
        &mut NoProgress,
    )
    .expect("eval attached");
    assert_eq!(predictions(&attached[0]), predictions(&loaded_run[0]));
    assert!(model
        .model
        .linears_mut()
        .iter()
        .any(|(_, l)| l.adapter.is_some()));

    // Cached now, without touching the model.
    let cached = evaluate(
        &f.repo,
        id,
        &tasks,
        &cfg,
        &EvalOptions::default(),
        &mut NoProgress,
    )
    .expect("cached");
    assert_eq!(cached[0].status, TaskStatus::Cached);
}

#[test]
fn keys_follow_their_inputs() {
    let (f, id, cfg) = setup();
    let cp = f.repo.read_checkpoint(id).expect("checkpoint");
    let tasks = vec!["mini-VQAv2".to_string(), "mini-GQA".to_string()];
    let opts = EvalOptions::default();
    let base = plan(&f.repo, &cp, &tasks, &cfg, &opts, true).expect("plan");
    assert_eq!(base.len(), 2);
    assert_ne!(
        base[0].generation_key, base[1].generation_key,
        "eval sets differ"
    );
    let mut longer = cfg.clone();
    longer.eval.max_new_tokens = 5;
    let l = plan(&f.repo, &cp, &tasks, &longer, &opts, true).expect("plan");
    assert_ne!(l[0].generation_key, base[0].generation_key);
    let strict = EvalOptions {
        mode: Some(ScoreMode::Compat),
        force: false,
    };
    let s = plan(&f.repo, &cp, &tasks, &cfg, &strict, true).expect("plan");
    assert_eq!(s[0].generation_key, base[0].generation_key);
    assert_ne!(s[0].cache_key, base[0].cache_key);
    // The same plan twice gives the same keys.
    let again = plan(&f.repo, &cp, &tasks, &cfg, &opts, true).expect("plan");
    assert_eq!(again[0].cache_key, base[0].cache_key);
    // Unknown tasks and missing images are refused before any model work; an answer file
    // needs no images.
    let unknown = plan(&f.repo, &cp, &["nope".to_string()], &cfg, &opts, true);
    let msg = unknown.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("registered tasks") && msg.contains("mini-GQA"),
        "{msg}"
    );
    std::fs::remove_file(
        f.dir
            .path()
            .join("mini/cl_dataset/COCO2014/train2014/vqav2-test-00001.png"),
    )
    .expect("remove an image");
    let missing = plan(&f.repo, &cp, &tasks, &cfg, &opts, true);
    let msg = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("vqav2-test-00001.png"), "{msg}");
    assert!(plan(&f.repo, &cp, &tasks, &cfg, &opts, false).is_ok());
}
