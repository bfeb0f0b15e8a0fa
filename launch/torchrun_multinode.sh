#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous. Run the same command on every node:
#
#   NNODES=2 RDZV_HOST=node0 launch/torchrun_multinode.sh parallel.ep=8 trainer.out_dir=runs/my_run
#
# NPROC_PER_NODE defaults to the number of GPUs (1 on a machine without); RDZV_PORT to 29500;
# RDZV_ID names the job.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}" "${RDZV_HOST:?set RDZV_HOST to the address of the first node}"
cd "$(dirname "$0")/.."
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
exec .venv/bin/torchrun \
  --nnodes="$NNODES" \
  --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-moe_train}" \
  train.py "$@"
