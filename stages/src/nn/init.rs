//! Seeded parameter initialisation (Kaiming, PyTorch defaults) from our own RNG.
//!
//! candle's CPU RNG cannot be seeded (CANDLE.md), so models are built with placeholder values
//! and [`init_seeded`] then sets every `Var` of the [`VarMap`] from [`crate::rng::Rng`].
//!
//! # Rules (by name, shape and sibling tensors)
//!
//! For a tensor `m.p` (module path `m`, parameter `p`):
//!
//! | tensor | rule |
//! |---|---|
//! | `m.running_mean`, `m.num_batches_tracked` | 0 |
//! | `….normalize.mean`, `….normalize.std` (input normalisation, [`crate::nn::resnet::INPUT_NORM`]) | ImageNet's per-channel constants |
//! | `m.running_var` | 1 |
//! | `m.weight` / `m.bias` where `m.running_mean` exists (BN) | 1 / 0 |
//! | `m.weight` of rank 4 (conv, shape (c_out, c_in, k, k)) | Kaiming-normal, fan-out, ReLU gain: N(0, 2 / (c_out·k·k)) (torchvision's ResNet init) |
//! | conv weight of a module listed in [`InitRules::pytorch_default_convs`] | PyTorch's default, Kaiming-uniform with a = √5: U(−1/√fan_in, 1/√fan_in), fan_in = c_in·k·k |
//! | `m.weight` of rank 2 (linear, shape (out, in)) | PyTorch's default: U(−1/√in, 1/√in) |
//! | `m.bias` next to a rank-2 or rank-4 `m.weight` | PyTorch's default: U(−1/√fan_in, 1/√fan_in) |
//!
//! Anything else is an error naming the tensor, so a new layer type cannot silently keep its
//! placeholder.
//!
//! # Streams
//!
//! The values of tensor `name` come from `Rng::derive(seed, &[h(name), chunk])`, with
//! `h(name)` the first 8 bytes (little-endian) of `blake3(name)` and the tensor cut into
//! chunks of 65,536 elements (filled in parallel). A tensor's values therefore depend only on
//! the seed and its own name and shape: adding a layer does not reshuffle the others, and
//! the thread count does not matter. Tensors are visited in sorted-name order.
//!
//! # Parameter lists
//!
//! BN running statistics and `num_batches_tracked` are `Var`s in the `VarMap` too, but they
//! never get a gradient: [`trainable`] leaves them out and is what an optimizer takes.

use std::collections::BTreeMap;

use candle::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Elements per independently seeded chunk (fixed: changing it changes every init).
const CHUNK: usize = 1 << 16;

/// Exceptions to the default rules of [`init_seeded`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InitRules {
    /// Module paths of convolutions (e.g. `encoder.conv1`) that keep PyTorch's default conv
    /// init instead of Kaiming-normal: R-CF replaces torchvision's `conv1` after construction
    /// (METHODS.md 2.3). Every entry must name a conv weight of the `VarMap`.
    pub pytorch_default_convs: Vec<String>,
}

impl InitRules {
    /// R-CF's rule: the stem conv under `prefix` (e.g. `"encoder"`) keeps PyTorch's default.
    pub fn r_cf(prefix: &str) -> Self {
        let module = if prefix.is_empty() {
            "conv1".to_string()
        } else {
            format!("{}.conv1", prefix.trim_end_matches('.'))
        };
        Self {
            pytorch_default_convs: vec![module],
        }
    }
}

/// The 64-bit stream id of a tensor name (first 8 bytes of its blake3 hash, little-endian).
pub fn name_stream(name: &str) -> u64 {
    let hash = blake3::hash(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// True for the tensors that are state, not parameters: `running_mean`, `running_var`,
/// `num_batches_tracked`.
pub fn is_buffer(name: &str) -> bool {
    let (module, last) = split_name(name);
    matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
        || (is_input_norm(module) && matches!(last, "mean" | "std"))
}

/// Whether `module` is a ResNet's input-normalisation module (`normalize`, `encoder.normalize`).
fn is_input_norm(module: &str) -> bool {
    module.rsplit('.').next() == Some(crate::nn::resnet::INPUT_NORM)
}

/// A sorted snapshot of the `VarMap`'s contents.
fn sorted_vars(varmap: &VarMap) -> BTreeMap<String, Var> {
    let data = varmap
        .data()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Every `Var` of the `VarMap` (parameters and BN buffers), sorted by name.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    sorted_vars(varmap).into_iter().collect()
}

/// The parameters an optimizer should update: every floating-point `Var` except BN buffers
/// ([`is_buffer`]), sorted by name.
pub fn trainable(varmap: &VarMap) -> Vec<(String, Var)> {
    sorted_vars(varmap)
        .into_iter()
        .filter(|(name, var)| !is_buffer(name) && var.dtype().is_float())
        .collect()
}

/// How one tensor is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Draw {
    Const(f64),
    /// One value per element of a 3-element tensor.
    Channels([f64; 3]),
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
}

/// Splits `a.b.weight` into (`a.b`, `weight`).
fn split_name(name: &str) -> (&str, &str) {
    match name.rsplit_once('.') {
        Some((m, p)) => (m, p),
        None => ("", name),
    }
}

fn sibling(module: &str, param: &str) -> String {
    if module.is_empty() {
        param.to_string()
    } else {
        format!("{module}.{param}")
    }
}

/// fan_in of a linear (out, in) or conv (c_out, c_in, k, k) weight.
fn fan_in(dims: &[usize]) -> usize {
    dims[1..].iter().product()
}

/// The rule for one tensor (see the module docs).
fn rule_for(
    name: &str,
    var: &Var,
    all: &BTreeMap<String, Var>,
    default_convs: &[String],
) -> Result<Draw> {
    let (module, param) = split_name(name);
    let dims = var.dims();
    let is_bn = all.contains_key(&sibling(module, "running_mean"));
    let draw = match param {
        "mean" | "std" if is_input_norm(module) && dims == [3] => {
            Draw::Channels(if param == "mean" {
                crate::nn::resnet::IMAGENET_MEAN
            } else {
                crate::nn::resnet::IMAGENET_STD
            })
        }
        "running_mean" | "num_batches_tracked" => Draw::Const(0.0),
        "running_var" => Draw::Const(1.0),
        "weight" if is_bn => Draw::Const(1.0),
        "bias" if is_bn => Draw::Const(0.0),
        "weight" if dims.len() == 4 => {
            if default_convs.iter().any(|m| m == module) {
                Draw::Uniform {
                    bound: 1.0 / (fan_in(dims) as f64).sqrt(),
                }
            } else {
                let fan_out = dims[0] * dims[2] * dims[3];
                Draw::Normal {
                    std: (2.0 / fan_out as f64).sqrt(),
                }
            }
        }
        "weight" if dims.len() == 2 => Draw::Uniform {
            bound: 1.0 / (dims[1] as f64).sqrt(),
        },
        "bias" if dims.len() == 1 => {
            let weight = all.get(&sibling(module, "weight"));
            match weight.map(|w| w.dims()) {
                Some(wd) if wd.len() == 2 || wd.len() == 4 => Draw::Uniform {
                    bound: 1.0 / (fan_in(wd) as f64).sqrt(),
                },
                _ => candle::bail!(
                    "init_seeded: bias {name} has no linear or conv weight next to it"
                ),
            }
        }
        _ => candle::bail!(
            "init_seeded: no rule for {name} with shape {:?}",
            var.shape()
        ),
    };
    Ok(draw)
}

/// Draws `n` values for tensor `name` (see "Streams" in the module docs).
fn draw_values<T>(seed: u64, name: &str, n: usize, draw: Draw, cast: fn(f64) -> T) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
{
    let stream = name_stream(name);
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, vals)| {
            let mut rng = Rng::derive(seed, &[stream, chunk as u64]);
            for (i, v) in vals.iter_mut().enumerate() {
                *v = cast(match draw {
                    Draw::Const(c) => c,
                    Draw::Channels(c) => c[(chunk * CHUNK + i) % 3],
                    Draw::Normal { std } => std * rng.normal(),
                    Draw::Uniform { bound } => rng.uniform(-bound, bound),
                });
            }
        });
    out
}

/// The tensor for one `Var` under one rule, in the `Var`'s dtype and device.
fn make_tensor(seed: u64, name: &str, var: &Var, draw: Draw) -> Result<Tensor> {
    let shape = var.shape().clone();
    let n = shape.elem_count();
    let dev = var.device();
    let t = match (var.dtype(), draw) {
        (dtype, Draw::Const(c)) => Tensor::full(c, shape, dev)?.to_dtype(dtype)?,
        (DType::F32, _) => {
            Tensor::from_vec(draw_values(seed, name, n, draw, |x| x as f32), shape, dev)?
        }
        (DType::F64, _) => Tensor::from_vec(draw_values(seed, name, n, draw, |x| x), shape, dev)?,
        (dtype, _) if dtype.is_float() => {
            let v = draw_values(seed, name, n, draw, |x| x as f32);
            Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?
        }
        (dtype, _) => candle::bail!("init_seeded: {name} has non-float dtype {dtype:?}"),
    };
    Ok(t)
}

/// Sets every `Var` of `varmap` from `seed` by the rules in the module docs, in sorted-name
/// order. Nothing is set if any tensor has no rule.
///
/// # Errors
/// If a tensor matches no rule, or an entry of `rules.pytorch_default_convs` names no conv
/// weight.
pub fn init_seeded(varmap: &VarMap, seed: u64, rules: &InitRules) -> Result<()> {
    let all = sorted_vars(varmap);
    for m in &rules.pytorch_default_convs {
        let is_conv = all
            .get(&sibling(m, "weight"))
            .is_some_and(|w| w.dims().len() == 4);
        if !is_conv {
            candle::bail!("init_seeded: pytorch_default_convs entry {m:?} is not a conv layer")
        }
    }
    let draws = all
        .iter()
        .map(|(name, var)| {
            Ok((
                name,
                var,
                rule_for(name, var, &all, &rules.pytorch_default_convs)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    for (name, var, draw) in draws {
        let t = make_tensor(seed, name, var, draw)?;
        var.set(&t)?;
    }
    Ok(())
}

/// Builds a model with `f` on a fresh `VarMap` and initialises it with [`init_seeded`].
///
/// ```
/// use candle::{DType, Device};
/// use pipe_stages::nn::init::{InitRules, build_seeded};
/// use pipe_stages::nn::resnet::{ResNetConfig, resnet18};
///
/// let cfg = ResNetConfig { width: 8, ..Default::default() };
/// let (varmap, net) = build_seeded(0, &InitRules::default(), DType::F32, &Device::Cpu, |vb| {
///     resnet18(&cfg, vb.pp("encoder"))
/// })?;
/// assert_eq!(net.feature_dim(), 64);
/// assert_eq!(varmap.all_vars().len(), 120);
/// # Ok::<(), candle::Error>(())
/// ```
///
/// # Errors
/// Those of `f` and [`init_seeded`].
pub fn build_seeded<M>(
    seed: u64,
    rules: &InitRules,
    dtype: DType,
    device: &Device,
    f: impl FnOnce(VarBuilder) -> Result<M>,
) -> Result<(VarMap, M)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let model = f(vb)?;
    init_seeded(&varmap, seed, rules)?;
    Ok((varmap, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::heads::{EncoderConfig, HeadConfig, encoder};
    use crate::nn::resnet::{ResNetConfig, resnet18};

    fn values(varmap: &VarMap, name: &str) -> Result<Vec<f64>> {
        let all = sorted_vars(varmap);
        let v = all
            .get(name)
            .ok_or_else(|| candle::Error::Msg(format!("no var {name}")))?;
        v.as_tensor()
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()
    }

    fn moments(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    fn small_encoder(seed: u64, rules: &InitRules) -> Result<VarMap> {
        let cfg = EncoderConfig {
            backbone: ResNetConfig {
                width: 16,
                ..Default::default()
            },
            head: HeadConfig {
                hidden_dim: 256,
                z_dim: 64,
            },
        };
        let (varmap, _) = build_seeded(seed, rules, DType::F32, &Device::Cpu, |vb| {
            encoder(&cfg, vb)
        })?;
        Ok(varmap)
    }

    #[test]
    fn same_seed_same_weights_different_seed_different() -> Result<()> {
        let rules = InitRules::default();
        let a = small_encoder(11, &rules)?;
        let b = small_encoder(11, &rules)?;
        let c = small_encoder(12, &rules)?;
        let (va, vb) = (sorted_vars(&a), sorted_vars(&b));
        assert_eq!(va.keys().collect::<Vec<_>>(), vb.keys().collect::<Vec<_>>());
        let mut random = 0;
        for name in va.keys() {
            let (x, y, z) = (values(&a, name)?, values(&b, name)?, values(&c, name)?);
            assert_eq!(x, y, "{name}");
            if is_buffer(name)
                || name.contains("bn")
                || name.ends_with(".1.weight")
                || name.ends_with(".1.bias")
            {
                // Constants: BN parameters and buffers (pre_feature.1, projection.1 are BNs).
                assert_eq!(x, z, "{name}");
            } else {
                assert_ne!(x, z, "{name}");
                random += 1;
            }
        }
        // 20 convs + pre_feature.0.{weight,bias} + projection.{0,3}.{weight,bias}.
        assert_eq!(random, 20 + 2 + 4);
        // Distinct layers of equal shape get distinct values.
        assert_ne!(
            values(&a, "encoder.layer1.0.conv1.weight")?,
            values(&a, "encoder.layer1.0.conv2.weight")?
        );
        Ok(())
    }

    #[test]
    fn streams_depend_on_the_name_only() -> Result<()> {
        // The same tensor name in a different model gets the same values.
        let enc = small_encoder(5, &InitRules::default())?;
        let (rn, _) = build_seeded(5, &InitRules::default(), DType::F32, &Device::Cpu, |vb| {
            let cfg = ResNetConfig {
                width: 16,
                ..Default::default()
            };
            resnet18(&cfg, vb.pp("encoder"))
        })?;
        for name in ["encoder.layer3.1.conv2.weight", "encoder.conv1.weight"] {
            assert_eq!(values(&enc, name)?, values(&rn, name)?);
        }
        // f64 models draw the same numbers as f32 models (up to rounding).
        let (r64, _) = build_seeded(5, &InitRules::default(), DType::F64, &Device::Cpu, |vb| {
            let cfg = ResNetConfig {
                width: 16,
                ..Default::default()
            };
            resnet18(&cfg, vb.pp("encoder"))
        })?;
        let x32 = values(&rn, "encoder.layer4.0.conv1.weight")?;
        let x64 = values(&r64, "encoder.layer4.0.conv1.weight")?;
        assert!(x32.iter().zip(&x64).all(|(a, b)| (a - b).abs() < 1e-7));
        Ok(())
    }

    #[test]
    fn kaiming_and_pytorch_default_statistics() -> Result<()> {
        let varmap = small_encoder(21, &InitRules::r_cf("encoder"))?;
        // layer4 conv of width 16: (128, 128, 3, 3), 147,456 draws; fan_out = 128·9.
        let w = values(&varmap, "encoder.layer4.1.conv1.weight")?;
        let (mean, std) = moments(&w);
        let want = (2.0f64 / (128.0 * 9.0)).sqrt();
        // Relative s.e. of the sd ≈ 1/sqrt(2n) = 0.18 %; allow 1 %.
        assert!((std / want - 1.0).abs() < 0.01, "{std} vs {want}");
        assert!(mean.abs() < 5.0 * want / (w.len() as f64).sqrt(), "{mean}");
        // A 1x1 downsample conv: fan_out = c_out.
        let d = values(&varmap, "encoder.layer4.0.downsample.0.weight")?;
        let want_d = (2.0f64 / 128.0).sqrt();
        assert!((moments(&d).1 / want_d - 1.0).abs() < 0.03);
        // R-CF's conv1 keeps PyTorch's default: U(±1/sqrt(3·3·3)).
        let c = values(&varmap, "encoder.conv1.weight")?;
        let bound = 1.0 / 27f64.sqrt();
        assert!(c.iter().all(|x| x.abs() <= bound));
        assert!(c.iter().any(|x| x.abs() > 0.9 * bound));
        // Linear weight and bias: U(±1/sqrt(fan_in)), sd = bound/sqrt(3).
        let lw = values(&varmap, "projection.0.weight")?; // (256, 256)
        let lb = 1.0 / 256f64.sqrt();
        assert!(lw.iter().all(|x| x.abs() <= lb));
        assert!((moments(&lw).1 / (lb / 3f64.sqrt()) - 1.0).abs() < 0.01);
        let bias = values(&varmap, "pre_feature.0.bias")?; // fan_in = 128
        let bb = 1.0 / 128f64.sqrt();
        assert!(bias.iter().all(|x| x.abs() <= bb) && bias.iter().any(|x| x.abs() > 0.5 * bb));
        // BN constants.
        assert!(
            values(&varmap, "encoder.bn1.weight")?
                .iter()
                .all(|&x| x == 1.0)
        );
        assert!(
            values(&varmap, "pre_feature.1.bias")?
                .iter()
                .all(|&x| x == 0.0)
        );
        assert!(
            values(&varmap, "projection.1.running_var")?
                .iter()
                .all(|&x| x == 1.0)
        );
        // Without the rule, conv1 is Kaiming-normal (fan_out = 16·9): values beyond the bound.
        let plain = small_encoder(21, &InitRules::default())?;
        let c2 = values(&plain, "encoder.conv1.weight")?;
        assert!(c2.iter().any(|x| x.abs() > bound));
        Ok(())
    }

    #[test]
    fn trainable_excludes_buffers_and_is_sorted() -> Result<()> {
        let varmap = small_encoder(1, &InitRules::default())?;
        let t = trainable(&varmap);
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert!(names.iter().all(|n| !is_buffer(n)));
        // 60 backbone + pre_feature (2 linear + 2 BN) + projection (2 + 2 + 2).
        assert_eq!(names.len(), 60 + 4 + 6);
        assert!(names.contains(&"projection.3.bias"));
        assert!(!names.contains(&"encoder.bn1.running_mean"));
        assert_eq!(varmap.all_vars().len(), 120 + 4 + 3 + 6 + 3);
        Ok(())
    }

    #[test]
    fn unknown_tensors_and_bad_rules_are_errors() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        vb.get_with_hints((3, 3, 3), "odd.kernel", candle_nn::Init::Const(0.))?;
        let err = init_seeded(&varmap, 0, &InitRules::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("odd.kernel"), "{err}");
        let enc = small_encoder(0, &InitRules::default())?;
        let rules = InitRules {
            pytorch_default_convs: vec!["encoder.conv9".into()],
        };
        assert!(init_seeded(&enc, 0, &rules).is_err());
        assert_eq!(name_stream("a"), name_stream("a"));
        assert_ne!(name_stream("a"), name_stream("b"));
        Ok(())
    }
}
