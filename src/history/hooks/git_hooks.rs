//! What coin's git hooks do (`coin hooks run`): `pre-push` sends objects, `post-checkout` and
//! `post-merge` refresh pointer directories, `pre-commit` refuses pointers to missing data.

use std::path::Path;
use std::time::Duration;

use git2::{Delta, DiffOptions, Oid};

use crate::store::fsutil;

use super::super::remote::RemoteInfo;
use super::super::repo::{short_id, CoinRepo};
use super::super::HistoryError;
use super::{parse_pointer, GitHookReport, POINTER_STAMP, POINTER_SUFFIX};

impl CoinRepo {
    /// `pre-push REMOTE URL` with git's ref lines on `input`: send the store objects of every
    /// checkpoint being pushed (and of the notes, when `refs/notes/coin` is pushed) to the
    /// remote's object store; refuse (error) when some are missing here and there.
    pub fn hook_pre_push(
        &self,
        remote: &str,
        url: &str,
        input: &str,
    ) -> Result<GitHookReport, HistoryError> {
        let mut report = GitHookReport::default();
        let mut tips = Vec::new();
        let mut hide = Vec::new();
        let mut notes = false;
        for line in input.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [local_ref, local_sha, _remote_ref, remote_sha] = parts[..] else {
                continue;
            };
            let (Ok(l), Ok(r)) = (Oid::from_str(local_sha), Oid::from_str(remote_sha)) else {
                continue;
            };
            if l.is_zero() {
                continue; // a deletion sends nothing
            }
            if local_ref == super::super::NOTES_REF {
                notes = true;
                continue;
            }
            if self.git().find_commit(l).is_err() {
                continue; // a tag object or a blob: nothing of coin's
            }
            tips.push(l);
            if !r.is_zero() {
                hide.push(r);
            }
        }
        if tips.is_empty() && !notes {
            return Ok(report);
        }
        // What the remote is known to have already: its remote-tracking refs.
        if let Ok(refs) = self
            .git()
            .references_glob(&format!("refs/remotes/{remote}/*"))
        {
            hide.extend(refs.flatten().filter_map(|r| r.target()));
        }
        let checkpoints = if tips.is_empty() {
            Vec::new()
        } else {
            self.checkpoints_between(&tips, &hide)?
        };
        // Pushing code only (no checkpoint in the pushed history): nothing of coin's to send,
        // and no store is made on the remote.
        if !notes && checkpoints.is_empty() && self.reachable_checkpoints(&tips)?.is_empty() {
            return Ok(report);
        }
        let info = match self.remote_info(remote) {
            Ok(i) if i.url == url || url.is_empty() => i,
            _ => RemoteInfo {
                name: remote.to_string(),
                url: url.to_string(),
                objects: None,
            },
        };
        let transport = self.object_transport(&info, true)?;
        let _lock = transport.lock(Duration::from_secs(60))?;
        transport.clean()?;
        let ids = self.objects_to_send(&checkpoints, &tips, notes, transport.as_ref())?;
        if ids.is_empty() {
            return Ok(report);
        }
        let t = crate::store::transport::transfer(
            self.store(),
            transport.as_ref(),
            &ids,
            crate::store::transport::Direction::Push,
            &mut |_| {},
        )?;
        report.objects_sent = t.transferred;
        report.messages.push(format!(
            "coin: {} checkpoint(s), {} object(s) sent to '{}' ({} already there).",
            checkpoints.len(),
            t.transferred,
            transport.describe(),
            t.already_present
        ));
        Ok(report)
    }

    /// `post-checkout PREV NEW FLAG` / `post-merge` (PREV = `ORIG_HEAD`): refresh the
    /// directories of pointer files (`*.coin`) that changed between the two commits of the
    /// work tree's repository `work`. Does nothing when PREV = NEW.
    pub fn hook_refresh_pointers(
        &self,
        work: &git2::Repository,
        prev: Oid,
        new: Oid,
    ) -> Result<GitHookReport, HistoryError> {
        let mut report = GitHookReport::default();
        if prev == new {
            return Ok(report);
        }
        let tree_of = |id: Oid| -> Option<git2::Tree<'_>> {
            if id.is_zero() {
                None
            } else {
                work.find_commit(id).and_then(|c| c.tree()).ok()
            }
        };
        let (old_tree, new_tree) = (tree_of(prev), tree_of(new));
        let mut opts = DiffOptions::new();
        opts.pathspec(format!("*{POINTER_SUFFIX}"));
        let diff = work
            .diff_tree_to_tree(old_tree.as_ref(), new_tree.as_ref(), Some(&mut opts))
            .map_err(HistoryError::git("compare the checked-out commits"))?;
        let mut paths = Vec::new();
        for d in diff.deltas() {
            if matches!(
                d.status(),
                Delta::Added | Delta::Modified | Delta::Renamed | Delta::Copied
            ) {
                if let Some(p) = d.new_file().path() {
                    paths.push(p.to_path_buf());
                }
            }
        }
        let Some(workdir) = work.workdir() else {
            return Ok(report);
        };
        for rel in paths {
            match self.refresh_pointer(&workdir.join(&rel)) {
                Ok(dir) => report.refreshed.push(dir),
                Err(e) => report
                    .messages
                    .push(format!("coin: could not refresh '{}': {e}", rel.display())),
            }
        }
        for dir in &report.refreshed {
            report
                .messages
                .push(format!("coin: refreshed '{dir}' from its pointer."));
        }
        Ok(report)
    }

    /// Materialise the checkpoint a pointer file names into its output directory, replacing
    /// what coin put there before (a directory holding coin's `.coin-checkpoint` stamp); a
    /// directory coin did not make is never removed. Returns the directory.
    pub fn refresh_pointer(&self, pointer: &Path) -> Result<String, HistoryError> {
        let text = std::fs::read_to_string(pointer).map_err(HistoryError::io("read", pointer))?;
        let (p, id) = parse_pointer(&text).map_err(|m| HistoryError::Config {
            what: format!("pointer file '{}'", pointer.display()),
            message: m,
        })?;
        let base = pointer.parent().unwrap_or(Path::new("."));
        let out = base.join(&p.output);
        let stamp = out.join(POINTER_STAMP);
        if out.exists() {
            let current = std::fs::read_to_string(&stamp).ok();
            match current {
                Some(s) if s.trim() == id.to_string() => return Ok(out.display().to_string()),
                Some(_) => {}
                None => {
                    let empty = std::fs::read_dir(&out)
                        .map_err(HistoryError::io("read directory", &out))?
                        .next()
                        .is_none();
                    if !empty {
                        return Err(HistoryError::Input(format!(
                            "'{}' exists and was not made by coin (no {POINTER_STAMP}); \
                             move it away to let coin manage it",
                            out.display()
                        )));
                    }
                }
            }
        }
        if self.git().find_commit(id).is_err() {
            return Err(HistoryError::Input(format!(
                "checkpoint {} is not in this repository; run `coin fetch`",
                short_id(id)
            )));
        }
        let parent = out.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(HistoryError::io("create directory", parent))?;
        let tmp = tempfile::Builder::new()
            .prefix(".coin-refresh-")
            .tempdir_in(parent)
            .map_err(HistoryError::io("create a temp directory in", parent))?;
        let staged = tmp.path().join("out");
        self.fetch_missing_objects(&[id.into()])?;
        self.checkout(id.into(), &staged)?;
        fsutil::write_atomic(staged.join(POINTER_STAMP), format!("{id}\n"))
            .map_err(HistoryError::io("write", &stamp))?;
        if out.exists() {
            let old = tmp.path().join("old");
            std::fs::rename(&out, &old).map_err(HistoryError::io("move away", &out))?;
        }
        std::fs::rename(&staged, &out).map_err(HistoryError::io("rename into", &out))?;
        Ok(out.display().to_string())
    }

    /// `pre-commit` in the work tree's repository `work`: refuse (error) when a staged pointer
    /// file (`*.coin`) or coin manifest names a checkpoint or objects this store lacks.
    pub fn hook_pre_commit(&self, work: &git2::Repository) -> Result<GitHookReport, HistoryError> {
        let report = GitHookReport::default();
        let head_tree = work.head().ok().and_then(|h| h.peel_to_tree().ok());
        let index = work
            .index()
            .map_err(HistoryError::git("read the git index"))?;
        let diff = work
            .diff_tree_to_index(head_tree.as_ref(), Some(&index), None)
            .map_err(HistoryError::git("compare the index with HEAD"))?;
        let mut problems = Vec::new();
        for d in diff.deltas() {
            if !matches!(
                d.status(),
                Delta::Added | Delta::Modified | Delta::Renamed | Delta::Copied
            ) {
                continue;
            }
            let Some(path) = d.new_file().path() else {
                continue;
            };
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let is_pointer = name.ends_with(POINTER_SUFFIX) && name.len() > POINTER_SUFFIX.len();
            if !is_pointer && name != "manifest" {
                continue;
            }
            let Ok(blob) = work.find_blob(d.new_file().id()) else {
                continue;
            };
            let shown = path.display().to_string();
            if is_pointer {
                let text = String::from_utf8_lossy(blob.content());
                match parse_pointer(&text) {
                    Err(e) => problems.push(format!("{shown}: not a valid pointer file: {e}")),
                    Ok((_, id)) => {
                        if self.git().find_commit(id).is_err() {
                            problems.push(format!(
                                "{shown}: checkpoint {} is not in the coin repository",
                                short_id(id)
                            ));
                            continue;
                        }
                        match self.objects_of(&[id]) {
                            Ok(ids) => {
                                let missing =
                                    ids.iter().filter(|o| !self.store().contains(o)).count();
                                if missing > 0 {
                                    problems.push(format!(
                                        "{shown}: {missing} object(s) of checkpoint {} are missing from the store",
                                        short_id(id)
                                    ));
                                }
                            }
                            Err(e) => problems.push(format!("{shown}: {e}")),
                        }
                    }
                }
            } else if let Ok(m) = super::super::parse_manifest(blob.content()) {
                let missing: Vec<String> = m
                    .object_ids()
                    .iter()
                    .filter(|o| !self.store().contains(o))
                    .map(|o| o.short())
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "{shown}: coin manifest names {} object(s) missing from the store ({})",
                        missing.len(),
                        missing.join(", ")
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(report)
        } else {
            Err(HistoryError::Input(format!(
                "refusing the commit: {}",
                problems.join("; ")
            )))
        }
    }
}
