"""Bucketing: average random groups of s vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_matrix

Generators = torch.Generator | Sequence[torch.Generator | None] | None


def bucketing(x: Tensor, *, s: int, generator: Generators = None) -> Tensor:
    """Shuffle the vectors and average them in buckets of s.

    .. math::
        y_b = \\frac{1}{|B_b|} \\sum_{i \\in B_b} x_{\\pi(i)}, \\qquad
        B_b = \\{ b s, \\dots, \\min((b+1) s, n) - 1 \\}, \\quad b = 0, \\dots, \\lceil n/s \\rceil - 1

    where :math:`\\pi` is a uniformly random permutation drawn from ``generator`` and s >= 1 the
    bucket size. The output has :math:`\\lceil n / s \\rceil` rows (the last bucket may be smaller),
    so a rule after it sees fewer, more homogeneous vectors; with f Byzantine inputs at most f
    buckets are affected, so the next rule keeps the same f and needs 2f < ceil(n / s).

    ``x`` may have leading batch dimensions, (..., n, d) -> (..., ceil(n/s), d): each element gets its
    own permutation, drawn in row-major order of the batch from ``generator`` (one generator, or a
    sequence of one per element: element i then draws exactly what the 2-D call with generator i
    draws). An element holding a NaN or an infinity gives NaN.

    Reference: Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022.

    >>> import torch
    >>> bucketing(torch.tensor([[1.], [3.], [5.]]), s=2, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1])
    """
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"bucketing: s must be a positive integer, got s = {s!r}")
    if is_batched(x):
        count = math.prod(x.shape[:-2]) if isinstance(x, Tensor) else 0
        draws = iter(element_generators(generator, count, rule="bucketing"))

        def run(flat: Tensor) -> Tensor:  # called chunk after chunk: each takes the next generators
            return bucketing_batched_with_groups(flat, s=s, generators=[next(draws) for _ in range(flat.shape[0])])[0]

        return apply_batched(x, rule="bucketing", fn=run)
    check_matrix(x, rule="bucketing")
    return bucketing_impl(x, s=s, generator=generator)


def bucketing_impl(x: Tensor, *, s: int, generator: torch.Generator | None = None) -> Tensor:
    return bucketing_with_groups(x, s=s, generator=generator)[0]


def bucketing_with_groups(x: Tensor, *, s: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Bucketing, also returning the (n,) int64 index of the bucket (output row) each row went into."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator, device="cpu").to(x.device)
    buckets = -(-n // s)
    # Row perm[j] goes to bucket j // s. Adding every row of x straight into its bucket (rather than
    # gathering x[perm] first) saves a copy of x; within a bucket the order of the additions changes,
    # which can only change the rounding (and for s = 2 not even that).
    position = torch.empty_like(perm)
    position[perm] = torch.arange(n, device=x.device)
    bucket_of = position // s
    sums = torch.zeros((buckets, x.shape[1]), dtype=x.dtype, device=x.device)
    sums.index_add_(0, bucket_of, x)
    counts = torch.bincount(bucket_of, minlength=buckets).to(x.dtype)
    return sums.div_(counts[:, None]), bucket_of


def element_generators(generators: Generators, count: int, *, rule: str) -> list[torch.Generator | None]:
    """One generator (or None: the global one) per batch element, from one generator or a sequence."""
    if generators is None or isinstance(generators, torch.Generator):
        return [generators] * count
    listed = list(generators)
    if len(listed) != count:
        raise ValueError(f"{rule}: expected one generator per batch element ({count}), got {len(listed)}")
    return listed


def bucketing_batched_with_groups(x: Tensor, *, s: int, generators: Generators = None) -> tuple[Tensor, Tensor]:
    """:func:`bucketing_with_groups` on every element of a (B, n, d) ``x``: (B, ceil(n/s), d), (B, n).

    Each element's permutation is its own draw (a loop over the elements, one ``randperm`` each, from
    :func:`element_generators`); the sums then run in one ``index_add_`` over the flattened rows,
    adding each bucket's rows in the 2-D call's order, so the output is bitwise the 2-D call's.
    """
    batch, n, d = x.shape
    perms = [
        torch.randperm(n, generator=g, device="cpu") for g in element_generators(generators, batch, rule="bucketing")
    ]
    perm = torch.stack(perms).to(x.device) if perms else torch.empty((0, n), dtype=torch.int64, device=x.device)
    buckets = -(-n // s)
    position = torch.empty_like(perm)
    position.scatter_(1, perm, torch.arange(n, device=x.device).expand(batch, n))
    bucket_of = position // s
    offsets = torch.arange(batch, device=x.device)[:, None] * buckets
    sums = torch.zeros((batch * buckets, d), dtype=x.dtype, device=x.device)
    sums.index_add_(0, (bucket_of + offsets).flatten(), x.reshape(batch * n, d))
    counts = torch.bincount(torch.arange(n, device=x.device) // s, minlength=buckets).to(x.dtype)
    return sums.view(batch, buckets, d).div_(counts[:, None]), bucket_of
