# shellcheck shell=bash
# Shared by launch/<stage>.sh: turns environment variables into one torchrun command.
#
#   . launch/common.sh
#   minitron_flag --load LOAD                # adds "--load $LOAD" when LOAD is set
#   minitron_launch importance "$@"          # torchrun ... -m megatron_minitron importance ...
#
# Environment (default in brackets):
#   NNODES [1]             nodes taking part; > 1 needs MASTER_ADDR
#   NPROC_PER_NODE, NGPU   processes per node [CUDA_VISIBLE_DEVICES count, else `nvidia-smi -L`
#                          count, else 1]; NPROC_PER_NODE wins over NGPU
#   MASTER_ADDR            head node (multi-node: the rendezvous host)
#   MASTER_PORT [29500]    rendezvous port on the head node
#   RDZV_BACKEND [c10d]    c10d: torchrun --rdzv-endpoint MASTER_ADDR:MASTER_PORT (ranks assigned
#                          by the rendezvous); static: --node-rank NODE_RANK --master-addr/--port
#   NODE_RANK [SLURM_NODEID, else 0]  this node's rank (static rendezvous only)
#   RDZV_ID [SLURM_JOB_ID, else minitron]  job id shared by all nodes of one job
#   TP [1], PP [1]         --tensor-model-parallel-size / --pipeline-model-parallel-size;
#                          data parallel size is NNODES * NPROC_PER_NODE / (TP * PP)
#   TORCHRUN [torchrun]    launcher, e.g. "python -m torch.distributed.run"
#   TORCHRUN_ARGS          extra launcher flags, e.g. "--max-restarts 0 --log-dir logs"
#   DRY_RUN [0]            1: print the command instead of running it
#
# One node runs `torchrun --standalone`; several nodes use a c10d rendezvous on MASTER_ADDR.

MINITRON_ARGS=()

minitron_die() {
  echo "launch: error: $*" >&2
  exit 2
}

# Prints a command with shell quoting, so it can be pasted back into a shell.
minitron_print_command() {
  local quoted=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      quoted+=("$word")
    else
      quoted+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${quoted[*]}"
}

# minitron_flag FLAG VAR: appends "FLAG ${VAR}" to MINITRON_ARGS when VAR is set and non-empty.
minitron_flag() {
  local flag=$1 name=$2
  if [ -n "${!name:-}" ]; then
    MINITRON_ARGS+=("$flag" "${!name}")
  fi
}

# minitron_flag_words FLAG VAR: as minitron_flag, one argument per blank-separated word of VAR
# (a data blend "0.3 /data/a 0.7 /data/b", several text files).
minitron_flag_words() {
  local flag=$1 name=$2 words=()
  if [ -n "${!name:-}" ]; then
    read -r -a words <<< "${!name}"
    MINITRON_ARGS+=("$flag" "${words[@]}")
  fi
}

minitron_gpus_per_node() {
  local count
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    local devices=()
    IFS=, read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#devices[@]}"
  elif command -v nvidia-smi > /dev/null 2>&1 \
      && count=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU') && [ "$count" -gt 0 ]; then
    echo "$count"
  else
    echo 1
  fi
}

minitron_require_int() {
  local name=$1 value=$2
  case $value in
    '' | *[!0-9]* | 0) minitron_die "$name=$value must be a positive integer" ;;
  esac
}

# minitron_torchrun_command: fills MINITRON_LAUNCHER with the torchrun part of the command.
minitron_torchrun_command() {
  NNODES=${NNODES:-1}
  NPROC_PER_NODE=${NPROC_PER_NODE:-${NGPU:-$(minitron_gpus_per_node)}}
  MASTER_PORT=${MASTER_PORT:-29500}
  RDZV_BACKEND=${RDZV_BACKEND:-c10d}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-minitron}}
  TP=${TP:-1}
  PP=${PP:-1}
  local name
  for name in NNODES NPROC_PER_NODE MASTER_PORT TP PP; do
    minitron_require_int "$name" "${!name}"
  done
  local world=$((NNODES * NPROC_PER_NODE))
  if [ $((world % (TP * PP))) -ne 0 ]; then
    minitron_die "TP=$TP x PP=$PP does not divide the world size $world" \
      "(NNODES=$NNODES x NPROC_PER_NODE=$NPROC_PER_NODE)"
  fi

  local torchrun=() extra=()
  read -r -a torchrun <<< "${TORCHRUN:-torchrun}"
  read -r -a extra <<< "${TORCHRUN_ARGS:-}"
  MINITRON_LAUNCHER=("${torchrun[@]}")
  if [ "$NNODES" -eq 1 ]; then
    MINITRON_LAUNCHER+=(--standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE")
  else
    [ -n "${MASTER_ADDR:-}" ] || minitron_die "NNODES=$NNODES needs MASTER_ADDR (the head node)"
    MINITRON_LAUNCHER+=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
    case $RDZV_BACKEND in
      c10d)
        MINITRON_LAUNCHER+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
          --rdzv-id "$RDZV_ID") ;;
      static)
        case $NODE_RANK in
          '' | *[!0-9]*) minitron_die "NODE_RANK=$NODE_RANK must be 0 or a positive integer" ;;
        esac
        MINITRON_LAUNCHER+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
          --master-port "$MASTER_PORT") ;;
      *) minitron_die "RDZV_BACKEND=$RDZV_BACKEND; use c10d or static" ;;
    esac
  fi
  MINITRON_LAUNCHER+=("${extra[@]}")
}

# minitron_launch STAGE [ARGS...]: runs (or, with DRY_RUN=1, prints)
#   torchrun ... -m megatron_minitron STAGE <layout flags> <MINITRON_ARGS> ARGS...
# Set MINITRON_LAYOUT_FLAGS=0 before calling to leave out the layout flags.
minitron_launch() {
  local stage=$1
  shift
  minitron_torchrun_command
  local command=("${MINITRON_LAUNCHER[@]}" -m megatron_minitron "$stage")
  if [ "${MINITRON_LAYOUT_FLAGS:-1}" = 1 ]; then
    command+=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
  fi
  command+=("${MINITRON_ARGS[@]}" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    minitron_print_command "${command[@]}"
    return 0
  fi
  echo "launch: $(minitron_print_command "${command[@]}")" >&2
  exec "${command[@]}"
}
