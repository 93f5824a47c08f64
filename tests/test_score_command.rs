#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::TestEnvironment;

const INSTR: &str = "Answer the question using a single word or phrase.";

fn setup_vqa(env: &TestEnvironment) {
    let qs = serde_json::json!([
        {"question_id": 1, "image": "COCO2014/train2014/a.jpg", "text": format!("What color?\n{INSTR}"), "answer": "Red"},
        {"question_id": 2, "image": "COCO2014/train2014/b.jpg", "text": format!("How many?\n{INSTR}"), "answer": "2"},
        {"question_id": 3, "image": "COCO2014/train2014/c.jpg", "text": format!("Is it?\n{INSTR}"), "answer": "yes"},
    ]);
    env.write("val.json", serde_json::to_string(&qs).unwrap());
    // CoIN's answer-file layout (model_vqa.py): one JSON object per line.
    env.write(
        "merge.jsonl",
        "{\"question_id\": 1, \"prompt\": \"What color?\", \"text\": \"red\", \"answer_id\": \"a1\", \"model_id\": \"llava\", \"metadata\": {}}\n\
         {\"question_id\": 2, \"prompt\": \"How many?\", \"text\": \"two\", \"answer_id\": \"a2\", \"model_id\": \"llava\", \"metadata\": {}}\n",
    );
}

#[test]
fn score_vqav2_compat_and_strict() {
    let env = TestEnvironment::new();
    setup_vqa(&env);
    let v = env
        .coin(&[
            "score",
            "--task",
            "vqav2",
            "--questions",
            "val.json",
            "--answers",
            "merge.jsonl",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(
        v,
        serde_json::json!({"task": "VQAv2", "metric": "accuracy", "mode": "compat", "score": 50.0, "n": 2})
    );
    let v = env
        .coin(&[
            "score",
            "--task",
            "VQAv2",
            "--questions",
            "val.json",
            "--answers",
            "merge.jsonl",
            "--mode",
            "strict",
            "--json",
        ])
        .success()
        .json();
    // strict: "two" = "2" after normalisation; the unanswered question 3 counts as wrong.
    assert_eq!(v["n"], 3);
    assert!(
        (v["score"].as_f64().unwrap() - 200.0 / 3.0).abs() < 1e-9,
        "{v}"
    );
    insta::assert_snapshot!(env.coin_render(&[
        "score", "--task", "VQA-v2", "--questions", "val.json", "--answers", "merge.jsonl",
    ]), @"VQAv2 accuracy (compat): 50.00 over 2 questions");
}

#[test]
fn score_errors_are_clear() {
    let env = TestEnvironment::new();
    setup_vqa(&env);
    insta::assert_snapshot!(env.coin_render(&[
        "score", "--task", "mnist", "--questions", "val.json", "--answers", "merge.jsonl",
    ]), @r"
    ------- stderr -------
    Error: unknown task 'mnist'
    Hint: CoIN tasks: ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, VQAv2, OCR-VQA; `coin task list` shows registered ones.
    [exit status: 1]
    ");
    env.write(
        "bad.jsonl",
        "{\"question_id\": 1, \"text\": \"a\"}\n{oops\n",
    );
    insta::assert_snapshot!(env.coin_render(&[
        "score", "--task", "OCRVQA", "--questions", "val.json", "--answers", "bad.jsonl",
    ]), @"
    ------- stderr -------
    Error: line 2 of '$TEST_ENV/work/bad.jsonl' is broken: key must be a string at line 1 column 2
    [exit status: 1]
    ");
    insta::assert_snapshot!(env.coin_render(&[
        "score", "--task", "TextVQA", "--questions", "val.json", "--answers", "merge.jsonl",
    ]), @"
    ------- stderr -------
    Error: cannot score TextVQA: compat mode needs --annotations TextVQA_0.5.1_val.json (or use --mode strict to score against the questions file)
    [exit status: 1]
    ");
}

#[test]
fn score_textvqa_and_scienceqa_with_annotations() {
    let env = TestEnvironment::new();
    let q = "what is written?";
    env.write(
        "TextVQA/val.json",
        serde_json::to_string(&serde_json::json!([
            {"question_id": "img1", "image": "TextVQA/train_images/img1.jpg", "text": format!("What is written?\n{INSTR}"), "answer": "stop"}
        ]))
        .unwrap(),
    );
    env.write(
        "TextVQA_0.5.1_val.json",
        serde_json::to_string(&serde_json::json!({"data": [
            {"question_id": "img1", "image_id": "i1", "question": q, "answers": ["stop", "stop", "STOP", "stop sign", "stop", "stop", "stop", "stop", "stop", "halt"]}
        ]}))
        .unwrap(),
    );
    env.write(
        "tv.jsonl",
        format!("{{\"question_id\": \"img1\", \"prompt\": \"What is written?\\n{INSTR}\", \"text\": \"Stop.\", \"answer_id\": \"x\", \"model_id\": \"m\", \"metadata\": {{}}}}\n"),
    );
    let v = env
        .coin(&[
            "score",
            "--task",
            "textvqa",
            "--questions",
            "TextVQA/val.json",
            "--answers",
            "tv.jsonl",
            "--annotations",
            "TextVQA_0.5.1_val.json",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(v["mode"], "compat");
    assert_eq!(v["metric"], "vqa_accuracy");
    assert!((v["score"].as_f64().unwrap() - 100.0).abs() < 1e-9, "{v}");

    env.write("sqa/problems.json", r#"{"5": {"choices": ["x", "y", "z"], "answer": 2}, "6": {"choices": ["x", "y"], "answer": 0}}"#);
    env.write("sqa/pid_splits.json", r#"{"test": ["5", "6"]}"#);
    env.write(
        "sqa/test.json",
        r#"[{"question_id": "5", "text": "Q\nA. x\nB. y\nC. z\nAnswer with the option's letter from the given choices directly.", "answer": "C"},
            {"question_id": "6", "text": "Q\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.", "answer": "A"}]"#,
    );
    env.write("sqa.jsonl", "{\"question_id\": \"5\", \"prompt\": \"\", \"text\": \"C\"}\n{\"question_id\": \"6\", \"prompt\": \"\", \"text\": \"a cat\"}\n");
    let v = env
        .coin(&[
            "score",
            "--task",
            "Science",
            "--questions",
            "sqa/test.json",
            "--answers",
            "sqa.jsonl",
            "--annotations",
            "sqa",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(
        (v["score"].as_f64(), v["n"].as_u64()),
        (Some(100.0), Some(2))
    );
    let v = env
        .coin(&[
            "score",
            "--task",
            "Science",
            "--questions",
            "sqa/test.json",
            "--answers",
            "sqa.jsonl",
            "--mode",
            "strict",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(v["score"].as_f64(), Some(50.0));
}
