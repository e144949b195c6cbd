# shellcheck shell=bash
# Shared launch logic for the sbatch scripts in this folder (sourced, not executed).
#
# One task per node: srun starts slurm/node_launch.sh on every node, which execs torchrun with a c10d
# rendezvous on the first host of the allocation; torchrun starts one training process per GPU.
#
# Settings: slurm/cluster.env, the one block to edit (account, partition, nodes, data, tokenizer, container image,
# run directory, GPUs per node); a variable set in the environment wins over it. Also read here:
#   SSA_ROOT              repository checkout (default: the folder above this script); relative paths in
#                         recipes and overrides are resolved against it
#   SSA_CLUSTER_ENV       another file to read instead of slurm/cluster.env
#   SSA_PYTHON            python with the dependencies installed (default: $SSA_ROOT/.venv/bin/python, or
#                         "python" inside a container)
#   MASTER_PORT           rendezvous port (default 29500)
#   SSA_EXTRA_OVERRIDES   more recipe overrides, space-separated (a.b=c ...); arguments to the script come after
#                         them, so an argument wins

ssa_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# Reads slurm/cluster.env (or $SSA_CLUSTER_ENV) and exports what it sets. A variable it assigns that is already
# in the environment, even empty, keeps the environment's value: remembered before the file is read, put back after.
ssa_load_cluster_env() {
  local file=${SSA_CLUSTER_ENV:-$SSA_ROOT/slurm/cluster.env}
  if [ ! -f "$file" ]; then
    echo "ssa: cluster settings $file: no such file (SSA_CLUSTER_ENV names another one)" >&2
    return 1
  fi
  local -a names saved=()
  local name entry
  mapfile -t names < <(sed -nE 's/^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=.*/\2/p' "$file")
  for name in "${names[@]}"; do
    if [ -n "${!name+set}" ]; then saved+=("$name=${!name}"); fi
  done
  set -a
  # shellcheck source=slurm/cluster.env
  source "$file"
  set +a
  for entry in "${saved[@]}"; do
    printf -v "${entry%%=*}" '%s' "${entry#*=}"
  done
}

# NCCL / CUDA / PyTorch settings for H100/H200 nodes with InfiniBand.
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
  export PYTHONUNBUFFERED=1
  export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
  # OMP_NUM_THREADS is set per node from its CPU count (node_launch.sh).
}

# CPUs the job holds on each node: the smallest count when nodes differ. SLURM_JOB_CPUS_PER_NODE reads like
# "96(x2)" or "112(x3),96"; without it, the batch node's SLURM_CPUS_ON_NODE, else nproc.
ssa_cpus_per_node() {
  local spec=${SLURM_JOB_CPUS_PER_NODE:-} min="" part n
  local -a parts
  IFS=, read -r -a parts <<< "$spec"
  for part in "${parts[@]}"; do
    n=${part%%(*}
    case $n in ''|*[!0-9]*) continue ;; esac
    if [ -z "$min" ] || [ "$n" -lt "$min" ]; then min=$n; fi
  done
  echo "${min:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
}

# Container mounts (src:dst, comma-separated): the checkout and the run directory at the same paths, the folders
# of absolute SSA_DATA/SSA_TOKENIZER paths outside them, then SSA_CONTAINER_MOUNTS.
ssa_container_mounts() {
  local -a mounts=("$SSA_ROOT:$SSA_ROOT" "$RUN_DIR:$RUN_DIR")
  local -a words
  local word dir m seen
  read -r -a words <<< "${SSA_DATA:-} ${SSA_TOKENIZER:-}"
  for word in "${words[@]}"; do
    case $word in /*) ;; *) continue ;; esac  # blend weights, relative paths (inside the checkout)
    if [ -d "$word" ]; then dir=$word; else dir=$(dirname "$word"); fi
    case $dir/ in "$SSA_ROOT"/*|"$RUN_DIR"/*) continue ;; esac
    seen=0
    for m in "${mounts[@]}"; do [ "$m" = "$dir:$dir" ] && seen=1; done
    [ "$seen" = 1 ] || mounts+=("$dir:$dir")
  done
  [ -n "${SSA_CONTAINER_MOUNTS:-}" ] && mounts+=("$SSA_CONTAINER_MOUNTS")
  local IFS=,
  echo "${mounts[*]}"
}

# Prints the srun command (one word per line) that starts the job: ssa_launch_command RECIPE [overrides...]
ssa_launch_command() {
  local recipe=$1
  shift
  local -a cmd=(srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SSA_CPUS_PER_NODE"
                --kill-on-bad-exit=1 --label --open-mode=append --output="$RUN_DIR/logs/%x-%j-node%n.log")
  if [ -n "${SSA_CONTAINER_IMAGE:-}" ]; then
    cmd+=(--container-image="$SSA_CONTAINER_IMAGE" --container-mounts="$(ssa_container_mounts)"
          --container-workdir="$SSA_ROOT")
  fi
  cmd+=("$SSA_ROOT/slurm/node_launch.sh" "$recipe" "$@")
  printf '%s\n' "${cmd[@]}"
}

# Runs the job and requeues it when it stops for the time limit: ssa_run RECIPE [overrides...]
# sbatch --signal=B:USR1@<seconds> sends USR1 to this script before the limit; it touches RUN_DIR/STOP, the
# training processes see it at the end of their step, save a checkpoint and exit; then the job requeues
# itself and the next allocation (same job id, same environment, same run directory) resumes from that
# checkpoint. Logs are opened in append mode, so a requeue adds to them.
ssa_run() {
  local recipe=$1
  shift
  SSA_ROOT=${SSA_ROOT:-$(ssa_root)}
  export SSA_ROOT
  ssa_load_cluster_env
  cd "$SSA_ROOT" || return

  local -a overrides=()
  [ -n "${SSA_DATA:-}" ] && overrides+=("data.train_shards=$SSA_DATA")
  [ -n "${SSA_TOKENIZER:-}" ] && overrides+=("data.tokenizer=$SSA_TOKENIZER")
  if [ -n "${SSA_EXTRA_OVERRIDES:-}" ]; then
    local -a extra
    read -r -a extra <<< "$SSA_EXTRA_OVERRIDES"
    overrides+=("${extra[@]}")
  fi
  overrides+=("$@")
  # A train.run_dir override is the run directory: the logs and the stop file must be where training writes.
  local arg
  local -a rest=()
  for arg in "${overrides[@]}"; do
    case $arg in train.run_dir=*) RUN_DIR=${arg#train.run_dir=} ;; *) rest+=("$arg") ;; esac
  done
  RUN_DIR=${RUN_DIR:-$SSA_ROOT/runs/${SLURM_JOB_NAME:-ssa}}
  case $RUN_DIR in /*) ;; *) RUN_DIR=$SSA_ROOT/$RUN_DIR ;; esac
  export RUN_DIR
  export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  export MASTER_PORT=${MASTER_PORT:-29500}
  SSA_CPUS_PER_NODE=$(ssa_cpus_per_node)
  export SSA_CPUS_PER_NODE
  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no `| head`: SIGPIPE under pipefail
  export MASTER_ADDR=${hosts[0]:?scontrol show hostnames returned no host}
  if [ -z "${SSA_PYTHON:-}" ]; then
    if [ -n "${SSA_CONTAINER_IMAGE:-}" ]; then SSA_PYTHON=python; else SSA_PYTHON=$SSA_ROOT/.venv/bin/python; fi
  fi
  export SSA_PYTHON
  mkdir -p "$RUN_DIR/logs"
  ssa_export_env

  local -a cmd
  mapfile -t cmd < <(ssa_launch_command "$recipe" "train.run_dir=$RUN_DIR" "${rest[@]}")

  local where="bare metal, $SSA_PYTHON"
  [ -n "${SSA_CONTAINER_IMAGE:-}" ] && where="container $SSA_CONTAINER_IMAGE"
  echo "ssa: $(date '+%F %T') job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $recipe on" \
       "${SLURM_NNODES} nodes x ${GPUS_PER_NODE} GPUs, ${SSA_CPUS_PER_NODE} CPUs per node, $where;" \
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
  echo "ssa: $(date '+%F %T') training exited with status $status"
  return "$status"
}
