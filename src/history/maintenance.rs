//! Reachability, `fsck`, `gc` and `stats`.
//!
//! Roots: every ref under `refs/coin/` and its reflog, the notes ref `refs/notes/coin`, its
//! reflog and every commit a note is attached to; for gc also every other ref of the git
//! repository (a user may keep a checkpoint on a plain git branch) and its reflog. Everything
//! reachable from a root is kept: the checkpoints' manifests name the store objects to keep,
//! and eval records may name a `predictions` blob.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use git2::{ObjectType, Oid, Repository};
use serde::Serialize;

use crate::store::{fault, ObjectId, RepackReport};

use super::records::{entry_object_ids, parse_manifest, parse_note, Manifest, MANIFEST_FORMAT};
use super::repo::{short_id, CoinRepo, HEAD_REF, NOTES_REF};
use super::{CheckpointId, HistoryError};

/// A root of reachability: a commit and where it was found.
#[derive(Clone, Debug)]
pub(crate) struct Root {
    pub id: Oid,
    pub from: String,
}

/// One thing `coin fsck` found wrong.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FsckProblem {
    /// The object, checkpoint or ref concerned.
    pub object: String,
    /// `object` (store object fails verification), `missing-object`, `checkpoint`, `ref`,
    /// `note` or `history`.
    pub kind: String,
    /// What is wrong.
    pub message: String,
}

/// The result of `coin fsck`.
#[derive(Clone, Debug, Serialize)]
pub struct FsckReport {
    /// True when no problem was found.
    pub ok: bool,
    /// Store objects verified.
    pub objects_checked: usize,
    /// Checkpoints checked.
    pub checkpoints_checked: usize,
    /// Everything wrong.
    pub problems: Vec<FsckProblem>,
}

/// A note (or some of its eval records) `coin fsck --drop-bad-notes` removed.
#[derive(Clone, Debug, Serialize)]
pub struct DroppedNote {
    /// The checkpoint the note is attached to.
    pub checkpoint: String,
    /// The tasks whose records were removed; empty when the whole note was deleted.
    pub tasks: Vec<String>,
    /// Why.
    pub reason: String,
}

/// The result of `coin gc`.
#[derive(Clone, Debug, Serialize)]
pub struct GcReport {
    /// Whether objects were only listed, not removed.
    pub dry_run: bool,
    /// Objects kept (reachable).
    pub kept: usize,
    /// Objects removed (or that would be removed).
    pub removed: Vec<String>,
    /// Bytes freed (0 for a dry run).
    pub freed_bytes: u64,
    /// Temp files of interrupted object writes (whose writer is gone) removed.
    pub temp_files_removed: usize,
    /// What packing did after the removal: dead objects dropped from packs, small loose
    /// objects packed (default for a dry run: nothing is packed).
    pub pack: crate::store::pack::PackReport,
}

/// The result of `coin stats`.
#[derive(Clone, Debug, Serialize)]
pub struct RepoStats {
    /// Objects in the store.
    pub objects: u64,
    /// Bytes the store takes on disk.
    pub stored_bytes: u64,
    /// Bytes the store's objects hold decoded (each object once, headers excluded).
    pub object_bytes: u64,
    /// `stored_bytes / object_bytes` (1 for an empty store).
    pub stored_ratio: f64,
    /// Objects stored compressed (`coin repack`).
    pub compressed_objects: u64,
    /// Decoded bytes of the compressed objects.
    pub compressed_object_bytes: u64,
    /// Their bytes on disk.
    pub compressed_stored_bytes: u64,
    /// Bytes all reachable checkpoints would take as plain files (no dedupe).
    pub logical_bytes: u64,
    /// Reachable checkpoints.
    pub checkpoints: usize,
    /// How many of the objects are in pack files.
    pub packed_objects: u64,
    /// How many pack files there are.
    pub packs: u64,
}

#[derive(Default)]
struct Reach {
    checkpoints: Vec<Oid>,
    manifests: BTreeMap<Oid, Manifest>,
    objects: BTreeMap<ObjectId, String>,
    /// Objects only older notes name: kept by gc, not required by fsck.
    kept: BTreeMap<ObjectId, String>,
    problems: Vec<FsckProblem>,
}

fn problem(object: impl Into<String>, kind: &str, message: impl Into<String>) -> FsckProblem {
    FsckProblem {
        object: object.into(),
        kind: kind.to_string(),
        message: message.into(),
    }
}

fn reflog_ids(git: &Repository, name: &str, from: &str, out: &mut Vec<Root>) {
    if let Ok(log) = git.reflog(name) {
        for entry in log.iter() {
            for id in [entry.id_old(), entry.id_new()] {
                if !id.is_zero() {
                    out.push(Root {
                        id,
                        from: format!("reflog of {from}"),
                    });
                }
            }
        }
    }
}

/// The notes of one notes commit: (target commit, note blob) for every note in its tree.
fn notes_in_commit(git: &Repository, commit: Oid) -> Result<Vec<(Oid, Oid)>, String> {
    let tree = git
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(|e| format!("notes commit unreadable: {e}"))?;
    let mut out = Vec::new();
    let _ = tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() != Some(ObjectType::Blob) {
            return git2::TreeWalkResult::Ok;
        }
        let hex = format!("{}{}", dir.replace('/', ""), entry.name().unwrap_or(""));
        if let Ok(target) = Oid::from_str(&hex) {
            out.push((target, entry.id()));
        }
        git2::TreeWalkResult::Ok
    });
    Ok(out)
}

/// Note-target commits and predictions ids of the notes. The current notes (the tip of
/// `refs/notes/coin`) are checked: a note that does not parse is a problem and its objects
/// must exist. Older notes commits (the notes' history and reflog) only keep what they name
/// alive for gc (`kept`): a bad note that was replaced or dropped is history, not damage.
fn note_targets(
    git: &Repository,
    roots: &mut Vec<Root>,
    objects: &mut BTreeMap<ObjectId, String>,
    kept: &mut BTreeMap<ObjectId, String>,
    problems: &mut Vec<FsckProblem>,
) {
    let mut notes_commits = Vec::new();
    let tip = git.find_reference(NOTES_REF).ok().and_then(|r| r.target());
    if let Some(t) = tip {
        notes_commits.push(Root {
            id: t,
            from: NOTES_REF.to_string(),
        });
    }
    reflog_ids(git, NOTES_REF, NOTES_REF, &mut notes_commits);
    let Ok(mut walk) = git.revwalk() else { return };
    for r in &notes_commits {
        if walk.push(r.id).is_err() && Some(r.id) == tip {
            problems.push(problem(
                r.id.to_string(),
                "note",
                format!("notes commit (from {}) is missing", r.from),
            ));
        }
    }
    let mut seen_blobs = BTreeSet::new();
    for oid in walk {
        let oid = match oid {
            Ok(o) => o,
            Err(e) => {
                problems.push(problem(
                    NOTES_REF,
                    "note",
                    format!("walking the notes: {e}"),
                ));
                break;
            }
        };
        let current = Some(oid) == tip;
        let notes = match notes_in_commit(git, oid) {
            Ok(n) => n,
            Err(e) => {
                if current {
                    problems.push(problem(oid.to_string(), "note", e));
                }
                continue;
            }
        };
        for (target, blob) in notes {
            roots.push(Root {
                id: target,
                from: format!("note on {}", short_id(target)),
            });
            if !seen_blobs.insert((blob, current)) {
                continue;
            }
            let referrer = format!("note on {}", short_id(target));
            let parsed = git
                .find_blob(blob)
                .map_err(|e| format!("note blob {blob} unreadable: {e}"))
                .and_then(|b| {
                    parse_note(b.content()).map_err(|e| format!("note blob {blob}: {e}"))
                });
            match parsed {
                Ok(n) => {
                    for r in n.eval.values() {
                        for id in r.object_ids() {
                            let into = if current { &mut *objects } else { &mut *kept };
                            into.entry(id).or_insert_with(|| referrer.clone());
                        }
                    }
                }
                Err(e) if current => problems.push(problem(
                    short_id(target),
                    "note",
                    format!("{e} (`coin fsck --drop-bad-notes` removes it)"),
                )),
                Err(_) => {}
            }
        }
    }
}

/// Read a commit's `manifest` if it has one that claims to be a coin manifest.
/// Ok(None): no manifest or not a coin manifest (a user's own file called `manifest`).
fn coin_manifest(git: &Repository, id: Oid) -> Result<Option<Manifest>, String> {
    let commit = git.find_commit(id).map_err(|e| e.to_string())?;
    let tree = commit.tree().map_err(|e| e.to_string())?;
    let Some(entry) = tree.get_name("manifest") else {
        return Ok(None);
    };
    let blob = git.find_blob(entry.id()).map_err(|e| e.to_string())?;
    match parse_manifest(blob.content()) {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            let claims_coin = serde_json::from_slice::<serde_json::Value>(blob.content())
                .ok()
                .and_then(|v| v.get("format").and_then(|f| f.as_str().map(str::to_string)))
                .is_some_and(|f| f == MANIFEST_FORMAT);
            if claims_coin {
                Err(e.to_string())
            } else {
                Ok(None)
            }
        }
    }
}

impl CoinRepo {
    /// The roots of coin history: coin refs, their reflogs, notes targets.
    pub(crate) fn coin_roots(&self) -> Result<Vec<Root>, HistoryError> {
        let git = self.git();
        let mut roots = Vec::new();
        let refs = git
            .references_glob("refs/coin/*")
            .map_err(HistoryError::git("list refs"))?;
        for r in refs.flatten() {
            let Ok(name) = r.name().map(str::to_string) else {
                continue;
            };
            if let Ok(c) = r.peel_to_commit() {
                roots.push(Root {
                    id: c.id(),
                    from: name.clone(),
                });
            }
            reflog_ids(git, &name, &name, &mut roots);
        }
        reflog_ids(git, HEAD_REF, HEAD_REF, &mut roots);
        let mut objects = BTreeMap::new();
        let mut kept = BTreeMap::new();
        let mut problems = Vec::new();
        note_targets(git, &mut roots, &mut objects, &mut kept, &mut problems);
        Ok(roots)
    }

    fn reach(&self, include_other_refs: bool) -> Result<Reach, HistoryError> {
        let git = self.git();
        let mut reach = Reach::default();
        let mut roots = Vec::new();
        let refs = git
            .references_glob("refs/coin/*")
            .map_err(HistoryError::git("list refs"))?;
        for r in refs {
            let r = r.map_err(HistoryError::git("list refs"))?;
            let name = r.name().unwrap_or("(non-UTF-8 ref)").to_string();
            match r.peel_to_commit() {
                Ok(c) => roots.push(Root {
                    id: c.id(),
                    from: name.clone(),
                }),
                Err(e) if name == HEAD_REF && e.code() == git2::ErrorCode::NotFound => {}
                Err(e) => reach.problems.push(problem(
                    name.clone(),
                    "ref",
                    format!("does not point at a commit: {e}"),
                )),
            }
            reflog_ids(git, &name, &name, &mut roots);
        }
        note_targets(
            git,
            &mut roots,
            &mut reach.objects,
            &mut reach.kept,
            &mut reach.problems,
        );

        let mut walk = git
            .revwalk()
            .map_err(HistoryError::git("walk the history"))?;
        let mut pushed = BTreeSet::new();
        for r in &roots {
            if !pushed.insert(r.id) {
                continue;
            }
            if let Err(e) = walk.push(r.id) {
                let reflog = r.from.starts_with("reflog of ");
                // git itself may expire old reflog entries' commits; that is not damage.
                if !reflog {
                    reach.problems.push(problem(
                        r.id.to_string(),
                        "history",
                        format!("commit (from {}) is missing or unreadable: {e}", r.from),
                    ));
                }
            }
        }
        for oid in walk {
            let oid = match oid {
                Ok(o) => o,
                Err(e) => {
                    reach
                        .problems
                        .push(problem("history", "history", format!("walking: {e}")));
                    break;
                }
            };
            reach.checkpoints.push(oid);
            match coin_manifest(git, oid) {
                Ok(Some(m)) => {
                    for (path, entry) in &m.files {
                        for id in entry_object_ids(entry) {
                            reach
                                .objects
                                .entry(id)
                                .or_insert_with(|| format!("{} file {path}", short_id(oid)));
                        }
                    }
                    reach.manifests.insert(oid, m);
                }
                Ok(None) => reach.problems.push(problem(
                    oid.to_string(),
                    "checkpoint",
                    "reachable from coin refs but has no coin manifest",
                )),
                Err(e) => reach.problems.push(problem(
                    oid.to_string(),
                    "checkpoint",
                    format!("manifest: {e}"),
                )),
            }
        }

        if include_other_refs {
            let mut other = Vec::new();
            let all = git.references().map_err(HistoryError::git("list refs"))?;
            for r in all.flatten() {
                let Ok(name) = r.name().map(str::to_string) else {
                    continue;
                };
                if name.starts_with("refs/coin/") || name == NOTES_REF {
                    continue;
                }
                if let Ok(c) = r.peel_to_commit() {
                    other.push(c.id());
                }
                let mut logged = Vec::new();
                reflog_ids(git, &name, &name, &mut logged);
                other.extend(logged.into_iter().map(|r| r.id));
            }
            let mut logged = Vec::new();
            reflog_ids(git, "HEAD", "HEAD", &mut logged);
            other.extend(logged.into_iter().map(|r| r.id));
            let mut walk = git
                .revwalk()
                .map_err(HistoryError::git("walk the history"))?;
            for id in other {
                let _ = walk.push(id);
            }
            for id in &reach.checkpoints {
                let _ = walk.hide(*id);
            }
            for oid in walk.flatten() {
                match coin_manifest(git, oid) {
                    Ok(Some(m)) => {
                        for id in m.object_ids() {
                            reach
                                .objects
                                .entry(id)
                                .or_insert_with(|| format!("commit {}", short_id(oid)));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => reach.problems.push(problem(
                        oid.to_string(),
                        "checkpoint",
                        format!("manifest: {e}"),
                    )),
                }
            }
        }
        Ok(reach)
    }

    /// Check everything: every store object re-hashed, every checkpoint reachable from coin
    /// refs, reflogs and notes readable with all its objects present, refs valid.
    pub fn fsck(&self) -> Result<FsckReport, HistoryError> {
        let reach = self.reach(false)?;
        let mut problems = reach.problems;
        if let Err(e) = self.current_branch() {
            problems.push(problem(HEAD_REF, "ref", e.to_string()));
        }
        for id in &reach.checkpoints {
            if let Some(m) = reach.manifests.get(id) {
                let all_here = m.object_ids().iter().all(|o| self.store().contains(o));
                let checked = self.read_checkpoint((*id).into()).and_then(|cp| {
                    // Missing objects are reported once, below, as missing-object.
                    if all_here {
                        self.check_checkpoint_files(&cp)
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = checked {
                    problems.push(problem(id.to_string(), "checkpoint", error_chain(&e)));
                }
            }
        }
        for (id, referrer) in &reach.objects {
            if !self.store().contains(id) {
                problems.push(problem(
                    id.to_hex(),
                    "missing-object",
                    format!("referenced by {referrer} but not in the store"),
                ));
            }
        }
        for p in self.store().check_packs()? {
            problems.push(problem(p.path.display().to_string(), "pack", p.message));
        }
        let listed = self.store().list()?;
        for id in &listed {
            if let Err(e) = self.store().verify(id) {
                problems.push(problem(id.to_hex(), "object", object_problem(&e)));
            }
        }
        Ok(FsckReport {
            ok: problems.is_empty(),
            objects_checked: listed.len(),
            checkpoints_checked: reach.checkpoints.len(),
            problems,
        })
    }

    /// Remove from the current notes what fsck calls damage, without touching any checkpoint:
    /// a note that does not parse or sits on a commit this repository lacks is deleted; the
    /// eval records of a note that name objects missing from the store are removed from it (the
    /// note goes when nothing is left). The notes' history keeps the old notes, as git does.
    /// Returns what was dropped.
    pub fn drop_bad_notes(&self) -> Result<Vec<DroppedNote>, HistoryError> {
        let _lock = self.lock()?;
        let git = self.git();
        let entries: Vec<(Oid, Oid)> = match git.notes(Some(NOTES_REF)) {
            Ok(it) => it
                .collect::<Result<_, _>>()
                .map_err(HistoryError::git("read the notes"))?,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HistoryError::git("read the notes")(e)),
        };
        let sig = self.signature()?;
        let mut dropped = Vec::new();
        for (blob, target) in entries {
            let parsed = git
                .find_blob(blob)
                .map_err(|e| e.to_string())
                .and_then(|b| parse_note(b.content()).map_err(|e| error_chain(&e)));
            let whole = |reason: String| DroppedNote {
                checkpoint: target.to_string(),
                tasks: Vec::new(),
                reason,
            };
            let outcome = if git.find_commit(target).is_err() {
                Some((
                    None,
                    whole("it is attached to a commit this repository lacks".into()),
                ))
            } else {
                match parsed {
                    Err(e) => Some((None, whole(e))),
                    Ok(mut note) => {
                        let bad: Vec<String> = note
                            .eval
                            .iter()
                            .filter(|(_, r)| {
                                r.object_ids().iter().any(|o| !self.store().contains(o))
                            })
                            .map(|(t, _)| t.clone())
                            .collect();
                        if bad.is_empty() {
                            None
                        } else {
                            for t in &bad {
                                note.eval.remove(t);
                            }
                            let drop = DroppedNote {
                                checkpoint: target.to_string(),
                                tasks: bad,
                                reason: "its records name objects missing from the store".into(),
                            };
                            let keep =
                                (!note.eval.is_empty() || !note.extra.is_empty()).then_some(note);
                            Some((keep, drop))
                        }
                    }
                }
            };
            let Some((keep, drop)) = outcome else {
                continue;
            };
            match keep {
                Some(note) => {
                    let text = super::records::to_canonical_json(&note)?;
                    git.note(&sig, &sig, Some(NOTES_REF), target, &text, true)
                        .map_err(HistoryError::git(format!(
                            "rewrite the note of {}",
                            short_id(target)
                        )))?;
                }
                None => {
                    git.note_delete(target, Some(NOTES_REF), &sig, &sig)
                        .map_err(HistoryError::git(format!(
                            "delete the note of {}",
                            short_id(target)
                        )))?;
                }
            }
            dropped.push(drop);
        }
        Ok(dropped)
    }

    /// Remove every store object no root reaches. Holds the repository lock for the whole
    /// run, so it never races a commit (which holds it from before its first object write to
    /// after its ref update). Refuses to run when reachability cannot be fully determined.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, HistoryError> {
        let _lock = self.lock()?;
        let reach = self.reach(true)?;
        if let Some(p) = reach.problems.first() {
            return Err(HistoryError::Corrupt(format!(
                "gc refused: the history is damaged ({} problem(s), first: {}: {}); run `coin fsck`",
                reach.problems.len(),
                p.object,
                p.message
            )));
        }
        fault::point("gc.after_mark");
        let mut removed = Vec::new();
        let mut freed = 0;
        let mut kept = 0;
        for id in self.store().list()? {
            if reach.objects.contains_key(&id) || reach.kept.contains_key(&id) {
                kept += 1;
                continue;
            }
            if !dry_run {
                freed += self.store().remove(&id)?;
                fault::point("gc.after_remove");
            }
            removed.push(id.to_hex());
        }
        // Leftovers of killed writers: a live writer (with or without the repository lock)
        // holds a lock on its temp file.
        let temp_files_removed = if dry_run {
            0
        } else {
            self.store().remove_dead_temp_files()?
        };
        // Dead objects inside packs go with their pack's rewrite; then the small loose
        // objects that are left are packed.
        let mut pack = crate::store::pack::PackReport::default();
        if !dry_run {
            let live =
                |id: &ObjectId| reach.objects.contains_key(id) || reach.kept.contains_key(id);
            let pruned = self.store().prune_packs(&live)?;
            freed += pruned.freed_bytes;
            fault::point("gc.after_prune");
            pack = self
                .store()
                .pack_loose(&crate::store::pack::PackOptions::default())?;
            pack.dropped = pruned.dropped;
            pack.packed += pruned.packed;
            pack.packs_removed += pruned.packs_removed;
            pack.packs_written += pruned.packs_written;
        }
        Ok(GcReport {
            dry_run,
            kept,
            removed,
            freed_bytes: freed,
            temp_files_removed,
            pack,
        })
    }

    /// Compress the store's loose raw objects that shrink (`coin repack`, `coin gc
    /// --compress`), at zstd `level`, then pack the small loose objects. Holds the repository lock for the whole run, like gc.
    pub fn repack(
        &self,
        level: i32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RepackReport, HistoryError> {
        let _lock = self.lock()?;
        let mut report = self.store().repack(level, progress)?;
        // Then the small loose objects (compressed or not) go into a pack, as gc does.
        report.pack = self
            .store()
            .pack_loose(&crate::store::pack::PackOptions::default())?;
        self.store().remove_dead_temp_files()?;
        Ok(report)
    }

    /// Store size and the logical size of all reachable checkpoints.
    pub fn stats(&self) -> Result<RepoStats, HistoryError> {
        let s = self.store().stats()?;
        let reach = self.reach(false)?;
        Ok(RepoStats {
            objects: s.objects,
            stored_bytes: s.stored_bytes,
            object_bytes: s.payload_bytes,
            stored_ratio: if s.payload_bytes == 0 {
                1.0
            } else {
                s.stored_bytes as f64 / s.payload_bytes as f64
            },
            compressed_objects: s.compressed_objects,
            compressed_object_bytes: s.compressed_payload_bytes,
            compressed_stored_bytes: s.compressed_stored_bytes,
            logical_bytes: reach.manifests.values().map(Manifest::logical_bytes).sum(),
            checkpoints: reach.manifests.len(),
            packed_objects: s.packed_objects,
            packs: s.packs,
        })
    }

    /// Rebuild every file of checkpoint `id` under `out` (which must not exist or be empty),
    /// byte-identical; every object is verified. The checkpoint is checked whole first, the
    /// files are written into a temporary sibling folder that is renamed to `out` at the end,
    /// so a failure leaves nothing at `out`. `out` may not be inside a `.git` directory.
    /// Returns the files written.
    pub fn checkout(&self, id: CheckpointId, out: &Path) -> Result<Vec<String>, HistoryError> {
        crate::store::check_output_dir(out)?;
        let cp = self.read_checkpoint(id)?;
        self.check_checkpoint_files(&cp)?;
        if out.exists() {
            let mut entries = std::fs::read_dir(out).map_err(HistoryError::io("read", out))?;
            if entries.next().is_some() {
                return Err(HistoryError::Input(format!(
                    "'{}' exists and is not empty; choose a new directory",
                    out.display()
                )));
            }
        }
        let abs = std::path::absolute(out).map_err(HistoryError::io("resolve", out))?;
        let parent = match abs.parent() {
            Some(p) => p.to_path_buf(),
            None => {
                return Err(HistoryError::Input(format!(
                    "'{}' has no parent folder to check out into",
                    out.display()
                )))
            }
        };
        std::fs::create_dir_all(&parent).map_err(HistoryError::io("create directory", &parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".coin-checkout-")
            .tempdir_in(&parent)
            .map_err(HistoryError::io("create a temporary folder in", &parent))?;
        let mut written = Vec::new();
        for (rel, entry) in &cp.manifest.files {
            let dest = staging.path().join(rel);
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir).map_err(HistoryError::io("create directory", dir))?;
            }
            self.store().materialize(entry, &dest)?;
            written.push(rel.clone());
        }
        set_dir_mode(staging.path())?;
        fault::point("checkout.before_rename");
        // rename(2) replaces an empty directory; a non-empty one (a race) makes it fail.
        let staged = staging.keep();
        if let Err(e) = std::fs::rename(&staged, &abs) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(HistoryError::io("move the checked-out files into", out)(e));
        }
        crate::store::fsutil::sync_dir(&parent);
        Ok(written)
    }
}

/// The staging folder is created 0700; the checked-out folder gets the usual 0755.
fn set_dir_mode(dir: &Path) -> Result<(), HistoryError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(HistoryError::io("set the mode of", dir))?;
    }
    Ok(())
}

/// What is wrong with a store object, for a problem line that already names it: the file and
/// the reason of a corrupt object (not the id again), else the error with its causes.
fn object_problem(e: &crate::store::StoreError) -> String {
    match e {
        crate::store::StoreError::Corrupt { path, reason, .. } => {
            format!("'{}': {reason}", path.display())
        }
        other => error_chain(other),
    }
}

/// An error with its causes, for a one-line report.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
