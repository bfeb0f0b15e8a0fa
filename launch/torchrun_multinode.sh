#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous. Run the same command on every node:
#
#   NNODES=2 RDZV_HOST=node0 launch/torchrun_multinode.sh parallel.ep=8 trainer.out_dir=runs/my_run
#
# NPROC_PER_NODE defaults to the number of GPUs; RDZV_PORT to 29500; RDZV_ID names the job.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}" "${RDZV_HOST:?set RDZV_HOST to the first node's address}"
cd "$(dirname "$0")/.."
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
exec .venv/bin/torchrun \
  --nnodes="$NNODES" \
  --nproc_per_node="${NPROC_PER_NODE:-1}" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-moe_train}" \
  train.py "$@"
