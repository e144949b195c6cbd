"""SSA inside Megatron's attention: the gate, the core attention, and the layer that tells it the micro-batch.

- :class:`SSASelfAttention` is Megatron's ``SelfAttention`` (QKV GEMM, GQA split, RoPE, TP/SP, ``linear_proj``)
  plus one TP-split linear, ``linear_gate`` (hidden → one logit per query head, column-parallel so each TP rank gets
  the logits of its own heads). It computes the gate from the layer's normalized input and hands the logits to the
  core attention through the ``attention_bias`` argument that Megatron threads from ``SelfAttention.forward`` to the
  core attention (SSA has no other attention bias), and as a checkpoint input under selective recompute.
- :class:`SSACoreAttention` follows Megatron's core-attention contract (q ``[sq, b, heads/rank, d]``, k/v
  ``[skv, b, groups/rank, d]``, output ``[sq, b, heads/rank·d]``) and calls ``ssa_attention`` — the one
  definition of the SSA math. It adds what is Megatron-specific: the mode of the micro-batch, context parallelism,
  document masks from ``packed_seq_params``, the alignment loss's auto-scaler and the metrics tracker.
- :class:`SSATransformerLayer` is Megatron's ``TransformerLayer`` whose ``current_microbatch`` (set by the
  schedules) is forwarded to its core attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from ssa_megatron.config import SSAConfig
from ssa_megatron.megatron import mode as mode_lib
from ssa_megatron.megatron.context_parallel import gather_kv_zigzag, zigzag_positions
from ssa_megatron.megatron.loss import AlignmentLossScaler, alignment_loss_weight
from ssa_megatron.megatron.tracker import get_ssa_tracker
from ssa_megatron.ssa import ssa_attention

CP_COMM_TYPES = ("all_gather", "allgather")


def document_packed_seq_params(cu_seqlens: Tensor, seq_length: int) -> PackedSeqParams:
    """``PackedSeqParams`` carrying document boundaries to ``SSACoreAttention`` (``ssa.document_mask``).

    Batches stay in ``sbhd`` layout; ``cu_seqlens`` marks document starts over the flattened ``b·S`` stream of the
    whole (not CP-split) sequence. ``max_seqlen`` is the row length ``S``: GPTModel sizes its RoPE table from it.
    """
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=seq_length, max_seqlen_kv=seq_length)


def check_tp_heads(num_query_groups: int, num_attention_heads: int, tp_size: int) -> None:
    """Selection is per KV head and stays rank-local only if every TP rank holds whole KV groups."""
    if num_query_groups % tp_size or num_attention_heads % tp_size:
        raise ValueError(
            f"SSA with tensor parallelism: num_query_groups={num_query_groups} (KV heads) and "
            f"num_attention_heads={num_attention_heads} must both be divisible by tensor_model_parallel_size="
            f"{tp_size}; selection is per KV head and must stay rank-local (use a TP size that divides the KV heads)"
        )


class SSACoreAttention(MegatronModule):
    """Megatron core attention running SSA (``ssa_attention``) for this rank's heads.

    Constructor kwargs are Megatron's core-attention builder contract plus ``ssa`` (the SSA semantics).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        ssa: SSAConfig,
    ) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"SSACoreAttention supports self-attention only, got attention_type={attention_type!r}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) not in (0, 0.0):
            raise ValueError(
                f"SSA has no attention dropout: set attention_dropout=0 (got {config.attention_dropout})"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_size = pg_collection.tp.size()
        self.cp_group = pg_collection.cp
        self.cp_size = pg_collection.cp.size()
        if self.cp_size > 1:
            comm = cp_comm_type if cp_comm_type is not None else config.cp_comm_type
            if isinstance(comm, (list, tuple)):
                comm = comm[layer_number - 1]
            if comm == "a2a":
                raise NotImplementedError(
                    "SSA context parallelism: cp_comm_type='a2a' is not implemented; use 'all_gather'"
                )
            if comm not in CP_COMM_TYPES:
                raise ValueError(
                    f"SSA context parallelism: cp_comm_type={comm!r} is not supported; use 'all_gather' "
                    f"(K/V are all-gathered over the CP group; 'p2p' and 'a2a+p2p' need Transformer Engine)"
                )
        self.ssa = ssa
        self.layer_number = layer_number
        self.num_layers = config.num_layers
        self.softmax_scale = softmax_scale
        self.per_token_loss = bool(getattr(config, "calculate_per_token_loss", False))
        self.microbatch = 0
        """Index of the micro-batch in the current iteration; set through ``SSATransformerLayer``."""
        self.model_chunk = 0
        self._recompute_modes = mode_lib.RecomputeModes()

    # ------------------------------------------------------------------------------------------------------------
    def _resolve_mode(self) -> str:
        sampler = mode_lib.MODE_SAMPLER
        if sampler.forced is not None:
            return sampler.forced
        if not self.training:
            return self.ssa.inference_mode
        if mode_lib.is_recomputing():
            return self._recompute_modes.pop()
        mode = sampler.mode_for(self.microbatch, self.ssa.p_full)
        if mode_lib.in_checkpointed_forward():
            self._recompute_modes.push(mode, sampler.iteration)
        return mode

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        gate_logits: Tensor | None = None,
    ) -> Tensor:
        """q ``[sq, b, np, hn]``, k/v ``[skv, b, ng, hn]`` → ``[sq, b, np·hn]``.

        ``attention_bias`` / ``gate_logits``: the gate logits ``[sq, b, np]`` from ``SSASelfAttention`` (or None).
        ``attention_mask`` is not used: SSA is causal by definition, documents come from ``packed_seq_params``
        (``qkv_format='sbhd'``, ``cu_seqlens_kv`` over the flattened ``b·S`` stream of the *whole* sequence).
        """
        gate = gate_logits if gate_logits is not None else attention_bias
        cu_seqlens = None
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format == "thd":
                raise NotImplementedError(
                    "SSA: packed_seq_params.qkv_format='thd' is not supported; pass qkv_format='sbhd' with "
                    "cu_seqlens_kv marking document starts over the flattened b·S token stream"
                )
            cu_seqlens = packed_seq_params.cu_seqlens_kv
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q

        mode = self._resolve_mode()
        recomputing = mode_lib.is_recomputing()
        tracker = get_ssa_tracker()
        with_metrics = bool(self.training and tracker.collect_metrics and not recomputing)

        q_positions = None
        if self.cp_size > 1:
            q_positions = zigzag_positions(query.shape[0], self.cp_size, self.cp_group.rank(), query.device)
            key, value = gather_kv_zigzag(key, value, self.cp_group)

        out, loss, stats = ssa_attention(
            query, key, value, gate, self.ssa, mode, self.training,
            cu_seqlens=cu_seqlens, q_positions=q_positions, softmax_scale=self.softmax_scale,
            with_metrics=with_metrics,
        )
        sq, b = out.shape[0], out.shape[1]
        if self.training and self.ssa.alpha > 0 and torch.is_grad_enabled() and loss.requires_grad:
            weight = alignment_loss_weight(
                self.ssa.alpha, self.num_layers, self.tp_size, self.cp_size, self.per_token_loss, sq * b
            )
            out = AlignmentLossScaler.apply(out, loss * weight)

        mode_lib.MODE_SAMPLER.last_mode = mode
        if self.training and not recomputing:
            tracker.record_mode(self.microbatch, mode, self.model_chunk)
            mode_lib.MODE_SAMPLER.modes_this_iteration[self.microbatch] = mode
            if stats.sparsity_loss is not None:
                tracker.record("alignment_loss", self.layer_number, self.num_layers, loss.detach())
                tracker.record("sparsity_loss", self.layer_number, self.num_layers, stats.sparsity_loss)
                tracker.record("commitment_loss", self.layer_number, self.num_layers, stats.commitment_loss)
            if stats.metrics is not None:
                for name, per_head in stats.metrics.items():
                    tracker.record(f"attn_{name}", self.layer_number, self.num_layers, per_head.float().mean())
        return out.reshape(sq, b, -1)


@dataclass
class SSASelfAttentionSubmodules(SelfAttentionSubmodules):
    """Megatron's self-attention submodules plus the gate projection (None: no gate)."""

    linear_gate: Any = None


class SSASelfAttention(SelfAttention):
    """``SelfAttention`` with SSA's per-head sigmoid gate computed from the layer's normalized input."""

    def __init__(self, config: TransformerConfig, submodules: SSASelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: str | None = None,
                 pg_collection: ProcessGroupCollection | None = None, **kwargs) -> None:
        tp_size = pg_collection.tp.size() if pg_collection is not None else _mpu_tp_size()
        check_tp_heads(config.num_query_groups or config.num_attention_heads, config.num_attention_heads, tp_size)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                         **kwargs)
        self.linear_gate = None
        if getattr(submodules, "linear_gate", None) is not None:
            self.linear_gate = build_module(
                submodules.linear_gate,
                config.hidden_size,
                config.num_attention_heads,
                config=config,
                init_method=config.init_method,
                gather_output=False,
                bias=False,
                skip_bias_add=False,
                is_expert=False,
                tp_comm_buffer_name="gate",
                tp_group=self.pg_collection.tp,
            )

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, *args, attention_bias: Tensor | None = None,
                **kwargs):
        if attention_bias is not None:
            raise ValueError("SSASelfAttention: attention_bias is not supported (its slot carries the SSA gate)")
        gate = None
        if self.linear_gate is not None:
            gate, _ = self.linear_gate(hidden_states)  # [sq, b, np]
        return super().forward(hidden_states, attention_mask, *args, attention_bias=gate, **kwargs)

    def _checkpointed_attention_forward(self, query, key, value, attention_mask, rotary_pos_emb=None,
                                        attn_mask_type=None, attention_bias=None, packed_seq_params=None,
                                        core_attention_extra_kwargs=None):
        # Pass the gate as a checkpoint input (a detached tensor on recompute), not through the closure.
        extra = dict(core_attention_extra_kwargs or {})
        if attention_bias is not None:
            extra["gate_logits"] = attention_bias
        return super()._checkpointed_attention_forward(
            query, key, value, attention_mask, rotary_pos_emb=rotary_pos_emb, attn_mask_type=attn_mask_type,
            attention_bias=None, packed_seq_params=packed_seq_params, core_attention_extra_kwargs=extra,
        )


def _mpu_tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


class SSATransformerLayer(TransformerLayer):
    """``TransformerLayer`` that forwards ``current_microbatch`` (set by Megatron's schedules before every
    micro-batch forward) to its SSA core attention, which derives the micro-batch's mode from it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        core = self._ssa_core()
        if core is not None:
            core.model_chunk = 0 if getattr(self, "vp_stage", None) is None else int(self.vp_stage)

    def _ssa_core(self) -> SSACoreAttention | None:
        attn = self._modules.get("self_attention")
        core = getattr(attn, "core_attention", None) if attn is not None else None
        return core if isinstance(core, SSACoreAttention) else None

    @property
    def current_microbatch(self) -> int:
        return self.__dict__.get("_ssa_current_microbatch", 0)

    @current_microbatch.setter
    def current_microbatch(self, value: int) -> None:
        self.__dict__["_ssa_current_microbatch"] = value
        core = self._ssa_core()
        if core is not None:
            core.microbatch = int(value)
