#!/usr/bin/env python
"""Checks that an SSA model trained under a parallel layout (TP / CP / PP) matches the same model on one device.

Launch once per layout with torchrun (world size = tp·cp·pp; data parallel size 1), first the baseline:

    torchrun --nproc_per_node=1 tools/check_parallel_layouts.py --save-baseline /tmp/ssa_layouts/base.pt
    torchrun --nproc_per_node=2 tools/check_parallel_layouts.py --tp 2 --baseline /tmp/ssa_layouts/base.pt
    torchrun --nproc_per_node=4 tools/check_parallel_layouts.py --pp 2 --cp 2 --baseline /tmp/ssa_layouts/base.pt

Each run builds the real model (``build_gpt_model``) wrapped in Megatron's DDP, initialises every parameter from
its *global* name (so all layouts start from identical weights), runs one iteration of Megatron's real schedule
(``get_forward_backward_func``: no-pipelining or 1F1B) over ``--microbatches`` micro-batches in fp32 (TF32 off),
and compares the LM loss, the alignment loss (tracker, mean over layers) and every gradient (after
``finalize_model_grads``) against the baseline. Then it times ``--timed-iters`` iterations (TF32 on) and reports
tokens/s. One JSON line per run goes to stdout and is appended to ``--json-out``. Runs on CPU with gloo too
(pp = 1 only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mbs", type=int, default=2, help="micro-batch size")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--alpha", type=float, default=10.0)
    p.add_argument("--p-full", type=float, default=0.5)
    p.add_argument("--backend", default="reference", choices=["reference", "auto", "triton"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup-iters", type=int, default=1)
    p.add_argument("--timed-iters", type=int, default=3)
    p.add_argument("--save-baseline", type=str, default=None, help="write the baseline here (world size 1)")
    p.add_argument("--baseline", type=str, default=None, help="compare against this baseline")
    p.add_argument("--check-dtype", default="fp64", choices=["fp64", "fp32"],
                   help="dtype of the correctness iteration (fp64: top-k selection is discontinuous, and in fp32 "
                        "differently tiled GEMMs flip near-tied blocks); throughput is always timed in fp32/TF32")
    p.add_argument("--rtol", type=float, default=1e-4, help="tolerance: ||g - g_ref|| / ||g_ref|| per tensor")
    p.add_argument("--json-out", type=str, default=None)
    return p.parse_args()


def init_distributed(args):
    from ssa_megatron.megatron.cpu_compat import enable_cpu_compat

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    enable_cpu_compat()  # before importing megatron names it patches
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if world != args.tp * args.cp * args.pp:
        raise SystemExit(f"world size {world} != tp*cp*pp = {args.tp * args.cp * args.pp} (this check uses DP = 1)")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, context_parallel_size=args.cp
    )
    model_parallel_cuda_manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def make_recipe(args):
    from ssa_megatron.config import ModelConfig, ParallelConfig, RecipeConfig, SSAConfig, TrainConfig

    recipe = RecipeConfig(
        name="layout-check",
        model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                          num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
                          seq_length=args.seq),
        ssa=SSAConfig(block_size=args.block_size, top_k=args.top_k, alpha=args.alpha, p_full=args.p_full,
                      backend=args.backend),
        parallel=ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, context_parallel=args.cp),
        train=TrainConfig(precision="fp32", seed=args.seed, micro_batch_size=args.mbs,
                          global_batch_size=args.mbs * args.microbatches),
    )
    recipe.validate()
    return recipe


# --------------------------------------------------------------------------------------------------------------
# Global names and tensor-parallel slices


def global_name(model, name: str) -> str:
    """``decoder.layers.<local i>.…`` → ``decoder.layers.<global i>.…``; the last stage's copy of the tied
    embedding (``output_layer.weight``) → ``embedding.word_embeddings.weight``."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    name = ".".join(parts)
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def _is_swiglu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def tp_slice(full: torch.Tensor, param, name: str, tp: int, rank: int) -> torch.Tensor:
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_swiglu_fc1(name):  # each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
    return full.chunk(tp, dim=dim)[rank]


def global_shape(param, name: str, tp: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if tp > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def init_from_global_names(model, seed: int, tp: int, tp_rank: int) -> None:
    """Same weights in every layout: each global tensor is drawn from a generator seeded by its global name."""
    for name, param in model.named_parameters():
        gname = global_name(model, name)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
        shape = global_shape(param, name, tp)
        if "norm" in gname:
            full = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            full = 0.02 * torch.randn(shape, generator=gen)
        with torch.no_grad():
            param.copy_(tp_slice(full, param, name, tp, tp_rank).to(param.dtype))


# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    init_distributed(args)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_batch_on_this_cp_rank

    from ssa_megatron.megatron.mode import MODE_SAMPLER
    from ssa_megatron.megatron.model import build_gpt_model, transformer_config_from_recipe
    from ssa_megatron.megatron.tracker import get_ssa_tracker

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank = dist.get_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    layout = f"tp{args.tp}_cp{args.cp}_pp{args.pp}"
    if rank == 0:
        print(f"[layout-check] {layout}: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
              f"{args.microbatches}x{args.mbs} sequences, backend {args.backend}, device {device}", flush=True)

    recipe = make_recipe(args)

    def build(dtype: torch.dtype):
        # fp32/fp64 gradients: no weight-gradient fusion (it accumulates bf16/fp16 GEMMs into fp32 main_grad)
        config = transformer_config_from_recipe(recipe, params_dtype=dtype, pipeline_dtype=dtype,
                                                gradient_accumulation_fusion=False)
        model = build_gpt_model(recipe, pre_process=first, post_process=last, config=config)
        init_from_global_names(model, args.seed, args.tp, tp_rank)
        ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=dtype != torch.float64,
                                                     overlap_grad_reduce=False, use_distributed_optimizer=False),
            module=model,
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        return model, ddp

    check_dtype = torch.float64 if args.check_dtype == "fp64" else torch.float32
    model, ddp = build(check_dtype)

    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, args.vocab, (args.microbatches, args.mbs, args.seq + 1), generator=gen)
    position_ids = torch.arange(args.seq).expand(args.mbs, -1)

    def batches():
        for i in range(args.microbatches):
            batch = {"tokens": data[i, :, :-1], "labels": data[i, :, 1:], "position_ids": position_ids,
                     "loss_mask": torch.ones(args.mbs, args.seq), "cu_seqlens": None}
            batch = get_batch_on_this_cp_rank(batch, False, ps.get_context_parallel_group())
            yield {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    per_mb = []

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        out = m(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output):
            mask = batch["loss_mask"].float()
            loss_sum = (output.float() * mask).sum()
            n = mask.sum()
            per_mb.append(torch.stack([loss_sum.detach(), n]))
            return loss_sum, n.int(), {"lm loss": torch.stack([loss_sum.detach(), n])}

        return out, loss_func

    fwd_bwd = get_forward_backward_func()
    current = {"ddp": ddp}

    def iteration(it: int) -> None:
        MODE_SAMPLER.set_iteration(it)
        ddp = current["ddp"]
        ddp.zero_grad_buffer()
        fwd_bwd(forward_step_func=forward_step, data_iterator=batches(), model=[ddp],
                num_microbatches=args.microbatches, seq_length=args.seq, micro_batch_size=args.mbs,
                forward_only=False)

    # ---- correctness: one iteration in fp32 ----
    get_ssa_tracker().reset()
    per_mb.clear()
    iteration(0)
    modes = [MODE_SAMPLER.modes_this_iteration.get(i) for i in range(args.microbatches)]
    report = get_ssa_tracker().reduce()
    lm = torch.zeros(args.microbatches, 2, dtype=torch.float64, device=device)
    if last and per_mb:
        lm += torch.stack(per_mb).double().to(device)
    if args.cp > 1:
        dist.all_reduce(lm, group=ps.get_context_parallel_group())
    # Put the last stage's numbers everywhere (the pipeline group spans first..last).
    dist.all_reduce(lm, group=ps.get_pipeline_model_parallel_group())
    lm_loss = float((lm[:, 0] / lm[:, 1]).mean())
    lm_per_mode = {}
    for mode in ("full", "sparse"):
        idx = [i for i, m in enumerate(modes) if m == mode]
        if idx:
            lm_per_mode[mode] = float((lm[idx, 0] / lm[idx, 1]).mean())

    grads = {}
    for name, param in model.named_parameters():
        grads[(name, global_name(model, name))] = (param, param.main_grad.detach().double().cpu())

    result = {
        "layout": layout, "world": dist.get_world_size(), "check_dtype": args.check_dtype, "device": torch.cuda.get_device_name() if
        torch.cuda.is_available() else "cpu", "lm_loss": lm_loss, "lm_loss_per_mode": lm_per_mode, "modes": modes,
        "alignment_loss": report.get("alignment_loss"),
        "alignment_loss_per_layer": [report.get(f"alignment_loss/layer_{i + 1}") for i in range(args.layers)],
    }

    if args.save_baseline:
        if dist.get_world_size() != 1:
            raise SystemExit("--save-baseline needs world size 1")
        Path(args.save_baseline).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"grads": {g: t for (_, g), (_, t) in grads.items()}, "result": result}, args.save_baseline)
    if args.baseline:
        base = torch.load(args.baseline)
        worst, worst_name, n_checked = 0.0, "", 0
        for (name, gname), (param, g) in grads.items():
            ref = tp_slice(base["grads"][gname], param, name, args.tp, tp_rank)
            err = float((g - ref).norm() / ref.norm().clamp_min(1e-30))
            n_checked += 1
            if err > worst:
                worst, worst_name = err, gname
        stats = torch.tensor([worst], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        if float(stats) > worst:
            worst_name = "(another rank)"
        worst = float(stats)
        b = base["result"]
        result.update({
            "baseline_lm_loss": b["lm_loss"], "lm_loss_abs_diff": abs(lm_loss - b["lm_loss"]),
            "baseline_alignment_loss": b["alignment_loss"],
            "alignment_loss_abs_diff": abs((result["alignment_loss"] or 0) - (b["alignment_loss"] or 0)),
            "modes_match": modes == b["modes"],
            "grad_max_rel_err": worst, "grad_worst_tensor": worst_name, "grad_tensors_checked_rank0": n_checked,
            "rtol": args.rtol,
        })
        result["pass"] = bool(worst <= args.rtol and result["lm_loss_abs_diff"] <= args.rtol * max(1.0, lm_loss)
                              and result["alignment_loss_abs_diff"] <= args.rtol * max(1.0, b["alignment_loss"] or 0)
                              and result["modes_match"])

    # ---- throughput (fp32 weights, TF32 matmuls) ----
    del model, current["ddp"], ddp, grads
    model, current["ddp"] = build(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for it in range(args.warmup_iters + args.timed_iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        iteration(1 + it)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        if it >= args.warmup_iters:
            times.append(time.perf_counter() - t0)
    get_ssa_tracker().reset()
    if times:
        step = sum(times) / len(times)
        tokens = args.microbatches * args.mbs * args.seq
        result.update({"iter_s": step, "tokens_per_s": tokens / step,
                       "tokens_per_s_per_gpu": tokens / step / dist.get_world_size()})
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        result["peak_mem_gib"] = round(float(peak), 2)

    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(line + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
