"""Nearest Neighbour Mixing (NNM)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import apply_batched, host_tuned, is_batched
from ._checks import check_matrix, check_minority
from ._distances import aligned, pairwise_sq_distances, pairwise_sq_distances_batched


def nnm_impl(x: Tensor, *, f: int) -> Tensor:
    n = x.shape[0]
    if f == 0:
        # Every row's n - 0 nearest neighbours are all the rows.
        return x.mean(dim=0, keepdim=True).expand(n, -1).clone()
    dist = pairwise_sq_distances(x)
    # Row i's n - f nearest rows (itself included, at distance 0); stable order breaks ties by index.
    nearest = torch.argsort(dist, dim=1, stable=True)[:, : n - f]
    mix = torch.zeros((n, n), dtype=x.dtype, device=x.device)
    mix.scatter_(1, nearest, 1.0 / (n - f))
    return mix @ x


def nnm_batched(x: Tensor, *, f: int) -> Tensor:
    """:func:`nnm_impl` on every element of a (B, n, d) ``x``.

    On the CPU element by element with the 2-D code (from an aligned copy, see
    :func:`arcsim.robust._distances.aligned`), so the output is bitwise the 2-D call's: NNM's
    output rows are often exact copies of each other (rows sharing their neighbours), and a rule after
    it that selects rows (Krum) breaks those ties by index, so a mixing product rounded another way
    could flip its choice. Elsewhere (a GPU) one batched Gram matrix for the distances, the same stable
    argsort (ties by row index) and one batched mixing product, equal within rounding."""
    batch, n, _ = x.shape
    if host_tuned(x) and batch:
        if batch == 1:  # a chunk of one large element (arcsim.robust._batch): no copy into a stack
            return nnm_impl(aligned(x[0]), f=f).unsqueeze(0)
        return torch.stack([nnm_impl(aligned(element), f=f) for element in x])
    if f == 0:
        return x.mean(dim=-2, keepdim=True).expand(-1, n, -1).clone()
    nearest = torch.argsort(pairwise_sq_distances_batched(x), dim=-1, stable=True)[:, :, : n - f]
    mix = torch.zeros((batch, n, n), dtype=x.dtype, device=x.device)
    mix.scatter_(-1, nearest, 1.0 / (n - f))
    return torch.matmul(mix, x)


def nnm(x: Tensor, *, f: int) -> Tensor:
    """Nearest Neighbour Mixing: replace every vector by the mean of its n - f nearest neighbours.

    .. math::
        \\mathrm{NNM}(x)_i = \\frac{1}{n - f} \\sum_{j \\in N_i} x_j

    where N_i is the set of the n - f rows closest to x_i in Euclidean distance (x_i included).
    The distances are ``pairwise_sq_distances`` (from the rows' differences for up to 32 rows) and
    the mixing is one (n, n) x (n, d) product. Ties
    between equidistant neighbours are broken by row index. Needs 2f < n. ``x`` may have leading
    batch dimensions, (..., n, d) (an element holding a NaN or an infinity gives NaN).

    Reference: Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe
    for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.

    >>> import torch
    >>> nnm(torch.tensor([[0.], [1.], [10.]]), f=1)
    tensor([[0.5000],
            [0.5000],
            [5.5000]])
    """
    if is_batched(x):
        check_n = lambda n: check_minority(n, f, rule="nnm")  # noqa: E731
        return apply_batched(x, rule="nnm", check_n=check_n, fn=lambda flat: nnm_batched(flat, f=f))
    check_matrix(x, rule="nnm")
    check_minority(x.shape[0], f, rule="nnm")
    return nnm_impl(x, f=f)
