"""Pairwise squared distances from one matrix product."""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """Return the (n, n) matrix of squared Euclidean distances between the rows of ``x``.

    .. math::
        D_{ij} = \\|y_i\\|^2 + \\|y_j\\|^2 - 2 \\langle y_i, y_j \\rangle, \\qquad y_i = x_i - x_c

    computed from one Gram matrix ``y @ y.T``. Distances do not depend on the origin, but the rounding
    error of the Gram form grows with the rows' norms, so the rows are first centred on ``x_c``, the
    row of median norm: when honest rows are the majority that norm lies within the honest norms, so
    rows far away (huge Byzantine vectors) cannot inflate the honest rows' coordinates. The diagonal
    is exactly zero and negative round-off is clamped to zero.
    """
    n = x.shape[0]
    norms = torch.linalg.vector_norm(x, dim=1)
    centre = x[torch.argsort(norms, stable=True)[(n - 1) // 2]]
    y = x - centre
    sq = torch.linalg.vector_norm(y, dim=1).square()
    d = sq[:, None] + sq[None, :] - 2.0 * (y @ y.T)
    d.clamp_(min=0.0)
    d.fill_diagonal_(0.0)
    return d


def aligned(x: Tensor) -> Tensor:
    """``x``, or a copy of it when its data does not start on a 64-byte boundary.

    The CPU's BLAS and vectorised kernels round a product differently when the data starts elsewhere
    (they peel off the unaligned head), so an element of a batch (a view at some offset) would not
    give the bits a freshly allocated 2-D tensor gives; a copy of it does (torch aligns its buffers).
    """
    return x if x.data_ptr() % 64 == 0 else x.clone()


def pairwise_sq_distances_batched(x: Tensor) -> Tensor:
    """:func:`pairwise_sq_distances` of every element of a (B, n, d) ``x``: (B, n, n).

    On the CPU each element goes through :func:`pairwise_sq_distances` itself (from an aligned copy,
    see :func:`aligned`), so the distances are bitwise those of the 2-D call on a fresh tensor: the
    rules that select rows by distance (NNM's neighbours, Krum's scores) then select the same rows
    even where two candidates nearly tie, which a distance off by one rounding could otherwise flip
    (a discontinuous change of the output, not a rounding error). The cost is the same Gram product
    per element. Elsewhere (a GPU) each element is centred on its own row of median norm (the same
    row, by the same stable order) and the Gram matrices come from one batched product, whose
    rounding may differ from the 2-D product's: distances agree within the Gram form's rounding
    error, and a near tie may be selected the other way.
    """
    if x.device.type == "cpu":
        if not x.shape[0]:
            return x.new_zeros((0, x.shape[1], x.shape[1]))
        return torch.stack([pairwise_sq_distances(aligned(element)) for element in x])
    batch, n, _ = x.shape
    norms = torch.linalg.vector_norm(x, dim=-1)
    centre_row = torch.argsort(norms, dim=-1, stable=True)[:, (n - 1) // 2]
    y = x - x[torch.arange(batch, device=x.device), centre_row][:, None, :]
    sq = torch.linalg.vector_norm(y, dim=-1).square()
    d = sq[:, :, None] + sq[:, None, :] - 2.0 * torch.matmul(y, y.transpose(-2, -1))
    d.clamp_(min=0.0)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    return d
