//! The adversarial test-set artifact that `attack_dataset` writes and `evaluate` (or a transfer
//! experiment) reads: `adversarial.safetensors`.
//!
//! # Format
//!
//! | tensor | dtype, shape | meaning |
//! |---|---|---|
//! | `images` | F32 `[N, 3, H, W]` | the adversarial images `x + δ`, values in `[0, 1]` (float: u8 would round the perturbation away) |
//! | `labels` | I64 `[N]` | the true labels, in `0..classes.len()` |
//! | `loss` | F32 `[N]` | the attacked classifier's cross-entropy at each stored image (eval mode) |
//! | `source_index` | I64 `[N]` | the index of each image in the source dataset's test split |
//!
//! The safetensors metadata holds `format` (`pipe-adversarial/1`), `classes` (a JSON list of
//! class names, label `i` is `classes[i]`) and `attack` (a JSON object: the resolved attack
//! config that produced the set). Any safetensors reader can load it:
//! `safetensors.torch.load_file(path)["images"]` is the `N×3×H×W` float tensor of METHODS.md 9.
//!
//! ```
//! use pipe_stages::data::adversarial::AdversarialSet;
//! let set = AdversarialSet {
//!     images: vec![0.5; 2 * 3 * 2 * 2], labels: vec![1, 0], loss: vec![0.1, 2.0],
//!     source_index: vec![4, 7], n: 2, h: 2, w: 2,
//!     classes: vec!["a".into(), "b".into()], attack: serde_json::json!({"norm": "linf"}),
//! };
//! let dir = std::env::temp_dir().join(format!("adv-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! set.write(&dir.join("adversarial.safetensors"))?;
//! assert_eq!(AdversarialSet::load(&dir)?, set);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::Value;

use super::tensor_io::write_safetensors;
use super::{Error, Result, io_err};

/// File name of the artifact inside an `attack_dataset` entry.
pub const ADVERSARIAL_FILE: &str = "adversarial.safetensors";

/// The value of the `format` metadata key.
pub const FORMAT: &str = "pipe-adversarial/1";

/// An adversarial copy of (a subset of) a test split.
#[derive(Clone, Debug, PartialEq)]
pub struct AdversarialSet {
    /// `n * 3 * h * w` values in `[0, 1]`, image-major CHW.
    pub images: Vec<f32>,
    /// `n` labels.
    pub labels: Vec<i64>,
    /// `n` per-example cross-entropies of the attacked classifier at the stored images.
    pub loss: Vec<f32>,
    /// `n` indices into the source dataset's test split.
    pub source_index: Vec<i64>,
    /// Number of images.
    pub n: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// The attack config that produced the set.
    pub attack: Value,
}

fn format_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn le_bytes_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl AdversarialSet {
    /// Values per image (`3 * h * w`).
    pub fn image_len(&self) -> usize {
        3 * self.h * self.w
    }

    /// Image `i` (CHW values).
    ///
    /// # Panics
    /// When `i >= n`.
    pub fn image(&self, i: usize) -> &[f32] {
        let len = self.image_len();
        &self.images[i * len..(i + 1) * len]
    }

    /// Checks that the buffers agree with `n`, `h`, `w`, that labels are in range and pixels
    /// in `[0, 1]`.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.n;
        if self.images.len() != n * self.image_len()
            || self.labels.len() != n
            || self.loss.len() != n
            || self.source_index.len() != n
        {
            return Err(format!(
                "{} image values, {} labels, {} losses and {} source indices for n = {n} of 3x{}x{}",
                self.images.len(),
                self.labels.len(),
                self.loss.len(),
                self.source_index.len(),
                self.h,
                self.w
            ));
        }
        if let Some(bad) = self
            .labels
            .iter()
            .find(|&&l| usize::try_from(l).map_or(true, |l| l >= self.classes.len()))
        {
            return Err(format!("label {bad} outside 0..{}", self.classes.len()));
        }
        if let Some(bad) = self.images.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(format!("pixel value {bad} outside [0, 1]"));
        }
        if let Some(bad) = self.source_index.iter().find(|&&i| i < 0) {
            return Err(format!("negative source index {bad}"));
        }
        Ok(())
    }

    /// Writes the set to `path` (see the module docs for the layout).
    ///
    /// # Errors
    /// An inconsistent set ([`AdversarialSet::validate`]) or an I/O error, naming the file.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.validate().map_err(|m| format_err(path, m))?;
        let st = |e: safetensors::SafeTensorError| format_err(path, e.to_string());
        let images = le_bytes_f32(&self.images);
        let labels = le_bytes_i64(&self.labels);
        let loss = le_bytes_f32(&self.loss);
        let index = le_bytes_i64(&self.source_index);
        let n = self.n;
        let tensors = vec![
            (
                "images".to_string(),
                TensorView::new(Dtype::F32, vec![n, 3, self.h, self.w], &images).map_err(st)?,
            ),
            (
                "labels".to_string(),
                TensorView::new(Dtype::I64, vec![n], &labels).map_err(st)?,
            ),
            (
                "loss".to_string(),
                TensorView::new(Dtype::F32, vec![n], &loss).map_err(st)?,
            ),
            (
                "source_index".to_string(),
                TensorView::new(Dtype::I64, vec![n], &index).map_err(st)?,
            ),
        ];
        let json = |what: &str, v: serde_json::Result<String>| {
            v.map_err(|e| format_err(path, format!("{what}: {e}")))
        };
        let meta = BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "classes".to_string(),
                json("class names", serde_json::to_string(&self.classes))?,
            ),
            (
                "attack".to_string(),
                json("attack config", serde_json::to_string(&self.attack))?,
            ),
        ]);
        write_safetensors(path, tensors, meta)
    }

    /// Reads a set: the `adversarial.safetensors` file, or the entry folder holding it.
    ///
    /// # Errors
    /// A missing or unreadable file, a wrong format tag, tensors of the wrong names, dtypes or
    /// shapes, labels out of range or pixels outside `[0, 1]`; each names the file.
    pub fn load(path: &Path) -> Result<AdversarialSet> {
        let path: PathBuf = if path.is_dir() {
            path.join(ADVERSARIAL_FILE)
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(&path, e.to_string()))?;
        let (_, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|e| format_err(&path, e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get_meta = |k: &str| {
            meta.get(k).ok_or_else(|| {
                format_err(
                    &path,
                    format!(
                        "no `{k}` in the safetensors metadata (not an `attack_dataset` artifact?)"
                    ),
                )
            })
        };
        let format = get_meta("format")?;
        if format != FORMAT {
            return Err(format_err(
                &path,
                format!("format `{format}`, expected `{FORMAT}`"),
            ));
        }
        let classes: Vec<String> = serde_json::from_str(get_meta("classes")?)
            .map_err(|e| format_err(&path, format!("`classes` metadata: {e}")))?;
        let attack: Value = serde_json::from_str(get_meta("attack")?)
            .map_err(|e| format_err(&path, format!("`attack` metadata: {e}")))?;
        let get = |t: &str| {
            st.tensor(t)
                .map_err(|e| format_err(&path, format!("tensor `{t}`: {e}")))
        };
        let images = get("images")?;
        let (n, h, w) = match (images.dtype(), images.shape()) {
            (Dtype::F32, &[n, 3, h, w]) => (n, h, w),
            (dt, shape) => {
                return Err(format_err(
                    &path,
                    format!("`images` is {dt:?} {shape:?}, expected F32 [N, 3, H, W]"),
                ));
            }
        };
        let vector = |t: &str, dtype: Dtype| -> Result<Vec<u8>> {
            let v = get(t)?;
            if v.dtype() != dtype || v.shape() != [n] {
                return Err(format_err(
                    &path,
                    format!(
                        "`{t}` is {:?} {:?}, expected {dtype:?} [{n}]",
                        v.dtype(),
                        v.shape()
                    ),
                ));
            }
            Ok(v.data().to_vec())
        };
        let i64s = |b: Vec<u8>| -> Vec<i64> {
            b.chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a)
                })
                .collect()
        };
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| {
                    let mut a = [0u8; 4];
                    a.copy_from_slice(c);
                    f32::from_le_bytes(a)
                })
                .collect()
        };
        let set = AdversarialSet {
            images: f32s(images.data()),
            labels: i64s(vector("labels", Dtype::I64)?),
            loss: f32s(&vector("loss", Dtype::F32)?),
            source_index: i64s(vector("source_index", Dtype::I64)?),
            n,
            h,
            w,
            classes,
            attack,
        };
        set.validate().map_err(|m| format_err(&path, m))?;
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;

    fn set() -> AdversarialSet {
        AdversarialSet {
            images: (0..2 * 3 * 4 * 4).map(|i| (i % 17) as f32 / 16.0).collect(),
            labels: vec![2, 0],
            loss: vec![0.25, 3.5],
            source_index: vec![9, 3],
            n: 2,
            h: 4,
            w: 4,
            classes: vec!["a".into(), "b".into(), "c".into()],
            attack: serde_json::json!({"norm": "l2", "eps": 0.5}),
        }
    }

    #[test]
    fn round_trip_layout_and_errors() {
        let tmp = TempDir::new("adversarial-set");
        let p = tmp.path().join(ADVERSARIAL_FILE);
        let s = set();
        s.write(&p).expect("write");
        assert_eq!(AdversarialSet::load(&p).expect("file"), s);
        assert_eq!(AdversarialSet::load(tmp.path()).expect("folder"), s);
        assert_eq!(s.image(1)[0], s.images[48]);
        let bytes = std::fs::read(&p).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut names = st.names();
        names.sort_unstable();
        assert_eq!(names, ["images", "labels", "loss", "source_index"]);
        let t = st.tensor("images").expect("images");
        assert_eq!((t.dtype(), t.shape()), (Dtype::F32, &[2usize, 3, 4, 4][..]));

        // a dataset artifact is not an adversarial set, and says so
        let d = crate::data::synthetic(&crate::data::SyntheticConfig {
            n_classes: 2,
            n_train: 2,
            n_test: 2,
            image_size: 4,
            seed: 0,
        });
        let dp = tmp.path().join("data.safetensors");
        crate::data::write_dataset(&dp, &d).expect("write");
        let e = AdversarialSet::load(&dp)
            .expect_err("not adversarial")
            .to_string();
        assert!(
            e.contains("no `format`") && e.contains("data.safetensors"),
            "{e}"
        );

        // inconsistent sets are refused before writing
        let mut bad = set();
        bad.images[0] = 1.5;
        let e = bad.write(&p).expect_err("out of box").to_string();
        assert!(e.contains("outside [0, 1]"), "{e}");
        let mut bad = set();
        bad.labels[0] = 3;
        assert!(bad.write(&p).is_err());
        let mut bad = set();
        bad.loss.pop();
        assert!(bad.write(&p).is_err());
    }

    #[test]
    fn same_set_same_bytes() {
        // three metadata keys: safetensors writes them in a HashMap's order, which differs
        // between maps, so unsorted headers would differ in some of these writes
        let tmp = TempDir::new("adversarial-bytes");
        let s = set();
        let files: Vec<Vec<u8>> = (0..12)
            .map(|i| {
                let p = tmp.path().join(format!("{i}.safetensors"));
                s.write(&p).expect("write");
                std::fs::read(&p).expect("read")
            })
            .collect();
        assert!(
            files.iter().all(|f| f == &files[0]),
            "the same set gave different files"
        );
        let n =
            usize::try_from(u64::from_le_bytes(files[0][..8].try_into().expect("8"))).expect("n");
        let header = std::str::from_utf8(&files[0][8..8 + n]).expect("utf8");
        let meta = header.find("\"__metadata__\"").expect("metadata");
        let (a, c, f) = (
            header.find("\"attack\"").expect("attack"),
            header.find("\"classes\"").expect("classes"),
            header.find("\"format\"").expect("format"),
        );
        assert!(meta < a && a < c && c < f, "{header}");
        assert_eq!(
            AdversarialSet::load(&tmp.path().join("3.safetensors")).expect("load"),
            s
        );
    }
}
