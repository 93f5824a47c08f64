#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::{mask_seconds, TestEnvironment};

#[test]
fn coin_mini_generates_registers_and_scores() {
    let env = TestEnvironment::new();
    insta::assert_snapshot!(mask_seconds(&env.coin_render(&[
        "bench-data", "coin-mini", "--out", "mini", "--train", "8", "--test", "6", "--seed", "5",
    ])), @r"
    task             scorer     train  test  chance
    mini-ScienceQA   ScienceQA      8     6   25.0%
    mini-TextVQA     TextVQA        8     6   12.5%
    mini-ImageNet    ImageNet       8     6   16.7%
    mini-GQA         GQA            8     6   18.9%
    mini-VizWiz      VizWiz         8     6   14.3%
    mini-Grounding   Grounding      8     6   25.0%
    mini-VQAv2       VQAv2          8     6   37.5%
    mini-OCRVQA      OCR-VQA        8     6   20.8%
    ------- stderr -------
    Generating mini-ScienceQA.
    Generating mini-TextVQA.
    Generating mini-ImageNet.
    Generating mini-GQA.
    Generating mini-VizWiz.
    Generating mini-Grounding.
    Generating mini-VQAv2.
    Generating mini-OCRVQA.
    Wrote CoIN-mini (seed 5) to mini in [secs] s.
    ");
    // Not into a non-empty folder.
    insta::assert_snapshot!(env.coin_render(&["bench-data", "coin-mini", "--out", "mini"]), @"
    ------- stderr -------
    Error: 'mini' exists and is not empty
    Hint: Pick a new folder, or remove this one.
    [exit status: 1]
    ");
    // Register the eight tasks in a repository and score a perfect answer file by task name.
    std::fs::create_dir_all(env.path(".coin")).unwrap();
    env.coin(&["task", "add", "--coin-mini", "mini"]).success();
    let list = env.coin(&["task", "list", "--json"]).success().json();
    assert_eq!(list.as_array().unwrap().len(), 8);
    // coin's own readers accept the generated files, and every image is there.
    insta::assert_snapshot!(env.coin_render(&["task", "show", "mini-GQA", "--check"]), @r#"
    name = "mini-GQA"
    aliases = []
    coin = false
    scorer = "GQA"
    template = "GQA"
    data_root = "mini"
    train = "Instructions_Original/GQA/train.json"
    test = "Instructions_Original/GQA/test.json"
    image_root = "cl_dataset"
    annotations = "cl_dataset/GQA/testdev_balanced_questions.json"
    description = "CoIN-mini task mirroring CoIN GQA; chance 18.9%"
    # default scoring mode: strict
    # train: $TEST_ENV/work/mini/Instructions_Original/GQA/train.json
    # test: $TEST_ENV/work/mini/Instructions_Original/GQA/test.json
    # image_root: $TEST_ENV/work/mini/cl_dataset
    # check: 8 train records, 6 test records, 14 images, 0 missing
    "#);
    std::fs::remove_file(env.path("mini/cl_dataset/GQA/images/gqa-test-00003.png")).unwrap();
    insta::assert_snapshot!(env.coin_render(&["task", "show", "mini-GQA", "--check"]), @r#"
    name = "mini-GQA"
    aliases = []
    coin = false
    scorer = "GQA"
    template = "GQA"
    data_root = "mini"
    train = "Instructions_Original/GQA/train.json"
    test = "Instructions_Original/GQA/test.json"
    image_root = "cl_dataset"
    annotations = "cl_dataset/GQA/testdev_balanced_questions.json"
    description = "CoIN-mini task mirroring CoIN GQA; chance 18.9%"
    # default scoring mode: strict
    # train: $TEST_ENV/work/mini/Instructions_Original/GQA/train.json
    # test: $TEST_ENV/work/mini/Instructions_Original/GQA/test.json
    # image_root: $TEST_ENV/work/mini/cl_dataset
    # check: 8 train records, 6 test records, 14 images, 1 missing
    ------- stderr -------
    Error: 1 image(s) missing under '$TEST_ENV/work/mini/cl_dataset', e.g. GQA/images/gqa-test-00003.png
    Hint: Check the image root of the task (`coin task show TASK`).
    [exit status: 1]
    "#);
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
