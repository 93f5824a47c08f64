//! End-to-end tests of sharing (issue 7) with real git in temp directories: remotes, push,
//! clone, fetch, pull, interrupted transfers, missing objects, the plain-git hooks (pre-push,
//! post-checkout, pre-commit; chaining and uninstall), the pre-checkpoint forgetting gate and
//! `coin diff --fail-on-forgetting`.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use crate::common::{assert_same_tree_except, run, TestEnvironment};

fn eval_file(env: &TestEnvironment, name: &str, scores: &[(&str, f64)]) -> PathBuf {
    let mut m = serde_json::Map::new();
    for (task, score) in scores {
        m.insert(
            task.to_string(),
            serde_json::json!({"metric": "accuracy", "score": score, "n": 100}),
        );
    }
    env.write(name, serde_json::Value::Object(m).to_string())
}

/// Repository `a` with three checkpoints (T1, T2, T3) and an eval note on the last one.
fn repo_with_three(env: &TestEnvironment) -> (PathBuf, Vec<String>) {
    env.coin(&["init", "a"]).success();
    let a = env.path("a");
    let mut ids = Vec::new();
    for (i, task) in ["T1", "T2", "T3"].iter().enumerate() {
        let dir = env.adapter(&format!("ad{i}"), i as f32);
        let out = env
            .coin_in(&a, &["commit", dir.to_str().unwrap(), "--task", task])
            .success();
        ids.push(out.stdout.trim().to_string());
    }
    let ev = eval_file(env, "late.json", &[("T1", 55.0)]);
    env.coin_in(&a, &["eval", "HEAD", "--record", ev.to_str().unwrap()])
        .success();
    (a, ids)
}

fn object_files(coin_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(coin_dir.join("objects")) else {
        return out;
    };
    for d in rd.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if name.len() == 2 && d.path().is_dir() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn push_clone_checkout_is_byte_identical_and_only_missing_objects_move() {
    let env = TestEnvironment::new();
    let (a, ids) = repo_with_three(&env);
    env.git_in(&env.work(), &["init", "-q", "--bare", "shared.git"])
        .success();
    env.coin_in(&a, &["remote", "add", "origin", "../shared.git"])
        .success();
    env.coin_in(&a, &["tag", "v1", "HEAD~1"]).success();
    let push = env.coin_in(&a, &["push", "--json"]).success().json();
    assert_eq!(push["checkpoints"], 3);
    assert_eq!(push["tags"], serde_json::json!(["v1"]));
    assert_eq!(push["new"], ids[2].as_str());
    let sent = push["objects"]["transferred"].as_u64().unwrap();
    assert!(sent > 0);
    assert_eq!(push["notes"], true);
    // The remote store holds exactly the local objects.
    let remote_objects = object_files(&env.path("shared.git/coin"));
    assert_eq!(remote_objects.len(), object_files(&a.join(".coin")).len());
    // A second push moves nothing.
    let again = env.coin_in(&a, &["push", "--json"]).success().json();
    assert_eq!(again["objects"]["transferred"], 0);
    assert_eq!(again["checkpoints"], 0);

    env.coin(&["clone", "shared.git", "b"]).success();
    let b = env.path("b");
    let log = env.coin_in(&b, &["log", "--json"]).success().json();
    let got: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    // The tag and the note travelled too.
    let tag = env.coin_in(&b, &["show", "v1", "--json"]).success().json();
    assert_eq!(tag["id"], ids[1].as_str());
    let show = env
        .coin_in(&b, &["show", "HEAD", "--json"])
        .success()
        .json();
    assert_eq!(show["eval"]["T1"]["score"], 55.0);
    for (i, id) in ids.iter().enumerate() {
        let out = b.join(format!("out{i}"));
        env.coin_in(&b, &["checkout", id, "--output", out.to_str().unwrap()])
            .success();
        assert_same_tree_except(&env.path(format!("ad{i}")), &out, &[".coin-checkpoint"]);
    }
    env.coin_in(&b, &["fsck"]).success();

    // B adds a checkpoint and pushes to the bare remote; A pulls it (fast-forward).
    let d = env.adapter("ad3", 3.0);
    let id4 = env
        .coin_in(&b, &["commit", d.to_str().unwrap(), "--task", "T4"])
        .success()
        .stdout
        .trim()
        .to_string();
    let push = env.coin_in(&b, &["push", "--json"]).success().json();
    assert_eq!(push["checkpoints"], 1);
    // Only the new tensors moved: lora_A is shared with the earlier checkpoints.
    let moved = push["objects"]["transferred"].as_u64().unwrap();
    assert!(moved >= 1 && moved < push["objects"]["objects"].as_u64().unwrap());
    let pull = env.coin_in(&a, &["pull", "--json"]).success().json();
    assert_eq!(pull["update"], "fast-forward");
    assert_eq!(pull["new"], id4.as_str());
    let head = env
        .coin_in(&a, &["show", "origin/main", "--json"])
        .success();
    assert_eq!(head.json()["id"], id4.as_str());
    env.coin_in(&a, &["fsck"]).success();
}

#[test]
fn push_to_a_coin_repository_and_diverged_pull_is_refused() {
    let env = TestEnvironment::new();
    let (a, ids) = repo_with_three(&env);
    // The remote is another (non-bare) coin repository.
    env.coin(&["init", "hub"]).success();
    env.coin_in(&a, &["remote", "add", "hub", "../hub"])
        .success();
    env.coin_in(&a, &["push", "hub", "main"]).success();
    let hub = env.path("hub");
    let log = env.coin_in(&hub, &["log", "--json"]).success().json();
    assert_eq!(log[0]["id"], ids[2].as_str());
    let out = hub.join("check");
    env.coin_in(
        &hub,
        &["checkout", "HEAD~1", "--output", out.to_str().unwrap()],
    )
    .success();
    assert_same_tree_except(&env.path("ad1"), &out, &[".coin-checkpoint"]);

    // Both sides commit on main: pull refuses, push refuses, nothing moves.
    let d = env.adapter("x", 9.0);
    env.coin_in(&hub, &["commit", d.to_str().unwrap(), "--task", "X"])
        .success();
    let d = env.adapter("y", 8.0);
    env.coin_in(&a, &["commit", d.to_str().unwrap(), "--task", "Y"])
        .success();
    let before = env.coin_in(&a, &["status", "--json"]).success().json();
    let err = env.coin_in(&a, &["pull", "hub"]).code(1);
    assert!(err.stderr.contains("diverged"), "{}", err.stderr);
    let err = env.coin_in(&a, &["push", "hub"]).code(1);
    assert!(err.stderr.contains("coin pull"), "{}", err.stderr);
    let after = env.coin_in(&a, &["status", "--json"]).success().json();
    assert_eq!(before, after);
    // The remote branch is still reachable for a new local branch.
    env.coin_in(&a, &["branch", "theirs", "hub/main"]).success();
}

#[test]
fn killed_push_can_be_rerun_and_completes() {
    let env = TestEnvironment::new();
    let (a, ids) = repo_with_three(&env);
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    env.coin_in(&a, &["remote", "add", "origin", "../r.git"])
        .success();
    // Abort (like kill -9) right after the second object is copied.
    let out = run(env
        .coin_cmd(&a)
        .env("COIN_FAULT", "transfer.after_object:2")
        .args(["push"]));
    assert_ne!(out.code, 0, "the push must have been killed");
    assert_eq!(object_files(&env.path("r.git/coin")).len(), 2);
    let refs = env
        .git_in(&env.path("r.git"), &["for-each-ref"])
        .success()
        .stdout;
    assert!(
        refs.trim().is_empty(),
        "no ref may move before all objects: {refs}"
    );
    // Also kill one inside an object write (temp file written, not renamed).
    let out = run(env
        .coin_cmd(&a)
        .env("COIN_FAULT", "store.object.before_rename")
        .args(["push"]));
    assert_ne!(out.code, 0);
    assert_eq!(object_files(&env.path("r.git/coin")).len(), 2);
    // Re-run: completes, and sends only what is still missing.
    let push = env.coin_in(&a, &["push", "--json"]).success().json();
    let o = &push["objects"];
    assert_eq!(o["already_present"], 2);
    assert_eq!(
        o["transferred"].as_u64().unwrap() + 2,
        o["objects"].as_u64().unwrap()
    );
    env.coin(&["clone", "r.git", "b"]).success();
    let b = env.path("b");
    env.coin_in(&b, &["fsck"]).success();
    let out = b.join("o");
    env.coin_in(
        &b,
        &["checkout", &ids[2], "--output", out.to_str().unwrap()],
    )
    .success();
    assert_same_tree_except(&env.path("ad2"), &out, &[".coin-checkpoint"]);
}

#[test]
fn killed_fetch_publishes_nothing_and_can_be_rerun() {
    let env = TestEnvironment::new();
    let (a, _ids) = repo_with_three(&env);
    env.coin(&["init", "b"]).success();
    let b = env.path("b");
    let url = format!("file://{}", env.path("a").display());
    env.coin_in(&b, &["remote", "add", "origin", &url])
        .success();
    let out = run(env
        .coin_cmd(&b)
        .env("COIN_FAULT", "transfer.after_object:1")
        .args(["fetch"]));
    assert_ne!(out.code, 0);
    let refs = env
        .git_in(&b, &["for-each-ref", "refs/coin/remotes"])
        .success()
        .stdout;
    assert!(refs.trim().is_empty(), "{refs}");
    env.coin_in(&b, &["fsck"]).success();
    let fetch = env.coin_in(&b, &["fetch", "--json"]).success().json();
    assert_eq!(fetch["objects"]["already_present"], 1);
    assert_eq!(fetch["notes"], "fast-forward");
    env.coin_in(&b, &["fsck"]).success();
    env.coin_in(&b, &["pull"]).success();
    let st = env.coin_in(&b, &["status", "--json"]).success().json();
    let sa = env.coin_in(&a, &["status", "--json"]).success().json();
    assert_eq!(st["head"], sa["head"]);
}

#[test]
fn corrupt_remote_object_is_refused_before_it_is_visible() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnvironment::new();
    let (a, _) = repo_with_three(&env);
    let victim = object_files(&a.join(".coin"))[0].clone();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    env.coin(&["init", "b"]).success();
    let b = env.path("b");
    env.coin_in(&b, &["remote", "add", "origin", "../a"])
        .success();
    // A corrupt object is a damaged store (exit 255), here the remote's.
    let err = env.coin_in(&b, &["fetch"]).code(255);
    assert!(err.stderr.contains("corrupt"), "{}", err.stderr);
    let name = victim.file_name().unwrap();
    assert!(object_files(&b.join(".coin"))
        .iter()
        .all(|p| p.file_name() != Some(name)));
    let refs = env
        .git_in(&b, &["for-each-ref", "refs/coin/remotes"])
        .success()
        .stdout;
    assert!(refs.trim().is_empty(), "{refs}");
}

#[test]
fn push_with_a_missing_object_is_refused() {
    let env = TestEnvironment::new();
    let (a, _) = repo_with_three(&env);
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    env.coin_in(&a, &["remote", "add", "origin", "../r.git"])
        .success();
    let victim = object_files(&a.join(".coin")).pop().unwrap();
    std::fs::remove_file(&victim).unwrap();
    // Objects missing from the history being pushed: a damaged repository (exit 255).
    let err = env.coin_in(&a, &["push"]).code(255);
    assert!(err.stderr.contains("missing"), "{}", err.stderr);
    assert!(err.stderr.contains("nothing was pushed"), "{}", err.stderr);
    assert!(object_files(&env.path("r.git/coin")).is_empty());
    // Plain git push through the pre-push hook is refused too.
    let out = env.git_in(
        &a,
        &[
            "push",
            "origin",
            "refs/coin/heads/main:refs/coin/heads/main",
        ],
    );
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("missing"), "{}", out.stderr);
    let refs = env
        .git_in(&env.path("r.git"), &["for-each-ref"])
        .success()
        .stdout;
    assert!(refs.trim().is_empty(), "{refs}");
}

#[test]
fn plain_git_push_sends_objects_through_the_hook() {
    let env = TestEnvironment::new();
    let (a, ids) = repo_with_three(&env);
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    env.git_in(&a, &["remote", "add", "origin", "../r.git"])
        .success();
    let out = env
        .git_in(
            &a,
            &[
                "push",
                "origin",
                "refs/coin/heads/*:refs/coin/heads/*",
                "refs/notes/coin:refs/notes/coin",
            ],
        )
        .success();
    assert!(out.stderr.contains("3 checkpoint(s)"), "{}", out.stderr);
    assert_eq!(
        object_files(&env.path("r.git/coin")).len(),
        object_files(&a.join(".coin")).len()
    );
    // Pushing again (nothing new) sends nothing.
    let out = env
        .git_in(
            &a,
            &["push", "origin", "refs/coin/heads/*:refs/coin/heads/*"],
        )
        .success();
    assert!(!out.stderr.contains("object(s) sent"), "{}", out.stderr);
    env.coin(&["clone", "r.git", "b"]).success();
    let b = env.path("b");
    env.coin_in(&b, &["fsck"]).success();
    let o = b.join("o");
    env.coin_in(&b, &["checkout", &ids[0], "--output", o.to_str().unwrap()])
        .success();
    assert_same_tree_except(&env.path("ad0"), &o, &[".coin-checkpoint"]);
}

#[test]
fn hooks_install_is_idempotent_chains_user_hooks_and_uninstall_restores() {
    let env = TestEnvironment::new();
    env.git_in(&env.work(), &["init", "-q", "code"]).success();
    let code = env.path("code");
    let hooks = code.join(".git/hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let user_hook =
        "#!/bin/sh\necho \"user pre-commit ran\" >> \"$(git rev-parse --git-dir)/user-hook.log\"\n";
    std::fs::write(hooks.join("pre-commit"), user_hook).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            hooks.join("pre-commit"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    let init = env.coin_in(&code, &["init"]).success();
    assert!(init.stderr.contains("pre-commit.local"), "{}", init.stderr);
    assert_eq!(
        std::fs::read_to_string(hooks.join("pre-commit.local")).unwrap(),
        user_hook
    );
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let first = snapshot(&hooks);
    let again = env.coin_in(&code, &["hooks", "install"]).success();
    assert!(
        again.stderr.contains("Installed 0 hook(s)"),
        "{}",
        again.stderr
    );
    assert_eq!(first, snapshot(&hooks), "a second install changes nothing");

    // A real git commit runs the user's hook (chained) and coin's.
    env.write("code/README.md", "code\n");
    env.git_in(&code, &["add", "README.md"]).success();
    env.git_in(&code, &["commit", "-q", "-m", "code"]).success();
    let log = std::fs::read_to_string(code.join(".git/user-hook.log")).unwrap();
    assert_eq!(log, "user pre-commit ran\n");
    // A failing user hook still blocks the commit.
    std::fs::write(hooks.join("pre-commit.local"), "#!/bin/sh\nexit 3\n").unwrap();
    env.write("code/README.md", "changed\n");
    env.git_in(&code, &["add", "README.md"]).success();
    let out = env.git_in(&code, &["commit", "-q", "-m", "blocked"]);
    assert_ne!(out.code, 0);
    std::fs::write(hooks.join("pre-commit.local"), user_hook).unwrap();

    let list = env
        .coin_in(&code, &["hooks", "list", "--json"])
        .success()
        .json();
    let states: Vec<&str> = list["git"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert!(
        states.iter().all(|s| s.starts_with("installed")),
        "{states:?}"
    );

    env.coin_in(&code, &["hooks", "uninstall"]).success();
    assert_eq!(
        std::fs::read_to_string(hooks.join("pre-commit")).unwrap(),
        user_hook
    );
    assert!(!hooks.join("pre-commit.local").exists());
    for h in ["pre-push", "post-checkout", "post-merge"] {
        assert!(!hooks.join(h).exists(), "{h} left behind");
    }
    // Uninstall twice is harmless; a foreign hook is never removed.
    env.coin_in(&code, &["hooks", "uninstall"]).success();
    assert_eq!(
        std::fs::read_to_string(hooks.join("pre-commit")).unwrap(),
        user_hook
    );
    // Refuses rather than overwrite when both a foreign hook and a .local exist.
    std::fs::write(hooks.join("pre-commit.local"), "#!/bin/sh\n").unwrap();
    let err = env.coin_in(&code, &["hooks", "install"]).code(1);
    assert!(err.stderr.contains("pre-commit.local"), "{}", err.stderr);
    assert_eq!(
        std::fs::read_to_string(hooks.join("pre-commit")).unwrap(),
        user_hook
    );
    assert!(
        !hooks.join("pre-push").exists(),
        "a refusal changes nothing"
    );
}

#[test]
fn pointer_files_are_refreshed_on_checkout_and_checked_on_commit() {
    let env = TestEnvironment::new();
    env.git_in(&env.work(), &["init", "-q", "-b", "one", "code"])
        .success();
    let code = env.path("code");
    env.coin_in(&code, &["init"]).success();
    let d0 = env.adapter("ad0", 0.0);
    let d1 = env.adapter("ad1", 1.0);
    let id0 = env
        .coin_in(&code, &["commit", d0.to_str().unwrap(), "--task", "T1"])
        .success()
        .stdout
        .trim()
        .to_string();
    let id1 = env
        .coin_in(&code, &["commit", d1.to_str().unwrap(), "--task", "T2"])
        .success()
        .stdout
        .trim()
        .to_string();
    let pointer = |id: &str| format!("checkpoint = \"{id}\"\noutput = \"adapters/current\"\n");
    env.write("code/model.coin", pointer(&id0));
    env.write("code/.gitignore", "adapters/\n");
    env.git_in(&code, &["add", "model.coin", ".gitignore"])
        .success();
    env.git_in(&code, &["commit", "-q", "-m", "use step 1"])
        .success();
    env.git_in(&code, &["checkout", "-q", "-b", "two"])
        .success();
    env.write("code/model.coin", pointer(&id1));
    env.git_in(&code, &["commit", "-q", "-am", "use step 2"])
        .success();
    // Switching branches materialises the pointer's checkpoint.
    let out = env.git_in(&code, &["checkout", "-q", "one"]).success();
    assert!(out.stderr.contains("refreshed"), "{}", out.stderr);
    assert_same_tree_except(&d0, &code.join("adapters/current"), &[".coin-checkpoint"]);
    env.git_in(&code, &["checkout", "-q", "two"]).success();
    let current = code.join("adapters/current");
    assert_eq!(
        std::fs::read(current.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(d1.join("adapter_model.safetensors")).unwrap()
    );
    // A checkout that does not change the pointer leaves the directory alone (even when
    // its stamp says something else).
    env.write("code/other.txt", "x\n");
    env.git_in(&code, &["add", "other.txt"]).success();
    env.git_in(&code, &["commit", "-q", "-m", "other"])
        .success();
    std::fs::write(current.join(".coin-checkpoint"), "manual\n").unwrap();
    env.git_in(&code, &["checkout", "-q", "HEAD~1"]).success();
    assert_eq!(
        std::fs::read_to_string(current.join(".coin-checkpoint")).unwrap(),
        "manual\n"
    );
    // A directory coin did not make is never replaced.
    let foreign = code.join("adapters/current");
    std::fs::remove_file(foreign.join(".coin-checkpoint")).unwrap();
    env.git_in(&code, &["checkout", "-q", "two"]).success();
    let out = env.git_in(&code, &["checkout", "-q", "one"]).success();
    assert!(out.stderr.contains("not made by coin"), "{}", out.stderr);
    assert_eq!(
        std::fs::read(foreign.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(d1.join("adapter_model.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&foreign).unwrap();

    // pre-commit: a pointer to a checkpoint whose objects are gone is refused.
    env.git_in(&code, &["checkout", "-q", "one"]).success();
    let manifest = env
        .coin_in(&code, &["show", &id1, "--json"])
        .success()
        .json();
    let file = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "adapter_model.safetensors")
        .unwrap();
    let tensor = file["tensors"][1]["id"].as_str().unwrap().to_string();
    let path = code.join(format!(".coin/objects/{}/{}", &tensor[..2], &tensor[2..]));
    std::fs::remove_file(&path).unwrap();
    env.write("code/model.coin", pointer(&id1));
    env.git_in(&code, &["add", "model.coin"]).success();
    let out = env.git_in(&code, &["commit", "-q", "-m", "bad pointer"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("missing from the store"),
        "{}",
        out.stderr
    );
    // A pointer to an intact checkpoint commits fine.
    env.write("code/model.coin", pointer(&id0));
    env.git_in(&code, &["add", "model.coin"]).success();
    env.git_in(
        &code,
        &["commit", "-q", "--allow-empty", "-m", "good pointer"],
    )
    .success();
}

#[test]
fn gate_blocks_a_checkpoint_that_forgets_and_lets_a_good_one_pass() {
    let env = TestEnvironment::new();
    env.coin(&["init", "r"]).success();
    let r = env.path("r");
    let d = env.adapter("d0", 0.0);
    let e = eval_file(&env, "e0.json", &[("ScienceQA", 80.0)]);
    env.coin_in(
        &r,
        &[
            "commit",
            d.to_str().unwrap(),
            "--task",
            "ScienceQA",
            "--eval",
            e.to_str().unwrap(),
        ],
    )
    .success();
    let d = env.adapter("d1", 1.0);
    // No threshold configured yet: the sample gate lets a 10-point drop through.
    let e = eval_file(&env, "e1.json", &[("ScienceQA", 70.0), ("TextVQA", 50.0)]);
    env.coin_in(
        &r,
        &[
            "commit",
            d.to_str().unwrap(),
            "--task",
            "TextVQA",
            "--eval",
            e.to_str().unwrap(),
        ],
    )
    .success();
    let d2 = env.adapter("d2", 2.0);
    let bad = eval_file(&env, "bad.json", &[("ScienceQA", 60.0), ("TextVQA", 50.0)]);
    let cfg = r.join(".coin/config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[gates]\nmax_forgetting = 5.0\n");
    std::fs::write(&cfg, text).unwrap();
    let head_before = env.coin_in(&r, &["status", "--json"]).success().json()["head"].clone();
    // ScienceQA 80 (two checkpoints back) → 73: 7 points, more than 5, though it is 3 above
    // the parent's 70.
    let worse = eval_file(
        &env,
        "worse.json",
        &[("ScienceQA", 73.0), ("TextVQA", 50.0)],
    );
    let out = env
        .coin_in(
            &r,
            &[
                "commit",
                d2.to_str().unwrap(),
                "--task",
                "GQA",
                "--eval",
                worse.to_str().unwrap(),
            ],
        )
        .code(1);
    assert!(
        out.stderr.contains("pre-checkpoint hook refused"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("ScienceQA dropped 7.00 points"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "no id is printed for a vetoed checkpoint"
    );
    let head_after = env.coin_in(&r, &["status", "--json"]).success().json()["head"].clone();
    assert_eq!(head_before, head_after, "a vetoed checkpoint moves nothing");
    // --no-verify skips the gate (like git commit --no-verify)... but first a good one passes.
    let good = eval_file(&env, "good.json", &[("ScienceQA", 77.0), ("TextVQA", 51.0)]);
    let id = env
        .coin_in(
            &r,
            &[
                "commit",
                d2.to_str().unwrap(),
                "--task",
                "GQA",
                "--eval",
                good.to_str().unwrap(),
            ],
        )
        .success()
        .stdout
        .trim()
        .to_string();
    assert_eq!(id.len(), 40);
    env.coin_in(
        &r,
        &[
            "commit",
            d2.to_str().unwrap(),
            "--task",
            "GQA",
            "--eval",
            bad.to_str().unwrap(),
            "--no-verify",
        ],
    )
    .success();
    // A checkpoint without eval records for the old tasks is not measured, so it passes.
    env.coin_in(&r, &["commit", d.to_str().unwrap(), "--task", "VizWiz"])
        .success();
}

#[test]
fn diff_reports_forgetting_against_the_best_earlier_score() {
    let env = TestEnvironment::new();
    env.coin(&["init", "r"]).success();
    let r = env.path("r");
    let mut ids = Vec::new();
    for (i, scores) in [
        vec![("A", 90.0)],
        vec![("A", 70.0), ("B", 60.0)],
        vec![("A", 80.0), ("B", 62.0)],
    ]
    .into_iter()
    .enumerate()
    {
        let d = env.adapter(&format!("d{i}"), i as f32);
        let e = eval_file(&env, &format!("e{i}.json"), &scores);
        let out = env
            .coin_in(
                &r,
                &[
                    "commit",
                    d.to_str().unwrap(),
                    "--task",
                    "A",
                    "--eval",
                    e.to_str().unwrap(),
                ],
            )
            .success();
        ids.push(out.stdout.trim().to_string());
    }
    let j = env
        .coin_in(&r, &["diff", "HEAD~1", "HEAD", "--json"])
        .success()
        .json();
    let tasks = j["forgetting"]["tasks"].as_array().unwrap();
    assert_eq!(tasks[0]["task"], "A");
    assert_eq!(tasks[0]["best"], 90.0);
    assert_eq!(tasks[0]["best_at"], ids[0].as_str());
    assert_eq!(tasks[0]["forgetting"], 10.0);
    assert_eq!(tasks[1]["forgetting"], -2.0);
    assert_eq!(j["forgetting"]["max_forgetting"], 10.0);
    assert_eq!(j["forgetting"]["checkpoints_scanned"], 2);
    // The per-parent delta says A improved; the path says it is 10 below its best.
    assert_eq!(j["eval"][0]["delta"], 10.0);
    let out = env
        .coin_in(
            &r,
            &["diff", "HEAD~1", "HEAD", "--fail-on-forgetting", "9.5"],
        )
        .code(1);
    assert!(
        out.stderr.contains("A dropped 10.00 points"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("Forgetting vs the best earlier score"),
        "{}",
        out.stdout
    );
    env.coin_in(
        &r,
        &["diff", "HEAD~1", "HEAD", "--fail-on-forgetting", "10"],
    )
    .success();
    env.coin_in(
        &r,
        &["diff", "HEAD~1", "HEAD", "--fail-on-forgetting", "-1"],
    )
    .code(2);
}

#[test]
fn init_with_another_template_folder() {
    let env = TestEnvironment::new();
    env.write(
        "tpl/config.toml",
        "# team config\n[gates]\nmax_forgetting = 2\n",
    );
    env.write("tpl/orders/mine.toml", "tasks = [\"A\"]\n");
    env.write(
        "tpl/hooks/pre-checkpoint",
        "#!/bin/sh\necho vetoed by the team >&2\nexit 1\n",
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            env.path("tpl/hooks/pre-checkpoint"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    env.coin(&["init", "r", "--template", "tpl", "--no-hooks"])
        .success();
    let r = env.path("r");
    assert_eq!(
        std::fs::read_to_string(r.join(".coin/config.toml")).unwrap(),
        "# team config\n[gates]\nmax_forgetting = 2\n"
    );
    assert!(r.join(".coin/orders/mine.toml").is_file());
    assert!(!r.join(".coin/tasks").exists(), "only the template's files");
    assert!(!r.join(".git/hooks/pre-push").exists(), "--no-hooks");
    let d = env.adapter("d", 0.0);
    let out = env
        .coin_in(&r, &["commit", d.to_str().unwrap(), "--task", "A"])
        .code(1);
    assert!(out.stderr.contains("vetoed by the team"), "{}", out.stderr);
    let list = env
        .coin_in(&r, &["hooks", "list", "--json"])
        .success()
        .json();
    assert_eq!(list["gates"]["max_forgetting"], 2.0);
    let err = env.coin(&["init", "s", "--template", "nope"]).code(1);
    assert!(err.stderr.contains("does not exist"), "{}", err.stderr);
}

#[test]
fn post_eval_hook_runs_with_the_documented_environment() {
    let env = TestEnvironment::new();
    env.coin(&["init", "r"]).success();
    let r = env.path("r");
    let hook = r.join(".coin/hooks/post-eval");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho \"event=$COIN_EVENT ckpt=$COIN_CHECKPOINT args=$* repo=$COIN_REPO\" > \"$COIN_DIR/post-eval.log\"\nexit 4\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let d = env.adapter("d", 0.0);
    let id = env
        .coin_in(&r, &["commit", d.to_str().unwrap(), "--task", "A"])
        .success()
        .stdout
        .trim()
        .to_string();
    let e = eval_file(&env, "e.json", &[("A", 1.0), ("B", 2.0)]);
    let out = env
        .coin_in(&r, &["eval", "HEAD", "--record", e.to_str().unwrap()])
        .success();
    assert!(
        out.stderr.contains("post-eval hook failed"),
        "{}",
        out.stderr
    );
    let log = std::fs::read_to_string(r.join(".coin/post-eval.log")).unwrap();
    let root = r.canonicalize().unwrap();
    assert_eq!(
        log.trim(),
        format!(
            "event=post-eval ckpt={id} args={id} A B repo={}",
            root.display()
        )
    );
}

#[test]
fn plain_git_fetch_then_checkout_fetches_objects_on_demand() {
    let env = TestEnvironment::new();
    let (_a, ids) = repo_with_three(&env);
    env.coin(&["init", "b"]).success();
    let b = env.path("b");
    env.coin_in(&b, &["remote", "add", "origin", "../a"])
        .success();
    // git has no post-fetch hook: the refs arrive without the store objects...
    env.git_in(
        &b,
        &[
            "fetch",
            "-q",
            "origin",
            "refs/coin/heads/main:refs/coin/heads/main",
        ],
    )
    .success();
    assert!(object_files(&b.join(".coin")).is_empty());
    // ...and checkout brings the ones it needs from the remotes, verified.
    let o = b.join("o");
    let out = env
        .coin_in(&b, &["checkout", &ids[1], "--output", o.to_str().unwrap()])
        .success();
    assert!(out.stderr.contains("Fetched"), "{}", out.stderr);
    assert_same_tree_except(&env.path("ad1"), &o, &[".coin-checkpoint"]);
    let o2 = b.join("o2");
    let out = env
        .coin_in(&b, &["checkout", &ids[1], "--output", o2.to_str().unwrap()])
        .success();
    assert!(
        !out.stderr.contains("Fetched"),
        "nothing missing the second time"
    );
}

#[test]
fn post_merge_refreshes_the_pointer() {
    let env = TestEnvironment::new();
    env.git_in(&env.work(), &["init", "-q", "-b", "main", "code"])
        .success();
    let code = env.path("code");
    env.coin_in(&code, &["init"]).success();
    let d0 = env.adapter("ad0", 0.0);
    let d1 = env.adapter("ad1", 1.0);
    let mut ids = Vec::new();
    for d in [&d0, &d1] {
        let out = env
            .coin_in(&code, &["commit", d.to_str().unwrap(), "--task", "T"])
            .success();
        ids.push(out.stdout.trim().to_string());
    }
    let pointer = |id: &str| format!("checkpoint = \"{id}\"\noutput = \"weights\"\n");
    env.write("code/adapter.coin", pointer(&ids[0]));
    env.write("code/.gitignore", "weights/\n");
    env.git_in(&code, &["add", "."]).success();
    env.git_in(&code, &["commit", "-q", "-m", "step 1"])
        .success();
    env.git_in(&code, &["checkout", "-q", "-b", "feature"])
        .success();
    env.write("code/adapter.coin", pointer(&ids[1]));
    env.git_in(&code, &["commit", "-q", "-am", "step 2"])
        .success();
    env.git_in(&code, &["checkout", "-q", "main"]).success();
    assert_same_tree_except(&d0, &code.join("weights"), &[".coin-checkpoint"]);
    let out = env
        .git_in(&code, &["merge", "-q", "--ff-only", "feature"])
        .success();
    assert!(out.stderr.contains("refreshed"), "{}", out.stderr);
    assert_same_tree_except(&d1, &code.join("weights"), &[".coin-checkpoint"]);
}

#[test]
fn pre_push_of_plain_code_ignores_a_users_manifest_file() {
    let env = TestEnvironment::new();
    env.git_in(&env.work(), &["init", "-q", "-b", "main", "code"])
        .success();
    let code = env.path("code");
    env.coin_in(&code, &["init"]).success();
    env.write("code/manifest", "{\"format\": \"my-own\"}\n");
    env.git_in(&code, &["add", "manifest"]).success();
    env.git_in(&code, &["commit", "-q", "-m", "code"]).success();
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    env.git_in(&code, &["remote", "add", "origin", "../r.git"])
        .success();
    let out = env
        .git_in(&code, &["push", "-q", "origin", "main"])
        .success();
    assert!(!out.stderr.contains("coin:"), "{}", out.stderr);
    assert!(
        !env.path("r.git/coin").exists(),
        "no store is made for code"
    );
}

#[test]
fn clone_of_a_code_repository_whose_coin_branch_is_still_empty() {
    let env = TestEnvironment::new();
    env.git_in(&env.work(), &["init", "-q", "-b", "dev", "src"])
        .success();
    let src = env.path("src");
    env.write("src/train.py", "print('hi')\n");
    env.git_in(&src, &["add", "train.py"]).success();
    env.git_in(&src, &["commit", "-q", "-m", "code"]).success();
    env.coin_in(&src, &["init"]).success();
    // refs/coin/HEAD names the unborn branch main: libgit2's clone cannot list that.
    env.coin(&["clone", "src", "dst"]).success();
    let dst = env.path("dst");
    assert_eq!(
        std::fs::read_to_string(dst.join("train.py")).unwrap(),
        "print('hi')\n"
    );
    let branch = env.git_in(&dst, &["branch", "--show-current"]).success();
    assert_eq!(branch.stdout.trim(), "dev");
    let st = env.coin_in(&dst, &["status", "--json"]).success().json();
    assert_eq!(st["checkpoints"], 0);
    // The clone can record and push back.
    let d = env.adapter("d", 0.0);
    env.coin_in(&dst, &["commit", d.to_str().unwrap(), "--task", "T"])
        .success();
    env.coin_in(&dst, &["push"]).success();
    let log = env.coin_in(&src, &["log", "--json"]).success().json();
    assert_eq!(log.as_array().unwrap().len(), 1);
}

#[test]
fn notes_added_on_both_sides_are_merged_per_task() {
    let env = TestEnvironment::new();
    let (a, ids) = repo_with_three(&env);
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    env.coin_in(&a, &["remote", "add", "origin", "../r.git"])
        .success();
    env.coin_in(&a, &["push"]).success();
    env.coin(&["clone", "r.git", "b"]).success();
    let b = env.path("b");
    // A evaluates the first checkpoint, B the second, and both re-score T1 on the third.
    let ea = eval_file(&env, "ea.json", &[("T9", 11.0)]);
    env.coin_in(&a, &["eval", &ids[0], "--record", ea.to_str().unwrap()])
        .success();
    let clash_a = eval_file(&env, "ca.json", &[("T1", 1.0)]);
    env.coin_in(
        &a,
        &["eval", &ids[2], "--record", clash_a.to_str().unwrap()],
    )
    .success();
    let eb = eval_file(&env, "eb.json", &[("T8", 22.0)]);
    env.coin_in(&b, &["eval", &ids[1], "--record", eb.to_str().unwrap()])
        .success();
    let clash_b = eval_file(&env, "cb.json", &[("T1", 2.0), ("T7", 7.0)]);
    env.coin_in(
        &b,
        &["eval", &ids[2], "--record", clash_b.to_str().unwrap()],
    )
    .success();
    env.coin_in(&b, &["push"]).success();
    // A's push finds diverged notes, merges B's in (keeping A's T1), then pushes.
    let push = env.coin_in(&a, &["push", "--json"]).success().json();
    assert_eq!(push["notes"], true);
    let score = |dir: &Path, id: &str, task: &str| {
        env.coin_in(dir, &["show", id, "--json"]).success().json()["eval"][task]["score"].clone()
    };
    assert_eq!(score(&a, &ids[0], "T9"), 11.0);
    assert_eq!(score(&a, &ids[1], "T8"), 22.0);
    assert_eq!(score(&a, &ids[2], "T1"), 1.0, "the local record wins");
    assert_eq!(score(&a, &ids[2], "T7"), 7.0);
    // B fetches: the remote's notes are a descendant of B's, so a fast-forward.
    let f = env.coin_in(&b, &["fetch", "--json"]).success().json();
    assert_eq!(f["notes"], "fast-forward");
    assert_eq!(score(&b, &ids[0], "T9"), 11.0);
    assert_eq!(score(&b, &ids[2], "T1"), 1.0);
    env.coin_in(&a, &["fsck"]).success();
    env.coin_in(&b, &["fsck"]).success();
}

#[test]
fn remote_add_list_remove() {
    let env = TestEnvironment::new();
    let (a, _) = repo_with_three(&env);
    env.coin(&["init", "hub"]).success();
    env.coin_in(
        &a,
        &["remote", "add", "hub", "../hub", "--objects", "../store"],
    )
    .success();
    let list = env
        .coin_in(&a, &["remote", "list", "--json"])
        .success()
        .json();
    assert_eq!(list[0]["name"], "hub");
    assert_eq!(list[0]["url"], env.path("hub").display().to_string());
    assert_eq!(list[0]["objects"], env.path("store").display().to_string());
    // Objects go where remote.hub.coinobjects says.
    env.coin_in(&a, &["push", "hub"]).success();
    assert!(!object_files(&env.path("store")).is_empty());
    assert!(object_files(&env.path("hub/.coin")).is_empty());
    env.coin_in(&a, &["fetch", "hub"]).success();
    assert!(env
        .git_in(&a, &["show-ref", "refs/coin/remotes/hub/main"])
        .success()
        .stdout
        .contains("refs/coin/remotes/hub/main"));
    // Same name, other URL: refused; same name and URL: reused.
    env.coin_in(&a, &["remote", "add", "hub", "../elsewhere"])
        .code(1);
    env.coin_in(&a, &["remote", "add", "hub", "../hub"])
        .success();
    env.coin_in(&a, &["remote", "remove", "hub"]).success();
    assert!(env
        .coin_in(&a, &["remote", "list", "--json"])
        .success()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    let refs = env
        .git_in(&a, &["for-each-ref", "refs/coin/remotes"])
        .success()
        .stdout;
    assert!(refs.trim().is_empty(), "{refs}");
    let err = env.coin_in(&a, &["push"]).code(1);
    assert!(
        err.stderr.contains("no remote is configured"),
        "{}",
        err.stderr
    );
    // An object store URL alone is no remote: the git half must be given (tests/test_s3.rs).
    let err = env
        .coin_in(&a, &["remote", "add", "s3", "s3://bucket/x"])
        .code(1);
    assert!(
        err.stderr.contains("--objects s3://bucket/x"),
        "{}",
        err.stderr
    );
}

fn pack_files(coin_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(coin_dir.join("objects/pack")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    out.sort();
    out
}

#[test]
fn packed_objects_push_and_clone_as_packs_and_check_out_byte_identical() {
    use crate::common::st;
    let env = TestEnvironment::new();
    env.coin(&["init", "a"]).success();
    let a = env.path("a");
    // 150 router-sized tensors: packed by gc here, sent as a pack, received as a pack.
    let tensors: Vec<st::T> = (0..150)
        .map(|i| {
            st::T::f32(
                &format!("layer.{i}.router"),
                &[2, 2],
                &[i as f32, 1.0, 2.0, 3.0],
            )
        })
        .collect();
    env.write("m/routers.safetensors", st::safetensors(&tensors));
    let d = env.adapter("m", 0.0);
    let id = env
        .coin_in(&a, &["commit", d.to_str().unwrap(), "--task", "T1"])
        .success()
        .stdout
        .trim()
        .to_string();
    env.coin_in(&a, &["gc"]).success();
    assert_eq!(
        pack_files(&a.join(".coin")).len(),
        2,
        "one pack and its index"
    );
    env.git_in(&env.work(), &["init", "-q", "--bare", "r.git"])
        .success();
    env.coin_in(&a, &["remote", "add", "origin", "../r.git"])
        .success();
    let push = env.coin_in(&a, &["push", "--json"]).success().json();
    let sent = push["objects"]["transferred"].as_u64().unwrap();
    assert!(sent >= 150, "{push}");
    let remote = env.path("r.git/coin");
    assert_eq!(pack_files(&remote).len(), 2, "the remote got one pack");
    assert!(
        object_files(&remote).len() < 5,
        "{:?}",
        object_files(&remote)
    );
    env.coin(&["clone", "r.git", "b"]).success();
    let b = env.path("b");
    assert_eq!(
        pack_files(&b.join(".coin")).len(),
        2,
        "the clone got one pack"
    );
    env.coin_in(&b, &["fsck"]).success();
    let out = b.join("o");
    env.coin_in(&b, &["checkout", &id, "--output", out.to_str().unwrap()])
        .success();
    assert_same_tree_except(&d, &out, &[".coin-checkpoint"]);
    // A second push moves nothing.
    let again = env.coin_in(&a, &["push", "--json"]).success().json();
    assert_eq!(again["objects"]["transferred"], 0);
}
