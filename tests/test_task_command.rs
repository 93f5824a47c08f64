#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::TestEnvironment;

#[test]
fn task_add_list_show() {
    let env = TestEnvironment::new();
    insta::assert_snapshot!(env.coin_render(&["task", "list"]), @"
    ------- stderr -------
    Error: '$TEST_ENV/work' is not inside a coin repository (no .coin/ directory found here or above)
    Hint: Run `coin init` to create a coin repository here, or pass -R PATH.
    [exit status: 1]
    ");
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
    insta::assert_snapshot!(env.coin_render(&["task", "list"]), @r"
    task     scorer     mode    test
    Birds    imagenet   strict  birds/test.json
    OCR-VQA  OCRVQA     compat  playground/Instructions_Original/OCRVQA/test.json
    ");
    // Duplicate names are refused; --force replaces.
    insta::assert_snapshot!(env.coin_render(&["task", "add", "--file", "defs/OCR-VQA.toml"]), @r"
    ------- stderr -------
    Error: a task named 'OCR-VQA' is already registered (use --force to replace it)
    [exit status: 1]
    ");
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
    insta::assert_snapshot!(env.coin_render_in(&sub, &["task", "show", "birds"]), @r#"
    name = "Birds"
    aliases = []
    coin = false
    scorer = "imagenet"
    train = "birds/train.json"
    test = "birds/test.json"
    image_root = "birds/images"
    # default scoring mode: strict
    # train: $TEST_ENV/work/birds/train.json
    # test: $TEST_ENV/work/birds/test.json  (missing)
    # image_root: $TEST_ENV/work/birds/images  (missing)
    "#);
    insta::assert_snapshot!(env.coin_render(&["task", "show", "nope"]), @r"
    ------- stderr -------
    Error: unknown task 'nope'
    Hint: CoIN tasks: ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, VQAv2, OCR-VQA; `coin task list` shows registered ones.
    [exit status: 1]
    ");
    insta::assert_snapshot!(env.coin_render(&[
        "task", "add", "--name", "x", "--scorer", "mnist", "--train", "a", "--test", "b",
        "--image-root", "c",
    ]), @r"
    ------- stderr -------
    Error: unknown scorer 'mnist' (one of ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, VQAv2, OCR-VQA)
    [exit status: 1]
    ");
}
