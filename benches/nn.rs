//! `cargo bench --bench nn`: ResNet-18 forward (eval), train step (forward + backward + SGD) and
//! PGD step (gradient wrt the input) at batch 64, widths 16 and 64, on this CPU.
//! The same numbers come from `pipe bench nn`; `benches/torch_resnet.py` times PyTorch.

fn main() {
    pipe_stages::tune::reexec_tuned();
    let reps = std::env::var("PIPE_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for width in [16, 64] {
        match pipe_stages::nn::bench::bench_resnet_cpu(width, 64, reps) {
            Ok(t) => println!(
                "resnet18 width {:>3} batch 64: forward {:8.1} ms | train step {:8.1} ms | PGD step {:8.1} ms",
                t.width, t.forward_ms, t.train_step_ms, t.pgd_step_ms
            ),
            Err(e) => {
                eprintln!("benchmark failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
