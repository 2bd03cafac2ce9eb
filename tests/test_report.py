"""arcsim report: the protocol's numbers on hand-made tables, and the report of a tiny sweep."""

from __future__ import annotations

import csv
import doctest
import json
import shutil
from pathlib import Path

import pytest
from selection_sweep import write_run, write_selection_sweep

from arcsim import report
from arcsim.cli import main
from arcsim.report import (
    attack_tables,
    best_accuracy,
    clipping_variant,
    load_points,
    load_runs,
    markdown_tables,
    points_from_runs,
    seed_average,
    worst_case,
    write_report,
)
from arcsim.sweep import plan_sweep, run_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_report_doctests() -> None:
    result = doctest.testmod(report)
    assert result.attempted > 0 and result.failed == 0


# --- the protocol on a hand-made table --------------------------------------------------------
def _points(table: dict[tuple[str, str], dict[int, dict[int, float]]], *, f: int = 1) -> list[dict]:
    """{(pipeline, attack): {seed: {round: accuracy}}} -> long-format points of one setting."""
    return [
        {"setting": "s", "f": f, "pipeline": pipeline, "attack": attack, "seed": seed, "round": r, "accuracy": accuracy}
        for (pipeline, attack), seeds in table.items()
        for seed, curve in seeds.items()
        for r, accuracy in curve.items()
    ]


# Two pipelines x two attacks x two seeds, evaluations at rounds 5 and 10.
HAND_TABLE = {
    ("P", "alie"): {1: {5: 0.50, 10: 0.70}, 2: {5: 0.70, 10: 0.50}},  # means 0.60, 0.60 -> 0.60
    ("P", "sign_flip"): {1: {5: 0.40, 10: 0.80}, 2: {5: 0.60, 10: 0.60}},  # means 0.50, 0.70 -> 0.70
    ("arc > P", "alie"): {1: {5: 0.60, 10: 0.90}, 2: {5: 0.80, 10: 0.70}},  # means 0.70, 0.80 -> 0.80
    ("arc > P", "sign_flip"): {1: {5: 0.75, 10: 0.65}, 2: {5: 0.85, 10: 0.65}},  # means 0.80, 0.65 -> 0.80
}


def test_best_accuracy_is_the_max_over_evaluations_of_the_seed_average() -> None:
    # Execute
    best = best_accuracy(_points(HAND_TABLE))
    # Assert: P/alie is 0.60 (max of the mean), not 0.70 (mean of each seed's max)
    assert best == {
        ("s", 1, "P", "alie"): 0.60,
        ("s", 1, "P", "sign_flip"): 0.70,
        ("s", 1, "arc > P", "alie"): 0.80,
        ("s", 1, "arc > P", "sign_flip"): 0.80,
    }


def test_worst_case_is_the_minimum_over_attacks() -> None:
    # Prepare
    tables = attack_tables(best_accuracy(_points(HAND_TABLE)))
    # Execute
    worst = {pipeline: worst_case(row) for pipeline, row in tables[("s", 1)].items()}
    # Assert: ties go to the first attack by name
    assert worst == {"P": ("alie", 0.60), "arc > P": ("alie", 0.80)}
    # whatever order the attacks were read in
    assert worst_case({"sign_flip": 0.8, "alie": 0.8}) == worst_case({"alie": 0.8, "sign_flip": 0.8}) == ("alie", 0.8)


def test_worst_case_of_nothing_raises() -> None:
    with pytest.raises(ValueError, match="no attack scores"):
        worst_case({})


def test_seed_average_uses_only_the_rounds_every_seed_has() -> None:
    assert seed_average({1: {5: 0.2, 10: 0.4}, 2: {5: 0.4}}) == {5: 0.3}
    assert seed_average({}) == {}


def test_points_without_accuracy_are_not_evaluations() -> None:
    points = _points({("P", "alie"): {1: {5: 0.5, 10: 0.6}}})
    points.append({**points[0], "round": 7, "accuracy": None})  # a round without evaluation
    assert best_accuracy(points) == {("s", 1, "P", "alie"): 0.6}


def test_markdown_table_has_a_row_per_pipeline_and_bolds_the_best_worst_case() -> None:
    # Prepare
    best = best_accuracy(_points(HAND_TABLE))
    # Execute
    text = markdown_tables(attack_tables(best), seeds={key: 2 for key in best})
    # Assert
    lines = text.splitlines()
    assert lines[0] == "### s, f = 1"
    assert "| pipeline | alie | sign_flip | worst case |" in lines
    assert "| P | 60.0 | 70.0 | 60.0 (alie) |" in lines
    assert "| arc > P | 80.0 | 80.0 | **80.0 (alie)** |" in lines
    assert "Seeds per cell: 2." in lines


def test_markdown_marks_missing_cells() -> None:
    text = markdown_tables({("s", 1): {"P": {"alie": 0.5}, "Q": {"foe": 0.4}}})
    assert "| P | 50.0 | – | **50.0 (alie)** |" in text.splitlines()


def test_clipping_variant_splits_the_leading_clipping_stage() -> None:
    assert clipping_variant("static_clip > nnm > cwtm") == ("static_clip", "nnm > cwtm")
    assert clipping_variant("arc>cwmed") == ("arc", "cwmed")
    assert clipping_variant("arc") == ("none", "arc")  # not a valid pipeline, but never split to nothing


# --- reading run folders ----------------------------------------------------------------------
TINY = {"task": "synthetic", "model": "logreg", "num_honest": 4, "partitioner": "iid", "rounds": 10, "eval_every": 5}
SWEEP = {
    **TINY,
    "num_byzantine": [0, 1],
    "attack": ["sign_flip", "alie"],
    "pipeline": [
        "nnm > cwtm",
        "arc > nnm > cwtm",
        {"pipeline": "static_clip > nnm > cwtm", "pipeline_params": {"c": 2}},
    ],
    "seed": [1, 2],
}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 runs (f = 0: 3 pipelines; f = 1: 3 pipelines x 2 attacks; 2 seeds each), about 5 s."""
    out = tmp_path_factory.mktemp("sweep")
    outcome = run_sweep(plan_sweep(SWEEP), out, executor="inline", echo=lambda line: None)
    assert outcome.ok
    return out


@pytest.fixture
def sweep_copy(tiny_sweep: Path, tmp_path: Path) -> Path:
    """A copy of the tiny sweep a test may write its report into."""
    return Path(shutil.copytree(tiny_sweep, tmp_path / "sweep"))


def test_load_runs_reads_every_run_of_a_sweep(tiny_sweep: Path) -> None:
    runs, left_out = load_runs(tiny_sweep)
    assert len(runs) == 18 and left_out == []
    assert all(len(run.records) == 10 for run in runs)


def test_incomplete_runs_are_left_out_and_named(sweep_copy: Path) -> None:
    # Prepare: one run loses its summary (as if killed before the end)
    victim = sorted(p for p in sweep_copy.iterdir() if (p / "summary.json").exists())[0]
    (victim / "summary.json").unlink()
    # Execute
    result = write_report(sweep_copy)
    # Assert
    assert result.runs == 17 and result.left_out == (victim,)
    assert f"`{victim.name}`" in result.markdown.read_text()


def _diverge(run_dir: Path, *, after: int, num_classes: int | None) -> None:
    """Make ``run_dir`` look as the batched engine leaves a run that diverged after ``after`` rounds."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(status="diverged", rounds_completed=after)
    summary.pop("num_classes", None)
    if num_classes is not None:
        summary["num_classes"] = num_classes
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()[:after]
    (run_dir / "rounds.jsonl").write_text("".join(line + "\n" for line in lines))


def test_a_diverged_run_counts_at_chance_where_it_stopped_evaluating(sweep_copy: Path) -> None:
    # Prepare: seed 1 of (f = 1, sign_flip, nnm > cwtm) diverges after 3 of its 10 rounds (evaluations
    # after rounds 5 and 10 missed); its cell's score is then computed by hand from seed 2 and chance
    victim = next(p for p in sorted(sweep_copy.iterdir()) if p.name.startswith("sign_flip-nnm_cwtm-f1-iid-s1-"))
    _diverge(victim, after=3, num_classes=4)
    other = next(p for p in sorted(sweep_copy.iterdir()) if p.name.startswith("sign_flip-nnm_cwtm-f1-iid-s2-"))
    seed2 = [json.loads(line)["accuracy"] for line in (other / "rounds.jsonl").read_text().splitlines()]
    expected = max((0.25 + seed2[t]) / 2 for t in (4, 9))
    # Execute
    result = write_report(sweep_copy)
    # Assert: the run is in the tables, its missed evaluations at 1/4 and marked, and it is named as diverged
    assert result.runs == 18 and result.left_out == () and result.diverged == (victim,)
    tables = {(row["f"], row["pipeline"]): row for row in csv.DictReader(open(sweep_copy / "tables.csv"))}
    assert float(tables[("1", "nnm > cwtm")]["sign_flip"]) == pytest.approx(expected)
    rows = [row for row in csv.DictReader(open(sweep_copy / "points.csv")) if row["run"] == victim.name]
    filled = [(row["round"], row["accuracy"]) for row in rows if row["diverged"] == "True"]
    assert filled == [("5", "0.25"), ("10", "0.25")]
    assert f"`{victim.name}` (after 3 rounds)" in result.markdown.read_text()


def test_a_diverged_run_without_its_number_of_classes_is_left_out(sweep_copy: Path) -> None:
    # Prepare: a diverged run written before summaries recorded num_classes: its chance is unknown
    victim = sorted(p for p in sweep_copy.iterdir() if (p / "summary.json").exists())[0]
    _diverge(victim, after=3, num_classes=None)
    # Execute
    runs, left_out = load_runs(sweep_copy)
    # Assert
    assert len(runs) == 17 and left_out == [victim]


def test_chance_records_cover_exactly_the_missed_evaluations() -> None:
    config = {"rounds": 800, "eval_every": 50, "validation_fraction": 0.2}
    records = report.chance_records(config, rounds_completed=120, num_classes=10)
    assert [r["round"] for r in records] == [t - 1 for t in range(150, 801, 50)]
    assert {(r["accuracy"], r["validation_accuracy"], r["diverged"]) for r in records} == {(0.1, 0.1, True)}
    assert report.chance_records(config, rounds_completed=800, num_classes=10) == []
    assert len(report.chance_records(config, rounds_completed=0, num_classes=10)) == 16


def test_load_runs_of_a_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        load_runs(tmp_path / "missing")


def test_load_runs_of_an_empty_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run in"):
        load_runs(tmp_path)


def test_load_runs_with_only_incomplete_runs_raises(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: synthetic\n")
    with pytest.raises(ValueError, match="no complete run .*1 run folders not complete"):
        load_runs(tmp_path)


def test_runs_that_differ_in_another_key_are_never_averaged_together(tiny_sweep: Path) -> None:
    # Prepare: the same cells with another learning rate
    runs, _ = load_runs(tiny_sweep)
    other = [report.RunData(run.run_dir, {**run.config, "lr": 0.05}, run.summary, run.records) for run in runs]
    # Execute
    settings = {point["setting"] for point in points_from_runs(runs + other)}
    # Assert
    assert settings == {"synthetic / logreg, 4 honest, iid, lr=0.1", "synthetic / logreg, 4 honest, iid, lr=0.05"}


# --- the report -------------------------------------------------------------------------------
def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_report_of_a_sweep_has_the_tables_and_valid_plots(sweep_copy: Path) -> None:
    # Execute
    result = write_report(sweep_copy)
    # Assert: one table per f, a row per pipeline with the attacks and the worst case
    text = result.markdown.read_text()
    assert result.runs == 18
    assert "### synthetic / logreg, 4 honest, iid, f = 0" in text
    assert "### synthetic / logreg, 4 honest, iid, f = 1" in text
    assert "| pipeline | alie | sign_flip | worst case |" in text
    assert "| pipeline | none | worst case |" in text
    for pipeline in ("nnm > cwtm", "arc > nnm > cwtm", "static_clip > nnm > cwtm (c=2)"):
        assert text.count(f"| {pipeline} | ") == 2
    # The plots: accuracy per attack (per f), worst case against f, ARC's clipping (per f)
    names = sorted(path.name for path in result.plots)
    assert names == [
        "accuracy-synthetic_logreg_4_honest_iid-f0-nnm_cwtm.png",
        "accuracy-synthetic_logreg_4_honest_iid-f1-nnm_cwtm.png",
        "arc_clipping-synthetic_logreg_4_honest_iid-f0-arc_nnm_cwtm.png",
        "arc_clipping-synthetic_logreg_4_honest_iid-f1-arc_nnm_cwtm.png",
        "worst_case_vs_f-synthetic_logreg_4_honest_iid.png",
    ]
    for path in result.plots:
        assert path.parent == sweep_copy / "plots"
        _assert_png(path)
        assert f"](plots/{path.name})" in text


def test_report_writes_its_tables_and_its_long_format_table_as_csv(sweep_copy: Path) -> None:
    import csv

    # Execute
    result = write_report(sweep_copy)
    # Assert: points.csv is the long-format table, a row per run and round (load_points reads the same)
    assert result.points == sweep_copy / "points.csv" and result.tables == sweep_copy / "tables.csv"
    with open(result.points, newline="") as handle:
        points = list(csv.DictReader(handle))
    assert list(points[0]) == list(report.POINT_COLUMNS)
    assert len(points) == 18 * 10 and len(load_points(sweep_copy)) == len(points)
    assert {row["round"] for row in points} == {str(r) for r in range(1, 11)}
    assert {row["accuracy"] == "" for row in points if row["round"] not in ("5", "10")} == {True}
    # tables.csv: report.md's cells as fractions, a row per (setting, f, pipeline), the worst case last
    with open(result.tables, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["setting", "f", "pipeline", "alie", "none", "sign_flip", "worst_case", "worst_attack"]
    assert len(rows) == 6
    text = result.markdown.read_text()
    for row in rows:
        score = float(row["worst_case"])
        assert 0.0 <= score <= 1.0 and f"{100 * score:.1f} ({row['worst_attack']})" in text
        assert row[row["worst_attack"]] == row["worst_case"]


def test_report_numbers_match_the_runs(sweep_copy: Path) -> None:
    # Prepare: the f = 0 baseline of nnm > cwtm, computed by hand from its two runs' summaries
    runs, _ = load_runs(sweep_copy)
    curves = {}
    for run in runs:
        if run.config["num_byzantine"] == 0 and run.config["pipeline"] == "nnm > cwtm":
            curves[run.config["seed"]] = {r["round"]: r["accuracy"] for r in run.records if r["accuracy"] is not None}
    expected = max((curves[1][r] + curves[2][r]) / 2 for r in curves[1])
    # Execute
    text = write_report(sweep_copy).markdown.read_text()
    # Assert
    assert f"| nnm > cwtm | {100 * expected:.1f} | " in text


def test_report_of_a_single_run(tiny_sweep: Path, tmp_path: Path) -> None:
    # Prepare: one ARC run folder on its own
    run = next(p for p in sorted(tiny_sweep.iterdir()) if p.name.startswith("alie-arc_nnm_cwtm"))
    folder = Path(shutil.copytree(run, tmp_path / "run"))
    # Execute
    result = write_report(folder)
    # Assert
    summary = json.loads((folder / "summary.json").read_text())
    assert result.runs == 1
    assert f"| arc > nnm > cwtm | {100 * summary['max_accuracy']:.1f} | " in result.markdown.read_text()
    assert len(result.plots) == 3
    for path in result.plots:
        _assert_png(path)


def test_cli_report(sweep_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(sweep_copy)]) == 0
    assert "report of 18 runs" in capsys.readouterr().out
    assert (sweep_copy / "report.md").exists()


def test_cli_report_of_a_missing_folder_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# --- selection on validation, on the hand-made sweep folder of tests/selection_sweep.py (answers there) ---
@pytest.fixture(scope="module")
def selection_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_selection_sweep(tmp_path_factory.mktemp("selection"))


def _selected(candidates: list[dict], **group: object) -> dict:
    rows = [row for row in candidates if row["selected"] and all(row[k] == v for k, v in group.items())]
    assert len(rows) == 1, rows
    return rows[0]


def test_selection_keeps_the_point_best_on_validation_and_reports_its_test_accuracy(selection_sweep: Path) -> None:
    # Prepare
    data = report.selection_points(load_runs(selection_sweep)[0])
    # Execute
    candidates = report.select_on_validation(data.points, point_order=data.point_order.__getitem__)
    # Assert: lr is the only hyperparameter; 2 x 2 x 3 groups of 2 points
    assert data.keys == ("lr",) and len(candidates) == 24
    key = _selected(candidates, heterogeneity="extreme", f=1, pipeline="nnm > cwtm")
    assert key["hyperparameters"] == "lr=0.1"
    assert key["validation"] == {"alie": 0.7, "sign_flip": 0.6}  # seed-averaged first: 0.70, not 0.80
    assert (key["validation_worst_attack"], key["validation_worst_case"]) == ("sign_flip", 0.6)
    assert key["test"] == {"alie": 0.5, "sign_flip": 0.55}
    assert (key["test_worst_attack"], key["test_worst_case"]) == ("alie", 0.5)
    loser = next(
        r
        for r in candidates
        if r["pipeline"] == "nnm > cwtm"
        and r["f"] == 1
        and r["hyperparameters"] == "lr=0.2"
        and r["heterogeneity"] == "extreme"
    )
    assert loser["test_worst_case"] == 0.85 and not loser["selected"]  # better on test, not kept
    tie = _selected(candidates, heterogeneity="extreme", f=1, pipeline="arc > nnm > cwtm")
    assert (tie["hyperparameters"], tie["test_worst_case"]) == ("lr=0.1", 0.6)
    other = _selected(candidates, heterogeneity="dirichlet (alpha=0.5)", f=3, pipeline="static_clip > nnm > cwtm (c=2)")
    assert other["hyperparameters"] == "lr=0.2"


def _hand_points(scores: dict[tuple[str, str], float]) -> list[dict]:
    """{(point, attack): accuracy} -> one seed, one evaluation, validation = test, in one group."""
    return [
        {"g": "g", "hp": point, "attack": attack, "seed": 1, "round": 1, "accuracy": v, "validation_accuracy": v}
        for (point, attack), v in scores.items()
    ]


def test_a_point_lacking_an_attack_is_not_eligible() -> None:
    # Prepare: point b is best on the one attack it has, but lacks sign_flip
    points = _hand_points({("a", "alie"): 0.5, ("a", "sign_flip"): 0.6, ("b", "alie"): 0.9})
    # Execute
    rows = report.select_on_validation(points, group_keys=("g",), point_key="hp")
    # Assert
    assert [(r["hp"], r["eligible"], r["selected"]) for r in rows] == [("a", True, True), ("b", False, False)]


def test_ties_follow_the_point_order() -> None:
    points = _hand_points({("a", "alie"): 0.5, ("b", "alie"): 0.5})
    by_name = report.select_on_validation(points, group_keys=("g",), point_key="hp")
    reverse = report.select_on_validation(points, group_keys=("g",), point_key="hp", point_order=lambda p: p != "b")
    assert [r["hp"] for r in by_name if r["selected"]] == ["a"] and [r["hp"] for r in reverse if r["selected"]] == ["b"]


def test_select_refuses_runs_without_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: one run with a validation split, one without (validation accuracy null, as arcsim records it)
    write_run(tmp_path / "with", {2: (0.5, 0.5), 4: (0.6, 0.6)}, num_byzantine=1, attack="alie", pipeline="cwtm")
    write_run(
        tmp_path / "without",
        {2: (None, 0.5), 4: (None, 0.6)},
        num_byzantine=1,
        attack="alie",
        pipeline="cwtm",
        validation_fraction=0.0,
        seed=2,
    )
    # Execute / Assert: the library and the command line name the run, and nothing is written
    with pytest.raises(ValueError, match=r"1 of 2 runs record no validation accuracy \(without\)"):
        write_report(tmp_path, select="validation")
    assert main(["report", str(tmp_path), "--select", "validation"]) == 2
    assert "validation_fraction > 0" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_report_select_writes_the_kept_points_heatmaps_and_plots(
    selection_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    # Prepare
    sweep = Path(shutil.copytree(selection_sweep, tmp_path / "sweep"))
    # Execute
    assert main(["report", str(sweep), "--select", "validation"]) == 0
    # Assert: selected.csv, a row per group with the kept point and its test scores
    assert "selected on validation" in capsys.readouterr().out
    with open(sweep / "selected.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and list(rows[0])[-4:] == ["alie", "sign_flip", "test_worst_case", "test_worst_attack"]
    key = next(r for r in rows if (r["heterogeneity"], r["f"], r["pipeline"]) == ("extreme", "1", "nnm > cwtm"))
    assert (key["hyperparameters"], key["points"], key["test_worst_case"], key["test_worst_attack"]) == (
        "lr=0.1",
        "2",
        "0.5",
        "alie",
    )
    with open(sweep / "candidates.csv", newline="") as handle:
        assert sum(row["selected"] == "True" for row in csv.DictReader(handle)) == 12
    # report.md opens with the kept points, one table per (dataset, heterogeneity, f), before every point's tables
    text = (sweep / "report.md").read_text()
    kept = text.index("## Hyperparameters selected on validation")
    assert kept < text.index("## Tables (every hyperparameter point)")
    assert text.index("### synthetic / mlp, 4 honest, extreme, f = 1", kept) < text.index("## Tables")
    assert "| nnm > cwtm | lr=0.1 | 60.0 (sign_flip) | 50.0 | 55.0 | 50.0 (alie) |" in text
    # A heatmap per aggregator (the three variants side by side), and the worst case against f per heterogeneity
    plots = sorted(p.name for p in (sweep / "plots").iterdir() if p.name.startswith(("heatmap", "selected")))
    assert plots == [
        "heatmap-synthetic_mlp_4_honest-nnm_cwtm.png",
        "selected_worst_case_vs_f-synthetic_mlp_4_honest_dirichlet_alpha_0.5.png",
        "selected_worst_case_vs_f-synthetic_mlp_4_honest_extreme.png",
    ]
    for name in plots:
        _assert_png(sweep / "plots" / name)
        assert f"](plots/{name})" in text


@pytest.mark.parametrize("older_seed", [1, 2], ids=["older-runs-read-first", "older-runs-read-last"])
def test_report_reads_runs_recorded_before_a_config_key_was_added_at_its_default(
    selection_sweep: Path, tmp_path: Path, older_seed: int
) -> None:
    # Prepare: the same sweep twice; in the second, one seed's runs were recorded before the keys added
    # since (augment, schedule, async, speeds) existed, as a sweep resumed across versions leaves them
    today = Path(shutil.copytree(selection_sweep, tmp_path / "today"))
    mixed = Path(shutil.copytree(selection_sweep, tmp_path / "mixed"))
    older = [run for run in sorted(mixed.iterdir()) if run.name.endswith(f"-s{older_seed}")]
    for run in older:
        summary = json.loads((run / "summary.json").read_text())
        for key in ("augment", "schedule", "async", "speeds"):
            del summary["config"][key]
        (run / "summary.json").write_text(json.dumps(summary))
    assert len(older) == 48
    # Execute
    for sweep in (today, mixed):
        write_report(sweep, select="validation")
    # Assert: the same selection and tables (neither a crash on the missing keys nor the runs split by them)
    for name in ("selected.csv", "candidates.csv", "tables.csv"):
        assert (mixed / name).read_text() == (today / name).read_text(), name
    assert (mixed / "report.md").read_text().replace("mixed", "today") == (today / "report.md").read_text()


def test_report_without_select_writes_no_selection(selection_sweep: Path, tmp_path: Path) -> None:
    sweep = Path(shutil.copytree(selection_sweep, tmp_path / "sweep"))
    result = write_report(sweep)
    assert result.selected is None and not (sweep / "selected.csv").exists()
    assert "selected on validation" not in result.markdown.read_text()
    assert not any(p.name.startswith("heatmap") for p in result.plots)
