//! `dataset`: reads or generates an image dataset into the canonical artifact.
//!
//! Sources:
//! - `cifar10` / `cifar100`: the official binary release under `root` (the extracted folder,
//!   its parent, or the `.tar.gz`); with `download: true` the official archive is fetched into
//!   `root` when missing and its md5 checked, and the data is read from it.
//! - `imagefolder`: `train/<class>/*.{jpg,jpeg,png}` and `test/<class>/*` under `root`, a folder
//!   or a `.tar` / `.tar.gz` read without unpacking.
//! - `synthetic`: seeded coloured shapes (`n_classes`, `n_train`, `n_test`), no `root`.
//! - `auto`: one of `cifar10`, `cifar100` or `imagefolder`, decided at plan time from what is
//!   at `root` ([`detect_source`]) and written into the normalized params, so `auto` keys
//!   exactly as the concrete source written by hand:
//!
//! | at `root` | resolves to |
//! |---|---|
//! | a folder holding `data_batch_1.bin` or `test_batch.bin`, a `cifar-10-batches-bin/` folder or a `cifar-10-binary.tar.gz` | `cifar10` |
//! | the same for CIFAR-100 (`train.bin` / `test.bin`, `cifar-100-binary/`, `cifar-100-binary.tar.gz`) | `cifar100` |
//! | a `.tar.gz` / `.tgz` / `.tar` named like the official archive, or whose first entry is under `cifar-10-batches-bin/` (`cifar-100-binary/`) | `cifar10` (`cifar100`) |
//! | nothing (no such path, or an empty folder) with `download: true` | `cifar10` |
//! | a folder with `train/` and `test/` sub-folders (or one wrapping folder holding them) | `imagefolder` |
//! | any other `.tar` / `.tar.gz` / `.tgz` | `imagefolder` |
//!
//! Anything else (a missing path without `download`, a folder holding neither layout or both,
//! another kind of file) is an error on `root` naming the resolved path and what was expected.
//! The resolved params are checked again, so what the resolved source does not take
//! (`download` for an image folder, another `image_size` for CIFAR) fails as if written. Only
//! the first tar block of an archive is read to decide.
//!
//! `root` may use `${VAR}` / `${VAR:-default}` and is relative to the pipeline file. The key
//! holds the *content* of what is read (the CIFAR folder or archive, the image folder or
//! archive; hashed through the stat cache), never its path; with `download: true` it holds
//! the official md5 instead, so it does not change when the download happens.
//!
//! Outputs: `data.safetensors` (see [`crate::data::tensor_io`]), `classes.json` (the class
//! names, label order) and `metrics.json`: `n_train`, `n_test`, `n_classes`,
//! `train_per_class` / `test_per_class` (class name -> count), and the per-channel `mean` /
//! `std` of the train pixels in `[0, 1]` (population std).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pipe_engine::{BoxError, External, NormalizeCtx, ParamError, Slots, StageCtx, TypedStage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::synthetic::MAX_CLASSES;
use crate::data::{
    self, CifarKind, Hooks, ReadOptions, SyntheticConfig, cifar, read_cifar, read_image_folder,
    write_dataset,
};

/// The `dataset` kind.
pub struct Dataset;

/// Where the images come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// CIFAR-10 binary release.
    Cifar10,
    /// CIFAR-100 binary release (fine labels).
    Cifar100,
    /// `train/<class>/*` and `test/<class>/*` images, in a folder or a tar archive.
    Imagefolder,
    /// Seeded procedural shapes.
    Synthetic,
    /// CIFAR-10 from the Hugging Face hub (`--features hub`; network needed).
    Hf,
    /// `cifar10`, `cifar100` or `imagefolder`, whichever `root` holds (resolved at plan time).
    Auto,
}

impl Source {
    fn cifar(self) -> Option<CifarKind> {
        match self {
            Source::Cifar10 => Some(CifarKind::Cifar10),
            Source::Cifar100 => Some(CifarKind::Cifar100),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Source::Cifar10 => "cifar10",
            Source::Cifar100 => "cifar100",
            Source::Imagefolder => "imagefolder",
            Source::Synthetic => "synthetic",
            Source::Hf => "hf",
            Source::Auto => "auto",
        }
    }
}

/// Default number of synthetic classes.
pub const SYNTHETIC_CLASSES: usize = 10;
/// Default number of synthetic training images.
pub const SYNTHETIC_TRAIN: usize = 5_000;
/// Default number of synthetic test images.
pub const SYNTHETIC_TEST: usize = 1_000;

/// Ceiling of the pixels of one synthetic split (8 GiB).
pub const MAX_SYNTHETIC_BYTES: usize = 8 << 30;

fn default_image_size() -> u32 {
    32
}

/// Params of `dataset`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    /// Where the images come from.
    pub source: Source,
    /// The data folder or archive (all sources but `synthetic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// CIFAR only: fetch the official archive into `root` when missing (md5-checked).
    #[serde(default)]
    pub download: bool,
    /// Keep a seeded balanced subset of this many training images per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_per_class: Option<usize>,
    /// Keep a seeded balanced subset of this many test images per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_per_class: Option<usize>,
    /// Seed of the subsets and of the synthetic images.
    #[serde(default)]
    pub seed: u64,
    /// Synthetic only: number of classes (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_classes: Option<usize>,
    /// Synthetic only: training images (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_train: Option<usize>,
    /// Synthetic only: test images (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_test: Option<usize>,
    /// Side of the square images, 8..=512 (32 for CIFAR unless `resize`).
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    /// Resize images of another size to `image_size` instead of failing.
    #[serde(default)]
    pub resize: bool,
}

/// Output files.
pub const OUTPUTS: [&str; 3] = [data::tensor_io::DATA_FILE, "classes.json", "metrics.json"];

impl DatasetParams {
    fn root_path(&self) -> Result<PathBuf, BoxError> {
        self.root
            .as_deref()
            .map(PathBuf::from)
            .ok_or_else(|| format!("source {} needs `root`", self.source.name()).into())
    }
    fn read_options(&self) -> ReadOptions {
        ReadOptions {
            image_size: self.image_size,
            resize: self.resize,
        }
    }
}

impl TypedStage for Dataset {
    const KIND: &'static str = "dataset";
    const VERSION: u32 = 1;
    type Params = DatasetParams;

    fn inputs() -> Slots {
        Slots::Fixed(&[])
    }

    fn check(p: &DatasetParams) -> Vec<ParamError> {
        let mut e = Vec::new();
        let synthetic = matches!(p.source, Source::Synthetic | Source::Hf);
        if p.source == Source::Hf && !cfg!(feature = "hub") {
            e.push(ParamError::new(
                "source",
                "source hf needs pipe built with `--features hub` (it downloads from the Hugging Face hub)",
            ));
        }
        let src = p.source.name();
        if synthetic {
            if p.root.is_some() {
                e.push(ParamError::new(
                    "root",
                    format!("source {src} reads no `root`"),
                ));
            }
            if p.resize {
                e.push(ParamError::new(
                    "resize",
                    "source synthetic draws its images at image_size: nothing to resize",
                ));
            }
            if let Some(k) = p.n_classes
                && !(2..=MAX_CLASSES).contains(&k)
            {
                e.push(ParamError::new(
                    "n_classes",
                    format!("expected a value in 2..={MAX_CLASSES}, got {k}"),
                ));
            }
            // the pixels are allocated at once: a typo must not abort the process
            let bytes_per_image = 3 * (p.image_size as usize).pow(2);
            let most = MAX_SYNTHETIC_BYTES / bytes_per_image.max(1);
            for (name, v) in [("n_train", p.n_train), ("n_test", p.n_test)] {
                if let Some(n) = v
                    && n > most
                {
                    e.push(ParamError::new(
                        name,
                        format!(
                            "expected at most {most} images of {0}x{0} ({1} GiB of pixels), got {n}",
                            p.image_size,
                            MAX_SYNTHETIC_BYTES >> 30
                        ),
                    ));
                }
            }
            let k = p.n_classes.unwrap_or(SYNTHETIC_CLASSES);
            if let Some(n) = p.n_train
                && n < k
            {
                e.push(ParamError::new(
                    "n_train",
                    format!("expected at least one image per class ({k}), got {n}"),
                ));
            }
        } else {
            if p.root.as_deref().is_none_or(|r| r.trim().is_empty()) {
                e.push(ParamError::new(
                    "root",
                    format!("source {src} needs `root`: the data folder or archive"),
                ));
            }
            for (name, v) in [
                ("n_classes", p.n_classes),
                ("n_train", p.n_train),
                ("n_test", p.n_test),
            ] {
                if v.is_some() {
                    e.push(ParamError::new(
                        name,
                        format!("only source synthetic takes `{name}`"),
                    ));
                }
            }
        }
        if p.download && p.source.cifar().is_none() && p.source != Source::Auto {
            e.push(ParamError::new(
                "download",
                format!("only cifar10 and cifar100 can be downloaded, not {src}"),
            ));
        }
        for (name, v) in [
            ("train_per_class", p.train_per_class),
            ("test_per_class", p.test_per_class),
        ] {
            if v == Some(0) {
                e.push(ParamError::new(name, "expected at least 1, got 0"));
            }
        }
        if !(8..=512).contains(&p.image_size) {
            e.push(ParamError::new(
                "image_size",
                format!("expected a value in 8..=512, got {}", p.image_size),
            ));
        } else if p.source.cifar().is_some() && p.image_size != 32 && !p.resize {
            e.push(ParamError::new(
                "image_size",
                format!(
                    "CIFAR images are 32x32, not {0}x{0}: set `resize: true` to resize them",
                    p.image_size
                ),
            ));
        }
        e
    }

    fn canonicalize(
        mut p: DatasetParams,
        ctx: &NormalizeCtx<'_>,
    ) -> Result<DatasetParams, Vec<ParamError>> {
        if p.source == Source::Hf {
            return Ok(p);
        }
        if p.source == Source::Synthetic {
            // defaults written out, so `n_classes: 10` written or defaulted keys the same
            p.n_classes.get_or_insert(SYNTHETIC_CLASSES);
            p.n_train.get_or_insert(SYNTHETIC_TRAIN);
            p.n_test.get_or_insert(SYNTHETIC_TEST);
            return Ok(p);
        }
        let Some(raw) = &p.root else {
            return Ok(p);
        };
        let expanded =
            pipe_engine::value::expand_env(raw).map_err(|e| vec![ParamError::new("root", e)])?;
        let mut root = ctx.pipeline_dir.join(expanded);
        if p.source == Source::Auto {
            p.source =
                detect_source(&root, p.download).map_err(|e| vec![ParamError::new("root", e)])?;
            // what the resolved source does not accept (`download` of an image folder,
            // `image_size` of CIFAR) fails as if it had been written
            let errors = Self::check(&p);
            if !errors.is_empty() {
                return Err(errors);
            }
        }
        // CIFAR without download: key exactly what is read (the `.bin` folder or the archive),
        // so `data/` and `data/cifar-10-batches-bin` share a key and other files in `data/`
        // do not count
        if let Some(kind) = p.source.cifar()
            && !p.download
            && root.exists()
        {
            root = cifar::locate(kind, &root)
                .map_err(|e| vec![ParamError::new("root", e.to_string())])?
                .path()
                .to_path_buf();
        }
        p.root = Some(root.display().to_string());
        Ok(p)
    }

    fn externals(p: &DatasetParams) -> Vec<External> {
        match (&p.root, p.source, p.download) {
            (Some(root), s, false) if !matches!(s, Source::Synthetic | Source::Hf) => {
                vec![External {
                    name: "root".into(),
                    path: root.into(),
                }]
            }
            _ => Vec::new(),
        }
    }

    fn key_params(p: &DatasetParams) -> Value {
        let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.remove("root");
            if p.download
                && let Some(kind) = p.source.cifar()
            {
                m.insert("archive_md5".into(), Value::from(kind.md5()));
            }
            if p.source == Source::Hf {
                // the hub's content cannot be hashed before downloading: key what is fetched
                m.insert("hub".into(), Value::from(data::hub_source()));
            }
        }
        v
    }

    fn outputs(_: &DatasetParams) -> Vec<String> {
        OUTPUTS.iter().map(|s| (*s).to_string()).collect()
    }

    fn run(p: &DatasetParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let ctx = &*ctx;
        let progress = |done: u64, total: u64, msg: &str| ctx.progress(done, total, msg);
        let cancelled = || ctx.is_cancelled();
        let hooks = Hooks {
            progress: &progress,
            cancelled: &cancelled,
        };
        let opts = p.read_options();
        let mut skipped = 0;
        let d = match p.source {
            Source::Synthetic => data::synthetic(&SyntheticConfig {
                n_classes: p.n_classes.unwrap_or(SYNTHETIC_CLASSES),
                n_train: p.n_train.unwrap_or(SYNTHETIC_TRAIN),
                n_test: p.n_test.unwrap_or(SYNTHETIC_TEST),
                image_size: p.image_size,
                seed: p.seed,
            }),
            Source::Hf => {
                #[cfg(feature = "hub")]
                {
                    ctx.log("loading CIFAR-10 from the Hugging Face hub (candle-datasets)");
                    data::hub::load_cifar10()?
                }
                #[cfg(not(feature = "hub"))]
                return Err("source hf needs pipe built with `--features hub`".into());
            }
            Source::Auto => {
                return Err(
                    "internal: source auto is resolved when the pipeline is planned".into(),
                );
            }
            Source::Imagefolder => {
                let root = p.root_path()?;
                let f = read_image_folder(&root, &opts, &hooks)?;
                skipped = f.skipped.len();
                f.dataset
            }
            Source::Cifar10 | Source::Cifar100 => {
                let kind = p.source.cifar().ok_or("not a CIFAR source")?;
                let root = p.root_path()?;
                let root = if p.download {
                    if !root.join(kind.archive_name()).is_file() && !root.is_file() {
                        ctx.log(format!("downloading {}", kind.url()));
                    }
                    cifar::fetch_archive(kind, &root, ctx.scratch_dir(), &hooks)?
                } else {
                    root
                };
                read_cifar(kind, &root, &opts, &hooks)?
            }
        };
        let d = d.balanced_subset(p.train_per_class, p.test_per_class, p.seed)?;
        hooks.check()?;
        write_dataset(&ctx.out_path(data::tensor_io::DATA_FILE), &d)?;
        crate::params::write_json(&ctx.out_path("classes.json"), &json!(d.classes))?;
        crate::params::write_json(&ctx.out_path("metrics.json"), &metrics(&d))?;
        ctx.log(format!(
            "{} train / {} test images of {} classes, {}x{}; {skipped} non-image files skipped",
            d.train.n,
            d.test.n,
            d.classes.len(),
            d.train.h,
            d.train.w
        ));
        Ok(())
    }
}

/// The CIFAR sources `auto` can resolve to, with the release layout of each.
const CIFAR_DIRS: [(Source, CifarKind); 2] = [
    (Source::Cifar10, CifarKind::Cifar10),
    (Source::Cifar100, CifarKind::Cifar100),
];

/// What `source: auto` resolves to for `root` (see the module docs' table).
///
/// # Errors
/// A message naming `root` and what was expected, when it holds none of the layouts (or
/// both a CIFAR release and an image folder).
pub fn detect_source(root: &Path, download: bool) -> Result<Source, String> {
    let expected = "expected the CIFAR-10 (or CIFAR-100) binary release (a folder holding \
                    data_batch_1.bin, its parent holding cifar-10-batches-bin/, or \
                    cifar-10-binary.tar.gz), an image folder with train/ and test/ sub-folders \
                    or a .tar / .tar.gz of one, or nothing at root with `download: true`";
    let shown = root.display();
    let meta = match std::fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if download {
                Ok(Source::Cifar10)
            } else {
                Err(format!("source auto: {shown} does not exist; {expected}"))
            };
        }
        Err(e) => return Err(format!("source auto: reading {shown}: {e}")),
    };
    if meta.is_file() {
        return detect_archive(root)
            .map_err(|why| format!("source auto: {shown} {why}; {expected}"));
    }
    let cifar: Vec<Source> = CIFAR_DIRS
        .iter()
        .filter(|(_, kind)| cifar::locate(*kind, root).is_ok())
        .map(|(s, _)| *s)
        .collect();
    let folder = is_image_folder(root);
    match (cifar.as_slice(), folder) {
        ([s], false) => Ok(*s),
        ([], true) => Ok(Source::Imagefolder),
        ([], false) if download && is_empty_dir(root) => Ok(Source::Cifar10),
        ([], false) => Err(format!(
            "source auto: {shown} holds neither layout; {expected}"
        )),
        _ => Err(format!(
            "source auto: {shown} holds more than one dataset ({}{}); write `source` out",
            cifar
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", "),
            if folder { ", imagefolder" } else { "" }
        )),
    }
}

/// Whether `dir` (or its single non-hidden sub-folder, as the ImageFolder reader allows)
/// has both `train/` and `test/`.
fn is_image_folder(dir: &Path) -> bool {
    let both = |d: &Path| d.join("train").is_dir() && d.join("test").is_dir();
    if both(dir) {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let subdirs: Vec<PathBuf> = entries
        .filter_map(std::result::Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.') && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    matches!(subdirs.as_slice(), [one] if both(one))
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut e| e.next().is_none())
}

/// A file `root`: the official CIFAR archive (by name, or by the top folder of its first
/// entry) or another tar archive (an image folder); the error says why not.
fn detect_archive(root: &Path) -> Result<Source, String> {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if let Some((s, _)) = CIFAR_DIRS.iter().find(|(_, k)| name == k.archive_name()) {
        return Ok(*s);
    }
    if ![".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        return Err("is a file but not a .tar / .tar.gz / .tgz archive".into());
    }
    let top = archive_top(root).map_err(|e| format!("cannot be read as a tar archive: {e}"))?;
    Ok(CIFAR_DIRS
        .iter()
        .find(|(_, k)| top.as_deref() == Some(k.dir_name()))
        .map_or(Source::Imagefolder, |(s, _)| *s))
}

/// The first path component of the first entry of a `.tar` or gzip-compressed tar (only
/// its first block is read); `None` for an empty archive.
fn archive_top(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let gz = f.read(&mut magic)? == 2 && magic == [0x1f, 0x8b];
    let f = std::fs::File::open(path)?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    let mut tar = tar::Archive::new(reader);
    let Some(entry) = tar.entries()?.next() else {
        return Ok(None);
    };
    let entry = entry?;
    let path = entry.path()?;
    Ok(path.components().find_map(|c| match c {
        std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
        _ => None,
    }))
}

/// The `metrics.json` of a dataset.
pub fn metrics(d: &data::Dataset) -> Value {
    let per_class = |s: &data::Split| -> BTreeMap<String, usize> {
        d.classes
            .iter()
            .cloned()
            .zip(s.counts(d.classes.len()))
            .collect()
    };
    let (mean, std) = d.train.stats();
    json!({
        "n_train": d.train.n,
        "n_test": d.test.n,
        "n_classes": d.classes.len(),
        "train_per_class": per_class(&d.train),
        "test_per_class": per_class(&d.test),
        "mean": mean,
        "std": std,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;
    use pipe_engine::{Overrides, Registry, StatCache, graph, spec};
    use std::path::Path;
    use std::sync::atomic::AtomicBool;

    fn registry() -> Registry {
        let mut r = Registry::new();
        crate::register_all(&mut r);
        r
    }

    fn normalize(v: Value) -> Result<Value, Vec<ParamError>> {
        let reg = registry();
        let kind = reg.get("dataset").expect("dataset is registered");
        kind.normalize(
            v,
            &NormalizeCtx {
                pipeline_dir: Path::new("/data/pipelines"),
            },
        )
    }

    #[test]
    fn params_defaults_and_checks() {
        let v = normalize(json!({"source": "synthetic"})).expect("valid");
        assert_eq!(
            v,
            json!({"source": "synthetic", "download": false, "seed": 0, "n_classes": 10,
                   "n_train": 5000, "n_test": 1000, "image_size": 32, "resize": false})
        );
        let v = normalize(
            json!({"source": "imagefolder", "root": "${PIPE_TEST_NO_SUCH_VAR:-imgs.tar}"}),
        )
        .expect("valid");
        assert_eq!(v["root"], json!("/data/pipelines/imgs.tar"));
        let err = |v: Value| -> Vec<String> {
            normalize(v)
                .expect_err("invalid")
                .into_iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect()
        };
        assert_eq!(
            err(json!({"source": "cifar10"})),
            ["root: source cifar10 needs `root`: the data folder or archive"]
        );
        assert_eq!(
            err(json!({"source": "cifar10", "root": "x", "image_size": 64})),
            ["image_size: CIFAR images are 32x32, not 64x64: set `resize: true` to resize them"]
        );
        assert_eq!(
            err(json!({"source": "imagefolder", "root": "x", "download": true, "n_train": 3})),
            [
                "n_train: only source synthetic takes `n_train`",
                "download: only cifar10 and cifar100 can be downloaded, not imagefolder"
            ]
        );
        assert_eq!(
            err(
                json!({"source": "synthetic", "n_classes": 1, "train_per_class": 0, "image_size": 4})
            ),
            [
                "n_classes: expected a value in 2..=64, got 1",
                "train_per_class: expected at least 1, got 0",
                "image_size: expected a value in 8..=512, got 4"
            ]
        );
        let e = err(json!({"source": "synthetic", "lr": 1}));
        assert!(e[0].contains("unknown field `lr`"), "{e:?}");
        let e = err(json!({"source": "hf"}));
        if !cfg!(feature = "hub") {
            assert!(e[0].contains("--features hub"), "{e:?}");
        }
        let e = err(json!({"source": "flickr", "root": "x"}));
        assert!(
            e[0].starts_with("source: unknown variant `flickr`"),
            "{e:?}"
        );
    }

    #[test]
    fn download_keys_the_official_md5_not_the_path() {
        let reg = registry();
        let kind = reg.get("dataset").expect("registered");
        let v = normalize(json!({"source": "cifar10", "root": "nowhere", "download": true}))
            .expect("valid without the data present");
        assert!(kind.externals(&v).is_empty());
        let k = kind.key_params(&v);
        assert_eq!(k["archive_md5"], json!("c32a1d4ab5d03f1284b67883e8d87530"));
        assert!(k.get("root").is_none());
        let v = normalize(json!({"source": "cifar10", "root": "nowhere"})).expect("valid");
        assert_eq!(
            kind.externals(&v),
            [External {
                name: "root".into(),
                path: "/data/pipelines/nowhere".into()
            }]
        );
    }

    fn png(seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([seed.wrapping_mul(x as u8), y as u8, seed])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut t = tar::Builder::new(Vec::new());
        for (p, b) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(b.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, p, b.as_slice()).expect("append");
        }
        t.into_inner().expect("tar")
    }

    fn node_key(dir: &Path, yaml: &str) -> String {
        let file = dir.join("p.yaml");
        std::fs::write(&file, yaml).expect("write pipeline");
        let reg = registry();
        let p = spec::load_with(
            &file,
            &reg,
            &Overrides::default(),
            &mut StatCache::in_memory(),
        )
        .unwrap_or_else(|e| panic!("valid pipeline: {e}"));
        graph::build(p, &reg).nodes[0].key.to_string()
    }

    #[test]
    fn end_to_end_through_the_engine() {
        let tmp = TempDir::new("dataset-e2e");
        let dir = tmp.path();
        let mut files = Vec::new();
        for (split, n) in [("train", 4u8), ("test", 2)] {
            for class in ["cat", "ant"] {
                for i in 0..n {
                    files.push((format!("{split}/{class}/{i}.png"), png(i + n)));
                }
            }
        }
        std::fs::write(dir.join("a.tar"), tar_of(&files)).expect("write");
        std::fs::create_dir_all(dir.join("copy")).expect("mkdir");
        std::fs::copy(dir.join("a.tar"), dir.join("copy/b.tar")).expect("copy");
        let yaml = |root: &str| {
            format!(
                "stages:\n  data:\n    kind: dataset\n    params: {{source: imagefolder, root: {root}, train_per_class: 3, seed: 7}}\n"
            )
        };
        let ka = node_key(dir, &yaml("a.tar"));
        assert_eq!(
            ka,
            node_key(dir, &yaml("copy/b.tar")),
            "same content, other path"
        );
        assert_ne!(
            ka,
            node_key(dir, &yaml("a.tar").replace("seed: 7", "seed: 8")),
            "params are keyed"
        );

        // run it
        let reg = registry();
        let store = pipe_cache::Store::open(dir.join("store")).expect("open store");
        let file = dir.join("p.yaml");
        std::fs::write(&file, yaml("a.tar")).expect("write");
        let p = spec::load(&file, &reg, &Overrides::default()).expect("valid");
        let plan = pipe_engine::plan::plan(graph::build(p, &reg), &store, &[]).expect("plan");
        let opts = pipe_engine::RunOptions {
            jobs: 1,
            gpus: 0,
            keep_going: false,
            pipe_version: "test".into(),
            ..Default::default()
        };
        let cancel = AtomicBool::new(false);
        let s =
            pipe_engine::exec::run(&plan, &reg, &store, &opts, &cancel, &mut pipe_engine::Quiet);
        assert!(!s.failed(), "{:?}", s.results);
        let entry = store
            .get(plan.graph.nodes[0].key.key())
            .expect("store")
            .expect("committed");
        let d = data::load_dataset(&entry.file("data.safetensors").expect("listed")).expect("load");
        assert_eq!(d.classes, ["ant", "cat"]);
        assert_eq!((d.train.n, d.test.n), (6, 4));
        assert_eq!(d.train.counts(2), [3, 3]);
        let classes: Value = serde_json::from_slice(
            &std::fs::read(entry.file("classes.json").expect("listed")).expect("read"),
        )
        .expect("json");
        assert_eq!(classes, json!(["ant", "cat"]));
        let m: Value = serde_json::from_slice(
            &std::fs::read(entry.file("metrics.json").expect("listed")).expect("read"),
        )
        .expect("json");
        assert_eq!(m["n_train"], json!(6));
        assert_eq!(m["n_test"], json!(4));
        assert_eq!(m["n_classes"], json!(2));
        assert_eq!(m["train_per_class"], json!({"ant": 3, "cat": 3}));
        assert_eq!(m["test_per_class"], json!({"ant": 2, "cat": 2}));
        // blue is the constant `seed` byte = i + 4 of each train image
        let blue: f64 = (0..6)
            .map(|i| f64::from(d.train.image(i)[2048]) / 255.0)
            .sum::<f64>()
            / 6.0;
        let mean_b = m["mean"][2].as_f64().expect("mean");
        assert!((mean_b - blue).abs() < 1e-12, "{mean_b} vs {blue}");
        let (mean, std) = d.train.stats();
        assert_eq!(m["mean"], json!(mean));
        assert_eq!(m["std"], json!(std));

        // other content: other key
        let mut files2 = files.clone();
        files2[0].1 = png(99);
        std::fs::write(dir.join("a.tar"), tar_of(&files2)).expect("write");
        assert_ne!(ka, node_key(dir, &yaml("a.tar")), "content is keyed");
    }

    #[test]
    fn cifar_root_is_narrowed_to_what_is_read() {
        let tmp = TempDir::new("dataset-cifar-root");
        let dir = tmp.path();
        fake_cifar(&dir.join("data"));
        let yaml = |root: &str| {
            format!(
                "stages:\n  data: {{kind: dataset, params: {{source: cifar10, root: {root}}}}}\n"
            )
        };
        let k = node_key(dir, &yaml("data"));
        std::fs::write(dir.join("data/unrelated.txt"), "x").expect("write");
        assert_eq!(
            k,
            node_key(dir, &yaml("data")),
            "only the .bin folder is keyed"
        );
        assert_eq!(k, node_key(dir, &yaml("data/cifar-10-batches-bin")));
    }

    /// A fake CIFAR-10 binary release (one record per file) in `dir/cifar-10-batches-bin`.
    fn fake_cifar(dir: &Path) -> PathBuf {
        let bins = dir.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&bins).expect("mkdir");
        for f in CifarKind::Cifar10
            .train_files()
            .iter()
            .chain(&["test_batch.bin"])
        {
            let mut rec = vec![1u8];
            rec.extend(std::iter::repeat_n(9u8, data::cifar::PIXELS));
            std::fs::write(bins.join(f), rec).expect("write");
        }
        bins
    }

    /// `dir` as a `.tar.gz` whose entries start with `top/`.
    fn tar_gz_of(dir: &Path, top: &str, out: &Path) {
        let f = std::fs::File::create(out).expect("create");
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        t.append_dir_all(top, dir).expect("append");
        t.into_inner().expect("tar").finish().expect("gz");
    }

    /// Asserts that `auto` at `root` normalizes, keys and (through the engine) node-keys exactly
    /// as `source` written out.
    fn assert_auto_is(root: &Path, extra: Value, source: &str) {
        let reg = registry();
        let kind = reg.get("dataset").expect("registered");
        let with = |src: &str| {
            let mut v = json!({"source": src, "root": root.display().to_string(), "seed": 3});
            if let (Value::Object(m), Value::Object(e)) = (&mut v, &extra) {
                m.extend(e.clone());
            }
            v
        };
        let auto =
            normalize(with("auto")).unwrap_or_else(|e| panic!("auto at {}: {e:?}", root.display()));
        let explicit = normalize(with(source)).expect("explicit source");
        assert_eq!(auto, explicit, "{}", root.display());
        assert_eq!(auto["source"], json!(source));
        assert_eq!(normalize(auto.clone()).expect("fixed point"), auto);
        assert_eq!(kind.key_params(&auto), kind.key_params(&explicit));
        assert_eq!(kind.externals(&auto), kind.externals(&explicit));
        let dir = root.parent().unwrap_or(root);
        let yaml = |v: &Value| format!("stages:\n  data: {{kind: dataset, params: {v}}}\n");
        assert_eq!(
            node_key(dir, &yaml(&with("auto"))),
            node_key(dir, &yaml(&with(source))),
            "{}",
            root.display()
        );
    }

    fn auto_error(root: &Path, download: bool) -> String {
        let v = json!({"source": "auto", "root": root.display().to_string(), "download": download});
        let e = normalize(v).expect_err("undecidable");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "root");
        e[0].message.clone()
    }

    #[test]
    fn auto_resolves_an_image_folder_like_the_explicit_source() {
        let tmp = TempDir::new("dataset-auto-folder");
        let dir = tmp.path();
        let mut files = Vec::new();
        for split in ["train", "test"] {
            for class in ["cat", "ant"] {
                files.push((format!("{split}/{class}/0.png"), png(3)));
            }
        }
        for (p, b) in &files {
            let path = dir.join("imgs").join(p);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, b).expect("write");
        }
        assert_auto_is(&dir.join("imgs"), json!({}), "imagefolder");
        // one wrapping folder, as the reader allows
        std::fs::create_dir_all(dir.join("wrapped")).expect("mkdir");
        std::fs::rename(dir.join("imgs"), dir.join("wrapped/cifar")).expect("move");
        assert_auto_is(
            &dir.join("wrapped"),
            json!({"train_per_class": 1}),
            "imagefolder",
        );
        // archives that are not the CIFAR binary release
        std::fs::write(dir.join("a.tar"), tar_of(&files)).expect("write");
        assert_auto_is(&dir.join("a.tar"), json!({}), "imagefolder");
        tar_gz_of(&dir.join("wrapped/cifar"), "cifar", &dir.join("b.tar.gz"));
        assert_auto_is(&dir.join("b.tar.gz"), json!({}), "imagefolder");
        // what imagefolder does not take fails as if it were written
        let e = normalize(
            json!({"source": "auto", "root": dir.join("a.tar").display().to_string(),
                                 "download": true}),
        )
        .expect_err("download of an image folder");
        assert_eq!(e[0].path, "download");
    }

    #[test]
    fn auto_resolves_a_cifar_binary_release_like_the_explicit_source() {
        let tmp = TempDir::new("dataset-auto-cifar");
        let dir = tmp.path();
        let bins = fake_cifar(&dir.join("data"));
        assert_auto_is(&bins, json!({}), "cifar10");
        assert_auto_is(&dir.join("data"), json!({}), "cifar10");
        // the official archive, by name and (renamed) by its content
        std::fs::create_dir_all(dir.join("arch")).expect("mkdir");
        let official = dir.join("arch").join(CifarKind::Cifar10.archive_name());
        tar_gz_of(&bins, "cifar-10-batches-bin", &official);
        assert_auto_is(&official, json!({}), "cifar10");
        assert_auto_is(&dir.join("arch"), json!({}), "cifar10");
        std::fs::copy(&official, dir.join("renamed.tgz")).expect("copy");
        assert_auto_is(&dir.join("renamed.tgz"), json!({}), "cifar10");
        // CIFAR rules still apply after the resolution
        let e = normalize(json!({"source": "auto", "root": bins.display().to_string(),
                                 "image_size": 64}))
        .expect_err("cifar is 32x32");
        assert_eq!(e[0].path, "image_size");
        // download with nothing at root: CIFAR-10, keyed by the official md5 as written out
        assert_auto_is(&dir.join("not-yet"), json!({"download": true}), "cifar10");
        std::fs::create_dir_all(dir.join("empty")).expect("mkdir");
        assert_auto_is(&dir.join("empty"), json!({"download": true}), "cifar10");
    }

    #[test]
    fn auto_on_an_unknown_layout_is_an_error_on_root() {
        let tmp = TempDir::new("dataset-auto-bad");
        let dir = tmp.path();
        let missing = dir.join("nothing-here");
        let e = auto_error(&missing, false);
        assert!(
            e.contains(&missing.display().to_string())
                && e.contains("does not exist")
                && e.contains("expected the CIFAR-10"),
            "{e}"
        );
        std::fs::create_dir_all(dir.join("empty")).expect("mkdir");
        let e = auto_error(&dir.join("empty"), false);
        assert!(
            e.contains("holds neither layout") && e.contains("train/ and test/"),
            "{e}"
        );
        std::fs::create_dir_all(dir.join("half/train/cat")).expect("mkdir");
        let e = auto_error(&dir.join("half"), true);
        assert!(e.contains("holds neither layout"), "{e}");
        std::fs::write(dir.join("notes.txt"), "x").expect("write");
        let e = auto_error(&dir.join("notes.txt"), false);
        assert!(e.contains("is a file but not a .tar"), "{e}");
        std::fs::write(dir.join("broken.tar.gz"), "not gzip").expect("write");
        let e = auto_error(&dir.join("broken.tar.gz"), false);
        assert!(e.contains("cannot be read as a tar archive"), "{e}");
        // both layouts in one folder
        std::fs::create_dir_all(dir.join("both/train")).expect("mkdir");
        std::fs::create_dir_all(dir.join("both/test")).expect("mkdir");
        fake_cifar(&dir.join("both"));
        let e = auto_error(&dir.join("both"), false);
        assert!(
            e.contains("more than one dataset (cifar10, imagefolder)"),
            "{e}"
        );
    }

    #[test]
    fn auto_reads_the_shared_cifar10_jpeg_archive_as_an_image_folder() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cifar10-jpeg.tar.gz");
        if !path.is_file() {
            eprintln!("skipped: {} is missing", path.display());
            return;
        }
        assert_eq!(detect_source(&path, false), Ok(Source::Imagefolder));
    }
}
