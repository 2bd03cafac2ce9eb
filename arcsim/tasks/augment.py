"""Training-time data augmentation, drawn per worker and round so every engine makes the same batches.

``augment`` (a config key) names it:

* ``"none"`` (default): the batch as drawn from the shard.
* ``"crop_flip"``: the augmentation of the authors' CIFAR-10 pipeline (torchvision's
  ``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip()``): each image is padded with
  :data:`PADDING` black pixels on every side, a crop of its own size is taken at a uniformly random
  offset, and it is mirrored left to right with probability 1/2. "Black" is each channel's smallest
  training value (the standardised value of a raw 0, which a natural image set holds), so the
  padding is what torchvision pads before it normalises.

Only the honest workers' (and a data attack's Byzantine trainers') training batches are augmented;
evaluation never is. The draws for one batch come from ``arcsim.seeding.generator(seed, "augment",
round, worker_id)``: offsets first (``(B, 2)``, row then column), then flips (``(B,)``), so the
in-process, gRPC and batched engines augment a worker's batch identically. The work itself is one
gather over the whole batch (any leading dimensions), not a loop over images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from arcsim.seeding import generator

__all__ = ["AUGMENTATIONS", "PADDING", "CropFlip", "crop_flip", "draw_crop_flip"]

AUGMENTATIONS: tuple[str, ...] = ("none", "crop_flip")
PADDING = 4  # pixels of padding on each side before the random crop (the authors' CIFAR-10 setting)


def draw_crop_flip(g: torch.Generator, count: int, *, padding: int = PADDING) -> tuple[Tensor, Tensor]:
    """``count`` crop offsets in ``[0, 2 * padding]`` (``(count, 2)``: row, column) and flips (``(count,)``)."""
    offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=g)
    flips = torch.randint(0, 2, (count,), generator=g).bool()
    return offsets, flips


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, *, fill: Tensor, padding: int = PADDING) -> Tensor:
    """Images ``x`` (``(..., C, H, W)``) padded with ``fill`` (``(C,)``, one value per channel), cropped
    back to ``H x W`` at ``offsets`` (``(..., 2)``) and mirrored where ``flips`` (``(...,)``) is true.

    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> crop_flip(x, torch.tensor([[0, 0]]), torch.tensor([False]), fill=torch.tensor([-1.0]), padding=1)
    tensor([[[[-1., -1.],
              [-1.,  0.]]]])
    >>> crop_flip(x, torch.tensor([[1, 1]]), torch.tensor([True]), fill=torch.tensor([-1.0]), padding=1)
    tensor([[[[1., 0.],
              [3., 2.]]]])
    """
    if x.dim() < 3:
        raise ValueError(f"crop_flip needs images (..., C, H, W), got shape {tuple(x.shape)}")
    *lead, channels, height, width = x.shape
    images = x.reshape(-1, channels, height, width)
    count = images.shape[0]
    offsets = offsets.reshape(count, 2).to(x.device)
    flips = flips.reshape(count).to(x.device)
    padded = (
        fill.to(x.device, x.dtype)
        .reshape(1, channels, 1, 1)
        .expand(count, channels, height + 2 * padding, width + 2 * padding)
        .clone()
    )
    padded[:, :, padding : padding + height, padding : padding + width] = images
    rows = offsets[:, :1] + torch.arange(height, device=x.device)  # (count, H)
    columns = torch.arange(width, device=x.device).expand(count, width)
    columns = torch.where(flips[:, None], columns.flip(1), columns) + offsets[:, 1:]  # mirrored: read right to left
    batch = torch.arange(count, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], columns[:, None, :]]  # (count, H, W, C)
    return out.permute(0, 3, 1, 2).reshape(*lead, channels, height, width)


class CropFlip:
    """``crop_flip`` for one task: the fill (each channel's smallest training value) and the draws."""

    def __init__(self, train_x: Tensor) -> None:
        if train_x.dim() != 4:
            raise ValueError(
                f"augment: crop_flip needs image inputs (channels, height, width), got input shape "
                f"{tuple(train_x.shape[1:])}"
            )
        self.fill = train_x.transpose(0, 1).reshape(train_x.shape[1], -1).amin(dim=1)

    def draws(self, seed: int, round_: int, worker_id: int, count: int) -> tuple[Tensor, Tensor]:
        return draw_crop_flip(generator(seed, "augment", round_, worker_id), count)

    def __call__(self, x: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        return crop_flip(x, offsets, flips, fill=self.fill)
