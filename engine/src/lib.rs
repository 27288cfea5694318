//! pipe-engine: YAML pipelines -> validated specs -> content-keyed DAG -> plan -> parallel run.
//!
//! # Brief overview
//!
//! - [`spec::load`] reads a pipeline file into a [`Pipeline`], collecting every problem as a
//!   [`SpecError`] (file, line, YAML path, what was expected). Each stage's own grid (variants x
//!   sweep) is resolved and normalized by its kind here.
//! - [`graph::build`] expands sweeps across the DAG (fan-out, joins, `stage[*]` gathers) into a
//!   [`Graph`] of unique nodes, each with a [`NodeKey`] ([`key`] documents what is hashed).
//! - [`plan::plan`] marks each node cached / to-run (with a [`Reason`]) / not-needed.
//! - [`integrity::check_inputs`] re-hashes the cached entries the plan will read; a damaged one
//!   is moved aside and recomputed (or the run refuses to start).
//! - [`exec::run`] runs what must run on worker threads, committing each node into the
//!   [`pipe_cache::Store`], and reports [`Event`]s to an [`Observer`].
//!
//! The engine knows stages only through the [`Registry`] of [`StageKind`]s; it has no ML and
//! no terminal I/O.
//!
//! ```
//! use pipe_engine::{Overrides, Registry, spec, graph, plan};
//! let mut reg = Registry::new();
//! pipe_engine::testing::register(&mut reg);
//! let yaml = "stages:\n  a: {kind: echo, params: {text: hi}, sweep: {n: [1, 2]}}\n  b: {kind: echo, inputs: {x: a}}\n";
//! let p = spec::parse(yaml, "p.yaml".as_ref(), &reg, &Overrides::default()).expect("valid");
//! let g = graph::build(p, &reg);
//! let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
//! assert_eq!(ids, ["a[n=1]", "a[n=2]", "b[n=1]", "b[n=2]"]);
//! ```
#![forbid(unsafe_code)]

pub mod error;
pub mod exec;
pub mod graph;
pub mod integrity;
pub mod key;
pub mod plan;
pub mod record;
pub mod registry;
pub mod slurm;
pub mod spec;
pub mod stage;
pub mod statcache;
pub mod suggest;
pub mod testing;
pub mod value;

pub use error::{BoxError, Error, ParamError, Result, SpecError, SpecErrors};
pub use exec::{Event, Executor, NodeResult, Observer, Outcome, Quiet, RunOptions, Summary};
pub use graph::{Graph, Node};
pub use integrity::{Corruption, OnCorrupt};
pub use key::NodeKey;
pub use plan::{Plan, Reason, Status};
pub use registry::Registry;
pub use spec::{Overrides, Pipeline};
pub use stage::{
    Artifact, External, NormalizeCtx, Resources, Slot, Slots, StageCtx, StageEvent, StageKind,
    Typed, TypedStage,
};
pub use statcache::StatCache;
