#!/usr/bin/env bash
# Greedy generation tokens/s: coin (candle, CPU) vs HF transformers `generate` on the same tiny
# llava-hf weights (tests/fixtures/parity/model), batch 1 and 8, EOS ignored, warm-up excluded.
#   PYTHON=venv/bin/python bench/generate.sh [max_new_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
N=${1:-32}
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then cargo build --release --quiet; BIN=target/release/coin; else cargo build --quiet; BIN=target/debug/coin; fi
MODEL=tests/fixtures/parity/model
IMG=tests/fixtures/parity/image_a.png
printf '%-6s %-10s %-12s %-12s %s\n' batch tokens coin_tok/s hf_tok/s ratio
for B in 1 8; do
  C=$("$BIN" generate --model $MODEL --image $IMG --prompt "What is in the image?" \
        --max-new-tokens "$N" --bench-batch "$B" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens_per_s"], d["new_tokens"])')
  H=$("$PY" scripts/bench_generate_hf.py --model $MODEL --image $IMG --max-new-tokens "$N" --batch "$B" 2>/dev/null \
        | "$PY" -c 'import json,sys; d=json.loads(sys.stdin.readline()); print(d["tokens_per_s"])')
  set -- $C
  "$PY" -c "import sys; c,h=float('$1'),float('$H'); print(f'{$B:<6} {$2:<10} {c:<12.1f} {h:<12.1f} {c/h:.2f}x')"
done
