#!/usr/bin/env python
"""The small-scale SSA study of docs/results.md: FullAttn, MoBA-style sparse-only and SSA trained on the same real
text through ssa-train, evaluated under full and sparse inference, and reported.

    python tools/run_study.py prepare --out data/study                  # CPU machine, about 8 min on 2 cores
    python tools/run_study.py run --data data/study --out runs/study    # one GPU: trains, evaluates, reports
    python tools/run_study.py report --out runs/study                   # the tables and plots again

prepare: tools/build_corpus.py (the offline corpus and its held-out squad_shifts paragraphs), a 16k byte-level BPE
(tools/train_tokenizer.py), 2048-token shards with 1 % of the documents held out (tools/prepare_data.py), and
heldout_wiki_nyt.txt: the Wikipedia and New York Times paragraphs of squad_shifts, a source the training text does
not contain. Only shards/, tokenizer.json and heldout_wiki_nyt.txt are needed to train and evaluate (53 MB);
the raw text stays in <out>/raw.

run: for each model (recipes/study_<model>.yaml), `ssa-train study_<model> data.train_shards=<data>/shards
train.run_dir=<out>/<model>` with its console in <out>/<model>/train.log; by default the three train at once on one
GPU (``--jobs 3``: these small models leave most of an H200 idle; ``--jobs 1`` trains one after the other).
Then `run_study.py evaluate` per run, which writes <run>/study_eval.json:
- held-out perplexity under full inference and under sparse inference at RF 128, 256, 512, 1024 (block 16, top_k
  8..64), on heldout_wiki_nyt.txt at the training length;
- attention statistics per layer (ssa_megatron.ssa.reference.attention_metrics: sparsity as the paper's
  Definition 1, entropy, KL(full || sparse), sink mass) of the full-inference forward and of every sparse forward;
- perplexity at 1x, 2x and 4x the training length on the same tokens (ssa_megatron.eval.extrapolation), full and
  sparse at the training budget;
- perplexity on the held-out 1 % of the training corpus (in-distribution), full and sparse.
Finally the report (also `run_study.py report`): <out>/report/results.md (tables), results.json and the plots
ppl_vs_rf.png, sparsity_per_layer.png and loss_curves.png.

Extra arguments of run go to ssa-train as overrides of all three recipes (e.g. train.steps=50 for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("full_attn", "moba", "ssa")
"""Run names; model m trains with recipes/study_<m>.yaml."""
LABELS = {"full_attn": "FullAttn", "moba": "MoBA", "ssa": "SSA"}
INFERENCE_TOP_KS = (8, 16, 32, 64)
"""Sparse inference budgets in blocks: RF 128, 256, 512 and 1024 tokens at block 16."""
LENGTH_FACTORS = (2, 4)
"""Evaluation lengths beyond the training length, as multiples of it."""
TRAIN_SOURCES = ("kernel-docs", "python-docs", "perl-docs", "shakespeare")
"""tools/build_corpus.py sources trained on. Its dictionary (gcide, 40 % of the text, short definitions) is left
out so that the shards, about 17M tokens, stay under the 60 MB that travels with the tree to a GPU machine."""
HELDOUT_TEXT = "heldout_wiki_nyt.txt"
HELDOUT_SOURCES = ("squad_shifts_new_wiki_v1.0", "squad_shifts_nyt_v1.0")
EVAL_FILE = "study_eval.json"


def log(message: str) -> None:
    print(f"run_study: {message}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# prepare


def run_tool(argv: list[str]) -> None:
    """Runs one of tools/*.py to completion; its output goes to the console."""
    command = [sys.executable, str(ROOT / "tools" / argv[0]), *argv[1:]]
    log(" ".join(command[1:]))
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"run_study: {argv[0]} failed; fix the cause and run prepare again (finished parts are kept)")


def write_heldout_text(eval_dir: Path, path: Path) -> int:
    """The held-out paragraphs in their order (paragraphs of one article follow each other), joined by blank lines."""
    paragraphs = []
    for source in HELDOUT_SOURCES:
        with open(eval_dir / f"{source}.jsonl", encoding="utf-8") as f:
            paragraphs += [json.loads(line)["text"].strip() for line in f if line.strip()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    tmp.replace(path)
    return len(paragraphs)


def prepare(args) -> int:
    out = Path(args.out)
    raw = out / "raw"
    corpus, eval_dir = raw / "corpus", raw / "corpus_eval"
    if not (corpus / "corpus.json").is_file() or not eval_dir.is_dir():
        run_tool(["build_corpus.py", "--output", str(corpus), "--sources", *TRAIN_SOURCES, "--eval"])
    text = [str(corpus / f"{source}.jsonl") for source in TRAIN_SOURCES]
    tokenizer = out / "tokenizer.json"
    if not tokenizer.is_file():
        run_tool(["train_tokenizer.py", *text, "--vocab-size", str(args.vocab_size), "--output", str(tokenizer)])
    run_tool(["prepare_data.py", *text, "--tokenizer", str(tokenizer), "--seq-length", str(args.seq_length),
              "--output", str(out / "shards"), "--valid-fraction", "0.01", "--shard-mb", "16"])
    n = write_heldout_text(eval_dir, out / HELDOUT_TEXT)
    tokens = json.loads((out / "shards" / "meta.json").read_text())["tokens"]
    log(f"{out}: shards ({tokens['train']:,} training and {tokens['valid']:,} held-out tokens), tokenizer.json, "
        f"{HELDOUT_TEXT} ({n} paragraphs); "
        f"next: python tools/run_study.py run --data {out}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# run: training


def _pump(stream, name: str, log_path: Path, echo: bool) -> None:
    """Copies a child's console to its log file and, prefixed with the run name, to ours."""
    with open(log_path, "a", encoding="utf-8") as f:
        for line in stream:
            f.write(line)
            f.flush()
            if echo:
                print(f"[{name}] {line}", end="", flush=True)


def run_all(commands: dict[str, list[str]], jobs: int, logs: dict[str, Path], echo: bool = True) -> dict[str, int]:
    """Runs ``commands`` (name → argv), at most ``jobs`` at a time; returns name → exit status."""
    pending, running, status = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            logs[name].parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(commands[name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            pump = threading.Thread(target=_pump, args=(proc.stdout, name, logs[name], echo), daemon=True)
            pump.start()
            running[name] = (proc, pump)
        for name, (proc, pump) in list(running.items()):
            if proc.poll() is not None:
                pump.join()
                status[name] = proc.returncode
                del running[name]
        time.sleep(0.5)
    return status


def train_command(model: str, data: Path, out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "ssa_megatron.training.cli", f"study_{model}", f"data.train_shards={data / 'shards'}",
            f"train.run_dir={out / model}", "train.progress_bar=false", *overrides]


def run(args, overrides: list[str]) -> int:
    data, out = Path(args.data), Path(args.out)
    for need in ("shards", "tokenizer.json", HELDOUT_TEXT):
        if not (data / need).exists():
            raise SystemExit(f"run_study: --data {str(data)!r} has no {need}; make it with: python tools/run_study.py "
                             f"prepare --out {data}")
    models = list(args.models)
    started = time.perf_counter()
    log(f"training {', '.join(models)} ({args.jobs} at a time) -> {out}/<model>; overrides: {overrides or 'none'}")
    status = run_all({m: train_command(m, data, out, overrides) for m in models}, args.jobs,
                     {m: out / m / "train.log" for m in models})
    failed = [m for m in models if status[m] != 0]
    if failed:
        raise SystemExit(f"run_study: training failed for {', '.join(failed)} (see {out}/<model>/train.log)")
    trained = time.perf_counter()
    log(f"trained in {trained - started:.0f} s; evaluating")
    eval_commands = {m: [sys.executable, __file__, "evaluate", "--run", str(out / m), "--data", str(data),
                         "--rows", str(args.rows), "--device", args.device,
                         "--top-k", ",".join(map(str, args.top_k))] for m in models}
    status = run_all(eval_commands, args.jobs, {m: out / m / "evaluate.log" for m in models})
    failed = [m for m in models if status[m] != 0]
    if failed:
        raise SystemExit(f"run_study: evaluation failed for {', '.join(failed)} (see {out}/<model>/evaluate.log)")
    log(f"evaluated in {time.perf_counter() - trained:.0f} s")
    report(argparse.Namespace(out=str(out), models=models))
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------------------------
# evaluate (one run)


def evaluate(args) -> int:
    import torch

    from ssa_megatron.eval.data import eval_batches, text_batches
    from ssa_megatron.eval.extrapolation import length_extrapolation
    from ssa_megatron.eval.perplexity import load_model, perplexity
    from ssa_megatron.eval.sweep import budget_sweep

    started = time.perf_counter()
    data, run_dir = Path(args.data), Path(args.run)
    device = args.device
    model = load_model(run_dir, device, torch.bfloat16 if device.startswith("cuda") else None)
    recipe = model.config.megatron_recipe
    seq, top_k = recipe["model"]["seq_length"], recipe["ssa"]["top_k"]
    batch_size = max(1, min(args.batch_size, args.rows))
    tokenizer = str(data / "tokenizer.json")

    batches = list(islice(text_batches(str(data / HELDOUT_TEXT), tokenizer, seq, batch_size),
                          -(-args.rows // batch_size)))
    log(f"{run_dir}: {sum(b['tokens'].shape[0] for b in batches)} held-out rows x {seq} tokens from {HELDOUT_TEXT}")
    sweep = budget_sweep(model, batches, list(args.top_k), stats=True)
    for row in sweep:
        log(f"  {row['mode']:>6} RF {row['receptive_field']:>5}: ppl {row['ppl']:.3f}, sparsity {row['sparsity']:.3f}, "
            f"entropy {row['entropy_bits']:.3f} bits, KL {row['kl_full_sparse']:.4f}")
    rows_longest = max(1, args.rows // LENGTH_FACTORS[-1])  # rows of the longest length: the same tokens
    length = length_extrapolation(model, str(data / HELDOUT_TEXT), factors=(1, *LENGTH_FACTORS), rows=rows_longest,
                                  tokenizer=tokenizer)
    for row in length:
        log(f"  {row['factor']}x ({row['seq_length']} tokens) {row['mode']}: ppl {row['ppl']:.3f}")
    in_dist = []
    valid = eval_batches(str(data / "shards"), batch_size, max(1, args.rows // batch_size), split="valid")
    for mode in ("full", "sparse"):
        model.set_attention_mode(mode, top_k=top_k)
        in_dist.append({"mode": mode, **perplexity(model, valid)})
        log(f"  in-distribution {mode}: ppl {in_dist[-1]['ppl']:.3f}")
    result = {"heldout": {"text": HELDOUT_TEXT, "sources": list(HELDOUT_SOURCES), "seq_length": seq},
              "sweep": sweep, "length": length, "in_distribution": in_dist,
              "seconds": round(time.perf_counter() - started, 1)}
    tmp = run_dir / (EVAL_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(run_dir / EVAL_FILE)
    log(f"{run_dir / EVAL_FILE} in {result['seconds']} s")
    return 0


# ------------------------------------------------------------------------------------------------------------
# report


def report(args) -> int:
    from ssa_megatron.eval.method_study import method_report

    out = Path(args.out)
    models = [m for m in args.models if (out / m / EVAL_FILE).is_file()]
    if not models:
        raise SystemExit(f"run_study: no {EVAL_FILE} under {out}/<model>; run `run_study.py run` first")
    paths = method_report({LABELS.get(m, m): out / m for m in models}, out / "report", EVAL_FILE)
    log("report: " + ", ".join(str(p) for p in paths))
    print((out / "report" / "results.md").read_text(), end="")
    return 0


def top_ks(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be comma-separated budgets in blocks >= 1, e.g. 8,16,32")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="corpus, tokenizer, shards and held-out text (CPU)")
    p.add_argument("--out", default="data/study")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--seq-length", type=int, default=2048)
    p = sub.add_parser("run", help="train the models with ssa-train, evaluate them, report")
    p.add_argument("--data", default="data/study")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--jobs", type=int, default=3,
                   help="trainings (and evaluations) at once on the machine (default 3: the three share one GPU)")
    p.add_argument("--rows", type=int, default=48,
                   help="held-out rows of the training length per evaluation (default 48)")
    p.add_argument("--device", default=None)
    p.add_argument("--top-k", type=top_ks, default=list(INFERENCE_TOP_KS),
                   help="sparse inference budgets in blocks, comma-separated (default 8,16,32,64: RF 128..1024 at "
                        "block 16)")
    p = sub.add_parser("evaluate", help="evaluate one trained run (run does this)")
    p.add_argument("--run", required=True)
    p.add_argument("--data", default="data/study")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--top-k", type=top_ks, default=list(INFERENCE_TOP_KS))
    p = sub.add_parser("report", help="tables and plots from evaluated runs")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "jobs", 1) < 1:
        parser.error(f"--jobs {args.jobs}: must be >= 1")
    if getattr(args, "rows", 1) < 1:
        parser.error(f"--rows {args.rows}: must be >= 1")
    if hasattr(args, "device") and args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    if args.command == "prepare":
        return prepare(args)
    if args.command == "run":
        return run(args, extra)
    if args.command == "evaluate":
        return evaluate(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
