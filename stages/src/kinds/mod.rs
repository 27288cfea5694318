//! Stage kinds, one module each.

pub mod dataset;
pub mod pretrain;
pub mod shell;
