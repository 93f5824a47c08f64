//! `coin remote`: add, list and remove remotes (coin/git repositories reachable as a path or
//! `file://` URL, with objects there or in an object store), and the progress display shared
//! by push, pull, fetch, clone and `fsck --remote`.

use std::io::Write;

use crate::cli::ErrorKind;
use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::remote::OBJECTS_KEY;
use crate::history::GitCause;

use super::history_util::open_repo;

/// Manage remotes: other coin repositories to push checkpoints to and pull them from
///
/// A remote is a git remote (refs and notes travel with git) whose store objects live in its
/// `.coin/` (a coin repository), in `coin/` (a bare git repository), or where git config
/// `remote.<name>.coinobjects` says (`--objects`: a path or an S3/GCS/Azure/HTTP object store
/// URL). See docs/remotes.md.
#[derive(clap::Subcommand, Debug)]
pub enum RemoteCommand {
    Add(RemoteAddArgs),
    List(RemoteListArgs),
    Remove(RemoteRemoveArgs),
}

/// Add a remote (reuses a git remote of the same name and URL)
#[derive(clap::Args, Debug)]
pub struct RemoteAddArgs {
    /// Its name, e.g. origin
    pub name: String,
    /// A path or file:// URL of a coin repository or a bare git repository (the git half:
    /// refs and notes)
    pub url: String,
    /// Where its store objects live, when not in the repository itself: a path, a file:// URL,
    /// or an object store (s3://BUCKET/PREFIX, gs://, az://CONTAINER/PREFIX, http(s)://;
    /// credentials from the environment, see docs/remotes.md)
    #[arg(long, value_name = "URL")]
    pub objects: Option<String>,
}

/// List remotes with their URLs and object stores
#[derive(clap::Args, Debug)]
pub struct RemoteListArgs {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// Remove a remote and its remote-tracking refs (refs/coin/remotes/NAME/*)
#[derive(clap::Args, Debug)]
pub struct RemoteRemoveArgs {
    /// The remote
    pub name: String,
}

pub fn cmd_remote(
    ui: &mut Ui,
    helper: &CommandHelper,
    cmd: &RemoteCommand,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    match cmd {
        RemoteCommand::Add(a) => {
            let info = repo.remote_add(&a.name, &a.url, a.objects.as_deref())?;
            ui.status(&format!("Added remote '{}' at '{}'.", info.name, info.url));
            Ok(())
        }
        RemoteCommand::List(a) => {
            let remotes = repo.remotes()?;
            if a.json {
                return ui.json(&remotes);
            }
            let out = ui.out();
            for r in remotes {
                match &r.objects {
                    Some(o) => writeln!(out, "{}\t{}\t(objects: {o})", r.name, r.url)?,
                    None => writeln!(out, "{}\t{}", r.name, r.url)?,
                }
            }
            Ok(())
        }
        RemoteCommand::Remove(a) => {
            repo.git().remote_delete(&a.name).map_err(|e| {
                if e.code() == git2::ErrorCode::NotFound {
                    CommandError::user(format!("no remote named '{}'", a.name))
                        .hint("List the remotes with `coin remote list`.")
                } else {
                    CommandError::caused(
                        ErrorKind::Internal,
                        format!("could not remove the remote '{}'", a.name),
                        GitCause(e),
                    )
                }
            })?;
            let prefix = format!("{}{}/", crate::history::remote::REMOTE_PREFIX, a.name);
            let names: Vec<String> = repo
                .git()
                .references_glob(&format!("{prefix}*"))
                .map_err(|e| {
                    CommandError::caused(
                        ErrorKind::Internal,
                        format!("could not list the refs under '{prefix}'"),
                        GitCause(e),
                    )
                })?
                .flatten()
                .filter_map(|r| r.name().map(str::to_string).ok())
                .collect();
            for name in names {
                if let Ok(mut r) = repo.git().find_reference(&name) {
                    r.delete().map_err(|e| {
                        CommandError::caused(
                            ErrorKind::Internal,
                            format!("could not delete the ref '{name}'"),
                            GitCause(e),
                        )
                    })?;
                }
            }
            // `git remote remove` drops the whole section, coinobjects included; libgit2 too,
            // but be explicit for configs written by hand.
            if let Ok(mut cfg) = repo.git().config() {
                let _ = cfg.remove(&format!("remote.{}.{OBJECTS_KEY}", a.name));
            }
            ui.status(&format!("Removed remote '{}'.", a.name));
            Ok(())
        }
    }
}

/// A progress callback for object transfers: a bar on a terminal (objects, bytes and rate),
/// nothing otherwise.
pub struct TransferProgress {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    start: std::time::Instant,
}

impl TransferProgress {
    /// A progress display for `what` ("Sending objects").
    pub fn new(ui: &Ui, what: &str) -> Self {
        let bar = ui.show_progress().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_message(what.to_string());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} {wide_bar} {prefix} [{elapsed_precise}]",
            ) {
                bar.set_style(style);
            }
            bar
        });
        TransferProgress {
            bar,
            what: what.to_string(),
            start: std::time::Instant::now(),
        }
    }

    /// Record where the transfer is: the bar follows bytes when their total is known, else
    /// objects; the text shows both and the rate.
    pub fn update(&mut self, p: &crate::store::transport::TransferProgress) {
        let Some(b) = &self.bar else { return };
        match p.bytes_total {
            Some(total) if total > 0 => {
                b.set_length(total);
                b.set_position(p.bytes);
            }
            _ => {
                b.set_length(p.total as u64);
                b.set_position(p.done as u64);
            }
        }
        b.set_message(format!("{} {}/{}", self.what, p.done, p.total));
        b.set_prefix(transfer_text(p, self.start.elapsed()));
    }
}

/// "12.0 MB of 64.0 MB, 8.1 MB/s" for a progress line.
pub fn transfer_text(
    p: &crate::store::transport::TransferProgress,
    elapsed: std::time::Duration,
) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        human_bytes((p.bytes as f64 / secs) as u64)
    } else {
        human_bytes(0)
    };
    match p.bytes_total {
        Some(t) => format!("{} of {}, {rate}/s", human_bytes(p.bytes), human_bytes(t)),
        None => format!("{}, {rate}/s", human_bytes(p.bytes)),
    }
}

impl Drop for TransferProgress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// "1.2 MB"-style byte counts for status lines.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `[REMOTE] [BRANCH] [--json]` of `coin push` and `coin pull`.
#[derive(clap::Args, Debug)]
pub struct RemoteBranchArgs {
    /// The remote [default: origin, or the only remote]
    pub remote: Option<String>,
    /// The branch [default: the current branch]
    pub branch: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

impl RemoteBranchArgs {
    /// The remote and branch, defaults filled in.
    pub fn resolve(
        &self,
        repo: &crate::history::CoinRepo,
    ) -> Result<(String, String), CommandError> {
        let remote = match &self.remote {
            Some(r) => r.clone(),
            None => repo.default_remote()?,
        };
        let branch = match &self.branch {
            Some(b) => b.clone(),
            None => repo.current_branch()?,
        };
        Ok((remote, branch))
    }
}
