"""Tolerances for "parallel equals serial", derived from the dtype, not from one machine.

A parallel run adds the same numbers as the serial one in another order (another split over
ranks, other vector kernels on another CPU), so the two differ by rounding. For a sum of ``n``
terms, any two orders differ by at most ``2 * gamma_n * sum(|x_i|)``, with unit roundoff
``u = eps / 2`` and ``gamma_n = n u / (1 - n u)`` (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., section 4.2). A result built from ``depth`` such reductions in a row (layers,
optimizer steps) carries at most ``depth`` times that, to first order. A check that uses this
bound holds on any CPU, and a bug that moves a result by more than rounding still fails it.
"""

from __future__ import annotations

import torch

__all__ = ["rounding_bound", "assert_close_to_serial", "max_abs_diff"]


def rounding_bound(dtype: torch.dtype, terms: int, magnitude: float, depth: int = 1) -> float:
    """Largest difference two summation orders of ``terms`` numbers may show, ``depth`` times.

    Args:
        dtype: the floating-point type the sums run in.
        terms: the number of terms in the longest sum (a dot product's length, a batch size).
        magnitude: a bound on ``sum(|x_i|)`` of that sum, in the result's units.
        depth: how many such reductions feed each other (layers, steps).
    """
    if terms < 1 or depth < 1 or magnitude < 0:
        raise ValueError(
            f"terms and depth must be >= 1 and magnitude >= 0; got {terms}, {depth}, {magnitude}"
        )
    u = torch.finfo(dtype).eps / 2
    if terms * u >= 1:
        raise ValueError(f"{terms} terms exceed what {dtype} can bound (n * u >= 1)")
    gamma = terms * u / (1 - terms * u)
    return 2 * depth * gamma * magnitude


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest elementwise difference over two lists of same-shaped tensors."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} tensors against {len(b)}")
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def assert_close_to_serial(
    parallel: list[torch.Tensor],
    serial: list[torch.Tensor],
    *,
    terms: int,
    magnitude: float,
    depth: int = 1,
) -> float:
    """Assert that ``parallel`` equals ``serial`` up to :func:`rounding_bound`; return the gap.

    ``magnitude`` bounds ``sum(|x_i|)`` of the sums behind each entry (see :func:`rounding_bound`).
    """
    dtype = serial[0].dtype
    bound = rounding_bound(dtype, terms, magnitude, depth)
    gap = max_abs_diff(parallel, serial)
    if not gap <= bound:
        raise AssertionError(
            f"parallel differs from serial by {gap:.3e}, more than rounding in {dtype} allows "
            f"({bound:.3e} for sums of {terms} terms, {depth} deep)"
        )
    return gap
