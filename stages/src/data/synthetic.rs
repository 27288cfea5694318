//! A seeded procedural dataset: coloured shapes on noisy textured backgrounds.
//!
//! Class `c` is a (shape, colour) pair: shape `c % 8` (circle, square, triangle, plus, ring,
//! diamond, x, bars) and colour `(c / 8 + 3 * (c % 8)) % 8` of eight saturated hues, so the
//! first eight classes differ in both shape and colour and up to [`MAX_CLASSES`] classes are
//! all distinct pairs. Each image draws the shape's position and size, a brightness jitter,
//! and a background of a dim random tint with per-pixel noise and faint random stripes: easy
//! for a small CNN, not trivially separable by mean colour alone once classes share hues.
//!
//! Labels go round-robin (`i % n_classes`), so classes are balanced (exactly, when the count is
//! a multiple of `n_classes`). Image `i` of a split depends only on (seed, split, i): the result
//! is the same for any thread count.

use rayon::prelude::*;

use super::{DATASET_STREAM, Dataset, Split};
use crate::rng::Rng;

/// Most classes: every (shape, colour) pair.
pub const MAX_CLASSES: usize = 64;

const SHAPES: [&str; 8] = [
    "circle", "square", "triangle", "plus", "ring", "diamond", "x", "bars",
];

const COLOURS: [(&str, [f32; 3]); 8] = [
    ("red", [0.92, 0.15, 0.10]),
    ("green", [0.15, 0.80, 0.20]),
    ("blue", [0.15, 0.30, 0.95]),
    ("yellow", [0.95, 0.85, 0.10]),
    ("magenta", [0.85, 0.15, 0.85]),
    ("cyan", [0.10, 0.85, 0.85]),
    ("orange", [1.00, 0.55, 0.05]),
    ("white", [0.97, 0.97, 0.97]),
];

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Number of classes, 2..=[`MAX_CLASSES`].
    pub n_classes: usize,
    /// Training images.
    pub n_train: usize,
    /// Test images.
    pub n_test: usize,
    /// Side of the square images.
    pub image_size: u32,
    /// Seed: the same seed gives the same bytes.
    pub seed: u64,
}

fn class_parts(c: usize) -> (usize, usize) {
    let shape = c % 8;
    (shape, (c / 8 + 3 * shape) % 8)
}

/// Class names (`circle-red`, ...), label order.
pub fn class_names(n_classes: usize) -> Vec<String> {
    (0..n_classes)
        .map(|c| {
            let (s, k) = class_parts(c);
            format!("{}-{}", SHAPES[s], COLOURS[k].0)
        })
        .collect()
}

/// Whether the point `(u, v)`, in units of the shape's radius from its centre, is inside.
fn inside(shape: usize, u: f32, v: f32) -> bool {
    let (au, av) = (u.abs(), v.abs());
    match shape {
        0 => u * u + v * v <= 1.0,
        1 => au.max(av) <= 0.8,
        // apex up: the half-width grows from 0 at v = -0.9 to 0.9 at v = 0.8
        2 => (-0.9..=0.8).contains(&v) && au <= (v + 0.9) / 1.7 * 0.95,
        3 => (au <= 0.3 && av <= 0.95) || (av <= 0.3 && au <= 0.95),
        4 => (0.36..=1.0).contains(&(u * u + v * v)),
        5 => au + av <= 1.0,
        6 => au.max(av) <= 0.9 && ((u - v).abs() <= 0.35 || (u + v).abs() <= 0.35),
        _ => au.max(av) <= 0.85 && ((v + 1.0) * 2.5).floor() as i32 % 2 == 0,
    }
}

/// Uniform in `[lo, hi)`.
fn range(rng: &mut Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.f32()
}

/// Draws one image of class `class` as CHW bytes.
fn draw(class: usize, size: usize, rng: &mut Rng) -> Vec<u8> {
    let (shape, colour) = class_parts(class);
    let fg = COLOURS[colour].1;
    let sz = size as f32;
    let radius = sz * range(rng, 0.24, 0.40);
    let cx = range(rng, radius, sz - radius);
    let cy = range(rng, radius, sz - radius);
    let bright = range(rng, 0.75, 1.0);
    // dim, low-saturation background tint
    let grey = range(rng, 0.05, 0.45);
    let tint: [f32; 3] = std::array::from_fn(|_| grey + range(rng, -0.06, 0.06));
    let stripe_amp = range(rng, 0.0, 0.08);
    let stripe_freq = range(rng, 0.2, 1.2);
    let stripe_dir = range(rng, 0.0, std::f32::consts::PI);
    let (sd, cd) = stripe_dir.sin_cos();
    let plane = size * size;
    let mut out = vec![0u8; 3 * plane];
    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let u = (px - cx) / radius;
            let v = (py - cy) / radius;
            let noise = range(rng, -0.07, 0.07);
            let rgb: [f32; 3] = if inside(shape, u, v) {
                std::array::from_fn(|c| fg[c] * bright + noise * 0.5)
            } else {
                let stripe = stripe_amp * ((px * cd + py * sd) * stripe_freq).sin();
                std::array::from_fn(|c| tint[c] + stripe + noise)
            };
            let i = y * size + x;
            for c in 0..3 {
                out[c * plane + i] = (rgb[c].clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    out
}

fn split(cfg: &SyntheticConfig, n: usize, tag: u64) -> Split {
    let s = cfg.image_size as usize;
    let len = 3 * s * s;
    let mut images = vec![0u8; n * len];
    images
        .par_chunks_mut(len.max(1))
        .enumerate()
        .for_each(|(i, dst)| {
            let mut rng = Rng::derive(cfg.seed, &[DATASET_STREAM, tag, i as u64]);
            dst.copy_from_slice(&draw(i % cfg.n_classes, s, &mut rng));
        });
    Split {
        images,
        labels: (0..n).map(|i| (i % cfg.n_classes) as i64).collect(),
        n,
        h: s,
        w: s,
    }
}

/// Generates the dataset (`n_classes` is clamped to 2..=[`MAX_CLASSES`]).
pub fn synthetic(cfg: &SyntheticConfig) -> Dataset {
    let cfg = SyntheticConfig {
        n_classes: cfg.n_classes.clamp(2, MAX_CLASSES),
        ..*cfg
    };
    Dataset {
        train: split(&cfg, cfg.n_train, 1),
        test: split(&cfg, cfg.n_test, 2),
        classes: class_names(cfg.n_classes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64) -> SyntheticConfig {
        SyntheticConfig {
            n_classes: 10,
            n_train: 100,
            n_test: 30,
            image_size: 32,
            seed,
        }
    }

    #[test]
    fn deterministic_per_seed_and_balanced() {
        let a = synthetic(&cfg(3));
        let b = synthetic(&cfg(3));
        let c = synthetic(&cfg(4));
        assert_eq!(a, b);
        assert_ne!(a.train.images, c.train.images);
        assert_eq!(a.train.labels, c.train.labels);
        assert_eq!(a.train.counts(10), vec![10; 10]);
        assert_eq!(a.test.counts(10), vec![3; 10]);
        assert_eq!(a.train.images.len(), 100 * 3 * 32 * 32);
        assert_eq!(a.classes[0], "circle-red");
        assert_eq!(a.classes[1], "square-yellow");
        let names = class_names(MAX_CLASSES);
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(
            unique.len(),
            MAX_CLASSES,
            "every class is its own (shape, colour)"
        );
        // independent of the thread count
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool")
            .install(|| synthetic(&cfg(3)));
        assert_eq!(a, one);
    }

    #[test]
    fn shapes_are_drawn_in_their_colour() {
        // the pixel at the centre of a circle, a square and a diamond is the class colour
        let d = synthetic(&SyntheticConfig {
            n_classes: 8,
            n_train: 8,
            n_test: 0,
            image_size: 16,
            seed: 0,
        });
        assert_eq!(d.test.n, 0);
        for i in 0..8 {
            let img = d.train.image(i);
            // some pixel carries the class colour's dominant channel at high intensity
            let (_, colour) = class_parts(i);
            let fg = COLOURS[colour].1;
            let c = (0..3)
                .max_by(|&a, &b| fg[a].total_cmp(&fg[b]))
                .expect("three channels");
            let max = img[c * 256..(c + 1) * 256]
                .iter()
                .max()
                .copied()
                .unwrap_or(0);
            assert!(
                max > 150,
                "class {i}: brightest value of channel {c} is {max}"
            );
        }
        // different classes have different mean colours or shapes: class means differ
        let mean = |i: usize| -> [f64; 3] {
            let img = d.train.image(i);
            std::array::from_fn(|c| {
                img[c * 256..(c + 1) * 256]
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>()
                    / 256.0
            })
        };
        assert_ne!(mean(0), mean(1));
    }

    #[test]
    fn classes_are_separable_by_a_trivial_classifier() {
        // nearest class centroid on 4x4 average-pooled images: far above chance (10%), so a
        // small CNN has an easy task
        let d = synthetic(&SyntheticConfig {
            n_classes: 10,
            n_train: 500,
            n_test: 200,
            image_size: 32,
            seed: 9,
        });
        let feat = |s: &Split, i: usize| -> Vec<f64> {
            let img = s.image(i);
            let mut f = vec![0.0; 3 * 16];
            for c in 0..3 {
                for y in 0..32 {
                    for x in 0..32 {
                        f[c * 16 + (y / 8) * 4 + x / 8] += f64::from(img[c * 1024 + y * 32 + x]);
                    }
                }
            }
            f
        };
        let mut centroids = vec![vec![0.0; 48]; 10];
        for i in 0..d.train.n {
            let l = d.train.labels[i] as usize;
            for (a, b) in centroids[l].iter_mut().zip(feat(&d.train, i)) {
                *a += b / 50.0;
            }
        }
        let correct = (0..d.test.n)
            .filter(|&i| {
                let f = feat(&d.test, i);
                let dist =
                    |c: &Vec<f64>| -> f64 { c.iter().zip(&f).map(|(a, b)| (a - b).powi(2)).sum() };
                let best = (0..10)
                    .min_by(|&a, &b| dist(&centroids[a]).total_cmp(&dist(&centroids[b])))
                    .expect("ten classes");
                best as i64 == d.test.labels[i]
            })
            .count();
        let acc = correct as f64 / d.test.n as f64;
        assert!(acc > 0.5, "nearest-centroid accuracy {acc}");
        eprintln!("nearest-centroid accuracy {acc}");
    }
}
