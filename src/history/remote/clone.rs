//! `coin clone`: a git clone of the code, a new `.coin/`, and a fetch of the coin history.

use std::collections::BTreeSet;
use std::path::Path;

use git2::{Oid, Repository};

use super::super::repo::CoinRepo;
use super::super::HistoryError;
use super::fetch::FetchReport;
use super::pack::{copy_git_objects, list_refs_of};
use super::{absolute_url, derive_objects_dir, git_err, unsupported, url_path, Progress};

/// A git clone without libgit2's transport: a new repository at `dir` with `origin` = `url`,
/// the source's `refs/heads/*` as `refs/remotes/origin/*`, and its HEAD branch checked out
/// when it has one.
pub(super) fn clone_code_directly(src: &Path, dir: &Path, url: &str) -> Result<(), HistoryError> {
    let from = Repository::open(src).map_err(HistoryError::git(format!("open '{url}'")))?;
    let to = Repository::init(dir).map_err(HistoryError::git(format!(
        "create a git repository in '{}'",
        dir.display()
    )))?;
    to.remote("origin", url)
        .map_err(git_err("add the remote 'origin'"))?;
    let (refs, _) = list_refs_of(&from)?;
    let heads: Vec<(String, Oid)> = refs
        .into_iter()
        .filter_map(|(n, id)| n.strip_prefix("refs/heads/").map(|b| (b.to_string(), id)))
        .collect();
    let tips: Vec<Oid> = heads.iter().map(|h| h.1).collect();
    copy_git_objects(&from, &to, &tips, &[])?;
    for (b, id) in &heads {
        to.reference(&format!("refs/remotes/origin/{b}"), *id, true, "coin clone")
            .map_err(git_err("create a remote-tracking branch"))?;
    }
    let head_branch = from
        .find_reference("HEAD")
        .ok()
        .and_then(|h| h.symbolic_target().ok().flatten().map(str::to_string))
        .and_then(|t| t.strip_prefix("refs/heads/").map(str::to_string));
    if let Some(b) = head_branch {
        if let Some((_, id)) = heads.iter().find(|(n, _)| *n == b) {
            to.reference(&format!("refs/heads/{b}"), *id, false, "coin clone")
                .map_err(git_err("create the branch"))?;
            to.set_head(&format!("refs/heads/{b}"))
                .map_err(git_err("set HEAD"))?;
            to.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
                .map_err(git_err("check out the work tree"))?;
        } else {
            to.set_head(&format!("refs/heads/{b}"))
                .map_err(git_err("set HEAD"))?;
        }
    }
    Ok(())
}

impl CoinRepo {
    /// Clone: a git clone of `url` into `dir` (its code branches, when it has any), a new
    /// `.coin/` there, then a fetch of the coin history with every branch created locally
    /// and the remote's current branch made current.
    pub fn clone_from(
        url: &str,
        dir: &Path,
        progress: Progress<'_>,
    ) -> Result<(CoinRepo, FetchReport), HistoryError> {
        let url = absolute_url(url)?;
        let src = url_path(&url).ok_or_else(|| unsupported(&url))?;
        if derive_objects_dir(&src).is_none() {
            return Err(HistoryError::Input(format!(
                "'{url}' is not a coin repository (no .coin/ and not a bare git repository)"
            )));
        }
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(HistoryError::io("read directory", dir))?
                .next()
                .is_some()
        {
            return Err(HistoryError::Input(format!(
                "'{}' exists and is not empty",
                dir.display()
            )));
        }
        if git2::build::RepoBuilder::new()
            .clone(&src.display().to_string(), dir)
            .is_err()
        {
            // libgit2's clone lists every ref and fails on a symbolic ref to an unborn branch
            // (a coin repository whose current branch has no checkpoint yet): copy the code
            // branches directly instead.
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(HistoryError::io("clean up", dir))?;
            }
            clone_code_directly(&src, dir, &url)?;
        }
        // The remote URL as given (absolute), not libgit2's normalised form.
        {
            let git = git2::Repository::open(dir).map_err(git_err("open the clone"))?;
            git.remote_set_url("origin", &url)
                .map_err(git_err("set the remote URL"))?;
        }
        // A remote whose objects live in an object store says where (`coin.objects` in its
        // git config, written by the first push there).
        let objects = git2::Repository::open(&src)
            .ok()
            .and_then(|g| g.config().ok())
            .and_then(|c| c.get_string(super::REMOTE_OBJECTS_CONFIG).ok());
        if let Some(o) = &objects {
            let git = git2::Repository::open(dir).map_err(git_err("open the clone"))?;
            git.config()
                .and_then(|mut c| c.set_str(&format!("remote.origin.{}", super::OBJECTS_KEY), o))
                .map_err(git_err("set remote.origin.coinobjects"))?;
        }
        CoinRepo::init(dir)?;
        let repo = CoinRepo::discover(dir)?;
        let mut fetch = repo.fetch("origin", progress)?;
        let mut created = BTreeSet::new();
        for (b, id) in &fetch.branches {
            let id = Oid::from_str(id).map_err(git_err("read a fetched id"))?;
            if repo.branch_target(b)?.is_none() {
                match repo.create_branch(b, id.into()) {
                    Ok(()) => {
                        created.insert(b.clone());
                    }
                    Err(e @ HistoryError::InvalidName { .. }) => {
                        fetch
                            .refused
                            .push(format!("branch '{}': {e}", b.escape_debug()));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let current = fetch
            .remote_head
            .clone()
            .filter(|h| created.contains(h))
            .or_else(|| {
                created
                    .contains(super::super::DEFAULT_BRANCH)
                    .then(|| super::super::DEFAULT_BRANCH.to_string())
            })
            .or_else(|| created.iter().next().cloned());
        if let Some(b) = current {
            repo.switch(&b, false)?;
        }
        Ok((repo, fetch))
    }
}
