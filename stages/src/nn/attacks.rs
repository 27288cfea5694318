//! PGD (l_inf / l_2 / l_1) and FGSM, generic over a differentiable objective, and the
//! persistent perturbation of free adversarial training.
//!
//! # Projected gradient descent (METHODS.md 2.5)
//!
//! [`pgd`] maximises (or, with [`PgdConfig::minimize`], minimises) an objective
//! `J(x + δ)` over perturbations `δ` in the ε-ball of the chosen norm and in the box
//! `x + δ ∈ [0, 1]`:
//!
//! 1. `δ⁽⁰⁾` from the init rule (zeros when `random_start` is off), then, with
//!    `clamp_after_init`, `δ ← clip(x + δ, 0, 1) − x` (\[Q31\] / \[Q48\] skip this);
//! 2. for `t = 0 .. steps−1`: `g = ∇_δ J(x + δ⁽ᵗ⁾)` (`−g` when minimising), a step by the norm
//!    rule, the projection onto the ball, then the box projection `δ ← clip(x + δ, 0, 1) − x`;
//! 3. return `x + δ⁽ᵀ⁾` (or, with [`Select::BestMeasured`], the best iterate measured on the
//!    way, \[Q58\]); with `restarts > 1`, keep per example the restart with the best final
//!    objective (ties go to the later restart, as R-MAO's `>=`).
//!
//! | norm | init (random start) | step | projection onto the ball |
//! |---|---|---|---|
//! | l_inf | `U(−ε, ε)` per pixel | `δ + α sign(g)` | `clip(δ, −ε, ε)` |
//! | l_2 | `r ε u/‖u‖₂`, `u ~ N(0, I)`, `r ~ U(0, 1)` per example | `δ + α g/(‖g‖₂ + 10⁻¹⁰)` | if `‖δ‖₂ > ε`: `δ ε/(‖δ‖₂ + 10⁻⁷)` |
//! | l_1 | zeros (always) | `δ + α g/(‖g‖₁ + 10⁻¹⁰)` | if `‖δ‖₁ > ε`: `δ ε/(‖δ‖₁ + 10⁻⁷)` |
//!
//! Norms are per example over all `C·H·W` values. The ball projections are
//! `torch.renorm(p, dim=0, maxnorm=ε)`, whose `+10⁻⁷` the references inherit, so a rescaled
//! `δ` lies strictly inside the ball. FGSM is `steps = 1`, `alpha = eps`, no random start
//! ([`PgdConfig::fgsm`]). The l_1 step is the references' weak dense step (\[Q59\]).
//!
//! The random start draws, per restart and in this order: l_inf, `B·C·H·W` uniforms in
//! example-major order; l_2, `B·C·H·W` normals then `B` uniforms. All come from our seeded
//! [`Rng`] (candle's CPU RNG cannot be seeded), so a seed fixes the attack.
//!
//! # The objective
//!
//! `objective(x_adv)` gets `x + δ` with the shape of `x` and returns either one value per
//! example, shape `(B,)`, or one value for the batch (a scalar or a single element; SSL losses
//! such as TCR do not split per example). The gradient is that of `objective(..).sum()`:
//! the sign and normalised steps do not depend on the loss scale, so a mean or a sum reduction
//! gives the same attack (up to the `10⁻¹⁰` of the l_2 / l_1 steps). With a batch-level value,
//! "per example best" (restarts, [`Select::BestMeasured`]) selects whole batches.
//!
//! The objective decides the model mode: it calls `forward_t(.., false)` (eval, the default
//! of METHODS) or `forward_t(.., true)` for the reference-faithful train-mode attacks of R-CF /
//! R-ADV (\[Q8\], \[Q47\]), in which case every attack forward updates the BN running statistics,
//! exactly as in the references. The objective may be `FnMut`: the reverse defense draws fresh
//! augmentations at every step.
//!
//! # Gradients wrt the input only
//!
//! candle has no `no_grad`: `backward` computes gradients for every `Var` in the graph, so an
//! objective built on the live weights costs the parameter gradients too. They are never
//! *accumulated*, though: candle returns gradients in a fresh `GradStore` instead of storing
//! them on the `Var`s, and [`pgd`] keeps only `∇_δ` and drops the store, so an attack never
//! leaks into a training step (the clean mode of \[Q7\]). To save the parameter-gradient
//! kernels, build the objective on a frozen copy of the weights
//! (`VarBuilder::from_tensors` on detached tensors, which share storage with the live ones;
//! CANDLE.md measured a 7-19% saving per PGD step).
//!
//! The reference-faithful \[Q7\] (R-CF PGD-adv EMP / SimCLR: the attack back-props add
//! `Σₜ ∇_θ J(δ⁽ᵗ⁾)` to the training gradient) is [`pgd_accumulate`]: build the objective on the
//! live weights, pass the trainable parameters, and add the returned store to the training
//! gradients with `grads.extend(attack_grads)?` (which sums where both have an entry) before
//! the optimiser step. The accumulated gradients are those of `objective(..).sum()`, so the
//! objective must return the reference's scalar attack loss for the magnitudes to match.
//!
//! Two attacks run jointly on one objective (AdvCL's `x_cl` and `x_ce`, §8.3) fit this API by
//! concatenating the two starting batches along dim 0 and splitting inside the objective.
//!
//! # Free adversarial training (Shafahi et al. 2019, METHODS.md 2.5)
//!
//! [`FreeDelta`] is the single perturbation that persists across minibatches and epochs:
//! created as zeros with the batch shape, applied as `x + δ` at every replay, and updated after
//! each optimiser step by `δ ← clip(δ + α sign ∇_δ L, −ε, ε)`, then `δ ← clip(x + δ, 0, 1) − x`
//! relative to the **current** batch. \[Q10\]: the reference re-projects only there, so the
//! first replay on a new batch may see pixels in `[−ε, 1 + ε]` (faithful); the clean mode
//! re-projects when a new batch arrives ([`FreeDelta::new_batch`]).
//!
//! ```
//! use candle::{Device, Tensor};
//! use pipe_stages::nn::attacks::{pgd, Norm, PgdConfig};
//! use pipe_stages::rng::Rng;
//!
//! # fn main() -> candle::Result<()> {
//! let x = Tensor::full(0.5f32, (2, 1, 2, 2), &Device::Cpu)?;
//! let w = Tensor::new(&[1f32, -1., 2., 0.5], &Device::Cpu)?.reshape((1, 1, 2, 2))?;
//! // J(x) = Σ w·x per example: l_inf PGD moves every pixel by ε in the direction of sign(w).
//! let objective = |xa: &Tensor| xa.broadcast_mul(&w)?.flatten_from(1)?.sum(1);
//! let cfg = PgdConfig { random_start: false, ..PgdConfig::new(Norm::Linf, 0.1, 0.04, 3) };
//! let out = pgd(&x, objective, &cfg, &mut Rng::new(0))?;
//! let adv = out.adv.flatten_all()?.to_vec1::<f32>()?;
//! assert!((adv[0] - 0.6).abs() < 1e-6 && (adv[1] - 0.4).abs() < 1e-6);
//! # Ok(())
//! # }
//! ```

use candle::backprop::GradStore;
use candle::{DType, Device, Result, Shape, Tensor, Var, bail};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// The `+10⁻¹⁰` in the l_2 / l_1 step normalisation.
const STEP_EPS: f64 = 1e-10;
/// The `+10⁻⁷` of `torch.renorm` in the l_2 / l_1 ball projections.
const RENORM_EPS: f64 = 1e-7;

/// The threat model: which norm bounds the perturbation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// `‖δ‖_∞ ≤ ε`: sign steps, per-pixel clipping.
    #[default]
    Linf,
    /// `‖δ‖₂ ≤ ε`: l_2-normalised steps, rescaling onto the ball.
    L2,
    /// `‖δ‖₁ ≤ ε`: l_1-normalised (dense) steps, rescaling onto the ball (\[Q59\]).
    ///
    L1,
}

/// Which perturbation a restart returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// The last iterate `δ⁽ᵀ⁾` (every reference except R-DLSP's reversal).
    #[default]
    Last,
    /// Per example, the iterate with the best objective *measured during the steps*, i.e. among
    /// `δ⁽⁰⁾ .. δ⁽ᵀ⁻¹⁾`, each evaluated before its update; the final iterate is never evaluated.
    /// This is R-DLSP's reversal (\[Q58\]). Ties go to the later iterate. With `steps = 0` it is
    /// `δ⁽⁰⁾`.
    ///
    BestMeasured,
}

/// PGD settings (METHODS.md 2.5). `Default` is l_inf PGD-10 at ε = 8/255, α = 2/255 with a
/// random start, the box and one restart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgdConfig {
    /// The norm of the ball.
    pub norm: Norm,
    /// The radius ε of the ball (in [0, 1] pixel units).
    pub eps: f64,
    /// The step size α.
    pub alpha: f64,
    /// The number of gradient steps T (0 returns the, possibly random, start).
    pub steps: usize,
    /// Random start (l_inf uniform, l_2 uniform radius); l_1 always starts at zero.
    pub random_start: bool,
    /// Independent restarts (≥ 1); per example the one with the best final objective wins.
    pub restarts: usize,
    /// Clamp `x + δ⁽⁰⁾` to the box before the first forward; \[Q31\] / \[Q48\] faithful is `false`.
    pub clamp_after_init: bool,
    /// Minimise the objective instead (the reverse-attack defense, §12).
    pub minimize: bool,
    /// Project onto the box `[0, 1]` after every step (R-DLSP's reversal does not, \[Q58\]).
    pub project_box: bool,
    /// Which iterate a restart returns.
    pub select: Select,
    /// Also evaluate the objective at the returned points ([`PgdResult::loss`]). This costs one
    /// extra forward per restart (which, in a train-mode objective, also updates BN running
    /// statistics once more than the references do). Forced on when `restarts > 1` and
    /// `select` is [`Select::Last`], where the selection needs it.
    pub final_loss: bool,
}

impl Default for PgdConfig {
    fn default() -> Self {
        Self {
            norm: Norm::Linf,
            eps: 8.0 / 255.0,
            alpha: 2.0 / 255.0,
            steps: 10,
            random_start: true,
            restarts: 1,
            clamp_after_init: true,
            minimize: false,
            project_box: true,
            select: Select::Last,
            final_loss: false,
        }
    }
}

impl PgdConfig {
    /// A maximising attack with the given norm, radius, step and step count; random start,
    /// one restart, box on.
    pub fn new(norm: Norm, eps: f64, alpha: f64, steps: usize) -> Self {
        Self {
            norm,
            eps,
            alpha,
            steps,
            ..Self::default()
        }
    }

    /// FGSM: one l_inf sign step of size ε from `x` (no random start).
    pub fn fgsm(eps: f64) -> Self {
        Self {
            random_start: false,
            ..Self::new(Norm::Linf, eps, eps, 1)
        }
    }

    /// Checks the ranges: finite `eps ≥ 0`, `alpha ≥ 0`, `restarts ≥ 1`.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail!("pgd: eps must be finite and >= 0, got {}", self.eps)
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            bail!("pgd: alpha must be finite and >= 0, got {}", self.alpha)
        }
        if self.restarts == 0 {
            bail!("pgd: restarts must be >= 1")
        }
        Ok(())
    }

    /// Whether the returned points are evaluated once more (see [`PgdConfig::final_loss`]).
    fn needs_final_eval(&self) -> bool {
        match self.select {
            Select::Last => self.final_loss || self.restarts > 1,
            // The measured losses serve; only `steps = 0` has none.
            Select::BestMeasured => self.steps == 0 && (self.final_loss || self.restarts > 1),
        }
    }
}

/// What [`pgd`] returns.
#[derive(Debug, Clone)]
pub struct PgdResult {
    /// The adversarial batch `x + δ`, shape of `x`, detached; clamped to `[0, 1]` when
    /// [`PgdConfig::project_box`] is on.
    pub adv: Tensor,
    /// The perturbation `δ`, shape of `x`, detached.
    pub delta: Tensor,
    /// The objective at the returned points, shape `(B,)` (a batch-level objective is
    /// broadcast), detached: the best over restarts (measured before the last update with
    /// [`Select::BestMeasured`]). `None` when nothing needed it and
    /// [`PgdConfig::final_loss`] is off.
    pub loss: Option<Tensor>,
}

/// Runs PGD from `x` (`(B, C, H, W)`, values in `[0, 1]`; any rank ≥ 2 with the batch first),
/// maximising `objective` (see the module docs); gradients wrt the input only.
///
/// # Errors
/// Invalid settings, an objective whose output is neither `(B,)` nor a single value, an
/// objective that does not depend on its input, or any tensor error.
pub fn pgd(
    x: &Tensor,
    objective: impl FnMut(&Tensor) -> Result<Tensor>,
    cfg: &PgdConfig,
    rng: &mut Rng,
) -> Result<PgdResult> {
    run(x, objective, cfg, rng, None)
}

/// [`pgd`] that also sums, over all its gradient steps, the gradients of the listed parameters
/// (the reference-faithful \[Q7\]); the returned store maps each parameter that received a
/// gradient to that sum (detached). Add it to the training gradients with
/// `train_grads.extend(attack_grads)?`.
///
/// # Errors
/// As [`pgd`].
pub fn pgd_accumulate(
    x: &Tensor,
    objective: impl FnMut(&Tensor) -> Result<Tensor>,
    cfg: &PgdConfig,
    rng: &mut Rng,
    params: &[(String, Var)],
) -> Result<(PgdResult, GradStore)> {
    let mut acc = GradStore::default();
    let res = run(x, objective, cfg, rng, Some((params, &mut acc)))?;
    Ok((res, acc))
}

/// [`pgd`] with early stop (METHODS.md 9, R-DLSP's `--eval`, Rice et al.'s
/// `attack_pgd(early_stop=True)`): at every step only the examples that the objective marks as
/// *active* (typically: still correctly classified) take the step; the others keep their `δ`.
/// When no example is active the remaining steps of the restart are skipped (they would change
/// nothing).
///
/// `objective(x_adv)` returns `(loss, active)`: the loss as for [`pgd`], and `active` with
/// one value per example (`(B,)`, any dtype, non-zero = active), computed from the same
/// forward. Restarts keep per example the restart with the best final objective (evaluated
/// once more at the end of each restart, as [`pgd`] does); only [`Select::Last`] is supported.
///
/// # Errors
/// As [`pgd`]; also an `active` that does not hold `B` values, or [`Select::BestMeasured`].
pub fn pgd_early_stop(
    x: &Tensor,
    mut objective: impl FnMut(&Tensor) -> Result<(Tensor, Tensor)>,
    cfg: &PgdConfig,
    rng: &mut Rng,
) -> Result<PgdResult> {
    cfg.validate()?;
    if cfg.select != Select::Last {
        bail!("pgd_early_stop: only Select::Last is supported")
    }
    if x.rank() < 2 {
        bail!("pgd: x must be (B, ...) with rank >= 2, got {:?}", x.dims())
    }
    let shape = x.shape().clone();
    let b = x.dim(0)?;
    let n = x.elem_count() / b.max(1);
    let xf = x.detach().reshape((b, n))?;
    let mut best: Option<(Tensor, Tensor)> = None;
    let mut best_delta: Option<Tensor> = None;
    for _ in 0..cfg.restarts {
        let mut delta = init_delta(b, n, cfg, rng, x.dtype(), x.device())?;
        if cfg.clamp_after_init {
            delta = project_box(&xf, &delta)?;
        }
        for _ in 0..cfg.steps {
            let dv = Var::from_tensor(&delta)?;
            let xa = xf.add(dv.as_tensor())?.reshape(&shape)?;
            let (loss, active) = objective(&xa)?;
            check_loss(&loss, b)?;
            if active.elem_count() != b {
                bail!(
                    "pgd_early_stop: the objective's active mask has shape {:?}; expected ({b},)",
                    active.dims()
                )
            }
            let active = active.detach().reshape(b)?.ne(0.0)?;
            let n_active = active.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()?;
            if n_active == 0 {
                break;
            }
            let grads = loss.sum_all()?.backward()?;
            let Some(g) = grads.get(dv.as_tensor()) else {
                bail!("pgd: the objective does not depend on its input (no gradient wrt delta)")
            };
            let g = if cfg.minimize { g.neg()? } else { g.detach() };
            let stepped = (&delta + (step_direction(&g, cfg.norm)? * cfg.alpha)?)?;
            let mut moved = renorm(&stepped, cfg.norm, cfg.eps)?;
            if cfg.project_box {
                moved = project_box(&xf, &moved)?;
            }
            delta = active
                .unsqueeze(1)?
                .broadcast_as(moved.shape())?
                .where_cond(&moved, &delta)?
                .detach();
        }
        if cfg.needs_final_eval() {
            let xa = xf.add(&delta)?.reshape(&shape)?;
            let l = per_example(&objective(&xa)?.0, b)?;
            best = Some(keep_best(best, (delta, l), cfg.minimize)?);
        } else {
            best_delta = Some(delta);
        }
    }
    let (delta, loss) = match (best, best_delta) {
        (Some((d, l)), _) => (d, Some(l)),
        (None, Some(d)) => (d, None),
        (None, None) => bail!("pgd: no restart ran"),
    };
    let mut adv = xf.add(&delta)?;
    if cfg.project_box {
        adv = adv.clamp(0.0, 1.0)?;
    }
    Ok(PgdResult {
        adv: adv.reshape(&shape)?,
        delta: delta.reshape(&shape)?,
        loss,
    })
}

/// `clip(δ, −ε, ε)`.
pub fn project_linf(delta: &Tensor, eps: f64) -> Result<Tensor> {
    delta.clamp(-eps, eps)
}

/// Per example (dim 0), rescales `δ` to `ε/(‖δ‖₂ + 10⁻⁷)` times itself where `‖δ‖₂ > ε`
/// (`torch.renorm(p=2, dim=0, maxnorm=ε)`).
pub fn project_l2(delta: &Tensor, eps: f64) -> Result<Tensor> {
    renorm(delta, Norm::L2, eps)
}

/// Per example (dim 0), rescales `δ` to `ε/(‖δ‖₁ + 10⁻⁷)` times itself where `‖δ‖₁ > ε`
/// (`torch.renorm(p=1, dim=0, maxnorm=ε)`).
pub fn project_l1(delta: &Tensor, eps: f64) -> Result<Tensor> {
    renorm(delta, Norm::L1, eps)
}

/// The box projection `clip(x + δ, 0, 1) − x`.
pub fn project_box(x: &Tensor, delta: &Tensor) -> Result<Tensor> {
    x.add(delta)?.clamp(0.0, 1.0)?.sub(x)
}

/// Per-example norms `(B, 1)` of a `(B, N)` tensor.
fn norms(t: &Tensor, norm: Norm) -> Result<Tensor> {
    match norm {
        Norm::L2 => t.sqr()?.sum_keepdim(1)?.sqrt(),
        Norm::L1 => t.abs()?.sum_keepdim(1),
        Norm::Linf => t.abs()?.max_keepdim(1),
    }
}

/// `torch.renorm(p, dim=0, maxnorm=ε)` for any rank ≥ 1.
fn renorm(delta: &Tensor, norm: Norm, eps: f64) -> Result<Tensor> {
    if norm == Norm::Linf {
        return project_linf(delta, eps);
    }
    let flat = delta.flatten_from(1)?;
    let n = norms(&flat, norm)?;
    let shrink = (n.affine(1.0, RENORM_EPS)?.recip()? * eps)?;
    let scale = n.gt(eps)?.where_cond(&shrink, &n.ones_like()?)?;
    flat.broadcast_mul(&scale)?.reshape(delta.shape())
}

/// The step direction for the norm: `sign(g)` or `g/(‖g‖ + 10⁻¹⁰)`, `(B, N)`.
fn step_direction(g: &Tensor, norm: Norm) -> Result<Tensor> {
    match norm {
        Norm::Linf => g.sign(),
        Norm::L2 | Norm::L1 => {
            let n = norms(g, norm)?.affine(1.0, STEP_EPS)?;
            g.broadcast_div(&n)
        }
    }
}

/// The random start `δ⁽⁰⁾`, `(B, N)` in the dtype of `x`.
fn init_delta(
    b: usize,
    n: usize,
    cfg: &PgdConfig,
    rng: &mut Rng,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if !cfg.random_start || cfg.norm == Norm::L1 || cfg.eps == 0.0 {
        return Tensor::zeros((b, n), dtype, device);
    }
    let eps = cfg.eps;
    let values: Vec<f64> = match cfg.norm {
        Norm::Linf => (0..b * n).map(|_| rng.uniform(-eps, eps)).collect(),
        Norm::L2 => {
            let mut u: Vec<f64> = (0..b * n).map(|_| rng.normal()).collect();
            let radii: Vec<f64> = (0..b).map(|_| rng.f64()).collect();
            for (row, r) in u.chunks_mut(n.max(1)).zip(radii) {
                let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                // A zero draw has probability 0; keep δ = 0 then rather than dividing by 0.
                let scale = if norm > 0.0 { r * eps / norm } else { 0.0 };
                row.iter_mut().for_each(|v| *v *= scale);
            }
            u
        }
        Norm::L1 => vec![0.0; b * n],
    };
    Tensor::from_vec(values, (b, n), device)?.to_dtype(dtype)
}

/// Checks that the objective returned `(B,)` or a single value.
fn check_loss(loss: &Tensor, b: usize) -> Result<()> {
    let n = loss.elem_count();
    if n != b && n != 1 {
        bail!(
            "pgd: the objective returned shape {:?}; expected ({b},) or a single value",
            loss.dims()
        )
    }
    Ok(())
}

/// The objective's value per example, `(B,)`, detached (a single value is broadcast).
fn per_example(loss: &Tensor, b: usize) -> Result<Tensor> {
    check_loss(loss, b)?;
    let loss = loss.detach();
    if loss.elem_count() == b {
        loss.reshape(b)
    } else {
        loss.reshape(1)?.broadcast_as(b)?.contiguous()
    }
}

/// `1` where `new` is at least as good as `old` (ties go to `new`), `(B, 1)` u8.
fn better(new: &Tensor, old: &Tensor, minimize: bool) -> Result<Tensor> {
    let mask = if minimize { new.le(old)? } else { new.ge(old)? };
    mask.unsqueeze(1)
}

/// Keeps, per example, `(δ, loss)` from `cand` where it is at least as good as `best`.
fn keep_best(
    best: Option<(Tensor, Tensor)>,
    cand: (Tensor, Tensor),
    minimize: bool,
) -> Result<(Tensor, Tensor)> {
    let Some((bd, bl)) = best else {
        return Ok(cand);
    };
    let (cd, cl) = cand;
    let mask = better(&cl, &bl, minimize)?;
    let delta = mask.broadcast_as(cd.shape())?.where_cond(&cd, &bd)?;
    let loss = mask.squeeze(1)?.where_cond(&cl, &bl)?;
    Ok((delta, loss))
}

/// Adds the parameters' gradients from `grads` into `acc` (detached sums).
fn accumulate(acc: &mut GradStore, grads: &GradStore, params: &[(String, Var)]) -> Result<()> {
    for (_, var) in params {
        if let Some(g) = grads.get(var) {
            let sum = match acc.get(var) {
                Some(prev) => prev.add(g)?.detach(),
                None => g.detach(),
            };
            acc.insert(var, sum);
        }
    }
    Ok(())
}

/// The shared body of [`pgd`] and [`pgd_accumulate`].
fn run(
    x: &Tensor,
    mut objective: impl FnMut(&Tensor) -> Result<Tensor>,
    cfg: &PgdConfig,
    rng: &mut Rng,
    mut acc: Option<(&[(String, Var)], &mut GradStore)>,
) -> Result<PgdResult> {
    cfg.validate()?;
    if x.rank() < 2 {
        bail!("pgd: x must be (B, ...) with rank >= 2, got {:?}", x.dims())
    }
    let shape = x.shape().clone();
    let b = x.dim(0)?;
    let n = x.elem_count() / b.max(1);
    let xf = x.detach().reshape((b, n))?;
    let eval = |objective: &mut dyn FnMut(&Tensor) -> Result<Tensor>, delta: &Tensor| {
        let xa = xf.add(delta)?.reshape(&shape)?;
        per_example(&objective(&xa)?, b)
    };

    let mut best: Option<(Tensor, Tensor)> = None;
    let mut best_delta: Option<Tensor> = None;
    for _ in 0..cfg.restarts {
        let mut delta = init_delta(b, n, cfg, rng, x.dtype(), x.device())?;
        if cfg.clamp_after_init {
            delta = project_box(&xf, &delta)?;
        }
        let mut measured: Option<(Tensor, Tensor)> = None;
        for _ in 0..cfg.steps {
            let dv = Var::from_tensor(&delta)?;
            let xa = xf.add(dv.as_tensor())?.reshape(&shape)?;
            let loss = objective(&xa)?;
            check_loss(&loss, b)?;
            let grads = loss.sum_all()?.backward()?;
            let Some(g) = grads.get(dv.as_tensor()) else {
                bail!("pgd: the objective does not depend on its input (no gradient wrt delta)")
            };
            if let Some((params, store)) = acc.as_mut() {
                accumulate(store, &grads, params)?;
            }
            if cfg.select == Select::BestMeasured {
                let cand = (delta.clone(), per_example(&loss, b)?);
                measured = Some(keep_best(measured, cand, cfg.minimize)?);
            }
            let g = if cfg.minimize { g.neg()? } else { g.detach() };
            let stepped = (&delta + (step_direction(&g, cfg.norm)? * cfg.alpha)?)?;
            delta = renorm(&stepped, cfg.norm, cfg.eps)?;
            if cfg.project_box {
                delta = project_box(&xf, &delta)?;
            }
            delta = delta.detach();
        }
        let (cand_delta, cand_loss) = match measured {
            Some((d, l)) => (d, Some(l)),
            None if cfg.needs_final_eval() => {
                let l = eval(&mut objective, &delta)?;
                (delta, Some(l))
            }
            None => (delta, None),
        };
        match cand_loss {
            Some(l) => best = Some(keep_best(best, (cand_delta, l), cfg.minimize)?),
            // Only with restarts == 1 (otherwise the loss is always evaluated).
            None => best_delta = Some(cand_delta),
        }
    }
    let (delta, loss) = match (best, best_delta) {
        (Some((d, l)), _) => (d, Some(l)),
        (None, Some(d)) => (d, None),
        (None, None) => bail!("pgd: no restart ran"),
    };
    let mut adv = xf.add(&delta)?;
    if cfg.project_box {
        adv = adv.clamp(0.0, 1.0)?;
    }
    Ok(PgdResult {
        adv: adv.reshape(&shape)?,
        delta: delta.reshape(&shape)?,
        loss,
    })
}

/// The persistent perturbation of free adversarial training (CF-AMC-SSL; METHODS.md 2.5).
///
/// One replay: `let (dv, xa) = fd.perturb(&x)?;` → forward `xa` → loss → `backward` (one pass
/// gives `∇_θ` and `∇_δ`) → optimiser step → scheduler step →
/// `fd.ascend(grads.get(&dv)…, &x, eps, alpha)?`. Call [`FreeDelta::new_batch`] when a new
/// minibatch arrives.
#[derive(Debug, Clone)]
pub struct FreeDelta {
    delta: Tensor,
    reproject_on_new_batch: bool,
}

impl FreeDelta {
    /// A zero perturbation with the (fixed, `drop_last`) batch shape. `reproject_on_new_batch`
    /// is the clean mode of \[Q10\]; `false` is the reference.
    pub fn zeros(
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
        reproject_on_new_batch: bool,
    ) -> Result<Self> {
        Ok(Self {
            delta: Tensor::zeros(shape, dtype, device)?,
            reproject_on_new_batch,
        })
    }

    /// A perturbation resumed from a saved `delta` (see [`FreeDelta::delta`]).
    pub fn from_tensor(delta: &Tensor, reproject_on_new_batch: bool) -> Self {
        Self {
            delta: delta.detach(),
            reproject_on_new_batch,
        }
    }

    /// [`FreeDelta::zeros`] with the shape, dtype and device of `x`.
    pub fn zeros_like(x: &Tensor, reproject_on_new_batch: bool) -> Result<Self> {
        Self::zeros(x.shape(), x.dtype(), x.device(), reproject_on_new_batch)
    }

    /// The current perturbation (detached).
    pub fn delta(&self) -> &Tensor {
        &self.delta
    }

    /// Whether [`FreeDelta::new_batch`] re-projects (the clean mode of \[Q10\]).
    pub fn reprojects_on_new_batch(&self) -> bool {
        self.reproject_on_new_batch
    }

    /// Call when a new minibatch `x` arrives: the clean mode re-projects `δ` into the box for
    /// `x`; the faithful mode (\[Q10\]) leaves it relative to the previous batch.
    ///
    /// # Errors
    /// A shape mismatch between `x` and `δ`.
    pub fn new_batch(&mut self, x: &Tensor) -> Result<()> {
        self.check(x)?;
        if self.reproject_on_new_batch {
            self.delta = project_box(&x.detach(), &self.delta)?.detach();
        }
        Ok(())
    }

    /// A fresh `Var` holding `δ` and the input `x + δ` built on it: after the backward,
    /// `grads.get(&var)` is `∇_δ`.
    ///
    /// # Errors
    /// A shape mismatch between `x` and `δ`.
    pub fn perturb(&self, x: &Tensor) -> Result<(Var, Tensor)> {
        self.check(x)?;
        let var = Var::from_tensor(&self.delta)?;
        let xa = x.detach().add(var.as_tensor())?;
        Ok((var, xa))
    }

    /// The ascent step `δ ← clip(δ + α sign(grad), −ε, ε)`, then `δ ← clip(x + δ, 0, 1) − x`
    /// relative to the current batch `x`.
    ///
    /// # Errors
    /// A shape mismatch between `x`, `grad` and `δ`.
    pub fn ascend(&mut self, grad: &Tensor, x: &Tensor, eps: f64, alpha: f64) -> Result<()> {
        self.check(x)?;
        self.check(grad)?;
        let stepped = (&self.delta + (grad.detach().sign()? * alpha)?)?;
        let clipped = project_linf(&stepped, eps)?;
        self.delta = project_box(&x.detach(), &clipped)?.detach();
        Ok(())
    }

    fn check(&self, t: &Tensor) -> Result<()> {
        if t.shape() != self.delta.shape() {
            bail!(
                "free adversarial delta has shape {:?} but the batch has {:?} (use drop_last)",
                self.delta.dims(),
                t.dims()
            )
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::optim::{Sgd, SgdConfig};
    use candle::D;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn cpu() -> Device {
        Device::Cpu
    }

    fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
        t.flatten_from(1)?.to_dtype(DType::F64)?.to_vec2::<f64>()
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    /// A batch in [0, 1] with many pixels at the box edges (so the box binds).
    fn edgy_batch(b: usize, rng: &mut Rng) -> Result<Tensor> {
        let v: Vec<f32> = (0..b * 3 * 4 * 4)
            .map(|_| match rng.below(4) {
                0 => 0.0,
                1 => 1.0,
                _ => rng.f32(),
            })
            .collect();
        Tensor::from_vec(v, (b, 3, 4, 4), &cpu())
    }

    /// A non-linear objective with a non-trivial input gradient: Σ w·x + Σ sin(3x).
    fn wavy(w: &Tensor) -> impl Fn(&Tensor) -> Result<Tensor> + '_ {
        move |xa: &Tensor| {
            let lin = xa.broadcast_mul(w)?.flatten_from(1)?.sum(1)?;
            let wave = (xa * 3.0)?.sin()?.flatten_from(1)?.sum(1)?;
            lin + wave
        }
    }

    #[test]
    fn stays_in_ball_and_box_for_every_step_count() -> TestResult {
        let mut rng = Rng::new(11);
        let x = edgy_batch(5, &mut rng)?;
        let wv: Vec<f32> = (0..48).map(|_| rng.normal() as f32).collect();
        let w = Tensor::from_vec(wv, (1, 3, 4, 4), &cpu())?;
        for (norm, eps, alpha) in [
            (Norm::Linf, 8.0 / 255.0, 2.0 / 255.0),
            (Norm::L2, 0.5, 0.2),
            (Norm::L1, 2.0, 0.9),
        ] {
            for steps in 0..=6 {
                for minimize in [false, true] {
                    let cfg = PgdConfig {
                        minimize,
                        ..PgdConfig::new(norm, eps, alpha, steps)
                    };
                    let out = pgd(&x, wavy(&w), &cfg, &mut rng)?;
                    let xs = rows(&x)?;
                    let adv = rows(&out.adv)?;
                    let delta = rows(&out.delta)?;
                    for ((xr, ar), dr) in xs.iter().zip(&adv).zip(&delta) {
                        let n = match norm {
                            Norm::Linf => dr.iter().fold(0.0f64, |m, v| m.max(v.abs())),
                            Norm::L2 => dr.iter().map(|v| v * v).sum::<f64>().sqrt(),
                            Norm::L1 => dr.iter().map(|v| v.abs()).sum::<f64>(),
                        };
                        assert!(n <= eps * (1.0 + 1e-6) + 1e-7, "{norm:?} {steps}: {n}");
                        for ((xi, ai), di) in xr.iter().zip(ar).zip(dr) {
                            assert!((0.0..=1.0).contains(ai), "{norm:?} {steps}: {ai}");
                            assert!((xi + di - ai).abs() < 1e-6);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn projections_on_hand_made_vectors() -> TestResult {
        // torch.tensor([[3., 4.], [.3, .4]], dtype=torch.float64).renorm(p=2, dim=0, maxnorm=1.)
        //   -> [[0.5999999880000002, 0.7999999840000003], [0.3, 0.4]]
        // ....renorm(p=1, dim=0, maxnorm=1.)
        //   -> [[0.42857142244897967, 0.5714285632653062], [0.3, 0.4]]
        let d = Tensor::new(&[[3.0f64, 4.0], [0.3, 0.4]], &cpu())?;
        let l2 = project_l2(&d, 1.0)?.to_vec2::<f64>()?;
        assert_close(&l2[0], &[0.5999999880000002, 0.7999999840000003], 1e-15);
        assert_eq!(l2[1], vec![0.3, 0.4]);
        let l1 = project_l1(&d, 1.0)?.to_vec2::<f64>()?;
        assert_close(&l1[0], &[0.42857142244897967, 0.5714285632653062], 1e-15);
        assert_eq!(l1[1], vec![0.3, 0.4]);
        // l_inf clips per coordinate; the box keeps x + δ in [0, 1].
        let li = project_linf(&d, 0.35)?.to_vec2::<f64>()?;
        assert_eq!(li, vec![vec![0.35, 0.35], vec![0.3, 0.35]]);
        let x = Tensor::new(&[[0.9f64, 0.1], [0.5, 0.5]], &cpu())?;
        let dd = Tensor::new(&[[0.2f64, -0.3], [0.2, -0.6]], &cpu())?;
        let bx = project_box(&x, &dd)?.to_vec2::<f64>()?;
        assert_close(&bx[0], &[0.1, -0.1], 1e-15);
        assert_close(&bx[1], &[0.2, -0.5], 1e-15);
        // Rank 4: the norm is over all of C·H·W.
        let d4 = Tensor::new(&[3.0f64, 0.0, 0.0, 4.0], &cpu())?.reshape((1, 1, 2, 2))?;
        let p4 = project_l2(&d4, 2.5)?.flatten_all()?.to_vec1::<f64>()?;
        let s = 2.5 / (5.0 + 1e-7);
        assert_close(&p4, &[3.0 * s, 0.0, 0.0, 4.0 * s], 1e-15);
        Ok(())
    }

    #[test]
    fn normalised_steps_match_hand_values() -> TestResult {
        // J = Σ w·x is linear, so ∇ = w: one l_2 step from δ = 0 is α w/‖w‖₂, one l_1 step
        // α w/‖w‖₁, and T l_inf steps clip T α sign(w) at ε.
        let x = Tensor::full(0.5f64, (1, 1, 1, 2), &cpu())?;
        let w = Tensor::new(&[3.0f64, -4.0], &cpu())?.reshape((1, 1, 1, 2))?;
        let obj = |xa: &Tensor| xa.broadcast_mul(&w)?.flatten_from(1)?.sum(1);
        let run1 = |norm, eps, alpha, steps| -> Result<Vec<f64>> {
            let cfg = PgdConfig {
                random_start: false,
                ..PgdConfig::new(norm, eps, alpha, steps)
            };
            pgd(&x, obj, &cfg, &mut Rng::new(0))?
                .delta
                .flatten_all()?
                .to_vec1::<f64>()
        };
        let l2 = run1(Norm::L2, 1.0, 0.1, 1)?;
        assert_close(
            &l2,
            &[0.1 * 3.0 / (5.0 + 1e-10), -0.1 * 4.0 / (5.0 + 1e-10)],
            1e-15,
        );
        let l1 = run1(Norm::L1, 1.0, 0.14, 1)?;
        assert_close(
            &l1,
            &[0.14 * 3.0 / (7.0 + 1e-10), -0.14 * 4.0 / (7.0 + 1e-10)],
            1e-15,
        );
        // Two l_2 steps of 0.4 overshoot ε = 0.5: rescaled to ε/(0.8 + 1e-7) of (0.48, -0.64).
        let l2b = run1(Norm::L2, 0.5, 0.4, 2)?;
        let s = 0.5 / (0.8 + 1e-7);
        assert_close(&l2b, &[0.48 * s, -0.64 * s], 1e-12);
        let li = run1(Norm::Linf, 0.1, 0.04, 3)?;
        assert_close(&li, &[0.1, -0.1], 1e-15);
        let fgsm = pgd(&x, obj, &PgdConfig::fgsm(0.03), &mut Rng::new(0))?;
        assert_close(
            &fgsm.delta.flatten_all()?.to_vec1::<f64>()?,
            &[0.03, -0.03],
            1e-15,
        );
        Ok(())
    }

    #[test]
    fn no_random_start_and_zero_steps_returns_x() -> TestResult {
        let mut rng = Rng::new(3);
        let x = edgy_batch(4, &mut rng)?;
        let w = Tensor::ones((1, 3, 4, 4), DType::F32, &cpu())?;
        for norm in [Norm::Linf, Norm::L2, Norm::L1] {
            let cfg = PgdConfig {
                random_start: false,
                ..PgdConfig::new(norm, 0.1, 0.01, 0)
            };
            let out = pgd(&x, wavy(&w), &cfg, &mut rng)?;
            assert_eq!(rows(&out.adv)?, rows(&x)?);
            assert!(out.loss.is_none());
        }
        Ok(())
    }

    #[test]
    fn random_start_draws_from_the_seeded_rng() -> TestResult {
        let mut rng = Rng::new(4);
        let x = Tensor::full(0.5f32, (3, 2, 2, 2), &cpu())?;
        let w = Tensor::ones((1, 2, 2, 2), DType::F32, &cpu())?;
        // steps = 0 with a random start returns δ⁽⁰⁾ itself: check it against a replay of the
        // documented draw order.
        let cfg = PgdConfig::new(Norm::Linf, 0.1, 0.01, 0);
        let mut r = Rng::new(9);
        let out = pgd(&x, wavy(&w), &cfg, &mut r)?;
        let mut replay = Rng::new(9);
        let expect: Vec<f64> = (0..24).map(|_| replay.uniform(-0.1, 0.1)).collect();
        let got: Vec<f64> = rows(&out.delta)?.concat();
        assert_close(&got, &expect, 1e-7);
        // l_2: normals then one radius per example.
        let cfg = PgdConfig::new(Norm::L2, 0.3, 0.01, 0);
        let out = pgd(&x, wavy(&w), &cfg, &mut Rng::new(9))?;
        let mut replay = Rng::new(9);
        let u: Vec<f64> = (0..24).map(|_| replay.normal()).collect();
        let r: Vec<f64> = (0..3).map(|_| replay.f64()).collect();
        for (i, row) in rows(&out.delta)?.iter().enumerate() {
            let ui = &u[i * 8..(i + 1) * 8];
            let nu = ui.iter().map(|v| v * v).sum::<f64>().sqrt();
            let e: Vec<f64> = ui.iter().map(|v| r[i] * 0.3 * v / nu).collect();
            assert_close(row, &e, 1e-7);
        }
        // Same seed, same attack (with steps); another seed differs.
        let cfg = PgdConfig::new(Norm::L2, 0.3, 0.1, 3);
        let a = pgd(&x, wavy(&w), &cfg, &mut Rng::new(5))?;
        let b = pgd(&x, wavy(&w), &cfg, &mut Rng::new(5))?;
        let c = pgd(&x, wavy(&w), &cfg, &mut rng)?;
        assert_eq!(rows(&a.adv)?, rows(&b.adv)?);
        assert_ne!(rows(&a.adv)?, rows(&c.adv)?);
        Ok(())
    }

    #[test]
    fn unclamped_init_reaches_the_first_forward() -> TestResult {
        // [Q31]/[Q48]: without clamp_after_init the first forward sees x + δ⁽⁰⁾ outside [0, 1].
        let x = Tensor::ones((2, 1, 2, 2), DType::F64, &cpu())?;
        let seen = std::cell::RefCell::new(Vec::new());
        let obj = |xa: &Tensor| {
            seen.borrow_mut().push(
                xa.max_keepdim(0)?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f64>()?,
            );
            xa.flatten_from(1)?.sum(1)
        };
        for (clamp, above) in [(true, false), (false, true)] {
            seen.borrow_mut().clear();
            let cfg = PgdConfig {
                clamp_after_init: clamp,
                ..PgdConfig::new(Norm::Linf, 0.1, 0.01, 1)
            };
            let out = pgd(&x, obj, &cfg, &mut Rng::new(1))?;
            assert_eq!(seen.borrow()[0] > 1.0, above);
            // The box is applied after the step either way.
            assert!(rows(&out.adv)?.concat().iter().all(|v| *v <= 1.0));
        }
        Ok(())
    }

    #[test]
    fn restarts_keep_the_per_example_best() -> TestResult {
        // J(x + δ) = Σ δ-ish: with steps = 0 the candidates are the random starts themselves,
        // so the winner of each example is the restart whose start scored best for it.
        let b = 8;
        let x = Tensor::full(0.5f64, (b, 1, 2, 2), &cpu())?;
        let obj = |xa: &Tensor| (xa - 0.5)?.flatten_from(1)?.sum(1);
        for minimize in [false, true] {
            let one = PgdConfig {
                minimize,
                ..PgdConfig::new(Norm::Linf, 0.2, 0.01, 0)
            };
            let mut r = Rng::new(21);
            let starts: Vec<Vec<Vec<f64>>> = (0..3)
                .map(|_| rows(&pgd(&x, obj, &one, &mut r)?.delta))
                .collect::<Result<_>>()?;
            let cfg = PgdConfig { restarts: 3, ..one };
            let out = pgd(&x, obj, &cfg, &mut Rng::new(21))?;
            let got = rows(&out.delta)?;
            let losses = out
                .loss
                .ok_or("restarts evaluate the loss")?
                .to_vec1::<f64>()?;
            let mut winners = std::collections::BTreeSet::new();
            for i in 0..b {
                let score = |r: usize| starts[r][i].iter().sum::<f64>();
                let best = (0..3)
                    .max_by(|&p, &q| {
                        let (sp, sq) = (score(p), score(q));
                        if minimize {
                            sq.total_cmp(&sp)
                        } else {
                            sp.total_cmp(&sq)
                        }
                    })
                    .ok_or("three restarts")?;
                winners.insert(best);
                assert_eq!(got[i], starts[best][i], "example {i}");
                assert!((losses[i] - score(best)).abs() < 1e-12);
            }
            // The order matters: examples pick different restarts (not just the last one).
            assert!(winners.len() >= 2, "{winners:?}");
        }
        Ok(())
    }

    #[test]
    fn best_measured_returns_the_best_evaluated_iterate() -> TestResult {
        // Minimising (δ − 0.05)² with l_inf steps of 0.04 from 0: the iterates oscillate
        // 0, 0.04, 0.08, 0.04, 0.08; each loss is measured before its update, so the best
        // measured iterate is 0.04 (loss 1e-4) whatever the step count, while the last iterate
        // is 0.04 after 3 steps and 0.08 after 4.
        let x = Tensor::full(0.5f64, (1, 1, 1, 1), &cpu())?;
        let obj = |xa: &Tensor| ((xa - 0.55)?.sqr()?).flatten_from(1)?.sum(1);
        let cfg = PgdConfig {
            random_start: false,
            minimize: true,
            select: Select::BestMeasured,
            ..PgdConfig::new(Norm::Linf, 0.1, 0.04, 3)
        };
        let out = pgd(&x, obj, &cfg, &mut Rng::new(0))?;
        let d = out.delta.flatten_all()?.to_vec1::<f64>()?;
        assert_close(&d, &[0.04], 1e-12);
        let l = out.loss.ok_or("measured losses")?.to_vec1::<f64>()?;
        assert_close(&l, &[0.01f64.powi(2)], 1e-12);
        let last = pgd(
            &x,
            obj,
            &PgdConfig {
                select: Select::Last,
                ..cfg
            },
            &mut Rng::new(0),
        )?;
        assert_close(&last.delta.flatten_all()?.to_vec1::<f64>()?, &[0.04], 1e-12);
        let four = PgdConfig { steps: 4, ..cfg };
        let l4 = pgd(
            &x,
            obj,
            &PgdConfig {
                select: Select::Last,
                ..four
            },
            &mut Rng::new(0),
        )?;
        assert_close(&l4.delta.flatten_all()?.to_vec1::<f64>()?, &[0.08], 1e-12);
        let b4 = pgd(&x, obj, &four, &mut Rng::new(0))?;
        assert_close(&b4.delta.flatten_all()?.to_vec1::<f64>()?, &[0.04], 1e-12);
        Ok(())
    }

    #[test]
    fn bad_objectives_and_settings_are_errors() -> TestResult {
        let x = Tensor::full(0.5f64, (2, 1, 1, 2), &cpu())?;
        let cfg = PgdConfig::new(Norm::Linf, 0.1, 0.01, 1);
        let constant = |_: &Tensor| Tensor::new(&[1.0f64, 2.0], &Device::Cpu);
        assert!(pgd(&x, constant, &cfg, &mut Rng::new(0)).is_err());
        let wrong_shape = |xa: &Tensor| xa.flatten_from(1);
        assert!(pgd(&x, wrong_shape, &cfg, &mut Rng::new(0)).is_err());
        let ok = |xa: &Tensor| xa.sum_all();
        let zero_restarts = PgdConfig { restarts: 0, ..cfg };
        assert!(pgd(&x, ok, &zero_restarts, &mut Rng::new(0)).is_err());
        let neg_eps = PgdConfig { eps: -1.0, ..cfg };
        assert!(pgd(&x, ok, &neg_eps, &mut Rng::new(0)).is_err());
        // A batch-level (scalar) objective is accepted and broadcast.
        let fin = PgdConfig {
            final_loss: true,
            ..cfg
        };
        let out = pgd(&x, ok, &fin, &mut Rng::new(0))?;
        let l = out.loss.ok_or("final_loss")?.to_vec1::<f64>()?;
        assert_eq!(l.len(), 2);
        assert_eq!(l[0], l[1]);
        Ok(())
    }

    /// Separable toy problem: 4-pixel images whose mean is 0.3 ± 0.08 (class 0) or
    /// 0.7 ± 0.08 (class 1), per-pixel noise ±0.1.
    fn toy_data(n: usize, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
        let mut xs = Vec::with_capacity(n * 4);
        let mut ys = Vec::with_capacity(n);
        for i in 0..n {
            let y = (i % 2) as u32;
            let centre = if y == 0 { 0.3 } else { 0.7 } + rng.uniform(-0.08, 0.08);
            xs.extend((0..4).map(|_| (centre + rng.uniform(-0.1, 0.1)) as f32));
            ys.push(y);
        }
        Ok((
            Tensor::from_vec(xs, (n, 1, 2, 2), &Device::Cpu)?,
            Tensor::from_vec(ys, n, &Device::Cpu)?,
        ))
    }

    /// Per-example cross-entropy of a linear classifier `(2, 4)` + bias.
    fn ce(x: &Tensor, y: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let logits = x.flatten_from(1)?.matmul(&w.t()?)?.broadcast_add(bias)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    }

    #[test]
    fn pgd_attacks_a_trained_toy_model() -> TestResult {
        let mut rng = Rng::new(7);
        let (x, y) = toy_data(200, &mut rng)?;
        let init: Vec<f32> = (0..8).map(|_| rng.uniform(-0.1, 0.1) as f32).collect();
        let w = Var::from_tensor(&Tensor::from_vec(init, (2, 4), &cpu())?)?;
        let bias = Var::zeros(2, DType::F32, &cpu())?;
        let params = vec![
            ("w".to_string(), w.clone()),
            ("b".to_string(), bias.clone()),
        ];
        let cfg = SgdConfig {
            lr: 0.5,
            momentum: 0.9,
            ..SgdConfig::default()
        };
        let mut opt = Sgd::new_named(&params, cfg)?;
        for _ in 0..300 {
            let loss = ce(&x, &y, &w, &bias)?.mean_all()?;
            opt.step(&loss.backward()?)?;
        }
        // The objective uses detached weights: gradients wrt the input only.
        let (wd, bd) = (w.as_detached_tensor(), bias.as_detached_tensor());
        let objective = |xa: &Tensor| ce(xa, &y, &wd, &bd);
        let clean = objective(&x)?;
        let predict = |xa: &Tensor| -> Result<Vec<u32>> {
            xa.flatten_from(1)?
                .matmul(&wd.t()?)?
                .broadcast_add(&bd)?
                .argmax(1)?
                .to_vec1::<u32>()
        };
        let labels = y.to_vec1::<u32>()?;
        let clean_pred = predict(&x)?;
        let clean_acc = clean_pred
            .iter()
            .zip(&labels)
            .filter(|(p, l)| p == l)
            .count();
        assert!(
            clean_acc >= 196,
            "the toy model is trained: {clean_acc}/200"
        );
        let clean_ce = clean.mean_all()?.to_scalar::<f32>()?;

        let linf = PgdConfig {
            final_loss: true,
            ..PgdConfig::new(Norm::Linf, 0.3, 0.05, 10)
        };
        let out = pgd(&x, objective, &linf, &mut rng)?;
        let adv_ce = out
            .loss
            .ok_or("final_loss")?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!(adv_ce > clean_ce + 1.0, "{adv_ce} vs {clean_ce}");
        let adv_pred = predict(&out.adv)?;
        let flipped = adv_pred
            .iter()
            .zip(&clean_pred)
            .filter(|(a, c)| a != c)
            .count();
        assert!(
            flipped >= 180,
            "l_inf PGD-10 at 0.3 flips most predictions: {flipped}/200"
        );
        // Per example the loss does not decrease (the attack only climbs on a linear model).
        let per_clean = clean.to_vec1::<f32>()?;
        let per_adv = objective(&out.adv)?.to_vec1::<f32>()?;
        assert!(per_adv.iter().zip(&per_clean).all(|(a, c)| a >= c));

        // l_2 and l_1 raise the loss too (weaker at these budgets).
        for (norm, eps, alpha) in [(Norm::L2, 0.4, 0.1), (Norm::L1, 0.8, 0.2)] {
            let cfg = PgdConfig {
                final_loss: true,
                ..PgdConfig::new(norm, eps, alpha, 10)
            };
            let out = pgd(&x, objective, &cfg, &mut rng)?;
            let l = out
                .loss
                .ok_or("final_loss")?
                .mean_all()?
                .to_scalar::<f32>()?;
            assert!(l > clean_ce + 0.05, "{norm:?}: {l} vs {clean_ce}");
        }

        // Minimise mode decreases the loss.
        let down = PgdConfig {
            minimize: true,
            final_loss: true,
            ..PgdConfig::new(Norm::Linf, 0.1, 0.02, 10)
        };
        let out = pgd(&x, objective, &down, &mut rng)?;
        let l = out
            .loss
            .ok_or("final_loss")?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!(l < clean_ce * 0.7, "{l} vs {clean_ce}");
        Ok(())
    }

    #[test]
    fn accumulate_sums_parameter_gradients_of_every_step() -> TestResult {
        // J = Σ_b Σ_i w_i (x + δ)_bi, so ∇_δ = w (signs +, −) and ∇_w J(δ⁽ᵗ⁾) = Σ_b (x + δ⁽ᵗ⁾)_b.
        // Iterates (α = 0.05, no box contact): δ⁽ᵗ⁾ = (0.05 t, −0.05 t) in both rows, so
        // Σ_{t=0..2} ∇_w = 3 (0.7, 1.5) + 2 (0.15, −0.15) = (2.4, 4.2).
        let x = Tensor::new(&[[0.2f64, 0.6], [0.5, 0.9]], &cpu())?;
        let w = Var::new(&[1.0f64, -2.0], &cpu())?;
        let params = vec![("w".to_string(), w.clone())];
        let obj = |xa: &Tensor| xa.broadcast_mul(w.as_tensor())?.sum(1);
        let cfg = PgdConfig {
            random_start: false,
            ..PgdConfig::new(Norm::Linf, 0.2, 0.05, 3)
        };
        let (out, acc) = pgd_accumulate(&x, obj, &cfg, &mut Rng::new(0), &params)?;
        let gw = acc.get(&w).ok_or("w has a gradient")?;
        assert_close(&gw.to_vec1::<f64>()?, &[2.4, 4.2], 1e-12);
        assert!(!gw.track_op());
        assert_close(
            &rows(&out.delta)?.concat(),
            &[0.15, -0.15, 0.15, -0.15],
            1e-12,
        );
        // Plain pgd on the same live weights gives the same δ (its parameter gradients are
        // computed and dropped).
        let plain = pgd(&x, obj, &cfg, &mut Rng::new(0))?;
        assert_eq!(rows(&plain.delta)?, rows(&out.delta)?);
        Ok(())
    }

    #[test]
    fn free_delta_persists_and_respects_both_projections() -> TestResult {
        let x1 = Tensor::new(&[[1.0f64, 0.0, 0.5, 0.5]], &cpu())?;
        let g = Tensor::new(&[[1.0f64, -1.0, 2.0, -3.0]], &cpu())?;
        let mut fd = FreeDelta::zeros_like(&x1, false)?;
        assert_eq!(fd.delta().to_vec2::<f64>()?, vec![vec![0.0; 4]]);
        fd.ascend(&g, &x1, 0.03, 0.01)?;
        assert_close(&rows(fd.delta())?[0], &[0.0, 0.0, 0.01, -0.01], 1e-15);
        fd.ascend(&g, &x1, 0.03, 0.01)?;
        assert_close(&rows(fd.delta())?[0], &[0.0, 0.0, 0.02, -0.02], 1e-15);
        for _ in 0..3 {
            fd.ascend(&g, &x1, 0.03, 0.01)?;
        }
        // Clipped at ε; the box pins the pixels at 1 and 0.
        assert_close(&rows(fd.delta())?[0], &[0.0, 0.0, 0.03, -0.03], 1e-12);

        // A new batch: the faithful mode keeps δ relative to the old batch ([Q10]), so the first
        // replay sees x + δ outside [0, 1]; the clean mode re-projects.
        let x2 = Tensor::new(&[[0.5f64, 0.5, 0.99, 0.01]], &cpu())?;
        let mut clean = fd.clone();
        clean.reproject_on_new_batch = true;
        fd.new_batch(&x2)?;
        let (var, xa) = fd.perturb(&x2)?;
        let xa = xa.to_vec2::<f64>()?;
        assert!(xa[0][2] > 1.0 && xa[0][3] < 0.0, "{xa:?}");
        clean.new_batch(&x2)?;
        let (_, xc) = clean.perturb(&x2)?;
        assert!(rows(&xc)?[0].iter().all(|v| (0.0..=1.0).contains(v)));

        // The Var gives ∇_δ; one ascent on x2 re-projects relative to x2.
        let loss = xa_loss(&x2, &var)?;
        let grads = loss.backward()?;
        let gd = grads.get(&var).ok_or("∇δ")?;
        assert_eq!(gd.to_vec2::<f64>()?, vec![vec![1.0, 1.0, 1.0, 1.0]]);
        fd.ascend(gd, &x2, 0.03, 0.01)?;
        assert_close(&rows(fd.delta())?[0], &[0.01, 0.01, 0.01, -0.01], 1e-12);
        assert!(
            fd.ascend(gd, &Tensor::zeros((2, 4), DType::F64, &cpu())?, 0.03, 0.01)
                .is_err()
        );
        Ok(())
    }

    fn xa_loss(x: &Tensor, var: &Var) -> Result<Tensor> {
        x.add(var.as_tensor())?.sum_all()
    }

    #[test]
    fn early_stop_with_every_example_active_is_plain_pgd() -> TestResult {
        let mut rng = Rng::new(21);
        let x = edgy_batch(4, &mut rng)?;
        let wv: Vec<f32> = (0..48).map(|_| rng.normal() as f32).collect();
        let w = Tensor::from_vec(wv, (1, 3, 4, 4), &cpu())?;
        for (norm, eps, alpha) in [
            (Norm::Linf, 8.0 / 255.0, 2.0 / 255.0),
            (Norm::L2, 0.5, 0.2),
            (Norm::L1, 2.0, 0.9),
        ] {
            for restarts in [1, 3] {
                let cfg = PgdConfig {
                    restarts,
                    ..PgdConfig::new(norm, eps, alpha, 4)
                };
                let f = wavy(&w);
                let plain = pgd(&x, &f, &cfg, &mut Rng::new(5))?;
                let all = |xa: &Tensor| -> Result<(Tensor, Tensor)> {
                    let l = f(xa)?;
                    let on = l.ones_like()?;
                    Ok((l, on))
                };
                let es = pgd_early_stop(&x, all, &cfg, &mut Rng::new(5))?;
                assert_eq!(rows(&es.adv)?, rows(&plain.adv)?, "{norm:?} x{restarts}");
                match (es.loss, plain.loss) {
                    (Some(a), Some(b)) => assert_eq!(a.to_vec1::<f32>()?, b.to_vec1::<f32>()?),
                    (None, None) => assert_eq!(restarts, 1),
                    _ => panic!("{norm:?} x{restarts}: one returned a loss, the other not"),
                }
            }
        }
        Ok(())
    }

    #[test]
    fn early_stop_freezes_examples_once_they_are_inactive() -> TestResult {
        // J = Σ w·x per example; an example is active while J < its threshold. l_inf sign steps
        // from x = 0.5 raise J by α Σ|w| per step, so example b stops after
        // t_b = ceil((thr_b − J₀)/(α Σ|w|)) steps (0: inactive from the start, δ stays 0).
        let w = Tensor::new(&[1.0f64, -2.0, 0.5, 1.5], &cpu())?.reshape((1, 1, 2, 2))?;
        let x = Tensor::full(0.5f64, (3, 1, 2, 2), &cpu())?;
        let j0 = 0.5 * (1.0 - 2.0 + 0.5 + 1.5);
        let (alpha, rate) = (0.01, 0.01 * 5.0);
        let thr = [j0 - 1.0, j0 + 2.5 * rate, j0 + 100.0];
        let thr_t = Tensor::new(&thr, &cpu())?;
        let objective = |xa: &Tensor| -> Result<(Tensor, Tensor)> {
            let j = xa.broadcast_mul(&w)?.flatten_from(1)?.sum(1)?;
            let active = j.lt(&thr_t)?;
            Ok((j, active))
        };
        let cfg = PgdConfig {
            random_start: false,
            ..PgdConfig::new(Norm::Linf, 0.3, alpha, 6)
        };
        let out = pgd_early_stop(&x, objective, &cfg, &mut Rng::new(0))?;
        let sign = [1.0, -1.0, 1.0, 1.0];
        for (b, t) in [0usize, 3, 6].into_iter().enumerate() {
            let want: Vec<f64> = sign.iter().map(|s| s * alpha * t as f64).collect();
            assert_close(&rows(&out.delta)?[b], &want, 1e-12);
        }
        // without early stop every example takes all 6 steps
        let plain = pgd(
            &x,
            |xa: &Tensor| objective(xa).map(|(j, _)| j),
            &cfg,
            &mut Rng::new(0),
        )?;
        for r in rows(&plain.delta)? {
            assert_close(&r, &sign.map(|s| s * alpha * 6.0), 1e-12);
        }
        // a wrong mask shape and an unsupported selection are errors
        let bad = |xa: &Tensor| -> Result<(Tensor, Tensor)> {
            let j = xa.flatten_from(1)?.sum(1)?;
            Ok((j, Tensor::ones(2, DType::U8, &cpu())?))
        };
        assert!(pgd_early_stop(&x, bad, &cfg, &mut Rng::new(0)).is_err());
        let best = PgdConfig {
            select: Select::BestMeasured,
            ..cfg
        };
        assert!(pgd_early_stop(&x, objective, &best, &mut Rng::new(0)).is_err());
        Ok(())
    }
}
