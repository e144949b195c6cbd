"""Reading documents from text, jsonl and directories, cut into byte-range work units for parallel tokenizing.

Formats (by file name; ``.gz`` allowed on top):
  * ``*.jsonl``: one JSON object per line, the document is the string under ``text_key``.
  * anything else: UTF-8 text; ``doc_split`` says what a document is: the whole file (``file``), each line
    (``line``) or each blank-line separated paragraph (``paragraph``).

Large uncompressed files are cut into byte ranges whose ends are aligned to document boundaries by one shared
rule (:func:`_aligned_offset`), so consecutive ranges tile the file: every document is read exactly once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

DocSplit = Literal["file", "line", "paragraph"]
DOC_SPLITS = ("file", "line", "paragraph")
EncodingErrors = Literal["strict", "replace"]

# Files found when walking a directory without an explicit extension list. Binary files would be garbage
# tokens, so a directory is read only for text-like names.
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".jsonl", ".py", ".pod", ".tex", ".html", ".xml", ".c", ".h",
                      ".cc", ".cpp", ".rs", ".go", ".java", ".js", ".ts", ".sh", ".yaml", ".yml", ".toml")


@dataclass(frozen=True)
class Piece:
    """A byte range ``[start, end)`` of one input file (``end = -1``: to the end; compressed files are whole)."""

    path: str
    start: int
    end: int
    format: Literal["text", "jsonl"]


@dataclass(frozen=True)
class WorkUnit:
    """Pieces tokenized together by one worker: a few MB, so that tokenizing dominates messaging."""

    index: int
    pieces: tuple[Piece, ...]
    num_bytes: int


def file_format(path: Path) -> Literal["text", "jsonl"]:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return "jsonl" if name.endswith(".jsonl") else "text"


def _strip_gz(name: str) -> str:
    return name[:-3] if name.lower().endswith(".gz") else name


def list_input_files(inputs: Sequence[os.PathLike | str], extensions: Optional[Sequence[str]] = None) -> list[Path]:
    """Expands inputs (files and directories, walked recursively in sorted order) into a list of files.

    Raises ``FileNotFoundError`` naming the input when one does not exist, and ``ValueError`` when a directory
    holds no file with an accepted extension.
    """
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in (extensions or DEFAULT_EXTENSIONS))
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and _strip_gz(name.lower()).endswith(exts):
                        found.append(Path(dirpath) / name)
            if not found:
                raise ValueError(f"input directory {str(path)!r} holds no file ending in {', '.join(exts)} "
                                 "(choose others with --extensions)")
            files.extend(found)
        else:
            raise FileNotFoundError(f"input {str(item)!r} does not exist (expected a text/jsonl file or a directory)")
    return files


def plan_units(
    files: Sequence[Path],
    doc_split: DocSplit = "file",
    unit_bytes: int = 4 << 20,
    max_bytes: Optional[int] = None,
) -> list[WorkUnit]:
    """Cuts files into pieces and groups pieces into work units of about ``unit_bytes``.

    Files that are one document each (``doc_split="file"`` text) or compressed stay whole; others are cut into
    ranges of ``unit_bytes``. ``max_bytes`` caps the input (whole pieces, in order).
    """
    if doc_split not in DOC_SPLITS:
        raise ValueError(f"doc_split={doc_split!r}: must be one of {', '.join(DOC_SPLITS)}")
    pieces: list[tuple[Piece, int]] = []
    total = 0
    for path in files:
        size = path.stat().st_size
        fmt = file_format(path)
        splittable = not path.name.lower().endswith(".gz") and (fmt == "jsonl" or doc_split != "file")
        if splittable and size > unit_bytes:
            for start in range(0, size, unit_bytes):
                end = min(start + unit_bytes, size)
                pieces.append((Piece(str(path), start, end if end < size else -1, fmt), end - start))
        else:
            pieces.append((Piece(str(path), 0, -1, fmt), size))
    units: list[WorkUnit] = []
    current: list[Piece] = []
    current_bytes = 0
    for piece, size in pieces:
        if max_bytes is not None and total >= max_bytes:
            break
        total += size
        current.append(piece)
        current_bytes += size
        if current_bytes >= unit_bytes:
            units.append(WorkUnit(len(units), tuple(current), current_bytes))
            current, current_bytes = [], 0
    if current:
        units.append(WorkUnit(len(units), tuple(current), current_bytes))
    return units


def units_fingerprint(units: Sequence[WorkUnit]) -> str:
    """Hash of the work plan plus each file's size and mtime: resuming is refused if the inputs changed."""
    digest = hashlib.sha256()
    stats: dict[str, str] = {}
    for unit in units:
        for piece in unit.pieces:
            if piece.path not in stats:
                st = os.stat(piece.path)
                stats[piece.path] = f"{st.st_size}:{st.st_mtime_ns}"
            digest.update(f"{unit.index}|{piece.path}|{piece.start}|{piece.end}|{stats[piece.path]}\n".encode())
    return digest.hexdigest()


def _is_blank(line: bytes) -> bool:
    return not line.strip()


def _aligned_offset(handle: io.BufferedReader, offset: int, doc_split: DocSplit, fmt: str, size: int) -> int:
    """The first document boundary at or after ``offset``: where a range starting near ``offset`` really starts.

    Line-based documents (jsonl, ``line``) start at line starts; paragraphs start after a blank line. Both
    neighbours of a cut call this with the same offset, so ranges tile the file without gaps or overlaps.
    """
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    handle.seek(offset - 1)
    handle.readline()  # to the end of the line holding byte offset-1: the next position is a line start >= offset
    if fmt == "jsonl" or doc_split == "line":
        return handle.tell()
    while True:  # paragraph: skip lines until one blank line has been consumed
        line = handle.readline()
        if not line:
            return size
        if _is_blank(line):
            return handle.tell()


class InputError(ValueError):
    """Unreadable or malformed input; the message names the file and the byte offset."""


def _decode(raw: bytes, piece: Piece, offset: int, errors: EncodingErrors) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise InputError(f"input {piece.path!r}: invalid UTF-8 at byte {offset + err.start} ({err.reason}); "
                         "pass --encoding-errors replace to substitute U+FFFD") from None


def read_piece(piece: Piece, doc_split: DocSplit = "file", text_key: str = "text",
               errors: EncodingErrors = "strict") -> Iterator[str]:
    """Yields the documents of one piece, in file order. Empty documents are skipped."""
    path = Path(piece.path)
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
            start, end = 0, len(data)
        else:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                end_offset = size if piece.end < 0 else piece.end
                start = _aligned_offset(handle, piece.start, doc_split, piece.format, size)
                end = _aligned_offset(handle, end_offset, doc_split, piece.format, size)
                handle.seek(start)
                data = handle.read(max(0, end - start))
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise InputError(f"input {piece.path!r} cannot be read: {err}") from err

    if piece.format == "jsonl":
        offset = start
        for line in data.splitlines(keepends=True):
            line_offset, offset = offset, offset + len(line)
            if _is_blank(line):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"input {piece.path!r}: byte {line_offset}: not a JSON line ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise InputError(f"input {piece.path!r}: byte {line_offset}: expected an object with a string "
                                 f"field {text_key!r} (set --text-key); found {keys}")
            if record[text_key]:
                yield record[text_key]
        return

    if doc_split == "file":
        text = _decode(data, piece, start, errors)
        if text.strip():
            yield text
        return
    offset = start
    paragraph: list[bytes] = []
    paragraph_offset = start
    for line in data.splitlines(keepends=True):
        line_offset, offset = offset, offset + len(line)
        if doc_split == "line":
            if not _is_blank(line):
                yield _decode(line.rstrip(b"\r\n"), piece, line_offset, errors)
            continue
        if _is_blank(line):
            if paragraph:
                yield _decode(b"".join(paragraph).rstrip(b"\r\n"), piece, paragraph_offset, errors)
                paragraph = []
            continue
        if not paragraph:
            paragraph_offset = line_offset
        paragraph.append(line)
    if paragraph:
        yield _decode(b"".join(paragraph).rstrip(b"\r\n"), piece, paragraph_offset, errors)


def read_unit(unit: WorkUnit, doc_split: DocSplit = "file", text_key: str = "text",
              errors: EncodingErrors = "strict") -> list[str]:
    """All documents of a work unit, in order."""
    return [doc for piece in unit.pieces for doc in read_piece(piece, doc_split, text_key, errors)]
