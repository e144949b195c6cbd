"""A budget scaling study: several ssa-train runs (one per training budget, or per p_full / alpha) gathered into
one table and three plots.

A run is what ssa-train writes under ``train.run_dir``: ``recipe.yaml`` (or only checkpoints, whose recipe is read
instead), ``checkpoints/`` and ``tensorboard/``. Each run contributes:

- its settings: the training budget ``ssa.top_k × ssa.block_size`` (blocks × tokens = receptive field), ``p_full``,
  ``alpha``, and the steps and tokens of its newest checkpoint (``train_state.json``);
- its loss curve: the TensorBoard scalar ``loss/lm`` (read with tensorboard's ``EventAccumulator``);
- its budget sweep (``tools/budget_sweep.py``: ``budget_sweep.json``, one row per inference budget and mode), from
  the places :func:`find_sweep` looks; without one, the held-out ``eval/ppl_{full,sparse}`` the run logged, at its
  own inference budget (``source`` says which).

The sweep itself is ``ssa_megatron.eval.sweep.budget_sweep``; nothing here evaluates a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ssa_megatron.eval.perplexity import METRICS
from ssa_megatron.eval.sweep import write_csv

SWEEP_FILE = "budget_sweep.json"
RUN_COLUMNS = ("run", "train_budget", "train_top_k", "train_block_size", "train_receptive_field", "p_full", "alpha",
               "steps", "tokens")
"""Columns that say which run a row belongs to (the same on every row of one run)."""
COLUMNS = (*RUN_COLUMNS, "mode", "block_size", "top_k", "receptive_field", "loss", "ppl", "eval_tokens", "source",
           *METRICS)
LOSS_TAG = "loss/lm"


class NotARunError(ValueError):
    """A path given as a run that is not an ssa-train run directory."""


@dataclass
class StudyRun:
    """One training run of the study. ``scalars``: TensorBoard tag → ``[(step, value), ...]``."""

    name: str
    path: Path
    top_k: int
    block_size: int
    inference_top_k: int
    inference_block_size: int
    p_full: float
    alpha: float
    seq_length: int
    global_batch_size: int
    steps: int | None
    tokens: int | None
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def train_budget(self) -> str:
        return f"{self.top_k}x{self.block_size}"

    @property
    def receptive_field(self) -> int:
        return self.top_k * self.block_size

    def columns(self) -> dict:
        return {"run": self.name, "train_budget": self.train_budget, "train_top_k": self.top_k,
                "train_block_size": self.block_size, "train_receptive_field": self.receptive_field,
                "p_full": self.p_full, "alpha": self.alpha, "steps": self.steps, "tokens": self.tokens}


def read_run(path: str | Path, name: str | None = None) -> StudyRun:
    """The settings, progress and TensorBoard scalars of one run directory. Raises :class:`NotARunError` (one line)
    for a path that is not one."""
    from ssa_megatron.training.checkpoint import read_latest, recipe_from_dict

    p = Path(path).expanduser()
    if not p.is_dir():
        raise NotARunError(f"run {str(path)!r}: {'not a directory' if p.exists() else 'does not exist'} (expected "
                           "an ssa-train run directory: recipe.yaml, checkpoints/, tensorboard/)")
    recipe_file, ckpt_dir = p / "recipe.yaml", p / "checkpoints"
    if recipe_file.is_file():
        data = yaml.safe_load(recipe_file.read_text())
    elif ckpt_dir.is_dir():
        from ssa_megatron.training.checkpoint import read_checkpoint_recipe, resolve_checkpoint

        data = read_checkpoint_recipe(resolve_checkpoint(p))[1]
    else:
        raise NotARunError(f"run {str(path)!r} is not an ssa-train run directory: it has neither recipe.yaml nor "
                           "checkpoints/ (pass the train.run_dir of a run that started training)")
    recipe = recipe_from_dict(data, f"run {str(path)!r}")
    train = data.get("train") or {}
    gbs = int(train.get("global_batch_size") or 0)
    steps = tokens = None
    latest = read_latest(ckpt_dir) if ckpt_dir.is_dir() else None
    if latest is not None and (latest / "train_state.json").is_file():
        state = json.loads((latest / "train_state.json").read_text())
        steps, tokens = int(state["step"]), state.get("consumed_tokens")
    scalars = tensorboard_scalars(p / "tensorboard")
    if steps is None and scalars.get(LOSS_TAG):  # no checkpoint yet: the last logged step
        steps = scalars[LOSS_TAG][-1][0]
    if tokens is None and steps is not None and gbs:
        tokens = steps * gbs * recipe.model.seq_length
    inference = recipe.ssa.for_inference()
    return StudyRun(name=name or p.name, path=p, top_k=recipe.ssa.top_k, block_size=recipe.ssa.block_size,
                    inference_top_k=inference.top_k, inference_block_size=inference.block_size,
                    p_full=recipe.ssa.p_full, alpha=recipe.ssa.alpha, seq_length=recipe.model.seq_length,
                    global_batch_size=gbs, steps=steps, tokens=None if tokens is None else int(tokens),
                    scalars=scalars)


def run_names(paths: list[Path]) -> list[str]:
    """Directory names, with as many parent folders as it takes to tell them apart (``a/k8``, ``b/k8``)."""
    parts = [Path(p).expanduser().resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    raise NotARunError(f"runs given twice: {', '.join(str(p) for p in paths)}")


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``tb_dir`` (all points, not a sample), by tag; {} without events."""
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def sweep_places(run: StudyRun, sweeps_dir: Path | None) -> list[Path]:
    """Where a run's ``budget_sweep.json`` is looked for, in order: ``<run>/budget_sweep/`` (the documented
    ``tools/budget_sweep.py --out <run>/budget_sweep``), ``<run>/``, then ``<sweeps_dir>/<run name>/`` (where the
    report writes the sweeps it runs)."""
    places = [run.path / "budget_sweep" / SWEEP_FILE, run.path / SWEEP_FILE]
    if sweeps_dir is not None:
        places.append(sweeps_dir / run.name / SWEEP_FILE)
    return places


def find_sweep(run: StudyRun, sweeps_dir: Path | None = None) -> tuple[list[dict], Path] | None:
    """``(rows, path)`` of the first budget sweep found for ``run`` (:func:`sweep_places`), or None."""
    for path in sweep_places(run, sweeps_dir):
        if path.is_file():
            rows = json.loads(path.read_text())
            if not isinstance(rows, list) or not all(isinstance(r, dict) and "mode" in r and "ppl" in r for r in rows):
                raise ValueError(f"{path}: not a budget sweep table (a JSON list of rows with mode and ppl, as "
                                 "tools/budget_sweep.py writes)")
            return rows, path
    return None


def logged_eval_rows(run: StudyRun) -> list[dict]:
    """Without a sweep: the last held-out ``eval/ppl_full`` / ``eval/ppl_sparse`` the run logged (the sparse one at
    its own inference budget), as sweep-like rows; [] when it logged none."""
    rows = []
    for mode in ("full", "sparse"):
        points = run.scalars.get(f"eval/ppl_{mode}")
        if not points:
            continue
        sparse = mode == "sparse"
        loss = run.scalars.get(f"eval/loss_{mode}")
        rows.append({"mode": mode, "block_size": run.inference_block_size if sparse else None,
                     "top_k": run.inference_top_k if sparse else None,
                     "receptive_field": run.inference_top_k * run.inference_block_size if sparse else run.seq_length,
                     "loss": loss[-1][1] if loss else math.log(points[-1][1]), "ppl": points[-1][1],
                     "tokens": None})
    return rows


def study_rows(run: StudyRun, sweep: list[dict], source: str) -> list[dict]:
    """One row of :data:`COLUMNS` per row of ``sweep`` (a mode at an inference budget), with the run's columns."""
    return [{**run.columns(), **{k: r.get(k) for k in ("mode", "block_size", "top_k", "receptive_field", "loss",
                                                        "ppl")},
             "eval_tokens": r.get("tokens"), "source": source, **{k: r[k] for k in METRICS if k in r}}
            for r in sweep]


def final_ppl(run: StudyRun, rows: list[dict]) -> dict:
    """The run's full-attention PPL and its sparse PPL at its own inference budget (else at its training budget)
    among ``rows`` (its study rows); None where absent."""
    full = next((r["ppl"] for r in rows if r["mode"] == "full"), None)
    sparse = None
    for k, bs in ((run.inference_top_k, run.inference_block_size), (run.top_k, run.block_size)):
        sparse = next((r["ppl"] for r in rows if r["mode"] == "sparse" and r["top_k"] == k and r["block_size"] == bs),
                      None)
        if sparse is not None:
            break
    return {"ppl_full": full, "ppl_sparse": sparse}


def write_study(runs: list[StudyRun], rows: list[dict], out_dir: Path, stem: str = "study") -> tuple[Path, Path]:
    """``<stem>.csv`` (the rows) and ``<stem>.json`` (``runs``: each run's settings, final PPL and loss curve;
    ``rows``: the same rows as the CSV)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    write_csv(csv_path, rows, COLUMNS)
    summary = []
    for run in runs:
        own = [r for r in rows if r["run"] == run.name]
        summary.append({**run.columns(), "path": str(run.path), "inference_top_k": run.inference_top_k,
                        "inference_block_size": run.inference_block_size, **final_ppl(run, own),
                        "source": own[0]["source"] if own else None,
                        "loss_curve": [[step, value] for step, value in run.scalars.get(LOSS_TAG, [])]})
    json_path.write_text(json.dumps({"runs": summary, "rows": rows}, indent=2))
    return csv_path, json_path


# ---------------------------------------------------------------------------------------------------------------
# Plots: small PNGs, one figure each.

def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, title: str) -> Path:
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label(run: StudyRun) -> str:
    return f"{run.name} (K×BS {run.top_k}×{run.block_size})"


def plot_loss_curves(runs: list[StudyRun], path: Path) -> Path:
    """``loss/lm`` against training tokens (steps × global batch × seq_length), one line per run."""
    plt, fig, ax = _figure()
    for run in runs:
        points = run.scalars.get(LOSS_TAG, [])
        if points:
            per_step = run.global_batch_size * run.seq_length
            ax.plot([s * per_step for s, _ in points], [v for _, v in points], label=_label(run))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("LM loss (nats/token)")
    return _save(plt, fig, ax, path, "training loss")


def plot_final_ppl(runs: list[StudyRun], rows: list[dict], path: Path) -> Path:
    """Final PPL (full, and sparse at each run's own budget) against the training receptive field (log2 axis)."""
    plt, fig, ax = _figure()
    for mode, marker in (("full", "s"), ("sparse", "o")):
        pts = sorted((run.receptive_field, final_ppl(run, [r for r in rows if r["run"] == run.name])[f"ppl_{mode}"],
                      run.name) for run in runs)
        pts = [p for p in pts if p[1] is not None]
        if pts:
            label = "full attention" if mode == "full" else "sparse, at each run's inference budget"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training budget: top_k × block_size (tokens)")
    ax.set_ylabel("held-out perplexity")
    return _save(plt, fig, ax, path, "final perplexity against the training budget")


def plot_ppl_vs_inference_budget(runs: list[StudyRun], rows: list[dict], path: Path) -> Path:
    """Sparse PPL against the inference receptive field (log2 axis), one line per run (and block size); each run's
    full-attention PPL as a dashed line of its colour."""
    plt, fig, ax = _figure()
    for i, run in enumerate(sorted(runs, key=lambda r: (r.receptive_field, r.name))):
        color = f"C{i % 10}"
        own = [r for r in rows if r["run"] == run.name]
        sparse = [r for r in own if r["mode"] == "sparse"]
        sizes = sorted({r["block_size"] for r in sparse})
        for bs in sizes:
            pts = sorted((r["receptive_field"], r["ppl"]) for r in sparse if r["block_size"] == bs)
            suffix = f", inference block {bs}" if len(sizes) > 1 else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=_label(run) + suffix)
        for r in own:
            if r["mode"] == "full":
                ax.axhline(r["ppl"], color=color, linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("inference budget: top_k × block_size (tokens); dashed: full attention")
    ax.set_ylabel("held-out perplexity")
    return _save(plt, fig, ax, path, "perplexity against the inference budget, per training budget")


def plot_study(runs: list[StudyRun], rows: list[dict], out_dir: Path) -> list[Path]:
    """The three plots in ``out_dir``: loss_curves.png, final_ppl.png, ppl_vs_inference_budget.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_loss_curves(runs, out_dir / "loss_curves.png"),
            plot_final_ppl(runs, rows, out_dir / "final_ppl.png"),
            plot_ppl_vs_inference_budget(runs, rows, out_dir / "ppl_vs_inference_budget.png")]
