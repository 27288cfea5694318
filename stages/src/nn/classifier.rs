//! The classifier that `finetune` writes and `evaluate` / `attack_dataset` attack: a ResNet-18
//! backbone, optionally CF-AMC's `pre_feature` head (the 4096-d linear-evaluation feature,
//! METHODS.md Q19), and a linear head; optionally as the n-crop bag-of-features classifier
//! (the head sees the mean feature of `n` random views, METHODS.md 11.1a).
//!
//! # Files
//!
//! `classifier.safetensors`: `encoder.*` (torchvision `resnet18` names), `pre_feature.*` when
//! [`FeatureKind::PreFeature`], `classifier.weight` / `classifier.bias`; and
//! `classifier.json`: the [`ClassifierSpec`] needed to rebuild it.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use pipe_stages::nn::classifier::{Classifier, ClassifierSpec, FeatureKind};
//!
//! let spec = ClassifierSpec { width: 8, hidden_dim: 32, features: FeatureKind::PreFeature, classes: 10, ncrop: None, input_norm: false };
//! let (_vm, clf) = Classifier::build_seeded(&spec, 0, &Device::Cpu)?;
//! let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
//! assert_eq!(clf.logits(&x, false)?.dims(), &[2, 10]);
//! # Ok::<(), candle::Error>(())
//! ```

use std::path::Path;

use candle::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::nn::heads::{
    CLASSIFIER, ClassifierConfig, ENCODER, HeadConfig, LinearClassifier, PRE_FEATURE, PreFeature,
    linear_classifier, pre_feature,
};
use crate::nn::init::{InitRules, build_seeded};
use crate::nn::resnet::{ResNet, ResNetConfig, resnet18};

/// File name of the weights.
pub const WEIGHTS_FILE: &str = "classifier.safetensors";
/// File name of the spec.
pub const SPEC_FILE: &str = "classifier.json";

/// Which feature the linear head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// CF-AMC's `pre_feature` output `h` (Linear → BN → ReLU, `hidden_dim` wide).
    PreFeature,
    /// The pooled backbone feature (8 · width).
    Backbone,
}

/// The n-crop (bag-of-features) head: logits of the mean feature over `n_views` random views
/// drawn by the EMP view generator with this geometry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NcropSpec {
    /// Views per image.
    pub n_views: usize,
    /// Crop scale range.
    pub scale: [f64; 2],
    /// Crop ratio range.
    pub ratio: [f64; 2],
}

/// Everything needed to rebuild a [`Classifier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// ResNet-18 width.
    pub width: usize,
    /// `pre_feature` width (ignored for [`FeatureKind::Backbone`]).
    pub hidden_dim: usize,
    /// The feature under the head.
    pub features: FeatureKind,
    /// Number of classes.
    pub classes: usize,
    /// The bag-of-features head, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ncrop: Option<NcropSpec>,
    /// The backbone normalises its input by ImageNet's mean and std (ACL-family encoders,
    /// [`ResNetConfig::input_norm`]); absent in the file when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub input_norm: bool,
}

impl ClassifierSpec {
    /// Width of the feature the head reads.
    pub fn feature_dim(&self) -> usize {
        match self.features {
            FeatureKind::PreFeature => self.hidden_dim,
            FeatureKind::Backbone => 8 * self.width,
        }
    }

    /// Reads `classifier.json`.
    ///
    /// # Errors
    /// I/O or JSON errors, naming the file.
    pub fn read(path: &Path) -> std::result::Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Backbone (+ `pre_feature`) + linear head.
#[derive(Debug, Clone)]
pub struct Classifier {
    spec: ClassifierSpec,
    backbone: ResNet,
    pre_feature: Option<PreFeature>,
    head: LinearClassifier,
}

impl Classifier {
    /// Builds the modules at the root of `vb` (names as in the module docs).
    ///
    /// # Errors
    /// An invalid spec or tensors of the wrong shape in `vb`.
    pub fn build(spec: &ClassifierSpec, vb: VarBuilder) -> Result<Self> {
        let backbone = resnet18(
            &ResNetConfig {
                width: spec.width,
                input_norm: spec.input_norm,
                ..Default::default()
            },
            vb.pp(ENCODER),
        )?;
        let pre_feature = match spec.features {
            FeatureKind::PreFeature => Some(pre_feature(
                backbone.feature_dim(),
                &HeadConfig {
                    hidden_dim: spec.hidden_dim,
                    z_dim: 1,
                },
                vb.pp(PRE_FEATURE),
            )?),
            FeatureKind::Backbone => None,
        };
        let head = linear_classifier(
            &ClassifierConfig {
                in_dim: spec.feature_dim(),
                num_classes: spec.classes,
            },
            vb.pp(CLASSIFIER),
        )?;
        Ok(Self {
            spec: spec.clone(),
            backbone,
            pre_feature,
            head,
        })
    }

    /// A fresh classifier with every variable initialised from `seed` (R-CF's rules).
    ///
    /// # Errors
    /// As [`Classifier::build`].
    pub fn build_seeded(
        spec: &ClassifierSpec,
        seed: u64,
        device: &Device,
    ) -> Result<(VarMap, Self)> {
        build_seeded(seed, &InitRules::r_cf(ENCODER), DType::F32, device, |vb| {
            Self::build(spec, vb)
        })
    }

    /// Loads a classifier from its weights (`classifier.safetensors`) and spec
    /// (`classifier.json`), strictly (every tensor present, no extra one).
    ///
    /// # Errors
    /// Missing or mismatching files, naming them.
    pub fn load(
        weights: &Path,
        spec: &Path,
        device: &Device,
    ) -> std::result::Result<(VarMap, Self), String> {
        let spec = ClassifierSpec::read(spec)?;
        let (vm, clf) = Self::build_seeded(&spec, 0, device).map_err(|e| e.to_string())?;
        crate::nn::checkpoint::load(&vm, weights, "", true).map_err(|e| e.to_string())?;
        Ok((vm, clf))
    }

    /// Writes `classifier.safetensors` and `classifier.json` into `dir`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, varmap: &VarMap, dir: &Path) -> std::result::Result<(), String> {
        crate::nn::checkpoint::save(varmap, dir.join(WEIGHTS_FILE), "")
            .map_err(|e| e.to_string())?;
        let mut text = serde_json::to_string_pretty(&self.spec).map_err(|e| e.to_string())?;
        text.push('\n');
        std::fs::write(dir.join(SPEC_FILE), text).map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// The spec.
    pub fn spec(&self) -> &ClassifierSpec {
        &self.spec
    }

    /// The backbone.
    pub fn backbone(&self) -> &ResNet {
        &self.backbone
    }

    /// The linear head.
    pub fn head(&self) -> &LinearClassifier {
        &self.head
    }

    /// The feature the head reads, `(b, feature_dim)`.
    ///
    /// # Errors
    /// An input that is not `(b, 3, h, w)`.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.backbone.forward_t(x, train)?;
        match &self.pre_feature {
            Some(p) => p.forward_t(&f, train),
            None => Ok(f),
        }
    }

    /// Logits of single images `(b, classes)` (the full-image head).
    ///
    /// # Errors
    /// As [`Classifier::features`].
    pub fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.head.forward(&self.features(x, train)?)
    }

    /// Logits of the n-crop head from view-major views `(n · b, 3, h, w)`: the head applied to
    /// the mean feature of each image's `n` views.
    ///
    /// # Errors
    /// A row count not divisible by `n`.
    pub fn logits_ncrop(&self, views: &Tensor, n: usize, train: bool) -> Result<Tensor> {
        let f = self.features(views, train)?;
        self.head.forward(&mean_over_views(&f, n)?)
    }

    /// The same classifier on detached weights (attacks: input gradients only).
    ///
    /// # Errors
    /// Never in practice.
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            spec: self.spec.clone(),
            backbone: self.backbone.frozen()?,
            pre_feature: self
                .pre_feature
                .as_ref()
                .map(PreFeature::frozen)
                .transpose()?,
            head: self.head.detached(),
        })
    }
}

/// The mean over `n` view-major chunks of `(n · b, d)`: `(b, d)`.
///
/// # Errors
/// A row count not divisible by `n`.
pub fn mean_over_views(f: &Tensor, n: usize) -> Result<Tensor> {
    let (rows, d) = f.dims2()?;
    if n == 0 || rows % n != 0 {
        candle::bail!("{rows} rows are not {n} views of a batch")
    }
    f.reshape((n, rows / n, d))?.mean(0)
}
