"""Megatron ``.bin/.idx`` indexed datasets: blends of them in a recipe, where their tokenizer is, and writing them
from text (``tools/prepare_data.py --format megatron``).

A Megatron indexed dataset is a path prefix: ``PREFIX.bin`` holds the token ids of every document back to back,
``PREFIX.idx`` their lengths and offsets (megatron.core.datasets.indexed_dataset). Megatron-LM's
``preprocess_data.py`` writes them; so does :func:`prepare_indexed`, through the same
``IndexedDatasetBuilder``, into a directory::

    train.bin, train.idx   documents not held out, each followed by EOS, in input order
    valid.bin, valid.idx   held-out documents (chosen by content hash, as for the WebDataset shards); only when
                           --valid-fraction > 0 selected some
    tokenizer.json         copy of the tokenizer that made them
    dataset.json           format, token dtype, eos_id, vocab_size, tokenizer_hash, counts; written last

Unlike the WebDataset shards nothing is packed here: documents are cut into training samples when the data is
read (``megatron_loader.py``), for any ``model.seq_length``.

**Blends** (``data.train_shards`` / ``data.valid_shards`` with ``data.format: megatron``) follow Megatron-LM's
``--data-path``: ``"0.7 /data/a 0.3 /data/b"`` (weight, then prefix; weights are relative) or prefixes alone
(``"/data/a /data/b"``: weighted by their sizes) or one prefix. Each prefix may also be a directory written by
:func:`prepare_indexed`, standing for its ``train`` prefix (and its ``valid`` prefix as held-out data).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .documents import DocSplit, EncodingErrors, InputError, list_input_files, plan_units, units_fingerprint
from .prepare import tokenize_units
from .shards import SPLITS
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_hash

DATASET_META = "dataset.json"
TOKENIZER_NAME = "tokenizer.json"
_PARTS_DIR = ".indexed_parts"
_STATE_NAME = ".indexed_state.json"
FORMAT_HINT = ("a Megatron indexed dataset is PREFIX.bin + PREFIX.idx (Megatron-LM's preprocess_data.py, or "
               "tools/prepare_data.py --format megatron; docs/data.md)")


class IndexedDataError(ValueError):
    """A malformed blend, missing .bin/.idx files, or a tokenizer that cannot be found or does not match."""

    hint = FORMAT_HINT


# ------------------------------------------------------------------------------------------------------------
# Blends in a recipe.

@dataclass(frozen=True)
class Corpus:
    """One entry of a blend: its weight (None: weighted by size) and its train / held-out prefixes."""

    weight: Optional[float]
    train: str
    valid: Optional[str]
    """The held-out prefix beside it (a prepare_indexed directory's ``valid``), if any."""
    directory: Path
    """Where its tokenizer.json and dataset.json would be."""


@dataclass(frozen=True)
class Blend:
    """A resolved blend: prefixes are absolute, weights all given or all None."""

    corpora: tuple[Corpus, ...]

    @property
    def weights(self) -> Optional[list[float]]:
        return None if self.corpora[0].weight is None else [c.weight for c in self.corpora]

    def megatron_blend(self, prefixes: str = "train") -> Optional[tuple[list[str], Optional[list[float]]]]:
        """Megatron's ``(prefixes, weights)``: of the ``train`` prefixes; of the ``valid`` ones (None when no corpus
        has one; corpora without one drop out); or ``held_out`` (a blend named as held-out data: each corpus's valid
        prefix when it has one, else its train prefix)."""
        if prefixes == "valid":
            chosen = [(c, c.valid) for c in self.corpora if c.valid]
        elif prefixes == "held_out":
            chosen = [(c, c.valid or c.train) for c in self.corpora]
        else:
            chosen = [(c, c.train) for c in self.corpora]
        if not chosen:
            return None
        return [p for _, p in chosen], None if chosen[0][0].weight is None else [c.weight for c, _ in chosen]

    def _prefixes(self) -> list[str]:
        return [p for c in self.corpora for p in (c.train, c.valid) if p]

    def digest(self) -> str:
        """Names (last two path parts), sizes and weights of the files: what the sample order depends on besides
        the settings; unchanged when the data is moved or copied."""
        h = hashlib.sha256()
        for c in self.corpora:
            for prefix in (c.train, c.valid):
                if prefix:
                    sizes = [os.path.getsize(prefix + ext) for ext in (".bin", ".idx")]
                    name = os.path.join(*Path(prefix).parts[-2:])
                    h.update(f"{name}:{sizes}:{c.weight}\n".encode())
        return h.hexdigest()[:16]

    def files_digest(self) -> str:
        """Full paths, sizes and modification times: the index-cache key, so rewritten data is re-indexed."""
        h = hashlib.sha256()
        for prefix in self._prefixes():
            for ext in (".bin", ".idx"):
                st = os.stat(prefix + ext)
                h.update(f"{prefix}{ext}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_blend(key: str, value: str) -> list[tuple[Optional[float], str]]:
    """``"W1 P1 W2 P2 ..."`` or ``"P1 P2 ..."`` → [(weight or None, path)], refusing what Megatron would misread."""
    items = str(value).split()
    if not items:
        raise IndexedDataError(f"{key}={value!r}: empty; expected a prefix, or a blend 'W1 PREFIX1 W2 PREFIX2 ...'")
    numeric = [_is_number(x) for x in items]
    if not any(numeric):
        return [(None, p) for p in items]
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise IndexedDataError(f"{key}={value!r}: a blend is 'W1 PREFIX1 W2 PREFIX2 ...' (a weight before every "
                               "prefix) or prefixes alone; got " + " ".join("W" if n else "PREFIX" for n in numeric))
    pairs = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
    for weight, path in pairs:
        if not (math.isfinite(weight) and weight > 0):
            raise IndexedDataError(f"{key}={value!r}: weight {weight!r} of {path!r} must be a number > 0")
    return pairs


def _has_prefix(prefix: str) -> bool:
    return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")


def looks_indexed(value: str) -> bool:
    """``data.format: auto``: is ``value`` a Megatron blend (weights, or prefixes / prepare_indexed directories
    that exist)?"""
    try:
        entries = parse_blend("data.train_shards", value)
    except IndexedDataError:
        return False
    if entries[0][0] is not None:
        return True
    path = os.path.expanduser(entries[0][1])
    return _has_prefix(path) or (os.path.isdir(path) and _has_prefix(os.path.join(path, "train")))


def resolve_blend(key: str, value: str) -> Blend:
    """Absolute prefixes for every entry of ``value``; a missing .bin/.idx is named with the key."""
    corpora = []
    for weight, raw in parse_blend(key, value):
        path = os.path.abspath(os.path.expanduser(raw))
        if os.path.isdir(path) and _has_prefix(os.path.join(path, "train")):
            valid = os.path.join(path, "valid")
            corpora.append(Corpus(weight, os.path.join(path, "train"), valid if _has_prefix(valid) else None,
                                  Path(path)))
        elif _has_prefix(path):
            corpora.append(Corpus(weight, path, None, Path(path).parent))
        else:
            missing = [p for p in (path + ".bin", path + ".idx") if not os.path.isfile(p)]
            what = (f"{raw!r} is a directory without train.bin/train.idx" if os.path.isdir(path)
                    else f"{', '.join(missing)} not found")
            raise FileNotFoundError(f"{key}={value!r}: {what}; expected PREFIX.bin + PREFIX.idx, or a directory "
                                    "written by tools/prepare_data.py --format megatron")
    return Blend(tuple(corpora))


def find_tokenizer(blends: Sequence[Blend], key_value: str, tokenizer: Optional[str]) -> Path:
    """``data.tokenizer``, else the tokenizer.json beside the blends' prefixes (all the same one). When a
    ``dataset.json`` records the tokenizer that made a corpus, a different one is refused."""
    directories = list(dict.fromkeys(c.directory for b in blends for c in b.corpora))
    if tokenizer:
        path = Path(tokenizer).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer={tokenizer!r}: no such file; expected the tokenizer.json that "
                                    "made the .bin/.idx data")
    else:
        found = {d: d / TOKENIZER_NAME for d in directories if (d / TOKENIZER_NAME).is_file()}
        if not found:
            raise IndexedDataError(f"data.tokenizer is unset and there is no {TOKENIZER_NAME} beside "
                                   f"data.train_shards={key_value!r} (looked in {', '.join(map(str, directories))}); "
                                   "set data.tokenizer=<the tokenizer.json that made the .bin/.idx data>")
        hashes = {d: tokenizer_hash(p) for d, p in found.items()}
        if len(set(hashes.values())) > 1:
            raise IndexedDataError(f"data.train_shards={key_value!r}: the corpora were made by different tokenizers "
                                   f"({', '.join(str(p) for p in found.values())} differ); a blend needs one")
        path = next(iter(found.values()))
    want = tokenizer_hash(path)
    for d in directories:
        meta = d / DATASET_META
        if meta.is_file():
            made_by = json.loads(meta.read_text()).get("tokenizer_hash")
            if made_by and made_by != want:
                raise IndexedDataError(f"{d} was tokenized by another tokenizer (hash {made_by[:12]}…) than "
                                       f"{str(path)!r} ({want[:12]}…); set data.tokenizer to the one that made it")
    return path


# ------------------------------------------------------------------------------------------------------------
# Writing: text -> train/valid .bin/.idx through megatron-core's IndexedDatasetBuilder.

@dataclass
class IndexedSummary:
    """Counts per split (``documents``, ``tokens`` incl. one EOS per document) of a prepared directory."""

    output_dir: Path
    documents: dict[str, int]
    tokens: dict[str, int]
    input_bytes: int
    seconds: float
    resumed_units: int = 0
    already_complete: bool = False

    def line(self) -> str:
        def both(d: dict[str, int]) -> str:
            return f"{d.get('train', 0):,} train / {d.get('valid', 0):,} valid"
        return (f"{both(self.documents)} documents, {both(self.tokens)} tokens; {self.input_bytes / 1e6:.1f} MB "
                f"of input in {self.seconds:.1f} s")


@dataclass
class _Progress:
    next_unit: int = 0
    input_bytes: int = 0
    parts: list[dict] = field(default_factory=list)
    """Finished parts: {"name", "documents": {split: n}}; each is a complete prefix per split."""
    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))


def token_dtype_for(vocab_size: int) -> type:
    """What Megatron-LM's preprocess_data picks (``DType.optimal_dtype``): uint16 below 65,500 ids, else int32 (a
    numpy scalar type, as IndexedDatasetBuilder wants)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def prepare_indexed(
    inputs: Sequence[Union[str, os.PathLike]],
    output_dir: Union[str, os.PathLike],
    tokenizer: Union[str, os.PathLike, Tokenizer],
    *,
    valid_fraction: float = 0.0,
    workers: Optional[int] = None,
    doc_split: DocSplit = "file",
    text_key: str = "text",
    extensions: Optional[Sequence[str]] = None,
    unit_mb: float = 4.0,
    part_mb: float = 1024.0,
    max_bytes: Optional[int] = None,
    encoding_errors: EncodingErrors = "strict",
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    _interrupt_after_units: Optional[int] = None,
) -> IndexedSummary:
    """Tokenizes ``inputs`` into ``output_dir/{train,valid}.{bin,idx}`` (+ tokenizer.json, dataset.json).

    Same inputs, documents, tokenizer workers and held-out rule as :func:`prepare.prepare_shards`; every
    document becomes one sequence (and one Megatron document) followed by EOS, as ``preprocess_data.py
    --append-eod`` writes. Resumable: every ``part_mb`` MB of input is finished as a part (a complete prefix per
    split, in ``.indexed_parts/``); a rerun with the same inputs and settings keeps the finished parts. At the end
    the parts are concatenated (``IndexedDatasetBuilder.add_index``, as Megatron-LM's merge tool does) and
    removed; dataset.json is written last, so its presence means the directory is complete.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.perf_counter()
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction}: must be in [0, 1)")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes}: must be None (all input) or >= 1")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    output_dir = Path(output_dir).expanduser()
    dtype = token_dtype_for(tok.vocab_size)
    files = list_input_files(inputs, extensions)
    units = plan_units(files, doc_split, max(1, int(unit_mb * 2 ** 20)), max_bytes)
    total_bytes = sum(u.num_bytes for u in units)
    if total_bytes == 0:
        raise InputError(f"inputs {[str(i) for i in inputs][:3]}: {len(files)} file(s), all empty; nothing to "
                         "tokenize (need at least one non-empty text or jsonl file)")
    settings = dict(format="megatron", valid_fraction=valid_fraction, doc_split=doc_split, text_key=text_key,
                    encoding_errors=encoding_errors, tokenizer_hash=tok.hash, eos_id=tok.eos_id,
                    dtype=np.dtype(dtype).name, part_mb=part_mb, inputs=units_fingerprint(units))
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    output_dir.mkdir(parents=True, exist_ok=True)
    meta_path = output_dir / DATASET_META
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())
        if existing.get("fingerprint") == fingerprint and not overwrite:
            summary = IndexedSummary(output_dir, existing["documents"], existing["tokens"], existing["input_bytes"],
                                     time.perf_counter() - started, already_complete=True)
            log(f"prepare_data: {output_dir} is already complete with these inputs and settings: {summary.line()}")
            return summary
        if not overwrite:
            raise FileExistsError(f"output directory {str(output_dir)!r} already holds a Megatron dataset made from "
                                  "other inputs or settings; pass overwrite=True (--overwrite) to replace it")
    own = [output_dir / f"{s}{ext}" for s in SPLITS for ext in (".bin", ".idx")]
    if not meta_path.is_file() and not (output_dir / _STATE_NAME).is_file() and any(p.exists() for p in own):
        raise FileExistsError(f"output directory {str(output_dir)!r} holds train/valid .bin/.idx files that "
                              "prepare_data did not record writing; move them or choose another directory")
    state_path, parts_dir = output_dir / _STATE_NAME, output_dir / _PARTS_DIR
    state = _Progress()
    if state_path.is_file():
        saved = json.loads(state_path.read_text())
        if saved.get("fingerprint") != fingerprint and not overwrite:
            raise FileExistsError(f"output directory {str(output_dir)!r} holds an unfinished preparation with other "
                                  "inputs or settings; rerun with those, or pass overwrite=True (--overwrite)")
        if saved.get("fingerprint") == fingerprint and not overwrite:
            state = _Progress(saved["next_unit"], saved["input_bytes"], saved["parts"], saved["documents"],
                              saved["tokens"])
    if overwrite:
        for path in own + [meta_path]:
            path.unlink(missing_ok=True)
    # Parts written after the last saved state (an interruption mid-part) are redone.
    kept = {f"{p['name']}-{s}{ext}" for p in state.parts for s in SPLITS for ext in (".bin", ".idx")}
    parts_dir.mkdir(exist_ok=True)
    for path in parts_dir.iterdir():
        if path.name not in kept:
            path.unlink()
    resumed_units = state.next_unit
    log(f"prepare_data: {len(files)} files ({total_bytes / 1e6:.1f} MB, {len(units)} units) -> {output_dir} "
        f"(Megatron .bin/.idx): {np.dtype(dtype).name} tokens, tokenizer {tok.path.name} (vocab {tok.vocab_size}, eos "
        f"{tok.eos_id}), valid {valid_fraction:.1%}, workers {workers if workers is not None else os.cpu_count()}"
        + (f"; resuming at unit {resumed_units}/{len(units)}" if resumed_units else ""))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, initial=state.input_bytes, unit="B", unit_scale=True, desc="tokenize",
                   smoothing=0.1)
    builders: Optional[dict] = None
    part_docs: dict[str, int] = {}
    part_bytes = 0
    part_limit = max(1, int(part_mb * 2 ** 20))

    def part_name() -> str:
        return f"part-{len(state.parts):06d}"

    def finish_part(next_unit: int) -> None:
        nonlocal builders, part_bytes
        name = part_name()
        for split, builder in builders.items():
            builder.finalize(str(parts_dir / f"{name}-{split}.idx"))
        state.parts.append({"name": name, "documents": dict(part_docs)})
        state.next_unit = next_unit
        _save_state(state_path, fingerprint, state)
        builders, part_bytes = None, 0

    init_args = (str(tok.path), tok.eos_token, doc_split, text_key, encoding_errors, valid_fraction)
    done = 0
    for index, num_bytes, per_split in tokenize_units(units[state.next_unit:], init_args, workers):
        if builders is None:
            builders = {s: IndexedDatasetBuilder(str(parts_dir / f"{part_name()}-{s}.bin"), dtype=dtype)
                        for s in SPLITS}
            part_docs = dict.fromkeys(SPLITS, 0)
        for split in SPLITS:
            flat, lengths = per_split[split]
            ends = np.cumsum(lengths)
            for start, end in zip(ends - lengths, ends):
                builders[split].add_document(flat[start:end], [int(end - start)])
            part_docs[split] += len(lengths)
            state.documents[split] += len(lengths)
            state.tokens[split] += len(flat)
        state.input_bytes += num_bytes
        part_bytes += num_bytes
        if part_bytes >= part_limit:
            finish_part(index + 1)
        if bar is not None:
            bar.update(num_bytes)
        done += 1
        if _interrupt_after_units is not None and done >= _interrupt_after_units:
            raise KeyboardInterrupt(f"interrupted after unit {index} (testing hook)")
    if builders is not None:
        finish_part(len(units))
    if bar is not None:
        bar.close()
    if sum(state.tokens.values()) == 0:
        shutil.rmtree(parts_dir)
        state_path.unlink(missing_ok=True)
        raise InputError(f"inputs {[str(i) for i in inputs][:3]}: {len(files)} file(s), {total_bytes} bytes, but no "
                         f"document with text (doc_split={doc_split!r}, text_key={text_key!r}); nothing to tokenize")

    for split in SPLITS:
        parts = [p["name"] for p in state.parts if p["documents"][split]]
        if not parts:
            continue
        tmp = output_dir / f".{split}.tmp-{os.getpid()}"
        merged = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
        for name in parts:
            merged.add_index(str(parts_dir / f"{name}-{split}"))
        merged.finalize(str(tmp) + ".idx")
        for ext in (".bin", ".idx"):
            os.replace(str(tmp) + ext, output_dir / f"{split}{ext}")
    copied = output_dir / TOKENIZER_NAME
    if not (copied.exists() and copied.samefile(tok.path)):
        shutil.copyfile(tok.path, copied)
    meta = {"format": "megatron", "token_dtype": np.dtype(dtype).name, "eos_id": tok.eos_id,
            "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash, "documents": state.documents,
            "tokens": state.tokens, "prefixes": [s for s in SPLITS if state.documents[s]], "fingerprint": fingerprint,
            "valid_fraction": valid_fraction, "doc_split": doc_split, "input_bytes": total_bytes,
            "input_files": len(files)}
    tmp_meta = output_dir / f".{DATASET_META}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    shutil.rmtree(parts_dir)
    state_path.unlink(missing_ok=True)
    summary = IndexedSummary(output_dir, dict(state.documents), dict(state.tokens), total_bytes,
                             time.perf_counter() - started, resumed_units)
    log(f"prepare_data: {summary.line()}")
    return summary


def _save_state(path: Path, fingerprint: str, state: _Progress) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "next_unit": state.next_unit,
                               "input_bytes": state.input_bytes, "parts": state.parts,
                               "documents": state.documents, "tokens": state.tokens}))
    os.replace(tmp, path)
