//! Colour transforms on one f32 RGB image in CHW layout (`img.len() == 3 * hw`), values in
//! [0, 1]: `ColorJitter`, grayscale, solarize, and the RGB ↔ HSV conversions.
//!
//! # Math (torchvision `transforms.v2.functional` on float tensors, METHODS 2.1)
//!
//! With `gray(x) = 0.299 R + 0.587 G + 0.114 B` and `blend(x, y, α) = clamp(α x + (1 - α) y)`:
//!
//! | op | formula | factor drawn from |
//! |---|---|---|
//! | brightness | `clamp(β x)` | `U(max(0, 1 - b), 1 + b)` |
//! | contrast | `blend(x, mean(gray(x)), γ)` (the mean over the whole image) | `U(max(0, 1 - c), 1 + c)` |
//! | saturation | `blend(x, gray(x), σ)` (per pixel) | `U(max(0, 1 - s), 1 + s)` |
//! | hue | HSV hue `h ← (h + η) mod 1`, back to RGB | `U(-h, h)` |
//!
//! [`ColorJitter`] applies the four in a uniformly random order (torchvision draws a random
//! permutation of the four), skipping an op whose magnitude is 0 (torchvision sets it to
//! `None`), and the whole jitter with probability `p` (`RandomApply`). A hue shift of exactly
//! 0 skips the HSV round trip (it would otherwise cost ~1e-7 of rounding).
//!
//! RGB → HSV is torchvision's `_rgb_to_hsv`: `V = max`, `S = (max - min) / max`,
//! `H = (6 + hue sector formula) / 6 mod 1` with `H = S = 0` on grey pixels; HSV → RGB is
//! `_hsv_to_rgb` (sector `i = ⌊6H⌋ mod 6`, `p, q, t` clamped to [0, 1]).
//!
//! Grayscale weights: 0.299/0.587/0.114 (ITU-R 601, Pillow's `convert("L")`, which the
//! reference pipelines run on their PIL images); torchvision's tensor kernel uses 0.2989 for
//! red, a 1e-4 difference. Solarize: `v ≥ 128/255 → 1 - v` (Pillow's threshold 128 on u8).

use serde::{Deserialize, Serialize};

use super::error::{AugmentError, check_probability};
use crate::rng::Rng;

/// ITU-R 601 luma weights (R, G, B).
pub const GRAY_WEIGHTS: [f32; 3] = [0.299, 0.587, 0.114];

/// The solarize threshold: Pillow's 128 on u8 images.
pub const SOLARIZE_THRESHOLD: f32 = 128.0 / 255.0;

/// Splits a CHW RGB image into its three planes.
#[inline]
fn planes(img: &mut [f32], hw: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (r, rest) = img.split_at_mut(hw);
    let (g, b) = rest.split_at_mut(hw);
    (r, g, &mut b[..hw])
}

#[inline]
fn gray(r: f32, g: f32, b: f32) -> f32 {
    GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b
}

/// `x ← clamp(β x)`.
pub fn adjust_brightness(img: &mut [f32], factor: f32) {
    for v in img.iter_mut() {
        *v = (*v * factor).clamp(0.0, 1.0);
    }
}

/// `x ← clamp(γ x + (1 - γ) mean(gray(x)))`, the mean over all pixels.
pub fn adjust_contrast(img: &mut [f32], hw: usize, factor: f32) {
    let (r, g, b) = planes(img, hw);
    let mut sum = 0.0f64;
    for i in 0..hw {
        sum += f64::from(gray(r[i], g[i], b[i]));
    }
    let mean = (sum / hw as f64) as f32;
    let offset = (1.0 - factor) * mean;
    for v in img[..3 * hw].iter_mut() {
        *v = (factor * *v + offset).clamp(0.0, 1.0);
    }
}

/// `x ← clamp(σ x + (1 - σ) gray(x))`, per pixel.
pub fn adjust_saturation(img: &mut [f32], hw: usize, factor: f32) {
    let (r, g, b) = planes(img, hw);
    let keep = 1.0 - factor;
    for i in 0..hw {
        let l = keep * gray(r[i], g[i], b[i]);
        r[i] = (factor * r[i] + l).clamp(0.0, 1.0);
        g[i] = (factor * g[i] + l).clamp(0.0, 1.0);
        b[i] = (factor * b[i] + l).clamp(0.0, 1.0);
    }
}

#[inline(always)]
fn max2(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

#[inline(always)]
fn min2(a: f32, b: f32) -> f32 {
    if a < b { a } else { b }
}

#[inline(always)]
fn clamp01(x: f32) -> f32 {
    min2(max2(x, 0.0), 1.0)
}

/// RGB → HSV (torchvision `_rgb_to_hsv`), all in [0, 1].
#[inline(always)]
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    // Plain compare-selects (not `f32::max`) so the pixel loop vectorises; inputs are
    // never NaN.
    let maxc = max2(max2(r, g), b);
    let minc = min2(min2(r, g), b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let div = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / div;
    let gc = (maxc - g) / div;
    let bc = (maxc - b) / div;
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    // fmod(h / 6 + 1, 1): the argument lies in [5/6, 11/6], where subtracting 1 is exact.
    let x = h * (1.0 / 6.0) + 1.0;
    let h = if x >= 1.0 { x - 1.0 } else { x };
    (h, s, maxc)
}

/// HSV → RGB (torchvision `_hsv_to_rgb`), for any hue (sector `⌊6h⌋ mod 6`).
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    hsv_to_rgb_unit(h - h.floor(), s, v)
}

/// HSV → RGB for `h ∈ [0, 1]`: branch-free and without libm calls, so the per-pixel loop
/// vectorises. Same arithmetic as torchvision (`h = 1` falls in sector 6 mod 6 = 0).
#[inline(always)]
fn hsv_to_rgb_unit(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    // i = ⌊6h⌋ ∈ {0..6} and the sector tests, from comparisons only (no float → int
    // conversion, which would not vectorise).
    let ge = |t: f32| if h6 >= t { 1.0 } else { 0.0 };
    let i = ge(1.0) + ge(2.0) + ge(3.0) + ge(4.0) + ge(5.0) + ge(6.0);
    let f = h6 - i;
    let sxf = s * f;
    let q = clamp01((1.0 - sxf) * v);
    let t = clamp01((sxf + (1.0 - s)) * v);
    let p = clamp01((1.0 - s) * v);
    // Sector i mod 6 → (r, g, b): 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q).
    let in0 = !(1.0..6.0).contains(&h6);
    let in1 = (1.0..2.0).contains(&h6);
    let in2 = (2.0..3.0).contains(&h6);
    let in3 = (3.0..4.0).contains(&h6);
    let in4 = (4.0..5.0).contains(&h6);
    let in5 = (5.0..6.0).contains(&h6);
    let r = if in0 || in5 {
        v
    } else if in1 {
        q
    } else if in4 {
        t
    } else {
        p
    };
    let g = if in1 || in2 {
        v
    } else if in0 {
        t
    } else if in3 {
        q
    } else {
        p
    };
    let b = if in3 || in4 {
        v
    } else if in2 {
        t
    } else if in5 {
        q
    } else {
        p
    };
    (r, g, b)
}

/// Rotates the hue by `shift` turns (`shift ∈ [-0.5, 0.5]`); 0 is an exact no-op.
pub fn adjust_hue(img: &mut [f32], hw: usize, shift: f32) {
    if shift == 0.0 {
        return;
    }
    let (r, g, b) = planes(img, hw);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (h, s, v) = rgb_to_hsv(*r, *g, *b);
        // (h + shift) mod 1 for h + shift ∈ [-0.5, 1.5): torch's `a - floor(a)`.
        let h = h + shift;
        let h = if h < 0.0 {
            h + 1.0
        } else if h >= 1.0 {
            h - 1.0
        } else {
            h
        };
        (*r, *g, *b) = hsv_to_rgb_unit(h, s, v);
    }
}

/// Replaces all three channels by `gray(x)`.
pub fn grayscale(img: &mut [f32], hw: usize) {
    let (r, g, b) = planes(img, hw);
    for i in 0..hw {
        let l = gray(r[i], g[i], b[i]);
        r[i] = l;
        g[i] = l;
        b[i] = l;
    }
}

/// `v ≥ 128/255 → 1 - v`.
pub fn solarize(img: &mut [f32]) {
    for v in img.iter_mut() {
        if *v >= SOLARIZE_THRESHOLD {
            *v = 1.0 - *v;
        }
    }
}

/// `ColorJitter(brightness, contrast, saturation, hue)` wrapped in `RandomApply(p)`.
///
/// Magnitudes follow torchvision: brightness/contrast/saturation `m` draw factors from
/// `U(max(0, 1 - m), 1 + m)`, hue `h ∈ [0, 0.5]` draws a shift from `U(-h, h)`; a magnitude of
/// 0 disables that op. The default is the identity (all 0, `p = 1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ColorJitter {
    /// Brightness magnitude.
    pub brightness: f64,
    /// Contrast magnitude.
    pub contrast: f64,
    /// Saturation magnitude.
    pub saturation: f64,
    /// Hue magnitude, in turns (≤ 0.5).
    pub hue: f64,
    /// Probability of applying the jitter at all.
    pub p: f64,
}

impl Default for ColorJitter {
    fn default() -> Self {
        Self {
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            p: 1.0,
        }
    }
}

/// One draw of [`ColorJitter`]: the op order and the factors (`None`: op disabled).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterParams {
    /// The op order: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    pub order: [u8; 4],
    /// Brightness factor β.
    pub brightness: Option<f32>,
    /// Contrast factor γ.
    pub contrast: Option<f32>,
    /// Saturation factor σ.
    pub saturation: Option<f32>,
    /// Hue shift η.
    pub hue: Option<f32>,
}

impl ColorJitter {
    /// `ColorJitter(b, c, s, h)` applied with probability `p`.
    pub fn new(brightness: f64, contrast: f64, saturation: f64, hue: f64, p: f64) -> Self {
        Self {
            brightness,
            contrast,
            saturation,
            hue,
            p,
        }
    }

    /// Whether every op is disabled.
    pub fn is_identity(&self) -> bool {
        self.brightness == 0.0 && self.contrast == 0.0 && self.saturation == 0.0 && self.hue == 0.0
    }

    /// Checks magnitudes (`≥ 0`, hue `≤ 0.5`) and `p`.
    ///
    /// # Errors
    /// [`AugmentError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), AugmentError> {
        for (field, m) in [
            ("jitter.brightness", self.brightness),
            ("jitter.contrast", self.contrast),
            ("jitter.saturation", self.saturation),
        ] {
            if !(m.is_finite() && m >= 0.0) {
                return Err(AugmentError::config(field, format!("{m} must be >= 0")));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return Err(AugmentError::config(
                "jitter.hue",
                format!("{} is not in [0, 0.5]", self.hue),
            ));
        }
        check_probability("jitter.p", self.p)
    }

    /// Draws the order and the factors (torchvision's `get_params`: permutation first, then
    /// brightness, contrast, saturation, hue for the enabled ops).
    pub fn sample(&self, rng: &mut Rng) -> JitterParams {
        let mut order = [0u8, 1, 2, 3];
        rng.shuffle(&mut order);
        let mut factor =
            |m: f64| (m > 0.0).then(|| rng.uniform((1.0 - m).max(0.0), 1.0 + m) as f32);
        let brightness = factor(self.brightness);
        let contrast = factor(self.contrast);
        let saturation = factor(self.saturation);
        let hue = (self.hue > 0.0).then(|| rng.uniform(-self.hue, self.hue) as f32);
        JitterParams {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }
}

impl JitterParams {
    /// Applies the drawn ops in order to a CHW RGB image of `hw` pixels.
    pub fn apply(&self, img: &mut [f32], hw: usize) {
        for op in self.order {
            match op {
                0 => {
                    if let Some(f) = self.brightness {
                        adjust_brightness(&mut img[..3 * hw], f);
                    }
                }
                1 => {
                    if let Some(f) = self.contrast {
                        adjust_contrast(img, hw, f);
                    }
                }
                2 => {
                    if let Some(f) = self.saturation {
                        adjust_saturation(img, hw, f);
                    }
                }
                _ => {
                    if let Some(f) = self.hue {
                        adjust_hue(img, hw, f);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    /// A 2-pixel image: (0.2, 0.4, 0.6) and (1, 0, 0), in CHW.
    fn two_pixels() -> Vec<f32> {
        vec![0.2, 1.0, 0.4, 0.0, 0.6, 0.0]
    }

    #[test]
    fn grayscale_weights_and_equal_channels() {
        let mut img = two_pixels();
        grayscale(&mut img, 2);
        // 0.299*0.2 + 0.587*0.4 + 0.114*0.6 = 0.363; red alone: 0.299.
        assert!(
            close(&img, &[0.363, 0.299, 0.363, 0.299, 0.363, 0.299], 1e-6),
            "{img:?}"
        );
    }

    #[test]
    fn brightness_scales_and_clamps() {
        let mut img = two_pixels();
        adjust_brightness(&mut img, 1.4);
        assert!(
            close(&img, &[0.28, 1.0, 0.56, 0.0, 0.84, 0.0], 1e-6),
            "{img:?}"
        );
    }

    #[test]
    fn contrast_blends_with_the_mean_gray() {
        let mut img = two_pixels();
        // mean gray = (0.363 + 0.299) / 2 = 0.331; x ← 0.5 x + 0.5 · 0.331.
        adjust_contrast(&mut img, 2, 0.5);
        let want = [0.2655, 0.6655, 0.3655, 0.1655, 0.4655, 0.1655];
        assert!(close(&img, &want, 1e-6), "{img:?}");
        // Factor 2 pushes away from the mean and clamps: 2·0.2 - 0.331 = 0.069,
        // 2·1 - 0.331 → 1, 2·0.4 - 0.331 = 0.469, 2·0 - 0.331 → 0.
        let mut img = two_pixels();
        adjust_contrast(&mut img, 2, 2.0);
        let want = [0.069, 1.0, 0.469, 0.0, 0.869, 0.0];
        assert!(close(&img, &want, 1e-6), "{img:?}");
    }

    #[test]
    fn saturation_blends_with_the_pixel_gray() {
        let mut img = two_pixels();
        adjust_saturation(&mut img, 2, 0.5);
        // pixel 0: 0.5 x + 0.5 · 0.363; pixel 1: 0.5 x + 0.5 · 0.299.
        let want = [0.2815, 0.6495, 0.3815, 0.1495, 0.4815, 0.1495];
        assert!(close(&img, &want, 1e-6), "{img:?}");
        // Factor 0 is grayscale.
        let mut a = two_pixels();
        let mut b = two_pixels();
        adjust_saturation(&mut a, 2, 0.0);
        grayscale(&mut b, 2);
        assert!(close(&a, &b, 1e-7));
    }

    #[test]
    fn hue_zero_is_identity_and_half_turns_red_into_cyan() {
        let mut rng = Rng::new(5);
        let img: Vec<f32> = (0..3 * 64).map(|_| rng.f32()).collect();
        let mut same = img.clone();
        adjust_hue(&mut same, 64, 0.0);
        assert_eq!(same, img);
        // Even through the HSV round trip (a tiny shift each way) it stays within 1e-6.
        let mut rt = img.clone();
        adjust_hue(&mut rt, 64, 1e-9);
        assert!(close(&rt, &img, 1e-6));
        let mut red = vec![1.0, 0.0, 0.0];
        adjust_hue(&mut red, 1, 0.5);
        assert!(close(&red, &[0.0, 1.0, 1.0], 1e-6), "{red:?}");
        // A third of a turn: red -> green; minus a third: red -> blue.
        let mut red = vec![1.0, 0.0, 0.0];
        adjust_hue(&mut red, 1, 1.0 / 3.0);
        assert!(close(&red, &[0.0, 1.0, 0.0], 1e-5), "{red:?}");
        let mut red = vec![1.0, 0.0, 0.0];
        adjust_hue(&mut red, 1, -1.0 / 3.0);
        assert!(close(&red, &[0.0, 0.0, 1.0], 1e-5), "{red:?}");
    }

    #[test]
    fn hsv_round_trip() {
        let mut rng = Rng::new(6);
        for _ in 0..10_000 {
            let (r, g, b) = (rng.f32(), rng.f32(), rng.f32());
            let (h, s, v) = rgb_to_hsv(r, g, b);
            assert!((0.0..1.0).contains(&h) && (0.0..=1.0).contains(&s));
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!(
                (r - r2).abs() < 1e-5 && (g - g2).abs() < 1e-5 && (b - b2).abs() < 1e-5,
                "{r} {g} {b} -> {r2} {g2} {b2}"
            );
        }
        // Known values: pure colours and grey.
        assert_eq!(rgb_to_hsv(1.0, 0.0, 0.0), (0.0, 1.0, 1.0));
        let (h, s, v) = rgb_to_hsv(0.0, 0.5, 0.0);
        assert!((h - 1.0 / 3.0).abs() < 1e-6 && s == 1.0 && v == 0.5);
        assert_eq!(rgb_to_hsv(0.3, 0.3, 0.3), (0.0, 0.0, 0.3));
    }

    // torchvision 0.29 (torch 2.15, float32) on a 2x2 image, `img` in CHW:
    //
    //   import torch, torchvision.transforms.v2.functional as TF
    //   img = torch.tensor([[[.1, .9], [.5, .3]], [[.7, .2], [.5, .8]], [[.4, .6], [.5, .05]]])
    //   TF.adjust_hue(img, .3); TF.adjust_hue(img, -.45); TF.adjust_saturation(img, 1.7)
    //   TF.adjust_contrast(img, .6); TF.adjust_brightness(img, 1.3)
    //
    // torchvision's grayscale weighs red 0.2989 where we use 0.299, hence the looser
    // tolerance for contrast and saturation (|Δgray| ≤ 1e-4 · R).
    #[test]
    fn matches_torchvision_on_a_2x2_image() {
        let img = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.5, 0.8, 0.4, 0.6, 0.5, 0.05];
        type Op = fn(&mut [f32]);
        #[rustfmt::skip]
        let cases: [(Op, [f32; 12], f32); 5] = [
            (|x| adjust_hue(x, 4, 0.3),
             [0.28, 0.74, 0.5, 0.05, 0.1, 0.9, 0.5, 0.45, 0.7, 0.2, 0.5, 0.8], 2e-6),
            (|x| adjust_hue(x, 4, -0.45),
             [0.7, 0.2, 0.5, 0.775, 0.1, 0.9, 0.5, 0.05, 0.22, 0.71, 0.5, 0.8], 2e-6),
            (|x| adjust_saturation(x, 4, 1.7),
             [0.0, 1.0, 0.500035, 0.114521, 0.8495271, 0.021633, 0.500035, 0.964521,
              0.339527, 0.7016331, 0.500035, 0.0], 1e-4),
            (|x| adjust_contrast(x, 4, 0.6),
             [0.260612, 0.740612, 0.500612, 0.380612, 0.620612, 0.320612, 0.500612,
              0.680612, 0.440612, 0.560612, 0.500612, 0.230612], 1e-4),
            (|x| adjust_brightness(x, 1.3),
             [0.13, 1.0, 0.65, 0.39, 0.91, 0.26, 0.65, 1.0, 0.52, 0.78, 0.65, 0.065], 1e-6),
        ];
        for (i, (op, want, tol)) in cases.iter().enumerate() {
            let mut x = img;
            op(&mut x);
            assert!(close(&x, want, *tol), "case {i}: {x:?}");
        }
    }

    #[test]
    fn fast_paths_match_the_general_formulas() {
        let mut rng = Rng::new(9);
        for _ in 0..10_000 {
            let (h, s, v) = (rng.f32(), rng.f32(), rng.f32());
            assert_eq!(hsv_to_rgb(h, s, v), hsv_to_rgb_unit(h, s, v));
            // Hue wraps: h and h ± 1 give the same colour.
            let a = hsv_to_rgb(h + 1.0, s, v);
            let b = hsv_to_rgb(h - 1.0, s, v);
            let c = hsv_to_rgb_unit(h, s, v);
            for (x, y) in [
                (a.0, c.0),
                (a.1, c.1),
                (a.2, c.2),
                (b.0, c.0),
                (b.1, c.1),
                (b.2, c.2),
            ] {
                assert!((x - y).abs() < 1e-5);
            }
        }
        assert_eq!(hsv_to_rgb_unit(1.0, 1.0, 1.0), (1.0, 0.0, 0.0));
    }

    #[test]
    fn solarize_threshold() {
        let mut img = vec![0.0, 0.5, 128.0 / 255.0, 0.9, 1.0];
        solarize(&mut img);
        assert!(
            close(&img, &[0.0, 0.5, 127.0 / 255.0, 0.1, 0.0], 1e-6),
            "{img:?}"
        );
    }

    #[test]
    fn jitter_draws_stay_in_range_and_cover_all_orders() {
        let cj = ColorJitter::new(0.4, 0.4, 0.4, 0.2, 0.8);
        assert!(cj.validate().is_ok());
        let mut rng = Rng::new(7);
        let mut orders = std::collections::BTreeSet::new();
        let (mut bmin, mut bmax, mut hmin, mut hmax) = (f32::MAX, 0.0f32, f32::MAX, f32::MIN);
        for _ in 0..5000 {
            let p = cj.sample(&mut rng);
            let mut o = p.order;
            orders.insert(o);
            o.sort_unstable();
            assert_eq!(o, [0, 1, 2, 3]);
            for f in [p.brightness, p.contrast, p.saturation] {
                let f = f.expect("enabled");
                assert!((0.6..1.4).contains(&f));
            }
            let b = p.brightness.expect("enabled");
            let h = p.hue.expect("enabled");
            assert!((-0.2..0.2).contains(&h));
            bmin = bmin.min(b);
            bmax = bmax.max(b);
            hmin = hmin.min(h);
            hmax = hmax.max(h);
        }
        assert_eq!(orders.len(), 24);
        assert!(bmin < 0.61 && bmax > 1.39 && hmin < -0.19 && hmax > 0.19);
        // Magnitudes above 1 clip the lower end at 0; zero magnitudes disable the op.
        let strong = ColorJitter::new(1.5, 0.0, 0.0, 0.0, 1.0);
        let p = strong.sample(&mut rng);
        assert!(p.brightness.is_some_and(|b| (0.0..2.5).contains(&b)));
        assert_eq!((p.contrast, p.saturation, p.hue), (None, None, None));
        assert!(
            ColorJitter::new(0.4, 0.4, 0.4, 0.6, 1.0)
                .validate()
                .is_err()
        );
        assert!(
            ColorJitter::new(-0.1, 0.4, 0.4, 0.1, 1.0)
                .validate()
                .is_err()
        );
        assert!(ColorJitter::default().is_identity());
    }

    #[test]
    fn jitter_applies_ops_in_the_drawn_order() {
        // brightness 2 then contrast 0 (→ mean) differs from contrast 0 then brightness 2.
        let mut a = two_pixels();
        let mut b = two_pixels();
        let p = |order| JitterParams {
            order,
            brightness: Some(2.0),
            contrast: Some(0.0),
            saturation: None,
            hue: None,
        };
        p([0, 1, 2, 3]).apply(&mut a, 2);
        p([1, 0, 2, 3]).apply(&mut b, 2);
        // a: brightness → (0.4, 1, 0.8, 0, 1, 0) in CHW (1.2 and 2 clamp to 1), mean gray
        // = (0.299·0.4 + 0.587·0.8 + 0.114 + 0.299) / 2 = 0.5011.
        assert!(a.iter().all(|v| (v - 0.5011).abs() < 1e-6), "{a:?}");
        // b: mean of the original = 0.331, doubled.
        assert!(b.iter().all(|v| (v - 0.662).abs() < 1e-6), "{b:?}");
    }
}
