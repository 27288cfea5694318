//! `StoreError`, the one error type of this crate, and its `Result` alias.

use std::path::PathBuf;

use crate::key::Key;

/// Everything that can go wrong in the store.
///
/// Every variant that concerns a file names its path, so a message such as
/// "no space left on device" or "read-only file system" always says where.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on `path` failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory the operation was about.
        path: PathBuf,
        /// The operating system's error.
        cause: std::io::Error,
    },
    /// Data in the store exists but cannot be trusted (bad manifest, wrong key, ...).
    #[error("{path}: corrupt store data: {reason}")]
    Corrupt {
        /// The offending file or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The store's `VERSION` file names a layout this build does not understand.
    #[error("{path}: store version is {found:?}, this build expects {expected:?}")]
    VersionMismatch {
        /// The `VERSION` file.
        path: PathBuf,
        /// What it holds (trimmed).
        found: String,
        /// What this build writes.
        expected: String,
    },
    /// A string that should be a key is not 64 hex characters.
    #[error("invalid key {text:?}: expected 64 hex characters")]
    BadKey {
        /// The rejected text.
        text: String,
    },
    /// The caller cancelled while waiting for a lock.
    #[error("cancelled while waiting for a lock")]
    Cancelled,
    /// A staging directory holds something that cannot be committed.
    #[error("{path}: cannot commit output: {reason}")]
    UnsafeOutput {
        /// The offending file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// [`Entry::file`](crate::Entry::file) was asked for a file its manifest does not list.
    #[error("entry {} has no file {file:?} in its manifest", key.short())]
    NotInManifest {
        /// The entry.
        key: Key,
        /// The requested relative path.
        file: String,
    },
    /// The metadata handed to [`Pending::commit`](crate::Pending::commit) cannot be stored.
    #[error("entry {}: invalid manifest metadata: {reason}", key.short())]
    InvalidMeta {
        /// The entry being committed.
        key: Key,
        /// What is wrong.
        reason: String,
    },
}

/// `Result` with [`StoreError`] as the default error.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attaches a path to an `io::Result`, turning it into a [`StoreError::Io`].
pub(crate) trait IoContext<T> {
    /// Converts the error, naming `path`.
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|cause| StoreError::Io {
            path: path.to_path_buf(),
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_names_path() {
        let err: Result<()> =
            Err(std::io::Error::other("disk on fire")).at(std::path::Path::new("/x/y"));
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(msg, "/x/y: disk on fire");
    }

    #[test]
    fn messages_are_lowercase_without_period() {
        let errs = [
            StoreError::Cancelled,
            StoreError::BadKey { text: "zz".into() },
            StoreError::NotInManifest {
                key: Key::from_bytes([7; 32]),
                file: "a.bin".into(),
            },
        ];
        for e in errs {
            let m = e.to_string();
            assert!(!m.ends_with('.'), "{m}");
            assert!(m.chars().next().is_some_and(|c| !c.is_uppercase()), "{m}");
        }
    }
}
