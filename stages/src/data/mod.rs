//! Data readers and the dataset artifact format.
//!
//! # Brief overview
//!
//! Every reader returns the same in-memory [`Dataset`]: a train and a test [`Split`] of u8
//! images in CHW layout (`n * 3 * h * w` bytes, R, G, B planes, row-major) with i64 labels,
//! plus the class names (label `i` is `classes[i]`).
//!
//! - [`cifar`]: the official CIFAR-10 / CIFAR-100 binary release, from its folder, the folder's
//!   parent, or straight from the official `.tar.gz`; optional download with md5 check.
//! - [`imagefolder`]: `train/<class>/*.{jpg,jpeg,png}` and `test/<class>/*`, from a folder or
//!   read directly from inside a `.tar` / `.tar.gz` (never unpacked to disk); parallel decode.
//! - [`synthetic`](mod@synthetic): a seeded procedural dataset of coloured shapes on textured backgrounds.
//! - [`tensor_io`]: the `data.safetensors` artifact ([`write_dataset`] / [`load_dataset`]).
//!
//! [`Dataset::balanced_subset`] draws seeded per-class subsets and [`Split::stats`] the
//! per-channel mean / std that the `dataset` stage records.
//!
//! ```
//! use pipe_stages::data::{synthetic, SyntheticConfig};
//! let d = synthetic(&SyntheticConfig { n_classes: 4, n_train: 8, n_test: 4, image_size: 16, seed: 1 });
//! assert_eq!((d.train.n, d.train.h, d.train.w), (8, 16, 16));
//! assert_eq!(d.train.images.len(), 8 * 3 * 16 * 16);
//! assert_eq!(d.train.counts(d.classes.len()), vec![2, 2, 2, 2]);
//! ```

pub mod adversarial;
pub mod cifar;
#[cfg(feature = "hub")]
pub mod hub;
pub mod imagefolder;
pub mod synthetic;
pub mod tensor_io;

use std::path::PathBuf;

use rayon::prelude::*;

use crate::rng::Rng;

pub use cifar::{CifarKind, read_cifar};
pub use imagefolder::{FolderData, bench_decode, read_image_folder};
pub use synthetic::{SyntheticConfig, synthetic};
pub use tensor_io::{load_dataset, write_dataset};

/// Errors of the data readers and writers; each names the file (or archive entry) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a file or folder.
    #[error("{path}: {cause}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The given path does not exist.
    #[error("{path}: no such file or folder")]
    Missing {
        /// The missing path.
        path: PathBuf,
    },
    /// A tar archive that cannot be read.
    #[error("{archive}: cannot read the archive: {message}")]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A tar entry refused for safety (absolute path, `..`, link or device file).
    #[error("{archive}: refusing archive entry `{entry}`: {reason}")]
    UnsafeEntry {
        /// The archive.
        archive: PathBuf,
        /// The entry's path as stored.
        entry: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An image that does not decode.
    #[error("{file}: cannot decode image: {message}")]
    Corrupt {
        /// The file (`archive:entry` inside an archive).
        file: String,
        /// The decoder's message.
        message: String,
    },
    /// An image of the wrong size (and `resize` not given).
    #[error(
        "{file}: image is {width}x{height}, expected {expected}x{expected} (set `resize: true` to resize)"
    )]
    WrongSize {
        /// The file (`archive:entry` inside an archive).
        file: String,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// The expected side.
        expected: u32,
    },
    /// A class folder with no images.
    #[error("{folder}: class folder holds no .jpg/.jpeg/.png images")]
    EmptyClass {
        /// The folder (`archive:train/cat/` inside an archive).
        folder: String,
    },
    /// No `train/` or `test/` folder, or no class folder in one.
    #[error("{root}: {message}")]
    Layout {
        /// The folder or archive.
        root: String,
        /// What is missing.
        message: String,
    },
    /// A CIFAR binary file whose length is not a multiple of the record size.
    #[error("{path}: {len} bytes is not a positive multiple of the {record}-byte record")]
    BadRecords {
        /// The file (`archive:entry` inside an archive).
        path: String,
        /// Its length.
        len: usize,
        /// The record size.
        record: usize,
    },
    /// A label outside the class range.
    #[error("{path}: record {record} has label {label}, expected 0..{n_classes}")]
    BadLabel {
        /// The file.
        path: String,
        /// Record index.
        record: usize,
        /// The label found.
        label: u8,
        /// Number of classes.
        n_classes: usize,
    },
    /// A class with fewer images than a balanced subset asks for.
    #[error("{split} class `{class}` has {have} images, fewer than the {want} per class asked for")]
    TooFew {
        /// `train` or `test`.
        split: &'static str,
        /// Class name.
        class: String,
        /// Images it has.
        have: usize,
        /// Images asked for.
        want: usize,
    },
    /// A malformed dataset artifact.
    #[error("{path}: {message}")]
    Format {
        /// The artifact file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A download that failed (no network, no curl/wget, HTTP error).
    #[error("cannot download {url}: {message}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A file whose md5 is not the official one.
    #[error(
        "{path}: md5 {actual} does not match the official {expected} (delete it to download again)"
    )]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Official md5.
        expected: String,
        /// Its md5.
        actual: String,
    },
    /// The run was cancelled.
    #[error("interrupted")]
    Cancelled,
}

/// First word of every random stream the data module derives from the user's seed, so its
/// streams never coincide with those of other modules using the same seed.
pub(crate) const DATASET_STREAM: u64 = 0xda7a;

/// Result of the data module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads one tar entry into memory, refusing one that is (or claims to be) larger than
/// `limit` bytes: an archive's header may claim any size, and a gzip bomb may inflate to any
/// size, so neither may decide how much is allocated. `shown` names the entry in errors.
///
/// # Errors
/// [`Error::Archive`] naming the entry when it is too large or cannot be read.
pub(crate) fn read_entry<R: std::io::Read>(
    entry: &mut tar::Entry<'_, R>,
    limit: u64,
    archive: &std::path::Path,
    shown: &str,
) -> Result<Vec<u8>> {
    let too_big = |size: u64| Error::Archive {
        archive: archive.to_path_buf(),
        message: format!(
            "entry `{shown}` is {size} bytes, more than the {} MiB such an entry may have",
            limit >> 20
        ),
    };
    let size = entry.size();
    if size > limit {
        return Err(too_big(size));
    }
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut *entry, limit + 1), &mut buf)
        .map_err(|e| Error::Archive {
            archive: archive.to_path_buf(),
            message: format!("entry `{shown}`: {e}"),
        })?;
    if buf.len() as u64 > limit {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |cause| Error::Io { path, cause }
}

/// One split: `n` images of `3 x h x w` u8 in CHW layout, and their labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// `n * 3 * h * w` bytes: image `i` is `images[i*3*h*w..(i+1)*3*h*w]`, R, G, B planes.
    pub images: Vec<u8>,
    /// `n` labels, each in `0..classes.len()`.
    pub labels: Vec<i64>,
    /// Number of images.
    pub n: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Split {
    /// An empty split of `h x w` images.
    pub fn empty(h: usize, w: usize) -> Split {
        Split {
            images: Vec::new(),
            labels: Vec::new(),
            n: 0,
            h,
            w,
        }
    }

    /// Bytes per image (`3 * h * w`).
    pub fn image_len(&self) -> usize {
        3 * self.h * self.w
    }

    /// Image `i` (CHW bytes).
    ///
    /// # Panics
    /// When `i >= n`.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.image_len();
        &self.images[i * len..(i + 1) * len]
    }

    /// Images per class, for `n_classes` classes.
    pub fn counts(&self, n_classes: usize) -> Vec<usize> {
        let mut c = vec![0; n_classes];
        for &l in &self.labels {
            if let Some(slot) = usize::try_from(l).ok().and_then(|l| c.get_mut(l)) {
                *slot += 1;
            }
        }
        c
    }

    /// The images at `indices` (in that order).
    pub fn select(&self, indices: &[usize]) -> Split {
        let len = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * len);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Split {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            n: indices.len(),
            h: self.h,
            w: self.w,
        }
    }

    /// Seeded balanced subset: `per_class` images of every class, drawn without replacement
    /// (a seeded shuffle of each class's indices), kept in their original order.
    ///
    /// # Errors
    /// [`Error::TooFew`] when a class has fewer than `per_class` images.
    pub fn balanced_subset(
        &self,
        classes: &[String],
        per_class: usize,
        seed: u64,
        split: &'static str,
    ) -> Result<Split> {
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes.len()];
        for (i, &l) in self.labels.iter().enumerate() {
            if let Some(v) = usize::try_from(l).ok().and_then(|l| by_class.get_mut(l)) {
                v.push(i);
            }
        }
        let tag = if split == "train" { 1 } else { 2 };
        let mut chosen = Vec::with_capacity(per_class * classes.len());
        for (c, idx) in by_class.iter().enumerate() {
            if idx.len() < per_class {
                return Err(Error::TooFew {
                    split,
                    class: classes[c].clone(),
                    have: idx.len(),
                    want: per_class,
                });
            }
            let mut rng = Rng::derive(seed, &[DATASET_STREAM, tag, c as u64]);
            chosen.extend(
                rng.sample_indices(idx.len(), per_class)
                    .into_iter()
                    .map(|k| idx[k]),
            );
        }
        chosen.sort_unstable();
        Ok(self.select(&chosen))
    }

    /// Per-channel mean and (population) standard deviation of the pixel values in `[0, 1]`.
    /// Sums are exact integers, so the result does not depend on the thread count.
    pub fn stats(&self) -> ([f64; 3], [f64; 3]) {
        let plane = self.h * self.w;
        if self.n == 0 || plane == 0 {
            return ([0.0; 3], [0.0; 3]);
        }
        let (sum, sq) = self
            .images
            .par_chunks(plane)
            .enumerate()
            .fold(
                || ([0u64; 3], [0u64; 3]),
                |(mut s, mut q), (i, p)| {
                    let c = i % 3;
                    for &v in p {
                        let v = u64::from(v);
                        s[c] += v;
                        q[c] += v * v;
                    }
                    (s, q)
                },
            )
            .reduce(
                || ([0u64; 3], [0u64; 3]),
                |(mut s, mut q), (s2, q2)| {
                    for c in 0..3 {
                        s[c] += s2[c];
                        q[c] += q2[c];
                    }
                    (s, q)
                },
            );
        let count = (self.n * plane) as f64;
        let mut mean = [0.0; 3];
        let mut std = [0.0; 3];
        for c in 0..3 {
            let m = sum[c] as f64 / count / 255.0;
            let m2 = sq[c] as f64 / count / (255.0 * 255.0);
            mean[c] = m;
            std[c] = (m2 - m * m).max(0.0).sqrt();
        }
        (mean, std)
    }
}

/// A dataset: train and test splits and the class names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// Training images.
    pub train: Split,
    /// Test images.
    pub test: Split,
    /// Class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
}

impl Dataset {
    /// Seeded balanced subsets of either split (`None` keeps a split whole). Train and test
    /// draw from independent streams of the same seed.
    ///
    /// # Errors
    /// [`Error::TooFew`] when a class has fewer images than asked for.
    pub fn balanced_subset(
        self,
        train_per_class: Option<usize>,
        test_per_class: Option<usize>,
        seed: u64,
    ) -> Result<Dataset> {
        let train = match train_per_class {
            Some(k) => self
                .train
                .balanced_subset(&self.classes, k, seed, "train")?,
            None => self.train,
        };
        let test = match test_per_class {
            Some(k) => self.test.balanced_subset(&self.classes, k, seed, "test")?,
            None => self.test,
        };
        Ok(Dataset {
            train,
            test,
            classes: self.classes,
        })
    }
}

/// Options shared by the image readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// Expected side of the (square) images.
    pub image_size: u32,
    /// Resize images of another size to `image_size` (bilinear, area-averaging when
    /// shrinking; a non-square image is stretched to the square) instead of failing.
    pub resize: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            image_size: 32,
            resize: false,
        }
    }
}

/// Progress and cancellation callbacks for long reads (called from the calling thread only).
pub struct Hooks<'a> {
    /// `(done, total, message)`.
    pub progress: &'a dyn Fn(u64, u64, &str),
    /// Polled between batches; `true` stops the read with [`Error::Cancelled`].
    pub cancelled: &'a dyn Fn() -> bool,
}

impl Hooks<'static> {
    /// No progress, never cancelled.
    pub fn none() -> Hooks<'static> {
        Hooks {
            progress: &|_, _, _| {},
            cancelled: &|| false,
        }
    }
}

impl Hooks<'_> {
    pub(crate) fn check(&self) -> Result<()> {
        if (self.cancelled)() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Converts an RGB image to CHW bytes of `opts.image_size` square, resizing when allowed.
pub(crate) fn to_chw(img: image::RgbImage, opts: &ReadOptions, file: &str) -> Result<Vec<u8>> {
    let s = opts.image_size;
    let img = if img.dimensions() == (s, s) {
        img
    } else if opts.resize {
        image::imageops::resize(&img, s, s, image::imageops::FilterType::Triangle)
    } else {
        return Err(Error::WrongSize {
            file: file.to_string(),
            width: img.width(),
            height: img.height(),
            expected: s,
        });
    };
    let plane = (s * s) as usize;
    let mut out = vec![0u8; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (((px, r), g), b) in img.as_raw().chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = px[0];
        *g = px[1];
        *b = px[2];
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Temp dirs for tests.
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// The tests' synthetic 4-class data (seed 3) of `side × side` images.
    pub(crate) fn four_classes(n_train: usize, n_test: usize, side: u32) -> super::Dataset {
        super::synthetic(&super::SyntheticConfig {
            n_classes: 4,
            n_train,
            n_test,
            image_size: side,
            seed: 3,
        })
    }

    /// A temp dir unique to this process and test, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> TempDir {
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let p = std::env::temp_dir().join(format!(
                "pipe-stages-test-{}-{n}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A training loop's cancellation hook (polled before every batch) that never cancels
    /// and copies `from` to `to` when polled the `n`-th time (0-based): with a state written
    /// after every batch, the copy is the state after the batches before that poll.
    pub(crate) fn copy_at_poll(n: usize, from: PathBuf, to: PathBuf) -> impl Fn() -> bool + Sync {
        let polls = AtomicUsize::new(0);
        move || {
            if polls.fetch_add(1, Ordering::SeqCst) == n {
                std::fs::copy(&from, &to).expect("copy the state");
            }
            false
        }
    }

    /// A cancellation hook that cancels from its `n`-th poll (0-based) on.
    pub(crate) fn cancel_at_poll(n: usize) -> impl Fn() -> bool + Sync {
        let polls = AtomicUsize::new(0);
        move || polls.fetch_add(1, Ordering::SeqCst) >= n
    }

    /// The real CIFAR-10 JPEG archive shared with the project (CI has it).
    pub(crate) fn cifar10_jpeg() -> PathBuf {
        let p = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/cifar10-jpeg.tar.gz"
        ));
        assert!(
            p.is_file(),
            "test data missing: {} (the CIFAR-10 JPEG archive, train/<class>/*.jpg + test/<class>/*.jpg)",
            p.display()
        );
        p
    }
}

/// What `source: hf` fetches (keyed instead of content, which is unknown before the download).
pub fn hub_source() -> &'static str {
    "huggingface:cifar10@refs/convert/parquet:plain_text/{train,test}/0000.parquet"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(labels: &[i64], h: usize, w: usize) -> Split {
        let len = 3 * h * w;
        // image i starts with i's two bytes, so every image is unique
        let images = (0..labels.len())
            .flat_map(|i| {
                (0..len).map(move |j| match j {
                    0 => (i % 256) as u8,
                    1 => (i / 256) as u8,
                    _ => ((i * 13 + j * 7) % 251) as u8,
                })
            })
            .collect();
        Split {
            images,
            labels: labels.to_vec(),
            n: labels.len(),
            h,
            w,
        }
    }

    #[test]
    fn balanced_subsets_are_exact_and_seeded() {
        let labels: Vec<i64> = (0..300).map(|i| i % 3).collect();
        let s = split(&labels, 2, 2);
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let a = s.balanced_subset(&classes, 7, 1, "train").expect("enough");
        assert_eq!(a.n, 21);
        assert_eq!(a.counts(3), vec![7, 7, 7]);
        assert_eq!(a.images.len(), 21 * 12);
        let again = s.balanced_subset(&classes, 7, 1, "train").expect("enough");
        assert_eq!(a, again, "same seed, same subset");
        let other = s.balanced_subset(&classes, 7, 2, "train").expect("enough");
        assert_ne!(a, other, "another seed, another subset");
        // the images travel with their labels: image i of the source is found in the subset
        for i in 0..a.n {
            let src = (0..s.n)
                .find(|&j| s.image(j) == a.image(i))
                .expect("subset image comes from the split");
            assert_eq!(s.labels[src], a.labels[i]);
        }
        let e = s
            .balanced_subset(&classes, 101, 0, "test")
            .expect_err("too few");
        assert_eq!(
            e.to_string(),
            "test class `a` has 100 images, fewer than the 101 per class asked for"
        );
    }

    #[test]
    fn stats_match_a_direct_computation() {
        let s = split(&[0, 1, 2, 0, 1], 3, 4);
        let (mean, std) = s.stats();
        for c in 0..3 {
            let vals: Vec<f64> = (0..s.n)
                .flat_map(|i| s.image(i)[c * 12..(c + 1) * 12].to_vec())
                .map(|v| f64::from(v) / 255.0)
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / vals.len() as f64;
            assert!((mean[c] - m).abs() < 1e-12, "mean {c}: {} vs {m}", mean[c]);
            assert!(
                (std[c] - var.sqrt()).abs() < 1e-9,
                "std {c}: {} vs {}",
                std[c],
                var.sqrt()
            );
        }
        assert!(mean[0] > 0.0 && std[0] > 0.0);
    }

    #[test]
    fn to_chw_checks_size_and_resizes() {
        let img = image::RgbImage::from_fn(4, 2, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let opts = ReadOptions {
            image_size: 4,
            resize: false,
        };
        let e = to_chw(img.clone(), &opts, "a.png").expect_err("wrong size");
        assert_eq!(
            e.to_string(),
            "a.png: image is 4x2, expected 4x4 (set `resize: true` to resize)"
        );
        let img2 = image::RgbImage::from_fn(2, 2, |x, y| image::Rgb([x as u8, y as u8 * 10, 9]));
        let out = to_chw(
            img2,
            &ReadOptions {
                image_size: 2,
                resize: false,
            },
            "b.png",
        )
        .expect("right size");
        assert_eq!(out, vec![0, 1, 0, 1, 0, 0, 10, 10, 9, 9, 9, 9]);
        let out = to_chw(
            img,
            &ReadOptions {
                image_size: 4,
                resize: true,
            },
            "a.png",
        )
        .expect("resized");
        assert_eq!(out.len(), 48);
        assert!(out[32..].iter().all(|&v| v == 9), "constant plane stays");
    }
}
