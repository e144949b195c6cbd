"""``SSALlamaConfig``: a Llama configuration plus the SSA semantics used at inference (docs/ssa.md, rule 9).

The Llama fields mean what they mean in ``transformers.LlamaConfig``. The SSA fields mirror
:class:`ssa_megatron.config.SSAConfig` with an ``ssa_`` prefix: a bare ``top_k`` in a model config is read by
``generate()`` as its sampling top-k (``GenerationConfig.from_model_config``), so the budget must not be called
that. ``ssa_top_k`` and ``ssa_block_size`` are the *inference* budget (what the Megatron recipe calls
``inference_top_k`` / ``inference_block_size`` when they are set), and ``ssa_mode`` picks full or sparse
attention. ``SSALlamaForCausalLM.set_attention_mode`` changes them on a loaded model.

This file is also copied into every gated export (``ssa_megatron.hf.export``) and loaded from there as remote
code, so it imports only torch/transformers/huggingface_hub at module level; the package's ``SSAConfig`` (full
validation, ``ssa_config()``) is imported only when this module is ``ssa_megatron.hf.configuration``.
"""

from __future__ import annotations

import importlib
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

IN_PACKAGE = __name__.startswith("ssa_megatron.")
"""False when loaded as remote code from an export folder, where ``ssa_megatron`` must not be imported."""
if IN_PACKAGE:  # importlib, not an import statement, which transformers' remote-code check would demand
    SSAConfig = importlib.import_module("ssa_megatron.config").SSAConfig

MODES = ("full", "sparse")
SCORES = ("group_softmax", "dot")
SELECTIONS = ("exact", "authors_chunked")
NORMALISERS = ("earlier_blocks", "authors")
GATES = ("per_head", "none")
BACKENDS = ("auto", "reference", "triton")


@strict
class SSALlamaConfig(LlamaConfig):
    """Llama + SSA attention. ``model_type = "ssa_llama"``."""

    model_type = "ssa_llama"

    ssa_block_size: int = 16
    """Tokens per key block (power of two >= 16)."""
    ssa_top_k: int = 16
    """Blocks each query attends to in sparse mode, its own block included (receptive field top_k·block_size)."""
    ssa_score: str = "group_softmax"
    """Block score: 'group_softmax' or 'dot'."""
    ssa_selection: str = "exact"
    """'exact' top-k or 'authors_chunked' (the authors' chunked top-k; docs/ssa.md, deviations)."""
    ssa_normaliser: str = "earlier_blocks"
    """group_softmax's normaliser: 'earlier_blocks' or 'authors' (also the own block when the query is its last
    token)."""
    ssa_sink_blocks: int = 0
    ssa_local_blocks: int = 0
    ssa_gate: str = "per_head"
    """'per_head': sigmoid gate per query head (``self_attn.g_proj``); 'none': no gate."""
    ssa_mode: str = "sparse"
    """'full' or 'sparse' attention."""
    ssa_document_mask: bool = False
    """Keep packed documents apart (needs ``cu_seqlens`` passed to the forward)."""
    ssa_backend: str = "auto"
    """'auto' (Triton kernels on CUDA, the reference elsewhere), 'reference' or 'triton'."""
    megatron_recipe: dict | None = None
    """The resolved Megatron recipe the weights were trained with (provenance; used when converting back)."""

    def validate_architecture(self):
        super().validate_architecture()
        for name, allowed in (("ssa_mode", MODES), ("ssa_score", SCORES), ("ssa_gate", GATES),
                              ("ssa_backend", BACKENDS), ("ssa_selection", SELECTIONS),
                              ("ssa_normaliser", NORMALISERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SSALlamaConfig.{name}={getattr(self, name)!r}: must be one of "
                                 f"{', '.join(map(repr, allowed))}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"SSALlamaConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if IN_PACKAGE:  # in an export folder the budget is checked by the copied reference when it runs
            self.ssa_config().validate("SSALlamaConfig")

    def ssa_config(self) -> "SSAConfig":
        """The :class:`SSAConfig` that ``ssa_attention`` runs with (inference only: no alignment loss). Package
        only."""
        return SSAConfig(
            block_size=self.ssa_block_size, top_k=self.ssa_top_k, score=self.ssa_score, selection=self.ssa_selection,
            normaliser=self.ssa_normaliser, sink_blocks=self.ssa_sink_blocks,
            local_blocks=self.ssa_local_blocks, p_full=1.0 if self.ssa_mode == "full" else 0.0, alpha=0.0,
            gate=self.ssa_gate, document_mask=self.ssa_document_mask, inference_mode=self.ssa_mode,
            backend=self.ssa_backend,
        )

    @property
    def layer_types(self) -> list[str]:
        """Each layer's KV-cache kind, read by transformers' ``DynamicCache(config=...)`` and ``StaticCache``:
        ``ssa_attention``, the cache layers of ``decoding.py`` that keep the pooled block keys."""
        return ["ssa_attention"] * self.num_hidden_layers

    def validate_layer_type(self):
        """transformers' check of ``layer_types`` against its own kinds; ``ssa_attention`` is registered by
        ``decoding.py`` (``CacheLayerMixin._layer_type``) and the property always has one entry per layer."""

    @property
    def receptive_field(self) -> int:
        return self.ssa_top_k * self.ssa_block_size


def rope_parameters_from_recipe(model) -> dict:
    """transformers' ``rope_parameters`` of a recipe's ``model`` section (``model.rope_theta`` and
    ``model.rope_scaling``): ``rope_type`` default, or llama3 with its four scaling fields."""
    params = {"rope_type": "default", "rope_theta": float(model.rope_theta)}
    scaling = model.rope_scaling
    if scaling.type == "llama3":
        params.update(rope_type="llama3", factor=float(scaling.factor), low_freq_factor=float(scaling.low_freq_factor),
                      high_freq_factor=float(scaling.high_freq_factor),
                      original_max_position_embeddings=int(scaling.original_max_position_embeddings))
    return params


def hf_config_from_recipe(recipe, **extra: Any) -> SSALlamaConfig:
    """The HF configuration of a Megatron recipe (:class:`ssa_megatron.config.RecipeConfig`).

    The inference overrides of the recipe (``inference_top_k`` / ``inference_block_size``) become ``top_k`` /
    ``block_size``; ``extra`` sets further fields (``bos_token_id``, ``eos_token_id``, ``torch_dtype`` ...).
    """
    to_dict = importlib.import_module("ssa_megatron.config").to_dict  # package only (see IN_PACKAGE)
    m = recipe.model
    if getattr(m, "attention", "ssa") != "ssa":
        raise ValueError(f"model.attention={m.attention}: the HF model implements SSA attention only; evaluate this run "
                         "with the training loop's held-out evaluation (train.eval_interval)")
    ssa = recipe.ssa.for_inference()
    fields = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.head_dim, hidden_act="silu",
        max_position_embeddings=m.seq_length, initializer_range=m.init_std, rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=m.tie_embeddings,
        rope_parameters=rope_parameters_from_recipe(m),
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        ssa_block_size=ssa.block_size, ssa_top_k=ssa.top_k, ssa_score=ssa.score, ssa_selection=ssa.selection,
        ssa_normaliser=ssa.normaliser, ssa_sink_blocks=ssa.sink_blocks,
        ssa_local_blocks=ssa.local_blocks, ssa_gate=ssa.gate, ssa_mode=ssa.inference_mode,
        ssa_document_mask=ssa.document_mask, megatron_recipe=to_dict(recipe),
        architectures=["SSALlamaForCausalLM"],
    )
    fields.update(extra)
    return SSALlamaConfig(**fields)
