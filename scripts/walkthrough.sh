#!/usr/bin/env bash
# The README's main job until `coin demo` exists: a tour of coin on generated data, on CPU,
# with nothing to download. Builds coin, then in a fresh directory (default: a temp dir):
#   - records a sequence of LoRA adapter checkpoints with eval results (dedupe per tensor),
#   - reads the history back: log, show, diff with forgetting, byte-identical checkout, fsck, gc,
#   - branches a second task order,
#   - generates the CoIN-mini benchmark and a tiny LLaVA-1.5, registers the tasks, runs the model,
#   - scores answer files with CoIN's scorers and computes continual-learning metrics,
#   - trains LoRA on three CoIN-mini tasks in order (coin run), prints the accuracy matrix,
#     reuses shared steps in a second order, and shares the history through a bare remote.
#   bash scripts/walkthrough.sh [DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --quiet --manifest-path "$root/Cargo.toml" --bin coin --example synth_adapter
coin() { "$root/target/debug/coin" "$@"; }
synth() { "$root/target/debug/examples/synth_adapter" "$@" >/dev/null; }
dir=${1:-$(mktemp -d -t coin-walkthrough-XXXX)}
mkdir -p "$dir" && cd "$dir"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "coin $*"; coin "$@"; }

run init repo
cd repo

# Three training steps of one adapter (16 tensors); each step rewrites one tensor, as a
# continual run carrying one LoRA from task to task would, and records eval scores.
tasks=(ScienceQA TextVQA ImageNet)
scores=('{"ScienceQA":{"metric":"accuracy","score":84.2,"n":200}}'
        '{"ScienceQA":{"metric":"accuracy","score":71.5,"n":200},"TextVQA":{"metric":"vqa_soft","score":58.3,"n":100}}'
        '{"ScienceQA":{"metric":"accuracy","score":66.0,"n":200},"TextVQA":{"metric":"vqa_soft","score":49.1,"n":100},"ImageNet":{"metric":"accuracy","score":91.0,"n":100}}')
for i in 0 1 2; do
  synth "runs/step$i" "$i"
  printf '%s\n' "${scores[$i]}" > "runs/step$i/eval.json"
  run commit "runs/step$i/adapter_model.safetensors" "runs/step$i/adapter_config.json" \
      --task "${tasks[$i]}" -m "LoRA after ${tasks[$i]}" --eval "runs/step$i/eval.json"
done

run log
run diff HEAD~2 HEAD
run stats --json
run checkout HEAD~1 --output restored
say "cmp restored/adapter_model.safetensors runs/step1/adapter_model.safetensors"
cmp restored/adapter_model.safetensors runs/step1/adapter_model.safetensors && echo "byte-identical"
run fsck

# A second task order branches off after the first step; plain git sees coin's refs.
run switch -c order-b HEAD~2
run branch
say "git log --oneline refs/coin/heads/main"
git log --oneline refs/coin/heads/main
run gc --dry-run

# CoIN-mini, a tiny LLaVA-1.5, and the model running on a generated image.
cd ..
run bench-data coin-mini --out data/mini
run model init --tiny models/tiny
imgs=(data/mini/cl_dataset/ImageNet_withlabel/test/*.png)
run generate --model models/tiny --image "${imgs[0]}" \
    --prompt "What is the object in the image?" --max-new-tokens 4 --json
cd repo
run task add --coin-mini ../data/mini
run task list

# Scoring an answer file exactly as CoIN's scripts do: here a made-up answer file in CoIN's
# JSONL format that answers every ImageNet-like question with "circle".
cd ..
q=data/mini/Instructions_Original/ImageNet/test.json
grep -o '"question_id": *"[^"]*"' "$q" | sed 's/.*: *\(".*"\)/{"question_id": \1, "text": "circle"}/' > answers.jsonl
run score --task ImageNet --questions "$q" --answers answers.jsonl --mode compat
run score --task ImageNet --questions "$q" --answers answers.jsonl --mode strict --json

# Continual-learning metrics from an accuracy matrix (rows: after each step; columns: tasks).
run metrics "$root/docs/examples/matrix.csv"

# The real loop on the tiny model: train task after task (one LoRA carried along), evaluate every
# step on every task seen, commit each step; then the accuracy matrix and its metrics.
cd repo
cat >> .coin/config.toml <<'TOML'

[model]
preset = "tiny"
base = "../models/tiny"

[train]
num_train_epochs = 1.0
TOML
run run --order mini-VizWiz,mini-GQA,mini-VQAv2 --branch mini
run matrix mini --plot matrix.svg
# A second order that starts with the same task reuses that step instead of training it again.
run run --order mini-VizWiz,mini-VQAv2 --branch mini-alt
run compare mini mini-alt

# Sharing: push to a bare remote, clone elsewhere, check out byte-identical adapters.
git init -q --bare ../shared.git
run remote add origin ../shared.git
run push origin mini
cd ..
run clone shared.git clone
cd clone
run checkout origin/mini --output adapter-from-remote
cd ..
echo
echo "The repository is in $dir/repo (a clone in $dir/clone); explore it with coin log, coin show, coin diff, coin matrix."
