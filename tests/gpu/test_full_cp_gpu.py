"""The full branch under context parallelism on a GPU: the cuDNN split path for zigzag query runs
(``ssa_kernels.full._split_attention``) vs varlen FlashAttention-2 (``full._flash_varlen``, the path it replaces
and falls back to) and the float64 reference, in bf16, also with the diagonal pieces computed first from the
rank's own K/V (``full_attention_diagonal``, the order of context parallelism's overlapped exchange); and both
timed at 32k, cp 2, for rank 0's and rank 1's queries (run with ``-s`` to see the times). Skipped without CUDA."""

import statistics

import pytest
import torch

from helpers.numerics import rel_err

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from ssa_kernels import full as kfull
    from ssa_megatron.megatron.context_parallel import zigzag_positions
    from ssa_megatron.ssa import reference as R

DEV = "cuda"


def _cp_inputs(t, cp, rank, b, hq, hkv, d):
    """One CP rank's queries ``[2C, b, HQ, D]`` and the gathered K/V as halves of one ``[T, b, HKV, 2D]`` tensor
    (the CP exchange's layout), bf16, with their zigzag positions."""
    pos = zigzag_positions(t // cp, cp, rank, DEV)
    q = torch.randn(t // cp, b, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(t, b, hkv, 2 * d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    return pos, q, kv


def _split(q, kv, pos):
    """``full_attention`` as the CP layer calls it; asserts it took the cuDNN split path."""
    if kfull._fa_varlen is not None:
        pytest.skip("flash-attn is installed: full_attention sends query subsets to its varlen kernel")
    d = q.shape[-1]
    res = kfull.full_attention(q, kv[..., :d], kv[..., d:], None, pos)
    assert kfull._CUDNN_SPLIT_OK is True, "cuDNN declined the split path's pieces (see the warning)"
    return res


def _fa2(q, kv, pos):
    d = q.shape[-1]
    return kfull._flash_varlen(q, kv[..., :d], kv[..., d:], None, pos.int(), d ** -0.5, q_positions=pos,
                               cached=True)


def _with_grads(fn, q, kv, pos, do):
    out, lse = fn(q, kv, pos)
    return (out, lse) + torch.autograd.grad(out, (q, kv), do)


# t, cp, b, hq, hkv, d: C = t / (2 cp) tokens per chunk, none a power of two but the first
CASES = [(4096, 2, 1, 32, 2, 64), (3000, 2, 2, 16, 4, 128), (4104, 3, 1, 32, 2, 64), (3000, 3, 1, 8, 8, 128)]


@pytest.mark.parametrize("case", CASES)
def test_split_path_bf16_vs_fa2_and_float64(case):
    t, cp, b, hq, hkv, d = case
    for rank in range(cp):
        pos, q, kv = _cp_inputs(t, cp, rank, b, hq, hkv, d)
        do = torch.randn(t // cp, b, hq, d, device=DEV, dtype=torch.bfloat16)
        new = _with_grads(_split, q, kv, pos, do)
        fa2 = _with_grads(_fa2, q, kv, pos, do)
        qd, kvd = (x.detach().double().requires_grad_() for x in (q, kv))
        ro, rl = R.full_attention(qd, kvd[..., :d], kvd[..., d:], None, pos)
        ref = (ro, rl) + torch.autograd.grad(ro, (qd, kvd), do.double())
        for name, a, f, r in zip(("out", "lse", "dq", "dkv"), new, fa2, ref):
            e_new, e_fa2 = rel_err(a, r), rel_err(f, r)
            print(f"t={t} cp={cp} rank={rank} {name}: split {e_new:.2e}, FA2 varlen {e_fa2:.2e} (vs float64)")
            assert torch.isfinite(a).all(), name
            assert e_new < 1e-2 and rel_err(a, f) < 1e-2, f"{name}: split {e_new}, vs FA2 {rel_err(a, f)}"
            assert e_new <= 2 * e_fa2 + 1e-3, f"{name}: split {e_new} vs FA2 varlen {e_fa2}"


@pytest.mark.parametrize("case", CASES)
def test_diagonal_from_own_keys_matches_split(case):
    """The context-parallel order in bf16 on cuDNN: the diagonal pieces from the rank's own K/V (Megatron's
    strided views), then the prefix pieces on the gathered K/V, against the split path on the gathered K/V alone
    (the same pieces on the same values) and the float64 reference."""
    from ssa_megatron.megatron.context_parallel import split_zigzag

    t, cp, b, hq, hkv, d = case
    for rank in range(cp):
        pos, q, kv = _cp_inputs(t, cp, rank, b, hq, hkv, d)
        do = torch.randn(t // cp, b, hq, d, device=DEV, dtype=torch.bfloat16)
        own = split_zigzag(kv, cp, rank)
        diag = kfull.full_attention_diagonal(q, own[..., :d], own[..., d:], None, pos)
        assert diag is not None, "the split path did not apply to the own keys"
        out, lse = kfull.full_attention(q, kv[..., :d], kv[..., d:], None, pos, diagonal=diag)
        new = (out, lse) + torch.autograd.grad(out, (q, kv), do)
        split = _with_grads(_split, q, kv, pos, do)
        qd, kvd = (x.detach().double().requires_grad_() for x in (q, kv))
        ro, rl = R.full_attention(qd, kvd[..., :d], kvd[..., d:], None, pos)
        ref = (ro, rl) + torch.autograd.grad(ro, (qd, kvd), do.double())
        for name, a, s_, r in zip(("out", "lse", "dq", "dkv"), new, split, ref):
            print(f"t={t} cp={cp} rank={rank} {name}: own-keys path vs split {rel_err(a, s_):.2e}, "
                  f"vs float64 {rel_err(a, r):.2e}")
            assert rel_err(a, s_) < 1e-3 and rel_err(a, r) < 1e-2, name


def _time_ms(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def test_split_path_timing_32k_cp2():
    """T 32768, 32/2/64 (ssa_1b), cp 2: each rank's 16384 queries, split (cuDNN) vs varlen FA2, forward and
    forward + backward; the 32k dense cuDNN call (all queries) as the anchor (docs/benchmarks.md: 9.7 / 36 ms).
    Asserts the two paths agree at this size; the times are printed."""
    t, cp, hq, hkv, d = 32768, 2, 32, 2, 64
    qa = torch.randn(t, 1, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    kva = torch.randn(t, 1, hkv, 2 * d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dense = lambda *_: kfull.full_attention(qa, kva[..., :d], kva[..., d:])  # noqa: E731
    doa = torch.randn_like(qa)
    f = _time_ms(lambda: dense())
    fb = _time_ms(lambda: torch.autograd.grad(dense()[0], (qa, kva), doa))
    print(f"\ndense cuDNN, all {t} queries: fwd {f:.2f} ms, fwd+bwd {fb:.2f} ms")
    for rank in range(cp):
        pos, q, kv = _cp_inputs(t, cp, rank, 1, hq, hkv, d)
        do = torch.randn(t // cp, 1, hq, d, device=DEV, dtype=torch.bfloat16)
        new, fa2 = _with_grads(_split, q, kv, pos, do), _with_grads(_fa2, q, kv, pos, do)
        for name, a, b in zip(("out", "lse", "dq", "dkv"), new, fa2):
            assert rel_err(a, b) < 1e-2, f"rank {rank} {name}: split vs FA2 varlen {rel_err(a, b)}"
        times = {}
        for label, fn in (("split", _split), ("fa2", _fa2)):
            times[label] = (_time_ms(lambda: fn(q, kv, pos)),
                            _time_ms(lambda: torch.autograd.grad(fn(q, kv, pos)[0], (q, kv), do)))
        (sf, sfb), (ff, ffb) = times["split"], times["fa2"]
        print(f"cp {cp} rank {rank}, {t // cp} queries, {hq}/{hkv}/{d}: split (cuDNN) fwd {sf:.2f} ms, "
              f"fwd+bwd {sfb:.2f} ms | varlen FA2 fwd {ff:.2f} ms, fwd+bwd {ffb:.2f} ms | "
              f"speed-up fwd {ff / sf:.2f}x, fwd+bwd {ffb / sfb:.2f}x")
