//! Stage kinds, one module each.

pub mod dataset;
pub mod pretrain;
pub mod evaluate;
pub mod attack_dataset;
pub mod finetune;
pub mod report;
pub mod shell;
