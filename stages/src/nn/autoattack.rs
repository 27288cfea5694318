//! AutoAttack "standard" in l_inf (Croce & Hein 2020; METHODS.md 11.4, R-AA `autoattack/`):
//! APGD-CE, APGD-T, FAB-T and Square run in sequence, each only on the points that are still
//! correctly classified; the robust accuracy is the fraction no attack fooled.
//!
//! | attack | what it does (METHODS.md 11.4) |
//! |---|---|
//! | APGD-CE | APGD on the cross-entropy, 1 restart, `N` iterations |
//! | APGD-T | APGD on the targeted DLR loss, one run per target: the 2nd … 10th highest-scoring classes on the clean input |
//! | FAB-T | minimum-norm targeted FAB (same targets), `alpha_max` 0.1, `eta` 1.05, `beta` 0.9, no random start; a success counts only within ε |
//! | Square | black-box random search on the margin loss, `p_init` 0.8, `Q` queries |
//!
//! Presets ([`AaConfig::original`], [`AaConfig::torchattacks`]): R-AA's standard version (APGD
//! `N` = 100, FAB 100 iterations, 9 targets, Square 5000 queries on its unscaled schedule) and
//! what R-CF ran through torchattacks (APGD `N` = 10, FAB 10 iterations, every other class a
//! target (`n_classes - 1`: 9 on CIFAR-10, 99 on CIFAR-100), Square 5000 queries on the schedule
//! rescaled to the query budget). METHODS.md 11.4 / §15 give torchattacks' FAB 100 steps and
//! no target count; the pinned torchattacks (`27e658c`) has `steps=10` for APGD, APGD-T and FAB
//! alike (one commit moved all three from 100) and `n_target_classes = n_classes - 1`. torchattacks seeds with the wall clock (\[Q18\]); here every
//! attack draws from a seeded [`Rng`], so a seed fixes the result.
//!
//! The model is any `FnMut(&Tensor) -> Result<Tensor>` from a `(B, C, H, W)` batch in `[0, 1]`
//! to logits `(B, K)`; APGD and FAB take gradients through it (build it on frozen weights, in
//! eval mode). Every adversarial point an attack returns is checked to lie in the ε-ball and
//! the box before it counts; a point outside is an error, never a success.
//!
//! What follows R-AA to the letter, since it changes results: the APGD checkpoints (first after
//! `max(⌊0.22N⌋, 1)` iterations, the interval shrinking by `max(⌊0.03N⌋, 1)` down to
//! `max(⌊0.06N⌋, 1)`), the oscillation count over the last `k` iterations (whose first window
//! compares the first loss with the still-zero last slot of the loss history, as R-AA's
//! negative index does), the step `2ε` halved per example, the momentum 0.75; the DLR
//! denominator differentiated through the sorted logits; Square's window shared by the batch
//! (one location and one sign per channel per query, location drawn from `0 .. h − s − 1`);
//! FAB's exact l_inf projection (a sort of the breakpoints and a bisection over them).

use candle::{DType, Result, Tensor, Var, bail};
use serde::{Deserialize, Serialize};

use crate::nn::losses::cross_entropy_per_example;
use crate::rng::Rng;

/// One attack of the ensemble.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AaAttack {
    /// APGD on the cross-entropy.
    #[serde(rename = "apgd-ce")]
    ApgdCe,
    /// APGD on the targeted DLR loss.
    #[serde(rename = "apgd-t")]
    ApgdT,
    /// Targeted FAB (minimum l_inf norm).
    #[serde(rename = "fab-t")]
    FabT,
    /// Square, black box.
    #[serde(rename = "square")]
    Square,
}

impl AaAttack {
    /// The four attacks of the standard version, in their order.
    pub const STANDARD: [AaAttack; 4] = [
        AaAttack::ApgdCe,
        AaAttack::ApgdT,
        AaAttack::FabT,
        AaAttack::Square,
    ];

    /// `apgd-ce`, `apgd-t`, `fab-t`, `square` (R-AA's names).
    pub fn name(self) -> &'static str {
        match self {
            AaAttack::ApgdCe => "apgd-ce",
            AaAttack::ApgdT => "apgd-t",
            AaAttack::FabT => "fab-t",
            AaAttack::Square => "square",
        }
    }

    fn code(self) -> u64 {
        match self {
            AaAttack::ApgdCe => 1,
            AaAttack::ApgdT => 2,
            AaAttack::FabT => 3,
            AaAttack::Square => 4,
        }
    }
}

/// A fully resolved AutoAttack run (l_inf).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AaConfig {
    /// Radius ε.
    pub eps: f64,
    /// The attacks, run in this order.
    pub attacks: Vec<AaAttack>,
    /// APGD iterations `N` (APGD-CE, and APGD-T per target).
    pub apgd_iters: usize,
    /// FAB iterations per target.
    pub fab_iters: usize,
    /// Square queries.
    pub square_queries: usize,
    /// Square's `p` schedule rescaled to `square_queries` (torchattacks) or as for 10 000.
    pub square_rescale: bool,
    /// Targets of APGD-T and FAB-T: the 2nd … (n+1)th classes.
    pub n_target_classes: TargetClasses,
}

/// How many classes APGD-T and FAB-T target: a count (R-AA's 9, capped at `K − 1` for `K`
/// classes), or every other class, `K − 1` (torchattacks' `n_classes - 1`: 99 on CIFAR-100).
/// Written as a number or as `all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetClasses {
    /// The 2nd … (n+1)th highest-scoring classes.
    Count(usize),
    /// All classes but the true one.
    All,
}

impl TargetClasses {
    /// The number of targets for `k` classes.
    pub fn for_classes(self, k: usize) -> usize {
        let others = k.saturating_sub(1);
        match self {
            TargetClasses::Count(n) => n.min(others),
            TargetClasses::All => others,
        }
    }
}

impl Serialize for TargetClasses {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            TargetClasses::Count(n) => s.serialize_u64(*n as u64),
            TargetClasses::All => s.serialize_str("all"),
        }
    }
}

impl<'de> Deserialize<'de> for TargetClasses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(TargetClasses::Count(n)),
            Raw::Word(w) if w == "all" => Ok(TargetClasses::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected a number of target classes or `all`, got `{w}`"
            ))),
        }
    }
}

impl AaConfig {
    /// R-AA's standard version at radius `eps`.
    pub fn original(eps: f64) -> Self {
        AaConfig {
            eps,
            attacks: AaAttack::STANDARD.to_vec(),
            apgd_iters: 100,
            fab_iters: 100,
            square_queries: 5000,
            square_rescale: false,
            n_target_classes: TargetClasses::Count(9),
        }
    }

    /// The standard version as torchattacks runs it (what R-CF reported): at the pinned
    /// torchattacks (`27e658c`) APGD, APGD-T and FAB default to 10 steps, which its
    /// `AutoAttack` does not override, and APGD-T and FAB-T target `n_classes - 1` classes.
    pub fn torchattacks(eps: f64) -> Self {
        AaConfig {
            apgd_iters: 10,
            fab_iters: 10,
            square_rescale: true,
            n_target_classes: TargetClasses::All,
            ..AaConfig::original(eps)
        }
    }

    /// A config error, if any.
    ///
    /// # Errors
    /// ε outside `[0, 1]`, no attack, an attack twice, zero iterations, queries or targets.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.eps) {
            bail!("autoattack: eps must be in [0, 1], got {}", self.eps)
        }
        if self.attacks.is_empty() {
            bail!("autoattack: no attack to run")
        }
        let mut seen = self.attacks.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.attacks.len() {
            bail!("autoattack: an attack is listed twice")
        }
        if self.apgd_iters == 0 || self.fab_iters == 0 || self.square_queries == 0 {
            bail!("autoattack: iterations and queries must be at least 1")
        }
        if self.n_target_classes == TargetClasses::Count(0) {
            bail!("autoattack: n_target_classes must be at least 1")
        }
        Ok(())
    }
}

/// What [`autoattack`] found on one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct AaResult {
    /// Per point: correctly classified on the clean input and fooled by no attack.
    pub robust: Vec<bool>,
    /// Correct on the clean input.
    pub clean_correct: usize,
    /// Points still robust after each attack of the config, in its order.
    pub robust_after: Vec<usize>,
}

/// Cancellation and progress for [`autoattack`] (no-ops by default).
pub struct AaHooks<'a> {
    /// Polled before every model call: when true, the run stops with an `interrupted` error
    /// (an AutoAttack batch can take minutes).
    pub stop: &'a dyn Fn() -> bool,
    /// Told after each attack: its name and how many points of the batch are still robust.
    pub after_attack: &'a dyn Fn(AaAttack, usize),
}

impl Default for AaHooks<'_> {
    fn default() -> Self {
        AaHooks {
            stop: &|| false,
            after_attack: &|_, _| {},
        }
    }
}

/// Runs the attacks of `cfg` on the batch `x` (`(B, C, H, W)` in `[0, 1]`) with labels `y`;
/// attack `a` draws from `Rng::derive(seed, [attack code])`.
///
/// # Errors
/// An invalid config, logits that are not `(B, K)`, fewer than 4 classes for APGD-T (its DLR
/// needs the 4th largest logit), a returned point outside the ε-ball or the box, candle errors,
/// `interrupted` when [`AaHooks::stop`] says so.
pub fn autoattack(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    cfg: &AaConfig,
    seed: u64,
    hooks: &AaHooks<'_>,
) -> Result<AaResult> {
    cfg.validate()?;
    let mut checked = |t: &Tensor| -> Result<Tensor> {
        if (hooks.stop)() {
            bail!("interrupted")
        }
        model(t)
    };
    let model: &mut dyn FnMut(&Tensor) -> Result<Tensor> = &mut checked;
    let x = x.detach();
    let b = x.dim(0)?;
    if y.len() != b {
        bail!("autoattack: {} labels for a batch of {b}", y.len())
    }
    let mut robust: Vec<bool> = predictions(&model(&x)?)?
        .iter()
        .zip(y)
        .map(|(p, l)| p == l)
        .collect();
    let clean_correct = robust.iter().filter(|r| **r).count();
    let mut robust_after = Vec::with_capacity(cfg.attacks.len());
    for &attack in &cfg.attacks {
        let idx: Vec<usize> = (0..b).filter(|&i| robust[i]).collect();
        if !idx.is_empty() {
            let xs = select(&x, &idx)?;
            let ys: Vec<i64> = idx.iter().map(|&i| y[i]).collect();
            let mut rng = Rng::derive(seed, &[attack.code()]);
            let adv = match attack {
                AaAttack::ApgdCe => apgd_ce(&xs, &ys, model, cfg, &mut rng)?,
                AaAttack::ApgdT => apgd_t(&xs, &ys, model, cfg, &mut rng)?,
                AaAttack::FabT => fab_t(&xs, &ys, model, cfg)?,
                AaAttack::Square => square(&xs, &ys, model, cfg, &mut rng)?,
            };
            check_in_ball(&xs, &adv, cfg.eps, attack)?;
            let pred = predictions(&model(&adv)?)?;
            for (k, &i) in idx.iter().enumerate() {
                if pred[k] != y[i] {
                    robust[i] = false;
                }
            }
        }
        let left = robust.iter().filter(|r| **r).count();
        (hooks.after_attack)(attack, left);
        robust_after.push(left);
    }
    Ok(AaResult {
        robust,
        clean_correct,
        robust_after,
    })
}

/// Argmax per row of `(B, K)` logits.
fn predictions(logits: &Tensor) -> Result<Vec<i64>> {
    if logits.rank() != 2 {
        bail!("autoattack: logits must be (B, K), got {:?}", logits.dims())
    }
    Ok(logits
        .argmax(1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(i64::from)
        .collect())
}

/// Rows `idx` of `x`.
fn select(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    x.index_select(&Tensor::new(ids.as_slice(), x.device())?, 0)
}

/// A `(B, 1, .., 1)` tensor of per-example values, broadcastable against `like`.
fn per_example(v: &[f32], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![v.len()];
    shape.extend(std::iter::repeat_n(1, like.rank() - 1));
    Tensor::from_vec(v.to_vec(), shape, like.device())?.to_dtype(like.dtype())
}

/// Per example `mask ? a : b` (mask of length B).
fn choose(mask: &[bool], a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let m: Vec<u8> = mask.iter().map(|&v| u8::from(v)).collect();
    let mut shape = vec![m.len()];
    shape.extend(std::iter::repeat_n(1, a.rank() - 1));
    Tensor::from_vec(m, shape, a.device())?
        .broadcast_as(a.shape())?
        .where_cond(a, b)
}

/// The l_inf distance of each row of `adv` from the same row of `x`.
fn linf_distances(x: &Tensor, adv: &Tensor) -> Result<Vec<f32>> {
    adv.sub(x)?.abs()?.flatten_from(1)?.max(1)?.to_vec1::<f32>()
}

/// Every point of `adv` within ε of `x` in l_inf (plus float slack) and in `[0, 1]`.
fn check_in_ball(x: &Tensor, adv: &Tensor, eps: f64, attack: AaAttack) -> Result<()> {
    let b = x.dim(0)?;
    let d = linf_distances(x, adv)?;
    let lo = adv.flatten_all()?.min(0)?.to_scalar::<f32>()?;
    let hi = adv.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let worst = d.iter().copied().fold(0f32, f32::max);
    if d.len() != b || f64::from(worst) > eps + 1e-6 || lo < 0.0 || hi > 1.0 {
        bail!(
            "autoattack: {} returned a point outside the eps-ball or the box (max |delta| {worst}, eps {eps}, pixels in [{lo}, {hi}])",
            attack.name()
        )
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// APGD

/// The objective of an APGD run, per example (maximised).
enum ApgdLoss<'a> {
    /// Cross-entropy.
    Ce,
    /// Targeted DLR towards these classes.
    DlrTargeted(&'a [i64]),
}

/// APGD's checkpoints: the first after `max(⌊0.22N⌋, 1)` iterations, then the interval
/// shrinks by `max(⌊0.03N⌋, 1)` but never below `max(⌊0.06N⌋, 1)`.
struct Checkpoints {
    k: usize,
    counter: usize,
    decr: usize,
    min: usize,
}

impl Checkpoints {
    fn new(n_iter: usize) -> Self {
        let frac = |f: f64| ((f * n_iter as f64) as usize).max(1);
        Checkpoints {
            k: frac(0.22),
            counter: 0,
            decr: frac(0.03),
            min: frac(0.06),
        }
    }

    /// Counts one iteration; at a checkpoint, the interval `k` that ends there.
    fn tick(&mut self) -> Option<usize> {
        self.counter += 1;
        if self.counter < self.k {
            return None;
        }
        let k = self.k;
        self.k = k.saturating_sub(self.decr).max(self.min);
        self.counter = 0;
        Some(k)
    }
}

/// The iterations (0-based) after which APGD checks its step size, for `n_iter` iterations.
pub fn apgd_checkpoints(n_iter: usize) -> Vec<usize> {
    let mut c = Checkpoints::new(n_iter);
    (0..n_iter).filter(|_| c.tick().is_some()).collect()
}

/// APGD's step-size rule at a checkpoint, per example: halve η and go back to the best point
/// when the loss oscillated over the interval, or when η was not halved at the previous
/// checkpoint and the best loss has not risen since. R-AA starts `reduced_last_check` as all
/// ones, so at the first checkpoint only oscillation halves η.
struct StepControl {
    best_at_check: Vec<f32>,
    reduced: Vec<bool>,
}

impl StepControl {
    fn new(loss_best: &[f32]) -> Self {
        StepControl {
            best_at_check: loss_best.to_vec(),
            reduced: vec![true; loss_best.len()],
        }
    }

    /// Which examples halve η at this checkpoint, given the oscillation flags and the best
    /// losses now.
    fn check(&mut self, oscillated: &[bool], loss_best: &[f32]) -> Vec<bool> {
        let reduce: Vec<bool> = (0..loss_best.len())
            .map(|e| oscillated[e] || (!self.reduced[e] && self.best_at_check[e] >= loss_best[e]))
            .collect();
        self.reduced.clone_from(&reduce);
        self.best_at_check = loss_best.to_vec();
        reduce
    }
}

/// R-AA's `check_oscillation`: per example, whether the loss increased in at most
/// `rho · k` of the last `k` iterations ending at `j` (indices below 0 wrap to the end of the
/// history, as Python's do).
fn oscillation(history: &[Vec<f32>], j: usize, k: usize, rho: f64) -> Vec<bool> {
    let n = history.len() as isize;
    let at = |i: isize| &history[i.rem_euclid(n) as usize];
    let b = history[0].len();
    let mut t = vec![0usize; b];
    for c in 0..k as isize {
        let (cur, prev) = (at(j as isize - c), at(j as isize - c - 1));
        for e in 0..b {
            if cur[e] > prev[e] {
                t[e] += 1;
            }
        }
    }
    t.iter().map(|&v| v as f64 <= k as f64 * rho).collect()
}

/// Targeted DLR per example: `−(z_y − z_t) / (π₁ − (π₃ + π₄)/2 + 10⁻¹²)`, differentiable
/// through the sorted logits (their positions are read on the host).
pub fn dlr_targeted(logits: &Tensor, y: &[i64], target: &[i64]) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    if k < 4 {
        bail!("targeted DLR needs at least 4 classes, got {k}")
    }
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut i1, mut i3, mut i4) = (
        Vec::with_capacity(b),
        Vec::with_capacity(b),
        Vec::with_capacity(b),
    );
    for r in &rows {
        let mut order: Vec<u32> = (0..k as u32).collect();
        order.sort_by(|&a, &c| r[c as usize].total_cmp(&r[a as usize]));
        i1.push(order[0]);
        i3.push(order[2]);
        i4.push(order[3]);
    }
    let dev = logits.device();
    let gather = |idx: Vec<u32>| -> Result<Tensor> {
        logits
            .gather(&Tensor::from_vec(idx, (b, 1), dev)?, 1)?
            .squeeze(1)
    };
    let as_u32 = |v: &[i64]| v.iter().map(|&c| c as u32).collect::<Vec<u32>>();
    let zy = gather(as_u32(y))?;
    let zt = gather(as_u32(target))?;
    let den = (gather(i1)? - ((gather(i3)? + gather(i4)?)? * 0.5)?)?.affine(1.0, 1e-12)?;
    zy.sub(&zt)?.div(&den)?.neg()
}

/// Logits, per-example loss and its gradient wrt the input at `x`.
fn loss_and_grad(
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    y: &Tensor,
    y_host: &[i64],
    loss: &ApgdLoss<'_>,
) -> Result<(Vec<i64>, Vec<f32>, Tensor)> {
    let v = Var::from_tensor(&x.detach())?;
    let logits = model(v.as_tensor())?;
    let l = match loss {
        ApgdLoss::Ce => cross_entropy_per_example(&logits, y)?,
        ApgdLoss::DlrTargeted(t) => dlr_targeted(&logits, y_host, t)?,
    };
    let grads = l.sum_all()?.backward()?;
    let Some(g) = grads.get(v.as_tensor()) else {
        bail!("apgd: the model's output does not depend on its input")
    };
    Ok((
        predictions(&logits.detach())?,
        l.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?,
        g.detach(),
    ))
}

/// One APGD run (R-AA `attack_single_run`): whether each point stayed correctly classified at
/// every iterate, and the misclassified iterate where one was found (else the start).
fn apgd_single(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    loss: &ApgdLoss<'_>,
    eps: f64,
    n_iter: usize,
    rng: &mut Rng,
) -> Result<(Vec<bool>, Tensor)> {
    let b = x.dim(0)?;
    let n = x.elem_count() / b;
    let dev = x.device();
    let yt = Tensor::from_vec(y.to_vec(), b, dev)?;
    let (lo, hi) = (x.affine(1.0, -eps)?, x.affine(1.0, eps)?);
    // start: x + ε t/‖t‖_∞, t ~ U(−1, 1), in the box
    let mut t: Vec<f32> = (0..b * n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    for row in t.chunks_mut(n) {
        let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        row.iter_mut()
            .for_each(|v| *v = (f64::from(*v) * eps / f64::from(m)) as f32);
    }
    let start = Tensor::from_vec(t, x.shape(), dev)?.to_dtype(x.dtype())?;
    let mut x_adv = x.add(&start)?.clamp(0.0, 1.0)?;
    let mut x_best = x_adv.clone();
    let mut x_best_adv = x_adv.clone();
    let (pred, l, mut grad) = loss_and_grad(model, &x_adv, &yt, y, loss)?;
    let mut acc: Vec<bool> = pred.iter().zip(y).map(|(p, l)| p == l).collect();
    let mut loss_best = l;
    let mut grad_best = grad.clone();
    let mut step = vec![(2.0 * eps) as f32; b];
    let mut x_old = x_adv.clone();
    let mut checkpoints = Checkpoints::new(n_iter);
    let mut control = StepControl::new(&loss_best);
    let mut history = vec![vec![0f32; b]; n_iter];
    let project = |v: &Tensor| -> Result<Tensor> { v.maximum(&lo)?.minimum(&hi)?.clamp(0.0, 1.0) };
    for i in 0..n_iter {
        let momentum = x_adv.sub(&x_old)?;
        x_old = x_adv.clone();
        let a = if i > 0 { 0.75 } else { 1.0 };
        let z = project(&x_adv.add(&grad.sign()?.broadcast_mul(&per_example(&step, x)?)?)?)?;
        x_adv = project(
            &x_adv
                .add(&(z.sub(&x_adv)? * a)?)?
                .add(&(momentum * (1.0 - a))?)?,
        )?;
        let (pred, l, g) = loss_and_grad(model, &x_adv, &yt, y, loss)?;
        grad = g;
        let fooled: Vec<bool> = pred.iter().zip(y).map(|(p, l)| p != l).collect();
        for (a, f) in acc.iter_mut().zip(&fooled) {
            *a = *a && !f;
        }
        x_best_adv = choose(&fooled, &x_adv, &x_best_adv)?;
        let improved: Vec<bool> = l.iter().zip(&loss_best).map(|(n, o)| n > o).collect();
        x_best = choose(&improved, &x_adv, &x_best)?;
        grad_best = choose(&improved, &grad, &grad_best)?;
        for e in 0..b {
            if improved[e] {
                loss_best[e] = l[e];
            }
        }
        history[i] = l;
        if let Some(k) = checkpoints.tick() {
            let reduce = control.check(&oscillation(&history, i, k, 0.75), &loss_best);
            if reduce.iter().any(|r| *r) {
                for e in 0..b {
                    if reduce[e] {
                        step[e] /= 2.0;
                    }
                }
                x_adv = choose(&reduce, &x_best, &x_adv)?;
                grad = choose(&reduce, &grad_best, &grad)?;
            }
        }
    }
    Ok((acc, x_best_adv))
}

/// APGD-CE (1 restart): the adversarial point where one was found, else the clean one.
fn apgd_ce(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    cfg: &AaConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    let (acc, adv) = apgd_single(x, y, model, &ApgdLoss::Ce, cfg.eps, cfg.apgd_iters, rng)?;
    let fooled: Vec<bool> = acc.iter().map(|a| !a).collect();
    choose(&fooled, &adv, x)
}

/// The class of rank `rank` (1 = highest) of each row of the logits at `x`.
fn ranked_class(
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    rank: usize,
) -> Result<Vec<i64>> {
    let rows = model(x)?.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|r| {
            // ascending with the index as tie-break, then counted from the top (torch's
            // `sort(dim=1)[1][:, -rank]`)
            let mut order: Vec<usize> = (0..r.len()).collect();
            order.sort_by(|&a, &b| r[a].total_cmp(&r[b]).then(a.cmp(&b)));
            order[r.len() - rank] as i64
        })
        .collect())
}

/// The number of targets for `k` classes.
fn targets(cfg: &AaConfig, k: usize) -> usize {
    cfg.n_target_classes.for_classes(k)
}

/// A model: logits `(B, K)` of a batch.
type Model<'m> = dyn FnMut(&Tensor) -> Result<Tensor> + 'm;

/// One targeted run of [`per_target`]: `(points, labels, target rank, model)` → per point
/// whether it is still correct, and the adversarial points.
type TargetAttack<'a> =
    dyn FnMut(&Tensor, &[i64], usize, &mut Model<'_>) -> Result<(Vec<bool>, Tensor)> + 'a;

/// Runs `attack(xs, ys, rank)` once per target rank (2nd … (n+1)th class) on the points not
/// fooled yet; `attack` returns per point whether it is still correct and its adversarial
/// point. The adversarial points of the fooled ones replace the clean ones.
fn per_target(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    cfg: &AaConfig,
    attack: &mut TargetAttack<'_>,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let k = model(&select(x, &[0])?)?.dim(1)?;
    let mut adv = x.clone();
    let mut acc = vec![true; b];
    for rank in 2..targets(cfg, k) + 2 {
        let idx: Vec<usize> = (0..b).filter(|&i| acc[i]).collect();
        if idx.is_empty() {
            break;
        }
        let xs = select(x, &idx)?;
        let ys: Vec<i64> = idx.iter().map(|&i| y[i]).collect();
        let (acc_s, adv_s) = attack(&xs, &ys, rank, model)?;
        adv = scatter_fooled(&adv, &adv_s, &idx, &acc_s, &mut acc)?;
    }
    Ok(adv)
}

/// APGD-T: one APGD run on the targeted DLR per target class, each on the points not fooled yet.
fn apgd_t(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    cfg: &AaConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    per_target(x, y, model, cfg, &mut |xs, ys, rank, model| {
        let target = ranked_class(model, xs, rank)?;
        let loss = ApgdLoss::DlrTargeted(&target);
        apgd_single(xs, ys, model, &loss, cfg.eps, cfg.apgd_iters, rng)
    })
}

/// Writes the rows of `sub` whose `sub_acc` is false into `full` at `idx`, marking them fooled.
fn scatter_fooled(
    full: &Tensor,
    sub: &Tensor,
    idx: &[usize],
    sub_acc: &[bool],
    acc: &mut [bool],
) -> Result<Tensor> {
    let mut rows: Vec<Tensor> = (0..full.dim(0)?)
        .map(|i| full.narrow(0, i, 1))
        .collect::<Result<_>>()?;
    for (k, &i) in idx.iter().enumerate() {
        if !sub_acc[k] {
            acc[i] = false;
            rows[i] = sub.narrow(0, k, 1)?;
        }
    }
    Tensor::cat(&rows, 0)
}

// ---------------------------------------------------------------------------------------------
// FAB-T

/// The minimal-l_inf displacement `d` with `t + d ∈ [0, 1]ⁿ` and `⟨w, t + d⟩ = b` (R-AA's
/// `projection_linf`, one row); where the hyperplane cannot be reached inside the box, the
/// displacement that gets closest.
pub fn projection_linf(t: &[f32], w: &[f32], b: f32) -> Vec<f32> {
    let n = t.len();
    let dot: f32 = w.iter().zip(t).map(|(a, c)| a * c).sum();
    let sign = if dot - b >= 0.0 { 1.0 } else { -1.0 };
    let w: Vec<f32> = w.iter().map(|v| v * sign).collect();
    let b = b * sign;
    let a: Vec<f32> = w.iter().map(|&v| if v < 0.0 { 1.0 } else { 0.0 }).collect();
    let mut d: Vec<f32> = (0..n)
        .map(|i| if w[i] != 0.0 { a[i] - t[i] } else { 0.0 })
        .collect();
    let p: Vec<f32> = (0..n).map(|i| a[i] - t[i] * (2.0 * a[i] - 1.0)).collect();
    let mut indp: Vec<usize> = (0..n).collect();
    indp.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let wt: f32 = w.iter().zip(t).map(|(a, c)| a * c).sum();
    let b = b - wt;
    let b0: f32 = w.iter().zip(&d).map(|(a, c)| a * c).sum();
    // descending order of p: cumulative |w| and cumulative −w·d
    let (mut s, mut sb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut acc_s, mut acc_sb) = (0f32, b0);
    for &i in indp.iter().rev() {
        acc_s += w[i].abs();
        acc_sb += -w[i] * d[i];
        s.push(acc_s);
        sb.push(acc_sb);
    }
    let b2 = sb[n - 1] - s[n - 1] * p[indp[0]];
    let c_l = b - b2 > 0.0;
    let c2 = (b - b0 > 0.0) && (b - b2 <= 0.0);
    if c_l {
        let lmbd = ((b - sb[n - 1]) / -s[n - 1]).max(0.0);
        for i in 0..n {
            d[i] = (2.0 * a[i] - 1.0) * lmbd;
        }
    } else if c2 {
        let (mut lb, mut ub) = (0f32, (n - 1) as f32);
        let iters = (n as f64).log2().ceil() as usize;
        for _ in 0..iters {
            let mid = ((lb + ub) / 2.0).floor();
            let m = mid as usize;
            let cur = indp[n - 1 - m];
            let b2 = sb[m] - s[m] * p[cur];
            if b - b2 > 0.0 {
                lb = mid;
            } else {
                ub = mid;
            }
        }
        let l = lb as usize;
        let lmbd = ((b - sb[l]) / -s[l]).max(0.0);
        for i in 0..n {
            d[i] = lmbd.min(d[i]) * a[i] + (-lmbd).max(d[i]) * (1.0 - a[i]);
        }
    }
    for i in 0..n {
        if w[i] == 0.0 {
            d[i] = 0.0;
        }
    }
    d
}

/// FAB constants (R-AA defaults).
const FAB_ALPHA_MAX: f32 = 0.1;
const FAB_ETA: f32 = 1.05;
const FAB_BETA: f32 = 0.9;

/// One targeted FAB run without random start (R-AA `attack_single_run`, `is_targeted`): per
/// point the smallest-l_inf misclassified iterate found, or the clean point.
fn fab_single(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    rank: usize,
    n_iter: usize,
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let n = x.elem_count() / b;
    let dev = x.device().clone();
    let pred0 = predictions(&model(x)?)?;
    let correct: Vec<usize> = (0..b).filter(|&i| pred0[i] == y[i]).collect();
    if correct.is_empty() {
        return Ok(x.clone());
    }
    let target_all = ranked_class(model, x, rank)?;
    let im2 = select(x, &correct)?;
    let la: Vec<i64> = correct.iter().map(|&i| y[i]).collect();
    let lt: Vec<i64> = correct.iter().map(|&i| target_all[i]).collect();
    let bs = correct.len();
    let x0 = im2.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut x1 = x0.clone();
    let mut adv = x0.clone();
    let mut res2 = vec![1e10f32; bs];
    let shape = im2.shape().clone();
    let to_tensor = |v: &[f32]| -> Result<Tensor> {
        Tensor::from_vec(v.to_vec(), shape.clone(), &dev)?.to_dtype(x.dtype())
    };
    let gather_idx = |v: &[i64]| -> Result<Tensor> {
        Tensor::from_vec(
            v.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            (bs, 1),
            &dev,
        )
    };
    let (iy, it) = (gather_idx(&la)?, gather_idx(&lt)?);
    for _ in 0..n_iter {
        // f = z_t − z_y and its gradient at x1
        let v = Var::from_tensor(&to_tensor(&x1)?)?;
        let logits = model(v.as_tensor())?;
        let f = logits
            .gather(&it, 1)?
            .sub(&logits.gather(&iy, 1)?)?
            .squeeze(1)?;
        let grads = f.sum_all()?.backward()?;
        let Some(g) = grads.get(v.as_tensor()) else {
            bail!("fab: the model's output does not depend on its input")
        };
        let g = g
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let f = f.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (e, fe) in f.iter().enumerate() {
            let r = e * n..(e + 1) * n;
            let w = &g[r.clone()];
            let bb = -fe
                + w.iter()
                    .zip(&x1[r.clone()])
                    .map(|(a, c)| a * c)
                    .sum::<f32>();
            let d1 = projection_linf(&x1[r.clone()], w, bb);
            let d2 = projection_linf(&x0[r.clone()], w, bb);
            let a1 = d1.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-8);
            let a2 = d2.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-8);
            let alpha = (a1 / (a1 + a2)).clamp(0.0, FAB_ALPHA_MAX);
            for (j, i) in r.enumerate() {
                let moved =
                    (x1[i] + FAB_ETA * d1[j]) * (1.0 - alpha) + (x0[i] + d2[j] * FAB_ETA) * alpha;
                x1[i] = moved.clamp(0.0, 1.0);
            }
        }
        let pred = predictions(&model(&to_tensor(&x1)?)?)?;
        for e in 0..bs {
            if pred[e] == la[e] {
                continue;
            }
            let r = e * n..(e + 1) * n;
            let dist = r.clone().fold(0f32, |m, i| m.max((x1[i] - x0[i]).abs()));
            if dist < res2[e] {
                adv[r.clone()].copy_from_slice(&x1[r.clone()]);
                res2[e] = dist;
            }
            for i in r {
                x1[i] = x0[i] + (x1[i] - x0[i]) * FAB_BETA;
            }
        }
    }
    // points with a success get their best adversarial point, the others stay clean
    let found: Vec<bool> = res2.iter().map(|&r| r < 1e10).collect();
    let adv_t = choose(&found, &to_tensor(&adv)?, &im2)?;
    let mut ok = vec![true; b];
    let sub_acc: Vec<bool> = found.iter().map(|f| !f).collect();
    scatter_fooled(x, &adv_t, &correct, &sub_acc, &mut ok)
}

/// FAB-T: one FAB run per target class on the points not fooled yet; a point counts as fooled
/// only when its adversarial point is misclassified and within ε.
fn fab_t(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    cfg: &AaConfig,
) -> Result<Tensor> {
    per_target(x, y, model, cfg, &mut |xs, ys, rank, model| {
        let adv = fab_single(xs, ys, model, rank, cfg.fab_iters)?;
        let pred = predictions(&model(&adv)?)?;
        let dist = linf_distances(xs, &adv)?;
        let acc = (0..ys.len())
            .map(|k| pred[k] == ys[k] || f64::from(dist[k]) > cfg.eps)
            .collect();
        Ok((acc, adv))
    })
}

// ---------------------------------------------------------------------------------------------
// Square

/// Square's `p` at query `it` (R-AA `p_selection`).
pub fn square_p(it: usize, p_init: f64, n_queries: usize, rescale: bool) -> f64 {
    let it = if rescale {
        (it as f64 / n_queries as f64 * 10000.0) as usize
    } else {
        it
    };
    let div = match it {
        0..=10 => 1.0,
        11..=50 => 2.0,
        51..=200 => 4.0,
        201..=500 => 8.0,
        501..=1000 => 16.0,
        1001..=2000 => 32.0,
        2001..=4000 => 64.0,
        4001..=6000 => 128.0,
        6001..=8000 => 256.0,
        _ => 512.0,
    };
    p_init / div
}

/// `z_y − max_{j≠y} z_j` per row.
fn margins(logits: &Tensor, y: &[i64]) -> Result<Vec<f32>> {
    let rows = logits.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(y)
        .map(|(r, &c)| {
            let zy = r[c as usize];
            let other = r
                .iter()
                .enumerate()
                .filter(|(j, _)| *j as i64 != c)
                .map(|(_, v)| *v)
                .fold(f32::NEG_INFINITY, f32::max);
            zy - other
        })
        .collect())
}

/// A `±1` draw (`sign(2u − 1)`).
fn random_sign(rng: &mut Rng) -> f32 {
    if rng.f64() < 0.5 { -1.0 } else { 1.0 }
}

/// Square (l_inf, margin loss, 1 restart; R-AA `attack_single_run`).
fn square(
    x: &Tensor,
    y: &[i64],
    model: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    cfg: &AaConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    const P_INIT: f64 = 0.8;
    let (b, c, h, w) = x.dims4()?;
    let eps = cfg.eps as f32;
    let dev = x.device().clone();
    let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = c * h * w;
    // init: vertical stripes, one sign per (example, channel, column)
    let mut best = xv.clone();
    for e in 0..b {
        for ch in 0..c {
            let signs: Vec<f32> = (0..w).map(|_| random_sign(rng)).collect();
            for r in 0..h {
                for (col, sign) in signs.iter().enumerate() {
                    let i = e * n + ch * h * w + r * w + col;
                    best[i] = (xv[i] + eps * sign).clamp(0.0, 1.0);
                }
            }
        }
    }
    let to_tensor = |v: Vec<f32>, rows: usize| -> Result<Tensor> {
        Tensor::from_vec(v, (rows, c, h, w), &dev)?.to_dtype(x.dtype())
    };
    let mut margin = margins(&model(&to_tensor(best.clone(), b)?)?, y)?;
    let mut loss = margin.clone();
    for it in 0..cfg.square_queries {
        let idx: Vec<usize> = (0..b).filter(|&e| margin[e] > 0.0).collect();
        if idx.is_empty() {
            break;
        }
        let p = square_p(it, P_INIT, cfg.square_queries, cfg.square_rescale);
        let s = ((p * n as f64 / c as f64).sqrt().round() as usize)
            .max(1)
            .min(h.min(w));
        let vh = (rng.f64() * (h - s) as f64) as usize;
        let vw = (rng.f64() * (w - s) as f64) as usize;
        let signs: Vec<f32> = (0..c).map(|_| random_sign(rng)).collect();
        let mut cand = Vec::with_capacity(idx.len() * n);
        for &e in &idx {
            let row = &best[e * n..(e + 1) * n];
            let orig = &xv[e * n..(e + 1) * n];
            let start = cand.len();
            cand.extend_from_slice(row);
            let new = &mut cand[start..];
            for (ch, sign) in signs.iter().enumerate() {
                for r in vh..vh + s {
                    for col in vw..vw + s {
                        let i = ch * h * w + r * w + col;
                        let v = new[i] + 2.0 * eps * sign;
                        new[i] = v.max(orig[i] - eps).min(orig[i] + eps).clamp(0.0, 1.0);
                    }
                }
            }
        }
        let m_new = margins(
            &model(&to_tensor(cand.clone(), idx.len())?)?,
            &idx.iter().map(|&e| y[e]).collect::<Vec<_>>(),
        )?;
        for (k, &e) in idx.iter().enumerate() {
            let improved = m_new[k] < loss[e];
            if improved {
                loss[e] = m_new[k];
            }
            if improved || m_new[k] <= 0.0 {
                margin[e] = m_new[k];
                best[e * n..(e + 1) * n].copy_from_slice(&cand[k * n..(k + 1) * n]);
            }
        }
    }
    to_tensor(best, b)
}

#[cfg(test)]
mod tests;
