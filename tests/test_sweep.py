"""arcsim sweep: grid expansion, validation, run folders, the table, resume after a kill, Ray."""

from __future__ import annotations

import csv
import doctest
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from arcsim import sweep
from arcsim.cli import main
from arcsim.config import ConfigError, from_dict
from arcsim.engine.inproc import run_inproc
from arcsim.sweep import (
    TABLE_COLUMNS,
    execute_run,
    expand_grid,
    is_complete,
    plan_sweep,
    run_name,
    run_sweep,
)

REPO = Path(__file__).resolve().parents[1]

# A tiny run: synthetic data, logistic regression, 4 honest + 1 Byzantine, 20 rounds (well under a second).
TINY = {
    "task": "synthetic",
    "model": "logreg",
    "num_honest": 4,
    "num_byzantine": 1,
    "attack": "sign_flip",
    "pipeline": "arc > nnm > cwtm",
    "partitioner": "iid",
    "rounds": 20,
    "eval_every": 5,
}


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_doctests() -> None:
    result = doctest.testmod(sweep, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --- expansion --------------------------------------------------------------------------------
def test_expand_grid_is_the_cartesian_product_first_key_slowest() -> None:
    # Prepare
    grid = {"task": "synthetic", "seed": [1, 2], "attack": ["sign_flip", "foe"]}
    # Execute
    combos = expand_grid(grid)
    # Assert
    assert combos == [
        {"task": "synthetic", "seed": 1, "attack": "sign_flip"},
        {"task": "synthetic", "seed": 1, "attack": "foe"},
        {"task": "synthetic", "seed": 2, "attack": "sign_flip"},
        {"task": "synthetic", "seed": 2, "attack": "foe"},
    ]


def test_lr_milestones_flat_list_is_one_value_and_list_of_lists_a_grid() -> None:
    assert expand_grid({"lr_milestones": [10, 15]}) == [{"lr_milestones": [10, 15]}]
    assert expand_grid({"lr_milestones": []}) == [{"lr_milestones": []}]
    assert expand_grid({"lr_milestones": [[10], [10, 15]]}) == [{"lr_milestones": [10]}, {"lr_milestones": [10, 15]}]


def test_mapping_keys_a_mapping_is_one_value_and_a_list_of_mappings_a_grid() -> None:
    assert expand_grid({"attack_params": {"tau": 1.0}}) == [{"attack_params": {"tau": 1.0}}]
    grid = expand_grid({"attack_params": [{}, {"tau": 2.0}]})
    assert grid == [{"attack_params": {}}, {"attack_params": {"tau": 2.0}}]


def test_a_bundle_sets_several_keys_at_once() -> None:
    # Prepare: static clipping takes c, the other pipelines do not
    grid = {"pipeline": ["nnm > cwtm", {"pipeline": "static_clip > nnm > cwtm", "pipeline_params": {"c": 2}}]}
    # Execute
    combos = expand_grid(grid)
    # Assert
    assert combos == [{"pipeline": "nnm > cwtm"}, {"pipeline": "static_clip > nnm > cwtm", "pipeline_params": {"c": 2}}]


def test_unknown_key_is_rejected_with_its_name() -> None:
    with pytest.raises(ConfigError, match="'atack'"):
        expand_grid({"atack": ["alie"]})


def test_empty_list_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'seed': an empty list"):
        expand_grid({"seed": []})


def test_bundle_must_set_its_own_key() -> None:
    with pytest.raises(ConfigError, match="must set 'attack' itself"):
        expand_grid({"attack": [{"attack_params": {"tau": 1}}]})


def test_bundle_with_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown config keys \['tau'\]"):
        expand_grid({"attack": [{"attack": "alie", "tau": 1}]})


def test_bundle_may_not_set_a_grid_axis() -> None:
    with pytest.raises(ConfigError, match="sets 'seed', which is a grid axis"):
        expand_grid({"attack": [{"attack": "alie", "seed": 3}], "seed": [1, 2]})


def test_bundles_of_two_axes_may_not_set_the_same_key() -> None:
    with pytest.raises(ConfigError, match="bundles of both set 'rounds'"):
        expand_grid({"attack": [{"attack": "alie", "rounds": 5}], "pipeline": [{"pipeline": "mean", "rounds": 6}]})


# --- the plan ---------------------------------------------------------------------------------
def test_f_zero_runs_without_attack_and_duplicates_are_merged() -> None:
    # Prepare: 3 f values x 2 attacks = 6 combinations; the two f = 0 ones are the same run
    raw = {**TINY, "num_byzantine": [0, 1, 2], "num_honest": 5, "attack": ["sign_flip", "alie"]}
    # Execute
    plan = plan_sweep(raw)
    # Assert
    assert plan.combinations == 6 and len(plan.runs) == 5 and plan.duplicates == 1
    baseline = plan.runs[0].config
    assert (baseline.num_byzantine, baseline.attack, baseline.attack_params) == (0, "none", {})
    assert {(r.config.num_byzantine, r.config.attack) for r in plan.runs[1:]} == {
        (1, "sign_flip"),
        (1, "alie"),
        (2, "sign_flip"),
        (2, "alie"),
    }
    assert plan.varied == ("num_byzantine", "attack")


def test_pipeline_spellings_that_differ_in_spaces_are_one_run() -> None:
    plan = plan_sweep({**TINY, "pipeline": ["arc>nnm>cwtm", "arc > nnm > cwtm", "arc  >nnm > cwtm"]})
    assert len(plan.runs) == 1 and plan.duplicates == 2
    assert plan.runs[0].config.pipeline == "arc > nnm > cwtm"


def test_invalid_combinations_are_all_listed_before_anything_runs() -> None:
    # Prepare: n = 4 with f = 2 breaks 2f < n; static_clip without c has no threshold
    raw = {**TINY, "num_honest": 2, "num_byzantine": [1, 2], "pipeline": ["nnm > cwtm", "static_clip > cwtm"]}
    # Execute
    with pytest.raises(ConfigError) as caught:
        plan_sweep(raw, name="bad")
    # Assert: 3 of the 4 combinations are named, with the reason
    message = str(caught.value)
    assert message.startswith("3 of the 4 combinations of sweep 'bad' are invalid")
    assert "num_byzantine=2, pipeline='nnm > cwtm'" in message and "2f < n" in message
    assert "num_byzantine=1, pipeline='static_clip > cwtm'" in message and "['c']" in message


def test_skip_invalid_drops_invalid_combinations_and_counts_them() -> None:
    raw = {**TINY, "num_honest": 2, "num_byzantine": [1, 2], "sweep": {"skip_invalid": True}}
    plan = plan_sweep(raw)
    assert [r.config.num_byzantine for r in plan.runs] == [1]
    assert len(plan.invalid) == 1 and "2f < n" in plan.invalid[0]
    assert "1 invalid skipped" in plan.describe()


def test_exclude_rules_drop_matching_combinations() -> None:
    # Prepare: drop ALIE at f = 2, and every seed-3 run of the trimmed mean (a list in a rule = any of)
    raw = {
        **TINY,
        "num_honest": 5,
        "num_byzantine": [1, 2],
        "attack": ["sign_flip", "alie"],
        "seed": [1, 3],
        "sweep": {"exclude": [{"attack": "alie", "num_byzantine": 2}, {"seed": [3], "pipeline": "arc>nnm>cwtm"}]},
    }
    # Execute
    plan = plan_sweep(raw)
    # Assert: 8 combinations, the 4 seed-3 ones and the seed-1 ALIE f = 2 one go
    assert plan.excluded == 5 and len(plan.runs) == 3
    assert all(r.config.seed == 1 for r in plan.runs)
    assert (2, "alie") not in {(r.config.num_byzantine, r.config.attack) for r in plan.runs}


def test_sweep_name_comes_from_the_section() -> None:
    assert plan_sweep({**TINY, "sweep": {"name": "grid-a"}}, name="file").name == "grid-a"
    assert plan_sweep(TINY, name="file").name == "file"


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ([1], "must be a mapping"),
        ({"nme": "x"}, r"unknown keys \['nme'\]"),
        ({"name": "a/b"}, "sweep.name must be a non-empty name"),
        ({"exclude": {"seed": 1}}, "sweep.exclude must be a list"),
        ({"exclude": [{"sed": 1}]}, r"unknown config keys \['sed'\]"),
        ({"skip_invalid": "yes"}, "sweep.skip_invalid must be true or false"),
    ],
)
def test_bad_sweep_section_is_rejected(section: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_sweep({**TINY, "sweep": section})


def test_a_sweep_config_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        plan_sweep([TINY])  # type: ignore[arg-type]


def test_a_sweep_with_nothing_left_is_rejected() -> None:
    with pytest.raises(ConfigError, match="no run left to do"):
        plan_sweep({**TINY, "sweep": {"exclude": [{"task": "synthetic"}]}})


def test_run_name_is_readable_and_ends_with_the_digest() -> None:
    config = from_dict({**TINY, "partitioner": "dirichlet", "alpha": 0.5, "seed": 7})
    assert run_name(config) == f"sign_flip-arc_nnm_cwtm-f1-dirichlet0.5-s7-{config.digest()[:8]}"


def test_load_sweep_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep config not found"):
        sweep.load_sweep(tmp_path / "missing.yaml")


def test_load_sweep_reports_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        sweep.load_sweep(path)


# --- running ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"executor": "slurm"}, "executor must be one of"),
        ({"jobs": 0}, "jobs must be a positive integer, got jobs = 0"),
        ({"ray_address": "ray://x:10001"}, "needs executor 'ray'"),
    ],
)
def test_run_sweep_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_sweep(plan_sweep(TINY), tmp_path, **kwargs)


def test_sweep_writes_run_folders_and_one_table_row_per_run(tmp_path: Path) -> None:
    # Prepare
    plan = plan_sweep({**TINY, "lr": [0.1, 0.05]}, source_text="lr: [0.1, 0.05]\n")
    lines: list[str] = []
    # Execute
    outcome = run_sweep(plan, tmp_path, executor="inline", echo=lines.append)
    # Assert: each run folder is what `arcsim run` writes; the table has both runs, completed
    assert outcome.ok and outcome.completed == 2 and outcome.skipped == 0
    for run in plan.runs:
        folder = tmp_path / run.name
        assert {p.name for p in folder.iterdir()} >= {"summary.json", "rounds.jsonl", "config.yaml", "checkpoints"}
        assert len((folder / "rounds.jsonl").read_text().splitlines()) == 20
        assert is_complete(folder, run.config)
    rows = read_table(tmp_path / "sweep.csv")
    assert list(rows[0]) == ["lr", *TABLE_COLUMNS]  # a varied key not among the fixed columns comes first
    assert [row["lr"] for row in rows] == ["0.1", "0.05"]
    assert [row["run_dir"] for row in rows] == [run.name for run in plan.runs]
    assert all(row["status"] == "completed" and row["rounds_completed"] == "20" for row in rows)
    assert all(len(row["final_params_sha256"]) == 64 and 0 < float(row["max_accuracy"]) <= 1 for row in rows)
    assert (tmp_path / "sweep.yaml").read_text() == "lr: [0.1, 0.05]\n"
    assert lines[0].startswith("[1/2] ") and "completed: max acc" in lines[0]
    assert lines[-1].startswith("sweep 'sweep': 2 runs, 0 already complete, 2 completed now, 0 failed")


def test_a_sweep_run_equals_the_same_run_done_alone(tmp_path: Path) -> None:
    # Prepare
    plan = plan_sweep(TINY)
    alone = run_inproc(from_dict(TINY), tmp_path / "alone")
    # Execute
    outcome = run_sweep(plan, tmp_path / "sweep", executor="inline", echo=lambda line: None)
    # Assert
    assert outcome.rows[0]["final_params_sha256"] == alone["final_params_sha256"]


def test_a_partial_run_is_resumed_from_its_checkpoint_not_restarted(tmp_path: Path) -> None:
    # Prepare: a run stopped after round 10 (as if killed), and the same run done without a stop
    plan = plan_sweep(TINY)
    run = plan.runs[0]

    class Stop(Exception):
        pass

    def stop_at_10(state, record) -> None:
        if record.round == 9:
            raise Stop

    with pytest.raises(Stop):
        run_inproc(run.config, tmp_path / "sweep" / run.name, on_round=stop_at_10)
    reference = run_inproc(run.config, tmp_path / "reference")
    lines: list[str] = []
    # Execute
    run_sweep(plan, tmp_path / "sweep", executor="inline", echo=lines.append)
    # Assert: resumed at round 10, each round recorded once, same final parameters as without the stop
    assert "(resumed at round 10)" in lines[0]
    records = (tmp_path / "sweep" / run.name / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in records] == list(range(20))
    summary = sweep.read_summary(tmp_path / "sweep" / run.name)
    assert summary is not None and summary["final_params_sha256"] == reference["final_params_sha256"]


def test_a_failing_run_is_recorded_and_the_others_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the run with seed 1 fails inside the engine
    import arcsim.engine.inproc

    real = arcsim.engine.inproc.run_inproc

    def flaky(config, out_dir, **kwargs):
        if config.seed == 1:
            raise RuntimeError("disk on fire")
        return real(config, out_dir, **kwargs)

    monkeypatch.setattr(arcsim.engine.inproc, "run_inproc", flaky)
    plan = plan_sweep({**TINY, "seed": [1, 2]})
    lines: list[str] = []
    # Execute
    outcome = run_sweep(plan, tmp_path, executor="inline", echo=lines.append)
    # Assert
    assert not outcome.ok and outcome.failed == 1 and outcome.completed == 1
    rows = read_table(tmp_path / "sweep.csv")
    assert [row["status"] for row in rows] == ["failed", "completed"]
    assert rows[0]["error"] == "RuntimeError: disk on fire"
    assert "disk on fire" in (tmp_path / plan.runs[0].name / "error.log").read_text()
    assert "FAILED" in lines[0]


def test_execute_run_never_raises(tmp_path: Path) -> None:
    # A file where the run folder should be: the run cannot write, and says so.
    (tmp_path / "run").write_text("")
    result = execute_run(from_dict(TINY), tmp_path / "run")
    assert result["status"] == "failed" and result["error"]


def test_two_sweeps_in_one_folder_are_refused(tmp_path: Path) -> None:
    with sweep._sweep_lock(tmp_path):
        with pytest.raises(RuntimeError, match="another arcsim sweep is running"):
            run_sweep(plan_sweep(TINY), tmp_path, executor="inline", echo=lambda line: None)


def test_cli_sweep_exits_non_zero_when_a_run_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**TINY, "seed": [1, 2]}))
    failed = sweep.SweepOutcome(
        out_dir=tmp_path, table=tmp_path / "sweep.csv", rows=(), skipped=0, completed=1, failed=1
    )
    monkeypatch.setattr(sweep, "run_sweep", lambda *args, **kwargs: failed)
    # Execute / Assert
    assert main(["sweep", str(config), "--out", str(tmp_path / "out")]) == 1


def test_cli_dry_run_lists_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**TINY, "seed": [1, 2]}))
    assert main(["sweep", str(config), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "sweep 'grid': 2 runs from a grid of 2" in out and out.count("to run") == 2
    assert not (tmp_path / "out").exists()


def test_cli_reports_invalid_combinations_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**TINY, "num_honest": 2, "num_byzantine": [1, 2]}))
    assert main(["sweep", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "1 of the 2 combinations of sweep 'grid' are invalid" in capsys.readouterr().err


def _sweep_process(config: Path, out: Path, jobs: int) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "arcsim", "sweep", str(config), "--out", str(out), "--jobs", str(jobs)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_a_killed_sweep_resumes_without_recomputing_or_losing_runs(tmp_path: Path) -> None:
    # Prepare: 4 runs of 40 rounds in a real process pool; SIGKILL the sweep (and its pool) once 2 are done
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**TINY, "rounds": 40, "eval_every": 20, "seed": [1, 2, 3, 4]}))
    out = tmp_path / "out"
    first = _sweep_process(config, out, jobs=1)
    finished: list[str] = []
    deadline = time.monotonic() + 120
    assert first.stdout is not None
    for line in first.stdout:
        if " completed: " in line:
            finished.append(line.split()[1])
        if len(finished) == 2 or time.monotonic() > deadline:
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    rows = read_table(out / "sweep.csv")  # the table survived the kill, with the finished runs in it
    done = [row["run_dir"] for row in rows if row["status"] == "completed"]
    assert len(finished) == 2 and set(finished) <= set(done) and len(rows) == 4 and len(done) < 4
    before = {
        name: ((out / name / "summary.json").stat().st_mtime_ns, (out / name / "summary.json").read_bytes())
        for name in done
    }
    # Execute: run the same sweep again
    second = _sweep_process(config, out, jobs=2)
    log, _ = second.communicate(timeout=180)
    # Assert: the finished runs were skipped, untouched; the others completed; the table has every run
    assert second.returncode == 0, log
    for name in done:
        assert f"{name} skipped: already complete" in log
        summary = out / name / "summary.json"
        assert (summary.stat().st_mtime_ns, summary.read_bytes()) == before[name]
    assert log.count(" completed: ") == 4 - len(done)
    rows = read_table(out / "sweep.csv")
    assert len(rows) == 4 and all(row["status"] == "completed" and row["rounds_completed"] == "40" for row in rows)
    for row in rows:  # resumed runs recorded each round exactly once
        records = (out / row["run_dir"] / "rounds.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in records] == list(range(40))


@pytest.mark.slow
def test_ray_executor_runs_the_grid_on_a_local_ray_instance(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    # Prepare
    plan = plan_sweep({**TINY, "seed": [1, 2]})
    inline = run_sweep(plan, tmp_path / "inline", executor="inline", echo=lambda line: None)
    # Execute
    outcome = run_sweep(plan, tmp_path / "ray", executor="ray", jobs=2, echo=lambda line: None)
    # Assert: same runs, same final parameters as in this process
    assert outcome.ok and outcome.completed == 2
    assert [r["final_params_sha256"] for r in outcome.rows] == [r["final_params_sha256"] for r in inline.rows]
    assert all((tmp_path / "ray" / run.name / "summary.json").exists() for run in plan.runs)


@pytest.mark.slow
def test_ray_executor_runs_a_batched_group_as_one_task(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    # Prepare: two compatible runs, one group
    from arcsim.engine.batched import run_batched

    plan = plan_sweep({**TINY, "seed": [1, 2]})
    here = run_batched([run.config for run in plan.runs], [tmp_path / "here" / run.name for run in plan.runs])
    # Execute
    outcome = run_sweep(plan, tmp_path / "ray", executor="ray", jobs=1, engine="batched", echo=lambda line: None)
    # Assert: the group ran as one Ray task with one thread, as here (conftest), so with the same bits
    assert outcome.ok and outcome.completed == 2
    assert [r["final_params_sha256"] for r in outcome.rows] == [s["final_params_sha256"] for s in here]
    for run in plan.runs:
        assert json.loads((tmp_path / "ray" / run.name / "summary.json").read_text())["engine"] == "batched"


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_the_committed_paper_grids_expand_into_valid_runs(path: Path) -> None:
    plan = sweep.load_sweep(path)
    names = [run.name for run in plan.runs]
    assert names and len(set(names)) == len(names)
    # The header comment gives the exact command that reproduces docs/results.md.
    assert f"arcsim sweep configs/paper/{path.name}" in path.read_text()
