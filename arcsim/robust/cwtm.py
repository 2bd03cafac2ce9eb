"""Coordinate-wise trimmed mean (CWTM)."""

from __future__ import annotations

from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_matrix, check_minority
from ._sorting import middle_means_batched, sorted_columns


def cwtm_impl(x: Tensor, *, f: int) -> Tensor:
    n = x.shape[0]
    if f == 0:
        return x.mean(dim=0)
    # Sorting (not "sum minus the extremes"): subtracting 1e6-sized outliers from a float32 sum
    # would cancel the honest values.
    return sorted_columns(x)[f : n - f].mean(dim=0)


def cwtm_batched(x: Tensor, *, f: int) -> Tensor:
    """:func:`cwtm_impl` on every element of a (B, n, d) ``x``: the same sorted values (only the kept
    rows f..n-f-1 are produced), averaged in row order (:func:`middle_means_batched`), within
    (n - 2f) eps M of the 2-D call's mean."""
    n = x.shape[1]
    if f == 0:
        return x.mean(dim=-2)
    return middle_means_batched(x, f, n - f)


def cwtm(x: Tensor, *, f: int) -> Tensor:
    """Coordinate-wise trimmed mean: in every coordinate drop the f largest and f smallest values.

    .. math::
        \\mathrm{CWTM}(x)_k = \\frac{1}{n - 2f} \\sum_{j = f + 1}^{n - f} x_{(j), k}

    where :math:`x_{(1), k} \\le \\dots \\le x_{(n), k}` are the k-th coordinates of the n vectors
    in increasing order. Needs 2f < n. ``x`` may have leading batch dimensions, (..., n, d) -> (..., d)
    (an element holding a NaN or an infinity gives NaN).

    Reference: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018.

    >>> import torch
    >>> cwtm(torch.tensor([[1., 9.], [2., 0.], [3., 5.], [100., 4.]]), f=1)
    tensor([2.5000, 4.5000])
    """
    if is_batched(x):
        check_n = lambda n: check_minority(n, f, rule="cwtm")  # noqa: E731
        return apply_batched(x, rule="cwtm", check_n=check_n, fn=lambda flat: cwtm_batched(flat, f=f))
    check_matrix(x, rule="cwtm")
    check_minority(x.shape[0], f, rule="cwtm")
    return cwtm_impl(x, f=f)
