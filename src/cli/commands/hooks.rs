//! `coin hooks`: install, uninstall and inspect coin's git hooks, and run their logic.

use std::io::{Read, Write};

use git2::Oid;

use crate::cli::{io_kind, ErrorKind};
use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::hooks::{GitHookReport, GIT_HOOKS};
use crate::history::CoinRepo;
use crate::history::GitCause;

use super::history_util::open_repo;

/// Install, remove or run coin's git hooks
///
/// The hooks (pre-push, post-checkout, post-merge, pre-commit) are small sh scripts that call
/// `coin hooks run NAME`; a hook you already had is kept as NAME.local and runs first. coin's
/// own event hooks (pre-checkpoint, post-train, post-eval) live in .coin/hooks/. See
/// docs/hooks.md.
#[derive(clap::Subcommand, Debug)]
pub enum HooksCommand {
    Install(HooksInstallArgs),
    Uninstall(HooksUninstallArgs),
    List(HooksListArgs),
    Run(HooksRunArgs),
}

/// Install coin's git hooks (idempotent; existing hooks are chained, never overwritten)
#[derive(clap::Args, Debug)]
pub struct HooksInstallArgs {}

/// Remove coin's git hooks and put back the hooks they chained
#[derive(clap::Args, Debug)]
pub struct HooksUninstallArgs {}

/// Show which git hooks are installed and which coin event hooks are active
#[derive(clap::Args, Debug)]
pub struct HooksListArgs {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Run a git hook's logic (called by the installed scripts)
#[derive(clap::Args, Debug)]
pub struct HooksRunArgs {
    /// The hook: pre-push, post-checkout, post-merge or pre-commit
    pub name: String,
    /// The arguments git passed to the hook
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn cmd_hooks(
    ui: &mut Ui,
    helper: &CommandHelper,
    cmd: &HooksCommand,
) -> Result<(), CommandError> {
    match cmd {
        HooksCommand::Install(_) => {
            let repo = open_repo(helper)?;
            let r = repo.install_git_hooks()?;
            for name in &r.chained {
                ui.status(&format!(
                    "Kept your {name} hook as {name}.local; coin's {name} hook runs it first."
                ));
            }
            ui.status(&format!(
                "Installed {} hook(s) in '{}' ({} already up to date).",
                r.installed.len(),
                r.dir.display(),
                r.unchanged.len()
            ));
            Ok(())
        }
        HooksCommand::Uninstall(_) => {
            let repo = open_repo(helper)?;
            let r = repo.uninstall_git_hooks()?;
            for name in &r.foreign {
                ui.warn(&format!("{name} is not coin's hook; left it alone"));
            }
            ui.status(&format!(
                "Removed {} hook(s), restored {} of yours.",
                r.removed.len(),
                r.restored.len()
            ));
            Ok(())
        }
        HooksCommand::List(a) => {
            let repo = open_repo(helper)?;
            let git: Vec<_> = repo.git_hooks_status();
            let events: Vec<(String, bool)> = crate::history::hooks::COIN_EVENTS
                .iter()
                .map(|e| {
                    let p = repo.event_hooks_dir().join(e);
                    (e.to_string(), is_exec(&p))
                })
                .collect();
            if a.json {
                let v = serde_json::json!({
                    "git_hooks_dir": repo.git_hooks_dir(),
                    "git": git.iter().map(|(n, s)| serde_json::json!({"name": n, "state": s})).collect::<Vec<_>>(),
                    "events": events.iter().map(|(n, on)| serde_json::json!({"name": n, "active": on})).collect::<Vec<_>>(),
                    "gates": {"max_forgetting": repo.gates_config()?.max_forgetting},
                });
                return ui.json(&v);
            }
            let gates = repo.gates_config()?;
            let out = ui.out();
            writeln!(out, "git hooks ({}):", repo.git_hooks_dir().display())?;
            for (n, s) in git {
                writeln!(out, "  {n:<14} {s}")?;
            }
            writeln!(out, "coin event hooks (.coin/hooks):")?;
            for (n, on) in events {
                writeln!(out, "  {n:<14} {}", if on { "active" } else { "none" })?;
            }
            match gates.max_forgetting {
                Some(x) => writeln!(out, "gates: max_forgetting = {x}")?,
                None => writeln!(out, "gates: none ([gates] max_forgetting is not set)")?,
            }
            Ok(())
        }
        HooksCommand::Run(a) => run_hook(ui, helper, a),
    }
}

fn is_exec(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Find the coin repository for a hook run from a git work tree: upward from the current
/// directory, else `coin.root` in the git config. `None`: this git repository has no coin.
fn hook_repo(helper: &CommandHelper) -> Result<Option<(CoinRepo, git2::Repository)>, CommandError> {
    let start = helper.start_dir();
    let Ok(work) = git2::Repository::discover(&start) else {
        return Ok(None);
    };
    if let Ok(repo) = CoinRepo::discover(&start) {
        return Ok(Some((repo, work)));
    }
    let root = work
        .config()
        .ok()
        .and_then(|c| c.get_string("coin.root").ok());
    let (Some(root), Some(wd)) = (root, work.workdir()) else {
        return Ok(None);
    };
    let dir = wd.join(root);
    if !dir.join(".coin").is_dir() {
        return Ok(None);
    }
    Ok(Some((CoinRepo::open(&dir)?, work)))
}

fn parse_oid(s: Option<&String>, what: &str) -> Result<Oid, CommandError> {
    s.and_then(|s| Oid::from_str(s).ok())
        .ok_or_else(|| CommandError::usage(format!("expected {what} as a commit id")))
}

fn git_error(message: &str, e: git2::Error) -> CommandError {
    CommandError::caused(ErrorKind::Internal, message, GitCause(e))
}

fn run_hook(ui: &mut Ui, helper: &CommandHelper, a: &HooksRunArgs) -> Result<(), CommandError> {
    if !GIT_HOOKS.contains(&a.name.as_str()) {
        return Err(CommandError::usage(format!(
            "'{}' is not a hook coin runs; expected one of {}",
            a.name,
            GIT_HOOKS.join(", ")
        )));
    }
    // post-checkout with nothing changed: the fast path, before opening anything.
    if a.name == "post-checkout" && !a.args.is_empty() && a.args.first() == a.args.get(1) {
        return Ok(());
    }
    let Some((repo, work)) = hook_repo(helper)? else {
        return Ok(());
    };
    let report: GitHookReport = match a.name.as_str() {
        "pre-push" => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input).map_err(|e| {
                CommandError::caused(io_kind(&e), "could not read the pushed refs from stdin", e)
            })?;
            let remote = a.args.first().cloned().unwrap_or_default();
            let url = a.args.get(1).cloned().unwrap_or_default();
            repo.hook_pre_push(&remote, &url, &input).map_err(|e| {
                CommandError::from(e).hint(
                    "The push was refused by coin's pre-push hook; `git push --no-verify` skips it.",
                )
            })?
        }
        "post-checkout" => {
            let prev = parse_oid(a.args.first(), "the previous HEAD")?;
            let new = parse_oid(a.args.get(1), "the new HEAD")?;
            repo.hook_refresh_pointers(&work, prev, new)?
        }
        "post-merge" => {
            let orig = work
                .refname_to_id("ORIG_HEAD")
                .map_err(|e| git_error("could not read ORIG_HEAD", e))?;
            let head = work
                .refname_to_id("HEAD")
                .map_err(|e| git_error("could not read HEAD", e))?;
            repo.hook_refresh_pointers(&work, orig, head)?
        }
        _ => repo.hook_pre_commit(&work).map_err(|e| {
            CommandError::from(e)
                .hint("Run `git commit --no-verify` to skip coin's pre-commit hook.")
        })?,
    };
    for m in &report.messages {
        ui.status(m);
    }
    Ok(())
}
