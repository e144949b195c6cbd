#!/usr/bin/env bash
#SBATCH --job-name=ssa_1b
#SBATCH --nodes=2
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
# SSA-1B exactly as in the paper (recipes/ssa_1b.yaml: 100B tokens, 3.15M tokens per step, data parallel), on
# 2 nodes x 8 GPUs unless SSA_NODES / --nodes says otherwise. Edit slurm/cluster.env, then from the checkout:
#   slurm/submit.sh pretrain_ssa_1b.sh [overrides...]
#   sbatch --account=A --partition=P slurm/pretrain_ssa_1b.sh [overrides...]      (the same, by hand)
# Arguments are recipe overrides (data.train_shards=..., train.steps=...). Baselines in the same stack:
# RECIPE=full_attn or RECIPE=moba, with their own job name (and so their own run directory), e.g.
#   RECIPE=full_attn slurm/submit.sh --job-name=full_attn pretrain_ssa_1b.sh
# The whole node is allocated (--exclusive): the job reads its CPU count from SLURM, none is hard-coded.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SSA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
ssa_run "${RECIPE:-ssa_1b}" "$@"
