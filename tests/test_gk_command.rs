//! End-to-end tests of general knowledge in the history: `coin judge --record` stores the LLM
//! judge's score as a `GK:<task>` eval record, and `coin log`, `coin diff` and
//! `coin matrix --metric gk` show it.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use crate::common::{read_http_json_body, TestEnvironment};

const EVAL_A: &str = r#"{"ScienceQA": {"metric": "accuracy", "score": 80.0, "n": 100}}"#;
const EVAL_B: &str = r#"{"ScienceQA": {"metric": "accuracy", "score": 70.5, "n": 100},
                         "TextVQA": {"metric": "accuracy", "score": 50.0, "n": 10}}"#;

/// Two checkpoints: ScienceQA, then TextVQA, with accuracy records.
fn setup() -> (TestEnvironment, String, String) {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    env.adapter_with_readme("a1", 0.0);
    env.write("eval_a.json", EVAL_A);
    let id1 = env
        .coin(&[
            "commit",
            "a1",
            "--task",
            "ScienceQA",
            "--eval",
            "eval_a.json",
        ])
        .success()
        .stdout
        .trim()
        .to_string();
    env.adapter_with_readme("a2", 0.5);
    env.write("eval_b.json", EVAL_B);
    let id2 = env
        .coin(&["commit", "a2", "--task", "TextVQA", "--eval", "eval_b.json"])
        .success()
        .stdout
        .trim()
        .to_string();
    (env, id1, id2)
}

/// A judge output file in CoIN's layout with these replies.
fn replies(env: &TestEnvironment, name: &str, texts: &[&str]) {
    let lines: String = texts
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({"question_id": 0, "text": t})))
        .collect();
    env.write(name, lines);
}

/// A loopback judge answering `texts` in turn; the request bodies it received.
fn judge_server(texts: Vec<&'static str>) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for (i, s) in listener.incoming().enumerate() {
            let mut s = s.unwrap();
            seen.lock().unwrap().push(read_http_json_body(&mut s));
            let reply = texts[i % texts.len()];
            let body =
                serde_json::json!({"choices": [{"message": {"content": reply}}]}).to_string();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, bodies)
}

#[test]
fn gk_records_feed_log_diff_and_the_gk_matrix() {
    let (env, id1, id2) = setup();
    // ScienceQA on checkpoint 1: 8+6+10+4 = 28 of 40 → 70; on checkpoint 2: 20 of 40 → 50.
    replies(&env, "sqa1.jsonl", &["8", "6", "10", "4"]);
    replies(&env, "sqa2.jsonl", &["5", "5/10", "Score: 6", "4"]);
    let v = env
        .coin(&[
            "judge",
            "--replies",
            "sqa1.jsonl",
            "--task",
            "scienceqa",
            "--record",
            &id1,
            "--judge-model",
            "Qwen1.5-32B-Chat",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(v["score"], 70.0);
    assert_eq!(v["recorded"], "GK:ScienceQA");
    let out = env
        .coin(&[
            "judge",
            "--replies",
            "sqa2.jsonl",
            "--task",
            "ScienceQA",
            "--record",
            "HEAD",
        ])
        .success();
    assert!(
        out.stderr
            .contains(&format!("Recorded GK:ScienceQA 50.00 on {}.", &id2[..12])),
        "{}",
        out.stderr
    );

    // TextVQA on checkpoint 2 through an endpoint: 9 + 7 of 20 → 80.
    env.write(
        "val.json",
        r#"[{"question_id": 1, "text": "What does the sign say?\nAnswer the question using a single word or phrase.", "answer": "stop"},
            {"question_id": 2, "text": "Which brand?\nAnswer the question using a single word or phrase.", "answer": "acme"}]"#,
    );
    env.write(
        "a.jsonl",
        "{\"question_id\": 1, \"text\": \"stop\"}\n{\"question_id\": 2, \"text\": \"acne\"}\n",
    );
    let (url, bodies) = judge_server(vec!["9", "7/10"]);
    let v = env
        .coin(&[
            "judge",
            "--task",
            "TextVQA",
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
            "--record",
            &id2,
            "--json",
        ])
        .success()
        .json();
    assert_eq!(v["score"], 80.0);
    assert_eq!(v["recorded"], "GK:TextVQA");
    // CoIN's sampling settings are the defaults and are sent.
    for b in bodies.lock().unwrap().iter() {
        assert_eq!(
            (
                &b["temperature"],
                &b["top_p"],
                &b["repetition_penalty"],
                &b["max_tokens"]
            ),
            (
                &serde_json::json!(0.7),
                &serde_json::json!(0.8),
                &serde_json::json!(1.05),
                &serde_json::json!(20)
            )
        );
    }
    // The replies went to CoIN's judge output file, which `--replies` scores the same.
    let again = env
        .coin(&["judge", "--replies", "gk/prompt_eval_merge.jsonl", "--json"])
        .success()
        .json();
    assert_eq!(again["score"], 80.0);

    // The records: metric, n, judge metadata (no secret), the replies as a store object.
    let log = env.coin(&["log", "--json"]).success().json();
    let gk = &log[0]["eval"]["GK:TextVQA"];
    assert_eq!(gk["metric"], "general_knowledge");
    assert_eq!(gk["n"], 2);
    assert_eq!(gk["source"], "note");
    let judge = &gk["judge"];
    assert_eq!(judge["model"], "qwen");
    assert_eq!(judge["rule"], "CoIN");
    assert!(
        judge["prompt_version"]
            .as_str()
            .unwrap()
            .starts_with("CoIN@"),
        "{judge}"
    );
    assert_eq!(judge["temperature"], 0.7);
    assert_eq!(judge["top_p"], 0.8);
    assert_eq!(judge["repetition_penalty"], 1.05);
    assert_eq!(judge["max_tokens"], 20);
    assert_eq!(judge["source"], "endpoint");
    assert_eq!(
        judge["endpoint_host"],
        url.trim_start_matches("http://").trim_end_matches("/v1")
    );
    let sqa1 = &log[1]["eval"]["GK:ScienceQA"];
    assert_eq!(sqa1["judge"]["source"], "replies-file");
    assert_eq!(sqa1["judge"]["model"], "Qwen1.5-32B-Chat");
    assert_eq!(sqa1["rounded"], 70.0);
    let blob = sqa1["replies"].as_str().unwrap();
    assert_eq!(blob.len(), 64, "{blob}");
    assert!(
        env.path(format!(".coin/objects/{}/{}", &blob[..2], &blob[2..]))
            .is_file(),
        "the replies are a store object"
    );
    env.coin(&["fsck"]).success();

    // `coin log` shows the judge's scores beside accuracy.
    let text = env.coin(&["log"]).success().stdout;
    assert!(
        text.contains(
            "    eval: ScienceQA 70.50, TextVQA 50.00\n    gk:   ScienceQA 50.00, TextVQA 80.00\n"
        ),
        "{text}"
    );
    assert!(text.contains("    gk:   ScienceQA 70.00\n"), "{text}");

    // GK matrix by hand: rows [[70, —], [50, 80]]; MFT (70+80)/2 = 75, MFN (50+80)/2 = 65,
    // BWT 50 − 70 = −20.
    let m = env
        .coin(&["matrix", "--metric", "gk", "--json"])
        .success()
        .json();
    assert_eq!(m["metric"], "general_knowledge");
    assert_eq!(m["tasks"], serde_json::json!(["ScienceQA", "TextVQA"]));
    assert_eq!(m["matrix"], serde_json::json!([[70.0, null], [50.0, 80.0]]));
    assert_eq!(m["metrics"]["mft"], 75.0);
    assert_eq!(m["metrics"]["mfn"], 65.0);
    assert_eq!(m["metrics"]["bwt"], -20.0);
    // The accuracy matrix is untouched by the GK records.
    let acc = env.coin(&["matrix", "--json"]).success().json();
    assert_eq!(acc["metric"], "accuracy");
    assert_eq!(acc["tasks"], serde_json::json!(["ScienceQA", "TextVQA"]));
    assert_eq!(
        acc["matrix"],
        serde_json::json!([[80.0, null], [70.5, 50.0]])
    );
    let table = env.coin(&["matrix", "--metric", "gk"]).success().stdout;
    assert!(
        table.starts_with("General knowledge (LLM judge, 0-100)\n"),
        "{table}"
    );
    // A missing cell prints as missing, never 0.
    let row1 = table
        .lines()
        .find(|l| l.starts_with("1 ScienceQA"))
        .unwrap();
    assert!(row1.ends_with("70.00        —"), "{table}");
    assert!(
        table.contains("MFT     75.00   mean GK score right after training each task\n"),
        "{table}"
    );

    // `coin diff` shows GK changes per task in their own table.
    let d = env.coin(&["diff", &id1, &id2]).success().stdout;
    let gk_table = d.split("General knowledge (LLM judge):\n").nth(1).unwrap();
    assert!(
        gk_table.starts_with(
            "task              A         B     delta\n\
             ScienceQA     70.00     50.00    -20.00  forgetting\n\
             TextVQA           —     80.00         —\n"
        ),
        "{d}"
    );
    // The judge's scores have a gate of their own: ScienceQA's accuracy fell 9.5 points and
    // its GK score 20.
    env.coin(&["diff", &id1, &id2, "--fail-on-forgetting", "10"])
        .success();
    let out = env
        .coin(&["diff", &id1, &id2, "--fail-on-gk-forgetting", "15"])
        .code(1);
    assert!(
        out.stderr
            .contains("GK:ScienceQA dropped 20.00 points, more than 15"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("ScienceQA dropped 9.50"),
        "{}",
        out.stderr
    );
    env.coin(&["diff", &id1, &id2, "--fail-on-gk-forgetting", "25"])
        .success();
    let out = env
        .coin(&["diff", &id1, &id2, "--fail-on-forgetting", "9"])
        .code(1);
    assert!(
        out.stderr
            .contains("ScienceQA dropped 9.50 points, more than 9"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("GK:"), "{}", out.stderr);
}

#[test]
fn gk_bad_inputs_are_clear_errors() {
    let (env, _id1, _id2) = setup();
    replies(&env, "r.jsonl", &["8"]);
    // An unknown task.
    let e = env
        .coin(&[
            "judge",
            "--replies",
            "r.jsonl",
            "--task",
            "NoSuchTask",
            "--record",
            "HEAD",
        ])
        .code(1);
    assert!(e.stderr.contains("NoSuchTask"), "{}", e.stderr);
    // A checkpoint that does not exist.
    let e = env
        .coin(&[
            "judge",
            "--replies",
            "r.jsonl",
            "--task",
            "GQA",
            "--record",
            "deadbeef",
        ])
        .code(1);
    assert!(e.stderr.contains("deadbeef"), "{}", e.stderr);
    // A malformed replies file: the error names the file and the line.
    env.write("bad.jsonl", "{\"text\": \"8\"}\n{not json\n");
    let e = env
        .coin(&[
            "judge",
            "--replies",
            "bad.jsonl",
            "--task",
            "GQA",
            "--record",
            "HEAD",
        ])
        .code(1);
    assert!(
        e.stderr.contains("line 2 of '") && e.stderr.contains("bad.jsonl"),
        "{}",
        e.stderr
    );
    env.write("empty.jsonl", "\n");
    let e = env
        .coin(&[
            "judge",
            "--replies",
            "empty.jsonl",
            "--task",
            "GQA",
            "--record",
            "HEAD",
        ])
        .code(1);
    assert!(
        e.stderr.contains("empty.jsonl") && e.stderr.contains("no replies"),
        "{}",
        e.stderr
    );
    // --record needs a task, and a score to record.
    env.coin(&["judge", "--replies", "r.jsonl", "--record", "HEAD"])
        .code(2);
    env.write(
        "val.json",
        r#"[{"question_id": 1, "text": "Q?\nAnswer.", "answer": "a"}]"#,
    );
    env.write("a.jsonl", "{\"question_id\": 1, \"text\": \"a\"}\n");
    let e = env
        .coin(&[
            "judge",
            "--task",
            "GQA",
            "--questions",
            "val.json",
            "--answers",
            "a.jsonl",
            "--out",
            "o",
            "--record",
            "HEAD",
        ])
        .code(2);
    assert!(e.stderr.contains("--record needs a score"), "{}", e.stderr);
    // Bad sampling settings are usage errors.
    let e = env
        .coin(&["judge", "--replies", "r.jsonl", "--top-p", "0"])
        .code(2);
    assert!(e.stderr.contains("top_p"), "{}", e.stderr);
    // Nothing was recorded by the failed commands.
    let log = env.coin(&["log", "--json"]).success().json();
    for row in log.as_array().unwrap() {
        let eval = row["eval"].as_object().unwrap();
        assert!(eval.keys().all(|k| !k.starts_with("GK:")), "{row}");
    }
    // A GK record attached by hand must name a task and carry the GK metric.
    env.write(
        "gk.json",
        r#"{"GK:GQA": {"metric": "accuracy", "score": 50, "n": 1}}"#,
    );
    let e = env.coin(&["eval", "HEAD", "--record", "gk.json"]).code(1);
    assert!(e.stderr.contains("general_knowledge"), "{}", e.stderr);
}

#[test]
fn coin_fixture_replies_record_as_coin_scored_them() {
    // The judge output of tests/fixtures/judge/coin, which CoIN's evaluate_score.py scored 43.
    let (env, _id1, _id2) = setup();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/judge/coin/prompt_eval_merge.jsonl");
    env.write("merge.jsonl", std::fs::read(fixture).unwrap());
    let v = env
        .coin(&[
            "judge",
            "--replies",
            "merge.jsonl",
            "--task",
            "ScienceQA",
            "--record",
            "HEAD",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(v["rounded"], 43.0);
    assert_eq!(v["n"], 3);
    let log = env.coin(&["log", "-n", "1", "--json"]).success().json();
    assert_eq!(log[0]["eval"]["GK:ScienceQA"]["rounded"], 43.0);
}

#[test]
fn coin_judge_writes_coins_prompt_file_byte_for_byte() {
    // tests/fixtures/judge/*/prompt_to_eval.json were written by CoIN's create_prompt.py.
    let env = TestEnvironment::new();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/judge");
    for (dir, task) in [("coin", "ScienceQA"), ("grounding", "Grounding")] {
        let q = fixtures.join(dir).join("test.json");
        let a = fixtures.join(dir).join("merge.jsonl");
        env.coin(&[
            "judge",
            "--task",
            task,
            "--questions",
            q.to_str().unwrap(),
            "--answers",
            a.to_str().unwrap(),
            "--out",
            dir,
        ])
        .success();
        let ours = std::fs::read(env.path(format!("{dir}/prompt_to_eval.json"))).unwrap();
        let coin = std::fs::read(fixtures.join(dir).join("prompt_to_eval.json")).unwrap();
        assert!(ours == coin, "{dir}: coin's file differs from CoIN's");
    }
}
