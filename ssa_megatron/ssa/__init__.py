"""The SSA layer math: the readable reference and the ``ssa_attention`` entry point."""

from ssa_megatron.ssa.attention import SSAStats, ssa_attention

__all__ = ["SSAStats", "ssa_attention"]
