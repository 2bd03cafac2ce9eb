"""arcsim from Python: ``arcsim.run``, ``arcsim.sweep`` and ``arcsim.load``.

>>> import arcsim
>>> result = arcsim.run("configs/small.yaml", rounds=20)           # doctest: +SKIP
>>> result.summary["final_accuracy"], len(result.records)          # doctest: +SKIP
>>> frame = arcsim.load(result.out_dir).to_pandas()                # doctest: +SKIP

A run started here is the run the command line starts: the same engines, the same files in its
folder, and the same ``final_params_sha256`` as ``arcsim run`` for the same config (torch computes
with one thread while the run lasts, as in every arcsim process; the caller's setting comes back
afterwards). The grpc engine starts the coordinator, the workers and the adversaries as processes
through the launcher ``arcsim run --engine grpc`` uses.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arcsim.engine.rounds import RECORD_FIELDS
from arcsim.report import Table, load_points

if TYPE_CHECKING:
    from arcsim.config import RunConfig
    from arcsim.sweep import SweepOutcome

__all__ = ["ENGINES", "RECORD_COLUMNS", "RunResult", "SweepResult", "load", "run", "sweep"]

ENGINES = ("inproc", "grpc", "batched")
RECORD_COLUMNS = RECORD_FIELDS
"""The columns of :attr:`RunResult.records` (the fields of a line of rounds.jsonl; ``round`` is 0-based there)."""


@dataclass(frozen=True)
class RunResult:
    """A finished run: its folder, its summary (summary.json) and its per-round records (rounds.jsonl)."""

    out_dir: Path
    config: RunConfig
    summary: dict[str, Any]
    records: Table

    @property
    def final_params_sha256(self) -> str:
        return str(self.summary["final_params_sha256"])

    def to_pandas(self) -> Any:
        """The per-round records as a ``pandas.DataFrame`` (pandas must be installed)."""
        return self.records.to_pandas()


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: its folder, one row per run (as in sweep.csv) and the runs' long-format table."""

    out_dir: Path
    rows: Table
    failed: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failed

    def load(self) -> Table:
        """The completed runs' rounds, one row each (:func:`load` of the sweep folder)."""
        return load(self.out_dir)

    def to_pandas(self) -> Any:
        """The sweep's table (one row per run) as a ``pandas.DataFrame``."""
        return self.rows.to_pandas()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Within the block torch computes with one thread, as every arcsim process does (the engines'
    bit-for-bit equality assumes it); the caller's thread count comes back afterwards."""
    import torch

    from arcsim.engine.inproc import reuse_freed_memory

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    reuse_freed_memory()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_config(config: str | Path | Mapping[str, Any] | RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from a YAML path, a mapping of config keys or a RunConfig, with ``overrides`` applied."""
    from arcsim.config import RunConfig, from_dict, load_config

    if isinstance(config, RunConfig):
        return config.replace(**overrides) if overrides else config
    if isinstance(config, Mapping):
        return from_dict({**config, **overrides})
    if isinstance(config, (str, Path)):
        return load_config(Path(config), dict(overrides))
    raise TypeError(f"config must be a path, a mapping or a RunConfig, got {type(config).__name__}: {config!r}")


def _default_out(config: str | Path | Mapping[str, Any] | RunConfig) -> Path:
    stem = Path(config).stem if isinstance(config, (str, Path)) else "run"
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():  # two runs started within a second get two folders
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def read_records(out_dir: str | Path) -> Table:
    """A run folder's rounds.jsonl as a table (:data:`RECORD_COLUMNS`)."""
    path = Path(out_dir) / "rounds.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return Table((json.loads(line) for line in lines if line.strip()), columns=RECORD_COLUMNS)


def run(
    config: str | Path | Mapping[str, Any] | RunConfig,
    *,
    engine: str = "inproc",
    out: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    track: Sequence[str] = (),
    progress: bool = False,
    **overrides: Any,
) -> RunResult:
    """Run an experiment to its end, as ``arcsim run`` does, and return its summary and records.

    ``config``: a YAML file, a mapping of config keys or a :class:`arcsim.config.RunConfig`;
    ``overrides`` replace config keys (``arcsim.run("configs/small.yaml", rounds=20, attack="foe")``).
    ``engine``: ``"inproc"`` (this process), ``"grpc"`` (the services as processes over loopback) or
    ``"batched"`` (the sweeps' batched engine on this one run: same data and draws, equal within rounding).
    ``out``: the results folder (default: a new ``runs/<config>-<time>``); ``resume`` continues the run
    in ``out`` from its last checkpoint. ``track``: per-round sinks (``"tensorboard"``, ``"mlflow"``,
    arcsim.tracking). ``progress``: the command line's live progress line on stderr.

    Raises :class:`arcsim.config.ConfigError` (a ValueError) for a bad config, ValueError for bad
    arguments, and RuntimeError when the run ended without completing.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    from arcsim.tracking import check_trackers

    trackers = check_trackers(track)
    resolved = resolve_config(config, overrides)
    out_dir = Path(out) if out is not None else _default_out(config)
    if resume and not (out_dir / "checkpoints").is_dir():
        raise ValueError(f"resume: {out_dir} has no checkpoints to resume from")
    if not resume and (out_dir / "summary.json").exists():
        raise ValueError(f"{out_dir} already holds a run; choose another out or pass resume=True")
    with one_torch_thread():
        if engine in ("inproc", "batched"):
            summary = _run_in_process(
                resolved, out_dir, engine=engine, resume=resume, device=device, trackers=trackers, progress=progress
            )
        else:
            from arcsim.launcher import run_grpc

            out_dir.mkdir(parents=True, exist_ok=True)
            config_path = out_dir / "config.requested.yaml"
            config_path.write_text(resolved.to_yaml())
            summary = run_grpc(
                config_path, resolved, out_dir, resume=resume, device=device, progress=progress, track=trackers
            )
    if summary["status"] == "diverged":
        raise RuntimeError(
            f"the run in {out_dir} diverged after {summary['rounds_completed']} of {resolved.rounds} rounds "
            "(its vectors or parameters turned non-finite)"
        )
    if summary["status"] != "completed":
        raise RuntimeError(
            f"the run in {out_dir} stopped before completing ({summary['status']}, "
            f"{summary['rounds_completed']} of {resolved.rounds} rounds); continue it with "
            "resume=True"
        )
    return RunResult(out_dir=out_dir, config=resolved, summary=summary, records=read_records(out_dir))


def _run_in_process(
    config: RunConfig,
    out_dir: Path,
    *,
    engine: str,
    resume: bool,
    device: str,
    trackers: Sequence[str],
    progress: bool,
) -> dict[str, Any]:
    from arcsim.engine.batched import run_batched
    from arcsim.engine.inproc import run_inproc
    from arcsim.progress import Progress
    from arcsim.tracking import RoundTrackers

    display = Progress(config.rounds) if progress else None
    with RoundTrackers(trackers, config=config, out_dir=out_dir) as sinks:

        def on_round(state: Any, record: Any) -> None:
            data = json.loads(record.to_json())
            sinks.log_round(data)
            if display is not None:
                display.update(data)

        try:
            if engine == "batched":
                (summary,) = run_batched([config], [out_dir], resume=resume, device=device, on_round=on_round)
            else:
                summary = run_inproc(config, out_dir, resume=resume, device=device, on_round=on_round)
        finally:
            if display is not None:
                display.close()
        sinks.finish(summary)
    return summary


def sweep(
    config: str | Path | Mapping[str, Any],
    *,
    out: str | Path | None = None,
    jobs: int | None = None,
    executor: str = "local",
    device: str = "cpu",
    echo: bool = False,
    engine: str = "inproc",
    max_batch: int | None = None,
    **overrides: Any,
) -> SweepResult:
    """Run a grid, as ``arcsim sweep`` does (arcsim.sweep: any config value may be a list).

    ``config``: a sweep config file or mapping; ``overrides`` replace its keys (a list is a grid axis:
    ``arcsim.sweep("grid.yaml", seed=[1, 2, 3])``). ``out``: the sweep folder (default ``runs/<name>``);
    a rerun resumes it. ``executor``: ``"local"`` (a process pool of ``jobs``), ``"ray"`` or ``"inline"``
    (this process, one run after the other). ``echo``: print a line per run. ``engine``: ``"inproc"``
    (a process per run) or ``"batched"`` (groups of compatible runs in lockstep, at most ``max_batch``
    runs each).
    """
    import yaml

    from arcsim.sweep import load_sweep, plan_sweep, run_sweep

    if isinstance(config, (str, Path)) and not overrides:
        plan = load_sweep(config)
    elif isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"sweep config not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: a sweep config is a mapping of keys to values, got {type(raw).__name__}")
        merged = {**raw, **overrides}
        plan = plan_sweep(merged, name=path.stem, source_text=yaml.safe_dump(merged, sort_keys=False))
    elif isinstance(config, Mapping):
        merged = {**config, **overrides}
        plan = plan_sweep(merged, source_text=yaml.safe_dump(dict(merged), sort_keys=False))
    else:
        raise TypeError(f"config must be a path or a mapping, got {type(config).__name__}: {config!r}")
    out_dir = Path(out) if out is not None else Path("runs") / plan.name
    with one_torch_thread():  # the inline executor computes here; pool processes pin their own
        outcome: SweepOutcome = run_sweep(
            plan,
            out_dir,
            jobs=jobs,
            executor=executor,
            device=device,
            echo=(lambda line: print(line, flush=True)) if echo else (lambda line: None),
            engine=engine,
            max_batch=max_batch,
        )
    from arcsim.sweep import table_columns

    rows = Table((dict(row) for row in outcome.rows), columns=table_columns(plan))
    return SweepResult(out_dir=out_dir, rows=rows, failed=outcome.names_failed)


def load(path: str | Path) -> Table:
    """The long-format table of a run folder or a sweep folder: one row per complete run and round
    (arcsim.report.POINT_COLUMNS), the table ``arcsim report`` computes its numbers from and writes
    as points.csv; a diverged run's missed evaluations count at chance (arcsim.report.chance_records).
    ``.to_pandas()`` gives a DataFrame. ValueError when ``path`` holds no complete run."""
    return load_points(path)
