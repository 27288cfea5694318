//! The dataset artifact: `data.safetensors` with `train_images` u8 `[N, 3, H, W]`,
//! `train_labels` i64 `[N]`, `test_images` and `test_labels`; the class names ride along in the
//! safetensors metadata (`classes`, a JSON list) so the file is self-describing.
//!
//! [`write_dataset`] writes it (the `dataset` stage's output), [`load_dataset`] reads it back
//! into owned buffers for later stages.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, View, tensor::TensorView};

use super::{Dataset, Error, Result, Split, io_err};

/// File name of the artifact inside a `dataset` entry.
pub const DATA_FILE: &str = "data.safetensors";

fn format_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Writes `d` to `path` as safetensors, written in place: the `dataset` stage writes it into
/// its staging folder, which the store commits atomically.
///
/// # Errors
/// On an I/O error, or a split whose buffers disagree with its shape.
pub fn write_dataset(path: &Path, d: &Dataset) -> Result<()> {
    let mut labels = Vec::new();
    for (name, s) in [("train", &d.train), ("test", &d.test)] {
        if s.images.len() != s.n * s.image_len() || s.labels.len() != s.n {
            return Err(format_err(
                path,
                format!(
                    "{name} split holds {} image bytes and {} labels for n = {} of 3x{}x{}",
                    s.images.len(),
                    s.labels.len(),
                    s.n,
                    s.h,
                    s.w
                ),
            ));
        }
        labels.push(
            s.labels
                .iter()
                .flat_map(|l| l.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    let st = |e: safetensors::SafeTensorError| format_err(path, e.to_string());
    let mut tensors = Vec::new();
    for ((name, s), lab) in [("train", &d.train), ("test", &d.test)]
        .into_iter()
        .zip(&labels)
    {
        tensors.push((
            format!("{name}_images"),
            TensorView::new(Dtype::U8, vec![s.n, 3, s.h, s.w], &s.images).map_err(st)?,
        ));
        tensors.push((
            format!("{name}_labels"),
            TensorView::new(Dtype::I64, vec![s.n], lab).map_err(st)?,
        ));
    }
    let classes = serde_json::to_string(&d.classes)
        .map_err(|e| format_err(path, format!("class names: {e}")))?;
    write_safetensors(
        path,
        tensors,
        BTreeMap::from([("classes".to_string(), classes)]),
    )
}

/// Writes `tensors` and the string metadata `meta` to `path` as a safetensors file whose bytes
/// depend only on them. safetensors serializes the metadata from a `HashMap`, whose iteration
/// order changes from one process (and one map) to the next, so the same tensors would give
/// files that differ in their header's key order, and so in their hashes; the header is
/// therefore rewritten in place with its keys sorted (same length, same meaning: readers look
/// tensors up by name and offset).
///
/// # Errors
/// An I/O error, or tensors safetensors refuses (a buffer that disagrees with its shape).
pub(crate) fn write_safetensors<V: View>(
    path: &Path,
    tensors: Vec<(String, V)>,
    meta: BTreeMap<String, String>,
) -> Result<()> {
    let meta: HashMap<String, String> = meta.into_iter().collect();
    safetensors::serialize_to_file(tensors, Some(meta), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(cause) => Error::Io {
            path: path.to_path_buf(),
            cause,
        },
        other => format_err(path, other.to_string()),
    })?;
    sort_header(path)
}

/// Rewrites the JSON header of the safetensors file at `path` with its object keys sorted
/// (serde_json's map is ordered by key: the workspace does not enable `preserve_order`).
fn sort_header(path: &Path) -> Result<()> {
    let io = |cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = usize::try_from(u64::from_le_bytes(len))
        .map_err(|_| format_err(path, "header length does not fit in memory"))?;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(io)?;
    let text = std::str::from_utf8(&header)
        .map_err(|e| format_err(path, format!("header is not UTF-8: {e}")))?
        .trim_end_matches(' ');
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format_err(path, format!("header is not JSON: {e}")))?;
    let sorted =
        serde_json::to_string(&value).map_err(|e| format_err(path, format!("header: {e}")))?;
    if sorted.len() != text.len() {
        return Err(format_err(
            path,
            format!(
                "the sorted header has {} bytes, the written one {}",
                sorted.len(),
                text.len()
            ),
        ));
    }
    f.seek(SeekFrom::Start(8)).map_err(io)?;
    f.write_all(sorted.as_bytes()).map_err(io)
}

/// Reads a dataset artifact: the `data.safetensors` file, or the entry folder holding it.
///
/// # Errors
/// When the file is missing or unreadable, or its tensors have the wrong names, dtypes or
/// shapes, or labels fall outside the classes.
pub fn load_dataset(path: &Path) -> Result<Dataset> {
    let path: PathBuf = if path.is_dir() {
        path.join(DATA_FILE)
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(&path, e.to_string()))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| format_err(&path, e.to_string()))?;
    let classes: Vec<String> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("classes"))
        .ok_or_else(|| format_err(&path, "no `classes` in the safetensors metadata"))
        .and_then(|c| {
            serde_json::from_str(c)
                .map_err(|e| format_err(&path, format!("`classes` metadata: {e}")))
        })?;
    let split = |name: &str| -> Result<Split> {
        let get = |t: &str| {
            st.tensor(t)
                .map_err(|e| format_err(&path, format!("tensor `{t}`: {e}")))
        };
        let images = get(&format!("{name}_images"))?;
        let labels = get(&format!("{name}_labels"))?;
        let (n, h, w) = match (images.dtype(), images.shape()) {
            (Dtype::U8, &[n, 3, h, w]) => (n, h, w),
            (dt, shape) => {
                return Err(format_err(
                    &path,
                    format!("`{name}_images` is {dt:?} {shape:?}, expected U8 [N, 3, H, W]"),
                ));
            }
        };
        if labels.dtype() != Dtype::I64 || labels.shape() != [n] {
            return Err(format_err(
                &path,
                format!(
                    "`{name}_labels` is {:?} {:?}, expected I64 [{n}]",
                    labels.dtype(),
                    labels.shape()
                ),
            ));
        }
        let labels: Vec<i64> = labels
            .data()
            .chunks_exact(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                i64::from_le_bytes(a)
            })
            .collect();
        if let Some(bad) = labels
            .iter()
            .find(|&&l| usize::try_from(l).map_or(true, |l| l >= classes.len()))
        {
            return Err(format_err(
                &path,
                format!("`{name}_labels` holds {bad}, outside 0..{}", classes.len()),
            ));
        }
        Ok(Split {
            images: images.data().to_vec(),
            labels,
            n,
            h,
            w,
        })
    };
    Ok(Dataset {
        train: split("train")?,
        test: split("test")?,
        classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;
    use crate::data::{SyntheticConfig, synthetic};

    #[test]
    fn round_trip_and_layout() {
        let tmp = TempDir::new("tensor-io");
        let d = synthetic(&SyntheticConfig {
            n_classes: 3,
            n_train: 6,
            n_test: 0,
            image_size: 8,
            seed: 2,
        });
        let p = tmp.path().join(DATA_FILE);
        write_dataset(&p, &d).expect("write");
        assert_eq!(load_dataset(&p).expect("read file"), d);
        assert_eq!(load_dataset(tmp.path()).expect("read folder"), d);
        // the layout other tools see
        let bytes = std::fs::read(&p).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut names = st.names();
        names.sort_unstable();
        assert_eq!(
            names,
            ["test_images", "test_labels", "train_images", "train_labels"]
        );
        let t = st.tensor("train_images").expect("train_images");
        assert_eq!((t.dtype(), t.shape()), (Dtype::U8, &[6usize, 3, 8, 8][..]));
        let l = st.tensor("train_labels").expect("labels");
        assert_eq!(l.dtype(), Dtype::I64);
        assert_eq!(
            &l.data()[..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        // same dataset, same bytes
        let p2 = tmp.path().join("again.safetensors");
        write_dataset(&p2, &d).expect("write");
        assert_eq!(bytes, std::fs::read(&p2).expect("read"));
        // errors name the file
        let e = load_dataset(&tmp.path().join("nope.safetensors")).expect_err("missing");
        assert!(e.to_string().contains("nope.safetensors"), "{e}");
        std::fs::write(&p2, b"garbage").expect("write");
        let e = load_dataset(&p2).expect_err("garbage");
        assert!(e.to_string().starts_with(&p2.display().to_string()), "{e}");
    }
}
