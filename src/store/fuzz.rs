//! Fuzz bodies: plain functions the cargo-fuzz targets in `fuzz/` call, and which the unit
//! tests run over a corpus of hostile inputs, so they are built and exercised on stable.
//! Each must return (an error is fine) and never panic or allocate without bound.

use super::{safetensors, FileEntry};

/// Parse arbitrary bytes as a whole safetensors file; when it parses, check the invariants
/// ingest relies on (tensors tile the data exactly).
pub fn safetensors_file(data: &[u8]) {
    if let Ok(h) = safetensors::parse_bytes(data) {
        let data_len = data.len() as u64 - h.data_start();
        let mut pos = 0;
        for t in &h.tensors {
            assert_eq!(t.begin, pos, "tensors must tile the data");
            assert!(t.end >= t.begin);
            pos = t.end;
        }
        assert_eq!(pos, data_len, "tensors must cover the data");
    }
}

/// Parse arbitrary bytes as a manifest file entry; when it parses, it must serialize and
/// parse back to the same value.
pub fn manifest_entry(data: &[u8]) {
    if let Ok(entry) = serde_json::from_slice::<FileEntry>(data) {
        let text = serde_json::to_vec(&entry).expect("a FileEntry always serializes");
        let back: FileEntry = serde_json::from_slice(&text).expect("own output parses");
        assert_eq!(back, entry);
    }
}

/// Check arbitrary bytes (as UTF-8, lossily) with the one path validator; when a path is
/// accepted it must be safe to join to a folder: only normal components, none naming git's
/// directory, no control character, and the join stays under the folder.
pub fn relative_path(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if super::check_relative_path(&text).is_ok() {
        let root = std::path::Path::new("/root-of-checkout");
        let joined = root.join(&*text);
        assert!(joined.starts_with(root), "{text:?} leaves its folder");
        for c in std::path::Path::new(&*text).components() {
            match c {
                std::path::Component::Normal(part) => {
                    let part = part.to_string_lossy();
                    assert!(!super::is_git_component(&part), "{text:?} names .git");
                }
                other => panic!("{text:?} has a {other:?} component"),
            }
        }
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(!text.contains('\\'), "{text:?}");
    }
}

/// Store arbitrary bytes as a `.bin` checkpoint file (the torch-zip path: split per storage
/// when the safe reader accepts the file, whole otherwise) in a fresh store, and rebuild it:
/// the rebuild must be byte-identical, whatever the bytes.
pub fn torchbin_ingest(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = super::Store::init(&dir.path().join(".coin")).expect("a fresh store");
    let src = dir.path().join("adapter_model.bin");
    super::fsutil::write_atomic(&src, data).expect("write the input");
    let entry = store.ingest_file(&src).expect("every file can be stored");
    let out = dir.path().join("rebuilt.bin");
    store
        .materialize(&entry, &out)
        .expect("what was stored rebuilds");
    let back = std::fs::read(&out).expect("read the rebuild");
    assert!(back == data, "the rebuild differs from the input");
}
