"""Tables and plots of a run or a sweep, by ByzFL's protocol (the paper's metric).

For every setting, number of Byzantine workers f, pipeline and attack, the runs of the different
seeds are averaged round by round, and the score is the maximum over evaluations of that
seed-averaged test accuracy:

.. math::

    \\mathrm{acc}(P, a) = \\max_{t \\in E} \\frac{1}{|S|} \\sum_{s \\in S} \\mathrm{acc}_{s}(P, a, t),
    \\qquad \\mathrm{worst}(P) = \\min_{a \\in A} \\mathrm{acc}(P, a)

where E are the evaluated rounds that every seed has, S the seeds, A the attacks and P the
pipeline. (Averaging first and taking the maximum second is not the same as the mean of each
seed's maximum.) Reference: Allouah et al., arXiv:2405.14432, and ByzFL's benchmark.

``arcsim report DIR`` writes ``DIR/report.md`` (one table per setting and f: rows = pipelines,
columns = attacks and the worst case), the same numbers as CSV (``DIR/tables.csv``, accuracies as
fractions), the long-format table it computes them from (``DIR/points.csv``: one row per run and
round, :data:`POINT_COLUMNS`; ``arcsim.load(DIR)`` returns it) and PNG plots under ``DIR/plots/``:

* ``accuracy-*.png``: seed-averaged accuracy over rounds, one panel per attack, for a base
  pipeline P without clipping, with ARC (``arc > P``) and with static clipping (``static_clip > P``);
* ``worst_case_vs_f-*.png``: worst-case accuracy against f, per base pipeline, for the same three;
* ``arc_clipping-*.png``: ARC's clip threshold and the number of clipped vectors by role (honest,
  Byzantine) over rounds, per attack.

``arcsim report DIR --select validation`` applies the authors' selection rule (docs/paper.md) per
(dataset, heterogeneity, f, pipeline) over the sweep's hyperparameter points (the config keys that vary
other than the attack and the seed): a point's score is the minimum over attacks of the maximum over
evaluations of the seed-averaged *validation* accuracy, the point with the largest score is kept, and
its *test* accuracy is reported the same way. report.md opens with the kept points' tables, and it writes
``DIR/selected.csv``, ``DIR/candidates.csv``, ``heatmap-*.png`` (test worst case over heterogeneity x f,
a panel per clipping variant) and ``selected_worst_case_vs_f-*.png``. The runs need a validation split
(validation_fraction > 0).

The computations (:func:`seed_average`, :func:`best_accuracy`, :func:`worst_case`,
:func:`attack_tables`, :func:`select_on_validation`) are plain functions on plain data; the rest reads
run folders and draws.

Example on a hand-made table (two seeds, two evaluations):

>>> points = [
...     {"setting": "s", "f": 1, "pipeline": "P", "attack": "alie", "seed": 1, "round": 5, "accuracy": 0.5},
...     {"setting": "s", "f": 1, "pipeline": "P", "attack": "alie", "seed": 1, "round": 10, "accuracy": 0.7},
...     {"setting": "s", "f": 1, "pipeline": "P", "attack": "alie", "seed": 2, "round": 5, "accuracy": 0.7},
...     {"setting": "s", "f": 1, "pipeline": "P", "attack": "alie", "seed": 2, "round": 10, "accuracy": 0.5},
... ]
>>> best_accuracy(points)
{('s', 1, 'P', 'alie'): 0.6}
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DIVERGED",
    "KEY_FIELDS",
    "POINT_COLUMNS",
    "SELECTION_COLUMNS",
    "SELECTION_GROUP",
    "SELECT_MODES",
    "ReportResult",
    "RunData",
    "SelectionData",
    "Table",
    "attack_tables",
    "best_accuracy",
    "candidate_rows",
    "cell_fields",
    "chance_records",
    "clipping_variant",
    "evaluation_rounds",
    "group_curves",
    "hyperparameter_keys",
    "load_points",
    "load_runs",
    "markdown_tables",
    "points_from_runs",
    "seed_average",
    "select_on_validation",
    "selected_rows",
    "selection_markdown",
    "selection_points",
    "table_rows",
    "worst_case",
    "write_report",
]

KEY_FIELDS = ("setting", "f", "pipeline", "attack")
"""What identifies one cell of the tables: everything but the seed."""

NO_CLIPPING, ARC, STATIC_CLIP = "none", "arc", "static_clip"
VARIANT_LABELS = {NO_CLIPPING: "without clipping", ARC: "with ARC", STATIC_CLIP: "static clipping"}
_VARIANT_STYLE = {NO_CLIPPING: ("tab:blue", "-"), ARC: ("tab:red", "-"), STATIC_CLIP: ("tab:green", "--")}

# Config keys that never change the numbers, and those the keys of a cell already name.
_IGNORED_KEYS = frozenset({"data_root", "round_deadline", "eval_batch_size"})
_CELL_KEYS = frozenset({"seed", "attack", "attack_params", "pipeline", "pipeline_params", "num_byzantine"})
_DATASET_KEYS = ("task", "model", "num_honest", "declared_f")
_HETEROGENEITY_KEYS = ("partitioner", "alpha", "gamma")
_SETTING_CORE = (*_DATASET_KEYS, *_HETEROGENEITY_KEYS)

# The round record's fields that a point carries (rounds.jsonl; ``round`` becomes rounds done).
_RECORD_FIELDS = (
    "lr",
    "accuracy",
    "test_loss",
    "validation_accuracy",
    "validation_loss",
    "train_loss",
    "clip_threshold",
    "clipped_honest",
    "clipped_byzantine",
    "clipped_rows",
    "aggregate_error",
    "aggregate_norm",
    "aggregated",
)
POINT_COLUMNS = (
    "setting",
    "f",
    "pipeline",
    "attack",
    "seed",
    "base",
    "variant",
    "variant_label",
    "run",
    "round",
    *_RECORD_FIELDS,
    "diverged",
)
"""The columns of the long-format table (points.csv, :func:`load_points`), one row per run and round.
``round`` counts the rounds done (1-based); ``accuracy`` and ``test_loss`` (the test set's) are empty between
evaluations, ``validation_accuracy`` and ``validation_loss`` also in runs without a validation split.
``diverged`` is true on the evaluations a diverged run did not reach, scored at chance (:func:`chance_records`)."""


class Table(list[dict[str, Any]]):
    """A long-format table: a list of rows (dicts) with a fixed column order.

    >>> table = Table([{"round": 1, "accuracy": 0.5}], columns=("round", "accuracy"))
    >>> table[0]["accuracy"], table.columns
    (0.5, ('round', 'accuracy'))
    """

    def __init__(self, rows: Iterable[dict[str, Any]] = (), *, columns: Sequence[str]) -> None:
        super().__init__(rows)
        self.columns = tuple(columns)

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` with the table's columns (pandas must be installed)."""
        try:
            import pandas
        except ImportError:
            raise RuntimeError("to_pandas() needs pandas: pip install pandas") from None
        return pandas.DataFrame(list(self), columns=list(self.columns))

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows as CSV (atomically); None is an empty cell, lists and dicts are JSON."""
        from arcsim.sweep import write_table

        write_table(Path(path), self.columns, self)
        return Path(path)


# --- the computations (plain data in, plain data out) -----------------------------------------
def seed_average(curves: Mapping[Any, Mapping[int, float]]) -> dict[int, float]:
    """Average per-seed curves (seed -> {round: value}) at the rounds that every seed has.

    >>> seed_average({1: {5: 0.5, 10: 0.7}, 2: {5: 0.7, 10: 0.5, 15: 0.9}})
    {5: 0.6, 10: 0.6}
    """
    if not curves:
        return {}
    rounds = set.intersection(*(set(curve) for curve in curves.values()))
    count = len(curves)
    return {r: _round(sum(curve[r] for curve in curves.values()) / count) for r in sorted(rounds)}


def _round(value: float) -> float:
    return round(value, 12)  # hides float noise such as 0.6000000000000001 in tables and doctests


def group_curves(
    points: Iterable[Mapping[str, Any]], *, keys: Sequence[str] = KEY_FIELDS, value: str = "accuracy"
) -> dict[tuple[Any, ...], dict[Any, dict[int, float]]]:
    """Long-format points -> {key: {seed: {round: value}}}; points whose value is None are left out.

    Every point has the fields ``keys``, ``"seed"``, ``"round"`` and ``value``.
    """
    grouped: dict[tuple[Any, ...], dict[Any, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for point in points:
        if point.get(value) is None:
            continue
        grouped[tuple(point[k] for k in keys)][point["seed"]][int(point["round"])] = float(point[value])
    return {key: {seed: dict(curve) for seed, curve in seeds.items()} for key, seeds in grouped.items()}


def best_accuracy(
    points: Iterable[Mapping[str, Any]], *, keys: Sequence[str] = KEY_FIELDS, value: str = "accuracy"
) -> dict[tuple[Any, ...], float]:
    """For each key: the maximum over evaluations of the seed-averaged accuracy (the field ``value``:
    ``accuracy`` is the test set's, ``validation_accuracy`` the validation split's).

    Keys whose seeds share no evaluated round are left out.
    """
    best = {}
    for key, curves in group_curves(points, keys=keys, value=value).items():
        averaged = seed_average(curves)
        if averaged:
            best[key] = max(averaged.values())
    return best


def worst_case(scores: Mapping[str, float]) -> tuple[str, float]:
    """The attack with the lowest score and that score; on ties the first attack by name, so that the
    answer does not depend on the order the runs were read in (a sweep folder, an archive's extraction).

    >>> worst_case({"sign_flip": 0.81, "alie": 0.62, "foe": 0.75})
    ('alie', 0.62)
    >>> worst_case({"sign_flip": 0.1, "foe": 0.1, "label_flip": 0.4})
    ('foe', 0.1)
    """
    if not scores:
        raise ValueError("worst_case: no attack scores given (scores = {})")
    attack = min(sorted(scores), key=lambda a: scores[a])
    return attack, scores[attack]


def attack_tables(best: Mapping[tuple[Any, ...], float]) -> dict[tuple[Any, Any], dict[str, dict[str, float]]]:
    """{(setting, f, pipeline, attack): score} -> {(setting, f): {pipeline: {attack: score}}}."""
    tables: dict[tuple[Any, Any], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (setting, f, pipeline, attack), score in best.items():
        tables[(setting, f)][pipeline][attack] = score
    return {key: {p: dict(row) for p, row in rows.items()} for key, rows in tables.items()}


def clipping_variant(pipeline: str) -> tuple[str, str]:
    """Split a pipeline spec into its leading clipping stage and the base pipeline behind it.

    >>> clipping_variant("arc > nnm > cwtm"), clipping_variant("nnm > cwtm")
    (('arc', 'nnm > cwtm'), ('none', 'nnm > cwtm'))
    """
    stages = [stage.strip() for stage in pipeline.split(">")]
    if len(stages) > 1 and stages[0] in (ARC, STATIC_CLIP):
        return stages[0], " > ".join(stages[1:])
    return NO_CLIPPING, " > ".join(stages)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_tables(
    tables: Mapping[tuple[Any, Any], Mapping[str, Mapping[str, float]]],
    seeds: Mapping[tuple[Any, ...], int] | None = None,
) -> str:
    """One markdown table per (setting, f): rows = pipelines, columns = attacks, then the worst case.

    Accuracies are in percent; the best worst case of each table is in bold. ``seeds`` (number
    of seeds per (setting, f, pipeline, attack)) adds a line saying how many seeds each cell has.
    """
    blocks = []
    for setting, f in sorted(tables, key=lambda k: (str(k[0]), _sortable(k[1]))):
        rows = tables[(setting, f)]
        attacks = sorted({attack for row in rows.values() for attack in row})
        worst = {pipeline: worst_case(row) for pipeline, row in rows.items() if row}
        top = max((score for _, score in worst.values()), default=None)
        lines = [
            f"### {setting}, f = {f}",
            "",
            "| pipeline | " + " | ".join(attacks) + " | worst case |",
            "|---|" + "---:|" * (len(attacks) + 1),
        ]
        for pipeline in sorted(rows, key=lambda p: (clipping_variant(p)[1], clipping_variant(p)[0])):
            row = rows[pipeline]
            cells = [_pct(row.get(attack)) for attack in attacks]
            attack, score = worst[pipeline]
            text = f"{_pct(score)} ({attack})"
            lines.append(f"| {pipeline} | " + " | ".join(cells) + f" | {f'**{text}**' if score == top else text} |")
        if seeds:
            counts = sorted({n for (s, ff, _, _), n in seeds.items() if s == setting and ff == f})
            if counts:
                span = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
                lines += ["", f"Seeds per cell: {span}."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


# --- run folders -> plain data ----------------------------------------------------------------
@dataclass(frozen=True)
class RunData:
    """A completed or diverged run as read from its folder."""

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    # rounds.jsonl; for a diverged run followed by the evaluations it did not reach, scored at chance
    # (:func:`chance_records`)
    records: tuple[dict[str, Any], ...]

    @property
    def diverged(self) -> bool:
        return self.summary.get("status") == DIVERGED


DIVERGED = "diverged"
"""The status of a run the batched engine stopped because its vectors or parameters turned non-finite."""


def evaluation_rounds(config: Mapping[str, Any]) -> list[int]:
    """The rounds (0-based) after which a run of ``config`` evaluates: every ``eval_every`` and the last.

    >>> evaluation_rounds({"rounds": 10, "eval_every": 4})
    [3, 7, 9]
    """
    rounds, every = int(config["rounds"]), int(config["eval_every"])
    return [t for t in range(rounds) if (t + 1) % every == 0 or t + 1 == rounds]


def chance_records(config: Mapping[str, Any], *, rounds_completed: int, num_classes: int) -> list[dict[str, Any]]:
    """The evaluations a run that diverged after ``rounds_completed`` rounds did not reach, scored at
    chance: test (and, with a validation split, validation) accuracy ``1 / num_classes``, marked ``diverged``.

    A diverged model's outputs are not finite, so its predictions carry no information about the labels;
    leaving its missed evaluations out instead would drop the run from the seed average and the attack
    that destroyed the model from the worst case.

    >>> chance_records({"rounds": 10, "eval_every": 4}, rounds_completed=5, num_classes=10)
    [{'round': 7, 'accuracy': 0.1, 'validation_accuracy': None, 'diverged': True}, \
{'round': 9, 'accuracy': 0.1, 'validation_accuracy': None, 'diverged': True}]
    """
    chance = 1.0 / num_classes
    validation = chance if float(config.get("validation_fraction") or 0.0) > 0.0 else None
    return [
        {"round": t, "accuracy": chance, "validation_accuracy": validation, DIVERGED: True}
        for t in evaluation_rounds(config)
        if t >= rounds_completed
    ]


def _read_run(run_dir: Path) -> RunData | None:
    """The run in ``run_dir``, or None when it is not complete: still running, stopped, failed, unreadable,
    or diverged before arcsim recorded ``num_classes`` in its summary (its chance is unknown then)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        lines = (run_dir / "rounds.jsonl").read_text().splitlines()
        records = tuple(json.loads(line) for line in lines if line.strip())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        return None
    from arcsim.config import with_late_defaults

    # A run recorded before a config key was added lacks it: read it at its default, as the sweep does, so
    # that the key neither splits runs of the same setting nor is missing from some runs' labels.
    summary = {**summary, "config": with_late_defaults(summary["config"])}
    if summary.get("status") == DIVERGED:
        num_classes, done = summary.get("num_classes"), summary.get("rounds_completed")
        if not (isinstance(num_classes, int) and num_classes >= 2 and isinstance(done, int)):
            return None
        records += tuple(chance_records(summary["config"], rounds_completed=done, num_classes=num_classes))
    elif summary.get("status") != "completed":
        return None
    return RunData(run_dir=run_dir, config=summary["config"], summary=summary, records=records)


def load_runs(path: str | Path) -> tuple[list[RunData], list[Path]]:
    """The complete runs (completed or diverged) of a run folder or a sweep folder, and the run folders left
    out (not complete). A diverged run's missed evaluations are scored at chance (:func:`chance_records`).

    A run folder has a summary.json; a sweep folder has a sweep.csv (its ``run_dir`` column names
    the runs) or run folders one level down.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"report: {path} is not a folder")
    if (path / "summary.json").exists() or (path / "rounds.jsonl").exists():
        candidates = [path]
    elif (path / "sweep.csv").exists():
        import csv

        with open(path / "sweep.csv", newline="") as handle:
            candidates = [path / row["run_dir"] for row in csv.DictReader(handle) if row.get("run_dir")]
    else:
        candidates = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.yaml").exists())
    runs, left_out = [], []
    for candidate in candidates:
        run = _read_run(candidate)
        if run is None:
            left_out.append(candidate)
        else:
            runs.append(run)
    if not runs:
        raise ValueError(
            f"report: no complete run in {path} ({len(left_out)} run folders not complete)"
            if left_out
            else f"report: no run in {path}"
        )
    return runs, left_out


def _label(name: str, params: Mapping[str, Any]) -> str:
    if not params:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _dataset_label(config: Mapping[str, Any]) -> str:
    parts = [f"{config['task']} / {config['model']}", f"{config['num_honest']} honest"]
    if config.get("declared_f") is not None:
        parts.append(f"declared f={config['declared_f']}")
    return ", ".join(parts)


def _heterogeneity_label(config: Mapping[str, Any]) -> str:
    partitioner = str(config["partitioner"])
    for key in ("alpha", "gamma"):
        if config.get(key) is not None:
            partitioner += f" ({key}={config[key]:g})"
    return partitioner


def _setting_label(config: Mapping[str, Any], extra_keys: Sequence[str]) -> str:
    parts = [f"{config['task']} / {config['model']}", f"{config['num_honest']} honest", _heterogeneity_label(config)]
    if config.get("declared_f") is not None:
        parts.append(f"declared f={config['declared_f']}")
    parts += [f"{key}={config[key]}" for key in extra_keys]
    return ", ".join(parts)


def _varying_keys(runs: Sequence[RunData]) -> list[str]:
    """The config keys, in config order, that differ between the runs and that no cell or setting names."""
    return [
        key
        for key in (runs[0].config if runs else {})
        if key not in _IGNORED_KEYS
        and key not in _CELL_KEYS
        and key not in _SETTING_CORE
        and len({_canonical(run.config.get(key)) for run in runs}) > 1
    ]


def cell_fields(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Per run: its cell (setting, f, pipeline, attack), seed, and the base pipeline and clipping variant.

    The setting names the task, model, honest workers and partitioner, plus any other config key
    that differs between the runs (e.g. lr), so runs that differ in it are never averaged together.
    """
    other = _varying_keys(runs)
    cells = []
    for run in runs:
        config = run.config
        pipeline_params = dict(config.get("pipeline_params") or {})
        variant, base = clipping_variant(config["pipeline"])
        base_params = {k: v for k, v in pipeline_params.items() if not (variant == STATIC_CLIP and k == "c")}
        cells.append(
            {
                "setting": _setting_label(config, other),
                "f": config["num_byzantine"],
                "pipeline": _label(config["pipeline"], pipeline_params),
                "attack": _label(config["attack"], config.get("attack_params") or {}),
                "seed": config["seed"],
                "base": _label(base, base_params),
                "variant": variant,
                "variant_label": (
                    _label("static clipping", {"c": pipeline_params["c"]})
                    if variant == STATIC_CLIP and "c" in pipeline_params
                    else VARIANT_LABELS[variant]
                ),
            }
        )
    return cells


def points_from_runs(runs: Sequence[RunData]) -> Table:
    """Long-format rows (:data:`POINT_COLUMNS`), one per run and round: the cell fields, the run's
    folder name, ``round`` (rounds done, 1-based) and the round record's numbers."""
    points = Table(columns=POINT_COLUMNS)
    for run, cell in zip(runs, cell_fields(runs)):
        for record in run.records:
            points.append(
                {
                    **cell,
                    "run": run.run_dir.name,
                    "round": int(record["round"]) + 1,
                    **{name: record.get(name) for name in _RECORD_FIELDS},
                    "diverged": bool(record.get(DIVERGED, False)),
                }
            )
    return points


def load_points(path: str | Path) -> Table:
    """The long-format table of the completed runs of a run folder or a sweep folder (see :func:`load_runs`)."""
    return points_from_runs(load_runs(path)[0])


def table_rows(tables: Mapping[tuple[Any, Any], Mapping[str, Mapping[str, float]]]) -> Table:
    """The markdown tables as one CSV-ready table: a row per (setting, f, pipeline), a column per attack
    (empty where a table lacks it), then the worst case and its attack. Accuracies are fractions."""
    attacks = sorted({attack for rows in tables.values() for row in rows.values() for attack in row})
    out = Table(columns=("setting", "f", "pipeline", *attacks, "worst_case", "worst_attack"))
    for setting, f in sorted(tables, key=lambda k: (str(k[0]), _sortable(k[1]))):
        for pipeline, row in sorted(tables[(setting, f)].items()):
            worst_attack, worst = worst_case(row)
            out.append(
                {
                    "setting": setting,
                    "f": f,
                    "pipeline": pipeline,
                    **row,
                    "worst_case": worst,
                    "worst_attack": worst_attack,
                }
            )
    return out


# --- selection on validation (the authors' protocol) -------------------------------------------
SELECT_MODES = ("validation",)
"""What ``arcsim report --select`` accepts (validation: each group's hyperparameters chosen on the validation split)."""

SELECTION_GROUP = ("dataset", "heterogeneity", "f", "pipeline")
"""What the selection is made per: a hyperparameter point is kept for each of these combinations."""

SELECTION_COLUMNS = (
    *SELECTION_GROUP,
    "attack",
    "seed",
    "base",
    "variant",
    "variant_label",
    "hyperparameters",
    "run",
    "round",
    "accuracy",
    "validation_accuracy",
)
"""The columns of :func:`selection_points`: one row per run and round, the hyperparameter point apart."""

_ONE_POINT = "(one point)"  # the label of the hyperparameter point when no hyperparameter varies


def hyperparameter_keys(runs: Sequence[RunData]) -> list[str]:
    """The config keys that make a sweep's hyperparameter points: those that vary between the runs, other
    than the attack, the seed, f, the pipeline, the dataset (task, model, workers), the heterogeneity
    (partitioner, alpha, gamma) and the keys that never change the numbers; in config order."""
    return _varying_keys(runs)


def _point_label(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={config.get(key)}" for key in keys) or _ONE_POINT


def _heterogeneity_order(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """From the most homogeneous to the most heterogeneous: iid, γ-similarity by decreasing γ, Dirichlet by
    decreasing α, extreme, then any other partitioner by name."""
    partitioner = str(config["partitioner"])
    ranks = {"iid": (0, None), "gamma_similarity": (1, "gamma"), "dirichlet": (2, "alpha"), "extreme": (3, None)}
    rank, key = ranks.get(partitioner, (4, None))
    value = config.get(key) if key else None
    return (rank, -float(value) if value is not None else 0.0, partitioner)


@dataclass(frozen=True)
class SelectionData:
    """What :func:`selection_points` reads from the runs: the long-format rows and the orders that the
    selection's ties and the heatmaps' rows follow."""

    points: Table  # SELECTION_COLUMNS
    keys: tuple[str, ...]  # the hyperparameter keys (hyperparameter_keys)
    point_order: dict[str, tuple[Any, ...]]  # point label -> its values, numbers ascending
    heterogeneity_order: dict[str, tuple[Any, ...]]  # heterogeneity label -> _heterogeneity_order


def selection_points(runs: Sequence[RunData]) -> SelectionData:
    """The runs as rows for :func:`select_on_validation` (:data:`SELECTION_COLUMNS`).

    ValueError when a run records no validation accuracy (a run without a validation split, or recorded
    before arcsim had one): selecting on the test set would report an optimistic accuracy.
    """
    missing = [run.run_dir.name for run in runs if all(r.get("validation_accuracy") is None for r in run.records)]
    if missing:
        raise ValueError(
            f"report --select validation: {len(missing)} of {len(runs)} runs record no validation accuracy "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); run them with "
            "validation_fraction > 0 (a validation split held out of the training set)"
        )
    keys = hyperparameter_keys(runs)
    points = Table(columns=SELECTION_COLUMNS)
    point_order: dict[str, tuple[Any, ...]] = {}
    heterogeneity_order: dict[str, tuple[Any, ...]] = {}
    for run, cell in zip(runs, cell_fields(runs)):
        label = _point_label(run.config, keys)
        point_order[label] = tuple(_sortable(run.config.get(key)) for key in keys)
        heterogeneity = _heterogeneity_label(run.config)
        heterogeneity_order[heterogeneity] = _heterogeneity_order(run.config)
        fields = {
            "dataset": _dataset_label(run.config),
            "heterogeneity": heterogeneity,
            **{name: cell[name] for name in ("f", "pipeline", "attack", "seed", "base", "variant", "variant_label")},
            "hyperparameters": label,
            "run": run.run_dir.name,
        }
        for record in run.records:
            points.append(
                {
                    **fields,
                    "round": int(record["round"]) + 1,
                    "accuracy": record.get("accuracy"),
                    "validation_accuracy": record.get("validation_accuracy"),
                }
            )
    return SelectionData(points, tuple(keys), point_order, heterogeneity_order)


def select_on_validation(
    points: Iterable[Mapping[str, Any]],
    *,
    group_keys: Sequence[str] = SELECTION_GROUP,
    point_key: str = "hyperparameters",
    point_order: Callable[[Any], Any] = _sortable,
) -> list[dict[str, Any]]:
    """The authors' rule: per group, every hyperparameter point scored on validation, and the one kept.

    For each point and attack, the validation accuracy is averaged over seeds at every evaluation and
    the maximum over evaluations taken; the point's score is the minimum of that over the attacks; the
    point with the largest score is kept. Ties go to the point first in ``point_order`` (for a sweep,
    :class:`SelectionData`'s: the hyperparameter values in config order, smaller first, i.e. a grid's
    first point). A point lacking one of its group's attacks is not eligible (its minimum would miss
    that attack). The kept point's test score is computed in the same way on ``accuracy``.

    Returns one row per group and point, groups in order and points in ``point_order``: the group's
    fields, ``point_key``, ``validation`` and ``test`` ({attack: score}), their worst cases
    (``validation_worst_case``, ``validation_worst_attack``, ``test_worst_case``, ``test_worst_attack``),
    ``eligible`` and ``selected``. ValueError when a group has no eligible point.
    """
    points = list(points)
    keys = (*group_keys, point_key, "attack")
    validation = best_accuracy(points, keys=keys, value="validation_accuracy")
    test = best_accuracy(points, keys=keys, value="accuracy")
    groups: dict[tuple[Any, ...], dict[Any, dict[str, dict[str, float]]]] = defaultdict(
        lambda: defaultdict(lambda: {"validation": {}, "test": {}})
    )
    for name, scores in (("validation", validation), ("test", test)):
        for (*group, point, attack), score in scores.items():
            groups[tuple(group)][point][name][attack] = score
    rows = []
    for group in sorted(groups, key=_figure_order):
        attacks = {attack for scores in groups[group].values() for attack in scores["test"]}
        candidates = []
        for point in sorted(groups[group], key=point_order):
            scores = groups[group][point]
            eligible = set(scores["validation"]) >= attacks
            row: dict[str, Any] = {
                **dict(zip(group_keys, group)),
                point_key: point,
                "validation": scores["validation"],
                "test": scores["test"],
                "eligible": eligible,
                "selected": False,
            }
            for name in ("validation", "test"):
                worst = worst_case(scores[name]) if scores[name] else (None, None)
                row[f"{name}_worst_attack"], row[f"{name}_worst_case"] = worst
            candidates.append(row)
        kept = None
        for row in candidates:  # strictly larger: a tie keeps the earlier point
            if row["eligible"] and (kept is None or row["validation_worst_case"] > kept["validation_worst_case"]):
                kept = row
        if kept is None:
            raise ValueError(
                f"report --select validation: no hyperparameter point of {dict(zip(group_keys, group))} has a "
                f"validation accuracy for every attack ({', '.join(sorted(attacks))})"
            )
        kept["selected"] = True
        rows.extend(candidates)
    return rows


def candidate_rows(candidates: Sequence[Mapping[str, Any]]) -> Table:
    """Every hyperparameter point's scores as one CSV-ready table (candidates.csv), accuracies as fractions."""
    columns = (
        *SELECTION_GROUP,
        "hyperparameters",
        "selected",
        "eligible",
        "validation_worst_case",
        "validation_worst_attack",
        "test_worst_case",
        "test_worst_attack",
    )
    return Table(({name: row[name] for name in columns} for row in candidates), columns=columns)


def selected_rows(candidates: Sequence[Mapping[str, Any]]) -> Table:
    """The kept points (selected.csv): the group, the point, its validation worst case, its test accuracy
    per attack (empty where a group lacks it) and its test worst case, accuracies as fractions."""
    kept = [row for row in candidates if row["selected"]]
    attacks = sorted({attack for row in kept for attack in row["test"]})
    counts: dict[tuple[Any, ...], int] = defaultdict(int)
    for row in candidates:
        counts[tuple(row[k] for k in SELECTION_GROUP)] += 1
    columns = (
        *SELECTION_GROUP,
        "hyperparameters",
        "points",
        "validation_worst_case",
        "validation_worst_attack",
        *attacks,
        "test_worst_case",
        "test_worst_attack",
    )
    return Table(
        (
            {
                **{k: row[k] for k in (*SELECTION_GROUP, "hyperparameters")},
                "points": counts[tuple(row[k] for k in SELECTION_GROUP)],
                "validation_worst_case": row["validation_worst_case"],
                "validation_worst_attack": row["validation_worst_attack"],
                **row["test"],
                "test_worst_case": row["test_worst_case"],
                "test_worst_attack": row["test_worst_attack"],
            }
            for row in kept
        ),
        columns=columns,
    )


def selection_markdown(candidates: Sequence[Mapping[str, Any]]) -> str:
    """One markdown table per (dataset, heterogeneity, f) of the kept points of :func:`select_on_validation`:
    rows = pipelines with their kept point, its validation worst case, its test accuracy per attack and its
    test worst case (percent; the best test worst case of each table in bold)."""
    tables: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for row in candidates:
        if row["selected"]:
            tables[(row["dataset"], row["heterogeneity"], row["f"])].append(row)
    blocks = []
    for dataset, heterogeneity, f in sorted(tables, key=_figure_order):
        rows = tables[(dataset, heterogeneity, f)]
        attacks = sorted({attack for row in rows for attack in row["test"]})
        top = max(row["test_worst_case"] for row in rows)
        lines = [
            f"### {dataset}, {heterogeneity}, f = {f}",
            "",
            "| pipeline | selected | validation worst case | " + " | ".join(attacks) + " | test worst case |",
            "|---|---|---:|" + "---:|" * (len(attacks) + 1),
        ]
        for row in sorted(rows, key=lambda r: tuple(reversed(clipping_variant(r["pipeline"])))):
            text = f"{_pct(row['test_worst_case'])} ({row['test_worst_attack']})"
            lines.append(
                f"| {row['pipeline']} | {row['hyperparameters']} | {_pct(row['validation_worst_case'])} "
                f"({row['validation_worst_attack']}) | "
                + " | ".join(_pct(row["test"].get(attack)) for attack in attacks)
                + f" | {f'**{text}**' if row['test_worst_case'] == top else text} |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --- plots -----------------------------------------------------------------------------------
def _slug(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9.]+", "_", str(text).lower()).strip("_")
    if len(slug) > limit:
        slug = f"{slug[:limit].rstrip('_')}_{hashlib.sha256(str(text).encode()).hexdigest()[:6]}"
    return slug


def _figure(panels: int, *, columns: int, width: float = 4.2, height: float = 3.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas by default

    rows = math.ceil(panels / columns)
    columns = min(columns, panels)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _save(figure: Any, path: Path, *, integer_x: bool = True) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in figure.axes if integer_x else ():  # rounds and f are integers (a heatmap places its own ticks)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)
    return path


def _variant_order(variant: str) -> int:
    return (NO_CLIPPING, ARC, STATIC_CLIP).index(variant)


def _plot_accuracy(points: Sequence[Mapping[str, Any]], plots: Path) -> list[Path]:
    curves = group_curves(points, keys=("setting", "f", "base", "attack", "variant", "variant_label"))
    by_figure: dict[tuple[Any, ...], dict[str, list[tuple[str, str, dict[int, float]]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for (setting, f, base, attack, variant, label), seeds in curves.items():
        by_figure[(setting, f, base)][attack].append((variant, label, seed_average(seeds)))
    paths = []
    for (setting, f, base), by_attack in sorted(by_figure.items(), key=lambda kv: _figure_order(kv[0])):
        attacks = sorted(by_attack)
        figure, axes = _figure(len(attacks), columns=3)
        for ax, attack in zip(axes, attacks):
            for variant, label, curve in sorted(by_attack[attack], key=lambda v: (_variant_order(v[0]), v[1])):
                color, style = _VARIANT_STYLE[variant]
                ax.plot(
                    list(curve),
                    [100 * v for v in curve.values()],
                    style,
                    color=color,
                    marker="o",
                    markersize=3,
                    label=label,
                )
            ax.set_title(f"attack: {attack}")
            ax.set_xlabel("round")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        figure.suptitle(f"{base}: {setting}, f = {f} (mean over seeds)", fontsize="medium")
        paths.append(_save(figure, plots / f"accuracy-{_slug(setting)}-f{f}-{_slug(base)}.png"))
    return paths


def _figure_order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_sortable(part) for part in key)


def _plot_worst_case(points: Sequence[Mapping[str, Any]], plots: Path) -> list[Path]:
    keys = ("setting", "f", "base", "variant", "variant_label", "attack")
    best = best_accuracy(points, keys=keys)
    by_attack: dict[tuple[Any, ...], dict[str, float]] = defaultdict(dict)
    for (setting, f, base, variant, label, attack), score in best.items():
        by_attack[(setting, base, variant, label, f)][attack] = score
    series: _Series = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for (setting, base, variant, label, f), scores in by_attack.items():
        series[setting][base][(variant, label)][f] = worst_case(scores)[1]
    return _draw_worst_case(series, plots, prefix="worst_case_vs_f", title="worst case over attacks")


# setting -> base pipeline -> (variant, variant label) -> {f: worst-case accuracy}
_Series = dict[str, dict[str, dict[tuple[str, str], dict[Any, float]]]]


def _draw_worst_case(series: _Series, plots: Path, *, prefix: str, title: str) -> list[Path]:
    paths = []
    for setting in sorted(series):
        bases = sorted(series[setting])
        figure, axes = _figure(len(bases), columns=3, width=5.0)
        for ax, base in zip(axes, bases):
            for (variant, label), by_f in sorted(
                series[setting][base].items(), key=lambda kv: (_variant_order(kv[0][0]), kv[0][1])
            ):
                color, style = _VARIANT_STYLE[variant]
                fs = sorted(by_f)
                ax.plot(fs, [100 * by_f[f] for f in fs], style, color=color, marker="o", label=label)
            ax.set_title(base)
            ax.set_xlabel("f (Byzantine workers)")
            ax.set_ylabel("worst-case accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        figure.suptitle(f"{setting}\n{title}", fontsize="medium")
        paths.append(_save(figure, plots / f"{prefix}-{_slug(setting)}.png"))
    return paths


def _plot_selected_worst_case(
    candidates: Sequence[Mapping[str, Any]], labels: Mapping[str, tuple[str, str, str]], plots: Path
) -> list[Path]:
    """Worst case against f of the kept points, per (dataset, heterogeneity): a panel per base pipeline."""
    series: _Series = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for row in candidates:
        if row["selected"]:
            base, variant, label = labels[row["pipeline"]]
            series[f"{row['dataset']}, {row['heterogeneity']}"][base][(variant, label)][row["f"]] = row[
                "test_worst_case"
            ]
    title = "test worst case over attacks, hyperparameters selected on validation"
    return _draw_worst_case(series, plots, prefix="selected_worst_case_vs_f", title=title)


_HEATMAP_ORDER = (NO_CLIPPING, STATIC_CLIP, ARC)  # the paper's panels: without clipping, static, ARC


def _plot_heatmaps(
    candidates: Sequence[Mapping[str, Any]],
    labels: Mapping[str, tuple[str, str, str]],
    heterogeneity_order: Mapping[str, tuple[Any, ...]],
    plots: Path,
) -> list[Path]:
    """Per dataset and base pipeline (aggregator): the kept points' test worst case over heterogeneity (rows,
    most homogeneous on top) x f (columns), one panel per clipping variant side by side."""
    cells: dict[tuple[str, str], dict[tuple[str, str], dict[tuple[str, Any], float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for row in candidates:
        if row["selected"]:
            base, variant, label = labels[row["pipeline"]]
            cells[(row["dataset"], base)][(variant, label)][(row["heterogeneity"], row["f"])] = row["test_worst_case"]
    paths = []
    for (dataset, base), panels in sorted(cells.items(), key=lambda kv: _figure_order(kv[0])):
        rows = sorted({h for grid in panels.values() for h, _ in grid}, key=lambda h: heterogeneity_order[h])
        fs = sorted({f for grid in panels.values() for _, f in grid}, key=_sortable)
        variants = sorted(panels, key=lambda v: (_HEATMAP_ORDER.index(v[0]), v[1]))
        figure, axes = _figure(
            len(variants), columns=len(variants), width=0.9 * len(fs) + 2.6, height=0.5 * len(rows) + 1.8
        )
        for index, (ax, variant) in enumerate(zip(axes, variants)):
            grid = [[100 * panels[variant].get((h, f), math.nan) for f in fs] for h in rows]
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            for i, line in enumerate(grid):
                for j, value in enumerate(line):
                    # dark text on the bright end of viridis, light on the dark end; a cell without runs says so
                    missing = math.isnan(value)
                    ax.text(
                        j,
                        i,
                        "not run" if missing else f"{value:.1f}",
                        ha="center",
                        va="center",
                        fontsize="small",
                        color="grey" if missing else "black" if value > 60 else "white",
                    )
            ax.set_xticks(range(len(fs)), [str(f) for f in fs])
            ax.set_yticks(range(len(rows)), rows if index == 0 else [])  # the panels share their rows
            ax.set_xlabel("f (Byzantine workers)")
            ax.set_title(variant[1])
        figure.colorbar(image, ax=list(axes), label="test worst-case accuracy (%)")
        figure.suptitle(f"{base}: {dataset}\nhyperparameters selected on validation", fontsize="medium")
        paths.append(_save(figure, plots / f"heatmap-{_slug(dataset)}-{_slug(base)}.png", integer_x=False))
    return paths


def _plot_arc_clipping(points: Sequence[Mapping[str, Any]], plots: Path) -> list[Path]:
    arc_points = [p for p in points if p["variant"] == ARC]
    keys = ("setting", "f", "pipeline", "attack")
    series = {
        name: group_curves(arc_points, keys=keys, value=name)
        for name in ("clip_threshold", "clipped_honest", "clipped_byzantine")
    }
    figures: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for key in set().union(*(s.keys() for s in series.values())):
        figures[key[:3]].append(key[3])
    paths = []
    for (setting, f, pipeline), attacks in sorted(figures.items(), key=lambda kv: _figure_order(kv[0])):
        figure, (top, bottom) = _figure(2, columns=1, width=7.0, height=3.0)
        colors = [f"C{i}" for i in range(10)]
        for i, attack in enumerate(sorted(attacks)):
            color = colors[i % len(colors)]
            key = (setting, f, pipeline, attack)
            threshold = seed_average(series["clip_threshold"].get(key, {}))
            top.plot(list(threshold), list(threshold.values()), color=color, label=attack)
            for role, style in (("honest", "-"), ("byzantine", "--")):
                clipped = seed_average(series[f"clipped_{role}"].get(key, {}))
                bottom.plot(list(clipped), list(clipped.values()), style, color=color, label=f"{attack}: {role}")
        top.set_ylabel("clip threshold C")
        if _spans_decades(series["clip_threshold"], setting, f, pipeline):
            top.set_yscale("log")
        bottom.set_ylabel("clipped vectors (mean over seeds)")
        for ax in (top, bottom):
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small", ncol=2)
        figure.suptitle(f"ARC in {pipeline}: {setting}, f = {f}", fontsize="medium")
        paths.append(_save(figure, plots / f"arc_clipping-{_slug(setting)}-f{f}-{_slug(pipeline)}.png"))
    return paths


def _spans_decades(grouped: Mapping[tuple[Any, ...], Mapping[Any, Mapping[int, float]]], *prefix: Any) -> bool:
    values = [
        v for key, seeds in grouped.items() if key[:3] == prefix for curve in seeds.values() for v in curve.values()
    ]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


# --- the report ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportResult:
    markdown: Path
    plots: tuple[Path, ...]
    runs: int
    left_out: tuple[Path, ...]
    diverged: tuple[Path, ...] = ()  # runs scored at chance after they diverged (chance_records)
    points: Path | None = None  # points.csv: the long-format table
    tables: Path | None = None  # tables.csv: report.md's tables
    selected: Path | None = None  # selected.csv (--select): the kept points
    candidates: Path | None = None  # candidates.csv (--select): every point's scores


def write_report(path: str | Path, *, select: str | None = None) -> ReportResult:
    """Read the runs under ``path``, write ``path/report.md``, ``path/tables.csv``, ``path/points.csv``
    and ``path/plots/*.png``.

    ``select="validation"`` also keeps, per (dataset, heterogeneity, f, pipeline), the hyperparameter
    point chosen on the validation split (:func:`select_on_validation`): report.md opens with the kept
    points' test accuracies, ``path/selected.csv`` holds them, ``path/candidates.csv`` every point's
    scores, and the plots gain the kept points' heatmaps and worst case against f. ValueError when a
    run records no validation accuracy (nothing is written then).
    """
    if select is not None and select not in SELECT_MODES:
        raise ValueError(f"report: select must be one of {', '.join(SELECT_MODES)} or None, got {select!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("arcsim report needs matplotlib: pip install 'arcsim[report]'") from None
    path = Path(path)
    runs, left_out = load_runs(path)
    # The selection comes before any file is written: it refuses runs without validation, groups without a point.
    selection = selection_points(runs) if select else None
    candidates = (
        select_on_validation(selection.points, point_order=selection.point_order.__getitem__) if selection else []
    )
    points = points_from_runs(runs)
    best = best_accuracy(points)
    tables = attack_tables(best)
    points_csv = points.to_csv(path / "points.csv")
    tables_csv = table_rows(tables).to_csv(path / "tables.csv")
    seeds = {key: len(curves) for key, curves in group_curves(points).items()}
    plots_dir = path / "plots"
    plots = [
        *_plot_accuracy(points, plots_dir),
        *_plot_worst_case(points, plots_dir),
        *_plot_arc_clipping(points, plots_dir),
    ]
    diverged = [run for run in runs if run.diverged]
    diverged_note = f" ({len(diverged)} of them diverged)" if diverged else ""
    lines = [
        f"# arcsim report: {path.name or path}",
        "",
        f"{len(runs)} runs{diverged_note}. Each cell is the maximum over evaluations of the seed-averaged test "
        "accuracy (%) for one pipeline and attack; the worst case is the minimum over attacks (ByzFL's "
        "protocol, as in Allouah et al., arXiv:2405.14432). f is the number of Byzantine workers.",
    ]
    if left_out:
        lines += [
            "",
            f"Left out ({len(left_out)} runs not complete): "
            + ", ".join(f"`{p.name}`" for p in left_out[:20])
            + (" ..." if len(left_out) > 20 else ""),
        ]
    if diverged:
        lines += [
            "",
            f"Diverged ({len(diverged)} runs, stopped when their vectors or parameters turned non-finite): every "
            "evaluation they did not reach counts at chance, 1 / number of classes, on the test and the validation "
            "set (the `diverged` rows of points.csv): "
            + ", ".join(f"`{r.run_dir.name}` (after {r.summary['rounds_completed']} rounds)" for r in diverged[:20])
            + (" ..." if len(diverged) > 20 else ""),
        ]
    selected = candidates_csv = None
    selection_plots: list[Path] = []
    if selection is not None:
        selected = selected_rows(candidates).to_csv(path / "selected.csv")
        candidates_csv = candidate_rows(candidates).to_csv(path / "candidates.csv")
        labels = {row["pipeline"]: (row["base"], row["variant"], row["variant_label"]) for row in selection.points}
        selection_plots = [
            *_plot_heatmaps(candidates, labels, selection.heterogeneity_order, plots_dir),
            *_plot_selected_worst_case(candidates, labels, plots_dir),
        ]
        lines += ["", *_selection_section(candidates, selection.keys, selection_plots)]
    lines += [
        "",
        "## Tables" + (" (every hyperparameter point)" if selection is not None else ""),
        "",
        markdown_tables(tables, seeds),
        "",
        "The same numbers (as fractions) are in [tables.csv](tables.csv), and every run's rounds in "
        "[points.csv](points.csv).",
        "",
        "## Plots",
        "",
        *_image_lines(plots),
    ]
    return ReportResult(
        markdown=_write_text(path / "report.md", "\n".join(lines)),
        plots=(*plots, *selection_plots),
        runs=len(runs),
        left_out=tuple(left_out),
        diverged=tuple(run.run_dir for run in diverged),
        points=points_csv,
        tables=tables_csv,
        selected=selected,
        candidates=candidates_csv,
    )


def _selection_section(
    candidates: Sequence[Mapping[str, Any]], keys: Sequence[str], plots: Sequence[Path]
) -> list[str]:
    groups = {tuple(row[k] for k in SELECTION_GROUP) for row in candidates}
    return [
        "## Hyperparameters selected on validation",
        "",
        f"{len(groups)} groups (dataset, heterogeneity, f, pipeline), hyperparameter points told apart by "
        f"{', '.join(keys) or 'nothing (one point)'}. Per group, each point is scored on the validation split: "
        "the maximum over evaluations of the seed-averaged validation accuracy, per attack, then the minimum "
        "over attacks; the point with the largest score is kept (ties: the first in ascending order of its "
        "values). The tables give the kept point's test accuracy (%) computed the same way, and its worst case "
        "over attacks.",
        "",
        selection_markdown(candidates),
        "",
        "The same numbers (as fractions) are in [selected.csv](selected.csv), and every point's validation "
        "and test worst cases in [candidates.csv](candidates.csv).",
        "",
        *_image_lines(plots),
    ]


def _image_lines(plots: Sequence[Path]) -> list[str]:
    return [line for plot in plots for line in (f"![{plot.stem}](plots/{plot.name})", "")]


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomically: a reader never sees half a report
    return path
