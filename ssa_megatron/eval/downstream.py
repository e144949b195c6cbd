"""The paper's downstream protocol through lm-evaluation-harness, from local copies of the data (no hub).

The authors' protocol (zhenyi4/ssa ``evaluation/eval_benchmarks.sh``): ARC-Easy and ARC-Challenge 25-shot, PIQA
3-shot, HellaSwag 10-shot, each over the seeds 1, 12, 123, 1234, 12345 (mean ± sample std of ``acc_norm``, in %),
and WikiText-2 word perplexity once (0-shot, deterministic), with ``max_length`` 8192. Here each task runs in full
and in sparse inference (``ssa_mode`` and the budget go to the exported model's config through lm-eval's model
args, which ``from_pretrained`` applies).

Local data: ``<data_dir>/<task>/<split>.jsonl`` (or ``.json``/``.parquet``) with the fields of the hub dataset the
stock task reads (:data:`TASKS` names them). For each task a YAML is written that includes lm-eval's own task file
(prompt, metrics, ``!function`` helpers unchanged) and replaces only the dataset by those files; the task is then
called ``local_<task>``. Splits without a file are left out (lm-eval draws few-shot examples from the training
split, else from the validation split).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

SEEDS = (1, 12, 123, 1234, 12345)


@dataclass(frozen=True)
class Task:
    name: str
    fewshot: int
    metric: str
    """The reported metric: ``acc_norm`` (in %) or ``word_perplexity``."""
    fields: str
    """The hub dataset and fields the stock task reads (for the local copies)."""
    seeded: bool = True


TASKS = {
    "wikitext": Task("wikitext", 0, "word_perplexity", "EleutherAI/wikitext_document_level wikitext-2-raw-v1: page",
                     seeded=False),
    "piqa": Task("piqa", 3, "acc_norm", "baber/piqa: goal, sol1, sol2, label"),
    "hellaswag": Task("hellaswag", 10, "acc_norm", "Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings, label"),
    "arc_easy": Task("arc_easy", 25, "acc_norm", "allenai/ai2_arc ARC-Easy: question, choices {text, label}, "
                                                 "answerKey"),
    "arc_challenge": Task("arc_challenge", 25, "acc_norm", "allenai/ai2_arc ARC-Challenge: question, choices "
                                                           "{text, label}, answerKey"),
}
SPLITS = ("train", "validation", "test")
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def stock_task_yaml(name: str) -> Path:
    """lm-eval's own YAML of task ``name``."""
    import lm_eval

    root = Path(lm_eval.__file__).resolve().parent / "tasks"
    path = root / ("arc" if name.startswith("arc_") else name) / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"task {name!r}: lm-eval {lm_eval.__version__} has no {path}")
    return path


def write_local_tasks(data_dir: Path, tasks: list[str], out_dir: Path) -> Path:
    """Writes ``local_<task>.yaml`` for each task into ``out_dir`` (lm-eval's ``--include_path``); ValueError (one
    line) when a task has no local evaluation split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"task {name!r}: must be one of {', '.join(TASKS)}")
        files, kind = {}, None
        for split in SPLITS:
            for suffix, fmt in SUFFIXES.items():
                candidate = data_dir / name / f"{split}{suffix}"
                if candidate.is_file():
                    files[split], kind = str(candidate.resolve()), fmt
                    break
        if "validation" not in files and "test" not in files:
            raise ValueError(f"task {name!r}: no {data_dir / name}/validation.jsonl or test.jsonl (fields "
                             f"{TASKS[name].fields}); docs/hf_eval.md says how to make local copies")
        lines = [f"include: {stock_task_yaml(name)}", f"task: local_{name}", f"dataset_path: {kind}",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:"]
        lines += [f"    {split}: {path}" for split, path in files.items()]
        for split in SPLITS:
            lines.append(f"{'training' if split == 'train' else split}_split: {split if split in files else 'null'}")
        (out_dir / f"local_{name}.yaml").write_text("\n".join(lines) + "\n")
    return out_dir


def model_args(model: str, mode: str, top_k: int | None = None, block_size: int | None = None,
               max_length: int = 8192, dtype: str = "auto") -> str:
    """lm-eval's ``--model_args`` for an exported SSA model in ``mode`` (full | sparse), optionally another
    budget. A plain Llama export (``ssa.gate none``) has full attention only: sparse is refused in one line."""
    config = json.loads((Path(model) / "config.json").read_text())
    if config.get("model_type") != "ssa_llama":
        if mode == "sparse" or top_k or block_size:
            raise ValueError(f"model {model!r} is a plain {config.get('model_type')!r} export (ssa.gate none): sparse "
                             "mode and budgets are not expressible there; export with --keep-ssa-llama")
        return f"pretrained={model},dtype={dtype},max_length={max_length}"
    args = f"pretrained={model},trust_remote_code=True,dtype={dtype},max_length={max_length},ssa_mode={mode}"
    if top_k:
        args += f",ssa_top_k={top_k}"
    if block_size:
        args += f",ssa_block_size={block_size}"
    return args


def run_protocol(model: str, data_dir: Path, out_dir: Path, *, tasks=tuple(TASKS), modes=("full", "sparse"),
                 seeds=SEEDS, top_k: int | None = None, block_size: int | None = None, batch_size: int = 8,
                 max_length: int = 8192, device: str | None = None, limit: int | None = None,
                 log=print) -> dict:
    """Runs every (mode, task, seed) through ``lm_eval.simple_evaluate``; writes each run's results to
    ``<out_dir>/<mode>/<task>_seed<seed>.json`` and returns (and writes as ``summary.json``) the summary of
    :func:`summarise`. ``limit``: documents per task (for smoke tests; the protocol uses all)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = write_local_tasks(Path(data_dir), list(tasks), Path(out_dir) / "tasks")
    manager = TaskManager(include_path=str(include))
    runs = []
    for mode in modes:
        args = model_args(model, mode, top_k, block_size, max_length)
        for name in tasks:
            task = TASKS[name]
            for seed in (seeds if task.seeded else seeds[:1]):
                log(f"lm-eval: {mode} {name} {task.fewshot}-shot seed {seed}")
                result = lm_eval.simple_evaluate(
                    model="hf", model_args=args, tasks=[f"local_{name}"], num_fewshot=task.fewshot,
                    batch_size=batch_size, device=device, limit=limit, task_manager=manager, log_samples=False,
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                    bootstrap_iters=0)
                metrics = result["results"][f"local_{name}"]
                path = Path(out_dir) / mode / f"{name}_seed{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"model_args": args, "task": name, "num_fewshot": task.fewshot,
                                            "seed": seed, "limit": limit, "results": metrics}, indent=2,
                                           default=str))
                runs.append({"mode": mode, "task": name, "seed": seed, "results": metrics})
    summary = summarise(runs)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarise(runs: list[dict]) -> dict:
    """Per mode and task: the reported metric's mean, sample std (0 for one run) and count; ``acc_norm`` in %."""
    out: dict = {}
    for run in runs:
        task = TASKS[run["task"]]
        value = run["results"][f"{task.metric},none"]
        scale = 100.0 if task.metric == "acc_norm" else 1.0
        out.setdefault(run["mode"], {}).setdefault(run["task"], {"metric": task.metric, "values": []})[
            "values"].append(float(value) * scale)
    for tasks in out.values():
        for entry in tasks.values():
            v = entry["values"]
            entry.update(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0, n=len(v))
    return out
