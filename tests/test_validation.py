"""The validation split (``validation_fraction``): its sizes, its disjointness from the workers' shards, the
same indices in every process, and the validation fields of rounds.jsonl, summary.json and the metrics on
both engines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, tiny_values
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_run import LABEL_FLIP, REPO, _records, _run_ok, _write_config, arcsim  # noqa: F401  (arcsim: the fixture)

from arcsim.config import load_config
from arcsim.coordinator.metrics import CoordinatorMetrics
from arcsim.engine.evaluation import Evaluator
from arcsim.engine.honest import HonestWorker, shards, training_split
from arcsim.engine.inproc import run_inproc
from arcsim.engine.rounds import RunState
from arcsim.tasks import load_dataset, partition
from arcsim.tasks.validation import validation_size, validation_split


# --- the split ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_samples", "fraction", "size"), [(2000, 0.2, 400), (10, 0.25, 3), (7, 0.1, 1), (5, 0.0, 0)]
)
def test_split_sizes(num_samples: int, fraction: float, size: int) -> None:
    split = validation_split(num_samples, fraction=fraction, seed=1)
    assert validation_size(num_samples, fraction=fraction) == size
    assert (split.validation.numel(), split.train.numel()) == (size, num_samples - size)
    assert split.train.dtype == split.validation.dtype == torch.int64
    # sorted, disjoint, and together every index once
    assert torch.equal(torch.cat([split.train, split.validation]).sort().values, torch.arange(num_samples))
    assert torch.equal(split.train, split.train.sort().values)
    assert torch.equal(split.validation, split.validation.sort().values)


def test_no_split_leaves_every_index_to_training_in_order() -> None:
    split = validation_split(100, fraction=0.0, seed=3)
    assert torch.equal(split.train, torch.arange(100)) and split.validation.numel() == 0


def test_the_split_depends_on_the_seed_only_through_its_own_stream() -> None:
    first, again = validation_split(2000, fraction=0.2, seed=1), validation_split(2000, fraction=0.2, seed=1)
    other = validation_split(2000, fraction=0.2, seed=2)
    assert torch.equal(first.validation, again.validation)
    assert not torch.equal(first.validation, other.validation)


@pytest.mark.parametrize(
    ("num_samples", "fraction", "match"),
    [
        (1, 0.5, "validation_fraction 0.5 of 1 training samples leaves 1 for validation and 0 for training"),
        (3, 0.1, "validation_fraction 0.1 of 3 training samples leaves 0 for validation"),
        (10, 1.0, r"validation_fraction must be in \[0, 1\), got 1.0"),
        (10, -0.2, r"validation_fraction must be in \[0, 1\), got -0.2"),
    ],
)
def test_a_split_that_leaves_a_side_empty_is_an_error(num_samples: int, fraction: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validation_split(num_samples, fraction=fraction, seed=1)


def test_every_process_draws_the_same_split_and_shards() -> None:
    # Prepare: the coordinator, each worker and the inproc engine are separate processes that each derive them.
    config = tiny_config(validation_fraction=0.2, partitioner="dirichlet", alpha=0.5, seed=7)
    dataset = load_dataset(config.task, seed=config.seed)
    code = (
        "import json; from arcsim.config import from_dict; from arcsim.tasks import load_dataset\n"
        "from arcsim.engine.honest import shards, training_split\n"
        f"config = from_dict({tiny_values(validation_fraction=0.2, partitioner='dirichlet', alpha=0.5, seed=7)!r})\n"
        "dataset = load_dataset(config.task, seed=config.seed)\n"
        "print(json.dumps([training_split(config, dataset).validation.tolist(), "
        "[s.tolist() for s in shards(config, dataset)]]))\n"
    )
    # Execute
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    # Assert
    assert result.returncode == 0, result.stderr
    validation, shard_lists = json.loads(result.stdout)
    assert validation == training_split(config, dataset).validation.tolist()
    assert shard_lists == [s.tolist() for s in shards(config, dataset)]


# --- the shards ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes", [{"partitioner": "iid"}, {"partitioner": "extreme"}, {"partitioner": "dirichlet", "alpha": 0.3}]
)
def test_shards_never_hold_a_validation_sample(changes: dict[str, Any]) -> None:
    config = tiny_config(validation_fraction=0.2, num_honest=4, **changes)
    dataset = load_dataset(config.task, seed=config.seed)
    split = training_split(config, dataset)
    dealt = torch.cat(shards(config, dataset))
    assert dealt.unique().numel() == dealt.numel()  # the shards are disjoint
    assert not torch.isin(dealt, split.validation).any()
    assert torch.isin(dealt, split.train).all()
    if changes["partitioner"] != "dirichlet":  # iid and extreme deal every remaining sample
        assert torch.equal(dealt.sort().values, split.train)


def test_without_a_split_the_shards_are_the_partition_of_the_whole_set() -> None:
    config = tiny_config(partitioner="dirichlet", alpha=0.5, num_honest=4, seed=3)
    dataset = load_dataset(config.task, seed=config.seed)
    expected = partition(dataset.train_y, num_workers=4, method="dirichlet", alpha=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(shards(config, dataset), expected, strict=True))


def test_a_worker_trains_on_its_shard_of_the_remaining_samples() -> None:
    config = tiny_config(validation_fraction=0.25, partitioner="extreme")
    dataset = load_dataset(config.task, seed=config.seed)
    worker = HonestWorker(config, 1, dataset=dataset)
    shard = shards(config, dataset)[1]
    assert torch.equal(worker._x.cpu(), dataset.train_x[shard]) and torch.equal(worker._y.cpu(), dataset.train_y[shard])


# --- evaluation and records ---------------------------------------------------------------------
def test_the_evaluator_scores_the_held_out_samples() -> None:
    config = tiny_config(validation_fraction=0.2)
    dataset = load_dataset(config.task, seed=config.seed)
    evaluator = Evaluator(config, dataset)
    params = evaluator.initial_parameters()
    held_out = training_split(config, dataset).validation
    # The same samples as a test set: the validation score must be their test score.
    as_test = type(dataset)(
        name="held-out",
        train_x=dataset.train_x,
        train_y=dataset.train_y,
        test_x=dataset.train_x[held_out],
        test_y=dataset.train_y[held_out],
        num_classes=dataset.num_classes,
    )
    assert evaluator.has_validation
    assert evaluator.evaluate_validation(params) == Evaluator(config, as_test).evaluate(params)
    assert evaluator.evaluate_validation(params) != evaluator.evaluate(params)
    assert Evaluator(tiny_config(), dataset).evaluate_validation(params) is None


def test_records_summary_and_resume_carry_the_validation_scores(tmp_path: Path) -> None:
    # Prepare
    config = tiny_config(validation_fraction=0.2, rounds=4, eval_every=2)
    # Execute
    summary = run_inproc(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    resumed = RunState(config, tmp_path / "run", resume=True)
    # Assert
    scored = [r for r in records if r["accuracy"] is not None]
    assert [r["round"] for r in scored] == [1, 3]
    assert all(0.0 <= r["validation_accuracy"] <= 1.0 and r["validation_loss"] > 0 for r in scored)
    assert all(r["validation_accuracy"] is None and r["validation_loss"] is None for r in records if r not in scored)
    assert summary["final_validation_accuracy"] == scored[-1]["validation_accuracy"]
    assert summary["max_validation_accuracy"] == max(r["validation_accuracy"] for r in scored)
    assert resumed.best_validation_accuracy == summary["max_validation_accuracy"]
    assert resumed.last_validation_accuracy == summary["final_validation_accuracy"]


def test_without_a_split_the_validation_fields_are_null(tmp_path: Path) -> None:
    summary = run_inproc(tiny_config(), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert all(r["validation_accuracy"] is None and r["validation_loss"] is None for r in records)
    assert summary["final_validation_accuracy"] is None and summary["max_validation_accuracy"] is None
    assert "validation_fraction" in summary["config"]


def test_the_validation_gauges_follow_the_last_evaluation(tmp_path: Path) -> None:
    config = tiny_config(validation_fraction=0.2)
    metrics = CoordinatorMetrics(config=config)
    state = RunState(config, tmp_path / "run")
    record = state.close_round({i: torch.zeros(state.num_parameters) for i in range(config.num_honest)})
    metrics.observe_round(record)
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
    }
    assert samples["arcsim_validation_accuracy_ratio"] == record.validation_accuracy
    assert samples["arcsim_validation_loss"] == pytest.approx(record.validation_loss)


# --- both engines ---------------------------------------------------------------------------------
def test_grpc_and_inproc_agree_with_a_validation_split(arcsim: Any, tmp_path: Path) -> None:  # noqa: F811
    # Prepare: label flipping, so the adversary trains on a shard of the remaining samples too.
    values = {**LABEL_FLIP, "rounds": 10, "eval_every": 5, "validation_fraction": 0.2}
    path = _write_config(tmp_path, "validation", values)
    # Execute
    grpc = _run_ok(arcsim, path, tmp_path / "grpc", "--engine", "grpc")
    inproc = run_inproc(load_config(path), tmp_path / "inproc")
    # Assert
    assert grpc["final_params_sha256"] == inproc["final_params_sha256"]
    for key in ("final_accuracy", "final_validation_accuracy", "max_validation_accuracy", "config"):
        assert grpc[key] == inproc[key], key
    assert grpc["config"]["validation_fraction"] == 0.2 and grpc["final_validation_accuracy"] is not None
    fields = ("round", "accuracy", "test_loss", "validation_accuracy", "validation_loss")
    grpc_records = [{k: r[k] for k in fields} for r in _records(tmp_path / "grpc")]
    assert grpc_records == [{k: r[k] for k in fields} for r in _records(tmp_path / "inproc")]
    assert [r["round"] for r in grpc_records if r["validation_accuracy"] is not None] == [4, 9]
