"""Sorting along one dimension of a matrix, with numpy's SIMD sort on CPU.

numpy (>= 2.0) sorts float32 and float64 with x86-simd-sort (AVX-512 or AVX2), which was 10 to 30
times faster than ``torch.sort`` on the 2-core CPU machines this project runs on (see
docs/benchmarks.md). Sorted values do not depend on the algorithm, so results are unchanged.
Other dtypes, other devices and tensors that require grad use ``torch.sort``. Inputs are never
modified.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Below this many rows numpy sorts the strided columns of x directly (it gathers each column into a
# buffer); from it on, transposing first and sorting contiguous rows is faster (measured on 2 cores).
_TRANSPOSE_FROM_ROWS = 32


def _numpy_sortable(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad


def sorted_columns(x: Tensor) -> Tensor:
    """Every coordinate's values sorted in increasing order, as an (n, d) tensor (possibly a strided view).

    >>> sorted_columns(torch.tensor([[3., 0.], [1., 2.], [2., 1.]]))
    tensor([[1., 0.],
            [2., 1.],
            [3., 2.]])
    """
    if _numpy_sortable(x):
        if x.shape[0] < _TRANSPOSE_FROM_ROWS:
            return torch.from_numpy(np.sort(x.numpy(), axis=0))
        # A fresh contiguous (d, n) copy, even when x.T is already contiguous, so that sorting it in
        # place cannot touch x.
        transposed = x.T.clone(memory_format=torch.contiguous_format)
        transposed.numpy().sort(axis=1)
        return transposed.T
    # torch.sort along the contiguous dimension of the transposed matrix: several times faster on
    # CPU than sorting the strided columns of a row-major (n, d) matrix.
    return torch.sort(x.T.contiguous(), dim=1).values.T


def sorted_rows(x: Tensor) -> Tensor:
    """Every row of an (n, m) tensor sorted in increasing order.

    >>> sorted_rows(torch.tensor([[3., 1., 2.], [0., 5., 4.]]))
    tensor([[1., 2., 3.],
            [0., 4., 5.]])
    """
    if _numpy_sortable(x):
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return torch.sort(x, dim=1).values
