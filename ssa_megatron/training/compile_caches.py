"""Where compiled kernels persist, so that a resume or a requeue on the same nodes does not compile them again.

The first training step compiles the Triton kernels (selection, sparse attention, fused gate) and the
torch.compile'd fusions (RoPE, SwiGLU, cross-entropy) for the run's shapes: tens of seconds at long context.
Triton keeps its binaries in ``TRITON_CACHE_DIR`` (default ``~/.triton/cache``); Inductor keeps its generated
code, graphs and autotuning results in ``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``, which
a container's fresh ``/tmp`` or a node's cleanup loses). ``configure`` points both below one directory that
outlives the job, ``$SSA_MEGATRON_CACHE`` or ``~/.cache/ssa_megatron/compile``, unless the user set them.
"""

from __future__ import annotations

import os
from pathlib import Path

_VARIABLES = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor"}


def root() -> Path:
    base = os.environ.get("SSA_MEGATRON_CACHE") or Path.home() / ".cache" / "ssa_megatron" / "compile"
    return Path(base).expanduser()


def configure() -> None:
    """Sets the cache variables the user left unset; call before anything compiles (the caches read them
    when they first write)."""
    for variable, folder in _VARIABLES.items():
        if not os.environ.get(variable):
            os.environ[variable] = str(root() / folder)


def describe() -> str:
    """The cache folders in use, for the console."""
    return " and ".join(os.environ.get(v) or f"the default {k} cache" for v, k in _VARIABLES.items())
