//! Checks for relative paths that come from manifests or other untrusted input, before
//! they are joined to an output directory.

use std::path::{Component, Path};

use super::StoreError;

/// Accept only a plain relative path made of normal components separated by `/`: no empty
/// path, no absolute path or drive prefix, no `.`/`..`, no empty component, no backslash,
/// no NUL or other control character.
pub fn check_relative_path(path: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::UnsafePath {
        path: path.chars().take(200).collect(),
        reason: reason.to_string(),
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(bad("control character in path"));
    }
    if path.contains('\\') {
        return Err(bad("backslash in path"));
    }
    if path.starts_with('/') {
        return Err(bad("absolute path"));
    }
    for part in path.split('/') {
        match part {
            "" => return Err(bad("empty path component")),
            "." | ".." => return Err(bad("'.' or '..' component")),
            _ => {}
        }
    }
    if !Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(bad("not a plain relative path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        for ok in ["a", "a/b.json", "adapter_model.safetensors", "x..y/.hidden"] {
            check_relative_path(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "..",
            "a\\..\\b",
            "a\0b",
            "a\nb",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
