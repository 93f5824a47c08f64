//! End-to-end tests of the history commands: init, commit, log, show, checkout, branches,
//! tags, revisions, eval notes, diff, stats, fsck, gc, crash safety and concurrency.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::PathBuf;

use crate::common::{assert_same_tree, TestEnvironment};

const EVAL_A: &str = r#"{"ScienceQA": {"metric": "accuracy", "score": 80.0, "n": 100}}"#;
const EVAL_B: &str = r#"{"ScienceQA": {"metric": "accuracy", "score": 70.5, "n": 100},
                         "TextVQA": {"metric": "accuracy", "score": 50.0, "n": 10}}"#;

fn setup() -> TestEnvironment {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    env
}

fn commit(env: &TestEnvironment, args: &[&str]) -> String {
    let out = env.coin(&[&["commit"], args].concat()).success();
    out.stdout.trim().to_string()
}

#[test]
fn commit_log_show_checkout_and_git_log() {
    let env = setup();
    let dir = env.adapter_with_readme("a1", 0.0);
    env.write("eval_a.json", EVAL_A);
    let id1 = commit(
        &env,
        &[
            "a1",
            "--task",
            "ScienceQA",
            "-m",
            "first",
            "--eval",
            "eval_a.json",
        ],
    );
    assert_eq!(id1.len(), 40);
    env.adapter_with_readme("a2", 0.5);
    let id2 = commit(&env, &["a2", "--task", "TextVQA"]);

    let log = env.coin(&["log", "--json"]).success().json();
    let rows = log.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], id2.as_str());
    assert_eq!(rows[0]["parents"][0], id1.as_str());
    assert_eq!(rows[0]["branches"][0], "main");
    assert_eq!(rows[1]["task"], "ScienceQA");
    assert_eq!(rows[1]["message"], "first");
    assert_eq!(rows[1]["eval"]["ScienceQA"]["score"], 80.0);
    assert_eq!(rows[1]["eval"]["ScienceQA"]["source"], "tree");
    let text = env.coin(&["log"]).success().stdout;
    assert!(
        text.contains(&id2[..12]) && text.contains("(main)"),
        "{text}"
    );
    assert!(text.contains("eval: ScienceQA 80.00"), "{text}");

    let show = env.coin(&["show", &id1[..10], "--json"]).success().json();
    assert_eq!(show["id"], id1.as_str());
    assert_eq!(show["adapter"]["kind"], "lora");
    assert_eq!(show["train"]["task"], "ScienceQA");
    let files = show["files"].as_array().unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "extra/README.md"
        ]
    );
    let st_file = &files[1];
    assert_eq!(st_file["kind"], "safetensors");
    let dtypes: Vec<&str> = st_file["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["dtype"].as_str().unwrap())
        .collect();
    assert!(dtypes.contains(&"BF16") && dtypes.contains(&"F16") && dtypes.contains(&"I64"));

    env.coin(&["checkout", &id1, "--output", "out1"]).success();
    assert_same_tree(&dir, &env.path("out1"));
    // A non-empty output directory is refused.
    let err = env.coin(&["checkout", &id1, "--output", "out1"]).code(1);
    assert!(err.stderr.contains("not empty"), "{}", err.stderr);

    // Plain git sees the history.
    let git = env.git_in(
        &env.work(),
        &["log", "--format=%H %s", "refs/coin/heads/main"],
    );
    let git = git.success();
    assert!(
        git.stdout.contains(&id1) && git.stdout.contains(&id2),
        "{}",
        git.stdout
    );
    assert!(git.stdout.contains("ScienceQA: first"));
    // Committing identical content again on a new parent gives a new id, same objects.
    let stats = env.coin(&["stats", "--json"]).success().json();
    assert!(stats["objects"].as_u64().unwrap() > 0);
}

#[test]
fn dedupe_stats_and_diff() {
    let env = setup();
    env.adapter_with_readme("a1", 0.0);
    env.write("eval_a.json", EVAL_A);
    env.write("eval_b.json", EVAL_B);
    let id1 = commit(
        &env,
        &["a1", "--task", "ScienceQA", "--eval", "eval_a.json"],
    );
    let s1 = env.coin(&["stats", "--json"]).success().json();
    env.adapter_with_readme("a2", 1.0);
    let id2 = commit(&env, &["a2", "--task", "TextVQA", "--eval", "eval_b.json"]);
    let s2 = env.coin(&["stats", "--json"]).success().json();
    // Only the two changed B tensors, the new header and README are new objects.
    let o1 = s1["objects"].as_u64().unwrap();
    let o2 = s2["objects"].as_u64().unwrap();
    assert!(o2 < 2 * o1, "no dedupe: {o1} then {o2}");
    assert!(s2["logical_bytes"].as_u64().unwrap() == 2 * s1["logical_bytes"].as_u64().unwrap());

    let d = env.coin(&["diff", &id1, &id2, "--json"]).success().json();
    let eval = d["eval"].as_array().unwrap();
    assert_eq!(eval[0]["task"], "ScienceQA");
    assert_eq!(eval[0]["delta"], -9.5);
    assert_eq!(eval[0]["forgetting"], true);
    assert_eq!(eval[1]["task"], "TextVQA");
    assert!(eval[1]["a"].is_null());
    let tensors = d["tensors"].as_array().unwrap();
    let changed: Vec<&serde_json::Value> = tensors
        .iter()
        .filter(|t| t["change"] == "changed")
        .collect();
    assert_eq!(changed.len(), 2, "{tensors:?}");
    // B = base + 1: ‖1‖ / ‖base‖ over 64 values i/32.
    let base: f64 = (0..64).map(|i| (f64::from(i) / 32.0).powi(2)).sum::<f64>();
    let expect = (64.0 / base).sqrt();
    let f32_change = changed.iter().find(|t| t["dtype"] == "F32").unwrap();
    let got = f32_change["rel_l2"].as_f64().unwrap();
    assert!((got - expect).abs() < 1e-6, "{got} vs {expect}");
    assert_eq!(d["unchanged_tensors"], 3);
    let text = env.coin(&["diff", &id1, &id2]).success().stdout;
    assert!(text.contains("forgetting"), "{text}");
}

#[test]
fn branches_tags_switch_and_revisions() {
    let env = setup();
    env.adapter_with_readme("a1", 0.0);
    let id1 = commit(&env, &["a1", "--task", "A"]);
    env.adapter_with_readme("a2", 1.0);
    let id2 = commit(&env, &["a2", "--task", "B"]);
    env.coin(&["tag", "v1", "HEAD~1"]).success();
    env.coin(&["branch", "side", &id1[..8]]).success();
    env.coin(&["switch", "-c", "order-b", "v1"]).success();
    let status = env.coin(&["status", "--json"]).success().json();
    assert_eq!(status["branch"], "order-b");
    assert_eq!(status["head"], id1.as_str());
    env.adapter_with_readme("a3", 2.0);
    let id3 = commit(&env, &["a3", "--task", "C"]);
    let show = env.coin(&["show", "order-b", "--json"]).success().json();
    assert_eq!(show["parents"][0], id1.as_str());
    assert_eq!(
        env.coin(&["show", "main~1", "--json"]).success().json()["id"],
        id1.as_str()
    );
    assert_eq!(
        env.coin(&["show", "HEAD^", "--json"]).success().json()["id"],
        id1.as_str()
    );
    let branches = env.coin(&["branch", "--json"]).success().json();
    let names: Vec<&str> = branches
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", "order-b", "side"]);
    let tags = env.coin(&["tag", "--json"]).success().json();
    assert_eq!(tags[0]["name"], "v1");
    env.coin(&["switch", "main"]).success();
    assert_eq!(
        env.coin(&["show", "--json"]).success().json()["id"],
        id2.as_str()
    );
    // Errors.
    let e = env.coin(&["show", "nope"]).code(1);
    assert!(e.stderr.contains("unknown revision 'nope'"), "{}", e.stderr);
    let e = env.coin(&["show", "HEAD~5"]).code(1);
    assert!(
        e.stderr.contains("past the first checkpoint"),
        "{}",
        e.stderr
    );
    let e = env.coin(&["switch", "missing"]).code(1);
    assert!(
        e.stderr.contains("no branch named 'missing'"),
        "{}",
        e.stderr
    );
    let e = env.coin(&["tag", "v1"]).code(1);
    assert!(e.stderr.contains("already exists"), "{}", e.stderr);
    let e = env.coin(&["branch", "bad~name"]).code(1);
    assert!(e.stderr.contains("not a valid branch name"), "{}", e.stderr);
    // Ambiguous prefixes: find two ids sharing the first hex digit... use 4-digit prefixes
    // only when they collide; otherwise a unique 4-digit prefix resolves.
    let ids = [&id1, &id2, &id3];
    for id in ids {
        let shared = ids.iter().filter(|o| o[..4] == id[..4]).count();
        let out = env.coin(&["show", &id[..4], "--json"]);
        if shared == 1 {
            assert_eq!(out.success().json()["id"], id.as_str());
        } else {
            assert!(out.code(1).stderr.contains("ambiguous"));
        }
    }
}

#[test]
fn eval_records_attach_as_notes_without_changing_ids() {
    let env = setup();
    env.adapter_with_readme("a1", 0.0);
    env.write("eval_a.json", EVAL_A);
    env.write("eval_b.json", EVAL_B);
    let id1 = commit(
        &env,
        &["a1", "--task", "ScienceQA", "--eval", "eval_a.json"],
    );
    env.coin(&["eval", "HEAD", "--record", "eval_b.json"])
        .success();
    let show = env.coin(&["show", "--json"]).success().json();
    assert_eq!(show["id"], id1.as_str());
    assert_eq!(show["eval"]["ScienceQA"]["score"], 70.5);
    assert_eq!(show["eval"]["ScienceQA"]["source"], "note");
    assert_eq!(show["eval"]["TextVQA"]["source"], "note");
    let git = env
        .git_in(
            &env.work(),
            &["notes", "--ref=refs/notes/coin", "show", &id1],
        )
        .success();
    assert!(git.stdout.contains("TextVQA"), "{}", git.stdout);
}

#[test]
fn hostile_inputs_give_clear_errors() {
    let env = TestEnvironment::new();
    let e = env.coin(&["log"]).code(1);
    assert!(e.stderr.contains("coin init"), "{}", e.stderr);
    env.coin(&["init"]).success();
    let e = env.coin(&["init"]).code(1);
    assert!(
        e.stderr.contains("already a coin repository"),
        "{}",
        e.stderr
    );
    let e = env
        .coin(&["commit", "missing.safetensors", "--task", "A"])
        .code(1);
    assert!(e.stderr.contains("missing.safetensors"), "{}", e.stderr);
    env.adapter_with_readme("a1", 0.0);
    for (name, text, expect) in [
        ("bad1.json", "{not json", "not valid JSON"),
        (
            "bad2.json",
            r#"{"A": {"metric": "acc", "score": 300, "n": 1}}"#,
            "between 0 and 100",
        ),
        (
            "bad3.json",
            r#"{"A": {"metric": "acc", "n": 1}}"#,
            "missing \"score\"",
        ),
        ("bad4.json", "[1]", "expected a JSON object"),
    ] {
        env.write(name, text);
        let e = env
            .coin(&["commit", "a1", "--task", "A", "--eval", name])
            .code(1);
        assert!(e.stderr.contains(expect), "{name}: {}", e.stderr);
    }
    env.write("bin.json", b"\xff\xfe\x00");
    let e = env
        .coin(&["commit", "a1", "--task", "A", "--eval", "bin.json"])
        .code(1);
    assert!(e.stderr.contains("not UTF-8"), "{}", e.stderr);
    let e = env.coin(&["commit", "a1", "--task", "a/b"]).code(1);
    assert!(e.stderr.contains("must not contain"), "{}", e.stderr);
    let e = env.coin(&["show"]).code(1);
    assert!(e.stderr.contains("no checkpoints yet"), "{}", e.stderr);
    let e = env
        .coin(&["commit", "a1", "--task", "A", "--parent", "deadbeef"])
        .code(1);
    assert!(e.stderr.contains("unknown revision"), "{}", e.stderr);
    // A non-UTF-8 file name inside an adapter directory.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let p = env
            .path("a1")
            .join(std::ffi::OsStr::from_bytes(b"bad\xffname"));
        std::fs::write(&p, b"x").unwrap();
        let e = env.coin(&["commit", "a1", "--task", "A"]).code(1);
        assert!(e.stderr.contains("not UTF-8"), "{}", e.stderr);
        std::fs::remove_file(p).unwrap();
    }
    // Nothing was committed by the failures.
    assert_eq!(
        env.coin(&["log", "--json"]).success().json(),
        serde_json::json!([])
    );
    env.coin(&["fsck"]).success();
}

fn object_path(env: &TestEnvironment, id: &str) -> PathBuf {
    env.path(".coin/objects").join(&id[..2]).join(&id[2..])
}

#[test]
fn fsck_finds_a_flipped_byte_and_checkout_refuses() {
    let env = setup();
    env.adapter_with_readme("a1", 0.0);
    let id = commit(&env, &["a1", "--task", "A"]);
    env.coin(&["fsck"]).success();
    let show = env.coin(&["show", "--json"]).success().json();
    let tensor = show["files"][1]["tensors"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p = object_path(&env, &tensor);
    let mut perms = std::fs::metadata(&p).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&p, perms).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    let out = env.coin(&["fsck", "--json"]).code(1);
    let report = out.json();
    assert_eq!(report["ok"], false);
    assert!(
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["object"] == tensor.as_str() && p["kind"] == "object"),
        "{report}"
    );
    // A damaged store is an internal error (exit 255), not a user mistake.
    let e = env.coin(&["checkout", &id, "--output", "out"]).code(255);
    assert!(e.stderr.contains(&tensor[..12]), "{}", e.stderr);
}

#[test]
fn gc_keeps_reachable_objects_and_removes_unreachable_ones() {
    let env = setup();
    env.adapter_with_readme("a1", 0.0);
    let id1 = commit(&env, &["a1", "--task", "A"]);
    // Objects of a commit killed before its ref update are unreachable.
    env.adapter_with_readme("crash", 9.0);
    let out = crate::common::run(
        env.coin_cmd(&env.work())
            .env("COIN_FAULT", "commit.after_git_objects")
            .args(["commit", "crash", "--task", "X"]),
    );
    assert_eq!(out.code, -1, "not killed: {}", out.stderr);
    // A side branch, a tag and a note target keep their objects; so does the reflog of main
    // after main moves on... we check that objects of id1 survive when only the reflog
    // reaches it: create a branch from id1, then keep id1 reachable only through reflogs.
    env.adapter_with_readme("a2", 1.0);
    let id2 = commit(&env, &["a2", "--task", "B"]);
    env.coin(&["tag", "t2", &id2]).success();
    let before = env.coin(&["stats", "--json"]).success().json()["objects"]
        .as_u64()
        .unwrap();
    let dry = env.coin(&["gc", "--dry-run", "--json"]).success().json();
    let would = dry["removed"].as_array().unwrap().len();
    assert!(
        would > 0,
        "the crashed commit's objects should be unreachable"
    );
    assert_eq!(
        env.coin(&["stats", "--json"]).success().json()["objects"]
            .as_u64()
            .unwrap(),
        before
    );
    let gc = env.coin(&["gc", "--json"]).success().json();
    assert_eq!(gc["removed"].as_array().unwrap().len(), would);
    env.coin(&["fsck"]).success();
    env.coin(&["checkout", &id1, "--output", "o1"]).success();
    assert_same_tree(&env.path("a1"), &env.path("o1"));
    env.coin(&["checkout", "t2", "--output", "o2"]).success();
    // A second gc removes nothing.
    let gc = env.coin(&["gc", "--json"]).success().json();
    assert_eq!(gc["removed"].as_array().unwrap().len(), 0);

    // Reflog-only reachability: move `main` back with plain git (the reflog keeps id2's
    // objects reachable through the tag anyway, so check a note-only and reflog-only case).
    env.adapter_with_readme("a3", 3.0);
    let id3 = commit(&env, &["a3", "--task", "C"]);
    env.git_in(
        &env.work(),
        &[
            "update-ref",
            "-m",
            "test: rewind",
            "refs/coin/heads/main",
            &id2,
        ],
    )
    .success();
    let gc = env.coin(&["gc", "--json"]).success().json();
    assert_eq!(
        gc["removed"].as_array().unwrap().len(),
        0,
        "reflog entry must keep {id3}"
    );
    env.coin(&["checkout", &id3, "--output", "o3"]).success();
    assert_same_tree(&env.path("a3"), &env.path("o3"));
}

fn run_with(env: &TestEnvironment, vars: &[(&str, &str)], args: &[&str]) -> crate::common::Output {
    let mut cmd = env.coin_cmd(&env.work());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    crate::common::run(cmd.args(args))
}

#[test]
fn killed_commit_or_gc_leaves_a_clean_repository_at_every_fault_point() {
    let mut points: Vec<String> = coin::history::FAULT_POINTS
        .iter()
        .filter(|p| p.starts_with("commit.") || p.starts_with("gc."))
        .map(|p| p.to_string())
        .collect();
    points.extend(
        [
            "store.object.after_write",
            "store.object.before_rename",
            "store.object.after_rename",
            "store.object.after_rename:2",
            "store.ingest.after_tensor",
            "store.ingest.after_tensor:3",
            "gc.after_remove:2",
        ]
        .map(String::from),
    );
    for point in &points {
        let env = setup();
        env.adapter_with_readme("a1", 0.0);
        let id1 = commit(&env, &["a1", "--task", "A"]);
        env.adapter_with_readme("a2", 1.0);
        let is_gc = point.starts_with("gc.");
        if is_gc {
            // Make garbage for gc to remove: a commit killed before its ref moved.
            let out = run_with(
                &env,
                &[("COIN_FAULT", "commit.after_git_objects")],
                &["commit", "a2", "--task", "B"],
            );
            assert_eq!(out.code, -1);
        }
        let args: &[&str] = if is_gc {
            &["gc"]
        } else {
            &["commit", "a2", "--task", "B"]
        };
        let out = run_with(&env, &[("COIN_FAULT", point)], args);
        assert_eq!(out.code, -1, "{point} was not reached: {}", out.stderr);
        let fsck = env.coin(&["fsck", "--json"]);
        assert_eq!(fsck.code, 0, "{point}: {}", fsck.stdout);
        env.coin(&["checkout", &id1, "--output", "o1"]).success();
        assert_same_tree(&env.path("a1"), &env.path("o1"));
        // Re-running succeeds.
        env.coin(args).success();
        env.coin(&["fsck"]).success();
        let log = env.coin(&["log", "--json"]).success().json();
        let n = log.as_array().unwrap().len();
        // commit.after_ref: the first run's commit landed; the rerun adds another.
        let expect = if is_gc {
            1
        } else if point == "commit.after_ref" {
            3
        } else {
            2
        };
        assert_eq!(n, expect, "{point}");
        if !is_gc {
            env.coin(&["checkout", "HEAD", "--output", "o2"]).success();
            assert_same_tree(&env.path("a2"), &env.path("o2"));
        }
    }
}

#[test]
fn concurrent_commits_on_one_branch_never_lose_an_update() {
    let env = setup();
    env.adapter_with_readme("a1", 0.0);
    let base = commit(&env, &["a1", "--task", "A"]);
    env.adapter_with_readme("a2", 1.0);
    env.adapter_with_readme("a3", 2.0);
    let sync = env.tmp.path().join("sync");
    std::fs::create_dir_all(sync.join("a")).unwrap();
    std::fs::create_dir_all(sync.join("b")).unwrap();
    let spawn = |dir: &str, point: &str, src: &str| {
        env.coin_cmd(&env.work())
            .env(
                "COIN_TEST_PAUSE",
                format!("{point}:{}", sync.join(dir).display()),
            )
            .args(["commit", src, "--task", "T"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_for = |p: PathBuf| {
        let start = std::time::Instant::now();
        while !p.exists() {
            assert!(
                start.elapsed().as_secs() < 60,
                "{} never appeared",
                p.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // A holds the lock, paused just before its ref update.
    let a = spawn("a", "commit.before_ref", "a2");
    wait_for(sync.join("a/commit.before_ref.reached"));
    // B has read the branch head and waits before taking the lock.
    let b = spawn("b", "commit.before_lock", "a3");
    wait_for(sync.join("b/commit.before_lock.reached"));
    std::fs::write(sync.join("b/commit.before_lock.go"), b"").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    std::fs::write(sync.join("a/commit.before_ref.go"), b"").unwrap();
    let a = a.wait_with_output().unwrap();
    let b = b.wait_with_output().unwrap();
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(b.status.code(), Some(1));
    let b_err = String::from_utf8_lossy(&b.stderr);
    assert!(b_err.contains("branch 'main' moved from"), "{b_err}");
    assert!(b_err.contains("re-run"), "{b_err}");
    let a_id = String::from_utf8_lossy(&a.stdout).trim().to_string();
    let log = env.coin(&["log", "--json"]).success().json();
    assert_eq!(log[0]["id"], a_id.as_str());
    assert_eq!(log[0]["parents"][0], base.as_str());
    env.coin(&["fsck"]).success();
    // Re-running B now commits on top of A.
    let b_id = commit(&env, &["a3", "--task", "T"]);
    let show = env.coin(&["show", &b_id, "--json"]).success().json();
    assert_eq!(show["parents"][0], a_id.as_str());
}

#[test]
fn init_inside_an_existing_git_repository_leaves_it_alone() {
    let env = TestEnvironment::new();
    let w = env.work();
    env.git_in(&w, &["init", "-q", "-b", "trunk"]).success();
    env.write("code.py", "print(1)\n");
    env.git_in(&w, &["add", "code.py"]).success();
    env.git_in(&w, &["commit", "-q", "-m", "code"]).success();
    let head_before = env.git_in(&w, &["rev-parse", "HEAD"]).success().stdout;
    env.coin(&["init"]).success();
    env.adapter_with_readme("runs/a1", 0.0);
    commit(&env, &["runs/a1", "--task", "A"]);
    assert_eq!(
        env.git_in(&w, &["rev-parse", "HEAD"]).success().stdout,
        head_before
    );
    let branches = env.git_in(&w, &["branch", "--list"]).success().stdout;
    assert_eq!(branches.trim(), "* trunk");
    let status = env.git_in(&w, &["status", "--porcelain"]).success().stdout;
    assert!(!status.contains(".coin"), "{status}");
    let exclude = std::fs::read_to_string(w.join(".git/info/exclude")).unwrap();
    assert!(exclude.lines().any(|l| l == "/.coin/"), "{exclude}");
    env.git_in(&w, &["fsck", "--strict"]).success();
    // A subdirectory finds the repository by searching upward.
    env.coin_in(&w.join("runs"), &["log"]).success();
}

#[test]
fn init_creates_the_documented_layout() {
    let env = TestEnvironment::new();
    env.coin(&["init", "repo"]).success();
    let root = env.path("repo");
    let mut entries = Vec::new();
    let mut stack = vec![root.join(".coin")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(&root).unwrap().display().to_string();
            // Template subtrees are owned by other parts (tasks, orders, instructions).
            let from_templates = ["tasks", "instructions", "orders"]
                .iter()
                .any(|t| rel.starts_with(&format!(".coin/{t}")));
            if p.is_dir() {
                if !from_templates {
                    entries.push(format!("{rel}/"));
                    stack.push(p);
                }
            } else if !from_templates {
                entries.push(rel);
            }
        }
    }
    entries.sort();
    insta::assert_snapshot!(entries.join("\n"), @r"
    .coin/config.toml
    .coin/format-version
    .coin/hooks/
    .coin/hooks/post-eval.sample
    .coin/hooks/post-train.sample
    .coin/hooks/pre-checkpoint
    .coin/objects/
    .coin/objects/tmp/
    .coin/store/
    .coin/store/type
    ");
    let git = env
        .git_in(&root, &["symbolic-ref", "refs/coin/HEAD"])
        .success();
    assert_eq!(git.stdout.trim(), "refs/coin/heads/main");
    let cfg = env
        .git_in(&root, &["config", "core.logAllRefUpdates"])
        .success();
    assert_eq!(cfg.stdout.trim(), "always");
}

#[test]
fn killed_eval_record_leaves_a_clean_repository() {
    for point in coin::history::FAULT_POINTS
        .iter()
        .filter(|p| p.starts_with("note."))
    {
        let env = setup();
        env.adapter_with_readme("a1", 0.0);
        let id = commit(&env, &["a1", "--task", "A"]);
        env.write("eval_b.json", EVAL_B);
        let args = ["eval", "HEAD", "--record", "eval_b.json"];
        let out = run_with(&env, &[("COIN_FAULT", point)], &args);
        assert_eq!(out.code, -1, "{point} was not reached: {}", out.stderr);
        env.coin(&["fsck"]).success();
        env.coin(&args).success();
        let show = env.coin(&["show", "--json"]).success().json();
        assert_eq!(show["id"], id.as_str());
        assert_eq!(show["eval"]["TextVQA"]["source"], "note");
    }
}

/// A checkpoint of `n` tiny tensors (MoELoRA-router-like), distinct per `stage`.
fn many_small_tensors(env: &TestEnvironment, dir: &str, n: usize, stage: f32) {
    use crate::common::st;
    let tensors: Vec<st::T> = (0..n)
        .map(|i| {
            st::T::f32(
                &format!("layer.{i}.router"),
                &[4],
                &[stage, i as f32, 1.0, 2.0],
            )
        })
        .collect();
    env.write(
        format!("{dir}/adapter_model.safetensors"),
        st::safetensors(&tensors),
    );
}

#[test]
fn gc_packs_small_objects_and_drops_dead_ones_from_packs() {
    let env = setup();
    many_small_tensors(&env, "m1", 120, 1.0);
    let id1 = commit(&env, &["m1", "--task", "A"]);
    many_small_tensors(&env, "m2", 120, 2.0);
    let id2 = commit(&env, &["m2", "--task", "B"]);
    let objects = |env: &TestEnvironment| {
        env.coin(&["stats", "--json"]).success().json()["objects"]
            .as_u64()
            .unwrap()
    };
    let all = objects(&env);
    // Each commit wrote its 120 new small tensors as one pack.
    let stats = env.coin(&["stats", "--json"]).success().json();
    assert_eq!(
        (stats["packs"].as_u64(), stats["packed_objects"].as_u64()),
        (Some(2), Some(240))
    );
    let gc = env.coin(&["gc", "--json"]).success().json();
    assert_eq!(gc["removed"].as_array().unwrap().len(), 0);
    assert_eq!(
        gc["pack"]["packed"], 0,
        "too few loose objects to pack: {gc}"
    );
    assert_eq!(objects(&env), all);
    env.coin(&["fsck"]).success();
    // Make the second checkpoint unreachable: rewind main and forget its reflog.
    env.git_in(&env.work(), &["update-ref", "refs/coin/heads/main", &id1])
        .success();
    env.git_in(&env.work(), &["reflog", "expire", "--expire=now", "--all"])
        .success();
    let gc = env.coin(&["gc", "--json"]).success().json();
    let removed = gc["removed"].as_array().unwrap().len() as u64;
    assert_eq!(removed, 120, "m2's tensors (its header blob is m1's): {gc}");
    assert_eq!(gc["pack"]["dropped"].as_u64().unwrap(), removed, "{gc}");
    assert!(gc["freed_bytes"].as_u64().unwrap() > 0, "{gc}");
    assert_eq!(objects(&env), all - removed);
    env.coin(&["fsck"]).success();
    env.coin(&["checkout", &id1, "--output", "o1"]).success();
    assert_eq!(
        std::fs::read(env.path("o1/adapter_model.safetensors")).unwrap(),
        std::fs::read(env.path("m1/adapter_model.safetensors")).unwrap()
    );
    let e = env.coin(&["checkout", &id2, "--output", "o2"]);
    assert_ne!(e.code, 0, "the dropped checkpoint cannot be rebuilt");
}

#[test]
fn fsck_names_a_damaged_pack() {
    let env = setup();
    many_small_tensors(&env, "m1", 120, 1.0);
    commit(&env, &["m1", "--task", "A"]);
    env.coin(&["gc"]).success();
    let pack_dir = env.path(".coin/objects/pack");
    let pack = std::fs::read_dir(&pack_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();
    let mut perms = std::fs::metadata(&pack).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&pack, perms).unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x04;
    std::fs::write(&pack, bytes).unwrap();
    let out = env.coin(&["fsck", "--json"]).code(1);
    let report = out.json();
    let problems = report["problems"].as_array().unwrap();
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["kind"] == "pack" && p["object"].as_str().unwrap().contains(name)),
        "{report}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p["kind"] == "object" && p["message"].as_str().unwrap().contains(name)),
        "the damaged object names its pack: {report}"
    );
}
