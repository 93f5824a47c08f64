//! Making checkpoints (crash-safe commit with a compare-and-swap ref update), reading them
//! back, and attaching eval records later as git notes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{ErrorCode, ObjectType, Oid};
use serde::Serialize;

use crate::store::fault;

use super::records::{
    self, parse_eval_record, parse_manifest, parse_note, parse_train, to_canonical_json,
    validate_rel_path, validate_task_name, AdapterInfo, BaseModel, EvalRecord, Manifest,
    NoteRecord, TrainRecord, SCHEMA_VERSION,
};
use super::repo::{short_id, CoinRepo, NOTES_REF};
use super::{CheckpointId, HistoryError};

/// One file to commit: where it is on disk and the path it gets in the checkpoint.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// The file on disk.
    pub disk: PathBuf,
    /// Its relative, `/`-separated path in the checkpoint.
    pub rel: String,
}

/// What to commit.
#[derive(Clone, Debug, Default)]
pub struct CommitRequest {
    /// Files or directories (a PEFT adapter directory: every file in it, recursively).
    pub paths: Vec<PathBuf>,
    /// The task the checkpoint was trained on.
    pub task: String,
    /// A message.
    pub message: Option<String>,
    /// Eval records stored in the checkpoint's tree.
    pub evals: BTreeMap<String, EvalRecord>,
    /// The parent checkpoint, when it is not the current branch's head.
    pub parent: Option<CheckpointId>,
    /// The base model, when known.
    pub base_model: Option<BaseModel>,
    /// More fields for the train record (later issues: dataset identity, hyperparameters, ...).
    pub train_extra: BTreeMap<String, serde_json::Value>,
    /// Do not run the `pre-checkpoint` hook (`coin commit --no-verify`).
    pub skip_hooks: bool,
    /// Write the checkpoint but leave the branch where it is (no gate either): the caller
    /// evaluates it first and then calls [`CoinRepo::publish_checkpoint`] (`coin train`).
    pub detached: bool,
}

/// The attachment holding an external trainer's output (stdout and stderr, interleaved).
pub const LOG_ATTACHMENT: &str = "log";

/// The attachment names a checkpoint may carry.
pub const ATTACHMENTS: &[&str] = &[LOG_ATTACHMENT];

/// The largest attachment kept (a longer text keeps its last bytes).
pub const MAX_ATTACHMENT_BYTES: usize = 16 << 20;

/// What a commit made.
#[derive(Clone, Debug, Serialize)]
pub struct CommitOutcome {
    /// The new checkpoint id.
    pub id: CheckpointId,
    /// The branch it was committed on.
    pub branch: String,
    /// Its parent, if any.
    pub parent: Option<CheckpointId>,
    /// How many files it holds.
    pub files: usize,
    /// How many tensors it holds.
    pub tensors: usize,
    /// The `pre-checkpoint` hook's run, when one is installed (it let the checkpoint pass).
    pub gate: Option<super::hooks::HookOutcome>,
}

/// Where an eval record comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSource {
    /// The checkpoint's tree (`eval/<task>`), written with the commit.
    Tree,
    /// A git note (`refs/notes/coin`), attached later.
    Note,
}

/// A checkpoint read back from git.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The commit id.
    pub id: CheckpointId,
    /// Parent checkpoint ids.
    pub parents: Vec<CheckpointId>,
    /// Commit time, unix seconds.
    pub time: i64,
    /// The commit message's first line.
    pub summary: String,
    /// The manifest.
    pub manifest: Manifest,
    /// The train record, if the tree has one.
    pub train: Option<TrainRecord>,
    /// Eval records by task, tree and note merged (a note wins over the tree for its tasks).
    pub evals: BTreeMap<String, (EvalRecord, EvalSource)>,
}

/// Expand the command-line paths into files with checkpoint-relative names. A file is named by
/// its file name; a directory contributes every file below it, named relative to it.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<SourceFile>, HistoryError> {
    let mut out: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut add = |rel: String, disk: PathBuf| -> Result<(), HistoryError> {
        validate_rel_path(&rel)
            .map_err(|e| HistoryError::Input(format!("cannot commit '{}': {e}", disk.display())))?;
        if let Some(prev) = out.insert(rel.clone(), disk.clone()) {
            return Err(HistoryError::Input(format!(
                "two files would be committed as '{rel}': '{}' and '{}'",
                prev.display(),
                disk.display()
            )));
        }
        Ok(())
    };
    for path in paths {
        let meta = std::fs::metadata(path).map_err(HistoryError::io("read", path))?;
        if meta.is_file() {
            let name = file_name_utf8(path)?;
            add(name, path.clone())?;
        } else if meta.is_dir() {
            let mut stack = vec![(path.clone(), String::new())];
            while let Some((dir, prefix)) = stack.pop() {
                let entries =
                    std::fs::read_dir(&dir).map_err(HistoryError::io("read directory", &dir))?;
                for entry in entries {
                    let entry = entry.map_err(HistoryError::io("read directory", &dir))?;
                    let p = entry.path();
                    let name = file_name_utf8(&p)?;
                    let rel = if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    };
                    // Links inside a folder are never followed: a link to /etc/passwd would
                    // store that file's contents, and a link to a folder would walk it.
                    let m = std::fs::symlink_metadata(&p).map_err(HistoryError::io("read", &p))?;
                    if m.file_type().is_symlink() {
                        return Err(HistoryError::Input(format!(
                            "'{}' is a symbolic link; coin does not follow links inside a \
                             committed folder (it could point at any file on this machine). \
                             Replace it with the file it points to, or move it out",
                            p.display()
                        )));
                    }
                    if m.is_dir() {
                        stack.push((p, rel));
                    } else if m.is_file() {
                        add(rel, p)?;
                    } else {
                        return Err(HistoryError::Input(format!(
                            "'{}' is neither a file nor a directory",
                            p.display()
                        )));
                    }
                }
            }
        } else {
            return Err(HistoryError::Input(format!(
                "'{}' is neither a file nor a directory",
                path.display()
            )));
        }
    }
    if out.is_empty() {
        return Err(HistoryError::Input(
            "nothing to commit: the given paths hold no files".to_string(),
        ));
    }
    records::validate_manifest_paths(out.keys())
        .map_err(|e| HistoryError::Input(format!("cannot commit these files: {e}")))?;
    Ok(out
        .into_iter()
        .map(|(rel, disk)| SourceFile { disk, rel })
        .collect())
}

/// Check files named by the caller: valid, distinct checkpoint paths of regular files.
fn check_named_files(files: Vec<SourceFile>) -> Result<Vec<SourceFile>, HistoryError> {
    let mut seen = std::collections::BTreeSet::new();
    for f in &files {
        validate_rel_path(&f.rel).map_err(|e| {
            HistoryError::Input(format!("cannot commit '{}': {e}", f.disk.display()))
        })?;
        if !seen.insert(&f.rel) {
            return Err(HistoryError::Input(format!(
                "two files would be committed as '{}'",
                f.rel
            )));
        }
        let m = std::fs::symlink_metadata(&f.disk).map_err(HistoryError::io("read", &f.disk))?;
        if !m.is_file() {
            return Err(HistoryError::Input(format!(
                "'{}' is not a regular file (coin does not follow links); replace it with the \
                 file it points to",
                f.disk.display()
            )));
        }
    }
    if files.is_empty() {
        return Err(HistoryError::Input(
            "nothing to commit: no files were given".to_string(),
        ));
    }
    records::validate_manifest_paths(seen.iter().copied())
        .map_err(|e| HistoryError::Input(format!("cannot commit these files: {e}")))?;
    Ok(files)
}

fn file_name_utf8(path: &Path) -> Result<String, HistoryError> {
    let name = path
        .file_name()
        .ok_or_else(|| HistoryError::Input(format!("'{}' has no file name", path.display())))?;
    name.to_str().map(str::to_string).ok_or_else(|| {
        HistoryError::Input(format!(
            "the file name of '{}' is not UTF-8; rename it to commit it",
            path.display()
        ))
    })
}

/// Read the adapter kind and config from an `adapter_config.json` file.
fn adapter_info(bytes: &[u8], disk: &Path) -> Result<AdapterInfo, HistoryError> {
    let config: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| HistoryError::Input(format!("'{}' is not valid JSON: {e}", disk.display())))?;
    let kind = config
        .get("peft_type")
        .and_then(|v| v.as_str())
        .map_or_else(|| "unknown".to_string(), str::to_lowercase);
    Ok(AdapterInfo { kind, config })
}

impl Checkpoint {
    /// Every store object the checkpoint references: its manifest's and its eval records'
    /// (tree and note), sorted, without duplicates.
    pub fn object_ids(&self) -> Vec<crate::store::ObjectId> {
        let mut ids: std::collections::BTreeSet<_> =
            self.manifest.object_ids().into_iter().collect();
        for (rec, _) in self.evals.values() {
            ids.extend(rec.object_ids());
        }
        ids.into_iter().collect()
    }
}

impl CoinRepo {
    /// Commit a checkpoint on the current branch.
    ///
    /// Order (each step durable before the next, so a crash anywhere leaves the repository
    /// consistent): read the branch head → take the repository lock → write store objects →
    /// write git blobs/trees/commit → move the branch by compare-and-swap from the head read at
    /// the start. If another commit moved the branch meanwhile the CAS fails with
    /// [`HistoryError::BranchMoved`] and nothing is changed (the objects written are
    /// unreachable and gc removes them).
    pub fn commit(&self, req: &CommitRequest) -> Result<CommitOutcome, HistoryError> {
        self.commit_with(req, false, &BTreeMap::new(), None, None)
    }

    /// [`CoinRepo::commit`] of a merge checkpoint (`coin merge`): its git parents are
    /// `req.parent` (required: the first input) and `second` (the second input), in that
    /// order, so first-parent walks (log, the matrix) follow the first input. Use it with
    /// [`CommitRequest::detached`] and move the branch with [`CoinRepo::publish_checkpoint`].
    pub fn commit_merge(
        &self,
        req: &CommitRequest,
        second: CheckpointId,
    ) -> Result<CommitOutcome, HistoryError> {
        if req.parent.is_none() {
            return Err(HistoryError::Input(
                "a merge checkpoint needs its first input as the request's parent".to_string(),
            ));
        }
        self.commit_with(req, false, &BTreeMap::new(), None, Some(second))
    }

    /// [`CoinRepo::commit`] with texts kept beside the records in the checkpoint's git tree,
    /// by name (the log of an external trainer: [`LOG_ATTACHMENT`]); read them back with
    /// [`CoinRepo::read_attachment`].
    pub fn commit_attached(
        &self,
        req: &CommitRequest,
        attachments: &BTreeMap<String, Vec<u8>>,
    ) -> Result<CommitOutcome, HistoryError> {
        self.commit_with(req, false, attachments, None, None)
    }

    /// [`CoinRepo::commit`] of a checkpoint with no parent when `req.parent` is `None` (not
    /// the branch head): the first stage of an imported run, trained from the base model.
    /// Use it with [`CommitRequest::detached`] and move a branch with
    /// [`CoinRepo::publish_checkpoint`].
    pub fn commit_root(&self, req: &CommitRequest) -> Result<CommitOutcome, HistoryError> {
        self.commit_with(req, true, &BTreeMap::new(), None, None)
    }

    /// [`CoinRepo::commit_root`] of files the caller names (`req.paths` is ignored): an
    /// importer that keeps a tree's sub-folders under their own names (`checkpoint-N/…`). The
    /// names are checked as for `req.paths`, and each file must be a regular file (a link is
    /// refused, not followed).
    pub fn commit_root_files(
        &self,
        req: &CommitRequest,
        files: Vec<SourceFile>,
    ) -> Result<CommitOutcome, HistoryError> {
        self.commit_with(req, true, &BTreeMap::new(), Some(files), None)
    }

    fn commit_with(
        &self,
        req: &CommitRequest,
        root: bool,
        attachments: &BTreeMap<String, Vec<u8>>,
        named: Option<Vec<SourceFile>>,
        second: Option<CheckpointId>,
    ) -> Result<CommitOutcome, HistoryError> {
        validate_task_name(&req.task).map_err(HistoryError::Input)?;
        for (task, rec) in &req.evals {
            self.check_new_eval_record(task, rec)?;
        }
        let branch = self.current_branch()?;
        let expected = self.ref_target(&format!("{}{branch}", super::BRANCH_PREFIX))?;
        let parent: Option<Oid> = match req.parent {
            Some(p) => {
                self.read_checkpoint(p)?;
                Some(p.oid())
            }
            None if root => None,
            None => expected,
        };
        if let Some(s) = second {
            self.read_checkpoint(s)?;
        }
        let files = match named {
            Some(files) => check_named_files(files)?,
            None => collect_files(&req.paths)?,
        };

        super::pause("commit.before_lock");
        let _lock = self.lock()?;
        fault::point("commit.after_lock");
        // Killed earlier commits leave temp objects; clear them before adding more.
        self.store().remove_dead_temp_files()?;

        let mut manifest = Manifest::new();
        manifest.base_model = req.base_model.clone();
        let mut tensors = 0;
        for f in &files {
            let entry = self.store().ingest_file(&f.disk)?;
            tensors += entry.named_tensors().len();
            manifest.files.insert(f.rel.clone(), entry);
            if f.rel == "adapter_config.json" {
                let bytes = std::fs::read(&f.disk).map_err(HistoryError::io("read", &f.disk))?;
                manifest.adapter = Some(adapter_info(&bytes, &f.disk)?);
            }
        }
        manifest.schema = manifest.required_schema();
        fault::point("commit.after_objects");

        let train = TrainRecord {
            schema: SCHEMA_VERSION,
            task: req.task.clone(),
            message: req.message.clone(),
            coin_version: crate::VERSION.to_string(),
            extra: req.train_extra.clone(),
        };
        let git = self.git();
        let blob = |text: String| {
            git.blob(text.as_bytes())
                .map_err(HistoryError::git("write a git blob"))
        };
        let mut tb = git
            .treebuilder(None)
            .map_err(HistoryError::git("build a tree"))?;
        tb.insert("manifest", blob(to_canonical_json(&manifest)?)?, 0o100644)
            .map_err(HistoryError::git("build a tree"))?;
        tb.insert("train", blob(to_canonical_json(&train)?)?, 0o100644)
            .map_err(HistoryError::git("build a tree"))?;
        if !req.evals.is_empty() {
            let mut eb = git
                .treebuilder(None)
                .map_err(HistoryError::git("build a tree"))?;
            for (task, rec) in &req.evals {
                eb.insert(task, blob(to_canonical_json(rec)?)?, 0o100644)
                    .map_err(HistoryError::git("build a tree"))?;
            }
            let eval_tree = eb.write().map_err(HistoryError::git("write a tree"))?;
            tb.insert("eval", eval_tree, 0o040000)
                .map_err(HistoryError::git("build a tree"))?;
        }
        for (name, bytes) in attachments {
            if !ATTACHMENTS.contains(&name.as_str()) {
                return Err(HistoryError::Input(format!(
                    "'{}' is not a checkpoint attachment (known: {})",
                    name.escape_debug(),
                    ATTACHMENTS.join(", ")
                )));
            }
            let start = bytes.len().saturating_sub(MAX_ATTACHMENT_BYTES);
            let id = git
                .blob(&bytes[start..])
                .map_err(HistoryError::git("write a git blob"))?;
            tb.insert(name, id, 0o100644)
                .map_err(HistoryError::git("build a tree"))?;
        }
        let tree_id = tb.write().map_err(HistoryError::git("write a tree"))?;
        let tree = git
            .find_tree(tree_id)
            .map_err(HistoryError::git("read the new tree"))?;
        let parent_commit = match parent {
            Some(p) => Some(
                git.find_commit(p)
                    .map_err(HistoryError::git(format!("read checkpoint {p}")))?,
            ),
            None => None,
        };
        let second_commit = match second {
            Some(s) => Some(
                git.find_commit(s.oid())
                    .map_err(HistoryError::git(format!("read checkpoint {}", s.short())))?,
            ),
            None => None,
        };
        let parents: Vec<&git2::Commit<'_>> =
            parent_commit.iter().chain(second_commit.iter()).collect();
        let summary = match &req.message {
            Some(m) if !m.trim().is_empty() => format!("{}: {}", req.task, m.trim()),
            _ => format!("{}: new checkpoint", req.task),
        };
        let full_message = format!(
            "{summary}\n\nCoin-Task: {}\nCoin-Files: {}\nCoin-Version: {}\n",
            req.task,
            manifest.files.len(),
            crate::VERSION
        );
        let sig = self.signature()?;
        let id = git
            .commit(None, &sig, &sig, &full_message, &tree, &parents)
            .map_err(HistoryError::git("write the commit"))?;
        self.check_commit_stored(id)?;
        fault::point("commit.after_git_objects");
        let gate = if req.detached {
            None
        } else {
            self.gate_and_move(
                &branch,
                expected,
                id,
                parent,
                &req.task,
                req.skip_hooks,
                &format!("coin commit: {summary}"),
            )?
        };
        fault::point("commit.after_ref");
        Ok(CommitOutcome {
            id: id.into(),
            branch,
            parent: parent.map(Into::into),
            files: manifest.files.len(),
            tensors,
            gate,
        })
    }

    /// Run the `pre-checkpoint` gate on the written checkpoint `id` (unless `skip_hooks`) and,
    /// when it passes, move `branch` from `expected` to `id` by compare-and-swap. The caller
    /// holds the repository lock. A veto leaves the commit unreachable (gc removes it).
    #[allow(clippy::too_many_arguments)]
    fn gate_and_move(
        &self,
        branch: &str,
        expected: Option<Oid>,
        id: Oid,
        parent: Option<Oid>,
        task: &str,
        skip_hooks: bool,
        message: &str,
    ) -> Result<Option<super::hooks::HookOutcome>, HistoryError> {
        let gate = if skip_hooks {
            None
        } else {
            let ctx = super::hooks::HookContext {
                checkpoint: Some(id.into()),
                parent: parent.map(Into::into),
                branch: Some(branch.to_string()),
                task: Some(task.to_string()),
                extra_args: Vec::new(),
            };
            self.run_event("pre-checkpoint", &ctx)?
        };
        if let Some(g) = gate.as_ref().filter(|g| !g.success()) {
            return Err(HistoryError::HookRefused {
                event: g.event.clone(),
                code: g.code,
                output: g.output(),
            });
        }
        super::pause("commit.before_ref");
        self.update_branch(branch, expected, id, message)?;
        Ok(gate)
    }

    /// Make a checkpoint written with [`CommitRequest::detached`] the head of `branch` (which
    /// must still be at `expected`), after the `pre-checkpoint` gate (unless `skip_hooks`).
    /// The gate now sees the eval records attached meanwhile.
    pub fn publish_checkpoint(
        &self,
        branch: &str,
        expected: Option<CheckpointId>,
        id: CheckpointId,
        skip_hooks: bool,
    ) -> Result<Option<super::hooks::HookOutcome>, HistoryError> {
        let cp = self.read_checkpoint(id)?;
        let (expected, id) = (expected.map(|e| e.oid()), id.oid());
        let task = cp
            .train
            .as_ref()
            .map(|t| t.task.clone())
            .unwrap_or_default();
        let _lock = self.lock()?;
        self.gate_and_move(
            branch,
            expected,
            id,
            cp.parents.first().map(CheckpointId::oid),
            &task,
            skip_hooks,
            &format!("coin: publish {}", short_id(id)),
        )
    }

    /// An attachment of a checkpoint ([`CommitRequest::attachments`]); `None` when it has none
    /// of that name.
    pub fn read_attachment(
        &self,
        id: CheckpointId,
        name: &str,
    ) -> Result<Option<Vec<u8>>, HistoryError> {
        let short = id.short();
        let git = self.git();
        let tree = git
            .find_commit(id.oid())
            .and_then(|c| c.tree())
            .map_err(HistoryError::git(format!("read the tree of {short}")))?;
        let Some(entry) = tree.get_name(name) else {
            return Ok(None);
        };
        let obj = entry
            .to_object(git)
            .map_err(HistoryError::git(format!("read {name} of {short}")))?;
        let blob = obj
            .as_blob()
            .ok_or_else(|| HistoryError::Corrupt(format!("{name} of {short} is not a file")))?;
        Ok(Some(blob.content().to_vec()))
    }

    /// Read a checkpoint: manifest, train record and eval records (tree and notes merged).
    pub fn read_checkpoint(&self, id: CheckpointId) -> Result<Checkpoint, HistoryError> {
        let short = id.short();
        let id = id.oid();
        let git = self.git();
        let commit = git
            .find_commit(id)
            .map_err(HistoryError::git(format!("read checkpoint {short}")))?;
        let tree = commit
            .tree()
            .map_err(HistoryError::git(format!("read the tree of {short}")))?;
        check_tree_entries(&tree, &short)?;
        let read_blob = |name: &str| -> Result<Option<Vec<u8>>, HistoryError> {
            match tree.get_path(Path::new(name)) {
                Ok(e) => {
                    let obj = e
                        .to_object(git)
                        .map_err(HistoryError::git(format!("read {name} of {short}")))?;
                    let blob = obj.as_blob().ok_or_else(|| {
                        HistoryError::Corrupt(format!("{name} of {short} is not a file"))
                    })?;
                    Ok(Some(blob.content().to_vec()))
                }
                Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
                Err(e) => Err(HistoryError::git(format!("read {name} of {short}"))(e)),
            }
        };
        let manifest_bytes =
            read_blob("manifest")?.ok_or_else(|| HistoryError::NotACheckpoint(short.clone()))?;
        let manifest = parse_manifest(&manifest_bytes).map_err(|e| in_checkpoint(&short, e))?;
        let train = match read_blob("train")? {
            Some(b) => Some(parse_train(&b).map_err(|e| in_checkpoint(&short, e))?),
            None => None,
        };
        let mut evals = BTreeMap::new();
        if let Ok(entry) = tree.get_path(Path::new("eval")) {
            if entry.kind() == Some(ObjectType::Tree) {
                let sub = git
                    .find_tree(entry.id())
                    .map_err(HistoryError::git(format!("read eval/ of {short}")))?;
                for e in sub.iter() {
                    let task = e.name().map_err(|_| {
                        HistoryError::Corrupt(format!(
                            "checkpoint {short} has an eval record whose name is not UTF-8"
                        ))
                    })?;
                    validate_task_name(task).map_err(|m| {
                        HistoryError::Corrupt(format!("eval/ of checkpoint {short}: {m}"))
                    })?;
                    if e.filemode() != 0o100644 {
                        return Err(HistoryError::Corrupt(format!(
                            "eval/{} of checkpoint {short} is not a regular file (mode {:o})",
                            task.escape_debug(),
                            e.filemode()
                        )));
                    }
                    let obj = e
                        .to_object(git)
                        .map_err(HistoryError::git(format!("read eval/{task} of {short}")))?;
                    let Some(blob) = obj.as_blob() else {
                        return Err(HistoryError::Corrupt(format!(
                            "eval/{task} of checkpoint {short} is not a file"
                        )));
                    };
                    let rec = parse_eval_record(task, blob.content())
                        .map_err(|e| in_checkpoint(&short, e))?;
                    evals.insert(task.to_string(), (rec, EvalSource::Tree));
                }
            }
        }
        if let Some(note) = self.read_note(id)? {
            for (task, rec) in note.eval {
                evals.insert(task, (rec, EvalSource::Note));
            }
        }
        Ok(Checkpoint {
            id: id.into(),
            parents: commit.parent_ids().map(Into::into).collect(),
            time: commit.time().seconds(),
            summary: commit.summary().ok().flatten().unwrap_or("").to_string(),
            manifest,
            train,
            evals,
        })
    }

    /// Check every file entry of a checkpoint against the store ([`crate::store::Store::check_entry`]:
    /// objects present, of the right kind, sizes and headers adding up) without writing
    /// anything. With [`CoinRepo::read_checkpoint`] (tree and manifest), this is the one
    /// validation commit, fetch, fsck and checkout share.
    pub(crate) fn check_checkpoint_files(&self, cp: &Checkpoint) -> Result<(), HistoryError> {
        for (path, entry) in &cp.manifest.files {
            self.store()
                .check_entry(entry)
                .map_err(|source| HistoryError::BadFile {
                    checkpoint: cp.id.short(),
                    path: path.escape_debug().to_string(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The note attached to checkpoint `id`, if any.
    pub(crate) fn read_note(&self, id: Oid) -> Result<Option<NoteRecord>, HistoryError> {
        match self.git().find_note(Some(NOTES_REF), id) {
            Ok(note) => {
                let n = parse_note(note.message_bytes())
                    .map_err(|e| in_checkpoint(&format!("the note of {}", short_id(id)), e))?;
                Ok(Some(n))
            }
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(HistoryError::git(format!(
                "read the note of {}",
                short_id(id)
            ))(e)),
        }
    }

    /// Attach eval records to an existing checkpoint without changing its id: they are merged
    /// into its note under `refs/notes/coin` (a task recorded again replaces the older record).
    pub fn add_eval_records(
        &self,
        id: CheckpointId,
        records: &BTreeMap<String, EvalRecord>,
    ) -> Result<(), HistoryError> {
        self.read_checkpoint(id)?;
        let id = id.oid();
        let _lock = self.lock()?;
        fault::point("note.after_lock");
        let mut note = self.read_note(id)?.unwrap_or(NoteRecord {
            schema: SCHEMA_VERSION,
            ..NoteRecord::default()
        });
        for (task, rec) in records {
            self.check_new_eval_record(task, rec)?;
            note.eval.insert(task.clone(), rec.clone());
        }
        let text = records::to_canonical_json(&note)?;
        let sig = self.signature()?;
        self.git()
            .note(&sig, &sig, Some(NOTES_REF), id, &text, true)
            .map_err(HistoryError::git(format!(
                "write the note of {}",
                short_id(id)
            )))?;
        fault::point("note.after_write");
        Ok(())
    }

    /// Check an eval record before it is written: its task name, its fields
    /// ([`EvalRecord::validate_new`]) and every store object it names, which must be in this
    /// repository's store (a record naming a missing object would make fsck and push fail).
    pub(crate) fn check_new_eval_record(
        &self,
        task: &str,
        rec: &EvalRecord,
    ) -> Result<(), HistoryError> {
        validate_task_name(task).map_err(HistoryError::Input)?;
        rec.validate_new(task).map_err(HistoryError::Input)?;
        for id in rec.object_ids() {
            if !self.store().contains(&id) {
                return Err(HistoryError::Input(format!(
                    "the eval record of task '{}' names object {} (its predictions), which is \
                     not in this repository's store; store the predictions first or leave \
                     \"predictions\" out",
                    task.escape_debug(),
                    id.short()
                )));
            }
        }
        Ok(())
    }

    /// The checkpoints from `start` following first parents, newest first, at most `limit`.
    pub fn first_parent_chain(
        &self,
        start: CheckpointId,
        limit: Option<usize>,
    ) -> Result<Vec<CheckpointId>, HistoryError> {
        let mut out = Vec::new();
        let mut cur = Some(start.oid());
        while let Some(id) = cur {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            out.push(id.into());
            let c = self
                .git()
                .find_commit(id)
                .map_err(HistoryError::git(format!(
                    "read checkpoint {}",
                    short_id(id)
                )))?;
            cur = c.parent_ids().next();
        }
        Ok(out)
    }
}

/// The top level of a checkpoint's tree holds regular files (`manifest`, `train`, files later
/// versions add) and the `eval` folder; a link, a submodule or an executable there is refused,
/// so what fsck and fetch accept is exactly what checkout and `git checkout` can write safely.
fn check_tree_entries(tree: &git2::Tree<'_>, short: &str) -> Result<(), HistoryError> {
    for e in tree.iter() {
        let name = String::from_utf8_lossy(e.name_bytes())
            .escape_debug()
            .to_string();
        let ok = match e.filemode() {
            0o100644 => e.kind() == Some(ObjectType::Blob),
            0o040000 => name == "eval" && e.kind() == Some(ObjectType::Tree),
            _ => false,
        };
        if !ok {
            return Err(HistoryError::Corrupt(format!(
                "entry '{name}' of checkpoint {short} has mode {:o}; a checkpoint's tree holds \
                 only regular files and the eval/ folder (a link or submodule here is refused)",
                e.filemode()
            )));
        }
    }
    Ok(())
}

fn in_checkpoint(what: &str, e: HistoryError) -> HistoryError {
    match e {
        HistoryError::Record { what: w, message } => HistoryError::Record {
            what: format!("{w} in {what}"),
            message,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]

    use super::*;

    #[test]
    fn a_merge_checkpoint_has_both_parents_in_order_and_needs_a_first_one() {
        let tmp = tempfile::tempdir().unwrap();
        CoinRepo::init(tmp.path()).unwrap();
        let repo = CoinRepo::open(&tmp.path().canonicalize().unwrap()).unwrap();
        let dir = tmp.path().join("ad");
        std::fs::create_dir(&dir).unwrap();
        let commit = |text: &str, parent: Option<CheckpointId>| {
            std::fs::write(dir.join("a.json"), text).unwrap();
            repo.commit(&CommitRequest {
                paths: vec![dir.clone()],
                task: "T".into(),
                parent,
                ..Default::default()
            })
            .unwrap()
            .id
        };
        let p = commit("{}", None);
        let a = commit("{\"a\": 1}", Some(p));
        let b = commit("{\"b\": 2}", Some(p));
        let req = CommitRequest {
            paths: vec![dir.clone()],
            task: "merge".into(),
            detached: true,
            ..Default::default()
        };
        let e = repo.commit_merge(&req, b).unwrap_err().to_string();
        assert!(e.contains("first input"), "{e}");
        let m = repo
            .commit_merge(
                &CommitRequest {
                    parent: Some(a),
                    ..req.clone()
                },
                b,
            )
            .unwrap();
        assert_eq!(repo.read_checkpoint(m.id).unwrap().parents, [a, b]);
        assert_eq!(m.parent, Some(a));
        // Detached: the branch stays until the merge is published.
        let branch = repo.current_branch().unwrap();
        assert_eq!(repo.branch_target(&branch).unwrap(), Some(b));
        repo.publish_checkpoint(&branch, Some(b), m.id, true)
            .unwrap();
        assert_eq!(repo.branch_target(&branch).unwrap(), Some(m.id));
        assert_eq!(repo.first_parent_chain(m.id, None).unwrap(), [m.id, a, p]);
    }
}
