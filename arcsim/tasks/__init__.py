"""Learning tasks: datasets, partitioners that split them among workers, and models."""

from __future__ import annotations

from arcsim.tasks.datasets import (
    DATASET_REGISTRY,
    DATASETS,
    Dataset,
    DatasetUnavailable,
    download_fashion_mnist,
    load_dataset,
)
from arcsim.tasks.models import MODEL_REGISTRY, MODELS, ModelSpec, build_model, model_loss, num_parameters
from arcsim.tasks.partition import PARTITIONER_REGISTRY, PARTITIONERS, partition

__all__ = [
    "DATASETS",
    "DATASET_REGISTRY",
    "MODELS",
    "MODEL_REGISTRY",
    "PARTITIONERS",
    "PARTITIONER_REGISTRY",
    "Dataset",
    "DatasetUnavailable",
    "ModelSpec",
    "build_model",
    "download_fashion_mnist",
    "load_dataset",
    "model_loss",
    "num_parameters",
    "partition",
]
