"""The adversary service: Byzantine workers that observe the honest vectors and submit their own.

One process can hold several Byzantine ids (``arcsim adversary --worker-id 10 --worker-id 11 ...``):
they collude, as the paper's omniscient adversary does, so each round the process reads the honest
vectors once through ``Observe``, crafts the ``(num_byzantine, d)`` matrix once with the configured
attack (arcsim/engine/byzantine.py) and submits one row per id. Workers of a data attack
(``label_flip``, or a plugin's label map) instead train on their own shard with mapped labels.

Under ``schedule: async`` each id steps at its own speed: it observes the open window when it arrives
(``async.byzantine_timing: arrival``) or when it starts its step (``start``), crafts from the honest
vectors it saw with the key of that observation (arcsim.schedule.observation_key: ids that saw the same
vectors craft the same matrix, and ``arcsim replay`` crafts it again), and submits its row with the
observed version. With ``hold`` an id that arrives waits with the others of its process until the open
window holds enough honest vectors for them to fill it together (``Observe`` with ``wait_for_honest``:
K minus the ids waiting), and then they all observe the same window, craft and land at once.
Craftings of one process run one at a time (they share the attack's state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import torch

from arcsim.config import RunConfig
from arcsim.engine.byzantine import ByzantineWorker, Crafter
from arcsim.roles import Role
from arcsim.transport import codec
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.workers.metrics import WorkerMetrics
from arcsim.workers.service import Participant, Session, WorkerSettings

log = logging.getLogger("arcsim.adversary")

# Observe answers after which the adversary sits the round out instead of reconnecting: the round
# closed before it could be observed, the coordinator did not answer before the round's deadline, or
# a newer Observe of the same id (after a reconnect) replaced this one.
_SIT_OUT = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


class Collusion:
    """What the Byzantine workers of one process share: a Crafter and, per round, one crafted matrix."""

    def __init__(self) -> None:
        self.crafter: Crafter | None = None
        self.crafting = asyncio.Lock()  # schedule: async: one crafting at a time (the attack's state is shared)
        self.held: set[int] = set()  # byzantine_timing hold: the ids waiting to land together
        self.more_held = asyncio.Event()  # set (and replaced) when an id joins them
        self._round: int | None = None
        self._matrix: asyncio.Future[torch.Tensor | None] | None = None

    def hold(self, worker_id: int) -> None:
        """``worker_id`` waits with the others to land together (byzantine_timing: hold)."""
        self.held.add(worker_id)
        self.more_held.set()
        self.more_held = asyncio.Event()

    def crafter_for(self, config: RunConfig) -> Crafter:
        if self.crafter is None or self.crafter.config != config:
            self.crafter = Crafter(config)
        return self.crafter

    async def matrix(self, round_: int, produce: Callable[[], Awaitable[torch.Tensor | None]]) -> torch.Tensor | None:
        """The round's crafted matrix: the first caller produces it, the others wait for it.

        A producer that fails raises its error to every id waiting; one that is cancelled leaves the
        round to the next id, which produces it itself rather than dying of another id's cancellation.
        """
        while self._round == round_ and self._matrix is not None:
            future = self._matrix
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.cancelled() or asyncio.current_task().cancelling():
                    raise  # this caller was cancelled, not the producer
                # The producer was cancelled: take over (unless another waiter took over first).
        self._round = round_
        future = self._matrix = asyncio.get_running_loop().create_future()
        try:
            matrix = await produce()
        except BaseException as error:
            if self._matrix is future:
                self._round = None  # let another id retry this round
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
                # Retrieved here: the error is this caller's to raise, so asyncio must not report it as
                # never retrieved when no other id was waiting for the matrix.
                future.exception()
            raise
        future.set_result(matrix)
        return matrix


class AdversaryParticipant(Participant):
    role = pb.BYZANTINE

    def __init__(self, collusion: Collusion | None = None) -> None:
        self.collusion = collusion if collusion is not None else Collusion()
        self.worker: ByzantineWorker | None = None
        self._momentum: torch.Tensor | None = None

    def setup(self, config: RunConfig, device: torch.device) -> None:
        self.worker = ByzantineWorker(config, self.worker_id, device=device, crafter=self.collusion.crafter_for(config))
        self.worker.set_momentum(self._momentum)

    def set_momentum(self, momentum: torch.Tensor | None) -> None:
        self._momentum = momentum
        if self.worker is not None:
            self.worker.set_momentum(momentum)

    async def compute(self, stub, round_: int, params: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        worker = self.worker
        if not worker.needs_observation:  # label flipping: an honest computation on corrupted labels
            vector = await asyncio.to_thread(worker.vector, params=params, round_=round_, honest=None)
            return vector, worker.last_loss

        async def observe_and_craft() -> torch.Tensor | None:
            observed = await self._observe(stub, round_, params.numel(), what="round")
            if not observed:  # none (sitting the round out), or no honest vector before the observation cut-off
                return None
            honest = torch.stack([item.vector for item in observed])  # in worker-id order
            return await asyncio.to_thread(worker.crafter.craft_all, honest, round_)

        matrix = await self.collusion.matrix(round_, observe_and_craft)
        if matrix is None:
            return None
        return matrix[worker.index].clone(), float("nan")

    async def step(self, stub, step: int, newest, duration: float) -> tuple[int, torch.Tensor, float] | None:
        """``schedule: async``: observe on arrival (or at the start, ``byzantine_timing: start``), craft, submit."""
        if not self.worker.needs_observation:
            return await super().step(stub, step, newest, duration)
        started = time.perf_counter()
        timing = self.worker.config.byzantine_timing
        if timing == "start":
            crafted = await self._observe_and_craft(stub, *newest())
            await asyncio.sleep(max(duration - (time.perf_counter() - started), 0.0))
            return crafted
        await asyncio.sleep(duration)
        if timing == "hold":
            return await self._hold_and_land(stub, newest)
        return await self._observe_and_craft(stub, *newest())

    async def _hold_and_land(self, stub, newest) -> tuple[int, torch.Tensor, float] | None:
        """Wait with the other held ids of this process until the open window holds K minus their number of
        honest vectors, then craft from them (the same for every held id: the same key, one matrix). As many
        held ids as K land at once, from the open window's honest vectors or the last window's; with none
        yet the step is sat out."""
        collusion, config = self.collusion, self.worker.config
        collusion.hold(self.worker_id)
        try:
            while True:
                version, params = newest()
                need = max(config.buffer_size - len(collusion.held), 0)
                more = collusion.more_held
                observing = asyncio.ensure_future(
                    self._observe(stub, version, params.numel(), what="version", wait_for_honest=need)
                )
                joined = asyncio.ensure_future(more.wait())
                await asyncio.wait({observing, joined}, return_when=asyncio.FIRST_COMPLETED)
                joined.cancel()
                if not observing.done():  # another id joined: fewer honest vectors are needed now
                    observing.cancel()
                    await asyncio.wait({observing})
                    continue
                observed = observing.result()
                if observed is not None and len(observed) >= need:
                    break
                if observed is None:  # the model moved on: ask again at the newest version
                    await asyncio.sleep(0.01)
        finally:
            collusion.held.discard(self.worker_id)
        return await self._craft(version, observed) if observed else None

    async def _observe_and_craft(
        self, stub, version: int, params: torch.Tensor
    ) -> tuple[int, torch.Tensor, float] | None:
        """This id's row crafted from the honest vectors of the window open at ``version``; None when the
        coordinator has none yet or moved on to a newer version meanwhile (the step is sat out)."""
        observed = await self._observe(stub, version, params.numel(), what="version")
        if not observed:
            return None
        return await self._craft(version, observed)

    async def _craft(self, version: int, observed: list[codec.ObservedTensor]) -> tuple[int, torch.Tensor, float]:
        """This id's row of the matrix crafted from ``observed``, with the observation's key."""
        from arcsim.schedule import observation_key

        worker = self.worker
        honest = torch.stack([item.vector for item in observed])
        key = observation_key(version, [item.seq for item in observed])
        async with self.collusion.crafting:
            matrix = await asyncio.to_thread(worker.crafter.craft_all, honest, key)
        return version, matrix[worker.index].clone(), float("nan")

    async def _observe(
        self, stub, round_: int, d: int, *, what: str, wait_for_honest: int = 0
    ) -> list[codec.ObservedTensor] | None:
        """The honest vectors ``Observe`` gives for ``round_`` (a version under ``schedule: async``, ``what``
        says which), in worker-id order; None when the coordinator answers that this one is sat out.
        ``wait_for_honest``: ObserveRequest.wait_for_honest (schedule: async)."""
        reader = codec.ObserveEventReader(max_bytes=d * 4, expected_shape=(d,), expected_dtype="float32")
        observed = []
        try:
            async for event in stub.Observe(
                pb.ObserveRequest(worker_id=self.worker_id, round=round_, wait_for_honest=wait_for_honest),
                metadata=self.metadata,
                timeout=self.round_timeout,
            ):
                item = reader.feed(event)
                if item is not None:
                    observed.append(item)
        except grpc.aio.AioRpcError as error:
            if error.code() not in _SIT_OUT:
                raise
            log.warning(
                "%s %d: nothing observed (%s: %s); sitting it out", what, round_, error.code().name, error.details()
            )
            return None
        reader.finish()
        return observed


async def run_adversary(
    settings: WorkerSettings, collusion: Collusion | None = None, *, metrics: WorkerMetrics | None = None
) -> str:
    """One Byzantine id; ``metrics``: shared with the other ids of this process (default: its own)."""
    return await Session(settings, AdversaryParticipant(collusion), metrics=metrics).run()


async def run_adversaries(settings: list[WorkerSettings]) -> list[str]:
    """Several colluding Byzantine ids in this process (one Observe and one crafting per round).

    They share one /metrics server (the process's), on the port their settings name.
    """
    from arcsim.engine.honest import resolve_device

    if not settings:
        raise ValueError("run_adversaries needs the settings of at least one Byzantine id")
    endpoints = {(s.metrics_port, s.metrics_host) for s in settings}
    if len(endpoints) != 1:
        raise ValueError(
            f"the ids of one adversary process share one /metrics endpoint, got {sorted(endpoints, key=str)}"
        )
    port, host = endpoints.pop()
    metrics = WorkerMetrics(role=Role.BYZANTINE, device=resolve_device(settings[0].device))
    if port is not None:
        log.info("serving /metrics on %s:%d", host, metrics.serve(port, host))
    collusion = Collusion()
    try:
        return list(await asyncio.gather(*(run_adversary(s, collusion, metrics=metrics) for s in settings)))
    finally:
        metrics.close()
