"""Training-batch augmentation (crop_flip) and the CIFAR CNN: the arithmetic, the draws, both engines."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from arcsim.config import ConfigError, from_dict
from arcsim.engine.batched import run_batched
from arcsim.engine.inproc import run_inproc
from arcsim.tasks import augment
from arcsim.tasks.augment import PADDING, CropFlip, crop_flip, draw_crop_flip
from arcsim.tasks.models import build_model, num_parameters


def test_augment_doctests() -> None:
    result = doctest.testmod(augment)
    assert result.attempted > 0 and result.failed == 0


def test_a_centred_crop_is_the_image_and_a_flip_its_mirror() -> None:
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    centre = torch.full((6, 2), PADDING)
    fill = torch.zeros(3)
    assert torch.equal(crop_flip(x, centre, torch.zeros(6, dtype=torch.bool), fill=fill), x)
    assert torch.equal(crop_flip(x, centre, torch.ones(6, dtype=torch.bool), fill=fill), x.flip(-1))


def test_a_corner_crop_shifts_the_image_and_pads_with_each_channels_fill() -> None:
    # Prepare: the crop at offset (0, 0) shows the padding above and left of the image
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    fill = torch.tensor([-7.0, -9.0])
    # Execute
    out = crop_flip(x, torch.tensor([[0, 0]]), torch.tensor([False]), fill=fill)
    # Assert
    assert torch.equal(out[0, :, PADDING:, PADDING:], x[0, :, : 8 - PADDING, : 8 - PADDING])
    assert torch.equal(out[0, 0, :PADDING], torch.full((PADDING, 8), -7.0))
    assert torch.equal(out[0, 1, :, :PADDING], torch.full((8, PADDING), -9.0))


def test_leading_dimensions_are_one_batch_image_by_image() -> None:
    # Prepare: (runs, workers, batch) images with their own draws
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 1, 8, 8, generator=g)
    offsets, flips = draw_crop_flip(g, 24)
    fill = torch.tensor([-1.5])
    # Execute
    whole = crop_flip(x, offsets.reshape(2, 3, 4, 2), flips.reshape(2, 3, 4), fill=fill)
    alone = torch.stack(
        [
            crop_flip(x.reshape(24, 1, 8, 8)[i : i + 1], offsets[i : i + 1], flips[i : i + 1], fill=fill)
            for i in range(24)
        ]
    )
    # Assert
    assert torch.equal(whole.reshape(24, 1, 8, 8), alone.reshape(24, 1, 8, 8))


def test_draws_are_seeded_per_round_and_worker_and_cover_every_offset() -> None:
    crop = CropFlip(torch.zeros(4, 3, 8, 8))
    first = crop.draws(1, 5, 2, 25)
    assert all(torch.equal(a, b) for a, b in zip(first, crop.draws(1, 5, 2, 25)))
    assert not torch.equal(first[0], crop.draws(1, 5, 3, 25)[0])
    offsets, flips = draw_crop_flip(torch.Generator().manual_seed(0), 5000)
    assert set(offsets.unique().tolist()) == set(range(2 * PADDING + 1)) and 0.45 < flips.float().mean() < 0.55


def test_the_fill_is_each_channels_smallest_training_value_and_images_are_required() -> None:
    x = torch.rand(10, 3, 4, 4)
    x[3, 1, 2, 2] = -4.0
    assert torch.equal(CropFlip(x).fill, torch.stack([x[:, c].min() for c in range(3)]))
    with pytest.raises(ValueError, match="crop_flip needs image inputs"):
        CropFlip(torch.zeros(10, 64))


def test_augment_must_be_a_known_name() -> None:
    with pytest.raises(ConfigError, match="augment"):
        from_dict({"task": "synthetic", "augment": "rotate"})
    assert from_dict({"task": "synthetic"}).augment == "none"


def test_the_cifar_cnn_has_the_authors_shape() -> None:
    model = build_model("cnn_cifar", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert num_parameters(model) == 2_324_630
    assert tuple(model(torch.zeros(2, 3, 32, 32)).shape) == (2, 10)
    with pytest.raises(ValueError, match="multiples of 8"):
        build_model("cnn_cifar", input_shape=(3, 28, 28), num_classes=10)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_both_engines_augment_a_workers_batch_alike_and_it_changes_the_gradient(tmp_path: Path) -> None:
    # Prepare: label flipping, so a Byzantine trainer's batch is augmented too; one round
    values = {"model": "mlp", "num_honest": 3, "num_byzantine": 1, "attack": "label_flip", "rounds": 1, "eval_every": 1}
    config = tiny_config(**values, augment="crop_flip")
    # Execute
    run_inproc(config, tmp_path / "inproc")
    run_batched([config], [tmp_path / "batched"])
    run_inproc(tiny_config(**values), tmp_path / "plain")
    # Assert: the same training loss from both engines, and another one without augmentation
    inproc, batched, plain = (_records(tmp_path / name)[0]["train_loss"] for name in ("inproc", "batched", "plain"))
    assert inproc == pytest.approx(batched, rel=1e-5)
    assert inproc != pytest.approx(plain, rel=1e-3)
