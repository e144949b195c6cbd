#!/usr/bin/env bash
# Submits a job script of this folder with the scheduler settings of slurm/cluster.env (account, partition, nodes,
# time, other sbatch options), from the checkout, so the job finds slurm/common.sh:
#   slurm/submit.sh [sbatch options...] SCRIPT [recipe overrides...]
#   slurm/submit.sh pretrain_ssa_1b.sh data.train_shards=/lustre/corpus
# runs  sbatch --account=$SSA_ACCOUNT --partition=$SSA_PARTITION --nodes=$SSA_NODES --time=$SSA_TIME
#       $SSA_SBATCH_ARGS [sbatch options...] slurm/SCRIPT [recipe overrides...]
# (each option only when its value is set; options given here come last, so they win). For sweep_budgets.sh it
# adds --array=0-<n-1> for the n budgets of BUDGETS. The settings of cluster.env are exported with the job, so a
# requeue runs with the values of the submission even if the file is edited in between.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SSA_ROOT=${SSA_ROOT:-$root}
# shellcheck source=slurm/common.sh
source "$SSA_ROOT/slurm/common.sh"
ssa_load_cluster_env  # exported: sbatch passes them to the job

options=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do options+=("$1"); shift; done
if [ $# -eq 0 ]; then
  echo "usage: slurm/submit.sh [sbatch options...] SCRIPT [recipe overrides...]; SCRIPT is one of:" \
       "$(cd "$SSA_ROOT/slurm" && echo pretrain_*.sh sweep_*.sh)" >&2
  exit 2
fi
script=$1
shift
[ -f "$script" ] || script=$SSA_ROOT/slurm/$script
if [ ! -f "$script" ]; then
  echo "submit: ${script##*/}: no such job script (in the current folder or $SSA_ROOT/slurm)" >&2
  exit 2
fi

args=()
[ -n "$SSA_ACCOUNT" ] && args+=(--account="$SSA_ACCOUNT")
[ -n "$SSA_PARTITION" ] && args+=(--partition="$SSA_PARTITION")
[ -n "$SSA_NODES" ] && args+=(--nodes="$SSA_NODES")
[ -n "$SSA_TIME" ] && args+=(--time="$SSA_TIME")
if [ "$(basename "$script")" = sweep_budgets.sh ]; then
  read -r -a budgets <<< "${BUDGETS:-4 8 16 32 64}"
  args+=(--array="0-$((${#budgets[@]} - 1))")
fi
if [ -n "$SSA_SBATCH_ARGS" ]; then
  read -r -a more <<< "$SSA_SBATCH_ARGS"
  args+=("${more[@]}")
fi
args+=("${options[@]}")

cd "$SSA_ROOT"  # the submit directory: the job finds slurm/common.sh there, and %x-%j.out lands there
echo "submit: sbatch ${args[*]} $script $*"
exec sbatch "${args[@]}" "$script" "$@"
