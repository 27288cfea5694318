//! Fast CPU 2-D convolution: im2col / col2im around one well-shaped `gemm` per tile of ~256
//! output pixels, as a candle [`CustomOp2`] with exact input and weight gradients.
//!
//! # Math and shapes
//!
//! Input `x` (b, c_in, h, w), weight `W` (c_out, c_in, kh, kw), stride `s`, zero padding `p` (no
//! dilation, no groups, no bias). With `oh = (h + 2p - kh) / s + 1`, `ow` likewise,
//! `n = oh · ow` output pixels and `k = c_in · kh · kw`:
//!
//! ```text
//! col_b[(ci, i, j), (oy, ox)] = x[b, ci, s·oy + i - p, s·ox + j - p]   (0 outside)   col_b (k, n)
//! forward       y_b  = W · col_b                  (c_out, k) · (k, n)       → y (b, c_out, oh, ow)
//! input grad    dx_b = col2im(Wᵀ · dy_b)          (k, c_out) · (c_out, n)   → dx (b, c_in, h, w)
//!   (stride 1)  dx   = conv(dy, W')  W'[ci, co, i, j] = W[co, ci, kh-1-i, kw-1-j], padding kh-1-p
//! weight grad   dW   = Σ_b dy_b · col_bᵀ          (c_out, n) · (n, k)       → dW (c_out, c_in, kh, kw)
//! ```
//!
//! `col2im` is the adjoint of `im2col` (a scatter-add), so both gradients are exact: they are
//! the same sums candle's `conv_transpose2d` / `conv2d` backward compute, in another order
//! (f32 results agree to rounding, ~1e-6 relative). A 1x1 convolution with stride 1 and no
//! padding has `col_b = x_b` and skips the copy.
//!
//! # Batching and threads
//!
//! Work is cut into *tiles* of about 256 output pixels: chunks of `ceil(256 / n)` whole images
//! when an image is small (so the 4x4 last stage of a CIFAR ResNet still gets a (c_out, k) ·
//! (k, 256) product instead of a badly shaped (k, 16) one), and bands of output rows of one
//! image when it is large (so a band's im2col block, k x 256, stays in L2; a whole 32x32 image
//! ran the c_in = 16 forward gemm at half the speed). Chunks (at least one per thread) run in
//! parallel on the current rayon pool; each tile gets its own im2col buffer and one
//! single-threaded `gemm` (`Parallelism::None`), so rayon-parallel copies and `gemm`'s own
//! threads never compete. Measured at batch 64 on the 2-core machine of issue 5 (still with
//! candle's BN; train step / PGD step, ms): this layout 447 / 297 at width 16 and 2,820 / 1,895 at width 64; one
//! batch-wide im2col per chunk of ~4,096 columns followed by one `Parallelism::Rayon` gemm
//! 580 / 371 and 3,355 / 2,205 (whole batch at once: 680 / 461 and 3,937 / 2,605).
//!
//! Two layouts matter for `gemm`'s speed. The stride-1 input gradient is computed as the
//! forward convolution of `dy` with the flipped kernel (see the table above): its gemm is
//! (c_in, c_out·9) · (c_out·9, n), where col2im's would reduce over only c_out. The weight
//! gradient accumulates into `dWᵀ`, (k, c_out) row-major, transposed at the end: with that
//! column-major destination the reduction over pixels runs about 2x faster at 16 channels.
//! The weight gradient sums per-thread partials (a fixed, contiguous split of the chunks) in a
//! fixed order, so results do not depend on work stealing (only on the thread count).
//!
//! The im2col / col2im buffers are thread-local scratch that grows to the largest tile seen and
//! is reused (a few MB per thread at width 64), so the hot loop does not page-fault fresh
//! allocations. Only the outputs (`y`, `dx`, `dW`) are fresh tensors; they are zeroed in
//! parallel, not by one thread.
//!
//! # Gradients only where needed
//!
//! The backward computes the input gradient only when the input tracks a gradient
//! ([`Tensor::track_op`]) and the weight gradient only when the weight does. So the first
//! layer of a train step computes no input gradient, and an attack on a frozen network
//! ([`Conv2d::detached`], `ResNet::frozen`) pays for no weight gradient. Second-order
//! gradients are not supported (the backward ops have no backward).
//!
//! # Devices and dtypes
//!
//! The fast op runs for CPU tensors in f32 and f64. On CUDA the forward is candle's own
//! [`Tensor::conv2d`] and the backward is built from candle convolutions too (`conv2d_composed`):
//! candle's own backward would take the input gradient through its naive CUDA
//! `conv_transpose2d` kernel and always compute the weight gradient. Anything else (Metal, CPU
//! f16 / bf16, non-square kernels on CUDA) runs candle's [`Tensor::conv2d`]. [`KernelImpl::Candle`]
//! forces candle's conv everywhere (to compare the two; `PIPE_KERNELS=candle` makes it the
//! default of every new layer, here and in [`crate::nn::batch_norm`]).
//!
//! ```
//! use candle::{DType, Device, Module, Tensor};
//! use pipe_stages::nn::conv::{Conv2d, Conv2dConfig};
//!
//! let w = Tensor::ones((4, 3, 3, 3), DType::F32, &Device::Cpu)?;
//! let conv = Conv2d::new(w, Conv2dConfig { stride: 2, padding: 1 });
//! let x = Tensor::ones((2, 3, 9, 6), DType::F32, &Device::Cpu)?;
//! let y = conv.forward(&x)?;
//! assert_eq!(y.dims(), &[2, 4, 5, 3]);
//! // An interior output pixel sees 3 · 3 · 3 ones.
//! assert_eq!(y.get(0)?.get(0)?.get(2)?.get(1)?.to_scalar::<f32>()?, 27.0);
//! # Ok::<(), candle::Error>(())
//! ```

use std::cell::RefCell;
use std::sync::OnceLock;
use std::thread::LocalKey;

use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use gemm::Parallelism;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Output pixels a tile's `gemm` aims for: images per chunk `ceil(TARGET_COLS / n)`, rows per
/// band `TARGET_COLS / ow`.
const TARGET_COLS: usize = 256;

/// Which kernels a layer runs: this crate's fused CPU ops ([`Conv2d`] here,
/// [`crate::nn::batch_norm`]) or candle's reference ops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelImpl {
    /// The fast CPU ops on CPU f32 / f64, candle's ops elsewhere.
    #[default]
    Fast,
    /// candle's own ops everywhere ([`Tensor::conv2d`], `candle_nn::BatchNorm`, `relu`): the
    /// reference.
    Candle,
}

/// The environment variable that picks the kernels: `fast` (the default) or `candle`.
pub const KERNELS_ENV: &str = "PIPE_KERNELS";

impl KernelImpl {
    /// The process-wide default: what `PIPE_KERNELS` says (`fast` or `candle`; unset or empty:
    /// `fast`), read once; anything else is treated as `fast` here and refused at start by
    /// [`KernelImpl::check_env`].
    pub fn from_env() -> Self {
        static IMPL: OnceLock<KernelImpl> = OnceLock::new();
        *IMPL.get_or_init(|| KernelImpl::parse_env().unwrap_or_default())
    }

    /// What `PIPE_KERNELS` says, or why it is not a kernel choice.
    fn parse_env() -> std::result::Result<Self, String> {
        match std::env::var(KERNELS_ENV).as_deref() {
            Err(_) | Ok("" | "fast") => Ok(KernelImpl::Fast),
            Ok("candle") => Ok(KernelImpl::Candle),
            Ok(v) => Err(format!(
                "{KERNELS_ENV}: expected `fast` or `candle`, got `{v}`"
            )),
        }
    }

    /// `Err` naming the problem when `PIPE_KERNELS` is set to something else than `fast` or
    /// `candle` (the `pipe` binary refuses to start then).
    ///
    /// # Errors
    /// An unknown value.
    pub fn check_env() -> std::result::Result<(), String> {
        KernelImpl::parse_env().map(|_| ())
    }

    /// `fast` or `candle`.
    pub fn name(self) -> &'static str {
        match self {
            KernelImpl::Fast => "fast",
            KernelImpl::Candle => "candle",
        }
    }

    /// The key entry of a node that computes with these kernels: `kernels: candle` for candle's,
    /// none for the default (so keys made before the entry existed stay). The two differ in
    /// rounding (and, on CUDA, in how batch statistics are summed), so a comparison run with
    /// `PIPE_KERNELS=candle` gets its own nodes instead of the default kernels' cached ones.
    pub fn key_entry(self) -> Option<(&'static str, &'static str)> {
        (self == KernelImpl::Candle).then_some(("kernels", "candle"))
    }
}

/// Stride and zero padding of a [`Conv2d`] (the same in both spatial dimensions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Conv2dConfig {
    /// Step between output pixels, in input pixels (≥ 1).
    pub stride: usize,
    /// Zero rows / columns added on each side of the input.
    pub padding: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
        }
    }
}

/// A bias-free 2-D convolution, (b, c_in, h, w) → (b, c_out, oh, ow), see the module docs.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    cfg: Conv2dConfig,
    imp: KernelImpl,
}

impl Conv2d {
    /// A convolution with `weight` (c_out, c_in, kh, kw), using [`KernelImpl::from_env`].
    pub fn new(weight: Tensor, cfg: Conv2dConfig) -> Self {
        Self {
            weight,
            cfg,
            imp: KernelImpl::from_env(),
        }
    }

    /// The same layer running `imp`.
    pub fn with_impl(mut self, imp: KernelImpl) -> Self {
        self.imp = imp;
        self
    }

    /// The weight (c_out, c_in, kh, kw).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Stride and padding.
    pub fn config(&self) -> Conv2dConfig {
        self.cfg
    }

    /// Which convolution runs.
    pub fn kernel_impl(&self) -> KernelImpl {
        self.imp
    }

    /// The same layer on a detached weight (shared storage, no gradient): for attacks on a
    /// frozen network, whose backward then computes no weight gradient.
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            ..self.clone()
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.imp {
            KernelImpl::Fast => conv2d(x, &self.weight, self.cfg),
            KernelImpl::Candle => x.conv2d(&self.weight, self.cfg.padding, self.cfg.stride, 1, 1),
        }
    }
}

/// Builds a bias-free [`Conv2d`] with a `kernel` x `kernel` weight named `weight` below `vb`
/// (candle-nn's `conv2d_no_bias` name), registered as a zero placeholder like every layer of
/// this crate (initialise with [`init_seeded`](crate::nn::init::init_seeded) or a checkpoint).
///
/// # Errors
/// On a tensor of the wrong shape in `vb`.
pub fn conv2d_no_bias(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let w = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", Init::Const(0.))?;
    Ok(Conv2d::new(w, cfg))
}

/// `conv2d(x, weight)` with the given stride and padding: the fast op of this module for CPU
/// f32 / f64 tensors, candle's forward with this module's backward on CUDA (`conv2d_composed`),
/// candle's [`Tensor::conv2d`] otherwise.
///
/// # Errors
/// On mismatched shapes (input channels, a kernel larger than the padded input), a zero
/// stride, or dtypes that differ.
pub fn conv2d(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && weight.device().is_cpu()
        && x.dtype() == weight.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.rank() == 4
        && weight.rank() == 4;
    if !fast || composed_on_cpu() {
        if (x.device().is_cuda() || composed_on_cpu()) && composable(weight, cfg)? {
            return conv2d_composed(x, weight, cfg);
        }
        return x.conv2d(weight, cfg.padding, cfg.stride, 1, 1);
    }
    let x = x.contiguous()?;
    let w = weight.contiguous()?;
    x.apply_op2(&w, Conv2dOp { cfg })
}

#[cfg(test)]
thread_local! {
    /// Tests: [`conv2d`] on this thread runs the CUDA path (`conv2d_composed`) on the CPU, so a
    /// whole network can be checked against the fast ops.
    pub(crate) static COMPOSED_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn composed_on_cpu() -> bool {
    #[cfg(test)]
    return COMPOSED_ON_CPU.with(std::cell::Cell::get);
    #[cfg(not(test))]
    false
}

/// Whether [`conv2d_composed`] handles this kernel: square, and padded by at most `k - 1`
/// (ResNet-18's 3x3 / padding 1 and 1x1 / padding 0 convolutions all are).
fn composable(weight: &Tensor, cfg: Conv2dConfig) -> Result<bool> {
    if weight.rank() != 4 || cfg.stride == 0 {
        return Ok(false);
    }
    let (_, _, kh, kw) = weight.dims4()?;
    Ok(kh == kw && kh >= 1 && cfg.padding < kh)
}

/// candle's `conv2d` forward with a backward built from candle's `conv2d` only: what a
/// convolution runs on CUDA.
///
/// candle 0.11 differentiates `conv2d` with `conv_transpose2d`, whose CUDA kernel is a naive
/// one (a thread per input pixel, looping over every channel and tap, no tiling), and always
/// computes the weight gradient too. Here the input gradient is the stride-1 convolution of the
/// zero-dilated output gradient with the flipped, transposed kernel (im2col + cuBLAS, or cuDNN
/// with the `cudnn` feature, like the forward); the weight gradient is candle's own formula (a
/// convolution dilated by the stride). Each is computed only when its input tracks a gradient,
/// so an attack on a frozen network ([`Conv2d::detached`]) computes no weight gradient. The
/// output padding is worked out per axis, so a non-square input with stride 2 also works (it
/// does not through candle's backward, see the tests). Second-order gradients are not
/// supported (the gradients are computed from detached tensors).
///
/// The cost: candle's public API cannot build a conv's parameters inside a custom op, so the
/// forward runs outside it and the op copies its output (device to device); the graph then
/// holds that output twice until the backward. At width 64 and 1,600 crops that is about 4 GB
/// of copies per forward (a few ms on an H100) and 4 GB more memory (about 10 % of a train
/// step's peak, which candle's CPU ops put at 0.41 GB per 16-view image).
///
/// Runs on any device; the CPU path of [`conv2d`] uses the faster fused ops instead, and the
/// tests check this one there against candle's own backward.
///
/// # Errors
/// As [`Tensor::conv2d`]; a kernel [`composable`] refuses.
pub(crate) fn conv2d_composed(x: &Tensor, weight: &Tensor, cfg: Conv2dConfig) -> Result<Tensor> {
    if !composable(weight, cfg)? {
        candle::bail!(
            "conv2d_composed: kernel {:?} with padding {} is not square or padded by k or more",
            weight.dims(),
            cfg.padding
        )
    }
    let y = x
        .detach()
        .conv2d(&weight.detach(), cfg.padding, cfg.stride, 1, 1)?
        .contiguous()?;
    if !x.track_op() && !weight.track_op() {
        return Ok(y);
    }
    y.apply_op3(x, weight, ComposedBackward { cfg })
}

/// The op of [`conv2d_composed`] on (y, x, weight): its value is `y` (the convolution,
/// computed outside), its backward that of `conv2d(x, weight)`.
struct ComposedBackward {
    cfg: Conv2dConfig,
}

impl ComposedBackward {
    /// `y`'s storage as it is: a fresh, contiguous convolution output.
    fn check(&self, l: &Layout) -> Result<()> {
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle::bail!(
                "{}: the output is not a fresh contiguous tensor",
                self.name()
            )
        }
        Ok(())
    }

    /// The input gradient: `dy` (b, c_out, oh, ow) dilated by the stride and padded to the
    /// input's size, convolved at stride 1 with the flipped kernel, (c_in, c_out, k, k).
    fn input_grad(&self, dy: &Tensor, w: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
        let (s, p) = (self.cfg.stride, self.cfg.padding);
        let (_, _, k, _) = w.dims4()?;
        let (_, _, oh, ow) = dy.dims4()?;
        // rows of the input past the last one the forward's windows reach
        let extra = |inp: usize, out: usize| (inp + 2 * p) - ((out - 1) * s + k);
        let (eh, ew) = (extra(hw.0, oh), extra(hw.1, ow));
        let dy = if s == 1 { dy.clone() } else { dilate(dy, s)? };
        let dy = dy
            .narrow(2, 0, (oh - 1) * s + 1 + eh)?
            .narrow(3, 0, (ow - 1) * s + 1 + ew)?;
        let rev = Tensor::new(
            (0..k as u32).rev().collect::<Vec<u32>>().as_slice(),
            w.device(),
        )?;
        let flipped = w
            .index_select(&rev, 2)?
            .index_select(&rev, 3)?
            .transpose(0, 1)?
            .contiguous()?;
        dy.conv2d(&flipped, k - 1 - p, 1, 1, 1)
    }

    /// The weight gradient: candle's formula, `x` and `dy` with batch and channels swapped,
    /// convolved with dilation = stride, cut to the kernel.
    fn weight_grad(&self, x: &Tensor, dy: &Tensor, k: usize) -> Result<Tensor> {
        let dw = x
            .transpose(0, 1)?
            .conv2d(
                &dy.transpose(0, 1)?,
                self.cfg.padding,
                1,
                self.cfg.stride,
                1,
            )?
            .transpose(0, 1)?;
        let (_, _, gh, gw) = dw.dims4()?;
        if (gh, gw) == (k, k) {
            Ok(dw)
        } else {
            dw.narrow(2, 0, k)?.narrow(3, 0, k)
        }
    }
}

/// `t` (b, c, h, w) with `s - 1` zero rows after every row and zero columns after every
/// column: (b, c, h·s, w·s).
fn dilate(t: &Tensor, s: usize) -> Result<Tensor> {
    let (b, c, h, w) = t.dims4()?;
    let zeros = t.zeros_like()?;
    let mut parts = vec![t.clone()];
    parts.extend(std::iter::repeat_n(zeros, s - 1));
    let t = Tensor::stack(&parts, 4)?.reshape((b, c, h, w * s))?;
    let zeros = t.zeros_like()?;
    let mut parts = vec![t];
    parts.extend(std::iter::repeat_n(zeros, s - 1));
    Tensor::stack(&parts, 3)?.reshape((b, c, h * s, w * s))
}

impl CustomOp3 for ComposedBackward {
    fn name(&self) -> &'static str {
        "pipe-conv2d-composed"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1)?;
        Ok((s1.try_clone(l1)?, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.check(l1)?;
        Ok((s1.try_clone(l1)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        let (x, w, dy) = (x.detach(), w.detach(), dy.detach());
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, k, _) = w.dims4()?;
        let dx = if want_dx {
            Some(self.input_grad(&dy, &w, (h, wd))?)
        } else {
            None
        };
        let dw = if want_dw {
            Some(self.weight_grad(&x, &dy, k)?)
        } else {
            None
        };
        Ok((None, dx, dw))
    }
}

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    b: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    /// Checks and completes the geometry of input (b, c_in, h, w) and weight (c_out, c_in, kh, kw).
    fn new(
        (b, c_in, h, w): (usize, usize, usize, usize),
        (c_out, wc_in, kh, kw): (usize, usize, usize, usize),
        cfg: Conv2dConfig,
    ) -> Result<Self> {
        let Conv2dConfig { stride, padding } = cfg;
        if stride == 0 {
            candle::bail!("conv2d: stride must be positive")
        }
        if wc_in != c_in {
            candle::bail!("conv2d: input has {c_in} channels, the weight expects {wc_in}")
        }
        if kh == 0 || kw == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            candle::bail!(
                "conv2d: kernel {kh}x{kw} does not fit the {h}x{w} input with padding {padding}"
            )
        }
        Ok(Self {
            b,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            padding,
            oh: (h + 2 * padding - kh) / stride + 1,
            ow: (w + 2 * padding - kw) / stride + 1,
        })
    }

    /// Rows of `col_b`: c_in · kh · kw.
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Output pixels per image.
    fn n(&self) -> usize {
        self.oh * self.ow
    }

    /// Input elements per image.
    fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// Output elements per image.
    fn out_len(&self) -> usize {
        self.c_out * self.n()
    }

    /// For stride 1 (and `padding < kernel`, square kernels): the input gradient as a forward
    /// convolution of `dy` with the transposed, flipped kernel
    /// `W'[ci, co, i, j] = W[co, ci, kh-1-i, kw-1-j]` and padding `kh - 1 - p`. That im2col +
    /// gemm has the forward's well-shaped (c_in, c_out·kh·kw) · (c_out·kh·kw, n) product,
    /// where col2im's (k, c_out) · (c_out, n) has a reduction of only c_out.
    fn transposed<T: Float>(&self, w: &[T]) -> Option<(Geom, Vec<T>)> {
        if self.stride != 1 || self.kh != self.kw || self.padding >= self.kh || self.direct() {
            return None;
        }
        let (kh, kw) = (self.kh, self.kw);
        let mut wt = vec![T::default(); w.len()];
        for co in 0..self.c_out {
            for ci in 0..self.c_in {
                for i in 0..kh {
                    for j in 0..kw {
                        wt[((ci * self.c_out + co) * kh + kh - 1 - i) * kw + kw - 1 - j] =
                            w[((co * self.c_in + ci) * kh + i) * kw + j];
                    }
                }
            }
        }
        let g = Geom {
            b: self.b,
            c_in: self.c_out,
            h: self.oh,
            w: self.ow,
            c_out: self.c_in,
            kh,
            kw,
            stride: 1,
            padding: kh - 1 - self.padding,
            oh: self.h,
            ow: self.w,
        };
        Some((g, wt))
    }

    /// `col_b = x_b`: a 1x1 kernel with stride 1 and no padding.
    fn direct(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Images per chunk: enough for ~[`TARGET_COLS`] gemm columns, but at least one chunk per
    /// thread of the current rayon pool (so no thread idles on a 4x4 stage).
    fn imgs_per_chunk(&self) -> usize {
        let per_thread = self.b.div_ceil(rayon::current_num_threads().max(1));
        TARGET_COLS.div_ceil(self.n().max(1)).min(per_thread).max(1)
    }
}

/// `n` copies of `zero`, written in parallel: a plain `vec![0.0; n]` of every op's output is
/// a single-threaded memset (when the allocator reuses memory), a serial phase of each op.
pub(crate) fn zeros<T: Copy + Send + Sync>(n: usize, zero: T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    (0..n)
        .into_par_iter()
        .with_min_len(64 * 1024)
        .map(|_| zero)
        .collect_into_vec(&mut v);
    v
}

/// The element types of the fast path, each with its own thread-local scratch buffer.
trait Float: Copy + Default + Send + Sync + std::ops::AddAssign + 'static {
    /// Runs `f` on a scratch slice of `len` elements (stale contents) of this thread.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
    /// One, for gemm's scale factors.
    const ONE: Self;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// The scratch of `key`, grown to `len` (kept for the next call); a fresh buffer when the
/// scratch is already borrowed further up this thread's stack (rayon may run a second
/// convolution's task while a first one waits inside a nested parallel call).
fn with_scratch_in<T: Copy + Default + 'static, R>(
    key: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                *buf = vec![T::default(); len];
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

impl Float for f32 {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        with_scratch_in(&SCRATCH_F32, len, f)
    }
    const ONE: Self = 1.0;
}

impl Float for f64 {
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        with_scratch_in(&SCRATCH_F64, len, f)
    }
    const ONE: Self = 1.0;
}

/// A matrix view: row stride and column stride in elements.
#[derive(Clone, Copy)]
struct Strides {
    rs: usize,
    cs: usize,
}

/// Row-major strides for rows of `ld` elements.
fn row_major(ld: usize) -> Strides {
    Strides { rs: ld, cs: 1 }
}

/// The transpose of a row-major matrix with rows of `ld` elements.
fn transposed(ld: usize) -> Strides {
    Strides { rs: 1, cs: ld }
}

/// One past the largest offset of an `r` x `c` view (both positive).
fn extent(r: usize, c: usize, s: Strides) -> usize {
    (r - 1) * s.rs + (c - 1) * s.cs + 1
}

/// `dst (m, n) = [dst +] lhs (m, k) · rhs (k, n)` (accumulate into `dst` when `accumulate`),
/// single-threaded `gemm` on strided views.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    ds: Strides,
    accumulate: bool,
    lhs: &[T],
    ls: Strides,
    rhs: &[T],
    rs: Strides,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * ds.rs + j * ds.cs] = T::default();
                }
            }
        }
        return Ok(());
    }
    gemm_checked((m, n, k), dst, ds, accumulate, lhs, ls, rhs, rs)
}

/// The one `unsafe` call: `gemm::gemm` on strided views, after checking that they lie inside
/// their slices.
#[allow(unsafe_code, clippy::too_many_arguments)]
fn gemm_checked<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    ds: Strides,
    accumulate: bool,
    lhs: &[T],
    ls: Strides,
    rhs: &[T],
    rs: Strides,
) -> Result<()> {
    if m == 0 || n == 0 || k == 0 {
        candle::bail!("conv2d: internal empty gemm ({m}x{n}x{k})")
    }
    if extent(m, n, ds) > dst.len() || extent(m, k, ls) > lhs.len() || extent(k, n, rs) > rhs.len()
    {
        candle::bail!("conv2d: internal gemm view out of bounds ({m}x{n}x{k})")
    }
    let s = |v: usize| v as isize;
    // SAFETY: just checked: every element the three views address lies inside its slice
    // (m, n, k > 0, so `extent` is the largest offset plus one); `dst` is a unique borrow, so
    // it aliases neither input; `T` is f32 or f64 (the only `Float`s), which gemm supports;
    // the strides fit in isize because they index allocated slices; `Parallelism::None`
    // starts no thread.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            s(ds.cs),
            s(ds.rs),
            accumulate,
            lhs.as_ptr(),
            s(ls.cs),
            s(ls.rs),
            rhs.as_ptr(),
            s(rs.cs),
            s(rs.rs),
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
    Ok(())
}

/// Output positions `o` in `0..out` whose input `s·o + j - p` lies in `0..inp`, as a range.
fn valid_range(out: usize, inp: usize, s: usize, j: usize, p: usize) -> (usize, usize) {
    let lo = if p > j { (p - j).div_ceil(s) } else { 0 }.min(out);
    let hi = if inp + p > j {
        ((inp + p - j - 1) / s + 1).min(out)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// The output pixels one gemm covers: `nb` whole images, or output rows `oy0 .. oy1` of one
/// image (a band of ~[`TARGET_COLS`] pixels, so that its im2col block stays in L2).
#[derive(Clone, Copy, Debug)]
struct Tile {
    nb: usize,
    oy0: usize,
    oy1: usize,
}

impl Tile {
    /// Output pixels per image.
    fn pixels(&self, g: &Geom) -> usize {
        (self.oy1 - self.oy0) * g.ow
    }

    /// gemm columns: all images' pixels.
    fn cols(&self, g: &Geom) -> usize {
        self.nb * self.pixels(g)
    }

    /// Offset of the tile's first pixel in an image's output plane.
    fn offset(&self, g: &Geom) -> usize {
        self.oy0 * g.ow
    }
}

impl Geom {
    /// The tiles of a chunk of `nb` images: the whole chunk when `nb > 1`, else row bands.
    fn tiles(&self, nb: usize) -> impl Iterator<Item = Tile> + use<> {
        let rows = if nb > 1 {
            self.oh
        } else {
            (TARGET_COLS / self.ow).max(1)
        };
        let oh = self.oh;
        (0..oh).step_by(rows).map(move |oy0| Tile {
            nb,
            oy0,
            oy1: (oy0 + rows).min(oh),
        })
    }
}

/// Writes output rows `oy0 .. oy1` of image `x` (c_in, h, w) into the columns
/// `col0 .. col0 + (oy1 - oy0)·ow` of `col` (k rows of `ld`).
fn im2col<T: Float>(
    g: &Geom,
    x: &[T],
    col: &mut [T],
    ld: usize,
    col0: usize,
    (oy0, oy1): (usize, usize),
) {
    let (hw, s, p, ow) = (g.h * g.w, g.stride, g.padding, g.ow);
    let nt = (oy1 - oy0) * ow;
    let zero = T::default();
    for ci in 0..g.c_in {
        let xc = &x[ci * hw..(ci + 1) * hw];
        for i in 0..g.kh {
            let (vy0, vy1) = valid_range(g.oh, g.h, s, i, p);
            let (vy0, vy1) = (vy0.clamp(oy0, oy1), vy1.clamp(oy0, oy1));
            for j in 0..g.kw {
                let row = (ci * g.kh + i) * g.kw + j;
                let dst = &mut col[row * ld + col0..row * ld + col0 + nt];
                let (ox0, ox1) = valid_range(ow, g.w, s, j, p);
                dst[..(vy0 - oy0) * ow].fill(zero);
                dst[(vy1 - oy0) * ow..].fill(zero);
                if s == 1 && ow == g.w {
                    // "Same" padding: consecutive output rows read consecutive input rows, so
                    // the band is one shifted copy of the plane; then zero the wrapped columns.
                    let d = &mut dst[(vy0 - oy0) * ow..(vy1 - oy0) * ow];
                    // d[q] reads xc[base + q]; only wrapped columns fall outside the plane.
                    let base = ((vy0 + i - p) * g.w + j) as isize - p as isize;
                    let lo = (-base).clamp(0, d.len() as isize) as usize;
                    let hi = (hw as isize - base).clamp(lo as isize, d.len() as isize) as usize;
                    d[..lo].fill(zero);
                    d[hi..].fill(zero);
                    if hi > lo {
                        let start = (base + lo as isize) as usize;
                        d[lo..hi].copy_from_slice(&xc[start..start + (hi - lo)]);
                    }
                    if ox0 > 0 || ox1 < ow {
                        for r in d.chunks_exact_mut(ow) {
                            r[..ox0].fill(zero);
                            r[ox1..].fill(zero);
                        }
                    }
                    continue;
                }
                for oy in vy0..vy1 {
                    let d = &mut dst[(oy - oy0) * ow..(oy - oy0 + 1) * ow];
                    let iy = s * oy + i - p;
                    let xr = &xc[iy * g.w..(iy + 1) * g.w];
                    d[..ox0].fill(zero);
                    d[ox1..].fill(zero);
                    if ox1 > ox0 {
                        let ix0 = s * ox0 + j - p;
                        let d = &mut d[ox0..ox1];
                        if s == 1 {
                            d.copy_from_slice(&xr[ix0..ix0 + d.len()]);
                        } else {
                            for (o, v) in d.iter_mut().zip(xr[ix0..].iter().step_by(s)) {
                                *o = *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds the columns `col0 ..` of `col` (output rows `oy0 .. oy1`)
/// into image `dx` (c_in, h, w).
fn col2im<T: Float>(
    g: &Geom,
    col: &[T],
    ld: usize,
    col0: usize,
    (oy0, oy1): (usize, usize),
    dx: &mut [T],
) {
    let (hw, s, p, ow) = (g.h * g.w, g.stride, g.padding, g.ow);
    let nt = (oy1 - oy0) * ow;
    for ci in 0..g.c_in {
        let xc = &mut dx[ci * hw..(ci + 1) * hw];
        for i in 0..g.kh {
            let (vy0, vy1) = valid_range(g.oh, g.h, s, i, p);
            let (vy0, vy1) = (vy0.clamp(oy0, oy1), vy1.clamp(oy0, oy1));
            for j in 0..g.kw {
                let row = (ci * g.kh + i) * g.kw + j;
                let src = &col[row * ld + col0..row * ld + col0 + nt];
                let (ox0, ox1) = valid_range(ow, g.w, s, j, p);
                if ox1 == ox0 {
                    continue;
                }
                for oy in vy0..vy1 {
                    let d = &src[(oy - oy0) * ow + ox0..(oy - oy0) * ow + ox1];
                    let iy = s * oy + i - p;
                    let ix0 = s * ox0 + j - p;
                    let xr = &mut xc[iy * g.w + ix0..(iy + 1) * g.w];
                    if s == 1 {
                        for (o, v) in xr.iter_mut().zip(d) {
                            *o += *v;
                        }
                    } else {
                        for (o, v) in xr.iter_mut().step_by(s).zip(d) {
                            *o += *v;
                        }
                    }
                }
            }
        }
    }
}

/// Copies `src` (nb, c, n) into `dst` (c, nb · n).
fn gather<T: Float>(src: &[T], dst: &mut [T], nb: usize, c: usize, n: usize) {
    for j in 0..nb {
        for ch in 0..c {
            dst[ch * nb * n + j * n..][..n].copy_from_slice(&src[(j * c + ch) * n..][..n]);
        }
    }
}

/// Copies `src` (c, nb · n) into `dst` (nb, c, n).
fn scatter<T: Float>(src: &[T], dst: &mut [T], nb: usize, c: usize, n: usize) {
    for j in 0..nb {
        for ch in 0..c {
            dst[(j * c + ch) * n..][..n].copy_from_slice(&src[ch * nb * n + j * n..][..n]);
        }
    }
}

/// Forward: `y (b, c_out, oh, ow)` from `x (b, c_in, h, w)` and `w (c_out, k)`.
fn forward<T: Float>(g: &Geom, x: &[T], w: &[T]) -> Result<Vec<T>> {
    let mut y = zeros(g.b * g.out_len(), T::default());
    if y.is_empty() {
        return Ok(y);
    }
    let imgs = g.imgs_per_chunk();
    y.par_chunks_mut(imgs * g.out_len())
        .enumerate()
        .try_for_each(|(c, y_c)| {
            let nb = y_c.len() / g.out_len();
            let x_c = &x[c * imgs * g.in_len()..(c * imgs + nb) * g.in_len()];
            g.tiles(nb)
                .try_for_each(|t| forward_tile(g, x_c, w, y_c, t))
        })?;
    Ok(y)
}

/// `y[tile] = W · col[tile]` for the images of `x` and `y`.
fn forward_tile<T: Float>(g: &Geom, x: &[T], w: &[T], y: &mut [T], t: Tile) -> Result<()> {
    let (k, n, c_out) = (g.k(), g.n(), g.c_out);
    let (nt, cols, off) = (t.pixels(g), t.cols(g), t.offset(g));
    let (ks, ns) = (row_major(k), row_major(n));
    if t.nb == 1 && g.direct() {
        // col = x: the tile's columns of the (c_in, h·w) image.
        return matmul(
            (c_out, nt, k),
            &mut y[off..],
            ns,
            false,
            w,
            ks,
            &x[off..],
            ns,
        );
    }
    let ybuf_len = if t.nb > 1 { c_out * cols } else { 0 };
    T::with_scratch(k * cols + ybuf_len, |buf| {
        let (col, ybuf) = buf.split_at_mut(k * cols);
        for j in 0..t.nb {
            let x_j = &x[j * g.in_len()..(j + 1) * g.in_len()];
            im2col(g, x_j, col, cols, j * nt, (t.oy0, t.oy1));
        }
        let cs = row_major(cols);
        if t.nb == 1 {
            matmul((c_out, nt, k), &mut y[off..], ns, false, w, ks, col, cs)
        } else {
            matmul((c_out, cols, k), ybuf, cs, false, w, ks, col, cs)?;
            scatter(ybuf, y, t.nb, c_out, n);
            Ok(())
        }
    })
}

/// Input gradient: `dx (b, c_in, h, w)` from `dy (b, c_out, oh, ow)` and `w (c_out, k)`.
fn backward_input<T: Float>(g: &Geom, dy: &[T], w: &[T]) -> Result<Vec<T>> {
    if let Some((gt, wt)) = g.transposed(w) {
        return forward(&gt, dy, &wt);
    }
    let mut dx = zeros(g.b * g.in_len(), T::default());
    if dx.is_empty() {
        return Ok(dx);
    }
    let imgs = g.imgs_per_chunk();
    dx.par_chunks_mut(imgs * g.in_len())
        .enumerate()
        .try_for_each(|(c, dx_c)| {
            let nb = dx_c.len() / g.in_len();
            let dy_c = &dy[c * imgs * g.out_len()..(c * imgs + nb) * g.out_len()];
            // The row bands of one image overlap in dx: they run in order, in this task.
            g.tiles(nb)
                .try_for_each(|t| backward_input_tile(g, dy_c, w, dx_c, t))
        })?;
    Ok(dx)
}

/// `dx += col2im(Wᵀ · dy[tile])` for the images of `dy` and `dx`.
fn backward_input_tile<T: Float>(g: &Geom, dy: &[T], w: &[T], dx: &mut [T], t: Tile) -> Result<()> {
    let (k, n, c_out) = (g.k(), g.n(), g.c_out);
    let (nt, cols, off) = (t.pixels(g), t.cols(g), t.offset(g));
    // Wᵀ: (k, c_out) view of the row-major (c_out, k) weight.
    let (wt, ns) = (transposed(k), row_major(n));
    if t.nb == 1 && g.direct() {
        return matmul(
            (k, nt, c_out),
            &mut dx[off..],
            ns,
            false,
            w,
            wt,
            &dy[off..],
            ns,
        );
    }
    let dybuf_len = if t.nb > 1 { c_out * cols } else { 0 };
    T::with_scratch(k * cols + dybuf_len, |buf| {
        let (dcol, dybuf) = buf.split_at_mut(k * cols);
        let (rhs, rs): (&[T], _) = if t.nb == 1 {
            (&dy[off..], ns)
        } else {
            gather(dy, dybuf, t.nb, c_out, n);
            (dybuf, row_major(cols))
        };
        let cs = row_major(cols);
        matmul((k, cols, c_out), dcol, cs, false, w, wt, rhs, rs)?;
        for j in 0..t.nb {
            let dx_j = &mut dx[j * g.in_len()..(j + 1) * g.in_len()];
            col2im(g, dcol, cols, j * nt, (t.oy0, t.oy1), dx_j);
        }
        Ok(())
    })
}

/// Weight gradient: `dW (c_out, k)` from `x (b, c_in, h, w)` and `dy (b, c_out, oh, ow)`.
fn backward_weight<T: Float>(g: &Geom, x: &[T], dy: &[T]) -> Result<Vec<T>> {
    let len = g.c_out * g.k();
    let imgs = g.imgs_per_chunk();
    let chunks = g.b.div_ceil(imgs);
    if chunks == 0 || len == 0 {
        return Ok(vec![T::default(); len]);
    }
    // A fixed contiguous split of the chunks, one partial sum per group, added in order.
    let groups = chunks.min(rayon::current_num_threads()).max(1);
    let per_group = chunks.div_ceil(groups);
    let partials = (0..groups)
        .into_par_iter()
        .map(|gi| {
            let mut acc = vec![T::default(); len];
            let mut accumulate = false;
            for c in gi * per_group..((gi + 1) * per_group).min(chunks) {
                let b0 = c * imgs;
                let nb = imgs.min(g.b - b0);
                let x_c = &x[b0 * g.in_len()..(b0 + nb) * g.in_len()];
                let dy_c = &dy[b0 * g.out_len()..(b0 + nb) * g.out_len()];
                for t in g.tiles(nb) {
                    backward_weight_tile(g, x_c, dy_c, &mut acc, accumulate, t)?;
                    accumulate = true;
                }
            }
            Ok(acc)
        })
        .collect::<Result<Vec<Vec<T>>>>()?;
    let mut parts = partials.into_iter();
    let mut dwt = parts.next().unwrap_or_else(|| vec![T::default(); len]);
    for p in parts {
        for (a, b) in dwt.iter_mut().zip(&p) {
            *a += *b;
        }
    }
    // The partial sums are (k, c_out) row-major (see `backward_weight_tile`): transpose.
    let mut dw = vec![T::default(); len];
    for (kk, row) in dwt.chunks_exact(g.c_out).enumerate() {
        for (co, v) in row.iter().enumerate() {
            dw[co * g.k() + kk] = *v;
        }
    }
    Ok(dw)
}

/// `dW [+]= dy[tile] · col[tile]ᵀ` for the images of `x` and `dy`, into `dw` stored
/// transposed, (k, c_out) row-major: with that column-major destination the gemm crate runs
/// this reduction over pixels about 2x faster at 16-32 channels (measured: 81 vs 43 GFLOP/s
/// per core at c_out = 16).
fn backward_weight_tile<T: Float>(
    g: &Geom,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    accumulate: bool,
    t: Tile,
) -> Result<()> {
    let (k, n, c_out) = (g.k(), g.n(), g.c_out);
    let (nt, cols, off) = (t.pixels(g), t.cols(g), t.offset(g));
    // dW (c_out, k) viewed in its transposed (k, c_out) row-major storage.
    let (ds, ns) = (transposed(c_out), row_major(n));
    if t.nb == 1 && g.direct() {
        // x[tile]ᵀ: (nt, c_in) view of the row-major (c_in, h·w) image.
        let xt = transposed(n);
        return matmul(
            (c_out, k, nt),
            dw,
            ds,
            accumulate,
            &dy[off..],
            ns,
            &x[off..],
            xt,
        );
    }
    let dybuf_len = if t.nb > 1 { c_out * cols } else { 0 };
    T::with_scratch(k * cols + dybuf_len, |buf| {
        let (col, dybuf) = buf.split_at_mut(k * cols);
        for j in 0..t.nb {
            let x_j = &x[j * g.in_len()..(j + 1) * g.in_len()];
            im2col(g, x_j, col, cols, j * nt, (t.oy0, t.oy1));
        }
        let (lhs, ls): (&[T], _) = if t.nb == 1 {
            (&dy[off..], ns)
        } else {
            gather(dy, dybuf, t.nb, c_out, n);
            (dybuf, row_major(cols))
        };
        matmul(
            (c_out, k, cols),
            dw,
            ds,
            accumulate,
            lhs,
            ls,
            col,
            transposed(cols),
        )
    })
}

/// The contiguous data of a CPU tensor argument.
fn data<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle::bail!("conv2d: {what} must be contiguous"),
    }
}

/// Runs `f32` or `f64` `kernel` on two CPU storages of the same dtype.
fn dispatch(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_kernel: impl FnOnce(&[f32], &[f32]) -> Result<Vec<f32>>,
    f64_kernel: impl FnOnce(&[f64], &[f64]) -> Result<Vec<f64>>,
) -> Result<CpuStorage> {
    match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => Ok(CpuStorage::F32(f32_kernel(
            data(a, l1, name)?,
            data(b, l2, name)?,
        )?)),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => Ok(CpuStorage::F64(f64_kernel(
            data(a, l1, name)?,
            data(b, l2, name)?,
        )?)),
        _ => candle::bail!(
            "{name}: unsupported dtypes {:?} and {:?} (f32 or f64 expected)",
            s1.dtype(),
            s2.dtype()
        ),
    }
}

/// The forward op on (x, weight).
struct Conv2dOp {
    cfg: Conv2dConfig,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "pipe-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.shape().dims4()?, l2.shape().dims4()?, self.cfg)?;
        let y = dispatch(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, w| forward(&g, x, w),
            |x, w| forward(&g, x, w),
        )?;
        Ok((y, (g.b, g.c_out, g.oh, g.ow).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(
                w,
                &Conv2dBackwardInput {
                    cfg: self.cfg,
                    hw: (h, wd),
                },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let (_, _, kh, kw) = w.dims4()?;
            Some(x.apply_op2_no_bwd(
                &dy,
                &Conv2dBackwardWeight {
                    cfg: self.cfg,
                    khw: (kh, kw),
                },
            )?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// The input gradient on (dy, weight), for an input of spatial size `hw`.
struct Conv2dBackwardInput {
    cfg: Conv2dConfig,
    hw: (usize, usize),
}

impl CustomOp2 for Conv2dBackwardInput {
    fn name(&self) -> &'static str {
        "pipe-conv2d-backward-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c_out, oh, ow) = l1.shape().dims4()?;
        let wd = l2.shape().dims4()?;
        let g = Geom::new((b, wd.1, self.hw.0, self.hw.1), wd, self.cfg)?;
        if (c_out, oh, ow) != (g.c_out, g.oh, g.ow) {
            candle::bail!(
                "{}: gradient {:?} does not match the output of {g:?}",
                self.name(),
                l1.shape()
            )
        }
        let dx = dispatch(
            self.name(),
            (s1, l1),
            (s2, l2),
            |dy, w| backward_input(&g, dy, w),
            |dy, w| backward_input(&g, dy, w),
        )?;
        Ok((dx, (g.b, g.c_in, g.h, g.w).into()))
    }
}

/// The weight gradient on (x, dy), for a kernel of size `khw`.
struct Conv2dBackwardWeight {
    cfg: Conv2dConfig,
    khw: (usize, usize),
}

impl CustomOp2 for Conv2dBackwardWeight {
    fn name(&self) -> &'static str {
        "pipe-conv2d-backward-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xd = l1.shape().dims4()?;
        let (b, c_out, oh, ow) = l2.shape().dims4()?;
        let g = Geom::new(xd, (c_out, xd.1, self.khw.0, self.khw.1), self.cfg)?;
        if (b, oh, ow) != (g.b, g.oh, g.ow) {
            candle::bail!(
                "{}: gradient {:?} does not match the output of {g:?}",
                self.name(),
                l2.shape()
            )
        }
        let dw = dispatch(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, dy| backward_weight(&g, x, dy),
            |x, dy| backward_weight(&g, x, dy),
        )?;
        Ok((dw, (g.c_out, g.c_in, g.kh, g.kw).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    /// A deterministic tensor: `sin(0.37 i + phase)` over the flat index.
    fn wave(dims: (usize, usize, usize, usize), phase: f64, dtype: DType) -> Result<Tensor> {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let v: Vec<f64> = (0..n).map(|i| (0.37 * i as f64 + phase).sin()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
    }

    /// One convolution case: (b, c_in, c_out, h, w, kernel, stride, padding).
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// Stride 1 and 2, padding 0 and 1, 1x1 and 3x3, batch 1, 3 and 7, channels 3, 5, 17,
    /// 7x7, 32x32, 10x10 and non-square 9x6 inputs; single-image chunks (32x32), several
    /// images per chunk (7x7, 9x6) and several multi-image chunks with a short last one (b = 7
    /// at 10x10: 3 + 3 + 1); row bands of one image (32x32: 4 bands of 8 rows, 30x30: 8, 8, 8,
    /// 6 rows, 48x40 with stride 2: 12 + 12 rows through col2im); 1x1 and 2x2 inputs under a
    /// padded 3x3 kernel (taps with no valid row at all).
    const CASES: [Case; 16] = [
        (1, 3, 5, 7, 7, 3, 1, 1),
        (3, 5, 17, 7, 7, 3, 2, 1),
        (3, 17, 5, 7, 7, 1, 1, 0),
        (3, 5, 3, 7, 7, 1, 2, 0),
        (1, 3, 17, 32, 32, 3, 1, 1),
        (3, 5, 3, 32, 32, 3, 2, 1),
        (3, 5, 5, 32, 32, 1, 1, 0),
        (1, 17, 5, 32, 32, 3, 1, 0),
        (3, 3, 5, 9, 6, 3, 1, 1),
        (3, 5, 3, 9, 6, 3, 2, 0),
        (1, 5, 17, 9, 6, 1, 2, 0),
        (7, 3, 5, 10, 10, 3, 1, 1),
        (1, 3, 4, 30, 30, 3, 1, 1),
        (1, 3, 4, 48, 40, 3, 2, 1),
        (3, 5, 3, 1, 1, 3, 1, 1),
        (2, 3, 4, 2, 2, 3, 1, 1),
    ];

    /// Output and gradients of `sum(conv(x, w) · r)` wrt x and w.
    struct Run {
        y: Tensor,
        dx: Tensor,
        dw: Tensor,
    }

    fn run(case: Case, dtype: DType, imp: KernelImpl) -> Result<Run> {
        let (_, _, _, h, w, k, stride, padding) = case;
        run_with(case, dtype, |x, wt, cfg| {
            if imp == KernelImpl::Candle
                && out_padding(h, k, stride, padding) != out_padding(w, k, stride, padding)
            {
                candle_strided(x, wt, stride, padding)
            } else {
                Conv2d::new(wt.clone(), cfg).with_impl(imp).forward(x)
            }
        })
    }

    /// [`run`] with the convolution `conv(x, w, cfg)`.
    fn run_with(
        case: Case,
        dtype: DType,
        conv: impl Fn(&Tensor, &Tensor, Conv2dConfig) -> Result<Tensor>,
    ) -> Result<Run> {
        let (b, c_in, c_out, h, w, k, stride, padding) = case;
        let x = Var::from_tensor(&wave((b, c_in, h, w), 0.1, dtype)?)?;
        let wt = Var::from_tensor(&(wave((c_out, c_in, k, k), 1.3, dtype)? * 0.3)?)?;
        let y = conv(
            x.as_tensor(),
            wt.as_tensor(),
            Conv2dConfig { stride, padding },
        )?;
        let r = wave(y.dims4()?, 2.9, dtype)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let get = |v: &Var| {
            grads
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| candle::Error::Msg("missing gradient".into()))
        };
        Ok(Run {
            dx: get(&x)?,
            dw: get(&wt)?,
            y,
        })
    }

    /// The output padding candle's conv2d backward gives `conv_transpose2d` for a side of `inp`.
    fn out_padding(inp: usize, k: usize, s: usize, p: usize) -> usize {
        let out = (inp + 2 * p - k) / s + 1;
        inp - ((out - 1) * s + k - 2 * p)
    }

    /// candle's stride-`s` conv as its stride-1 conv subsampled by `index_select`.
    ///
    /// candle 0.11's conv2d backward derives `conv_transpose2d`'s output padding from the
    /// height only, so its input gradient has the wrong shape (an error) when the width needs
    /// another one (a 9x6 input with stride 2); the subsampled form has a correct backward.
    fn candle_strided(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Result<Tensor> {
        let y = x.conv2d(w, p, 1, 1, 1)?;
        let (_, _, h1, w1) = y.dims4()?;
        let pick = |len: usize| -> Result<Tensor> {
            let idx: Vec<u32> = (0..len).step_by(s).map(|i| i as u32).collect();
            Tensor::new(idx, &Device::Cpu)
        };
        y.index_select(&pick(h1)?, 2)?.index_select(&pick(w1)?, 3)
    }

    #[test]
    fn candle_backward_fails_on_non_square_strided_input() -> Result<()> {
        // Documents the candle 0.11 bug that `candle_strided` works around: once fixed, the
        // reference above can use `Tensor::conv2d` directly.
        let x = Var::from_tensor(&wave((1, 2, 9, 6), 0.1, DType::F32)?)?;
        let w = wave((2, 2, 3, 3), 0.5, DType::F32)?;
        assert!(
            x.as_tensor()
                .conv2d(&w, 0, 2, 1, 1)?
                .sum_all()?
                .backward()
                .is_err()
        );
        // The same forward values as the subsampled form.
        let native = x.as_tensor().conv2d(&w, 0, 2, 1, 1)?;
        let sub = candle_strided(x.as_tensor(), &w, 2, 0)?;
        assert!(rel_err(&native, &sub)? < 1e-6);
        Ok(())
    }

    /// max |a - b| / max(max |b|, 1e-30), in f64.
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_dtype(DType::F64)?;
        let b = b.to_dtype(DType::F64)?;
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
        Ok(diff / scale.max(1e-30))
    }

    fn check_against_candle(dtype: DType, tol: f64) -> Result<()> {
        for case in CASES {
            let fast = run(case, dtype, KernelImpl::Fast)?;
            let reference = run(case, dtype, KernelImpl::Candle)?;
            for (what, a, b) in [
                ("y", &fast.y, &reference.y),
                ("dx", &fast.dx, &reference.dx),
                ("dw", &fast.dw, &reference.dw),
            ] {
                let e = rel_err(a, b)?;
                assert!(e <= tol, "{case:?} {what}: relative error {e:e}");
                let scale = b.abs()?.max_all()?.to_dtype(DType::F64)?;
                assert!(
                    scale.to_scalar::<f64>()? > 1e-3,
                    "{case:?} {what} is trivial: {scale}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn f32_agrees_with_candle_conv_in_value_and_both_gradients() -> Result<()> {
        check_against_candle(DType::F32, 1e-5)
    }

    #[test]
    fn f64_agrees_with_candle_conv_in_value_and_both_gradients() -> Result<()> {
        check_against_candle(DType::F64, 1e-13)
    }

    #[test]
    fn composed_backward_agrees_with_candle_in_value_and_both_gradients() -> Result<()> {
        // what a convolution runs on CUDA, run here on the CPU
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            for case in CASES {
                let composed = run_with(case, dtype, conv2d_composed)?;
                let reference = run(case, dtype, KernelImpl::Candle)?;
                for (what, a, b) in [
                    ("y", &composed.y, &reference.y),
                    ("dx", &composed.dx, &reference.dx),
                    ("dw", &composed.dw, &reference.dw),
                ] {
                    let e = rel_err(a, b)?;
                    assert!(e <= tol, "{dtype:?} {case:?} {what}: relative error {e:e}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn composed_backward_computes_only_the_gradients_that_are_tracked() -> Result<()> {
        let (b, c_in, c_out, h, w, k) = (2, 3, 4, 9, 6, 3);
        let cfg = Conv2dConfig {
            stride: 2,
            padding: 1,
        };
        let x = Var::from_tensor(&wave((b, c_in, h, w), 0.1, DType::F32)?)?;
        let wv = Var::from_tensor(&wave((c_out, c_in, k, k), 1.3, DType::F32)?)?;
        let y = conv2d_composed(x.as_tensor(), wv.as_tensor(), cfg)?;
        let dy = wave(y.dims4()?, 2.9, DType::F32)?;
        let op = ComposedBackward { cfg };
        let (plain_x, plain_w) = (x.as_tensor().detach(), wv.as_tensor().detach());
        let grads = |x: &Tensor, w: &Tensor| op.bwd(&y, x, w, &y, &dy);
        let (none, dx, dw) = grads(x.as_tensor(), wv.as_tensor())?;
        assert!(none.is_none() && dx.is_some() && dw.is_some());
        let (_, dx, dw) = grads(x.as_tensor(), &plain_w)?;
        assert!(
            dx.is_some() && dw.is_none(),
            "a frozen weight gets no gradient"
        );
        let (_, dx, dw) = grads(&plain_x, wv.as_tensor())?;
        assert!(
            dx.is_none() && dw.is_some(),
            "a plain input gets no gradient"
        );
        // nothing tracked: the plain convolution, no op on top
        let y = conv2d_composed(&plain_x, &plain_w, cfg)?;
        assert!(!y.track_op());
        // and what it refuses (candle's backward runs these)
        let wide = wave((c_out, c_in, 3, 1), 0.5, DType::F32)?;
        assert!(!composable(&wide, cfg)?);
        let overpadded = Conv2dConfig {
            stride: 1,
            padding: 3,
        };
        assert!(!composable(wv.as_tensor(), overpadded)?);
        assert!(conv2d_composed(x.as_tensor(), wv.as_tensor(), overpadded).is_err());
        Ok(())
    }

    #[test]
    fn dilate_interleaves_zero_rows_and_columns() -> Result<()> {
        let t = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu)?;
        let d = dilate(&t, 2)?;
        assert_eq!(
            d.flatten_all()?.to_vec1::<f32>()?,
            [
                1., 0., 2., 0., 0., 0., 0., 0., 3., 0., 4., 0., 0., 0., 0., 0.
            ]
        );
        Ok(())
    }

    #[test]
    fn f64_gradients_match_central_differences() -> Result<()> {
        // Stride 2, padding 1, 3x3, non-square 5x4 input.
        let (b, c_in, c_out, h, w, k) = (2, 2, 3, 5, 4, 3);
        let cfg = Conv2dConfig {
            stride: 2,
            padding: 1,
        };
        let x0 = wave((b, c_in, h, w), 0.4, DType::F64)?;
        let w0 = wave((c_out, c_in, k, k), 0.8, DType::F64)?;
        let y0 = conv2d(&x0, &w0, cfg)?;
        let r = wave(y0.dims4()?, 1.9, DType::F64)?;
        let loss = |x: &Tensor, w: &Tensor| -> Result<f64> {
            (conv2d(x, w, cfg)? * &r)?.sum_all()?.to_scalar::<f64>()
        };
        let x = Var::from_tensor(&x0)?;
        let wv = Var::from_tensor(&w0)?;
        let grads = (conv2d(x.as_tensor(), wv.as_tensor(), cfg)? * &r)?
            .sum_all()?
            .backward()?;
        let eps = 1e-6;
        for (t, var, is_x) in [(&x0, &x, true), (&w0, &wv, false)] {
            let analytic = grads
                .get(var.as_tensor())
                .ok_or_else(|| candle::Error::Msg("missing gradient".into()))?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let base = t.flatten_all()?.to_vec1::<f64>()?;
            for (i, g) in analytic.iter().enumerate() {
                let bump = |d: f64| -> Result<Tensor> {
                    let mut v = base.clone();
                    v[i] += d;
                    Tensor::from_vec(v, t.shape(), &Device::Cpu)
                };
                let (plus, minus) = if is_x {
                    (loss(&bump(eps)?, &w0)?, loss(&bump(-eps)?, &w0)?)
                } else {
                    (loss(&x0, &bump(eps)?)?, loss(&x0, &bump(-eps)?)?)
                };
                let fd = (plus - minus) / (2.0 * eps);
                assert!((fd - g).abs() < 1e-7, "x={is_x} {i}: fd {fd} vs {g}");
            }
            assert!(analytic.iter().any(|g| g.abs() > 0.1));
        }
        Ok(())
    }

    #[test]
    fn detached_weight_gets_no_gradient_and_untracked_input_none() -> Result<()> {
        let case = (3, 5, 17, 9, 6, 3, 2, 1);
        let full = run(case, DType::F32, KernelImpl::Fast)?;
        let (b, c_in, c_out, h, w, k, stride, padding) = case;
        let cfg = Conv2dConfig { stride, padding };
        let x = Var::from_tensor(&wave((b, c_in, h, w), 0.1, DType::F32)?)?;
        let wv = Var::from_tensor(&(wave((c_out, c_in, k, k), 1.3, DType::F32)? * 0.3)?)?;
        let r = wave(full.y.dims4()?, 2.9, DType::F32)?;

        // Frozen weight: only the input gradient, and the same one.
        let frozen = Conv2d::new(wv.as_tensor().clone(), cfg)
            .with_impl(KernelImpl::Fast)
            .detached();
        let grads = (frozen.forward(x.as_tensor())? * &r)?
            .sum_all()?
            .backward()?;
        assert!(grads.get(wv.as_tensor()).is_none());
        assert!(grads.get(frozen.weight()).is_none());
        let dx = grads
            .get(x.as_tensor())
            .ok_or_else(|| candle::Error::Msg("missing dx".into()))?;
        assert_eq!(rel_err(dx, &full.dx)?, 0.0);

        // Plain input: only the weight gradient, and the same one.
        let plain = x.as_tensor().detach();
        let live = Conv2d::new(wv.as_tensor().clone(), cfg).with_impl(KernelImpl::Fast);
        let grads = (live.forward(&plain)? * &r)?.sum_all()?.backward()?;
        assert!(grads.get(&plain).is_none());
        let dw = grads
            .get(wv.as_tensor())
            .ok_or_else(|| candle::Error::Msg("missing dw".into()))?;
        assert_eq!(rel_err(dw, &full.dw)?, 0.0);
        Ok(())
    }

    #[test]
    fn strided_input_and_shape_errors() -> Result<()> {
        let cfg = Conv2dConfig {
            stride: 1,
            padding: 1,
        };
        // A transposed (non-contiguous) input is made contiguous first.
        let x = wave((2, 3, 6, 5), 0.2, DType::F32)?.transpose(2, 3)?;
        let w = wave((4, 3, 3, 3), 0.7, DType::F32)?;
        let fast = conv2d(&x, &w, cfg)?;
        let reference = x.conv2d(&w, 1, 1, 1, 1)?;
        assert!(rel_err(&fast, &reference)? < 1e-6);
        assert_eq!(fast.dims(), &[2, 4, 5, 6]);
        // Channel mismatch, zero stride, a kernel larger than the padded input.
        let w5 = wave((4, 5, 3, 3), 0.7, DType::F32)?;
        assert!(conv2d(&x, &w5, cfg).is_err());
        let zero = Conv2dConfig {
            stride: 0,
            padding: 0,
        };
        assert!(conv2d(&x, &w, zero).is_err());
        let big = wave((4, 3, 9, 9), 0.7, DType::F32)?;
        assert!(conv2d(&x, &big, cfg).is_err());
        // Other dtypes fall back to candle's conv.
        let xh = x.to_dtype(DType::F16)?;
        let wh = w.to_dtype(DType::F16)?;
        let bf = conv2d(&xh, &wh, cfg)?;
        assert!(rel_err(&bf, &reference)? < 2e-2);
        Ok(())
    }

    #[test]
    fn valid_range_matches_brute_force() {
        for out in 0..6 {
            for inp in 1..7 {
                for s in 1..4 {
                    for j in 0..4 {
                        for p in 0..3 {
                            let ok: Vec<usize> = (0..out)
                                .filter(|&o| s * o + j >= p && s * o + j - p < inp)
                                .collect();
                            let (lo, hi) = valid_range(out, inp, s, j, p);
                            assert_eq!((lo..hi).collect::<Vec<_>>(), ok, "{out} {inp} {s} {j} {p}");
                        }
                    }
                }
            }
        }
    }
}
