//! The CUDA kernels of the fused batch norm and residual ReLU (`stages/cuda/batch_norm.cu`),
//! run on the CPU: `stages/cuda/emulate.hpp` gives each block real threads and a real barrier
//! for `__syncthreads`, and `stages/cuda/check_kernels.cpp` checks every output of every kernel
//! against a direct double-precision computation, over shapes that exercise the per-channel
//! split into parts, BatchNorm1d rows, grid-stride loops, exact zeros and a NaN under the ReLU.
//!
//! This is what can be checked without a GPU (the kernels' indexing, reductions and barrier
//! placement); `cuda_vs_cpu_*` in a `cuda` build checks the compiled PTX on a GPU. Needs a
//! C++20 compiler: `c++`, or the one `CXX` names. Where none exists the test says so and passes.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_emulated() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pipe_check_kernels");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let compiled = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread"])
        .arg(dir.join("check_kernels.cpp"))
        .arg("-o")
        .arg(&exe)
        .output();
    let compiled = match compiled {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("no C++ compiler `{cxx}`: the emulated CUDA kernel check is skipped");
            return;
        }
        Err(e) => panic!("cannot run `{cxx}`: {e}"),
    };
    assert!(
        compiled.status.success(),
        "`{cxx}` failed on check_kernels.cpp:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&exe).output().expect("run the kernel check");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    assert!(stdout.contains("agree with the reference"), "{stdout}");
}
