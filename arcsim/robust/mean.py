"""The plain average (no robustness)."""

from __future__ import annotations

from torch import Tensor

from ._checks import check_matrix


def mean(x: Tensor) -> Tensor:
    """The coordinate-wise average of the rows.

    .. math:: \\bar{x} = \\frac{1}{n} \\sum_{i=1}^{n} x_i

    Not robust: a single Byzantine vector moves it arbitrarily far. It is the f = 0 baseline.

    >>> import torch
    >>> mean(torch.tensor([[1., 2.], [3., 6.]]))
    tensor([2., 4.])
    """
    check_matrix(x, rule="mean")
    return x.mean(dim=0)
