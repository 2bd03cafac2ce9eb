"""``arcsim run --engine grpc``: the coordinator, the workers and the adversaries as OS processes.

The coordinator binds a free loopback port and writes it to ``DIR/coordinator.json``; the launcher
then starts one process per honest worker and one adversary process holding every Byzantine id
(they collude: one observation and one crafted matrix per round), with their own credentials
(derived from a fresh run secret, passed through the environment), follows ``DIR/rounds.jsonl`` for the
progress display, and stops every child it started on exit, Ctrl-C or SIGTERM. The children get
every flag on their command line: the ``ARCSIM_*`` variables the services would read as flags
(arcsim.flags) are kept out of their environment, so a variable meant for a container does not
reach a launched run.

The children run in their own sessions, so a terminal's Ctrl-C reaches the launcher alone, which
then stops each child once (a coordinator that got the terminal's SIGINT and then the launcher's
SIGTERM would take the second signal as "exit at once"). A child also stops when the launcher
dies without cleaning up (SIGKILL, a crash): :func:`follow_parent`, called by the service
commands, ties its life to the launcher's, so no service runs on unattended.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arcsim.progress import Progress
from arcsim.transport.auth import SECRET_ENV, TOKEN_ENV, new_secret, worker_token

if TYPE_CHECKING:  # arcsim.config imports torch; the service commands import this module before they need it
    from arcsim.config import RunConfig


PARENT_ENV = "ARCSIM_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class LaunchError(RuntimeError):
    """A service failed to start or died; the message says which and points at its log."""


class Stopped(KeyboardInterrupt):
    """A signal asked the run to stop. A KeyboardInterrupt, so that everything that cleans up after
    Ctrl-C (stopping children, checkpointing the last rounds) does so for SIGTERM too; ``signum``
    gives the exit status (128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Stopped` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def follow_parent() -> None:
    """In a service started by the launcher: get SIGTERM when the launcher dies.

    Does nothing unless ``$ARCSIM_LAUNCHER_PID`` is set. On Linux the kernel sends the signal
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread checks the parent id every second.
    If the launcher is already gone, the signal is sent at once. SIGTERM then stops the service as
    it would under any supervisor (the coordinator stops at its last checkpoint, see
    arcsim/coordinator/service.py).
    """
    value = os.environ.get(PARENT_ENV)
    if not value:
        return
    parent = int(value)
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="arcsim-follow-parent", daemon=True).start()


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    from arcsim.cli import service_env_variables

    # The launcher decides every service flag; a service variable set for a container (say
    # ARCSIM_METRICS_PORT) would otherwise give every launched worker the same port.
    drop = service_env_variables()
    env = {name: value for name, value in os.environ.items() if name not in drop}
    # One torch thread per process: parallelism comes from processes (2-core machines oversubscribe
    # badly), and equal thread counts give bitwise-equal results across engines.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())})
    env.update(extra)
    return env


def run_grpc(
    config_path: Path,
    config: RunConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    metrics_port: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    startup_timeout: float = 120.0,
    track: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ``config`` (read by the services from ``config_path``) with the gRPC engine into ``out_dir``.

    ``track``: per-round sinks (arcsim.tracking), fed from the records the coordinator appends to
    rounds.jsonl during this run (those of earlier runs that --resume keeps are not logged again).
    """
    from arcsim.tracking import RoundTrackers

    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    endpoint_file = out_dir / "coordinator.json"
    endpoint_file.unlink(missing_ok=True)
    secret = new_secret()
    python = [sys.executable, "-m", "arcsim"]
    children: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log_file = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            python + args,
            env=_child_env(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log_file.close()
        children.append((name, proc))
        return proc

    coordinator_args = [
        "coordinator",
        "--config",
        str(config_path),
        "--out",
        str(out_dir),
        "--port",
        "0",
        "--host",
        "127.0.0.1",
    ]
    if metrics_port is not None:
        coordinator_args += ["--metrics-port", str(metrics_port)]
    if resume:
        coordinator_args.append("--resume")
    display: Progress | None = None
    # SIGTERM stops like Ctrl-C: the finally below stops every child first.
    with stop_on_sigterm(), RoundTrackers(track, config=config, out_dir=out_dir, engine="grpc") as sinks:
        try:
            coordinator = start("coordinator", coordinator_args, {SECRET_ENV: secret})
            deadline = time.monotonic() + startup_timeout
            while not endpoint_file.exists():
                if coordinator.poll() is not None:
                    raise LaunchError(_died("coordinator", logs))
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"the coordinator did not start within {startup_timeout:.0f}s; see {logs}/coordinator.log"
                    )
                time.sleep(0.05)
            endpoint = json.loads(endpoint_file.read_text())
            address = f"127.0.0.1:{endpoint['port']}"
            # The coordinator has loaded its checkpoint (it writes the endpoint after): the records in
            # rounds.jsonl now are the rounds done before, which the display's rate and the trackers leave out.
            rounds_before = _records_in(out_dir / "rounds.jsonl")
            if progress:
                display = Progress(config.rounds, rounds_before=rounds_before)
            for worker_id in range(config.num_honest):
                start(
                    f"worker-{worker_id}",
                    ["worker", "--coordinator", address, "--worker-id", str(worker_id), "--device", device],
                    {TOKEN_ENV: worker_token(secret, "honest", worker_id)},
                )
            byzantine = list(range(config.num_honest, config.num_workers))
            if byzantine:
                # One process for all the Byzantine ids: they collude, so it observes and crafts once a round.
                args = ["adversary", "--coordinator", address, "--device", device]
                for worker_id in byzantine:
                    args += ["--worker-id", str(worker_id)]
                start(
                    "adversary",
                    args,
                    {TOKEN_ENV: ",".join(worker_token(secret, "byzantine", worker_id) for worker_id in byzantine)},
                )

            def on_record(index: int, record: dict[str, Any]) -> None:
                if display is not None:
                    display.update(record)
                if index >= rounds_before:
                    sinks.log_round(record)

            _follow(coordinator, children, out_dir, on_record)
            if coordinator.returncode != 0:
                raise LaunchError(_died("coordinator", logs))
            for _, proc in children[1:]:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.terminate()
            summary = json.loads((out_dir / "summary.json").read_text())
            sinks.finish(summary)
            return summary
        finally:
            if display is not None:
                display.close()
            _stop_all(children)


def _records_in(rounds_file: Path) -> int:
    """Complete records in rounds.jsonl (0 when there is none)."""
    try:
        return sum(1 for line in rounds_file.read_text().splitlines() if line.strip().endswith("}"))
    except FileNotFoundError:
        return 0


def _follow(
    coordinator: subprocess.Popen, children: list, out_dir: Path, on_record: Callable[[int, dict[str, Any]], None]
) -> None:
    """Pass each record of rounds.jsonl, with its line number, to ``on_record`` until the coordinator
    exits; fail fast if a worker dies badly."""
    rounds_file = out_dir / "rounds.jsonl"
    position = 0
    index = 0
    pending = ""
    while True:
        finished = coordinator.poll() is not None
        if rounds_file.exists():
            with open(rounds_file) as handle:
                handle.seek(position)
                pending += handle.read()
                position = handle.tell()
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    on_record(index, json.loads(line))
                    index += 1
        if finished:
            return
        for name, proc in children[1:]:
            code = proc.poll()
            if code not in (None, 0):
                raise LaunchError(_died(name, out_dir / "logs"))
        time.sleep(0.1)


def _died(name: str, logs: Path) -> str:
    log_path = logs / f"{name}.log"
    tail = ""
    if log_path.exists():
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        tail = lines[-1].removeprefix("arcsim: error: ") if lines else ""
    return f"{name} exited: {tail or 'no output'} (log: {log_path})"


def _stop_all(children: list) -> None:
    for _, proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + 10
    for _, proc in children:
        try:
            proc.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
