"""Megatron-core glue for SSA: layer spec, gate + core attention, mode sampler, alignment-loss auto-scaler,
per-layer metrics tracker, context-parallel exchange, compiled RoPE, model builder and the CPU compatibility shims.

Import order matters only for CPU runs: call ``enable_cpu_compat()`` (no-op with CUDA) before building a model.
See docs/megatron.md.
"""

from ssa_megatron.megatron.cpu_compat import enable_cpu_compat

__all__ = ["enable_cpu_compat"]
