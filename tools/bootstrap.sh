#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 (megatron-core 0.19 requires it) and installs ssa_megatron into it.
# Usage: tools/bootstrap.sh            (idempotent: a second run only re-checks the install)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Prefers 3.12: megatron-core 0.19 needs >= 3.12, and 3.12 is the version the tests and kernels run under.
find_python() {
  local cand v
  for cand in python3.12 python3.13 python3; do
    if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      command -v "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare | grep -E '^3\.1[2-9]\.[0-9]+$' | sort -V); do
      PYENV_VERSION=$v pyenv which python 2>/dev/null && return 0
    done
  fi
  return 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python) || { echo "bootstrap: no Python >= 3.12 found (tried python3.13, python3.12, python3, pyenv)" >&2; exit 1; }
  echo "bootstrap: creating .venv with $py ($("$py" -V))"
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch 2.11 with triton 3.6 is what the kernels are tested with; installed first so the resolver keeps it.
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  echo "bootstrap: installing torch 2.11.0 (first run only, ~4.7 GB)"
  "${pip[@]}" install "torch==2.11.0"
fi
# eval: lm-eval for tests/test_hf_lm_eval.py (about 1 min of CPU, 1.5-2 min on 2 busy cores, on top of the rest).
"${pip[@]}" install -e ".[dev,hf,eval]"
echo "bootstrap: ready ($(.venv/bin/python -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")'))"
