//! Crop geometry: `RandomResizedCrop` parameters and `RandomCrop` with padding.
//!
//! # RandomResizedCrop (torchvision `RandomResizedCrop.get_params`, METHODS 2.1)
//!
//! For an `H × W` image, try up to 10 times:
//! `A = H W · U(s₀, s₁)`, `a = exp(U(ln r₀, ln r₁))`, `w = round(√(A a))`, `h = round(√(A / a))`
//! (Python's `round`: halves go to even), and accept if `0 < w ≤ W` and `0 < h ≤ H`; the
//! corner is then `top ~ U{0..H-h}`, `left ~ U{0..W-w}`. If all 10 tries fail, fall back to
//! the centred crop of aspect ratio `W/H` clamped to `[r₀, r₁]`: `w = W, h = round(W / r₀)`
//! when `W/H < r₀`; `h = H, w = round(H r₁)` when `W/H > r₁`; the whole image otherwise;
//! `top = (H - h) / 2`, `left = (W - w) / 2` (floor).
//!
//! Special cases: crop-based EMP/SimCLR (`s ∈ [0.08, 1]`, `r ∈ [3/4, 4/3]`), patch-based EMP
//! (`s₀ = s₁ = 0.25`, `r₀ = r₁ = 1`: always a 16×16 patch of a 32×32 image).
//!
//! # RandomCrop(size, padding) (torchvision `RandomCrop`)
//!
//! Pad every side by `p` (zeros, or reflection without repeating the edge: `x[-1] = x[1]`),
//! then take a `size × size` window at `top ~ U{0..H+2p-size}`, `left ~ U{0..W+2p-size}`.
//! Coordinates of [`RandomCrop::sample`] are in the padded image.

use serde::{Deserialize, Serialize};

use super::error::{AugmentError, check_positive_range};
use super::resize::Interpolation;
use crate::rng::Rng;

/// A crop rectangle in image coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// `RandomResizedCrop`: a random box of random area fraction and aspect ratio, resized to the
/// output size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomResizedCrop {
    /// Area fraction range `[s₀, s₁]` (default `[0.08, 1]`).
    pub scale: [f64; 2],
    /// Aspect ratio (width / height) range `[r₀, r₁]` (default `[3/4, 4/3]`).
    pub ratio: [f64; 2],
    /// Resampling filter (default bilinear).
    pub interpolation: Interpolation,
    /// Antialiased resampling (default true: torchvision's default and Pillow's behaviour).
    pub antialias: bool,
}

impl Default for RandomResizedCrop {
    fn default() -> Self {
        Self {
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            interpolation: Interpolation::Bilinear,
            antialias: true,
        }
    }
}

impl RandomResizedCrop {
    /// Checks `0 < s₀ ≤ s₁` and `0 < r₀ ≤ r₁` (finite).
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), AugmentError> {
        check_positive_range("resized_crop.scale", self.scale)?;
        check_positive_range("resized_crop.ratio", self.ratio)
    }

    /// Draws a crop box of an `height × width` image (the algorithm of the module docs).
    pub fn sample(&self, rng: &mut Rng, height: usize, width: usize) -> CropBox {
        let area = (height * width) as f64;
        let [s0, s1] = self.scale;
        let [r0, r1] = self.ratio;
        let (log_r0, log_r1) = (r0.ln(), r1.ln());
        for _ in 0..10 {
            let target_area = area * rng.uniform(s0, s1);
            let aspect = rng.uniform(log_r0, log_r1).exp();
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
                let (w, h) = (w as usize, h as usize);
                let top = rng.below_usize(height - h + 1);
                let left = rng.below_usize(width - w + 1);
                return CropBox {
                    top,
                    left,
                    height: h,
                    width: w,
                };
            }
        }
        self.fallback(height, width)
    }

    /// The centred fallback box (aspect ratio clamped to the range).
    pub fn fallback(&self, height: usize, width: usize) -> CropBox {
        let in_ratio = width as f64 / height as f64;
        let [r0, r1] = self.ratio;
        let (h, w) = if in_ratio < r0 {
            let h = (width as f64 / r0).round_ties_even() as usize;
            (h.clamp(1, height), width)
        } else if in_ratio > r1 {
            let w = (height as f64 * r1).round_ties_even() as usize;
            (height, w.clamp(1, width))
        } else {
            (height, width)
        };
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }
}

/// How `RandomCrop` fills the padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaddingMode {
    /// Zeros (black): torchvision's default, the fine-tuning and AdvCL "org" view.
    #[default]
    Zero,
    /// Reflection without repeating the edge (`[c b | a b c | b a]`): R-MAO.
    Reflect,
}

/// `RandomCrop(size, padding)`: pad, then a random `size × size` window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomCrop {
    /// Pixels of padding on every side (default 4).
    pub padding: usize,
    /// Padding fill (default zeros).
    pub padding_mode: PaddingMode,
}

impl Default for RandomCrop {
    fn default() -> Self {
        Self {
            padding: 4,
            padding_mode: PaddingMode::Zero,
        }
    }
}

impl RandomCrop {
    /// Checks that a `size × size` window fits the padded `height × width` image and that
    /// reflection has enough pixels to mirror.
    ///
    /// # Errors
    /// [`AugmentError::Geometry`].
    pub fn check(&self, height: usize, width: usize, size: usize) -> Result<(), AugmentError> {
        let p = self.padding;
        if height + 2 * p < size || width + 2 * p < size {
            return Err(AugmentError::Geometry {
                what: "random crop larger than the padded image",
                height,
                width,
                size,
            });
        }
        if self.padding_mode == PaddingMode::Reflect && (p >= height || p >= width) {
            return Err(AugmentError::Geometry {
                what: "reflect padding must be smaller than the image",
                height,
                width,
                size,
            });
        }
        Ok(())
    }

    /// Draws the window's `(top, left)` in padded coordinates. Call [`RandomCrop::check`]
    /// first.
    pub fn sample(
        &self,
        rng: &mut Rng,
        height: usize,
        width: usize,
        size: usize,
    ) -> (usize, usize) {
        let p = self.padding;
        let top = rng.below_usize(height + 2 * p - size + 1);
        let left = rng.below_usize(width + 2 * p - size + 1);
        (top, left)
    }

    /// The source index of padded coordinate `q` along an axis of `n` pixels: `None` in the
    /// zero padding.
    #[inline]
    pub fn source_index(&self, q: usize, n: usize) -> Option<usize> {
        let i = q as isize - self.padding as isize;
        let n = n as isize;
        if (0..n).contains(&i) {
            return Some(i as usize);
        }
        match self.padding_mode {
            PaddingMode::Zero => None,
            PaddingMode::Reflect => Some(reflect_index(i, n as usize)),
        }
    }
}

/// Reflection of index `i` into `[0, n)` without repeating the edge (period `2(n - 1)`).
pub(crate) fn reflect_index(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    if m < n as isize {
        m as usize
    } else {
        (period - m) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_fall_in_range_and_cover_it() {
        // A large image makes rounding negligible, so the box's area fraction and ratio show
        // the sampled values.
        let rrc = RandomResizedCrop::default();
        let mut rng = Rng::new(11);
        let (n, m) = (1000usize, 1000usize);
        let (mut amin, mut amax, mut rmin, mut rmax) = (f64::MAX, 0.0f64, f64::MAX, 0.0f64);
        for _ in 0..5000 {
            let b = rrc.sample(&mut rng, n, m);
            assert!(b.top + b.height <= n && b.left + b.width <= m);
            let area = (b.height * b.width) as f64 / (n * m) as f64;
            let ratio = b.width as f64 / b.height as f64;
            assert!((0.08 - 2e-3..=1.0).contains(&area), "{area}");
            assert!((0.75 * 0.99..=4.0 / 3.0 * 1.01).contains(&ratio), "{ratio}");
            amin = amin.min(area);
            amax = amax.max(area);
            rmin = rmin.min(ratio);
            rmax = rmax.max(ratio);
        }
        // Near both ends of both ranges (large areas with extreme ratios are rejected,
        // so the top of the area range is reached with ratios near 1).
        assert!(amin < 0.09 && amax > 0.97, "{amin} {amax}");
        assert!(rmin < 0.76 && rmax > 1.31, "{rmin} {rmax}");
    }

    #[test]
    fn cifar_boxes_stay_inside_and_sides_span_9_to_32() {
        let rrc = RandomResizedCrop::default();
        let mut rng = Rng::new(12);
        let mut sides = std::collections::BTreeSet::new();
        for _ in 0..20_000 {
            let b = rrc.sample(&mut rng, 32, 32);
            assert!(b.height >= 1 && b.width >= 1);
            assert!(b.top + b.height <= 32 && b.left + b.width <= 32);
            sides.insert(b.width.min(b.height));
        }
        // sqrt(0.08 * 1024 * 3/4) ≈ 7.8: the smallest side is 8; full crops happen.
        assert_eq!(sides.first(), Some(&8));
        assert_eq!(sides.last(), Some(&32));
    }

    #[test]
    fn patch_mode_is_always_16x16_anywhere() {
        let rrc = RandomResizedCrop {
            scale: [0.25, 0.25],
            ratio: [1.0, 1.0],
            ..Default::default()
        };
        let mut rng = Rng::new(13);
        let mut tops = [0u32; 17];
        let mut lefts = [0u32; 17];
        for _ in 0..5000 {
            let b = rrc.sample(&mut rng, 32, 32);
            assert_eq!((b.height, b.width), (16, 16));
            tops[b.top] += 1;
            lefts[b.left] += 1;
        }
        assert!(
            tops.iter().chain(&lefts).all(|&c| c > 200),
            "{tops:?} {lefts:?}"
        );
    }

    #[test]
    fn fallback_clamps_the_ratio() {
        // Every try fails (the whole area at ratio 2 needs w = 45 > 32): centred 32x16.
        let wide = RandomResizedCrop {
            scale: [1.0, 1.0],
            ratio: [2.0, 2.0],
            ..Default::default()
        };
        let want = CropBox {
            top: 8,
            left: 0,
            height: 16,
            width: 32,
        };
        assert_eq!(wide.sample(&mut Rng::new(1), 32, 32), want);
        // Ratio below the image's: h = 32, w = round(32 * 0.5) = 16, centred horizontally.
        let tall = RandomResizedCrop {
            scale: [1.0, 1.0],
            ratio: [0.25, 0.5],
            ..Default::default()
        };
        let want = CropBox {
            top: 0,
            left: 8,
            height: 32,
            width: 16,
        };
        assert_eq!(tall.sample(&mut Rng::new(1), 32, 32), want);
        // Python's round sends halves to even: a 5x5 image with ratio >= 2 falls back to
        // w = 5, h = round(5 / 2) = round(2.5) = 2.
        let r = RandomResizedCrop {
            ratio: [2.0, 3.0],
            ..Default::default()
        };
        assert_eq!(r.fallback(5, 5).height, 2);
        // Identity scale and ratio give the whole image.
        let id = RandomResizedCrop {
            scale: [1.0, 1.0],
            ratio: [1.0, 1.0],
            ..Default::default()
        };
        let b = id.sample(&mut Rng::new(2), 32, 32);
        assert_eq!((b.top, b.left, b.height, b.width), (0, 0, 32, 32));
    }

    #[test]
    fn validate_rejects_bad_ranges() {
        let mut r = RandomResizedCrop::default();
        assert!(r.validate().is_ok());
        r.scale = [0.5, 0.1];
        assert!(r.validate().is_err());
        r.scale = [0.1, 0.5];
        r.ratio = [0.0, 1.0];
        assert!(r.validate().is_err());
    }

    #[test]
    fn random_crop_indices() {
        let zero = RandomCrop::default();
        assert_eq!(zero.source_index(0, 32), None);
        assert_eq!(zero.source_index(3, 32), None);
        assert_eq!(zero.source_index(4, 32), Some(0));
        assert_eq!(zero.source_index(35, 32), Some(31));
        assert_eq!(zero.source_index(36, 32), None);
        let refl = RandomCrop {
            padding: 4,
            padding_mode: PaddingMode::Reflect,
        };
        // torch reflect: [.., x2, x1 | x0, x1, .., x31 | x30, x29, ..]
        assert_eq!(refl.source_index(3, 32), Some(1));
        assert_eq!(refl.source_index(0, 32), Some(4));
        assert_eq!(refl.source_index(36, 32), Some(30));
        assert_eq!(refl.source_index(39, 32), Some(27));
        assert!(refl.check(32, 32, 32).is_ok());
        assert!(refl.check(4, 4, 4).is_err());
        assert!(zero.check(20, 20, 32).is_err());
        assert_eq!(reflect_index(-7, 3), 1);
        // The window's corner covers all 9 positions of a 40 -> 32 crop.
        let mut rng = Rng::new(3);
        let mut seen = [false; 9];
        for _ in 0..500 {
            let (t, l) = zero.sample(&mut rng, 32, 32, 32);
            assert!(t <= 8 && l <= 8);
            seen[t] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
