#!/usr/bin/env python
"""One report for a budget scaling study: several ssa-train runs in one CSV, one JSON and three plots.

    python tools/study_report.py runs/sweep_125m_k* --out reports/125m
    python tools/study_report.py runs/k4 runs/k8 runs/k16 --out reports/tiny --data builtin:stdlib --top-k 1 2 4 8

Each RUN_DIR is a train.run_dir of ssa-train (recipe.yaml, checkpoints/, tensorboard/). Its budget sweep is read
from <run>/budget_sweep/budget_sweep.json (tools/budget_sweep.py --model <run> --out <run>/budget_sweep), or
<run>/budget_sweep.json, or <out>/sweeps/<run>/. A run without one is swept here when --data is given (same
batches and budgets for every such run; written to <out>/sweeps/<run>/), else it contributes the held-out
eval/ppl_{full,sparse} it logged to TensorBoard (the `source` column says which).

Writes to --out: study.csv and study.json (one row per run x inference budget x mode, with the columns run,
train_budget (K x BS), train_top_k, train_block_size, train_receptive_field, p_full, alpha, steps, tokens),
loss_curves.png (loss/lm per run), final_ppl.png (full and sparse PPL against the training budget) and
ppl_vs_inference_budget.png (one line per training budget).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from ssa_megatron.eval.cli import add_data_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="ssa-train run directories (train.run_dir)")
    parser.add_argument("--out", default="study", help="output directory (default ./study)")
    add_data_args(parser, data_required=False)
    parser.add_argument("--top-k", type=int, nargs="+", default=None,
                        help="inference budgets (blocks) of the sweeps run here (default: powers of two up to "
                             "seq_length / block_size)")
    parser.add_argument("--block-size", type=int, nargs="+", default=None,
                        help="inference block sizes of the sweeps run here (default: the model's)")
    args = parser.parse_args(argv)
    return args


def default_top_ks(seq_length: int, block_size: int) -> list[int]:
    """1, 2, 4, ... up to the budget that covers a whole row (the full-attention end of the curve)."""
    ks, k = [], 1
    while k * block_size < seq_length:
        ks.append(k)
        k *= 2
    return ks + [k]


def run_sweep(run, args, out_dir: Path) -> tuple[list[dict], Path]:
    """``tools/budget_sweep.py`` on one run, in process: the same loading, sweep, table and plot functions."""
    from tqdm import tqdm

    from ssa_megatron.eval.cli import load_inputs
    from ssa_megatron.eval.sweep import budget_sweep, plot_sweep, steps_of, write_table

    model, batches = load_inputs(argparse.Namespace(**vars(args), model=str(run.path)))
    block_sizes = args.block_size or [model.config.ssa_block_size]
    top_ks = args.top_k or default_top_ks(int(batches[0]["tokens"].shape[1]), min(block_sizes))
    with tqdm(total=steps_of(top_ks, block_sizes, len(batches), args.stats), desc=f"sweep {run.name}",
              unit="batch") as bar:
        table = budget_sweep(model, batches, top_ks, block_sizes, stats=args.stats, progress=bar.update)
    _, json_path = write_table(table, out_dir)
    plot_sweep(table, out_dir / "budget_sweep.png", title=run.name)
    return table, json_path


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from ssa_megatron.eval import study

    started = time.perf_counter()
    out = Path(args.out)
    sweeps_dir = out / "sweeps"
    try:
        runs = [study.read_run(p, name) for p, name in zip(args.runs, study.run_names([Path(p) for p in args.runs]))]
        found = {run.name: study.find_sweep(run, sweeps_dir) for run in runs}
    except ValueError as err:
        print(f"study_report: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    missing = [run for run in runs if found[run.name] is None]
    plan = [f"{len(found) - len(missing)} with a budget sweep"]
    if missing:
        how = (f"swept here on {args.data}" if args.data else
               "no --data given: the eval/ppl they logged to TensorBoard")
        plan.append(f"{len(missing)} without ({', '.join(r.name for r in missing)}: {how})")
    print(f"study_report: {len(runs)} runs ("
          + ", ".join(f"{r.name} K×BS {r.train_budget} p_full {r.p_full} alpha {r.alpha}" for r in runs)
          + f"); {'; '.join(plan)}; writing to {out}", flush=True)

    rows = []
    for run in runs:
        if found[run.name] is None and args.data:
            try:
                found[run.name] = run_sweep(run, args, sweeps_dir / run.name)
            except ValueError as err:
                print(f"study_report: error: run {run.name}: {' '.join(str(err).split())}", file=sys.stderr)
                return 2
        if found[run.name] is not None:
            table, path = found[run.name]
            rows += study.study_rows(run, table, str(path))
        else:
            logged = study.logged_eval_rows(run)
            if not logged:
                print(f"study_report: {run.name}: no budget sweep (looked in "
                      f"{', '.join(str(p) for p in study.sweep_places(run, sweeps_dir))}) and no logged eval/ppl; "
                      "it appears in the loss curves only (pass --data to sweep it)", flush=True)
            rows += study.study_rows(run, logged, "tensorboard eval/ppl")
    paths = [*study.write_study(runs, rows, out), *study.plot_study(runs, rows, out)]
    print(f"study_report: {len(rows)} rows from {len(runs)} runs in {time.perf_counter() - started:.1f}s; outputs: "
          + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
