#!/usr/bin/env python3
"""Training-step benchmark of the ssa_megatron stack: SSA vs full attention vs sparse only.

The model is recipes/ssa_1b.yaml (hidden 2048, FFN 8192, 32/2 heads, D 64, vocab 128256, tied; ``--recipe`` picks
another) at an 8192-token context, bf16, Megatron DDP + distributed optimizer (AdamW). Each mode runs ``ssa-train``'s
own loop (``ssa_megatron.training.train.train``) on synthetic tokens (``data.train_shards=synthetic``; the step cost
does not depend on their values) and reports the steady-state summary that loop prints at the end of every run: the
median step after the warm-up steps. There is no second copy of the step here.

Modes, in one process per GPU (docs/benchmarks.md protocol: the baseline is timed in the same run):
  full_attn   p_full = 1, alpha = 0 (FullAttn baseline: one attention branch)
  ssa         p_full = 0.5, alpha = 10 (both branches + selection + alignment loss every micro-batch)
  sparse      p_full = 0, alpha = 0 (MoBA-style sparse only)
  hf          optional (--hf): plain Hugging Face LlamaForCausalLM at the same shape, SDPA, fused AdamW

Reported per mode: step time, tokens/s, model TFLOP/s and MFU (``training.metrics.model_flops_per_token`` over
the card's dense bf16 peak, the same definition for every mode), peak memory, the first step's time; and
step-time ratios to full_attn.

  python tools/bench_training.py                       # all three modes, 16 layers, 4 micro-batches per step
  python tools/bench_training.py --layers 8 --hf --json out.json
  python tools/bench_training.py --recipe ssa_7b --layers 4 parallel.tensor_parallel=1 parallel.sequence_parallel=false
  torchrun --nproc_per_node=2 tools/bench_training.py --modes ssa    # data parallel 2 (parallel.* overrides for
                                                                      # TP/CP); --micro-batches is per DP rank
With ``--smoke-checkpoint DIR`` it also runs the real training loop (a 2-layer, 512-wide model, seq 1024) on the
GPU path for 2 steps with a checkpoint, resumes it for 1 more step, and compares the loss curve with an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = {
    "full_attn": ["ssa.p_full=1.0", "ssa.alpha=0.0"],
    "ssa": ["ssa.p_full=0.5", "ssa.alpha=10.0"],
    "sparse": ["ssa.p_full=0.0", "ssa.alpha=0.0"],
}


def bench_recipe(spec: str, args, run_dir: Path) -> "RecipeConfig":  # noqa: F821
    """``spec`` = a mode of MODES, optionally followed by ``:key=value`` recipe overrides (a variant)."""
    from ssa_megatron.config import load_recipe
    from ssa_megatron.training.metrics import Throughput

    mode, *variant = spec.split(":")
    if mode not in MODES:
        raise ValueError(f"--modes entry {spec!r}: mode {mode!r} is not one of {sorted(MODES)}")
    steps = Throughput.warmup_steps + args.steps
    recipe = load_recipe(args.recipe, MODES[mode] + variant + [
        f"model.num_layers={args.layers}", f"model.seq_length={args.seq}", "data.train_shards=synthetic",
        "train.micro_batch_size=1", f"train.recompute={args.recompute}", "train.metrics_interval=0",
        "train.progress_bar=false", "train.eval_interval=0", f"train.log_interval={steps}", "checkpoint.interval=0",
        "checkpoint.save_at_end=false", "checkpoint.resume=false", f"train.run_dir={run_dir}",
        f"train.device={args.device}", *([] if args.device == "cuda" else ["train.precision=fp32"]),
        "train.wandb=false", f"train.steps={steps}", *args.overrides])
    # --micro-batches per data-parallel rank: the global batch follows the layout the overrides chose
    p = recipe.parallel
    dp = max(_world_size() // (p.tensor_parallel * p.context_parallel * p.pipeline_parallel), 1)
    recipe.train.global_batch_size = args.micro_batches * dp
    return recipe


def time_mode(mode: str, args) -> dict:
    """Runs ``ssa-train``'s own loop (``train()``) for warm-up + ``args.steps`` steps and reports its
    steady-state summary: the figure the job prints is the figure this benchmark reports."""
    import tempfile

    from ssa_megatron.training.metrics import parameter_count
    from ssa_megatron.training.parallel import destroy_parallel
    from ssa_megatron.training.train import train

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        recipe = bench_recipe(mode, args, Path(tmp))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        profiler = _StepProfiler(mode, args, profile_step=recipe.train.steps - 1) if args.profile else None
        try:
            result = train(recipe, step_hook=profiler)
        finally:
            if profiler is not None:
                profiler.finish()
            if _world_size() == 1:
                destroy_parallel()
            else:  # keep the process group of the torchrun launch for the next mode
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
    steady = result.steady
    out = {"mode": mode, "layers": recipe.model.num_layers, "seq": recipe.model.seq_length,
           "params": parameter_count(recipe), "micro_batches": args.micro_batches,
           "step_ms": 1e3 * steady["step_seconds"], "step_ms_all": [1e3 * t for t in result.step_seconds],
           "first_step_s": steady["first_step_seconds"], "tokens_per_s": steady["throughput/tokens_per_s"],
           "tflops": steady["throughput/tflops_per_gpu"], "mfu": steady.get("throughput/mfu"),
           "peak_mem_gib": result.peak_memory_gib, "loss_first": result.losses[0], "loss_last": result.losses[-1]}
    del result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", 1))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepProfiler:
    """A ``step_hook`` that profiles one step under torch.profiler and writes the CUDA kernels by total time to
    ``--profile DIR/<mode>.txt`` and the step's timeline (Chrome trace format) to ``DIR/<mode>.trace.json.gz``."""

    def __init__(self, mode: str, args, profile_step: int):
        self.mode, self.args, self.profile_step, self.prof = mode, args, profile_step, None

    def __call__(self, step: int, _model) -> None:
        if step == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def finish(self) -> None:
        if self.prof is None:
            return
        _sync()
        self.prof.__exit__(None, None, None)
        table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45,
                                               max_name_column_width=90)
        self.args.profile.mkdir(parents=True, exist_ok=True)
        name = self.mode.replace(':', '_').replace('=', '-')
        if _world_size() > 1:  # under torchrun every rank writes its own
            import os

            name += f".rank{os.environ.get('RANK', 0)}"
        (self.args.profile / f"{name}.txt").write_text(table)
        trace = self.args.profile / f"{name}.trace.json"
        self.prof.export_chrome_trace(str(trace))  # host and device timelines: idle gaps, syncs
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        print(f"bench_training: profile of one {self.mode} step in {self.args.profile}", flush=True)


def time_hf(args) -> dict:
    """Plain HF transformers Llama at the same shape (the anchor of docs/benchmarks.md), SDPA, bf16, fused AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ssa_megatron.config import load_recipe

    m = load_recipe(args.recipe).model
    cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                      num_hidden_layers=args.layers, num_attention_heads=m.num_attention_heads,
                      num_key_value_heads=m.num_query_groups, head_dim=m.head_dim, rope_theta=m.rope_theta,
                      tie_word_embeddings=m.tie_embeddings, max_position_embeddings=args.seq, attn_implementation="sdpa",
                      torch_dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    from ssa_megatron.training.metrics import Throughput

    warmup = Throughput.warmup_steps
    times = []
    for step in range(warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.micro_batches):
            ids = torch.randint(0, m.vocab_size, (1, args.seq), device="cuda", generator=g)
            loss = model(input_ids=ids, labels=ids).loss / args.micro_batches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    step_s = sorted(times)[len(times) // 2]
    tps = args.micro_batches * args.seq / step_s
    flops = 6 * n + 6 * args.layers * m.num_attention_heads * m.head_dim * args.seq
    from ssa_megatron.training.metrics import peak_flops

    peak = peak_flops(torch.device("cuda"))
    out = {"mode": "hf", "layers": args.layers, "seq": args.seq, "params": n, "micro_batches": args.micro_batches,
           "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times], "tokens_per_s": tps,
           "tflops": tps * flops / 1e12, "mfu": tps * flops / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return out


def smoke_checkpoint(directory: Path, device: str) -> dict:
    """The real loop on the GPU path (bf16, DDP overlap, distributed optimizer, torch_dist checkpoint): 3 steps
    uninterrupted vs 2 + resume + 1."""
    from ssa_megatron.config import load_recipe
    from ssa_megatron.training.train import train

    def recipe(run_dir):
        return load_recipe("ssa_1b", [
            "model.num_layers=2", "model.hidden_size=512", "model.ffn_hidden_size=1024", "model.num_attention_heads=8",
            "model.vocab_size=8192", "model.seq_length=1024", "data.train_shards=synthetic", "train.steps=3",
            "train.micro_batch_size=1", "train.global_batch_size=2", f"train.device={device}", "train.log_interval=1",
            "train.metrics_interval=1", "train.progress_bar=false", "train.wandb=false", "checkpoint.interval=2",
            f"train.run_dir={run_dir}", *([] if device == "cuda" else ["train.precision=fp32"])])

    full = train(recipe(directory / "a"))
    first = train(recipe(directory / "b"), max_steps=2)
    second = train(recipe(directory / "b"))
    ok = first.losses + second.losses == full.losses
    close = max(abs(a - b) for a, b in zip(first.losses + second.losses, full.losses))
    return {"uninterrupted": full.losses, "resumed": first.losses + second.losses, "bitwise_equal": ok,
            "max_abs_diff": close, "checkpoint": str(second.checkpoint)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="full_attn,ssa,sparse",
                        help="comma-separated; a mode may carry ':key=value' overrides, e.g. "
                             "full_attn:train.fused_ops=false")
    parser.add_argument("--recipe", default="ssa_1b", help="the model shape (a recipe name or YAML path)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--fallback-layers", type=int, default=8,
                        help="if a mode runs out of memory, time every mode again with this many layers")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="micro-batches (of 1 sequence) per step and data-parallel rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--hf", action="store_true", help="also time plain HF LlamaForCausalLM (SDPA)")
    parser.add_argument("--smoke-checkpoint", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile one extra step per mode; kernel tables go to this directory")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the harness (fp32, no MFU), for development only")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides (a.b=c)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_training: needs a CUDA device (--device cpu for a dry run)", file=sys.stderr)
        return 2
    if _world_size() > 1:  # under torchrun: one process group for every mode; rank 0 reports
        import os

        import torch.distributed as dist

        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if dist.get_rank():
            sys.stdout = open(os.devnull, "w")
            args.json = None
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"bench_training: {args.recipe} shape, {args.layers} layers, seq {args.seq}, {args.micro_batches} "
          f"micro-batches of 1 per step and data-parallel rank, {_world_size()} process(es), overrides "
          f"{' '.join(args.overrides) or 'none'}, synthetic tokens, bf16, on {card}; modes {args.modes}", flush=True)
    report = {"card": card, "date": datetime.date.today().isoformat(), "commit": commit,
              "command": " ".join(sys.argv), "torch": torch.__version__, "results": []}

    def save() -> None:  # after every piece, so a run cut short still leaves what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))

    def run_modes(layers: int) -> bool:
        args.layers = layers
        fits = True
        for mode in args.modes.split(","):
            try:
                result = time_mode(mode, args)
            except torch.OutOfMemoryError as err:
                result = {"mode": mode, "layers": layers, "error": f"out of memory: {str(err).splitlines()[0]}"}
                fits = False
                gc.collect()
                torch.cuda.empty_cache()
            report["results"].append(result)
            print(json.dumps(result), flush=True)
            save()
        return fits

    if not run_modes(args.layers) and args.fallback_layers:
        print(f"bench_training: out of memory at {args.layers} layers; all modes again at "
              f"{args.fallback_layers}", flush=True)
        report["results"] = [r for r in report["results"] if "error" not in r]
        run_modes(args.fallback_layers)
    if args.hf:
        try:
            report["results"].append(time_hf(args))
        except Exception as err:  # the anchor is optional; keep the stack's numbers
            report["results"].append({"mode": "hf", "error": repr(err)[:300]})
        print(json.dumps(report["results"][-1]), flush=True)
        save()
    if args.smoke_checkpoint:
        report["smoke_checkpoint"] = smoke_checkpoint(args.smoke_checkpoint, args.device)
        print(f"smoke checkpoint/resume on GPU: {report['smoke_checkpoint']}", flush=True)
        save()

    base = next((r for r in report["results"] if r["mode"] == "full_attn" and "step_ms" in r
                 and r["layers"] == args.layers), None)
    print("\n| mode | layers | step ms | tokens/s | TFLOP/s | MFU | peak GiB | step / full_attn |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        if "step_ms" not in r:
            print(f"| {r['mode']} | {r.get('layers', '')} | {r['error']} | | | | | |")
            continue
        ratio = f"{r['step_ms'] / base['step_ms']:.3f}" if base and r["layers"] == base["layers"] else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "-"
        print(f"| {r['mode']} | {r['layers']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
              f"{mfu} | {r['peak_mem_gib']:.1f} | {ratio} |")
    if args.json:
        save()
        print(f"bench_training: wrote {args.json}")
    from ssa_megatron.training.parallel import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
