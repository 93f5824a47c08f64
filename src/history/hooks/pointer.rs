//! Pointer files (`*.coin`): which checkpoint to materialise where in a work tree.

use git2::Oid;

/// A pointer file: which checkpoint to materialise where.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pointer {
    /// The checkpoint (full 40-hex id).
    pub checkpoint: String,
    /// The directory to materialise it in, relative to the pointer file's directory.
    pub output: String,
}

/// Parse a pointer file (`checkpoint = "<id>"`, `output = "<dir>"`).
pub fn parse_pointer(text: &str) -> Result<(Pointer, Oid), String> {
    let p: Pointer = toml::from_str(text).map_err(|e| e.to_string())?;
    let id = Oid::from_str(&p.checkpoint)
        .ok()
        .filter(|_| p.checkpoint.len() == 40)
        .ok_or_else(|| format!("checkpoint '{}' is not a full 40-hex id", p.checkpoint))?;
    crate::store::check_relative_path(&p.output).map_err(|e| e.to_string())?;
    Ok((p, id))
}
