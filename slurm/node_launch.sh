#!/usr/bin/env bash
# Runs on every node (one srun task per node): a per-node Triton cache, then torchrun with one process per GPU
# joined by a c10d rendezvous on $MASTER_ADDR:$MASTER_PORT. Arguments: RECIPE [overrides...].
set -euo pipefail
: "${SLURM_NNODES:?}" "${SLURM_JOB_ID:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${SSA_PYTHON:?}" "${GPUS_PER_NODE:?}"

# Triton compiles kernels on first use; a node-local cache avoids processes of different nodes racing on a
# shared filesystem (the same GPU model on all nodes makes the cache valid across restarts of this node).
export TRITON_CACHE_DIR="${TMPDIR:-/tmp}/triton_cache_${SLURM_JOB_ID}_node${SLURM_NODEID:-0}"
mkdir -p "$TRITON_CACHE_DIR"

exec "$SSA_PYTHON" -m torch.distributed.run \
  --nnodes="$SLURM_NNODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id="$SLURM_JOB_ID" \
  --max_restarts=0 \
  -m ssa_megatron.training.cli "$@"
