"""Random malformed SubmitGradient streams against a live coordinator (hypothesis).

One coordinator serves a 3-worker run from a background thread; the test is its clients, over real
gRPC on loopback. While round 0 is open, hypothesis throws streams at it that claim to be worker 2's
vector: truncated, bytes flipped, garbage messages, wrong headers, wrong rounds or ids, extra data,
non-finite values, messages above the size limit, streams cut off by the client. Each must fail with
a status from its expected set and be counted once in ``arcsim_submissions_rejected_total``; then the
real workers submit, and the run must end on exactly the parameters computed from their vectors
alone, as if the malformed streams had never come.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import TEST_SECRET, auth, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from arcsim.config import RunConfig
from arcsim.coordinator.metrics import REJECTION_REASONS
from arcsim.coordinator.service import CoordinatorSettings, serve
from arcsim.engine.rounds import RunState, params_sha256
from arcsim.transport import codec, wire
from arcsim.transport.channels import grpc_options
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.v1 import coordinator_pb2_grpc as pb_grpc

CHUNK = 256  # small chunks: a vector is several messages, so streams can be cut and spliced
SUBMIT = f"/{wire.SERVICE_NAME}/SubmitGradient"
TARGET = 2  # the worker the malformed streams claim to be (with its own valid token)


class LiveCoordinator:
    """``serve`` in a thread with its own event loop, so that plain (blocking) gRPC clients and hypothesis,
    which runs examples synchronously, can drive it from the test thread."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._main, name="coordinator", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(serve(self.settings))
        try:
            self.summary = self._loop.run_until_complete(self._task)
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            self.error = error
        finally:
            self._loop.close()

    def __enter__(self) -> dict[str, Any]:
        self._thread.start()
        endpoint = self.settings.out_dir / "coordinator.json"
        deadline = time.monotonic() + 60
        while not endpoint.exists():
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start: {self.error!r}")
            time.sleep(0.01)
        return json.loads(endpoint.read_text())

    def wait(self, timeout: float = 60.0) -> dict[str, Any]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the coordinator did not finish")
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive() and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(30)


def _config() -> RunConfig:
    return tiny_config(round_deadline=600.0)


def _md(worker_id: int) -> tuple[tuple[str, str], ...]:
    return auth(worker_id)


def _rejections(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = dict.fromkeys(REJECTION_REASONS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "arcsim_submissions_rejected_total":
                counts[sample.labels["reason"]] = sample.value
    return counts


# --- the malformed streams -------------------------------------------------------------------------


def _valid(vector: torch.Tensor, *, round_: int = 0, worker_id: int = TARGET) -> list[bytes]:
    return list(wire.vector_stream(vector, round=round_, worker_id=worker_id, chunk_bytes=CHUNK))


def _first(vector: torch.Tensor, **changes: Any) -> bytes:
    """The first message of a valid stream with some fields changed (header fields by name)."""
    message = pb.GradientChunk.FromString(_valid(vector)[0])
    for name, value in changes.items():
        if name in ("round", "worker_id"):
            setattr(message, name, value)
        elif name == "shape":
            del message.header.shape[:]
            message.header.shape.extend(value)
        else:
            setattr(message.header, name, value)
    return message.SerializeToString()


def malformed_streams(vector: torch.Tensor) -> st.SearchStrategy[tuple[str, list[bytes]]]:
    """(kind, messages): streams that claim to be worker TARGET's vector for round 0 and must all be refused.

    Kind "cut" marks a stream the client abandons midway (the last element is where it stops).
    """
    valid = _valid(vector)
    n = len(valid)
    d = vector.numel()
    data_index = st.integers(1, n - 1)

    def flip(args: tuple[int, int, int]) -> list[bytes]:
        i, position, mask = args
        message = bytearray(valid[i])
        message[position % len(message)] ^= mask
        return valid[:i] + [bytes(message)] + valid[i + 1 :]

    def with_values(args: tuple[int, float]) -> list[bytes]:
        index, value = args
        bad = vector.clone()
        bad[index] = value
        return _valid(bad)

    header_changes = st.one_of(
        st.sampled_from(["float64", "float16", "bfloat16", "int8", "", "float32 "]).map(lambda v: {"dtype": v}),
        st.lists(st.integers(0, 2 * d), max_size=3).filter(lambda s: s != [d]).map(lambda v: {"shape": v}),
        st.integers(-8, 8).filter(bool).map(lambda delta: {"num_bytes": d * 4 + delta}),
        st.integers(1, 2**32 - 1).map(lambda mask: {"checksum": codec.checksum(codec.tensor_to_bytes(vector)) ^ mask}),
        st.sampled_from([-1, 1, 2, 7, 2**40]).map(lambda r: {"round": r}),
        st.sampled_from([0, 1, 3, 99, -5]).map(lambda w: {"worker_id": w}),
    )
    return st.one_of(
        st.integers(1, n - 1).map(lambda k: ("truncate", valid[:-k])),
        st.tuples(data_index, st.integers(0, CHUNK + 8), st.integers(1, 255)).map(lambda a: ("flip", flip(a))),
        st.tuples(st.integers(0, n), st.binary(max_size=64)).map(
            lambda a: ("garbage", valid[: a[0]] + [b"\x07" + a[1]] + valid[a[0] :])
        ),  # wire type 7: never valid
        header_changes.map(lambda changes: ("header", [_first(vector, **changes)] + valid[1:])),
        st.just(("no header", valid[1:])),
        st.just(("empty", [])),
        data_index.map(lambda i: ("second header", valid[:i] + [valid[0]] + valid[i:])),
        st.binary(min_size=1, max_size=CHUNK).map(
            lambda extra: ("extra data", valid + [pb.GradientChunk(data=extra).SerializeToString()])
        ),
        st.tuples(st.integers(0, d - 1), st.sampled_from([float("nan"), float("inf"), -float("inf")])).map(
            lambda a: ("non-finite", with_values(a))
        ),
        # Above a whole vector, below gRPC's receive limit (two vectors): refused by the service, with its reason.
        st.integers(d * 4 + 1, 2 * d * 4).map(
            lambda size: ("oversized", valid[:1] + [pb.GradientChunk(data=bytes(size)).SerializeToString()])
        ),
        st.integers(1, n - 1).map(lambda k: ("cut", valid[:k])),
    )


EXPECTED = {
    "truncate": {grpc.StatusCode.DATA_LOSS},
    "flip": {grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT},
    "garbage": {grpc.StatusCode.INVALID_ARGUMENT},
    "header": {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    },
    "no header": {grpc.StatusCode.INVALID_ARGUMENT},
    "empty": {grpc.StatusCode.INVALID_ARGUMENT},
    "second header": {grpc.StatusCode.INVALID_ARGUMENT},
    "extra data": {grpc.StatusCode.INVALID_ARGUMENT},
    "non-finite": {grpc.StatusCode.INVALID_ARGUMENT},
    "oversized": {grpc.StatusCode.RESOURCE_EXHAUSTED},
    "cut": {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN},  # UNKNOWN: "Exception iterating requests!"
}


class _Cut(Exception):
    """Raised by a request iterator: the client abandons the call (gRPC cancels it)."""


def _requests(messages: list[bytes], cut: bool) -> Iterator[bytes]:
    yield from messages
    if cut:
        raise _Cut


# --- the test --------------------------------------------------------------------------------------


def test_random_malformed_streams_are_refused_counted_and_change_nothing(tmp_path: Path) -> None:
    config = _config()
    out = tmp_path / "run"
    out.mkdir()
    live = LiveCoordinator(
        CoordinatorSettings(config=config, out_dir=out, secret=TEST_SECRET, metrics_port=0, chunk_bytes=CHUNK)
    )
    with live as endpoint:
        channel = grpc.insecure_channel(f"127.0.0.1:{endpoint['port']}", options=grpc_options(1 << 20))
        stub = pb_grpc.CoordinatorStub(channel)
        replies = [
            stub.Join(pb.JoinRequest(worker_id=i, role=pb.HONEST), metadata=_md(i), timeout=30) for i in range(3)
        ]
        d = replies[0].num_parameters
        streams = [stub.Rounds(pb.RoundsRequest(worker_id=i), metadata=_md(i), timeout=120) for i in range(3)]
        readers = [codec.RoundEventReader(max_bytes=d * 4) for _ in range(3)]

        def next_round(i: int) -> codec.RoundParams | pb.RunEnd:
            for event in streams[i]:
                item = readers[i].feed(event)
                if item is not None:
                    return item
            raise AssertionError("the round stream ended without RunEnd")

        assert [next_round(i).round for i in range(3)] == [0, 0, 0]
        g = torch.Generator().manual_seed(5)
        rounds = [{i: torch.randn(d, generator=g) * 0.1 for i in range(3)} for _ in range(2)]
        submit = channel.stream_unary(SUBMIT, response_deserializer=pb.SubmitReply.FromString)
        thrown: dict[str, int] = {}
        counted = [0.0]  # rejections counted so far

        def count_after(minimum: float, wait: float) -> float:
            """The new total of rejections, once it reaches ``minimum`` or ``wait`` seconds have passed."""
            deadline = time.monotonic() + wait
            while True:
                total = sum(_rejections(endpoint["metrics_port"]).values())
                if total >= minimum or time.monotonic() > deadline:
                    return total
                time.sleep(0.01)

        @settings(
            max_examples=120,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(malformed_streams(rounds[0][TARGET]))
        def throw(case: tuple[str, list[bytes]]) -> None:
            kind, messages = case
            with pytest.raises(grpc.RpcError) as caught:
                submit(_requests(messages, cut=kind == "cut"), metadata=_md(TARGET), timeout=30)
            assert caught.value.code() in EXPECTED[kind], (kind, caught.value.code(), caught.value.details())
            thrown[kind] = thrown.get(kind, 0) + 1
            # Counted exactly once (the count may trail the reply by a moment). A stream the client cuts off
            # is counted once as cancelled (or truncated, when the server saw the stream end first), or not
            # at all if the call was gone before the service read it.
            total = count_after(counted[0] + 1, wait=2.0 if kind == "cut" else 10.0)
            assert total - counted[0] in ((0, 1) if kind == "cut" else (1,)), (kind, total - counted[0])
            counted[0] = total

        quiet = logging.getLogger("grpc._channel")  # it logs every cut stream's exception as an error
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            throw()
        finally:
            quiet.setLevel(level)
        assert thrown.keys() == EXPECTED.keys(), f"hypothesis did not try every kind: {sorted(thrown)}"
        counts = _rejections(endpoint["metrics_port"])
        assert counts["oversized"] == thrown["oversized"] and counts["malformed"] >= thrown["garbage"], counts
        # The real submissions: worker TARGET's vector is still welcome, and the rounds close on them. It
        # goes first: a stream refused for its content counted as TARGET's answer to round 0, so the round
        # would close without TARGET once the other two are in (rounds do not wait for workers that answered).
        for t, vectors in enumerate(rounds):
            if t:
                assert [next_round(i).round for i in range(3)] == [t] * 3
            for i in sorted(vectors, key=lambda i: i != TARGET):
                vector = vectors[i]
                reply = stub.SubmitGradient(
                    codec.vector_chunks(vector, round=t, worker_id=i, chunk_bytes=CHUNK), metadata=_md(i), timeout=30
                )
                assert reply.accepted
        summary = live.wait()
        channel.close()
    expected = RunState(config, tmp_path / "offline")
    for vectors in rounds:
        expected.close_round(vectors)
    assert summary["final_params_sha256"] == params_sha256(expected.params)
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line]
    assert [(r["round"], r["received_honest"]) for r in records] == [(0, 3), (1, 3)]
