//! The end-to-end test harness: runs the real `coin` binary in a hermetic temp environment.
#![allow(dead_code, clippy::disallowed_methods)]

pub mod st;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A temporary HOME and working directory, a fixed clock, author and git configuration.
pub struct TestEnvironment {
    pub tmp: tempfile::TempDir,
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

impl Output {
    /// Panic with both streams unless the command exited 0.
    pub fn success(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    /// Panic unless the command exited with `code`.
    pub fn code(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "unexpected exit\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

impl Default for TestEnvironment {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnvironment {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("coin-test-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(tmp.path().join("home")).expect("home");
        std::fs::create_dir_all(tmp.path().join("work")).expect("work");
        TestEnvironment { tmp }
    }

    /// The directory commands run in by default.
    pub fn work(&self) -> PathBuf {
        self.tmp.path().join("work")
    }

    /// A path under the work directory.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.work().join(rel)
    }

    /// A `coin` command with a hermetic environment, run in `dir`.
    pub fn coin_cmd(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coin"));
        self.hermetic(&mut cmd);
        cmd.current_dir(dir);
        cmd
    }

    /// A `git` command with the same environment, run in `dir`.
    pub fn git_cmd(&self, dir: &Path) -> Command {
        let mut cmd = Command::new("git");
        self.hermetic(&mut cmd);
        cmd.current_dir(dir);
        cmd
    }

    fn hermetic(&self, cmd: &mut Command) {
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.env("HOME", self.tmp.path().join("home"))
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "Test User")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "Test User")
            .env("GIT_COMMITTER_EMAIL", "test@example.com")
            .env("GIT_AUTHOR_DATE", "2001-02-03T04:05:06+00:00")
            .env("GIT_COMMITTER_DATE", "2001-02-03T04:05:06+00:00")
            .env("COIN_TEST_TIMESTAMP", "2001-02-03T04:05:06+00:00")
            .env("NO_COLOR", "1");
    }

    /// Run `coin ARGS` in the work directory.
    pub fn coin(&self, args: &[&str]) -> Output {
        self.coin_in(&self.work(), args)
    }

    /// Run `coin ARGS` in `dir`.
    pub fn coin_in(&self, dir: &Path, args: &[&str]) -> Output {
        run(self.coin_cmd(dir).args(args))
    }

    /// Run `git ARGS` in `dir`.
    pub fn git_in(&self, dir: &Path, args: &[&str]) -> Output {
        run(self.git_cmd(dir).args(args))
    }

    /// `text` with this environment's temporary directory (as created and as the OS resolves
    /// it) replaced by `$TEST_ENV`, so that snapshots do not depend on where it was made.
    pub fn normalize(&self, text: &str) -> String {
        let mut out = text.to_string();
        let raw = self.tmp.path().to_path_buf();
        let canonical = raw.canonicalize().unwrap_or_else(|_| raw.clone());
        // The longer spelling first, in case one is a prefix of the other.
        let mut spellings = vec![canonical, raw];
        spellings.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in spellings {
            out = out.replace(&*p.to_string_lossy(), "$TEST_ENV");
        }
        out
    }

    /// What a command printed, for a snapshot: stdout, then stderr after a marker line (when
    /// there is any), then the exit status (when it is not 0); temporary paths normalised.
    pub fn render(&self, out: &Output) -> String {
        let mut text = self.normalize(&out.stdout);
        if !out.stderr.is_empty() {
            text.push_str("------- stderr -------\n");
            text.push_str(&self.normalize(&out.stderr));
        }
        if out.code != 0 {
            text.push_str(&format!("[exit status: {}]\n", out.code));
        }
        text
    }

    /// Run `coin ARGS` in the work directory and [`render`](Self::render) what it printed.
    pub fn coin_render(&self, args: &[&str]) -> String {
        self.render(&self.coin(args))
    }

    /// Run `coin ARGS` in `dir` and [`render`](Self::render) what it printed.
    pub fn coin_render_in(&self, dir: &Path, args: &[&str]) -> String {
        self.render(&self.coin_in(dir, args))
    }

    /// A PEFT LoRA adapter folder `name/` under the work directory: `adapter_model.safetensors`
    /// ([`st::adapter`], its values shifted by `shift`) and `adapter_config.json`.
    pub fn adapter(&self, name: &str, shift: f32) -> PathBuf {
        self.write(
            format!("{name}/adapter_model.safetensors"),
            st::adapter(shift),
        );
        self.write(
            format!("{name}/adapter_config.json"),
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8}"#,
        );
        self.path(name)
    }

    /// [`TestEnvironment::adapter`] plus a nested non-tensor file, `extra/README.md`.
    pub fn adapter_with_readme(&self, name: &str, shift: f32) -> PathBuf {
        self.write(
            format!("{name}/extra/README.md"),
            format!("adapter {name}\n"),
        );
        self.adapter(name, shift)
    }

    /// A repository with the tiny model (`coin model init --tiny model`, then `model_flags`),
    /// CoIN-mini (`train`/`test` items per task) registered, and `.coin/config.toml` naming
    /// the tiny preset and model, followed by `extra_config` (TOML tables).
    pub fn tiny_and_mini(
        model_flags: &[&str],
        train: usize,
        test: usize,
        extra_config: &str,
    ) -> TestEnvironment {
        let env = TestEnvironment::new();
        env.coin(&["init"]).success();
        let mut model = vec!["model", "init", "--tiny", "model"];
        model.extend_from_slice(model_flags);
        env.coin(&model).success();
        let (train, test) = (train.to_string(), test.to_string());
        env.coin(&[
            "bench-data",
            "coin-mini",
            "--out",
            "mini",
            "--train",
            &train,
            "--test",
            &test,
        ])
        .success();
        env.coin(&["task", "add", "--coin-mini", "mini"]).success();
        let cfg = std::fs::read_to_string(env.path(".coin/config.toml")).expect("config");
        env.write(
            ".coin/config.toml",
            format!("{cfg}\n[model]\npreset = \"tiny\"\nbase = \"model\"\n\n{extra_config}"),
        );
        env
    }

    /// Two answer files in CoIN's `merge.jsonl` format for the questions of `questions` (a
    /// CoIN question file under the work directory): `<dir>/<task>.gold.jsonl` answers each
    /// with its `answer`, `<dir>/<task>.wrong.jsonl` with `zzzz`.
    pub fn answer_files(&self, task: &str, questions: &str, dir: &str) {
        let text = std::fs::read_to_string(self.path(questions)).expect("questions");
        let qs: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a JSON list");
        for (kind, wrong) in [("gold", false), ("wrong", true)] {
            let lines: String = qs
                .iter()
                .map(|q| {
                    let text = if wrong {
                        "zzzz"
                    } else {
                        q["answer"].as_str().expect("an answer")
                    };
                    format!(
                        "{}\n",
                        serde_json::json!({"question_id": q["question_id"], "prompt": q["text"],
                            "text": text, "answer_id": "a", "model_id": "m", "metadata": {}})
                    )
                })
                .collect();
            self.write(format!("{dir}/{task}.{kind}.jsonl"), lines);
        }
    }

    /// Write a file (creating parent directories) under the work directory.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, contents).expect("write");
        p
    }
}

/// Every file under `dir` (recursively), as paths relative to it, sorted; directories are not
/// listed, links are listed as files (their target is read).
pub fn tree_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for e in entries {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    files.sort();
    files
}

/// `a` and `b` hold the same files (same relative paths, nothing more on either side) with the
/// same bytes; `a` is not empty.
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_same_tree_except(a, b, &[]);
}

/// [`assert_same_tree`], except that `b` may also hold the files named in `extra_in_b` (paths
/// relative to `b`, e.g. coin's `.coin-checkpoint` stamp).
pub fn assert_same_tree_except(a: &Path, b: &Path, extra_in_b: &[&str]) {
    assert!(b.is_dir(), "{} is missing", b.display());
    let fa = tree_files(a);
    assert!(!fa.is_empty(), "{} is empty", a.display());
    let fb: Vec<PathBuf> = tree_files(b)
        .into_iter()
        .filter(|f| !extra_in_b.iter().any(|x| Path::new(x) == f))
        .collect();
    assert_eq!(
        fa,
        fb,
        "the files of {} (left) and {} (right) differ",
        a.display(),
        b.display()
    );
    for f in fa {
        assert!(
            std::fs::read(a.join(&f)).expect("read") == std::fs::read(b.join(&f)).expect("read"),
            "{} differs",
            f.display()
        );
    }
}

/// `text` with the seconds of a closing "… in 0.9 s." replaced by `[secs]` (wall time varies).
pub fn mask_seconds(text: &str) -> String {
    text.lines()
        .map(|line| {
            let masked = line.strip_suffix(" s.").and_then(|head| {
                let i = head.rfind(" in ")?;
                head[i + 4..]
                    .parse::<f64>()
                    .ok()
                    .map(|_| format!("{} in [secs] s.", &head[..i]))
            });
            masked.unwrap_or_else(|| line.to_string()) + "\n"
        })
        .collect()
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    }
}

#[test]
fn same_tree_sees_missing_extra_and_changed_files_on_either_side() {
    let t = tempfile::tempdir().expect("tmp");
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d.join("sub")).expect("mkdir");
        std::fs::write(d.join("x"), "1").expect("w");
        std::fs::write(d.join("sub/y"), "2").expect("w");
    }
    assert_same_tree(&a, &b);
    let fails = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    std::fs::write(b.join("sub/extra"), "3").expect("w");
    assert!(fails(&|| assert_same_tree(&a, &b)), "an extra file in b");
    assert!(fails(&|| assert_same_tree(&b, &a)), "a file missing from b");
    assert_same_tree_except(&a, &b, &["sub/extra"]);
    std::fs::remove_file(b.join("sub/extra")).expect("rm");
    std::fs::write(b.join("sub/y"), "changed").expect("w");
    assert!(fails(&|| assert_same_tree(&a, &b)), "changed bytes");
    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    assert!(
        fails(&|| assert_same_tree(&empty, &empty)),
        "nothing compared"
    );
}

/// Read one HTTP request from a loopback test server and return its JSON body (the header,
/// then the body by its Content-Length).
pub fn read_http_json_body(s: &mut std::net::TcpStream) -> serde_json::Value {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp).expect("read the request");
        assert!(n > 0, "connection closed early");
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .expect("a Content-Length header")
                .trim()
                .parse()
                .expect("a numeric Content-Length");
            while buf.len() < end + 4 + len {
                let n = s.read(&mut tmp).expect("read the request");
                buf.extend_from_slice(&tmp[..n]);
            }
            return serde_json::from_slice(&buf[end + 4..end + 4 + len]).expect("a JSON body");
        }
    }
}
