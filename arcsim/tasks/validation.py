"""The validation split: a share of the training set held out before the training set is partitioned.

Hyperparameters are selected on the validation set and reported on the test set (issue 11's protocol), so
the validation samples must never reach a worker. :func:`validation_split` draws them with a generator of
their own, ``derive_seed(seed, "validation")``: the split depends only on the run's seed, the fraction
and the size of the training set, so the coordinator, every worker and the in-process engine compute the
same indices, and it does not move any other draw (batches, partition, attacks keep their streams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from arcsim.seeding import generator


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to a single bool
class ValidationSplit:
    """Sorted, disjoint int64 indices into the training set whose union is all of it.

    ``train`` is what the partitioner deals to the honest workers; ``validation`` what the evaluations
    score besides the test set (empty when the fraction is 0).
    """

    train: Tensor
    validation: Tensor


def validation_size(num_samples: int, *, fraction: float) -> int:
    """How many of ``num_samples`` training samples ``fraction`` holds out (rounded half up).

    >>> validation_size(5000, fraction=0.2), validation_size(10, fraction=0.25), validation_size(7, fraction=0.0)
    (1000, 3, 0)
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction!r}")
    return math.floor(fraction * num_samples + 0.5)


def validation_split(num_samples: int, *, fraction: float, seed: int) -> ValidationSplit:
    """Hold out ``fraction`` of ``num_samples`` training samples, drawn uniformly from the seed's own stream.

    A fraction of 0 gives every index to training and none to validation (the run without a split).
    ValueError when a non-zero fraction would leave the validation set or the training set empty.
    """
    size = validation_size(num_samples, fraction=fraction)
    if fraction > 0.0 and not 0 < size < num_samples:
        raise ValueError(
            f"validation_fraction {fraction} of {num_samples} training samples leaves "
            f"{size} for validation and {num_samples - size} for training; both must be non-empty"
        )
    if size == 0:
        return ValidationSplit(train=torch.arange(num_samples), validation=torch.empty(0, dtype=torch.int64))
    order = torch.randperm(num_samples, generator=generator(seed, "validation"))
    # Sorted: the partitioner sees the remaining samples in the dataset's order, as it sees the whole set
    # without a split.
    return ValidationSplit(train=order[size:].sort().values, validation=order[:size].sort().values)
