"""Adaptive Robust Clipping (ARC)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_finite, check_minority, check_shape
from ._norms import clip_rows, exceeds, kth_largest, to_float, wide_norms


def arc_num_clipped(n: int, f: int) -> int:
    """The number of vectors ARC clips: :math:`k = \\lfloor 2 f (n - f) / n \\rfloor`, in integer arithmetic.

    A float product truncated with ``int()`` is wrong for some (n, f), e.g. n = 242, f = 33.

    >>> arc_num_clipped(242, 33)
    57
    """
    check_minority(n, f, rule="arc")  # also keeps n = 0 from dividing by zero
    return (2 * f * (n - f)) // n


def arc_with_report(x: Tensor, *, f: int, norms: Tensor | None = None) -> tuple[Tensor, float, Tensor]:
    """ARC, also returning the clip threshold C and the boolean mask of the rows it changed.

    ``norms``: ``torch.linalg.vector_norm(x, dim=1)`` when the caller has it already. When one of them
    is not finite (finite entries overflow a squared norm, or the norm exceeds the dtype's range), the
    norms are taken as mantissa and exponent (arcsim.robust._norms); C is then a Python float that
    may be inf, if the (k+1)-th largest norm is beyond float64's range.
    """
    n = x.shape[0]
    k = arc_num_clipped(n, f)
    norms = torch.linalg.vector_norm(x, dim=1) if norms is None else norms
    if not bool(torch.isfinite(norms).all()):
        wide = wide_norms(x)
        mantissa, exponent = kth_largest(wide, k)
        clipped = exceeds(wide, mantissa, exponent)
        return clip_rows(x, wide, clipped, mantissa, exponent), to_float(mantissa, exponent), clipped
    if k == 0:
        return x.clone(), float(norms.max()), torch.zeros(n, dtype=torch.bool, device=x.device)
    # The (k+1)-th largest norm; topk over n values, not over the data.
    threshold = torch.topk(norms, k + 1, largest=True, sorted=True).values[k]
    clipped = norms > threshold
    scale = torch.where(clipped, threshold / norms, torch.ones_like(norms))
    return x * scale[:, None], float(threshold), clipped


def arc_batched_with_report(x: Tensor, *, f: int, norms: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`arc_with_report` on every element of a (B, n, d) ``x``: (B, n, d), (B,) float64, (B, n).

    ``norms``: the (B, n) row norms when the caller has them. Each element's output, threshold and
    mask are bitwise those of the 2-D call (the same norms, the same top-k, the same division). An
    element whose norms are not finite in x's dtype (finite entries that overflow) takes the 2-D
    mantissa-and-exponent path, element by element (its threshold may then be inf).
    """
    batch, n, _ = x.shape
    k = arc_num_clipped(n, f)
    norms = torch.linalg.vector_norm(x, dim=-1) if norms is None else norms
    if k == 0:
        out = x.clone()
        threshold = norms.amax(dim=-1)
        clipped = torch.zeros((batch, n), dtype=torch.bool, device=x.device)
    else:
        threshold = torch.topk(norms, k + 1, dim=-1, largest=True, sorted=True).values[:, k]
        clipped = norms > threshold[:, None]
        scale = torch.where(clipped, threshold[:, None] / norms, torch.ones_like(norms))
        out = x * scale[:, :, None]
    threshold = threshold.to(torch.float64)
    for b in torch.nonzero(~torch.isfinite(norms).all(dim=-1)).flatten().tolist():
        out[b], wide_threshold, clipped[b] = arc_with_report(x[b], f=f)
        threshold[b] = wide_threshold
    return out, threshold, clipped


def arc(x: Tensor, *, f: int) -> Tensor:
    """Adaptive Robust Clipping: clip the k largest vectors to the (k+1)-th largest norm.

    .. math::
        k = \\left\\lfloor \\frac{2 f (n - f)}{n} \\right\\rfloor, \\qquad
        C = \\|x_{\\tau(k+1)}\\|, \\qquad
        \\mathrm{ARC}(x)_i = \\min\\left(1, \\frac{C}{\\|x_i\\|}\\right) x_i

    where
        - n is the number of input vectors (rows of ``x``) and f the number of Byzantine ones,
        - :math:`\\tau` orders the rows by decreasing norm, so C is the (k+1)-th largest norm.

    Only rows whose norm exceeds C change (at most k of them); the others are returned bitwise
    equal. f = 0 gives k = 0 and ARC is the identity. Needs 2f < n.

    Reference: Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "Boosting Robustness by Clipping
    Gradients in Distributed Learning", arXiv:2405.14432.

    ``x`` may have leading batch dimensions, (..., n, d): each element is clipped on its own (an
    element holding a NaN or an infinity gives NaN instead of raising).

    Example (docs/paper.md): f = 1, n = 3 gives k = 1 and C = ||[4, 5, 6]||; only the last row changes.

    >>> import torch
    >>> arc(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]]), f=1)
    tensor([[1.0000, 2.0000, 3.0000],
            [4.0000, 5.0000, 6.0000],
            [4.4100, 5.0400, 5.6701]])
    """
    if is_batched(x):
        return apply_batched(
            x,
            rule="arc",
            check_n=lambda n: check_minority(n, f, rule="arc"),
            norms=True,
            fn=lambda flat, norms: arc_batched_with_report(flat, f=f, norms=norms)[0],
        )
    check_shape(x, rule="arc")
    # The row norms double as the finiteness test: x is read once before the scaling.
    norms = torch.linalg.vector_norm(x, dim=1)
    check_finite(x, rule="arc", row_norms=norms)
    check_minority(x.shape[0], f, rule="arc")
    return arc_with_report(x, f=f, norms=norms)[0]
