//! `coin merge` end to end on the tiny model and CoIN-mini: two branches trained on different
//! tasks from one parent, merged into a checkpoint with both as git parents, evaluated on the
//! union of their tasks, whose adapter's update is exactly the weighted sum of theirs (TIES:
//! the factors are the TIES of theirs); the same
//! merge run again reuses it; fsck and log cope with it; training continues from it; every
//! incompatible input is refused before anything is written.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::Path;

use candle_core::{DType, Device};
use coin::ml::linear::Adapter;
use coin::ml::merge::delta_w;
use coin::ml::peft::PeftAdapter;
use serde_json::Value;

use crate::common::TestEnvironment;

const CONFIG: &str =
    "[train]\nnum_train_epochs = 1.0\nper_device_batch_size = 4\n\n[eval]\nmax_new_tokens = 4\nbatch_size = 4\n";

fn id_of(v: &Value) -> String {
    v["checkpoint"].as_str().unwrap().to_string()
}

fn show(env: &TestEnvironment, rev: &str) -> Value {
    env.coin(&["show", rev, "--json"]).success().json()
}

fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .unwrap()
}

/// Commit a folder holding only `adapter_config.json` (`config`) on the current branch.
fn commit_config(env: &TestEnvironment, name: &str, config: &str, base: &str) -> String {
    env.write(format!("{name}/adapter_config.json"), config);
    let out = env
        .coin(&[
            "commit",
            name,
            "--task",
            "mini-GQA",
            "--base-model",
            base,
            "--no-verify",
        ])
        .success();
    out.stdout.split_whitespace().next().unwrap().to_string()
}

#[test]
fn merge_two_branches_exactly_with_both_parents_and_the_union_of_tasks() {
    let env = TestEnvironment::tiny_and_mini(&[], 8, 4, CONFIG);
    let parent = id_of(
        &env.coin(&["train", "mini-VizWiz", "--json"])
            .success()
            .json(),
    );
    env.coin(&["switch", "-c", "left", &parent]).success();
    let a = id_of(&env.coin(&["train", "mini-GQA", "--json"]).success().json());
    env.coin(&["switch", "-c", "right", &parent]).success();
    let b = id_of(
        &env.coin(&["train", "mini-TextVQA", "--json"])
            .success()
            .json(),
    );

    // Wrong methods and weights are refused before anything is loaded.
    for (args, want) in [
        (vec!["--method", "slerp"], "unknown merge method"),
        (vec!["--density", "0.5"], "setting of --method ties"),
        (vec!["--method", "ties", "--density", "0"], "outside (0, 1]"),
        (vec!["--weights", "1,2,3"], "needs two"),
        (vec!["--weights", "nan,1"], "not a finite number"),
        (vec!["--weights", "x,1"], "is not a number"),
        (vec!["--weights", "1,-1"], "non-negative"),
    ] {
        let mut full = vec!["merge", a.as_str(), b.as_str()];
        full.extend(args);
        let e = env.coin(&full).code(1);
        assert!(e.stderr.contains(want), "{full:?}: {}", e.stderr);
    }
    assert_eq!(
        env.coin(&["log", "--json"])
            .success()
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let m = env.coin(&["merge", &a, &b, "--json"]).success().json();
    assert_eq!(m["reused"], false);
    assert_eq!(m["branch"], "right");
    assert_eq!(m["method"], "average");
    assert_eq!(m["weights"], serde_json::json!([0.5, 0.5]));
    let merged = id_of(&m);
    let tasks: Vec<&str> = m["evals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, ["mini-VizWiz", "mini-GQA", "mini-TextVQA"]);
    let s = show(&env, &merged);
    let parents: Vec<&str> = s["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(parents, [a.as_str(), b.as_str()], "{s}");
    let train = &s["train"];
    assert_eq!(train["kind"], "merge");
    assert_eq!(train["method"], "average");
    assert_eq!(train["inputs"], serde_json::json!([a, b]));
    assert_eq!(
        train["tasks"],
        serde_json::json!(["mini-VizWiz", "mini-GQA", "mini-TextVQA"])
    );
    for t in ["mini-VizWiz", "mini-GQA", "mini-TextVQA"] {
        assert!(s["eval"][t]["score"].is_number(), "{t}: {s}");
    }
    // The branch moved to it.
    assert_eq!(show(&env, "right")["id"], s["id"]);

    // Its update is the weighted sum of the inputs' updates.
    let load = |rev: &str| {
        let dir = env.path(format!("out-{}", &rev[..8]));
        env.coin(&["checkout", rev, "--output", dir.to_str().unwrap()])
            .success();
        PeftAdapter::load(Path::new(&dir), &Device::Cpu, DType::F32).unwrap()
    };
    let (pa, pb, pm) = (load(&a), load(&b), load(&merged));
    let ra = pa.rank().unwrap();
    assert_eq!(pm.rank(), Some(ra + pb.rank().unwrap()));
    assert_eq!(train["rank"], (ra + pb.rank().unwrap()) as u64);
    let lora = |p: &PeftAdapter, n: &str| match &p.layers[n] {
        Adapter::Lora(l) => delta_w(l).unwrap(),
        _ => panic!("LoRA expected"),
    };
    let mut worst = 0f32;
    for name in pa.layers.keys() {
        let want = ((lora(&pa, name) * 0.5).unwrap() + (lora(&pb, name) * 0.5).unwrap()).unwrap();
        let d = max_abs(&(lora(&pm, name) - &want).unwrap());
        worst = worst.max(d / max_abs(&want).max(1e-6));
    }
    assert!(worst < 1e-5, "relative ΔW difference {worst}");

    // The same merge again reuses the checkpoint.
    let again = env.coin(&["merge", &a, &b, "--json"]).success().json();
    assert_eq!(again["reused"], true);
    assert_eq!(id_of(&again), merged);
    // fsck is clean and log shows the merge.
    env.coin(&["fsck"]).success();
    let log = env.coin(&["log"]).success().stdout;
    assert!(log.contains(&merged[..8]), "{log}");
    assert!(log.contains("merge: average of"), "{log}");
    assert!(
        log.contains(&format!("merge of {} and {}", &a[..12], &b[..12])),
        "both parents, first first: {log}"
    );
    assert!(
        log.contains("mini-TextVQA 0.00") || log.contains("mini-TextVQA"),
        "{log}"
    );
    // An accuracy matrix has one row per trained task: a history with a merge is refused,
    // naming the merge; its scores cover every merged task.
    let e = env.coin(&["matrix", "--json"]).code(1);
    assert!(
        e.stderr.contains("holds the merge checkpoint") && e.stderr.contains(&merged[..12]),
        "{}",
        e.stderr
    );
    let shown = env.coin(&["show", &merged, "--json"]).success().json();
    for t in ["mini-VizWiz", "mini-GQA", "mini-TextVQA"] {
        assert!(shown["eval"][t]["score"].is_number(), "{t}: {shown}");
    }
    let logj = env.coin(&["log", "--json"]).success().json();
    assert!(logj.to_string().contains(&merged), "{logj}");

    // Other weights make another checkpoint (on another branch).
    env.coin(&["switch", "-c", "arith", &b]).success();
    let ta = env
        .coin(&[
            "merge",
            &a,
            &b,
            "--method",
            "task-arithmetic",
            "--eval-tasks",
            "none",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(ta["reused"], false);
    assert_ne!(id_of(&ta), merged);
    assert_eq!(ta["weights"], serde_json::json!([1.0, 1.0]));

    // TIES on the factors: rank kept, α = r, each merged factor the TIES of the inputs'
    // factors weighted √(w·s); method, weights and density recorded.
    env.coin(&["switch", "-c", "ties", &b]).success();
    let ti = env
        .coin(&[
            "merge",
            &a,
            &b,
            "--method",
            "ties",
            "--density",
            "0.5",
            "--weights",
            "1,0.5",
            "--eval-tasks",
            "none",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(ti["method"], "ties");
    assert_eq!(ti["density"], 0.5);
    let tid = id_of(&ti);
    let rec = &show(&env, &tid)["train"];
    assert_eq!(rec["method"], "ties");
    assert_eq!(rec["weights"], serde_json::json!([1.0, 0.5]));
    assert_eq!(rec["density"], 0.5);
    assert_eq!(rec["rank"], ra as u64);
    let pt = load(&tid);
    assert_eq!(pt.rank(), Some(ra));
    assert_eq!(pt.config.lora_alpha, Some(ra as f64));
    let factors = |p: &PeftAdapter, n: &str| match &p.layers[n] {
        Adapter::Lora(l) => (
            l.a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            l.b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            l.scale,
        ),
        _ => panic!("LoRA expected"),
    };
    for name in pa.layers.keys() {
        let (a1, b1, s1) = factors(&pa, name);
        let (a2, b2, s2) = factors(&pb, name);
        let (am, bm, sm) = factors(&pt, name);
        assert_eq!(sm, 1.0);
        let w = [(1.0 * s1).sqrt(), (0.5 * s2).sqrt()];
        let want_a = coin::ml::merge::ties(&[&a1, &a2], &w, 0.5);
        let want_b = coin::ml::merge::ties(&[&b1, &b2], &w, 0.5);
        for (got, want, x1, x2) in [(&am, &want_a, &a1, &a2), (&bm, &want_b, &b1, &b2)] {
            let d = got
                .iter()
                .zip(want.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-6, "{name}: {d}");
            // A merged entry is non-zero only where an input kept its entry (⌊0.5·n⌋ each).
            let (t1, t2) = (
                coin::ml::merge::trim_top(x1, 0.5),
                coin::ml::merge::trim_top(x2, 0.5),
            );
            assert_eq!(t1.iter().filter(|x| **x != 0.0).count(), x1.len() / 2);
            for (i, v) in got.iter().enumerate() {
                assert!(*v == 0.0 || t1[i] != 0.0 || t2[i] != 0.0, "{name}[{i}]");
            }
            assert!(got.iter().any(|v| *v != 0.0), "{name}");
        }
    }

    // Training continues from a merge and evaluates the merged tasks with the new one.
    env.coin(&["switch", "-c", "after", &merged]).success();
    // The merged adapter's rank and α come from the merge: no setting needed, the record says so.
    let next = env
        .coin(&["train", "mini-OCRVQA", "--json"])
        .success()
        .json();
    let shown = env
        .coin(&["show", next["checkpoint"].as_str().unwrap(), "--json"])
        .success()
        .json();
    let tc = &shown["train"]["config"]["train"];
    assert_eq!(tc["lora_r"].as_u64().unwrap() as usize, pm.rank().unwrap());
    assert_eq!(
        tc["lora_alpha"].as_f64().unwrap(),
        pm.config.lora_alpha.unwrap()
    );
    let tasks: Vec<&str> = next["evals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(
        tasks,
        ["mini-VizWiz", "mini-GQA", "mini-TextVQA", "mini-OCRVQA"]
    );

    // Incompatible inputs, each named with what differs.
    let base = s["train"]["config"]["model"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    env.coin(&["switch", "-c", "scratch", &parent]).success();
    let no_adapter = {
        env.write("plain/notes.txt", "no adapter here");
        let out = env
            .coin(&["commit", "plain", "--task", "mini-GQA", "--no-verify"])
            .success();
        out.stdout.split_whitespace().next().unwrap().to_string()
    };
    let other_base = commit_config(
        &env,
        "other-base",
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16}"#,
        "another-model",
    );
    let moe = commit_config(
        &env,
        "moe",
        r#"{"peft_type": "MOE_LORA_CoIN", "expert_num": 2, "r": 8, "lora_alpha": 16}"#,
        &base,
    );
    let targets = commit_config(
        &env,
        "targets",
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
        &base,
    );
    for (other, want) in [
        (&no_adapter, "has no adapter"),
        (&other_base, "different base models"),
        (&moe, "not supported yet for MoELoRA"),
        (&targets, "different target modules"),
    ] {
        let e = env.coin(&["merge", &a, other, "--no-verify"]).code(1);
        assert!(e.stderr.contains(want), "{want}: {}", e.stderr);
        assert!(
            e.stderr.contains(&other[..8]) || e.stderr.contains(&a[..8]),
            "{}",
            e.stderr
        );
    }
    let e = env.coin(&["merge", &a, &a]).code(1);
    assert!(
        e.stderr.contains("two different checkpoints"),
        "{}",
        e.stderr
    );
}
