"""Geometric median by the smoothed Weiszfeld algorithm."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_matrix, check_positive
from ._norms import clip_rows, exceeds, kth_largest, row_norms_exact, wide_norms

DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 1000
DEFAULT_NU = 1e-8


def geometric_median_impl(
    x: Tensor, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, nu: float = DEFAULT_NU
) -> tuple[Tensor, int]:
    """The smoothed Weiszfeld iteration; returns the estimate and the number of iterations run.

    Huge finite entries (float32 from about 1e19 / sqrt(d)) overflow the squared distances; the
    weights would vanish and the estimate be NaN. Such a float32 x is run in float64. A float64 x
    whose distances overflow too (from about 1e153) takes every norm row by row from the row divided
    by a power of two near its largest entry (arcsim.robust._norms), so that neither the huge
    distances overflow nor the small ones, between the iterate and the ordinary rows, underflow;
    dividing all of x by one such power instead would push the ordinary rows to float64's smallest
    values, where their distances vanish and the iteration stops far from them.
    """
    z = x.mean(dim=0)
    dist = torch.linalg.vector_norm(x - z, dim=1)
    finfo = torch.finfo(x.dtype)
    # Every later distance is at most twice the largest first one: its square stays finite.
    if float(dist.max()) <= math.sqrt(finfo.max) / 4:
        return _weiszfeld(x, z, dist, tol=tol, max_iter=max_iter, nu=nu, unit=1.0, norms=_plain_norms)
    if x.dtype != torch.float64:
        z, iterations = geometric_median_impl(x.to(torch.float64), tol=tol, max_iter=max_iter, nu=nu)
        return z.to(x.dtype), iterations
    # Divide x by a power of two only as far as needed for the sums (of n rows, in the mean and the
    # weighted average) and the differences and distances (up to 2 sqrt(d) times the largest entry)
    # to stay finite: 2**(1024 - headroom) bounds the scaled entries.
    n, d = x.shape
    headroom = math.ceil(math.log2(n)) + math.ceil(math.log2(math.sqrt(d))) + 2
    unit = math.ldexp(1.0, max(0, math.frexp(float(x.abs().max()))[1] - (1024 - headroom)))
    x = x / unit if unit > 1.0 else x
    # Start from the mean of the rows clipped to the median row norm, not from the plain mean, which
    # the huge rows drag far away: Weiszfeld's steps back toward a median that is one of the rows
    # only about halve the distance, and from 1e308 away take more than the 1,000 default iterations.
    # (The coordinate-wise median would do too, but Weiszfeld cannot leave a start that is a row.)
    wide = wide_norms(x)
    mantissa, exponent = kth_largest(wide, n // 2)
    z = clip_rows(x, wide, exceeds(wide, mantissa, exponent), mantissa, exponent).mean(dim=0)
    dist = row_norms_exact(x - z)
    nu = max(nu / unit, 2.0 * n / finfo.max)  # keeps the summed weights finite
    z, iterations = _weiszfeld(x, z, dist, tol=tol, max_iter=max_iter, nu=nu, unit=1.0 / unit, norms=row_norms_exact)
    return z * unit, iterations


def _plain_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def _weiszfeld(
    x: Tensor,
    z: Tensor,
    dist: Tensor,
    *,
    tol: float,
    max_iter: int,
    nu: float,
    unit: float,
    norms: Callable[[Tensor], Tensor],
) -> tuple[Tensor, int]:
    """Weiszfeld steps from z (dist: the rows' distances to z); ``unit`` is 1 in x's own units;
    ``norms`` takes the norms of the rows of a matrix or of one vector."""
    # One (n, d) buffer for x - z, reused by every iteration: a fresh one each time cost more than
    # the arithmetic (page faults on every large allocation).
    diff = torch.empty_like(x)
    for it in range(1, max_iter + 1):
        weights = 1.0 / dist.clamp(min=nu)
        z_next = (weights / weights.sum()) @ x
        step = float(norms(z_next - z))
        z = z_next
        if step <= tol * (unit + float(norms(z))):
            return z, it
        dist = norms(torch.sub(x, z, out=diff))
    return z, max_iter


def geometric_median_batched(
    x: Tensor, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, nu: float = DEFAULT_NU
) -> tuple[Tensor, Tensor]:
    """:func:`geometric_median_impl` on every element of a (B, n, d) ``x``: (B, d) and (B,) iterations.

    The Weiszfeld steps of all elements run together, each element stopping at its own test (its
    result and count are kept; the remaining ones go on, gathered into a smaller batch). The weighted
    averages are batched products whose rounding may differ from the 2-D call's, so a result agrees
    with the 2-D one within the stopping tolerance and its count may differ by one. Elements whose
    distances could overflow (huge finite entries) take the 2-D path, element by element.
    """
    batch = x.shape[0]
    z = x.mean(dim=-2)
    dist = torch.linalg.vector_norm(x - z[:, None, :], dim=-1)
    # The 2-D tests compare Python floats (float64): so do these.
    huge = ~(dist.amax(dim=-1).double() <= math.sqrt(torch.finfo(x.dtype).max) / 4)
    out = torch.empty_like(z)
    iterations = torch.full((batch,), max_iter, dtype=torch.int64)
    active = torch.nonzero(~huge).flatten()
    for b in torch.nonzero(huge).flatten().tolist():
        out[b], iterations[b] = geometric_median_impl(x[b], tol=tol, max_iter=max_iter, nu=nu)
    if active.numel() == batch:
        xa, za, dista = x, z, dist
    else:
        xa, za, dista = x[active], z[active], dist[active]
    diff = torch.empty_like(xa)
    for it in range(1, max_iter + 1):
        if active.numel() == 0:
            break
        weights = 1.0 / dista.clamp(min=nu)
        z_next = torch.matmul((weights / weights.sum(dim=-1, keepdim=True))[:, None, :], xa)[:, 0]
        step = torch.linalg.vector_norm(z_next - za, dim=-1).double()
        za = z_next
        done = step <= tol * (1.0 + torch.linalg.vector_norm(za, dim=-1).double())
        if bool(done.any()):
            out[active[done]] = za[done]
            iterations[active[done].cpu()] = it
            going = ~done
            active, xa, za = active[going], xa[going], za[going]
            diff = diff[: active.numel()]
            if active.numel() == 0:
                break
        dista = torch.linalg.vector_norm(torch.sub(xa, za[:, None, :], out=diff), dim=-1)
    out[active] = za
    return out, iterations


def geometric_median(
    x: Tensor, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, nu: float = DEFAULT_NU
) -> Tensor:
    """Geometric median, computed with the smoothed Weiszfeld algorithm run to convergence.

    .. math::
        \\mathrm{GM}(x) = \\arg\\min_z \\sum_{i=1}^{n} \\|z - x_i\\|, \\qquad
        z_{t+1} = \\frac{\\sum_i w_i x_i}{\\sum_i w_i}, \\quad w_i = \\frac{1}{\\max(\\nu, \\|z_t - x_i\\|)}

    where
        - :math:`z_0` is the average of the rows,
        - :math:`\\nu > 0` smooths the weights so an iterate landing on an input row stays finite,
        - the iteration stops when :math:`\\|z_{t+1} - z_t\\| \\le \\mathrm{tol} (1 + \\|z_{t+1}\\|)`
          (relative change below ``tol``) or after ``max_iter`` iterations.

    Each iteration is O(n d) and fully vectorised. ``x`` may have leading batch dimensions,
    (..., n, d) -> (..., d), each element iterating to its own stop (an element holding a NaN or an
    infinity gives NaN).

    References: Weiszfeld (1937); Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated
    Learning", IEEE TSP 2022 (smoothed Weiszfeld).

    >>> import torch
    >>> geometric_median(torch.tensor([[0., 0.], [1., 0.], [0., 1.], [100., 100.]]), tol=1e-9)
    tensor([0.5000, 0.5000])
    """
    check_positive(tol, name="tol", rule="geometric_median")
    check_positive(nu, name="nu", rule="geometric_median")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"geometric_median: max_iter must be a positive integer, got max_iter = {max_iter!r}")
    if is_batched(x):
        return apply_batched(
            x,
            rule="geometric_median",
            fn=lambda flat: geometric_median_batched(flat, tol=tol, max_iter=max_iter, nu=nu)[0],
        )
    check_matrix(x, rule="geometric_median")
    return geometric_median_impl(x, tol=tol, max_iter=max_iter, nu=nu)[0]
