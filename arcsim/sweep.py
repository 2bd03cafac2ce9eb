"""Grids of runs: expand a sweep config, run the grid in parallel, resume a killed sweep.

A sweep config is a run config (the keys of :class:`arcsim.config.RunConfig`) in which any value
may be a list; the sweep runs the cartesian product of the lists (the first list-valued key varies
slowest). For example::

    task: synthetic
    model: mlp
    num_byzantine: [0, 1, 2]
    attack: [sign_flip, alie]
    pipeline:
      - nnm > cwtm
      - arc > nnm > cwtm
      - {pipeline: static_clip > nnm > cwtm, pipeline_params: {c: 2}}   # a bundle, see below
    seed: [1, 2, 3]
    sweep:
      name: small-grid          # default folder runs/<name> (else runs/<config file stem>)
      exclude:                  # drop the combinations that match every key of a rule
        - {attack: alie, num_byzantine: 2}
      skip_invalid: false       # true: drop invalid combinations (and say how many) instead of failing

Rules of the grid:

* A list is a grid axis, a scalar a single value. ``lr_milestones`` is a list already: a flat list
  is one value, a list of lists a grid (``lr_milestones: [[100], [100, 150]]``). For the mapping
  keys ``attack_params``, ``pipeline_params``, ``async`` and ``speeds`` a mapping is one value, a list of
  mappings a grid.
* A *bundle* sets several keys at once: an element of a scalar key's list may be a mapping that
  names the key itself and any others, e.g. ``{attack: alie, attack_params: {tau: 1.5}}``, so that
  parameters go only with the attack or pipeline that takes them. Keys set by bundles may not be
  grid axes themselves, nor be set by the bundles of another axis.
* ``num_byzantine: 0`` means no attack: such a combination runs with ``attack: none`` and no
  ``attack_params`` whatever the attack axis says, and identical configs are run once. So
  ``num_byzantine: [0, 1, 3]`` x ``attack: [sf, alie]`` gives one f = 0 baseline per remaining
  combination, not one per attack.
* Pipeline specs are written in the canonical form ``"arc > nnm > cwtm"``, so spellings that
  differ only in spaces are the same run.
* Every combination is validated (:func:`arcsim.config.from_dict`) before anything runs; a sweep
  with invalid combinations fails with the list of them unless ``sweep.skip_invalid`` is true.

Each run gets the folder ``OUT/<attack>-<pipeline>-f<num_byzantine>-<partitioner>-s<seed>-<digest8>``
(``digest8``: the first 8 hex digits of :meth:`RunConfig.digest`), written by the in-process
engine exactly as ``arcsim run --engine inproc`` writes it, or with ``engine="batched"`` by the
batched engine (arcsim/engine/batched.py), which runs groups of compatible runs in lockstep, one
group per task, and writes the same files. A run is complete when its ``summary.json`` says
``status: completed`` with all rounds and the same config, or ``status: diverged`` (the batched
engine's stop for non-finite vectors); complete runs are skipped, runs with a checkpoint are resumed
from it, so a killed sweep goes on where it stopped.
``OUT/sweep.csv`` (one row per run, rewritten atomically after each finished run) and
``OUT/sweep.yaml`` (the sweep config as given) sit beside the run folders.

The module is callable: ``arcsim.sweep(config, ...)`` is :func:`arcsim.api.sweep`, the Python API's
sweep (``arcsim.sweep`` names this module once it is imported, so the module itself answers the call).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import yaml

# arcsim.config imports torch: it is imported lazily, so that a pool process can set
# OMP_NUM_THREADS before torch loads (the process unpickles this module's functions first).
if TYPE_CHECKING:
    from arcsim.api import SweepResult
    from arcsim.config import RunConfig

__all__ = [
    "EXECUTORS",
    "SWEEP_ENGINES",
    "TABLE_COLUMNS",
    "PlannedRun",
    "SweepOutcome",
    "SweepPlan",
    "execute_group",
    "execute_run",
    "expand_grid",
    "is_complete",
    "load_sweep",
    "plan_sweep",
    "plan_tasks",
    "read_summary",
    "run_name",
    "run_sweep",
    "table_columns",
    "table_row",
    "write_table",
]

EXECUTORS = ("local", "ray", "inline")
"""local: a process pool on this machine; ray: tasks on a Ray cluster; inline: this process, one
run after the other (for debugging and tests)."""

SWEEP_ENGINES = ("inproc", "batched")
"""inproc: a process per run (arcsim.engine.inproc); batched: groups of compatible runs advanced in
lockstep, a process per group (arcsim.engine.batched)."""

#: Statuses a run ends in for good: complete runs are skipped by a rerun (a diverged run would diverge again).
FINISHED = ("completed", "diverged")

SWEEP_SECTION = "sweep"
_SWEEP_KEYS = ("name", "exclude", "skip_invalid")
_LIST_KEYS = frozenset({"lr_milestones"})  # RunConfig keys whose single value is a list
_MAPPING_KEYS = frozenset({"attack_params", "pipeline_params", "async", "speeds"})  # ... whose value is a mapping

TABLE_COLUMNS = (
    "task",
    "model",
    "pipeline",
    "attack",
    "num_byzantine",
    "declared_f",
    "partitioner",
    "alpha",
    "gamma",
    "seed",
    "status",
    "rounds_completed",
    "final_accuracy",
    "max_accuracy",
    "final_params_sha256",
    "wall_seconds",
    "run_dir",
    "error",
)
"""The fixed columns of sweep.csv; the keys the sweep varies (if not among them) come first.
``declared_f`` is the f the pipeline is built with (``RunConfig.f``)."""

_MAX_LISTED = 20  # invalid combinations listed in an error message


# --- expansion --------------------------------------------------------------------------------
def _config_module() -> ModuleType:
    import arcsim.config

    return arcsim.config


def _config_error(message: str) -> ValueError:
    return _config_module().ConfigError(message)


def _fields() -> tuple[str, ...]:
    return _config_module().CONFIG_KEYS


def _axis_values(key: str, value: Any) -> list[Any] | None:
    """The values of a grid axis, or None when ``value`` is a single value of ``key``."""
    if key in _LIST_KEYS:
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
        return None
    if isinstance(value, list):
        if not value:
            raise _config_error(f"sweep key {key!r}: an empty list leaves nothing to run")
        return value
    return None


def _bundle_keys(key: str, values: Sequence[Any]) -> set[str]:
    """Keys set by the bundles (mappings) among the values of the scalar axis ``key``."""
    if key in _LIST_KEYS or key in _MAPPING_KEYS:
        return set()
    keys: set[str] = set()
    for value in values:
        if isinstance(value, Mapping):
            if key not in value:
                raise _config_error(f"sweep key {key!r}: the bundle {dict(value)!r} must set {key!r} itself")
            unknown = sorted(str(k) for k in value if k not in _fields())
            if unknown:
                raise _config_error(f"sweep key {key!r}: the bundle {dict(value)!r} sets unknown config keys {unknown}")
            keys |= set(value) - {key}
    return keys


def expand_grid(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The cartesian product of a sweep config's list-valued keys, bundles merged in.

    The result holds only the keys given (defaults are filled in later by ``from_dict``).

    >>> expand_grid({"seed": [1, 2], "attack": ["sign_flip", {"attack": "alie", "attack_params": {"tau": 1}}]})
    ... # doctest: +NORMALIZE_WHITESPACE
    [{'seed': 1, 'attack': 'sign_flip'}, {'seed': 1, 'attack': 'alie', 'attack_params': {'tau': 1}},
     {'seed': 2, 'attack': 'sign_flip'}, {'seed': 2, 'attack': 'alie', 'attack_params': {'tau': 1}}]
    >>> expand_grid({"lr_milestones": [100, 150]}), len(expand_grid({"lr_milestones": [[100], [150]]}))
    ([{'lr_milestones': [100, 150]}], 2)
    """
    unknown = [str(key) for key in grid if key not in _fields()]
    if unknown:
        raise _config_error(
            f"unknown config keys {unknown} in the sweep; valid keys: {', '.join(_fields())} "
            f"and the {SWEEP_SECTION!r} section"
        )
    axes = {key: values for key, value in grid.items() if (values := _axis_values(key, value)) is not None}
    single = {key: value for key, value in grid.items() if key not in axes}
    owners: dict[str, str] = {}
    for key, values in axes.items():
        for bundled in _bundle_keys(key, values):
            if bundled in axes:
                raise _config_error(f"sweep key {key!r}: a bundle sets {bundled!r}, which is a grid axis itself")
            if bundled in owners:
                raise _config_error(f"sweep keys {owners[bundled]!r} and {key!r}: bundles of both set {bundled!r}")
            owners[bundled] = key
    combos = []
    for choice in itertools.product(*axes.values()):
        combo = dict(single)
        for key, value in zip(axes, choice):
            if isinstance(value, Mapping) and key not in _MAPPING_KEYS:
                combo.update(value)
            else:
                combo[key] = value
        combos.append(combo)
    return combos


def _canonical_pipeline(spec: Any) -> Any:
    from arcsim.robust import parse_spec

    try:
        return " > ".join(parse_spec(spec))
    except ValueError:
        return spec  # from_dict reports it, with the combination


def _normalise(combo: dict[str, Any]) -> dict[str, Any]:
    """``num_byzantine: 0`` runs without an attack; pipeline specs in canonical form."""
    combo = dict(combo)
    if combo.get("num_byzantine", _config_module().RunConfig.num_byzantine) == 0:
        combo["attack"] = "none"
        combo["attack_params"] = {}
    if "pipeline" in combo:
        combo["pipeline"] = _canonical_pipeline(combo["pipeline"])
    return combo


def _matches(rule: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """A rule matches a config when, for every key of the rule, the config's value is the rule's value
    or one of the rule's list of values."""
    for key, wanted in rule.items():
        options = _axis_values(key, wanted) or [wanted]
        if key == "pipeline":
            options = [_canonical_pipeline(option) for option in options]
        if config.get(key) not in options:
            return False
    return True


def _describe(combo: Mapping[str, Any], keys: Sequence[str]) -> str:
    shown = [key for key in keys if key in combo] or list(combo)
    return ", ".join(f"{key}={combo[key]!r}" for key in shown)


# --- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its folder name (relative to the sweep folder) and its config."""

    name: str
    config: RunConfig


@dataclass(frozen=True)
class SweepPlan:
    """The validated runs of a sweep, in grid order, each config once."""

    name: str
    runs: tuple[PlannedRun, ...]
    varied: tuple[str, ...]  # config keys whose values differ between runs
    combinations: int  # size of the grid before dropping anything
    excluded: int = 0  # dropped by sweep.exclude
    duplicates: int = 0  # equal to an earlier run after normalisation (e.g. f = 0 with several attacks)
    invalid: tuple[str, ...] = ()  # dropped under sweep.skip_invalid: one message each
    source_text: str = ""  # the sweep config as given (written to sweep.yaml)

    def describe(self) -> str:
        parts = [f"sweep {self.name!r}: {len(self.runs)} runs from a grid of {self.combinations}"]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates merged")
        if self.excluded:
            parts.append(f"{self.excluded} excluded")
        if self.invalid:
            parts.append(f"{len(self.invalid)} invalid skipped")
        return ", ".join(parts)


def run_name(config: RunConfig) -> str:
    """The run's folder name: readable fields plus the first 8 hex digits of the config digest.

    >>> from arcsim.config import RunConfig
    >>> run_name(RunConfig(task="synthetic", attack="alie", pipeline="arc > nnm > cwtm", seed=1)).rsplit("-", 1)[0]
    'alie-arc_nnm_cwtm-f3-extreme-s1'
    """
    pipeline = "_".join(part.strip() for part in config.pipeline.split(">"))
    partitioner = config.partitioner + "".join(f"{v:g}" for v in (config.alpha, config.gamma) if v is not None)
    return f"{config.attack}-{pipeline}-f{config.num_byzantine}-{partitioner}-s{config.seed}-{config.digest()[:8]}"


def plan_sweep(raw: Mapping[str, Any], *, name: str = "sweep", source_text: str = "") -> SweepPlan:
    """Expand, normalise, filter, validate and deduplicate a sweep config (a parsed mapping).

    Raises ConfigError listing every invalid combination, unless ``sweep.skip_invalid`` is true.

    >>> plan = plan_sweep({"task": "synthetic", "num_honest": 4, "num_byzantine": [0, 1],
    ...                    "attack": ["sign_flip", "foe"], "partitioner": "iid"})
    >>> len(plan.runs), plan.duplicates, [r.config.attack for r in plan.runs]
    (3, 1, ['none', 'sign_flip', 'foe'])
    """
    if not isinstance(raw, Mapping):
        raise _config_error(f"a sweep config must be a mapping of keys to values, got {type(raw).__name__}")
    grid = {key: value for key, value in raw.items() if key != SWEEP_SECTION}
    section = raw.get(SWEEP_SECTION) or {}
    if not isinstance(section, Mapping):
        raise _config_error(f"the {SWEEP_SECTION!r} section must be a mapping, got {section!r}")
    unknown = sorted(str(key) for key in section if key not in _SWEEP_KEYS)
    if unknown:
        raise _config_error(f"unknown keys {unknown} in the {SWEEP_SECTION!r} section; valid: {', '.join(_SWEEP_KEYS)}")
    sweep_name = section.get("name", name)
    if not isinstance(sweep_name, str) or not sweep_name or "/" in sweep_name:
        raise _config_error(f"sweep.name must be a non-empty name without '/', got {sweep_name!r}")
    exclude = section.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(rule, Mapping) and rule for rule in exclude):
        raise _config_error(f"sweep.exclude must be a list of non-empty mappings (key: value or list), got {exclude!r}")
    for rule in exclude:
        unknown = sorted(str(key) for key in rule if key not in _fields())
        if unknown:
            raise _config_error(f"sweep.exclude rule {dict(rule)!r}: unknown config keys {unknown}")
    skip_invalid = section.get("skip_invalid", False)
    if not isinstance(skip_invalid, bool):
        raise _config_error(f"sweep.skip_invalid must be true or false, got {skip_invalid!r}")

    combos = expand_grid(grid)
    axis_keys = [key for key, value in grid.items() if _axis_values(key, value) is not None]
    config_module = _config_module()
    defaults = config_module.RunConfig().to_dict()
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    invalid: list[str] = []
    excluded = duplicates = 0
    for combo in combos:
        combo = _normalise(combo)
        if any(_matches(rule, {**defaults, **combo}) for rule in exclude):
            excluded += 1
            continue
        try:
            config = config_module.from_dict(combo)
        except config_module.ConfigError as error:
            invalid.append(f"{_describe(combo, axis_keys)}: {error}")
            continue
        digest = config.digest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        runs.append(PlannedRun(name=run_name(config), config=config))
    if invalid and not skip_invalid:
        listed = "\n  ".join(invalid[:_MAX_LISTED])
        more = f"\n  ... and {len(invalid) - _MAX_LISTED} more" if len(invalid) > _MAX_LISTED else ""
        raise _config_error(
            f"{len(invalid)} of the {len(combos)} combinations of sweep {sweep_name!r} are invalid "
            f"(fix them, exclude them with sweep.exclude, or set sweep.skip_invalid: true):\n  {listed}{more}"
        )
    if not runs:
        raise _config_error(
            f"sweep {sweep_name!r} has no run left to do (grid of {len(combos)}, "
            f"{excluded} excluded, {len(invalid)} invalid)"
        )
    dicts = [run.config.to_dict() for run in runs]
    varied = tuple(
        key for key in _fields() if len({json.dumps(d[key], sort_keys=True, default=str) for d in dicts}) > 1
    )
    return SweepPlan(
        name=sweep_name,
        runs=tuple(runs),
        varied=varied,
        combinations=len(combos),
        excluded=excluded,
        duplicates=duplicates,
        invalid=tuple(invalid),
        source_text=source_text,
    )


def load_sweep(path: str | Path) -> SweepPlan:
    """Read a sweep config file (YAML) and plan it; the default sweep name is the file's stem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _config_error(f"sweep config not found: {path}") from None
    except OSError as error:
        raise _config_error(f"cannot read sweep config {path}: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _config_error(f"{path}: not valid YAML: {error}") from None
    return plan_sweep(raw or {}, name=path.stem, source_text=text)


# --- one run ----------------------------------------------------------------------------------
def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json, or None when it is missing or unreadable."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _same_config(summary: Mapping[str, Any], config: RunConfig) -> bool:
    def canon(data: Any) -> str:
        return json.dumps(data, sort_keys=True, default=str)

    # A summary written before a key was added lacks it: compare it with that key at its default.
    recorded = _config_module().with_late_defaults(summary.get("config") or {})
    return canon(recorded) == canon(json.loads(canon(config.to_dict())))


def is_complete(run_dir: Path, config: RunConfig) -> bool:
    """True when ``run_dir/summary.json`` records a run of ``config`` that completed all its rounds, or that
    diverged (the batched engine stops a run whose vectors turn non-finite: a rerun would diverge again)."""
    summary = read_summary(run_dir)
    if summary is None or not _same_config(summary, config):
        return False
    status = summary.get("status")
    return (status == "completed" and summary.get("rounds_completed") == config.rounds) or status == "diverged"


def _one_thread() -> None:
    # OMP_NUM_THREADS=1 is set before torch loads: by the pool's initializer, and by Ray for
    # num_cpus=1 tasks. This pins torch's own pools too (and torch in the caller, for "inline").
    import torch

    torch.set_num_threads(1)


def execute_run(config: RunConfig, run_dir: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Run ``config`` into ``run_dir`` with the in-process engine, resuming from its last checkpoint.

    Runs torch with one thread. Never raises for a failing run: the result has ``status: failed``
    and ``error``, and the traceback goes to ``run_dir/error.log``. Returns ``{"status",
    "seconds", "resumed_from", "summary", "error"}``; the process pool and Ray call this function.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    resumed_from = None
    try:
        _one_thread()
        from arcsim.engine import checkpoint
        from arcsim.engine.inproc import run_inproc

        found, _ = checkpoint.load_latest(run_dir / "checkpoints")
        if found is not None:
            resumed_from = int(found.values["round"])
        # On a GPU the honest gradients go in one vmapped call; on a CPU the plain loop is faster.
        summary = run_inproc(config, run_dir, resume=found is not None, device=device, batch_workers=device == "cuda")
        (run_dir / "error.log").unlink(missing_ok=True)
        return {
            "status": summary["status"],
            "seconds": time.perf_counter() - started,
            "resumed_from": resumed_from,
            "summary": summary,
            "error": None,
        }
    except Exception as error:  # noqa: BLE001 - one failing run must not stop the sweep
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.log").write_text(traceback.format_exc())
        except OSError:
            pass
        return {
            "status": "failed",
            "seconds": time.perf_counter() - started,
            "resumed_from": resumed_from,
            "summary": None,
            "error": f"{type(error).__name__}: {error}",
        }


def execute_group(
    configs: Sequence[RunConfig], run_dirs: Sequence[str | Path], device: str = "cpu", threads: int = 1
) -> list[dict[str, Any]]:
    """Run ``configs`` (one group of compatible runs) with the batched engine, each into its folder,
    resuming those with a checkpoint; torch computes with ``threads`` threads. Never raises: when the
    group fails, every run of it has ``status: failed`` and the traceback goes to each ``error.log``.
    Returns one result per run, as :func:`execute_run` does (``seconds``: the group's)."""
    started = time.perf_counter()
    dirs = [Path(d) for d in run_dirs]
    resumed_from: list[int | None] = [None] * len(dirs)
    try:
        import torch

        from arcsim.engine import checkpoint
        from arcsim.engine.batched import run_batched

        for k, run_dir in enumerate(dirs):
            found, _ = checkpoint.load_latest(run_dir / "checkpoints")
            if found is not None:
                resumed_from[k] = int(found.values["round"])
        # The inline executor runs this in the caller's process: its thread count is restored after.
        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, threads))
        try:
            summaries = run_batched(configs, dirs, resume=[r is not None for r in resumed_from], device=device)
        finally:
            torch.set_num_threads(previous)
        seconds = time.perf_counter() - started
        for run_dir in dirs:
            (run_dir / "error.log").unlink(missing_ok=True)
        return [
            {"status": s["status"], "seconds": seconds, "resumed_from": r, "summary": s, "error": None}
            for s, r in zip(summaries, resumed_from)
        ]
    except Exception as error:  # noqa: BLE001 - one failing group must not stop the sweep
        text = traceback.format_exc()
        for run_dir in dirs:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.log").write_text(text)
            except OSError:
                pass
        seconds = time.perf_counter() - started
        message = f"{type(error).__name__}: {error}"
        return [
            {"status": "failed", "seconds": seconds, "resumed_from": r, "summary": None, "error": message}
            for r in resumed_from
        ]


def execute_task(
    engine: str, configs: Sequence[RunConfig], run_dirs: Sequence[str], device: str, threads: int
) -> list[dict[str, Any]]:
    """One task of an executor: a single run (inproc) or a group of runs (batched); a result per run."""
    if engine == "batched":
        return execute_group(configs, run_dirs, device, threads)
    return [execute_run(config, run_dir, device) for config, run_dir in zip(configs, run_dirs)]


def _failure(message: str) -> dict[str, Any]:
    return {"status": "failed", "seconds": 0.0, "resumed_from": None, "summary": None, "error": message}


# --- executors --------------------------------------------------------------------------------
def _init_pool_worker(parent_pid: int) -> None:
    """Pool processes: one torch thread, and die with the sweep (a killed sweep leaves no orphan
    writing into a run folder that the next sweep resumes)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - best effort
            pass
        if os.getppid() != parent_pid:  # the sweep died before prctl took effect
            os._exit(1)


Results = Iterator[tuple[PlannedRun, dict[str, Any]]]


@dataclass(frozen=True)
class Task:
    """What one executor slot runs: one run (inproc) or one group of compatible runs (batched)."""

    engine: str
    runs: tuple[PlannedRun, ...]
    threads: int = 1

    def arguments(self, out_dir: Path, device: str) -> tuple[Any, ...]:
        return (
            self.engine,
            [run.config for run in self.runs],
            [str(out_dir / run.name) for run in self.runs],
            device,
            self.threads,
        )


def _died(task: Task) -> Iterator[tuple[PlannedRun, dict[str, Any]]]:
    message = "a sweep worker process died (killed or crashed) during this run; rerun the sweep to resume it"
    for run in task.runs:
        yield run, _failure(message)


def _pair(task: Task, results: Sequence[dict[str, Any]]) -> Iterator[tuple[PlannedRun, dict[str, Any]]]:
    yield from zip(task.runs, results, strict=True)


def _run_inline(tasks: Sequence[Task], out_dir: Path, *, device: str) -> Results:
    for task in tasks:
        yield from _pair(task, execute_task(*task.arguments(out_dir, device)))


def _run_local(tasks: Sequence[Task], out_dir: Path, *, jobs: int, device: str) -> Results:
    """A pool of ``jobs`` spawned processes; at most ``jobs`` tasks in flight, so a crashed process
    (e.g. killed for memory) fails only the runs it was holding, and the pool is rebuilt."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    pending = deque(tasks)
    while pending:
        pool = ProcessPoolExecutor(
            max_workers=min(jobs, len(pending)),
            mp_context=context,
            initializer=_init_pool_worker,
            initargs=(os.getpid(),),
        )
        in_flight: dict[Future[list[dict[str, Any]]], Task] = {}
        broken = False
        try:
            while (pending or in_flight) and not broken:
                while pending and len(in_flight) < jobs:
                    task = pending[0]
                    try:
                        in_flight[pool.submit(execute_task, *task.arguments(out_dir, device))] = task
                    except BrokenProcessPool:
                        broken = True
                        break
                    pending.popleft()
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    task = in_flight.pop(future)
                    try:
                        yield from _pair(task, future.result())
                    except BrokenProcessPool:
                        broken = True
                        yield from _died(task)
                    except Exception as error:  # noqa: BLE001 - e.g. the result could not be sent back
                        for run in task.runs:
                            yield run, _failure(f"{type(error).__name__}: {error}")
            for future, task in list(in_flight.items()):  # the pool broke under these too
                in_flight.pop(future)
                yield from _died(task)
        finally:
            if in_flight:  # interrupted: stop the runs now (their checkpoints let the next sweep resume)
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.terminate()
            pool.shutdown(wait=not in_flight, cancel_futures=True)


def _start_local_ray(ray: Any, jobs: int | None) -> None:
    """A local Ray instance. Ray waits a fixed 30 s for its node to register and raises a bare
    Exception when a loaded machine takes longer: that one case gets a second try."""
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
            return
        except Exception as error:  # noqa: BLE001 - Ray's slow-start error has no type of its own
            if attempt == 2 or "timed out during startup" not in str(error):
                raise
            ray.shutdown()


def _run_ray(tasks: Sequence[Task], out_dir: Path, *, jobs: int | None, device: str, address: str | None) -> Results:
    """Ray tasks calling :func:`execute_task`: one CPU each for a run, and for a batched group its
    threads' CPUs, or one GPU with ``device`` cuda (a protocol grid spreads over a GPU cluster one
    group per GPU). Without ``address`` a local Ray instance with ``jobs`` CPUs is started (and
    stopped); with one, the cluster's nodes must import arcsim and share ``out_dir``'s file system."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: pip install 'arcsim[ray]' (or pip install 'ray>=2.9')") from None
    started_here = False
    if not ray.is_initialized():
        if address is None:
            _start_local_ray(ray, jobs)
        else:
            ray.init(address=address, log_to_driver=False)
        started_here = True
    pending = deque(tasks)
    in_flight: dict[Any, Task] = {}
    try:
        while pending or in_flight:
            while pending and (jobs is None or len(in_flight) < jobs):
                task = pending.popleft()
                resources = {"num_gpus": 1} if device == "cuda" else {"num_cpus": task.threads}
                remote = ray.remote(**resources)(execute_task)
                in_flight[remote.remote(*task.arguments(out_dir.resolve(), device))] = task
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                task = in_flight.pop(ref)
                try:
                    yield from _pair(task, ray.get(ref))
                except Exception as error:  # noqa: BLE001 - the task's worker died, or the node went away
                    for run in task.runs:
                        yield run, _failure(f"ray: {type(error).__name__}: {error}")
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def plan_tasks(
    runs: Sequence[PlannedRun],
    *,
    engine: str,
    jobs: int,
    device: str,
    max_batch: int | None = None,
    threads: int | None = None,
) -> list[Task]:
    """The executor's tasks: one per run for ``inproc``; for ``batched``, groups of compatible runs
    (:func:`arcsim.engine.batched.plan_groups`) of at most ``max_batch`` runs (default: what the free
    memory allows, :func:`arcsim.engine.batched.default_max_batch`), cut into at least ``jobs`` groups on
    a CPU so that every process gets one, each computing with ``threads`` threads (default ``cores //
    jobs``; a Ray task asks for that many CPUs)."""
    if engine != "batched":
        return [Task(engine, (run,)) for run in runs]
    if not runs:
        return []
    from arcsim.engine.batched import default_max_batch, group_key, plan_groups

    configs = [run.config for run in runs]
    if max_batch is None:
        firsts = {group_key(config): config for config in reversed(configs)}.values()
        max_batch = min(default_max_batch(config, device=device, jobs=jobs) for config in firsts)
    on_cpu = device != "cuda"
    groups = plan_groups(configs, max_batch=max_batch, min_groups=jobs if on_cpu else 1)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(jobs, 1)) if on_cpu else 1
    return [Task(engine, tuple(runs[i] for i in group), threads) for group in groups]


# --- the table --------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table_columns(plan: SweepPlan) -> list[str]:
    return [key for key in plan.varied if key not in TABLE_COLUMNS] + list(TABLE_COLUMNS)


def table_row(
    run: PlannedRun, *, status: str, summary: Mapping[str, Any] | None = None, error: str | None = None
) -> dict[str, Any]:
    """One row of sweep.csv (before formatting): every config key, ``declared_f``, and the results."""
    summary = summary or {}
    return {
        **run.config.to_dict(),
        "declared_f": run.config.f,
        "status": status,
        "rounds_completed": summary.get("rounds_completed", 0 if status == "pending" else None),
        "final_accuracy": summary.get("final_accuracy"),
        "max_accuracy": summary.get("max_accuracy"),
        "final_params_sha256": summary.get("final_params_sha256"),
        "wall_seconds": summary.get("wall_seconds"),
        "run_dir": run.name,
        "error": error,
    }


def write_table(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the CSV atomically (a temporary file renamed over ``path``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in columns})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


# --- the sweep --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepOutcome:
    out_dir: Path
    table: Path
    rows: tuple[dict[str, Any], ...]
    skipped: int  # complete before this sweep started
    completed: int  # run (or resumed) to completion by this sweep
    failed: int
    names_failed: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.failed == 0


@contextmanager
def _sweep_lock(out_dir: Path) -> Iterator[None]:
    """One sweep at a time in a folder (two would resume the same runs at once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock
        yield
        return
    with open(out_dir / ".sweep.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another arcsim sweep is running in {out_dir}; wait for it or use another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def run_sweep(
    plan: SweepPlan,
    out_dir: str | Path,
    *,
    jobs: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    device: str = "cpu",
    echo: Callable[[str], None] | None = None,
    engine: str = "inproc",
    max_batch: int | None = None,
) -> SweepOutcome:
    """Run every run of ``plan`` not already complete in ``out_dir``, ``jobs`` at a time.

    ``jobs`` defaults to the number of CPU cores (local) or to no limit beyond the cluster's
    CPUs (ray). ``echo`` receives one line per run (skipped or finished) and a final summary.
    ``engine``: ``"inproc"`` (a process per run) or ``"batched"`` (groups of compatible runs advanced
    in lockstep, at most ``max_batch`` runs each; see :func:`plan_tasks`).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if engine not in SWEEP_ENGINES:
        raise ValueError(f"engine must be one of {', '.join(SWEEP_ENGINES)}, got {engine!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive integer, got max_batch = {max_batch!r}")
    if max_batch is not None and engine != "batched":
        raise ValueError(f"max_batch = {max_batch} needs engine 'batched', got {engine!r}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive integer, got jobs = {jobs!r}")
    if ray_address is not None and executor != "ray":
        raise ValueError(f"ray_address = {ray_address!r} needs executor 'ray', got {executor!r}")
    echo = echo or (lambda line: print(line, flush=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "sweep.csv"
    columns = table_columns(plan)
    total = len(plan.runs)
    with _sweep_lock(out_dir):
        if plan.source_text:
            (out_dir / "sweep.yaml").write_text(plan.source_text)
        rows: dict[str, dict[str, Any]] = {}
        todo: list[PlannedRun] = []
        finished = 0
        for run in plan.runs:
            summary = read_summary(out_dir / run.name)
            if is_complete(out_dir / run.name, run.config):
                rows[run.name] = table_row(run, status=(summary or {}).get("status", "completed"), summary=summary)
                finished += 1
                echo(
                    f"[{finished}/{total}] {run.name} skipped: already complete "
                    f"(max acc {_pct((summary or {}).get('max_accuracy')).strip()})"
                )
            else:
                rows[run.name] = table_row(run, status="pending")
                todo.append(run)

        def write() -> None:
            write_table(table, columns, [rows[run.name] for run in plan.runs])

        write()
        skipped, completed, failed_names = finished, 0, []
        slots = jobs or (os.cpu_count() or 1) if executor == "local" else jobs or 1
        # A Ray task asks for its threads' CPUs: one each, so that a cluster's (or the local instance's
        # `jobs`) CPUs all take tasks.
        threads = 1 if executor == "ray" else None
        tasks = plan_tasks(todo, engine=engine, jobs=slots, device=device, max_batch=max_batch, threads=threads)
        if executor == "inline":
            results = _run_inline(tasks, out_dir, device=device)
        elif executor == "local":
            results = _run_local(tasks, out_dir, jobs=jobs or os.cpu_count() or 1, device=device)
        else:
            results = _run_ray(tasks, out_dir, jobs=jobs, device=device, address=ray_address)
        try:
            for run, result in results:
                finished += 1
                summary = result["summary"]
                resumed = "" if result["resumed_from"] is None else f" (resumed at round {result['resumed_from']})"
                if result["status"] in FINISHED:
                    completed += 1
                    rows[run.name] = table_row(run, status=result["status"], summary=summary)
                    line = (
                        f"[{finished}/{total}] {run.name} {result['status']}: max acc {_pct(summary['max_accuracy'])}, "
                        f"{result['seconds']:.1f}s{resumed}"
                    )
                else:
                    failed_names.append(run.name)
                    error = result["error"] or f"run ended with status {result['status']!r}"
                    rows[run.name] = table_row(run, status="failed", summary=summary, error=error)
                    line = f"[{finished}/{total}] {run.name} FAILED after {result['seconds']:.1f}s: {error}"
                write()  # before the line: whoever reads the line finds the run in the table
                echo(line)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
            write()
        echo(
            f"sweep {plan.name!r}: {total} runs, {skipped} already complete, {completed} completed now, "
            f"{len(failed_names)} failed; table {table}"
        )
        return SweepOutcome(
            out_dir=out_dir,
            table=table,
            rows=tuple(rows[run.name] for run in plan.runs),
            skipped=skipped,
            completed=completed,
            failed=len(failed_names),
            names_failed=tuple(failed_names),
        )


class _CallableModule(ModuleType):
    """This module's type: calling the module runs :func:`arcsim.api.sweep`."""

    def __call__(self, *args: Any, **kwargs: Any) -> SweepResult:
        from arcsim.api import sweep

        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
