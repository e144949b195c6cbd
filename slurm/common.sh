# shellcheck shell=bash
# Shared launch logic for the sbatch scripts in this folder (sourced, not executed).
#
# One task per node: srun starts slurm/node_launch.sh on every node, which execs torchrun with a c10d
# rendezvous on the first host of the allocation; torchrun starts one training process per GPU.
#
# Settings (environment variables; all optional):
#   SSA_ROOT              repository checkout (default: the folder above this script)
#   SSA_PYTHON            python with ssa_megatron installed (default: $SSA_ROOT/.venv/bin/python, or
#                         "python" inside a container)
#   SSA_CONTAINER_IMAGE   run inside this image through pyxis/enroot (srun --container-image); the repository
#                         and the run directory are mounted at the same paths
#   SSA_CONTAINER_MOUNTS  extra mounts, comma-separated (src:dst), e.g. the data folder
#   RUN_DIR               checkpoints, TensorBoard logs, per-node logs (default: $SSA_ROOT/runs/<job name>)
#   GPUS_PER_NODE         default 8
#   MASTER_PORT           rendezvous port (default 29500)
#   SSA_EXTRA_OVERRIDES   more recipe overrides, space-separated (a.b=c ...)

ssa_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# NCCL / CUDA / PyTorch settings for H100 nodes with InfiniBand.
ssa_export_env() {
  export CUDA_DEVICE_MAX_CONNECTIONS=1          # ordered kernel launches: Megatron's TP/SP comm overlap relies on it
  export TORCH_NCCL_AVOID_RECORD_STREAMS=1      # free comm buffers eagerly (less fragmentation)
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a failed collective kills the job instead of hanging it
  # NVLink SHARP (NVLS) off by default: it needs CUDA multicast objects (cuMulticastCreate), which some drivers,
  # virtualised hosts and containers do not provide, and on hosts shared with other jobs a program using them
  # can put the GPUs out of service. Set NCCL_NVLS_ENABLE=1 where your NVSwitch nodes support it.
  export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
  export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-19}"
  export NCCL_IB_SL="${NCCL_IB_SL:-1}"
  export NCCL_P2P_NET_CHUNKSIZE="${NCCL_P2P_NET_CHUNKSIZE:-2097152}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
  export PYTHONUNBUFFERED=1
  export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
}

# Prints the srun command (one word per line) that starts the job: ssa_launch_command RECIPE [overrides...]
ssa_launch_command() {
  local recipe=$1
  shift
  local -a cmd=(srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label
                --output="$RUN_DIR/logs/%x-%j-node%n.log")
  if [ -n "${SSA_CONTAINER_IMAGE:-}" ]; then
    local mounts="$SSA_ROOT:$SSA_ROOT,$RUN_DIR:$RUN_DIR"
    [ -n "${SSA_CONTAINER_MOUNTS:-}" ] && mounts="$mounts,$SSA_CONTAINER_MOUNTS"
    cmd+=(--container-image="$SSA_CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir="$SSA_ROOT")
  fi
  cmd+=("$SSA_ROOT/slurm/node_launch.sh" "$recipe" "train.run_dir=$RUN_DIR" "$@")
  printf '%s\n' "${cmd[@]}"
}

# Runs the job and requeues it when it stops for the time limit: ssa_run RECIPE [overrides...]
# sbatch --signal=B:USR1@<seconds> sends USR1 to this script before the limit; it touches RUN_DIR/STOP, the
# training processes see it at the end of their step, save a checkpoint and exit; then the job requeues
# itself and the next allocation resumes from that checkpoint.
ssa_run() {
  SSA_ROOT=${SSA_ROOT:-$(ssa_root)}
  export SSA_ROOT
  export RUN_DIR=${RUN_DIR:-$SSA_ROOT/runs/${SLURM_JOB_NAME:-ssa}}
  export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  export MASTER_PORT=${MASTER_PORT:-29500}
  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no `| head`: SIGPIPE under pipefail
  export MASTER_ADDR=${hosts[0]:?scontrol show hostnames returned no host}
  if [ -z "${SSA_PYTHON:-}" ]; then
    if [ -n "${SSA_CONTAINER_IMAGE:-}" ]; then SSA_PYTHON=python; else SSA_PYTHON=$SSA_ROOT/.venv/bin/python; fi
  fi
  export SSA_PYTHON
  mkdir -p "$RUN_DIR/logs"
  ssa_export_env

  local -a extra=()
  if [ -n "${SSA_EXTRA_OVERRIDES:-}" ]; then
    read -r -a extra <<< "$SSA_EXTRA_OVERRIDES"
  fi
  local -a cmd
  mapfile -t cmd < <(ssa_launch_command "$@" "${extra[@]}")

  echo "ssa: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_NNODES} nodes x ${GPUS_PER_NODE} GPUs," \
       "rendezvous ${MASTER_ADDR}:${MASTER_PORT}; run dir ${RUN_DIR}; logs ${RUN_DIR}/logs"
  echo "ssa: ${cmd[*]}"

  SSA_STOP_REQUESTED=0
  trap 'SSA_STOP_REQUESTED=1; echo "ssa: time limit near, asking the job to checkpoint and stop"; touch "$RUN_DIR/STOP"' USR1
  "${cmd[@]}" &
  local srun_pid=$!
  local status=0
  # `wait` returns early when a trapped signal arrives; keep waiting until srun itself has exited.
  while true; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  if [ "$SSA_STOP_REQUESTED" = 1 ]; then
    rm -f "$RUN_DIR/STOP"
    echo "ssa: requeueing job $SLURM_JOB_ID; the next run resumes from $(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo '?')"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  echo "ssa: training exited with status $status"
  return "$status"
}
