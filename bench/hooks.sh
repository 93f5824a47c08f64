#!/usr/bin/env bash
# Hook overhead when there is nothing to do: the git hooks coin installs must stay well under
# a second. Times (mean of N runs, wall clock, ms) each installed hook script as git runs it,
# in a code repository with coin inside, 3 checkpoints and a pointer file:
#   post-checkout with HEAD unchanged (git checkout -- file), post-checkout across commits
#   that do not touch the pointer, post-merge likewise, pre-commit with nothing of coin's
#   staged, pre-push of a code branch holding no checkpoint.
#
#   bench/hooks.sh               # dev build (what docs/hooks.md reports)
#   PROFILE=release bench/hooks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-dev}
if [ "$PROFILE" = release ]; then
  cargo build --release --bin coin -q
  BIN=$PWD/target/release
else
  cargo build --bin coin -q
  BIN=$PWD/target/debug
fi
export PATH=$BIN:$PATH
N=${N:-20}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=b@x GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=b@x

python3 - "$T" <<'PY'
import json, os, struct, sys
t = sys.argv[1]
for i in range(3):
    d = os.path.join(t, f"ad{i}")
    os.makedirs(d)
    vals = [float(i + j) for j in range(4096)]
    data = b"".join(struct.pack("<f", v) for v in vals)
    h = json.dumps({"w": {"dtype": "F32", "shape": [4096], "data_offsets": [0, len(data)]}}).encode()
    open(os.path.join(d, "adapter_model.safetensors"), "wb").write(struct.pack("<Q", len(h)) + h + data)
    open(os.path.join(d, "adapter_config.json"), "w").write('{"peft_type": "LORA"}')
PY

git init -q -b main "$T/code"
cd "$T/code"
coin init -q
for i in 0 1 2; do id=$(coin commit -q "$T/ad$i" --task T$i); done
printf 'checkpoint = "%s"\noutput = "weights"\n' "$id" > model.coin
printf 'weights/\n' > .gitignore
echo a > a.txt
git add . && git commit -q -m one
echo b > b.txt && git add b.txt && git commit -q -m two
git init -q --bare "$T/remote.git"
git remote add origin "$T/remote.git"
git push -q origin main
echo c > c.txt && git add c.txt && git commit -q -m three
H1=$(git rev-parse HEAD~1); H2=$(git rev-parse HEAD)
git update-ref ORIG_HEAD "$H1"
Z=0000000000000000000000000000000000000000

time_ms() { # label, command...
  local label=$1; shift
  local start end
  start=$(date +%s%N)
  for _ in $(seq "$N"); do "$@" >/dev/null 2>&1 </dev/null || { echo "$label: failed" >&2; return 1; }; done
  end=$(date +%s%N)
  printf '%-52s %8.1f ms\n' "$label" "$(echo "($end - $start) / 1000000 / $N" | bc -l)"
}
push_input() { printf 'refs/heads/main %s refs/heads/main %s\n' "$H2" "$H1" | .git/hooks/pre-push origin "$T/remote.git"; }

echo "coin hooks, $PROFILE build, mean of $N runs ($(nproc) cores)"
time_ms "post-checkout, HEAD unchanged" .git/hooks/post-checkout "$H2" "$H2" 0
time_ms "post-checkout, 2 commits, pointer untouched" .git/hooks/post-checkout "$H1" "$H2" 1
time_ms "post-merge, pointer untouched" .git/hooks/post-merge 0
time_ms "pre-commit, nothing of coin's staged" .git/hooks/pre-commit
time_ms "pre-push, code branch without checkpoints" push_input
time_ms "coin --version (process start, for scale)" coin --version
time_ms "sh -c true (for scale)" sh -c true
