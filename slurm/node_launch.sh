#!/usr/bin/env bash
# Runs on every node (one srun task per node): a node-local compile cache, then torchrun with one process per GPU
# joined by a c10d rendezvous on $MASTER_ADDR:$MASTER_PORT. Arguments: RECIPE [overrides...].
set -euo pipefail
: "${SLURM_NNODES:?}" "${SLURM_JOB_ID:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${SSA_PYTHON:?}" "${GPUS_PER_NODE:?}"

# The first step compiles the Triton kernels and torch.compile fusions (tens of seconds at long context).
# ssa-train keeps them under $SSA_MEGATRON_CACHE (ssa_megatron/training/compile_caches.py). Node-local by default,
# not per job: a requeue or a later job on this node reuses them, and nodes never race on a shared filesystem.
export SSA_MEGATRON_CACHE="${SSA_MEGATRON_CACHE:-/tmp/ssa_megatron_compile_${USER:-$(id -u)}}"
mkdir -p "$SSA_MEGATRON_CACHE"

exec "$SSA_PYTHON" -m torch.distributed.run \
  --nnodes="$SLURM_NNODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id="$SLURM_JOB_ID" \
  --max_restarts=0 \
  -m ssa_megatron.training.cli "$@"
