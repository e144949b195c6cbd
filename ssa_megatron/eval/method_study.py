"""The report of a training-method study (docs/results.md): models trained alike except for the SSA mode settings
(FullAttn, MoBA-style sparse-only, SSA), each evaluated by ``tools/run_study.py evaluate`` into a JSON file beside
its run (budget sweep with per-layer attention statistics, longer contexts, in-distribution perplexity).

:func:`method_report` turns those files and the runs' TensorBoard logs into ``results.md`` (Markdown tables),
``results.json`` and three small plots. It evaluates nothing itself; a budget-scaling study (runs differing in
their training budget) is ``ssa_megatron.eval.study``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ssa_megatron.eval.study import StudyRun, _figure, _save, read_run

STAT_NAMES = {"sparsity": "attention sparsity (Definition 1)", "entropy_bits": "attention entropy (bits)",
              "kl_full_sparse": "KL(full || sparse) (nats)"}


def _sparse_row(sweep: list[dict], top_k: int) -> dict | None:
    return next((r for r in sweep if r["mode"] == "sparse" and r["top_k"] == top_k), None)


def _last(run: StudyRun, tag: str, n: int = 1) -> float | None:
    points = run.scalars.get(tag) or []
    if not points:
        return None
    tail = points[-n:]
    return sum(v for _, v in tail) / len(tail)


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _pct(new: float | None, base: float | None) -> str:
    return "–" if new is None or base is None else f"{100 * (new / base - 1):+.1f} %"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def summarise(runs: dict[str, StudyRun], evals: dict[str, dict]) -> dict:
    """The numbers of the report, per model (JSON-ready)."""
    out = {}
    for name, run in runs.items():
        ev = evals[name]
        sweep = ev["sweep"]
        full = next(r for r in sweep if r["mode"] == "full")
        own = _sparse_row(sweep, run.top_k)
        out[name] = {
            "p_full": run.p_full, "alpha": run.alpha, "steps": run.steps, "tokens": run.tokens,
            "train_budget": run.train_budget, "seq_length": run.seq_length,
            "final_loss": _last(run, "loss/lm", 5), "final_loss_full": _last(run, "loss/lm_full", 5),
            "final_loss_sparse": _last(run, "loss/lm_sparse", 5), "final_align": _last(run, "loss/align", 5),
            "ppl_full": full["ppl"], "ppl_sparse": own["ppl"] if own else None,
            "ppl_by_rf": {str(r["receptive_field"]): r["ppl"] for r in sweep if r["mode"] == "sparse"},
            "stats_full": {k: full.get(k) for k in STAT_NAMES},
            "stats_sparse": {k: own.get(k) for k in STAT_NAMES} if own else None,
            "layers_full": full.get("layers"), "layers_sparse": own.get("layers") if own else None,
            "length": ev.get("length", []), "in_distribution": ev.get("in_distribution", []),
            "eval_tokens": full.get("tokens"),
        }
    return out


def markdown(summary: dict, heldout: str) -> str:
    names = list(summary)
    first = summary[names[0]]
    rfs = sorted({int(rf) for s in summary.values() for rf in s["ppl_by_rf"]})
    own_rf = first["train_budget"]
    lines = [f"Held-out text: {heldout}; {first['eval_tokens']:,} tokens per setting at the training length "
             f"{first['seq_length']}. Training budget K x BS = {own_rf}.", ""]
    lines += ["**Training.**", ""]
    lines += _table(["model", "p_full", "alpha", "steps", "tokens", "final loss", "loss (full micro-batches)",
                     "loss (sparse micro-batches)", "alignment loss"],
                    [[n, _fmt(s["p_full"], "g"), _fmt(s["alpha"], "g"), str(s["steps"]), f"{s['tokens']:,}",
                      _fmt(s["final_loss"]), _fmt(s["final_loss_full"]), _fmt(s["final_loss_sparse"]),
                      _fmt(s["final_align"], ".4f")] for n, s in summary.items()])
    lines += ["", "**Held-out perplexity: full inference, and sparse inference at each receptive field.**", ""]
    lines += _table(["model", "full", *[f"sparse RF {rf}" for rf in rfs], "sparse at training RF vs full"],
                    [[n, _fmt(s["ppl_full"]), *[_fmt(s["ppl_by_rf"].get(str(rf))) for rf in rfs],
                      _pct(s["ppl_sparse"], s["ppl_full"])] for n, s in summary.items()])
    lines += ["", "**Attention statistics at the training budget, mean over layers** (full: the full-inference "
              "forward; sparse: the sparse-inference forward; both against the selection of the training budget).", ""]
    header = ["model"] + [f"{label} {mode}" for label in ("sparsity", "entropy", "KL") for mode in ("full", "sparse")]
    rows = []
    for n, s in summary.items():
        cells = [n]
        for key in STAT_NAMES:
            cells += [_fmt(s["stats_full"].get(key), ".3f"), _fmt((s["stats_sparse"] or {}).get(key), ".3f")]
        rows.append(cells)
    lines += _table(header, rows)
    for key, title in STAT_NAMES.items():
        lines += ["", f"**Per layer: {title}, under full / sparse inference.**", ""]
        layers = len(first["layers_full"] or [])
        rows = [[str(i + 1)] + [f"{_fmt(s['layers_full'][i][key])} / {_fmt((s['layers_sparse'] or [{}] * layers)[i].get(key))}"
                                for s in summary.values()] for i in range(layers)]
        lines += _table(["layer", *names], rows)
    factors = sorted({x["factor"] for s in summary.values() for x in s["length"]})
    lines += ["", "**Longer contexts: held-out perplexity on the same tokens cut into rows of 1x, 2x and 4x the "
              "training length, full / sparse at the training budget.**", ""]
    rows = []
    for n, s in summary.items():
        cells = [n]
        for f in factors:
            by_mode = {x["mode"]: x["ppl"] for x in s["length"] if x["factor"] == f}
            cells.append(f"{_fmt(by_mode.get('full'))} / {_fmt(by_mode.get('sparse'))}")
        rows.append(cells)
    lines += _table(["model", *[f"{f}x ({f * first['seq_length']})" for f in factors]], rows)
    lines += ["", "**In-distribution perplexity** (the 1 % of training-corpus documents held out by prepare_data).",
              ""]
    rows = []
    for n, s in summary.items():
        by_mode = {x["mode"]: x["ppl"] for x in s["in_distribution"]}
        rows.append([n, _fmt(by_mode.get("full")), _fmt(by_mode.get("sparse")),
                     _pct(by_mode.get("sparse"), by_mode.get("full"))])
    lines += _table(["model", "full", "sparse", "sparse vs full"], rows)
    return "\n".join(lines) + "\n"


def plot_ppl_vs_rf(summary: dict, path: Path) -> Path:
    plt, fig, ax = _figure()
    for i, (name, s) in enumerate(summary.items()):
        pts = sorted((int(rf), ppl) for rf, ppl in s["ppl_by_rf"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"{name}, sparse")
        ax.axhline(s["ppl_full"], color=f"C{i}", linestyle="--", linewidth=0.9, label=f"{name}, full")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("inference receptive field: top_k × block_size (tokens)")
    ax.set_ylabel("held-out perplexity")
    return _save(plt, fig, ax, path, "perplexity against the inference budget")


def plot_stat_per_layer(summary: dict, key: str, path: Path) -> Path:
    plt, fig, ax = _figure()
    for i, (name, s) in enumerate(summary.items()):
        for mode, style in (("full", "-"), ("sparse", "--")):
            layers = s[f"layers_{mode}"]
            if layers:
                ax.plot([x["layer"] for x in layers], [x[key] for x in layers], style, marker=".", color=f"C{i}",
                        label=f"{name}, {mode} inference")
    ax.set_xlabel("layer")
    ax.set_ylabel(STAT_NAMES[key])
    return _save(plt, fig, ax, path, f"{STAT_NAMES[key]} per layer")


def plot_losses(runs: dict[str, StudyRun], path: Path) -> Path:
    """Training loss per model against tokens; SSA's full and sparse micro-batches as thin lines."""
    plt, fig, ax = _figure()
    for i, (name, run) in enumerate(runs.items()):
        per_step = run.global_batch_size * run.seq_length
        for tag, style, width, suffix in (("loss/lm", "-", 1.4, ""), ("loss/lm_full", ":", 0.8, ", full micro-batches"),
                                          ("loss/lm_sparse", "--", 0.8, ", sparse micro-batches")):
            points = run.scalars.get(tag, [])
            if points and (tag == "loss/lm" or (run.p_full not in (0.0, 1.0))):
                ax.plot([s * per_step for s, _ in points], [v for _, v in points], style, linewidth=width,
                        color=f"C{i}", label=name + suffix)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))
    return _save(plt, fig, ax, path, "training loss")


def method_report(runs: dict[str, Path], out_dir: Path, eval_file: str) -> list[Path]:
    """``results.md``, ``results.json``, ``ppl_vs_rf.png``, ``sparsity_per_layer.png`` and ``loss_curves.png`` in
    ``out_dir`` for ``runs`` (label → run directory holding ``eval_file``)."""
    read = {name: read_run(path, name=name) for name, path in runs.items()}
    evals = {name: json.loads((Path(path) / eval_file).read_text()) for name, path in runs.items()}
    summary = summarise(read, evals)
    heldout = next(iter(evals.values()))["heldout"]
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(summary, f"{heldout['text']} ({', '.join(heldout['sources'])})")
    paths = [out_dir / "results.md", out_dir / "results.json"]
    paths[0].write_text(text)
    paths[1].write_text(json.dumps(summary, indent=1))
    paths.append(plot_ppl_vs_rf(summary, out_dir / "ppl_vs_rf.png"))
    paths.append(plot_stat_per_layer(summary, "sparsity", out_dir / "sparsity_per_layer.png"))
    paths.append(plot_losses(read, out_dir / "loss_curves.png"))
    return paths
