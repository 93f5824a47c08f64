//! End-to-end tests of the S3 object remote against a real S3-compatible server (moto's
//! `moto_server`, from PyPI) started on 127.0.0.1 by each test: push, clone, pull,
//! multipart uploads, `fsck --remote`, an interrupted push, the server stopping mid-push,
//! a corrupted object on the server, wrong credentials, a missing bucket, no server.
//!
//! Without `moto_server` on PATH the tests say so loudly and pass, except in CI (`CI=true` or
//! `COIN_REQUIRE_S3=1`), where its absence fails them: .ci/run installs it.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{assert_same_tree_except, run, st, Output, TestEnvironment};

const BUCKET: &str = "coin-test";

/// A moto S3 server on a free loopback port, killed on drop.
struct S3Server {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

impl S3Server {
    /// Start a server (`auth`: refuse unknown credentials, as real S3 does); `None` when
    /// `moto_server` is not installed and this is not CI.
    fn start(auth: bool) -> Option<S3Server> {
        let found = Command::new("moto_server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let required = std::env::var("COIN_REQUIRE_S3").is_ok_and(|v| v == "1")
                || std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !required,
                "moto_server is not installed (pip install 'moto[server]'), and CI or \
                 COIN_REQUIRE_S3=1 requires the S3 tests"
            );
            eprintln!(
                "\n*** SKIPPED: the S3 remote tests need moto_server on PATH \
                 (pip install 'moto[server]'); set COIN_REQUIRE_S3=1 to make this a failure ***\n"
            );
            return None;
        }
        let port = free_port();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if auth {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        let child = cmd.spawn().expect("start moto_server");
        let server = S3Server { child, port };
        assert!(wait_for_port(port), "moto_server did not start on {port}");
        Some(server)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Write `body` to key `path` (`BUCKET/KEY`) behind coin's back, with boto3 (a
    /// dependency of moto, so it is there wherever moto_server is).
    fn raw_put(&self, path: &str, body: &[u8]) {
        let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), body).unwrap();
        let script = "import sys, boto3\n\
            c = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', \
            aws_access_key_id='k', aws_secret_access_key='s')\n\
            c.create_bucket(Bucket=sys.argv[2]) if not sys.argv[3] else \
            c.put_object(Bucket=sys.argv[2], Key=sys.argv[3], Body=open(sys.argv[4], 'rb').read())\n\
            print('ok')";
        let out = run(Command::new("python3")
            .args(["-c", script, &self.endpoint(), bucket, key])
            .arg(file.path()));
        assert_eq!(out.stdout.trim(), "ok", "PUT {path}: {}", out.stderr);
    }

    fn make_bucket(&self, name: &str) {
        self.raw_put(name, b"");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of the server that can "stop the server": past `limit` bytes sent
/// upstream (or when told) it cuts every connection and refuses new ones until resumed.
struct Proxy {
    port: u16,
    stopped: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    limit: Arc<AtomicU64>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stopped = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let limit = Arc::new(AtomicU64::new(u64::MAX));
        let (s, n, l) = (stopped.clone(), sent.clone(), limit.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if s.load(Ordering::SeqCst) {
                    drop(client); // refused: the "server" is down
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (s_up, n_up, l_up) = (s.clone(), n.clone(), l.clone());
                // client → server, counted; cut past the limit.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (client, server);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        if s_up.load(Ordering::SeqCst) {
                            break;
                        }
                        let k = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => k,
                        };
                        let total = n_up.fetch_add(k as u64, Ordering::SeqCst) + k as u64;
                        if total > l_up.load(Ordering::SeqCst) {
                            s_up.store(true, Ordering::SeqCst);
                            break;
                        }
                        if to.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
                // server → client.
                let s_down = s.clone();
                std::thread::spawn(move || {
                    let (mut from, mut to) = (s2, c2);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let k = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => k,
                        };
                        if s_down.load(Ordering::SeqCst) || to.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy {
            port,
            stopped,
            sent,
            limit,
        }
    }

    /// Stop after `bytes` more bytes go upstream.
    fn stop_after(&self, bytes: u64) {
        self.limit
            .store(self.sent.load(Ordering::SeqCst) + bytes, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.limit.store(u64::MAX, Ordering::SeqCst);
        self.stopped.store(false, Ordering::SeqCst);
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// `coin ARGS` in `dir` with S3 settings for `endpoint` (quick retries, 5 MiB parts).
fn coin_s3(env: &TestEnvironment, dir: &Path, endpoint: &str, args: &[&str]) -> Output {
    run(s3_env(env.coin_cmd(dir), endpoint, "test-key").args(args))
}

fn s3_env(mut cmd: Command, endpoint: &str, key: &str) -> Command {
    cmd.env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("COIN_OBJECT_RETRIES", "1")
        .env("COIN_OBJECT_RETRY_TIMEOUT", "3")
        .env("COIN_OBJECT_PART_SIZE", (5u64 << 20).to_string());
    cmd
}

/// A checkpoint folder with one `n`-float tensor (values from `seed`) and a config file.
fn big_checkpoint(env: &TestEnvironment, name: &str, n: usize, seed: f32) -> PathBuf {
    let values: Vec<f32> = (0..n).map(|i| seed + i as f32 * 1e-3).collect();
    let bytes = st::safetensors(&[
        st::T::f32("w.lora_A", &[n as u64], &values),
        st::T::f32("b", &[4], &[seed, 1.0, 2.0, 3.0]),
    ]);
    env.write(format!("{name}/adapter_model.safetensors"), bytes);
    env.write(
        format!("{name}/adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4}"#,
    );
    env.path(name)
}

/// Repository `a` with `stages` checkpoints of `n`-float tensors, and a bare git repository
/// `shared.git` added as `origin` with its objects at s3://BUCKET/PREFIX.
fn setup(env: &TestEnvironment, stages: usize, n: usize, prefix: &str) -> (PathBuf, Vec<String>) {
    env.coin(&["init", "a"]).success();
    let a = env.path("a");
    let mut ids = Vec::new();
    for i in 0..stages {
        let dir = big_checkpoint(env, &format!("ck{i}"), n, i as f32);
        let out = env
            .coin_in(
                &a,
                &["commit", dir.to_str().unwrap(), "--task", &format!("T{i}")],
            )
            .success();
        ids.push(out.stdout.trim().to_string());
    }
    env.git_in(&env.work(), &["init", "-q", "--bare", "shared.git"])
        .success();
    let objects = format!("s3://{BUCKET}/{prefix}");
    env.coin_in(
        &a,
        &[
            "remote",
            "add",
            "origin",
            "../shared.git",
            "--objects",
            &objects,
        ],
    )
    .success();
    (a, ids)
}

fn remote_refs(env: &TestEnvironment) -> String {
    env.git_in(&env.path("shared.git"), &["for-each-ref", "refs/coin"])
        .success()
        .stdout
}

#[test]
fn s3_push_clone_fsck_and_pull_with_multipart() {
    let Some(server) = S3Server::start(false) else {
        return;
    };
    server.make_bucket(BUCKET);
    let env = TestEnvironment::new();
    let ep = server.endpoint();
    // 6 Mi floats = 24 MiB: above 4 parts of 5 MiB, so a multipart upload.
    let (a, ids) = setup(&env, 2, 6 << 20, "team/study");
    let push = coin_s3(&env, &a, &ep, &["push", "--json"]).success().json();
    assert_eq!(push["checkpoints"], 2);
    let objects = push["objects"]["objects"].as_u64().unwrap();
    assert_eq!(push["objects"]["transferred"].as_u64().unwrap(), objects);
    assert!(push["objects"]["bytes"].as_u64().unwrap() > 2 * (24 << 20));
    assert!(remote_refs(&env).contains("refs/coin/heads/main"));
    // Only missing objects move.
    let again = coin_s3(&env, &a, &ep, &["push", "--json"]).success().json();
    assert_eq!(again["objects"]["transferred"], 0);
    // Everything there hashes right; quick mode agrees.
    let fsck = coin_s3(&env, &a, &ep, &["fsck", "--remote", "origin", "--json"])
        .success()
        .json();
    assert_eq!(fsck["objects"].as_u64().unwrap(), objects);
    assert_eq!(fsck["ok"].as_u64().unwrap(), objects);
    assert!(fsck["bytes"].as_u64().unwrap() > 2 * (24 << 20));
    let quick = coin_s3(&env, &a, &ep, &["fsck", "--remote", "origin", "--quick"]).success();
    assert!(quick.stderr.contains("no problems"), "{}", quick.stderr);
    // A clone of the git half finds the objects through the remote's git config.
    coin_s3(&env, &env.work(), &ep, &["clone", "shared.git", "b"]).success();
    let b = env.path("b");
    env.coin_in(&b, &["fsck"]).success();
    let out = b.join("o");
    env.coin_in(
        &b,
        &["checkout", &ids[1], "--output", out.to_str().unwrap()],
    )
    .success();
    assert_same_tree_except(&env.path("ck1"), &out, &[".coin-checkpoint"]);
    // A new checkpoint in a, pushed, then pulled into b: only its new objects move.
    let dir = big_checkpoint(&env, "ck2", 1000, 9.0);
    env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T2"])
        .success();
    let push = coin_s3(&env, &a, &ep, &["push", "--json"]).success().json();
    let sent = push["objects"]["transferred"].as_u64().unwrap();
    assert!(sent >= 2 && sent < objects, "{push}");
    let pull = coin_s3(&env, &b, &ep, &["pull", "--json"]).success().json();
    assert_eq!(pull["update"], "fast-forward", "{pull}");
    assert_eq!(
        pull["fetch"]["objects"]["transferred"].as_u64().unwrap(),
        sent
    );
    env.coin_in(&b, &["fsck"]).success();
}

#[test]
fn s3_interrupted_push_and_a_server_stopped_mid_push_resume() {
    let Some(server) = S3Server::start(false) else {
        return;
    };
    server.make_bucket(BUCKET);
    let env = TestEnvironment::new();
    let proxy = Proxy::start(server.port);
    let ep = proxy.endpoint();
    // 5 checkpoints of 1 MiB tensors.
    let (a, _ids) = setup(&env, 5, 1 << 18, "p");
    // Killed (like kill -9) after the second object arrived: no ref moves.
    let out = run(s3_env(env.coin_cmd(&a), &ep, "k")
        .env("COIN_FAULT", "transfer.after_object:2")
        .args(["push"]));
    assert_ne!(out.code, 0, "the push must have been killed");
    assert!(remote_refs(&env).trim().is_empty(), "{}", remote_refs(&env));
    // The server stops after one and a half more large objects' bytes.
    proxy.stop_after((1 << 20) + (1 << 19));
    let out = coin_s3(&env, &a, &ep, &["push"]);
    assert_ne!(out.code, 0, "the push must fail when the server stops");
    assert!(
        out.stderr.contains("could not") && out.stderr.contains("objects already sent are skipped"),
        "{}",
        out.stderr
    );
    assert!(
        remote_refs(&env).trim().is_empty(),
        "no ref may move: {}",
        remote_refs(&env)
    );
    // The server is back: the repeat run completes and skips what arrived.
    proxy.resume();
    let push = coin_s3(&env, &a, &ep, &["push", "--json"]).success().json();
    let o = &push["objects"];
    let present = o["already_present"].as_u64().unwrap();
    assert!(present >= 3, "what arrived before must be skipped: {push}");
    assert_eq!(
        o["transferred"].as_u64().unwrap() + present,
        o["objects"].as_u64().unwrap()
    );
    assert!(remote_refs(&env).contains("refs/coin/heads/main"));
    coin_s3(&env, &a, &ep, &["fsck", "--remote", "origin"]).success();
}

#[test]
fn s3_corrupt_object_is_named_by_fsck_and_never_becomes_visible() {
    let Some(server) = S3Server::start(false) else {
        return;
    };
    server.make_bucket(BUCKET);
    let env = TestEnvironment::new();
    let ep = server.endpoint();
    let (a, _ids) = setup(&env, 1, 1000, "c");
    coin_s3(&env, &a, &ep, &["push"]).success();
    // The 1000-float tensor's object: the only one above 4000 bytes.
    let store = a.join(".coin/objects");
    let mut victim = None;
    for d in std::fs::read_dir(&store).unwrap().flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if name.len() != 2 {
            continue;
        }
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let hex = format!("{name}{}", f.file_name().to_string_lossy());
            let len = f.metadata().unwrap().len();
            if len > 4000 && victim.is_none() {
                victim = Some((hex, f.path()));
            }
        }
    }
    let (hex, path) = victim.expect("a tensor object");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // same size, wrong content
    server.raw_put(
        &format!("{BUCKET}/c/objects/{}/{}", &hex[..2], &hex[2..]),
        &bytes,
    );
    let out = coin_s3(&env, &a, &ep, &["fsck", "--remote", "origin"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("corrupt {hex}")),
        "fsck --remote must name it: {}",
        out.stdout
    );
    // Quick mode checks sizes only: same size passes; a truncated object does not.
    coin_s3(&env, &a, &ep, &["fsck", "--remote", "origin", "--quick"]).success();
    server.raw_put(
        &format!("{BUCKET}/c/objects/{}/{}", &hex[..2], &hex[2..]),
        &bytes[..last],
    );
    let out = coin_s3(&env, &a, &ep, &["fsck", "--remote", "origin", "--quick"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains(&hex), "{}", out.stdout);
    // A clone refuses it, names it, and nothing corrupt (nor the ref) becomes visible.
    let out = coin_s3(&env, &env.work(), &ep, &["clone", "shared.git", "b"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains(&hex), "{}", out.stderr);
    let b = env.path("b");
    assert!(!b
        .join(".coin/objects")
        .join(&hex[..2])
        .join(&hex[2..])
        .exists());
    let heads = env
        .git_in(
            &b,
            &["for-each-ref", "refs/coin/heads", "refs/coin/remotes"],
        )
        .success()
        .stdout;
    assert!(heads.trim().is_empty(), "{heads}");
    env.coin_in(&b, &["fsck"]).success();
}

#[test]
fn s3_wrong_credentials_missing_bucket_and_no_server_are_clear_errors() {
    let Some(server) = S3Server::start(true) else {
        return;
    };
    let env = TestEnvironment::new();
    let (a, _ids) = setup(&env, 1, 100, "x");
    // The authenticating server knows no keys: every key is wrong.
    let out = coin_s3(&env, &a, &server.endpoint(), &["push"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("InvalidAccessKeyId"), "{}", out.stderr);
    assert!(out.stderr.contains("AWS_ACCESS_KEY_ID"), "{}", out.stderr);
    assert!(remote_refs(&env).trim().is_empty());
    drop(server);
    // A bucket that does not exist.
    let Some(open) = S3Server::start(false) else {
        return;
    };
    let out = coin_s3(&env, &a, &open.endpoint(), &["push"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("NoSuchBucket"), "{}", out.stderr);
    assert!(out.stderr.contains("Create the bucket"), "{}", out.stderr);
    // No server at all.
    let port = free_port();
    let out = coin_s3(&env, &a, &format!("http://127.0.0.1:{port}"), &["push"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("Check that the server is up"),
        "{}",
        out.stderr
    );
    assert!(remote_refs(&env).trim().is_empty());
    // And the git half must be given: an s3:// URL alone is refused with the way to do it.
    let out = env.coin_in(&a, &["remote", "add", "other", "s3://b/p"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("--objects s3://b/p"), "{}", out.stderr);
}
