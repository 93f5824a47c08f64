//! Moving objects between a local store and another place: the [`ObjectTransport`] trait and
//! its filesystem implementation [`FsTransport`] (a store reachable as a path: another
//! repository's `.coin/`, a shared disk, a mounted bucket).
//!
//! Callers (`coin push`/`pull`/`fetch`/`clone`, the `pre-push` hook) only see the trait, so a
//! network store (S3-compatible, see docs/remotes.md) is one more implementation. The contract
//! every implementation keeps:
//!
//! * `has` is exact for the objects it reports present: a present object is complete.
//! * `get` writes into the local store through [`Store::receive_object`], so nothing becomes
//!   visible locally before its hash is checked.
//! * `put` makes an object visible on the other side only once it is complete and verified
//!   (for the filesystem: temp file, hash check, rename); an interrupted `put` leaves at most
//!   a temp file, and re-running it completes.
//! * `put_many`/`get_many` keep the same promises for a batch; the filesystem writes the
//!   small objects of a batch as one pack on the receiving side (visible when whole).

use std::path::Path;
use std::time::Duration;

use super::pack::{MIN_PACK_OBJECTS, PACK_MAX_OBJECT};
use super::{Lock, ObjectId, Store, StoreError};

/// A place objects can be copied to and from.
pub trait ObjectTransport {
    /// A human-readable name of the other side (a path or URL), for messages.
    fn describe(&self) -> String;
    /// Whether the other side has object `id` (complete).
    fn has(&self, id: &ObjectId) -> Result<bool, StoreError>;
    /// Copy object `id` from `local` to the other side, verified there before it becomes
    /// visible. Returns the bytes sent (0 when the other side already had it).
    fn put(&self, local: &Store, id: &ObjectId) -> Result<u64, StoreError>;
    /// Copy object `id` from the other side into `local`, verified before it becomes visible.
    /// Returns the bytes received (0 when `local` already had it).
    fn get(&self, local: &Store, id: &ObjectId) -> Result<u64, StoreError>;
    /// [`ObjectTransport::put`] for each of `ids`, calling `done(bytes)` once per object
    /// when it is visible on the other side. Returns the bytes sent. An implementation may
    /// batch (the filesystem writes small objects as one pack).
    fn put_many(
        &self,
        local: &Store,
        ids: &[ObjectId],
        done: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        for id in ids {
            let n = self.put(local, id)?;
            total += n;
            super::fault::point("transfer.after_object");
            done(n);
        }
        Ok(total)
    }
    /// [`ObjectTransport::get`] for each of `ids`, calling `done(bytes)` once per object
    /// when it is visible locally. Returns the bytes received.
    fn get_many(
        &self,
        local: &Store,
        ids: &[ObjectId],
        done: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        for id in ids {
            let n = self.get(local, id)?;
            total += n;
            super::fault::point("transfer.after_object");
            done(n);
        }
        Ok(total)
    }
    /// Take the other side's writer lock, when it has one, for a push: its gc must not remove
    /// objects that arrived before the refs naming them. `None`: no lock to take (a store
    /// without gc, or one whose gc keeps young objects).
    fn lock(&self, _wait: Duration) -> Result<Option<Lock>, StoreError> {
        Ok(None)
    }
    /// Remove what interrupted transfers to the other side left behind (temp files of dead
    /// writers), where it keeps such things. Returns how many were removed.
    fn clean(&self) -> Result<usize, StoreError> {
        Ok(0)
    }
    /// The size of object `id` on the other side when known cheaply (for progress totals);
    /// `None` when it is not there or the size is unknown.
    fn len_there(&self, _id: &ObjectId) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Check object `id` on the other side: with `quick`, only that it exists (and has the
    /// size of the local copy, where `local` has one); else download and hash it. The default
    /// is the quick check by [`ObjectTransport::has`].
    fn check(
        &self,
        _local: &Store,
        id: &ObjectId,
        _quick: bool,
    ) -> Result<RemoteObject, StoreError> {
        Ok(if self.has(id)? {
            RemoteObject::Ok { bytes: 0 }
        } else {
            RemoteObject::Missing
        })
    }
}

/// How an object on the other side checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteObject {
    /// Present (and, for a full check, hashed right): its size in bytes.
    Ok {
        /// Its size on the other side.
        bytes: u64,
    },
    /// Not there.
    Missing,
    /// There, but not what its id promises: why.
    Corrupt(String),
}

/// A store reachable through the filesystem.
#[derive(Clone, Debug)]
pub struct FsTransport {
    remote: Store,
}

impl FsTransport {
    /// Use the store in `coin_dir` (a `.coin` directory or a bare remote's object folder);
    /// with `create`, make it when it does not exist yet.
    pub fn open(coin_dir: &Path, create: bool) -> Result<FsTransport, StoreError> {
        let remote = if create {
            Store::init(coin_dir)?
        } else {
            Store::open(coin_dir)?
        };
        Ok(FsTransport { remote })
    }

    /// The store on the other side.
    pub fn store(&self) -> &Store {
        &self.remote
    }
}

fn copy(from: &Store, to: &Store, id: &ObjectId) -> Result<u64, StoreError> {
    if to.contains(id) {
        return Ok(0);
    }
    let (mut file, len, path) = from.open_raw(id)?;
    to.receive_object(id, &mut file, &path)?;
    Ok(len)
}

/// Copy `ids` from `from` to `to`: objects up to [`PACK_MAX_OBJECT`] bytes as new packs when
/// there are at least [`MIN_PACK_OBJECTS`] of them, the rest one file each.
fn copy_many(
    from: &Store,
    to: &Store,
    ids: &[ObjectId],
    done: &mut dyn FnMut(u64),
) -> Result<u64, StoreError> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    for id in ids {
        if to.contains(id) {
            done(0);
            continue;
        }
        let (_, len, _) = from.open_raw(id)?;
        if len <= PACK_MAX_OBJECT {
            small.push(*id);
        } else {
            large.push(*id);
        }
    }
    if small.len() < MIN_PACK_OBJECTS {
        large.append(&mut small);
        large.sort();
    }
    let mut total = to.receive_packed(from, &small, done)?;
    for id in &large {
        let n = copy(from, to, id)?;
        total += n;
        super::fault::point("transfer.after_object");
        done(n);
    }
    Ok(total)
}

impl ObjectTransport for FsTransport {
    fn describe(&self) -> String {
        self.remote.root().display().to_string()
    }

    fn has(&self, id: &ObjectId) -> Result<bool, StoreError> {
        Ok(self.remote.contains(id))
    }

    fn put(&self, local: &Store, id: &ObjectId) -> Result<u64, StoreError> {
        copy(local, &self.remote, id)
    }

    fn get(&self, local: &Store, id: &ObjectId) -> Result<u64, StoreError> {
        copy(&self.remote, local, id)
    }

    fn put_many(
        &self,
        local: &Store,
        ids: &[ObjectId],
        done: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        copy_many(local, &self.remote, ids, done)
    }

    fn get_many(
        &self,
        local: &Store,
        ids: &[ObjectId],
        done: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        copy_many(&self.remote, local, ids, done)
    }

    /// The store's `lock` file, which coin's commit and gc on that side share.
    fn lock(&self, wait: Duration) -> Result<Option<Lock>, StoreError> {
        Lock::acquire(&self.remote.root().join("lock"), wait).map(Some)
    }

    fn clean(&self) -> Result<usize, StoreError> {
        self.remote.remove_dead_temp_files()
    }

    fn len_there(&self, id: &ObjectId) -> Result<Option<u64>, StoreError> {
        // Loose or packed on the other side.
        Ok(self.remote.open_raw(id).ok().map(|(_, len, _)| len))
    }

    fn check(&self, local: &Store, id: &ObjectId, quick: bool) -> Result<RemoteObject, StoreError> {
        let Some(len) = self.len_there(id)? else {
            return Ok(RemoteObject::Missing);
        };
        if quick {
            if let Ok((_, here, _)) = local.open_raw(id) {
                if here != len {
                    return Ok(RemoteObject::Corrupt(format!(
                        "it is {len} bytes there but {here} here"
                    )));
                }
            }
            return Ok(RemoteObject::Ok { bytes: len });
        }
        match self.remote.verify(id) {
            Ok(()) => Ok(RemoteObject::Ok { bytes: len }),
            Err(StoreError::Corrupt { reason, .. }) => Ok(RemoteObject::Corrupt(reason)),
            Err(StoreError::ObjectMissing { .. }) => Ok(RemoteObject::Missing),
            Err(e) => Err(e),
        }
    }
}

/// What a transfer did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransferReport {
    /// Objects asked for.
    pub objects: usize,
    /// Objects copied.
    pub transferred: usize,
    /// Objects the receiving side already had.
    pub already_present: usize,
    /// Bytes copied (object files, headers included).
    pub bytes: u64,
}

/// Which way objects move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local → other side.
    Push,
    /// Other side → local.
    Fetch,
}

/// Where a transfer is, for a progress display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferProgress {
    /// Objects handled (copied or found present).
    pub done: usize,
    /// Objects in all.
    pub total: usize,
    /// Bytes copied so far.
    pub bytes: u64,
    /// Bytes to copy in all, when the sizes are known (a push knows its local files; a
    /// fetch knows what the other side lists).
    pub bytes_total: Option<u64>,
}

/// Copy `ids` between `local` and `transport` in `direction`; only missing objects move.
/// `progress` is called once before the first copy and after each object. The fault point
/// `transfer.after_object` (reached after each object copied) lets tests kill a transfer
/// midway; re-running it copies only what is still missing.
pub fn transfer(
    local: &Store,
    transport: &dyn ObjectTransport,
    ids: &[ObjectId],
    direction: Direction,
    progress: &mut dyn FnMut(&TransferProgress),
) -> Result<TransferReport, StoreError> {
    let mut report = TransferReport {
        objects: ids.len(),
        ..TransferReport::default()
    };
    // Which objects must move, and how many bytes that is (when known).
    let mut todo = Vec::with_capacity(ids.len());
    let mut bytes_total = Some(0u64);
    for id in ids {
        let present = match direction {
            Direction::Push => transport.has(id)?,
            Direction::Fetch => local.contains(id),
        };
        if present {
            report.already_present += 1;
            continue;
        }
        let len = match direction {
            Direction::Push => local.open_raw(id).ok().map(|(_, len, _)| len),
            Direction::Fetch => transport.len_there(id)?,
        };
        bytes_total = bytes_total.zip(len).map(|(a, b)| a + b);
        todo.push(*id);
    }
    let mut state = TransferProgress {
        done: report.already_present,
        total: ids.len(),
        bytes: 0,
        bytes_total,
    };
    progress(&state);
    let mut each = |n: u64| {
        state.done += 1;
        state.bytes += n;
        progress(&state);
    };
    // Many small objects may move as one pack (see ObjectTransport::put_many).
    report.bytes = match direction {
        Direction::Push => transport.put_many(local, &todo, &mut each)?,
        Direction::Fetch => transport.get_many(local, &todo, &mut each)?,
    };
    report.transferred = todo.len();
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn stores() -> (tempfile::TempDir, Store, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let a = Store::init(&tmp.path().join("a")).unwrap();
        let b = Store::init(&tmp.path().join("b")).unwrap();
        (tmp, a, b)
    }

    #[test]
    fn only_missing_objects_move_and_arrive_verified() {
        let (_tmp, a, b) = stores();
        let ids: Vec<ObjectId> = (0..5)
            .map(|i| a.put_blob_bytes(format!("object {i}").as_bytes()).unwrap())
            .collect();
        // b already has one of them.
        b.put_blob_bytes(b"object 2").unwrap();
        let t = FsTransport::open(b.root(), false).unwrap();
        let mut seen = Vec::new();
        let r = transfer(&a, &t, &ids, Direction::Push, &mut |p| seen.push(*p)).unwrap();
        assert_eq!((r.objects, r.transferred, r.already_present), (5, 4, 1));
        // Once before the copies (the present one counted), then once per copy.
        assert_eq!(seen.len(), 5);
        assert_eq!((seen[0].done, seen[0].total, seen[0].bytes), (1, 5, 0));
        let last = seen[4];
        assert_eq!((last.done, last.bytes), (5, r.bytes));
        assert_eq!(last.bytes_total, Some(r.bytes));
        assert!(seen.windows(2).all(|w| w[0].bytes <= w[1].bytes));
        for id in &ids {
            b.verify(id).unwrap();
        }
        let again = transfer(&a, &t, &ids, Direction::Push, &mut |_| {}).unwrap();
        assert_eq!((again.transferred, again.bytes), (0, 0));
        // And back into an empty third store.
        let c = Store::init(&b.root().with_file_name("c")).unwrap();
        let r = transfer(&c, &t, &ids, Direction::Fetch, &mut |_| {}).unwrap();
        assert_eq!(r.transferred, 5);
        assert_eq!(c.read_blob(&ids[4]).unwrap(), b"object 4");
    }

    #[test]
    fn a_corrupt_source_is_refused_and_leaves_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, a, b) = stores();
        let id = a.put_blob_bytes(b"precious weights").unwrap();
        let path = a.object_path(&id);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let t = FsTransport::open(b.root(), false).unwrap();
        let err = t.put(&a, &id).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { .. }),
            "unexpected error: {err}"
        );
        assert!(!b.contains(&id), "a corrupt object must not become visible");
        // Trailing bytes and a truncated file are refused too.
        bytes[last] ^= 1;
        let mut long = bytes.clone();
        long.push(0);
        let err = b
            .receive_object(&id, &mut long.as_slice(), Path::new("long"))
            .unwrap_err();
        assert!(err.to_string().contains("follow the payload"), "{err}");
        let err = b
            .receive_object(&id, &mut &bytes[..last], Path::new("short"))
            .unwrap_err();
        assert!(err.to_string().contains("ends early"), "{err}");
        assert!(!b.contains(&id));
        assert!(b
            .receive_object(&id, &mut bytes.as_slice(), Path::new("ok"))
            .unwrap());
        b.verify(&id).unwrap();
    }

    #[test]
    fn check_finds_missing_resized_and_corrupt_objects_on_the_other_side() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, a, b) = stores();
        let ids: Vec<ObjectId> = (0..3)
            .map(|i| a.put_blob_bytes(format!("weights {i}").as_bytes()).unwrap())
            .collect();
        let t = FsTransport::open(b.root(), false).unwrap();
        transfer(&a, &t, &ids[..2], Direction::Push, &mut |_| {}).unwrap();
        let len = std::fs::metadata(a.object_path(&ids[0])).unwrap().len();
        for quick in [true, false] {
            assert_eq!(
                t.check(&a, &ids[0], quick).unwrap(),
                RemoteObject::Ok { bytes: len }
            );
            assert_eq!(t.check(&a, &ids[2], quick).unwrap(), RemoteObject::Missing);
        }
        assert_eq!(t.len_there(&ids[0]).unwrap(), Some(len));
        assert_eq!(t.len_there(&ids[2]).unwrap(), None);
        // Same size, one bit flipped: only the full check sees it.
        let path = b.object_path(&ids[1]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            t.check(&a, &ids[1], true).unwrap(),
            RemoteObject::Ok { .. }
        ));
        assert!(matches!(
            t.check(&a, &ids[1], false).unwrap(),
            RemoteObject::Corrupt(r) if r.contains("does not match")
        ));
        // Truncated: the quick check compares with the local copy's size.
        std::fs::write(&path, &bytes[..last]).unwrap();
        assert!(matches!(
            t.check(&a, &ids[1], true).unwrap(),
            RemoteObject::Corrupt(r) if r.contains("bytes there")
        ));
    }

    #[test]
    fn missing_source_object_is_reported() {
        let (_tmp, a, b) = stores();
        let id = ObjectId::from(blake3::hash(b"nothing"));
        let t = FsTransport::open(b.root(), false).unwrap();
        assert!(matches!(
            t.put(&a, &id),
            Err(StoreError::ObjectMissing { .. })
        ));
    }
}
