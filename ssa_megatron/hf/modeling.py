"""``SSALlamaForCausalLM``: transformers' Llama with SSA attention (docs/ssa.md rules 5 and 9).

Everything but the attention core is transformers' Llama (embeddings, RMSNorm, SwiGLU MLP, rotary embedding,
decoder layer, LM head). :class:`SSALlamaAttention` keeps Llama's q/k/v/o projections and RoPE, adds the gate
``g_proj`` (hidden → one logit per query head, no bias; the sigmoid is applied inside ``ssa_attention``), and
hands ``[s, b, h, d]`` views of q/k/v to :func:`ssa_megatron.ssa.ssa_attention` — the one definition of SSA's
selection and attention — with ``training=False`` and the configured mode and budget.

KV cache: supported in both modes. New queries sit at the last positions of the cached key sequence
(``q_positions`` default), so a decoded token selects among the complete blocks of everything cached before it,
exactly as in a full-sequence forward. One new token per row on the SSA cache layers (``decoding.py``; what
``generate()`` makes, dynamic or static) scores the pooled block keys kept in the cache and attends to the
selected blocks only; a static cache's step compiles into one graph (CUDA graphs). Padding (an ``attention_mask``
with zeros) is not supported: SSA's block grid is defined on unpadded rows; batch equal-length rows or run one row
at a time.

Remote code: this file, ``configuration.py``, ``decoding.py`` and the package's ``ssa/reference.py`` are copied
into every gated export (``ssa_megatron.hf.export``), where ``trust_remote_code=True`` loads them with only torch
and transformers installed. There (``IN_PACKAGE`` false) ``ssa_megatron`` is never imported and the attention core
is :func:`_exported_attention`: the inference branch of ``ssa_attention`` (``training=False``: select, attend,
gate) calling the copied reference, the same functions ``ssa_attention`` calls on CPU. The Triton kernels and
the attention statistics (``collect_attention_metrics``) need the package.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    apply_rotary_pos_emb,
)

from .configuration import IN_PACKAGE, MODES, SSALlamaConfig
from .decoding import decode_attention, valid_keys

if IN_PACKAGE:  # importlib, not an import statement, which transformers' remote-code check would demand
    ssa_attention = importlib.import_module("ssa_megatron.ssa").ssa_attention
    apply_gate = importlib.import_module("ssa_megatron.ssa.reference").apply_gate
else:  # an export folder: ssa_megatron/ssa/reference.py is copied beside this file
    from .reference import apply_gate, full_attention, select_blocks, sparse_attention


def _exported_attention(q, k, v, gate, config: SSALlamaConfig, cu_seqlens, softmax_scale):
    """``ssa_attention(q, k, v, gate, config.ssa_config(), config.ssa_mode, training=False)`` on the reference,
    for export folders. q ``[sq, b, HQ, D]``, k/v ``[skv, b, HKV, D]``, gate ``[sq, b, HQ]`` logits or None."""
    docs = cu_seqlens if config.ssa_document_mask else None
    if config.ssa_mode == "full":
        out, _ = full_attention(q, k, v, docs, None, softmax_scale)
    else:
        idx, _ = select_blocks(q, k, config.ssa_block_size, config.ssa_top_k, config.ssa_score,
                               config.ssa_sink_blocks, config.ssa_local_blocks, docs, None, softmax_scale,
                               selection=config.ssa_selection, normaliser=config.ssa_normaliser)
        out, _ = sparse_attention(q, k, v, idx, config.ssa_block_size, None, softmax_scale,
                                  starts_on_grid=docs is None)
    return apply_gate(out, gate)


class SSALlamaAttention(LlamaAttention):
    """Llama attention whose core is ``ssa_attention``. Input/output ``[b, s, hidden]``."""

    def __init__(self, config: SSALlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.g_proj = (nn.Linear(config.hidden_size, config.num_attention_heads, bias=False)
                       if config.ssa_gate == "per_head" else None)
        self.collect_metrics = False
        """When True, each forward stores ``reference.attention_metrics`` (per query head) in ``last_metrics``."""
        self.last_metrics: dict[str, torch.Tensor] | None = None
        self.ssa_training = None
        """``(SSAConfig, mode)`` set by ``ssa_megatron.hf.finetune`` for each micro-batch: forwards in train mode
        then run ``ssa_attention(..., training=True)`` with it (both branches when alpha > 0) and keep the layer's
        unweighted alignment loss in ``alignment_loss``. Package only."""
        self.alignment_loss: torch.Tensor | None = None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, cu_seqlens=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        b, s = hidden_states.shape[:2]
        shape = (b, s, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # [b, HQ, s, D]
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # [b, HKV, s, D]
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        gate = self.g_proj(hidden_states).transpose(0, 1) if self.g_proj is not None else None  # [s, b, HQ]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, ssa_block_size=self.config.ssa_block_size)
            layer = cache.layers[self.layer_idx]
            if cu_seqlens is None and not self.collect_metrics:  # one new token: the cache's pooled keys (decoding.py)
                out = decode_attention(q, layer, self.config, self.scaling)
                if out is not None:
                    out = apply_gate(out.permute(2, 0, 1, 3), gate)  # [1, b, HQ, D]
                    return self.o_proj(out.permute(1, 0, 2, 3).reshape(b, s, -1)), None
            k, v = valid_keys(layer, k, v)
            if cu_seqlens is not None and k.shape[2] != s:
                raise ValueError("SSALlamaAttention: cu_seqlens (document masking) cannot be combined with a "
                                 "KV cache holding earlier tokens")

        q, k, v = (t.permute(2, 0, 1, 3) for t in (q, k, v))  # [b, h, s, D] -> [s, b, h, D]
        if IN_PACKAGE:
            train = self.training and self.ssa_training is not None
            cfg, mode = self.ssa_training if train else (self.config.ssa_config(), self.config.ssa_mode)
            out, loss, stats = ssa_attention(q, k, v, gate, cfg, mode, train, cu_seqlens=cu_seqlens,
                                             softmax_scale=self.scaling, with_metrics=self.collect_metrics)
            self.last_metrics = stats.metrics
            self.alignment_loss = loss if train else None
        else:
            if self.collect_metrics:
                raise ValueError("collect_attention_metrics needs the ssa_megatron package (import ssa_megatron.hf "
                                 "and load without trust_remote_code)")
            out = _exported_attention(q, k, v, gate, self.config, cu_seqlens, self.scaling)
        out = out.permute(1, 0, 2, 3).reshape(b, s, -1)  # [s, b, HQ, D] -> [b, s, HQ·D]
        return self.o_proj(out), None


class SSALlamaPreTrainedModel(LlamaPreTrainedModel):
    config: SSALlamaConfig
    config_class = SSALlamaConfig
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = False


class SSALlamaModel(SSALlamaPreTrainedModel, LlamaModel):
    """``LlamaModel`` whose decoder layers use :class:`SSALlamaAttention`."""

    def __init__(self, config: SSALlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.self_attn = SSALlamaAttention(config, i)
        self.post_init()


class SSALlamaForCausalLM(SSALlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM with SSA attention; ``set_attention_mode`` switches full/sparse and the budget in place."""

    def __init__(self, config: SSALlamaConfig):
        SSALlamaPreTrainedModel.__init__(self, config)
        self.model = SSALlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        # Not inside a compiled decode step (generate() compiles them on CUDA): reading the mask there would be a
        # host synchronisation and a graph break; the uncompiled prefill has checked the prompt's mask.
        if (attention_mask is not None and attention_mask.dim() == 2 and not torch.compiler.is_compiling()
                and not bool(attention_mask.all())):
            raise ValueError("SSALlamaForCausalLM: attention_mask has padded (zero) positions; SSA has no padding "
                             "support (its block grid starts at each row's first token). Use equal-length rows.")
        return super().forward(input_ids, attention_mask, *args, **kwargs)

    def set_attention_mode(self, mode: str, top_k: int | None = None, block_size: int | None = None) -> None:
        """Switches inference to ``mode`` ('full' or 'sparse'), optionally with a new budget / block size."""
        if mode not in MODES:
            raise ValueError(f"set_attention_mode(mode={mode!r}): must be one of {', '.join(map(repr, MODES))}")
        old = (self.config.ssa_mode, self.config.ssa_top_k, self.config.ssa_block_size)
        self.config.ssa_mode = mode
        if top_k is not None:
            self.config.ssa_top_k = int(top_k)
        if block_size is not None:
            self.config.ssa_block_size = int(block_size)
        try:
            if IN_PACKAGE:
                self.config.ssa_config().validate("set_attention_mode")
            else:  # an export folder has no SSAConfig: the reference checks the budget when it runs
                self.config.validate_architecture()
        except ValueError:
            self.config.ssa_mode, self.config.ssa_top_k, self.config.ssa_block_size = old
            raise

    def ssa_attention_modules(self) -> list[SSALlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def collect_attention_metrics(self, enabled: bool = True) -> None:
        """Makes every layer store per-head attention statistics of its next forward in ``last_metrics``."""
        for attn in self.ssa_attention_modules():
            attn.collect_metrics = enabled
            attn.last_metrics = None


def register() -> None:
    """Registers ``ssa_llama`` with the Auto classes (idempotent)."""
    AutoConfig.register("ssa_llama", SSALlamaConfig, exist_ok=True)
    AutoModel.register(SSALlamaConfig, SSALlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(SSALlamaConfig, SSALlamaForCausalLM, exist_ok=True)
