//! `coin train` and `coin run` end to end on the tiny model and CoIN-mini: a checkpoint per
//! task with the resolved config and training key in its train record, chaining (task 2 starts
//! from task 1's adapter), evals attached, reuse of identical steps by a second order, resuming
//! an interrupted order, MoELoRA, and the errors that must come before any training.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use serde_json::Value;

use crate::common::TestEnvironment;

fn setup() -> TestEnvironment {
    TestEnvironment::tiny_and_mini(&[], 12, 4, TRAIN_CONFIG)
}

/// The settings of the workflow tests: one epoch, batch 4, short answers.
pub const TRAIN_CONFIG: &str =
    "[train]\nnum_train_epochs = 1.0\nper_device_batch_size = 4\n\n[eval]\nmax_new_tokens = 4\nbatch_size = 4\n";

fn show(env: &TestEnvironment, rev: &str) -> Value {
    env.coin(&["show", rev, "--json"]).success().json()
}

#[test]
fn train_commits_chains_evaluates_and_reuses() {
    let env = setup();
    // Errors first, before anything is loaded or trained.
    let e = env.coin(&["train", "mini-Nothing"]).code(1);
    assert!(
        e.stderr.contains("unknown task 'mini-Nothing'"),
        "{}",
        e.stderr
    );
    let e = env
        .coin(&["train", "mini-VizWiz", "--set", "train.lr_scheduler=sine"])
        .code(1);
    assert!(e.stderr.contains("lr_scheduler"), "{}", e.stderr);

    let t1 = env
        .coin(&["train", "mini-VizWiz", "--json"])
        .success()
        .json();
    assert_eq!(t1["reused"], false);
    assert_eq!(t1["report"]["steps"], 3, "12 samples / batch 4, one epoch");
    let id1 = t1["checkpoint"].as_str().unwrap().to_string();
    let s1 = show(&env, &id1);
    let train = &s1["train"];
    assert_eq!(train["task"], "mini-VizWiz");
    assert_eq!(train["config"]["train"]["per_device_batch_size"], 4);
    assert_eq!(train["training_key"], t1["training_key"]);
    assert_eq!(train["data"]["items"], 12);
    assert!(s1["eval"]["mini-VizWiz"]["score"].is_number(), "{s1}");
    let files: Vec<&str> = s1["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"adapter_config.json")
            && files.contains(&"adapter_model.safetensors")
            && files.contains(&"non_lora_trainables.safetensors"),
        "{files:?}"
    );

    // Task 2 continues task 1's adapter and is evaluated on both tasks.
    let t2 = env.coin(&["train", "mini-GQA", "--json"]).success().json();
    let id2 = t2["checkpoint"].as_str().unwrap().to_string();
    let s2 = show(&env, &id2);
    assert_eq!(s2["parents"][0].as_str().unwrap(), id1, "{s2}");
    let evals: Vec<&str> = t2["evals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(evals, ["mini-VizWiz", "mini-GQA"]);
    // The adapter changed (trained further), the files differ from task 1's.
    let d = env.coin(&["diff", &id1, &id2, "--json"]).success().json();
    assert!(d.to_string().contains("adapter_model.safetensors"), "{d}");

    // Another order sharing the first step reuses it: same checkpoint id, no training.
    let run = env
        .coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-VQAv2",
            "--branch",
            "alt",
            "--json",
        ])
        .success();
    let r = run.json();
    assert_eq!(r["steps"][0]["reused"], true, "{}", run.stderr);
    assert_eq!(r["steps"][0]["checkpoint"].as_str().unwrap(), id1);
    assert_eq!(r["steps"][1]["reused"], false);
    assert!(run.stderr.contains("Reusing checkpoint"), "{}", run.stderr);
    assert_eq!(r["matrix"]["tasks"][1], "mini-VQAv2");
    assert_eq!(r["matrix"]["matrix"].as_array().unwrap().len(), 2);

    // Running the same order again does nothing new.
    let again = env
        .coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-VQAv2",
            "--branch",
            "alt",
            "--json",
        ])
        .success();
    assert_eq!(again.json()["steps"].as_array().unwrap().len(), 0);
    assert!(
        again.stderr.contains("2 of 2 steps were already on alt"),
        "{}",
        again.stderr
    );

    // An order that is not a continuation of the branch is refused.
    let e = env
        .coin(&["run", "--order", "mini-GQA,mini-VizWiz", "--branch", "alt"])
        .code(1);
    assert!(
        e.stderr.contains("not a start of the order"),
        "{}",
        e.stderr
    );

    env.coin(&["fsck"]).success();
}

#[test]
fn moelora_run_with_zero_shot_row_and_resume_after_a_partial_order() {
    let env = setup();
    // A first run of only the first task, then the full order: it continues.
    env.coin(&[
        "run",
        "--order",
        "mini-VQAv2",
        "--branch",
        "moe",
        "--method",
        "moelora",
        "--zero-shot",
    ])
    .success();
    let r = env
        .coin(&[
            "run",
            "--order",
            "mini-VQAv2,mini-ImageNet",
            "--method",
            "moelora",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(r["branch"], "moe");
    assert_eq!(r["steps"].as_array().unwrap().len(), 1);
    let tip = r["steps"][0]["checkpoint"].as_str().unwrap().to_string();
    let s = show(&env, &tip);
    assert_eq!(s["adapter"]["kind"], "moe_lora_coin", "{s}");
    assert_eq!(s["train"]["config"]["train"]["method"], "moelora");
    let m = env.coin(&["matrix", "moe", "--json"]).success().json();
    // The zero-shot row exists (FWT needs the upper triangle too, so it may stay null).
    assert!(m.to_string().contains("zero"), "{m}");
    assert_eq!(m["tasks"].as_array().unwrap().len(), 2);
}

#[test]
fn the_pre_checkpoint_gate_sees_the_new_scores_and_can_veto_a_trained_checkpoint() {
    let env = setup();
    let first = env
        .coin(&["train", "mini-VizWiz", "--json"])
        .success()
        .json();
    let head = first["checkpoint"].as_str().unwrap().to_string();
    // A gate that records what it sees (the new checkpoint's eval records) and refuses.
    let hook = env.write(
        ".coin/hooks/pre-checkpoint",
        "#!/bin/sh\n\"$COIN_EXE\" show \"$COIN_CHECKPOINT\" --json > seen.json\necho \"no: $COIN_TASK\"\nexit 1\n",
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let e = env.coin(&["train", "mini-GQA"]).code(1);
    assert!(e.stderr.contains("no: mini-GQA"), "{}", e.stderr);
    let seen: Value =
        serde_json::from_str(&std::fs::read_to_string(env.path("seen.json")).unwrap()).unwrap();
    assert!(seen["eval"]["mini-GQA"]["score"].is_number(), "{seen}");
    assert!(seen["eval"]["mini-VizWiz"]["score"].is_number(), "{seen}");
    // The branch did not move.
    let now = show(&env, "HEAD");
    assert_eq!(now["id"].as_str().unwrap(), head);
    // Running it again reuses the vetoed checkpoint (same training key) but not past the gate.
    let e = env.coin(&["train", "mini-GQA"]).code(1);
    assert!(
        e.stderr.contains("Reusing checkpoint") && e.stderr.contains("no: mini-GQA"),
        "{}",
        e.stderr
    );
    assert_eq!(show(&env, "HEAD")["id"].as_str().unwrap(), head);
    // --no-verify skips the gate; post-train runs after the checkpoint is published.
    let post = env.write(
        ".coin/hooks/post-train",
        "#!/bin/sh\necho \"$COIN_TASK $COIN_CHECKPOINT\" > post-train.txt\n",
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&post, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let t = env
        .coin(&["train", "mini-GQA", "--no-verify", "--json"])
        .success()
        .json();
    assert_eq!(t["reused"], true);
    assert_eq!(show(&env, "HEAD")["id"], t["checkpoint"]);
    // A step that trains (not reused) runs post-train after publishing.
    let t = env
        .coin(&["train", "mini-VQAv2", "--no-verify", "--json"])
        .success()
        .json();
    assert_eq!(t["reused"], false);
    let seen = std::fs::read_to_string(env.path("post-train.txt")).unwrap();
    assert_eq!(
        seen.trim(),
        format!("mini-VQAv2 {}", t["checkpoint"].as_str().unwrap())
    );
}

#[test]
fn eval_task_choices_and_the_full_grid() {
    let env = setup();
    let t = env
        .coin(&["train", "mini-VizWiz", "--eval-tasks", "none", "--json"])
        .success()
        .json();
    assert_eq!(t["evals"].as_array().unwrap().len(), 0);
    let t = env
        .coin(&[
            "train",
            "mini-GQA",
            "--eval-tasks",
            "mini-VQAv2,mini-GQA",
            "--json",
        ])
        .success()
        .json();
    let tasks: Vec<&str> = t["evals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, ["mini-VQAv2", "mini-GQA"]);
    // --full-grid: the first step is also evaluated on the later task (upper triangle).
    let r = env
        .coin(&[
            "run",
            "--order",
            "mini-VQAv2,mini-ImageNet",
            "--branch",
            "grid",
            "--full-grid",
            "--json",
        ])
        .success()
        .json();
    let m = &r["matrix"]["matrix"];
    assert!(m[0][1].is_number(), "upper-triangle cell missing: {m}");
    assert!(m[1][0].is_number() && m[1][1].is_number(), "{m}");
}

#[test]
fn a_killed_train_leaves_no_checkpoint_and_resumes_to_the_same_weights() {
    // Uninterrupted reference in one repository, killed-and-resumed in another.
    let a = setup();
    let want = a.coin(&["train", "mini-OCRVQA", "--json"]).success().json();
    let b = setup();
    let mut cmd = b.coin_cmd(&b.work());
    cmd.args(["train", "mini-OCRVQA"])
        .env("COIN_FAULT", "train.after_checkpoint:2");
    let killed = crate::common::run(&mut cmd);
    assert_ne!(killed.code, 0, "the fault point aborts the process");
    let e = b.coin(&["log"]);
    assert!(
        !e.stdout.contains("mini-OCRVQA"),
        "no checkpoint after a kill: {}",
        e.stdout
    );
    let resumed = b.coin(&["train", "mini-OCRVQA", "--json"]).success();
    assert!(resumed.stderr.contains("Resuming"), "{}", resumed.stderr);
    let got = resumed.json();
    assert_eq!(got["training_key"], want["training_key"]);
    assert_eq!(got["report"]["losses"], want["report"]["losses"]);
    let files = |env: &TestEnvironment, id: &Value| -> Value {
        let s = show(env, id.as_str().unwrap());
        let mut f = s["files"].clone();
        for e in f.as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("size");
        }
        f
    };
    assert_eq!(
        files(&b, &got["checkpoint"]),
        files(&a, &want["checkpoint"]),
        "bit-identical adapter after resuming"
    );
    b.coin(&["fsck"]).success();
}

#[test]
fn replay_mixes_recorded_items_of_earlier_tasks_and_shares_the_first_step() {
    let env = setup();
    let seq = env
        .coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-GQA",
            "--branch",
            "seq",
            "--json",
        ])
        .success()
        .json();
    let replay = env
        .coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-GQA",
            "--branch",
            "replay",
            "--set",
            "train.strategy=replay",
            "--set",
            "train.replay_items=5",
            "--json",
        ])
        .success()
        .json();
    // Nothing to replay at the first step: the sequential checkpoint is reused.
    assert_eq!(replay["steps"][0]["reused"], true);
    assert_eq!(
        replay["steps"][0]["checkpoint"],
        seq["steps"][0]["checkpoint"]
    );
    // The second step trains on 12 + 5 samples: 5 steps of 4 instead of 3.
    let step = &replay["steps"][1];
    assert_eq!(step["reused"], false);
    assert_eq!(step["report"]["steps"], 5, "{step}");
    assert_eq!(seq["steps"][1]["report"]["steps"], 3);
    assert_ne!(step["training_key"], seq["steps"][1]["training_key"]);
    let rec = show(&env, step["checkpoint"].as_str().unwrap());
    let r = &rec["train"]["replay"][0];
    assert_eq!(r["task"], "mini-VizWiz");
    assert_eq!(r["items"], 5);
    assert_eq!(r["of"], 12);
    assert_eq!(r["indices"].as_array().unwrap().len(), 5);
    assert_eq!(rec["train"]["config"]["train"]["strategy"], "replay");
    // Another share is another key; a bad share is refused.
    let plan = env
        .coin(&[
            "train",
            "mini-GQA",
            "--from",
            replay["steps"][0]["checkpoint"].as_str().unwrap(),
            "--set",
            "train.strategy=replay",
            "--set",
            "train.replay_share=0.5",
            "--dry-run",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(plan["reuse"], Value::Null);
    let e = env
        .coin(&["train", "mini-GQA", "--set", "train.replay_share=2"])
        .code(1);
    assert!(e.stderr.contains("replay_share"), "{}", e.stderr);
    let e = env
        .coin(&["train", "mini-GQA", "--set", "train.strategy=nonsense"])
        .code(1);
    assert!(e.stderr.contains("sequential, replay, ewc"), "{}", e.stderr);
}

/// The tensors of a safetensors file as (name, f32 values): the 8-byte header length, the JSON
/// header, the data.
fn read_f32_safetensors(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, meta) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(meta["dtype"], "F32", "{name}");
        let (a, b) = (
            meta["data_offsets"][0].as_u64().unwrap() as usize,
            meta["data_offsets"][1].as_u64().unwrap() as usize,
        );
        let v = data[a..b]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.push((name.clone(), v));
    }
    out
}

#[test]
fn ewc_stores_a_fisher_per_var_and_penalises_the_next_step() {
    let env = setup();
    let order = "mini-VizWiz,mini-GQA";
    let ewc = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--order",
            order,
            "--branch",
            "ewc",
            "--set",
            "train.strategy=ewc",
            "--set",
            "train.ewc_samples=6",
            "--json",
        ];
        args.extend_from_slice(extra);
        env.coin(&args)
    };
    let out = ewc(&[]).success();
    assert!(
        out.stderr
            .contains("EWC: no penalty this step: the first step"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("Computing the diagonal Fisher of mini-VizWiz on 6 of its 12"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("EWC: holding "), "{}", out.stderr);
    let run = out.json();
    let (id1, id2) = (
        run["steps"][0]["checkpoint"].as_str().unwrap().to_string(),
        run["steps"][1]["checkpoint"].as_str().unwrap().to_string(),
    );
    // The first checkpoint holds one non-negative, non-zero Fisher tensor per trained var.
    env.coin(&["checkout", &id1, "--output", "first"]).success();
    let fisher = read_f32_safetensors(&env.work().join("first").join("ewc.safetensors"));
    let adapter = read_f32_safetensors(&env.work().join("first").join("adapter_model.safetensors"));
    let lora: Vec<&(String, Vec<f32>)> =
        fisher.iter().filter(|(n, _)| n.contains("lora_")).collect();
    assert_eq!(lora.len(), adapter.len(), "one Fisher tensor per LoRA var");
    for (name, values) in &fisher {
        assert!(values.iter().all(|v| v.is_finite() && *v >= 0.0), "{name}");
        assert!(values.iter().any(|v| *v > 0.0), "{name} is all zero");
    }
    for (name, values) in &adapter {
        // adapter keys: base_model.model.<path>.lora_A.weight; Fisher keys: the var names.
        let tail = name.rsplit_once("layers.").unwrap().1;
        let f = lora
            .iter()
            .find(|(n, _)| n.ends_with(&format!("layers.{tail}")))
            .unwrap_or_else(|| panic!("no Fisher for {name}"));
        assert_eq!(f.1.len(), values.len(), "{name}");
    }
    let rec1 = show(&env, &id1);
    let m1 = &rec1["train"]["method"];
    assert_eq!(m1["name"], "ewc");
    assert_eq!(m1["penalty"], false);
    assert_eq!(m1["fisher_samples"], 6);
    assert!(m1["why"].as_str().unwrap().contains("first step"), "{m1}");
    // The second step: the parent's Fisher applied, the penalty grows from 0.
    let rec2 = show(&env, &id2);
    let m2 = &rec2["train"]["method"];
    assert_eq!(m2["penalty"], true, "{m2}");
    assert_eq!(m2["lambda"], rec2["train"]["config"]["train"]["ewc_lambda"]);
    assert_eq!(m2["gamma"], 1.0);
    assert_eq!(
        m2["parent_fisher"]["tensors"].as_u64().unwrap() as usize,
        fisher.len()
    );
    // γ = 1: the stored Fisher is the parent's plus this task's.
    let (ps, ts, s) = (
        m2["parent_fisher"]["sum"].as_f64().unwrap(),
        m2["fisher"]["task_sum"].as_f64().unwrap(),
        m2["fisher"]["sum"].as_f64().unwrap(),
    );
    assert!((ps + ts - s).abs() <= 1e-4 * s, "{ps} + {ts} vs {s}");
    let r = &rec2["train"]["result"];
    assert!(r["penalty_last10"].as_f64().unwrap() > 0.0, "{r}");
    // coin diff names the changed Fisher tensors.
    let d = env.coin(&["diff", &id1, &id2]).success().stdout;
    assert!(d.contains("changed  ewc.safetensors\n"), "{d}");
    assert!(d.contains("changed  ewc.safetensors:"), "{d}");

    // λ changes the key; on a sequential branch the ewc settings change nothing.
    let plan = |sets: &[&str]| {
        let mut args = vec!["train", "mini-GQA", "--from", &id1, "--dry-run", "--json"];
        for s in sets {
            args.extend_from_slice(&["--set", s]);
        }
        env.coin(&args).success().json()
    };
    let same = plan(&["train.strategy=ewc", "train.ewc_samples=6"]);
    assert_eq!(same["reuse"], id2.as_str(), "{same}");
    let other = plan(&[
        "train.strategy=ewc",
        "train.ewc_samples=6",
        "train.ewc_lambda=3",
    ]);
    assert_eq!(other["reuse"], Value::Null);
    assert_ne!(other["training_key"], same["training_key"]);
    let seq = plan(&[]);
    let seq_set = plan(&[
        "train.ewc_lambda=3",
        "train.ewc_gamma=0.5",
        "train.ewc_samples=1",
    ]);
    assert_eq!(seq["training_key"], seq_set["training_key"]);
    assert_ne!(seq["training_key"], same["training_key"]);

    // Clear errors: a bad γ or λ, and ewc with an external trainer.
    let e = env
        .coin(&[
            "train",
            "mini-GQA",
            "--set",
            "train.strategy=ewc",
            "--set",
            "train.ewc_gamma=2",
        ])
        .code(1);
    assert!(e.stderr.contains("train.ewc_gamma"), "{}", e.stderr);
    let e = env
        .coin(&["train", "mini-GQA", "--set", "train.ewc_lambda=-1"])
        .code(1);
    assert!(e.stderr.contains("train.ewc_lambda"), "{}", e.stderr);
    let e = env
        .coin(&[
            "train",
            "mini-GQA",
            "--set",
            "train.strategy=ewc",
            "--set",
            "trainer.command=true",
        ])
        .code(1);
    assert!(
        e.stderr
            .contains("train.strategy = ewc needs coin's engine"),
        "{}",
        e.stderr
    );
}

#[test]
fn lwf_shares_the_first_step_and_records_its_distillation() {
    let env = setup();
    let seq = env
        .coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-GQA",
            "--branch",
            "seq",
            "--json",
        ])
        .success()
        .json();
    let lwf = |branch: &str, lambda: &str| {
        env.coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-GQA",
            "--branch",
            branch,
            "--set",
            "train.strategy=lwf",
            "--set",
            &format!("train.lwf_lambda={lambda}"),
            "--json",
        ])
        .success()
        .json()
    };
    let one = lwf("lwf", "1.0");
    // No teacher at the first step: the sequential checkpoint is reused.
    assert_eq!(one["steps"][0]["reused"], true);
    assert_eq!(one["steps"][0]["checkpoint"], seq["steps"][0]["checkpoint"]);
    // The second step distils toward its parent.
    let step = &one["steps"][1];
    assert_eq!(step["reused"], false);
    assert_ne!(step["training_key"], seq["steps"][1]["training_key"]);
    let rec = show(&env, step["checkpoint"].as_str().unwrap());
    let train = &rec["train"];
    assert_eq!(train["config"]["train"]["strategy"], "lwf");
    let m = &train["method"];
    assert_eq!(m["name"], "lwf", "{train}");
    assert_eq!(m["lambda"], 1.0);
    assert_eq!(m["temperature"], 2.0);
    assert_eq!(m["top_k"], 0);
    assert_eq!(m["teacher"]["samples"], 12);
    assert!(m["teacher"]["positions"].as_u64().unwrap() > 0, "{m}");
    assert!(m["kl_last_epoch"].as_f64().unwrap() >= 0.0, "{m}");
    let penalty = train["result"]["penalty_last10"].as_f64().unwrap();
    assert!(penalty.is_finite() && penalty >= 0.0, "{train}");
    // λ is keyed: another λ shares the first step only.
    let half = lwf("lwf-half", "0.5");
    assert_eq!(
        half["steps"][0]["checkpoint"],
        seq["steps"][0]["checkpoint"]
    );
    assert_ne!(half["steps"][1]["training_key"], step["training_key"]);
    // Bad settings and an external trainer are refused before training.
    let e = env
        .coin(&[
            "train",
            "mini-GQA",
            "--set",
            "train.strategy=lwf",
            "--set",
            "train.lwf_temperature=0",
        ])
        .code(1);
    assert!(e.stderr.contains("lwf_temperature"), "{}", e.stderr);
    let e = env
        .coin(&[
            "train",
            "mini-GQA",
            "--set",
            "train.strategy=lwf",
            "--set",
            "trainer.command=true",
        ])
        .code(1);
    assert!(e.stderr.contains("lwf needs coin's engine"), "{}", e.stderr);
}

#[test]
fn olora_stacks_a_new_adapter_per_task_and_diff_shows_only_the_new_one() {
    let env = setup();
    let run = env
        .coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-GQA",
            "--branch",
            "olora",
            "--set",
            "train.strategy=olora",
            "--json",
        ])
        .success()
        .json();
    let ids: Vec<String> = (0..2)
        .map(|i| run["steps"][i]["checkpoint"].as_str().unwrap().to_string())
        .collect();
    // The second checkpoint's adapter is the concatenation: rank 2r.
    env.coin(&["checkout", &ids[0], "--output", "one"])
        .success();
    env.coin(&["checkout", &ids[1], "--output", "two"])
        .success();
    let cfg = |d: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(env.path(d).join("adapter_config.json")).unwrap(),
        )
        .unwrap()
    };
    let r = cfg("one")["r"].as_u64().unwrap();
    assert_eq!(cfg("two")["r"].as_u64().unwrap(), 2 * r);
    assert_eq!(
        cfg("two")["lora_alpha"].as_f64().unwrap(),
        2.0 * cfg("one")["lora_alpha"].as_f64().unwrap()
    );
    let index = |d: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(env.path(d).join("olora.json")).unwrap())
            .unwrap()
    };
    let two = index("two");
    let tasks: Vec<&str> = two["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, ["mini-VizWiz", "mini-GQA"]);
    assert_eq!(index("one")["tasks"].as_array().unwrap().len(), 1);
    // The record keeps the method's settings and what it did.
    let rec = show(&env, &ids[1]);
    let m = &rec["train"]["method"];
    assert_eq!(m["lambda1"], 0.5);
    assert_eq!(m["lambda2"], 0.0);
    assert_eq!(m["total_rank"].as_u64().unwrap(), 2 * r);
    assert_eq!(m["frozen_rank"].as_u64().unwrap(), r);
    assert!(m["orthogonality_start"].as_f64().unwrap() > 0.0, "{m}");
    assert!(m["orthogonality_end"].as_f64().is_some(), "{m}");
    assert!(show(&env, &ids[0])["train"]["method"]["orthogonality_start"].is_null());
    // diff: in olora.safetensors only mini-GQA's tensors are added, none changed or removed.
    let d = env
        .coin(&["diff", &ids[0], &ids[1], "--json"])
        .success()
        .json();
    let olora: Vec<&Value> = d["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["file"] == "olora.safetensors")
        .collect();
    assert!(!olora.is_empty(), "{d}");
    for t in &olora {
        assert_eq!(t["change"], "added", "{t}");
        assert!(t["name"].as_str().unwrap().starts_with("mini-GQA."), "{t}");
    }
    // Task 1's tensors are byte-identical in both checkpoints.
    let one = std::fs::read(env.path("one").join("olora.safetensors")).unwrap();
    let two = std::fs::read(env.path("two").join("olora.safetensors")).unwrap();
    assert!(two.len() > one.len());
    // Incompatible combinations are refused before anything is trained.
    let e = env
        .coin(&[
            "train",
            "mini-GQA",
            "--set",
            "train.strategy=olora",
            "--set",
            "train.method=moelora",
        ])
        .code(1);
    assert!(e.stderr.contains("moelora"), "{}", e.stderr);
    let e = env
        .coin(&["train", "mini-GQA", "--set", "train.olora_lambda1=-1"])
        .code(1);
    assert!(e.stderr.contains("olora_lambda1"), "{}", e.stderr);
}
