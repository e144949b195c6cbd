"""Small launch of every kernel family, for `compute-sanitizer --tool memcheck python3 ...` on a GPU."""

import torch

import ssa_kernels as K
from ssa_kernels import select as SEL

dev, dt = "cuda", torch.bfloat16
for (t, hq, hkv, d, bs, kk, score, docs) in [(300, 16, 1, 64, 16, 4, "group_softmax", None),
                                              (333, 4, 4, 128, 64, 3, "dot", None),
                                              (400, 6, 2, 64, 32, 5, "group_softmax", [0, 150, 400])]:
    q = torch.randn(t, 1, hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(t, 1, hkv, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(t, 1, hkv, d, device=dev, dtype=dt, requires_grad=True)
    cu = torch.tensor(docs, device=dev) if docs else None
    idx, cnt = K.select_blocks(q.detach(), k.detach(), bs, kk, score, cu_seqlens=cu)
    out, lse = K.sparse_attention(q, k, v, idx, bs)
    (out.float().square().sum() + lse.sum()).backward()
    fo, _ = K.full_attention(q, k, v, cu)
    fo.float().sum().backward()
# the bucketed selection with buckets too small for its top-k: most tiles overflow and are recomputed exactly
q = torch.randn(1000, 1, 16, 64, device=dev, dtype=dt)
k = torch.randn(1000, 1, 1, 64, device=dev, dtype=dt)
sel = SEL.prepare_selection(q, k, 16, 16)
idx_small, _ = SEL.launch_selection(sel, {**SEL.select_config(16, 16), "BUCKET_R": 2})
idx_exact, _ = SEL.launch_selection(sel, {**SEL.select_config(16, 16), "BUCKET_R": 0})
assert torch.equal(idx_small, idx_exact), "overflow recomputation"
torch.cuda.synchronize()
print("sanitize_run: done")
