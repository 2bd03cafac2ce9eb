"""The adversary service: a Byzantine worker that observes the honest vectors and submits its own.

It joins with adversary credentials, and for each round either trains on flipped labels
(``label_flip``) or reads the round's honest vectors through ``Observe`` and crafts its vector
with the configured attack (adversaries/byzantine.py).
"""

from __future__ import annotations

import asyncio

import torch

from arcsim import codec
from arcsim.config import RunConfig
from arcsim.v1 import coordinator_pb2 as pb
from workers.service import Participant, Session, WorkerSettings

from .byzantine import ByzantineWorker


class AdversaryParticipant(Participant):
    role = pb.BYZANTINE

    def __init__(self) -> None:
        self.worker: ByzantineWorker | None = None
        self._momentum: torch.Tensor | None = None
        self.num_parameters = 0

    def setup(self, config: RunConfig, device: torch.device) -> None:
        self.worker = ByzantineWorker(config, self.worker_id, device=device)
        self.worker.set_momentum(self._momentum)

    def set_momentum(self, momentum: torch.Tensor | None) -> None:
        self._momentum = momentum
        if self.worker is not None:
            self.worker.set_momentum(momentum)

    async def compute(self, stub, round_: int, params: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        honest = None
        if self.worker.needs_observation:
            d = params.numel()
            reader = codec.ObserveEventReader(max_bytes=d * 4, expected_shape=(d,), expected_dtype="float32")
            vectors = {}
            async for event in stub.Observe(pb.ObserveRequest(worker_id=self.worker_id, round=round_),
                                            metadata=self.metadata):
                item = reader.feed(event)
                if item is not None:
                    vectors[item.worker_id] = item.vector
            reader.finish()
            if not vectors:  # no honest vector arrived before the observation cut-off
                return None
            honest = torch.stack([vectors[i] for i in sorted(vectors)])
        vector = await asyncio.to_thread(self.worker.vector, params=params, round_=round_, honest=honest)
        return vector, float("nan")


async def run_adversary(settings: WorkerSettings) -> str:
    return await Session(settings, AdversaryParticipant()).run()
