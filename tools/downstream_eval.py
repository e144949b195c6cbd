#!/usr/bin/env python
"""The paper's downstream protocol with lm-evaluation-harness, in full and sparse inference, from local data.

    python tools/downstream_eval.py --model hf/ssa_1b --data-dir /data/lm_eval_local --out runs/ssa_1b/downstream
    python tools/downstream_eval.py --model hf/ssa_1b --data-dir /data/lm_eval_local --tasks piqa --modes sparse \\
        --top-k 8 --seeds 1 12 --out /tmp/piqa_k8

Tasks (ssa_megatron/eval/downstream.py): WikiText-2 word perplexity (once), PIQA 3-shot, HellaSwag 10-shot, ARC-Easy
and ARC-Challenge 25-shot, each over --seeds (default 1 12 123 1234 12345, the authors'), in each of --modes.
--data-dir holds <task>/<split>.jsonl copies of the hub datasets (docs/hf_eval.md, "Downstream evaluation").
Needs the lm-eval package (pip install lm-eval); the hub is never contacted (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).
Prints mean ± std per mode and task; --out gets every run's results, the task YAMLs and summary.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from ssa_megatron.eval.downstream import SEEDS, TASKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported HF folder (tools/convert_to_hf.py)")
    parser.add_argument("--data-dir", required=True, help="local task data: <task>/<split>.jsonl")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--modes", nargs="+", default=["full", "sparse"], choices=("full", "sparse"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--top-k", type=int, default=None, help="sparse budget in blocks (default: the model's)")
    parser.add_argument("--block-size", type=int, default=None, help="sparse block size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=8192, help="lm-eval's context (default 8192)")
    parser.add_argument("--device", default=None, help="torch device (default: lm-eval's choice)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (smoke tests only)")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (convert a checkpoint with tools/convert_to_hf.py)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval.models.huggingface  # noqa: F401  (its hf model also needs accelerate)
    except ImportError as err:
        print(f"downstream_eval: error: lm-eval's hf model cannot load ({err}); pip install 'lm-eval[hf]'",
              file=sys.stderr)
        return 2
    from ssa_megatron.eval.downstream import TASKS, run_protocol

    started = time.perf_counter()
    runs = sum(len(args.seeds) if TASKS[t].seeded else 1 for t in args.tasks) * len(args.modes)
    print(f"downstream_eval: {args.model}: tasks {', '.join(args.tasks)}, modes {', '.join(args.modes)}, seeds "
          f"{' '.join(map(str, args.seeds))} ({runs} lm-eval runs), data {args.data_dir}"
          + (f", limit {args.limit} documents per task" if args.limit else ""), flush=True)
    try:
        summary = run_protocol(args.model, Path(args.data_dir), Path(args.out), tasks=args.tasks, modes=args.modes,
                               seeds=args.seeds, top_k=args.top_k, block_size=args.block_size,
                               batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                               limit=args.limit)
    except ValueError as err:
        print(f"downstream_eval: error: {err}", file=sys.stderr)
        return 2
    for mode, tasks in summary.items():
        for task, entry in tasks.items():
            unit = " %" if entry["metric"] == "acc_norm" else ""
            print(f"{mode:>6} {task:<14} {entry['metric']:<16} {entry['mean']:.3f} ± {entry['std']:.3f}{unit} "
                  f"(n={entry['n']})")
    print(f"outputs: {Path(args.out) / 'summary.json'} and one JSON per run under {args.out}/<mode>/")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
