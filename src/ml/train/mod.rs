//! The differentiable training core: a weight-gradient-free matmul for frozen linears
//! ([`frozen`]), trainable LoRA / MoELoRA adapters and projector as named `Var`s ([`params`]),
//! seeded adapter dropout ([`dropout`]), EWC's Fisher and penalty ([`ewc`]), batches to
//! full-sequence logits ([`batch`]) and the assistant-only token cross-entropy ([`loss`]),
//! Learning without Forgetting's distillation ([`lwf`]), an AdamW step ([`step`]), saving LoRA /
//! MoELoRA adapters in PEFT/CoIN layout ([`save`], [`torch_save`]); CoIN records to labelled
//! examples ([`data`]), AdamW with saveable state, schedules and clipping ([`optim`]) and the
//! resumable training loop ([`trainer`]). See docs/training.md and docs/trainer.md.

pub mod batch;
pub mod checkpoint;
pub mod data;
pub mod dropout;
pub mod ewc;
pub mod frozen;
pub mod full;
pub mod loss;
pub mod lwf;
pub mod olora;
pub mod optim;
pub mod params;
pub mod save;
pub mod step;
pub mod torch_save;
pub mod trainer;

#[cfg(test)]
mod adapter_tests;
#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod ewc_tests;
#[cfg(test)]
mod loop_tests;
#[cfg(test)]
mod olora_tests;
#[cfg(test)]
mod tests;
