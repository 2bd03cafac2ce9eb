"""schedule: async on the gRPC engine: the coordinator's buffer over the wire, arrivals.jsonl and ``arcsim replay``.

The protocol checks talk to a coordinator served in this process with raw stubs (what a remote worker
sees); the end-to-end checks run ``arcsim run --engine grpc`` with its processes and then ``arcsim replay``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import TEST_SECRET, auth, tiny_values

from arcsim.cli import main
from arcsim.config import RunConfig, from_dict
from arcsim.coordinator.service import CoordinatorSettings, serve
from arcsim.schedule import read_arrivals
from arcsim.transport import codec
from arcsim.transport.channels import REASON_METADATA_KEY, grpc_options
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.v1 import coordinator_pb2_grpc as pb_grpc

torch.set_num_threads(1)


def _async_values(**changes: Any) -> dict[str, Any]:
    values = {
        "num_honest": 3,
        "num_byzantine": 1,
        "attack": "alie",
        "pipeline": "nnm > cwtm",
        "rounds": 3,
        "schedule": "async",
        "async": {"buffer_size": 2, "staleness_bound": 0, "window_f": 0},
    }
    return tiny_values(**{**values, **changes})


# --- the coordinator over the wire ---------------------------------------------------------------------
@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Callable[[RunConfig], Awaitable[Any]]]:
    """``await coordinator(config)``: (stub, out_dir, task) of a coordinator served by this test's loop."""
    started: list[tuple[asyncio.Task, grpc.aio.Channel]] = []

    async def _start(config: RunConfig) -> tuple[pb_grpc.CoordinatorStub, Path, asyncio.Task]:
        out = tmp_path / f"run{len(started)}"
        out.mkdir()
        task = asyncio.create_task(
            serve(CoordinatorSettings(config=config, out_dir=out, secret=TEST_SECRET, join_timeout=0.5))
        )
        for _ in range(3000):
            if (out / "coordinator.json").exists() or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        port = json.loads((out / "coordinator.json").read_text())["port"]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(64 << 20))
        started.append((task, channel))
        return pb_grpc.CoordinatorStub(channel), out, task

    yield _start
    for task, channel in started:
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - cancelled; the test reports its own failure
            pass
        await channel.close()


def _md(config: RunConfig, worker_id: int) -> Any:
    return auth(worker_id, "honest" if worker_id < config.num_honest else "byzantine")


async def _submit(stub, config: RunConfig, worker_id: int, vector: torch.Tensor, *, version: int, step: int = 0):
    messages = list(codec.vector_chunks(vector, round=version, worker_id=worker_id))
    messages[0].step = step
    return await stub.SubmitGradient(iter(messages), metadata=_md(config, worker_id))


async def _refusal(awaitable) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    reason = dict(caught.value.trailing_metadata() or ()).get(REASON_METADATA_KEY)
    return caught.value.code(), reason


async def _observe(stub, config: RunConfig, worker_id: int, version: int) -> list[codec.ObservedTensor]:
    reader = codec.ObserveEventReader(max_bytes=1 << 20)
    out = []
    request = pb.ObserveRequest(worker_id=worker_id, round=version)
    async for event in stub.Observe(request, metadata=_md(config, worker_id)):
        item = reader.feed(event)
        if item is not None:
            out.append(item)
    return out


async def _momentum(stub, config: RunConfig, worker_id: int) -> torch.Tensor | None:
    reader = codec.ObserveEventReader(max_bytes=1 << 20)
    found = None
    request = pb.FetchMomentumRequest(worker_id=worker_id)
    async for event in stub.FetchMomentum(request, metadata=_md(config, worker_id)):
        item = reader.feed(event)
        if item is not None:
            found = item.vector
    return found


async def _next_version(call, reader: codec.RoundEventReader) -> int:
    while True:
        event = await asyncio.wait_for(call.read(), 30)
        item = reader.feed(event)
        if isinstance(item, codec.RoundParams):
            return item.round


async def test_the_coordinator_buffers_refuses_stale_and_future_vectors_and_logs_every_arrival(coordinator) -> None:
    # Prepare: K = 2 vectors per update, no staleness allowed; every worker joined, worker 0 follows the versions.
    config = from_dict(_async_values())
    stub, out, _ = await coordinator(config)
    d = 0
    for worker_id in range(config.num_workers):
        role = pb.HONEST if worker_id < config.num_honest else pb.BYZANTINE
        reply = await stub.Join(pb.JoinRequest(worker_id=worker_id, role=role), metadata=_md(config, worker_id))
        d = reply.num_parameters
    versions = stub.Rounds(pb.RoundsRequest(worker_id=0, from_round=0), metadata=_md(config, 0))
    reader = codec.RoundEventReader(max_bytes=d * 4)
    assert await _next_version(versions, reader) == 0
    g = torch.Generator().manual_seed(0)
    first, again, second, late = (torch.randn(d, generator=g) for _ in range(4))

    # Act + assert: worker 0 twice (its second vector replaces its first), adversary 3 observes it with its seq.
    assert (await _submit(stub, config, 0, first, version=0)).message == "accepted"
    assert (await _submit(stub, config, 0, again, version=0, step=1)).message == "replaced"
    observed = await _observe(stub, config, 3, 0)
    assert [(o.worker_id, o.seq) for o in observed] == [(0, 1)] and torch.equal(observed[0].vector, again)
    assert await _refusal(_submit(stub, config, 1, second, version=1)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "future_round",
    )
    # Worker 1 fills the buffer: update 0, version 1 announced.
    await _submit(stub, config, 1, second, version=0)
    assert await _next_version(versions, reader) == 1
    # A vector on version 0 is now stale (S = 0): refused, logged, and it is worker 2's momentum all the same.
    assert await _refusal(_submit(stub, config, 2, late, version=0)) == (grpc.StatusCode.FAILED_PRECONDITION, "stale")
    assert torch.equal(await _momentum(stub, config, 2), late)
    nan = torch.full((d,), float("nan"))
    assert await _refusal(_submit(stub, config, 1, nan, version=1)) == (grpc.StatusCode.INVALID_ARGUMENT, "non_finite")
    # The buffer holds no honest vector: Observe answers with the last window's, and only at the newest version.
    assert [(o.worker_id, o.seq) for o in await _observe(stub, config, 3, 1)] == [(0, 1), (1, 2)]
    assert (await _refusal(_observe(stub, config, 3, 0)))[0] == grpc.StatusCode.FAILED_PRECONDITION

    events = read_arrivals(out / "arrivals.jsonl")
    assert events[0]["config_digest"] == config.digest()
    assert [(e["event"], e.get("worker"), e.get("outcome")) for e in events[1:]] == [
        ("arrival", 0, "accepted"),
        ("arrival", 0, "replaced"),
        ("arrival", 1, "accepted"),
        ("update", None, None),
        ("arrival", 2, "stale"),
        ("arrival", 1, "non_finite"),
    ]
    assert events[2]["step"] == 1 and events[4]["seqs"] == [1, 2] and events[5]["at"] == 1
    assert events[4]["window"]["workers"] == [0, 1] and events[4]["window"]["closed"] == "full"
    versions.cancel()


def test_held_attackers_wait_for_the_window_they_fill_together(tmp_path: Path) -> None:
    # Prepare: 2 attackers faster than the honest workers, holding their vectors (K = 5 of 6 honest + 2).
    values = tiny_values(
        num_honest=6,
        num_byzantine=2,
        attack="alie",
        pipeline="arc > nnm > cwtm",
        rounds=8,
        eval_every=4,
        round_deadline=20.0,
        schedule="async",
        speeds={
            "honest": {"distribution": "lognormal", "median": 0.05, "sigma": 0.5},
            "byzantine": {"distribution": "constant", "seconds": 0.01},
        },
        **{"async": {"buffer_size": 5, "staleness_bound": 3, "byzantine_timing": "hold"}},
    )
    path = tmp_path / "hold.yaml"
    path.write_text(from_dict(values).to_yaml())

    # Act
    assert main(["run", str(path), "--engine", "grpc", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["replay", str(tmp_path / "run"), "--out", str(tmp_path / "replay")]) == 0

    # Assert: every crafted vector was crafted from a window holding K - 2 honest vectors (the attackers waited
    # until, together, they filled it), attackers are in windows, and the replay ends on the run's parameters.
    events = read_arrivals(tmp_path / "run" / "arrivals.jsonl")
    crafted = [e for e in events if e["event"] == "arrival" and e["worker"] >= 6]
    assert crafted and all(len(e["observed"]["seqs"]) >= 3 for e in crafted)
    windows = _windows(tmp_path / "run")
    assert any(w["workers"][-2:] == [6, 7] for w in windows)
    assert all(len(w["workers"]) == 5 and w["closed"] == "full" for w in windows)  # never more than K


# --- whole runs with the services as processes, and their replays --------------------------------------------
SLOW_SECONDS = 600.0


@pytest.fixture(scope="module")
def grpc_async_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An async grpc run of 4 honest workers (worker 0 takes SLOW_SECONDS per step) and an ALIE adversary."""
    root = tmp_path_factory.mktemp("async-grpc")
    trace = root / "honest.txt"
    trace.write_text(f"{SLOW_SECONDS}\n0.02 0.05\n0.03\n0.04 0.01 0.02\n")
    values = tiny_values(
        num_honest=4,
        num_byzantine=1,
        attack="alie",
        pipeline="arc > nnm > cwtm",
        rounds=12,
        eval_every=4,
        round_deadline=20.0,
        schedule="async",
        speeds={
            "honest": {"distribution": "trace", "file": str(trace)},
            "byzantine": {"distribution": "constant", "seconds": 0.03},
        },
        **{"async": {"buffer_size": 3, "staleness_bound": 2}},
    )
    path = root / "async.yaml"
    path.write_text(from_dict(values).to_yaml())
    out = root / "run"
    assert main(["run", str(path), "--engine", "grpc", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def _arrived_after_update(path: Path, update: int) -> bool:
    """Whether arrivals.jsonl holds an arrival after update ``update``'s line."""
    lines = path.read_text().splitlines() if path.exists() else []
    events = [json.loads(line) for line in lines[:-1]]  # the last line may be half written
    updates = [i for i, e in enumerate(events) if e["event"] == "update" and e["round"] == update]
    return bool(updates) and any(e["event"] == "arrival" for e in events[updates[0] + 1 :])


def _windows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line)["window"] for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_a_grpc_async_run_with_a_very_slow_worker_completes(grpc_async_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = grpc_async_run
    assert summary["status"] == "completed" and summary["rounds_completed"] == 12
    windows = _windows(out)
    # The straggler is in no window (its first step outlasts the run), every window is full without it, no
    # worker is twice in a window, and no vector older than the bound is aggregated.
    assert all(0 not in w["workers"] for w in windows)
    assert all(w["closed"] == "full" and len(set(w["workers"])) == len(w["workers"]) == 3 for w in windows)
    assert all(max(w["staleness"]) <= 2 for w in windows)
    # arrivals.jsonl agrees with rounds.jsonl: each update takes the last taken arrival of each worker in it.
    events = read_arrivals(out / "arrivals.jsonl")
    arrivals = {e["seq"]: e for e in events if e["event"] == "arrival"}
    updates = [e for e in events if e["event"] == "update"]
    assert [u["window"] for u in updates] == windows
    for update in updates:
        taken = [arrivals[s] for s in update["seqs"]]
        assert [a["worker"] for a in taken] == update["window"]["workers"]
        assert all(a["outcome"] in ("accepted", "replaced") for a in taken)
        assert [a["at"] - a["version"] for a in taken] == update["window"]["staleness"]
    assert all(a["observed"]["seqs"] for a in arrivals.values() if a["worker"] == 4)


def test_arcsim_replay_of_a_grpc_async_run_ends_on_its_parameters(
    grpc_async_run: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = grpc_async_run
    assert main(["replay", str(out), "--out", str(tmp_path / "replay")]) == 0
    replayed = json.loads((tmp_path / "replay" / "summary.json").read_text())
    assert replayed["final_params_sha256"] == summary["final_params_sha256"]
    assert replayed["engine"] == "replay" and "same final parameters" in capsys.readouterr().out
    assert _windows(tmp_path / "replay") == _windows(out)


def test_a_replay_under_another_defence_keeps_the_schedule(
    grpc_async_run: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = grpc_async_run
    assert main(["replay", str(out), "--out", str(tmp_path / "cwmed"), "--set", "pipeline=nnm > cwmed"]) == 0
    replayed = json.loads((tmp_path / "cwmed" / "summary.json").read_text())
    assert replayed["final_params_sha256"] != summary["final_params_sha256"]
    assert [w["workers"] for w in _windows(tmp_path / "cwmed")] == [w["workers"] for w in _windows(out)]
    # What fixes the schedule cannot change, and a run without an arrival log is no replay's input.
    capsys.readouterr()
    assert main(["replay", str(out), "--out", str(tmp_path / "k"), "--set", "num_byzantine=0"]) == 2
    assert "cannot change what the log fixes" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "cwmed"), "--out", str(tmp_path / "again")]) == 2
    assert "has no arrivals.jsonl" in capsys.readouterr().err


async def test_a_grpc_async_run_stopped_and_resumed_replays_to_its_final_parameters(tmp_path: Path) -> None:
    # Prepare: the services in this process, at steady speeds; the coordinator is stopped after a few updates.
    from arcsim.adversaries.service import run_adversary
    from arcsim.coordinator.service import CoordinatorServer
    from arcsim.engine.replay import replay_arrivals
    from arcsim.workers.service import WorkerSettings, run_worker

    values = _async_values(rounds=10, eval_every=5, round_deadline=10.0)
    values["async"] = {"buffer_size": 3, "staleness_bound": 2}
    values["speeds"] = {"honest": {"distribution": "lognormal", "median": 0.02, "sigma": 0.5}}
    config = from_dict(values)
    out = tmp_path / "run"
    out.mkdir()

    async def run_until(resume: bool, stop_after: int | None) -> dict[str, Any]:
        server = CoordinatorServer(CoordinatorSettings(config=config, out_dir=out, secret=TEST_SECRET, resume=resume))
        serving = asyncio.create_task(server.serve())
        while not (out / "coordinator.json").exists():
            await asyncio.sleep(0.01)
        port = json.loads((out / "coordinator.json").read_text())["port"]
        workers = [
            asyncio.create_task(
                (run_worker if i < config.num_honest else run_adversary)(
                    WorkerSettings(
                        coordinator=f"127.0.0.1:{port}",
                        worker_id=i,
                        token=dict(_md(config, i))["authorization"].removeprefix("Bearer "),
                        max_retry_seconds=5,
                    )
                )
            )
            for i in range(config.num_workers)
        ]
        try:
            if stop_after is not None:
                # ... once an arrival came after that update: the log then runs past the checkpoint.
                while not _arrived_after_update(out / "arrivals.jsonl", stop_after - 1):
                    await asyncio.sleep(0.005)
                server.coordinator.request_stop()
            return await asyncio.wait_for(serving, 60)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    # Act: stop after 4 updates, resume to the end, replay the log.
    stopped = await run_until(resume=False, stop_after=4)
    completed = await run_until(resume=True, stop_after=None)
    events = read_arrivals(out / "arrivals.jsonl")
    replayed = await asyncio.to_thread(replay_arrivals, config, events, tmp_path / "replay")

    # Assert: the log was cut back to the checkpoint (updates numbered 0..9 once each), and the replay of the
    # stopped-and-resumed run ends on its parameters.
    assert stopped["status"] == "stopped" and completed["status"] == "completed"
    assert [e["round"] for e in events if e["event"] == "update"] == list(range(10))
    assert replayed["final_params_sha256"] == completed["final_params_sha256"]


def test_a_log_whose_crafted_vector_has_no_observation_is_refused_before_anything_is_written(
    grpc_async_run: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the run's log with the observation of its first crafted vector taken out (what a log of a data
    # attack, or of an adversary other than arcsim's, gives a replay that must craft).
    out, _ = grpc_async_run
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "config.yaml").write_text((out / "config.yaml").read_text())
    lines = (out / "arrivals.jsonl").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if '"observed"' in line)
    event = json.loads(lines[first])
    del event["observed"]
    lines[first] = json.dumps(event)
    (edited / "arrivals.jsonl").write_text("\n".join(lines) + "\n")
    # Act / assert
    assert main(["replay", str(edited), "--out", str(tmp_path / "replay")]) == 2
    assert f"arrival {event['seq']}: worker 4 crafts its vector" in capsys.readouterr().err
    assert not (tmp_path / "replay").exists()
