//! The model engine (candle): LLaVA-1.5 modules, adapters, training and generation.
//!
//! The modules are our own (candle-transformers' llava cannot be trained, see docs/model.md):
//! [`clip`] (the frozen vision tower), [`projector`] (mlp2x_gelu), [`llama`] (the decoder with a
//! KV cache), tied together by [`llava`]. Every linear layer is a [`linear::Linear`] that can carry
//! an adapter; the decoder and projector use only ops with a backward. [`load`] reads llava-hf
//! directories and the CoIN split setup, [`image`] and [`template`] turn an image and a question
//! into model inputs, [`generate`] decodes greedily, [`tiny`] writes a random tiny model and
//! [`peft`] reads PEFT LoRA adapters; [`train`] holds the differentiable training core.

pub mod clip;
pub mod config;
pub mod error;
pub mod fused;
pub mod generate;
pub mod image;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod load;
pub mod peft;
pub mod projector;
pub mod rng;
pub mod template;
pub mod tiny;
pub mod train;

pub use error::MlError;

/// Result type of the model engine.
pub type Result<T> = std::result::Result<T, MlError>;

/// The device models run on: the first CUDA GPU when built with `--features cuda` and one is
/// present, otherwise the CPU. `COIN_DEVICE=cpu` forces the CPU.
pub fn default_device() -> candle_core::Device {
    #[cfg(feature = "cuda")]
    {
        if std::env::var("COIN_DEVICE").as_deref() != Ok("cpu") {
            if let Ok(d) = candle_core::Device::new_cuda(0) {
                return d;
            }
        }
    }
    candle_core::Device::Cpu
}

/// Thread policy for CPU work, applied once at program start (before the first tensor op).
///
/// candle runs element-wise CPU ops on its own barrier pool (whose workers spin between ops) and
/// GEMMs, like our [`fused`] kernels, on rayon's pool. With two cores or fewer the two pools'
/// threads compete for the cores: on the 2-core build machine under load, LoRA training ran
/// 1.5× (small benchmark model) to 2.6–3.0× (tiny) faster with the element-wise pool at one thread
/// (docs/benchmarks.md). So with ≤ 2 threads and `CANDLE_NUM_THREADS` unset, this sets it to 1;
/// GEMMs and the fused kernels keep every thread. Larger machines keep candle's default.
pub fn configure_cpu_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none()
        && candle_core::utils::get_num_threads() <= 2
    {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// The weight dtype for a device: bf16 on a GPU, f32 on the CPU; `COIN_DTYPE=f32|bf16|f16`
/// overrides it (e.g. f32 on a GPU to compare with a CPU run bit for bit).
pub fn default_dtype(device: &candle_core::Device) -> candle_core::DType {
    match std::env::var("COIN_DTYPE").as_deref() {
        Ok("f32") => return candle_core::DType::F32,
        Ok("bf16") => return candle_core::DType::BF16,
        Ok("f16") => return candle_core::DType::F16,
        _ => {}
    }
    if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    }
}

#[cfg(test)]
mod tests;
