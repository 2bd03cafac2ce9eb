"""Per-round trackers (arcsim.tracking): TensorBoard event files that TensorBoard's own reader parses,
and an MLflow file store that MLflow's client reads, on both engines, with the values of rounds.jsonl.

Each test skips, saying why, where the tracker's package (the extras arcsim[tensorboard],
arcsim[mlflow]) is not installed.
"""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_values

import arcsim
from arcsim import tracking
from arcsim.config import RunConfig
from arcsim.tracking import METRICS, RoundTrackers, check_trackers, flat_params

REPO = Path(__file__).resolve().parent.parent
TINY = tiny_values(
    num_byzantine=1, attack="alie", attack_params={"tau": 1.5}, rounds=5, eval_every=2, round_deadline=30
)


def _tensorboard() -> Any:
    pytest.importorskip(
        "tensorboard", reason="the tensorboard extra is not installed (pip install 'arcsim[tensorboard]')"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator


def _mlflow_client(out: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'arcsim[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when allowed
    return MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())


def _expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Per metric, the (step, value) pairs that rounds.jsonl says were logged."""
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return {
        name: [(r["round"] + 1, float(r[field])) for r in records if r.get(field) is not None]
        for name, field in METRICS.items()
    }


def _cli_run(config: Path, out: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "arcsim", "run", str(config), "--out", str(out), "--no-progress", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def _tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = _tensorboard()(str(out / "tensorboard"))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def _close(pairs: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Non-empty series, values as float32 (TensorBoard stores scalars as float32)."""
    import numpy

    return {
        name: [(step, float(numpy.float32(value))) for step, value in series]
        for name, series in pairs.items()
        if series
    }


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_tracking_doctests() -> None:
    result = doctest.testmod(tracking)
    assert result.attempted > 0 and result.failed == 0


def test_tracker_names_are_checked() -> None:
    assert check_trackers("mlflow") == ("mlflow",)
    with pytest.raises(ValueError, match="unknown tracker 'wandb'; choose from tensorboard, mlflow"):
        check_trackers(["wandb"])
    with pytest.raises(ValueError, match="each tracker once"):
        check_trackers(["mlflow", "mlflow"])


def test_flat_params_flatten_the_mappings() -> None:
    params = flat_params(RunConfig(pipeline_params={"tau": 5}, attack_params={"tau": 1.5}))
    assert params["pipeline_params.tau"] == 5 and params["attack_params.tau"] == 1.5
    assert "pipeline_params" not in params and params["pipeline"] == "arc > nnm > cwtm"


def test_no_tracker_writes_nothing(config_file: Path, tmp_path: Path) -> None:
    arcsim.run(config_file, out=tmp_path / "out")
    assert not (tmp_path / "out" / "tensorboard").exists() and not (tmp_path / "out" / "mlruns").exists()


@pytest.mark.parametrize("engine", ["inproc", "grpc"])
def test_tensorboard_event_files_hold_every_round(engine: str, config_file: Path, tmp_path: Path) -> None:
    _tensorboard()
    # Execute: the command line, as a user runs it
    out = tmp_path / "out"
    _cli_run(config_file, out, "--engine", engine, "--track", "tensorboard")
    # Assert: TensorBoard's reader finds every metric of every round, and the config as hparams and text
    scalars = _tensorboard_scalars(out)
    expected = _close(_expected(out))
    assert set(expected) >= {"test/accuracy", "train/loss", "clipping/threshold", "aggregate/error"}
    assert scalars == expected
    assert [step for step, _ in scalars["test/accuracy"]] == [2, 4, 5]
    accumulator = _tensorboard()(str(out / "tensorboard"))
    accumulator.Reload()
    plugin = accumulator.PluginTagToContent("hparams")
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    hparams = {
        name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        for name, value in data.session_start_info.hparams.items()
    }
    assert hparams["attack"] == "alie" and hparams["attack_params.tau"] == 1.5 and hparams["rounds"] == 5
    text = accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "attack: alie" in text and "tau: 1.5" in text


@pytest.mark.parametrize("engine", ["inproc", "grpc"])
def test_mlflow_file_store_holds_the_params_and_every_round(
    engine: str, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    client = _mlflow_client(out, monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # Execute
    if engine == "inproc":
        arcsim.run(config_file, out=out, track=["mlflow"])
    else:
        _cli_run(config_file, out, "--engine", "grpc", "--track", "mlflow")
    # Assert: one finished run in the experiment "arcsim", the config as params, every round's metrics
    experiment = client.get_experiment_by_name("arcsim")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert run.data.tags[tracking.RUN_TAG] == str(out.resolve()) and run.data.tags["arcsim.engine"] == engine
    assert run.data.params["attack_params.tau"] == "1.5" and run.data.params["pipeline"] == "arc > nnm > cwtm"
    expected = {name: series for name, series in _expected(out).items() if series}
    logged = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] for name in expected}
    assert logged == expected
    assert set(run.data.metrics) == set(expected)


def test_a_resumed_run_continues_its_tracking(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: rounds 1 to 3 logged, then the process stops (its last checkpoint covered round 2)
    out = tmp_path / "out"
    client = _mlflow_client(out, monkeypatch)
    _tensorboard()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = RunConfig(**TINY)
    first = [{"round": r, "train_loss": 1.0 / (r + 1), "accuracy": None} for r in range(3)]
    with RoundTrackers(["tensorboard", "mlflow"], config=config, out_dir=out) as sinks:
        for record in first:
            sinks.log_round(record)
    # Execute: the resumed process redoes round 3 (index 2) with another loss, then rounds 4 and 5
    again = [{"round": r, "train_loss": 10.0 + r, "accuracy": None} for r in range(2, 5)]
    with RoundTrackers(["tensorboard", "mlflow"], config=config, out_dir=out) as sinks:
        for record in again:
            sinks.log_round(record)
        sinks.finish({"status": "completed"})
    # Assert: TensorBoard purged the redone step; MLflow continued the same run, now finished
    assert _tensorboard_scalars(out)["train/loss"] == [(1, 1.0), (2, 0.5), (3, 12.0), (4, 13.0), (5, 14.0)]
    runs = client.search_runs([client.get_experiment_by_name("arcsim").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert history[-1] == (5, 14.0) and (3, 12.0) in history


def test_a_failing_run_marks_its_mlflow_run_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    client = _mlflow_client(out, monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        with RoundTrackers(["mlflow"], config=RunConfig(**TINY), out_dir=out) as sinks:
            sinks.log_round({"round": 0, "train_loss": 1.0})
            raise RuntimeError("boom")
    runs = client.search_runs([client.get_experiment_by_name("arcsim").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
