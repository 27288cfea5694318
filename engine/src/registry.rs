//! The registry of stage kinds: the only way the engine learns about stages.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::stage::{StageKind, Typed, TypedStage};

/// Stage kinds by name. Populated explicitly (`pipe_stages::register_all`), no link-time magic.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }
    /// Adds a kind (replacing one of the same name).
    pub fn register(&mut self, kind: impl StageKind) -> &mut Self {
        self.kinds.insert(kind.name(), Arc::new(kind));
        self
    }
    /// Adds a [`TypedStage`].
    pub fn register_typed<T: TypedStage>(&mut self) -> &mut Self {
        self.register(Typed::<T>::default())
    }
    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }
    /// Names of all kinds, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}
