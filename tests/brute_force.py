"""A brute-force float64 oracle of docs/ssa.md rules 1-4 and 10, token by token with Python loops.

It shares no code with ``ssa_megatron.ssa.reference``: documents, block grids, pooled keys, scores, the top-k
rule and the attention masks are re-derived here from the definitions, one query at a time. The switches
``selection: authors_chunked`` and ``normaliser: authors`` (cfg keys, default exact / earlier_blocks) are
re-derived from the authors' kernel: :func:`authors_chunked_topk` replays its list of chunk winners step by step.
"""

from __future__ import annotations

import math

import torch


def documents_of_row(cu_seqlens: list[int] | None, row: int, s: int) -> list[tuple[int, int]]:
    """Row-relative (start, end) of each document in ``row``."""
    if cu_seqlens is None:
        return [(0, s)]
    lo, hi = row * s, (row + 1) * s
    bounds = [c for c in cu_seqlens if lo <= c <= hi]
    return [(a - lo, b - lo) for a, b in zip(bounds[:-1], bounds[1:])]


def doc_of(docs: list[tuple[int, int]], t: int) -> tuple[int, int]:
    return next((a, b) for a, b in docs if a <= t < b)


def select_one(q, k, row, n, t, cfg, docs, scale):
    """Selected block starts (sorted) for query position t, KV head n; ``q [HQ, D]`` is the query's heads."""
    bs, top_k = cfg["block_size"], cfg["top_k"]
    ds, _ = doc_of(docs, t)
    own = ds + (t - ds) // bs * bs
    earlier = list(range(ds, own, bs))
    hq, hkv = q.shape[0], k.shape[2]
    g = hq // hkv
    heads = range(n * g, (n + 1) * g)
    # authors' normaliser: the complete blocks up to the query, so the own block too when t is its last token
    normalised = earlier + ([own] if cfg.get("normaliser") == "authors" and t == own + bs - 1 else [])
    pooled = {p: k[p:p + bs, row, n].mean(dim=0) for p in normalised}
    scores = {}
    if earlier:
        if cfg["score"] == "group_softmax":
            for h in heads:
                logits = {p: scale * float(q[h] @ pooled[p]) for p in normalised}
                m = max(logits.values())
                z = sum(math.exp(x - m) for x in logits.values())
                for p in earlier:
                    scores[p] = scores.get(p, 0.0) + math.exp(logits[p] - m) / z
        else:
            for p in earlier:
                scores[p] = sum(float(q[h] @ pooled[p]) for h in heads) / g
    if cfg.get("selection", "exact") == "authors_chunked":
        return authors_chunked_topk(scores, own, ds, bs, top_k)
    forced = {own}
    forced |= {p for p in earlier if p < ds + cfg["sink_blocks"] * bs}
    forced |= {p for p in earlier if p >= own - cfg["local_blocks"] * bs}
    rest = sorted((p for p in earlier if p not in forced), key=lambda p: (-scores[p], -p))
    chosen = sorted(forced | set(rest[: max(0, top_k - len(forced))]))
    return chosen


def authors_chunked_topk(scores, own, ds, bs, top_k):
    """The authors' top-k (``parallel_nsa_kernel_topk``, chunk of C = bs blocks) replayed on a Python list.

    Entries are (score, start) for the C blocks of each chunk up to the own block's: earlier blocks carry their
    score, the own block +inf (the kernel gives it the maximum, 1 per head), later blocks are empty. The first
    chunk's C entries, sorted, make the list; each later chunk replaces it by the sorted union of its best C/2 and
    the chunk's best C/2. The selection is the valid entries among the list's first ``top_k``.
    """
    c = bs
    own_no = (own - ds) // bs

    def ranked(entries):  # best first, ties to the later block, empty entries last
        return sorted(entries, key=lambda e: (e[1] is None, -e[0], -(e[1] or 0)))

    kept = []
    for chunk in range(own_no // c + 1):
        entries = []
        for j in range(chunk * c, chunk * c + c):
            start = ds + j * bs
            if j < own_no:
                entries.append((scores[start], start))
            elif j == own_no:
                entries.append((math.inf, start))
            else:
                entries.append((-math.inf, None))
        kept = ranked(entries) if chunk == 0 else ranked(kept[: c // 2] + ranked(entries)[: c // 2])
    return sorted(start for _, start in kept[:top_k] if start is not None)


def brute_force(q, k, v, cfg, cu_seqlens=None, q_positions=None, scale=None):
    """Returns (block_sets[b][n][i] list, sparse_out [sq,b,HQ,D], full_out [sq,b,HQ,D]) in float64."""
    q, k, v = q.double(), k.double(), v.double()
    sq, b, hq, d = q.shape
    skv, hkv = k.shape[0], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    positions = list(range(skv - sq, skv)) if q_positions is None else [int(x) for x in q_positions]
    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens]
    sets = [[[None] * sq for _ in range(hkv)] for _ in range(b)]
    sparse_out = torch.zeros(sq, b, hq, d, dtype=torch.float64)
    full_out = torch.zeros(sq, b, hq, d, dtype=torch.float64)
    for row in range(b):
        docs = documents_of_row(cu, row, skv)
        for i, t in enumerate(positions):
            ds, _ = doc_of(docs, t)
            for n in range(hkv):
                chosen = select_one(q[i, row], k, row, n, t, cfg, docs, scale)
                sets[row][n][i] = chosen
                sparse_keys = [j for p in chosen for j in range(p, p + cfg["block_size"]) if j <= t]
                full_keys = list(range(ds, t + 1))
                for h in range(n * g, (n + 1) * g):
                    for keys, out in ((sparse_keys, sparse_out), (full_keys, full_out)):
                        logits = torch.stack([scale * (q[i, row, h] @ k[j, row, n]) for j in keys])
                        w = torch.softmax(logits, dim=0)
                        out[i, row, h] = sum(w[a] * v[j, row, n] for a, j in enumerate(keys))
    return sets, sparse_out, full_out
