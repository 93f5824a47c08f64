#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::TestEnvironment;

#[test]
fn coin_mini_generates_registers_and_scores() {
    let env = TestEnvironment::new();
    let out = env
        .coin(&[
            "bench-data",
            "coin-mini",
            "--out",
            "mini",
            "--train",
            "8",
            "--test",
            "6",
            "--seed",
            "5",
        ])
        .success();
    assert!(out.stdout.contains("mini-Grounding"), "{}", out.stdout);
    assert!(
        out.stderr.contains("Wrote CoIN-mini (seed 5)"),
        "{}",
        out.stderr
    );
    // Not into a non-empty folder.
    env.coin(&["bench-data", "coin-mini", "--out", "mini"])
        .code(1);
    // Register the eight tasks in a repository and score a perfect answer file by task name.
    std::fs::create_dir_all(env.path(".coin")).unwrap();
    env.coin(&["task", "add", "--coin-mini", "mini"]).success();
    let list = env.coin(&["task", "list", "--json"]).success().json();
    assert_eq!(list.as_array().unwrap().len(), 8);
    // coin's own readers accept the generated files, and every image is there.
    let shown = env
        .coin(&["task", "show", "mini-GQA", "--check"])
        .success()
        .stdout;
    assert!(
        shown.contains("# check: 8 train records, 6 test records, 14 images, 0 missing"),
        "{shown}"
    );
    std::fs::remove_file(env.path("mini/cl_dataset/GQA/images/gqa-test-00003.png")).unwrap();
    let err = env.coin(&["task", "show", "mini-GQA", "--check"]).code(1);
    assert!(
        err.stderr.contains("1 image(s) missing") && err.stderr.contains("gqa-test-00003.png"),
        "{}",
        err.stderr
    );
    let test: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.path("mini/Instructions_Original/VQAv2/val.json")).unwrap(),
    )
    .unwrap();
    let mut lines = String::new();
    for (i, q) in test.as_array().unwrap().iter().enumerate() {
        let text = if i == 0 {
            "wrong".to_string()
        } else {
            q["answer"].as_str().unwrap().to_string()
        };
        lines.push_str(&serde_json::json!({"question_id": q["question_id"], "prompt": q["text"], "text": text}).to_string());
        lines.push('\n');
    }
    env.write("answers.jsonl", lines);
    let v = env
        .coin(&[
            "score",
            "--task",
            "mini-VQAv2",
            "--questions",
            "mini/Instructions_Original/VQAv2/val.json",
            "--answers",
            "answers.jsonl",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(
        v["mode"], "strict",
        "CoIN-mini tasks are not CoIN tasks: strict by default"
    );
    assert_eq!(v["n"], 6);
    assert!(
        (v["score"].as_f64().unwrap() - 500.0 / 6.0).abs() < 1e-9,
        "{v}"
    );
}
