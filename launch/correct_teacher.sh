#!/usr/bin/env bash
# Teacher correction: fine-tune the teacher on the distillation data before distilling from it.
#
#   NGPU=8 TP=4 LOAD=ckpt/llama8b OUTPUT=runs/llama8b_corrected \
#     DATA_PREFIX=data/train_text_document bash launch/correct_teacher.sh --seq-length 4096 \
#     --train-tokens 100000000000 --global-batch-size 1152
# runs
#   torchrun --standalone --nnodes 1 --nproc-per-node 8 -m megatron_minitron correct-teacher \
#     --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --load ckpt/llama8b \
#     --output runs/llama8b_corrected --data-prefix data/train_text_document --seq-length 4096 \
#     --train-tokens 100000000000 --global-batch-size 1152
#
# Environment: LOAD (--load, the teacher), OUTPUT (--output, the run directory),
# DATA_PREFIX (--data-prefix; blend split at blanks), TEXT_FILE (--text-file), CONFIG (--config).
# Launcher variables (NNODES, NPROC_PER_NODE/NGPU, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, TP, PP,
# TORCHRUN_ARGS, DRY_RUN=1 to print the command only): see launch/common.sh. Arguments after the
# script name go to `minitron correct-teacher` unchanged.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

minitron_flag --load LOAD
minitron_flag --output OUTPUT
minitron_flag_words --data-prefix DATA_PREFIX
minitron_flag_words --text-file TEXT_FILE
minitron_flag --config CONFIG
minitron_launch correct-teacher "$@"
