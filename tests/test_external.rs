//! External trainers and evaluators (`[trainer]`, `[evaluator]`) end to end: ordinary shell
//! scripts as the trainer (copying an adapter into `{output_dir}`) and the evaluator (writing
//! CoIN's `merge.jsonl` for `{task}` at `{stage}`), driven by `coin run`; the matrix, the train
//! record, the log, reuse by training key, a failing, a killed and an empty-handed trainer
//! (no checkpoint, the run resumable), and the trainer code's git state in the key.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use serde_json::Value;

use crate::common::TestEnvironment;
use crate::test_workflow_train::TRAIN_CONFIG;

const TRAIN_SH: &str = r#"set -e
echo "$1" >> calls.txt
echo "task=$1 parent=$2 step=$COIN_STEP seed=$COIN_SEED"
if [ -f fail ]; then echo "boom: no GPU" >&2; exit 3; fi
if [ -f kill ]; then kill -9 $$; fi
if [ -n "$2" ]; then test -f "$2/adapter_config.json"; fi
mkdir -p "$3"
if [ -f empty ]; then exit 0; fi
cp ../fx/$1/* "$3/"
echo "step 1/1 loss 0.25"
"#;

const EVAL_SH: &str = r#"set -e
test -f "$3/adapter_config.json"
mkdir -p "$(dirname "$4")"
if [ "$2" = Finetune ]; then cp "answers/$1.gold.jsonl" "$4"; else cp "answers/$1.wrong.jsonl" "$4"; fi
echo "evaluated $1 at $2"
"#;

const CONFIG: &str = r#"
[trainer]
command = "sh train.sh {task} {parent_dir} {output_dir}"
workdir = "trainer"

[evaluator]
command = "sh eval.sh {task} {stage} {checkpoint_dir} {results_dir}/{task}/{stage}/merge.jsonl"
workdir = "trainer"
"#;

/// The tiny model, CoIN-mini, two adapters trained by coin's engine as the "external"
/// trainer's products (fx/<task>/), the scripts and answer files.
fn setup() -> TestEnvironment {
    let env = TestEnvironment::tiny_and_mini(&[], 8, 4, TRAIN_CONFIG);
    for task in ["mini-VizWiz", "mini-GQA"] {
        env.coin(&["train", task, "--eval-tasks", "none"]).success();
        env.coin(&["checkout", "HEAD", "--output", &format!("fx/{task}")])
            .success();
    }
    env.write("trainer/train.sh", TRAIN_SH);
    env.write("trainer/eval.sh", EVAL_SH);
    env.write("ext.toml", CONFIG);
    for (task, file) in [
        ("mini-VizWiz", "mini/Instructions_Original/VizWiz/val.json"),
        ("mini-GQA", "mini/Instructions_Original/GQA/test.json"),
    ] {
        env.answer_files(task, file, "trainer/answers");
    }
    env
}

fn calls(env: &TestEnvironment) -> Vec<String> {
    std::fs::read_to_string(env.path("trainer/calls.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn rows(m: &Value) -> Vec<Vec<Option<f64>>> {
    serde_json::from_value(m["matrix"].clone()).unwrap()
}

fn run(env: &TestEnvironment, branch: &str, order: &str) -> crate::common::Output {
    env.coin(&[
        "run", "--order", order, "--branch", branch, "--config", "ext.toml", "--json",
    ])
}

#[test]
fn scripts_train_and_evaluate_a_two_step_run_and_a_second_order_reuses_them() {
    let env = setup();
    let out = run(&env, "ext", "mini-VizWiz,mini-GQA").success();
    let j = out.json();
    assert_eq!(calls(&env), ["mini-VizWiz", "mini-GQA"]);
    // The hand-computed matrix: the evaluator answers right at "Finetune", wrong later.
    assert_eq!(
        rows(&j["matrix"]),
        vec![vec![Some(100.0), None], vec![Some(0.0), Some(100.0)]],
        "{j}"
    );
    assert!(
        out.stderr.contains("Running train mini-GQA: sh train.sh"),
        "{}",
        out.stderr
    );

    // The train record: the command as run, its status, time, environment and code state.
    let id2 = j["steps"][1]["checkpoint"].as_str().unwrap().to_string();
    let show = env.coin(&["show", &id2, "--json"]).success().json();
    let x = &show["train"]["external"];
    let cmd = x["command"].as_str().unwrap();
    assert!(cmd.starts_with("sh train.sh mini-GQA /"), "{cmd}");
    assert!(
        cmd.contains("_llava") || cmd.contains("/out/mini-GQA"),
        "{cmd}"
    );
    assert_eq!(x["exit"]["code"], 0);
    assert!(x["seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        x["template"],
        "sh train.sh {task} {parent_dir} {output_dir}"
    );
    assert!(x["env"]
        .as_object()
        .unwrap()
        .contains_key("CUDA_VISIBLE_DEVICES"));
    // The work dir is inside the coin project's own git repository.
    assert_eq!(x["code"]["dirty"], false, "{x}");
    assert_eq!(show["train"]["data"]["items"], 8);
    assert_eq!(show["train"]["task"], "mini-GQA");
    // The files are what the trainer wrote, byte for byte.
    env.coin(&["checkout", &id2, "--output", "back"]).success();
    crate::common::assert_same_tree(&env.path("fx/mini-GQA"), &env.path("back"));
    // The eval record says which evaluator run made it.
    let ev = &show["eval"]["mini-GQA"];
    assert_eq!(ev["evaluator"]["exit"]["code"], 0, "{ev}");
    assert!(ev["evaluator"]["log_tail"]
        .as_str()
        .unwrap()
        .contains("evaluated mini-GQA at Finetune"));

    // The log is kept with the checkpoint: the second step was given its parent.
    let log = env.coin(&["show", &id2, "--log"]).success().stdout;
    assert!(log.contains("task=mini-GQA parent=/"), "{log}");
    assert!(log.contains("step=2 seed=0"), "{log}");
    assert!(log.contains("step 1/1 loss 0.25"), "{log}");
    let id1 = j["steps"][0]["checkpoint"].as_str().unwrap();
    let log1 = env.coin(&["show", id1, "--log"]).success().stdout;
    assert!(log1.contains("task=mini-VizWiz parent= step=1"), "{log1}");
    let text = env.coin(&["show", &id2]).success().stdout;
    assert!(text.contains("trainer    sh train.sh mini-GQA"), "{text}");
    // The log is part of the checkpoint's git tree: it travels with a clone.
    let cloned = env.work().parent().unwrap().join("cloned");
    env.coin(&[
        "clone",
        env.work().to_str().unwrap(),
        cloned.to_str().unwrap(),
    ])
    .success();
    let log_there = env
        .coin_in(&cloned, &["show", &id2, "--log"])
        .success()
        .stdout;
    assert_eq!(log_there, log);

    // A dry run says what a longer order would do, and does nothing.
    let plan = env
        .coin(&[
            "run",
            "--order",
            "mini-VizWiz,mini-GQA,mini-TextVQA,mini-OCRVQA",
            "--branch",
            "planned",
            "--config",
            "ext.toml",
            "--dry-run",
        ])
        .success();
    let text = plan.stdout;
    assert!(
        text.contains("Step 1/4: mini-VizWiz: would reuse"),
        "{text}"
    );
    assert!(text.contains("Step 2/4: mini-GQA: would reuse"), "{text}");
    assert!(
        text.contains("Step 3/4: mini-TextVQA: would run the [trainer] command from"),
        "{text}"
    );
    assert!(text.contains("    sh train.sh mini-TextVQA /"), "{text}");
    assert!(!text.contains("Step 4/4"), "{text}");
    assert!(
        plan.stderr.contains("Steps 4–4 start from step 3's result"),
        "{}",
        plan.stderr
    );
    assert_eq!(calls(&env).len(), 2, "a dry run runs nothing");
    let branches = env.coin(&["branch", "--json"]).success().stdout;
    assert!(!branches.contains("planned"), "{branches}");
    let one = env
        .coin(&["train", "mini-TextVQA", "--dry-run", "--json"])
        .success()
        .json();
    assert_eq!(one["engine"], "coin");
    assert_eq!(one["reuse"], Value::Null);
    assert_eq!(one["branch"], "ext", "coin run switched to it");
    assert_eq!(one["parent"], id2.as_str());

    // The same command again: every step is on the branch, nothing runs.
    run(&env, "ext", "mini-VizWiz,mini-GQA").success();
    assert_eq!(calls(&env).len(), 2);
    // Another order sharing the first step reuses it by its training key.
    let other = run(&env, "other", "mini-VizWiz,mini-GQA").success().json();
    assert_eq!(other["steps"][0]["reused"], true);
    assert_eq!(other["steps"][1]["reused"], true);
    assert_eq!(calls(&env).len(), 2, "no trainer ran");
    // The evaluator is not run again for records it made (same key): `coin eval` says cached.
    let e = env
        .coin(&[
            "eval",
            &id2,
            "--tasks",
            "mini-GQA,mini-VizWiz",
            "--config",
            "ext.toml",
            "--json",
        ])
        .success()
        .json();
    assert!(
        e.as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "cached"),
        "{e}"
    );
    // A changed command is another key: the trainer runs again.
    let cfg = CONFIG.replace("{output_dir}\"", "{output_dir} --seed {seed}\"");
    env.write("ext.toml", cfg);
    let third = run(&env, "third", "mini-VizWiz").success().json();
    assert_eq!(third["steps"][0]["reused"], false);
    assert_eq!(calls(&env).len(), 3);
    assert_ne!(
        third["steps"][0]["training_key"],
        j["steps"][0]["training_key"]
    );
    env.coin(&["fsck"]).success();
}

#[test]
fn failing_killed_and_empty_handed_trainers_leave_no_checkpoint_and_the_run_resumes() {
    let env = setup();
    let branch_head = |env: &TestEnvironment| {
        env.coin(&["log", "bad", "--json"])
            .json()
            .as_array()
            .map_or(0, Vec::len)
    };
    // First step fine, second fails.
    env.write("trainer/fail-later", "");
    let fail = r#"if [ "$1" = mini-GQA ] && [ -f fail-later ]; then echo "boom: no GPU" >&2; exit 3; fi
"#;
    env.write("trainer/train.sh", format!("{fail}{TRAIN_SH}"));
    let e = run(&env, "bad", "mini-VizWiz,mini-GQA").code(1);
    assert!(
        e.stderr
            .contains("the trainer of mini-GQA exited with status 3"),
        "{}",
        e.stderr
    );
    assert!(e.stderr.contains("boom: no GPU"), "{}", e.stderr);
    assert!(e.stderr.contains("train.log"), "{}", e.stderr);
    assert_eq!(branch_head(&env), 1, "only the first step is on the branch");

    // Killed by a signal.
    std::fs::remove_file(env.path("trainer/fail-later")).unwrap();
    env.write("trainer/kill", "");
    let e = run(&env, "bad", "mini-VizWiz,mini-GQA").code(1);
    // `sh -c` reports the killed trainer as status 128 + 9.
    assert!(e.stderr.contains("killed by signal 9"), "{}", e.stderr);
    assert_eq!(branch_head(&env), 1);

    // Exit 0 but no adapter.
    std::fs::remove_file(env.path("trainer/kill")).unwrap();
    env.write("trainer/empty", "");
    let e = run(&env, "bad", "mini-VizWiz,mini-GQA").code(1);
    assert!(e.stderr.contains("holds no adapter"), "{}", e.stderr);
    assert_eq!(branch_head(&env), 1);

    // Fixed: the same command finishes the run from the failed step.
    std::fs::remove_file(env.path("trainer/empty")).unwrap();
    let before = calls(&env).len();
    let ok = run(&env, "bad", "mini-VizWiz,mini-GQA").success().json();
    assert_eq!(ok["steps"].as_array().unwrap().len(), 1, "{ok}");
    assert_eq!(calls(&env).len(), before + 1);
    assert_eq!(branch_head(&env), 2);
    env.coin(&["fsck"]).success();

    // trainer.output: the adapter is where the command says it leaves it.
    env.write(
        "trainer/nested.sh",
        "mkdir -p \"$1/final\" && cp ../fx/$2/* \"$1/final/\"\n",
    );
    env.write(
        "nested.toml",
        "[trainer]\ncommand = \"sh nested.sh {output_dir} {task}\"\nworkdir = \"trainer\"\n\
         output = \"{output_dir}/final\"\n",
    );
    let nested = env
        .coin(&[
            "train",
            "mini-VizWiz",
            "--config",
            "nested.toml",
            "--eval-tasks",
            "none",
            "--json",
        ])
        .success()
        .json();
    let id = nested["checkpoint"].as_str().unwrap();
    let show = env.coin(&["show", id, "--json"]).success().json();
    assert!(show["train"]["external"]["output"]
        .as_str()
        .unwrap()
        .ends_with("/VizWiz_llava_lora/final"));
    env.coin(&["checkout", id, "--output", "nested-back"])
        .success();
    crate::common::assert_same_tree(&env.path("fx/mini-VizWiz"), &env.path("nested-back"));

    // Bad settings are refused before anything runs.
    for (cfg, want) in [
        (
            "[trainer]\ncommand = \"sh train.sh {tsk}\"\nworkdir = \"trainer\"\n",
            "unknown placeholder '{tsk}'",
        ),
        (
            "[trainer]\ncommand = \"true\"\nworkdir = \"nowhere\"\n",
            "/nowhere' does not exist",
        ),
        ("[trainer]\nparent_format = \"zip\"\n", "parent_format"),
    ] {
        env.write("bad.toml", cfg);
        let e = env
            .coin(&["train", "mini-ImageNet", "--config", "bad.toml"])
            .code(1);
        assert!(e.stderr.contains(want), "{want}: {}", e.stderr);
    }
}

#[test]
fn the_trainer_code_commit_and_edits_are_recorded_and_keyed() {
    let env = setup();
    let t = env.path("trainer");
    env.git_in(&t, &["init", "-q"]).success();
    env.git_in(&t, &["add", "train.sh", "eval.sh"]).success();
    env.git_in(&t, &["commit", "-q", "-m", "trainer"]).success();
    let head = env.git_in(&t, &["rev-parse", "HEAD"]).success().stdout;
    let one = run(&env, "a", "mini-VizWiz").success().json();
    let id = one["steps"][0]["checkpoint"].as_str().unwrap();
    let show = env.coin(&["show", id, "--json"]).success().json();
    let code = &show["train"]["external"]["code"];
    assert_eq!(code["commit"], head.trim(), "{code}");
    assert_eq!(code["dirty"], false);
    // Untracked files (calls.txt, answers/) are counted, not keyed: the same key again.
    assert!(code["untracked"].as_u64().unwrap() >= 1, "{code}");
    let again = run(&env, "b", "mini-VizWiz").success().json();
    assert_eq!(again["steps"][0]["reused"], true);
    // An edit of a tracked file is another key, recorded as dirty.
    env.write("trainer/train.sh", format!("# edited\n{TRAIN_SH}"));
    let edited = run(&env, "c", "mini-VizWiz").success();
    assert!(
        edited.stderr.contains("uncommitted changes"),
        "{}",
        edited.stderr
    );
    let edited = edited.json();
    assert_eq!(edited["steps"][0]["reused"], false);
    let id = edited["steps"][0]["checkpoint"].as_str().unwrap();
    let show = env.coin(&["show", id, "--json"]).success().json();
    assert_eq!(show["train"]["external"]["code"]["dirty"], true);
    assert_eq!(show["train"]["external"]["code"]["changed_files"], 1);

    // Without [evaluator], coin's own engine evaluates what the external trainer made.
    let trainer_only = CONFIG.split("[evaluator]").next().unwrap();
    env.write("trainer-only.toml", trainer_only);
    let own = env
        .coin(&[
            "run",
            "--order",
            "mini-GQA",
            "--branch",
            "own",
            "--config",
            "trainer-only.toml",
            "--json",
        ])
        .success()
        .json();
    let ev = &own["steps"][0]["evals"][0];
    assert_eq!(ev["task"], "mini-GQA");
    assert_eq!(ev["status"], "generated", "{ev}");
    assert!(ev["record"]["score"].is_number());
    assert!(ev["record"].get("evaluator").is_none());
}

/// A stand-in for `deepspeed`: records its arguments and leaves the adapter the "training" of
/// `$COIN_TASK` made in `--output_dir`.
const STUB_DEEPSPEED: &str = r#"#!/bin/sh
n=$(ls args-*.txt 2>/dev/null | wc -l)
for a in "$@"; do echo "$a"; done > "args-$n.txt"
out=""
while [ $# -gt 0 ]; do
    if [ "$1" = --output_dir ]; then out=$2; fi
    shift
done
mkdir -p "$out"
cp "$FX/$COIN_TASK/"* "$out/"
"#;

/// A stand-in for one of CoIN's eval scripts (`$1` = STAGE, `$2` = MODELPATH): CoIN's
/// hard-coded results folder, right answers at `Finetune`, wrong ones later.
fn stub_eval(task: &str, coin_task: &str) -> String {
    format!(
        r#"set -e
case "$(basename "$2")" in *_llava_lora) ;; *) echo "bad model path $2" >&2; exit 4;; esac
d=./results/CoIN/LLaVA/{coin_task}/$1
mkdir -p "$d"
if [ "$1" = Finetune ]; then k=gold; else k=wrong; fi
cp "$ANSWERS/{task}.$k.jsonl" "$d/merge.jsonl"
"#
    )
}

#[test]
fn coins_own_scripts_are_driven_through_the_shipped_wrappers() {
    let env = setup();
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/coin-run");
    let stub = env.write("CoIN/deepspeed", STUB_DEEPSPEED);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    env.write(
        "CoIN/scripts/LLaVA/Eval/5_eval_vizwiz.sh",
        stub_eval("mini-VizWiz", "VizWiz"),
    );
    env.write(
        "CoIN/scripts/LLaVA/Eval/4_eval_gqa.sh",
        stub_eval("mini-GQA", "GQA"),
    );
    env.write(
        "coin-run.toml",
        format!(
            "[trainer]\ncommand = \"sh {}/train_step.sh\"\nworkdir = \"CoIN\"\n\
             env = [\"CUDA_VISIBLE_DEVICES\", \"GPUS\"]\n\n\
             [evaluator]\ncommand = \"sh {}/eval_step.sh\"\nworkdir = \"CoIN\"\n\
             answers = \"./results/CoIN/LLaVA/{{coin_task}}/{{stage}}/merge.jsonl\"\n",
            scripts.display(),
            scripts.display()
        ),
    );
    let out = crate::common::run(
        env.coin_cmd(&env.work())
            .args([
                "run",
                "--order",
                "mini-VizWiz,mini-GQA",
                "--branch",
                "coin-run",
                "--config",
                "coin-run.toml",
                "--json",
            ])
            .env("DEEPSPEED", &stub)
            .env("GPUS", "localhost:0,1")
            .env("FX", env.path("fx"))
            .env("ANSWERS", env.path("trainer/answers")),
    )
    .success();
    let j = out.json();
    assert_eq!(
        rows(&j["matrix"]),
        vec![vec![Some(100.0), None], vec![Some(0.0), Some(100.0)]],
        "{j}"
    );
    let args = |n: usize| -> Vec<String> {
        std::fs::read_to_string(env.path(format!("CoIN/args-{n}.txt")))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let flag = |a: &[String], f: &str| -> String {
        let i = a
            .iter()
            .position(|x| x == f)
            .unwrap_or_else(|| panic!("{f} in {a:?}"));
        a[i + 1].clone()
    };
    let (first, second) = (args(0), args(1));
    assert_eq!(flag(&first, "--include"), "localhost:0,1");
    assert_eq!(flag(&first, "--deepspeed"), "./scripts/zero3_offload.json");
    assert_eq!(
        flag(&first, "--pretrain_mm_mlp_adapter"),
        "./checkpoints/LLaVA/Vicuna/vicuna-7b-v.15-projector/mm_projector.bin"
    );
    assert!(!first.contains(&"--previous_task_model_path".to_string()));
    assert!(flag(&first, "--data_path").ends_with("mini/Instructions_Original/VizWiz/train.json"));
    assert!(flag(&first, "--output_dir").ends_with("/VizWiz_llava_lora"));
    // coin's resolved settings reach CoIN's flags (the test's config: batch 4, epochs 1).
    assert_eq!(flag(&first, "--per_device_train_batch_size"), "4");
    assert_eq!(flag(&first, "--num_train_epochs"), "1");
    assert_eq!(flag(&first, "--lora_r"), "8");
    assert!(!first.contains(&"--expert_num".to_string()));
    // Stage 2 continues from stage 1's folder as CoIN wrote it, named as CoIN's loader wants.
    assert!(flag(&second, "--previous_task_model_path").ends_with("/parent/VizWiz_llava_lora"));
    assert!(!second.contains(&"--pretrain_mm_mlp_adapter".to_string()));
    let id = j["steps"][1]["checkpoint"].as_str().unwrap();
    let show = env.coin(&["show", id, "--json"]).success().json();
    assert_eq!(show["train"]["external"]["env"]["GPUS"], "localhost:0,1");
    // Another GPU set is another key: the step is not reused.
    let again = crate::common::run(
        env.coin_cmd(&env.work())
            .args([
                "train",
                "mini-VizWiz",
                "--from",
                j["steps"][0]["checkpoint"].as_str().unwrap(),
                "--config",
                "coin-run.toml",
                "--eval-tasks",
                "none",
                "--json",
            ])
            .env("DEEPSPEED", &stub)
            .env("GPUS", "localhost:0")
            .env("FX", env.path("fx")),
    )
    .success()
    .json();
    assert_eq!(again["reused"], false);
}
