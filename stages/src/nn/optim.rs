//! Optimizers: SGD (momentum, Nesterov, weight decay), solo-learn LARS wrapper, ACL LARS, Adam.
//!
//! Every optimizer works on a named parameter list `&[(String, Var)]` (the model's trainable
//! parameters, **without** the BN running statistics, which are `Var`s in the `VarMap` but never
//! get a gradient) and reads gradients from the `GradStore` of a `backward`. A parameter without
//! a gradient in a step is skipped, and its state is left as is (PyTorch's `p.grad is None`).
//! Parameter groups are per-parameter weight decays: [`Sgd::no_weight_decay_where`] (and the
//! same on [`AclLars`] / [`Adam`]) zeroes it for the names a predicate picks, e.g.
//! [`is_bias_or_norm`].
//!
//! # Update rules (`g` the gradient, `p` the parameter, `η` the current learning rate)
//!
//! - [`Sgd`] (`torch.optim.SGD`): `d = g + w p`; with momentum μ, `b ← d` on the first step,
//!   then `b ← μ b + (1 − τ) d` (dampening τ); `d ← d + μ b` (Nesterov) or `d ← b`;
//!   `p ← p − η d`.
//! - [`Lars`] (solo-learn `LARSWrapper` around Nesterov SGD, R-CF / R-EMP, METHODS.md 2.6): for
//!   each `p` with `ndim ≠ 1` (all `p` if `exclude_bias_n_norm` is off) and `‖p‖ ≠ 0`,
//!   `‖g‖ ≠ 0`: `ρ = η_L ‖p‖/(‖g‖ + w ‖p‖ + ε)`, with `clip` `ρ ← min(ρ/η, 1)`, and
//!   `g ← (g + w p) ρ`; then the SGD step **with weight decay 0**. So 1-D tensors (biases, BN
//!   γ/β) and zero tensors get plain (Nesterov) SGD with no weight decay and no trust scaling.
//! - [`AclLars`] (R-AIR / R-RCS): for **every** tensor `λ = η_L ‖p‖/(‖g‖ + w ‖p‖)`, or `λ = 1`
//!   when `‖p‖ < 10⁻¹⁵` or `‖g‖ < 10⁻¹⁵`; `b ← μ b + η λ (g + w p)` from `b = 0`; `p ← p − b`.
//!   The buffer holds learning-rate-scaled steps, so a learning-rate change acts through it
//!   (\[Q33\]).
//! - [`Adam`] (`torch.optim.Adam`, L2 weight decay): `g ← g + w p`, `m ← β₁ m + (1 − β₁) g`,
//!   `v ← β₂ v + (1 − β₂) g²`, `p ← p − η/(1 − β₁ᵗ) · m/(√v/√(1 − β₂ᵗ) + ε)`, `t` counted per
//!   parameter.
//!
//! Norms are Frobenius norms of the whole tensor, computed in its dtype.
//!
//! # State is detached
//!
//! Momentum buffers and moments are built from `Var::as_detached_tensor` and detached
//! gradients, and `.detach()`ed again before they are stored: a buffer computed from
//! `var.as_tensor()` would keep every step's autograd graph alive (CANDLE.md measured
//! ~370 MB per step).
//!
//! # Traits
//!
//! Each optimizer has inherent `step`, `lr` and `set_lr`, implements our object-safe [`Optim`]
//! (for `Box<dyn Optim>` in a stage) and `candle_nn::Optimizer` (whose `new(Vec<Var>, cfg)`
//! names the parameters `"0"`, `"1"`, …, so name predicates do not apply there). The inherent
//! methods take precedence, so `opt.step(&grads)` is never ambiguous.
//!
//! ```
//! use candle::{DType, Device, Var};
//! use pipe_stages::nn::optim::{Sgd, SgdConfig};
//!
//! # fn main() -> candle::Result<()> {
//! let w = Var::ones(3, DType::F64, &Device::Cpu)?;
//! let params = vec![("w".to_string(), w.clone())];
//! let cfg = SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..SgdConfig::default() };
//! let mut opt = Sgd::new_named(&params, cfg)?;
//! let loss = w.as_tensor().sqr()?.sum_all()?; // ∇ = 2 w = 2
//! opt.step(&loss.backward()?)?;
//! // Nesterov first step: b = g, p ← p − η (g + μ b) = 1 − 0.1 · 2 · 1.9 = 0.62.
//! assert!((w.to_vec1::<f64>()?[0] - 0.62).abs() < 1e-12);
//! # Ok(())
//! # }
//! ```

use candle::backprop::GradStore;
use candle::{DType, Result, Tensor, Var, bail};
use serde::{Deserialize, Serialize};

/// The interface our training loops use (object-safe).
pub trait Optim {
    /// One update from the gradients of a `backward`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The current learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate (schedules call this before each step).
    fn set_lr(&mut self, lr: f64);
    /// `backward` then [`Optim::step`].
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
    /// The optimizer's state (momentum buffers, moments, step counts) as named tensors, for a
    /// resumable checkpoint: `momentum.<param>`, `adam_m.<param>`, `adam_v.<param>`,
    /// `adam_t.<param>`. Parameters without state yet are absent.
    fn state(&self) -> Vec<(String, Tensor)>;
    /// Restores what [`Optim::state`] returned. Every entry must name a parameter of this
    /// optimizer with the parameter's shape; parameters absent from `state` get no state.
    ///
    /// # Errors
    /// An unknown name or a shape mismatch (before anything is changed).
    fn load_state(&mut self, state: &std::collections::HashMap<String, Tensor>) -> Result<()>;
}

const MOMENTUM: &str = "momentum.";

/// The per-parameter buffers as `prefix + name` tensors.
fn bufs_state(params: &[Param], bufs: &[Option<Tensor>]) -> Vec<(String, Tensor)> {
    params
        .iter()
        .zip(bufs)
        .filter_map(|(p, b)| {
            b.as_ref()
                .map(|b| (format!("{MOMENTUM}{}", p.name), b.clone()))
        })
        .collect()
}

/// Checks that every entry of `state` is `<known prefix><param name>` with the param's shape.
fn check_state(
    params: &[Param],
    state: &std::collections::HashMap<String, Tensor>,
    prefixes: &[&str],
) -> Result<()> {
    for (key, t) in state {
        let param = prefixes.iter().find_map(|pre| {
            let name = key.strip_prefix(pre)?;
            params.iter().find(|p| p.name == name).map(|p| (pre, p))
        });
        match param {
            None => bail!("optimizer state: {key} names no parameter of this optimizer"),
            Some((pre, p)) if !pre.ends_with("t.") && t.shape() != p.var.shape() => bail!(
                "optimizer state: {key} has shape {:?}, the parameter {:?}",
                t.dims(),
                p.var.dims()
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The buffers from `momentum.<name>` entries (after [`check_state`]).
fn load_bufs(
    params: &[Param],
    bufs: &mut [Option<Tensor>],
    state: &std::collections::HashMap<String, Tensor>,
) -> Result<()> {
    check_state(params, state, &[MOMENTUM])?;
    for (p, b) in params.iter().zip(bufs.iter_mut()) {
        *b = match state.get(&format!("{MOMENTUM}{}", p.name)) {
            Some(t) => Some(t.to_dtype(p.var.dtype())?.to_device(p.var.device())?),
            None => None,
        };
    }
    Ok(())
}

/// The predicate of the usual "no weight decay on biases and BN" group: tensors of rank ≤ 1.
pub fn is_bias_or_norm(_name: &str, var: &Var) -> bool {
    var.rank() <= 1
}

/// One parameter with its own weight decay (a parameter group of one).
#[derive(Debug, Clone)]
struct Param {
    name: String,
    var: Var,
    weight_decay: f64,
}

fn collect(params: &[(String, Var)], weight_decay: f64) -> Result<Vec<Param>> {
    params
        .iter()
        .map(|(name, var)| {
            if !var.dtype().is_float() {
                bail!(
                    "optimizer: parameter {name} has non-float dtype {:?}",
                    var.dtype()
                )
            }
            Ok(Param {
                name: name.clone(),
                var: var.clone(),
                weight_decay,
            })
        })
        .collect()
}

/// Names `"0"`, `"1"`, … for `candle_nn::Optimizer::new`.
fn numbered(vars: Vec<Var>) -> Vec<(String, Var)> {
    vars.into_iter()
        .enumerate()
        .map(|(i, v)| (i.to_string(), v))
        .collect()
}

fn zero_decay_where(params: &mut [Param], pred: impl Fn(&str, &Var) -> bool) {
    for p in params.iter_mut().filter(|p| pred(&p.name, &p.var)) {
        p.weight_decay = 0.0;
    }
}

/// The Frobenius norms of `ts` as `f64`s (each the `f32` sum of squares candle computes on the
/// tensor's device), read to the host in one copy: on CUDA each read waits for the device, and
/// a LARS step reads two norms per tensor.
fn norms_at_once(ts: &[&Tensor]) -> Result<Vec<f64>> {
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    let sums = ts
        .iter()
        .map(|t| t.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&sums, 0)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(f64::sqrt)
        .collect())
}

/// The parameter's gradient, detached (`None` when it has none).
fn grad_of(grads: &GradStore, var: &Var) -> Option<Tensor> {
    grads.get(var).map(Tensor::detach)
}

/// `g + w p` (just `g` when `w = 0`).
fn add_decay(g: &Tensor, p: &Tensor, w: f64) -> Result<Tensor> {
    if w == 0.0 {
        Ok(g.clone())
    } else {
        g + (p * w)?
    }
}

/// Implements [`Optim`] and [`candle_nn::Optimizer`] for an optimizer with inherent `step`,
/// `lr`, `set_lr`, `state`, `load_state` and `new_named` (the latter numbers unnamed vars "0", "1", ...).
macro_rules! impl_optimizer_traits {
    ($t:ident, $c:ident) => {
        impl Optim for $t {
            fn step(&mut self, grads: &GradStore) -> Result<()> {
                $t::step(self, grads)
            }
            fn lr(&self) -> f64 {
                $t::lr(self)
            }
            fn set_lr(&mut self, lr: f64) {
                $t::set_lr(self, lr)
            }
            fn state(&self) -> Vec<(String, Tensor)> {
                $t::state(self)
            }
            fn load_state(
                &mut self,
                state: &std::collections::HashMap<String, Tensor>,
            ) -> Result<()> {
                $t::load_state(self, state)
            }
        }

        impl candle_nn::Optimizer for $t {
            type Config = $c;
            fn new(vars: Vec<Var>, config: $c) -> Result<Self> {
                $t::new_named(&numbered(vars), config)
            }
            fn step(&mut self, grads: &GradStore) -> Result<()> {
                $t::step(self, grads)
            }
            fn learning_rate(&self) -> f64 {
                $t::lr(self)
            }
            fn set_learning_rate(&mut self, lr: f64) {
                $t::set_lr(self, lr)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// SGD

/// [`Sgd`] settings (`torch.optim.SGD`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Learning rate η.
    pub lr: f64,
    /// Momentum μ (0: plain SGD).
    pub momentum: f64,
    /// Dampening τ of the momentum buffer update (the references use 0).
    pub dampening: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening = 0`).
    pub nesterov: bool,
    /// L2 weight decay w, added to the gradient before the momentum.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    /// `torch.optim.SGD`'s defaults: lr 1e-3, no momentum, no weight decay.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl SgdConfig {
    fn validate(&self) -> Result<()> {
        if !(self.lr >= 0.0 && self.momentum >= 0.0 && self.weight_decay >= 0.0) {
            bail!("sgd: lr, momentum and weight_decay must be >= 0: {self:?}")
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            bail!("sgd: nesterov momentum requires a momentum and zero dampening")
        }
        Ok(())
    }
}

/// SGD with momentum, Nesterov and weight decay, PyTorch semantics.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<Param>,
    bufs: Vec<Option<Tensor>>,
    cfg: SgdConfig,
}

impl Sgd {
    /// An optimizer over named parameters, all with `cfg.weight_decay`.
    ///
    /// # Errors
    /// Invalid settings or a non-float parameter.
    pub fn new_named(params: &[(String, Var)], cfg: SgdConfig) -> Result<Self> {
        cfg.validate()?;
        let params = collect(params, cfg.weight_decay)?;
        let bufs = vec![None; params.len()];
        Ok(Self { params, bufs, cfg })
    }

    /// Zero weight decay for the parameters the predicate picks (a second parameter group).
    pub fn no_weight_decay_where(mut self, pred: impl Fn(&str, &Var) -> bool) -> Self {
        zero_decay_where(&mut self.params, pred);
        self
    }

    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    /// The weight decay of a parameter (`None` for an unknown name).
    pub fn weight_decay_of(&self, name: &str) -> Option<f64> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.weight_decay)
    }

    /// The momentum buffer of a parameter (`None` before its first step or without momentum).
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        let i = self.params.iter().position(|p| p.name == name)?;
        self.bufs.get(i)?.as_ref()
    }

    /// One update from the gradients of a `backward`.
    ///
    /// # Errors
    /// Tensor errors (shape or dtype mismatches between a gradient and its parameter).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let gs: Vec<Option<Scaled>> = self
            .params
            .iter()
            .map(|p| {
                grad_of(grads, &p.var).map(|grad| Scaled {
                    grad,
                    decay: p.weight_decay,
                    rho: 1.0,
                })
            })
            .collect();
        self.apply(gs)
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The momentum buffers (see [`Optim::state`]).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        bufs_state(&self.params, &self.bufs)
    }

    /// Restores [`Sgd::state`].
    ///
    /// # Errors
    /// See [`Optim::load_state`].
    pub fn load_state(&mut self, state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        load_bufs(&self.params, &mut self.bufs, state)
    }

    /// The SGD update with the given per-parameter effective gradients `(g + w p) ρ` (the LARS
    /// wrapper passes its trust-scaled gradient with the inner weight decay "temporarily 0").
    fn apply(&mut self, grads: Vec<Option<Scaled>>) -> Result<()> {
        let cfg = self.cfg;
        for ((param, buf), g) in self.params.iter().zip(self.bufs.iter_mut()).zip(grads) {
            let Some(g) = g else { continue };
            if fused::sgd_update(&param.var, &g, buf, &cfg)? {
                continue;
            }
            let SgdConfig {
                lr,
                momentum,
                dampening,
                nesterov,
                ..
            } = cfg;
            let p = param.var.as_detached_tensor();
            let mut d = add_decay(&g.grad, &p, g.decay)?;
            if g.rho != 1.0 {
                d = (d * g.rho)?;
            }
            if momentum != 0.0 {
                let b = match buf.take() {
                    None => d.clone(),
                    Some(b) => ((b * momentum)? + (&d * (1.0 - dampening))?)?,
                }
                .detach();
                d = if nesterov {
                    (&d + (&b * momentum)?)?
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            param.var.set(&(&p - (d * lr)?)?)?;
        }
        Ok(())
    }
}

/// An effective gradient `(grad + decay · p) · rho`, not materialised.
#[derive(Debug, Clone)]
struct Scaled {
    grad: Tensor,
    decay: f64,
    rho: f64,
}

impl_optimizer_traits!(Sgd, SgdConfig);

/// The CPU fast path of the SGD / LARS update: one pass over contiguous f32 slices instead of a
/// dozen candle ops, each allocating a parameter-sized tensor. The arithmetic (and its order) is
/// that of the candle expressions it replaces, in f32, so the result is the same; the LARS norms
/// are accumulated in f64 over fixed chunks (deterministic for any thread count).
mod fused {
    use super::{Scaled, SgdConfig};
    use candle::{CpuStorage, DType, Result, Storage, Tensor, Var};
    use rayon::prelude::*;

    /// Elements per parallel work unit.
    const CHUNK: usize = 1 << 15;

    /// Runs `f` on the contiguous f32 CPU data of `t`, or returns `None`.
    fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        if t.dtype() != DType::F32 {
            return None;
        }
        let (storage, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[start..end])),
            _ => None,
        }
    }

    fn sum_sq(x: &[f32]) -> f64 {
        let parts: Vec<f64> = x
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .collect();
        parts.iter().sum()
    }

    /// `(‖p‖, ‖g‖)` when both are contiguous f32 on the CPU.
    pub(super) fn norms(p: &Tensor, g: &Tensor) -> Option<(f64, f64)> {
        let pn = with_f32(p, sum_sq)?;
        let gn = with_f32(g, sum_sq)?;
        Some((pn.sqrt(), gn.sqrt()))
    }

    /// The SGD update of one parameter on the fast path; `Ok(false)` when it does not apply
    /// (another device or dtype, a non-contiguous tensor).
    pub(super) fn sgd_update(
        var: &Var,
        g: &Scaled,
        buf: &mut Option<Tensor>,
        cfg: &SgdConfig,
    ) -> Result<bool> {
        let p = var.as_detached_tensor();
        // CUDA (or any non-f32) parameters take the candle path without touching host memory
        if !p.device().is_cpu() || p.dtype() != DType::F32 || p.shape() != g.grad.shape() {
            return Ok(false);
        }
        let n = p.elem_count();
        let (w, rho) = (g.decay as f32, g.rho as f32);
        let (lr, mu, damp) = (
            cfg.lr as f32,
            cfg.momentum as f32,
            (1.0 - cfg.dampening) as f32,
        );
        let (use_mom, nesterov) = (cfg.momentum != 0.0, cfg.nesterov);
        let mut new_p = vec![0f32; n];
        let mut new_b = if use_mom { vec![0f32; n] } else { Vec::new() };
        let done = with_f32(&p, |ps| {
            with_f32(&g.grad, |gs| {
                let step =
                    |ps: &[f32], gs: &[f32], bs: Option<&[f32]>, np: &mut [f32], nb: &mut [f32]| {
                        for i in 0..ps.len() {
                            // d = (g + p w) ρ  (candle: g + (p * w), then * ρ)
                            let mut d = if w == 0.0 { gs[i] } else { gs[i] + ps[i] * w };
                            if rho != 1.0 {
                                d *= rho;
                            }
                            if use_mom {
                                let b = match bs {
                                    None => d,
                                    Some(bs) => bs[i] * mu + d * damp,
                                };
                                nb[i] = b;
                                d = if nesterov { d + b * mu } else { b };
                            }
                            np[i] = ps[i] - d * lr;
                        }
                    };
                let run = |bs: Option<&[f32]>, new_p: &mut [f32], new_b: &mut [f32]| {
                    let nb_chunks: Vec<&mut [f32]> = if use_mom {
                        new_b.chunks_mut(CHUNK).collect()
                    } else {
                        (0..n.div_ceil(CHUNK))
                            .map(|_| <&mut [f32]>::default())
                            .collect()
                    };
                    new_p
                        .par_chunks_mut(CHUNK)
                        .zip(nb_chunks)
                        .enumerate()
                        .for_each(|(k, (np, nb))| {
                            let r = k * CHUNK..(k * CHUNK + np.len());
                            step(&ps[r.clone()], &gs[r.clone()], bs.map(|b| &b[r]), np, nb);
                        });
                };
                match buf.as_ref().filter(|_| use_mom) {
                    Some(b) => with_f32(b, |bs| run(Some(bs), &mut new_p, &mut new_b)).is_some(),
                    None => {
                        run(None, &mut new_p, &mut new_b);
                        true
                    }
                }
            })
        })
        .flatten()
        .unwrap_or(false);
        if !done {
            return Ok(false);
        }
        let shape = p.shape().clone();
        if use_mom {
            *buf = Some(Tensor::from_vec(new_b, shape.clone(), p.device())?);
        }
        var.set(&Tensor::from_vec(new_p, shape, p.device())?)?;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------------
// solo-learn LARS wrapper

/// [`Lars`] settings; `Default` is CF-AMC's (METHODS.md 2.6): Nesterov SGD lr 0.3, momentum 0.9,
/// weight decay 1e-4, trust η_L = 0.005, clip, exclude biases and norms, ε = 1e-8.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LarsConfig {
    /// The inner SGD (its weight decay is the LARS `w`).
    pub sgd: SgdConfig,
    /// Trust coefficient η_L.
    pub eta: f64,
    /// `clip`: `ρ ← min(ρ/η, 1)`.
    pub clip: bool,
    /// ε in the trust ratio's denominator.
    pub eps: f64,
    /// Skip tensors with `ndim == 1` (biases, BN γ/β): no trust scaling, no weight decay.
    pub exclude_bias_n_norm: bool,
}

impl Default for LarsConfig {
    fn default() -> Self {
        Self {
            sgd: SgdConfig {
                lr: 0.3,
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 1e-4,
            },
            eta: 0.005,
            clip: true,
            eps: 1e-8,
            exclude_bias_n_norm: true,
        }
    }
}

/// solo-learn's `LARSWrapper` around [`Sgd`] (R-CF, R-EMP).
#[derive(Debug)]
pub struct Lars {
    sgd: Sgd,
    eta: f64,
    clip: bool,
    eps: f64,
    exclude_bias_n_norm: bool,
}

impl Lars {
    /// The wrapper over named parameters.
    ///
    /// # Errors
    /// Invalid settings or a non-float parameter.
    pub fn new_named(params: &[(String, Var)], cfg: LarsConfig) -> Result<Self> {
        Ok(Self {
            sgd: Sgd::new_named(params, cfg.sgd)?,
            eta: cfg.eta,
            clip: cfg.clip,
            eps: cfg.eps,
            exclude_bias_n_norm: cfg.exclude_bias_n_norm,
        })
    }

    /// Zero weight decay (hence `w = 0` in the trust ratio too) for the parameters the
    /// predicate picks.
    pub fn no_weight_decay_where(mut self, pred: impl Fn(&str, &Var) -> bool) -> Self {
        self.sgd = self.sgd.no_weight_decay_where(pred);
        self
    }

    /// The inner SGD (its buffers).
    pub fn inner(&self) -> &Sgd {
        &self.sgd
    }

    /// One update: trust-scale the gradients, then the SGD step with weight decay 0.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let lr = self.sgd.lr();
        let params = &self.sgd.params;
        let gs: Vec<Option<Tensor>> = params.iter().map(|p| grad_of(grads, &p.var)).collect();
        // (‖p‖, ‖g‖) of the trust-scaled tensors (biases and norms are not, when excluded):
        // one fused pass each on the CPU, else candle's sums of squares read to the host
        // together (on CUDA a read is a synchronisation)
        let mut pg: Vec<Option<(f64, f64)>> = vec![None; params.len()];
        let mut slow: Vec<(usize, Tensor, &Tensor)> = Vec::new();
        for (i, (param, g)) in params.iter().zip(&gs).enumerate() {
            let Some(g) = g else { continue };
            if self.exclude_bias_n_norm && param.var.rank() == 1 {
                continue;
            }
            let p = param.var.as_detached_tensor();
            match fused::norms(&p, g) {
                Some(n) => pg[i] = Some(n),
                None => slow.push((i, p, g)),
            }
        }
        let slow_norms = norms_at_once(
            &slow
                .iter()
                .flat_map(|(_, p, g)| [p, *g])
                .collect::<Vec<_>>(),
        )?;
        for ((i, ..), n) in slow.iter().zip(slow_norms.chunks_exact(2)) {
            pg[*i] = Some((n[0], n[1]));
        }
        let mut scaled = Vec::with_capacity(params.len());
        for ((param, g), norms) in params.iter().zip(gs).zip(pg) {
            let Some(g) = g else {
                scaled.push(None);
                continue;
            };
            let plain = Scaled {
                grad: g.clone(),
                decay: 0.0,
                rho: 1.0,
            };
            let Some((pn, gn)) = norms else {
                scaled.push(Some(plain));
                continue;
            };
            if pn == 0.0 || gn == 0.0 {
                scaled.push(Some(plain));
                continue;
            }
            let w = param.weight_decay;
            let mut rho = self.eta * pn / (gn + pn * w + self.eps);
            if self.clip {
                rho = (rho / lr).min(1.0);
            }
            scaled.push(Some(Scaled {
                grad: g,
                decay: w,
                rho,
            }));
        }
        self.sgd.apply(scaled)
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.sgd.lr()
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.sgd.set_lr(lr)
    }

    /// The inner SGD's momentum buffers (see [`Optim::state`]).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.sgd.state()
    }

    /// Restores [`Lars::state`].
    ///
    /// # Errors
    /// See [`Optim::load_state`].
    pub fn load_state(&mut self, state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        self.sgd.load_state(state)
    }
}

impl_optimizer_traits!(Lars, LarsConfig);

// ---------------------------------------------------------------------------------------------
// ACL LARS

/// [`AclLars`] settings; `Default` is ACL's (METHODS.md 2.6): lr 5.0, momentum 0.9,
/// η_L = 0.001, weight decay 1e-6.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclLarsConfig {
    /// Learning rate η (the schedule multiplies it).
    pub lr: f64,
    /// Momentum μ.
    pub momentum: f64,
    /// Trust coefficient η_L.
    pub eta: f64,
    /// Weight decay w.
    pub weight_decay: f64,
}

impl Default for AclLarsConfig {
    fn default() -> Self {
        Self {
            lr: 5.0,
            momentum: 0.9,
            eta: 1e-3,
            weight_decay: 1e-6,
        }
    }
}

/// The LARS of R-AIR / R-RCS ("ACL LARS"): trust scaling on every tensor, buffer of
/// learning-rate-scaled steps.
#[derive(Debug)]
pub struct AclLars {
    params: Vec<Param>,
    bufs: Vec<Option<Tensor>>,
    cfg: AclLarsConfig,
}

impl AclLars {
    /// The optimizer over named parameters.
    ///
    /// # Errors
    /// A non-float parameter.
    pub fn new_named(params: &[(String, Var)], cfg: AclLarsConfig) -> Result<Self> {
        let params = collect(params, cfg.weight_decay)?;
        let bufs = vec![None; params.len()];
        Ok(Self { params, bufs, cfg })
    }

    /// Zero weight decay for the parameters the predicate picks (not used by ACL itself).
    pub fn no_weight_decay_where(mut self, pred: impl Fn(&str, &Var) -> bool) -> Self {
        zero_decay_where(&mut self.params, pred);
        self
    }

    /// The momentum buffer of a parameter (`None` before its first step).
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        let i = self.params.iter().position(|p| p.name == name)?;
        self.bufs.get(i)?.as_ref()
    }

    /// One update.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AclLarsConfig {
            lr, momentum, eta, ..
        } = self.cfg;
        let pg: Vec<Option<(Tensor, Tensor)>> = self
            .params
            .iter()
            .map(|param| grad_of(grads, &param.var).map(|g| (param.var.as_detached_tensor(), g)))
            .collect();
        // every norm read to the host at once (on CUDA a read is a synchronisation)
        let norms = norms_at_once(
            &pg.iter()
                .flatten()
                .flat_map(|(p, g)| [p, g])
                .collect::<Vec<_>>(),
        )?;
        let mut norms = norms.chunks_exact(2);
        for ((param, buf), pg) in self.params.iter().zip(self.bufs.iter_mut()).zip(pg) {
            let Some((p, g)) = pg else {
                continue;
            };
            // one pair of norms per parameter with a gradient, in order
            let n = norms
                .next()
                .ok_or_else(|| candle::Error::Msg("LARS norms".into()))?;
            let w = param.weight_decay;
            let (pn, gn) = (n[0], n[1]);
            let local = if pn < 1e-15 || gn < 1e-15 {
                1.0
            } else {
                eta * pn / (gn + w * pn)
            };
            let update = (add_decay(&g, &p, w)? * (lr * local))?;
            let b = match buf.take() {
                None => update,
                Some(b) => ((b * momentum)? + update)?,
            }
            .detach();
            param.var.set(&(&p - &b)?)?;
            *buf = Some(b);
        }
        Ok(())
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The momentum buffers (see [`Optim::state`]).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        bufs_state(&self.params, &self.bufs)
    }

    /// Restores [`AclLars::state`].
    ///
    /// # Errors
    /// See [`Optim::load_state`].
    pub fn load_state(&mut self, state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        load_bufs(&self.params, &mut self.bufs, state)
    }
}

impl_optimizer_traits!(AclLars, AclLarsConfig);

// ---------------------------------------------------------------------------------------------
// Adam

/// [`Adam`] settings; `Default` is PyTorch's: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight
/// decay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    /// Learning rate η.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε added to `√v̂`.
    pub eps: f64,
    /// L2 weight decay added to the gradient (not AdamW's decoupled decay).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Adam with bias correction and L2 weight decay (`torch.optim.Adam`).
#[derive(Debug)]
pub struct Adam {
    params: Vec<Param>,
    /// `(m, v, t)` per parameter.
    state: Vec<Option<(Tensor, Tensor, i32)>>,
    cfg: AdamConfig,
}

impl Adam {
    /// The optimizer over named parameters.
    ///
    /// # Errors
    /// A non-float parameter or betas outside [0, 1).
    pub fn new_named(params: &[(String, Var)], cfg: AdamConfig) -> Result<Self> {
        if !((0.0..1.0).contains(&cfg.beta1) && (0.0..1.0).contains(&cfg.beta2)) {
            bail!("adam: betas must be in [0, 1): {cfg:?}")
        }
        let params = collect(params, cfg.weight_decay)?;
        let state = vec![None; params.len()];
        Ok(Self { params, state, cfg })
    }

    /// Zero weight decay for the parameters the predicate picks.
    pub fn no_weight_decay_where(mut self, pred: impl Fn(&str, &Var) -> bool) -> Self {
        zero_decay_where(&mut self.params, pred);
        self
    }

    /// The first and second moments of a parameter (`None` before its first step).
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        let i = self.params.iter().position(|p| p.name == name)?;
        self.state.get(i)?.as_ref().map(|(m, v, _)| (m, v))
    }

    /// One update.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            ..
        } = self.cfg;
        for (param, state) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(g) = grad_of(grads, &param.var) else {
                continue;
            };
            let p = param.var.as_detached_tensor();
            let g = add_decay(&g, &p, param.weight_decay)?;
            let (m, v, t) = match state.take() {
                None => ((&g * (1.0 - beta1))?, (g.sqr()? * (1.0 - beta2))?, 1),
                Some((m, v, t)) => (
                    ((m * beta1)? + (&g * (1.0 - beta1))?)?,
                    ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                    t + 1,
                ),
            };
            let (m, v) = (m.detach(), v.detach());
            let bc1 = 1.0 - beta1.powi(t);
            let bc2 = 1.0 - beta2.powi(t);
            let denom = (v.sqrt()? / bc2.sqrt())?.affine(1.0, eps)?;
            let update = (m.div(&denom)? * (lr / bc1))?;
            param.var.set(&(&p - update)?)?;
            *state = Some((m, v, t));
        }
        Ok(())
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The moments and step counts (see [`Optim::state`]).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (p, st) in self.params.iter().zip(&self.state) {
            if let Some((m, v, t)) = st {
                out.push((format!("adam_m.{}", p.name), m.clone()));
                out.push((format!("adam_v.{}", p.name), v.clone()));
                if let Ok(t) = Tensor::new(i64::from(*t), p.var.device()) {
                    out.push((format!("adam_t.{}", p.name), t));
                }
            }
        }
        out
    }

    /// Restores [`Adam::state`].
    ///
    /// # Errors
    /// See [`Optim::load_state`]; also a parameter with only some of its three entries.
    pub fn load_state(&mut self, state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        check_state(&self.params, state, &["adam_m.", "adam_v.", "adam_t."])?;
        let mut next = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let get = |pre: &str| state.get(&format!("{pre}{}", p.name));
            next.push(match (get("adam_m."), get("adam_v."), get("adam_t.")) {
                (None, None, None) => None,
                (Some(m), Some(v), Some(t)) => {
                    let t = t.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                    let t = i32::try_from(t).map_err(|_| {
                        candle::Error::Msg(format!("adam: step count {t} out of range"))
                    })?;
                    let dev = p.var.device();
                    let dt = p.var.dtype();
                    Some((
                        m.to_dtype(dt)?.to_device(dev)?,
                        v.to_dtype(dt)?.to_device(dev)?,
                        t,
                    ))
                }
                _ => bail!(
                    "optimizer state: parameter {} has only part of its Adam state",
                    p.name
                ),
            });
        }
        self.state = next;
        Ok(())
    }
}

impl_optimizer_traits!(Adam, AdamConfig);

#[cfg(test)]
mod tests {
    //! Reference values: PyTorch 2.x, float64, with fixed gradients set by hand
    //! (`p.grad = ...`) so every step is reproducible:
    //!
    //! ```python
    //! import torch
    //! d = torch.float64
    //! def init():
    //!     w = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=d, requires_grad=True)
    //!     b = torch.tensor([0.1, -0.2], dtype=d, requires_grad=True)
    //!     z = torch.zeros(2, 1, dtype=d, requires_grad=True)
    //!     return w, b, z
    //! GW = [[[0.3, -0.2], [0.1, 0.4]], [[-0.1, 0.5], [0.2, -0.3]], [[0.25, 0.15], [-0.35, 0.05]]]
    //! GB = [[0.05, -0.1], [0.2, 0.3], None]
    //! GZ = [[[0.7], [-0.4]], [[0.1], [0.2]], [[-0.3], [0.6]]]
    //! def setg(ps, k):
    //!     for p, g in zip(ps, (GW[k], GB[k], GZ[k])):
    //!         p.grad = None if g is None else torch.tensor(g, dtype=d)
    //! # SGD
    //! ps = init()
    //! opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    //! for k in range(3): setg(ps, k); opt.step()
    //! # solo-learn LARSWrapper (the formula of its step / update_p) around that SGD
    //! def lars_step(opt, eta=0.005, clip=True, eps=1e-8, exclude=True):
    //!     wds = []
    //!     for group in opt.param_groups:
    //!         wd = group.get("weight_decay", 0); wds.append(wd); group["weight_decay"] = 0
    //!         for p in group["params"]:
    //!             if p.grad is not None and (p.ndim != 1 or not exclude):
    //!                 pn = torch.norm(p.data); gn = torch.norm(p.grad.data)
    //!                 if pn != 0 and gn != 0:
    //!                     nl = (eta * pn) / (gn + pn * wd + eps)
    //!                     if clip: nl = min(nl / group["lr"], 1)
    //!                     p.grad.data += wd * p.data
    //!                     p.grad.data *= nl
    //!     opt.step()
    //!     for group, wd in zip(opt.param_groups, wds): group["weight_decay"] = wd
    //! ps = init()
    //! opt = torch.optim.SGD(ps, lr=0.3, momentum=0.9, weight_decay=1e-4, nesterov=True)
    //! for k, lr in enumerate([0.3, 0.001]):   # clip < 1 at 0.3, clip = 1 at 0.001
    //!     for g in opt.param_groups: g["lr"] = lr
    //!     setg(ps, k); lars_step(opt)
    //! # ACL LARS, lr 5.0 then 2.5
    //! ps = init(); bufs = [torch.zeros_like(p) for p in ps]
    //! for k, lr in enumerate([5.0, 2.5]):
    //!     setg(ps, k)
    //!     with torch.no_grad():
    //!         for p, buf in zip(ps, bufs):
    //!             if p.grad is None: continue
    //!             pn = torch.norm(p); gn = torch.norm(p.grad); wd = 1e-6
    //!             lam = 1.0 if (pn < 1e-15 or gn < 1e-15) else 1e-3 * pn / (gn + wd * pn)
    //!             buf.mul_(0.9).add_(lr * lam * (p.grad + wd * p)); p.sub_(buf)
    //! # Adam
    //! ps = init()
    //! opt = torch.optim.Adam(ps, lr=0.01, weight_decay=0.01)
    //! for k in range(2): setg(ps, k); opt.step()
    //! ```

    use super::*;
    use candle::Device;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    const GW: [[[f64; 2]; 2]; 3] = [
        [[0.3, -0.2], [0.1, 0.4]],
        [[-0.1, 0.5], [0.2, -0.3]],
        [[0.25, 0.15], [-0.35, 0.05]],
    ];
    const GB: [Option<[f64; 2]>; 3] = [Some([0.05, -0.1]), Some([0.2, 0.3]), None];
    const GZ: [[[f64; 1]; 2]; 3] = [[[0.7], [-0.4]], [[0.1], [0.2]], [[-0.3], [0.6]]];

    fn init() -> Result<Vec<(String, Var)>> {
        let dev = Device::Cpu;
        Ok(vec![
            ("w".into(), Var::new(&[[0.5f64, -1.0], [2.0, 0.25]], &dev)?),
            ("b".into(), Var::new(&[0.1f64, -0.2], &dev)?),
            ("z".into(), Var::zeros((2, 1), DType::F64, &dev)?),
        ])
    }

    /// The hand-set gradients of step `k` as a `GradStore`.
    fn grads(params: &[(String, Var)], k: usize) -> Result<GradStore> {
        let dev = Device::Cpu;
        let mut g = GradStore::default();
        g.insert(&params[0].1, Tensor::new(&GW[k], &dev)?);
        if let Some(gb) = GB[k] {
            g.insert(&params[1].1, Tensor::new(&gb, &dev)?);
        }
        g.insert(&params[2].1, Tensor::new(&GZ[k], &dev)?);
        Ok(g)
    }

    fn values(params: &[(String, Var)]) -> Result<Vec<Vec<f64>>> {
        params
            .iter()
            .map(|(_, v)| v.flatten_all()?.to_vec1::<f64>())
            .collect()
    }

    fn assert_close(got: &[Vec<f64>], want: &[&[f64]], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(w.iter()) {
                assert!((a - b).abs() <= tol, "{got:?} vs {want:?}");
            }
        }
    }

    /// The f32 fast path (one fused pass, chunked in parallel) against the f64 candle-op path on
    /// tensors larger than a chunk, over several steps with momentum, Nesterov and decay.
    #[test]
    fn fused_f32_path_matches_the_f64_candle_path() -> TestResult {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(7);
        let n = 3 * ((1 << 15) + 41);
        let vals: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let bias: Vec<f64> = (0..17).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let grads_of = |k: usize, n: usize| -> Vec<f64> {
            let mut r = crate::rng::Rng::derive(11, &[k as u64, n as u64]);
            (0..n).map(|_| r.uniform(-0.5, 0.5)).collect()
        };
        for lars in [false, true] {
            let mk = |dt: DType| -> Result<Vec<(String, Var)>> {
                Ok(vec![
                    (
                        "w".into(),
                        Var::from_tensor(
                            &Tensor::new(vals.as_slice(), &dev)?
                                .reshape((n / 3, 3))?
                                .to_dtype(dt)?,
                        )?,
                    ),
                    (
                        "b".into(),
                        Var::from_tensor(&Tensor::new(bias.as_slice(), &dev)?.to_dtype(dt)?)?,
                    ),
                ])
            };
            let (p32, p64) = (mk(DType::F32)?, mk(DType::F64)?);
            let sgd = SgdConfig {
                lr: 0.3,
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 1e-2,
            };
            let mk_opt = |p: &[(String, Var)]| -> Result<Box<dyn Optim>> {
                Ok(if lars {
                    Box::new(Lars::new_named(
                        p,
                        LarsConfig {
                            sgd,
                            ..LarsConfig::default()
                        },
                    )?)
                } else {
                    Box::new(Sgd::new_named(p, sgd)?)
                })
            };
            let (mut o32, mut o64) = (mk_opt(&p32)?, mk_opt(&p64)?);
            for k in 0..4 {
                for (params, opt) in [(&p32, &mut o32), (&p64, &mut o64)] {
                    let mut g = GradStore::default();
                    for (name, v) in params.iter() {
                        let t = Tensor::new(grads_of(k, v.elem_count()).as_slice(), &dev)?
                            .reshape(v.shape())?
                            .to_dtype(v.dtype())?;
                        let _ = name;
                        g.insert(v, t);
                    }
                    opt.set_lr(0.3 / (k + 1) as f64);
                    opt.step(&g)?;
                }
            }
            for ((_, a), (_, b)) in p32.iter().zip(&p64) {
                let a = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let b = b.flatten_all()?.to_vec1::<f64>()?;
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "lars {lars}: {x} vs {y}"
                    );
                }
            }
            let m32 = o32.state();
            assert_eq!(m32.len(), 2, "momentum buffers of both parameters");
        }
        Ok(())
    }

    #[test]
    fn sgd_nesterov_weight_decay_matches_torch() -> TestResult {
        let params = init()?;
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
            ..SgdConfig::default()
        };
        let mut opt = Sgd::new_named(&params, cfg)?;
        let want: [[&[f64]; 3]; 3] = [
            [
                &[0.44205, -0.9601, 1.9772, 0.17352499999999998],
                &[0.09031, -0.18062],
                &[-0.13299999999999998, 0.07600000000000001],
            ],
            [
                &[
                    0.435505105,
                    -1.03626581,
                    1.9257233200000001,
                    0.19759280249999997,
                ],
                &[0.048007411, -0.229014822],
                &[-0.2084473, 0.07025560000000002],
            ],
            [
                &[
                    0.3726850848005,
                    -1.087210223961,
                    1.9620149136920002,
                    0.18253457092524997,
                ],
                // No gradient for b in step 3: untouched.
                &[0.048007411, -0.229014822],
                &[-0.21007352013000002, -0.03097944564],
            ],
        ];
        for (k, w) in want.iter().enumerate() {
            opt.step(&grads(&params, k)?)?;
            assert_close(&values(&params)?, w, 1e-14);
            if k == 0 {
                // By hand for w[0][0]: d = 0.3 + 0.01·0.5 = 0.305, b = d,
                // p = 0.5 − 0.1 (0.305 + 0.9·0.305) = 0.44205.
                let b = opt.momentum_buffer("w").ok_or("buffer")?.flatten_all()?;
                assert!((b.to_vec1::<f64>()?[0] - 0.305).abs() < 1e-15);
            }
        }
        Ok(())
    }

    #[test]
    fn momentum_buffers_are_detached() -> TestResult {
        // Gradients from a real graph: loss = Σ (w x)², three steps.
        let dev = Device::Cpu;
        let w = Var::new(&[[0.5f64, -1.0], [2.0, 0.25]], &dev)?;
        let x = Tensor::new(&[1.0f64, 2.0], &dev)?.reshape((2, 1))?;
        let params = vec![("w".to_string(), w.clone())];
        let cfg = SgdConfig {
            lr: 0.01,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
            ..SgdConfig::default()
        };
        let mut sgd = Sgd::new_named(&params, cfg)?;
        let mut lars = Lars::new_named(&params, LarsConfig::default())?;
        let mut acl = AclLars::new_named(&params, AclLarsConfig::default())?;
        let mut adam = Adam::new_named(&params, AdamConfig::default())?;
        for _ in 0..3 {
            let loss = w.matmul(&x)?.sqr()?.sum_all()?;
            let g = loss.backward()?;
            sgd.step(&g)?;
            lars.step(&g)?;
            acl.step(&g)?;
            adam.step(&g)?;
        }
        let bufs = [
            sgd.momentum_buffer("w").ok_or("sgd buffer")?,
            lars.inner().momentum_buffer("w").ok_or("lars buffer")?,
            acl.momentum_buffer("w").ok_or("acl buffer")?,
            adam.moments("w").ok_or("adam m")?.0,
            adam.moments("w").ok_or("adam v")?.1,
        ];
        for b in bufs {
            assert!(!b.track_op(), "an optimizer state keeps the autograd graph");
        }
        // The control: a tensor computed from the Var itself does track.
        assert!((w.as_tensor() * 0.9)?.track_op());
        Ok(())
    }

    #[test]
    fn solo_learn_lars_matches_reference() -> TestResult {
        let params = init()?;
        let mut opt = Lars::new_named(&params, LarsConfig::default())?;
        // Step 1 at lr 0.3 (clip ratio < 1), step 2 at lr 0.001 (clip saturates at 1).
        let want: [[&[f64]; 3]; 2] = [
            [
                &[
                    0.4880098848370554,
                    -0.9920039258653384,
                    1.9959959688740976,
                    0.23401484479901039,
                ],
                // 1-D: plain Nesterov SGD, no decay: 0.1 − 0.3·1.9·0.05 = 0.0715.
                &[0.07150000000000001, -0.14300000000000002],
                // ‖p‖ = 0: no scaling, no decay: −0.3·1.9·0.7 = −0.399.
                &[-0.39899999999999997, 0.22799999999999998],
            ],
            [
                &[
                    0.488182753530472,
                    -0.9929423745424011,
                    1.995609899695895,
                    0.23456208458932531,
                ],
                &[0.0710795, -0.143489],
                &[-0.39975692419, 0.22794395667999998],
            ],
        ];
        for (k, (w, lr)) in want.iter().zip([0.3, 0.001]).enumerate() {
            opt.set_lr(lr);
            opt.step(&grads(&params, k)?)?;
            assert_close(&values(&params)?, w, 1e-14);
        }
        Ok(())
    }

    #[test]
    fn acl_lars_matches_reference() -> TestResult {
        let params = init()?;
        let mut opt = AclLars::new_named(&params, AclLarsConfig::default())?;
        let want: [[&[f64]; 3]; 2] = [
            [
                &[
                    0.49368782545563855,
                    -0.9957918696100612,
                    1.9978959032442105,
                    0.24158377604107922,
                ],
                &[0.0995, -0.199],
                // ‖p‖ = 0: λ = 1, so b = 5.0 · g.
                &[-3.5, 2.0],
            ],
            [
                &[
                    0.4889271864527384,
                    -0.9966061562473482,
                    1.9941615525158198,
                    0.23677014014633824,
                ],
                &[0.09874146363460189, -0.19856280401085852],
                &[-6.65450670010577, 3.7909861941712535],
            ],
        ];
        for (k, (w, lr)) in want.iter().zip([5.0, 2.5]).enumerate() {
            opt.set_lr(lr);
            opt.step(&grads(&params, k)?)?;
            assert_close(&values(&params)?, w, 1e-13);
        }
        Ok(())
    }

    /// The norms read together are the ones read one at a time (bit for bit), and each
    /// parameter gets its own: a step where the middle parameter has no gradient moves the
    /// others exactly as an optimiser over them alone.
    #[test]
    fn lars_norms_are_read_at_once_and_stay_with_their_tensors() -> TestResult {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(3);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect() };
        let ts = [
            Tensor::from_vec(draw(1000), (10, 100), &dev)?,
            Tensor::from_vec(draw(7), 7, &dev)?.to_dtype(DType::F64)?,
            Tensor::zeros((2, 3), DType::F32, &dev)?,
        ];
        let one_by_one: Vec<f64> = ts
            .iter()
            .map(|t| -> Result<f64> {
                Ok(t.sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    .sqrt())
            })
            .collect::<Result<_>>()?;
        assert_eq!(norms_at_once(&ts.iter().collect::<Vec<_>>())?, one_by_one);
        assert!(norms_at_once(&[])?.is_empty());

        let wz = |p: &[(String, Var)]| vec![p[0].clone(), p[2].clone()];
        let (all, alone) = (init()?, init()?);
        let mut lars = Lars::new_named(&all, LarsConfig::default())?;
        let mut lars_alone = Lars::new_named(&wz(&alone), LarsConfig::default())?;
        let (all2, alone2) = (init()?, init()?);
        let mut acl = AclLars::new_named(&all2, AclLarsConfig::default())?;
        let mut acl_alone = AclLars::new_named(&wz(&alone2), AclLarsConfig::default())?;
        for k in 0..3 {
            lars.step(&grads(&all, k)?)?;
            lars_alone.step(&grads(&alone, k)?)?;
            acl.step(&grads(&all2, k)?)?;
            acl_alone.step(&grads(&alone2, k)?)?;
        }
        for (a, b) in [(&all, &alone), (&all2, &alone2)] {
            let (va, vb) = (values(a)?, values(b)?);
            assert_eq!((&va[0], &va[2]), (&vb[0], &vb[2]));
        }
        // and the step moved them
        assert_ne!(values(&all)?[0], values(&init()?)?[0]);
        Ok(())
    }

    #[test]
    fn adam_matches_torch() -> TestResult {
        let params = init()?;
        let cfg = AdamConfig {
            lr: 0.01,
            weight_decay: 0.01,
            ..AdamConfig::default()
        };
        let mut opt = Adam::new_named(&params, cfg)?;
        let want: [[&[f64]; 3]; 2] = [
            [
                &[
                    0.49000000032786883,
                    -0.9900000004761904,
                    1.9900000008333332,
                    0.2400000002484472,
                ],
                &[0.09000000196078393, -0.19000000098039208],
                &[-0.009999999857142857, 0.009999999750000004],
            ],
            [
                &[
                    0.4858195192585543,
                    -0.9942025255808822,
                    1.9802587133843033,
                    0.2390386193792861,
                ],
                &[0.08113926623571073, -0.1948727156535319],
                &[-0.017685156921772253, 0.012661439045709084],
            ],
        ];
        for (k, w) in want.iter().enumerate() {
            opt.step(&grads(&params, k)?)?;
            assert_close(&values(&params)?, w, 1e-14);
        }
        Ok(())
    }

    #[test]
    fn weight_decay_groups_by_name() -> TestResult {
        // With b excluded from decay, SGD without momentum gives p − η g for b and
        // p − η (g + w p) for w.
        let params = init()?;
        let cfg = SgdConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..SgdConfig::default()
        };
        let mut opt = Sgd::new_named(&params, cfg)?.no_weight_decay_where(is_bias_or_norm);
        assert_eq!(opt.weight_decay_of("b"), Some(0.0));
        assert_eq!(opt.weight_decay_of("w"), Some(0.5));
        assert_eq!(opt.weight_decay_of("nope"), None);
        opt.step(&grads(&params, 0)?)?;
        let v = values(&params)?;
        assert!((v[1][0] - (0.1 - 0.1 * 0.05)).abs() < 1e-15);
        assert!((v[0][0] - (0.5 - 0.1 * (0.3 + 0.5 * 0.5))).abs() < 1e-15);
        // By name too.
        let params = init()?;
        let opt = Sgd::new_named(&params, cfg)?.no_weight_decay_where(|n, _| n == "w");
        assert_eq!(opt.weight_decay_of("w"), Some(0.0));
        assert_eq!(opt.weight_decay_of("z"), Some(0.5));
        Ok(())
    }

    #[test]
    fn traits_and_validation() -> TestResult {
        let params = init()?;
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
            ..SgdConfig::default()
        };
        // candle's trait: same numbers as the named constructor.
        let mut opt = <Sgd as candle_nn::Optimizer>::new(vars, cfg)?;
        candle_nn::Optimizer::step(&mut opt, &grads(&params, 0)?)?;
        assert!((values(&params)?[0][0] - 0.44205).abs() < 1e-15);
        // Ours, through a trait object.
        let mut boxed: Box<dyn Optim> = Box::new(Adam::new_named(&params, AdamConfig::default())?);
        boxed.set_lr(0.5);
        assert_eq!(boxed.lr(), 0.5);
        // Invalid settings.
        let bad = SgdConfig {
            nesterov: true,
            ..SgdConfig::default()
        };
        assert!(Sgd::new_named(&params, bad).is_err());
        let ints = vec![("i".to_string(), Var::zeros(2, DType::U32, &Device::Cpu)?)];
        assert!(Sgd::new_named(&ints, SgdConfig::default()).is_err());
        Ok(())
    }
}
