#!/usr/bin/env bash
# Knowledge distillation of a pruned student from its teacher, co-located on every rank.
#
#   NGPU=8 TP=4 PP=1 STUDENT=ckpt/llama4b_width TEACHER=ckpt/llama8b OUTPUT=runs/distill_4b \
#     DATA_PREFIX=data/train_text_document bash launch/distill.sh --seq-length 4096 \
#     --train-tokens 100000000000 --global-batch-size 1152 --micro-batch-size 1
# runs
#   torchrun --standalone --nnodes 1 --nproc-per-node 8 -m megatron_minitron distill \
#     --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 \
#     --student ckpt/llama4b_width --teacher ckpt/llama8b --output runs/distill_4b \
#     --data-prefix data/train_text_document --seq-length 4096 --train-tokens 100000000000 \
#     --global-batch-size 1152 --micro-batch-size 1
#
# Environment: STUDENT (--student), TEACHER (--teacher), OUTPUT (--output, the run
# directory), DATA_PREFIX (--data-prefix; a blend "W1 PREFIX1 W2 PREFIX2" is split at blanks),
# TEXT_FILE (--text-file), CONFIG (--config, a YAML file of distill settings).
# Launcher variables (NNODES, NPROC_PER_NODE/NGPU, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, TP, PP,
# TORCHRUN_ARGS, DRY_RUN=1 to print the command only): see launch/common.sh. Arguments after the
# script name go to `minitron distill` unchanged.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

minitron_flag --student STUDENT
minitron_flag --teacher TEACHER
minitron_flag --output OUTPUT
minitron_flag_words --data-prefix DATA_PREFIX
minitron_flag_words --text-file TEXT_FILE
minitron_flag --config CONFIG
minitron_launch distill "$@"
