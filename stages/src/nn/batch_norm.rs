//! Fused CPU batch normalisation (+ ReLU) and residual add + ReLU: candle custom ops with exact
//! backward, replacing the ~10 elementwise candle ops (and ~30 in the backward) that
//! `candle_nn::BatchNorm` + `relu` cost per layer.
//!
//! # Math and shapes
//!
//! `x` (b, c, ...) is viewed as (b, c, l) with `l` the product of the trailing dimensions
//! (h·w for BatchNorm2d, 1 for BatchNorm1d); statistics are per channel over the
//! `m = b · l` values of that channel.
//!
//! ```text
//! train:  μ_c = mean x,  σ²_c = mean (x - μ_c)²  (biased),  inv_c = 1 / sqrt(σ²_c + eps)
//! eval:   μ_c = running_mean_c,                              inv_c = 1 / sqrt(running_var_c + eps)
//! y = γ_c · (x - μ_c) · inv_c + β_c,     out = relu(y) (if fused) or y
//! ```
//!
//! Backward, with `g = dout · [out > 0]` (or `dout` without ReLU) and `x̂ = (x - μ_c) · inv_c`:
//!
//! ```text
//! dβ_c = Σ g          dγ_c = Σ g · x̂
//! eval:   dx = γ_c · inv_c · g
//! train:  dx = γ_c · inv_c · (g - dβ_c / m - x̂ · dγ_c / m)   (μ and σ² depend on x)
//! ```
//!
//! The running statistics move exactly as torch's (and candle-nn's) in train mode:
//! `running_mean ← (1 - momentum) · running_mean + momentum · μ`,
//! `running_var ← (1 - momentum) · running_var + momentum · σ² · m / (m - 1)`.
//! Sums are accumulated in f64 over a fixed split of the batch, so results do not depend on
//! work stealing. The ReLU is torch's: NaN passes through, and the gradient flows where
//! `out > 0` (candle's own `relu` also passes it at exactly 0, which only matters on exact
//! zeros).
//!
//! [`add_relu`] is `relu(a + b)` (the end of a residual block) in one pass, whose backward
//! hands the same masked gradient to both arguments.
//!
//! Only what is needed is computed: no γ / β gradient when they are detached (an attack on a
//! frozen network), no input gradient when the input does not track one.
//!
//! # Devices and dtypes
//!
//! The fused ops run for CPU f32 / f64 tensors of rank ≥ 2 with an affine BN, and in a `cuda`
//! build for CUDA f32 ones (of at most 2^31 elements) through [`staged`], whose statistics and
//! coefficients stay on the GPU and whose passes are the kernels of `stages/cuda/batch_norm.cu`.
//! Anything else (f16, no affine, a CUDA f64) runs candle-nn's `BatchNorm` and candle's `relu`,
//! and [`KernelImpl::Candle`] (`PIPE_KERNELS=candle`) forces that path everywhere. Second-order
//! gradients are not supported (the backward is computed directly, without a graph).

use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, ModuleT, Result, Shape, Storage};
use candle::{Device, Tensor, Var, WithDType};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use crate::nn::conv::{KernelImpl, zeros};

#[cfg(feature = "cuda")]
mod kernels;
mod staged;

/// `bn(x)`, followed by a ReLU when `relu`, with batch statistics (and a running-statistics
/// update) when `train`: the fused CPU op where it applies, candle-nn's `BatchNorm` otherwise.
///
/// # Errors
/// On a channel-count mismatch or an input of rank < 2.
pub fn batch_norm(
    x: &Tensor,
    bn: &BatchNorm,
    train: bool,
    relu: bool,
    imp: KernelImpl,
) -> Result<Tensor> {
    let affine = bn.weight_and_bias();
    let fast = imp == KernelImpl::Fast
        && fused_for(x)
        && x.rank() >= 2
        && affine.is_some_and(|(w, b)| w.dtype() == x.dtype() && b.dtype() == x.dtype());
    let Some((gamma, beta)) = affine.filter(|_| fast) else {
        let y = bn.forward_t(x, train)?;
        return if relu { y.relu() } else { Ok(y) };
    };
    let dims = x.dims();
    let (b, c) = (dims[0], dims[1]);
    let l: usize = dims[2..].iter().product();
    let (rm, rv) = (bn.running_mean(), bn.running_var());
    if c != rm.dim(0)? || c != gamma.dim(0)? {
        candle::bail!(
            "batch-norm: input {:?} does not have {} channels",
            x.shape(),
            rm.dim(0)?
        )
    }
    if train && b * l < 2 {
        candle::bail!("batch-norm: train mode needs more than one value per channel")
    }
    let x = x.contiguous()?;
    let shape = Dims { b, c, l };
    if !x.device().is_cpu() {
        return staged::batch_norm(&x, bn, (gamma, beta), train, relu, shape);
    }
    let (mean, var) = if train {
        let (mean, var) = match x.dtype() {
            DType::F64 => with_slice(&x, |v: &[f64]| Ok(batch_stats(v, shape)))?,
            _ => with_slice(&x, |v: &[f32]| Ok(batch_stats(v, shape)))?,
        };
        update_running(bn, &mean, &var, b * l)?;
        (mean, var)
    } else {
        (to_f64(rm)?, to_f64(rv)?)
    };
    let eps = bn.eps();
    let inv_std = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let op = BnOp {
        shape,
        train,
        relu,
        mean,
        inv_std,
        gamma: to_f64(gamma)?,
        beta: to_f64(beta)?,
    };
    x.apply_op3(gamma, beta, op)
}

/// `relu(a + b)` for tensors of the same shape: one fused pass on CPU f32 / f64, candle's
/// `(a + b).relu()` otherwise.
///
/// # Errors
/// On a shape or dtype mismatch.
pub fn add_relu(a: &Tensor, b: &Tensor, imp: KernelImpl) -> Result<Tensor> {
    let fast = imp == KernelImpl::Fast
        && fused_for(a)
        && a.device().same_device(b.device())
        && a.dtype() == b.dtype()
        && a.shape() == b.shape();
    if !fast {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// Whether the fused ops take `t`: CPU f32 / f64, and in a `cuda` build CUDA f32 of at most
/// 2^31 elements (the kernels' 32-bit indices).
fn fused_for(t: &Tensor) -> bool {
    match t.device() {
        Device::Cpu => matches!(t.dtype(), DType::F32 | DType::F64),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => t.dtype() == DType::F32 && t.elem_count() <= kernels::MAX_ELEMS,
        _ => false,
    }
}

/// The (b, c, l) view of a BN input.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    c: usize,
    l: usize,
}

impl Dims {
    /// Elements per image.
    fn img(&self) -> usize {
        self.c * self.l
    }
}

/// A small tensor's values as f64.
fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// Runs `f` on the contiguous CPU data of `t`.
fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle::bail!("batch-norm: expected a CPU tensor")
    };
    f(slice_of(cpu.as_slice::<T>()?, layout)?)
}

/// The contiguous part of `v` that `l` addresses.
fn slice_of<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle::bail!("batch-norm: expected a contiguous tensor"),
    }
}

/// Sums `per_image(img, acc)` over the images into `k` f64 accumulators per channel: a fixed
/// contiguous split of the batch (one group per thread), groups added in order.
fn channel_sums(d: Dims, k: usize, per_image: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let groups = d.b.min(rayon::current_num_threads()).max(1);
    let per_group = d.b.div_ceil(groups);
    let parts: Vec<Vec<f64>> = (0..groups)
        .into_par_iter()
        .map(|gi| {
            let mut acc = vec![0.0; k * d.c];
            for img in gi * per_group..((gi + 1) * per_group).min(d.b) {
                per_image(img, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0; k * d.c];
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Accumulator lanes of the f64 sums: independent chains the compiler can vectorise (one
/// chain would be bound by the latency of each addition).
const LANES: usize = 8;

/// `(Σ (x - shift), Σ (x - shift)²)` in f64, in [`LANES`] interleaved partial sums added in a
/// fixed order.
fn moments<T: WithDType>(xs: &[T], shift: f64) -> (f64, f64) {
    let (chunks, rest) = xs.as_chunks::<LANES>();
    let (mut s1, mut s2) = ([0.0f64; LANES], [0.0f64; LANES]);
    for c in chunks {
        for l in 0..LANES {
            let v = c[l].to_f64() - shift;
            s1[l] += v;
            s2[l] += v * v;
        }
    }
    for (l, v) in rest.iter().enumerate() {
        let v = v.to_f64() - shift;
        s1[l] += v;
        s2[l] += v * v;
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// `(Σ g, Σ g · (x - μ))` in f64 with `g = dout · [out > 0]` (or `dout` without ReLU), in
/// [`LANES`] interleaved partial sums added in a fixed order.
fn grad_sums<T: WithDType>(x: &[T], out: &[T], dout: &[T], mu: f64, relu: bool) -> (f64, f64) {
    let (xc, xr) = x.as_chunks::<LANES>();
    let (oc, or) = out.as_chunks::<LANES>();
    let (gc, gr) = dout.as_chunks::<LANES>();
    let (mut s1, mut s2) = ([0.0f64; LANES], [0.0f64; LANES]);
    let mask = |o: T, g: T| {
        if relu && o <= T::zero() {
            0.0
        } else {
            g.to_f64()
        }
    };
    for ((xa, oa), ga) in xc.iter().zip(oc).zip(gc) {
        for l in 0..LANES {
            let g = mask(oa[l], ga[l]);
            s1[l] += g;
            s2[l] += g * (xa[l].to_f64() - mu);
        }
    }
    for (l, ((xv, ov), gv)) in xr.iter().zip(or).zip(gr).enumerate() {
        let g = mask(*ov, *gv);
        s1[l] += g;
        s2[l] += g * (xv.to_f64() - mu);
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// Per-channel batch mean and biased variance (one pass, f64 sums).
fn batch_stats<T: WithDType>(x: &[T], d: Dims) -> (Vec<f64>, Vec<f64>) {
    let m = (d.b * d.l) as f64;
    // One pass, shifted by a value of each channel (its first one): with s1 = Σ (x - K) and
    // s2 = Σ (x - K)², σ² = s2 / m - (s1 / m)², which loses nothing to cancellation as long as
    // |μ - K| is a few σ, as it is for a sample of the channel.
    let shift: Vec<f64> = x[..d.img()]
        .chunks_exact(d.l)
        .map(|xc| xc[0].to_f64())
        .collect();
    let sums = channel_sums(d, 2, |img, acc| {
        let xi = &x[img * d.img()..(img + 1) * d.img()];
        for ((a, xc), k) in acc
            .chunks_exact_mut(2)
            .zip(xi.chunks_exact(d.l))
            .zip(&shift)
        {
            let (s1, s2) = moments(xc, *k);
            a[0] += s1;
            a[1] += s2;
        }
    });
    let (mut mean, mut var) = (Vec::with_capacity(d.c), Vec::with_capacity(d.c));
    for (s, k) in sums.chunks_exact(2).zip(&shift) {
        let (m1, m2) = (s[0] / m, s[1] / m);
        mean.push(k + m1);
        var.push((m2 - m1 * m1).max(0.0));
    }
    (mean, var)
}

/// `scale_c · x + shift_c` per channel `c`, then a ReLU when `relu` (NaN passes).
fn apply_pass<T: WithDType>(x: &[T], coef: &[(T, T)], d: Dims, relu: bool) -> Vec<T> {
    let mut y = zeros(x.len(), T::zero());
    y.par_chunks_mut(d.img())
        .zip(x.par_chunks(d.img()))
        .for_each(|(yi, xi)| {
            for ((yc, xc), &(s, t)) in yi.chunks_exact_mut(d.l).zip(xi.chunks_exact(d.l)).zip(coef)
            {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    let r = v * s + t;
                    *o = if relu && r <= T::zero() { T::zero() } else { r };
                }
            }
        });
    y
}

/// `Σ g` and `Σ g · (x - μ_c)` per channel, interleaved (`[Σ g, Σ g (x - μ)]` for channel 0,
/// then 1, ...), with `g = dout · [out > 0]` (or `dout` without ReLU): the parameter gradients
/// and the batch-statistics terms of a train-mode dx.
fn grad_channel_sums<T: WithDType>(
    x: &[T],
    out: &[T],
    dout: &[T],
    mean: &[f64],
    d: Dims,
    relu: bool,
) -> Vec<f64> {
    channel_sums(d, 2, |img, acc| {
        let r = img * d.img()..(img + 1) * d.img();
        let (xi, oi, gi) = (&x[r.clone()], &out[r.clone()], &dout[r]);
        for (c, &mu) in mean.iter().enumerate() {
            let cr = c * d.l..(c + 1) * d.l;
            let (xc, oc, gc) = (&xi[cr.clone()], &oi[cr.clone()], &gi[cr]);
            let (sg, sgx) = grad_sums(xc, oc, gc, mu, relu);
            acc[2 * c] += sg;
            acc[2 * c + 1] += sgx;
        }
    })
}

/// `dx = k1_c · g + (k2_c · x + k3_c)` in train mode, `k1_c · g` in eval mode (which does not
/// read x), with `g` as in [`grad_channel_sums`].
fn dx_pass<T: WithDType>(
    x: &[T],
    out: &[T],
    dout: &[T],
    coef: &[(T, T, T)],
    d: Dims,
    relu: bool,
    train: bool,
) -> Vec<T> {
    let grad = |o: T, g: T| {
        if relu && o <= T::zero() { T::zero() } else { g }
    };
    let mut dx = zeros(x.len(), T::zero());
    dx.par_chunks_mut(d.img())
        .enumerate()
        .for_each(|(img, dxi)| {
            let r = img * d.img()..(img + 1) * d.img();
            let (xi, oi, gi) = (&x[r.clone()], &out[r.clone()], &dout[r]);
            for (c, &(k1, k2, k3)) in coef.iter().enumerate() {
                let cr = c * d.l..(c + 1) * d.l;
                let (dxc, oc, gc) = (&mut dxi[cr.clone()], &oi[cr.clone()], &gi[cr.clone()]);
                if train {
                    for (((o, &xv), &ov), &gv) in dxc.iter_mut().zip(&xi[cr]).zip(oc).zip(gc) {
                        *o = k1 * grad(ov, gv) + (k2 * xv + k3);
                    }
                } else {
                    for ((o, &ov), &gv) in dxc.iter_mut().zip(oc).zip(gc) {
                        *o = k1 * grad(ov, gv);
                    }
                }
            }
        });
    dx
}

/// torch's running-statistics update from the batch mean and biased variance over `m` values.
fn update_running(bn: &BatchNorm, mean: &[f64], var: &[f64], m: usize) -> Result<()> {
    let mom = bn.momentum();
    let unbias = m as f64 / (m as f64 - 1.0);
    for (t, batch, scale) in [
        (bn.running_mean(), mean, 1.0),
        (bn.running_var(), var, unbias),
    ] {
        let old = to_f64(t)?;
        let new: Vec<f64> = old
            .iter()
            .zip(batch)
            .map(|(o, v)| (1.0 - mom) * o + mom * v * scale)
            .collect();
        let new = Tensor::from_vec(new, t.shape(), t.device())?.to_dtype(t.dtype())?;
        // The running statistics are `Var`s of the BN (and of the VarMap): `from_tensor` on a
        // variable's tensor shares its storage, so `set` updates them in place.
        Var::from_tensor(t)?.set(&new)?;
    }
    Ok(())
}

/// `(dγ, dβ)` when asked for.
type ParamGrads<T> = Option<(Vec<T>, Vec<T>)>;

/// The fused BN (+ ReLU) forward on (x, γ, β); the statistics it normalises with are fixed
/// when the op is built (batch statistics in train mode, running ones in eval mode).
struct BnOp {
    shape: Dims,
    train: bool,
    relu: bool,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
}

impl BnOp {
    /// Per-channel `(scale, shift)` with `y = scale · x + shift`.
    fn affine<T: WithDType>(&self) -> Vec<(T, T)> {
        (0..self.shape.c)
            .map(|c| {
                let scale = self.gamma[c] * self.inv_std[c];
                (
                    T::from_f64(scale),
                    T::from_f64(self.beta[c] - self.mean[c] * scale),
                )
            })
            .collect()
    }

    fn forward<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        apply_pass(x, &self.affine::<T>(), self.shape, self.relu)
    }

    /// `(dx, dγ, dβ)`, each only when asked for.
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        out: &[T],
        dout: &[T],
        want_dx: bool,
        want_params: bool,
    ) -> (Option<Vec<T>>, ParamGrads<T>) {
        let d = self.shape;
        let relu = self.relu;
        // Σ g and Σ g · (x - μ) per channel: the parameter gradients, and the batch-statistics
        // terms of a train-mode dx.
        let sums = (want_params || (want_dx && self.train))
            .then(|| grad_channel_sums(x, out, dout, &self.mean, d, relu));
        let params = match (&sums, want_params) {
            (Some(s), true) => {
                let dgamma = (0..d.c)
                    .map(|c| T::from_f64(s[2 * c + 1] * self.inv_std[c]))
                    .collect();
                let dbeta = (0..d.c).map(|c| T::from_f64(s[2 * c])).collect();
                Some((dgamma, dbeta))
            }
            _ => None,
        };
        if !want_dx {
            return (None, params);
        }
        // dx = k1 · g + k2 · x + k3 per channel.
        let m = (d.b * d.l) as f64;
        let coef: Vec<(T, T, T)> = (0..d.c)
            .map(|c| {
                let k1 = self.gamma[c] * self.inv_std[c];
                match &sums {
                    Some(s) if self.train => {
                        let (sg, sgx) = (s[2 * c], s[2 * c + 1]);
                        let k2 = -k1 * self.inv_std[c] * self.inv_std[c] * sgx / m;
                        let k3 = -k1 * sg / m - k2 * self.mean[c];
                        (T::from_f64(k1), T::from_f64(k2), T::from_f64(k3))
                    }
                    _ => (T::from_f64(k1), T::zero(), T::zero()),
                }
            })
            .collect();
        let dx = dx_pass(x, out, dout, &coef, d, relu, self.train);
        (Some(dx), params)
    }

    fn bwd_typed<T: WithDType>(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_dx = x.track_op();
        let want_params = gamma.track_op() || beta.track_op();
        let dout = dout.contiguous()?;
        let (dx, params) = with_slice(x, |xs: &[T]| {
            with_slice(out, |os: &[T]| {
                with_slice(&dout, |gs: &[T]| {
                    Ok(self.backward(xs, os, gs, want_dx, want_params))
                })
            })
        })?;
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let (dgamma, dbeta) = match params {
            Some((dg, db)) => (
                gamma
                    .track_op()
                    .then(|| Tensor::from_vec(dg, gamma.shape(), dev))
                    .transpose()?,
                beta.track_op()
                    .then(|| Tensor::from_vec(db, beta.shape(), dev))
                    .transpose()?,
            ),
            None => (None, None),
        };
        Ok((dx, dgamma, dbeta))
    }
}

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        "pipe-batch-norm"
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
        let y = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward(slice_of(v, l1)?)),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward(slice_of(v, l1)?)),
            other => candle::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match x.dtype() {
            DType::F64 => self.bwd_typed::<f64>(x, gamma, beta, out, dout),
            _ => self.bwd_typed::<f32>(x, gamma, beta, out, dout),
        }
    }
}

/// `relu(a + b)` on two contiguous tensors of one shape.
struct AddRelu;

impl AddRelu {
    fn forward<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
        // `collect_into_vec` writes each element once, in parallel, into the new buffer.
        let mut y = Vec::with_capacity(a.len());
        a.par_iter()
            .zip(b)
            .with_min_len(MIN_LEN)
            .map(|(&u, &v)| {
                let r = u + v;
                if r <= T::zero() { T::zero() } else { r }
            })
            .collect_into_vec(&mut y);
        y
    }
}

/// `dout · [out > 0]`: the gradient through a ReLU output `out` (no backward of its own).
struct ReluGrad;

impl ReluGrad {
    fn forward<T: WithDType>(out: &[T], dout: &[T]) -> Vec<T> {
        let mut g = Vec::with_capacity(out.len());
        out.par_iter()
            .zip(dout)
            .with_min_len(MIN_LEN)
            .map(|(&o, &d)| if o <= T::zero() { T::zero() } else { d })
            .collect_into_vec(&mut g);
        g
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "pipe-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        elementwise2(
            self.name(),
            (s1, l1),
            (s2, l2),
            Self::forward,
            Self::forward,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        Ok((kernels::relu_grad(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

/// An elementwise CPU forward of two contiguous f32 or f64 storages of one shape.
fn elementwise2(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_op: fn(&[f32], &[f32]) -> Vec<f32>,
    f64_op: fn(&[f64], &[f64]) -> Vec<f64>,
) -> Result<(CpuStorage, Shape)> {
    let out = match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(f32_op(slice_of(a, l1)?, slice_of(b, l2)?))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(f64_op(slice_of(a, l1)?, slice_of(b, l2)?))
        }
        _ => candle::bail!("{name}: unsupported dtypes"),
    };
    Ok((out, l1.shape().clone()))
}

/// Elements per parallel task (at least) of the elementwise passes.
const MIN_LEN: usize = 16 * 1024;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "pipe-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        elementwise2(
            self.name(),
            (s1, l1),
            (s2, l2),
            Self::forward,
            Self::forward,
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        Ok((kernels::add_relu(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = out.apply_op2_no_bwd(&dout.contiguous()?, &ReluGrad)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    /// A deterministic tensor: `scale · sin(0.37 i + phase) + shift` over the flat index.
    fn wave(dims: &[usize], phase: f64, scale: f64, shift: f64, dtype: DType) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| scale * (0.37 * i as f64 + phase).sin() + shift)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
    }

    /// A BN over `c` channels with non-trivial affine parameters and running statistics.
    fn make_bn(c: usize, dtype: DType) -> Result<(BatchNorm, Var, Var)> {
        let gamma = Var::from_tensor(&wave(&[c], 0.3, 0.5, 1.0, dtype)?)?;
        let beta = Var::from_tensor(&wave(&[c], 1.1, 0.4, 0.1, dtype)?)?;
        let bn = BatchNorm::new_with_momentum(
            c,
            wave(&[c], 2.0, 0.3, 0.2, dtype)?,
            wave(&[c], 0.7, 0.2, 1.1, dtype)?,
            gamma.as_tensor().clone(),
            beta.as_tensor().clone(),
            1e-5,
            0.1,
        )?;
        Ok((bn, gamma, beta))
    }

    /// max |a - b| / max(max |b|, 1e-30).
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_dtype(DType::F64)?;
        let b = b.to_dtype(DType::F64)?;
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
        Ok(diff / scale.max(1e-30))
    }

    /// Output, gradients (x, γ, β) of `sum(bn(x) · r)` and the running statistics after it.
    fn run(
        dims: &[usize],
        train: bool,
        relu: bool,
        dtype: DType,
        imp: KernelImpl,
    ) -> Result<Vec<Tensor>> {
        run_with(dims, dtype, |x, bn| batch_norm(x, bn, train, relu, imp))
    }

    /// [`run`] with the forward `bn_fwd(x, bn)`.
    fn run_with(
        dims: &[usize],
        dtype: DType,
        bn_fwd: impl Fn(&Tensor, &BatchNorm) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let (bn, gamma, beta) = make_bn(dims[1], dtype)?;
        // Mean 0.3 and a spread of 2 so that the variance term matters.
        let x = Var::from_tensor(&wave(dims, 0.1, 2.0, 0.3, dtype)?)?;
        let y = bn_fwd(x.as_tensor(), &bn)?;
        let r = wave(y.dims(), 2.9, 1.0, 0.2, dtype)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let get = |t: &Tensor| {
            grads
                .get(t)
                .cloned()
                .ok_or_else(|| candle::Error::Msg("missing gradient".into()))
        };
        Ok(vec![
            y.clone(),
            get(x.as_tensor())?,
            get(gamma.as_tensor())?,
            get(beta.as_tensor())?,
            bn.running_mean().clone(),
            bn.running_var().clone(),
        ])
    }

    fn check_against_candle(dtype: DType, tol: f64) -> Result<()> {
        let names = ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"];
        for dims in [&[3, 5, 7, 7][..], &[1, 17, 9, 6], &[6, 5], &[4, 3, 5]] {
            for train in [true, false] {
                for relu in [false, true] {
                    let fast = run(dims, train, relu, dtype, KernelImpl::Fast)?;
                    let reference = run(dims, train, relu, dtype, KernelImpl::Candle)?;
                    for ((name, a), b) in names.iter().zip(&fast).zip(&reference) {
                        let e = rel_err(a, b)?;
                        assert!(e <= tol, "{dims:?} train={train} relu={relu} {name}: {e:e}");
                    }
                    // The running statistics moved in train mode only.
                    let fresh = make_bn(dims[1], dtype)?.0;
                    let moved = rel_err(&fast[4], fresh.running_mean())? > 1e-3;
                    assert_eq!(moved, train, "{dims:?}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn f32_agrees_with_candle_batch_norm_and_relu() -> Result<()> {
        check_against_candle(DType::F32, 2e-5)
    }

    #[test]
    fn f64_agrees_with_candle_batch_norm_and_relu() -> Result<()> {
        check_against_candle(DType::F64, 1e-12)
    }

    /// The device-resident path (what CUDA runs), here with its CPU twins: the same numbers as
    /// the fused CPU op, bit for bit, since it does the same operations in the same order. A
    /// slip in its coefficient algebra or in which tensor goes to which op shows here.
    #[test]
    fn the_staged_path_computes_what_the_fused_cpu_op_does() -> Result<()> {
        let names = ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"];
        for dims in [&[3, 5, 7, 7][..], &[1, 17, 9, 6], &[6, 5], &[4, 3, 5]] {
            for train in [true, false] {
                for relu in [false, true] {
                    let fused = run(dims, train, relu, DType::F32, KernelImpl::Fast)?;
                    let staged = run_with(dims, DType::F32, |x, bn| {
                        let (gamma, beta) = bn
                            .weight_and_bias()
                            .ok_or_else(|| candle::Error::Msg("affine".into()))?;
                        let d = Dims {
                            b: dims[0],
                            c: dims[1],
                            l: dims[2..].iter().product(),
                        };
                        staged::batch_norm(x, bn, (gamma, beta), train, relu, d)
                    })?;
                    for ((name, a), b) in names.iter().zip(&staged).zip(&fused) {
                        let same = a.flatten_all()?.to_vec1::<f32>()?
                            == b.flatten_all()?.to_vec1::<f32>()?;
                        assert!(same, "{dims:?} train={train} relu={relu} {name}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn f64_train_gradient_matches_central_differences() -> Result<()> {
        let dims = [3, 2, 2, 3];
        let (bn, _, _) = make_bn(2, DType::F64)?;
        let x0 = wave(&dims, 0.1, 2.0, 0.3, DType::F64)?;
        let r = wave(&dims, 2.9, 1.0, 0.2, DType::F64)?;
        // Each loss evaluation updates the running statistics; they do not enter a train
        // forward, so the loss is a function of x alone.
        let loss = |x: &Tensor| -> Result<f64> {
            (batch_norm(x, &bn, true, true, KernelImpl::Fast)? * &r)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let x = Var::from_tensor(&x0)?;
        let y = batch_norm(x.as_tensor(), &bn, true, true, KernelImpl::Fast)?;
        let grads = (y * &r)?.sum_all()?.backward()?;
        let dx = grads
            .get(x.as_tensor())
            .ok_or_else(|| candle::Error::Msg("missing dx".into()))?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = x0.flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-6;
        for (i, g) in dx.iter().enumerate() {
            let bump = |d: f64| -> Result<Tensor> {
                let mut v = base.clone();
                v[i] += d;
                Tensor::from_vec(v, &dims[..], &Device::Cpu)
            };
            let fd = (loss(&bump(eps)?)? - loss(&bump(-eps)?)?) / (2.0 * eps);
            assert!((fd - g).abs() < 1e-7, "{i}: fd {fd} vs {g}");
        }
        assert!(dx.iter().any(|g| g.abs() > 0.1));
        Ok(())
    }

    #[test]
    fn detached_affine_gets_no_gradient_and_same_dx() -> Result<()> {
        let dims = [3, 5, 4, 4];
        let full = run(&dims, false, true, DType::F32, KernelImpl::Fast)?;
        let (bn, gamma, beta) = make_bn(5, DType::F32)?;
        let (w, b) = bn
            .weight_and_bias()
            .ok_or_else(|| candle::Error::Msg("affine".into()))?;
        let frozen = BatchNorm::new_with_momentum(
            5,
            bn.running_mean().clone(),
            bn.running_var().clone(),
            w.detach(),
            b.detach(),
            1e-5,
            0.1,
        )?;
        let x = Var::from_tensor(&wave(&dims, 0.1, 2.0, 0.3, DType::F32)?)?;
        let y = batch_norm(x.as_tensor(), &frozen, false, true, KernelImpl::Fast)?;
        let r = wave(&dims, 2.9, 1.0, 0.2, DType::F32)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        assert!(grads.get(gamma.as_tensor()).is_none());
        assert!(grads.get(beta.as_tensor()).is_none());
        let dx = grads
            .get(x.as_tensor())
            .ok_or_else(|| candle::Error::Msg("missing dx".into()))?;
        assert_eq!(rel_err(dx, &full[1])?, 0.0);
        assert_eq!(rel_err(&y, &full[0])?, 0.0);
        Ok(())
    }

    #[test]
    fn add_relu_agrees_with_candle() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let run = |imp: KernelImpl| -> Result<Vec<Tensor>> {
                // 0.37 · i steps keep a + b away from exact zeros.
                let a = Var::from_tensor(&wave(&[3, 5, 7, 7], 0.1, 1.0, 0.0, dtype)?)?;
                let b = Var::from_tensor(&wave(&[3, 5, 7, 7], 1.7, 0.8, 0.1, dtype)?)?;
                let y = add_relu(a.as_tensor(), b.as_tensor(), imp)?;
                let r = wave(y.dims(), 2.9, 1.0, 0.2, dtype)?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                let get = |t: &Tensor| {
                    grads
                        .get(t)
                        .cloned()
                        .ok_or_else(|| candle::Error::Msg("missing gradient".into()))
                };
                Ok(vec![y.clone(), get(a.as_tensor())?, get(b.as_tensor())?])
            };
            let fast = run(KernelImpl::Fast)?;
            let reference = run(KernelImpl::Candle)?;
            for (a, b) in fast.iter().zip(&reference) {
                assert_eq!(rel_err(a, b)?, 0.0);
            }
            // Some outputs are clipped, some are not.
            let y = fast[0]
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.5));
        }
        Ok(())
    }

    #[test]
    fn one_pass_statistics_survive_a_large_offset() -> Result<()> {
        // Values 1000 ± 2: the batch variance (~2) is ~1e-6 of the mean square, which the
        // one-pass (shifted) sums must keep.
        let dims = [4, 3, 5, 5];
        let x64 = wave(&dims, 0.1, 2.0, 1000.0, DType::F64)?;
        let (bn64, _, _) = make_bn(3, DType::F64)?;
        let want = batch_norm(&x64, &bn64, true, false, KernelImpl::Candle)?;
        let (bn32, _, _) = make_bn(3, DType::F32)?;
        let got = batch_norm(
            &x64.to_dtype(DType::F32)?,
            &bn32,
            true,
            false,
            KernelImpl::Fast,
        )?;
        assert!(rel_err(&got, &want)? < 1e-4, "{}", rel_err(&got, &want)?);
        assert!(rel_err(bn32.running_var(), bn64.running_var())? < 1e-5);
        assert!(rel_err(bn32.running_mean(), bn64.running_mean())? < 1e-6);
        Ok(())
    }

    #[test]
    fn shape_errors() -> Result<()> {
        let (bn, _, _) = make_bn(5, DType::F32)?;
        let x = wave(&[2, 4, 3, 3], 0.1, 1.0, 0.0, DType::F32)?;
        assert!(batch_norm(&x, &bn, true, false, KernelImpl::Fast).is_err());
        let one = wave(&[1, 5], 0.1, 1.0, 0.0, DType::F32)?;
        assert!(batch_norm(&one, &bn, true, false, KernelImpl::Fast).is_err());
        assert!(batch_norm(&one, &bn, false, false, KernelImpl::Fast).is_ok());
        Ok(())
    }
}
