"""Tests of the gamma-similarity partitioner: shard sizes, label histograms from iid to extreme, seeding, a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from arcsim.cli import main
from arcsim.config import from_dict
from arcsim.seeding import generator
from arcsim.tasks import load_dataset, partition

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# 5000 balanced labels in a seeded random order, so that no split can lean on the order of the file.
SHUFFLED = torch.randperm(5000, generator=torch.Generator().manual_seed(0)) % 10


def gamma_split(labels: torch.Tensor, *, num_workers: int, gamma: float, seed: int = 0) -> list[torch.Tensor]:
    return partition(labels, num_workers=num_workers, method="gamma_similarity", gamma=gamma, seed=seed)


def label_tv(labels: torch.Tensor, shards: list[torch.Tensor]) -> list[float]:
    """Each shard's total-variation distance from its label histogram to the whole set's."""
    classes = int(labels.max()) + 1
    overall = torch.bincount(labels, minlength=classes).double() / labels.numel()
    out = []
    for shard in shards:
        histogram = torch.bincount(labels[shard], minlength=classes).double() / shard.numel()
        out.append(0.5 * float((histogram - overall).abs().sum()))
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- shape of the split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [103, 100, 37])
@pytest.mark.parametrize("num_workers", [1, 7, 10])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 0.99, 1.0])
def test_every_sample_is_used_once_in_balanced_sorted_shards(num_samples: int, num_workers: int, gamma: float) -> None:
    # Prepare
    labels = torch.arange(num_samples) % 4
    before = labels.clone()

    # Execute
    shards = gamma_split(labels, num_workers=num_workers, gamma=gamma, seed=2)

    # Assert: a partition of all the indices, totals within one of each other, each shard int64 and ascending
    assert len(shards) == num_workers
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(num_samples))
    sizes = [s.numel() for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(s.dtype == torch.int64 and torch.equal(s, s.sort().values) for s in shards)
    assert torch.equal(labels, before)


@pytest.mark.parametrize("num_workers", [3, 4])
def test_the_uniform_share_is_the_iid_prefix_and_the_rest_a_sorted_cut(num_workers: int) -> None:
    # Prepare: 10 of 21 samples dealt uniformly (remainders in both parts with 3 and 4 workers); labels in
    # descending index order, so that the sorted cut runs against the index order
    labels = torch.arange(21).flip(0) % 7
    gamma = 10 / 21
    prefix = torch.randperm(21, generator=generator(5, "partition", "iid"))[: math.floor(gamma * 21)]

    # Execute
    shards = gamma_split(labels, num_workers=num_workers, gamma=gamma, seed=5)

    # Assert: worker k holds the k-th cut of the permutation's prefix (as the iid split cuts it) and the
    # k-th contiguous run of the other samples sorted by label (ties by index); each part balanced
    uniform = [set(part.tolist()) for part in torch.tensor_split(prefix, num_workers)]
    rest = [i for i in range(21) if i not in set(prefix.tolist())]
    expected_order = sorted(rest, key=lambda i: (int(labels[i]), i))
    runs = [[i for i in expected_order if i in set(s.tolist())] for s in shards]
    assert [set(s.tolist()) - set(run) for s, run in zip(shards, runs, strict=True)] == uniform
    assert [i for run in runs for i in run] == expected_order
    sorted_sizes = [len(run) for run in runs]
    assert max(sorted_sizes) - min(sorted_sizes) <= 1
    assert max(map(len, uniform)) - min(map(len, uniform)) <= 1


# --- label histograms: from iid (gamma = 1) to extreme (gamma = 0) ---------------------------------------
def test_gamma_one_is_the_iid_split() -> None:
    # Execute
    shards = gamma_split(SHUFFLED, num_workers=10, gamma=1.0, seed=3)
    iid = partition(SHUFFLED, num_workers=10, method="iid", seed=3)

    # Assert: the same shards, and each close to the global label histogram (500 samples, 10 labels)
    assert all(torch.equal(a, b) for a, b in zip(shards, iid, strict=True))
    assert max(label_tv(SHUFFLED, shards)) < 0.12


def test_gamma_zero_is_the_extreme_split_when_the_workers_divide_the_samples() -> None:
    # Execute
    shards = gamma_split(SHUFFLED, num_workers=10, gamma=0.0, seed=3)
    extreme = partition(SHUFFLED, num_workers=10, method="extreme")

    # Assert: one label per worker, as extreme gives
    assert all(torch.equal(a, b) for a, b in zip(shards, extreme, strict=True))
    assert [sorted(set(SHUFFLED[s].tolist())) for s in shards] == [[c] for c in range(10)]


@pytest.mark.parametrize("num_workers", [10, 13])
def test_gamma_zero_gives_each_worker_one_or_two_labels_on_mnist_5k(num_workers: int) -> None:
    # Prepare
    labels = load_dataset("mnist-5k").train_y

    # Execute
    shards = gamma_split(labels, num_workers=num_workers, gamma=0.0, seed=1)

    # Assert: a sorted cut, so one or two labels each, and every sample used (extreme drops the remainder)
    assert all(1 <= len(set(labels[s].tolist())) <= 2 for s in shards)
    assert sum(s.numel() for s in shards) == labels.numel()
    assert shards[0].numel() >= 2 and set(labels[shards[0]].tolist()) == {int(labels.min())}


@pytest.mark.parametrize("num_workers", [10, 13])
def test_label_skew_falls_steadily_as_gamma_grows(num_workers: int) -> None:
    # Execute
    skew = [mean(label_tv(SHUFFLED, gamma_split(SHUFFLED, num_workers=num_workers, gamma=g))) for g in GAMMAS]

    # Assert: strictly decreasing, and about (1 - gamma) times the skew of the sorted cut, since a share
    # gamma of each shard follows the global histogram
    assert all(a > b for a, b in zip(skew, skew[1:]))
    assert skew[0] > 0.8 and skew[-1] < 0.08
    for gamma, value in zip(GAMMAS, skew, strict=True):
        assert value == pytest.approx((1 - gamma) * skew[0], abs=0.08)


def test_any_positive_gamma_gives_every_worker_every_label() -> None:
    # Execute
    shards = gamma_split(SHUFFLED, num_workers=10, gamma=0.25)

    # Assert: 125 uniform samples per worker leave no label out
    assert all(len(set(SHUFFLED[s].tolist())) == 10 for s in shards)


# --- seeding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0])
def test_the_split_depends_only_on_the_seed(gamma: float) -> None:
    # Execute
    a = gamma_split(SHUFFLED, num_workers=7, gamma=gamma, seed=4)
    b = gamma_split(SHUFFLED.clone(), num_workers=7, gamma=gamma, seed=4)
    c = gamma_split(SHUFFLED, num_workers=7, gamma=gamma, seed=5)

    # Assert
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_gamma_zero_needs_no_randomness() -> None:
    # Execute / Assert: nothing is dealt at random, so every seed gives the same sorted cut
    a = gamma_split(SHUFFLED, num_workers=7, gamma=0.0, seed=4)
    b = gamma_split(SHUFFLED, num_workers=7, gamma=0.0, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [None, -0.1, 1.5, float("nan")])
def test_gamma_similarity_rejects_a_missing_or_out_of_range_gamma(gamma: float | None) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"needs gamma in \[0, 1\], got gamma={gamma}"):
        partition(torch.arange(4), num_workers=2, method="gamma_similarity", gamma=gamma)


@pytest.mark.parametrize(
    ("method", "parameters", "expected"),
    [
        (
            "iid",
            {"gamma": 0.5},
            "gamma applies only to the gamma_similarity partition; got gamma=0.5 with method 'iid'",
        ),
        ("extreme", {"gamma": 0.0}, "gamma applies only to the gamma_similarity partition; got gamma=0.0 with method"),
        ("dirichlet", {"alpha": 1.0, "gamma": 1.0}, "gamma applies only to the gamma_similarity partition"),
        ("gamma_similarity", {"alpha": 0.5, "gamma": 0.5}, "alpha applies only to the dirichlet partition"),
    ],
)
def test_each_parameter_belongs_to_its_partitioner(method: str, parameters: dict[str, float], expected: str) -> None:
    """gamma = 0 or 1 with another method is refused too: a config that names gamma means gamma_similarity."""
    with pytest.raises(ValueError, match=expected):
        partition(torch.arange(4), num_workers=2, method=method, **parameters)


PLUGIN = """
import torch

def halves(labels, *, num_workers, alpha, seed, **extra):
    # The keyword arguments it was called with, in the first shard's length: 2 + len(extra)
    order = torch.arange(labels.shape[0])
    return [order[: 2 + len(extra)], order[2 + len(extra) :]]

def old_style(labels, *, num_workers, alpha, seed):
    return list(torch.arange(labels.shape[0]).tensor_split(num_workers))
"""


def test_a_plugin_gets_gamma_only_when_it_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    (tmp_path / "gamma_plugins.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    labels = torch.arange(6)

    # Execute
    with_gamma = partition(labels, num_workers=2, method="gamma_plugins:halves", gamma=0.3)
    without = partition(labels, num_workers=2, method="gamma_plugins:halves")
    old = partition(labels, num_workers=2, method="gamma_plugins:old_style")

    # Assert: gamma reached the plugin as a keyword; a plugin without it still works when gamma is unset
    assert [s.numel() for s in with_gamma] == [3, 3] and [s.numel() for s in without] == [2, 4]
    assert [s.tolist() for s in old] == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(
        ValueError, match="partitioner 'gamma_plugins:old_style' takes no gamma parameter; got gamma=0.3"
    ):
        partition(labels, num_workers=2, method="gamma_plugins:old_style", gamma=0.3)


# --- a run -----------------------------------------------------------------------------------------------
def run_small(out: Path, *settings: str) -> dict[str, object]:
    args = ["run", str(REPO / "configs" / "small.yaml"), "--engine", "inproc", "--out", str(out)]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_a_run_takes_gamma_from_the_config(tmp_path: Path) -> None:
    # Prepare
    config = from_dict({"partitioner": "gamma_similarity", "gamma": 0.5})
    assert (config.partitioner, config.gamma) == ("gamma_similarity", 0.5)

    # Execute: small.yaml is iid; gamma = 1 must reproduce it, gamma = 0.5 must not
    iid = run_small(tmp_path / "iid")
    one = run_small(tmp_path / "one", "partitioner=gamma_similarity", "gamma=1")
    half = run_small(tmp_path / "half", "partitioner=gamma_similarity", "gamma=0.5")

    # Assert
    assert half["status"] == "completed" and half["rounds_completed"] == 30
    assert one["final_params_sha256"] == iid["final_params_sha256"]
    assert half["final_params_sha256"] != iid["final_params_sha256"]
