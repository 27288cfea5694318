//! One view of one image: the per-image pipeline of METHODS 2.1, drawn then rendered.
//!
//! # Steps, in order
//!
//! | step | config | draws (only when the step is enabled) |
//! |---|---|---|
//! | 1 geometry | [`Geometry`]: none, `RandomResizedCrop`, or `RandomCrop` with padding | crop box / window |
//! | 2 horizontal flip | `hflip_p` | one Bernoulli |
//! | 3 `RandomApply(ColorJitter, p)` | [`ColorJitter`] | Bernoulli, then order + factors |
//! | 4 `RandomGrayscale` | `grayscale_p` | one Bernoulli |
//! | 5 `GBlur` | [`GaussianBlur`] | Bernoulli, then σ |
//! | 6 `RandomApply(Solarize, p)` | `solarize_p` | one Bernoulli |
//!
//! A step with probability 0 (or an identity jitter) draws nothing, so it is exactly as if
//! it were absent from the `Compose`.
//!
//! # Rendering (fused, no per-pixel allocation)
//!
//! The u8 crop is converted to f32 (`v / 255`, through a 256-entry table), resampled along
//! the width (the flip is folded into the output index), then along the height, straight
//! into the view's output slice `(3, size, size)`; colour ops then run in place on that
//! slice. Resize weights are precomputed per crop side once per batch ([`Plan`]), since a
//! 32×32 image has only 32 possible crop widths and heights. A bicubic resize is clamped to
//! [0, 1] (Pillow's u8 output saturates the same way; torch's float kernel would not clamp).

use serde::{Deserialize, Serialize};

use super::blur::{GaussianBlur, gaussian_blur};
use super::color::{ColorJitter, JitterParams, grayscale, solarize};
use super::crop::{CropBox, RandomCrop, RandomResizedCrop};
use super::error::{AugmentError, check_probability};
use super::resize::{Interpolation, ResizeTable, resample_cols, resample_rows};
use super::views::CHANNELS;
use crate::rng::Rng;

/// `v / 255` for every byte (exactly torchvision's `to_tensor` division).
pub(crate) const U8_TO_F32: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as f32 / 255.0;
        i += 1;
    }
    t
};

/// The geometric step of a pipeline.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Geometry {
    /// No geometry: the input must already be `size × size`.
    #[default]
    None,
    /// `RandomResizedCrop(size, scale, ratio, interpolation)`.
    ResizedCrop(RandomResizedCrop),
    /// `RandomCrop(size, padding, padding_mode)`.
    PadCrop(RandomCrop),
}

/// The per-view augmentation pipeline (see the module docs). The default is the identity
/// ("to tensor" only) at 32×32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Output side (default 32).
    pub size: usize,
    /// Step 1 (default none).
    pub geometry: Geometry,
    /// Step 2: flip probability (default 0).
    pub hflip_p: f64,
    /// Step 3: colour jitter and its probability (default identity).
    pub jitter: ColorJitter,
    /// Step 4: grayscale probability (default 0).
    pub grayscale_p: f64,
    /// Step 5: blur (default p = 0).
    pub blur: GaussianBlur,
    /// Step 6: solarize probability (default 0).
    pub solarize_p: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            size: 32,
            geometry: Geometry::None,
            hflip_p: 0.0,
            jitter: ColorJitter::default(),
            grayscale_p: 0.0,
            blur: GaussianBlur::default(),
            solarize_p: 0.0,
        }
    }
}

/// Where the view's pixels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewGeometry {
    /// The whole image, unchanged.
    Full,
    /// A crop box, resized to the output size.
    Crop(CropBox),
    /// A `size × size` window of the padded image, corner in padded coordinates.
    Window {
        /// First padded row.
        top: usize,
        /// First padded column.
        left: usize,
    },
}

/// Every random decision of one view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewParams {
    /// Step 1.
    pub geometry: ViewGeometry,
    /// Step 2.
    pub flip: bool,
    /// Step 3 (`None`: not applied).
    pub jitter: Option<JitterParams>,
    /// Step 4.
    pub grayscale: bool,
    /// Step 5: the blur σ (`None`: not applied).
    pub blur_sigma: Option<f32>,
    /// Step 6.
    pub solarize: bool,
}

impl PipelineConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), AugmentError> {
        if self.size == 0 {
            return Err(AugmentError::config("pipeline.size", "must be positive"));
        }
        if let Geometry::ResizedCrop(rrc) = &self.geometry {
            rrc.validate()?;
        }
        check_probability("pipeline.hflip_p", self.hflip_p)?;
        self.jitter.validate()?;
        check_probability("pipeline.grayscale_p", self.grayscale_p)?;
        self.blur.validate()?;
        check_probability("pipeline.solarize_p", self.solarize_p)
    }

    /// Checks that `height × width` inputs fit the geometry.
    ///
    /// # Errors
    /// [`AugmentError::Geometry`].
    pub fn check_input(&self, height: usize, width: usize) -> Result<(), AugmentError> {
        match &self.geometry {
            Geometry::None if height != self.size || width != self.size => {
                Err(AugmentError::Geometry {
                    what: "no geometry step, so images must already have the output size",
                    height,
                    width,
                    size: self.size,
                })
            }
            Geometry::PadCrop(rc) => rc.check(height, width, self.size),
            _ => Ok(()),
        }
    }

    /// Draws every random decision of one view of a `height × width` image, in the order of
    /// the module docs.
    pub fn sample(&self, rng: &mut Rng, height: usize, width: usize) -> ViewParams {
        let geometry = match &self.geometry {
            Geometry::None => ViewGeometry::Full,
            Geometry::ResizedCrop(rrc) => ViewGeometry::Crop(rrc.sample(rng, height, width)),
            Geometry::PadCrop(rc) => {
                let (top, left) = rc.sample(rng, height, width, self.size);
                ViewGeometry::Window { top, left }
            }
        };
        let flip = self.hflip_p > 0.0 && rng.bernoulli(self.hflip_p);
        let jitter = if !self.jitter.is_identity() && self.jitter.p > 0.0 {
            rng.bernoulli(self.jitter.p)
                .then(|| self.jitter.sample(rng))
        } else {
            None
        };
        let grayscale = self.grayscale_p > 0.0 && rng.bernoulli(self.grayscale_p);
        let blur_sigma = if self.blur.p > 0.0 && rng.bernoulli(self.blur.p) {
            Some(rng.uniform(self.blur.sigma[0], self.blur.sigma[1]) as f32)
        } else {
            None
        };
        let solarize = self.solarize_p > 0.0 && rng.bernoulli(self.solarize_p);
        ViewParams {
            geometry,
            flip,
            jitter,
            grayscale,
            blur_sigma,
            solarize,
        }
    }
}

/// Reusable working memory of one worker thread.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    crop: Vec<f32>,
    tmp: Vec<f32>,
    blur: Vec<f32>,
}

/// A pipeline prepared for one input size: resize tables for every possible crop side.
#[derive(Debug)]
pub struct Plan<'a> {
    cfg: &'a PipelineConfig,
    in_h: usize,
    in_w: usize,
    /// `by_width[w - 1]`: width `w` → `size`.
    by_width: Vec<ResizeTable>,
    /// `by_height[h - 1]`: height `h` → `size`.
    by_height: Vec<ResizeTable>,
}

impl<'a> Plan<'a> {
    /// Prepares `cfg` for `in_h × in_w` images. Call [`PipelineConfig::check_input`] first.
    pub fn new(cfg: &'a PipelineConfig, in_h: usize, in_w: usize) -> Self {
        let (by_width, by_height) = match &cfg.geometry {
            Geometry::ResizedCrop(rrc) => {
                let table = |n| ResizeTable::new(n, cfg.size, rrc.interpolation, rrc.antialias);
                (
                    (1..=in_w).map(table).collect(),
                    (1..=in_h).map(table).collect(),
                )
            }
            _ => (Vec::new(), Vec::new()),
        };
        Self {
            cfg,
            in_h,
            in_w,
            by_width,
            by_height,
        }
    }

    /// Renders the view described by `params` of `image` (`(3, in_h, in_w)` bytes) into
    /// `out` (`(3, size, size)` values).
    pub(crate) fn render(
        &self,
        image: &[u8],
        params: &ViewParams,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let size = self.cfg.size;
        let hw = size * size;
        match params.geometry {
            ViewGeometry::Full => self.copy_full(image, params.flip, out),
            ViewGeometry::Crop(b) => self.resized_crop(image, b, params.flip, out, scratch),
            ViewGeometry::Window { top, left } => self.pad_crop(image, top, left, params.flip, out),
        }
        if let Some(j) = &params.jitter {
            j.apply(out, hw);
        }
        if params.grayscale {
            grayscale(out, hw);
        }
        if let Some(sigma) = params.blur_sigma {
            gaussian_blur(
                out,
                CHANNELS,
                size,
                size,
                sigma,
                self.cfg.blur.method,
                &mut scratch.blur,
            );
        }
        if params.solarize {
            solarize(out);
        }
    }

    fn copy_full(&self, image: &[u8], flip: bool, out: &mut [f32]) {
        let w = self.in_w;
        for (src, dst) in image.chunks_exact(w).zip(out.chunks_exact_mut(w)) {
            if flip {
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = U8_TO_F32[usize::from(*s)];
                }
            } else {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = U8_TO_F32[usize::from(*s)];
                }
            }
        }
    }

    fn resized_crop(
        &self,
        image: &[u8],
        b: CropBox,
        flip: bool,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let size = self.cfg.size;
        let (in_h, in_w) = (self.in_h, self.in_w);
        // (3, b.height, b.width) crop as f32.
        scratch.crop.clear();
        for c in 0..CHANNELS {
            for y in b.top..b.top + b.height {
                let row = &image[(c * in_h + y) * in_w + b.left..][..b.width];
                scratch
                    .crop
                    .extend(row.iter().map(|&v| f32::from(v) / 255.0));
            }
        }
        // Width pass (flip folded in): (3, b.height, size).
        let tw = &self.by_width[b.width - 1];
        scratch.tmp.resize(CHANNELS * b.height * size, 0.0);
        resample_rows(
            &scratch.crop,
            CHANNELS * b.height,
            tw,
            flip,
            &mut scratch.tmp,
        );
        // Height pass, straight into the output planes.
        let th = &self.by_height[b.height - 1];
        for (src, dst) in scratch
            .tmp
            .chunks_exact(b.height * size)
            .zip(out.chunks_exact_mut(size * size))
        {
            resample_cols(src, size, th, dst);
        }
        if let Geometry::ResizedCrop(rrc) = &self.cfg.geometry
            && rrc.interpolation == Interpolation::Bicubic
        {
            for v in out.iter_mut() {
                *v = v.clamp(0.0, 1.0);
            }
        }
    }

    fn pad_crop(&self, image: &[u8], top: usize, left: usize, flip: bool, out: &mut [f32]) {
        let Geometry::PadCrop(rc) = &self.cfg.geometry else {
            return;
        };
        let size = self.cfg.size;
        let (in_h, in_w) = (self.in_h, self.in_w);
        for c in 0..CHANNELS {
            let plane = &image[c * in_h * in_w..(c + 1) * in_h * in_w];
            for y in 0..size {
                let dst = &mut out[(c * size + y) * size..][..size];
                let Some(sy) = rc.source_index(top + y, in_h) else {
                    dst.fill(0.0);
                    continue;
                };
                let row = &plane[sy * in_w..(sy + 1) * in_w];
                for (x, d) in dst.iter_mut().enumerate() {
                    let xx = if flip { size - 1 - x } else { x };
                    *d = match rc.source_index(left + xx, in_w) {
                        Some(sx) => U8_TO_F32[usize::from(row[sx])],
                        None => 0.0,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::augment::crop::PaddingMode;

    /// A 3×h×w image whose value encodes (channel, row, column).
    fn coded(h: usize, w: usize) -> Vec<u8> {
        (0..CHANNELS * h * w)
            .map(|i| {
                let (c, y, x) = (i / (h * w), (i / w) % h, i % w);
                (c * 80 + y * 7 + x) as u8
            })
            .collect()
    }

    fn render(cfg: &PipelineConfig, img: &[u8], h: usize, w: usize, p: &ViewParams) -> Vec<f32> {
        let plan = Plan::new(cfg, h, w);
        let mut out = vec![f32::NAN; CHANNELS * cfg.size * cfg.size];
        plan.render(img, p, &mut out, &mut Scratch::default());
        out
    }

    fn plain(geometry: ViewGeometry, flip: bool) -> ViewParams {
        ViewParams {
            geometry,
            flip,
            jitter: None,
            grayscale: false,
            blur_sigma: None,
            solarize: false,
        }
    }

    #[test]
    fn full_copy_and_flip() {
        let cfg = PipelineConfig {
            size: 4,
            ..Default::default()
        };
        let img = coded(4, 4);
        let out = render(&cfg, &img, 4, 4, &plain(ViewGeometry::Full, false));
        let want: Vec<f32> = img.iter().map(|&v| f32::from(v) / 255.0).collect();
        assert_eq!(out, want);
        let flipped = render(&cfg, &img, 4, 4, &plain(ViewGeometry::Full, true));
        for r in 0..12 {
            let mut row = want[r * 4..(r + 1) * 4].to_vec();
            row.reverse();
            assert_eq!(&flipped[r * 4..(r + 1) * 4], &row[..]);
        }
    }

    #[test]
    fn identity_crop_equals_the_image_and_patch_upsamples_the_box() {
        let cfg = PipelineConfig {
            size: 8,
            geometry: Geometry::ResizedCrop(RandomResizedCrop::default()),
            ..Default::default()
        };
        let img = coded(8, 8);
        let full = CropBox {
            top: 0,
            left: 0,
            height: 8,
            width: 8,
        };
        let out = render(&cfg, &img, 8, 8, &plain(ViewGeometry::Crop(full), false));
        let want: Vec<f32> = img.iter().map(|&v| f32::from(v) / 255.0).collect();
        assert_eq!(out, want);
        // A 4x4 box at (2, 3) doubled: the same as resizing the cropped floats.
        let b = CropBox {
            top: 2,
            left: 3,
            height: 4,
            width: 4,
        };
        let out = render(&cfg, &img, 8, 8, &plain(ViewGeometry::Crop(b), false));
        let crop: Vec<f32> = (0..3)
            .flat_map(|c| (2..6).flat_map(move |y| (3..7).map(move |x| (c, y, x))))
            .map(|(c, y, x)| want[(c * 8 + y) * 8 + x])
            .collect();
        let reference =
            super::super::resize::resize(&crop, 3, 4, 4, 8, 8, Interpolation::Bilinear, true);
        assert!(
            out.iter()
                .zip(&reference)
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
    }

    #[test]
    fn pad_crop_shows_zero_and_reflected_borders() {
        let img = vec![255u8; CHANNELS * 8 * 8];
        let mut cfg = PipelineConfig {
            size: 8,
            geometry: Geometry::PadCrop(RandomCrop {
                padding: 2,
                padding_mode: PaddingMode::Zero,
            }),
            ..Default::default()
        };
        // Window at the padded origin: 2 zero rows on top, 2 zero columns on the left.
        let out = render(
            &cfg,
            &img,
            8,
            8,
            &plain(ViewGeometry::Window { top: 0, left: 0 }, false),
        );
        for c in 0..3 {
            for y in 0..8 {
                for x in 0..8 {
                    let v = out[(c * 8 + y) * 8 + x];
                    let want = if y < 2 || x < 2 { 0.0 } else { 1.0 };
                    assert_eq!(v, want, "c{c} y{y} x{x}");
                }
            }
        }
        // Flipped: the zero columns move to the right.
        let out = render(
            &cfg,
            &img,
            8,
            8,
            &plain(ViewGeometry::Window { top: 0, left: 0 }, true),
        );
        assert_eq!(out[2 * 8 + 7], 0.0);
        assert_eq!(out[2 * 8], 1.0);
        // Reflect: padded (0, 0) is pixel (2, 2), padded (1, 3) is pixel (1, 1).
        cfg.geometry = Geometry::PadCrop(RandomCrop {
            padding: 2,
            padding_mode: PaddingMode::Reflect,
        });
        let img = coded(8, 8);
        let out = render(
            &cfg,
            &img,
            8,
            8,
            &plain(ViewGeometry::Window { top: 0, left: 0 }, false),
        );
        let px = |c: usize, y: usize, x: usize| f32::from(img[(c * 8 + y) * 8 + x]) / 255.0;
        assert_eq!(out[0], px(0, 2, 2));
        assert_eq!(out[8 + 3], px(0, 1, 1));
        assert_eq!(out[(8 + 5) * 8 + 6], px(1, 3, 4));
    }

    #[test]
    fn sample_draws_only_enabled_steps() {
        let cfg = PipelineConfig::default();
        let mut a = Rng::new(1);
        let p = cfg.sample(&mut a, 32, 32);
        assert_eq!(p, plain(ViewGeometry::Full, false));
        // Nothing was drawn.
        assert_eq!(a, Rng::new(1));
        let all = PipelineConfig {
            hflip_p: 1.0,
            jitter: ColorJitter::new(0.4, 0.4, 0.4, 0.1, 1.0),
            grayscale_p: 1.0,
            blur: GaussianBlur {
                p: 1.0,
                ..Default::default()
            },
            solarize_p: 1.0,
            ..Default::default()
        };
        let p = all.sample(&mut a, 32, 32);
        assert!(p.flip && p.jitter.is_some() && p.grayscale && p.solarize);
        assert!(p.blur_sigma.is_some_and(|s| (0.1..2.0).contains(&s)));
    }

    #[test]
    fn bicubic_output_is_clamped() {
        let cfg = PipelineConfig {
            size: 8,
            geometry: Geometry::ResizedCrop(RandomResizedCrop {
                interpolation: Interpolation::Bicubic,
                ..Default::default()
            }),
            ..Default::default()
        };
        // A 2x2 black/white checker upsampled overshoots without the clamp.
        let mut img = vec![0u8; CHANNELS * 2 * 2];
        for c in 0..3 {
            img[c * 4 + 1] = 255;
            img[c * 4 + 2] = 255;
        }
        let b = CropBox {
            top: 0,
            left: 0,
            height: 2,
            width: 2,
        };
        let out = render(&cfg, &img, 2, 2, &plain(ViewGeometry::Crop(b), false));
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(out.contains(&0.0) && out.contains(&1.0));
    }

    #[test]
    fn check_input_and_validate() {
        let cfg = PipelineConfig::default();
        assert!(cfg.check_input(32, 32).is_ok());
        assert!(cfg.check_input(28, 32).is_err());
        let pad = PipelineConfig {
            geometry: Geometry::PadCrop(RandomCrop::default()),
            ..Default::default()
        };
        assert!(pad.check_input(24, 24).is_ok());
        assert!(pad.check_input(20, 24).is_err());
        let bad = PipelineConfig {
            solarize_p: 2.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn serde_round_trip_and_unknown_fields() {
        let json = r#"{"size": 32, "geometry": {"kind": "resized_crop", "scale": [0.25, 0.25],
            "ratio": [1, 1]}, "hflip_p": 0.5, "jitter": {"hue": 0.2, "p": 0.8}}"#;
        let cfg: PipelineConfig = serde_json::from_str(json).expect("valid config");
        let Geometry::ResizedCrop(rrc) = &cfg.geometry else {
            panic!("resized_crop expected");
        };
        assert_eq!(rrc.scale, [0.25, 0.25]);
        assert_eq!(rrc.interpolation, Interpolation::Bilinear);
        assert_eq!(cfg.jitter.hue, 0.2);
        assert_eq!(cfg.jitter.brightness, 0.0);
        let back: PipelineConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("serialises"))
                .expect("round trip");
        assert_eq!(back, cfg);
        assert!(serde_json::from_str::<PipelineConfig>(r#"{"hflip": 0.5}"#).is_err());
        let pad: PipelineConfig = serde_json::from_str(
            r#"{"geometry": {"kind": "pad_crop", "padding_mode": "reflect"}}"#,
        )
        .expect("valid config");
        assert_eq!(
            pad.geometry,
            Geometry::PadCrop(RandomCrop {
                padding: 4,
                padding_mode: PaddingMode::Reflect
            })
        );
    }
}
