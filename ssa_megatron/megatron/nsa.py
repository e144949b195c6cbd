"""The NSA baseline's core attention (``model.attention: nsa``): fla-core's native sparse attention in Megatron's
core-attention slot, so NSA trains through the same layers, loop and checkpoints as SSA, full attention and MoBA.

NSA (Yuan et al. 2025) sums three branches, each scaled per query head by a sigmoid gate computed from the layer's
normalized input (``SSASelfAttention.linear_gate`` with three logits per head: compressed, selected, window):

- compressed: attention over the mean-pooled ``block_size`` blocks that are complete before the query;
- selected: attention over the ``block_counts`` blocks of ``block_size`` tokens ranked highest by the compressed
  attention (summed over the query group), the first, own and previous block always among them;
- window: causal attention over the last ``window_size`` tokens.

On CUDA the compressed and selected branches are fla-core's kernels (``fla.ops.nsa.parallel_nsa``; the ``nsa``
extra, ``pip install -e ".[nsa]"``). The window branch is computed here (:func:`sliding_window_attention`), because
fla's needs flash-attn: flash-attn when it is installed, else PyTorch's SDPA with a banded mask. Without CUDA
(tests) the compressed and selected branches are fla's naive reference functions (fla's mean pooling is a Triton
kernel that needs a GPU, so blocks are pooled here). fla's kernels need ``num_attention_heads / num_query_groups``
a power of two >= 16; ``RecipeConfig.validate`` says so in one line before anything is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from ssa_megatron.config import NSAConfig
from ssa_megatron.megatron.attention import document_boundaries

NSA_EXTRA = 'pip install -e ".[nsa]"  (fla-core==0.6.0)'
GATES = 3
"""Gate logits per query head: compressed, selected, window (in that order, as fla's g_cmp, g_slc, g_swa)."""


def fla_nsa():
    """fla-core's ``fla.ops.nsa`` module, or one ValueError line naming the extra."""
    try:
        import fla.ops.nsa as nsa  # noqa: F401
        from fla.ops.nsa import naive, parallel  # noqa: F401
    except ImportError as err:
        raise ValueError(f"model.attention=nsa needs fla-core: {NSA_EXTRA} ({err})") from None
    return nsa


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                             cu_seqlens: Tensor | None = None) -> Tensor:
    """Causal attention of each query over itself and the ``window - 1`` tokens before it (within its document).

    q ``[B, T, HQ, D]``, k/v ``[B, T, HKV, D]`` (GQA: query head h reads KV head ``h // (HQ/HKV)``) →
    ``[B, T, HQ, D]``. ``cu_seqlens`` (int, ``[n + 1]``): document boundaries over the flattened ``B·T`` stream.
    """
    B, T, HQ, D = q.shape
    group = HQ // k.shape[2]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None:
            if cu_seqlens is None:
                return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=(window - 1, 0))
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            out = flash_attn_varlen_func(q.reshape(B * T, HQ, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                         cu, cu, T, T, softmax_scale=scale, causal=True, window_size=(window - 1, 0))
            return out.view(B, T, HQ, D)
    pos = torch.arange(T, device=q.device)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)  # [Tq, Tk]
    allowed = allowed.expand(B, T, T)
    if cu_seqlens is not None:  # same document only: document id of every token of the flattened stream
        flat = torch.arange(B * T, device=q.device)
        doc = (torch.searchsorted(cu_seqlens.to(q.device).long(), flat, right=True) - 1).view(B, T)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed[:, None], scale=scale)
    return out.transpose(1, 2)


def _mean_pool(x: Tensor, block_size: int) -> Tensor:
    """``[B, T, H, D]`` → ``[B, ceil(T/block_size), H, D]``: the mean of each block (a partial last block over its
    tokens), as fla's ``mean_pooling``."""
    B, T, H, D = x.shape
    n = -(-T // block_size)
    padded = F.pad(x, (0, 0, 0, 0, 0, n * block_size - T)).view(B, n, block_size, H, D)
    counts = torch.clamp(T - torch.arange(n, device=x.device) * block_size, max=block_size).to(x.dtype)
    return padded.sum(2) / counts.view(1, n, 1, 1)


def nsa_reference(q: Tensor, k: Tensor, v: Tensor, g_cmp: Tensor, g_slc: Tensor, block_size: int, block_counts: int,
                  scale: float) -> Tensor:
    """Compressed + selected branches, gated, through fla's naive functions (rows of one document each):
    q ``[B, T, HQ, D]``, k/v ``[B, T, HKV, D]``, gates ``[B, T, HQ]`` → ``[B, T, HQ, D]``."""
    naive = fla_nsa().naive
    k_cmp, v_cmp = _mean_pool(k, block_size), _mean_pool(v, block_size)
    o_cmp, _ = naive.naive_nsa_compression(q, k_cmp, v_cmp, block_size, scale)
    indices = naive.naive_nsa_topk(q, k_cmp, block_counts, block_size, scale)
    o_slc = naive.naive_nsa_selection(q, k, v, indices, block_size, scale)
    return o_slc * g_slc.unsqueeze(-1) + o_cmp * g_cmp.unsqueeze(-1)


class NSACoreAttention(MegatronModule):
    """Megatron core attention running NSA for this rank's heads (constructor: Megatron's core-attention contract
    plus ``nsa``). The gate logits arrive in the attention-mask slot, as for SSA (``SSASelfAttention``)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, *, nsa: NSAConfig) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"NSACoreAttention supports self-attention only, got attention_type={attention_type!r}")
        if config.context_parallel_size > 1:
            raise ValueError("model.attention=nsa: the NSA baseline runs without context parallelism")
        self.nsa = nsa
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale

    def forward(self, query: Tensor, key: Tensor, value: Tensor, gate_logits: Tensor,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> Tensor:
        """q ``[s, b, np, hn]``, k/v ``[s, b, ng, hn]``, gate_logits ``[s, b, 3·np]`` → ``[s, b, np·hn]``."""
        if attention_bias is not None:
            raise ValueError("NSACoreAttention: attention_bias is not supported")
        s, b, heads, dim = query.shape
        scale = self.softmax_scale if self.softmax_scale is not None else dim ** -0.5
        q, k, v = (t.transpose(0, 1).contiguous() for t in (query, key, value))  # [b, s, h, d]
        gates = torch.sigmoid(gate_logits.float()).to(q.dtype).view(s, b, heads, GATES).transpose(0, 1)
        g_cmp, g_slc, g_swa = gates.unbind(-1)  # [b, s, np] each
        cu_seqlens = document_boundaries(packed_seq_params)
        nsa = self.nsa
        if q.is_cuda:
            # fla takes documents as one flattened row with cu_seqlens (batch 1).
            flat = (lambda t: t.reshape(1, b * s, *t.shape[2:])) if cu_seqlens is not None else (lambda t: t)
            out = fla_nsa().parallel_nsa(
                flat(q), flat(k), flat(v), g_cmp=flat(g_cmp), g_slc=flat(g_slc), g_swa=None,
                block_counts=nsa.block_counts, block_size=nsa.block_size, window_size=0, scale=scale,
                cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(q.device, torch.int32)).view(b, s, heads, dim)
        else:
            if cu_seqlens is not None:
                raise ValueError("model.attention=nsa with ssa.document_mask runs on CUDA only (fla's naive functions "
                                 "take one document per row)")
            out = nsa_reference(q, k, v, g_cmp, g_slc, nsa.block_size, nsa.block_counts, scale)
        if nsa.window_size > 0:
            out = out + sliding_window_attention(q, k, v, nsa.window_size, scale, cu_seqlens) * g_swa.unsqueeze(-1)
        return out.transpose(0, 1).reshape(s, b, heads * dim)
