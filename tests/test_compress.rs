//! Compressed objects end to end: `coin repack`, `coin gc --compress`, `coin stats`, mixed
//! raw and compressed stores, damage detection, crash safety, and transfer to a remote.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use crate::common::st::{safetensors, T};
use crate::common::{assert_same_tree, run, TestEnvironment};

/// Values like a trained LoRA B matrix: small, roughly Gaussian (deterministic).
fn lora_like(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            // Sum of 4 uniforms: close enough to a Gaussian for a byte histogram.
            let mut s = 0.0f32;
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s += (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            s * std * 1.7
        })
        .collect()
}

/// An adapter folder with compressible bf16 and f32 tensors (16 KiB each), plus a config.
fn adapter(env: &TestEnvironment, name: &str, seed: u64) -> PathBuf {
    let v = lora_like(4096, seed, 0.01);
    let file = safetensors(&[
        T::bf16("layers.0.q_proj.lora_B.weight", &[64, 64], &v),
        T::f32("layers.0.v_proj.lora_B.weight", &[64, 64], &v),
        T::bf16(
            "layers.1.q_proj.lora_B.weight",
            &[64, 64],
            &lora_like(4096, seed + 7, 0.002),
        ),
        T::i64("step", &[1], &[7]),
    ]);
    env.write(format!("{name}/adapter_model.safetensors"), file);
    env.write(
        format!("{name}/adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 64, "lora_alpha": 16}"#,
    );
    env.path(name)
}

fn commit(env: &TestEnvironment, dir: &str) -> String {
    env.coin(&["commit", dir, "--task", "T1"])
        .success()
        .stdout
        .trim()
        .to_string()
}

/// Object files of a store whose header is format version 2 (compressed).
fn compressed_files(coin_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(coin_dir.join("objects"))
        .unwrap()
        .flatten()
    {
        let name = d.file_name().to_string_lossy().into_owned();
        if name.len() == 2 && d.path().is_dir() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                let bytes = std::fs::read(f.path()).unwrap();
                if bytes[8..10] == [2, 0] {
                    out.push(f.path());
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn repack_compresses_keeps_checkouts_identical_and_is_idempotent() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    let a1 = adapter(&env, "a1", 1);
    let id1 = commit(&env, "a1");
    let before = env.coin(&["stats", "--json"]).success().json();
    assert_eq!(before["compressed_objects"], 0);
    let r = env.coin(&["repack", "--json"]).success().json();
    // The three float tensors and the safetensors header (JSON) shrink; the config and the
    // 8-byte step are too small to try.
    assert_eq!(r["compressed"], 4, "{r}");
    assert_eq!(r["kept_raw"], 2, "{r}");
    assert!(r["bytes_after"].as_u64().unwrap() < r["bytes_before"].as_u64().unwrap());
    assert_eq!(compressed_files(&env.work().join(".coin")).len(), 4);
    let after = env.coin(&["stats", "--json"]).success().json();
    assert_eq!(after["compressed_objects"], 4);
    assert_eq!(after["object_bytes"], before["object_bytes"]);
    assert!(
        after["stored_bytes"].as_u64().unwrap() < before["stored_bytes"].as_u64().unwrap(),
        "{before} {after}"
    );
    assert!(after["stored_ratio"].as_f64().unwrap() < 0.95, "{after}");
    let text = env.coin(&["stats"]).success().stdout;
    assert!(text.contains("compressed     4 objects"), "{text}");

    // Idempotent: nothing left to do.
    let again = env.coin(&["repack", "--json"]).success().json();
    assert_eq!(again["compressed"], 0);
    assert_eq!(again["already_compressed"], 4);
    assert_eq!(again["objects"], r["objects"]);

    // Mixed store: a new commit writes raw objects beside the compressed ones.
    let a2 = adapter(&env, "a2", 2);
    let id2 = commit(&env, "a2");
    env.coin(&["fsck"]).success();
    env.coin(&["checkout", &id1, "--output", "out1"]).success();
    assert_same_tree(&a1, &env.path("out1"));
    env.coin(&["checkout", &id2, "--output", "out2"]).success();
    assert_same_tree(&a2, &env.path("out2"));
    // gc --compress compresses the new tensors too (the header blob is shared).
    let gc = env.coin(&["gc", "--compress", "--json"]).success().json();
    assert_eq!(gc["repack"]["compressed"], 3, "{gc}");
    assert_eq!(gc["repack"]["already_compressed"], 4, "{gc}");
    env.coin(&["checkout", &id2, "--output", "out3"]).success();
    assert_same_tree(&a2, &env.path("out3"));
    // Levels outside 1..=19 are refused.
    env.coin(&["repack", "--level", "0"]).code(2);
}

#[test]
fn a_damaged_compressed_object_is_reported_by_fsck_and_checkout() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    adapter(&env, "a1", 3);
    let id = commit(&env, "a1");
    env.coin(&["repack"]).success();
    let files = compressed_files(&env.work().join(".coin"));
    let p = &files[0];
    let mut perms = std::fs::metadata(p).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(p, perms).unwrap();
    let mut bytes = std::fs::read(p).unwrap();
    let n = bytes.len();
    bytes[n / 2 + 40] ^= 0x5a;
    std::fs::write(p, &bytes).unwrap();
    let object = format!(
        "{}{}",
        p.parent().unwrap().file_name().unwrap().to_string_lossy(),
        p.file_name().unwrap().to_string_lossy()
    );
    let report = env.coin(&["fsck", "--json"]).code(1).json();
    let problem = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["object"] == object.as_str())
        .unwrap_or_else(|| panic!("{report}"))
        .clone();
    let msg = problem["message"].as_str().unwrap();
    assert!(
        msg.contains("decode") && msg.contains(&object[2..]),
        "{msg}"
    );
    let e = env.coin(&["checkout", &id, "--output", "out"]).code(255);
    assert!(e.stderr.contains(&object[..12]), "{}", e.stderr);
    assert!(!env.path("out").exists());
}

#[test]
fn killed_repack_leaves_a_valid_store_at_every_fault_point() {
    for point in [
        "store.repack.after_write",
        "store.repack.before_rename",
        "store.repack.after_rename",
        "store.repack.before_rename:2",
        "store.repack.after_rename:3",
    ] {
        let env = TestEnvironment::new();
        env.coin(&["init"]).success();
        let a1 = adapter(&env, "a1", 4);
        let id = commit(&env, "a1");
        let crashed = run(env
            .coin_cmd(&env.work())
            .env("COIN_FAULT", point)
            .args(["repack"]));
        assert_ne!(crashed.code, 0, "{point}: the fault point was not reached");
        // Every object is the raw or the compressed one, and intact.
        env.coin(&["fsck"]).success();
        env.coin(&["checkout", &id, "--output", "out1"]).success();
        assert_same_tree(&a1, &env.path("out1"));
        // A rerun finishes the job.
        let r = env.coin(&["repack", "--json"]).success().json();
        let done = r["compressed"].as_u64().unwrap() + r["already_compressed"].as_u64().unwrap();
        assert_eq!(done, 4, "{point}: {r}");
        env.coin(&["fsck"]).success();
        env.coin(&["checkout", &id, "--output", "out2"]).success();
        assert_same_tree(&a1, &env.path("out2"));
    }
}

#[test]
fn compressed_objects_travel_as_stored_and_are_verified_on_arrival() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    let a1 = adapter(&env, "a1", 5);
    let id = commit(&env, "a1");
    env.coin(&["repack"]).success();
    env.git_in(&env.work(), &["init", "-q", "--bare", "shared.git"])
        .success();
    env.coin(&["remote", "add", "origin", "shared.git"])
        .success();
    env.coin(&["push"]).success();
    // The remote holds the compressed files byte for byte.
    let remote = compressed_files(&env.path("shared.git/coin"));
    let local = compressed_files(&env.work().join(".coin"));
    assert_eq!(remote.len(), 4);
    for (r, l) in remote.iter().zip(&local) {
        assert_eq!(std::fs::read(r).unwrap(), std::fs::read(l).unwrap());
    }
    let b = env.path("b");
    env.coin(&["clone", "shared.git", "b"]).success();
    env.coin_in(&b, &["fsck"]).success();
    env.coin_in(&b, &["checkout", &id, "--output", "../out"])
        .success();
    assert_same_tree(&a1, &env.path("out"));

    // A damaged compressed object on the remote is refused on arrival, nothing half-visible.
    let victim = &remote[0];
    let mut perms = std::fs::metadata(victim).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(victim, perms).unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let n = bytes.len();
    bytes[n - 9] ^= 0x21;
    std::fs::write(victim, &bytes).unwrap();
    let e = env.coin(&["clone", "shared.git", "c"]);
    assert_ne!(e.code, 0, "{}", e.stdout);
    let c_objects = env.path("c/.coin/objects");
    if c_objects.exists() {
        let name = victim.file_name().unwrap();
        let dir = victim.parent().unwrap().file_name().unwrap();
        assert!(!c_objects.join(dir).join(name).exists());
    }
}
