"""Row norms and clipping that stay exact however large the entries are.

A squared norm overflows for finite entries (float32 from about 1e19 / sqrt(d), float64 from about
1e154 / sqrt(d)), and a norm itself can exceed the dtype's range: ``[1.7e308, 1.7e308]`` has the
norm 2.4e308, which no float64 holds. An infinite norm would scale its row to zero (or, divided by
an infinite threshold, to NaN) instead of clipping it, so the clipping rules take this path when a
norm in x's dtype is not finite. Every norm is held as ``mantissa * 2**exponent`` (a float64 in
[0.5, 1) and an int64), computed from the row divided by a power of two near its largest entry
(exact), and compared and divided in that form. For norms that float64 can hold the results are
bitwise those of plain float64 arithmetic: scaling by a power of two is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Exponent given to a zero norm: below any non-zero norm (the smallest is about 2**-1074).
_ZERO_EXPONENT = -(1 << 20)
# The smallest power of two a row is divided by: rows whose largest entry is below 2**-1000 are not
# scaled up further, which keeps 2**-shift finite (2**1074 is not) and their squares far from underflow.
_MIN_SHIFT = -1000


@dataclass(frozen=True)
class WideNorms:
    """The rows' norms as ``mantissa * 2**exponent`` and the rows divided by ``2**shift``.

    ``scaled[i] = x[i] * 2**-shift[i]`` (float64, entries below 2 in magnitude), so its norm,
    ``mantissa[i] * 2**(exponent[i] - shift[i])``, is always finite.
    """

    mantissa: Tensor  # (n,) float64 in [0.5, 1); 0 for a zero row
    exponent: Tensor  # (n,) int64; _ZERO_EXPONENT for a zero row
    shift: Tensor  # (n,) int64
    scaled: Tensor  # (n, d) float64


def _ldexp(x: Tensor, e: Tensor) -> Tensor:
    """``x * 2**e`` for int64 exponents of up to about 2,100 in magnitude, exact unless the result
    leaves float64's range. ``2**e`` alone is inf from e = 1024 and 0 below -1074; two half steps keep
    each factor representable (exp2 of an integer is exact)."""
    half = torch.div(e, 2, rounding_mode="floor")
    return x * torch.exp2(half.to(torch.float64)) * torch.exp2((e - half).to(torch.float64))


def wide_norms(x: Tensor) -> WideNorms:
    """Each row's Euclidean norm of ``x`` (any float dtype) as mantissa and exponent."""
    wide = x.to(torch.float64)
    # 2**(e - 1) rather than 2**e, the power frexp names: for entries >= 2**1023, 2**e is inf.
    top = torch.frexp(wide.abs().amax(dim=1)).exponent.to(torch.int64)
    shift = (top - 1).clamp(min=_MIN_SHIFT)
    scaled = _ldexp(wide, -shift[:, None])
    mantissa, exponent = torch.frexp(torch.linalg.vector_norm(scaled, dim=1))
    exponent = torch.where(mantissa == 0, _ZERO_EXPONENT, exponent.to(torch.int64) + shift)
    return WideNorms(mantissa=mantissa, exponent=exponent, shift=shift, scaled=scaled)


def row_norms_exact(x: Tensor) -> Tensor:
    """The norms of the rows of a float64 ``x`` (or of a vector), with neither the squares of huge
    entries overflowing nor those of tiny ones underflowing: inf only where the norm exceeds float64."""
    norms = wide_norms(x.reshape(-1, x.shape[-1]))
    return _ldexp(norms.mantissa, norms.exponent).reshape(x.shape[:-1])


def kth_largest(norms: WideNorms, k: int) -> tuple[Tensor, Tensor]:
    """The (k+1)-th largest norm (k counts from 0) as a (mantissa, exponent) pair of 0-d tensors."""
    # Descending by (exponent, mantissa): sort by the mantissa, then stably by the exponent.
    order = torch.sort(norms.mantissa, descending=True, stable=True).indices
    order = order[torch.sort(norms.exponent[order], descending=True, stable=True).indices]
    return norms.mantissa[order[k]], norms.exponent[order[k]]


def exceeds(norms: WideNorms, mantissa: Tensor | float, exponent: Tensor | int) -> Tensor:
    """The (n,) mask of the norms strictly larger than ``mantissa * 2**exponent`` (a frexp pair)."""
    return (norms.exponent > exponent) | ((norms.exponent == exponent) & (norms.mantissa > mantissa))


def clip_rows(x: Tensor, norms: WideNorms, clipped: Tensor, mantissa: Tensor | float, exponent: Tensor | int) -> Tensor:
    """``x`` with each ``clipped`` row scaled to the norm ``mantissa * 2**exponent``; others bitwise x.

    The scaled row is ``scaled[i] * (mantissa / mantissa[i]) * 2**(exponent - exponent[i] + shift[i])``,
    which is ``x[i] * C / ||x[i]||`` rounded once (then to x's dtype), the result of dividing in float64
    when the norms fit in it.
    """
    out = x.clone()
    rows = torch.nonzero(clipped).flatten()
    if rows.numel():
        ratio = mantissa / norms.mantissa[rows]
        power = exponent - norms.exponent[rows] + norms.shift[rows]
        out[rows] = _ldexp(norms.scaled[rows] * ratio[:, None], power[:, None]).to(x.dtype)
    return out


def to_float(mantissa: Tensor | float, exponent: Tensor | int) -> float:
    """``mantissa * 2**exponent`` as a Python float: inf when it is beyond float64's range."""
    try:
        return math.ldexp(float(mantissa), int(exponent))
    except OverflowError:
        return math.inf
