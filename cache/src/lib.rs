//! # pipe-cache: a content-addressed, crash-safe artifact store
//!
//! This crate knows nothing of stages, YAML or machine learning. It stores
//! directories of files under 32-byte keys that the caller computes, and
//! guarantees that an entry is either fully there or not there at all.
//!
//! ## Brief overview
//!
//! * [`Key`]: an opaque blake3 digest, shown as 64 lowercase hex characters.
//! * [`Store`]: a handle on a store directory; [`Store::open`] creates it.
//! * [`Store::begin`] takes the per-key lock and returns [`Begin::Cached`]
//!   with the committed [`Entry`], or [`Begin::Pending`] with a [`Pending`]
//!   write token. The token is the only way to create an entry: write files
//!   into [`Pending::dir`], then [`Pending::commit`] with a [`ManifestMeta`].
//! * [`Entry`] holds the parsed [`Manifest`]; [`Entry::file`] resolves a file
//!   the manifest lists.
//! * [`Store::verify`] re-hashes entries ([`VerifyProblem`]), [`Store::gc`]
//!   removes entries outside a keep-set ([`GcReport`]).
//! * [`StoreLock`] is the store-wide lock: shared for run/plan, exclusive for gc.
//!
//! ## Layout
//!
//! ```text
//! <root>/VERSION                       "1\n"; anything else is a VersionMismatch
//! <root>/lock                          flock: shared for run/plan, exclusive for gc
//! <root>/entries/ab/ab12…/             committed entries, immutable
//!        manifest.json                 written last; its presence means "committed"
//!        model.safetensors, sub/x.bin  the outputs, any depth
//! <root>/locks/ab12….lock              per-key flock while producing; holds the holder's pid
//! <root>/tmp/ab12….<pid>.<n>/          staging dirs (same filesystem as entries/)
//! <root>/scratch/ab12…/                resumable checkpoints; deleted on commit
//! <root>/failed/ab12….log              log of the last failed attempt at a key
//! <root>/corrupt/ab12….<n>/            damaged entries moved aside (quarantine); gc clears
//! <root>/runs/                         per-pipeline run records, owned by the engine
//! ```
//!
//! ## Commit protocol
//!
//! 1. [`Store::begin`] locks `locks/<hex>.lock` (`File::try_lock`; if held,
//!    reports the holder's pid once and polls every 25 ms, honouring
//!    cancellation), writes its pid into it, and looks the key up again: a
//!    concurrent writer may have committed meanwhile. An entry directory
//!    without a valid manifest is moved aside into `corrupt/`. Staging dirs
//!    `tmp/<hex>.*` left by crashed writers are removed (holding the lock
//!    proves nobody is using them) and a fresh one is created.
//! 2. The producer writes regular files into [`Pending::dir`]. Symlinks,
//!    sockets and a top-level `manifest.json` are refused at commit.
//! 3. [`Pending::commit`] hashes every file (blake3, in parallel), fsyncs it,
//!    writes `manifest.json` last, fsyncs it and the directories, renames the
//!    staging dir to `entries/<hex[..2]>/<hex>` and fsyncs the shard. The
//!    rename is atomic, so readers see no entry or a complete one. If the
//!    target exists, another writer won and its entry is returned.
//!    `scratch/<hex>` is removed and the key lock released.
//! 4. Dropping an uncommitted [`Pending`] (a failed or panicking stage)
//!    deletes its staging dir. A crash leaves only `tmp/` junk, which the
//!    next `begin` of that key or [`Store::gc`] clears.
//!
//! Committed entries are never modified, which is what makes memory-mapping
//! their files safe. A damaged entry (a flipped byte, a lost file, a broken
//! manifest) is never repaired in place: [`Store::quarantine`] re-checks it
//! under its key lock and renames it into `corrupt/`, after which the key is
//! simply absent and gets produced again.
//!
//! ## What a crash can leave
//!
//! Everything the store writes outside `entries/` is either atomic
//! (`VERSION`, `failed/*.log` and the engine's files through
//! [`write_atomic`]) or junk that is safe to delete: staging dirs in `tmp/`
//! (removed by the next `begin` of their key, or by `gc`), stray
//! `.name.tmp.*` files of an interrupted [`write_atomic`], and a `scratch/`
//! dir of a key that did commit (removed by `gc`). Key locks are `flock`s,
//! which the kernel releases when their process dies, so a killed writer
//! never blocks another. [`Store::gc`] renames a doomed entry out of `entries/`
//! before deleting it, for the same all-or-nothing property.
//!
//! ## Example
//!
//! ```
//! use pipe_cache::{Begin, Key, ManifestMeta, Store};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = std::env::temp_dir().join(format!("pipe-cache-doc-{}", std::process::id()));
//! let store = Store::open(&root)?;
//! let key = Key::from_hash(blake3::hash(b"my node's key preimage"));
//!
//! let entry = match store.begin(&key, &|| false, &mut |_holder| {})? {
//!     Begin::Cached(entry) => entry,
//!     Begin::Pending(pending) => {
//!         std::fs::write(pending.dir().join("metrics.json"), b"{\"acc\": 0.9}")?;
//!         pending.commit(ManifestMeta { kind: "demo".into(), ..ManifestMeta::default() })?
//!     }
//! };
//! assert!(store.contains(&key));
//! assert_eq!(entry.manifest.files["metrics.json"].bytes, 12);
//! let metrics = entry.file("metrics.json")?;
//! assert!(metrics.starts_with(store.entry_dir(&key)));
//! # std::fs::remove_dir_all(&root)?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod key;
pub mod manifest;
pub mod store;

mod fsutil;
mod hash;
#[cfg(test)]
mod test_util;

pub use error::{Result, StoreError};
pub use hash::hash_file;
pub use key::Key;
pub use manifest::{FileEntry, MANIFEST_SCHEMA, Manifest, ManifestMeta, now_rfc3339};
pub use store::{Begin, Entry, GcReport, Pending, Store, StoreLock, VerifyProblem, write_atomic};
