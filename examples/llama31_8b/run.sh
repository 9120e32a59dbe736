#!/usr/bin/env bash
# Llama-3.1-8B -> Llama-3.1-Minitron 4B, width and depth, on one 8-GPU node (DGX A100 80GB).
#   HF_MODEL=/models/Llama-3.1-8B TRAIN_TEXT=/data/train.jsonl HELDOUT_TEXT=/data/heldout.jsonl \
#     bash examples/llama31_8b/run.sh
#   DRY_RUN=1 bash examples/llama31_8b/run.sh        # print every command instead
#   MEGATRON_LOAD=/ckpt/llama31_8b TOKENIZER=/models/Llama-3.1-8B bash examples/llama31_8b/run.sh
#     # start from a Megatron-LM torch_dist checkpoint instead of the HF folder
# The same pipeline as one recipe: NGPU=8 RECIPE=examples/llama31_8b/recipe.yaml bash launch/run.sh
#
# Stages: import -> tokenize -> teacher correction -> importance -> prune to width 4B (hidden
# 3072, MLP 9216, 32 heads, 8 groups) and depth 4B (16 layers) -> distill each from the corrected
# teacher (written as Megatron-LM checkpoints: pretrain_gpt.py --load .../final --finetune) ->
# evaluate. Layouts come from docs/SCALING.md: correction TP=2, importance and
# distillation TP=1 x DP=8. At the stated assumptions the 100B-token distillations take weeks on
# one node; run them with launch/slurm/distill.sbatch on more nodes (same flags).
# Environment: HF_MODEL, MEGATRON_LOAD (a Megatron-LM save directory, used instead of HF_MODEL),
# TOKENIZER (HF tokenizer folder; needed with MEGATRON_LOAD unless its args name one), TRAIN_TEXT, HELDOUT_TEXT (text or JSON lines), WORK [runs/llama31_8b],
# SEQ [4096], CORRECTION_TOKENS [10000000000; 0 skips the correction], DISTILL_TOKENS
# [100000000000], GBS [1024], NGPU [8], DRY_RUN.
set -euo pipefail

HF_MODEL=${HF_MODEL:-/models/Llama-3.1-8B}
TRAIN_TEXT=${TRAIN_TEXT:-/data/train.jsonl}
HELDOUT_TEXT=${HELDOUT_TEXT:-/data/heldout.jsonl}
WORK=${WORK:-runs/llama31_8b}
SEQ=${SEQ:-4096}
CORRECTION_TOKENS=${CORRECTION_TOKENS:-10000000000}
DISTILL_TOKENS=${DISTILL_TOKENS:-100000000000}
GBS=${GBS:-1024}
TASKS=hellaswag,piqa,arc_easy,arc_challenge,winogrande,lambada
export NGPU=${NGPU:-8}
MEGATRON_LOAD=${MEGATRON_LOAD:-}
TOK=()
[ -n "${TOKENIZER:-}" ] && TOK=(--tokenizer "$TOKENIZER")
LAUNCH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../launch" && pwd)

# shellcheck source=launch/common.sh
. "$LAUNCH/common.sh"
step() {  # single-process commands; the launch/ wrappers print or run themselves
  if [ "${DRY_RUN:-0}" = 1 ]; then
    minitron_print_command "$@"
  else
    "$@"
  fi
}

TEACHER=${MEGATRON_LOAD:-$WORK/teacher}
if [ -z "$MEGATRON_LOAD" ] && [ ! -f "$WORK/teacher/minitron_config.json" ]; then
  step minitron import-hf --hf-path "$HF_MODEL" --output "$WORK/teacher"
fi
for split in train heldout; do
  text=$TRAIN_TEXT
  [ "$split" = heldout ] && text=$HELDOUT_TEXT
  if [ ! -f "$WORK/data/$split.idx" ]; then
    step minitron preprocess-data --input "$text" --tokenizer "${TOKENIZER:-$TEACHER}" \
      --output-prefix "$WORK/data/$split" --workers 16
  fi
done

if [ "$CORRECTION_TOKENS" != 0 ]; then
  TP=2 LOAD="$TEACHER" OUTPUT="$WORK/teacher_correction" DATA_PREFIX="$WORK/data/train" \
    bash "$LAUNCH/correct_teacher.sh" --seq-length "$SEQ" --train-tokens "$CORRECTION_TOKENS" \
    --global-batch-size "$GBS" --micro-batch-size 1 --lr 1e-5 --min-lr 1e-6 \
    --lr-warmup-steps 100 --save-interval 500 --resume auto "${TOK[@]}"
  TEACHER=$WORK/teacher_correction/final
fi

TP=1 LOAD="$TEACHER" OUTPUT="$WORK/scores.pt" DATA_PREFIX="$WORK/data/train" \
  bash "$LAUNCH/importance.sh" --seq-length "$SEQ" --num-samples 1024 --micro-batch-size 1 \
  --depth-samples 128 "${TOK[@]}"
NGPU=1 LOAD="$TEACHER" SCORES="$WORK/scores.pt" OUTPUT="$WORK/width" TARGET_TP=8 \
  TARGET=hidden_size=3072,ffn_hidden_size=9216,num_attention_heads=32,num_query_groups=8 \
  bash "$LAUNCH/prune.sh" "${TOK[@]}"
NGPU=1 LOAD="$TEACHER" SCORES="$WORK/scores.pt" OUTPUT="$WORK/depth" TARGET_TP=8 \
  TARGET=num_layers=16 \
  bash "$LAUNCH/prune.sh" --depth-metric block_bi "${TOK[@]}"

for variant in width depth; do
  TP=1 STUDENT="$WORK/$variant" TEACHER="$TEACHER" OUTPUT="$WORK/distill_$variant" \
    DATA_PREFIX="$WORK/data/train" bash "$LAUNCH/distill.sh" --seq-length "$SEQ" \
    --train-tokens "$DISTILL_TOKENS" --global-batch-size "$GBS" --micro-batch-size 1 \
    --lr 1e-4 --min-lr 1e-5 --lr-warmup-steps 100 --loss kl --save-interval 500 --resume auto \
    --output-format megatron "${TOK[@]}"
done

for model in "$TEACHER" "$WORK/distill_width/final" "$WORK/distill_depth/final"; do
  name=$(basename "$(dirname "$model")")
  [ "$model" = "$TEACHER" ] && name=teacher
  TP=1 LOAD="$model" JSON="$WORK/eval_$name.json" DATA_PREFIX="$WORK/data/heldout" \
    bash "$LAUNCH/eval.sh" --seq-length "$SEQ" --tasks "$TASKS" "${TOK[@]}"
done
