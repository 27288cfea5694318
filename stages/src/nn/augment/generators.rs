//! View generators: a batch of u8 images in, `n_views` augmented f32 copies of each out
//! (METHODS 2.2).
//!
//! [`MultiView`] runs one [`PipelineConfig`] `n_views` times per image, in parallel with rayon
//! over (view, image) pairs. The pair `(b, v)` of call `(seed, step)` draws from its own
//! stream `Rng::derive(seed, &[step, b, v])`, so the output is bit-identical for the same
//! seed whatever the thread count or scheduling. With `batch_synchronous` every image of a
//! view shares the stream `Rng::derive(seed, &[step, u64::MAX, v])`: one crop box, flip,
//! jitter draw… per view for the whole batch (R-MAO's batched TorchScript transforms, METHODS \[Q55\]).
//!
//! Presets (each a serde config with defaults that builds a [`MultiView`]):
//!
//! | preset | views, layout | pipeline |
//! |---|---|---|
//! | [`EmpConfig`] (EMP / CF-AMC) | 16, view-major | RRC(scale [0.08, 1], ratio [3/4, 4/3], bilinear) → flip 0.5 → jitter(0.4, 0.4, 0.4, 0.2) p 0.8 → gray 0.2 → blur p 0.1, σ ~ U(0.1, 2) → solarize 0.1 |
//! | [`EmpConfig::patch`] | n, view-major | the same with scale 0.25, ratio 1 (16×16 patches) |
//! | [`SimClrConfig`] | 2, view-major | RRC(bilinear) → flip 0.5 → jitter(0.4, 0.4, 0.4, 0.1) p 0.8 → gray 0.2 |
//! | [`DynAclConfig`] (strength s) | 2, interleaved | RRC(scale [1 - 0.9s, 1], bicubic) → flip 0.5 → jitter(0.4s, 0.4s, 0.4s, 0.1s) p 0.8s → gray 0.2s |
//! | [`FinetuneConfig`] | 1 | RandomCrop(32, pad 4, zeros) → flip 0.5 |
//!
//! The DynACL pipeline of R-AIR also returns the un-augmented image; [`to_float`] gives it.
//!
//! ```
//! use pipe_stages::nn::augment::{EmpConfig, ImageBatch};
//! let pixels = vec![128u8; 4 * 3 * 32 * 32];
//! let images = ImageBatch::new(&pixels, 4, 32, 32).expect("4 images of 3x32x32");
//! let emp = EmpConfig::crop(16).build().expect("valid preset");
//! let views = emp.generate(images, 7, 0).expect("32x32 inputs");
//! assert_eq!(views.shape(), [64, 3, 32, 32]);
//! ```

use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::blur::{BlurMethod, GaussianBlur};
use super::color::ColorJitter;
use super::crop::{PaddingMode, RandomCrop, RandomResizedCrop};
use super::error::{AugmentError, check_probability};
use super::pipeline::{Geometry, PipelineConfig, Plan, Scratch, U8_TO_F32, ViewParams};
use super::resize::Interpolation;
use super::views::{CHANNELS, ImageBatch, Layout, Views};
use crate::rng::Rng;

/// The image index used in the stream of a batch-synchronous view.
const SYNC_IMAGE: u64 = u64::MAX;

/// A general multi-view generator: `n_views` draws of one pipeline per image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultiViewConfig {
    /// Views per image (default 1).
    pub n_views: usize,
    /// Row order of the output (default view-major).
    pub layout: Layout,
    /// One draw per view for the whole batch instead of per image (default false).
    pub batch_synchronous: bool,
    /// The per-view pipeline (default identity at 32×32).
    pub pipeline: PipelineConfig,
}

impl Default for MultiViewConfig {
    fn default() -> Self {
        Self {
            n_views: 1,
            layout: Layout::ViewMajor,
            batch_synchronous: false,
            pipeline: PipelineConfig::default(),
        }
    }
}

/// A validated [`MultiViewConfig`], ready to generate views.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiView {
    cfg: MultiViewConfig,
}

impl MultiView {
    /// Validates `cfg`.
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`] naming the field.
    pub fn new(cfg: MultiViewConfig) -> Result<Self, AugmentError> {
        if cfg.n_views == 0 {
            return Err(AugmentError::config("n_views", "must be positive"));
        }
        cfg.pipeline.validate()?;
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &MultiViewConfig {
        &self.cfg
    }

    /// Views per image.
    pub fn n_views(&self) -> usize {
        self.cfg.n_views
    }

    /// The random stream of view `view` of image `image` in call `(seed, step)`.
    pub fn stream(&self, seed: u64, step: u64, image: usize, view: usize) -> Rng {
        let image = if self.cfg.batch_synchronous {
            SYNC_IMAGE
        } else {
            image as u64
        };
        Rng::derive(seed, &[step, image, view as u64])
    }

    /// The random decisions behind view `view` of image `image` (of `height × width`) in
    /// call `(seed, step)`: exactly what [`MultiView::generate`] draws.
    ///
    /// # Errors
    /// [`AugmentError::Geometry`] when such images do not fit the pipeline.
    pub fn params(
        &self,
        seed: u64,
        step: u64,
        image: usize,
        view: usize,
        height: usize,
        width: usize,
    ) -> Result<ViewParams, AugmentError> {
        self.cfg.pipeline.check_input(height, width)?;
        let mut rng = self.stream(seed, step, image, view);
        Ok(self.cfg.pipeline.sample(&mut rng, height, width))
    }

    /// Generates `n_views` views of every image: a `(n_views * n, 3, size, size)` buffer in
    /// the configured layout.
    ///
    /// # Errors
    /// [`AugmentError::Geometry`] when the images do not fit the pipeline.
    pub fn generate(
        &self,
        images: ImageBatch<'_>,
        seed: u64,
        step: u64,
    ) -> Result<Views, AugmentError> {
        let mut out = Views::default();
        self.generate_into(images, seed, step, &mut out)?;
        Ok(out)
    }

    /// [`MultiView::generate`] into an existing buffer (reusing its allocation).
    ///
    /// # Errors
    /// [`AugmentError::Geometry`] when the images do not fit the pipeline.
    pub fn generate_into(
        &self,
        images: ImageBatch<'_>,
        seed: u64,
        step: u64,
        out: &mut Views,
    ) -> Result<(), AugmentError> {
        let pipeline = &self.cfg.pipeline;
        let (h, w) = (images.height(), images.width());
        pipeline.check_input(h, w)?;
        let (n_views, batch, size) = (self.cfg.n_views, images.len(), pipeline.size);
        let layout = self.cfg.layout;
        let row_len = CHANNELS * size * size;
        out.n_views = n_views;
        out.batch = batch;
        out.channels = CHANNELS;
        out.height = size;
        out.width = size;
        out.layout = layout;
        // Every value is overwritten below: only grow (and zero) what is new.
        out.data.resize(n_views * batch * row_len, 0.0);
        let plan = Plan::new(pipeline, h, w);
        out.data
            .par_chunks_mut(row_len)
            .enumerate()
            .with_min_len(4)
            .for_each_init(Scratch::default, |scratch, (row, dst)| {
                let (view, image) = layout.view_image(row, n_views, batch);
                let mut rng = self.stream(seed, step, image, view);
                let params = pipeline.sample(&mut rng, h, w);
                plan.render(images.image(image), &params, dst, scratch);
            });
        Ok(())
    }
}

/// The images as f32 in [0, 1] ("to tensor" only): one view, `(n, 3, h, w)`.
pub fn to_float(images: ImageBatch<'_>) -> Views {
    Views {
        data: images
            .data()
            .par_iter()
            .with_min_len(1 << 14)
            .map(|&v| U8_TO_F32[usize::from(v)])
            .collect(),
        n_views: 1,
        batch: images.len(),
        channels: CHANNELS,
        height: images.height(),
        width: images.width(),
        layout: Layout::ViewMajor,
    }
}

/// The EMP-SSL / CF-AMC-SSL multi-view generator (R-CF `dataset/aug.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmpConfig {
    /// Views per image, `num_patch` (default 16).
    pub n_views: usize,
    /// `[scale_min, scale_max]` (default `[0.08, 1]`, crop-based).
    pub scale: [f64; 2],
    /// `[ratio_min, ratio_max]` (default `[3/4, 4/3]`).
    pub ratio: [f64; 2],
    /// Output side (default 32).
    pub size: usize,
    /// Blur kernel (default Pillow's).
    pub blur_method: BlurMethod,
}

impl Default for EmpConfig {
    fn default() -> Self {
        Self::crop(16)
    }
}

impl EmpConfig {
    /// Crop-based: scale [0.08, 1], ratio [3/4, 4/3].
    pub fn crop(n_views: usize) -> Self {
        Self {
            n_views,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            size: 32,
            blur_method: BlurMethod::Pil,
        }
    }

    /// Patch-based: fixed scale 0.25 and ratio 1 (16×16 patches of a 32×32 image).
    pub fn patch(n_views: usize) -> Self {
        Self {
            scale: [0.25, 0.25],
            ratio: [1.0, 1.0],
            ..Self::crop(n_views)
        }
    }

    /// The general configuration.
    pub fn config(&self) -> MultiViewConfig {
        MultiViewConfig {
            n_views: self.n_views,
            layout: Layout::ViewMajor,
            batch_synchronous: false,
            pipeline: PipelineConfig {
                size: self.size,
                geometry: Geometry::ResizedCrop(RandomResizedCrop {
                    scale: self.scale,
                    ratio: self.ratio,
                    interpolation: Interpolation::Bilinear,
                    antialias: true,
                }),
                hflip_p: 0.5,
                jitter: ColorJitter::new(0.4, 0.4, 0.4, 0.2, 0.8),
                grayscale_p: 0.2,
                blur: GaussianBlur {
                    p: 0.1,
                    sigma: [0.1, 2.0],
                    method: self.blur_method,
                },
                solarize_p: 0.1,
            },
        }
    }

    /// Validates and builds the generator.
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`].
    pub fn build(&self) -> Result<MultiView, AugmentError> {
        MultiView::new(self.config())
    }
}

/// The SimCLR two-view generator (R-CF `dataset/datasets.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimClrConfig {
    /// Crop scale range (default `[0.08, 1]`; R-CF's patch runs used `[0.75, 0.75]`).
    pub scale: [f64; 2],
    /// Crop ratio range (default `[3/4, 4/3]`).
    pub ratio: [f64; 2],
    /// Output side (default 32).
    pub size: usize,
}

impl Default for SimClrConfig {
    fn default() -> Self {
        Self {
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            size: 32,
        }
    }
}

impl SimClrConfig {
    /// The general configuration.
    pub fn config(&self) -> MultiViewConfig {
        MultiViewConfig {
            n_views: 2,
            layout: Layout::ViewMajor,
            batch_synchronous: false,
            pipeline: PipelineConfig {
                size: self.size,
                geometry: Geometry::ResizedCrop(RandomResizedCrop {
                    scale: self.scale,
                    ratio: self.ratio,
                    interpolation: Interpolation::Bilinear,
                    antialias: true,
                }),
                hflip_p: 0.5,
                jitter: ColorJitter::new(0.4, 0.4, 0.4, 0.1, 0.8),
                grayscale_p: 0.2,
                blur: GaussianBlur::default(),
                solarize_p: 0.0,
            },
        }
    }

    /// Validates and builds the generator.
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`].
    pub fn build(&self) -> Result<MultiView, AugmentError> {
        MultiView::new(self.config())
    }
}

/// The ACL / AIR / RCS two-view generator with augmentation strength `s` (DynACL; ACL is
/// `s = 1`). Views are interleaved: rows `2k`, `2k + 1` are image `k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynAclConfig {
    /// Strength `s ∈ (0, 1]` (default 1).
    pub strength: f64,
    /// Crop ratio range (default `[3/4, 4/3]`).
    pub ratio: [f64; 2],
    /// Output side (default 32).
    pub size: usize,
}

impl Default for DynAclConfig {
    fn default() -> Self {
        Self {
            strength: 1.0,
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            size: 32,
        }
    }
}

impl DynAclConfig {
    /// The generator at strength `s`.
    pub fn with_strength(strength: f64) -> Self {
        Self {
            strength,
            ..Self::default()
        }
    }

    /// The general configuration.
    pub fn config(&self) -> MultiViewConfig {
        let s = self.strength;
        MultiViewConfig {
            n_views: 2,
            layout: Layout::Interleaved,
            batch_synchronous: false,
            pipeline: PipelineConfig {
                size: self.size,
                geometry: Geometry::ResizedCrop(RandomResizedCrop {
                    scale: [1.0 - 0.9 * s, 1.0],
                    ratio: self.ratio,
                    interpolation: Interpolation::Bicubic,
                    antialias: true,
                }),
                hflip_p: 0.5,
                jitter: ColorJitter::new(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s, 0.8 * s),
                grayscale_p: 0.2 * s,
                blur: GaussianBlur::default(),
                solarize_p: 0.0,
            },
        }
    }

    /// Validates (`0 < s ≤ 1`) and builds the generator.
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`].
    pub fn build(&self) -> Result<MultiView, AugmentError> {
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(AugmentError::config(
                "strength",
                format!("{} is not in (0, 1]", self.strength),
            ));
        }
        MultiView::new(self.config())
    }
}

/// The fine-tuning (and AdvCL "org" view) augmentation: `RandomCrop(size, padding)` then a
/// horizontal flip; one view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Output side (default 32).
    pub size: usize,
    /// Padding on every side (default 4).
    pub padding: usize,
    /// Padding fill (default zeros; R-MAO reflects).
    pub padding_mode: PaddingMode,
    /// Flip probability (default 0.5).
    pub hflip_p: f64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            size: 32,
            padding: 4,
            padding_mode: PaddingMode::Zero,
            hflip_p: 0.5,
        }
    }
}

impl FinetuneConfig {
    /// The general configuration.
    pub fn config(&self) -> MultiViewConfig {
        MultiViewConfig {
            n_views: 1,
            layout: Layout::ViewMajor,
            batch_synchronous: false,
            pipeline: PipelineConfig {
                size: self.size,
                geometry: Geometry::PadCrop(RandomCrop {
                    padding: self.padding,
                    padding_mode: self.padding_mode,
                }),
                hflip_p: self.hflip_p,
                ..PipelineConfig::default()
            },
        }
    }

    /// Validates and builds the generator.
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`].
    pub fn build(&self) -> Result<MultiView, AugmentError> {
        check_probability("hflip_p", self.hflip_p)?;
        MultiView::new(self.config())
    }
}

/// Views per second of the crop-based EMP generator on `batch` synthetic random 32×32
/// images with `n_views` views, over `reps` timed calls (after one warm-up call), on the
/// current rayon pool (`RAYON_NUM_THREADS=1` measures one core).
pub fn bench_emp(batch: usize, n_views: usize, reps: usize) -> f64 {
    let (batch, n_views, reps) = (batch.max(1), n_views.max(1), reps.max(1));
    let mut rng = Rng::new(0x00be_7c4e);
    let pixels: Vec<u8> = (0..batch * CHANNELS * 32 * 32)
        .map(|_| (rng.next_u64() >> 56) as u8)
        .collect();
    let images =
        ImageBatch::new(&pixels, batch, 32, 32).expect("the synthetic batch has 3x32x32 images");
    let emp = EmpConfig::crop(n_views)
        .build()
        .expect("the EMP preset with n_views >= 1 is valid");
    let mut out = Views::default();
    emp.generate_into(images, 0, 0, &mut out)
        .expect("32x32 inputs fit the EMP pipeline");
    let start = Instant::now();
    for step in 1..=reps as u64 {
        emp.generate_into(images, 0, step, &mut out)
            .expect("32x32 inputs fit the EMP pipeline");
    }
    (reps * batch * n_views) as f64 / start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::augment::pipeline::ViewGeometry;

    fn random_images(n: usize, h: usize, w: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        (0..n * CHANNELS * h * w)
            .map(|_| (rng.next_u64() >> 56) as u8)
            .collect()
    }

    fn as_float(bytes: &[u8]) -> Vec<f32> {
        bytes.iter().map(|&v| f32::from(v) / 255.0).collect()
    }

    #[test]
    fn same_seed_same_buffer_on_1_and_2_threads() {
        let pixels = random_images(12, 32, 32, 1);
        let images = ImageBatch::new(&pixels, 12, 32, 32).expect("sizes match");
        for cfg in [
            EmpConfig::crop(5).config(),
            DynAclConfig::with_strength(0.6).config(),
            FinetuneConfig::default().config(),
        ] {
            let generator = MultiView::new(cfg).expect("valid");
            let run = |threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                pool.install(|| generator.generate(images, 42, 3).expect("fits"))
            };
            let one = run(1);
            let two = run(2);
            assert_eq!(one.data.len(), generator.n_views() * 12 * 3 * 32 * 32);
            // Bit-identical (compare bits: NaN-safe and exact).
            assert!(
                one.data
                    .iter()
                    .zip(&two.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            assert_eq!(one, generator.generate(images, 42, 3).expect("fits"));
            // Another step or seed changes the views.
            assert_ne!(
                one.data,
                generator.generate(images, 42, 4).expect("fits").data
            );
            assert_ne!(
                one.data,
                generator.generate(images, 43, 3).expect("fits").data
            );
        }
    }

    #[test]
    fn deterministic_config_returns_the_inputs_view_major() {
        // Identity crop (scale 1, ratio 1), no flip, no colour: every view is the image.
        let cfg = MultiViewConfig {
            n_views: 3,
            pipeline: PipelineConfig {
                geometry: Geometry::ResizedCrop(RandomResizedCrop {
                    scale: [1.0, 1.0],
                    ratio: [1.0, 1.0],
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let generator = MultiView::new(cfg).expect("valid");
        let pixels = random_images(4, 32, 32, 2);
        let images = ImageBatch::new(&pixels, 4, 32, 32).expect("sizes match");
        let views = generator.generate(images, 0, 0).expect("fits");
        assert_eq!(views.shape(), [12, 3, 32, 32]);
        assert_eq!(views.layout, Layout::ViewMajor);
        for v in 0..3 {
            for b in 0..4 {
                // Rows vB..(v+1)B hold view v of every image.
                assert_eq!(views.row(v * 4 + b), &as_float(images.image(b))[..]);
                assert_eq!(views.get(v, b), views.row(v * 4 + b));
            }
        }
        assert_eq!(&views.data[..], &to_float(images).data.repeat(3)[..]);
    }

    #[test]
    fn dynacl_rows_are_interleaved() {
        let generator = DynAclConfig::default().build().expect("valid");
        assert_eq!(generator.config().layout, Layout::Interleaved);
        let pixels = random_images(3, 32, 32, 3);
        let images = ImageBatch::new(&pixels, 3, 32, 32).expect("sizes match");
        let views = generator.generate(images, 5, 1).expect("fits");
        assert_eq!(views.shape(), [6, 3, 32, 32]);
        // Row 2k + v is view v of image k: re-render that view alone and compare.
        let single = MultiView::new(MultiViewConfig {
            layout: Layout::ViewMajor,
            ..generator.config().clone()
        })
        .expect("valid");
        let vm = single.generate(images, 5, 1).expect("fits");
        for k in 0..3 {
            for v in 0..2 {
                assert_eq!(views.row(2 * k + v), vm.row(v * 3 + k));
            }
        }
        assert!(views.data.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(DynAclConfig::with_strength(0.0).build().is_err());
        assert!(DynAclConfig::with_strength(1.5).build().is_err());
    }

    #[test]
    fn views_differ_when_random() {
        let generator = EmpConfig::crop(4).build().expect("valid");
        let pixels = random_images(2, 32, 32, 4);
        let images = ImageBatch::new(&pixels, 2, 32, 32).expect("sizes match");
        let views = generator.generate(images, 9, 0).expect("fits");
        for b in 0..2 {
            for v in 1..4 {
                assert_ne!(views.get(0, b), views.get(v, b));
            }
        }
        assert!(
            views
                .data
                .iter()
                .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
        );
    }

    #[test]
    fn flip_rate_is_one_half() {
        let generator = FinetuneConfig {
            padding: 0,
            ..Default::default()
        }
        .build()
        .expect("valid");
        let n = 20_000;
        let flips = (0..n)
            .filter(|&i| generator.params(1, 0, i, 0, 32, 32).expect("fits").flip)
            .count();
        // Binomial(20000, 1/2): sd ≈ 70.7; 3 sd.
        assert!((flips as f64 - 10_000.0).abs() < 212.0, "{flips}");
        // And the rendered view is the mirrored image exactly when the draw says so.
        let pixels = random_images(8, 32, 32, 5);
        let images = ImageBatch::new(&pixels, 8, 32, 32).expect("sizes match");
        let views = generator.generate(images, 1, 0).expect("fits");
        for b in 0..8 {
            let img = as_float(images.image(b));
            let flipped: Vec<f32> = img
                .chunks_exact(32)
                .flat_map(|r| r.iter().rev().copied())
                .collect();
            let want = if generator.params(1, 0, b, 0, 32, 32).expect("fits").flip {
                &flipped
            } else {
                &img
            };
            assert_eq!(views.row(b), &want[..]);
        }
    }

    #[test]
    fn patch_mode_always_crops_16x16() {
        let generator = EmpConfig::patch(16).build().expect("valid");
        for i in 0..200 {
            let p = generator
                .params(3, 0, i % 10, i / 10, 32, 32)
                .expect("fits");
            let ViewGeometry::Crop(b) = p.geometry else {
                panic!("crop expected");
            };
            assert_eq!((b.height, b.width), (16, 16));
        }
    }

    #[test]
    fn emp_step_rates_match_the_configuration() {
        let generator = EmpConfig::crop(16).build().expect("valid");
        let n = 20_000usize;
        let (mut jitter, mut gray, mut blur, mut sol) = (0usize, 0usize, 0usize, 0usize);
        for i in 0..n {
            let p = generator
                .params(11, 2, i % 100, i / 100, 32, 32)
                .expect("fits");
            jitter += usize::from(p.jitter.is_some());
            gray += usize::from(p.grayscale);
            blur += usize::from(p.blur_sigma.is_some());
            sol += usize::from(p.solarize);
        }
        let within = |count: usize, p: f64| {
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            (count as f64 - n as f64 * p).abs() < 4.0 * sd
        };
        assert!(within(jitter, 0.8) && within(gray, 0.2), "{jitter} {gray}");
        assert!(within(blur, 0.1) && within(sol, 0.1), "{blur} {sol}");
    }

    #[test]
    fn grayscale_views_have_equal_channels() {
        let generator = MultiView::new(MultiViewConfig {
            n_views: 2,
            pipeline: PipelineConfig {
                grayscale_p: 1.0,
                ..Default::default()
            },
            ..Default::default()
        })
        .expect("valid");
        let pixels = random_images(3, 32, 32, 6);
        let images = ImageBatch::new(&pixels, 3, 32, 32).expect("sizes match");
        let views = generator.generate(images, 0, 0).expect("fits");
        for r in 0..views.rows() {
            let (red, rest) = views.row(r).split_at(1024);
            let (green, blue) = rest.split_at(1024);
            assert_eq!(red, green);
            assert_eq!(green, blue);
        }
    }

    #[test]
    fn batch_synchronous_shares_draws_across_images() {
        let mut cfg = EmpConfig::crop(3).config();
        cfg.batch_synchronous = true;
        let generator = MultiView::new(cfg).expect("valid");
        let p0 = generator.params(1, 0, 0, 2, 32, 32).expect("fits");
        assert_eq!(p0, generator.params(1, 0, 7, 2, 32, 32).expect("fits"));
        assert_ne!(p0, generator.params(1, 0, 0, 1, 32, 32).expect("fits"));
        // Two identical images give identical views.
        let one = random_images(1, 32, 32, 7);
        let pixels = [one.clone(), one].concat();
        let images = ImageBatch::new(&pixels, 2, 32, 32).expect("sizes match");
        let views = generator.generate(images, 1, 0).expect("fits");
        for v in 0..3 {
            assert_eq!(views.get(v, 0), views.get(v, 1));
        }
    }

    #[test]
    fn finetune_views_are_padded_crops() {
        let generator = FinetuneConfig::default().build().expect("valid");
        let pixels = vec![200u8; 50 * CHANNELS * 32 * 32];
        let images = ImageBatch::new(&pixels, 50, 32, 32).expect("sizes match");
        let views = generator.generate(images, 8, 0).expect("fits");
        let v = 200.0 / 255.0;
        for b in 0..50 {
            let p = generator.params(8, 0, b, 0, 32, 32).expect("fits");
            let ViewGeometry::Window { top, left } = p.geometry else {
                panic!("window expected");
            };
            let row = views.row(b);
            for y in 0..32 {
                for x in 0..32 {
                    let xx = if p.flip { 31 - x } else { x };
                    let inside = (4..36).contains(&(top + y)) && (4..36).contains(&(left + xx));
                    assert_eq!(row[y * 32 + x], if inside { v } else { 0.0 });
                }
            }
        }
        // Inputs smaller than the window minus the padding are rejected.
        let small = vec![0u8; CHANNELS * 20 * 20];
        let images = ImageBatch::new(&small, 1, 20, 20).expect("sizes match");
        assert!(matches!(
            generator.generate(images, 0, 0),
            Err(AugmentError::Geometry { .. })
        ));
        assert!(generator.params(0, 0, 0, 0, 20, 20).is_err());
        // An empty batch gives an empty buffer of the right shape.
        let none = ImageBatch::new(&[], 0, 32, 32).expect("empty batch");
        let views = generator.generate(none, 0, 0).expect("fits");
        assert_eq!((views.shape(), views.data.len()), ([0, 3, 32, 32], 0));
    }

    #[test]
    fn presets_deserialize_with_defaults() {
        let emp: EmpConfig = serde_json::from_str(r#"{"n_views": 8}"#).expect("valid");
        assert_eq!(emp, EmpConfig::crop(8));
        let dyn_acl: DynAclConfig = serde_json::from_str(r#"{"strength": 0.5}"#).expect("valid");
        let cfg = dyn_acl.config();
        let Geometry::ResizedCrop(rrc) = &cfg.pipeline.geometry else {
            panic!("resized crop expected");
        };
        assert!((rrc.scale[0] - 0.55).abs() < 1e-12);
        assert_eq!(rrc.interpolation, Interpolation::Bicubic);
        assert!((cfg.pipeline.jitter.p - 0.4).abs() < 1e-12);
        assert!((cfg.pipeline.grayscale_p - 0.1).abs() < 1e-12);
        assert!(serde_json::from_str::<FinetuneConfig>(r#"{"pad": 4}"#).is_err());
        let mv: MultiViewConfig = serde_json::from_str(
            r#"{"n_views": 2, "layout": "interleaved", "pipeline": {"hflip_p": 0.5}}"#,
        )
        .expect("valid");
        assert_eq!(mv.layout, Layout::Interleaved);
        assert!(
            MultiView::new(MultiViewConfig {
                n_views: 0,
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn bench_reports_a_positive_rate() {
        assert!(bench_emp(4, 2, 1) > 0.0);
    }

    /// The issue's benchmark: `cargo test --release -p pipe-stages --lib bench_emp_16 --
    /// --ignored --nocapture` (prefix `RAYON_NUM_THREADS=1` for one core).
    #[test]
    #[ignore = "benchmark; run in release"]
    fn bench_emp_16_views_batch_100() {
        let rate = bench_emp(100, 16, 30);
        eprintln!(
            "EMP 16 views, batch 100: {rate:.0} views/s on {} threads",
            rayon::current_num_threads()
        );
        assert!(rate > 0.0);
    }
}
