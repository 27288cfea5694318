//! The augmentation engine: the per-image transforms of METHODS 2.1 and the multi-view
//! generators of METHODS 2.2, on f32 CHW images in [0, 1], with torchvision's semantics.
//!
//! # Brief overview
//!
//! - Input: an [`ImageBatch`], `n` u8 RGB images `(3, h, w)` in one buffer.
//! - A view generator ([`MultiView`], built from a preset — [`EmpConfig`], [`SimClrConfig`],
//!   [`DynAclConfig`], [`FinetuneConfig`] — or a general [`MultiViewConfig`]) runs a
//!   [`PipelineConfig`] `n_views` times per image, in parallel over (view, image) pairs.
//! - Output: [`Views`], one contiguous f32 buffer `(n_views * n, 3, size, size)`, view-major
//!   (rows `vB..(v+1)B` are view `v` of every image) or interleaved (DynACL), see [`Layout`].
//! - Randomness: view `v` of image `b` in call `(seed, step)` draws from
//!   `Rng::derive(seed, &[step, b, v])` ([`crate::rng`]), so the buffer is bit-identical for
//!   the same seed whatever the thread count.
//!
//! | module | transforms |
//! |---|---|
//! | [`crop`] | `RandomResizedCrop` parameters (10 tries, centred fallback), `RandomCrop` with zero/reflect padding |
//! | [`resize`](mod@resize) | bilinear / bicubic resampling, antialiased (torchvision default, Pillow) or classic |
//! | [`color`] | `ColorJitter` (random order), grayscale, solarize, RGB ↔ HSV |
//! | [`blur`] | Gaussian blur (Pillow's box approximation or a sampled Gaussian) |
//! | [`pipeline`] | one view: draw all decisions, then render fused into the output slice |
//! | [`generators`] | multi-view generators, presets, [`bench_emp`] |
//!
//! # Where this differs from torchvision / the references
//!
//! - The references run these transforms on PIL u8 images; we compute in f32 and never
//!   round to u8 between steps, so values differ by up to ~1/255 (METHODS \[Q27\]).
//! - Grayscale (also inside contrast and saturation) uses 0.299/0.587/0.114 (Pillow);
//!   torchvision's tensor kernel uses 0.2989 for red.
//! - A bicubic resize is clamped to [0, 1] (as Pillow's u8 output is); torch's float kernel
//!   would let it overshoot.
//! - Blur follows Pillow's `GaussianBlur(radius=σ)` (three extended-box passes, replicated
//!   borders) by default, not torchvision's `GaussianBlur` (sampled kernel, reflect padding);
//!   the latter is [`BlurMethod::Gaussian`].
//! - Our RNG is not torch's: the distributions are the same, the draws are not.
//!
//! ```
//! use pipe_stages::nn::augment::{ImageBatch, SimClrConfig};
//! let pixels = vec![0u8; 2 * 3 * 32 * 32];
//! let images = ImageBatch::new(&pixels, 2, 32, 32).expect("2 images of 3x32x32");
//! let views = SimClrConfig::default().build().expect("valid").generate(images, 1, 0).expect("fits");
//! assert_eq!(views.shape(), [4, 3, 32, 32]);
//! ```

pub mod blur;
pub mod color;
pub mod crop;
pub mod error;
pub mod generators;
pub mod pipeline;
pub mod resize;
pub mod views;

pub use blur::{BlurMethod, GaussianBlur, gaussian_blur};
pub use color::{ColorJitter, JitterParams};
pub use crop::{CropBox, PaddingMode, RandomCrop, RandomResizedCrop};
pub use error::AugmentError;
pub use generators::{
    DynAclConfig, EmpConfig, FinetuneConfig, MultiView, MultiViewConfig, SimClrConfig, bench_emp,
    to_float,
};
pub use pipeline::{Geometry, PipelineConfig, ViewGeometry, ViewParams};
pub use resize::{Interpolation, ResizeTable, resize};
pub use views::{ImageBatch, Layout, Views};
