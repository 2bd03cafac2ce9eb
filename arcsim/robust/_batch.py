"""Leading batch dimensions: (..., n, d) input to the rules, one independent (n, d) problem per element.

A batched call flattens the batch dimensions to one, (B, n, d), runs the rule's vectorised form on
it and restores them. An element whose (n, d) slice holds a NaN or an infinity does not raise (as
a 2-D call does) and cannot disturb the others: it is replaced by zeros before the rule runs (so no
NaN warnings, no overflow path) and its output is set to NaN afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._checks import check_shape

# On CPU a batch is processed in chunks of elements of about this many bytes: each pass over a chunk
# (norms, scaling, distances, sorting) then finds it in cache from the pass before, and its
# temporaries are recycled by the allocator instead of being mapped (and page-faulted) afresh, which
# for a whole large batch costs more than the vectorisation saves (docs/benchmarks.md). Elements
# larger than this go one per chunk, through the batched code with a batch of one.
CHUNK_BYTES = 16 << 20


_DEVICE_PATHS = False  # set by device_paths()


def host_tuned(x: Tensor) -> bool:
    """Whether ``x`` takes the paths tuned for the CPU (cache-sized chunks, element by element through
    the 2-D code, sorting networks, numpy's sort) rather than those for an accelerator (one batched
    kernel per step): True for a CPU tensor, outside :func:`device_paths`.

    >>> host_tuned(torch.zeros(2, 3, 4))
    True
    """
    return x.device.type == "cpu" and not _DEVICE_PATHS


@contextlib.contextmanager
def device_paths() -> Iterator[None]:
    """Within it, CPU tensors take the accelerator paths too: how the tests run the code a GPU runs
    (batched Gram matrices, batched mixing products, ``torch.sort``, whole batches) on a machine
    without one. Not thread-safe; for tests and measurements.

    >>> with device_paths():
    ...     host_tuned(torch.zeros(2, 3, 4))
    False
    """
    global _DEVICE_PATHS
    before, _DEVICE_PATHS = _DEVICE_PATHS, True
    try:
        yield
    finally:
        _DEVICE_PATHS = before


def chunks(x: Tensor) -> list[slice]:
    """The slices of a (B, n, d) ``x``'s elements processed together (all of them off the CPU).

    >>> chunks(torch.zeros(5, 1024, 1024))  # 4 MiB per element
    [slice(0, 4, None), slice(4, 5, None)]
    """
    count = x.shape[0]
    if not host_tuned(x) or count == 0:
        return [slice(0, count)]
    size = max(1, CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def is_batched(x: object) -> bool:
    """Whether ``x`` is a tensor with at least one leading batch dimension, (..., n, d).

    >>> is_batched(torch.zeros(2, 3, 4)), is_batched(torch.zeros(3, 4))
    (True, False)
    """
    return isinstance(x, Tensor) and x.dim() >= 3


def invalid_elements(x: Tensor, probe: Tensor | None = None) -> Tensor:
    """The (B,) mask of the elements of a (B, n, d) ``x`` holding a NaN or an infinity.

    ``probe``: a per-element or per-row quantity that is finite wherever the element is (its sum, its
    row norms); only the elements whose probe is not finite (which finite entries can also cause, by
    overflow) are tested entry by entry.

    >>> invalid_elements(torch.tensor([[[1.0]], [[float("nan")]], [[3e38]]])).tolist()
    [False, True, False]
    """
    if probe is None:
        probe = x.sum(dim=(-2, -1))
    finite = torch.isfinite(probe)
    suspect = ~(finite.all(dim=-1) if finite.dim() > 1 else finite)
    if not bool(suspect.any()):
        return suspect
    rows = torch.nonzero(suspect).flatten()
    suspect[rows] = ~torch.isfinite(x[rows]).flatten(1).all(dim=1)
    return suspect


def zero_elements(x: Tensor, invalid: Tensor) -> Tensor:
    """``x`` with the ``invalid`` elements replaced by zeros (``x`` itself when there are none)."""
    if not bool(invalid.any()):
        return x
    return x.masked_fill(invalid[:, None, None], 0.0)


def nan_elements(out: Tensor, invalid: Tensor) -> Tensor:
    """``out`` (leading dimension B) with the ``invalid`` elements set to NaN."""
    if not bool(invalid.any()):
        return out
    return out.masked_fill(invalid.reshape(-1, *([1] * (out.dim() - 1))), float("nan"))


def apply_batched(
    x: Tensor,
    *,
    rule: str,
    fn: Callable[[Tensor], Tensor],
    check_n: Callable[[int], None] | None = None,
    norms: bool = False,
) -> Tensor:
    """Run ``fn`` (a (B, n, d) -> (B, ...) rule) on an (..., n, d) ``x``; returns (..., ...).

    Validates the shape and dtype and the rule's condition on n (``check_n``); marks the non-finite
    elements and hands ``fn`` zeros in their place, then sets their outputs to NaN. ``norms``: ``fn``
    takes the (B, n) row norms as its second argument (they double as the finiteness probe).
    """
    check_shape(x, rule=rule, batched=True)
    batch, (n, d) = x.shape[:-2], x.shape[-2:]
    if check_n is not None:
        check_n(n)
    flat = x.reshape(-1, n, d)
    outs = []
    for part in chunks(flat):
        piece = flat[part]
        row_norms = torch.linalg.vector_norm(piece, dim=-1) if norms else None
        invalid = invalid_elements(piece, row_norms)
        if bool(invalid.any()):
            piece = zero_elements(piece, invalid)
            row_norms = None if row_norms is None else row_norms.masked_fill(invalid[:, None], 0.0)
        outs.append(nan_elements(fn(piece) if row_norms is None else fn(piece, row_norms), invalid))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(*batch, *out.shape[1:])


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """The rows ``index`` (B, m) of each element of a (B, n, d) ``x``: (B, m, d)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]
