#!/usr/bin/env bash
# End-to-end check of coin's external trainer and evaluator with a real PyTorch + PEFT trainer
# (scripts/external/peft_trainer.py) and evaluator (peft_eval.py) on CoIN-mini with the tiny
# llava-hf model, CPU only (a few minutes).
#
#   bash scripts/external/check.sh [WORKDIR]        (run from anywhere; WORKDIR: a fresh temp dir)
#   COIN=path/to/coin PY=path/to/python bash scripts/external/check.sh
#
# PY: a python with torch, transformers (with Llava, >= 4.36) and peft; default: python3 on PATH
# (torch 2.0.1, transformers 4.46.3, peft 0.13.2). COIN: default target/debug/coin of this tree.
#
# Two repositories, each: `coin init`, `coin model init --tiny`, CoIN-mini registered, a
# [trainer] in .coin/config.toml (peft_trainer.py --steps 4 --train-projector, parent_format
# peft), `coin run --order mini-ScienceQA,mini-ImageNet`, then:
#   A (coin's engine evaluates) and B (peft_eval.py evaluates, [evaluator]):
#   - `coin matrix --json`: two rows, the diagonal scores present;
#   - each checkpoint's train record names the external command, exit status 0;
#   - step 1 trained a new LoRA, step 2 continued the parent dir coin handed it (the trainer's
#     "parent adapter:" line in the captured log);
#   - a second `coin run` trains nothing (the trainer is not started; same matrix);
#   - `coin checkout --format peft` of each checkpoint loads with PeftModel.from_pretrained and
#     its LoRA tensors and projector equal those the trainer saved (copied aside by the
#     command), with equal logits.
# Then, for information: how many answers of coin's engine (A) equal peft_eval.py's (B) for the
# same adapters. Exits non-zero on the first failed check.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
COIN=${COIN:-$root/target/debug/coin}
PY=${PY:-python3}
work=${1:-$(mktemp -d -t coin-external-check-XXXX)}
order=mini-ScienceQA,mini-ImageNet
[ -x "$COIN" ] || { echo "check: no coin binary at $COIN (cargo build first, or set COIN)" >&2; exit 1; }
"$PY" -c 'import torch, transformers, peft' 2>/dev/null ||
  { echo "check: $PY lacks torch, transformers or peft (set PY)" >&2; exit 1; }
mkdir -p "$work"
work=$(cd "$work" && pwd)
echo "coin: $COIN; python: $PY; work: $work"
"$PY" -c 'import torch, transformers, peft, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'

fail() { echo "check FAILED: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

# One repository with the tiny model, CoIN-mini and a config: setup DIR EVALUATOR(0|1).
setup() {
  local dir=$1 with_eval=$2
  mkdir -p "$dir"
  (cd "$dir" && "$COIN" -q init >/dev/null &&
    "$COIN" -q model init --tiny model >/dev/null &&
    "$COIN" -q bench-data coin-mini --out mini --train 24 --test 16 >/dev/null &&
    "$COIN" -q task add --coin-mini mini >/dev/null)
  # The command also copies what the trainer saved aside (saved/<step>) for the weight check,
  # and counts its starts (trainer-starts) for the re-run check.
  cat >>"$dir/.coin/config.toml" <<EOF

[model]
base = "model"
preset = "tiny"

[eval]
max_new_tokens = 8

[trainer]
command = "echo {step} >> '$dir/trainer-starts' && '$PY' '$here/peft_trainer.py' --base {model_base} --data {data} --images {image_root} --parent {parent_dir} --output {output_dir} --seed {seed} --steps 4 --lr 5e-3 --train-projector && mkdir -p '$dir/saved' && rm -rf '$dir/saved/'{step} && cp -r {output_dir} '$dir/saved/'{step}"
parent_format = "peft"
EOF
  if [ "$with_eval" = 1 ]; then
    cat >>"$dir/.coin/config.toml" <<EOF

[evaluator]
command = "'$PY' '$here/peft_eval.py' --base {model_base} --adapter {checkpoint_dir} --questions {test} --images {image_root} --max-new-tokens 8 --model-id {task}-{stage} --out {results_dir}/{task}/{stage}/merge.jsonl"
answers = "{results_dir}/{task}/{stage}/merge.jsonl"
checkpoint_format = "peft"
EOF
  fi
}

# Checks on a finished run: verify DIR EVALUATOR(0|1).
verify() {
  local dir=$1 with_eval=$2 ids step id starts
  cd "$dir"
  "$COIN" matrix --json >matrix.json || fail "coin matrix --json"
  ids=$("$PY" "$here/check_records.py" matrix matrix.json) || fail "matrix of $dir"
  ok "matrix: 2 rows, diagonal $("$PY" -c 'import json; m=json.load(open("matrix.json"))["matrix"]; print(m[0][0], m[1][1])')"
  set -- $ids
  step=1
  for id in "$@"; do
    "$COIN" show "$id" --json >"show-$step.json" || fail "coin show $id --json"
    "$COIN" show "$id" --log >"log-$step.txt" || fail "coin show $id --log"
    "$PY" "$here/check_records.py" train "$step" "show-$step.json" "log-$step.txt" ||
      fail "train record of step $step in $dir"
    ok "step $step ${id:0:12}: train.external names the command, exit code 0; log: $(grep -m1 'parent adapter:' "log-$step.txt"); $(grep 'step 4/4' "log-$step.txt")"
    step=$((step + 1))
  done
  if [ "$with_eval" = 1 ]; then
    "$PY" "$here/check_records.py" evaluator show-1.json mini-ScienceQA &&
      "$PY" "$here/check_records.py" evaluator show-2.json mini-ScienceQA mini-ImageNet ||
      fail "evaluator records in $dir"
    ok "the eval records of both steps were made by peft_eval.py"
  fi

  # A second run trains nothing.
  starts=$(wc -l <trainer-starts)
  "$COIN" run --order "$order" >rerun.log 2>&1 || { cat rerun.log; fail "second coin run"; }
  [ "$(wc -l <trainer-starts)" = "$starts" ] || fail "the second coin run started the trainer again"
  "$COIN" matrix --json >matrix2.json
  cmp -s matrix.json matrix2.json || fail "the second coin run changed the matrix"
  ok "second coin run: the trainer was not started ($starts starts in all), same matrix"

  # coin's PEFT export loads in PEFT with the weights the trainer saved.
  step=1
  for id in "$@"; do
    rm -rf "export-$step"
    "$COIN" -q checkout "$id" --output "export-$step" --format peft >/dev/null
    "$PY" "$here/compare_adapters.py" model "saved/$step" "export-$step" ||
      fail "export of step $step differs from what the trainer saved"
    step=$((step + 1))
  done
}

echo "== A: [trainer] = peft_trainer.py, coin's engine evaluates"
setup "$work/a" 0
(cd "$work/a" && "$COIN" run --order "$order") || fail "coin run (A)"
(verify "$work/a" 0)
echo "== B: [trainer] = peft_trainer.py, [evaluator] = peft_eval.py"
setup "$work/b" 1
(cd "$work/b" && "$COIN" run --order "$order") || fail "coin run (B)"
(verify "$work/b" 1)
echo "== A vs B: the same adapters (same seed), answers of coin's engine vs peft_eval.py (information)"
for step in 1 2; do
  "$PY" "$here/check_records.py" answers "$work/a" "$work/b" "show-$step.json" | sed "s/^/step $step: /"
done
echo "check OK ($work)"
