"""Sorting along one dimension of a matrix, with numpy's SIMD sort on CPU.

numpy (>= 2.0) sorts float32 and float64 with x86-simd-sort (AVX-512 or AVX2), much faster
than ``torch.sort`` on CPU (figures in docs/benchmarks.md). Sorted values do not depend on the
algorithm, so results are unchanged.
Other dtypes, other devices and tensors that require grad use ``torch.sort``. Inputs are never
modified.

On CPU, the columns of a matrix with few rows (the n workers of a round) and many coordinates are
sorted by a sorting network instead: a fixed sequence of compare-exchanges between whole rows
(element-wise minimum and maximum), which streams through memory instead of sorting d tiny columns
one by one, which beats numpy's sort for few rows (docs/benchmarks.md). A NaN would
spread through the minima and maxima, so a matrix with one (its sum is NaN; one pass) goes to
numpy, which sorts NaN last.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from ._batch import host_tuned

# Sorting networks below the transposed numpy path (so that the sorted matrix is laid out as before
# and sums over it round as before), and only for at least this many columns (below, the Python calls
# per compare-exchange dominate).
_NETWORK_MAX_ROWS = 31
_NETWORK_MIN_COLUMNS = 1024
_NETWORK_BLOCK_BYTES = 2 << 20


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` inputs: compare-exchanges (i, j), i < j, in order.

    After applying them in order (``x[i], x[j] = min, max``), any n values are in increasing order.

    >>> sorting_network(3)
    ((0, 1), (0, 2), (1, 2))
    """
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []

    def merge(lo: int, hi: int, r: int) -> None:  # merge the two sorted halves of [lo, hi], stride r
        step = r * 2
        if step < hi - lo:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            pairs.extend((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            pairs.append((lo, lo + r))

    def sort(lo: int, hi: int) -> None:
        if hi > lo:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid + 1, hi)
            merge(lo, hi, 1)

    sort(0, size - 1)
    # A network for a power of two sorts any n <= size inputs with the comparators among the first n
    # wires (think of the missing inputs as +inf: they never move).
    return tuple((i, j) for i, j in pairs if j < n)


def _compare_exchange(wires: list[Tensor], spare: Tensor, network: tuple[tuple[int, int], ...]) -> None:
    """Apply ``network`` to ``wires`` (one tensor per row, equal shapes): afterwards ``wires[k]`` holds
    the k-th smallest values element-wise. ``spare`` (a buffer of the same shape) receives each
    minimum; the buffers rotate through the list, so no compare-exchange allocates."""
    for i, j in network:
        low = torch.minimum(wires[i], wires[j], out=spare)
        spare = wires[i]  # its values are no longer needed once the minimum is out
        torch.maximum(spare, wires[j], out=wires[j])
        wires[i] = low


def _network_sorted_columns(x: Tensor) -> Tensor:
    n, d = x.shape
    network = sorting_network(n)
    out = torch.empty((n, d), dtype=x.dtype)
    # Blocks of columns small enough that the n rows of a block stay in cache through the network.
    width = min(d, _NETWORK_BLOCK_BYTES // (n * x.element_size()))
    block = torch.empty((n + 1, width), dtype=x.dtype)
    for start in range(0, d, width):
        stop = min(start + width, d)
        rows = list(block[:, : stop - start].unbind(0))
        spare = rows.pop()
        for row, source in zip(rows, x[:, start:stop].unbind(0)):
            row.copy_(source)
        _compare_exchange(rows, spare, network)
        torch.stack(rows, out=out[:, start:stop])
    return out


# Below this many rows numpy sorts the strided columns of x directly (it gathers each column into a
# buffer); from it on, transposing first and sorting contiguous rows is faster (measured on 2 cores).
_TRANSPOSE_FROM_ROWS = 32
assert _NETWORK_MAX_ROWS < _TRANSPOSE_FROM_ROWS


def _numpy_sortable(x: Tensor) -> bool:
    return host_tuned(x) and x.dtype in (torch.float32, torch.float64) and not x.requires_grad


def sorted_columns(x: Tensor) -> Tensor:
    """Every coordinate's values sorted in increasing order, as an (n, d) tensor (possibly a strided view).

    >>> sorted_columns(torch.tensor([[3., 0.], [1., 2.], [2., 1.]]))
    tensor([[1., 0.],
            [2., 1.],
            [3., 2.]])
    """
    n, d = x.shape
    if _numpy_sortable(x) and 1 < n <= _NETWORK_MAX_ROWS and d >= _NETWORK_MIN_COLUMNS and not torch.isnan(x.sum()):
        return _network_sorted_columns(x)
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


@functools.cache
def pruned_network(n: int, rows: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """:func:`sorting_network` without the compare-exchanges that cannot reach the wires ``rows``.

    Going backwards, a compare-exchange is kept when one of its wires is still needed, and then both
    are (its outputs depend on both inputs). The needed wires end with exactly the sorted values.

    >>> pruned_network(3, (0,))
    ((0, 1), (0, 2))
    """
    needed = set(rows)
    kept = []
    for i, j in reversed(sorting_network(n)):
        if i in needed or j in needed:
            kept.append((i, j))
            needed.update((i, j))
    return tuple(reversed(kept))


def _network_sorted_columns_batched(x: Tensor, start: int, stop: int, *, mean: bool = False) -> Tensor:
    """The network of :func:`_network_sorted_columns` on every element of a (B, n, d) ``x``, in tiles
    of about _NETWORK_BLOCK_BYTES (several elements per tile when they are small, a block of columns
    of one element when they are large); returns the sorted rows start..stop-1, (B, stop - start, d),
    or with ``mean`` their mean, (B, d), summed in row order tile by tile while the tile is in cache
    (the sorted rows are never written out)."""
    batch, n, d = x.shape
    network = pruned_network(n, tuple(range(start, stop)))
    out = torch.empty((batch, d) if mean else (batch, stop - start, d), dtype=x.dtype)
    tile = _NETWORK_BLOCK_BYTES // (n * x.element_size())  # columns of all n rows per tile
    elements = max(1, min(batch, tile // d))
    width = min(d, max(1, tile // elements))
    block = torch.empty((n + 1, elements, width), dtype=x.dtype)
    for first in range(0, batch, elements):
        last = min(first + elements, batch)
        for column in range(0, d, width):
            end = min(column + width, d)
            wires = list(block[:, : last - first, : end - column].unbind(0))
            spare = wires.pop()
            for wire, source in zip(wires, x[first:last, :, column:end].unbind(1)):
                wire.copy_(source)
            _compare_exchange(wires, spare, network)
            if mean:
                total = out[first:last, column:end]
                total.copy_(wires[start])
                for row in range(start + 1, stop):
                    total.add_(wires[row])
                total.div_(stop - start)
                continue
            for row in range(start, stop):
                out[first:last, row - start, column:end].copy_(wires[row])
    return out


def _by_network(x: Tensor, start: int, stop: int, *, mean: bool) -> Tensor | None:
    """The sorting network's rows start..stop-1 of every element of a (B, n, d) ``x`` (with ``mean``
    their mean, see :func:`_network_sorted_columns_batched`), or None where the network does not apply
    (the conditions of :func:`sorted_columns`). Elements holding a NaN go to numpy, which sorts it last."""
    batch, n, d = x.shape
    if not (_numpy_sortable(x) and 1 < n <= _NETWORK_MAX_ROWS and d >= _NETWORK_MIN_COLUMNS):
        return None
    nan = torch.isnan(x.sum(dim=(-2, -1)))
    if not bool(nan.any()):
        return _network_sorted_columns_batched(x, start, stop, mean=mean)
    out = torch.empty((batch, d) if mean else (batch, stop - start, d), dtype=x.dtype)
    clean = ~nan
    if bool(clean.any()):
        out[clean] = _network_sorted_columns_batched(x[clean], start, stop, mean=mean)
    kept = torch.from_numpy(np.sort(x[nan].numpy(), axis=-2))[:, start:stop]
    out[nan] = kept.mean(dim=-2) if mean else kept
    return out


def sorted_columns_batched(x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """The rows start..stop-1 of :func:`sorted_columns` of every element of a (B, n, d) ``x``.

    The same values, bitwise, and for the numpy paths the same layout (so that means over them round
    as the 2-D ones do). The sorting network runs along dimension -2, pruned to the wanted rows,
    under the same conditions as in :func:`sorted_columns`; elements holding a NaN go to numpy, which
    sorts it last.

    >>> sorted_columns_batched(torch.tensor([[[3., 0.], [1., 2.], [2., 1.]]]), 1, 2)
    tensor([[[2., 1.]]])
    """
    n = x.shape[1]
    stop = n if stop is None else stop
    networked = _by_network(x, start, stop, mean=False)
    if networked is not None:
        return networked
    if _numpy_sortable(x):
        if n < _TRANSPOSE_FROM_ROWS:
            return torch.from_numpy(np.sort(x.numpy(), axis=-2))[:, start:stop]
        transposed = x.transpose(-2, -1).clone(memory_format=torch.contiguous_format)
        transposed.numpy().sort(axis=-1)
        return transposed.transpose(-2, -1)[:, start:stop]
    return torch.sort(x.transpose(-2, -1).contiguous(), dim=-1).values.transpose(-2, -1)[:, start:stop]


def middle_means_batched(x: Tensor, start: int, stop: int) -> Tensor:
    """The mean of the sorted rows start..stop-1 (start < stop) of every element of a (B, n, d) ``x``: (B, d).

    ``sorted_columns_batched(x, start, stop).mean(dim=-2)``, the same sorted values averaged in
    another order where the sorting network applies (they are summed in row order, tile by tile,
    instead of written out and read back): equal within (stop - start) eps M, M the largest
    absolute value (docs/benchmarks.md: the paper's CWTM from 10.6 to 8.8 ms per element). Elements
    holding a NaN, and matrices the network does not sort, take the sorted values' mean.
    """
    networked = _by_network(x, start, stop, mean=True)
    return networked if networked is not None else sorted_columns_batched(x, start, stop).mean(dim=-2)


def sorted_rows(x: Tensor) -> Tensor:
    """Every row of an (n, m) tensor (or of a (..., n, m) one) sorted in increasing order.

    >>> sorted_rows(torch.tensor([[3., 1., 2.], [0., 5., 4.]]))
    tensor([[1., 2., 3.],
            [0., 4., 5.]])
    """
    if _numpy_sortable(x):
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return torch.sort(x, dim=-1).values
