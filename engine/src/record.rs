//! Run records: what the last `pipe run` of a pipeline file resolved each node id to, kept in
//! the store (`runs/<hash of the file's path>.json`), so `pipe plan` can say *why* a node must
//! run (a param changed, an input changed, the kind's version changed) as cargo's fingerprints do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pipe_cache::Store;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::graph::Graph;
use crate::key::NodeKey;

/// One node as the last run saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    /// Its key.
    pub key: NodeKey,
    /// Kind name.
    pub kind: String,
    /// Kind version.
    pub version: u32,
    /// Resolved params.
    pub params: Value,
    /// Slot -> ids of its inputs.
    pub inputs: BTreeMap<String, Vec<String>>,
}

/// The record of one pipeline file's last run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// The pipeline file (as given; informational).
    pub file: PathBuf,
    /// Node id (and alias) -> record.
    pub nodes: BTreeMap<String, NodeRecord>,
}

fn record_path(store: &Store, file: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let h = blake3::hash(abs.to_string_lossy().as_bytes());
    store.runs_dir().join(format!("{}.json", &h.to_hex()[..16]))
}

impl RunRecord {
    /// The record of `graph` as planned now.
    pub fn of(graph: &Graph) -> RunRecord {
        let mut nodes = BTreeMap::new();
        for n in &graph.nodes {
            let inputs = n
                .inputs
                .iter()
                .map(|(s, ins)| {
                    (
                        s.clone(),
                        ins.iter().map(|&i| graph.nodes[i].id.clone()).collect(),
                    )
                })
                .collect();
            let rec = NodeRecord {
                key: n.key,
                kind: n.kind.clone(),
                version: n.version,
                params: n.params.clone(),
                inputs,
            };
            for id in n.ids() {
                nodes.insert(id.to_string(), rec.clone());
            }
        }
        RunRecord {
            file: graph.pipeline.file.clone(),
            nodes,
        }
    }

    /// The last record of `file` in `store` (empty when none or unreadable: it only explains).
    pub fn load(store: &Store, file: &Path) -> RunRecord {
        std::fs::read(record_path(store, file))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Saves atomically.
    ///
    /// # Errors
    /// When the store cannot be written.
    pub fn save(&self, store: &Store) -> pipe_cache::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        pipe_cache::write_atomic(&record_path(store, &self.file), &bytes)
    }
}
