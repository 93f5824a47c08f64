//! Installing, removing and inspecting the git hooks coin ships (`hooks/git/`).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::store::fsutil;

use super::super::repo::CoinRepo;
use super::super::HistoryError;
use super::{coin_exe, is_executable, set_mode, shipped_hooks, MARKER};

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

impl CoinRepo {
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
}
