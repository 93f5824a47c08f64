//! [`Store`]: the object store in a `.coin` directory: ingest files (safetensors → one object
//! per tensor, anything else → one blob), read and verify objects, rebuild files.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;

use super::codec::{self, DecodeError};
use super::fsutil::{self, AtomicFile};
use super::object::{Codec, ObjectHeader, ObjectKind};
use super::pack::{IngestPacker, PackCache};
use super::safetensors::{self, Header, HeaderError};
use super::torchbin;
use super::{fault, FileEntry, ObjectId, StoreError, StoreStats, TensorData, TensorEntry};

/// Content of `.coin/format-version` written by this coin.
pub const FORMAT_VERSION: &str = "1";
/// Content of `.coin/store/type`: loose object files under `objects/`.
pub const STORE_TYPE: &str = "loose";
/// Content of `.coin/store/type` once a pack was written (`objects/pack/`): coins that
/// predate packs refuse the store instead of reporting its packed objects missing.
pub const STORE_TYPE_PACKED: &str = "packed";

/// Largest buffer ingest reads into: an item (tensor or blob) up to this size is read once,
/// hashed, and written from memory; a larger one is hashed in chunks, then (only when the
/// object is new) read again and written, re-hashed to catch a file changing underneath.
pub(super) const MAX_BUFFER: u64 = 64 * 1024 * 1024;
/// A temp file nobody holds is a dead writer's once it is this old.
pub const DEAD_TEMP_AGE: Duration = Duration::from_secs(10);
/// Chunk size for reading objects back.
const READ_CHUNK: usize = 8 * 1024 * 1024;
/// Below this, one-thread hashing beats spreading work over rayon.
const RAYON_MIN: usize = 1024 * 1024;
/// Chunk size of safetensors ingest: read into a buffer that stays in the CPU cache, then
/// hashed (and written, for a new object) from there.
const INGEST_CHUNK: usize = 4 * 1024 * 1024;

/// The object store of one repository. Cheap to clone; holds no open files (clones share
/// the loaded pack indexes).
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// Pack indexes loaded so far (a hint: refreshed from `objects/pack/` on a miss).
    pub(super) packs: Arc<Mutex<PackCache>>,
}

pub(super) fn hash_update(h: &mut blake3::Hasher, data: &[u8]) {
    if data.len() >= RAYON_MIN {
        h.update_rayon(data);
    } else {
        h.update(data);
    }
}

/// Read exactly `buf.len()` bytes of `file` at `offset`, without moving a shared cursor (so
/// threads can read one file at once).
pub(super) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_read(file, buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Write all of `buf` into `file` at `offset`, without moving a shared cursor.
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_write(file, buf, offset)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Blake3 id of `len` bytes of `file` at `offset` as an object with `header`, read through
/// `buf` in chunks.
fn hash_range(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
    header: &ObjectHeader,
    buf: &mut [u8],
) -> Result<ObjectId, StoreError> {
    let mut h = header.id_hasher();
    let mut done = 0u64;
    while done < len {
        let k = (len - done).min(buf.len() as u64) as usize;
        read_exact_at(file, &mut buf[..k], offset + done)
            .map_err(|e| StoreError::io("read", path, e))?;
        hash_update(&mut h, &buf[..k]);
        done += k as u64;
    }
    Ok(ObjectId::from(h.finalize()))
}

/// Size and modification time of an open file: a file rewritten while it was read shows a
/// different stamp afterwards.
fn file_stamp(file: &File, path: &Path) -> Result<(u64, Option<SystemTime>), StoreError> {
    let meta = file
        .metadata()
        .map_err(|e| StoreError::io("read the metadata of", path, e))?;
    Ok((meta.len(), meta.modified().ok()))
}

/// Sync each distinct directory once (objects renamed into them become durable), in parallel
/// so the file system can commit them together.
pub(super) fn sync_dirs(dirs: &[PathBuf]) {
    let mut dirs: Vec<&PathBuf> = dirs.iter().collect();
    dirs.sort();
    dirs.dedup();
    dirs.par_iter().for_each(|d| fsutil::sync_dir(d));
}

fn read_trimmed(path: &Path) -> Result<Option<String>, StoreError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", path, e)),
    }
}

fn create_dir(path: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(path).map_err(|e| StoreError::io("create the directory", path, e))
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Store {
    /// Create (or reopen) a store in `coin_dir` (the `.coin` directory): `objects/`,
    /// `format-version`, `store/type`. Idempotent on a compatible store; refuses an
    /// incompatible one.
    pub fn init(coin_dir: &Path) -> Result<Store, StoreError> {
        create_dir(&coin_dir.join("objects").join("tmp"))?;
        create_dir(&coin_dir.join("store"))?;
        for (path, content) in [
            (coin_dir.join("format-version"), FORMAT_VERSION),
            (coin_dir.join("store").join("type"), STORE_TYPE),
        ] {
            if read_trimmed(&path)?.is_none() {
                fsutil::write_atomic(&path, format!("{content}\n"))
                    .map_err(|e| StoreError::io("write", &path, e))?;
            }
        }
        Store::open(coin_dir)
    }

    /// Open the store in `coin_dir`; refuses unknown format versions and store types.
    pub fn open(coin_dir: &Path) -> Result<Store, StoreError> {
        let version_path = coin_dir.join("format-version");
        match read_trimmed(&version_path)? {
            None => {
                return Err(StoreError::NotInitialized {
                    path: coin_dir.to_path_buf(),
                })
            }
            Some(v) if v == FORMAT_VERSION => {}
            Some(v) => {
                return Err(StoreError::UnsupportedFormat {
                    path: version_path,
                    found: v.chars().take(40).collect(),
                    expected: format!("format version {FORMAT_VERSION}"),
                })
            }
        }
        let type_path = coin_dir.join("store").join("type");
        match read_trimmed(&type_path)? {
            Some(t) if t == STORE_TYPE || t == STORE_TYPE_PACKED => {}
            other => {
                return Err(StoreError::UnsupportedFormat {
                    path: type_path,
                    found: other.unwrap_or_default().chars().take(40).collect(),
                    expected: format!("store type '{STORE_TYPE}' or '{STORE_TYPE_PACKED}'"),
                })
            }
        }
        let store = Store {
            root: coin_dir.to_path_buf(),
            packs: Arc::default(),
        };
        create_dir(&store.tmp_dir())?;
        Ok(store)
    }

    /// Record in `store/type` that the store holds packs (before the first pack is visible).
    pub(super) fn mark_packed(&self) -> Result<(), StoreError> {
        let path = self.root.join("store").join("type");
        if read_trimmed(&path)?.as_deref() != Some(STORE_TYPE_PACKED) {
            fsutil::write_atomic(&path, format!("{STORE_TYPE_PACKED}\n"))
                .map_err(|e| StoreError::io("write", &path, e))?;
        }
        Ok(())
    }

    /// The `.coin` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }

    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.root.join("objects").join("tmp")
    }

    /// Where an object lives: `objects/ab/cdef…` (2 + 62 hex digits).
    pub fn object_path(&self, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex();
        self.objects_dir().join(&hex[..2]).join(&hex[2..])
    }

    /// Whether the object exists, loose or in a pack (not whether it is intact: see
    /// [`Store::verify`]).
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.object_path(id).is_file() || self.packed_contains(id)
    }

    /// Store a file. Safetensors files (a `.safetensors` name, or content that starts like
    /// one: a valid length prefix followed by `{`) become one blob for the header plus one
    /// tensor object per tensor, and must be valid. A `torch.save` zip checkpoint that coin's
    /// safe reader accepts becomes a layout blob plus one tensor object per storage (see
    /// `torchbin`); one it refuses, and anything else, becomes one blob. Only
    /// missing objects are written. Memory stays below the largest tensor (64 MiB at most).
    pub fn ingest_file(&self, path: &Path) -> Result<FileEntry, StoreError> {
        let mut file = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("read the metadata of", path, e))?
            .len();
        let named = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        match sniff_safetensors(&mut file, path, len)? {
            Sniff::Valid(header, header_bytes) => {
                self.ingest_safetensors(&mut file, path, len, &header, &header_bytes)
            }
            Sniff::Invalid(reason) => Err(StoreError::InvalidSafetensors {
                path: path.to_path_buf(),
                reason,
            }),
            Sniff::NotSafetensors(reason) if named => Err(StoreError::InvalidSafetensors {
                path: path.to_path_buf(),
                reason,
            }),
            Sniff::NotSafetensors(_) => {
                if torchbin::starts_like_zip(&mut file, path)? {
                    if let Some(plan) = torchbin::plan(path, len) {
                        return self.ingest_torchbin(&mut file, path, len, &plan);
                    }
                }
                let mut buf = vec![0u8; len.min(MAX_BUFFER) as usize];
                let id =
                    self.ingest_range(&mut file, path, 0, len, ObjectHeader::blob(len), &mut buf)?;
                Ok(FileEntry::Blob { id, size: len })
            }
        }
    }

    fn ingest_safetensors(
        &self,
        file: &mut File,
        path: &Path,
        len: u64,
        header: &Header,
        header_bytes: &[u8],
    ) -> Result<FileEntry, StoreError> {
        let stamp_before = file_stamp(file, path)?;
        let header_id = self.put_blob_bytes(header_bytes)?;
        let file: &File = file;
        let largest = header.tensors.iter().map(|t| t.len()).max().unwrap_or(0);
        let chunk = largest.clamp(1, INGEST_CHUNK as u64) as usize;
        // The tensors are hashed in parallel (rayon, all threads), each read in chunks that
        // stay in the CPU cache. A tensor whose object is missing goes to one writer thread,
        // which copies it again into a private buffer, hashes that copy while writing it (so
        // the object always holds what its id says, even if the file changes meanwhile),
        // fsyncs and renames it, while the other tensors are still being hashed. The object
        // directories are synced once at the end.
        let (ids, dirs) = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<(ObjectId, ObjectHeader, u64, u64)>();
            let writer = scope.spawn(move || -> Result<Vec<PathBuf>, StoreError> {
                let mut buf: Vec<u8> = Vec::new();
                let mut dirs = Vec::new();
                // Many small new tensors (MoELoRA routers and experts) go into one pack.
                let mut packer = IngestPacker::new(self);
                for (id, object, offset, n) in rx {
                    if packer.may_take(&object) {
                        let mut bytes = vec![0u8; n as usize];
                        read_exact_at(file, &mut bytes, offset)
                            .map_err(|e| StoreError::io("read", path, e))?;
                        let mut h = object.id_hasher();
                        hash_update(&mut h, &bytes);
                        if ObjectId::from(h.finalize()) != id {
                            return Err(StoreError::FileChanged {
                                path: path.to_path_buf(),
                            });
                        }
                        if packer.offer(&id, &object, &bytes)? {
                            continue;
                        }
                    }
                    if buf.is_empty() {
                        buf = vec![0u8; chunk];
                    }
                    if let Some(dir) =
                        self.write_range_verified(file, path, offset, n, &id, &object, &mut buf)?
                    {
                        dirs.push(dir);
                    }
                }
                packer.finish()?;
                Ok(dirs)
            });
            let hashed: Result<Vec<ObjectId>, StoreError> = header
                .tensors
                .par_iter()
                .map_init(Vec::new, |buf: &mut Vec<u8>, t| {
                    if buf.is_empty() {
                        *buf = vec![0u8; chunk];
                    }
                    let object = ObjectHeader::tensor(t.dtype, t.shape.clone(), t.len());
                    let offset = header.data_start() + t.begin;
                    let id = hash_range(file, path, offset, t.len(), &object, buf)?;
                    if !self.contains(&id) {
                        // The writer only stops early on an error, which is returned below.
                        let _ = tx.send((id, object, offset, t.len()));
                    }
                    fault::point("store.ingest.after_tensor");
                    Ok(id)
                })
                .collect();
            drop(tx);
            let written = match writer.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            Ok::<_, StoreError>((hashed?, written?))
        })?;
        fault::point("store.ingest.before_dir_sync");
        sync_dirs(&dirs);
        if file_stamp(file, path)? != stamp_before {
            return Err(StoreError::FileChanged {
                path: path.to_path_buf(),
            });
        }
        let tensors = header
            .tensors
            .iter()
            .zip(ids)
            .map(|(t, id)| TensorEntry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                id,
                bytes: t.len(),
            })
            .collect();
        Ok(FileEntry::Safetensors {
            header: header_id,
            size: len,
            tensors,
        })
    }

    /// Write object `id` (unless it exists) from `n` bytes of `file` at `offset`, copied
    /// through `buf` and hashed as they are written: when the copy does not hash to `id` the
    /// file changed after it was hashed, and nothing is stored. Returns the object's
    /// directory when a new object was renamed into it (the caller syncs the directory).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_range_verified(
        &self,
        file: &File,
        path: &Path,
        offset: u64,
        n: u64,
        id: &ObjectId,
        object: &ObjectHeader,
        buf: &mut [u8],
    ) -> Result<Option<PathBuf>, StoreError> {
        let mut changed = false;
        self.write_object_unsynced_dir(id, object, |out| {
            let mut h = object.id_hasher();
            let mut done = 0u64;
            while done < n {
                let k = (n - done).min(buf.len() as u64) as usize;
                read_exact_at(file, &mut buf[..k], offset + done)?;
                hash_update(&mut h, &buf[..k]);
                out.write_all(&buf[..k])?;
                done += k as u64;
            }
            if ObjectId::from(h.finalize()) != *id {
                changed = true;
                return Err(io::Error::other("file changed"));
            }
            Ok(())
        })
        .map_err(|e| {
            if changed {
                StoreError::FileChanged {
                    path: path.to_path_buf(),
                }
            } else {
                e
            }
        })
    }

    /// Hash `len` bytes of `file` at `offset` as an object with `header`; write the object
    /// when it is missing. Returns its id.
    pub(super) fn ingest_range(
        &self,
        file: &mut File,
        path: &Path,
        offset: u64,
        len: u64,
        header: ObjectHeader,
        buf: &mut [u8],
    ) -> Result<ObjectId, StoreError> {
        let read_err = |e| StoreError::io("read", path, e);
        file.seek(SeekFrom::Start(offset)).map_err(read_err)?;
        if len <= buf.len() as u64 {
            let data = &mut buf[..len as usize];
            file.read_exact(data).map_err(read_err)?;
            let mut h = header.id_hasher();
            hash_update(&mut h, data);
            let id = ObjectId::from(h.finalize());
            self.write_object(&id, &header, |out| out.write_all(data))?;
            return Ok(id);
        }
        // Too large for one buffer: hash in chunks first, write only if new.
        let mut h = header.id_hasher();
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n]).map_err(read_err)?;
            hash_update(&mut h, &buf[..n]);
            left -= n as u64;
        }
        let id = ObjectId::from(h.finalize());
        let mut changed = false;
        self.write_object(&id, &header, |out| {
            file.seek(SeekFrom::Start(offset))?;
            let mut h = header.id_hasher();
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                file.read_exact(&mut buf[..n])?;
                hash_update(&mut h, &buf[..n]);
                out.write_all(&buf[..n])?;
                left -= n as u64;
            }
            if ObjectId::from(h.finalize()) != id {
                changed = true;
                return Err(io::Error::other("file changed"));
            }
            Ok(())
        })
        .map_err(|e| {
            if changed {
                StoreError::FileChanged {
                    path: path.to_path_buf(),
                }
            } else {
                e
            }
        })?;
        Ok(id)
    }

    /// Write object `id` unless it exists: temp file in `objects/tmp/`, header, payload from
    /// `fill`, fsync, read-only, rename to `objects/ab/cdef…`, fsync the directory.
    /// Returns whether a new object was written.
    pub(super) fn write_object(
        &self,
        id: &ObjectId,
        header: &ObjectHeader,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<bool, StoreError> {
        let dir = self.write_object_unsynced_dir(id, header, fill)?;
        if let Some(dir) = &dir {
            fsutil::sync_dir(dir);
        }
        Ok(dir.is_some())
    }

    /// [`Store::write_object`] without the final directory sync: the object's file is fsynced
    /// and renamed into place; returns its directory when a new object was written, which the
    /// caller must sync (once for many objects) before anything durable refers to it.
    pub(super) fn write_object_unsynced_dir(
        &self,
        id: &ObjectId,
        header: &ObjectHeader,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<Option<PathBuf>, StoreError> {
        let final_path = self.object_path(id);
        if self.contains(id) {
            return Ok(None);
        }
        let dir = final_path
            .parent()
            .expect("an object path has a fan-out directory")
            .to_path_buf();
        create_dir(&dir)?;
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("obj-")
            .tempfile_in(&tmp_dir)
            .map_err(|e| StoreError::io("create a temporary file in", &tmp_dir, e))?;
        let tmp_path = tmp.path().to_path_buf();
        let write_err = |e| StoreError::io("write", &tmp_path, e);
        // The lock tells cleaners this temp file has a live writer (released when the file is
        // closed, also when the process is killed): see `remove_dead_temp_files`.
        tmp.as_file().lock().map_err(write_err)?;
        tmp.write_all(&header.encode()).map_err(write_err)?;
        fill(tmp.as_file_mut()).map_err(write_err)?;
        fault::point("store.object.after_write");
        tmp.as_file().sync_data().map_err(write_err)?;
        set_read_only(tmp.as_file()).map_err(write_err)?;
        fault::point("store.object.before_rename");
        tmp.persist(&final_path)
            .map_err(|e| StoreError::io("rename an object into", &final_path, e.error))?;
        fault::point("store.object.after_rename");
        Ok(Some(dir))
    }

    /// Store bytes as a blob (atomic; a no-op when it exists). Returns its id.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<ObjectId, StoreError> {
        let header = ObjectHeader::blob(bytes.len() as u64);
        let mut h = header.id_hasher();
        hash_update(&mut h, bytes);
        let id = ObjectId::from(h.finalize());
        self.write_object(&id, &header, |out| out.write_all(bytes))?;
        Ok(id)
    }

    /// Receive object `id` from `src`, which yields an object file's bytes (header, then
    /// payload, as stored in `objects/ab/cdef…`): e.g. another store's file or a download.
    /// The header is checked, the payload is hashed while it goes to a temp file, and the
    /// object becomes visible (renamed into place) only when the hash equals `id` and nothing
    /// follows the payload. `source` names `src` in errors. Returns whether a new object was
    /// written (an object already present counts as done and `src` is not read).
    pub fn receive_object(
        &self,
        id: &ObjectId,
        src: &mut dyn Read,
        source: &Path,
    ) -> Result<bool, StoreError> {
        if self.contains(id) {
            return Ok(false);
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            id: *id,
            path: source.to_path_buf(),
            reason,
        };
        let (header, header_len) = ObjectHeader::decode(&mut &mut *src).map_err(corrupt)?;
        let mut bad: Option<String> = None;
        let result = self.write_object(id, &header, |out| {
            let mut buf = vec![0u8; header.stored_len.min(READ_CHUNK as u64) as usize];
            let mut h = header.id_hasher();
            let mut left = header.stored_len;
            let raw = header.codec == Codec::Raw;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if let Err(e) = src.read_exact(&mut buf[..n]) {
                    bad = Some(format!("it ends early ({e})"));
                    return Err(io::Error::other("short object"));
                }
                if raw {
                    hash_update(&mut h, &buf[..n]);
                }
                out.write_all(&buf[..n])?;
                left -= n as u64;
            }
            let mut extra = [0u8; 1];
            if src.read(&mut extra)? != 0 {
                bad = Some("bytes follow the payload".into());
                return Err(io::Error::other("trailing bytes"));
            }
            let hash = if raw {
                h.finalize()
            } else {
                // A compressed object travels as stored; it is verified by decoding the
                // temp file before it becomes visible.
                out.seek(SeekFrom::Start(header_len))?;
                let mut stored = io::BufReader::new(&mut *out).take(header.stored_len);
                match codec::decode(&header, &mut stored, &mut |_| Ok(())) {
                    Ok(hash) => hash,
                    Err(DecodeError::Corrupt(reason)) => {
                        bad = Some(reason);
                        return Err(io::Error::other("undecodable object"));
                    }
                    Err(DecodeError::Sink(e)) => return Err(e),
                }
            };
            if ObjectId::from(hash) != *id {
                bad = Some("its content does not match its id".into());
                return Err(io::Error::other("hash mismatch"));
            }
            Ok(())
        });
        match (result, bad) {
            (Ok(written), _) => Ok(written),
            (Err(_), Some(reason)) => Err(corrupt(reason)),
            (Err(e), None) => Err(e),
        }
    }

    /// Open an object's stored bytes (header, then payload), loose first, then in the packs:
    /// a reader that ends where the object ends, its length, and the file it is in (for
    /// messages). What [`Store::receive_object`] and [`Store::pack_writer`] take.
    pub fn open_raw(&self, id: &ObjectId) -> Result<(io::Take<File>, u64, PathBuf), StoreError> {
        self.open_raw_from(id, true)
    }

    fn open_raw_from(
        &self,
        id: &ObjectId,
        packs: bool,
    ) -> Result<(io::Take<File>, u64, PathBuf), StoreError> {
        let path = self.object_path(id);
        match File::open(&path) {
            Ok(f) => {
                let len = f
                    .metadata()
                    .map_err(|e| StoreError::io("read the metadata of", &path, e))?
                    .len();
                Ok((f.take(len), len, path))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match packs {
                true => self
                    .open_packed(id)?
                    .ok_or(StoreError::ObjectMissing { id: *id }),
                false => Err(StoreError::ObjectMissing { id: *id }),
            },
            Err(e) => Err(StoreError::io("open", &path, e)),
        }
    }

    /// Open an object and check its header against the file size.
    pub(super) fn open_object(
        &self,
        id: &ObjectId,
    ) -> Result<(io::Take<File>, ObjectHeader), StoreError> {
        self.open_object_at(id, true).map(|(f, h, _)| (f, h))
    }

    /// [`Store::open_object`], also returning the file the object is in; only the loose
    /// file without `packs`.
    fn open_object_at(
        &self,
        id: &ObjectId,
        packs: bool,
    ) -> Result<(io::Take<File>, ObjectHeader, PathBuf), StoreError> {
        let (mut file, file_len, path) = self.open_raw_from(id, packs)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            id: *id,
            path: path.clone(),
            reason,
        };
        let (header, header_len) = ObjectHeader::decode(&mut file).map_err(corrupt)?;
        if header_len.checked_add(header.stored_len) != Some(file_len) {
            return Err(corrupt(format!(
                "the file is {file_len} bytes but its header says {header_len} + {}",
                header.stored_len
            )));
        }
        Ok((file, header, path))
    }

    /// Stream object `id`'s payload into `out`, verifying its hash; the caller must discard
    /// what was written when this fails. `out_path` names `out` in write errors.
    pub(super) fn copy_object(
        &self,
        id: &ObjectId,
        kind: Option<ObjectKind>,
        out: &mut dyn Write,
        out_path: &Path,
    ) -> Result<ObjectHeader, StoreError> {
        self.copy_object_from(id, kind, out, out_path, true)
    }

    fn copy_object_from(
        &self,
        id: &ObjectId,
        kind: Option<ObjectKind>,
        out: &mut dyn Write,
        out_path: &Path,
        packs: bool,
    ) -> Result<ObjectHeader, StoreError> {
        let (mut file, header, path) = self.open_object_at(id, packs)?;
        if let Some(expected) = kind {
            if header.kind != expected {
                return Err(StoreError::WrongKind {
                    id: *id,
                    found: header.kind.as_str(),
                    expected: expected.as_str(),
                });
            }
        }
        if header.codec != Codec::Raw {
            let mut src = io::BufReader::new(&mut file).take(header.stored_len);
            let hash = codec::decode(&header, &mut src, &mut |b| out.write_all(b)).map_err(
                |e| match e {
                    DecodeError::Corrupt(reason) => StoreError::Corrupt {
                        id: *id,
                        path: path.clone(),
                        reason,
                    },
                    DecodeError::Sink(e) => StoreError::io("write", out_path, e),
                },
            )?;
            if ObjectId::from(hash) != *id {
                return Err(StoreError::Corrupt {
                    id: *id,
                    path,
                    reason: "its decoded content does not match its id (the file was modified or damaged)"
                        .into(),
                });
            }
            return Ok(header);
        }
        let mut buf = vec![0u8; header.payload_len.min(READ_CHUNK as u64) as usize];
        let mut h = header.id_hasher();
        let mut left = header.payload_len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(|e| StoreError::io("read", &path, e))?;
            hash_update(&mut h, &buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| StoreError::io("write", out_path, e))?;
            left -= n as u64;
        }
        if ObjectId::from(h.finalize()) != *id {
            return Err(StoreError::Corrupt {
                id: *id,
                path,
                reason: "its content does not match its id (the file was modified or damaged)"
                    .into(),
            });
        }
        Ok(header)
    }

    /// Copy object `id`'s payload into `out` at `at` (positioned writes: threads may fill one
    /// file at once), through `buf`, verifying its hash and kind; the caller must discard the
    /// file when this fails. `out_path` names `out` in write errors.
    fn copy_object_at(
        &self,
        id: &ObjectId,
        kind: ObjectKind,
        out: &File,
        at: u64,
        out_path: &Path,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let (mut file, header, path) = self.open_object_at(id, true)?;
        if header.kind != kind {
            return Err(StoreError::WrongKind {
                id: *id,
                found: header.kind.as_str(),
                expected: kind.as_str(),
            });
        }
        if header.codec != Codec::Raw {
            let mut src = io::BufReader::new(&mut file).take(header.stored_len);
            let mut pos = at;
            let mut sink = |b: &[u8]| -> io::Result<()> {
                write_all_at(out, b, pos)?;
                pos += b.len() as u64;
                Ok(())
            };
            let hash = codec::decode(&header, &mut src, &mut sink).map_err(|e| match e {
                DecodeError::Corrupt(reason) => StoreError::Corrupt {
                    id: *id,
                    path: path.clone(),
                    reason,
                },
                DecodeError::Sink(e) => StoreError::io("write", out_path, e),
            })?;
            if ObjectId::from(hash) != *id {
                return Err(StoreError::Corrupt {
                    id: *id,
                    path,
                    reason: "its decoded content does not match its id (the file was modified or damaged)"
                        .into(),
                });
            }
            return Ok(());
        }
        let mut h = header.id_hasher();
        let mut done = 0u64;
        while done < header.payload_len {
            let n = (header.payload_len - done).min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])
                .map_err(|e| StoreError::io("read", &path, e))?;
            hash_update(&mut h, &buf[..n]);
            write_all_at(out, &buf[..n], at + done)
                .map_err(|e| StoreError::io("write", out_path, e))?;
            done += n as u64;
        }
        if ObjectId::from(h.finalize()) != *id {
            return Err(StoreError::Corrupt {
                id: *id,
                path,
                reason: "its content does not match its id (the file was modified or damaged)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Read a blob, verifying its hash.
    pub fn read_blob(&self, id: &ObjectId) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.copy_object(id, Some(ObjectKind::Blob), &mut out, Path::new("<memory>"))?;
        Ok(out)
    }

    /// Read a tensor (dtype, shape, raw little-endian bytes), verifying its hash.
    pub fn read_tensor(&self, id: &ObjectId) -> Result<TensorData, StoreError> {
        let mut data = Vec::new();
        let header = self.copy_object(
            id,
            Some(ObjectKind::Tensor),
            &mut data,
            Path::new("<memory>"),
        )?;
        let (dtype, shape) = header
            .tensor
            .expect("a decoded tensor header has dtype and shape");
        Ok(TensorData { dtype, shape, data })
    }

    /// Re-hash an object and check its header; reads it whole, keeps nothing.
    pub fn verify(&self, id: &ObjectId) -> Result<(), StoreError> {
        self.copy_object(id, None, &mut io::sink(), Path::new("<sink>"))
            .map(|_| ())
    }

    /// [`Store::verify`] of the loose copy only (before packing it).
    pub(super) fn verify_loose(&self, id: &ObjectId) -> Result<(), StoreError> {
        self.copy_object_from(id, None, &mut io::sink(), Path::new("<sink>"), false)
            .map(|_| ())
    }

    /// Check that the objects an entry names are here and agree with it, reading only object
    /// headers and the safetensors header blob (hashes are [`Store::verify`]'s job): a blob of
    /// the entry's size; a header blob whose length prefix, JSON and tensor list match the
    /// manifest exactly and add up to its size; tensor objects of the listed dtype and shape.
    /// The one check behind commit, fetch, fsck and checkout, so none of them accepts what
    /// another would refuse.
    pub fn check_entry(&self, entry: &FileEntry) -> Result<(), StoreError> {
        entry
            .check()
            .map_err(|reason| StoreError::BadEntry { reason })?;
        let mismatch = |reason: String| StoreError::BadEntry { reason };
        let kind_of = |id: &ObjectId, expected: ObjectKind| -> Result<ObjectHeader, StoreError> {
            let (_, header) = self.open_object(id)?;
            if header.kind != expected {
                return Err(StoreError::WrongKind {
                    id: *id,
                    found: header.kind.as_str(),
                    expected: expected.as_str(),
                });
            }
            Ok(header)
        };
        match entry {
            FileEntry::Blob { id, size } => {
                let h = kind_of(id, ObjectKind::Blob)?;
                if h.payload_len != *size {
                    return Err(mismatch(format!(
                        "blob {} has {} bytes, the manifest says {size}",
                        id.short(),
                        h.payload_len
                    )));
                }
            }
            FileEntry::Safetensors {
                header,
                size,
                tensors,
            } => {
                let h = kind_of(header, ObjectKind::Blob)?;
                if h.payload_len > safetensors::MAX_HEADER_LEN + 8 {
                    return Err(mismatch(format!(
                        "header blob {} is {} bytes, more than a safetensors header may be",
                        header.short(),
                        h.payload_len
                    )));
                }
                let header_bytes = self.read_blob(header)?;
                check_header_matches(&header_bytes, *size, tensors).map_err(mismatch)?;
                for t in tensors {
                    let h = kind_of(&t.id, ObjectKind::Tensor)?;
                    if h.tensor.as_ref() != Some(&(t.dtype, t.shape.clone())) {
                        return Err(mismatch(format!(
                            "tensor '{}': object {} is not {} {:?}",
                            t.name.escape_debug(),
                            t.id.short(),
                            t.dtype,
                            t.shape
                        )));
                    }
                }
            }
            FileEntry::Torchbin {
                layout,
                size,
                storages,
                ..
            } => self.check_torchbin_entry(layout, *size, storages)?,
        }
        Ok(())
    }

    /// Rebuild the file `entry` describes at `out`, byte-identical to what was ingested.
    /// The entry is checked first ([`Store::check_entry`]) and every object is verified as it
    /// is read; the file appears atomically, and on any error nothing is left at `out`.
    /// Parent directories are created.
    pub fn materialize(&self, entry: &FileEntry, out: &Path) -> Result<(), StoreError> {
        self.check_entry(entry).map_err(|e| match e {
            StoreError::BadEntry { reason } => StoreError::EntryMismatch {
                path: out.to_path_buf(),
                reason,
            },
            other => other,
        })?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_dir(parent)?;
        }
        let mut file = AtomicFile::create(out).map_err(|e| StoreError::io("create", out, e))?;
        match entry {
            FileEntry::Blob { id, .. } => {
                self.copy_object(id, Some(ObjectKind::Blob), file.file(), out)?;
            }
            FileEntry::Safetensors {
                header,
                size,
                tensors,
            } => {
                // The file is sized once, then the tensors are copied into their places in
                // parallel (each verified as it is copied); one fsync at the commit below.
                let f = file.file();
                f.set_len(*size)
                    .map_err(|e| StoreError::io("write", out, e))?;
                let head = self.copy_object(header, Some(ObjectKind::Blob), f, out)?;
                let mut offsets = Vec::with_capacity(tensors.len());
                let mut at = head.payload_len;
                for t in tensors {
                    offsets.push(at);
                    at += t.bytes;
                }
                let largest = tensors.iter().map(|t| t.bytes).max().unwrap_or(0);
                let chunk = largest.clamp(1, INGEST_CHUNK as u64) as usize;
                let f: &File = f;
                tensors.par_iter().zip(offsets).try_for_each_init(
                    Vec::new,
                    |buf: &mut Vec<u8>, (t, at)| {
                        if buf.is_empty() {
                            *buf = vec![0u8; chunk];
                        }
                        self.copy_object_at(&t.id, ObjectKind::Tensor, f, at, out, buf)
                    },
                )?;
            }
            FileEntry::Torchbin {
                layout,
                file_hash,
                storages,
                ..
            } => self.write_torchbin(layout, file_hash, storages, file.file(), out)?,
        }
        set_checkout_mode(file.file()).map_err(|e| StoreError::io("write", out, e))?;
        fault::point("store.materialize.before_rename");
        file.commit().map_err(|e| StoreError::io("write", out, e))?;
        Ok(())
    }

    /// Every object id in the store, loose or packed, sorted, without duplicates. Temp files
    /// and stray names are skipped.
    pub fn list(&self) -> Result<Vec<ObjectId>, StoreError> {
        let mut ids = self.loose_ids()?;
        ids.extend(self.packed_ids()?);
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The ids of the loose object files, sorted.
    pub(super) fn loose_ids(&self) -> Result<Vec<ObjectId>, StoreError> {
        let dir = self.objects_dir();
        let mut ids = Vec::new();
        let entries = fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
            let name = entry.file_name();
            let Some(prefix) = name.to_str().filter(|n| n.len() == 2 && is_hex(n)) else {
                continue;
            };
            let sub = entry.path();
            if !sub.is_dir() {
                continue;
            }
            for obj in fs::read_dir(&sub).map_err(|e| StoreError::io("list", &sub, e))? {
                let obj = obj.map_err(|e| StoreError::io("list", &sub, e))?;
                let name = obj.file_name();
                if let Some(rest) = name.to_str().filter(|n| n.len() == 62 && is_hex(n)) {
                    ids.push(ObjectId::from_hex(&format!("{prefix}{rest}"))?);
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Delete a loose object (for gc). Returns the bytes freed; 0 when it was already gone
    /// (or is only in a pack: [`Store::prune_packs`] drops packed objects).
    pub fn remove(&self, id: &ObjectId) -> Result<u64, StoreError> {
        let path = self.object_path(id);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io("read the metadata of", &path, e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => Ok(len),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StoreError::io("remove", &path, e)),
        }
    }

    /// Object count, bytes on disk (loose files, packs and their indexes), and decoded payload
    /// bytes (reads every object header).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stats = StoreStats::default();
        for id in self.loose_ids()? {
            let path = self.object_path(&id);
            let m = fs::metadata(&path)
                .map_err(|e| StoreError::io("read the metadata of", &path, e))?;
            let (_, header) = self.open_object(&id)?;
            stats.stored_bytes += m.len();
            stats.payload_bytes += header.payload_len;
            if header.codec != Codec::Raw {
                stats.compressed_objects += 1;
                stats.compressed_payload_bytes += header.payload_len;
                stats.compressed_stored_bytes += m.len();
            }
        }
        let (pack_bytes, packs) = self.pack_disk_usage()?;
        stats.stored_bytes += pack_bytes;
        stats.packs = packs;
        let packed = self.packed_ids()?;
        stats.packed_objects = packed.len() as u64;
        for id in &packed {
            if self.object_path(id).exists() {
                continue; // counted as loose
            }
            let (_, header) = self.open_object(id)?;
            stats.payload_bytes += header.payload_len;
            if header.codec != Codec::Raw {
                stats.compressed_objects += 1;
                stats.compressed_payload_bytes += header.payload_len;
                stats.compressed_stored_bytes += header.encode().len() as u64 + header.stored_len;
            }
        }
        stats.objects = self.list()?.len() as u64;
        Ok(stats)
    }

    /// Temp files left in `objects/tmp/` by interrupted writes, with their ages.
    pub fn temp_files(&self) -> Result<Vec<(PathBuf, Duration)>, StoreError> {
        let dir = self.tmp_dir();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
            let age = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            out.push((entry.path(), age));
        }
        out.sort();
        Ok(out)
    }

    /// Delete the temp files of writers that are gone (killed or crashed): a writer holds a
    /// lock on its temp file from its first byte until it closes it, so a temp file nobody
    /// holds, and older than [`DEAD_TEMP_AGE`] (a writer locks it within microseconds of
    /// creating it), is a leftover. Safe to run beside live writers, here or in another
    /// process. Commit, fetch, push (on the remote's store) and gc call it. Returns how many
    /// files were removed.
    pub fn remove_dead_temp_files(&self) -> Result<usize, StoreError> {
        let mut n = self.remove_orphan_packs()?;
        for (path, age) in self.temp_files()? {
            if age < DEAD_TEMP_AGE {
                continue;
            }
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Unreadable (a foreign file, a directory): not ours to judge.
                Err(_) => continue,
            };
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(_)) => continue,
            }
            match fs::remove_file(&path) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path, e)),
            }
        }
        Ok(n)
    }
}

#[cfg(unix)]
pub(super) fn set_read_only(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o444))
}

/// Rebuilt files get mode 0644 (the temp file they start as is 0600).
#[cfg(unix)]
fn set_checkout_mode(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn set_checkout_mode(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(not(unix))]
pub(super) fn set_read_only(file: &File) -> io::Result<()> {
    let mut p = file.metadata()?.permissions();
    p.set_readonly(true);
    file.set_permissions(p)
}

enum Sniff {
    /// A valid safetensors file.
    Valid(Header, Vec<u8>),
    /// Starts like safetensors (a length prefix that fits, then `{`) but is not valid.
    Invalid(HeaderError),
    /// Does not start like safetensors (an error only when the name says it is).
    NotSafetensors(HeaderError),
}

/// Read the length prefix and, when the file starts like safetensors (a length that fits,
/// then `{`), the JSON header, and validate it. Leaves the file position after the header.
fn sniff_safetensors(file: &mut File, path: &Path, len: u64) -> Result<Sniff, StoreError> {
    let read_err = |e| StoreError::io("read", path, e);
    if len < 8 {
        return Ok(Sniff::NotSafetensors(HeaderError::TooShort(len)));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(read_err)?;
    let n = match safetensors::parse_prefix(&prefix, len) {
        Ok(n) => n,
        Err(e) => return Ok(Sniff::NotSafetensors(e)),
    };
    let mut header_bytes = Vec::with_capacity(8 + n.min(64 * 1024) as usize);
    header_bytes.extend_from_slice(&prefix);
    // Look at the first JSON byte before reading up to 100 MB of a file that is not
    // safetensors at all.
    let mut first = [0u8; 1];
    let looks_like = n > 0 && {
        file.read_exact(&mut first).map_err(read_err)?;
        header_bytes.push(first[0]);
        first[0] == b'{'
    };
    if !looks_like {
        return Ok(Sniff::NotSafetensors(HeaderError::Json(
            "the header does not start with '{'".into(),
        )));
    }
    header_bytes.resize(8 + n as usize, 0);
    file.read_exact(&mut header_bytes[9..]).map_err(read_err)?;
    match safetensors::parse_json(&header_bytes[8..], len - 8 - n) {
        Ok(h) => Ok(Sniff::Valid(h, header_bytes)),
        Err(e) => Ok(Sniff::Invalid(e)),
    }
}

/// Check that a stored header blob describes exactly the manifest's tensors, in order, and
/// adds up to the manifest's size.
fn check_header_matches(
    header_bytes: &[u8],
    size: u64,
    tensors: &[TensorEntry],
) -> Result<(), String> {
    let data_len: u64 = tensors
        .iter()
        .try_fold(0u64, |n, t| n.checked_add(t.bytes))
        .ok_or("tensor sizes overflow")?;
    let total = (header_bytes.len() as u64)
        .checked_add(data_len)
        .ok_or("sizes overflow")?;
    if total != size {
        return Err(format!(
            "header ({} bytes) and tensors ({data_len} bytes) do not add up to the manifest's size {size}",
            header_bytes.len()
        ));
    }
    let n = safetensors::parse_prefix(header_bytes, total).map_err(|e| e.to_string())?;
    if 8 + n != header_bytes.len() as u64 {
        return Err("the header blob's length prefix does not match its size".into());
    }
    let parsed =
        safetensors::parse_json(&header_bytes[8..], data_len).map_err(|e| e.to_string())?;
    if parsed.tensors.len() != tensors.len() {
        return Err(format!(
            "the header lists {} tensors, the manifest {}",
            parsed.tensors.len(),
            tensors.len()
        ));
    }
    for (p, t) in parsed.tensors.iter().zip(tensors) {
        if p.name != t.name || p.dtype != t.dtype || p.shape != t.shape || p.len() != t.bytes {
            return Err(format!(
                "the header has tensor '{}' {} {:?} ({} bytes) where the manifest has '{}' {} {:?} ({} bytes)",
                p.name, p.dtype, p.shape, p.len(), t.name, t.dtype, t.shape, t.bytes
            ));
        }
    }
    Ok(())
}
