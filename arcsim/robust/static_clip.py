"""Static clipping with a fixed threshold."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_finite, check_positive, check_shape
from ._norms import clip_rows, exceeds, wide_norms


def static_clip_with_report(x: Tensor, *, c: float, norms: Tensor | None = None) -> tuple[Tensor, float, Tensor]:
    """Static clipping, also returning the threshold and the boolean mask of the rows it changed.

    ``norms``: ``torch.linalg.vector_norm(x, dim=1)`` when the caller has it already. When one of them
    is not finite (finite entries overflow a squared norm, or the norm exceeds the dtype's range), the
    norms are taken as mantissa and exponent (arcsim.robust._norms).
    """
    norms = torch.linalg.vector_norm(x, dim=1) if norms is None else norms
    if not bool(torch.isfinite(norms).all()):
        wide = wide_norms(x)
        mantissa, exponent = math.frexp(c)
        clipped = exceeds(wide, mantissa, exponent)
        return clip_rows(x, wide, clipped, mantissa, exponent), float(c), clipped
    clipped = norms > c
    scale = torch.where(clipped, c / norms, torch.ones_like(norms))
    return x * scale[:, None], float(c), clipped


def static_clip_batched_with_report(
    x: Tensor, *, c: float, norms: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`static_clip_with_report` on every element of a (B, n, d) ``x``: (B, n, d), (B,), (B, n).

    Bitwise the 2-D call's results per element; an element whose norms are not finite in x's dtype
    takes the 2-D mantissa-and-exponent path, element by element.
    """
    norms = torch.linalg.vector_norm(x, dim=-1) if norms is None else norms
    clipped = norms > c
    scale = torch.where(clipped, c / norms, torch.ones_like(norms))
    out = x * scale[:, :, None]
    for b in torch.nonzero(~torch.isfinite(norms).all(dim=-1)).flatten().tolist():
        out[b], _, clipped[b] = static_clip_with_report(x[b], c=c)
    threshold = torch.full((x.shape[0],), float(c), dtype=torch.float64, device=x.device)
    return out, threshold, clipped


def static_clip(x: Tensor, *, c: float) -> Tensor:
    """Clip every vector to norm at most ``c``.

    .. math::
        \\mathrm{clip}_c(x)_i = \\min\\left(1, \\frac{c}{\\|x_i\\|}\\right) x_i

    where c > 0 is a fixed threshold chosen in advance. Rows with norm at most c are returned
    bitwise equal. No fixed c preserves robustness for every input (Lemma 3.1 of the ARC paper,
    arXiv:2405.14432); the paper uses c = 2 as a baseline. ``x`` may have leading batch dimensions,
    (..., n, d) (an element holding a NaN or an infinity gives NaN instead of raising).

    >>> import torch
    >>> static_clip(torch.tensor([[3., 4.], [0.3, 0.4]]), c=1.0)
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000]])
    """
    check_positive(c, name="c", rule="static_clip")
    if is_batched(x):
        return apply_batched(
            x,
            rule="static_clip",
            norms=True,
            fn=lambda flat, norms: static_clip_batched_with_report(flat, c=c, norms=norms)[0],
        )
    check_shape(x, rule="static_clip")
    # The row norms double as the finiteness test: x is read once before the scaling.
    norms = torch.linalg.vector_norm(x, dim=1)
    check_finite(x, rule="static_clip", row_norms=norms)
    return static_clip_with_report(x, c=c, norms=norms)[0]
