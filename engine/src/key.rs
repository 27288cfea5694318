//! Node keys: what goes into the content hash of a node, and what never does.
//!
//! A node's key is `blake3::Hasher::new_derive_key("pipe node key v1")` over the canonical JSON of
//! [`KeyPreimage`]:
//!
//! | In the key | Never in the key |
//! |---|---|
//! | [`KEY_SCHEMA`] | the node id or stage id (renaming must not invalidate) |
//! | the kind's name and its implementation `version` | absolute paths, mtimes |
//! | the **resolved** params: after `defaults:`, variants, sweep point and `--set`, deserialized through the kind's typed params (so a defaulted value and the same value written out agree, and `1` equals `1.0`), then canonicalized (sorted keys, integral floats as integers) | thread count, `-j`, GPU ordinal, log level |
//! | every input slot -> the keys of its artifacts, slots sorted, artifacts in gather order | host name, timestamps, pipe's own version |
//! | external files a kind reads -> their blake3, by path relative to the pipeline | |
//!
//! Params that change results (seed, device backend, dtype) are params, so they are keyed.
//! Canonical JSON is serde_json without `preserve_order`: objects are `BTreeMap`s, so sorted. NaN
//! and inf never reach here (spec validation rejects them). When this encoding changes, bump
//! [`KEY_SCHEMA`] and the pinned-key tests in the same commit.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use pipe_cache::Key;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::value::canonical;

/// Version of the key encoding.
pub const KEY_SCHEMA: u32 = 1;

/// The content key of a node; built only by [`KeyPreimage::finish`] or parsed from text.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeKey(pub Key);

impl NodeKey {
    /// First 12 hex digits, for display.
    pub fn short(&self) -> String {
        self.0.short()
    }
    /// The store key.
    pub fn key(&self) -> &Key {
        &self.0
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.0.short())
    }
}

impl FromStr for NodeKey {
    type Err = pipe_cache::StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Key::from_str(s).map(NodeKey)
    }
}

/// Everything that determines a node's result.
#[derive(Serialize)]
pub struct KeyPreimage<'a> {
    /// [`KEY_SCHEMA`].
    pub schema: u32,
    /// Kind name.
    pub kind: &'a str,
    /// Kind implementation version.
    pub version: u32,
    /// Resolved params (canonicalized by [`KeyPreimage::finish`]).
    pub params: &'a Value,
    /// Slot -> input keys.
    pub inputs: BTreeMap<&'a str, Vec<NodeKey>>,
    /// Relative path -> blake3 of external files.
    pub external: BTreeMap<String, String>,
}

impl KeyPreimage<'_> {
    /// The canonical bytes that are hashed.
    pub fn canonical_json(&self) -> Vec<u8> {
        let v = serde_json::json!({
            "schema": self.schema,
            "kind": self.kind,
            "version": self.version,
            "params": canonical(self.params),
            "inputs": self.inputs,
            "external": self.external,
        });
        // serde_json::Value serialization cannot fail (no non-string keys, no NaN).
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Hashes the preimage into a key.
    pub fn finish(&self) -> NodeKey {
        let mut h = blake3::Hasher::new_derive_key("pipe node key v1");
        h.update(&self.canonical_json());
        NodeKey(Key::from_hash(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(params: &Value, inputs: BTreeMap<&str, Vec<NodeKey>>) -> NodeKey {
        KeyPreimage {
            schema: KEY_SCHEMA,
            kind: "echo",
            version: 1,
            params,
            inputs,
            external: BTreeMap::new(),
        }
        .finish()
    }

    #[test]
    fn pinned_key() {
        // If this changes, the key encoding changed: bump KEY_SCHEMA. Computed independently:
        // import blake3, json
        // d = {"external": {}, "inputs": {}, "kind": "echo", "params": {"n": 3, "text": "hi"},
        //      "schema": 1, "version": 1}
        // s = json.dumps(d, separators=(",", ":"), sort_keys=True)
        // blake3.blake3(s.encode(), derive_key_context="pipe node key v1").hexdigest()
        let k = key(&json!({"text": "hi", "n": 3}), BTreeMap::new());
        assert_eq!(
            k.to_string(),
            "cc636a20b2c19527777c7344da87436fc384b9bd3958bcdc3a6fd6be1b9013d6"
        );
    }

    #[test]
    fn order_and_number_spelling_do_not_matter() {
        let a = key(&json!({"text": "hi", "lr": 1.0}), BTreeMap::new());
        let b = key(
            &serde_json::from_str(r#"{"lr": 1, "text": "hi"}"#).expect("json"),
            BTreeMap::new(),
        );
        assert_eq!(a, b);
        let c = key(&json!({"text": "hi", "lr": 1.5}), BTreeMap::new());
        assert_ne!(a, c);
    }

    #[test]
    fn inputs_change_the_key() {
        let up = key(&json!({"text": "up"}), BTreeMap::new());
        let up2 = key(&json!({"text": "up2"}), BTreeMap::new());
        let p = json!({"text": "down"});
        let a = key(&p, BTreeMap::from([("x", vec![up])]));
        let b = key(&p, BTreeMap::from([("x", vec![up2])]));
        let c = key(&p, BTreeMap::from([("y", vec![up])]));
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
