#!/usr/bin/env bash
#SBATCH --job-name=ssa_1b
#SBATCH --nodes=2
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
# SSA-1B exactly as in the paper (recipes/ssa_1b.yaml: 100B tokens, 3.15M tokens per step, data parallel).
#   sbatch slurm/pretrain_ssa_1b.sh data.train_shards=/data/smollm/train-{000000..000999}.tar data.tokenizer=/data/smollm/tokenizer.json
# Baselines in the same stack: RECIPE=full_attn or RECIPE=moba (with --job-name to keep their runs apart), e.g.
#   RECIPE=full_attn sbatch --job-name=full_attn slurm/pretrain_ssa_1b.sh data.train_shards=...
set -euo pipefail
# shellcheck source=slurm/common.sh
source "${SSA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
ssa_run "${RECIPE:-ssa_1b}" "$@"
