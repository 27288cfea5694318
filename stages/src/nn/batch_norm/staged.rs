//! The fused batch norm (+ ReLU) with everything on the tensor's device: the path CUDA f32
//! takes (see the parent module for the maths).
//!
//! The CPU path computes the per-channel statistics and coefficients on the host, which on a
//! GPU would be a synchronisation per layer. Here they stay device tensors: a reduction op
//! gives the batch moments, small candle ops on (c)-sized f64 tensors give the coefficients and
//! the running-statistics update, and the elementwise passes read them on the device. Four ops
//! do the work, each with a CUDA forward (`stages/cuda/batch_norm.cu` through [`super::kernels`])
//! and a CPU twin built from the CPU path's own passes, so that this orchestration (the
//! coefficient algebra, which op gets which tensor) is tested on the CPU against the fused CPU
//! op, and the kernels against the same maths in an emulation (`cuda_kernels_emulated`).
//!
//! Traffic per layer: forward two reads and a write (moments, then apply); backward three
//! reads (the gradient sums) and three reads and a write (dx), against about sixteen passes
//! forward (its transposed copies included) and some thirty backward for candle-nn's
//! `BatchNorm` + `relu`.

use candle::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, Var};
use candle_nn::BatchNorm;

use super::{Dims, apply_pass, batch_stats, dx_pass, grad_channel_sums, slice_of};

/// `bn(x)` (+ ReLU) for a contiguous f32 `x` viewed as `shape`, with batch statistics and a
/// running-statistics update when `train`.
pub(super) fn batch_norm(
    x: &Tensor,
    bn: &BatchNorm,
    (gamma, beta): (&Tensor, &Tensor),
    train: bool,
    relu: bool,
    shape: Dims,
) -> Result<Tensor> {
    let f64_of = |t: &Tensor| t.detach().to_dtype(DType::F64);
    let (mean, var) = if train {
        let mv = x.apply_op1_no_bwd(&Moments { shape })?;
        let (mean, var) = (mv.get(0)?, mv.get(1)?);
        update_running(bn, &mean, &var, shape.b * shape.l)?;
        (mean, var)
    } else {
        (f64_of(bn.running_mean())?, f64_of(bn.running_var())?)
    };
    // As the CPU path: inv = 1 / sqrt(σ² + eps), scale = γ · inv, shift = β - μ · scale.
    let inv_std = (var + bn.eps())?.sqrt()?.recip()?;
    let gamma64 = f64_of(gamma)?;
    let scale = (&gamma64 * &inv_std)?;
    let shift = (f64_of(beta)? - (&mean * &scale)?)?;
    let coef = Tensor::stack(&[scale, shift], 0)?.to_dtype(DType::F32)?;
    let op = StagedBn {
        shape,
        train,
        relu,
        mean,
        inv_std,
        gamma: gamma64,
        coef,
    };
    x.apply_op3(gamma, beta, op)
}

/// torch's running-statistics update (the CPU path's `update_running`, on the device).
fn update_running(bn: &BatchNorm, mean: &Tensor, var: &Tensor, m: usize) -> Result<()> {
    let mom = bn.momentum();
    let unbias = m as f64 / (m as f64 - 1.0);
    for (t, batch, scale) in [
        (bn.running_mean(), mean, 1.0),
        (bn.running_var(), var, unbias),
    ] {
        let old = t.to_dtype(DType::F64)?;
        // (1 - mom) · old + (mom · batch) · scale, in the CPU path's order.
        let new = (old.affine(1.0 - mom, 0.0)? + batch.affine(mom, 0.0)?.affine(scale, 0.0)?)?;
        // A `Var` of the BN: `from_tensor` shares its storage, so `set` updates it in place.
        Var::from_tensor(t)?.set(&new.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

/// The host copy of a small tensor, for the CPU twins.
fn host<T: candle::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// The f32 data of a contiguous CPU storage.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    slice_of(s.as_slice::<f32>()?, l)
}

/// `(2, c)` f64: the batch mean and biased variance of each channel.
struct Moments {
    shape: Dims,
}

impl CustomOp1 for Moments {
    fn name(&self) -> &'static str {
        "pipe-batch-norm-moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (mut mean, var) = batch_stats(f32s(s, l)?, self.shape);
        mean.extend(var);
        Ok((CpuStorage::F64(mean), Shape::from((2, self.shape.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle::CudaStorage,
        l: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let out = super::kernels::moments(s, l, self.shape)?;
        Ok((out, Shape::from((2, self.shape.c))))
    }
}

/// The forward on (x, γ, β) with the statistics fixed when the op is built.
struct StagedBn {
    shape: Dims,
    train: bool,
    relu: bool,
    /// (c) f64.
    mean: Tensor,
    /// (c) f64.
    inv_std: Tensor,
    /// (c) f64, detached.
    gamma: Tensor,
    /// (2, c) f32: scale, shift.
    coef: Tensor,
}

impl CustomOp3 for StagedBn {
    fn name(&self) -> &'static str {
        "pipe-batch-norm-staged"
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
        let c = host::<f32>(&self.coef)?;
        let (scale, shift) = c.split_at(self.shape.c);
        let coef: Vec<(f32, f32)> = scale.iter().copied().zip(shift.iter().copied()).collect();
        let y = apply_pass(f32s(s1, l1)?, &coef, self.shape, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let y = super::kernels::apply(s1, l1, &self.coef, self.shape, self.relu)?;
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
        let want_dx = x.track_op();
        let want_params = gamma.track_op() || beta.track_op();
        let dout = dout.contiguous()?;
        let (x, out) = (x.detach(), out.detach());
        let sums = (want_params || (want_dx && self.train))
            .then(|| {
                let op = GradSums {
                    shape: self.shape,
                    relu: self.relu,
                    mean: self.mean.clone(),
                };
                x.apply_op3_no_bwd(&out, &dout, &op)
            })
            .transpose()?;
        let (mut dgamma, mut dbeta) = (None, None);
        if let (Some(s), true) = (&sums, want_params) {
            if gamma.track_op() {
                dgamma = Some((s.get(1)? * &self.inv_std)?.to_dtype(gamma.dtype())?);
            }
            if beta.track_op() {
                dbeta = Some(s.get(0)?.to_dtype(beta.dtype())?);
            }
        }
        if !want_dx {
            return Ok((None, dgamma, dbeta));
        }
        // dx = k1 · g + (k2 · x + k3), in the CPU path's order of operations.
        let k1 = (&self.gamma * &self.inv_std)?;
        let (k2, k3) = match &sums {
            Some(s) if self.train => {
                let m = (self.shape.b * self.shape.l) as f64;
                let (sg, sgx) = (s.get(0)?, s.get(1)?);
                let k2 = ((((k1.neg()? * &self.inv_std)? * &self.inv_std)? * sgx)? / m)?;
                let k3 = (((k1.neg()? * sg)? / m)? - (&k2 * &self.mean)?)?;
                (k2, k3)
            }
            _ => (k1.zeros_like()?, k1.zeros_like()?),
        };
        let coef = Tensor::stack(&[k1, k2, k3], 0)?.to_dtype(DType::F32)?;
        let op = Dx {
            shape: self.shape,
            relu: self.relu,
            train: self.train,
            coef,
        };
        let dx = x.apply_op3_no_bwd(&out, &dout, &op)?;
        Ok((Some(dx), dgamma, dbeta))
    }
}

/// `(2, c)` f64 from (x, out, dout): `Σ g` and `Σ g · (x - μ_c)` per channel.
struct GradSums {
    shape: Dims,
    relu: bool,
    /// (c) f64.
    mean: Tensor,
}

impl CustomOp3 for GradSums {
    fn name(&self) -> &'static str {
        "pipe-batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, out, dout) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let mean = host::<f64>(&self.mean)?;
        let sums = grad_channel_sums(x, out, dout, &mean, self.shape, self.relu);
        // Interleaved per channel there; (2, c) here.
        let (sg, sgx): (Vec<f64>, Vec<f64>) = sums.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
        let mut v = sg;
        v.extend(sgx);
        Ok((CpuStorage::F64(v), Shape::from((2, self.shape.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let sums = super::kernels::grad_sums(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            &self.mean,
            self.shape,
            self.relu,
        )?;
        Ok((sums, Shape::from((2, self.shape.c))))
    }
}

/// dx from (x, out, dout) and the per-channel `[k1, k2, k3]`.
struct Dx {
    shape: Dims,
    relu: bool,
    train: bool,
    /// (3, c) f32.
    coef: Tensor,
}

impl CustomOp3 for Dx {
    fn name(&self) -> &'static str {
        "pipe-batch-norm-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = host::<f32>(&self.coef)?;
        let c = self.shape.c;
        let coef: Vec<(f32, f32, f32)> = (0..c).map(|i| (k[i], k[c + i], k[2 * c + i])).collect();
        let (x, out, dout) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let dx = dx_pass(x, out, dout, &coef, self.shape, self.relu, self.train);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let dx = super::kernels::dx(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            &self.coef,
            self.shape,
            (self.relu, self.train),
        )?;
        Ok((dx, l1.shape().clone()))
    }
}
