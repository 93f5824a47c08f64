//! `coin push`: objects first (verified on the other side), then the refs by compare-and-swap.

use git2::Oid;
use serde::Serialize;

use crate::store::transport::{transfer, Direction, TransferReport};

use super::super::repo::{short_id, CoinRepo, BRANCH_PREFIX, NOTES_REF, TAG_PREFIX};
use super::super::{CheckpointId, HistoryError};
use super::pack::{copy_git_objects, list_refs_of};
use super::{git_err, lock_wait, Progress, REMOTE_OBJECTS_CONFIG, STAGING_PREFIX};
use crate::store::s3::is_object_store_url;

/// What `push` did.
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    /// The remote.
    pub remote: String,
    /// The branch pushed.
    pub branch: String,
    /// The remote branch before (None: it did not exist).
    pub old: Option<CheckpointId>,
    /// The branch head pushed.
    pub new: CheckpointId,
    /// Checkpoints the remote did not have.
    pub checkpoints: usize,
    /// The object transfer.
    pub objects: TransferReport,
    /// Tags pushed.
    pub tags: Vec<String>,
    /// Whether the notes were pushed.
    pub notes: bool,
}

impl CoinRepo {
    /// Push `branch` (its checkpoints' objects, then the branch, its tags and the notes) to
    /// `remote`. The remote branch must be an ancestor of the local one (else: pull first).
    pub fn push(
        &self,
        remote: &str,
        branch: &str,
        progress: Progress<'_>,
    ) -> Result<PushReport, HistoryError> {
        let info = self.remote_info(remote)?;
        let head = self
            .branch_target(branch)?
            .ok_or_else(|| HistoryError::EmptyBranch(branch.to_string()))?
            .oid();
        let transport = self.object_transport(&info, true)?;
        // The remote's gc shares this lock: it must not see our objects before our refs.
        let _remote_lock = transport.lock(lock_wait())?;
        transport.clean()?;
        let rgit = self.open_remote_git(&info)?;
        if let Some(o) = info.objects.as_deref().filter(|o| is_object_store_url(o)) {
            // So that `coin clone` of the git half finds the objects.
            let mut cfg = rgit
                .config()
                .map_err(git_err("read the remote's git config"))?;
            if cfg.get_string(REMOTE_OBJECTS_CONFIG).ok().as_deref() != Some(o) {
                cfg.set_str(REMOTE_OBJECTS_CONFIG, o).map_err(git_err(
                    "record the object store in the remote's git config",
                ))?;
            }
        }
        let (remote_refs, _) = list_refs_of(&rgit)?;
        let full = format!("{BRANCH_PREFIX}{branch}");
        let old = remote_refs.get(&full).copied();
        if let Some(o) = old {
            let known = self.git().find_commit(o).is_ok();
            let ff = o == head
                || (known
                    && self
                        .git()
                        .graph_descendant_of(head, o)
                        .map_err(git_err("compare histories"))?);
            if !ff {
                return Err(HistoryError::Input(format!(
                    "the remote branch '{branch}' has checkpoints that are not in yours \
                     ({}); run `coin pull {remote} {branch}` first",
                    short_id(o)
                )));
            }
        }
        let hide: Vec<Oid> = remote_refs
            .iter()
            .filter(|(n, _)| n.starts_with("refs/coin/"))
            .map(|(_, id)| *id)
            .collect();
        let checkpoints = self.checkpoints_between(&[head], &hide)?;
        let local_notes = self.ref_target(NOTES_REF)?;
        let ids = self.objects_to_send(
            &checkpoints,
            &[head],
            local_notes.is_some(),
            transport.as_ref(),
        )?;
        let objects = transfer(
            self.store(),
            transport.as_ref(),
            &ids,
            Direction::Push,
            &mut |p| progress(p),
        )?;

        // Notes: merge the remote's first when both sides have new ones.
        let remote_notes = remote_refs.get(NOTES_REF).copied();
        if let Some(local) = local_notes {
            let needs_merge = match remote_notes {
                None => false,
                Some(r) if r == local => false,
                Some(r) => {
                    !(self.git().find_commit(r).is_ok()
                        && self
                            .git()
                            .graph_descendant_of(local, r)
                            .map_err(git_err("compare notes"))?)
                }
            };
            if let (true, Some(theirs)) = (needs_merge, remote_notes) {
                copy_git_objects(&rgit, self.git(), &[theirs], &[local])?;
                let staging = format!("{STAGING_PREFIX}push/notes");
                self.git()
                    .reference(&staging, theirs, true, "coin push: remote notes")
                    .map_err(git_err("stage the remote notes"))?;
                let merged = {
                    let _lock = self.lock()?;
                    self.merge_notes(theirs, &staging)
                };
                self.delete_ref(&staging)?;
                merged?;
            }
        }
        // (ref, expected on the remote, new target)
        let mut updates: Vec<(String, Option<Oid>, Oid)> = Vec::new();
        if old != Some(head) {
            updates.push((full.clone(), old, head));
        }
        let mut tags = Vec::new();
        for (name, target) in self.tags()? {
            let target = target.oid();
            let in_history = target == head
                || self
                    .git()
                    .graph_descendant_of(head, target)
                    .unwrap_or(false);
            let tag_ref = format!("{TAG_PREFIX}{name}");
            if in_history && !remote_refs.contains_key(&tag_ref) {
                updates.push((tag_ref, None, target));
                tags.push(name);
            }
        }
        let notes_now = self.ref_target(NOTES_REF)?;
        let mut notes = false;
        if let Some(n) = notes_now {
            if remote_notes != Some(n) {
                updates.push((NOTES_REF.to_string(), remote_notes, n));
            }
            notes = true;
        }
        let new_tips: Vec<Oid> = updates.iter().map(|u| u.2).collect();
        let remote_has: Vec<Oid> = remote_refs.values().copied().collect();
        copy_git_objects(self.git(), &rgit, &new_tips, &remote_has)?;
        for (name, expected, new) in updates {
            let msg = format!("coin push from {}", self.root().display());
            let r = match expected {
                Some(o) => rgit
                    .reference_matching(&name, new, true, o, &msg)
                    .map(|_| ()),
                None => rgit.reference(&name, new, false, &msg).map(|_| ()),
            };
            r.map_err(|e| {
                HistoryError::Input(format!(
                    "the remote's {name} changed while pushing ({}); re-run the push",
                    e.message()
                ))
            })?;
        }
        Ok(PushReport {
            remote: info.name,
            branch: branch.to_string(),
            old: old.map(Into::into),
            new: head.into(),
            checkpoints: checkpoints.len(),
            objects,
            tags,
            notes,
        })
    }
}
