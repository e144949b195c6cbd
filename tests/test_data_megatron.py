"""Megatron .bin/.idx data (data.format: megatron): writing it, blends, held-out splits, data-parallel slices, exact
resume, and training on it. Corpora are made in the test, through prepare_data --format megatron and through
megatron-core's IndexedDatasetBuilder directly."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.training import run_training, tiny_test_recipe
from ssa_megatron.config import DataConfig
from ssa_megatron.data.from_config import build_loaders, data_format
from ssa_megatron.data.megatron_indexed import IndexedDataError, looks_indexed, parse_blend, prepare_indexed
from ssa_megatron.data.prepare import is_held_out
from ssa_megatron.data.tokenizer import load_tokenizer, train_bpe

SEQ = 64  # the tiny test recipe's model.seq_length
VOCAB = 300
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 12, 40, 90]))) + "."
            for i in range(count)]


def _write_indexed(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> None:
    """One sequence and one document per entry, as Megatron-LM's preprocess_data writes them."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")


def _marked_docs(count: int, low: int, high: int, eos: int, seed: int) -> list[list[int]]:
    """Documents whose ids lie in [low, high) (so a sample's corpus is recognisable), each ending in EOS."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, int(rng.integers(5, 120))).tolist() + [eos] for _ in range(count)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """``text``: prepare_data --format megatron output (10 % held out); ``a`` and ``b``: prefixes written with
    IndexedDatasetBuilder whose ids are < 100 (a) and in [100, 200) (b), with the same tokenizer beside them."""
    root = tmp_path_factory.mktemp("megatron")
    docs = _documents(300, seed=0)
    (root / "inputs").mkdir()
    with open(root / "inputs" / "a.jsonl", "w") as handle:
        for doc in docs:
            handle.write(json.dumps({"text": doc}) + "\n")
    tokenizer = train_bpe(docs, VOCAB, root / "tokenizer.json")
    prepare_indexed([root / "inputs"], root / "text", tokenizer, valid_fraction=0.1, workers=0, unit_mb=0.004,
                    part_mb=0.01, progress=False, log=lambda line: None)
    eos = load_tokenizer(tokenizer).eos_id
    for name, low, high, seed in (("a", 1, 100, 1), ("b", 100, 200, 2)):
        (root / name).mkdir()
        _write_indexed(root / name / "corpus", _marked_docs(400, low, high, eos, seed))
        shutil.copyfile(tokenizer, root / name / "tokenizer.json")
    return {"root": root, "docs": docs, "tokenizer": load_tokenizer(tokenizer), "eos": eos}


def _recipe(tmp_path, *overrides):
    return tiny_test_recipe(tmp_path / "run", f"model.vocab_size={VOCAB + 20}", "data.num_workers=0",
                            f"data.cache_dir={tmp_path / 'cache'}", *overrides)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


# ------------------------------------------------------------------------------------------------------------
# Writing

def test_prepare_megatron_holds_every_document_once_with_eos(corpora):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, out = corpora["tokenizer"], corpora["root"] / "text"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["format"] == "megatron" and meta["tokenizer_hash"] == tok.hash and meta["token_dtype"] == "uint16"
    assert (out / "tokenizer.json").is_file() and not (out / ".indexed_parts").exists()
    for split, held in (("train", False), ("valid", True)):
        want = [ids + [tok.eos_id] for doc, ids in zip(corpora["docs"], tok.encode_batch(corpora["docs"]))
                if is_held_out(doc, 0.1) == held]
        data = IndexedDataset(str(out / split))
        assert len(data) == len(want) == meta["documents"][split] > 0
        assert [data[i].tolist() for i in range(len(data))] == want  # input order, one EOS each


@pytest.mark.slow
def test_prepare_megatron_resumes_to_the_same_bytes_and_cli(corpora, tmp_path, capsys):
    root = corpora["root"]
    kwargs = dict(valid_fraction=0.1, workers=0, unit_mb=0.004, part_mb=0.01, progress=False, log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        prepare_indexed([root / "inputs"], tmp_path / "out", root / "tokenizer.json", _interrupt_after_units=7,
                        **kwargs)
    summary = prepare_indexed([root / "inputs"], tmp_path / "out", root / "tokenizer.json", **kwargs)
    assert summary.resumed_units > 0
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (tmp_path / "out" / name).read_bytes() == (root / "text" / name).read_bytes(), name

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import prepare_data

    assert prepare_data.main([str(root / "inputs"), "--tokenizer", str(root / "tokenizer.json"), "--format",
                              "megatron", "--output", str(tmp_path / "cli"), "--valid-fraction", "0.1",
                              "--workers", "0", "--no-progress"]) == 0
    assert "wrote train.bin/.idx + valid.bin/.idx" in capsys.readouterr().out
    assert (tmp_path / "cli" / "train.bin").read_bytes() == (root / "text" / "train.bin").read_bytes()
    with pytest.raises(SystemExit):
        prepare_data.parse_args([str(root / "inputs"), "--tokenizer", "t.json", "--format", "megatron", "-o", "x",
                                 "--seq-length", "64"])


# ------------------------------------------------------------------------------------------------------------
# Blends and settings

def test_blend_strings_and_their_errors_name_the_key(corpora, tmp_path):
    root = corpora["root"]
    assert parse_blend("k", "0.7 /a 0.3 /b") == [(0.7, "/a"), (0.3, "/b")]
    assert parse_blend("k", "/a /b") == [(None, "/a"), (None, "/b")]
    for bad, words in (("0.7 /a 0.3", "a weight before every prefix"), ("/a 0.3", "a weight before every"),
                       ("0 /a 1 /b", "must be a number > 0"), ("nan /a", "must be a number > 0"), ("", "empty")):
        with pytest.raises(IndexedDataError, match=words) as err:
            parse_blend("data.train_shards", bad)
        assert str(err.value).startswith("data.train_shards=")
    assert looks_indexed(str(root / "text")) and looks_indexed(str(root / "a" / "corpus"))
    assert looks_indexed("0.5 /x 0.5 /y") and not looks_indexed("builtin:stdlib")
    assert data_format(DataConfig(train_shards=str(root / "text"))) == "megatron"
    assert data_format(DataConfig(train_shards=str(root / "text"), format="webdataset")) == "webdataset"
    with pytest.raises(ValueError, match="data.split"):
        data_format(DataConfig(train_shards="builtin:stdlib", split="98,2,0"))
    with pytest.raises(ValueError, match="data.split='98'"):
        DataConfig(split="98").validate()

    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*missing.bin.*not found"):
        build_loaders(_recipe(tmp_path, f"data.train_shards=0.5 {root / 'a' / 'corpus'} 0.5 {root / 'missing'}"))
    with pytest.raises(ValueError, match="set one"):
        build_loaders(_recipe(tmp_path, f"data.train_shards={root / 'text'}", "data.split=9,1",
                              f"data.valid_shards={root / 'text'}"))
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        build_loaders(_recipe(tmp_path, f"data.train_shards={root / 'text'}", "model.vocab_size=256"))
    # What megatron-core would hang or overflow on: an empty split, and too many epochs of a tiny corpus.
    corpus = root / "a" / "corpus"
    with pytest.raises(IndexedDataError, match=r"data.split=1000,1, valid share\) has no valid tokens \(0 documents\)"):
        build_loaders(_recipe(tmp_path, f"data.train_shards={corpus}", "data.split=1000,1"))
    with pytest.raises(IndexedDataError, match="int32 document index"):
        build_loaders(_recipe(tmp_path, f"data.train_shards={corpus}", "train.steps=2000000000"))


def test_tokenizer_is_found_beside_the_data_or_the_error_names_the_key(corpora, tmp_path):
    root = corpora["root"]
    _write_indexed(tmp_path / "bare", _marked_docs(50, 1, 100, corpora["eos"], 3))
    with pytest.raises(IndexedDataError, match=r"data.tokenizer is unset .* set data.tokenizer="):
        build_loaders(_recipe(tmp_path, f"data.train_shards={tmp_path / 'bare'}"))
    setup = build_loaders(_recipe(tmp_path, f"data.train_shards={tmp_path / 'bare'}",
                                  f"data.tokenizer={root / 'tokenizer.json'}"))
    assert setup.tokenizer_path == root / "tokenizer.json" and setup.valid is None
    assert build_loaders(_recipe(tmp_path, f"data.train_shards={root / 'text'}")).tokenizer_path == \
        root / "text" / "tokenizer.json"
    other = train_bpe(corpora["docs"][:50], VOCAB - 10, tmp_path / "other.json")
    with pytest.raises(IndexedDataError, match="another tokenizer"):
        build_loaders(_recipe(tmp_path, f"data.train_shards={root / 'text'}", f"data.tokenizer={other}"))


@pytest.mark.parametrize("name", ["125m", "ssa_1b", "ssa_7b"])
def test_recipes_leave_the_tokenizer_to_the_data(name):
    from ssa_megatron.config import load_recipe

    assert load_recipe(name).data.tokenizer is None


# ------------------------------------------------------------------------------------------------------------
# Samples

def test_batches_have_the_training_layout_and_document_boundaries(corpora, tmp_path):
    setup = build_loaders(_recipe(tmp_path, f"data.train_shards={corpora['root'] / 'a' / 'corpus'}"))
    eos = corpora["eos"]
    for batch in _take(setup.train, 8):
        b, s = batch["tokens"].shape
        assert (b, s) == (2, SEQ) and batch["labels"].shape == (b, s)
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
        assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s and bool((cu[1:] > cu[:-1]).all())
        flat_tokens, flat_pos = batch["tokens"].reshape(-1), batch["position_ids"].reshape(-1)
        starts = set(cu[:-1].tolist())
        assert all(r * s in starts for r in range(b))  # every row starts a segment
        for i in range(b * s):  # documents start right after an EOS, and positions restart there
            new_doc = i % s == 0 or flat_tokens[i - 1] == eos
            assert (i in starts) == new_doc and (flat_pos[i] == 0) == new_doc


def test_blend_follows_its_weights_and_is_deterministic(corpora, tmp_path):
    root = corpora["root"]
    blend = f"data.train_shards=0.7 {root / 'a' / 'corpus'} 0.3 {root / 'b' / 'corpus'}"
    recipe = _recipe(tmp_path, blend, "train.steps=100")  # 400 samples
    batches = _take(build_loaders(recipe).train, 200)
    from_a = [bool((row[row != corpora["eos"]] < 100).all()) for b in batches for row in b["tokens"]]
    from_b = [bool((row[row != corpora["eos"]] >= 100).all()) for b in batches for row in b["tokens"]]
    mixed = sum(1 for x, y in zip(from_a, from_b) if not x and not y)
    assert mixed == 0  # a sample comes from one corpus
    assert abs(sum(from_a) / len(from_a) - 0.7) < 0.03
    _same(batches[:20], _take(build_loaders(recipe).train, 20))  # rebuilt from Megatron's cache: same order
    other = _take(build_loaders(_recipe(tmp_path, blend, "train.steps=100", "data.seed=7")).train, 5)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(batches, other))
    swapped = _take(build_loaders(_recipe(tmp_path, f"data.train_shards=0.2 {root / 'a' / 'corpus'} "
                                                    f"0.8 {root / 'b' / 'corpus'}", "train.steps=100")).train, 100)
    share = np.mean([bool((row[row != corpora["eos"]] < 100).all()) for b in swapped for row in b["tokens"]])
    assert abs(share - 0.2) < 0.04


def test_held_out_data_three_ways(corpora, tmp_path):
    root = corpora["root"]
    # 1. the valid prefix beside prepare_data's train prefix: documents chosen by content hash
    setup = build_loaders(_recipe(tmp_path, f"data.train_shards={root / 'text'}"))
    assert setup.valid is not None
    first = _take(setup.valid, 3)
    _take(setup.valid, 20)
    setup.valid.load_state_dict(setup.valid.loader.state_dict() | {"consumed_batches": 0})
    _same(first, _take(setup.valid, 3))  # the evaluation replays the same batches
    # 2. Megatron's split string: the last 20 % of each prefix's documents (320..399 of 400) are held out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = root / "a" / "corpus"
    docs = IndexedDataset(str(corpus))
    text = [bytes(docs[i].tolist()) for i in range(len(docs))]  # ids < 256: one byte each
    split = build_loaders(_recipe(tmp_path, f"data.train_shards={corpus}", "data.split=80,20,0"))
    for stream, mine, other in ((split.train, text[:320], text[320:]), (split.valid, text[320:], text[:320])):
        for batch in _take(stream, 10):
            for row in batch["tokens"]:
                for piece in bytes(row.tolist()).split(bytes([corpora["eos"]])):
                    assert any(piece in doc for doc in mine)  # every piece of a sample is from its split
                    if len(piece) >= 8:
                        assert not any(piece in doc for doc in other)
    # 3. a separate held-out blend
    other = build_loaders(_recipe(tmp_path, f"data.train_shards={corpus}",
                                  f"data.valid_shards={root / 'b' / 'corpus'}"))
    assert all(bool((b["tokens"][b["tokens"] != corpora["eos"]] >= 100).all()) for b in _take(other.valid, 5))


# ------------------------------------------------------------------------------------------------------------
# Data parallelism and resumption

def test_two_data_parallel_ranks_read_disjoint_halves_of_the_global_order(corpora, tmp_path):
    blend = f"data.train_shards=0.5 {corpora['root'] / 'a' / 'corpus'} 0.5 {corpora['root'] / 'b' / 'corpus'}"
    recipe = _recipe(tmp_path, blend)
    single = _take(build_loaders(recipe, 0, 1).train, 12)
    ranks = [_take(build_loaders(recipe, r, 2).train, 6) for r in range(2)]
    rows = [[tuple(x.tolist()) for b in batches for x in b["tokens"]] for batches in ranks]
    assert not set(rows[0]) & set(rows[1])
    for k in range(6):  # micro-batch round k of the two ranks = micro-batches 2k, 2k+1 of one rank
        _same([ranks[0][k], ranks[1][k]], single[2 * k: 2 * k + 2])


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_yields_exactly_the_uninterrupted_batches(corpora, tmp_path, num_workers):
    root = corpora["root"]
    # train.steps=6 x global batch 4 = 24 samples per pass, so 40 micro-batches of 2 cross three passes.
    overrides = [f"data.train_shards=0.6 {root / 'a' / 'corpus'} 0.4 {root / 'text'}",
                 f"data.num_workers={num_workers}"]
    stream = build_loaders(_recipe(tmp_path, *overrides)).train
    reference = _take(stream, 40)
    n = stream.loader.pass_samples  # 25: Megatron's blend rounds each corpus's share up
    rows = [tuple(r.tolist()) for b in reference for r in b["tokens"]]
    assert sorted(rows[:n]) == sorted(rows[n:2 * n]) and rows[:n] != rows[n:2 * n]  # a pass, then reshuffled
    for stop in (5, 12, 23):
        first = build_loaders(_recipe(tmp_path, *overrides)).train
        head = _take(first, stop)
        state = first.state_dict()
        resumed = build_loaders(_recipe(tmp_path, *overrides)).train
        resumed.load_state_dict(state)
        _same(head + _take(resumed, 40 - stop), reference)
    # A resume with more train.steps keeps the saved order (the dataset is rebuilt at the saved size).
    longer = build_loaders(_recipe(tmp_path, *overrides, "train.steps=50")).train
    longer.load_state_dict(state)
    _same(_take(longer, 40 - 23), reference[23:])
    with pytest.raises(ValueError, match="micro_batch_size"):
        build_loaders(_recipe(tmp_path, *overrides, "train.micro_batch_size=1")).train.load_state_dict(state)


def _dp_batches(rank, world_size, recipe_overrides, tmp_dir, out):
    from helpers.training import tiny_test_recipe

    recipe = tiny_test_recipe(Path(tmp_dir) / "run", *recipe_overrides)
    batches = _take(build_loaders(recipe, rank, world_size, log=lambda s: None).train, 4)
    torch.save(batches, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_under_torch_distributed_build_once_and_split_the_data(corpora, tmp_path):
    """Megatron's builder under a process group: rank 0 builds the index cache, rank 1 reads it."""
    from helpers.megatron import spawn_gloo

    overrides = [f"model.vocab_size={VOCAB + 20}", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.train_shards=0.5 {corpora['root'] / 'a' / 'corpus'} 0.5 {corpora['root'] / 'text'}"]
    spawn_gloo(_dp_batches, 2, overrides, str(tmp_path), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _take(build_loaders(tiny_test_recipe(tmp_path / "run", *overrides), 0, 1).train, 8)
    for k in range(4):
        _same([ranks[0][k], ranks[1][k]], single[2 * k: 2 * k + 2])


# ------------------------------------------------------------------------------------------------------------
# Training

@pytest.mark.slow
def test_tiny_recipe_trains_on_a_blend_and_resumes_exactly(corpora, tmp_path):
    root = corpora["root"]
    overrides = [f"model.vocab_size={VOCAB + 20}", "data.num_workers=1", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.train_shards=0.5 {root / 'text'} 0.5 {root / 'a' / 'corpus'}", "ssa.document_mask=true",
                 "train.steps=6", "checkpoint.interval=3", "train.eval_interval=3", "train.eval_batches=2"]
    full = run_training(tiny_test_recipe(tmp_path / "full", *overrides))
    first = run_training(tiny_test_recipe(tmp_path / "split", *overrides), max_steps=3)
    second = run_training(tiny_test_recipe(tmp_path / "split", *overrides))
    assert (first.end_step, second.start_step, second.end_step) == (3, 3, 6)
    assert first.losses + second.losses == full.losses  # bitwise: the resumed run read the same batches
    assert full.losses[-1] < full.losses[0] and "eval/ppl_full" in full.eval


@pytest.mark.slow
def test_a_process_exits_while_its_stream_still_has_workers(corpora, tmp_path):
    """multiprocessing's exit handler SIGTERMs DataLoader workers, which ignore it; the stream stops them first."""
    import subprocess

    script = tmp_path / "keep_open.py"
    script.write_text(
        "import sys\nsys.path.insert(0, sys.argv[1])\nfrom helpers.training import tiny_test_recipe\n"
        "from ssa_megatron.data.from_config import build_loaders\n"
        f"recipe = tiny_test_recipe({str(tmp_path / 'run')!r}, 'model.vocab_size={VOCAB + 20}', "
        f"'data.num_workers=2', 'data.cache_dir={tmp_path / 'cache'}', "
        f"'data.train_shards={corpora['root'] / 'text'}')\n"
        "stream = build_loaders(recipe, log=lambda s: None).train\nnext(stream)\nprint('ok')\n")
    done = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
