//! Devices: the `device: auto | cpu | cuda:N` param and its candle [`Device`].
//!
//! `auto` picks `cuda:0` when this binary was built with the `cuda` feature and a GPU is
//! present, else the CPU. The backend (`cpu` / `cuda`) changes the numbers, so stages key it
//! (through [`DeviceSpec::backend`]); the ordinal does not.

use std::fmt;
use std::str::FromStr;

use candle::Device;
use serde::{Deserialize, Serialize};

/// A device as written in params.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("expected `auto`, `cpu` or `cuda:N`, got `{s}`")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Whether this build can use CUDA at all.
    pub fn cuda_built() -> bool {
        cfg!(feature = "cuda")
    }

    /// The backend the spec resolves to on this machine: `cpu` or `cuda` (keyed, since it
    /// changes results).
    pub fn backend(&self) -> &'static str {
        match self {
            DeviceSpec::Cpu => "cpu",
            DeviceSpec::Cuda(_) => "cuda",
            DeviceSpec::Auto if Self::cuda_built() && candle::utils::cuda_is_available() => "cuda",
            DeviceSpec::Auto => "cpu",
        }
    }

    /// Opens the candle device.
    ///
    /// # Errors
    /// A CUDA device in a build without CUDA, or one that cannot be opened.
    pub fn open(&self) -> candle::Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto if self.backend() == "cuda" => Device::new_cuda(0),
            DeviceSpec::Auto => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) if Self::cuda_built() => Device::new_cuda(*n),
            DeviceSpec::Cuda(n) => candle::bail!("device cuda:{n} asked for, but this pipe was built without the `cuda` feature"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        for (s, d) in [("auto", DeviceSpec::Auto), ("cpu", DeviceSpec::Cpu), ("cuda:1", DeviceSpec::Cuda(1))] {
            assert_eq!(s.parse::<DeviceSpec>().ok(), Some(d));
            assert_eq!(d.to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cuda(0)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_build_resolves_auto_to_cpu() {
        if !DeviceSpec::cuda_built() {
            assert_eq!(DeviceSpec::Auto.backend(), "cpu");
            assert!(DeviceSpec::Auto.open().is_ok_and(|d| d.is_cpu()));
            assert!(DeviceSpec::Cuda(0).open().is_err());
        }
    }
}
