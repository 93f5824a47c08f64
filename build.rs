//! Build step of the `cuda` feature only: compile the fused ops' CUDA kernels
//! (src/ml/cuda/fused.cu) and the blocked attention's (src/ml/cuda/flash.cu) to PTX with nvcc,
//! for src/ml/fused_cuda.rs and src/ml/flash_cuda.rs to embed. A build without
//! the feature does nothing here and needs no CUDA toolkit.
//!
//! nvcc is found as candle-kernels finds it: `NVCC`, else `CUDA_HOME/bin/nvcc`, else `nvcc` on
//! `PATH`. The PTX targets `compute_<CUDA_COMPUTE_CAP>` (default 80); the driver compiles it
//! for the GPU it runs on, so PTX for 80 also runs on an H100 (90).
use std::path::PathBuf;
use std::process::Command;

/// The CUDA sources and the PTX file each becomes in OUT_DIR.
const SOURCES: [(&str, &str); 2] = [
    ("src/ml/cuda/fused.cu", "fused.ptx"),
    ("src/ml/cuda/flash.cu", "flash.ptx"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for (source, _) in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for (source, ptx) in SOURCES {
        if let Err(e) = compile_ptx(source, ptx) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin").join("nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}

fn compile_ptx(source: &str, ptx: &str) -> Result<(), String> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set (run through cargo)")?;
    let out = PathBuf::from(out_dir).join(ptx);
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    if cap.is_empty() {
        return Err("CUDA_COMPUTE_CAP must be a number such as 90".to_string());
    }
    let nvcc = nvcc();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(source)
        .status()
        .map_err(|e| {
            format!(
                "cannot run nvcc ({}): {e}. Set NVCC or CUDA_HOME, or put nvcc on PATH \
                 (scripts/build-cuda.sh installs one).",
                nvcc.display()
            )
        })?;
    if !status.success() {
        return Err(format!("nvcc failed on {source} ({status})"));
    }
    Ok(())
}
