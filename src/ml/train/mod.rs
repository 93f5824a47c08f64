//! The differentiable training core: a weight-gradient-free matmul for frozen linears
//! ([`frozen`]), trainable LoRA / MoELoRA adapters and projector as named `Var`s ([`params`]),
//! seeded adapter dropout ([`dropout`]), batches to full-sequence logits ([`batch`]) and the
//! assistant-only token cross-entropy ([`loss`]), an AdamW step ([`step`]) and saving LoRA / MoELoRA
//! adapters in PEFT/CoIN layout ([`save`]). See docs/training.md.

pub mod batch;
pub mod dropout;
pub mod frozen;
pub mod loss;
pub mod params;
pub mod save;
pub mod step;
pub mod torch_save;

#[cfg(test)]
mod adapter_tests;
#[cfg(test)]
mod tests;
