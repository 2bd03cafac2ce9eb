"""Pairwise squared distances between rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._batch import host_tuned

# Up to this many rows the distances come from the rows' differences (F.pdist), above from a Gram
# matrix: measured with one and two threads on the 2-core machine, pdist was faster at n = 13, 19
# and 33 (d = 431,080) and slower from n = 64 (d = 65,536) on.
PDIST_MAX_ROWS = 32


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """Return the (n, n) matrix of squared Euclidean distances between the rows of ``x``.

    .. math::
        D_{ij} = \\|x_i - x_j\\|^2

    Up to :data:`PDIST_MAX_ROWS` rows (a round's n workers), each distance is summed from the
    differences of its two rows (``torch.nn.functional.pdist``, squared), not from a Gram matrix:
    no cancellation, so rows far away (huge Byzantine vectors) cannot drown the distances between
    close rows; duplicate rows are exactly 0 apart; and the result does not depend on where the
    rows lie in memory (a Gram product's rounding does: the CPU's BLAS rounds a product another
    way when the data starts off a 64-byte boundary). It was also 2.4 times faster than the Gram
    form on the paper's (13, 431,080) matrices with one thread (docs/benchmarks.md). With more rows
    the Gram form's matrix product wins (4 times faster at n = 256), and it is used there (see
    :func:`_gram_sq_distances`). The diagonal is exactly zero and the matrix exactly symmetric.
    """
    n = x.shape[0]
    if n > PDIST_MAX_ROWS:
        return _gram_sq_distances(x)
    d = x.new_zeros((n, n))
    if n > 1:
        upper = torch.triu_indices(n, n, 1, device=x.device)
        squared = F.pdist(x).square()
        d[upper[0], upper[1]] = squared
        d[upper[1], upper[0]] = squared
    return d


def _gram_sq_distances(x: Tensor) -> Tensor:
    """The distances from one Gram matrix ``y @ y.T`` of the rows centred on ``x_c``, the row of median
    norm: D_ij = |y_i|^2 + |y_j|^2 - 2 <y_i, y_j>. Its rounding error grows with the rows' norms,
    which the centring bounds: when honest rows are the majority that norm lies within the honest
    norms, so rows far away (huge Byzantine vectors) cannot inflate the honest rows' coordinates.
    Negative round-off is clamped to zero and the diagonal set to zero."""
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

    On the CPU each element goes through :func:`pairwise_sq_distances` itself (above
    :data:`PDIST_MAX_ROWS` rows from an aligned copy, see :func:`aligned`), so the distances are
    bitwise those of the 2-D call: the rules that select rows by distance (NNM's neighbours, Krum's
    scores) then select the same rows even where two candidates nearly tie, which a distance off by
    one rounding could otherwise flip (a discontinuous change of the output, not a rounding error).
    Elsewhere (a GPU, where a loop over the elements would launch a kernel per element) the
    distances come from Gram matrices: each element is centred on its row of median norm (so that
    huge rows do not inflate the others' coordinates) and the Gram matrices come from one batched
    product; they agree with the 2-D distances within the Gram form's rounding error, and a near
    tie may be selected the other way.
    """
    if host_tuned(x):
        if not x.shape[0]:
            return x.new_zeros((0, x.shape[1], x.shape[1]))
        # The Gram form (many rows) rounds by alignment: from an aligned copy, as a fresh tensor would.
        fresh = (lambda e: e) if x.shape[1] <= PDIST_MAX_ROWS else aligned
        return torch.stack([pairwise_sq_distances(fresh(element)) for element in x])
    batch, n, _ = x.shape
    norms = torch.linalg.vector_norm(x, dim=-1)
    centre_row = torch.argsort(norms, dim=-1, stable=True)[:, (n - 1) // 2]
    y = x - x[torch.arange(batch, device=x.device), centre_row][:, None, :]
    sq = torch.linalg.vector_norm(y, dim=-1).square()
    d = sq[:, :, None] + sq[:, None, :] - 2.0 * torch.matmul(y, y.transpose(-2, -1))
    d.clamp_(min=0.0)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    return d
