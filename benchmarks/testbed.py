"""Benchmark of the testbed: the gRPC transport and whole rounds, as ratios against baselines run here.

Four measurements, each against a baseline measured in the same run (interleaved, same machine):

- **ingress**: the coordinator's ingress, MB/s of vectors accepted, decoded (header, CRC-32, finite
  check) and stored by ``arcsim.coordinator.service.serve``, with 13 clients uploading a 431,080-float32
  vector each (1.72 MB) at the same moment, against a plain ``grpc.aio`` client-streaming method
  that only stores the same bytes. Only the upload phase is timed: all clients hold the round's
  parameters and wait at a barrier, then upload; the phase ends with the last reply.
- **rounds**: seconds per round of ``arcsim run --engine grpc`` (a coordinator and 13 worker
  processes on loopback) against ``--engine inproc`` (one process) on ``configs/default.yaml``
  (the paper's CNN on Fashion-MNIST, 10 honest + 3 ALIE workers, ``arc > nnm > cwtm``).
- **loop**: rounds/s of the in-process engine against a plain single-process loop written here
  that trains the workers one after another on one model (what in-process libraries do) and makes
  the same pipeline call, with the same data, batches and attack (it ends on the same parameters).
- **transport**: rounds with trivial worker compute. The real coordinator (``serve``) drives 13
  lightweight asyncio clients (one process, one channel each) that speak the real protocol with the
  real codec (Join, Rounds, SubmitGradient: the calls ``arcsim.workers.service.Session`` makes) and answer
  every round at once with a constant vector. The floor is a plain ``grpc.aio`` program, with no
  arcsim code and no protobuf, moving the same bytes per round with the same pattern: a server
  stream pushes 1.72 MB to each of 13 clients, and each client uploads 1.72 MB in a client stream.
  The coordinator runs the pipeline ``mean`` (held to the target) and ``arc > nnm > cwtm``, and, as a
  diagnostic, ``mean`` with its per-round checkpoint turned off; the CPU seconds per round of the
  server and of the clients' process (from /proc) show where the time goes.

Time per round is the interval between consecutive rounds (parameters arriving at the clients, or
a round's record being written), after ``--warmup`` rounds and without the last round (which
evaluates); the ratios use the median interval. Everything runs with one torch thread per process
and uvloop, like ``arcsim run``.

    python benchmarks/testbed.py                          # all four, about 8 minutes on 2 cores
    python benchmarks/testbed.py --quick                  # smoke run of all four, under a minute
    python benchmarks/testbed.py transport ingress --json results.json --markdown tables.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported here or in a child
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
QUICK_ROUNDS_CONFIG = REPO / "configs" / "small.yaml"
NUM_CLIENTS = 13  # 10 honest + 3 Byzantine, the default config
VECTOR_NUMEL = 431_080  # the paper's CNN
VECTOR_BYTES = VECTOR_NUMEL * 4
CHUNK_BYTES = 1 << 20  # arcsim's default chunk (codec.DEFAULT_CHUNK_BYTES)
PLAIN_SERVICE = "bench.Plain"
TARGETS = {"ingress": 0.70, "rounds": 1.5, "transport": 1.5}  # from the issue
CLIENT_TIMEOUT = 600.0


# --------------------------------------------------------------------------------------------
# Shared helpers


def _run_async(coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on uvloop when installed (as the services do), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _intervals(times: Sequence[float], *, warmup: int) -> list[float]:
    """Differences of consecutive timestamps, skipping the first ``warmup`` intervals."""
    return [b - a for a, b in zip(times[warmup:], times[warmup + 1 :])]


def _summary(intervals: Sequence[float]) -> dict[str, float | int]:
    if not intervals:
        raise ValueError("no round intervals to summarise: run more rounds than --warmup + 2")
    return {
        "median_s": statistics.median(intervals),
        "mean_s": statistics.fmean(intervals),
        "min_s": min(intervals),
        "max_s": max(intervals),
        "intervals": len(intervals),
    }


def _median_of(runs: Sequence[dict[str, Any]], key: str = "median_s") -> float:
    return statistics.median(run[key] for run in runs)


def _local_channel_options(max_bytes: int) -> list[tuple[str, int]]:
    """One TCP connection per channel (no subchannel sharing), as with one worker per process."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def _spawn(target: Callable[..., None], *args: Any) -> tuple[multiprocessing.Process, Any]:
    """Start ``target(conn, *args)`` in a fresh interpreter; returns the process and our end of a pipe."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    return process, parent


def _receive(process: multiprocessing.Process, conn: Any, *, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        process.kill()
        raise RuntimeError(f"{what}: no answer within {timeout:.0f}s (exit code {process.exitcode})")
    message = conn.recv()
    if isinstance(message, dict) and "error" in message:
        raise RuntimeError(f"{what} failed: {message['error']}")
    return message


def _stop(process: multiprocessing.Process, timeout: float = 30.0) -> None:
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()


def _process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (all threads) from /proc; NaN where unavailable."""
    if pid is None:
        return math.nan
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@dataclass
class RoundClock:
    """Client-side timestamps (``time.perf_counter``) of every round, shared by the clients of a process.

    ``arrived[r]``: the first client holds round r's parameters; ``released[r]``: the clients leave
    the upload barrier; ``uploaded[r]``: the last client's upload has been answered.
    """

    arrived: dict[int, float] = field(default_factory=dict)
    released: dict[int, float] = field(default_factory=dict)
    uploaded: dict[int, float] = field(default_factory=dict)
    server_pid: int | None = None
    cpu: dict[int, tuple[float, float]] = field(default_factory=dict)  # round -> (server, client) CPU seconds

    def mark_arrived(self, round_: int) -> None:
        if round_ not in self.arrived:
            self.arrived[round_] = time.perf_counter()
            self.cpu[round_] = (_process_cpu_seconds(self.server_pid), time.process_time())

    def mark_released(self, round_: int) -> None:
        self.released.setdefault(round_, time.perf_counter())

    def mark_uploaded(self, round_: int) -> None:
        self.uploaded[round_] = time.perf_counter()

    def arrivals(self) -> list[float]:
        return [self.arrived[r] for r in sorted(self.arrived)]

    def cpu_per_round(self, *, warmup: int) -> dict[str, float]:
        """CPU seconds per round of the server and of the clients' process, from round ``warmup`` to the last."""
        first, last = warmup, max(self.cpu)
        if last <= first:
            return {}
        (server0, client0), (server1, client1) = self.cpu[first], self.cpu[last]
        out = {"client_cpu_s": (client1 - client0) / (last - first)}
        if server0 == server0 and server1 == server1:  # not NaN
            out["server_cpu_s"] = (server1 - server0) / (last - first)
        return out

    def upload_phases(self, *, warmup: int) -> list[float]:
        """Seconds from the barrier's release to the last answered upload, per round after ``warmup``.

        The last round is left out: its closing (which evaluates the model) starts as its last
        vector is accepted, and would compete with the last replies.
        """
        last = max(self.released)
        return [self.uploaded[r] - self.released[r] for r in sorted(self.released) if warmup <= r < last]


async def _gather_clients(coros: Sequence[Awaitable[None]]) -> None:
    await asyncio.wait_for(asyncio.gather(*coros), CLIENT_TIMEOUT)


# --------------------------------------------------------------------------------------------
# The plain floor: grpc.aio with raw bytes, no arcsim code, no protobuf


class PlainRounds:
    """Server of the floor: each round one payload to every client's stream, then one upload per client.

    ``Rounds`` (unary-stream) pushes the round's payload in ``chunk_bytes`` pieces; the client knows
    the payload's size, so nothing else is sent. ``Upload`` (stream-unary) joins the chunks into one
    bytes object and keeps it until the round ends. The next round starts when every client's upload
    is in.
    """

    def __init__(self, *, num_clients: int, payload_bytes: int, chunk_bytes: int, rounds: int) -> None:
        payload = os.urandom(payload_bytes)
        self.chunks = [payload[i : i + chunk_bytes] for i in range(0, payload_bytes, chunk_bytes)]
        self.num_clients = num_clients
        self.rounds = rounds
        self.round = -1
        self.ended = False
        self.subscribed = 0
        self.uploads: list[bytes] = []
        self.changed = asyncio.Condition()
        self.all_subscribed = asyncio.Event()
        self.all_in = asyncio.Event()

    async def stream_rounds(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        async with self.changed:
            self.subscribed += 1
            if self.subscribed >= self.num_clients:
                self.all_subscribed.set()
        sent = -1
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: self.ended or self.round > sent)
                current, ended = self.round, self.ended
            if current > sent:
                for chunk in self.chunks:
                    await context.write(chunk)
                sent = current
            elif ended:
                return

    async def upload(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> bytes:
        parts = [chunk async for chunk in request_iterator]
        self.uploads.append(b"".join(parts))
        if len(self.uploads) >= self.num_clients:
            self.all_in.set()
        return b""

    async def run(self) -> None:
        await self.all_subscribed.wait()
        for number in range(self.rounds):
            self.uploads = []
            self.all_in.clear()
            async with self.changed:
                self.round = number
                self.changed.notify_all()
            await self.all_in.wait()
        async with self.changed:
            self.ended = True
            self.changed.notify_all()


async def _plain_serve(conn: Any, num_clients: int, payload_bytes: int, chunk_bytes: int, rounds: int) -> None:
    state = PlainRounds(num_clients=num_clients, payload_bytes=payload_bytes, chunk_bytes=chunk_bytes, rounds=rounds)
    limit = chunk_bytes + (1 << 16)
    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    )
    handler = grpc.method_handlers_generic_handler(
        PLAIN_SERVICE,
        {
            "Rounds": grpc.unary_stream_rpc_method_handler(state.stream_rounds),
            "Upload": grpc.stream_unary_rpc_method_handler(state.upload),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    try:
        await state.run()
        await asyncio.sleep(0.1)  # let the streams deliver their end
    finally:
        await server.stop(1.0)


def _plain_server_main(conn: Any, num_clients: int, payload_bytes: int, chunk_bytes: int, rounds: int) -> None:
    try:
        _run_async(_plain_serve(conn, num_clients, payload_bytes, chunk_bytes, rounds))
    except Exception as error:  # reported to the parent, which raises
        conn.send({"error": repr(error)})
        raise


async def _plain_client(
    address: str, *, payload_bytes: int, chunk_bytes: int, barrier: asyncio.Barrier | None, clock: RoundClock
) -> None:
    payload = os.urandom(payload_bytes)
    chunks = [payload[i : i + chunk_bytes] for i in range(0, payload_bytes, chunk_bytes)]
    async with grpc.aio.insecure_channel(address, options=_local_channel_options(chunk_bytes + (1 << 16))) as channel:
        rounds = channel.unary_stream(f"/{PLAIN_SERVICE}/Rounds")
        upload = channel.stream_unary(f"/{PLAIN_SERVICE}/Upload")
        received: list[bytes] = []
        got = 0
        number = 0
        async for chunk in rounds(b"", wait_for_ready=True):
            received.append(chunk)
            got += len(chunk)
            if got < payload_bytes:
                continue
            b"".join(received)  # the receiver's copy of the parameters
            received, got = [], 0
            clock.mark_arrived(number)
            if barrier is not None:
                await barrier.wait()
                clock.mark_released(number)
            await upload(iter(chunks))
            clock.mark_uploaded(number)
            number += 1


def run_plain(
    *,
    rounds: int,
    barrier: bool,
    num_clients: int = NUM_CLIENTS,
    payload_bytes: int = VECTOR_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
) -> RoundClock:
    """One run of the floor: the server in a child process, ``num_clients`` clients in this one."""
    process, conn = _spawn(_plain_server_main, num_clients, payload_bytes, chunk_bytes, rounds)
    try:
        port = _receive(process, conn, timeout=60, what="plain server")
        clock = RoundClock(server_pid=process.pid)

        async def main() -> None:
            gate = asyncio.Barrier(num_clients) if barrier else None
            await _gather_clients(
                [
                    _plain_client(
                        f"127.0.0.1:{port}",
                        payload_bytes=payload_bytes,
                        chunk_bytes=chunk_bytes,
                        barrier=gate,
                        clock=clock,
                    )
                    for _ in range(num_clients)
                ]
            )

        _run_async(main())
        return clock
    finally:
        _stop(process)


# --------------------------------------------------------------------------------------------
# The real coordinator with lightweight clients (real protocol, real codec)


def _coordinator_main(conn: Any, config_yaml: str, out_dir: str, secret: str, checkpoints: bool) -> None:
    try:
        _one_torch_thread()
        import logging

        logging.basicConfig(level=logging.WARNING)
        from arcsim.config import loads_config
        from arcsim.coordinator.service import CoordinatorSettings, serve
        from arcsim.engine.rounds import RunState

        if not checkpoints:  # a diagnostic only: what the per-round checkpoint costs
            RunState.save_checkpoint = lambda self: None  # type: ignore[method-assign]

        config = loads_config(config_yaml)
        settings = CoordinatorSettings(config=config, out_dir=Path(out_dir), secret=secret, port=0, grace=1.0)
        summary = _run_async(serve(settings))
        conn.send({"final_params_sha256": summary["final_params_sha256"], "rounds": summary["rounds_completed"]})
    except Exception as error:
        conn.send({"error": repr(error)})
        raise


async def _arcsim_client(
    address: str, *, worker_id: int, secret: str, num_honest: int, barrier: asyncio.Barrier | None, clock: RoundClock
) -> None:
    """A worker that answers every round at once with a constant vector (the calls of ``Session``)."""
    import torch

    from arcsim.transport import codec, wire
    from arcsim.transport.auth import bearer, worker_token
    from arcsim.transport.channels import grpc_options
    from arcsim.transport.wire import CoordinatorStub
    from arcsim.v1 import coordinator_pb2 as pb

    honest = worker_id < num_honest
    metadata = bearer(worker_token(secret, "honest" if honest else "byzantine", worker_id))
    options = grpc_options(VECTOR_BYTES * 2 + (1 << 16)) + [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = CoordinatorStub(channel)
        reply = await stub.Join(
            pb.JoinRequest(worker_id=worker_id, role=pb.HONEST if honest else pb.BYZANTINE),
            metadata=metadata,
            wait_for_ready=True,
            timeout=60,
        )
        d = reply.num_parameters
        vector = torch.full((d,), 1e-3 * (worker_id + 1), dtype=torch.float32)
        reader = codec.RoundEventReader(max_bytes=d * 4, expected_shape=(d,), expected_dtype="float32")
        stream = stub.Rounds(pb.RoundsRequest(worker_id=worker_id, from_round=reply.current_round), metadata=metadata)
        async for event in stream:
            item = reader.feed(event)
            if isinstance(item, codec.RoundParams) and item.params is not None:
                clock.mark_arrived(item.round)
                if barrier is not None:
                    await barrier.wait()
                    clock.mark_released(item.round)
                await stub.SubmitGradient(
                    wire.vector_stream(
                        vector, round=item.round, worker_id=worker_id, chunk_bytes=reply.chunk_bytes, train_loss=0.0
                    ),
                    metadata=metadata,
                )
                clock.mark_uploaded(item.round)
            elif isinstance(item, pb.RunEnd):
                return
        raise RuntimeError(f"worker {worker_id}: the round stream ended without RunEnd")


def transport_config(*, rounds: int, pipeline: str) -> Any:
    """configs/default.yaml with ``rounds`` rounds, ``pipeline``, and evaluation after the last round only."""
    from arcsim.config import load_config

    return load_config(DEFAULT_CONFIG, {"rounds": rounds, "eval_every": 1_000_000, "pipeline": pipeline})


def run_arcsim(
    *, rounds: int, barrier: bool, pipeline: str, checkpoints: bool = True
) -> tuple[RoundClock, dict[str, Any]]:
    """One run of the real coordinator in a child process with 13 lightweight clients in this one.

    ``checkpoints=False`` replaces ``RunState.save_checkpoint`` by a no-op in the coordinator's
    process: a diagnostic of what the checkpoint written after every round costs.
    """
    from arcsim.transport.auth import new_secret

    config = transport_config(rounds=rounds, pipeline=pipeline)
    if config.num_workers != NUM_CLIENTS:
        raise ValueError(f"{DEFAULT_CONFIG} has {config.num_workers} workers; this benchmark expects {NUM_CLIENTS}")
    secret = new_secret()
    with tempfile.TemporaryDirectory(prefix="arcsim-bench-") as out:
        process, conn = _spawn(_coordinator_main, config.to_yaml(), out, secret, checkpoints)
        try:
            endpoint = Path(out) / "coordinator.json"
            deadline = time.monotonic() + 120
            while not endpoint.exists():
                if not process.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the coordinator did not start (exit code {process.exitcode})")
                time.sleep(0.02)
            address = f"127.0.0.1:{json.loads(endpoint.read_text())['port']}"
            clock = RoundClock(server_pid=process.pid)

            async def main() -> None:
                gate = asyncio.Barrier(NUM_CLIENTS) if barrier else None
                await _gather_clients(
                    [
                        _arcsim_client(
                            address, worker_id=i, secret=secret, num_honest=config.num_honest, barrier=gate, clock=clock
                        )
                        for i in range(NUM_CLIENTS)
                    ]
                )

            _run_async(main())
            result = _receive(process, conn, timeout=120, what="coordinator")
            records = [json.loads(line) for line in (Path(out) / "rounds.jsonl").read_text().splitlines() if line]
            result["aggregation_s_median"] = (
                statistics.median(r["aggregation_seconds"] for r in records) if records else None
            )
            return clock, result
        finally:
            _stop(process)


# --------------------------------------------------------------------------------------------
# ingress


def bench_ingress(*, rounds: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Upload phase of 13 clients: the real coordinator against plain client streaming, interleaved."""
    per_round_bytes = NUM_CLIENTS * VECTOR_BYTES
    runs: dict[str, list[float]] = {"plain": [], "arcsim": []}
    for _ in range(repeats):
        for name in ("plain", "arcsim"):
            if name == "plain":
                clock = run_plain(rounds=rounds, barrier=True)
            else:
                clock, _ = run_arcsim(rounds=rounds, barrier=True, pipeline="mean")
            runs[name].extend(clock.upload_phases(warmup=warmup))
    out: dict[str, Any] = {"bytes_per_round": per_round_bytes, "rounds_timed": {k: len(v) for k, v in runs.items()}}
    for name, phases in runs.items():
        out[name] = {
            "MB_per_s": per_round_bytes / statistics.median(phases) / 1e6,  # the median round
            "MB_per_s_all_rounds": per_round_bytes * len(phases) / sum(phases) / 1e6,  # outliers included
            "phase_median_s": statistics.median(phases),
            "phase_max_s": max(phases),
        }
    out["ratio"] = out["arcsim"]["MB_per_s"] / out["plain"]["MB_per_s"]
    out["target"] = TARGETS["ingress"]
    out["met"] = out["ratio"] >= TARGETS["ingress"]
    return out


# --------------------------------------------------------------------------------------------
# transport


@dataclass(frozen=True)
class Variant:
    """One coordinator setting of the transport benchmark."""

    pipeline: str
    checkpoints: bool = True

    @property
    def name(self) -> str:
        return self.pipeline if self.checkpoints else f"{self.pipeline}, checkpoints off"


def bench_transport(*, rounds: int, repeats: int, warmup: int, variants: Sequence[Variant]) -> dict[str, Any]:
    """Rounds with trivial worker compute: the real coordinator against the plain floor, interleaved.

    The first variant is the one held to the target; the others explain where the time goes.
    """
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], **{v.name: [] for v in variants}}
    aggregation: dict[str, list[float | None]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        clock = run_plain(rounds=rounds, barrier=False)
        runs["plain"].append(
            {**_summary(_intervals(clock.arrivals(), warmup=warmup)), **clock.cpu_per_round(warmup=warmup)}
        )
        for variant in variants:
            clock, result = run_arcsim(
                rounds=rounds, barrier=False, pipeline=variant.pipeline, checkpoints=variant.checkpoints
            )
            runs[variant.name].append(
                {**_summary(_intervals(clock.arrivals(), warmup=warmup)), **clock.cpu_per_round(warmup=warmup)}
            )
            aggregation[variant.name].append(result["aggregation_s_median"])

    def side(name: str) -> dict[str, Any]:
        out = {"median_s": _median_of(runs[name]), "runs": runs[name]}
        for key in ("server_cpu_s", "client_cpu_s"):
            values = [run[key] for run in runs[name] if key in run]
            if values:
                out[key] = statistics.median(values)
        return out

    floor = side("plain")
    out: dict[str, Any] = {"plain": floor, "variants": {}}
    for variant in variants:
        result = side(variant.name)
        values = [a for a in aggregation[variant.name] if a is not None]
        result.update(
            pipeline=variant.pipeline,
            checkpoints=variant.checkpoints,
            aggregation_s_median=statistics.median(values) if values else None,
            ratio=result["median_s"] / floor["median_s"],
        )
        out["variants"][variant.name] = result
    out["headline"] = variants[0].name
    out["ratio"] = out["variants"][variants[0].name]["ratio"]
    out["target"] = TARGETS["transport"]
    out["met"] = out["ratio"] <= TARGETS["transport"]
    return out


# --------------------------------------------------------------------------------------------
# rounds: arcsim run --engine grpc against --engine inproc


def _inproc_main(conn: Any, config_yaml: str, out_dir: str) -> None:
    try:
        _one_torch_thread()
        from arcsim.config import loads_config
        from arcsim.engine.inproc import run_inproc

        times: list[float] = []
        summary = run_inproc(
            loads_config(config_yaml), Path(out_dir), on_round=lambda state, record: times.append(time.perf_counter())
        )
        conn.send({"times": times, "final_params_sha256": summary["final_params_sha256"]})
    except Exception as error:
        conn.send({"error": repr(error)})
        raise


def run_engine_inproc(config: Any) -> dict[str, Any]:
    """``run_inproc`` (what ``arcsim run --engine inproc`` calls) in a fresh process; completion time of each round."""
    with tempfile.TemporaryDirectory(prefix="arcsim-bench-") as out:
        process, conn = _spawn(_inproc_main, config.to_yaml(), out)
        try:
            return _receive(process, conn, timeout=1800, what="inproc engine")
        finally:
            _stop(process)


def run_engine_grpc(config_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """``arcsim run --engine grpc``; completion times of the rounds from the coordinator's log."""
    with tempfile.TemporaryDirectory(prefix="arcsim-bench-") as out:
        command = [
            sys.executable,
            "-m",
            "arcsim",
            "run",
            str(config_path),
            "--engine",
            "grpc",
            "--out",
            out,
            "--no-progress",
        ]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"arcsim run --engine grpc failed: {done.stderr.strip()[-2000:]}")
        times: dict[int, float] = {}
        for line in (Path(out) / "logs" / "coordinator.log").read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "round":
                times[int(entry["round"])] = float(entry["time"])
        summary = json.loads((Path(out) / "summary.json").read_text())
        return {"times": [times[r] for r in sorted(times)], "final_params_sha256": summary["final_params_sha256"]}


def bench_rounds(*, config_path: Path, rounds: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Seconds per round of the two engines on the same config, interleaved."""
    from arcsim.config import load_config

    overrides = {"rounds": rounds, "eval_every": rounds}
    config = load_config(config_path, overrides)
    runs: dict[str, list[dict[str, Any]]] = {"inproc": [], "grpc": []}
    digests: set[str] = set()
    for _ in range(repeats):
        for engine in ("inproc", "grpc"):
            result = run_engine_inproc(config) if engine == "inproc" else run_engine_grpc(config_path, overrides)
            runs[engine].append(_summary(_intervals(result["times"][:-1], warmup=warmup)))  # the last round evaluates
            digests.add(result["final_params_sha256"])
    inproc, grpc_s = _median_of(runs["inproc"]), _median_of(runs["grpc"])
    return {
        "config": str(config_path.relative_to(REPO)),
        "overrides": overrides,
        "inproc": {"median_s": inproc, "runs": runs["inproc"]},
        "grpc": {"median_s": grpc_s, "runs": runs["grpc"]},
        "same_final_params": len(digests) == 1,
        "ratio": grpc_s / inproc,
        "target": TARGETS["rounds"],
        "met": grpc_s / inproc <= TARGETS["rounds"],
    }


# --------------------------------------------------------------------------------------------
# loop: the in-process engine against a plain single-process loop


def plain_loop(config: Any, *, on_round: Callable[[int], None]) -> Any:
    """Robust D-SGD written as a plain loop: one model, the workers trained one after another.

    Honest worker i, round t: load theta_t into the model, gradient on a batch of its shard (the same
    batch the testbed draws), momentum m_i <- beta m_i + (1 - beta) g_i; then the Byzantine rows
    crafted by the attack, the pipeline on the stacked (n, d) matrix, and
    theta <- theta - lr (R + weight_decay theta). Returns the final parameters.
    """
    import torch
    import torch.nn.functional as F

    from arcsim.attacks import craft
    from arcsim.robust import build_pipeline
    from arcsim.seeding import generator
    from arcsim.tasks import build_model, load_dataset, partition

    dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
    shard_list = partition(
        dataset.train_y, num_workers=config.num_honest, method=config.partitioner, alpha=config.alpha, seed=config.seed
    )
    xs = [dataset.train_x[s] for s in shard_list]
    ys = [dataset.train_y[s] for s in shard_list]
    model = build_model(
        config.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=config.seed
    )
    weights = list(model.parameters())
    params = torch.nn.utils.parameters_to_vector(weights).detach().clone()
    pipeline = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)
    momenta: list[Any] = [None] * config.num_honest
    beta = config.momentum
    for t in range(config.rounds):
        for i in range(config.num_honest):
            batch = torch.randperm(ys[i].shape[0], generator=generator(config.seed, "batch", t, i))
            batch = batch[: min(config.batch_size, ys[i].shape[0])]
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(params, weights)
            for w in weights:
                w.grad = None
            F.nll_loss(model(xs[i][batch]), ys[i][batch]).backward()
            grad = torch.cat([w.grad.reshape(-1) for w in weights])
            momenta[i] = (
                grad.mul_(1.0 - beta) if momenta[i] is None else momenta[i].mul_(beta).add_(grad, alpha=1 - beta)
            )
        honest = torch.stack(momenta)
        byzantine = craft(
            config.attack,
            honest,
            num_byzantine=config.num_byzantine,
            num_workers=config.num_workers,
            aggregate=lambda x: pipeline(x)[0],
            generator=generator(config.seed, "attack", t),
            **config.attack_params,
        )
        aggregate, _ = pipeline(torch.cat([honest, byzantine]))
        update = aggregate.add(params, alpha=config.weight_decay) if config.weight_decay else aggregate
        params = params.sub(update, alpha=config.lr_at(t))
        on_round(t)
    return params


def bench_loop(*, config_path: Path, rounds: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Rounds/s of ``run_inproc`` against :func:`plain_loop`, in this process, interleaved."""
    _one_torch_thread()
    from arcsim.config import load_config
    from arcsim.engine.inproc import run_inproc
    from arcsim.engine.rounds import params_sha256

    config = load_config(config_path, {"rounds": rounds, "eval_every": rounds})
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "inproc": []}
    digests: dict[str, str] = {}
    for _ in range(repeats):
        times: list[float] = []
        params = plain_loop(config, on_round=lambda t: times.append(time.perf_counter()))
        digests["plain"] = params_sha256(params)
        runs["plain"].append(_summary(_intervals(times[:-1], warmup=warmup)))
        times = []
        with tempfile.TemporaryDirectory(prefix="arcsim-bench-") as out:
            summary = run_inproc(config, Path(out), on_round=lambda state, record: times.append(time.perf_counter()))
        digests["inproc"] = summary["final_params_sha256"]
        runs["inproc"].append(_summary(_intervals(times[:-1], warmup=warmup)))  # the last round evaluates
    plain, inproc = _median_of(runs["plain"]), _median_of(runs["inproc"])
    return {
        "config": str(config_path.relative_to(REPO)),
        "plain": {"median_s": plain, "rounds_per_s": 1 / plain, "runs": runs["plain"]},
        "inproc": {"median_s": inproc, "rounds_per_s": 1 / inproc, "runs": runs["inproc"]},
        "same_final_params": digests["plain"] == digests["inproc"],
        "ratio": plain / inproc,  # inproc rounds/s over the loop's rounds/s
    }


# --------------------------------------------------------------------------------------------
# Reporting


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    lines = [
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']},"
        f" grpcio {m['grpcio']}; load average {m['loadavg_start']} at the start, {m.get('loadavg_end')} at the end.",
        f"Command: `{command}`",
        "",
        "| measurement | arcsim | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    if "ingress" in results:
        r = results["ingress"]
        lines.append(
            f"| coordinator ingress, 13 x 1.72 MB at once | {r['arcsim']['MB_per_s']:.0f} MB/s |"
            f" {r['plain']['MB_per_s']:.0f} MB/s (plain grpc.aio client streaming) | {r['ratio']:.2f} |"
            f" >= {r['target']:.2f} | {'yes' if r['met'] else 'no'} |"
        )
    if "rounds" in results:
        r = results["rounds"]
        lines.append(
            f"| s/round, `{r['config']}`, engine grpc vs inproc | {r['grpc']['median_s']:.3f} s |"
            f" {r['inproc']['median_s']:.3f} s (inproc) | {r['ratio']:.2f} | <= {r['target']:.1f} |"
            f" {'yes' if r['met'] else 'no'} |"
        )
    if "loop" in results:
        r = results["loop"]
        lines.append(
            f"| rounds/s, `{r['config']}`, inproc engine vs plain loop | {r['inproc']['rounds_per_s']:.2f} |"
            f" {r['plain']['rounds_per_s']:.2f} (one model, workers in turn) | {r['ratio']:.2f} | - | - |"
        )
    if "transport" in results:
        r = results["transport"]
        for name, v in r["variants"].items():
            headline = name == r["headline"]
            target = f"<= {r['target']:.1f}" if headline else "(diagnostic)"
            met = ("yes" if v["ratio"] <= r["target"] else "no") if headline else "-"
            lines.append(
                f"| s/round, trivial compute, `{name}` | {v['median_s']:.3f} s |"
                f" {r['plain']['median_s']:.3f} s (plain grpc.aio floor) | {v['ratio']:.2f} | {target} |"
                f" {met} |"
            )
    if "transport" in results:
        r = results["transport"]
        lines += [
            "",
            "Transport, per round (medians over runs): wall time, CPU seconds of the server process and of the"
            " clients' process, and the coordinator's aggregation time from rounds.jsonl.",
            "",
            "| side | s/round | server CPU s/round | clients CPU s/round | aggregation s |",
            "|---|---|---|---|---|",
        ]

        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        floor = r["plain"]
        lines.append(
            f"| plain grpc.aio floor | {floor['median_s']:.3f} | {cell(floor.get('server_cpu_s'))} |"
            f" {cell(floor.get('client_cpu_s'))} | - |"
        )
        for name, v in r["variants"].items():
            lines.append(
                f"| arcsim, `{name}` | {v['median_s']:.3f} | {cell(v.get('server_cpu_s'))} |"
                f" {cell(v.get('client_cpu_s'))} | {cell(v.get('aggregation_s_median'))} |"
            )
    return "\n".join(lines) + "\n"


def _print_result(name: str, result: dict[str, Any]) -> None:
    if name == "ingress":
        print(
            f"ingress: arcsim {result['arcsim']['MB_per_s']:.0f} MB/s, plain {result['plain']['MB_per_s']:.0f} MB/s,"
            f" ratio {result['ratio']:.2f} (target >= {result['target']})"
        )
    elif name == "transport":
        floor = result["plain"]
        for name, v in result["variants"].items():
            print(
                f"transport [{name}]: {v['median_s']:.3f} s/round vs floor {floor['median_s']:.3f},"
                f" ratio {v['ratio']:.2f}; CPU s/round server {v.get('server_cpu_s', math.nan):.3f}"
                f" (floor {floor.get('server_cpu_s', math.nan):.3f}), clients {v.get('client_cpu_s', math.nan):.3f}"
                f" (floor {floor.get('client_cpu_s', math.nan):.3f})"
            )
    elif name == "rounds":
        print(
            f"rounds: grpc {result['grpc']['median_s']:.3f} s/round, inproc {result['inproc']['median_s']:.3f},"
            f" ratio {result['ratio']:.2f} (target <= {result['target']}), same params: {result['same_final_params']}"
        )
    elif name == "loop":
        print(
            f"loop: inproc {result['inproc']['rounds_per_s']:.2f} rounds/s, plain loop"
            f" {result['plain']['rounds_per_s']:.2f}, ratio {result['ratio']:.2f},"
            f" same params: {result['same_final_params']}"
        )
    sys.stdout.flush()


BENCHES = ("ingress", "transport", "loop", "rounds")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "benches", nargs="*", default=[], metavar="BENCH", help=f"which to run: {', '.join(BENCHES)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, one repeat, small config for 'rounds'")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: 40; quick: 6)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs of each side (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="round intervals skipped per run (default 3; quick 1)")
    parser.add_argument(
        "--pipelines",
        default=None,
        help="'|'-separated pipelines for transport; the first is held to the target"
        " (default: 'mean|arc > nnm > cwtm'; quick: 'mean')",
    )
    parser.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="transport: skip the extra run of the first pipeline with checkpoints off (default: on unless --quick)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config for rounds and loop (default configs/default.yaml; quick rounds: configs/small.yaml)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="write the summary table to this file")
    args = parser.parse_args(argv)
    unknown = [b for b in args.benches if b not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    for name in ("rounds", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    _one_torch_thread()
    benches = args.benches or list(BENCHES)
    rounds = args.rounds or (6 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if rounds < warmup + 3:
        raise SystemExit(f"--rounds {rounds} is too few for --warmup {warmup}: need at least {warmup + 3}")
    pipelines = [p.strip() for p in (args.pipelines or ("mean" if args.quick else "mean|arc > nnm > cwtm")).split("|")]
    loop_config = args.config or DEFAULT_CONFIG
    rounds_config = args.config or (QUICK_ROUNDS_CONFIG if args.quick else DEFAULT_CONFIG)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {"rounds": rounds, "repeats": repeats, "warmup": warmup},
    }
    started = time.perf_counter()
    for name in benches:
        if name == "ingress":
            result = bench_ingress(rounds=rounds, repeats=repeats, warmup=warmup)
        elif name == "transport":
            variants = [Variant(p) for p in pipelines]
            if not (args.quick or args.no_diagnostics):
                variants.append(Variant(pipelines[0], checkpoints=False))
            result = bench_transport(rounds=rounds, repeats=repeats, warmup=warmup, variants=variants)
        elif name == "loop":
            result = bench_loop(config_path=loop_config, rounds=rounds, repeats=repeats, warmup=warmup)
        else:
            result = bench_rounds(config_path=rounds_config, rounds=rounds, repeats=repeats, warmup=warmup)
        results[name] = result
        _print_result(name, result)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"done in {results['seconds']:.0f}s")
    command = "python benchmarks/testbed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(results, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
