"""Service limits against a Byzantine worker that holds a valid token.

A worker's credentials are all a Byzantine worker needs to open streams, so every limit of the
coordinator must hold against one: concurrent submissions, stalled submissions, round and observe
subscriptions, and the gRPC connection itself (keepalive). The flood tests run the coordinator as its
own process (``arcsim coordinator``) and read its resident memory from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from conftest import TEST_SECRET, auth, tiny_values, token
from test_faults import _metrics  # the tests folder is on sys.path (rootdir)

from arcsim.config import from_dict
from arcsim.coordinator.service import Coordinator, CoordinatorSettings, OpenRound
from arcsim.transport import codec, wire
from arcsim.transport.auth import ANY_ID
from arcsim.transport.channels import REASON_METADATA_KEY, grpc_options
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.v1 import coordinator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
# The paper's CNN on 28x28 images (431,080 parameters: 1.7 MB a vector), on data every install has.
FLOOD_CONFIG = {
    "task": "mnist-5k",
    "model": "cnn",
    "partitioner": "iid",
    "num_honest": 3,
    "num_byzantine": 1,
    "attack": "sign_flip",
    "pipeline": "arc > nnm > cwtm",
    "rounds": 1,
    "eval_every": 1,
    "eval_batch_size": 500,
    "batch_size": 8,
    "round_deadline": 60.0,
}
BYZANTINE_ID = 3


def _md(worker_id: int, num_honest: int = 3) -> tuple[tuple[str, str], ...]:
    role = "honest" if worker_id < num_honest else "byzantine"
    return auth(worker_id, role)


def _rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _rejected(metrics: dict, reason: str) -> float:
    return metrics[("arcsim_submissions_rejected_total", (("reason", reason),))]


class CoordinatorProcess:
    """``arcsim coordinator`` in a child process, with its endpoint, a client channel and its memory."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.out = tmp_path / "run"
        env = {**os.environ, "ARCSIM_SECRET": TEST_SECRET, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "arcsim",
                "coordinator",
                "--config",
                str(config_path),
                "--out",
                str(self.out),
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--linger",
                "30",
                "--join-timeout",
                "60",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "coordinator.log", "w"),
        )
        self.log = tmp_path / "coordinator.log"

    async def start(self) -> None:
        endpoint_file = self.out / "coordinator.json"
        for _ in range(1200):
            if endpoint_file.exists():
                break
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            await asyncio.sleep(0.05)
        endpoint = json.loads(endpoint_file.read_text())
        self.address = f"127.0.0.1:{endpoint['port']}"
        self.metrics_port = endpoint["metrics_port"]
        self.channel = grpc.aio.insecure_channel(self.address, options=grpc_options(64 << 20))
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def metrics(self) -> dict:
        return _metrics(self.metrics_port)

    async def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        await self.channel.close()


@pytest.fixture
async def coordinator_process(tmp_path: Path) -> AsyncIterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path, FLOOD_CONFIG)
    try:
        await process.start()
        yield process
    finally:
        await process.close()


async def _join_all(running: CoordinatorProcess, num_workers: int) -> tuple[int, list[Any]]:
    """Join every worker, open each one's Rounds stream and read round 0's parameters: (d, streams)."""
    d = 0
    for i in range(num_workers):
        role = pb.HONEST if i < FLOOD_CONFIG["num_honest"] else pb.BYZANTINE
        d = (await running.stub.Join(pb.JoinRequest(worker_id=i, role=role), metadata=_md(i))).num_parameters
    streams = [
        running.stub.Rounds(pb.RoundsRequest(worker_id=i, from_round=0), metadata=_md(i)) for i in range(num_workers)
    ]
    for stream in streams:
        reader = codec.RoundEventReader(max_bytes=d * 4)
        while not isinstance(reader.feed(await asyncio.wait_for(stream.read(), 60)), codec.RoundParams):
            pass
    return d, streams


async def _sample_peak(pid: int, stop: asyncio.Event) -> int:
    """The process's peak resident memory while ``stop`` is unset (up to its exit)."""
    peak = 0
    while not stop.is_set():
        try:
            peak = max(peak, _rss(pid))
        except (OSError, RuntimeError):  # the process has exited
            break
        await asyncio.sleep(0.02)
    return peak


def _stalling(messages: list[pb.GradientChunk], stall: asyncio.Event, rest: list[pb.GradientChunk] = ()):
    """A request stream that sends ``messages``, stalls until ``stall`` is set, then sends ``rest``."""

    async def requests():
        for message in messages:
            yield message
        await stall.wait()
        for message in rest:
            yield message

    return requests()


@pytest.mark.slow
async def test_a_submission_flood_from_one_byzantine_identity_stays_bounded(coordinator_process) -> None:
    # Prepare: every worker joined and following round 0, the honest vectors in; then one Byzantine
    # identity opens 200 concurrent SubmitGradient streams over 20 connections, each sending its header
    # and a 1 MiB chunk, then stalling.
    running = coordinator_process
    d, _streams = await _join_all(running, 4)
    honest = {i: torch.randn(d, generator=torch.Generator().manual_seed(i)) * 0.01 for i in range(3)}
    for i, v in honest.items():
        reply = await running.stub.SubmitGradient(iter(codec.vector_chunks(v, round=0, worker_id=i)), metadata=_md(i))
        assert reply.accepted
    streams_per_connection, connections = 10, 20
    flood = streams_per_connection * connections
    vector = torch.full((d,), 0.5)
    messages = list(codec.vector_chunks(vector, round=0, worker_id=BYZANTINE_ID, chunk_bytes=1 << 20))[:2]
    channels = [grpc.aio.insecure_channel(running.address, options=grpc_options(64 << 20)) for _ in range(connections)]
    stall, stop = asyncio.Event(), asyncio.Event()
    baseline = _rss(running.process.pid)
    sampler = asyncio.create_task(_sample_peak(running.process.pid, stop))
    # Execute
    calls = [
        pb_grpc.CoordinatorStub(channel).SubmitGradient(_stalling(messages, stall), metadata=_md(BYZANTINE_ID))
        for channel in channels
        for _ in range(streams_per_connection)
    ]
    outcomes = await asyncio.wait_for(asyncio.gather(*(_outcome(call) for call in calls)), 120)
    stop.set()
    peak = await sampler
    # Assert: whichever stream came first was cut as stalled at the round's deadline, the other 199 were
    # refused before anything was read, memory stayed within a small bound, and the round closed with
    # the honest vectors.
    # (A client whose stream is refused while it is still writing its chunk may see gRPC's own INTERNAL
    # instead of the status; the coordinator's counts below are exact.)
    seen = Counter(outcome if outcome[0] != grpc.StatusCode.INTERNAL else "client write cut" for outcome in outcomes)
    assert seen[(grpc.StatusCode.DEADLINE_EXCEEDED, "stalled")] == 1
    assert seen[(grpc.StatusCode.ABORTED, "concurrent_submission")] + seen["client write cut"] == flood - 1
    # Without the limit each stream held a preallocated vector (1.7 MB) and its chunk: about 600 MB here.
    assert peak - baseline < 150 * 2**20, f"coordinator RSS grew by {(peak - baseline) / 2**20:.0f} MiB"
    for _ in range(600):
        if (running.out / "summary.json").exists():
            break
        await asyncio.sleep(0.05)
    record = json.loads((running.out / "rounds.jsonl").read_text().splitlines()[0])
    assert (record["received_honest"], record["received_byzantine"], record["aggregated"]) == (3, 0, True)
    metrics = running.metrics()
    assert _rejected(metrics, "concurrent_submission") == flood - 1
    assert _rejected(metrics, "stalled") == 1
    assert _rejected(metrics, "cancelled") == 0
    stall.set()
    for channel in channels:
        await channel.close()


async def _outcome(call) -> tuple[grpc.StatusCode, str] | str:
    """How a call ended: (status, counted reason) of a refusal, else "accepted"."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        reasons = [value for key, value in (error.trailing_metadata() or ()) if key == REASON_METADATA_KEY]
        return error.code(), reasons[0] if reasons else error.details()
    return "accepted"


@pytest.mark.slow
async def test_subscription_floods_keep_only_the_newest_stream_of_an_identity(coordinator_process) -> None:
    # Prepare: every worker follows round 0; the Byzantine identity opens 200 more Rounds streams and
    # 200 Observe streams that it never reads.
    running = coordinator_process
    d, streams = await _join_all(running, 4)
    baseline = _rss(running.process.pid)
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_peak(running.process.pid, stop))
    channels = [grpc.aio.insecure_channel(running.address, options=grpc_options(64 << 20)) for _ in range(20)]
    # Execute: open them one after another (each replaces the one before)
    rounds_calls, observe_calls = [], []
    for k in range(200):
        stub = pb_grpc.CoordinatorStub(channels[k % len(channels)])
        rounds_calls.append(
            stub.Rounds(pb.RoundsRequest(worker_id=BYZANTINE_ID, from_round=0), metadata=_md(BYZANTINE_ID))
        )
        observe_calls.append(
            stub.Observe(pb.ObserveRequest(worker_id=BYZANTINE_ID, round=0), metadata=_md(BYZANTINE_ID))
        )
        await asyncio.sleep(0.005)
    await asyncio.sleep(2.0)
    stop.set()
    peak = await sampler
    # Assert: every older stream ended ABORTED with the counted reason; the newest Rounds stream still
    # follows the run; one Byzantine stream is counted as connected; memory stayed bounded.
    older = [*rounds_calls[:-1], *observe_calls[:-1], streams[BYZANTINE_ID]]
    outcomes = await asyncio.wait_for(asyncio.gather(*(_drain(call) for call in older)), 60)
    assert set(outcomes) == {(grpc.StatusCode.ABORTED, "subscription_replaced")}
    metrics = running.metrics()
    assert _rejected(metrics, "subscription_replaced") == len(older)
    assert metrics[("arcsim_workers_connected", (("role", "byzantine"),))] == 1
    assert peak - baseline < 150 * 2**20, f"coordinator RSS grew by {(peak - baseline) / 2**20:.0f} MiB"
    newest = rounds_calls[-1]
    reader = codec.RoundEventReader(max_bytes=d * 4)
    assert isinstance(reader.feed(await asyncio.wait_for(newest.read(), 30)), (codec.RoundParams, type(None)))
    for channel in channels:
        await channel.close()


async def _drain(call) -> tuple[grpc.StatusCode, str] | str:
    """Read a server stream to its end: how it ended."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as error:
        reasons = [value for key, value in (error.trailing_metadata() or ()) if key == REASON_METADATA_KEY]
        return error.code(), reasons[0] if reasons else ""
    return "completed"


# --- in-process coordinator: the object itself, for what only it can show -------------------------
TINY = tiny_values(num_honest=2, pipeline="mean", batch_size=8, round_deadline=30.0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Coordinator, pb_grpc.CoordinatorStub]]:
    """A Coordinator object behind a real gRPC server (no run loop: the test drives it)."""
    settings = CoordinatorSettings(config=from_dict(TINY), out_dir=tmp_path, secret=TEST_SECRET)
    coordinator = Coordinator(settings)
    server = grpc.aio.server()
    wire.add_coordinator_to_server(coordinator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(1 << 20))
    try:
        yield coordinator, pb_grpc.CoordinatorStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def _until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _connected(coordinator: Coordinator, role: str = "honest") -> float:
    return coordinator.metrics.connected.labels(role)._value.get()


async def test_a_rounds_stream_cancelled_while_waiting_leaves_no_connected_worker(served) -> None:
    # Prepare: worker 0 joined; the coordinator's condition is held, so a new Rounds stream waits on it
    coordinator, stub = served
    await stub.Join(pb.JoinRequest(worker_id=0, role=pb.HONEST), metadata=_md(0, 2))
    async with coordinator._changed:
        call = stub.Rounds(pb.RoundsRequest(worker_id=0, from_round=0), metadata=_md(0, 2))
        await _until(lambda: _connected(coordinator) == 1)
        # Execute: the client goes away while the stream waits
        call.cancel()
        await asyncio.sleep(0.3)
    # Assert
    await _until(lambda: _connected(coordinator) == 0 and not coordinator.subscribed)


async def test_join_after_the_end_is_refused_before_an_id_is_reserved(served) -> None:
    # Prepare
    coordinator, stub = served
    await coordinator.end("completed")
    requests = [
        (pb.JoinRequest(worker_id=ANY_ID, role=pb.HONEST), auth(ANY_ID)),
        (pb.JoinRequest(worker_id=1, role=pb.HONEST), _md(1, 2)),
    ]
    for request, metadata in requests:
        # Execute
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Join(request, metadata=metadata)
        # Assert
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ended" in caught.value.details()
    assert coordinator._handed_out == {} and coordinator.joined == set()


async def _open_round(
    coordinator: Coordinator, stub: pb_grpc.CoordinatorStub, *, deadline: float
) -> list[pb.GradientChunk]:
    """Worker 0 joined and round 0 open with ``deadline`` seconds: worker 0's vector as small chunks."""
    await stub.Join(pb.JoinRequest(worker_id=0, role=pb.HONEST), metadata=_md(0, 2))
    coordinator._round = OpenRound(0, deadline)
    d = coordinator.state.num_parameters
    return list(codec.vector_chunks(torch.ones(d), round=0, worker_id=0, chunk_bytes=64))


async def test_a_second_concurrent_submission_is_refused_with_its_reason(served) -> None:
    # Prepare: a round is open; worker 0 starts a submission and holds it open
    coordinator, stub = served
    messages = await _open_round(coordinator, stub, deadline=30.0)
    hold = asyncio.Event()
    first = stub.SubmitGradient(_stalling(messages[:1], hold, messages[1:]), metadata=_md(0, 2))
    await _until(lambda: 0 in coordinator._submitting)
    # Execute
    second = await _outcome(stub.SubmitGradient(iter(messages), metadata=_md(0, 2)))
    # Assert: refused, counted; the first one then completes normally
    assert second == (grpc.StatusCode.ABORTED, "concurrent_submission")
    assert coordinator.metrics.rejected.labels("concurrent_submission")._value.get() == 1
    hold.set()
    assert await _outcome(first) == "accepted"
    assert coordinator._submitting == set() and 0 in coordinator._round.vectors


async def test_a_stalled_submission_is_cut_at_its_rounds_deadline(served) -> None:
    # Prepare: a round with a 1 s deadline; worker 0 sends its header and stops
    coordinator, stub = served
    messages = await _open_round(coordinator, stub, deadline=1.0)
    start = time.monotonic()
    # Execute
    outcome = await asyncio.wait_for(
        _outcome(stub.SubmitGradient(_stalling(messages[:1], asyncio.Event()), metadata=_md(0, 2))), 20
    )
    # Assert
    assert outcome == (grpc.StatusCode.DEADLINE_EXCEEDED, "stalled")
    assert time.monotonic() - start < 10
    assert coordinator.metrics.rejected.labels("stalled")._value.get() == 1
    assert coordinator._submitting == set()


@pytest.mark.slow
async def test_a_worker_waiting_minutes_for_its_peers_is_never_disconnected(tmp_path: Path) -> None:
    """Clients ping every 20 s on a stream that waits for data; the server must accept that, not answer
    GOAWAY "too_many_pings" (gRPC's default allows one ping per 5 minutes without data)."""
    # Prepare: a run of 2 workers; worker 0 joins and follows its Rounds stream, worker 1 comes 130 s later
    from arcsim.coordinator.service import serve

    config = from_dict(TINY)
    task = asyncio.create_task(
        serve(CoordinatorSettings(config=config, out_dir=tmp_path, secret=TEST_SECRET, join_timeout=300.0))
    )
    await _until(lambda: (tmp_path / "coordinator.json").exists() or task.done(), 60)
    port = json.loads((tmp_path / "coordinator.json").read_text())["port"]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(1 << 20)) for _ in range(2)]
    stubs = [pb_grpc.CoordinatorStub(channel) for channel in channels]
    try:
        reply = await stubs[0].Join(pb.JoinRequest(worker_id=0, role=pb.HONEST), metadata=_md(0, 2))
        waiting = stubs[0].Rounds(pb.RoundsRequest(worker_id=0, from_round=0), metadata=_md(0, 2))
        # Execute
        await asyncio.sleep(130)
        await stubs[1].Join(pb.JoinRequest(worker_id=1, role=pb.HONEST), metadata=_md(1, 2))
        late = stubs[1].Rounds(pb.RoundsRequest(worker_id=1, from_round=0), metadata=_md(1, 2))
        # Assert: the stream that waited is still the one delivering round 0
        reader = codec.RoundEventReader(max_bytes=reply.num_parameters * 4)
        item = None
        while not isinstance(item, codec.RoundParams):
            item = reader.feed(await asyncio.wait_for(waiting.read(), 30))
        assert item.round == 0
        late.cancel()
    finally:
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - stopped by the test
            pass
        for channel in channels:
            await channel.close()


async def test_a_second_worker_with_the_same_id_takes_over_and_the_first_stops_with_a_clear_error(
    tmp_path: Path,
) -> None:
    # Prepare: a 2-worker run waiting for worker 1; worker 0 follows it
    from arcsim.coordinator.service import serve
    from arcsim.workers.service import HonestParticipant, Session, WorkerSettings

    config = from_dict(TINY)
    task = asyncio.create_task(
        serve(
            CoordinatorSettings(config=config, out_dir=tmp_path, secret=TEST_SECRET, join_timeout=60.0, metrics_port=0)
        )
    )
    await _until(lambda: (tmp_path / "coordinator.json").exists() or task.done(), 60)
    endpoint = json.loads((tmp_path / "coordinator.json").read_text())
    port = endpoint["port"]
    connected = ("arcsim_workers_connected", (("role", "honest"),))
    settings = WorkerSettings(
        coordinator=f"127.0.0.1:{port}", worker_id=0, token=token(0), device="cpu", max_retry_seconds=10
    )
    first = asyncio.create_task(Session(settings, HonestParticipant()).run())
    second = None
    try:
        await _until(lambda: _metrics(endpoint["metrics_port"])[connected] == 1, 30)
        # Execute: a second process with the same id and token joins and follows
        second = asyncio.create_task(Session(settings, HonestParticipant()).run())
        # Assert: the first stops with one clear line, not a retry loop or a gRPC traceback
        with pytest.raises(RuntimeError, match="another process with the same worker id"):
            await asyncio.wait_for(first, 30)
        assert not second.done()
    finally:
        for running in (first, second, task):
            if running is not None and not running.done():
                running.cancel()
            try:
                if running is not None:
                    await running
            except BaseException:  # noqa: BLE001 - stopped by the test
                pass
