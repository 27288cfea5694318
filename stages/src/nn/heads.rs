//! Projection and classification heads (CF-AMC pre_feature + projection, ACL head, linear).
//!
//! # CF-AMC (R-CF `encoder`, METHODS.md 2.3)
//!
//! With `f` the backbone feature (b, 8w), `H` = [`HeadConfig::hidden_dim`] (4096) and
//! `Z` = [`HeadConfig::z_dim`] (1024 for EMP-SSL, 128 for SimCLR):
//!
//! ```text
//! h = relu(BN1d(W0 f + b0))                 pre_feature   (b, H)   names pre_feature.0.*, .1.*
//! p = W3 relu(BN1d(W0' h + b0')) + b3       projection    (b, Z)   names projection.0.*, .1.*, .3.*
//! z = p / max(‖p‖₂, 1e-12)                  l2_normalize  (b, Z)   (torch's F.normalize)
//! ```
//!
//! [`Encoder::forward_t`] returns `(h, z)`: the SSL losses use `z`, linear evaluation uses
//! the 4096-d `h`, so the network under attack at evaluation includes `pre_feature` (METHODS.md Q19).
//! The names are the `nn.Sequential` indices of the reference (index 2 is the parameter-free
//! ReLU), so a checkpoint loads into R-CF's `encoder` module with `load_state_dict` once the
//! backbone's prefix is renamed: R-CF names it `backbone.`, pipe `encoder.`
//! (`{k.replace("encoder.", "backbone.", 1): v ...}`); `pre_feature.` and `projection.` match.
//!
//! # ACL / AIR / RCS (R-AIR `proj_head`)
//!
//! ```text
//! fc1 (bias) → BN → ReLU → fc2 (no bias) → BN → ReLU → fc3 (no bias) → BN      (b, in) → (b, dim)
//! ```
//!
//! Names below the head's prefix: `fc1.weight`, `fc1.bias`, `bn1.*`, `fc2.weight`, `bn2.*`,
//! `fc3.weight`, `bn3.*` (R-AIR's attribute names; R-AIR mounts the head as the ResNet's `fc`).
//! The BNs are per branch, named as in [`crate::nn::resnet`] (`bn1.weight` for `normal`,
//! `bn1.pgd.weight` for `pgd`); R-AIR's own checkpoints use `bn1.bn_list.<index>.*`.
//!
//! # Linear classifier
//!
//! [`LinearClassifier`]: `y = W x + b`, (b, in) → (b, classes), names `weight`, `bias` below
//! its prefix (conventionally [`CLASSIFIER`]: `classifier.weight`, `classifier.bias`).
//!
//! # Initialisation
//!
//! As in [`crate::nn::resnet`], constructors register zero placeholders (BNs 1 / 0 / 0 / 1);
//! [`init_seeded`](crate::nn::init::init_seeded) gives linear layers PyTorch's default init.
//! Building even a width-64 [`Encoder`] with 4096-d heads is therefore cheap (allocation only).
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use pipe_stages::nn::heads::{EncoderConfig, HeadConfig, encoder};
//! use pipe_stages::nn::init::{InitRules, build_seeded};
//! use pipe_stages::nn::resnet::ResNetConfig;
//!
//! let cfg = EncoderConfig {
//!     backbone: ResNetConfig { width: 8, ..Default::default() },
//!     head: HeadConfig { hidden_dim: 32, z_dim: 16 },
//! };
//! let (_varmap, enc) =
//!     build_seeded(0, &InitRules::r_cf("encoder"), DType::F32, &Device::Cpu, |vb| encoder(&cfg, vb))?;
//! let x = Tensor::ones((4, 3, 32, 32), DType::F32, &Device::Cpu)?;
//! let (h, z) = enc.forward_t(&x, true)?;
//! assert_eq!((h.dims(), z.dims()), (&[4usize, 32][..], &[4usize, 16][..]));
//! # Ok::<(), candle::Error>(())
//! ```

use candle::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::nn::resnet::{
    BranchBatchNorm, DEFAULT_BRANCH, PGD_BRANCH, ResNet, ResNetConfig, branch_batch_norm, resnet18,
};

/// Checkpoint prefix of the backbone.
pub const ENCODER: &str = "encoder";
/// Checkpoint prefix of the CF-AMC `pre_feature` head.
pub const PRE_FEATURE: &str = "pre_feature";
/// Checkpoint prefix of the CF-AMC `projection` head.
pub const PROJECTION: &str = "projection";
/// Checkpoint prefix of the linear classifier.
pub const CLASSIFIER: &str = "classifier";

/// The clamp of [`l2_normalize`]'s denominator (torch's `F.normalize` default).
pub const NORMALIZE_EPS: f64 = 1e-12;

/// A linear layer `y = x Wᵀ (+ b)` with zero placeholders, W of shape (out, in).
fn linear_layer(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.))?;
    let b = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// The single BN branch used by the CF-AMC heads.
fn single_branch() -> Vec<String> {
    vec![DEFAULT_BRANCH.to_string()]
}

/// `x / max(‖x‖₂, 1e-12)` along dim 1 of a (b, d) tensor, like torch's `F.normalize`.
///
/// Computed as `x / sqrt(max(Σ x², 1e-24))`: the same value, and a zero row gets a zero
/// gradient instead of the NaN that the backward of `sqrt` at 0 would give.
///
/// # Errors
/// If `x` is not rank 2.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 2 {
        candle::bail!("l2_normalize: expected (b, d), got {:?}", x.shape())
    }
    let sq = x.sqr()?.sum_keepdim(1)?;
    let norm = sq.maximum(NORMALIZE_EPS * NORMALIZE_EPS)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// Sizes of the CF-AMC heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Width of `pre_feature` and of the projection's hidden layer (4096).
    pub hidden_dim: usize,
    /// Output dimension of the projection (1024 EMP-SSL, 128 SimCLR).
    pub z_dim: usize,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 4096,
            z_dim: 1024,
        }
    }
}

impl HeadConfig {
    /// R-CF's SimCLR heads (`encoder_simclr`): 4096 → 128.
    pub fn simclr() -> Self {
        Self {
            hidden_dim: 4096,
            z_dim: 128,
        }
    }
}

/// CF-AMC `pre_feature`: Linear(in → H, bias) → BN1d(H) → ReLU.
#[derive(Debug, Clone)]
pub struct PreFeature {
    linear: Linear,
    bn: BranchBatchNorm,
}

/// Builds [`PreFeature`] below `vb` (conventionally `vb.pp(PRE_FEATURE)`): names
/// `0.weight`, `0.bias`, `1.{weight,bias,running_mean,running_var,num_batches_tracked}`.
///
/// # Errors
/// On a tensor of the wrong shape in `vb`.
pub fn pre_feature(in_dim: usize, cfg: &HeadConfig, vb: VarBuilder) -> Result<PreFeature> {
    Ok(PreFeature {
        linear: linear_layer(in_dim, cfg.hidden_dim, true, vb.pp("0"))?,
        bn: branch_batch_norm(cfg.hidden_dim, &single_branch(), vb.pp("1"))?,
    })
}

/// `layer` on detached weights (shared storage, no gradient).
fn detached_linear(layer: &Linear) -> Linear {
    Linear::new(layer.weight().detach(), layer.bias().map(Tensor::detach))
}

impl PreFeature {
    /// The head on detached weights, sharing the BN running statistics (see
    /// [`ResNet::frozen`]).
    ///
    /// # Errors
    /// Never in practice.
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            linear: detached_linear(&self.linear),
            bn: self.bn.frozen()?,
        })
    }
}

impl ModuleT for PreFeature {
    /// (b, in) → (b, H).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.linear.forward(x)?;
        self.bn.forward_t(&y, train)?.relu()
    }
}

/// CF-AMC `projection`: Linear(H → H, bias) → BN1d(H) → ReLU → Linear(H → Z, bias),
/// un-normalised (see [`l2_normalize`]).
#[derive(Debug, Clone)]
pub struct Projection {
    fc1: Linear,
    bn: BranchBatchNorm,
    fc2: Linear,
}

/// Builds [`Projection`] below `vb` (conventionally `vb.pp(PROJECTION)`): names `0.weight`,
/// `0.bias`, `1.*` (BN), `3.weight`, `3.bias`.
///
/// # Errors
/// On a tensor of the wrong shape in `vb`.
pub fn projection(cfg: &HeadConfig, vb: VarBuilder) -> Result<Projection> {
    Ok(Projection {
        fc1: linear_layer(cfg.hidden_dim, cfg.hidden_dim, true, vb.pp("0"))?,
        bn: branch_batch_norm(cfg.hidden_dim, &single_branch(), vb.pp("1"))?,
        fc2: linear_layer(cfg.hidden_dim, cfg.z_dim, true, vb.pp("3"))?,
    })
}

impl Projection {
    /// The head on detached weights, sharing the BN running statistics (see
    /// [`ResNet::frozen`]).
    ///
    /// # Errors
    /// Never in practice.
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            fc1: detached_linear(&self.fc1),
            bn: self.bn.frozen()?,
            fc2: detached_linear(&self.fc2),
        })
    }
}

impl ModuleT for Projection {
    /// (b, H) → (b, Z), not normalised.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.fc1.forward(x)?;
        let y = self.bn.forward_t(&y, train)?.relu()?;
        self.fc2.forward(&y)
    }
}

/// Configuration of the CF-AMC [`Encoder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    /// The ResNet-18 backbone.
    pub backbone: ResNetConfig,
    /// The `pre_feature` / `projection` sizes.
    pub head: HeadConfig,
}

/// The CF-AMC encoder: backbone + `pre_feature` + `projection` + L2 normalisation.
#[derive(Debug, Clone)]
pub struct Encoder {
    backbone: ResNet,
    pre_feature: PreFeature,
    projection: Projection,
}

/// Builds the [`Encoder`] at the root of `vb`: the backbone under [`ENCODER`], the heads under
/// [`PRE_FEATURE`] and [`PROJECTION`], the layout of R-CF's checkpoints.
///
/// # Errors
/// On an invalid backbone config or a tensor of the wrong shape in `vb`.
pub fn encoder(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Encoder> {
    let backbone = resnet18(&cfg.backbone, vb.pp(ENCODER))?;
    let pre_feature = pre_feature(backbone.feature_dim(), &cfg.head, vb.pp(PRE_FEATURE))?;
    let projection = projection(&cfg.head, vb.pp(PROJECTION))?;
    Ok(Encoder {
        backbone,
        pre_feature,
        projection,
    })
}

impl Encoder {
    /// `(h, z)`: `h` (b, H) the `pre_feature` output (after BN + ReLU; the linear-evaluation
    /// feature, METHODS.md Q19); `z` (b, Z) the unit-norm projection. The backbone uses its
    /// default BN branch.
    ///
    /// # Errors
    /// On an input that is not (b, 3, h, w).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let f = self.backbone.forward_t(x, train)?;
        self.heads(&f, train)
    }

    /// [`Encoder::forward_t`] with the backbone's BNs of `branch` (the heads have one BN).
    ///
    /// # Errors
    /// On an unknown branch or an input that is not (b, 3, h, w).
    pub fn forward_branch(
        &self,
        x: &Tensor,
        branch: &str,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let f = self.backbone.forward_branch(x, branch, train)?;
        self.heads(&f, train)
    }

    fn heads(&self, f: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let h = self.pre_feature.forward_t(f, train)?;
        let z = l2_normalize(&self.projection.forward_t(&h, train)?)?;
        Ok((h, z))
    }

    /// Only `h`, the (b, H) linear-evaluation feature (skips the projection).
    ///
    /// # Errors
    /// On an input that is not (b, 3, h, w).
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.backbone.forward_t(x, train)?;
        self.pre_feature.forward_t(&f, train)
    }

    /// The encoder on detached weights: a backward through it computes only the input
    /// gradient (attacks); the BN running statistics are shared with `self`, so a train-mode
    /// forward still updates them ([`ResNet::frozen`]).
    ///
    /// # Errors
    /// Never in practice.
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.frozen()?,
            pre_feature: self.pre_feature.frozen()?,
            projection: self.projection.frozen()?,
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &ResNet {
        &self.backbone
    }

    /// The `pre_feature` head.
    pub fn pre_feature(&self) -> &PreFeature {
        &self.pre_feature
    }

    /// The `projection` head.
    pub fn projection(&self) -> &Projection {
        &self.projection
    }
}

/// Configuration of the ACL / AIR / RCS projection head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclHeadConfig {
    /// Input dimension (the backbone feature, 512).
    pub in_dim: usize,
    /// Width of every layer and the output (512).
    pub dim: usize,
    /// BN branches (those of the backbone); the first is the default.
    pub branches: Vec<String>,
}

impl Default for AclHeadConfig {
    fn default() -> Self {
        Self {
            in_dim: 512,
            dim: 512,
            branches: single_branch(),
        }
    }
}

/// The ACL 3-layer head: fc1 (bias) → BN → ReLU → fc2 → BN → ReLU → fc3 → BN, per-branch
/// BNs. The output is not normalised (the loss normalises).
#[derive(Debug, Clone)]
pub struct AclHead {
    fc1: Linear,
    bn1: BranchBatchNorm,
    fc2: Linear,
    bn2: BranchBatchNorm,
    fc3: Linear,
    bn3: BranchBatchNorm,
    default_branch: String,
}

/// Builds [`AclHead`] below `vb` (names `fc1.weight`, `fc1.bias`, `bn1.*`, `fc2.weight`,
/// `bn2.*`, `fc3.weight`, `bn3.*`).
///
/// # Errors
/// On invalid branch names or a tensor of the wrong shape in `vb`.
pub fn acl_head(cfg: &AclHeadConfig, vb: VarBuilder) -> Result<AclHead> {
    let br = &cfg.branches;
    let default_branch = br
        .first()
        .cloned()
        .ok_or_else(|| candle::Error::Msg("acl_head: the branch list is empty".into()))?;
    Ok(AclHead {
        fc1: linear_layer(cfg.in_dim, cfg.dim, true, vb.pp("fc1"))?,
        bn1: branch_batch_norm(cfg.dim, br, vb.pp("bn1"))?,
        fc2: linear_layer(cfg.dim, cfg.dim, false, vb.pp("fc2"))?,
        bn2: branch_batch_norm(cfg.dim, br, vb.pp("bn2"))?,
        fc3: linear_layer(cfg.dim, cfg.dim, false, vb.pp("fc3"))?,
        bn3: branch_batch_norm(cfg.dim, br, vb.pp("bn3"))?,
        default_branch,
    })
}

impl AclHead {
    /// (b, in) → (b, dim) with the BNs of `branch`.
    ///
    /// # Errors
    /// On an unknown branch or a shape mismatch.
    pub fn forward_branch(&self, x: &Tensor, branch: &str, train: bool) -> Result<Tensor> {
        let y = self.fc1.forward(x)?;
        let y = self.bn1.forward_branch(&y, branch, train)?.relu()?;
        let y = self.fc2.forward(&y)?;
        let y = self.bn2.forward_branch(&y, branch, train)?.relu()?;
        let y = self.fc3.forward(&y)?;
        self.bn3.forward_branch(&y, branch, train)
    }
}

impl AclHead {
    /// The head on detached weights, sharing the BN running statistics (see
    /// [`ResNet::frozen`]).
    ///
    /// # Errors
    /// Never in practice (the shapes were checked when `self` was built).
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            fc1: detached_linear(&self.fc1),
            bn1: self.bn1.frozen()?,
            fc2: detached_linear(&self.fc2),
            bn2: self.bn2.frozen()?,
            fc3: detached_linear(&self.fc3),
            bn3: self.bn3.frozen()?,
            default_branch: self.default_branch.clone(),
        })
    }
}

impl ModuleT for AclHead {
    /// [`AclHead::forward_branch`] with the default branch.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_branch(x, &self.default_branch, train)
    }
}

/// The ACL family's pretraining model (R-AIR `resnet_multi_bn`): a ResNet-18 with the input
/// normalisation and BN branches (`normal`, plus `pgd` for adversarial training) under
/// [`ENCODER`], and the 3-layer [`AclHead`] (`8 · width` wide, the same branches) under
/// [`PROJECTION`].
#[derive(Debug, Clone)]
pub struct AclEncoder {
    backbone: ResNet,
    head: AclHead,
}

/// Builds [`AclEncoder`] at the root of `vb` with these BN `branches` (first = default).
///
/// # Errors
/// On an invalid width or branch list.
pub fn acl_encoder(width: usize, branches: &[String], vb: VarBuilder) -> Result<AclEncoder> {
    let backbone = resnet18(
        &ResNetConfig {
            width,
            branches: branches.to_vec(),
            input_norm: true,
        },
        vb.pp(ENCODER),
    )?;
    let dim = backbone.feature_dim();
    let head = acl_head(
        &AclHeadConfig {
            in_dim: dim,
            dim,
            branches: branches.to_vec(),
        },
        vb.pp(PROJECTION),
    )?;
    Ok(AclEncoder { backbone, head })
}

impl AclEncoder {
    /// Unit-normalised embeddings `(b, 8 · width)` of `x` with every BN on `branch`.
    ///
    /// # Errors
    /// On an unknown branch or a shape mismatch.
    pub fn embed(&self, x: &Tensor, branch: &str, train: bool) -> Result<Tensor> {
        let f = self.backbone.forward_branch(x, branch, train)?;
        l2_normalize(&self.head.forward_branch(&f, branch, train)?)
    }

    /// The model on detached weights (input gradients only), for attacks.
    ///
    /// # Errors
    /// Never in practice.
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.frozen()?,
            head: self.head.frozen()?,
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &ResNet {
        &self.backbone
    }

    /// The projection head.
    pub fn head(&self) -> &AclHead {
        &self.head
    }
}

/// AdvCL's BN branch of the CE attack's input (`x_ce`, METHODS.md 8.3).
pub const PGD_CE_BRANCH: &str = "pgd_ce";

/// Prefix of AdvCL's pseudo-label heads (`pseudo.fc_010.weight`, ...).
pub const PSEUDO: &str = "pseudo";

/// AdvCL's pretraining model (R-ADV `resnet_cifar_multibn_ensembleFC`): a ResNet-18
/// (`width`, no input normalisation) with BN branches `normal`, `pgd`, `pgd_ce` under
/// [`ENCODER`]; `head_proj` under [`PROJECTION`] (`0`: Linear(8w → 8w) → `1`: BN (one, shared
/// by every branch) → ReLU → `3`: Linear(8w → 128), l2-normalised); one Linear(8w → K) per
/// pseudo-label set under [`PSEUDO`] (`fc_002`, `fc_010`, ..., R-ADV's names). R-ADV's
/// `head_pred` and `head_ce` are never used in its loss (\[Q52\]) and are not built.
#[derive(Debug, Clone)]
pub struct AdvclEncoder {
    backbone: ResNet,
    proj1: Linear,
    proj_bn: BranchBatchNorm,
    proj2: Linear,
    pseudo: Vec<Linear>,
}

/// AdvCL's projection output dimension.
pub const ADVCL_Z_DIM: usize = 128;

/// Builds [`AdvclEncoder`] at the root of `vb` with one pseudo-label head per entry of `ks`.
///
/// # Errors
/// On an invalid width or a `K` of 0.
pub fn advcl_encoder(width: usize, ks: &[usize], vb: VarBuilder) -> Result<AdvclEncoder> {
    if ks.contains(&0) {
        candle::bail!("advcl_encoder: a pseudo-label head with 0 classes");
    }
    let branches: Vec<String> = [DEFAULT_BRANCH, PGD_BRANCH, PGD_CE_BRANCH]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    let backbone = resnet18(
        &ResNetConfig {
            width,
            branches,
            input_norm: false,
        },
        vb.pp(ENCODER),
    )?;
    let dim = backbone.feature_dim();
    let pvb = vb.pp(PROJECTION);
    let heads = vb.pp(PSEUDO);
    Ok(AdvclEncoder {
        proj1: linear_layer(dim, dim, true, pvb.pp("0"))?,
        proj_bn: branch_batch_norm(dim, &single_branch(), pvb.pp("1"))?,
        proj2: linear_layer(dim, ADVCL_Z_DIM, true, pvb.pp("3"))?,
        pseudo: ks
            .iter()
            .map(|&k| linear_layer(dim, k, true, heads.pp(pseudo_head_name(k))))
            .collect::<Result<_>>()?,
        backbone,
    })
}

/// R-ADV's name of the head for `k` pseudo-classes: `fc_002`, `fc_500`, `fc_1000`.
pub fn pseudo_head_name(k: usize) -> String {
    format!("fc_{k:03}")
}

impl AdvclEncoder {
    /// Backbone features `(b, 8w)` with every backbone BN on `branch`.
    ///
    /// # Errors
    /// On an unknown branch or a shape mismatch.
    pub fn features(&self, x: &Tensor, branch: &str, train: bool) -> Result<Tensor> {
        self.backbone.forward_branch(x, branch, train)
    }

    /// `head_proj` of features, l2-normalised `(b, 128)`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn project(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.proj1.forward(f)?;
        let y = self.proj_bn.forward_t(&y, train)?.relu()?;
        l2_normalize(&self.proj2.forward(&y)?)
    }

    /// The normalised embedding of `x` through `branch` (R-ADV `contrast=True`).
    ///
    /// # Errors
    /// As [`AdvclEncoder::features`].
    pub fn embed(&self, x: &Tensor, branch: &str, train: bool) -> Result<Tensor> {
        self.project(&self.features(x, branch, train)?, train)
    }

    /// The logits of every pseudo-label head on features `f`, in the order of `ks`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn pseudo_logits(&self, f: &Tensor) -> Result<Vec<Tensor>> {
        self.pseudo.iter().map(|l| l.forward(f)).collect()
    }

    /// The model on detached weights sharing the BN running statistics, for attacks.
    ///
    /// # Errors
    /// Never in practice.
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.frozen()?,
            proj1: detached_linear(&self.proj1),
            proj_bn: self.proj_bn.frozen()?,
            proj2: detached_linear(&self.proj2),
            pseudo: self.pseudo.iter().map(detached_linear).collect(),
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &ResNet {
        &self.backbone
    }
}

/// Configuration of [`LinearClassifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Feature dimension (512 backbone feature, or 4096 for CF-AMC's `h`).
    pub in_dim: usize,
    /// Number of classes.
    pub num_classes: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            in_dim: 512,
            num_classes: 10,
        }
    }
}

/// A linear classifier `logits = x Wᵀ + b`, (b, in) → (b, classes).
#[derive(Debug, Clone)]
pub struct LinearClassifier {
    linear: Linear,
}

/// Builds [`LinearClassifier`] below `vb` (conventionally `vb.pp(CLASSIFIER)`): names
/// `weight` (classes, in) and `bias` (classes).
///
/// # Errors
/// On a tensor of the wrong shape in `vb`.
pub fn linear_classifier(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<LinearClassifier> {
    Ok(LinearClassifier {
        linear: linear_layer(cfg.in_dim, cfg.num_classes, true, vb)?,
    })
}

impl LinearClassifier {
    /// The head on detached weights (shared storage, no gradient).
    pub fn detached(&self) -> Self {
        Self {
            linear: detached_linear(&self.linear),
        }
    }
}

impl Module for LinearClassifier {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::init::{InitRules, build_seeded, trainable};
    use candle::{DType, Device, Var};

    fn var(varmap: &candle_nn::VarMap, name: &str) -> Result<Var> {
        varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("poisoned".into()))?
            .get(name)
            .cloned()
            .ok_or_else(|| candle::Error::Msg(format!("no var {name}")))
    }

    #[test]
    fn l2_normalize_matches_torch() -> Result<()> {
        // torch 2.15:
        //   x = torch.tensor([[3., 4.], [0., 0.], [1e-13, 0.]], dtype=torch.float64,
        //                    requires_grad=True)
        //   y = F.normalize(x, dim=1); y[:, 0].sum().backward()
        //   y -> [[0.6, 0.8], [0, 0], [0.1, 0]]; x.grad -> [[0.128, -0.096], [1e12, 0], [1e12, 0]]
        let x = Var::from_vec(vec![3f64, 4., 0., 0., 1e-13, 0.], (3, 2), &Device::Cpu)?;
        let y = l2_normalize(x.as_tensor())?;
        let v = y.to_vec2::<f64>()?;
        let want = [[0.6, 0.8], [0.0, 0.0], [0.1, 0.0]];
        for (r, w) in v.iter().zip(want) {
            for (a, b) in r.iter().zip(w) {
                assert!((a - b).abs() < 1e-12, "{v:?}");
            }
        }
        let g = y.narrow(1, 0, 1)?.sum_all()?.backward()?;
        let gx = g
            .get(&x)
            .ok_or_else(|| candle::Error::Msg("no grad".into()))?
            .to_vec2::<f64>()?;
        let want_g = [[0.128, -0.096], [1e12, 0.0], [1e12, 0.0]];
        for (r, w) in gx.iter().zip(want_g) {
            for (a, b) in r.iter().zip(w) {
                assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{gx:?}");
            }
        }
        // Unit norm for ordinary rows.
        let z = l2_normalize(&Tensor::new(
            &[[1f32, 2., 2.], [-5., 0., 12.]],
            &Device::Cpu,
        )?)?;
        assert_eq!(z.to_vec2::<f32>()?[1], vec![-5. / 13., 0., 12. / 13.]);
        Ok(())
    }

    fn small_cfg() -> EncoderConfig {
        EncoderConfig {
            backbone: ResNetConfig {
                width: 8,
                ..Default::default()
            },
            head: HeadConfig {
                hidden_dim: 32,
                z_dim: 16,
            },
        }
    }

    fn input(b: usize) -> Result<Tensor> {
        let v: Vec<f32> = (0..b * 3 * 16 * 16)
            .map(|i| (0.5 + 0.5 * (0.11 * i as f64).cos()) as f32)
            .collect();
        Tensor::from_vec(v, (b, 3, 16, 16), &Device::Cpu)
    }

    #[test]
    fn encoder_shapes_names_and_outputs() -> Result<()> {
        let cfg = small_cfg();
        let (varmap, enc) = build_seeded(
            3,
            &InitRules::r_cf(ENCODER),
            DType::F32,
            &Device::Cpu,
            |vb| encoder(&cfg, vb),
        )?;
        let names: Vec<String> = trainable(&varmap).into_iter().map(|(n, _)| n).collect();
        let heads: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.starts_with("encoder."))
            .collect();
        assert_eq!(
            heads,
            [
                "pre_feature.0.bias",
                "pre_feature.0.weight",
                "pre_feature.1.bias",
                "pre_feature.1.weight",
                "projection.0.bias",
                "projection.0.weight",
                "projection.1.bias",
                "projection.1.weight",
                "projection.3.bias",
                "projection.3.weight",
            ]
        );
        assert_eq!(var(&varmap, "pre_feature.0.weight")?.dims(), &[32, 64]);
        assert_eq!(var(&varmap, "projection.3.weight")?.dims(), &[16, 32]);
        assert_eq!(var(&varmap, "pre_feature.1.running_var")?.dims(), &[32]);
        let x = input(5)?;
        let (h, z) = enc.forward_t(&x, true)?;
        assert_eq!(h.dims(), &[5, 32]);
        assert_eq!(z.dims(), &[5, 16]);
        // z has unit rows, h is a ReLU output, and train mode normalised h's pre-activation:
        // per feature, the BN output over the batch has mean 0 (bias 0) so some h are zero.
        for row in z.to_vec2::<f32>()? {
            let n: f32 = row.iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-5, "{n}");
        }
        let hv = h.to_vec2::<f32>()?;
        assert!(hv.iter().flatten().all(|&v| v >= 0.0));
        assert!(hv.iter().flatten().any(|&v| v == 0.0) && hv.iter().flatten().any(|&v| v > 0.0));
        // features() is h, in eval mode equal to forward_t's h.
        let (h_eval, _) = enc.forward_t(&x, false)?;
        assert_eq!(
            enc.features(&x, false)?.to_vec2::<f32>()?,
            h_eval.to_vec2::<f32>()?
        );
        // The heads' BNs tracked the two train-mode forwards? One so far.
        assert_eq!(
            var(&varmap, "pre_feature.1.num_batches_tracked")?.to_scalar::<i64>()?,
            1
        );
        assert_eq!(
            var(&varmap, "projection.1.num_batches_tracked")?.to_scalar::<i64>()?,
            1
        );
        // h equals the pre_feature formula computed by hand in eval mode (running stats).
        let f = enc.backbone().forward_t(&x, false)?;
        let w = var(&varmap, "pre_feature.0.weight")?.as_tensor().clone();
        let b = var(&varmap, "pre_feature.0.bias")?.as_tensor().clone();
        let rm = var(&varmap, "pre_feature.1.running_mean")?
            .as_tensor()
            .clone();
        let rv = var(&varmap, "pre_feature.1.running_var")?
            .as_tensor()
            .clone();
        let lin = f.matmul(&w.t()?)?.broadcast_add(&b)?;
        let manual = lin
            .broadcast_sub(&rm)?
            .broadcast_div(&(rv + 1e-5)?.sqrt()?)?
            .relu()?;
        let diff = (manual - &h_eval)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn acl_head_branches_and_names() -> Result<()> {
        let cfg = AclHeadConfig {
            in_dim: 16,
            dim: 8,
            branches: vec!["normal".into(), "pgd".into()],
        };
        let (varmap, head) =
            build_seeded(4, &InitRules::default(), DType::F32, &Device::Cpu, |vb| {
                acl_head(&cfg, vb.pp("head"))
            })?;
        let names: Vec<String> = trainable(&varmap).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "head.bn1.bias",
                "head.bn1.pgd.bias",
                "head.bn1.pgd.weight",
                "head.bn1.weight",
                "head.bn2.bias",
                "head.bn2.pgd.bias",
                "head.bn2.pgd.weight",
                "head.bn2.weight",
                "head.bn3.bias",
                "head.bn3.pgd.bias",
                "head.bn3.pgd.weight",
                "head.bn3.weight",
                "head.fc1.bias",
                "head.fc1.weight",
                "head.fc2.weight",
                "head.fc3.weight",
            ]
        );
        let x = Tensor::from_vec(
            (0..6 * 16)
                .map(|i| (i as f32 * 0.3).sin())
                .collect::<Vec<_>>(),
            (6, 16),
            &Device::Cpu,
        )?;
        let y = head.forward_branch(&x, "pgd", true)?;
        assert_eq!(y.dims(), &[6, 8]);
        // The last layer is a train-mode BN with weight 1, bias 0: per-feature mean 0, biased
        // variance 1 (up to eps).
        let yv = y.to_vec2::<f32>()?;
        for j in 0..8 {
            let col: Vec<f64> = yv.iter().map(|r| f64::from(r[j])).collect();
            let m = col.iter().sum::<f64>() / 6.0;
            let v = col.iter().map(|c| (c - m).powi(2)).sum::<f64>() / 6.0;
            assert!(m.abs() < 1e-5, "{m}");
            assert!((v - 1.0).abs() < 1e-3, "{v}");
        }
        // Only pgd's running stats moved.
        let pgd_rm = var(&varmap, "head.bn3.pgd.running_mean")?
            .as_tensor()
            .to_vec1::<f32>()?;
        let normal_rm = var(&varmap, "head.bn3.running_mean")?
            .as_tensor()
            .to_vec1::<f32>()?;
        assert!(pgd_rm.iter().any(|&v| v != 0.0));
        assert!(normal_rm.iter().all(|&v| v == 0.0));
        assert_eq!(
            head.forward_t(&x, false)?.to_vec2::<f32>()?,
            head.forward_branch(&x, "normal", false)?.to_vec2::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn linear_classifier_computes_affine_map() -> Result<()> {
        let cfg = ClassifierConfig {
            in_dim: 3,
            num_classes: 2,
        };
        let (varmap, clf) =
            build_seeded(0, &InitRules::default(), DType::F64, &Device::Cpu, |vb| {
                linear_classifier(&cfg, vb.pp(CLASSIFIER))
            })?;
        var(&varmap, "classifier.weight")?.set(&Tensor::new(
            &[[1f64, 2., 3.], [-1., 0., 0.5]],
            &Device::Cpu,
        )?)?;
        var(&varmap, "classifier.bias")?.set(&Tensor::new(&[0.5f64, -2.], &Device::Cpu)?)?;
        let y = clf.forward(&Tensor::new(
            &[[1f64, 1., 1.], [2., 0., -2.]],
            &Device::Cpu,
        )?)?;
        assert_eq!(y.to_vec2::<f64>()?, vec![vec![6.5, -2.5], vec![-3.5, -5.0]]);
        Ok(())
    }

    #[test]
    fn every_trainable_var_gets_a_gradient_and_no_buffer_does() -> Result<()> {
        let cfg = small_cfg();
        let (varmap, enc) =
            build_seeded(8, &InitRules::default(), DType::F32, &Device::Cpu, |vb| {
                encoder(&cfg, vb)
            })?;
        let x = Var::from_tensor(&input(4)?)?;
        let (h, z) = enc.forward_t(x.as_tensor(), true)?;
        let loss = (h.sqr()?.sum_all()? + z.narrow(1, 0, 3)?.sum_all()?)?;
        let grads = loss.backward()?;
        for (name, var) in crate::nn::init::named_vars(&varmap) {
            let g = grads.get(&var);
            if crate::nn::init::is_buffer(&name) {
                assert!(g.is_none(), "{name} is a buffer but got a gradient");
            } else {
                let g = g.ok_or_else(|| candle::Error::Msg(format!("no gradient for {name}")))?;
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm.is_finite() && norm > 0.0, "{name}: |g|^2 = {norm}");
            }
        }
        // The input gradient exists too (what the attacks need).
        assert!(grads.get(&x).is_some());
        Ok(())
    }
}
