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
observed version. Craftings of one process run one at a time (they share the attack's state).
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
        self._round: int | None = None
        self._matrix: asyncio.Future[torch.Tensor | None] | None = None

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
        if self.worker.config.async_.get("byzantine_timing", "arrival") == "start":
            crafted = await self._observe_and_craft(stub, *newest())
            await asyncio.sleep(max(duration - (time.perf_counter() - started), 0.0))
            return crafted
        await asyncio.sleep(duration)
        return await self._observe_and_craft(stub, *newest())

    async def _observe_and_craft(
        self, stub, version: int, params: torch.Tensor
    ) -> tuple[int, torch.Tensor, float] | None:
        """This id's row crafted from the honest vectors of the window open at ``version``; None when the
        coordinator has none yet or moved on to a newer version meanwhile (the step is sat out)."""
        from arcsim.schedule import observation_key

        worker = self.worker
        observed = await self._observe(stub, version, params.numel(), what="version")
        if not observed:
            return None
        honest = torch.stack([item.vector for item in observed])
        key = observation_key(version, [item.seq for item in observed])
        async with self.collusion.crafting:
            matrix = await asyncio.to_thread(worker.crafter.craft_all, honest, key)
        return version, matrix[worker.index].clone(), float("nan")

    async def _observe(self, stub, round_: int, d: int, *, what: str) -> list[codec.ObservedTensor] | None:
        """The honest vectors ``Observe`` gives for ``round_`` (a version under ``schedule: async``, ``what``
        says which), in worker-id order; None when the coordinator answers that this one is sat out."""
        reader = codec.ObserveEventReader(max_bytes=d * 4, expected_shape=(d,), expected_dtype="float32")
        observed = []
        try:
            async for event in stub.Observe(
                pb.ObserveRequest(worker_id=self.worker_id, round=round_),
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
