//! `coin eval` (generate + score, cache, --force, --answers, --rescore), `coin matrix`
//! (--json, --csv into `coin metrics`, --format paper, --plot) and `coin compare`, end to end
//! on the tiny model and CoIN-mini.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;

use serde_json::Value;

use crate::common::TestEnvironment;

/// A PEFT LoRA adapter for the tiny model (width 64, 2 layers, 4 query / 2 KV heads of 16):
/// q_proj and v_proj of both layers, rank 4, non-zero B so that it changes the output.
fn write_adapter(dir: &Path, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let r = 4usize;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let mut values = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.8;
                v.to_le_bytes()
            })
            .collect()
    };
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
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM"
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}

/// A repository with the tiny model, CoIN-mini (4 train / 5 test items per task) registered
/// and `model.base` configured.
fn setup() -> TestEnvironment {
    TestEnvironment::tiny_and_mini(
        &["--seed", "1"],
        4,
        5,
        "[eval]\nmax_new_tokens = 6\nbatch_size = 3\n",
    )
}

fn records(env: &TestEnvironment, rev: &str) -> Value {
    env.coin(&["show", rev, "--json"]).success().json()["eval"].clone()
}

fn statuses(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn eval_generates_caches_forces_and_rescores() {
    let env = setup();
    write_adapter(&env.path("ad1"), 1);
    env.coin(&[
        "commit",
        "ad1",
        "--task",
        "mini-VQAv2",
        "--base-model",
        "coin-tiny",
    ])
    .success();

    // Errors come before any model is loaded.
    let e = env.coin(&["eval", "--tasks", "mini-Nothing"]).code(1);
    assert!(
        e.stderr.contains("unknown task 'mini-Nothing'") && e.stderr.contains("mini-VQAv2"),
        "{}",
        e.stderr
    );
    let e = env.coin(&["eval", "--set", "eval.bogus=1"]).code(1);
    assert!(
        e.stderr.contains("eval.bogus") && e.stderr.contains("eval.max_new_tokens"),
        "{}",
        e.stderr
    );
    let e = env.coin(&["eval", "--set", "model.base=nowhere"]).code(1);
    assert!(e.stderr.contains("nowhere"), "{}", e.stderr);
    let e = env
        .coin(&["eval", "--set", "model.name=llava-v1.5-13b"])
        .code(1);
    assert!(
        e.stderr.contains("'coin-tiny'") && e.stderr.contains("llava-v1.5-13b"),
        "{}",
        e.stderr
    );

    // Default tasks: those trained on the history (mini-VQAv2); plus one more by name.
    let first = env
        .coin(&["eval", "--tasks", "mini-VQAv2,mini-ImageNet", "--json"])
        .success();
    let j = first.json();
    assert_eq!(statuses(&j), ["generated", "generated"]);
    let recs = records(&env, "HEAD");
    for task in ["mini-VQAv2", "mini-ImageNet"] {
        let r = &recs[task];
        assert_eq!(r["n"], 5, "{r}");
        assert_eq!(r["source"], "note");
        assert_eq!(r["mode"], "strict", "CoIN-mini tasks default to strict");
        assert_eq!(r["decoding"]["max_new_tokens"], 6);
        assert_eq!(r["eval_set"]["items"], 5);
        for key in ["predictions", "cache_key", "generation_key"] {
            assert!(r[key].is_string(), "{key} missing in {r}");
        }
    }
    // The predictions blob is a store object that fsck verifies and gc keeps.
    env.coin(&["gc"]).success();
    env.coin(&["fsck"]).success();
    let pred = recs["mini-VQAv2"]["predictions"]
        .as_str()
        .unwrap()
        .to_string();

    // Same key: nothing is generated again.
    let again = env
        .coin(&["eval", "--tasks", "mini-VQAv2,mini-ImageNet"])
        .success();
    assert!(
        again.stderr.contains("no model is loaded"),
        "{}",
        again.stderr
    );
    assert!(
        again.stderr.contains("mini-VQAv2: cached"),
        "{}",
        again.stderr
    );
    assert_eq!(records(&env, "HEAD"), recs);

    // --force generates again: greedy decoding gives the same predictions blob.
    let forced = env.coin(&["eval", "--force", "--json"]).success().json();
    assert_eq!(statuses(&forced), ["generated"]);
    assert_eq!(forced[0]["task"], "mini-VQAv2");
    assert_eq!(forced[0]["record"]["predictions"], pred.as_str());

    // Another decoding setting is another key.
    let longer = env
        .coin(&["eval", "--set", "eval.max_new_tokens=7", "--json"])
        .success()
        .json();
    assert_eq!(statuses(&longer), ["generated"]);

    // Another mode re-scores the stored predictions without a model.
    let compat = env
        .coin(&[
            "eval",
            "--mode",
            "compat",
            "--json",
            "--set",
            "eval.max_new_tokens=7",
        ])
        .success();
    assert_eq!(statuses(&compat.json()), ["rescored"]);
    assert!(
        compat.stderr.contains("no model is loaded"),
        "{}",
        compat.stderr
    );
    assert_eq!(records(&env, "HEAD")["mini-VQAv2"]["mode"], "compat");
    let back = env
        .coin(&[
            "eval",
            "--rescore",
            "--mode",
            "strict",
            "--tasks",
            "mini-VQAv2",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(statuses(&back), ["rescored"]);
    assert_eq!(back[0]["record"]["mode"], "strict");
    assert_eq!(
        back[0]["record"]["score"], longer[0]["record"]["score"],
        "re-scoring the stored predictions in the same mode gives the same score"
    );
    assert_eq!(
        back[0]["record"]["cache_key"],
        longer[0]["record"]["cache_key"]
    );

    // An answer file: perfect answers score 100.
    let test: Value = serde_json::from_str(
        &std::fs::read_to_string(env.path("mini/Instructions_Original/VQAv2/val.json")).unwrap(),
    )
    .unwrap();
    let mut lines = String::new();
    for q in test.as_array().unwrap() {
        lines.push_str(
            &serde_json::json!({"question_id": q["question_id"], "text": q["answer"]}).to_string(),
        );
        lines.push('\n');
    }
    env.write("answers.jsonl", &lines);
    let scored = env
        .coin(&[
            "eval",
            "--answers",
            "answers.jsonl",
            "--task",
            "vqav2-mini",
            "--json",
        ])
        .code(1);
    assert!(scored.stderr.contains("unknown task"), "{}", scored.stderr);
    let scored = env
        .coin(&[
            "eval",
            "--answers",
            "answers.jsonl",
            "--task",
            "mini-VQAv2",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(statuses(&scored), ["scored-file"]);
    let r = &records(&env, "HEAD")["mini-VQAv2"];
    assert_eq!(r["score"], 100.0);
    assert_eq!(r["source"], "note");
    // An answer file whose ids mix strings and numbers gets coin score's warning, naming it.
    let first = &test.as_array().unwrap()[0]["question_id"];
    let other = if first.is_string() {
        serde_json::json!(999_999)
    } else {
        serde_json::json!("999999")
    };
    env.write(
        "mixed.jsonl",
        format!(
            "{lines}{}\n",
            serde_json::json!({"question_id": other, "text": "x"})
        ),
    );
    let mixed = env
        .coin(&["eval", "--answers", "mixed.jsonl", "--task", "mini-VQAv2"])
        .code(1);
    assert!(
        mixed
            .stderr
            .contains("mixed.jsonl' mixes question ids written as strings"),
        "{}",
        mixed.stderr
    );
    // The old --record path still works.
    env.write(
        "results.json",
        r#"{"mini-GQA": {"metric": "accuracy", "score": 42.5, "n": 3}}"#,
    );
    env.coin(&["eval", "HEAD", "--record", "results.json"])
        .success();
    assert_eq!(records(&env, "HEAD")["mini-GQA"]["score"], 42.5);
}

#[test]
fn matrix_and_compare_from_eval_records() {
    let env = setup();
    write_adapter(&env.path("ad1"), 1);
    write_adapter(&env.path("ad2"), 2);
    write_adapter(&env.path("ad3"), 3);
    env.coin(&["commit", "ad1", "--task", "mini-VQAv2"])
        .success();
    env.coin(&["eval", "--tasks", "mini-VQAv2,mini-ImageNet"])
        .success();
    env.coin(&["branch", "alt"]).success();
    env.coin(&["commit", "ad2", "--task", "mini-ImageNet"])
        .success();
    let evals = env.coin(&["eval", "--json"]).success().json();
    assert_eq!(
        statuses(&evals),
        ["generated", "generated"],
        "default tasks: both trained tasks"
    );

    let m = env.coin(&["matrix", "--json"]).success().json();
    assert_eq!(
        m["tasks"],
        serde_json::json!(["mini-VQAv2", "mini-ImageNet"])
    );
    let head = records(&env, "HEAD");
    let prev = records(&env, "HEAD~1");
    assert_eq!(m["matrix"][0][0], prev["mini-VQAv2"]["score"]);
    assert_eq!(m["matrix"][0][1], prev["mini-ImageNet"]["score"]);
    assert_eq!(m["matrix"][1][0], head["mini-VQAv2"]["score"]);
    assert_eq!(m["matrix"][1][1], head["mini-ImageNet"]["score"]);
    assert_eq!(m["checkpoints"].as_array().unwrap().len(), 2);
    for key in [
        "mft",
        "mfn",
        "maa",
        "bwt",
        "fwt",
        "forgetting",
        "forgetting_per_task",
    ] {
        assert!(m["metrics"].get(key).is_some(), "metrics lacks {key}");
    }

    // CSV piped into `coin metrics -` gives the same metrics.
    let csv = env.coin(&["matrix", "--csv"]).success().stdout;
    let mut child = env
        .coin_cmd(&env.work())
        .args(["metrics", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(csv.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let metrics: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["mft", "mfn", "maa", "bwt", "forgetting"] {
        assert_eq!(metrics["metrics"][key], m["metrics"][key], "{key}");
    }
    assert_eq!(metrics["matrix"], m["matrix"]);

    let table = env.coin(&["matrix"]).success().stdout;
    assert!(
        table.contains("1 mini-VQAv2") && table.contains("MFN"),
        "{table}"
    );
    let paper = env.coin(&["matrix", "--format", "paper"]).success().stdout;
    assert_eq!(paper.lines().count(), 2, "{paper}");
    env.coin(&["matrix", "--plot", "m.svg", "--json"]).success();
    env.coin(&["matrix", "--plot", "m.png"]).success();
    let svg = std::fs::read_to_string(env.path("m.svg")).unwrap();
    assert!(svg.contains("mini-ImageNet"));
    assert!(std::fs::read(env.path("m.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));

    // Another order from the shared first step.
    env.coin(&["switch", "alt"]).success();
    env.coin(&["commit", "ad3", "--task", "mini-GQA"]).success();
    env.coin(&["eval", "--mode", "strict"]).success();
    let c = env
        .coin(&["compare", "main", "alt", "--json"])
        .success()
        .json();
    assert_eq!(
        c["shared"][0]["shared_tasks"],
        serde_json::json!(["mini-VQAv2"])
    );
    assert_eq!(c["shared"][0]["shared_checkpoints"], 1);
    assert_eq!(
        c["branches"][1]["tasks"],
        serde_json::json!(["mini-VQAv2", "mini-GQA", "mini-ImageNet"])
    );
    let text = env.coin(&["compare", "main", "alt"]).success().stdout;
    assert!(text.contains("mini-VQAv2 → mini-GQA"), "{text}");
    assert!(text.contains("share 1 checkpoint(s)"), "{text}");
}

/// `coin compare` over branches made of records with known seconds (written through the
/// library, as `coin train` and `coin eval` write them): the wall time of each branch is the
/// sum of its history's train and eval seconds (shared checkpoints counted for every branch),
/// the ratio is to the first branch, untimed steps and evals are counted and named, the method
/// comes from `config.train`, and `--plot` writes a valid SVG and PNG.
#[test]
fn compare_wall_time_methods_and_plot() {
    use coin::history::{CoinRepo, CommitRequest, EvalRecord};
    use serde_json::json;

    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    let repo = CoinRepo::open(&env.work()).unwrap();
    let mut n = 0;
    let mut commit = |task: &str, train: Value, evals: &[(&str, f64, Value)]| {
        n += 1;
        let file = env.write(format!("w{n}/weights.bin"), format!("weights {n}"));
        let req = CommitRequest {
            paths: vec![file],
            task: task.to_string(),
            evals: evals
                .iter()
                .map(|(t, score, extra)| {
                    let extra = extra.as_object().cloned().unwrap_or_default();
                    let rec = EvalRecord {
                        metric: "accuracy".into(),
                        score: *score,
                        n: 10,
                        extra: extra.into_iter().collect(),
                    };
                    (t.to_string(), rec)
                })
                .collect(),
            train_extra: train.as_object().unwrap().clone().into_iter().collect(),
            skip_hooks: true,
            ..CommitRequest::default()
        };
        repo.commit(&req).unwrap().id
    };
    let secs = |s: f64| json!({ "seconds": s });
    let lora = |strategy: Option<&str>| {
        let mut train = json!({ "method": "lora" });
        if let Some(s) = strategy {
            train["strategy"] = json!(s);
        }
        json!({ "train": train })
    };
    // main: zero-shot (evals 1 + 1 s), A (train 10 s, eval 2 s), B (train 20 s, evals 2 + 2 s).
    let base = commit(
        "base",
        json!({ "kind": "base" }),
        &[("A", 10.0, secs(1.0)), ("B", 20.0, secs(1.0))],
    );
    let step_a = commit(
        "A",
        json!({ "config": lora(None), "result": { "seconds": 10.0 } }),
        &[("A", 80.0, secs(2.0))],
    );
    commit(
        "B",
        json!({ "config": lora(None), "result": { "seconds": 20.0 } }),
        &[("A", 60.0, secs(2.0)), ("B", 90.0, secs(2.0))],
    );
    // replay: from the zero-shot row; coin's trainer (15 s), then an external trainer (30 s)
    // and an external evaluator (4 + 4 s).
    repo.create_branch("replay", base).unwrap();
    repo.switch("replay", false).unwrap();
    commit(
        "A",
        json!({ "config": lora(Some("replay")), "result": { "seconds": 15.0 } }),
        &[("A", 82.0, secs(3.0))],
    );
    commit(
        "B",
        json!({ "config": lora(Some("replay")), "external": { "seconds": 30.0 } }),
        &[
            ("A", 75.0, json!({ "evaluator": { "seconds": 4.0 } })),
            ("B", 88.0, json!({ "evaluator": { "seconds": 4.0 } })),
        ],
    );
    // imported: main's A, then a step without timing or configuration (as `coin commit`).
    repo.create_branch("imported", step_a).unwrap();
    repo.switch("imported", false).unwrap();
    commit(
        "C",
        json!({}),
        &[("A", 50.0, json!({})), ("C", 70.0, json!({}))],
    );

    let c = env
        .coin(&["compare", "main", "replay", "imported", "--json"])
        .success()
        .json();
    let b = &c["branches"];
    // main: 10 + 20 train, 1 + 1 + 2 + 2 + 2 eval.
    assert_eq!(b[0]["wall"]["train_seconds"], 30.0);
    assert_eq!(b[0]["wall"]["eval_seconds"], 8.0);
    assert_eq!(b[0]["wall"]["seconds"], 38.0);
    assert_eq!(b[0]["wall"]["ratio_to_first"], 1.0);
    assert_eq!(b[0]["method"], "lora");
    assert_eq!(b[0]["strategies"], json!(["sequential"]));
    // replay: 15 + 30 train, 1 + 1 (shared zero-shot) + 3 + 4 + 4 eval = 58 = 38 × 1.526.
    assert_eq!(b[1]["wall"]["train_seconds"], 45.0);
    assert_eq!(b[1]["wall"]["eval_seconds"], 13.0);
    let ratio = b[1]["wall"]["ratio_to_first"].as_f64().unwrap();
    assert!((ratio - 58.0 / 38.0).abs() < 1e-12, "{ratio}");
    assert_eq!(b[1]["method"], "lora+replay");
    assert_eq!(b[1]["train_methods"], json!(["lora"]));
    assert_eq!(b[1]["wall"]["untimed_steps"], 0);
    // imported: main's zero-shot and A counted again (10 s train, 1 + 1 + 2 s eval); C untimed.
    assert_eq!(b[2]["wall"]["seconds"], 14.0);
    assert_eq!(b[2]["wall"]["steps"], 2);
    assert_eq!(b[2]["wall"]["untimed_steps"], 1);
    assert_eq!(b[2]["wall"]["evals"], 5);
    assert_eq!(b[2]["wall"]["untimed_evals"], 2);
    for key in ["mft", "mfn", "maa", "bwt", "forgetting"] {
        assert!(b[1]["metrics"].get(key).is_some(), "{key}");
    }

    let text = env
        .coin(&["compare", "main", "replay", "imported"])
        .success()
        .stdout;
    assert!(text.contains("× main"), "{text}");
    let replay_row = text
        .lines()
        .find(|l| l.starts_with("replay") && l.contains("lora+replay"))
        .unwrap_or_else(|| panic!("{text}"));
    for cell in ["45.0", "13.0", "58.0", "1.53"] {
        assert!(replay_row.contains(cell), "{cell}: {replay_row}");
    }
    let imported_row = text
        .lines()
        .find(|l| l.starts_with("imported") && l.contains("steps"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        imported_row.contains("1/2 steps, 2/5 evals"),
        "{imported_row}"
    );
    assert!(imported_row.contains("0.37"), "{imported_row}");
    assert!(text.contains("count 0 s"), "{text}");
    assert!(text.contains("imported  lora"), "{text}");
    let main_row = text
        .lines()
        .find(|l| l.starts_with("main ") && l.contains("1.00"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        main_row.contains("38.0") && main_row.ends_with('—'),
        "{main_row}"
    );

    // The plot: one figure, SVG and PNG.
    env.coin(&[
        "compare", "main", "replay", "imported", "--plot", "cmp.svg", "--json",
    ])
    .success();
    let svg = std::fs::read_to_string(env.path("cmp.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for needle in [
        "replay (lora+replay)",
        "MAA",
        "wall time as a multiple of main",
        "mean forgetting",
    ] {
        assert!(svg.contains(needle), "missing {needle}");
    }
    let out = env
        .coin(&["compare", "main", "replay", "--plot", "cmp.png"])
        .success();
    assert!(out.stderr.contains("cmp.png"), "{}", out.stderr);
    let img = image::open(env.path("cmp.png")).unwrap().to_rgb8();
    assert!(img.width() >= 760 && img.height() > 600);
    // Both branches' colours (Tableau blue and orange) are drawn.
    let has = |rgb: [u8; 3]| img.pixels().any(|p| p.0 == rgb);
    assert!(has([31, 119, 180]) && has([255, 127, 14]));
    let e = env.coin(&["compare", "main", "--plot", "cmp.jpg"]).code(1);
    assert!(e.stderr.contains(".svg or .png"), "{}", e.stderr);
}
