//! CIFAR-10 / CIFAR-100 binary readers, and the official archive's download.
//!
//! Record layout (the "binary version" of both datasets): CIFAR-10 records are 1 label byte
//! then 3072 pixel bytes; CIFAR-100 records are 2 label bytes (coarse, fine) then 3072 pixel
//! bytes, and the fine label is used. The pixels are the R plane, then G, then B, each 32x32
//! row-major: already the CHW layout of [`Split`]. Any record count is accepted as long as the
//! file length is a positive multiple of the record size (the official files hold 10,000).
//!
//! [`read_cifar`] accepts the extracted folder (`cifar-10-batches-bin/`, `cifar-100-binary/`),
//! its parent, a folder holding the official archive, or the `.tar.gz` archive itself (read in
//! one streaming pass, never unpacked: only regular entries named like the data files are read,
//! into memory, at most [`MAX_FILE_BYTES`] each; links, devices and every other entry are
//! skipped, never followed, and nothing is written). [`fetch_archive`] downloads the official
//! archive with `curl` (or `wget`) into the store's scratch folder, checks its md5 with
//! `md5sum` (or `md5`) and only then moves it to `root/<official name>`: the one file pipe
//! writes outside the store, and only with `download: true`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rayon::prelude::*;

use super::{Dataset, Error, Hooks, ReadOptions, Result, Split, io_err, read_entry, to_chw};

/// The most bytes a data or names file of an archive may have (the official files are 30 MB;
/// each is read into memory whole).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Which CIFAR release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    /// CIFAR-10: 10 classes, 1 label byte.
    Cifar10,
    /// CIFAR-100: 100 fine classes, 2 label bytes (coarse, fine).
    Cifar100,
}

/// Bytes of pixels in one record (3 x 32 x 32).
pub const PIXELS: usize = 3 * 32 * 32;

const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

impl CifarKind {
    /// Label bytes before the pixels of a record.
    pub fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }
    /// Bytes of one record.
    pub fn record_len(self) -> usize {
        self.label_bytes() + PIXELS
    }
    /// Folder of the extracted release.
    pub fn dir_name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            CifarKind::Cifar100 => "cifar-100-binary",
        }
    }
    /// File name of the official archive.
    pub fn archive_name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-binary.tar.gz",
            CifarKind::Cifar100 => "cifar-100-binary.tar.gz",
        }
    }
    /// Official download URL.
    pub fn url(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            CifarKind::Cifar100 => "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        }
    }
    /// Official md5 of the archive.
    pub fn md5(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "c32a1d4ab5d03f1284b67883e8d87530",
            CifarKind::Cifar100 => "03b5dce01913d631647c71ecec9e9cb8",
        }
    }
    /// Training files, in order.
    pub fn train_files(self) -> &'static [&'static str] {
        match self {
            CifarKind::Cifar10 => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            CifarKind::Cifar100 => &["train.bin"],
        }
    }
    /// Test file.
    pub fn test_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "test_batch.bin",
            CifarKind::Cifar100 => "test.bin",
        }
    }
    /// The file of class names shipped with the release (one per line).
    fn names_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100 => "fine_label_names.txt",
        }
    }
    /// The official class names, label order.
    pub fn classes(self) -> Vec<String> {
        let names: &[&str] = match self {
            CifarKind::Cifar10 => &CIFAR10_CLASSES,
            CifarKind::Cifar100 => &CIFAR100_CLASSES,
        };
        names.iter().map(|s| (*s).to_string()).collect()
    }
    /// Number of classes.
    pub fn n_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }
    fn data_files(self) -> impl Iterator<Item = &'static str> {
        self.train_files()
            .iter()
            .copied()
            .chain(std::iter::once(self.test_file()))
    }
}

/// Where the binary files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CifarSource {
    /// The extracted folder holding the `.bin` files.
    Folder(PathBuf),
    /// A `.tar.gz` holding them.
    Archive(PathBuf),
}

impl CifarSource {
    /// The folder or archive path.
    pub fn path(&self) -> &Path {
        match self {
            CifarSource::Folder(p) | CifarSource::Archive(p) => p,
        }
    }
}

/// Finds the data under `root`: the folder of `.bin` files itself, its parent, a folder holding
/// the official archive, or an archive file.
///
/// # Errors
/// [`Error::Missing`] when `root` does not exist, [`Error::Layout`] when it holds none of these.
pub fn locate(kind: CifarKind, root: &Path) -> Result<CifarSource> {
    if !root.exists() {
        return Err(Error::Missing {
            path: root.to_path_buf(),
        });
    }
    if root.is_file() {
        return Ok(CifarSource::Archive(root.to_path_buf()));
    }
    if root.join(kind.test_file()).is_file() || root.join(kind.train_files()[0]).is_file() {
        return Ok(CifarSource::Folder(root.to_path_buf()));
    }
    let dir = root.join(kind.dir_name());
    if dir.is_dir() {
        return Ok(CifarSource::Folder(dir));
    }
    let archive = root.join(kind.archive_name());
    if archive.is_file() {
        return Ok(CifarSource::Archive(archive));
    }
    Err(Error::Layout {
        root: root.display().to_string(),
        message: format!(
            "holds no {}/ folder, {} archive or {} file",
            kind.dir_name(),
            kind.archive_name(),
            kind.test_file()
        ),
    })
}

/// Parses CIFAR records into CHW pixels and labels. `file` names the data in errors.
///
/// # Errors
/// [`Error::BadRecords`] when the length is not a positive multiple of the record size,
/// [`Error::BadLabel`] for a label out of range.
pub fn parse_records(kind: CifarKind, bytes: &[u8], file: &str) -> Result<(Vec<u8>, Vec<i64>)> {
    let rec = kind.record_len();
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(Error::BadRecords {
            path: file.to_string(),
            len: bytes.len(),
            record: rec,
        });
    }
    let n = bytes.len() / rec;
    let mut images = Vec::with_capacity(n * PIXELS);
    let mut labels = Vec::with_capacity(n);
    let lb = kind.label_bytes();
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        // CIFAR-100: byte 0 is the coarse label, byte 1 the fine one
        let label = r[lb - 1];
        if usize::from(label) >= kind.n_classes() {
            return Err(Error::BadLabel {
                path: file.to_string(),
                record: i,
                label,
                n_classes: kind.n_classes(),
            });
        }
        labels.push(i64::from(label));
        images.extend_from_slice(&r[lb..]);
    }
    Ok((images, labels))
}

/// Reads a CIFAR release from `root` (see [`locate`]).
///
/// # Errors
/// A missing path or data file, a bad record file, a corrupt archive, or a cancelled read.
pub fn read_cifar(
    kind: CifarKind,
    root: &Path,
    opts: &ReadOptions,
    hooks: &Hooks<'_>,
) -> Result<Dataset> {
    let source = locate(kind, root)?;
    let mut files: Vec<(&'static str, Option<Vec<u8>>)> =
        kind.data_files().map(|f| (f, None)).collect();
    let mut names: Option<String> = None;
    let location: Box<dyn Fn(&str) -> String>;
    match &source {
        CifarSource::Folder(dir) => {
            for (f, data) in &mut files {
                hooks.check()?;
                let p = dir.join(*f);
                if !p.is_file() {
                    return Err(Error::Missing { path: p });
                }
                *data = Some(std::fs::read(&p).map_err(io_err(&p))?);
            }
            names = std::fs::read_to_string(dir.join(kind.names_file())).ok();
            let dir = dir.clone();
            location = Box::new(move |f| dir.join(f).display().to_string());
        }
        CifarSource::Archive(archive) => {
            read_from_archive(kind, archive, &mut files, &mut names, hooks)?;
            let archive = archive.clone();
            location = Box::new(move |f| format!("{}:{}/{f}", archive.display(), kind.dir_name()));
        }
    }
    let classes = names
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|c| c.len() == kind.n_classes())
        .unwrap_or_else(|| kind.classes());

    let mut train = (Vec::new(), Vec::new());
    let mut test = (Vec::new(), Vec::new());
    for (i, (f, data)) in files.into_iter().enumerate() {
        let Some(bytes) = data else {
            return Err(Error::Missing {
                path: PathBuf::from(location(f)),
            });
        };
        let (imgs, labels) = parse_records(kind, &bytes, &location(f))?;
        let target = if i < kind.train_files().len() {
            &mut train
        } else {
            &mut test
        };
        target.0.extend(imgs);
        target.1.extend(labels);
    }
    let shown = source.path().display().to_string();
    let train = finish_split(train, opts, &shown, hooks)?;
    let test = finish_split(test, opts, &shown, hooks)?;
    Ok(Dataset {
        train,
        test,
        classes,
    })
}

/// Builds a split of 32x32 images, resized to `opts.image_size` when asked.
fn finish_split(
    (images, labels): (Vec<u8>, Vec<i64>),
    opts: &ReadOptions,
    file: &str,
    hooks: &Hooks<'_>,
) -> Result<Split> {
    let n = labels.len();
    if opts.image_size == 32 {
        return Ok(Split {
            images,
            labels,
            n,
            h: 32,
            w: 32,
        });
    }
    if !opts.resize {
        return Err(Error::WrongSize {
            file: file.to_string(),
            width: 32,
            height: 32,
            expected: opts.image_size,
        });
    }
    hooks.check()?;
    let s = opts.image_size as usize;
    let resized: Vec<Vec<u8>> = images
        .par_chunks(PIXELS)
        .map(|chw| {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let i = (y * 32 + x) as usize;
                image::Rgb([chw[i], chw[1024 + i], chw[2048 + i]])
            });
            to_chw(img, opts, file)
        })
        .collect::<Result<_>>()?;
    Ok(Split {
        images: resized.concat(),
        labels,
        n,
        h: s,
        w: s,
    })
}

/// One streaming pass over the archive, keeping the data files and the names file.
fn read_from_archive(
    kind: CifarKind,
    archive: &Path,
    files: &mut [(&'static str, Option<Vec<u8>>)],
    names: &mut Option<String>,
    hooks: &Hooks<'_>,
) -> Result<()> {
    let f = std::fs::File::open(archive).map_err(io_err(archive))?;
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(f));
    let mut tar = tar::Archive::new(gz);
    let bad = |e: std::io::Error| Error::Archive {
        archive: archive.to_path_buf(),
        message: e.to_string(),
    };
    for entry in tar.entries().map_err(bad)? {
        hooks.check()?;
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(bad)?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let name = name.to_string();
        let want = files.iter().position(|(f, _)| *f == name);
        if want.is_none() && name != kind.names_file() {
            continue;
        }
        let shown = path.display().to_string();
        let buf = read_entry(&mut entry, MAX_FILE_BYTES, archive, &shown)?;
        match want {
            Some(i) => files[i].1 = Some(buf),
            None => *names = String::from_utf8(buf).ok(),
        }
    }
    Ok(())
}

/// The md5 of a file, computed by the system's `md5sum` (or `md5 -q` on macOS).
///
/// # Errors
/// When neither tool runs, or it fails on the file.
pub fn md5_file(path: &Path) -> Result<String> {
    let attempts: [(&str, &[&str]); 2] = [("md5sum", &[]), ("md5", &["-q"])];
    let mut last = String::new();
    for (tool, args) in attempts {
        match Command::new(tool)
            .args(args)
            .arg(path)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                if let Some(h) = text.split_whitespace().next()
                    && h.len() == 32
                    && h.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Ok(h.to_ascii_lowercase());
                }
                last = format!("`{tool}` printed `{}`", text.trim());
            }
            Ok(out) => {
                last = format!(
                    "`{tool}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => last = format!("cannot run `{tool}`: {e}"),
        }
    }
    if last.is_empty() {
        last = "neither `md5sum` nor `md5` is installed".into();
    }
    Err(Error::Io {
        path: path.to_path_buf(),
        cause: std::io::Error::other(format!("cannot compute md5: {last}")),
    })
}

/// Checks a file's md5 against `expected`.
///
/// # Errors
/// [`Error::Checksum`] on a mismatch, or when the md5 cannot be computed.
pub fn verify_md5(path: &Path, expected: &str) -> Result<()> {
    let actual = md5_file(path)?;
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        })
    }
}

/// Makes sure the official archive is in `root` (downloading it into `scratch` and moving it
/// in when missing) and that its md5 is the official one. Returns the archive's path.
///
/// # Errors
/// No network, no `curl`/`wget`, an HTTP error, a checksum mismatch, or an I/O error.
pub fn fetch_archive(
    kind: CifarKind,
    root: &Path,
    scratch: &Path,
    hooks: &Hooks<'_>,
) -> Result<PathBuf> {
    fetch(
        kind.url(),
        kind.md5(),
        root,
        kind.archive_name(),
        scratch,
        hooks,
    )
}

/// [`fetch_archive`] for any URL, md5 and file name.
pub(crate) fn fetch(
    url: &str,
    md5: &str,
    root: &Path,
    name: &str,
    scratch: &Path,
    hooks: &Hooks<'_>,
) -> Result<PathBuf> {
    // `root` may name the archive itself
    let (dir, target) = if root.file_name().and_then(|n| n.to_str()) == Some(name) {
        (
            root.parent().map(Path::to_path_buf).unwrap_or_default(),
            root.to_path_buf(),
        )
    } else {
        (root.to_path_buf(), root.join(name))
    };
    if target.is_file() {
        verify_md5(&target, md5)?;
        return Ok(target);
    }
    std::fs::create_dir_all(scratch).map_err(io_err(scratch))?;
    let part = scratch.join(format!("{name}.part"));
    let log = scratch.join(format!("{name}.download.log"));
    download(url, &part, &log, hooks)?;
    if let Err(e) = verify_md5(&part, md5) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    // rename is atomic; across filesystems, copy next to the target first, then rename
    if std::fs::rename(&part, &target).is_err() {
        let tmp = dir.join(format!(".{name}.{}.part", std::process::id()));
        std::fs::copy(&part, &tmp).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::Io {
                path: target.clone(),
                cause: e,
            }
        })?;
        let _ = std::fs::remove_file(&part);
    }
    Ok(target)
}

/// Runs `curl -fL` (or `wget`) to fetch `url` into `dest`, polling for cancellation.
fn download(url: &str, dest: &Path, log: &Path, hooks: &Hooks<'_>) -> Result<()> {
    let dest_s = dest.display().to_string();
    let tools: [(&str, Vec<&str>); 2] = [
        (
            "curl",
            vec![
                "-fL",
                "-sS",
                "--retry",
                "2",
                "--connect-timeout",
                "30",
                "-o",
                &dest_s,
                url,
            ],
        ),
        ("wget", vec!["-q", "-O", &dest_s, url]),
    ];
    let fail = |message: String| Error::Download {
        url: url.to_string(),
        message,
    };
    for (tool, args) in tools {
        let log_file = std::fs::File::create(log).map_err(io_err(log))?;
        let mut child = match Command::new(tool)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail(format!("cannot run `{tool}`: {e}"))),
        };
        tracing::info!("downloading {url} with {tool}");
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => return Err(fail(format!("waiting for `{tool}`: {e}"))),
            }
            if (hooks.cancelled)() {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(dest);
                return Err(Error::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if status.success() {
            let _ = std::fs::remove_file(log);
            return Ok(());
        }
        let _ = std::fs::remove_file(dest);
        let stderr = std::fs::read_to_string(log).unwrap_or_default();
        let _ = std::fs::remove_file(log);
        // retries repeat the same message: the last line says it
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let code = status
            .code()
            .map_or_else(|| "a signal".to_string(), |c| format!("code {c}"));
        return Err(fail(format!(
            "`{tool}` exited with {code} (no network?): {}",
            last.trim()
        )));
    }
    Err(fail(
        "neither `curl` nor `wget` is installed; download the archive by hand into the root folder"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;

    /// `n` CIFAR-10 records: record `i` has label `i % 10` and pixel `j` = `(i + j) % 256`.
    fn records10(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push((i % 10) as u8);
            out.extend((0..PIXELS).map(|j| ((i + j) % 256) as u8));
        }
        out
    }

    #[test]
    fn cifar10_records_any_count() {
        let (imgs, labels) =
            parse_records(CifarKind::Cifar10, &records10(7), "x.bin").expect("7 records");
        assert_eq!(labels, vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(imgs.len(), 7 * PIXELS);
        // record 3: R plane starts at 3, G plane at 3 + 1024, B at 3 + 2048 (mod 256)
        assert_eq!(imgs[3 * PIXELS], 3);
        assert_eq!(imgs[3 * PIXELS + 1024], 3);
        assert_eq!(imgs[3 * PIXELS + 1025], 4);
        assert_eq!(imgs[3 * PIXELS + 3071], ((3 + 3071) % 256) as u8);
        let mut short = records10(2);
        short.pop();
        let e = parse_records(CifarKind::Cifar10, &short, "x.bin").expect_err("truncated");
        assert_eq!(
            e.to_string(),
            "x.bin: 6145 bytes is not a positive multiple of the 3073-byte record"
        );
        let mut bad = records10(3);
        bad[2 * 3073] = 10;
        let e = parse_records(CifarKind::Cifar10, &bad, "x.bin").expect_err("label 10");
        assert_eq!(
            e.to_string(),
            "x.bin: record 2 has label 10, expected 0..10"
        );
    }

    #[test]
    fn cifar100_uses_the_fine_label() {
        let mut rec = vec![3u8, 77];
        rec.extend(std::iter::repeat_n(5u8, PIXELS));
        let (imgs, labels) = parse_records(CifarKind::Cifar100, &rec, "t.bin").expect("one");
        assert_eq!(labels, vec![77]);
        assert_eq!(imgs, vec![5u8; PIXELS]);
        let names = CifarKind::Cifar100.classes();
        assert_eq!(names.len(), 100);
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "fine label names are alphabetical");
        assert_eq!(names[77], "snail");
    }

    fn write_release(dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
        for (k, f) in CifarKind::Cifar10.train_files().iter().enumerate() {
            std::fs::write(dir.join(f), records10(3 + k)).expect("write");
        }
        std::fs::write(dir.join("test_batch.bin"), records10(4)).expect("write");
    }

    #[test]
    fn archive_links_are_never_followed_and_nothing_is_written() {
        let tmp = TempDir::new("cifar-hostile");
        let dir = tmp.path().join("release");
        write_release(&dir);
        let raw = |t: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, data: &[u8]| {
            crate::data::imagefolder::tests::append_raw(t, path, data, kind);
        };
        let mut t = tar::Builder::new(Vec::new());
        for f in CifarKind::Cifar10.data_files() {
            let bytes = std::fs::read(dir.join(f)).expect("read");
            if f == "data_batch_1.bin" {
                // a symlink where the data should be: skipped, never followed
                raw(
                    &mut t,
                    "cifar-10-batches-bin/data_batch_1.bin",
                    tar::EntryType::Symlink,
                    &[],
                );
            } else {
                // `..` in the path: read in memory like any entry, written nowhere
                raw(
                    &mut t,
                    &format!("../../x/{f}"),
                    tar::EntryType::Regular,
                    &bytes,
                );
            }
        }
        let sub = tmp.path().join("sub");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let archive = sub.join("c.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &t.into_inner().expect("tar")).expect("gz");
        std::fs::write(&archive, gz.finish().expect("gz")).expect("write");
        let e = read_cifar(
            CifarKind::Cifar10,
            &archive,
            &ReadOptions::default(),
            &Hooks::none(),
        )
        .expect_err("the symlinked batch is missing");
        assert_eq!(
            e.to_string(),
            format!(
                "{}:cifar-10-batches-bin/data_batch_1.bin: no such file or folder",
                archive.display()
            )
        );
        let listing: Vec<_> = std::fs::read_dir(&sub)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(listing, ["c.tar.gz"]);
        assert!(
            !tmp.path().join("x").exists()
                && !tmp
                    .path()
                    .parent()
                    .expect("tmp")
                    .join("x/data_batch_2.bin")
                    .exists()
        );
    }

    #[test]
    fn reads_folder_parent_and_archive() {
        let tmp = TempDir::new("cifar");
        let dir = tmp.path().join("cifar-10-batches-bin");
        write_release(&dir);
        let opts = ReadOptions::default();
        let a = read_cifar(CifarKind::Cifar10, &dir, &opts, &Hooks::none()).expect("folder");
        assert_eq!(a.train.n, 3 + 4 + 5 + 6 + 7);
        assert_eq!(a.test.n, 4);
        assert_eq!(a.classes[0], "airplane");
        assert_eq!(&a.train.labels[..4], &[0, 1, 2, 0]);
        let b = read_cifar(CifarKind::Cifar10, tmp.path(), &opts, &Hooks::none()).expect("parent");
        assert_eq!(a, b);
        // the same files inside a .tar.gz (the official layout)
        let archive = tmp.path().join("c.tar.gz");
        let f = std::fs::File::create(&archive).expect("create");
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        t.append_dir_all("cifar-10-batches-bin", &dir)
            .expect("append");
        t.into_inner().expect("tar").finish().expect("gz");
        let c = read_cifar(CifarKind::Cifar10, &archive, &opts, &Hooks::none()).expect("archive");
        assert_eq!(a, c);
        // resize
        let r = read_cifar(
            CifarKind::Cifar10,
            &dir,
            &ReadOptions {
                image_size: 16,
                resize: true,
            },
            &Hooks::none(),
        )
        .expect("resized");
        assert_eq!(
            (r.train.h, r.train.w, r.train.images.len()),
            (16, 16, 25 * 768)
        );
        // a missing batch is named
        std::fs::remove_file(dir.join("data_batch_4.bin")).expect("rm");
        let e = read_cifar(CifarKind::Cifar10, &dir, &opts, &Hooks::none()).expect_err("missing");
        assert!(e.to_string().contains("data_batch_4.bin"), "{e}");
        let e = read_cifar(
            CifarKind::Cifar10,
            &tmp.path().join("nope"),
            &opts,
            &Hooks::none(),
        )
        .expect_err("no root");
        assert!(
            e.to_string().ends_with("nope: no such file or folder"),
            "{e}"
        );
    }

    #[test]
    fn fetch_verifies_md5_and_moves_atomically() {
        let tmp = TempDir::new("fetch");
        let src = tmp.path().join("served.bin");
        std::fs::write(&src, b"").expect("write");
        let url = format!("file://{}", src.display());
        let root = tmp.path().join("root");
        let scratch = tmp.path().join("scratch");
        // md5 of the empty file
        let empty = "d41d8cd98f00b204e9800998ecf8427e";
        let e = fetch(
            &url,
            "0123456789abcdef0123456789abcdef",
            &root,
            "a.tgz",
            &scratch,
            &Hooks::none(),
        )
        .expect_err("mismatch");
        assert!(e.to_string().contains("does not match the official"), "{e}");
        assert!(!root.join("a.tgz").exists(), "nothing kept on mismatch");
        let got = fetch(&url, empty, &root, "a.tgz", &scratch, &Hooks::none()).expect("ok");
        assert_eq!(got, root.join("a.tgz"));
        assert!(got.is_file());
        assert!(!scratch.join("a.tgz.part").exists());
        // present: verified, not downloaded again (the URL is gone now)
        std::fs::remove_file(&src).expect("rm");
        fetch(&url, empty, &root, "a.tgz", &scratch, &Hooks::none()).expect("present");
        let e = fetch(&url, empty, &root, "b.tgz", &scratch, &Hooks::none()).expect_err("gone");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot download {url}: `curl` exited")),
            "{e}"
        );
    }
}
