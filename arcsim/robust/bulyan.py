"""Bulyan."""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import apply_batched, is_batched, take_rows
from ._checks import check_f, check_matrix
from ._distances import pairwise_sq_distances, pairwise_sq_distances_batched
from ._sorting import sorted_rows
from .cwmed import cwmed_batched, cwmed_impl


def bulyan_selection(x: Tensor, *, f: int) -> Tensor:
    """Indices of the theta = n - 2f rows chosen by iterated Krum.

    Each step selects the Krum winner among the rows still available and removes it. The loop runs
    n - 2f times over the (n, n) distance matrix only; the d-sized data is never touched in it.
    """
    n = x.shape[0]
    dist = pairwise_sq_distances(x)
    available = torch.ones(n, dtype=torch.bool, device=x.device)
    chosen = []
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    for step in range(n - 2 * f):
        remaining = n - step
        masked = torch.where(available[None, :] & available[:, None], dist, inf)
        # Each available row's distances to the other available rows, nearest first (self at 0).
        # Krum's count (remaining - f - 2) drops to 0 or 1 in the last selections: with 0 every score
        # ties and with 1 a mutually nearest pair ties, so row order would decide. At least 2 (when
        # that many remain) keeps the selection independent of the order of the rows.
        neighbours = min(max(remaining - f - 2, 2), remaining - 1)
        nearest = sorted_rows(masked)[:, 1 : 1 + neighbours]
        scores = torch.where(available, nearest.sum(dim=1), inf)
        winner = torch.argmin(scores)  # first minimum: ties go to the lowest index
        chosen.append(winner)
        available[winner] = False
    return torch.stack(chosen)


def bulyan_selection_batched(x: Tensor, *, f: int) -> Tensor:
    """:func:`bulyan_selection` on every element of a (B, n, d) ``x``: (B, n - 2f) int64.

    The same steps on the (B, n, n) batched distances (whose rounding may differ from the 2-D
    call's); each step's winner is every element's first minimum (ties to the lowest index).
    """
    batch, n, _ = x.shape
    dist = pairwise_sq_distances_batched(x)
    available = torch.ones((batch, n), dtype=torch.bool, device=x.device)
    chosen = []
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    elements = torch.arange(batch, device=x.device)
    for step in range(n - 2 * f):
        remaining = n - step
        masked = torch.where(available[:, None, :] & available[:, :, None], dist, inf)
        neighbours = min(max(remaining - f - 2, 2), remaining - 1)
        nearest = sorted_rows(masked)[..., 1 : 1 + neighbours]
        scores = torch.where(available, nearest.sum(dim=-1), inf)
        winner = torch.argmin(scores, dim=-1)
        chosen.append(winner)
        available[elements, winner] = False
    return torch.stack(chosen, dim=-1)


def bulyan_batched(x: Tensor, *, f: int) -> Tensor:
    """:func:`bulyan_impl` on every element of a (B, n, d) ``x``: (B, d)."""
    selected = take_rows(x, bulyan_selection_batched(x, f=f))
    beta = selected.shape[1] - 2 * f
    median = cwmed_batched(selected)
    closest = torch.topk((selected - median[:, None, :]).abs(), beta, dim=-2, largest=False).indices
    return torch.gather(selected, -2, closest).mean(dim=-2)


def bulyan(x: Tensor, *, f: int) -> Tensor:
    """Bulyan: iterated Krum selection, then a coordinate-wise trimmed average around the median.

    .. math::
        S = \\mathrm{Krum}^{\\theta}(x), \\quad \\theta = n - 2f; \\qquad
        \\mathrm{Bulyan}(x)_k = \\frac{1}{\\beta} \\sum_{i \\in M_k} x_{i,k}, \\quad \\beta = \\theta - 2f

    where S is built by selecting the Krum winner (with n - f - 2 replaced by the remaining count
    minus f minus 2, but at least 2, so that the last selections do not tie and fall to row order)
    and removing it, theta times, and M_k holds the beta members of S whose k-th
    coordinate is closest to the median of S's k-th coordinates. Needs n >= 4f + 3.

    Reference: El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
    Byzantium", ICML 2018.

    ``x`` may have leading batch dimensions, (..., n, d) -> (..., d) (an element holding a NaN or an
    infinity gives NaN).

    >>> import torch
    >>> bulyan(torch.tensor([[0.], [1.], [2.], [3.], [4.], [5.], [100.]]), f=1)
    tensor([3.])
    """
    if is_batched(x):
        return apply_batched(
            x, rule="bulyan", check_n=lambda n: check_bulyan_n(n, f), fn=lambda flat: bulyan_batched(flat, f=f)
        )
    check_matrix(x, rule="bulyan")
    check_bulyan_n(x.shape[0], f)
    return bulyan_impl(x, f=f)


def check_bulyan_n(n: int, f: int) -> None:
    check_f(f, rule="bulyan")
    if not n >= 4 * f + 3:
        raise ValueError(f"bulyan: needs n >= 4f + 3, got n = {n}, f = {f}")


def bulyan_impl(x: Tensor, *, f: int) -> Tensor:
    selected = x[bulyan_selection(x, f=f)]
    theta = selected.shape[0]
    beta = theta - 2 * f
    median = cwmed_impl(selected)
    closest = torch.topk((selected - median).abs(), beta, dim=0, largest=False).indices
    return torch.gather(selected, 0, closest).mean(dim=0)
