//! Git data between two repositories opened directly: listing refs, copying objects as one pack.

use std::collections::BTreeMap;

use git2::{Oid, Repository};

use super::super::repo::{short_id, BRANCH_PREFIX, HEAD_REF};
use super::super::HistoryError;
use super::git_err;

/// Every ref of `git` with its target (symbolic refs resolved; unborn ones left out), and
/// the branch `refs/coin/HEAD` names.
pub(super) fn list_refs_of(
    git: &Repository,
) -> Result<(BTreeMap<String, Oid>, Option<String>), HistoryError> {
    let mut refs = BTreeMap::new();
    let mut head = None;
    for r in git
        .references()
        .map_err(git_err("list the remote's refs"))?
    {
        let r = r.map_err(git_err("list the remote's refs"))?;
        let Ok(name) = r.name().map(str::to_string) else {
            continue;
        };
        if name == HEAD_REF {
            head = r
                .symbolic_target()
                .ok()
                .flatten()
                .and_then(|t| t.strip_prefix(BRANCH_PREFIX))
                .map(str::to_string);
        }
        if let Ok(resolved) = r.resolve() {
            if let Some(id) = resolved.target() {
                refs.insert(name, id);
            }
        }
    }
    Ok((refs, head))
}

/// Copy the git objects reachable from `tips` and not from `hide` (commits `to` already has)
/// from one repository to another, as one pack written into `to`'s object database.
pub(super) fn copy_git_objects(
    from: &Repository,
    to: &Repository,
    tips: &[Oid],
    hide: &[Oid],
) -> Result<(), HistoryError> {
    let to_odb = to.odb().map_err(git_err("open the object database"))?;
    let tips: Vec<Oid> = tips
        .iter()
        .copied()
        .filter(|t| !to_odb.exists(*t))
        .collect();
    if tips.is_empty() {
        return Ok(());
    }
    let mut walk = from.revwalk().map_err(git_err("walk the history"))?;
    for t in &tips {
        walk.push(*t)
            .map_err(HistoryError::git(format!("walk from {}", short_id(*t))))?;
    }
    for h in hide {
        if to_odb.exists(*h) {
            // A commit the sender lacks cannot be hidden; it is not needed then.
            let _ = walk.hide(*h);
        }
    }
    let mut pb = from.packbuilder().map_err(git_err("build a pack"))?;
    pb.insert_walk(&mut walk).map_err(git_err("build a pack"))?;
    if pb.object_count() == 0 {
        return Ok(());
    }
    let mut writer = to_odb.packwriter().map_err(git_err("write a pack"))?;
    let mut write_err = None;
    pb.foreach(
        |chunk| match std::io::Write::write_all(&mut writer, chunk) {
            Ok(()) => true,
            Err(e) => {
                write_err = Some(e);
                false
            }
        },
    )
    .map_err(git_err("write a pack"))?;
    if let Some(e) = write_err {
        return Err(HistoryError::Io {
            op: "write a pack into".into(),
            path: to.path().to_path_buf(),
            source: e,
        });
    }
    writer.commit().map_err(git_err("index the pack"))?;
    Ok(())
}
