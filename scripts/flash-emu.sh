#!/usr/bin/env bash
# Run the blocked attention's CUDA kernels (src/ml/cuda/flash.cu, f32 instances) on the CPU
# through a thread-per-CUDA-thread emulation (tests/cuda_emu/emu.h) and compare them with the
# textbook attention and its gradients in double (docs/cuda.md). Needs g++ with C++20; no GPU,
# no CUDA toolkit.
#   scripts/flash-emu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${TMPDIR:-/tmp}/coin-flash-emu-$$
trap 'rm -f "$OUT"' EXIT
g++ -std=c++20 -O1 -pthread -Wno-unknown-pragmas -I tests/cuda_emu/include \
  -o "$OUT" tests/cuda_emu/flash_emu.cpp
"$OUT"
