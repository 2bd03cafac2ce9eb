"""An example arcsim plugin: one aggregator (``meamed``), one attack (``scaled_mean``), one dataset (``blobs``).

Installed with pip, its entry points (pyproject.toml) make the three names usable in any config;
without installing, a config can name them as ``arcsim_example_plugin:meamed`` and so on when the
package is importable. docs/plugins.md walks through it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from arcsim.robust import rule
from arcsim.seeding import generator
from arcsim.tasks import Dataset

__all__ = ["blobs", "meamed", "scaled_mean"]


@rule(kind="aggregator", condition=lambda n, f: n > 2 * f, requires="n > 2f")
def meamed(x: Tensor, *, f: int) -> Tensor:
    """Mean around the median (Xie et al., 2018): per coordinate, the mean of the n - f values closest to the median."""
    median = x.median(dim=0).values
    closest = (x - median).abs().argsort(dim=0, stable=True)[: x.shape[0] - f]
    return x.gather(0, closest).mean(dim=0)


def scaled_mean(honest: Tensor, *, num_byzantine: int, scale: float = -3.0) -> Tensor:
    """Every Byzantine vector is ``scale`` times the honest mean (``attack_params: {scale: ...}``)."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scaled_mean: scale must be a number, got {scale!r}")
    return (honest.mean(dim=0) * scale).unsqueeze(0).repeat(num_byzantine, 1)


@functools.lru_cache(maxsize=4)
def _blobs(seed: int) -> Dataset:
    gen = generator(seed, "dataset", "blobs")
    classes, features = 4, 16
    centres = torch.randn(classes, features, generator=gen) * 2.0

    def draw(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(count) % classes
        return (centres[labels] + torch.randn(count, features, generator=gen)).reshape(count, 1, 4, 4), labels

    train_x, train_y = draw(400)
    test_x, test_y = draw(100)
    return Dataset(name="blobs", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, num_classes=classes)


def blobs(*, root: str | None, seed: int) -> Dataset:
    """Four Gaussian blobs in 16 dimensions shaped (1, 4, 4): 400 train and 100 test samples, drawn from ``seed``."""
    return _blobs(int(seed))
