"""Validation shared by every rule: the input matrix, f, and finiteness.

Hyperparameters are checked when a pipeline is built; conditions that depend on n are checked when a
rule is called, and every error names the offending values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_matrix(x: Tensor, *, rule: str) -> None:
    """Raise ValueError unless ``x`` is a 2-D floating tensor with at least one row, all finite."""
    check_shape(x, rule=rule)
    check_finite(x, rule=rule)


def check_shape(x: Tensor, *, rule: str, batched: bool = False) -> None:
    """:func:`check_matrix` without the finiteness test (for callers that test it from the row norms).

    ``batched``: also accept (..., n, d) tensors with leading batch dimensions.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{rule}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or (x.dim() != 2 and not batched):
        raise ValueError(f"{rule}: expected an (n, d) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{rule}: expected a floating tensor (float32 or float64), got {x.dtype}")
    if x.shape[-2] < 1:
        raise ValueError(f"{rule}: expected at least one row (n >= 1), got n = 0")


def check_finite(x: Tensor, *, rule: str, row_norms: Tensor | None = None) -> None:
    """Raise ValueError if ``x`` holds a NaN or an infinity.

    The fast path reads ``x`` once (a sum), or not at all when the caller passes the row norms it
    needs anyway (a norm is finite only if its whole row is); only when the sum or a norm is not
    finite (which finite inputs can also cause, by overflow) is the exact element-wise test run.
    """
    if x.numel() == 0:
        return
    probe = x.sum() if row_norms is None else row_norms
    if bool(torch.isfinite(probe).all()):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:8].tolist()
        raise ValueError(f"{rule}: input has non-finite values (NaN or Inf) in rows {rows}")


def check_f(f: int, *, rule: str) -> None:
    """Raise ValueError unless ``f`` is a non-negative integer (checked when a rule is built)."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"{rule}: f must be a non-negative integer, got f = {f!r}")


def check_minority(n: int, f: int, *, rule: str) -> None:
    """Raise ValueError unless 2f < n."""
    check_f(f, rule=rule)
    if not 2 * f < n:
        raise ValueError(f"{rule}: needs 2f < n, got n = {n}, f = {f}")


def check_positive(value: float, *, name: str, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise ValueError(f"{rule}: {name} must be a positive number, got {name} = {value!r}")
    if value == float("inf"):
        raise ValueError(f"{rule}: {name} must be finite, got {name} = {value!r}")
