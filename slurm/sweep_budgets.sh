#!/usr/bin/env bash
#SBATCH --job-name=ssa_budget_sweep
#SBATCH --array=0-4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#
# Budget sweep: one array task per training budget top_k (blocks of ssa.block_size tokens), each a full run
# of $RECIPE (default 125m) in its own run directory runs/sweep_<recipe>_k<top_k>.
#   sbatch slurm/sweep_budgets.sh [overrides...]
#   BUDGETS="8 16 32" sbatch --array=0-2 slurm/sweep_budgets.sh
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SSA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
read -r -a budgets <<< "${BUDGETS:-4 8 16 32 64}"
task=${SLURM_ARRAY_TASK_ID:-0}
if [ "$task" -ge "${#budgets[@]}" ]; then
  echo "ssa: array task $task has no budget (BUDGETS='${budgets[*]}')" >&2
  exit 1
fi
top_k=${budgets[$task]}
recipe=${RECIPE:-125m}
export RUN_DIR=${RUN_DIR:-$(ssa_root)/runs/sweep_${recipe}_k${top_k}}
# Array tasks may share a node list: give each its own rendezvous port.
export MASTER_PORT=${MASTER_PORT:-$((29500 + task))}
ssa_run "$recipe" "ssa.top_k=$top_k" "$@"
