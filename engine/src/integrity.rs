//! Integrity of what a run reads: before any stage starts, the committed entries a plan will
//! hand to stages are re-hashed (blake3, every file) against their manifests.
//!
//! A committed entry is never modified by pipe, but a disk, a stray `sed -i` or a hand copy can
//! change it. Planning only stats `manifest.json` (cheap, so `pipe plan` stays instant), so
//! [`check_inputs`] is where damage is caught: every `Cached` node that some `to-run` node
//! consumes is verified with [`Store::verify`]. What happens to a damaged one depends on
//! [`OnCorrupt`]:
//!
//! - [`OnCorrupt::Recompute`] (the default of `pipe run`): the entry is moved aside into the
//!   store's `corrupt/<key>.<n>` ([`Store::quarantine`], which re-checks under the key lock), a
//!   warning names the entry and the file, and the plan is made again: the node is now missing,
//!   so it runs in this same run (reason [`Reason::Corrupt`]), and the entries *it* reads are
//!   checked in turn, until nothing new turns up.
//! - [`OnCorrupt::Fail`] (`pipe run --no-recompute`): nothing is moved and nothing runs; the
//!   error names every damaged entry and file.
//!
//! Keys checked here are recorded in [`Plan::checked`]; the executor re-hashes any other input
//! (an entry another `pipe run` committed meanwhile) right before handing it to a stage, so no
//! stage is ever given bytes that differ from its input's manifest. A full hash is cheap next to
//! training (blake3 runs at several GB/s); no stat-keyed shortcut is taken, since an in-place
//! edit can keep size and mtime.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use pipe_cache::{Key, Store, VerifyProblem};

use crate::error::Error;
use crate::plan::{Plan, Reason, Status};

/// What [`check_inputs`] does with a damaged entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnCorrupt {
    /// Move it aside into `corrupt/` and recompute it in this run.
    #[default]
    Recompute,
    /// Fail before anything runs, naming the entry and the file.
    Fail,
}

/// A damaged entry found by [`check_inputs`].
#[derive(Clone, Debug, PartialEq)]
pub struct Corruption {
    /// Display id of the node the entry belongs to.
    pub node: String,
    /// The entry's key.
    pub key: Key,
    /// What is wrong (each names the file when it concerns one).
    pub problems: Vec<VerifyProblem>,
    /// Where it was moved (`corrupt/<key>.<n>`); `None` with [`OnCorrupt::Fail`].
    pub moved_to: Option<PathBuf>,
}

impl Corruption {
    /// The problems as one line: `file a.bin has blake3 …, manifest says …; …`.
    pub fn summary(&self) -> String {
        let hex = self.key.to_string();
        self.problems
            .iter()
            .map(|p| {
                let text = p.to_string();
                // the key is said once, in front
                text.strip_prefix(&format!("entry {hex}: "))
                    .map(str::to_string)
                    .unwrap_or(text)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "entry {} of node {} is corrupt: {}",
            self.key,
            self.node,
            self.summary()
        )?;
        if let Some(p) = &self.moved_to {
            write!(f, " (moved to {})", p.display())?;
        }
        Ok(())
    }
}

/// Re-hashes every cached entry that a `to-run` node of `plan` reads, and deals with damaged
/// ones as `on_corrupt` says (see the module docs). `targets` are the run's targets, used to plan
/// again after an entry was moved aside. Returns the plan to run (re-made if anything was moved
/// aside; keys found intact are in its [`Plan::checked`]) and the damaged entries that were
/// moved aside (each also logged as a warning).
///
/// # Errors
/// [`Error::Corrupt`] with [`OnCorrupt::Fail`] and at least one damaged entry; store errors
/// (a quarantine that cannot rename, [`pipe_cache::StoreError::Cancelled`] when `cancelled()`
/// turns true while waiting for a key lock); errors of [`crate::plan::plan`].
pub fn check_inputs(
    mut plan: Plan,
    store: &Store,
    targets: &[String],
    on_corrupt: OnCorrupt,
    cancelled: &dyn Fn() -> bool,
) -> Result<(Plan, Vec<Corruption>), Error> {
    let mut found = Vec::new();
    // key -> why its node must run now (its entry was moved aside), kept across re-plans
    let mut reasons: BTreeMap<Key, Reason> = BTreeMap::new();
    loop {
        let to_check = unchecked_inputs(&plan);
        if to_check.is_empty() {
            return Ok((plan, found));
        }
        let keys: Vec<Key> = to_check.keys().copied().collect();
        let mut by_key: BTreeMap<Key, Vec<VerifyProblem>> = BTreeMap::new();
        for p in store.verify(Some(&keys))? {
            by_key.entry(*p.key()).or_default().push(p);
        }
        plan.checked
            .extend(keys.iter().filter(|k| !by_key.contains_key(k)).copied());
        if by_key.is_empty() {
            return Ok((plan, found));
        }
        let damaged: Vec<Corruption> = by_key
            .into_iter()
            .map(|(key, problems)| Corruption {
                node: to_check[&key].clone(),
                key,
                problems,
                moved_to: None,
            })
            .collect();
        if on_corrupt == OnCorrupt::Fail {
            return Err(Error::Corrupt(damaged));
        }
        for mut c in damaged {
            match store.quarantine(&c.key, cancelled)? {
                Some(path) => {
                    c.moved_to = Some(path);
                    tracing::warn!("{c}; recomputing it");
                    reasons.insert(c.key, Reason::Corrupt(c.summary()));
                    found.push(c);
                }
                // intact again (another run replaced it) or gone (another run moved it aside:
                // the new plan runs it)
                None => {
                    plan.checked.insert(c.key);
                }
            }
        }
        let checked = plan.checked;
        plan = crate::plan::plan(plan.graph, store, targets)?;
        plan.checked = checked;
        for (i, node) in plan.graph.nodes.iter().enumerate() {
            if let (Status::Run(_), Some(r)) = (&plan.status[i], reasons.get(node.key.key())) {
                plan.status[i] = Status::Run(r.clone());
            }
        }
    }
}

/// Keys (with the id of their node) of the cached inputs of to-run nodes not checked yet.
fn unchecked_inputs(plan: &Plan) -> BTreeMap<Key, String> {
    let nodes = &plan.graph.nodes;
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (i, node) in nodes.iter().enumerate() {
        if !matches!(plan.status[i], Status::Run(_)) {
            continue;
        }
        for &j in node.inputs.values().flatten() {
            let key = *nodes[j].key.key();
            if plan.status[j] == Status::Cached && !plan.checked.contains(&key) && seen.insert(j) {
                out.insert(key, nodes[j].id.clone());
            }
        }
    }
    out
}

/// Keys whose files were found intact during this run, shared by the executor's workers (a
/// sweep's many nodes that read one big model hash it once).
#[derive(Debug, Default)]
pub(crate) struct Intact(std::sync::Mutex<BTreeSet<Key>>);

impl Intact {
    /// Seeded with the keys [`check_inputs`] verified.
    pub(crate) fn new(checked: &BTreeSet<Key>) -> Intact {
        Intact(std::sync::Mutex::new(checked.clone()))
    }

    /// Records `key` as intact (an entry this run just committed, hashed at commit).
    pub(crate) fn insert(&self, key: Key) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key);
    }

    /// Forgets that `key` was found intact: the next [`Intact::ensure`] re-hashes it.
    pub(crate) fn forget(&self, key: &Key) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    fn contains(&self, key: &Key) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(key)
    }

    /// Re-hashes the entry `key` unless it is known intact, and records it when it is.
    ///
    /// # Errors
    /// The problems found, as one line naming the entry and each file, or a store error as
    /// text.
    pub(crate) fn ensure(&self, store: &Store, key: &Key) -> Result<(), String> {
        if self.contains(key) {
            return Ok(());
        }
        let problems = store.verify(Some(&[*key])).map_err(|e| e.to_string())?;
        if problems.is_empty() {
            self.insert(*key);
            return Ok(());
        }
        Err(problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "))
    }
}
