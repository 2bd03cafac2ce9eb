"""Krum and Multi-Krum."""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import apply_batched, is_batched, take_rows
from ._checks import check_f, check_matrix
from ._distances import pairwise_sq_distances, pairwise_sq_distances_batched
from ._sorting import sorted_rows


def check_krum_n(n: int, f: int, *, rule: str) -> None:
    check_f(f, rule=rule)
    if not n > 2 * f + 2:
        raise ValueError(f"{rule}: needs n > 2f + 2, got n = {n}, f = {f}")


def krum_scores(dist: Tensor, *, f: int) -> Tensor:
    """Krum scores from an (n, n) squared-distance matrix: each row's sum over its n - f - 2 nearest others.

    A (B, n, n) stack of matrices gives (B, n) scores.
    """
    n = dist.shape[-1]
    # Sorted distances of each row; position 0 is the row itself (distance 0), which is skipped.
    nearest = sorted_rows(dist)[..., 1 : n - f - 1]
    return nearest.sum(dim=-1)


def multi_krum_selection(x: Tensor, *, f: int, m: int) -> Tensor:
    """Indices of the m rows with the lowest Krum scores (ties broken by row index), in score order."""
    scores = krum_scores(pairwise_sq_distances(x), f=f)
    return torch.argsort(scores, stable=True)[:m]


def multi_krum_selection_batched(x: Tensor, *, f: int, m: int) -> Tensor:
    """:func:`multi_krum_selection` on every element of a (B, n, d) ``x``: (B, m) int64.

    The distances are ``pairwise_sq_distances_batched``'s (bitwise the 2-D call's on the CPU, from
    batched Gram matrices elsewhere); the scores, the stable argsort (ties to the lowest index) and
    the cut are the 2-D call's.
    """
    scores = krum_scores(pairwise_sq_distances_batched(x), f=f)
    return torch.argsort(scores, dim=-1, stable=True)[:, :m]


def krum(x: Tensor, *, f: int) -> Tensor:
    """Krum: the input vector closest to its n - f - 2 nearest neighbours.

    .. math::
        s_i = \\sum_{j \\in N_i} \\|x_i - x_j\\|^2, \\qquad \\mathrm{Krum}(x) = x_{i^*}, \\quad
        i^* = \\arg\\min_i s_i

    where N_i is the set of the n - f - 2 rows closest to x_i (x_i excluded). Ties go to the lowest
    row index. Distances are ``pairwise_sq_distances``'s. Needs n > 2f + 2. ``x`` may have leading batch
    dimensions, (..., n, d) -> (..., d) (an element holding a NaN or an infinity gives NaN).

    Reference: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS 2017.

    >>> import torch
    >>> krum(torch.tensor([[0.], [1.], [2.], [3.], [50.]]), f=1)
    tensor([1.])
    """
    if is_batched(x):
        check_n = lambda n: check_krum_n(n, f, rule="krum")  # noqa: E731
        return apply_batched(x, rule="krum", check_n=check_n, fn=lambda flat: krum_batched(flat, f=f)[0])
    check_matrix(x, rule="krum")
    check_krum_n(x.shape[0], f, rule="krum")
    return x[multi_krum_selection(x, f=f, m=1)[0]].clone()


def check_m(m: int | None, n: int, f: int, *, rule: str) -> int:
    if m is None:
        return n - f
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"{rule}: m must be an integer in [1, n], got m = {m!r}, n = {n}")
    return m


def multi_krum(x: Tensor, *, f: int, m: int | None = None) -> Tensor:
    """Multi-Krum: the average of the m input vectors with the lowest Krum scores.

    .. math::
        \\mathrm{MultiKrum}(x) = \\frac{1}{m} \\sum_{i \\in S_m} x_i

    where S_m holds the m rows with the smallest Krum scores :math:`s_i` (see :func:`krum`) and
    m defaults to n - f. m = 1 is Krum. Needs n > 2f + 2. ``x`` may have leading batch dimensions,
    (..., n, d) -> (..., d) (an element holding a NaN or an infinity gives NaN).

    Reference: El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
    Byzantium", ICML 2018.

    >>> import torch
    >>> multi_krum(torch.tensor([[0.], [1.], [2.], [3.], [50.]]), f=1)
    tensor([1.5000])
    """
    if is_batched(x):
        chosen: list[int] = []

        def check_n(n: int) -> None:
            check_krum_n(n, f, rule="multi_krum")
            chosen.append(check_m(m, n, f, rule="multi_krum"))

        return apply_batched(
            x, rule="multi_krum", check_n=check_n, fn=lambda flat: multi_krum_batched(flat, f=f, m=chosen[0])[0]
        )
    check_matrix(x, rule="multi_krum")
    n = x.shape[0]
    check_krum_n(n, f, rule="multi_krum")
    m = check_m(m, n, f, rule="multi_krum")
    return x[multi_krum_selection(x, f=f, m=m)].mean(dim=0)


def multi_krum_batched(x: Tensor, *, f: int, m: int) -> tuple[Tensor, Tensor]:
    """Multi-Krum on every element of a (B, n, d) ``x``: the (B, d) averages and the (B, m) selections."""
    selected = multi_krum_selection_batched(x, f=f, m=m)
    return take_rows(x, selected).mean(dim=-2), selected


def krum_batched(x: Tensor, *, f: int) -> tuple[Tensor, Tensor]:
    """Krum on every element of a (B, n, d) ``x``: the (B, d) winners and the (B, 1) selections."""
    selected = multi_krum_selection_batched(x, f=f, m=1)
    return take_rows(x, selected)[:, 0].clone(), selected
