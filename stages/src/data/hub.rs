//! `source: hf`: CIFAR-10 from the Hugging Face hub through candle-datasets (feature `hub`).
//!
//! candle-datasets' `vision::cifar::load` downloads the hub's parquet conversion of CIFAR-10
//! into the hub cache (`HF_HOME`) and returns f32 tensors in [0, 1]. Two traps, handled here:
//! it builds its tensor as (N, 32, 32, 3) from image-rs's row-major (height, width, channel)
//! bytes and then permutes (0, 3, 2, 1), so its images come out **transposed** (N, 3, W, H); and
//! its pixels are divided by 255, so we multiply back and round to get the exact bytes.

use candle_datasets::vision::cifar;

use super::{Dataset, Error, Result, Split, cifar::CifarKind};

fn split(images: &candle::Tensor, labels: &candle::Tensor, what: &str) -> Result<Split> {
    let err = |e: candle::Error| Error::Layout {
        root: "huggingface:cifar10".into(),
        message: format!("{what}: {e}"),
    };
    let (n, c, w, h) = images.dims4().map_err(err)?;
    if c != 3 {
        return Err(Error::Layout {
            root: "huggingface:cifar10".into(),
            message: format!("{what}: expected 3 channels, got {c}"),
        });
    }
    // (N, 3, W, H) -> (N, 3, H, W), then back to bytes
    let bytes: Vec<u8> = (images.permute((0, 1, 3, 2)).map_err(err)? * 255.0)
        .and_then(|t| t.round())
        .and_then(|t| t.clamp(0f32, 255f32))
        .and_then(|t| t.to_dtype(candle::DType::U8))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<u8>())
        .map_err(err)?;
    let labels: Vec<i64> = labels
        .to_dtype(candle::DType::I64)
        .and_then(|t| t.to_vec1::<i64>())
        .map_err(err)?;
    Ok(Split {
        images: bytes,
        labels,
        n,
        h,
        w,
    })
}

/// Downloads (or reads from the hub cache) CIFAR-10.
///
/// # Errors
/// No network, a hub error, or tensors of an unexpected shape.
pub fn load_cifar10() -> Result<Dataset> {
    let d = cifar::load().map_err(|e| Error::Layout {
        root: "huggingface:cifar10".into(),
        message: format!("cannot load from the Hugging Face hub (no network?): {e}"),
    })?;
    Ok(Dataset {
        train: split(&d.train_images, &d.train_labels, "train")?,
        test: split(&d.test_images, &d.test_labels, "test")?,
        classes: CifarKind::Cifar10.classes(),
    })
}
