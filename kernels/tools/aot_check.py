"""Compile every ssa_kernels kernel, and the HF decode step's projection kernels, for sm_90 on a machine without a
GPU (no TRITON_INTERPRET).

Catches compile errors and reports registers/spills/shared memory, whether wgmma/mma was emitted and how many
cp.async copies (pipelined loads) there are, for the configurations the wrappers launch. Usage:
python kernels/tools/aot_check.py [--select-gate] [--decode] [--ptx DIR]: ``--select-gate`` the selection and gate
kernels only, ``--decode`` the decode projections only; ``--ptx DIR`` writes each configuration's PTX there without
its debug lines, so that two trees' code can be compared with ``diff -r``.
"""

import inspect
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ssa_kernels import gate as GT
from ssa_kernels import select as S
from ssa_kernels import sparse as P

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448
"""Bytes of shared memory one block may use on an H100/H200 (227 KB, opt-in); a launch above it fails."""


def compile_kernel(fn, ptr_types, constexprs, num_warps=4, num_stages=2, floats=(), ints16=()):
    # ints16: integer arguments whose launched values are multiples of 16, which the JIT specialises on (without
    # it a row stride's alignment is unknown, and the loads are neither vectorised nor pipelined)
    # constexpr parameters left out take their defaults, as at a launch (else they would compile as i32 arguments)
    defaults = {p.name: p.default for p in fn.params
                if p.is_constexpr and p.name not in constexprs and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ptr_types or n in ints16}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=TARGET,
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    return dict(shared=k.metadata.shared, regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                wgmma=len(re.findall("wgmma.mma_async", ptx)), mma=len(re.findall(r"mma\.sync", ptx)),
                cp_async=len(re.findall(r"cp\.async\.", ptx)), ptx=ptx)


def decode_rows(dt):
    """The decode projections (ssa_megatron/hf/decode_triton.py) as a 1B decode step launches them: the GEMV at one
    row and the multi-row kernel at 32 (``_rows_launch``, with the fused modules' counters; the LM head has none),
    each weight with what the decoder layer fuses into it (SwiGLU's activation: before down at one row, after
    gate|up at 32)."""
    from ssa_megatron.hf import decode_triton as DT

    rows = []
    for name, n, k, norm, swiglu, residual, tickets in [("q|k|v|g+norm", 2336, 2048, True, False, False, True),
                                                         ("o+residual", 2048, 2048, False, False, True, True),
                                                         ("gate|up+norm", 16384, 2048, True, False, False, True),
                                                         ("down+SwiGLU+residual", 2048, 8192, False, True, True, True),
                                                         ("lm_head", 128256, 2048, False, False, False, False)]:
        flags = dict(SWIGLU=swiglu, NORM=norm, RESIDUAL=residual)
        ptr = {p: dt for p in ("x_ptr", "w_ptr", "out_ptr", "norm_ptr", "res_ptr")}
        bn, bk, stages, nw = DT._gemv_setting(k, norm)
        info = compile_kernel(DT._gemv_kernel, ptr, dict(**flags, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages), nw,
                              floats=("eps",), ints16=("n", "k", "w_sn"))
        rows.append((f"decode gemv {name}", info))
        # at more rows the MLP's activation follows gate|up instead of preceding down
        flags.update(SWIGLU=False, SWIGLU_OUT=name.startswith("gate|up"))
        (bn, bk, stages, nw), blocks, splits, span = DT._rows_launch(n, k, norm, DT.SPLIT_TICKETS if tickets else 0,
                                                                     flags["SWIGLU_OUT"])
        split = splits > 1  # unsplit launches pass the input for the buffers they never touch
        ptr.update({p: "*fp32" if split else dt for p in ("partial_ptr", "squares_ptr")},
                   tickets_ptr="*i32" if split else dt)
        ints16 = [a for a, v in dict(m=32, n=n, k=k, span=span, w_sn=k).items() if v % 16 == 0]
        info = compile_kernel(DT._rows_kernel, ptr, dict(**flags, SPLITS=splits, BLOCK_M=32, BLOCK_N=bn, BLOCK_K=bk,
                                                         STAGES=stages), nw, floats=("eps",), ints16=ints16)
        rows.append((f"decode rows=32 {name} x{blocks * splits}", info))
    return rows


def main():
    dt = "*bf16"
    only_new = "--select-gate" in sys.argv
    ptx_dir = Path(sys.argv[sys.argv.index("--ptx") + 1]) if "--ptx" in sys.argv else None
    rows = decode_rows(dt) if not only_new else []
    if "--decode" in sys.argv:
        return report(rows, ptx_dir)
    for g, d, kk, bs, score in [(16, 64, 16, 16, 0), (4, 128, 32, 64, 0), (1, 64, 16, 16, 1), (16, 128, 256, 16, 0),
                                (8, 128, 32, 64, 1)]:
        gp, kp, _, _ = S.select_tiles(g, kk)
        ptr = {"Q": dt, "KB": dt, "CST": "*i32", "LO": "*i32", "HI": "*i32", "OWN": "*i32", "IDX": "*i32",
               "CNT": "*i32", "OVF": "*i32", "NLO": "*i32", "NCAP": "*i32", "HN": "*i32"}
        opts = S.select_config(g, kk)  # the launch parameters select_blocks uses
        nw, ns = opts.pop("num_warps"), opts.pop("num_stages")
        launches = [("", opts)]
        if opts["BUCKET_R"]:  # the bucketed launch and the exact recomputation of its overflowing tiles
            launches.append((" fixup", {**opts, "BUCKET_R": 0, "FIXUP": True}))
        if g == 16 and kk == 16:  # both streaming top-k variants at this shape too
            launches += [(f" FILTER={f}", {**opts, "BUCKET_R": 0, "FILTER": f}) for f in (False, True)]
            # the reference's switches: selection='authors_chunked' (its own launch table), normaliser='authors'
            chunked = S.select_config(g, kk, chunked=True)
            chunked.pop("num_warps"), chunked.pop("num_stages")
            launches += [(" authors_chunked", {**chunked, "CHUNKED": True, "HALF": bs // 2}),
                         (" normaliser=authors", {**opts, "NORM_OWN": True}),
                         (" authors_chunked+normaliser", {**chunked, "CHUNKED": True, "HALF": bs // 2,
                                                          "NORM_OWN": True})]
        for label, flags in launches:
            info = compile_kernel(S._select_kernel, ptr, dict(G=g, GP=gp, D=d, BD=d, KP=kp, TOPK=kk,
                                  KO=triton.next_power_of_2(kk), SINK=0, LOCAL=0, SCORE=score, **flags),
                                  nw, ns, floats=("scale_log2", "inv_g"))
            rows.append((f"select G={g} D={d} K={kk} score={score}{label}", info))
    for d, gdt in ((64, "*bf16"), (128, "*fp32"), (80, "*bf16")):
        cfg = GT._config(d)
        nw = cfg.pop("num_warps")
        for mode_full in (False, True):
            ptr = {"OF": dt, "OS": dt, "GATE": gdt, "Y": dt, "PART": "*fp32"}
            info = compile_kernel(GT._gate_align_fwd_kernel, ptr, dict(D=d, HAS_GATE=True, MODE_FULL=mode_full,
                                  SMOOTH=True, **cfg), nw, floats=("beta", "half_beta", "inv_beta"))
            rows.append((f"gate fwd D={d} gate={gdt} full={mode_full}", info))
            ptr.update({"DY": dt, "DLOSS": "*fp32", "DOF": dt, "DOS": dt, "DGATE": gdt})
            info = compile_kernel(GT._gate_align_bwd_kernel, ptr, dict(D=d, HAS_GATE=True, MODE_FULL=mode_full,
                                  SMOOTH=True, HAS_DY=True, **cfg), nw, floats=("beta", "inv_beta", "inv_n"))
            rows.append((f"gate bwd D={d} gate={gdt} full={mode_full}", info))
    for g, d, bs in [] if only_new else [(16, 64, 16), (16, 128, 16), (1, 64, 16), (4, 128, 64), (8, 64, 64),
                                         (16, 64, 64), (4, 64, 16), (4, 128, 16), (2, 128, 128)]:
        ptr = {n: dt for n in ("Q", "K", "V", "O", "DO", "DQ")}
        ptr.update({"IDX": "*i32", "QPOS": "*i32", "LSE": "*fp32", "DLSE": "*fp32", "STATS": "*fp32"})
        table = dict(KP=16, HAS_QPOS=d == 128)  # both position paths: computed (D 64) and read (D 128)
        cfg = P.fwd_config(g, bs, d)  # the launch settings sparse_attention uses
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        info = compile_kernel(P._sparse_fwd_kernel, ptr, dict(G=g, D=d, BS=bs, **table, **cfg), nw, ns,
                              floats=("scale_log2",))
        rows.append((f"fwd G={g} D={d} BS={bs}", info))
        cfg = P.dq_config(g, bs, d)
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        info = compile_kernel(P._sparse_dq_kernel, ptr, dict(G=g, D=d, BS=bs, HAS_DLSE=False, **table, **cfg), nw,
                              ns, floats=("scale_log2", "scale"))
        rows.append((f"dq  G={g} D={d} BS={bs}", info))
        if (g, d, bs) == (16, 64, 16):  # the per-block loop kernels/tools/tune_launch.py offers for small tables
            base = {k_: v_ for k_, v_ in P.fwd_config(g, bs, d).items() if k_ not in ("num_warps", "num_stages")}
            for kernel, extra in ((P._sparse_fwd_kernel, {}), (P._sparse_dq_kernel, {"HAS_DLSE": True})):
                for nblk, nw in ((1, 1), (1, 2), (2, 2)):
                    info = compile_kernel(kernel, ptr, dict(G=g, D=d, BS=bs, **table, **base, **extra) | {"NBLK": nblk},
                                          nw, 1, floats=("scale_log2", "scale"))
                    rows.append((f"{kernel.fn.__name__[8:11]} G={g} D={d} BS={bs} NBLK={nblk} warps={nw}", info))
        cfg = P.dkdv_config(g, bs, d)
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
        ptr.update({"KST": "*i32", "KEN": "*i32", "RPTR": "*i64", "RIDX": "*i64", "DK": dt, "DV": dt})
        info = compile_kernel(P._sparse_dkdv_kernel, ptr, dict(G=g, D=d, BS=bs, HAS_QPOS=d == 128, **cfg), nw, ns,
                              floats=("scale_log2", "scale"))
        rows.append((f"dkdv G={g} D={d} BS={bs}", info))
    return report(rows, ptx_dir)


def report(rows, ptx_dir):
    if ptx_dir is not None:
        ptx_dir.mkdir(parents=True, exist_ok=True)
    for name, info in rows:
        ptx = info.pop("ptx")
        if ptx_dir is not None:  # without the debug lines, which name source lines that a refactor moves
            ptx = ptx.split(".section\t.debug")[0]
            lines = [x for x in ptx.splitlines() if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp|$)", x)]
            (ptx_dir / (re.sub(r"[^\w=.-]+", "_", name) + ".ptx")).write_text("\n".join(lines) + "\n")
    too_big = [name for name, info in rows if info["shared"] > SHARED_LIMIT]
    for name, info in rows:
        print(f"{name:36s} {info}{'  <-- over the shared-memory limit' if name in too_big else ''}")
    if too_big:
        print(f"aot_check: {len(too_big)} launch configuration(s) need more than {SHARED_LIMIT} bytes of shared "
              f"memory (an H100/H200 block's maximum): {', '.join(too_big)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
