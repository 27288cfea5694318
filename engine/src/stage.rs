//! The stage interface: [`StageKind`] (what the engine calls), [`TypedStage`] (what stage
//! authors implement, with typed params) and [`StageCtx`] (what a running stage sees).
//!
//! A stage knows nothing of the DAG: it gets its resolved params, its input artifacts and an
//! empty staging folder, and fills it. The engine hashes, commits and caches what it wrote.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{BoxError, ParamError};
use crate::key::NodeKey;

/// A committed store entry handed to a stage as an input.
pub type Artifact = pipe_cache::Entry;

/// One named input slot of a kind.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Slot name as written under `inputs:`.
    pub name: &'static str,
    /// Whether the pipeline must connect it.
    pub required: bool,
    /// Whether it takes several artifacts (`stage[*]` or a list).
    pub many: bool,
}

impl Slot {
    /// A slot the pipeline must connect, to one artifact.
    pub const fn required(name: &'static str) -> Slot {
        Slot {
            name,
            required: true,
            many: false,
        }
    }
    /// A slot the pipeline may leave out.
    pub const fn optional(name: &'static str) -> Slot {
        Slot {
            name,
            required: false,
            many: false,
        }
    }
    /// This slot, taking several artifacts.
    pub const fn many(self) -> Slot {
        Slot { many: true, ..self }
    }
}

/// The input slots a kind accepts.
#[derive(Clone, Copy, Debug)]
pub enum Slots {
    /// Exactly these slots.
    Fixed(&'static [Slot]),
    /// Any slot names (the `shell` kind); each may take one or many artifacts.
    Any,
}

/// Scheduler resources a node claims while it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// Holds one GPU exclusively.
    pub gpu: bool,
}

/// What a kind may use while normalizing params at plan time.
#[derive(Clone, Copy, Debug)]
pub struct NormalizeCtx<'a> {
    /// Folder of the pipeline file: relative paths in params are relative to it.
    pub pipeline_dir: &'a Path,
}

/// A file or folder outside the store that a node reads (a dataset archive). Its content hash
/// goes into the node's key under `name`, so the key follows the content, not the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    /// Logical name in the key (and the param the path came from, for error messages).
    pub name: String,
    /// Resolved path.
    pub path: PathBuf,
}

/// A stage kind as the engine sees it. Implement [`TypedStage`] instead and register
/// `Typed<YourStage>`; this trait is object-safe so the [`Registry`](crate::Registry) can hold any.
pub trait StageKind: Send + Sync + 'static {
    /// Kind name as written in `kind:` (`pretrain`).
    fn name(&self) -> &'static str;
    /// Implementation version: bump it when the kind's results change, so old entries are not reused.
    fn version(&self) -> u32;
    /// Input slots.
    fn inputs(&self) -> Slots;
    /// Deserializes params into the kind's typed params (defaults filled, unknown fields
    /// rejected, ranges checked) and re-serializes them: the resolved params that are keyed.
    fn normalize(&self, params: Value, ctx: &NormalizeCtx<'_>) -> Result<Value, Vec<ParamError>>;
    /// Which optional inputs normalized `params` need or ignore, given the connected slots
    /// (see [`TypedStage::check_inputs`]).
    fn check_inputs(&self, _params: &Value, _connected: &[&str]) -> Vec<ParamError> {
        Vec::new()
    }
    /// External files the node reads (hashed into its key).
    fn externals(&self, params: &Value) -> Vec<External>;
    /// The part of the normalized params that is keyed (paths of externals are left out:
    /// their content is keyed instead).
    fn key_params(&self, params: &Value) -> Value;
    /// Files the stage must have written (checked before commit).
    fn outputs(&self, params: &Value) -> Vec<String>;
    /// Resources a node of this kind claims.
    fn resources(&self, params: &Value) -> Resources;
    /// Runs the stage with normalized params.
    fn run(&self, params: &Value, ctx: &mut StageCtx<'_>) -> Result<(), BoxError>;
    /// A hint added to a failure of a node with normalized `params` whose message (the error
    /// with its causes) is `message`: what to change (see [`TypedStage::explain_failure`]).
    fn explain_failure(&self, _params: &Value, _message: &str) -> Option<String> {
        None
    }
    /// Whether the stage runs code that could write into its input entries (see
    /// [`TypedStage::runs_user_code`]).
    fn runs_user_code(&self) -> bool {
        false
    }
}

/// What a stage author implements: typed params with serde defaults and
/// `deny_unknown_fields`; [`Typed`] adapts it to [`StageKind`].
pub trait TypedStage: Send + Sync + 'static {
    /// Kind name.
    const KIND: &'static str;
    /// Implementation version (bump when results change).
    const VERSION: u32;
    /// Typed params; `Deserialize` fills defaults and rejects unknown fields.
    type Params: Serialize + DeserializeOwned;
    /// Input slots.
    fn inputs() -> Slots;
    /// Range checks beyond what the types say (`epochs >= 1`).
    fn check(_params: &Self::Params) -> Vec<ParamError> {
        Vec::new()
    }
    /// Plan-time checks of which optional inputs the params need or ignore, given the slots
    /// the pipeline connects (`connected`): an error's `path` is `inputs` (a missing slot)
    /// or `inputs.<slot>` (a slot these params do not read). Default: none.
    fn check_inputs(_params: &Self::Params, _connected: &[&str]) -> Vec<ParamError> {
        Vec::new()
    }
    /// Resolves params at plan time (environment variables, paths relative to the pipeline
    /// file) and drops or rewrites params that do not change results (`m` when there is no
    /// free-adversarial training), so equivalent sweep points share one node.
    fn canonicalize(
        params: Self::Params,
        _ctx: &NormalizeCtx<'_>,
    ) -> Result<Self::Params, Vec<ParamError>> {
        Ok(params)
    }
    /// External files read by the node (see [`External`]).
    fn externals(_params: &Self::Params) -> Vec<External> {
        Vec::new()
    }
    /// The params that are keyed; default: all of them. Leave out paths whose content is
    /// keyed through [`TypedStage::externals`].
    fn key_params(params: &Self::Params) -> Value {
        serde_json::to_value(params).unwrap_or(Value::Null)
    }
    /// Files the stage must write.
    fn outputs(_params: &Self::Params) -> Vec<String> {
        Vec::new()
    }
    /// Resources a node claims.
    fn resources(_params: &Self::Params) -> Resources {
        Resources::default()
    }
    /// Runs the stage.
    fn run(params: &Self::Params, ctx: &mut StageCtx<'_>) -> Result<(), BoxError>;
    /// A hint for a failed run, given the normalized params (as keyed, defaults filled) and
    /// the failure's message with its causes: a GPU kind says which of its params to lower
    /// when the message is the GPU running out of memory. Default: none.
    fn explain_failure(_params: &Value, _message: &str) -> Option<String> {
        None
    }
    /// Whether the stage runs a user's code (a `shell` command), which is handed its input
    /// entry folders and might write into them: the engine then re-hashes those inputs after a
    /// successful run, and a changed input fails the node and is set aside. Default: no (the
    /// built-in kinds only read their inputs).
    fn runs_user_code() -> bool {
        false
    }
}

/// Adapter from [`TypedStage`] to [`StageKind`].
pub struct Typed<T>(PhantomData<fn() -> T>);

impl<T> Default for Typed<T> {
    fn default() -> Self {
        Typed(PhantomData)
    }
}

fn typed<T: TypedStage>(params: &Value) -> Result<T::Params, BoxError> {
    serde_json::from_value(params.clone())
        .map_err(|e| format!("params of kind {} do not deserialize: {e}", T::KIND).into())
}

/// Deserializes `params`, reporting every unknown top-level field: each one is an error, and
/// the rest is read again without it, so the typed params (and the kind's range checks on
/// them) still come back when the unknown fields were the only problem. Any other error
/// (a wrong type, a missing field) ends the reading with that error.
fn deserialize_reporting_unknown<P: DeserializeOwned>(
    mut params: Value,
) -> (Option<P>, Vec<ParamError>) {
    let mut errors = Vec::new();
    loop {
        match serde_path_to_error::deserialize::<_, P>(params.clone()) {
            Ok(p) => return (Some(p), errors),
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let message = e.into_inner().to_string();
                let unknown = message.starts_with("unknown field")
                    && !path.is_empty()
                    && !path.contains(['.', '['])
                    && params
                        .as_object_mut()
                        .is_some_and(|m| m.remove(&path).is_some());
                errors.push(ParamError::new(path, message));
                if !unknown {
                    return (None, errors);
                }
            }
        }
    }
}

impl<T: TypedStage> StageKind for Typed<T> {
    fn name(&self) -> &'static str {
        T::KIND
    }
    fn version(&self) -> u32 {
        T::VERSION
    }
    fn inputs(&self) -> Slots {
        T::inputs()
    }
    fn normalize(&self, params: Value, ctx: &NormalizeCtx<'_>) -> Result<Value, Vec<ParamError>> {
        let (p, mut errors) = deserialize_reporting_unknown::<T::Params>(params);
        if let Some(p) = &p {
            errors.extend(T::check(p));
        }
        let Some(p) = p.filter(|_| errors.is_empty()) else {
            return Err(errors);
        };
        let p = T::canonicalize(p, ctx)?;
        serde_json::to_value(&p)
            .map_err(|e| vec![ParamError::new("", format!("params do not serialize: {e}"))])
    }
    fn check_inputs(&self, params: &Value, connected: &[&str]) -> Vec<ParamError> {
        typed::<T>(params)
            .map(|p| T::check_inputs(&p, connected))
            .unwrap_or_default()
    }
    fn externals(&self, params: &Value) -> Vec<External> {
        typed::<T>(params)
            .map(|p| T::externals(&p))
            .unwrap_or_default()
    }
    fn key_params(&self, params: &Value) -> Value {
        typed::<T>(params)
            .map(|p| T::key_params(&p))
            .unwrap_or_else(|_| params.clone())
    }
    fn outputs(&self, params: &Value) -> Vec<String> {
        typed::<T>(params)
            .map(|p| T::outputs(&p))
            .unwrap_or_default()
    }
    fn resources(&self, params: &Value) -> Resources {
        typed::<T>(params)
            .map(|p| T::resources(&p))
            .unwrap_or_default()
    }
    fn run(&self, params: &Value, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let p = typed::<T>(params)?;
        T::run(&p, ctx)
    }
    fn explain_failure(&self, params: &Value, message: &str) -> Option<String> {
        T::explain_failure(params, message)
    }
    fn runs_user_code(&self) -> bool {
        T::runs_user_code()
    }
}

/// What a running stage reports to the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum StageEvent {
    /// Progress: `done` of `total` units, with a short message (`loss 1.23`).
    Progress {
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
        /// Short status text.
        message: String,
    },
    /// A log line (also written to the node's `log.txt`).
    Log(String),
}

/// The name of the log file every entry carries.
pub const LOG_FILE: &str = "log.txt";

/// Everything a running stage can see and do.
pub struct StageCtx<'a> {
    pub(crate) node: &'a str,
    pub(crate) key: NodeKey,
    pub(crate) out: &'a Path,
    pub(crate) scratch: PathBuf,
    pub(crate) pipeline_dir: &'a Path,
    pub(crate) inputs: BTreeMap<String, Vec<Artifact>>,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) report: &'a (dyn Fn(StageEvent) + Sync),
    pub(crate) log: Mutex<File>,
    pub(crate) store: &'a pipe_cache::Store,
    pub(crate) intact: &'a crate::integrity::Intact,
}

impl<'a> StageCtx<'a> {
    /// Display id of the node (`pretrain[m=3]`).
    pub fn node_id(&self) -> &str {
        self.node
    }
    /// Content key of the node.
    pub fn key(&self) -> &NodeKey {
        &self.key
    }
    /// The staging folder the stage fills (empty at start, but for `log.txt`).
    pub fn out_dir(&self) -> &Path {
        self.out
    }
    /// Path of an output file inside the staging folder.
    pub fn out_path(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }
    /// A folder that survives a crash (resume checkpoints); deleted when the node commits.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }
    /// The folder of the pipeline file (relative paths in params are relative to it).
    pub fn pipeline_dir(&self) -> &Path {
        self.pipeline_dir
    }
    /// The single artifact connected to `slot`.
    ///
    /// # Errors
    /// When the slot is unconnected or holds several artifacts.
    pub fn input(&self, slot: &str) -> Result<&Artifact, BoxError> {
        match self.inputs.get(slot).map(Vec::as_slice) {
            Some([one]) => Ok(one),
            Some([]) | None => Err(format!("input `{slot}` is not connected").into()),
            Some(many) => Err(format!(
                "input `{slot}` holds {} artifacts, expected one",
                many.len()
            )
            .into()),
        }
    }
    /// All artifacts connected to `slot` (empty when unconnected).
    pub fn inputs(&self, slot: &str) -> &[Artifact] {
        self.inputs.get(slot).map(Vec::as_slice).unwrap_or(&[])
    }
    /// A committed entry of the store by key: how a stage follows the provenance of its inputs
    /// (`manifest.meta.inputs` holds the keys an entry was computed from). `None` when the key
    /// is not committed (an ancestor removed by `pipe gc`).
    ///
    /// Its files are re-hashed against its manifest first (once per run), as the inputs are.
    ///
    /// # Errors
    /// When the entry's manifest is unreadable or corrupt, or a file does not match it.
    pub fn entry(&self, key: &pipe_cache::Key) -> Result<Option<Artifact>, BoxError> {
        let Some(entry) = self.store.get(key)? else {
            return Ok(None);
        };
        self.intact
            .ensure(self.store, key)
            .map_err(|problems| format!("entry {key} is damaged: {problems}"))?;
        Ok(Some(entry))
    }
    /// Every connected slot with its artifacts.
    pub fn all_inputs(&self) -> &BTreeMap<String, Vec<Artifact>> {
        &self.inputs
    }
    /// True once the run is being cancelled (Ctrl-C or SIGTERM): poll between batches and
    /// return early with an error. (A failure elsewhere does not cancel running nodes: they
    /// finish and are kept.)
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    /// Reports progress to the terminal.
    pub fn progress(&self, done: u64, total: u64, message: impl Into<String>) {
        (self.report)(StageEvent::Progress {
            done,
            total,
            message: message.into(),
        });
    }
    /// Appends a line to the node's log (kept as `log.txt` in its entry).
    pub fn log(&self, line: impl Into<String>) {
        let line = line.into();
        if let Ok(mut f) = self.log.lock() {
            let _ = writeln!(f, "{line}");
        }
        (self.report)(StageEvent::Log(line));
    }
    /// A handle on the log file, for child processes to write into.
    ///
    /// # Errors
    /// When the handle cannot be duplicated.
    pub fn log_file(&self) -> std::io::Result<File> {
        let f = self
            .log
            .lock()
            .map_err(|_| std::io::Error::other("log lock poisoned"))?;
        f.try_clone()
    }
}
