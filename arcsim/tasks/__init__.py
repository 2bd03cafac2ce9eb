"""Learning tasks: datasets, partitioners that split them among workers, and models."""

from __future__ import annotations

from arcsim.tasks.datasets import DATASETS, Dataset, DatasetUnavailable, download_fashion_mnist, load_dataset
from arcsim.tasks.models import MODELS, build_model, num_parameters
from arcsim.tasks.partition import PARTITIONERS, partition

__all__ = [
    "DATASETS",
    "MODELS",
    "PARTITIONERS",
    "Dataset",
    "DatasetUnavailable",
    "build_model",
    "download_fashion_mnist",
    "load_dataset",
    "num_parameters",
    "partition",
]
