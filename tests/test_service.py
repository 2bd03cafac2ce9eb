"""Integration tests of the coordinator over real gRPC on loopback.

The coordinator runs in this process (``arcsim.coordinator.service.serve`` as an asyncio task on port 0,
its port read from ``out_dir/coordinator.json``); clients are the real worker and adversary
services (``run_worker`` / ``run_adversary``) or raw ``CoordinatorStub`` calls with per-worker
bearer tokens, so each check sees exactly what a remote worker would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import TEST_SECRET, auth, tiny_config, token
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from arcsim import cli
from arcsim.adversaries.service import run_adversaries, run_adversary
from arcsim.config import RunConfig
from arcsim.coordinator.metrics import REJECTION_REASONS
from arcsim.coordinator.service import Coordinator, CoordinatorSettings, serve
from arcsim.engine.byzantine import ByzantineWorker
from arcsim.engine.inproc import run_inproc
from arcsim.engine.rounds import RunState, params_sha256
from arcsim.transport import codec
from arcsim.transport.auth import ANY_ID, bearer
from arcsim.transport.channels import grpc_options
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.v1 import coordinator_pb2_grpc as pb_grpc
from arcsim.workers.service import HonestParticipant, WorkerSettings, run_worker

torch.set_num_threads(1)

METRIC_NAMES = (
    "arcsim_round",
    "arcsim_round_duration_seconds",
    "arcsim_rounds_completed_total",
    "arcsim_pipeline_stage_duration_seconds",
    "arcsim_submissions_total",
    "arcsim_submissions_rejected_total",
    "arcsim_workers_connected",
    "arcsim_clip_threshold",
    "arcsim_clipped_vectors_total",
    "arcsim_vector_norm",
    "arcsim_aggregate_error",
    "arcsim_test_accuracy_ratio",
    "arcsim_test_loss",
    "arcsim_train_loss",
    "arcsim_received_bytes_total",
    "arcsim_run_info",
    "arcsim_build_info",
)


def _token(config: RunConfig, worker_id: int) -> str:
    role = "honest" if worker_id < config.num_honest else "byzantine"
    return token(worker_id, role)


def _md(config: RunConfig, worker_id: int) -> tuple[tuple[str, str], ...]:
    return bearer(_token(config, worker_id))


@dataclass
class Running:
    """A coordinator served by this test's event loop."""

    task: asyncio.Task
    out_dir: Path
    port: int
    metrics_port: int | None
    channel: grpc.aio.Channel
    stub: pb_grpc.CoordinatorStub

    async def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.task, timeout)


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Start coordinators with ``await start(config, **settings)``; every one is stopped afterwards."""
    started: list[Running] = []

    async def _start(config: RunConfig, *, out_dir: Path | None = None, **settings: Any) -> Running:
        out = out_dir or tmp_path / f"run{len(started)}"
        out.mkdir(parents=True, exist_ok=True)
        task = asyncio.create_task(
            serve(
                CoordinatorSettings(
                    config=config, out_dir=out, secret=TEST_SECRET, port=settings.pop("port", 0), **settings
                )
            )
        )
        endpoint_file = out / "coordinator.json"
        for _ in range(3000):
            if endpoint_file.exists() or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()  # raise the coordinator's error
        endpoint = json.loads(endpoint_file.read_text())
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{endpoint['port']}", options=grpc_options(64 << 20))
        running = Running(
            task, out, endpoint["port"], endpoint["metrics_port"], channel, pb_grpc.CoordinatorStub(channel)
        )
        started.append(running)
        return running

    yield _start
    for running in started:
        if not running.task.done():
            running.task.cancel()
        try:
            await running.task
        except BaseException:  # noqa: BLE001 - cancelled or failed; the test reports its own failure
            pass
        await running.channel.close()


async def _rpc_error(awaitable: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return caught.value


async def _join(running: Running, config: RunConfig, worker_id: int) -> pb.JoinReply:
    role = pb.HONEST if worker_id < config.num_honest else pb.BYZANTINE
    return await running.stub.Join(pb.JoinRequest(worker_id=worker_id, role=role), metadata=_md(config, worker_id))


class Follower:
    """A raw ``Rounds`` stream of one worker, read one round at a time."""

    def __init__(self, running: Running, config: RunConfig, worker_id: int, num_parameters: int) -> None:
        self.call = running.stub.Rounds(
            pb.RoundsRequest(worker_id=worker_id, from_round=0), metadata=_md(config, worker_id)
        )
        self.reader = codec.RoundEventReader(max_bytes=num_parameters * 4)

    async def next(self) -> codec.RoundParams | pb.RunEnd:
        while True:
            event = await asyncio.wait_for(self.call.read(), 30)
            assert event is not grpc.aio.EOF, "the round stream ended without RunEnd"
            item = self.reader.feed(event)
            if item is not None:
                return item


async def _join_and_follow(running: Running, config: RunConfig) -> tuple[int, list[Follower]]:
    """Join every worker of the run by hand and read round 0 from each one's stream: (d, followers)."""
    d = (await _join(running, config, 0)).num_parameters
    for i in range(1, config.num_workers):
        await _join(running, config, i)
    followers = [Follower(running, config, i, d) for i in range(config.num_workers)]
    for follower in followers:
        await follower.next()
    return d, followers


async def _submit(
    running: Running,
    config: RunConfig,
    vector: torch.Tensor,
    *,
    round_: int,
    worker_id: int,
    token_of: int | None = None,
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
    mutate: Callable[[list[pb.GradientChunk]], list[pb.GradientChunk]] | None = None,
    metadata: Any = None,
) -> pb.SubmitReply:
    messages = list(codec.vector_chunks(vector, round=round_, worker_id=worker_id, chunk_bytes=chunk_bytes))
    if mutate is not None:
        messages = mutate(messages)
    if metadata is None:
        metadata = _md(config, worker_id if token_of is None else token_of)
    return await running.stub.SubmitGradient(iter(messages), metadata=metadata)


def _worker_settings(running: Running, config: RunConfig, worker_id: int) -> WorkerSettings:
    """The real worker service's settings for ``worker_id`` of ``running``'s run, with its own token."""
    return WorkerSettings(
        coordinator=f"127.0.0.1:{running.port}",
        worker_id=worker_id,
        token=_token(config, worker_id),
        device="cpu",
        max_retry_seconds=10,
    )


def _vectors(round_: int, num_workers: int, d: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + round_)
    return {i: torch.randn(d, generator=g) * 0.1 for i in range(num_workers)}


async def _metrics_text(port: int) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    return await asyncio.to_thread(fetch)


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels} on the metrics page")


def _offline_params(config: RunConfig, out_dir: Path, rounds: list[dict[int, torch.Tensor]]) -> str:
    state = RunState(config, out_dir)
    for vectors in rounds:
        state.close_round(vectors)
    return params_sha256(state.params)


def _records(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


# --- a whole run with the real worker and adversary services ----------------------------------------
async def test_two_honest_workers_and_an_adversary_complete_the_run(start, tmp_path: Path) -> None:
    # Prepare: ALIE needs Observe, so the adversary exercises the whole protocol.
    config = tiny_config(num_honest=2, num_byzantine=1, attack="alie", rounds=4, eval_every=2)
    running = await start(config)

    settings = functools.partial(_worker_settings, running, config)

    # Execute
    clients = await asyncio.wait_for(
        asyncio.gather(run_worker(settings(0)), run_worker(settings(1)), run_adversary(settings(2))), 120
    )
    summary = await running.finish()
    # Assert
    assert clients == ["completed", "completed", "completed"]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    assert json.loads((running.out_dir / "summary.json").read_text()) == summary
    assert not (running.out_dir / "coordinator.json").exists()
    records = _records(running.out_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all((r["received_honest"], r["received_byzantine"], r["aggregated"]) == (2, 1, True) for r in records)
    assert [r["accuracy"] is not None for r in records] == [False, True, False, True]
    inproc = run_inproc(config, tmp_path / "inproc")
    assert summary["final_params_sha256"] == inproc["final_params_sha256"]


async def test_workers_with_auto_ids_take_the_free_ids_of_their_role_and_finish_the_run(start, tmp_path: Path) -> None:
    # Prepare: every service holds only its role token (as scaled containers do) and asks for an id.
    config = tiny_config(num_honest=2, num_byzantine=1, attack="alie", rounds=3, eval_every=3)
    running = await start(config)
    address = f"127.0.0.1:{running.port}"

    def settings(role: str) -> WorkerSettings:
        return WorkerSettings(
            coordinator=address, worker_id=ANY_ID, token=token(ANY_ID, role), device="cpu", max_retry_seconds=10
        )

    # Execute
    clients = await asyncio.wait_for(
        asyncio.gather(
            run_adversary(settings("byzantine")), run_worker(settings("honest")), run_worker(settings("honest"))
        ),
        120,
    )
    summary = await running.finish()
    # Assert: the same run, bit for bit, as with fixed ids
    assert clients == ["completed", "completed", "completed"]
    assert summary["final_params_sha256"] == run_inproc(config, tmp_path / "inproc")["final_params_sha256"]


async def test_a_role_token_gets_an_id_with_its_own_token_and_nothing_else(start) -> None:
    # Prepare
    config = tiny_config(num_honest=2, num_byzantine=1, attack="alie")
    running = await start(config, metrics_port=0)
    role_md = auth(ANY_ID)
    join_any = pb.JoinRequest(worker_id=ANY_ID, role=pb.HONEST)
    # Execute
    first = await running.stub.Join(join_any, metadata=role_md)
    second = await running.stub.Join(join_any, metadata=role_md)
    spare = await _rpc_error(running.stub.Join(join_any, metadata=role_md))
    fixed = await _rpc_error(running.stub.Join(pb.JoinRequest(worker_id=0, role=pb.HONEST), metadata=role_md))
    wrong_role = await _rpc_error(
        running.stub.Join(pb.JoinRequest(worker_id=ANY_ID, role=pb.BYZANTINE), metadata=role_md)
    )
    rounds = running.stub.Rounds(pb.RoundsRequest(worker_id=0), metadata=role_md)
    rounds_error = await _rpc_error(rounds.read())
    # Assert: ids 0 and 1 with their own tokens; no third honest id; the role token can do nothing else
    assert (first.worker_id, second.worker_id) == (0, 1)
    assert first.token == token(0) and second.token == token(1)
    assert spare.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fixed.code() == grpc.StatusCode.PERMISSION_DENIED
    assert wrong_role.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rounds_error.code() == grpc.StatusCode.PERMISSION_DENIED
    text = await _metrics_text(running.metrics_port)
    assert _sample(text, "arcsim_submissions_rejected_total", reason="no_free_id") == 1


async def test_a_worker_joining_with_its_own_id_keeps_it_from_role_token_workers(start) -> None:
    # Prepare: worker 0 joins with its own token and has not subscribed to its rounds yet.
    config = tiny_config(num_honest=2)
    running = await start(config)
    await _join(running, config, 0)
    role_md = auth(ANY_ID)
    # Execute
    assigned = await running.stub.Join(pb.JoinRequest(worker_id=ANY_ID, role=pb.HONEST), metadata=role_md)
    spare = await _rpc_error(running.stub.Join(pb.JoinRequest(worker_id=ANY_ID, role=pb.HONEST), metadata=role_md))
    # Assert: the role token gets id 1, not worker 0's id; then there is none left
    assert assigned.worker_id == 1
    assert spare.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_worker_whose_vector_came_too_late_takes_the_coordinators_momentum(start) -> None:
    # Prepare: worker 1 is late in round 1 (the round closes at its deadline without it), as after a
    # network cut that the connection survived.
    config = tiny_config(num_honest=2, rounds=3, round_deadline=1.0)
    running = await start(config)

    class LateOnce(HonestParticipant):
        def __init__(self) -> None:
            super().__init__()
            self.sent: dict[int, torch.Tensor] = {}
            self.last_vectors: list[torch.Tensor | None] = []

        def set_momentum(self, momentum: torch.Tensor | None) -> None:
            self.last_vectors.append(None if momentum is None else momentum.clone())
            super().set_momentum(momentum)

        async def compute(self, stub, round_: int, params: torch.Tensor) -> tuple[torch.Tensor, float]:
            vector, loss = await super().compute(stub, round_, params)
            self.sent[round_] = vector.clone()
            if round_ == 1:
                await asyncio.sleep(config.round_deadline + 0.5)
            return vector, loss

    settings = functools.partial(_worker_settings, running, config)

    late = LateOnce()
    # Execute
    clients = await asyncio.wait_for(asyncio.gather(run_worker(settings(0)), run_worker(settings(1), late)), 60)
    await running.finish()
    # Assert: round 1 closed without worker 1; its refused vector's step was dropped from its momentum,
    # which it took back from the coordinator (its round-0 vector) before computing round 2.
    assert clients == ["completed", "completed"]
    assert [r["received_honest"] for r in _records(running.out_dir)] == [2, 1, 2]
    assert late.last_vectors[0] is None and len(late.last_vectors) == 2
    assert torch.equal(late.last_vectors[1], late.sent[0])


async def test_metrics_linger_after_the_run_for_a_last_scrape(start) -> None:
    # Prepare
    config = tiny_config(num_honest=1, rounds=2, eval_every=2)
    running = await start(config, metrics_port=0, linger=30.0)
    settings = WorkerSettings(
        coordinator=f"127.0.0.1:{running.port}",
        worker_id=0,
        token=_token(config, 0),
        device="cpu",
        max_retry_seconds=10,
    )
    # Execute: the worker sees RunEnd; the coordinator is still serving /metrics
    assert await asyncio.wait_for(run_worker(settings), 60) == "completed"
    await asyncio.sleep(0.5)
    text = await _metrics_text(running.metrics_port)
    # Assert: the final values are there, and a stop request ends the wait at once
    assert not running.task.done()
    assert _sample(text, "arcsim_round") == 2
    os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it on this loop: it ends the linger
    summary = await running.finish(timeout=10)
    assert summary["status"] == "completed"


async def test_a_diverging_model_completes_the_run_like_the_inproc_engine(start, tmp_path: Path) -> None:
    # Prepare: the plain mean under a huge FOE blows the model up; the honest gradients then turn
    # non-finite, the coordinator refuses them, the adversary has nothing to observe, and the rounds
    # are recorded as not aggregated, in both engines alike.
    config = tiny_config(
        num_honest=2,
        num_byzantine=1,
        model="mlp",
        attack="foe",
        attack_params={"tau": 1000.0},
        pipeline="mean",
        rounds=12,
        eval_every=4,
        lr=5.0,
        round_deadline=10.0,
    )
    running = await start(config)

    settings = functools.partial(_worker_settings, running, config)

    # Execute
    started = time.monotonic()
    clients = await asyncio.wait_for(
        asyncio.gather(run_worker(settings(0)), run_worker(settings(1)), run_adversary(settings(2))), 300
    )
    summary = await running.finish()
    inproc = run_inproc(config, tmp_path / "inproc")
    # Assert
    assert clients == ["completed"] * 3 and summary["status"] == "completed"
    skipped = [r for r in _records(running.out_dir) if not r["aggregated"]]
    assert skipped, "the model was expected to diverge"
    assert summary["final_params_sha256"] == inproc["final_params_sha256"]
    assert [r["aggregated"] for r in _records(running.out_dir)] == [
        r["aggregated"] for r in _records(tmp_path / "inproc")
    ]
    # A round whose honest vectors were all refused closes once they are in: the adversary cannot craft
    # anything, so waiting for its deadline (10 s) would change nothing.
    assert time.monotonic() - started < config.round_deadline * 2, f"{len(skipped)} diverged rounds waited"


async def test_colluding_adversaries_in_one_process_observe_once_per_round(start, tmp_path: Path, monkeypatch) -> None:
    # Prepare: two Byzantine ids in one adversary process (as `arcsim run` starts them); count Observe calls
    observes: list[int] = []
    original = Coordinator.Observe

    async def counting_observe(self, request, context):  # Observe writes its events with context.write
        observes.append(request.round)
        return await original(self, request, context)

    monkeypatch.setattr(Coordinator, "Observe", counting_observe)
    config = tiny_config(num_honest=3, num_byzantine=2, attack="alie", rounds=3, eval_every=3)
    running = await start(config, metrics_port=0)

    settings = functools.partial(_worker_settings, running, config)

    # Execute
    results = await asyncio.wait_for(
        asyncio.gather(
            run_worker(settings(0)),
            run_worker(settings(1)),
            run_worker(settings(2)),
            run_adversaries([settings(3), settings(4)]),
        ),
        120,
    )
    summary = await running.finish()
    # Assert: the same run as the inproc engine; both ids submitted every round
    assert results[:3] == ["completed"] * 3 and results[3] == ["completed", "completed"]
    assert summary["final_params_sha256"] == run_inproc(config, tmp_path / "inproc")["final_params_sha256"]
    assert all(r["received_byzantine"] == 2 for r in _records(running.out_dir))
    assert observes == [0, 1, 2]  # one observation per round for both ids


async def test_refused_vectors_answer_the_round_so_it_does_not_wait_for_the_deadline(start, tmp_path: Path) -> None:
    # Prepare: the adversary sends NaN vectors, which the coordinator refuses; with a 60 s deadline the
    # run must still take seconds, and aggregate the honest vectors exactly as the inproc engine does.
    config = tiny_config(num_honest=3, num_byzantine=1, attack="nan", rounds=3, eval_every=3, round_deadline=60.0)
    running = await start(config)

    settings = functools.partial(_worker_settings, running, config)

    # Execute
    started = time.monotonic()
    clients = await asyncio.wait_for(
        asyncio.gather(*(run_worker(settings(i)) for i in range(3)), run_adversary(settings(3))), 50
    )
    summary = await running.finish()
    # Assert
    assert time.monotonic() - started < 50 and clients == ["completed"] * 4
    records = _records(running.out_dir)
    assert [(r["received_honest"], r["received_byzantine"], r["aggregated"]) for r in records] == [(3, 0, True)] * 3
    assert summary["final_params_sha256"] == run_inproc(config, tmp_path / "inproc")["final_params_sha256"]


async def test_workers_survive_a_coordinator_restart_and_the_result_is_unchanged(start, tmp_path: Path) -> None:
    # Prepare: two honest worker services and a label-flipping adversary driven by the test, which
    # holds back its vector of round 3 until both honest vectors of round 3 are in. Then the
    # coordinator crashes (its task is cancelled) with round 3 open, and is restarted with resume on
    # the same port while the worker services keep running and reconnect by themselves.
    config = tiny_config(num_honest=2, num_byzantine=1, attack="label_flip", rounds=6, eval_every=3)
    out = tmp_path / "restarted"
    first = await start(config, out_dir=out, metrics_port=0)
    address = f"127.0.0.1:{first.port}"
    clients = [
        asyncio.create_task(
            run_worker(
                WorkerSettings(
                    coordinator=address, worker_id=i, token=_token(config, i), device="cpu", max_retry_seconds=30
                )
            )
        )
        for i in (0, 1)
    ]
    adversary = ByzantineWorker(config, 2)

    async def follow_adversary(running: Running, until_round: int) -> codec.RoundParams | pb.RunEnd:
        reply = await _join(running, config, 2)
        follower = Follower(running, config, 2, reply.num_parameters)
        try:
            while True:
                item = await follower.next()
                if isinstance(item, pb.RunEnd) or item.round >= until_round:
                    return item
                vector = adversary.vector(params=item.params, round_=item.round, honest=None)
                await _submit(running, config, vector, round_=item.round, worker_id=2)
        finally:
            follower.call.cancel()

    try:
        held = await asyncio.wait_for(follow_adversary(first, 3), 60)
        assert held.round == 3
        for _ in range(3000):  # both honest vectors of round 3 accepted
            if _sample(await _metrics_text(first.metrics_port), "arcsim_submissions_total", role="honest") == 8:
                break
            await asyncio.sleep(0.01)
        # Execute: crash the coordinator with round 3 open, then resume it on the same port.
        first.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first.task
        assert [r["round"] for r in _records(out)] == [0, 1, 2]
        second = await start(config, out_dir=out, port=first.port, resume=True)
        end = await asyncio.wait_for(follow_adversary(second, 6), 60)
        summary = await second.finish()
        results = await asyncio.wait_for(asyncio.gather(*clients), 60)
    finally:
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    # Assert: the honest workers recomputed round 3 from the momentum of round 2, as if nothing happened.
    assert isinstance(end, pb.RunEnd) and results == ["completed"] * 2
    assert summary["rounds_completed"] == 6
    assert [r["round"] for r in _records(out)] == list(range(6))
    assert summary["final_params_sha256"] == run_inproc(config, tmp_path / "inproc")["final_params_sha256"]


# --- credentials -------------------------------------------------------------------------------------
async def test_credentials_are_checked(start) -> None:
    # Prepare: 2 honest + 1 adversary; nobody follows the rounds, so round 0 never opens.
    config = tiny_config(num_honest=2, num_byzantine=1, attack="sign_flip")
    running = await start(config, metrics_port=0)
    stub = running.stub
    # Execute / Assert
    unknown = await _rpc_error(stub.Join(pb.JoinRequest(worker_id=0, role=pb.HONEST), metadata=bearer("nope")))
    assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    missing = await _rpc_error(stub.Join(pb.JoinRequest(worker_id=0, role=pb.HONEST)))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    other_id = await _rpc_error(stub.Join(pb.JoinRequest(worker_id=1, role=pb.HONEST), metadata=_md(config, 0)))
    assert other_id.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "worker 0, not worker 1" in other_id.details()
    other_role = await _rpc_error(stub.Join(pb.JoinRequest(worker_id=0, role=pb.BYZANTINE), metadata=_md(config, 0)))
    assert other_role.code() == grpc.StatusCode.PERMISSION_DENIED
    no_role = await _rpc_error(stub.Join(pb.JoinRequest(worker_id=0), metadata=_md(config, 0)))
    assert no_role.code() == grpc.StatusCode.INVALID_ARGUMENT
    out_of_range = await _rpc_error(stub.Join(pb.JoinRequest(worker_id=3, role=pb.HONEST), metadata=_md(config, 0)))
    assert out_of_range.code() == grpc.StatusCode.INVALID_ARGUMENT
    observe_honest = await _rpc_error(
        stub.Observe(pb.ObserveRequest(worker_id=0, round=0), metadata=_md(config, 0)).read()
    )
    assert observe_honest.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only for adversary credentials" in observe_honest.details()
    observe_other = await _rpc_error(
        stub.Observe(pb.ObserveRequest(worker_id=1, round=0), metadata=_md(config, 2)).read()
    )
    assert observe_other.code() == grpc.StatusCode.PERMISSION_DENIED
    observe_unknown = await _rpc_error(
        stub.Observe(pb.ObserveRequest(worker_id=2, round=0), metadata=bearer("nope")).read()
    )
    assert observe_unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    fetch_other = await _rpc_error(
        stub.FetchMomentum(pb.FetchMomentumRequest(worker_id=1), metadata=_md(config, 0)).read()
    )
    assert fetch_other.code() == grpc.StatusCode.PERMISSION_DENIED
    rounds_unjoined = await _rpc_error(stub.Rounds(pb.RoundsRequest(worker_id=0), metadata=_md(config, 0)).read())
    assert rounds_unjoined.code() == grpc.StatusCode.FAILED_PRECONDITION
    submit_unjoined = await _rpc_error(_submit(running, config, torch.zeros(650), round_=0, worker_id=0))
    assert submit_unjoined.code() == grpc.StatusCode.FAILED_PRECONDITION
    joined = await _join(running, config, 2)
    assert joined.run_id == config.digest() and joined.current_round == 0 and not joined.has_momentum
    observe_adversary = await _rpc_error(
        stub.Observe(pb.ObserveRequest(worker_id=2, round=0), metadata=_md(config, 2)).read()
    )
    assert observe_adversary.code() == grpc.StatusCode.FAILED_PRECONDITION  # no round is open yet
    text = await _metrics_text(running.metrics_port)
    assert _sample(text, "arcsim_submissions_rejected_total", reason="unauthenticated") == 3
    assert _sample(text, "arcsim_submissions_rejected_total", reason="permission_denied") == 5
    assert _sample(text, "arcsim_submissions_rejected_total", reason="malformed") == 1
    assert _sample(text, "arcsim_submissions_rejected_total", reason="unknown_worker") == 1
    assert _sample(text, "arcsim_submissions_rejected_total", reason="not_joined") == 1


async def test_health_service_answers_serving(start) -> None:
    running = await start(tiny_config())
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "arcsim.v1.Coordinator"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_command_is_what_container_health_checks_run(start, monkeypatch) -> None:
    # Prepare
    running = await start(tiny_config())
    closed = await start(tiny_config())
    closed_port = closed.port
    closed.task.cancel()
    with contextlib.suppress(BaseException):
        await closed.task
    # Execute: `arcsim health` blocks, so it runs in a thread while this loop serves the coordinator
    serving = await asyncio.to_thread(cli.main, ["health", "--address", f"127.0.0.1:{running.port}"])
    down = await asyncio.to_thread(cli.main, ["health", "--address", f"127.0.0.1:{closed_port}", "--timeout", "1"])
    monkeypatch.delenv("ARCSIM_HEALTH_ADDRESS", raising=False)
    no_address = await asyncio.to_thread(cli.main, ["health"])
    # Assert
    assert (serving, down, no_address) == (0, 1, 0)


async def test_cancelled_coordinator_releases_its_ports(start) -> None:
    running = await start(tiny_config(), metrics_port=0)
    await _metrics_text(running.metrics_port)
    # Execute
    running.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running.task
    # Assert
    assert not (running.out_dir / "coordinator.json").exists()
    with pytest.raises(OSError):
        await _metrics_text(running.metrics_port)
    stale = await _rpc_error(_join(running, tiny_config(), 0))
    assert stale.code() == grpc.StatusCode.UNAVAILABLE


async def test_metrics_port_in_use_is_a_clear_error(start, tmp_path: Path) -> None:
    running = await start(tiny_config(), metrics_port=0)
    with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{running.metrics_port}"):
        await start(tiny_config(), out_dir=tmp_path / "second", metrics_port=running.metrics_port)


# --- submissions ------------------------------------------------------------------------------------
async def test_bad_submissions_are_rejected_counted_and_change_nothing(start, tmp_path: Path) -> None:
    # Prepare: 3 honest workers driven by hand over two rounds.
    config = tiny_config(num_honest=3, rounds=2)
    running = await start(config, metrics_port=0, chunk_bytes=1024)
    replies = [await _join(running, config, i) for i in range(3)]
    d = replies[0].num_parameters
    assert replies[0].chunk_bytes == 1024
    followers = [Follower(running, config, i, d) for i in range(3)]
    first = [await f.next() for f in followers]
    assert [item.round for item in first] == [0, 0, 0]
    round_0, round_1 = _vectors(0, 3, d), _vectors(1, 3, d)
    for i in range(3):
        reply = await _submit(running, config, round_0[i], round_=0, worker_id=i)
        assert reply.accepted and reply.round == 0
    assert (await followers[0].next()).round == 1
    await _submit(running, config, round_1[0], round_=1, worker_id=0, chunk_bytes=1024)

    def corrupt(messages: list[pb.GradientChunk]) -> list[pb.GradientChunk]:
        messages[0].header.checksum ^= 1
        return messages

    def no_header(messages: list[pb.GradientChunk]) -> list[pb.GradientChunk]:
        messages[0].ClearField("header")
        return messages

    def second_header(messages: list[pb.GradientChunk]) -> list[pb.GradientChunk]:
        messages[1].header.CopyFrom(messages[0].header)
        return messages

    bad = [
        # (reason, status, vector, round, worker id, credentials of, mutate)
        ("stale_round", grpc.StatusCode.FAILED_PRECONDITION, round_0[1], 0, 1, None, None),
        ("future_round", grpc.StatusCode.FAILED_PRECONDITION, round_1[1], 2, 1, None, None),
        ("duplicate", grpc.StatusCode.ALREADY_EXISTS, round_1[2], 1, 0, None, None),
        ("non_finite", grpc.StatusCode.INVALID_ARGUMENT, torch.full((d,), float("nan")), 1, 1, None, None),
        (
            "non_finite",
            grpc.StatusCode.INVALID_ARGUMENT,
            round_1[1].clone().index_fill_(0, torch.tensor([3]), float("inf")),
            1,
            1,
            None,
            None,
        ),
        ("bad_shape", grpc.StatusCode.INVALID_ARGUMENT, torch.zeros(d + 1), 1, 1, None, None),
        ("bad_shape", grpc.StatusCode.INVALID_ARGUMENT, torch.zeros(1, d), 1, 1, None, None),
        ("bad_dtype", grpc.StatusCode.INVALID_ARGUMENT, round_1[1].double(), 1, 1, None, None),
        ("checksum", grpc.StatusCode.DATA_LOSS, round_1[1], 1, 1, None, corrupt),
        ("truncated", grpc.StatusCode.DATA_LOSS, round_1[1], 1, 1, None, lambda m: m[:-1]),
        ("missing_header", grpc.StatusCode.INVALID_ARGUMENT, round_1[1], 1, 1, None, no_header),
        ("unexpected_header", grpc.StatusCode.INVALID_ARGUMENT, round_1[1], 1, 1, None, second_header),
        ("permission_denied", grpc.StatusCode.PERMISSION_DENIED, round_1[2], 1, 1, 2, None),
        ("unknown_worker", grpc.StatusCode.INVALID_ARGUMENT, round_1[1], 1, 9, 1, None),
    ]
    # Execute / Assert: each bad submission gets its status.
    for reason, status, vector, round_, worker_id, token_of, mutate in bad:
        error = await _rpc_error(
            _submit(
                running,
                config,
                vector,
                round_=round_,
                worker_id=worker_id,
                token_of=token_of,
                mutate=mutate,
                chunk_bytes=1024,
            )
        )
        assert error.code() == status, (reason, error.details())
    unauthenticated = await _rpc_error(
        _submit(running, config, round_1[1], round_=1, worker_id=1, metadata=bearer("forged"))
    )
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED
    # Bytes that are not a GradientChunk, first or in the middle of a stream (the raw method sends bytes as they are).
    raw_submit = running.channel.stream_unary(
        "/arcsim.v1.Coordinator/SubmitGradient", response_deserializer=pb.SubmitReply.FromString
    )
    header_message = next(codec.vector_chunks(round_1[1], round=1, worker_id=1, chunk_bytes=1024)).SerializeToString()
    garbage = [[b"\xff\xff\xff\xff"], [header_message, b"\x22\x05ab"], [b"\x08"]]
    for stream in garbage:
        error = await _rpc_error(raw_submit(iter(stream), metadata=_md(config, 1)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a GradientChunk" in error.details()
    text = await _metrics_text(running.metrics_port)
    expected = {reason: 0 for reason in REJECTION_REASONS}
    for reason, *_ in bad:
        expected[reason] += 1
    expected["unauthenticated"] += 1
    expected["malformed"] += len(garbage)
    counted = {
        reason: _sample(text, "arcsim_submissions_rejected_total", reason=reason) for reason in REJECTION_REASONS
    }
    assert counted == expected
    assert _sample(text, "arcsim_submissions_total", role="honest") == 4
    assert _sample(text, "arcsim_submissions_total", role="byzantine") == 0
    assert _sample(text, "arcsim_received_bytes_total") == 4 * d * 4
    # The good submissions close round 1 and end the run; the result is as if the bad ones never came.
    for i in (1, 2):
        await _submit(running, config, round_1[i], round_=1, worker_id=i)
    summary = await running.finish()
    assert (await followers[1].next()).round == 1
    end = await followers[1].next()
    assert isinstance(end, pb.RunEnd) and end.reason == "completed" and end.rounds_completed == 2
    assert summary["final_params_sha256"] == _offline_params(config, tmp_path / "offline", [round_0, round_1])
    records = _records(running.out_dir)
    assert [(r["round"], r["received_honest"], r["aggregated"]) for r in records] == [(0, 3, True), (1, 3, True)]
    for follower in followers:
        follower.call.cancel()


async def test_metrics_page_has_every_metric_and_no_worker_id(start) -> None:
    # Prepare: one closed round with 2 honest + 1 Byzantine vector, so every series has a value.
    config = tiny_config(num_honest=2, num_byzantine=1, attack="sign_flip", rounds=3)
    running = await start(config, metrics_port=0)
    endpoint = json.loads((running.out_dir / "coordinator.json").read_text())
    assert endpoint["metrics_port"] == running.metrics_port and running.metrics_port > 0
    d, followers = await _join_and_follow(running, config)
    vectors = _vectors(0, 3, d)
    vectors[2] = vectors[2] * 100
    for i in range(3):
        await _submit(running, config, vectors[i], round_=0, worker_id=i)
    assert (await followers[0].next()).round == 1
    # Execute
    text = await _metrics_text(running.metrics_port)
    # Assert
    typed = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    for name in METRIC_NAMES:
        assert name in typed or name.removesuffix("_total") in typed, name
    assert re.search(r"^# TYPE arcsim_vector_norm histogram$", text, flags=re.MULTILINE)
    stages = {"arc", "nnm", "cwtm"}
    info_labels = {"arcsim_run_info": {"task", "pipeline", "attack", "n", "f"}, "arcsim_build_info": {"version"}}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("process_", "python_")):  # the standard process and platform collectors
            continue
        assert family.name.startswith("arcsim_"), family.name
        if family.name in info_labels:
            assert all(set(sample.labels) == info_labels[family.name] for sample in family.samples), family
            continue
        for sample in family.samples:
            assert set(sample.labels) <= {"role", "stage", "reason", "le"}, sample
            assert sample.labels.get("role", "honest") in ("honest", "byzantine")
            assert sample.labels.get("stage", "arc") in stages
            assert sample.labels.get("reason", "duplicate") in REJECTION_REASONS
            assert not any(re.fullmatch(r"\d+", value) for key, value in sample.labels.items() if key != "le")
    assert _sample(text, "arcsim_round") == 1
    assert _sample(text, "arcsim_workers_connected", role="honest") == 2
    assert _sample(text, "arcsim_workers_connected", role="byzantine") == 1
    assert _sample(text, "arcsim_submissions_total", role="byzantine") == 1
    assert _sample(text, "arcsim_rounds_completed_total") == 1
    assert _sample(text, "arcsim_vector_norm_count", role="honest") == 2
    assert _sample(text, "arcsim_vector_norm_count", role="byzantine") == 1
    assert _sample(text, "arcsim_clipped_vectors_total", role="byzantine") == 1
    assert _sample(text, "arcsim_pipeline_stage_duration_seconds_count", stage="nnm") == 1
    record = _records(running.out_dir)[0]
    assert _sample(text, "arcsim_clip_threshold") == pytest.approx(record["clip_threshold"])
    assert _sample(text, "arcsim_aggregate_error") == pytest.approx(record["aggregate_error"])
    assert _sample(text, "arcsim_test_accuracy_ratio") == pytest.approx(record["accuracy"])
    for follower in followers:
        follower.call.cancel()


# --- stopping --------------------------------------------------------------------------------------
async def test_sigterm_stops_without_aggregating_the_open_round_and_resume_finishes_it(start, tmp_path: Path) -> None:
    # Prepare: round 0 complete, round 1 with one of three vectors in when SIGTERM arrives.
    config = tiny_config(num_honest=3, rounds=2)
    out = tmp_path / "stopped"
    running = await start(config, out_dir=out)
    d, followers = await _join_and_follow(running, config)
    round_0, round_1 = _vectors(0, 3, d), _vectors(1, 3, d)
    for i in range(3):
        await _submit(running, config, round_0[i], round_=0, worker_id=i)
    assert (await followers[0].next()).round == 1
    await _submit(running, config, round_1[0], round_=1, worker_id=0)
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "serve() installed no SIGTERM handler"
    # Execute
    signal.raise_signal(signal.SIGTERM)
    summary = await running.finish()
    # Assert: stopped after round 0; round 1 was not aggregated with a third of its vectors.
    assert summary["status"] == "stopped" and summary["rounds_completed"] == 1
    assert [r["round"] for r in _records(out)] == [0]
    assert (await followers[1].next()).round == 1
    end = await followers[1].next()
    assert isinstance(end, pb.RunEnd) and end.reason == "stopped"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "serve() left its signal handler behind"
    for follower in followers:
        follower.call.cancel()
    # Resume: round 1 opens again, every worker gets its momentum back, and the run ends as uninterrupted.
    resumed = await start(config, out_dir=out, resume=True)
    replies = [await _join(resumed, config, i) for i in range(3)]
    assert all(r.current_round == 1 and r.has_momentum for r in replies)
    momentum = codec.read_observe_events(
        [e async for e in resumed.stub.FetchMomentum(pb.FetchMomentumRequest(worker_id=1), metadata=_md(config, 1))],
        max_bytes=d * 4,
    )
    assert torch.equal(momentum[1], round_0[1])
    followers = [Follower(resumed, config, i, d) for i in range(3)]
    assert [(await f.next()).round for f in followers] == [1, 1, 1]
    for i in range(3):
        await _submit(resumed, config, round_1[i], round_=1, worker_id=i)
    summary = await resumed.finish()
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["final_params_sha256"] == _offline_params(config, tmp_path / "offline", [round_0, round_1])
    for follower in followers:
        follower.call.cancel()
