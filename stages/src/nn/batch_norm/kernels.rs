//! Launches of `stages/cuda/batch_norm.cu` (compiled to PTX by `stages/build.rs` in a `cuda`
//! build): the CUDA forwards of the fused batch norm's ops. Every kernel runs 256-thread
//! blocks on candle's stream, so it is ordered with the ops around it like any candle kernel.
//!
//! Inputs are contiguous f32 tensors of at most [`MAX_ELEMS`] elements (the kernels index in
//! 32 bits); the callers check both before choosing this path.

// Kernel launches are `unsafe` (FFI with a raw argument list): each one below passes exactly
// the arguments its `extern "C"` signature in batch_norm.cu declares, in order and type.
#![allow(unsafe_code)]

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{CudaDevice, CudaStorage, Layout, Result, Storage, Tensor};

use super::Dims;

/// The PTX of `stages/cuda/batch_norm.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/batch_norm.ptx"));

/// `BN_THREADS` of batch_norm.cu.
const THREADS: u32 = 256;

/// The largest tensor the kernels take (their indices and grid-stride steps are 32-bit).
pub(super) const MAX_ELEMS: usize = 1 << 31;

/// Blocks of an elementwise (grid-stride) launch over `n` values.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 8192) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The (channel, part) grid of a per-channel reduction over `b · l` values per channel: about
/// 16K values a block, and at most about 1024 blocks in all.
fn per_channel(d: Dims) -> (LaunchConfig, u32) {
    let by_size = (d.b * d.l).div_ceil(16 * 1024).max(1);
    let parts = by_size.min((1024 / d.c).max(1)) as u32;
    let cfg = LaunchConfig {
        grid_dim: (d.c as u32, parts, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, parts)
}

/// One thread per channel.
fn per_channel_threads(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The 32-bit sizes of `d` and its element count.
fn sizes(d: Dims) -> (u32, u32, u32, u32) {
    (d.b as u32, d.c as u32, d.l as u32, (d.b * d.c * d.l) as u32)
}

/// The kernel `name` of [`PTX`] (loaded once per device; candle's `CudaFunc` cannot be named
/// outside candle, hence a macro).
macro_rules! func {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func($name, "pipe_batch_norm", PTX)
    };
}

/// The contiguous f32 / f64 data of a storage under `layout`.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle::bail!("batch-norm (cuda): expected a contiguous tensor")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The f32 data of (x, out, dout).
fn views3<'a>(
    (x, lx): (&'a CudaStorage, &Layout),
    (out, lo): (&'a CudaStorage, &Layout),
    (dout, ld): (&'a CudaStorage, &Layout),
) -> Result<(CudaView<'a, f32>, CudaView<'a, f32>, CudaView<'a, f32>)> {
    Ok((view(x, lx)?, view(out, lo)?, view(dout, ld)?))
}

/// Runs `f` on the CUDA data of a small tensor the op holds (coefficients, the mean).
fn with_tensor<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle::bail!("batch-norm (cuda): a coefficient tensor is not on the GPU")
    };
    f(view::<T>(s, layout)?)
}

/// A new device buffer of `n` values, each written by the kernel that follows.
fn output<T: candle::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the launch that follows before anything reads it
    // (the kernels write each output index exactly once, the reductions every (channel, part)).
    unsafe { dev.alloc::<T>(n) }
}

/// `(2, c)` f64: each channel's batch mean, then its biased variance.
pub(super) fn moments(x: &CudaStorage, lx: &Layout, d: Dims) -> Result<CudaStorage> {
    let dev = x.device();
    let xs = view::<f32>(x, lx)?;
    let (b, c, l, _) = sizes(d);
    let (cfg, parts) = per_channel(d);
    let part = output::<f64>(dev, d.c * parts as usize * 2)?;
    let f = func!(dev, "bn_moments_partial")?;
    let mut a = f.builder();
    a.arg(&xs).arg(&b).arg(&c).arg(&l).arg(&part);
    // SAFETY: bn_moments_partial(const float*, u32, u32, u32, double*) on a (c, parts) grid.
    unsafe { a.launch(cfg) }.w()?;
    let out = output::<f64>(dev, 2 * d.c)?;
    let m = (d.b * d.l) as f64;
    let f = func!(dev, "bn_moments_finalize")?;
    let mut a = f.builder();
    a.arg(&part)
        .arg(&xs)
        .arg(&c)
        .arg(&l)
        .arg(&parts)
        .arg(&m)
        .arg(&out);
    // SAFETY: bn_moments_finalize(const double*, const float*, u32, u32, u32, double, double*).
    unsafe { a.launch(per_channel_threads(d.c)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `y = coef[0, c] · x + coef[1, c]` per channel, then a ReLU when `relu`.
pub(super) fn apply(
    x: &CudaStorage,
    lx: &Layout,
    coef: &Tensor,
    d: Dims,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = x.device();
    let xs = view::<f32>(x, lx)?;
    let (_, c, l, n) = sizes(d);
    let y = output::<f32>(dev, n as usize)?;
    with_tensor::<f32, _>(coef, |coef| {
        let f = func!(dev, "bn_apply")?;
        let mut a = f.builder();
        let relu = i32::from(relu);
        a.arg(&xs)
            .arg(&coef)
            .arg(&n)
            .arg(&c)
            .arg(&l)
            .arg(&relu)
            .arg(&y);
        // SAFETY: bn_apply(const float*, const float*, u32, u32, u32, int, float*).
        unsafe { a.launch(elementwise(n as usize)) }.w()?;
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// `(2, c)` f64: `Σ g` then `Σ g · (x - mean_c)` per channel.
#[allow(clippy::too_many_arguments)]
pub(super) fn grad_sums(
    (x, lx): (&CudaStorage, &Layout),
    (out, lo): (&CudaStorage, &Layout),
    (dout, ld): (&CudaStorage, &Layout),
    mean: &Tensor,
    d: Dims,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = x.device();
    let (xs, os, gs) = views3((x, lx), (out, lo), (dout, ld))?;
    let (b, c, l, _) = sizes(d);
    let (cfg, parts) = per_channel(d);
    let part = output::<f64>(dev, d.c * parts as usize * 2)?;
    with_tensor::<f64, _>(mean, |mean| {
        let f = func!(dev, "bn_grad_partial")?;
        let mut a = f.builder();
        let relu = i32::from(relu);
        a.arg(&xs).arg(&os).arg(&gs).arg(&mean);
        a.arg(&b).arg(&c).arg(&l).arg(&relu).arg(&part);
        // SAFETY: bn_grad_partial(const float* x3, const double*, u32, u32, u32, int, double*)
        // on a (c, parts) grid.
        unsafe { a.launch(cfg) }.w()?;
        Ok(())
    })?;
    let sums = output::<f64>(dev, 2 * d.c)?;
    let f = func!(dev, "bn_sum_partials")?;
    let mut a = f.builder();
    a.arg(&part).arg(&c).arg(&parts).arg(&sums);
    // SAFETY: bn_sum_partials(const double*, u32, u32, double*).
    unsafe { a.launch(per_channel_threads(d.c)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(sums, dev.clone()))
}

/// `dx` from `coef = [k1, k2, k3]` (3, c) f32 (see batch_norm.cu's `bn_dx`).
pub(super) fn dx(
    (x, lx): (&CudaStorage, &Layout),
    (out, lo): (&CudaStorage, &Layout),
    (dout, ld): (&CudaStorage, &Layout),
    coef: &Tensor,
    d: Dims,
    (relu, train): (bool, bool),
) -> Result<CudaStorage> {
    let dev = x.device();
    let (xs, os, gs) = views3((x, lx), (out, lo), (dout, ld))?;
    let (_, c, l, n) = sizes(d);
    let dx = output::<f32>(dev, n as usize)?;
    with_tensor::<f32, _>(coef, |coef| {
        let f = func!(dev, "bn_dx")?;
        let mut a = f.builder();
        let (relu, train) = (i32::from(relu), i32::from(train));
        a.arg(&xs).arg(&os).arg(&gs).arg(&coef);
        a.arg(&n).arg(&c).arg(&l).arg(&relu).arg(&train).arg(&dx);
        // SAFETY: bn_dx(const float* x4, u32, u32, u32, int, int, float*).
        unsafe { a.launch(elementwise(n as usize)) }.w()?;
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

/// An elementwise kernel `name(const float*, const float*, u32 n, float*)` over two tensors of
/// one shape.
fn binary(
    name: &str,
    (a, la): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = a.device();
    let (av, bv) = (view::<f32>(a, la)?, view::<f32>(b, lb)?);
    let n = la.shape().elem_count();
    if n != lb.shape().elem_count() || n > MAX_ELEMS {
        candle::bail!("{name} (cuda): sizes {n} and {}", lb.shape().elem_count())
    }
    let y = output::<f32>(dev, n)?;
    let n32 = n as u32;
    let f = func!(dev, name)?;
    let mut args = f.builder();
    args.arg(&av).arg(&bv).arg(&n32).arg(&y);
    // SAFETY: add_relu / relu_grad(const float*, const float*, u32, float*).
    unsafe { args.launch(elementwise(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// `max(a + b, 0)`.
pub(super) fn add_relu(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<CudaStorage> {
    binary("add_relu", (a, la), (b, lb))
}

/// `dout · [out > 0]`.
pub(super) fn relu_grad(
    out: &CudaStorage,
    lo: &Layout,
    dout: &CudaStorage,
    ld: &Layout,
) -> Result<CudaStorage> {
    binary("relu_grad", (out, lo), (dout, ld))
}
