#!/usr/bin/env bash
# LoRA training speed and peak memory on the CPU: coin (examples/train_bench.rs, the library
# trainer) vs PyTorch+PEFT (scripts/bench_train_hf.py) on the same random llava-hf model, the
# same shapes (batch × (text + image patches)), LoRA on q,k,v,o,gate,up,down + full projector,
# AdamW, clipping; warm-up steps excluded. Each engine runs in its own process (peak RSS = the
# process's VmHWM / ru_maxrss; CPU seconds per step = user + system time of all threads, steadier
# than the wall clock on a shared machine). Then coin's peak memory across adapter ranks on one model, to show
# it grows with the adapter, not with the frozen weights.
#   PYTHON=venv/bin/python bench/train.sh [steps]
#   bench/train.sh checkpointing [size] [batch] [text tokens] [steps] [warmup]   (see below)
# BIN (a coin binary) and TRAIN_BENCH (a train_bench example binary) skip the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${1:-10}
PROFILE=${PROFILE:-release}
if [ -n "${BIN:-}" ] && [ -n "${TRAIN_BENCH:-}" ]; then :
elif [ "$PROFILE" = release ]; then
  cargo build --release --quiet --bin coin --example train_bench
  BIN=${BIN:-target/release/coin}; TRAIN_BENCH=${TRAIN_BENCH:-target/release/examples/train_bench}
else
  cargo build --quiet --bin coin --example train_bench
  BIN=${BIN:-target/debug/coin}; TRAIN_BENCH=${TRAIN_BENCH:-target/debug/examples/train_bench}
fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
if [ "${1:-}" = checkpointing ]; then
  # Activation checkpointing off vs on, each in its own process (peak RSS = VmHWM):
  #   bench/train.sh checkpointing [size] [batch] [text tokens] [steps] [warmup]
  # (defaults 1b 8 512 2 1: batch 8 × 528 positions with the tiny tower's 16 patches).
  # MODEL=DIR uses an existing model directory instead of writing one. MODES="on" skips the
  # plain run (whose activations may not fit: ~2.6 GiB per 528-position row on the 1b model).
  SIZE=${2:-1b}; B=${3:-8}; SEQ=${4:-512}; N=${5:-2}; WU=${6:-1}
  M=${MODEL:-}
  if [ -z "$M" ]; then M="$W/$SIZE"; "$BIN" -q model init --tiny "$M" --size "$SIZE"; fi
  for mode in ${MODES:-off on}; do
    "$TRAIN_BENCH" --model "$M" --batch "$B" --seq-len "$SEQ" --steps "$N" --warmup "$WU" \
      --device cpu --set runtime.checkpointing="$mode" > "$W/$mode.json"
  done
  "$PY" - "$W" ${MODES:-off on} <<'PY'
import json, sys
w, modes = sys.argv[1], sys.argv[2:]
r = {m: json.load(open(f"{w}/{m}.json")) for m in modes}
# steps_MiB: the steps' peak above the memory resident when they start (the loaded model,
# the adapter and its optimizer state), i.e. what the activations and gradients add.
above = lambda d: (d["steps_peak_rss_bytes"] - d["rss_before_steps_bytes"]) / 2**20 \
    if d.get("steps_peak_rss_bytes") and d.get("rss_before_steps_bytes") else float("nan")
print(f"{'mode':<5} {'batch':<5} {'pos/row':<7} {'tok/s':<8} {'s/step':<8} {'cpu_s/step':<10} {'peak_MiB':<9} "
      f"{'resident_MiB':<12} {'steps_MiB':<9} {'ckpt_layers':<11} losses")
for m, d in r.items():
    st = sum(d["step_seconds"][-d["timed_steps"]:]) / max(d["timed_steps"], 1)
    res = (d.get("rss_before_steps_bytes") or 0) / 2**20
    print(f"{m:<5} {d['batch']:<5} {d['positions_per_row']:<7.0f} {d['tokens_per_s']:<8.1f} {st:<8.1f} "
          f"{d['cpu_seconds_per_step']:<10.1f} {d['peak_rss_bytes']/2**20:<9.0f} {res:<12.0f} {above(d):<9.0f} {str(d.get('checkpointed_layers')):<11} {d['losses']}")
if "off" in r and "on" in r:
    off, on = r["off"], r["on"]
    rel = lambda a, b: max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b))
    print(f"on/off: steps' peak above the resident model {above(on)/above(off):.3f}, "
          f"process peak {on['peak_rss_bytes']/off['peak_rss_bytes']:.3f}, "
          f"throughput {on['tokens_per_s']/off['tokens_per_s']:.3f}, "
          f"CPU s/step {on['cpu_seconds_per_step']/off['cpu_seconds_per_step']:.3f}; "
          f"max relative difference of losses {rel(off['losses'], on['losses']):.1e}, "
          f"of gradient norms {rel(off['grad_norms'], on['grad_norms']):.1e}")
PY
  exit 0
fi
"$BIN" -q model init --tiny "$W/tiny" --size tiny
"$BIN" -q model init --tiny "$W/small" --size small
field() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print(d['$1'])"; }
printf '%-6s %-5s %-4s %-12s %-12s %-7s %-14s %-15s %-16s %s\n' model batch seq coin_tok/s torch_tok/s ratio coin_peak_MiB torch_peak_MiB coin_cpu_s/step torch_cpu_s/step
for cfg in "tiny 8 64" "small 8 128"; do
  set -- $cfg
  C=$("$TRAIN_BENCH" --model "$W/$1" --batch "$2" --seq-len "$3" --steps "$STEPS" --warmup 2 --device cpu)
  T=$("$PY" scripts/bench_train_hf.py --model "$W/$1" --batch "$2" --seq-len "$3" --steps "$STEPS" --warmup 2 2>/dev/null)
  ct=$(echo "$C" | field tokens_per_s); tt=$(echo "$T" | field tokens_per_s)
  cm=$(echo "$C" | field peak_rss_bytes); tm=$(echo "$T" | field peak_rss_bytes)
  cc=$(echo "$C" | field cpu_seconds_per_step); tc=$(echo "$T" | field cpu_seconds_per_step)
  "$PY" -c "print(f'{\"$1\":<6} {$2:<5} {$3:<4} {$ct:<12.0f} {$tt:<12.0f} {$ct/$tt:<7.2f} {$cm/2**20:<14.0f} {$tm/2**20:<15.0f} {$cc:<16.3f} {$tc:.3f}')"
done
echo
echo "coin peak memory vs adapter rank (small model, batch 8, seq 128):"
printf '%-5s %-12s %-14s\n' r trainable peak_MiB
for r in 8 64 256; do
  C=$("$TRAIN_BENCH" --model "$W/small" --batch 8 --seq-len 128 --steps 3 --warmup 1 --r "$r" --alpha $((2 * r)) --device cpu)
  "$PY" -c "import json; d=json.loads('''$C'''); print(f\"{$r:<5} {d['trainable_parameters']:<12} {d['peak_rss_bytes']/2**20:.0f}\")"
done
echo "model weights on disk: tiny $(du -m "$W/tiny/model.safetensors" | cut -f1) MiB, small $(du -m "$W/small/model.safetensors" | cut -f1) MiB"
