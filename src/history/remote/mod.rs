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

mod clone;
mod fetch;
mod notes;
mod objects;
mod pack;
mod push;
mod verify;

use std::path::{Path, PathBuf};
use std::time::Duration;

use git2::Repository;
use serde::Serialize;

use crate::store::s3::{is_object_store_url, ObjectStoreTransport};
use crate::store::transport::{FsTransport, ObjectTransport, TransferProgress};

use super::repo::CoinRepo;
use super::HistoryError;

pub use fetch::{FetchReport, NotesUpdate, PullReport};
pub use push::PushReport;
pub use verify::{RemoteFsckReport, RemoteProblem};

/// Prefix of remote-tracking refs: `refs/coin/remotes/<remote>/<branch>`.
pub const REMOTE_PREFIX: &str = "refs/coin/remotes/";

/// Prefix of the staging refs a fetch writes before the objects are in.
pub const STAGING_PREFIX: &str = "refs/coin-fetch/";

/// Git config key (under `remote.<name>.`) naming the remote's object store explicitly.
pub const OBJECTS_KEY: &str = "coinobjects";

/// Git config key, in a remote's own git repository, naming the object store its checkpoints'
/// objects are in (when that is a network object store): written by a push there, read by
/// `coin clone`.
pub const REMOTE_OBJECTS_CONFIG: &str = "coin.objects";

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

/// Progress of an object transfer: objects and bytes done and in total.
pub type Progress<'a> = &'a mut dyn FnMut(&TransferProgress);

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
        "remote '{url}' is not a path or file:// URL; coin reaches the git half of a remote \
         as a path, and store objects at a path or an object store URL (s3://, gs://, az://, \
         http(s)://) set with `coin remote add NAME GIT_PATH --objects URL` (docs/remotes.md)"
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
        if is_object_store_url(url) {
            return Err(HistoryError::Input(format!(
                "'{url}' holds store objects, not the git half (refs and notes); give both: \
                 `coin remote add {name} GIT_PATH --objects {url}`, where GIT_PATH is a bare \
                 git repository (`git init --bare PATH`) or a coin repository"
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
        if let Some(o) = remote.objects.as_deref().filter(|o| is_object_store_url(o)) {
            let _ = create; // An object store needs no creating: the bucket must exist.
            return Ok(Box::new(ObjectStoreTransport::open(o)?));
        }
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
