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
        // a folder without write permission (a stage's `chmod 555`, a `cp -r` of a read-only
        // tree) cannot be emptied: every folder of ours in the tree gets u+w, then once more
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path);
            match fs::remove_dir_all(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r.at(path),
            }
        }
        r => r.at(path),
    }
}

/// Adds u+rwx to every folder below `path` (symlinks not followed), best effort.
fn make_dirs_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mut perm = meta.permissions();
    perm.set_mode(perm.mode() | 0o700);
    let _ = fs::set_permissions(path, perm);
    if let Ok(rd) = fs::read_dir(path) {
        for entry in rd.flatten() {
            make_dirs_writable(&entry.path());
        }
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

    /// A read-only folder inside a tree (a stage's `chmod 555`) does not stop its removal (as
    /// a non-root user; root ignores the permission bits anyway).
    #[test]
    fn remove_tree_removes_read_only_folders() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let t = TestDir::new("readonly");
        let top = t.path().join("entry");
        let inner = top.join("d/e");
        fs::create_dir_all(&inner).at(&inner)?;
        fs::write(inner.join("f"), b"x").at(&inner)?;
        for d in [&inner, &top.join("d")] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o555)).at(d)?;
        }
        remove_tree(&top)?;
        assert!(!top.exists());
        remove_tree(&top)?;
        Ok(())
    }

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
