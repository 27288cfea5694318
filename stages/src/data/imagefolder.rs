//! ImageFolder reader: `train/<class>/*.{jpg,jpeg,png}` and `test/<class>/*`, from a folder or
//! from inside a `.tar` / `.tar.gz` / `.tgz` read in one streaming pass (never unpacked).
//!
//! - Classes are the `train/` class folders sorted by name; label `i` is the `i`-th. A `test/`
//!   class must be one of them. Images in sub-folders of a class folder belong to the class.
//!   Within a class, images are ordered by path, so the result does not depend on the order of
//!   the archive or of the folder listing.
//! - The tree may sit inside one wrapping folder (`cifar10/train/...`).
//! - Files that are not `.jpg` / `.jpeg` / `.png` (or are hidden, like `.DS_Store` and `._x.jpg`)
//!   are skipped, with one warning line counting them.
//! - Archives are untrusted. An entry whose path is absolute or contains `..`, a symbolic or
//!   hard link (wherever it points), a character or block device or a FIFO makes the whole
//!   archive refused, with an error naming the entry: such entries have no place in an image
//!   data set, and a refusal cannot be missed the way a skip warning can. Nothing is ever
//!   written to disk and nothing is followed: entries are only read, in memory, from the one
//!   stream. An image entry larger than [`MAX_IMAGE_BYTES`] (by its header or once inflated)
//!   is refused too; other entries are skipped without being read. A folder, by contrast, is
//!   the user's own: its symlinks are followed (reading only).
//! - Images are decoded in parallel (rayon) with the `image` crate, converted to RGB, and
//!   checked to be `image_size` square, or resized to it when `resize` is set. An archive is
//!   read on a helper thread while the images already read are decoded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use rayon::prelude::*;

use super::{Dataset, Error, Hooks, ReadOptions, Result, Split, io_err, read_entry, to_chw};

/// The most bytes one image of an archive may have (it is read into memory whole).
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// Images decoded between two progress reports / cancellation checks.
const BLOCK: usize = 2048;

/// What [`read_image_folder`] found.
#[derive(Clone, Debug)]
pub struct FolderData {
    /// The decoded dataset.
    pub dataset: Dataset,
    /// Files under `train/` and `test/` that were skipped as non-images (display names).
    pub skipped: Vec<String>,
}

const SPLITS: [&str; 2] = ["train", "test"];

enum Content {
    /// Encoded bytes read from an archive.
    Bytes(Vec<u8>),
    /// A file of a folder, read when decoded.
    File(PathBuf),
    /// Already decoded (archives decode while they are read).
    Decoded(Result<Vec<u8>>),
}

/// One image to decode.
struct Item {
    split: usize,
    class: String,
    /// Path below the split folder, for ordering.
    rel: String,
    /// Display name in errors (`archive:entry`, or the file's path).
    name: String,
    content: Content,
}

/// What a folder walk or an archive pass yields, before the tree is interpreted.
enum Raw {
    Dir,
    Image(Content),
    Other,
}

struct RawEntry {
    comps: Vec<String>,
    name: String,
    raw: Raw,
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.starts_with('.')
        && (lower.ends_with(".jpg") || lower.ends_with(".jpeg") || lower.ends_with(".png"))
}

/// Reads an image folder or archive.
///
/// # Errors
/// A missing path, a bad layout (no `train/` or `test/`, no class folders, an empty class
/// folder), an unsafe archive entry, an unreadable or corrupt image, an image of the wrong size,
/// or a cancelled read. Every error names the file.
pub fn read_image_folder(path: &Path, opts: &ReadOptions, hooks: &Hooks<'_>) -> Result<FolderData> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Missing {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                cause: e,
            }
        }
    })?;
    let entries = if meta.is_dir() {
        walk_folder(path, hooks)?
    } else {
        read_archive(path, opts, hooks)?
    };
    let (items, classes, skipped) = organize(entries, &path.display().to_string())?;
    if !skipped.is_empty() {
        tracing::warn!(
            "{}: skipped {} files that are not .jpg/.jpeg/.png images (first: {})",
            path.display(),
            skipped.len(),
            skipped[0]
        );
    }
    let dataset = decode(items, classes, opts, hooks)?;
    Ok(FolderData { dataset, skipped })
}

/// Decodes a whole image folder or archive (32x32 images) and returns the seconds it took and
/// the number of images: the `pipe bench` measure.
///
/// # Errors
/// As [`read_image_folder`].
pub fn bench_decode(path: &Path) -> Result<(f64, usize)> {
    let t0 = Instant::now();
    let d = read_image_folder(path, &ReadOptions::default(), &Hooks::none())?;
    Ok((
        t0.elapsed().as_secs_f64(),
        d.dataset.train.n + d.dataset.test.n,
    ))
}

/// Lists `train/` and `test/` of a folder (or of its single wrapping sub-folder).
fn walk_folder(root: &Path, hooks: &Hooks<'_>) -> Result<Vec<RawEntry>> {
    let has_split = |d: &Path| SPLITS.iter().any(|s| d.join(s).is_dir());
    let base = if has_split(root) {
        root.to_path_buf()
    } else {
        let mut subdirs = Vec::new();
        for e in std::fs::read_dir(root).map_err(io_err(root))? {
            let e = e.map_err(io_err(root))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && e.path().is_dir() {
                subdirs.push(e.path());
            }
        }
        match subdirs.as_slice() {
            [one] if has_split(one) => one.clone(),
            _ => {
                return Err(Error::Layout {
                    root: root.display().to_string(),
                    message: "no train/ or test/ folder (expected train/<class>/*.jpg and test/<class>/*.jpg)".into(),
                });
            }
        }
    };
    let mut out = Vec::new();
    for split in SPLITS {
        let dir = base.join(split);
        if dir.is_dir() {
            walk(&dir, &mut vec![split.to_string()], &mut out, hooks, 0)?;
        }
    }
    Ok(out)
}

fn walk(
    dir: &Path,
    comps: &mut Vec<String>,
    out: &mut Vec<RawEntry>,
    hooks: &Hooks<'_>,
    depth: usize,
) -> Result<()> {
    if depth > 32 {
        return Err(Error::Layout {
            root: dir.display().to_string(),
            message: "folders nested more than 32 deep (a symlink loop?)".into(),
        });
    }
    hooks.check()?;
    out.push(RawEntry {
        comps: comps.clone(),
        name: dir.display().to_string(),
        raw: Raw::Dir,
    });
    let mut children = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        children.push(e.path());
    }
    children.sort();
    for p in children {
        let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        // follows symlinks: a user's own folder may link class folders in from elsewhere
        let meta = std::fs::metadata(&p).map_err(io_err(&p))?;
        comps.push(name.clone());
        if meta.is_dir() {
            walk(&p, comps, out, hooks, depth + 1)?;
        } else {
            out.push(RawEntry {
                comps: comps.clone(),
                name: p.display().to_string(),
                raw: if is_image_name(&name) {
                    Raw::Image(Content::File(p.clone()))
                } else {
                    Raw::Other
                },
            });
        }
        comps.pop();
    }
    Ok(())
}

/// Counts the bytes read through it (the compressed bytes of an archive: progress).
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Entries sent from the reading thread to the decoding one at a time.
const BATCH: usize = 256;

/// Reads a `.tar` or `.tar.gz` in one streaming pass on a helper thread while the calling
/// thread decodes the images already read (rayon): reading and decoding overlap.
fn read_archive(archive: &Path, opts: &ReadOptions, hooks: &Hooks<'_>) -> Result<Vec<RawEntry>> {
    let total = std::fs::metadata(archive).map_err(io_err(archive))?.len();
    let count = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<RawEntry>>>(8);
    let mut out = std::thread::scope(|scope| {
        let reader_count = Arc::clone(&count);
        scope.spawn(move || {
            let mut send = |batch| tx.send(Ok(batch)).is_ok();
            if let Err(e) = list_archive(archive, reader_count, &mut send) {
                let _ = tx.send(Err(e));
            }
        });
        // `rx` is dropped when this closure returns (before the scope joins the reader),
        // so an early return here stops the reader at its next send
        let rx = rx;
        let mut out = Vec::new();
        (hooks.progress)(0, total, "reading");
        while let Ok(batch) = rx.recv() {
            hooks.check()?;
            let mut batch = batch?;
            batch.par_iter_mut().for_each(|e| {
                if let Raw::Image(Content::Bytes(bytes)) = &e.raw {
                    let decoded = decode_bytes(bytes, opts, &e.name);
                    e.raw = Raw::Image(Content::Decoded(decoded));
                }
            });
            out.append(&mut batch);
            (hooks.progress)(count.load(Ordering::Relaxed), total, "reading");
        }
        Ok::<_, Error>(out)
    })?;
    // a single wrapping folder (`cifar10/train/...`) is stripped
    let at_top = out.iter().any(|e| {
        SPLITS.contains(&e.comps[0].as_str()) && (e.comps.len() > 1 || matches!(e.raw, Raw::Dir))
    });
    if !at_top {
        let wrappers: BTreeSet<&str> = out
            .iter()
            .filter(|e| e.comps.len() > 1 && SPLITS.contains(&e.comps[1].as_str()))
            .map(|e| e.comps[0].as_str())
            .collect();
        if let [one] = wrappers.into_iter().collect::<Vec<_>>().as_slice() {
            let one = one.to_string();
            out.retain(|e| e.comps.len() > 1 && e.comps[0] == one);
            for e in &mut out {
                e.comps.remove(0);
            }
        }
    }
    Ok(out)
}

/// Lists the archive's entries in batches to `send` (which returns `false` to stop), keeping
/// the bytes of image entries. Refuses unsafe entries.
fn list_archive(
    archive: &Path,
    count: Arc<AtomicU64>,
    send: &mut dyn FnMut(Vec<RawEntry>) -> bool,
) -> Result<()> {
    let mut f = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut magic = [0u8; 2];
    let gz = f.read(&mut magic).map_err(io_err(archive))? == 2 && magic == [0x1f, 0x8b];
    let f = Counting {
        inner: std::fs::File::open(archive).map_err(io_err(archive))?,
        count,
    };
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    let mut tar = tar::Archive::new(reader);
    let bad = |e: std::io::Error| Error::Archive {
        archive: archive.to_path_buf(),
        message: e.to_string(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: &'static str| Error::UnsafeEntry {
            archive: archive.to_path_buf(),
            entry: shown.clone(),
            reason,
        };
        let path = entry.path().map_err(bad)?.into_owned();
        let mut comps = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(s) => comps.push(s.to_string_lossy().into_owned()),
                Component::CurDir => {}
                Component::ParentDir => return Err(refuse("its path contains `..`")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse("its path is absolute"));
                }
            }
        }
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        let raw = match kind {
            T::Directory => Raw::Dir,
            T::Regular | T::Continuous | T::GNUSparse => {
                let file_name = comps.last().map(String::as_str).unwrap_or("");
                if is_image_name(file_name) {
                    let buf = read_entry(&mut entry, MAX_IMAGE_BYTES, archive, &shown)?;
                    Raw::Image(Content::Bytes(buf))
                } else {
                    Raw::Other
                }
            }
            T::Symlink => return Err(refuse("symbolic links are not allowed")),
            T::Link => return Err(refuse("hard links are not allowed")),
            T::Char | T::Block | T::Fifo => return Err(refuse("device files are not allowed")),
            // pax global headers carry no file
            T::XGlobalHeader => continue,
            _ => return Err(refuse("unsupported entry type")),
        };
        if comps.is_empty() {
            continue;
        }
        batch.push(RawEntry {
            comps,
            name: format!("{}:{shown}", archive.display()),
            raw,
        });
        if batch.len() == BATCH && !send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))) {
            return Ok(());
        }
    }
    if !batch.is_empty() {
        send(batch);
    }
    Ok(())
}

/// Interprets the tree: classes, images to decode (sorted), files skipped; checks the layout.
fn organize(entries: Vec<RawEntry>, root: &str) -> Result<(Vec<Item>, Vec<String>, Vec<String>)> {
    let mut seen = [false; 2];
    // class -> (display name of its folder, images found)
    let mut class_dirs: [BTreeMap<String, (String, usize)>; 2] = Default::default();
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for e in entries {
        let Some(split) = SPLITS.iter().position(|s| *s == e.comps[0]) else {
            continue; // outside train/ and test/: not part of the data
        };
        if e.comps.len() > 1 || matches!(e.raw, Raw::Dir) {
            seen[split] = true;
        }
        let is_file = !matches!(e.raw, Raw::Dir);
        if e.comps.len() < 2 {
            if is_file {
                skipped.push(e.name); // a file named `train`
            }
            continue;
        }
        let class = &e.comps[1];
        let hidden = e.comps[1..].iter().any(|c| c.starts_with('.'));
        if hidden || (e.comps.len() == 2 && is_file) {
            // a hidden file or folder, or a file directly in train/
            if is_file {
                skipped.push(e.name);
            }
            continue;
        }
        let folder = if e.comps.len() == 2 {
            e.name.clone()
        } else {
            // the class folder's display name, derived from the entry's
            let tail: usize = e.comps[2..].iter().map(|c| c.len() + 1).sum();
            e.name[..e.name.len().saturating_sub(tail)].to_string()
        };
        let slot = class_dirs[split]
            .entry(class.clone())
            .or_insert_with(|| (folder, 0));
        match e.raw {
            Raw::Dir => {}
            Raw::Other => skipped.push(e.name),
            Raw::Image(content) => {
                slot.1 += 1;
                items.push(Item {
                    split,
                    class: class.clone(),
                    rel: e.comps[1..].join("/"),
                    name: e.name,
                    content,
                });
            }
        }
    }
    for (split, s) in SPLITS.iter().enumerate() {
        if !seen[split] {
            return Err(Error::Layout {
                root: root.to_string(),
                message: format!(
                    "no {s}/ folder (expected train/<class>/*.jpg and test/<class>/*.jpg)"
                ),
            });
        }
    }
    if class_dirs[0].is_empty() {
        return Err(Error::Layout {
            root: root.to_string(),
            message: "train/ holds no class folders".into(),
        });
    }
    for dirs in &class_dirs {
        for (folder, count) in dirs.values() {
            if *count == 0 {
                return Err(Error::EmptyClass {
                    folder: folder.clone(),
                });
            }
        }
    }
    let classes: Vec<String> = class_dirs[0].keys().cloned().collect();
    if let Some(extra) = class_dirs[1]
        .keys()
        .find(|c| !class_dirs[0].contains_key(*c))
    {
        return Err(Error::Layout {
            root: root.to_string(),
            message: format!("test/ class `{extra}` has no train/ folder"),
        });
    }
    items.sort_by(|a, b| (a.split, &a.class, &a.rel).cmp(&(b.split, &b.class, &b.rel)));
    Ok((items, classes, skipped))
}

fn decode_bytes(bytes: &[u8], opts: &ReadOptions, name: &str) -> Result<Vec<u8>> {
    let img = image::load_from_memory(bytes).map_err(|e| Error::Corrupt {
        file: name.to_string(),
        message: e.to_string(),
    })?;
    to_chw(img.into_rgb8(), opts, name)
}

fn decode_one(item: &mut Item, opts: &ReadOptions) -> Result<Vec<u8>> {
    match std::mem::replace(&mut item.content, Content::Bytes(Vec::new())) {
        Content::Bytes(b) => decode_bytes(&b, opts, &item.name),
        Content::File(p) => {
            let b = std::fs::read(&p).map_err(io_err(&p))?;
            decode_bytes(&b, opts, &item.name)
        }
        Content::Decoded(r) => r,
    }
}

/// Decodes the sorted items in parallel blocks, reporting progress between blocks.
fn decode(
    mut items: Vec<Item>,
    classes: Vec<String>,
    opts: &ReadOptions,
    hooks: &Hooks<'_>,
) -> Result<Dataset> {
    let s = opts.image_size as usize;
    let len = 3 * s * s;
    let total = items.len() as u64;
    let n_train = items.iter().filter(|i| i.split == 0).count();
    let mut images = vec![0u8; items.len() * len];
    let mut done = 0usize;
    (hooks.progress)(0, total, "decoding");
    for (block, out) in items.chunks_mut(BLOCK).zip(images.chunks_mut(BLOCK * len)) {
        hooks.check()?;
        let errors: Vec<Option<Error>> = block
            .par_iter_mut()
            .zip(out.par_chunks_mut(len))
            .map(|(item, dst)| match decode_one(item, opts) {
                Ok(chw) => {
                    dst.copy_from_slice(&chw);
                    None
                }
                Err(e) => Some(e),
            })
            .collect();
        // the first failure in file order, whatever the thread count
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(e);
        }
        done += block.len();
        (hooks.progress)(done as u64, total, "decoding");
    }
    let labels: Vec<i64> = items
        .iter()
        .map(|i| classes.binary_search(&i.class).map_or(-1, |c| c as i64))
        .collect();
    let test_images = images.split_off(n_train * len);
    let test_labels = labels[n_train..].to_vec();
    let mut train_labels = labels;
    train_labels.truncate(n_train);
    Ok(Dataset {
        train: Split {
            images,
            labels: train_labels,
            n: n_train,
            h: s,
            w: s,
        },
        test: Split {
            n: test_labels.len(),
            images: test_images,
            labels: test_labels,
            h: s,
            w: s,
        },
        classes,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::testutil::{TempDir, cifar10_jpeg};

    fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                seed.wrapping_add(x as u8),
                seed.wrapping_mul(3).wrapping_add(y as u8),
                seed ^ 0x5a,
            ])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    /// Appends an entry with an arbitrary (unchecked) path and type: the tar crate's own
    /// `append_data` refuses `..` and absolute paths, which is exactly what we must test. A
    /// symlink points at `/etc/passwd`. Shared with the CIFAR reader's tests.
    pub(crate) fn append_raw<W: std::io::Write>(
        t: &mut tar::Builder<W>,
        path: &str,
        data: &[u8],
        kind: tar::EntryType,
    ) {
        let mut h = tar::Header::new_gnu();
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").expect("link name");
        }
        h.set_cksum();
        t.append(&h, data).expect("append");
    }

    fn add(t: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        append_raw(t, path, data, tar::EntryType::Regular);
    }

    fn read(path: &Path) -> Result<FolderData> {
        read_image_folder(path, &ReadOptions::default(), &Hooks::none())
    }

    /// The first `n` images of the first `k` classes of each split of the real archive, as
    /// (path, bytes), plus one non-image file.
    fn real_subset(k: usize, n: usize) -> Vec<(String, Vec<u8>)> {
        let f = std::fs::File::open(cifar10_jpeg()).expect("open archive");
        let mut t = tar::Archive::new(flate2::read::GzDecoder::new(f));
        let mut per: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut out = Vec::new();
        for e in t.entries().expect("entries") {
            let mut e = e.expect("entry");
            let p = e.path().expect("path").display().to_string();
            let parts: Vec<&str> = p.split('/').collect();
            if parts.len() != 3 || parts[2].is_empty() {
                continue;
            }
            let classes = ["airplane", "automobile", "bird", "cat"];
            if !classes[..k].contains(&parts[1]) {
                continue;
            }
            let c = per.entry((parts[0].into(), parts[1].into())).or_default();
            if *c < n {
                *c += 1;
                let mut b = Vec::new();
                e.read_to_end(&mut b).expect("read");
                out.push((p, b));
            }
        }
        out
    }

    #[test]
    fn folder_and_archive_give_the_same_dataset() {
        let tmp = TempDir::new("imagefolder-same");
        let files = real_subset(3, 4);
        assert_eq!(files.len(), 24);
        let folder = tmp.path().join("tree");
        for (p, b) in &files {
            let dst = folder.join(p);
            std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
            std::fs::write(dst, b).expect("write");
        }
        std::fs::write(folder.join("train/bird/notes.txt"), "x").expect("write");
        // the archive lists files in reverse, inside a wrapping folder, plus a non-image
        let mut t = tar::Builder::new(Vec::new());
        for (p, b) in files.iter().rev() {
            add(&mut t, &format!("wrap/{p}"), b);
        }
        add(&mut t, "wrap/train/bird/notes.txt", b"x");
        add(&mut t, "wrap/README", b"not data");
        let tar_bytes = t.into_inner().expect("tar");
        let plain = tmp.path().join("tree.tar");
        std::fs::write(&plain, &tar_bytes).expect("write");
        let gz_path = tmp.path().join("tree.tgz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz_path).expect("create"),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut gz, &tar_bytes).expect("gz");
        gz.finish().expect("gz");

        let a = read(&folder).expect("folder");
        let b = read(&plain).expect("tar");
        let c = read(&gz_path).expect("tgz");
        assert_eq!(a.dataset.classes, ["airplane", "automobile", "bird"]);
        assert_eq!((a.dataset.train.n, a.dataset.test.n), (12, 12));
        assert_eq!(a.dataset.train.labels, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(a.dataset, b.dataset);
        assert_eq!(a.dataset, c.dataset);
        // one non-image skipped and counted (README sits outside train/ and test/)
        assert_eq!(a.skipped.len(), 1, "{:?}", a.skipped);
        assert_eq!(
            c.skipped,
            [format!("{}:wrap/train/bird/notes.txt", gz_path.display())]
        );
    }

    #[test]
    fn unsafe_entries_are_refused() {
        let tmp = TempDir::new("imagefolder-evil");
        let img = png(32, 32, 1);
        for (evil, kind, reason) in [
            (
                "train/a/../../evil.png",
                tar::EntryType::Regular,
                "contains `..`",
            ),
            ("../evil.jpg", tar::EntryType::Regular, "contains `..`"),
            (
                "/tmp/pipe-evil-abs.png",
                tar::EntryType::Regular,
                "is absolute",
            ),
            (
                "train/a/link.png",
                tar::EntryType::Symlink,
                "symbolic links",
            ),
            ("train/a/hard.png", tar::EntryType::Link, "hard links"),
            ("train/a/dev", tar::EntryType::Char, "device files"),
        ] {
            let mut t = tar::Builder::new(Vec::new());
            add(&mut t, "train/a/ok.png", &img);
            add(&mut t, "test/a/ok.png", &img);
            let data: &[u8] = if kind == tar::EntryType::Regular {
                &img
            } else {
                &[]
            };
            append_raw(&mut t, evil, data, kind);
            let path = tmp.path().join("sub/evil.tar");
            std::fs::create_dir_all(tmp.path().join("sub")).expect("mkdir");
            std::fs::write(&path, t.into_inner().expect("tar")).expect("write");
            let e = read(&path).expect_err("refused");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("refusing archive entry `{evil}`")) && msg.contains(reason),
                "{msg}"
            );
            assert!(!tmp.path().join("evil.jpg").exists());
            assert!(!tmp.path().join("evil.png").exists());
            assert!(!Path::new("/tmp/pipe-evil-abs.png").exists());
            let listing: Vec<_> = std::fs::read_dir(tmp.path().join("sub"))
                .expect("ls")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(listing, ["evil.tar"], "nothing written next to the archive");
        }
    }

    /// A tar header of any type with raw `data` (PAX and GNU long-name records included).
    fn append_typed(t: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_cksum();
        t.append(&h, data).expect("append");
    }

    /// One PAX record: `<len> <key>=<value>\n`, the length counting itself.
    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    #[test]
    fn hostile_entries_are_refused_before_anything_is_read_or_written() {
        use tar::EntryType as T;
        let tmp = TempDir::new("imagefolder-hostile");
        let img = png(32, 32, 1);
        let long_evil = format!("train/a/{}/../../../../evil.png", "x".repeat(120));
        type Case = (
            &'static str,
            Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>,
            String,
        );
        let cases: Vec<Case> = vec![
            (
                "fifo",
                Box::new(|t| append_raw(t, "train/a/fifo", &[], T::Fifo)),
                "refusing archive entry `train/a/fifo`: device files are not allowed".into(),
            ),
            (
                "block device",
                Box::new(|t| append_raw(t, "train/a/sda", &[], T::Block)),
                "refusing archive entry `train/a/sda`: device files are not allowed".into(),
            ),
            (
                "GNU long name with `..`",
                Box::new({
                    let long_evil = long_evil.clone();
                    move |t| {
                        let mut name = long_evil.clone().into_bytes();
                        name.push(0);
                        append_typed(t, "././@LongLink", T::GNULongName, &name);
                        append_typed(t, "train/a/short.png", T::Regular, b"evil");
                    }
                }),
                format!("refusing archive entry `{long_evil}`: its path contains `..`"),
            ),
            (
                "PAX path with `..`",
                Box::new(|t| {
                    append_typed(
                        t,
                        "PaxHeaders/x",
                        T::XHeader,
                        &pax_record("path", "../../evil.png"),
                    );
                    append_typed(t, "train/a/innocent.png", T::Regular, b"evil");
                }),
                "refusing archive entry `../../evil.png`: its path contains `..`".into(),
            ),
            (
                "PAX absolute path",
                Box::new(|t| {
                    append_typed(
                        t,
                        "PaxHeaders/y",
                        T::XHeader,
                        &pax_record("path", "/tmp/pipe-evil-pax.png"),
                    );
                    append_typed(t, "train/a/innocent.png", T::Regular, b"evil");
                }),
                "refusing archive entry `/tmp/pipe-evil-pax.png`: its path is absolute".into(),
            ),
            (
                "a header claiming a terabyte",
                Box::new(|t| {
                    let mut h = tar::Header::new_gnu();
                    h.set_path("train/a/huge.png").expect("path");
                    h.set_size(1 << 40);
                    h.set_entry_type(T::Regular);
                    h.set_cksum();
                    // the data never follows: the archive is cut after the header
                    t.get_mut().extend_from_slice(h.as_bytes());
                }),
                "entry `train/a/huge.png` is 1099511627776 bytes, more than the 64 MiB".into(),
            ),
        ];
        for (what, add_evil, want) in cases {
            let mut t = tar::Builder::new(Vec::new());
            add(&mut t, "train/a/ok.png", &img);
            add(&mut t, "test/a/ok.png", &img);
            add_evil(&mut t);
            let bytes = if what.starts_with("a header") {
                t.get_ref().clone()
            } else {
                t.into_inner().expect("tar")
            };
            let dir = tmp.path().join("sub");
            std::fs::create_dir_all(&dir).expect("mkdir");
            let path = dir.join("evil.tar");
            std::fs::write(&path, bytes).expect("write");
            let e = read(&path).expect_err(what);
            assert!(e.to_string().contains(&want), "{what}: {e}");
            let listing: Vec<_> = std::fs::read_dir(&dir)
                .expect("ls")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(
                listing,
                ["evil.tar"],
                "{what}: nothing written next to the archive"
            );
            assert!(!tmp.path().join("evil.png").exists(), "{what}");
            assert!(!Path::new("/tmp/pipe-evil-pax.png").exists(), "{what}");
        }

        // a gzip bomb: 65 MiB of zeros named like an image inflate from a few kB, refused by
        // its size before it is read
        let mut t = tar::Builder::new(Vec::new());
        add(&mut t, "train/a/ok.png", &img);
        add(&mut t, "test/a/ok.png", &img);
        add(&mut t, "train/a/bomb.png", &vec![0u8; 65 << 20]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &t.into_inner().expect("tar")).expect("gz");
        let gz = gz.finish().expect("gz");
        assert!(gz.len() < 1 << 20, "{} bytes", gz.len());
        let path = tmp.path().join("bomb.tar.gz");
        std::fs::write(&path, gz).expect("write");
        let e = read(&path).expect_err("bomb");
        assert!(
            e.to_string()
                .contains("entry `train/a/bomb.png` is 68157440 bytes, more than the 64 MiB"),
            "{e}"
        );
    }

    #[test]
    fn bad_inputs_name_the_file() {
        let tmp = TempDir::new("imagefolder-bad");
        let root = tmp.path();
        let mk = |p: &str, b: &[u8]| {
            let dst = root.join(p);
            std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
            std::fs::write(dst, b).expect("write");
        };
        // missing path
        let e = read(&root.join("nope")).expect_err("missing");
        assert!(
            e.to_string().ends_with("nope: no such file or folder"),
            "{e}"
        );
        // corrupt JPEG: the start-of-image marker and garbage
        mk("c/train/a/0.png", &png(32, 32, 0));
        mk(
            "c/train/b/bad.jpg",
            &[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 4, 5],
        );
        mk("c/test/a/0.png", &png(32, 32, 1));
        let e = read(&root.join("c")).expect_err("corrupt");
        let bad = root.join("c/train/b/bad.jpg");
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot decode image", bad.display())),
            "{e}"
        );
        // wrong size: error naming file and size; accepted with resize
        mk("s/train/a/0.png", &png(32, 32, 0));
        mk("s/train/a/1.png", &png(40, 24, 2));
        mk("s/test/a/0.png", &png(32, 32, 1));
        let e = read(&root.join("s")).expect_err("size");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: image is 40x24, expected 32x32 (set `resize: true` to resize)",
                root.join("s/train/a/1.png").display()
            )
        );
        let ok = read_image_folder(
            &root.join("s"),
            &ReadOptions {
                image_size: 32,
                resize: true,
            },
            &Hooks::none(),
        )
        .expect("resized");
        assert_eq!(ok.dataset.train.n, 2);
        // the resized constant blue plane stays constant
        let img = ok.dataset.train.image(1);
        assert!(img[2048..].iter().all(|&v| v == 2 ^ 0x5a));
        // an empty class folder
        mk("e/train/a/0.png", &png(32, 32, 0));
        mk("e/train/b/readme.txt", b"x");
        mk("e/test/a/0.png", &png(32, 32, 0));
        let e = read(&root.join("e")).expect_err("empty");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: class folder holds no .jpg/.jpeg/.png images",
                root.join("e/train/b").display()
            )
        );
        // no train/
        mk("n/test/a/0.png", &png(32, 32, 0));
        let e = read(&root.join("n")).expect_err("no train");
        assert!(e.to_string().contains("no train/ folder"), "{e}");
        // an archive with neither
        let mut t = tar::Builder::new(Vec::new());
        add(&mut t, "images/a/0.png", &png(32, 32, 0));
        let p = root.join("x.tar");
        std::fs::write(&p, t.into_inner().expect("tar")).expect("write");
        let e = read(&p).expect_err("no split");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: no train/ folder (expected train/<class>/*.jpg and test/<class>/*.jpg)",
                p.display()
            )
        );
        // corrupt entry inside an archive is named as archive:entry
        let mut t = tar::Builder::new(Vec::new());
        add(&mut t, "train/a/0.png", &png(32, 32, 0));
        add(&mut t, "test/a/0.jpg", b"not a jpeg");
        let p = root.join("y.tar");
        std::fs::write(&p, t.into_inner().expect("tar")).expect("write");
        let e = read(&p).expect_err("corrupt entry");
        assert!(
            e.to_string().starts_with(&format!(
                "{}:test/a/0.jpg: cannot decode image",
                p.display()
            )),
            "{e}"
        );
        // a test class with no train folder
        mk("t/train/a/0.png", &png(32, 32, 0));
        mk("t/test/z/0.png", &png(32, 32, 0));
        let e = read(&root.join("t")).expect_err("extra class");
        assert!(
            e.to_string()
                .contains("test/ class `z` has no train/ folder"),
            "{e}"
        );
    }

    /// `(x, y, [r, g, b])`.
    type Pixel = (u32, u32, [u8; 3]);

    /// Pixels decoded by Pillow 13.0.0 (libjpeg-turbo), for an independent check:
    ///
    /// ```python
    /// import tarfile, io
    /// from PIL import Image
    /// t = tarfile.open("cifar10-jpeg.tar.gz")
    /// for name in ["train/airplane/0000.jpg", "train/cat/0123.jpg", "test/truck/0999.jpg"]:
    ///     im = Image.open(io.BytesIO(t.extractfile(name).read())).convert("RGB")
    ///     print(name, [im.getpixel(xy) for xy in [(0, 0), (31, 0), (5, 17), (16, 16), (31, 31)]])
    /// ```
    ///
    /// prints
    ///
    /// ```text
    /// train/airplane/0000.jpg [(200, 202, 197), (201, 202, 197), (127, 127, 129), (8, 7, 12), (236, 236, 238)]
    /// train/cat/0123.jpg [(159, 117, 77), (189, 126, 85), (164, 120, 85), (185, 172, 163), (214, 190, 156)]
    /// test/truck/0999.jpg [(255, 255, 246), (222, 231, 226), (128, 143, 138), (66, 35, 30), (113, 94, 90)]
    /// ```
    ///
    /// Indices: classes are sorted and files ordered by name, so `train/cat/0123.jpg` is train
    /// image 3 * 5000 + 123 and `test/truck/0999.jpg` is test image 9 * 1000 + 999.
    const PIL: [(usize, bool, [Pixel; 5]); 3] = [
        (
            0,
            true,
            [
                (0, 0, [200, 202, 197]),
                (31, 0, [201, 202, 197]),
                (5, 17, [127, 127, 129]),
                (16, 16, [8, 7, 12]),
                (31, 31, [236, 236, 238]),
            ],
        ),
        (
            15_123,
            true,
            [
                (0, 0, [159, 117, 77]),
                (31, 0, [189, 126, 85]),
                (5, 17, [164, 120, 85]),
                (16, 16, [185, 172, 163]),
                (31, 31, [214, 190, 156]),
            ],
        ),
        (
            9_999,
            false,
            [
                (0, 0, [255, 255, 246]),
                (31, 0, [222, 231, 226]),
                (5, 17, [128, 143, 138]),
                (16, 16, [66, 35, 30]),
                (31, 31, [113, 94, 90]),
            ],
        ),
    ];

    #[test]
    fn whole_cifar10_archive() {
        let path = cifar10_jpeg();
        let t0 = Instant::now();
        let d = read(&path).expect("decode the archive").dataset;
        eprintln!(
            "decoded {} images in {:.2?}",
            d.train.n + d.test.n,
            t0.elapsed()
        );
        assert_eq!(
            d.classes,
            [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck"
            ]
        );
        assert_eq!((d.train.n, d.test.n), (50_000, 10_000));
        assert_eq!((d.train.h, d.train.w), (32, 32));
        assert_eq!(d.train.images.len(), 50_000 * 3072);
        assert_eq!(d.train.counts(10), vec![5_000; 10]);
        assert_eq!(d.test.counts(10), vec![1_000; 10]);
        let mut max_diff = 0u8;
        for (index, train, pixels) in PIL {
            let split = if train { &d.train } else { &d.test };
            let img = split.image(index);
            for (x, y, rgb) in pixels {
                for c in 0..3 {
                    let ours = img[c * 1024 + (y * 32 + x) as usize];
                    let diff = ours.abs_diff(rgb[c]);
                    max_diff = max_diff.max(diff);
                    assert!(
                        diff <= 2,
                        "image {index} ({}) pixel ({x}, {y}) channel {c}: ours {ours}, PIL {}",
                        if train { "train" } else { "test" },
                        rgb[c]
                    );
                }
            }
        }
        eprintln!("max difference to PIL: {max_diff}");
    }
}
