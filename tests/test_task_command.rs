#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::TestEnvironment;

#[test]
fn task_add_list_show() {
    let env = TestEnvironment::new();
    let out = env.coin(&["task", "list"]).code(1);
    assert!(
        out.stderr.contains("Not in a coin repository"),
        "{}",
        out.stderr
    );
    std::fs::create_dir_all(env.path(".coin")).unwrap();
    env.write(
        "defs/OCR-VQA.toml",
        include_str!("../templates/tasks/OCR-VQA.toml"),
    );
    env.coin(&["task", "add", "--file", "defs/OCR-VQA.toml"])
        .success();
    env.coin(&[
        "task",
        "add",
        "--name",
        "Birds",
        "--scorer",
        "imagenet",
        "--train",
        "birds/train.json",
        "--test",
        "birds/test.json",
        "--image-root",
        "birds/images",
    ])
    .success();
    let list = env.coin(&["task", "list", "--json"]).success().json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Birds", "OCR-VQA"]);
    let table = env.coin(&["task", "list"]).success().stdout;
    assert!(
        table.contains("Birds") && table.contains("strict"),
        "{table}"
    );
    assert!(
        table.contains("OCR-VQA") && table.contains("compat"),
        "{table}"
    );
    // Duplicate names are refused; --force replaces.
    let dup = env
        .coin(&["task", "add", "--file", "defs/OCR-VQA.toml"])
        .code(1);
    assert!(dup.stderr.contains("already registered"), "{}", dup.stderr);
    env.coin(&["task", "add", "--file", "defs/OCR-VQA.toml", "--force"])
        .success();
    // show finds aliases and resolves paths; --identity hashes the train file.
    env.write("birds/train.json", r#"[{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ\nI"}, {"from": "gpt", "value": "owl"}]}]"#);
    let sub = env.path("birds");
    let v = env
        .coin_in(&sub, &["task", "show", "birds", "--identity", "--json"])
        .success()
        .json();
    assert_eq!(v["default_mode"], "strict");
    assert_eq!(v["train_identity"]["items"], 1);
    assert_eq!(v["train_identity"]["blake3"].as_str().unwrap().len(), 64);
    let v = env
        .coin(&["task", "show", "ocrvqa", "--json"])
        .success()
        .json();
    assert_eq!(v["definition"]["scorer"], "OCRVQA");
    env.coin(&["task", "show", "nope"]).code(1);
    let bad = env
        .coin(&[
            "task",
            "add",
            "--name",
            "x",
            "--scorer",
            "mnist",
            "--train",
            "a",
            "--test",
            "b",
            "--image-root",
            "c",
        ])
        .code(1);
    assert!(bad.stderr.contains("unknown scorer"), "{}", bad.stderr);
}
