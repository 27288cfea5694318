//! Neural-network building blocks (candle-nn style): augmentation, ResNet-18 and heads, losses,
//! attacks, optimizers and schedules, checkpoints.
//!
//! Each block lives in its own module; the main types are re-exported by each module.
//!
//! candle traps met here (see ../shared/CANDLE.md): the CPU RNG cannot be seeded (every random
//! number comes from [`crate::rng`]); optimizer state must be detached; BN running stats are
//! `Var`s in the `VarMap` (never hand them to an optimizer); `avg_pool2d` backward is wrong for
//! non-divisible sizes (use a mean over (2, 3)); there is no no_grad (attacks use a detached copy
//! of the weights when they want no parameter gradients).

pub mod attacks;
pub mod augment;
pub mod autoattack;
pub mod batch_norm;
pub mod bench;
pub mod checkpoint;
pub mod classifier;
pub mod conv;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
pub mod defense;
pub mod heads;
pub mod init;
pub mod kmeans;
pub mod linalg;
pub mod losses;
pub mod optim;
pub mod resnet;
pub mod schedule;
pub mod spectral;

pub use augment::{
    AugmentError, BlurMethod, ColorJitter, DynAclConfig, EmpConfig, FinetuneConfig, GaussianBlur,
    Geometry, ImageBatch, Interpolation, Layout, MultiView, MultiViewConfig, PaddingMode,
    PipelineConfig, RandomCrop, RandomResizedCrop, SimClrConfig, Views, bench_emp, to_float,
};
