//! Devices: the `device: auto | cpu | cuda:N` param and its candle [`Device`].
//!
//! `auto` picks `cuda:0` when this binary was built with the `cuda` feature and the CUDA driver
//! reports a device, else the CPU; `PIPE_AUTO_DEVICE=cpu|cuda` fixes it instead (a Slurm run
//! plans on a login node for the compute nodes: see [`auto_backend`]). The backend (`cpu` / `cuda`) changes the numbers, so stages
//! key it (through [`DeviceSpec::backend`]); the ordinal does not.
//!
//! [`inventory`] lists what this binary can compute on (`pipe devices`).
//!
//! A CUDA build made with `scripts/cuda-cargo` loads the CUDA libraries (driver, cuBLAS,
//! cuRAND) when a device is first opened, and cudarc panics when one cannot be found; so before
//! anything here touches cudarc it checks that each library can be loaded
//! ([`missing_cuda_library`]) and turns a missing one into an error that names it.

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
    /// changes results). `auto` is `cuda` only where [`cuda_usable`] (a CUDA build on a machine
    /// whose driver reports a device).
    pub fn backend(&self) -> &'static str {
        match self {
            DeviceSpec::Cpu => "cpu",
            DeviceSpec::Cuda(_) => "cuda",
            DeviceSpec::Auto => auto_backend(),
        }
    }

    /// Opens the candle device.
    ///
    /// # Errors
    /// A CUDA device in a build without CUDA, or one that cannot be opened.
    pub fn open(&self) -> candle::Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            // CUDA here, or `PIPE_AUTO_DEVICE=cuda` (then a machine without it is an error,
            // never a silent fall back to numbers the key does not describe)
            DeviceSpec::Auto if self.backend() == "cuda" => {
                DeviceSpec::Cuda(0).open().map_err(|e| {
                    let why = match auto_override() {
                        Ok(Some(_)) => format!(" ({AUTO_DEVICE_ENV}=cuda)"),
                        _ => String::new(),
                    };
                    candle::Error::Msg(format!("device auto is cuda:0 here{why}, but: {e}"))
                })
            }
            DeviceSpec::Auto => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) if Self::cuda_built() => match missing_cuda_library() {
                None => Device::new_cuda(*n),
                Some(why) => candle::bail!("device cuda:{n} cannot be opened: {why}"),
            },
            DeviceSpec::Cuda(n) => candle::bail!(
                "device cuda:{n} asked for, but this pipe was built without the `cuda` feature"
            ),
        }
    }
}

/// The environment variable that fixes what `device: auto` resolves to.
pub const AUTO_DEVICE_ENV: &str = "PIPE_AUTO_DEVICE";

/// What [`AUTO_DEVICE_ENV`] says `auto` is: `Ok(None)` when unset or empty, else `cpu` or
/// `cuda`, or an error for any other value (the CLI refuses to start with it).
///
/// # Errors
/// A value other than `cpu` and `cuda`.
pub fn auto_override() -> Result<Option<&'static str>, String> {
    match std::env::var(AUTO_DEVICE_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) if v.is_empty() => Ok(None),
        Ok(v) if v == "cpu" => Ok(Some("cpu")),
        Ok(v) if v == "cuda" => Ok(Some("cuda")),
        Ok(v) => Err(format!(
            "{AUTO_DEVICE_ENV}: expected `cpu` or `cuda`, got `{v}`"
        )),
        Err(e) => Err(format!("{AUTO_DEVICE_ENV}: {e}")),
    }
}

/// The backend `device: auto` resolves to, here and in node keys: what [`AUTO_DEVICE_ENV`]
/// says when set (so that a run planned on a login node without a GPU keys, and its Slurm jobs
/// compute, `auto` nodes for the GPU nodes), else `cuda` where [`cuda_usable`], else `cpu`.
/// Read once per process.
pub fn auto_backend() -> &'static str {
    use std::sync::OnceLock;
    static AUTO: OnceLock<&'static str> = OnceLock::new();
    AUTO.get_or_init(|| match auto_override() {
        Ok(Some(b)) => b,
        _ if cuda_usable() => "cuda",
        _ => "cpu",
    })
}

/// The environment variable that picks how CUDA computes `f32` matmuls and convolutions
/// ([`CudaMath`]).
pub const CUDA_MATH_ENV: &str = "PIPE_CUDA_MATH";

/// NVIDIA's switch that turns TF32 off in every one of its libraries when `0`.
pub const TF32_OVERRIDE_ENV: &str = "NVIDIA_TF32_OVERRIDE";

/// How CUDA computes `f32` matmuls and convolutions: a process-wide setting
/// ([`CUDA_MATH_ENV`]), keyed on CUDA nodes when not the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CudaMath {
    /// Full `f32` (the default): cuBLAS without tensor cores, and cuDNN (with `cudnn`) held to
    /// `f32` too, since its default on Ampere and later GPUs is TF32.
    #[default]
    Fp32,
    /// TF32 tensor cores (a 10-bit mantissa for the products, `f32` accumulation) in cuBLAS
    /// matmuls, hence in the im2col convolutions, and in cuDNN's: faster, less precise.
    /// PyTorch's default for convolutions (`torch.backends.cudnn.allow_tf32`), not for matmuls.
    Tf32,
}

impl CudaMath {
    /// `fp32` or `tf32`.
    pub fn name(self) -> &'static str {
        match self {
            CudaMath::Fp32 => "fp32",
            CudaMath::Tf32 => "tf32",
        }
    }

    /// The setting that `value` of [`CUDA_MATH_ENV`] (unset or empty: `fp32`) asks for, given
    /// the value of [`TF32_OVERRIDE_ENV`].
    ///
    /// # Errors
    /// Any other value, or `tf32` where `NVIDIA_TF32_OVERRIDE=0` would silently turn it off.
    pub fn parse(value: Option<&str>, tf32_override: Option<&str>) -> Result<CudaMath, String> {
        match value.unwrap_or("") {
            "" | "fp32" => Ok(CudaMath::Fp32),
            "tf32" if tf32_override == Some("0") => Err(format!(
                "{CUDA_MATH_ENV}=tf32, but {TF32_OVERRIDE_ENV}=0 turns TF32 off in the CUDA \
                 libraries: unset one of them"
            )),
            "tf32" => Ok(CudaMath::Tf32),
            v => Err(format!(
                "{CUDA_MATH_ENV}: expected `fp32` or `tf32`, got `{v}`"
            )),
        }
    }

    /// The setting of this process's environment.
    ///
    /// # Errors
    /// As [`CudaMath::parse`] (the CLI refuses to start with a bad value).
    pub fn from_env() -> Result<CudaMath, String> {
        let var = |k: &str| std::env::var(k).ok();
        CudaMath::parse(
            var(CUDA_MATH_ENV).as_deref(),
            var(TF32_OVERRIDE_ENV).as_deref(),
        )
    }

    /// This process's setting, read once ([`CudaMath::from_env`]; a bad value, which the CLI
    /// refuses before anything is planned, reads as the default).
    pub fn current() -> CudaMath {
        use std::sync::OnceLock;
        static MATH: OnceLock<CudaMath> = OnceLock::new();
        *MATH.get_or_init(|| CudaMath::from_env().unwrap_or_default())
    }

    /// The environment variable the process must have before the CUDA libraries load so that
    /// they compute what this setting says: `NVIDIA_TF32_OVERRIDE=0` for `fp32` (which keeps a
    /// `cudnn` build's convolutions out of TF32), nothing for `tf32`.
    pub fn required_env(self) -> Option<(&'static str, &'static str)> {
        match self {
            CudaMath::Fp32 => Some((TF32_OVERRIDE_ENV, "0")),
            CudaMath::Tf32 => None,
        }
    }

    /// Applies the setting to this process: the environment the CUDA libraries read when they
    /// load ([`CudaMath::required_env`]; the value it replaces is kept for child processes,
    /// [`inherited_env`]) and candle's cuBLAS `f32` compute type.
    ///
    /// # Safety
    /// It may change the process environment: call it before any other thread exists (first
    /// thing in `main`), when nothing can read the environment concurrently.
    #[allow(unsafe_code)]
    pub unsafe fn apply_to_process(self) {
        if let Some((k, v)) = self.required_env() {
            let before = std::env::var_os(k);
            if before.as_deref() != Some(std::ffi::OsStr::new(v)) {
                let _ = REPLACED_ENV.set((k, before));
                // SAFETY: the caller guarantees that no other thread exists
                unsafe { std::env::set_var(k, v) };
            }
        }
        self.apply_to_candle();
    }

    /// The candle side of [`CudaMath::apply_to_process`] alone: cuBLAS's `f32` compute type
    /// (process-wide, for every thread).
    pub fn apply_to_candle(self) {
        candle::cuda::set_gemm_reduced_precision_f32(self == CudaMath::Tf32);
    }

    /// What a CUDA node's key adds for this setting: nothing for the default, so keys made
    /// before the setting existed stay valid.
    pub fn key_entry(self, backend: &str) -> Option<(&'static str, &'static str)> {
        (backend == "cuda" && self != CudaMath::Fp32).then_some(("cuda_math", self.name()))
    }
}

/// The variable [`CudaMath::apply_to_process`] changed and its value before (`None`: unset).
static REPLACED_ENV: std::sync::OnceLock<(&'static str, Option<std::ffi::OsString>)> =
    std::sync::OnceLock::new();

/// The environment variable `pipe` set for its own CUDA libraries, with the value a child
/// process (a `shell` stage's command: a PyTorch script computes as its own defaults say) must
/// get instead (`None`: unset); `None` when `pipe` changed nothing.
pub fn inherited_env() -> Option<(&'static str, Option<&'static std::ffi::OsStr>)> {
    REPLACED_ENV.get().map(|(k, v)| (*k, v.as_deref()))
}

/// Whether this binary can use CUDA here: it was built with the `cuda` feature, the CUDA
/// libraries can be loaded and the driver reports at least one device (asked once per process;
/// candle's own `cuda_is_available` only says whether the feature was compiled in). Where the
/// driver is installed but CUDA still cannot be used (cuBLAS missing, a driver error), this
/// says once on stderr why `auto` falls back to the CPU: that machine was meant to compute on
/// its GPU.
pub fn cuda_usable() -> bool {
    use std::sync::Once;
    static WARNED: Once = Once::new();
    match cuda_state() {
        Ok(()) => true,
        Err(why) => {
            if DeviceSpec::cuda_built() && loadable(CUDA_LIBRARIES[0].1).is_some() {
                WARNED.call_once(|| {
                    eprintln!("pipe: device auto uses the CPU: CUDA cannot be used here: {why}");
                });
            }
            false
        }
    }
}

/// `Ok` when CUDA can be used here, else why not (asked once per process).
fn cuda_state() -> &'static Result<(), String> {
    use std::sync::OnceLock;
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    STATE.get_or_init(|| {
        if let Some(why) = missing_cuda_library() {
            return Err(why);
        }
        cuda::usable()
    })
}

/// The shared libraries candle's CUDA backend needs, each with the file names looked for: a
/// subset of those cudarc tries when it loads them (`libX.so`, then versioned names), so a
/// library found here is one cudarc finds. The driver comes first. cuBLAS loads cuBLASLt itself.
const CUDA_LIBRARIES: &[(&str, &[&str])] = &[
    ("the CUDA driver", &["libcuda.so.1", "libcuda.so"]),
    (
        "cuBLAS",
        &[
            "libcublas.so",
            "libcublas.so.13",
            "libcublas.so.12",
            "libcublas.so.11",
        ],
    ),
    ("cuRAND", &["libcurand.so", "libcurand.so.10"]),
    #[cfg(feature = "cudnn")]
    ("cuDNN", &["libcudnn.so", "libcudnn.so.9"]),
];

/// The first of `names` the dynamic loader can open here, if any (each is opened and closed
/// again).
fn loadable(names: &[&'static str]) -> Option<&'static str> {
    names.iter().copied().find(|name| {
        let Ok(c) = std::ffi::CString::new(*name) else {
            return false;
        };
        // Unsafe: dlopen / dlclose. SAFETY: `c` is a valid C string that outlives the call, and a non-null handle is
        // closed exactly once. Opening runs the library's initialisers, as the later load by
        // cudarc (or the dynamic loader, in a build that links them) does anyway.
        #[allow(unsafe_code)]
        unsafe {
            let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if handle.is_null() {
                false
            } else {
                libc::dlclose(handle);
                true
            }
        }
    })
}

/// `None` when every CUDA library can be loaded (asked once per process), else which one is
/// missing and where to put it. A build without `cuda` needs none.
pub fn missing_cuda_library() -> Option<String> {
    use std::sync::OnceLock;
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    if !DeviceSpec::cuda_built() {
        return None;
    }
    MISSING
        .get_or_init(|| first_missing(CUDA_LIBRARIES))
        .clone()
}

/// The first library of `libs` none of whose names loads, as a message.
fn first_missing(libs: &[(&str, &[&'static str])]) -> Option<String> {
    let (what, names) = libs.iter().find(|(_, names)| loadable(names).is_none())?;
    Some(format!(
        "{what} cannot be loaded (none of {} is found by the dynamic loader; put the folder that \
         holds it on LD_LIBRARY_PATH: the driver's libcuda comes with the NVIDIA driver, the \
         others with the CUDA toolkit or PyTorch's CUDA wheels, site-packages/nvidia/cu13/lib)",
        names.join(", ")
    ))
}

/// Errors that mean the GPU ran out of memory: the driver's, cuBLAS's and cuDNN's (cudarc
/// writes their enum names into the message).
const OUT_OF_MEMORY: [&str; 3] = [
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
];

/// The hint a GPU kind adds to a failure ([`pipe_engine::TypedStage::explain_failure`]) whose
/// `message` says the GPU ran out of memory: which of `knobs` (paths into the normalized
/// `params`, `defense.batch_size`) to lower, with their values in this node; `None` for any
/// other failure.
pub fn out_of_memory_hint(
    params: &serde_json::Value,
    message: &str,
    knobs: &[&str],
) -> Option<String> {
    if !OUT_OF_MEMORY.iter().any(|e| message.contains(e)) {
        return None;
    }
    let set: Vec<String> = knobs
        .iter()
        .filter_map(|k| {
            let v = k.split('.').try_fold(params, |v, part| v.get(part))?;
            (!v.is_null()).then(|| format!("`{k}` (here {v})"))
        })
        .collect();
    let lower = match set.as_slice() {
        [] => String::new(),
        [one] => format!("lower {one} (another value is another node) or "),
        [init @ .., last] => format!(
            "lower {} or {last} (other values are other nodes) or ",
            init.join(", ")
        ),
    };
    Some(format!(
        "the GPU ran out of memory: {lower}run it on a GPU with more memory; `pipe run --gpus N` \
         with N above the number of GPUs lets N nodes share one GPU's memory"
    ))
}

/// What this binary can compute on: the answer of `pipe devices`.
#[derive(Clone, Debug, Serialize)]
pub struct Inventory {
    /// Whether the binary was built with the `cuda` feature.
    pub cuda_built: bool,
    /// The `CUDA_COMPUTE_CAP` candle's kernels were compiled for (a CUDA build with it set).
    pub cuda_kernels_for: Option<&'static str>,
    /// What `device: auto` resolves to here (`cpu` or `cuda:0`): `cuda:0` whenever the driver
    /// reports a device, even one whose check failed (a node on it then fails, saying why).
    pub auto: String,
    /// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the physical cores).
    pub cpu_threads: usize,
    /// Logical CPUs of the machine.
    pub cpu_logical: usize,
    /// The CUDA devices the driver reports, each with what it is and whether it works.
    pub cuda_devices: Vec<CudaDeviceInfo>,
    /// Why no CUDA device is usable; `None` when at least one is.
    pub cuda_unavailable: Option<String>,
    /// How CUDA computes `f32` matmuls and convolutions here ([`CudaMath`]): `fp32` or `tf32`.
    pub cuda_math: &'static str,
    /// `NVIDIA_TF32_OVERRIDE` as this process's CUDA libraries read it (`0` under `fp32`).
    pub nvidia_tf32_override: Option<String>,
}

/// One CUDA device, as [`inventory`] reports it.
#[derive(Clone, Debug, Serialize)]
pub struct CudaDeviceInfo {
    /// `cuda:N`, as written in params.
    pub device: String,
    /// The ordinal N.
    pub ordinal: usize,
    /// The driver's name for it (`NVIDIA H100 80GB HBM3`).
    pub name: Option<String>,
    /// Compute capability, `major.minor`.
    pub compute_capability: Option<String>,
    /// Device memory, bytes.
    pub memory_bytes: Option<u64>,
    /// Free device memory when probed, bytes.
    pub free_bytes: Option<u64>,
    /// `None` when candle opened the device and a small kernel and a cuBLAS matmul gave the
    /// right answer on it; else what failed.
    pub error: Option<String>,
}

/// Lists the CPU and, in a CUDA build, every CUDA device (opening each and running a 4x4
/// matmul on it, so a device listed without an error is one that works).
pub fn inventory() -> Inventory {
    let (cuda_devices, cuda_unavailable) = cuda::probe();
    Inventory {
        cuda_built: DeviceSpec::cuda_built(),
        cuda_kernels_for: cuda::KERNELS_FOR,
        auto: if auto_backend() == "cuda" {
            "cuda:0"
        } else {
            "cpu"
        }
        .to_string(),
        cpu_threads: candle::utils::get_num_threads(),
        cpu_logical: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cuda_devices,
        cuda_unavailable,
        cuda_math: CudaMath::current().name(),
        nvidia_tf32_override: std::env::var(TF32_OVERRIDE_ENV).ok(),
    }
}

/// The CUDA side of [`inventory`].
#[cfg(feature = "cuda")]
mod cuda {
    use super::CudaDeviceInfo;
    use candle::cuda_backend::cudarc::driver::{CudaContext, DriverError};
    use candle::{Device, Tensor};

    /// `CUDA_COMPUTE_CAP` when this crate was compiled (what candle-kernels built for).
    pub(super) const KERNELS_FOR: Option<&str> = option_env!("CUDA_COMPUTE_CAP");

    /// The number of devices the driver reports.
    pub(super) fn device_count() -> Result<usize, DriverError> {
        CudaContext::device_count().map(|n| usize::try_from(n).unwrap_or(0))
    }

    /// `Ok` when the driver reports a device (the libraries were checked before).
    pub(super) fn usable() -> Result<(), String> {
        match device_count() {
            Ok(0) => Err("the CUDA driver reports no device".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("the CUDA driver says: {e}")),
        }
    }

    /// Every device, or why there are none.
    pub(super) fn probe() -> (Vec<CudaDeviceInfo>, Option<String>) {
        if let Err(why) = super::cuda_state() {
            return (Vec::new(), Some(why.clone()));
        }
        let n = device_count().unwrap_or(0);
        let devices: Vec<CudaDeviceInfo> = (0..n).map(probe_one).collect();
        let why = devices
            .iter()
            .all(|d| d.error.is_some())
            .then(|| format!("none of the {n} CUDA device(s) works (see each one's error)"));
        (devices, why)
    }

    fn probe_one(ordinal: usize) -> CudaDeviceInfo {
        let mut info = CudaDeviceInfo {
            device: format!("cuda:{ordinal}"),
            ordinal,
            name: None,
            compute_capability: None,
            memory_bytes: None,
            free_bytes: None,
            error: None,
        };
        match CudaContext::new(ordinal) {
            Ok(ctx) => {
                info.name = ctx.name().ok();
                info.compute_capability = ctx
                    .compute_capability()
                    .ok()
                    .map(|(a, b)| format!("{a}.{b}"));
                info.memory_bytes = ctx.total_mem().ok().and_then(|b| u64::try_from(b).ok());
                info.free_bytes = ctx
                    .mem_get_info()
                    .ok()
                    .and_then(|(f, _)| u64::try_from(f).ok());
            }
            Err(e) => {
                info.error = Some(format!("cannot create a context: {e}"));
                return info;
            }
        }
        info.error = smoke_test(ordinal).err().map(|e| e.to_string());
        info
    }

    /// Opens the device through candle and checks cuBLAS (a matmul) and a PTX kernel (the sum).
    fn smoke_test(ordinal: usize) -> candle::Result<()> {
        let dev = Device::new_cuda(ordinal)?;
        let a = Tensor::arange(0f32, 16., &dev)?.reshape((4, 4))?;
        // column sums of a are 24, 28, 32, 36, so the sum of a a^T is their sum of squares
        let s = a.matmul(&a.t()?)?.sum_all()?.to_scalar::<f32>()?;
        if s != 3680.0 {
            candle::bail!("a 4x4 matmul on cuda:{ordinal} gave {s}, expected 3680")
        }
        Ok(())
    }
}

/// The CUDA side of [`inventory`] in a build without CUDA.
#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::CudaDeviceInfo;

    /// No CUDA kernels in this build.
    pub(super) const KERNELS_FOR: Option<&str> = None;

    /// Why CUDA cannot be used.
    const WITHOUT: &str = "this pipe was built without the `cuda` feature";

    /// Never: no CUDA in this build.
    pub(super) fn usable() -> Result<(), String> {
        Err(WITHOUT.into())
    }

    /// No devices: the reason.
    pub(super) fn probe() -> (Vec<CudaDeviceInfo>, Option<String>) {
        (Vec::new(), Some(WITHOUT.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        for (s, d) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda:1", DeviceSpec::Cuda(1)),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().ok(), Some(d));
            assert_eq!(d.to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cuda(0)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cuda_math_parses_refuses_and_keys_only_tf32_on_cuda() {
        assert_eq!(CudaMath::parse(None, None), Ok(CudaMath::Fp32));
        assert_eq!(CudaMath::parse(Some(""), Some("0")), Ok(CudaMath::Fp32));
        assert_eq!(CudaMath::parse(Some("fp32"), Some("1")), Ok(CudaMath::Fp32));
        assert_eq!(CudaMath::parse(Some("tf32"), None), Ok(CudaMath::Tf32));
        assert_eq!(CudaMath::parse(Some("tf32"), Some("1")), Ok(CudaMath::Tf32));
        assert!(CudaMath::parse(Some("tf32"), Some("0")).is_err_and(|e| e.contains("unset one")));
        assert!(CudaMath::parse(Some("TF32"), None).is_err_and(|e| e.contains("got `TF32`")));
        // fp32 pins NVIDIA's switch (a cudnn build's convolutions are TF32 by default)
        assert_eq!(
            CudaMath::Fp32.required_env(),
            Some(("NVIDIA_TF32_OVERRIDE", "0"))
        );
        assert_eq!(CudaMath::Tf32.required_env(), None);
        assert_eq!(
            CudaMath::Tf32.key_entry("cuda"),
            Some(("cuda_math", "tf32"))
        );
        assert_eq!(CudaMath::Tf32.key_entry("cpu"), None);
        assert_eq!(CudaMath::Fp32.key_entry("cuda"), None);
    }

    #[test]
    fn out_of_memory_hints_name_the_knobs_the_params_set() {
        let p = serde_json::json!({"batch_size": 64, "defense": {"batch_size": 8, "views": null}});
        let knobs = [
            "batch_size",
            "defense.batch_size",
            "defense.views",
            "n_views",
        ];
        for oom in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "attack: CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
            "CUDNN_STATUS_ALLOC_FAILED",
        ] {
            let hint = out_of_memory_hint(&p, oom, &knobs);
            assert_eq!(
                hint.as_deref().and_then(|h| h.split(" or run").next()),
                Some(
                    "the GPU ran out of memory: lower `batch_size` (here 64) or \
                     `defense.batch_size` (here 8) (other values are other nodes)"
                ),
                "{oom}"
            );
        }
        let one = out_of_memory_hint(&p, "CUDA_ERROR_OUT_OF_MEMORY", &["batch_size"]);
        assert!(one.is_some_and(|h| h.contains("lower `batch_size` (here 64) (another value")));
        let none = out_of_memory_hint(&p, "CUDA_ERROR_OUT_OF_MEMORY", &[]);
        assert!(none.is_some_and(|h| h.starts_with("the GPU ran out of memory: run it on")));
        // any other failure (the CPU never reports these) gets no hint
        assert_eq!(
            out_of_memory_hint(&p, "DriverError(CUDA_ERROR_INVALID_PTX)", &knobs),
            None
        );
        assert_eq!(out_of_memory_hint(&p, "out of memory", &knobs), None);
    }

    #[test]
    fn library_check_names_what_is_missing() {
        // the C library is always there; a made-up one never is
        assert_eq!(
            loadable(&["libpipe-no-such-library.so", "libc.so.6"]),
            Some("libc.so.6")
        );
        assert_eq!(loadable(&["libpipe-no-such-library.so"]), None);
        let libs: &[(&str, &[&'static str])] = &[
            ("the C library", &["libc.so.6"]),
            (
                "the missing one",
                &["libpipe-no-such-library.so.1", "libpipe-no-such-library.so"],
            ),
        ];
        let why = first_missing(libs).unwrap_or_default();
        assert!(why.starts_with("the missing one cannot be loaded"), "{why}");
        assert!(
            why.contains("libpipe-no-such-library.so.1, libpipe-no-such-library.so"),
            "{why}"
        );
        assert!(why.contains("LD_LIBRARY_PATH"), "{why}");
        assert_eq!(first_missing(&libs[..1]), None);
        if !DeviceSpec::cuda_built() {
            assert_eq!(missing_cuda_library(), None);
        }
    }

    #[test]
    fn cpu_build_resolves_auto_to_cpu() {
        if !DeviceSpec::cuda_built() {
            assert_eq!(DeviceSpec::Auto.backend(), "cpu");
            assert!(DeviceSpec::Auto.open().is_ok_and(|d| d.is_cpu()));
            assert!(DeviceSpec::Cuda(0).open().is_err());
            assert!(!cuda_usable());
            let inv = inventory();
            assert!(!inv.cuda_built && inv.cuda_devices.is_empty() && inv.auto == "cpu");
            assert!(
                inv.cuda_unavailable
                    .is_some_and(|w| w.contains("without the `cuda` feature"))
            );
            assert!(inv.cpu_threads >= 1);
        }
    }
}
