//! k-means for AdvCL's pseudo-labels (METHODS.md 8.1: k-means++ initialisation, Lloyd
//! iterations until the assignments stop changing, a fixed seed).
//!
//! - Initialisation (Arthur & Vassilvitskii 2007): the first centre is a uniformly drawn point;
//!   each next one is drawn with probability proportional to `D(x)²`, the squared distance to
//!   the nearest centre chosen so far. Distances on the host in f64 (rayon), draws from our
//!   seeded [`Rng`].
//! - Lloyd: assign every point to its nearest centre (`argmin ‖c‖² − 2 x·c`, one matmul per
//!   chunk of rows on the points' device, first index on ties), then move every centre to the
//!   mean of its points (f64 sums). A centre left without points is moved to the point farthest
//!   from its own centre (scikit-learn's relocation), so `k` clusters stay populated. Stops when
//!   no assignment changed, or after `max_iter` assignment passes (`converged: false`).

use candle::{D, DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

use crate::rng::Rng;

/// Rows per distance matmul (bounds the `(rows, k)` distance block).
const CHUNK: usize = 4096;

/// The result of [`kmeans`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// Cluster of every point, `0..k`.
    pub labels: Vec<u32>,
    /// Centres, row-major `(k, d)`.
    pub centroids: Vec<f32>,
    /// Assignment passes run.
    pub iterations: usize,
    /// Whether the last pass changed no assignment.
    pub converged: bool,
    /// Σ squared distance of every point to its centre (at the final assignment).
    pub inertia: f64,
    /// Empty clusters relocated over the run.
    pub relocated: usize,
}

/// Clusters the rows of `x` (`(n, d)`, f32, any device) into `k` clusters.
///
/// # Errors
/// `k` of 0 or larger than `n`, non-finite values, or tensor errors.
pub fn kmeans(x: &Tensor, k: usize, max_iter: usize, rng: &mut Rng) -> Result<KMeans> {
    let (n, d) = x.dims2()?;
    if n > u32::MAX as usize {
        bail!("k-means: {n} points are too many");
    }
    if k == 0 || k > n {
        bail!("k-means: k = {k} clusters for {n} points (expected 1 <= k <= n)");
    }
    let x = x.to_dtype(DType::F32)?;
    let host: Vec<f32> = x.flatten_all()?.to_vec1()?;
    if host.iter().any(|v| !v.is_finite()) {
        bail!("k-means: the features are not finite");
    }
    let row = |i: usize| &host[i * d..(i + 1) * d];
    let mut centroids = plus_plus(&host, n, d, k, rng);
    let mut labels: Vec<u32> = vec![u32::MAX; n];
    let mut iterations = 0;
    let mut converged = false;
    let mut relocated = 0;
    let mut moved = false;
    while iterations < max_iter.max(1) {
        let (next, _) = assign(&x, &centroids, k, d, x.device())?;
        iterations += 1;
        let changed = next.iter().zip(&labels).filter(|(a, b)| a != b).count();
        labels = next;
        // a relocated centre must get its points before convergence can be declared
        if changed == 0 && !moved {
            converged = true;
            break;
        }
        // the mean of each cluster
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for (i, &c) in labels.iter().enumerate() {
            let c = c as usize;
            counts[c] += 1;
            for (s, v) in sums[c * d..(c + 1) * d].iter_mut().zip(row(i)) {
                *s += f64::from(*v);
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                for j in 0..d {
                    centroids[c * d + j] = (sums[c * d + j] / counts[c] as f64) as f32;
                }
            }
        }
        let empty: Vec<usize> = (0..k).filter(|&c| counts[c] == 0).collect();
        moved = !empty.is_empty();
        if moved {
            // move each empty centre onto the point farthest from its own centre
            let mut far: Vec<(f64, usize)> = (0..n)
                .into_par_iter()
                .map(|i| {
                    let c = labels[i] as usize;
                    (sq_dist(row(i), &centroids[c * d..(c + 1) * d]), i)
                })
                .collect();
            far.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (c, (_, i)) in empty.iter().zip(&far) {
                centroids[c * d..(c + 1) * d].copy_from_slice(row(*i));
                relocated += 1;
            }
        }
    }
    let inertia = labels
        .par_iter()
        .enumerate()
        .map(|(i, &c)| {
            let c = c as usize;
            sq_dist(row(i), &centroids[c * d..(c + 1) * d])
        })
        .sum();
    Ok(KMeans {
        labels,
        centroids,
        iterations,
        converged,
        inertia,
        relocated,
    })
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let t = f64::from(*x) - f64::from(*y);
            t * t
        })
        .sum()
}

/// k-means++ seeding: `k` centres, row-major.
fn plus_plus(host: &[f32], n: usize, d: usize, k: usize, rng: &mut Rng) -> Vec<f32> {
    let row = |i: usize| &host[i * d..(i + 1) * d];
    let mut centroids = Vec::with_capacity(k * d);
    let first = rng.below_usize(n);
    centroids.extend_from_slice(row(first));
    let mut nearest: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| sq_dist(row(i), row(first)))
        .collect();
    for _ in 1..k {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let target = rng.f64() * total;
            let mut acc = 0.0;
            let mut chosen = n - 1;
            for (i, v) in nearest.iter().enumerate() {
                acc += v;
                if acc > target && *v > 0.0 {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            // every point coincides with a centre: any point will do
            rng.below_usize(n)
        };
        let c = row(pick).to_vec();
        nearest
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, m)| *m = m.min(sq_dist(row(i), &c)));
        centroids.extend_from_slice(&c);
    }
    centroids
}

/// Nearest centre of every row of `x` and its `‖c‖² − 2 x·c`.
fn assign(
    x: &Tensor,
    centroids: &[f32],
    k: usize,
    d: usize,
    device: &Device,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let n = x.dim(0)?;
    let c = Tensor::from_slice(centroids, (k, d), device)?;
    let c_sq = c.sqr()?.sum(1)?.unsqueeze(0)?;
    let ct = c.t()?.contiguous()?;
    let mut labels = Vec::with_capacity(n);
    let mut best = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let xs = x.narrow(0, start, len)?;
        let dist = c_sq.broadcast_sub(&(xs.matmul(&ct)? * 2.0)?)?;
        labels.extend(dist.argmin(D::Minus1)?.to_vec1::<u32>()?);
        best.extend(dist.min(D::Minus1)?.to_vec1::<f32>()?);
        start += len;
    }
    Ok((labels, best))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well-separated blobs in 4-d, shuffled.
    fn blobs(per: usize, rng: &mut Rng) -> (Vec<f32>, Vec<usize>) {
        let centres = [
            [0.0, 0.0, 0.0, 0.0],
            [5.0, 5.0, 0.0, 0.0],
            [0.0, 5.0, 5.0, 5.0],
        ];
        let mut pts = Vec::new();
        let mut truth = Vec::new();
        for (c, centre) in centres.iter().enumerate() {
            for _ in 0..per {
                for v in centre {
                    pts.push((v + 0.3 * rng.normal()) as f32);
                }
                truth.push(c);
            }
        }
        (pts, truth)
    }

    #[test]
    fn recovers_separated_blobs_deterministically() -> Result<()> {
        let dev = Device::Cpu;
        let (pts, truth) = blobs(60, &mut Rng::new(1));
        let x = Tensor::from_vec(pts.clone(), (180, 4), &dev)?;
        let a = kmeans(&x, 3, 100, &mut Rng::new(7))?;
        assert!(a.converged);
        // a perfect partition up to relabelling
        for i in 0..180 {
            for j in 0..180 {
                assert_eq!(
                    truth[i] == truth[j],
                    a.labels[i] == a.labels[j],
                    "points {i}, {j}"
                );
            }
        }
        // every centre is the mean of its points, and the inertia is their squared distances
        let mut inertia = 0.0;
        for c in 0..3u32 {
            let members: Vec<usize> = (0..180).filter(|&i| a.labels[i] == c).collect();
            for j in 0..4 {
                let mean: f64 = members
                    .iter()
                    .map(|&i| f64::from(pts[i * 4 + j]))
                    .sum::<f64>()
                    / members.len() as f64;
                assert!((mean - f64::from(a.centroids[c as usize * 4 + j])).abs() < 1e-5);
            }
            for &i in &members {
                inertia += sq_dist(
                    &pts[i * 4..i * 4 + 4],
                    &a.centroids[c as usize * 4..c as usize * 4 + 4],
                );
            }
        }
        assert!((inertia - a.inertia).abs() < 1e-6 * inertia.max(1.0));
        // the same seed gives the same clustering; the inertia is that of three blobs of
        // variance 0.09 per coordinate (180 · 4 · 0.09 ≈ 65)
        assert_eq!(kmeans(&x, 3, 100, &mut Rng::new(7))?, a);
        assert!(a.inertia < 90.0, "inertia {}", a.inertia);
        Ok(())
    }

    #[test]
    fn lloyd_never_increases_the_inertia_and_keeps_every_cluster() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        let pts: Vec<f32> = (0..400 * 8).map(|_| rng.normal() as f32).collect();
        let x = Tensor::from_vec(pts, (400, 8), &dev)?;
        let mut last = f64::INFINITY;
        for iters in [1, 2, 4, 8, 50] {
            let r = kmeans(&x, 20, iters, &mut Rng::new(11))?;
            assert!(
                r.inertia <= last + 1e-6,
                "{iters} passes: {} > {last}",
                r.inertia
            );
            last = r.inertia;
            let mut seen = [false; 20];
            r.labels.iter().for_each(|&l| seen[l as usize] = true);
            assert!(
                seen.iter().all(|&s| s),
                "a cluster is empty after {iters} passes"
            );
        }
        // k = n: every point is its own cluster, inertia 0
        let r = kmeans(&x.narrow(0, 0, 12)?, 12, 10, &mut Rng::new(0))?;
        assert!(r.inertia < 1e-9);
        assert!(kmeans(&x, 0, 10, &mut Rng::new(0)).is_err());
        assert!(kmeans(&x.narrow(0, 0, 5)?, 6, 10, &mut Rng::new(0)).is_err());
        Ok(())
    }
}
