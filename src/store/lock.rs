//! An advisory lock on a file (`flock` through std's `File::lock`), released on drop.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;

/// A held lock. The lock file is left in place (removing it would race with other waiters).
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// Take the exclusive lock on `path` (created if missing), waiting up to `wait`.
    /// Fails with [`StoreError::Locked`] when another process still holds it then.
    pub fn acquire(path: &Path, wait: Duration) -> Result<Lock, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open the lock file", path, e))?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(Lock {
                        file,
                        path: path.to_path_buf(),
                    })
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    if start.elapsed() >= wait {
                        return Err(StoreError::Locked {
                            path: path.to_path_buf(),
                            waited: wait,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::io("lock", path, e));
                }
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlock explicitly to not depend on that.
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_then_fails_and_gets_it_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("repo.lock");
        let first = Lock::acquire(&p, Duration::ZERO).unwrap();
        let err = Lock::acquire(&p, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }));
        assert!(err.to_string().contains("repo.lock"), "{err}");
        drop(first);
        let again = Lock::acquire(&p, Duration::ZERO).unwrap();
        assert_eq!(again.path(), p);
    }

    #[test]
    fn missing_directory_names_the_path() {
        let err = Lock::acquire(Path::new("/nonexistent-dir/x.lock"), Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/x.lock"), "{err}");
    }
}
