"""The SSA math, written for reading: pure torch, any dtype (float64 for oracles), no custom kernels.

Shapes follow Megatron: ``q [sq, b, HQ, D]``, ``k, v [skv, b, HKV, D]``; query head ``h`` belongs to KV head
``h // G`` with ``G = HQ // HKV``. Conventions (positions, ``cu_seqlens``, the index table) are in
docs/architecture.md. Everything here builds dense ``[sq, skv]`` masks: it is the oracle, not the fast path
(see ``ssa_kernels`` for that), and it costs O(sq·skv) memory per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------------------------
# Input checks and layout helpers


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    """Validates Megatron-layout q/k/v and returns (HKV, G)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [s, b, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 1) and head_dim (dim 3)"
        )
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv}) for GQA")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"more queries ({q.shape[0]}) than keys ({k.shape[0]})")
    return hkv, hq // hkv


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be an integer >= 1")


def check_index_tensor(name: str, t: Tensor | None) -> None:
    """``cu_seqlens`` and ``q_positions`` are positions: a 1-D integer tensor (a float one would be truncated)."""
    if t is None:
        return
    if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64):
        kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} dtype {kind}: must be a torch.int32 or torch.int64 tensor")
    if t.dim() != 1:
        raise ValueError(f"{name} shape {tuple(t.shape)}: must be 1-D")


def default_q_positions(q_positions: Tensor | None, sq: int, skv: int, device: torch.device) -> Tensor:
    """Global positions of the queries in the key sequence: given, or the last ``sq`` keys' positions."""
    if q_positions is None:
        return torch.arange(skv - sq, skv, device=device)
    check_index_tensor("q_positions", q_positions)
    if q_positions.shape != (sq,):
        raise ValueError(f"q_positions must have shape ({sq},), got {tuple(q_positions.shape)}")
    if len(q_positions) and (int(q_positions.min()) < 0 or int(q_positions.max()) >= skv):
        raise ValueError(f"q_positions must lie in [0, {skv}), got range "
                         f"[{int(q_positions.min())}, {int(q_positions.max())}]")
    return q_positions.to(device=device, dtype=torch.long)


def document_starts(cu_seqlens: Tensor | None, b: int, s: int, device: torch.device) -> Tensor:
    """Row-relative position of the first token of each token's document, ``[b, s]`` int64.

    ``cu_seqlens`` holds boundaries over the flattened ``b·s`` stream; without it each row is one document.
    """
    if cu_seqlens is None:
        return torch.zeros(b, s, dtype=torch.long, device=device)
    check_index_tensor("cu_seqlens", cu_seqlens)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != b * s:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at b*s={b * s}, got {cu_seqlens.tolist()}")
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    row_starts = torch.arange(0, b * s, s, device=device)
    if not bool(torch.isin(row_starts, cu).all()):
        raise ValueError(f"cu_seqlens must contain every row start (multiples of s={s}): "
                         f"documents cannot cross rows, got {cu_seqlens.tolist()}")
    flat = torch.arange(b * s, device=device)
    doc_of_token = torch.searchsorted(cu, flat, right=True) - 1
    starts = cu[doc_of_token] - (flat // s) * s
    return starts.view(b, s)


def grid_block_starts(doc_start: Tensor, block_size: int) -> Tensor:
    """Start position of the block that holds each key, ``[b, s]``: each document has its own grid."""
    pos = torch.arange(doc_start.shape[1], device=doc_start.device)
    return doc_start + (pos - doc_start) // block_size * block_size


def expand_kv_heads(x: Tensor, groups: int) -> Tensor:
    """``[s, b, HKV, D] -> [s, b, HKV·G, D]``: query head h reads KV head h // G."""
    return x.repeat_interleave(groups, dim=2)


# --------------------------------------------------------------------------------------------------------------
# Selection


def scoring_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision selection accumulates and scores in: float32, or float64 for float64 inputs (the kernels'
    contract, docs/ssa.md "Precision of the selection")."""
    return torch.promote_types(dtype, torch.float32)


def pool_block_keys(k: Tensor, doc_start: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Mean-pooled keys of every block that can be scored.

    Returns ``(k_bar [b, HKV, skv, D], is_block_start [b, skv])``: ``k_bar[:, :, p]`` is the mean of keys
    ``p .. p+block_size-1`` when a complete block of the document grid starts at p (zeros elsewhere).

    Each mean is a direct sum of its ``block_size`` keys in ``scoring_dtype`` (float32, or float64), divided by
    ``block_size`` and rounded to ``k.dtype``, as the kernels pool: its error does not grow with the sequence
    (a running cumulative sum's does), and identical blocks pool to identical keys, so their scores tie exactly.
    """
    check_block_size(block_size)
    skv, b, hkv, d = k.shape
    pos = torch.arange(skv, device=k.device)
    doc_end = _document_ends(doc_start)
    is_start = (grid_block_starts(doc_start, block_size) == pos) & (pos + block_size <= doc_end)
    # Windows of block_size keys starting at every position (a view; the tail is padded and never a start).
    padded = torch.cat([k, k.new_zeros(block_size - 1, b, hkv, d)]) if block_size > 1 else k
    windows = padded.unfold(0, block_size, 1)  # [skv, b, HKV, D, block_size]
    k_bar = (windows.sum(-1, dtype=scoring_dtype(k.dtype)) / block_size).to(k.dtype)
    k_bar = k_bar.permute(1, 2, 0, 3).masked_fill(~is_start[:, None, :, None], 0)
    return k_bar, is_start


def _document_ends(doc_start: Tensor) -> Tensor:
    """Row-relative end (exclusive) of each token's document, ``[b, s]``."""
    b, s = doc_start.shape
    pos = torch.arange(s, device=doc_start.device).expand(b, s)
    is_first = doc_start == pos
    # The next document starts at the next 'first' position; the last one ends at s.
    next_first = torch.where(is_first, pos, torch.full_like(pos, s))
    next_first = torch.cat([next_first[:, 1:], torch.full_like(pos[:, :1], s)], dim=1)
    ends = torch.flip(torch.cummin(torch.flip(next_first, [1]), dim=1).values, [1])
    return ends


SELECTIONS = ("exact", "authors_chunked")
NORMALISERS = ("earlier_blocks", "authors")


def block_scores(
    q: Tensor,
    k_bar: Tensor,
    candidates: Tensor,
    score: str,
    softmax_scale: float,
    normalised_over: Tensor | None = None,
) -> Tensor:
    """Scores of candidate blocks, one ranking per KV head: ``[b, HKV, sq, skv]`` in ``scoring_dtype`` (-inf off
    the candidates).

    ``candidates [b, sq, skv]`` marks, for each query, the starts of complete same-document blocks strictly
    before its own block. ``group_softmax`` sums each group head's softmax over those blocks (the authors'
    code); ``dot`` averages the group's raw dot products (MoBA). ``normalised_over [b, sq, skv]`` (default: the
    candidates) is the set of blocks each head's softmax is normalised over; it must contain the candidates.
    """
    sq, b, hq, d = q.shape
    hkv = k_bar.shape[1]
    g = hq // hkv
    acc = scoring_dtype(q.dtype)  # products of the input-dtype operands, accumulated and scored in float32
    qg = q.permute(1, 2, 0, 3).reshape(b, hkv, g, sq, d).to(acc)
    logits = torch.einsum("bngtd,bnpd->bngtp", qg, k_bar.to(acc))  # [b, HKV, G, sq, skv]
    cand = candidates[:, None, None]
    if score == "group_softmax":
        norm = cand if normalised_over is None else normalised_over[:, None, None]
        probs = torch.softmax((softmax_scale * logits).masked_fill(~norm, -math.inf), dim=-1)
        scores = torch.where(cand, probs, torch.zeros_like(probs)).sum(dim=2)
    elif score == "dot":
        scores = logits.mean(dim=2)
    else:
        raise ValueError(f"score={score!r}: must be 'group_softmax' or 'dot'")
    return scores.masked_fill(~candidates[:, None], -math.inf)


def check_selection(selection: str, normaliser: str, block_size: int, top_k: int, sink_blocks: int,
                    local_blocks: int) -> None:
    """One-line errors for the selection rule and the normaliser (docs/ssa.md, "Deviations ... and switches")."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: must be one of {', '.join(map(repr, SELECTIONS))}")
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser={normaliser!r}: must be one of {', '.join(map(repr, NORMALISERS))}")
    if selection == "authors_chunked":
        if sink_blocks or local_blocks:
            raise ValueError(f"selection='authors_chunked' forces no blocks: sink_blocks={sink_blocks} and "
                             f"local_blocks={local_blocks} must be 0")
        if top_k > block_size:
            raise ValueError(f"selection='authors_chunked' keeps at most block_size blocks: top_k={top_k} exceeds "
                             f"block_size={block_size}")


def best_in_region(scores: Tensor, region: Tensor, cap: Tensor) -> Tensor:
    """The ``cap`` best-scoring members of ``region`` (ties to the later block), as a mask like ``scores``.

    ``scores, region [..., skv]``; ``cap`` broadcasts against ``scores[..., :1]``.
    """
    skv = scores.shape[-1]
    masked = torch.flip(scores.masked_fill(~region, -math.inf), dims=[-1])  # later positions first on ties
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(skv, device=scores.device).expand_as(order))
    return region & (torch.flip(rank, dims=[-1]) < cap)


def authors_chunk_survivors(scores: Tensor, candidates: Tensor, q_doc: Tensor, own: Tensor,
                            block_size: int) -> Tensor:
    """The candidate blocks that the authors' chunked top-k can still pick, ``[b, HKV, sq, skv]``.

    The authors' kernel (fla-org native-sparse-attention's ``parallel_nsa_kernel_topk``, copied as
    ``hf_files/parallel.py`` in zhenyi4/ssa) walks a query's blocks in chunks of ``C = block_size`` blocks (its
    ``BC = BS``) and keeps a sorted list of C entries: the whole first chunk, then at every later chunk the best
    C/2 of the list so far and the best C/2 of the new chunk. The own block, scored highest, sits in the last
    chunk. So a query whose own block is in chunk 0 keeps every earlier block as a candidate (C - 1 at most); any
    other keeps the best C/2 blocks of the older chunks and the best C/2 - 1 earlier blocks of its own chunk.
    Block numbers and chunks count from the query's document start.
    """
    c = block_size  # blocks per chunk: the kernel couples the chunk to the block size (BC = BS)
    p = torch.arange(scores.shape[-1], device=scores.device)
    block_no = (p[None, None, :] - q_doc[:, :, None]).div(block_size, rounding_mode="floor")  # [b, sq, skv]
    newest = (own - q_doc) // block_size // c * c  # [b, sq]: first block number of the query's chunk
    older = candidates & (block_no < newest[:, :, None])
    in_newest = candidates & (block_no >= newest[:, :, None])
    newest_cap = torch.where(newest == 0, c - 1, c // 2 - 1)[:, None, :, None]
    return best_in_region(scores, older[:, None], c // 2) | best_in_region(scores, in_newest[:, None], newest_cap)


@torch.no_grad()
def select_blocks(
    q: Tensor,
    k: Tensor,
    block_size: int,
    top_k: int,
    score: str = "group_softmax",
    sink_blocks: int = 0,
    local_blocks: int = 0,
    cu_seqlens: Tensor | None = None,
    q_positions: Tensor | None = None,
    softmax_scale: float | None = None,
    selection: str = "exact",
    normaliser: str = "earlier_blocks",
) -> tuple[Tensor, Tensor]:
    """Top-k block selection per query token and KV head (no gradient).

    The query's own block is always kept; ``sink_blocks`` first and ``local_blocks`` preceding blocks of its
    document are kept when they exist; all of them count toward ``top_k``. The remaining slots go to the
    best-scoring complete earlier blocks; ties go to the later block. ``selection='authors_chunked'`` first narrows
    the earlier blocks to those the authors' chunked top-k keeps (:func:`authors_chunk_survivors`).
    ``normaliser='authors'`` adds the own block to group_softmax's per-head normaliser when the query is its last
    token (all its keys visible), as the authors' kernel normalises over the complete blocks up to the query.

    Returns ``block_idx [b, HKV, sq, top_k]`` int32 (block start positions, ascending, -1 padded) and
    ``counts [b, HKV, sq]`` int32.
    """
    hkv, _ = check_qkv(q, k, k)
    sq, b, _, d = q.shape
    skv = k.shape[0]
    check_block_size(block_size)
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: must be at least 1 block")
    if sink_blocks + local_blocks + 1 > top_k:
        raise ValueError(f"sink_blocks + local_blocks + 1 = {sink_blocks + local_blocks + 1} exceeds top_k={top_k}")
    check_selection(selection, normaliser, block_size, top_k, sink_blocks, local_blocks)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    device = q.device
    q_pos = default_q_positions(q_positions, sq, skv, device)
    doc_start = document_starts(cu_seqlens, b, skv, device)  # [b, skv]
    k_bar, is_start = pool_block_keys(k, doc_start, block_size)

    q_doc = doc_start[:, q_pos]  # [b, sq]
    own = q_doc + (q_pos - q_doc) // block_size * block_size  # [b, sq]
    p = torch.arange(skv, device=device)
    same_doc = doc_start[:, None, :] == q_doc[:, :, None]  # [b, sq, skv]
    earlier = p[None, None, :] < own[:, :, None]
    candidates = is_start[:, None, :] & same_doc & earlier
    normalised_over = candidates
    if normaliser == "authors":  # + the own block when the query is its last token (then it is complete)
        own_complete = (q_pos[None, :] + 1 == own + block_size)[:, :, None] & (p[None, None, :] == own[:, :, None])
        normalised_over = candidates | own_complete

    scores = block_scores(q, k_bar, candidates, score, scale, normalised_over)  # [b, HKV, sq, skv]
    if selection == "authors_chunked":
        survivors = authors_chunk_survivors(scores, candidates, q_doc, own, block_size)
        scores = scores.masked_fill(~survivors, -math.inf)
    else:
        survivors = candidates[:, None]
    forced = (p[None, None, :] < q_doc[:, :, None] + sink_blocks * block_size) | (
        p[None, None, :] >= own[:, :, None] - local_blocks * block_size
    )
    scores = torch.where(candidates[:, None] & forced[:, None], torch.full_like(scores, math.inf), scores)
    # The own block: +inf, and it is a candidate of its own (it may be incomplete).
    is_own = p[None, None, :] == own[:, :, None]
    scores = torch.where(is_own[:, None], torch.full_like(scores, math.inf), scores)
    selectable = survivors | is_own[:, None]

    # Exact top-k with ties to the later block: stable-sort by descending score over positions in descending
    # order, so equal scores keep the later position first.
    rev_scores = torch.flip(scores, dims=[-1])
    order = torch.sort(rev_scores, dim=-1, descending=True, stable=True).indices[..., :top_k]
    chosen = skv - 1 - order  # back to positions
    valid = torch.gather(torch.flip(selectable, dims=[-1]).expand_as(scores), -1, order)
    chosen = torch.where(valid, chosen, torch.full_like(chosen, skv))  # invalid sorts last
    chosen = torch.sort(chosen, dim=-1).values
    if chosen.shape[-1] < top_k:  # fewer keys than the budget
        chosen = F.pad(chosen, (0, top_k - chosen.shape[-1]), value=skv)
    counts = (chosen < skv).sum(dim=-1).to(torch.int32)
    block_idx = torch.where(chosen < skv, chosen, torch.full_like(chosen, -1)).to(torch.int32)
    return block_idx, counts


# --------------------------------------------------------------------------------------------------------------
# Attention


def sparse_mask(block_idx: Tensor, block_size: int, q_positions: Tensor, skv: int) -> Tensor:
    """Dense ``[b, HKV, sq, skv]`` mask of the keys each query attends to in sparse mode."""
    j = torch.arange(skv, device=block_idx.device)
    mask = torch.zeros(*block_idx.shape[:-1], skv, dtype=torch.bool, device=block_idx.device)
    for slot in range(block_idx.shape[-1]):
        start = block_idx[..., slot, None].long()
        mask |= (start >= 0) & (j >= start) & (j < start + block_size)
    return mask & (j[None, None, None, :] <= q_positions[None, None, :, None])


def full_mask(cu_seqlens: Tensor | None, b: int, q_positions: Tensor, skv: int) -> Tensor:
    """Dense ``[b, 1, sq, skv]`` causal mask, documents kept apart when ``cu_seqlens`` is given."""
    doc_start = document_starts(cu_seqlens, b, skv, q_positions.device)
    j = torch.arange(skv, device=q_positions.device)
    causal = j[None, :] <= q_positions[:, None]  # [sq, skv]
    same_doc = doc_start[:, q_positions][:, :, None] == doc_start[:, None, :]  # [b, sq, skv]
    return (causal[None] & same_doc)[:, None]


def masked_logits(q: Tensor, k: Tensor, mask: Tensor, softmax_scale: float | None = None) -> Tensor:
    """Scaled scores ``[b, HQ, sq, skv]``, -inf where the per-KV-head mask ``[b, HKV or 1, sq, skv]`` is False."""
    hkv, g = check_qkv(q, k, k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qh = q.permute(1, 2, 0, 3)  # [b, HQ, sq, D]
    kh = expand_kv_heads(k, g).permute(1, 2, 0, 3)
    logits = scale * qh @ kh.transpose(-1, -2)
    return logits.masked_fill(~mask_per_query_head(mask, hkv, g), -math.inf)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, softmax_scale: float | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Softmax attention under a per-KV-head mask ``[b, HKV or 1, sq, skv]``.

    Returns ``(out [sq, b, HQ, D], lse [b, HQ, sq])`` (natural-log log-sum-exp of the scaled scores).
    """
    hkv, g = check_qkv(q, k, v)
    logits = masked_logits(q, k, mask, softmax_scale)
    vh = expand_kv_heads(v, g).permute(1, 2, 0, 3)
    lse = torch.logsumexp(logits, dim=-1)
    out, _ = masked_weighted_sum(torch.exp(logits - lse[..., None]), vh, mask_per_query_head(mask, hkv, g))
    return out.permute(2, 0, 1, 3), lse


def mask_per_query_head(mask: Tensor, hkv: int, g: int) -> Tensor:
    """A per-KV-head mask ``[b, HKV or 1, sq, skv]`` repeated for the G query heads of each group."""
    return mask.repeat_interleave(g, dim=1) if mask.shape[1] == hkv and g > 1 else mask


def masked_weighted_sum(probs: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``probs @ v`` where a non-finite value of ``v`` reaches only the rows whose mask allows its key.

    A plain matmul multiplies masked (zero) probabilities by every key's value, and ``0 · NaN`` is NaN: one
    document's NaN would poison every other document's rows. Non-finite values are zeroed before the matmul, and
    an output element is set to NaN where the mask allows a key whose value is non-finite in that column.
    ``probs [.., sq, skv]``, ``v [.., skv, D]``, ``mask`` broadcastable to ``probs``. Returns ``(out, poisoned)``.
    """
    bad = ~torch.isfinite(v)
    out = probs @ torch.where(bad, torch.zeros_like(v), v)
    # [.., sq, D]: allowed keys with a non-finite value in each column (a count; float32 so it is exact enough)
    poisoned = (mask.to(torch.float32) @ bad.to(torch.float32)) > 0
    return out.masked_fill(poisoned, math.nan), poisoned


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
                     q_positions: Tensor | None = None, softmax_scale: float | None = None,
                     starts_on_grid: bool | None = None) -> tuple[Tensor, Tensor]:
    """Attention over the selected blocks only (own block causal). Returns ``(out, lse)``.

    ``starts_on_grid`` (every block start a multiple of ``block_size``, i.e. no documents) is a hint the
    kernels' backward uses to skip a check; the reference does not need it.
    """
    check_qkv(q, k, v)
    check_block_size(block_size)
    q_pos = default_q_positions(q_positions, q.shape[0], k.shape[0], q.device)
    mask = sparse_mask(block_idx, block_size, q_pos, k.shape[0])
    return masked_attention(q, k, v, mask, softmax_scale)


def full_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None,
                   q_positions: Tensor | None = None, softmax_scale: float | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Causal attention (documents kept apart when ``cu_seqlens`` is given). Returns ``(out, lse)``."""
    check_qkv(q, k, v)
    q_pos = default_q_positions(q_positions, q.shape[0], k.shape[0], q.device)
    mask = full_mask(cu_seqlens, q.shape[1], q_pos, k.shape[0])
    return masked_attention(q, k, v, mask, softmax_scale)


def apply_gate(out: Tensor, gate_logits: Tensor | None) -> Tensor:
    """Per-head sigmoid gate: ``out [sq, b, HQ, D] * sigmoid(gate_logits [sq, b, HQ])``."""
    if gate_logits is None:
        return out
    if gate_logits.shape != out.shape[:3]:
        raise ValueError(f"gate must have shape [sq, b, HQ] = {tuple(out.shape[:3])}, got {tuple(gate_logits.shape)}")
    return out * torch.sigmoid(gate_logits).unsqueeze(-1).to(out.dtype)


ALIGNMENTS = ("bidirectional", "sparsity_only", "commitment_only")


def alignment_loss(o_full: Tensor, o_sparse: Tensor, beta: float = 1.0, terms: str = "bidirectional"
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """SmoothL1 alignment of the gated per-head outputs (mean over elements), both directions by default.

    Returns ``(total, sparsity_term, commitment_term)``: the sparsity term moves only the full branch toward
    the (stopped) sparse output, the commitment term moves only the sparse branch toward the (stopped) full one.
    ``terms`` (``ssa.alignment``) picks what ``total`` holds: both (``bidirectional``), or one of them, the paper's
    one-direction ablations (``sparsity_only``, ``commitment_only``); both terms are returned for logging either way.
    """
    if terms not in ALIGNMENTS:
        raise ValueError(f"terms={terms!r}: must be one of {', '.join(map(repr, ALIGNMENTS))}")
    # At least float32: bf16 means over millions of elements lose the small differences that matter here.
    dtype = torch.promote_types(o_full.dtype, torch.float32)
    o_full, o_sparse = o_full.to(dtype), o_sparse.to(dtype)
    sparsity = F.smooth_l1_loss(o_full, o_sparse.detach(), beta=beta)
    commitment = F.smooth_l1_loss(o_full.detach(), o_sparse, beta=beta)
    total = {"bidirectional": sparsity + commitment, "sparsity_only": sparsity, "commitment_only": commitment}[terms]
    return total, sparsity.detach(), commitment.detach()


# --------------------------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def attention_metrics(
    q: Tensor,
    k: Tensor,
    block_idx: Tensor,
    block_size: int,
    cu_seqlens: Tensor | None = None,
    q_positions: Tensor | None = None,
    softmax_scale: float | None = None,
    kl_floor: float = 1e-6,
) -> dict[str, Tensor]:
    """Statistics of the full-attention distribution against the selection, each ``[HQ]`` (mean over b, sq).

    - ``sparsity``: share of full-attention probability mass inside the selected blocks (paper Definition 1);
    - ``entropy_bits``: entropy of the full-attention distribution, in bits;
    - ``kl_full_sparse``: KL(full ‖ sparse) in nats. The sparse distribution (the full one renormalised over
      the selected keys) has no mass outside the selection, which makes the exact KL infinite as soon as any
      mass is dropped, so it is floored at ``kl_floor`` per key and renormalised;
    - ``sink_mass``: share of full-attention mass on the first block of the query's document.
    """
    _, g = check_qkv(q, k, k)
    sq, b = q.shape[:2]
    skv = k.shape[0]
    q_pos = default_q_positions(q_positions, sq, skv, q.device)
    allowed = full_mask(cu_seqlens, b, q_pos, skv)
    p_full = torch.softmax(masked_logits(q.double(), k.double(), allowed, softmax_scale), dim=-1)  # [b, HQ, sq, skv]

    selected = sparse_mask(block_idx, block_size, q_pos, skv).repeat_interleave(g, dim=1)
    mass_in = (p_full * selected).sum(-1)
    logp = torch.where(p_full > 0, p_full.log(), torch.zeros_like(p_full))
    entropy_bits = -(p_full * logp).sum(-1) / math.log(2)

    n_allowed = allowed.sum(-1, keepdim=True).double()
    p_sparse = torch.where(selected, p_full, torch.zeros_like(p_full)) / mass_in[..., None]
    p_sparse = torch.where(allowed, (p_sparse + kl_floor) / (1 + kl_floor * n_allowed), torch.zeros_like(p_sparse))
    log_ratio = torch.where(p_full > 0, logp - p_sparse.clamp_min(1e-300).log(), torch.zeros_like(p_full))
    kl = (p_full * log_ratio).sum(-1)

    doc_start = document_starts(cu_seqlens, b, skv, q.device)
    # Key j lies in the first block of its own document; p_full is zero outside the query's document.
    first_block = torch.arange(skv, device=q.device)[None, :] < (doc_start + block_size)  # [b, skv]
    sink = (p_full * first_block[:, None, None, :]).sum(-1)

    def per_head(x: Tensor) -> Tensor:
        return x.mean(dim=(0, 2)).to(q.dtype if q.dtype.is_floating_point else torch.float32)

    return {
        "sparsity": per_head(mass_in),
        "entropy_bits": per_head(entropy_bits),
        "kl_full_sparse": per_head(kl),
        "sink_mass": per_head(sink),
    }
