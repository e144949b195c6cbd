"""Text to packed WebDataset shards: multiprocess, deterministic and resumable.

Pipeline: inputs → work units (:mod:`documents`) → worker processes read and tokenize units (in order) →
the main process appends each document's ids plus EOS to the packer of its split (train, or valid when the
document's content hash falls under ``valid_fraction``) → every ``rows_per_shard`` complete rows become one tar.

Resumption: after each unit that completed a shard, the output directory gets ``.prepare_state.json`` (next unit,
shards so far, counts) and ``.prepare_pending.npz`` (the packers' unpacked tails). A rerun with the same inputs
and settings continues from there and produces byte-identical shards; ``meta.json`` is written last, so its
presence means the directory is complete. The output does not depend on the number of workers.

Ownership: before writing a shard its name is appended to ``.prepare_written`` (a write-ahead list). Cleaning up
(``overwrite``, or the shards of an interrupted run written after its last saved state) deletes only files whose
names are prepare_data's own (``train-NNNNNN.tar``, ``meta.json``, its dot-prefixed state and temporary files) and
that this list, the state or meta.json records; anything else in the directory is left alone. Empty input (no
bytes, or no document with text) is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .documents import DocSplit, EncodingErrors, InputError, WorkUnit, list_input_files, plan_units, read_unit, units_fingerprint
from .packing import LAYOUTS, PaddedRowPacker, RowPacker, make_packer, token_dtype
from .shards import SPLITS, META_NAME, ShardInfo, ShardSetMeta, read_meta, shard_name, write_meta, write_shard
from .tokenizer import Tokenizer, load_tokenizer

STATE_NAME = ".prepare_state.json"
PENDING_NAME = ".prepare_pending.npz"
WRITTEN_NAME = ".prepare_written"
"""Names of the shards this tool wrote (or was about to write) in the directory, one per line."""
_SHARD_RE = re.compile(r"^(?:train|valid)-\d{6}\.tar$")
# Temporary files of shards_write / write_meta (".<name>.tmp-<pid>") and of _save_state.
_TMP_RE = re.compile(r"^\.(?P<target>(?:train|valid)-\d{6}\.tar|meta\.json)\.tmp-\d+$")
_OWN_TMP = (f".{PENDING_NAME}.tmp.npz", f".{STATE_NAME}.tmp")
# Bytes a sample costs beyond its arrays: two 512-byte tar headers, two .npy headers, tar block padding.
SAMPLE_OVERHEAD_BYTES = 1400


@dataclass
class PrepareSummary:
    """Counts per split (``documents``, ``tokens`` = real tokens incl. EOS, ``rows``, ``shards``)."""

    output_dir: Path
    documents: dict[str, int]
    tokens: dict[str, int]
    rows: dict[str, int]
    shards: dict[str, int]
    input_bytes: int
    seconds: float
    resumed_units: int = 0
    already_complete: bool = False

    def line(self) -> str:
        def both(d: dict[str, int]) -> str:
            return f"{d.get('train', 0):,} train / {d.get('valid', 0):,} valid"
        rate = self.input_bytes / max(self.seconds, 1e-9) / 1e6
        return (f"{both(self.documents)} documents, {both(self.tokens)} tokens, {both(self.rows)} rows in "
                f"{both(self.shards)} shards; {self.input_bytes / 1e6:.1f} MB of input in {self.seconds:.1f} s "
                f"({rate:.2f} MB/s)")


def is_held_out(text: str, valid_fraction: float) -> bool:
    """Held-out membership by content hash: independent of order and workers, duplicates land together."""
    if valid_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2.0 ** 64


# ------------------------------------------------------------------------------------------------------------
# Worker side: read a unit, tokenize, return flat ids per split.

_worker: dict = {}


def _init_worker(tokenizer_path: str, eos_token: str, doc_split: DocSplit, text_key: str,
                 errors: EncodingErrors, valid_fraction: float, single_thread: bool) -> None:
    if single_thread:
        # One process per core already; the tokenizer's own thread pool would only oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=load_tokenizer(tokenizer_path, eos_token=eos_token), doc_split=doc_split,
                   text_key=text_key, errors=errors, valid_fraction=valid_fraction)


def _tokenize_unit(unit: WorkUnit) -> tuple[int, int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Returns (unit index, input bytes, {split: (ids with an EOS after each document [uint32], doc lengths)})."""
    tokenizer: Tokenizer = _worker["tokenizer"]
    docs = read_unit(unit, _worker["doc_split"], _worker["text_key"], _worker["errors"])
    held_out = [is_held_out(doc, _worker["valid_fraction"]) for doc in docs]
    ids = tokenizer.encode_batch(docs) if docs else []
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)
    out = {}
    for split, want in (("train", False), ("valid", True)):
        chosen = [doc_ids for doc_ids, h in zip(ids, held_out) if h == want and doc_ids]
        lengths = np.fromiter((len(d) + 1 for d in chosen), dtype=np.int64, count=len(chosen))
        pieces = []
        for doc_ids in chosen:
            pieces.append(np.asarray(doc_ids, dtype=np.uint32))
            pieces.append(eos)
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
        out[split] = (flat, lengths)
    return unit.index, unit.num_bytes, out


# ------------------------------------------------------------------------------------------------------------
# Main side.

@dataclass
class _Progress:
    next_unit: int = 0
    input_bytes: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def shard_count(self, split: str) -> int:
        return sum(1 for s in self.shards if s.split == split)


def default_rows_per_shard(seq_length: int, vocab_size: int, shard_mb: float) -> int:
    row_bytes = (seq_length + 1) * token_dtype(vocab_size).itemsize + SAMPLE_OVERHEAD_BYTES
    return max(1, int(shard_mb * 2 ** 20) // row_bytes)


def prepare_shards(
    inputs: Sequence[Union[str, os.PathLike]],
    output_dir: Union[str, os.PathLike],
    tokenizer: Union[str, os.PathLike, Tokenizer],
    seq_length: int,
    *,
    rows_per_shard: Optional[int] = None,
    shard_mb: float = 64.0,
    valid_fraction: float = 0.0,
    workers: Optional[int] = None,
    doc_split: DocSplit = "file",
    text_key: str = "text",
    extensions: Optional[Sequence[str]] = None,
    unit_mb: float = 4.0,
    max_bytes: Optional[int] = None,
    encoding_errors: EncodingErrors = "strict",
    overwrite: bool = False,
    layout: str = "packed",
    progress: bool = True,
    log: Callable[[str], None] = print,
    _interrupt_after_units: Optional[int] = None,
) -> PrepareSummary:
    """Tokenizes ``inputs`` and writes packed WebDataset shards plus meta.json into ``output_dir``.

    Args:
        inputs: text/jsonl files and directories (see :mod:`ssa_megatron.data.documents`).
        tokenizer: a tokenizer.json path or a loaded :class:`Tokenizer`; its EOS separates documents.
        seq_length: training context; rows hold ``seq_length + 1`` tokens.
        rows_per_shard: rows per tar (None: as many as fit ``shard_mb`` MiB).
        valid_fraction: share of documents (by content hash) written to ``valid-*.tar`` instead of train.
        workers: tokenizer processes; None: one per CPU; 0: in this process (the tokenizer's own threads).
            Workers are spawned, so a script calling this with workers > 0 needs the usual
            ``if __name__ == "__main__":`` guard.
        doc_split, text_key, extensions, encoding_errors: how inputs become documents.
        unit_mb: input MB per work unit (the granularity of parallelism and of resumption).
        max_bytes: read at most about this many input bytes (whole files / ranges, in order).
        overwrite: discard an existing (complete or partial) preparation with other settings.
        layout: 'packed' (documents run on across rows) or 'padded' (whole documents per row, the rest padding;
            the authors' layout): :mod:`ssa_megatron.data.packing`.
        _interrupt_after_units: testing hook; raises KeyboardInterrupt after that many units, as Ctrl-C would.
    Returns:
        A :class:`PrepareSummary`; ``log`` also receives its one-line form.
    """
    started = time.perf_counter()
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be >= 1")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: must be one of {', '.join(LAYOUTS)}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction}: must be in [0, 1)")
    if rows_per_shard is not None and rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard}: must be >= 1")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes}: must be None (all input) or >= 1")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    output_dir = Path(output_dir).expanduser()
    dtype = token_dtype(tok.vocab_size)
    row_tokens = seq_length + 1
    rows_per_shard = rows_per_shard or default_rows_per_shard(seq_length, tok.vocab_size, shard_mb)
    files = list_input_files(inputs, extensions)
    units = plan_units(files, doc_split, max(1, int(unit_mb * 2 ** 20)), max_bytes)
    total_bytes = sum(u.num_bytes for u in units)
    if total_bytes == 0:
        raise InputError(f"inputs {_names(inputs)}: {len(files)} file(s), all empty; nothing to tokenize (need at "
                         "least one non-empty text or jsonl file)")
    settings = dict(seq_length=seq_length, rows_per_shard=rows_per_shard, valid_fraction=valid_fraction,
                    doc_split=doc_split, text_key=text_key, encoding_errors=encoding_errors,
                    tokenizer_hash=tok.hash, eos_id=tok.eos_id, inputs=units_fingerprint(units))
    if layout != "packed":  # only then: directories prepared before layouts existed keep their fingerprint
        settings["layout"] = layout
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / META_NAME).exists():
        existing = read_meta(output_dir)
        if existing.extra.get("fingerprint") == fingerprint and not overwrite:
            summary = _summary_from_meta(existing, output_dir, started)
            log(f"prepare_data: {output_dir} is already complete with these inputs and settings: {summary.line()}")
            return summary
        if not overwrite:
            raise FileExistsError(f"output directory {str(output_dir)!r} already holds shards made from other "
                                  "inputs or settings; pass overwrite=True (--overwrite) to replace them")
    written = _written(output_dir)
    clash = sorted(p.name for p in output_dir.iterdir() if _SHARD_RE.match(p.name) and p.name not in written)
    if clash:
        raise FileExistsError(f"output directory {str(output_dir)!r} holds shard-named files that prepare_data did "
                              f"not write ({', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''}); it would "
                              "overwrite them: move them or choose another directory (--overwrite deletes only "
                              "files prepare_data wrote)")
    if overwrite:
        _clear_output(output_dir)
    progress_state, packers = _load_state(output_dir, fingerprint, row_tokens, dtype, layout, log)
    if progress_state is None:
        progress_state = _Progress()
        packers = {split: make_packer(layout, row_tokens, dtype, tok.eos_id) for split in SPLITS}
    _remove_unrecorded_shards(output_dir, progress_state)
    resumed_units = progress_state.next_unit

    log(f"prepare_data: {len(files)} files ({total_bytes / 1e6:.1f} MB, {len(units)} units) -> {output_dir}: "
        f"seq_length {seq_length} ({layout} rows), {rows_per_shard} rows/shard, {dtype.name} tokens, tokenizer "
        f"{tok.path.name} (vocab {tok.vocab_size}, eos {tok.eos_id}), valid {valid_fraction:.1%}, "
        f"workers {workers if workers is not None else os.cpu_count()}"
        + (f"; resuming at unit {resumed_units}/{len(units)}" if resumed_units else ""))

    bar = _progress_bar(progress, total_bytes, progress_state.input_bytes)
    todo = units[progress_state.next_unit:]
    init_args = (str(tok.path), tok.eos_token, doc_split, text_key, encoding_errors, valid_fraction)
    for index, num_bytes, per_split in tokenize_units(todo, init_args, workers):
        wrote = False
        for split in SPLITS:
            flat, lengths = per_split[split]
            packers[split].add(flat, lengths)
            progress_state.documents[split] += len(lengths)
            progress_state.tokens[split] += len(flat)
            while packers[split].full_rows() >= rows_per_shard:
                _write_next_shard(output_dir, split, packers[split].take_rows(rows_per_shard), progress_state)
                wrote = True
        progress_state.next_unit = index + 1
        progress_state.input_bytes += num_bytes
        if wrote:
            _save_state(output_dir, fingerprint, progress_state, packers)
        if bar is not None:
            bar.update(num_bytes)
            bar.set_postfix(docs=sum(progress_state.documents.values()),
                            tokens=sum(progress_state.tokens.values()), shards=len(progress_state.shards))
        if _interrupt_after_units is not None and index + 1 - resumed_units >= _interrupt_after_units:
            raise KeyboardInterrupt(f"interrupted after unit {index} (testing hook)")
    if bar is not None:
        bar.close()

    if sum(progress_state.tokens.values()) == 0:
        for name in (STATE_NAME, PENDING_NAME, WRITTEN_NAME):
            (output_dir / name).unlink(missing_ok=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise InputError(f"inputs {_names(inputs)}: {len(files)} file(s), {total_bytes} bytes, but no document with "
                         f"text (doc_split={doc_split!r}, text_key={text_key!r}); nothing to tokenize")

    for split in SPLITS:
        # Whatever is pending (fewer than rows_per_shard full rows plus a partial one) is the split's last shard;
        # its final row is padded with EOS, and the padding is outside the row's bounds.
        rows = packers[split].take_padded_tail(pad_id=tok.eos_id)
        if len(rows):
            _write_next_shard(output_dir, split, rows, progress_state)

    copied_tokenizer = output_dir / "tokenizer.json"
    if not (copied_tokenizer.exists() and copied_tokenizer.samefile(tok.path)):
        shutil.copyfile(tok.path, copied_tokenizer)
    meta = ShardSetMeta(
        seq_length=seq_length, token_dtype=dtype.name, eos_id=tok.eos_id, vocab_size=tok.vocab_size,
        tokenizer_hash=tok.hash, shards=progress_state.shards, documents=progress_state.documents,
        tokens=progress_state.tokens,
        extra={"fingerprint": fingerprint, "rows_per_shard": rows_per_shard, "valid_fraction": valid_fraction,
               "doc_split": doc_split, "input_bytes": total_bytes, "input_files": len(files), "layout": layout},
    )
    write_meta(output_dir, meta)
    for name in (STATE_NAME, PENDING_NAME):
        (output_dir / name).unlink(missing_ok=True)
    summary = PrepareSummary(output_dir, dict(progress_state.documents), dict(progress_state.tokens),
                             meta.to_json()["rows"], {s: progress_state.shard_count(s) for s in SPLITS},
                             total_bytes, time.perf_counter() - started, resumed_units)
    log(f"prepare_data: {summary.line()}")
    return summary


def tokenize_units(units: list[WorkUnit], init_args: tuple, workers: Optional[int]):
    """Tokenized units in plan order, from a process pool (or in this process when ``workers == 0``); each is
    :func:`_tokenize_unit`'s (index, input bytes, {split: (ids with EOS after each document, lengths)}). Shared with
    ``megatron_indexed.prepare_indexed``."""
    if not units:
        return
    if workers is None:
        workers = os.cpu_count() or 1
    if workers == 0:
        _init_worker(*init_args, single_thread=False)
        for unit in units:
            yield _tokenize_unit(unit)
        return
    # spawn: the caller may be a threaded training process (torch, the tokenizer's thread pool), where fork
    # can deadlock; workers import only numpy and tokenizers.
    context = mp.get_context("spawn")
    with context.Pool(min(workers, len(units)), initializer=_init_worker, initargs=(*init_args, True)) as pool:
        yield from pool.imap(_tokenize_unit, units, chunksize=1)


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc="tokenize+shard", smoothing=0.1)


def _names(inputs: Sequence) -> str:
    shown = ", ".join(repr(str(i)) for i in list(inputs)[:3])
    return shown + (" ..." if len(inputs) > 3 else "")


def _record_written(output_dir: Path, name: str) -> None:
    """Appends ``name`` to the write-ahead list before the file is created (so a crash cannot orphan it)."""
    with open(output_dir / WRITTEN_NAME, "a") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _written(output_dir: Path) -> set[str]:
    """Shard names this tool wrote here: the write-ahead list, plus those meta.json and the state record (a
    directory prepared before the list existed has only those)."""
    names: set[str] = set()
    path = output_dir / WRITTEN_NAME
    if path.is_file():
        names.update(line.strip() for line in path.read_text().splitlines() if line.strip())
    if (output_dir / META_NAME).is_file():
        try:
            names.update(s.name for s in read_meta(output_dir).shards)
        except (ValueError, KeyError, TypeError):
            pass  # not ours or unreadable: records nothing
    if (output_dir / STATE_NAME).is_file():
        try:
            names.update(entry["name"] for entry in json.loads((output_dir / STATE_NAME).read_text())["shards"])
        except (ValueError, KeyError, TypeError):
            pass
    return {n for n in names if _SHARD_RE.match(n)}


def _is_own_temporary(name: str, written: set[str]) -> bool:
    m = _TMP_RE.match(name)
    return name in _OWN_TMP or (m is not None and (m["target"] == META_NAME or m["target"] in written))


def _write_next_shard(output_dir: Path, split: str, rows, progress_state: _Progress) -> None:
    index = progress_state.shard_count(split)
    name = shard_name(split, index)
    _record_written(output_dir, name)
    num_bytes, sha = write_shard(output_dir / name, split, index, rows)
    real_tokens = int(sum(int(b[-1]) for b in rows.bounds))
    # Documents are counted where they start; a row whose first segment continues a document does not count it.
    documents = int(sum(len(b) - 2 for b in rows.bounds))
    progress_state.shards.append(ShardInfo(name, split, len(rows), real_tokens, documents, sha, num_bytes,
                                           str(output_dir / name)))


def _save_state(output_dir: Path, fingerprint: str, progress_state: _Progress, packers: dict[str, RowPacker]) -> None:
    arrays = {}
    for split, packer in packers.items():
        for key, value in packer.state().items():
            arrays[f"{split}.{key}"] = value
    pending_tmp = output_dir / f".{PENDING_NAME}.tmp.npz"
    np.savez(pending_tmp, **arrays)
    os.replace(pending_tmp, output_dir / PENDING_NAME)
    state = {"fingerprint": fingerprint, "next_unit": progress_state.next_unit,
             "input_bytes": progress_state.input_bytes, "documents": progress_state.documents,
             "tokens": progress_state.tokens, "shards": [s.entry() for s in progress_state.shards]}
    state_tmp = output_dir / f".{STATE_NAME}.tmp"
    state_tmp.write_text(json.dumps(state))
    os.replace(state_tmp, output_dir / STATE_NAME)


def _load_state(output_dir: Path, fingerprint: str, row_tokens: int, dtype: np.dtype, layout: str, log):
    state_path = output_dir / STATE_NAME
    if not state_path.exists():
        return None, None
    state = json.loads(state_path.read_text())
    if state.get("fingerprint") != fingerprint:
        raise FileExistsError(f"output directory {str(output_dir)!r} holds an unfinished preparation with other "
                              "inputs or settings; rerun with those, or pass overwrite=True (--overwrite)")
    with np.load(output_dir / PENDING_NAME) as pending:
        kind = PaddedRowPacker if layout == "padded" else RowPacker
        packers = {split: kind.from_state(row_tokens, dtype, {k.split(".", 1)[1]: pending[k] for k in pending.files
                                                              if k.startswith(f"{split}.")})
                   for split in SPLITS}
    shards = [ShardInfo(**entry, path=str(output_dir / entry["name"])) for entry in state["shards"]]
    return _Progress(state["next_unit"], state["input_bytes"], shards, state["documents"], state["tokens"]), packers


def _remove_unrecorded_shards(output_dir: Path, progress_state: _Progress) -> None:
    """Deletes the shards this tool wrote after the last saved state, and its temporary files; the shards will be
    rewritten identically. Files it did not write are left alone."""
    recorded = {s.name for s in progress_state.shards}
    written = _written(output_dir)
    for path in output_dir.iterdir():
        if (path.name in written and path.name not in recorded) or _is_own_temporary(path.name, written):
            path.unlink()


def _clear_output(output_dir: Path) -> None:
    """``overwrite``: deletes what this tool wrote here (shards it recorded, meta.json, its state and temporary
    files). tokenizer.json is replaced at the end rather than deleted (it may be the tokenizer being used)."""
    written = _written(output_dir)
    for path in output_dir.iterdir():
        if path.name in written or path.name in (META_NAME, STATE_NAME, PENDING_NAME, WRITTEN_NAME) \
                or _is_own_temporary(path.name, written):
            path.unlink()


def _summary_from_meta(meta: ShardSetMeta, output_dir: Path, started: float) -> PrepareSummary:
    data = meta.to_json()
    return PrepareSummary(output_dir, meta.documents, meta.tokens, data["rows"],
                          {s: sum(1 for x in meta.shards if x.split == s) for s in SPLITS},
                          meta.extra.get("input_bytes", 0), time.perf_counter() - started, already_complete=True)
