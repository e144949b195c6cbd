"""Small host-side helpers shared by the kernels: layout checks, positions, document grids.

Framework-free (torch only). Semantics follow docs/architecture.md and ssa_megatron/ssa/reference.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes of the kernels (float64 is the reference implementation's: ssa_megatron.ssa.reference)."""


def check_qkv(q: Tensor, k: Tensor, v: Tensor | None = None) -> tuple[int, int]:
    """Validates Megatron-layout q/k/v; returns (HKV, G)."""
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [s, b, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype}: ssa_kernels support float16, bfloat16 and float32 "
                             f"(float64 runs on the reference implementation, ssa.backend='reference' or 'auto')")
        if t.dtype != q.dtype:
            raise ValueError(f"q, k and v must share a dtype, got q {q.dtype} and {name} {t.dtype}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv}) for GQA")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"more queries ({q.shape[0]}) than keys ({k.shape[0]})")
    return hkv, hq // hkv


def last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def q_positions_or_default(q_positions: Tensor | None, sq: int, skv: int, device: torch.device) -> Tensor:
    """Global query positions as int32 on ``device`` (default: the last ``sq`` keys)."""
    if q_positions is None:
        return torch.arange(skv - sq, skv, device=device, dtype=torch.int32)
    if q_positions.shape != (sq,):
        raise ValueError(f"q_positions must have shape ({sq},), got {tuple(q_positions.shape)}")
    return q_positions.to(device=device, dtype=torch.int32)


def document_starts(cu_seqlens: Tensor | None, b: int, s: int, device: torch.device) -> Tensor | None:
    """Row-relative first position of each token's document, ``[b, s]`` int64 (None: one document per row)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or len(cu) < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu.shape)}")
    flat = torch.arange(b * s, device=device)
    doc_of_token = torch.searchsorted(cu, flat, right=True) - 1
    starts = cu[doc_of_token] - (flat // s) * s
    return starts.view(b, s)


def block_grid(doc_start: Tensor | None, b: int, s: int, block_size: int, device: torch.device
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The key-block grid of every row.

    Returns ``(starts [b, NBG] int32, ends [b, NBG] int32, complete [b, NBG] bool)`` over the grid blocks
    (complete or not) of each row, padded with ``starts = s`` (and ``ends = s``) past the row's last block.
    Without documents the grid is ``0, BS, 2BS, ...`` for every row (NBG = ceil(s / BS)); with documents NBG = s,
    a bound known without reading the GPU.
    """
    if doc_start is None:
        nb = (s + block_size - 1) // block_size
        st = torch.arange(0, nb * block_size, block_size, device=device, dtype=torch.int32)
        en = torch.clamp(st + block_size, max=s)
        return st.expand(b, nb), en.expand(b, nb), (en - st == block_size).expand(b, nb)
    pos = torch.arange(s, device=device).expand(b, s)
    is_first = doc_start == pos  # [b, s]
    next_first = torch.where(is_first, pos, torch.full_like(pos, s))
    next_first = torch.cat([next_first[:, 1:], torch.full_like(pos[:, :1], s)], dim=1)
    doc_end = torch.flip(torch.cummin(torch.flip(next_first, [1]), dim=1).values, [1])
    is_start = (pos - doc_start) % block_size == 0
    cnt = is_start.sum(1)
    # NBG = s, an upper bound, not cnt.max(): reading the count back would make every layer wait for the GPU.
    nbg = s
    # positions of the grid starts, in order (stable: True before False keeps ascending positions)
    order = torch.sort((~is_start).to(torch.int8), dim=1, stable=True).indices[:, :nbg]
    valid = torch.arange(nbg, device=device)[None, :] < cnt[:, None]
    st = torch.where(valid, order, torch.full_like(order, s))
    en = torch.where(valid, torch.minimum(st + block_size, torch.gather(doc_end, 1, order)), torch.full_like(st, s))
    return st.to(torch.int32), en.to(torch.int32), valid & (en - st == block_size)
