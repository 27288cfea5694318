//! The engine's input ([`ImageBatch`], u8 CHW) and output ([`Views`], f32 NCHW) buffers.
//!
//! - Input: `n` RGB images as one `&[u8]` of `n * 3 * h * w` bytes, each image three planes
//!   (R, G, B), each plane row-major — the CIFAR binary layout.
//! - Output: one contiguous f32 buffer of shape `(n_views * batch, 3, size, size)`, values in
//!   [0, 1]. Row `r` holds view `v` of image `b` with
//!   - [`Layout::ViewMajor`]: `r = v * batch + b` (rows `vB..(v+1)B` are view `v` of every
//!     image; chunking the batch into `n_views` equal parts recovers the views — EMP, SimCLR),
//!   - [`Layout::Interleaved`]: `r = b * n_views + v` (rows `2k`, `2k+1` are the two views
//!     of image `k` — ACL/DynACL).

use serde::{Deserialize, Serialize};

use super::error::AugmentError;

/// Channels per image: the engine works on RGB.
pub const CHANNELS: usize = 3;

/// A borrowed batch of u8 RGB images in CHW layout.
#[derive(Debug, Clone, Copy)]
pub struct ImageBatch<'a> {
    data: &'a [u8],
    n: usize,
    height: usize,
    width: usize,
}

impl<'a> ImageBatch<'a> {
    /// Wraps `data` as `n` images of shape `(3, height, width)`.
    ///
    /// # Errors
    /// [`AugmentError::BufferSize`] when `data.len() != n * 3 * height * width`,
    /// [`AugmentError::EmptyImage`] when a side is zero.
    pub fn new(
        data: &'a [u8],
        n: usize,
        height: usize,
        width: usize,
    ) -> Result<Self, AugmentError> {
        if height == 0 || width == 0 {
            return Err(AugmentError::EmptyImage { height, width });
        }
        let expected = n * CHANNELS * height * width;
        if data.len() != expected {
            return Err(AugmentError::BufferSize {
                got: data.len(),
                expected,
                n,
                height,
                width,
            });
        }
        Ok(Self {
            data,
            n,
            height,
            width,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Image height.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Image width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes per image: `3 * height * width`.
    pub fn image_len(&self) -> usize {
        CHANNELS * self.height * self.width
    }

    /// The whole buffer.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Image `i` as `(3, height, width)` bytes.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn image(&self, i: usize) -> &'a [u8] {
        let len = self.image_len();
        &self.data[i * len..(i + 1) * len]
    }
}

/// How the rows of a [`Views`] buffer are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Row `v * batch + b`: view-major (EMP / CF-AMC, SimCLR).
    #[default]
    ViewMajor,
    /// Row `b * n_views + v`: the views of one image are adjacent (ACL / DynACL).
    Interleaved,
}

impl Layout {
    /// The row holding view `view` of image `image`.
    pub fn row(self, view: usize, image: usize, n_views: usize, batch: usize) -> usize {
        match self {
            Layout::ViewMajor => view * batch + image,
            Layout::Interleaved => image * n_views + view,
        }
    }

    /// The `(view, image)` pair stored in row `row`.
    pub fn view_image(self, row: usize, n_views: usize, batch: usize) -> (usize, usize) {
        match self {
            Layout::ViewMajor => (row / batch, row % batch),
            Layout::Interleaved => (row % n_views, row / n_views),
        }
    }
}

/// Augmented views of a batch: a contiguous f32 tensor `(n_views * batch, channels, height,
/// width)` in [0, 1], rows ordered by `layout`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Views {
    /// The NCHW data, `rows() * channels * height * width` values.
    pub data: Vec<f32>,
    /// Views per image.
    pub n_views: usize,
    /// Source images.
    pub batch: usize,
    /// Channels (3).
    pub channels: usize,
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
    /// Row order.
    pub layout: Layout,
}

impl Views {
    /// Number of rows, `n_views * batch`.
    pub fn rows(&self) -> usize {
        self.n_views * self.batch
    }

    /// `[rows, channels, height, width]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.rows(), self.channels, self.height, self.width]
    }

    /// Values per row: `channels * height * width`.
    pub fn row_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Row `r` as `(channels, height, width)` values.
    ///
    /// # Panics
    /// If `r >= rows()`.
    pub fn row(&self, r: usize) -> &[f32] {
        let len = self.row_len();
        &self.data[r * len..(r + 1) * len]
    }

    /// View `view` of image `image`, wherever the layout put it.
    ///
    /// # Panics
    /// If `view >= n_views` or `image >= batch`.
    pub fn get(&self, view: usize, image: usize) -> &[f32] {
        assert!(
            view < self.n_views && image < self.batch,
            "view/image out of range"
        );
        self.row(self.layout.row(view, image, self.n_views, self.batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_batch_checks_size() {
        let data = vec![0u8; 2 * 3 * 4 * 5];
        let b = ImageBatch::new(&data, 2, 4, 5).expect("sizes match");
        assert_eq!(
            (b.len(), b.height(), b.width(), b.image_len()),
            (2, 4, 5, 60)
        );
        assert_eq!(b.image(1).len(), 60);
        assert!(matches!(
            ImageBatch::new(&data, 3, 4, 5),
            Err(AugmentError::BufferSize {
                got: 120,
                expected: 180,
                ..
            })
        ));
        assert!(matches!(
            ImageBatch::new(&[], 0, 0, 5),
            Err(AugmentError::EmptyImage { .. })
        ));
    }

    #[test]
    fn layouts_are_inverse_bijections() {
        for layout in [Layout::ViewMajor, Layout::Interleaved] {
            let (n_views, batch) = (3, 5);
            let mut seen = vec![false; n_views * batch];
            for v in 0..n_views {
                for b in 0..batch {
                    let r = layout.row(v, b, n_views, batch);
                    assert!(!seen[r]);
                    seen[r] = true;
                    assert_eq!(layout.view_image(r, n_views, batch), (v, b));
                }
            }
        }
        assert_eq!(Layout::ViewMajor.row(1, 2, 2, 10), 12);
        assert_eq!(Layout::Interleaved.row(1, 2, 2, 10), 5);
    }
}
