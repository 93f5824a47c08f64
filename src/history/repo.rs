//! Opening and creating coin repositories, and the coin refs (branches, tags, `refs/coin/HEAD`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use git2::{ErrorCode, Oid, Repository, Signature};
use include_dir::{include_dir, Dir};

use crate::store::{fsutil, lock::Lock, Store};

use super::{CheckpointId, HistoryError};

/// The symbolic ref naming the current coin branch (`refs/coin/heads/<name>`).
pub const HEAD_REF: &str = "refs/coin/HEAD";
/// Prefix of coin branches.
pub const BRANCH_PREFIX: &str = "refs/coin/heads/";
/// Prefix of coin tags.
pub const TAG_PREFIX: &str = "refs/coin/tags/";
/// The notes ref holding eval records attached after the commit.
pub const NOTES_REF: &str = "refs/notes/coin";
/// The branch `coin init` starts on.
pub const DEFAULT_BRANCH: &str = "main";

/// The templates shipped with coin, copied into `.coin/` by `coin init`.
static TEMPLATES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/templates");

/// A coin repository: the directory holding `.coin/`, its git repository and its store.
pub struct CoinRepo {
    root: PathBuf,
    git: Repository,
    store: Store,
}

/// What `coin init` did.
#[derive(Debug)]
pub struct InitOutcome {
    /// The directory holding `.coin/`.
    pub root: PathBuf,
    /// Whether a new git repository was created (false: an enclosing one is reused).
    pub created_git: bool,
    /// The git directory used.
    pub git_dir: PathBuf,
    /// Template files copied into `.coin/` (relative paths).
    pub templates: Vec<PathBuf>,
    /// The git hooks installed, when asked for.
    pub hooks: Option<super::hooks::InstallReport>,
}

/// The shipped templates plus the shipped event hooks (`hooks/coin/*` → `hooks/*`), as
/// (path relative to `.coin/`, contents, executable).
fn template_files_shipped() -> Vec<(PathBuf, Vec<u8>, bool)> {
    let mut out: Vec<(PathBuf, Vec<u8>, bool)> = template_files()
        .into_iter()
        .map(|(p, b)| (p, b.to_vec(), false))
        .collect();
    for (name, bytes) in super::hooks::shipped_hooks("coin") {
        out.push((Path::new("hooks").join(name), bytes.to_vec(), true));
    }
    out
}

fn collect_templates(dir: &'static Dir<'static>, out: &mut Vec<(PathBuf, &'static [u8])>) {
    for f in dir.files() {
        out.push((f.path().to_path_buf(), f.contents()));
    }
    for d in dir.dirs() {
        collect_templates(d, out);
    }
}

/// Every template file shipped in the binary: path relative to `templates/` → contents.
pub fn template_files() -> Vec<(PathBuf, &'static [u8])> {
    let mut out = Vec::new();
    // include_dir's static Dir has 'static contents; reborrowing keeps that lifetime.
    let dir: &'static Dir<'static> = &TEMPLATES;
    collect_templates(dir, &mut out);
    out.sort();
    out
}

/// Options of [`CoinRepo::init_with`].
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Copy this folder into `.coin/` instead of the templates shipped with coin (like
    /// `git init --template`); its `hooks/` folder, if any, replaces the shipped event hooks.
    pub template: Option<PathBuf>,
    /// Also install coin's git hooks (`pre-push`, `post-checkout`, `post-merge`,
    /// `pre-commit`), chaining with hooks already there.
    pub git_hooks: bool,
}

/// Every file under `dir`, relative to it, with its contents and whether it is executable.
fn read_template_dir(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>, bool)>, HistoryError> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(HistoryError::io("read directory", &d))? {
            let e = e.map_err(HistoryError::io("read directory", &d))?;
            let p = e.path();
            let meta = std::fs::metadata(&p).map_err(HistoryError::io("read", &p))?;
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                let bytes = std::fs::read(&p).map_err(HistoryError::io("read", &p))?;
                let rel = p.strip_prefix(dir).unwrap_or(&p).to_path_buf();
                out.push((rel, bytes, meta.permissions().mode() & 0o111 != 0));
            }
        }
    }
    out.sort();
    Ok(out)
}

impl CoinRepo {
    /// Create a coin repository at `path` (created if missing): a new git repository unless
    /// `path` is inside one, then `.coin/` with the store, the shipped templates and event
    /// hooks. Installs no git hooks (see [`CoinRepo::init_with`]).
    pub fn init(path: &Path) -> Result<InitOutcome, HistoryError> {
        Self::init_with(path, &InitOptions::default())
    }

    /// [`CoinRepo::init`] with options: another template folder, git hooks.
    pub fn init_with(path: &Path, opts: &InitOptions) -> Result<InitOutcome, HistoryError> {
        crate::git_durability::enable();
        let template_files = match &opts.template {
            Some(dir) => {
                if !dir.is_dir() {
                    return Err(HistoryError::Input(format!(
                        "template folder '{}' does not exist",
                        dir.display()
                    )));
                }
                Some(read_template_dir(dir)?)
            }
            None => None,
        };
        std::fs::create_dir_all(path).map_err(HistoryError::io("create directory", path))?;
        let root = path
            .canonicalize()
            .map_err(HistoryError::io("resolve", path))?;
        let coin_dir = root.join(".coin");
        if coin_dir.exists() {
            return Err(HistoryError::AlreadyInitialized(root));
        }
        let (git, created_git) = match Repository::discover(&root) {
            Ok(repo) if !repo.is_bare() => {
                let inside = repo
                    .workdir()
                    .and_then(|w| w.canonicalize().ok())
                    .is_some_and(|w| root.starts_with(w));
                if inside {
                    (repo, false)
                } else {
                    (init_git(&root)?, true)
                }
            }
            _ => (init_git(&root)?, true),
        };
        let mut cfg = git
            .config()
            .map_err(HistoryError::git("open the git configuration"))?;
        // Reflogs for refs/coin/* (not logged by default) so gc can keep what they reach.
        cfg.set_str("core.logAllRefUpdates", "always")
            .map_err(HistoryError::git("set core.logAllRefUpdates"))?;
        // A checkpoint must survive a power cut, not just a killed process: git's own key for
        // plain git (libgit2 is told by crate::git_durability, in every coin process).
        set_fsync_key(&mut cfg)?;
        exclude_coin_dir(&git, &root)?;

        std::fs::create_dir_all(&coin_dir)
            .map_err(HistoryError::io("create directory", &coin_dir))?;
        Store::init(&coin_dir)?;
        let mut templates = Vec::new();
        let files: Vec<(PathBuf, Vec<u8>, bool)> = match template_files {
            Some(files) => files,
            None => template_files_shipped(),
        };
        for (rel, contents, exec) in files {
            let dest = coin_dir.join(&rel);
            if dest.exists() {
                continue;
            }
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(HistoryError::io("create directory", parent))?;
            }
            fsutil::write_atomic(&dest, contents).map_err(HistoryError::io("write", &dest))?;
            if exec {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
                    .map_err(HistoryError::io("set the mode of", &dest))?;
            }
            templates.push(rel);
        }
        let config = coin_dir.join("config.toml");
        if !config.exists() {
            fsutil::write_atomic(&config, b"# coin repository configuration\n")
                .map_err(HistoryError::io("write", &config))?;
            templates.push(PathBuf::from("config.toml"));
        }
        if git.find_reference(HEAD_REF).is_err() {
            git.reference_symbolic(
                HEAD_REF,
                &format!("{BRANCH_PREFIX}{DEFAULT_BRANCH}"),
                true,
                "coin init",
            )
            .map_err(HistoryError::git("create refs/coin/HEAD"))?;
        }
        let git_dir = git.path().to_path_buf();
        let hooks = if opts.git_hooks {
            drop(git);
            Some(CoinRepo::open(&root)?.install_git_hooks()?)
        } else {
            None
        };
        Ok(InitOutcome {
            root,
            created_git,
            git_dir,
            templates,
            hooks,
        })
    }

    /// Find the coin repository containing `start` (searching upward for `.coin/`) and open it.
    pub fn discover(start: &Path) -> Result<CoinRepo, HistoryError> {
        let start_abs = start
            .canonicalize()
            .map_err(HistoryError::io("open", start))?;
        for dir in start_abs.ancestors() {
            if dir.join(".coin").is_dir() {
                return Self::open(dir);
            }
        }
        Err(HistoryError::NotARepo(start.to_path_buf()))
    }

    /// Open the coin repository whose `.coin/` is directly in `root`.
    pub fn open(root: &Path) -> Result<CoinRepo, HistoryError> {
        crate::git_durability::enable();
        let store = Store::open(&root.join(".coin"))?;
        let git = Repository::discover(root).map_err(HistoryError::git(format!(
            "open the git repository of '{}'",
            root.display()
        )))?;
        migrate_fsync_key(&git);
        Ok(CoinRepo {
            root: root.to_path_buf(),
            git,
            store,
        })
    }

    /// The directory holding `.coin/`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `.coin/` directory.
    pub fn coin_dir(&self) -> PathBuf {
        self.root.join(".coin")
    }

    /// The git repository.
    pub fn git(&self) -> &Repository {
        &self.git
    }

    /// The object store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Take the repository lock (`.coin/lock`), shared by commit, note writes and gc, waiting
    /// up to `COIN_LOCK_TIMEOUT` seconds (default 60).
    pub fn lock(&self) -> Result<Lock, HistoryError> {
        let secs = std::env::var("COIN_LOCK_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(60);
        Ok(Lock::acquire(
            &self.coin_dir().join("lock"),
            Duration::from_secs(secs),
        )?)
    }

    /// The signature for new commits and notes: `GIT_AUTHOR_NAME`/`EMAIL`/`DATE` (or
    /// `COIN_TEST_TIMESTAMP`), else git's `user.name`/`user.email`, else `coin <coin@localhost>`.
    pub fn signature(&self) -> Result<Signature<'static>, HistoryError> {
        let cfg = self.git.config().ok();
        let get = |env: &str, key: &str, default: &str| -> String {
            std::env::var(env)
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| cfg.as_ref().and_then(|c| c.get_string(key).ok()))
                .unwrap_or_else(|| default.to_string())
        };
        let name = get("GIT_AUTHOR_NAME", "user.name", "coin");
        let email = get("GIT_AUTHOR_EMAIL", "user.email", "coin@localhost");
        let date = std::env::var("COIN_TEST_TIMESTAMP")
            .ok()
            .or_else(|| std::env::var("GIT_AUTHOR_DATE").ok())
            .and_then(|s| parse_date(&s));
        match date {
            Some((secs, offset_min)) => {
                Signature::new(&name, &email, &git2::Time::new(secs, offset_min))
            }
            None => Signature::now(&name, &email),
        }
        .map_err(HistoryError::git("make a commit signature"))
    }

    /// The current branch (the target of `refs/coin/HEAD`).
    pub fn current_branch(&self) -> Result<String, HistoryError> {
        let r = self.git.find_reference(HEAD_REF).map_err(|e| {
            if e.code() == ErrorCode::NotFound {
                HistoryError::Corrupt(format!(
                    "{HEAD_REF} is missing; run `coin switch <branch>` to set the current branch"
                ))
            } else {
                HistoryError::git(format!("read {HEAD_REF}"))(e)
            }
        })?;
        let target = r.symbolic_target().ok().flatten().ok_or_else(|| {
            HistoryError::Corrupt(format!(
                "{HEAD_REF} is not a symbolic ref; run `coin switch <branch>`"
            ))
        })?;
        target
            .strip_prefix(BRANCH_PREFIX)
            .map(str::to_string)
            .ok_or_else(|| {
                HistoryError::Corrupt(format!(
                    "{HEAD_REF} points at '{target}', outside {BRANCH_PREFIX}"
                ))
            })
    }

    /// The commit a ref points at, `None` when it does not exist.
    pub(crate) fn ref_target(&self, name: &str) -> Result<Option<Oid>, HistoryError> {
        match self.git.find_reference(name) {
            Ok(r) => {
                let c = r
                    .peel_to_commit()
                    .map_err(HistoryError::git(format!("read {name}")))?;
                Ok(Some(c.id()))
            }
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(HistoryError::git(format!("read {name}"))(e)),
        }
    }

    /// The head of branch `name`, `None` if the branch has no checkpoint (or does not exist).
    pub fn branch_target(&self, name: &str) -> Result<Option<CheckpointId>, HistoryError> {
        Ok(self
            .ref_target(&format!("{BRANCH_PREFIX}{name}"))?
            .map(Into::into))
    }

    /// The head of the current branch, `None` before the first commit.
    pub fn head(&self) -> Result<Option<CheckpointId>, HistoryError> {
        self.branch_target(&self.current_branch()?)
    }

    fn list_refs(&self, prefix: &str) -> Result<Vec<(String, CheckpointId)>, HistoryError> {
        let mut out = Vec::new();
        let refs = self
            .git
            .references_glob(&format!("{prefix}*"))
            .map_err(HistoryError::git("list refs"))?;
        for r in refs {
            let r = r.map_err(HistoryError::git("list refs"))?;
            let Ok(name) = r.name() else { continue };
            let Some(short) = name.strip_prefix(prefix) else {
                continue;
            };
            let short = short.to_string();
            let c = r
                .peel_to_commit()
                .map_err(HistoryError::git(format!("read {prefix}{short}")))?;
            out.push((short, c.id().into()));
        }
        out.sort();
        Ok(out)
    }

    /// All branches with their heads, sorted by name.
    pub fn branches(&self) -> Result<Vec<(String, CheckpointId)>, HistoryError> {
        self.list_refs(BRANCH_PREFIX)
    }

    /// All tags with their targets, sorted by name.
    pub fn tags(&self) -> Result<Vec<(String, CheckpointId)>, HistoryError> {
        self.list_refs(TAG_PREFIX)
    }

    /// Check a branch or tag name (git's ref name rules, and none of coin's revision syntax).
    pub fn validate_name(kind: &'static str, name: &str) -> Result<(), HistoryError> {
        let invalid = |reason: &str| HistoryError::InvalidName {
            kind,
            name: name.to_string(),
            reason: reason.to_string(),
        };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name == "HEAD" || name == "@" {
            return Err(invalid("it is reserved"));
        }
        if name.starts_with('-') {
            return Err(invalid("it starts with '-'"));
        }
        if name.contains(['~', '^', ':', '?', '*', '[', '\\', ' ']) {
            return Err(invalid("it contains one of ~ ^ : ? * [ \\ or a space"));
        }
        if looks_like_id(name) {
            return Err(invalid(
                "it looks like a checkpoint id (only hex digits), so it would shadow one",
            ));
        }
        let first = name.split('/').next().unwrap_or(name);
        if RESERVED_FIRST.iter().any(|r| r.eq_ignore_ascii_case(first)) {
            return Err(invalid(
                "it starts with a ref namespace (refs/, heads/, tags/, remotes/, notes/, HEAD/)",
            ));
        }
        if name.len() > 200 {
            return Err(invalid("it is longer than 200 bytes"));
        }
        let full = format!("{BRANCH_PREFIX}{name}");
        if !git2::Reference::is_valid_name(&full) {
            return Err(invalid("git does not accept it as a ref name"));
        }
        Ok(())
    }

    /// [`CoinRepo::validate_name`] plus the checks that need this repository: a name whose
    /// first part is a remote's name (`origin/main`) would shadow that remote-tracking branch.
    pub fn check_new_name(&self, kind: &'static str, name: &str) -> Result<(), HistoryError> {
        Self::validate_name(kind, name)?;
        if let Some((first, _)) = name.split_once('/') {
            let remotes = self
                .git
                .remotes()
                .map_err(HistoryError::git("list remotes"))?;
            if remotes.iter().any(|r| r.ok().flatten() == Some(first)) {
                return Err(HistoryError::InvalidName {
                    kind,
                    name: name.to_string(),
                    reason: format!(
                        "'{first}' is a remote, so '{name}' would shadow the remote-tracking \
                         branch of that name"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Create branch `name` at `target`; fails if it exists.
    pub fn create_branch(&self, name: &str, target: CheckpointId) -> Result<(), HistoryError> {
        self.check_new_name("branch", name)?;
        self.create_ref(
            "branch",
            &format!("{BRANCH_PREFIX}{name}"),
            name,
            target.oid(),
        )
    }

    /// Create tag `name` at `target`; fails if it exists.
    pub fn create_tag(&self, name: &str, target: CheckpointId) -> Result<(), HistoryError> {
        self.check_new_name("tag", name)?;
        self.create_ref("tag", &format!("{TAG_PREFIX}{name}"), name, target.oid())
    }

    fn create_ref(
        &self,
        kind: &'static str,
        full: &str,
        name: &str,
        target: Oid,
    ) -> Result<(), HistoryError> {
        let _lock = self.lock()?;
        match self
            .git
            .reference(full, target, false, &format!("coin {kind}: create"))
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == ErrorCode::Exists => Err(HistoryError::RefExists {
                kind,
                name: name.to_string(),
            }),
            Err(e) => Err(HistoryError::git(format!("create {full}"))(e)),
        }
    }

    /// Make `name` the current branch. It must exist, unless `allow_unborn` (used right after
    /// `coin init`, when `main` has no checkpoint yet).
    pub fn switch(&self, name: &str, allow_unborn: bool) -> Result<(), HistoryError> {
        Self::validate_name("branch", name)?;
        if !allow_unborn && self.branch_target(name)?.is_none() {
            return Err(HistoryError::NoSuchBranch(name.to_string()));
        }
        let _lock = self.lock()?;
        self.git
            .reference_symbolic(
                HEAD_REF,
                &format!("{BRANCH_PREFIX}{name}"),
                true,
                &format!("coin switch: to {name}"),
            )
            .map_err(HistoryError::git(format!("update {HEAD_REF}")))?;
        Ok(())
    }

    /// Move branch `name` from `expected` (None: must not exist) to `new`, atomically. The
    /// caller holds the repository lock; libgit2 also takes the ref's own `.lock` file.
    pub(crate) fn update_branch(
        &self,
        name: &str,
        expected: Option<Oid>,
        new: Oid,
        message: &str,
    ) -> Result<(), HistoryError> {
        let full = format!("{BRANCH_PREFIX}{name}");
        let result = match expected {
            Some(old) => self
                .git
                .reference_matching(&full, new, true, old, message)
                .map(|_| ()),
            None => self.git.reference(&full, new, false, message).map(|_| ()),
        };
        if result.is_err() {
            self.drop_ghost_reflog_entry(&full, new);
        }
        match result {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    ErrorCode::Modified | ErrorCode::Exists | ErrorCode::NotFound
                ) =>
            {
                let actual = self.ref_target(&full)?;
                Err(HistoryError::BranchMoved {
                    branch: name.to_string(),
                    expected: expected.map_or("(none)".to_string(), short_id),
                    actual: actual.map_or("(deleted)".to_string(), short_id),
                })
            }
            Err(e) => Err(HistoryError::git(format!("update {full}"))(e)),
        }
    }
}

impl CoinRepo {
    /// libgit2 appends the reflog entry before it moves the ref; when the move then fails
    /// (a full disk) the log names a move that never happened. Remove that entry (best
    /// effort: on a full disk the rewrite may fail too, and the entry only keeps an unused
    /// commit alive).
    fn drop_ghost_reflog_entry(&self, full: &str, new: Oid) {
        let target = self.git.find_reference(full).ok().and_then(|r| r.target());
        if target == Some(new) {
            return;
        }
        if let Ok(mut log) = self.git.reflog(full) {
            if log.get(0).is_some_and(|e| e.id_new() == new) && log.remove(0, true).is_ok() {
                let _ = log.write();
            }
        }
    }

    /// Check, through a fresh handle with no object cache, that the objects of commit `id`
    /// (the commit, its trees and blobs) are in the object database. libgit2 can report a
    /// write as done that a full disk cut short; a ref must never be moved to such a commit.
    pub(crate) fn check_commit_stored(&self, id: Oid) -> Result<(), HistoryError> {
        let fresh = Repository::open(self.git.path())
            .map_err(HistoryError::git("reopen the git repository"))?;
        let lost = |what: String| {
            HistoryError::Corrupt(format!(
                "git did not store {what} of the new checkpoint {} although it reported the \
                 write as done; the disk holding '{}' is probably full. Nothing was changed: \
                 free some space and run the command again",
                short_id(id),
                self.git.path().display()
            ))
        };
        let odb = fresh
            .odb()
            .map_err(HistoryError::git("open the object database"))?;
        let commit = fresh
            .find_commit(id)
            .map_err(|_| lost("the commit object".to_string()))?;
        let mut trees = vec![commit.tree_id()];
        while let Some(t) = trees.pop() {
            let tree = fresh
                .find_tree(t)
                .map_err(|_| lost(format!("tree {}", short_id(t))))?;
            for e in tree.iter() {
                match e.kind() {
                    Some(git2::ObjectType::Tree) => trees.push(e.id()),
                    _ => {
                        odb.read(e.id())
                            .map_err(|_| lost(format!("object {}", short_id(e.id()))))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// First parts of a name that would read as a ref namespace.
const RESERVED_FIRST: &[&str] = &["refs", "heads", "tags", "remotes", "notes", "HEAD"];

/// Whether a name could be read as a checkpoint id or a prefix of one: 4 to 64 hex digits.
pub fn looks_like_id(name: &str) -> bool {
    (4..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_hexdigit())
}

/// The short form of a git id inside history ([`CheckpointId::short`]).
pub(crate) fn short_id(oid: Oid) -> String {
    super::CheckpointId::from(oid).short()
}

/// Git's current durability key: fsync objects and refs ("committed").
fn set_fsync_key(cfg: &mut git2::Config) -> Result<(), HistoryError> {
    cfg.set_str("core.fsync", "committed")
        .map_err(HistoryError::git("set core.fsync"))
}

/// Repositories made by earlier coin versions carry `core.fsyncObjectFiles` in their own
/// config, which plain git now warns about on every command: replace it with `core.fsync`.
/// Best effort: a repository coin may only read (a shared, read-only one) keeps its config.
fn migrate_fsync_key(git: &Repository) {
    let Ok(cfg) = git.config() else {
        return;
    };
    let Ok(mut local) = cfg.open_level(git2::ConfigLevel::Local) else {
        return;
    };
    if local.get_entry("core.fsyncObjectFiles").is_err() {
        return;
    }
    if local.get_entry("core.fsync").is_err() && set_fsync_key(&mut local).is_err() {
        return;
    }
    let _ = local.remove("core.fsyncObjectFiles");
}

fn init_git(root: &Path) -> Result<Repository, HistoryError> {
    Repository::init(root).map_err(HistoryError::git(format!(
        "create a git repository in '{}'",
        root.display()
    )))
}

/// Add `/<rel>/.coin/` to `.git/info/exclude` so git ignores the store.
fn exclude_coin_dir(git: &Repository, root: &Path) -> Result<(), HistoryError> {
    let Some(workdir) = git.workdir().and_then(|w| w.canonicalize().ok()) else {
        return Ok(());
    };
    let rel = root.strip_prefix(&workdir).unwrap_or(Path::new(""));
    let mut pattern = String::from("/");
    for c in rel.components() {
        pattern.push_str(&c.as_os_str().to_string_lossy());
        pattern.push('/');
    }
    pattern.push_str(".coin/");
    let info = git.path().join("info");
    std::fs::create_dir_all(&info).map_err(HistoryError::io("create directory", &info))?;
    let path = info.join("exclude");
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(HistoryError::io("read", &path)(e)),
    };
    if text.lines().any(|l| l.trim() == pattern) {
        return Ok(());
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&pattern);
    text.push('\n');
    fsutil::write_atomic(&path, text).map_err(HistoryError::io("write", &path))
}

/// Parse `YYYY-MM-DDTHH:MM:SS(Z|±HH:MM)` or `@SECONDS [±HHMM]` into (unix seconds, offset
/// minutes).
pub(crate) fn parse_date(s: &str) -> Option<(i64, i32)> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('@') {
        let mut parts = rest.split_whitespace();
        let secs = parts.next()?.parse().ok()?;
        return Some((secs, 0));
    }
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: u32 = d.next()?.parse().ok()?;
    let da: u32 = d.next()?.parse().ok()?;
    let (clock, offset) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else {
        let idx = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(idx);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let off = &off[1..];
        let (oh, om) = off
            .split_once(':')
            .unwrap_or((off.get(..2)?, off.get(2..)?));
        (
            c,
            sign * (oh.parse::<i32>().ok()? * 60 + om.parse::<i32>().ok()?),
        )
    };
    let mut t = clock.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let se: i64 = t.next()?.split('.').next()?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (i64::from(mo) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(da) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let local = days * 86_400 + h * 3600 + mi * 60 + se;
    Some((local - i64::from(offset) * 60, offset))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn repo_with_commit() -> (tempfile::TempDir, CoinRepo, Oid) {
        let tmp = tempfile::tempdir().unwrap();
        CoinRepo::init(tmp.path()).unwrap();
        let repo = CoinRepo::open(&tmp.path().canonicalize().unwrap()).unwrap();
        let dir = tmp.path().join("ad");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a.json"), b"{}").unwrap();
        let out = repo
            .commit(&crate::history::CommitRequest {
                paths: vec![dir],
                task: "T".into(),
                ..Default::default()
            })
            .unwrap();
        (tmp, repo, out.id.oid())
    }

    #[test]
    fn a_commit_object_lost_after_a_reported_write_is_detected() {
        let (_tmp, repo, id) = repo_with_commit();
        repo.check_commit_stored(id).unwrap();
        // What a full disk does: the write "succeeded", the file is not there.
        let hex = id.to_string();
        let loose = repo
            .git()
            .path()
            .join("objects")
            .join(&hex[..2])
            .join(&hex[2..]);
        std::fs::remove_file(loose).unwrap();
        let err = repo.check_commit_stored(id).unwrap_err().to_string();
        assert!(err.contains("probably full"), "{err}");
        // A lost blob of the tree is found too.
        let (_tmp, repo, id) = repo_with_commit();
        let manifest = repo
            .git()
            .find_commit(id)
            .unwrap()
            .tree()
            .unwrap()
            .get_name("manifest")
            .unwrap()
            .id()
            .to_string();
        let loose = repo
            .git()
            .path()
            .join("objects")
            .join(&manifest[..2])
            .join(&manifest[2..]);
        std::fs::remove_file(loose).unwrap();
        assert!(repo.check_commit_stored(id).is_err());
    }

    #[test]
    fn a_reflog_entry_for_a_move_that_failed_is_removed() {
        let (_tmp, repo, id) = repo_with_commit();
        let full = format!("{BRANCH_PREFIX}main");
        let ghost = Oid::from_str("0123456789abcdef0123456789abcdef01234567").unwrap();
        let sig = repo.signature().unwrap();
        let mut log = repo.git().reflog(&full).unwrap();
        log.append(ghost, &sig, Some("coin commit: ghost")).unwrap();
        log.write().unwrap();
        assert_eq!(repo.git().reflog(&full).unwrap().len(), 2);
        repo.drop_ghost_reflog_entry(&full, ghost);
        let log = repo.git().reflog(&full).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log.get(0).unwrap().id_new(), id);
        // The entry of the real head is never removed.
        repo.drop_ghost_reflog_entry(&full, id);
        assert_eq!(repo.git().reflog(&full).unwrap().len(), 1);
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_date("2001-02-03T04:05:06+00:00"),
            Some((981_173_106, 0))
        );
        assert_eq!(
            parse_date("2001-02-03T05:05:06+01:00"),
            Some((981_173_106, 60))
        );
        assert_eq!(parse_date("@12345"), Some((12345, 0)));
        assert_eq!(parse_date("garbage"), None);
        assert_eq!(parse_date("2001-13-03T04:05:06Z"), None);
    }

    #[test]
    fn names() {
        assert!(CoinRepo::validate_name("branch", "order-b").is_ok());
        assert!(CoinRepo::validate_name("branch", "a/b").is_ok());
        for bad in ["", "HEAD", "a~1", "a^", "-x", "a..b", "a b", "x.lock", "/a"] {
            assert!(CoinRepo::validate_name("branch", bad).is_err(), "{bad}");
        }
        // Names that read as ids or ref namespaces would shadow what they look like.
        let full = "0123456789abcdef0123456789abcdef01234567";
        for bad in [
            full,
            "0123456789ab",
            "ABCDEF",
            "cafe",
            "refs/coin/heads/x",
            "refs/x",
            "heads/main",
            "tags/v1",
            "remotes/origin/main",
            "HEAD/x",
            "notes/x",
        ] {
            let err = CoinRepo::validate_name("branch", bad).unwrap_err();
            assert!(matches!(err, HistoryError::InvalidName { .. }), "{bad}");
        }
        for ok in ["abc", "cafe-2", "order-b", "v1.0", "feature/x", "deadbeefx"] {
            assert!(CoinRepo::validate_name("branch", ok).is_ok(), "{ok}");
        }
    }
}
