"""The Python API: ``arcsim.run`` gives the command line's final parameters on both engines,
``arcsim.sweep`` runs a grid, ``arcsim.load`` reads the long-format table, and the notebook in
examples/ runs as it stands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_values

import arcsim
from arcsim.api import RECORD_COLUMNS, RunResult
from arcsim.config import RunConfig
from arcsim.report import POINT_COLUMNS

REPO = Path(__file__).resolve().parent.parent
TINY = tiny_values(num_byzantine=1, attack="alie", rounds=6, eval_every=3, round_deadline=30)


def _cli_run(config: Path, out: Path, engine: str) -> dict:
    """``arcsim run`` in a subprocess, as a user runs it; its summary."""
    result = subprocess.run(
        [sys.executable, "-m", "arcsim", "run", str(config), "--engine", engine, "--out", str(out), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def cli_summary(config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _cli_run(config_file, tmp_path_factory.mktemp("cli") / "out", "inproc")


@pytest.mark.parametrize("engine", ["inproc", "grpc"])
def test_run_gives_the_command_lines_final_parameters(
    engine: str, config_file: Path, cli_summary: dict, tmp_path: Path
) -> None:
    # Prepare: the caller's torch uses two threads; the run pins one and gives the two back
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # Execute
        result = arcsim.run(config_file, engine=engine, out=tmp_path / "out")
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    # Assert
    assert isinstance(result, RunResult) and threads_after == 2
    assert result.summary["engine"] == engine and result.summary["status"] == "completed"
    assert result.final_params_sha256 == cli_summary["final_params_sha256"]
    assert result.summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["round"] for r in result.records] == list(range(TINY["rounds"]))
    assert result.records.columns == RECORD_COLUMNS and set(result.records[0]) == set(RECORD_COLUMNS)


def test_one_torch_thread_pins_one_thread_and_restores_the_callers() -> None:
    from arcsim.api import one_torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with one_torch_thread():
            inside = torch.get_num_threads()
        after = torch.get_num_threads()
        with pytest.raises(KeyboardInterrupt), one_torch_thread():
            raise KeyboardInterrupt  # a notebook's interrupt gives the threads back too
        after_interrupt = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert (inside, after, after_interrupt) == (1, 3, 3)


def test_a_config_given_as_a_mapping_a_runconfig_or_a_path_with_overrides_is_the_same_run(
    config_file: Path, tmp_path: Path
) -> None:
    # Execute: the same run three ways, each with rounds overridden to 4
    from_path = arcsim.run(config_file, out=tmp_path / "path", rounds=4)
    from_mapping = arcsim.run({**TINY, "rounds": 9}, out=tmp_path / "mapping", rounds=4)
    from_config = arcsim.run(RunConfig(**TINY), out=tmp_path / "config", rounds=4)
    # Assert
    assert from_path.config.rounds == from_mapping.config.rounds == from_config.config.rounds == 4
    assert from_path.final_params_sha256 == from_mapping.final_params_sha256 == from_config.final_params_sha256
    assert len(from_path.records) == 4


def test_records_and_the_loaded_table_as_pandas(config_file: Path, tmp_path: Path) -> None:
    pandas = pytest.importorskip("pandas")
    # Prepare
    result = arcsim.run(config_file, out=tmp_path / "out")
    # Execute
    records = result.to_pandas()
    table = arcsim.load(result.out_dir)
    frame = table.to_pandas()
    # Assert: one row per round, the evaluations where the records have them
    assert isinstance(records, pandas.DataFrame) and list(records.columns) == list(RECORD_COLUMNS)
    assert len(records) == TINY["rounds"] and records["accuracy"].notna().sum() == 2
    assert list(frame.columns) == list(POINT_COLUMNS) and list(frame["round"]) == list(range(1, TINY["rounds"] + 1))
    assert list(frame["accuracy"].dropna()) == [r["accuracy"] for r in result.records if r["accuracy"] is not None]
    assert set(frame["run"]) == {"out"} and set(frame["pipeline"]) == {"arc > nnm > cwtm"}


def test_run_refuses_bad_arguments_before_running(config_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="engine must be one of inproc, grpc, batched, got 'ray'"):
        arcsim.run(config_file, engine="ray", out=tmp_path / "a")
    with pytest.raises(ValueError, match="config key 'rounds'"):
        arcsim.run(config_file, out=tmp_path / "b", rounds=0)
    with pytest.raises(ValueError, match="unknown tracker 'wandb'"):
        arcsim.run(config_file, out=tmp_path / "c", track=["wandb"])
    with pytest.raises(TypeError, match="config must be a path, a mapping or a RunConfig"):
        arcsim.run(42, out=tmp_path / "d")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no checkpoints to resume from"):
        arcsim.run(config_file, out=tmp_path / "e", resume=True)
    assert not any(tmp_path.iterdir())


def test_a_finished_run_is_not_overwritten_and_resume_gives_it_back(config_file: Path, tmp_path: Path) -> None:
    first = arcsim.run(config_file, out=tmp_path / "out")
    with pytest.raises(ValueError, match="already holds a run"):
        arcsim.run(config_file, out=tmp_path / "out")
    again = arcsim.run(config_file, out=tmp_path / "out", resume=True)  # nothing left to do: the same end
    assert again.final_params_sha256 == first.final_params_sha256


def test_sweep_runs_a_grid_and_load_reads_it_as_report_does(tmp_path: Path) -> None:
    # Execute: two seeds; a rerun finds both complete
    result = arcsim.sweep({**TINY, "rounds": 3, "eval_every": 3}, out=tmp_path / "grid", executor="inline", seed=[1, 2])
    rerun = arcsim.sweep({**TINY, "rounds": 3, "eval_every": 3}, out=tmp_path / "grid", executor="inline", seed=[1, 2])
    table = arcsim.load(tmp_path / "grid")
    # Assert
    assert result.ok and [row["seed"] for row in result.rows] == [1, 2]
    assert [row["status"] for row in rerun.rows] == ["completed", "completed"]
    assert len(table) == 6 and {row["seed"] for row in table} == {1, 2}
    assert result.load() == table
    # The table is the one `arcsim report` writes as points.csv
    report = pytest.importorskip("arcsim.report")
    pytest.importorskip("matplotlib")
    written = report.write_report(tmp_path / "grid")
    lines = written.points.read_text().splitlines()
    assert lines[0] == ",".join(POINT_COLUMNS) and len(lines) == 1 + len(table)


def test_sweep_from_a_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**TINY, "rounds": 2, "eval_every": 2, "seed": [1, 2, 3]}))
    result = arcsim.sweep(path, executor="inline", out=tmp_path / "grid", seed=[5])
    assert [row["seed"] for row in result.rows] == [5]
    assert yaml.safe_load((tmp_path / "grid" / "sweep.yaml").read_text())["seed"] == [5]


def test_load_of_a_folder_without_runs_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run in"):
        arcsim.load(tmp_path)


def test_importing_arcsim_loads_no_app_module_until_the_api_is_used() -> None:
    code = textwrap.dedent("""
        import sys
        import arcsim, arcsim.config
        heavy = ("arcsim.api", "arcsim.cli", "arcsim.report", "arcsim.sweep", "grpc", "google.protobuf",
                 "prometheus_client")
        assert not [m for m in sys.modules if m.startswith(heavy)], sorted(sys.modules)
        assert callable(arcsim.sweep) and arcsim.run.__module__ == "arcsim.api"
        import arcsim.sweep
        assert callable(arcsim.sweep) and hasattr(arcsim.sweep, "plan_sweep")
        assert not [m for m in sys.modules if m.startswith(("grpc", "google.protobuf", "prometheus_client"))]
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _notebook_code(path: Path) -> str:
    notebook = json.loads(path.read_text())
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert cells, f"{path} has no code cell"
    return "\n\n".join("".join(cell["source"]) for cell in cells)


def test_the_quickstart_notebook_runs(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    # Prepare: the notebook's code, run in a fresh interpreter in an empty folder, on the tiny config
    # it reads from ARCSIM_QUICKSTART_CONFIG (the notebook's own default is configs/small.yaml)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    script = tmp_path / "quickstart.py"
    script.write_text(_notebook_code(REPO / "examples" / "quickstart.ipynb"))
    env = {
        "PATH": "/usr/bin:/bin",
        "MPLBACKEND": "Agg",
        "ARCSIM_QUICKSTART_CONFIG": str(config),
        "OMP_NUM_THREADS": "1",
    }
    # Execute
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    # Assert: it ran to the end, leaving a run and a sweep
    assert result.returncode == 0, result.stderr
    assert "final accuracy" in result.stdout
    assert any((tmp_path / "runs").glob("*/summary.json"))
