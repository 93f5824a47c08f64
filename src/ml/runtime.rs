//! The engine's runtime, resolved: CPU threads, data-parallel training shards, which CPU
//! kernels run, the device and the weight dtype ([`Runtime`]).
//!
//! The run configuration's `[runtime]` section (`workflow::config`) holds what was asked for,
//! `auto` included; [`Runtime`] holds the concrete values a run uses, and is what train and eval
//! records store. `auto` is resolved against [`Machine`], the facts of this machine probed once
//! per process, with the policies below ([`auto_elementwise_threads`], [`auto_shards`],
//! [`auto_dtype`], [`Kernels::build_default`]).
//!
//! The engine reads no environment variable for any of these: values are passed in. Shards and
//! kernels travel with the training loop's settings and the caller's thread
//! ([`super::fused::with_kernels`]); the device and dtype with the loaded model. The two thread
//! counts are process-wide in candle 0.11, which reads them only from its own environment
//! variables (`RAYON_NUM_THREADS` for GEMMs and rayon's pool, `CANDLE_NUM_THREADS` for its
//! element-wise pool): the `coin` binary sets those once at start, before any thread exists,
//! from the resolved values (`cli::main`). docs/config.md lists the settings and which of them
//! are part of the training key.

use std::fmt;
use std::sync::OnceLock;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::{MlError, Result};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (builds with `--features cuda`).
    Cuda,
}

/// The dtype of the weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit floats (the CPU's default).
    F32,
    /// bfloat16 (a GPU's default; CoIN trains in bf16).
    Bf16,
    /// float16.
    F16,
}

impl Dtype {
    /// The candle dtype.
    pub fn candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
        }
    }

    /// The lowercase name (`f32`, `bf16`, `f16`), as in configurations and records.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of the fused CPU kernels ([`super::fused`]) run. They change results by float rounding
/// only, so the choice is part of the training key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// None: candle's composed ops everywhere.
    Off,
    /// Only the fused LoRA linear (`fused::lora_linear`, built from candle's own kernels).
    Lora,
    /// All of them: the LoRA linear and the hand-written element loops (RMSNorm, masked
    /// softmax, RoPE, SwiGLU, dropout's mask product).
    On,
}

impl Kernels {
    /// What `auto` means in this build: [`Kernels::On`] in optimised builds, [`Kernels::Lora`]
    /// in debug builds, where the `coin` crate is compiled at opt-level 0 and the element loops
    /// ran ~1.9× slower per training step than candle's optimised kernels (docs/trainer.md).
    pub fn build_default() -> Kernels {
        if cfg!(debug_assertions) {
            Kernels::Lora
        } else {
            Kernels::On
        }
    }
}

/// Activation checkpointing of training ([`crate::ml::train::checkpoint`]): recompute each
/// decoder layer in the backward instead of keeping its activations. The gradients are the
/// same, so the choice is not part of the training key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// On for a micro-batch whose plain pass would take more than half of the free memory
    /// ([`crate::ml::train::checkpoint::pays`]).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// The resolved runtime of a run: every value concrete. Stored in train records (under
/// `config.runtime`) and eval records (under `runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Threads of rayon's pool: GEMMs, the fused kernels, the training shards.
    pub threads: usize,
    /// Threads of candle's element-wise pool (1: element-wise ops run on the calling thread).
    pub elementwise_threads: usize,
    /// Data-parallel shards per training micro-batch, at most (1 on a GPU).
    pub shards: usize,
    /// Which fused CPU kernels run.
    pub kernels: Kernels,
    /// The device.
    pub device: DeviceKind,
    /// The weight dtype.
    pub dtype: Dtype,
    /// Activation checkpointing in training (`auto` decides per micro-batch). Records written
    /// before the setting existed read as `auto`.
    #[serde(default)]
    pub checkpointing: Checkpointing,
}

impl Runtime {
    /// The candle device: the CPU, or the first CUDA GPU.
    pub fn device(&self) -> Result<candle_core::Device> {
        match self.device {
            DeviceKind::Cpu => Ok(candle_core::Device::Cpu),
            DeviceKind::Cuda => cuda_device(),
        }
    }

    /// The candle dtype.
    pub fn dtype(&self) -> DType {
        self.dtype.candle()
    }

    /// The values that change a training run's numbers, as JSON for the training key: the
    /// shards and kernels (float rounding: summation order, fused vs composed ops), the device
    /// and the dtype. The thread counts are left out: on the tiny and the small benchmark model,
    /// 1 to 4 GEMM threads and 1 to 3 element-wise threads gave bit-identical losses with the
    /// shards fixed (docs/config.md).
    pub fn keyed(&self) -> serde_json::Value {
        serde_json::json!({
            "shards": self.shards,
            "kernels": self.kernels,
            "device": self.device,
            "dtype": self.dtype,
        })
    }
}

fn cuda_device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        candle_core::Device::new_cuda(0).map_err(|e| {
            MlError::Input(format!(
                "runtime.device is cuda but no CUDA device could be opened ({e}); set \
                 runtime.device to cpu or auto"
            ))
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(MlError::Input(
            "runtime.device is cuda but this coin was built without the cuda feature; build \
             with --features cuda (docs/cuda.md) or set runtime.device to cpu or auto"
                .into(),
        ))
    }
}

/// The facts of this machine that `auto` settings resolve against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    /// CPU threads candle uses by default (one per physical core, or candle's own environment
    /// variable when the process has one; the `coin` binary clears it before probing).
    pub threads: usize,
    /// Whether a CUDA GPU can be opened (always false without the `cuda` feature).
    pub cuda: bool,
}

impl Machine {
    /// Probe the machine, once per process (later calls return the first answer).
    pub fn detect() -> Machine {
        static MACHINE: OnceLock<Machine> = OnceLock::new();
        *MACHINE.get_or_init(|| Machine {
            threads: candle_core::utils::get_num_threads().max(1),
            cuda: cfg!(feature = "cuda") && cuda_device().is_ok(),
        })
    }
}

/// `auto` for candle's element-wise pool: one thread (element-wise ops inline on the calling
/// thread) when the GEMM pool has ≤ 2 threads, else as many as the GEMM pool. With two cores or
/// fewer the two pools' threads compete for the cores: on the 2-core build machine LoRA
/// training ran 1.5× (small benchmark model) to 2.6–3.0× (tiny) faster with the element-wise
/// pool at one thread (docs/benchmarks.md). Larger machines keep candle's default.
pub fn auto_elementwise_threads(threads: usize) -> usize {
    if threads <= 2 {
        1
    } else {
        threads
    }
}

/// `auto` for the training shards: on the CPU with candle's element-wise pool off (one
/// element-wise thread), one shard per thread of rayon's pool; otherwise one. With candle's
/// spinning element-wise pool on, shards contend with it (measured slower on 2 cores); a GPU is
/// parallel already. docs/trainer.md has the measurements.
pub fn auto_shards(device: DeviceKind, threads: usize, elementwise_threads: usize) -> usize {
    match device {
        DeviceKind::Cpu if elementwise_threads == 1 => threads.max(1),
        _ => 1,
    }
}

/// `auto` for the dtype: bf16 on a GPU (CoIN's training dtype), f32 on the CPU.
pub fn auto_dtype(device: DeviceKind) -> Dtype {
    match device {
        DeviceKind::Cpu => Dtype::F32,
        DeviceKind::Cuda => Dtype::Bf16,
    }
}

/// `auto` for the device: the first CUDA GPU when there is one, else the CPU.
pub fn auto_device(machine: &Machine) -> DeviceKind {
    if machine.cuda {
        DeviceKind::Cuda
    } else {
        DeviceKind::Cpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_policies() {
        assert_eq!(auto_elementwise_threads(1), 1);
        assert_eq!(auto_elementwise_threads(2), 1);
        assert_eq!(auto_elementwise_threads(16), 16);
        assert_eq!(auto_shards(DeviceKind::Cpu, 2, 1), 2);
        assert_eq!(auto_shards(DeviceKind::Cpu, 16, 1), 16);
        assert_eq!(auto_shards(DeviceKind::Cpu, 16, 16), 1);
        assert_eq!(auto_shards(DeviceKind::Cpu, 2, 2), 1);
        assert_eq!(auto_shards(DeviceKind::Cuda, 8, 1), 1);
        assert_eq!(auto_dtype(DeviceKind::Cpu), Dtype::F32);
        assert_eq!(auto_dtype(DeviceKind::Cuda), Dtype::Bf16);
        let m = Machine {
            threads: 4,
            cuda: false,
        };
        assert_eq!(auto_device(&m), DeviceKind::Cpu);
        assert_eq!(auto_device(&Machine { cuda: true, ..m }), DeviceKind::Cuda);
    }

    #[test]
    fn names_are_the_serde_spellings() {
        for d in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            assert_eq!(serde_json::json!(d), serde_json::json!(d.name()));
            assert_eq!(d.to_string(), d.name());
        }
        assert_eq!(serde_json::json!(Kernels::Lora), serde_json::json!("lora"));
        assert_eq!(
            serde_json::json!(DeviceKind::Cuda),
            serde_json::json!("cuda")
        );
    }

    #[test]
    fn the_key_holds_what_changes_numbers() {
        let rt = Runtime {
            threads: 2,
            elementwise_threads: 1,
            shards: 2,
            kernels: Kernels::On,
            device: DeviceKind::Cpu,
            dtype: Dtype::F32,
            checkpointing: Checkpointing::Auto,
        };
        let k = rt.keyed();
        assert_eq!(
            k,
            serde_json::json!({"shards": 2, "kernels": "on", "device": "cpu", "dtype": "f32"})
        );
        assert_eq!(
            Runtime { threads: 7, ..rt }.keyed(),
            k,
            "threads are not keyed"
        );
        assert_ne!(Runtime { shards: 1, ..rt }.keyed(), k);
        assert_eq!(
            Runtime {
                checkpointing: Checkpointing::On,
                ..rt
            }
            .keyed(),
            k,
            "checkpointing gives the same gradients: not keyed"
        );
        assert_ne!(
            Runtime {
                kernels: Kernels::Off,
                ..rt
            }
            .keyed(),
            k
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let rt = Runtime {
            threads: 1,
            elementwise_threads: 1,
            shards: 1,
            kernels: Kernels::Off,
            device: DeviceKind::Cuda,
            dtype: Dtype::Bf16,
            checkpointing: Checkpointing::Auto,
        };
        let e = rt.device().expect_err("no cuda").to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
