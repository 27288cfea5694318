//! Content hashes of external input files (a dataset archive, a folder of images), with a stat
//! cache so an unchanged 160 MB archive is not re-hashed on every plan.
//!
//! A cached hash is reused only while the file's size, mtime (ns), ctime (ns), inode and device
//! are unchanged. The ctime is what catches a same-size rewrite in place that keeps the mtime
//! (`cp --preserve=timestamps`, `rsync -t --inplace`, a reproducible archive extracted over
//! another): no program can set it, and every write or mtime change moves it. A file changed
//! (mtime or ctime) within the last two seconds is hashed but not cached (git's "racily clean"
//! problem: a write in the same tick would go unnoticed). A folder hashes to blake3 over
//! the sorted `relative path \0 file hash \n` lines of every file below it, so renaming or
//! adding a file changes it, and moving the whole folder does not.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// What a cached hash was taken under. A cache file written before `ctime_ns` and `dev` were
/// fields does not parse, so it is dropped and every file hashed once more.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
    blake3: String,
}

impl Stat {
    /// The stat of `meta`, with `blake3` left empty.
    fn of(meta: &std::fs::Metadata) -> Stat {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stat {
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
            blake3: String::new(),
        }
    }

    /// The same file, unchanged since `self` was taken.
    fn same_file(&self, now: &Stat) -> bool {
        (self.size, self.mtime_ns, self.ctime_ns, self.ino, self.dev)
            == (now.size, now.mtime_ns, now.ctime_ns, now.ino, now.dev)
    }
}

/// Files changed more recently than this are hashed but not cached.
const RACY: Duration = Duration::from_secs(2);

/// Path -> (stat, hash), loaded from and saved to one JSON file.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: BTreeMap<PathBuf, Stat>,
    dirty: bool,
    /// [`RACY`] (zero in tests).
    racy: Duration,
}

impl StatCache {
    /// A cache that lives in memory only.
    pub fn in_memory() -> Self {
        StatCache {
            racy: RACY,
            ..StatCache::default()
        }
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
            racy: RACY,
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
        let now = Stat::of(meta);
        if let Some(s) = self.entries.get(path)
            && s.same_file(&now)
        {
            return Ok(s.blake3.clone());
        }
        let (hash, _) =
            pipe_cache::hash_file(path).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Racily clean: a change in the tick of the stat would go unnoticed.
        let changed_ns = now.mtime_ns.max(now.ctime_ns);
        let now_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        if now_ns - changed_ns >= self.racy.as_nanos() as i128 {
            self.entries.insert(
                path.to_path_buf(),
                Stat {
                    blake3: hash.clone(),
                    ..now
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

    /// A same-size rewrite in place that puts the old mtime back (`cp --preserve=timestamps`,
    /// a reproducible archive extracted over another) keeps size, mtime and inode: the ctime
    /// gives it away.
    #[test]
    fn a_same_size_rewrite_with_the_old_mtime_is_hashed_again() {
        let base = std::env::temp_dir().join(format!("pipe-statcache-ct-{}", std::process::id()));
        std::fs::create_dir_all(&base).expect("mkdir");
        let f = base.join("batch.bin");
        let old = SystemTime::now() - Duration::from_secs(3600);
        let write = |bytes: &[u8]| {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&f)
                .expect("open");
            std::io::Write::write_all(&mut &file, bytes).expect("write");
            file.set_modified(old).expect("set mtime");
        };
        write(b"aaaa");
        let mut c = StatCache::in_memory();
        c.racy = Duration::ZERO;
        let a = c.hash(&f).expect("hash");
        assert_eq!(a, blake3::hash(b"aaaa").to_hex().to_string());
        assert!(c.entries.contains_key(&f), "cached");
        let ino = std::fs::metadata(&f).expect("stat").ino();
        // ctime has a tick of its own: make sure the rewrite lands in a later one
        std::thread::sleep(Duration::from_millis(20));
        write(b"bbbb");
        let meta = std::fs::metadata(&f).expect("stat");
        assert_eq!(
            (meta.len(), meta.ino()),
            (4, ino),
            "the premise: same size, same inode"
        );
        assert_eq!(
            Stat::of(&meta).mtime_ns,
            c.entries[&f].mtime_ns,
            "and the same mtime"
        );
        assert_eq!(
            c.hash(&f).expect("hash"),
            blake3::hash(b"bbbb").to_hex().to_string()
        );
        // an unchanged file is served from the cache
        c.entries.get_mut(&f).expect("cached").blake3 = "sentinel".into();
        assert_eq!(c.hash(&f).expect("hash"), "sentinel");
        let _ = std::fs::remove_dir_all(&base);
    }
}
