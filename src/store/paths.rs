//! The one check for relative paths that come from outside: manifests (commit, fetch, clone,
//! fsck, checkout), pointer files, model index files. Every such path goes through
//! [`check_relative_path`] before it is joined to a directory, as git's `verify_path` does.

use std::path::{Component, Path};

use super::StoreError;

/// Longest accepted path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest accepted path component, in bytes (what common filesystems allow).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Code points HFS+ ignores when it compares names, so `.g\u{200c}it` is `.git` on a Mac.
fn hfs_ignorable(c: char) -> bool {
    matches!(c,
        '\u{200c}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{206a}'..='\u{206f}' | '\u{feff}')
}

/// Whether a path component names git's directory on some filesystem: `.git` in any case,
/// with trailing dots or spaces (dropped by Windows), with HFS+-ignorable code points, as an
/// NTFS alternate data stream (`.git::$INDEX_ALLOCATION`), or as its 8.3 short name `git~1`.
pub fn is_git_component(part: &str) -> bool {
    let base = part.split(':').next().unwrap_or(part);
    let cleaned: String = base
        .chars()
        .filter(|c| !hfs_ignorable(*c))
        .collect::<String>()
        .trim_end_matches(['.', ' '])
        .to_ascii_lowercase();
    cleaned == ".git" || cleaned == "git~1"
}

/// Accept only a plain relative path made of normal components separated by `/`: no empty
/// path, no absolute path or drive prefix, no `.`/`..`, no empty component, no backslash, no
/// NUL or other control character, no component naming git's directory (see
/// [`is_git_component`]), no over-long path or component. Links are the caller's business:
/// a path that passes is only ever joined to a directory coin created or checked itself.
pub fn check_relative_path(path: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::UnsafePath {
        path: path
            .chars()
            .take(200)
            .collect::<String>()
            .escape_debug()
            .to_string(),
        reason: reason.to_string(),
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(bad("path longer than 4096 bytes"));
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
            p if p.len() > MAX_COMPONENT_BYTES => {
                return Err(bad("path component longer than 255 bytes"))
            }
            p if is_git_component(p) => {
                return Err(bad(
                    "a '.git' component (git would read it as repository configuration)",
                ))
            }
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

/// Refuse an output directory inside a git directory: any component of `dir` (made absolute
/// against the current directory, existing part resolved through links) that names git's
/// directory.
pub fn check_output_dir(dir: &Path) -> Result<(), StoreError> {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    // Resolve the longest existing prefix, so a link into a .git directory is seen too.
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(name)) => {
                rest.push(name.to_os_string());
                existing = p;
            }
            _ => break,
        }
    }
    let mut resolved = existing
        .canonicalize()
        .unwrap_or_else(|_| existing.to_path_buf());
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    for candidate in [abs.as_path(), resolved.as_path()] {
        for c in candidate.components() {
            if let Component::Normal(name) = c {
                if is_git_component(&name.to_string_lossy()) {
                    return Err(StoreError::UnsafePath {
                        path: dir.display().to_string().escape_debug().to_string(),
                        reason:
                            "it is inside a '.git' directory; choose a folder outside git's own"
                                .to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        for ok in [
            "a",
            "a/b.json",
            "adapter_model.safetensors",
            "x..y/.hidden",
            ".gitignore",
            "a/.github/x",
            "git",
            "my.git",
        ] {
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

    #[test]
    fn every_spelling_of_the_git_directory_is_refused() {
        for bad in [
            ".git/config",
            ".GIT/config",
            ".Git/hooks/pre-commit",
            "a/.git/config",
            ".git",
            ".git./config",
            ".git /config",
            ".git. . ./config",
            "GIT~1/config",
            "git~1/config",
            ".git::$INDEX_ALLOCATION/config",
            ".g\u{200c}it/config",
            "\u{feff}.git/config",
            ".gi\u{206f}t/hooks",
        ] {
            let err = check_relative_path(bad).expect_err(bad);
            assert!(err.to_string().contains(".git"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn length_limits() {
        let long_part = "a".repeat(256);
        assert!(check_relative_path(&long_part).is_err());
        check_relative_path(&"a".repeat(255)).unwrap();
        let long_path = vec!["abcdefgh"; 600].join("/");
        assert!(check_relative_path(&long_path).is_err());
    }

    #[test]
    fn errors_escape_what_they_show() {
        let err = check_relative_path("a\u{1b}[31mred/..").unwrap_err();
        assert!(!err.to_string().contains('\u{1b}'), "{err}");
    }

    #[test]
    fn output_dirs_inside_git_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path().join(".git");
        std::fs::create_dir(&git).unwrap();
        assert!(check_output_dir(&git.join("hooks")).is_err());
        assert!(check_output_dir(&dir.path().join(".GIT").join("x")).is_err());
        check_output_dir(&dir.path().join("out")).unwrap();
        #[cfg(unix)]
        {
            let link = dir.path().join("innocent");
            std::os::unix::fs::symlink(&git, &link).unwrap();
            assert!(check_output_dir(&link.join("new")).is_err());
        }
    }
}
