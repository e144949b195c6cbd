#!/usr/bin/env bash
#SBATCH --job-name=ssa_7b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --dependency=singleton
#
# SSA-7B pretraining (recipes/ssa_7b.yaml: TP 2 + sequence parallel, DP over the rest) on 8 x H100 nodes.
#   sbatch slurm/pretrain_ssa_7b.sh [overrides...]          e.g. data.train_shards=/lustre/corpus/train-{000000..009999}.tar
#   SSA_CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.11-py3 sbatch slurm/pretrain_ssa_7b.sh    (pyxis container)
# Checkpoints and logs go to $RUN_DIR (default runs/ssa_7b). Ten minutes before the time limit the job
# checkpoints, requeues itself and resumes; `--dependency=singleton` keeps one job of this name running.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SSA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
ssa_run ssa_7b "$@"
