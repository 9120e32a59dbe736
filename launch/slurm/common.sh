# shellcheck shell=bash
# Shared by launch/slurm/*.sbatch: one srun task per node runs launch/<stage>.sh, which starts
# torchrun there; the first node of the allocation is the rendezvous host.
#
#   . launch/slurm/common.sh
#   minitron_srun distill "$@"
#
# Environment (default in brackets):
#   SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES, SLURM_JOB_ID   set by SLURM; pass them for a dry run
#   REPO [the repository holding this file]   repository root as the compute nodes see it
#   LAUNCH_DIR [REPO/launch]   the stage wrappers, as seen inside the container when one is used
#   NGPU, NPROC_PER_NODE [SLURM_GPUS_ON_NODE, else 8]   processes (GPUs) per node
#   MASTER_PORT [29500]        rendezvous port on the head node
#   CONTAINER_IMAGE            pyxis/enroot image, e.g. nvcr.io#nvidia/pytorch:25.09-py3, a
#                              .sqsh file or our Dockerfile's image; unset: no container
#   CONTAINER_MOUNTS [REPO:REPO]  --container-mounts, SRC:DST[,SRC:DST...] (add data and
#                              checkpoint folders)
#   CONTAINER_WORKDIR [REPO]   --container-workdir
#   SRUN_ARGS                  extra srun flags, e.g. "--cpu-bind=none"
#   DRY_RUN [0]                1: print the nodes, the srun command and the command node 0 runs
# Stage variables (TP, PP, LOAD, OUTPUT, TEACHER, DATA_PREFIX, ...) are handed to the wrapper on
# the srun command line, so the printed command is complete.

MINITRON_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Variables the stage wrappers read (launch/common.sh and launch/<stage>.sh).
MINITRON_FORWARD=(NNODES NPROC_PER_NODE MASTER_ADDR MASTER_PORT RDZV_BACKEND RDZV_ID TP PP TORCHRUN
  TORCHRUN_ARGS LOAD OUTPUT SCORES TARGET TARGET_TP TARGET_PP STUDENT TEACHER DATA_PREFIX
  TEXT_FILE CONFIG PARAMS SPACE JSON RECIPE)

minitron_slurm_die() {
  echo "slurm: error: $*" >&2
  exit 2
}

# minitron_hostnames NODELIST: one host per line. Uses `scontrol show hostnames` when SLURM's
# tools are installed; otherwise expands the common forms (a,b  node[01-04,07]  gpu-[1-2]-ib).
minitron_hostnames() {
  local list=$1
  if command -v scontrol > /dev/null 2>&1; then
    scontrol show hostnames "$list"
    return
  fi
  local items=() item="" depth=0 char index
  for ((index = 0; index < ${#list}; index++)); do
    char=${list:index:1}
    case $char in
      '[') depth=$((depth + 1)) ;;
      ']') depth=$((depth - 1)) ;;
    esac
    if [ "$char" = , ] && [ "$depth" -eq 0 ]; then
      items+=("$item")
      item=""
    else
      item+=$char
    fi
  done
  items+=("$item")
  local prefix body suffix ranges range low high number
  for item in "${items[@]}"; do
    if [[ $item =~ ^([^][]*)\[([^][]*)\]([^][]*)$ ]]; then
      prefix=${BASH_REMATCH[1]} body=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
      IFS=, read -r -a ranges <<< "$body"
      for range in "${ranges[@]}"; do
        low=${range%-*} high=${range#*-}
        for ((number = 10#$low; number <= 10#$high; number++)); do
          printf '%s%0*d%s\n' "$prefix" "${#low}" "$number" "$suffix"
        done
      done
    elif [ -n "$item" ]; then
      echo "$item"
    fi
  done
}

# minitron_srun STAGE [ARGS...]: srun one task per node running launch/<stage>.sh ARGS.
minitron_srun() {
  local stage=$1
  shift
  local repo_here
  repo_here=$(cd "$MINITRON_SLURM_DIR/../.." && pwd)
  REPO=${REPO:-$repo_here}
  LAUNCH_DIR=${LAUNCH_DIR:-$REPO/launch}
  [ -n "${SLURM_JOB_NODELIST:-}" ] || minitron_slurm_die \
    "SLURM_JOB_NODELIST is not set: submit with sbatch, or pass it for a dry run"
  local nodes=()
  mapfile -t nodes < <(minitron_hostnames "$SLURM_JOB_NODELIST")
  [ "${#nodes[@]}" -gt 0 ] \
    || minitron_slurm_die "no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  NNODES=${SLURM_JOB_NUM_NODES:-${#nodes[@]}}
  [ "$NNODES" -eq "${#nodes[@]}" ] || minitron_slurm_die \
    "SLURM_JOB_NUM_NODES=$NNODES but SLURM_JOB_NODELIST holds ${#nodes[@]} hosts"
  NPROC_PER_NODE=${NPROC_PER_NODE:-${NGPU:-${SLURM_GPUS_ON_NODE:-8}}}
  MASTER_PORT=${MASTER_PORT:-29500}
  RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-minitron}}
  if [ "$NNODES" -gt 1 ]; then
    MASTER_ADDR=${nodes[0]}
  else
    unset MASTER_ADDR
  fi

  local srun=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1) extra=()
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    srun+=(--container-image="$CONTAINER_IMAGE"
      --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO}"
      --container-workdir="${CONTAINER_WORKDIR:-$REPO}")
  fi
  read -r -a extra <<< "${SRUN_ARGS:-}"
  srun+=("${extra[@]}")
  local assignments=() name
  for name in "${MINITRON_FORWARD[@]}"; do
    if [ -n "${!name:-}" ]; then
      assignments+=("$name=${!name}")
    fi
  done
  local script=${stage//-/_}.sh
  [ -f "$repo_here/launch/$script" ] || minitron_slurm_die "no launch/$script for stage $stage"
  local command=("${srun[@]}" env "${assignments[@]}" bash "$LAUNCH_DIR/$script" "$@")

  # shellcheck source=launch/common.sh
  . "$repo_here/launch/common.sh"
  echo "# nodes ($NNODES): ${nodes[*]}; rendezvous ${MASTER_ADDR:-standalone}:$MASTER_PORT"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    minitron_print_command "${command[@]}"
    echo "# node 0 runs:"
    env "${assignments[@]}" SLURM_NODEID=0 DRY_RUN=1 bash "$repo_here/launch/$script" "$@"
    return 0
  fi
  minitron_print_command "${command[@]}"
  "${command[@]}"
}
