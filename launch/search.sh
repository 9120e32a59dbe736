#!/usr/bin/env bash
# Architecture search inside a parameter budget: prune candidates, retrain each briefly, rank them.
#
#   NGPU=8 TP=4 LOAD=ckpt/llama8b SCORES=ckpt/llama8b_scores.pt PARAMS=4.5B \
#     SPACE=examples/llama31_8b/search_space.yaml OUTPUT=runs/search bash launch/search.sh \
#     --retrain-tokens 1000000000
# runs
#   torchrun --standalone --nnodes 1 --nproc-per-node 8 -m megatron_minitron search \
#     --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --load ckpt/llama8b \
#     --scores ckpt/llama8b_scores.pt --params 4.5B \
#     --space examples/llama31_8b/search_space.yaml --output runs/search \
#     --retrain-tokens 1000000000
#
# Environment: LOAD (--load), SCORES (--scores), PARAMS (--params, e.g. 4.5B),
# SPACE (--space, a search-space YAML), OUTPUT (--output), DATA_PREFIX (--data-prefix, blend split
# at blanks), TEXT_FILE (--text-file).
# Launcher variables (NNODES, NPROC_PER_NODE/NGPU, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, TP, PP,
# TORCHRUN_ARGS, DRY_RUN=1 to print the command only): see launch/common.sh. Arguments after the
# script name go to `minitron search` unchanged.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

minitron_flag --load LOAD
minitron_flag --scores SCORES
minitron_flag --params PARAMS
minitron_flag --space SPACE
minitron_flag --output OUTPUT
minitron_flag_words --data-prefix DATA_PREFIX
minitron_flag_words --text-file TEXT_FILE
minitron_launch search "$@"
