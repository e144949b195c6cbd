#!/bin/bash
# Issue 16 item 2 on one GPU: decode tokens/s of the 1B shape (random bf16 weights, top_k 16 x block 16) at batch 1
# and 32, context 32k and 8k, full against sparse, the compiled static path against the baseline (the general path
# on a plain DynamicCache) in the same process, each path compiled afresh with static shapes; plus one profiled step
# of every path (kernels per step, top kernels by device time).
#
#   OUT=/tmp/decode_profile bash tests/gpu/decode_profile.sh          # from the repository root; about 5-6 minutes
#
# One process per (batch, context), so that a hang cannot take the others with it; inside it, --config-timeout
# prints the stacks of a path that runs too long (compilation included) and goes on with the next path. The outer
# timeouts sum to 6.5 minutes. Rows: $OUT/decode_b<batch>_<context>.json; profile tables: $OUT/profiles/.
set -u
OUT=${OUT:-/tmp/decode_profile}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
# Shared by the four processes: kernels and autotuning results that do not depend on the context are reused.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
git rev-parse --short HEAD 2>/dev/null || cat .gpu/tree 2>/dev/null
date -u
for run in "1 32768 110" "32 32768 130" "1 8192 70" "32 8192 80"; do
    set -- $run
    echo "=== batch $1 context $2 (limit $3 s)"
    timeout "$3" $PYTHON tools/bench_decode.py --batch "$1" --context "$2" --paths compiled-static baseline --check \
        --steps 20 --warmup 3 --baseline-steps 3 --config-timeout 75 --profile --profile-dir "$OUT/profiles" \
        --out "$OUT/decode_b$1_$2.json" 2>&1 | grep -vE "Warn|warn"
    echo "rc ${PIPESTATUS[0]}"
done
date -u
