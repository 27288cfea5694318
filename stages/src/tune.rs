//! Process-level settings for candle's CPU path, applied before any thread starts.
//!
//! Call [`reexec_tuned`] first thing in `main` (the `pipe` binary and `cargo bench --bench nn` do).

/// Runtime settings that make candle's CPU path fast on few cores, applied by re-executing the
/// binary once with them in its environment (both are read before `main` could set them safely).
///
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT=0`: candle's worker threads park at once instead of spinning
///   25,000 rounds after each op; on 2 cores the spinning workers steal the CPU from the gemm and
///   im2col threads of the next op (ResNet-18 width 16 train step 242 -> 212 ms).
/// - glibc `mmap_threshold` / `trim_threshold` at 256 / 512 MiB: activation buffers are reused
///   from the heap instead of being mmapped and page-faulted in on every op (242 -> 223 ms;
///   both together 192 ms).
///
/// A value the user set is kept; `PIPE_NO_TUNE=1` turns this off.
pub const TUNED_ENV: [(&str, &str); 2] = [
    ("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0"),
    (
        "GLIBC_TUNABLES",
        "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912",
    ),
];

/// Re-executes this binary with [`TUNED_ENV`] once (marked by `PIPE_TUNED`); returns only when it
/// does not (already tuned, opted out, not Linux/glibc, or exec failed).
pub fn reexec_tuned() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("PIPE_TUNED").is_some() || std::env::var_os("PIPE_NO_TUNE").is_some() {
            return;
        }
        let missing: Vec<_> = TUNED_ENV
            .iter()
            .filter(|(k, _)| std::env::var_os(k).is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut cmd = std::process::Command::new(exe);
        cmd.args(std::env::args_os().skip(1)).env("PIPE_TUNED", "1");
        if let Some(arg0) = std::env::args_os().next() {
            cmd.arg0(arg0);
        }
        for (k, v) in missing {
            cmd.env(k, v);
        }
        // Only returns on failure; then run untuned.
        let _ = cmd.exec();
    }
}
