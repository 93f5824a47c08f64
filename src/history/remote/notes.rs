//! Merging the notes of two repositories (fetch, and push when both sides added notes).

use git2::Oid;

use super::super::records::{self, parse_note, NoteRecord, SCHEMA_VERSION};
use super::super::repo::{short_id, CoinRepo, NOTES_REF};
use super::super::HistoryError;
use super::fetch::NotesUpdate;
use super::git_err;

impl CoinRepo {
    /// Merge the notes commit `theirs` (held by `theirs_ref`) into `refs/notes/coin`:
    /// fast-forward when possible, else copy every note per task (a task recorded on both
    /// sides keeps the local record) and record a merge commit with both parents.
    /// The caller holds the repository lock.
    pub(super) fn merge_notes(
        &self,
        theirs: Oid,
        theirs_ref: &str,
    ) -> Result<NotesUpdate, HistoryError> {
        let git = self.git();
        let ours = self.ref_target(NOTES_REF)?;
        let Some(ours) = ours else {
            git.reference(NOTES_REF, theirs, false, "coin fetch: notes")
                .map_err(git_err("create the notes ref"))?;
            return Ok(NotesUpdate::FastForward);
        };
        if ours == theirs
            || git
                .graph_descendant_of(ours, theirs)
                .map_err(git_err("compare notes"))?
        {
            return Ok(NotesUpdate::Unchanged);
        }
        if git
            .graph_descendant_of(theirs, ours)
            .map_err(git_err("compare notes"))?
        {
            git.reference_matching(NOTES_REF, theirs, true, ours, "coin fetch: notes")
                .map_err(git_err("move the notes ref"))?;
            return Ok(NotesUpdate::FastForward);
        }
        let sig = self.signature()?;
        let entries: Vec<(Oid, Oid)> = git
            .notes(Some(theirs_ref))
            .map_err(git_err("read the fetched notes"))?
            .collect::<Result<_, _>>()
            .map_err(git_err("read the fetched notes"))?;
        for (blob, target) in entries {
            let b = git.find_blob(blob).map_err(git_err("read a note"))?;
            let their_note = parse_note(b.content()).map_err(|e| HistoryError::Record {
                what: format!("fetched note on {}", short_id(target)),
                message: e.to_string(),
            })?;
            let mut merged = self.read_note(target)?.unwrap_or(NoteRecord {
                schema: SCHEMA_VERSION,
                ..NoteRecord::default()
            });
            let before = records::to_canonical_json(&merged)?;
            for (task, rec) in their_note.eval {
                merged.eval.entry(task).or_insert(rec);
            }
            let text = records::to_canonical_json(&merged)?;
            if text != before {
                git.note(&sig, &sig, Some(NOTES_REF), target, &text, true)
                    .map_err(git_err("write a merged note"))?;
            }
        }
        let tip = self
            .ref_target(NOTES_REF)?
            .ok_or_else(|| HistoryError::Corrupt(format!("{NOTES_REF} vanished")))?;
        let tree = git
            .find_commit(tip)
            .and_then(|c| c.tree())
            .map_err(git_err("read the notes tree"))?;
        let p1 = git.find_commit(tip).map_err(git_err("read the notes"))?;
        let p2 = git.find_commit(theirs).map_err(git_err("read the notes"))?;
        let merge = git
            .commit(None, &sig, &sig, "Merge coin notes", &tree, &[&p1, &p2])
            .map_err(git_err("write the notes merge"))?;
        git.reference_matching(NOTES_REF, merge, true, tip, "coin fetch: merge notes")
            .map_err(git_err("move the notes ref"))?;
        Ok(NotesUpdate::Merged)
    }
}
