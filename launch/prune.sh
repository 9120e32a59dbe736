#!/usr/bin/env bash
# Streamed pruning of a checkpoint to a target architecture. One process does the work; more
# processes (NGPU > 1) only help iterative pruning (--iterations T), which re-scores at TP x PP.
#
#   LOAD=ckpt/llama8b SCORES=ckpt/llama8b_scores.pt TARGET=hidden_size=3072,ffn_hidden_size=9216 \
#     OUTPUT=ckpt/llama4b_width TARGET_TP=8 bash launch/prune.sh
# runs
#   torchrun --standalone --nnodes 1 --nproc-per-node 1 -m megatron_minitron prune \
#     --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --load ckpt/llama8b \
#     --scores ckpt/llama8b_scores.pt --target hidden_size=3072,ffn_hidden_size=9216 \
#     --target-tp 8 --output ckpt/llama4b_width
#
# Environment: LOAD (--load), SCORES (--scores), TARGET (--target KEY=VALUE,...),
# OUTPUT (--output), TARGET_TP/TARGET_PP (--target-tp/--target-pp, the layout the output must fit),
# DATA_PREFIX or TEXT_FILE (data for --iterations > 1). NPROC_PER_NODE defaults to 1 here.
# Launcher variables (NNODES, NPROC_PER_NODE/NGPU, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, TP, PP,
# TORCHRUN_ARGS, DRY_RUN=1 to print the command only): see launch/common.sh. Arguments after the
# script name go to `minitron prune` unchanged.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC_PER_NODE=${NPROC_PER_NODE:-${NGPU:-1}}
minitron_flag --load LOAD
minitron_flag --scores SCORES
minitron_flag --target TARGET
minitron_flag --target-tp TARGET_TP
minitron_flag --target-pp TARGET_PP
minitron_flag --output OUTPUT
minitron_flag --data-prefix DATA_PREFIX
minitron_flag_words --text-file TEXT_FILE
minitron_launch prune "$@"
