//! In a `cuda` build, compiles `cuda/batch_norm.cu` (the fused batch-norm kernels) to PTX with
//! nvcc, which a `cuda` build needs anyway for candle's own kernels. The PTX targets
//! `CUDA_COMPUTE_CAP` when it is set (as candle-kernels does; `scripts/cuda-toolchain.sh` sets
//! it), else compute capability 7.5, the oldest CUDA 13 supports, which the driver compiles for
//! any newer GPU when it loads the module. A CPU build compiles nothing.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda/batch_norm.cu");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("batch_norm.ptx");
    // "90a" (candle's spelling for sm_90a) is compute_90 for this portable PTX.
    let cap = env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim_end_matches(['a', 'f']).to_string())
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| "75".to_string());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            &format!("-arch=compute_{cap}"),
            "cuda/batch_norm.cu",
            "-o",
        ])
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{nvcc} --ptx cuda/batch_norm.cu` failed ({s})"),
        Err(e) => panic!(
            "cannot run `{nvcc}` ({e}): a `cuda` build needs the CUDA toolkit's nvcc on PATH \
             (scripts/cuda-toolchain.sh installs one; NVCC names another)"
        ),
    }
}
