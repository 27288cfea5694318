//! Stage kinds, one module each.

pub mod attack_dataset;
pub mod dataset;
pub mod evaluate;
pub mod finetune;
pub mod pretrain;
pub mod pseudo_labels;
pub mod report;
pub mod shell;
pub mod ssl_head;
