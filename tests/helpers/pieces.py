"""An exact stand-in for cuDNN in the full branch's split path (``ssa_kernels.full.PieceKernel``): each piece's
attention computed directly in the inputs' dtype (float64 in the tests), the backward from (out, lse) as cuDNN
computes it. Used on CPU, where cuDNN does not exist (tests/test_full_cp.py, tests/test_context_parallel_overlap.py).
"""

from __future__ import annotations

import math

import torch

from ssa_kernels import full as kfull


def _scores(q, k, causal, scale):
    """``[b, HQ, L, S]`` scaled logits (causal: square piece, upper triangle masked) and the GQA group size."""
    g = q.shape[1] // k.shape[1]
    s = scale * q @ k.repeat_interleave(g, 1).transpose(-1, -2)
    if causal:
        assert q.shape[2] == k.shape[2], "causal pieces are square"
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
    return s, g


def _exact_forward(q, k, v, causal, scale):
    s, g = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v.repeat_interleave(g, 1), lse, ("piece", q.shape[2], k.shape[2], causal)


def _exact_backward(grad_out, q, k, v, out, lse, saved, causal, scale):
    """Flash-attention backward from (out, lse), as cuDNN computes it: P from lse, delta = rowsum(dO · out)."""
    assert saved == ("piece", q.shape[2], k.shape[2], causal)  # each piece gets its own forward's state
    s, g = _scores(q, k, causal, scale)
    b, hkv, n_k, d = k.shape
    p = torch.exp(s - lse[..., None])
    dv = (p.transpose(-1, -2) @ grad_out).view(b, hkv, g, n_k, d).sum(2)
    dp = grad_out @ v.repeat_interleave(g, 1).transpose(-1, -2)
    ds = p * (dp - (grad_out * out).sum(-1, keepdim=True))
    dq = scale * ds @ k.repeat_interleave(g, 1)
    dk = (scale * ds.transpose(-1, -2) @ q).view(b, hkv, g, n_k, d).sum(2)
    return dq, dk, dv


EXACT_PIECES = kfull.PieceKernel(_exact_forward, _exact_backward)
