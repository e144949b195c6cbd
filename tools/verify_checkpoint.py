#!/usr/bin/env python
"""Checks the checkpoints of a run against their manifests (sizes and sha256 of every file, the DCP metadata read
through the restricted unpickler, every shard as long as the metadata says).

    python tools/verify_checkpoint.py runs/ssa_1b                            # every checkpoint of the run
    python tools/verify_checkpoint.py runs/ssa_1b/checkpoints/step_00010000  # one checkpoint

Prints one line per checkpoint (ok, unverified: written before checkpoints had manifests, or the file that is bad)
and a summary line saying which checkpoint a resume would use. Exit status 0 when the newest checkpoint verifies,
1 otherwise (bad, unverified, or none), 2 for a path that holds no checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run directory, its checkpoints/ directory, or one step_XXXXXXXX directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("ssa_megatron.training.checkpoint").setLevel(logging.ERROR)  # the lines below say it all
    from ssa_megatron.training.checkpoint import HASH, LATEST, Checkpointer, verify_checkpoint

    given = Path(args.path).expanduser()
    if (given / ".metadata").exists() or (given / "manifest.json").exists():
        directory, checkpoints = given.parent, [given]
    else:
        directory = given / "checkpoints" if (given / "checkpoints").is_dir() else given
        checkpoints = Checkpointer(directory, keep_last=1).complete_checkpoints()
    if not checkpoints:
        print(f"verify_checkpoint: no checkpoint in {given} (expected a run directory, its checkpoints/ directory "
              "or one step_XXXXXXXX directory)", file=sys.stderr)
        return 2
    print(f"verify_checkpoint: {len(checkpoints)} checkpoint(s) in {directory}, newest first ({HASH})", flush=True)
    verdicts = []
    for path in reversed(checkpoints):
        started = time.perf_counter()
        verdict = verify_checkpoint(path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
        label = {"ok": "ok", "unverified": "UNVERIFIED", "bad": "BAD"}[verdict.status]
        detail = verdict.problem or ("no manifest.json: written before checkpoints had manifests"
                                     if verdict.status == "unverified" else "")
        print(f"  {path.name}: {label}{': ' + detail if detail else ''} ({size / 1e6:,.1f} MB, "
              f"{time.perf_counter() - started:.2f} s)", flush=True)
        verdicts.append(verdict)
    marker = directory / LATEST
    named = marker.read_text().strip() if marker.is_file() else None
    usable = next((v for v in verdicts if v.usable), None)
    newest = verdicts[0]
    counts = ", ".join(f"{sum(v.status == s for v in verdicts)} {s}" for s in ("ok", "unverified", "bad"))
    resume = f"a resume would use {usable.path.name}" if usable else "no checkpoint is usable"
    latest = "" if len(checkpoints) == 1 and checkpoints[0] == given else (
        f"; {LATEST} is missing" if named is None else f"; {LATEST} names {named}" if named != newest.path.name
        else "")
    print(f"verify_checkpoint: newest {newest.path.name} is {newest.status.upper() if newest.status != 'ok' else 'ok'}"
          f" ({counts}); {resume}{latest}")
    return 0 if newest.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
