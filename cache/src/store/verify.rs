//! `Store::verify`: re-hash committed entries against their manifests.

use std::collections::BTreeSet;
use std::fmt;

use rayon::prelude::*;

use super::Store;
use crate::error::Result;
use crate::hash::{hash_file, walk};
use crate::key::Key;
use crate::manifest::MANIFEST_FILE;

/// One thing wrong with a committed entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyProblem {
    /// The manifest is missing, unreadable or invalid, or the entry is absent.
    UnreadableManifest {
        /// The entry.
        key: Key,
        /// What went wrong.
        reason: String,
    },
    /// A file listed in the manifest is not on disk as a regular file.
    MissingFile {
        /// The entry.
        key: Key,
        /// Relative path from the manifest.
        file: String,
    },
    /// A file's contents no longer match the manifest (or cannot be read).
    HashMismatch {
        /// The entry.
        key: Key,
        /// Relative path from the manifest.
        file: String,
        /// blake3 recorded in the manifest.
        expected: String,
        /// blake3 of the file now, or why it could not be hashed.
        actual: String,
    },
    /// Something on disk in the entry is not listed in the manifest.
    ExtraFile {
        /// The entry.
        key: Key,
        /// Relative path on disk.
        file: String,
    },
}

impl VerifyProblem {
    /// The entry the problem is about.
    pub fn key(&self) -> &Key {
        match self {
            VerifyProblem::UnreadableManifest { key, .. }
            | VerifyProblem::MissingFile { key, .. }
            | VerifyProblem::HashMismatch { key, .. }
            | VerifyProblem::ExtraFile { key, .. } => key,
        }
    }

    /// The file the problem is about, if it concerns one file.
    pub fn file(&self) -> Option<&str> {
        match self {
            VerifyProblem::UnreadableManifest { .. } => None,
            VerifyProblem::MissingFile { file, .. }
            | VerifyProblem::HashMismatch { file, .. }
            | VerifyProblem::ExtraFile { file, .. } => Some(file),
        }
    }
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyProblem::UnreadableManifest { key, reason } => {
                write!(f, "entry {key}: unreadable manifest: {reason}")
            }
            VerifyProblem::MissingFile { key, file } => {
                write!(f, "entry {key}: file {file} is missing")
            }
            VerifyProblem::HashMismatch {
                key,
                file,
                expected,
                actual,
            } => write!(
                f,
                "entry {key}: file {file} has blake3 {actual}, manifest says {expected}"
            ),
            VerifyProblem::ExtraFile { key, file } => {
                write!(f, "entry {key}: file {file} is not listed in the manifest")
            }
        }
    }
}

impl Store {
    /// Re-hashes the files of the given entries (all committed entries when
    /// `None`) in parallel and reports every problem found, sorted by key and
    /// file. A clean store gives an empty list. A requested key with no entry
    /// is reported as [`VerifyProblem::UnreadableManifest`].
    ///
    /// # Errors
    ///
    /// Only if the list of entries cannot be read; problems with individual
    /// entries are reported, not returned as errors.
    pub fn verify(&self, keys: Option<&[Key]>) -> Result<Vec<VerifyProblem>> {
        let keys = match keys {
            Some(k) => k.to_vec(),
            None => self.keys()?,
        };
        let mut problems: Vec<VerifyProblem> = keys
            .par_iter()
            .flat_map_iter(|key| self.verify_one(key))
            .collect();
        problems.sort_by(|a, b| (a.key(), a.file()).cmp(&(b.key(), b.file())));
        Ok(problems)
    }

    pub(crate) fn verify_one(&self, key: &Key) -> Vec<VerifyProblem> {
        let unreadable =
            |reason: String| vec![VerifyProblem::UnreadableManifest { key: *key, reason }];
        let entry = match self.get(key) {
            Ok(Some(entry)) => entry,
            Ok(None) if self.entry_dir(key).is_dir() => {
                return unreadable("manifest.json is missing".to_string());
            }
            Ok(None) => return unreadable("entry is not in the store".to_string()),
            Err(e) => return unreadable(e.to_string()),
        };
        let tree = match walk(&entry.dir) {
            Ok(t) => t,
            Err(e) => return unreadable(format!("cannot list entry: {e}")),
        };
        let on_disk: BTreeSet<&str> = tree
            .files
            .iter()
            .map(|(rel, _)| rel.as_str())
            .filter(|rel| *rel != MANIFEST_FILE)
            .collect();
        let mut problems: Vec<VerifyProblem> = entry
            .manifest
            .files
            .par_iter()
            .filter_map(|(name, expected)| {
                if !on_disk.contains(name.as_str()) {
                    return Some(VerifyProblem::MissingFile {
                        key: *key,
                        file: name.clone(),
                    });
                }
                let actual = match hash_file(&entry.dir.join(name)) {
                    Ok((hex, _)) if hex == expected.blake3 => return None,
                    Ok((hex, _)) => hex,
                    Err(e) => format!("unreadable ({e})"),
                };
                Some(VerifyProblem::HashMismatch {
                    key: *key,
                    file: name.clone(),
                    expected: expected.blake3.clone(),
                    actual,
                })
            })
            .collect();
        let extra_files = on_disk
            .iter()
            .copied()
            .filter(|rel| !entry.manifest.files.contains_key(*rel));
        let extra_others = tree
            .others
            .iter()
            .map(|(rel, _, _)| rel.as_str())
            .filter(|rel| !entry.manifest.files.contains_key(*rel));
        problems.extend(
            extra_files
                .chain(extra_others)
                .map(|rel| VerifyProblem::ExtraFile {
                    key: *key,
                    file: rel.to_string(),
                }),
        );
        problems
    }
}
