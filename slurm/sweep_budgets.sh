#!/usr/bin/env bash
#SBATCH --job-name=ssa_budget_sweep
#SBATCH --array=0-4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#
# Budget sweep: one array task per training budget ssa.top_k (blocks of BLOCK_SIZE tokens, default 16), each a
# full run of $RECIPE (default 125m) in its own run directory with the budget in its name:
#   <parent>/<SWEEP_NAME>_k<top_k>_bs<block_size>     e.g. runs/sweep_125m_k16_bs16
# parent: RUN_DIR when set (slurm/cluster.env or the environment), else runs/ in the checkout; SWEEP_NAME
# defaults to sweep_<recipe>. A requeued task finds its own folder again and resumes; a resume whose budget
# differs from the folder's recipe.yaml is refused by ssa-train (ssa.top_k and ssa.block_size are checked).
#   slurm/submit.sh sweep_budgets.sh [overrides...]           (the array follows BUDGETS)
#   BUDGETS="8 16 32" sbatch --array=0-2 slurm/sweep_budgets.sh [overrides...]
# The budget and the folder come from BUDGETS, BLOCK_SIZE, RUN_DIR and SWEEP_NAME only: overrides of
# ssa.top_k, ssa.block_size or train.run_dir are refused, since they would give runs a name that lies.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SSA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
SSA_ROOT=${SSA_ROOT:-$(ssa_root)}
export SSA_ROOT
ssa_load_cluster_env  # RUN_DIR may come from there

read -r -a budgets <<< "${BUDGETS:-4 8 16 32 64}"
task=${SLURM_ARRAY_TASK_ID:-0}
if [ "$task" -ge "${#budgets[@]}" ]; then
  echo "ssa: array task $task has no budget (BUDGETS='${budgets[*]}'): submit with --array=0-$((${#budgets[@]} - 1))" >&2
  exit 1
fi
top_k=${budgets[$task]}
block_size=${BLOCK_SIZE:-16}
for value in "$top_k" "$block_size"; do
  case $value in ''|*[!0-9]*)
    echo "ssa: BUDGETS='${budgets[*]}' and BLOCK_SIZE='$block_size' must be whole numbers" >&2
    exit 1 ;;
  esac
done
read -r -a extra <<< "${SSA_EXTRA_OVERRIDES:-}"
for arg in "${extra[@]}" "$@"; do
  case $arg in ssa.top_k=*|ssa.block_size=*|train.run_dir=*)
    echo "ssa: $arg: a sweep sets the budget and the run folder itself; use BUDGETS, BLOCK_SIZE and RUN_DIR" \
         "(the folder that holds the runs) instead" >&2
    exit 1 ;;
  esac
done

recipe=${RECIPE:-125m}
name=${recipe##*/}
name=${SWEEP_NAME:-sweep_${name%.yaml}}
RUN_DIR="${RUN_DIR:-$SSA_ROOT/runs}/${name}_k${top_k}_bs${block_size}"
export RUN_DIR
# Array tasks may share a node list: give each its own rendezvous port.
export MASTER_PORT=${MASTER_PORT:-$((29500 + task))}
echo "ssa: sweep task $task of ${#budgets[@]}: budget top_k=$top_k x block_size=$block_size -> $RUN_DIR"
ssa_run "$recipe" "ssa.top_k=$top_k" "ssa.block_size=$block_size" "$@"
