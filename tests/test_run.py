"""End-to-end tests of ``arcsim run``, as a user runs it: ``python -m arcsim run CONFIG`` in a subprocess.

The grpc engine starts a coordinator, the honest workers and the adversaries as processes talking
gRPC over loopback; the inproc engine runs the same round logic in one process. Both must give
the same final parameters, and a run that is killed and resumed must end where an uninterrupted
one ends. Every process a test starts is accounted for and killed at the end (no orphans).

Uninterrupted inproc baselines run in this process (``run_inproc``, one torch thread like the
services), and the error messages of the command line are checked through ``arcsim.cli.main``
here, except one bad config checked end to end: process start-up is most of the cost.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_values

import arcsim.tasks.datasets as datasets
from arcsim.cli import main
from arcsim.config import load_config
from arcsim.engine.inproc import run_inproc

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SUMMARY_KEYS = {"config", "rounds_completed", "final_accuracy", "max_accuracy", "final_params_sha256", "wall_seconds"}

BASE = tiny_values(model="mlp", batch_size=25, round_deadline=30)
# A: label flipping (the Byzantine worker trains and keeps a momentum); the e2e and resume config.
LABEL_FLIP = {**BASE, "num_honest": 2, "num_byzantine": 1, "attack": "label_flip", "rounds": 30, "eval_every": 10}
# B: ALIE (the adversary observes the honest vectors each round).
ALIE = {**BASE, "num_honest": 2, "num_byzantine": 1, "attack": "alie", "rounds": 10, "eval_every": 5}
# M: Mimic learning its target over the first 4 rounds (a state the adversary service keeps across rounds),
# with the workers' batches cropped and flipped (augment: their own seeded draws in either engine).
MIMIC_LEARNED = {
    **BASE,
    "augment": "crop_flip",
    "num_honest": 3,
    "num_byzantine": 1,
    "attack": "mimic",
    "attack_params": {"learn_steps": 4},
    "rounds": 8,
    "eval_every": 4,
}
# D: lr = 1e8 makes the model diverge within a few rounds; then every vector is non-finite and refused.
DIVERGING = {**LABEL_FLIP, "lr": 1e8, "rounds": 6, "eval_every": 6}
# R: long enough for the inproc engine to be killed in the middle.
LONG = {**LABEL_FLIP, "rounds": 150, "eval_every": 50}


# --- processes -------------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _launched_by(launcher: int) -> set[int]:
    """Live processes started by the launcher ``launcher`` (they carry its pid in their environment)."""
    marker = f"ARCSIM_LAUNCHER_PID={launcher}".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.add(int(environ.parent.name))
        except OSError:
            continue
    return {pid for pid in found if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` is alive; returns those still alive after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        alive = {pid for pid in pids if _alive(pid)}
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.05)


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Arcsim:
    """``python -m arcsim ...`` subprocesses; whatever they start is killed when the test ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.seen: set[int] = set()

    def start(self, *args: str, prefix: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        command = [sys.executable, *(prefix or ["-m", "arcsim"]), *args]
        proc = subprocess.Popen(
            command, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 150, **kwargs: Any) -> Result:
        proc = self.start(*args, **kwargs)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.seen |= _children(proc.pid)
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"arcsim {' '.join(args)} ran over {timeout}s\nstdout: {stdout}\nstderr: {stderr}")
        return Result(proc.returncode, stdout, stderr)

    def track(self, proc: subprocess.Popen) -> None:
        self.seen |= _children(proc.pid)

    def cleanup(self) -> set[int]:
        """Stop what is left; returns the processes that outlived their launcher by 15 s (orphans), killed."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        left = {pid for proc in self.procs for pid in _launched_by(proc.pid)} | {p for p in self.seen if _alive(p)}
        orphans = _wait_gone(left, 15)
        _kill(orphans)
        return orphans


@pytest.fixture
def arcsim() -> Iterator[Arcsim]:
    runner = Arcsim()
    yield runner
    orphans = runner.cleanup()
    assert not orphans, f"processes outlived the test: {sorted(orphans)}"


def _write_config(folder: Path, name: str, values: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _records(out: Path) -> list[dict[str, Any]]:
    path = out / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def _run_ok(arcsim: Arcsim, config: Path, out: Path, *extra: str) -> dict[str, Any]:
    result = arcsim.run("run", str(config), "--out", str(out), "--no-progress", *extra)
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    return _summary(out)


def _kill_after_rounds(arcsim: Arcsim, proc: subprocess.Popen, out: Path, rounds: int, sig: int) -> None:
    """Send ``sig`` to ``proc`` once ``rounds`` records are in ``out/rounds.jsonl``."""
    end = time.monotonic() + 120
    while len(_records(out)) < rounds:
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < end, "no progress"
        time.sleep(0.005)
    arcsim.track(proc)
    proc.send_signal(sig)
    proc.communicate(timeout=60)


# --- the shared runs (one grpc run of each config serves several tests) --------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("runs")
    runner = Arcsim()
    cache: dict[str, Any] = {"folder": folder}

    def get(name: str, values: dict[str, Any], engine: str) -> dict[str, Any]:
        key = f"{name}-{engine}"
        if key not in cache:
            config = _write_config(folder, name, values)
            if engine == "inproc":
                cache[key] = run_inproc(load_config(config), folder / key)
            else:
                cache[key] = _run_ok(runner, config, folder / key, "--engine", engine)
        return cache[key]

    cache["get"] = get
    yield cache
    orphans = runner.cleanup()
    assert not orphans, f"processes outlived the runs: {sorted(orphans)}"


def test_grpc_run_learns_and_records_arc(runs: dict[str, Any]) -> None:
    # Execute
    summary = runs["get"]("label_flip", LABEL_FLIP, "grpc")
    # Assert: synthetic has 10 classes (chance is 10 %).
    out = runs["folder"] / "label_flip-grpc"
    assert summary["final_accuracy"] > 0.6
    assert summary["max_accuracy"] >= summary["final_accuracy"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["config"] == {**yaml.safe_load(yaml.safe_dump(summary["config"])), **summary["config"]}
    assert summary["config"]["attack"] == "label_flip" and summary["rounds_completed"] == 30
    assert summary["engine"] == "grpc" and summary["status"] == "completed"
    assert len(summary["final_params_sha256"]) == 64 and summary["wall_seconds"] > 0
    records = _records(out)
    assert [r["round"] for r in records] == list(range(30))
    for record in records:
        assert {"clip_threshold", "clipped_honest", "clipped_byzantine"} <= set(record)
        assert record["clip_threshold"] > 0
        assert record["clipped_honest"] + record["clipped_byzantine"] == 1  # k = floor(2 f (n - f) / n) = 1
        assert (record["received_honest"], record["received_byzantine"]) == (2, 1)
    assert [r["round"] for r in records if r["accuracy"] is not None] == [9, 19, 29]
    assert (out / "config.yaml").exists() and sorted(p.name for p in (out / "logs").iterdir()) == [
        "adversary.log",
        "coordinator.log",
        "worker-0.log",
        "worker-1.log",
    ]
    assert not (out / "coordinator.json").exists()


@pytest.mark.parametrize(
    ("name", "values"),
    [("label_flip", LABEL_FLIP), ("alie", ALIE), ("mimic_learned", MIMIC_LEARNED), ("diverging", DIVERGING)],
)
def test_grpc_and_inproc_give_the_same_parameters(runs: dict[str, Any], name: str, values: dict[str, Any]) -> None:
    grpc = runs["get"](name, values, "grpc")
    inproc = runs["get"](name, values, "inproc")
    assert grpc["final_params_sha256"] == inproc["final_params_sha256"]
    assert grpc["final_accuracy"] == inproc["final_accuracy"]
    assert grpc["config"] == inproc["config"]
    grpc_records = _records(runs["folder"] / f"{name}-grpc")
    inproc_records = _records(runs["folder"] / f"{name}-inproc")
    for key in (
        "received_honest",
        "received_byzantine",
        "aggregated",
        "clip_threshold",
        "clipped_honest",
        "clipped_byzantine",
        "clipped_rows",
        "aggregate_error",
        "accuracy",
        "train_loss",
        "skip_reason",
    ):
        assert [r[key] for r in grpc_records] == [r[key] for r in inproc_records], key


# --- interrupted and resumed runs ----------------------------------------------------------------------
def test_inproc_run_killed_and_resumed_ends_as_uninterrupted(arcsim: Arcsim, tmp_path: Path) -> None:
    # Prepare
    config = _write_config(tmp_path, "long", LONG)
    expected = run_inproc(load_config(config), tmp_path / "whole")
    out = tmp_path / "interrupted"
    proc = arcsim.start("run", str(config), "--out", str(out), "--no-progress", "--engine", "inproc")
    # Execute: SIGKILL in the middle, then resume.
    _kill_after_rounds(arcsim, proc, out, 10, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert 10 <= len(_records(out)) < LONG["rounds"] and not (out / "summary.json").exists()
    resumed = _run_ok(arcsim, config, out, "--engine", "inproc", "--resume")
    # Assert
    assert resumed["final_params_sha256"] == expected["final_params_sha256"]
    assert resumed["rounds_completed"] == LONG["rounds"]
    assert [r["round"] for r in _records(out)] == list(range(LONG["rounds"]))


def test_resume_drops_a_torn_record_and_records_written_after_the_checkpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Prepare: a finished 4-round run whose summary is gone, with a record of a round the checkpoint
    # does not cover and a torn last line (a crash in the middle of a write).
    config = _write_config(tmp_path, "small", {**ALIE, "rounds": 4})
    out = tmp_path / "out"
    expected = run_inproc(load_config(config), out)
    (out / "summary.json").unlink()
    with open(out / "rounds.jsonl", "a") as handle:
        handle.write(json.dumps({"round": 4}) + "\n" + '{"round": 5, "lr": 0.')
    # Execute
    code = main(["run", str(config), "--out", str(out), "--engine", "inproc", "--resume", "--no-progress"])
    # Assert
    assert code == 0, capsys.readouterr().err
    assert [r["round"] for r in _records(out)] == [0, 1, 2, 3]
    assert (out / "rounds.jsonl").read_text().endswith("}\n")
    assert _summary(out)["final_params_sha256"] == expected["final_params_sha256"]


def test_grpc_launcher_killed_leaves_no_orphans_and_resume_ends_as_uninterrupted(
    arcsim: Arcsim, runs: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: the uninterrupted result (the engines agree, see above).
    expected = runs["get"]("label_flip", LABEL_FLIP, "inproc")
    config = _write_config(tmp_path, "label_flip", LABEL_FLIP)
    out = tmp_path / "interrupted"
    proc = arcsim.start("run", str(config), "--out", str(out), "--no-progress")
    # Execute: SIGKILL the launcher alone, as a crash would; its services must not run on.
    _kill_after_rounds(arcsim, proc, out, 5, signal.SIGKILL)
    survivors = _wait_gone(arcsim.seen, 30)
    assert len(arcsim.seen) == 4  # the coordinator, 2 workers and the adversary had been started
    assert not survivors, "the services outlived the killed launcher"
    done = len(_records(out))
    assert 5 <= done < LABEL_FLIP["rounds"]
    resumed = _run_ok(arcsim, config, out, "--resume")
    # Assert
    assert resumed["final_params_sha256"] == expected["final_params_sha256"]
    assert resumed["rounds_completed"] == LABEL_FLIP["rounds"]
    assert [r["round"] for r in _records(out)] == list(range(LABEL_FLIP["rounds"]))


def test_sigterm_to_the_grpc_launcher_stops_the_services(arcsim: Arcsim, tmp_path: Path) -> None:
    config = _write_config(tmp_path, "label_flip", LABEL_FLIP)
    out = tmp_path / "stopped"
    proc = arcsim.start("run", str(config), "--out", str(out), "--no-progress")
    # Execute
    _kill_after_rounds(arcsim, proc, out, 3, signal.SIGTERM)
    # Assert: the launcher stopped its services before exiting, and says so.
    assert proc.returncode != 0
    assert not {pid for pid in arcsim.seen if _alive(pid)}
    assert not (out / "coordinator.json").exists()
    resumable = list((out / "checkpoints").glob("round-*.safetensors"))
    assert resumable


# --- errors the user sees ----------------------------------------------------------------------------------
def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("arcsim: error: "), stderr
    assert lines[0].count("arcsim: error:") == 1, stderr
    return lines[0]


def test_bad_config_is_one_clear_line(arcsim: Arcsim, tmp_path: Path) -> None:
    config = _write_config(tmp_path, "small", {**ALIE, "rouns": 3})
    result = arcsim.run("run", str(config), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "unknown config key 'rouns' (did you mean 'rounds'?)" in _one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "rouns=3"], "unknown config key 'rouns' (did you mean 'rounds'?)"),
        (["--set", "num_byzantine=3"], "f = 3 must be below half of the 5 workers"),
        (["--set", "rounds"], "--set expects KEY=VALUE, got 'rounds'"),
    ],
)
def test_bad_overrides_are_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    config = _write_config(tmp_path, "small", ALIE)
    code = main(["run", str(config), "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["run", str(tmp_path / "nope.yaml")])
    assert code == 2
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in _one_error_line(capsys.readouterr().err)


def test_finished_run_is_not_overwritten(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = _write_config(tmp_path, "small", {**ALIE, "rounds": 2})
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--engine", "inproc", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--engine", "inproc"])
    assert code == 2
    assert "already holds a finished run" in _one_error_line(capsys.readouterr().err)


def test_resume_without_checkpoints_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = _write_config(tmp_path, "small", ALIE)
    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--resume"])
    assert code == 2
    assert "has no checkpoints to resume from" in _one_error_line(capsys.readouterr().err)


def test_missing_data_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: Fashion-MNIST looked for in empty folders only: data_root, $ARCSIM_DATA, the user cache,
    # and the Debian system folder (replaced here).
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", empty / "system")
    monkeypatch.setenv("ARCSIM_DATA", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty))
    config = _write_config(tmp_path, "fmnist", {**ALIE, "task": "fashion-mnist", "data_root": str(empty)})
    # Execute
    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--engine", "inproc"])
    # Assert
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "Fashion-MNIST not found" in line and str(empty / "system") in line


def test_metrics_port_in_use_is_a_clear_error_inproc(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = _write_config(tmp_path, "small", ALIE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            [
                "run",
                str(config),
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
                "--engine",
                "inproc",
                "--metrics-port",
                str(port),
            ]
        )
    assert code == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in _one_error_line(
        capsys.readouterr().err
    )


def test_metrics_port_in_use_is_a_clear_error_grpc(arcsim: Arcsim, tmp_path: Path) -> None:
    config = _write_config(tmp_path, "small", ALIE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = arcsim.run(
            "run", str(config), "--out", str(tmp_path / "out"), "--no-progress", "--metrics-port", str(port)
        )
    assert result.returncode == 1
    line = _one_error_line(result.stderr)
    assert f"coordinator exited: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in line
