//! Separable image resampling (bilinear, bicubic) with torch's `F.interpolate` semantics
//! (`align_corners=False`), with and without antialiasing.
//!
//! # Math
//!
//! A resize from `n_in` to `n_out` samples along one axis is a sparse matrix `W`
//! (`n_out × n_in`); a 2-D resize of a `(C, H, W)` image applies the width matrix to every row
//! first, then the height matrix to every column (torch's order), in f32.
//! [`ResizeTable`] stores `W` as, per output sample, a first input index and a fixed number of
//! taps (zero-padded, so the inner loop has constant length).
//!
//! With `s = n_in / n_out`:
//!
//! - **antialias = true** (torchvision's default for tensors, and Pillow's algorithm, which is
//!   what the reference pipelines run on their PIL images): the filter `f` is stretched by
//!   `max(s, 1)`. For output `i`: `c = s (i + 1/2)`, support `σ = r · max(s, 1)` (`r = 1`
//!   bilinear, `2` bicubic), window `j ∈ [trunc(c - σ + 1/2) ∨ 0, trunc(c + σ + 1/2) ∧ n_in)`,
//!   weights `f((j - c + 1/2) / max(s, 1))` normalised to sum 1. Bilinear `f(x) = max(0, 1 - |x|)`;
//!   bicubic is Keys' cubic with **a = -0.5** (Pillow's constant, which torch uses whenever
//!   antialias is on). Upsampling (`s < 1`) therefore is plain interpolation with the window
//!   truncated at the borders and renormalised; downsampling averages over the stretched
//!   filter (no aliasing).
//! - **antialias = false** (torch's classic kernels): source coordinate `x = s (i + 1/2) - 1/2`.
//!   Bilinear clamps `x` at 0, takes `⌊x⌋` and its right neighbour (clamped) with weights
//!   `1 - λ, λ`. Bicubic uses taps `⌊x⌋ - 1 .. ⌊x⌋ + 2` (indices clamped into the image, i.e.
//!   replicated borders) with Keys' cubic at **a = -0.75**.
//!
//! For bilinear upsampling both modes give the same weights, so the distinction only matters
//! for bicubic and for downsampling. Neither mode clamps the result: bicubic can overshoot
//! [0, 1]; the view pipeline clamps after a bicubic resize (as Pillow's u8 output does).
//!
//! ```
//! use pipe_stages::nn::augment::{resize, Interpolation};
//! // A 1x2 image (one channel) upsampled to 1x4: [0, 1] -> [0, 0.25, 0.75, 1].
//! let out = resize(&[0.0, 1.0], 1, 1, 2, 1, 4, Interpolation::Bilinear, true);
//! assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
//! ```

use serde::{Deserialize, Serialize};

/// The resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Triangle filter (torchvision `InterpolationMode.BILINEAR`, the default).
    #[default]
    Bilinear,
    /// Keys' cubic (torchvision `InterpolationMode.BICUBIC`, `interpolation=3` in ACL/AIR/RCS).
    Bicubic,
}

/// Keys' cubic convolution kernel with parameter `a`.
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// Precomputed 1-D resampling weights from `in_size` to `out_size` samples.
#[derive(Debug, Clone, PartialEq)]
pub struct ResizeTable {
    in_size: usize,
    out_size: usize,
    taps: usize,
    start: Vec<usize>,
    weights: Vec<f32>,
}

impl ResizeTable {
    /// The weights of a resize from `in_size` to `out_size` (see the module docs).
    ///
    /// # Panics
    /// If a size is zero.
    pub fn new(in_size: usize, out_size: usize, interp: Interpolation, antialias: bool) -> Self {
        assert!(in_size > 0 && out_size > 0, "resize sizes must be positive");
        // Dense (first index, weights) per output, before padding to a common tap count.
        let rows: Vec<(usize, Vec<f64>)> = (0..out_size)
            .map(|i| {
                if in_size == out_size {
                    // torch skips an axis whose size does not change.
                    (i, vec![1.0])
                } else if antialias {
                    aa_weights(i, in_size, out_size, interp)
                } else {
                    classic_weights(i, in_size, out_size, interp)
                }
            })
            .map(|(start, w)| trim_zeros(start, w))
            .collect();
        let taps = rows.iter().map(|(_, w)| w.len()).max().unwrap_or(1).max(1);
        let taps = taps.min(in_size);
        let mut start = Vec::with_capacity(out_size);
        let mut weights = vec![0.0f32; out_size * taps];
        for (i, (s, w)) in rows.into_iter().enumerate() {
            // Shift the window left where it would run past the end; pad with zeros.
            let s2 = s.min(in_size - taps);
            let offset = s - s2;
            for (k, wk) in w.iter().enumerate() {
                weights[i * taps + offset + k] = *wk as f32;
            }
            start.push(s2);
        }
        Self {
            in_size,
            out_size,
            taps,
            start,
            weights,
        }
    }

    /// Input samples.
    pub fn in_size(&self) -> usize {
        self.in_size
    }

    /// Output samples.
    pub fn out_size(&self) -> usize {
        self.out_size
    }

    /// Taps per output sample.
    pub fn taps(&self) -> usize {
        self.taps
    }

    /// The window of output `i`: first input index and `taps()` weights.
    #[inline]
    pub fn window(&self, i: usize) -> (usize, &[f32]) {
        (
            self.start[i],
            &self.weights[i * self.taps..(i + 1) * self.taps],
        )
    }

    /// The dense `out × in` matrix (tests and debugging).
    pub fn to_dense(&self) -> Vec<Vec<f32>> {
        (0..self.out_size)
            .map(|i| {
                let mut row = vec![0.0; self.in_size];
                let (s, w) = self.window(i);
                for (k, wk) in w.iter().enumerate() {
                    row[s + k] += wk;
                }
                row
            })
            .collect()
    }
}

/// Drops leading and trailing exact zeros (they contribute nothing).
fn trim_zeros(start: usize, w: Vec<f64>) -> (usize, Vec<f64>) {
    let first = w.iter().position(|&x| x != 0.0);
    let last = w.iter().rposition(|&x| x != 0.0);
    match (first, last) {
        (Some(a), Some(b)) => (start + a, w[a..=b].to_vec()),
        // All-zero (cannot happen for valid sizes): keep one zero tap.
        _ => (start, vec![0.0]),
    }
}

/// Antialiased (Pillow / torch `antialias=True`) weights of output `i`.
fn aa_weights(i: usize, n_in: usize, n_out: usize, interp: Interpolation) -> (usize, Vec<f64>) {
    let scale = n_in as f64 / n_out as f64;
    let (radius, filter): (f64, fn(f64) -> f64) = match interp {
        Interpolation::Bilinear => (1.0, |x| (1.0 - x.abs()).max(0.0)),
        Interpolation::Bicubic => (2.0, |x| cubic(x, -0.5)),
    };
    let (support, invscale) = if scale >= 1.0 {
        (radius * scale, 1.0 / scale)
    } else {
        (radius, 1.0)
    };
    let center = scale * (i as f64 + 0.5);
    // `as i64` truncates toward zero, like the C casts of the reference.
    let xmin = ((center - support + 0.5) as i64).max(0) as usize;
    let xmax = ((center + support + 0.5) as i64).clamp(0, n_in as i64) as usize;
    let mut w: Vec<f64> = (xmin..xmax.max(xmin))
        .map(|j| filter((j as f64 - center + 0.5) * invscale))
        .collect();
    let total: f64 = w.iter().sum();
    if total != 0.0 {
        w.iter_mut().for_each(|x| *x /= total);
    }
    (xmin, w)
}

/// Classic (torch `antialias=False`) weights of output `i`.
fn classic_weights(
    i: usize,
    n_in: usize,
    n_out: usize,
    interp: Interpolation,
) -> (usize, Vec<f64>) {
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as i64 - 1;
    let real = scale * (i as f64 + 0.5) - 0.5;
    match interp {
        Interpolation::Bilinear => {
            let real = real.max(0.0);
            let i0 = (real.floor() as i64).min(last);
            let lambda = (real - i0 as f64).clamp(0.0, 1.0);
            if i0 < last {
                (i0 as usize, vec![1.0 - lambda, lambda])
            } else {
                (i0 as usize, vec![1.0])
            }
        }
        Interpolation::Bicubic => {
            let i0 = (real.floor() as i64).min(last);
            let t = (real - i0 as f64).clamp(0.0, 1.0);
            let a = -0.75;
            let coeffs = [
                cubic(t + 1.0, a),
                cubic(t, a),
                cubic(1.0 - t, a),
                cubic(2.0 - t, a),
            ];
            // Indices i0-1 .. i0+2 clamped into the image (replicated borders).
            let idx: Vec<usize> = (0..4)
                .map(|k| (i0 - 1 + k).clamp(0, last) as usize)
                .collect();
            let lo = idx[0];
            let hi = idx[3];
            let mut w = vec![0.0; hi - lo + 1];
            for (k, c) in coeffs.iter().enumerate() {
                w[idx[k] - lo] += c;
            }
            (lo, w)
        }
    }
}

/// Resamples each of `n_rows` rows of `src` (row length `table.in_size()`) into `dst` (row
/// length `table.out_size()`), mirroring the output left-right when `flip`.
pub(crate) fn resample_rows(
    src: &[f32],
    n_rows: usize,
    table: &ResizeTable,
    flip: bool,
    dst: &mut [f32],
) {
    let (n_in, n_out, taps) = (table.in_size, table.out_size, table.taps);
    debug_assert!(src.len() >= n_rows * n_in && dst.len() >= n_rows * n_out);
    let rows = src
        .chunks_exact(n_in)
        .zip(dst.chunks_exact_mut(n_out))
        .take(n_rows);
    // Specialised by tap count (bilinear upsampling has at most 2) so the inner loop unrolls.
    match taps {
        1 => {
            for (src_row, dst_row) in rows {
                for x in 0..n_out {
                    let ox = if flip { n_out - 1 - x } else { x };
                    dst_row[ox] = src_row[table.start[x]] * table.weights[x];
                }
            }
        }
        2 => {
            for (src_row, dst_row) in rows {
                for x in 0..n_out {
                    let s = &src_row[table.start[x]..table.start[x] + 2];
                    let w = &table.weights[2 * x..2 * x + 2];
                    let ox = if flip { n_out - 1 - x } else { x };
                    dst_row[ox] = s[0] * w[0] + s[1] * w[1];
                }
            }
        }
        _ => {
            for (src_row, dst_row) in rows {
                for x in 0..n_out {
                    let start = table.start[x];
                    let w = &table.weights[x * taps..(x + 1) * taps];
                    let s = &src_row[start..start + taps];
                    let mut acc = s[0] * w[0];
                    for k in 1..taps {
                        acc += s[k] * w[k];
                    }
                    let ox = if flip { n_out - 1 - x } else { x };
                    dst_row[ox] = acc;
                }
            }
        }
    }
}

/// Resamples the columns of one plane `src` (`table.in_size()` rows of `width`) into `dst`
/// (`table.out_size()` rows of `width`).
pub(crate) fn resample_cols(src: &[f32], width: usize, table: &ResizeTable, dst: &mut [f32]) {
    let taps = table.taps;
    debug_assert!(src.len() >= table.in_size * width && dst.len() >= table.out_size * width);
    for (y, dst_row) in dst.chunks_exact_mut(width).take(table.out_size).enumerate() {
        let start = table.start[y];
        let w = &table.weights[y * taps..(y + 1) * taps];
        let first = &src[start * width..(start + 1) * width];
        for (d, s) in dst_row.iter_mut().zip(first) {
            *d = s * w[0];
        }
        for (k, wk) in w.iter().enumerate().skip(1) {
            let row = &src[(start + k) * width..(start + k + 1) * width];
            for (d, s) in dst_row.iter_mut().zip(row) {
                *d += s * wk;
            }
        }
    }
}

/// Resizes a `(channels, in_h, in_w)` f32 image to `(channels, out_h, out_w)` (width pass,
/// then height pass, like torch). No clamping.
///
/// # Panics
/// If a size is zero or `src.len() != channels * in_h * in_w`.
#[allow(clippy::too_many_arguments)]
pub fn resize(
    src: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    interp: Interpolation,
    antialias: bool,
) -> Vec<f32> {
    assert_eq!(src.len(), channels * in_h * in_w, "resize: buffer size");
    let tw = ResizeTable::new(in_w, out_w, interp, antialias);
    let th = ResizeTable::new(in_h, out_h, interp, antialias);
    let mut tmp = vec![0.0; channels * in_h * out_w];
    resample_rows(src, channels * in_h, &tw, false, &mut tmp);
    let mut out = vec![0.0; channels * out_h * out_w];
    for (src_plane, dst_plane) in tmp
        .chunks_exact(in_h * out_w)
        .zip(out.chunks_exact_mut(out_h * out_w))
    {
        resample_cols(src_plane, out_w, &th, dst_plane);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn weights_sum_to_one_and_fit() {
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            for aa in [true, false] {
                for n_in in 1..=40 {
                    for n_out in [1, 7, 16, 32, 33] {
                        let t = ResizeTable::new(n_in, n_out, interp, aa);
                        for i in 0..n_out {
                            let (s, w) = t.window(i);
                            assert!(s + w.len() <= n_in);
                            let sum: f32 = w.iter().sum();
                            assert!((sum - 1.0).abs() < 1e-5, "{n_in}->{n_out} {sum}");
                        }
                    }
                }
            }
        }
        // Bilinear upsampling needs at most 2 taps.
        assert!(ResizeTable::new(9, 32, Interpolation::Bilinear, true).taps() <= 2);
    }

    #[test]
    fn same_size_is_identity() {
        let t = ResizeTable::new(5, 5, Interpolation::Bicubic, true);
        assert_eq!(t.taps(), 1);
        let src: Vec<f32> = (0..3 * 5 * 5).map(|i| i as f32 * 0.01).collect();
        assert_eq!(
            resize(&src, 3, 5, 5, 5, 5, Interpolation::Bicubic, true),
            src
        );
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![0.3f32; 3 * 9 * 11];
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            for aa in [true, false] {
                for (oh, ow) in [(32, 32), (4, 5), (9, 11), (20, 3)] {
                    let out = resize(&src, 3, 9, 11, oh, ow, interp, aa);
                    assert_eq!(out.len(), 3 * oh * ow);
                    assert!(
                        out.iter().all(|v| (v - 0.3).abs() < 1e-6),
                        "{interp:?} {aa}"
                    );
                }
            }
        }
    }

    // Reference values, checked against torch 2.15 / torchvision 0.29 (CPU, float32): the
    // expected arrays below are what `F.interpolate` prints to 8 decimals (antialias=True
    // bicubic is also `torchvision.transforms.v2.functional.resize`'s default on tensors).
    // The classic bilinear result is torch's
    // `F.interpolate(x, size=(4, 4), mode='bilinear', align_corners=False)` for
    // x = [[0, 1], [1, 0]]; by hand: the 1-D weights of 2 -> 4 are [1, 0], [.75, .25],
    // [.25, .75], [0, 1], and out = Wy x Wxᵀ. The same numbers come from this numpy port of
    // the torch formulas (recomputed independently of the Rust code):
    //
    //   import numpy as np
    //   def lin(n_in, n_out):                       # antialias=False, align_corners=False
    //       W = np.zeros((n_out, n_in)); s = n_in / n_out
    //       for i in range(n_out):
    //           x = max(s * (i + .5) - .5, 0); i0 = min(int(np.floor(x)), n_in - 1)
    //           l = min(max(x - i0, 0), 1); i1 = i0 + (i0 < n_in - 1)
    //           W[i, i0] += 1 - l; W[i, i1] += l
    //       return W
    //   def keys(x, a):
    //       x = abs(x)
    //       return ((a+2)*x - (a+3))*x*x + 1 if x < 1 else \
    //              ((a*x - 5*a)*x + 8*a)*x - 4*a if x < 2 else 0.
    //   def cub(n_in, n_out):                       # antialias=False: a=-0.75, clamped taps
    //       W = np.zeros((n_out, n_in)); s = n_in / n_out
    //       for i in range(n_out):
    //           x = s * (i + .5) - .5; i0 = min(int(np.floor(x)), n_in - 1)
    //           t = min(max(x - i0, 0), 1)
    //           for k, c in enumerate([keys(t+1,-.75), keys(t,-.75), keys(1-t,-.75), keys(2-t,-.75)]):
    //               W[i, min(max(i0 - 1 + k, 0), n_in - 1)] += c
    //       return W
    //   def aa(n_in, n_out, r, f):                  # antialias=True (Pillow)
    //       W = np.zeros((n_out, n_in)); s = n_in / n_out
    //       sup = r * s if s >= 1 else r; inv = 1 / s if s >= 1 else 1
    //       for i in range(n_out):
    //           c = s * (i + .5); lo = max(int(c - sup + .5), 0); hi = min(int(c + sup + .5), n_in)
    //           w = np.array([f((j - c + .5) * inv) for j in range(lo, hi)]); W[i, lo:hi] = w / w.sum()
    //       return W
    //   x = np.array([[0., 1.], [1., 0.]])
    //   print(lin(2, 4) @ x @ lin(2, 4).T)
    //   print(cub(2, 4) @ x @ cub(2, 4).T)
    //   A = aa(2, 4, 2, lambda t: keys(t, -.5)); print(A @ x @ A.T)
    //   B = aa(6, 4, 1, lambda t: max(0, 1 - abs(t))); print(B @ np.arange(6.))
    const CHECKER: [f32; 4] = [0.0, 1.0, 1.0, 0.0];

    #[test]
    fn bilinear_checker_matches_torch() {
        let out = resize(&CHECKER, 1, 2, 2, 4, 4, Interpolation::Bilinear, false);
        #[rustfmt::skip]
        let want = [
            0.0, 0.25, 0.75, 1.0,
            0.25, 0.375, 0.625, 0.75,
            0.75, 0.625, 0.375, 0.25,
            1.0, 0.75, 0.25, 0.0,
        ];
        assert!(close(&out, &want, 1e-6), "{out:?}");
        // Antialiasing does not change bilinear upsampling.
        let aa = resize(&CHECKER, 1, 2, 2, 4, 4, Interpolation::Bilinear, true);
        assert!(close(&aa, &want, 1e-6), "{aa:?}");
    }

    #[test]
    #[allow(clippy::excessive_precision)] // the digits torch prints
    fn bicubic_checker_matches_torch() {
        let classic = resize(&CHECKER, 1, 2, 2, 4, 4, Interpolation::Bicubic, false);
        #[rustfmt::skip]
        let want_classic = [
            -0.23318481, 0.16888428, 0.83111572, 1.23318481,
            0.16888428, 0.35046387, 0.64953613, 0.83111572,
            0.83111572, 0.64953613, 0.35046387, 0.16888428,
            1.23318481, 0.83111572, 0.16888428, -0.23318481,
        ];
        assert!(close(&classic, &want_classic, 1e-6), "{classic:?}");
        let aa = resize(&CHECKER, 1, 2, 2, 4, 4, Interpolation::Bicubic, true);
        #[rustfmt::skip]
        let want_aa = [
            -0.19204152, 0.15546218, 0.84453782, 1.19204152,
            0.15546218, 0.32846939, 0.67153061, 0.84453782,
            0.84453782, 0.67153061, 0.32846939, 0.15546218,
            1.19204152, 0.84453782, 0.15546218, -0.19204152,
        ];
        assert!(close(&aa, &want_aa, 1e-6), "{aa:?}");
    }

    #[test]
    fn antialiased_downscale_matches_torch() {
        let src: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let out = resize(&src, 1, 1, 6, 1, 4, Interpolation::Bilinear, true);
        let want = [0.375, 1.777_777_8, 3.222_222, 4.625];
        assert!(close(&out, &want, 1e-5), "{out:?}");
        // Without antialiasing, 6 -> 4 interpolates between neighbours only.
        let classic = resize(&src, 1, 1, 6, 1, 4, Interpolation::Bilinear, false);
        assert!(
            close(&classic, &[0.25, 1.75, 3.25, 4.75], 1e-6),
            "{classic:?}"
        );
    }

    #[test]
    fn flip_reverses_rows() {
        let t = ResizeTable::new(3, 5, Interpolation::Bilinear, true);
        let src = [0.0, 0.5, 1.0];
        let mut a = [0.0; 5];
        let mut b = [0.0; 5];
        resample_rows(&src, 1, &t, false, &mut a);
        resample_rows(&src, 1, &t, true, &mut b);
        let mut rev = a;
        rev.reverse();
        assert_eq!(b, rev);
    }
}
