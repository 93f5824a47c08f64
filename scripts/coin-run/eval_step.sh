#!/bin/sh
# One cell of CoIN's evaluation, as coin's [evaluator] command: CoIN's own eval script of the
# task (scripts/LLaVA/Eval/<i>_eval_<t>.sh at CoIN commit 4122465) with coin's STAGE name and
# checkpoint folder. coin then scores the merge.jsonl it leaves with its compat scorer. In
# .coin/config.toml:
#
#   [evaluator]
#   command = "sh /path/to/coin/scripts/coin-run/eval_step.sh"
#   workdir = "/path/to/CoIN"
#   checkpoint_format = "stored"
#   answers = "./results/CoIN/LLaVA/{coin_task}/{stage}/merge.jsonl"
#
# CoIN's eval scripts split the questions over the GPUs listed in CUDA_VISIBLE_DEVICES and
# write to the hard-coded ./results/CoIN/LLaVA/<Task>/<STAGE>/. EVAL_DIR replaces
# scripts/LLaVA/Eval (relative to CoIN's root).
set -eu

: "${COIN_COIN_TASK:?run this as coin's [evaluator] command: COIN_COIN_TASK is not set}"
EVAL_DIR=${EVAL_DIR:-scripts/LLaVA/Eval}
case "$COIN_COIN_TASK" in
    ScienceQA) script=1_eval_sqa.sh ;;
    TextVQA) script=2_eval_textqa.sh ;;
    ImageNet) script=3_eval_ImageNet.sh ;;
    GQA) script=4_eval_gqa.sh ;;
    VizWiz) script=5_eval_vizwiz.sh ;;
    Grounding) script=6_eval_grounding.sh ;;
    VQAv2) script=7_eval_vqav2.sh ;;
    OCRVQA) script=8_eval_ocrvqa.sh ;;
    *)
        echo "eval_step.sh: '$COIN_COIN_TASK' is not one of CoIN's eight tasks" >&2
        exit 2
        ;;
esac
echo "coin eval: $COIN_COIN_TASK at stage $COIN_STAGE of $COIN_CHECKPOINT_DIR"
exec bash "$EVAL_DIR/$script" "$COIN_STAGE" "$COIN_CHECKPOINT_DIR"
