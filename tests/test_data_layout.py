"""The padded row layout (tools/prepare_data.py --layout padded, the authors' preprocessing): rows equal a
brute-force version of the rule, the padding never counts in the LM loss, and preparation writes and resumes it."""

import numpy as np
import pytest
import torch

from ssa_megatron.data.packing import PaddedRowPacker, RowPacker, batch_from_rows

PAD = 0


def brute_force_padded(docs: list[np.ndarray], row_tokens: int) -> list[tuple[list[int], int]]:
    """(row tokens, real length) per row: whole documents while they fit, else pad and start a new row; a document
    longer than a row starts a row and runs on across rows."""
    rows, current = [], []
    for doc in docs:
        doc = list(doc)
        if current and len(current) + len(doc) > row_tokens:
            rows.append(current)
            current = []
        while len(current) + len(doc) > row_tokens:  # only an empty row gets here: cut the long document
            take = row_tokens - len(current)
            rows.append(current + doc[:take])
            current, doc = [], doc[take:]
        current = current + doc
    if current:
        rows.append(current)
    return [(r + [PAD] * (row_tokens - len(r)), len(r)) for r in rows]


def _docs(seed: int, n: int, row_tokens: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * row_tokens + 3, size=n)
    start = 1
    docs = []
    for length in lengths:  # distinct, non-pad token values so any misplacement shows
        docs.append(np.arange(start, start + length) % 60000 + 1)
        start += length
    return docs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("row_tokens", [9, 17])
def test_padded_rows_equal_the_brute_force_rule(seed, row_tokens):
    docs = _docs(seed, 30, row_tokens)
    packer = PaddedRowPacker(row_tokens, np.dtype(np.uint16), pad_id=PAD)
    rows, bounds = [], []
    for chunk in (docs[:7], docs[7:19], docs[19:]):  # several add() calls, rows taken in between
        packer.add(np.concatenate(chunk), np.array([len(d) for d in chunk]))
        taken = packer.take_rows(packer.full_rows() // 2)
        rows += list(taken.tokens)
        bounds += taken.bounds
    tail = packer.take_padded_tail(PAD)
    rows += list(tail.tokens)
    bounds += tail.bounds
    expected = brute_force_padded(docs, row_tokens)
    assert len(rows) == len(expected)
    for row, b, (want, real) in zip(rows, bounds, expected):
        assert row.tolist() == want
        assert int(b[-1]) == real and b[0] == 0 and np.all(np.diff(b) > 0)
    # Document starts inside rows are the bounds: the first token of every document that starts mid-row.
    starts = {int(d[0]) for d in docs}
    for row, b in zip(rows, bounds):
        assert {int(row[i]) for i in b[1:-1]} <= starts


def test_padding_is_excluded_from_the_lm_loss():
    """batch_from_rows masks every padded label, and the training loss (training/step.loss_func) is the mean over the
    real labels only: garbage losses at padded positions do not change it."""
    from ssa_megatron.training.step import loss_func

    row_tokens, seq = 17, 16
    packer = PaddedRowPacker(row_tokens, np.dtype(np.uint16), pad_id=PAD)
    docs = [np.arange(1, 11), np.arange(20, 30), np.arange(40, 44)]  # 10 fits, 10 does not fit after it: padding
    packer.add(np.concatenate(docs), np.array([len(d) for d in docs]))
    rows = packer.take_padded_tail(PAD)
    batch = batch_from_rows(rows.tokens, rows.bounds, seq)
    real = [int(b[-1]) for b in rows.bounds]
    assert real == [10, 14]
    for r, n in enumerate(real):
        assert batch["loss_mask"][r].tolist() == [1.0] * (n - 1) + [0.0] * (seq - n + 1)
        assert (batch["labels"][r][n - 1:] == PAD).all()  # every masked label is padding
    per_token = torch.rand(2, seq)
    garbage = per_token.clone()
    garbage[batch["loss_mask"] == 0] = 1e6
    mean, report = loss_func(batch["loss_mask"], per_token)
    assert torch.equal(loss_func(batch["loss_mask"], garbage)[0], mean)
    assert report["tokens"] == sum(n - 1 for n in real)
    assert mean == pytest.approx(float(per_token[batch["loss_mask"] > 0].mean()))


def test_packed_layout_is_unchanged_by_the_padded_one():
    docs = _docs(1, 20, 9)
    flat, lengths = np.concatenate(docs), np.array([len(d) for d in docs])
    packed = RowPacker(9, np.dtype(np.uint16))
    packed.add(flat, lengths)
    rows = packed.take_padded_tail(PAD)
    assert rows.tokens.reshape(-1)[: len(flat)].tolist() == (flat.astype(np.uint16)).tolist()


def test_prepare_padded_shards_and_resume(tmp_path):
    """prepare_shards(layout='padded') writes the layout (meta.json says which), the loader's loss_mask covers
    exactly the real labels, and an interrupted preparation resumes to identical shards."""
    from ssa_megatron.data.loader import TokenLoader
    from ssa_megatron.data.prepare import prepare_shards
    from ssa_megatron.data.shards import read_meta
    from ssa_megatron.data.tokenizer import train_bpe

    inputs = tmp_path / "docs"
    inputs.mkdir()
    for i in range(24):
        (inputs / f"d{i:02d}.txt").write_text(" ".join(f"word{(i * 13 + j) % 97}" for j in range(5 + 9 * (i % 7))))
    tok = train_bpe([str(p) for p in sorted(inputs.iterdir())], vocab_size=300, output_path=tmp_path / "tok.json")
    kw = dict(rows_per_shard=4, workers=0, unit_mb=0.0002, progress=False, log=lambda _: None, layout="padded")
    whole = prepare_shards([inputs], tmp_path / "whole", tok, 32, **kw)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([inputs], tmp_path / "resumed", tok, 32, _interrupt_after_units=3, **kw)
    resumed = prepare_shards([inputs], tmp_path / "resumed", tok, 32, **kw)
    assert resumed.resumed_units > 0 and resumed.rows == whole.rows
    for name in sorted(p.name for p in (tmp_path / "whole").glob("*.tar")):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    meta = read_meta(tmp_path / "whole")
    assert meta.extra["layout"] == "padded"
    real_labels, rows, padded = 0, 0, 0
    for batch in TokenLoader(str(tmp_path / "whole"), seq_length=32, micro_batch_size=2, split="train",
                             shuffle=False, infinite=False, num_workers=0):
        real_labels += int(batch["loss_mask"].sum())
        rows += batch["tokens"].shape[0]
        padded += int((batch["loss_mask"] == 0).any(dim=1).sum())
    assert rows == whole.rows["train"] and padded > 0
    # Every real token but each row's first is a label: the masked labels are exactly the padding.
    assert real_labels == whole.tokens["train"] - rows
    with pytest.raises(ValueError, match="layout='stacked': must be one of packed, padded"):
        prepare_shards([inputs], tmp_path / "bad", tok, 32, **{**kw, "layout": "stacked"})
