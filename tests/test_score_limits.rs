//! `coin score` and `coin judge` on empty, oversized and hostile answer files: clear errors that
//! name the file and the line, never a score over zero questions, never raw control characters.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::TestEnvironment;

fn setup(env: &TestEnvironment) {
    env.write(
        "val.json",
        r#"[{"question_id": 1, "image": "a.jpg", "text": "What?\nAnswer.", "answer": "red"}]"#,
    );
}

fn score(env: &TestEnvironment, answers: &str, extra: &[&str]) -> crate::common::Output {
    let mut args = vec![
        "score",
        "--task",
        "VQAv2",
        "--questions",
        "val.json",
        "--answers",
        answers,
    ];
    args.extend_from_slice(extra);
    env.coin(&args)
}

#[test]
fn an_empty_answer_file_is_an_error_not_a_score() {
    let env = TestEnvironment::new();
    setup(&env);
    env.write("empty.jsonl", "");
    for mode in ["compat", "strict"] {
        let out = score(&env, "empty.jsonl", &["--mode", mode]).code(1);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(
            out.stderr.contains("empty.jsonl") && out.stderr.contains("holds no answers"),
            "{}",
            out.stderr
        );
    }
    // The judge refuses it too, before writing any prompt.
    let out = env
        .coin(&[
            "judge",
            "--task",
            "VQAv2",
            "--questions",
            "val.json",
            "--answers",
            "empty.jsonl",
            "--out",
            "j",
        ])
        .code(1);
    assert!(out.stderr.contains("holds no answers"), "{}", out.stderr);
    assert!(!env.path("j/prompt_to_eval.json").exists());
    env.write("replies.jsonl", "\n");
    let out = env.coin(&["judge", "--replies", "replies.jsonl"]).code(1);
    assert!(out.stderr.contains("holds no replies"), "{}", out.stderr);
}

#[test]
fn nothing_scored_names_the_files() {
    let env = TestEnvironment::new();
    setup(&env);
    // ScienceQA compat scores the test split of the annotations: an empty split scores nothing.
    env.write("sqa/problems.json", "{}");
    env.write("sqa/pid_splits.json", r#"{"test": []}"#);
    env.write("a.jsonl", "{\"question_id\": 1, \"text\": \"A\"}\n");
    let out = env
        .coin(&[
            "score",
            "--task",
            "ScienceQA",
            "--questions",
            "val.json",
            "--answers",
            "a.jsonl",
            "--annotations",
            "sqa",
        ])
        .code(1);
    assert!(
        out.stderr
            .contains("no question was scored, the test split of pid_splits.json is empty"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("Hint: Check the files: --questions 'val.json', --answers 'a.jsonl'."),
        "{}",
        out.stderr
    );
}

#[test]
fn an_oversized_line_names_the_file_and_line() {
    let env = TestEnvironment::new();
    setup(&env);
    let big = "y".repeat(5 << 20);
    env.write(
        "big.jsonl",
        format!("{{\"question_id\": 1, \"text\": \"red\"}}\n{{\"question_id\": 1, \"text\": \"{big}\"}}\n"),
    );
    let out = score(&env, "big.jsonl", &[]).code(1);
    assert!(
        out.stderr.contains("line 2 of '")
            && out.stderr.contains("big.jsonl")
            && out.stderr.contains("longer than 4 MiB"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("Hint: Is this the right file?"),
        "{}",
        out.stderr
    );
}

#[test]
fn control_characters_from_files_are_escaped() {
    let env = TestEnvironment::new();
    setup(&env);
    env.write(
        "evil.jsonl",
        "{\"question_id\": \"\\u001b]0;owned\\u0007\\u001b[2J\", \"text\": \"red\"}\n",
    );
    let out = score(&env, "evil.jsonl", &[]).code(1);
    assert!(
        !out.stderr.contains('\u{1b}') && !out.stderr.contains('\u{7}'),
        "{:?}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(r"question \u{1b}]0;owned\u{7}\u{1b}[2J of the answer file"),
        "{}",
        out.stderr
    );
}
