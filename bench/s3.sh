#!/usr/bin/env bash
# S3 remote benchmark: an 8-stage LoRA run (8 checkpoints of one adapter with LAYERS layers of
# q/v LoRA A/B pairs, f32, made by bench/s3_stages.py; stage k retrains layer k's four
# tensors, the rest stay as they were) pushed to and pulled from a local S3-compatible
# server (moto_server on 127.0.0.1), against `aws s3 sync` of the same checkpoint folders
# (whole files) to the same server. Prints bytes moved and wall time of each, and the ratios.
#
#   bench/s3.sh                    # dev build (deps at opt-level 3; transfer-bound anyway)
#   PROFILE=release bench/s3.sh
#   LAYERS=8 HIDDEN=4096 RANK=32 bench/s3.sh   # the adapter's size (defaults shown)
#   BENCH_NO_BUILD=1 bench/s3.sh   # use the coin binary already built
#
# Needs moto_server (pip install 'moto[server]') and the aws CLI.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-dev}
if [ "$PROFILE" = release ]; then
  [ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --release --bin coin
  COIN=$PWD/target/release/coin
else
  [ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --bin coin
  COIN=$PWD/target/debug/coin
fi
GEN=$PWD/bench/s3_stages.py
LAYERS=${LAYERS:-8}
HIDDEN=${HIDDEN:-4096}
RANK=${RANK:-32}
STAGES=8

command -v moto_server >/dev/null || { echo "moto_server is required (pip install 'moto[server]')"; exit 1; }
command -v aws >/dev/null || { echo "the aws CLI is required"; exit 1; }

WORK=$(mktemp -d /tmp/coin-s3-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT))" 2>/dev/null && break
  sleep 0.1
done

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
aws s3 mb s3://bench >/dev/null

now() { date +%s.%N; }
bytes_of() { du -sb --apparent-size "$1" | cut -f1; }

echo "machine: $(nproc) cores, $(uname -r); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "run: $STAGES stages, LoRA adapter LAYERS=$LAYERS HIDDEN=$HIDDEN RANK=$RANK (f32)"

python3 "$GEN" "$WORK/stages" "$STAGES" "$LAYERS" "$HIDDEN" "$RANK"
echo "checkpoint size: $(bytes_of "$WORK/stages/stage0") bytes; all stages: $(bytes_of "$WORK/stages") bytes"

# coin: commit each stage, then push (objects to S3, refs to a bare git repository).
cd "$WORK"
"$COIN" init repo >/dev/null
for k in $(seq 0 $((STAGES - 1))); do
  (cd repo && "$COIN" commit "$WORK/stages/stage$k" --task "T$k" >/dev/null)
done
git init -q --bare shared.git
(cd repo && "$COIN" remote add origin ../shared.git --objects s3://bench/coin >/dev/null)
t0=$(now)
(cd repo && "$COIN" push --json >"$WORK/push.json")
t1=$(now)
coin_push_s=$(echo "$t1 - $t0" | bc -l)
coin_push_bytes=$(python3 -c "import json; print(json.load(open('$WORK/push.json'))['objects']['bytes'])")
t0=$(now)
"$COIN" clone shared.git pulled --json >"$WORK/clone.json"
t1=$(now)
coin_pull_s=$(echo "$t1 - $t0" | bc -l)
coin_pull_bytes=$(python3 -c "import json; print(json.load(open('$WORK/clone.json'))['objects']['bytes'])")

# aws s3 sync: whole files, one folder per stage.
t0=$(now)
aws s3 sync --only-show-errors "$WORK/stages" s3://bench/sync
t1=$(now)
aws_push_s=$(echo "$t1 - $t0" | bc -l)
aws_push_bytes=$(bytes_of "$WORK/stages")
t0=$(now)
aws s3 sync --only-show-errors s3://bench/sync "$WORK/synced"
t1=$(now)
aws_pull_s=$(echo "$t1 - $t0" | bc -l)
aws_pull_bytes=$(bytes_of "$WORK/synced")

# The pulled run is byte-identical: check the last stage out and compare.
(cd pulled && "$COIN" checkout main --output "$WORK/check" >/dev/null)
cmp "$WORK/check/adapter_model.safetensors" "$WORK/stages/stage$((STAGES - 1))/adapter_model.safetensors"

printf '%-22s %14s %10s\n' "" "bytes moved" "seconds"
printf '%-22s %14d %10.2f\n' "coin push" "$coin_push_bytes" "$coin_push_s"
printf '%-22s %14d %10.2f\n' "aws s3 sync (up)" "$aws_push_bytes" "$aws_push_s"
printf '%-22s %14d %10.2f\n' "coin clone (pull)" "$coin_pull_bytes" "$coin_pull_s"
printf '%-22s %14d %10.2f\n' "aws s3 sync (down)" "$aws_pull_bytes" "$aws_pull_s"
python3 - "$coin_push_bytes" "$aws_push_bytes" "$coin_push_s" "$aws_push_s" \
  "$coin_pull_bytes" "$aws_pull_bytes" "$coin_pull_s" "$aws_pull_s" <<'EOF'
import sys
cb, ab, cs, as_, pb, qb, ps, qs = map(float, sys.argv[1:])
print(f"push: coin moves {cb/ab:.3f}x the bytes of aws s3 sync in {cs/as_:.2f}x the time")
print(f"pull: coin moves {pb/qb:.3f}x the bytes of aws s3 sync in {ps/qs:.2f}x the time")
EOF
