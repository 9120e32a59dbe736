#!/usr/bin/env bash
# Importance of every head, query group, neuron, channel and layer of a checkpoint.
#
#   NGPU=8 TP=1 LOAD=ckpt/llama8b OUTPUT=ckpt/llama8b_scores.pt \
#     DATA_PREFIX=data/calib_text_document bash launch/importance.sh --seq-length 4096 \
#     --num-samples 1024 --depth-samples 128
# runs
#   torchrun --standalone --nnodes 1 --nproc-per-node 8 -m megatron_minitron importance \
#     --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --load ckpt/llama8b \
#     --output ckpt/llama8b_scores.pt --data-prefix data/calib_text_document --seq-length 4096 \
#     --num-samples 1024 --depth-samples 128
#
# Environment: LOAD (--load), OUTPUT (--output, the SCORES file),
# DATA_PREFIX (--data-prefix) or TEXT_FILE (--text-file, blank-separated files).
# Launcher variables (NNODES, NPROC_PER_NODE/NGPU, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, TP, PP,
# TORCHRUN_ARGS, DRY_RUN=1 to print the command only): see launch/common.sh. Arguments after the
# script name go to `minitron importance` unchanged.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

minitron_flag --load LOAD
minitron_flag --output OUTPUT
minitron_flag --data-prefix DATA_PREFIX
minitron_flag_words --text-file TEXT_FILE
minitron_launch importance "$@"
