#!/usr/bin/env bash
#SBATCH --job-name=ssa_7b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --dependency=singleton
#
# SSA-7B pretraining (recipes/ssa_7b.yaml: TP 2 + sequence parallel, DP over the rest) on 16 nodes x 8 GPUs
# unless SSA_NODES / --nodes says otherwise. Edit slurm/cluster.env, then from the checkout:
#   slurm/submit.sh pretrain_ssa_7b.sh [overrides...]
#   sbatch --account=A --partition=P slurm/pretrain_ssa_7b.sh [overrides...]      (the same, by hand)
# Checkpoints and logs go to $RUN_DIR (default runs/ssa_7b). Ten minutes before the time limit the job
# checkpoints, requeues itself and resumes; `--dependency=singleton` keeps one job of this name running.
# The whole node is allocated (--exclusive): the job reads its CPU count from SLURM, none is hard-coded.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SSA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
ssa_run ssa_7b "$@"
