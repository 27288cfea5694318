//! Small filesystem helpers: atomic writes, directory fsync, pid files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{IoContext, Result, StoreError};

/// Process-wide counter making temporary names unique across threads and `Store` handles.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh number for a temporary name.
pub(crate) fn next_id() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// fsyncs a directory so that entries created or renamed in it are durable.
///
/// Filesystems that cannot fsync a directory (`EINVAL`) are tolerated.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir).and_then(|f| f.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        r => r.at(dir),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory is written and fsynced, renamed over `path`, and the directory
/// is fsynced. Readers see the old contents or the new, never a mix.
///
/// # Errors
///
/// [`StoreError::Io`] naming the file that failed; the temporary is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| StoreError::Io {
        path: path.to_path_buf(),
        cause: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
    })?;
    let parent = path.parent().unwrap_or(Path::new(""));
    let tmp: PathBuf = parent.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        next_id()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        fs::rename(&tmp, path).at(path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(parent)
}

/// Removes a directory tree; a missing one is fine.
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.at(path),
    }
}

/// Removes a file; a missing one is fine.
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.at(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestDir;

    #[test]
    fn write_atomic_creates_and_replaces() -> Result<()> {
        let t = TestDir::new("atomic");
        let p = t.path().join("f.txt");
        write_atomic(&p, b"one")?;
        assert_eq!(fs::read(&p).at(&p)?, b"one");
        write_atomic(&p, b"two!")?;
        assert_eq!(fs::read(&p).at(&p)?, b"two!");
        let names: Vec<_> = fs::read_dir(t.path())
            .at(t.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["f.txt"], "temporary file left behind");
        Ok(())
    }

    #[test]
    fn write_atomic_into_missing_dir_names_path() {
        let t = TestDir::new("atomic-missing");
        let p = t.path().join("nope/f.txt");
        let err = write_atomic(&p, b"x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("nope"), "{err}");
    }
}
