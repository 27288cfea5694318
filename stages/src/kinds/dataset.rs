//! `dataset`: reads or generates an image dataset into the canonical artifact.
//!
//! Sources:
//! - `cifar10` / `cifar100`: the official binary release under `root` (the extracted folder,
//!   its parent, or the `.tar.gz`); with `download: true` the official archive is fetched into
//!   `root` when missing and its md5 checked, and the data is read from it.
//! - `imagefolder`: `train/<class>/*.{jpg,jpeg,png}` and `test/<class>/*` under `root`, a folder
//!   or a `.tar` / `.tar.gz` read without unpacking.
//! - `synthetic`: seeded coloured shapes (`n_classes`, `n_train`, `n_test`), no `root`.
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
use std::path::PathBuf;

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
        }
    }
}

/// Default number of synthetic classes.
pub const SYNTHETIC_CLASSES: usize = 10;
/// Default number of synthetic training images.
pub const SYNTHETIC_TRAIN: usize = 5_000;
/// Default number of synthetic test images.
pub const SYNTHETIC_TEST: usize = 1_000;

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
        if p.download && p.source.cifar().is_none() {
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
    use std::path::Path;
    use crate::data::testutil::TempDir;
    use pipe_engine::{Overrides, Registry, StatCache, graph, spec};
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
        let bins = dir.join("data/cifar-10-batches-bin");
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
}
