#!/usr/bin/env bash
# Pack benchmark: a MoELoRA checkpoint with LLaVA-7B's tensor count (32 layers × 7 projections
# × (1 router + 8 experts × lora_A/lora_B) = 3,808 tensors, small shapes: hidden 64, rank 4,
# f32), committed, checked out and fsck'ed in a repository whose objects are loose (commit run
# with COIN_STORE_LOOSE=1: one file per object, as before packs) and in one where commit writes
# the small new tensors as a pack (the default; `coin gc` runs after stage 2). A second stage rewrites
# the experts of 8 layers (896 tensors).
#
#   bench/packs.sh                 # release build
#   PROFILE=dev bench/packs.sh     # reuse the dev build (deps are opt-level 3 there too)
#   BENCH_NO_BUILD=1 ...           # use the binary as built
#
# Prints one line per step: seconds for the loose and the packed repository and their ratio,
# and the object files and bytes of each store.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  [ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --release --bin coin
  COIN=$PWD/target/release/coin
else
  [ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build --bin coin
  COIN=$PWD/target/debug/coin
fi
WORK=${BENCH_DIR:-$(mktemp -d /tmp/coin-packs.XXXXXX)}
echo "working in $WORK ($PROFILE build)" >&2
COIN="$COIN" exec python3 - "$WORK" <<'PY'
import json, os, struct, subprocess, sys, time, random

work = sys.argv[1]
coin = os.environ["COIN"]
LAYERS, PROJ, EXPERTS, HIDDEN, RANK = 32, ["q", "k", "v", "o", "gate", "up", "down"], 8, 64, 4

def checkpoint(path, stage):
    """stage 1: every tensor; stage 2: the experts of layers 0-7 rewritten."""
    tensors = []
    for l in range(LAYERS):
        for p in PROJ:
            base = f"base_model.model.model.layers.{l}.{p}_proj"
            tensors.append((f"{base}.router.weight", [EXPERTS, HIDDEN], (l, p, "r", 1)))
            for e in range(EXPERTS):
                s = stage if l < 8 else 1
                tensors.append((f"{base}.experts.{e}.lora_A.weight", [RANK, HIDDEN], (l, p, e, "A", s)))
                tensors.append((f"{base}.experts.{e}.lora_B.weight", [HIDDEN, RANK], (l, p, e, "B", s)))
    header, blobs, off = {}, [], 0
    for name, shape, seed in tensors:
        rng = random.Random(repr(seed))
        n = shape[0] * shape[1]
        data = struct.pack(f"<{n}f", *(rng.gauss(0, 0.02) for _ in range(n)))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "MOELORA", "r": 4, "experts": 8}')
    return len(tensors)

def run(repo, *args):
    env = dict(os.environ)
    if os.path.basename(repo) == "loose":
        env["COIN_STORE_LOOSE"] = "1"
    t = time.perf_counter()
    subprocess.run([coin, *args], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t

def store_files(repo):
    files = size = 0
    for root, _, names in os.walk(os.path.join(repo, ".coin", "objects")):
        for n in names:
            files += 1
            size += os.path.getsize(os.path.join(root, n))
    return files, size

n = checkpoint(os.path.join(work, "s1"), 1)
checkpoint(os.path.join(work, "s2"), 2)
print(f"checkpoint: {n} tensors, {os.path.getsize(os.path.join(work, 's1', 'adapter_model.safetensors'))} bytes")
rows = {}
for kind in ["loose", "packed"]:
    repo = os.path.join(work, kind)
    os.makedirs(repo)
    subprocess.run([coin, "init"], cwd=repo, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = rows.setdefault(kind, {})
    r["commit stage 1"] = run(repo, "commit", "../s1", "--task", "A")
    r["commit stage 2"] = run(repo, "commit", "../s2", "--task", "B")
    if kind == "packed":
        r["gc"] = run(repo, "gc")
    r["checkout stage 1"] = run(repo, "checkout", "HEAD~1", "--output", "out1")
    r["checkout stage 2"] = run(repo, "checkout", "HEAD", "--output", "out2")
    r["fsck"] = run(repo, "fsck")
    r["files"], r["bytes"] = store_files(repo)
print(f"{'step':<18} {'loose s':>9} {'packed s':>9} {'packed/loose':>13}")
for step in ["commit stage 1", "commit stage 2", "gc", "checkout stage 1", "checkout stage 2", "fsck"]:
    l, p = rows["loose"].get(step), rows["packed"][step]
    print(f"{step:<18} {l if l is not None else float('nan'):>9.3f} {p:>9.3f} {(p / l) if l else float('nan'):>13.2f}")
for kind in ["loose", "packed"]:
    print(f"{kind}: {rows[kind]['files']} files under .coin/objects, {rows[kind]['bytes']} bytes")
PY
