"""The command line as an operator uses it: exit statuses, one-line errors (also on a machine without
torch), ``--version`` and the help, an ``ARCSIM_*`` variable for every service flag, and the rate
of the progress line after ``--resume``.

Runs go through ``python -m arcsim`` subprocesses (the ``arcsim`` fixture of test_run.py, which
kills whatever a test leaves behind); parsing and one-line errors through ``arcsim.cli.main``.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_run import (  # noqa: F401
    ALIE,
    ENV,
    LABEL_FLIP,
    LONG,
    REPO,
    Arcsim,
    _kill_after_rounds,
    _one_error_line,
    _records,
    _summary,
    _write_config,
    arcsim,
)

from arcsim.cli import EXIT_STOPPED, EXIT_USAGE, build_parser, main
from arcsim.progress import Progress
from arcsim.transport.auth import ANY_ID

# The environment of a machine whose shell sets no arcsim variable.
CLEAN_ENV = {name: value for name, value in ENV.items() if not name.startswith("ARCSIM_")}

# `python -c BLOCK_TORCH ARGS...` runs `python -m arcsim ARGS...` where importing torch fails, as on a
# machine without it: a meta-path finder ahead of every other refuses torch and its submodules.
BLOCK_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
sys.argv = ["arcsim", *sys.argv[1:]]
runpy.run_module("arcsim", run_name="__main__", alter_sys=True)
"""


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``arcsim ARGV``: a usage error (exit 2) of one line, returned."""
    assert main(argv) == EXIT_USAGE
    return _one_error_line(capsys.readouterr().err)


def _parse(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> dict[str, object]:
    """The parsed flags of ``arcsim ARGV`` with exactly ``env`` as the ARCSIM_* variables."""
    for name in list(os.environ):
        if name.startswith("ARCSIM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    values = vars(build_parser().parse_args(argv))
    del values["func"], values["command"]
    return values


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited before writing {path}: {proc.communicate()}"
        assert time.monotonic() < end, f"no {path} after {timeout}s"
        time.sleep(0.02)


# --- version and help ------------------------------------------------------------------------------
def test_version_is_the_installed_package_version(arcsim: Arcsim) -> None:
    result = arcsim.run("--version", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"arcsim {importlib.metadata.version('arcsim')}"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["run"], ["(default: grpc)", "{grpc,inproc,batched}", "{auto,cpu,cuda}", "{tensorboard,mlflow}"]),
        (["coordinator"], ["default: 50051", "{cpu,cuda}", "{debug,info,warning,error,critical}"]),
        (["worker"], ["default: 300.0", "default: auto", "{debug,info,warning,error,critical}"]),
        (["adversary"], ["default: 300.0", "default: 127.0.0.1", "{debug,info,warning,error,critical}"]),
        (["sweep"], ["(default: local)", "{local,ray}", "{inproc,batched}", "(default: inproc)"]),
        (["report"], []),
        (["health"], ["default: 3.0"]),
        (["certs"], []),
        (["data"], []),
        (["data", "download"], ["{fashion-mnist,mnist,cifar-10}"]),
        (["list"], ["{rules,attacks,datasets,models,partitioners}", "default: all of them"]),
    ],
)
def test_every_command_has_a_description_an_example_and_its_defaults(
    capsys: pytest.CaptureFixture[str], command: list[str], shown: list[str]
) -> None:
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert not description.startswith(("positional arguments", "options")), text
    examples = text.partition("\nexamples:\n")[2]
    assert f"arcsim {' '.join(command)}" in examples, text
    for fragment in shown:
        assert fragment in text, fragment


def test_list_shows_every_registry_or_the_one_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute: every registry, then only the rules
    assert main(["list"]) == 0
    everything = capsys.readouterr().out.splitlines()
    assert main(["list", "rules"]) == 0
    rules = capsys.readouterr().out.splitlines()
    # Assert: a heading per registry naming its entry-point group; built-ins with their origin
    headings = [line.split(" ", 1)[0] for line in everything if not line.startswith(" ")]
    assert headings == ["rules", "attacks", "datasets", "models", "partitioners"]
    assert rules[0].startswith("rules (group arcsim.rules")
    assert [line.split()[:2] for line in rules if line.split()[:1] == ["arc"]] == [["arc", "built-in"]]
    assert set(rules) <= set(everything) and any(line.split()[:1] == ["alie"] for line in everything)
    assert main(["list", "aggregators"]) == EXIT_USAGE
    assert "invalid choice: 'aggregators'" in capsys.readouterr().err


# --- one-line errors and exit statuses ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["coordinator", "--config", "c.yaml", "--out", "out"],
        ["worker", "--coordinator", "127.0.0.1:1", "--worker-id", "0"],
        ["adversary", "--coordinator", "127.0.0.1:1", "--worker-id", "2"],
    ],
)
def test_a_log_level_typo_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("ARCSIM_SECRET", "s")
    line = _usage_error(capsys, [*command, "--log-level", "verbose"])
    assert "argument --log-level: invalid choice: 'verbose'" in line


def test_a_tracker_twice_or_an_unknown_one_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("task: synthetic\n")
    line = _usage_error(capsys, ["run", str(config), "--track", "mlflow", "--track", "mlflow"])
    assert line == "arcsim: error: --track: each tracker once, got mlflow mlflow"
    assert main(["run", str(config), "--track", "wandb"]) == EXIT_USAGE
    assert "invalid choice: 'wandb'" in capsys.readouterr().err
    assert not any(p.name != "c.yaml" for p in tmp_path.iterdir())


def test_a_value_that_is_not_yaml_in_set_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = _write_config(tmp_path, "small", ALIE)
    line = _usage_error(capsys, ["run", str(config), "--out", str(tmp_path / "out"), "--set", "attack_params={a: [1"])
    assert "--set 'attack_params={a: [1': the value is not valid YAML" in line


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["run", "{tmp}/missing.yaml"], 2, "config file not found: {tmp}/missing.yaml"),
        (["run", "{config}", "--set", "rounds"], 2, "--set expects KEY=VALUE, got 'rounds'"),
        (["run", "{config}", "--set", "attack=[1"], 2, "the value is not valid YAML"),
        (["run", "{config}", "--engine", "grcp"], 2, "argument --engine: invalid choice: 'grcp'"),
        (["run", "{config}", "--out", "{tmp}/out", "--resume"], 2, "has no checkpoints to resume from"),
        (
            ["coordinator", "--config", "{config}", "--out", "{tmp}/out", "--log-level", "loud"],
            2,
            "argument --log-level: invalid choice: 'loud'",
        ),
        (["coordinator", "--config", "{config}", "--out", "{tmp}/out"], 2, "no run secret"),
        (["worker", "--coordinator", "127.0.0.1:1", "--worker-id", "0"], 2, "no credentials"),
        # What does need torch says so in one line too.
        (["run", "{config}", "--out", "{tmp}/out"], 1, "No module named 'torch'"),
    ],
)
def test_errors_are_one_line_on_a_machine_without_torch(
    arcsim: Arcsim, tmp_path: Path, argv: list[str], code: int, message: str
) -> None:
    config = _write_config(tmp_path, "small", ALIE)
    fill = {"tmp": str(tmp_path), "config": str(config)}
    result = arcsim.run(*(arg.format(**fill) for arg in argv), prefix=["-c", BLOCK_TORCH], env=CLEAN_ENV, timeout=60)
    assert result.returncode == code, result.stderr
    assert message.format(**fill) in _one_error_line(result.stderr)


def test_version_and_help_need_no_torch(arcsim: Arcsim) -> None:
    for args in (["--version"], ["coordinator", "--help"]):
        result = arcsim.run(*args, prefix=["-c", BLOCK_TORCH], env=CLEAN_ENV, timeout=60)
        assert result.returncode == 0 and result.stdout.startswith(("arcsim ", "usage:")), result.stderr


def test_a_run_whose_coordinator_was_stopped_exits_3_and_resumes(
    arcsim: Arcsim, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Prepare
    config = _write_config(tmp_path, "label_flip", LABEL_FLIP)
    out = tmp_path / "out"
    proc = arcsim.start("run", str(config), "--out", str(out), "--no-progress")
    end = time.monotonic() + 120
    while len(_records(out)) < 3:
        assert proc.poll() is None and time.monotonic() < end, "the run ended or stalled before round 3"
        time.sleep(0.01)
    # Execute: SIGTERM to the coordinator alone (an operator's kill, a supervisor's stop); it stops
    # at its last checkpoint and the launcher sees it end normally.
    arcsim.track(proc)
    os.kill(json.loads((out / "coordinator.json").read_text())["pid"], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    # Assert: not 0, with the reason, and the run continues with --resume.
    assert proc.returncode == EXIT_STOPPED, stderr
    assert "run stopped" in stdout and "stopped before completing" in stderr
    assert _summary(out)["status"] == "stopped" and _summary(out)["rounds_completed"] < LABEL_FLIP["rounds"]
    assert "already holds a stopped run" in _usage_error(capsys, ["run", str(config), "--out", str(out)])
    resumed = arcsim.run("run", str(config), "--out", str(out), "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _summary(out)["status"] == "completed" and _summary(out)["rounds_completed"] == LABEL_FLIP["rounds"]


@pytest.mark.parametrize("engine", ["inproc", "grpc"])
def test_sigterm_stops_a_run_with_status_143(arcsim: Arcsim, tmp_path: Path, engine: str) -> None:
    config = _write_config(tmp_path, "long", LONG)
    out = tmp_path / "out"
    proc = arcsim.start("run", str(config), "--out", str(out), "--no-progress", "--engine", engine)
    _kill_after_rounds(arcsim, proc, out, 3, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    # Resumable: checkpoints, and no summary of a completed run (grpc's coordinator writes "stopped").
    assert any((out / "checkpoints").iterdir())
    assert not (out / "summary.json").exists() or _summary(out)["status"] == "stopped"


# --- ARCSIM_* variables --------------------------------------------------------------------------------------
# Each service's variables: name -> (value, the flag's attribute, the value parsed).
COORDINATOR_ENV = {
    "ARCSIM_CONFIG": ("c.yaml", "config", "c.yaml"),
    "ARCSIM_OUT": ("o", "out", "o"),
    "ARCSIM_HOST": ("0.0.0.0", "host", "0.0.0.0"),
    "ARCSIM_PORT": ("6001", "port", 6001),
    "ARCSIM_METRICS_PORT": ("9464", "metrics_port", 9464),
    "ARCSIM_METRICS_HOST": ("::", "metrics_host", "::"),
    "ARCSIM_RESUME": ("no", "resume", False),
    "ARCSIM_RESUME_IF_PRESENT": ("YES", "resume_if_present", True),
    "ARCSIM_SECRET_FILE": ("s", "secret_file", "s"),
    "ARCSIM_QUORUM": ("5", "quorum", 5),
    "ARCSIM_JOIN_TIMEOUT": ("7.5", "join_timeout", 7.5),
    "ARCSIM_LINGER": ("2", "linger", 2.0),
    "ARCSIM_DEVICE": ("cuda", "device", "cuda"),
    "ARCSIM_LOG_LEVEL": ("DEBUG", "log_level", "debug"),
    "ARCSIM_TLS_SERVER_CERT": ("s.pem", "tls_cert", "s.pem"),
    "ARCSIM_TLS_SERVER_KEY": ("s.key", "tls_key", "s.key"),
    "ARCSIM_TLS_CLIENT_CA": ("ca.pem", "tls_client_ca", "ca.pem"),
}
CLIENT_TLS_ENV = {
    "ARCSIM_TLS_CA": ("ca.pem", "tls_ca", "ca.pem"),
    "ARCSIM_TLS_CLIENT_CERT": ("c.pem", "tls_cert", "c.pem"),
    "ARCSIM_TLS_CLIENT_KEY": ("c.key", "tls_key", "c.key"),
    "ARCSIM_TLS_SERVER_NAME": ("coord", "tls_server_name", "coord"),
}
WORKER_ENV = {
    "ARCSIM_COORDINATOR": ("h:1", "coordinator", "h:1"),
    "ARCSIM_TOKEN_FILE": ("t", "token_file", "t"),
    "ARCSIM_MAX_RETRY_SECONDS": ("9", "max_retry_seconds", 9.0),
    "ARCSIM_METRICS_PORT": ("0", "metrics_port", 0),
    "ARCSIM_METRICS_HOST": ("0.0.0.0", "metrics_host", "0.0.0.0"),
    "ARCSIM_DEVICE": ("cpu", "device", "cpu"),
    "ARCSIM_LOG_LEVEL": ("warning", "log_level", "warning"),
    **CLIENT_TLS_ENV,
}
HEALTH_ENV = {
    "ARCSIM_HEALTH_ADDRESS": ("h:1", "address", "h:1"),
    "ARCSIM_TIMEOUT": ("0.5", "timeout", 0.5),
    **CLIENT_TLS_ENV,
}


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        ("coordinator", COORDINATOR_ENV),
        ("worker", {**WORKER_ENV, "ARCSIM_WORKER_ID": ("auto", "worker_id", ANY_ID)}),
        ("adversary", {**WORKER_ENV, "ARCSIM_WORKER_ID": ("10, 11,auto", "worker_id", [10, 11, ANY_ID])}),
        ("health", HEALTH_ENV),
    ],
)
def test_every_service_flag_falls_back_to_its_variable(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    variables: dict[str, tuple[str, str, object]],
) -> None:
    # Execute
    parsed = _parse([command], monkeypatch, {name: raw for name, (raw, _, _) in variables.items()})
    # Assert: every flag took its variable's value (a flag without one would be missing here or keep
    # its default), and the help names each variable.
    assert parsed == {dest: value for _, dest, value in variables.values()}
    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # as one line: the help wraps anywhere
    for name in variables:
        assert f"env {name}" in help_text, name


def test_a_flag_on_the_command_line_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "ARCSIM_PORT": "6001",
        "ARCSIM_RESUME_IF_PRESENT": "false",
        "ARCSIM_WORKER_ID": "10,11",
        "ARCSIM_CONFIG": "env.yaml",
        "ARCSIM_OUT": "o",
    }
    coordinator = _parse(
        ["coordinator", "--port", "7002", "--resume-if-present", "--config", "flag.yaml"], monkeypatch, env
    )
    assert (coordinator["port"], coordinator["resume_if_present"], coordinator["config"]) == (7002, True, "flag.yaml")
    adversary = _parse(["adversary", "--coordinator", "h:1", "--worker-id", "4"], monkeypatch, env)
    assert adversary["worker_id"] == [4]
    # Unset or empty: the flag's default.
    assert _parse(["coordinator"], monkeypatch, {**env, "ARCSIM_PORT": ""})["port"] == 50051


@pytest.mark.parametrize(
    ("command", "name", "value", "message"),
    [
        (["coordinator"], "ARCSIM_PORT", "fifty", "ARCSIM_PORT='fifty': not a valid int"),
        (
            ["coordinator"],
            "ARCSIM_RESUME_IF_PRESENT",
            "maybe",
            "ARCSIM_RESUME_IF_PRESENT='maybe': expected one of true/1/yes/false/0/no",
        ),
        (["coordinator"], "ARCSIM_LOG_LEVEL", "loud", "ARCSIM_LOG_LEVEL='loud': choose from debug, info"),
        (
            ["adversary", "--coordinator", "h:1"],
            "ARCSIM_WORKER_ID",
            "10,x",
            "ARCSIM_WORKER_ID='10,x': a worker id is a non-negative integer or 'auto', got 'x'",
        ),
        (["worker", "--worker-id", "0"], "ARCSIM_MAX_RETRY_SECONDS", "1m", "ARCSIM_MAX_RETRY_SECONDS='1m'"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    name: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv("ARCSIM_CONFIG", "c.yaml")
    monkeypatch.setenv("ARCSIM_OUT", "o")
    monkeypatch.setenv("ARCSIM_COORDINATOR", "h:1")
    monkeypatch.setenv(name, value)
    assert message in _usage_error(capsys, command)


def test_a_missing_required_flag_names_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARCSIM_CONFIG", raising=False)
    assert "--config is required (or set ARCSIM_CONFIG)" in _usage_error(capsys, ["coordinator", "--out", "o"])


def test_services_configured_by_variables_alone_run_to_the_end(arcsim: Arcsim, tmp_path: Path) -> None:
    # Prepare: every setting of each service in its environment, none on its command line.
    config = _write_config(tmp_path, "alie", {**ALIE, "rounds": 8, "eval_every": 8})
    out = tmp_path / "out"
    base = {**CLEAN_ENV, "ARCSIM_SECRET": "testbed-secret"}
    coordinator = arcsim.start(
        "coordinator",
        env={
            **base,
            "ARCSIM_CONFIG": str(config),
            "ARCSIM_OUT": str(out),
            "ARCSIM_PORT": "0",
            "ARCSIM_JOIN_TIMEOUT": "60",
        },
    )
    _wait_for(out / "coordinator.json", coordinator)
    with socket.socket() as probe:  # a port free right now, for the adversary's /metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    client = {
        **base,
        "ARCSIM_COORDINATOR": f"127.0.0.1:{json.loads((out / 'coordinator.json').read_text())['port']}",
        "ARCSIM_DEVICE": "cpu",
        "ARCSIM_LOG_LEVEL": "warning",
    }
    # Execute
    workers = [arcsim.start("worker", env={**client, "ARCSIM_WORKER_ID": "auto"}) for _ in range(2)]
    adversary = arcsim.start(
        "adversary", env={**client, "ARCSIM_WORKER_ID": "2", "ARCSIM_METRICS_PORT": str(metrics_port)}
    )
    scraped = ""
    while coordinator.poll() is None and not scraped:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
                scraped = reply.read().decode()
        except OSError:
            time.sleep(0.05)
    coordinator.communicate(timeout=120)
    # Assert: the run completed with every vector; the workers logged at the level they were given.
    assert coordinator.returncode == 0
    assert _summary(out)["status"] == "completed" and _summary(out)["rounds_completed"] == 8
    assert all((r["received_honest"], r["received_byzantine"]) == (2, 1) for r in _records(out))
    assert "arcsim_" in scraped
    for proc in (*workers, adversary):
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert '"level": "info"' not in stderr, stderr


def test_service_variables_in_the_shell_do_not_reach_a_launched_run(arcsim: Arcsim, tmp_path: Path) -> None:
    # Prepare: variables an operator might have exported for a container; each would break the run
    # if a launched service read it (wrong credentials, one port for every worker, an invalid level).
    config = _write_config(tmp_path, "alie", {**ALIE, "rounds": 3, "eval_every": 3})
    env = {
        **CLEAN_ENV,
        "ARCSIM_TOKEN_FILE": str(tmp_path / "missing"),
        "ARCSIM_WORKER_ID": "7",
        "ARCSIM_QUORUM": "1",
        "ARCSIM_LOG_LEVEL": "nonsense",
        "ARCSIM_TLS_CA": str(tmp_path / "missing.pem"),
    }
    # Execute
    result = arcsim.run("run", str(config), "--out", str(tmp_path / "out"), "--no-progress", env=env)
    # Assert
    assert result.returncode == 0, result.stderr
    assert all((r["received_honest"], r["received_byzantine"]) == (2, 1) for r in _records(tmp_path / "out"))


# --- the progress line -----------------------------------------------------------------------------------------
def _rate(line: str) -> float:
    found = re.search(r"([0-9.]+) rounds/s", line)
    assert found, line
    return float(found.group(1))


@pytest.mark.parametrize("replayed", [False, True])
def test_the_progress_rate_counts_only_the_rounds_this_process_ran(replayed: bool) -> None:
    # Prepare: a run resumed at round 48 of 50; the grpc launcher first replays the 48 records of
    # rounds.jsonl (and says how many were there), the inproc engine shows only its own.
    stream = io.StringIO()
    before = time.monotonic()
    display = Progress(50, stream=stream, **({"rounds_before": 48} if replayed else {}))
    if replayed:
        for round_ in range(48):
            display.update({"round": round_})
    # Execute: two rounds, at least 0.2 s after the display started.
    time.sleep(0.2)
    display.update({"round": 48})
    display.update({"round": 49})
    elapsed = time.monotonic() - before
    # Assert: 2 rounds over the display's time, which is at least 0.2 s and at most `elapsed`
    # (the 50 rounds of the whole run over it would be above 10 rounds/s within 5 s).
    rate = _rate(stream.getvalue().splitlines()[-1])
    assert 2 / elapsed - 0.01 <= rate <= 2 / 0.2 + 0.01


# --- the README ---------------------------------------------------------------------------------------------
def test_the_readme_documents_every_exit_status_and_service_variable() -> None:
    readme = (REPO / "README.md").read_text()
    codes = readme.partition("### Exit codes")[2].partition("\n### ")[0]
    for code in ("0", "1", "2", str(EXIT_STOPPED), "130", "143"):
        assert re.search(rf"`{code}`", codes), code
    environment = readme.partition("### Environment")[2].partition("\n#")[0]
    for name in build_parser().env_variables():
        assert name in environment, name


def test_the_progress_line_shows_clipped_rows_when_the_clipping_cannot_be_traced_to_workers() -> None:
    # Prepare: a round of `nnm > arc > cwtm` (the clipping stage saw mixtures of rows) and one of `arc > cwtm`
    stream = io.StringIO()
    display = Progress(2, stream=stream)
    # Execute
    display.update({"round": 0, "clipped_honest": None, "clipped_byzantine": None, "clipped_rows": 3})
    display.update({"round": 1, "clipped_honest": 1, "clipped_byzantine": 2, "clipped_rows": 3})
    # Assert
    first, second = stream.getvalue().splitlines()[-2:]
    assert "clipped rows 3" in first and "None" not in first
    assert "clipped h/b 1/2" in second
