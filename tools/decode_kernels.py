#!/usr/bin/env python
"""Counts the kernels of one compiled-static decode step as Inductor would launch them on an H100/H200-class GPU,
without a GPU: the step is traced with fake CUDA tensors and Inductor generates its Triton code, which is kept
(loading it fails, as no driver exists). Prints Triton launches and extern calls (cuBLAS mm, topk, ...) per step
and per layer, and writes the generated module to ``--out``.

Why: on a CPU-only machine the CPU backend fuses differently (and cannot compile full mode's FlexAttention), so its
kernel count says little about a GPU step, where at batch 1 each small kernel costs a few microseconds.

How: torch.cuda's device queries are replaced by an sm_90 device (132 SMs), fake tensors skip CUDA initialisation,
and two passes that would run real CUDA ops at compile time are off (the SDPA pattern set, which a decode step
never matches, and joint-graph constant folding of uniform tensors). This patches torch internals and is meant for
this analysis only; it is not needed on a GPU, where ``TORCH_LOGS=output_code`` shows the same. Tested with
torch 2.11.

    python tools/decode_kernels.py --mode sparse --batch 1 --context 32768        # about a minute on 2 cores
    python tools/decode_kernels.py --mode full --batch 1 32                       # batch 1, then 32: the recompile
    python tools/decode_kernels.py --mode full --separate-projections             # Llama's six projection GEMMs
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fake_sm90() -> None:
    """Makes torch and Inductor see one sm_90 GPU (codegen only)."""
    import torch._dynamo.device_interface as device_interface
    import torch._inductor.config as inductor_config
    import torch._inductor.fx_passes.fuse_attention as fuse_attention
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.utils._triton as torch_triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import driver as triton_driver

    props = collections.namedtuple("Props", "name major minor multi_processor_count total_memory warp_size "
                                   "max_threads_per_multi_processor regs_per_multiprocessor "
                                   "shared_memory_per_block_optin shared_memory_per_multiprocessor L2_cache_size "
                                   "gcnArchName uuid is_integrated max_threads_per_block")(
        "NVIDIA H200", 9, 0, 132, 140 << 30, 32, 2048, 65536, 232448, 233472, 50 << 20, "", "", False, 1024)

    def available() -> bool:  # False to the callers that would then build real CUDA tensors
        frame = sys._getframe(1)
        for _ in range(4):
            if frame is None:
                break
            name = frame.f_code.co_filename
            if "fx_passes" in name or "pattern_matcher" in name or "fake_tensor" in name:
                return False
            frame = frame.f_back
        return True

    class NoDevice:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake_tensor.init_gpu_context = lambda device: None
    fuse_attention._sfdp_init = lambda *args, **kwargs: None
    inductor_config.compile_threads = 1
    inductor_config.joint_graph_constant_folding = False
    cuda = torch.cuda
    cuda.is_available, cuda.device_count, cuda.current_device = available, lambda: 1, lambda: 0
    cuda.get_device_properties = lambda *args, **kwargs: props
    cuda.get_device_capability = lambda *args: (9, 0)
    cuda.get_device_name = lambda *args: props.name
    cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8)
    cuda.set_rng_state = cuda.synchronize = cuda.set_device = lambda *args, **kwargs: None
    cuda.is_bf16_supported = lambda *args, **kwargs: True
    cuda.device = NoDevice
    torch.accelerator.is_available = lambda: False
    interface = device_interface.CudaInterface
    for name, value in dict(get_device_properties=lambda *a, **k: props, get_compute_capability=lambda *a, **k: 90,
                            current_device=lambda: 0, device_count=lambda: 1, set_device=lambda *a: None,
                            synchronize=lambda *a: None, is_bf16_supported=lambda *a, **k: True,
                            is_available=lambda: True).items():
        setattr(interface, name, staticmethod(value))
    interface.device = NoDevice
    torch_triton.triton_backend = lambda: make_backend(GPUTarget("cuda", 90, 32))
    # User-defined kernels (decode_triton.py): Inductor reads which arguments each one writes from its TTIR, which
    # asks the active driver for the target; without it Inductor assumes every argument is written, and copies the
    # views it passes in (kernels a GPU compile does not have).
    triton_driver.set_active(SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32)))


def count(code: str) -> tuple[list[str], list[str]]:
    """Triton kernel launches and extern calls in the ``call`` function of an Inductor output module."""
    call = code[code.index("def call(self, args)"):]
    return re.findall(r"(\w+)\.run\(", call), re.findall(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(", call)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=["1b", "tiny"], default="1b")
    p.add_argument("--mode", choices=["full", "sparse"], default="sparse")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="compiled in turn by one torch.compile")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--options", default=None, help="Inductor options as JSON, e.g. '{\"combo_kernels\": true}'")
    p.add_argument("--separate-projections", action="store_true",
                   help="q/k/v/g and gate/up as separate GEMMs (default: fused, as from_pretrained loads the model)")
    p.add_argument("--out", type=Path, default=Path("decode_step_cuda.py"), help="the last generated module")
    args = p.parse_args(argv)
    print(f"decode_kernels: {args.shape} shape, {args.mode} mode, batch {args.batch}, context {args.context}, "
          f"{'separate' if args.separate_projections else 'fused'} projections, Inductor CUDA code without a GPU",
          flush=True)
    import json

    from torch._inductor.codecache import PyCodeCache
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import StaticCache

    import bench_decode

    fake_sm90()
    codes = []
    load = PyCodeCache.load_by_key_path.__func__

    def keep(cls, key, path, *rest, **kwargs):  # the module is written before it is loaded: keep its text
        text = Path(path).read_text()
        if "def call(self, args)" in text:
            codes.append(text)
        return load(cls, key, path, *rest, **kwargs)

    PyCodeCache.load_by_key_path = classmethod(keep)
    torch.Tensor.normal_ = torch.Tensor.uniform_ = lambda self, *a, **k: self  # no random init of fake weights
    bench = bench_decode.parse_args(["--shape", args.shape, "--device", "cuda", "--dtype", "bf16"]
                                    + ["--separate-projections"] * args.separate_projections)
    options = json.loads(args.options) if args.options else None
    with FakeTensorMode(allow_non_fake_inputs=True):
        model, config = bench_decode.build_model(bench)
        model.set_attention_mode(args.mode)
        step = torch.compile(model, fullgraph=True, options=options)
        for batch in args.batch:
            cache = StaticCache(config=config, max_cache_len=args.context + 32)
            for i in range(config.num_hidden_layers):
                kv = torch.empty(batch, config.num_key_value_heads, args.context, config.head_dim, device="cuda",
                                 dtype=torch.bfloat16)
                cache.update(kv, kv, i, ssa_block_size=config.ssa_block_size)
            try:
                with torch.no_grad():
                    step(torch.zeros(batch, 1, dtype=torch.long, device="cuda"), cache=cache, use_cache=True)
            except Exception as e:  # loading the compiled kernels needs a driver
                if not codes:
                    raise
                print(f"  batch {batch}: code generated (loading it failed as expected: {type(e).__name__})")
    args.out.write_text(codes[-1])
    launches, externs = count(codes[-1])
    layers = config.num_hidden_layers
    print(f"{len(launches)} Triton launches ({len(set(launches))} distinct kernels) and {len(externs)} extern calls "
          f"per step: {(len(launches) + len(externs)) / layers:.1f} per layer")
    for name, n in collections.Counter(externs).most_common():
        print(f"  {n:4d} {name}")
    print(f"decode_kernels: the generated module is in {args.out}"
          + ("; its batch is symbolic (a recompile)" if len(args.batch) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
