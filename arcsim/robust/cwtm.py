"""Coordinate-wise trimmed mean (CWTM)."""

from __future__ import annotations

from torch import Tensor

from ._checks import check_matrix, check_minority
from ._sorting import sorted_columns


def cwtm_impl(x: Tensor, *, f: int) -> Tensor:
    n = x.shape[0]
    if f == 0:
        return x.mean(dim=0)
    # Sorting (not "sum minus the extremes"): subtracting 1e6-sized outliers from a float32 sum
    # would cancel the honest values.
    return sorted_columns(x)[f : n - f].mean(dim=0)


def cwtm(x: Tensor, *, f: int) -> Tensor:
    """Coordinate-wise trimmed mean: in every coordinate drop the f largest and f smallest values.

    .. math::
        \\mathrm{CWTM}(x)_k = \\frac{1}{n - 2f} \\sum_{j = f + 1}^{n - f} x_{(j), k}

    where :math:`x_{(1), k} \\le \\dots \\le x_{(n), k}` are the k-th coordinates of the n vectors
    in increasing order. Needs 2f < n.

    Reference: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018.

    >>> import torch
    >>> cwtm(torch.tensor([[1., 9.], [2., 0.], [3., 5.], [100., 4.]]), f=1)
    tensor([2.5000, 4.5000])
    """
    check_matrix(x, rule="cwtm")
    check_minority(x.shape[0], f, rule="cwtm")
    return cwtm_impl(x, f=f)
