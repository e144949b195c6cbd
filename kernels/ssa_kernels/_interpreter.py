"""Speeds up Triton's interpreter (TRITON_INTERPRET=1) for these kernels; no effect on GPU compilation.

The kernels also run on CPU under the interpreter: ``ssa.backend='triton'`` accepts a CPU device there (the CPU
tests, and ``tools/check_parallel_layouts.py --backend triton``). Without this patch every ``tl.sort`` of the
selection costs seconds (11 s → 0.5 s per selection call), which makes those runs impractical.
Applied once at package import, before any kernel runs.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter() -> None:
    """Speeds up ``tl.sort``/``tl.topk`` under TRITON_INTERPRET=1 (does nothing otherwise).

    Triton's bitonic sort does its compare-and-swap with an ``xor_sum`` reduction, which the interpreter runs
    as a Python loop over every element (seconds per sort). XOR is associative, so reducing with
    ``numpy.bitwise_xor.reduce`` gives the identical result. No effect on GPU compilation.
    """
    if not interpreting():
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover
        return
    ops = getattr(interp, "ReduceOps", None)
    if ops is None or getattr(ops, "_ssa_patched", False):
        return
    original = ops.apply_impl
    xor_combine = getattr(tl.standard, "_xor_combine", None)

    def apply_impl(self, input):
        if xor_combine is not None and self.combine_fn == xor_combine and len(input) == 1:
            data = input[0].handle.data
            if self.axis is None:
                return self.to_tensor(np.bitwise_xor.reduce(data.reshape(-1)), input[0].dtype)
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims),
                                  input[0].dtype)
        return original(self, input)

    ops.apply_impl = apply_impl
    ops._ssa_patched = True

    # Every nested @jit call (tl.sort -> sort_impl -> _compare_and_swap -> ...) re-patches the whole language
    # through inspect.getmembers; within one kernel launch the patches are identical, so do each once.
    import inspect
    orig_patch_lang = interp._patch_lang
    state = {"active": False, "seen": set()}

    def patch_lang(fn):
        if state["active"]:
            key = tuple(sorted(id(v) for v in fn.__globals__.values()
                               if inspect.ismodule(v) and v in (tl, tl.core)))
            if key in state["seen"]:
                return interp._LangPatchScope()
            state["seen"].add(key)
        return orig_patch_lang(fn)

    orig_call = interp.GridExecutor.__call__

    def call(self, *args, **kwargs):
        outer = state["active"]
        state["active"], state["seen"] = True, set()
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            state["active"], state["seen"] = outer, set()

    interp._patch_lang = patch_lang
    interp.GridExecutor.__call__ = call
