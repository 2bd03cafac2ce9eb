"""Fault injection with real processes: ``arcsim coordinator`` and ``arcsim worker`` as OS processes.

Each test starts the services as a user would (``python -m arcsim coordinator|worker``, credentials
through the environment), injects one fault and checks what the run records:

* a worker SIGKILLed with a round open and its vector not sent: that round, and every round until
  the worker is restarted, closes at its deadline without it; the restarted worker rejoins by
  itself and its vectors come back (``rounds.jsonl`` and ``/metrics``);
* the coordinator SIGKILLed with a round open and one of its vectors accepted, the workers left
  running: ``arcsim coordinator --resume`` on the same port, the workers reconnect by themselves,
  and the run ends with the parameters of an uninterrupted run;
* the path to the coordinator dropped again and again (a relay that resets every connection and
  refuses new ones for 0.8 s, four times): each outage gets the worker's full retry budget
  (``max_retry_seconds``) and backoff afresh, and the run ends as an uninterrupted one (this one
  runs the coordinator and the worker in the test's event loop, over real TCP);
* a network partition between hosts (Linux network namespaces, tests/netns.py): one worker's link
  is cut for more than two round deadlines, then restored; another works through a 20 Mbit/s
  shaper. A longer cut (``slow``) lasts until gRPC gives the dead connection up, and the worker
  reconnects by itself once the link is back. Needs root and iproute2 (``ip``, ``tc``); skipped
  with the reason otherwise.

Rounds take a few milliseconds while every worker answers, too short to aim a signal at. To hit
"a round open, this worker's vector not sent", the test first freezes the worker (SIGSTOP): a round
that opens after that cannot get its vector, and ``/metrics`` (vectors accepted) minus
``rounds.jsonl`` (vectors of the closed rounds) says when such a round holds every other vector;
then it sends SIGKILL. Every process is killed at the end of its test, also on failure, and the
tails of their logs are printed when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
import torch
import yaml
from conftest import TEST_SECRET, tiny_values, token
from prometheus_client.parser import text_string_to_metric_families

from arcsim.config import from_dict, load_config
from arcsim.coordinator.service import CoordinatorSettings, serve
from arcsim.engine.inproc import run_inproc
from arcsim.launcher import PARENT_ENV
from arcsim.transport.auth import SECRET_ENV, TOKEN_ENV
from arcsim.workers.service import WorkerSettings, run_worker

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
STARTUP = 180.0  # seconds a service may take to start (imports torch; slow on a loaded 2-core machine)
DEADLINE = 2.0  # round_deadline of the runs where a worker goes missing
HUB_PORT = 50051  # the coordinator's port inside the hub namespace (a private network: nothing else there)

# Rounds of a few milliseconds while every worker answers; enough of them that a fault injected after
# the first few rounds always lands in the middle of the run.
BASE = tiny_values(model="mlp", rounds=100, eval_every=50)
MISSING_WORKER = {**BASE, "num_honest": 3, "round_deadline": DEADLINE}
# Every vector always arrives (the deadline is only a safety net), so the result must not depend on the crash.
COORDINATOR_CRASH = {**BASE, "num_honest": 2, "round_deadline": 60.0}


# --- processes -------------------------------------------------------------------------------------
class Services:
    """``python -m arcsim ...`` service processes of one test, each logging to ``logs/<name>.log``.

    The services get ``$ARCSIM_LAUNCHER_PID`` = this process, so they die with it even if it is
    killed before :meth:`stop_all` runs (arcsim.launcher.follow_parent).
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(
        self, name: str, args: list[str], *, env: dict[str, str], prefix: list[str] | None = None
    ) -> subprocess.Popen:
        if name in self.procs:
            raise ValueError(f"a service named {name!r} was already started")
        base = {k: v for k, v in os.environ.items() if not k.startswith("ARCSIM_")}
        base.update(
            {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
        )
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", "arcsim", *args],
                cwd=REPO,
                env={**base, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs[name] = proc
        return proc

    def coordinator(
        self, name: str, config: Path, out: Path, *extra: str, prefix: list[str] | None = None
    ) -> subprocess.Popen:
        # Round 0 waits for every worker however slowly it starts, so no round goes without one by accident.
        return self.start(
            name,
            ["coordinator", "--config", str(config), "--out", str(out), "--join-timeout", str(2 * STARTUP), *extra],
            env={SECRET_ENV: TEST_SECRET},
            prefix=prefix,
        )

    def worker(self, name: str, worker_id: int, address: str, *, prefix: list[str] | None = None) -> subprocess.Popen:
        return self.start(
            name,
            [
                "worker",
                "--coordinator",
                address,
                "--worker-id",
                str(worker_id),
                "--device",
                "cpu",
                "--max-retry-seconds",
                "120",
            ],
            env={TOKEN_ENV: token(worker_id)},
            prefix=prefix,
        )

    def report(self, lines: int = 12) -> str:
        """Exit status and the last lines of every service's log."""
        parts = []
        for name, proc in self.procs.items():
            path = self.logs / f"{name}.log"
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            status = "running" if proc.poll() is None else f"exit {proc.returncode}"
            parts.append(f"--- {name} (pid {proc.pid}, {status}) ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def wait(
        self,
        condition: Callable[[], Any],
        what: str,
        *,
        timeout: float,
        alive: tuple[subprocess.Popen, ...] = (),
        every: float = 0.01,
    ) -> Any:
        """Poll ``condition`` until it returns a true value (returned); fail with the logs on timeout,
        or as soon as a process in ``alive`` fails (exits with an error)."""
        end = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            for proc in alive:
                if proc.poll():
                    pytest.fail(f"waiting for {what}: pid {proc.pid} failed (exit {proc.returncode})\n{self.report()}")
            if time.monotonic() > end:
                pytest.fail(f"no {what} within {timeout:.0f}s\n{self.report()}")
            time.sleep(every)

    def exit_code(self, proc: subprocess.Popen, timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pid {proc.pid} still running after {timeout:.0f}s\n{self.report()}")

    def stop_all(self) -> None:
        """SIGKILL whatever still runs (a test stops the services it means to stop itself) and reap it."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(timeout=30)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    running = Services(tmp_path / "logs")
    yield running
    print(running.report())  # shown only when the test failed
    running.stop_all()


@pytest.fixture
def loopback_port() -> Iterator[int]:
    """A loopback port held for the whole test, so the workers can be started with the coordinator
    (not after it has bound port 0) and a restarted coordinator finds its port free.

    The holding socket is bound with SO_REUSEPORT and never listens: other programs cannot bind the
    port, gRPC servers (which set SO_REUSEPORT) can, and only a listening socket takes connections.
    """
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


# --- files and metrics ---------------------------------------------------------------------------------
def _write_config(folder: Path, values: dict[str, Any]) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _closed(out: Path) -> int:
    """How many rounds ``rounds.jsonl`` records (cheap enough to poll every few milliseconds)."""
    try:
        return (out / "rounds.jsonl").read_bytes().count(b"}\n")
    except FileNotFoundError:
        return 0


def _records(out: Path) -> list[dict[str, Any]]:
    """The records of ``rounds.jsonl`` (a line still being written is left out)."""
    try:
        text = (out / "rounds.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _endpoint(services: Services, out: Path, coordinator: subprocess.Popen) -> dict[str, Any]:
    """``coordinator.json`` of this coordinator process (a killed one leaves its own behind)."""

    def read() -> dict[str, Any] | None:
        try:
            endpoint = json.loads((out / "coordinator.json").read_text())
        except (OSError, ValueError):
            return None
        return endpoint if endpoint["pid"] == coordinator.pid else None

    return services.wait(read, "coordinator endpoint", timeout=STARTUP, alive=(coordinator,), every=0.05)


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The coordinator's /metrics page as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _honest(metrics: dict, name: str) -> float:
    return metrics[(name, (("role", "honest"),))]


def _open_round_holding(
    services: Services,
    out: Path,
    metrics_port: int,
    vectors: int,
    *,
    since: int = 0,
    steady: float = 0.05,
    alive: tuple[subprocess.Popen, ...],
) -> int:
    """Wait until an open round numbered ``since`` or later holds exactly ``vectors`` accepted honest
    vectors, twice in a row ``steady`` seconds apart with no round closed in between; returns that
    round's number.

    Accepted vectors (``arcsim_submissions_total``) minus those of the closed rounds (``rounds.jsonl``)
    are the open round's. The page is read before the records: a round closing in between makes the
    difference zero or negative, never a false match.
    """

    def holding() -> int | None:
        submitted = _honest(_metrics(metrics_port), "arcsim_submissions_total")
        records = _records(out)
        if len(records) >= since and submitted - sum(r["received_honest"] for r in records) == vectors:
            return len(records)
        return None

    def twice() -> int | None:
        first = holding()
        if first is None:
            return None
        time.sleep(steady)
        return first if holding() == first else None

    return services.wait(twice, f"an open round holding {vectors} vectors", timeout=30, alive=alive)


def _missing_one(received: list[int], *, everyone: int, first: tuple[int, int], back_from: int) -> tuple[int, int]:
    """Check that ``received`` (vectors per round) is ``everyone`` a round, then ``everyone - 1`` from a
    round in ``first`` on, then ``everyone`` again from round ``back_from`` or later to the end;
    returns (first round without the worker, first round with it again)."""
    missing = next((i for i, n in enumerate(received) if n != everyone), None)
    assert missing is not None and first[0] <= missing <= first[1], (first, received)
    back = next((i for i in range(max(back_from, missing), len(received)) if received[i] == everyone), None)
    assert back is not None, f"the worker's vectors never came back: {received}"
    expected = [everyone] * missing + [everyone - 1] * (back - missing) + [everyone] * (len(received) - back)
    assert received == expected, received
    return missing, back


def _freeze(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGSTOP)


# --- a worker dies --------------------------------------------------------------------------------------
def test_a_worker_killed_mid_round_is_left_out_until_it_restarts_and_rejoins(
    services: Services, loopback_port: int, tmp_path: Path
) -> None:
    # Prepare: a coordinator (its metrics kept up after the run for a last scrape) and 3 worker processes.
    config = _write_config(tmp_path, MISSING_WORKER)
    out = tmp_path / "out"
    address = f"127.0.0.1:{loopback_port}"
    coordinator = services.coordinator(
        "coordinator", config, out, "--port", str(loopback_port), "--metrics-port", "0", "--linger", "120"
    )
    workers = [services.worker(f"worker-{i}", i, address) for i in range(3)]
    port = _endpoint(services, out, coordinator)["metrics_port"]
    services.wait(
        lambda: _closed(out) >= 2, "first rounds", timeout=STARTUP, alive=(coordinator, *workers), every=0.002
    )
    assert _honest(_metrics(port), "arcsim_workers_connected") == 3
    # Execute: freeze worker 2, then SIGKILL it while a round that opened after the freeze (so it cannot
    # hold worker 2's vector) holds the vectors of workers 0 and 1 and waits for worker 2's.
    _freeze(workers[2])
    frozen_at = _closed(out)  # the round open at the freeze may still have got worker 2's vector
    killed_round = _open_round_holding(services, out, port, 2, since=frozen_at + 1, alive=(coordinator,))
    workers[2].kill()
    assert workers[2].wait(timeout=10) == -signal.SIGKILL
    # /metrics: its stream is gone at once (the kernel closed its connection) ...
    services.wait(
        lambda: _honest(_metrics(port), "arcsim_workers_connected") == 2,
        "2 connected workers after the kill",
        timeout=30,
        alive=(coordinator,),
    )
    services.wait(lambda: _closed(out) > killed_round, "the killed round's record", timeout=30, alive=(coordinator,))
    restarted_at = _closed(out)  # worker 2 is certainly absent from every round closed so far
    restarted = services.worker("worker-2-restarted", 2, address)
    # ... and back when the restarted worker has joined and follows the rounds again.
    services.wait(
        lambda: _honest(_metrics(port), "arcsim_workers_connected") == 3,
        "3 connected workers after the restart",
        timeout=STARTUP,
        alive=(coordinator, restarted),
        every=0.005,
    )
    services.wait(lambda: (out / "summary.json").exists(), "summary.json", timeout=120, alive=(coordinator,))
    final = _metrics(port)
    coordinator.send_signal(signal.SIGTERM)  # ends the linger
    # Assert: the run completed, and every process that was not killed ended cleanly.
    assert services.exit_code(coordinator, 60) == 0
    for proc in (workers[0], workers[1], restarted):
        assert services.exit_code(proc, 60) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == MISSING_WORKER["rounds"]
    records = _records(out)
    assert [r["round"] for r in records] == list(range(MISSING_WORKER["rounds"]))
    # 3 vectors a round, 2 from the round open at the freeze (or the next one) to a round after the
    # restart, then 3 again to the end; every round without worker 2 closed at its deadline.
    received = [r["received_honest"] for r in records]
    missing, back = _missing_one(received, everyone=3, first=(frozen_at, frozen_at + 1), back_from=restarted_at)
    assert missing <= killed_round < restarted_at <= back < MISSING_WORKER["rounds"]
    for record in records[missing:back]:
        assert record["round_seconds"] >= DEADLINE - 0.05, record
    # Every accepted vector is in a record.
    assert _honest(final, "arcsim_submissions_total") == sum(received)


# --- the coordinator dies ---------------------------------------------------------------------------------
def test_the_coordinator_killed_mid_round_resumes_and_ends_as_an_uninterrupted_run(
    services: Services, loopback_port: int, tmp_path: Path
) -> None:
    # Prepare: the uninterrupted result (the inproc engine gives the grpc engine's parameters,
    # tests/test_run.py), then a coordinator process and 2 worker processes.
    config = _write_config(tmp_path, COORDINATOR_CRASH)
    expected = run_inproc(load_config(config), tmp_path / "uninterrupted")
    out = tmp_path / "out"
    address = f"127.0.0.1:{loopback_port}"
    first = services.coordinator("coordinator", config, out, "--port", str(loopback_port), "--metrics-port", "0")
    workers = [services.worker(f"worker-{i}", i, address) for i in range(2)]
    metrics_port = _endpoint(services, out, first)["metrics_port"]
    services.wait(lambda: _closed(out) >= 3, "first rounds", timeout=STARTUP, alive=(first, *workers), every=0.002)
    # Execute: freeze worker 1, then SIGKILL the coordinator while the open round holds worker 0's vector:
    # accepted, not applied, so worker 0's own momentum is a step ahead of the coordinator's last
    # checkpoint. (The round open at the freeze may hold worker 1's vector instead, until worker 0's
    # arrives and closes it: hence a steady 0.3 s. Were worker 0 lagging longer than that, the crash
    # would come with worker 1's vector in instead; the result must be the same either way.)
    _freeze(workers[1])
    crashed_round = _open_round_holding(services, out, metrics_port, 1, steady=0.3, alive=(first,))
    first.kill()
    assert first.wait(timeout=10) == -signal.SIGKILL
    os.kill(workers[1].pid, signal.SIGCONT)
    assert not (out / "summary.json").exists()
    assert crashed_round <= _closed(out) < COORDINATOR_CRASH["rounds"]
    second = services.coordinator("coordinator-resumed", config, out, "--port", str(loopback_port), "--resume")
    # Assert: the workers reconnected by themselves, the run completed as if nothing had happened.
    records = _finish(services, out, second, workers, COORDINATOR_CRASH["rounds"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_params_sha256"] == expected["final_params_sha256"]
    assert all(r["received_honest"] == 2 for r in records)
    logs = (services.logs / "worker-0.log").read_text()
    assert "coordinator unreachable" in logs  # it went through the retry path, not a lucky timing


# --- the path to the coordinator drops, again and again --------------------------------------------------
class Relay:
    """A TCP relay in front of the coordinator that the test can take down, as a load balancer or a
    NAT gateway that restarts would be: :meth:`drop` resets every relayed connection and refuses new
    ones until :meth:`restore`. Bytes are passed on unchanged."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.resets = 0  # relayed connections reset by drop()
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task] = set()

    async def restore(self) -> int:
        """Listen (again, on the same port once one was bound); returns the port."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def drop(self) -> None:
        """Stop listening (connection refused) and reset every connection (RST to both ends)."""
        self._server.close()
        for downstream, upstream in list(self._links):
            downstream.transport.abort()
            upstream.transport.abort()
            self.resets += 1
        self._links.clear()

    async def close(self) -> None:
        """Drop everything and wait for the relaying tasks to end."""
        if self._server is not None and self._server.is_serving():
            await self.drop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._tasks.difference_update(pipes)
        self._links.discard(link)
        for end in link:
            end.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()


async def test_a_worker_gets_a_fresh_retry_budget_for_each_outage(tmp_path: Path) -> None:
    # Prepare: a coordinator (in this process) and a worker that reaches it through a relay; the worker
    # gives up after 2 s without reaching the coordinator. One worker, a long deadline: every round
    # waits for its vector, so the result must be the uninterrupted one.
    config = from_dict(
        {**BASE, "model": "logreg", "num_honest": 1, "rounds": 30, "eval_every": 10, "round_deadline": 60.0}
    )
    out = tmp_path / "out"
    out.mkdir()
    coordinator = asyncio.create_task(serve(CoordinatorSettings(config=config, out_dir=out, secret=TEST_SECRET)))
    relay = Relay(0)
    worker: asyncio.Task | None = None
    try:
        for _ in range(3000):
            if (out / "coordinator.json").exists() or coordinator.done():
                break
            await asyncio.sleep(0.01)
        if coordinator.done():
            coordinator.result()  # raises the coordinator's error
        relay.upstream_port = json.loads((out / "coordinator.json").read_text())["port"]
        await relay.restore()
        worker = asyncio.create_task(
            run_worker(
                WorkerSettings(
                    coordinator=f"127.0.0.1:{relay.port}",
                    worker_id=0,
                    token=token(0),
                    device="cpu",
                    max_retry_seconds=2.0,
                )
            )
        )
        # Execute: 4 outages of 0.8 s, 5 rounds apart. Each is well within the budget; together they are
        # not: the worker sleeps about 0.2 + 0.4 + 0.8 s (backoff with jitter) before it is back each time.
        for outage in range(1, 5):
            for _ in range(6000):
                if _closed(out) >= 5 * outage or worker.done() or coordinator.done():
                    break
                await asyncio.sleep(0.01)
            assert not worker.done(), f"the worker gave up before outage {outage}: {worker.exception()!r}"
            await relay.drop()
            await asyncio.sleep(0.8)
            await relay.restore()
        done, _ = await asyncio.wait({coordinator, worker}, timeout=120, return_when=asyncio.FIRST_EXCEPTION)
        assert worker in done, "the worker did not finish within 120 s"
        reason = worker.result()  # raises the worker's error if it gave up
        assert coordinator in done, "the coordinator did not finish within 120 s"
        summary = coordinator.result()
    finally:
        for task in (coordinator, worker):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (coordinator, worker) if t is not None), return_exceptions=True)
        await relay.close()
    # Assert: every outage cut the worker's connection; it came back each time, and the run ended as an
    # uninterrupted one does.
    assert relay.resets >= 4
    assert reason == "completed" and summary["rounds_completed"] == 30
    assert all(r["received_honest"] == 1 for r in _records(out))
    assert summary["final_params_sha256"] == run_inproc(config, tmp_path / "inproc")["final_params_sha256"]


# --- a network partition between hosts --------------------------------------------------------------------
@pytest.fixture
def star(services: Services) -> Iterator[netns.Star]:
    """A hub namespace for the coordinator and one namespace per worker (tests/netns.py)."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"needs root and ip/tc (iproute2) to make network namespaces: {reason}")
    netns.remove_stale()
    topology = netns.Star(3, tag="partition")
    yield topology
    services.stop_all()  # nothing may still run inside a namespace when it is deleted
    failed = topology.close()
    left = [name for name in netns.ours() if name.startswith(f"{netns.PREFIX}-{os.getpid()}-")]
    assert not failed and not left, f"namespaces left behind: {failed or left}"


def _run_in_star(
    star: netns.Star, services: Services, config: Path, out: Path
) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    """The coordinator in the hub namespace and worker i in spoke i, all started at once."""
    coordinator = services.coordinator(
        "coordinator", config, out, "--host", "0.0.0.0", "--port", str(HUB_PORT), prefix=star.exec_prefix(star.hub)
    )
    workers = [
        services.worker(
            f"worker-{i}", i, f"{star.hub_address(i)}:{HUB_PORT}", prefix=star.exec_prefix(star.spoke_names[i])
        )
        for i in range(star.spokes)
    ]
    return coordinator, workers


def _finish(
    services: Services, out: Path, coordinator: subprocess.Popen, workers: list[subprocess.Popen], rounds: int
) -> list[dict[str, Any]]:
    """Wait for the run to complete with every process ending cleanly; returns its records."""
    services.wait(
        lambda: coordinator.poll() is not None,
        "the end of the run",
        timeout=STARTUP,
        alive=(coordinator, *workers),
        every=0.05,
    )
    assert coordinator.returncode == 0
    for proc in workers:
        assert services.exit_code(proc, 60) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    records = _records(out)
    assert [r["round"] for r in records] == list(range(rounds))
    return records


def _unreachable(services: Services, name: str) -> int:
    """How many times service ``name`` logged that it could not reach the coordinator."""
    return (services.logs / f"{name}.log").read_text().count("coordinator unreachable")


def _joins(services: Services, worker_id: int) -> int:
    """How many times the coordinator logged a Join of ``worker_id``."""
    text = (services.logs / "coordinator.log").read_text()
    return text.count(f'"event": "join", "worker_id": {worker_id},')


def test_a_partitioned_worker_misses_the_rounds_of_the_cut_and_a_shaped_one_keeps_up(
    star: netns.Star, services: Services, tmp_path: Path
) -> None:
    # Prepare: worker 1's link shaped to 20 Mbit/s both ways (a vector is 60 kB: about 24 ms on that link).
    config = _write_config(tmp_path, MISSING_WORKER)
    out = tmp_path / "out"
    star.limit(1, "20mbit")
    coordinator, workers = _run_in_star(star, services, config, out)
    everyone = (coordinator, *workers)
    services.wait(lambda: _closed(out) >= 3, "first rounds", timeout=STARTUP, alive=everyone, every=0.002)
    # Execute: cut worker 0 off until two rounds have opened and closed without it, then restore its link.
    star.cut(0)
    cut_at = _closed(out)  # the round open at the cut may still have got worker 0's vector
    services.wait(lambda: _closed(out) >= cut_at + 3, "rounds during the cut", timeout=60, alive=everyone, every=0.05)
    restored_at = _closed(out)  # rounds cut_at + 1 .. restored_at - 1 opened and closed during the cut
    star.restore(0)
    # Assert: the run completes, every worker ends cleanly. 3 vectors a round (the shaped worker's among
    # them), 2 from the round open at the cut (or the next one) to the restore or a little later (TCP
    # retransmits after its backoff), then 3 to the end; every round without worker 0 closed at its deadline.
    records = _finish(services, out, coordinator, workers, MISSING_WORKER["rounds"])
    received = [r["received_honest"] for r in records]
    missing, back = _missing_one(received, everyone=3, first=(cut_at, cut_at + 1), back_from=restored_at)
    assert restored_at - (cut_at + 1) >= 2  # rounds that opened and closed during the cut
    for record in records[missing:back]:
        assert record["round_seconds"] >= DEADLINE - 0.05, record
    # The shaper was on the path and held packets back: worker 1 sent at least a vector a round through it.
    shaped = star.shaped(1)
    vector_bytes = 4 * json.loads((out / "summary.json").read_text())["num_parameters"]
    assert shaped["bytes"] >= vector_bytes * received.count(3), shaped
    assert shaped["overlimits"] > 0, shaped


@pytest.mark.slow
def test_a_worker_partitioned_until_its_connection_times_out_reconnects_by_itself(
    star: netns.Star, services: Services, tmp_path: Path
) -> None:
    # Prepare
    config = _write_config(tmp_path, MISSING_WORKER)
    out = tmp_path / "out"
    coordinator, workers = _run_in_star(star, services, config, out)
    everyone = (coordinator, *workers)
    services.wait(lambda: _closed(out) >= 3, "first rounds", timeout=STARTUP, alive=everyone, every=0.002)
    assert _joins(services, 0) == 1
    # Execute: keep worker 0 cut off until gRPC gives its connection up (keepalive: about 10 to 30 s) and
    # a reconnection attempt has failed too, then restore the link.
    before = _unreachable(services, "worker-0")  # a worker started before the coordinator listened logs some
    star.cut(0)
    cut_at = _closed(out)
    services.wait(
        lambda: _unreachable(services, "worker-0") >= before + 2,
        "worker 0 noticing the partition",
        timeout=90,
        alive=everyone,
        every=0.1,
    )
    restored_at = _closed(out)
    star.restore(0)
    # Assert: worker 0 joined again by itself and its vectors came back; the run completed.
    records = _finish(services, out, coordinator, workers, MISSING_WORKER["rounds"])
    assert _joins(services, 0) == 2
    received = [r["received_honest"] for r in records]
    missing, back = _missing_one(received, everyone=3, first=(cut_at, cut_at + 1), back_from=restored_at)
    for record in records[missing:back]:
        assert record["round_seconds"] >= DEADLINE - 0.05, record
