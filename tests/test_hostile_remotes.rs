//! End-to-end tests of what a hostile or broken shared repository can do to its receiver
//! (docs/security.md): checkpoints forged with plain git (a `.git/` path, a clashing or
//! mis-sized manifest, a symlink in the tree), branches named like checkpoint ids, notes naming
//! missing objects, refs moved by plain git without their objects, stale locks and killed
//! writers. Each builds the hostile input with real git and checks the refusal through commit,
//! push, fetch/clone, fsck and checkout.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::{Output, TestEnvironment};

const FSMONITOR: &str = "[core]\n\tfsmonitor = touch pwned\n";

/// `git ARGS` in `dir` with `input` on stdin; the trimmed stdout.
fn git_stdin(env: &TestEnvironment, dir: &Path, args: &[&str], input: &str) -> String {
    let mut child = env
        .git_cmd(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn git_out(env: &TestEnvironment, dir: &Path, args: &[&str]) -> String {
    env.git_in(dir, args).success().stdout.trim().to_string()
}

/// A repository `a` with one honest checkpoint holding a file `config` whose content is a git
/// configuration that runs a command; returns (repo, checkpoint id).
fn honest_repo(env: &TestEnvironment) -> (PathBuf, String) {
    env.coin(&["init", "a"]).success();
    let a = env.path("a");
    let dir = env.adapter("ad", 0.0);
    env.write("ad/config", FSMONITOR);
    let id = env
        .coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T1"])
        .success()
        .stdout
        .trim()
        .to_string();
    (a, id)
}

/// Forge, with plain git, a child of checkpoint `parent` whose manifest is `edit(manifest of
/// parent)` and whose tree gets `extra` lines (`mode type id\tname`); the branch `main` is
/// moved to it. Returns the forged commit id.
fn forge(
    env: &TestEnvironment,
    repo: &Path,
    parent: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    extra: &[String],
) -> String {
    let text = git_out(env, repo, &["show", &format!("{parent}:manifest")]);
    let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut manifest);
    let blob = git_stdin(
        env,
        repo,
        &["hash-object", "-w", "--stdin"],
        &serde_json::to_string_pretty(&manifest).unwrap(),
    );
    let train = git_out(env, repo, &["rev-parse", &format!("{parent}:train")]);
    let mut lines = vec![
        format!("100644 blob {blob}\tmanifest"),
        format!("100644 blob {train}\ttrain"),
    ];
    lines.extend(extra.iter().cloned());
    let tree = git_stdin(env, repo, &["mktree"], &(lines.join("\n") + "\n"));
    let commit = git_out(
        env,
        repo,
        &["commit-tree", &tree, "-p", parent, "-m", "T2: forged"],
    );
    git_out(env, repo, &["update-ref", "refs/coin/heads/main", &commit]);
    commit
}

/// Copy every store object of `from`'s `.coin/` into the bare remote's `coin/` store, the way
/// an attacker with write access to the shared disk would.
fn copy_store(from: &Path, to_store: &Path) {
    let src = from.join(".coin/objects");
    for d in std::fs::read_dir(&src).unwrap().flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if name.len() != 2 {
            continue;
        }
        std::fs::create_dir_all(to_store.join("objects").join(&name)).unwrap();
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let dest = to_store.join("objects").join(&name).join(f.file_name());
            if !dest.exists() {
                std::fs::copy(f.path(), dest).unwrap();
            }
        }
    }
}

/// A bare remote `r.git` holding `repo`'s coin refs, pushed with plain git (bypassing every
/// check coin push makes), plus a copy of its objects.
fn plain_git_remote(env: &TestEnvironment, repo: &Path) -> PathBuf {
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    let r = env.path("r.git");
    env.git_in(
        repo,
        &[
            "push",
            "-q",
            "--no-verify",
            r.to_str().unwrap(),
            "refs/coin/*:refs/coin/*",
        ],
    )
    .success();
    // coin push made the store layout once; recreate it as a coin remote has it.
    env.coin_in(&env.work(), &["init", "seed"]).success();
    std::fs::create_dir_all(r.join("coin/objects/tmp")).unwrap();
    std::fs::create_dir_all(r.join("coin/store")).unwrap();
    std::fs::copy(
        env.path("seed/.coin/format-version"),
        r.join("coin/format-version"),
    )
    .unwrap();
    std::fs::copy(env.path("seed/.coin/store/type"), r.join("coin/store/type")).unwrap();
    copy_store(repo, &r.join("coin"));
    r
}

/// A refusal of the user's input: exit 1, and stderr names what is wrong.
fn assert_refused(out: &Output, needle: &str) {
    assert_refused_with(out, 1, needle);
}

/// A refusal of damaged or forged repository data: exit 255 (docs/cli.md), stderr names it.
fn assert_damage_refused(out: &Output, needle: &str) {
    assert_refused_with(out, 255, needle);
}

fn assert_refused_with(out: &Output, code: i32, needle: &str) {
    assert_eq!(
        out.code, code,
        "expected a refusal\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stderr.contains(needle),
        "stderr lacks {needle:?}:\n{}",
        out.stderr
    );
}

#[test]
fn a_checkpoint_with_a_git_directory_is_refused_everywhere() {
    let env = TestEnvironment::new();
    // Commit: a folder holding .git/ is refused, in any spelling.
    env.coin(&["init", "a"]).success();
    let a = env.path("a");
    let dir = env.adapter("evil", 0.0);
    for spelling in [".git", ".GIT", ".git.", "git~1"] {
        env.write(format!("evil/{spelling}/config"), FSMONITOR);
        let out = env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T"]);
        assert_refused(&out, ".git");
        std::fs::remove_dir_all(env.path(format!("evil/{spelling}"))).unwrap();
    }

    // A checkpoint forged with plain git that names .git/config.
    let env = TestEnvironment::new();
    let (a, honest) = honest_repo(&env);
    let forged = forge(
        &env,
        &a,
        &honest,
        |m| {
            let entry = m["files"]["config"].clone();
            m["files"][".git/config"] = entry;
        },
        &[],
    );
    // Here: fsck reports it; checkout writes nothing; push refuses to send it.
    let out = env.coin_in(&a, &["fsck"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains(".git"), "{}", out.stdout);
    let out = env.coin_in(&a, &["checkout", &forged, "--output", "../out"]);
    assert_damage_refused(&out, ".git");
    assert!(!env.path("out").exists(), "nothing may be written");
    env.git_in(&env.work(), &["init", "-q", "--bare", "pushed.git"])
        .success();
    let out = env.coin_in(
        &a,
        &["push", env.path("pushed.git").to_str().unwrap(), "main"],
    );
    assert_damage_refused(&out, ".git");

    // There: a remote filled with plain git. Clone takes nothing of the forged branch, says
    // why, and leaves a repository fsck calls clean; the honest history is still readable.
    let r = plain_git_remote(&env, &a);
    let out = env.coin(&["clone", r.to_str().unwrap(), "b"]).success();
    assert!(out.stderr.contains("not taken"), "{}", out.stderr);
    assert!(out.stderr.contains(".git"), "{}", out.stderr);
    let b = env.path("b");
    env.coin_in(&b, &["fsck"]).success();
    // No ref names it; its git objects may sit unreferenced in the clone (fetched before the
    // check), and reading it is refused like any damaged checkpoint.
    let refs = git_out(&env, &b, &["for-each-ref", "--format=%(objectname)"]);
    assert!(!refs.contains(&forged), "a ref names the forged checkpoint");
    let out = env.coin_in(&b, &["show", &forged]);
    assert_ne!(out.code, 0, "the forged checkpoint must not be shown");
    assert!(!b.join(".git/pwned").exists());
    // A plain `git fetch` of the forged refs gets the commits; checkout still refuses.
    env.git_in(
        &b,
        &[
            "fetch",
            "-q",
            "origin",
            "+refs/coin/heads/*:refs/coin/heads/*",
        ],
    )
    .success();
    let out = env.coin_in(&b, &["checkout", &forged, "--output", "out"]);
    assert_damage_refused(&out, ".git");
    assert!(!b.join("out").exists());
    // And a git status in every folder coin wrote runs nothing.
    assert!(!env.path("pwned").exists() && !b.join("pwned").exists());
}

#[test]
fn pointer_files_cannot_target_the_git_directory() {
    let env = TestEnvironment::new();
    env.git_in(&env.work(), &["init", "-q", "-b", "main", "code"])
        .success();
    let code = env.path("code");
    env.coin_in(&code, &["init"]).success();
    let dir = env.adapter("ad", 0.0);
    let id = env
        .coin_in(&code, &["commit", dir.to_str().unwrap(), "--task", "T"])
        .success()
        .stdout
        .trim()
        .to_string();
    for output in [".git/hooks", ".GIT/x", "a/.git"] {
        env.write(
            "code/adapter.coin",
            format!("checkpoint = \"{id}\"\noutput = \"{output}\"\n"),
        );
        env.git_in(&code, &["add", "adapter.coin"]).success();
        let out = env.git_in(&code, &["commit", "-q", "-m", "pointer"]);
        assert_ne!(out.code, 0, "pre-commit must refuse {output}");
        assert!(out.stderr.contains(".git"), "{}", out.stderr);
    }
    assert!(!code.join(".git/hooks/adapter_config.json").exists());
}

#[test]
fn branches_named_like_ids_are_refused_and_never_shadow_a_checkpoint() {
    let env = TestEnvironment::new();
    let (a, first) = honest_repo(&env);
    let dir = env.adapter("ad2", 1.0);
    let second = env
        .coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T2"])
        .success()
        .stdout
        .trim()
        .to_string();
    // Creating one is refused: full id, short id, a remote's name, a ref namespace.
    env.coin_in(&a, &["remote", "add", "origin", "../elsewhere.git"])
        .success();
    for name in [
        first.as_str(),
        &first[..12],
        "origin/main",
        "refs/coin/heads/x",
        "tags/v1",
    ] {
        let out = env.coin_in(&a, &["branch", name, "main"]);
        assert_refused(&out, "not a valid branch name");
        let out = env.coin_in(&a, &["tag", name, "main"]);
        assert_refused(&out, "not a valid tag name");
    }
    // Made with plain git anyway: the id no longer silently means the branch.
    git_out(
        &env,
        &a,
        &["update-ref", &format!("refs/coin/heads/{first}"), &second],
    );
    git_out(
        &env,
        &a,
        &[
            "update-ref",
            &format!("refs/coin/heads/{}", &first[..12]),
            &second,
        ],
    );
    for rev in [first.as_str(), &first[..12]] {
        let out = env.coin_in(&a, &["show", rev]);
        assert_refused(&out, "ambiguous");
        assert!(out.stderr.contains(&first[..12]), "{}", out.stderr);
        assert!(out.stderr.contains(&second[..12]), "{}", out.stderr);
    }
    // A clone does not bring such branches in, and the id means the checkpoint there.
    let r = plain_git_remote(&env, &a);
    let out = env.coin(&["clone", r.to_str().unwrap(), "b"]).success();
    assert!(
        out.stderr.contains("looks like a checkpoint id"),
        "{}",
        out.stderr
    );
    let b = env.path("b");
    let shown = env
        .coin_in(&b, &["show", &first, "--json"])
        .success()
        .json();
    assert_eq!(shown["id"], serde_json::json!(first));
    let branches = git_out(
        &env,
        &b,
        &["for-each-ref", "refs/coin/heads", "--format=%(refname)"],
    );
    assert_eq!(branches, "refs/coin/heads/main");
}

/// `a` pushed with coin to a bare `r.git`; `b` a clone made with plain git whose coin refs came
/// by a plain `git fetch`, then `coin init`: the commits are there, the objects are not.
fn plain_git_clone_of_a_push(env: &TestEnvironment, a: &Path) -> PathBuf {
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    env.coin_in(a, &["push", env.path("r.git").to_str().unwrap(), "main"])
        .success();
    env.git_in(&env.work(), &["clone", "-q", "r.git", "b"])
        .success();
    let b = env.path("b");
    env.git_in(&b, &["fetch", "-q", "origin", "refs/coin/*:refs/coin/*"])
        .success();
    env.coin_in(&b, &["init", "."]).success();
    b
}

#[test]
fn objects_of_refs_moved_by_plain_git_are_fetched() {
    let env = TestEnvironment::new();
    let (a, first) = honest_repo(&env);
    let dir = env.adapter("ad2", 1.0);
    env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T2"])
        .success();
    let b = plain_git_clone_of_a_push(&env, &a);
    let out = env.coin_in(&b, &["fsck"]);
    assert_eq!(out.code, 1, "objects are missing before the fetch");
    assert!(out.stdout.contains("missing-object"), "{}", out.stdout);
    let out = env.coin_in(&b, &["fetch", "origin", "--json"]).success();
    let report = out.json();
    assert!(
        report["objects"]["transferred"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["missing"], serde_json::json!([]));
    env.coin_in(&b, &["fsck"]).success();
    env.coin_in(&b, &["checkout", &first, "--output", "out"])
        .success();
    // Objects neither side has are named, not silently skipped.
    let env2 = TestEnvironment::new();
    let (a2, _) = honest_repo(&env2);
    let b2 = plain_git_clone_of_a_push(&env2, &a2);
    std::fs::remove_dir_all(env2.path("r.git/coin/objects")).unwrap();
    std::fs::create_dir_all(env2.path("r.git/coin/objects/tmp")).unwrap();
    let out = env2.coin_in(&b2, &["fetch", "origin"]).success();
    assert!(out.stderr.contains("neither here nor on"), "{}", out.stderr);
}

/// The object file names (`ab/cdef…`) of a store folder.
fn object_names(store: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for d in std::fs::read_dir(store.join("objects")).unwrap().flatten() {
        let fan = d.file_name().to_string_lossy().into_owned();
        if fan.len() != 2 {
            continue;
        }
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            out.insert(format!("{fan}/{}", f.file_name().to_string_lossy()));
        }
    }
    out
}

#[test]
fn push_sends_what_a_remote_moved_by_plain_git_lacks() {
    let env = TestEnvironment::new();
    let (a, _) = honest_repo(&env);
    let dir = env.adapter("ad2", 1.0);
    env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T2"])
        .success();
    // The remote's refs came by plain git; its store lost every object.
    let r = plain_git_remote(&env, &a);
    std::fs::remove_dir_all(r.join("coin/objects")).unwrap();
    std::fs::create_dir_all(r.join("coin/objects/tmp")).unwrap();
    let dir3 = env.adapter("ad3", 2.0);
    env.coin_in(&a, &["commit", dir3.to_str().unwrap(), "--task", "T3"])
        .success();
    env.coin_in(&a, &["push", r.to_str().unwrap(), "main"])
        .success();
    let here = object_names(&a.join(".coin"));
    let there = object_names(&r.join("coin"));
    assert_eq!(
        here.difference(&there).count(),
        0,
        "objects of checkpoints the remote already listed were not sent"
    );
    // And a clone of it is whole.
    env.coin(&["clone", r.to_str().unwrap(), "b"]).success();
    env.coin_in(&env.path("b"), &["fsck"]).success();
}

#[test]
fn records_naming_missing_objects_are_refused_and_bad_notes_can_be_dropped() {
    let env = TestEnvironment::new();
    let (a, id) = honest_repo(&env);
    let missing = "ab".repeat(32);
    for (body, needle) in [
        (
            format!(r#"{{"T1": {{"metric": "acc", "score": 50, "n": 10, "predictions": "{missing}"}}}}"#),
            "not in this repository's store",
        ),
        (
            r#"{"T1": {"metric": "acc", "score": 50, "n": 10, "predictions": "not-hex"}}"#
                .to_string(),
            "store object id",
        ),
        (
            r#"{"T1": {"metric": "acc", "score": 50, "n": 10}, "T1": {"metric": "acc", "score": 90, "n": 10}}"#
                .to_string(),
            "appears twice",
        ),
        (
            r#"{"T1": {"metric": "acc", "score": 100, "n": 0}}"#.to_string(),
            "at least one",
        ),
    ] {
        let f = env.write("rec.json", body);
        let out = env.coin_in(&a, &["eval", &id, "--record", f.to_str().unwrap()]);
        assert_refused(&out, needle);
    }
    env.coin_in(&a, &["fsck"]).success();
    // A bad note written with plain git: fsck fails and says how to recover; push refuses.
    let note = format!(
        r#"{{"schema": 1, "eval": {{"T1": {{"metric": "acc", "score": 50, "n": 10, "predictions": "{missing}"}}, "T2": {{"metric": "acc", "score": 40, "n": 10}}}}}}"#
    );
    env.git_in(
        &a,
        &[
            "notes",
            "--ref",
            "refs/notes/coin",
            "add",
            "-f",
            "-m",
            &note,
            &id,
        ],
    )
    .success();
    let out = env.coin_in(&a, &["fsck"]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("missing-object"), "{}", out.stdout);
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    let r = env.path("r.git");
    let out = env.coin_in(&a, &["push", r.to_str().unwrap(), "main"]);
    assert_eq!(out.code, 255, "{}", out.stderr);
    let out = env.coin_in(&a, &["fsck", "--drop-bad-notes"]).success();
    assert!(
        out.stderr.contains("Dropped the records of T1"),
        "{}",
        out.stderr
    );
    // The good record of the same note stays; the checkpoint id is unchanged.
    let shown = env.coin_in(&a, &["show", &id, "--json"]).success().json();
    assert_eq!(shown["id"], serde_json::json!(id));
    assert!(shown.to_string().contains("\"T2\""), "{shown}");
    assert!(!shown.to_string().contains(&missing), "{shown}");
    env.coin_in(&a, &["push", r.to_str().unwrap(), "main"])
        .success();
    // A note that does not even parse goes whole.
    env.git_in(
        &a,
        &[
            "notes",
            "--ref",
            "refs/notes/coin",
            "add",
            "-f",
            "-m",
            "{not json",
            &id,
        ],
    )
    .success();
    assert_eq!(env.coin_in(&a, &["fsck"]).code, 1);
    let out = env.coin_in(&a, &["fsck", "--drop-bad-notes"]).success();
    assert!(out.stderr.contains("Dropped the note"), "{}", out.stderr);
}

#[test]
fn links_in_a_committed_folder_are_refused() {
    let env = TestEnvironment::new();
    env.coin(&["init", "a"]).success();
    let a = env.path("a");
    let dir = env.adapter("ad", 0.0);
    env.write("secret", "password");
    std::os::unix::fs::symlink(env.path("secret"), dir.join("notes.txt")).unwrap();
    let out = env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T"]);
    assert_refused(&out, "symbolic link");
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    std::fs::create_dir_all(env.path("elsewhere")).unwrap();
    env.write("elsewhere/big.bin", "x");
    std::os::unix::fs::symlink(env.path("elsewhere"), dir.join("sub")).unwrap();
    let out = env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T"]);
    assert_refused(&out, "symbolic link");
    // Nothing of the secret reached the store.
    let out = env.coin_in(&a, &["stats", "--json"]).success().json();
    assert_eq!(out["objects"], serde_json::json!(0), "{out}");
}

#[test]
fn fsck_fetch_and_checkout_agree_on_broken_checkpoints() {
    let env = TestEnvironment::new();
    let (a, honest) = honest_repo(&env);
    let blob_of = |m: &serde_json::Value| m["files"]["config"].clone();
    // (what, manifest edit, extra tree lines, exit code of checkout: 255, damaged or forged
    // repository data, docs/cli.md)
    let text = git_out(&env, &a, &["show", &format!("{honest}:manifest")]);
    let m0: serde_json::Value = serde_json::from_str(&text).unwrap();
    let link_target = git_stdin(&env, &a, &["hash-object", "-w", "--stdin"], "/etc/passwd");
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let entry = blob_of(&m0);
    let cases: Vec<(&str, Edit, Vec<String>, i32)> = vec![
        (
            "wrong blob size",
            Box::new(|m: &mut serde_json::Value| {
                m["files"]["config"]["size"] = serde_json::json!(3);
            }),
            vec![],
            255,
        ),
        (
            "a and a/b",
            Box::new(move |m: &mut serde_json::Value| {
                m["files"]["a"] = entry.clone();
                m["files"]["a/b"] = entry.clone();
            }),
            vec![],
            255,
        ),
        (
            "symlink tree entry",
            Box::new(|_m: &mut serde_json::Value| {}),
            vec![format!("120000 blob {link_target}\tlink")],
            255,
        ),
    ];
    for (what, edit, extra, code) in cases {
        git_out(&env, &a, &["update-ref", "refs/coin/heads/main", &honest]);
        let forged = forge(&env, &a, &honest, edit, &extra);
        let out = env.coin_in(&a, &["fsck"]);
        assert_eq!(out.code, 1, "{what}: fsck must fail\n{}", out.stdout);
        let out = env.coin_in(&a, &["checkout", &forged, "--output", "../out"]);
        assert_eq!(out.code, code, "{what}: checkout must fail\n{}", out.stderr);
        assert!(
            !env.path("out").exists(),
            "{what}: checkout wrote something"
        );
        // A remote holding it: the branch is not taken by a clone.
        let r = plain_git_remote(&env, &a);
        let out = env.coin(&["clone", r.to_str().unwrap(), "b"]);
        let _ = out.code;
        let b = env.path("b");
        if b.exists() {
            let heads = git_out(
                &env,
                &b,
                &["for-each-ref", "refs/coin", "--format=%(objectname)"],
            );
            assert!(
                !heads.contains(&forged),
                "{what}: the clone took the forged checkpoint"
            );
            env.coin_in(&b, &["fsck"]).success();
            std::fs::remove_dir_all(&b).unwrap();
        }
        std::fs::remove_dir_all(&r).unwrap();
        std::fs::remove_dir_all(env.path("seed")).unwrap();
    }
}

#[test]
fn a_stale_git_lock_gets_a_recovery_hint() {
    let env = TestEnvironment::new();
    let (a, _) = honest_repo(&env);
    let lock = a.join(".git/refs/coin/heads/main.lock");
    std::fs::write(&lock, "").unwrap();
    let dir = env.adapter("ad2", 1.0);
    let out = env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T2"]);
    assert_refused(&out, "main.lock");
    assert!(out.stderr.contains("delete"), "{}", out.stderr);
    std::fs::remove_file(&lock).unwrap();
    env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T2"])
        .success();
    // The failed attempt left no reflog entry for a move that never happened.
    let log = git_out(
        &env,
        &a,
        &["reflog", "show", "--format=%gs", "refs/coin/heads/main"],
    );
    assert_eq!(log.lines().count(), 2, "{log}");
}

#[test]
fn killed_writers_leave_nothing_behind_after_the_next_command() {
    let env = TestEnvironment::new();
    let (a, id) = honest_repo(&env);
    // A killed commit: its temp object stays until the next commit clears it.
    let dir = env.adapter("ad2", 1.0);
    let mut cmd = env.coin_cmd(&a);
    cmd.args(["commit", dir.to_str().unwrap(), "--task", "T2"])
        .env("COIN_FAULT", "store.object.after_write");
    let out = crate::common::run(&mut cmd);
    assert_ne!(out.code, 0);
    let tmp = a.join(".coin/objects/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "the killed writer leaves its temp object");
    // Age it past the threshold (a live writer would hold its lock).
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(left[0].path())
        .unwrap()
        .set_modified(old)
        .unwrap();
    env.coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", "T2"])
        .success();
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    // A killed checkout leaves no output folder.
    let mut cmd = env.coin_cmd(&a);
    cmd.args(["checkout", &id, "--output", "../out"])
        .env("COIN_FAULT", "checkout.before_rename");
    let out = crate::common::run(&mut cmd);
    assert_ne!(out.code, 0);
    assert!(!env.path("out").exists());
    // A bare remote's leftovers go on the next push.
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    let r = env.path("r.git");
    env.coin_in(&a, &["push", r.to_str().unwrap(), "main"])
        .success();
    let stale = r.join("coin/objects/tmp/obj-stale");
    std::fs::write(&stale, "partial").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let dir3 = env.adapter("ad3", 2.0);
    env.coin_in(&a, &["commit", dir3.to_str().unwrap(), "--task", "T3"])
        .success();
    env.coin_in(&a, &["push", r.to_str().unwrap(), "main"])
        .success();
    assert!(!stale.exists(), "the remote's dead temp file is removed");
}

#[test]
fn plain_git_prints_no_deprecation_warning() {
    let env = TestEnvironment::new();
    let (a, _) = honest_repo(&env);
    let out = env.git_in(&a, &["status"]).success();
    assert!(!out.stderr.contains("deprecated"), "{}", out.stderr);
    assert_eq!(git_out(&env, &a, &["config", "core.fsync"]), "committed");
    // A repository made by an earlier coin is migrated when coin opens it.
    env.git_in(&a, &["config", "core.fsyncObjectFiles", "true"])
        .success();
    env.git_in(&a, &["config", "--unset", "core.fsync"])
        .success();
    env.coin_in(&a, &["log"]).success();
    let out = env.git_in(&a, &["status"]).success();
    assert!(!out.stderr.contains("deprecated"), "{}", out.stderr);
    assert_eq!(git_out(&env, &a, &["config", "core.fsync"]), "committed");
}
