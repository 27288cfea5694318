//! `Store::gc`: remove every entry outside a keep-set, plus staging leftovers.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};

use super::Store;
use crate::error::{IoContext, Result};
use crate::fsutil::{next_id, remove_file, remove_tree};
use crate::hash::tree_size;
use crate::key::Key;

/// What [`Store::gc`] removed (or, for a dry run, would remove).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries removed, sorted.
    pub removed: Vec<Key>,
    /// Number of committed entries kept.
    pub kept: usize,
    /// Bytes of regular files freed: removed entries, their scratch dirs and
    /// `tmp/` leftovers.
    pub freed_bytes: u64,
    /// Leftover items removed from `tmp/`.
    pub tmp_removed: usize,
    /// Damaged entries removed from `corrupt/` (moved there by
    /// [`Store::quarantine`] or [`Store::begin`]).
    pub corrupt_removed: usize,
    /// `scratch/<hex>` dirs removed because their key is committed (a crash
    /// between commit and scratch cleanup leaves them).
    pub stale_scratch_removed: usize,
    /// Files of `jobs/` (`<hex>.json`, `<hex>.out`: what the Slurm executor wrote for a
    /// key) removed because their key is not kept or is committed.
    pub jobs_removed: usize,
    /// `scratch/<hex>` dirs of unfinished keys outside the keep-set (the training states and
    /// batch journals of interrupted nodes no kept pipeline has), with their bytes: removed
    /// only when [`Store::gc_unfinished`] is asked to, else reported.
    pub unfinished_scratch: usize,
    /// Their size in bytes (counted in `freed_bytes` only when they are removed).
    pub unfinished_scratch_bytes: u64,
}

impl Store {
    /// Removes every committed entry whose key is not in `keep`.
    ///
    /// Takes the exclusive store lock first (a dry run takes it shared, so it
    /// does not wait for running pipelines); do not call it while this process
    /// holds a [`StoreLock`](crate::StoreLock) on the same store, or it waits
    /// for itself. Each removed entry is first renamed out of `entries/` into
    /// `tmp/` and only then deleted, so a crash never leaves a half entry
    /// behind. The scratch dir, failed log and unlocked key-lock file of each
    /// removed key go too, as does everything in `tmp/` whose key lock is not
    /// currently held, everything in `corrupt/`, and the scratch dirs of kept
    /// (committed) keys. With `dry_run`, nothing is removed and the report
    /// says what would be.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`](crate::StoreError::Io) naming the path that could not be removed.
    pub fn gc(&self, keep: &BTreeSet<Key>, dry_run: bool) -> Result<GcReport> {
        self.gc_unfinished(keep, dry_run, false)
    }

    /// [`Store::gc`], and with `unfinished` also the scratch dirs (resumable training states,
    /// batch journals) of keys outside `keep` that are not committed and whose key lock is
    /// free: the work of interrupted nodes that no kept pipeline has any more. Without
    /// `unfinished` they are counted in the report and left alone.
    ///
    /// # Errors
    ///
    /// As [`Store::gc`].
    pub fn gc_unfinished(
        &self,
        keep: &BTreeSet<Key>,
        dry_run: bool,
        unfinished: bool,
    ) -> Result<GcReport> {
        let _lock = if dry_run {
            self.lock_shared()?
        } else {
            self.lock_exclusive()?
        };
        let mut report = GcReport::default();
        let keys = self.keys()?;
        for key in keys {
            if keep.contains(&key) {
                report.kept += 1;
                continue;
            }
            let dir = self.entry_dir(&key);
            let scratch = self.scratch_path(&key);
            report.freed_bytes += tree_size(&dir) + tree_size(&scratch);
            report.removed.push(key);
            if dry_run {
                continue;
            }
            let doomed = self.root.join("tmp").join(format!(
                "gc-{}.{}.{}",
                key.hex(),
                std::process::id(),
                next_id()
            ));
            fs::rename(&dir, &doomed).at(&dir)?;
            remove_tree(&doomed)?;
            remove_tree(&scratch)?;
            remove_file(&self.failed_path(&key))?;
            self.remove_lock_file_if_free(&key)?;
            tracing::debug!(key = %key.short(), "gc removed entry");
        }

        let corrupt = self.root.join("corrupt");
        if corrupt.is_dir() {
            for item in fs::read_dir(&corrupt).at(&corrupt)? {
                let path = item.at(&corrupt)?.path();
                report.freed_bytes += tree_size(&path);
                report.corrupt_removed += 1;
                if !dry_run {
                    remove_tree_or_file(&path)?;
                }
            }
        }

        let scratch = self.root.join("scratch");
        for item in fs::read_dir(&scratch).at(&scratch)? {
            let path = item.at(&scratch)?.path();
            let Some(key) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<Key>().ok())
            else {
                continue;
            };
            let kept = keep.contains(&key);
            if kept && self.contains(&key) {
                report.freed_bytes += tree_size(&path);
                report.stale_scratch_removed += 1;
                if !dry_run {
                    remove_tree_or_file(&path)?;
                }
            } else if !kept && !self.key_lock_held(&key) {
                let bytes = tree_size(&path);
                report.unfinished_scratch += 1;
                report.unfinished_scratch_bytes += bytes;
                if unfinished {
                    report.freed_bytes += bytes;
                    if !dry_run {
                        remove_tree_or_file(&path)?;
                    }
                }
            }
        }

        let tmp = self.root.join("tmp");
        for item in fs::read_dir(&tmp).at(&tmp)? {
            let item = item.at(&tmp)?;
            let name = item.file_name().to_string_lossy().into_owned();
            let in_use = name
                .get(..64)
                .and_then(|hex| hex.parse::<Key>().ok())
                .is_some_and(|key| self.key_lock_held(&key));
            if in_use {
                continue;
            }
            let path = item.path();
            report.freed_bytes += tree_size(&path);
            report.tmp_removed += 1;
            if dry_run {
                continue;
            }
            remove_tree_or_file(&path)?;
        }
        // the Slurm executor's job files: those of failed jobs of kept keys stay (`pipe exec`
        // reruns them, and their output says what went wrong)
        let jobs = self.root.join("jobs");
        if jobs.is_dir() {
            for item in fs::read_dir(&jobs).at(&jobs)? {
                let item = item.at(&jobs)?;
                let name = item.file_name().to_string_lossy().into_owned();
                let stale = name
                    .get(..64)
                    .and_then(|hex| hex.parse::<Key>().ok())
                    .is_some_and(|key| !keep.contains(&key) || self.contains(&key));
                if !stale {
                    continue;
                }
                let path = item.path();
                report.freed_bytes += tree_size(&path);
                report.jobs_removed += 1;
                if !dry_run {
                    remove_tree_or_file(&path)?;
                }
            }
        }
        tracing::info!(
            removed = report.removed.len(),
            kept = report.kept,
            freed_bytes = report.freed_bytes,
            tmp_removed = report.tmp_removed,
            corrupt_removed = report.corrupt_removed,
            dry_run,
            "gc finished"
        );
        Ok(report)
    }

    /// Whether some process (this one included) holds the key lock right now.
    fn key_lock_held(&self, key: &Key) -> bool {
        let Ok(file) = OpenOptions::new().write(true).open(self.lock_path(key)) else {
            return false;
        };
        matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock))
    }

    /// Deletes `locks/<hex>.lock` while holding it, unless someone else does.
    fn remove_lock_file_if_free(&self, key: &Key) -> Result<()> {
        let path = self.lock_path(key);
        let Ok(file) = OpenOptions::new().write(true).open(&path) else {
            return Ok(());
        };
        if file.try_lock().is_ok() {
            remove_file(&path)?;
        }
        Ok(())
    }
}

/// Removes a directory tree or a single file (without following symlinks).
fn remove_tree_or_file(path: &std::path::Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => remove_tree(path),
        Ok(_) => remove_file(path),
        Err(_) => Ok(()),
    }
}
