"""ssa_kernels.cross_entropy_loss (the LM loss kernel) through the Triton interpreter, fp32 and fp16 logits: against
torch's cross entropy in float64 and against Megatron's vocab_parallel_cross_entropy, alone and split by vocabulary
over 2 gloo ranks. Shapes: rows that are no multiple of anything, a vocabulary of 3 column blocks (4096 a block)
with a remainder, targets at the edges of each rank's range and outside the vocabulary."""

import pytest
import torch
import torch.nn.functional as F

from helpers.megatron import init_megatron, spawn_gloo
from helpers.numerics import rel_err

ROWS, VOCAB = 37, 9000
TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-6, 2e-3)}  # (loss, gradient): fp16 rounds the gradient


def _inputs(dtype, rows=ROWS, vocab=VOCAB, seed=0, edges=(0, VOCAB - 1)):
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[: len(edges)] = torch.tensor(edges)
    grad = torch.rand(rows, generator=gen)
    return logits, target, grad


def _float64(logits, target, grad):
    """torch's cross entropy on the same (rounded) logits in float64: per-token loss and d loss / d logits."""
    x = logits.double().requires_grad_()
    loss = F.cross_entropy(x, target, reduction="none")
    (loss * grad.double()).sum().backward()
    return loss.detach(), x.grad


def _ours(logits, target, grad, tp_group=None, overwrite=False):
    from ssa_kernels import cross_entropy_loss

    x = logits.clone().requires_grad_()
    y = x * 1  # a non-leaf, as the output layer's logits are: overwriting must not reach x
    loss = cross_entropy_loss(y, target, tp_group=tp_group, overwrite_logits=overwrite)
    (loss * grad).sum().backward()
    return loss.detach(), x.grad, y.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_cross_entropy(dtype):
    logits, target, grad = _inputs(dtype)
    ref_loss, ref_grad = _float64(logits, target, grad)
    loss, dx, _ = _ours(logits, target, grad)
    assert loss.dtype == torch.float32 and dx.dtype == dtype and loss.shape == (ROWS,)
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, ref_loss) < tol_loss
    assert rel_err(dx, ref_grad) < tol_grad


def test_model_layout_and_overwriting_the_logits():
    """``[s, b, V]`` logits with ``[s, b]`` targets, as GPTModel passes them; with ``overwrite_logits`` the
    gradient is the same and lands in the logits' own storage."""
    logits, target, grad = _inputs(torch.float32, rows=2 * 19)
    ref_loss, ref_grad = _float64(logits, target, grad)
    shape = (19, 2)
    results = [_ours(logits.view(*shape, VOCAB), target.view(shape), grad.view(shape), overwrite=o)
               for o in (False, True)]
    for loss, dx, _ in results:
        assert loss.shape == shape
        assert rel_err(loss.view(-1), ref_loss) < 1e-6
        assert rel_err(dx.view(-1, VOCAB), ref_grad) < 1e-5
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    torch.testing.assert_close(results[0][2], logits.view(*shape, VOCAB), rtol=0, atol=0)  # left alone
    torch.testing.assert_close(results[1][2], results[1][1], rtol=0, atol=0)  # the gradient, written over them


@pytest.fixture(scope="module")
def megatron_world():
    init_megatron(tp=1)
    yield


def test_megatron_semantics_for_targets_outside_the_vocabulary(megatron_world):
    """Megatron counts a target outside [0, V) as the row maximum: loss = log-sum-exp − maximum, gradient =
    softmax."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, target, grad = _inputs(torch.float32, edges=(0, VOCAB - 1, -100, VOCAB))
    x = logits.clone().requires_grad_()
    ref = vocab_parallel_cross_entropy(x * 1, target, tp_group=parallel_state.get_tensor_model_parallel_group())
    (ref * grad).sum().backward()
    loss, dx, _ = _ours(logits, target, grad)
    assert rel_err(loss, ref.detach()) < 1e-6
    assert rel_err(dx, x.grad) < 1e-5
    expected = torch.logsumexp(logits.double(), -1) - logits.double().amax(-1)
    torch.testing.assert_close(loss[2:4].double(), expected[2:4], rtol=1e-6, atol=0)


def test_bad_inputs_are_refused_in_one_line():
    from ssa_kernels import cross_entropy_loss
    from ssa_kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward

    x, t = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target shape \(3,\) must be logits' \(4, 8\) without the last"):
        cross_entropy_loss(x, t[:3])
    with pytest.raises(ValueError, match="logits.dtype=torch.float64: cross_entropy supports float16, bfloat16"):
        cross_entropy_loss(x.double(), t)
    with pytest.raises(ValueError, match=r"target must be int32/int64 of shape \(4,\), got torch.float32"):
        cross_entropy_forward(x, t.float())
    with pytest.raises(ValueError, match="logits must be 2-D"):
        cross_entropy_forward(x.t(), t)
    with pytest.raises(ValueError, match=r"out must be torch.float32 \(4, 8\)"):
        cross_entropy_backward(x, t, torch.zeros(4), torch.ones(4), out=torch.empty(4, 7))


def _tp_ranks(rank, world_size):
    """Each rank holds half of the columns; both see the whole vocabulary's loss. Targets at both edges of both
    halves (0, V/2 − 1, V/2, V − 1) and outside (−100, V)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    init_megatron(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    half = VOCAB // 2
    for dtype in (torch.float32, torch.float16):
        logits, target, grad = _inputs(dtype, edges=(0, half - 1, half, VOCAB - 1))  # the same on both ranks
        cols = slice(rank * half, (rank + 1) * half)
        local = logits[:, cols].contiguous()
        ref_loss, ref_grad = _float64(logits, target, grad)
        loss, dx, _ = _ours(local, target, grad, tp_group=group)
        tol_loss, tol_grad = TOL[dtype]
        assert rel_err(loss, ref_loss) < tol_loss, dtype
        assert rel_err(dx, ref_grad[:, cols]) < tol_grad, dtype

        x = local.clone().requires_grad_()
        megatron = vocab_parallel_cross_entropy(x * 1, target, tp_group=group)
        (megatron * grad).sum().backward()
        assert rel_err(loss, megatron.detach()) < tol_loss, dtype
        assert rel_err(dx, x.grad) < tol_grad, dtype

        outside = target.clone()
        outside[:2] = torch.tensor([-100, VOCAB])
        loss, dx, _ = _ours(local, outside, grad, tp_group=group)
        expected = torch.logsumexp(logits.double(), -1) - logits.double().amax(-1)
        torch.testing.assert_close(loss[:2].double(), expected[:2], rtol=1e-6, atol=1e-6)
        other = loss.clone()
        dist.broadcast(other, src=0)
        torch.testing.assert_close(loss, other, rtol=0, atol=0)


@pytest.mark.slow
def test_tensor_parallel_vocabulary_split():
    spawn_gloo(_tp_ranks, 2)
