//! pipe-stages: every stage kind of pipe, registered into the engine's
//! [`Registry`](pipe_engine::Registry) by [`register_all`].
//!
//! # Brief overview
//!
//! Each kind is one [`TypedStage`](pipe_engine::TypedStage) in `kinds/`, with typed params
//! (serde defaults, `deny_unknown_fields`, range checks) and a `run` that fills its staging
//! folder:
//!
//! - [`kinds::dataset`]: CIFAR-10/100, ImageFolder trees (folders or `.tar.gz`), synthetic data,
//!   into a `data.safetensors` artifact ([`data`] holds the readers and the format);
//! - [`kinds::pretrain`]: SimCLR and EMP-SSL pretraining, standard, PGD- or free-adversarial;
//! - [`kinds::shell`]: a user's own command in the DAG.
//!
//! Shared building blocks: [`rng`] (our seeded generator: results never change because a
//! dependency changed its algorithms) and [`nn::augment`] (the multi-view augmentation engine).
//!
//! ```
//! let mut reg = pipe_engine::Registry::new();
//! pipe_stages::register_all(&mut reg);
//! assert!(reg.get("shell").is_some() && reg.get("dataset").is_some());
//! ```

pub mod data;
pub mod device;
pub mod journal;
pub mod kinds;
pub mod nn;
pub mod params;
pub mod rng;
pub mod tune;

/// Registers every stage kind.
pub fn register_all(reg: &mut pipe_engine::Registry) {
    reg.register_typed::<kinds::dataset::Dataset>();
    reg.register_typed::<kinds::shell::Shell>();
    reg.register_typed::<kinds::pretrain::Pretrain>();
    reg.register_typed::<kinds::pseudo_labels::PseudoLabelsKind>();
    reg.register_typed::<kinds::evaluate::Evaluate>();
    reg.register_typed::<kinds::attack_dataset::AttackDataset>();
    reg.register_typed::<kinds::finetune::Finetune>();
    reg.register_typed::<kinds::ssl_head::SslHeadKind>();
    reg.register_typed::<kinds::report::Report>();
}
