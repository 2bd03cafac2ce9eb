"""The worker service: joins the coordinator, follows its rounds, submits a vector per round.

The honest worker (``arcsim worker``) and the adversary (``arcsim adversary``, arcsim/adversaries/service.py)
share this client; they differ only in what they compute from a round's parameters. The client
reconnects by itself (retry with exponential backoff) when the coordinator is unreachable or
restarts, keeping its momentum in memory; a worker that restarts fetches its momentum from the
coordinator instead. Every call has a deadline derived from the round's (``call_timeout``), so a
coordinator that stops answering costs the worker a round, not the run. With ``metrics_port`` set, the
worker serves its Prometheus metrics (arcsim/workers/metrics.py) while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from arcsim.config import RunConfig, loads_config
from arcsim.roles import Role
from arcsim.transport import codec, wire
from arcsim.transport.auth import ANY_ID, bearer
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.workers.metrics import WorkerMetrics

log = logging.getLogger("arcsim.worker")

# Errors after which the worker reconnects rather than giving up.
_RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


@dataclass(frozen=True)
class WorkerSettings:
    coordinator: str  # host:port
    worker_id: int  # ANY_ID (-1): ask the coordinator for the first free id of the role (needs a role token)
    token: str
    device: str = "auto"
    max_retry_seconds: float = 300.0  # give up after this long without reaching the coordinator
    channel_credentials: grpc.ChannelCredentials | None = field(default=None, compare=False)
    tls_server_name: str | None = None  # TLS: the name the coordinator's certificate must carry (default: its host)
    # Prometheus /metrics of this worker (arcsim/workers/metrics.py): None serves none, 0 any free port.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Calls tied to a round (SubmitGradient, Observe) get the time left until the round's deadline plus
    # this margin (for the clocks of worker and coordinator disagreeing), and never less than it;
    # FetchMomentum gets a whole round's deadline plus it.
    deadline_margin: float = 5.0

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be None or a port in 0..65535, got {self.metrics_port}")
        if not self.deadline_margin > 0:
            raise ValueError(f"deadline_margin must be a positive number of seconds, got {self.deadline_margin}")


def call_timeout(deadline_unix_ms: int, *, round_deadline: float, margin: float) -> float:
    """Seconds a call tied to a round may take: the time left until the round's deadline, plus ``margin``.

    The time left is taken between 0 (the deadline passed: the call still gets ``margin`` to hear the
    refusal) and ``round_deadline`` (a worker whose clock is behind the coordinator's waits no longer
    than a whole round). A round without a deadline (``deadline_unix_ms`` 0) gets a whole round.
    """
    if deadline_unix_ms <= 0:
        return round_deadline + margin
    left = deadline_unix_ms / 1000 - time.time()
    return min(max(left, 0.0), round_deadline) + margin


def _stream_ended() -> grpc.aio.AioRpcError:
    """A round stream that ended without RunEnd: UNAVAILABLE, so that the worker reconnects."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="the round stream ended without RunEnd",
    )


def _reason(error: grpc.aio.AioRpcError) -> str | None:
    """The coordinator's counted reason for refusing a call (its trailing metadata), if it gave one."""
    from arcsim.transport.channels import REASON_METADATA_KEY

    for key, value in error.trailing_metadata() or ():
        if key == REASON_METADATA_KEY:
            return value
    return None


class Participant:
    """What a worker computes; subclasses: the honest worker and the adversary."""

    role: int = pb.HONEST
    worker_id: int = ANY_ID
    metadata: tuple[tuple[str, str], ...] = ()  # the session's credentials, for the participant's own calls
    round_timeout: float | None = None  # the open round's timeout for the participant's own calls (e.g. Observe)

    def setup(self, config: RunConfig, device: torch.device) -> None:
        """Build the computation once the run's config and this worker's id are known."""
        raise NotImplementedError

    def set_momentum(self, momentum: torch.Tensor | None) -> None:
        raise NotImplementedError

    async def compute(
        self, stub: wire.CoordinatorStub, round_: int, params: torch.Tensor
    ) -> tuple[torch.Tensor, float] | None:
        """This round's vector and training loss, or None to sit the round out."""
        raise NotImplementedError

    async def step(
        self, stub: wire.CoordinatorStub, step: int, newest: Callable[[], tuple[int, torch.Tensor]], duration: float
    ) -> tuple[int, torch.Tensor, float] | None:
        """``schedule: async``: one step, taking ``duration`` seconds at least; ``newest()`` is the newest
        (version, parameters) the worker holds. Returns the version the vector was computed on, the vector
        and the training loss, or None to sit the step out.

        By default the worker computes on the newest version when the step starts, then sleeps for what
        is left of ``duration``."""
        version, params = newest()
        started = time.perf_counter()
        result = await self.compute(stub, step, params)
        await asyncio.sleep(max(duration - (time.perf_counter() - started), 0.0))
        if result is None:
            return None
        return version, result[0], result[1]


class Session:
    """One worker id following a run. ``metrics``: shared by the sessions of one process (colluding
    adversaries), which then serves it; by default the session makes its own, served on
    ``settings.metrics_port`` while it runs."""

    def __init__(
        self, settings: WorkerSettings, participant: Participant, *, metrics: WorkerMetrics | None = None
    ) -> None:
        from arcsim.engine.honest import resolve_device

        self.settings = settings
        self.participant = participant
        self.device = resolve_device(settings.device)
        self._own_metrics = metrics is None
        self.metrics = (
            metrics if metrics is not None else WorkerMetrics(role=role_name(participant.role), device=self.device)
        )
        self.worker_id = settings.worker_id
        self.metadata = bearer(settings.token)
        self.config: RunConfig | None = None
        self.num_parameters = 0
        self.chunk_bytes = codec.DEFAULT_CHUNK_BYTES
        self.run_id: str | None = None
        self.rounds_done = 0
        self.steps = 0  # schedule: async: the steps this worker computed (its step number draws its batch)
        self.reached = False  # a Join was answered since the last failure: the outage that follows is a new one

    def _channel(self, max_bytes: int) -> grpc.aio.Channel:
        from arcsim.transport.channels import grpc_options

        options = grpc_options(max_bytes)
        if self.settings.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.settings.tls_server_name))
        if self.settings.channel_credentials is not None:
            return grpc.aio.secure_channel(self.settings.coordinator, self.settings.channel_credentials, options)
        return grpc.aio.insecure_channel(self.settings.coordinator, options=options)

    async def run(self) -> str:
        """Follow the run to its end; returns the RunEnd reason.

        While the coordinator cannot be reached, retry with exponential backoff and jitter, and give
        up after ``max_retry_seconds``; both start over once a Join is answered, so they bound each
        outage rather than all the outages of a run together.
        """
        if self._own_metrics and self.settings.metrics_port is not None:
            port = self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
            log.info("serving /metrics on %s:%d", self.settings.metrics_host, port)
        try:
            return await self._run()
        finally:
            if self._own_metrics:
                self.metrics.close()

    async def _run(self) -> str:
        delay = 0.2
        waited = 0.0
        while True:
            self.reached = False
            try:
                reason = await self._connect_and_follow()
                return reason
            except grpc.aio.AioRpcError as error:
                if self.reached:
                    delay, waited = 0.2, 0.0
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and self.config is None:
                    # Every id of our role is taken: wait as a hot spare for one to free up.
                    log.info("no free worker id yet (%s); waiting as a spare", error.details())
                    await asyncio.sleep(5.0 * (0.75 + 0.5 * random.random()))
                    continue
                if error.code() == grpc.StatusCode.ABORTED and _reason(error) == "subscription_replaced":
                    # Another process holds this worker's credentials and opened its own round stream:
                    # taking it back would only make the two displace each other every round.
                    raise RuntimeError(
                        f"worker {self.worker_id}: another process with the same worker id and "
                        f"credentials took over its round stream ({error.details()})"
                    ) from None
                if error.code() not in _RETRY:
                    raise
                if waited >= self.settings.max_retry_seconds:
                    raise
                # The details carry the cause (connection refused, a TLS handshake failure, ...).
                log.warning(
                    "coordinator unreachable (%s: %s); retrying in %.1fs", error.code().name, error.details(), delay
                )
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0) * (0.75 + 0.5 * random.random())

    async def _connect_and_follow(self) -> str:
        max_bytes = max(self.num_parameters * 8, 64 << 20)
        async with self._channel(max_bytes + (1 << 16)) as channel:
            stub = wire.CoordinatorStub(channel)
            reply = await stub.Join(
                pb.JoinRequest(worker_id=self.worker_id, role=self.participant.role), metadata=self.metadata, timeout=30
            )  # fails fast: run() retries
            self.reached = True
            if reply.token:  # an id was assigned: keep it, with its own token, for every later call
                self.worker_id = reply.worker_id
                self.metadata = bearer(reply.token)
                log.info("assigned worker id %d", self.worker_id)
            if self.config is None or reply.run_id != self.run_id:
                self._setup(reply)
            return await self._follow(stub, reply.current_round)

    def _setup(self, reply: pb.JoinReply) -> None:
        self.config = loads_config(reply.config_yaml, source="the coordinator's config")
        self.run_id = reply.run_id
        self.num_parameters = reply.num_parameters
        self.chunk_bytes = reply.chunk_bytes or codec.DEFAULT_CHUNK_BYTES
        self.participant.worker_id = self.worker_id
        self.participant.metadata = self.metadata
        self.participant.setup(self.config, self.device)

    async def _fetch_momentum(self, stub: wire.CoordinatorStub) -> torch.Tensor | None:
        reader = codec.ObserveEventReader(
            max_bytes=self.num_parameters * 4, expected_shape=(self.num_parameters,), expected_dtype="float32"
        )
        found = None
        # Outside any round's deadline: a whole round's, so a stalled coordinator cannot hold the worker.
        timeout = self.config.round_deadline + self.settings.deadline_margin
        async for event in stub.FetchMomentum(
            pb.FetchMomentumRequest(worker_id=self.worker_id), metadata=self.metadata, timeout=timeout
        ):
            item = reader.feed(event)
            if item is not None:
                found = item.vector
        reader.finish()
        return found

    async def _follow(self, stub: wire.CoordinatorStub, from_round: int) -> str:
        if self.config.schedule == "async":
            return await self._follow_async(stub, from_round)
        reader = codec.RoundEventReader(
            max_bytes=self.num_parameters * 4, expected_shape=(self.num_parameters,), expected_dtype="float32"
        )
        stream = stub.Rounds(pb.RoundsRequest(worker_id=self.worker_id, from_round=from_round), metadata=self.metadata)
        synced = False
        async for event in stream:
            item = reader.feed(event)
            if isinstance(item, codec.RoundParams) and item.params is not None:
                if not synced:
                    # Take the momentum the coordinator holds for this worker as of the round before this
                    # one (every earlier round is closed once this one is open), also after a reconnect:
                    # the in-memory one may include a step of a round the coordinator never applied (it
                    # restarted from a checkpoint, or this worker's vector of the open round was
                    # accepted and gets recomputed now), and would then be one step ahead.
                    self.participant.set_momentum(await self._fetch_momentum(stub))
                    synced = True
                # A vector refused as late (rounds queued during a network cut that the connection
                # survived) left a step in the in-memory momentum that the coordinator never applied.
                synced = await self._do_round(stub, item)
            elif isinstance(item, pb.RunEnd):
                log.info("run ended after %d rounds: %s", item.rounds_completed, item.reason)
                return item.reason
        reader.finish()
        raise _stream_ended()

    async def _follow_async(self, stub: wire.CoordinatorStub, from_round: int) -> str:
        """``schedule: async``: step after step, each on the newest version the round stream brought, taking
        the time the worker's speed draws for it (arcsim.schedule.Speeds), until RunEnd."""
        from arcsim.schedule import Speeds

        config = self.config
        speeds = Speeds(config.speeds, seed=config.seed, num_honest=config.num_honest, num_workers=config.num_workers)
        reader = codec.RoundEventReader(
            max_bytes=self.num_parameters * 4, expected_shape=(self.num_parameters,), expected_dtype="float32"
        )
        stream = stub.Rounds(pb.RoundsRequest(worker_id=self.worker_id, from_round=from_round), metadata=self.metadata)
        newest: list[tuple[int, torch.Tensor]] = []
        arrived = asyncio.Event()

        async def follow_versions() -> str:
            async for event in stream:
                item = reader.feed(event)
                if isinstance(item, codec.RoundParams) and item.params is not None:
                    newest[:] = [(item.round, item.params)]
                    arrived.set()
                    self.metrics.round_followed()
                elif isinstance(item, pb.RunEnd):
                    log.info("run ended after %d updates: %s", item.rounds_completed, item.reason)
                    return item.reason
            reader.finish()
            raise _stream_ended()

        following = asyncio.ensure_future(follow_versions())
        try:
            synced = False
            while True:
                waiting = asyncio.ensure_future(arrived.wait())
                await asyncio.wait({following, waiting}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if following.done():
                    return following.result()  # RunEnd, or the stream's error (run() reconnects)
                if not synced:
                    # The momentum the coordinator holds for this worker: its last vector received (what a
                    # replay continues from), also after a reconnect or a refused submission.
                    self.participant.set_momentum(await self._fetch_momentum(stub))
                    synced = True
                step, self.steps = self.steps, self.steps + 1
                # The run may end (or the stream fail) while the step computes or sleeps: it is then cut short.
                stepping = asyncio.ensure_future(
                    self._do_step(stub, step, lambda: newest[0], speeds.duration(self.worker_id, step))
                )
                await asyncio.wait({following, stepping}, return_when=asyncio.FIRST_COMPLETED)
                if not stepping.done():
                    stepping.cancel()
                    await asyncio.wait({stepping})
                    return following.result()
                synced = stepping.result()
        finally:
            following.cancel()

    async def _do_step(
        self, stub: wire.CoordinatorStub, step: int, newest: Callable[[], tuple[int, torch.Tensor]], duration: float
    ) -> bool:
        """One asynchronous step and its submission; False if the momentum may now differ from the coordinator's."""
        self.participant.round_timeout = self.config.round_deadline + self.settings.deadline_margin
        started = time.perf_counter()
        result = await self.participant.step(stub, step, newest, duration)
        if result is None:
            return True
        self.metrics.computed(time.perf_counter() - started)
        version, vector, loss = result
        self.metrics.sent()
        try:
            await stub.SubmitGradient(
                wire.vector_stream(
                    vector,
                    round=version,
                    worker_id=self.worker_id,
                    chunk_bytes=self.chunk_bytes,
                    train_loss=loss,
                    step=step,
                ),
                metadata=self.metadata,
                timeout=self.config.round_deadline + self.settings.deadline_margin,
            )
            self.rounds_done += 1
            return True
        except grpc.aio.AioRpcError as error:
            self.metrics.refused(error.code())
            if error.code() not in (
                grpc.StatusCode.FAILED_PRECONDITION,  # stale, or a version the coordinator no longer knows
                grpc.StatusCode.INVALID_ARGUMENT,  # non-finite (a diverged model)
                grpc.StatusCode.ABORTED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise
            log.warning("step %d on version %d: submission not taken: %s", step, version, error.details())
            return False  # the coordinator's momentum for this worker is its last vector received: fetch it

    async def _do_round(self, stub: wire.CoordinatorStub, item: codec.RoundParams) -> bool:
        """Compute and submit a round; False if the momentum may now differ from the coordinator's."""
        round_ = item.round
        self.metrics.round_followed()
        self.participant.round_timeout = call_timeout(
            item.deadline_unix_ms, round_deadline=self.config.round_deadline, margin=self.settings.deadline_margin
        )
        started = time.perf_counter()
        result = await self.participant.compute(stub, round_, item.params)
        if result is None:
            return True
        self.metrics.computed(time.perf_counter() - started)
        vector, loss = result
        # Taken after computing: what is left of the round bounds the upload, whatever the computation took.
        timeout = call_timeout(
            item.deadline_unix_ms, round_deadline=self.config.round_deadline, margin=self.settings.deadline_margin
        )
        self.metrics.sent()
        try:
            await stub.SubmitGradient(
                wire.vector_stream(
                    vector, round=round_, worker_id=self.worker_id, chunk_bytes=self.chunk_bytes, train_loss=loss
                ),
                metadata=self.metadata,
                timeout=timeout,
            )
            self.rounds_done += 1
        except grpc.aio.AioRpcError as error:
            self.metrics.refused(error.code())
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
                # The round closed meanwhile, or a submission of ours from before a reconnect is still in
                # flight for it (the coordinator takes one at a time): whether this step counts is unknown.
                log.warning("round %d: submission not taken: %s", round_, error.details())
                return False
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # The coordinator did not answer before the round's deadline: go on with the next round.
                # Whether it took the vector is unknown, so the momentum is fetched again.
                log.warning("round %d: no answer to the submission within %.1fs; going on", round_, timeout)
                return False
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:  # the same vector, taken before a reconnect
                log.warning("round %d: submission not taken: %s", round_, error.details())
            elif error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # A Byzantine vector the coordinator refuses (e.g. NaN) is expected; an honest one is a bug.
                log.warning("round %d: submission rejected: %s", round_, error.details())
            else:
                raise
        return True


class HonestParticipant(Participant):
    role = pb.HONEST

    def __init__(self) -> None:
        self.worker = None
        self._momentum: torch.Tensor | None = None

    def setup(self, config: RunConfig, device: torch.device) -> None:
        from arcsim.engine.honest import HonestWorker
        from arcsim.tasks.datasets import clear_cache

        if not 0 <= self.worker_id < config.num_honest:
            raise ValueError(f"honest worker ids run from 0 to {config.num_honest - 1}, got {self.worker_id}")
        self.worker = HonestWorker(config, self.worker_id, device=device)
        clear_cache()  # keep only this worker's shard in memory
        self.worker.set_momentum(self._momentum)

    def set_momentum(self, momentum: torch.Tensor | None) -> None:
        self._momentum = momentum
        if self.worker is not None:
            self.worker.set_momentum(momentum)

    async def compute(self, stub, round_: int, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        vector = await asyncio.to_thread(self.worker.step, params, round_)
        return vector, self.worker.last_loss


def role_name(role: int) -> str:
    """The metrics' role label of a participant's ``pb.Role``."""
    names = {pb.HONEST: Role.HONEST, pb.BYZANTINE: Role.BYZANTINE}
    if role not in names:
        raise ValueError(f"a participant's role is pb.HONEST or pb.BYZANTINE, got {role!r}")
    return names[role]


async def run_worker(settings: WorkerSettings, participant: Participant | None = None) -> str:
    participant = participant if participant is not None else HonestParticipant()
    return await Session(settings, participant).run()
