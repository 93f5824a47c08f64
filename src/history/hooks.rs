//! Hooks: coin's own events (`.coin/hooks/<event>`, e.g. the `pre-checkpoint` gate) and the
//! git hooks coin installs into the git repository (`pre-push`, `post-checkout`, `post-merge`,
//! `pre-commit`), whose logic is here so it is tested like the rest of coin.
//!
//! # Event hook contract ([`CoinRepo::run_event`])
//!
//! * The hook is the executable file `.coin/hooks/<event>`; a missing or non-executable file
//!   means "no hook" (samples ship as `<event>.sample`).
//! * Arguments: the checkpoint id, then [`HookContext::extra_args`]: `pre-checkpoint
//!   CHECKPOINT`, `post-train CHECKPOINT`, `post-eval CHECKPOINT TASK...`.
//! * Environment: `COIN_EVENT`, `COIN_REPO` (the directory holding `.coin/`), `COIN_DIR` (the
//!   `.coin/` directory), `COIN_CHECKPOINT`, `COIN_PARENT` (empty for a first checkpoint),
//!   `COIN_BRANCH`, `COIN_TASK` (when known), `COIN_EXE` (the running coin binary, when it is
//!   one), and `COIN_MAX_FORGETTING` when `.coin/config.toml` sets `[gates] max_forgetting`.
//! * Working directory: `COIN_REPO`. Standard input: empty. Output is captured and returned.
//! * Exit status: 0 = go on. For `pre-*` events anything else vetoes the operation (nothing is
//!   recorded); for `post-*` events it is reported and changes nothing.
//! * `pre-checkpoint` runs after the checkpoint's commit object is written (so
//!   `COIN_CHECKPOINT` can be read with `coin show`/`coin diff`) and before the branch moves,
//!   while coin holds the repository lock: it must not run coin commands that write.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use git2::{Delta, DiffOptions, Oid};
use include_dir::{include_dir, Dir};
use serde::Serialize;

use crate::store::fsutil;

use super::remote::RemoteInfo;
use super::repo::{short_id, CoinRepo};
use super::HistoryError;

/// The hook scripts shipped with coin (`hooks/` in the source tree): `git/` are installed into
/// the git repository, `coin/` into `.coin/hooks/`.
static HOOKS: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/hooks");

/// The git hooks coin installs.
pub const GIT_HOOKS: &[&str] = &["pre-push", "post-checkout", "post-merge", "pre-commit"];
/// coin's own events.
pub const COIN_EVENTS: &[&str] = &["pre-checkpoint", "post-train", "post-eval"];
/// The line that marks a git hook as coin's (so install is idempotent and uninstall safe).
pub const MARKER: &str = "# coin-managed-hook";
/// Suffix of the work-tree pointer files the checkout hooks refresh (see docs/hooks.md).
pub const POINTER_SUFFIX: &str = ".coin";
/// The file coin writes into a directory it materialised for a pointer.
pub const POINTER_STAMP: &str = ".coin-checkpoint";

/// What one hook run did.
#[derive(Clone, Debug, Serialize)]
pub struct HookOutcome {
    /// The event or hook name.
    pub event: String,
    /// The script that ran.
    pub path: PathBuf,
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed_ms: u64,
}

impl HookOutcome {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout and stderr together, trimmed, for messages.
    pub fn output(&self) -> String {
        let mut s = self.stdout.trim_end().to_string();
        if !self.stderr.trim().is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(self.stderr.trim_end());
        }
        s
    }
}

/// What a hook gets to know about the event.
#[derive(Clone, Debug, Default)]
pub struct HookContext {
    /// The checkpoint concerned (`COIN_CHECKPOINT`).
    pub checkpoint: Option<Oid>,
    /// Its parent (`COIN_PARENT`).
    pub parent: Option<Oid>,
    /// The branch (`COIN_BRANCH`).
    pub branch: Option<String>,
    /// The task (`COIN_TASK`).
    pub task: Option<String>,
    /// Arguments after the checkpoint id (e.g. the tasks of `post-eval`).
    pub extra_args: Vec<String>,
}

/// The `[gates]` table of `.coin/config.toml`: the one parser of that table, used by
/// [`CoinRepo::gates_config`] and by the run configuration (which refuses a broken table the
/// same way before any work).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    /// `max_forgetting`: the largest drop (points) the sample gate lets through.
    #[serde(default)]
    pub max_forgetting: Option<f64>,
}

impl GatesConfig {
    /// Parse and check the value of the `[gates]` table; the error says what is wrong, in
    /// words (the caller names the file).
    pub fn from_value(value: toml::Value) -> Result<GatesConfig, String> {
        if !value.is_table() {
            return Err("it is not a table".into());
        }
        let gates: GatesConfig = value.try_into().map_err(|e: toml::de::Error| {
            format!(
                "{} (the key is max_forgetting, a number of points >= 0)",
                e.message()
            )
        })?;
        match gates.max_forgetting {
            Some(x) if !(x.is_finite() && x >= 0.0) => {
                Err("max_forgetting must be a number of points >= 0".into())
            }
            _ => Ok(gates),
        }
    }
}

/// What `install_git_hooks` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InstallReport {
    /// The git hooks directory.
    pub dir: PathBuf,
    /// Hooks written (new or updated).
    pub installed: Vec<String>,
    /// Hooks already up to date.
    pub unchanged: Vec<String>,
    /// User hooks kept as `<name>.local` (run first by coin's hook).
    pub chained: Vec<String>,
}

/// What `uninstall_git_hooks` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UninstallReport {
    /// The git hooks directory.
    pub dir: PathBuf,
    /// coin hooks removed.
    pub removed: Vec<String>,
    /// User hooks put back from `<name>.local`.
    pub restored: Vec<String>,
    /// Hooks of that name that are not coin's, left alone.
    pub foreign: Vec<String>,
}

/// The outcome of a git hook's logic (`coin hooks run`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GitHookReport {
    /// Lines for the user (the CLI prints them on stderr).
    pub messages: Vec<String>,
    /// Objects sent (pre-push).
    pub objects_sent: usize,
    /// Pointer directories refreshed (post-checkout, post-merge).
    pub refreshed: Vec<String>,
}

/// A pointer file: which checkpoint to materialise where.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pointer {
    /// The checkpoint (full 40-hex id).
    pub checkpoint: String,
    /// The directory to materialise it in, relative to the pointer file's directory.
    pub output: String,
}

/// Parse a pointer file (`checkpoint = "<id>"`, `output = "<dir>"`).
pub fn parse_pointer(text: &str) -> Result<(Pointer, Oid), String> {
    let p: Pointer = toml::from_str(text).map_err(|e| e.to_string())?;
    let id = Oid::from_str(&p.checkpoint)
        .ok()
        .filter(|_| p.checkpoint.len() == 40)
        .ok_or_else(|| format!("checkpoint '{}' is not a full 40-hex id", p.checkpoint))?;
    crate::store::check_relative_path(&p.output).map_err(|e| e.to_string())?;
    Ok((p, id))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), HistoryError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(HistoryError::io("set the mode of", path))
}

/// The coin binary to tell hooks about: `COIN_EXE` if set, else this process when it is coin.
fn coin_exe() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COIN_EXE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::current_exe()
        .ok()
        .filter(|p| p.file_stem().is_some_and(|s| s == "coin"))
}

/// The shipped scripts under `hooks/<sub>/`: (file name, contents).
pub fn shipped_hooks(sub: &str) -> Vec<(String, &'static [u8])> {
    let dir: &'static Dir<'static> = &HOOKS;
    let mut out = Vec::new();
    if let Some(d) = dir.get_dir(sub) {
        for f in d.files() {
            if let Some(name) = f.path().file_name().and_then(|n| n.to_str()) {
                out.push((name.to_string(), f.contents()));
            }
        }
    }
    out.sort();
    out
}

impl CoinRepo {
    /// `.coin/hooks/`.
    pub fn event_hooks_dir(&self) -> PathBuf {
        self.coin_dir().join("hooks")
    }

    /// The `[gates]` table of `.coin/config.toml` (absent file or table: no gates).
    pub fn gates_config(&self) -> Result<GatesConfig, HistoryError> {
        let path = self.coin_dir().join("config.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GatesConfig::default()),
            Err(e) => return Err(HistoryError::io("read", &path)(e)),
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| HistoryError::Record {
            what: format!("configuration '{}'", path.display()),
            message: e.to_string(),
        })?;
        let Some(gates) = table.get("gates") else {
            return Ok(GatesConfig::default());
        };
        GatesConfig::from_value(gates.clone()).map_err(|message| HistoryError::Record {
            what: format!("[gates] in '{}'", path.display()),
            message,
        })
    }

    /// Run coin event hook `event` (see the module docs for the contract). `Ok(None)` when no
    /// hook is installed for it. The hook's output is captured, never printed.
    pub fn run_event(
        &self,
        event: &str,
        ctx: &HookContext,
    ) -> Result<Option<HookOutcome>, HistoryError> {
        let path = self.event_hooks_dir().join(event);
        if !is_executable(&path) {
            return Ok(None);
        }
        let gates = self.gates_config()?;
        let mut cmd = Command::new(&path);
        if let Some(c) = ctx.checkpoint {
            cmd.arg(c.to_string());
        }
        cmd.args(&ctx.extra_args)
            .current_dir(self.root())
            .stdin(Stdio::null())
            .env("COIN_EVENT", event)
            .env("COIN_REPO", self.root())
            .env("COIN_DIR", self.coin_dir())
            .env(
                "COIN_CHECKPOINT",
                ctx.checkpoint.map(|c| c.to_string()).unwrap_or_default(),
            )
            .env(
                "COIN_PARENT",
                ctx.parent.map(|c| c.to_string()).unwrap_or_default(),
            )
            .env("COIN_BRANCH", ctx.branch.clone().unwrap_or_default())
            .env("COIN_TASK", ctx.task.clone().unwrap_or_default())
            .env_remove("COIN_MAX_FORGETTING");
        if let Some(x) = gates.max_forgetting {
            cmd.env("COIN_MAX_FORGETTING", x.to_string());
        }
        if let Some(exe) = coin_exe() {
            cmd.env("COIN_EXE", exe);
        }
        let start = Instant::now();
        let out = cmd
            .output()
            .map_err(HistoryError::io(format!("run the {event} hook"), &path))?;
        Ok(Some(HookOutcome {
            event: event.to_string(),
            path,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    /// Copy the shipped coin event hooks (`hooks/coin/`, or `from` when given) into
    /// `.coin/hooks/`; existing files are kept. Returns the files written.
    pub fn install_event_hooks(&self, from: Option<&Path>) -> Result<Vec<String>, HistoryError> {
        let dir = self.event_hooks_dir();
        std::fs::create_dir_all(&dir).map_err(HistoryError::io("create directory", &dir))?;
        let files: Vec<(String, Vec<u8>)> = match from {
            Some(src) => {
                let mut v = Vec::new();
                for e in std::fs::read_dir(src).map_err(HistoryError::io("read directory", src))? {
                    let e = e.map_err(HistoryError::io("read directory", src))?;
                    let p = e.path();
                    if p.is_file() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let bytes = std::fs::read(&p).map_err(HistoryError::io("read", &p))?;
                        v.push((name, bytes));
                    }
                }
                v
            }
            None => shipped_hooks("coin")
                .into_iter()
                .map(|(n, b)| (n, b.to_vec()))
                .collect(),
        };
        let mut written = Vec::new();
        for (name, bytes) in files {
            let dest = dir.join(&name);
            if dest.exists() {
                continue;
            }
            fsutil::write_atomic(&dest, &bytes).map_err(HistoryError::io("write", &dest))?;
            set_mode(&dest, 0o755)?;
            written.push(name);
        }
        Ok(written)
    }

    /// The git hooks directory (`core.hooksPath`, else `<git dir>/hooks`).
    pub fn git_hooks_dir(&self) -> PathBuf {
        let git = self.git();
        if let Ok(p) = git.config().and_then(|c| c.get_path("core.hooksPath")) {
            if p.is_absolute() {
                return p;
            }
            let base = git.workdir().unwrap_or_else(|| git.path());
            return base.join(p);
        }
        git.path().join("hooks")
    }

    /// Install coin's git hooks. Idempotent; a hook already there that is not coin's is kept
    /// as `<name>.local` and run first by coin's hook. Refuses (changing nothing) when both a
    /// foreign hook and a `<name>.local` exist. Records `coin.root` in the git config so the
    /// hooks find `.coin/` when it is not at the top of the work tree.
    pub fn install_git_hooks(&self) -> Result<InstallReport, HistoryError> {
        let dir = self.git_hooks_dir();
        std::fs::create_dir_all(&dir).map_err(HistoryError::io("create directory", &dir))?;
        let shipped = shipped_hooks("git");
        // Check everything first so a refusal changes nothing.
        for (name, _) in &shipped {
            let path = dir.join(name);
            let local = dir.join(format!("{name}.local"));
            if path.exists() && !is_coin_hook(&path) && local.exists() {
                return Err(HistoryError::Input(format!(
                    "both '{}' and '{}' exist; coin would have to overwrite one. Merge them \
                     into '{}' and run `coin hooks install` again",
                    path.display(),
                    local.display(),
                    local.display()
                )));
            }
        }
        let mut report = InstallReport {
            dir: dir.clone(),
            ..InstallReport::default()
        };
        for (name, template) in shipped {
            let bytes = render_git_hook(template);
            let path = dir.join(&name);
            if path.exists() {
                if is_coin_hook(&path) {
                    let same = std::fs::read(&path).is_ok_and(|b| b == bytes);
                    if same && is_executable(&path) {
                        report.unchanged.push(name);
                        continue;
                    }
                } else {
                    let local = dir.join(format!("{name}.local"));
                    std::fs::rename(&path, &local).map_err(HistoryError::io("rename", &path))?;
                    report.chained.push(name.clone());
                }
            }
            fsutil::write_atomic(&path, bytes).map_err(HistoryError::io("write", &path))?;
            set_mode(&path, 0o755)?;
            report.installed.push(name);
        }
        self.record_coin_root()?;
        Ok(report)
    }

    fn record_coin_root(&self) -> Result<(), HistoryError> {
        let git = self.git();
        let Some(workdir) = git.workdir().and_then(|w| w.canonicalize().ok()) else {
            return Ok(());
        };
        let rel = self.root().strip_prefix(&workdir).unwrap_or(Path::new(""));
        let rel = if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.display().to_string()
        };
        git.config()
            .and_then(|mut c| c.set_str("coin.root", &rel))
            .map_err(HistoryError::git("set coin.root"))
    }

    /// Remove coin's git hooks and put back the user's `<name>.local` hooks.
    pub fn uninstall_git_hooks(&self) -> Result<UninstallReport, HistoryError> {
        let dir = self.git_hooks_dir();
        let mut report = UninstallReport {
            dir: dir.clone(),
            ..UninstallReport::default()
        };
        for (name, _) in shipped_hooks("git") {
            let path = dir.join(&name);
            let local = dir.join(format!("{name}.local"));
            if path.exists() {
                if !is_coin_hook(&path) {
                    report.foreign.push(name);
                    continue;
                }
                std::fs::remove_file(&path).map_err(HistoryError::io("remove", &path))?;
                report.removed.push(name.clone());
            }
            if local.exists() {
                std::fs::rename(&local, &path).map_err(HistoryError::io("rename", &local))?;
                report.restored.push(name);
            }
        }
        Ok(report)
    }

    /// Which git hooks are coin's, foreign, or missing: (name, state).
    pub fn git_hooks_status(&self) -> Vec<(String, &'static str)> {
        let dir = self.git_hooks_dir();
        shipped_hooks("git")
            .into_iter()
            .map(|(name, template)| {
                let bytes = render_git_hook(template);
                let path = dir.join(&name);
                let state = if !path.exists() {
                    "missing"
                } else if !is_coin_hook(&path) {
                    "foreign"
                } else if std::fs::read(&path).is_ok_and(|b| b == bytes) {
                    if dir.join(format!("{name}.local")).exists() {
                        "installed (chains .local)"
                    } else {
                        "installed"
                    }
                } else {
                    "outdated"
                };
                (name, state)
            })
            .collect()
    }

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
            if local_ref == super::NOTES_REF {
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
            &mut |_, _| {},
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
        let (p, id) = parse_pointer(&text).map_err(|m| HistoryError::Record {
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
        self.fetch_missing_objects(&[id])?;
        self.checkout(id, &staged)?;
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
            } else if let Ok(m) = super::parse_manifest(blob.content()) {
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

/// A shipped git hook with `@COIN_EXE@` (the fallback when `coin` is not on PATH) replaced
/// by the path of the running coin binary, single-quote escaped for sh.
pub fn render_git_hook(template: &[u8]) -> Vec<u8> {
    let exe = coin_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "coin".to_string());
    let quoted = exe.replace('\'', "'\\''");
    String::from_utf8_lossy(template)
        .replace("@COIN_EXE@", &quoted)
        .into_bytes()
}

/// Whether the file at `path` is a hook coin installed (it carries [`MARKER`]).
pub fn is_coin_hook(path: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = [0u8; 512];
    let n = f.read(&mut head).unwrap_or(0);
    String::from_utf8_lossy(&head[..n]).contains(MARKER)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::disallowed_methods)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn pointers() {
        let (p, id) = parse_pointer(&format!("checkpoint = \"{ID}\"\noutput = \"a/b\"\n")).unwrap();
        assert_eq!((p.output.as_str(), id.to_string().as_str()), ("a/b", ID));
        for bad in [
            "checkpoint = \"0123\"\noutput = \"a\"".to_string(),
            format!("checkpoint = \"{ID}\"\noutput = \"../up\""),
            format!("checkpoint = \"{ID}\"\noutput = \"/abs\""),
            format!("checkpoint = \"{ID}\"\noutput = \"a\"\nextra = 1"),
            format!("checkpoint = \"{ID}\""),
        ] {
            assert!(parse_pointer(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gates_from_config() {
        let tmp = tempfile::tempdir().unwrap();
        CoinRepo::init(tmp.path()).unwrap();
        let repo = CoinRepo::open(&tmp.path().canonicalize().unwrap()).unwrap();
        let cfg = repo.coin_dir().join("config.toml");
        assert_eq!(repo.gates_config().unwrap(), GatesConfig::default());
        std::fs::write(&cfg, "[gates]\nmax_forgetting = 3\n").unwrap();
        assert_eq!(repo.gates_config().unwrap().max_forgetting, Some(3.0));
        std::fs::write(&cfg, "[gates]\nmax_forgetting = 2.5\n").unwrap();
        assert_eq!(repo.gates_config().unwrap().max_forgetting, Some(2.5));
        std::fs::write(&cfg, "[gates]\n").unwrap();
        assert_eq!(repo.gates_config().unwrap(), GatesConfig::default());
        for bad in [
            "[gates]\nmax_forgetting = -1\n",
            "[gates]\nmax_forgetting = \"5\"\n",
            "[gates]\nmax_forgeting = 5\n",
            "gates = 1\n",
            "[gates\n",
        ] {
            std::fs::write(&cfg, bad).unwrap();
            assert!(repo.gates_config().is_err(), "{bad}");
        }
        std::fs::write(&cfg, "[gates]\nmax_forgeting = 5\n").unwrap();
        let msg = repo.gates_config().unwrap_err().to_string();
        assert!(
            msg.contains("max_forgeting") && msg.contains("config.toml"),
            "{msg}"
        );
    }

    #[test]
    fn rendered_hooks_carry_the_marker_and_no_placeholder() {
        let shipped = shipped_hooks("git");
        let names: Vec<&str> = shipped.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = GIT_HOOKS.to_vec();
        expected.sort();
        assert_eq!(names, expected);
        for (name, template) in shipped {
            let text = String::from_utf8(render_git_hook(template)).unwrap();
            assert!(text.starts_with("#!/bin/sh\n"), "{name}");
            assert!(text.contains(MARKER), "{name}");
            assert!(!text.contains("@COIN_EXE@"), "{name}");
            assert!(text.contains("hooks run \"$hook\""), "{name}");
        }
        let events: Vec<String> = shipped_hooks("coin").into_iter().map(|(n, _)| n).collect();
        assert!(events.contains(&"pre-checkpoint".to_string()));
    }

    #[test]
    fn event_hook_outcome_and_missing_hook() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        CoinRepo::init(tmp.path()).unwrap();
        let repo = CoinRepo::open(&tmp.path().canonicalize().unwrap()).unwrap();
        let ctx = HookContext {
            checkpoint: Some(Oid::from_str(ID).unwrap()),
            extra_args: vec!["x y".into()],
            ..HookContext::default()
        };
        assert!(repo.run_event("post-train", &ctx).unwrap().is_none());
        let path = repo.event_hooks_dir().join("post-train");
        std::fs::write(
            &path,
            "#!/bin/sh\necho \"$1|$2|$COIN_PARENT|$COIN_EVENT\"\necho err >&2\nexit 7\n",
        )
        .unwrap();
        // Not executable: not a hook.
        assert!(repo.run_event("post-train", &ctx).unwrap().is_none());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = repo.run_event("post-train", &ctx).unwrap().unwrap();
        assert_eq!(out.code, Some(7));
        assert!(!out.success());
        assert_eq!(out.stdout, format!("{ID}|x y||post-train\n"));
        assert_eq!(out.output(), format!("{ID}|x y||post-train\nerr"));
    }
}
