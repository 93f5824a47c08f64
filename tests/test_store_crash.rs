//! Crash tests for the object store's write path: `coin debug store-ingest` is aborted at
//! each fault point (COIN_FAULT), then the store must verify clean and a rerun must finish
//! and rebuild the files byte for byte.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::{run, TestEnvironment};

/// A small safetensors file: `tensors` × 4 KiB F32 tensors, the data derived from `seed`.
fn safetensors_file(tensors: usize, seed: u8) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let size = 4096u64;
    for i in 0..tensors {
        let b = i as u64 * size;
        header.insert(
            format!("layer.{i}.weight"),
            serde_json::json!({"dtype": "F32", "shape": [32, 32], "data_offsets": [b, b + size]}),
        );
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for i in 0..tensors * size as usize {
        out.push((i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i / 4096) as u8);
    }
    out
}

#[test]
fn killed_ingest_leaves_a_clean_store_at_every_fault_point() {
    let points = [
        "store.object.after_write",
        "store.object.before_rename",
        "store.object.after_rename",
        "store.object.after_write:3",
        "store.object.before_rename:2",
        "store.ingest.after_tensor",
        "store.ingest.after_tensor:3",
        "store.ingest.before_dir_sync",
    ];
    for point in points {
        let env = TestEnvironment::new();
        let file = safetensors_file(4, 1);
        env.write("m.safetensors", &file);
        env.write("config.json", b"{\"r\": 8}");
        let args = [
            "debug",
            "store-ingest",
            "--store",
            "s/.coin",
            "config.json",
            "m.safetensors",
        ];
        let crashed = run(env
            .coin_cmd(&env.work())
            .env("COIN_FAULT", point)
            .args(args));
        assert_ne!(crashed.code, 0, "{point}: the fault point was not reached");
        assert!(crashed.stdout.is_empty(), "{point}: {}", crashed.stdout);
        // Every object that exists is complete and intact.
        let v = env
            .coin(&["debug", "store-verify", "--store", "s/.coin"])
            .success()
            .json();
        assert_eq!(v["corrupt"].as_array().unwrap().len(), 0, "{point}");
        // A rerun completes and rebuilds both files exactly.
        let out = env.coin(&args).success();
        env.write("entries.json", out.stdout.as_bytes());
        env.coin(&[
            "debug",
            "store-materialize",
            "--store",
            "s/.coin",
            "--entries",
            "entries.json",
            "--output",
            "out",
        ])
        .success();
        assert_eq!(std::fs::read(env.path("out/m.safetensors")).unwrap(), file);
        assert_eq!(
            std::fs::read(env.path("out/config.json")).unwrap(),
            b"{\"r\": 8}"
        );
        let v = env
            .coin(&["debug", "store-verify", "--store", "s/.coin"])
            .success()
            .json();
        // header blob + 4 tensors + config blob
        assert_eq!(v["objects"], 6, "{point}");
    }
}

#[test]
fn corrupt_object_fails_verify_and_materialize() {
    let env = TestEnvironment::new();
    env.write("m.safetensors", safetensors_file(2, 9));
    let out = env
        .coin(&["debug", "store-ingest", "--store", ".coin", "m.safetensors"])
        .success();
    env.write("entries.json", out.stdout.as_bytes());
    let tensor_id = out.json()["entries"]["m.safetensors"]["tensors"][1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = env.path(format!(
        ".coin/objects/{}/{}",
        &tensor_id[..2],
        &tensor_id[2..]
    ));
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x10;
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let v = env
        .coin(&["debug", "store-verify", "--store", ".coin"])
        .code(1)
        .json();
    assert_eq!(v["corrupt"].as_array().unwrap().len(), 1);
    let failed = env
        .coin(&[
            "debug",
            "store-materialize",
            "--store",
            ".coin",
            "--entries",
            "entries.json",
            "--output",
            "out",
        ])
        .code(255);
    assert!(failed.stderr.contains(&tensor_id), "{}", failed.stderr);
    assert!(!env.path("out/m.safetensors").exists());
}

#[test]
fn killed_materialize_leaves_no_output_file() {
    let env = TestEnvironment::new();
    let file = safetensors_file(3, 5);
    env.write("m.safetensors", &file);
    let out = env
        .coin(&["debug", "store-ingest", "--store", ".coin", "m.safetensors"])
        .success();
    env.write("entries.json", out.stdout.as_bytes());
    let args = [
        "debug",
        "store-materialize",
        "--store",
        ".coin",
        "--entries",
        "entries.json",
        "--output",
        "out",
    ];
    let crashed = run(env
        .coin_cmd(&env.work())
        .env("COIN_FAULT", "store.materialize.before_rename")
        .args(args));
    assert_ne!(crashed.code, 0);
    assert!(!env.path("out/m.safetensors").exists());
    env.coin(&args).success();
    assert_eq!(std::fs::read(env.path("out/m.safetensors")).unwrap(), file);
}

#[test]
fn killed_packing_loses_nothing_at_every_fault_point() {
    let points = [
        "store.pack.after_object",
        "store.pack.after_object:7",
        "store.pack.before_rename",
        "store.pack.after_pack",
        "store.pack.after_index",
        "store.pack.after_remove_loose",
        "store.pack.after_remove_loose:5",
        "store.pack.after_remove_old",
        "store.pack.after_remove_old:2",
    ];
    for point in points {
        let env = TestEnvironment::new();
        let first = safetensors_file(12, 1);
        let second = safetensors_file(9, 2);
        env.write("a.safetensors", &first);
        env.write("b.safetensors", &second);
        let ingest = |file: &str| {
            let out = env
                .coin(&["debug", "store-ingest", "--store", "s/.coin", file])
                .success();
            env.write(format!("{file}.json"), out.stdout.as_bytes());
        };
        let pack = ["debug", "store-pack", "--store", "s/.coin", "--merge"];
        ingest("a.safetensors");
        // The merge points need a pack to merge: the first file is packed cleanly.
        if point.starts_with("store.pack.after_remove_old") {
            env.coin(&pack).success();
        }
        ingest("b.safetensors");
        let objects = |env: &TestEnvironment| {
            env.coin(&["debug", "store-verify", "--store", "s/.coin"])
                .success()
                .json()
        };
        let before = objects(&env)["objects"].clone();
        let crashed = run(env
            .coin_cmd(&env.work())
            .env("COIN_FAULT", point)
            .args(pack));
        assert_ne!(crashed.code, 0, "{point}: the fault point was not reached");
        // Every object is still there, complete and intact; no pack is half-visible.
        let v = objects(&env);
        assert_eq!(v["corrupt"].as_array().unwrap().len(), 0, "{point}: {v}");
        assert_eq!(v["objects"], before, "{point}");
        // A rerun completes: everything small ends in one pack, and both files rebuild.
        env.coin(&pack).success();
        let v = objects(&env);
        assert_eq!(v["objects"], before, "{point}");
        assert_eq!(v["packs"], 1, "{point}: {v}");
        assert_eq!(v["packed_objects"], before, "{point}: {v}");
        for (file, bytes) in [("a.safetensors", &first), ("b.safetensors", &second)] {
            env.coin(&[
                "debug",
                "store-materialize",
                "--store",
                "s/.coin",
                "--entries",
                &format!("{file}.json"),
                "--output",
                "out",
            ])
            .success();
            assert_eq!(
                &std::fs::read(env.path(format!("out/{file}"))).unwrap(),
                bytes
            );
            std::fs::remove_file(env.path(format!("out/{file}"))).unwrap();
        }
    }
}

#[test]
fn killed_ingest_into_a_pack_leaves_a_clean_store() {
    for point in [
        "store.pack.after_object:60",
        "store.pack.before_rename",
        "store.pack.after_pack",
        "store.pack.after_index",
    ] {
        let env = TestEnvironment::new();
        // 120 small tensors: ingest writes them as one pack.
        let file = safetensors_file(120, 3);
        env.write("m.safetensors", &file);
        let args = [
            "debug",
            "store-ingest",
            "--store",
            "s/.coin",
            "m.safetensors",
        ];
        let crashed = run(env
            .coin_cmd(&env.work())
            .env("COIN_FAULT", point)
            .args(args));
        assert_ne!(crashed.code, 0, "{point}: the fault point was not reached");
        let v = env
            .coin(&["debug", "store-verify", "--store", "s/.coin"])
            .success()
            .json();
        assert_eq!(v["corrupt"].as_array().unwrap().len(), 0, "{point}: {v}");
        // Either nothing of the pack is visible, or all of it.
        let packed = v["packed_objects"].as_u64().unwrap();
        assert!(packed == 0 || packed == 120, "{point}: {v}");
        let out = env.coin(&args).success();
        env.write("entries.json", out.stdout.as_bytes());
        env.coin(&[
            "debug",
            "store-materialize",
            "--store",
            "s/.coin",
            "--entries",
            "entries.json",
            "--output",
            "out",
        ])
        .success();
        assert_eq!(std::fs::read(env.path("out/m.safetensors")).unwrap(), file);
        let v = env
            .coin(&["debug", "store-verify", "--store", "s/.coin"])
            .success()
            .json();
        assert_eq!(
            (v["objects"].as_u64(), v["packed_objects"].as_u64()),
            (Some(121), Some(120)),
            "{point}: {v}"
        );
    }
}
