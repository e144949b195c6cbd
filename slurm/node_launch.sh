#!/usr/bin/env bash
# Runs on every node (one srun task per node, on the host or inside the container): makes the checkout importable,
# sets the CPU threads from the node's CPU count, points the compile cache at node-local disk, then execs
# torchrun with one process per GPU joined by a c10d rendezvous on $MASTER_ADDR:$MASTER_PORT.
# Arguments: RECIPE [overrides...].
set -euo pipefail
: "${SLURM_NNODES:?}" "${SLURM_JOB_ID:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${SSA_PYTHON:?}" "${GPUS_PER_NODE:?}"
: "${SSA_ROOT:?}"

echo "ssa: $(date '+%F %T') node ${SLURM_NODEID:-?} ($(hostname)) of job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}"

# The checkout's code runs, whether the python is the checkout's .venv or a container's (which then needs only the
# dependencies, see Dockerfile): ssa_megatron from the checkout root, ssa_kernels from kernels/.
export PYTHONPATH="$SSA_ROOT:$SSA_ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"
"$SSA_PYTHON" -c '
import importlib.util, sys
missing = []
for name in ("torch", "triton", "megatron.core", "webdataset", "yaml", "tokenizers", "safetensors"):
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name
        found = False
    if not found:
        missing.append(name)
if sys.version_info < (3, 12):
    missing.insert(0, "python >= 3.12 (this is %d.%d)" % sys.version_info[:2])
if missing:
    sys.exit("ssa: %s lacks %s: run in an image built from the repository Dockerfile (SSA_CONTAINER_IMAGE), "
             "or set SSA_PYTHON to a python that has them (tools/bootstrap.sh makes .venv)"
             % (sys.executable, ", ".join(missing)))
'

# CPU threads per training process: this task's CPUs (srun --cpus-per-task, the node's count; nproc otherwise)
# shared by the GPUs' processes. torchrun would otherwise set 1. A value set by the user is kept.
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
threads=$((cpus / GPUS_PER_NODE))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}"

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
