"""Context parallelism for SSA: all-gather K/V over the CP group, attend from local queries at global positions.

Input layout (Megatron's load balancing, ``megatron.core.utils.get_batch_on_this_cp_rank``): the sequence of
length ``S`` is cut into ``2·cp`` chunks of ``C = S / (2·cp)`` tokens and CP rank ``r`` holds chunks ``r`` and
``2·cp-1-r``, concatenated (``2C`` local tokens). RoPE is already applied with global positions (GPTModel's rotary
table is sliced the same way), so gathered keys are usable as they are.

:func:`gather_sequence_zigzag` all-gathers a ``[2C, ...]`` tensor from every rank and restores the natural order
``[S, ...]``; its backward takes the gradient back to rank order and reduce-scatters it (sums the contributions of
all ranks' queries to each rank's own keys/values). :func:`zigzag_positions` gives the global positions of the
local queries, which ``ssa_attention`` uses as ``q_positions`` in both branches (causality, own block, selection).
Block keys for selection are pooled from the gathered keys, so selection sees every earlier block.
:func:`gather_kv_for_local_queries` is the whole exchange as the core attention uses it.

Only this all-gather exchange exists (Megatron's ``cp_comm_type='all_gather'``; :func:`check_cp_comm_type`).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

CP_COMM_TYPES = ("all_gather", "allgather")


def check_cp_comm_type(cp_comm_type: str | list[str] | None, layer_number: int) -> None:
    """Raises unless Megatron's ``cp_comm_type`` (one value, or one per layer) is the all-gather this file does."""
    comm = cp_comm_type
    if isinstance(comm, (list, tuple)):
        comm = comm[layer_number - 1]
    if comm == "a2a":
        raise NotImplementedError("SSA context parallelism: cp_comm_type='a2a' is not implemented; use 'all_gather'")
    if comm not in CP_COMM_TYPES:
        raise ValueError(
            f"SSA context parallelism: cp_comm_type={comm!r} is not supported; use 'all_gather' "
            f"(K/V are all-gathered over the CP group; 'p2p' and 'a2a+p2p' need Transformer Engine)"
        )


def zigzag_positions(local_len: int, cp_size: int, cp_rank: int, device: torch.device | str = "cpu") -> Tensor:
    """Global positions ``[2C]`` of CP rank ``cp_rank``'s tokens (chunks ``r`` and ``2·cp-1-r``).

    Memoised: every layer gets the same (read-only) tensor, so the kernels plan their varlen packing once rather
    than at every layer (ssa_kernels.full).
    """
    if local_len % 2:
        raise ValueError(f"context parallel: the local sequence length {local_len} must be even (two chunks)")
    return _zigzag_positions(local_len, cp_size, cp_rank, str(torch.device(device)))


@functools.lru_cache(maxsize=16)
def _zigzag_positions(local_len: int, cp_size: int, cp_rank: int, device: str) -> Tensor:
    c = local_len // 2
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def zigzag_gather_order(cp_size: int, device: torch.device | str = "cpu") -> Tensor:
    """For natural chunk ``j`` (of ``2·cp``), the index of the rank-ordered gathered chunk that holds it."""
    order = []
    for j in range(2 * cp_size):
        order.append(2 * j if j < cp_size else 2 * (2 * cp_size - 1 - j) + 1)
    return torch.tensor(order, device=device)


def split_zigzag(x: Tensor, cp_size: int, cp_rank: int, dim: int = 0) -> Tensor:
    """This rank's ``[2C]`` slice of a full-length tensor (the layout ``get_batch_on_this_cp_rank`` produces)."""
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


class _GatherZigzag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        cp = dist.get_world_size(group)
        ctx.group = group
        x = x.contiguous()
        gathered = x.new_empty((cp * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(gathered, x, group=group)
        chunks = gathered.view(2 * cp, x.shape[0] // 2, *x.shape[1:])
        order = zigzag_gather_order(cp, x.device)
        ctx.order = order
        return chunks.index_select(0, order).reshape(gathered.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        cp = dist.get_world_size(group)
        grad = grad.contiguous()
        chunks = grad.view(2 * cp, grad.shape[0] // (2 * cp), *grad.shape[1:])
        # Back to rank order: gathered chunk order[j] holds natural chunk j.
        rank_major = torch.empty_like(chunks)
        rank_major[ctx.order] = chunks
        rank_major = rank_major.view(cp, -1, *grad.shape[1:])
        if dist.get_backend(group) == "gloo":
            # Gloo has no reduce-scatter: all-reduce and keep this rank's part (CPU tests only).
            dist.all_reduce(rank_major, group=group)
            out = rank_major[dist.get_rank(group)].clone()
        else:
            out = grad.new_empty(rank_major.shape[1:])
            dist.reduce_scatter_tensor(out, rank_major.reshape(-1, *grad.shape[1:]), group=group)
        return out, None


def gather_sequence_zigzag(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All-gathers this rank's zigzag ``[2C, ...]`` over ``group`` into natural order ``[S, ...]``
    (backward: reduce-scatter of the gradient)."""
    if dist.get_world_size(group) == 1:
        return x
    return _GatherZigzag.apply(x, group)


def gather_kv_zigzag(key: Tensor, value: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor]:
    """K and V ``[2C, b, g, d]`` → ``[S, b, g, d]`` each, with one collective (concatenated on the head dim)."""
    d = key.shape[-1]
    kv = gather_sequence_zigzag(torch.cat([key, value], dim=-1), group)
    return kv[..., :d], kv[..., d:]


def gather_kv_for_local_queries(query: Tensor, key: Tensor, value: Tensor, group: dist.ProcessGroup
                                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """This rank's zigzag chunks → ``(key [S, b, g, d], value [S, b, g, d], q_positions [2C])``: the whole
    sequence's keys and values, and the global positions of the local queries. With one CP rank: the inputs and
    None (queries at the last ``sq`` positions)."""
    cp_size = group.size()
    if cp_size == 1:
        return key, value, None
    q_positions = zigzag_positions(query.shape[0], cp_size, group.rank(), query.device)
    key, value = gather_kv_zigzag(key, value, group)
    return key, value, q_positions
