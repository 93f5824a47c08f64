//! The model engine (candle): LLaVA-1.5 modules, adapters, training and generation.
//!
//! The modules are our own (candle-transformers' llava cannot be trained, see docs/model.md):
//! [`clip`] (the frozen vision tower), [`projector`] (mlp2x_gelu), [`llama`] (the decoder with a
//! KV cache), tied together by [`llava`]. Every linear layer is a [`linear::Linear`] that can carry
//! an adapter; the decoder and projector use only ops with a backward. [`load`] reads llava-hf
//! directories and the CoIN split setup, [`image`] and [`template`] turn an image and a question
//! into model inputs, [`generate`] decodes greedily, [`tiny`] writes a random tiny model and
//! [`peft`] reads PEFT LoRA adapters; [`train`] holds the differentiable training core.
//! [`runtime`] is the resolved runtime (threads, shards, kernels, device, dtype): the engine
//! reads no environment variable for them, callers pass them in.

pub mod clip;
pub mod config;
pub mod error;
pub mod export;
pub mod flash;
#[cfg(feature = "cuda")]
mod flash_cuda;
pub mod fused;
#[cfg(feature = "cuda")]
mod fused_cuda;
pub mod generate;
pub mod image;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod load;
pub mod merge;
pub mod peft;
pub mod projector;
pub mod rng;
pub mod runtime;
pub mod spm;
pub mod template;
pub mod tiny;
pub mod train;

pub use error::MlError;

/// Result type of the model engine.
pub type Result<T> = std::result::Result<T, MlError>;

#[cfg(test)]
mod tests;
