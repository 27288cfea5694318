//! Losses: NT-Xent / InfoNCE, SupCon, EMP-SSL (invariance + TCR), cross-entropy, TRADES KL.
//!
//! METHODS 2.4 is the spec; each section below names its (Lx) label. Every function returns a
//! differentiable tensor in the input's dtype and on its device, and a `_per_example` /
//! `_per_anchor` variant where an attack needs per-example values (PGD restarts keep the
//! per-example best).
//!
//! # Contrastive losses (L1, L1m, L1x)
//!
//! `z` is `(V B, d)`, one embedding per row, **view-major**: rows `vB..(v+1)B` are view `v`
//! of images `0..B`, so the views of image `b` are the rows `b, b + B, ..`. Rows are expected
//! to be unit-normalised (the losses do not normalise). With `s_ak = z_a . z_k / tau`:
//!
//! ```text
//! l_a = -(tau / tau_b) * sum_p w_ap [ s_ap - log sum_{k != a} exp(s_ak) ]      L = mean_a l_a
//! ```
//!
//! | loss | function | positive weights `w_ap` |
//! |---|---|---|
//! | (L1) NT-Xent, `V = 2` | [`nt_xent`] | 1 on the partner `a +- B` |
//! | (L1m) multi-positive SupCon | [`supcon`] | `1 / (V - 1)` on each other view of the image |
//! | (L1x) SimCLR-repo InfoNCE | [`info_nce_first_positive`] | 1 on the *first* other view only (METHODS \[Q54\]); no `tau_b` |
//!
//! For (L1x) the first positive of an anchor in view 0 is view 1, and view 0 for every other
//! view (the lowest-index column of the cosine matrix with its diagonal dropped); the other
//! `V - 2` positives stay in the denominator as negatives. For `V = 2` all three agree (with
//! `tau_b = tau`). R-ADV's scale `tau / tau_b = 0.5 / 0.07` is METHODS \[Q45\].
//!
//! Numerics: the row maximum over `k != a` is subtracted (detached; it cancels exactly), and
//! the self term is removed exactly by setting `s_aa = -inf` before the exponential (not by
//! subtracting `e^{1/tau}` from the sum as R-AIR does, which loses precision for small `tau`).
//!
//! # EMP-SSL (L2)
//!
//! `z` is `(n B, d)`, view-major (`n` view chunks `Z_i`, each `(B, d)`).
//!
//! ```text
//! zbar_b = 1/n sum_i z_ib                 (not renormalised; gradients flow through it)
//! cos(u, v) = u.v / max(|u| |v|, 1e-8)
//! L_inv  = -1/n sum_i 1/B sum_b cos(z_ib, zbar_b)
//! R(Z_i) = 1/2 logdet(I_d + c Z_i^T Z_i) = 1/2 logdet(I_B + c Z_i Z_i^T),   c = d / (B eps)
//! L_TCR  = -1/n sum_i R(Z_i)
//! L      = patch_sim * L_inv + tcr * L_TCR
//! ```
//!
//! The code's `eps` (0.2) is `epsilon^2` of the EMP-SSL paper (METHODS \[Q21\]). `R` is computed
//! on the smaller side of Sylvester's identity (the `B x B` side for `B <= d`) with
//! [`logdet_spd`] (host f64 Cholesky, exact backward
//! `dR/dZ = c (I_B + c Z Z^T)^{-1} Z`), all `n` chunks in one batched call. No jitter.
//!
//! # Classification (L3, L4)
//!
//! `logits` are `(B, C)`, `labels` `(B)` u32 or i64.
//!
//! ```text
//! CE_b   = log sum_c exp(f_bc) - f_{b,y_b}                        (L3, mean over b)
//! KL_b   = sum_c p_bc (log p_bc - log q_bc),  p = softmax f(x), q = softmax f(x_adv)
//! TRADES = CE(f(x), y) + beta * 1/B sum_b KL_b                     (L4, beta = 6)
//! ```
//!
//! The KL is computed from log-softmaxes (no `log 0`). Gradients flow into both logits; an
//! attack that maximises the KL term detaches the clean logits itself.

use candle::{D, DType, Result, Tensor, bail};
use serde::{Deserialize, Serialize};

use super::linalg::logdet_spd;

// ---------------------------------------------------------------------------------------------
// Contrastive losses (L1, L1m, L1x)
// ---------------------------------------------------------------------------------------------

/// Which positives an anchor scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Positives {
    /// Every other view of the same image, weight `1 / (V - 1)` each.
    All,
    /// Only the first other view (lowest row index), weight 1 (METHODS \[Q54\]).
    First,
}

fn check_temperature(what: &str, name: &str, t: f64) -> Result<()> {
    if !(t > 0.0 && t.is_finite()) {
        bail!("{what}: {name} must be positive and finite, got {t}")
    }
    Ok(())
}

/// `(rows, B)` of a view-major `(V B, d)` tensor.
fn check_views(what: &str, z: &Tensor, views: usize) -> Result<(usize, usize)> {
    let &[n, _] = z.dims() else {
        bail!(
            "{what}: expected (views * B, d) embeddings, got shape {:?}",
            z.dims()
        )
    };
    if views == 0 || n == 0 || n % views != 0 {
        bail!("{what}: {n} rows are not {views} views of one batch")
    }
    Ok((n, n / views))
}

/// The per-anchor contrastive loss `(V B)` (module docs, section "Contrastive losses").
fn contrastive_per_anchor(
    what: &str,
    z: &Tensor,
    views: usize,
    temperature: f64,
    scale: f64,
    positives: Positives,
) -> Result<Tensor> {
    check_temperature(what, "temperature", temperature)?;
    if views < 2 {
        bail!("{what}: needs at least 2 views, got {views}")
    }
    let (n, b) = check_views(what, z, views)?;
    let (dev, dt) = (z.device(), z.dtype());
    // Masks, built on the device from two index vectors: row a is image a % B, view a / B.
    let ids = Tensor::arange(0u32, n as u32, dev)?;
    let is_self = ids.unsqueeze(1)?.broadcast_eq(&ids.unsqueeze(0)?)?; // (n, n) u8
    let weights = match positives {
        Positives::All => {
            let image: Vec<u32> = (0..n).map(|a| (a % b) as u32).collect();
            let image = Tensor::from_vec(image, n, dev)?;
            let same = image.unsqueeze(1)?.broadcast_eq(&image.unsqueeze(0)?)?;
            ((same.to_dtype(dt)? - is_self.to_dtype(dt)?)? / (views - 1) as f64)?
        }
        Positives::First => {
            let first: Vec<u32> = (0..n)
                .map(|a| {
                    let first_view = if a / b == 0 { 1 } else { 0 };
                    (first_view * b + a % b) as u32
                })
                .collect();
            let first = Tensor::from_vec(first, (n, 1), dev)?;
            ids.unsqueeze(0)?.broadcast_eq(&first)?.to_dtype(dt)?
        }
    };
    let s = (z.matmul(&z.t()?)? / temperature)?; // (n, n)
    let neg_inf = Tensor::new(f64::NEG_INFINITY, dev)?
        .to_dtype(dt)?
        .broadcast_as((n, n))?;
    let masked = is_self.where_cond(&neg_inf, &s)?; // s with s_aa = -inf
    let row_max = masked.detach().max_keepdim(1)?; // (n, 1), over k != a
    let log_denominator = masked
        .broadcast_sub(&row_max)?
        .exp()?
        .sum_keepdim(1)?
        .log()?;
    let positive = (s.broadcast_sub(&row_max)? * weights)?.sum_keepdim(1)?;
    ((log_denominator - positive)? * scale)?.squeeze(1)
}

/// (L1) NT-Xent per anchor, `(2B)`: `z` is `(2B, d)`, view-major, unit rows; the loss is
/// scaled by `temperature / base_temperature`.
///
/// # Errors
///
/// Fails unless `z` is `(2B, d)` with `B >= 1` and both temperatures are positive.
pub fn nt_xent_per_anchor(z: &Tensor, temperature: f64, base_temperature: f64) -> Result<Tensor> {
    check_temperature("nt_xent", "base temperature", base_temperature)?;
    contrastive_per_anchor(
        "nt_xent",
        z,
        2,
        temperature,
        temperature / base_temperature,
        Positives::All,
    )
}

/// (L1) NT-Xent / InfoNCE over two views, the mean over the `2B` anchors (a scalar).
///
/// # Errors
///
/// As [`nt_xent_per_anchor`].
pub fn nt_xent(z: &Tensor, temperature: f64, base_temperature: f64) -> Result<Tensor> {
    nt_xent_per_anchor(z, temperature, base_temperature)?.mean_all()
}

/// (L1m) multi-positive SupCon per anchor, `(V B)`: `z` is `(V B, d)`, view-major; the
/// positives of an anchor are the other `V - 1` views of its image.
///
/// # Errors
///
/// Fails unless `z` is `(V B, d)` with `V >= 2` and both temperatures are positive.
pub fn supcon_per_anchor(
    z: &Tensor,
    views: usize,
    temperature: f64,
    base_temperature: f64,
) -> Result<Tensor> {
    check_temperature("supcon", "base temperature", base_temperature)?;
    contrastive_per_anchor(
        "supcon",
        z,
        views,
        temperature,
        temperature / base_temperature,
        Positives::All,
    )
}

/// (L1m) multi-positive SupCon, the mean over the `V B` anchors (a scalar).
///
/// # Errors
///
/// As [`supcon_per_anchor`].
pub fn supcon(z: &Tensor, views: usize, temperature: f64, base_temperature: f64) -> Result<Tensor> {
    supcon_per_anchor(z, views, temperature, base_temperature)?.mean_all()
}

/// (L1x) SimCLR-repo InfoNCE per anchor, `(V B)`: cross-entropy with the first positive as
/// the target and every other column (the remaining positives included) in the denominator
/// (METHODS \[Q54\]); no base-temperature scale.
///
/// # Errors
///
/// Fails unless `z` is `(V B, d)` with `V >= 2` and the temperature is positive.
pub fn info_nce_first_positive_per_anchor(
    z: &Tensor,
    views: usize,
    temperature: f64,
) -> Result<Tensor> {
    contrastive_per_anchor(
        "info_nce_first_positive",
        z,
        views,
        temperature,
        1.0,
        Positives::First,
    )
}

/// (L1x) SimCLR-repo InfoNCE, the mean over the `V B` anchors (a scalar). Equals
/// [`nt_xent`] with `base_temperature = temperature` for `V = 2`.
///
/// # Errors
///
/// As [`info_nce_first_positive_per_anchor`].
pub fn info_nce_first_positive(z: &Tensor, views: usize, temperature: f64) -> Result<Tensor> {
    info_nce_first_positive_per_anchor(z, views, temperature)?.mean_all()
}

// ---------------------------------------------------------------------------------------------
// AIR's invariance regularisers (METHODS.md 6)

/// The two regularisers of AIR (METHODS.md 6), each a scalar.
#[derive(Debug, Clone)]
pub struct AirRegularizers {
    /// Standard invariant regularisation (natural views against the original image).
    pub sir: Tensor,
    /// Adversarial invariant regularisation (adversarial views against the original image
    /// times adversarial against natural).
    pub air: Tensor,
}

/// `softmax_k(cos(a_k, b_k) / τ)` over the batch, `(B,)`, for unit rows `a`, `b` `(B, d)`.
fn diagonal_softmax(a: &Tensor, b: &Tensor, temperature: f64, log: bool) -> Result<Tensor> {
    let s = ((a * b)?.sum(1)? / temperature)?;
    if log {
        candle_nn::ops::log_softmax(&s, 0)
    } else {
        candle_nn::ops::softmax(&s, 0)
    }
}

/// AIR's SIR and AIR terms from unit-normalised embeddings `(B, d)`: natural views `zi`, `zj`,
/// the original images `zo`, adversarial views `zi_adv`, `zj_adv`.
///
/// With `p_u = softmax_k(cos(z^u_k, z^o_k)/τ)` and `q_u = softmax_k(cos(z̃^u_k, z^o_k)/τ) ·
/// softmax_k(cos(z̃^u_k, z^u_k)/τ)` (element-wise, not renormalised):
/// - `faithful` (R-AIR's `F.kl_div(p_i, log p_j, log_target=True, reduction="sum")`,
///   \[Q28\]): `SIR = Σ_k p_j (log p_j − p_i)`, `AIR = Σ_k q_j (log q_j − q_i)`;
/// - clean: `SIR = KL(p_i ‖ p_j)`, `AIR = KL(q̂_i ‖ q̂_j)` with `q̂ = q / Σ q`.
///
/// # Errors
/// Shape mismatches or a non-positive temperature.
pub fn air_regularizers(
    zi: &Tensor,
    zj: &Tensor,
    zo: &Tensor,
    zi_adv: &Tensor,
    zj_adv: &Tensor,
    temperature: f64,
    faithful: bool,
) -> Result<AirRegularizers> {
    check_temperature("air_regularizers", "temperature", temperature)?;
    let dims = zi.dims();
    for (name, z) in [
        ("zj", zj),
        ("zo", zo),
        ("zi_adv", zi_adv),
        ("zj_adv", zj_adv),
    ] {
        if z.dims() != dims || dims.len() != 2 {
            bail!(
                "air_regularizers: {name} has shape {:?}, expected {:?} = zi's (B, d)",
                z.dims(),
                dims
            )
        }
    }
    let q = |adv: &Tensor, nat: &Tensor| -> Result<Tensor> {
        diagonal_softmax(adv, zo, temperature, false)?
            * diagonal_softmax(adv, nat, temperature, false)?
    };
    let (qi, qj) = (q(zi_adv, zi)?, q(zj_adv, zj)?);
    if faithful {
        let pi = diagonal_softmax(zi, zo, temperature, false)?;
        let log_pj = diagonal_softmax(zj, zo, temperature, true)?;
        let sir = (log_pj.exp()? * (&log_pj - &pi)?)?.sum_all()?;
        let air = (&qj * (qj.log()? - &qi)?)?.sum_all()?;
        Ok(AirRegularizers { sir, air })
    } else {
        let log_pi = diagonal_softmax(zi, zo, temperature, true)?;
        let log_pj = diagonal_softmax(zj, zo, temperature, true)?;
        let sir = (log_pi.exp()? * (&log_pi - &log_pj)?)?.sum_all()?;
        let norm = |q: &Tensor| q.broadcast_div(&q.sum_all()?);
        let (qi, qj) = (norm(&qi)?, norm(&qj)?);
        let air = (&qi * (qi.log()? - qj.log()?)?)?.sum_all()?;
        Ok(AirRegularizers { sir, air })
    }
}

// ---------------------------------------------------------------------------------------------
// RCS's representational distance (METHODS.md 7.1)

/// Per row: `(v − min v) / max(v − min v) + 10⁻⁸` over the last axis.
fn minmax_rows(v: &Tensor) -> Result<Tensor> {
    let shifted = v.broadcast_sub(&v.min_keepdim(D::Minus1)?)?;
    shifted.broadcast_div(&shifted.max_keepdim(D::Minus1)?)? + 1e-8
}

/// RCS's representational distance with `--CoresetLoss KL` (R-RCS `kl_loss`, \[Q39\]): with
/// `ā`, `n̄` the per-row min-max normalised embeddings (+10⁻⁸) of the adversarial `adv` and
/// natural `nat` `(B, D)`, `mean_{b,c} ā (log ā − log n̄)` (`KLDivLoss(reduction='mean')`
/// with the adversarial side as the target; not a KL of distributions).
///
/// # Errors
/// Shape mismatches.
pub fn rcs_rd_loss(adv: &Tensor, nat: &Tensor) -> Result<Tensor> {
    if adv.dims() != nat.dims() || adv.rank() != 2 {
        bail!(
            "rcs_rd_loss: expected two (B, D) embeddings of one shape, got {:?} and {:?}",
            adv.dims(),
            nat.dims()
        )
    }
    let a = minmax_rows(adv)?;
    let n = minmax_rows(nat)?;
    (&a * (a.log()? - n.log()?)?)?.mean_all()
}

// ---------------------------------------------------------------------------------------------
// EMP-SSL (L2)
// ---------------------------------------------------------------------------------------------

/// EMP-SSL loss weights and the coding-rate `eps` (METHODS 2.4 (L2), 15).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmpLossConfig {
    /// Weight of the invariance term (`patch_sim`, 200).
    pub patch_sim: f64,
    /// Weight of the total-coding-rate term (`tcr`, 1).
    pub tcr: f64,
    /// The code's `eps` in `c = d / (B eps)` (0.2; `epsilon^2` of the paper, METHODS \[Q21\]).
    pub eps: f64,
}

impl Default for EmpLossConfig {
    fn default() -> Self {
        Self {
            patch_sim: 200.0,
            tcr: 1.0,
            eps: 0.2,
        }
    }
}

/// The EMP-SSL loss and its two terms (scalars; the terms are for logging, `total` is what
/// gets differentiated).
#[derive(Debug, Clone)]
pub struct EmpLoss {
    /// `patch_sim * invariance + tcr * tcr_term`.
    pub total: Tensor,
    /// `L_inv = -1/n sum_i 1/B sum_b cos(z_ib, zbar_b)`, in `[-1, 1]`.
    pub invariance: Tensor,
    /// `L_TCR = -1/n sum_i R(Z_i)`.
    pub tcr: Tensor,
}

/// Cosine similarity along the last dimension, `u . v / max(|u| |v|, 1e-8)`, with
/// broadcasting: `(.., d)` and `(.., d)` give `(..)`. The denominator is computed as
/// `sqrt(max(|u|^2 |v|^2, 1e-16))` (equal, and finite-gradient at zero vectors).
///
/// # Errors
///
/// Fails when the shapes do not broadcast.
pub fn cosine_similarity(u: &Tensor, v: &Tensor) -> Result<Tensor> {
    let dot = u.broadcast_mul(v)?.sum(D::Minus1)?;
    let norms2 = u
        .sqr()?
        .sum(D::Minus1)?
        .broadcast_mul(&v.sqr()?.sum(D::Minus1)?)?;
    dot.broadcast_div(&norms2.maximum(1e-16)?.sqrt()?)
}

/// (L2) the EMP invariance term `L_inv` (a scalar) of view-major `z` `(n B, d)`.
///
/// # Errors
///
/// Fails unless `z` is `(n B, d)` with `n >= 1`.
pub fn emp_invariance(z: &Tensor, n_views: usize) -> Result<Tensor> {
    let (_, b) = check_views("emp_invariance", z, n_views)?;
    let d = z.dim(1)?;
    let z3 = z.reshape((n_views, b, d))?;
    let mean = z3.mean(0)?; // (B, d), not renormalised
    cosine_similarity(&z3, &mean.unsqueeze(0)?)?
        .mean_all()?
        .neg()
}

/// Which Gram matrix [`coding_rate_on`] factorises (both give the same value, by Sylvester's
/// identity `det(I_d + c Z^T Z) = det(I_B + c Z Z^T)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GramSide {
    /// The smaller of the two (`B x B` when `B <= d`).
    #[default]
    Smaller,
    /// `I_B + c Z Z^T` (`B x B`).
    Rows,
    /// `I_d + c Z^T Z` (`d x d`, the reference's form).
    Columns,
}

/// (L2) the coding rate `R(Z) = 1/2 logdet(I + d/(B eps) Z^T Z)` of `z` `(B, d)` (a scalar),
/// or of each chunk of `z` `(n, B, d)` (giving `(n)`), on the smaller Gram side.
///
/// # Errors
///
/// As [`coding_rate_on`].
pub fn coding_rate(z: &Tensor, eps: f64) -> Result<Tensor> {
    coding_rate_on(z, eps, GramSide::Smaller)
}

/// [`coding_rate`] on a chosen Gram side.
///
/// # Errors
///
/// Fails unless `z` is `(B, d)` or `(n, B, d)` with `B, d >= 1` and `eps > 0`; fails if the
/// Gram matrix is not positive definite (only with non-finite input: `I + c Z Z^T` is SPD).
pub fn coding_rate_on(z: &Tensor, eps: f64, side: GramSide) -> Result<Tensor> {
    check_temperature("coding_rate", "eps", eps)?;
    let (b, d) = match z.dims() {
        &[b, d] | &[_, b, d] if b > 0 && d > 0 => (b, d),
        dims => bail!("coding_rate: expected (B, d) or (n, B, d) embeddings, got shape {dims:?}"),
    };
    let c = d as f64 / (b as f64 * eps);
    let rows = match side {
        GramSide::Smaller => b <= d,
        GramSide::Rows => true,
        GramSide::Columns => false,
    };
    let (gram, k) = if rows {
        (z.matmul(&z.t()?)?, b) // (.., B, B)
    } else {
        (z.t()?.matmul(z)?, d) // (.., d, d)
    };
    let eye = Tensor::eye(k, z.dtype(), z.device())?;
    let m = (gram * c)?.broadcast_add(&eye)?;
    logdet_spd(&m)? * 0.5
}

/// (L2) the total-coding-rate term `L_TCR = -1/n sum_i R(Z_i)` (a scalar) of view-major `z`
/// `(n B, d)`.
///
/// # Errors
///
/// Fails unless `z` is `(n B, d)` with `n >= 1` and `eps > 0`.
pub fn tcr_loss(z: &Tensor, n_views: usize, eps: f64) -> Result<Tensor> {
    let (_, b) = check_views("tcr_loss", z, n_views)?;
    let d = z.dim(1)?;
    coding_rate(&z.reshape((n_views, b, d))?, eps)?
        .mean_all()?
        .neg()
}

/// (L2) the EMP-SSL loss of view-major `z` `(n B, d)` (unit rows): the weighted total and
/// both terms.
///
/// # Errors
///
/// As [`emp_invariance`] and [`tcr_loss`].
pub fn emp_loss(z: &Tensor, n_views: usize, cfg: &EmpLossConfig) -> Result<EmpLoss> {
    let invariance = emp_invariance(z, n_views)?;
    let tcr = tcr_loss(z, n_views, cfg.eps)?;
    let total = ((&invariance * cfg.patch_sim)? + (&tcr * cfg.tcr)?)?;
    Ok(EmpLoss {
        total,
        invariance,
        tcr,
    })
}

// ---------------------------------------------------------------------------------------------
// Classification (L3, L4)
// ---------------------------------------------------------------------------------------------

/// `(B, C)` of logits, checking that `labels` is `(B)`, u32 or i64, with values in `0..C`.
/// The range check copies the `B` labels to the host (a sync on a GPU, negligible next to a
/// forward pass): candle's `gather` does not check indices on every backend.
fn check_labels(what: &str, logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let &[b, c] = logits.dims() else {
        bail!(
            "{what}: expected (B, C) logits, got shape {:?}",
            logits.dims()
        )
    };
    if labels.dims() != [b] {
        bail!(
            "{what}: expected ({b}) labels for {b} logit rows, got shape {:?}",
            labels.dims()
        )
    }
    if !matches!(labels.dtype(), DType::U32 | DType::I64) {
        bail!(
            "{what}: labels must be u32 or i64, got {:?}",
            labels.dtype()
        )
    }
    let host = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if let Some((i, y)) = host
        .iter()
        .enumerate()
        .find(|&(_, &y)| y < 0 || y >= c as i64)
    {
        bail!("{what}: label {y} at row {i} is outside 0..{c}")
    }
    Ok((b, c))
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(x, D::Minus1)
}

/// (L3) cross-entropy per example, `(B)`: `log sum_c exp(f_bc) - f_{b,y_b}`.
///
/// # Errors
///
/// Fails unless `logits` is `(B, C)` and `labels` `(B)` u32 / i64 in `0..C`.
pub fn cross_entropy_per_example(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    check_labels("cross_entropy", logits, labels)?;
    let index = labels.unsqueeze(1)?.contiguous()?;
    log_softmax(logits)?.gather(&index, 1)?.squeeze(1)?.neg()
}

/// (L3) cross-entropy with mean reduction (a scalar).
///
/// # Errors
///
/// As [`cross_entropy_per_example`].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    cross_entropy_per_example(logits, labels)?.mean_all()
}

/// `KL(softmax p_logits || softmax q_logits)` per example, `(B)`, summed over classes.
///
/// # Errors
///
/// Fails unless both are `(B, C)` of the same shape.
pub fn kl_per_example(p_logits: &Tensor, q_logits: &Tensor) -> Result<Tensor> {
    if p_logits.rank() != 2 || p_logits.dims() != q_logits.dims() {
        bail!(
            "kl: expected two (B, C) logit tensors of one shape, got {:?} and {:?}",
            p_logits.dims(),
            q_logits.dims()
        )
    }
    let log_p = log_softmax(p_logits)?;
    let log_q = log_softmax(q_logits)?;
    (log_p.exp()? * (log_p - log_q)?)?.sum(1)
}

/// (L4) the TRADES KL term alone, `1/B sum_b KL(softmax f(x_b) || softmax f(x_adv_b))` (a
/// scalar; what the TRADES / AFF attack maximises).
///
/// # Errors
///
/// As [`kl_per_example`].
pub fn trades_kl(logits_nat: &Tensor, logits_adv: &Tensor) -> Result<Tensor> {
    kl_per_example(logits_nat, logits_adv)?.mean_all()
}

/// The TRADES loss and its two terms (scalars).
#[derive(Debug, Clone)]
pub struct TradesLoss {
    /// `ce + beta * kl`.
    pub total: Tensor,
    /// `CE(f(x), y)`, mean over the batch.
    pub ce: Tensor,
    /// `1/B sum_b KL(softmax f(x_b) || softmax f(x_adv_b))`.
    pub kl: Tensor,
}

/// (L4) TRADES: `CE(f(x), y) + beta * 1/B sum_b KL(softmax f(x) || softmax f(x_adv))`, from
/// the clean and adversarial logits `(B, C)` and labels `(B)`.
///
/// # Errors
///
/// As [`cross_entropy_per_example`] and [`kl_per_example`].
pub fn trades_loss(
    logits_nat: &Tensor,
    logits_adv: &Tensor,
    labels: &Tensor,
    beta: f64,
) -> Result<TradesLoss> {
    let ce = cross_entropy(logits_nat, labels)?;
    let kl = trades_kl(logits_nat, logits_adv)?;
    let total = (&ce + (&kl * beta)?)?;
    Ok(TradesLoss { total, ce, kl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle::{Device, Var};

    // ----- helpers ---------------------------------------------------------------------------

    /// `n` random unit rows of length `d`, row-major.
    fn unit_rows(rng: &mut Rng, n: usize, d: usize) -> Vec<f64> {
        let mut z: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        for row in z.chunks_exact_mut(d) {
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter_mut().for_each(|v| *v /= norm);
        }
        z
    }

    fn tensor(z: &[f64], n: usize, d: usize) -> Result<Tensor> {
        Tensor::from_vec(z.to_vec(), (n, d), &Device::Cpu)
    }

    /// Value and gradient (flattened) of a scalar loss of an `(n, d)` f64 input.
    fn value_and_grad(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        z: &[f64],
        n: usize,
        d: usize,
    ) -> Result<(f64, Vec<f64>)> {
        let var = Var::from_vec(z.to_vec(), (n, d), &Device::Cpu)?;
        let loss = f(var.as_tensor())?;
        let grads = loss.backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("the input has a gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok((loss.to_scalar::<f64>()?, g))
    }

    /// AIR's regularisers in plain f64 loops (R-AIR `AIR.py`, written from the formulas).
    fn air_reference(z: [&[f64]; 5], b: usize, d: usize, tau: f64, faithful: bool) -> (f64, f64) {
        let [zi, zj, zo, zia, zja] = z;
        let dot = |u: &[f64], v: &[f64], k: usize| -> f64 {
            (0..d).map(|c| u[k * d + c] * v[k * d + c]).sum::<f64>() / tau
        };
        let softmax = |u: &[f64], v: &[f64]| -> Vec<f64> {
            let s: Vec<f64> = (0..b).map(|k| dot(u, v, k)).collect();
            let total: f64 = s.iter().map(|x| x.exp()).sum();
            s.iter().map(|x| x.exp() / total).collect()
        };
        let (pi, pj) = (softmax(zi, zo), softmax(zj, zo));
        let qi: Vec<f64> = softmax(zia, zo)
            .iter()
            .zip(softmax(zia, zi))
            .map(|(a, c)| a * c)
            .collect();
        let qj: Vec<f64> = softmax(zja, zo)
            .iter()
            .zip(softmax(zja, zj))
            .map(|(a, c)| a * c)
            .collect();
        if faithful {
            // F.kl_div(input, target, log_target=True, reduction="sum")
            //   = sum exp(target) * (target - input)
            let sir = (0..b).map(|k| pj[k] * (pj[k].ln() - pi[k])).sum();
            let air = (0..b).map(|k| qj[k] * (qj[k].ln() - qi[k])).sum();
            (sir, air)
        } else {
            let kl = |p: &[f64], q: &[f64]| -> f64 {
                let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
                (0..b)
                    .map(|k| p[k] / sp * ((p[k] / sp).ln() - (q[k] / sq).ln()))
                    .sum()
            };
            (kl(&pi, &pj), kl(&qi, &qj))
        }
    }

    #[test]
    fn air_regularizers_match_the_reference_formulas() -> Result<()> {
        let (b, d, tau) = (6, 5, 0.5);
        let mut rng = Rng::new(11);
        let z: Vec<Vec<f64>> = (0..5).map(|_| unit_rows(&mut rng, b, d)).collect();
        let t: Vec<Tensor> = z.iter().map(|v| tensor(v, b, d)).collect::<Result<_>>()?;
        let mut seen = Vec::new();
        for faithful in [true, false] {
            let r = air_regularizers(&t[0], &t[1], &t[2], &t[3], &t[4], tau, faithful)?;
            let (sir, air) = (r.sir.to_scalar::<f64>()?, r.air.to_scalar::<f64>()?);
            let (esir, eair) =
                air_reference([&z[0], &z[1], &z[2], &z[3], &z[4]], b, d, tau, faithful);
            assert!(
                (sir - esir).abs() < 1e-12,
                "faithful {faithful}: SIR {sir} vs {esir}"
            );
            assert!(
                (air - eair).abs() < 1e-12,
                "faithful {faithful}: AIR {air} vs {eair}"
            );
            seen.push((sir, air));
        }
        // the two modes really differ, and a true KL of a distribution with itself is 0
        assert!((seen[0].0 - seen[1].0).abs() > 1e-3 && (seen[0].1 - seen[1].1).abs() > 1e-3);
        let same = air_regularizers(&t[0], &t[0], &t[2], &t[3], &t[3], tau, false)?;
        assert!(same.sir.to_scalar::<f64>()?.abs() < 1e-12);
        assert!(same.air.to_scalar::<f64>()?.abs() < 1e-12);
        // the faithful SIR's gradient (through p_i and log p_j) matches finite differences
        let f = |zi: &Tensor| {
            air_regularizers(zi, &t[1], &t[2], &t[3], &t[4], tau, true).map(|r| r.sir)
        };
        let (_, g) = value_and_grad(f, &z[0], b, d)?;
        let fd = central_fd(
            |zi| {
                let zi = tensor(zi, b, d)?;
                air_regularizers(&zi, &t[1], &t[2], &t[3], &t[4], tau, true)?
                    .sir
                    .to_scalar::<f64>()
            },
            &z[0],
            1e-6,
        )?;
        for (a, e) in g.iter().zip(&fd) {
            assert!(
                (a - e).abs() < 1e-6,
                "gradient {a} vs finite difference {e}"
            );
        }
        Ok(())
    }

    #[test]
    fn rcs_rd_loss_matches_the_reference_formula() -> Result<()> {
        let (b, d) = (3, 5);
        let mut rng = Rng::new(4);
        let a: Vec<f64> = (0..b * d).map(|_| rng.normal()).collect();
        let n: Vec<f64> = (0..b * d).map(|_| rng.normal()).collect();
        let minmax = |v: &[f64]| -> Vec<f64> {
            v.chunks(d)
                .flat_map(|row| {
                    let lo = row.iter().cloned().fold(f64::INFINITY, f64::min);
                    let hi = row.iter().map(|x| x - lo).fold(0.0, f64::max);
                    row.iter()
                        .map(move |x| (x - lo) / hi + 1e-8)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (am, nm) = (minmax(&a), minmax(&n));
        let want: f64 = am
            .iter()
            .zip(&nm)
            .map(|(p, q)| p * (p.ln() - q.ln()))
            .sum::<f64>()
            / (b * d) as f64;
        let got = rcs_rd_loss(&tensor(&a, b, d)?, &tensor(&n, b, d)?)?.to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // the gradient reaches the adversarial side (what the RD attack ascends)
        let (_, g) = value_and_grad(|x| rcs_rd_loss(x, &tensor(&n, b, d)?), &a, b, d)?;
        assert!(g.iter().any(|v| v.abs() > 1e-6));
        Ok(())
    }

    /// Central finite differences of `f` at every entry of `z`.
    fn central_fd(f: impl Fn(&[f64]) -> Result<f64>, z: &[f64], h: f64) -> Result<Vec<f64>> {
        (0..z.len())
            .map(|i| {
                let mut p = z.to_vec();
                p[i] += h;
                let mut m = z.to_vec();
                m[i] -= h;
                Ok((f(&p)? - f(&m)?) / (2.0 * h))
            })
            .collect()
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Positive set of anchor `a` straight from the definitions (view-major, `B` images).
    fn positives(a: usize, n: usize, b: usize, first_only: bool) -> Vec<usize> {
        let all: Vec<usize> = (0..n).filter(|&k| k != a && k % b == a % b).collect();
        if first_only { all[..1].to_vec() } else { all }
    }

    /// Independent f64 contrastive loss: plain loops, no max shift, no masks.
    fn ref_contrastive(
        z: &[f64],
        n: usize,
        d: usize,
        views: usize,
        tau: f64,
        tau_b: f64,
        first_only: bool,
    ) -> f64 {
        let b = n / views;
        let s = |a: usize, k: usize| -> f64 {
            (0..d).map(|j| z[a * d + j] * z[k * d + j]).sum::<f64>() / tau
        };
        let mut total = 0.0;
        for a in 0..n {
            let lse = (0..n)
                .filter(|&k| k != a)
                .map(|k| s(a, k).exp())
                .sum::<f64>()
                .ln();
            let pos = positives(a, n, b, first_only);
            let mean: f64 = pos.iter().map(|&p| s(a, p) - lse).sum::<f64>() / pos.len() as f64;
            total += -(tau / tau_b) * mean;
        }
        total / n as f64
    }

    /// Independent analytic gradient of [`ref_contrastive`]:
    /// `dL/dz_j = scale/(N tau) sum_a sum_{k != a} (P_ak - w_ak) (d_aj z_k + d_kj z_a)`.
    fn ref_contrastive_grad(
        z: &[f64],
        n: usize,
        d: usize,
        views: usize,
        tau: f64,
        tau_b: f64,
        first_only: bool,
    ) -> Vec<f64> {
        let b = n / views;
        let s = |a: usize, k: usize| -> f64 {
            (0..d).map(|j| z[a * d + j] * z[k * d + j]).sum::<f64>() / tau
        };
        let mut g = vec![0.0; n * d];
        for a in 0..n {
            let e: Vec<f64> = (0..n)
                .map(|k| if k == a { 0.0 } else { s(a, k).exp() })
                .collect();
            let sum: f64 = e.iter().sum();
            let pos = positives(a, n, b, first_only);
            for k in (0..n).filter(|&k| k != a) {
                let w = if pos.contains(&k) {
                    1.0 / pos.len() as f64
                } else {
                    0.0
                };
                let coef = (e[k] / sum - w) * (tau / tau_b) / (n as f64 * tau);
                for j in 0..d {
                    g[a * d + j] += coef * z[k * d + j];
                    g[k * d + j] += coef * z[a * d + j];
                }
            }
        }
        g
    }

    /// Independent log|det| by LU with partial pivoting, row-major `n x n`.
    fn logdet_lu(a: &[f64], n: usize) -> f64 {
        let mut m = a.to_vec();
        let mut ld = 0.0;
        for k in 0..n {
            let p = (k..n)
                .max_by(|&x, &y| m[x * n + k].abs().total_cmp(&m[y * n + k].abs()))
                .expect("k < n");
            for c in 0..n {
                m.swap(k * n + c, p * n + c);
            }
            let piv = m[k * n + k];
            ld += piv.abs().ln();
            for r in k + 1..n {
                let f = m[r * n + k] / piv;
                for c in k..n {
                    m[r * n + c] -= f * m[k * n + c];
                }
            }
        }
        ld
    }

    /// Independent inverse by Gauss-Jordan with partial pivoting, row-major `n x n`.
    fn inverse_gauss_jordan(a: &[f64], n: usize) -> Vec<f64> {
        let w = 2 * n;
        let mut m = vec![0.0; n * w];
        for i in 0..n {
            m[i * w..i * w + n].copy_from_slice(&a[i * n..(i + 1) * n]);
            m[i * w + n + i] = 1.0;
        }
        for k in 0..n {
            let p = (k..n)
                .max_by(|&x, &y| m[x * w + k].abs().total_cmp(&m[y * w + k].abs()))
                .expect("k < n");
            for c in 0..w {
                m.swap(k * w + c, p * w + c);
            }
            let piv = m[k * w + k];
            for c in 0..w {
                m[k * w + c] /= piv;
            }
            for r in (0..n).filter(|&r| r != k) {
                let f = m[r * w + k];
                if f != 0.0 {
                    for c in 0..w {
                        m[r * w + c] -= f * m[k * w + c];
                    }
                }
            }
        }
        (0..n)
            .flat_map(|i| m[i * w + n..(i + 1) * w].to_vec())
            .collect()
    }

    /// Independent coding rate on the `d x d` side: `1/2 logdet(I_d + d/(B eps) Z^T Z)`.
    fn ref_coding_rate_cols(z: &[f64], b: usize, d: usize, eps: f64) -> f64 {
        let c = d as f64 / (b as f64 * eps);
        let mut m = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                let g: f64 = (0..b).map(|r| z[r * d + i] * z[r * d + j]).sum();
                m[i * d + j] = c * g + if i == j { 1.0 } else { 0.0 };
            }
        }
        0.5 * logdet_lu(&m, d)
    }

    /// Independent EMP invariance term in plain loops.
    fn ref_invariance(z: &[f64], n_views: usize, b: usize, d: usize) -> f64 {
        let mut total = 0.0;
        for bi in 0..b {
            let mean: Vec<f64> = (0..d)
                .map(|j| {
                    (0..n_views).map(|i| z[(i * b + bi) * d + j]).sum::<f64>() / n_views as f64
                })
                .collect();
            for i in 0..n_views {
                let row = &z[(i * b + bi) * d..(i * b + bi + 1) * d];
                let dot: f64 = row.iter().zip(&mean).map(|(x, y)| x * y).sum();
                let nr = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                let nm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
                total += dot / (nr * nm).max(1e-8);
            }
        }
        -total / (n_views * b) as f64
    }

    // ----- contrastive -----------------------------------------------------------------------

    /// Checks one contrastive loss against the independent value, the independent analytic
    /// gradient, and central differences of the candle loss itself; returns the three errors.
    #[allow(clippy::too_many_arguments)]
    fn check_contrastive(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        z: &[f64],
        n: usize,
        d: usize,
        views: usize,
        tau: f64,
        tau_b: f64,
        first_only: bool,
    ) -> Result<(f64, f64, f64)> {
        let (value, grad) = value_and_grad(&f, z, n, d)?;
        let want = ref_contrastive(z, n, d, views, tau, tau_b, first_only);
        let want_grad = ref_contrastive_grad(z, n, d, views, tau, tau_b, first_only);
        let fd = central_fd(|p| f(&tensor(p, n, d)?)?.to_scalar::<f64>(), z, 1e-6)?;
        Ok((
            (value - want).abs(),
            max_abs_diff(&grad, &want_grad),
            max_abs_diff(&grad, &fd),
        ))
    }

    #[test]
    fn nt_xent_value_and_gradient() -> Result<()> {
        let (b, d) = (4, 8);
        let z = unit_rows(&mut Rng::new(1), 2 * b, d);
        // R-ADV's temperatures (scale 0.5 / 0.07) and R-CF's (0.07, scale 1).
        for (tau, tau_b) in [(0.5, 0.07), (0.07, 0.07)] {
            let (ev, eg, efd) = check_contrastive(
                |t| nt_xent(t, tau, tau_b),
                &z,
                2 * b,
                d,
                2,
                tau,
                tau_b,
                false,
            )?;
            // Measured (tau 0.5 / 0.07): value 0 / 0, gradient 8.9e-16 / 8.9e-16,
            // finite differences 3.2e-9 / 2.0e-9.
            assert!(ev < 1e-12, "tau {tau}: value error {ev:e}");
            assert!(eg < 1e-12, "tau {tau}: gradient error {eg:e}");
            assert!(efd < 1e-7, "tau {tau}: finite-difference error {efd:e}");
        }
        // The per-anchor losses average to the loss and are not all equal.
        let t = tensor(&z, 2 * b, d)?;
        let per = nt_xent_per_anchor(&t, 0.5, 0.5)?.to_vec1::<f64>()?;
        assert_eq!(per.len(), 2 * b);
        let mean = per.iter().sum::<f64>() / per.len() as f64;
        assert!((mean - nt_xent(&t, 0.5, 0.5)?.to_scalar::<f64>()?).abs() < 1e-14);
        assert!((per[0] - per[1]).abs() > 1e-6);
        Ok(())
    }

    #[test]
    fn supcon_four_views_value_and_gradient() -> Result<()> {
        let (b, d, v) = (4, 8, 4);
        let z = unit_rows(&mut Rng::new(2), v * b, d);
        let (ev, eg, efd) = check_contrastive(
            |t| supcon(t, v, 0.5, 0.07),
            &z,
            v * b,
            d,
            v,
            0.5,
            0.07,
            false,
        )?;
        // Measured: value 0, gradient 4.4e-16, finite differences 3.7e-9.
        assert!(ev < 1e-12, "value error {ev:e}");
        assert!(eg < 1e-12, "gradient error {eg:e}");
        assert!(efd < 1e-7, "finite-difference error {efd:e}");
        // With two views SupCon is NT-Xent.
        let z2 = tensor(&z[..2 * b * d], 2 * b, d)?;
        let a = supcon(&z2, 2, 0.5, 0.07)?.to_scalar::<f64>()?;
        let c = nt_xent(&z2, 0.5, 0.07)?.to_scalar::<f64>()?;
        assert!((a - c).abs() < 1e-14);
        Ok(())
    }

    #[test]
    fn first_positive_info_nce_matches_q54() -> Result<()> {
        let (b, d) = (4, 8);
        // V = 2: equals NT-Xent with tau_b = tau.
        let z2 = unit_rows(&mut Rng::new(3), 2 * b, d);
        let t2 = tensor(&z2, 2 * b, d)?;
        let x = info_nce_first_positive(&t2, 2, 0.2)?.to_scalar::<f64>()?;
        let y = nt_xent(&t2, 0.2, 0.2)?.to_scalar::<f64>()?;
        assert!((x - y).abs() < 1e-14, "{x} vs {y}");
        // V = 4: only the first positive is the target.
        let v = 4;
        let z4 = unit_rows(&mut Rng::new(4), v * b, d);
        let (ev, eg, efd) = check_contrastive(
            |t| info_nce_first_positive(t, v, 0.2),
            &z4,
            v * b,
            d,
            v,
            0.2,
            0.2,
            true,
        )?;
        // Measured: value 8.9e-16, gradient 2.2e-16, finite differences 9.7e-10.
        assert!(ev < 1e-12, "value error {ev:e}");
        assert!(eg < 1e-12, "gradient error {eg:e}");
        assert!(efd < 1e-7, "finite-difference error {efd:e}");
        // ... and it differs from SupCon (all positives as targets) on the same input.
        let t4 = tensor(&z4, v * b, d)?;
        let first = info_nce_first_positive(&t4, v, 0.2)?.to_scalar::<f64>()?;
        let all = supcon(&t4, v, 0.2, 0.2)?.to_scalar::<f64>()?;
        assert!((first - all).abs() > 1e-2, "{first} vs {all}");
        Ok(())
    }

    #[test]
    fn contrastive_is_stable_at_small_temperature_in_f32() -> Result<()> {
        // tau = 0.01: s_aa = 100 would overflow exp in f32 without the exact self mask.
        let (b, d) = (4, 8);
        let z = unit_rows(&mut Rng::new(5), 2 * b, d);
        let want = ref_contrastive(&z, 2 * b, d, 2, 0.01, 0.01, false);
        let var = Var::from_tensor(&tensor(&z, 2 * b, d)?.to_dtype(DType::F32)?)?;
        let loss = nt_xent(var.as_tensor(), 0.01, 0.01)?;
        let got = f64::from(loss.to_scalar::<f32>()?);
        // Measured: relative error 1.1e-8 against the f64 reference (loss 58.41).
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(1.0),
            "{got} vs {want}"
        );
        let g = loss.backward()?;
        let g = g.get(var.as_tensor()).expect("gradient");
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        assert!(g.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn contrastive_rejects_bad_shapes() -> Result<()> {
        let z = Tensor::zeros((6, 4), DType::F64, &Device::Cpu)?;
        assert!(supcon(&z, 4, 0.5, 0.5).is_err(), "6 rows are not 4 views");
        assert!(supcon(&z, 1, 0.5, 0.5).is_err(), "one view");
        assert!(nt_xent(&z, 0.0, 0.5).is_err(), "zero temperature");
        assert!(nt_xent(&z.flatten_all()?, 0.5, 0.5).is_err(), "rank 1");
        Ok(())
    }

    // ----- EMP-SSL ---------------------------------------------------------------------------

    #[test]
    fn emp_invariance_value_and_gradient() -> Result<()> {
        let (n, b, d) = (4, 3, 8);
        let z = unit_rows(&mut Rng::new(6), n * b, d);
        let (value, grad) = value_and_grad(|t| emp_invariance(t, n), &z, n * b, d)?;
        let want = ref_invariance(&z, n, b, d);
        // Measured: value 5.6e-17, gradient vs fd of the reference 6.1e-11.
        assert!((value - want).abs() < 1e-14, "{value} vs {want}");
        assert!(want < -0.1 && want > -1.0, "a real average cosine: {want}");
        let fd = central_fd(|p| Ok(ref_invariance(p, n, b, d)), &z, 1e-6)?;
        let err = max_abs_diff(&grad, &fd);
        assert!(err < 1e-8, "gradient error {err:e}");
        // Identical views: the cosine is 1 everywhere.
        let same: Vec<f64> = (0..n).flat_map(|_| z[..b * d].to_vec()).collect();
        let v = emp_invariance(&tensor(&same, n * b, d)?, n)?.to_scalar::<f64>()?;
        assert!((v + 1.0).abs() < 1e-14);
        Ok(())
    }

    #[test]
    fn coding_rate_matches_independent_logdet() -> Result<()> {
        let (n, b, d, eps) = (3, 8, 32, 0.2);
        let z = unit_rows(&mut Rng::new(7), n * b, d);
        let chunks: Vec<f64> = (0..n)
            .map(|i| ref_coding_rate_cols(&z[i * b * d..(i + 1) * b * d], b, d, eps))
            .collect();
        // One chunk, (B, d) -> scalar.
        let r0 = coding_rate(&tensor(&z[..b * d], b, d)?, eps)?.to_scalar::<f64>()?;
        // Measured: relative error 1.5e-16 (R = 11.706).
        assert!(
            (r0 - chunks[0]).abs() < 1e-12 * chunks[0],
            "{r0} vs {}",
            chunks[0]
        );
        // Batched (n, B, d) -> (n), and the TCR term is minus the mean.
        let t = tensor(&z, n * b, d)?;
        let rs = coding_rate(&t.reshape((n, b, d))?, eps)?.to_vec1::<f64>()?;
        for (r, want) in rs.iter().zip(&chunks) {
            assert!((r - want).abs() < 1e-12 * want, "{r} vs {want}");
        }
        let tcr = tcr_loss(&t, n, eps)?.to_scalar::<f64>()?;
        let want = -chunks.iter().sum::<f64>() / n as f64;
        assert!((tcr - want).abs() < 1e-12 * want.abs(), "{tcr} vs {want}");
        // 8 unit rows in 32 dims are nearly orthogonal: R ~ 1/2 * 8 * log(1 + c), c = 20.
        assert!((chunks[0] - 4.0 * 21f64.ln()).abs() < 1.0, "{}", chunks[0]);
        Ok(())
    }

    #[test]
    fn sylvester_both_sides_agree() -> Result<()> {
        // Measured: relative differences 3.0e-16 and 3.5e-16.
        for (b, d) in [(8, 32), (40, 12)] {
            let z = unit_rows(&mut Rng::new(8 + b as u64), b, d);
            let t = tensor(&z, b, d)?;
            let rows = coding_rate_on(&t, 0.2, GramSide::Rows)?.to_scalar::<f64>()?;
            let cols = coding_rate_on(&t, 0.2, GramSide::Columns)?.to_scalar::<f64>()?;
            let auto = coding_rate(&t, 0.2)?.to_scalar::<f64>()?;
            assert!(
                (rows - cols).abs() < 1e-12 * rows,
                "B {b} d {d}: {rows} vs {cols}"
            );
            assert_eq!(auto, if b <= d { rows } else { cols });
        }
        Ok(())
    }

    #[test]
    fn coding_rate_gradient_at_paper_size() -> Result<()> {
        // B = 100, d = 1024, eps = 0.2 (CF-AMC's batch, EMP's projection size), in f64.
        let (b, d, eps) = (100, 1024, 0.2);
        let c = d as f64 / (b as f64 * eps);
        let z = unit_rows(&mut Rng::new(9), b, d);
        let (r, grad) = value_and_grad(|t| coding_rate(t, eps), &z, b, d)?;
        let r_of = |p: &[f64]| -> Result<f64> { coding_rate(&tensor(p, b, d)?, eps)?.to_scalar() };
        assert_eq!(r, r_of(&z)?, "a Var and a plain tensor give the same value");

        // A sample of entries against central differences of R.
        let mut rng = Rng::new(10);
        // Five-point stencil (truncation O(h^4)) with a step large enough that the ~1e-13
        // rounding noise of R (~200) stays small in the quotient (a plain central difference
        // with h = 1e-5 is noise-limited at ~5e-9 absolute, 2e-5 relative on small entries).
        let h = 1e-3;
        let mut max_rel: f64 = 0.0;
        for _ in 0..24 {
            let i = rng.below_usize(b * d);
            let at = |t: f64| -> Result<f64> {
                let mut p = z.clone();
                p[i] += t;
                r_of(&p)
            };
            let fd = (8.0 * (at(h)? - at(-h)?) - (at(2.0 * h)? - at(-2.0 * h)?)) / (12.0 * h);
            max_rel = max_rel.max((grad[i] - fd).abs() / fd.abs());
        }
        // Measured: 1.6e-7 (on an entry of size 5e-4; 1e-9 on typical entries of size 0.03).
        assert!(
            max_rel < 1e-5,
            "max relative error vs finite differences {max_rel:e}"
        );

        // Every entry against the closed form c (I_B + c Z Z^T)^{-1} Z (Gauss-Jordan inverse).
        let mut m = vec![0.0; b * b];
        for i in 0..b {
            for j in 0..b {
                let g: f64 = (0..d).map(|k| z[i * d + k] * z[j * d + k]).sum();
                m[i * b + j] = c * g + if i == j { 1.0 } else { 0.0 };
            }
        }
        let inv = inverse_gauss_jordan(&m, b);
        let mut closed = vec![0.0; b * d];
        for i in 0..b {
            for k in 0..b {
                let w = c * inv[i * b + k];
                for j in 0..d {
                    closed[i * d + j] += w * z[k * d + j];
                }
            }
        }
        let scale = closed.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let err = max_abs_diff(&grad, &closed) / scale;
        // Measured: 2.5e-15.
        assert!(err < 1e-12, "relative error vs the closed form {err:e}");
        Ok(())
    }

    #[test]
    fn emp_loss_combines_terms() -> Result<()> {
        let (n, b, d) = (2, 4, 16);
        let z = unit_rows(&mut Rng::new(12), n * b, d);
        let t = tensor(&z, n * b, d)?;
        let cfg = EmpLossConfig::default();
        let loss = emp_loss(&t, n, &cfg)?;
        let inv = loss.invariance.to_scalar::<f64>()?;
        let tcr = loss.tcr.to_scalar::<f64>()?;
        let total = loss.total.to_scalar::<f64>()?;
        assert!((inv - ref_invariance(&z, n, b, d)).abs() < 1e-14);
        let want_tcr = -(ref_coding_rate_cols(&z[..b * d], b, d, 0.2)
            + ref_coding_rate_cols(&z[b * d..], b, d, 0.2))
            / 2.0;
        assert!((tcr - want_tcr).abs() < 1e-12 * want_tcr.abs());
        assert!((total - (200.0 * inv + tcr)).abs() < 1e-12 * total.abs());
        // The config's serde defaults are the paper's.
        let parsed: EmpLossConfig = serde_json::from_str(r#"{"tcr": 2.0}"#).expect("valid json");
        assert_eq!(
            (parsed.patch_sim, parsed.tcr, parsed.eps),
            (200.0, 2.0, 0.2)
        );
        Ok(())
    }

    // ----- classification --------------------------------------------------------------------

    #[test]
    fn cross_entropy_by_hand() -> Result<()> {
        let logits = [[1.0f64, 2.0, 3.0], [1.0, 0.0, -1.0], [0.5, 0.5, 0.5]];
        let labels = [2usize, 1, 0];
        let e = std::f64::consts::E;
        let want = [
            (e + e * e + e * e * e).ln() - 3.0,
            (e + 1.0 + 1.0 / e).ln(),
            3f64.ln(),
        ];
        let var = Var::new(&logits, &Device::Cpu)?;
        for y in [
            Tensor::new(&[2u32, 1, 0], &Device::Cpu)?,
            Tensor::new(&[2i64, 1, 0], &Device::Cpu)?,
        ] {
            let per = cross_entropy_per_example(var.as_tensor(), &y)?.to_vec1::<f64>()?;
            for (p, w) in per.iter().zip(want) {
                assert!((p - w).abs() < 1e-14, "{p} vs {w}");
            }
            let mean = cross_entropy(var.as_tensor(), &y)?;
            let want_mean = want.iter().sum::<f64>() / 3.0;
            assert!((mean.to_scalar::<f64>()? - want_mean).abs() < 1e-14);
            // Gradient: (softmax - onehot) / B.
            let g = mean.backward()?;
            let g = g.get(var.as_tensor()).expect("gradient").to_vec2::<f64>()?;
            for (bi, row) in logits.iter().enumerate() {
                let z: f64 = row.iter().map(|v| v.exp()).sum();
                for (ci, v) in row.iter().enumerate() {
                    let onehot = if ci == labels[bi] { 1.0 } else { 0.0 };
                    let w = (v.exp() / z - onehot) / 3.0;
                    assert!((g[bi][ci] - w).abs() < 1e-15);
                }
            }
        }
        // Bad labels fail clearly.
        let t = var.as_tensor();
        let err = cross_entropy(t, &Tensor::new(&[2u32, 3, 0], &Device::Cpu)?)
            .expect_err("label 3 of 3 classes")
            .to_string();
        assert!(err.contains("label 3 at row 1"), "{err}");
        assert!(cross_entropy(t, &Tensor::new(&[0i64, -1, 0], &Device::Cpu)?).is_err());
        assert!(cross_entropy(t, &Tensor::new(&[0f32, 1., 0.], &Device::Cpu)?).is_err());
        assert!(cross_entropy(t, &Tensor::new(&[0u32, 1], &Device::Cpu)?).is_err());
        Ok(())
    }

    // The TRADES reference values come from PyTorch 2.x (float64):
    //
    // import torch, torch.nn.functional as F
    // nat = torch.tensor([[1.0, 2.0, 3.0, -1.0], [0.5, -0.5, 0.0, 2.0], [3.0, 0.0, 1.0, 1.0]],
    //                    dtype=torch.float64, requires_grad=True)
    // adv = torch.tensor([[0.0, 2.5, 1.0, 0.0], [1.5, -1.0, 0.5, 0.0], [2.0, 2.0, -1.0, 0.5]],
    //                    dtype=torch.float64, requires_grad=True)
    // y = torch.tensor([2, 3, 1])
    // B = nat.shape[0]
    // ce = F.cross_entropy(nat, y)
    // kl = (1.0 / B) * torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(adv, dim=1),
    //                                                       F.softmax(nat, dim=1))
    // total = ce + 6.0 * kl
    // total.backward()
    // print(ce.item(), kl.item(), total.item())
    // print(F.cross_entropy(nat, y, reduction="none").tolist())
    // print(torch.nn.KLDivLoss(reduction="none")(F.log_softmax(adv, dim=1),
    //                                            F.softmax(nat, dim=1)).sum(1).tolist())
    // print(nat.grad.tolist(), adv.grad.tolist())
    #[test]
    fn trades_matches_torch() -> Result<()> {
        let dev = Device::Cpu;
        let nat = Var::new(
            &[
                [1.0f64, 2.0, 3.0, -1.0],
                [0.5, -0.5, 0.0, 2.0],
                [3.0, 0.0, 1.0, 1.0],
            ],
            &dev,
        )?;
        let adv = Var::new(
            &[
                [0.0f64, 2.5, 1.0, 0.0],
                [1.5, -1.0, 0.5, 0.0],
                [2.0, 2.0, -1.0, 0.5],
            ],
            &dev,
        )?;
        let y = Tensor::new(&[2i64, 3, 1], &dev)?;
        let loss = trades_loss(nat.as_tensor(), adv.as_tensor(), &y, 6.0)?;
        let close = |got: f64, want: f64| (got - want).abs() < 1e-14;
        assert!(close(loss.ce.to_scalar()?, 1.3542401026114843));
        assert!(close(loss.kl.to_scalar()?, 0.6746593124740432));
        assert!(close(loss.total.to_scalar()?, 5.402195977455744));
        let ce = cross_entropy_per_example(nat.as_tensor(), &y)?.to_vec1::<f64>()?;
        let ce_want = [0.4197166463153396, 0.3650252919435553, 3.277978369575558];
        let kl = kl_per_example(nat.as_tensor(), adv.as_tensor())?.to_vec1::<f64>()?;
        let kl_want = [0.6781268409140483, 0.8646329511331663, 0.48121814537491514];
        for i in 0..3 {
            assert!(
                close(ce[i], ce_want[i]) && close(kl[i], kl_want[i]),
                "row {i}"
            );
        }
        let kl_only = trades_kl(nat.as_tensor(), adv.as_tensor())?.to_scalar::<f64>()?;
        assert!(close(kl_only, 0.6746593124740432));
        let g = loss.total.backward()?;
        let g_nat = g.get(nat.as_tensor()).expect("gradient").to_vec2::<f64>()?;
        let g_adv = g.get(adv.as_tensor()).expect("gradient").to_vec2::<f64>()?;
        let want_nat = [
            [
                -0.018468435941904438,
                -0.775549965297341,
                0.8446684030961384,
                -0.05065000185689267,
            ],
            [
                -0.6345369104735525,
                -0.0624880142192942,
                -0.29091916668341417,
                0.9879440913762606,
            ],
            [
                0.34614405613707805,
                -0.5423262606309807,
                0.25182789735386096,
                -0.055645692859958344,
            ],
        ];
        let want_adv = [
            [
                -0.05955587158617302,
                0.9580840488582603,
                -0.9927906548568437,
                0.09426247758475667,
            ],
            [
                0.8856050843640888,
                -0.015839820538951818,
                0.25186543493044383,
                -1.1216306987555809,
            ],
            [
                -0.6346999494209496,
                0.8045176469035089,
                -0.16117343488888886,
                -0.008644262593670626,
            ],
        ];
        for i in 0..3 {
            for j in 0..4 {
                assert!(close(g_nat[i][j], want_nat[i][j]), "nat grad [{i}][{j}]");
                assert!(close(g_adv[i][j], want_adv[i][j]), "adv grad [{i}][{j}]");
            }
        }
        // KL of a distribution with itself is zero.
        let zero = trades_kl(nat.as_tensor(), nat.as_tensor())?.to_scalar::<f64>()?;
        assert!(zero.abs() < 1e-16);
        Ok(())
    }

    /// TCR forward + backward at the CF-AMC size (n = 16 chunks of B = 100, d = 1024, f32).
    /// Measured in release on this 2-core CPU: forward 13-15 ms, backward 64-72 ms (of which
    /// the host Cholesky + inverses are ~4 ms; the rest is candle's matmul backward).
    #[test]
    #[ignore = "timing; run with --release -- --ignored --nocapture"]
    fn time_tcr_forward_backward() -> Result<()> {
        let (n, b, d) = (16, 100, 1024);
        let z = unit_rows(&mut Rng::new(13), n * b, d);
        let var = Var::from_tensor(&tensor(&z, n * b, d)?.to_dtype(DType::F32)?)?;
        for rep in 0..3 {
            let t0 = std::time::Instant::now();
            let loss = tcr_loss(var.as_tensor(), n, 0.2)?;
            let t1 = std::time::Instant::now();
            let g = loss.backward()?;
            let _ = g.get(var.as_tensor()).expect("gradient");
            let t2 = std::time::Instant::now();
            eprintln!("rep {rep}: forward {:?}, backward {:?}", t1 - t0, t2 - t1);
        }
        Ok(())
    }
}
