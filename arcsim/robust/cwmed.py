"""Coordinate-wise median (CWMed)."""

from __future__ import annotations

from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_matrix
from ._sorting import sorted_columns_batched
from .cwtm import sorted_columns


def cwmed_impl(x: Tensor) -> Tensor:
    n = x.shape[0]
    ordered = sorted_columns(x)  # numpy's SIMD sort on CPU beats torch.median too
    if n % 2 == 1:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def cwmed_batched(x: Tensor) -> Tensor:
    """:func:`cwmed_impl` on every element of a (B, n, d) ``x``: the same middle values, bitwise."""
    n = x.shape[1]
    if n % 2 == 1:
        return sorted_columns_batched(x, n // 2, n // 2 + 1)[:, 0].clone()
    middle = sorted_columns_batched(x, n // 2 - 1, n // 2 + 1)
    return (middle[:, 0] + middle[:, 1]) / 2


def cwmed(x: Tensor) -> Tensor:
    """Coordinate-wise median.

    .. math::
        \\mathrm{CWMed}(x)_k = \\mathrm{median}(x_{1,k}, \\dots, x_{n,k})

    where, for even n, the median of a coordinate is the average of its two middle values
    (so the rule is symmetric; torch.median alone would return the lower one). ``x`` may have
    leading batch dimensions, (..., n, d) -> (..., d) (an element holding a NaN or an infinity gives NaN).

    Reference: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018.

    >>> import torch
    >>> cwmed(torch.tensor([[1., 9.], [2., 0.], [3., 5.], [100., 4.]]))
    tensor([2.5000, 4.5000])
    """
    if is_batched(x):
        return apply_batched(x, rule="cwmed", fn=cwmed_batched)
    check_matrix(x, rule="cwmed")
    return cwmed_impl(x)
