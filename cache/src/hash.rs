//! File hashing with blake3 and the directory walk shared by commit and verify.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// Files larger than this are memory-mapped instead of read.
const MMAP_ABOVE: u64 = 1 << 20;
/// Files larger than this are memory-mapped and hashed on the rayon pool.
const RAYON_ABOVE: u64 = 16 << 20;

/// Hashes one file with blake3; returns (lowercase hex digest, size in bytes).
///
/// Small files are read, files above 1 MiB are memory-mapped and files above
/// 16 MiB are additionally hashed in parallel on the rayon pool. The size is
/// the number of bytes actually hashed.
///
/// # Errors
///
/// [`StoreError::Io`](crate::StoreError::Io) naming `path` if it cannot be read.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let len = fs::metadata(path).at(path)?.len();
    let mut hasher = blake3::Hasher::new();
    if len > RAYON_ABOVE {
        hasher.update_mmap_rayon(path).at(path)?;
    } else if len > MMAP_ABOVE {
        hasher.update_mmap(path).at(path)?;
    } else {
        let file = File::open(path).at(path)?;
        hasher.update_reader(file).at(path)?;
    }
    Ok((hasher.finalize().to_hex().to_string(), hasher.count()))
}

/// What a recursive walk of a directory found.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    /// Regular files: (relative path with `/` separators, full path), sorted.
    pub files: Vec<(String, PathBuf)>,
    /// Anything that is neither a regular file nor a directory, or whose name
    /// is not UTF-8: (relative path, full path, why it is refused).
    pub others: Vec<(String, PathBuf, &'static str)>,
    /// Every directory, the root first.
    pub dirs: Vec<PathBuf>,
}

/// Lists everything under `root` without following symlinks.
pub(crate) fn walk(root: &Path) -> Result<Walk> {
    let mut out = Walk::default();
    let mut stack: Vec<(String, PathBuf)> = vec![(String::new(), root.to_path_buf())];
    while let Some((prefix, dir)) = stack.pop() {
        for item in fs::read_dir(&dir).at(&dir)? {
            let item = item.at(&dir)?;
            let path = item.path();
            let ty = item.file_type().at(&path)?;
            let name = match item.file_name().into_string() {
                Ok(n) => n,
                Err(raw) => {
                    let rel = format!("{prefix}{}", raw.to_string_lossy());
                    out.others.push((rel, path, "file name is not valid utf-8"));
                    continue;
                }
            };
            let rel = format!("{prefix}{name}");
            if ty.is_dir() {
                stack.push((format!("{rel}/"), path));
            } else if ty.is_file() {
                out.files.push((rel, path));
            } else if ty.is_symlink() {
                out.others
                    .push((rel, path, "symbolic links are not allowed"));
            } else {
                out.others
                    .push((rel, path, "not a regular file or directory"));
            }
        }
        out.dirs.push(dir);
    }
    out.files.sort();
    out.others.sort();
    Ok(out)
}

/// Total size of the regular files under `path` (0 if it does not exist).
pub(crate) fn tree_size(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => walk(path)
            .map(|w| {
                w.files
                    .iter()
                    .filter_map(|(_, p)| fs::symlink_metadata(p).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestDir;

    #[test]
    fn hash_small_and_large_files() -> Result<()> {
        let t = TestDir::new("hash");
        for size in [0usize, 5, (1 << 20) + 3, (16 << 20) + 7] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let p = t.path().join(format!("f{size}"));
            fs::write(&p, &data).at(&p)?;
            let (hex, n) = hash_file(&p)?;
            assert_eq!(n, size as u64);
            assert_eq!(hex, blake3::hash(&data).to_hex().as_str(), "size {size}");
        }
        Ok(())
    }

    #[test]
    fn hash_missing_file_names_path() {
        let p = std::env::temp_dir().join("pipe-cache-definitely-missing-file");
        match hash_file(&p) {
            Err(e) => assert!(e.to_string().contains("pipe-cache-definitely-missing-file")),
            Ok(_) => panic!("hashed a missing file"),
        }
    }

    #[test]
    fn walk_lists_nested_files_and_symlinks() -> Result<()> {
        let t = TestDir::new("walk");
        let root = t.path();
        fs::create_dir_all(root.join("a/b")).at(root)?;
        fs::write(root.join("top.txt"), b"1").at(root)?;
        fs::write(root.join("a/b/deep.txt"), b"22").at(root)?;
        std::os::unix::fs::symlink("top.txt", root.join("link")).at(root)?;
        let w = walk(root)?;
        let names: Vec<&str> = w.files.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(names, ["a/b/deep.txt", "top.txt"]);
        assert_eq!(w.others.len(), 1);
        assert_eq!(w.others[0].0, "link");
        assert_eq!(w.dirs.len(), 3);
        assert_eq!(tree_size(root), 3);
        Ok(())
    }
}
