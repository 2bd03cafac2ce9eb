"""Centered clipping."""

from __future__ import annotations

import torch
from torch import Tensor

from ._batch import apply_batched, is_batched
from ._checks import check_matrix, check_positive


def check_center(center: Tensor | None, d: int | None) -> None:
    """Raise ValueError unless ``center`` is None or a finite tensor of shape (d,) (any length if d is None)."""
    if center is None:
        return
    if not isinstance(center, Tensor):
        raise ValueError(f"centered_clip: center must be a tensor or None, got {type(center).__name__}")
    if center.dim() != 1 or (d is not None and center.shape[0] != d):
        expected = "(d,)" if d is None else f"({d},)"
        raise ValueError(f"centered_clip: center must have shape {expected}, got {tuple(center.shape)}")
    if not bool(torch.isfinite(center).all()):
        raise ValueError("centered_clip: center has non-finite values")


def centered_clip_impl(x: Tensor, *, tau: float, iters: int, center: Tensor | None) -> Tensor:
    v = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device) if center is None else center.to(x)
    diff = torch.empty_like(x)  # reused by every iteration (a fresh (n, d) buffer page-faults each time)
    for _ in range(iters):
        torch.sub(x, v, out=diff)
        norms = torch.linalg.vector_norm(diff, dim=1)
        scale = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
        v = v + (scale / x.shape[0]) @ diff
    return v


def centered_clip_batched(x: Tensor, *, tau: float, iters: int, center: Tensor | None) -> Tensor:
    """:func:`centered_clip_impl` on every element of a (B, n, d) ``x`` (one ``center`` for all): (B, d).

    The clipped sums are batched products, whose rounding may differ from the 2-D call's.
    """
    batch, n, d = x.shape
    v = torch.zeros((batch, d), dtype=x.dtype, device=x.device)
    if center is not None:
        v = v + center.to(x)
    diff = torch.empty_like(x)
    for _ in range(iters):
        torch.sub(x, v[:, None, :], out=diff)
        norms = torch.linalg.vector_norm(diff, dim=-1)
        scale = torch.where(norms > tau, tau / norms, torch.ones_like(norms))
        v = v + torch.matmul((scale / n)[:, None, :], diff)[:, 0]
    return v


def centered_clip(x: Tensor, *, tau: float, iters: int = 1, center: Tensor | None = None) -> Tensor:
    """Centered clipping: move a centre towards the vectors, each clipped around it to radius tau.

    .. math::
        v_{l+1} = v_l + \\frac{1}{n} \\sum_{i=1}^{n} \\min\\left(1, \\frac{\\tau}{\\|x_i - v_l\\|}\\right)(x_i - v_l),
        \\qquad l = 0, \\dots, L - 1

    where
        - :math:`v_0` is ``center`` (the previous aggregate in the paper; zeros when None),
        - :math:`\\tau > 0` is the clipping radius and L = ``iters`` (the paper finds L = 1 enough).

    Reference: Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021.

    ``x`` may have leading batch dimensions, (..., n, d) -> (..., d), with one ``center`` for all
    elements (an element holding a NaN or an infinity gives NaN).

    >>> import torch
    >>> centered_clip(torch.tensor([[1., 0.], [0., 1.], [30., 40.]]), tau=5.0)
    tensor([1.3333, 1.6667])
    """
    check_positive(tau, name="tau", rule="centered_clip")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"centered_clip: iters must be a positive integer, got iters = {iters!r}")
    if is_batched(x):
        check_center(center, x.shape[-1])
        return apply_batched(
            x, rule="centered_clip", fn=lambda flat: centered_clip_batched(flat, tau=tau, iters=iters, center=center)
        )
    check_matrix(x, rule="centered_clip")
    check_center(center, x.shape[1])
    return centered_clip_impl(x, tau=tau, iters=iters, center=center)
