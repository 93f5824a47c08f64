#!/usr/bin/env bash
# Build the CUDA coin binary on a machine without a GPU or CUDA toolkit (docs/cuda.md):
# nvcc 13.0 from PyPI wheels, stub libraries for the link, sm_90 (H100/H200) kernels.
#   scripts/build-cuda.sh [TOOLCHAIN_DIR] [TARGET_DIR]
# Result: TARGET_DIR/release/coin (needs libcuda, cuBLAS 13, cuRAND 10, cudart 13 at run time),
# plus a stripped, xz-compressed copy TARGET_DIR/coin-cuda.xz small enough to carry; the same for
# the training benchmark example (TARGET_DIR/release/examples/train_bench, train_bench-cuda.xz)
# and the kernel check (examples/cuda_kernel_check, cuda_kernel_check-cuda.xz) that
# scripts/gpu-check.sh runs beside it. coin's build.rs compiles src/ml/cuda/fused.cu to PTX
# with the same nvcc (CUDA_HOME, CUDA_COMPUTE_CAP).
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${1:-$HOME/.cache/coin-cuda}
TARGET=${2:-target-cuda}
PY=${PYTHON:-python3}
mkdir -p "$TC/whl"
if [ ! -x "$TC/tree/nvidia/cu13/bin/nvcc" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$TC/whl" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96
  for f in "$TC"/whl/*.whl; do unzip -q -o "$f" -d "$TC/tree"; done
  ln -sfn lib "$TC/tree/nvidia/cu13/lib64"
  ln -sf libcudart.so.13 "$TC/tree/nvidia/cu13/lib/libcudart.so"
  chmod +x "$TC"/tree/nvidia/cu13/bin/* "$TC"/tree/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
fi
export CUDA_HOME=$TC/tree/nvidia/cu13
export PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
STUBS=$CUDA_HOME/lib/stubs
export LIBRARY_PATH=$STUBS:$CUDA_HOME/lib
# First pass builds everything up to the final link (which fails without the libraries).
cargo build --release --locked --features cuda --target-dir "$TARGET" || true
if [ ! -f "$STUBS/libcuda.so" ]; then
  mkdir -p "$STUBS"
  RLIB=$(ls "$TARGET"/release/deps/libcudarc-*.rlib | head -1)
  nm -u "$RLIB" 2>/dev/null | awk '{print $2}' | sort -u > "$STUBS/symbols.txt"
  stub() { # prefix-regex soname file
    grep -E "$1" "$STUBS/symbols.txt" | sed 's/.*/void &(void){}/' > "$STUBS/$3.c"
    gcc -shared -fPIC -Wl,-soname,"$2" -o "$STUBS/$3" "$STUBS/$3.c"
    ln -sf "$3" "$STUBS/$2"
  }
  stub '^cu[A-Z]' libcuda.so.1 libcuda.so
  stub '^cublasLt' libcublasLt.so.13 libcublasLt.so
  stub '^cublas[^L]|^cublas$' libcublas.so.13 libcublas.so
  stub '^curand' libcurand.so.10 libcurand.so
  stub '^nvrtc' libnvrtc.so.13 libnvrtc.so
fi
cargo build --release --locked --features cuda --target-dir "$TARGET" --bin coin --example train_bench \
  --example cuda_kernel_check
strip -o "$TARGET/coin-cuda" "$TARGET/release/coin"
xz -T0 -9 -c "$TARGET/coin-cuda" > "$TARGET/coin-cuda.xz"
strip -o "$TARGET/train_bench-cuda" "$TARGET/release/examples/train_bench"
xz -T0 -9 -c "$TARGET/train_bench-cuda" > "$TARGET/train_bench-cuda.xz"
strip -o "$TARGET/cuda_kernel_check-cuda" "$TARGET/release/examples/cuda_kernel_check"
xz -T0 -9 -c "$TARGET/cuda_kernel_check-cuda" > "$TARGET/cuda_kernel_check-cuda.xz"
ls -la "$TARGET/release/coin" "$TARGET/coin-cuda" "$TARGET/coin-cuda.xz" "$TARGET/train_bench-cuda.xz" \
  "$TARGET/cuda_kernel_check-cuda.xz"
