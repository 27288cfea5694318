//! ResNet-18, CIFAR variant, with a width parameter and optional multi-BN branches.
//!
//! # Architecture (METHODS.md 2.3)
//!
//! With `w` = [`ResNetConfig::width`] (64 = the paper's network):
//!
//! | part | definition | output shape for a (b, 3, 32, 32) input |
//! |---|---|---|
//! | stem | conv3x3(3 → w, stride 1, pad 1, no bias) → BN → ReLU; **no max-pool** | (b, w, 32, 32) |
//! | `layer1` | 2 [`BasicBlock`]s, w channels, stride 1 | (b, w, 32, 32) |
//! | `layer2` | 2 blocks, 2w channels, first block stride 2 | (b, 2w, 16, 16) |
//! | `layer3` | 2 blocks, 4w channels, first block stride 2 | (b, 4w, 8, 8) |
//! | `layer4` | 2 blocks, 8w channels, first block stride 2 | (b, 8w, 4, 4) |
//! | pool | global average pool, `x.mean((2, 3))` | (b, 8w) |
//!
//! A basic block with stride `s` computes
//! `relu(bn2(conv2(relu(bn1(conv1_s(x))))) + shortcut(x))`, where the shortcut is
//! `bn(conv1x1_s(x))` when the shape changes and the identity otherwise. All convolutions have
//! no bias and run [`crate::nn::conv`]'s im2col + gemm op on the CPU; BN (+ ReLU) and the
//! residual add + ReLU run [`crate::nn::batch_norm`]'s fused ops (candle's ops elsewhere, or
//! everywhere with [`ResNet::with_kernels`]). The global pool is a mean over (2, 3), not
//! `avg_pool2d`, whose backward is wrong in candle 0.11 (CANDLE.md).
//!
//! [`ResNet::frozen`] is the same network on detached weights: attacks on it compute only the
//! input gradient (candle has no `no_grad`).
//!
//! Parameter count (convolutions and BN affine parameters, running statistics excluded, one BN
//! branch): 11,168,832 at w = 64 (torchvision's `resnet18` with the 3x3 stem and no `fc`),
//! 700,176 at w = 16 and 175,752 at w = 8.
//!
//! # Batch normalisation
//!
//! Every BN is a [`BranchBatchNorm`]: momentum 0.1, eps 1e-5, exactly torch's
//! `BatchNorm2d`. A forward with `train = true` normalises with the batch statistics (biased
//! variance) and updates the running statistics in place,
//! `running ← 0.9 · running + 0.1 · batch` with the **unbiased** batch variance, and increments
//! `num_batches_tracked`; a forward with `train = false` uses the running statistics and changes
//! nothing (candle gotcha 2: attacks and evaluation must pass `train = false` unless a
//! faithful mode asks otherwise).
//!
//! # Multi-BN branches
//!
//! [`ResNetConfig::branches`] lists the BN branches (`normal`, `pgd`, `pgd_ce`, ...). Every BN
//! layer holds one independent BN per branch (own affine parameters, own running statistics);
//! all convolutions are shared. [`ResNet::forward_branch`] selects the branch for one forward;
//! [`ModuleT::forward_t`] uses the first listed branch.
//!
//! # Tensor names
//!
//! Names follow torchvision's `resnet18` `state_dict` below the [`VarBuilder`] prefix:
//! `conv1.weight`, `bn1.{weight,bias,running_mean,running_var,num_batches_tracked}`,
//! `layer{1..4}.{0,1}.conv{1,2}.weight`, `layer{1..4}.{0,1}.bn{1,2}.*`,
//! `layer{2,3,4}.0.downsample.0.weight` (the 1x1 conv) and `layer{2,3,4}.0.downsample.1.*` (its
//! BN). The branch named [`DEFAULT_BRANCH`] (`normal`) keeps the plain torchvision BN names;
//! every other branch `b` inserts its name before the parameter: `bn1.pgd.weight`,
//! `layer2.0.downsample.1.pgd.running_mean`, ... So a single-branch (`normal`) checkpoint is
//! exactly torchvision's, and names depend only on the branch name, never on the order of the
//! branch list. (R-AIR's `batch_norm_multiple` names them `bn1.bn_list.<index>.*` instead, by
//! position in its `bn_names` list; a converter maps one onto the other.)
//!
//! # Initialisation
//!
//! The constructor only registers tensors: convolution weights start as zeros, BNs as
//! weight 1, bias 0, running mean 0, running variance 1. Call
//! [`init_seeded`](crate::nn::init::init_seeded) (Kaiming-normal, seeded by our own RNG,
//! because candle's CPU RNG cannot be seeded) or load a checkpoint before use. This also keeps
//! construction cheap.
//!
//! ```
//! use candle::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use pipe_stages::nn::init::{InitRules, init_seeded};
//! use pipe_stages::nn::resnet::{ResNetConfig, resnet18};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let cfg = ResNetConfig { width: 8, ..Default::default() };
//! let net = resnet18(&cfg, vb.pp("encoder"))?;
//! init_seeded(&varmap, 0, &InitRules::default())?;
//! let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
//! assert_eq!(net.forward_t(&x, false)?.dims(), &[2, 64]);
//! assert_eq!(net.feature_dim(), 64);
//! # Ok::<(), candle::Error>(())
//! ```

use candle::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::nn::batch_norm::{add_relu, batch_norm};
use crate::nn::conv::{Conv2d, Conv2dConfig, KernelImpl, conv2d_no_bias};

/// The BN branch whose tensors keep torchvision's plain names.
pub const DEFAULT_BRANCH: &str = "normal";

/// The BN branch of adversarial inputs in dual-BN models (the ACL family's pretraining and
/// AFF; `finetune` reads an encoder through it).
pub const PGD_BRANCH: &str = "pgd";

/// BN momentum (torch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// BN epsilon (torch's default).
pub const BN_EPS: f64 = 1e-5;

/// The names a BN layer registers under its own prefix; a branch may not use them.
const BN_TENSOR_NAMES: [&str; 5] = [
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
];

/// Configuration of [`resnet18`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResNetConfig {
    /// Channels of the stem and `layer1`; the later stages have 2x, 4x, 8x (64 = the paper).
    pub width: usize,
    /// BN branches, each with its own BNs everywhere; the first is the default branch.
    pub branches: Vec<String>,
    /// Normalise the input by ImageNet's per-channel mean and std as the first op (the ACL
    /// family's models, METHODS.md 0); the constants are buffers `normalize.mean` and
    /// `normalize.std`, as in R-AIR's `state_dict`. Off: raw `[0, 1]` pixels (CF-AMC-SSL).
    pub input_norm: bool,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            width: 64,
            branches: vec![DEFAULT_BRANCH.to_string()],
            input_norm: false,
        }
    }
}

/// The module of the input-normalisation buffers ([`ResNetConfig::input_norm`]).
pub const INPUT_NORM: &str = "normalize";
/// ImageNet's per-channel mean (R-AIR / R-RCS `NormalizeByChannelMeanStd`).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation.
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The `(mean, std)` buffers of the input normalisation, each `(1, 3, 1, 1)`.
#[derive(Debug, Clone)]
struct InputNorm {
    mean: Tensor,
    std: Tensor,
}

impl ResNetConfig {
    /// The output feature dimension, `8 · width`.
    pub fn feature_dim(&self) -> usize {
        8 * self.width
    }

    /// Checks the width and the branch names (see [`validate_branches`]).
    ///
    /// # Errors
    /// If `width` is zero or a branch name is invalid.
    pub fn validate(&self) -> Result<()> {
        if self.width == 0 {
            candle::bail!("resnet18: width must be positive")
        }
        validate_branches(&self.branches)
    }
}

/// Checks a BN branch list: non-empty, unique names of `[a-z0-9_]`, none of them a BN tensor
/// name (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`).
///
/// # Errors
/// Naming the offending branch.
pub fn validate_branches(branches: &[String]) -> Result<()> {
    if branches.is_empty() {
        candle::bail!("BN branches: the list is empty")
    }
    for (i, b) in branches.iter().enumerate() {
        let charset_ok = b
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
        if b.is_empty() || !charset_ok {
            candle::bail!("BN branch {b:?}: names must be non-empty and use only [a-z0-9_]")
        }
        if BN_TENSOR_NAMES.contains(&b.as_str()) {
            candle::bail!("BN branch {b:?}: clashes with a BN tensor name")
        }
        if branches[..i].contains(b) {
            candle::bail!("BN branch {b:?} is listed twice")
        }
    }
    Ok(())
}

/// One BN of one branch plus its `num_batches_tracked` counter.
#[derive(Debug, Clone)]
struct BnBranch {
    name: String,
    bn: BatchNorm,
    /// i64 scalar, +1 per train-mode forward (torch's buffer of the same name).
    num_batches_tracked: Var,
}

/// A BN layer with one independent [`BatchNorm`] per branch (momentum 0.1, eps 1e-5).
///
/// Works on (b, c) and (b, c, h, w) inputs (torch's `BatchNorm1d` / `BatchNorm2d`).
#[derive(Debug, Clone)]
pub struct BranchBatchNorm {
    branches: Vec<BnBranch>,
    imp: KernelImpl,
}

/// Builds a [`BranchBatchNorm`] over `num_features` channels with one BN per branch.
///
/// Tensor names below `vb`: `weight`, `bias`, `running_mean`, `running_var`,
/// `num_batches_tracked` for [`DEFAULT_BRANCH`], `<branch>.weight`, ... for the others.
/// A backend without a `num_batches_tracked` tensor (a checkpoint that lacks it) gets a fresh
/// counter at 0 that is not saved.
///
/// # Errors
/// On invalid branch names or a tensor of the wrong shape.
pub fn branch_batch_norm(
    num_features: usize,
    branches: &[String],
    vb: VarBuilder,
) -> Result<BranchBatchNorm> {
    validate_branches(branches)?;
    let cfg = BatchNormConfig {
        eps: BN_EPS,
        remove_mean: true,
        affine: true,
        momentum: BN_MOMENTUM,
    };
    let mut out = Vec::with_capacity(branches.len());
    for name in branches {
        let bvb = if name == DEFAULT_BRANCH {
            vb.clone()
        } else {
            vb.pp(name)
        };
        let bn = candle_nn::batch_norm(num_features, cfg, bvb.clone())?;
        let counter = match bvb.get_with_hints_dtype(
            (),
            "num_batches_tracked",
            Init::Const(0.),
            DType::I64,
        ) {
            Ok(t) => Var::from_tensor(&t)?,
            Err(_) if !bvb.contains_tensor("num_batches_tracked") => {
                Var::zeros((), DType::I64, vb.device())?
            }
            Err(e) => return Err(e),
        };
        out.push(BnBranch {
            name: name.clone(),
            bn,
            num_batches_tracked: counter,
        });
    }
    Ok(BranchBatchNorm {
        branches: out,
        imp: KernelImpl::from_env(),
    })
}

impl BranchBatchNorm {
    fn get(&self, branch: &str) -> Result<&BnBranch> {
        match self.branches.iter().find(|b| b.name == branch) {
            Some(b) => Ok(b),
            None => {
                let names: Vec<&str> = self.branches.iter().map(|b| b.name.as_str()).collect();
                candle::bail!("unknown BN branch {branch:?} (this model has {names:?})")
            }
        }
    }

    /// The name of the first (default) branch.
    pub fn default_branch(&self) -> &str {
        self.branches
            .first()
            .map(|b| b.name.as_str())
            .expect("validate_branches rejects an empty branch list")
    }

    /// Normalises `x` (b, c, ...) with the BN of `branch`; `train` uses the batch statistics
    /// and updates that branch's running statistics and counter.
    ///
    /// # Errors
    /// On an unknown branch or a channel-count mismatch.
    pub fn forward_branch(&self, x: &Tensor, branch: &str, train: bool) -> Result<Tensor> {
        self.forward_act(x, branch, train, false)
    }

    /// [`BranchBatchNorm::forward_branch`], followed by a ReLU when `relu` (one fused op on the
    /// CPU, see [`crate::nn::batch_norm`]).
    ///
    /// # Errors
    /// On an unknown branch or a channel-count mismatch.
    pub fn forward_act(&self, x: &Tensor, branch: &str, train: bool, relu: bool) -> Result<Tensor> {
        let b = self.get(branch)?;
        let y = batch_norm(x, &b.bn, train, relu, self.imp)?;
        if train {
            let next = (b.num_batches_tracked.as_tensor() + 1.0)?;
            b.num_batches_tracked.set(&next)?;
        }
        Ok(y)
    }

    /// The [`BatchNorm`] of one branch (its running statistics, affine parameters).
    ///
    /// # Errors
    /// On an unknown branch.
    pub fn branch(&self, branch: &str) -> Result<&BatchNorm> {
        Ok(&self.get(branch)?.bn)
    }

    /// The same layer on detached affine parameters (shared storage, no gradient), sharing the
    /// running statistics and counters with `self` (a train-mode forward still updates them).
    ///
    /// # Errors
    /// Never in practice (the shapes were checked when `self` was built).
    pub fn frozen(&self) -> Result<Self> {
        let branches = self
            .branches
            .iter()
            .map(|b| {
                let (rm, rv) = (b.bn.running_mean(), b.bn.running_var());
                let n = rm.dim(0)?;
                // `Var::from_tensor` on a variable's tensor shares it: the running statistics
                // stay the live ones.
                let bn = match b.bn.weight_and_bias() {
                    Some((w, bias)) => BatchNorm::new_with_momentum(
                        n,
                        rm.clone(),
                        rv.clone(),
                        w.detach(),
                        bias.detach(),
                        b.bn.eps(),
                        b.bn.momentum(),
                    )?,
                    None => BatchNorm::new_no_bias_with_momentum(
                        n,
                        rm.clone(),
                        rv.clone(),
                        b.bn.eps(),
                        b.bn.momentum(),
                    )?,
                };
                Ok(BnBranch {
                    name: b.name.clone(),
                    bn,
                    num_batches_tracked: b.num_batches_tracked.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            branches,
            imp: self.imp,
        })
    }

    /// The same layer running `imp` (fused CPU op or candle-nn's `BatchNorm`).
    pub fn with_kernels(self, imp: KernelImpl) -> Self {
        Self { imp, ..self }
    }

    /// How many train-mode forwards the branch has seen (torch's `num_batches_tracked`).
    ///
    /// # Errors
    /// On an unknown branch.
    pub fn num_batches_tracked(&self, branch: &str) -> Result<i64> {
        self.get(branch)?
            .num_batches_tracked
            .as_tensor()
            .to_scalar::<i64>()
    }
}

impl ModuleT for BranchBatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_branch(x, self.default_branch(), train)
    }
}

/// A bias-free convolution whose weight is registered as a zero placeholder.
fn conv_no_bias(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    conv2d_no_bias(c_in, c_out, kernel, Conv2dConfig { stride, padding }, vb)
}

/// torchvision's `BasicBlock`: two 3x3 convolutions with BN, plus the shortcut.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BranchBatchNorm,
    conv2: Conv2d,
    bn2: BranchBatchNorm,
    /// 1x1 conv (stride s) + BN, present when the shape changes.
    downsample: Option<(Conv2d, BranchBatchNorm)>,
}

/// Builds a [`BasicBlock`] from `c_in` to `c_out` channels with the given stride (names
/// `conv1`, `bn1`, `conv2`, `bn2`, `downsample.0`, `downsample.1` below `vb`).
///
/// # Errors
/// On invalid branch names or a tensor of the wrong shape.
pub fn basic_block(
    c_in: usize,
    c_out: usize,
    stride: usize,
    branches: &[String],
    vb: VarBuilder,
) -> Result<BasicBlock> {
    let conv1 = conv_no_bias(c_in, c_out, 3, stride, 1, vb.pp("conv1"))?;
    let bn1 = branch_batch_norm(c_out, branches, vb.pp("bn1"))?;
    let conv2 = conv_no_bias(c_out, c_out, 3, 1, 1, vb.pp("conv2"))?;
    let bn2 = branch_batch_norm(c_out, branches, vb.pp("bn2"))?;
    let downsample = if stride != 1 || c_in != c_out {
        let vb = vb.pp("downsample");
        let conv = conv_no_bias(c_in, c_out, 1, stride, 0, vb.pp("0"))?;
        let bn = branch_batch_norm(c_out, branches, vb.pp("1"))?;
        Some((conv, bn))
    } else {
        None
    };
    Ok(BasicBlock {
        conv1,
        bn1,
        conv2,
        bn2,
        downsample,
    })
}

impl BasicBlock {
    /// (b, c_in, h, w) → (b, c_out, h / s, w / s) using the BNs of `branch`.
    ///
    /// # Errors
    /// On an unknown branch or shape errors.
    pub fn forward_branch(&self, x: &Tensor, branch: &str, train: bool) -> Result<Tensor> {
        let out = self.conv1.forward(x)?;
        let out = self.bn1.forward_act(&out, branch, train, true)?;
        let out = self.conv2.forward(&out)?;
        let out = self.bn2.forward_branch(&out, branch, train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_branch(&conv.forward(x)?, branch, train)?,
            None => x.clone(),
        };
        add_relu(&out, &shortcut, self.bn2.imp)
    }

    /// The block on detached weights (see [`ResNet::frozen`]).
    ///
    /// # Errors
    /// As [`BranchBatchNorm::frozen`].
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            conv1: self.conv1.detached(),
            bn1: self.bn1.frozen()?,
            conv2: self.conv2.detached(),
            bn2: self.bn2.frozen()?,
            downsample: match &self.downsample {
                Some((conv, bn)) => Some((conv.detached(), bn.frozen()?)),
                None => None,
            },
        })
    }

    /// The block with every convolution, BN and ReLU running `imp`.
    pub fn with_kernels(self, imp: KernelImpl) -> Self {
        Self {
            conv1: self.conv1.with_impl(imp),
            bn1: self.bn1.with_kernels(imp),
            conv2: self.conv2.with_impl(imp),
            bn2: self.bn2.with_kernels(imp),
            downsample: self
                .downsample
                .map(|(conv, bn)| (conv.with_impl(imp), bn.with_kernels(imp))),
        }
    }
}

/// ResNet-18, CIFAR variant (see the module docs).
#[derive(Debug, Clone)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BranchBatchNorm,
    /// `layer1` .. `layer4`, two blocks each.
    layers: Vec<Vec<BasicBlock>>,
    branches: Vec<String>,
    width: usize,
    input_norm: Option<InputNorm>,
}

/// Builds the CIFAR ResNet-18 below `vb` (conventionally `vb.pp("encoder")`).
///
/// Weights are zero placeholders until [`init_seeded`](crate::nn::init::init_seeded) or a
/// checkpoint load.
///
/// # Errors
/// On an invalid config or a tensor of the wrong shape in `vb`.
pub fn resnet18(cfg: &ResNetConfig, vb: VarBuilder) -> Result<ResNet> {
    cfg.validate()?;
    let w = cfg.width;
    let br = &cfg.branches;
    let input_norm = if cfg.input_norm {
        let nvb = vb.pp(INPUT_NORM);
        // placeholders until the seeded init (ImageNet's constants) or a checkpoint sets them
        let get = |name: &str| {
            nvb.get_with_hints(3, name, Init::Const(1.0))?
                .reshape((1, 3, 1, 1))
        };
        Some(InputNorm {
            mean: get("mean")?,
            std: get("std")?,
        })
    } else {
        None
    };
    let conv1 = conv_no_bias(3, w, 3, 1, 1, vb.pp("conv1"))?;
    let bn1 = branch_batch_norm(w, br, vb.pp("bn1"))?;
    let mut layers = Vec::with_capacity(4);
    let mut c_in = w;
    for (i, (mult, stride)) in [(1, 1), (2, 2), (4, 2), (8, 2)].into_iter().enumerate() {
        let c_out = w * mult;
        let lvb = vb.pp(format!("layer{}", i + 1));
        let first = basic_block(c_in, c_out, stride, br, lvb.pp("0"))?;
        let second = basic_block(c_out, c_out, 1, br, lvb.pp("1"))?;
        layers.push(vec![first, second]);
        c_in = c_out;
    }
    Ok(ResNet {
        conv1,
        bn1,
        layers,
        branches: br.clone(),
        width: w,
        input_norm,
    })
}

impl ResNet {
    /// The output feature dimension, `8 · width` (512 at width 64).
    pub fn feature_dim(&self) -> usize {
        8 * self.width
    }

    /// The base width `w`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The BN branches, default first.
    pub fn branches(&self) -> &[String] {
        &self.branches
    }

    /// The network on frozen weights, for attacks: every convolution and BN affine parameter
    /// is a detached copy (shared storage, so later optimizer steps show through), so a
    /// backward through it computes only the input gradient, no parameter gradient. The BN
    /// running statistics and counters are shared with `self` (attacks normally run in eval
    /// mode, which leaves them alone). Cheap: no tensor data is copied.
    ///
    /// # Errors
    /// Never in practice (the shapes were checked when `self` was built).
    pub fn frozen(&self) -> Result<Self> {
        Ok(Self {
            conv1: self.conv1.detached(),
            bn1: self.bn1.frozen()?,
            layers: self
                .layers
                .iter()
                .map(|l| l.iter().map(BasicBlock::frozen).collect())
                .collect::<Result<_>>()?,
            branches: self.branches.clone(),
            width: self.width,
            input_norm: self.input_norm.as_ref().map(|n| InputNorm {
                mean: n.mean.detach(),
                std: n.std.detach(),
            }),
        })
    }

    /// Whether the input is normalised inside the model ([`ResNetConfig::input_norm`]).
    pub fn has_input_norm(&self) -> bool {
        self.input_norm.is_some()
    }

    /// The network with every convolution, BN and ReLU running `imp`: this crate's fused CPU
    /// ops ([`crate::nn::conv`], [`crate::nn::batch_norm`]) or candle's reference ops. The
    /// weights are shared.
    pub fn with_kernels(self, imp: KernelImpl) -> Self {
        Self {
            conv1: self.conv1.with_impl(imp),
            bn1: self.bn1.with_kernels(imp),
            layers: self
                .layers
                .into_iter()
                .map(|l| l.into_iter().map(|b| b.with_kernels(imp)).collect())
                .collect(),
            ..self
        }
    }

    /// The stem BN (for inspecting running statistics).
    pub fn stem_bn(&self) -> &BranchBatchNorm {
        &self.bn1
    }

    /// (b, 3, h, w) → (b, 8·width) features, every BN using `branch`; `train` uses batch
    /// statistics and updates that branch's running statistics.
    ///
    /// # Errors
    /// On an unknown branch or an input that is not (b, 3, h, w).
    pub fn forward_branch(&self, x: &Tensor, branch: &str, train: bool) -> Result<Tensor> {
        if x.rank() != 4 || x.dim(1)? != 3 {
            candle::bail!(
                "resnet18: expected a (b, 3, h, w) input, got {:?}",
                x.shape()
            )
        }
        let mut x = match &self.input_norm {
            Some(n) => self
                .conv1
                .forward(&x.broadcast_sub(&n.mean)?.broadcast_div(&n.std)?)?,
            None => self.conv1.forward(x)?,
        };
        x = self.bn1.forward_act(&x, branch, train, true)?;
        for layer in &self.layers {
            for block in layer {
                x = block.forward_branch(&x, branch, train)?;
            }
        }
        // Global average pool; avg_pool2d's backward is wrong in candle 0.11.
        x.mean((2, 3))
    }
}

impl ModuleT for ResNet {
    /// [`ResNet::forward_branch`] with the first (default) branch.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_branch(x, &self.branches[0], train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::init::{InitRules, init_seeded, trainable};
    use candle::Device;
    use candle_nn::VarMap;

    fn build(width: usize, branches: &[&str], seed: u64) -> Result<(VarMap, ResNet)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            width,
            branches: branches.iter().map(|s| s.to_string()).collect(),
            input_norm: false,
        };
        let net = resnet18(&cfg, vb.pp("encoder"))?;
        init_seeded(&varmap, seed, &InitRules::default())?;
        Ok((varmap, net))
    }

    /// max |a - b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
        let d = (a - b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let s = b
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(d / s.max(1e-30))
    }

    #[test]
    fn the_cuda_conv_backward_gives_the_fast_ops_gradients_through_the_whole_net() -> Result<()> {
        // conv2d_composed (what CUDA runs) forced on the CPU, against the fused CPU ops: a train
        // step's parameter and input gradients, and an attack's input gradient on the frozen net
        let x0 = Tensor::from_vec(
            (0..4 * 3 * 32 * 32)
                .map(|i| (0.5 + 0.5 * (0.37 * i as f64).sin()) as f32)
                .collect(),
            (4, 3, 32, 32),
            &Device::Cpu,
        )?;
        // a fresh net each time: a train-mode forward moves the BN running statistics
        let step = |composed: bool| -> Result<(Vec<Tensor>, Tensor, Tensor)> {
            let (varmap, net) = build(8, &["normal"], 5)?;
            let params = trainable(&varmap);
            let frozen = net.frozen()?;
            crate::nn::conv::COMPOSED_ON_CPU.with(|c| c.set(composed));
            let x = candle::Var::from_tensor(&x0)?;
            let y = net.forward_t(x.as_tensor(), true)?;
            let r = Tensor::from_vec(
                (0..y.elem_count())
                    .map(|i| (1.7 + 0.37 * i as f64).sin() as f32)
                    .collect(),
                y.shape(),
                &Device::Cpu,
            )?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            let grads = params
                .iter()
                .map(|(n, v)| {
                    g.get(v.as_tensor())
                        .cloned()
                        .ok_or_else(|| candle::Error::Msg(format!("no gradient for {n}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let dx = g
                .get(x.as_tensor())
                .cloned()
                .ok_or_else(|| candle::Error::Msg("no dx".into()))?;
            let a = (frozen.forward_t(x.as_tensor(), false)? * &r)?
                .sum_all()?
                .backward()?;
            let attack_dx = a
                .get(x.as_tensor())
                .cloned()
                .ok_or_else(|| candle::Error::Msg("no attack dx".into()))?;
            for (n, v) in &params {
                assert!(
                    a.get(v.as_tensor()).is_none(),
                    "the attack differentiated {n}"
                );
            }
            crate::nn::conv::COMPOSED_ON_CPU.with(|c| c.set(false));
            Ok((grads, dx, attack_dx))
        };
        let fast = step(false)?;
        let composed = step(true)?;
        for (i, (a, b)) in composed.0.iter().zip(&fast.0).enumerate() {
            let e = rel(a, b)?;
            assert!(e < 1e-4, "parameter {i}: relative error {e:e}");
        }
        assert_eq!(composed.0.len(), 60, "20 convs and 20 BNs (weight, bias)");
        let e = rel(&composed.1, &fast.1)?;
        assert!(e < 1e-4, "input gradient: relative error {e:e}");
        let e = rel(&composed.2, &fast.2)?;
        assert!(e < 1e-4, "attack input gradient: relative error {e:e}");
        assert!(fast.1.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn input_norm_is_imagenet_standardisation_in_front_of_the_same_net() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            width: 8,
            input_norm: true,
            ..Default::default()
        };
        let net = resnet18(&cfg, vb.pp("encoder"))?;
        init_seeded(&varmap, 3, &InitRules::default())?;
        assert!(net.has_input_norm());
        // two buffers, not parameters: 60 trainable tensors as without them
        assert_eq!(varmap.all_vars().len(), 122);
        assert_eq!(trainable(&varmap).len(), 60);
        let data = varmap
            .data()
            .lock()
            .map_err(|e| candle::Error::Msg(e.to_string()))?;
        let mean = data["encoder.normalize.mean"]
            .as_tensor()
            .to_vec1::<f32>()?;
        let std = data["encoder.normalize.std"].as_tensor().to_vec1::<f32>()?;
        drop(data);
        assert_eq!(mean, [0.485f32, 0.456, 0.406]);
        assert_eq!(std, [0.229f32, 0.224, 0.225]);
        // the same weights (same seed and names) without the normalisation, fed
        // (x - mean) / std by hand
        let (_, plain) = build(8, &["normal"], 3)?;
        let x = input(2, 16, 0.3)?;
        let v: Vec<f32> = x.flatten_all()?.to_vec1::<f32>()?;
        let hw = 16 * 16;
        let standardised: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let c = (i / hw) % 3;
                (p - mean[c]) / std[c]
            })
            .collect();
        let xs = Tensor::from_vec(standardised, (2, 3, 16, 16), &Device::Cpu)?;
        let a = net.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        let b = plain
            .forward_t(&xs, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "max |difference| {worst}");
        assert!(a.iter().any(|&v| v > 0.0));
        Ok(())
    }

    /// A deterministic (b, 3, h, w) input: `0.5 + 0.5 sin(0.37 i + phase)` over the flat index.
    fn input(b: usize, hw: usize, phase: f64) -> Result<Tensor> {
        let n = b * 3 * hw * hw;
        let v: Vec<f32> = (0..n)
            .map(|i| (0.5 + 0.5 * (0.37 * i as f64 + phase).sin()) as f32)
            .collect();
        Tensor::from_vec(v, (b, 3, hw, hw), &Device::Cpu)
    }

    fn param_count(varmap: &VarMap) -> usize {
        trainable(varmap).iter().map(|(_, v)| v.elem_count()).sum()
    }

    #[test]
    fn output_shape_and_parameter_counts() -> Result<()> {
        // torch / torchvision 0.29 (stages/tests/nn_resnet_reference.py, `counts`):
        //   sum(p.numel() for p in cifar_resnet18(w).parameters())
        //   -> w=64: 11168832, w=16: 700176, w=8: 175752
        for (w, expected) in [(64, 11_168_832), (16, 700_176), (8, 175_752)] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let cfg = ResNetConfig {
                width: w,
                ..Default::default()
            };
            let net = resnet18(&cfg, vb)?;
            assert_eq!(param_count(&varmap), expected, "width {w}");
            assert_eq!(net.feature_dim(), 8 * w);
            // 120 state_dict entries, like torchvision's (60 trainable: 20 convs, 20 BN weights and biases).
            assert_eq!(varmap.all_vars().len(), 120);
            assert_eq!(trainable(&varmap).len(), 60);
        }
        let (_, net) = build(16, &["normal"], 1)?;
        let y = net.forward_t(&input(3, 32, 0.0)?, false)?;
        assert_eq!(y.dims(), &[3, 128]);
        // Odd sizes work too (stride-2 convs round up like torch's).
        let y = net.forward_t(&input(2, 9, 0.0)?, true)?;
        assert_eq!(y.dims(), &[2, 128]);
        // Features after ReLU + mean are non-negative and not all zero.
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|&x| x >= 0.0) && v.iter().any(|&x| x > 0.0));
        Ok(())
    }

    #[test]
    fn train_forward_updates_running_stats_like_torch() -> Result<()> {
        let (_, net) = build(8, &["normal"], 3)?;
        let x = input(4, 8, 0.3)?;
        let bn = net.stem_bn();
        // Independent computation of the stem BN's input statistics.
        let pre = net.conv1.forward(&x)?; // (4, 8, 8, 8)
        let pre: Vec<Vec<f64>> = {
            let t = pre.transpose(0, 1)?.flatten_from(1)?.to_dtype(DType::F64)?;
            t.to_vec2::<f64>()?
        };
        assert_eq!(bn.num_batches_tracked("normal")?, 0);
        net.forward_t(&x, true)?;
        assert_eq!(bn.num_batches_tracked("normal")?, 1);
        let rm = bn.branch("normal")?.running_mean().to_vec1::<f32>()?;
        let rv = bn.branch("normal")?.running_var().to_vec1::<f32>()?;
        for (c, vals) in pre.iter().enumerate() {
            let n = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / n;
            let var_unbiased = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let want_rm = 0.1 * mean;
            let want_rv = 0.9 + 0.1 * var_unbiased;
            assert!(
                (f64::from(rm[c]) - want_rm).abs() < 1e-5,
                "{c}: {} {want_rm}",
                rm[c]
            );
            assert!(
                (f64::from(rv[c]) - want_rv).abs() < 1e-4,
                "{c}: {} {want_rv}",
                rv[c]
            );
            assert!(mean.abs() > 1e-3, "the check must be able to fail");
        }
        // An eval forward changes nothing.
        net.forward_t(&input(4, 8, 1.7)?, false)?;
        assert_eq!(bn.branch("normal")?.running_mean().to_vec1::<f32>()?, rm);
        assert_eq!(bn.branch("normal")?.running_var().to_vec1::<f32>()?, rv);
        assert_eq!(bn.num_batches_tracked("normal")?, 1);
        // A second train forward moves them again.
        net.forward_t(&x, true)?;
        assert_ne!(bn.branch("normal")?.running_mean().to_vec1::<f32>()?, rm);
        assert_eq!(bn.num_batches_tracked("normal")?, 2);
        Ok(())
    }

    #[test]
    fn eval_forward_is_deterministic_and_batch_independent() -> Result<()> {
        let (_, net) = build(8, &["normal"], 5)?;
        // Non-trivial running statistics first.
        net.forward_t(&input(6, 16, 0.9)?, true)?;
        let x = input(4, 16, 0.0)?;
        let a = net.forward_t(&x, false)?.to_vec2::<f32>()?;
        let b = net.forward_t(&x, false)?.to_vec2::<f32>()?;
        assert_eq!(a, b);
        // Each row equals the forward of that image alone.
        for (i, row) in a.iter().enumerate() {
            let one = net
                .forward_t(&x.narrow(0, i, 1)?, false)?
                .to_vec2::<f32>()?;
            for (p, q) in one[0].iter().zip(row) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
        // Train mode is batch-dependent (the check above can fail).
        let t_all = net.forward_t(&x, true)?.to_vec2::<f32>()?;
        let t_two = net.forward_t(&x.narrow(0, 0, 2)?, true)?.to_vec2::<f32>()?;
        let diff: f32 = t_all[0]
            .iter()
            .zip(&t_two[0])
            .map(|(p, q)| (p - q).abs())
            .sum();
        assert!(diff > 1e-3, "{diff}");
        Ok(())
    }

    #[test]
    fn multi_bn_branches_are_independent() -> Result<()> {
        let (varmap, net) = build(8, &["normal", "pgd"], 7)?;
        let names: Vec<String> = trainable(&varmap).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"encoder.bn1.weight".to_string()));
        assert!(names.contains(&"encoder.bn1.pgd.weight".to_string()));
        assert!(names.contains(&"encoder.layer2.0.downsample.1.pgd.bias".to_string()));
        // 60 trainable tensors for one branch + 40 extra BN affine tensors (20 BNs).
        assert_eq!(names.len(), 60 + 40);
        let bn = net.stem_bn();
        let x = input(4, 8, 0.2)?;
        net.forward_branch(&x, "pgd", true)?;
        // Only the pgd branch moved.
        let rm_normal = bn.branch("normal")?.running_mean().to_vec1::<f32>()?;
        let rm_pgd = bn.branch("pgd")?.running_mean().to_vec1::<f32>()?;
        assert!(rm_normal.iter().all(|&v| v == 0.0));
        assert!(rm_pgd.iter().any(|&v| v != 0.0));
        assert_eq!(bn.num_batches_tracked("pgd")?, 1);
        assert_eq!(bn.num_batches_tracked("normal")?, 0);
        // forward_t uses the first branch: in eval it uses normal's (0, 1) statistics, which
        // differ from pgd's, so the outputs differ; forward_branch("normal") equals it.
        let y_default = net.forward_t(&x, false)?.to_vec2::<f32>()?;
        let y_normal = net.forward_branch(&x, "normal", false)?.to_vec2::<f32>()?;
        let y_pgd = net.forward_branch(&x, "pgd", false)?.to_vec2::<f32>()?;
        assert_eq!(y_default, y_normal);
        assert_ne!(y_normal, y_pgd);
        // Changing pgd's affine weight changes only the pgd output.
        let w = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("poisoned".into()))?
            .get("encoder.layer4.1.bn2.pgd.weight")
            .cloned()
            .ok_or_else(|| candle::Error::Msg("missing".into()))?;
        w.set(&(w.as_tensor() * 2.0)?)?;
        assert_eq!(
            net.forward_branch(&x, "normal", false)?.to_vec2::<f32>()?,
            y_normal
        );
        assert_ne!(
            net.forward_branch(&x, "pgd", false)?.to_vec2::<f32>()?,
            y_pgd
        );
        assert!(net.forward_branch(&x, "pgd_ce", false).is_err());
        Ok(())
    }

    /// max |a - b| / max(max |b|, 1e-30).
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        assert_eq!(a.dims(), b.dims());
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(f64::from(diff / scale.max(1e-30)))
    }

    /// Features, input gradient and every trainable gradient of `sum(net(x) · r)`.
    fn features_and_grads(
        net: &ResNet,
        varmap: &VarMap,
        x: &Var,
        train: bool,
    ) -> Result<Vec<(String, Option<Tensor>)>> {
        let y = net.forward_t(x.as_tensor(), train)?;
        // A fixed, sign-changing weight per feature: sin(0.37 i) + 0.2.
        let r = ((Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)? * 0.37)?.sin()?
            + 0.2)?
            .reshape(y.shape())?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let mut out = vec![
            ("features".to_string(), Some(y.clone())),
            ("input".to_string(), grads.get(x.as_tensor()).cloned()),
        ];
        for (name, var) in trainable(varmap) {
            out.push((name, grads.get(var.as_tensor()).cloned()));
        }
        Ok(out)
    }

    #[test]
    fn fast_kernels_match_candle_ops_in_value_and_every_gradient() -> Result<()> {
        let (varmap, net) = build(4, &["normal"], 11)?;
        let fast = net.clone().with_kernels(KernelImpl::Fast);
        let reference = net.with_kernels(KernelImpl::Candle);
        // 10x10 goes through 10 -> 5 -> 3 -> 2 in the stride-2 stages.
        let x = Var::from_tensor(&input(3, 10, 0.4)?)?;
        for train in [true, false] {
            let a = features_and_grads(&fast, &varmap, &x, train)?;
            let b = features_and_grads(&reference, &varmap, &x, train)?;
            assert_eq!(a.len(), 2 + 60);
            for ((name, ga), (_, gb)) in a.iter().zip(&b) {
                let (Some(ga), Some(gb)) = (ga, gb) else {
                    panic!("train={train} {name}: missing gradient")
                };
                let e = rel_err(ga, gb)?;
                assert!(e < 1e-4, "train={train} {name}: relative error {e:e}");
            }
        }
        Ok(())
    }

    #[test]
    fn frozen_network_computes_only_the_input_gradient() -> Result<()> {
        let (varmap, net) = build(4, &["normal"], 13)?;
        net.forward_t(&input(4, 8, 0.9)?, true)?; // non-trivial running statistics
        let frozen = net.frozen()?;
        let x = Var::from_tensor(&input(2, 8, 0.2)?)?;
        let live = features_and_grads(&net, &varmap, &x, false)?;
        let cold = features_and_grads(&frozen, &varmap, &x, false)?;
        // Same features and input gradient, bit for bit.
        for i in 0..2 {
            let (Some(a), Some(b)) = (&live[i].1, &cold[i].1) else {
                panic!("{}: missing", live[i].0)
            };
            assert_eq!(rel_err(a, b)?, 0.0, "{}", live[i].0);
        }
        // No parameter gradient on the frozen copy; all of them on the live network.
        for ((name, a), (_, b)) in live.iter().zip(&cold).skip(2) {
            assert!(a.is_some(), "{name}");
            assert!(b.is_none(), "{name}");
        }
        // The frozen copy shares storage: a parameter update shows through.
        let w = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("poisoned".into()))?
            .get("encoder.layer1.0.conv1.weight")
            .cloned()
            .ok_or_else(|| candle::Error::Msg("missing".into()))?;
        w.set(&(w.as_tensor() * 1.5)?)?;
        let after_live = net.forward_t(x.as_tensor(), false)?;
        let after_cold = frozen.forward_t(x.as_tensor(), false)?;
        assert_eq!(rel_err(&after_cold, &after_live)?, 0.0);
        if let Some(before) = &live[0].1 {
            assert!(
                rel_err(before, &after_live)? > 1e-4,
                "the update must change the output"
            );
        }
        // It shares the running statistics and counters too.
        frozen.forward_t(x.as_tensor(), true)?;
        assert_eq!(net.stem_bn().num_batches_tracked("normal")?, 2);
        Ok(())
    }

    #[test]
    fn branch_names_are_validated() {
        let ok =
            |b: &[&str]| validate_branches(&b.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["normal", "pgd", "pgd_ce"]).is_ok());
        assert!(ok(&[]).is_err());
        assert!(ok(&["normal", "normal"]).is_err());
        assert!(ok(&["a.b"]).is_err());
        assert!(ok(&["weight"]).is_err());
        assert!(ok(&["PGD"]).is_err());
        let cfg: ResNetConfig = serde_json::from_str(r#"{"width": 16}"#).expect("valid json");
        assert_eq!(cfg.branches, vec!["normal".to_string()]);
        assert!(serde_json::from_str::<ResNetConfig>(r#"{"widht": 16}"#).is_err());
    }
}
