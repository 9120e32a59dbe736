#!/usr/bin/env bash
# LM loss and perplexity (and downstream tasks where asked) of a checkpoint.
#
#   NGPU=8 TP=2 LOAD=ckpt/llama4b_width JSON=runs/eval_4b.json TEXT_FILE=data/heldout.txt bash \
#     launch/eval.sh --seq-length 4096
# runs
#   torchrun --standalone --nnodes 1 --nproc-per-node 8 -m megatron_minitron eval \
#     --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --load ckpt/llama4b_width \
#     --json runs/eval_4b.json --text-file data/heldout.txt --seq-length 4096
#
# Environment: LOAD (--load), JSON (--json, results file), DATA_PREFIX (--data-prefix)
# or TEXT_FILE (--text-file, blank-separated files).
# Launcher variables (NNODES, NPROC_PER_NODE/NGPU, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, TP, PP,
# TORCHRUN_ARGS, DRY_RUN=1 to print the command only): see launch/common.sh. Arguments after the
# script name go to `minitron eval` unchanged.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

minitron_flag --load LOAD
minitron_flag --json JSON
minitron_flag --data-prefix DATA_PREFIX
minitron_flag_words --text-file TEXT_FILE
minitron_launch eval "$@"
