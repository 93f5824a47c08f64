//! `coin fsck --remote`: check that every object the remote's refs reach is on the remote's
//! object store and hashes right there.

use std::collections::BTreeSet;

use git2::Oid;
use serde::Serialize;

use crate::store::transport::{RemoteObject, TransferProgress};
use crate::store::ObjectId;

use super::super::repo::{CoinRepo, NOTES_REF};
use super::super::HistoryError;
use super::pack::{copy_git_objects, list_refs_of};
use super::{Progress, STAGING_PREFIX};

/// One object that failed the check.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteProblem {
    /// The object id (hex).
    pub object: String,
    /// `missing` or `corrupt`.
    pub problem: String,
    /// What is wrong, for a corrupt object.
    pub detail: Option<String>,
}

/// What `coin fsck --remote` found.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteFsckReport {
    /// The remote.
    pub remote: String,
    /// Where its objects are.
    pub objects_at: String,
    /// Whether only existence and size were checked.
    pub quick: bool,
    /// Refs of the remote (coin branches, tags, notes) whose history was walked.
    pub refs: usize,
    /// Checkpoints they reach.
    pub checkpoints: usize,
    /// Objects checked.
    pub objects: usize,
    /// Objects that passed.
    pub ok: usize,
    /// Bytes of the objects that passed (downloaded and hashed, unless quick).
    pub bytes: u64,
    /// Objects missing or corrupt on the remote, in id order.
    pub problems: Vec<RemoteProblem>,
}

impl CoinRepo {
    /// Check the objects of every checkpoint the remote's coin refs and notes reach, on the
    /// remote's object store: each downloaded and hashed (`quick`: existence and size only).
    /// The remote's git objects are copied here (no ref moves) so its history can be read.
    pub fn fsck_remote(
        &self,
        remote: &str,
        quick: bool,
        progress: Progress<'_>,
    ) -> Result<RemoteFsckReport, HistoryError> {
        let info = self.remote_info(remote)?;
        let transport = self.object_transport(&info, false)?;
        let rgit = self.open_remote_git(&info)?;
        let (refs, _) = list_refs_of(&rgit)?;
        let tips: Vec<(String, Oid)> = refs
            .into_iter()
            .filter(|(n, _)| {
                n.starts_with("refs/coin/heads/")
                    || n.starts_with("refs/coin/tags/")
                    || n == NOTES_REF
            })
            .collect();
        let tip_ids: Vec<Oid> = tips.iter().map(|t| t.1).collect();
        let have: Vec<Oid> = self
            .refs_under("refs/coin/")?
            .into_iter()
            .chain(self.refs_under(NOTES_REF)?)
            .map(|(_, id)| id)
            .collect();
        copy_git_objects(&rgit, self.git(), &tip_ids, &have)?;
        let commits: Vec<Oid> = tips
            .iter()
            .filter(|(n, _)| n != NOTES_REF)
            .map(|t| t.1)
            .collect();
        let checkpoints = self.reachable_checkpoints(&commits)?;
        let mut ids: BTreeSet<ObjectId> = self.objects_of(&checkpoints)?.into_iter().collect();
        if let Some((_, notes)) = tips.iter().find(|(n, _)| n == NOTES_REF) {
            let staging = format!("{STAGING_PREFIX}fsck-remote/notes");
            self.git()
                .reference(
                    &staging,
                    *notes,
                    true,
                    "coin fsck --remote: the remote's notes",
                )
                .map_err(super::git_err("stage the remote's notes"))?;
            let noted = self.note_objects(&staging);
            self.delete_ref(&staging)?;
            ids.extend(noted?);
        }
        let mut report = RemoteFsckReport {
            remote: info.name.clone(),
            objects_at: transport.describe(),
            quick,
            refs: tips.len(),
            checkpoints: checkpoints.len(),
            objects: ids.len(),
            ok: 0,
            bytes: 0,
            problems: Vec::new(),
        };
        let mut state = TransferProgress {
            total: ids.len(),
            ..TransferProgress::default()
        };
        progress(&state);
        for id in &ids {
            match transport.check(self.store(), id, quick)? {
                RemoteObject::Ok { bytes } => {
                    report.ok += 1;
                    report.bytes += bytes;
                }
                RemoteObject::Missing => report.problems.push(RemoteProblem {
                    object: id.to_hex(),
                    problem: "missing".into(),
                    detail: None,
                }),
                RemoteObject::Corrupt(reason) => report.problems.push(RemoteProblem {
                    object: id.to_hex(),
                    problem: "corrupt".into(),
                    detail: Some(reason),
                }),
            }
            state.done += 1;
            state.bytes = report.bytes;
            progress(&state);
        }
        Ok(report)
    }
}
