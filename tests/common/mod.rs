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

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    }
}
