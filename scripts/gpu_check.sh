#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine without network (see megatron_minitron/gpu_check.py):
#   bash scripts/gpu_check.sh [PACK_DIR] [gpu_check flags...]        # default PACK_DIR bench/gpu_pack
# The pack is built beforehand on any machine with the assets:
#   python -m megatron_minitron.gpu_check --pack bench/gpu_pack
# Its wheels (megatron-core, gguf, psutil) go into PACK_DIR/site, not into the system Python.
set -euo pipefail
cd "$(dirname "$0")/.."

PACK=${1:-${PACK:-bench/gpu_pack}}
shift $(( $# > 0 ? 1 : 0 ))
PYTHON=${PYTHON:-python3}

if [ ! -f "$PACK/common/manifest.json" ]; then
  echo "gpu_check.sh: $PACK/common/manifest.json not found; build the pack with" \
       "'python -m megatron_minitron.gpu_check --pack $PACK'" >&2
  exit 2
fi
if [ ! -d "$PACK/site/megatron" ]; then
  "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$PACK/site" "$PACK"/common/wheels/*.whl
fi
PYTHONPATH="$PWD:$PACK/site${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m megatron_minitron.gpu_check --pack-dir "$PACK" "$@"
