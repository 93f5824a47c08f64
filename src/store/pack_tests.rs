//! Pack tests: round trip, mixed loose and packed, gc pruning, merging, corruption,
//! transfers that write packs, leftovers of killed writers.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use super::super::safetensors::build_file;
use super::super::transport::{transfer, Direction, FsTransport};
use super::super::{Dtype, FileEntry, ObjectId, Store, StoreError};
use super::*;

fn store_in(dir: &Path, name: &str) -> Store {
    Store::init(&dir.join(name)).unwrap()
}

fn all_packs() -> PackOptions {
    PackOptions {
        min_objects: 1,
        ..PackOptions::default()
    }
}

/// A safetensors file of `n` small F32 tensors (distinct per `seed`) and one 2 MiB tensor
/// (too large to pack).
fn checkpoint(dir: &Path, name: &str, n: usize, seed: u32) -> (PathBuf, Vec<u8>) {
    let small: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            (0..64u32)
                .flat_map(|j| ((i as u32 * 1000 + j + seed) as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let big: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let names: Vec<String> = (0..n).map(|i| format!("layer.{i}.router")).collect();
    let mut tensors: Vec<(&str, Dtype, &[u64], &[u8])> = names
        .iter()
        .zip(&small)
        .map(|(name, b)| (name.as_str(), Dtype::F32, &[8u64, 8][..], b.as_slice()))
        .collect();
    tensors.push(("big", Dtype::U8, &[2 << 20][..], &big));
    let bytes = build_file(&tensors, &[]);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn loose_count(store: &Store) -> usize {
    store.loose_ids().unwrap().len()
}

fn ids_of(entry: &FileEntry) -> Vec<ObjectId> {
    match entry {
        FileEntry::Safetensors {
            header, tensors, ..
        } => std::iter::once(*header)
            .chain(tensors.iter().map(|t| t.id))
            .collect(),
        other => panic!("not safetensors: {other:?}"),
    }
}

#[test]
fn pack_round_trip_keeps_every_object_readable_and_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let (path, bytes) = checkpoint(tmp.path(), "m.safetensors", 40, 0);
    let entry = store.ingest_file(&path).unwrap();
    let before = store.list().unwrap();
    assert_eq!(before.len(), 42, "header + 40 small + 1 big");
    let store_type = store.root().join("store/type");
    assert_eq!(std::fs::read_to_string(&store_type).unwrap(), "loose\n");
    let report = store.pack_loose(&all_packs()).unwrap();
    // A store with packs says so, so that coins without packs refuse it.
    assert_eq!(std::fs::read_to_string(&store_type).unwrap(), "packed\n");
    assert_eq!(report.packed, 41, "{report:?}");
    assert_eq!(report.loose_removed, 41);
    assert_eq!(report.packs_written, 1);
    assert!(report.corrupt.is_empty());
    // Only the 2 MiB tensor stays loose.
    assert_eq!(loose_count(&store), 1);
    assert_eq!(store.list().unwrap(), before);
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.objects, stats.packed_objects, stats.packs),
        (42, 41, 1)
    );
    for id in &before {
        assert!(store.contains(id));
        store.verify(id).unwrap();
    }
    // A fresh handle (no cached index) finds them too.
    let reopened = Store::open(store.root()).unwrap();
    let out = tmp.path().join("out.safetensors");
    reopened.materialize(&entry, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    // Packing again finds nothing to do.
    let again = store.pack_loose(&all_packs()).unwrap();
    assert_eq!((again.packed, again.packs_written), (0, 0));
}

#[test]
fn ingest_writes_many_small_new_tensors_as_one_pack_and_a_few_as_files() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let (path, bytes) = checkpoint(tmp.path(), "m.safetensors", MIN_PACK_OBJECTS + 20, 0);
    let entry = store.ingest_file(&path).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.packs, 1);
    assert_eq!(stats.packed_objects, MIN_PACK_OBJECTS as u64 + 20);
    // The header blob and the 2 MiB tensor are files.
    assert_eq!(loose_count(&store), 2);
    let out = tmp.path().join("out");
    Store::open(store.root())
        .unwrap()
        .materialize(&entry, &out)
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    // A second stage with 10 new small tensors: those are files, the rest deduped.
    let (path, _) = checkpoint(tmp.path(), "n.safetensors", MIN_PACK_OBJECTS + 30, 0);
    let entry2 = store.ingest_file(&path).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.packs, loose_count(&store)), (1, 2 + 11), "{stats:?}");
    for id in ids_of(&entry2) {
        store.verify(&id).unwrap();
    }
}

#[test]
fn too_few_objects_are_not_packed_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let put = |range: std::ops::Range<usize>| {
        for i in range {
            store
                .put_blob_bytes(format!("record {i}").as_bytes())
                .unwrap();
        }
    };
    put(0..10);
    let report = store.pack_loose(&PackOptions::default()).unwrap();
    assert_eq!(report.packed, 0);
    assert_eq!(loose_count(&store), 10);
    put(10..MIN_PACK_OBJECTS);
    let report = store.pack_loose(&PackOptions::default()).unwrap();
    assert_eq!(report.packed, MIN_PACK_OBJECTS, "{report:?}");
    assert_eq!(loose_count(&store), 0);
}

#[test]
fn mixed_loose_and_packed_objects_serve_later_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let (p1, b1) = checkpoint(tmp.path(), "a.safetensors", 20, 0);
    let e1 = store.ingest_file(&p1).unwrap();
    store.pack_loose(&all_packs()).unwrap();
    // Half the tensors are shared with the packed checkpoint, the others are new.
    let (p2, b2) = checkpoint(tmp.path(), "b.safetensors", 30, 0);
    let e2 = store.ingest_file(&p2).unwrap();
    let ids1 = ids_of(&e1);
    let ids2 = ids_of(&e2);
    for id in ids2.iter().filter(|id| ids1.contains(id)) {
        // Already packed: not written again as a loose file.
        if *id != ids1[ids1.len() - 1] {
            assert!(!store.object_path(id).exists(), "{id} was written twice");
        }
    }
    let new: Vec<_> = ids2.iter().filter(|id| !ids1.contains(id)).collect();
    assert_eq!(new.len(), 11, "a new header and 10 new tensors");
    for id in new {
        assert!(store.object_path(id).is_file());
    }
    let out = tmp.path().join("out");
    store.materialize(&e1, &out.join("a")).unwrap();
    store.materialize(&e2, &out.join("b")).unwrap();
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b1);
    assert_eq!(std::fs::read(out.join("b")).unwrap(), b2);
    // A second pack, then a merge of both into one.
    store.pack_loose(&all_packs()).unwrap();
    assert_eq!(store.stats().unwrap().packs, 2);
    let merged = store
        .pack_loose(&PackOptions {
            merge: true,
            ..all_packs()
        })
        .unwrap();
    assert_eq!((merged.packs_written, merged.packs_removed), (1, 2));
    assert_eq!(store.stats().unwrap().packs, 1);
    store.materialize(&e2, &out.join("b2")).unwrap();
    assert_eq!(std::fs::read(out.join("b2")).unwrap(), b2);
    assert!(store.check_packs().unwrap().is_empty());
}

#[test]
fn many_packs_are_merged_into_one() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let mut ids = Vec::new();
    for round in 0..=MAX_PACKS {
        for i in 0..3 {
            ids.push(
                store
                    .put_blob_bytes(format!("record {round}.{i}").as_bytes())
                    .unwrap(),
            );
        }
        store.pack_loose(&all_packs()).unwrap();
    }
    let packs = store.stats().unwrap().packs as usize;
    assert!(packs <= MAX_PACKS, "{packs} packs were not merged");
    for id in &ids {
        store.verify(id).unwrap();
    }
    assert_eq!(store.list().unwrap().len(), ids.len());
}

#[test]
fn pruning_drops_dead_objects_from_packs_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let ids: Vec<ObjectId> = (0..20)
        .map(|i| {
            store
                .put_blob_bytes(format!("blob {i}").as_bytes())
                .unwrap()
        })
        .collect();
    store.pack_loose(&all_packs()).unwrap();
    let old_pack = store.refresh_packs().unwrap()[0].pack_path.clone();
    let size_before = store.stats().unwrap().stored_bytes;
    let live: std::collections::HashSet<ObjectId> = ids.iter().step_by(2).copied().collect();
    let report = store.prune_packs(&|id| live.contains(id)).unwrap();
    assert_eq!(report.dropped, 10);
    assert_eq!((report.packs_written, report.packs_removed), (1, 1));
    assert!(!old_pack.exists(), "the old pack must be gone");
    for id in &ids {
        assert_eq!(store.contains(id), live.contains(id), "{id}");
    }
    for id in &live {
        store.verify(id).unwrap();
    }
    let size_after = store.stats().unwrap().stored_bytes;
    assert!(size_after < size_before, "{size_after} >= {size_before}");
    assert_eq!(report.freed_bytes, size_before - size_after);
    // Nothing dead left: a second prune rewrites nothing.
    let again = store.prune_packs(&|id| live.contains(id)).unwrap();
    assert_eq!((again.dropped, again.packs_written), (0, 0));
    // Dropping everything leaves no pack at all.
    let all = store.prune_packs(&|_| false).unwrap();
    assert_eq!((all.dropped, all.packs_written), (10, 0));
    assert_eq!(store.stats().unwrap().packs, 0);
    assert!(store.list().unwrap().is_empty());
}

fn make_writable(path: &Path) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
}

fn flip(path: &Path, at: usize) {
    make_writable(path);
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_damaged_pack_or_index_is_reported_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let ids: Vec<ObjectId> = (0..5)
        .map(|i| {
            store
                .put_blob_bytes(format!("payload number {i}").as_bytes())
                .unwrap()
        })
        .collect();
    store.pack_loose(&all_packs()).unwrap();
    let pack = store.refresh_packs().unwrap()[0].clone();
    let entry = pack.find(&ids[3]).unwrap();
    // The last payload byte of one object.
    flip(&pack.pack_path, (entry.offset + entry.len - 1) as usize);
    let fresh = Store::open(store.root()).unwrap();
    match fresh.verify(&ids[3]) {
        Err(StoreError::Corrupt { path, .. }) => assert_eq!(path, pack.pack_path),
        other => panic!("expected a corrupt object in the pack, got {other:?}"),
    }
    assert!(fresh.read_blob(&ids[3]).is_err());
    fresh.verify(&ids[0]).unwrap();
    let problems = fresh.check_packs().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, pack.pack_path);
    assert!(problems[0].message.contains("checksum"), "{problems:?}");
    // A corrupt object is never copied into a new pack, and the old pack is kept.
    let err = fresh.prune_packs(&|id| *id != ids[1]).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(pack.pack_path.exists());
    assert_eq!(fresh.refresh_packs().unwrap().len(), 1);
    assert!(fresh.contains(&ids[1]));
    // A damaged index: its objects look missing and fsck's check names the index.
    flip(&pack.index_path, 20);
    let fresh = Store::open(store.root()).unwrap();
    assert!(!fresh.contains(&ids[0]));
    let problems = fresh.check_packs().unwrap();
    assert_eq!(problems[0].path, pack.index_path, "{problems:?}");
}

#[test]
fn index_encoding_round_trips_and_refuses_damage() {
    let mut entries: Vec<PackEntry> = (0..300u32)
        .map(|i| PackEntry {
            id: ObjectId::from(blake3::hash(&i.to_le_bytes())),
            offset: 16 + u64::from(i) * 10,
            len: 10,
        })
        .collect();
    let sum = [7u8; 32];
    let bytes = PackIndex::encode(&mut entries, &sum);
    let dir = Path::new("d");
    let idx = PackIndex::decode("pack-x", dir, &bytes).unwrap();
    assert_eq!(idx.entries, entries);
    assert_eq!(idx.checksum, sum);
    for e in &entries {
        assert_eq!(idx.find(&e.id), Some(*e));
    }
    assert_eq!(idx.find(&ObjectId::from(blake3::hash(b"absent"))), None);
    for n in [0, 10, bytes.len() - 1] {
        assert!(
            PackIndex::decode("pack-x", dir, &bytes[..n]).is_err(),
            "len {n}"
        );
    }
    for at in [0, 9, 13, 100, 2000, bytes.len() - 40, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 1;
        assert!(PackIndex::decode("pack-x", dir, &bad).is_err(), "byte {at}");
    }
}

#[test]
fn transfers_of_many_small_objects_arrive_as_a_verified_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let a = store_in(tmp.path(), "a");
    let b = store_in(tmp.path(), "b");
    let c = store_in(tmp.path(), "c");
    let (path, bytes) = checkpoint(tmp.path(), "m.safetensors", 150, 3);
    let entry = a.ingest_file(&path).unwrap();
    let ids = a.list().unwrap();
    let t = FsTransport::open(b.root(), false).unwrap();
    let mut calls = 0;
    let r = transfer(&a, &t, &ids, Direction::Push, &mut |_| calls += 1).unwrap();
    // Progress is reported once before the first copy, then once per object.
    assert_eq!((r.transferred, calls), (152, 153));
    // The 151 small objects as one pack; the big tensor as a file.
    let sb = b.stats().unwrap();
    assert_eq!((sb.packs, sb.packed_objects, sb.objects), (1, 151, 152));
    assert_eq!(loose_count(&b), 1);
    // From b's pack into an empty c.
    let tc = FsTransport::open(b.root(), false).unwrap();
    let r = transfer(&c, &tc, &ids, Direction::Fetch, &mut |_| {}).unwrap();
    assert_eq!(r.transferred, 152);
    assert_eq!(c.stats().unwrap().packed_objects, 151);
    let out = tmp.path().join("out");
    c.materialize(&entry, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    assert!(c.check_packs().unwrap().is_empty());
    // Again: nothing moves.
    let r = transfer(&a, &t, &ids, Direction::Push, &mut |_| {}).unwrap();
    assert_eq!((r.transferred, r.already_present), (0, 152));
}

#[test]
fn a_corrupt_object_in_a_transfer_makes_nothing_visible() {
    let tmp = tempfile::tempdir().unwrap();
    let a = store_in(tmp.path(), "a");
    let b = store_in(tmp.path(), "b");
    let ids: Vec<ObjectId> = (0..MIN_PACK_OBJECTS + 5)
        .map(|i| a.put_blob_bytes(format!("object {i}").as_bytes()).unwrap())
        .collect();
    let victim = a.object_path(&ids[50]);
    let len = std::fs::metadata(&victim).unwrap().len() as usize;
    flip(&victim, len - 1);
    let t = FsTransport::open(b.root(), false).unwrap();
    let err = transfer(&a, &t, &ids, Direction::Push, &mut |_| {}).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(b.list().unwrap().is_empty(), "nothing may be visible");
    assert_eq!(b.stats().unwrap().packs, 0);
    // The writer's temp file is dropped with it.
    assert!(b.temp_files().unwrap().is_empty());
}

#[test]
fn a_pack_without_an_index_is_invisible_and_cleaned_up_when_old() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(tmp.path(), "s");
    let ids: Vec<ObjectId> = (0..4)
        .map(|i| store.put_blob_bytes(format!("x{i}").as_bytes()).unwrap())
        .collect();
    store.pack_loose(&all_packs()).unwrap();
    let pack = store.refresh_packs().unwrap()[0].clone();
    // As if killed between the pack's rename and the index's: the index is missing.
    std::fs::remove_file(&pack.index_path).unwrap();
    let fresh = Store::open(store.root()).unwrap();
    assert!(fresh.list().unwrap().is_empty());
    assert!(!fresh.contains(&ids[0]));
    assert!(
        fresh.check_packs().unwrap().is_empty(),
        "a leftover is not damage"
    );
    assert_eq!(
        fresh.remove_dead_temp_files().unwrap(),
        0,
        "too young to judge"
    );
    make_writable(&pack.pack_path);
    let old = std::time::SystemTime::now() - 2 * DEAD_TEMP_AGE;
    std::fs::File::options()
        .write(true)
        .open(&pack.pack_path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(fresh.remove_dead_temp_files().unwrap(), 1);
    assert!(!pack.pack_path.exists());
}
