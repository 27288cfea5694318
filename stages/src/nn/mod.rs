//! Neural-network building blocks (candle-nn style): augmentation today.
//!
//! Each block lives in its own module; the main types are re-exported here flat.

pub mod augment;

pub use augment::{
    AugmentError, BlurMethod, ColorJitter, DynAclConfig, EmpConfig, FinetuneConfig, GaussianBlur,
    Geometry, ImageBatch, Interpolation, Layout, MultiView, MultiViewConfig, PaddingMode,
    PipelineConfig, RandomCrop, RandomResizedCrop, SimClrConfig, Views, bench_emp, to_float,
};
