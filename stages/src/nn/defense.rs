//! The test-time self-supervised defence (METHODS.md 12; R-MAO `cifar10_defense.py`, R-DLSP
//! `src/reverse_attack.py`): batch-synchronous differentiable augmentations, the SSL head on a
//! frozen classifier's feature, its contrastive loss, and the reverse attack that minimises it.
//!
//! # Batch-synchronous augmentation (\[Q55\])
//!
//! R-MAO scripts torchvision's transforms and applies them to a *batched* tensor, so one call
//! draws one crop box, one flip, one set of jitter factors (and op order) and one grayscale
//! decision for the whole batch. [`SyncAugment`] draws such a call's decisions with the view
//! pipeline's own sampler ([`PipelineConfig::sample`], our seeded [`Rng`]) and applies them as
//! differentiable candle ops, so the reverse attack's gradient flows through the augmentation
//! to the input (`x ↦ A(x)` is piecewise linear except for the hue shift):
//!
//! - RandomResizedCrop + flip: `A(x) = R_y · x · R_xᵀ` per channel, where `R_y` (`S × H`) and
//!   `R_x` (`S × W`) hold the 1-D resampling weights of the crop box ([`ResizeTable`]:
//!   bilinear, `align_corners=False`) at the box's rows / columns and zeros elsewhere; the flip
//!   reverses `R_x`'s rows. Two matmuls per batch.
//! - ColorJitter in the drawn order (torchvision's tensor kernels): brightness `clamp(β x)`;
//!   contrast `clamp(γ x + (1 − γ) mean(gray x))` (the mean per image); saturation
//!   `clamp(σ x + (1 − σ) gray x)`; hue through torchvision's `_rgb2hsv` / `_hsv2rgb`, written
//!   with masks so that the gradient is torch's: `max` / `min` over the channels send their
//!   gradient to the first maximal channel (as `torch.max(dim).values`), `fmod` and `% 1`
//!   pass the gradient through, `floor` has none, the sector selection is a masked sum.
//! - RandomGrayscale: `gray x` on all three channels.
//!
//! `gray x = w_r R + w_g G + w_b B` with torchvision's tensor weights (0.2989, 0.587, 0.114)
//! ([`TORCH_GRAY`]; the host pipeline uses Pillow's 0.299, [`crate::nn::augment::color`]).
//!
//! # SSL head and loss
//!
//! [`SslHead`]: `Linear(d → h) → BN1d(h) → ReLU → Linear(h → o)` on the classifier's feature
//! φ(x) (the input of its linear head), names `linear.*`, `bn3.*`, `linear2.*` (R-MAO's
//! `Res18_out6_model` / `WRN34_out_branch`; R-MAO's ResNet-18 head is 512 → 128 → 8, its
//! WRN head 640 → 256 → 16). The loss ([`ssl_loss`]) of a batch `x` with `V` draws: the views
//! `A₁(x), …, A_V(x)` stacked view-major, `e = c(φ(·))` with the classifier in eval mode,
//! rows l2-normalised, (L1x) InfoNCE at τ = 0.2 with the first positive as target (\[Q54\]).
//!
//! # Reverse attack
//!
//! [`reverse`] runs [`pgd`] *minimising* the SSL loss from the (possibly adversarial) input,
//! fresh draws at every step, and returns the purified batch; see [`ReverseConfig`] for R-MAO's
//! and R-DLSP's settings.

use candle::{Device, Module, ModuleT, Result, Tensor, bail};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::nn::attacks::{Norm, PgdConfig, Select, pgd};
use crate::nn::augment::{
    ColorJitter, Geometry, JitterParams, PipelineConfig, RandomResizedCrop, ResizeTable,
    ViewGeometry, ViewParams,
};
use crate::nn::classifier::Classifier;
use crate::nn::heads::l2_normalize;
use crate::nn::losses::info_nce_first_positive;
use crate::nn::resnet::{BranchBatchNorm, DEFAULT_BRANCH, branch_batch_norm};
use crate::rng::Rng;

/// torchvision's `rgb_to_grayscale` weights for tensors.
pub const TORCH_GRAY: [f64; 3] = [0.2989, 0.587, 0.114];

/// The SSL loss's temperature (R-MAO and R-DLSP).
pub const SSL_TEMPERATURE: f64 = 0.2;

/// R-MAO's SSL augmentation: RandomResizedCrop(32) (scale [0.08, 1], ratio [3/4, 4/3],
/// bilinear), flip 0.5, ColorJitter(0.8, 0.8, 0.8, 0.2) always applied, grayscale 0.2; the
/// crop's output side is `side`, the images' (32 on CIFAR).
pub fn r_mao_augment(side: usize) -> PipelineConfig {
    PipelineConfig {
        size: side,
        geometry: Geometry::ResizedCrop(RandomResizedCrop {
            // torchvision's tensor resize of R-MAO's time did not antialias; the crop is never
            // larger than a 32×32 image, so upsampling makes both modes equal anyway.
            antialias: false,
            ..RandomResizedCrop::default()
        }),
        hflip_p: 0.5,
        jitter: ColorJitter::new(0.8, 0.8, 0.8, 0.2, 1.0),
        grayscale_p: 0.2,
        ..PipelineConfig::default()
    }
}

/// Whether a view's augmentation is drawn once per batch or once per image (\[Q55\]: R-MAO's
/// transforms run on the batched tensor; per image is the clean alternative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentMode {
    /// One draw per batch (R-MAO).
    #[default]
    Batch,
    /// One draw per image.
    PerImage,
}

impl AugmentMode {
    /// Whether this is the default, batch-synchronous mode.
    pub fn is_batch(&self) -> bool {
        *self == AugmentMode::Batch
    }
}

/// The random decisions of one view of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewDraw {
    /// One draw for the whole batch (R-MAO's batch-synchronous transforms, \[Q55\]).
    Shared(ViewParams),
    /// One draw per image, in batch order (the per-image mode).
    PerImage(Vec<ViewParams>),
}

/// Differentiable augmentation on tensors, batch-synchronous or per image (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct SyncAugment {
    cfg: PipelineConfig,
    gray: [f64; 3],
    per_image: bool,
}

impl SyncAugment {
    /// R-MAO's augmentation with torchvision's grayscale weights, for `side × side` images.
    pub fn r_mao(side: usize) -> Self {
        Self {
            cfg: r_mao_augment(side),
            gray: TORCH_GRAY,
            per_image: false,
        }
    }

    /// A pipeline of crop / flip / jitter / grayscale with the given grayscale weights.
    ///
    /// # Errors
    /// An invalid pipeline, or one with a step this module does not render (pad-crop, blur,
    /// solarize).
    pub fn new(cfg: PipelineConfig, gray: [f64; 3]) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle::Error::Msg(e.to_string()))?;
        if matches!(cfg.geometry, Geometry::PadCrop(_)) || cfg.blur.p > 0.0 || cfg.solarize_p > 0.0
        {
            bail!("batch-synchronous augmentation renders crop, flip, jitter and grayscale only")
        }
        Ok(Self {
            cfg,
            gray,
            per_image: false,
        })
    }

    /// The same augmentation drawing one set of decisions per image instead of per batch.
    pub fn per_image(mut self, per_image: bool) -> Self {
        self.per_image = per_image;
        self
    }

    /// Whether draws are per image.
    pub fn is_per_image(&self) -> bool {
        self.per_image
    }

    /// The pipeline.
    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// One call's random decisions for `height × width` images (shared by the whole batch).
    pub fn draw_shared(&self, rng: &mut Rng, height: usize, width: usize) -> ViewParams {
        self.cfg.sample(rng, height, width)
    }

    /// One view's random decisions for a batch of `n` images: one draw (batch-synchronous) or
    /// `n` draws in image order (per image).
    pub fn draw(&self, rng: &mut Rng, n: usize, height: usize, width: usize) -> ViewDraw {
        if self.per_image {
            ViewDraw::PerImage(
                (0..n)
                    .map(|_| self.cfg.sample(rng, height, width))
                    .collect(),
            )
        } else {
            ViewDraw::Shared(self.cfg.sample(rng, height, width))
        }
    }

    /// Applies a view's draw to `x` (`(B, 3, H, W)`): the shared draw to every image, or each
    /// image's own.
    ///
    /// # Errors
    /// As [`SyncAugment::apply_shared`], or a per-image draw of another batch size.
    pub fn apply(&self, x: &Tensor, d: &ViewDraw) -> Result<Tensor> {
        match d {
            ViewDraw::Shared(p) => self.apply_shared(x, p),
            ViewDraw::PerImage(ps) => self.apply_per_image(x, ps),
        }
    }

    /// Applies `p` to every image of `x` (`(B, 3, H, W)`, values in `[0, 1]`, any float
    /// dtype): `(B, 3, S, S)`, differentiable wrt `x`.
    ///
    /// # Errors
    /// A batch that is not `(B, 3, H, W)`, a crop box outside the image, or an image that
    /// needs a geometry step (not `S × S`) when `p` has none.
    pub fn apply_shared(&self, x: &Tensor, p: &ViewParams) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 3 {
            bail!("batch-synchronous augmentation needs RGB images, got {c} channels")
        }
        let size = self.cfg.size;
        let mut y = match p.geometry {
            ViewGeometry::Full => {
                if (h, w) != (size, size) {
                    bail!("a {h}×{w} batch needs a crop to become {size}×{size}")
                }
                if p.flip {
                    let rev: Vec<u32> = (0..w as u32).rev().collect();
                    x.index_select(&Tensor::from_vec(rev, w, x.device())?, 3)?
                } else {
                    x.clone()
                }
            }
            ViewGeometry::Crop(_) => {
                let (ry, rx) = self.axis_matrices(p, h, w)?;
                let (dev, dt) = (x.device(), x.dtype());
                let ry = Tensor::from_vec(ry, (size, h), dev)?.to_dtype(dt)?;
                let rx_t = Tensor::from_vec(rx, (size, w), dev)?.to_dtype(dt)?.t()?;
                // width pass (torch's order), then height pass
                let t = x.reshape((b * 3 * h, w))?.matmul(&rx_t)?; // (B·3·H, S)
                let t = t.reshape((b * 3, h, size))?;
                let y = ry.broadcast_matmul(&t)?; // (B·3, S, S)
                self.clamp_bicubic(y.reshape((b, 3, size, size))?)?
            }
            ViewGeometry::Window { .. } => bail!("pad-crop is not rendered on tensors"),
        };
        if let Some(j) = &p.jitter {
            y = self.jitter(&y, &JitterBatch::new(std::slice::from_ref(j), &y)?)?;
        }
        if p.grayscale {
            let g = self.gray(&y)?;
            y = Tensor::cat(&[&g, &g, &g], 1)?;
        }
        Ok(y)
    }

    /// `w_r R + w_g G + w_b B`, `(B, 1, H, W)`.
    fn gray(&self, x: &Tensor) -> Result<Tensor> {
        let [wr, wg, wb] = self.gray;
        let (r, g, b) = channels(x)?;
        ((r * wr)? + (g * wg)?)? + (b * wb)?
    }

    /// Color jitter in `j`'s op order with its factors (one per image, or one for all).
    fn jitter(&self, x: &Tensor, j: &JitterBatch) -> Result<Tensor> {
        let mut x = x.clone();
        for op in j.order {
            x = match (op, &j.factors[usize::from(op.min(3))]) {
                (_, None) => x,
                (0, Some(f)) => x.broadcast_mul(f)?.clamp(0.0, 1.0)?,
                (1, Some(f)) => {
                    let mean = self.gray(&x)?.mean_keepdim((1, 2, 3))?;
                    let keep = f.affine(-1.0, 1.0)?;
                    x.broadcast_mul(f)?
                        .broadcast_add(&mean.broadcast_mul(&keep)?)?
                        .clamp(0.0, 1.0)?
                }
                (2, Some(f)) => {
                    let g = self.gray(&x)?.broadcast_mul(&f.affine(-1.0, 1.0)?)?;
                    x.broadcast_mul(f)?.broadcast_add(&g)?.clamp(0.0, 1.0)?
                }
                (_, Some(f)) => adjust_hue(&x, f)?,
            };
        }
        Ok(x)
    }

    /// The resampling matrices `(R_y, R_x)` of `p`'s geometry for `h × w` images, row-major
    /// `S × h` and `S × w` (identity, or reversed identity under a flip, for the full image).
    ///
    /// # Errors
    /// A crop box outside the image, a full image that is not `S × S`, a pad-crop.
    fn axis_matrices(&self, p: &ViewParams, h: usize, w: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let size = self.cfg.size;
        match p.geometry {
            ViewGeometry::Full => {
                if (h, w) != (size, size) {
                    bail!("a {h}×{w} batch needs a crop to become {size}×{size}")
                }
                let eye = |flip: bool| {
                    let mut m = vec![0f32; size * size];
                    for i in 0..size {
                        m[i * size + if flip { size - 1 - i } else { i }] = 1.0;
                    }
                    m
                };
                Ok((eye(false), eye(p.flip)))
            }
            ViewGeometry::Crop(bx) => {
                if bx.top + bx.height > h || bx.left + bx.width > w {
                    bail!("crop box {bx:?} outside a {h}×{w} image")
                }
                let (interp, antialias) = match &self.cfg.geometry {
                    Geometry::ResizedCrop(r) => (r.interpolation, r.antialias),
                    _ => bail!("a crop box without a resized-crop step"),
                };
                Ok((
                    resample_matrix(h, bx.top, bx.height, size, false, interp, antialias),
                    resample_matrix(w, bx.left, bx.width, size, p.flip, interp, antialias),
                ))
            }
            ViewGeometry::Window { .. } => bail!("pad-crop is not rendered on tensors"),
        }
    }

    /// Bicubic resampling overshoots: clamp to `[0, 1]` (as torchvision); other modes as they
    /// are.
    fn clamp_bicubic(&self, y: Tensor) -> Result<Tensor> {
        match &self.cfg.geometry {
            Geometry::ResizedCrop(r)
                if matches!(r.interpolation, crate::nn::augment::Interpolation::Bicubic) =>
            {
                y.clamp(0.0, 1.0)
            }
            _ => Ok(y),
        }
    }

    /// Each image of `x` under its own draw, batched: the geometry as two batched matmuls with
    /// per-image matrices, the jitter once per group of images sharing an op order (per-image
    /// factors), the grayscale as a per-image 0/1 blend. Equal to applying each draw to its
    /// image alone (tested), without a chain of small ops per image.
    fn apply_per_image(&self, x: &Tensor, ps: &[ViewParams]) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 3 {
            bail!("batch-synchronous augmentation needs RGB images, got {c} channels")
        }
        if ps.len() != b {
            bail!("{} per-image draws for a batch of {b}", ps.len())
        }
        let size = self.cfg.size;
        let (dev, dt) = (x.device(), x.dtype());
        let (mut ry, mut rx) = (
            Vec::with_capacity(b * size * h),
            Vec::with_capacity(b * size * w),
        );
        for p in ps {
            let (my, mx) = self.axis_matrices(p, h, w)?;
            ry.extend(my);
            rx.extend(mx);
        }
        let ry = Tensor::from_vec(ry, (b, 1, size, h), dev)?.to_dtype(dt)?;
        let rx_t = Tensor::from_vec(rx, (b, size, w), dev)?
            .to_dtype(dt)?
            .transpose(1, 2)?
            .contiguous()?;
        let t = x.reshape((b, 3 * h, w))?.matmul(&rx_t)?; // (B, 3·H, S)
        let t = t.reshape((b, 3, h, size))?;
        let ry = ry.broadcast_as((b, 3, size, h))?.contiguous()?;
        let mut y = self.clamp_bicubic(ry.matmul(&t)?)?; // (B, 3, S, S)
        // jitter: one pass per (op order, ops present) group
        let key = |p: &ViewParams| {
            p.jitter.as_ref().map(|j| {
                let on = JitterBatch::present(j);
                (j.order, on)
            })
        };
        // (op order, ops present) -> the images of that group
        let mut groups: Vec<(JitterKey, Vec<usize>)> = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            if let Some(k) = key(p) {
                match groups.iter_mut().find(|(g, _)| *g == k) {
                    Some((_, idx)) => idx.push(i),
                    None => groups.push((k, vec![i])),
                }
            }
        }
        if !groups.is_empty() {
            let plain: Vec<usize> = (0..b).filter(|&i| ps[i].jitter.is_none()).collect();
            let mut parts = Vec::new();
            let mut order: Vec<usize> = Vec::with_capacity(b);
            if !plain.is_empty() {
                parts.push(y.index_select(&indices(&plain, dev)?, 0)?);
                order.extend(&plain);
            }
            for (_, idx) in &groups {
                let params: Vec<JitterParams> = idx.iter().filter_map(|&i| ps[i].jitter).collect();
                let sub = y.index_select(&indices(idx, dev)?, 0)?;
                parts.push(self.jitter(&sub, &JitterBatch::new(&params, &sub)?)?);
                order.extend(idx);
            }
            // back to image order
            let mut inverse = vec![0usize; b];
            for (pos, &i) in order.iter().enumerate() {
                inverse[i] = pos;
            }
            y = Tensor::cat(&parts, 0)?.index_select(&indices(&inverse, dev)?, 0)?;
        }
        if ps.iter().any(|p| p.grayscale) {
            let m: Vec<f32> = ps
                .iter()
                .map(|p| f32::from(u8::from(p.grayscale)))
                .collect();
            let m = Tensor::from_vec(m, (b, 1, 1, 1), dev)?.to_dtype(dt)?;
            let g = self.gray(&y)?.broadcast_as((b, 3, size, size))?;
            y = (y.broadcast_mul(&m.affine(-1.0, 1.0)?)? + g.broadcast_mul(&m)?)?;
        }
        Ok(y)
    }
}

/// A jitter group: the op order and which ops are applied.
type JitterKey = ([u8; 4], [bool; 4]);

/// `u32` row indices on `dev`.
fn indices(idx: &[usize], dev: &Device) -> Result<Tensor> {
    let v: Vec<u32> = idx
        .iter()
        .map(|&i| u32::try_from(i).map_err(|e| candle::Error::Msg(e.to_string())))
        .collect::<Result<_>>()?;
    Tensor::from_vec(v, idx.len(), dev)
}

/// Jitter factors of a batch in one op order: per op (brightness, contrast, saturation, hue)
/// a `(n, 1, 1, 1)` tensor of per-image factors (or `(1, 1, 1, 1)` for one shared draw), or
/// `None` where the op is not applied.
struct JitterBatch {
    order: [u8; 4],
    factors: [Option<Tensor>; 4],
}

impl JitterBatch {
    /// Which ops a draw applies (a hue shift of 0 is not applied).
    fn present(j: &JitterParams) -> [bool; 4] {
        [
            j.brightness.is_some(),
            j.contrast.is_some(),
            j.saturation.is_some(),
            j.hue.is_some_and(|h| h != 0.0),
        ]
    }

    /// The factors of `draws` (one order and the same ops present) in `like`'s dtype.
    fn new(draws: &[JitterParams], like: &Tensor) -> Result<Self> {
        let first = draws
            .first()
            .ok_or_else(|| candle::Error::Msg("no jitter draws".into()))?;
        let on = Self::present(first);
        let column =
            |k: usize, f: &dyn Fn(&JitterParams) -> Option<f32>| -> Result<Option<Tensor>> {
                if !on[k] {
                    return Ok(None);
                }
                let v: Vec<f32> = draws.iter().map(|j| f(j).unwrap_or(0.0)).collect();
                Tensor::from_vec(v, (draws.len(), 1, 1, 1), like.device())?
                    .to_dtype(like.dtype())
                    .map(Some)
            };
        Ok(Self {
            order: first.order,
            factors: [
                column(0, &|j| j.brightness)?,
                column(1, &|j| j.contrast)?,
                column(2, &|j| j.saturation)?,
                column(3, &|j| j.hue)?,
            ],
        })
    }
}

/// The `(S, n)` matrix that resamples the `len` samples from `start` of an axis of `n` to `S`
/// (reversed output order when `flip`), row-major.
fn resample_matrix(
    n: usize,
    start: usize,
    len: usize,
    size: usize,
    flip: bool,
    interp: crate::nn::augment::Interpolation,
    antialias: bool,
) -> Vec<f32> {
    let table = ResizeTable::new(len, size, interp, antialias).to_dense();
    let mut m = vec![0f32; size * n];
    for (i, row) in table.iter().enumerate() {
        let out = if flip { size - 1 - i } else { i };
        for (j, &v) in row.iter().enumerate() {
            m[out * n + start + j] = v;
        }
    }
    m
}

/// The three channels of `(B, 3, H, W)`, each `(B, 1, H, W)`.
fn channels(x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((x.narrow(1, 0, 1)?, x.narrow(1, 1, 1)?, x.narrow(1, 2, 1)?))
}

/// `a && b` of two 0/1 masks.
fn and(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a * b
}

/// `1 − a` of a 0/1 mask.
fn not(a: &Tensor) -> Result<Tensor> {
    a.affine(-1.0, 1.0)
}

/// A 0/1 mask (dtype of `like`) of a comparison (no gradient).
fn mask(cmp: Tensor, like: &Tensor) -> Result<Tensor> {
    cmp.to_dtype(like.dtype())
}

/// torchvision's `adjust_hue` on `(B, 3, H, W)`: RGB → HSV, `h ← (h + η) mod 1`, HSV → RGB,
/// with torch's gradient (module docs).
fn adjust_hue(x: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let (r, g, b) = channels(x)?;
    // max / min over channels, the gradient to the first extremal channel
    let r_max = and(&mask(r.ge(&g)?, x)?, &mask(r.ge(&b)?, x)?)?;
    let g_max = and(&not(&r_max)?, &mask(g.ge(&b)?, x)?)?;
    let b_max = not(&(&r_max + &g_max)?)?;
    let maxc = (((&r * &r_max)? + (&g * &g_max)?)? + (&b * &b_max)?)?;
    let r_min = and(&mask(r.le(&g)?, x)?, &mask(r.le(&b)?, x)?)?;
    let g_min = and(&not(&r_min)?, &mask(g.le(&b)?, x)?)?;
    let b_min = not(&(&r_min + &g_min)?)?;
    let minc = (((&r * &r_min)? + (&g * &g_min)?)? + (&b * &b_min)?)?;
    let eqc = mask(maxc.eq(&minc)?, x)?;
    let neq = not(&eqc)?;
    let cr = (&maxc - &minc)?;
    // torch.where(eqc, 1, maxc) and torch.where(eqc, 1, cr)
    let s = cr.div(&((&maxc * &neq)? + &eqc)?)?;
    let cr_div = ((&cr * &neq)? + &eqc)?;
    let rc = (&maxc - &r)?.div(&cr_div)?;
    let gc = (&maxc - &g)?.div(&cr_div)?;
    let bc = (&maxc - &b)?.div(&cr_div)?;
    let is_r = mask(maxc.eq(&r)?, x)?;
    let is_g = mask(maxc.eq(&g)?, x)?;
    let hr = (&is_r * (&bc - &gc)?)?;
    let hg = (and(&is_g, &not(&is_r)?)? * ((&rc - &bc)? + 2.0)?)?;
    let hb = (and(&not(&is_g)?, &not(&is_r)?)? * ((&gc - &rc)? + 4.0)?)?;
    let h = ((hr + hg)? + hb)?;
    // fmod(h / 6 + 1, 1): the argument lies in [5/6, 11/6]
    let t = ((h / 6.0)? + 1.0)?;
    let h = (&t - mask(t.ge(1.0)?, x)?)?;
    // (h + η) % 1, η per image or shared
    let h = h.broadcast_add(shift)?;
    let h = (&h - h.detach().floor()?)?;
    hsv_to_rgb(&h, &s, &maxc)
}

/// torchvision's `_hsv2rgb` for `h ∈ [0, 1)`, each input `(B, 1, H, W)`.
fn hsv_to_rgb(h: &Tensor, s: &Tensor, v: &Tensor) -> Result<Tensor> {
    let h6 = (h * 6.0)?;
    let i = h6.detach().floor()?;
    let f = (&h6 - &i)?;
    let p = (v * s.affine(-1.0, 1.0)?)?.clamp(0.0, 1.0)?;
    let q = (v * (s * &f)?.affine(-1.0, 1.0)?)?.clamp(0.0, 1.0)?;
    let t = (v * (s * f.affine(-1.0, 1.0)?)?.affine(-1.0, 1.0)?)?.clamp(0.0, 1.0)?;
    // i mod 6 (h·6 may round up to 6)
    let i = (&i - (mask(i.ge(6.0)?, &i)? * 6.0)?)?;
    let sector: Vec<Tensor> = (0..6)
        .map(|k| mask(i.eq(k as f64)?, h))
        .collect::<Result<_>>()?;
    let pick = |vals: [&Tensor; 6]| -> Result<Tensor> {
        let mut acc = (&sector[0] * vals[0])?;
        for k in 1..6 {
            acc = (acc + (&sector[k] * vals[k])?)?;
        }
        Ok(acc)
    };
    let r = pick([v, &q, &p, &p, &t, v])?;
    let g = pick([&t, v, v, &q, &p, &p])?;
    let b = pick([&p, &p, &t, v, v, &q])?;
    Tensor::cat(&[&r, &g, &b], 1)
}

/// Sizes of the [`SslHead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SslHeadConfig {
    /// Input (the classifier's feature width).
    pub in_dim: usize,
    /// Hidden width.
    pub hidden_dim: usize,
    /// Output width.
    pub out_dim: usize,
}

/// The SSL head `Linear → BN1d → ReLU → Linear` (module docs).
#[derive(Debug, Clone)]
pub struct SslHead {
    linear: Linear,
    bn: BranchBatchNorm,
    linear2: Linear,
}

fn linear_layer(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.))?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.))?;
    Ok(Linear::new(w, Some(b)))
}

/// Builds the [`SslHead`] below `vb` (names `linear.*`, `bn3.*`, `linear2.*`); zero
/// placeholders, initialised by [`crate::nn::init::init_seeded`] (PyTorch's default).
///
/// # Errors
/// Tensors of the wrong shape in `vb`.
pub fn ssl_head(cfg: &SslHeadConfig, vb: VarBuilder) -> Result<SslHead> {
    Ok(SslHead {
        linear: linear_layer(cfg.in_dim, cfg.hidden_dim, vb.pp("linear"))?,
        bn: branch_batch_norm(cfg.hidden_dim, &[DEFAULT_BRANCH.to_string()], vb.pp("bn3"))?,
        linear2: linear_layer(cfg.hidden_dim, cfg.out_dim, vb.pp("linear2"))?,
    })
}

impl SslHead {
    /// The head on detached weights, sharing the BN running statistics.
    ///
    /// # Errors
    /// Never in practice.
    pub fn frozen(&self) -> Result<Self> {
        let detach = |l: &Linear| Linear::new(l.weight().detach(), l.bias().map(Tensor::detach));
        Ok(Self {
            linear: detach(&self.linear),
            bn: self.bn.frozen()?,
            linear2: detach(&self.linear2),
        })
    }
}

impl ModuleT for SslHead {
    /// `(b, d) → (b, o)`, not normalised.
    fn forward_t(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.linear.forward(f)?;
        let y = self.bn.forward_t(&y, train)?.relu()?;
        self.linear2.forward(&y)
    }
}

/// `V` views of `x`, one draw each, stacked view-major: `(V B, 3, S, S)`.
///
/// # Errors
/// As [`SyncAugment::apply`].
pub fn sync_views(aug: &SyncAugment, x: &Tensor, draws: &[ViewDraw]) -> Result<Tensor> {
    let views: Vec<Tensor> = draws
        .iter()
        .map(|d| aug.apply(x, d))
        .collect::<Result<_>>()?;
    Tensor::cat(&views, 0)
}

/// The SSL loss of `x` under `draws` (module docs): the classifier in eval mode, the head in
/// train mode when `head_train`. With `detach_features` the classifier's feature is detached
/// (head training: no backward through the frozen backbone).
///
/// # Errors
/// Fewer than two draws, or as [`SyncAugment::apply`].
pub fn ssl_loss(
    clf: &Classifier,
    head: &SslHead,
    aug: &SyncAugment,
    x: &Tensor,
    draws: &[ViewDraw],
    head_train: bool,
    detach_features: bool,
) -> Result<Tensor> {
    let z = ssl_embeddings(clf, head, aug, x, draws, head_train, detach_features)?;
    info_nce_first_positive(&z, draws.len(), SSL_TEMPERATURE)
}

/// The l2-normalised head outputs of the views of `x`, view-major `(V B, o)` (see
/// [`ssl_loss`]).
///
/// # Errors
/// Fewer than two draws, or as [`SyncAugment::apply`].
fn ssl_embeddings(
    clf: &Classifier,
    head: &SslHead,
    aug: &SyncAugment,
    x: &Tensor,
    draws: &[ViewDraw],
    head_train: bool,
    detach_features: bool,
) -> Result<Tensor> {
    if draws.len() < 2 {
        bail!("the SSL loss needs at least 2 views, got {}", draws.len())
    }
    let views = sync_views(aug, x, draws)?;
    let mut f = clf.features(&views, false)?;
    if detach_features {
        f = f.detach();
    }
    l2_normalize(&head.forward_t(&f, head_train)?)
}

/// [`ssl_loss`] (classifier and head in eval mode) and the number of its `V B` anchors whose
/// first positive is their most similar other row (R-MAO's "correct").
///
/// # Errors
/// As [`ssl_loss`].
pub fn ssl_loss_and_correct(
    clf: &Classifier,
    head: &SslHead,
    aug: &SyncAugment,
    x: &Tensor,
    draws: &[ViewDraw],
) -> Result<(f64, usize)> {
    let z = ssl_embeddings(clf, head, aug, x, draws, false, false)?;
    let loss = info_nce_first_positive(&z, draws.len(), SSL_TEMPERATURE)?;
    let n = z.dim(0)?;
    let b = n / draws.len();
    let s = z
        .matmul(&z.t()?)?
        .to_dtype(candle::DType::F32)?
        .to_vec2::<f32>()?;
    let mut correct = 0;
    for (a, row) in s.iter().enumerate() {
        let first = if a / b == 0 { b + a % b } else { a % b };
        // torch's argmax: the first maximum
        let best = row
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != a)
            .fold((usize::MAX, f32::NEG_INFINITY), |acc, (k, &v)| {
                if v > acc.1 { (k, v) } else { acc }
            })
            .0;
        correct += usize::from(best == first);
    }
    let loss = f64::from(loss.to_dtype(candle::DType::F32)?.to_scalar::<f32>()?);
    Ok((loss, correct))
}

/// The mean SSL loss (over batches, weighted by their images) and accuracy of `split`, in a
/// seeded random order, batches of `batch`, `views` seeded draws per batch.
///
/// # Errors
/// An empty split or as [`ssl_loss`].
#[allow(clippy::too_many_arguments)]
pub fn ssl_stats(
    clf: &Classifier,
    head: &SslHead,
    aug: &SyncAugment,
    split: &crate::data::Split,
    views: usize,
    batch: usize,
    seed: u64,
    device: &Device,
) -> std::result::Result<(f64, f64), Box<dyn std::error::Error + Send + Sync>> {
    if split.n < 2 || batch < 2 {
        return Err("the SSL loss needs batches of at least 2 images".into());
    }
    let mut rng = Rng::derive(seed, &[]);
    let order = rng.permutation(split.n);
    let (mut loss, mut correct, mut anchors, mut seen) = (0.0, 0usize, 0usize, 0usize);
    for idx in order.chunks(batch) {
        if idx.len() < 2 {
            continue;
        }
        let part = split.select(idx);
        let x = crate::kinds::evaluate::batch_tensor(&part, 0, part.n, device)?;
        let draws: Vec<ViewDraw> = (0..views)
            .map(|_| aug.draw(&mut rng, part.n, part.h, part.w))
            .collect();
        let (l, c) = ssl_loss_and_correct(clf, head, aug, &x, &draws)?;
        loss += l * part.n as f64;
        seen += part.n;
        correct += c;
        anchors += views * part.n;
    }
    Ok((loss / seen as f64, correct as f64 / anchors as f64))
}

/// The reverse attack's settings (METHODS.md 12).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReverseConfig {
    /// The norm of the reversal's ball.
    pub norm: Norm,
    /// Radius ε_r.
    pub eps: f64,
    /// Step α_r.
    pub alpha: f64,
    /// PGD steps.
    pub steps: usize,
    /// Views `V` of the SSL loss.
    pub views: usize,
    /// Project `x + δ_r` onto `[0, 1]` after every step (R-MAO yes, R-DLSP no, \[Q58\]).
    pub project_box: bool,
    /// The last iterate (R-MAO) or the lowest loss measured before an update (R-DLSP).
    pub select: Select,
}

impl ReverseConfig {
    /// R-MAO: l_inf, ε_r = 16/255 (twice the attack's 8/255), α_r = 2/255, 40 steps, 4 views,
    /// the box, the last iterate.
    pub fn r_mao() -> Self {
        Self {
            norm: Norm::Linf,
            eps: 16.0 / 255.0,
            alpha: 2.0 / 255.0,
            steps: 40,
            views: 4,
            project_box: true,
            select: Select::Last,
        }
    }

    /// R-DLSP (HEAD): ε_r = 8/255, α_r = 2/255, 5 steps, 2 views, no box after the steps, the
    /// best measured iterate; the norm is the attack's (\[Q57\]).
    pub fn r_dlsp(norm: Norm) -> Self {
        Self {
            norm,
            eps: 8.0 / 255.0,
            alpha: 2.0 / 255.0,
            steps: 5,
            views: 2,
            project_box: false,
            select: Select::BestMeasured,
        }
    }

    /// The PGD that runs it: minimising, random start (l_1: zero) clamped to the box.
    pub fn pgd(&self) -> PgdConfig {
        PgdConfig {
            norm: self.norm,
            eps: self.eps,
            alpha: self.alpha,
            steps: self.steps,
            random_start: true,
            restarts: 1,
            clamp_after_init: true,
            minimize: true,
            project_box: self.project_box,
            select: self.select,
            final_loss: false,
        }
    }
}

/// Purifies `x` (`(B, 3, H, W)`): PGD minimising [`ssl_loss`] (classifier and head in eval
/// mode, fresh draws from `rng` at every step), `x + δ_r` returned (detached).
///
/// # Errors
/// Invalid settings or as [`ssl_loss`].
pub fn reverse(
    clf: &Classifier,
    head: &SslHead,
    aug: &SyncAugment,
    x: &Tensor,
    cfg: &ReverseConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    if cfg.views < 2 {
        bail!("the reversal needs at least 2 views, got {}", cfg.views)
    }
    let (n, _, h, w) = x.dims4()?;
    let mut draw_rng = Rng::derive(rng.next_u64(), &[]);
    let objective = |xa: &Tensor| -> Result<Tensor> {
        let draws: Vec<ViewDraw> = (0..cfg.views)
            .map(|_| aug.draw(&mut draw_rng, n, h, w))
            .collect();
        ssl_loss(clf, head, aug, xa, &draws, false, false)
    };
    Ok(pgd(x, objective, &cfg.pgd(), rng)?.adv)
}

/// R-DLSP's `--task random` baseline: `x + U(−ε, ε)` clamped to the box.
///
/// # Errors
/// Tensor errors.
pub fn random_noise(x: &Tensor, eps: f64, rng: &mut Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let noise: Vec<f32> = (0..n).map(|_| rng.uniform(-eps, eps) as f32).collect();
    let noise = Tensor::from_vec(noise, x.shape(), &Device::Cpu)?
        .to_device(x.device())?
        .to_dtype(x.dtype())?;
    (x + noise)?.clamp(0.0, 1.0)
}

/// One row of `pipe bench defense`: one view of a batch through the differentiable
/// augmentation, forward and input gradient.
#[derive(Debug, Clone, Serialize)]
pub struct AugmentBenchRow {
    /// `shared` (one draw for the batch), `per_image` (batched), `per_image_loop` (each
    /// image alone, the way the per-image mode used to render).
    pub mode: &'static str,
    /// Images per batch.
    pub batch: usize,
    /// Median milliseconds per view (forward + backward).
    pub ms_per_view: f64,
    /// Images per second.
    pub images_per_second: f64,
}

/// Times R-MAO's augmentation, forward and input gradient, on `batch` random 32×32 images on
/// `device` (median of `reps` after one warm-up): batch-synchronous, per image batched, and
/// per image one image at a time.
///
/// # Errors
/// Tensor or device errors.
pub fn bench_augment(batch: usize, reps: usize, device: &Device) -> Result<Vec<AugmentBenchRow>> {
    let x = Tensor::rand(0f32, 1.0, (batch, 3, 32, 32), device)?;
    let w = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), device)?;
    let mut rows = Vec::new();
    for mode in ["shared", "per_image", "per_image_loop"] {
        let aug = SyncAugment::r_mao(32).per_image(mode != "shared");
        let mut rng = Rng::new(7);
        let mut times = Vec::new();
        for rep in 0..=reps.max(1) {
            let d = aug.draw(&mut rng, batch, 32, 32);
            let v = candle::Var::from_tensor(&x)?;
            let t0 = std::time::Instant::now();
            let y = match (&d, mode) {
                (ViewDraw::PerImage(ps), "per_image_loop") => {
                    let views: Vec<Tensor> = ps
                        .iter()
                        .enumerate()
                        .map(|(i, p)| aug.apply_shared(&v.as_tensor().narrow(0, i, 1)?, p))
                        .collect::<Result<_>>()?;
                    Tensor::cat(&views, 0)?
                }
                _ => aug.apply(v.as_tensor(), &d)?,
            };
            let g = (y * &w)?.sum_all()?.backward()?;
            let grad = g
                .get(v.as_tensor())
                .ok_or_else(|| candle::Error::Msg("no input gradient".into()))?;
            // wait for the device
            grad.sum_all()?
                .to_dtype(candle::DType::F32)?
                .to_scalar::<f32>()?;
            if rep > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        rows.push(AugmentBenchRow {
            mode,
            batch,
            ms_per_view: 1e3 * t,
            images_per_second: batch as f64 / t.max(1e-12),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests;
