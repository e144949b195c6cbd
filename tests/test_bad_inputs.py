"""Every bad input gets one line naming the input, its value and what is allowed (issue 14, item 6).

- ``ssa_attention`` and the reference: ValueError for float ``cu_seqlens``, block sizes <= 0, negative or
  infinite alpha, empty sequences, wrong dtypes (NaN/Inf *values* are the training loop's job, not checked here);
- a NaN in one document's ``v`` stays in that document (reference full/sparse, the kernels' CPU full path);
- ``ssa-train``: a bad recipe or override exits 2, missing or empty data, an unreadable checkpoint and NaN/Inf in
  training exit 1, each with one error line and one hint line; ``--debug`` and real bugs keep the traceback;
- ``tools/prepare_data.py``: empty input exits 2 with one line; ``--overwrite`` deletes only what it wrote.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssa_megatron.config import SSAConfig
from ssa_megatron.ssa import reference as R
from ssa_megatron.ssa import ssa_attention

ROOT = Path(__file__).resolve().parent.parent


def one_line(message: str, *parts: str) -> None:
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def qkv(s=32, b=1, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (torch.randn(s, b, hq, d, dtype=dtype), torch.randn(s, b, hkv, d, dtype=dtype),
            torch.randn(s, b, hkv, d, dtype=dtype))


# ------------------------------------------------------------------------------------------------ ssa_attention


def _call(*, q=None, k=None, v=None, cfg=None, gate=None, mode="sparse", training=True, **kwargs):
    dq, dk, dv = qkv()
    cfg = cfg if cfg is not None else SSAConfig(block_size=16, top_k=2)
    return ssa_attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, gate, cfg, mode,
                         training, **kwargs)


ATTENTION_CASES = {
    "float cu_seqlens": (dict(cu_seqlens=torch.tensor([0.0, 10.5, 32.0]), cfg=SSAConfig(document_mask=True)),
                         ["cu_seqlens dtype torch.float32", "torch.int32 or torch.int64"]),
    "2-D cu_seqlens": (dict(cu_seqlens=torch.tensor([[0, 32]])), ["cu_seqlens shape (1, 2)", "1-D"]),
    "float q_positions": (dict(q_positions=torch.arange(32.0)), ["q_positions dtype torch.float32", "int64"]),
    "block size 0": (dict(cfg=SSAConfig(block_size=0)), ["ssa.block_size=0", "power of two >= 16"]),
    "negative block size": (dict(cfg=SSAConfig(block_size=-16)), ["ssa.block_size=-16", "power of two >= 16"]),
    "negative alpha": (dict(cfg=SSAConfig(alpha=-1.0)), ["ssa.alpha=-1.0", "must be >= 0"]),
    "infinite alpha": (dict(cfg=SSAConfig(alpha=math.inf)), ["ssa.alpha=inf", "finite"]),
    "top_k 0": (dict(cfg=SSAConfig(top_k=0)), ["ssa.top_k=0", "at least 1 block"]),
    "T=0": (dict(q=torch.randn(0, 1, 4, 16), k=torch.randn(0, 1, 2, 16), v=torch.randn(0, 1, 2, 16)),
            ["q shape (0, 1, 4, 16)", "every dimension must be >= 1"]),
    "integer q/k/v": (dict(q=torch.ones(32, 1, 4, 16, dtype=torch.long), k=torch.ones(32, 1, 2, 16, dtype=torch.long),
                           v=torch.ones(32, 1, 2, 16, dtype=torch.long)),
                      ["q/k/v dtype int64, int64, int64", "float16, bfloat16, float32, float64"]),
    "mixed dtypes": (dict(k=torch.randn(32, 1, 2, 16, dtype=torch.bfloat16)),
                     ["q/k/v dtype float32, bfloat16, float32", "must be one dtype"]),
    "integer gate": (dict(gate=torch.ones(32, 1, 4, dtype=torch.long)), ["gate dtype int64", "floating-point"]),
    "NaN softmax_scale": (dict(softmax_scale=math.nan), ["softmax_scale=nan", "finite number > 0"]),
    "bad mode": (dict(mode="dense"), ["mode='dense'", "'full' or 'sparse'"]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_ssa_attention_refuses_bad_arguments_in_one_line(case):
    kwargs, parts = ATTENTION_CASES[case]
    with pytest.raises(ValueError) as err:
        _call(**kwargs)
    one_line(str(err.value), *parts)


@pytest.mark.parametrize("block_size", [0, -4])
def test_reference_refuses_block_sizes_below_one(block_size):
    q, k, v = qkv()
    with pytest.raises(ValueError) as err:
        R.select_blocks(q, k, block_size, 2)
    one_line(str(err.value), f"block_size={block_size}", "integer >= 1")
    with pytest.raises(ValueError) as err:
        R.sparse_attention(q, k, v, torch.zeros(1, 2, 32, 1, dtype=torch.int32), block_size)
    one_line(str(err.value), f"block_size={block_size}", "integer >= 1")


def test_reference_refuses_float_cu_seqlens():
    q, k, v = qkv()
    with pytest.raises(ValueError) as err:
        R.full_attention(q, k, v, cu_seqlens=torch.tensor([0.0, 16.0, 32.0]))
    one_line(str(err.value), "cu_seqlens dtype torch.float32", "torch.int32 or torch.int64")


def test_nan_in_inputs_is_not_checked_inside_the_attention():
    """Reading values would make every layer wait for the GPU; NaN/Inf are caught at the training boundary
    (training/health.py), so the attention passes them through."""
    q, k, v = qkv()
    q[3] = math.nan
    out, _, _ = _call(q=q, mode="full", training=False)
    assert torch.isnan(out).any()


# ----------------------------------------------------------------------------------- NaN stays in its document


def _two_documents(s=64, split=24):
    """One row, documents [0, split) and [split, s); v of the first document holds a NaN at key 5."""
    q, k, v = qkv(s=s, d=16)
    v[5, 0, 1, 3] = math.nan
    return q, k, v, torch.tensor([0, split, s], dtype=torch.int32), split


def _assert_contained(out: torch.Tensor, split: int) -> None:
    """Rows of the second document are finite; the first document's rows from key 5 on are NaN where they read it."""
    assert torch.isfinite(out[split:]).all(), "a NaN leaked into the other document"
    assert torch.isfinite(out[:5]).all(), "rows before the NaN key (causal) must not see it"
    assert torch.isnan(out[5:split, 0, 2:4, 3]).all()  # query heads 2, 3 read KV head 1, column 3
    assert torch.isfinite(out[5:split, 0, :, :3]).all(), "only the NaN's column is affected"


def test_reference_full_attention_keeps_a_nan_in_its_document():
    q, k, v, cu, split = _two_documents()
    out, lse = R.full_attention(q, k, v, cu_seqlens=cu)
    _assert_contained(out, split)
    assert torch.isfinite(lse).all()


def test_reference_sparse_attention_keeps_a_nan_in_its_document():
    q, k, v, cu, split = _two_documents()
    idx, _ = R.select_blocks(q, k, 8, 8, cu_seqlens=cu)  # budget covers every block: reads like full attention
    out, _ = R.sparse_attention(q, k, v, idx, 8)
    _assert_contained(out, split)


def test_reference_gradients_stay_in_their_document():
    q, k, v, cu, split = _two_documents()
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = R.full_attention(q, k, v, cu_seqlens=cu)
    out[split:].sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_ssa_attention_with_document_mask_keeps_a_nan_in_its_document():
    q, k, v, cu, split = _two_documents()
    cfg = SSAConfig(block_size=16, top_k=4, document_mask=True, backend="reference")
    for mode in ("full", "sparse"):
        out, _, _ = ssa_attention(q, k, v, None, cfg, mode, training=False, cu_seqlens=cu)
        assert torch.isfinite(out[split:]).all(), mode


def test_kernels_cpu_full_path_keeps_a_nan_in_its_document():
    from ssa_kernels import full as kfull

    q, k, v, cu, split = _two_documents()
    out, lse = kfull.full_attention(q, k, v, cu_seqlens=cu)  # CPU: the torch masked path
    _assert_contained(out, split)
    assert torch.isfinite(lse).all()


# -------------------------------------------------------------------------------------------------- ssa-train


TINY = ["tiny", "train.device=cpu", "train.precision=fp32", "train.progress_bar=false", "train.wandb=false"]


def _run_cli(capsys, args):
    from ssa_megatron.training import cli

    rc = cli.main(args)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines()


CONFIG_CASES = {
    "optim.lr=.nan": ["optim.lr=nan", "finite"],
    "ssa.alpha=.inf": ["ssa.alpha=inf", "finite"],
    "ssa.alpha=-1": ["ssa.alpha=-1.0", "must be >= 0"],
    "ssa.block_size=0": ["ssa.block_size=0", "power of two >= 16"],
    "optim.lr=abc": ["optim.lr='abc'", "expected a number"],
    "optim.betas=[0.9": ["override 'optim.betas=[0.9'", "not valid YAML"],
    "train.steps=1.5": ["train.steps=1.5", "expected an integer"],
}


@pytest.mark.parametrize("override", list(CONFIG_CASES))
def test_ssa_train_bad_recipe_values_exit_2_with_one_line_and_a_hint(capsys, override):
    rc, lines = _run_cli(capsys, [*TINY, override, "--print-recipe"])
    assert rc == 2
    assert len(lines) == 2 and lines[1].startswith("ssa-train: hint:"), lines
    one_line(lines[0], "ssa-train: error:", *CONFIG_CASES[override])


def test_ssa_train_reads_exponent_numbers(capsys):
    from ssa_megatron.training import cli

    assert cli.main([*TINY, "optim.lr=1e-3", "optim.min_lr=1e-5", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "min_lr: 1.0e-05" in out


def _empty_shard_set(directory: Path) -> Path:
    """A meta.json that lists no shards: what prepare_data wrote for empty input before it refused it."""
    directory.mkdir()
    meta = {"format": "ssa_megatron.packed_rows", "version": 1, "seq_length": 256, "row_tokens": 257,
            "token_dtype": "uint16", "eos_id": 0, "vocab_size": 300, "tokenizer_hash": "0" * 64,
            "documents": {"train": 0, "valid": 0}, "tokens": {"train": 0, "valid": 0},
            "rows": {"train": 0, "valid": 0}, "shards": []}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.mark.parametrize("case", ["missing directory", "missing tokenizer", "empty shard set"])
def test_ssa_train_data_errors_exit_1_naming_the_path(capsys, tmp_path, case):
    missing = tmp_path / "corpus" / "shards"  # the parent does not exist either
    if case == "missing directory":
        overrides, parts = [f"data.train_shards={missing}"], [f"data.train_shards={str(missing)!r}",
                                                               "no such file or directory"]
    elif case == "missing tokenizer":
        shards = _empty_shard_set(tmp_path / "shards")
        overrides = [f"data.train_shards={shards}", f"data.tokenizer={missing}"]
        parts = [f"data.tokenizer={str(missing)!r}", "no such file or directory"]
    else:
        shards = _empty_shard_set(tmp_path / "shards")
        overrides, parts = [f"data.train_shards={shards}"], [f"data.train_shards={str(shards)!r}", "lists no shards",
                                                             "at least one train shard"]
    rc, lines = _run_cli(capsys, [*TINY, f"train.run_dir={tmp_path / 'run'}", *overrides])
    errors = [line for line in lines if line.startswith("ssa-train")]
    assert rc == 1
    assert len(errors) == 2 and errors[1].startswith("ssa-train: hint:") and "prepare_data" in errors[1], lines
    one_line(errors[0], "ssa-train: error:", *parts)
    if case == "missing directory":
        assert f"{str(missing.parent)!r}" not in errors[0]  # the path itself, not its parent


def _raising_train(error: BaseException):
    def train(recipe, **kwargs):
        raise error
    return train


def _checkpoint_error() -> BaseException:
    try:
        from ssa_megatron.training.checkpoint import CheckpointError
    except ImportError:  # being added in parallel; a ValueError subclass
        CheckpointError = type("CheckpointError", (ValueError,), {})
    return CheckpointError("checkpoint runs/x/checkpoints/step_00000004: .metadata is truncated; no good checkpoint")


RUNTIME_CASES = {
    "NaN": (lambda: __import__("ssa_megatron.training.health", fromlist=["NonFiniteError"]).NonFiniteError(
        3, "LM loss", math.nan, 1, "first non-finite activation: mlp"),
        ["step 3: LM loss is nan (layer 1; first non-finite activation: mlp)"], "optim.lr"),
    "checkpoint": (_checkpoint_error, ["step_00000004: .metadata is truncated"], "--debug"),
    "corrupt shard": (lambda: __import__("ssa_megatron.data.shards", fromlist=["x"]).CorruptShardError(
        "shard '/d/train-000001.tar' is missing (listed in meta.json)"), ["train-000001.tar"], "--debug"),
    "multi-line message": (lambda: ValueError("first line\n  second line"), ["first line second line"], "--debug"),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_ssa_train_runtime_errors_exit_1_with_one_line_and_a_hint(capsys, monkeypatch, case):
    from ssa_megatron.training import train as train_module

    make, parts, hint = RUNTIME_CASES[case]
    monkeypatch.setattr(train_module, "train", _raising_train(make()))
    rc, lines = _run_cli(capsys, TINY)
    assert rc == 1
    assert len(lines) == 2, lines
    one_line(lines[0], "ssa-train: error:", *parts)
    assert lines[1].startswith("ssa-train: hint:") and hint in lines[1]


def test_ssa_train_debug_and_bugs_keep_the_traceback(capsys, monkeypatch):
    from ssa_megatron.training import cli
    from ssa_megatron.training import train as train_module

    monkeypatch.setattr(train_module, "train", _raising_train(ValueError("expected, but --debug")))
    with pytest.raises(ValueError, match="expected, but --debug"):
        cli.main([*TINY, "--debug"])
    with pytest.raises(ValueError, match="optim.lr=nan"):
        cli.main([*TINY, "optim.lr=.nan", "--debug"])
    monkeypatch.setattr(train_module, "train", _raising_train(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(TINY)


@pytest.mark.slow
def test_ssa_train_nan_in_training_is_one_line(capsys, tmp_path):
    """A real divergence: the health check's error reaches the console as one line and a hint, exit 1."""
    from helpers.training import TEST_OVERRIDES

    rc, lines = _run_cli(capsys, ["tiny", *TEST_OVERRIDES, f"train.run_dir={tmp_path / 'run'}", "optim.lr=1e30",
                                  "optim.grad_clip=0", "optim.warmup_steps=0", "checkpoint.interval=0",
                                  "checkpoint.save_at_end=false"])
    errors = [line for line in lines if line.startswith("ssa-train")]
    assert rc == 1, lines
    one_line(errors[0], "ssa-train: error: step ", " is nan", "layer")
    assert errors[1].startswith("ssa-train: hint:")


# ------------------------------------------------------------------------------------------------ prepare_data


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ssa_megatron.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(["alpha beta gamma delta epsilon " * 40, "the of and to in is was for on"], 300, path)
    return path


def _prepare(tokenizer, inputs, output, *extra):
    cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), *map(str, inputs), "--tokenizer", str(tokenizer),
           "--output", str(output), "--seq-length", "16", "--workers", "0", "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def _inputs(tmp_path: Path, case: str) -> Path:
    if case == "empty file":
        path = tmp_path / "empty.txt"
        path.write_text("")
    elif case == "blank file":
        path = tmp_path / "blank.txt"
        path.write_text("  \n\n")
    elif case == "directory of empty files":
        path = tmp_path / "docs"
        path.mkdir()
        (path / "a.txt").write_text("")
        (path / "b.jsonl").write_text("")
    else:  # empty directory
        path = tmp_path / "docs"
        path.mkdir()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case, parts", [
    ("empty file", ["empty.txt", "all empty", "at least one non-empty"]),
    ("blank file", ["blank.txt", "no document with text"]),
    ("directory of empty files", ["docs", "all empty", "at least one non-empty"]),
    ("empty directory", ["docs", "holds no file ending in", "--extensions"]),
])
def test_prepare_data_refuses_empty_input(tmp_path, tokenizer, case, parts):
    inputs = _inputs(tmp_path, case)
    res = _prepare(tokenizer, [inputs], tmp_path / "out")
    assert res.returncode == 2, res.stdout + res.stderr
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 1
    one_line(errors[0], "prepare_data: error:", *parts)
    assert not (tmp_path / "out").exists(), "nothing is written for empty input"


@pytest.mark.slow
@pytest.mark.parametrize("flag, value", [("--shard-mb", "nan"), ("--max-mb", "0"), ("--rows-per-shard", "0")])
def test_prepare_data_refuses_bad_sizes(tmp_path, tokenizer, flag, value):
    (tmp_path / "doc.txt").write_text("alpha beta")
    res = _prepare(tokenizer, [tmp_path / "doc.txt"], tmp_path / "out", flag, value)
    assert res.returncode == 2
    one_line(res.stderr.strip().splitlines()[-1], f"{flag} {value}", "must be")


def test_prepare_data_overwrite_deletes_only_what_it_wrote(tmp_path, tokenizer):
    from ssa_megatron.data.prepare import prepare_shards
    from ssa_megatron.data.shards import read_meta

    (tmp_path / "doc.txt").write_text(" ".join(["alpha beta gamma delta the of and"] * 60))
    out = tmp_path / "out"
    out.mkdir()
    theirs = {"mine.tar": "user data", "notes.tmp.txt": "user notes", "train-extra.tar": "user shard"}
    for name, text in theirs.items():
        (out / name).write_text(text)
    kwargs = dict(rows_per_shard=2, workers=0, progress=False, log=lambda s: None)
    first = prepare_shards([tmp_path / "doc.txt"], out, tokenizer, 16, **kwargs)
    assert sum(first.shards.values()) > 3
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        prepare_shards([tmp_path / "doc.txt"], out, tokenizer, 8, **kwargs)
    # A shard-named file prepare_data did not write: refused before anything is deleted.
    (out / "train-000999.tar").write_text("not ours")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError) as err:
        prepare_shards([tmp_path / "doc.txt"], out, tokenizer, 8, overwrite=True, **kwargs)
    one_line(str(err.value), "train-000999.tar", "did not write", "--overwrite deletes only files")
    assert sorted(p.name for p in out.iterdir()) == before
    (out / "train-000999.tar").unlink()
    # --overwrite with the copied tokenizer as the tokenizer: replaces the shards, keeps everything else.
    second = prepare_shards([tmp_path / "doc.txt"], out, out / "tokenizer.json", 8, overwrite=True, **kwargs)
    meta = read_meta(out)
    assert meta.seq_length == 8 and sum(second.shards.values()) == len(meta.shards)
    for name, text in theirs.items():
        assert (out / name).read_text() == text, f"{name} was not written by prepare_data and must survive"
    ours = {p.name for p in out.glob("*-*.tar")} - set(theirs)
    assert ours == {s.name for s in meta.shards}, "stale shards of the first preparation are gone"


def test_prepare_data_resume_leaves_foreign_files(tmp_path, tokenizer):
    """An interrupted run's unrecorded shards are deleted on resume; files it did not write are not."""
    from ssa_megatron.data.prepare import prepare_shards

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(" ".join(["alpha beta gamma delta the of and"] * (20 + i)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.tmp-1").write_text("user")
    kwargs = dict(rows_per_shard=2, workers=0, progress=False, log=lambda s: None, unit_mb=0.0001)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([docs], out, tokenizer, 16, _interrupt_after_units=5, **kwargs)
    prepare_shards([docs], out, tokenizer, 16, **kwargs)
    assert (out / "x.tmp-1").read_text() == "user"
    shutil.rmtree(out)
