#!/usr/bin/env bash
# Compression of stored tensors (coin repack's codecs): ratio and MB/s of encode and decode per
# variant (plain zstd, byte planes + zstd, high byte split + zstd; zstd levels 1 and 3) against
# plain zstd in the same run, on generated LoRA A/B matrices (r 128 x 4096, f32 and bf16) and
# on trained adapters; then ingest, repack and checkout through the store. See
# docs/benchmarks.md ("Compression of stored tensors").
#
#   bench/compress.sh [ADAPTER.safetensors ...]
#
# A trained adapter: check out a checkpoint of a `coin train` or `coin demo` repository
# (`coin checkout REV --output DIR`) and pass DIR/adapter_model.safetensors.
#
# The example is built in the dev profile with coin itself at opt-level 3 (dependencies are
# opt-level 3 there already), so no release build of the whole crate is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

OPT=(--config 'profile.dev.package.coin.opt-level=3')
cargo build -q --example compress_bench "${OPT[@]}"
echo "# $(date -u +%F), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
target/debug/examples/compress_bench "$@"
