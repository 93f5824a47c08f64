//! Atomic file writes: every file coin writes goes through here (sibling temp file, fsync,
//! rename, best-effort fsync of the parent directory), so a crash never leaves a half-written
//! file at a final path.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file being written atomically. Nothing appears at `path` until [`AtomicFile::commit`];
/// dropping it without committing removes the temp file.
pub struct AtomicFile {
    path: PathBuf,
    temp: tempfile::NamedTempFile,
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl AtomicFile {
    /// Start writing `path`; the temp file is created in the same directory.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut builder = tempfile::Builder::new();
        builder.prefix(".coin-tmp-");
        // tempfile creates 0600 files; files coin writes for the user get the usual 0644.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let temp = builder.tempfile_in(parent_of(&path))?;
        Ok(AtomicFile { path, temp })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open temp file.
    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// fsync the data, rename over the final path and fsync the directory.
    pub fn commit(self) -> io::Result<()> {
        self.temp.as_file().sync_all()?;
        let AtomicFile { path, temp } = self;
        temp.persist(&path).map_err(|e| e.error)?;
        sync_dir(parent_of(&path));
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

/// Write `contents` to `path` atomically.
pub fn write_atomic(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(contents.as_ref())?;
    f.commit()
}

/// Best-effort fsync of a directory, so a rename inside it is durable.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644);
        }
    }

    #[test]
    fn dropped_without_commit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.txt");
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
