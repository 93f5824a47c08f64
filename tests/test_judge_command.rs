#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::io::Write;
use std::net::TcpListener;

use crate::common::{read_http_json_body, TestEnvironment};

fn setup(env: &TestEnvironment) {
    env.write(
        "val.json",
        r#"[{"question_id": 1, "text": "What color?\nAnswer the question using a single word or phrase.", "answer": "red"},
            {"question_id": 2, "text": "How many?\nAnswer the question using a single word or phrase.", "answer": "2"}]"#,
    );
    env.write(
        "a.jsonl",
        "{\"question_id\": 1, \"text\": \"red\"}\n{\"question_id\": 2, \"text\": \"3\"}\n",
    );
}

#[test]
fn judge_writes_prompts_and_scores_against_loopback() {
    let env = TestEnvironment::new();
    setup(&env);
    insta::assert_snapshot!(env.coin_render(&[
        "judge", "--task", "VQAv2", "--questions", "val.json", "--answers", "a.jsonl", "--out",
        "gk",
    ]), @r"
    ------- stderr -------
    Wrote 2 judge prompts to $TEST_ENV/work/gk/prompt_to_eval.json.
    ");
    let prompts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.path("gk/prompt_to_eval.json")).unwrap())
            .unwrap();
    assert_eq!(prompts.as_array().unwrap().len(), 2);
    assert!(prompts[0][1]["content"]
        .as_str()
        .unwrap()
        .starts_with("[Context]\n[Question]\nWhat color?\n"));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for (i, s) in listener.incoming().enumerate() {
            let mut s = s.unwrap();
            read_http_json_body(&mut s);
            let reply = if i == 0 { "10" } else { "4/10" };
            let body =
                serde_json::json!({"choices": [{"message": {"content": reply}}]}).to_string();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let v = env
        .coin(&[
            "judge",
            "--task",
            "VQAv2",
            "--questions",
            "val.json",
            "--answers",
            "a.jsonl",
            "--out",
            "gk",
            "--endpoint",
            &url,
            "--judge-model",
            "qwen",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(v["score"].as_f64(), Some(70.0));
    assert_eq!(v["n"], 2);
    assert!(env.path("gk/judge_progress.jsonl").is_file());
}

#[test]
fn judge_dead_endpoint_is_a_clear_error() {
    let env = TestEnvironment::new();
    setup(&env);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let out = env.coin_render(&[
        "judge",
        "--task",
        "VQAv2",
        "--questions",
        "val.json",
        "--answers",
        "a.jsonl",
        "--out",
        "gk",
        "--endpoint",
        &url,
        "--judge-model",
        "qwen",
        "--retries",
        "0",
    ]);
    insta::assert_snapshot!(out.replace(&port.to_string(), "$PORT"), @"
    ------- stderr -------
    Wrote 2 judge prompts to $TEST_ENV/work/gk/prompt_to_eval.json.
    Error: the judge endpoint 'http://127.0.0.1:$PORT/v1' gave no usable reply (1 attempt(s)): could not connect to http://127.0.0.1:$PORT/v1/chat/completions: io: Connection refused (os error 111)
    Hint: Progress is saved in $TEST_ENV/work/gk/judge_progress.jsonl; run the same command again to resume.
    [exit status: 1]
    ");
}

#[test]
fn judge_scores_a_coin_reply_file() {
    let env = TestEnvironment::new();
    env.write(
        "prompt_eval_merge.jsonl",
        "{\"text\": \"10\"}\n{\"text\": \"7/10\"}\n{\"text\": \"12\"}\n",
    );
    let v = env
        .coin(&["judge", "--replies", "prompt_eval_merge.jsonl", "--json"])
        .success()
        .json();
    assert!(
        (v["score"].as_f64().unwrap() - 170.0 / 3.0).abs() < 1e-9,
        "{v}"
    );
    assert_eq!(v["rounded"].as_f64(), Some(57.0));
    insta::assert_snapshot!(env.coin_render(&["judge", "--replies", "prompt_eval_merge.jsonl"]), @"general knowledge: 56.67 (CoIN prints 57) over 3 replies");
    env.coin(&["judge", "--task", "GQA"]).code(2);
}
