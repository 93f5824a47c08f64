//! Per-storage dedupe of `torch.save` zip checkpoints ([`FileEntry::Torchbin`]).
//!
//! A torch zip checkpoint (PEFT's `adapter_model.bin`, CoIN's `non_lora_trainables.bin`) keeps
//! each tensor storage uncompressed in a zip entry `<prefix>/data/<key>`. coin opens the file
//! with its safe reader ([`super::pickle::TorchZip`]: bounded, no code execution), then cuts
//! every storage's bytes out of the file: each becomes a one-dimensional tensor object, and
//! what is left (local headers, `data.pkl`, `version`, padding, other members, the central
//! directory, all verbatim) becomes one blob, the *layout*. Rebuilding writes the layout back
//! with each storage's bytes re-inserted at its offset, so the file is byte-identical whatever
//! the zip headers say; the whole file's blake3 is recorded and checked on every rebuild.
//!
//! A file the reader refuses (hostile or unknown: a pickle GLOBAL outside the allow-list, a
//! truncated zip, a deflated storage, storages that overlap) is not an error: it is stored as
//! one blob, exactly as before this format existed, so nothing the user commits is lost.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::object::{ObjectHeader, ObjectKind};
use super::pickle::{Limits, StorageSpan, TorchZip};
use super::repo::{hash_update, MAX_BUFFER};
use super::{fault, FileEntry, ObjectId, StorageEntry, Store, StoreError, TorchTensorEntry};

/// The first bytes of a zip archive (a local file header).
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// Largest layout blob (the file minus its storages). Real checkpoints' layouts are a few KB
/// per tensor; a file with more non-storage bytes than this is stored as one blob.
pub(super) const MAX_LAYOUT: u64 = MAX_BUFFER;

/// What the safe reader found: the storages to cut out, in file order, and the tensors.
#[derive(Debug)]
pub(super) struct Plan {
    storages: Vec<(String, StorageSpan)>,
    tensors: Vec<TorchTensorEntry>,
}

/// Whether `file` starts like a zip archive (the position is left at the start).
pub(super) fn starts_like_zip(file: &mut File, path: &Path) -> Result<bool, StoreError> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))
        .map_err(|e| StoreError::io("read", path, e))?;
    let mut got = 0;
    while got < 4 {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("read", path, e)),
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| StoreError::io("read", path, e))?;
    Ok(got == 4 && &magic == ZIP_MAGIC)
}

/// Open `path` with the safe reader and plan the cut; `None` when the file is not a torch
/// checkpoint coin can split (it is then stored as one blob).
pub(super) fn plan(path: &Path, len: u64) -> Option<Plan> {
    let zip = TorchZip::open(path, &Limits::default()).ok()?;
    plan_from(&zip, len)
}

fn plan_from<R>(zip: &TorchZip<R>, len: u64) -> Option<Plan>
where
    R: Read + Seek,
{
    let keys: BTreeSet<&str> = zip.tensors().iter().map(|t| t.storage.as_str()).collect();
    let mut storages = Vec::with_capacity(keys.len());
    for key in keys {
        storages.push((key.to_string(), *zip.storage(key)?));
    }
    storages.sort_by_key(|(_, s)| (s.file_offset, s.len));
    let mut end = 0u64;
    let mut cut = 0u64;
    for (_, s) in &storages {
        if s.file_offset < end {
            return None;
        }
        end = s.file_offset.checked_add(s.len).filter(|e| *e <= len)?;
        cut += s.len;
    }
    if len - cut > MAX_LAYOUT {
        return None;
    }
    let tensors = zip
        .tensors()
        .iter()
        .map(|t| TorchTensorEntry {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            strides: t.strides.iter().map(|&d| d as u64).collect(),
            storage: t.storage.clone(),
            offset: t.offset,
        })
        .collect();
    Some(Plan { storages, tensors })
}

fn storage_header(s: &StorageSpan) -> ObjectHeader {
    ObjectHeader::tensor(s.dtype, vec![s.numel], s.len)
}

/// A writer that hashes what passes through it.
struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: blake3::Hasher,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        hash_update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Append file bytes `from..to` to `layout` and to the whole-file hash.
fn keep(
    file: &mut File,
    path: &Path,
    from: u64,
    to: u64,
    layout: &mut Vec<u8>,
    whole: &mut blake3::Hasher,
) -> Result<(), StoreError> {
    let start = layout.len();
    layout.resize(start + (to - from) as usize, 0);
    file.seek(SeekFrom::Start(from))
        .and_then(|_| file.read_exact(&mut layout[start..]))
        .map_err(|e| StoreError::io("read", path, e))?;
    hash_update(whole, &layout[start..]);
    Ok(())
}

impl Store {
    /// Store a torch checkpoint the safe reader accepted: one tensor object per storage and
    /// the layout blob. The file is read once, in order (a storage that is a new object is
    /// read a second time while it is written, and re-hashed); a file that changes meanwhile
    /// is refused ([`StoreError::FileChanged`]).
    pub(super) fn ingest_torchbin(
        &self,
        file: &mut File,
        path: &Path,
        len: u64,
        plan: &Plan,
    ) -> Result<FileEntry, StoreError> {
        let read_err = |e| StoreError::io("read", path, e);
        let changed = || StoreError::FileChanged {
            path: path.to_path_buf(),
        };
        let largest = plan.storages.iter().map(|(_, s)| s.len).max().unwrap_or(0);
        let mut buf = vec![0u8; largest.clamp(1, MAX_BUFFER) as usize];
        let cut: u64 = plan.storages.iter().map(|(_, s)| s.len).sum();
        let mut layout = Vec::with_capacity((len - cut) as usize);
        let mut whole = blake3::Hasher::new();
        let mut pos = 0u64;
        let mut storages = Vec::with_capacity(plan.storages.len());
        for (key, s) in &plan.storages {
            keep(file, path, pos, s.file_offset, &mut layout, &mut whole)?;
            let header = storage_header(s);
            let mut h = header.id_hasher();
            let mut left = s.len;
            file.seek(SeekFrom::Start(s.file_offset))
                .map_err(read_err)?;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                file.read_exact(&mut buf[..n]).map_err(read_err)?;
                hash_update(&mut h, &buf[..n]);
                hash_update(&mut whole, &buf[..n]);
                left -= n as u64;
            }
            let id = ObjectId::from(h.finalize());
            if !self.contains(&id) {
                let written =
                    self.ingest_range(file, path, s.file_offset, s.len, header, &mut buf)?;
                if written != id {
                    return Err(changed());
                }
            }
            fault::point("store.ingest.after_tensor");
            pos = s.file_offset + s.len;
            storages.push(StorageEntry {
                key: key.clone(),
                dtype: s.dtype,
                offset: s.file_offset,
                bytes: s.len,
                id,
            });
        }
        keep(file, path, pos, len, &mut layout, &mut whole)?;
        let now = file
            .metadata()
            .map_err(|e| StoreError::io("read the metadata of", path, e))?
            .len();
        if now != len {
            return Err(changed());
        }
        let layout_id = self.put_blob_bytes(&layout)?;
        Ok(FileEntry::Torchbin {
            layout: layout_id,
            size: len,
            file_hash: ObjectId::from(whole.finalize()),
            storages,
            tensors: plan.tensors.clone(),
        })
    }

    /// Check a torch checkpoint entry against its objects (headers only): the layout is a
    /// blob no larger than [`MAX_LAYOUT`] and, with the storages, adds up to the file size;
    /// every storage is a tensor object of its dtype and element count.
    pub(super) fn check_torchbin_entry(
        &self,
        layout: &ObjectId,
        size: u64,
        storages: &[StorageEntry],
    ) -> Result<(), StoreError> {
        let mismatch = |reason: String| StoreError::BadEntry { reason };
        let (_, h) = self.open_object(layout)?;
        if h.kind != ObjectKind::Blob {
            return Err(StoreError::WrongKind {
                id: *layout,
                found: h.kind.as_str(),
                expected: ObjectKind::Blob.as_str(),
            });
        }
        if h.payload_len > MAX_LAYOUT {
            return Err(mismatch(format!(
                "layout blob {} is {} bytes, more than a torch checkpoint's layout may be",
                layout.short(),
                h.payload_len
            )));
        }
        let cut = storages
            .iter()
            .try_fold(0u64, |n, s| n.checked_add(s.bytes))
            .ok_or_else(|| mismatch("the storage sizes overflow".into()))?;
        if h.payload_len.checked_add(cut) != Some(size) {
            return Err(mismatch(format!(
                "layout ({} bytes) and storages ({cut} bytes) do not add up to the manifest's size {size}",
                h.payload_len
            )));
        }
        for s in storages {
            let (_, h) = self.open_object(&s.id)?;
            if h.kind != ObjectKind::Tensor {
                return Err(StoreError::WrongKind {
                    id: s.id,
                    found: h.kind.as_str(),
                    expected: ObjectKind::Tensor.as_str(),
                });
            }
            let want = s.numel().map(|n| (s.dtype, vec![n]));
            if h.tensor != want || h.payload_len != s.bytes {
                return Err(mismatch(format!(
                    "storage '{}': object {} is not {} bytes of {}",
                    s.key.escape_debug(),
                    s.id.short(),
                    s.bytes,
                    s.dtype
                )));
            }
        }
        Ok(())
    }

    /// Write the file a checked torch checkpoint entry describes into `out`: the layout with
    /// each storage re-inserted at its offset; every object's hash is verified as it streams,
    /// and the result's blake3 must equal `file_hash`.
    pub(super) fn write_torchbin(
        &self,
        layout: &ObjectId,
        file_hash: &ObjectId,
        storages: &[StorageEntry],
        out: &mut dyn Write,
        out_path: &Path,
    ) -> Result<(), StoreError> {
        let layout_bytes = self.read_blob(layout)?;
        let mut w = HashingWriter {
            inner: out,
            hasher: blake3::Hasher::new(),
        };
        let write_err = |e| StoreError::io("write", out_path, e);
        let mut file_pos = 0u64;
        let mut layout_pos = 0usize;
        for s in storages {
            // check_entry made sure offsets grow and everything adds up to the layout's size.
            let gap = (s.offset - file_pos) as usize;
            let piece = layout_bytes
                .get(layout_pos..layout_pos + gap)
                .ok_or_else(|| StoreError::EntryMismatch {
                    path: out_path.to_path_buf(),
                    reason: format!(
                        "storage '{}' lies beyond the layout blob",
                        s.key.escape_debug()
                    ),
                })?;
            w.write_all(piece).map_err(write_err)?;
            layout_pos += gap;
            self.copy_object(&s.id, Some(ObjectKind::Tensor), &mut w, out_path)?;
            file_pos = s.offset + s.bytes;
        }
        w.write_all(&layout_bytes[layout_pos..])
            .map_err(write_err)?;
        let got = ObjectId::from(w.hasher.finalize());
        if got != *file_hash {
            return Err(StoreError::EntryMismatch {
                path: out_path.to_path_buf(),
                reason: format!(
                    "the rebuilt file's blake3 is {}, the manifest says {}",
                    got.short(),
                    file_hash.short()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use std::path::PathBuf;

    use super::super::pickle::tests::{checkpoint, f32_bytes, fixture, state_dict, t, P};
    use super::super::tests::store;
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Ingest, rebuild, and check the rebuilt bytes equal the file's.
    fn round_trip(store: &Store, path: &Path) -> FileEntry {
        let entry = store.ingest_file(path).unwrap();
        let out = path.with_extension("out");
        store.materialize(&entry, &out).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(path).unwrap(),
            "{} was not rebuilt byte for byte",
            path.display()
        );
        entry
    }

    /// The offsets of the local header of entry `name` (a scan for its signature).
    fn local_header(file: &[u8], name: &str) -> usize {
        (0..file.len() - 30)
            .find(|&i| {
                &file[i..i + 4] == ZIP_MAGIC && {
                    let n = u16::from_le_bytes([file[i + 26], file[i + 27]]) as usize;
                    file.get(i + 30..i + 30 + n) == Some(name.as_bytes())
                }
            })
            .expect("entry")
    }

    /// Three storages, one viewed by two tensors.
    fn three_storages(b: &[f32]) -> Vec<u8> {
        let mut view = t("base.lora_A.weight", "0", 4, &[2], &[1]);
        view.offset = 2;
        let pkl = state_dict(&[
            t("base.weight", "0", 4, &[2, 2], &[2, 1]),
            view,
            t("base.lora_B.weight", "1", 3, &[3], &[1]),
            t("mm_projector.bias", "2", 2, &[2], &[1]),
        ]);
        checkpoint(
            &pkl,
            &[
                ("0", f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                ("1", f32_bytes(b)),
                ("2", f32_bytes(&[7.0, 8.0])),
            ],
        )
    }

    #[test]
    fn real_torch_fixtures_round_trip_byte_for_byte() {
        let (dir, store) = store();
        for rel in [
            "parity/mm_projector.bin",
            "train/moelora/adapter_model.bin",
            "train/moelora/non_lora_trainables.bin",
            "split_setup/mm_projector.bin",
            "split_setup/clip/pytorch_model.bin",
            "split_setup/vicuna/pytorch_model-00001-of-00002.bin",
            "split_setup/vicuna/pytorch_model-00002-of-00002.bin",
        ] {
            let copy = write(
                dir.path(),
                "ckpt.bin",
                &std::fs::read(fixture(rel)).unwrap(),
            );
            let entry = round_trip(&store, &copy);
            let zip = TorchZip::open(&copy, &Limits::default()).unwrap();
            let FileEntry::Torchbin {
                storages, tensors, ..
            } = &entry
            else {
                panic!("{rel} was not split: {entry:?}")
            };
            assert_eq!(tensors.len(), zip.tensors().len(), "{rel}");
            assert!(!storages.is_empty(), "{rel}");
            // Each storage object holds exactly the storage's bytes.
            let mut zip = zip;
            for s in storages {
                let data = store.read_tensor(&s.id).unwrap();
                assert_eq!(
                    data.data,
                    zip.read_storage(&s.key).unwrap(),
                    "{rel} {}",
                    s.key
                );
            }
            entry.check().unwrap();
        }
    }

    #[test]
    fn shared_storages_are_stored_once_and_named_per_tensor() {
        let (dir, store) = store();
        let path = write(
            dir.path(),
            "adapter_model.bin",
            &three_storages(&[4.0, 5.0, 6.0]),
        );
        let entry = round_trip(&store, &path);
        let FileEntry::Torchbin {
            storages, tensors, ..
        } = &entry
        else {
            panic!("{entry:?}")
        };
        assert_eq!(storages.len(), 3);
        assert_eq!(tensors.len(), 4);
        let named = entry.named_tensors();
        assert_eq!(named[0].name, "base.weight");
        assert_eq!(named[1].name, "base.lora_A.weight");
        assert_eq!(
            named[0].id, named[1].id,
            "a view shares its storage's object"
        );
        assert_eq!(named[1].bytes, 16, "a view lists its whole storage's bytes");
        assert_eq!(tensors[1].offset, 2);
        // 3 storages + 1 layout.
        assert_eq!(store.stats().unwrap().objects, 4);
    }

    #[test]
    fn a_second_stage_with_one_changed_storage_adds_only_it_and_the_layout() {
        let (dir, store) = store();
        let one = write(dir.path(), "one.bin", &three_storages(&[4.0, 5.0, 6.0]));
        let a = round_trip(&store, &one);
        let before = store.stats().unwrap().objects;
        let two = write(dir.path(), "two.bin", &three_storages(&[4.0, 5.5, 6.0]));
        let b = round_trip(&store, &two);
        // The new storage, and a new layout (the zip headers carry the entry's CRC-32).
        assert_eq!(store.stats().unwrap().objects, before + 2);
        let (FileEntry::Torchbin { storages: sa, .. }, FileEntry::Torchbin { storages: sb, .. }) =
            (&a, &b)
        else {
            panic!("not split")
        };
        let changed: Vec<&str> = sa
            .iter()
            .zip(sb)
            .filter(|(x, y)| x.id != y.id)
            .map(|(x, _)| x.key.as_str())
            .collect();
        assert_eq!(changed, ["1"]);
        // The same storage bytes with a stale CRC: the layout is reused too.
        let mut bytes = three_storages(&[4.0, 5.0, 6.0]);
        let at = local_header(&bytes, "archive/data/1");
        let n = u16::from_le_bytes([bytes[at + 26], bytes[at + 27]]) as usize;
        let data = at + 30 + n + u16::from_le_bytes([bytes[at + 28], bytes[at + 29]]) as usize;
        bytes[data] ^= 1;
        let before = store.stats().unwrap().objects;
        let three = write(dir.path(), "three.bin", &bytes);
        round_trip(&store, &three);
        assert_eq!(store.stats().unwrap().objects, before + 1);
    }

    #[test]
    fn hostile_or_unknown_files_are_stored_whole_without_losing_bytes() {
        let (dir, store) = store();
        let good = three_storages(&[4.0, 5.0, 6.0]);
        // Truncated.
        let cut = write(dir.path(), "cut.bin", &good[..good.len() / 2]);
        assert!(matches!(round_trip(&store, &cut), FileEntry::Blob { .. }));
        // A GLOBAL outside the allow-list.
        let mut p = P::new();
        p.global("os", "system")
            .str("echo pwned")
            .op(0x85)
            .op(b'R')
            .op(b'.');
        let evil = write(dir.path(), "evil.bin", &checkpoint(&p.0, &[]));
        assert!(matches!(round_trip(&store, &evil), FileEntry::Blob { .. }));
        // A storage the pickle declares larger than its zip entry (out of range).
        let pkl = state_dict(&[t("w", "0", 100, &[100], &[1])]);
        let short = write(
            dir.path(),
            "short.bin",
            &checkpoint(&pkl, &[("0", f32_bytes(&[1.0]))]),
        );
        assert!(matches!(round_trip(&store, &short), FileEntry::Blob { .. }));
        // A storage whose local header says deflated: stored and rebuilt exactly.
        let mut deflated = good.clone();
        let at = local_header(&deflated, "archive/data/1");
        deflated[at + 8..at + 10].copy_from_slice(&8u16.to_le_bytes());
        let d = write(dir.path(), "deflated.bin", &deflated);
        round_trip(&store, &d);
        // A local header lying about its sizes: the zip reader uses the central directory,
        // and the lie is kept verbatim in the layout.
        let mut lying = good.clone();
        let at = local_header(&lying, "archive/data/2");
        lying[at + 18..at + 26].copy_from_slice(&[0xff; 8]);
        let l = write(dir.path(), "lying.bin", &lying);
        round_trip(&store, &l);
        // Not a zip at all, and an empty file.
        let text = write(dir.path(), "notes.bin", b"PK\x03\x04 but not a zip");
        assert!(matches!(round_trip(&store, &text), FileEntry::Blob { .. }));
        let empty = write(dir.path(), "empty.bin", b"");
        assert!(matches!(round_trip(&store, &empty), FileEntry::Blob { .. }));
    }

    #[test]
    fn moelora_mlp_weight_aliases_share_one_object() {
        // MoELoRA's state_dict lists `loraA.{e}.mlp.weight` beside `loraA.{e}.weight`, both
        // on one storage (coin-run-layout.md §3): one object, two names.
        let (dir, store) = store();
        let pkl = state_dict(&[
            t("experts.loraA.0.weight", "0", 4, &[2, 2], &[2, 1]),
            t("experts.loraA.0.mlp.weight", "0", 4, &[2, 2], &[2, 1]),
        ]);
        let alias = write(
            dir.path(),
            "pytorch_model.bin",
            &checkpoint(&pkl, &[("0", f32_bytes(&[1.0, 2.0, 3.0, 4.0]))]),
        );
        let e = round_trip(&store, &alias);
        let named = e.named_tensors();
        assert_eq!(named.len(), 2);
        assert_eq!(named[0].id, named[1].id);
        let FileEntry::Torchbin { storages, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(storages.len(), 1);
    }

    #[test]
    fn empty_storages_and_bf16_round_trip() {
        let (dir, store) = store();
        let mut half = t("h", "1", 3, &[3], &[1]);
        half.class = "BFloat16Storage";
        let pkl = state_dict(&[t("empty", "0", 0, &[0], &[1]), half]);
        let path = write(
            dir.path(),
            "e.bin",
            &checkpoint(&pkl, &[("0", Vec::new()), ("1", vec![1, 2, 3, 4, 5, 6])]),
        );
        let entry = round_trip(&store, &path);
        let FileEntry::Torchbin { storages, .. } = &entry else {
            panic!("not split: {entry:?}")
        };
        assert_eq!(storages.len(), 2);
        assert_eq!(storages[0].bytes + storages[1].bytes, 6);
        assert!(storages
            .iter()
            .any(|s| s.dtype == super::super::Dtype::BF16));
    }

    #[test]
    fn zip64_entries_extra_members_and_alignment_padding_round_trip() {
        use std::io::Write as _;
        let (dir, store) = store();
        let pkl = state_dict(&[t("a", "0", 3, &[3], &[1]), t("b", "1", 2, &[2], &[1])]);
        // zip64 extra fields on every entry (as torch writes past 4 GiB), storages aligned
        // to 64 bytes (torch aligns them), and the member newer torch adds.
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        let aligned = opts.with_alignment(64);
        for (name, data, o) in [
            ("archive/data.pkl", pkl.clone(), opts),
            ("archive/byteorder", b"little".to_vec(), opts),
            ("archive/data/0", f32_bytes(&[1.0, 2.0, 3.0]), aligned),
            ("archive/data/1", f32_bytes(&[4.0, 5.0]), aligned),
            ("archive/version", b"3\n".to_vec(), opts),
            (
                "archive/.data/serialization_id",
                b"1234567890".to_vec(),
                opts,
            ),
        ] {
            w.start_file(name, o).unwrap();
            w.write_all(&data).unwrap();
        }
        let bytes = w.finish().unwrap().into_inner();
        // The storage's local header really carries a zip64 extra field (tag 0x0001).
        let at = local_header(&bytes, "archive/data/0");
        let n = u16::from_le_bytes([bytes[at + 26], bytes[at + 27]]) as usize;
        let m = u16::from_le_bytes([bytes[at + 28], bytes[at + 29]]) as usize;
        let extra = &bytes[at + 30 + n..at + 30 + n + m];
        let mut tags = Vec::new();
        let mut i = 0;
        while i + 4 <= extra.len() {
            tags.push(u16::from_le_bytes([extra[i], extra[i + 1]]));
            i += 4 + u16::from_le_bytes([extra[i + 2], extra[i + 3]]) as usize;
        }
        assert!(tags.contains(&1), "no zip64 field: {tags:?}");
        let path = write(dir.path(), "big.bin", &bytes);
        let entry = round_trip(&store, &path);
        let FileEntry::Torchbin { storages, .. } = &entry else {
            panic!("not split: {entry:?}")
        };
        assert_eq!(storages.len(), 2);
        assert!(storages.iter().all(|s| s.offset % 64 == 0), "{storages:?}");
    }

    #[test]
    fn entries_that_lie_are_refused_and_leave_nothing() {
        let (dir, store) = store();
        let path = write(dir.path(), "a.bin", &three_storages(&[4.0, 5.0, 6.0]));
        let entry = store.ingest_file(&path).unwrap();
        let FileEntry::Torchbin {
            layout,
            size,
            file_hash,
            storages,
            tensors,
        } = entry
        else {
            panic!("not split")
        };
        let with =
            |storages: Vec<StorageEntry>, file_hash: ObjectId, size: u64| FileEntry::Torchbin {
                layout,
                size,
                file_hash,
                storages,
                tensors: tensors.clone(),
            };
        let out = dir.path().join("out.bin");
        // Overlapping storages.
        let mut overlap = storages.clone();
        overlap[1].offset = overlap[0].offset + 1;
        let e = with(overlap, file_hash, size).check().unwrap_err();
        assert!(e.contains("inside the previous storage"), "{e}");
        // A storage beyond the file.
        let mut beyond = storages.clone();
        beyond[2].offset = size;
        let e = with(beyond, file_hash, size).check().unwrap_err();
        assert!(e.contains("beyond the file"), "{e}");
        // A tensor naming a storage that is not listed.
        let mut fewer = storages.clone();
        fewer.remove(0);
        assert!(with(fewer, file_hash, size).check().is_err());
        // Sizes that do not add up.
        let err = store
            .materialize(&with(storages.clone(), file_hash, size + 1), &out)
            .unwrap_err();
        assert!(err.to_string().contains("do not add up"), "{err}");
        assert!(!out.exists());
        // A file hash that does not match the rebuilt bytes.
        let wrong_hash = ObjectId::from(blake3::hash(b"another file"));
        let err = store
            .materialize(&with(storages.clone(), wrong_hash, size), &out)
            .unwrap_err();
        assert!(err.to_string().contains("blake3"), "{err}");
        assert!(!out.exists());
        store
            .materialize(&with(storages, file_hash, size), &out)
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&path).unwrap());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            /// Whatever happens to a checkpoint's bytes (a byte changed anywhere: headers,
            /// data.pkl, storages, central directory; or the file cut short), ingest succeeds
            /// (split or whole) and the rebuild is byte-identical.
            #[test]
            fn damaged_checkpoints_are_never_lost(
                values in proptest::collection::vec(-4.0f32..4.0, 3),
                at in any::<prop::sample::Index>(),
                xor in 1u8..=255,
                cut in any::<prop::sample::Index>(),
                truncate in any::<bool>(),
            ) {
                let (dir, store) = store();
                let mut bytes = three_storages(&values);
                let i = at.index(bytes.len());
                bytes[i] ^= xor;
                if truncate {
                    bytes.truncate(cut.index(bytes.len()));
                }
                let path = write(dir.path(), "adapter_model.bin", &bytes);
                let entry = store.ingest_file(&path).unwrap();
                let out = dir.path().join("out.bin");
                store.materialize(&entry, &out).unwrap();
                prop_assert_eq!(std::fs::read(&out).unwrap(), bytes);
            }
        }
    }
}
