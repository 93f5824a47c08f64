#!/usr/bin/env bash
# The GPU check of issues 3 and 4, run on a machine with an NVIDIA GPU from the repository root:
#   scripts/gpu-check.sh BIN [quick|kernels|bench|7b]
# BIN is a `cargo build --release --features cuda` coin binary (see docs/cuda.md); a file ending
# in .xz is unpacked first. The training steps run the train_bench example of the same build:
# TRAIN_BENCH, by default BIN's examples/train_bench (cargo's layout) or, for BIN = DIR/*.xz,
# DIR/train_bench-cuda.xz (what scripts/build-cuda.sh writes); the kernel check likewise runs
# KERNEL_CHECK (examples/cuda_kernel_check, or DIR/cuda_kernel_check-cuda.xz). Needs python3
# with torch, transformers and peft for the PyTorch side. The full run is steps 1–3 and 5;
# `kernels` stops after step 1b, `quick` after step 3, `bench` runs step 4 only, `7b` step 5 only.
# Writes everything it prints to $OUT/gpu-check.log (OUT defaults to /tmp/gpu-check).
#  1. devices and driver;
#  1b. kernels: the fused ops' CUDA kernels and the blocked (flash) attention's (forward and
#     backward, f32/bf16/f16) against the CPU kernels, PASS/FAIL per op, dtype and gradient, then
#     fused vs composed timings (~1 minute);
#  2. generation: the HF parity model (tests/fixtures/parity) on CPU f32, CUDA f32, CUDA bf16 —
#     greedy tokens compared with each other and with the HF goldens;
#  3. training: LoRA and MoELoRA steps on the tiny model with CoIN-mini data, CPU f32 vs CUDA
#     f32 vs CUDA bf16, each CUDA run also with the fused kernels (-k) (same data order and
#     init; dropout off, since a GPU draws its masks on the device) — losses compared;
#  4. benchmark: LoRA r=128 training steps/s and peak GPU memory on a TinyLlama-1.1B-shaped
#     random model, coin (composed ops, then the fused CUDA kernels: BENCH_KERNELS="off on")
#     vs PyTorch+PEFT (bf16);
#  5. LLaVA-1.5-7B shapes (`coin model init --tiny --size 7b`, random bf16 weights): LoRA r=128 on
#     all seven linears + the projector, batch B7 (8) x (576 image + 128 text) positions, coin with
#     activation checkpointing and the fused kernels (BENCH7_KERNELS="on") vs PyTorch+PEFT with
#     gradient checkpointing and SDPA (steps/s >= 0.8x, peak GPU memory <= 1.5x: PASS/FAIL); greedy
#     generation at batch G7 (16), 32 new tokens, coin vs HF generate (>= 1x: PASS/FAIL).
set -uo pipefail
BIN=${1:?usage: scripts/gpu-check.sh BIN [quick]}
MODE=${2:-full}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
W=$(mktemp -d)
step() { echo; echo "=== $* ($(date +%T))"; }
if [[ "$BIN" == *.xz ]]; then TRAIN_BENCH=${TRAIN_BENCH:-$(dirname "$BIN")/train_bench-cuda.xz}
  KERNEL_CHECK=${KERNEL_CHECK:-$(dirname "$BIN")/cuda_kernel_check-cuda.xz}
else TRAIN_BENCH=${TRAIN_BENCH:-$(dirname "$BIN")/examples/train_bench}
  KERNEL_CHECK=${KERNEL_CHECK:-$(dirname "$BIN")/examples/cuda_kernel_check}; fi
# Unpack an .xz binary into $W; prints the path to run.
unpack() {
  if [[ "$1" == *.xz ]]; then
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$1" "$W/$2"
    chmod +x "$W/$2"; echo "$W/$2"
  else chmod +x "$1"; echo "$1"; fi
}

{ [ "$MODE" = bench ] || [ "$MODE" = 7b ]; } || {
step "1. device"
nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
NV=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13; do
  d=$(find "$NV" /usr/local/cuda* /usr/lib/x86_64-linux-gnu -name "$lib" 2>/dev/null | head -1)
  [ -n "$d" ] && LD_LIBRARY_PATH="$(dirname "$d"):${LD_LIBRARY_PATH:-}"
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
  [ -e "$d/libcuda.so.1" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$d"
done
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
BIN=$(unpack "$BIN" coin); TRAIN_BENCH=$(unpack "$TRAIN_BENCH" train_bench)
"$BIN" --version || { echo "FAIL: the binary does not start"; ldd "$BIN"; exit 1; }
ldd "$BIN" | grep -E "cuda|cublas|curand|not found"

step "1b. kernels: fused ops and blocked attention on CUDA vs the CPU kernels (forward, backward; f32, bf16, f16)"
if [ -e "$KERNEL_CHECK" ]; then
  KERNEL_CHECK=$(unpack "$KERNEL_CHECK" cuda_kernel_check)
  timeout 240 "$KERNEL_CHECK" || echo "FAIL: kernel check (exit $?)"
else echo "FAIL: no kernel check binary at $KERNEL_CHECK"; fi
[ "$MODE" = kernels ] && exit 0

step "2. generation: CPU f32 / CUDA f32 / CUDA bf16 on the parity model"
M=tests/fixtures/parity/model
for img in a b; do
  for run in cpu:f32 cuda:f32 cuda:bf16; do
    dev=${run%%:*}; dt=${run##*:}
    if [ "$dev" = cpu ]; then envs="COIN_DEVICE=cpu"; else envs="COIN_DEVICE=cuda"; fi
    env $envs COIN_DTYPE=$dt timeout 120 "$BIN" generate --model $M --image tests/fixtures/parity/image_$img.png \
      --prompt "What is shown in this image?" --max-new-tokens 12 --logits --json > "$W/gen-$img-$dev-$dt.json" \
      || echo "FAIL: generate $img $run"
  done
done
python3 - "$W" <<'EOF'
import json, sys, glob, os
w = sys.argv[1]
for img in "ab":
    runs = {}
    for f in sorted(glob.glob(f"{w}/gen-{img}-*.json")):
        try: runs[os.path.basename(f)[6:-5]] = json.load(open(f))
        except Exception as e: print("unreadable", f, e)
    base = runs.get("cpu-f32")
    for k, r in runs.items():
        same = base is not None and r["token_ids"] == base["token_ids"]
        d = max(abs(a - b) for a, b in zip(r["first_step_logits"], base["first_step_logits"])) if base else None
        print(f"image {img} {k:10s} tokens {r['token_ids']} equal-to-cpu={same} max|dlogit|={d}")
EOF

step "3. training steps: CPU f32 vs CUDA f32 vs CUDA bf16 (tiny model, CoIN-mini VizWiz)"
"$BIN" -q bench-data coin-mini --out "$W/mini" --train 64 --test 4 >/dev/null
python3 -c "import sys" # keep going even without python extras
"$BIN" -q model init --tiny "$W/tiny" >/dev/null
for method in lora moelora; do
  # DEV:DTYPE[:k] — k: with the fused CUDA kernels (runtime.kernels=on).
  for run in cpu:f32 cuda:f32 cuda:bf16 cuda:f32:k cuda:bf16:k; do
    IFS=: read -r dev dt k <<< "$run"
    ks=(); name=$dev-$dt; [ -n "$k" ] && { ks=(--set runtime.kernels=on); name=$name-k; }
    timeout 180 "$TRAIN_BENCH" --model "$W/tiny" --data "$W/mini" --task-dir VizWiz --method $method \
      --experts 2 --device $dev --dtype $dt "${ks[@]}" --batch 8 --steps 6 --warmup 0 --lr 2e-3 --dropout 0 \
      > "$W/train-$method-$name.json" || echo "FAIL: train $method $run"
  done
done
python3 - "$W" <<'EOF'
import json, sys
w = sys.argv[1]
for method in ["lora", "moelora"]:
    runs = {}
    for k in ["cpu-f32", "cuda-f32", "cuda-bf16", "cuda-f32-k", "cuda-bf16-k"]:
        try: runs[k] = json.load(open(f"{w}/train-{method}-{k}.json"))
        except Exception as e: print(method, k, "missing", e)
    base = runs.get("cpu-f32")
    for k, r in runs.items():
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])) if base else None
        print(f"{method:8s} {k:10s} losses {[round(x, 5) for x in r['losses']]} max rel diff vs cpu {rel:.2e}"
              f" steps/s {r['steps_per_s']:.1f}")
EOF
[ "$MODE" = quick ] && exit 0
}
{ [ "$MODE" = bench ] || [ "$MODE" = 7b ]; } && {
NV=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
for lib in libcublas.so.13 libcurand.so.10 libcudart.so.13; do
  d=$(find "$NV" -name "$lib" 2>/dev/null | head -1); [ -n "$d" ] && LD_LIBRARY_PATH="$(dirname "$d"):${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/nvidia/lib64"
BIN=$(unpack "$BIN" coin); TRAIN_BENCH=$(unpack "$TRAIN_BENCH" train_bench)
}

if [ "$MODE" = bench ]; then
BATCHES=${BATCHES:-8}
step "4. benchmark: LoRA r=128 on a TinyLlama-1.1B-shaped model, bf16, batch $BATCHES x (512 text + image)"
"$BIN" -q model init --tiny "$W/m1b" --size 1b >/dev/null && ls -la "$W/m1b"
for B in $BATCHES; do
echo "--- batch $B"
mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$1" & echo $!; }
for K in ${BENCH_KERNELS:-off on}; do
P=$(mem "$W/mem-coin-$K.txt")
timeout 300 "$TRAIN_BENCH" --model "$W/m1b" --device cuda --dtype bf16 --r 128 --alpha 256 --set runtime.kernels=$K \
  --batch $B --seq-len 512 --steps 10 --warmup 3 > "$W/bench-coin-$K.json" 2>"$W/coin.err" || { echo "FAIL: coin bench (kernels $K)"; head -3 "$W/coin.err"; }
kill $P
done
P=$(mem "$W/mem-torch.txt")
timeout 300 python3 scripts/bench_train_hf.py --model "$W/m1b" --device cuda --dtype bf16 --r 128 --alpha 256 \
  --batch $B --seq-len 512 --steps 10 --warmup 3 2>"$W/torch.err" > "$W/bench-torch.json" || { echo "FAIL: torch bench"; tail -20 "$W/torch.err"; }
kill $P
python3 - "$W" <<'EOF'
import json, sys
w = sys.argv[1]
def peak(f):
    try: return max(int(x) for x in open(f).read().split())
    except Exception: return None
res = {}
for k in ["coin-off", "coin-on", "torch"]:
    try: res[k] = json.load(open(f"{w}/bench-{k}.json"))
    except Exception as e: print(k, "missing", e); continue
    r = res[k]
    print(f"{k:8s} steps/s {r['steps_per_s']:.3f} tokens/s {r['tokens_per_s']:.0f} trainable {r['trainable_parameters']}"
          f" peak GPU (nvidia-smi) {peak(f'{w}/mem-{k}.txt')} MiB torch-allocator {r.get('peak_gpu_bytes')}"
          f" first/last loss {r['losses'][0]:.3f}/{r['losses'][-1]:.3f}")
for k in ["coin-off", "coin-on"]:
    if k in res and "torch" in res:
        print(f"ratio {k}/torch steps/s = {res[k]['steps_per_s'] / res['torch']['steps_per_s']:.2f}x")
EOF
for K in off on; do mv "$W/bench-coin-$K.json" "$W/bench-coin-$K-b$B.json" 2>/dev/null; done; mv "$W/bench-torch.json" "$W/bench-torch-b$B.json" 2>/dev/null
done
fi

[ "$MODE" = bench ] || {
step "5. LLaVA-1.5-7B shapes: LoRA r=128, batch ${B7:-8} x (576 image + 128 text), coin vs PyTorch+PEFT (gradient checkpointing, SDPA); generation at batch ${G7:-16} vs HF generate"
# Random weights with LLaVA-1.5-7B's shapes, bf16 (~14 GB on disk).
timeout 300 "$BIN" -q model init --tiny "$W/m7b" --size 7b || echo "FAIL: 7b model init"
gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$1" & echo $!; }
for K in ${BENCH7_KERNELS:-on}; do
  P=$(gpu_mem "$W/mem7-coin-$K.txt")
  timeout 420 "$TRAIN_BENCH" --model "$W/m7b" --device cuda --dtype bf16 --r 128 --alpha 256 \
    --set runtime.kernels=$K --set runtime.checkpointing=on \
    --batch "${B7:-8}" --seq-len 128 --steps "${S7:-5}" --warmup 2 > "$W/bench7-coin-$K.json" 2>"$W/coin7.err" \
    || { echo "FAIL: coin 7b train (kernels $K)"; tail -5 "$W/coin7.err"; }
  kill $P
done
P=$(gpu_mem "$W/mem7-torch.txt")
timeout 420 python3 scripts/bench_train_hf.py --model "$W/m7b" --device cuda --dtype bf16 --r 128 --alpha 256 \
  --attn sdpa --grad-checkpointing --batch "${B7:-8}" --seq-len 128 --steps "${S7:-5}" --warmup 2 \
  > "$W/bench7-torch.json" 2>"$W/torch7.err" || { echo "FAIL: torch 7b train"; tail -20 "$W/torch7.err"; }
kill $P
IMG=tests/fixtures/parity/image_a.png
COIN_DEVICE=cuda COIN_DTYPE=bf16 timeout 300 "$BIN" generate --model "$W/m7b" --image $IMG \
  --prompt "What is in the image?" --max-new-tokens 32 --bench-batch "${G7:-16}" > "$W/gen7-coin.json" \
  || echo "FAIL: coin 7b generate"
timeout 300 python3 scripts/bench_generate_hf.py --model "$W/m7b" --image $IMG --max-new-tokens 32 \
  --batch "${G7:-16}" --device cuda --dtype bf16 > "$W/gen7-hf.json" 2>"$W/hf7.err" \
  || { echo "FAIL: HF 7b generate"; tail -20 "$W/hf7.err"; }
python3 - "$W" ${BENCH7_KERNELS:-on} <<'EOF'
import json, sys
w, kernels = sys.argv[1], sys.argv[2:]
def load(f):
    try:
        text = open(f"{w}/{f}").read()
        try: return json.loads(text)
        except ValueError: return json.loads(text.splitlines()[0])
    except Exception as e: print("missing", f, e); return None
def peak(f):
    try: return max(int(x) for x in open(f"{w}/{f}").read().split())
    except Exception: return None
torch = load("bench7-torch.json"); tpeak = peak("mem7-torch.txt")
if torch:
    print(f"torch    steps/s {torch['steps_per_s']:.3f} peak GPU {tpeak} MiB (allocator {torch['peak_gpu_bytes']})"
          f" attn {torch.get('attn')} losses {[round(x, 3) for x in torch['losses']]}")
for k in kernels:
    c = load(f"bench7-coin-{k}.json"); cpeak = peak(f"mem7-coin-{k}.txt")
    if not c: continue
    print(f"coin-{k:3s} steps/s {c['steps_per_s']:.3f} peak GPU {cpeak} MiB losses {[round(x, 3) for x in c['losses']]}")
    if torch:
        sr = c['steps_per_s'] / torch['steps_per_s']
        print(f"  steps/s coin/torch {sr:.2f}x (target >= 0.8): {'PASS' if sr >= 0.8 else 'FAIL'}")
        if cpeak and tpeak:
            mr = cpeak / tpeak
            print(f"  peak memory coin/torch {mr:.2f}x (target <= 1.5): {'PASS' if mr <= 1.5 else 'FAIL'}")
g, h = load("gen7-coin.json"), load("gen7-hf.json")
if g and h:
    r = g["tokens_per_s"] / h["tokens_per_s"]
    print(f"generation batch {h['batch']}: coin {g['tokens_per_s']:.0f} tok/s, HF {h['tokens_per_s']:.0f} tok/s,"
          f" {r:.2f}x (target >= 1): {'PASS' if r >= 1 else 'FAIL'}")
EOF
}
tar czf "$OUT/results.tgz" -C "$W" $(cd "$W" && ls *.json *.txt 2>/dev/null)
