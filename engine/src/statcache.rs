//! Content hashes of external input files (a dataset archive, a folder of images), with a stat
//! cache so an unchanged 160 MB archive is not re-hashed on every plan.
//!
//! A cached hash is reused only while the file's size, mtime (ns) and inode are unchanged. A
//! file modified within the last two seconds is hashed but not cached (git's "racily clean"
//! problem: a write in the same mtime tick would go unnoticed). A folder hashes to blake3 over
//! the sorted `relative path \0 file hash \n` lines of every file below it, so renaming or
//! adding a file changes it, and moving the whole folder does not.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    blake3: String,
}

/// Path -> (stat, hash), loaded from and saved to one JSON file.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: BTreeMap<PathBuf, Stat>,
    dirty: bool,
}

impl StatCache {
    /// A cache that lives in memory only.
    pub fn in_memory() -> Self {
        StatCache::default()
    }

    /// Loads the cache at `path` (empty if missing or unreadable: it is only a cache).
    pub fn open(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatCache {
            path: Some(path),
            entries,
            dirty: false,
        }
    }

    /// Saves it if anything changed (atomically; errors are ignored: it is only a cache).
    pub fn save(&mut self) {
        if let (true, Some(path)) = (self.dirty, &self.path)
            && let Ok(bytes) = serde_json::to_vec(&self.entries)
            && pipe_cache::write_atomic(path, &bytes).is_ok()
        {
            self.dirty = false;
        }
    }

    fn file_hash(&mut self, path: &Path, meta: &std::fs::Metadata) -> std::io::Result<String> {
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        if let Some(s) = self.entries.get(path)
            && s.size == meta.len()
            && s.mtime_ns == mtime_ns
            && s.ino == meta.ino()
        {
            return Ok(s.blake3.clone());
        }
        let (hash, _) =
            pipe_cache::hash_file(path).map_err(|e| std::io::Error::other(e.to_string()))?;
        let recent = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < Duration::from_secs(2));
        if !recent {
            self.entries.insert(
                path.to_path_buf(),
                Stat {
                    size: meta.len(),
                    mtime_ns,
                    ino: meta.ino(),
                    blake3: hash.clone(),
                },
            );
            self.dirty = true;
        }
        Ok(hash)
    }

    /// blake3 (hex) of a file's content, or of a folder's tree (symlinks are followed).
    ///
    /// # Errors
    /// When the path or something below it cannot be read (the message names it).
    pub fn hash(&mut self, path: &Path) -> Result<String, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_file() {
            return self
                .file_hash(path, &meta)
                .map_err(|e| format!("{}: {e}", path.display()));
        }
        if !meta.is_dir() {
            return Err(format!("{}: not a file or folder", path.display()));
        }
        let mut files = Vec::new();
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for entry in rd {
                let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
                let p = entry.path();
                let m = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                if m.is_dir() {
                    stack.push(p);
                } else if m.is_file() {
                    files.push((p, m));
                }
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = blake3::Hasher::new();
        for (p, m) in &files {
            let fh = self
                .file_hash(p, m)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let rel = p.strip_prefix(path).unwrap_or(p);
            h.update(rel.to_string_lossy().as_bytes());
            h.update(b"\0");
            h.update(fh.as_bytes());
            h.update(b"\n");
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_hash_follows_content_not_location() {
        let base = std::env::temp_dir().join(format!("pipe-statcache-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d.join("sub")).expect("mkdir");
            std::fs::write(d.join("x.txt"), "hello").expect("write");
            std::fs::write(d.join("sub/y.txt"), "world").expect("write");
        }
        let mut c = StatCache::in_memory();
        let ha = c.hash(&a).expect("hash");
        assert_eq!(ha, c.hash(&b).expect("hash"));
        std::fs::write(b.join("sub/y.txt"), "World").expect("write");
        assert_ne!(ha, c.hash(&b).expect("hash"));
        assert_eq!(
            c.hash(&a.join("x.txt")).expect("hash"),
            blake3::hash(b"hello").to_hex().to_string()
        );
        assert!(
            c.hash(&base.join("missing"))
                .expect_err("missing")
                .contains("missing")
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
