//! Checkpoints: safetensors with torchvision-compatible tensor names.
//!
//! # Layout
//!
//! A checkpoint holds the `Var`s of a [`VarMap`] under their own names, so the names are
//! fixed by how the model was built: the backbone under `encoder.` (torchvision's `resnet18`
//! `state_dict` names, [`crate::nn::resnet`]), the heads under `pre_feature.`, `projection.`
//! and `classifier.` with the reference's `nn.Sequential` indices ([`crate::nn::heads`]).
//! Every BN also stores `running_mean`, `running_var` (f32 like the weights) and
//! `num_batches_tracked` (an i64 scalar counting train-mode forwards, torch's buffer), so
//!
//! ```python
//! sd = {k[len("encoder."):]: v for k, v in load_file(path).items() if k.startswith("encoder.")}
//! resnet.load_state_dict(sd, strict=True)
//! ```
//!
//! works on torchvision's `resnet18` with `conv1` = 3x3 stride 1, `maxpool` = `fc` = Identity
//! (checked by `stages/tests/nn_resnet_reference.py`, whose outputs the tests below pin).
//!
//! # Saving
//!
//! [`save`] writes the `Var`s whose names start with a prefix (`""` = all) to a temporary file
//! in the target's folder, fsyncs it and renames it over the target (candle's `VarMap::save`
//! writes in place, which is not atomic: candle gotcha 5). A reader sees the old file or the
//! new one, never a partial one.
//!
//! # Loading
//!
//! candle's `VarMap::load` fills every `Var` of the map and fails on any name missing from the
//! file (candle gotcha 1), so a pretrained encoder cannot be loaded under a fresh head with it.
//! [`load`] reads the file and `Var::set`s only the `Var`s under a prefix: `load(vm, p,
//! "encoder.", true)` loads the backbone and leaves every other `Var` untouched.
//! [`load_mapped`] also renames a prefix (e.g. a bare torchvision `state_dict` saved without
//! `encoder.`). Shapes are always checked, and every check runs before any `Var` is set, so a
//! failed load changes nothing. Values are converted to each `Var`'s dtype.
//!
//! With `strict`, every `Var` under the prefix must be in the file and every file tensor under
//! the prefix must match a `Var` (torch's `strict=True`); without it the [`LoadReport`] lists
//! what was missing or unexpected.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle::safetensors::Load;
use candle::{Result, Tensor};
use candle_nn::VarMap;

use crate::nn::init::named_vars;

/// What [`load`] / [`load_mapped`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// `Var` names that were set, sorted.
    pub loaded: Vec<String>,
    /// `Var` names under the prefix with no tensor in the file (left untouched), sorted.
    pub missing: Vec<String>,
    /// File tensor names under the prefix that match no `Var` (ignored), sorted.
    pub unexpected: Vec<String>,
}

/// `"encoder"` and `"encoder."` both become `"encoder."`; `""` stays empty (everything).
fn norm_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_string()
    } else {
        format!("{prefix}.")
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> candle::Error {
    candle::Error::Msg(format!("checkpoint: {what} {}: {e}", path.display()))
}

/// Deletes the temporary file unless the rename happened.
struct TmpGuard(Option<PathBuf>);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes every `Var` of `varmap` whose name starts with `prefix` (`""` for all; a missing
/// trailing dot is added) to `path` atomically. Returns the number of tensors written.
///
/// # Errors
/// If no `Var` matches the prefix, or on I/O errors (naming the path).
pub fn save(varmap: &VarMap, path: impl AsRef<Path>, prefix: &str) -> Result<usize> {
    let path = path.as_ref();
    let prefix = norm_prefix(prefix);
    let tensors: HashMap<String, Tensor> = named_vars(varmap)
        .into_iter()
        .filter(|(name, _)| name.starts_with(&prefix))
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect();
    if tensors.is_empty() {
        candle::bail!(
            "checkpoint: no variable under prefix {prefix:?} to save to {}",
            path.display()
        )
    }
    save_tensors(&tensors, path)?;
    Ok(tensors.len())
}

/// Names of the floating-point `Var`s of `varmap` that hold a NaN or an infinity (or values so
/// large that their sum overflows: a diverged model either way), sorted. One reduction per
/// tensor and one scalar copied back: cheap enough to run after every epoch, so a diverged
/// model is never saved, whatever its loss said (a loss behind BN and normalized embeddings
/// can stay finite while the weights blow up).
///
/// # Errors
/// Tensor errors.
pub fn non_finite(varmap: &VarMap) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, var) in named_vars(varmap) {
        if !var.dtype().is_float() {
            continue;
        }
        let sum = var
            .as_tensor()
            .sum_all()?
            .to_dtype(candle::DType::F64)?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            out.push(name);
        }
    }
    Ok(out)
}

/// Writes named tensors to a safetensors file atomically (temporary file in the same folder,
/// fsync, rename, folder fsync).
///
/// # Errors
/// On I/O errors (naming the path).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .ok_or_else(|| {
            candle::Error::Msg(format!("checkpoint: {} is not a file path", path.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{file_name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut guard = TmpGuard(Some(tmp.clone()));
    candle::safetensors::save(tensors, &tmp)
        .map_err(|e| candle::Error::Msg(format!("checkpoint: writing {}: {e}", tmp.display())))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("syncing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("renaming into", path, e))?;
    guard.0 = None;
    // Make the rename durable; not every platform can sync a folder, so this is best effort.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The sorted tensor names of a safetensors file.
///
/// # Errors
/// If the file cannot be read or parsed (naming the path).
pub fn tensor_names(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| io_err("reading", path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| candle::Error::Msg(format!("checkpoint: parsing {}: {e}", path.display())))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort_unstable();
    Ok(names)
}

/// Sets the `Var`s whose names start with `prefix` from the tensors of the same names in
/// `path` (see the module docs). Equivalent to `load_mapped(varmap, path, prefix, prefix,
/// strict)`.
///
/// # Errors
/// See [`load_mapped`].
pub fn load(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    prefix: &str,
    strict: bool,
) -> Result<LoadReport> {
    load_mapped(varmap, path, prefix, prefix, strict)
}

/// Sets each `Var` named `var_prefix + rest` from the file tensor named `file_prefix + rest`.
///
/// # Errors
/// Before changing anything: if the file cannot be read; if a tensor's shape differs from its
/// `Var`'s (naming the tensor, both shapes and the file); if nothing matched; with `strict`,
/// if a `Var` under `var_prefix` has no tensor or a tensor under `file_prefix` has no `Var`.
pub fn load_mapped(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    file_prefix: &str,
    var_prefix: &str,
    strict: bool,
) -> Result<LoadReport> {
    let path = path.as_ref();
    let (file_prefix, var_prefix) = (norm_prefix(file_prefix), norm_prefix(var_prefix));
    let bytes = std::fs::read(path).map_err(|e| io_err("reading", path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| candle::Error::Msg(format!("checkpoint: parsing {}: {e}", path.display())))?;
    let mut file: BTreeMap<String, safetensors::tensor::TensorView<'_>> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name.starts_with(&file_prefix))
        .collect();
    let vars: Vec<_> = named_vars(varmap)
        .into_iter()
        .filter(|(name, _)| name.starts_with(&var_prefix))
        .collect();

    let mut report = LoadReport::default();
    let mut plan = Vec::new();
    for (name, var) in vars {
        let file_name = format!("{file_prefix}{}", &name[var_prefix.len()..]);
        match file.remove(&file_name) {
            Some(view) => {
                if view.shape() != var.dims() {
                    candle::bail!(
                        "checkpoint {}: tensor {file_name} has shape {:?}, the model's {name} \
                         expects {:?}",
                        path.display(),
                        view.shape(),
                        var.dims()
                    )
                }
                report.loaded.push(name.clone());
                plan.push((name, var, view));
            }
            None => report.missing.push(name),
        }
    }
    report.unexpected = file.into_keys().collect();
    if strict && !(report.missing.is_empty() && report.unexpected.is_empty()) {
        candle::bail!(
            "checkpoint {}: strict load under {file_prefix:?} -> {var_prefix:?}: {} missing {}, \
             {} unexpected {}",
            path.display(),
            report.missing.len(),
            preview(&report.missing),
            report.unexpected.len(),
            preview(&report.unexpected)
        )
    }
    if plan.is_empty() {
        candle::bail!(
            "checkpoint {}: no tensor under {file_prefix:?} matches a variable under \
             {var_prefix:?}",
            path.display()
        )
    }
    for (name, var, view) in plan {
        view.load(var.device())
            .and_then(|t| t.to_dtype(var.dtype()))
            .and_then(|t| var.set(&t))
            .map_err(|e| {
                candle::Error::Msg(format!(
                    "checkpoint {}: setting {name}: {e}",
                    path.display()
                ))
            })?;
    }
    Ok(report)
}

/// The first few names of a list, for error messages.
fn preview(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = format!("{:?}", &names[..names.len().min(SHOWN)]);
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// The file name of a [`TrainState`] in a node's scratch folder (every training kind's, and
/// what `pipe plan` looks for to say a rerun resumes).
pub const STATE_FILE: &str = "state.safetensors";

/// How far the run of a training state got (written into every state as `meta/resume_json`,
/// which `pipe plan` reads without loading the file: [`read_resume_point`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumePoint {
    /// Epochs finished.
    pub epochs_done: usize,
    /// Epochs of the run.
    pub epochs: usize,
    /// Batches finished in the next epoch (a mid-epoch state), else 0.
    pub batches_done: usize,
}

impl std::fmt::Display for ResumePoint {
    /// `after epoch 3 of 10`, or `in epoch 4 of 10 after batch 120`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.batches_done > 0 {
            write!(
                f,
                "in epoch {} of {} after batch {}",
                self.epochs_done + 1,
                self.epochs,
                self.batches_done
            )
        } else {
            write!(f, "after epoch {} of {}", self.epochs_done, self.epochs)
        }
    }
}

/// The name of the [`ResumePoint`] record in a state file.
const RESUME_RECORD: &str = "meta/resume_json";

/// The [`ResumePoint`] recorded in the training state at `path`, read from the safetensors
/// header and that one record (a few hundred bytes of a file that can hold hundreds of MB);
/// `None` for a file without one (written before it existed) or that does not parse.
pub fn read_resume_point(path: &Path) -> Option<ResumePoint> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; usize::try_from(len).ok()?];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let offsets = header.get(RESUME_RECORD)?.get("data_offsets")?;
    let (start, end) = (offsets.get(0)?.as_u64()?, offsets.get(1)?.as_u64()?);
    if end < start || end - start > 4096 {
        return None;
    }
    f.seek(SeekFrom::Start(8 + len + start)).ok()?;
    let mut bytes = vec![0u8; usize::try_from(end - start).ok()?];
    f.read_exact(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// When a trainer writes its state within an epoch: to `path`, once `every` has passed since
/// its last write (`Duration::ZERO`: after every batch).
#[derive(Debug)]
pub struct Cadence {
    path: PathBuf,
    every: std::time::Duration,
    last: std::time::Instant,
}

impl Cadence {
    /// Writes to `path` every `every`, counted from now.
    pub fn new(path: PathBuf, every: std::time::Duration) -> Self {
        Self {
            path,
            every,
            last: std::time::Instant::now(),
        }
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a write is due.
    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    /// Notes a write (the next is due `every` from now).
    pub fn wrote(&mut self) {
        self.last = std::time::Instant::now();
    }
}

/// A trainer of a training kind (`pretrain`, `finetune`, `ssl_head`): it resumes from a
/// [`TrainState`] file and writes one as it trains.
pub trait Resumable {
    /// Reads the state at `path` into this fresh trainer, all or nothing (on an error the
    /// trainer is still the fresh one); where the run stands after it.
    ///
    /// # Errors
    /// A state that does not fit this run, or one that cannot be read, naming the file.
    fn resume_from(
        &mut self,
        path: &Path,
    ) -> std::result::Result<ResumePoint, Box<dyn std::error::Error + Send + Sync>>;

    /// Makes the trainer write its state to `path` at the end of every epoch, within an epoch
    /// once `every` has passed since the last write (`Duration::ZERO`: after every batch), and
    /// when cancelled between batches.
    fn checkpoint_to(&mut self, path: PathBuf, every: std::time::Duration);
}

/// What every training kind does before its first epoch: resumes `trainer` from the state in
/// the node's `scratch` folder if there is one, and makes it write its state there every
/// `checkpoint_minutes` ([`crate::params::checkpoint_interval`]). Returns the node's log line
/// (`resumed from … after epoch 3 of 10`, `… in epoch 4 of 10 after batch 120`, or `ignoring
/// the saved state, starting over: <why>`), `None` without a state.
pub fn resume_in(
    trainer: &mut impl Resumable,
    scratch: &Path,
    checkpoint_minutes: Option<f64>,
) -> Option<String> {
    let path = scratch.join(STATE_FILE);
    let line = path.is_file().then(|| match trainer.resume_from(&path) {
        Ok(r) => format!("resumed from {} {r}", path.display()),
        Err(e) => format!("ignoring the saved state, starting over: {e}"),
    });
    trainer.checkpoint_to(path, crate::params::checkpoint_interval(checkpoint_minutes));
    line
}

/// A trainer's resumable state, one safetensors file in the node's scratch folder: the
/// trained variables under `model/<name>`, the optimiser's buffers under `optim/<name>`, and
/// the trainer's own tensors (counters, the curve as JSON bytes, a free-adversarial δ) under
/// names of its choosing. Written atomically ([`save_tensors`]); read back all or nothing:
/// [`TrainState::vars`] checks every variable before the caller sets any.
pub struct TrainState {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl TrainState {
    /// Writes `vars` (under `model/`), `optim` (under `optim/`), `extra`, and where the run
    /// stands (`at`, for `pipe plan`) to `path`.
    ///
    /// # Errors
    /// I/O errors, naming the path.
    pub fn save(
        path: &Path,
        vars: &[(String, candle::Var)],
        optim: Vec<(String, Tensor)>,
        extra: Vec<(String, Tensor)>,
        at: ResumePoint,
    ) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        t.insert(RESUME_RECORD.into(), json_tensor(&at)?);
        for (name, v) in vars {
            t.insert(format!("model/{name}"), v.as_detached_tensor());
        }
        for (name, v) in optim {
            t.insert(format!("optim/{name}"), v);
        }
        t.extend(extra);
        save_tensors(&t, path).map_err(|e| candle::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// Reads a state file onto `device`.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, naming it.
    pub fn load(path: &Path, device: &candle::Device) -> Result<Self> {
        let tensors = candle::safetensors::load(path, device)
            .map_err(|e| candle::Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// An error about this file: `<path>: <what>`.
    pub fn error(&self, what: impl std::fmt::Display) -> candle::Error {
        candle::Error::Msg(format!("{}: {what}", self.path.display()))
    }

    /// The tensor `name`, if the file has it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor `name`.
    ///
    /// # Errors
    /// When the file has none (naming file and tensor).
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| self.error(format!("has no {name}")))
    }

    /// The JSON value stored as bytes in tensor `name` (see [`json_tensor`]).
    ///
    /// # Errors
    /// A missing tensor or a value that does not parse as `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        let bytes = self
            .tensor(name)?
            .to_device(&candle::Device::Cpu)?
            .to_vec1::<u8>()?;
        serde_json::from_slice(&bytes).map_err(|e| self.error(format!("{name}: {e}")))
    }

    /// The optimiser's buffers (the `optim/` tensors, prefix stripped).
    pub fn optim(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("optim/").map(|k| (k.to_string(), v.clone())))
            .collect()
    }

    /// The saved value of every variable of `vars`, checked (present, same shape) and in its
    /// dtype; nothing is set: pass the result to [`set_vars`] once every other check passed.
    ///
    /// # Errors
    /// A missing or misshapen tensor, naming file and tensor.
    pub fn vars(&self, vars: &[(String, candle::Var)]) -> Result<Vec<(candle::Var, Tensor)>> {
        self.vars_under("model", vars)
    }

    /// [`TrainState::vars`] for tensors saved as `<prefix>/<name>` (a trainer's extra copies,
    /// e.g. finetune's kept head under `best/`).
    ///
    /// # Errors
    /// A missing or misshapen tensor, naming file and tensor.
    pub fn vars_under(
        &self,
        prefix: &str,
        vars: &[(String, candle::Var)],
    ) -> Result<Vec<(candle::Var, Tensor)>> {
        let mut plan = Vec::with_capacity(vars.len());
        for (name, v) in vars {
            let saved = self.tensor(&format!("{prefix}/{name}"))?;
            if saved.shape() != v.shape() {
                return Err(self.error(format!(
                    "{prefix}/{name} has shape {:?}, expected {:?}",
                    saved.dims(),
                    v.dims()
                )));
            }
            plan.push((v.clone(), saved.to_dtype(v.dtype())?));
        }
        Ok(plan)
    }
}

/// Sets every variable of a [`TrainState::vars`] plan.
///
/// # Errors
/// Tensor errors (none after the plan's checks, short of a device failure).
pub fn set_vars(plan: Vec<(candle::Var, Tensor)>) -> Result<()> {
    for (v, t) in plan {
        v.set(&t)?;
    }
    Ok(())
}

/// `value` as JSON bytes in a u8 tensor (for [`TrainState::json`]).
///
/// # Errors
/// A value that does not serialize.
pub fn json_tensor<T: serde::Serialize>(value: &T) -> Result<Tensor> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| candle::Error::Msg(format!("encoding a state record: {e}")))?;
    Tensor::new(bytes.as_slice(), &candle::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;
    use crate::nn::heads::{ENCODER, Encoder, EncoderConfig, HeadConfig, encoder};
    use crate::nn::init::{InitRules, build_seeded, named_vars};
    use crate::nn::resnet::{ResNetConfig, resnet18};
    use candle::{DType, Device, ModuleT};

    #[test]
    fn non_finite_names_every_tensor_holding_nan_or_inf() -> Result<()> {
        let mut vm = VarMap::new();
        let dev = Device::Cpu;
        for (name, values) in [
            ("a.ok", [1.0f32, -2.0, 3.0]),
            ("b.nan", [1.0, f32::NAN, 0.0]),
            ("c.inf", [f32::NEG_INFINITY, 0.0, 0.0]),
            ("d.huge", [3e38, 3e38, 0.0]),
        ] {
            let t = Tensor::new(&values, &dev)?;
            vm.get((3,), name, candle_nn::Init::Const(0.0), DType::F32, &dev)?;
            vm.set_one(name, t)?;
        }
        // an integer buffer is not a weight
        vm.get(
            (1,),
            "e.count",
            candle_nn::Init::Const(0.0),
            DType::I64,
            &dev,
        )?;
        assert_eq!(non_finite(&vm)?, ["b.nan", "c.inf", "d.huge"]);
        Ok(())
    }

    fn cfg(width: usize, hidden: usize, z: usize) -> EncoderConfig {
        EncoderConfig {
            backbone: ResNetConfig {
                width,
                ..Default::default()
            },
            head: HeadConfig {
                hidden_dim: hidden,
                z_dim: z,
            },
        }
    }

    fn build(c: &EncoderConfig, seed: u64) -> Result<(VarMap, Encoder)> {
        build_seeded(
            seed,
            &InitRules::r_cf(ENCODER),
            DType::F32,
            &Device::Cpu,
            |vb| encoder(c, vb),
        )
    }

    /// `0.5 + 0.5 sin(0.37 i + phase)` over the flat index of a (b, 3, hw, hw) tensor.
    fn input(b: usize, hw: usize, phase: f64) -> Result<Tensor> {
        let v: Vec<f32> = (0..b * 3 * hw * hw)
            .map(|i| (0.5 + 0.5 * (0.37 * i as f64 + phase).sin()) as f32)
            .collect();
        Tensor::from_vec(v, (b, 3, hw, hw), &Device::Cpu)
    }

    /// Bit patterns of every var (f32 as bits, i64 as is).
    fn snapshot(varmap: &VarMap) -> Result<BTreeMap<String, Vec<u64>>> {
        named_vars(varmap)
            .into_iter()
            .map(|(name, var)| {
                let t = var.as_tensor().flatten_all()?;
                let bits = match t.dtype() {
                    DType::F32 => t
                        .to_vec1::<f32>()?
                        .iter()
                        .map(|v| u64::from(v.to_bits()))
                        .collect(),
                    DType::I64 => t.to_vec1::<i64>()?.iter().map(|&v| v as u64).collect(),
                    d => candle::bail!("unexpected dtype {d:?}"),
                };
                Ok((name, bits))
            })
            .collect()
    }

    #[test]
    fn round_trip_is_bit_exact() -> Result<()> {
        let tmp = TempDir::new("ckpt-round-trip");
        let dir = tmp.path();
        let path = dir.join("model.safetensors");
        let c = cfg(8, 32, 16);
        let (vm_a, enc_a) = build(&c, 1)?;
        enc_a.forward_t(&input(4, 16, 0.0)?, true)?;
        enc_a.forward_t(&input(4, 16, 1.0)?, true)?;
        assert_eq!(save(&vm_a, &path, "")?, 136);
        let (vm_b, enc_b) = build(&c, 2)?;
        let before = snapshot(&vm_b)?;
        let report = load(&vm_b, &path, "", true)?;
        assert_eq!(report.loaded.len(), 136);
        assert!(report.missing.is_empty() && report.unexpected.is_empty());
        let (a, b) = (snapshot(&vm_a)?, snapshot(&vm_b)?);
        assert_eq!(a, b);
        assert_ne!(a, before);
        assert_eq!(
            b["encoder.layer3.0.downsample.1.num_batches_tracked"],
            vec![2]
        );
        // Same model state, same outputs.
        let x = input(3, 16, 2.0)?;
        let (ha, za) = enc_a.forward_t(&x, false)?;
        let (hb, zb) = enc_b.forward_t(&x, false)?;
        assert_eq!(ha.to_vec2::<f32>()?, hb.to_vec2::<f32>()?);
        assert_eq!(za.to_vec2::<f32>()?, zb.to_vec2::<f32>()?);
        // No temporary file left; saving again replaces the file.
        let listing = || -> Result<Vec<String>> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| io_err("listing", dir, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            Ok(v)
        };
        assert_eq!(listing()?, ["model.safetensors"]);
        assert_eq!(save(&vm_a, &path, "encoder")?, 120);
        assert_eq!(listing()?, ["model.safetensors"]);
        assert_eq!(tensor_names(&path)?.len(), 120);
        assert!(save(&vm_a, &path, "decoder.").is_err());
        Ok(())
    }

    // torchvision 0.29: list(cifar_resnet18(8).state_dict().keys()) (state_dict order; the same
    // list as resnet18() with conv1 = Conv2d(3, 64, 3, 1, 1, bias=False), maxpool = fc = Identity).
    // See stages/tests/nn_resnet_reference.py.
    const TORCHVISION_KEYS: [&str; 120] = [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.0.bn1.bias",
        "layer1.0.bn1.running_mean",
        "layer1.0.bn1.running_var",
        "layer1.0.bn1.num_batches_tracked",
        "layer1.0.conv2.weight",
        "layer1.0.bn2.weight",
        "layer1.0.bn2.bias",
        "layer1.0.bn2.running_mean",
        "layer1.0.bn2.running_var",
        "layer1.0.bn2.num_batches_tracked",
        "layer1.1.conv1.weight",
        "layer1.1.bn1.weight",
        "layer1.1.bn1.bias",
        "layer1.1.bn1.running_mean",
        "layer1.1.bn1.running_var",
        "layer1.1.bn1.num_batches_tracked",
        "layer1.1.conv2.weight",
        "layer1.1.bn2.weight",
        "layer1.1.bn2.bias",
        "layer1.1.bn2.running_mean",
        "layer1.1.bn2.running_var",
        "layer1.1.bn2.num_batches_tracked",
        "layer2.0.conv1.weight",
        "layer2.0.bn1.weight",
        "layer2.0.bn1.bias",
        "layer2.0.bn1.running_mean",
        "layer2.0.bn1.running_var",
        "layer2.0.bn1.num_batches_tracked",
        "layer2.0.conv2.weight",
        "layer2.0.bn2.weight",
        "layer2.0.bn2.bias",
        "layer2.0.bn2.running_mean",
        "layer2.0.bn2.running_var",
        "layer2.0.bn2.num_batches_tracked",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight",
        "layer2.0.downsample.1.bias",
        "layer2.0.downsample.1.running_mean",
        "layer2.0.downsample.1.running_var",
        "layer2.0.downsample.1.num_batches_tracked",
        "layer2.1.conv1.weight",
        "layer2.1.bn1.weight",
        "layer2.1.bn1.bias",
        "layer2.1.bn1.running_mean",
        "layer2.1.bn1.running_var",
        "layer2.1.bn1.num_batches_tracked",
        "layer2.1.conv2.weight",
        "layer2.1.bn2.weight",
        "layer2.1.bn2.bias",
        "layer2.1.bn2.running_mean",
        "layer2.1.bn2.running_var",
        "layer2.1.bn2.num_batches_tracked",
        "layer3.0.conv1.weight",
        "layer3.0.bn1.weight",
        "layer3.0.bn1.bias",
        "layer3.0.bn1.running_mean",
        "layer3.0.bn1.running_var",
        "layer3.0.bn1.num_batches_tracked",
        "layer3.0.conv2.weight",
        "layer3.0.bn2.weight",
        "layer3.0.bn2.bias",
        "layer3.0.bn2.running_mean",
        "layer3.0.bn2.running_var",
        "layer3.0.bn2.num_batches_tracked",
        "layer3.0.downsample.0.weight",
        "layer3.0.downsample.1.weight",
        "layer3.0.downsample.1.bias",
        "layer3.0.downsample.1.running_mean",
        "layer3.0.downsample.1.running_var",
        "layer3.0.downsample.1.num_batches_tracked",
        "layer3.1.conv1.weight",
        "layer3.1.bn1.weight",
        "layer3.1.bn1.bias",
        "layer3.1.bn1.running_mean",
        "layer3.1.bn1.running_var",
        "layer3.1.bn1.num_batches_tracked",
        "layer3.1.conv2.weight",
        "layer3.1.bn2.weight",
        "layer3.1.bn2.bias",
        "layer3.1.bn2.running_mean",
        "layer3.1.bn2.running_var",
        "layer3.1.bn2.num_batches_tracked",
        "layer4.0.conv1.weight",
        "layer4.0.bn1.weight",
        "layer4.0.bn1.bias",
        "layer4.0.bn1.running_mean",
        "layer4.0.bn1.running_var",
        "layer4.0.bn1.num_batches_tracked",
        "layer4.0.conv2.weight",
        "layer4.0.bn2.weight",
        "layer4.0.bn2.bias",
        "layer4.0.bn2.running_mean",
        "layer4.0.bn2.running_var",
        "layer4.0.bn2.num_batches_tracked",
        "layer4.0.downsample.0.weight",
        "layer4.0.downsample.1.weight",
        "layer4.0.downsample.1.bias",
        "layer4.0.downsample.1.running_mean",
        "layer4.0.downsample.1.running_var",
        "layer4.0.downsample.1.num_batches_tracked",
        "layer4.1.conv1.weight",
        "layer4.1.bn1.weight",
        "layer4.1.bn1.bias",
        "layer4.1.bn1.running_mean",
        "layer4.1.bn1.running_var",
        "layer4.1.bn1.num_batches_tracked",
        "layer4.1.conv2.weight",
        "layer4.1.bn2.weight",
        "layer4.1.bn2.bias",
        "layer4.1.bn2.running_mean",
        "layer4.1.bn2.running_var",
        "layer4.1.bn2.num_batches_tracked",
    ];

    #[test]
    fn tensor_names_are_torchvision_state_dict_keys() -> Result<()> {
        let tmp = TempDir::new("ckpt-names");
        let dir = tmp.path();
        let path = dir.join("enc.safetensors");
        let (vm, _) = build(&cfg(8, 32, 16), 0)?;
        save(&vm, &path, "encoder.")?;
        let names = tensor_names(&path)?;
        let mut want: Vec<String> = TORCHVISION_KEYS
            .iter()
            .map(|k| format!("encoder.{k}"))
            .collect();
        want.sort();
        assert_eq!(names, want);
        // The heads, with the reference's Sequential indices.
        save(&vm, &path, "")?;
        let heads: Vec<String> = tensor_names(&path)?
            .into_iter()
            .filter(|n| !n.starts_with("encoder."))
            .collect();
        let bn = |p: &str| -> Vec<String> {
            [
                "bias",
                "num_batches_tracked",
                "running_mean",
                "running_var",
                "weight",
            ]
            .iter()
            .map(|s| format!("{p}.{s}"))
            .collect()
        };
        let mut want_heads = vec![
            "pre_feature.0.bias".to_string(),
            "pre_feature.0.weight".into(),
        ];
        want_heads.extend(bn("pre_feature.1"));
        want_heads.extend([
            "projection.0.bias".to_string(),
            "projection.0.weight".into(),
        ]);
        want_heads.extend(bn("projection.1"));
        want_heads.extend([
            "projection.3.bias".to_string(),
            "projection.3.weight".into(),
        ]);
        assert_eq!(heads, want_heads);
        Ok(())
    }

    #[test]
    fn partial_load_leaves_the_head_untouched() -> Result<()> {
        let tmp = TempDir::new("ckpt-partial");
        let dir = tmp.path();
        let path = dir.join("pre.safetensors");
        let c = cfg(8, 32, 16);
        let (vm_a, enc_a) = build(&c, 10)?;
        enc_a.forward_t(&input(4, 16, 0.5)?, true)?;
        save(&vm_a, &path, "")?;
        // A fresh model with a different head seed; load only the encoder.
        let (vm_b, _) = build(&c, 11)?;
        let before = snapshot(&vm_b)?;
        let report = load(&vm_b, &path, "encoder.", true)?;
        assert_eq!(report.loaded.len(), 120);
        let (a, after) = (snapshot(&vm_a)?, snapshot(&vm_b)?);
        for (name, bits) in &after {
            if name.starts_with("encoder.") {
                assert_eq!(bits, &a[name], "{name}");
            } else {
                assert_eq!(bits, &before[name], "{name}");
                if name.ends_with("0.weight") {
                    assert_ne!(bits, &a[name], "{name}: seeds 10 and 11 differ");
                }
            }
        }
        // A strict full load of an encoder-only file names what is missing; non-strict
        // reports it and loads the rest.
        let enc_only = dir.join("enc.safetensors");
        save(&vm_a, &enc_only, "encoder")?;
        let err = load(&vm_b, &enc_only, "", true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("16 missing") && err.contains("pre_feature.0.bias"),
            "{err}"
        );
        let report = load(&vm_b, &enc_only, "", false)?;
        assert_eq!((report.loaded.len(), report.missing.len()), (120, 16));
        assert!(report.unexpected.is_empty());
        Ok(())
    }

    #[test]
    fn load_mapped_renames_a_bare_state_dict() -> Result<()> {
        let tmp = TempDir::new("ckpt-mapped");
        let dir = tmp.path();
        let path = dir.join("bare.safetensors");
        // A backbone at the root: exactly torchvision's names, no prefix.
        let rcfg = ResNetConfig {
            width: 8,
            ..Default::default()
        };
        let (vm_bare, _) =
            build_seeded(3, &InitRules::default(), DType::F32, &Device::Cpu, |vb| {
                resnet18(&rcfg, vb)
            })?;
        save(&vm_bare, &path, "")?;
        assert!(tensor_names(&path)?.contains(&"layer2.0.downsample.0.weight".to_string()));
        let (vm, _) = build(&cfg(8, 32, 16), 4)?;
        let report = load_mapped(&vm, &path, "", "encoder.", true)?;
        assert_eq!(report.loaded.len(), 120);
        let (a, b) = (snapshot(&vm_bare)?, snapshot(&vm)?);
        assert_eq!(
            a["layer4.1.conv2.weight"],
            b["encoder.layer4.1.conv2.weight"]
        );
        Ok(())
    }

    #[test]
    fn wrong_shape_names_the_tensor_and_changes_nothing() -> Result<()> {
        let tmp = TempDir::new("ckpt-shape");
        let dir = tmp.path();
        let path = dir.join("w8.safetensors");
        let (vm8, _) = build(&cfg(8, 32, 16), 0)?;
        save(&vm8, &path, "")?;
        let (vm16, _) = build(&cfg(16, 32, 16), 0)?;
        let before = snapshot(&vm16)?;
        let err = load(&vm16, &path, "encoder.", false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("encoder.bn1.bias"), "{err}"); // first in sorted order
        assert!(err.contains("[8]") && err.contains("[16]"), "{err}");
        assert!(err.contains("w8.safetensors"), "{err}");
        assert_eq!(snapshot(&vm16)?, before);
        // Only the head has matching shapes here... except pre_feature.0 (in = 8·width).
        let err = load(&vm16, &path, "pre_feature", true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("pre_feature.0.weight")
                && err.contains("[32, 64]")
                && err.contains("[32, 128]"),
            "{err}"
        );
        assert!(load(&vm16, &path, "projection", true).is_ok());
        let missing = dir.join("nope.safetensors");
        let err = load(&vm16, &missing, "", true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("nope.safetensors"), "{err}");
        Ok(())
    }

    /// The model of the PyTorch agreement test: width 64 (torchvision's resnet18), small
    /// heads, seed 2024 with R-CF's conv1 rule, and BN affine parameters moved off 1 / 0
    /// (weight `1 + 0.25 sin(0.7 j + k)`, bias `0.1 cos(0.3 j + k)` for the k-th BN in sorted
    /// order) so that a swapped BN would show.
    fn reference_model() -> Result<(VarMap, Encoder)> {
        let (vm, enc) = build_seeded(
            2024,
            &InitRules::r_cf(ENCODER),
            DType::F32,
            &Device::Cpu,
            |vb| encoder(&cfg(64, 256, 64), vb),
        )?;
        let vars = named_vars(&vm);
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        let bn_modules: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".running_mean"))
            .collect();
        for (k, m) in bn_modules.iter().enumerate() {
            for (param, f) in [
                (
                    "weight",
                    (|j: f64, k: f64| 1.0 + 0.25 * (0.7 * j + k).sin()) as fn(f64, f64) -> f64,
                ),
                ("bias", |j: f64, k: f64| 0.1 * (0.3 * j + k).cos()),
            ] {
                let name = format!("{m}.{param}");
                let (_, var) = vars
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| candle::Error::Msg(format!("no {name}")))?;
                let v: Vec<f32> = (0..var.elem_count())
                    .map(|j| f(j as f64, k as f64) as f32)
                    .collect();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
            }
        }
        Ok((vm, enc))
    }

    /// The outputs compared with torch: train-mode (h1, z1) on x1 = input(4, 32, 0), then
    /// eval-mode (h2, z2) and backbone features f2 on x2 = input(3, 32, 1).
    fn reference_outputs(enc: &Encoder) -> Result<[(&'static str, Tensor); 5]> {
        let (x1, x2) = (input(4, 32, 0.0)?, input(3, 32, 1.0)?);
        let (h1, z1) = enc.forward_t(&x1, true)?;
        let (h2, z2) = enc.forward_t(&x2, false)?;
        let f2 = enc.backbone().forward_t(&x2, false)?;
        Ok([("h1", h1), ("z1", z1), ("h2", h2), ("z2", z2), ("f2", f2)])
    }

    #[test]
    #[ignore = "writes the inputs of stages/tests/nn_resnet_reference.py; set PIPE_TORCH_REF_DIR"]
    fn write_torch_reference_files() -> Result<()> {
        let dir = PathBuf::from(
            std::env::var("PIPE_TORCH_REF_DIR")
                .map_err(|_| candle::Error::Msg("set PIPE_TORCH_REF_DIR".into()))?,
        );
        std::fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
        let (vm, enc) = reference_model()?;
        save(&vm, dir.join("init.safetensors"), "")?;
        let outputs: HashMap<String, Tensor> = reference_outputs(&enc)?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        candle::safetensors::save(&outputs, dir.join("outputs.safetensors"))?;
        save(&vm, dir.join("after_train.safetensors"), "")?;
        Ok(())
    }

    /// Row sums, row sums of squares, and `[0, :4]`, `[-1, -4:]` of one output.
    struct Pinned {
        sums: &'static [f64],
        sq_sums: &'static [f64],
        first: [f64; 4],
        last: [f64; 4],
        /// Tolerance on entries; sums get 10x (they add up to 256 entry errors).
        tol: f64,
    }

    // THE compatibility test. Produced by (see stages/tests/nn_resnet_reference.py):
    //   PIPE_TORCH_REF_DIR=/tmp/ref cargo test -p pipe-stages --lib \
    //       nn::checkpoint::tests::write_torch_reference_files -- --ignored
    //   python stages/tests/nn_resnet_reference.py compare /tmp/ref
    // which loads our init checkpoint with load_state_dict(strict=True) into torchvision 0.29's
    // resnet18 (conv1 = Conv2d(3, 64, 3, 1, 1, bias=False), maxpool = fc = Identity) once with
    // the `encoder.` prefix stripped and once whole into R-CF's layout (+ pre_feature,
    // projection; hidden 256, z 64), then runs model.train(); h1, z1 = model(x1);
    // model.eval(); h2, z2 = model(x2) in torch 2.15 (f32, CPU). It printed "All keys matched
    // successfully" for both loads (and for a load without num_batches_tracked), full-output
    // max |ours - torch| of 7.9e-5 (h1), 7.2e-6 (z1), 2.0e-6 (h2), 2.5e-7 (z2), 1.9e-6 (the
    // 512-d backbone features in eval), running statistics within 1.4e-6, equal
    // num_batches_tracked (1), and:
    const TORCH_H1: Pinned = Pinned {
        sums: &[106.63248687, 117.34420865, 102.84142532, 119.34731562],
        sq_sums: &[126.69494568, 143.42892972, 115.79413394, 148.36664597],
        first: [0.0, 0.46723917, 0.0, 0.60338610],
        last: [0.0, 1.52423525, 0.0, 0.0],
        tol: 5e-4,
    };
    const TORCH_Z1: Pinned = Pinned {
        sums: &[-1.22965993, 0.16918923, 0.42429722, -0.50767064],
        sq_sums: &[1.0, 1.0, 1.0, 1.0],
        first: [0.08163361, -0.13783894, -0.22235970, 0.03197208],
        last: [0.02456002, -0.17804974, -0.08132400, -0.11483638],
        tol: 5e-5,
    };
    const TORCH_H2: Pinned = Pinned {
        sums: &[51.23831394, 51.80260000, 50.64117653],
        sq_sums: &[35.53826841, 35.60764040, 33.89964259],
        first: [0.0, 0.34438792, 0.04651747, 0.0],
        last: [0.0, 0.0, 0.43123546, 0.17661285],
        tol: 2e-5,
    };
    const TORCH_Z2: Pinned = Pinned {
        sums: &[-0.34278497, -0.48113358, -0.31789106],
        sq_sums: &[1.0, 1.0, 1.0],
        first: [0.27731359, -0.01804012, -0.06165697, -0.03475186],
        last: [-0.12942836, 0.19165377, -0.13065742, -0.30596614],
        tol: 5e-6,
    };

    #[test]
    fn forward_agrees_with_torchvision_after_strict_load() -> Result<()> {
        let (vm, enc) = reference_model()?;
        let outputs = reference_outputs(&enc)?;
        for ((name, t), pin) in outputs.iter().zip([TORCH_H1, TORCH_Z1, TORCH_H2, TORCH_Z2]) {
            let rows = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            assert_eq!(rows.len(), pin.sums.len(), "{name}");
            let close = |a: f64, b: f64, tol: f64, what: &str| {
                assert!((a - b).abs() <= tol, "{name} {what}: ours {a}, torch {b}");
            };
            for (i, row) in rows.iter().enumerate() {
                close(row.iter().sum(), pin.sums[i], 10.0 * pin.tol, "row sum");
                close(
                    row.iter().map(|v| v * v).sum(),
                    pin.sq_sums[i],
                    10.0 * pin.tol,
                    "sq sum",
                );
            }
            let (first, last) = (&rows[0][..4], &rows[rows.len() - 1][rows[0].len() - 4..]);
            for j in 0..4 {
                close(first[j], pin.first[j], pin.tol, "[0, :4]");
                close(last[j], pin.last[j], pin.tol, "[-1, -4:]");
            }
        }
        // Running statistics after the train-mode forward (torch's state_dict, first 4).
        let vars: BTreeMap<String, candle::Var> = named_vars(&vm).into_iter().collect();
        for (name, want) in [
            (
                "encoder.layer4.1.bn2.running_mean",
                [0.04099636, 0.00393179, 0.02302359, -0.01491406],
            ),
            (
                "projection.1.running_var",
                [0.91348338, 0.92440754, 0.90557688, 0.90286356],
            ),
        ] {
            let v = vars[name]
                .as_tensor()
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            for j in 0..4 {
                assert!(
                    (v[j] - want[j]).abs() < 1e-5,
                    "{name}[{j}]: {} vs {}",
                    v[j],
                    want[j]
                );
            }
        }
        let nbt = vars["encoder.layer2.0.downsample.1.num_batches_tracked"].as_tensor();
        assert_eq!(nbt.to_scalar::<i64>()?, 1);
        Ok(())
    }

    #[test]
    fn a_state_says_where_its_run_stands_without_being_loaded() -> Result<()> {
        let tmp = TempDir::new("ckpt-resume-point");
        let dir = tmp.path();
        let path = dir.join("state.safetensors");
        let big = Tensor::zeros((256, 1024), DType::F32, &candle::Device::Cpu)?;
        let at = ResumePoint {
            epochs_done: 3,
            epochs: 10,
            batches_done: 120,
        };
        TrainState::save(
            &path,
            &[],
            vec![("m".into(), big.clone())],
            vec![("meta/curve_json".into(), json_tensor(&vec![1.5f64; 3])?)],
            at,
        )?;
        assert_eq!(read_resume_point(&path), Some(at));
        assert_eq!(at.to_string(), "in epoch 4 of 10 after batch 120");
        let end = ResumePoint {
            batches_done: 0,
            ..at
        };
        assert_eq!(end.to_string(), "after epoch 3 of 10");
        // the loaders see it as one more record
        let s = TrainState::load(&path, &candle::Device::Cpu)?;
        assert_eq!(s.json::<ResumePoint>(RESUME_RECORD)?, at);
        // a state without the record (an older pipe), and files that are not states
        let mut t = HashMap::new();
        t.insert("optim/m".to_string(), big);
        save_tensors(&t, &path)?;
        assert_eq!(read_resume_point(&path), None);
        std::fs::write(&path, b"x")?;
        assert_eq!(read_resume_point(&path), None);
        std::fs::write(&path, u64::MAX.to_le_bytes())?;
        assert_eq!(read_resume_point(&path), None);
        assert_eq!(read_resume_point(&dir.join("absent")), None);
        Ok(())
    }
}
