"""Tie-aware checks of one-token block selections (``ssa_megatron/hf/decoding.py``) against the float64 reference,
for tests/test_hf_decoding.py and tests/gpu/test_decode_gpu.py, and a recorder of the selections a decode step
makes, eager or compiled."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ssa_megatron.hf import decode_triton, decoding
from ssa_megatron.ssa import reference

TIE_RTOL = 1e-5
"""Largest relative score gap (float64 scores) at which a selection may differ from the float64 one on the same
inputs. Float32 scoring of the same bf16 operands is off by about 1e-7 (relative); scoring with a bf16 operand that
should not be (an unrounded query, a pooled key re-pooled in bf16, bf16 products) moves scores by up to bf16's
resolution, 2^-8 = 3.9e-3."""


def reference_scores(q: Tensor, pooled: Tensor, length: Tensor | int, config, scale: float) -> Tensor:
    """``[b, HKV, n]`` float64: what ``select_decode_blocks`` ranks for a token at ``length - 1``, from the
    reference: ``reference.block_scores`` on the complete blocks before the token's own block, +inf for the forced
    (sink, local) and the own block, -inf for the rest. ``q [b, HQ, 1, D]``, ``pooled [b, HKV, n, D]``."""
    b, hkv, n, d = pooled.shape
    own = (int(length) - 1) // config.ssa_block_size
    j = torch.arange(n, device=pooled.device)
    candidates = j < own
    scores = reference.block_scores(q.double().permute(2, 0, 1, 3), pooled.double(),
                                    candidates.expand(b, 1, n), config.ssa_score, scale)[:, :, 0]
    forced = candidates & ((j < config.ssa_sink_blocks) | (j >= own - config.ssa_local_blocks))
    return torch.where(forced | (j == own), math.inf, scores)


def _as_mask(idx: Tensor, n: int) -> Tensor:
    """``[..., K]`` block numbers (-1 padded) -> ``[..., n]`` membership."""
    mask = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, torch.where(idx >= 0, idx.long(), n), True)[..., :n]


def selection_gaps(idx: Tensor, q: Tensor, pooled: Tensor, length: Tensor | int, config, scale: float) -> Tensor:
    """``[b, HKV]`` float64, per (row, KV head): 0 where ``idx [b, HKV, top_k]`` selects the blocks that the float64
    reference selects from the same ``q`` and ``pooled`` (exact top-k, ties to the later block); elsewhere the
    largest ``|s_j - s_K| / |s_K|`` over the blocks j in one selection only, with s the reference's float64 scores
    and s_K the lowest finite score it selected (the gap of kernels/tools/selection_agreement.py); inf where an
    exact tie went to the earlier block, or a forced block, the own block or the count differs."""
    scores = reference_scores(q, pooled, length, config, scale)
    n = scores.shape[-1]
    flipped = torch.flip(scores, dims=[-1])  # a stable descending sort over reversed blocks: ties to the later one
    order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices[..., :config.ssa_top_k]
    chosen = torch.where(torch.gather(flipped, -1, order) > -math.inf, n - 1 - order, -1)
    expected, got = _as_mask(chosen, n), _as_mask(idx, n)
    kth = torch.where(expected & scores.isfinite(), scores, math.inf).amin(-1, keepdim=True)
    gap = torch.where(got ^ expected, (scores - kth).abs() / kth.abs(), 0.0).amax(-1)
    gap = torch.where(gap.isnan(), math.inf, gap)  # a forced block differs, or none was scored
    return torch.where((got != expected).any(-1) & (gap == 0), math.inf, gap)


def record_selections(monkeypatch) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Makes every ``select_decode_blocks`` call and every decode step's selection by the kernels
    (``sparse_attend_by_kernels``), eager or in a graph compiled after this, append ``(q, pooled, length,
    selection)`` to the returned list (Dynamo replays the append after the graph runs). The pooled keys and
    length are cloned inside the call (the cache overwrites them); under CUDA graphs the caller must clone the
    records before the graph's next replay reuses their memory."""
    records = []
    select = decoding.select_decode_blocks

    def recording(q, pooled, length, config, scale):
        idx = select(q, pooled, length, config, scale)
        records.append((q, pooled.clone(), torch.as_tensor(length).clone(), idx))
        return idx

    attend = decoding.sparse_attend_by_kernels

    def recording_attend(q, keys, values, pooled, length, config, scale, gate=None, append=None):
        # The kernels' decode step selects inside its attention kernel; select_by_kernels runs the same two kernels
        # and the same top-k helper (decode_triton._largest), so its selection is the one the step attends to.
        # A step that appends in the selection's first kernel runs here as the append kernel and then the same
        # selection (test_decode_triton.py::test_sparse_step_appends_as_the_append_kernel pins the two equal).
        if append is not None:
            k, v, cos, sin, tickets = append
            q = decode_triton.append_by_kernels(q, k, v, cos, sin, keys, values, pooled, length, tickets,
                                                config.ssa_block_size)
        recording(q, pooled, length, config, scale)
        return attend(q, keys, values, pooled, length, config, scale, gate)

    monkeypatch.setattr(decoding, "select_decode_blocks", recording)
    monkeypatch.setattr(decoding, "sparse_attend_by_kernels", recording_attend)
    return records
