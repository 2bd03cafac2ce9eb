"""The gRPC coordinator under ``schedule: async``: buffered, bounded-staleness updates in real time.

The same schedule as the in-process engine's (arcsim/engine/asynchronous.py, docs/async.md), with the
workers' real arrivals instead of a simulated clock:

* Each model version is announced on the ``Rounds`` streams as a round is in a synchronous run. A worker
  computes on the newest version it holds and submits with ``round`` set to that version and ``step`` to
  its step number; it then computes again at once, on whatever version is newest by then.
* A submission is taken into the buffer (at most one entry per worker: a second one before the update
  replaces the first), refused as ``stale`` when its version is more than ``async.staleness_bound``
  behind the model, or refused as ``non_finite``. Either refusal answers FAILED_PRECONDITION or
  INVALID_ARGUMENT with the reason in the trailing metadata, and both are counted from the update's
  window record (arcsim_submissions_rejected_total), as the in-process engine counts them.
* The model updates when the buffer holds ``async.buffer_size`` (K) vectors (``closed: full``), when the
  workers that sent non-finite vectors since the last update leave too few others to fill it
  (``stuck``), or ``round_deadline`` seconds after the last update (``deadline``): a straggler cannot
  hold the run. Vectors are scaled by their staleness weight and aggregated with the pipeline built
  for ``async.window_f``; submissions that arrive during an update wait for it and then count against
  the new version.
* ``Observe`` answers at once with the honest vectors of the open window (the last window's when it
  holds none), each with its arrival number; an adversary crafts from them and submits with the observed
  version. With ``wait_for_honest`` it answers once the open window holds that many honest vectors:
  how attackers that hold their vectors (``byzantine_timing: hold``) learn when, together, they fill it.

Every vector taken or refused is one line of ``arrivals.jsonl`` (:class:`arcsim.schedule.ArrivalLog`),
and every update one more, in the order the coordinator took them: ``arcsim replay`` re-runs the run in
process from it and ends on the same parameters. A worker's momentum is its last finite vector the
coordinator received (taken or stale): what a worker fetches after any failed submission, and what the
replay continues from.

Checkpoints (RunState) hold the momenta, the last window's honest vectors and the log's length at the
update; ``--resume`` cuts arrivals.jsonl back to it, so the log and the model agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import grpc
import torch
from torch import Tensor

from arcsim.coordinator.service import Coordinator, CoordinatorSettings, OpenRound, Rejection
from arcsim.engine.rounds import RoundRecord
from arcsim.schedule import ARRIVALS_FILE, ARRIVALS_FORMAT, ArrivalLog, Buffer, staleness_scaled, window_record
from arcsim.transport import codec, wire
from arcsim.v1 import coordinator_pb2 as pb

log = logging.getLogger("arcsim.coordinator")

__all__ = ["AsyncCoordinator"]


class _Arrivals:
    """What the coordinator keeps across updates besides the model (RunState's ``engine_state``): the
    workers' momenta, the last window's honest vectors, the arrival count and the log's length."""

    def __init__(self, path) -> None:
        self.path = path
        self.log: ArrivalLog | None = None
        self.momenta: dict[int, Tensor] = {}
        self.last_window: dict[int, tuple[int, Tensor]] = {}  # honest worker -> (seq, vector)
        self.seq = 0
        self.time_offset = 0.0  # seconds of the run before this process (a resumed run's clock goes on)
        self.started: float | None = None  # monotonic time of the first version this process announced
        self._resume_size: int | None = None

    def now(self) -> float:
        return self.time_offset + (0.0 if self.started is None else time.monotonic() - self.started)

    def open(self, digest: str, num_workers: int) -> None:
        """Open the log: a fresh run's with its start line, a resumed one's cut back to its checkpoint."""
        self.log = ArrivalLog(self.path)
        if self._resume_size is None:
            self.log.truncate(0)
            self.log.write("start", format=ARRIVALS_FORMAT, config_digest=digest, num_workers=num_workers)
        else:
            self.log.truncate(self._resume_size)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        assert self.log is not None
        values = {
            "seq": self.seq,
            "log_bytes": self.log.size(),
            "time": self.now(),
            "momenta": sorted(self.momenta),
            "last_window": {str(w): seq for w, (seq, _) in sorted(self.last_window.items())},
        }
        # No copies: a received vector is never modified (an entry is replaced by the worker's next one), and
        # this runs at every update.
        tensors = {f"momentum/{w}": m for w, m in self.momenta.items()}
        tensors.update({f"last_window/{w}": v for w, (_, v) in self.last_window.items()})
        return values, tensors

    def load_state_dict(self, values: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        self.seq = int(values["seq"])
        self._resume_size = int(values["log_bytes"])
        self.time_offset = float(values["time"])
        self.momenta = {int(w): tensors[f"momentum/{w}"] for w in values["momenta"]}
        self.last_window = {int(w): (int(seq), tensors[f"last_window/{w}"]) for w, seq in values["last_window"].items()}


class AsyncCoordinator(Coordinator):
    """The coordinator of a ``schedule: async`` run (see the module's docstring)."""

    schedule = "async"

    def __init__(self, settings: CoordinatorSettings) -> None:
        config = settings.config
        self._arrivals = _Arrivals(settings.out_dir / ARRIVALS_FILE)
        super().__init__(settings)
        self._arrivals.open(self.run_id, config.num_workers)
        self.buffer = Buffer(size=config.buffer_size, staleness_bound=config.staleness_bound)
        self._version = self.state.round  # the newest version announced
        self._observations: dict[int, tuple[int, list[int]]] = {}  # Byzantine worker -> its last (version, seqs)
        self._ready = asyncio.Event()  # the window may close: full, or stuck
        # No update due or in progress: submissions and observations wait while one is (a full buffer takes no
        # more vectors before its update, which the run loop makes at its next turn).
        self._idle = asyncio.Event()
        self._idle.set()
        self._over = False  # the run loop has ended: no more arrivals
        self._blocked: set[int] = set()  # workers whose vector since the last update was non-finite
        self._stale = self._non_finite = 0  # refusals since the last update
        self._window_opened = time.monotonic()
        self._changed_window = asyncio.Event()  # set (and replaced) whenever the buffer or the version changes

    async def _until_idle(self) -> None:
        """Return once no update is due or in progress (checked again after each wake: the first of several
        submissions woken together may fill the buffer)."""
        while not self._idle.is_set():
            await self._idle.wait()

    def _window_changed(self) -> None:
        self._changed_window.set()
        self._changed_window = asyncio.Event()

    # --- the schedule's hooks -------------------------------------------------------------------
    def _engine_state(self) -> Any:
        return self._arrivals

    def _momentum_of(self, worker_id: int) -> Tensor | None:
        return self._arrivals.momenta.get(worker_id)

    def _vector_reader(self) -> codec.VectorReader:
        # Non-finite vectors are refused in _take, after an update in progress, so that they have their place
        # in arrivals.jsonl and count in the window they arrived in.
        return codec.VectorReader(
            max_bytes=self.max_bytes,
            expected_shape=(self.state.num_parameters,),
            expected_dtype="float32",
            require_finite=False,
        )

    def _stall_timeout(self) -> float:
        return self.config.round_deadline

    def _refused_content(self, claimed: OpenRound | None, worker_id: int, reason: str, reader) -> None:
        pass  # nothing waits for a worker's answer: the window closes on K vectors or its deadline

    def _check_submission(self, owner: tuple[str, int], worker_id: int, round_: int) -> None:
        self._check_worker_id(owner, worker_id)
        if worker_id not in self.joined:
            raise self._reject(
                "not_joined", grpc.StatusCode.FAILED_PRECONDITION, f"worker {worker_id} has not joined the run"
            )
        if round_ > self._version:
            raise self._reject(
                "future_round",
                grpc.StatusCode.FAILED_PRECONDITION,
                f"version {round_} has not been announced (newest: {self._version})",
            )
        if round_ < 0:
            raise self._reject("stale_round", grpc.StatusCode.FAILED_PRECONDITION, f"no version {round_}")

    def _is_trainer(self, worker_id: int) -> bool:
        """Whether the worker computes from its data (honest, or a data attack's): it has a momentum."""
        return worker_id < self.config.num_honest or not self._observers

    async def _take(
        self, owner: tuple[str, int], reader: codec.VectorReader, vector: Tensor, received: int
    ) -> pb.SubmitReply:
        await self._until_idle()  # an update due or in progress: this vector arrives after it, at the new version
        if self._over:
            raise Rejection(grpc.StatusCode.FAILED_PRECONDITION, "ended", "the run has ended")
        worker_id, version, at = reader.worker_id, reader.round, self._version
        arrivals = self._arrivals
        seq = arrivals.seq
        arrivals.seq += 1
        fields: dict[str, Any] = {
            "seq": seq,
            "worker": worker_id,
            "step": reader.step,
            "version": version,
            "at": at,
            "time": round(arrivals.now(), 6),
        }
        if not self._is_trainer(worker_id):
            observed = self._observations.get(worker_id)
            matches = observed is not None and observed[0] == version
            fields["observed"] = {"version": observed[0], "seqs": observed[1]} if matches else None
        if not bool(torch.isfinite(vector).all()):
            arrivals.log.write("arrival", **fields, outcome="non_finite")
            self._non_finite += 1
            self._blocked.add(worker_id)
            self._check_ready()
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "non_finite", "the vector has non-finite values")
        if self._is_trainer(worker_id):
            arrivals.momenta[worker_id] = vector
        outcome = self.buffer.offer(worker_id, version=version, current=at, payload=(vector, reader.train_loss, seq))
        arrivals.log.write("arrival", **fields, outcome=outcome)
        if outcome == "stale":
            self._stale += 1
            raise Rejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                "stale",
                f"computed on version {version}, more than {self.buffer.staleness_bound} behind version {at}",
            )
        self._blocked.discard(worker_id)
        self._window_changed()
        self.metrics.submissions.labels(owner[0]).inc()
        self.metrics.received_bytes.inc(received)
        self._check_ready()
        return pb.SubmitReply(accepted=True, round=version, message=outcome)

    def _check_ready(self) -> None:
        """Set ``_ready`` when the buffer is full, or stuck: the workers that sent a non-finite vector since
        the last update leave too few others to fill it (a diverged model), as the inproc engine decides."""
        if self.buffer.full or self.buffer.stuck(self._blocked, self.config.num_workers):
            self._ready.set()
            self._idle.clear()

    # --- Observe --------------------------------------------------------------------------------
    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext):
        try:
            self._check_observer(context, request.worker_id)
        except Rejection as error:
            await error.abort(context)
        async with self._subscription("Observe", request.worker_id, context):
            honest = await self._observed(request.round, request.wait_for_honest)
            if honest is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"version {request.round} is not the newest (version {self._version})",
                )
            self._observations[request.worker_id] = (self._version, [honest[w][0] for w in sorted(honest)])
            stream = wire.observe_stream(
                {w: v for w, (_, v) in honest.items()},
                chunk_bytes=self.settings.chunk_bytes,
                seqs={w: seq for w, (seq, _) in honest.items()},
            )
            for event in stream:
                await context.write(event)

    async def _observed(self, version: int, wait_for_honest: int) -> dict[int, tuple[int, Tensor]] | None:
        """The honest vectors (worker -> (seq, vector)) an Observe at ``version`` answers with; None when the
        model is not (or no longer) at ``version``. ``wait_for_honest`` > 0: the open window's alone, once it
        holds that many, or after round_deadline seconds with what it holds."""
        deadline = time.monotonic() + self.config.round_deadline
        while True:
            await self._until_idle()
            if version != self._version or self._over:
                return None
            num_honest = self.config.num_honest
            honest = {
                e.worker_id: (e.payload[2], e.payload[0]) for e in self.buffer.entries() if e.worker_id < num_honest
            }
            if wait_for_honest <= 0:
                return honest or dict(self._arrivals.last_window)
            if len(honest) >= wait_for_honest or time.monotonic() >= deadline:
                return honest
            changed = self._changed_window
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(deadline - time.monotonic(), 0.0))

    # --- the run --------------------------------------------------------------------------------
    async def _announce(self) -> None:
        """Announce the model's current version on every Rounds stream; its window opens now."""
        current = await self._open_round()
        self._version = current.number
        self._window_opened = time.monotonic()
        self._window_changed()

    async def run_rounds(self) -> str:
        loop = asyncio.get_running_loop()
        try:
            await self._wait_for_workers()
            self._arrivals.started = time.monotonic()
            await self._announce()
            while not self.state.done and not self._stop.is_set():
                timeout = self._window_opened + self.config.round_deadline - time.monotonic()
                try:
                    await asyncio.wait_for(self._wait_any(self._ready.wait()), max(timeout, 0.0))
                except TimeoutError:
                    pass
                if self._stop.is_set():
                    # Stopped mid-window: its vectors are dropped (a resumed run goes on from the checkpoint,
                    # and arrivals.jsonl is cut back to it).
                    in_buffer = len(self.buffer.entries())
                    log.warning("update %d abandoned by the stop (%d vectors in)", self.state.round, in_buffer)
                    break
                record = await self._update(loop)
                self.metrics.observe_round(record)
                log.info(
                    json.dumps(
                        {
                            "event": "update",
                            "round": record.round,
                            "accuracy": record.accuracy,
                            "clip_threshold": record.clip_threshold,
                            "closed": record.window["closed"],
                            "received": record.received_honest + record.received_byzantine,
                        }
                    )
                )
        finally:
            # The run is over: what still waits for an update is refused (the log is closed, and a resumed run
            # goes on from the checkpoint).
            self._over = True
            self._idle.set()
            self._arrivals.log.close()
        return "completed" if self.state.done else "stopped"

    async def _update(self, loop: asyncio.AbstractEventLoop) -> RoundRecord:
        """One model update from the buffer's window; submissions wait until it is done."""
        self._idle.clear()
        closed = "full" if self.buffer.full else ("stuck" if self._ready.is_set() else "deadline")
        window = self.buffer.take()
        config, num_honest = self.config, self.config.num_honest
        vectors = {
            e.worker_id: staleness_scaled(
                e.payload[0], e.staleness, weighting=config.staleness_weighting, exponent=config.staleness_exponent
            )
            for e in window
        }
        honest = {e.worker_id: (e.payload[2], e.payload[0]) for e in window if e.worker_id < num_honest}
        if honest:
            self._arrivals.last_window = honest
        record_window = window_record(
            window,
            time=round(self._arrivals.now(), 6),
            closed=closed,
            stale_refused=self._stale,
            non_finite_refused=self._non_finite,
            num_honest=num_honest,
        )
        self._arrivals.log.write(
            "update", round=self.state.round, seqs=[e.payload[2] for e in window], window=record_window
        )
        losses = {e.worker_id: e.payload[1] for e in window if e.worker_id < num_honest and e.payload[1] is not None}
        opened_at = time.perf_counter() - (time.monotonic() - self._window_opened)
        closing = loop.run_in_executor(
            None,
            lambda: self.state.close_round(
                vectors,
                train_losses=losses,
                opened_at=opened_at,
                window=record_window,
                refused=self._stale + self._non_finite,
            ),
        )
        try:
            record: RoundRecord = await asyncio.shield(closing)
        except asyncio.CancelledError:
            await asyncio.wait({closing})  # let the thread finish writing the update's record and checkpoint
            raise
        self._stale = self._non_finite = 0
        self._blocked.clear()
        self._ready.clear()
        if not self.state.done:
            await self._announce()
        self._idle.set()
        self._check_ready()
        return record
