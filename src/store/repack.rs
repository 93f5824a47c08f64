//! [`Store::repack`]: compress loose raw objects in place (deferred compression).
//!
//! Each object is encoded into a temp file, the temp file is decoded and checked against the
//! object id, and only then renamed over the raw object. A kill at any point leaves either
//! the raw object or the complete compressed one (both valid) plus at most a temp file that
//! `remove_dead_temp_files` cleans.

use std::fs;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};

use serde::Serialize;

use super::codec::{self, DecodeError};
use super::object::{Codec, ObjectHeader};
use super::{fault, fsutil, ObjectId, Store, StoreError};

/// What [`Store::repack`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RepackReport {
    /// Objects looked at.
    pub objects: u64,
    /// Objects compressed by this run.
    pub compressed: u64,
    /// Objects that were already compressed (left as they are).
    pub already_compressed: u64,
    /// Raw objects left raw: too small, or they did not shrink below
    /// [`codec::KEEP_RATIO`] of their size.
    pub kept_raw: u64,
    /// Bytes on disk of the objects this run compressed, before.
    pub bytes_before: u64,
    /// Their bytes on disk after.
    pub bytes_after: u64,
    /// The small loose objects then packed (`coin repack`; empty from [`Store::repack`]).
    pub pack: super::pack::PackReport,
}

impl Store {
    /// Compress every loose raw object that shrinks to at most [`codec::KEEP_RATIO`] of its
    /// size, with the codec [`codec::choose`] picks, at zstd `level` (1..=19). Idempotent;
    /// object ids do not change. The caller holds the repository's writer lock (so that gc
    /// does not run beside it); readers may run concurrently. `progress(done, total)` is
    /// called after each object.
    pub fn repack(
        &self,
        level: i32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RepackReport, StoreError> {
        // Loose objects only: packed ones are small, and a pack is rewritten whole.
        let ids = self.loose_ids()?;
        let total = ids.len() as u64;
        let mut report = RepackReport::default();
        for (i, id) in ids.iter().enumerate() {
            report.objects += 1;
            self.repack_one(id, level, &mut report)?;
            progress(i as u64 + 1, total);
        }
        Ok(report)
    }

    fn repack_one(
        &self,
        id: &ObjectId,
        level: i32,
        report: &mut RepackReport,
    ) -> Result<(), StoreError> {
        let (file, header) = match self.open_object(id) {
            Ok(x) => x,
            // Removed since the listing (a gc elsewhere would hold the lock; be lenient).
            Err(StoreError::ObjectMissing { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if header.codec != Codec::Raw {
            report.already_compressed += 1;
            return Ok(());
        }
        if header.payload_len < codec::MIN_COMPRESS_LEN {
            report.kept_raw += 1;
            return Ok(());
        }
        let path = self.object_path(id);
        let chosen = codec::choose(&header);
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("repack-")
            .tempfile_in(&tmp_dir)
            .map_err(|e| StoreError::io("create a temporary file in", &tmp_dir, e))?;
        let tmp_path = tmp.path().to_path_buf();
        let write_err = |e| StoreError::io("write", &tmp_path, e);
        tmp.as_file().lock().map_err(write_err)?;
        // The stored length is a fixed-size field: write a placeholder, patch it after.
        let placeholder = header.with_codec(chosen, 0).encode();
        tmp.write_all(&placeholder).map_err(write_err)?;
        let mut src = BufReader::new(file);
        let mut out = io::BufWriter::new(tmp.as_file_mut());
        let encoded = codec::encode(&header, chosen, level, &mut src, &mut out)
            .map_err(|e| StoreError::io("compress the object into", &tmp_path, e))?;
        out.flush().map_err(write_err)?;
        drop(out);
        if ObjectId::from(encoded.hash) != *id {
            return Err(StoreError::Corrupt {
                id: *id,
                path,
                reason: "its content does not match its id (the file was modified or damaged); \
                         repack left it as it is"
                    .into(),
            });
        }
        let before = placeholder.len() as u64 - 8 + header.payload_len;
        if (encoded.len as f64) > codec::KEEP_RATIO * header.payload_len as f64 {
            report.kept_raw += 1;
            return Ok(()); // the temp file is removed on drop
        }
        let compressed = header.with_codec(chosen, encoded.len);
        let header_bytes = compressed.encode();
        let f = tmp.as_file_mut();
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&header_bytes))
            .map_err(write_err)?;
        fault::point("store.repack.after_write");
        f.sync_data().map_err(write_err)?;
        // Decode what is on disk before it replaces the raw object.
        f.seek(SeekFrom::Start(header_bytes.len() as u64))
            .map_err(write_err)?;
        let mut stored = BufReader::new(&mut *f).take(encoded.len);
        let check = codec::decode(&compressed, &mut stored, &mut |_| Ok(()));
        match check {
            Ok(hash) if ObjectId::from(hash) == *id => {}
            Ok(_) | Err(DecodeError::Corrupt(_)) | Err(DecodeError::Sink(_)) => {
                return Err(StoreError::Corrupt {
                    id: *id,
                    path: tmp_path.clone(),
                    reason: "the compressed copy does not decode to the object (a disk or \
                             memory fault?); the raw object is left as it is"
                        .into(),
                })
            }
        }
        set_read_only(tmp.as_file()).map_err(write_err)?;
        fault::point("store.repack.before_rename");
        tmp.persist(&path)
            .map_err(|e| StoreError::io("rename a compressed object over", &path, e.error))?;
        if let Some(dir) = path.parent() {
            fsutil::sync_dir(dir);
        }
        fault::point("store.repack.after_rename");
        report.compressed += 1;
        report.bytes_before += before;
        report.bytes_after += header_bytes.len() as u64 + encoded.len;
        Ok(())
    }

    /// The header of object `id` (for stats and tools); checks it against the file size.
    pub fn object_header(&self, id: &ObjectId) -> Result<ObjectHeader, StoreError> {
        self.open_object(id).map(|(_, h)| h)
    }
}

#[cfg(unix)]
fn set_read_only(file: &fs::File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o444))
}

#[cfg(not(unix))]
fn set_read_only(file: &fs::File) -> io::Result<()> {
    let mut p = file.metadata()?.permissions();
    p.set_readonly(true);
    file.set_permissions(p)
}
