//! `Store`: the on-disk, content-addressed entry store, its locks and the
//! `Pending` write token. See the crate docs for the layout and the commit
//! protocol.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rayon::prelude::*;

use crate::error::{IoContext, Result, StoreError};
use crate::fsutil::{next_id, remove_file, remove_tree, sync_dir};
use crate::hash::{hash_file, walk};
use crate::key::Key;
use crate::manifest::{FileEntry, MANIFEST_FILE, MANIFEST_SCHEMA, Manifest, ManifestMeta};

mod gc;
mod verify;

pub use crate::fsutil::write_atomic;
pub use gc::GcReport;
pub use verify::VerifyProblem;

/// Contents of `VERSION` (without the newline) for the layout this crate writes.
const STORE_VERSION: &str = "1";
/// Subdirectories created by [`Store::open`].
const DIRS: [&str; 7] = [
    "entries", "locks", "tmp", "scratch", "failed", "runs", "corrupt",
];
/// How often [`Store::begin`] retries a held key lock.
const POLL: Duration = Duration::from_millis(25);

/// A handle on a store directory. Cheap to clone; holds no open files.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// Opened with [`Store::open_read_only`]: nothing is created or written, not even the lock.
    read_only: bool,
}

/// Outcome of [`Store::begin`].
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "built once per node; `Cached(Entry)` unboxed is the agreed API"
)]
pub enum Begin {
    /// The key is already committed; nothing to do.
    Cached(Entry),
    /// The caller holds the key lock and must produce the entry.
    Pending(Pending),
}

/// A committed, immutable entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its key.
    pub key: Key,
    /// `root/entries/<hex[..2]>/<hex>`.
    pub dir: PathBuf,
    /// Its parsed and checked `manifest.json`.
    pub manifest: Manifest,
}

/// The write token for one key: a staging directory plus the key lock.
///
/// The only way to create an entry is [`Pending::commit`]. Dropping an
/// uncommitted `Pending` deletes the staging directory and releases the lock.
#[derive(Debug)]
pub struct Pending {
    store: Store,
    key: Key,
    dir: PathBuf,
    committed: bool,
    // Declared last so it is closed (and the flock released) after `dir` is
    // removed in `Drop`: nobody can see our half-written staging dir unlocked.
    _lock: File,
}

/// A shared or exclusive lock on the whole store (`root/lock`), released on drop.
#[derive(Debug)]
pub struct StoreLock {
    /// `None` for a read-only store without a `lock` file (none can be created there).
    _file: Option<File>,
}

impl Store {
    /// Opens (creating if needed) a store at `root`.
    ///
    /// Creates `entries/`, `locks/`, `tmp/`, `scratch/`, `failed/`, `runs/`,
    /// `corrupt/`, the `lock` file and `VERSION` (holding `1`), then checks that `root` is
    /// writable by creating and removing a probe file in `tmp/`.
    ///
    /// # Errors
    ///
    /// [`StoreError::VersionMismatch`] if `VERSION` holds anything but `1`;
    /// [`StoreError::Io`] naming the path that could not be created or written.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        // Absolute, so every path handed out (staging dirs, entries) stays valid for a stage
        // that runs in another working directory (shell stages run in the pipeline's folder).
        let root = std::path::absolute(&root).at(&root)?;
        fs::create_dir_all(&root).at(&root)?;
        for d in DIRS {
            let p = root.join(d);
            fs::create_dir_all(&p).at(&p)?;
        }
        let vpath = root.join("VERSION");
        match fs::read_to_string(&vpath) {
            Ok(found) => {
                if found.trim_end() != STORE_VERSION {
                    return Err(StoreError::VersionMismatch {
                        path: vpath,
                        found: found.trim_end().to_string(),
                        expected: STORE_VERSION.to_string(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&vpath, format!("{STORE_VERSION}\n").as_bytes())?;
            }
            Err(e) => {
                return Err(StoreError::Io {
                    path: vpath,
                    cause: e,
                });
            }
        }
        // Every directory may already exist, so nothing above proves we can write.
        let probe = root
            .join("tmp")
            .join(format!(".probe.{}.{}", std::process::id(), next_id()));
        File::create(&probe).at(&probe)?;
        remove_file(&probe)?;
        let store = Store {
            root,
            read_only: false,
        };
        store.open_lock_file()?;
        Ok(store)
    }

    /// Opens an existing store for reading only, for a store that cannot be written (a
    /// read-only mount, another user's folder): `plan`, `show`, `log` and `verify` need nothing
    /// more. Nothing is created, written or moved; [`Store::lock_shared`] takes the shared lock
    /// through a read-only handle of `lock` (and goes without when that file is missing).
    /// Writing through the handle fails with the file system's own error.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] naming `VERSION` when it cannot be read (no store there);
    /// [`StoreError::VersionMismatch`] when it holds anything but `1`.
    pub fn open_read_only(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        let root = std::path::absolute(&root).at(&root)?;
        let vpath = root.join("VERSION");
        let found = fs::read_to_string(&vpath).at(&vpath)?;
        if found.trim_end() != STORE_VERSION {
            return Err(StoreError::VersionMismatch {
                path: vpath,
                found: found.trim_end().to_string(),
                expected: STORE_VERSION.to_string(),
            });
        }
        Ok(Store {
            root,
            read_only: true,
        })
    }

    /// Whether this handle was opened with [`Store::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the entry for `key` lives (or would live): `root/entries/<hex[..2]>/<hex>`.
    pub fn entry_dir(&self, key: &Key) -> PathBuf {
        let hex = key.hex();
        self.root.join("entries").join(&hex[..2]).join(hex)
    }

    /// Whether `key` is committed: a single stat of its `manifest.json`.
    ///
    /// This is the fast path used for planning; it does not parse the manifest.
    pub fn contains(&self, key: &Key) -> bool {
        fs::metadata(self.entry_dir(key).join(MANIFEST_FILE)).is_ok()
    }

    /// Reads and checks the entry for `key`; `None` if it has no manifest.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] if the manifest does not parse, names another
    /// key, has another schema or lists unsafe paths; [`StoreError::Io`] if it
    /// cannot be read.
    pub fn get(&self, key: &Key) -> Result<Option<Entry>> {
        let dir = self.entry_dir(key);
        let mpath = dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io {
                    path: mpath,
                    cause: e,
                });
            }
        };
        let manifest: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                return Err(StoreError::Corrupt {
                    path: mpath,
                    reason: format!("invalid manifest: {e}"),
                });
            }
        };
        if let Err(reason) = manifest.check(key) {
            return Err(StoreError::Corrupt {
                path: mpath,
                reason,
            });
        }
        Ok(Some(Entry {
            key: *key,
            dir,
            manifest,
        }))
    }

    /// Takes the per-key lock and decides: already committed -> [`Begin::Cached`],
    /// otherwise [`Begin::Pending`] with a fresh staging directory.
    ///
    /// If another process (or thread) holds the key lock, `on_wait` is called
    /// once with the holder's pid (as written in the lock file, if readable),
    /// then the lock is polled every 25 ms until it is free or `cancelled()`
    /// returns true. Once acquired, our pid is written into the lock file, the
    /// entry is looked up again (the other holder may have committed it) and
    /// leftover `tmp/<hex>.*` staging directories, which can only belong to
    /// crashed writers since we hold the lock, are removed.
    ///
    /// An entry directory that cannot be a committed entry (no `manifest.json`,
    /// or one that does not parse or names another key) is moved aside into
    /// `corrupt/<hex>.<n>` with a warning, and the key is produced afresh: a
    /// damaged entry never blocks its own recomputation.
    ///
    /// # Errors
    ///
    /// [`StoreError::Cancelled`] if cancelled while waiting; I/O errors naming
    /// the lock file, the staging directory or the entry being moved aside.
    pub fn begin(
        &self,
        key: &Key,
        cancelled: &dyn Fn() -> bool,
        on_wait: &mut dyn FnMut(Option<u32>),
    ) -> Result<Begin> {
        let lock = self.lock_key(key, cancelled, on_wait)?;
        match self.get(key) {
            Ok(Some(entry)) => {
                tracing::debug!(key = %key.short(), "already committed by another writer");
                return Ok(Begin::Cached(entry));
            }
            Ok(None) => {
                if fs::symlink_metadata(self.entry_dir(key)).is_ok() {
                    let moved = self.move_aside(key)?;
                    tracing::warn!(
                        "entry {key} has no manifest.json: moved it to {} and producing it again",
                        moved.display()
                    );
                }
            }
            Err(StoreError::Corrupt { path, reason }) => {
                let moved = self.move_aside(key)?;
                tracing::warn!(
                    "entry {key} is corrupt ({}: {reason}): moved it to {} and producing it again",
                    path.display(),
                    moved.display()
                );
            }
            Err(e) => return Err(e),
        }
        self.remove_leftover_tmp(key);
        let dir = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            key.hex(),
            std::process::id(),
            next_id()
        ));
        fs::create_dir(&dir).at(&dir)?;
        Ok(Begin::Pending(Pending {
            store: self.clone(),
            key: *key,
            dir,
            committed: false,
            _lock: lock,
        }))
    }

    /// Moves a damaged entry out of `entries/` so that it is recomputed, if it
    /// is still damaged once the key lock is held.
    ///
    /// Takes the key lock (polling every 25 ms while another process holds it,
    /// until `cancelled()`), re-hashes the entry ([`Store::verify`] of this one
    /// key) and, if anything is wrong with it, renames its directory to
    /// `corrupt/<hex>.<n>` (the first free `n`), fsyncs both parents and
    /// returns that path. Returns `None`, touching nothing, when the entry is
    /// absent or now verifies clean (another process already replaced it).
    /// The rename is atomic: readers see the damaged entry or no entry, and
    /// files a reader already holds open (or mapped) stay valid.
    ///
    /// # Errors
    ///
    /// [`StoreError::Cancelled`] if cancelled while waiting for the lock; I/O
    /// errors naming the lock file or the directories involved.
    pub fn quarantine(&self, key: &Key, cancelled: &dyn Fn() -> bool) -> Result<Option<PathBuf>> {
        let _lock = self.lock_key(key, cancelled, &mut |_| {})?;
        if fs::symlink_metadata(self.entry_dir(key)).is_err() {
            return Ok(None);
        }
        if self.verify_one(key).is_empty() {
            return Ok(None);
        }
        self.move_aside(key).map(Some)
    }

    /// Opens `locks/<hex>.lock`, locks it exclusively (see [`Store::begin`] for
    /// the waiting protocol) and writes our pid into it.
    fn lock_key(
        &self,
        key: &Key,
        cancelled: &dyn Fn() -> bool,
        on_wait: &mut dyn FnMut(Option<u32>),
    ) -> Result<File> {
        let lock_path = self.lock_path(key);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .at(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = holder_pid(&lock_path);
                tracing::debug!(
                    key = %key.short(),
                    holder = ?holder,
                    "waiting for lock on {} (held by pid {})",
                    key.short(),
                    holder.map_or_else(|| "unknown".to_string(), |p| p.to_string())
                );
                on_wait(holder);
                loop {
                    if cancelled() {
                        return Err(StoreError::Cancelled);
                    }
                    std::thread::sleep(POLL);
                    match lock.try_lock() {
                        Ok(()) => break,
                        Err(TryLockError::WouldBlock) => {}
                        Err(TryLockError::Error(e)) => {
                            return Err(StoreError::Io {
                                path: lock_path,
                                cause: e,
                            });
                        }
                    }
                }
            }
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    cause: e,
                });
            }
        }
        lock.set_len(0).at(&lock_path)?;
        lock.rewind().at(&lock_path)?;
        writeln!(lock, "{}", std::process::id()).at(&lock_path)?;
        tracing::debug!(key = %key.short(), "key lock taken");
        Ok(lock)
    }

    /// Renames `entries/<hex[..2]>/<hex>` to `corrupt/<hex>.<n>` (first free
    /// `n`) and fsyncs both parents. Only call while holding the key lock.
    fn move_aside(&self, key: &Key) -> Result<PathBuf> {
        let from = self.entry_dir(key);
        let corrupt = self.root.join("corrupt");
        fs::create_dir_all(&corrupt).at(&corrupt)?;
        let mut n = 0u32;
        let to = loop {
            let to = corrupt.join(format!("{}.{n}", key.hex()));
            if fs::symlink_metadata(&to).is_err() {
                break to;
            }
            n += 1;
        };
        fs::rename(&from, &to).at(&from)?;
        if let Some(shard) = from.parent() {
            sync_dir(shard)?;
        }
        sync_dir(&corrupt)?;
        Ok(to)
    }

    /// `root/scratch/<hex>`, created if needed: resumable checkpoints for a key
    /// that is being produced. Removed when the key commits.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] naming the directory.
    pub fn scratch_dir(&self, key: &Key) -> Result<PathBuf> {
        let dir = self.scratch_path(key);
        fs::create_dir_all(&dir).at(&dir)?;
        Ok(dir)
    }

    /// Keys of all entry directories under `entries/`, sorted. Names that are
    /// not a lowercase key inside its matching shard are ignored.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] if a directory cannot be listed.
    pub fn keys(&self) -> Result<Vec<Key>> {
        let entries = self.root.join("entries");
        let mut keys = Vec::new();
        for shard in fs::read_dir(&entries).at(&entries)? {
            let shard = shard.at(&entries)?;
            let Ok(prefix) = shard.file_name().into_string() else {
                continue;
            };
            let is_shard = prefix.len() == 2
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !is_shard || !shard.file_type().at(&shard.path())?.is_dir() {
                continue;
            }
            let shard_path = shard.path();
            for item in fs::read_dir(&shard_path).at(&shard_path)? {
                let item = item.at(&shard_path)?;
                let Ok(name) = item.file_name().into_string() else {
                    continue;
                };
                let Ok(key) = name.parse::<Key>() else {
                    continue;
                };
                if key.hex() == name
                    && name.starts_with(&prefix)
                    && item.file_type().at(&item.path())?.is_dir()
                {
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Takes the store lock (`root/lock`) shared, as `run` and `plan` do.
    ///
    /// Tries first; if an exclusive holder (`gc`) is active, logs a waiting
    /// line and blocks.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] naming the lock file.
    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock_store(false)
    }

    /// Takes the store lock exclusively, as `gc` does.
    ///
    /// Tries first; if other holders are active, logs a waiting line and blocks.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] naming the lock file.
    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock_store(true)
    }

    /// Atomically writes the log of the last failed attempt at `key` to
    /// `failed/<hex>.log`, replacing any earlier one.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] naming the log file.
    pub fn save_failed_log(&self, key: &Key, text: &str) -> Result<PathBuf> {
        let path = self.failed_path(key);
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// The saved log of the last failed attempt at `key`, if any.
    pub fn failed_log(&self, key: &Key) -> Option<PathBuf> {
        let path = self.failed_path(key);
        path.is_file().then_some(path)
    }

    /// `root/runs`: the engine keeps per-pipeline run records there.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    fn lock_path(&self, key: &Key) -> PathBuf {
        self.root.join("locks").join(format!("{}.lock", key.hex()))
    }

    /// Where [`Store::scratch_dir`] keeps `key`'s resume checkpoints (not created).
    pub fn scratch_path(&self, key: &Key) -> PathBuf {
        self.root.join("scratch").join(key.hex())
    }

    fn failed_path(&self, key: &Key) -> PathBuf {
        self.root.join("failed").join(format!("{}.log", key.hex()))
    }

    fn open_lock_file(&self) -> Result<File> {
        let path = self.root.join("lock");
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .at(&path)
    }

    fn lock_store(&self, exclusive: bool) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = if self.read_only {
            match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(StoreLock { _file: None });
                }
                Err(e) => return Err(StoreError::Io { path, cause: e }),
            }
        } else {
            self.open_lock_file()?
        };
        let tried = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match tried {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // said at the default level: `pipe gc` may wait for a days-long run
                let (mode, holder) = if exclusive {
                    (
                        "exclusive",
                        "a `pipe run` or `pipe exec` is using the store",
                    )
                } else {
                    ("shared", "a `pipe gc` is cleaning the store")
                };
                tracing::warn!(
                    "waiting for the {mode} store lock on {}: {holder}; this goes on when it ends",
                    path.display()
                );
                let locked = if exclusive {
                    file.lock()
                } else {
                    file.lock_shared()
                };
                locked.at(&path)?;
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::Io { path, cause: e }),
        }
        Ok(StoreLock { _file: Some(file) })
    }

    /// Removes `tmp/<hex>.*`; only call while holding the key lock.
    ///
    /// Each leftover is first renamed to `tmp/dead.<hex>.<pid>.<n>` (atomic,
    /// whatever a stray process of the crashed writer still does inside it),
    /// then deleted. A failure is logged, not returned: the junk no longer
    /// carries the key's prefix, and `gc` clears it later.
    fn remove_leftover_tmp(&self, key: &Key) {
        let tmp = self.root.join("tmp");
        let prefix = format!("{}.", key.hex());
        let items = match fs::read_dir(&tmp) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::warn!("cannot list {}: {e}", tmp.display());
                return;
            }
        };
        for item in items.flatten() {
            if !item.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let path = item.path();
            let dead = tmp.join(format!(
                "dead.{}.{}.{}",
                key.hex(),
                std::process::id(),
                next_id()
            ));
            tracing::debug!("removing leftover staging dir {}", path.display());
            let removed = fs::rename(&path, &dead).at(&path).and_then(|()| {
                if fs::symlink_metadata(&dead).at(&dead)?.is_dir() {
                    remove_tree(&dead)
                } else {
                    remove_file(&dead)
                }
            });
            if let Err(e) = removed {
                tracing::warn!("cannot remove a crashed writer's staging dir: {e}");
            }
        }
    }
}

/// Test hook (debug builds only): sleeps `PIPE_CACHE_TEST_PAUSE_MS` milliseconds inside
/// [`Pending::commit`], between hashing and the manifest and between the manifest and the rename,
/// so that crash tests which `kill -9` at random moments land inside a commit often. Release
/// builds ignore the variable.
fn test_pause() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("PIPE_CACHE_TEST_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// The pid written in a lock file, if it holds one.
fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pid in a lock file someone holds. The holder writes it just after taking the lock, so a
/// file still empty is read again, for up to half a second (a busy machine can delay that write).
fn holder_pid(path: &Path) -> Option<u32> {
    for _ in 0..50 {
        if let Some(pid) = read_pid(path) {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

impl Pending {
    /// The key being produced.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The staging directory to write outputs into (`tmp/<hex>.<pid>.<n>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Turns the staging directory into the committed entry for this key.
    ///
    /// Hashes every regular file under [`dir`](Pending::dir) in parallel and
    /// fsyncs it, writes `manifest.json` last (pretty JSON, status `"ok"`),
    /// fsyncs it and every directory, then renames the staging directory to
    /// `entries/<hex[..2]>/<hex>` and fsyncs the shard. If that directory
    /// already exists, another writer won: ours is removed and theirs
    /// returned. Finally removes `scratch/<hex>` and releases the key lock.
    ///
    /// # Errors
    ///
    /// [`StoreError::UnsafeOutput`] for a symlink, socket, non-UTF-8 name or a
    /// top-level `manifest.json`; [`StoreError::InvalidMeta`] for a
    /// non-finite `seconds`; I/O errors naming the path. On error nothing is
    /// committed and the staging directory is removed.
    pub fn commit(mut self, meta: ManifestMeta) -> Result<Entry> {
        let tree = walk(&self.dir)?;
        if let Some((_, path, reason)) = tree.others.first() {
            return Err(StoreError::UnsafeOutput {
                path: path.clone(),
                reason: (*reason).to_string(),
            });
        }
        if let Some((_, path)) = tree.files.iter().find(|(rel, _)| rel == MANIFEST_FILE) {
            return Err(StoreError::UnsafeOutput {
                path: path.clone(),
                reason: "manifest.json is reserved for the store".to_string(),
            });
        }
        if !meta.seconds.is_finite() {
            // serde_json would write `null`, which then fails to parse back.
            return Err(StoreError::InvalidMeta {
                key: self.key,
                reason: format!("seconds is {}", meta.seconds),
            });
        }
        tracing::debug!(key = %self.key.short(), "commit: hashing outputs");
        let files = tree
            .files
            .par_iter()
            .map(|(rel, path)| {
                let (blake3, bytes) = hash_file(path)?;
                File::open(path).and_then(|f| f.sync_all()).at(path)?;
                Ok((rel.clone(), FileEntry { blake3, bytes }))
            })
            .collect::<Result<_>>()?;
        test_pause();
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA,
            key: self.key,
            status: "ok".to_string(),
            meta,
            files,
        };
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::InvalidMeta {
                key: self.key,
                reason: e.to_string(),
            })?;
        json.push(b'\n');
        let mpath = self.dir.join(MANIFEST_FILE);
        let mut mfile = File::create_new(&mpath).at(&mpath)?;
        mfile.write_all(&json).at(&mpath)?;
        mfile.sync_all().at(&mpath)?;
        for d in tree.dirs.iter().rev() {
            sync_dir(d)?;
        }
        tracing::debug!(key = %self.key.short(), "commit: manifest written");
        test_pause();

        let target = self.store.entry_dir(&self.key);
        let shard = target
            .parent()
            .expect("entry dir is entries/<shard>/<hex>")
            .to_path_buf();
        if !shard.is_dir() {
            fs::create_dir_all(&shard).at(&shard)?;
            sync_dir(&self.store.root.join("entries"))?;
        }
        match fs::rename(&self.dir, &target) {
            Ok(()) => {
                self.committed = true;
                sync_dir(&shard)?;
                tracing::debug!(key = %self.key.short(), "commit: renamed into entries");
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                tracing::debug!(
                    key = %self.key.short(),
                    "entry already committed by another writer; discarding ours"
                );
                let existing = self.store.get(&self.key)?;
                let Some(entry) = existing else {
                    return Err(StoreError::Corrupt {
                        path: target,
                        reason: "entry directory exists without manifest.json".to_string(),
                    });
                };
                self.clear_scratch();
                // Drop removes our staging dir and releases the lock.
                return Ok(entry);
            }
            Err(e) => {
                return Err(StoreError::Io {
                    path: target,
                    cause: e,
                });
            }
        }
        self.clear_scratch();
        Ok(Entry {
            key: self.key,
            dir: target,
            manifest,
        })
    }

    /// Removes `scratch/<hex>`. The entry is already durable, so a failure
    /// here only wastes space and is logged rather than returned.
    fn clear_scratch(&self) {
        let scratch = self.store.scratch_path(&self.key);
        if let Err(e) = remove_tree(&scratch) {
            tracing::warn!("could not remove scratch dir: {e}");
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Entry {
    /// Full path of the file `name` (relative, `/`-separated) in this entry.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotInManifest`] if the manifest does not list `name`;
    /// [`StoreError::Io`] if it is missing on disk; [`StoreError::Corrupt`]
    /// if it is not a regular file.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        if !self.manifest.files.contains_key(name) {
            return Err(StoreError::NotInManifest {
                key: self.key,
                file: name.to_string(),
            });
        }
        let path = self.dir.join(name);
        let meta = fs::symlink_metadata(&path).at(&path)?;
        if !meta.is_file() {
            return Err(StoreError::Corrupt {
                path,
                reason: "listed in the manifest but not a regular file".to_string(),
            });
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier, Mutex};
    use std::time::Instant;

    use super::*;
    use crate::test_util::TestDir;

    fn key(text: &str) -> Key {
        Key::from_hash(blake3::hash(text.as_bytes()))
    }

    fn never() -> bool {
        false
    }

    fn pending(store: &Store, k: &Key) -> Pending {
        match store.begin(k, &never, &mut |_| panic!("unexpected wait")) {
            Ok(Begin::Pending(p)) => p,
            Ok(Begin::Cached(_)) => panic!("{k} unexpectedly cached"),
            Err(e) => panic!("begin failed: {e}"),
        }
    }

    fn meta() -> ManifestMeta {
        ManifestMeta {
            kind: "test".into(),
            version: 1,
            node: "n".into(),
            params: serde_json::json!({"a": 1}),
            started: "2026-11-23T07:22:19.123Z".into(),
            finished: "2026-11-23T07:22:20.001Z".into(),
            seconds: 0.25,
            ..ManifestMeta::default()
        }
    }

    /// Commits an entry with `files` (relative path -> contents).
    fn commit_files(store: &Store, k: &Key, files: &[(&str, &[u8])]) -> Result<Entry> {
        let p = pending(store, k);
        for (name, data) in files {
            let path = p.dir().join(name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            fs::write(&path, data).at(&path)?;
        }
        p.commit(meta())
    }

    fn tmp_names(store: &Store) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(store.root().join("tmp"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn open_read_only_needs_a_store_and_writes_nothing() -> Result<()> {
        let t = TestDir::new("open-ro");
        let root = t.path().join("s");
        let e = Store::open_read_only(&root).expect_err("no store there");
        assert!(e.to_string().contains("VERSION"), "{e}");
        assert!(!root.exists(), "nothing created");

        let store = Store::open(&root)?;
        let key = key("ro");
        commit_files(&store, &key, &[("x.txt", b"x")])?;
        fs::remove_file(root.join("lock")).at(&root.join("lock"))?;
        let ro = Store::open_read_only(&root)?;
        assert!(ro.is_read_only() && !store.is_read_only());
        let _lock = ro.lock_shared()?; // without a lock file: no lock, no file made
        assert!(!root.join("lock").exists());
        assert!(ro.contains(&key) && ro.get(&key)?.is_some());
        assert!(ro.verify(None)?.is_empty());

        fs::write(root.join("VERSION"), "2\n").at(&root.join("VERSION"))?;
        assert!(matches!(
            Store::open_read_only(&root),
            Err(StoreError::VersionMismatch { .. })
        ));
        Ok(())
    }

    #[test]
    fn open_creates_layout_and_version() -> Result<()> {
        let t = TestDir::new("open");
        let store = Store::open(t.path().join("s"))?;
        for d in DIRS {
            assert!(store.root().join(d).is_dir(), "{d}");
        }
        let v = store.root().join("VERSION");
        assert_eq!(fs::read_to_string(&v).at(&v)?, "1\n");
        assert_eq!(store.runs_dir(), store.root().join("runs"));
        // Reopening an existing store works.
        Store::open(store.root())?;
        Ok(())
    }

    #[test]
    fn version_mismatch_is_reported() -> Result<()> {
        let t = TestDir::new("version");
        let store = Store::open(t.path())?;
        let v = store.root().join("VERSION");
        fs::write(&v, "2\n").at(&v)?;
        match Store::open(t.path()) {
            Err(StoreError::VersionMismatch {
                path,
                found,
                expected,
            }) => {
                assert_eq!(path, v);
                assert_eq!(found, "2");
                assert_eq!(expected, "1");
            }
            other => panic!("expected VersionMismatch, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn unwritable_root_names_path() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let t = TestDir::new("readonly");
        let ro = t.path().join("ro");
        fs::create_dir(&ro).at(&ro)?;
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).at(&ro)?;
        // Root (or CAP_DAC_OVERRIDE) ignores permission bits: probe first.
        let probe = ro.join("probe");
        let enforced = fs::write(&probe, b"x").is_err();
        let _ = fs::remove_file(&probe);
        let root = ro.join("store");
        let result = Store::open(&root);
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).at(&ro)?;
        if enforced {
            let msg = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(&*root.to_string_lossy()), "{msg}");
        }
        // An existing store whose directories became read-only fails the probe.
        let store = Store::open(&root)?;
        let tmp = store.root().join("tmp");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o555)).at(&tmp)?;
        let result = Store::open(&root);
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).at(&tmp)?;
        if enforced {
            let msg = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(&*tmp.to_string_lossy()), "{msg}");
        }
        Ok(())
    }

    #[test]
    fn root_under_a_file_names_path() -> Result<()> {
        // Fails even for root, so this assertion always runs.
        let t = TestDir::new("notdir");
        let file = t.path().join("plain");
        fs::write(&file, b"x").at(&file)?;
        let root = file.join("store");
        let msg = Store::open(&root)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains(&*root.to_string_lossy()), "{msg}");
        Ok(())
    }

    #[test]
    fn commit_then_get_records_hashes() -> Result<()> {
        let t = TestDir::new("commit");
        let store = Store::open(t.path())?;
        let k = key("commit");
        assert!(!store.contains(&k));
        assert!(store.get(&k)?.is_none());
        let big: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i % 253) as u8).collect();
        let files: [(&str, &[u8]); 3] = [
            ("model.bin", &big),
            ("metrics.json", b"{\"acc\": 1}"),
            ("sub/deeper/log.txt", b"hello"),
        ];
        let committed = commit_files(&store, &k, &files)?;
        assert!(store.contains(&k));
        assert_eq!(committed.dir, store.entry_dir(&k));
        let got = store.get(&k)?.expect("entry was just committed");
        assert_eq!(got.manifest, committed.manifest);
        assert_eq!(got.manifest.key, k);
        assert_eq!(got.manifest.status, "ok");
        assert_eq!(got.manifest.schema, MANIFEST_SCHEMA);
        assert_eq!(got.manifest.meta, meta());
        let names: Vec<&str> = got.manifest.files.keys().map(String::as_str).collect();
        assert_eq!(names, ["metrics.json", "model.bin", "sub/deeper/log.txt"]);
        for (name, data) in files {
            let fe = &got.manifest.files[name];
            assert_eq!(fe.blake3, blake3::hash(data).to_hex().as_str(), "{name}");
            assert_eq!(fe.bytes, data.len() as u64);
            let path = got.file(name)?;
            assert_eq!(fs::read(&path).at(&path)?, data);
        }
        assert!(tmp_names(&store).is_empty(), "{:?}", tmp_names(&store));
        assert_eq!(store.keys()?, vec![k]);
        // Pretty JSON, written by us.
        let mpath = got.dir.join("manifest.json");
        let text = fs::read_to_string(&mpath).at(&mpath)?;
        assert!(text.starts_with("{\n  \"schema\": 1,"), "{text}");
        Ok(())
    }

    #[test]
    fn begin_on_committed_key_is_cached() -> Result<()> {
        let t = TestDir::new("cached");
        let store = Store::open(t.path())?;
        let k = key("cached");
        commit_files(&store, &k, &[("a", b"1")])?;
        match store.begin(&k, &never, &mut |_| panic!("no wait expected"))? {
            Begin::Cached(e) => assert_eq!(e.manifest.files["a"].bytes, 1),
            Begin::Pending(_) => panic!("committed key came back pending"),
        }
        Ok(())
    }

    #[test]
    fn entry_file_checks_manifest_and_disk() -> Result<()> {
        let t = TestDir::new("file");
        let store = Store::open(t.path())?;
        let k = key("file");
        let e = commit_files(&store, &k, &[("a.txt", b"1")])?;
        match e.file("b.txt") {
            Err(StoreError::NotInManifest { key, file }) => {
                assert_eq!(key, k);
                assert_eq!(file, "b.txt");
            }
            other => panic!("expected NotInManifest, got {other:?}"),
        }
        let path = e.file("a.txt")?;
        fs::remove_file(&path).at(&path)?;
        let msg = e
            .file("a.txt")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("a.txt"), "{msg}");
        Ok(())
    }

    #[test]
    fn drop_pending_leaves_nothing() -> Result<()> {
        let t = TestDir::new("drop");
        let store = Store::open(t.path())?;
        let k = key("drop");
        {
            let p = pending(&store, &k);
            fs::write(p.dir().join("half.bin"), b"partial").at(p.dir())?;
            assert_eq!(tmp_names(&store).len(), 1);
        }
        assert!(tmp_names(&store).is_empty(), "{:?}", tmp_names(&store));
        assert!(!store.contains(&k));
        assert!(!store.entry_dir(&k).exists());
        assert!(store.keys()?.is_empty());
        // The lock was released: begin again without waiting.
        drop(pending(&store, &k));
        Ok(())
    }

    #[test]
    fn crashed_writer_tmp_is_removed_by_next_begin() -> Result<()> {
        let t = TestDir::new("crash");
        let store = Store::open(t.path())?;
        let k = key("crash");
        let other = key("other");
        let leftover = store.root().join("tmp").join(format!("{}.999.0", k.hex()));
        fs::create_dir_all(leftover.join("sub")).at(&leftover)?;
        fs::write(leftover.join("sub/x"), b"junk").at(&leftover)?;
        let unrelated = store
            .root()
            .join("tmp")
            .join(format!("{}.999.0", other.hex()));
        fs::create_dir(&unrelated).at(&unrelated)?;
        let p = pending(&store, &k);
        assert!(!leftover.exists());
        assert!(unrelated.exists(), "another key's staging dir was touched");
        let names = tmp_names(&store);
        assert_eq!(names.len(), 2, "{names:?}");
        let ours = p
            .dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        assert!(ours.is_some_and(|n| n.starts_with(&format!(
            "{}.{}.",
            k.hex(),
            std::process::id()
        ))));
        Ok(())
    }

    #[test]
    fn lock_file_holds_holder_pid() -> Result<()> {
        let t = TestDir::new("pid");
        let store = Store::open(t.path())?;
        let k = key("pid");
        let _p = pending(&store, &k);
        assert_eq!(read_pid(&store.lock_path(&k)), Some(std::process::id()));
        Ok(())
    }

    #[test]
    fn racing_begin_one_pending_one_waits_then_cached() {
        let t = TestDir::new("race");
        let store = match Store::open(t.path()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let k = key("race");
        let barrier = Arc::new(Barrier::new(2));
        let waited = Arc::new(AtomicUsize::new(0));
        let holders = Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (store, barrier, waited, holders) = (
                    store.clone(),
                    barrier.clone(),
                    waited.clone(),
                    holders.clone(),
                );
                std::thread::spawn(move || -> Result<&'static str> {
                    barrier.wait();
                    let mut on_wait = |pid: Option<u32>| {
                        holders.lock().expect("holders mutex").push(pid);
                        waited.fetch_add(1, Ordering::SeqCst);
                    };
                    match store.begin(&k, &never, &mut on_wait)? {
                        Begin::Pending(p) => {
                            // Do not commit before the other thread is provably waiting.
                            let start = Instant::now();
                            while waited.load(Ordering::SeqCst) == 0 {
                                assert!(start.elapsed() < Duration::from_secs(20), "no waiter");
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            fs::write(p.dir().join("out.txt"), format!("{i}")).at(p.dir())?;
                            p.commit(meta())?;
                            Ok("pending")
                        }
                        Begin::Cached(e) => {
                            assert_eq!(e.manifest.files["out.txt"].bytes, 1);
                            Ok("cached")
                        }
                    }
                })
            })
            .collect();
        let mut outcomes: Vec<&str> = handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("thread panicked"),
            })
            .collect();
        outcomes.sort();
        assert_eq!(outcomes, ["cached", "pending"]);
        assert_eq!(
            waited.load(Ordering::SeqCst),
            1,
            "on_wait must be called exactly once"
        );
        assert_eq!(
            *holders.lock().expect("holders mutex"),
            [Some(std::process::id())]
        );
        assert!(store.contains(&k));
        assert!(tmp_names(&store).is_empty());
    }

    #[test]
    fn cancel_while_waiting() -> Result<()> {
        let t = TestDir::new("cancel");
        let store = Store::open(t.path())?;
        let k = key("cancel");
        let held = pending(&store, &k);
        let calls = AtomicUsize::new(0);
        let cancelled = || calls.fetch_add(1, Ordering::SeqCst) >= 3;
        let mut waits = 0;
        let start = Instant::now();
        match store.begin(&k, &cancelled, &mut |_| waits += 1) {
            Err(StoreError::Cancelled) => {}
            other => panic!("expected Cancelled, got {other:?}"),
        }
        assert_eq!(waits, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(start.elapsed() >= Duration::from_millis(3 * 25));
        // The holder is unaffected and can still commit.
        fs::write(held.dir().join("x"), b"x").at(held.dir())?;
        held.commit(meta())?;
        assert!(store.contains(&k));
        Ok(())
    }

    #[test]
    fn commit_rejects_symlink_and_manifest_name() -> Result<()> {
        let t = TestDir::new("unsafe");
        let store = Store::open(t.path())?;
        let k = key("symlink");
        let p = pending(&store, &k);
        let staging = p.dir().to_path_buf();
        fs::write(p.dir().join("real"), b"x").at(p.dir())?;
        std::os::unix::fs::symlink("real", p.dir().join("link")).at(p.dir())?;
        match p.commit(meta()) {
            Err(StoreError::UnsafeOutput { path, .. }) => assert!(path.ends_with("link")),
            other => panic!("expected UnsafeOutput, got {other:?}"),
        }
        assert!(!staging.exists(), "failed commit left its staging dir");
        assert!(!store.contains(&k));

        let k2 = key("manifest");
        let p = pending(&store, &k2);
        fs::write(p.dir().join("manifest.json"), b"{}").at(p.dir())?;
        let msg = p
            .commit(meta())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("manifest.json"), "{msg}");
        assert!(!store.contains(&k2));

        // A nested manifest.json is an ordinary output.
        commit_files(&store, &key("nested"), &[("sub/manifest.json", b"{}")])?;

        let k3 = key("nan");
        let p = pending(&store, &k3);
        let bad = ManifestMeta {
            seconds: f64::NAN,
            ..meta()
        };
        assert!(matches!(p.commit(bad), Err(StoreError::InvalidMeta { .. })));
        Ok(())
    }

    #[test]
    fn commit_removes_scratch() -> Result<()> {
        let t = TestDir::new("scratch");
        let store = Store::open(t.path())?;
        let k = key("scratch");
        let scratch = store.scratch_dir(&k)?;
        assert_eq!(scratch, store.root().join("scratch").join(k.hex()));
        fs::write(scratch.join("ckpt"), b"epoch 3").at(&scratch)?;
        commit_files(&store, &k, &[("a", b"1")])?;
        assert!(!scratch.exists());
        Ok(())
    }

    #[test]
    fn get_rejects_corrupt_manifests() -> Result<()> {
        let t = TestDir::new("corrupt");
        let store = Store::open(t.path())?;
        let k = key("corrupt");
        let e = commit_files(&store, &k, &[("a", b"1")])?;
        let mpath = e.dir.join("manifest.json");
        let mut m = e.manifest.clone();
        m.key = key("someone else");
        let bytes = serde_json::to_vec(&m).map_err(|e| StoreError::Corrupt {
            path: mpath.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&mpath, bytes).at(&mpath)?;
        match store.get(&k) {
            Err(StoreError::Corrupt { path, reason }) => {
                assert_eq!(path, mpath);
                assert!(reason.contains("key"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        fs::write(&mpath, b"{ not json").at(&mpath)?;
        assert!(matches!(store.get(&k), Err(StoreError::Corrupt { .. })));
        Ok(())
    }

    #[test]
    fn begin_moves_aside_entry_dirs_without_a_valid_manifest() -> Result<()> {
        let t = TestDir::new("aside");
        let store = Store::open(t.path())?;
        // An entry dir with files but no manifest (lost by a disk, or a hand copy).
        let k = key("no-manifest");
        let dir = store.entry_dir(&k);
        fs::create_dir_all(&dir).at(&dir)?;
        fs::write(dir.join("out.bin"), b"stale").at(&dir)?;
        assert!(!store.contains(&k));
        let p = pending(&store, &k);
        let aside = store.root().join("corrupt").join(format!("{}.0", k.hex()));
        assert_eq!(fs::read(aside.join("out.bin")).at(&aside)?, b"stale");
        fs::write(p.dir().join("out.bin"), b"fresh").at(p.dir())?;
        let e = p.commit(meta())?;
        assert_eq!(fs::read(e.dir.join("out.bin")).at(&e.dir)?, b"fresh");

        // A manifest that does not parse: moved aside as `.1` (`.0` is taken).
        let mpath = e.dir.join("manifest.json");
        fs::write(&mpath, b"{ truncated").at(&mpath)?;
        assert!(matches!(store.get(&k), Err(StoreError::Corrupt { .. })));
        let p = pending(&store, &k);
        let aside1 = store.root().join("corrupt").join(format!("{}.1", k.hex()));
        assert_eq!(
            fs::read(aside1.join("manifest.json")).at(&aside1)?,
            b"{ truncated"
        );
        fs::write(p.dir().join("out.bin"), b"again").at(p.dir())?;
        p.commit(meta())?;
        assert_eq!(store.verify(None)?, []);
        Ok(())
    }

    #[test]
    fn quarantine_moves_only_damaged_entries() -> Result<()> {
        let t = TestDir::new("quarantine");
        let store = Store::open(t.path())?;
        let k = key("q");
        commit_files(&store, &k, &[("a.bin", b"abc"), ("sub/b.bin", b"defg")])?;
        // Clean or absent: nothing happens.
        assert_eq!(store.quarantine(&k, &never)?, None);
        assert_eq!(store.quarantine(&key("absent"), &never)?, None);
        assert!(store.contains(&k));

        let b = store.entry_dir(&k).join("sub/b.bin");
        fs::write(&b, b"defh").at(&b)?;
        let moved = store.quarantine(&k, &never)?;
        let expected = store.root().join("corrupt").join(format!("{}.0", k.hex()));
        assert_eq!(moved.as_deref(), Some(expected.as_path()));
        assert!(!store.contains(&k));
        assert!(!store.entry_dir(&k).exists());
        assert_eq!(fs::read(expected.join("sub/b.bin")).at(&expected)?, b"defh");
        assert_eq!(
            store.verify(None)?,
            [],
            "nothing damaged is left in entries/"
        );
        // The key can be produced again, and gc clears the quarantine.
        commit_files(&store, &k, &[("a.bin", b"abc"), ("sub/b.bin", b"defg")])?;
        let report = store.gc(&[k].into_iter().collect(), false)?;
        assert_eq!(report.corrupt_removed, 1);
        assert!(!expected.exists());
        assert!(store.contains(&k));
        Ok(())
    }

    #[test]
    fn quarantine_waits_for_the_key_lock_and_honours_cancel() -> Result<()> {
        let t = TestDir::new("quarantine-lock");
        let store = Store::open(t.path())?;
        let k = key("held");
        let _held = pending(&store, &k);
        let calls = AtomicUsize::new(0);
        let cancelled = || calls.fetch_add(1, Ordering::SeqCst) >= 2;
        assert!(matches!(
            store.quarantine(&k, &cancelled),
            Err(StoreError::Cancelled)
        ));
        Ok(())
    }

    #[test]
    fn leftover_staging_dirs_are_cleared_even_if_a_stray_writer_is_inside() -> Result<()> {
        let t = TestDir::new("stray");
        let store = Store::open(t.path())?;
        let k = key("stray");
        let leftover = store.root().join("tmp").join(format!("{}.999.0", k.hex()));
        fs::create_dir_all(leftover.join("deep/er")).at(&leftover)?;
        fs::write(leftover.join("deep/er/f"), b"x").at(&leftover)?;
        let p = pending(&store, &k);
        assert_eq!(tmp_names(&store).len(), 1, "{:?}", tmp_names(&store));
        drop(p);
        assert!(tmp_names(&store).is_empty(), "{:?}", tmp_names(&store));
        Ok(())
    }

    #[test]
    fn gc_keeps_only_the_job_files_of_kept_uncommitted_keys() -> Result<()> {
        let t = TestDir::new("gc-jobs");
        let store = Store::open(t.path())?;
        let (failed, done, gone) = (key("failed"), key("done"), key("gone"));
        commit_files(&store, &done, &[("x", b"1")])?;
        let jobs = store.root().join("jobs");
        fs::create_dir_all(&jobs).at(&jobs)?;
        for k in [failed, done, gone] {
            for ext in ["json", "out"] {
                let p = jobs.join(format!("{}.{ext}", k.hex()));
                fs::write(&p, b"{}").at(&p)?;
            }
        }
        fs::write(jobs.join("notes.txt"), b"mine").at(&jobs)?;
        let keep: BTreeSet<Key> = [failed, done].into_iter().collect();
        assert_eq!(store.gc(&keep, true)?.jobs_removed, 4);
        assert_eq!(
            fs::read_dir(&jobs).at(&jobs)?.count(),
            7,
            "a dry run removed something"
        );
        assert_eq!(store.gc(&keep, false)?.jobs_removed, 4);
        let mut left: Vec<String> = fs::read_dir(&jobs)
            .at(&jobs)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()
            .at(&jobs)?;
        left.sort();
        assert_eq!(
            left,
            [
                format!("{}.json", failed.hex()),
                format!("{}.out", failed.hex()),
                "notes.txt".to_string()
            ]
        );
        Ok(())
    }

    #[test]
    fn gc_removes_scratch_of_committed_keys_and_unfinished_work_on_request() -> Result<()> {
        let t = TestDir::new("gc-scratch");
        let store = Store::open(t.path())?;
        let (done, open) = (key("done"), key("open"));
        commit_files(&store, &done, &[("x", b"1")])?;
        // A crash between commit and scratch cleanup leaves this one.
        let stale = store.scratch_dir(&done)?;
        fs::write(stale.join("ckpt"), b"12345").at(&stale)?;
        let live = store.scratch_dir(&open)?;
        fs::write(live.join("ckpt"), b"resume me").at(&live)?;
        let report = store.gc(&[done].into_iter().collect(), false)?;
        assert_eq!(report.stale_scratch_removed, 1);
        assert!(!stale.exists());
        assert!(
            live.join("ckpt").is_file(),
            "a resume checkpoint was removed"
        );
        // the unfinished work of a key no pipeline keeps is reported, and removed on request
        assert_eq!(
            (report.unfinished_scratch, report.unfinished_scratch_bytes),
            (1, 9)
        );
        let kept_open = store.gc(&[done, open].into_iter().collect(), false)?;
        assert_eq!(
            kept_open.unfinished_scratch, 0,
            "a kept key's state is not unfinished work"
        );
        let dry = store.gc_unfinished(&[done].into_iter().collect(), true, true)?;
        assert_eq!((dry.unfinished_scratch, dry.freed_bytes), (1, 9));
        assert!(live.join("ckpt").is_file(), "a dry run removed it");
        // not while a run holds the key
        let held = pending(&store, &open);
        let busy = store.gc_unfinished(&[done].into_iter().collect(), false, true)?;
        assert_eq!(busy.unfinished_scratch, 0);
        assert!(
            live.join("ckpt").is_file(),
            "the state of a running node was removed"
        );
        drop(held);
        let gone = store.gc_unfinished(&[done].into_iter().collect(), false, true)?;
        assert_eq!((gone.unfinished_scratch, gone.freed_bytes), (1, 9));
        assert!(!live.exists());
        Ok(())
    }

    #[test]
    fn keys_ignores_junk() -> Result<()> {
        let t = TestDir::new("junk");
        let store = Store::open(t.path())?;
        let (a, b) = (key("a"), key("b"));
        commit_files(&store, &a, &[("x", b"1")])?;
        commit_files(&store, &b, &[("x", b"2")])?;
        let entries = store.root().join("entries");
        fs::create_dir_all(entries.join("zz/whatever")).at(&entries)?;
        fs::write(entries.join("README"), b"hi").at(&entries)?;
        fs::create_dir_all(entries.join("00").join(a.hex())).at(&entries)?; // wrong shard
        let shard = entries.join(&a.hex()[..2]);
        fs::create_dir_all(shard.join(a.hex().to_uppercase())).at(&shard)?;
        fs::write(shard.join(key("file").hex()), b"").at(&shard)?;
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(store.keys()?, expected);
        Ok(())
    }

    #[test]
    fn verify_reports_mismatch_missing_and_extra() -> Result<()> {
        let t = TestDir::new("verify");
        let store = Store::open(t.path())?;
        let (a, b) = (key("va"), key("vb"));
        commit_files(
            &store,
            &a,
            &[("one.bin", b"hello"), ("sub/two.bin", b"world")],
        )?;
        commit_files(&store, &b, &[("three.bin", b"!!!")])?;
        assert_eq!(store.verify(None)?, []);

        // Flip one byte.
        let one = store.entry_dir(&a).join("one.bin");
        fs::write(&one, b"hellp").at(&one)?;
        let problems = store.verify(None)?;
        assert_eq!(
            problems,
            [VerifyProblem::HashMismatch {
                key: a,
                file: "one.bin".into(),
                expected: blake3::hash(b"hello").to_hex().to_string(),
                actual: blake3::hash(b"hellp").to_hex().to_string(),
            }]
        );
        assert!(problems[0].to_string().contains("one.bin"));
        assert!(problems[0].to_string().contains(&a.hex()));

        // Delete another, add a stray file.
        let two = store.entry_dir(&a).join("sub/two.bin");
        fs::remove_file(&two).at(&two)?;
        let stray = store.entry_dir(&b).join("stray.txt");
        fs::write(&stray, b"?").at(&stray)?;
        let mut problems = store.verify(None)?;
        problems.sort_by_key(|p| p.to_string());
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.contains(&VerifyProblem::MissingFile {
            key: a,
            file: "sub/two.bin".into()
        }));
        assert!(problems.contains(&VerifyProblem::ExtraFile {
            key: b,
            file: "stray.txt".into()
        }));

        // Only the requested keys are checked; an absent key is reported.
        let absent = key("absent");
        let problems = store.verify(Some(&[b, absent]))?;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| matches!(p,
            VerifyProblem::UnreadableManifest { key, .. } if *key == absent)));

        // A broken manifest is reported, not returned as an error.
        let mpath = store.entry_dir(&b).join("manifest.json");
        fs::write(&mpath, b"garbage").at(&mpath)?;
        let problems = store.verify(Some(&[b]))?;
        assert!(
            matches!(&problems[..], [VerifyProblem::UnreadableManifest { key, .. }] if *key == b)
        );
        Ok(())
    }

    #[test]
    fn gc_keeps_keep_set_and_dry_run_removes_nothing() -> Result<()> {
        let t = TestDir::new("gc");
        let store = Store::open(t.path())?;
        let (a, b, c) = (key("ga"), key("gb"), key("gc"));
        commit_files(&store, &a, &[("x", b"aaaa")])?;
        commit_files(&store, &b, &[("x", b"bbbbbb"), ("y/z", b"b")])?;
        commit_files(&store, &c, &[("x", b"cc")])?;
        store.save_failed_log(&b, "old failure")?;
        let leftover = store
            .root()
            .join("tmp")
            .join(format!("{}.999.0", key("dead").hex()));
        fs::create_dir(&leftover).at(&leftover)?;
        fs::write(leftover.join("f"), b"123").at(&leftover)?;
        let keep: BTreeSet<Key> = [a].into_iter().collect();
        let mut doomed = vec![b, c];
        doomed.sort();

        let dry = store.gc(&keep, true)?;
        assert_eq!(dry.removed, doomed);
        assert_eq!(dry.kept, 1);
        assert_eq!(dry.tmp_removed, 1);
        let manifests: u64 = [b, c]
            .iter()
            .map(|k| fs::metadata(store.entry_dir(k).join("manifest.json")).map_or(0, |m| m.len()))
            .sum();
        assert!(manifests > 0);
        assert_eq!(dry.freed_bytes, 7 + 2 + 3 + manifests);
        assert_eq!(store.keys()?.len(), 3, "dry run removed something");
        assert!(leftover.exists());

        let real = store.gc(&keep, false)?;
        assert_eq!(real, dry);
        assert_eq!(store.keys()?, vec![a]);
        assert!(store.contains(&a));
        assert!(!store.contains(&b) && !store.contains(&c));
        assert!(store.failed_log(&b).is_none());
        assert!(!store.lock_path(&b).exists());
        assert!(store.lock_path(&a).exists());
        assert!(tmp_names(&store).is_empty(), "{:?}", tmp_names(&store));
        assert_eq!(store.verify(None)?, []);
        // Removed keys can be produced again.
        commit_files(&store, &b, &[("x", b"again")])?;
        Ok(())
    }

    #[test]
    fn gc_spares_staging_dirs_of_locked_keys() -> Result<()> {
        let t = TestDir::new("gc-live");
        let store = Store::open(t.path())?;
        let k = key("live");
        let p = pending(&store, &k);
        let report = store.gc(&BTreeSet::new(), false)?;
        assert_eq!(report.tmp_removed, 0);
        assert!(p.dir().is_dir());
        fs::write(p.dir().join("x"), b"x").at(p.dir())?;
        p.commit(meta())?;
        Ok(())
    }

    #[test]
    fn store_locks_shared_and_exclusive() -> Result<()> {
        let t = TestDir::new("storelock");
        let store = Store::open(t.path())?;
        let s1 = store.lock_shared()?;
        let s2 = store.lock_shared()?;
        let done = Arc::new(AtomicBool::new(false));
        let handle = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || -> Result<()> {
                let _x = store.lock_exclusive()?;
                done.store(true, Ordering::SeqCst);
                Ok(())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "exclusive lock taken under shared holders"
        );
        drop(s1);
        drop(s2);
        match handle.join() {
            Ok(r) => r?,
            Err(_) => panic!("locking thread panicked"),
        }
        assert!(done.load(Ordering::SeqCst));
        Ok(())
    }

    #[test]
    fn failed_log_round_trip() -> Result<()> {
        let t = TestDir::new("failed");
        let store = Store::open(t.path())?;
        let k = key("failed");
        assert_eq!(store.failed_log(&k), None);
        let path = store.save_failed_log(&k, "first\n")?;
        assert_eq!(
            path,
            store.root().join("failed").join(format!("{}.log", k.hex()))
        );
        store.save_failed_log(&k, "second attempt\n")?;
        assert_eq!(store.failed_log(&k), Some(path.clone()));
        assert_eq!(fs::read_to_string(&path).at(&path)?, "second attempt\n");
        Ok(())
    }
}
