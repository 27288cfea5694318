//! Planning: which nodes are cached, which must run and why. Pure: reads the store, writes nothing.
//!
//! "Cached" means "its `manifest.json` exists" (one stat per node, so planning stays instant);
//! files are not re-hashed here. `pipe run` re-hashes the entries it will read before running
//! anything ([`crate::integrity`]), and `pipe verify` re-hashes everything.
//!
//! A node is `Cached` when its entry is in the store. A missing node must run when it is a
//! target (a sink of the graph, or a node of a stage named on the command line) or when a node
//! that must run consumes it; otherwise it is `NotNeeded` (a gc'd intermediate under a cached
//! consumer is not recomputed).

use std::collections::BTreeSet;
use std::fmt;

use pipe_cache::{Key, Store};
use serde_json::Value;

use crate::graph::Graph;
use crate::record::RunRecord;

/// Why a node must run.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// No node of this id ran before.
    New,
    /// Params differ from the last run: `param: old -> new` lines.
    ParamsChanged(Vec<String>),
    /// Inputs differ from the last run (slots named).
    InputsChanged(Vec<String>),
    /// The kind's implementation version changed.
    VersionChanged {
        /// Last run's version.
        from: u32,
        /// Now.
        to: u32,
    },
    /// Same key as the last run, but not in the store (gc'd, failed, or interrupted).
    NotInStore,
    /// The last attempt failed.
    FailedBefore,
    /// Its entry was damaged (what is wrong, file by file) and has been moved aside
    /// ([`crate::integrity::check_inputs`]).
    Corrupt(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::New => write!(f, "new node"),
            Reason::ParamsChanged(d) => write!(f, "params changed: {}", d.join(", ")),
            Reason::InputsChanged(d) => write!(f, "inputs changed: {}", d.join(", ")),
            Reason::VersionChanged { from, to } => {
                write!(f, "kind version changed: {from} -> {to}")
            }
            Reason::NotInStore => write!(f, "not in the store (never finished, or removed)"),
            Reason::FailedBefore => write!(f, "failed last time"),
            Reason::Corrupt(what) => write!(f, "its entry was corrupt and was moved aside: {what}"),
        }
    }
}

/// A node's planned status.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// In the store.
    Cached,
    /// Must run.
    Run(Reason),
    /// Missing, but nothing that must run needs it.
    NotNeeded,
}

impl Status {
    /// `cached`, `to-run` or `not-needed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Run(_) => "to-run",
            Status::NotNeeded => "not-needed",
        }
    }
}

/// The graph with a status per node.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The expanded graph.
    pub graph: Graph,
    /// Status per node (same order as `graph.nodes`).
    pub status: Vec<Status>,
    /// Entries whose files were re-hashed against their manifests and found intact while
    /// preparing this run ([`crate::integrity::check_inputs`]); the executor does not hash them
    /// again before handing them to a stage. Empty after [`plan`].
    pub checked: BTreeSet<Key>,
}

fn diff_params(old: &Value, new: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let o = old.as_object().unwrap_or(&empty);
    let n = new.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| {
        v.map(crate::value::label)
            .unwrap_or_else(|| "(unset)".into())
    };
    keys.into_iter()
        .filter(|k| {
            o.get(*k).map(crate::value::canonical) != n.get(*k).map(crate::value::canonical)
        })
        .map(|k| format!("{k}: {} -> {}", show(o.get(k)), show(n.get(k))))
        .collect()
}

/// Plans `graph` against `store`. `targets`: stage ids or node ids to build (all sinks when empty).
///
/// # Errors
/// A target that names no stage or node.
pub fn plan(graph: Graph, store: &Store, targets: &[String]) -> Result<Plan, crate::Error> {
    let n = graph.nodes.len();
    let mut wanted = vec![false; n];
    if targets.is_empty() {
        for (i, users) in graph.consumers().iter().enumerate() {
            wanted[i] = users.is_empty();
        }
    } else {
        for t in targets {
            let sel = graph.select(t);
            if sel.is_empty() {
                return Err(crate::Error::Usage(format!(
                    "no stage or node `{t}` in {}",
                    graph.pipeline.file.display()
                )));
            }
            for i in sel {
                wanted[i] = true;
            }
        }
    }
    let cached: Vec<bool> = graph
        .nodes
        .iter()
        .map(|node| store.contains(node.key.key()))
        .collect();
    // reverse topological: a missing node runs if wanted or needed by a node that runs
    let mut runs = vec![false; n];
    for i in (0..n).rev() {
        if !cached[i] && wanted[i] {
            runs[i] = true;
        }
        if runs[i] {
            for ins in graph.nodes[i].inputs.values() {
                for &j in ins {
                    if !cached[j] {
                        runs[j] = true;
                    }
                }
            }
        }
    }
    let record = RunRecord::load(store, &graph.pipeline.file);
    let status = (0..n)
        .map(|i| {
            if cached[i] {
                return Status::Cached;
            }
            if !runs[i] {
                return Status::NotNeeded;
            }
            let node = &graph.nodes[i];
            let Some(old) = node.ids().find_map(|id| record.nodes.get(id)) else {
                return Status::Run(Reason::New);
            };
            if old.key == node.key {
                return Status::Run(if store.failed_log(node.key.key()).is_some() {
                    Reason::FailedBefore
                } else {
                    Reason::NotInStore
                });
            }
            if old.version != node.version {
                return Status::Run(Reason::VersionChanged {
                    from: old.version,
                    to: node.version,
                });
            }
            let d = diff_params(&old.params, &node.params);
            if !d.is_empty() {
                return Status::Run(Reason::ParamsChanged(d));
            }
            let changed: Vec<String> = node
                .inputs
                .iter()
                .filter(|(slot, ins)| {
                    let now: Vec<&str> = ins.iter().map(|&j| graph.nodes[j].id.as_str()).collect();
                    let then: Vec<&str> = old
                        .inputs
                        .get(*slot)
                        .map(|v| v.iter().map(String::as_str).collect())
                        .unwrap_or_default();
                    now != then || ins.iter().any(|&j| status_changed(&graph, &record, j))
                })
                .map(|(slot, _)| slot.clone())
                .collect();
            Status::Run(Reason::InputsChanged(if changed.is_empty() {
                vec!["(upstream keys)".into()]
            } else {
                changed
            }))
        })
        .collect();
    Ok(Plan {
        graph,
        status,
        checked: BTreeSet::new(),
    })
}

fn status_changed(graph: &Graph, record: &RunRecord, j: usize) -> bool {
    let n = &graph.nodes[j];
    n.ids()
        .find_map(|id| record.nodes.get(id))
        .is_none_or(|r| r.key != n.key)
}

impl Plan {
    /// Number of nodes with each status: (cached, to-run, not-needed).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for s in &self.status {
            match s {
                Status::Cached => c.0 += 1,
                Status::Run(_) => c.1 += 1,
                Status::NotNeeded => c.2 += 1,
            }
        }
        c
    }
}
