"""The one error metric the kernel tests compare with."""

from __future__ import annotations

from torch import Tensor


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Relative error ``‖actual − expected‖ / ‖expected‖`` (Frobenius norms, in float64; 0 / 0 counts as 0)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
