//! `coin bisect`: the first checkpoint where a task fell more than --drop points below its best
//! earlier score, on a branch of eight checkpoints whose scores come from one recorded eval and
//! an [evaluator] script (right answers until mini-ImageNet is trained, wrong ones after).
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::TestEnvironment;

const ORDER: [&str; 8] = [
    "mini-VizWiz",
    "mini-GQA",
    "mini-TextVQA",
    "mini-OCRVQA",
    "mini-ImageNet",
    "mini-ScienceQA",
    "mini-VQAv2",
    "mini-Grounding",
];

/// Right answers while the checkpoint's task is one of the first four of ORDER.
const EVAL_SH: &str = r#"set -e
mkdir -p "$(dirname "$3")"
case "$2" in
    mini-VizWiz|mini-GQA|mini-TextVQA|mini-OCRVQA) k=gold ;;
    *) k=wrong ;;
esac
echo "$2" >> evaluated.txt
cp "answers/$1.$k.jsonl" "$3"
"#;

fn setup() -> TestEnvironment {
    let env = TestEnvironment::tiny_and_mini(&[], 4, 4, "");
    for (k, task) in ORDER.iter().enumerate() {
        let dir = env.adapter(&format!("a{k}"), k as f32);
        env.coin(&["commit", dir.to_str().unwrap(), "--task", task])
            .success();
    }
    env.answer_files(
        "mini-VizWiz",
        "mini/Instructions_Original/VizWiz/val.json",
        "ev/answers",
    );
    env.write("ev/eval.sh", EVAL_SH);
    env.write(
        "ev.toml",
        "[evaluator]\ncommand = \"sh eval.sh {task} {trained_task} {results_dir}/out.jsonl\"\n\
         workdir = \"ev\"\nanswers = \"{results_dir}/out.jsonl\"\n",
    );
    // Right after training, a recorded score of 90.
    env.write(
        "r.json",
        r#"{"mini-VizWiz": {"metric": "accuracy", "score": 90.0, "n": 4}}"#,
    );
    env.coin(&["eval", "HEAD~7", "--record", "r.json"])
        .success();
    env
}

fn evaluated(env: &TestEnvironment) -> usize {
    std::fs::read_to_string(env.path("ev/evaluated.txt"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn bisect_finds_the_step_that_forgot_evaluating_only_what_it_needs() {
    let env = setup();
    let out = env
        .coin(&[
            "bisect",
            "--task",
            "mini-VizWiz",
            "--drop",
            "5",
            "--config",
            "ev.toml",
            "--json",
        ])
        .success();
    let j = out.json();
    let bad = &j["first_bad"];
    assert_eq!(bad["trained_task"], "mini-ImageNet", "{j}");
    assert_eq!(bad["position"], 4);
    assert_eq!(bad["score"], 0.0);
    assert_eq!(
        bad["best_earlier"], 100.0,
        "a score found by the search raised it"
    );
    // 8 checkpoints: the recorded start, the tip, then a binary search of the 6 between.
    let steps = j["steps"].as_array().unwrap();
    assert_eq!(steps[0]["source"], "recorded");
    assert_eq!(steps[0]["score"], 90.0);
    assert!(steps.len() <= 5, "{steps:?}");
    let n = evaluated(&env);
    assert_eq!(j["evaluated"], n);
    assert!(n <= 4 && n < ORDER.len() - 1, "evaluated {n}");
    assert!(out.stderr.contains("(evaluated now)"), "{}", out.stderr);

    // The records stay: a second search evaluates nothing and finds the same step.
    let again = env
        .coin(&[
            "bisect",
            "--task",
            "mini-VizWiz",
            "--config",
            "ev.toml",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(again["evaluated"], 0);
    assert_eq!(again["first_bad"]["checkpoint"], bad["checkpoint"]);
    assert_eq!(evaluated(&env), n);
    let text = env
        .coin(&["bisect", "--task", "mini-VizWiz", "--config", "ev.toml"])
        .success()
        .stdout;
    assert!(
        text.contains("(mini-ImageNet) is the first checkpoint where mini-VizWiz"),
        "{text}"
    );

    // A drop no score reaches: nothing to find.
    let none = env
        .coin(&[
            "bisect",
            "--task",
            "mini-VizWiz",
            "--drop",
            "100",
            "--config",
            "ev.toml",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(none["first_bad"], serde_json::Value::Null);

    // Errors: a task not trained on the branch, a bad threshold, an unknown task.
    let e = env
        .coin(&[
            "bisect",
            "--task",
            "mini-VizWiz",
            "HEAD~7",
            "--config",
            "ev.toml",
        ])
        .success()
        .stdout;
    assert!(e.contains("nothing to find"), "{e}");
    let e = env
        .coin(&["bisect", "--task", "mini-Grounding", "HEAD~1"])
        .code(1);
    assert!(
        e.stderr.contains("is not trained on the history"),
        "{}",
        e.stderr
    );
    let e = env
        .coin(&["bisect", "--task", "mini-VizWiz", "--drop=-1", "main"])
        .code(2);
    assert!(e.stderr.contains("--drop"), "{}", e.stderr);
    let e = env
        .coin(&["bisect", "--task", "mini-Nothing", "main"])
        .code(1);
    assert!(e.stderr.contains("mini-Nothing"), "{}", e.stderr);
}
