"""SSA inside Megatron's attention: the gate, the core attention, and the layer that tells it the micro-batch.

- :class:`SSASelfAttention` is Megatron's ``SelfAttention`` (QKV GEMM, GQA split, RoPE, TP/SP, ``linear_proj``)
  plus one TP-split linear, ``linear_gate`` (hidden → one logit per query head, column-parallel so each TP rank gets
  the logits of its own heads). It computes the gate from the layer's normalized input and hands the logits to the
  core attention through the ``attention_mask`` argument, which Megatron threads from ``SelfAttention.forward`` to
  the core attention (SSA needs no mask), and as a checkpoint input under selective recompute.
- :class:`SSACoreAttention` follows Megatron's core-attention contract (q ``[sq, b, heads/rank, d]``, k/v
  ``[skv, b, groups/rank, d]``, output ``[sq, b, heads/rank·d]``) and calls ``ssa_attention`` — the one
  definition of the SSA math. It adds what is Megatron-specific: the mode of the micro-batch, context parallelism,
  document masks from ``packed_seq_params``, the alignment loss's auto-scaler and the metrics tracker.
- :class:`SSATransformerLayer` is Megatron's ``TransformerLayer`` that hands its ``current_microbatch`` (set by the
  schedules) to its core attention before each forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

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
from ssa_megatron.megatron.context_parallel import check_cp_comm_type, start_kv_gather
from ssa_megatron.megatron.loss import alignment_loss_weight, attach_alignment_loss
from ssa_megatron.megatron.mode import LayerMode, RecomputeReplay, in_checkpointed_forward, is_recomputing
from ssa_megatron.megatron.rope import compiled_rope
from ssa_megatron.megatron.tracker import get_ssa_tracker
from ssa_megatron.ssa import ssa_attention


def document_packed_seq_params(cu_seqlens: Tensor, seq_length: int) -> PackedSeqParams:
    """``PackedSeqParams`` carrying document boundaries to ``SSACoreAttention`` (``ssa.document_mask``).

    Batches stay in ``sbhd`` layout; ``cu_seqlens`` marks document starts over the flattened ``b·S`` stream of the
    whole (not CP-split) sequence. ``max_seqlen`` is the row length ``S``: GPTModel sizes its RoPE table from it.
    """
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=seq_length, max_seqlen_kv=seq_length)


def document_boundaries(packed_seq_params: PackedSeqParams | None) -> Tensor | None:
    """The ``cu_seqlens`` that ``document_packed_seq_params`` packed (None: no documents)."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.qkv_format == "thd":
        raise NotImplementedError(
            "SSA: packed_seq_params.qkv_format='thd' is not supported; pass qkv_format='sbhd' with "
            "cu_seqlens_kv marking document starts over the flattened b·S token stream"
        )
    if packed_seq_params.cu_seqlens_kv is not None:
        return packed_seq_params.cu_seqlens_kv
    return packed_seq_params.cu_seqlens_q


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

    Constructor kwargs are Megatron's core-attention builder contract plus ``ssa`` (the SSA semantics). The forward
    is the SSA call with the Megatron-specific steps around it, each in its own file: the mode
    (:class:`~ssa_megatron.megatron.mode.LayerMode`), the CP exchange (``context_parallel``), the alignment loss's
    weight and attachment (``loss``) and the metrics (``tracker``).
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
            check_cp_comm_type(cp_comm_type if cp_comm_type is not None else config.cp_comm_type, layer_number)
        self.ssa = ssa
        self.layer_number = layer_number
        self.num_layers = config.num_layers
        self.softmax_scale = softmax_scale
        self.per_token_loss = bool(getattr(config, "calculate_per_token_loss", False))
        self.mode = LayerMode(ssa.p_full, ssa.inference_mode,
                              layer=layer_number if ssa.mode_sampling == "per_layer" else None)
        self.microbatch = 0
        """Index of the micro-batch in the current iteration; set by ``SSATransformerLayer`` before each forward."""
        self._recompute_selection = RecomputeReplay("selection")
        self.model_chunk = 0

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        gate_logits: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """q ``[sq, b, np, hn]``, k/v ``[skv, b, ng, hn]`` → ``[sq, b, np·hn]``.

        ``gate_logits``: ``[sq, b, np]`` from ``SSASelfAttention``, in the slot where Megatron passes the attention
        mask (SSA needs none: it is causal by definition, and documents come from ``packed_seq_params``).
        ``packed_seq_params``: ``qkv_format='sbhd'``, ``cu_seqlens_kv`` over the flattened ``b·S`` stream of the
        *whole* sequence (``document_packed_seq_params``).
        """
        if attention_bias is not None:
            raise ValueError("SSACoreAttention: attention_bias is not supported (SSA has no attention bias)")
        cu_seqlens = document_boundaries(packed_seq_params)
        mode = self.mode.choose(self.training, self.microbatch)
        tracker = get_ssa_tracker()
        training_forward = self.training and not is_recomputing()  # recompute forwards record nothing

        # Context parallelism: the K/V all-gather runs while ssa_attention does the work on this rank's own K/V.
        gather = start_kv_gather(query, key, value, self.cp_group)  # None with one CP rank
        # Under activation recompute the recompute gets the same q and k, hence the same selection: it reuses the
        # table of its checkpointed forward instead of selecting again.
        replaying = self.training and is_recomputing()
        out, loss, stats = ssa_attention(
            query, key, value, gate_logits, self.ssa, mode, self.training,
            cu_seqlens=cu_seqlens, softmax_scale=self.softmax_scale,
            with_metrics=training_forward and tracker.collect_metrics,
            block_idx=self._recompute_selection.pop() if replaying else None,
            q_positions=gather.q_positions if gather else None, gathered_kv=gather.wait if gather else None,
        )
        if self.training and in_checkpointed_forward():
            self._recompute_selection.push(stats.block_idx, self.mode.sampler.iteration)
        sq, b = out.shape[0], out.shape[1]
        if self.training and self.ssa.alpha > 0:
            weight = alignment_loss_weight(
                self.ssa.alpha, self.num_layers, self.tp_size, self.cp_size, self.per_token_loss, sq * b
            )
            out = attach_alignment_loss(out, loss, weight)

        self.mode.record(mode, self.microbatch, training_forward)
        if training_forward:
            tracker.record_mode(self.microbatch, mode, self.model_chunk)
            tracker.record_layer(self.layer_number, self.num_layers, loss, stats)
        return out.reshape(sq, b, -1)


@dataclass
class SSASelfAttentionSubmodules(SelfAttentionSubmodules):
    """Megatron's self-attention submodules plus the gate projection (None: no gate)."""

    linear_gate: Any = None


class SSASelfAttention(SelfAttention):
    """``SelfAttention`` with SSA's per-head sigmoid gate computed from the layer's normalized input.

    The gate logits travel to the core attention in the ``attention_mask`` argument, which ``Attention.forward``
    passes on unchanged and, under selective recompute, as a checkpoint input (so the recompute reads a detached
    copy rather than reaching back into this forward's graph). ``compiled_rope`` (a spec param): run Megatron's
    unfused RoPE compiled (``ssa_megatron.megatron.rope``). ``gates_per_head`` (a spec param): logits per query head,
    1 for SSA, 3 for the NSA baseline (``ssa_megatron.megatron.nsa``), laid out head by head so that the
    column-parallel split keeps each head's logits on its rank.
    """

    def __init__(self, config: TransformerConfig, submodules: SSASelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: str | None = None,
                 pg_collection: ProcessGroupCollection | None = None, *, compiled_rope: bool = False,
                 gates_per_head: int = 1, **kwargs) -> None:
        tp_size = pg_collection.tp.size() if pg_collection is not None else _mpu_tp_size()
        check_tp_heads(config.num_query_groups or config.num_attention_heads, config.num_attention_heads, tp_size)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                         **kwargs)
        self.compiled_rope = compiled_rope
        self.linear_gate = None
        if getattr(submodules, "linear_gate", None) is not None:
            self.linear_gate = build_module(
                submodules.linear_gate,
                config.hidden_size,
                config.num_attention_heads * gates_per_head,
                config=config,
                init_method=config.init_method,
                gather_output=False,
                bias=False,
                skip_bias_add=False,
                is_expert=False,
                tp_comm_buffer_name="gate",
                tp_group=self.pg_collection.tp,
            )

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs):
        """``attention_mask`` is not used (see ``SSACoreAttention.forward``); its slot carries the gate logits."""
        gate = None
        if self.linear_gate is not None:
            gate, _ = self.linear_gate(hidden_states)  # [sq, b, np]
        with compiled_rope() if self.compiled_rope else contextlib.nullcontext():
            return super().forward(hidden_states, gate, *args, **kwargs)


def _mpu_tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


class SSATransformerLayer(TransformerLayer):
    """``TransformerLayer`` that hands ``current_microbatch`` (set by Megatron's schedules on every layer before each
    micro-batch forward, ``set_current_microbatch``) to its SSA core attention, which derives the mode from it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        core = self._ssa_core()
        if core is not None:
            core.model_chunk = 0 if getattr(self, "vp_stage", None) is None else int(self.vp_stage)

    def _ssa_core(self) -> SSACoreAttention | None:
        core = getattr(self.self_attention, "core_attention", None)
        return core if isinstance(core, SSACoreAttention) else None

    def forward(self, *args, **kwargs):
        core = self._ssa_core()
        if core is not None:
            core.microbatch = int(getattr(self, "current_microbatch", 0))
        return super().forward(*args, **kwargs)
