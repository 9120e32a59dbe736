#!/usr/bin/env bash
# Nemotron-4 15B -> Minitron 8B -> Minitron 4B on 16 DGX A100 nodes, as in the Minitron paper:
# one SLURM job per stage, each waiting for the one before (sbatch --dependency=afterok).
#   ACCOUNT=myacct PARTITION=batch CONTAINER_IMAGE=/lustre/images/minitron.sqsh \
#     bash examples/nemotron4_15b/run.sh
#   DRY_RUN=1 bash examples/nemotron4_15b/run.sh       # print the sbatch commands instead
# The same chain as one recipe: examples/nemotron4_15b/recipe.yaml (launch/slurm/recipe.sbatch).
#
# $TEACHER comes from `minitron import-hf --hf-path NEMOTRON_4_15B_HF_DIR --output $TEACHER`
# (squared-ReLU, LayerNorm1P and partial RoPE are supported; see examples/README.md).
# Targets: Minitron 8B = hidden 4096, MLP 16384, 48 heads, 8 groups, 32 layers (from the 15B);
# Minitron 4B = hidden 3072, MLP 9216, 24 heads, 8 groups, 32 layers (from the distilled 8B).
# Both are distilled from the corrected 15B teacher, 94B tokens each. Layouts and expected times
# (about 5 and 4 days at the stated assumptions): docs/SCALING.md.
# Environment: ACCOUNT, PARTITION, CONTAINER_IMAGE, CONTAINER_MOUNTS [/lustre:/lustre], ROOT
# [/lustre/minitron], TEACHER [$ROOT/nemotron4_15b], DATA [$ROOT/data/train], HELDOUT
# [$ROOT/data/heldout], NODES [16], SEGMENTS [1: jobs per training run, each resuming the last],
# CORRECTION_TOKENS [10000000000], DRY_RUN.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

ACCOUNT=${ACCOUNT:-ACCOUNT}
PARTITION=${PARTITION:-PARTITION}
export CONTAINER_IMAGE=${CONTAINER_IMAGE:-/lustre/images/minitron.sqsh}
export CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-/lustre:/lustre}
ROOT=${ROOT:-/lustre/minitron}
TEACHER=${TEACHER:-$ROOT/nemotron4_15b}
DATA=${DATA:-$ROOT/data/train}
HELDOUT=${HELDOUT:-$ROOT/data/heldout}
NODES=${NODES:-16}
SEGMENTS=${SEGMENTS:-1}
CORRECTION_TOKENS=${CORRECTION_TOKENS:-10000000000}
SEQ=4096
TRAIN=(--seq-length "$SEQ" --global-batch-size 1024 --micro-batch-size 1 --save-interval 500
  --resume auto)
KD=(--train-tokens 94000000000 --lr 1e-4 --min-lr 1e-5 --lr-warmup-steps 100 --loss kl)

# shellcheck source=launch/common.sh
. launch/common.sh
LAST_JOB=""
DRY_JOBS=0
# submit NODES SCRIPT [VAR=VALUE ...] -- [ARGS ...]: one sbatch job after LAST_JOB succeeded.
submit() {
  local nodes=$1 script=$2 assignments=()
  shift 2
  while [ "$1" != -- ]; do
    assignments+=("$1")
    shift
  done
  shift
  local command=(env "${assignments[@]}" sbatch --parsable --account="$ACCOUNT"
    --partition="$PARTITION" --nodes="$nodes")
  [ -z "$LAST_JOB" ] || command+=(--dependency="${DEPENDENCY:-afterok}:$LAST_JOB")
  command+=("launch/slurm/$script" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    minitron_print_command "${command[@]}"
    DRY_JOBS=$((DRY_JOBS + 1))
    LAST_JOB=JOB$DRY_JOBS
  else
    LAST_JOB=$(DRY_RUN=0 "${command[@]}")
    echo "submitted $script as job $LAST_JOB" >&2
  fi
}
# train NODES SCRIPT [VAR=VALUE ...] -- [ARGS ...]: SEGMENTS jobs, each resuming the previous one
# (after it ends for any reason, a time limit included; --resume auto continues the run).
train() {
  local segment
  for ((segment = 1; segment <= SEGMENTS; segment++)); do
    if [ "$segment" -eq 1 ]; then
      submit "$@"
    else
      DEPENDENCY=afterany submit "$@"
    fi
  done
}

CORRECTED=$ROOT/teacher_correction/final
train "$NODES" correct_teacher.sbatch TP=2 LOAD="$TEACHER" OUTPUT="$ROOT/teacher_correction" \
  DATA_PREFIX="$DATA" -- "${TRAIN[@]}" --train-tokens "$CORRECTION_TOKENS" --lr 1e-5 \
  --min-lr 1e-6 --lr-warmup-steps 100

# 15B -> 8B
submit 1 importance.sbatch TP=1 LOAD="$CORRECTED" OUTPUT="$ROOT/scores_15b.pt" \
  DATA_PREFIX="$DATA" -- --seq-length "$SEQ" --num-samples 1024 --micro-batch-size 1 \
  --depth-samples 128
submit 1 prune.sbatch NGPU=1 LOAD="$CORRECTED" SCORES="$ROOT/scores_15b.pt" \
  TARGET=hidden_size=4096,ffn_hidden_size=16384,num_attention_heads=48,num_query_groups=8 \
  TARGET_TP=8 OUTPUT="$ROOT/minitron_8b_pruned" --
train "$NODES" distill.sbatch TP=2 STUDENT="$ROOT/minitron_8b_pruned" TEACHER="$CORRECTED" \
  OUTPUT="$ROOT/minitron_8b" DATA_PREFIX="$DATA" -- "${TRAIN[@]}" "${KD[@]}"

# 8B -> 4B, pruned from the distilled 8B, distilled from the 15B teacher
submit 1 importance.sbatch TP=1 LOAD="$ROOT/minitron_8b/final" OUTPUT="$ROOT/scores_8b.pt" \
  DATA_PREFIX="$DATA" -- --seq-length "$SEQ" --num-samples 1024 --micro-batch-size 1 \
  --depth-samples 128
submit 1 prune.sbatch NGPU=1 LOAD="$ROOT/minitron_8b/final" SCORES="$ROOT/scores_8b.pt" \
  TARGET=hidden_size=3072,ffn_hidden_size=9216,num_attention_heads=24,num_query_groups=8 \
  TARGET_TP=8 OUTPUT="$ROOT/minitron_4b_pruned" --
train "$NODES" distill.sbatch TP=1 STUDENT="$ROOT/minitron_4b_pruned" TEACHER="$CORRECTED" \
  OUTPUT="$ROOT/minitron_4b" DATA_PREFIX="$DATA" -- "${TRAIN[@]}" "${KD[@]}"

for size in 8b 4b; do
  submit 1 eval.sbatch TP=1 LOAD="$ROOT/minitron_$size/final" JSON="$ROOT/eval_$size.json" \
    DATA_PREFIX="$HELDOUT" -- --seq-length "$SEQ" --tasks all
done
