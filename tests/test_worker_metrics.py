"""The worker side of the services: /metrics of workers and adversaries, and deadlines on their calls.

Each test runs the real worker and adversary services against a real coordinator in this process
(the ``start`` fixture of tests/test_service.py) and reads what an operator would: the /metrics page
over HTTP, ``rounds.jsonl`` and the services' return values.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from conftest import tiny_config
from prometheus_client.parser import text_string_to_metric_families
from test_service import _md, _metrics_text, _records, _rpc_error, _sample, _worker_settings, start  # noqa: F401

from arcsim.adversaries.service import AdversaryParticipant, run_adversaries
from arcsim.coordinator.service import Coordinator
from arcsim.transport import codec
from arcsim.workers.metrics import REFUSAL_REASONS, WorkerMetrics
from arcsim.workers.service import HonestParticipant, Session, WorkerSettings, call_timeout, run_worker

torch.set_num_threads(1)

WORKER_METRICS = (
    "arcsim_worker_compute_seconds",
    "arcsim_worker_vectors_sent_total",
    "arcsim_worker_vectors_refused_total",
    "arcsim_worker_rounds_total",
    "arcsim_worker_cuda_memory_allocated_bytes",
    "arcsim_worker_info",
)


class Gated(HonestParticipant):
    """The honest worker, holding its computation of round ``hold`` until the test releases it."""

    def __init__(self, hold: int) -> None:
        super().__init__()
        self.hold = hold
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def compute(self, stub, round_: int, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        if round_ == self.hold:
            self.reached.set()
            await self.release.wait()
        return await super().compute(stub, round_, params)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _wait_for_sample(port: int, name: str, value: float, **labels: str) -> str:
    """The metrics page once ``name{labels}`` reads ``value`` (a client counts an answer just after the server)."""
    for _ in range(300):
        text = await _metrics_text(port)
        if _sample(text, name, **labels) == value:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name}{labels} never reached {value}: {_sample(text, name, **labels)}")


def _label_names(text: str) -> set[str]:
    return {
        label
        for family in text_string_to_metric_families(text)
        if family.name.startswith("arcsim_worker")
        for sample in family.samples
        for label in sample.labels
    }


def _refusing(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).close()
    except urllib.error.URLError:
        return True
    return False


async def test_a_worker_and_an_adversary_serve_their_metrics_while_they_follow_the_run(start) -> None:
    # Prepare: the adversary sends NaN vectors, which the coordinator refuses (INVALID_ARGUMENT); the
    # honest worker holds round 2 until the pages are read. The adversary process serves on the port its
    # settings name (as `arcsim adversary --metrics-port` does), the worker on any free port.
    config = tiny_config(num_honest=2, num_byzantine=1, attack="nan", pipeline="mean", rounds=3, eval_every=3)
    running = await start(config)
    honest = Gated(hold=2)
    worker = Session(WorkerSettings(**{**vars(_worker_settings(running, config, 0)), "metrics_port": 0}), honest)
    adversary_port = _free_port()
    adversary_settings = WorkerSettings(
        **{**vars(_worker_settings(running, config, 2)), "metrics_port": adversary_port}
    )
    # Execute
    clients = asyncio.gather(
        worker.run(), run_worker(_worker_settings(running, config, 1)), run_adversaries([adversary_settings])
    )
    await asyncio.wait_for(honest.reached.wait(), 60)
    worker_text = await _metrics_text(worker.metrics.port)
    worker_port = worker.metrics.port
    adversary_text = await _wait_for_sample(
        adversary_port, "arcsim_worker_vectors_refused_total", 2, role="byzantine", reason="invalid_argument"
    )
    honest.release.set()
    results = await asyncio.wait_for(clients, 60)
    await running.finish()
    # Assert: the worker followed rounds 0-2 and sent the vectors of rounds 0 and 1, all taken
    assert results == ["completed", "completed", ["completed"]]
    for name in WORKER_METRICS:
        assert f"# TYPE {name} " in worker_text, name
    assert _sample(worker_text, "arcsim_worker_rounds_total", role="honest") == 3
    assert _sample(worker_text, "arcsim_worker_vectors_sent_total", role="honest") == 2
    assert _sample(worker_text, "arcsim_worker_compute_seconds_count", role="honest") == 2
    assert all(
        _sample(worker_text, "arcsim_worker_vectors_refused_total", role="honest", reason=reason) == 0
        for reason in REFUSAL_REASONS
    )
    assert _sample(worker_text, "arcsim_worker_info", role="honest", device="cpu") == 1
    assert _sample(worker_text, "arcsim_worker_cuda_memory_allocated_bytes") == 0
    # ... the adversary's two vectors were refused, and its page says it is one
    assert _sample(adversary_text, "arcsim_worker_vectors_sent_total", role="byzantine") == 2
    assert _sample(adversary_text, "arcsim_worker_compute_seconds_count", role="byzantine") == 2
    assert _sample(adversary_text, "arcsim_worker_info", role="byzantine", device="cpu") == 1
    # ... bounded labels only: no worker id (Prometheus' instance label tells the workers apart)
    assert _label_names(worker_text) | _label_names(adversary_text) == {"role", "reason", "device", "le"}
    # ... and both pages are gone once the services have ended
    assert _refusing(worker_port) and _refusing(adversary_port)
    assert [(r["received_honest"], r["received_byzantine"]) for r in _records(running.out_dir)] == [(2, 0)] * 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_a_worker_on_cuda_reports_its_device_and_the_memory_its_tensors_hold(start) -> None:
    # Prepare
    config = tiny_config(num_honest=1, rounds=2, eval_every=2, pipeline="mean")
    running = await start(config)
    honest = Gated(hold=1)
    settings = {**vars(_worker_settings(running, config, 0)), "device": "cuda", "metrics_port": 0}
    worker = Session(WorkerSettings(**settings), honest)
    # Execute: read the page while round 1 is held, after round 0 was computed on the GPU
    run = asyncio.ensure_future(worker.run())
    await asyncio.wait_for(honest.reached.wait(), 120)
    text = await _metrics_text(worker.metrics.port)
    honest.release.set()
    assert await asyncio.wait_for(run, 60) == "completed"
    # Assert: the worker's shard and model live on the GPU
    assert _sample(text, "arcsim_worker_info", role="honest", device="cuda") == 1
    assert _sample(text, "arcsim_worker_cuda_memory_allocated_bytes") > 0


def _stall_first(monkeypatch, *names: str) -> dict[str, int]:
    """Make the coordinator stall the first call of each method named, never answering it (as a hung
    coordinator would); later calls are served as usual. Returns the calls counted so far, by method."""
    calls = dict.fromkeys(names, 0)

    def stall(name: str) -> None:
        original = getattr(Coordinator, name)

        async def stalled_first(self, request, context):
            calls[name] += 1
            if calls[name] == 1:
                await asyncio.sleep(3600)
            return await original(self, request, context)

        async def stalled_first_stream(self, request, context):  # a handler that yields its replies
            calls[name] += 1
            if calls[name] == 1:
                await asyncio.sleep(3600)
            async for reply in original(self, request, context):
                yield reply

        monkeypatch.setattr(
            Coordinator, name, stalled_first_stream if inspect.isasyncgenfunction(original) else stalled_first
        )

    for name in names:
        stall(name)
    return calls


def _short_margin(running, config, worker_id: int) -> WorkerSettings:
    """The worker's settings with a deadline margin of 1 s, so a stalled call ends soon after its round."""
    return WorkerSettings(**{**vars(_worker_settings(running, config, worker_id)), "deadline_margin": 1.0})


async def test_calls_the_coordinator_never_answers_end_at_the_rounds_deadline_and_the_services_go_on(
    start, monkeypatch
) -> None:
    # Prepare: the coordinator stalls the first submission (an honest worker's, round 0) and the
    # first observation (the adversary's, round 0) without ever answering them, as a coordinator
    # that hangs would. Both calls must end soon after round 0's deadline, not hold the services.
    calls = _stall_first(monkeypatch, "SubmitGradient", "Observe")
    config = tiny_config(num_honest=2, num_byzantine=1, attack="alie", rounds=2, eval_every=2, round_deadline=3.0)
    running = await start(config)
    settings = functools.partial(_short_margin, running, config)
    sessions = [
        Session(settings(0), HonestParticipant()),
        Session(settings(1), HonestParticipant()),
        Session(settings(2), AdversaryParticipant()),
    ]
    # Execute
    results = await asyncio.wait_for(asyncio.gather(*(s.run() for s in sessions)), 60)
    await running.finish()
    # Assert: round 0 closed without them; both carried on and sent their vectors of round 1
    assert results == ["completed"] * 3
    assert calls == {"SubmitGradient": 5, "Observe": 2}
    assert [(r["received_honest"], r["received_byzantine"]) for r in _records(running.out_dir)] == [(1, 0), (2, 1)]

    def honest_sample(name: str, **labels: str) -> float:
        return sum(s.metrics.registry.get_sample_value(name, {"role": "honest", **labels}) for s in sessions[:2])

    assert honest_sample("arcsim_worker_vectors_refused_total", reason="deadline_exceeded") == 1
    assert honest_sample("arcsim_worker_vectors_sent_total") == 4


async def test_a_submission_refused_while_an_earlier_one_is_in_flight_costs_the_worker_a_round(start) -> None:
    # Prepare: while worker 0 computes round 0, a stream of its own identity (as one left over from
    # before a reconnect) holds its one submission slot; the coordinator refuses the worker's submission
    # as concurrent, and ends the leftover stream at the round's deadline.
    config = tiny_config(num_honest=2, rounds=2, eval_every=2, round_deadline=3.0)
    running = await start(config)
    gated = Gated(hold=0)
    worker = Session(_worker_settings(running, config, 0), gated)
    clients = asyncio.gather(worker.run(), run_worker(_worker_settings(running, config, 1)))
    await asyncio.wait_for(gated.reached.wait(), 60)
    header = next(codec.vector_chunks(torch.zeros(worker.num_parameters), round=0, worker_id=0))
    never = asyncio.Event()

    async def header_then_nothing():
        yield header
        await never.wait()

    def hold_the_slot():
        return running.stub.SubmitGradient(header_then_nothing(), metadata=_md(config, 0))

    leftover = hold_the_slot()
    for _ in range(300):  # until the coordinator holds the leftover stream: a probe of the same id is refused
        if leftover.done():
            # The coordinator claims a worker's slot before reading its stream, so a probe that held it
            # when the leftover arrived got the leftover refused as concurrent: send the leftover again.
            leftover = hold_the_slot()
        try:
            probe = await _rpc_error(running.stub.SubmitGradient(iter(()), metadata=_md(config, 0)))
        except asyncio.CancelledError:
            # gRPC's client may report a call refused before it finished writing (here: at once, for the
            # held slot) as cancelled instead of with its status; a cancellation of this test is re-raised.
            if asyncio.current_task().cancelling():
                raise
            break
        if probe.code() == grpc.StatusCode.ABORTED:
            break
        await asyncio.sleep(0.05)
    # Execute
    gated.release.set()
    results = await asyncio.wait_for(clients, 60)
    await running.finish()
    # Assert: the worker went on to round 1 instead of dying of the refusal
    assert results == ["completed", "completed"]
    assert (await _rpc_error(leftover)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [r["received_honest"] for r in _records(running.out_dir)] == [1, 2]
    assert (
        worker.metrics.registry.get_sample_value(
            "arcsim_worker_vectors_refused_total", {"role": "honest", "reason": "aborted"}
        )
        == 1
    )


async def test_a_momentum_fetch_the_coordinator_never_answers_ends_and_the_worker_reconnects(
    start, monkeypatch
) -> None:
    # Prepare: the first FetchMomentum (one worker's, as round 0 opens) is never answered.
    calls = _stall_first(monkeypatch, "FetchMomentum")
    config = tiny_config(num_honest=2, rounds=2, eval_every=2, round_deadline=4.0)
    running = await start(config)
    settings = functools.partial(_short_margin, running, config)
    # Execute
    results = await asyncio.wait_for(asyncio.gather(run_worker(settings(0)), run_worker(settings(1))), 60)
    await running.finish()
    # Assert: the fetch ended after a round's deadline plus the margin; that worker reconnected, fetched
    # again and sent its vector of round 1
    assert results == ["completed", "completed"]
    assert calls["FetchMomentum"] == 3
    assert [r["received_honest"] for r in _records(running.out_dir)] == [1, 2]


def test_a_call_gets_the_time_left_in_its_round_plus_the_margin_and_never_less_than_the_margin() -> None:
    now_ms = int(time.time() * 1000)
    timeout = functools.partial(call_timeout, round_deadline=60.0, margin=5.0)
    assert 14.0 < timeout(now_ms + 10_000) <= 15.0
    assert timeout(now_ms - 30_000) == 5.0  # the deadline passed: still time to hear the refusal
    assert timeout(now_ms + 3_600_000) == 65.0  # a clock far behind the coordinator's: one round at most
    assert timeout(0) == 65.0  # no deadline announced: one round


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metrics_port": 70000}, "metrics_port must be None or a port in 0..65535, got 70000"),
        ({"deadline_margin": 0.0}, "deadline_margin must be a positive number of seconds, got 0.0"),
    ],
)
def test_bad_worker_settings_are_refused_naming_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSettings(coordinator="127.0.0.1:1", worker_id=0, token="t", **changes)


def test_a_metrics_port_in_use_is_a_clear_error() -> None:
    first = WorkerMetrics(role="honest", device=torch.device("cpu"))
    port = first.serve(0)
    try:
        with pytest.raises(OSError, match=rf"cannot serve worker metrics on 127.0.0.1:{port}"):
            WorkerMetrics(role="honest", device=torch.device("cpu")).serve(port)
    finally:
        first.close()
    assert _refusing(port)
