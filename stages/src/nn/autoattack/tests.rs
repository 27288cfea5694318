//! AutoAttack against things computed independently: the APGD schedule and oscillation count
//! by hand, the DLR value by hand and its gradient by finite differences, the l_inf projection
//! against a bisection over the radius, and the attacks on a linear classifier, whose exact
//! l_inf distance to each decision boundary is `(z_y − z_j)/‖w_y − w_j‖₁`: a point farther than
//! ε can never be fooled (a certificate), and a point much closer must be.

use candle::{Device, Result, Tensor};

use super::*;

fn cpu() -> Device {
    Device::Cpu
}

#[test]
fn checkpoints_follow_r_aa() {
    // N = 100: intervals 22, 19, 16, 13, 10, 7, 6, 6
    assert_eq!(apgd_checkpoints(100), [21, 40, 56, 69, 79, 86, 92, 98]);
    // N = 10 (torchattacks): 2, then every iteration
    assert_eq!(apgd_checkpoints(10), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(apgd_checkpoints(1), [0]);
}

#[test]
fn the_step_halves_as_r_aa_decides_at_each_checkpoint() {
    // R-AA counts the start as a reduction: at the first checkpoint a flat best loss halves η
    // only where the loss oscillated
    let mut c = StepControl::new(&[1.0, 1.0, 1.0]);
    assert_eq!(
        c.check(&[false, true, false], &[1.0, 1.0, 2.0]),
        [false, true, false]
    );
    // next: not halved last time and no better → halve; halved last time → keep; risen → keep
    assert_eq!(
        c.check(&[false, false, false], &[1.0, 1.0, 2.0]),
        [true, false, true]
    );
    assert_eq!(
        c.check(&[false, false, false], &[1.5, 1.0, 2.0]),
        [false, true, false]
    );
}

#[test]
fn oscillation_counts_increases_and_wraps_like_python() {
    // one example, history of 4 iterations
    let h = vec![vec![1.0], vec![2.0], vec![1.0], vec![3.0]];
    // j = 3, k = 4: 3>1 yes, 1>2 no, 2>1 yes, 1>h[-1]=3 no: 2 increases <= 3
    assert_eq!(oscillation(&h, 3, 4, 0.75), [true]);
    // j = 1, k = 2 with the tail still zero: 2>1 yes, 1>h[-1]=0 yes: 2 > 1.5
    let h = vec![vec![1.0], vec![2.0], vec![0.0], vec![0.0]];
    assert_eq!(oscillation(&h, 1, 2, 0.75), [false]);
    // decreasing losses never oscillate "up": 0 <= k rho
    let h = vec![vec![-1.0], vec![-2.0], vec![-3.0]];
    assert_eq!(oscillation(&h, 2, 2, 0.75), [true]);
}

#[test]
fn dlr_targeted_value_and_gradient() -> Result<()> {
    let rows = [[5f32, 3., 1., 0., -1.], [0.5, -2., 4., 1.5, 2.]];
    let logits = Tensor::new(&rows, &cpu())?;
    let (y, t) = ([0i64, 2], [1i64, 4]);
    let v = dlr_targeted(&logits, &y, &t)?.to_vec1::<f32>()?;
    // row 0: -(5 - 3) / (5 - (1 + 0)/2) ; row 1: sorted 4, 2, 1.5, 0.5: -(4 - 2) / (4 - (1.5 + 0.5)/2)
    assert!((v[0] + 2.0 / 4.5).abs() < 1e-6, "{v:?}");
    assert!((v[1] + 2.0 / 3.0).abs() < 1e-6, "{v:?}");
    // gradient through the sort: finite differences of the summed loss
    let var = Var::new(&rows, &cpu())?;
    let g = dlr_targeted(var.as_tensor(), &y, &t)?
        .sum_all()?
        .backward()?
        .get(var.as_tensor())
        .expect("gradient")
        .to_vec2::<f32>()?;
    let f = |m: &[[f64; 5]; 2]| -> f64 {
        m.iter()
            .zip([(0usize, 1usize), (2, 4)])
            .map(|(r, (yy, tt))| {
                let mut s = r.to_vec();
                s.sort_by(|a, b| b.total_cmp(a));
                -(r[yy] - r[tt]) / (s[0] - 0.5 * (s[2] + s[3]) + 1e-12)
            })
            .sum()
    };
    let base: [[f64; 5]; 2] = rows.map(|r| r.map(f64::from));
    for i in 0..2 {
        for j in 0..5 {
            let (mut up, mut down) = (base, base);
            up[i][j] += 1e-4;
            down[i][j] -= 1e-4;
            let fd = (f(&up) - f(&down)) / 2e-4;
            assert!(
                (f64::from(g[i][j]) - fd).abs() < 1e-3,
                "({i},{j}): {} vs {fd}",
                g[i][j]
            );
        }
    }
    Ok(())
}

/// The smallest r with `c` reachable as `⟨w, d⟩`, `d_i ∈ [max(−r, −t_i), min(r, 1 − t_i)]`.
fn min_radius(t: &[f32], w: &[f32], c: f64) -> f64 {
    let range = |r: f64| -> (f64, f64) {
        let (mut lo, mut hi) = (0f64, 0f64);
        for (&ti, &wi) in t.iter().zip(w) {
            let (a, b) = ((-r).max(-f64::from(ti)), r.min(1.0 - f64::from(ti)));
            let (p, q) = (f64::from(wi) * a, f64::from(wi) * b);
            lo += p.min(q);
            hi += p.max(q);
        }
        (lo, hi)
    };
    let (mut a, mut b) = (0f64, 1f64);
    for _ in 0..60 {
        let m = 0.5 * (a + b);
        let (lo, hi) = range(m);
        if c >= lo && c <= hi {
            b = m;
        } else {
            a = m;
        }
    }
    b
}

#[test]
fn projection_is_the_minimal_linf_step_onto_the_hyperplane() {
    let mut rng = Rng::new(7);
    for case in 0..200 {
        let n = 1 + rng.below_usize(40);
        let t: Vec<f32> = (0..n).map(|_| rng.f64() as f32).collect();
        let w: Vec<f32> = (0..n)
            .map(|_| {
                if rng.f64() < 0.15 {
                    0.0
                } else {
                    rng.normal() as f32
                }
            })
            .collect();
        // a reachable hyperplane: through a random point of the box
        let u: Vec<f32> = (0..n).map(|_| rng.f64() as f32).collect();
        let b: f32 = w.iter().zip(&u).map(|(a, c)| a * c).sum();
        let d = projection_linf(&t, &w, b);
        let reached: f32 = w
            .iter()
            .zip(t.iter().zip(&d))
            .map(|(a, (c, e))| a * (c + e))
            .sum();
        let scale: f32 = w.iter().map(|v| v.abs()).sum::<f32>().max(1e-6);
        assert!(
            (reached - b).abs() <= 1e-4 * scale,
            "case {case}: <w, t+d> = {reached}, b = {b}"
        );
        for i in 0..n {
            assert!(
                (-1e-6..=1.0 + 1e-6).contains(&(t[i] + d[i])),
                "case {case}: box"
            );
            if w[i] == 0.0 {
                assert_eq!(d[i], 0.0);
            }
        }
        let c = f64::from(b) - t.iter().zip(&w).map(|(a, c)| f64::from(a * c)).sum::<f64>();
        let r = min_radius(&t, &w, c);
        let got = d.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            (f64::from(got) - r).abs() < 1e-4,
            "case {case}: |d| = {got}, minimal {r}"
        );
    }
}

/// A linear classifier on `(B, 3, 4, 4)` inputs: logits `x W^T`.
struct Linear {
    w: Tensor,
    rows: Vec<Vec<f32>>,
}

impl Linear {
    fn new(k: usize, n: usize, rng: &mut Rng) -> Result<Self> {
        let rows: Vec<Vec<f32>> = (0..k)
            .map(|_| (0..n).map(|_| (0.3 * rng.normal()) as f32).collect())
            .collect();
        let w = Tensor::from_vec(rows.concat(), (k, n), &cpu())?;
        Ok(Linear { w, rows })
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        x.flatten_from(1)?.matmul(&self.w.t()?)
    }

    /// The exact l_inf distance from `x` (inside the box with room) to the nearest boundary.
    fn distance(&self, x: &[f32], y: usize) -> f64 {
        let z: Vec<f64> = self
            .rows
            .iter()
            .map(|r| r.iter().zip(x).map(|(a, b)| f64::from(a * b)).sum())
            .collect();
        (0..self.rows.len())
            .filter(|&j| j != y)
            .map(|j| {
                let l1: f64 = self.rows[y]
                    .iter()
                    .zip(&self.rows[j])
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .sum();
                (z[y] - z[j]) / l1
            })
            .fold(f64::INFINITY, f64::min)
    }
}

/// 40 points in `[0.35, 0.65]` (the box never binds within 0.3), labelled by the model, and
/// the radius ε: the median distance of 80 candidates, of which only the points whose distance
/// is not within 15% of ε are kept; their distances.
/// A linear model, 40 points, their labels and distances, and ε.
type Case = (Linear, Tensor, Vec<i64>, Vec<f64>, f64);

fn linear_case(seed: u64) -> Result<Case> {
    let mut rng = Rng::new(seed);
    let n = 48;
    let model = Linear::new(4, n, &mut rng)?;
    let mut cands = Vec::new();
    for _ in 0..80 {
        let x: Vec<f32> = (0..n).map(|_| rng.uniform(0.35, 0.65) as f32).collect();
        let z = model.logits(&Tensor::from_vec(x.clone(), (1, 3, 4, 4), &cpu())?)?;
        let y = z.argmax(1)?.to_vec1::<u32>()?[0] as usize;
        let d = model.distance(&x, y);
        cands.push((x, y, d));
    }
    let mut sorted: Vec<f64> = cands.iter().map(|c| c.2).collect();
    sorted.sort_by(f64::total_cmp);
    let eps = sorted[sorted.len() / 2];
    let (mut xs, mut ys, mut ds) = (Vec::new(), Vec::new(), Vec::new());
    for (x, y, d) in cands {
        if (d - eps).abs() >= 0.15 * eps && ys.len() < 40 {
            xs.extend(x);
            ys.push(y as i64);
            ds.push(d);
        }
    }
    assert_eq!(ys.len(), 40, "not enough points away from eps");
    let x = Tensor::from_vec(xs, (ys.len(), 3, 4, 4), &cpu())?;
    Ok((model, x, ys, ds, eps))
}

fn only(attacks: &[AaAttack], eps: f64) -> AaConfig {
    AaConfig {
        attacks: attacks.to_vec(),
        square_queries: 300,
        ..AaConfig::original(eps)
    }
}

#[test]
fn each_attack_is_sound_and_the_gradient_ones_are_exact_on_a_linear_model() -> Result<()> {
    let (model, x, y, dist, eps) = linear_case(11)?;
    assert!(eps > 0.005 && eps < 0.3, "eps {eps}: the box must not bind");
    let certified: Vec<bool> = dist.iter().map(|&d| d > eps).collect();
    let n_cert = certified.iter().filter(|c| **c).count();
    assert!(
        n_cert > 5 && n_cert < 35,
        "a mixed case: {n_cert} of 40 certified"
    );
    let mut f = |t: &Tensor| model.logits(t);
    for attacks in [
        &[AaAttack::ApgdT][..],
        &[AaAttack::FabT],
        &AaAttack::STANDARD,
    ] {
        let r = autoattack(&x, &y, &mut f, &only(attacks, eps), 3, &AaHooks::default())?;
        assert_eq!(r.clean_correct, 40);
        assert_eq!(
            r.robust, certified,
            "{attacks:?}: robust exactly where certified"
        );
        assert_eq!(r.robust_after.len(), attacks.len());
        assert_eq!(*r.robust_after.last().unwrap_or(&0), n_cert);
    }
    // APGD-CE and Square: never past a certificate; APGD-CE fools most of the others, the
    // black-box Square (a few hundred queries) most of those at half the radius or closer
    for (attack, within) in [(AaAttack::ApgdCe, 1.0), (AaAttack::Square, 0.7)] {
        let r = autoattack(
            &x,
            &y,
            &mut f,
            &only(&[attack], eps),
            3,
            &AaHooks::default(),
        )?;
        for (i, (r, c)) in r.robust.iter().zip(&certified).enumerate() {
            assert!(*r || !c, "{attack:?} fooled certified point {i}");
        }
        let near: Vec<usize> = (0..40).filter(|&i| dist[i] < within * eps).collect();
        let fooled = near.iter().filter(|&&i| !r.robust[i]).count();
        eprintln!(
            "{attack:?}: fooled {fooled} of the {} points within {within} eps",
            near.len()
        );
        assert!(
            !near.is_empty() && fooled * 4 >= near.len() * 3,
            "{attack:?} fooled only {fooled} of {}",
            near.len()
        );
    }
    // the same seed gives the same result; eps 0 fools nothing
    let a = autoattack(
        &x,
        &y,
        &mut f,
        &only(&AaAttack::STANDARD, eps),
        5,
        &AaHooks::default(),
    )?;
    let b = autoattack(
        &x,
        &y,
        &mut f,
        &only(&AaAttack::STANDARD, eps),
        5,
        &AaHooks::default(),
    )?;
    assert_eq!(a, b);
    let z = autoattack(
        &x,
        &y,
        &mut f,
        &only(&AaAttack::STANDARD, 0.0),
        5,
        &AaHooks::default(),
    )?;
    assert!(z.robust.iter().all(|r| *r));
    Ok(())
}

#[test]
fn square_schedule_and_configs() {
    assert_eq!(square_p(0, 0.8, 5000, false), 0.8);
    assert_eq!(square_p(10, 0.8, 5000, false), 0.8);
    assert_eq!(square_p(11, 0.8, 5000, false), 0.4);
    assert_eq!(square_p(4500, 0.8, 5000, false), 0.8 / 128.0);
    assert_eq!(square_p(9000, 0.8, 10000, false), 0.8 / 512.0);
    // rescaled to 5000 queries: query 2500 counts as 5000
    assert_eq!(square_p(2500, 0.8, 5000, true), 0.8 / 128.0);
    let o = AaConfig::original(8.0 / 255.0);
    assert_eq!(
        (
            o.apgd_iters,
            o.fab_iters,
            o.square_queries,
            o.square_rescale
        ),
        (100, 100, 5000, false)
    );
    let t = AaConfig::torchattacks(8.0 / 255.0);
    assert_eq!(
        (
            t.apgd_iters,
            t.fab_iters,
            t.square_rescale,
            t.n_target_classes
        ),
        (10, 10, true, TargetClasses::All)
    );
    // R-AA: 9 targets, fewer with fewer classes; torchattacks: every other class.
    assert_eq!(targets(&o, 10), 9);
    assert_eq!(targets(&o, 100), 9);
    assert_eq!(targets(&o, 5), 4);
    assert_eq!(targets(&t, 10), 9);
    assert_eq!(targets(&t, 100), 99);
    assert!(
        AaConfig {
            n_target_classes: TargetClasses::Count(0),
            ..o.clone()
        }
        .validate()
        .is_err()
    );
    assert!(o.validate().is_ok());
    let dup = AaConfig {
        attacks: vec![AaAttack::Square, AaAttack::Square],
        ..o.clone()
    };
    assert!(dup.validate().is_err());
    assert!(AaConfig { eps: 1.5, ..o }.validate().is_err());
}

#[test]
fn a_stop_request_interrupts_and_progress_is_reported() -> Result<()> {
    let (model, x, y, _, eps) = linear_case(11)?;
    let mut f = |t: &Tensor| model.logits(t);
    let calls = std::cell::Cell::new(0usize);
    let stop = || {
        calls.set(calls.get() + 1);
        calls.get() > 5
    };
    let seen = std::cell::RefCell::new(Vec::new());
    let after = |a: AaAttack, n: usize| seen.borrow_mut().push((a, n));
    let hooks = AaHooks {
        stop: &stop,
        after_attack: &after,
    };
    let e = autoattack(&x, &y, &mut f, &only(&AaAttack::STANDARD, eps), 1, &hooks)
        .expect_err("stopped");
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert_eq!(
        calls.get(),
        6,
        "stops at the first model call after the request"
    );
    let hooks = AaHooks {
        stop: &|| false,
        after_attack: &after,
    };
    let r = autoattack(&x, &y, &mut f, &only(&AaAttack::STANDARD, eps), 1, &hooks)?;
    let seen = seen.borrow();
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        AaAttack::STANDARD
    );
    assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), r.robust_after);
    Ok(())
}
