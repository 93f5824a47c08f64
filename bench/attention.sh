#!/usr/bin/env bash
# One attention forward + backward on the CPU (f32, causal mask): the blocked online-softmax op
# (coin::ml::flash, runtime.kernels = on) against the score-matrix path (q·kᵀ, fused masked
# softmax, p·v: kernels on before the blocked op) — seconds per pass and the growth of the
# process's resident memory during the passes (peak VmHWM − VmRSS before), each path in its own
# process (examples/attn_bench.rs).
#   bench/attention.sh [reps]        ATTN_BENCH (an attn_bench binary) skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
if [ -z "${ATTN_BENCH:-}" ]; then
  cargo build --release --quiet --example attn_bench
  ATTN_BENCH=target/release/examples/attn_bench
fi
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d['$1'])"; }
printf '%-5s %-5s %-8s %-4s %-4s %-11s %-11s %-7s %-13s %-13s %s\n' \
  batch heads kv_heads seq dim flash_s scores_s ratio flash_MiB scores_MiB mem_ratio
for cfg in "8 16 16 528 64" "8 32 4 528 64" "8 16 16 704 128" "8 32 32 704 64"; do
  set -- $cfg
  F=$("$ATTN_BENCH" --path flash --batch "$1" --heads "$2" --kv-heads "$3" --seq "$4" --head-dim "$5" --reps "$REPS")
  S=$("$ATTN_BENCH" --path scores --batch "$1" --heads "$2" --kv-heads "$3" --seq "$4" --head-dim "$5" --reps "$REPS")
  ft=$(echo "$F" | field seconds_fwd_bwd); st=$(echo "$S" | field seconds_fwd_bwd)
  fm=$(echo "$F" | python3 -c "import json,sys; d=json.load(sys.stdin); print((d['peak_rss_bytes']-d['rss_before_bytes'])/2**20)")
  sm=$(echo "$S" | python3 -c "import json,sys; d=json.load(sys.stdin); print((d['peak_rss_bytes']-d['rss_before_bytes'])/2**20)")
  python3 -c "print(f'{$1:<5} {$2:<5} {$3:<8} {$4:<4} {$5:<4} {$ft:<11.3f} {$st:<11.3f} {$st/$ft:<7.2f} {$fm:<13.0f} {$sm:<13.0f} {$sm/$fm:.1f}')"
done
