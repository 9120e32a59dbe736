#!/usr/bin/env bash
# The whole recipe (teacher correction, importance, search or prune, distill, eval) from one YAML
# file; each stage runs on all the processes launched here and takes its layout from the recipe.
#
#   NNODES=2 NGPU=8 MASTER_ADDR=node001 RECIPE=examples/llama31_8b/recipe.yaml bash \
#     launch/run.sh
# runs
#   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node001:29500 \
#     --rdzv-id minitron -m megatron_minitron run examples/llama31_8b/recipe.yaml
#
# Environment: RECIPE (the recipe YAML, first argument of `minitron run`). No layout
# flags are added: TP and PP only enter the world-size check.
# Launcher variables (NNODES, NPROC_PER_NODE/NGPU, MASTER_ADDR, MASTER_PORT, RDZV_BACKEND, TP, PP,
# TORCHRUN_ARGS, DRY_RUN=1 to print the command only): see launch/common.sh. Arguments after the
# script name go to `minitron run` unchanged.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MINITRON_LAYOUT_FLAGS=0
if [ -n "${RECIPE:-}" ]; then
  MINITRON_ARGS+=("$RECIPE")
fi
minitron_launch run "$@"
