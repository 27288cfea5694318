//! Sweep expansion: a validated [`Pipeline`] becomes a [`Graph`] of keyed nodes.
//!
//! Every stage has instances, one per point of its own grid (variants x sweep) times each
//! compatible combination of its inputs' instances. An instance remembers its coordinates (the
//! axis values that led to it, its own and inherited); two instances are compatible when they
//! agree on every axis they share. So a consumer fans out with its inputs (broadcast), two
//! inputs that descend from one sweep stay aligned (a natural join), a `stage[*]` source
//! gathers every compatible instance instead of fanning out (how a report collects its rows),
//! and a `stage[variant]` source fans out over that variant's instances only.
//!
//! Instances are keyed in topological order ([`crate::key`]); instances with equal keys are one
//! node (the first id names it, the others are aliases). Sweep points that a kind's
//! normalization makes identical therefore collapse, and so does everything downstream of them.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::key::{KEY_SCHEMA, KeyPreimage, NodeKey};
use crate::registry::Registry;
use crate::spec::{Coord, Pipeline, StageSpec};
use crate::stage::Resources;

/// A unique unit of work: one key.
#[derive(Clone, Debug)]
pub struct Node {
    /// Content key.
    pub key: NodeKey,
    /// Kind name.
    pub kind: String,
    /// Kind implementation version.
    pub version: u32,
    /// Display id of the first instance (`pretrain[m=3,crops=16]`).
    pub id: String,
    /// Ids of other instances that resolved to the same key.
    pub aliases: Vec<String>,
    /// Stage ids this node is an instance of.
    pub stages: Vec<String>,
    /// Resolved params.
    pub params: Value,
    /// External name -> content hash (keyed).
    pub external: BTreeMap<String, String>,
    /// Slot -> indices of input nodes (into [`Graph::nodes`]).
    pub inputs: BTreeMap<String, Vec<usize>>,
    /// Resources it claims.
    pub resources: Resources,
    /// Files the kind declares it writes.
    pub outputs: Vec<String>,
}

impl Node {
    /// All ids of the node: its id then its aliases.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// One instance of a stage.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Display id.
    pub id: String,
    /// Coordinates (inherited first, then the stage's own).
    pub coords: Vec<Coord>,
    /// Index of its node.
    pub node: usize,
}

/// The expanded pipeline.
#[derive(Clone, Debug)]
pub struct Graph {
    /// The pipeline it came from.
    pub pipeline: Pipeline,
    /// Unique nodes in topological order.
    pub nodes: Vec<Node>,
    /// Stage id -> its instances, in expansion order.
    pub instances: BTreeMap<String, Vec<Instance>>,
}

fn compatible(a: &[Coord], b: &[Coord]) -> bool {
    b.iter()
        .all(|(axis, v)| a.iter().all(|(ax, w)| ax != axis || v == w))
}

fn merge(a: &[Coord], b: &[Coord]) -> Vec<Coord> {
    let mut out = a.to_vec();
    for c in b {
        if !out.iter().any(|(ax, _)| ax == &c.0) {
            out.push(c.clone());
        }
    }
    out
}

fn display_id(stage: &str, coords: &[Coord]) -> String {
    if coords.is_empty() {
        return stage.to_string();
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (axis, _) in coords {
        *names
            .entry(axis.param.as_deref().unwrap_or(""))
            .or_default() += 1;
    }
    let parts: Vec<String> = coords
        .iter()
        .map(|(axis, v)| match &axis.param {
            Some(p) if names.get(p.as_str()) == Some(&1) => format!("{p}={v}"),
            Some(p) => format!("{}.{p}={v}", axis.stage),
            None if names.get("") == Some(&1) => v.clone(),
            None => format!("{}={v}", axis.stage),
        })
        .collect();
    format!("{stage}[{}]", parts.join(","))
}

/// Where [`count_instances`] passed its limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooMany {
    /// The stage whose instances passed the limit.
    pub stage: String,
    /// Points of its own grid.
    pub grid: usize,
    /// Instances of the stages before it (topological order).
    pub before: usize,
}

/// Counts the instances [`build`] would make of `stages` (in topological order), stopping as
/// soon as the count passes `limit`. It follows the same fan-out and join rules on the
/// coordinates alone, so it neither keys nor clones params.
///
/// # Errors
/// [`TooMany`] naming the stage at which the count passed `limit`.
pub fn count_instances(stages: &[StageSpec], limit: usize) -> Result<usize, TooMany> {
    let mut instances: BTreeMap<&str, Vec<Vec<Coord>>> = BTreeMap::new();
    let mut total = 0usize;
    for stage in stages {
        let over = || TooMany {
            stage: stage.id.clone(),
            grid: stage.grid.len(),
            before: total,
        };
        let room = limit.saturating_sub(total);
        let per_combo = stage.grid.len().max(1);
        let mut combos: Vec<Vec<Coord>> = vec![Vec::new()];
        for src in stage
            .inputs
            .iter()
            .flat_map(|(_, s)| s)
            .filter(|s| !s.gather)
        {
            let ups = instances
                .get(src.stage.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let mut next = Vec::new();
            for coords in &combos {
                for up in ups {
                    if src.selects(up) && compatible(coords, up) {
                        next.push(merge(coords, up));
                        if next.len().saturating_mul(per_combo) > room {
                            return Err(over());
                        }
                    }
                }
            }
            combos = next;
        }
        if combos.len().saturating_mul(per_combo) > room {
            return Err(over());
        }
        let mut out = Vec::with_capacity(combos.len() * stage.grid.len());
        for coords in &combos {
            for point in &stage.grid {
                out.push(merge(coords, &point.coords));
            }
        }
        total += out.len();
        instances.insert(stage.id.as_str(), out);
    }
    Ok(total)
}

/// Expands sweeps and keys every node.
pub fn build(pipeline: Pipeline, registry: &Registry) -> Graph {
    let mut nodes: Vec<Node> = Vec::new();
    let mut by_key: HashMap<NodeKey, usize> = HashMap::new();
    let mut instances: BTreeMap<String, Vec<Instance>> = BTreeMap::new();

    for stage in &pipeline.stages {
        let Some(kind) = registry.get(&stage.kind) else {
            continue;
        };
        // 1. fan out over non-gathered sources: (coords, chosen instance per (slot, source))
        type Combo = (Vec<Coord>, Vec<Option<usize>>);
        let flat: Vec<(&str, &crate::spec::Source)> = stage
            .inputs
            .iter()
            .flat_map(|(slot, srcs)| srcs.iter().map(move |s| (slot.as_str(), s)))
            .collect();
        let mut combos: Vec<Combo> = vec![(Vec::new(), vec![None; flat.len()])];
        for (i, (_, src)) in flat.iter().enumerate() {
            if src.gather {
                continue;
            }
            let ups = instances.get(&src.stage).map(Vec::as_slice).unwrap_or(&[]);
            let mut next = Vec::with_capacity(combos.len() * ups.len().max(1));
            for (coords, chosen) in &combos {
                for up in ups {
                    if src.selects(&up.coords) && compatible(coords, &up.coords) {
                        let mut c = chosen.clone();
                        c[i] = Some(up.node);
                        next.push((merge(coords, &up.coords), c));
                    }
                }
            }
            combos = next;
        }
        // 2. per combo, fill slots in written order (gathers take every compatible instance)
        let mut out_instances = Vec::new();
        for (coords, chosen) in &combos {
            let mut slots: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, (slot, src)) in flat.iter().enumerate() {
                let list = slots.entry((*slot).to_string()).or_default();
                if src.gather {
                    for up in instances.get(&src.stage).map(Vec::as_slice).unwrap_or(&[]) {
                        if compatible(coords, &up.coords) && !list.contains(&up.node) {
                            list.push(up.node);
                        }
                    }
                } else if let Some(n) = chosen[i] {
                    list.push(n);
                }
            }
            for point in &stage.grid {
                let all = merge(coords, &point.coords);
                let id = display_id(&stage.id, &all);
                let input_keys: BTreeMap<&str, Vec<NodeKey>> = slots
                    .iter()
                    .map(|(s, ns)| (s.as_str(), ns.iter().map(|&n| nodes[n].key).collect()))
                    .collect();
                let key = KeyPreimage {
                    schema: KEY_SCHEMA,
                    kind: kind.name(),
                    version: kind.version(),
                    params: &point.key_params,
                    inputs: input_keys,
                    external: point.external.clone(),
                }
                .finish();
                let idx = match by_key.get(&key) {
                    Some(&idx) => {
                        let n = &mut nodes[idx];
                        if n.id != id && !n.aliases.contains(&id) {
                            n.aliases.push(id.clone());
                        }
                        if !n.stages.contains(&stage.id) {
                            n.stages.push(stage.id.clone());
                        }
                        idx
                    }
                    None => {
                        nodes.push(Node {
                            key,
                            kind: stage.kind.clone(),
                            version: kind.version(),
                            id: id.clone(),
                            aliases: Vec::new(),
                            stages: vec![stage.id.clone()],
                            params: point.params.clone(),
                            external: point.external.clone(),
                            inputs: slots.clone(),
                            resources: kind.resources(&point.params),
                            outputs: kind.outputs(&point.params),
                        });
                        by_key.insert(key, nodes.len() - 1);
                        nodes.len() - 1
                    }
                };
                out_instances.push(Instance {
                    id,
                    coords: all,
                    node: idx,
                });
            }
        }
        instances.insert(stage.id.clone(), out_instances);
    }
    Graph {
        pipeline,
        nodes,
        instances,
    }
}

impl Graph {
    /// Index of the node whose id or alias is `id`.
    pub fn find(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.ids().any(|i| i == id))
    }

    /// Nodes of a stage id (all its instances), or the node with that exact id.
    pub fn select(&self, name: &str) -> Vec<usize> {
        if let Some(inst) = self.instances.get(name) {
            let mut v: Vec<usize> = inst.iter().map(|i| i.node).collect();
            v.sort_unstable();
            v.dedup();
            return v;
        }
        self.find(name).into_iter().collect()
    }

    /// Indices of the nodes that consume each node.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut users = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for ins in n.inputs.values() {
                for &j in ins {
                    if !users[j].contains(&i) {
                        users[j].push(i);
                    }
                }
            }
        }
        users
    }
}
