//! Which store objects a set of checkpoints needs, and getting the missing ones: what push,
//! fetch, the hooks and checkout share.

use std::collections::BTreeSet;

use git2::Oid;

use crate::store::transport::ObjectTransport;
use crate::store::ObjectId;

use super::super::records::{self, parse_note};
use super::super::repo::{short_id, CoinRepo, NOTES_REF};
use super::super::{CheckpointId, HistoryError};
use super::git_err;

impl CoinRepo {
    /// Commits with a coin manifest reachable from `tips` and not from `hide` (hidden ids
    /// that are not in the local repository are ignored), newest first.
    pub(crate) fn checkpoints_between(
        &self,
        tips: &[Oid],
        hide: &[Oid],
    ) -> Result<Vec<Oid>, HistoryError> {
        let git = self.git();
        let mut walk = git.revwalk().map_err(git_err("walk the history"))?;
        for t in tips {
            walk.push(*t)
                .map_err(HistoryError::git(format!("walk from {}", short_id(*t))))?;
        }
        for h in hide {
            if git.find_commit(*h).is_ok() {
                let _ = walk.hide(*h);
            }
        }
        let mut out = Vec::new();
        for id in walk {
            let id = id.map_err(git_err("walk the history"))?;
            let commit = git.find_commit(id).map_err(git_err("read a commit"))?;
            let tree = commit.tree().map_err(git_err("read a tree"))?;
            // A code commit may have its own file called `manifest`: only coin's count.
            let is_coin = tree
                .get_name("manifest")
                .and_then(|e| git.find_blob(e.id()).ok())
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b.content()).ok())
                .is_some_and(|v| {
                    v.get("format").and_then(|f| f.as_str()) == Some(records::MANIFEST_FORMAT)
                });
            if is_coin {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Every store object the checkpoints reference: manifests and eval records (tree and
    /// notes). Sorted, without duplicates.
    pub(crate) fn objects_of(&self, checkpoints: &[Oid]) -> Result<Vec<ObjectId>, HistoryError> {
        let mut ids = BTreeSet::new();
        for id in checkpoints {
            ids.extend(self.read_checkpoint((*id).into())?.object_ids());
        }
        Ok(ids.into_iter().collect())
    }

    /// Store objects named by the notes under `notes_ref` (predictions blobs).
    pub(crate) fn note_objects(&self, notes_ref: &str) -> Result<Vec<ObjectId>, HistoryError> {
        let mut ids = BTreeSet::new();
        let notes = match self.git().notes(Some(notes_ref)) {
            Ok(n) => n,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HistoryError::git("read the notes")(e)),
        };
        for n in notes {
            let (blob, target) = n.map_err(git_err("read the notes"))?;
            let b = self.git().find_blob(blob).map_err(git_err("read a note"))?;
            let note = parse_note(b.content()).map_err(|e| HistoryError::Record {
                what: format!("note on {}", short_id(target)),
                message: e.to_string(),
            })?;
            for r in note.eval.values() {
                ids.extend(r.object_ids());
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// Fetch the store objects of `checkpoints` that are missing here from the configured
    /// remotes (in name order; a remote that cannot be reached is skipped), each verified
    /// before it becomes visible. This is how objects follow a plain `git fetch`/`git pull`,
    /// which has no hook: `coin checkout` and the pointer refresh call it. Returns how many
    /// objects were fetched; with nothing missing it only checks that files exist.
    pub fn fetch_missing_objects(
        &self,
        checkpoints: &[CheckpointId],
    ) -> Result<usize, HistoryError> {
        let oids: Vec<Oid> = checkpoints.iter().map(CheckpointId::oid).collect();
        let mut missing: Vec<ObjectId> = self
            .objects_of(&oids)?
            .into_iter()
            .filter(|id| !self.store().contains(id))
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let mut fetched = 0;
        for remote in self.remotes()? {
            let Ok(transport) = self.object_transport(&remote, false) else {
                continue;
            };
            let mut still = Vec::new();
            let mut there = Vec::new();
            for id in missing {
                // An object store that cannot be listed (down, refused) counts as unreachable.
                if transport.has(&id).unwrap_or(false) {
                    there.push(id);
                } else {
                    still.push(id);
                }
            }
            // Many small objects arrive as one pack (see ObjectTransport::get_many).
            transport.get_many(self.store(), &there, &mut |_| {})?;
            fetched += there.len();
            missing = still;
            if missing.is_empty() {
                break;
            }
        }
        Ok(fetched)
    }

    /// The objects a push of `new` checkpoints (and the notes, with `notes`) must send to
    /// `other`: every object of the new checkpoints and of the notes, which must be here or
    /// there already (else an error, nothing sent); plus every object of the rest of the
    /// history reachable from `tips` that `other` lacks and this store has — a remote whose
    /// refs were moved by plain git may list checkpoints without their objects.
    pub(crate) fn objects_to_send(
        &self,
        new: &[Oid],
        tips: &[Oid],
        notes: bool,
        other: &dyn ObjectTransport,
    ) -> Result<Vec<ObjectId>, HistoryError> {
        let mut ids: BTreeSet<ObjectId> = self.objects_of(new)?.into_iter().collect();
        if notes {
            ids.extend(self.note_objects(NOTES_REF)?);
        }
        let strict: Vec<ObjectId> = ids.iter().copied().collect();
        self.check_objects_available(&strict, other)?;
        for id in self.objects_of(&self.reachable_checkpoints(tips)?)? {
            if !ids.contains(&id) && self.store().contains(&id) && !other.has(&id)? {
                ids.insert(id);
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// Check that every object in `ids` is either here or on the other side; the error lists
    /// the first missing ones.
    pub(crate) fn check_objects_available(
        &self,
        ids: &[ObjectId],
        other: &dyn ObjectTransport,
    ) -> Result<(), HistoryError> {
        let mut missing = Vec::new();
        for id in ids {
            if !self.store().contains(id) && !other.has(id)? {
                missing.push(id.to_hex());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let n = missing.len();
        missing.truncate(5);
        Err(HistoryError::Corrupt(format!(
            "{n} object(s) of the checkpoints being pushed are missing here and on '{}': {}{}; \
             nothing was pushed (run `coin fsck`, or fetch them from where they were made)",
            other.describe(),
            missing.join(", "),
            if n > 5 { ", …" } else { "" }
        )))
    }

    /// Every coin checkpoint reachable from `tips` (tips this repository does not have are
    /// skipped: fsck reports them), newest first.
    pub(crate) fn reachable_checkpoints(&self, tips: &[Oid]) -> Result<Vec<Oid>, HistoryError> {
        let present: Vec<Oid> = tips
            .iter()
            .copied()
            .filter(|t| self.git().find_commit(*t).is_ok())
            .collect();
        if present.is_empty() {
            return Ok(Vec::new());
        }
        self.checkpoints_between(&present, &[])
    }
}
