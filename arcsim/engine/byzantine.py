"""The Byzantine worker's computation, free of any transport.

A Byzantine worker either trains on corrupted data (a data attack, i.e. a label map; ``label_flip``: an
honest computation on the labels 9 - y of a honest worker's shard, ``(worker_id - num_honest) mod num_honest``)
or crafts its vector from the honest vectors of the round (every other attack: the workers are omniscient and
collude, so each of them computes the same ``(num_byzantine, d)`` matrix with
``arcsim.attacks.craft`` and submits its own row). Attack noise comes from a generator seeded by
(seed, "attack", round), so every Byzantine process draws the same matrix.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from arcsim.attacks import MimicState, attack_state, craft, is_data_attack, label_map
from arcsim.config import RunConfig
from arcsim.engine.honest import HonestWorker
from arcsim.robust import build_pipeline
from arcsim.seeding import generator
from arcsim.tasks import Dataset, load_dataset

log = logging.getLogger("arcsim.adversary")


class Crafter:
    """Crafts the round's ``(num_byzantine, d)`` Byzantine matrix once; colluding workers in one process share it.

    ``state`` is what the attack keeps across rounds (:func:`arcsim.attacks.attack_state`: Mimic's learned
    target), None for the others; it learns from each round crafted (once per round: the matrix is cached).
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._pipeline = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)
        self._cache: tuple[int, Tensor] | None = None
        self.state = attack_state(config.attack, **config.attack_params) if config.num_byzantine else None
        self._warned = False

    def craft_all(self, honest: Tensor, round_: int) -> Tensor:
        if self._cache is not None and self._cache[0] == round_:
            return self._cache[1]
        config = self.config
        self._check_learning(round_)
        vectors = craft(
            config.attack,
            honest,
            num_byzantine=config.num_byzantine,
            num_workers=config.num_workers,
            aggregate=lambda x: self._pipeline(x)[0],
            generator=generator(config.seed, "attack", round_),
            state=self.state,
            **config.attack_params,
        )
        self._cache = (round_, vectors)
        return vectors

    def _check_learning(self, round_: int) -> None:
        """Warn (once) when a state still learning has not seen every round before this one: an adversary
        service that restarted mid-run, or a coordinator that resumed from a checkpoint older than what the
        adversary learned from. The in-process and batched engines restore the state with the run instead."""
        state = self.state
        if not isinstance(state, MimicState) or state.index is not None or self._warned:
            return
        if self.config.schedule == "async":  # it learns from each crafting, keyed by time, not from rounds
            return
        if state.rounds_seen != round_:
            self._warned = True
            log.warning(
                "attack %s: the learned target has seen %d rounds before round %d (a restarted adversary, or a "
                "coordinator resumed from an earlier checkpoint); it learns on from this round",
                self.config.attack,
                state.rounds_seen,
                round_,
            )


class ByzantineWorker:
    def __init__(
        self,
        config: RunConfig,
        worker_id: int,
        *,
        device: torch.device | str = "cpu",
        dataset: Dataset | None = None,
        shard_list: list[Tensor] | None = None,
        crafter: Crafter | None = None,
    ) -> None:
        if not config.num_honest <= worker_id < config.num_workers:
            raise ValueError(
                f"Byzantine worker ids run from {config.num_honest} to {config.num_workers - 1}, got {worker_id}"
            )
        self.config = config
        self.worker_id = worker_id
        self.index = worker_id - config.num_honest
        self.needs_observation = not is_data_attack(config.attack)
        self.trainer: HonestWorker | None = None
        self.last_loss = float("nan")
        if not self.needs_observation:
            dataset = (
                dataset if dataset is not None else load_dataset(config.task, root=config.data_root, seed=config.seed)
            )
            self.trainer = HonestWorker(
                config,
                worker_id,
                shard_index=self.index % config.num_honest,
                label_map=label_map(config.attack, num_classes=dataset.num_classes, **config.attack_params),
                device=device,
                dataset=dataset,
                shard_list=shard_list,
            )
        self.crafter = crafter if crafter is not None else Crafter(config)

    def set_momentum(self, momentum: Tensor | None) -> None:
        if self.trainer is not None:
            self.trainer.set_momentum(momentum)

    def vector(self, *, params: Tensor, round_: int, honest: Tensor | None) -> Tensor:
        """This worker's vector for the round: ``honest`` is the (h, d) matrix of honest vectors."""
        if self.trainer is not None:
            out = self.trainer.step(params, round_)
            self.last_loss = self.trainer.last_loss
            return out
        if honest is None or honest.shape[0] == 0:
            raise ValueError(f"attack {self.config.attack!r} needs the honest vectors of round {round_}")
        return self.crafter.craft_all(honest, round_)[self.index].clone()
