"""Hugging Face side of SSA: ``SSALlamaConfig`` / ``SSALlamaForCausalLM`` (registered as ``ssa_llama`` with the
Auto classes on import), conversion to and from Megatron checkpoints (``ssa_megatron.hf.convert``) and the layout
of an export folder that loads with stock transformers (``ssa_megatron.hf.export``)."""

from ssa_megatron.hf.configuration import SSALlamaConfig, hf_config_from_recipe
from ssa_megatron.hf.modeling import SSALlamaAttention, SSALlamaForCausalLM, SSALlamaModel, register

register()

__all__ = ["SSALlamaConfig", "SSALlamaForCausalLM", "SSALlamaModel", "SSALlamaAttention", "hf_config_from_recipe",
           "register"]
