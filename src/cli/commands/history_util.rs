//! Helpers shared by the history commands: opening the repository, reading input files, formatting.

use std::collections::BTreeMap;
use std::path::Path;

use crate::history::CheckpointId;

use crate::cli::{CommandError, CommandHelper};
use crate::history::{CoinRepo, EvalRecord, EvalSource};

/// Open the repository around `--repo` or the current directory.
pub fn open_repo(helper: &CommandHelper) -> Result<CoinRepo, CommandError> {
    Ok(CoinRepo::discover(&helper.start_dir())?)
}

/// Read a JSON input file named on the command line, with clear errors.
pub fn read_text(helper: &CommandHelper, path: &Path, what: &str) -> Result<String, CommandError> {
    let full = helper.cwd.join(path);
    let bytes =
        std::fs::read(&full).map_err(|e| CommandError::io(&format!("read the {what}"), path, e))?;
    String::from_utf8(bytes).map_err(|_| {
        CommandError::user(format!("the {what} '{}' is not UTF-8 text", path.display()))
    })
}

/// Read and validate an eval results file.
pub fn read_eval_file(
    helper: &CommandHelper,
    path: &Path,
) -> Result<BTreeMap<String, EvalRecord>, CommandError> {
    let text = read_text(helper, path, "eval results file")?;
    crate::history::parse_eval_file(&text).map_err(|e| {
        CommandError::caused(
            crate::cli::ErrorKind::User,
            format!("the eval results file '{}' is invalid", path.display()),
            e,
        )
        .hint(r#"The file should read {"<task>": {"metric": "accuracy", "score": 0-100, "n": N}, ...}."#)
    })
}

/// Branch and tag names pointing at each checkpoint.
pub struct Decorations {
    /// Checkpoint → branch names.
    pub branches: BTreeMap<CheckpointId, Vec<String>>,
    /// Checkpoint → tag names.
    pub tags: BTreeMap<CheckpointId, Vec<String>>,
}

impl Decorations {
    /// Collect the decorations of `repo`.
    pub fn of(repo: &CoinRepo) -> Result<Self, CommandError> {
        let mut branches: BTreeMap<CheckpointId, Vec<String>> = BTreeMap::new();
        for (name, id) in repo.branches()? {
            branches.entry(id).or_default().push(name);
        }
        let mut tags: BTreeMap<CheckpointId, Vec<String>> = BTreeMap::new();
        for (name, id) in repo.tags()? {
            tags.entry(id).or_default().push(name);
        }
        Ok(Decorations { branches, tags })
    }

    /// Branches at `id`.
    pub fn branches(&self, id: CheckpointId) -> Vec<String> {
        self.branches.get(&id).cloned().unwrap_or_default()
    }

    /// Tags at `id`.
    pub fn tags(&self, id: CheckpointId) -> Vec<String> {
        self.tags.get(&id).cloned().unwrap_or_default()
    }
}

/// Eval records as JSON: task → {metric, score, n, ..., source}.
pub fn evals_json(evals: &BTreeMap<String, (EvalRecord, EvalSource)>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (task, (rec, source)) in evals {
        let mut v = serde_json::to_value(rec).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(o) = &mut v {
            o.insert(
                "source".into(),
                serde_json::to_value(source).unwrap_or_default(),
            );
        }
        map.insert(task.clone(), v);
    }
    serde_json::Value::Object(map)
}

/// A unix time as `YYYY-MM-DD HH:MM` UTC.
pub fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn time_format() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00");
        assert_eq!(super::format_time(981_173_106), "2001-02-03 04:05");
    }
}
