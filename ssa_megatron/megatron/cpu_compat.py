"""Running megatron-core 0.19 on a machine without CUDA (development, CI, the ``tiny`` recipe).

Megatron-core assumes a GPU in a handful of places that a CPU run with gloo reaches. ``enable_cpu_compat()``
patches exactly those, in memory, and only when ``torch.cuda.is_available()`` is False; it is idempotent and
never touches megatron's files on disk. Each patch, and why it is needed:

1. ``torch.cuda.current_device`` returns ``torch.device("cpu")``.
   ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()`` on the first forward (and a
   few constructors read it when ``use_cpu_initialization`` is off). Without CUDA the call raises
   ("Found no NVIDIA driver"), so any code that would have crashed now allocates on the CPU instead.
2. ``torch.cuda.synchronize`` is a no-op and ``torch.cuda.current_stream()`` returns a stream whose
   ``wait_event`` / ``wait_stream`` / ``synchronize`` do nothing: dist-checkpointing's writer
   (``filesystem_async.preload_tensors``) synchronizes unconditionally, and DDP's ``finish_grad_sync``
   (``param_and_grad_buffer.start_grad_sync``) asks for the current stream to order CUDA-graph events; on a CPU
   every operation is already ordered. (Keep ``overlap_grad_reduce`` off on CPU: it needs a side stream.)
3. The model-parallel RNG tracker: ``get_cuda_rng_tracker().fork()`` yields a null context, and
   ``model_parallel_cuda_manual_seed`` only seeds the CPU generator. The tracker stores CUDA generator states
   (``torch.cuda.get_rng_state``), which do not exist here; it is forked by dropout under sequence parallelism,
   by the stock ``DotProductAttention`` and by GPU weight initialisation, none of which a CPU run needs
   (CPU runs use ``use_cpu_initialization=True`` and no attention dropout). Activation recompute
   (``tensor_parallel.checkpoint``) saves and restores the CUDA generator state next to the CPU one; without CUDA
   the CUDA part is skipped (``_get_cuda_rng_state`` returns None, ``_set_cuda_rng_state`` ignores it), while the
   CPU generator is still saved and restored.
4. Tensors that schedules and gradient clipping allocate with a literal ``device="cuda"``
   (``forward_backward_no_pipelining``'s token counter, ``clip_grads``' norm buffers) are created on the CPU: those
   functions run under a ``TorchFunctionMode`` that rewrites a CUDA ``device`` argument to CPU. The mode is active
   only while those functions run. The pipelined schedules (pp > 1) also need CUDA streams and NCCL-style p2p,
   so on a CPU only pp = 1 is supported (``get_forward_backward_func()`` returns the no-pipelining schedule).
   The same rewrite (plus ``pin_memory=False`` and ``Tensor.cuda()`` → the tensor itself) covers RoPE under
   context parallelism (``rope_utils.get_pos_emb_on_this_cp_rank`` builds its chunk index pinned and moves it
   with ``.cuda()``).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ENABLED = False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` / ``device="cuda:N"`` arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for the current CUDA stream on a CPU (patch 2)."""

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs) -> None:
        return None


_NULL_STREAM = _NullStream()


def cuda_to_cpu(fn):
    """Wraps ``fn`` so that it runs under the CUDA→CPU device rewrite (patch 4)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpu():
            return fn(*args, **kwargs)

    wrapper.__ssa_cpu_compat__ = True
    return wrapper


def enable_cpu_compat(force: bool = False) -> bool:
    """Applies the CPU patches when CUDA is unavailable (or ``force``). Returns True when they are active."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False

    # 1 and 2: the CUDA device queries megatron makes unconditionally.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NULL_STREAM

    # 3: the CUDA RNG tracker.
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mp_random

    tracker_cls = type(mp_random.get_cuda_rng_tracker())
    tracker_cls.fork = lambda self, *args, **kwargs: contextlib.nullcontext()

    def _cpu_manual_seed(seed: int, *args, **kwargs) -> None:
        torch.manual_seed(seed)

    mp_random.model_parallel_cuda_manual_seed = _cpu_manual_seed
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    tensor_parallel.model_parallel_cuda_manual_seed = _cpu_manual_seed

    # 4: literal device="cuda" allocations in the no-pipelining schedule and gradient clipping.
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    schedules.forward_backward_no_pipelining = cuda_to_cpu(schedules.forward_backward_no_pipelining)
    for name in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"):
        if hasattr(clip_grads, name):
            setattr(clip_grads, name, cuda_to_cpu(getattr(clip_grads, name)))
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    rope_utils.get_pos_emb_on_this_cp_rank = cuda_to_cpu(rope_utils.get_pos_emb_on_this_cp_rank)
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = rope_utils.get_pos_emb_on_this_cp_rank
    # Modules that imported the clipping helpers by name keep their own reference: rebind those too.
    import sys

    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("megatron.core.optimizer"):
            continue
        for name in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"):
            current = getattr(module, name, None)
            if current is not None and not getattr(current, "__ssa_cpu_compat__", False):
                setattr(module, name, getattr(clip_grads, name))

    _ENABLED = True
    log.info("megatron CPU compatibility patches enabled (no CUDA device)")
    return True


def cpu_compat_enabled() -> bool:
    return _ENABLED
