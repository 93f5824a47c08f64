//! `coin fetch` and `coin pull`: git data into staging refs, each ref checked, objects in
//! (verified), then the refs published.

use std::collections::{BTreeMap, BTreeSet};

use git2::Oid;
use serde::Serialize;

use crate::store::transport::{transfer, Direction, TransferReport};
use crate::store::ObjectId;

use super::super::repo::{short_id, CoinRepo, BRANCH_PREFIX, NOTES_REF, TAG_PREFIX};
use super::super::{Checkpoint, CheckpointId, HistoryError};
use super::pack::{copy_git_objects, list_refs_of};
use super::{git_err, Progress, REMOTE_PREFIX, STAGING_PREFIX};

/// How the notes were combined on fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotesUpdate {
    /// The remote has no notes, or nothing new.
    Unchanged,
    /// The local notes ref moved forward to the remote's.
    FastForward,
    /// Both sides had new notes: merged per task (a task recorded on both keeps the local one).
    Merged,
}

/// What `fetch` did.
#[derive(Clone, Debug, Serialize)]
pub struct FetchReport {
    /// The remote.
    pub remote: String,
    /// Remote branches now tracked as `refs/coin/remotes/<remote>/<branch>`, with heads.
    pub branches: BTreeMap<String, String>,
    /// The remote's current branch, when it says.
    pub remote_head: Option<String>,
    /// Checkpoints that were new here.
    pub checkpoints: usize,
    /// The object transfer.
    pub objects: TransferReport,
    /// Tags created here.
    pub tags: Vec<String>,
    /// Tags that exist here with another target (left as they are).
    pub tag_conflicts: Vec<String>,
    /// What happened to the notes.
    pub notes: NotesUpdate,
    /// Objects of checkpoints this repository holds that are still missing after the fetch
    /// (neither here nor on the remote), sorted; `coin fsck` lists what needs them.
    pub missing: Vec<String>,
    /// Remote branches and tags not taken, with the reason (a name that would shadow a
    /// checkpoint id or a ref namespace).
    pub refused: Vec<String>,
}

/// What `pull` did to the local branch.
#[derive(Clone, Debug, Serialize)]
pub struct PullReport {
    /// The fetch.
    pub fetch: FetchReport,
    /// The local branch.
    pub branch: String,
    /// `up-to-date`, `created`, `fast-forward` (`ahead` when only the local branch has news).
    pub update: String,
    /// The branch head before.
    pub old: Option<CheckpointId>,
    /// The branch head after.
    pub new: Option<CheckpointId>,
}

impl CoinRepo {
    pub(super) fn delete_ref(&self, name: &str) -> Result<(), HistoryError> {
        match self.git().find_reference(name) {
            Ok(mut r) => r
                .delete()
                .map_err(HistoryError::git(format!("delete {name}"))),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(()),
            Err(e) => Err(HistoryError::git(format!("read {name}"))(e)),
        }
    }

    /// Fetch every coin branch, tag and the notes of `remote`, with the objects of the new
    /// checkpoints (each verified before it becomes visible). Branches become
    /// `refs/coin/remotes/<remote>/<branch>`; tags are created when absent; notes are merged.
    pub fn fetch(&self, remote: &str, progress: Progress<'_>) -> Result<FetchReport, HistoryError> {
        let info = self.remote_info(remote)?;
        let transport = self.object_transport(&info, false)?;
        let key: String = info
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let staging = format!("{STAGING_PREFIX}{key}/");
        let _lock = self.lock()?;
        self.store().remove_dead_temp_files()?;
        // Leftovers of an interrupted fetch are replaced.
        for (name, _) in self.refs_under(&staging)? {
            self.delete_ref(&name)?;
        }
        let rgit = self.open_remote_git(&info)?;
        let (remote_refs, remote_head) = list_refs_of(&rgit)?;
        let has_notes = remote_refs.contains_key(NOTES_REF);
        let mut wanted: Vec<(String, Oid)> = Vec::new();
        let mut refused = Vec::new();
        for (name, id) in &remote_refs {
            let (kind, short, staged_as) = if let Some(b) = name.strip_prefix(BRANCH_PREFIX) {
                ("branch", b, format!("{staging}heads/{b}"))
            } else if let Some(t) = name.strip_prefix(TAG_PREFIX) {
                ("tag", t, format!("{staging}tags/{t}"))
            } else {
                if name == NOTES_REF {
                    wanted.push((format!("{staging}notes"), *id));
                }
                continue;
            };
            match CoinRepo::validate_name(kind, short) {
                Ok(()) => wanted.push((staged_as, *id)),
                Err(e) => refused.push(format!("{kind} '{}': {e}", short.escape_debug())),
            }
        }
        let have: Vec<Oid> = self
            .refs_under("refs/coin/")?
            .into_iter()
            .chain(self.refs_under(NOTES_REF)?)
            .map(|(_, id)| id)
            .collect();
        let tips: Vec<Oid> = wanted.iter().map(|w| w.1).collect();
        copy_git_objects(&rgit, self.git(), &tips, &have)?;
        for (name, id) in &wanted {
            self.git()
                .reference(name, *id, true, "coin fetch: staged")
                .map_err(git_err("stage a fetched ref"))?;
        }
        let local_roots: Vec<Oid> = self.coin_roots()?.into_iter().map(|r| r.id).collect();
        let notes_staging = format!("{staging}notes");
        // Each staged branch or tag is taken only when every checkpoint it adds passes the
        // checks checkout makes and its objects can be had; a bad one is refused alone, so one
        // hostile or broken ref never blocks the others.
        let mut verdicts: BTreeMap<Oid, Result<Checkpoint, String>> = BTreeMap::new();
        let mut refs_new: Vec<(String, Oid, Vec<Oid>)> = Vec::new();
        for (name, tip) in self.refs_under(&staging)? {
            if name == notes_staging {
                continue;
            }
            let new = self.checkpoints_between(&[tip], &local_roots)?;
            for cp in &new {
                if !verdicts.contains_key(cp) {
                    let v = self
                        .read_checkpoint((*cp).into())
                        .map_err(|e| super::super::maintenance::error_chain(&e));
                    verdicts.insert(*cp, v);
                }
            }
            refs_new.push((name, tip, new));
        }
        let mut has_remote = BTreeMap::new();
        for v in verdicts.values_mut() {
            let Ok(c) = v else { continue };
            let mut absent = Vec::new();
            for id in &c.object_ids() {
                if self.store().contains(id) {
                    continue;
                }
                let there = match has_remote.get(id) {
                    Some(h) => *h,
                    None => {
                        let h = transport.has(id)?;
                        has_remote.insert(*id, h);
                        h
                    }
                };
                if !there {
                    absent.push(id.short());
                }
            }
            if !absent.is_empty() {
                *v = Err(format!(
                    "{} of its objects are on neither side ({})",
                    absent.len(),
                    absent.join(", ")
                ));
            }
        }
        let refuse_bad = |refs_new: &mut Vec<(String, Oid, Vec<Oid>)>,
                          verdicts: &BTreeMap<Oid, Result<Checkpoint, String>>,
                          refused: &mut Vec<String>|
         -> Result<(), HistoryError> {
            let mut keep = Vec::new();
            for (name, tip, new) in refs_new.drain(..) {
                let bad = new.iter().find_map(|cp| match verdicts.get(cp) {
                    Some(Err(e)) => Some((*cp, e.clone())),
                    _ => None,
                });
                match bad {
                    None => keep.push((name, tip, new)),
                    Some((cp, why)) => {
                        let shown = name[staging.len()..]
                            .replacen("heads/", "branch '", 1)
                            .replacen("tags/", "tag '", 1);
                        refused.push(format!(
                            "{shown}': checkpoint {} is refused: {why}",
                            short_id(cp)
                        ));
                        self.delete_ref(&name)?;
                    }
                }
            }
            *refs_new = keep;
            Ok(())
        };
        refuse_bad(&mut refs_new, &verdicts, &mut refused)?;
        let checkpoints: Vec<Oid> = {
            let mut seen = BTreeSet::new();
            refs_new
                .iter()
                .flat_map(|r| r.2.iter().copied())
                .filter(|c| seen.insert(*c))
                .collect()
        };
        let mut needed: BTreeSet<ObjectId> = BTreeSet::new();
        for cp in &checkpoints {
            if let Some(Ok(c)) = verdicts.get(cp) {
                needed.extend(c.object_ids());
            }
        }
        if has_notes {
            match self.note_objects(&notes_staging) {
                Ok(ids) => needed.extend(ids),
                Err(e) => {
                    refused.push(format!(
                        "the notes: {}",
                        super::super::maintenance::error_chain(&e)
                    ));
                    self.delete_ref(&notes_staging)?;
                }
            }
        }
        // Every other checkpoint this repository holds, whoever moved its refs (plain
        // `git fetch` brings commits without objects): what is missing here is fetched when
        // the remote has it, and reported when not. A local checkpoint that cannot be read is
        // fsck's to report, not a reason to stop the fetch.
        let tips: Vec<Oid> = refs_new.iter().map(|r| r.1).collect();
        let all_tips: Vec<Oid> = tips.iter().chain(&local_roots).copied().collect();
        let mut wanted_too = BTreeSet::new();
        for cp in self.reachable_checkpoints(&all_tips)? {
            let Ok(ids) = self.objects_of(&[cp]) else {
                continue;
            };
            wanted_too.extend(
                ids.into_iter()
                    .filter(|id| !needed.contains(id) && !self.store().contains(id)),
            );
        }
        if self.ref_target(NOTES_REF)?.is_some() {
            if let Ok(ids) = self.note_objects(NOTES_REF) {
                wanted_too.extend(
                    ids.into_iter()
                        .filter(|id| !needed.contains(id) && !self.store().contains(id)),
                );
            }
        }
        let mut missing = Vec::new();
        for id in wanted_too {
            if transport.has(&id)? {
                needed.insert(id);
            } else {
                missing.push(id.to_hex());
            }
        }
        let ids: Vec<ObjectId> = needed.into_iter().collect();
        let objects = transfer(
            self.store(),
            transport.as_ref(),
            &ids,
            Direction::Fetch,
            &mut |p| progress(p),
        )?;
        // The same checks checkout makes, now that the objects are here, before any ref names
        // the new checkpoints.
        for cp in &checkpoints {
            let failed = match verdicts.get(cp) {
                Some(Ok(c)) => self.check_checkpoint_files(c).err(),
                _ => None,
            };
            if let Some(e) = failed {
                verdicts.insert(*cp, Err(super::super::maintenance::error_chain(&e)));
            }
        }
        refuse_bad(&mut refs_new, &verdicts, &mut refused)?;
        let checkpoints: Vec<Oid> = checkpoints
            .into_iter()
            .filter(|c| refs_new.iter().any(|r| r.2.contains(c)))
            .collect();
        let staged = self.refs_under(&staging)?;

        // Everything is here: publish.
        let mut branches = BTreeMap::new();
        let mut tags = Vec::new();
        let mut tag_conflicts = Vec::new();
        let track = format!("{REMOTE_PREFIX}{key}/");
        for (name, id) in &staged {
            let rest = &name[staging.len()..];
            if let Some(b) = rest.strip_prefix("heads/") {
                self.git()
                    .reference(&format!("{track}{b}"), *id, true, "coin fetch")
                    .map_err(git_err("update a remote-tracking ref"))?;
                branches.insert(b.to_string(), id.to_string());
            } else if let Some(t) = rest.strip_prefix("tags/") {
                match self.ref_target(&format!("{TAG_PREFIX}{t}"))? {
                    None => {
                        self.git()
                            .reference(&format!("{TAG_PREFIX}{t}"), *id, false, "coin fetch")
                            .map_err(git_err("create a tag"))?;
                        tags.push(t.to_string());
                    }
                    Some(existing) if existing == *id => {}
                    Some(_) => tag_conflicts.push(t.to_string()),
                }
            }
        }
        // Branches the remote no longer has stop being tracked.
        for (name, _) in self.refs_under(&track)? {
            if !branches.contains_key(&name[track.len()..]) {
                self.delete_ref(&name)?;
            }
        }
        let notes = match self.ref_target(&notes_staging)? {
            Some(theirs) => self.merge_notes(theirs, &notes_staging)?,
            None => NotesUpdate::Unchanged,
        };
        for (name, _) in staged {
            self.delete_ref(&name)?;
        }
        Ok(FetchReport {
            remote: info.name,
            branches,
            remote_head,
            checkpoints: checkpoints.len(),
            objects,
            tags,
            tag_conflicts,
            notes,
            missing,
            refused,
        })
    }

    /// Refs whose names start with `prefix`, with their targets.
    pub(super) fn refs_under(&self, prefix: &str) -> Result<Vec<(String, Oid)>, HistoryError> {
        let mut out = Vec::new();
        let refs = self
            .git()
            .references_glob(&format!("{prefix}*"))
            .map_err(git_err("list refs"))?;
        for r in refs {
            let r = r.map_err(git_err("list refs"))?;
            if let (Ok(name), Some(id)) = (r.name(), r.target()) {
                out.push((name.to_string(), id));
            }
        }
        Ok(out)
    }

    /// Fetch `remote`, then bring `branch` up to date with `<remote>/<branch>`: create it,
    /// fast-forward it, or refuse when the two have diverged.
    pub fn pull(
        &self,
        remote: &str,
        branch: &str,
        progress: Progress<'_>,
    ) -> Result<PullReport, HistoryError> {
        let fetch = self.fetch(remote, progress)?;
        let theirs = fetch
            .branches
            .get(branch)
            .and_then(|s| Oid::from_str(s).ok())
            .ok_or_else(|| HistoryError::Input(format!("the remote has no branch '{branch}'")))?;
        let ours = self.branch_target(branch)?.map(|o| o.oid());
        let git = self.git();
        let update = match ours {
            None => "created",
            Some(o) if o == theirs => "up-to-date",
            Some(o)
                if git
                    .graph_descendant_of(o, theirs)
                    .map_err(git_err("compare"))? =>
            {
                "ahead"
            }
            Some(o)
                if git
                    .graph_descendant_of(theirs, o)
                    .map_err(git_err("compare"))? =>
            {
                "fast-forward"
            }
            Some(o) => {
                return Err(HistoryError::Input(format!(
                    "branch '{branch}' ({}) and {}/{branch} ({}) have diverged; keep both with \
                     `coin branch NAME {}/{branch}`",
                    short_id(o),
                    fetch.remote,
                    short_id(theirs),
                    fetch.remote
                )))
            }
        };
        let new = match update {
            "created" | "fast-forward" => {
                let _lock = self.lock()?;
                self.update_branch(branch, ours, theirs, &format!("coin pull: {remote}"))?;
                Some(theirs)
            }
            _ => ours,
        };
        Ok(PullReport {
            fetch,
            branch: branch.to_string(),
            update: update.to_string(),
            old: ours.map(Into::into),
            new: new.map(Into::into),
        })
    }
}
