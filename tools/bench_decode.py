#!/usr/bin/env python
"""Decode tokens/s of ``SSALlamaForCausalLM`` in full and sparse mode, against its memory bounds and a baseline.

Random weights; the cache is filled with random keys and values of ``--context`` tokens (a prefill is not what is
measured, and the LM head of a 32k x 32 prefill would not fit), then ``--steps`` greedy decode steps are timed. Paths
(``--paths``):

- ``compiled-static``: the SSA static cache (``StaticCache(config)``, pooled block keys kept in it), each step one
  ``torch.compile(mode=--compile-mode, fullgraph=True, dynamic=False)`` graph (CUDA graphs with ``reduce-overhead``
  on a GPU) holding the forward and the greedy choice of the next token, which it writes into the token buffer
  the next step reads. Each (batch, context, mode) compiles afresh (``torch._dynamo.reset()``): a recompile for a
  second batch size would make the batch symbolic, and where full mode runs FlexAttention (float32, or triton
  missing) Inductor then drops its split-KV decoding kernel for a much slower one (batch 32, 32k: 68 ms against 5.8
  ms per step on an H200);
- ``eager-static``, ``eager-dynamic``: the same decoding path uncompiled, on the static or growing SSA cache;
- ``baseline``: transformers' plain ``DynamicCache()`` (no SSA layers), so every step runs the general path
  (``ssa_attention`` over all cached keys, re-pooling them in sparse mode): the decoding of before issue 16.

Bounds per step: ``weights`` = bytes of every weight a step reads (decoder layers, final norm, LM head) / HBM
bandwidth; ``kv`` = bytes of cached keys/values it must read (full: all ``context`` tokens; sparse: ``top_k`` blocks
plus the pooled keys) / HBM bandwidth. ``--check`` compares the first compiled step's logits with an eager step on
the same cache. ``compile_s`` is the time of the untimed steps (compilation, CUDA-graph recording, the check).
``--config-timeout S`` stops a path that runs longer than S seconds: it prints every thread's stack (where it hung),
records the row as timed out and goes on with the next. ``--profile`` runs one more step of each path under
``torch.profiler`` and prints its kernels per step and the top kernels by device time (also written to
``--profile-dir``, with the step's Chrome trace for ``tools/profile_gaps.py``). 1B shape on one H200 (the default
set takes about 4 minutes, mostly compilation):

    python tools/bench_decode.py --out bench_decode.json

The model's projections are fused on every path (one GEMM for q|k|v|g and one for gate|up per layer, as
``from_pretrained`` loads it); ``--separate-projections`` keeps Llama's six GEMMs. Tiny CPU run:
``python tools/bench_decode.py --shape tiny --device cpu --context 64 200 --batch 1 2 --paths eager-static
eager-dynamic baseline --steps 3``.
"""

from __future__ import annotations

import argparse
import faulthandler
import gzip
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PATHS = ("compiled-static", "eager-static", "eager-dynamic", "baseline")
SHAPES = {  # SSALlamaConfig fields
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=2, head_dim=64),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, nargs="+", default=[8192, 32768], help="cached tokens before decoding")
    p.add_argument("--modes", nargs="+", choices=["full", "sparse"], default=["full", "sparse"])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=["compiled-static", "baseline"])
    p.add_argument("--top-k", type=int, default=16, help="sparse budget in blocks")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per configuration")
    p.add_argument("--baseline-steps", type=int, default=5, help="timed steps of the (slow) baseline path")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, CUDA-graph recording)")
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of compiled-static")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="memory bandwidth for the bounds (H200: 4.8 TB/s)")
    p.add_argument("--compile-options", default=None,
                   help="Inductor options as JSON (e.g. '{\"combo_kernels\": true}'), instead of --compile-mode; "
                        "\"triton.cudagraphs\": true gives reduce-overhead's CUDA graphs")
    p.add_argument("--check", action="store_true", help="compare the first compiled step with an eager one")
    p.add_argument("--config-timeout", type=float, default=None,
                   help="seconds one path of one configuration may take; then its stack is printed and it is skipped")
    p.add_argument("--profile", action="store_true", help="profile one extra step per path (kernel table)")
    p.add_argument("--profile-dir", type=Path, default=None, help="write each profile table and trace here")
    p.add_argument("--separate-projections", action="store_true",
                   help="keep q/k/v/g and gate/up as separate GEMMs (default: fused, as from_pretrained loads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    for name in ("batch", "context"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            p.error(f"--{name} {bad[0]}: must be >= 1")
    for name in ("steps", "baseline_steps", "top_k", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.compile_options is not None:
        try:
            options = json.loads(args.compile_options)
        except ValueError:
            options = None
        if not isinstance(options, dict):
            p.error(f"--compile-options {args.compile_options!r}: must be a JSON object of Inductor options")
        args.compile_options = options
    return args


def build_model(args):
    import ssa_megatron.hf  # noqa: F401  (registers ssa_llama and the SSA cache layers)
    from ssa_megatron.hf.configuration import SSALlamaConfig
    from ssa_megatron.hf.modeling import SSALlamaForCausalLM

    config = SSALlamaConfig(**SHAPES[args.shape], tie_word_embeddings=True, ssa_block_size=args.block_size,
                            ssa_top_k=args.top_k, ssa_gate="per_head",
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])  # built in its dtype on its device: no fp32 copy of 1B weights
    try:
        with torch.device(args.device):
            model = SSALlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    if not args.separate_projections:
        model.fuse_projections()
    return model, config


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: decoder layers, final norm and the LM head (the embedding
    table is read one row per token)."""
    inner = model.model
    params = [*inner.layers.parameters(), *inner.norm.parameters(), model.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in params)


def kv_bytes(config, batch: int, context: int, mode: str, elem: int) -> int:
    """Bytes of cached keys/values (and pooled keys) one decode step reads at ``context`` cached tokens."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * elem  # K and V of one token, all KV heads
    if mode == "full":
        read = context * per_token
    else:
        read = (min(config.ssa_top_k * config.ssa_block_size, context + 1) * per_token
                + context // config.ssa_block_size * config.num_key_value_heads * config.head_dim * elem)
    return batch * config.num_hidden_layers * read


def fill_cache(model, config, path: str, batch: int, context: int, capacity: int, device, dtype, seed: int):
    """A cache of ``path``'s kind holding ``context`` random tokens in every layer (pooled keys included)."""
    from transformers import DynamicCache, StaticCache

    if path.endswith("static"):
        cache = StaticCache(config=config, max_cache_len=capacity)
    elif path == "eager-dynamic":
        cache = DynamicCache(config=config)
    else:
        cache = DynamicCache()  # plain transformers layers: the general path
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for i in range(config.num_hidden_layers):
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        cache.update(k, v, i, ssa_block_size=config.ssa_block_size)
    return cache


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def greedy_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: the logits of ``tokens [b, 1]`` after the cache, ``[b, vocab]``; the greedy next tokens are
    written into ``tokens``, so that a compiled step holds the choice too and the next step reads it in place."""
    logits = model(tokens, cache=cache, use_cache=True).logits[:, -1]
    tokens.copy_(greedy_choice(logits))
    return logits


ARGMAX_CHUNK = 1024


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1, keepdim=True)`` (the first of equal maxima) as two reductions: each chunk of
    :data:`ARGMAX_CHUNK` logits, then the chunks' maxima. Inductor writes one argmax over a row of 128,256 logits as
    one program per row, which took 29.5 us per batch-1 step on an H200 (docs/benchmarks.md, session 9), where
    ``generate()`` takes the argmax outside the compiled step with ATen's kernel, which splits the row."""
    b, vocab = logits.shape
    padded = torch.nn.functional.pad(logits, (0, -vocab % ARGMAX_CHUNK), value=-float("inf"))
    best, where = padded.view(b, -1, ARGMAX_CHUNK).max(-1)
    chunk = best.argmax(-1, keepdim=True)
    return chunk * ARGMAX_CHUNK + where.gather(-1, chunk)


def compile_step(args):
    """A fresh compiled :func:`greedy_step` with static shapes (see the module docstring for why)."""
    torch._dynamo.reset()
    kwargs = (dict(options=args.compile_options) if args.compile_options is not None
              else dict(mode=args.compile_mode))
    return torch.compile(greedy_step, fullgraph=True, dynamic=False, **kwargs)


class Watchdog:
    """Interrupts the main thread after ``seconds`` (SIGINT to it, which also ends a blocking sleep or wait; a wait
    inside C code ends when it returns), first printing every thread's stack to stderr."""

    def __init__(self, seconds: float | None, what: str):
        self.seconds, self.what, self.fired, self.timer = seconds, what, False, None
        self.handler = None

    def _fire(self):
        self.fired = True
        print(f"bench_decode: {self.what} still running after {self.seconds:.0f}s; stacks follow", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(all_threads=True)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def __enter__(self):
        if self.seconds:
            # Python's own SIGINT handler for the duration: a process started in the background by a
            # non-interactive shell (nohup, `cmd &` in a batch script) inherits SIGINT ignored.
            self.handler = signal.signal(signal.SIGINT, signal.default_int_handler)
            self.timer = threading.Timer(self.seconds, self._fire)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, *exc):
        if self.timer is not None:
            self.timer.cancel()
        if self.handler is not None:
            signal.signal(signal.SIGINT, self.handler)
        return exc[0] is KeyboardInterrupt and self.fired  # our interrupt: swallowed, the caller reads .fired


def time_steps(step, tokens, steps: int, warmup: int, device, compiled: bool) -> tuple[float, float]:
    """Mean seconds per step over ``steps`` after ``warmup`` untimed ones (compilation, recording), and the mean
    seconds the host spent in each step call. On a GPU the calls only queue work, so a host time near the step
    time means the step is bound by the host (guards, CUDA-graph replay), not by its kernels."""
    host = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        called = time.perf_counter()
        if compiled and str(device).startswith("cuda"):
            torch.compiler.cudagraph_mark_step_begin()
        step(tokens)
        if i >= warmup:
            host += time.perf_counter() - called
    sync(device)
    return (time.perf_counter() - start) / steps, host / steps


def profile_step(step, tokens, device, compiled: bool, label: str, args) -> dict:
    """One more step under torch.profiler: device kernels in it, and the table of the top ones by device time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if compiled and cuda:
            torch.compiler.cudagraph_mark_step_begin()
        step(tokens)
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=70)
    print(f"  profile {label}: {len(kernels)} device kernels in one step, "
          f"{sum(e.device_time for e in kernels) / 1e3:.3f} ms of kernel time\n{table}", flush=True)
    if args.profile_dir is not None:  # the table, and the step's timeline for tools/profile_gaps.py (idle gaps)
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        name = label.replace(' ', '_')
        (args.profile_dir / f"{name}.txt").write_text(table)
        trace = args.profile_dir / f"{name}.trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    return dict(kernels_per_step=len(kernels), kernel_ms=sum(e.device_time for e in kernels) / 1e3)


def run_config(model, config, args, batch: int, context: int, mode: str) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model.set_attention_mode(mode, top_k=args.top_k, block_size=args.block_size)
    elem = torch.finfo(dtype).bits // 8
    bound_w = weight_bytes(model) / (args.hbm_tbps * 1e12)
    bound_kv = kv_bytes(config, batch, context, mode, elem) / (args.hbm_tbps * 1e12)
    rows = []
    for path in args.paths:
        label = f"batch {batch} context {context} {mode} {path}"
        steps = args.baseline_steps if path == "baseline" else args.steps
        capacity = context + args.warmup + steps + 4
        compiled = path == "compiled-static"
        row = dict(batch=batch, context=context, mode=mode, path=path, steps=steps)
        cache = None
        with Watchdog(args.config_timeout, label) as watchdog:
            print(f"  {label}: filling the cache" + (", compiling" if compiled else ""), flush=True)
            cache = fill_cache(model, config, path, batch, context, capacity, device, dtype, args.seed)
            first = torch.randint(0, config.vocab_size, (batch, 1), device=device,
                                  generator=torch.Generator(device=device).manual_seed(args.seed))
            tokens = first.clone()
            if compiled:
                torch._dynamo.mark_static_address(tokens)  # written in place by the graph: a fixed address
            forward = compile_step(args) if compiled else greedy_step
            started = time.perf_counter()  # the check's compiled step, if any, is the first call: compile_s has it
            with torch.no_grad():
                if compiled and args.check:  # one eager step, rolled back, against the compiled one on the same cache
                    eager = greedy_step(model, tokens, cache).float()
                    for layer in cache.layers:
                        layer.cumulative_length.sub_(1)
                    tokens.copy_(first)
                    if device.type == "cuda":
                        torch.compiler.cudagraph_mark_step_begin()
                    got = forward(model, tokens, cache).float()
                    row["check_rel_diff"] = float((got - eager).abs().max() / eager.abs().max())
                    for layer in cache.layers:
                        layer.cumulative_length.sub_(1)
                    tokens.copy_(first)
                def step(t, cache=cache):
                    return forward(model, t, cache)

                seconds, host_seconds = time_steps(step, tokens, steps, args.warmup, device, compiled)
                warm = time.perf_counter() - started - seconds * steps
                if args.profile:
                    row.update(profile_step(step, tokens, device, compiled, label, args))
        cache = step = None  # frees this path's cache before the next one fills its own
        if watchdog.fired:
            row["timed_out_s"] = args.config_timeout
            print(f"  {label}: TIMED OUT after {args.config_timeout:.0f}s (stacks above); skipped", flush=True)
            rows.append(row)
            continue
        row.update(ms_per_step=seconds * 1e3, host_ms_per_step=host_seconds * 1e3, tokens_per_s=batch / seconds,
                   compile_s=warm, weights_bound_ms=bound_w * 1e3, kv_bound_ms=bound_kv * 1e3,
                   step_over_bound=seconds / (bound_w + bound_kv))
        rows.append(row)
        check = row.get("check_rel_diff")
        print(f"  batch {batch:>3} context {context:>6} {mode:>6} {path:>15}: {row['ms_per_step']:8.3f} ms/step "
              f"(host {row['host_ms_per_step']:.3f}) {row['tokens_per_s']:10.1f} tok/s  "
              f"bound {row['weights_bound_ms']:.3f}+{row['kv_bound_ms']:.3f} ms "
              f"(x{row['step_over_bound']:.2f})  warm-up {warm:.1f}s"
              + (f"  check {check:.1e}" if check is not None else ""), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def summarise(rows: list[dict]) -> list[str]:
    """Ratios: each path against the baseline, and sparse against full tokens/s on the same path."""
    lines = []
    key = {(r["batch"], r["context"], r["mode"], r["path"]): r for r in rows if "ms_per_step" in r}
    for (b, c, m, p), r in key.items():
        base = key.get((b, c, m, "baseline"))
        if base is not None and p != "baseline":
            lines.append(f"batch {b} context {c} {m} {p}: {r['tokens_per_s'] / base['tokens_per_s']:.1f}x baseline")
        full = key.get((b, c, "full", p))
        if m == "sparse" and full is not None:
            lines.append(f"batch {b} context {c} {p}: sparse/full tokens/s = "
                         f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = [(b, c, m) for c in args.context for b in args.batch for m in args.modes]
    print(f"bench_decode: {args.shape} shape, {args.dtype} on {args.device}, "
          f"{'separate' if args.separate_projections else 'fused'} projections, {len(configs)} configurations "
          f"(batch {args.batch}, context {args.context}, modes {args.modes}) x paths {args.paths}, "
          f"{args.steps} timed steps ({args.baseline_steps} for the baseline), top_k {args.top_k} x block "
          f"{args.block_size}", flush=True)
    model, config = build_model(args)
    rows = []
    started = time.perf_counter()
    for i, (batch, context, mode) in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}] {time.perf_counter() - started:.0f}s", flush=True)
        rows += run_config(model, config, args, batch, context, mode)
    for line in summarise(rows):
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"bench_decode: done in {time.perf_counter() - started:.0f}s; "
          + (f"rows written to {args.out}" if args.out else "rows printed above (--out to save them)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
