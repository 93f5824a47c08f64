//! Sharing checkpoints: remotes, push, fetch, pull and clone.
//!
//! A remote is another coin/git repository reachable as a path or `file://` URL. Its git
//! side is opened directly with libgit2: the git objects of `refs/coin/heads/*`,
//! `refs/coin/tags/*` and `refs/notes/coin` travel as one pack (only what the other side
//! lacks), and refs move by compare-and-swap (libgit2's local transport is not used: it cannot
//! list a repository whose `refs/coin/HEAD` names an unborn branch). Store objects travel
//! through an [`ObjectTransport`] (today the filesystem one), so an S3-compatible store is one
//! more implementation (docs/remotes.md).
//!
//! Ordering makes every step safe to interrupt and re-run:
//! * push: refuse if any object of the checkpoints being sent is missing locally and on the
//!   remote → copy the missing objects (each verified before it becomes visible there) →
//!   push the refs. The remote's refs never name a checkpoint whose objects it lacks.
//! * fetch: fetch git data into staging refs (`refs/coin-fetch/<remote>/…`, outside
//!   `refs/coin/`) → copy the missing objects (verified) → publish the remote-tracking refs
//!   `refs/coin/remotes/<remote>/<branch>`, new tags and the merged notes → drop the staging
//!   refs. Local coin refs never name a checkpoint whose objects are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use git2::{Oid, Repository};
use serde::Serialize;

use crate::store::transport::{transfer, Direction, FsTransport, ObjectTransport, TransferReport};
use crate::store::ObjectId;

use super::checkpoint::{ser_oid, ser_opt_oid};
use super::records::{self, parse_note, NoteRecord, SCHEMA_VERSION};
use super::repo::{short_id, CoinRepo, BRANCH_PREFIX, HEAD_REF, NOTES_REF, TAG_PREFIX};
use super::HistoryError;

/// Prefix of remote-tracking refs: `refs/coin/remotes/<remote>/<branch>`.
pub const REMOTE_PREFIX: &str = "refs/coin/remotes/";
/// Prefix of the staging refs a fetch writes before the objects are in.
pub const STAGING_PREFIX: &str = "refs/coin-fetch/";
/// Git config key (under `remote.<name>.`) naming the remote's object store explicitly.
pub const OBJECTS_KEY: &str = "coinobjects";

/// A configured remote.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteInfo {
    /// Its name (`origin`), or the URL itself for a push to a bare URL.
    pub name: String,
    /// The git URL (a path or `file://` URL).
    pub url: String,
    /// Where its store objects live (`remote.<name>.coinobjects`, else derived from the URL).
    pub objects: Option<String>,
}

/// Progress of an object transfer: `(objects done, objects in total)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// What `push` did.
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    /// The remote.
    pub remote: String,
    /// The branch pushed.
    pub branch: String,
    /// The remote branch before (None: it did not exist).
    #[serde(serialize_with = "ser_opt_oid")]
    pub old: Option<Oid>,
    /// The branch head pushed.
    #[serde(serialize_with = "ser_oid")]
    pub new: Oid,
    /// Checkpoints the remote did not have.
    pub checkpoints: usize,
    /// The object transfer.
    pub objects: TransferReport,
    /// Tags pushed.
    pub tags: Vec<String>,
    /// Whether the notes were pushed.
    pub notes: bool,
}

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
    #[serde(serialize_with = "ser_opt_oid")]
    pub old: Option<Oid>,
    /// The branch head after.
    #[serde(serialize_with = "ser_opt_oid")]
    pub new: Option<Oid>,
}

/// The local path a path or `file://` URL names; `None` for other URLs.
pub fn url_path(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    if url.contains("://") || (url.contains(':') && !url.starts_with('/') && !url.starts_with('.'))
    {
        // scp-like `host:path` or another scheme.
        return None;
    }
    Some(PathBuf::from(url))
}

fn unsupported(url: &str) -> HistoryError {
    HistoryError::Input(format!(
        "remote '{url}' is not a path or file:// URL; coin moves objects only to and from \
         filesystem remotes today (see docs/remotes.md for the S3 plan)"
    ))
}

/// Where the store of the repository at `path` is: `remote.<name>.coinobjects` wins; else
/// `<path>/.coin` when it is a coin repository; else `<path>/coin` for a bare git repository
/// (created on the first push).
fn derive_objects_dir(path: &Path) -> Option<(PathBuf, bool)> {
    if path.join(".coin").join("format-version").is_file() {
        return Some((path.join(".coin"), false));
    }
    let bare = path.join("HEAD").is_file() && path.join("objects").is_dir();
    if bare {
        return Some((path.join("coin"), true));
    }
    None
}

fn git_err(op: &str) -> impl FnOnce(git2::Error) -> HistoryError + '_ {
    move |e| HistoryError::git(op)(e)
}

impl CoinRepo {
    /// Add a remote: a git remote `name` with `url` (a path or `file://` URL; relative paths
    /// are made absolute), plus `remote.<name>.coinobjects` when `objects` is given. A git
    /// remote of that name with the same URL is reused (e.g. the code repository's `origin`).
    pub fn remote_add(
        &self,
        name: &str,
        url: &str,
        objects: Option<&str>,
    ) -> Result<RemoteInfo, HistoryError> {
        if !git2::Remote::is_valid_name(name) {
            return Err(HistoryError::Input(format!(
                "'{name}' is not a valid remote name"
            )));
        }
        let url = absolute_url(url)?;
        match self.git().find_remote(name) {
            Ok(r) => {
                if r.url().ok() != Some(url.as_str()) {
                    return Err(HistoryError::Input(format!(
                        "remote '{name}' exists with URL '{}'",
                        r.url().unwrap_or("(not UTF-8)")
                    )));
                }
            }
            Err(e) if e.code() == git2::ErrorCode::NotFound => {
                self.git()
                    .remote(name, &url)
                    .map_err(git_err("add the remote"))?;
            }
            Err(e) => return Err(HistoryError::git("read the remote")(e)),
        }
        if let Some(o) = objects {
            let o = absolute_url(o)?;
            self.git()
                .config()
                .and_then(|mut c| c.set_str(&format!("remote.{name}.{OBJECTS_KEY}"), &o))
                .map_err(git_err("set remote.<name>.coinobjects"))?;
        }
        self.remote_info(name)
    }

    /// Every git remote, with its object store setting.
    pub fn remotes(&self) -> Result<Vec<RemoteInfo>, HistoryError> {
        let names = self.git().remotes().map_err(git_err("list remotes"))?;
        let mut out = Vec::new();
        for name in names.iter().filter_map(|n| n.ok().flatten()) {
            out.push(self.remote_info(name)?);
        }
        Ok(out)
    }

    /// The remote called `name`; a path or URL that is no remote's name is taken as an
    /// anonymous remote.
    pub fn remote_info(&self, name: &str) -> Result<RemoteInfo, HistoryError> {
        let path_like = name.contains('/') || name.starts_with("file:");
        if path_like && !git2::Remote::is_valid_name(name) {
            return Ok(RemoteInfo {
                name: name.to_string(),
                url: name.to_string(),
                objects: None,
            });
        }
        match self.git().find_remote(name) {
            Ok(r) => {
                let url = r
                    .url()
                    .map_err(|_| HistoryError::Input(format!("remote '{name}' has no UTF-8 URL")))?
                    .to_string();
                let objects = self
                    .git()
                    .config()
                    .ok()
                    .and_then(|c| c.get_string(&format!("remote.{name}.{OBJECTS_KEY}")).ok());
                Ok(RemoteInfo {
                    name: name.to_string(),
                    url,
                    objects,
                })
            }
            Err(e) if e.code() == git2::ErrorCode::NotFound => {
                if name.contains('/') || name.starts_with("file:") {
                    Ok(RemoteInfo {
                        name: name.to_string(),
                        url: name.to_string(),
                        objects: None,
                    })
                } else {
                    Err(HistoryError::Input(format!(
                        "no remote named '{name}'; add one with `coin remote add {name} URL`"
                    )))
                }
            }
            Err(e) => Err(HistoryError::git("read the remote")(e)),
        }
    }

    /// The default remote: `origin` when it exists, else the only remote.
    pub fn default_remote(&self) -> Result<String, HistoryError> {
        let remotes = self.remotes()?;
        if remotes.iter().any(|r| r.name == "origin") {
            return Ok("origin".into());
        }
        match remotes.as_slice() {
            [one] => Ok(one.name.clone()),
            [] => Err(HistoryError::Input(
                "no remote is configured; add one with `coin remote add NAME URL`".into(),
            )),
            _ => Err(HistoryError::Input(
                "several remotes and none is called 'origin'; name the remote".into(),
            )),
        }
    }

    /// The object transport of `remote`: where its store objects are (its store is created
    /// on a bare repository's first push when `create`). Callers only see the trait, so
    /// another kind of store (S3, docs/remotes.md) is added here alone.
    pub fn object_transport(
        &self,
        remote: &RemoteInfo,
        create: bool,
    ) -> Result<Box<dyn ObjectTransport>, HistoryError> {
        let dir = match &remote.objects {
            Some(o) => Some((url_path(o).ok_or_else(|| unsupported(o))?, true)),
            None => {
                let path = url_path(&remote.url).ok_or_else(|| unsupported(&remote.url))?;
                derive_objects_dir(&path)
            }
        };
        let Some((dir, may_create)) = dir else {
            return Err(HistoryError::Input(format!(
                "'{}' is neither a coin repository nor a bare git repository; run `coin init` \
                 there, or set git config remote.{}.{OBJECTS_KEY} to an object folder",
                remote.url, remote.name
            )));
        };
        Ok(Box::new(FsTransport::open(&dir, create && may_create)?))
    }

    /// The git repository of a path remote, opened directly (libgit2's local transport
    /// cannot list a repository whose `refs/coin/HEAD` names an unborn branch, which every
    /// fresh coin repository has).
    fn open_remote_git(&self, remote: &RemoteInfo) -> Result<Repository, HistoryError> {
        let path = url_path(&remote.url).ok_or_else(|| unsupported(&remote.url))?;
        Repository::open(&path).map_err(HistoryError::git(format!(
            "open the remote repository '{}'",
            remote.url
        )))
    }

    /// The refs of `remote`: name → id (like `ls-remote`; symbolic refs resolved, unborn ones
    /// left out), and the branch its `refs/coin/HEAD` names.
    pub fn remote_refs(
        &self,
        remote: &RemoteInfo,
    ) -> Result<(BTreeMap<String, Oid>, Option<String>), HistoryError> {
        list_refs_of(&self.open_remote_git(remote)?)
    }

    /// Commits with a coin manifest reachable from `tips` and not from `hide` (hidden ids
    /// that are not in the local repository are ignored), newest first.
    pub fn checkpoints_between(
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
    pub fn objects_of(&self, checkpoints: &[Oid]) -> Result<Vec<ObjectId>, HistoryError> {
        let mut ids = BTreeSet::new();
        for id in checkpoints {
            let c = self.read_checkpoint(*id)?;
            ids.extend(c.manifest.object_ids());
            for (rec, _) in c.evals.values() {
                ids.extend(rec.object_ids());
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// Store objects named by the notes under `notes_ref` (predictions blobs).
    pub fn note_objects(&self, notes_ref: &str) -> Result<Vec<ObjectId>, HistoryError> {
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
    pub fn fetch_missing_objects(&self, checkpoints: &[Oid]) -> Result<usize, HistoryError> {
        let mut missing: Vec<ObjectId> = self
            .objects_of(checkpoints)?
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
            for id in missing {
                if transport.has(&id)? {
                    transport.get(self.store(), &id)?;
                    fetched += 1;
                } else {
                    still.push(id);
                }
            }
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
    pub fn objects_to_send(
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
    pub fn check_objects_available(
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
            .ok_or_else(|| HistoryError::EmptyBranch(branch.to_string()))?;
        let transport = self.object_transport(&info, true)?;
        // The remote's gc shares this lock: it must not see our objects before our refs.
        let _remote_lock = transport.lock(lock_wait())?;
        transport.clean()?;
        let rgit = self.open_remote_git(&info)?;
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
            &mut |d, t| progress(d, t),
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
            old,
            new: head,
            checkpoints: checkpoints.len(),
            objects,
            tags,
            notes,
        })
    }

    fn delete_ref(&self, name: &str) -> Result<(), HistoryError> {
        match self.git().find_reference(name) {
            Ok(mut r) => r
                .delete()
                .map_err(HistoryError::git(format!("delete {name}"))),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(()),
            Err(e) => Err(HistoryError::git(format!("read {name}"))(e)),
        }
    }

    /// Merge the notes commit `theirs` (held by `theirs_ref`) into `refs/notes/coin`:
    /// fast-forward when possible, else copy every note per task (a task recorded on both
    /// sides keeps the local record) and record a merge commit with both parents.
    /// The caller holds the repository lock.
    fn merge_notes(&self, theirs: Oid, theirs_ref: &str) -> Result<NotesUpdate, HistoryError> {
        let git = self.git();
        let ours = self.ref_target(NOTES_REF)?;
        let Some(ours) = ours else {
            git.reference(NOTES_REF, theirs, false, "coin fetch: notes")
                .map_err(git_err("create the notes ref"))?;
            return Ok(NotesUpdate::FastForward);
        };
        if ours == theirs
            || git
                .graph_descendant_of(ours, theirs)
                .map_err(git_err("compare notes"))?
        {
            return Ok(NotesUpdate::Unchanged);
        }
        if git
            .graph_descendant_of(theirs, ours)
            .map_err(git_err("compare notes"))?
        {
            git.reference_matching(NOTES_REF, theirs, true, ours, "coin fetch: notes")
                .map_err(git_err("move the notes ref"))?;
            return Ok(NotesUpdate::FastForward);
        }
        let sig = self.signature()?;
        let entries: Vec<(Oid, Oid)> = git
            .notes(Some(theirs_ref))
            .map_err(git_err("read the fetched notes"))?
            .collect::<Result<_, _>>()
            .map_err(git_err("read the fetched notes"))?;
        for (blob, target) in entries {
            let b = git.find_blob(blob).map_err(git_err("read a note"))?;
            let their_note = parse_note(b.content()).map_err(|e| HistoryError::Record {
                what: format!("fetched note on {}", short_id(target)),
                message: e.to_string(),
            })?;
            let mut merged = self.read_note(target)?.unwrap_or(NoteRecord {
                schema: SCHEMA_VERSION,
                ..NoteRecord::default()
            });
            let before = records::to_canonical_json(&merged)?;
            for (task, rec) in their_note.eval {
                merged.eval.entry(task).or_insert(rec);
            }
            let text = records::to_canonical_json(&merged)?;
            if text != before {
                git.note(&sig, &sig, Some(NOTES_REF), target, &text, true)
                    .map_err(git_err("write a merged note"))?;
            }
        }
        let tip = self
            .ref_target(NOTES_REF)?
            .ok_or_else(|| HistoryError::Corrupt(format!("{NOTES_REF} vanished")))?;
        let tree = git
            .find_commit(tip)
            .and_then(|c| c.tree())
            .map_err(git_err("read the notes tree"))?;
        let p1 = git.find_commit(tip).map_err(git_err("read the notes"))?;
        let p2 = git.find_commit(theirs).map_err(git_err("read the notes"))?;
        let merge = git
            .commit(None, &sig, &sig, "Merge coin notes", &tree, &[&p1, &p2])
            .map_err(git_err("write the notes merge"))?;
        git.reference_matching(NOTES_REF, merge, true, tip, "coin fetch: merge notes")
            .map_err(git_err("move the notes ref"))?;
        Ok(NotesUpdate::Merged)
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
        let mut verdicts: BTreeMap<Oid, Result<Vec<ObjectId>, String>> = BTreeMap::new();
        let mut refs_new: Vec<(String, Oid, Vec<Oid>)> = Vec::new();
        for (name, tip) in self.refs_under(&staging)? {
            if name == notes_staging {
                continue;
            }
            let new = self.checkpoints_between(&[tip], &local_roots)?;
            for cp in &new {
                if !verdicts.contains_key(cp) {
                    let v = self
                        .read_checkpoint(*cp)
                        .map(|c| c.manifest.object_ids())
                        .map_err(|e| super::maintenance::error_chain(&e));
                    verdicts.insert(*cp, v);
                }
            }
            refs_new.push((name, tip, new));
        }
        let mut has_remote = BTreeMap::new();
        for v in verdicts.values_mut() {
            let Ok(ids) = v else { continue };
            let mut absent = Vec::new();
            for id in ids.iter() {
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
                          verdicts: &BTreeMap<Oid, Result<Vec<ObjectId>, String>>,
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
            if let Some(Ok(ids)) = verdicts.get(cp) {
                needed.extend(ids.iter().copied());
            }
            if let Ok(c) = self.read_checkpoint(*cp) {
                for (rec, _) in c.evals.values() {
                    needed.extend(rec.object_ids());
                }
            }
        }
        if has_notes {
            match self.note_objects(&notes_staging) {
                Ok(ids) => needed.extend(ids),
                Err(e) => {
                    refused.push(format!(
                        "the notes: {}",
                        super::maintenance::error_chain(&e)
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
            &mut |d, t| progress(d, t),
        )?;
        // The same checks checkout makes, now that the objects are here, before any ref names
        // the new checkpoints.
        for cp in &checkpoints {
            let checked = self
                .read_checkpoint(*cp)
                .and_then(|c| self.check_checkpoint_files(&c));
            if let Err(e) = checked {
                verdicts.insert(*cp, Err(super::maintenance::error_chain(&e)));
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

    /// Every coin checkpoint reachable from `tips` (tips this repository does not have are
    /// skipped: fsck reports them), newest first.
    pub fn reachable_checkpoints(&self, tips: &[Oid]) -> Result<Vec<Oid>, HistoryError> {
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

    /// Refs whose names start with `prefix`, with their targets.
    fn refs_under(&self, prefix: &str) -> Result<Vec<(String, Oid)>, HistoryError> {
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
        let ours = self.branch_target(branch)?;
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
            old: ours,
            new,
        })
    }

    /// Clone: a git clone of `url` into `dir` (its code branches, when it has any), a new
    /// `.coin/` there, then a fetch of the coin history with every branch created locally
    /// and the remote's current branch made current.
    pub fn clone_from(
        url: &str,
        dir: &Path,
        progress: Progress<'_>,
    ) -> Result<(CoinRepo, FetchReport), HistoryError> {
        let url = absolute_url(url)?;
        let src = url_path(&url).ok_or_else(|| unsupported(&url))?;
        if derive_objects_dir(&src).is_none() {
            return Err(HistoryError::Input(format!(
                "'{url}' is not a coin repository (no .coin/ and not a bare git repository)"
            )));
        }
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(HistoryError::io("read directory", dir))?
                .next()
                .is_some()
        {
            return Err(HistoryError::Input(format!(
                "'{}' exists and is not empty",
                dir.display()
            )));
        }
        if git2::build::RepoBuilder::new()
            .clone(&src.display().to_string(), dir)
            .is_err()
        {
            // libgit2's clone lists every ref and fails on a symbolic ref to an unborn branch
            // (a coin repository whose current branch has no checkpoint yet): copy the code
            // branches directly instead.
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(HistoryError::io("clean up", dir))?;
            }
            clone_code_directly(&src, dir, &url)?;
        }
        // The remote URL as given (absolute), not libgit2's normalised form.
        {
            let git = git2::Repository::open(dir).map_err(git_err("open the clone"))?;
            git.remote_set_url("origin", &url)
                .map_err(git_err("set the remote URL"))?;
        }
        super::repo::CoinRepo::init(dir)?;
        let repo = CoinRepo::discover(dir)?;
        let mut fetch = repo.fetch("origin", progress)?;
        let mut created = BTreeSet::new();
        for (b, id) in &fetch.branches {
            let id = Oid::from_str(id).map_err(git_err("read a fetched id"))?;
            if repo.branch_target(b)?.is_none() {
                match repo.create_branch(b, id) {
                    Ok(()) => {
                        created.insert(b.clone());
                    }
                    Err(e @ HistoryError::InvalidName { .. }) => {
                        fetch
                            .refused
                            .push(format!("branch '{}': {e}", b.escape_debug()));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let current = fetch
            .remote_head
            .clone()
            .filter(|h| created.contains(h))
            .or_else(|| {
                created
                    .contains(super::DEFAULT_BRANCH)
                    .then(|| super::DEFAULT_BRANCH.to_string())
            })
            .or_else(|| created.iter().next().cloned());
        if let Some(b) = current {
            repo.switch(&b, false)?;
        }
        Ok((repo, fetch))
    }
}

/// Every ref of `git` with its target (symbolic refs resolved; unborn ones left out), and
/// the branch `refs/coin/HEAD` names.
fn list_refs_of(git: &Repository) -> Result<(BTreeMap<String, Oid>, Option<String>), HistoryError> {
    let mut refs = BTreeMap::new();
    let mut head = None;
    for r in git
        .references()
        .map_err(git_err("list the remote's refs"))?
    {
        let r = r.map_err(git_err("list the remote's refs"))?;
        let Ok(name) = r.name().map(str::to_string) else {
            continue;
        };
        if name == HEAD_REF {
            head = r
                .symbolic_target()
                .ok()
                .flatten()
                .and_then(|t| t.strip_prefix(BRANCH_PREFIX))
                .map(str::to_string);
        }
        if let Ok(resolved) = r.resolve() {
            if let Some(id) = resolved.target() {
                refs.insert(name, id);
            }
        }
    }
    Ok((refs, head))
}

/// Copy the git objects reachable from `tips` and not from `hide` (commits `to` already has)
/// from one repository to another, as one pack written into `to`'s object database.
fn copy_git_objects(
    from: &Repository,
    to: &Repository,
    tips: &[Oid],
    hide: &[Oid],
) -> Result<(), HistoryError> {
    let to_odb = to.odb().map_err(git_err("open the object database"))?;
    let tips: Vec<Oid> = tips
        .iter()
        .copied()
        .filter(|t| !to_odb.exists(*t))
        .collect();
    if tips.is_empty() {
        return Ok(());
    }
    let mut walk = from.revwalk().map_err(git_err("walk the history"))?;
    for t in &tips {
        walk.push(*t)
            .map_err(HistoryError::git(format!("walk from {}", short_id(*t))))?;
    }
    for h in hide {
        if to_odb.exists(*h) {
            // A commit the sender lacks cannot be hidden; it is not needed then.
            let _ = walk.hide(*h);
        }
    }
    let mut pb = from.packbuilder().map_err(git_err("build a pack"))?;
    pb.insert_walk(&mut walk).map_err(git_err("build a pack"))?;
    if pb.object_count() == 0 {
        return Ok(());
    }
    let mut writer = to_odb.packwriter().map_err(git_err("write a pack"))?;
    let mut write_err = None;
    pb.foreach(
        |chunk| match std::io::Write::write_all(&mut writer, chunk) {
            Ok(()) => true,
            Err(e) => {
                write_err = Some(e);
                false
            }
        },
    )
    .map_err(git_err("write a pack"))?;
    if let Some(e) = write_err {
        return Err(HistoryError::Io {
            op: "write a pack into".into(),
            path: to.path().to_path_buf(),
            source: e,
        });
    }
    writer.commit().map_err(git_err("index the pack"))?;
    Ok(())
}

/// A git clone without libgit2's transport: a new repository at `dir` with `origin` = `url`,
/// the source's `refs/heads/*` as `refs/remotes/origin/*`, and its HEAD branch checked out
/// when it has one.
fn clone_code_directly(src: &Path, dir: &Path, url: &str) -> Result<(), HistoryError> {
    let from = Repository::open(src).map_err(HistoryError::git(format!("open '{url}'")))?;
    let to = Repository::init(dir).map_err(HistoryError::git(format!(
        "create a git repository in '{}'",
        dir.display()
    )))?;
    to.remote("origin", url)
        .map_err(git_err("add the remote 'origin'"))?;
    let (refs, _) = list_refs_of(&from)?;
    let heads: Vec<(String, Oid)> = refs
        .into_iter()
        .filter_map(|(n, id)| n.strip_prefix("refs/heads/").map(|b| (b.to_string(), id)))
        .collect();
    let tips: Vec<Oid> = heads.iter().map(|h| h.1).collect();
    copy_git_objects(&from, &to, &tips, &[])?;
    for (b, id) in &heads {
        to.reference(&format!("refs/remotes/origin/{b}"), *id, true, "coin clone")
            .map_err(git_err("create a remote-tracking branch"))?;
    }
    let head_branch = from
        .find_reference("HEAD")
        .ok()
        .and_then(|h| h.symbolic_target().ok().flatten().map(str::to_string))
        .and_then(|t| t.strip_prefix("refs/heads/").map(str::to_string));
    if let Some(b) = head_branch {
        if let Some((_, id)) = heads.iter().find(|(n, _)| *n == b) {
            to.reference(&format!("refs/heads/{b}"), *id, false, "coin clone")
                .map_err(git_err("create the branch"))?;
            to.set_head(&format!("refs/heads/{b}"))
                .map_err(git_err("set HEAD"))?;
            to.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
                .map_err(git_err("check out the work tree"))?;
        } else {
            to.set_head(&format!("refs/heads/{b}"))
                .map_err(git_err("set HEAD"))?;
        }
    }
    Ok(())
}

fn lock_wait() -> Duration {
    let secs = std::env::var("COIN_LOCK_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// A path URL made absolute (relative to the current directory); other URLs unchanged.
fn absolute_url(url: &str) -> Result<String, HistoryError> {
    if url.starts_with("file://") || url.contains("://") {
        return Ok(url.to_string());
    }
    match url_path(url) {
        Some(p) if p.is_relative() => {
            let abs = std::path::absolute(&p).map_err(HistoryError::io("resolve", &p))?;
            // Canonical where it exists; a store folder made by the first push may not yet.
            let abs = abs
                .canonicalize()
                .ok()
                .or_else(|| {
                    let parent = abs.parent()?.canonicalize().ok()?;
                    Some(parent.join(abs.file_name()?))
                })
                .unwrap_or(abs);
            Ok(abs.display().to_string())
        }
        _ => Ok(url.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(url_path("/srv/coin"), Some(PathBuf::from("/srv/coin")));
        assert_eq!(
            url_path("file:///srv/coin"),
            Some(PathBuf::from("/srv/coin"))
        );
        assert_eq!(url_path("../shared"), Some(PathBuf::from("../shared")));
        assert_eq!(url_path("host:repo.git"), None);
        assert_eq!(url_path("https://example.com/r.git"), None);
        assert_eq!(url_path("s3://bucket/prefix"), None);
    }
}
