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

/// Copy `ids` between `local` and `transport` in `direction`; only missing objects move.
/// `progress(done, total)` is called after each object. The fault point
/// `transfer.after_object` (reached after each object copied) lets tests kill a transfer
/// midway; re-running it copies only what is still missing.
pub fn transfer(
    local: &Store,
    transport: &dyn ObjectTransport,
    ids: &[ObjectId],
    direction: Direction,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TransferReport, StoreError> {
    let mut report = TransferReport {
        objects: ids.len(),
        ..TransferReport::default()
    };
    let mut missing = Vec::new();
    let mut done = 0;
    for id in ids {
        let present = match direction {
            Direction::Push => transport.has(id)?,
            Direction::Fetch => local.contains(id),
        };
        if present {
            report.already_present += 1;
            done += 1;
            progress(done, ids.len());
        } else {
            missing.push(*id);
        }
    }
    let mut each = |_: u64| {
        done += 1;
        progress(done, ids.len());
    };
    report.bytes = match direction {
        Direction::Push => transport.put_many(local, &missing, &mut each)?,
        Direction::Fetch => transport.get_many(local, &missing, &mut each)?,
    };
    report.transferred = missing.len();
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
        let mut calls = 0;
        let r = transfer(&a, &t, &ids, Direction::Push, &mut |_, _| calls += 1).unwrap();
        assert_eq!((r.objects, r.transferred, r.already_present), (5, 4, 1));
        assert_eq!(calls, 5);
        for id in &ids {
            b.verify(id).unwrap();
        }
        let again = transfer(&a, &t, &ids, Direction::Push, &mut |_, _| {}).unwrap();
        assert_eq!((again.transferred, again.bytes), (0, 0));
        // And back into an empty third store.
        let c = Store::init(&b.root().with_file_name("c")).unwrap();
        let r = transfer(&c, &t, &ids, Direction::Fetch, &mut |_, _| {}).unwrap();
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
