//! End-to-end tests of the `pipe` binary: each module drives `env!("CARGO_BIN_EXE_pipe")` on
//! pipelines of `shell` stages written into a temporary work dir with its own store.

mod util;

mod caching;
mod cli;
mod concurrency;
mod corruption;
mod crash;
mod errors;
mod failures;
mod gc;
mod pretrain;
mod report;
mod security;
mod slurm;
mod spec_fuzz;
mod storage;
