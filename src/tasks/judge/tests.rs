#![allow(clippy::disallowed_methods)]
use super::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// An error with its causes, as the command line prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn rec(id: &str, text: &str, answer: &str) -> TestRecord {
    TestRecord {
        question_id: Qid::text(id),
        image: None,
        text: text.into(),
        answer: Some(answer.into()),
        answer_bbox: None,
        size: None,
        answers: None,
    }
}

fn ans(id: &str, text: &str) -> AnswerRecord {
    AnswerRecord {
        question_id: Qid::text(id),
        prompt: String::new(),
        text: Some(text.into()),
        answer_id: serde_json::Value::Null,
        model_id: serde_json::Value::Null,
        metadata: serde_json::Value::Null,
    }
}

#[test]
fn score_parsing_follows_coin_rules() {
    assert_eq!(parse_score("8"), 8.0);
    assert_eq!(parse_score(" 7.5\n"), 7.5);
    assert_eq!(parse_score("10"), 10.0);
    assert_eq!(parse_score("8/10"), 8.0);
    assert_eq!(parse_score("Score: 6 out of 10"), 6.0);
    assert_eq!(parse_score("12"), 0.0); // a number > 10 scores 0; no other rule is tried
    assert_eq!(parse_score("0"), 0.0);
    assert_eq!(parse_score("none"), 0.0);
    assert_eq!(parse_score("7.5/10"), 0.0); // the numerator must be all digits
    assert_eq!(parse_score("8 /10"), 0.0);
    assert_eq!(parse_score("11/10"), 0.0);
    assert_eq!(parse_score("Rating: 9"), 9.0);
    let s = summarise(&[10.0, 5.0, 0.0, 8.0]);
    assert_eq!((s.n, s.sum, s.score, s.rounded), (4, 23.0, 57.5, 58.0));
}

#[test]
fn coin_judge_output_files_are_scored() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("prompt_eval_merge.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"8\"}\n{\"text\": \"3/10\"}\n\n{\"text\": \"none\"}\n",
    )
    .unwrap();
    assert_eq!(read_reply_scores(&p).unwrap(), vec![8.0, 3.0, 0.0]);
    std::fs::write(&p, "{\"text\": \"1\"}\n{\"x\": 1}\n").unwrap();
    let err = read_reply_scores(&p).unwrap_err().to_string();
    assert!(
        err.starts_with("line 2 of '") && err.contains("no \"text\""),
        "{err}"
    );
}

#[test]
fn judge_files_are_read_with_bounds() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("replies.jsonl");
    // No reply at all is not a score of 0.
    std::fs::write(&p, "\n\n").unwrap();
    let err = read_reply_scores(&p).unwrap_err().to_string();
    assert!(
        err.contains("replies.jsonl") && err.contains("holds no replies"),
        "{err}"
    );
    // A reply line over the limit is refused with its line number, as is a progress line.
    let long = format!(
        "{{\"text\": \"8\"}}\n{{\"text\": \"{}\"}}\n",
        "9".repeat(crate::tasks::formats::MAX_RECORD_BYTES)
    );
    std::fs::write(&p, &long).unwrap();
    let err = read_reply_scores(&p).unwrap_err();
    assert!(matches!(err, TaskError::TooLong { .. }), "{err:?}");
    assert!(err.to_string().starts_with("line 2 of '"), "{err}");
    let progress = d.path().join("judge_progress.jsonl");
    let judged = r#"{"index": 0, "question_id": "a", "reply": "8", "score": 8.0}"#;
    std::fs::write(&progress, format!("{judged}\n{judged}\n")).unwrap();
    assert_eq!(read_progress(&progress).unwrap().len(), 2);
    let long_reply = format!(
        "{{\"reply\": \"{}\"}}",
        "9".repeat(crate::tasks::formats::MAX_RECORD_BYTES)
    );
    std::fs::write(&progress, format!("{judged}\n{long_reply}\n")).unwrap();
    let err = read_progress(&progress).unwrap_err();
    assert!(matches!(err, TaskError::TooLong { .. }), "{err:?}");
    assert!(err.to_string().starts_with("line 2 of '"), "{err}");
    // Other fields of a judge output line are skipped, whatever their size.
    let big_other = format!(
        "{{\"question_id\": 1, \"prompt\": [{}], \"text\": \"7\"}}\n",
        vec!["{}"; 10_000].join(",")
    );
    std::fs::write(&p, big_other).unwrap();
    assert_eq!(read_reply_scores(&p).unwrap(), vec![7.0]);
}

#[test]
fn chat_replies_are_read_into_typed_structs() {
    let many = format!(
        r#"{{"id": "x", "choices": [{{"message": {{"role": "assistant", "content": "8"}}}}, {}]}}"#,
        vec![r#"{"message": {"content": "1"}}"#; 1000].join(",")
    );
    assert_eq!(reply_content(many.as_bytes()).unwrap(), "8");
    for bad in [
        r#"{"choices": []}"#,
        r#"{"choices": [{"message": {"role": "assistant"}}]}"#,
        r#"{"error": "x"}"#,
    ] {
        let e = reply_content(bad.as_bytes()).unwrap_err();
        assert!(e.contains("no choices[0].message.content"), "{bad}: {e}");
    }
    let e = reply_content(b"<html>").unwrap_err();
    assert!(e.starts_with("the reply is not a chat completion"), "{e}");
}

#[test]
fn an_oversized_reply_body_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        // Read the whole request (closing a socket with unread input resets it).
        let end = loop {
            let n = stream.read(&mut tmp).unwrap();
            buf.extend_from_slice(&tmp[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        while buf.len() < end + 4 + len {
            let n = stream.read(&mut tmp).unwrap();
            buf.extend_from_slice(&tmp[..n]);
        }
        let content = "7".repeat(http::MAX_REPLY_BYTES as usize);
        let body = format!(r#"{{"choices": [{{"message": {{"content": "{content}"}}}}]}}"#);
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    let mut c = client(&format!("http://{addr}/v1"));
    c.retries = 0;
    let err = chain(&c.ask("hi").unwrap_err());
    assert!(err.contains("the reply is larger than 1024 KiB"), "{err}");
    h.join().unwrap();
}

#[test]
fn prompts_use_coin_layout() {
    let qs = [rec(
        "1",
        "What color?\nAnswer the question using a single word or phrase.",
        "red",
    )];
    let items = judge_items(&qs, &[ans("1", "blue")], JudgeRule::CoIN).unwrap();
    let u = user_prompt(&items[0], JudgeRule::CoIN);
    assert!(u.starts_with("[Context]\n[Question]\nWhat color?\n\n[Ground truth answer]\nred\n\n[End of ground truth answer]\n\n[Assistant]\nblue\n\n[End of Assistant]\n\n[System]\n"), "{u}");
    let file: serde_json::Value =
        serde_json::from_str(&prompt_file(&items, JudgeRule::CoIN)).unwrap();
    assert_eq!(
        file[0][0],
        serde_json::json!({"role": "system", "content": PROMPT_SYSTEM})
    );
    assert_eq!(file[0][1]["role"], "user");
    assert_eq!(file[0][1]["content"], u.as_str());
    let mut g = rec("2", "the red square\nPlease provide the bounding box coordinate of the region this sentence describes.", "");
    g.answer = None;
    g.answer_bbox = Some("[0.1, 0.2, 0.3, 0.4]".into());
    let gi = judge_items(
        &[g],
        &[ans("2", "[0.1, 0.2, 0.3, 0.4]")],
        JudgeRule::CoINGrounding,
    )
    .unwrap();
    let gu = user_prompt(&gi[0], JudgeRule::CoINGrounding);
    assert!(gu.contains("(x1, y1, x2, y2)"));
    // Grounding keeps the whole text, instruction line included (create_prompt.py).
    assert!(
        gu.contains("the red square\nPlease provide the bounding box"),
        "{gu}"
    );
    assert!(judge_items(&qs, &[ans("9", "x")], JudgeRule::CoIN).is_err());
}

#[test]
fn endpoint_urls() {
    assert!(http::check_url("http://127.0.0.1:8000/v1").is_ok());
    assert!(http::check_url("https://api.example.com/v1").is_ok());
    assert!(http::check_url("ftp://x/v1").is_err());
    assert!(http::check_url("http:///v1").is_err());
}

/// A loopback chat server: replies with scores from `replies` in turn; `fail_after` requests
/// it stops answering (closes the connection) to simulate a dead endpoint.
fn serve(
    replies: Vec<&'static str>,
    fail_from: usize,
) -> (String, Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    let (url, count, _, h) = serve_recording(replies, fail_from);
    (url, count, h)
}

/// The request bodies a loopback server received.
type Bodies = Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

/// [`serve`], also keeping every request body.
fn serve_recording(
    replies: Vec<&'static str>,
    fail_from: usize,
) -> (
    String,
    Arc<AtomicUsize>,
    Bodies,
    std::thread::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let received: Bodies = Arc::default();
    let bodies = received.clone();
    let h = std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            // Read the header, then the body by Content-Length.
            loop {
                let n = stream.read(&mut tmp).unwrap();
                buf.extend_from_slice(&tmp[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let header = |name: &str| {
                        head.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim()
                                .eq_ignore_ascii_case(name)
                                .then(|| v.trim().to_string())
                        })
                    };
                    let len: usize = header("content-length").unwrap().parse().unwrap();
                    // The client sends the API key as a bearer token.
                    assert_eq!(header("authorization").as_deref(), Some("Bearer test-key"));
                    while buf.len() < end + 4 + len {
                        let n = stream.read(&mut tmp).unwrap();
                        buf.extend_from_slice(&tmp[..n]);
                    }
                    let req: serde_json::Value =
                        serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                    assert_eq!(req["messages"][0]["content"], JUDGE_SYSTEM);
                    bodies.lock().unwrap().push(req);
                    break;
                }
            }
            let i = c.fetch_add(1, Ordering::SeqCst);
            if i >= fail_from {
                let body = "{\"error\": \"overloaded\"}";
                let _ = write!(
                    stream,
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                continue;
            }
            let reply = replies[i % replies.len()];
            let body = serde_json::json!({"choices": [{"message": {"role": "assistant", "content": reply}}]}).to_string();
            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    (format!("http://{addr}/v1"), count, received, h)
}

fn client(endpoint: &str) -> JudgeClient {
    JudgeClient {
        endpoint: endpoint.to_string(),
        api_key: Some("test-key".into()),
        model: "judge".into(),
        sampling: Sampling::DETERMINISTIC,
        timeout: Duration::from_secs(5),
        retries: 1,
        backoff: Duration::from_millis(10),
    }
}

fn items(n: usize) -> Vec<JudgeItem> {
    (0..n)
        .map(|i| JudgeItem {
            question_id: Qid::text(i.to_string()),
            question: "Q".into(),
            ground_truth: "a".into(),
            prediction: "b".into(),
        })
        .collect()
}

#[test]
fn judge_runs_against_a_loopback_server_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let progress = d.path().join("progress.jsonl");
    // The server answers 3 requests, then fails every request.
    let (url, count, _h) = serve(vec!["8", "5/10", "The score is 3"], 3);
    let c = client(&url);
    let err = chain(&run_judge(&c, &items(5), JudgeRule::CoIN, &progress, |_, _| {}).unwrap_err());
    assert!(
        err.contains("HTTP 503") && err.contains("2 attempt"),
        "{err}"
    );
    let saved = read_progress(&progress).unwrap();
    assert_eq!(
        saved.iter().map(|j| j.score).collect::<Vec<_>>(),
        vec![8.0, 5.0, 3.0]
    );
    assert_eq!(count.load(Ordering::SeqCst), 5); // 3 good + 2 attempts at item 3

    // A working server finishes the remaining two only.
    let (url2, count2, _h2) = serve(vec!["10"], usize::MAX);
    let done = run_judge(
        &client(&url2),
        &items(5),
        JudgeRule::CoIN,
        &progress,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(count2.load(Ordering::SeqCst), 2);
    let scores: Vec<f64> = done.iter().map(|j| j.score).collect();
    assert_eq!(scores, vec![8.0, 5.0, 3.0, 10.0, 10.0]);
    assert_eq!(summarise(&scores).score, 72.0);
}

#[test]
fn dead_and_slow_endpoints_give_clear_errors() {
    // Nothing listens on this port once the listener is dropped.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = client(&format!("http://127.0.0.1:{port}/v1"));
    let e = chain(&c.ask("x").unwrap_err());
    assert!(e.contains("could not connect to http://127.0.0.1"), "{e}");
    // The endpoint and the cause each once: the transport's error is the source, not text.
    assert_eq!(e.matches("could not connect").count(), 1, "{e}");
    assert!(e.contains("gave no usable reply (2 attempt(s))"), "{e}");
    // A server that accepts but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let _keep = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(2).collect();
        std::thread::sleep(Duration::from_secs(3));
        drop(conns);
    });
    let mut slow = client(&url);
    slow.timeout = Duration::from_millis(300);
    let e = chain(&slow.ask("x").unwrap_err());
    assert!(e.contains("no reply within"), "{e}");
}

#[test]
fn coin_sampling_settings_are_sent_by_default() {
    assert_eq!(Sampling::default(), Sampling::COIN);
    assert_eq!(
        (
            Sampling::COIN.temperature,
            Sampling::COIN.top_p,
            Sampling::COIN.repetition_penalty,
            Sampling::COIN.max_tokens
        ),
        (0.7, 0.8, 1.05, 20)
    );
    let (url, _, bodies, _h) = serve_recording(vec!["8"], usize::MAX);
    let mut c = client(&url);
    c.sampling = Sampling::default();
    assert_eq!(c.ask("x").unwrap(), "8");
    // Greedy decoding with no penalty leaves the vLLM-only field out.
    c.sampling = Sampling::DETERMINISTIC;
    c.ask("x").unwrap();
    let bodies = bodies.lock().unwrap();
    let coin = &bodies[0];
    assert_eq!(coin["temperature"], 0.7);
    assert_eq!(coin["top_p"], 0.8);
    assert_eq!(coin["repetition_penalty"], 1.05);
    assert_eq!(coin["max_tokens"], 20);
    assert_eq!(coin["model"], "judge");
    let greedy = &bodies[1];
    assert_eq!(greedy["temperature"], 0.0);
    assert_eq!(greedy["top_p"], 1.0);
    assert!(greedy.get("repetition_penalty").is_none(), "{greedy}");
}

#[test]
fn sampling_settings_are_checked() {
    Sampling::COIN.check().unwrap();
    Sampling::DETERMINISTIC.check().unwrap();
    for (s, what) in [
        (
            Sampling {
                temperature: -1.0,
                ..Sampling::COIN
            },
            "temperature",
        ),
        (
            Sampling {
                temperature: f64::NAN,
                ..Sampling::COIN
            },
            "temperature",
        ),
        (
            Sampling {
                top_p: 0.0,
                ..Sampling::COIN
            },
            "top_p",
        ),
        (
            Sampling {
                top_p: 1.5,
                ..Sampling::COIN
            },
            "top_p",
        ),
        (
            Sampling {
                repetition_penalty: 0.0,
                ..Sampling::COIN
            },
            "repetition penalty",
        ),
        (
            Sampling {
                max_tokens: 0,
                ..Sampling::COIN
            },
            "max_tokens",
        ),
    ] {
        let e = s.check().unwrap_err();
        assert!(e.contains(what), "{s:?}: {e}");
    }
}

#[test]
fn prompt_versions_name_the_rule_and_hash_its_text() {
    let v = JudgeRule::CoIN.prompt_version();
    let hash = blake3::hash(JudgeRule::CoIN.text().as_bytes()).to_hex();
    assert_eq!(v, format!("CoIN@{}", &hash.as_str()[..12]));
    assert!(JudgeRule::CoINGrounding
        .prompt_version()
        .starts_with("CoIN_Grounding@"));
    assert_ne!(
        JudgeRule::CoIN.prompt_version()[5..],
        JudgeRule::CoINGrounding.prompt_version()[15..]
    );
}

#[test]
fn endpoint_hosts_keep_no_secret_or_path() {
    assert_eq!(endpoint_host("http://127.0.0.1:8000/v1"), "127.0.0.1:8000");
    assert_eq!(
        endpoint_host("https://user:sk-secret@api.example.com/v1?key=k#x"),
        "api.example.com"
    );
    assert_eq!(endpoint_host("https://api.example.com"), "api.example.com");
}

/// The fixture folder of CoIN's judge files (see its README).
fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/judge")
        .join(path)
}

#[test]
fn prompt_files_match_coin_byte_for_byte() {
    for (dir, rule) in [
        ("coin", JudgeRule::CoIN),
        ("grounding", JudgeRule::CoINGrounding),
    ] {
        let questions =
            crate::tasks::formats::read_test_file(&fixture(&format!("{dir}/test.json"))).unwrap();
        let answers =
            crate::tasks::formats::read_answer_file(&fixture(&format!("{dir}/merge.jsonl")))
                .unwrap();
        let items = judge_items(&questions, &answers, rule).unwrap();
        let ours = prompt_file(&items, rule);
        let coin = std::fs::read_to_string(fixture(&format!("{dir}/prompt_to_eval.json"))).unwrap();
        assert_eq!(ours, coin, "{dir}");
    }
    assert_eq!(prompt_file(&[], JudgeRule::CoIN), "[]");
}

#[test]
fn python_json_escapes() {
    let mut s = String::new();
    push_py_json_str(&mut s, "a\"\\/\u{1}\u{7f}é🙂\u{8}\u{c}\r");
    assert_eq!(s, r#""a\"\\/\u0001\u007f\u00e9\ud83d\ude42\b\f\r""#);
}

#[test]
fn coin_judge_output_fixture_scores_as_coin_printed() {
    // CoIN's evaluate_score.py printed `Final score:43` for this file (see the README).
    let scores = read_reply_scores(&fixture("coin/prompt_eval_merge.jsonl")).unwrap();
    assert_eq!(scores, vec![8.0, 0.0, 5.0]);
    assert_eq!(summarise(&scores).rounded, 43.0);
}

#[test]
fn coin_written_replies_read_back() {
    let done = vec![
        Judged {
            index: 0,
            question_id: Qid::text("a"),
            reply: "8".into(),
            score: 8.0,
        },
        Judged {
            index: 1,
            question_id: Qid::text("b"),
            reply: "Score: 3\n".into(),
            score: 3.0,
        },
    ];
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("prompt_eval_merge.jsonl");
    std::fs::write(&p, replies_file(&done)).unwrap();
    assert_eq!(read_reply_scores(&p).unwrap(), vec![8.0, 3.0]);
}
