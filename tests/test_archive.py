"""arcsim archive: a sweep's complete runs in one small file, and back as folders that report and sweep take."""

from __future__ import annotations

import doctest
import gzip
import json
import shutil
from pathlib import Path

import pytest

from arcsim import archive
from arcsim.archive import archive_runs, extract_runs
from arcsim.cli import main
from arcsim.report import best_accuracy, load_points, load_runs
from arcsim.sweep import plan_sweep, run_sweep

TINY = {"task": "synthetic", "model": "logreg", "num_honest": 4, "partitioner": "iid", "rounds": 10, "eval_every": 4}
SWEEP = {**TINY, "num_byzantine": 1, "attack": ["sign_flip", "alie"], "pipeline": ["nnm > cwtm", "arc > nnm > cwtm"]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four complete runs of 10 rounds, evaluated after rounds 4, 8 and 10."""
    out = tmp_path_factory.mktemp("sweep")
    assert run_sweep(plan_sweep(SWEEP), out, executor="inline", echo=lambda line: None).ok
    return out


def test_archive_doctests() -> None:
    result = doctest.testmod(archive)
    assert result.attempted > 0 and result.failed == 0


def test_extracted_runs_give_the_same_report_numbers(swept: Path, tmp_path: Path) -> None:
    # Execute
    written = archive_runs(swept, tmp_path / "runs.jsonl.gz")
    extracted = extract_runs(written.path, tmp_path / "again")
    # Assert: every run, each with its evaluated rounds and its last; the accuracy tables are the same
    assert len(written.runs) == 4 and written.skipped == () and extracted.runs == written.runs
    runs, _ = load_runs(tmp_path / "again")
    assert {tuple(r["round"] for r in run.records) for run in runs} == {(3, 7, 9)}
    assert best_accuracy(load_points(tmp_path / "again")) == best_accuracy(load_points(swept))


def test_a_sweep_takes_extracted_runs_as_complete_and_runs_only_the_rest(swept: Path, tmp_path: Path) -> None:
    # Prepare: the archive of the four runs, extracted on "another machine"
    extract_runs(archive_runs(swept, tmp_path / "runs.jsonl.gz").path, tmp_path / "elsewhere")
    larger = {**SWEEP, "attack": ["sign_flip", "alie", "foe"]}
    # Execute
    lines: list[str] = []
    outcome = run_sweep(plan_sweep(larger), tmp_path / "elsewhere", executor="inline", echo=lines.append)
    # Assert: the two foe runs ran; the four archived ones were skipped, and archive again as they were
    assert outcome.ok and sum("skipped: already complete" in line for line in lines) == 4
    again = archive_runs(tmp_path / "elsewhere", tmp_path / "all.jsonl.gz")
    assert len(again.runs) == 6
    with gzip.open(tmp_path / "runs.jsonl.gz", "rt") as first, gzip.open(again.path, "rt") as second:
        before = {json.loads(line)["run"]: line for line in first}
        assert {name: line for name, line in ((json.loads(x)["run"], x) for x in second) if name in before} == before


def test_the_archive_is_reproducible_and_leaves_incomplete_runs_out(swept: Path, tmp_path: Path) -> None:
    # Prepare: a copy with one run cut short (no summary)
    copy = Path(shutil.copytree(swept, tmp_path / "copy"))
    victim = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    (victim / "summary.json").unlink()
    # Execute
    one = archive_runs(copy, tmp_path / "one.jsonl.gz")
    archive_runs(copy, tmp_path / "two.jsonl.gz")
    # Assert
    assert one.skipped == (victim.name,) and len(one.runs) == 3
    assert (tmp_path / "one.jsonl.gz").read_bytes() == (tmp_path / "two.jsonl.gz").read_bytes()


def test_a_run_whose_records_stop_short_of_its_summary_is_left_out(swept: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(swept, tmp_path / "copy"))
    victim = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    lines = (victim / "rounds.jsonl").read_text().splitlines()
    (victim / "rounds.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert archive_runs(copy, tmp_path / "a.jsonl.gz").skipped == (victim.name,)


def test_extract_refuses_names_outside_the_folder_and_files_that_are_not_archives(tmp_path: Path) -> None:
    # Prepare
    evil = tmp_path / "evil.jsonl.gz"
    with gzip.open(evil, "wt") as handle:
        handle.write(json.dumps({"run": "../escaped", "config_yaml": "", "summary": {}, "records": []}) + "\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("not gzip")
    # Execute / Assert
    with pytest.raises(ValueError, match="not plain folder names"):
        extract_runs(evil, tmp_path / "out")
    with pytest.raises(ValueError, match="cannot read it as gzipped JSON lines"):
        extract_runs(plain, tmp_path / "out")
    assert not (tmp_path / "escaped").exists()


def test_extract_leaves_existing_folders_as_they_are(swept: Path, tmp_path: Path) -> None:
    written = archive_runs(swept, tmp_path / "runs.jsonl.gz")
    extract_runs(written.path, tmp_path / "out")
    first = sorted((tmp_path / "out").iterdir())[0]
    (first / "summary.json").write_text("{}")
    again = extract_runs(written.path, tmp_path / "out")
    assert again.runs == () and len(again.skipped) == 4 and (first / "summary.json").read_text() == "{}"


def test_cli_archive_and_extract(swept: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["archive", str(swept), str(tmp_path / "a.jsonl.gz")]) == 0
    assert "archived 4 runs" in capsys.readouterr().out
    assert main(["archive", "--extract", str(tmp_path / "a.jsonl.gz"), str(tmp_path / "x")]) == 0
    assert "extracted 4 runs" in capsys.readouterr().out
    assert main(["archive", str(tmp_path / "missing"), str(tmp_path / "b.jsonl.gz")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_all_rounds_keeps_every_record(swept: Path, tmp_path: Path) -> None:
    written = archive_runs(swept, tmp_path / "all.jsonl.gz", all_rounds=True)
    extract_runs(written.path, tmp_path / "all")
    runs, _ = load_runs(tmp_path / "all")
    assert {tuple(r["round"] for r in run.records) for run in runs} == {tuple(range(10))}
