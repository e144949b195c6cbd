"""Data pipeline: text -> tokenizer -> packed WebDataset shards -> resumable, rank/worker-split micro-batches."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.tools import load_tool
from ssa_megatron.config import DataConfig, ModelConfig, RecipeConfig, TrainConfig
from ssa_megatron.data.builtin import ensure_builtin_corpus, stdlib_files
from ssa_megatron.data.from_config import build_loaders
from ssa_megatron.data.documents import InputError, list_input_files, plan_units, read_unit
from ssa_megatron.data.loader import TokenLoader
from ssa_megatron.data.packing import RowPacker, batch_from_rows
from ssa_megatron.data.prepare import is_held_out, prepare_shards
from ssa_megatron.data.shards import CorruptShardError, read_meta, read_shard
from ssa_megatron.data.tokenizer import load_tokenizer, train_bpe

SEQ = 32
ROW = SEQ + 1
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega the of and to in is was for on are with as by at").split()


def _documents(count: int, seed: int) -> list[str]:
    """Synthetic documents from a few tokens to several rows long (some cross row ends, some fit inside)."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        length = rng.choice([3, 8, 20, 60, 150])
        docs.append(f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(length)) + ".")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """jsonl + text inputs, a tokenizer trained on them, and shards (2 worker processes, 10 % held out)."""
    root = tmp_path_factory.mktemp("data")
    docs = _documents(240, seed=0)
    (root / "inputs").mkdir()
    with open(root / "inputs" / "a.jsonl", "w") as handle:
        for doc in docs[:160]:
            handle.write(json.dumps({"text": doc}) + "\n")
    for i, doc in enumerate(docs[160:]):
        (root / "inputs" / f"t{i:03d}.txt").write_text(doc)
    tokenizer_path = train_bpe([d for d in docs], 400, root / "tokenizer.json")
    shard_dir = root / "shards"
    summary = prepare_shards([root / "inputs"], shard_dir, tokenizer_path, SEQ, rows_per_shard=16,
                             valid_fraction=0.1, workers=2, unit_mb=0.002, progress=False, log=lambda s: None)
    # Input order: a.jsonl (lines in order), then t000.txt ... (sorted directory walk).
    return {"root": root, "docs": docs, "tokenizer": load_tokenizer(tokenizer_path), "shards": shard_dir,
            "summary": summary}


def _expected_stream(corpus, split: str) -> np.ndarray:
    tok = corpus["tokenizer"]
    want = split == "valid"
    ids = [i + [tok.eos_id] for doc, i in zip(corpus["docs"], tok.encode_batch(corpus["docs"]))
           if is_held_out(doc, 0.1) == want]
    return np.concatenate([np.asarray(i) for i in ids])


def _stored_rows(shard_dir: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    meta = read_meta(shard_dir)
    rows = []
    for shard in meta.shards:
        if shard.split == split:
            tokens, bounds = read_shard(shard, meta.row_tokens, np.dtype(meta.token_dtype))
            rows.extend(zip(tokens, bounds))
    return rows


def _recipe(data: DataConfig, seq_length: int, micro_batch_size: int, vocab_size: int) -> RecipeConfig:
    """A recipe with these data settings (what ``build_loaders`` reads of a recipe)."""
    return RecipeConfig(data=data, model=ModelConfig(seq_length=seq_length, vocab_size=vocab_size),
                        train=TrainConfig(micro_batch_size=micro_batch_size))


def _rows_of_batch(batch) -> list[tuple[int, ...]]:
    """Each batch row back as its seq_length + 1 stored tokens."""
    full = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


# ------------------------------------------------------------------------------------------------------------
# Packing and shard contents


def test_packer_rows_bounds_and_batch_fields_on_a_hand_example():
    eos = 9
    packer = RowPacker(row_tokens=5, dtype=np.dtype(np.uint16))
    # docs: [1 2 3 eos] [4 eos] [5 6 7 8 1 2 eos]  -> stream of 13 tokens, rows of 5
    packer.add(np.array([1, 2, 3, eos, 4, eos], dtype=np.uint32), np.array([4, 2]))
    packer.add(np.array([5, 6, 7, 8, 1, 2, eos], dtype=np.uint32), np.array([7]))
    full = packer.take_rows(packer.full_rows())
    tail = packer.take_padded_tail(pad_id=eos)
    assert full.tokens.tolist() == [[1, 2, 3, eos, 4], [eos, 5, 6, 7, 8]]
    assert [b.tolist() for b in full.bounds] == [[0, 4, 5], [0, 1, 5]]
    assert tail.tokens.tolist() == [[1, 2, eos, eos, eos]] and tail.bounds[0].tolist() == [0, 3]

    batch = batch_from_rows([*full.tokens, *tail.tokens], [*full.bounds, *tail.bounds], seq_length=4)
    assert batch["tokens"].tolist() == [[1, 2, 3, eos], [eos, 5, 6, 7], [1, 2, eos, eos]]
    assert batch["labels"].tolist() == [[2, 3, eos, 4], [5, 6, 7, 8], [2, eos, eos, eos]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 0]]
    # Row 3 has 3 real tokens: labels at inputs 0, 1 are real (2, eos); the padding labels are masked.
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 5, 8, 11, 12]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["tokens"].dtype == torch.int64


def test_shards_hold_every_token_once_in_order_with_correct_bounds(corpus):
    meta = read_meta(corpus["shards"])
    assert meta.seq_length == SEQ and meta.token_dtype == "uint16" and meta.eos_id == corpus["tokenizer"].eos_id
    assert meta.tokenizer_hash == corpus["tokenizer"].hash
    eos = meta.eos_id
    for split in ("train", "valid"):
        rows = _stored_rows(corpus["shards"], split)
        expected = _expected_stream(corpus, split)
        real = np.concatenate([t[: b[-1]] for t, b in rows])
        assert np.array_equal(real, expected), split
        assert all(b[-1] == ROW for _, b in rows[:-1])  # only the very last row of a split is padded
        # Documents start at offset 0 or right after an EOS, and nowhere else.
        for tokens, bounds in rows:
            starts = set(bounds[:-1].tolist())
            after_eos = {i for i in range(1, int(bounds[-1])) if tokens[i - 1] == eos}
            assert starts - {0} == after_eos
    summary = corpus["summary"]
    assert summary.documents["train"] + summary.documents["valid"] == len(corpus["docs"])
    assert summary.documents["valid"] == sum(is_held_out(d, 0.1) for d in corpus["docs"]) > 0
    assert summary.tokens["train"] == len(_expected_stream(corpus, "train"))


@pytest.mark.slow
def test_output_does_not_depend_on_workers_and_resumes_after_interrupt(corpus, tmp_path):
    kwargs = dict(rows_per_shard=16, valid_fraction=0.1, unit_mb=0.002, progress=False, log=lambda s: None)
    inputs, tok = [corpus["root"] / "inputs"], corpus["tokenizer"].path
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(inputs, tmp_path / "out", tok, SEQ, workers=0, _interrupt_after_units=9, **kwargs)
    assert (tmp_path / "out" / ".prepare_state.json").exists() and not (tmp_path / "out" / "meta.json").exists()
    with pytest.raises(KeyboardInterrupt):  # a second interruption, resumed state included
        prepare_shards(inputs, tmp_path / "out", tok, SEQ, workers=0, _interrupt_after_units=9, **kwargs)
    summary = prepare_shards(inputs, tmp_path / "out", tok, SEQ, workers=0, **kwargs)
    assert summary.resumed_units > 9
    reference = read_meta(corpus["shards"])  # made in one go by 2 worker processes
    resumed = read_meta(tmp_path / "out")
    assert [(s.name, s.sha256, s.rows) for s in resumed.shards] == \
        [(s.name, s.sha256, s.rows) for s in reference.shards]
    for shard in reference.shards:
        assert (tmp_path / "out" / shard.name).read_bytes() == (corpus["shards"] / shard.name).read_bytes()
    again = prepare_shards(inputs, tmp_path / "out", tok, SEQ, workers=0, **kwargs)
    assert again.already_complete
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        prepare_shards(inputs, tmp_path / "out", tok, SEQ + 1, workers=0, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Loader


def _check_batch_structure(batch, eos: int, seq: int = SEQ) -> None:
    b = batch["tokens"].shape[0]
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == b * seq and cu == sorted(set(cu))
    assert set(range(0, b * seq, seq)) <= set(cu)  # every row start is a boundary
    flat_pos = batch["position_ids"].reshape(-1).tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        assert flat_pos[start:end] == list(range(end - start))
    flat_tokens = batch["tokens"].reshape(-1).tolist()
    for start in cu[1:-1]:
        if start % seq:  # inside a row a new document follows an EOS (or padding starts after the last one)
            assert flat_tokens[start - 1] == eos
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])


@pytest.mark.slow
@pytest.mark.parametrize("split,distribute", [("train", "shards"), ("train", "rows"), ("valid", "auto")])
def test_one_epoch_over_2_ranks_x_2_workers_yields_every_row_once(corpus, split, distribute):
    meta = read_meta(corpus["shards"])
    stored = Counter(tuple(t.tolist()) for t, _ in _stored_rows(corpus["shards"], split))
    seen: Counter = Counter()
    for rank in range(2):
        loader = TokenLoader(corpus["shards"], SEQ, micro_batch_size=3, dp_rank=rank, dp_world_size=2,
                             num_workers=2, seed=7, split=split, infinite=False, shuffle=True,
                             distribute=distribute)
        # Whole shards per reader, or (few shards: the valid split) every reader strides over all rows.
        n_shards = sum(1 for s in meta.shards if s.split == split)
        assert loader.distribute == (distribute if distribute != "auto" else
                                     "shards" if n_shards >= 4 else "rows")
        count = 0
        for batch in loader:
            _check_batch_structure(batch, meta.eos_id)
            seen.update(_rows_of_batch(batch))
            count += 1
        assert count == len(loader)
    assert seen == stored
    real_tokens = sum(s.tokens for s in meta.shards if s.split == split)
    assert real_tokens == len(_expected_stream(corpus, split))


def test_loss_mask_excludes_only_padding(corpus):
    loader = TokenLoader(corpus["shards"], SEQ, micro_batch_size=64, split="valid")
    batches = list(loader)
    masked = sum(float((1 - b["loss_mask"]).sum()) for b in batches)
    rows = _stored_rows(corpus["shards"], "valid")
    padding_labels = ROW - int(rows[-1][1][-1])  # only the last row is padded
    assert masked == padding_labels


def test_training_order_is_deterministic_multi_epoch_and_reshuffled(corpus):
    loader = TokenLoader(corpus["shards"], SEQ, micro_batch_size=1, seed=3, shuffle_shards=2)
    n = loader.num_rows
    it = iter(loader)
    rows = [_rows_of_batch(next(it))[0] for _ in range(2 * n + 5)]
    assert Counter(rows[:n]) == Counter(rows[n: 2 * n])  # each epoch is the whole split once
    assert rows[:n] != rows[n: 2 * n]  # ... in a new order
    assert loader.epoch == 2
    again = TokenLoader(corpus["shards"], SEQ, micro_batch_size=1, seed=3, shuffle_shards=2)
    assert [_rows_of_batch(b)[0] for _, b in zip(range(20), again)] == rows[:20]
    other = TokenLoader(corpus["shards"], SEQ, micro_batch_size=1, seed=4, shuffle_shards=2)
    assert [_rows_of_batch(b)[0] for _, b in zip(range(20), other)] != rows[:20]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers,stop_at", [(0, 11), (2, 7), (2, 30)])
def test_resume_mid_epoch_yields_exactly_the_uninterrupted_batches(corpus, num_workers, stop_at):
    def make():
        return TokenLoader(corpus["shards"], SEQ, micro_batch_size=2, dp_rank=1, dp_world_size=2,
                           num_workers=num_workers, seed=11, shuffle_shards=2)

    total = 45  # crosses the epoch end of at least one reader
    reference = [b for _, b in zip(range(total), make())]
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(stop_at)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = [b for _, b in zip(range(total - stop_at), resumed)]
    for got, want in zip(head + tail, reference):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.state_dict()["consumed_batches"] == total

    with pytest.raises(ValueError, match="dp_world_size"):
        TokenLoader(corpus["shards"], SEQ, micro_batch_size=2, dp_rank=0, dp_world_size=1,
                    num_workers=num_workers, seed=11).load_state_dict(state)


@pytest.mark.slow
def test_valid_one_pass_resumes_exactly_and_rewinds(corpus):
    def make():
        return TokenLoader(corpus["shards"], SEQ, micro_batch_size=1, dp_world_size=1, num_workers=2,
                           split="valid")

    reference = [_rows_of_batch(b)[0] for b in make()]
    loader = make()
    it = iter(loader)
    head = [_rows_of_batch(next(it))[0] for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert head + [_rows_of_batch(b)[0] for b in resumed] == reference
    assert [_rows_of_batch(b)[0] for b in resumed] == reference  # a finished pass rewinds


# ------------------------------------------------------------------------------------------------------------
# Errors


def _copy_shards(corpus, tmp_path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(corpus["shards"], target)
    return target


@pytest.mark.slow
def test_corrupt_and_missing_shards_raise_errors_naming_them(corpus, tmp_path, caplog):
    shard_dir = _copy_shards(corpus, tmp_path)
    victim = shard_dir / "train-000002.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated mid-stream

    for verify in (True, False):  # the checksum catches it; without it, the tar reader or the row count does
        loader = TokenLoader(shard_dir, SEQ, micro_batch_size=4, infinite=False, verify_checksums=verify)
        with pytest.raises(CorruptShardError, match="train-000002.tar"):
            list(loader)

    # Cut exactly at a member boundary: the tar ends "cleanly"; the row count from meta.json catches it.
    victim.write_bytes(data[: 512 * 4])
    with pytest.raises(CorruptShardError, match=r"train-000002.tar.*holds 1 rows, meta.json says 16"):
        list(TokenLoader(shard_dir, SEQ, micro_batch_size=4, infinite=False, verify_checksums=False))

    # Through DataLoader workers the error still names the shard.
    with pytest.raises(Exception, match="train-000002.tar"):
        list(TokenLoader(shard_dir, SEQ, micro_batch_size=4, num_workers=2, infinite=False))

    # Configured skipping: the other shards' rows arrive, and the skip is logged with a count.
    with caplog.at_level(logging.WARNING, logger="ssa_megatron.data"):
        loader = TokenLoader(shard_dir, SEQ, micro_batch_size=4, infinite=False, skip_corrupt_shards=True)
        rows = sum(b["tokens"].shape[0] for b in loader)
    assert rows == loader.num_rows - 16
    assert "skipping corrupt shard" in caplog.text and "1 skipped" in caplog.text
    assert "train-000002.tar" in caplog.text

    (shard_dir / "train-000005.tar").unlink()
    with pytest.raises(CorruptShardError, match="train-000005.tar.*missing"):
        TokenLoader(shard_dir, SEQ, micro_batch_size=4)


def test_incompatible_requests_are_refused_with_clear_messages(corpus, tmp_path):
    with pytest.raises(ValueError, match="packed for seq_length=32, not the requested 64"):
        TokenLoader(corpus["shards"], 64, micro_batch_size=1)
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenLoader(corpus["shards"], SEQ, micro_batch_size=1, tokenizer_hash="0" * 64)
    with pytest.raises(ValueError, match="dp_rank=2"):
        TokenLoader(corpus["shards"], SEQ, micro_batch_size=1, dp_rank=2, dp_world_size=2)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenLoader(tmp_path, SEQ, micro_batch_size=1)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        prepare_shards([tmp_path / "does-not-exist.txt"], tmp_path / "o", corpus["tokenizer"].path, SEQ)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl.*byte 17.*'text'.*found 'body'"):
        read_unit(plan_units([bad])[0])


# ------------------------------------------------------------------------------------------------------------
# Documents, tokenizer, builtin corpus


@pytest.mark.parametrize("doc_split", ["line", "paragraph"])
def test_byte_ranges_tile_files_into_the_same_documents(tmp_path, doc_split):
    rng = random.Random(1)
    lines = []
    for _ in range(150):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
        if rng.random() < 0.3:
            lines.append(rng.choice(["", "   "]))
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    whole = [d for u in plan_units([path], doc_split, unit_bytes=1 << 30) for d in read_unit(u, doc_split)]
    for unit_bytes in (7, 97, 1000):
        units = plan_units([path], doc_split, unit_bytes=unit_bytes)
        assert len(units) > 1
        assert [d for u in units for d in read_unit(u, doc_split)] == whole


@pytest.mark.slow
def test_bpe_training_is_deterministic_across_processes_and_threads(tmp_path):
    texts = _documents(300, seed=5)
    first = train_bpe(texts, 500, tmp_path / "a.json")
    script = ("import sys, json; from ssa_megatron.data.tokenizer import train_bpe; "
              "train_bpe(json.load(open(sys.argv[1])), 500, sys.argv[2])")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = dict(os.environ, RAYON_NUM_THREADS="1", PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "texts.json"), str(tmp_path / "b.json")],
                   check=True, env=env)
    assert first.read_bytes() == (tmp_path / "b.json").read_bytes()
    tok = load_tokenizer(first)
    assert tok.vocab_size <= 500 and tok.eos_id == 0  # small texts run out of pairs to merge
    ids = tok.encode_batch(texts[:3])
    assert [tok.decode(i) for i in ids] == texts[:3]  # byte-level: lossless


def test_directory_inputs_and_unknown_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.md").write_text("a")
    (tmp_path / "d" / "image.png").write_bytes(b"\x89PNG")
    assert [p.name for p in list_input_files([tmp_path / "d"])] == ["b.txt", "a.md"]
    with pytest.raises(ValueError, match="holds no file ending in"):
        list_input_files([tmp_path / "d" / "sub"], extensions=["jsonl"])


@pytest.mark.slow
def test_builtin_stdlib_corpus_builds_quickly_and_is_cached(tmp_path):
    started, cpu_started = time.perf_counter(), time.process_time()
    shard_dir, tokenizer_path = ensure_builtin_corpus(tmp_path, seq_length=256, vocab_size=2048, progress=False,
                                                      log=lambda s: None)
    # CPU seconds of all threads bound the wall time on 2 idle cores (and even on 1); unlike wall time they do
    # not grow when other jobs share the machine. ~20 CPU-s here (docs/benchmarks.md, "Data pipeline (CPU)").
    cpu_seconds, wall_seconds = time.process_time() - cpu_started, time.perf_counter() - started
    assert cpu_seconds < 60, f"builtin corpus took {cpu_seconds:.1f} CPU-s ({wall_seconds:.1f} s wall)"
    meta = read_meta(shard_dir)
    assert meta.tokens["train"] > 2_000_000 and meta.tokens["valid"] > 0
    assert len([s for s in meta.shards if s.split == "train"]) >= 32
    assert load_tokenizer(tokenizer_path).hash == meta.tokenizer_hash
    started = time.perf_counter()
    assert ensure_builtin_corpus(tmp_path, 256, 2048, progress=False, log=lambda s: None) == \
        (shard_dir, tokenizer_path)
    assert time.perf_counter() - started < 2
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    # What the training loop calls: the same cached corpus, train and held-out streams.
    setup = build_loaders(_recipe(DataConfig(cache_dir=str(tmp_path), num_workers=0), 256, 2, 2048),
                          log=lambda s: None)
    assert setup.train_source == str(shard_dir) and setup.tokenizer_path == tokenizer_path
    start = setup.valid.state_dict()
    held_out = [_rows_of_batch(b) for _, b in zip(range(2), setup.valid)]
    setup.valid.load_state_dict(start)  # what the loop does before each evaluation
    assert [_rows_of_batch(b) for _, b in zip(range(2), setup.valid)] == held_out
    with pytest.raises(ValueError, match="raise model.vocab_size to at least 2048"):
        build_loaders(_recipe(DataConfig(cache_dir=str(tmp_path), train_shards=str(shard_dir)), 256, 2, 1000))
    batch = next(iter(TokenLoader(shard_dir, 256, micro_batch_size=2, num_workers=0)))
    _check_batch_structure(batch, meta.eos_id, seq=256)
    # The longest segment decodes to real standard-library source.
    cu = batch["cu_seqlens"].tolist()
    start, end = max(zip(cu[:-1], cu[1:]), key=lambda se: se[1] - se[0])
    text = load_tokenizer(tokenizer_path).decode(batch["tokens"].reshape(-1)[start:end].tolist())
    sources = "".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files())
    assert len(text) > 100 and text[20:-20] in sources


# ------------------------------------------------------------------------------------------------------------
# CLIs (run in-process through their main(argv))


@pytest.mark.slow
def test_clis_train_prepare_and_report_bad_input(corpus, tmp_path, capsys):
    inputs = str(corpus["root"] / "inputs")
    assert load_tool("train_tokenizer").main([inputs, "--vocab-size", "300", "--output", str(tmp_path / "tok.json"),
                                          "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train_tokenizer: byte-level BPE, vocab 300") and str(tmp_path / "tok.json") in out
    prepare = load_tool("prepare_data")

    def args(source: str, output: str) -> list[str]:
        return [source, "--tokenizer", str(tmp_path / "tok.json"), "--seq-length", "16", "--output",
                str(tmp_path / output), "--rows-per-shard", "8", "--workers", "0", "--no-progress"]

    assert prepare.main(args(inputs, "shards")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("prepare_data: ") and "seq_length 16" in lines[0]
    assert "documents" in lines[-2] and "shards" in lines[-2]
    assert lines[-1].startswith("prepare_data: wrote") and str(tmp_path / "shards") in lines[-1]
    assert read_meta(tmp_path / "shards").documents["train"] == len(corpus["docs"])

    assert prepare.main(args(str(tmp_path / "missing.txt"), "s1")) == 2
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert prepare.main(args(str(tmp_path / "latin1.txt"), "s2")) == 2
    err = capsys.readouterr().err
    assert "latin1.txt" in err and "invalid UTF-8 at byte 3" in err


def test_tokenizer_json_with_transformers_config_names_its_eos(corpus, tmp_path):
    shutil.copy(corpus["tokenizer"].path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
    tok = load_tokenizer(tmp_path)  # a directory in transformers' save_pretrained layout
    assert tok.eos_token == "<|pad|>" and tok.eos_id == 1
    with pytest.raises(ValueError, match="'<nope>' is not in its vocabulary"):
        load_tokenizer(tmp_path / "tokenizer.json", eos_token="<nope>")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_tokenizer(tmp_path / "nothing.json")


@pytest.mark.slow
def test_held_out_split_smaller_than_the_readers_still_feeds_every_rank(corpus):
    rows = [tuple(t.tolist()) for t, _ in _stored_rows(corpus["shards"], "valid")]
    ranks = len(rows) + 5  # more data-parallel ranks than held-out rows
    firsts = []
    for rank in range(ranks):
        loader = TokenLoader(corpus["shards"], SEQ, micro_batch_size=1, dp_rank=rank, dp_world_size=ranks,
                             split="valid")
        batches = list(loader)
        assert len(batches) == 1
        firsts.append(_rows_of_batch(batches[0])[0])
    assert firsts == [rows[r % len(rows)] for r in range(ranks)]  # the row sequence, cycled


def test_skipping_every_shard_stops_instead_of_spinning(corpus, tmp_path):
    shard_dir = _copy_shards(corpus, tmp_path)
    for shard in read_meta(shard_dir).shards:
        if shard.split == "valid":
            (shard_dir / shard.name).write_bytes(b"\0" * 10)
    loader = TokenLoader(shard_dir, SEQ, micro_batch_size=1, split="valid", infinite=True,
                         skip_corrupt_shards=True)
    with pytest.raises(CorruptShardError, match="every shard of epoch 0 was skipped"):
        next(iter(loader))


def test_synthetic_rows_follow_the_affine_recurrence():
    """The closed form the synthetic stream uses equals the token-by-token recurrence, for any vocabulary."""
    from ssa_megatron.data.synthetic import affine_recurrence

    for vocab in (128256, 256, 7):
        start = torch.randint(0, vocab, (3,))
        rows = torch.empty(3, 1001, dtype=torch.long)
        rows[:, 0] = start
        for t in range(1000):
            rows[:, t + 1] = (5 * rows[:, t] + 7) % vocab
        assert torch.equal(affine_recurrence(start, 1001, a=5, c=7, modulus=vocab), rows), vocab
