#!/usr/bin/env bash
# Store benchmark: a 256 MiB checkpoint of 8 tensors and a 40 MiB adapter of 16 tensors,
# one tensor rewritten per step for 5 steps. Measures coin's commit (ingest) per step,
# checkout (materialize), stored bytes and peak RSS, each commit and the checkout as a ratio
# to the durable floor measured in the same run (examples/blake3_bench.rs: blake3 of the file
# from a memory map with all threads + write and fsync of the changed tensor; write and fsync
# of the whole file); and the same sequence with git-lfs and DVC when they are installed (this
# script installs them: Debian's git-lfs, PyPI's dvc; BENCH_NO_INSTALL=1 skips that).
#
#   bench/store.sh                 # release build (what docs/benchmarks.md reports)
#   PROFILE=dev bench/store.sh     # reuse the dev build (deps are opt-level 3 there too)
#
# coin is measured through the real commands: `coin commit` (store objects, manifest, git
# commit, ref update, all fsynced) and `coin checkout REV --output DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --bin coin --example blake3_bench
  COIN=$PWD/target/release/coin
  BLAKE3_BENCH=$PWD/target/release/examples/blake3_bench
else
  cargo build --bin coin --example blake3_bench
  COIN=$PWD/target/debug/coin
  BLAKE3_BENCH=$PWD/target/debug/examples/blake3_bench
fi

if [ "${BENCH_NO_INSTALL:-0}" != 1 ]; then
  command -v git-lfs >/dev/null || { apt-get install -y -qq git-lfs || { apt-get update -qq && apt-get install -y -qq git-lfs; } || true; }
  command -v dvc >/dev/null || pip install -q dvc || true
fi
[ -x /usr/bin/time ] || { echo "GNU time (/usr/bin/time) is required for peak RSS"; exit 1; }

WORK=${BENCH_DIR:-$(mktemp -d /tmp/coin-bench.XXXXXX)}
echo "working in $WORK" >&2
COIN="$COIN" BLAKE3_BENCH="$BLAKE3_BENCH" exec python3 bench/store_bench.py "$WORK"
