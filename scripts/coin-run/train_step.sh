#!/bin/sh
# One stage of CoIN's LLaVA-1.5 training, as coin's [trainer] command.
#
# It runs CoIN's own trainer (ETrain/Train/LLaVA/train_mem.py under DeepSpeed) with the flags of
# CoIN's scripts/LLaVA/Train/<i>_<Task>.sh (and Train_MOE/ for MoELoRA) at CoIN commit 4122465,
# except what coin decides: the training file, the parent stage, the output folder, the method
# and the hyperparameters coin's configuration resolves (so `coin run` orders, reuse and records
# work for CoIN's own runs). In .coin/config.toml:
#
#   [trainer]
#   command = "sh /path/to/coin/scripts/coin-run/train_step.sh"
#   workdir = "/path/to/CoIN"          # CoIN's repository root, the cwd of its scripts
#   parent_format = "stored"           # the previous stage as CoIN wrote it
#   env = ["CUDA_VISIBLE_DEVICES", "GPUS"]
#
# coin passes every placeholder as COIN_<NAME> (docs/external.md). These variables, when set,
# replace CoIN's paths and launcher (relative to CoIN's root):
#   DEEPSPEED      the launcher                      (default: deepspeed)
#   GPUS           --include value                   (default: localhost:0,1,2,3,4,5,6,7)
#   MASTER_PORT    --master_port                     (default: 29600)
#   MODEL          --model_name_or_path              (default: ./checkpoints/LLaVA/Vicuna/vicuna-7b-v1.5)
#   VISION_TOWER   --vision_tower                    (default: ./checkpoints/LLaVA/clip-vit-large-patch14-336)
#   PROJECTOR      stage 1's --pretrain_mm_mlp_adapter
#                  (default: ./checkpoints/LLaVA/Vicuna/vicuna-7b-v.15-projector/mm_projector.bin)
#   ZERO_CONFIG    --deepspeed                       (default: ./scripts/zero3_offload.json)
set -eu

: "${COIN_DATA:?run this as coin's [trainer] command: COIN_DATA is not set}"
: "${COIN_OUTPUT_DIR:?COIN_OUTPUT_DIR is not set}"
DEEPSPEED=${DEEPSPEED:-deepspeed}
GPUS=${GPUS:-localhost:0,1,2,3,4,5,6,7}
MASTER_PORT=${MASTER_PORT:-29600}
MODEL=${MODEL:-./checkpoints/LLaVA/Vicuna/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-./checkpoints/LLaVA/clip-vit-large-patch14-336}
PROJECTOR=${PROJECTOR:-./checkpoints/LLaVA/Vicuna/vicuna-7b-v.15-projector/mm_projector.bin}
ZERO_CONFIG=${ZERO_CONFIG:-./scripts/zero3_offload.json}

# Stage 1 starts from the pre-trained projector; later stages from the previous stage's folder
# (CoIN's loader wants "llava" and "lora" in its name; coin names it <Task>_llava_lora).
if [ -n "${COIN_PARENT_DIR:-}" ]; then
    set -- --previous_task_model_path "$COIN_PARENT_DIR"
else
    set -- --pretrain_mm_mlp_adapter "$PROJECTOR"
fi
if [ "${COIN_METHOD:-lora}" = moelora ]; then
    set -- "$@" --expert_num "$COIN_EXPERT_NUM"
fi

echo "coin stage ${COIN_STEP:-?}: ${COIN_COIN_TASK:-?} (${COIN_METHOD:-lora}) -> $COIN_OUTPUT_DIR"
exec "$DEEPSPEED" --include "$GPUS" --master_port "$MASTER_PORT" ETrain/Train/LLaVA/train_mem.py \
    --deepspeed "$ZERO_CONFIG" \
    --lora_enable True --lora_r "$COIN_LORA_R" --lora_alpha "$COIN_LORA_ALPHA" --mm_projector_lr 2e-5 \
    "$@" \
    --model_name_or_path "$MODEL" \
    --version v1 \
    --data_path "$COIN_DATA" \
    --image_folder "$COIN_IMAGE_ROOT" \
    --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$COIN_OUTPUT_DIR" \
    --num_train_epochs "$COIN_EPOCHS" \
    --per_device_train_batch_size "$COIN_BATCH_SIZE" \
    --per_device_eval_batch_size 16 \
    --gradient_accumulation_steps 8 \
    --evaluation_strategy no \
    --save_strategy epoch \
    --learning_rate "$COIN_LEARNING_RATE" \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to none
