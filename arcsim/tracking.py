"""Per-round sinks for experiment trackers: ``arcsim run --track tensorboard`` and ``--track mlflow``.

Each round's numbers go to the tracker as the run goes (the inproc engine's ``on_round``; for the
grpc engine the launcher follows ``rounds.jsonl``), under the step "rounds done" (1-based, the
``round`` of points.csv):

=====================  ======================================================
``test/accuracy``      test accuracy (rounds with an evaluation)
``test/loss``          test loss (rounds with an evaluation)
``train/loss``         mean training loss of the accepted honest vectors
``train/lr``           the round's learning rate
``clipping/threshold`` the clip threshold of the pipeline's clipping stage
``clipping/honest``    clipped vectors of honest workers
``clipping/byzantine`` clipped vectors of Byzantine workers
``clipping/rows``      rows the clipping stage changed
``aggregate/error``    distance of the aggregate from the honest vectors' mean
``aggregate/norm``     norm of the aggregate
=====================  ======================================================

A value the round does not have (no evaluation, no clipping stage) is not logged. The run's
parameters are the config's keys (``attack_params`` and ``pipeline_params`` flattened as
``attack_params.tau``).

* ``tensorboard`` (extra ``arcsim[tensorboard]``): event files in ``OUT/tensorboard`` written with
  torch's ``SummaryWriter``, the config as hparams and as text; ``tensorboard --logdir runs``. A
  resumed run purges the steps it redoes (``purge_step``).
* ``mlflow`` (extra ``arcsim[mlflow]``, mlflow-skinny is enough): an MLflow run in the experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (default ``arcsim``), in the store ``$MLFLOW_TRACKING_URI`` when set,
  else a file store in ``OUT/mlruns`` (no server). MLflow 3 keeps its file store in maintenance mode
  behind ``MLFLOW_ALLOW_FILE_STORE``: arcsim sets it while it writes, and so must ``mlflow ui
  --backend-store-uri OUT/mlruns``. A resumed run continues the MLflow run of its folder. arcsim
  imports MLflow with its telemetry off (``MLFLOW_DISABLE_TELEMETRY``, unless already set): runs stay local.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from arcsim.config import RunConfig

__all__ = ["METRICS", "TRACKERS", "RoundTrackers", "check_trackers", "flat_params"]

TRACKERS = ("tensorboard", "mlflow")
METRICS = {
    "test/accuracy": "accuracy",
    "test/loss": "test_loss",
    "validation/accuracy": "validation_accuracy",
    "validation/loss": "validation_loss",
    "train/loss": "train_loss",
    "train/lr": "lr",
    "clipping/threshold": "clip_threshold",
    "clipping/honest": "clipped_honest",
    "clipping/byzantine": "clipped_byzantine",
    "clipping/rows": "clipped_rows",
    "aggregate/error": "aggregate_error",
    "aggregate/norm": "aggregate_norm",
}
"""Tracker metric name -> the field of the round record (rounds.jsonl) it carries."""

_EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # the pip extra of each tracker
RUN_TAG = "arcsim.out_dir"  # the MLflow tag naming the run folder (a resumed run finds its MLflow run by it)


def check_trackers(names: Sequence[str] | str) -> tuple[str, ...]:
    """The tracker names, checked (no duplicates, each one of :data:`TRACKERS`)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"each tracker once, got {list(names)}")
    return names


def flat_params(config: RunConfig) -> dict[str, str | int | float | bool]:
    """The config as flat parameters: mapping keys become ``key.sub``, lists text, None ``"none"``.

    >>> from arcsim.config import RunConfig
    >>> params = flat_params(RunConfig(attack_params={"tau": 1.5}))
    >>> params["attack_params.tau"], params["declared_f"], params["lr_milestones"]
    (1.5, 'none', '[]')
    """
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, Mapping):
            for sub, inner in sorted(value.items()):
                out[f"{key}.{sub}"] = _scalar(inner)
        else:
            out[key] = _scalar(value)
    return out


def _scalar(value: Any) -> str | int | float | bool:
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _metrics(record: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(record[field]) for name, field in METRICS.items() if record.get(field) is not None}


def _missing(name: str, error: ImportError) -> RuntimeError:
    return RuntimeError(f"--track {name} needs {error.name or 'a package'}: pip install 'arcsim[{_EXTRAS[name]}]'")


@contextlib.contextmanager
def _env_default(**values: str) -> Iterator[None]:
    """Set environment variables that are not set yet, for the block only."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class _Sink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, *, status: str) -> None: ...


class _TensorBoard:
    def __init__(self, out_dir: Path, config: RunConfig, *, first_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as error:
            raise _missing("tensorboard", error) from None
        # purge_step: a resumed run rewrites the steps from its first one (they may have been logged
        # by the process that was stopped after its last checkpoint).
        self.writer = SummaryWriter(
            log_dir=str(out_dir / "tensorboard"), purge_step=first_step if first_step > 1 else None
        )
        if first_step <= 1:
            experiment, start, end = hparams(flat_params(config), dict.fromkeys(METRICS, 0.0))
            for summary in (experiment, start, end):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```yaml\n" + config.to_yaml() + "```")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self, *, status: str) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out_dir: Path, config: RunConfig, *, first_step: int, engine: str) -> None:
        # The file store's opt-in for as long as this sink writes; telemetry off when MLflow loads here.
        self._env = _env_default(MLFLOW_ALLOW_FILE_STORE="true")
        self._env.__enter__()
        try:
            self._start(out_dir, config, first_step=first_step, engine=engine)
        except BaseException:
            self._env.__exit__(None, None, None)
            raise

    def _start(self, out_dir: Path, config: RunConfig, *, first_step: int, engine: str) -> None:
        try:
            with _env_default(MLFLOW_DISABLE_TELEMETRY="true"):
                from mlflow.entities import Metric
                from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise _missing("mlflow", error) from None
        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "arcsim"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        folder = str(out_dir.resolve())
        found = []
        if first_step > 1 and "'" not in folder:  # a resumed run: the MLflow run of this folder, if there is one
            # (a folder whose name has a quote cannot be written in MLflow's filter: a new MLflow run then)
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{folder}'", max_results=1
            )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=out_dir.name, tags={RUN_TAG: folder, "arcsim.engine": engine}
            )
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in flat_params(config).items()])
        self.uri = uri

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[self._metric(name, value, now, step) for name, value in metrics.items()]
        )

    def close(self, *, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
        finally:
            self._env.__exit__(None, None, None)


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value))


class RoundTrackers:
    """The sinks of one run, opened at its first round (which tells a resumed run from a new one).

    ``with RoundTrackers(["tensorboard"], config=config, out_dir=out) as sinks:`` then
    ``sinks.log_round(record)`` for each round record (a dict, a line of rounds.jsonl) and
    ``sinks.finish(summary)`` at the end; leaving the block without ``finish`` marks the MLflow run
    KILLED (stopped) or FAILED (an error). With no names it does nothing.
    """

    def __init__(self, names: Sequence[str], *, config: RunConfig, out_dir: Path, engine: str = "inproc") -> None:
        self.names = check_trackers(names)
        self.config = config
        self.out_dir = Path(out_dir)
        self.engine = engine
        self.sinks: list[_Sink] = []
        self._opened = False
        self._finished = False

    def __enter__(self) -> RoundTrackers:
        return self

    def _open(self, first_step: int) -> None:
        self._opened = True
        for name in self.names:
            if name == "tensorboard":
                self.sinks.append(_TensorBoard(self.out_dir, self.config, first_step=first_step))
            else:
                self.sinks.append(_MLflow(self.out_dir, self.config, first_step=first_step, engine=self.engine))

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log one round record (its ``round`` is 0-based, as in rounds.jsonl)."""
        if not self.names:
            return
        step = int(record["round"]) + 1
        if not self._opened:
            self._open(step)
        metrics = _metrics(record)
        for sink in self.sinks:
            sink.log(step, metrics)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run ended with ``summary``: close every sink (MLflow: FINISHED when it completed)."""
        self._finished = True
        self._close("FINISHED" if summary.get("status") == "completed" else "KILLED")

    def _close(self, status: str) -> None:
        sinks, self.sinks = self.sinks, []
        with contextlib.ExitStack() as stack:  # every sink is closed, also when one of them fails to
            for sink in reversed(sinks):
                stack.callback(sink.close, status=status)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self._finished:
            self._close("FAILED" if kind is not None and issubclass(kind, Exception) else "KILLED")
