//! Revision syntax: full ids and unique hex prefixes, branch and tag names, `HEAD` (or `@`),
//! followed by any number of `~N` / `~` (N-th first-parent ancestor) and `^N` / `^` (N-th
//! parent) suffixes.

use std::collections::BTreeSet;

use git2::Oid;

use super::repo::{short_id, CoinRepo, BRANCH_PREFIX, TAG_PREFIX};
use super::{CheckpointId, HistoryError};

enum Step {
    Ancestor(usize),
    Parent(usize),
}

fn split_rev(rev: &str) -> Result<(&str, Vec<Step>), HistoryError> {
    let bad = |message: &str| HistoryError::BadRevision {
        rev: rev.to_string(),
        message: message.to_string(),
    };
    let idx = rev.find(['~', '^']).unwrap_or(rev.len());
    let (base, mut rest) = rev.split_at(idx);
    if base.is_empty() {
        return Err(bad("it names no checkpoint before the ~ or ^"));
    }
    let mut steps = Vec::new();
    while let Some(op) = rest.chars().next() {
        rest = &rest[1..];
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (digits, tail) = rest.split_at(digits_end);
        rest = tail;
        let n = if digits.is_empty() {
            1
        } else {
            digits
                .parse::<usize>()
                .map_err(|_| bad("the number after ~ or ^ is too large"))?
        };
        match op {
            '~' => steps.push(Step::Ancestor(n)),
            '^' => steps.push(Step::Parent(n)),
            _ => return Err(bad("expected ~N or ^N after the name")),
        }
    }
    Ok((base, steps))
}

impl CoinRepo {
    /// Resolve a revision to a checkpoint id.
    pub fn resolve(&self, rev: &str) -> Result<CheckpointId, HistoryError> {
        self.resolve_oid(rev).map(Into::into)
    }

    fn resolve_oid(&self, rev: &str) -> Result<Oid, HistoryError> {
        let rev = rev.trim();
        if rev.is_empty() {
            return Err(HistoryError::BadRevision {
                rev: rev.to_string(),
                message: "it is empty".to_string(),
            });
        }
        let (base, steps) = split_rev(rev)?;
        let mut id = self.resolve_base(base)?;
        for step in steps {
            let commit = self
                .git()
                .find_commit(id)
                .map_err(HistoryError::git(format!(
                    "read checkpoint {}",
                    short_id(id)
                )))?;
            match step {
                Step::Ancestor(n) => {
                    let mut c = commit;
                    for i in 0..n {
                        c = c.parent(0).map_err(|_| HistoryError::BadRevision {
                            rev: rev.to_string(),
                            message: format!(
                                "{} has no parent ({} steps back is past the first checkpoint)",
                                short_id(c.id()),
                                i + 1
                            ),
                        })?;
                    }
                    id = c.id();
                }
                Step::Parent(0) => {}
                Step::Parent(n) => {
                    id = commit
                        .parent_id(n - 1)
                        .map_err(|_| HistoryError::BadRevision {
                            rev: rev.to_string(),
                            message: format!("{} has no parent number {n}", short_id(id)),
                        })?;
                }
            }
        }
        Ok(id)
    }

    /// Resolve a name: `HEAD`/`@`, a branch, a tag, a remote-tracking branch
    /// (`<remote>/<branch>`), a full id or a unique hex prefix of a known checkpoint. A name
    /// that means two different checkpoints (a branch called like an id another checkpoint
    /// has, a branch and a tag of one name) is an error listing the candidates, never a
    /// silent choice.
    fn resolve_base(&self, base: &str) -> Result<Oid, HistoryError> {
        if base == "HEAD" || base == "@" {
            let branch = self.current_branch()?;
            return self
                .branch_target(&branch)?
                .map(|id| id.oid())
                .ok_or(HistoryError::EmptyBranch(branch));
        }
        let mut candidates: Vec<(String, Oid)> = Vec::new();
        if git2::Reference::is_valid_name(&format!("{BRANCH_PREFIX}{base}")) {
            if let Some(id) = self.ref_target(&format!("{BRANCH_PREFIX}{base}"))? {
                candidates.push((format!("branch '{base}'"), id));
            }
            if let Some(id) = self.ref_target(&format!("{TAG_PREFIX}{base}"))? {
                candidates.push((format!("tag '{base}'"), id));
            }
            // `<remote>/<branch>`: a remote-tracking ref written by `coin fetch`.
            if base.contains('/') {
                let tracking = format!("{}{base}", super::remote::REMOTE_PREFIX);
                if let Some(id) = self.ref_target(&tracking)? {
                    candidates.push((format!("remote-tracking branch '{base}'"), id));
                }
            }
        }
        let lower = base.to_ascii_lowercase();
        if lower.len() >= 4 && lower.len() <= 40 && lower.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut exact = None;
            if lower.len() == 40 {
                if let Ok(oid) = Oid::from_str(&lower) {
                    if self.git().find_commit(oid).is_ok() {
                        exact = Some(oid);
                    }
                }
            }
            let matches: Vec<Oid> = match exact {
                Some(oid) => vec![oid],
                None => self
                    .known_checkpoints()?
                    .into_iter()
                    .filter(|o| o.to_string().starts_with(&lower))
                    .map(|o| o.oid())
                    .collect(),
            };
            for m in matches {
                candidates.push((format!("checkpoint {}", short_id(m)), m));
            }
        }
        let distinct: BTreeSet<Oid> = candidates.iter().map(|c| c.1).collect();
        match distinct.len() {
            0 => Err(HistoryError::UnknownRevision(base.to_string())),
            1 => Ok(candidates[0].1),
            _ => Err(HistoryError::AmbiguousRevision {
                rev: base.to_string(),
                candidates: candidates
                    .iter()
                    .map(|(what, id)| format!("{what} ({})", short_id(*id)))
                    .collect(),
            }),
        }
    }

    /// Every commit reachable from coin branches and tags, their reflogs and the notes.
    pub fn known_checkpoints(&self) -> Result<BTreeSet<CheckpointId>, HistoryError> {
        let roots = self.coin_roots()?;
        let mut walk = self
            .git()
            .revwalk()
            .map_err(HistoryError::git("walk the history"))?;
        for r in &roots {
            // A root that is gone (pruned by git) is reported by fsck, not here.
            let _ = walk.push(r.id);
        }
        let mut out = BTreeSet::new();
        for oid in walk {
            out.insert(oid.map_err(HistoryError::git("walk the history"))?.into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split() {
        let (b, s) = split_rev("main~2^").unwrap();
        assert_eq!(b, "main");
        assert!(matches!(s[..], [Step::Ancestor(2), Step::Parent(1)]));
        let (b, s) = split_rev("abc123").unwrap();
        assert_eq!(b, "abc123");
        assert!(s.is_empty());
        let (_, s) = split_rev("HEAD~").unwrap();
        assert!(matches!(s[..], [Step::Ancestor(1)]));
        assert!(split_rev("~1").is_err());
        assert!(split_rev("HEAD~99999999999999999999999").is_err());
    }
}
