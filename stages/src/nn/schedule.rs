//! Learning-rate schedules: cosine (with the faithful free-adv quirk), warm-up + cosine, AdvCL's
//! per-epoch cosine with per-iteration warm-up, multi-step.
//!
//! Every schedule is a pure function of a step counter, so a resumed run recomputes its rate
//! instead of replaying scheduler state. [`LrSchedule::lr`]`(t)` is the rate used by the
//! `t`-th (0-based) optimiser update of a per-iteration schedule, or during epoch `t` of a
//! per-epoch one; each type says which and how `t` maps to PyTorch's `last_epoch`.
//!
//! | type | formula | unit | reference |
//! |---|---|---|---|
//! | [`Cosine`] | `η_min + (η₀ − η_min) ½ (1 + cos(π t/T_max))`, periodic beyond `T_max` | scheduler step (or epoch) | `CosineAnnealingLR` (R-CF, R-EMP; R-CF linear head with `T_max = 100` per epoch) |
//! | [`WarmupCosine`] | `η₀ · f(t + 1)`, `f(s) = s/W` for `s < W`, else `r + (1 − r) ½ (1 + cos(π (s − W)/(S − W)))` | iteration | ACL / AIR / RCS `LambdaLR` |
//! | [`AdvClLr`] | linear warm-up per iteration over the first epochs, then `η_min + (η₀ − η_min) ½ (1 + cos(π e/E))`, `e` = epoch + 1 | iteration | AdvCL (SupContrast utilities) |
//! | [`MultiStep`] | `η₀ γ^{#{m ≤ t}}` | epoch | `MultiStepLR` (fine-tuning) |
//!
//! # The cosine beyond `T_max` and \[Q6\]
//!
//! PyTorch's `CosineAnnealingLR` evaluates its recursive form, which continues the closed form
//! periodically: after `T_max` steps the rate climbs back to `η₀` over the next `T_max` steps,
//! and so on. CF-AMC's free-adversarial scripts build it with `T_max = ⌊50000/B⌋ × epochs` but
//! step it once per replay, `m` times per minibatch, so with `m = 3` the rate goes
//! `0.3 → 0 → 0.3 → 0` ([`Cosine::free_adv`] with [`FreeAdvLr::Faithful`]). The clean mode sets
//! `T_max` to the number of optimiser steps, `m × ⌊50000/B⌋ × epochs` (one half period).
//!
//! ```
//! use pipe_stages::nn::schedule::{Cosine, FreeAdvLr, LrSchedule};
//! // EMP free-adv: B = 100, 10 epochs, m = 3 replays.
//! let faithful = Cosine::free_adv(0.3, 0.0, 50_000, 100, 10, 3, FreeAdvLr::Faithful);
//! assert_eq!(faithful.t_max, 5_000);
//! assert!(faithful.lr(5_000) < 1e-12 && (faithful.lr(10_000) - 0.3).abs() < 1e-12);
//! let clean = Cosine::free_adv(0.3, 0.0, 50_000, 100, 10, 3, FreeAdvLr::Clean);
//! assert_eq!(clean.t_max, 15_000);
//! assert!((clean.lr(7_500) - 0.15).abs() < 1e-12);
//! ```

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

/// A learning rate as a pure function of a step counter (see the module docs for the unit).
pub trait LrSchedule {
    /// The learning rate at step (or epoch) `t`.
    fn lr(&self, t: usize) -> f64;
}

/// `η_min + (η₀ − η_min) ½ (1 + cos(π t/T_max))`, the closed form of `CosineAnnealingLR`,
/// periodic in `t` with period `2 T_max`. `T_max = 0` gives `η₀`.
pub fn cosine_annealing(eta0: f64, eta_min: f64, t: usize, t_max: usize) -> f64 {
    if t_max == 0 {
        return eta0;
    }
    eta_min + (eta0 - eta_min) * 0.5 * (1.0 + (PI * t as f64 / t_max as f64).cos())
}

/// Minibatches per epoch: `⌊n/B⌋` with `drop_last`, else `⌈n/B⌉`.
pub fn iters_per_epoch(n_train: usize, batch: usize, drop_last: bool) -> usize {
    if batch == 0 {
        return 0;
    }
    if drop_last {
        n_train / batch
    } else {
        n_train.div_ceil(batch)
    }
}

/// R-CF's `T_max = ⌊n/B⌋ × epochs` (n = 50 000 for CIFAR-10).
pub fn cosine_t_max(n_train: usize, batch: usize, epochs: usize) -> usize {
    iters_per_epoch(n_train, batch, true) * epochs
}

/// Which `T_max` the free-adversarial cosine uses (\[Q6\]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreeAdvLr {
    /// The reference: `T_max = ⌊n/B⌋ × epochs` although the scheduler steps `m` times per
    /// minibatch, so the rate is periodic over the run.
    Faithful,
    /// `T_max = m × ⌊n/B⌋ × epochs`, the number of scheduler steps: one half period.
    #[default]
    Clean,
}

/// Cosine annealing (`CosineAnnealingLR`): `lr(t)` is the rate of the `t`-th optimiser update
/// when the scheduler steps after each update (`t` = PyTorch's `last_epoch`), or of epoch `t`
/// for a per-epoch scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cosine {
    /// The initial rate η₀.
    pub eta0: f64,
    /// The floor η_min.
    pub eta_min: f64,
    /// The half period `T_max`.
    pub t_max: usize,
}

impl Cosine {
    /// A cosine from `eta0` to `eta_min` over `t_max` steps. The R-CF linear head is
    /// `Cosine::new(0.03, 0.0, 100)` stepped per epoch.
    pub fn new(eta0: f64, eta_min: f64, t_max: usize) -> Self {
        Self {
            eta0,
            eta_min,
            t_max,
        }
    }

    /// R-CF / R-EMP pretraining: one scheduler step per optimiser step,
    /// `T_max = ⌊n/B⌋ × epochs` ([`cosine_t_max`]).
    pub fn per_iteration(
        eta0: f64,
        eta_min: f64,
        n_train: usize,
        batch: usize,
        epochs: usize,
    ) -> Self {
        Self::new(eta0, eta_min, cosine_t_max(n_train, batch, epochs))
    }

    /// The free-adversarial runs (`replays` = m scheduler steps per minibatch), faithful or
    /// clean (\[Q6\]).
    pub fn free_adv(
        eta0: f64,
        eta_min: f64,
        n_train: usize,
        batch: usize,
        epochs: usize,
        replays: usize,
        mode: FreeAdvLr,
    ) -> Self {
        let base = cosine_t_max(n_train, batch, epochs);
        let t_max = match mode {
            FreeAdvLr::Faithful => base,
            FreeAdvLr::Clean => base * replays.max(1),
        };
        Self::new(eta0, eta_min, t_max)
    }

    /// The rate at step `t` (periodic beyond `T_max`).
    pub fn lr(&self, t: usize) -> f64 {
        cosine_annealing(self.eta0, self.eta_min, t, self.t_max)
    }
}

impl LrSchedule for Cosine {
    fn lr(&self, t: usize) -> f64 {
        Cosine::lr(self, t)
    }
}

/// ACL's `LambdaLR` warm-up + cosine, stepped at the **start** of each iteration, so update
/// `t` (0-based) uses `η₀ · f(t + 1)` (\[Q32\]; `f(0) = 0` is the unused rate at construction).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupCosine {
    /// The base rate η₀ (5.0 for ACL's LARS).
    pub base_lr: f64,
    /// Warm-up iterations `W` (10 epochs × iterations per epoch).
    pub warmup_steps: usize,
    /// All iterations `S` (epochs × iterations per epoch).
    pub total_steps: usize,
    /// The final factor `r` (`10⁻⁶/η₀`).
    pub min_factor: f64,
}

impl WarmupCosine {
    /// ACL / AIR / RCS: `W = 10 × iters`, `S = epochs × iters`, `r = 10⁻⁶/η₀`, with
    /// `iters` = [`iters_per_epoch`]`(n, B, false)` (the last partial batch is kept).
    pub fn acl(base_lr: f64, epochs: usize, iters_per_epoch: usize) -> Self {
        Self {
            base_lr,
            warmup_steps: 10 * iters_per_epoch,
            total_steps: epochs * iters_per_epoch,
            min_factor: 1e-6 / base_lr,
        }
    }

    /// The `LambdaLR` factor `f(s)` at scheduler step `s`. A degenerate `S ≤ W` holds the
    /// factor at 1 after the warm-up.
    pub fn factor(&self, s: usize) -> f64 {
        let (w, total, r) = (self.warmup_steps, self.total_steps, self.min_factor);
        if s < w {
            return s as f64 / w as f64;
        }
        if total <= w {
            return 1.0;
        }
        let progress = (s - w) as f64 / (total - w) as f64;
        r + (1.0 - r) * 0.5 * (1.0 + (PI * progress).cos())
    }

    /// The rate of optimiser update `t` (0-based): `η₀ f(t + 1)`.
    pub fn lr(&self, t: usize) -> f64 {
        self.base_lr * self.factor(t + 1)
    }
}

impl LrSchedule for WarmupCosine {
    fn lr(&self, t: usize) -> f64 {
        WarmupCosine::lr(self, t)
    }
}

/// AdvCL's schedule (SupContrast's `adjust_learning_rate` + `warmup_learning_rate`): per epoch
/// (`e` = epoch + 1, the reference's call) `η_e = η_min + (η₀ − η_min) ½ (1 + cos(π e/E))` with
/// `η_min = η₀ · rate³`; while `e ≤ warm_epochs` (and warm-up is on) it is overridden per
/// iteration by `from + p (to − from)`, `p = (i + (e − 1) n)/(warm_epochs · n)`, `to = η` at
/// `e = warm_epochs`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvClLr {
    /// η₀ (0.5).
    pub base_lr: f64,
    /// E, the cosine's epoch count (1000; the loop runs 1002 epochs, \[Q50\]).
    pub epochs: usize,
    /// The decay rate (0.1): `η_min = η₀ · rate³`.
    pub decay_rate: f64,
    /// Warm-up on (the reference turns it on for batches > 256).
    pub warm: bool,
    /// Warm-up epochs (10).
    pub warm_epochs: usize,
    /// The warm-up's starting rate (0.01).
    pub warmup_from: f64,
    /// Iterations per epoch `n`.
    pub iters_per_epoch: usize,
}

impl AdvClLr {
    /// AdvCL's settings for a batch size: warm-up iff `batch > 256`.
    pub fn advcl(base_lr: f64, epochs: usize, batch: usize, iters_per_epoch: usize) -> Self {
        Self {
            base_lr,
            epochs,
            decay_rate: 0.1,
            warm: batch > 256,
            warm_epochs: 10,
            warmup_from: 0.01,
            iters_per_epoch,
        }
    }

    /// `η_min = η₀ · rate³`.
    pub fn eta_min(&self) -> f64 {
        self.base_lr * self.decay_rate.powi(3)
    }

    /// The per-epoch cosine at the reference's `e` (= 0-based epoch + 1).
    fn cosine_at(&self, e: usize) -> f64 {
        let eta_min = self.eta_min();
        if self.epochs == 0 {
            return self.base_lr;
        }
        eta_min
            + (self.base_lr - eta_min) * 0.5 * (1.0 + (PI * e as f64 / self.epochs as f64).cos())
    }

    /// The warm-up's target rate: the cosine at `e = warm_epochs`.
    pub fn warmup_to(&self) -> f64 {
        self.cosine_at(self.warm_epochs)
    }

    /// The rate of iteration `batch` of 0-based epoch `epoch`.
    pub fn lr_at(&self, epoch: usize, batch: usize) -> f64 {
        let e = epoch + 1;
        if self.warm && e <= self.warm_epochs && self.iters_per_epoch > 0 {
            let n = self.iters_per_epoch as f64;
            let p = (batch as f64 + (e - 1) as f64 * n) / (self.warm_epochs as f64 * n);
            return self.warmup_from + p * (self.warmup_to() - self.warmup_from);
        }
        self.cosine_at(e)
    }
}

impl LrSchedule for AdvClLr {
    /// `t` = global iteration `epoch × n + batch`.
    fn lr(&self, t: usize) -> f64 {
        let n = self.iters_per_epoch.max(1);
        self.lr_at(t / n, t % n)
    }
}

/// `MultiStepLR`: `η₀ γ^k` during epoch `t`, `k` = the number of milestones `≤ t` (stepped once
/// per epoch, after it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiStep {
    /// η₀.
    pub base_lr: f64,
    /// Milestone epochs.
    pub milestones: Vec<usize>,
    /// The factor γ (0.1).
    pub gamma: f64,
}

impl MultiStep {
    /// The schedule (milestones in any order; duplicates count twice, as in PyTorch).
    pub fn new(base_lr: f64, milestones: Vec<usize>, gamma: f64) -> Self {
        Self {
            base_lr,
            milestones,
            gamma,
        }
    }

    /// The rate during epoch `t`.
    pub fn lr(&self, t: usize) -> f64 {
        let k = self.milestones.iter().filter(|&&m| m <= t).count();
        self.base_lr * self.gamma.powi(i32::try_from(k).unwrap_or(i32::MAX))
    }
}

impl LrSchedule for MultiStep {
    fn lr(&self, t: usize) -> f64 {
        MultiStep::lr(self, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn cosine_values_and_periodic_continuation() {
        // t = 0, T/2, T.
        let c = Cosine::new(0.3, 0.0, 5000);
        close(c.lr(0), 0.3, 0.0);
        close(c.lr(2500), 0.15, 1e-15);
        close(c.lr(5000), 0.0, 1e-15);
        // With a floor.
        let f = Cosine::new(1.0, 0.1, 10);
        close(f.lr(5), 0.55, 1e-15);
        close(f.lr(10), 0.1, 1e-15);
        // Beyond T_max, PyTorch's recursive CosineAnnealingLR (stepped after each update):
        //   p = torch.zeros(1, requires_grad=True); o = torch.optim.SGD([p], lr=0.3)
        //   s = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.0)
        //   for t in range(13): lrs.append(o.param_groups[0]["lr"]); o.step(); s.step()
        let torch = [
            0.3,
            0.2560660171779821,
            0.15,
            0.04393398282201788,
            0.0,
            0.04393398282201786,
            0.15000000000000002,
            0.2560660171779822,
            0.3000000000000001,
            0.2560660171779822,
            0.15000000000000008,
            0.04393398282201801,
            0.0,
        ];
        let c = Cosine::new(0.3, 0.0, 4);
        for (t, want) in torch.iter().enumerate() {
            close(c.lr(t), *want, 1e-15);
        }
        assert_eq!(Cosine::new(0.3, 0.0, 0).lr(7), 0.3);
    }

    #[test]
    fn t_max_helpers_and_q6() {
        assert_eq!(cosine_t_max(50_000, 128, 30), 390 * 30);
        assert_eq!(iters_per_epoch(50_000, 512, false), 98);
        assert_eq!(iters_per_epoch(50_000, 512, true), 97);
        assert_eq!(iters_per_epoch(10, 0, true), 0);
        let c = Cosine::per_iteration(0.3, 0.0, 50_000, 128, 30);
        assert_eq!(c.t_max, 11_700);
        // EMP free-adv, B = 100, 10 epochs, m = 3: 15 000 scheduler steps.
        let faithful = Cosine::free_adv(0.3, 0.0, 50_000, 100, 10, 3, FreeAdvLr::Faithful);
        let clean = Cosine::free_adv(0.3, 0.0, 50_000, 100, 10, 3, FreeAdvLr::Clean);
        assert_eq!((faithful.t_max, clean.t_max), (5_000, 15_000));
        // Faithful: 0.3 → 0 → 0.3 → 0 over the run.
        close(faithful.lr(5_000), 0.0, 1e-15);
        close(faithful.lr(10_000), 0.3, 1e-15);
        close(faithful.lr(12_500), 0.15, 1e-14);
        close(faithful.lr(15_000), 0.0, 1e-15);
        // Clean: one half period.
        close(clean.lr(5_000), 0.225, 1e-14);
        close(clean.lr(15_000), 0.0, 1e-15);
        assert!((1..15_000).all(|t| clean.lr(t) < clean.lr(t - 1)));
    }

    #[test]
    fn acl_warmup_cosine() {
        // η₀ = 5, 100 epochs × 1 iteration: W = 10, S = 100, r = 2e-7.
        //   f = lambda s: s / 10 if s < 10 else r + (1 - r) * 0.5 * (1 + cos(pi * (s - 10) / 90))
        let s = WarmupCosine::acl(5.0, 100, 1);
        assert_eq!((s.warmup_steps, s.total_steps), (10, 100));
        close(s.min_factor, 2e-7, 1e-22);
        close(s.factor(0), 0.0, 0.0);
        close(s.lr(0), 0.5, 1e-15); // update 0 uses f(1) = 1/10
        close(s.lr(4), 2.5, 1e-15); // f(5) = 0.5
        close(s.lr(9), 5.0, 1e-15); // f(10) = 1
        close(s.lr(54), 5.0 * (2e-7 + (1.0 - 2e-7) * 0.5), 1e-14); // f(55): cos(π/2) = 0
        close(s.lr(99), 1e-6, 1e-18); // f(100) = r
        // Iterations per epoch scale both lengths.
        let t = WarmupCosine::acl(5.0, 100, 98);
        assert_eq!((t.warmup_steps, t.total_steps), (980, 9_800));
        close(t.lr(979), 5.0, 1e-15);
    }

    #[test]
    fn advcl_warmup_then_per_epoch_cosine() {
        // Python (AdvCL / SupContrast utilities, batch 512 -> warm on, 98 iterations/epoch):
        //   eta_min = 0.5 * 0.1 ** 3
        //   to = eta_min + (0.5 - eta_min) * (1 + math.cos(math.pi * 10 / 1000)) / 2
        //   warm(e, i) = 0.01 + (i + (e - 1) * 98) / (10 * 98) * (to - 0.01)    # e = epoch + 1
        //   cos(e) = eta_min + (0.5 - eta_min) * (1 + math.cos(math.pi * e / 1000)) / 2
        let s = AdvClLr::advcl(0.5, 1000, 512, 98);
        assert!(s.warm);
        close(s.eta_min(), 5e-4, 1e-18);
        let to = 5e-4 + (0.5 - 5e-4) * (1.0 + (PI * 10.0 / 1000.0).cos()) / 2.0;
        close(s.warmup_to(), to, 1e-15);
        close(s.warmup_to(), 0.49987676345134147, 1e-15);
        close(s.lr_at(0, 0), 0.01, 1e-15);
        close(s.lr_at(0, 49), 0.01 + 49.0 / 980.0 * (to - 0.01), 1e-15);
        close(s.lr_at(9, 97), 0.01 + 979.0 / 980.0 * (to - 0.01), 1e-15);
        // Epoch 10 (e = 11): the cosine, constant within the epoch.
        let e11 = 5e-4 + (0.5 - 5e-4) * (1.0 + (PI * 11.0 / 1000.0).cos()) / 2.0;
        close(s.lr_at(10, 0), e11, 1e-15);
        close(s.lr_at(10, 97), e11, 1e-15);
        // The loop's last epoch (e = 1002) slightly exceeds π ([Q50]).
        let e1002 = 5e-4 + (0.5 - 5e-4) * (1.0 + (PI * 1002.0 / 1000.0).cos()) / 2.0;
        close(s.lr_at(1001, 3), e1002, 1e-15);
        assert!(s.lr_at(1001, 3) > s.lr_at(999, 0));
        // The global-iteration view.
        close(LrSchedule::lr(&s, 10 * 98 + 5), e11, 1e-15);
        close(LrSchedule::lr(&s, 49), s.lr_at(0, 49), 0.0);
        // No warm-up at batch 256: epoch 0 already follows the cosine (e = 1).
        let n = AdvClLr::advcl(0.5, 1000, 256, 196);
        assert!(!n.warm);
        close(
            n.lr_at(0, 0),
            5e-4 + (0.5 - 5e-4) * (1.0 + (PI / 1000.0).cos()) / 2.0,
            1e-15,
        );
    }

    #[test]
    fn multistep_at_the_milestones() {
        // torch MultiStepLR(lr=0.1, milestones=[3, 5], gamma=0.1), stepped per epoch:
        //   [0.1, 0.1, 0.1, 0.010000000000000002, 0.010000000000000002,
        //    0.0010000000000000002, 0.0010000000000000002]
        let s = MultiStep::new(0.1, vec![3, 5], 0.1);
        let torch = [
            0.1,
            0.1,
            0.1,
            0.010000000000000002,
            0.010000000000000002,
            0.0010000000000000002,
            0.0010000000000000002,
        ];
        for (t, want) in torch.iter().enumerate() {
            close(s.lr(t), *want, 1e-18);
        }
        // Unsorted milestones work the same.
        let u = MultiStep::new(0.1, vec![5, 3], 0.1);
        assert_eq!(
            (0..7).map(|t| u.lr(t)).collect::<Vec<_>>(),
            (0..7).map(|t| s.lr(t)).collect::<Vec<_>>()
        );
    }
}
