"""The embedded default corpus: the running interpreter's standard library, tokenized and sharded on first use.

No standard LM corpus is reachable offline, but every Python has its standard library: ~11 MB of real text with
long-range structure (docs/data.md, "Embedded default corpus"). Test suites and site-packages are left out. The
first call trains a byte-level BPE on it (deterministic), packs it into shards in the cache directory and returns
that directory; later calls return the cached result at once. The build is atomic (temp directory, then rename)
and guarded by a file lock, so several ranks of one node can call it together and only one builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

from .prepare import prepare_shards
from .shards import META_NAME
from .tokenizer import load_tokenizer, tokenizer_hash, train_bpe

BUILTIN_NAME = "builtin:stdlib"
# Bump when the recipe below changes: cached corpora built by other code are then rebuilt, not reused.
BUILTIN_VERSION = 1
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TARGET_TRAIN_SHARDS = 64


def stdlib_files(max_bytes: Optional[int] = None) -> list[Path]:
    """The interpreter's standard-library ``.py`` files, tests and site-packages excluded, in sorted order,
    capped at ``max_bytes`` (whole files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                size = path.stat().st_size
                if max_bytes is not None and total + size > max_bytes:
                    continue
                total += size
                files.append(path)
    if not files:
        raise FileNotFoundError(f"no standard-library .py files under {str(root)!r} (sysconfig stdlib path)")
    return files


def ensure_builtin_corpus(
    cache_dir: Union[str, os.PathLike],
    seq_length: int,
    vocab_size: int,
    *,
    tokenizer_path: Optional[Union[str, os.PathLike]] = None,
    max_mb: float = 16.0,
    valid_fraction: float = 0.02,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """Builds (once) and returns ``(shard_dir, tokenizer_path)`` of the standard-library corpus.

    Args:
        cache_dir: parent of the cached corpora (``~`` expanded; created if needed).
        seq_length: training context; rows hold ``seq_length + 1`` tokens.
        vocab_size: vocabulary of the BPE trained on the corpus (ignored when ``tokenizer_path`` is given).
        tokenizer_path: use this tokenizer.json instead of training one.
        max_mb: cap on the source text (whole files, sorted order); the full library is ~11-12 MB.
        valid_fraction: share of files (by content hash) held out as the ``valid`` split.
    The cache key covers the Python version, the file list and sizes, seq_length, the vocabulary or tokenizer
    hash, max_mb, valid_fraction and BUILTIN_VERSION.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = stdlib_files(int(max_mb * 2 ** 20))
    tok_key = tokenizer_hash(tokenizer_path) if tokenizer_path else f"bpe{vocab_size}"
    key_data = {
        "version": BUILTIN_VERSION, "python": sys.version, "files": [(str(p), p.stat().st_size) for p in files],
        "seq_length": seq_length, "tokenizer": tok_key, "max_mb": max_mb, "valid_fraction": valid_fraction,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:12]
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-s{seq_length}-" \
           f"{'v' + str(vocab_size) if not tokenizer_path else 'tok'}-{key}"
    final = cache_dir / name
    if (final / META_NAME).is_file():
        return final, final / "tokenizer.json"

    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks on this node wait here while one of them builds
        if (final / META_NAME).is_file():
            return final, final / "tokenizer.json"
        started = time.perf_counter()
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        log(f"builtin corpus: {len(files)} standard-library files of Python {sys.version.split()[0]} "
            f"({total_mb:.1f} MB) -> {final} (seq_length {seq_length}, "
            f"{'tokenizer ' + str(tokenizer_path) if tokenizer_path else f'training a {vocab_size}-token BPE'})")
        tmp = cache_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            if tokenizer_path is None:
                tok_path = train_bpe(files, vocab_size, tmp / "bpe-tokenizer.json")
            else:
                tok_path = Path(tokenizer_path).expanduser()
            tokenizer = load_tokenizer(tok_path)
            # About TARGET_TRAIN_SHARDS train shards, so up to that many readers (ranks × workers) get whole
            # shards; 3.8 bytes/token is what a stdlib-trained BPE gives.
            estimated_rows = total_mb * 1e6 / 3.8 / (seq_length + 1)
            rows_per_shard = max(1, int(estimated_rows / TARGET_TRAIN_SHARDS) + 1)
            # workers=0: tokenize in this process with the tokenizer's own threads; no child processes, which
            # a training process (threads, CUDA) should not fork or spawn.
            summary = prepare_shards(files, tmp, tokenizer, seq_length, rows_per_shard=rows_per_shard,
                                     valid_fraction=valid_fraction, workers=0, unit_mb=1.0, progress=progress,
                                     log=lambda line: None)
            (tmp / "bpe-tokenizer.json").unlink(missing_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another node sharing the cache finished first; its result is identical.
                if not (final / META_NAME).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"builtin corpus: {summary.line()}; built in {time.perf_counter() - started:.1f} s -> {final}")
    return final, final / "tokenizer.json"
