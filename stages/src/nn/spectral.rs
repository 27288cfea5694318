//! AdvCL's high-frequency view (METHODS.md 8.2): per image and channel,
//! `x_HF = Re IFFT2(ifftshift(fftshift(FFT2(x)) ⊙ (1 − M)))` with the disk mask
//! `M_uv = 1[√((u − H/2)² + (v − H/2)²) < r]` over the shifted indices (R-ADV `fr_util.py`,
//! which centres both axes on `rows / 2`). Not clamped: the result can be negative (\[Q48\]).
//!
//! # How it is computed
//!
//! The filter is linear and shift-invariant, so it is a circular convolution: with `D` the set
//! of frequencies `k = (u − ⌊H/2⌋, v − ⌊W/2⌋)` inside the disk,
//!
//! `x_HF[n] = x[n] − Σ_m x[m] h[n − m]`, `h[d] = (1 / HW) Σ_{k ∈ D} cos(2π (k₁ d₁ / H + k₂ d₂ / W))`
//!
//! (the real part of the masked inverse transform: `Re(X_k e^{2πi k·n}) = Σ_m x_m cos(2π k·(n −
//! m))`). [`HighPass`] builds the `(HW, HW)` matrix `I − C` of that convolution once, in f64,
//! and applies it to a batch as one matmul `(B·C, HW) × (HW, HW)` on the batch's device: 1 M
//! multiply-adds per channel at 32 × 32, a small fraction of a ResNet-18 forward, on CPU and CUDA
//! alike, with no FFT kernel needed. The test checks it against the FFT recipe written out with a
//! plain complex DFT.

use candle::{DType, Device, Result, Tensor, bail};

/// AdvCL's radius of the removed low-frequency disk (`--radius 8`).
pub const ADVCL_RADIUS: f64 = 8.0;

/// The high-pass filter of one image size (see the module docs).
#[derive(Debug, Clone)]
pub struct HighPass {
    h: usize,
    w: usize,
    /// `(I − C)ᵀ`, `(HW, HW)`, f32, on the device.
    matrix_t: Tensor,
}

impl HighPass {
    /// The filter for `h × w` images with disk radius `radius` (pixels of the shifted
    /// spectrum), on `device`.
    ///
    /// # Errors
    /// A zero size, an image larger than 64 × 64 (the dense matrix would be large), a negative
    /// or non-finite radius, or a tensor error.
    pub fn new(h: usize, w: usize, radius: f64, device: &Device) -> Result<Self> {
        if h == 0 || w == 0 || h * w > 64 * 64 {
            bail!("high-pass filter: {h}x{w} images are not supported (1x1 up to 64x64)");
        }
        if !(radius.is_finite() && radius >= 0.0) {
            bail!("high-pass filter: the radius must be finite and >= 0, got {radius}");
        }
        let kernel = low_pass_kernel(h, w, radius);
        let n = h * w;
        // matrix_t[m][n] = (I - C)[n][m] = δ(n, m) − h[(n − m) mod]
        let mut data = vec![0f32; n * n];
        for m in 0..n {
            let (m1, m2) = (m / w, m % w);
            for nn in 0..n {
                let (n1, n2) = (nn / w, nn % w);
                let d = ((n1 + h - m1) % h) * w + (n2 + w - m2) % w;
                let delta = if m == nn { 1.0 } else { 0.0 };
                data[m * n + nn] = (delta - kernel[d]) as f32;
            }
        }
        Ok(Self {
            h,
            w,
            matrix_t: Tensor::from_vec(data, (n, n), device)?,
        })
    }

    /// AdvCL's filter for 32 × 32 images (radius 8).
    ///
    /// # Errors
    /// As [`HighPass::new`].
    pub fn advcl(device: &Device) -> Result<Self> {
        Self::new(32, 32, ADVCL_RADIUS, device)
    }

    /// The high-frequency component of a `(B, C, H, W)` batch (float; same dtype and device).
    ///
    /// # Errors
    /// A batch of another image size, or a tensor error.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if (h, w) != (self.h, self.w) {
            bail!(
                "high-pass filter built for {}x{} images, got {h}x{w}",
                self.h,
                self.w
            );
        }
        let dtype = x.dtype();
        let flat = x.to_dtype(DType::F32)?.reshape((b * c, h * w))?;
        flat.matmul(&self.matrix_t)?
            .reshape((b, c, h, w))?
            .to_dtype(dtype)
    }
}

/// The low-pass convolution kernel `h[d₁ W + d₂]` (see the module docs), f64.
fn low_pass_kernel(h: usize, w: usize, radius: f64) -> Vec<f64> {
    let centre = h as f64 / 2.0;
    let mut freqs = Vec::new();
    for u in 0..h {
        for v in 0..w {
            let dist = ((u as f64 - centre).powi(2) + (v as f64 - centre).powi(2)).sqrt();
            if dist < radius {
                freqs.push((u as i64 - (h / 2) as i64, v as i64 - (w / 2) as i64));
            }
        }
    }
    let scale = 1.0 / (h * w) as f64;
    let tau = std::f64::consts::TAU;
    let mut kernel = vec![0f64; h * w];
    for d1 in 0..h {
        for d2 in 0..w {
            kernel[d1 * w + d2] = scale
                * freqs
                    .iter()
                    .map(|&(k1, k2)| {
                        (tau * ((k1 * d1 as i64) as f64 / h as f64
                            + (k2 * d2 as i64) as f64 / w as f64))
                            .cos()
                    })
                    .sum::<f64>();
        }
    }
    kernel
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The R-ADV recipe written out: 2-D DFT, fftshift, mask, ifftshift, inverse DFT, real part.
    fn reference(img: &[f64], h: usize, w: usize, r: f64) -> Vec<f64> {
        let tau = std::f64::consts::TAU;
        // forward DFT: F[k1][k2] = Σ x[n1][n2] e^{-2πi (k1 n1 / h + k2 n2 / w)}
        let mut re = vec![0f64; h * w];
        let mut im = vec![0f64; h * w];
        for k1 in 0..h {
            for k2 in 0..w {
                for n1 in 0..h {
                    for n2 in 0..w {
                        let a = -tau * ((k1 * n1) as f64 / h as f64 + (k2 * n2) as f64 / w as f64);
                        re[k1 * w + k2] += img[n1 * w + n2] * a.cos();
                        im[k1 * w + k2] += img[n1 * w + n2] * a.sin();
                    }
                }
            }
        }
        // fftshift: shifted[u][v] = F[(u + ceil?)...]; numpy: shifted[u] = F[(u - h/2) mod h]
        let shift = |u: usize, n: usize| (u + n - n / 2) % n;
        let mut sre = vec![0f64; h * w];
        let mut sim = vec![0f64; h * w];
        for u in 0..h {
            for v in 0..w {
                let src = shift(u, h) * w + shift(v, w);
                let d = ((u as f64 - h as f64 / 2.0).powi(2) + (v as f64 - h as f64 / 2.0).powi(2))
                    .sqrt();
                let keep = if d < r { 0.0 } else { 1.0 };
                sre[u * w + v] = re[src] * keep;
                sim[u * w + v] = im[src] * keep;
            }
        }
        // ifftshift undoes the shift: F'[k] = shifted[(k + n/2) mod n]
        let unshift = |k: usize, n: usize| (k + n / 2) % n;
        let mut fre = vec![0f64; h * w];
        let mut fim = vec![0f64; h * w];
        for k1 in 0..h {
            for k2 in 0..w {
                let src = unshift(k1, h) * w + unshift(k2, w);
                fre[k1 * w + k2] = sre[src];
                fim[k1 * w + k2] = sim[src];
            }
        }
        // inverse DFT, real part
        let mut out = vec![0f64; h * w];
        for n1 in 0..h {
            for n2 in 0..w {
                let mut acc = 0.0;
                for k1 in 0..h {
                    for k2 in 0..w {
                        let a = tau * ((k1 * n1) as f64 / h as f64 + (k2 * n2) as f64 / w as f64);
                        acc += fre[k1 * w + k2] * a.cos() - fim[k1 * w + k2] * a.sin();
                    }
                }
                out[n1 * w + n2] = acc / (h * w) as f64;
            }
        }
        out
    }

    #[test]
    fn high_pass_matches_the_fft_recipe() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        for (h, w, r) in [(8, 8, 2.5), (32, 32, ADVCL_RADIUS), (6, 10, 3.0)] {
            let (b, c) = (2, 3);
            let data: Vec<f32> = (0..b * c * h * w).map(|_| rng.f32()).collect();
            let x = Tensor::from_vec(data.clone(), (b, c, h, w), &dev)?;
            let hp = HighPass::new(h, w, r, &dev)?;
            let got = hp.apply(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let mut worst = 0f64;
            let mut negative = false;
            for (i, chunk) in data.chunks(h * w).enumerate() {
                let img: Vec<f64> = chunk.iter().map(|&v| v as f64).collect();
                let want = reference(&img, h, w, r);
                for (j, wv) in want.iter().enumerate() {
                    worst = worst.max((got[i * h * w + j] as f64 - wv).abs());
                    negative |= *wv < 0.0;
                }
            }
            assert!(worst < 2e-5, "{h}x{w} r {r}: max diff {worst}");
            assert!(negative, "the high-frequency view is not clamped ([Q48])");
        }
        // a constant image has no high frequencies; r = 0 keeps the image
        let x = Tensor::full(0.7f32, (1, 3, 32, 32), &dev)?;
        let hf = HighPass::advcl(&dev)?.apply(&x)?;
        assert!(hf.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let x = Tensor::rand(0f32, 1., (1, 3, 32, 32), &dev)?;
        let same = HighPass::new(32, 32, 0.0, &dev)?.apply(&x)?;
        assert!((same - &x)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        assert!(
            HighPass::advcl(&dev)?
                .apply(&Tensor::zeros((1, 3, 16, 16), DType::F32, &dev)?)
                .is_err()
        );
        Ok(())
    }
}
