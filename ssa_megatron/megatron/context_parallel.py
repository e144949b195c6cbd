"""Context parallelism for SSA: all-gather K/V over the CP group while the rank's own work runs, attend from local
queries at global positions.

Input layout (Megatron's load balancing, ``megatron.core.utils.get_batch_on_this_cp_rank``): the sequence of
length ``S`` is cut into ``2·cp`` chunks of ``C = S / (2·cp)`` tokens and CP rank ``r`` holds chunks ``r`` and
``2·cp-1-r``, concatenated (``2C`` local tokens). RoPE is already applied with global positions (GPTModel's rotary
table is sliced the same way), so gathered keys are usable as they are. :func:`zigzag_positions` gives the global
positions of the local queries, which ``ssa_attention`` uses as ``q_positions`` in both branches (causality, own
block, selection); block keys for selection are pooled from the gathered keys, so selection sees every earlier
block.

The exchange, :func:`start_kv_gather`, is asynchronous both ways (NCCL on GPU, gloo on CPU):

- Forward: ``_StartGather`` issues the all-gather of this rank's K|V (``[2C, b, g, 2D]``, K and V concatenated so
  one pair of collectives carries both) and returns; ``ssa_attention`` then runs what needs only the rank's own
  K/V (the full branch's causal diagonal pieces: each local chunk over its own keys), and only then calls
  :meth:`KVGather.wait` (``_FinishGather``), which makes the stream wait for the gather, followed by selection,
  the sparse branch and the full branch's prefix pieces. The gather lands in natural order: the first chunks
  (rank r's chunk r) with one ``all_gather_into_tensor`` into ``[0, cp·C)``, the second chunks (rank r's chunk
  ``2cp-1-r``, reverse rank order) with one ``all_gather`` into a list of views; NCCL writes such a list through a
  buffer and copies on its own stream, so no reordering copy runs on the compute stream.
- Backward: autograd runs ready nodes in reverse creation order, and the diagonal pieces are created between the
  two nodes, so ``_FinishGather.backward`` (sums the whole-sequence dK|dV, issues the reduce-scatters back to
  the owners, mirror images of the gathers) runs before the diagonal pieces' backward, which yields local dK/dV
  directly while the reduce-scatter is in flight, and ``_StartGather.backward`` (waits, returns this rank's
  gradient) after it. ``tests/test_context_parallel_overlap.py`` records this order.

Memory: whole-sequence K/V ``[S, b, g, 2D]`` exist once per layer, from the gather until the layer's backward.
Under selective or full recompute (the long-context recipes) the core attention is checkpointed: only the local
q/k/v/gate are kept across the step and the gather is redone in the recompute. Without recompute, the sparse
branch and the prefix pieces save the gathered K/V for their backward. Re-gathering them in backward instead (as
Transformer Engine's ``AttnFuncWithCPAndKVAllGather`` does) would save ``(cp-1)/cp`` of ``S·b·g·2D`` values per
layer (16 MiB per layer at the 1B shape, 32k, cp 2: 2 KV heads of 64) for one more all-gather per layer that
nothing precedes in that layer's backward (the prefix and sparse backward need it first), so it is not done.

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


def split_zigzag(x: Tensor, cp_size: int, cp_rank: int, dim: int = 0) -> Tensor:
    """This rank's ``[2C]`` slice of a full-length tensor (the layout ``get_batch_on_this_cp_rank`` produces)."""
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def _second_chunks(full: Tensor, cp: int) -> list[Tensor]:
    """Views of ``full`` (natural order) where each rank's second chunk lives: rank r's is chunk ``2cp-1-r``."""
    c = full.shape[0] // (2 * cp)
    return [full[(2 * cp - 1 - r) * c:(2 * cp - r) * c] for r in range(cp)]


def _all_gather_zigzag(full: Tensor, local: Tensor, group: dist.ProcessGroup) -> list:
    """Issues the gathers of every rank's ``local`` ``[2C, ...]`` into ``full`` ``[S, ...]`` in natural order."""
    cp, c = group.size(), local.shape[0] // 2
    return [dist.all_gather_into_tensor(full[:cp * c], local[:c], group=group, async_op=True),
            dist.all_gather(_second_chunks(full, cp), local[c:], group=group, async_op=True)]


def _reduce_scatter_zigzag(local: Tensor, full: Tensor, group: dist.ProcessGroup) -> list:
    """Issues the reduce-scatters of ``full`` ``[S, ...]`` (natural order) into each rank's ``local`` ``[2C, ...]``:
    the gathers' mirror image."""
    cp, c = group.size(), local.shape[0] // 2
    return [dist.reduce_scatter_tensor(local[:c], full[:cp * c], group=group, async_op=True),
            dist.reduce_scatter(local[c:], _second_chunks(full, cp), group=group, async_op=True)]


class _Exchange:
    """What the two nodes of one exchange share: the collectives in flight (forward: the gathers; backward: the
    reduce-scatters) and the local gradient being reduced into. It holds no forward tensor, so the nodes' contexts
    and the gathered tensor form no reference cycle."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.works: list = []
        self.grad: Tensor | None = None

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class _StartGather(torch.autograd.Function):
    """Forward: issues the all-gather of ``kv`` ``[2C, b, g, 2D]`` and returns the ``[S, b, g, 2D]`` tensor it is
    filling (read it only through ``_FinishGather``). Backward: waits for the reduce-scatter that
    ``_FinishGather.backward`` issued and returns this rank's gradient."""

    @staticmethod
    def forward(ctx, kv: Tensor, exchange: _Exchange) -> Tensor:
        ctx.exchange = exchange
        full = kv.new_empty((exchange.group.size() * kv.shape[0], *kv.shape[1:]))
        exchange.works = _all_gather_zigzag(full, kv, exchange.group)
        return full

    @staticmethod
    def backward(ctx, _grad_full: Tensor):
        # _grad_full is the whole-sequence gradient being reduce-scattered: kept alive by autograd until here.
        exchange = ctx.exchange
        exchange.wait()
        grad, exchange.grad = exchange.grad, None
        return grad, None


class _FinishGather(torch.autograd.Function):
    """Forward: makes the stream wait for the gather; returns K and V ``[S, b, g, D]`` (views of the gathered
    K|V). Backward: concatenates dK|dV, issues its reduce-scatter and returns without waiting."""

    @staticmethod
    def forward(ctx, full: Tensor, exchange: _Exchange) -> tuple[Tensor, Tensor]:
        exchange.wait()
        ctx.exchange = exchange
        d = full.shape[-1] // 2
        return full[..., :d], full[..., d:]

    @staticmethod
    def backward(ctx, grad_k: Tensor, grad_v: Tensor):
        exchange = ctx.exchange
        grad = torch.cat([grad_k, grad_v], dim=-1)
        exchange.grad = grad.new_empty((grad.shape[0] // exchange.group.size(), *grad.shape[1:]))
        exchange.works = _reduce_scatter_zigzag(exchange.grad, grad, exchange.group)
        return grad, None


class KVGather:
    """One layer's K/V all-gather in flight (:func:`start_kv_gather`). ``q_positions``: the global positions of
    the local queries ``[2C]``. :meth:`wait` returns the whole sequence's K and V; call it once, after the work
    that needs only this rank's own K/V (``ssa_attention(..., gathered_kv=gather.wait)`` does)."""

    def __init__(self, q_positions: Tensor, exchange: _Exchange, full: Tensor) -> None:
        self.q_positions = q_positions
        self._exchange, self._full = exchange, full

    def wait(self) -> tuple[Tensor, Tensor]:
        """K and V ``[S, b, g, D]`` in natural order (the stream waits for the gather; the host does not on GPU)."""
        if self._full is None:
            raise RuntimeError("KVGather.wait: called twice; the gathered K/V were already handed out")
        full, self._full = self._full, None
        return _FinishGather.apply(full, self._exchange)


def start_kv_gather(query: Tensor, key: Tensor, value: Tensor, group: dist.ProcessGroup) -> KVGather | None:
    """Starts the all-gather of this rank's zigzag K and V ``[2C, b, g, D]`` over ``group`` and returns at once;
    None with one CP rank (nothing to exchange: K/V are whole, queries at default positions)."""
    cp_size = group.size()
    if cp_size == 1:
        return None
    q_positions = zigzag_positions(query.shape[0], cp_size, group.rank(), query.device)
    exchange = _Exchange(group)
    full = _StartGather.apply(torch.cat([key, value], dim=-1), exchange)
    return KVGather(q_positions, exchange, full)
