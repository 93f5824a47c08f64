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

mod events;
mod git_hooks;
mod install;
mod pointer;

use std::path::{Path, PathBuf};

use include_dir::{include_dir, Dir};
use serde::Serialize;

use super::HistoryError;

pub use events::GatesConfig;
pub use install::{is_coin_hook, render_git_hook, InstallReport, UninstallReport};
pub use pointer::{parse_pointer, Pointer};

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
    pub checkpoint: Option<super::CheckpointId>,
    /// Its parent (`COIN_PARENT`).
    pub parent: Option<super::CheckpointId>,
    /// The branch (`COIN_BRANCH`).
    pub branch: Option<String>,
    /// The task (`COIN_TASK`).
    pub task: Option<String>,
    /// Arguments after the checkpoint id (e.g. the tasks of `post-eval`).
    pub extra_args: Vec<String>,
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::history::CoinRepo;

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
            checkpoint: Some(ID.parse().unwrap()),
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
