//! RCS: robustness-aware coreset selection (R-RCS `ACL_RCS/small_scale_datasets/RCS.py` and
//! `DynACL_RCS.py`; METHODS.md 7), as the reference code runs it:
//!
//! - a seeded 1 % of the training images is the validation set `U` (to-tensor only);
//! - the set function's gradients are those of the projection head's linear weights only
//!   (`fc1.weight`, `fc1.bias`, `fc2.weight`, `fc3.weight`), each "sketched" by its mean over
//!   the first (output) axis: `3 · D + 1` numbers (1537 at width 64);
//! - `q_U`: the gradient of the representational distance ([`rcs_rd_loss`]) between the head's
//!   output on the `pgd` branch for RD-attacked validation images (PGD, `rcs_pgd_steps` steps of
//!   `(10/255) / T`, uniform start) and on the `normal` branch for the clean ones, everything
//!   in eval mode, backbone features without gradient;
//! - candidates: the training pool in shuffled minibatches of `batch_size` (two views at the
//!   epoch's strength), each with contrastive PGD (`pgd_steps`, step `2/255 · 5 / T`, \[Q40\]),
//!   loss `½ [NT(z) + NT(z̃)]` through the eval-mode head; full gradients and sketches are kept,
//!   all at the initial head;
//! - greedy: `⌊budget / batch_size⌋` times pick the batch with the largest `sketch · q_U`, step
//!   the head by its gradient (twice `rcs_lr`: R-RCS applies the step to `linear_layer` and
//!   again to `model.fc`, which are the same module, \[Q38\] faithful), re-attack `U` and
//!   recompute `q_U`; then the head is restored and the chosen batches' images are the coreset.
//!
//! Bookkeeping \[Q41\] faithful: the candidates are the whole training set (validation images
//! included: R-RCS swaps the full set in after the first epoch), the budget is
//! `⌊fraction · ⌊0.99 n⌋⌋`, and of each validation batch of `N` images only the first `N` rows
//! of the duplicated pairs are used (the first `⌈N/2⌉` images, each twice). Clean: candidates
//! are the 99 % training split, every validation image once.

use candle::backprop::GradStore;
use candle::{DType, Device, Tensor, Var};

use super::trainer::{Error, PGD_BRANCH, PretrainConfig, TrainHooks};
use crate::data::Split;
use crate::nn::attacks::{Norm, PgdConfig, pgd};
use crate::nn::augment::{ImageBatch, MultiView};
use crate::nn::heads::{AclEncoder, l2_normalize};
use crate::nn::init::named_vars;
use crate::nn::losses::{nt_xent, rcs_rd_loss};
use crate::nn::resnet::DEFAULT_BRANCH;
use crate::rng::Rng;

type Result<T> = std::result::Result<T, Error>;

/// The head parameters whose gradients RCS uses (R-RCS: the `fc*` parameters of `proj_head`).
pub const HEAD_PARAMS: [&str; 4] = [
    "projection.fc1.weight",
    "projection.fc1.bias",
    "projection.fc2.weight",
    "projection.fc3.weight",
];

/// Stream tag of RCS's random numbers.
const RCS_STREAM: u64 = 0x5243_5300; // "RCS"

/// The validation split, the candidate pool and the budget (fixed for the run).
#[derive(Clone, Debug, PartialEq)]
pub struct RcsSplit {
    /// Training images (the 99 %), ascending.
    pub train: Vec<usize>,
    /// Validation images, ascending.
    pub val: Vec<usize>,
    /// What is trained on before the first selection and what the candidates come from.
    pub pool: Vec<usize>,
    /// Coreset size in images, `⌊fraction · |train|⌋`.
    pub budget: usize,
}

/// Splits `n` images as R-RCS does (`np.random.choice` of `⌊0.99 n⌋` training images, the rest
/// for validation), from the run's seed.
pub fn split(n: usize, cfg: &PretrainConfig) -> RcsSplit {
    let n_train = ((n as f64) * (1.0 - cfg.rcs_val_fraction) + 1e-9).floor() as usize;
    let perm = Rng::derive(cfg.seed, &[RCS_STREAM, 0]).permutation(n);
    let mut train = perm[..n_train].to_vec();
    let mut val = perm[n_train..].to_vec();
    train.sort_unstable();
    val.sort_unstable();
    let pool = if cfg.faithful.q41 {
        (0..n).collect()
    } else {
        train.clone()
    };
    let budget = ((n_train as f64) * cfg.rcs_fraction + 1e-9).floor() as usize;
    RcsSplit {
        train,
        val,
        pool,
        budget,
    }
}

/// R-RCS's coreset before its first selection (`Coreset.__init__`: `np.random.choice` of
/// `budget` pool images without replacement), sorted. An epoch after the warm-up trains on it
/// when no selection came first (`rcs_warmup` is neither a selection epoch nor right before
/// one, e.g. warm-up 10 with `rcs_every` 4: epoch 11 trains on it, epoch 13 selects).
pub fn initial_coreset(split: &RcsSplit, cfg: &PretrainConfig) -> Vec<usize> {
    let perm = Rng::derive(cfg.seed, &[RCS_STREAM, 0, 1]).permutation(split.pool.len());
    let mut c: Vec<usize> = perm[..split.budget.min(split.pool.len())]
        .iter()
        .map(|&i| split.pool[i])
        .collect();
    c.sort_unstable();
    c
}

/// Whether RCS selects a new coreset at the start of 0-based `epoch` (R-RCS's 1-based `e ≥ W`
/// and `(e − 1) mod f = 0`), and whether training uses a coreset at all in that epoch.
pub fn schedule(cfg: &PretrainConfig, epoch: usize) -> (bool, bool) {
    let e = epoch + 1;
    let select = e >= cfg.rcs_warmup && (e - 1).is_multiple_of(cfg.rcs_every.max(1));
    (select, select || e > cfg.rcs_warmup)
}

/// The rows of the validation batch: \[Q41\] faithful, per chunk of `batch` images the first
/// `N` rows of the duplicated pairs; clean: every image once.
pub fn validation_rows(val: &[usize], batch: usize, faithful: bool) -> Vec<usize> {
    if !faithful {
        return val.to_vec();
    }
    val.chunks(batch.max(1))
        .flat_map(|chunk| (0..chunk.len()).map(move |r| chunk[r / 2]))
        .collect()
}

/// `images[rows]` as f32 in `[0, 1]`, `(rows, 3, h, w)`.
fn pixels(images: &Split, rows: &[usize], device: &Device) -> Result<Tensor> {
    let mut buf = Vec::with_capacity(rows.len() * images.image_len());
    for &i in rows {
        buf.extend_from_slice(images.image(i));
    }
    let t = Tensor::from_vec(buf, (rows.len(), 3, images.h, images.w), device)?;
    Ok((t.to_dtype(DType::F32)? / 255.0)?)
}

/// The head variables of [`HEAD_PARAMS`], in that order.
pub fn head_vars(varmap: &candle_nn::VarMap) -> Result<Vec<Var>> {
    let all = named_vars(varmap);
    HEAD_PARAMS
        .iter()
        .map(|name| {
            all.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| format!("internal: the ACL model has no {name}").into())
        })
        .collect()
}

/// The gradients of `vars` in `grads` and their sketch (each gradient's mean over its first
/// axis, concatenated), on the host.
fn sketch(grads: &GradStore, vars: &[Var]) -> Result<(Vec<Tensor>, Vec<f32>)> {
    let mut full = Vec::with_capacity(vars.len());
    let mut s = Vec::new();
    for (v, name) in vars.iter().zip(HEAD_PARAMS) {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| format!("internal: no gradient reached {name}"))?
            .detach();
        s.extend(
            g.mean(0)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
        );
        full.push(g);
    }
    Ok((full, s))
}

/// `q_U`: the sketched gradient of the validation RD after an RD attack (see the module docs).
fn validation_sketch(
    model: &AclEncoder,
    vars: &[Var],
    x_val: &Tensor,
    cfg: &PretrainConfig,
    rng: &mut Rng,
) -> Result<Vec<f32>> {
    let frozen = model.frozen()?;
    let out = |m: &AclEncoder, x: &Tensor, branch: &str| -> candle::Result<Tensor> {
        let h = m.backbone().forward_branch(x, branch, false)?;
        m.head().forward_branch(&h, branch, false)
    };
    let nat = out(&frozen, x_val, DEFAULT_BRANCH)?.detach();
    let steps = cfg.rcs_pgd_steps;
    let attack = PgdConfig {
        clamp_after_init: !cfg.faithful.q31,
        ..PgdConfig::new(Norm::Linf, cfg.eps, (10.0 / 255.0) / steps as f64, steps)
    };
    let adv = pgd(
        x_val,
        |xa| rcs_rd_loss(&out(&frozen, xa, PGD_BRANCH)?, &nat),
        &attack,
        rng,
    )?
    .adv;
    // backbone features without gradient, the live head with it
    let h = frozen
        .backbone()
        .forward_branch(x_val, DEFAULT_BRANCH, false)?;
    let ha = frozen.backbone().forward_branch(&adv, PGD_BRANCH, false)?;
    let loss = rcs_rd_loss(
        &model.head().forward_branch(&ha, PGD_BRANCH, false)?,
        &model.head().forward_branch(&h, DEFAULT_BRANCH, false)?,
    )?;
    Ok(sketch(&loss.backward()?, vars)?.1)
}

/// One candidate minibatch: its images, the head gradients at the initial head, their sketch.
struct Candidate {
    images: Vec<usize>,
    grads: Vec<Tensor>,
    sketch: Vec<f32>,
}

/// What the caller passes in.
pub struct Selector<'a> {
    /// The model being trained.
    pub model: &'a AclEncoder,
    /// Its variables.
    pub varmap: &'a candle_nn::VarMap,
    /// The training images.
    pub images: &'a Split,
    /// The split.
    pub split: &'a RcsSplit,
    /// The epoch's view generator (its strength).
    pub views: &'a MultiView,
    /// The run's configuration.
    pub cfg: &'a PretrainConfig,
    /// The device.
    pub device: &'a Device,
}

impl Selector<'_> {
    /// Selects the coreset at the start of 0-based `epoch`: the images of the chosen
    /// minibatches, in the order chosen. The head is unchanged afterwards.
    ///
    /// # Errors
    /// A budget smaller than one batch, cancellation, or tensor errors.
    pub fn select(&self, epoch: usize, hooks: &TrainHooks<'_>) -> Result<Vec<usize>> {
        let cfg = self.cfg;
        let bs = cfg.batch_size;
        let n_batches = self.split.budget / bs;
        if n_batches == 0 {
            return Err(format!(
                "RCS: a coreset of {} images (rcs_fraction {} of {} training images) is smaller \
                 than one batch of {bs}",
                self.split.budget,
                cfg.rcs_fraction,
                self.split.train.len()
            )
            .into());
        }
        let vars = head_vars(self.varmap)?;
        let rows = validation_rows(&self.split.val, bs, cfg.faithful.q41);
        let x_val = pixels(self.images, &rows, self.device)?;
        let stream = |tag: u64, i: usize| {
            Rng::derive(cfg.seed, &[RCS_STREAM, 1 + epoch as u64, tag, i as u64])
        };
        let q_u = validation_sketch(self.model, &vars, &x_val, cfg, &mut stream(0, 0))?;

        // candidate gradients, all at the initial head
        let order = stream(1, 0).permutation(self.split.pool.len());
        let chunks: Vec<&[usize]> = order.chunks(bs).collect();
        let total = (chunks.len() + n_batches) as u64;
        let frozen = self.model.frozen()?;
        let steps = cfg.pgd_steps;
        let attack = PgdConfig {
            clamp_after_init: !cfg.faithful.q31,
            ..PgdConfig::new(Norm::Linf, cfg.eps, 2.0 / 255.0 * 5.0 / steps as f64, steps)
        };
        let tau = cfg.temperature;
        let mut cands = Vec::with_capacity(chunks.len());
        for (j, chunk) in chunks.iter().enumerate() {
            if (hooks.cancelled)() {
                return Err(format!("cancelled during the RCS selection of epoch {epoch}").into());
            }
            let images: Vec<usize> = chunk.iter().map(|&k| self.split.pool[k]).collect();
            let mut buf = Vec::with_capacity(images.len() * self.images.image_len());
            for &i in &images {
                buf.extend_from_slice(self.images.image(i));
            }
            let batch = ImageBatch::new(&buf, images.len(), self.images.h, self.images.w)?;
            let v = self.views.generate(batch, stream(2, j).next_u64(), 0)?;
            let shape = v.shape().to_vec();
            let x = Tensor::from_vec(v.data, shape, self.device)?;
            let adv = pgd(
                &x,
                |xa| nt_xent(&frozen.embed(xa, PGD_BRANCH, false)?, tau, tau),
                &attack,
                &mut stream(3, j),
            )?
            .adv;
            let h = frozen
                .backbone()
                .forward_branch(&x, DEFAULT_BRANCH, false)?;
            let ha = frozen.backbone().forward_branch(&adv, PGD_BRANCH, false)?;
            let head = self.model.head();
            let z = l2_normalize(&head.forward_branch(&h, DEFAULT_BRANCH, false)?)?;
            let za = l2_normalize(&head.forward_branch(&ha, PGD_BRANCH, false)?)?;
            let loss = ((nt_xent(&z, tau, tau)? + nt_xent(&za, tau, tau)?)? / 2.0)?;
            let (grads, sketch) = sketch(&loss.backward()?, &vars)?;
            cands.push(Candidate {
                images,
                grads,
                sketch,
            });
            (hooks.progress)(
                (j + 1) as u64,
                total,
                &format!(
                    "RCS epoch {}: candidate gradients {}/{}",
                    epoch + 1,
                    j + 1,
                    chunks.len()
                ),
            );
        }

        // greedy selection on simulated head steps
        let originals: Vec<Tensor> = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle::Result<_>>()?;
        let step = if cfg.faithful.q38 { 2.0 } else { 1.0 } * cfg.rcs_lr;
        let sketches: Vec<&[f32]> = cands.iter().map(|c| c.sketch.as_slice()).collect();
        let picked = greedy(&sketches, n_batches, q_u, |t, j| {
            (hooks.progress)(
                (chunks.len() + t + 1) as u64,
                total,
                &format!("RCS epoch {}: greedy step {}/{n_batches}", epoch + 1, t + 1),
            );
            for (v, g) in vars.iter().zip(&cands[j].grads) {
                v.set(&(v.as_tensor() - (g * step)?)?)?;
            }
            validation_sketch(self.model, &vars, &x_val, cfg, &mut stream(4, t))
        });
        for (v, t) in vars.iter().zip(&originals) {
            v.set(t)?;
        }
        Ok(picked?
            .into_iter()
            .flat_map(|j| cands[j].images.iter().copied())
            .collect())
    }
}

/// R-RCS's greedy loop over candidate sketches: `n` times pick the remaining candidate with the
/// largest `sketch · q_U` (the first of equal maxima, as `torch.argmax`); after every pick but
/// the last, `step(t, j)` applies candidate `j`'s head step and returns the new `q_U`. Returns
/// the picked candidates in order.
///
/// # Errors
/// What `step` returns.
pub fn greedy(
    sketches: &[&[f32]],
    n: usize,
    mut q_u: Vec<f32>,
    mut step: impl FnMut(usize, usize) -> Result<Vec<f32>>,
) -> Result<Vec<usize>> {
    let mut remaining: Vec<usize> = (0..sketches.len()).collect();
    let mut picked = Vec::with_capacity(n);
    for t in 0..n.min(sketches.len()) {
        let gain = |j: usize| -> f64 {
            sketches[j]
                .iter()
                .zip(&q_u)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        let gains: Vec<f64> = remaining.iter().map(|&j| gain(j)).collect();
        let r = (0..gains.len()).fold(0, |best, i| if gains[i] > gains[best] { i } else { best });
        let j = remaining.remove(r);
        picked.push(j);
        if t + 1 < n {
            q_u = step(t, j)?;
        }
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_best_aligned_candidate_then_follows_the_new_gradient() -> Result<()> {
        let c: Vec<Vec<f32>> = vec![
            vec![1.0, 0.0], // 0
            vec![0.0, 1.0], // 1
            vec![0.9, 0.0], // 2
            vec![0.0, 2.0], // 3
            vec![0.0, 2.0], // 4: ties with 3, loses (first of equal maxima)
        ];
        let sketches: Vec<&[f32]> = c.iter().map(Vec::as_slice).collect();
        let mut calls = Vec::new();
        // q_U starts along x; after each pick it turns to y
        let picked = greedy(&sketches, 3, vec![1.0, 0.0], |t, j| {
            calls.push((t, j));
            Ok(vec![0.0, 1.0])
        })?;
        assert_eq!(picked, [0, 3, 4]);
        // a step after every pick but the last
        assert_eq!(calls, [(0, 0), (1, 3)]);
        // a budget beyond the candidates takes them all
        let all = greedy(&sketches, 9, vec![1.0, 1.0], |_, _| Ok(vec![1.0, 1.0]))?;
        assert_eq!(all.len(), 5);
        Ok(())
    }

    #[test]
    fn the_validation_sketch_has_3d_plus_1_non_zero_entries() -> Result<()> {
        let cfg = serde_json::from_value::<super::super::PretrainParams>(
            serde_json::json!({"method": "rcs", "width": 8, "rcs_pgd_steps": 2}),
        )?
        .config();
        let (vm, model) = crate::nn::init::build_seeded(
            3,
            &crate::nn::init::InitRules::default(),
            DType::F32,
            &Device::Cpu,
            |vb| crate::nn::heads::acl_encoder(8, &cfg.branches(), vb),
        )?;
        let vars = head_vars(&vm)?;
        let x = Tensor::rand(0f32, 1f32, (6, 3, 32, 32), &Device::Cpu)?;
        let s = validation_sketch(&model, &vars, &x, &cfg, &mut Rng::new(1))?;
        // fc1.weight, fc1.bias, fc2.weight, fc3.weight of a 64-wide head: 64 + 1 + 64 + 64
        assert_eq!(s.len(), 3 * 64 + 1);
        assert!(s.iter().filter(|v| v.abs() > 0.0).count() > 100, "{s:?}");
        assert!(s.iter().all(|v| v.is_finite()));
        // a different head gives a different sketch
        vars[0].set(&(vars[0].as_tensor() * 1.5)?)?;
        let t = validation_sketch(&model, &vars, &x, &cfg, &mut Rng::new(1))?;
        assert_ne!(s, t);
        Ok(())
    }

    #[test]
    fn validation_rows_repeat_the_first_half_of_each_batch_when_faithful() {
        let val: Vec<usize> = (10..17).collect();
        // one batch of 7: rows 0..7 of [10,10,11,11,12,12,13,13,...]
        assert_eq!(validation_rows(&val, 8, true), [10, 10, 11, 11, 12, 12, 13]);
        // batches of 4 and 3
        assert_eq!(validation_rows(&val, 4, true), [10, 10, 11, 11, 14, 14, 15]);
        assert_eq!(validation_rows(&val, 4, false), val);
    }
}
