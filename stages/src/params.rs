//! Helpers shared by the stage kinds' params.
//!
//! # Real numbers
//!
//! Radii and step sizes are written as the papers write them: `eps: 8/255`. The `de_*`
//! functions (for `#[serde(deserialize_with = ...)]`) accept a number, a numeric string
//! (`"0.5"`) or a fraction `a/b` of two numbers, and always serialize back as a plain `f64`,
//! so `8/255` and `0.03137254901960784` give the same normalized params and the same key.
//!
//! ```
//! use pipe_stages::params::parse_real;
//! assert_eq!(parse_real("8/255"), Ok(8.0 / 255.0));
//! assert_eq!(parse_real(" 0.5 "), Ok(0.5));
//! assert!(parse_real("8/0").is_err());
//! ```

use pipe_engine::ParamError;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::nn::conv::KernelImpl;

/// Parses `x`, `a/b` (numbers) into a finite `f64`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_real(text: &str) -> Result<f64, String> {
    let bad = || format!("expected a number or a fraction such as 8/255, got `{text}`");
    let num = |s: &str| s.trim().parse::<f64>().map_err(|_| bad());
    let v = match text.split_once('/') {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if b == 0.0 {
                return Err(format!("`{text}` divides by zero"));
            }
            a / b
        }
        None => num(text)?,
    };
    if v.is_finite() { Ok(v) } else { Err(bad()) }
}

fn real_of(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("expected a finite number, got {n}")),
        Value::String(s) => parse_real(s),
        other => Err(format!(
            "expected a number or a fraction such as 8/255, got {other}"
        )),
    }
}

/// Deserializes an `f64` from a number or a fraction string.
///
/// # Errors
/// Anything else.
pub fn de_real<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    real_of(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// [`de_real`] for an optional field (`null` is `None`).
///
/// # Errors
/// Anything but null, a number or a fraction string.
pub fn de_real_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => real_of(&v).map(Some).map_err(serde::de::Error::custom),
    }
}

/// [`de_real`] for an optional `[lo, hi]` pair.
///
/// # Errors
/// Anything but null or a list of two reals.
pub fn de_real_pair_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[f64; 2]>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Array(items) if items.len() == 2 => {
            let lo = real_of(&items[0]).map_err(serde::de::Error::custom)?;
            let hi = real_of(&items[1]).map_err(serde::de::Error::custom)?;
            Ok(Some([lo, hi]))
        }
        other => Err(serde::de::Error::custom(format!(
            "expected a list [lo, hi] of two numbers, got {other}"
        ))),
    }
}

/// Collects range errors for a kind's `check`.
#[derive(Debug, Default)]
pub struct Checks {
    errors: Vec<ParamError>,
}

impl Checks {
    /// Records `message` at `path` unless `ok`.
    pub fn require(&mut self, ok: bool, path: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.errors.push(ParamError::new(path, message()));
        }
    }

    /// `value >= 1`.
    pub fn positive(&mut self, path: &str, value: usize) {
        self.require(value >= 1, path, || {
            format!("expected an integer >= 1, got {value}")
        });
    }

    /// `value <= max`: counts that size memory (views, layer widths) or loops (epochs) have a
    /// ceiling, so a typo such as `n_views: 1600000` fails at plan time instead of aborting
    /// the process on an allocation.
    pub fn at_most(&mut self, path: &str, value: usize, max: usize) {
        self.require(value <= max, path, || {
            format!("expected at most {max}, got {value}")
        });
    }

    /// `lo <= value <= hi` (finite).
    pub fn within(&mut self, path: &str, value: f64, lo: f64, hi: f64) {
        self.require(
            value.is_finite() && (lo..=hi).contains(&value),
            path,
            || format!("expected a value in [{lo}, {hi}], got {value}"),
        );
    }

    /// `value > 0` (finite).
    pub fn positive_real(&mut self, path: &str, value: f64) {
        self.require(value.is_finite() && value > 0.0, path, || {
            format!("expected a number > 0, got {value}")
        });
    }

    /// `value >= 0` (finite).
    pub fn non_negative(&mut self, path: &str, value: f64) {
        self.require(value.is_finite() && value >= 0.0, path, || {
            format!("expected a number >= 0, got {value}")
        });
    }

    /// `checkpoint_minutes`, if given, in [0, 10⁶].
    pub fn checkpoint_minutes(&mut self, minutes: Option<f64>) {
        if let Some(m) = minutes {
            self.within("checkpoint_minutes", m, 0.0, 1e6);
        }
    }

    /// A `device: cuda:N` in a build without CUDA, at `device`.
    pub fn device(&mut self, device: crate::device::DeviceSpec) {
        if let crate::device::DeviceSpec::Cuda(n) = device {
            self.require(crate::device::DeviceSpec::cuda_built(), "device", || {
                format!("device cuda:{n} needs pipe built with `--features cuda`")
            });
        }
    }

    /// The errors found.
    pub fn into_errors(self) -> Vec<ParamError> {
        self.errors
    }
}

/// Ceiling of `epochs` (a million epochs is already centuries of compute).
pub const MAX_EPOCHS: usize = 1_000_000;
/// Ceiling of `n_views` (EMP-SSL's largest setting is 200 patches).
pub const MAX_VIEWS: usize = 1024;
/// Ceiling of a layer width such as `hidden_dim` or `z_dim`.
pub const MAX_DIM: usize = 65_536;

/// Writes pretty JSON with a final newline (every kind's `metrics.json`).
///
/// # Errors
/// Serialisation or I/O errors, naming the file.
pub fn write_json(path: &std::path::Path, v: &Value) -> Result<(), pipe_engine::BoxError> {
    let mut text = serde_json::to_string_pretty(v)?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// A kind's keyed params: the serialized params with `device` replaced by its backend (the
/// backend changes the numbers, the ordinal does not), `cuda_math: tf32` on a CUDA node of a
/// process that computes in TF32 ([`crate::device::CudaMath`]), `kernels: candle` in a process
/// that runs candle's kernels (`PIPE_KERNELS`, [`KernelImpl`]), and without
/// `checkpoint_minutes` (how often a training kind writes its state changes no result).
pub fn key_with_backend<P: serde::Serialize>(p: &P, device: crate::device::DeviceSpec) -> Value {
    key_with_backend_math(
        p,
        device,
        crate::device::CudaMath::current(),
        KernelImpl::from_env(),
    )
}

/// [`key_with_backend`] under a given CUDA math setting and kernel choice.
pub fn key_with_backend_math<P: serde::Serialize>(
    p: &P,
    device: crate::device::DeviceSpec,
    math: crate::device::CudaMath,
    kernels: KernelImpl,
) -> Value {
    let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        let backend = device.backend();
        m.insert("device".into(), Value::from(backend));
        let entries = [math.key_entry(backend), kernels.key_entry()];
        for (k, val) in entries.into_iter().flatten() {
            m.insert(k.into(), Value::from(val));
        }
        m.remove("checkpoint_minutes");
    }
    v
}

/// Default of the training kinds' `checkpoint_minutes`: writing a ResNet-18 state (weights and
/// optimiser buffers, ~275 MB with EMP-SSL's 4096-wide head) takes ~0.8 s on this project's
/// CPU (`pipe bench pretrain`), 0.1 % of ten minutes.
pub const DEFAULT_CHECKPOINT_MINUTES: f64 = 10.0;

/// The interval between mid-epoch state writes a `checkpoint_minutes` param asks for.
pub fn checkpoint_interval(minutes: Option<f64>) -> std::time::Duration {
    std::time::Duration::from_secs_f64(
        minutes.unwrap_or(DEFAULT_CHECKPOINT_MINUTES).max(0.0) * 60.0,
    )
}

/// The file `name` of the artifact in input `slot`, or an error naming the stage kind that
/// makes such files (`the `dataset` input has no data.safetensors (is it a `dataset` stage?)`).
///
/// # Errors
/// No artifact in `slot`, or none with that file.
pub fn input_file(
    ctx: &pipe_engine::StageCtx<'_>,
    slot: &str,
    name: &str,
    made_by: &str,
) -> Result<std::path::PathBuf, pipe_engine::BoxError> {
    ctx.input(slot)?.file(name).map_err(|e| {
        format!("the `{slot}` input has no {name} (is it a `{made_by}` stage?): {e}").into()
    })
}

/// The scheduler resources of a node on `device` (a CUDA node holds a GPU).
pub fn device_resources(device: crate::device::DeviceSpec) -> pipe_engine::Resources {
    pipe_engine::Resources {
        gpu: device.backend() == "cuda",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, serde::Serialize)]
    struct P {
        #[serde(deserialize_with = "de_real")]
        eps: f64,
        #[serde(default, deserialize_with = "de_real_opt")]
        alpha: Option<f64>,
        #[serde(default, deserialize_with = "de_real_pair_opt")]
        scale: Option<[f64; 2]>,
    }

    #[test]
    fn a_cuda_device_needs_a_cuda_build() {
        use crate::device::DeviceSpec;
        let mut e = Checks::default();
        for d in [DeviceSpec::Auto, DeviceSpec::Cpu, DeviceSpec::Cuda(1)] {
            e.device(d);
        }
        let errors = e.into_errors();
        if DeviceSpec::cuda_built() {
            assert!(errors.is_empty(), "{errors:?}");
        } else {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].path, "device");
            assert!(
                errors[0].message.contains("cuda:1")
                    && errors[0].message.contains("--features cuda")
            );
        }
    }

    #[test]
    fn tf32_is_keyed_on_cuda_nodes_and_nothing_else_moves() {
        use crate::device::{CudaMath, DeviceSpec};
        let p = serde_json::json!({"epochs": 1, "device": "cuda:1", "checkpoint_minutes": 5});
        let key = |d, m| key_with_backend_math(&p, d, m, KernelImpl::Fast);
        let fp32 = key(DeviceSpec::Cuda(1), CudaMath::Fp32);
        assert_eq!(fp32, serde_json::json!({"epochs": 1, "device": "cuda"}));
        assert_eq!(
            key(DeviceSpec::Cuda(0), CudaMath::Tf32),
            serde_json::json!({"epochs": 1, "device": "cuda", "cuda_math": "tf32"})
        );
        assert_eq!(
            key(DeviceSpec::Cpu, CudaMath::Tf32),
            key(DeviceSpec::Cpu, CudaMath::Fp32)
        );
    }

    #[test]
    fn candle_kernels_are_keyed_on_every_backend_and_the_default_is_not() {
        use crate::device::{CudaMath, DeviceSpec};
        let p = serde_json::json!({"epochs": 1, "device": "auto"});
        for d in [DeviceSpec::Cpu, DeviceSpec::Cuda(0)] {
            let fast = key_with_backend_math(&p, d, CudaMath::Fp32, KernelImpl::Fast);
            assert!(fast.get("kernels").is_none(), "{fast}");
            let candle = key_with_backend_math(&p, d, CudaMath::Fp32, KernelImpl::Candle);
            assert_eq!(candle["kernels"], "candle");
            let mut back = candle.clone();
            back.as_object_mut().expect("object").remove("kernels");
            assert_eq!(back, fast, "nothing else moves");
        }
        let both =
            key_with_backend_math(&p, DeviceSpec::Cuda(0), CudaMath::Tf32, KernelImpl::Candle);
        assert_eq!(
            (both["cuda_math"].as_str(), both["kernels"].as_str()),
            (Some("tf32"), Some("candle"))
        );
    }

    #[test]
    fn fractions_and_numbers_normalize_alike() {
        let a: P = serde_json::from_value(
            serde_json::json!({"eps": "8/255", "alpha": "1/100", "scale": ["1/4", 1]}),
        )
        .expect("parses");
        let b: P = serde_json::from_value(
            serde_json::json!({"eps": 8.0 / 255.0, "alpha": 0.01, "scale": [0.25, 1.0]}),
        )
        .expect("parses");
        assert_eq!(
            serde_json::to_value(&a).expect("ser"),
            serde_json::to_value(&b).expect("ser")
        );
        for bad in [
            serde_json::json!({"eps": "8/"}),
            serde_json::json!({"eps": true}),
            serde_json::json!({"eps": "1/0"}),
            serde_json::json!({"eps": 1, "scale": [1]}),
        ] {
            assert!(serde_json::from_value::<P>(bad).is_err());
        }
    }
}
