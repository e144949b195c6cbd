"""Attention kernel benchmark on one GPU, one run: SDPA full causal vs FlexAttention vs ssa_kernels.

Times (median, triton.testing.do_bench; fwd+bwd = forward + autograd.grad of all inputs with a random upstream
gradient), B=1, bf16, random normal inputs:
  sdpa       torch F.scaled_dot_product_attention, causal, enable_gqa
  full       ssa_kernels.full_attention (the SSA full branch)
  flex       FlexAttention with a BlockMask of the same per-query budget (128-blocks, diagonal causal)
  sparse     ssa_kernels.sparse_attention on the table from ssa_kernels.select_blocks, called as the SSA layer
             calls it without documents (starts_on_grid=True: the backward does not check the table on the host)
  ssa_layer  ssa_megatron.ssa.attention.ssa_attention(training=True): selection + both branches + gate +
             alignment loss (mode sparse, alpha 10)
  layer:serial  the same layer with both branches on one CUDA stream (ssa.overlap_branches off)
  select     ssa_kernels.select_blocks (group_softmax) alone
  fla_nsa    fla-core's selected-block attention (fla.ops.nsa.parallel.ParallelNSAFunction: no compression or
             window branch) on the sparse row's table converted to fla's layout (fla_table), when fla is importable
             and the shape is inside fla's limits (fla_limits); ratios ours/fla = sparse time / fla time
  --compare: select:stream / layer:stream = the selection with the streaming top-k only (the v3 algorithm of
             docs/kernels_notes.md, pass 1 in BN-block chunks; heavy tiles first, as in production) alone and in
             the layer; gate:torch / gate:fused = the gate of both branches + alignment loss alone
Ratios: vs SDPA full of the same shape/T; "dens" = density-scaled SDPA time (SDPA × selected pairs / causal
pairs). Usage: python tools/bench_attention.py [--quick] [--json out.json] [--no-flex] [--no-long] [--no-fla]
[--sparse-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import ssa_kernels as K
from ssa_kernels import select as KSEL
from ssa_megatron.config import SSAConfig
from ssa_megatron.ssa.attention import ssa_attention

DEV = "cuda"
DT = torch.bfloat16


def bench(fn, rep=100):
    return do_bench(fn, warmup=20, rep=rep, return_mode="median")


def select_variant(**launch):
    """``select_blocks`` with launch parameters ``launch`` (``select_config`` keys) in place of production's."""
    @torch.no_grad()
    def select_blocks(q, k, block_size, top_k, *args, **kwargs):
        sel = KSEL.prepare_selection(q, k, block_size, top_k, *args, **kwargs)
        return KSEL.launch_selection(sel, {**KSEL.select_config(sel.g, top_k), **launch})
    return select_blocks


def make(t, hq, hkv, d, grad=True):
    q = torch.randn(t, 1, hq, d, device=DEV, dtype=DT, requires_grad=grad)
    k = torch.randn(t, 1, hkv, d, device=DEV, dtype=DT, requires_grad=grad)
    v = torch.randn(t, 1, hkv, d, device=DEV, dtype=DT, requires_grad=grad)
    return q, k, v


def sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                       is_causal=True, enable_gqa=True)
    return o.permute(2, 0, 1, 3)


def fwd_bwd(f, inputs, do):
    def run():
        out = f()
        torch.autograd.grad(out, inputs, do)
    return run


def selected_pairs(idx, bs, t):
    """Attended (query, key) pairs of one KV head's table (same for every query head)."""
    tab = idx[0, 0].long()
    pos = torch.arange(t, device=DEV)[:, None]
    n = (torch.minimum(tab + bs, pos + 1) - tab).clamp_min(0)
    return int(torch.where(tab >= 0, n, 0).sum())


_FLEX = {}


def flex_setup():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_mask(t, rf):
    from torch.nn.attention.flex_attention import BlockMask
    blk = 128
    nqb = t // blk
    nsel = max(1, rf // blk)
    gen = torch.Generator(device=DEV).manual_seed(0)
    r = torch.rand(nqb, nqb, device=DEV, generator=gen)
    ar = torch.arange(nqb, device=DEV)
    r = r.masked_fill(ar[None, :] >= ar[:, None], 2.0)
    earlier = r.argsort(dim=1)[:, : max(nsel - 1, 1)]
    nfull = torch.clamp(ar, max=nsel - 1).to(torch.int32)
    full_idx = torch.sort(torch.where(torch.arange(earlier.shape[1], device=DEV)[None, :] < nfull[:, None],
                                      earlier, nqb + 1), dim=1).values.clamp(max=nqb - 1)
    full_indices = torch.zeros(1, 1, nqb, nqb, dtype=torch.int32, device=DEV)
    full_indices[..., : full_idx.shape[1]] = full_idx.to(torch.int32)
    kv_indices = torch.zeros(1, 1, nqb, nqb, dtype=torch.int32, device=DEV)
    kv_indices[..., 0] = ar.to(torch.int32)

    def causal(b, h, qi, ki):
        return qi >= ki

    return BlockMask.from_kv_blocks(torch.ones(1, 1, nqb, dtype=torch.int32, device=DEV), kv_indices,
                                    nfull.view(1, 1, nqb), full_indices, BLOCK_SIZE=blk, mask_mod=causal)


def flex_call(q, k, v, mask):
    fn = flex_setup()
    o = fn(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), block_mask=mask, enable_gqa=True)
    return o.permute(2, 0, 1, 3)


def fla_limits(hq: int, hkv: int, d: int) -> str | None:
    """Why fla-core 0.6.0's NSA selection kernels cannot run heads ``hq``/``hkv`` at head dim ``d`` (one line), or
    None. The G query heads of a group are a tile dimension of every kernel (``tl.arange(0, G)``, the M of
    ``tl.dot``), hence a power of two >= 16; the forward holds the whole head dim in one tile of at most 256."""
    g = hq // hkv
    if hq % hkv or g < 16 or g & (g - 1):
        return f"HQ/HKV = {hq}/{hkv}: fla-core's NSA kernels need a group of a power of two >= 16 query heads"
    if d > 256:
        return f"D = {d}: fla-core's NSA forward takes head dims up to 256"
    return None


def fla_table(block_idx: torch.Tensor, counts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our selection table in fla's NSA layout, the same blocks per (query token, KV head).

    ``block_idx [b, HKV, sq, K]`` int32 block starts (ascending, -1 padded) and ``counts [b, HKV, sq]`` (as
    ``select_blocks`` returns them) -> ``block_indices [b, sq, HKV, S]`` int32 block numbers (start //
    block_size), -1 padded, and ``block_counts [b, sq, HKV]`` int32. ``S`` is ``K`` rounded up to a power of two,
    because fla's backward builds its reverse index with ``tl.arange(0, S)``; fla skips -1 slots. fla's table holds
    block numbers, so every start must lie on the block grid (no documents)."""
    used = block_idx >= 0
    off_grid = used & (block_idx % block_size != 0)
    if bool(off_grid.any()):
        raise ValueError(f"block_idx: start {int(block_idx[off_grid][0])} is not a multiple of block_size="
                         f"{block_size}; fla's table holds block numbers, so starts must be on the block grid")
    blocks = torch.where(used, block_idx // block_size, -1).to(torch.int32)
    top_k = blocks.shape[-1]
    s = 1 << (top_k - 1).bit_length()
    blocks = F.pad(blocks, (0, s - top_k), value=-1)
    return blocks.permute(0, 2, 1, 3).contiguous(), counts.permute(0, 2, 1).to(torch.int32).contiguous()


def fla_selected_attention():
    """fla-core's selected-block attention (``ParallelNSAFunction``), or None, saying why in one line, when there is
    no CUDA device (fla's NSA ops are Triton GPU kernels) or fla-core is not installed (an optional extra)."""
    if not torch.cuda.is_available():
        print("fla_nsa: no rows: fla-core's NSA kernels need a CUDA device", flush=True)
        return None
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction
    except ImportError as err:
        print(f"fla_nsa: no rows: fla-core is not installed ({err}); pip install -e \".[nsa]\"", flush=True)
        return None
    return ParallelNSAFunction


def fla_peer(add, fla_fn, sname, t, cfg, q, k, v, do, idx, counts, bs, ours):
    """fla's selected-block attention on the identical table, fwd and fwd+bwd, beside ours (``ours`` = the sparse
    row's (fwd, fwd+bwd) ms). fla's layout is [B, T, H, D]: at B = 1 that is a view of ours, so no copy is timed."""
    hq, d = q.shape[2], q.shape[3]
    table, nblk = fla_table(idx, counts, bs)
    qf, kf, vf = (x.detach().view(1, t, x.shape[2], d).requires_grad_() for x in (q, k, v))
    dof = do.view(1, t, hq, d)
    scale = d ** -0.5  # ours defaults to the same

    def call():
        return fla_fn.apply(qf, kf, vf, table, nblk, bs, scale, None)

    # the same table must give the same attention: check once before timing (bf16 rounding only)
    o_ours = K.sparse_attention(q, k, v, idx, bs)[0]
    g_ours = torch.autograd.grad(o_ours, (q, k, v), do)
    o_fla = call()
    g_fla = torch.autograd.grad(o_fla, (qf, kf, vf), dof)
    errs = [((a.float().reshape(-1) - b.float().reshape(-1)).norm() / a.float().norm()).item()
            for a, b in zip((o_ours, *g_ours), (o_fla, *g_fla))]
    print(f"   fla_nsa check {cfg}: rel err vs ours out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} "
          f"dv {errs[3]:.1e}", flush=True)
    del o_ours, g_ours, o_fla, g_fla
    fl_f = bench(call)
    fl_fb = bench(fwd_bwd(call, (qf, kf, vf), dof))
    add(shape=sname, T=t, what="fla_nsa", cfg=cfg, fwd=fl_f, fb=fl_fb,
        ratios={"ours/fla_f": ours[0] / fl_f, "ours/fla_fb": ours[1] / fl_fb})


def gate_micro(add, sname, t, hq, d):
    """Gate of both branches + alignment loss alone, fwd+bwd: torch (reference functions) vs the fused kernel.
    The ungated outputs are laid out as the branches return them (full: a permuted [b, HQ, sq, D] view)."""
    from ssa_megatron.ssa import reference as R
    o_f = torch.randn(1, hq, t, d, device=DEV, dtype=DT).permute(2, 0, 1, 3).requires_grad_()
    o_s = torch.randn(t, 1, hq, d, device=DEV, dtype=DT, requires_grad=True)
    gate = torch.randn(t, 1, hq, device=DEV, dtype=DT, requires_grad=True)
    do = torch.randn(t, 1, hq, d, device=DEV, dtype=DT)

    def torch_path():
        gs = R.apply_gate(o_s, gate)
        loss, _, _ = R.alignment_loss(R.apply_gate(o_f, gate), gs, 1.0)
        return gs, loss

    def fused_path():
        y, loss, _ = K.gate_and_align(o_f, o_s, gate, 1.0, "sparse")
        return y, loss

    res = {}
    for name, fn in (("torch", torch_path), ("fused", fused_path)):
        def fb(fn=fn):
            y, loss = fn()
            torch.autograd.grad((y * do).sum() + loss, (o_f, o_s, gate))
        res[name] = (bench(lambda fn=fn: fn()), bench(fb))
    (yt, lt), (yf, lf) = torch_path(), fused_path()
    err = ((yt.float() - yf.float()).norm() / yt.float().norm()).item()
    print(f"   gate+loss check: out rel err {err:.2e}, loss torch {lt.item():.6f} fused {lf.item():.6f}", flush=True)
    add(shape=sname, T=t, what="gate:torch", fwd=res["torch"][0], fb=res["torch"][1])
    add(shape=sname, T=t, what="gate:fused", fwd=res["fused"][0], fb=res["fused"][1],
        ratios={"saved_fb_ms": res["torch"][1] - res["fused"][1]})
    del o_f, o_s, gate, do


def profile_breakdown(add):
    """Where the time goes at T=32k, 32/2/64: selection variants, sparse kernels one by one."""
    from ssa_kernels import full as KF
    from ssa_kernels import sparse as KS
    t, hq, hkv, d = 32768, 32, 2, 64
    q, k, v = make(t, hq, hkv, d)
    do = torch.randn(t, 1, hq, d, device=DEV, dtype=DT)
    for backend in ("cudnn", "flash"):
        # "flash": the FA2 op full_attention falls back to when cuDNN declines the inputs (forced by the probe flag)
        KF._CUDNN_OK = None if backend == "cudnn" else False
        fb = bench(fwd_bwd(lambda: K.full_attention(q, k, v)[0], (q, k, v), do))
        add(shape="32/2/64", T=t, what=f"full:{backend}", fb=fb)
    KF._CUDNN_OK = None
    g = hq // hkv
    for bs, kk in ((16, 16), (64, 32)):
        cfg = f"{bs}x{kk}"
        qd, kd = q.detach(), k.detach()
        for label, launch, score in (("sel", {}, "group_softmax"), ("sel:dot", {}, "dot"),
                                     ("sel:BQ8", {"BQ": 8}, "group_softmax"),
                                     ("sel:BQ2", {"BQ": 2}, "group_softmax"),
                                     ("sel:BN128", {"BN": 128}, "group_softmax"),
                                     ("sel:8warp", {"num_warps": 8}, "group_softmax")):
            select = select_variant(**launch)
            try:
                ms = bench(lambda: select(qd, kd, bs, kk, score))
                add(shape="32/2/64", T=t, what=label, cfg=cfg, fwd=ms)
            except Exception as e:  # noqa: BLE001
                print(f"{label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        idx, _ = K.select_blocks(qd, kd, bs, kk)
        idx = idx.contiguous()
        scale = d ** -0.5
        fwd_cfg, dq_cfg = KS.fwd_config(g, bs, d), KS.dq_config(g, bs, d)
        o, lse = KS.sparse_forward(q, k, v, idx, None, bs, scale, fwd_cfg)
        add(shape="32/2/64", T=t, what="sp:fwd", cfg=cfg,
            fwd=bench(lambda: KS.sparse_forward(q, k, v, idx, None, bs, scale, fwd_cfg)))
        add(shape="32/2/64", T=t, what="sp:dq", cfg=cfg,
            fwd=bench(lambda: KS.launch_dq(q, k, v, o, lse, do, None, idx, None, bs, scale, dq_cfg)))
        _, stats = KS.launch_dq(q, k, v, o, lse, do, None, idx, None, bs, scale, dq_cfg)
        add(shape="32/2/64", T=t, what="sp:grid", cfg=cfg, fwd=bench(lambda: KS._grid_for_table(idx, t, bs, DEV)))
        add(shape="32/2/64", T=t, what="sp:csr", cfg=cfg, fwd=bench(lambda: KS.build_reverse_index(idx, t)))
        kst, ken = KS._grid_for_table(idx, t, bs, DEV)
        rptr, ridx = KS.build_reverse_index(idx, t)
        for rows in (64, 128, 256):  # query rows (tokens x heads) per dK/dV step
            dkdv_cfg = KS.dkdv_config(g, bs, d)
            dkdv_cfg["TQ"] = max(1, rows // dkdv_cfg["GP"])
            dkdv_cfg["num_warps"] = 4 if dkdv_cfg["TQ"] * dkdv_cfg["GP"] * d <= 64 * 64 else 8
            try:
                ms = bench(lambda: KS.launch_dkdv(q, k, v, do, stats, None, kst, ken, rptr, ridx, bs, scale,
                                                  dkdv_cfg))
                add(shape="32/2/64", T=t, what=f"sp:dkdv{rows}", cfg=cfg, fwd=ms)
            except Exception as e:  # noqa: BLE001
                print(f"dkdv rows={rows} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        cnts = torch.bincount(idx[0, 0][idx[0, 0] >= 0].long() // bs)
        print(f"   reverse-index list lengths {cfg}: mean {cnts.float().mean():.0f} max {int(cnts.max())}", flush=True)
    del q, k, v, do
    gc.collect()
    torch.cuda.empty_cache()


def profile_layer(step, path):
    """Kernel time table of a few fwd+bwd steps of the SSA layer, and a Chrome trace at ``path``.json."""
    import os

    from torch.profiler import ProfilerActivity, profile
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(path + ".json")
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    print(f"--- profile {path} (5 steps) ---\n{table}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8k only, no 128k, no small groups")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-long", action="store_true")
    ap.add_argument("--no-fla", action="store_true", help="skip fla-core's NSA selection kernel (the fla_nsa rows)")
    ap.add_argument("--sparse-only", action="store_true",
                    help="time only the sparse kernel and its fla_nsa peer per shape, T and block x top-k (no SDPA, "
                         "full, flex, layer, small-group or 128k rows)")
    ap.add_argument("--profile", action="store_true", help="also a per-kernel breakdown at 32k")
    ap.add_argument("--profile-only", action="store_true")
    ap.add_argument("--shapes", default="32/2/64,32/8/128", help="HQ/HKV/D list")
    ap.add_argument("--ts", default="8192,32768")
    ap.add_argument("--no-small-groups", action="store_true")
    ap.add_argument("--layer-profile", default=None, metavar="DIR",
                    help="profile the 16x16 SSA layer (serial and overlapped branches) at each T into DIR")
    ap.add_argument("--compare", action="store_true",
                    help="also time the previous selection in the same run (alone and in the layer) and the gate + "
                         "loss alone")
    args = ap.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    rows = []
    print(f"# {name}  torch {torch.__version__}  {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC", flush=True)

    def add(**r):
        rows.append(r)
        f = lambda x: "-" if x is None else f"{x:8.3f}"  # noqa: E731
        print(f"{r['shape']:14s} T={r['T']:6d} {r['what']:10s} {r.get('cfg', ''):8s} fwd {f(r.get('fwd'))} ms "
              f"fwd+bwd {f(r.get('fb'))} ms  " + " ".join(f"{k}={v:.3f}" for k, v in r.get('ratios', {}).items()),
              flush=True)

    if args.profile or args.profile_only:
        profile_breakdown(add)
        if args.profile_only:
            return
    shapes = [(x, *map(int, x.split("/"))) for x in args.shapes.split(",")]
    ts = [8192] if args.quick else [int(x) for x in args.ts.split(",")]
    sparse_cfgs = [(16, 16), (64, 32)]
    fla_fn = None if args.no_fla else fla_selected_attention()
    for sname, hq, hkv, d in shapes:
        fla_why = fla_limits(hq, hkv, d)
        if fla_fn is not None and fla_why:
            print(f"fla_nsa: no rows at {sname}: {fla_why}", flush=True)
        for t in ts:
            q, k, v = make(t, hq, hkv, d)
            do = torch.randn(t, 1, hq, d, device=DEV, dtype=DT)
            if not args.sparse_only:
                s_f = bench(lambda: sdpa(q, k, v))
                s_fb = bench(fwd_bwd(lambda: sdpa(q, k, v), (q, k, v), do))
                add(shape=sname, T=t, what="sdpa", fwd=s_f, fb=s_fb)
                f_f = bench(lambda: K.full_attention(q, k, v)[0])
                f_fb = bench(fwd_bwd(lambda: K.full_attention(q, k, v)[0], (q, k, v), do))
                add(shape=sname, T=t, what="full", fwd=f_f, fb=f_fb, ratios={"xSDPA_fb": f_fb / s_fb})
            for bs, kk in sparse_cfgs:
                cfg = f"{bs}x{kk}"
                idx, counts = K.select_blocks(q.detach(), k.detach(), bs, kk)
                pairs = selected_pairs(idx, bs, t)
                dens = pairs / (t * (t + 1) / 2)
                sp_f = bench(lambda: K.sparse_attention(q, k, v, idx, bs, starts_on_grid=True)[0])
                sp_fb = bench(fwd_bwd(lambda: K.sparse_attention(q, k, v, idx, bs, starts_on_grid=True)[0],
                                      (q, k, v), do))
                ratios = {"density": dens}
                if not args.sparse_only:
                    ratios = {"xSDPA_fb": sp_fb / s_fb, "xDens_fb": sp_fb / (s_fb * dens), **ratios}
                add(shape=sname, T=t, what="sparse", cfg=cfg, fwd=sp_f, fb=sp_fb, ratios=ratios)
                if fla_fn is not None and not fla_why:
                    fla_peer(add, fla_fn, sname, t, cfg, q, k, v, do, idx, counts, bs, (sp_f, sp_fb))
                if args.sparse_only:
                    continue
                sel = bench(lambda: K.select_blocks(q.detach(), k.detach(), bs, kk))
                add(shape=sname, T=t, what="select", cfg=cfg, fwd=sel, ratios={"xSparse_fb": sel / sp_fb})
                if not args.no_flex and t == 32768:
                    try:
                        mask = flex_mask(t, bs * kk)
                        fl_f = bench(lambda: flex_call(q, k, v, mask))
                        fl_fb = bench(fwd_bwd(lambda: flex_call(q, k, v, mask), (q, k, v), do))
                        add(shape=sname, T=t, what="flex", cfg=f"128x{bs * kk // 128}", fwd=fl_f, fb=fl_fb,
                            ratios={"xSDPA_fb": fl_fb / s_fb, "sparse_speedup": fl_fb / sp_fb})
                    except Exception as e:  # noqa: BLE001
                        print(f"flex failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                scfg = SSAConfig(block_size=bs, top_k=kk, alpha=10.0, backend="auto")
                gate = torch.randn(t, 1, hq, device=DEV, dtype=DT, requires_grad=True)

                def layer(ssa_cfg=scfg):
                    out, loss, _ = ssa_attention(q, k, v, gate, ssa_cfg, "sparse", training=True)
                    return out, loss

                one = torch.ones((), device=DEV)

                def layer_fb(ssa_cfg=scfg):  # upstream gradients given directly, as for SDPA (no mul/sum passes)
                    out, loss = layer(ssa_cfg)
                    torch.autograd.grad((out, loss), (q, k, v, gate), (do, one))

                l_f = bench(lambda: layer())
                l_fb = bench(layer_fb)
                add(shape=sname, T=t, what="ssa_layer", cfg=cfg, fwd=l_f, fb=l_fb,
                    ratios={"xSDPA_fb": l_fb / s_fb, "xSDPA_f": l_f / s_f})
                serial = dataclasses.replace(scfg, overlap_branches=False)  # both branches on one stream
                o_f, o_fb = bench(lambda: layer(serial)), bench(lambda: layer_fb(serial))
                add(shape=sname, T=t, what="layer:serial", cfg=cfg, fwd=o_f, fb=o_fb,
                    ratios={"xSDPA_fb": o_fb / s_fb, "overlap_saves_fb_ms": o_fb - l_fb})
                if args.layer_profile and (bs, kk) == (16, 16):
                    for label, variant in (("serial", serial), ("overlap", scfg)):
                        profile_layer(lambda: layer_fb(variant), f"{args.layer_profile}/layer_{t}_{label}")
                if args.compare:
                    # the streaming top-k (pass 1 in BN-block chunks, one stage) alone and in the layer, same run
                    stream = select_variant(BUCKET_R=0, P1_STAGES=1, BN1=KSEL.select_tiles(hq // hkv, kk)[2])
                    sel0 = bench(lambda: stream(q.detach(), k.detach(), bs, kk))
                    add(shape=sname, T=t, what="select:stream", cfg=cfg, fwd=sel0, ratios={"new/old": sel / sel0})
                    K.select_blocks = stream  # what ssa_attention calls on this backend
                    try:
                        o_f, o_fb = bench(lambda: layer()), bench(layer_fb)
                    finally:
                        K.select_blocks = KSEL.select_blocks
                    add(shape=sname, T=t, what="layer:stream", cfg=cfg, fwd=o_f, fb=o_fb,
                        ratios={"xSDPA_fb": o_fb / s_fb, "new/old_fb": l_fb / o_fb})
            if args.compare and not args.sparse_only:
                gate_micro(add, sname, t, hq, d)
            del q, k, v, do
            gc.collect()
            torch.cuda.empty_cache()

    if not args.quick and not args.no_small_groups and not args.sparse_only:
        # small groups at one setting: T=8k, HQ=32, D=64, 16x16; per query head (HQ fixed) vs G=16
        t, hq, d = 8192, 32, 64
        base = None
        for g in (16, 8, 4, 1):
            hkv = hq // g
            q, k, v = make(t, hq, hkv, d)
            do = torch.randn(t, 1, hq, d, device=DEV, dtype=DT)
            idx, _ = K.select_blocks(q.detach(), k.detach(), 16, 16)
            sp_f = bench(lambda: K.sparse_attention(q, k, v, idx, 16, starts_on_grid=True)[0])
            sp_fb = bench(fwd_bwd(lambda: K.sparse_attention(q, k, v, idx, 16, starts_on_grid=True)[0], (q, k, v),
                                  do))
            sel = bench(lambda: K.select_blocks(q.detach(), k.detach(), 16, 16))
            base = base or sp_fb
            add(shape=f"G={g} ({hq}/{hkv}/{d})", T=t, what="sparse", cfg="16x16", fwd=sp_f, fb=sp_fb,
                ratios={"xG16_fb": sp_fb / base, "select_ms": sel})
    if not args.quick and not args.no_long and not args.sparse_only:
        t = 131072
        for sname, hq, hkv, d in shapes:
            q, k, v = make(t, hq, hkv, d, grad=False)
            s_f = bench(lambda: sdpa(q, k, v), rep=50)
            add(shape=sname, T=t, what="sdpa", fwd=s_f)
            for bs, kk in sparse_cfgs:
                idx, _ = K.select_blocks(q, k, bs, kk)
                sel = bench(lambda: K.select_blocks(q, k, bs, kk), rep=50)
                sp_f = bench(lambda: K.sparse_attention(q, k, v, idx, bs)[0], rep=50)
                add(shape=sname, T=t, what="sparse", cfg=f"{bs}x{kk}", fwd=sp_f,
                    ratios={"xSDPA_f": sp_f / s_f, "select_ms": sel, "sel+sp_xSDPA": (sel + sp_f) / s_f})
            del q, k, v
            gc.collect()
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
