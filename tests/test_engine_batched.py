"""The batched engine (arcsim/engine/batched.py): groups, the in-process engine's data and draws, its
round-0 numbers within rounding, one folder per run that report and resume read, divergence, sweeps."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config, tiny_values

from arcsim.config import RunConfig, from_dict
from arcsim.engine.batched import (
    GROUP_KEYS,
    MAX_BATCH_CAP,
    BatchedGroup,
    bytes_per_run,
    default_max_batch,
    group_key,
    plan_groups,
    run_batched,
)
from arcsim.engine.honest import HonestWorker, shards
from arcsim.engine.inproc import run_inproc
from arcsim.engine.rounds import RECORD_FIELDS
from arcsim.robust import device_paths
from arcsim.tasks import load_dataset


def _config(**changes: Any) -> RunConfig:
    """Five workers (four honest) on the synthetic task with the MLP, three rounds."""
    values = {"model": "mlp", "num_honest": 4, "num_byzantine": 1, "rounds": 3, "eval_every": 2, **changes}
    return tiny_config(**values)


# Several attacks and pipelines, one group: what the agreement tests run.
MIXED: list[dict[str, Any]] = [
    {"attack": "sign_flip", "pipeline": "arc > nnm > cwtm"},
    {"attack": "alie", "pipeline": "nnm > cwmed", "seed": 2},
    {"attack": "foe", "pipeline": "static_clip > nnm > multi_krum", "pipeline_params": {"c": 2.0}, "lr": 0.25},
    {"attack": "label_flip", "pipeline": "arc > cwtm", "momentum": 0.5},
    {"attack": "optimal_alie", "attack_params": {"taus": [0.0, 0.5, 1.0, 2.0]}, "pipeline": "arc > nnm > cwtm"},
    {"attack": "gaussian", "pipeline": "arc > geometric_median", "weight_decay": 0.0},
    {"attack": "mimic", "pipeline": "bucketing > cwtm", "pipeline_params": {"s": 2}},
    {"attack": "inf", "pipeline": "arc > nnm > cwtm"},
]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _close(a: float | None, b: float | None, rel: float = 1e-5) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


# --- groups --------------------------------------------------------------------------------------
def test_groups_hold_only_compatible_runs_and_respect_max_batch() -> None:
    # Prepare: two shapes (f = 1 and f = 2) and, within each, runs differing in everything else
    configs = [_config(seed=s, attack=a, lr=lr) for s in (1, 2, 3) for a in ("alie", "foe") for lr in (0.1, 0.25)]
    configs += [_config(num_byzantine=2, seed=s) for s in (1, 2, 3)]
    # Execute
    groups = plan_groups(configs, max_batch=5)
    spread = plan_groups(configs, max_batch=64, min_groups=4)
    # Assert: a partition of the runs; each group one shape, at most max_batch; min_groups splits evenly
    for plan in (groups, spread):
        assert sorted(i for g in plan for i in g) == list(range(len(configs)))
        assert all(len({group_key(configs[i]) for i in g}) == 1 for g in plan)
    assert max(len(g) for g in groups) <= 5
    assert sorted(len(g) for g in groups) == [3, 4, 4, 4]
    assert sorted(len(g) for g in spread) == [1, 1, 1, 3, 3, 3, 3]


def test_plan_groups_refuses_a_bad_max_batch() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        plan_groups([_config()], max_batch=0)


def test_a_group_refuses_runs_of_different_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_byzantine"):
        BatchedGroup([_config(), _config(num_byzantine=2)], [tmp_path / "a", tmp_path / "b"])


def test_max_batch_default_follows_the_memory_formula() -> None:
    config = _config()
    small = default_max_batch(config)
    assert 1 <= small <= MAX_BATCH_CAP["cpu"]
    # More workers need more memory per run.
    assert bytes_per_run(_config(num_honest=8), 1000, 10) > bytes_per_run(config, 1000, 10)
    assert bytes_per_run(_config(attack="label_flip"), 1000, 10) > bytes_per_run(config, 1000, 10)


# --- the in-process engine's data and draws -------------------------------------------------------
def test_batch_indices_are_the_honest_workers_own_draws(tmp_path: Path) -> None:
    # Prepare: a label-flipping run (its Byzantine worker trains too) in a group with another run
    configs = [
        _config(attack="label_flip", num_byzantine=2, seed=3),
        _config(num_byzantine=2, seed=4, partitioner="extreme"),
    ]
    group = BatchedGroup(configs, [tmp_path / "a", tmp_path / "b"])
    for run, config in zip(group.runs, configs):
        dataset = load_dataset(config.task, seed=config.seed)
        shard_list = shards(config, dataset)
        workers = [HonestWorker(config, i, dataset=dataset, shard_list=shard_list) for i in range(config.num_honest)]
        workers += [
            HonestWorker(config, i, shard_index=(i - config.num_honest) % config.num_honest, dataset=dataset)
            for i in range(config.num_honest, config.num_workers)
            if config.attack == "label_flip"
        ]
        for t in range(3):
            # Execute
            got = group._batch_indices(run, t)
            # Assert: each trainer's batch, as indices into the training set, exactly the worker's
            h = config.num_honest
            expected = [
                shard_list[w.worker_id if w.worker_id < h else (w.worker_id - h) % h][w._batch_indices(t)]
                for w in workers
            ]
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert torch.equal(g, e)
        # The same initial parameters as the in-process engine's
        assert torch.equal(run.state.params, run.state.evaluator.initial_parameters())


@pytest.mark.parametrize("paths", ["cpu", "accelerator"])
def test_round_zero_agrees_with_the_inproc_engine_for_attacks_and_pipelines(tmp_path: Path, paths: str) -> None:
    # Prepare: every mixed run alone with the in-process engine, and all of them as one batched group;
    # "accelerator": the group takes the paths a GPU takes (batched rules, the optimal attack's line
    # search as one batched search over the runs), on the CPU
    configs = [_config(rounds=1, **changes) for changes in MIXED]
    for k, config in enumerate(configs):
        run_inproc(config, tmp_path / f"inproc-{k}")
    # Execute
    with device_paths() if paths == "accelerator" else contextlib.nullcontext():
        summaries = run_batched(configs, [tmp_path / f"batched-{k}" for k in range(len(configs))])
    # Assert: the round-0 record of each run: the clip threshold, the clipped counts and the aggregate
    # error within 1e-5 relative; the test accuracy within one sample
    assert [s["engine"] for s in summaries] == ["batched"] * len(configs)
    for k, config in enumerate(configs):
        (expected,), (got,) = _records(tmp_path / f"inproc-{k}"), _records(tmp_path / f"batched-{k}")
        for key in (
            "received_honest",
            "received_byzantine",
            "aggregated",
            "clipped_honest",
            "clipped_byzantine",
            "clipped_rows",
        ):
            assert got[key] == expected[key], (config.attack, key)
        for key in ("clip_threshold", "aggregate_error", "aggregate_norm", "train_loss", "test_loss"):
            assert _close(got[key], expected[key]), (config.attack, key, got[key], expected[key])
        assert abs(got["accuracy"] - expected["accuracy"]) <= 1.5 / 1000, config.attack


def test_grouping_changes_no_run(tmp_path: Path) -> None:
    # Prepare: one run alone, and the same run amid others
    config = _config(attack="alie", rounds=4)
    others = [_config(attack="foe", seed=7, rounds=4), _config(attack="sign_flip", seed=8, rounds=4, lr=0.25)]
    # Execute
    (alone,) = run_batched([config], [tmp_path / "alone"])
    together = run_batched([others[0], config, others[1]], [tmp_path / "o1", tmp_path / "together", tmp_path / "o2"])
    # Assert: its records agree within rounding
    assert together[1]["config"] == alone["config"]
    for a, b in zip(_records(tmp_path / "alone"), _records(tmp_path / "together"), strict=True):
        for key in ("clip_threshold", "aggregate_error", "train_loss", "accuracy", "test_loss"):
            assert _close(a[key], b[key], rel=1e-4), key


# --- the run folders -----------------------------------------------------------------------------
def test_each_run_gets_the_files_of_the_inproc_engine(tmp_path: Path) -> None:
    # Prepare
    config = _config(validation_fraction=0.2)
    run_inproc(config, tmp_path / "inproc")
    # Execute
    (summary,) = run_batched([config], [tmp_path / "batched"])
    # Assert: the same files and keys; validation numbers recorded
    inproc_summary = json.loads((tmp_path / "inproc" / "summary.json").read_text())
    assert summary["engine"] == "batched" and summary["status"] == "completed"
    assert set(summary) == set(inproc_summary)
    for name in ("summary.json", "rounds.jsonl", "config.yaml", "model.safetensors"):
        assert (tmp_path / "batched" / name).is_file(), name
    assert list((tmp_path / "batched" / "checkpoints").iterdir())
    records = _records(tmp_path / "batched")
    assert [list(r) for r in records] == [list(RECORD_FIELDS)] * config.rounds
    assert records[-1]["validation_accuracy"] is not None
    from arcsim.api import load

    assert len(load(tmp_path / "batched")) == config.rounds


def test_a_killed_group_resumes_to_the_same_end(tmp_path: Path) -> None:
    # Prepare: an uninterrupted group, and the same group stopped after its third run-round
    configs = [_config(attack="alie", rounds=5), _config(attack="foe", seed=2, rounds=5)]
    straight = run_batched(configs, [tmp_path / "s0", tmp_path / "s1"])
    calls = []

    def stop(state: Any, record: Any) -> None:
        calls.append(record.round)
        if len(calls) == 5:
            raise KeyboardInterrupt

    # Execute
    with pytest.raises(KeyboardInterrupt):
        run_batched(configs, [tmp_path / "k0", tmp_path / "k1"], on_round=stop)
    resumed = run_batched(configs, [tmp_path / "k0", tmp_path / "k1"], resume=True)
    # Assert: the checkpoints written while stopping let the runs end on the same parameters
    assert [s["final_params_sha256"] for s in resumed] == [s["final_params_sha256"] for s in straight]
    assert [len(_records(tmp_path / f"k{k}")) for k in (0, 1)] == [5, 5]


def test_a_diverging_run_stops_without_touching_the_others(tmp_path: Path) -> None:
    # Prepare: a run whose step sends the parameters to infinity
    good = _config(attack="alie", rounds=4)
    bad = _config(attack="alie", rounds=4, lr=1e38, seed=5)
    (alone,) = run_batched([good], [tmp_path / "alone"])
    # Execute
    summaries = run_batched([bad, good], [tmp_path / "bad", tmp_path / "good"])
    # Assert
    assert summaries[0]["status"] == "diverged" and summaries[0]["rounds_completed"] < bad.rounds
    assert summaries[1]["status"] == "completed"
    assert summaries[1]["max_accuracy"] == pytest.approx(alone["max_accuracy"], abs=1e-3)
    assert json.loads((tmp_path / "bad" / "summary.json").read_text())["status"] == "diverged"


def test_a_report_scores_a_diverged_run_at_chance_where_it_stopped_evaluating(tmp_path: Path) -> None:
    # Prepare: a run that diverges (its parameters go to infinity) beside one that completes
    from arcsim.report import load_runs

    bad = _config(attack="alie", rounds=4, eval_every=1, lr=1e38, seed=5)
    good = _config(attack="alie", rounds=4, eval_every=1)
    summaries = run_batched([bad, good], [tmp_path / "bad", tmp_path / "good"])
    stopped = summaries[0]["rounds_completed"]
    assert summaries[0]["status"] == "diverged" and summaries[0]["num_classes"] == summaries[1]["num_classes"] >= 2
    # Execute
    runs, left_out = load_runs(tmp_path / "bad")
    # Assert: the rounds it reached as recorded, then chance at every evaluation it did not reach
    (run,) = runs
    assert left_out == [] and run.diverged
    accuracies = [record["accuracy"] for record in run.records]
    assert len(accuracies) == bad.rounds
    assert accuracies[stopped:] == [1 / summaries[0]["num_classes"]] * (bad.rounds - stopped)
    assert [record.get("diverged", False) for record in run.records] == [False] * stopped + [True] * (
        bad.rounds - stopped
    )


# --- sweeps and the command line -------------------------------------------------------------------
def _sweep_file(tmp_path: Path, **changes: Any) -> Path:
    import yaml

    values = tiny_values(
        model="mlp", num_honest=4, num_byzantine=1, rounds=3, eval_every=2, attack=["alie", "foe"], seed=[1, 2]
    )
    values.update(changes)
    values["sweep"] = {"name": "batched-test"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_batched_sweep_resumes_a_stopped_run_and_skips_complete_ones(tmp_path: Path) -> None:
    from arcsim.sweep import load_sweep, run_sweep

    plan = load_sweep(_sweep_file(tmp_path))
    out = tmp_path / "out"
    # Prepare: one run of the sweep stopped after two rounds, as a killed sweep leaves it
    first = plan.runs[0]

    def stop(state: Any, record: Any) -> None:
        if record.round == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batched([first.config], [out / first.name], on_round=stop)
    # Execute
    lines: list[str] = []
    outcome = run_sweep(plan, out, executor="inline", engine="batched", max_batch=8, echo=lines.append)
    again = run_sweep(plan, out, executor="inline", engine="batched", max_batch=8, echo=lines.append)
    # Assert
    assert outcome.ok and outcome.completed == len(plan.runs)
    assert any("resumed at round 2" in line for line in lines)
    assert again.skipped == len(plan.runs) and again.completed == 0
    # The inline executor ran the groups in this process with the cores' threads, and gave its one back
    assert torch.get_num_threads() == 1
    for run in plan.runs:
        assert json.loads((out / run.name / "summary.json").read_text())["engine"] == "batched"


def test_the_dry_run_shows_the_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from arcsim.cli import main

    # Execute
    code = main(["sweep", str(_sweep_file(tmp_path)), "--engine", "batched", "--dry-run", "--out", str(tmp_path / "o")])
    # Assert: one group of the four runs (one shape), with what its runs share
    out = capsys.readouterr().out
    assert code == 0
    assert "4 runs to run in 1 batched groups" in out or "4 runs to run in 2 batched groups" in out
    assert "group 1:" in out and all(key in out for key in GROUP_KEYS)


def test_max_batch_needs_the_batched_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from arcsim.cli import main

    assert main(["sweep", str(_sweep_file(tmp_path)), "--max-batch", "4", "--dry-run"]) == 2
    assert "--max-batch needs --engine batched" in capsys.readouterr().err
    assert main(["sweep", str(_sweep_file(tmp_path)), "--engine", "batched", "--max-batch", "0", "--dry-run"]) == 2


def test_arcsim_run_with_the_batched_engine(tmp_path: Path) -> None:
    import yaml

    from arcsim.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_values(model="mlp", num_honest=4, num_byzantine=1, rounds=2)))
    assert main(["run", str(path), "--engine", "batched", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["engine"] == "batched"
    assert torch.get_num_threads() == 1  # every core for the run, then this process's one thread back


def test_the_api_runs_the_batched_engine(tmp_path: Path) -> None:
    import arcsim

    result = arcsim.run(tiny_values(model="mlp", num_honest=4, num_byzantine=1), engine="batched", out=tmp_path / "r")
    assert result.summary["engine"] == "batched" and len(result.records) == 2
    assert from_dict(result.summary["config"]) == result.config


def test_arcsim_run_says_when_a_batched_run_diverged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from arcsim.cli import EXIT_STOPPED, main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_values(model="mlp", num_honest=4, num_byzantine=1, rounds=4, lr=1e38)))
    code = main(["run", str(path), "--engine", "batched", "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == EXIT_STOPPED
    assert "the run diverged after" in capsys.readouterr().err


MUTATING_RULE = """
from arcsim.robust import rule


@rule(kind="pre-aggregator", batched=True)
def scribble(x, *, f):
    # A misbehaving plugin: it overwrites the rows it receives (every element's), then passes them on.
    x.mul_(0.5)
    return x
"""


def test_a_plugin_that_overwrites_its_input_cannot_reach_the_momenta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a rule plugin that halves its input in place, in front of cwtm; two runs in one group
    (tmp_path / "scribbling_plugin.py").write_text(MUTATING_RULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    configs = [_config(attack="alie", pipeline="scribbling_plugin:scribble > cwtm", seed=s) for s in (1, 2)]
    # Execute: the batched group, and each run alone on the in-process engine (which hands the
    # pipeline a matrix of its own)
    run_batched(configs, [tmp_path / f"batched-{k}" for k in range(2)])
    for k, config in enumerate(configs):
        run_inproc(config, tmp_path / f"inproc-{k}")
    # Assert: the same rounds within rounding; had the plugin halved the momenta in place, the
    # training losses from round 1 on would differ
    for k in range(2):
        for a, b in zip(_records(tmp_path / f"inproc-{k}"), _records(tmp_path / f"batched-{k}"), strict=True):
            for key in ("aggregate_error", "aggregate_norm", "train_loss"):
                assert _close(a[key], b[key], rel=1e-4), (k, key, a[key], b[key])
