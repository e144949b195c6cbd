"""Where compiled kernels are cached across launches, so that a resume or a requeue compiles less.

The first training step compiles the Triton kernels (selection, sparse attention, fused gate) and the
torch.compile'd fusions (RoPE, SwiGLU, cross-entropy) for the run's shapes: about 60 s at 32k context on an H200
(docs/benchmarks.md, "First step"). Measured there, at 32k with 2 layers:

- a warm Triton cache alone: first step 45.7 s instead of 59.5 s, steady state unchanged (288 vs 292 ms/step);
- warm Triton and Inductor caches: first step 3.3 s, but every later step 3-4x slower (1,163 ms); a warm
  Inductor cache with torch's FX-graph and autograd caches off: 905 ms. The cause is not found yet.

So ``configure`` keeps the Triton cache (``TRITON_CACHE_DIR``) under one directory that outlives the job,
``$SSA_MEGATRON_CACHE`` or ``~/.cache/ssa_megatron/compile``, and gives Inductor (``TORCHINDUCTOR_CACHE_DIR``) a
fresh directory per launch, removed at exit, instead of torch's default ``/tmp/torchinductor_<user>``, which
persists on a node and would make a relaunch there slow. Variables the user set are left alone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def root() -> Path:
    base = os.environ.get("SSA_MEGATRON_CACHE") or Path.home() / ".cache" / "ssa_megatron" / "compile"
    return Path(base).expanduser()


def configure() -> None:
    """Sets the cache variables the user left unset. Call before anything imports torch's Inductor or compiles
    (Inductor fixes its directory the first time it needs it, and writes it into the environment)."""
    if not os.environ.get("TRITON_CACHE_DIR"):
        os.environ["TRITON_CACHE_DIR"] = str(root() / "triton")
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        launch_dir = tempfile.mkdtemp(prefix="ssa_megatron_inductor_")
        atexit.register(shutil.rmtree, launch_dir, ignore_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = launch_dir


def describe() -> str:
    """Where the Triton kernels are cached, for the console."""
    return os.environ.get("TRITON_CACHE_DIR") or "Triton's default cache"
