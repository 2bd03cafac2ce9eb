"""The plain average (no robustness)."""

from __future__ import annotations

from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_matrix


def mean(x: Tensor) -> Tensor:
    """The coordinate-wise average of the rows.

    .. math:: \\bar{x} = \\frac{1}{n} \\sum_{i=1}^{n} x_i

    Not robust: a single Byzantine vector moves it arbitrarily far. It is the f = 0 baseline.
    ``x`` may have leading batch dimensions, (..., n, d) -> (..., d).

    >>> import torch
    >>> mean(torch.tensor([[1., 2.], [3., 6.]]))
    tensor([2., 4.])
    """
    if is_batched(x):
        return apply_batched(x, rule="mean", fn=lambda flat: flat.mean(dim=-2))
    check_matrix(x, rule="mean")
    return x.mean(dim=0)
