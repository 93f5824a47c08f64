//! Pack files: many small objects in one file, found through a sorted index.
//!
//! A pack `objects/pack/pack-<checksum>.pack` holds object files (header and payload, byte for
//! byte as a loose object file holds them) one after another; its index
//! `objects/pack/pack-<checksum>.idx` maps each object id to its offset and length, sorted by
//! id for binary search, and repeats the pack's checksum. An object is visible in a pack only
//! once the index exists: the pack is written (temp file, fsync, rename), then the index, then
//! the directory is fsynced; only then are the loose copies or the old packs removed. A pack
//! without an index is a killed writer's leftover, removed with the dead temp files.
//! docs/on-disk-format.md describes both files byte by byte.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec::{self, DecodeError};
use super::fsutil;
use super::object::{Codec, ObjectHeader};
use super::repo::{hash_update, DEAD_TEMP_AGE};
use super::{fault, ObjectId, Store, StoreError};

/// The first 8 bytes of a pack file.
pub const PACK_MAGIC: [u8; 8] = *b"COINPACK";
/// The first 8 bytes of a pack index.
pub const INDEX_MAGIC: [u8; 8] = *b"COINIDX\0";
/// The pack and index format version written and read by this coin.
pub const PACK_VERSION: u16 = 1;
/// Object files up to this size (header included) go into packs; larger ones stay loose.
pub const PACK_MAX_OBJECT: u64 = 1024 * 1024;
/// A pack is closed and a new one started once it holds this many bytes.
pub const MAX_PACK_BYTES: u64 = 512 * 1024 * 1024;
/// With more packs than this, [`Store::pack_loose`] merges the packs into one.
pub const MAX_PACKS: usize = 8;
/// Transfers write a pack on the receiving side when at least this many small objects move;
/// fewer arrive as loose files (git's `transfer.unpackLimit` defaults to the same 100).
pub const MIN_PACK_OBJECTS: usize = 100;

const PACK_HEADER_LEN: u64 = 16;
/// Object count (u64) and blake3 checksum.
const PACK_TRAILER_LEN: u64 = 8 + 32;
const FANOUT_LEN: usize = 256 * 4;
const INDEX_ENTRY_LEN: usize = 32 + 8 + 8;
const INDEX_HEADER_LEN: usize = 16;

/// One object's place in a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PackEntry {
    pub id: ObjectId,
    /// Where the object file's bytes start in the pack.
    pub offset: u64,
    /// How many bytes they take (header and payload).
    pub len: u64,
}

/// A loaded pack index.
#[derive(Debug)]
pub(super) struct PackIndex {
    /// `pack-<checksum>` (no extension).
    pub name: String,
    /// The pack file.
    pub pack_path: PathBuf,
    /// The index file.
    pub index_path: PathBuf,
    /// Sorted by id, no duplicates.
    pub entries: Vec<PackEntry>,
    /// blake3 of the pack's bytes before its checksum.
    pub checksum: [u8; 32],
    fanout: Vec<u32>,
}

impl PackIndex {
    fn find(&self, id: &ObjectId) -> Option<PackEntry> {
        let first = id.as_bytes()[0] as usize;
        let lo = if first == 0 {
            0
        } else {
            self.fanout[first - 1] as usize
        };
        let hi = self.fanout[first] as usize;
        let slice = self.entries.get(lo..hi)?;
        slice
            .binary_search_by(|e| e.id.cmp(id))
            .ok()
            .map(|i| slice[i])
    }

    /// Encode an index for `entries` (sorted here) of a pack with `checksum`.
    fn encode(entries: &mut [PackEntry], checksum: &[u8; 32]) -> Vec<u8> {
        entries.sort_by_key(|e| e.id);
        let mut out = Vec::with_capacity(
            INDEX_HEADER_LEN + FANOUT_LEN + entries.len() * INDEX_ENTRY_LEN + 64,
        );
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&PACK_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        let mut counts = [0u32; 256];
        for e in entries.iter() {
            counts[e.id.as_bytes()[0] as usize] += 1;
        }
        let mut total = 0u32;
        for c in counts {
            total += c;
            out.extend_from_slice(&total.to_le_bytes());
        }
        for e in entries.iter() {
            out.extend_from_slice(e.id.as_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
        }
        out.extend_from_slice(checksum);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parse and check an index file's bytes: magic, version, length, its own checksum,
    /// fan-out table, ids strictly ascending.
    fn decode(name: &str, dir: &Path, bytes: &[u8]) -> Result<PackIndex, String> {
        let min = INDEX_HEADER_LEN + FANOUT_LEN + 64;
        if bytes.len() < min {
            return Err(format!("the index is {} bytes, too short", bytes.len()));
        }
        if bytes[..8] != INDEX_MAGIC {
            return Err("bad magic (not a coin pack index)".into());
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != PACK_VERSION {
            return Err(format!(
                "pack index version {version} is not supported (this coin reads version {PACK_VERSION})"
            ));
        }
        let count = u32::from_le_bytes(le4(&bytes[12..16])) as usize;
        let expected = count
            .checked_mul(INDEX_ENTRY_LEN)
            .and_then(|n| n.checked_add(min));
        if expected != Some(bytes.len()) {
            return Err(format!(
                "the index is {} bytes but says it holds {count} objects",
                bytes.len()
            ));
        }
        let body = &bytes[..bytes.len() - 32];
        if blake3::hash(body).as_bytes() != &bytes[bytes.len() - 32..] {
            return Err("the index's checksum does not match its content".into());
        }
        let fanout: Vec<u32> = bytes[INDEX_HEADER_LEN..INDEX_HEADER_LEN + FANOUT_LEN]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(le4(c)))
            .collect();
        let start = INDEX_HEADER_LEN + FANOUT_LEN;
        let mut entries = Vec::with_capacity(count);
        for c in bytes[start..start + count * INDEX_ENTRY_LEN].chunks_exact(INDEX_ENTRY_LEN) {
            let mut id = [0u8; 32];
            id.copy_from_slice(&c[..32]);
            entries.push(PackEntry {
                id: ObjectId::from_bytes(id),
                offset: u64::from_le_bytes(le8(&c[32..40])),
                len: u64::from_le_bytes(le8(&c[40..48])),
            });
        }
        if entries.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err("the index's ids are not sorted".into());
        }
        let mut total = 0u32;
        for (b, &f) in fanout.iter().enumerate() {
            total += entries[total as usize..]
                .iter()
                .take_while(|e| e.id.as_bytes()[0] as usize == b)
                .count() as u32;
            if f != total {
                return Err(format!(
                    "the index's fan-out table is wrong at byte {b:#04x}"
                ));
            }
        }
        let mut checksum = [0u8; 32];
        checksum.copy_from_slice(&bytes[bytes.len() - 64..bytes.len() - 32]);
        Ok(PackIndex {
            name: name.to_string(),
            pack_path: dir.join(format!("{name}.pack")),
            index_path: dir.join(format!("{name}.idx")),
            entries,
            checksum,
            fanout,
        })
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// The pack name (`pack-` and 64 hex digits) of an index or pack file name, with its extension.
fn pack_name(file_name: &str) -> Option<(&str, &str)> {
    let (stem, ext) = file_name.rsplit_once('.')?;
    let hex = stem.strip_prefix("pack-")?;
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then_some((stem, ext))
}

/// The packs a store has loaded; a hint refreshed from the directory on a miss.
#[derive(Debug, Default)]
pub(super) struct PackCache {
    packs: Vec<Arc<PackIndex>>,
}

/// What [`Store::pack_loose`] packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// Loose object files up to this many bytes (header included) are packed.
    pub max_object: u64,
    /// Nothing is packed unless at least this many loose objects qualify (merging aside).
    pub min_objects: usize,
    /// Merge all packs into one, however many there are.
    pub merge: bool,
}

impl Default for PackOptions {
    /// Objects up to [`PACK_MAX_OBJECT`], at least [`MIN_PACK_OBJECTS`] of them, merging
    /// only past [`MAX_PACKS`] packs: what `coin gc` does.
    fn default() -> Self {
        PackOptions {
            max_object: PACK_MAX_OBJECT,
            min_objects: MIN_PACK_OBJECTS,
            merge: false,
        }
    }
}

/// What packing did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PackReport {
    /// Objects written into new packs.
    pub packed: usize,
    /// Loose object files removed because a pack now holds them.
    pub loose_removed: usize,
    /// Packs written.
    pub packs_written: usize,
    /// Packs removed (merged into a new one, or rewritten without dead objects).
    pub packs_removed: usize,
    /// Objects dropped from packs (gc).
    pub dropped: usize,
    /// Bytes of loose files and old packs removed (for gc's pruning: minus the rewritten
    /// packs' size).
    pub freed_bytes: u64,
    /// Bytes of the new packs and their indexes.
    pub written_bytes: u64,
    /// Loose objects left loose because they failed verification (`coin fsck` names them).
    pub corrupt: Vec<String>,
}

/// A problem `coin fsck` reports about a pack or its index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackProblem {
    /// The pack or index file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// Writes one new pack. Objects are added with [`PackWriter::add`], each checked against its
/// id while it is copied; [`PackWriter::finish`] makes the pack and its index durable and
/// visible. Dropping a writer without finishing leaves only a temp file that
/// [`Store::remove_dead_temp_files`] removes.
pub struct PackWriter<'a> {
    store: &'a Store,
    tmp: tempfile::NamedTempFile,
    out: io::BufWriter<File>,
    sum: blake3::Hasher,
    offset: u64,
    entries: Vec<PackEntry>,
    seen: HashSet<ObjectId>,
    buf: Vec<u8>,
}

/// Records the bytes read through it (the object header, copied verbatim into the pack).
struct Recording<'r> {
    inner: &'r mut dyn Read,
    seen: Vec<u8>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<'a> PackWriter<'a> {
    fn new(store: &'a Store) -> Result<PackWriter<'a>, StoreError> {
        let tmp_dir = store.tmp_dir();
        let tmp = tempfile::Builder::new()
            .prefix("pack-")
            .tempfile_in(&tmp_dir)
            .map_err(|e| StoreError::io("create a temporary file in", &tmp_dir, e))?;
        let path = tmp.path().to_path_buf();
        // A lock tells cleaners the temp file has a live writer (see remove_dead_temp_files).
        tmp.as_file()
            .lock()
            .map_err(|e| StoreError::io("lock", &path, e))?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| StoreError::io("open", &path, e))?;
        let mut w = PackWriter {
            store,
            tmp,
            out: io::BufWriter::with_capacity(1024 * 1024, file),
            sum: blake3::Hasher::new(),
            offset: 0,
            entries: Vec::new(),
            seen: HashSet::new(),
            buf: Vec::new(),
        };
        let mut header = Vec::with_capacity(PACK_HEADER_LEN as usize);
        header.extend_from_slice(&PACK_MAGIC);
        header.extend_from_slice(&PACK_VERSION.to_le_bytes());
        header.extend_from_slice(&[0; 6]);
        w.write(&header)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.out
            .write_all(bytes)
            .map_err(|e| StoreError::io("write", self.tmp.path(), e))?;
        self.sum.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// Whether no object was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append object `id` read from `src` (an object file's bytes: header, then payload).
    /// The header is checked and the payload hashed as it is copied; a mismatch, a short
    /// source or bytes after the payload fail with [`StoreError::Corrupt`] naming `source`,
    /// and the writer must then be dropped. An id added before is skipped.
    pub fn add(
        &mut self,
        id: &ObjectId,
        src: &mut dyn Read,
        source: &Path,
    ) -> Result<(), StoreError> {
        if self.seen.contains(id) {
            return Ok(());
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            id: *id,
            path: source.to_path_buf(),
            reason,
        };
        let mut rec = Recording {
            inner: src,
            seen: Vec::new(),
        };
        let (header, _) = ObjectHeader::decode(&mut rec).map_err(corrupt)?;
        let Recording { inner: src, seen } = rec;
        let start = self.offset;
        self.write(&seen)?;
        let hash = if header.codec != Codec::Raw {
            // A compressed object is copied as stored and decoded (not kept) to check its id.
            if header.stored_len > PACK_MAX_OBJECT {
                return Err(corrupt(format!(
                    "it is {} bytes stored, more than a packed object may be ({PACK_MAX_OBJECT})",
                    header.stored_len
                )));
            }
            let mut stored = vec![0u8; header.stored_len as usize];
            src.read_exact(&mut stored)
                .map_err(|e| corrupt(format!("it ends early ({e})")))?;
            let hash = codec::decode(&header, &mut stored.as_slice(), &mut |_| Ok(())).map_err(
                |e| match e {
                    DecodeError::Corrupt(reason) => corrupt(reason),
                    DecodeError::Sink(e) => corrupt(e.to_string()),
                },
            )?;
            self.write(&stored)?;
            hash
        } else {
            let chunk = header.payload_len.min(1024 * 1024) as usize;
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize(chunk, 0);
            let mut h = header.id_hasher();
            let mut left = header.payload_len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                src.read_exact(&mut buf[..n])
                    .map_err(|e| corrupt(format!("it ends early ({e})")))?;
                hash_update(&mut h, &buf[..n]);
                self.write(&buf[..n])?;
                left -= n as u64;
            }
            self.buf = buf;
            h.finalize()
        };
        let mut extra = [0u8; 1];
        match src.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(corrupt("bytes follow the payload".into())),
            Err(e) => return Err(StoreError::io("read", source, e)),
        }
        if ObjectId::from(hash) != *id {
            return Err(corrupt(
                "its content does not match its id (the file was modified or damaged)".into(),
            ));
        }
        self.entries.push(PackEntry {
            id: *id,
            offset: start,
            len: self.offset - start,
        });
        self.seen.insert(*id);
        fault::point("store.pack.after_object");
        Ok(())
    }

    /// [`PackWriter::add`] of an object held in memory.
    pub(super) fn add_bytes(
        &mut self,
        id: &ObjectId,
        header: &ObjectHeader,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let encoded = header.encode();
        let mut src = encoded.as_slice().chain(payload);
        self.add(id, &mut src, Path::new("<memory>"))
    }

    /// Write the trailer, fsync, rename the pack into `objects/pack/`, write its index the
    /// same way, fsync the directory. Returns the new pack's index (`None` when empty: nothing
    /// is written).
    pub(super) fn finish(mut self) -> Result<Option<Arc<PackIndex>>, StoreError> {
        if self.entries.is_empty() {
            return Ok(None);
        }
        self.write(&(self.entries.len() as u64).to_le_bytes())?;
        let checksum = *self.sum.finalize().as_bytes();
        let tmp_path = self.tmp.path().to_path_buf();
        let werr = |e| StoreError::io("write", &tmp_path, e);
        self.out.write_all(&checksum).map_err(werr)?;
        self.out.flush().map_err(werr)?;
        self.tmp.as_file().sync_data().map_err(werr)?;
        super::repo::set_read_only(self.tmp.as_file()).map_err(werr)?;
        let dir = self.store.pack_dir();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create the directory", &dir, e))?;
        let name = format!("pack-{}", hex(&checksum));
        let pack_path = dir.join(format!("{name}.pack"));
        fault::point("store.pack.before_rename");
        self.store.mark_packed()?;
        self.tmp
            .persist(&pack_path)
            .map_err(|e| StoreError::io("rename a pack into", &pack_path, e.error))?;
        fault::point("store.pack.after_pack");
        let index = PackIndex::encode(&mut self.entries, &checksum);
        let index_path = dir.join(format!("{name}.idx"));
        fsutil::write_atomic(&index_path, &index)
            .map_err(|e| StoreError::io("write", &index_path, e))?;
        fsutil::sync_dir(&dir);
        fault::point("store.pack.after_index");
        let loaded =
            PackIndex::decode(&name, &dir, &index).map_err(|reason| StoreError::Corrupt {
                id: self.entries[0].id,
                path: index_path.clone(),
                reason,
            })?;
        let loaded = Arc::new(loaded);
        self.store.add_cached_pack(loaded.clone());
        Ok(Some(loaded))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Small new objects of one ingest: held back until there are [`MIN_PACK_OBJECTS`] of them
/// (or 64 MiB), then written into a pack, so that a checkpoint of thousands of small tensors
/// costs a few fsyncs instead of one per tensor. Fewer are written as loose files by
/// [`IngestPacker::finish`]. Nothing of the pack is visible before `finish` returns.
pub(super) struct IngestPacker<'a> {
    store: &'a Store,
    pending: Vec<(ObjectId, ObjectHeader, Vec<u8>)>,
    pending_bytes: u64,
    writer: Option<PackWriter<'a>>,
    done: Vec<Arc<PackIndex>>,
}

const MAX_PENDING_BYTES: u64 = 64 * 1024 * 1024;

/// `COIN_STORE_LOOSE=1` makes ingest write every object as a loose file, as coin did before
/// packs (bench/packs.sh compares the two). Read once per process.
pub const LOOSE_ENV: &str = "COIN_STORE_LOOSE";

fn ingest_loose_only() -> bool {
    static LOOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOOSE.get_or_init(|| std::env::var(LOOSE_ENV).is_ok_and(|v| v == "1"))
}

impl<'a> IngestPacker<'a> {
    pub(super) fn new(store: &'a Store) -> Self {
        IngestPacker {
            store,
            pending: Vec::new(),
            pending_bytes: 0,
            writer: None,
            done: Vec::new(),
        }
    }

    /// Whether [`IngestPacker::offer`] may take an object with this header (it is small and
    /// packing is not turned off), so the caller reads its bytes only then.
    pub(super) fn may_take(&self, header: &ObjectHeader) -> bool {
        header.encode().len() as u64 + header.payload_len <= PACK_MAX_OBJECT && !ingest_loose_only()
    }

    /// Take a new object when it is small (returns false otherwise: the caller writes it).
    pub(super) fn offer(
        &mut self,
        id: &ObjectId,
        header: &ObjectHeader,
        payload: &[u8],
    ) -> Result<bool, StoreError> {
        let len = header.encode().len() as u64 + payload.len() as u64;
        if len > PACK_MAX_OBJECT || ingest_loose_only() {
            return Ok(false);
        }
        if self.writer.is_none() {
            self.pending.push((*id, header.clone(), payload.to_vec()));
            self.pending_bytes += len;
            if self.pending.len() < MIN_PACK_OBJECTS && self.pending_bytes < MAX_PENDING_BYTES {
                return Ok(true);
            }
            let mut w = self.store.pack_writer()?;
            for (id, h, p) in std::mem::take(&mut self.pending) {
                w.add_bytes(&id, &h, &p)?;
            }
            self.writer = Some(w);
        } else if let Some(w) = self.writer.as_mut() {
            w.add_bytes(id, header, payload)?;
        }
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.len() >= MAX_PACK_BYTES)
        {
            if let Some(w) = self.writer.take() {
                self.done.extend(w.finish()?);
            }
        }
        Ok(true)
    }

    /// Make everything taken durable and visible: the pack, or loose files for a few.
    pub(super) fn finish(mut self) -> Result<(), StoreError> {
        if let Some(w) = self.writer.take() {
            self.done.extend(w.finish()?);
        }
        for (id, h, p) in std::mem::take(&mut self.pending) {
            self.store.write_object(&id, &h, |out| out.write_all(&p))?;
        }
        Ok(())
    }
}

/// Where an object to pack comes from.
enum Source {
    Loose(ObjectId),
    Packed(Arc<PackIndex>, PackEntry),
}

impl Source {
    fn id(&self) -> ObjectId {
        match self {
            Source::Loose(id) => *id,
            Source::Packed(_, e) => e.id,
        }
    }
}

impl Store {
    pub(super) fn pack_dir(&self) -> PathBuf {
        self.objects_dir().join("pack")
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, PackCache> {
        // A panic elsewhere while holding the lock leaves a usable cache (it is only a hint).
        self.packs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_cached_pack(&self, pack: Arc<PackIndex>) {
        let mut cache = self.lock_cache();
        cache.packs.retain(|p| p.name != pack.name);
        cache.packs.push(pack);
    }

    /// The packs with an index in `objects/pack/`, loading indexes not seen before. An index
    /// that cannot be read or fails its checks is left out (its objects look missing; `coin
    /// fsck` reports the index).
    pub(super) fn refresh_packs(&self) -> Result<Vec<Arc<PackIndex>>, StoreError> {
        let dir = self.pack_dir();
        let mut names = BTreeSet::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(|e| StoreError::io("list", &dir, e))?;
                    let file_name = e.file_name();
                    if let Some((stem, "idx")) = file_name.to_str().and_then(pack_name) {
                        names.insert(stem.to_string());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        }
        let old = self.lock_cache().packs.clone();
        let mut packs = Vec::with_capacity(names.len());
        for name in names {
            if let Some(p) = old.iter().find(|p| p.name == name) {
                packs.push(p.clone());
                continue;
            }
            let path = dir.join(format!("{name}.idx"));
            let Ok(bytes) = fs::read(&path) else { continue };
            if let Ok(index) = PackIndex::decode(&name, &dir, &bytes) {
                packs.push(Arc::new(index));
            }
        }
        self.lock_cache().packs = packs.clone();
        Ok(packs)
    }

    fn find_in(packs: &[Arc<PackIndex>], id: &ObjectId) -> Option<(Arc<PackIndex>, PackEntry)> {
        packs
            .iter()
            .find_map(|p| p.find(id).map(|e| (p.clone(), e)))
    }

    /// The pack holding `id`: the cache first, the directory on a miss.
    fn find_packed(
        &self,
        id: &ObjectId,
    ) -> Result<Option<(Arc<PackIndex>, PackEntry)>, StoreError> {
        let cached = self.lock_cache().packs.clone();
        if let Some(hit) = Self::find_in(&cached, id) {
            return Ok(Some(hit));
        }
        Ok(Self::find_in(&self.refresh_packs()?, id))
    }

    /// Whether a pack with an index holds `id`.
    pub(super) fn packed_contains(&self, id: &ObjectId) -> bool {
        for _ in 0..2 {
            match self.find_packed(id) {
                Ok(Some((p, _))) if p.pack_path.is_file() => return true,
                Ok(Some(_)) => {
                    // The pack went away (merged or rewritten by another process): look again.
                    let _ = self.refresh_packs();
                }
                _ => return false,
            }
        }
        false
    }

    /// Open object `id` in a pack: a reader of exactly its object file's bytes, their count
    /// and the pack's path. `None` when no pack holds it.
    pub(super) fn open_packed(
        &self,
        id: &ObjectId,
    ) -> Result<Option<(io::Take<File>, u64, PathBuf)>, StoreError> {
        for attempt in 0..2 {
            let Some((pack, entry)) = self.find_packed(id)? else {
                return Ok(None);
            };
            match File::open(&pack.pack_path) {
                Ok(mut f) => {
                    f.seek(SeekFrom::Start(entry.offset))
                        .map_err(|e| StoreError::io("read", &pack.pack_path, e))?;
                    return Ok(Some((f.take(entry.len), entry.len, pack.pack_path.clone())));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                    self.refresh_packs()?;
                }
                Err(e) => return Err(StoreError::io("open", &pack.pack_path, e)),
            }
        }
        Ok(None)
    }

    /// Every object id held by a pack (sorted, no duplicates).
    pub(super) fn packed_ids(&self) -> Result<Vec<ObjectId>, StoreError> {
        let mut ids: Vec<ObjectId> = self
            .refresh_packs()?
            .iter()
            .flat_map(|p| p.entries.iter().map(|e| e.id))
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Bytes the packs and their indexes take on disk, and how many packs there are.
    pub(super) fn pack_disk_usage(&self) -> Result<(u64, u64), StoreError> {
        let mut bytes = 0;
        let packs = self.refresh_packs()?;
        for p in &packs {
            for path in [&p.pack_path, &p.index_path] {
                bytes += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok((bytes, packs.len() as u64))
    }

    /// Start a new pack in this store (see [`PackWriter`]).
    pub fn pack_writer(&self) -> Result<PackWriter<'_>, StoreError> {
        PackWriter::new(self)
    }

    /// Copy `ids` from `from` into new packs here (objects already here are skipped), each
    /// object verified while it is copied; the packs become visible only when complete. For
    /// a transfer of many small objects. Returns the bytes copied.
    pub fn receive_packed(
        &self,
        from: &Store,
        ids: &[ObjectId],
        done: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        let mut writer: Option<PackWriter<'_>> = None;
        let mut pending = 0usize;
        for id in ids {
            if self.contains(id) {
                done(0);
                continue;
            }
            let (mut src, len, path) = from.open_raw(id)?;
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(self.pack_writer()?),
            };
            w.add(id, &mut src, &path)?;
            total += len;
            pending += 1;
            if w.len() >= MAX_PACK_BYTES {
                if let Some(w) = writer.take() {
                    w.finish()?;
                }
                for _ in 0..pending {
                    done(0);
                }
                pending = 0;
            }
        }
        if let Some(w) = writer.take() {
            w.finish()?;
        }
        for _ in 0..pending {
            done(0);
        }
        Ok(total)
    }

    /// Move small loose objects (object files up to `opts.max_object` bytes, when there are at
    /// least `opts.min_objects`) into a new pack, and merge the packs into one when there
    /// would be more than [`MAX_PACKS`] (or with `opts.merge`).
    /// Every object is verified before it is packed; a corrupt loose object stays loose and is
    /// listed in the report. Loose copies and merged packs are removed only once the new pack
    /// and its index are durable, so a kill at any point loses nothing. The caller holds the
    /// repository lock.
    pub fn pack_loose(&self, opts: &PackOptions) -> Result<PackReport, StoreError> {
        let mut report = PackReport::default();
        let mut sources = Vec::new();
        for id in self.loose_ids()? {
            let path = self.object_path(&id);
            let len = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("read the metadata of", &path, e)),
            };
            if len > opts.max_object {
                continue;
            }
            if let Err(e) = self.verify_loose(&id) {
                report.corrupt.push(e.to_string());
                continue;
            }
            sources.push(Source::Loose(id));
        }
        if sources.len() < opts.min_objects.max(1) {
            sources.clear();
        }
        let packs = self.refresh_packs()?;
        let merge = opts.merge || packs.len() + usize::from(!sources.is_empty()) > MAX_PACKS;
        let mut old = Vec::new();
        if merge && packs.len() + usize::from(!sources.is_empty()) > 1 {
            for p in &packs {
                for e in &p.entries {
                    sources.push(Source::Packed(p.clone(), *e));
                }
                old.push(p.clone());
            }
        }
        self.write_packs(sources, &old, &mut report)?;
        Ok(report)
    }

    /// Drop the objects `keep` rejects from the packs: every pack holding one is rewritten
    /// with the rest (verified as they are copied), then removed. For gc, which holds the
    /// repository lock.
    pub fn prune_packs(&self, keep: &dyn Fn(&ObjectId) -> bool) -> Result<PackReport, StoreError> {
        let mut report = PackReport::default();
        let mut sources = Vec::new();
        let mut old = Vec::new();
        for p in self.refresh_packs()? {
            let dead = p.entries.iter().filter(|e| !keep(&e.id)).count();
            if dead == 0 {
                continue;
            }
            report.dropped += dead;
            for e in p.entries.iter().filter(|e| keep(&e.id)) {
                sources.push(Source::Packed(p.clone(), *e));
            }
            old.push(p);
        }
        self.write_packs(sources, &old, &mut report)?;
        // Net: the rewritten packs take space again.
        report.freed_bytes = report.freed_bytes.saturating_sub(report.written_bytes);
        Ok(report)
    }

    /// Write `sources` into new packs, then remove the loose sources and the `old` packs.
    fn write_packs(
        &self,
        sources: Vec<Source>,
        old: &[Arc<PackIndex>],
        report: &mut PackReport,
    ) -> Result<(), StoreError> {
        let mut writer: Option<PackWriter<'_>> = None;
        let mut loose_done = Vec::new();
        let mut written = Vec::new();
        for s in &sources {
            let id = s.id();
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(self.pack_writer()?),
            };
            match s {
                Source::Loose(id) => {
                    let path = self.object_path(id);
                    let mut f = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
                    w.add(id, &mut f, &path)?;
                    loose_done.push(*id);
                }
                Source::Packed(p, e) => {
                    let mut f = File::open(&p.pack_path)
                        .map_err(|err| StoreError::io("open", &p.pack_path, err))?;
                    f.seek(SeekFrom::Start(e.offset))
                        .map_err(|err| StoreError::io("read", &p.pack_path, err))?;
                    w.add(&id, &mut f.take(e.len), &p.pack_path)?;
                }
            }
            report.packed += 1;
            if w.len() >= MAX_PACK_BYTES {
                if let Some(w) = writer.take() {
                    written.extend(w.finish()?);
                }
            }
        }
        if let Some(w) = writer.take() {
            written.extend(w.finish()?);
        }
        report.packs_written = written.len();
        for p in &written {
            for path in [&p.pack_path, &p.index_path] {
                report.written_bytes += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            }
        }
        // Everything is durable in the new packs: the old copies may go.
        let names: HashSet<&str> = written.iter().map(|p| p.name.as_str()).collect();
        for p in old {
            if names.contains(p.name.as_str()) {
                continue; // rewritten to the same bytes
            }
            for path in [&p.index_path, &p.pack_path] {
                report.freed_bytes += remove_file(path)?;
                fault::point("store.pack.after_remove_old");
            }
            report.packs_removed += 1;
        }
        let mut dirs = BTreeSet::new();
        for id in loose_done {
            let path = self.object_path(&id);
            let n = remove_file(&path)?;
            if n > 0 {
                report.loose_removed += 1;
                report.freed_bytes += n;
            }
            if let Some(d) = path.parent() {
                dirs.insert(d.to_path_buf());
            }
            fault::point("store.pack.after_remove_loose");
        }
        for d in dirs {
            fsutil::sync_dir(&d);
        }
        fsutil::sync_dir(&self.pack_dir());
        self.refresh_packs()?;
        Ok(())
    }

    /// Remove pack files without an index (a killed pack writer's) older than
    /// [`DEAD_TEMP_AGE`]. Returns how many were removed.
    pub(super) fn remove_orphan_packs(&self) -> Result<usize, StoreError> {
        let dir = self.pack_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        };
        let mut n = 0;
        for e in entries {
            let e = e.map_err(|e| StoreError::io("list", &dir, e))?;
            let file_name = e.file_name();
            let Some((stem, "pack")) = file_name.to_str().and_then(pack_name) else {
                continue;
            };
            if dir.join(format!("{stem}.idx")).exists() {
                continue;
            }
            let old = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= DEAD_TEMP_AGE);
            if old && remove_file(&e.path())? > 0 {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Check every pack and index: the index's own checksum and order, the pack's magic,
    /// version, object count and checksum (re-read whole), and that the index's entries tile
    /// the pack exactly. Object hashes are checked by [`Store::verify`] on each listed object.
    pub fn check_packs(&self) -> Result<Vec<PackProblem>, StoreError> {
        let dir = self.pack_dir();
        let mut problems = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(problems),
            Err(e) => return Err(StoreError::io("list", &dir, e)),
        };
        let mut names = BTreeSet::new();
        for e in entries {
            let e = e.map_err(|e| StoreError::io("list", &dir, e))?;
            if let Some((stem, "idx")) = e.file_name().to_str().and_then(pack_name) {
                names.insert(stem.to_string());
            }
        }
        for name in names {
            let index_path = dir.join(format!("{name}.idx"));
            let problem = |path: &Path, message: String| PackProblem {
                path: path.to_path_buf(),
                message,
            };
            let bytes = match fs::read(&index_path) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(problem(&index_path, format!("cannot be read: {e}")));
                    continue;
                }
            };
            let index = match PackIndex::decode(&name, &dir, &bytes) {
                Ok(i) => i,
                Err(reason) => {
                    problems.push(problem(&index_path, reason));
                    continue;
                }
            };
            if let Err(reason) = check_pack_file(&index) {
                problems.push(problem(&index.pack_path, reason));
            }
        }
        Ok(problems)
    }
}

/// Remove a file; returns its size, 0 when it was already gone.
fn remove_file(path: &Path) -> Result<u64, StoreError> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::io("read the metadata of", path, e)),
    };
    match fs::remove_file(path) {
        Ok(()) => Ok(len),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::io("remove", path, e)),
    }
}

/// Re-read a pack whole against its index.
fn check_pack_file(index: &PackIndex) -> Result<(), String> {
    let mut f = File::open(&index.pack_path).map_err(|e| format!("cannot be opened: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?
        .len();
    if len < PACK_HEADER_LEN + PACK_TRAILER_LEN {
        return Err(format!("the pack is {len} bytes, too short"));
    }
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    f.read_exact(&mut header)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if header[..8] != PACK_MAGIC {
        return Err("bad magic (not a coin pack)".into());
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != PACK_VERSION {
        return Err(format!("pack version {version} is not supported"));
    }
    let mut sum = blake3::Hasher::new();
    sum.update(&header);
    let mut left = len - PACK_HEADER_LEN - 32;
    let mut buf = vec![0u8; 1024 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n])
            .map_err(|e| format!("cannot be read: {e}"))?;
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    let mut stored = [0u8; 32];
    f.read_exact(&mut stored)
        .map_err(|e| format!("cannot be read: {e}"))?;
    let actual = *sum.finalize().as_bytes();
    if actual != stored {
        return Err(
            "the pack's checksum does not match its content (the file was modified or damaged)"
                .into(),
        );
    }
    if actual != index.checksum {
        return Err(format!(
            "the pack's checksum is not the one its index '{}' names",
            index.index_path.display()
        ));
    }
    let mut count = [0u8; 8];
    f.seek(SeekFrom::Start(len - PACK_TRAILER_LEN))
        .and_then(|_| f.read_exact(&mut count))
        .map_err(|e| format!("cannot be read: {e}"))?;
    let count = u64::from_le_bytes(count);
    if count != index.entries.len() as u64 {
        return Err(format!(
            "the pack says it holds {count} objects, its index {}",
            index.entries.len()
        ));
    }
    let mut spans: Vec<(u64, u64)> = index.entries.iter().map(|e| (e.offset, e.len)).collect();
    spans.sort();
    let mut at = PACK_HEADER_LEN;
    for (offset, n) in spans {
        if offset != at {
            return Err(format!(
                "the index places an object at byte {offset} where byte {at} was expected"
            ));
        }
        at = offset.saturating_add(n);
    }
    if at != len - PACK_TRAILER_LEN {
        return Err("the index's objects do not fill the pack".into());
    }
    Ok(())
}

#[cfg(test)]
#[path = "pack_tests.rs"]
mod tests;
