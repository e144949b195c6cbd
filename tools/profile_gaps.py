#!/usr/bin/env python3
"""Where the GPU waits: idle gaps in a torch.profiler Chrome trace, and what the host was doing meanwhile.

A training step is GPU-bound only if the GPU never waits for the host. This reads a trace written by
``torch.profiler`` (``export_chrome_trace``; ``tools/bench_training.py --profile DIR`` writes
``DIR/<mode>.trace.json.gz`` for one step of ``ssa-train``'s loop), merges every kernel, copy and memset of the
GPU into busy intervals, and reports the idle gaps inside the traced window. Each gap is charged to what the host
ran when it finally launched the work that ended the gap: the innermost ``record_function`` range
(``ssa_train/...`` in the training loop) and the innermost operator around that launch.

    python tools/profile_gaps.py prof/full_attn.trace.json.gz [--min-us 50] [--top 15] [--comm]

``--comm`` adds the NCCL kernels' time and the part of it during which no other GPU work ran (exposed).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace.get("traceEvents", trace if isinstance(trace, list) else [])
            if e.get("ph") == "X" and "dur" in e]


def busy_intervals(events: list[dict]) -> list[tuple[float, float, dict]]:
    """Merged [start, end) intervals (µs) in which the GPU ran something, each with the event that opened it."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    merged: list[list] = []
    for e in gpu:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, e])
    return [(a, b, e) for a, b, e in merged]


def _innermost(spans: list[dict], starts: list[float], t: float) -> dict | None:
    """The shortest host span containing time ``t`` (``spans`` sorted by start, ``starts`` their starts)."""
    best = None
    for e in reversed(spans[: bisect.bisect_right(starts, t)]):
        if e["ts"] + e["dur"] >= t and (best is None or e["dur"] < best["dur"]):
            best = e
        if t - e["ts"] > 60e6:  # nothing on a host thread spans a minute
            break
    return best


def analyse(events: list[dict], min_us: float = 50.0) -> dict:
    """Busy and idle time of the traced GPU window, and the gaps of at least ``min_us``, each charged to a host
    range and operator."""
    busy = busy_intervals(events)
    if not busy:
        raise ValueError("the trace holds no GPU kernel, copy or memset events (was CUDA profiled?)")
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ranges = sorted((e for e in events if e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "python_function")), key=lambda e: e["ts"])
    range_starts, op_starts = [e["ts"] for e in ranges], [e["ts"] for e in ops]
    gaps = []
    for (_, prev_end, _), (start, _, opener) in zip(busy, busy[1:]):
        length = start - prev_end
        if length < min_us:
            continue
        launch = launches.get(opener.get("args", {}).get("correlation"))
        t = launch["ts"] if launch else start
        where = _innermost(ranges, range_starts, t)
        op = _innermost(ops, op_starts, t)
        gaps.append({"at_us": prev_end - busy[0][0], "us": length, "range": where["name"] if where else "-",
                     "op": op["name"] if op else "-", "launch": launch["name"] if launch else "-",
                     "next": opener["name"][:60]})
    span = busy[-1][1] - busy[0][0]
    work = sum(b - a for a, b, _ in busy)
    by_range: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for g in gaps:
        by_range[g["range"]][0] += 1
        by_range[g["range"]][1] += g["us"]
    return {"span_ms": span / 1e3, "busy_ms": work / 1e3, "idle_ms": (span - work) / 1e3,
            "gaps_ms": sum(g["us"] for g in gaps) / 1e3, "gaps": gaps,
            "by_range": {k: {"gaps": int(v[0]), "ms": v[1] / 1e3} for k, v in by_range.items()}}


def _is_comm(event: dict) -> bool:
    return "nccl" in event["name"].lower()


def _comm_label(event: dict) -> str:
    """The kernel name (up to its first '('), with the collective and its process group where the profiler
    recorded them (the CP exchange and the optimizer both run all-gathers and reduce-scatters)."""
    args = event.get("args", {})
    label = event["name"].split("(")[0]
    group = args.get("Process Group Description") or args.get("Process Group Name")
    extra = [x for x in (args.get("Collective name"), group and f"group {group}") if x]
    return f"{label} ({', '.join(extra)})" if extra else label


def communication(events: list[dict]) -> dict:
    """NCCL kernel time and its exposed part: the time in which a collective ran and no other GPU work did (the
    step waits for it there; it includes waiting for a late peer rank). Per kernel, collective and process group
    (``_comm_label``)."""
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    comm = sorted((e for e in gpu if _is_comm(e)), key=lambda e: e["ts"])
    compute = [(a, b) for a, b, _ in busy_intervals([e for e in gpu if not _is_comm(e)])]
    starts = [a for a, _ in compute]

    def exposed(start: float, end: float) -> float:
        covered = 0.0
        for a, b in compute[max(bisect.bisect_right(starts, start) - 1, 0):]:
            if a >= end:
                break
            covered += max(0.0, min(b, end) - max(a, start))
        return (end - start) - covered

    by_kernel: dict[str, dict] = defaultdict(lambda: {"count": 0, "ms": 0.0, "exposed_ms": 0.0})
    for e in comm:
        row = by_kernel[_comm_label(e)]
        row["count"] += 1
        row["ms"] += float(e["dur"]) / 1e3
        row["exposed_ms"] += exposed(float(e["ts"]), float(e["ts"]) + float(e["dur"])) / 1e3
    # Totals over the union of the collectives' intervals (two collectives at once count once).
    union = [(a, b) for a, b, _ in busy_intervals(comm)]
    return {"comm_ms": sum(b - a for a, b in union) / 1e3, "exposed_ms": sum(exposed(a, b) for a, b in union) / 1e3,
            "by_kernel": dict(by_kernel)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-us", type=float, default=50.0, help="smallest gap reported (µs)")
    parser.add_argument("--top", type=int, default=15, help="longest gaps listed")
    parser.add_argument("--comm", action="store_true",
                        help="also NCCL kernel time and the part of it no other GPU work overlapped (exposed)")
    args = parser.parse_args()
    if not args.trace.is_file():
        parser.error(f"trace {args.trace}: no such file")
    events = load_events(args.trace)
    r = analyse(events, args.min_us)
    print(f"{args.trace}: GPU window {r['span_ms']:.1f} ms, busy {r['busy_ms']:.1f} ms, idle {r['idle_ms']:.1f} ms "
          f"({100 * r['idle_ms'] / r['span_ms']:.1f} %); gaps >= {args.min_us:g} us: {len(r['gaps'])}, "
          f"{r['gaps_ms']:.1f} ms")
    print("\n| host range at the launch that ended the gap | gaps | idle ms |\n|---|---|---|")
    for name, v in sorted(r["by_range"].items(), key=lambda kv: -kv[1]["ms"]):
        print(f"| {name} | {v['gaps']} | {v['ms']:.2f} |")
    print("\n| at ms | gap ms | host range | host operator | launch | next GPU work |\n|---|---|---|---|---|---|")
    for g in sorted(r["gaps"], key=lambda g: -g["us"])[: args.top]:
        print(f"| {g['at_us'] / 1e3:.2f} | {g['us'] / 1e3:.3f} | {g['range']} | {g['op']} | {g['launch']} | "
              f"{g['next']} |")
    if args.comm:
        c = communication(events)
        print(f"\nNCCL: {c['comm_ms']:.2f} ms, exposed (no other GPU work) {c['exposed_ms']:.2f} ms")
        print("\n| NCCL kernel (collective, group) | count | ms | exposed ms |\n|---|---|---|---|")
        for name, v in sorted(c["by_kernel"].items(), key=lambda kv: -kv[1]["exposed_ms"]):
            print(f"| {name} | {v['count']} | {v['ms']:.2f} | {v['exposed_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
