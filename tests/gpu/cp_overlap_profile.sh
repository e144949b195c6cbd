#!/bin/bash
# Issue 13 item 3 on 2 GPUs: the overlapped context-parallel K/V exchange at 32k, CP 2 (ssa_1b shape, mode ssa,
# selective recompute): the bf16 checks of the split full branch (one GPU), then one profiled step of the real loop
# (run AC's command plus --profile), and for each rank the NCCL kernel time and the part of it no other GPU work
# overlapped (tools/profile_gaps.py --comm). With BEFORE_DIR, the same profile of another tree (the commit before
# the overlap) follows, read by this tree's profile_gaps.py, for the comparison.
#
#   OUT=/tmp/cp_overlap bash tests/gpu/cp_overlap_profile.sh                      # from the repository root
#   BEFORE_DIR=before OUT=/tmp/cp_overlap bash tests/gpu/cp_overlap_profile.sh    # plus the tree in ./before
#   BEFORE_ONLY=1 BEFORE_DIR=before OUT=/tmp/cp_overlap bash tests/gpu/cp_overlap_profile.sh   # only ./before
#
# ./before can be made with
#   mkdir before && git archive ebe6dde^ | tar -x -C before && echo /before/ >> .git/info/exclude
# (ebe6dde is the commit that overlaps the exchange; carry ./before to the GPU machine). About 3 minutes per
# tree; step times in $OUT/<tree>.json, traces in $OUT/<tree>/ssa.rank<r>.trace.json.gz, NCCL tables in
# $OUT/<tree>.rank<r>.comm.txt.
set -u
OUT=$(realpath -m "${OUT:-/tmp/cp_overlap}")
PYTHON=${PYTHON:-python3}
HERE=$(pwd)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git rev-parse --short HEAD 2>/dev/null || echo "no git here"
date -u

if [ -z "${BEFORE_ONLY:-}" ]; then
    echo "=== bf16 split path and own-keys diagonal (one GPU)"
    PYTHONPATH="$HERE:$HERE/kernels${PYTHONPATH:+:$PYTHONPATH}" timeout 300 $PYTHON -m pytest -q -s tests/gpu/test_full_cp_gpu.py \
        -k "own_keys or bf16" 2>&1 | grep -E "own-keys|passed|failed|Error"
    echo "rc ${PIPESTATUS[0]}"
fi

profile_tree() {  # $1: label, $2: tree
    echo "=== $1: torchrun 2 GPUs, 32k, CP 2, one profiled step ($2)"
    (set -o pipefail; cd "$2" && PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" timeout 420 $PYTHON -m torch.distributed.run \
        --nproc_per_node=2 tools/bench_training.py --modes ssa --seq 32768 --recompute selective \
        --micro-batches 1 --steps 3 --fallback-layers 0 --profile "$OUT/$1" --json "$OUT/$1.json" \
        parallel.context_parallel=2 2>&1 | grep -vE "Warn|warn")
    echo "rc $?"
    for r in 0 1; do
        trace="$OUT/$1/ssa.rank$r.trace.json.gz"
        [ -f "$trace" ] || { echo "no trace $trace"; continue; }
        $PYTHON "$HERE/tools/profile_gaps.py" "$trace" --comm --top 8 > "$OUT/$1.rank$r.comm.txt"
        echo "--- $1 rank $r"
        head -1 "$OUT/$1.rank$r.comm.txt"
        sed -n '/^NCCL:/,$p' "$OUT/$1.rank$r.comm.txt"
    done
}

[ -n "${BEFORE_ONLY:-}" ] || profile_tree overlap "$HERE"
if [ -n "${BEFORE_DIR:-}" ]; then
    profile_tree before "$BEFORE_DIR"
fi
date -u
