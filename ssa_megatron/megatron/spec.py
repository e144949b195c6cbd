"""The SSA transformer-layer spec: Megatron's Llama-style layer (RMSNorm, SwiGLU, RoPE) with SSA attention.

Only the attention changes: ``SSASelfAttention`` (Megatron's ``SelfAttention`` + the gate linear) with
``SSACoreAttention`` as its core attention, inside ``SSATransformerLayer``. RMSNorm and SwiGLU come from the
``TransformerConfig`` (``normalization="RMSNorm"``, ``gated_linear_unit=True``, ``activation_func=silu``) that
``transformer_config_from_recipe`` builds.

The recipe chooses the backend (``model.transformer_impl``, read by ``model.build_gpt_model``):

- ``"local"``: Megatron-core's own modules (``ColumnParallelLinear``, ``RowParallelLinear``) and torch's RMSNorm
  (``SequenceParallelRMSNorm``, which Megatron's own torch-norm wrapper is not: it refuses sequence parallelism).
  Complete without Transformer Engine; the path used on CPUs and on GPUs without TE.
- ``"transformer_engine"``: Transformer Engine linears and norms around the same SSA core attention (TE has no
  sparse attention, so ``SSACoreAttention`` and its kernels stay). The input norm stays a separate ``TENorm`` (not
  fused into the QKV GEMM) because the gate reads the normalized input; the MLP uses TE's fused norm+fc1.
  Checkpoint keys are the same as the local spec's.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from ssa_megatron.config import NSAConfig, SSAConfig
from ssa_megatron.megatron.attention import (
    SSACoreAttention,
    SSASelfAttention,
    SSASelfAttentionSubmodules,
    SSATransformerLayer,
)

BACKENDS = ("local", "transformer_engine")
"""The values of ``model.transformer_impl``."""

TE_EXTRA = 'pip install -e ".[te]"'


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports. TE raises RuntimeError (not ImportError) when its CUDA libraries do
    not match, which counts as absent too."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with Megatron's norm signature, usable under sequence parallelism.

    Under sequence parallelism each tensor-parallel rank normalises its own slice of the tokens, so the weight's
    gradient is partial on every rank: the weight is marked ``sequence_parallel``, and Megatron's
    ``finalize_model_grads`` sums such gradients over the TP group (as it does for Transformer Engine's and Apex's
    norms). Megatron's ``WrappedTorchNorm`` refuses sequence parallelism instead, which left the local layers
    without it on machines without TE or Apex.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(f"SequenceParallelRMSNorm: normalization={config.normalization!r}, zero-centred gamma "
                             f"{config.layernorm_zero_centered_gamma}: only plain RMSNorm is supported")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def local_block_spec(layer_spec: ModuleSpec, config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The decoder block of the local spec: ``layer_spec`` for this stage's layers and the same RMSNorm as final
    norm (Megatron would pick its own norm class for a bare layer spec)."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=SequenceParallelRMSNorm)


def get_ssa_layer_spec(backend: str = "local", ssa: SSAConfig | None = None, compiled_rope: bool = False,
                       attention: str = "ssa", nsa: NSAConfig | None = None) -> ModuleSpec:
    """A ``TransformerLayer`` spec with SSA attention (or the NSA baseline's).

    Args:
        backend: 'local' (megatron-core modules) or 'transformer_engine' (Transformer Engine linears/norms).
        ssa: the SSA semantics handed to every core attention (default ``SSAConfig()``).
        compiled_rope: run Megatron's unfused RoPE compiled in the attention layers (``train.fused_ops`` on CUDA;
            ``ssa_megatron.megatron.rope``).
        attention: ``model.attention``: 'ssa', or 'nsa' for ``NSACoreAttention`` (``ssa_megatron.megatron.nsa``)
            with three gate logits per head; ``nsa`` its settings (default ``NSAConfig()``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"get_ssa_layer_spec(backend={backend!r}): must be one of {', '.join(BACKENDS)}")
    if attention not in ("ssa", "nsa"):
        raise ValueError(f"get_ssa_layer_spec(attention={attention!r}): must be 'ssa' or 'nsa'")
    ssa = copy.deepcopy(ssa) if ssa is not None else SSAConfig()
    ssa.validate()
    core = ModuleSpec(module=SSACoreAttention, params={"ssa": ssa})
    gates = 1 if ssa.gate == "per_head" else 0
    if attention == "nsa":
        from ssa_megatron.megatron.nsa import GATES, NSACoreAttention

        nsa = copy.deepcopy(nsa) if nsa is not None else NSAConfig()
        nsa.validate()
        core, gates = ModuleSpec(module=NSACoreAttention, params={"nsa": nsa}), GATES
    if backend == "local":
        return _local_spec(core, gates, compiled_rope)
    return _te_spec(core, gates, compiled_rope)


def _attention_spec(core: ModuleSpec, gates: int, compiled_rope: bool, linear_qkv, linear_proj, linear_gate
                    ) -> ModuleSpec:
    return ModuleSpec(
        module=SSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "compiled_rope": compiled_rope,
                **({"gates_per_head": gates} if gates > 1 else {})},
        submodules=SSASelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=core,
            linear_proj=linear_proj,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
            linear_gate=linear_gate if gates else None,
        ),
    )


def _local_spec(core: ModuleSpec, gates: int, compiled_rope: bool) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    stock = spec.submodules.self_attention.submodules
    spec.module = SSATransformerLayer
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    spec.submodules.self_attention = _attention_spec(core, gates, compiled_rope, stock.linear_qkv, stock.linear_proj,
                                                     ColumnParallelLinear)
    return spec


def _te_spec(core: ModuleSpec, gates: int, compiled_rope: bool) -> ModuleSpec:
    if not transformer_engine_available():
        raise ValueError(
            "model.transformer_impl=transformer_engine: Transformer Engine is not importable here (not installed, "
            f"or its import raised); install the 'te' extra ({TE_EXTRA}; NGC PyTorch containers ship it) or set "
            "model.transformer_impl=local"
        )
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec()
    stock = spec.submodules.self_attention.submodules
    spec.module = SSATransformerLayer
    # The gate reads the normalized input, so the input norm is not fused into the QKV GEMM here.
    spec.submodules.input_layernorm = TENorm
    spec.submodules.self_attention = _attention_spec(
        core, gates, compiled_rope, TEColumnParallelLinear, stock.linear_proj, TEColumnParallelLinear
    )
    # Same checkpoint keys as the stock TE layer (whose input norm lives inside linear_qkv) and the local spec.
    spec.submodules.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    return spec
