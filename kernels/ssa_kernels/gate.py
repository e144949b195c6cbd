"""Fused per-head sigmoid gate + bidirectional SmoothL1 alignment loss (forward and backward).

Same semantics as ``reference.apply_gate`` on both branches followed by ``reference.alignment_loss``:

    gf = o_full * sigmoid(gate)   gs = o_sparse * sigmoid(gate)    (sigmoid in the gate's dtype, product in
                                                                     the outputs' dtype, as the reference rounds)
    sparsity   = mean SmoothL1_beta(gf − stop(gs))   commitment = mean SmoothL1_beta(stop(gf) − gs)

The two terms have the same value (float32 accumulation); the returned output is the gated branch of ``mode``.
One program handles ``BR`` rows of ``D`` elements ((token, batch, head) rows, any (s, b, h) strides with a
contiguous last dim). Forward: one read of o_full, o_sparse and the gate, one write of the selected output, one
float32 partial loss sum per program (reduced by a second, deterministic ``torch.sum``; no atomics). Backward:
one read of o_full, o_sparse, the gate and the output gradient; writes d o_full (output gradient when mode is
'full' + the sparsity term only), d o_sparse (output gradient when 'sparse' + the commitment term only) and
d gate (both branches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import next_pow2


@triton.jit
def _gated_rows(OF, OS, GATE, rows, d, nrows, B, HQ,
                s_fs, s_fb, s_fh, s_ss, s_sb, s_sh, s_gs, s_gb, s_gh,
                D: tl.constexpr, HAS_GATE: tl.constexpr):
    r_ok = rows < nrows
    t = rows // (B * HQ)
    rem = rows % (B * HQ)
    bb = rem // HQ
    hh = rem % HQ
    t64, b64, h64 = t.to(tl.int64), bb.to(tl.int64), hh.to(tl.int64)
    m = r_ok[:, None] & (d[None, :] < D)
    of_raw = tl.load(OF + (t64 * s_fs + b64 * s_fb + h64 * s_fh)[:, None] + d[None, :], mask=m, other=0.0)
    os_raw = tl.load(OS + (t64 * s_ss + b64 * s_sb + h64 * s_sh)[:, None] + d[None, :], mask=m, other=0.0)
    of = of_raw.to(tl.float32)
    osp = os_raw.to(tl.float32)
    if HAS_GATE:
        g_raw = tl.load(GATE + t64 * s_gs + b64 * s_gb + h64 * s_gh, mask=r_ok, other=0.0)
        # sigmoid rounded to the gate dtype, then to the outputs' dtype (reference: sigmoid(gate).to(out.dtype))
        sig = tl.sigmoid(g_raw.to(tl.float32)).to(g_raw.dtype).to(of_raw.dtype).to(tl.float32)
    else:
        sig = tl.full(rows.shape, 1.0, dtype=tl.float32)
    # the gated outputs, rounded to their dtype as the reference's product is
    gf = (of * sig[:, None]).to(of_raw.dtype).to(tl.float32)
    gs = (osp * sig[:, None]).to(of_raw.dtype).to(tl.float32)
    return of, osp, sig, gf, gs, m, r_ok, t64, b64, h64


@triton.jit
def _gate_align_fwd_kernel(
    OF, OS, GATE, Y, PART,
    nrows, B, HQ,
    s_fs, s_fb, s_fh, s_ss, s_sb, s_sh, s_gs, s_gb, s_gh,
    beta, half_beta, inv_beta,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, HAS_GATE: tl.constexpr, MODE_FULL: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    of, osp, sig, gf, gs, m, r_ok, t64, b64, h64 = _gated_rows(
        OF, OS, GATE, rows, d, nrows, B, HQ, s_fs, s_fb, s_fh, s_ss, s_sb, s_sh, s_gs, s_gb, s_gh, D, HAS_GATE)
    if MODE_FULL:
        y = gf
    else:
        y = gs
    tl.store(Y + rows.to(tl.int64)[:, None] * D + d[None, :], y.to(Y.dtype.element_ty), mask=m)
    z = tl.abs(gf - gs)
    if SMOOTH:
        l = tl.where(z < beta, 0.5 * z * z * inv_beta, z - half_beta)
    else:
        l = z
    l = tl.where(m, l, 0.0)
    tl.store(PART + pid, tl.sum(tl.sum(l, axis=1), axis=0))


@triton.jit
def _gate_align_bwd_kernel(
    OF, OS, GATE, DY, DLOSS, DOF, DOS, DGATE,
    nrows, B, HQ,
    s_fs, s_fb, s_fh, s_ss, s_sb, s_sh, s_gs, s_gb, s_gh, s_ys, s_yb, s_yh,
    beta, inv_beta, inv_n,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, HAS_GATE: tl.constexpr, MODE_FULL: tl.constexpr,
    SMOOTH: tl.constexpr, HAS_DY: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    of, osp, sig, gf, gs, m, r_ok, t64, b64, h64 = _gated_rows(
        OF, OS, GATE, rows, d, nrows, B, HQ, s_fs, s_fb, s_fh, s_ss, s_sb, s_sh, s_gs, s_gb, s_gh, D, HAS_GATE)
    # d loss / d r of SmoothL1 at r = gf − gs, times the loss gradient / N (mean over elements)
    dl = tl.load(DLOSS).to(tl.float32) * inv_n
    r = gf - gs
    sgn = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
    if SMOOTH:
        dr = tl.where(tl.abs(r) < beta, r * inv_beta, sgn)
    else:
        dr = sgn
    dr = tl.where(m, dr * dl, 0.0)
    dgf = dr     # sparsity term: moves only the full branch
    dgs = -dr    # commitment term: moves only the sparse branch
    if HAS_DY:
        dy = tl.load(DY + (t64 * s_ys + b64 * s_yb + h64 * s_yh)[:, None] + d[None, :], mask=m,
                     other=0.0).to(tl.float32)
        if MODE_FULL:
            dgf += dy
        else:
            dgs += dy
    off = rows.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(DOF + off, (dgf * sig[:, None]).to(DOF.dtype.element_ty), mask=m)
    tl.store(DOS + off, (dgs * sig[:, None]).to(DOS.dtype.element_ty), mask=m)
    if HAS_GATE:
        dsig = tl.sum(dgf * of + dgs * osp, axis=1)
        tl.store(DGATE + rows, (dsig * sig * (1.0 - sig)).to(DGATE.dtype.element_ty), mask=r_ok)


def _config(d: int) -> dict:
    bd = max(16, next_pow2(d))
    br = max(1, 4096 // bd)
    return dict(BD=bd, BR=br, num_warps=4 if br * bd <= 4096 else 8)


def _strides3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


class GateAlignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_full, o_sparse, gate, beta, mode_full):
        sq, b, hq, d = o_full.shape
        nrows = sq * b * hq
        cfg = _config(d)
        y = torch.empty(sq, b, hq, d, device=o_full.device, dtype=o_full.dtype)
        nprog = triton.cdiv(nrows, cfg["BR"])
        part = torch.empty(max(nprog, 1), device=o_full.device, dtype=torch.float32)
        has_gate = gate is not None
        g = gate if has_gate else o_full
        gs = _strides3(gate) if has_gate else (0, 0, 0)
        if nrows:
            _gate_align_fwd_kernel[(nprog,)](
                o_full, o_sparse, g, y, part, nrows, b, hq,
                *_strides3(o_full), *_strides3(o_sparse), *gs,
                float(beta), 0.5 * float(beta), 1.0 / beta if beta > 0 else 0.0,
                D=d, HAS_GATE=has_gate, MODE_FULL=mode_full, SMOOTH=beta > 0, **cfg,
            )
        else:
            part.zero_()
        n = nrows * d
        term = part.sum() / n if n else part.sum() * float("nan")  # torch's mean of an empty tensor: nan
        ctx.save_for_backward(o_full, o_sparse, gate if has_gate else None)
        ctx.beta, ctx.mode_full, ctx.has_gate = beta, mode_full, has_gate
        return y, term + term

    @staticmethod
    def backward(ctx, dy, dloss):
        o_full, o_sparse, gate = ctx.saved_tensors
        sq, b, hq, d = o_full.shape
        nrows = sq * b * hq
        cfg = _config(d)
        beta = ctx.beta
        dof = torch.empty(sq, b, hq, d, device=o_full.device, dtype=o_full.dtype)
        dos = torch.empty(sq, b, hq, d, device=o_full.device, dtype=o_sparse.dtype)
        dgate = torch.empty(sq, b, hq, device=o_full.device, dtype=gate.dtype) if ctx.has_gate else None
        if dloss is None:
            dloss = torch.zeros((), device=o_full.device, dtype=torch.float32)
        has_dy = dy is not None
        if has_dy and dy.stride(-1) != 1:
            dy = dy.contiguous()
        if nrows:
            _gate_align_bwd_kernel[(triton.cdiv(nrows, cfg["BR"]),)](
                o_full, o_sparse, gate if ctx.has_gate else o_full, dy if has_dy else o_full,
                dloss.reshape(()).contiguous(), dof, dos, dgate if ctx.has_gate else dof,
                nrows, b, hq,
                *_strides3(o_full), *_strides3(o_sparse), *(_strides3(gate) if ctx.has_gate else (0, 0, 0)),
                *(_strides3(dy) if has_dy else (0, 0, 0)),
                float(beta), 1.0 / beta if beta > 0 else 0.0, 1.0 / (nrows * d),
                D=d, HAS_GATE=ctx.has_gate, MODE_FULL=ctx.mode_full, SMOOTH=beta > 0, HAS_DY=has_dy, **cfg,
            )
        return dof, dos, dgate, None, None


def gate_and_align(o_full: Tensor, o_sparse: Tensor, gate: Tensor | None, beta: float = 1.0,
                   mode: str = "sparse") -> tuple[Tensor, Tensor, Tensor]:
    """Gates both ungated branch outputs and computes their alignment loss in one pass.

    Args:
        o_full, o_sparse: ``[sq, b, HQ, D]`` ungated outputs (same dtype; any (s, b, h) strides).
        gate: ``[sq, b, HQ]`` gate logits or None (no gate).
        beta: SmoothL1 beta (0: L1).
        mode: which gated branch to return, 'full' or 'sparse'.

    Returns:
        ``(gated output of mode, total loss (differentiable, float32), one term (detached))``; the sparsity and
        commitment terms have the same value.
    """
    if mode not in ("full", "sparse"):
        raise ValueError(f"mode={mode!r}: must be 'full' or 'sparse'")
    if o_full.shape != o_sparse.shape or o_full.dim() != 4:
        raise ValueError(f"o_full {tuple(o_full.shape)} and o_sparse {tuple(o_sparse.shape)} must be the same "
                         f"4-D shape")
    if o_full.dtype != o_sparse.dtype:
        raise ValueError(f"o_full and o_sparse must have the same dtype, got {o_full.dtype} and {o_sparse.dtype}")
    if gate is not None and gate.shape != o_full.shape[:3]:
        raise ValueError(f"gate must have shape [sq, b, HQ] = {tuple(o_full.shape[:3])}, got {tuple(gate.shape)}")
    if o_full.stride(-1) != 1:
        o_full = o_full.contiguous()
    if o_sparse.stride(-1) != 1:
        o_sparse = o_sparse.contiguous()
    y, total = GateAlignFn.apply(o_full, o_sparse, gate, float(beta), mode == "full")
    return y, total, (total.detach() / 2)
