"""Shared test setup: the Triton interpreter on CPU machines, deterministic seeds, tests/ importable (helpers,
brute_force), GPU tests skipped without CUDA."""

import os
import sys

# Triton's interpreter works only when TRITON_INTERPRET is set before triton.language is first imported
# (otherwise triton's own jit functions, tl.min and the like, stay compiled-mode and fail inside kernels).
# Without a GPU every kernel test runs interpreted, so set it before anything imports triton.
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords or "/gpu/" in str(item.fspath):
            item.add_marker(skip)
