//! `pipe`: run declarative, content-hashed experiment pipelines.
//!
//! Thin by design (ripgrep's `main`): parse the arguments, run one command, print the error
//! chain with `{:#}`, exit 0 (ok), 1 (some node failed, or `pipe verify` found problems), 2
//! (usage, spec or store error, including damaged entries under `pipe run --no-recompute`), or
//! 128 + the signal that interrupted a run: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP).

/// `eprintln!` that ignores a closed stderr: `pipe run ... 2>&1 | head` keeps running when the
/// reader has gone (a run ignores SIGPIPE) instead of panicking on the write.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod commands;
mod devices;
mod progress;
mod signals;
mod slurm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Declarative, content-hashed experiment pipelines for robust self-supervised learning.
#[derive(Parser, Debug)]
#[command(name = "pipe", version, about, max_term_width = 100)]
pub struct Cli {
    /// Artifact store folder.
    #[arg(long, global = true, env = "PIPE_STORE", default_value = ".pipe/store")]
    pub store: PathBuf,
    /// More logging (-v: info, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Which pipeline, with what overrides.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Pipeline YAML file.
    pub file: PathBuf,
    /// Override a param: `STAGE.PARAM=VALUE` (VALUE is read as YAML: 3, 0.1, true, crop).
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    pub set: Vec<String>,
    /// Sweep a param: `STAGE.PARAM=V1,V2,...` (replaces a sweep of that param in the file).
    #[arg(long = "sweep", value_name = "STAGE.PARAM=V1,V2")]
    pub sweep: Vec<String>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline: compute every node that is not in the store.
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Build only these stages or node ids (and what they need); default: everything.
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
        /// Nodes run at once (default: number of cores).
        #[arg(short = 'j', long)]
        jobs: Option<usize>,
        /// GPU nodes run at once.
        #[arg(long, default_value_t = 1)]
        gpus: usize,
        /// After a failure, go on with independent branches (dependents are skipped).
        #[arg(short = 'k', long)]
        keep_going: bool,
        /// Print one JSON document on stdout at the end.
        #[arg(long)]
        json: bool,
        /// No progress bars even on a terminal (plain log lines).
        #[arg(long)]
        no_progress: bool,
        /// When an entry this run would read is damaged (its files no longer match its
        /// manifest), fail with exit code 2 naming it instead of moving it aside into the
        /// store's `corrupt/` and recomputing it.
        #[arg(long)]
        no_recompute: bool,
        /// Where nodes are computed: `local` (this process) or `slurm` (one `sbatch` job per
        /// node running `pipe exec NODE_KEY`; the store and this binary must be on a file
        /// system the compute nodes share). With `slurm`, `-j` counts jobs in the queue at once
        /// (default 256) and `--gpus` does not apply.
        #[arg(long, value_enum, default_value_t = ExecutorArg::Local)]
        executor: ExecutorArg,
        /// An extra `sbatch` argument for every job, repeatable:
        /// `--sbatch-arg=--partition=gpu --sbatch-arg=--time=12:00:00`.
        #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
        sbatch_args: Vec<String>,
        /// Seconds between two `squeue` polls of a job.
        #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
        slurm_poll: f64,
        /// With `--executor slurm`: queue a job for every node that must run, each after the
        /// jobs of its inputs (`--dependency=afterok`), and exit without waiting. A later
        /// `pipe run --executor slurm` of the same pipeline waits for them and reports.
        #[arg(long)]
        detach: bool,
    },
    /// Compute one node of a `pipe run --executor slurm` in this process (what each Slurm job
    /// runs): the key names the job file the run wrote into the store.
    Exec {
        /// The node's full key (64 hex digits).
        key: String,
    },
    /// Show what a run would do, and why each node would run.
    Plan {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Plan only these stages or node ids.
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show nodes with status, key, seconds and metrics.
    Show {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// A stage id or node id (default: all).
        stage: Option<String>,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print the log of a stage's nodes (the failed attempt's log if it failed).
    Log {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// A stage id or node id.
        stage: String,
    },
    /// Remove every store entry that none of the given pipelines references.
    Gc {
        /// Pipelines whose nodes to keep (e.g. `pipelines/*.yaml`).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove the resumable work (training states, batch journals) of unfinished
        /// nodes that none of the pipelines has (without it, gc only reports their size).
        #[arg(long)]
        unfinished: bool,
    },
    /// Re-hash every entry in the store against its manifest.
    Verify {
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// What this binary can compute on: the CPU and, in a `cuda` build, each CUDA device.
    Devices {
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: the engine, the augmentation engine, dataset decoding (numbers for the notes).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

/// `pipe run --executor`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorArg {
    /// Worker threads of this process.
    Local,
    /// One Slurm job per node.
    Slurm,
}

/// What `pipe bench` times.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Planning a generated 1,000-node pipeline, and a fully cached `pipe run` of 200 stages.
    Engine {
        /// Nodes in the planning benchmark.
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Stages in the cached-run chain.
        #[arg(long, default_value_t = 200)]
        chain: usize,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 15)]
        reps: usize,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Views per second of the 16-view EMP generator (on all threads, then on one).
    Augment {
        /// Images per batch.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Views per image.
        #[arg(long, default_value_t = 16)]
        views: usize,
        /// Batches timed.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// ResNet-18 forward (eval), train step and PGD step on the CPU, at batch 64.
    Nn {
        /// ResNet widths to time (64 = the paper's).
        #[arg(long, value_delimiter = ',', default_values_t = [16, 64])]
        widths: Vec<usize>,
        /// Images per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Where to time: `cpu`, `cuda:N` or `auto` (`pipe devices` lists them).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Images/s of the pretraining modes (SimCLR, EMP-SSL x none, pgd, free; ACL, AIR x none,
    /// pgd), on the CPU unless `--device` says otherwise.
    Pretrain {
        /// ResNet widths (64 = the paper's).
        #[arg(long, value_delimiter = ',', default_values_t = [16, 64])]
        widths: Vec<usize>,
        /// Source images per batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Views per image for EMP-SSL.
        #[arg(long, default_value_t = 16)]
        views: usize,
        /// Timed batches per mode (after one warm-up batch; the median is reported).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Free replays m.
        #[arg(long, default_value_t = 3)]
        m: usize,
        /// Only these methods (`simclr`, `emp_ssl`, `acl`, `air`, `advcl`; default all; ACL / AIR / AdvCL have no `free`).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Only these attack modes (`none`, `pgd`, `free`; default all).
        #[arg(long, value_delimiter = ',')]
        attacks: Vec<String>,
        /// Where to train: `cpu`, `cuda:N` or `auto` (`pipe devices` lists them).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// One view of R-MAO's differentiable augmentation (the test-time defence's), forward and
    /// input gradient: batch-synchronous, per image batched, per image one at a time.
    Defense {
        /// Images per batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Timed repetitions per mode (after one warm-up; the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// `cpu`, `cuda:N` or `auto`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Seconds to evaluate 1,000 test images under l_inf PGD-20 (8/255, step 2/255, random
    /// start) through a ResNet-18 + 4096-d pre_feature + linear head, on the CPU.
    Evaluate {
        /// ResNet widths (64 = the paper's).
        #[arg(long, value_delimiter = ',', default_values_t = [16, 64])]
        widths: Vec<usize>,
        /// Test images per batch.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Test images evaluated (the time is also reported scaled to 1,000 images).
        #[arg(long, default_value_t = 1000)]
        images: usize,
        /// PGD steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Time to decode an ImageFolder archive (default: ../shared/data/cifar10-jpeg.tar.gz).
    Decode {
        /// The archive or folder.
        #[arg(default_value = "../shared/data/cifar10-jpeg.tar.gz")]
        path: PathBuf,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Print one JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    pipe_stages::tune::reexec_tuned();
    let cli = Cli::parse();
    // how CUDA computes f32 (PIPE_CUDA_MATH): the CUDA libraries read NVIDIA_TF32_OVERRIDE when
    // they load, so it is set here, before any thread starts; a bad value is refused
    match pipe_stages::device::CudaMath::from_env() {
        Ok(math) => {
            // SAFETY: single-threaded so far (nothing above starts a thread)
            #[allow(unsafe_code)]
            unsafe {
                math.apply_to_process()
            };
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    // PIPE_KERNELS is keyed (`candle`): a misspelt value would compute and key as `fast`
    if let Err(e) = pipe_stages::nn::conv::KernelImpl::check_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // `pipe plan FILE | head` ends quietly; a run keeps ignoring SIGPIPE so that a closed pipe
    // on its stdout does not kill it mid-node (its own signal handling stops it cleanly).
    if !matches!(cli.command, Command::Run { .. }) {
        signals::default_sigpipe();
    }
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match commands::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
