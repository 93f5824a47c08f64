//! Store tests: round trips, dedupe, corruption, hostile files.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use super::object::ObjectHeader;
use super::safetensors::build_file;
use super::*;

pub(crate) fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join(".coin")).unwrap();
    (dir, store)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn flip_byte(path: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut b = [0u8];
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
}

fn tensor_bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn init_open_and_layout() {
    let (dir, store) = store();
    let coin = dir.path().join(".coin");
    assert_eq!(
        std::fs::read_to_string(coin.join("format-version")).unwrap(),
        "1\n"
    );
    assert_eq!(
        std::fs::read_to_string(coin.join("store/type")).unwrap(),
        "loose\n"
    );
    assert!(coin.join("objects").is_dir());
    Store::init(&coin).unwrap();
    Store::open(&coin).unwrap();
    assert_eq!(store.root(), coin);
    assert!(matches!(
        Store::open(dir.path()).unwrap_err(),
        StoreError::NotInitialized { .. }
    ));
    std::fs::write(coin.join("format-version"), "2\n").unwrap();
    let e = Store::open(&coin).unwrap_err();
    assert!(matches!(e, StoreError::UnsupportedFormat { .. }), "{e}");
    assert!(Store::init(&coin).is_err());
}

#[test]
fn blob_round_trip_and_read_only_objects() {
    let (dir, store) = store();
    let id = store.put_blob_bytes(b"hello").unwrap();
    assert_eq!(store.read_blob(&id).unwrap(), b"hello");
    assert_eq!(store.put_blob_bytes(b"hello").unwrap(), id);
    assert!(store.contains(&id));
    let path = store.object_path(&id);
    let hex = id.to_hex();
    assert!(path.ends_with(format!("objects/{}/{}", &hex[..2], &hex[2..])));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
    }
    // The id is blake3 of the documented canonical encoding.
    assert_eq!(id, ObjectId::from(blake3::hash(b"blob 5\0hello")));
    // A file that is not safetensors becomes one blob.
    let p = write(dir.path(), "config.json", b"{\"r\": 8}");
    let entry = store.ingest_file(&p).unwrap();
    assert!(matches!(entry, FileEntry::Blob { size: 8, .. }));
    let out = dir.path().join("out/sub/config.json");
    store.materialize(&entry, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"{\"r\": 8}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
    assert_eq!(store.list().unwrap().len(), 2);
    // empty file
    let p = write(dir.path(), "empty", b"");
    let e = store.ingest_file(&p).unwrap();
    store
        .materialize(&e, &dir.path().join("empty.out"))
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("empty.out")).unwrap(), b"");
}

#[test]
fn tensor_id_covers_dtype_shape_and_bytes() {
    let (dir, store) = store();
    let data = [0u8; 8];
    let a = build_file(&[("t", Dtype::F32, &[2], &data)], &[]);
    let b = build_file(&[("t", Dtype::I32, &[2], &data)], &[]);
    let c = build_file(&[("t", Dtype::F32, &[1, 2], &data)], &[]);
    let ids: Vec<ObjectId> = [a, b, c]
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let p = write(dir.path(), &format!("{i}.safetensors"), f);
            match store.ingest_file(&p).unwrap() {
                FileEntry::Safetensors { tensors, .. } => tensors[0].id,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
    assert_eq!(
        ids[0],
        ObjectId::from(blake3::hash(b"tensor F32 [2] 8\0\0\0\0\0\0\0\0\0"))
    );
    let t = store.read_tensor(&ids[2]).unwrap();
    assert_eq!(
        (t.dtype, t.shape, t.data),
        (Dtype::F32, vec![1, 2], data.to_vec())
    );
    assert!(matches!(
        store.read_blob(&ids[0]).unwrap_err(),
        StoreError::WrongKind { .. }
    ));
}

#[test]
fn safetensors_round_trip_all_dtypes_and_dedupe() {
    let (dir, store) = store();
    let names: Vec<String> = Dtype::ALL.iter().map(|d| format!("w.{d}")).collect();
    let datas: Vec<Vec<u8>> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, d)| tensor_bytes(i as u8, d.byte_len(8).unwrap() as usize))
        .collect();
    let tensors: Vec<(&str, Dtype, &[u64], &[u8])> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, d)| (names[i].as_str(), *d, &[2u64, 4][..], datas[i].as_slice()))
        .collect();
    let bytes = build_file(&tensors, &[("format", "pt")]);
    let p = write(dir.path(), "adapter_model.safetensors", &bytes);
    let entry = store.ingest_file(&p).unwrap();
    let FileEntry::Safetensors {
        tensors: t, size, ..
    } = &entry
    else {
        panic!("{entry:?}")
    };
    assert_eq!(*size, bytes.len() as u64);
    assert_eq!(t.len(), Dtype::ALL.len());
    assert_eq!(store.stats().unwrap().objects, 1 + Dtype::ALL.len() as u64);
    let out = dir.path().join("out.safetensors");
    store.materialize(&entry, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    // Change one tensor: exactly one new tensor object (plus the header blob, whose offsets
    // are unchanged, so it dedupes too when the size is the same).
    let mut datas2 = datas.clone();
    datas2[3][0] ^= 0xff;
    let tensors2: Vec<(&str, Dtype, &[u64], &[u8])> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, d)| (names[i].as_str(), *d, &[2u64, 4][..], datas2[i].as_slice()))
        .collect();
    let before = store.stats().unwrap();
    let bytes2 = build_file(&tensors2, &[("format", "pt")]);
    let p2 = write(dir.path(), "step2.safetensors", &bytes2);
    let entry2 = store.ingest_file(&p2).unwrap();
    let after = store.stats().unwrap();
    assert_eq!(after.objects, before.objects + 1);
    store.materialize(&entry2, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes2);
    // The manifest entry survives JSON.
    let json = serde_json::to_string(&entry2).unwrap();
    assert_eq!(serde_json::from_str::<FileEntry>(&json).unwrap(), entry2);
    assert!(json.contains("\"kind\":\"safetensors\""));
}

#[test]
fn large_items_stream_through_the_two_pass_path() {
    // MAX_BUFFER is 64 MiB; use a blob larger than that only in release-like runs would be
    // slow, so exercise ingest_range's chunked path directly with a tiny buffer.
    let (dir, store) = store();
    let data = tensor_bytes(7, 100_003);
    let p = write(dir.path(), "big.bin", &data);
    let mut f = std::fs::File::open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    let id = store
        .ingest_range(
            &mut f,
            &p,
            0,
            data.len() as u64,
            object::ObjectHeader::blob(data.len() as u64),
            &mut buf,
        )
        .unwrap();
    assert_eq!(store.read_blob(&id).unwrap(), data);
    assert_eq!(id, store.put_blob_bytes(&data).unwrap());
    // Hashing only (object already present) takes the same path.
    let id2 = store
        .ingest_range(
            &mut f,
            &p,
            0,
            data.len() as u64,
            object::ObjectHeader::blob(data.len() as u64),
            &mut buf,
        )
        .unwrap();
    assert_eq!(id, id2);
}

#[test]
fn any_flipped_byte_is_found_and_materialize_leaves_nothing() {
    let (dir, store) = store();
    let bytes = build_file(
        &[
            ("a", Dtype::F16, &[4], &[1; 8]),
            ("b", Dtype::U8, &[3], &[2; 3]),
        ],
        &[],
    );
    let p = write(dir.path(), "m.safetensors", &bytes);
    let entry = store.ingest_file(&p).unwrap();
    for id in entry.object_ids() {
        let path = store.object_path(&id);
        let len = std::fs::metadata(&path).unwrap().len();
        for at in 0..len {
            flip_byte(&path, at);
            assert!(store.verify(&id).is_err(), "flip at {at} of {id} not found");
            let out = dir.path().join("out.safetensors");
            assert!(store.materialize(&entry, &out).is_err());
            assert!(!out.exists(), "materialize left a file");
            flip_byte(&path, at); // restore
            store.verify(&id).unwrap();
        }
    }
    // Only the out file's temp siblings could be left: none are.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".coin-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn truncated_or_missing_objects_are_errors() {
    let (_dir, store) = store();
    let id = store.put_blob_bytes(b"some bytes").unwrap();
    let path = store.object_path(&id);
    let data = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        store.verify(&id).unwrap_err(),
        StoreError::ObjectMissing { .. }
    ));
    std::fs::write(&path, &data[..data.len() - 1]).unwrap();
    let e = store.verify(&id).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    std::fs::write(&path, &data[..10]).unwrap();
    assert!(store.verify(&id).is_err());
    std::fs::remove_file(&path).unwrap();
    assert_eq!(store.remove(&id).unwrap(), 0);
}

#[test]
fn list_remove_stats() {
    let (_dir, store) = store();
    let a = store.put_blob_bytes(b"a").unwrap();
    let b = store.put_blob_bytes(b"b").unwrap();
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(store.list().unwrap(), expected);
    let stats = store.stats().unwrap();
    assert_eq!(stats.objects, 2);
    let freed = store.remove(&a).unwrap();
    assert!(freed > 1);
    assert_eq!(store.list().unwrap(), vec![b]);
    assert_eq!(
        store.stats().unwrap().stored_bytes,
        stats.stored_bytes - freed
    );
    // Stray files in objects/ are not objects.
    std::fs::write(store.root().join("objects/tmp/obj-x"), b"partial").unwrap();
    std::fs::create_dir_all(store.root().join("objects/zz")).unwrap();
    std::fs::write(store.root().join("objects/zz/notanobject"), b"").unwrap();
    assert_eq!(store.list().unwrap(), vec![b]);
    assert_eq!(store.temp_files().unwrap().len(), 1);
}

#[test]
fn only_temp_files_nobody_holds_are_removed() {
    let (_dir, store) = store();
    let old = std::time::SystemTime::now() - 2 * crate::store::DEAD_TEMP_AGE;
    let make = |name: &str, age: Option<std::time::SystemTime>| {
        let p = store.root().join("objects/tmp").join(name);
        std::fs::write(&p, b"partial").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        if let Some(t) = age {
            f.set_modified(t).unwrap();
        }
        (p, f)
    };
    let (dead, _) = make("obj-dead", Some(old));
    let (young, _) = make("obj-young", None);
    // A live writer (another process or thread) holds the lock on its temp file.
    let (live, live_file) = make("obj-live", Some(old));
    live_file.lock().unwrap();
    assert_eq!(store.remove_dead_temp_files().unwrap(), 1);
    assert!(!dead.exists(), "a dead writer's old temp file goes");
    assert!(young.exists(), "a file younger than the threshold stays");
    assert!(live.exists(), "a locked file stays, however old");
    live_file.unlock().unwrap();
    drop(live_file);
    assert_eq!(store.remove_dead_temp_files().unwrap(), 1);
    assert!(!live.exists());
}

#[test]
fn hostile_safetensors_files_are_refused_with_names() {
    let (dir, store) = store();
    let good = build_file(&[("layer.0.w", Dtype::F32, &[2], &[0; 8])], &[]);
    // truncated anywhere inside the header or data
    for cut in [0, 4, 8, 20, good.len() - 1] {
        let p = write(dir.path(), "t.safetensors", &good[..cut]);
        let e = store.ingest_file(&p).unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidSafetensors { .. }),
            "cut {cut}: {e}"
        );
        assert!(e.to_string().contains("t.safetensors"), "{e}");
    }
    let mut mismatch = good.clone();
    let text = String::from_utf8_lossy(&mismatch).replace("[2]", "[3]");
    mismatch = text.into_bytes();
    let p = write(dir.path(), "m.safetensors", &mismatch);
    let e = store.ingest_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("layer.0.w") && e.contains("m.safetensors"),
        "{e}"
    );
    // An unnamed file that starts like safetensors is held to the same rules.
    let p = write(dir.path(), "weights.bin", &good[..good.len() - 1]);
    assert!(store.ingest_file(&p).is_err());
    // But an unnamed file that does not start like one is just a blob.
    let p = write(dir.path(), "notes.txt", b"0123456789 hello");
    assert!(matches!(
        store.ingest_file(&p).unwrap(),
        FileEntry::Blob { .. }
    ));
    // Nothing half-written was left in the store by the refusals.
    assert!(store.temp_files().unwrap().is_empty());
}

#[test]
fn tampered_manifest_entries_are_refused() {
    let (dir, store) = store();
    let bytes = build_file(
        &[
            ("a", Dtype::F32, &[2], &[1; 8]),
            ("b", Dtype::F32, &[2], &[2; 8]),
        ],
        &[],
    );
    let p = write(dir.path(), "x.safetensors", &bytes);
    let entry = store.ingest_file(&p).unwrap();
    let FileEntry::Safetensors {
        header,
        size,
        tensors,
    } = entry.clone()
    else {
        panic!()
    };
    // wrong size
    let bad = FileEntry::Safetensors {
        header,
        size: size + 1,
        tensors: tensors.clone(),
    };
    assert!(store
        .materialize(&bad, &dir.path().join("z.safetensors"))
        .is_err());
    assert!(!dir.path().join("z.safetensors").exists());
    // a tensor id pointing at a blob
    let mut wrong = tensors.clone();
    wrong[0].id = header;
    let bad = FileEntry::Safetensors {
        header,
        size,
        tensors: wrong,
    };
    assert!(store
        .materialize(&bad, &dir.path().join("z.safetensors"))
        .is_err());
    // renamed tensor
    let mut renamed = tensors;
    renamed[0].name = "evil".into();
    let bad = FileEntry::Safetensors {
        header,
        size,
        tensors: renamed,
    };
    let e = store
        .materialize(&bad, &dir.path().join("z.safetensors"))
        .unwrap_err();
    assert!(e.to_string().contains("evil"), "{e}");
    assert!(!dir.path().join("z.safetensors").exists());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn dtype() -> impl Strategy<Value = Dtype> {
        proptest::sample::select(Dtype::ALL.to_vec())
    }

    /// (name, dtype, shape, bytes) with a byte count valid for the dtype.
    fn tensor() -> impl Strategy<Value = (String, Dtype, Vec<u64>, Vec<u8>)> {
        (
            "[a-z][a-z0-9._]{0,12}",
            dtype(),
            proptest::collection::vec(0u64..5, 0..4),
        )
            .prop_filter_map("sub-byte size", |(name, d, mut shape)| {
                // make F4/F6 byte-aligned by giving them a trailing dim of 4
                if d.bit_size() % 8 != 0 {
                    shape.push(4);
                }
                let n: u64 = shape.iter().product();
                d.byte_len(n).map(|b| (name, d, shape, b))
            })
            .prop_flat_map(|(name, d, shape, b)| {
                proptest::collection::vec(any::<u8>(), b as usize)
                    .prop_map(move |data| (name.clone(), d, shape.clone(), data))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn ingest_materialize_round_trip(
            tensors in proptest::collection::vec(tensor(), 0..6),
            metadata in proptest::collection::vec(("[a-z]{1,6}", "\\PC{0,10}"), 0..3),
            pad in 0usize..9,
        ) {
            // unique names
            let mut seen = std::collections::HashSet::new();
            let tensors: Vec<_> = tensors.into_iter().filter(|t| seen.insert(t.0.clone())).collect();
            let mut meta_seen = std::collections::HashSet::new();
            let metadata: Vec<_> = metadata.into_iter().filter(|m| meta_seen.insert(m.0.clone())).collect();
            let specs: Vec<(&str, Dtype, &[u64], &[u8])> = tensors
                .iter()
                .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
                .collect();
            let meta: Vec<(&str, &str)> = metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut bytes = build_file(&specs, &meta);
            // extra header padding (spaces after the JSON), as other writers do
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            for _ in 0..pad {
                bytes.insert(8 + n, b' ');
            }
            let new_n = (n + pad) as u64;
            bytes[..8].copy_from_slice(&new_n.to_le_bytes());

            let (dir, store) = store();
            let p = write(dir.path(), "f.safetensors", &bytes);
            let entry = store.ingest_file(&p).unwrap();
            let FileEntry::Safetensors { tensors: got, size, .. } = &entry else { panic!("{entry:?}") };
            prop_assert_eq!(*size, bytes.len() as u64);
            prop_assert_eq!(got.len(), tensors.len());
            let out = dir.path().join("out.safetensors");
            store.materialize(&entry, &out).unwrap();
            prop_assert_eq!(std::fs::read(&out).unwrap(), bytes.clone());
            for t in got {
                let back = store.read_tensor(&t.id).unwrap();
                let orig = tensors.iter().find(|o| o.0 == t.name).unwrap();
                prop_assert_eq!(back.dtype, orig.1);
                prop_assert_eq!(&back.shape, &orig.2);
                prop_assert_eq!(&back.data, &orig.3);
            }
            // Ingesting again adds nothing.
            let before = store.stats().unwrap();
            prop_assert_eq!(store.ingest_file(&p).unwrap(), entry.clone());
            prop_assert_eq!(store.stats().unwrap(), before);
            // The manifest entry round-trips through JSON.
            let json = serde_json::to_vec(&entry).unwrap();
            prop_assert_eq!(serde_json::from_slice::<FileEntry>(&json).unwrap(), entry);
        }

        #[test]
        fn blob_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let (dir, store) = store();
            let p = write(dir.path(), "x.bin", &data);
            let entry = store.ingest_file(&p).unwrap();
            let out = dir.path().join("y.bin");
            store.materialize(&entry, &out).unwrap();
            prop_assert_eq!(std::fs::read(&out).unwrap(), data);
        }

        #[test]
        fn parser_never_panics_on_mutations(
            seed in proptest::collection::vec(tensor(), 1..3),
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<proptest::sample::Index>(),
        ) {
            let specs: Vec<(&str, Dtype, &[u64], &[u8])> = seed
                .iter()
                .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
                .collect();
            let mut bytes = build_file(&specs, &[]);
            for (i, v) in flips {
                let at = i.index(bytes.len());
                bytes[at] = v;
            }
            fuzz::safetensors_file(&bytes);
            fuzz::safetensors_file(&bytes[..cut.index(bytes.len() + 1)]);
        }
    }
}

#[test]
fn the_torchbin_fuzz_body_rebuilds_real_and_damaged_checkpoints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let real = std::fs::read(root.join("train/moelora/adapter_model.bin")).unwrap();
    let mut corpus: Vec<Vec<u8>> = vec![vec![], b"PK\x03\x04".to_vec(), real.clone()];
    // Cut short at three places, and one byte flipped at each.
    for k in [1, 5, 9] {
        corpus.push(real[..real.len() * k / 10].to_vec());
        let mut flipped = real.clone();
        flipped[real.len() * k / 10] ^= 0x5a;
        corpus.push(flipped);
    }
    for c in &corpus {
        fuzz::torchbin_ingest(c);
    }
}

#[test]
fn fuzz_bodies_survive_a_hostile_corpus() {
    let t = r#""w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    let with_header = |json: &str, data: &[u8]| {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(data);
        out
    };
    let mut corpus: Vec<Vec<u8>> = vec![
        vec![],
        b"abc".to_vec(),
        u64::MAX.to_le_bytes().to_vec(),
        with_header("{", &[]),
        with_header(&format!("{{{t}}}"), &[0; 8]),
        with_header(&format!("{{{t},{t}}}"), &[0; 8]),
        with_header(&"[".repeat(10_000), &[]),
        with_header(
            r#"{"w":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
        with_header(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,8]}}"#,
            &[0; 8],
        ),
        with_header("{\"\u{0}\":{}}", &[]),
    ];
    let mut non_utf8 = 3u64.to_le_bytes().to_vec();
    non_utf8.extend_from_slice(b"{\xc3}");
    corpus.push(non_utf8);
    for c in &corpus {
        fuzz::safetensors_file(c);
    }
    let manifests: [&[u8]; 8] = [
        b"",
        b"{}",
        b"{\"kind\":\"blob\"}",
        b"{\"kind\":\"blob\",\"id\":\"00\",\"size\":1}",
        b"{\"kind\":\"safetensors\",\"header\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"size\":1,\"tensors\":[{\"name\":\"a\",\"dtype\":\"F9\",\"shape\":[],\"id\":\"x\",\"bytes\":1}]}",
        b"{\"kind\":\"blob\",\"id\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"size\":-1}",
        b"\xff\xfe",
        b"{\"kind\":\"blob\",\"id\":\"0000000000000000000000000000000000000000000000000000000000000000\",\"size\":3}",
    ];
    for m in manifests {
        fuzz::manifest_entry(m);
    }
    for p in [
        &b"../x"[..],
        b".git/config",
        b"a/.GIT./b",
        b"git~1/x",
        b"a\\b",
        b"/abs",
        b"ok/path.json",
        b".g\xe2\x80\x8cit/config",
        b"\xff\xfe/x",
        b"a:b",
    ] {
        fuzz::relative_path(p);
    }
    // The last one is valid and must parse.
    assert!(serde_json::from_slice::<FileEntry>(manifests[7]).is_ok());
}

#[test]
fn file_entry_json_refuses_unknown_fields_and_kinds() {
    let id = "0".repeat(64);
    let ok = format!(r#"{{"kind":"blob","id":"{id}","size":3}}"#);
    assert!(serde_json::from_str::<FileEntry>(&ok).is_ok());
    for bad in [
        format!(r#"{{"kind":"blob","id":"{id}","size":3,"extra":1}}"#),
        format!(r#"{{"kind":"tree","id":"{id}","size":3}}"#),
        format!(
            r#"{{"kind":"safetensors","header":"{id}","size":3,"tensors":[{{"name":"a","dtype":"F32","shape":[],"id":"{id}","bytes":4,"x":0}}]}}"#
        ),
        format!(
            r#"{{"kind":"safetensors","header":"{id}","size":3,"tensors":[{{"name":"a","dtype":"F7","shape":[],"id":"{id}","bytes":4}}]}}"#
        ),
    ] {
        assert!(serde_json::from_str::<FileEntry>(&bad).is_err(), "{bad}");
    }
}

/// The parallel ingest of a safetensors file: tensors larger than one read chunk, a tensor
/// repeated within the file, and a second version with one tensor changed that adds exactly
/// one object; both versions rebuild byte for byte.
#[test]
fn parallel_ingest_writes_each_new_tensor_once() {
    let (dir, store) = store();
    let big = 4 * 1024 * 1024 + 12_345; // more than one read chunk, not a multiple of it
    let a = tensor_bytes(1, big * 4);
    let b = tensor_bytes(2, 4096);
    let c = tensor_bytes(3, big * 4);
    let d = tensor_bytes(4, 64);
    let shape_big = [big as u64];
    let tensors: Vec<(&str, Dtype, &[u64], &[u8])> = vec![
        ("a", Dtype::F32, &shape_big, &a),
        ("b", Dtype::F32, &[1024], &b),
        ("b_again", Dtype::F32, &[1024], &b),
        ("c", Dtype::F32, &shape_big, &c),
        ("d", Dtype::U8, &[64], &d),
    ];
    let file = build_file(&tensors, &[]);
    let p = write(dir.path(), "m.safetensors", &file);
    let entry = store.ingest_file(&p).unwrap();
    // header blob + a, b, c, d: the repeated tensor is one object.
    assert_eq!(store.list().unwrap().len(), 5);
    let FileEntry::Safetensors {
        tensors: listed, ..
    } = &entry
    else {
        panic!("not stored as safetensors: {entry:?}");
    };
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "b_again", "c", "d"]);
    assert_eq!(listed[1].id, listed[2].id);
    for id in store.list().unwrap() {
        store.verify(&id).unwrap();
    }
    let out = dir.path().join("out/m.safetensors");
    store.materialize(&entry, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), file);

    let c2 = tensor_bytes(9, big * 4);
    let mut tensors2 = tensors.clone();
    tensors2[3] = ("c", Dtype::F32, &shape_big, &c2);
    let file2 = build_file(&tensors2, &[]);
    let p2 = write(dir.path(), "m2.safetensors", &file2);
    let entry2 = store.ingest_file(&p2).unwrap();
    assert_eq!(store.list().unwrap().len(), 6);
    let out2 = dir.path().join("out/m2.safetensors");
    store.materialize(&entry2, &out2).unwrap();
    assert_eq!(std::fs::read(&out2).unwrap(), file2);
    // The first version still rebuilds.
    store.materialize(&entry, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), file);
}

/// A tensor's object is written from a second read of the file, hashed as it is written: when
/// those bytes no longer hash to the id found before (the file changed in between), ingest
/// refuses with FileChanged and stores nothing under the wrong id.
#[test]
fn bytes_that_changed_after_hashing_are_never_stored() {
    let (dir, store) = store();
    let data = tensor_bytes(5, 3 * 1024 * 1024);
    let p = write(dir.path(), "t.bin", &data);
    let file = std::fs::File::open(&p).unwrap();
    let object = ObjectHeader::tensor(Dtype::U8, vec![data.len() as u64], data.len() as u64);
    // The id of what the file held "before": different bytes of the same length.
    let before = tensor_bytes(6, data.len());
    let mut h = object.id_hasher();
    h.update(&before);
    let stale = ObjectId::from(h.finalize());
    let mut buf = vec![0u8; 1024 * 1024];
    let e = store
        .write_range_verified(&file, &p, 0, data.len() as u64, &stale, &object, &mut buf)
        .unwrap_err();
    assert!(matches!(e, StoreError::FileChanged { .. }), "{e}");
    assert!(!store.contains(&stale));
    assert!(store.list().unwrap().is_empty());
    // With the right id the same call stores a verified object and names its directory.
    let mut h = object.id_hasher();
    h.update(&data);
    let id = ObjectId::from(h.finalize());
    let dir_written = store
        .write_range_verified(&file, &p, 0, data.len() as u64, &id, &object, &mut buf)
        .unwrap();
    assert_eq!(
        dir_written.as_deref(),
        store.object_path(&id).parent(),
        "the new object's directory is returned for the caller to sync"
    );
    store.verify(&id).unwrap();
    // An object that exists is not written again.
    let again = store
        .write_range_verified(&file, &p, 0, data.len() as u64, &id, &object, &mut buf)
        .unwrap();
    assert_eq!(again, None);
}
