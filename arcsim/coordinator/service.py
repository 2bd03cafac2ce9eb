"""The gRPC coordinator: grpc.aio on uvloop, rounds with a quorum and a deadline.

Lifecycle (top-down): settings -> RunState (fresh or resumed) -> gRPC server (Coordinator, health,
reflection) and the /metrics server on its own port -> wait for the workers to join -> rounds ->
RunEnd to every stream -> summary.json -> graceful stop. SIGTERM/SIGINT stop the run at the last
checkpoint: a round still open is abandoned rather than aggregated from the part of its vectors
that arrived (a resumed run opens it again, so the result does not depend on when the signal
came); a second signal exits at once.

A round t: the parameters theta_t go out on every ``Rounds`` stream; submissions are checked (who,
which round, once, well-formed, finite) and kept by worker id; adversaries may ``Observe`` the
honest vectors once all honest ones are in (or half the deadline has passed); the round closes
when ``quorum`` vectors are in or at its deadline, and RunState aggregates, steps, evaluates and
checkpoints in a worker thread so the event loop keeps serving (and rejecting late submissions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

try:  # optional: serve without them where they are not installed (e.g. a bare CUDA image)
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ImportError:  # pragma: no cover
    health = None
try:
    from grpc_reflection.v1alpha import reflection
except ImportError:  # pragma: no cover
    reflection = None

from arcsim.attacks import is_data_attack
from arcsim.config import RunConfig
from arcsim.coordinator.metrics import REJECTION_REASONS, CoordinatorMetrics
from arcsim.engine.rounds import RoundRecord, RunState
from arcsim.roles import Role
from arcsim.transport import codec, wire
from arcsim.transport.auth import ANY_ID, TokenBook, token_from_metadata
from arcsim.transport.channels import REASON_METADATA_KEY, server_options
from arcsim.transport.wire import SERVICE_NAME
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("arcsim.coordinator")

ASSIGNMENT_GRACE = 30.0  # seconds an assigned id stays reserved for the worker that got it to subscribe
_ROLE_NAMES = {pb.HONEST: Role.HONEST, pb.BYZANTINE: Role.BYZANTINE}


@dataclass(frozen=True)
class CoordinatorSettings:
    config: RunConfig
    out_dir: Path
    secret: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port; the bound port is written to out_dir/coordinator.json
    metrics_port: int | None = None  # None: no /metrics server; 0: any free port
    metrics_host: str = "127.0.0.1"
    resume: bool = False
    quorum: int | None = None  # vectors that close a round early; default: every worker
    join_timeout: float = 120.0  # seconds to wait for all workers before round 0 starts anyway
    observe_cutoff: float = 0.5  # fraction of the deadline after which Observe answers with what is in
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES
    device: str = "cpu"
    grace: float = 5.0
    max_concurrent_streams: int = 32  # per client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)
    linger: float = 0.0  # seconds /metrics stays up after the run ends, so a scraper records the final values
    server_credentials: grpc.ServerCredentials | None = field(default=None, compare=False)


class Rejection(Exception):
    """A refused call: its gRPC status, its counted reason (arcsim_submissions_rejected_total) and message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        """End the call with this status; clients branch on the reason in the trailing metadata."""
        context.set_trailing_metadata(((REASON_METADATA_KEY, self.reason),))
        await context.abort(self.code, self.message)


class OpenRound:
    def __init__(self, number: int, deadline_seconds: float) -> None:
        self.number = number
        self.opened_at = time.perf_counter()
        self.deadline = time.monotonic() + deadline_seconds
        self.deadline_unix_ms = int((time.time() + deadline_seconds) * 1000)
        self.vectors: dict[int, torch.Tensor] = {}
        self.losses: dict[int, float] = {}
        # Workers that answered the round: their vector was accepted, or refused for its content (e.g.
        # a NaN vector). A worker that answered has nothing more to send, so the round need not wait
        # for its deadline once every worker has answered.
        self.answered: set[int] = set()
        self.closed = False
        self.honest_complete = asyncio.Event()  # every honest worker answered: Observe may answer
        self.quorum_reached = asyncio.Event()  # the round may close before its deadline


class Subscriptions:
    """The live server streams of each (kind, worker id): at most one; a newer one replaces it.

    Byzantine workers hold valid tokens: one could open thousands of ``Rounds`` or ``Observe`` streams
    and stop reading them, each holding transport buffers of the round's parameters or of the honest
    vectors. Keeping only the newest stream of each identity bounds that memory by the number of
    workers, and is what a reconnecting worker needs anyway (its old stream may not look dead yet).
    """

    def __init__(self) -> None:
        self._live: dict[tuple[str, int], asyncio.Task] = {}
        self._replaced: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._live)

    def open(self, kind: str, worker_id: int) -> None:
        """Register the calling task's stream, cancelling the identity's older one."""
        task = asyncio.current_task()
        assert task is not None
        old = self._live.get((kind, worker_id))
        if old is not None and old is not task and not old.done():
            self._replaced.add(old)
            old.cancel()
        self._live[(kind, worker_id)] = task

    def close(self, kind: str, worker_id: int) -> None:
        task = asyncio.current_task()
        if self._live.get((kind, worker_id)) is task:
            del self._live[(kind, worker_id)]
        self._replaced.discard(task)

    def was_replaced(self) -> bool:
        """Whether the calling task was cancelled because a newer stream replaced it."""
        return asyncio.current_task() in self._replaced


class Coordinator(pb_grpc.CoordinatorServicer):
    """The synchronous coordinator (``schedule: sync``); :func:`coordinator_for` picks the class of a config's
    schedule (the asynchronous one: arcsim/coordinator/asynchronous.py)."""

    schedule = "sync"

    def __init__(self, settings: CoordinatorSettings) -> None:
        if settings.config.schedule != self.schedule:
            raise ValueError(
                f"{type(self).__name__} runs schedule: {self.schedule}, not schedule: {settings.config.schedule} "
                "(coordinator_for picks the coordinator of a config's schedule)"
            )
        self.settings = settings
        self.config = settings.config
        self.quorum = settings.quorum or self.config.num_workers
        # The quorum and the observe cutoff change results (which vectors a round aggregates, which honest
        # vectors the adversaries see): --resume must continue with the ones the run started with.
        self.state = RunState(
            settings.config,
            settings.out_dir,
            resume=settings.resume,
            device=settings.device,
            background_checkpoints=True,
            run_settings={"quorum": self.quorum, "observe_cutoff": settings.observe_cutoff},
            legacy_run_settings={"quorum": self.config.num_workers, "observe_cutoff": 0.5},
            engine_state=self._engine_state(),
        )
        self.metrics = CoordinatorMetrics(config=self.config)
        self.metrics.round.set(self.state.round)
        self.tokens = TokenBook(
            settings.secret, num_honest=self.config.num_honest, num_byzantine=self.config.num_byzantine
        )
        # Whether the Byzantine workers craft their vectors from the honest ones (Observe), as every attack
        # but the data attacks (label flipping) does.
        self._observers = self.config.num_byzantine > 0 and not is_data_attack(self.config.attack)
        self.max_bytes = self.state.num_parameters * 4
        self.run_id = self.config.digest()
        self.joined: set[int] = set()
        self.subscribed: dict[int, int] = {}  # worker id -> open Rounds streams
        self._changed = asyncio.Condition()
        self._round: OpenRound | None = None
        self._events: list[bytes] = []  # the open round's Rounds events, serialised once (arcsim.transport.wire)
        self._ended: str | None = None
        self._stop = asyncio.Event()
        self._all_subscribed = asyncio.Event()
        self._handed_out: dict[int, float] = {}  # worker id -> when Join assigned it
        self._streams = Subscriptions()  # Rounds, Observe and FetchMomentum streams: the newest per worker
        # Workers with a SubmitGradient stream open: at most one each, refused before a message is read, so
        # the vector buffers and transport buffers of submissions are bounded by the number of workers.
        self._submitting: set[int] = set()

    # --- what the schedules differ in (the asynchronous coordinator overrides these) ----------------
    def _engine_state(self) -> Any:
        """What RunState checkpoints besides the model and the momenta (RunState's ``engine_state``)."""
        return None

    def _vector_reader(self) -> codec.VectorReader:
        """The reader of one submission: a vector of the model's size, float32, finite."""
        return codec.VectorReader(
            max_bytes=self.max_bytes, expected_shape=(self.state.num_parameters,), expected_dtype="float32"
        )

    def _momentum_of(self, worker_id: int) -> torch.Tensor | None:
        """The momentum a (re)joining worker fetches: its vector of the last round."""
        return self.state.last_vectors.get(worker_id)

    def _refused_content(
        self, claimed: OpenRound | None, worker_id: int, reason: str, reader: codec.VectorReader
    ) -> None:
        """A submission to round ``claimed`` (None: refused before its first message was checked) refused for
        its content (codec ``reason``; ``reader``: what was read of it): it still answers the round."""
        if claimed is not None and not claimed.closed:
            self._answered(claimed, worker_id)

    async def _take(
        self, owner: tuple[str, int], reader: codec.VectorReader, vector: torch.Tensor, received: int
    ) -> pb.SubmitReply:
        """Take a checked, complete submission of ``received`` bytes (its sender still holds its one slot)."""
        self.metrics.submissions.labels(owner[0]).inc()
        self.metrics.received_bytes.inc(received)
        worker_id, round_ = reader.worker_id, reader.round
        current = self._round
        current.vectors[worker_id] = vector
        if reader.train_loss is not None:
            current.losses[worker_id] = reader.train_loss
        self._answered(current, worker_id)
        return pb.SubmitReply(accepted=True, round=round_, message="accepted")

    # --- helpers --------------------------------------------------------------------------------
    def _reject(self, reason: str, code: grpc.StatusCode, message: str) -> Rejection:
        self.metrics.rejected.labels(reason).inc()
        return Rejection(code, reason, message)

    def _caller(self, context: grpc.aio.ServicerContext) -> tuple[str, int]:
        owner = self.tokens.owner(token_from_metadata(context.invocation_metadata()))
        if owner is None:
            raise self._reject(
                "unauthenticated",
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown bearer token (metadata 'authorization: Bearer <token>')",
            )
        return owner

    def _check_worker(self, owner: tuple[str, int], worker_id: int) -> None:
        if owner[1] != worker_id:
            raise self._reject(
                "permission_denied",
                grpc.StatusCode.PERMISSION_DENIED,
                f"these credentials belong to worker {owner[1]}, not worker {worker_id}",
            )

    @contextlib.asynccontextmanager
    async def _subscription(self, kind: str, worker_id: int, context: grpc.aio.ServicerContext):
        """The body of a server stream of ``kind`` for ``worker_id``: it replaces the worker's older one,
        and ends with ABORTED (counted as ``subscription_replaced``) when a newer one replaces it."""
        self._streams.open(kind, worker_id)
        try:
            yield
        except asyncio.CancelledError:
            if not self._streams.was_replaced():
                raise  # the client went away, or the server is stopping
            error = self._reject(
                "subscription_replaced",
                grpc.StatusCode.ABORTED,
                f"replaced by a newer {kind} stream of worker {worker_id}",
            )
            await error.abort(context)
        finally:
            self._streams.close(kind, worker_id)

    # --- RPCs -----------------------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        token = ""
        try:
            owner = self._caller(context)
            if self._ended is not None:  # before an id is assigned or reserved
                raise Rejection(grpc.StatusCode.FAILED_PRECONDITION, "ended", f"the run has ended ({self._ended})")
            if request.role not in _ROLE_NAMES:
                raise self._reject(
                    "malformed",
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"role must be HONEST or BYZANTINE, got {request.role}",
                )
            if _ROLE_NAMES[request.role] != owner[0]:
                raise self._reject(
                    "permission_denied",
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"these credentials are for role {owner[0]}, not role {request.role}",
                )
            if owner[1] == ANY_ID:
                if request.worker_id != ANY_ID:
                    raise self._reject(
                        "permission_denied",
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"a role token only asks for an id (worker_id {ANY_ID}), not for worker {request.worker_id}",
                    )
                worker_id = self._assign_id(owner[0])
                token = self.tokens.token_for(owner[0], worker_id)
            else:
                worker_id = request.worker_id
                self._check_worker_id(owner, worker_id)
                # Reserved as if assigned: a worker joining with a role token meanwhile must not get this id
                # before this worker subscribes to its rounds.
                self._handed_out[worker_id] = time.monotonic()
        except Rejection as error:
            await error.abort(context)
        self.joined.add(worker_id)
        momentum = self._momentum_of(worker_id)
        log.info(json.dumps({"event": "join", "worker_id": worker_id, "role": owner[0], "assigned": bool(token)}))
        return pb.JoinReply(
            run_id=self.run_id,
            config_yaml=self.config.to_yaml(),
            num_parameters=self.state.num_parameters,
            current_round=self.state.round,
            chunk_bytes=self.settings.chunk_bytes,
            has_momentum=momentum is not None,
            worker_id=worker_id,
            token=token,
        )

    def _assign_id(self, role: str) -> int:
        """The first id of ``role`` that nobody follows and that was not handed out recently."""
        ids = (
            range(self.config.num_honest)
            if role == Role.HONEST
            else range(self.config.num_honest, self.config.num_workers)
        )
        now = time.monotonic()
        for worker_id in ids:
            if worker_id in self.subscribed or now - self._handed_out.get(worker_id, -1e9) < ASSIGNMENT_GRACE:
                continue
            self._handed_out[worker_id] = now
            return worker_id
        raise self._reject(
            "no_free_id", grpc.StatusCode.RESOURCE_EXHAUSTED, f"every {role} worker id is taken; waiting as a spare"
        )

    async def FetchMomentum(self, request: pb.FetchMomentumRequest, context: grpc.aio.ServicerContext):
        try:
            owner = self._caller(context)
            self._check_worker(owner, request.worker_id)
        except Rejection as error:
            await error.abort(context)
        momentum = self._momentum_of(request.worker_id)
        if momentum is not None:
            async with self._subscription("FetchMomentum", request.worker_id, context):
                for event in wire.observe_stream({request.worker_id: momentum}, chunk_bytes=self.settings.chunk_bytes):
                    await context.write(event)

    async def Rounds(self, request: pb.RoundsRequest, context: grpc.aio.ServicerContext):
        try:
            owner = self._caller(context)
            self._check_worker(owner, request.worker_id)
        except Rejection as error:
            await error.abort(context)
        if request.worker_id not in self.joined:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"worker {request.worker_id} has not joined")
        role, worker_id = owner[0], request.worker_id
        async with self._subscription("Rounds", worker_id, context):
            # Counted and uncounted with no await in between: a stream cancelled anywhere leaves no trace.
            self.metrics.connected.labels(role).inc()
            self.subscribed[worker_id] = self.subscribed.get(worker_id, 0) + 1
            if len(self.subscribed) >= self.config.num_workers:
                self._all_subscribed.set()
            try:
                await self._follow_rounds(request, context)
            finally:
                self.metrics.connected.labels(role).dec()
                self.subscribed[worker_id] -= 1
                if not self.subscribed[worker_id]:
                    del self.subscribed[worker_id]

    async def _follow_rounds(self, request: pb.RoundsRequest, context: grpc.aio.ServicerContext) -> None:
        """Write each round's events to a ``Rounds`` stream until the run ends."""
        sent = request.from_round - 1
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._ended is not None or (self._round is not None and self._round.number > sent)
                )
                current, events, ended = self._round, self._events, self._ended
            if current is not None and current.number > sent and not current.closed:
                skip_params = request.have_params and current.number == request.from_round
                for event in events[:1] if skip_params else events:
                    if skip_params:
                        event = pb.RoundEvent(
                            round_start=pb.RoundStart(round=current.number, deadline_unix_ms=current.deadline_unix_ms)
                        )
                    await context.write(event)
                sent = current.number
                continue
            if ended is not None:
                await context.write(codec.run_end_event(rounds_completed=self.state.round, reason=ended))
                return
            if current is not None:
                sent = current.number  # a round that closed before we could send it

    async def SubmitGradient(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        submitter: int | None = None  # the caller's id, once it holds its one submission slot
        try:
            owner = self._caller(context)
            submitter = self._claim(owner[1])
            reader = self._vector_reader()
            claimed: OpenRound | None = None  # the open round, once the sender may submit to it
            received = 0
            try:
                # A submission must be in before the round it was opened in closes: one that stalls is cut
                # at that deadline, so a stream cannot hold its buffers (or its slot) beyond it.
                async with asyncio.timeout(self._stall_timeout()):
                    async for message in request_iterator:
                        if isinstance(message, wire.Malformed):
                            raise codec.CodecError("malformed", message.error)
                        size = message.nbytes if isinstance(message, memoryview) else len(message.data)
                        if size > self.max_bytes:
                            raise codec.CodecError(
                                "oversized",
                                f"one message carries {size} bytes, more than a whole vector ({self.max_bytes})",
                            )
                        received += size
                        if claimed is None and not isinstance(message, memoryview):  # memoryview: data only
                            # The first message names the sender and the round: check them before decoding.
                            self._check_submission(owner, message.worker_id, message.round)
                            claimed = self._round
                        reader.add(message)
                vector = reader.finish()
            except codec.CodecError as error:
                self._refused_content(claimed, owner[1], error.reason, reader)
                raise self._reject(
                    error.reason if error.reason in _CODEC_REASONS else "malformed",
                    CODEC_STATUS[error.reason],
                    str(error),
                ) from None
            except TimeoutError:
                raise self._reject(
                    "stalled",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the submission was not complete when its round's deadline passed",
                ) from None
            self._check_submission(owner, reader.worker_id, reader.round)  # again: the round may have closed meanwhile
            # Taken while the sender still holds its slot: a submission waiting to be taken (an asynchronous
            # update in progress) holds its vector, and one per worker bounds them.
            reply = await self._take(owner, reader, vector, received)
        except Rejection as error:
            await error.abort(context)
        except asyncio.CancelledError:  # the client went away mid-stream (or the server is stopping)
            self.metrics.rejected.labels("cancelled").inc()
            raise
        finally:
            self._submitting.discard(submitter)
        return reply

    def _claim(self, worker_id: int) -> int:
        """Take ``worker_id``'s one submission slot, before a message of the stream is read."""
        if worker_id in self._submitting:
            raise self._reject(
                "concurrent_submission",
                grpc.StatusCode.ABORTED,
                f"worker {worker_id} already has a submission in progress",
            )
        self._submitting.add(worker_id)
        return worker_id

    def _stall_timeout(self) -> float:
        """Seconds a submission starting now may take: until the open round's deadline, else one deadline."""
        current = self._round
        if current is None or current.closed:
            return self.config.round_deadline
        return max(current.deadline - time.monotonic(), 0.0)

    def _answered(self, current: OpenRound, worker_id: int) -> None:
        current.answered.add(worker_id)
        num_honest = self.config.num_honest
        if sum(1 for i in current.answered if i < num_honest) >= num_honest:
            current.honest_complete.set()
            if self._observers and not any(i < num_honest for i in current.vectors):
                # Every honest vector was refused (a diverged model): adversaries that craft from the
                # honest vectors observe none and sit the round out, so there is nothing left to wait for.
                current.quorum_reached.set()
        if len(current.vectors) >= self.quorum or len(current.answered) >= self.config.num_workers:
            current.quorum_reached.set()

    def _check_worker_id(self, owner: tuple[str, int], worker_id: int) -> None:
        """``worker_id`` is one of the run's, and these credentials are its."""
        if not 0 <= worker_id < self.config.num_workers:
            raise self._reject(
                "unknown_worker",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"worker_id {worker_id} is not in 0..{self.config.num_workers - 1}",
            )
        self._check_worker(owner, worker_id)

    def _check_submission(self, owner: tuple[str, int], worker_id: int, round_: int) -> None:
        self._check_worker_id(owner, worker_id)
        if worker_id not in self.joined:
            raise self._reject(
                "not_joined", grpc.StatusCode.FAILED_PRECONDITION, f"worker {worker_id} has not joined the run"
            )
        current = self._round
        if current is None or current.closed or round_ < current.number:
            open_round = "none" if current is None or current.closed else str(current.number)
            raise self._reject(
                "stale_round",
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {round_} is not open (open round: {open_round})",
            )
        if round_ > current.number:
            raise self._reject(
                "future_round",
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {round_} has not started (open round: {current.number})",
            )
        if worker_id in current.vectors:
            raise self._reject(
                "duplicate",
                grpc.StatusCode.ALREADY_EXISTS,
                f"worker {worker_id} already submitted a vector for round {round_}",
            )

    def _check_observer(self, context: grpc.aio.ServicerContext, worker_id: int) -> None:
        """The caller holds ``worker_id``'s adversary credentials (Observe is theirs alone)."""
        owner = self._caller(context)
        self._check_worker(owner, worker_id)
        if owner[0] != Role.BYZANTINE:
            raise self._reject(
                "permission_denied", grpc.StatusCode.PERMISSION_DENIED, "Observe is only for adversary credentials"
            )

    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext):
        try:
            self._check_observer(context, request.worker_id)
        except Rejection as error:
            await error.abort(context)
        current = self._round
        if current is None or current.closed or current.number != request.round:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} is not the open round")
        cutoff = self.config.round_deadline * self.settings.observe_cutoff
        wait = current.deadline - time.monotonic() - (self.config.round_deadline - cutoff)
        async with self._subscription("Observe", request.worker_id, context):
            try:
                await asyncio.wait_for(current.honest_complete.wait(), timeout=max(wait, 0.0))
            except TimeoutError:
                pass
            honest = {i: v for i, v in sorted(current.vectors.items()) if i < self.config.num_honest}
            for event in wire.observe_stream(honest, chunk_bytes=self.settings.chunk_bytes):
                await context.write(event)

    # --- the run --------------------------------------------------------------------------------
    async def run_rounds(self) -> str:
        """Run rounds until done or stopped; returns why it ended."""
        loop = asyncio.get_running_loop()
        await self._wait_for_workers()
        while not self.state.done and not self._stop.is_set():
            current = await self._open_round()
            timeout = max(current.deadline - time.monotonic(), 0.0)
            try:
                await asyncio.wait_for(self._wait_any(current.quorum_reached.wait()), timeout)
            except TimeoutError:
                log.warning(
                    "round %d: deadline passed with %d of %d vectors",
                    current.number,
                    len(current.vectors),
                    self.config.num_workers,
                )
            current.closed = True
            current.honest_complete.set()  # release any Observe still waiting
            if self._stop.is_set() and not current.quorum_reached.is_set():
                # Stopped mid-round: aggregating the part that arrived would make the result depend on
                # when the signal came. The round stays unapplied; a resumed run opens it again.
                log.warning(
                    "round %d abandoned by the stop (%d of %d vectors in)",
                    current.number,
                    len(current.vectors),
                    self.config.num_workers,
                )
                break
            closing = loop.run_in_executor(
                None,
                lambda: self.state.close_round(
                    dict(current.vectors),
                    train_losses=dict(current.losses),
                    opened_at=current.opened_at,
                    refused=len(current.answered - current.vectors.keys()),
                ),
            )
            try:
                record: RoundRecord = await asyncio.shield(closing)
            except asyncio.CancelledError:
                # Cancelled (e.g. the task running serve()): let the thread finish writing the round's
                # record and checkpoint, so nothing writes to out_dir after serve() has returned.
                await asyncio.wait({closing})
                raise
            self.metrics.observe_round(record)
            log.info(
                json.dumps(
                    {
                        "event": "round",
                        "round": record.round,
                        "accuracy": record.accuracy,
                        "clip_threshold": record.clip_threshold,
                        "received": record.received_honest + record.received_byzantine,
                    }
                )
            )
        return "completed" if self.state.done else "stopped"

    async def _open_round(self) -> OpenRound:
        """Announce round ``state.round`` (its parameters) on every Rounds stream; the previous one is closed."""
        current = OpenRound(self.state.round, self.config.round_deadline)
        events = wire.round_stream(
            self.state.params,
            round=current.number,
            deadline_unix_ms=current.deadline_unix_ms,
            chunk_bytes=self.settings.chunk_bytes,
        )
        async with self._changed:
            if self._round is not None:
                self._round.closed = True
            self._round, self._events = current, events
            self._changed.notify_all()
        return current

    async def _wait_for_workers(self) -> None:
        """Before the first round: wait for every worker to follow the rounds, up to ``join_timeout``."""
        if self.state.done:
            return
        try:
            await asyncio.wait_for(self._wait_any(self._all_subscribed.wait()), self.settings.join_timeout)
        except TimeoutError:
            log.warning(
                "round %d starts with %d of %d workers subscribed",
                self.state.round,
                len(self.subscribed),
                self.config.num_workers,
            )

    async def _wait_any(self, awaitable) -> None:
        """Wait for ``awaitable`` unless the run is stopped first."""
        stop = asyncio.ensure_future(self._stop.wait())
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({stop, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            task.cancel()

    async def end(self, reason: str) -> None:
        async with self._changed:
            self._ended = reason
            self._changed.notify_all()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds, or until a stop is requested."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout)
        except TimeoutError:
            pass


# The gRPC status each codec rejection is answered with (protos/arcsim/v1/coordinator.proto documents them).
CODEC_STATUS: dict[str, grpc.StatusCode] = {
    "bad_dtype": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_shape": grpc.StatusCode.INVALID_ARGUMENT,
    "size_mismatch": grpc.StatusCode.INVALID_ARGUMENT,
    "non_finite": grpc.StatusCode.INVALID_ARGUMENT,
    "missing_header": grpc.StatusCode.INVALID_ARGUMENT,
    "unexpected_header": grpc.StatusCode.INVALID_ARGUMENT,
    "unexpected_chunk": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_order": grpc.StatusCode.INVALID_ARGUMENT,
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    "oversized": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "truncated": grpc.StatusCode.DATA_LOSS,
    "checksum": grpc.StatusCode.DATA_LOSS,
}
# Codec reasons counted under their own name; any other is counted as "malformed".
_CODEC_REASONS = frozenset(CODEC_STATUS) & frozenset(REJECTION_REASONS)


class CoordinatorServer:
    """One coordinator process, read top-down: :meth:`startup` (the gRPC server with health and
    reflection, /metrics, the endpoint file), the signal handlers, :meth:`main_loop` (the rounds, then
    RunEnd and the final metrics) and :meth:`shutdown` (the server stopped, the last checkpoint
    written, the endpoint file removed).

    The first SIGTERM/SIGINT asks the run to stop at its last checkpoint (:meth:`should_exit`); a
    second one exits at once (exit status 130).
    """

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.coordinator = coordinator_for(settings)
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._signals = 0
        self._handled: list[signal.Signals] = []

    async def serve(self) -> dict:
        """Run the coordinator to the end of its run; returns the summary."""
        await self.startup()
        self._install_signal_handlers()
        try:
            return await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        settings, coordinator = self.settings, self.coordinator
        # gRPC refuses a message above its receive limit before the service sees it, and the service then
        # sees the stream end as if the client had stopped sending: the limit is twice the vector, so that a
        # message too large to be right but below it is refused here as "oversized", with its reason.
        server = grpc.aio.server(
            options=server_options(
                2 * coordinator.max_bytes + (1 << 16), max_concurrent_streams=settings.max_concurrent_streams
            )
        )
        wire.add_coordinator_to_server(coordinator, server)
        if health is not None:
            self._health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if reflection is not None:
            names = (SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health")
            reflection.enable_server_reflection(names, server)
        address = f"{settings.host}:{settings.port}"
        if settings.server_credentials is not None:
            port = server.add_secure_port(address, settings.server_credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address} (address in use or not available)")
        metrics_port = None
        if settings.metrics_port is not None:
            try:
                metrics_port = coordinator.metrics.serve(settings.metrics_port, settings.metrics_host)
            except OSError:
                await server.stop(None)  # release the gRPC port bound above
                raise
        await server.start()
        self._server = server
        await _set_health(self._health, serving=True)
        endpoint = {
            "host": settings.host,
            "port": port,
            "metrics_port": metrics_port,
            "pid": os.getpid(),
            "run_id": coordinator.run_id,
        }
        tmp = settings.out_dir / "coordinator.json.tmp"
        tmp.write_text(json.dumps(endpoint))
        tmp.replace(settings.out_dir / "coordinator.json")
        log.info(json.dumps({"event": "serving", **endpoint}))

    def should_exit(self) -> None:
        """A signal: stop at the last checkpoint; a second one forces the exit."""
        self._signals += 1
        if self._signals > 1:
            os._exit(130)
        log.warning("stopping at the last checkpoint; an open round is abandoned (signal again to exit at once)")
        self.coordinator.request_stop()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.should_exit)
                self._handled.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass

    async def main_loop(self) -> dict:
        coordinator, settings = self.coordinator, self.settings
        reason = await coordinator.run_rounds()
        summary = coordinator.state.summary(engine="grpc", reason=reason)
        await coordinator.end(reason)
        await _set_health(self._health, serving=False)
        # Give the streams a moment to deliver RunEnd before the server goes away, and a scraper time to
        # record the final metrics (a signal cuts the wait short).
        await asyncio.sleep(0.2)
        if settings.linger > 0 and settings.metrics_port is not None and not coordinator.stopping:
            await coordinator.wait_stopped(settings.linger)
        return summary

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._handled:  # the process's default handling back (serve() may run inside a larger program)
            loop.remove_signal_handler(sig)
        self._handled.clear()
        self.coordinator.metrics.close()
        if self._server is not None:
            await self._server.stop(self.settings.grace)
        try:  # nothing may still be writing into out_dir once serve() returns
            await asyncio.to_thread(self.coordinator.state.wait_checkpoint)
        except Exception as error:  # noqa: BLE001 - the previous checkpoint stays the newest
            log.warning("the last checkpoint could not be written: %s", error)
        (self.settings.out_dir / "coordinator.json").unlink(missing_ok=True)


def coordinator_for(settings: CoordinatorSettings) -> Coordinator:
    """The coordinator of ``settings.config``'s schedule: :class:`Coordinator` for ``sync``, the buffered,
    bounded-staleness one (arcsim/coordinator/asynchronous.py) for ``async``."""
    if settings.config.schedule == "async":
        from arcsim.coordinator.asynchronous import AsyncCoordinator

        return AsyncCoordinator(settings)
    return Coordinator(settings)


async def serve(settings: CoordinatorSettings) -> dict:
    """Run one coordinator to the end of its run; returns the summary (see :class:`CoordinatorServer`)."""
    return await CoordinatorServer(settings).serve()


async def _set_health(servicer, *, serving: bool) -> None:
    if servicer is None:
        return
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        result = servicer.set(name, status)
        if asyncio.iscoroutine(result):
            await result
