//! Pipeline specs: YAML text -> validated [`Pipeline`].
//!
//! Parsing collects *every* problem before any compute: syntax (with serde_yaml's position),
//! duplicate keys, unknown top-level or stage fields, unknown kinds, inputs that name an unknown
//! stage or slot, missing required inputs, cycles (naming every stage on the cycle) and, through
//! each kind's typed params, unknown / mistyped / out-of-range params. Each error carries the
//! file, the line and column (from [`locate::Locator`]), the YAML path and what was expected.
//!
//! Hostile text is refused, not expanded: serde_yaml refuses alias expansion beyond 100 times
//! the document's events ("billion laughs") and nesting deeper than 128 levels (no stack
//! overflow), both before any conversion; a stage's grid may have at most [`MAX_GRID_POINTS`]
//! points and the whole pipeline at most [`MAX_INSTANCES`] instances, both checked before they
//! are built; NaN, infinities and NUL characters never reach a param
//! ([`crate::value::yaml_to_json`]).
//!
//! Top-level fields named `x-...` are ignored: they hold YAML anchors that stages merge
//! (`<<: *linear`) or reference (`columns: *columns`).
//!
//! Params of one stage are layered, later wins: `defaults.<kind>` < `params` < a variant <
//! a sweep point < `--set`. Each point of a stage's own grid (variants x sweep) is normalized
//! here once; fan-out over upstream variants happens in [`crate::graph`].

pub mod locate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use petgraph::graph::DiGraph;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, ParamError, SpecError, SpecErrors};
use crate::registry::Registry;
use crate::stage::{NormalizeCtx, Slots};
use crate::statcache::StatCache;
use crate::suggest;
use crate::value::{label, parse_scalar, yaml_to_json};
use locate::Locator;

/// The largest pipeline file [`load`] reads.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

/// The most points one stage's own grid (variants x sweep values, `--sweep` included) may have.
/// A larger grid is refused before it is expanded.
pub const MAX_GRID_POINTS: usize = 10_000;

/// The most stage instances a pipeline may expand into (each stage's grid times its fan-out over
/// its inputs' instances, summed over the stages). Checked before the graph is built, so a
/// chain of sweeps cannot exhaust memory.
pub const MAX_INSTANCES: usize = 100_000;

/// One axis of a stage's own grid.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Axis {
    /// Stage that declares it.
    pub stage: String,
    /// Param name, or `None` for the stage's `variants:`.
    pub param: Option<String>,
}

/// One coordinate: an axis and the label of its value (`m` = `3`, or the variant name).
pub type Coord = (Axis, String);

/// A point of a stage's own grid, with its normalized params.
#[derive(Clone, Debug)]
pub struct GridPoint {
    /// Coordinates along the stage's own axes.
    pub coords: Vec<Coord>,
    /// Params after layering and the kind's normalization: what the stage runs with.
    pub params: Value,
    /// The keyed part of `params` (see [`crate::StageKind::key_params`]).
    pub key_params: Value,
    /// External name -> blake3 of its content.
    pub external: BTreeMap<String, String>,
}

/// One source feeding an input slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Upstream stage id.
    pub stage: String,
    /// `stage[*]`: gather all its variants instead of fanning out with them.
    pub gather: bool,
    /// `stage[name]`: only the instances of its variant `name` (a consumer can then give each
    /// variant of its input its own settings).
    pub variant: Option<String>,
}

impl Source {
    /// Whether an upstream instance with these coordinates is one this source reads.
    pub fn selects(&self, coords: &[Coord]) -> bool {
        self.variant.as_ref().is_none_or(|v| {
            coords
                .iter()
                .any(|(axis, value)| axis.stage == self.stage && axis.param.is_none() && value == v)
        })
    }
}

/// A validated stage.
#[derive(Clone, Debug)]
pub struct StageSpec {
    /// Stage id (the key under `stages:`).
    pub id: String,
    /// Kind name.
    pub kind: String,
    /// Slot -> sources, in the order written.
    pub inputs: Vec<(String, Vec<Source>)>,
    /// The stage's own grid (one point when it has no sweep or variants).
    pub grid: Vec<GridPoint>,
}

/// A validated pipeline.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// `name:` or the file stem.
    pub name: String,
    /// The pipeline file.
    pub file: PathBuf,
    /// Its folder (working directory of shell stages, base of relative paths).
    pub dir: PathBuf,
    /// Stages in topological order (ties in file order).
    pub stages: Vec<StageSpec>,
}

/// Command-line overrides: `--set stage.param=value` and `--sweep stage.param=v1,v2`.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// (stage, param, value).
    pub set: Vec<(String, String, Value)>,
    /// (stage, param, values).
    pub sweep: Vec<(String, String, Vec<Value>)>,
}

fn split_assignment(text: &str, flag: &str) -> Result<(String, String, String), Error> {
    let (lhs, rhs) = text
        .split_once('=')
        .ok_or_else(|| Error::Usage(format!("{flag} {text}: expected STAGE.PARAM=VALUE")))?;
    let (stage, param) = lhs
        .split_once('.')
        .ok_or_else(|| Error::Usage(format!("{flag} {text}: expected STAGE.PARAM=VALUE")))?;
    if stage.is_empty() || param.is_empty() {
        return Err(Error::Usage(format!(
            "{flag} {text}: expected STAGE.PARAM=VALUE"
        )));
    }
    Ok((stage.to_string(), param.to_string(), rhs.to_string()))
}

impl Overrides {
    /// Adds a `--set stage.param=value` (value parsed as a YAML scalar).
    ///
    /// # Errors
    /// A malformed assignment.
    pub fn add_set(&mut self, text: &str) -> Result<(), Error> {
        let (stage, param, v) = split_assignment(text, "--set")?;
        let v = parse_scalar(&v).map_err(|e| Error::Usage(format!("--set {text}: {e}")))?;
        self.set.push((stage, param, v));
        Ok(())
    }
    /// Adds a `--sweep stage.param=v1,v2,v3`.
    ///
    /// # Errors
    /// A malformed assignment or an empty list.
    pub fn add_sweep(&mut self, text: &str) -> Result<(), Error> {
        let (stage, param, v) = split_assignment(text, "--sweep")?;
        let mut values = Vec::new();
        for item in v.split(',') {
            if item.trim().is_empty() {
                return Err(Error::Usage(format!(
                    "--sweep {text}: empty value in the list"
                )));
            }
            values.push(
                parse_scalar(item.trim())
                    .map_err(|e| Error::Usage(format!("--sweep {text}: {e}")))?,
            );
        }
        self.sweep.push((stage, param, values));
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: String,
    #[serde(default)]
    inputs: serde_yaml::Mapping,
    #[serde(default)]
    params: serde_yaml::Mapping,
    #[serde(default)]
    sweep: serde_yaml::Mapping,
    #[serde(default)]
    variants: serde_yaml::Mapping,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

struct Ctx<'a> {
    file: &'a Path,
    loc: Locator,
    errors: Vec<SpecError>,
}

impl Ctx<'_> {
    /// Reports every duplicate key the locator found (serde_yaml stops at the first).
    fn duplicates(&mut self) {
        for d in std::mem::take(&mut self.loc.duplicates) {
            self.errors.push(SpecError {
                file: self.file.to_path_buf(),
                line: Some(d.at.0),
                col: Some(d.at.1),
                path: d.path,
                message: format!("duplicate key (first defined at line {})", d.first.0),
            });
        }
    }

    /// [`Ctx::err`] for a name the file got wrong: located by the name as written, shown
    /// with control characters escaped (a NUL in a stage id must not reach the terminal).
    fn err_named(&mut self, path: &str, message: impl Into<String>) {
        let pos = self.loc.locate(path);
        self.errors.push(SpecError {
            file: self.file.to_path_buf(),
            line: pos.map(|p| p.0),
            col: pos.map(|p| p.1),
            path: path.escape_debug().to_string(),
            message: message.into(),
        });
    }

    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let pos = self.loc.locate(&path);
        self.errors.push(SpecError {
            file: self.file.to_path_buf(),
            line: pos.map(|p| p.0),
            col: pos.map(|p| p.1),
            path,
            message: suggest::explain(&message.into()),
        });
    }
}

/// True for ids and slot names we accept: letters, digits, `_` and `-`, not starting with `-`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_source(text: &str) -> Option<Source> {
    let (stage, gather, variant) = match text.strip_suffix(']').and_then(|t| t.split_once('[')) {
        Some((s, "*")) => (s, true, None),
        Some((s, v)) if valid_name(v) => (s, false, Some(v.to_string())),
        Some(_) => return None,
        None => (text, false, None),
    };
    valid_name(stage).then(|| Source {
        stage: stage.to_string(),
        gather,
        variant,
    })
}

/// A param layer: values and the YAML path they came from.
struct Layer {
    values: Map<String, Value>,
    origin: String,
}

/// Reads and validates a pipeline file.
///
/// # Errors
/// [`Error::Io`] when unreadable or larger than [`MAX_SPEC_BYTES`], [`Error::Spec`] with every
/// problem found.
pub fn load(file: &Path, registry: &Registry, overrides: &Overrides) -> Result<Pipeline, Error> {
    load_with(file, registry, overrides, &mut StatCache::in_memory())
}

/// [`load`] with a stat cache for hashing external files (the CLI keeps one in the store).
///
/// # Errors
/// As [`load`].
pub fn load_with(
    file: &Path,
    registry: &Registry,
    overrides: &Overrides,
    stats: &mut StatCache,
) -> Result<Pipeline, Error> {
    let io = |cause| Error::Io {
        path: file.to_path_buf(),
        cause,
    };
    // read at most one byte past the limit: `pipe plan /dev/zero` must not eat the memory
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(file).map_err(io)?, MAX_SPEC_BYTES + 1),
        &mut text,
    )
    .map_err(io)?;
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(io(std::io::Error::other(format!(
            "larger than {} MiB: expected a pipeline file",
            MAX_SPEC_BYTES >> 20
        ))));
    }
    parse_with(&text, file, registry, overrides, stats).map_err(Error::Spec)
}

fn yaml_map(ctx: &mut Ctx<'_>, v: &serde_yaml::Mapping, path: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, item) in v {
        let Some(k) = k.as_str() else {
            ctx.err(path, "expected string keys");
            continue;
        };
        let p = format!("{path}.{k}");
        match yaml_to_json(item) {
            Ok(j) => {
                out.insert(k.to_string(), j);
            }
            Err((sub, m)) => ctx.err(
                if sub.is_empty() {
                    p
                } else if sub.starts_with('[') {
                    format!("{p}{sub}")
                } else {
                    format!("{p}.{sub}")
                },
                m,
            ),
        }
    }
    out
}

/// Parses and validates pipeline text (`file` names it in errors and anchors relative paths).
///
/// # Errors
/// Every problem found, sorted by position.
pub fn parse(
    text: &str,
    file: &Path,
    registry: &Registry,
    overrides: &Overrides,
) -> Result<Pipeline, SpecErrors> {
    parse_with(text, file, registry, overrides, &mut StatCache::in_memory())
}

/// [`parse`] with a stat cache for hashing external files.
///
/// # Errors
/// As [`parse`].
pub fn parse_with(
    text: &str,
    file: &Path,
    registry: &Registry,
    overrides: &Overrides,
    stats: &mut StatCache,
) -> Result<Pipeline, SpecErrors> {
    let mut ctx = Ctx {
        file,
        loc: Locator::new(text),
        errors: Vec::new(),
    };
    let result = parse_inner(text, file, registry, overrides, &mut ctx, stats);
    let mut errors = ctx.errors;
    errors.sort();
    errors.dedup();
    match result {
        Some(p) if errors.is_empty() => Ok(p),
        _ => {
            if errors.is_empty() {
                errors.push(SpecError {
                    file: file.to_path_buf(),
                    line: None,
                    col: None,
                    path: String::new(),
                    message: "invalid pipeline".into(),
                });
            }
            Err(SpecErrors(errors))
        }
    }
}

fn parse_inner(
    text: &str,
    file: &Path,
    registry: &Registry,
    overrides: &Overrides,
    ctx: &mut Ctx<'_>,
    stats: &mut StatCache,
) -> Option<Pipeline> {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let nctx = NormalizeCtx { pipeline_dir: &dir };
    let mut doc: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            if !ctx.loc.duplicates.is_empty() {
                ctx.duplicates();
            } else {
                let loc = e.location();
                let msg = e.to_string();
                // serde_yaml appends " at line L column C"; the position is printed separately.
                let mut msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                // serde_yaml's own guards, before anything is expanded or converted
                if msg.starts_with("recursion limit exceeded") {
                    msg.push_str(
                        " (collections nested more than 128 deep; expected a shallower document)",
                    );
                } else if msg.starts_with("repetition limit exceeded") {
                    msg.push_str(
                        " (aliases expand to far more nodes than the document holds, as in a \
                         \"billion laughs\" document; expected aliases that are used a few times)",
                    );
                }
                let lines = text.split('\n').count();
                let (path, message) = match too_wide_integer(&msg) {
                    Some((path, n)) => (
                        path,
                        format!(
                            "the integer {n} does not fit in 64 bits (expected an integer from \
                             -2^63 to 2^64 - 1, or a float such as 1.5e21)"
                        ),
                    ),
                    None => (String::new(), format!("invalid YAML: {msg}")),
                };
                ctx.errors.push(SpecError {
                    file: file.to_path_buf(),
                    line: loc.as_ref().map(|l| l.line().clamp(1, lines)),
                    col: loc.as_ref().map(|l| l.column()),
                    path,
                    message,
                });
            }
            return None;
        }
    };
    if let Err(e) = doc.apply_merge() {
        ctx.err("", format!("invalid merge key (`<<`): {e}"));
        return None;
    }
    let Some(top) = doc.as_mapping() else {
        ctx.err(
            "",
            "expected a mapping with `stages:` (and optionally `name:`, `defaults:`)",
        );
        return None;
    };

    let mut name = None;
    let mut defaults_raw = None;
    let mut stages_raw = None;
    for (k, v) in top {
        match k.as_str() {
            Some("name") => match v.as_str() {
                Some(s) => name = Some(s.to_string()),
                None => ctx.err("name", "expected a string"),
            },
            Some("defaults") => match v.as_mapping() {
                Some(m) => defaults_raw = Some(m),
                None if v.is_null() => {}
                None => ctx.err("defaults", "expected a mapping of kind -> params"),
            },
            Some("stages") => match v.as_mapping() {
                Some(m) => stages_raw = Some(m),
                None => ctx.err("stages", "expected a mapping of stage id -> stage"),
            },
            // Extension fields hold YAML anchors shared by stages (`x-columns: &columns`).
            Some(other) if other.starts_with("x-") => {}
            Some(other) => ctx.err(
                other,
                format!(
                    "unknown field `{other}`{}, expected one of `name`, `defaults`, `stages` \
                     (or an `x-` field holding YAML anchors)",
                    suggest::hint(other, ["name", "defaults", "stages"])
                ),
            ),
            None => ctx.err("", "expected string keys at the top level"),
        }
    }
    let Some(stages_raw) = stages_raw else {
        if ctx.errors.is_empty() {
            ctx.err("", "missing field `stages`");
        }
        return None;
    };
    if stages_raw.is_empty() {
        ctx.err("stages", "expected at least one stage");
    }

    // defaults: kind -> params
    let mut defaults: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (k, v) in defaults_raw.into_iter().flatten() {
        let Some(kind) = k.as_str() else {
            ctx.err("defaults", "expected string keys (stage kinds)");
            continue;
        };
        let path = format!("defaults.{kind}");
        if registry.get(kind).is_none() {
            ctx.err(
                &path,
                format!(
                    "unknown stage kind `{kind}`{} (known: {})",
                    suggest::hint(kind, registry.names()),
                    registry.names().join(", ")
                ),
            );
            continue;
        }
        match v.as_mapping() {
            Some(m) => {
                let m = yaml_map(ctx, m, &path);
                defaults.insert(kind.to_string(), m);
            }
            None => ctx.err(&path, "expected a mapping of params"),
        }
    }

    // stages, structurally
    struct Parsed {
        id: String,
        kind: String,
        inputs: Vec<(String, Vec<Source>)>,
        params: Map<String, Value>,
        variants: Vec<(String, Map<String, Value>)>,
        sweep: Vec<(String, Vec<Value>)>,
        kind_ok: bool,
    }
    let mut parsed: Vec<Parsed> = Vec::new();
    let mut ids = BTreeSet::new();
    for (k, v) in stages_raw {
        let Some(id) = k.as_str() else {
            ctx.err("stages", "expected string stage ids");
            continue;
        };
        let path = format!("stages.{id}");
        if !valid_name(id) {
            ctx.err_named(
                &path,
                format!(
                    "invalid stage id `{}`: use letters, digits, `_` and `-` only",
                    id.escape_debug()
                ),
            );
            continue;
        }
        ids.insert(id.to_string());
        let raw: RawStage = match serde_path_to_error::deserialize(v.clone()) {
            Ok(r) => r,
            Err(e) => {
                let sub = e.path().to_string();
                let p = if sub == "." {
                    path.clone()
                } else {
                    format!("{path}.{sub}")
                };
                ctx.err(p, e.into_inner().to_string());
                continue;
            }
        };
        let kind_ok = registry.get(&raw.kind).is_some();
        if !kind_ok {
            ctx.err(
                format!("{path}.kind"),
                format!(
                    "unknown stage kind `{}`{} (known: {})",
                    raw.kind,
                    suggest::hint(&raw.kind, registry.names()),
                    registry.names().join(", ")
                ),
            );
        }
        let mut inputs = Vec::new();
        for (slot, src) in &raw.inputs {
            let Some(slot) = slot.as_str() else {
                ctx.err(format!("{path}.inputs"), "expected string slot names");
                continue;
            };
            let ipath = format!("{path}.inputs.{slot}");
            if !valid_name(slot) || slot.contains('-') {
                ctx.err_named(
                    &ipath,
                    format!(
                        "invalid slot name `{}`: use letters, digits and `_`",
                        slot.escape_debug()
                    ),
                );
                continue;
            }
            let texts: Vec<Option<&str>> = match src {
                serde_yaml::Value::String(s) => vec![Some(s.as_str())],
                serde_yaml::Value::Sequence(seq) if !seq.is_empty() => {
                    seq.iter().map(|x| x.as_str()).collect()
                }
                _ => vec![None],
            };
            let mut sources = Vec::new();
            for t in texts {
                match t.and_then(parse_source) {
                    Some(s) => sources.push(s),
                    None => ctx.err(
                        &ipath,
                        "expected a stage id, `stage[*]`, `stage[variant]`, or a list of them",
                    ),
                }
            }
            inputs.push((slot.to_string(), sources));
        }
        let params = yaml_map(ctx, &raw.params, &format!("{path}.params"));
        let mut variants = Vec::new();
        for (vname, vparams) in &raw.variants {
            let Some(vname) = vname.as_str() else {
                ctx.err(format!("{path}.variants"), "expected string variant names");
                continue;
            };
            let vpath = format!("{path}.variants.{vname}");
            if !valid_name(vname) {
                ctx.err_named(
                    &vpath,
                    format!(
                        "invalid variant name `{}`: use letters, digits, `_` and `-`",
                        vname.escape_debug()
                    ),
                );
                continue;
            }
            match vparams {
                serde_yaml::Value::Mapping(m) => {
                    variants.push((vname.to_string(), yaml_map(ctx, m, &vpath)))
                }
                serde_yaml::Value::Null => variants.push((vname.to_string(), Map::new())),
                _ => ctx.err(&vpath, "expected a mapping of params"),
            }
        }
        let mut sweep = Vec::new();
        for (param, values) in &raw.sweep {
            let Some(param) = param.as_str() else {
                ctx.err(format!("{path}.sweep"), "expected string param names");
                continue;
            };
            let spath = format!("{path}.sweep.{param}");
            match values {
                serde_yaml::Value::Sequence(seq) if !seq.is_empty() => {
                    let mut vals = Vec::new();
                    for (i, item) in seq.iter().enumerate() {
                        match yaml_to_json(item) {
                            Ok(j) => vals.push(j),
                            Err((_, m)) => ctx.err(format!("{spath}[{i}]"), m),
                        }
                    }
                    sweep.push((param.to_string(), vals));
                }
                _ => ctx.err(&spath, "expected a non-empty list of values"),
            }
        }
        parsed.push(Parsed {
            id: id.to_string(),
            kind: raw.kind,
            inputs,
            params,
            variants,
            sweep,
            kind_ok,
        });
    }
    ctx.duplicates();

    // overrides name existing stages
    let mut forced: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for (stage, param, v) in &overrides.set {
        match parsed.iter_mut().find(|p| &p.id == stage) {
            Some(p) => {
                p.sweep.retain(|(q, _)| q != param);
                forced
                    .entry(stage.clone())
                    .or_default()
                    .insert(param.clone(), v.clone());
            }
            None => ctx.err(
                format!("--set {stage}.{param}"),
                format!(
                    "no stage `{stage}` in this pipeline{}",
                    suggest::hint(stage, ids.iter().map(String::as_str))
                ),
            ),
        }
    }
    for (stage, param, values) in &overrides.sweep {
        match parsed.iter_mut().find(|p| &p.id == stage) {
            Some(p) => {
                // both flags on one param: which one was meant cannot be guessed
                if forced.get(stage).is_some_and(|f| f.contains_key(param)) {
                    ctx.err(
                        format!("--sweep {stage}.{param}"),
                        format!(
                            "`--set {stage}.{param}` fixes the same param: give one of the two"
                        ),
                    );
                    continue;
                }
                match p.sweep.iter_mut().find(|(q, _)| q == param) {
                    Some((_, vals)) => *vals = values.clone(),
                    None => p.sweep.push((param.clone(), values.clone())),
                }
            }
            None => ctx.err(
                format!("--sweep {stage}.{param}"),
                format!(
                    "no stage `{stage}` in this pipeline{}",
                    suggest::hint(stage, ids.iter().map(String::as_str))
                ),
            ),
        }
    }

    // inputs: known stages, known slots, required slots present
    for p in &parsed {
        let path = format!("stages.{}", p.id);
        for (slot, sources) in &p.inputs {
            for s in sources {
                if !ids.contains(&s.stage) {
                    ctx.err(
                        format!("{path}.inputs.{slot}"),
                        format!(
                            "input names unknown stage `{}`{}",
                            s.stage,
                            suggest::hint(&s.stage, ids.iter().map(String::as_str))
                        ),
                    );
                } else if let Some(v) = &s.variant {
                    let up = parsed.iter().find(|q| q.id == s.stage);
                    let names: Vec<&str> = up
                        .map(|q| q.variants.iter().map(|(n, _)| n.as_str()).collect())
                        .unwrap_or_default();
                    if !names.contains(&v.as_str()) {
                        ctx.err(
                            format!("{path}.inputs.{slot}"),
                            if names.is_empty() {
                                format!("`{}[{v}]`: stage `{}` has no variants", s.stage, s.stage)
                            } else {
                                format!(
                                    "`{}[{v}]`: stage `{}` has no variant `{v}`{} (its variants: {})",
                                    s.stage,
                                    s.stage,
                                    suggest::hint(v, names.iter().copied()),
                                    names.join(", ")
                                )
                            },
                        );
                    }
                }
            }
        }
        let Some(kind) = registry.get(&p.kind) else {
            continue;
        };
        if let Slots::Fixed(slots) = kind.inputs() {
            for (slot, sources) in &p.inputs {
                match slots.iter().find(|s| s.name == slot) {
                    None => ctx.err(
                        format!("{path}.inputs.{slot}"),
                        format!(
                            "kind `{}` has no input `{slot}`{} (expected: {})",
                            p.kind,
                            suggest::hint(slot, slots.iter().map(|s| s.name)),
                            slots.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                        ),
                    ),
                    Some(s) if !s.many && (sources.len() > 1 || sources.iter().any(|x| x.gather)) => ctx.err(
                        format!("{path}.inputs.{slot}"),
                        format!("input `{slot}` of kind `{}` takes one artifact, not a list or `[*]`", p.kind),
                    ),
                    Some(_) => {}
                }
            }
            for s in slots.iter().filter(|s| s.required) {
                if !p.inputs.iter().any(|(slot, _)| slot == s.name) {
                    ctx.err(
                        format!("{path}.inputs"),
                        format!("missing input `{}` (kind `{}` needs it)", s.name, p.kind),
                    );
                }
            }
        }
    }

    // cycles, and the topological order
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let nodes: Vec<_> = (0..parsed.len()).map(|i| g.add_node(i)).collect();
    let index: BTreeMap<&str, usize> = parsed
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id.as_str(), i))
        .collect();
    for (i, p) in parsed.iter().enumerate() {
        for (_, sources) in &p.inputs {
            for s in sources {
                if let Some(&j) = index.get(s.stage.as_str()) {
                    g.update_edge(nodes[j], nodes[i], ());
                }
            }
        }
    }
    for scc in petgraph::algo::tarjan_scc(&g) {
        let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<usize> = scc.iter().map(|n| g[*n]).collect();
        let cycle = find_cycle(
            &parsed
                .iter()
                .map(|p| deps(&p.inputs, &index))
                .collect::<Vec<_>>(),
            &members,
        );
        let names: Vec<&str> = cycle.iter().map(|&i| parsed[i].id.as_str()).collect();
        let first = names.first().copied().unwrap_or_default();
        ctx.err(
            format!("stages.{first}.inputs"),
            format!("the stages form a cycle: {} -> {first}", names.join(" -> ")),
        );
    }
    // stages on a cycle have no place in the order (their params go unchecked; the cycle is
    // already an error)
    let order = topo_order(
        &parsed
            .iter()
            .map(|p| deps(&p.inputs, &index))
            .collect::<Vec<_>>(),
    );

    // params: every point of each stage's own grid is normalized by its kind
    let mut stages = Vec::new();
    for &i in &order {
        let p = &parsed[i];
        if !p.kind_ok {
            continue;
        }
        let Some(kind) = registry.get(&p.kind) else {
            continue;
        };
        let spath = format!("stages.{}", p.id);
        let mut base = Vec::new();
        if let Some(d) = defaults.get(&p.kind) {
            base.push(Layer {
                values: d.clone(),
                origin: format!("defaults.{}", p.kind),
            });
        }
        base.push(Layer {
            values: p.params.clone(),
            origin: format!("{spath}.params"),
        });
        let variant_layers: Vec<Option<(String, Layer)>> = if p.variants.is_empty() {
            vec![None]
        } else {
            p.variants
                .iter()
                .map(|(n, m)| {
                    Some((
                        n.clone(),
                        Layer {
                            values: m.clone(),
                            origin: format!("{spath}.variants.{n}"),
                        },
                    ))
                })
                .collect()
        };
        // refuse a grid too large to expand before expanding it (ten 10-value sweeps would be
        // 10^10 points, each normalized and keyed)
        let points = p
            .sweep
            .iter()
            .fold(variant_layers.len(), |n, (_, v)| n.saturating_mul(v.len()));
        if points > MAX_GRID_POINTS {
            ctx.err(
                if p.sweep.is_empty() {
                    format!("{spath}.variants")
                } else {
                    format!("{spath}.sweep")
                },
                format!(
                    "the stage's grid has {} points (variants x sweep values), more than the \
                     {MAX_GRID_POINTS} allowed: split the sweep into several pipelines or runs",
                    if points == usize::MAX {
                        "too many".to_string()
                    } else {
                        points.to_string()
                    }
                ),
            );
            continue;
        }
        let mut grid = Vec::new();
        let mut seen_errors = BTreeSet::new();
        for variant in &variant_layers {
            for point in cartesian(&p.sweep) {
                let mut coords = Vec::new();
                let mut layers: Vec<&Layer> = base.iter().collect();
                if let Some((n, l)) = variant {
                    coords.push((
                        Axis {
                            stage: p.id.clone(),
                            param: None,
                        },
                        n.clone(),
                    ));
                    layers.push(l);
                }
                let mut sweep_layer = Layer {
                    values: Map::new(),
                    origin: format!("{spath}.sweep"),
                };
                for (param, v) in &point {
                    coords.push((
                        Axis {
                            stage: p.id.clone(),
                            param: Some(param.clone()),
                        },
                        label(v),
                    ));
                    sweep_layer.values.insert(param.clone(), v.clone());
                }
                let forced_layer = forced.get(&p.id).map(|m| Layer {
                    values: m.clone(),
                    origin: format!("--set {}", p.id),
                });
                layers.push(&sweep_layer);
                if let Some(f) = &forced_layer {
                    layers.push(f);
                }
                let mut merged = Map::new();
                let mut origin: BTreeMap<String, String> = BTreeMap::new();
                for l in &layers {
                    for (k, v) in &l.values {
                        merged.insert(k.clone(), v.clone());
                        origin.insert(k.clone(), l.origin.clone());
                    }
                }
                match kind.normalize(Value::Object(merged), &nctx) {
                    Ok(params) => {
                        let connected: Vec<&str> =
                            p.inputs.iter().map(|(slot, _)| slot.as_str()).collect();
                        for ParamError { path, message } in kind.check_inputs(&params, &connected) {
                            let at = if path.is_empty() {
                                spath.clone()
                            } else {
                                format!("{spath}.{path}")
                            };
                            if seen_errors.insert((at.clone(), message.clone())) {
                                ctx.err(at, message);
                            }
                        }
                        let mut external = BTreeMap::new();
                        for ext in kind.externals(&params) {
                            let hash = stats.hash(&ext.path);
                            match hash {
                                Ok(h) => {
                                    external.insert(ext.name.clone(), h);
                                }
                                Err(e) => {
                                    let at = match origin.get(&ext.name) {
                                        Some(o) => format!("{o}.{}", ext.name),
                                        None => format!("{spath}.params.{}", ext.name),
                                    };
                                    if seen_errors.insert((at.clone(), e.clone())) {
                                        ctx.err(at, e);
                                    }
                                }
                            }
                        }
                        let key_params = kind.key_params(&params);
                        grid.push(GridPoint {
                            coords,
                            params,
                            key_params,
                            external,
                        });
                    }
                    Err(errs) => {
                        for ParamError { path, message } in errs {
                            let head = path
                                .split(['.', '['])
                                .next()
                                .unwrap_or_default()
                                .to_string();
                            let field = if head.is_empty() {
                                unknown_field(&message)
                            } else {
                                Some(head.clone())
                            };
                            let at = match field
                                .as_ref()
                                .and_then(|f| origin.get(f).map(|o| (f, o)))
                            {
                                Some((f, o)) if o.ends_with(".sweep") || o.starts_with("--set") => {
                                    format!("{o}.{f}{}", &path[head.len().min(path.len())..])
                                }
                                Some((_, o)) if !head.is_empty() => format!("{o}.{path}"),
                                Some((f, o)) => format!("{o}.{f}"),
                                None if path.is_empty() => format!("{spath}.params"),
                                None => format!("{spath}.params.{path}"),
                            };
                            if seen_errors.insert((at.clone(), message.clone())) {
                                ctx.err(at, message);
                            }
                        }
                    }
                }
            }
        }
        stages.push(StageSpec {
            id: p.id.clone(),
            kind: p.kind.clone(),
            inputs: p.inputs.clone(),
            grid,
        });
    }

    if !ctx.errors.is_empty() {
        return None;
    }
    // fan-out multiplies grids along the DAG: count the instances before they are built
    if let Err(over) = crate::graph::count_instances(&stages, MAX_INSTANCES) {
        ctx.err(
            format!("stages.{}", over.stage),
            format!(
                "the pipeline expands into more than {MAX_INSTANCES} nodes by this stage (its \
                 {} grid points times the instances of its inputs, with {} instances before it): \
                 narrow the sweeps, or gather an input with `stage[*]`",
                over.grid, over.before
            ),
        );
        return None;
    }
    let name = name.unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    Some(Pipeline {
        name,
        file: file.to_path_buf(),
        dir,
        stages,
    })
}

/// serde_yaml's refusal of an integer beyond 64 bits (`a.b: invalid type: integer `N` as u128,
/// expected any YAML value`) -> (`a.b`, `N`).
fn too_wide_integer(message: &str) -> Option<(String, String)> {
    let (path, rest) = match message.split_once(": invalid type: integer `") {
        Some((p, r)) => (p.to_string(), r),
        None => (
            String::new(),
            message.strip_prefix("invalid type: integer `")?,
        ),
    };
    let (n, tail) = rest.split_once('`')?;
    (tail.starts_with(" as u128") || tail.starts_with(" as i128")).then(|| (path, n.to_string()))
}

/// `unknown field `x`, expected ...` -> `x` (serde reports unknown fields at the parent path).
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next().map(str::to_string)
}

fn deps(inputs: &[(String, Vec<Source>)], index: &BTreeMap<&str, usize>) -> Vec<usize> {
    let mut d: Vec<usize> = inputs
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter_map(|s| index.get(s.stage.as_str()).copied())
        .collect();
    d.sort_unstable();
    d.dedup();
    d
}

/// The cartesian product of sweep axes, in the order written (last axis fastest).
fn cartesian(axes: &[(String, Vec<Value>)]) -> Vec<Vec<(String, Value)>> {
    let mut out: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (param, values) in axes {
        let mut next = Vec::with_capacity(out.len() * values.len());
        for prefix in &out {
            for v in values {
                let mut p = prefix.clone();
                p.push((param.clone(), v.clone()));
                next.push(p);
            }
        }
        out = next;
    }
    out
}

/// Kahn's algorithm, ties broken by file order; stages on a cycle are left out.
fn topo_order(deps: &[Vec<usize>]) -> Vec<usize> {
    let n = deps.len();
    let mut indeg: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            users[j].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert(u);
            }
        }
    }
    order
}

/// One cycle through the strongly connected `members`, as a list of stages in input order.
fn find_cycle(deps: &[Vec<usize>], members: &BTreeSet<usize>) -> Vec<usize> {
    let Some(&start) = members.first() else {
        return Vec::new();
    };
    // walk "is an input of" edges inside the component until we come back to start (BFS for the
    // shortest cycle through start, so the message is short and complete)
    let mut users: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in members {
        for &j in &deps[i] {
            if members.contains(&j) {
                users.entry(j).or_default().push(i);
            }
        }
    }
    let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(cur) = queue.pop_front() {
        for &next in users.get(&cur).map(Vec::as_slice).unwrap_or(&[]) {
            if next == start {
                let mut path = vec![cur];
                let mut c = cur;
                while c != start {
                    c = prev[&c];
                    path.push(c);
                }
                path.reverse();
                return path;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(next) {
                e.insert(cur);
                queue.push_back(next);
            }
        }
    }
    vec![start]
}
