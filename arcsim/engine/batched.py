"""The batched engine: many runs advanced in lockstep in one process.

A sweep of the paper's protocol is thousands of small runs of the same shape. This engine takes a
*group* of runs that share the task, the model, the number of honest and Byzantine workers, the
batch size and the number of rounds (:func:`group_key`), and advances them together, round by
round. Runs of a group may differ in everything else: seed, learning rate and schedule, momentum,
weight decay, attack and its parameters, pipeline and its parameters, partitioner, evaluation period.
Each round of the group is

1. the honest gradients of every worker of every run in as few passes as the model allows
   (:class:`arcsim.engine.gradients.GradientPass`: one forward/backward per run over all its workers'
   samples on a CPU, one vectorised call over runs on a GPU), then each worker's Polyak momentum,
   the formula of :class:`arcsim.engine.honest.HonestWorker` in one fused pass;
2. the Byzantine vectors, crafted for all runs that share an attack and a pipeline in one batched
   call of :func:`arcsim.attacks.craft` (on a GPU the optimal attacks' line search evaluates its
   candidates for all runs in batched pipeline calls; on a CPU, where that measured slower, it runs
   run by run); label flipping trains its Byzantine workers alongside the honest ones in step 1;
3. the pipeline, once per pipeline over the (runs, n, d) tensor of its runs' vectors;
4. the step, the evaluation (batched across the runs due, :func:`arcsim.engine.gradients.evaluate_runs`),
   the record and the checkpoint of each run, by each run's own :class:`arcsim.engine.rounds.RunState`,
   so every run's folder holds exactly the files the in-process engine writes (``summary.json`` says
   ``"engine": "batched"``), ``arcsim report`` reads them unchanged and ``--resume`` continues them.

Per run, the data, shards, batch indices and model initialisation are those of the in-process engine
for the same config (each run keeps its own random streams, so grouping changes nothing); the vectors
agree with it up to floating-point rounding (the gradients of one pass over all workers' samples sum
in another order than one pass per worker), so runs agree within rounding at first and within seed
noise over many rounds, not bitwise. The in-process and gRPC engines keep their bitwise equality.

A run whose honest vectors or parameters turn non-finite is *diverged*: its folder is finished with
``status: "diverged"`` at the round it reached and the group goes on without it. (The in-process
engine instead drops the non-finite vectors, so a diverged run there keeps its last finite parameters
for its remaining rounds.)
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arcsim.attacks import ATTACK_REGISTRY, attack_state, craft, is_data_attack, label_map
from arcsim.config import RunConfig, canonical_json
from arcsim.engine.gradients import GradientPass, evaluate_runs
from arcsim.engine.honest import build_task_model, shards, training_split
from arcsim.engine.rounds import RoundAggregation, RoundEvaluation, RoundRecord, RunState, role_of
from arcsim.robust import RULE_REGISTRY, build_pipeline, host_tuned
from arcsim.roles import Role
from arcsim.seeding import generator
from arcsim.tasks import Dataset, load_dataset, model_loss
from arcsim.tasks.augment import CropFlip

log = logging.getLogger("arcsim.batched")

ENGINE = "batched"
DIVERGED = "diverged"

#: The config keys that runs of one group must share: they fix the shapes of the batched tensors.
GROUP_KEYS: tuple[str, ...] = ("task", "data_root", "model", "num_honest", "num_byzantine", "batch_size", "rounds")

#: Upper bounds on the runs of one group by device: beyond them a CPU gains nothing (its cores are
#: busy from a few runs on) and a GPU's kernels are already full.
MAX_BATCH_CAP = {"cpu": 64, "cuda": 1024}


def group_key(config: RunConfig) -> tuple[Hashable, ...]:
    """What runs of one group share (:data:`GROUP_KEYS`)."""
    return tuple(getattr(config, key) for key in GROUP_KEYS)


def plan_groups(configs: Sequence[RunConfig], *, max_batch: int, min_groups: int = 1) -> list[list[int]]:
    """Split ``configs`` into groups of compatible runs (same :func:`group_key`), each of at most
    ``max_batch`` runs, as lists of indices into ``configs`` (in their order). With ``min_groups`` > 1
    (a sweep with several processes) a compatible set is cut into at least that many groups where it
    has that many runs, of sizes differing by at most one, so that every process gets work. Within a
    compatible set the runs are ordered by pipeline and attack (stably) before the cut.

    >>> from arcsim.config import from_dict
    >>> cs = [from_dict({"seed": s, "num_byzantine": b}) for b in (3, 7) for s in (1, 2, 3)]
    >>> plan_groups(cs, max_batch=2)
    [[0, 1], [2], [3, 4], [5]]
    >>> plan_groups(cs, max_batch=8, min_groups=2)
    [[0, 1], [2], [3, 4], [5]]
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    by_key: dict[tuple[Hashable, ...], list[int]] = {}
    for index, config in enumerate(configs):
        by_key.setdefault(group_key(config), []).append(index)
    groups: list[list[int]] = []
    for members in by_key.values():
        # Runs with the same pipeline and attack next to each other: a group then holds few of them,
        # with many runs each, and each batched pipeline or attack call covers more runs.
        members.sort(key=lambda i: _batch_key(configs[i]))
        count = max(math.ceil(len(members) / max_batch), min(min_groups, len(members)))
        size, extra = divmod(len(members), count)
        start = 0
        for i in range(count):
            stop = start + size + (1 if i < extra else 0)
            groups.append(members[start:stop])
            start = stop
    return groups


def _searches(attack: str) -> bool:
    """Whether a vector attack searches its factor against the pipeline (it takes ``aggregate``)."""
    fn = ATTACK_REGISTRY.get(attack)
    return callable(fn) and "aggregate" in inspect.signature(fn).parameters


def _batch_key(config: RunConfig) -> tuple[str, ...]:
    return (
        config.pipeline,
        canonical_json(config.pipeline_params),
        config.attack,
        canonical_json(config.attack_params),
    )


def bytes_per_run(config: RunConfig, num_parameters: int, sample_numel: int) -> int:
    """The memory one run of a group needs, in bytes (float32), the basis of :func:`default_max_batch`:

    - vectors: ``P * (3 * t + n + 2)`` floats: the momentum of the t trainers (honest workers, plus the
      Byzantine ones under a data attack) twice (this round's and the last, which the checkpoint may
      still reference), their gradients, the (n, P) matrix the pipeline gets, and the parameters twice;
    - the line search of an optimal attack: a chunk of candidates of at most 2**27 floats (the
      attacks' ``max_elements``) for the whole group, not per run, so it is not counted here;
    - activations: 64 floats per input value of the t * batch_size samples of one pass (the paper's
      CNN keeps about 40 per input pixel for its backward pass, rounded up).
    """
    trainers = config.num_workers if is_data_attack(config.attack) else config.num_honest
    vectors = num_parameters * (3 * trainers + config.num_workers + 2)
    activations = 64 * sample_numel * trainers * config.batch_size
    return 4 * (vectors + activations)


def available_memory(device: torch.device) -> int:
    """Free memory in bytes: the GPU's free memory on CUDA; MemAvailable of /proc/meminfo on Linux."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def default_max_batch(config: RunConfig, *, device: str | torch.device = "cpu", jobs: int = 1) -> int:
    """``--max-batch``'s default: half the free memory (shared by ``jobs`` processes) divided by
    :func:`bytes_per_run`, at least 1 and at most :data:`MAX_BATCH_CAP` for the device."""
    device = torch.device(device)
    dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
    model = build_task_model(config, dataset)
    num_parameters = sum(p.numel() for p in model.parameters())
    per_run = bytes_per_run(config, num_parameters, math.prod(dataset.input_shape))
    fits = available_memory(device) // (2 * max(jobs, 1) * per_run)
    return int(max(1, min(fits, MAX_BATCH_CAP.get(device.type, MAX_BATCH_CAP["cpu"]))))


# --- one run of a group -------------------------------------------------------------------------------
@dataclass
class _Run:
    index: int  # position in the group
    config: RunConfig
    state: RunState
    trainer_ids: list[int]  # worker ids that train: the honest ones, then a data attack's Byzantine ones
    trainer_shards: list[Tensor]  # each trainer's shard, as indices into the dataset's training set
    flip: Callable[[Tensor], Tensor] | None  # the data attack's label map (for the Byzantine trainers)
    momentum: Tensor | None = None  # (trainers, P): the last round's momentum; None before round 0
    # (f, P): the rows after the momentum in the same buffer, where the crafted Byzantine vectors go, so
    # that the round's n vectors are consecutive rows the pipeline reads in place; None when not crafting
    crafted_rows: Tensor | None = None
    status: str = "running"
    summary: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)

    @property
    def num_trainers(self) -> int:
        return len(self.trainer_ids)


class BatchedGroup:
    """A group of runs (see the module docstring) with one folder each; :meth:`run` runs them to the end.

    ``resume[i]``: continue run i from the last checkpoint in its folder. ``on_round(state, record)`` is
    called after each run's round, as the in-process engine's is. ``checkpoint_seconds`` as in
    :func:`arcsim.engine.inproc.run_inproc` (per run).
    """

    def __init__(
        self,
        configs: Sequence[RunConfig],
        out_dirs: Sequence[str | Path],
        *,
        resume: Sequence[bool] | bool = False,
        device: str | torch.device = "cpu",
        checkpoint_seconds: float = 30.0,
        strategy: str = "auto",
        on_round: Callable[[RunState, RoundRecord], None] | None = None,
    ) -> None:
        configs = list(configs)
        if not configs:
            raise ValueError("a batched group needs at least one run")
        if any(c.schedule != "sync" for c in configs):
            raise ValueError("the batched engine runs schedule: sync only (schedule: async runs on --engine inproc)")
        if len(out_dirs) != len(configs):
            raise ValueError(f"got {len(configs)} configs but {len(out_dirs)} folders")
        keys = {group_key(c) for c in configs}
        if len(keys) != 1:
            differing = [k for i, k in enumerate(GROUP_KEYS) if len({key[i] for key in keys}) > 1]
            raise ValueError(
                f"runs of one batched group must share {', '.join(GROUP_KEYS)}; they differ in {differing}"
            )
        resumes = [resume] * len(configs) if isinstance(resume, bool) else list(resume)
        if len(resumes) != len(configs):
            raise ValueError(f"got {len(configs)} configs but {len(resumes)} resume flags")
        self.device = torch.device(device)
        self.on_round = on_round
        first = configs[0]
        self._datasets: dict[tuple[Any, ...], Dataset] = {}
        dataset = self._dataset(first)
        self.model = build_task_model(first, dataset).to(self.device)
        self.loss = model_loss(first.model)
        self.gradients = GradientPass(self.model, self.loss, device=self.device, strategy=strategy)
        self._pipelines: dict[tuple[str, str, int], Any] = {}
        self._validation_sets: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self._buffers: dict[tuple[Any, ...], Tensor] = {}
        self._crop_flips: dict[int, CropFlip] = {}  # per dataset (id: the engine holds the datasets)
        self.runs: list[_Run] = []
        for index, (config, out_dir, again) in enumerate(zip(configs, out_dirs, resumes)):
            state = RunState(
                config,
                Path(out_dir),
                resume=again,
                checkpoint_seconds=checkpoint_seconds,
                # Mimic's learned target: one state per run, checkpointed with it (None for the other attacks)
                attack_state=attack_state(config.attack, **config.attack_params) if config.num_byzantine else None,
            )
            self.runs.append(self._make_run(index, config, state))

    # --- set-up -----------------------------------------------------------------------------------
    def _dataset(self, config: RunConfig) -> Dataset:
        key = (config.task, config.data_root, config.seed)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(config.task, root=config.data_root, seed=config.seed)
        return self._datasets[key]

    def _make_run(self, index: int, config: RunConfig, state: RunState) -> _Run:
        dataset = self._dataset(config)
        shard_list = shards(config, dataset)
        trainer_ids = list(range(config.num_honest))
        trainer_shards = list(shard_list)
        flip = None
        if config.num_byzantine and is_data_attack(config.attack):
            flip = label_map(config.attack, num_classes=dataset.num_classes, **config.attack_params)
            for worker_id in range(config.num_honest, config.num_workers):
                trainer_ids.append(worker_id)
                trainer_shards.append(shard_list[(worker_id - config.num_honest) % config.num_honest])
        run = _Run(index, config, state, trainer_ids, trainer_shards, flip)
        if state.round >= config.rounds:
            run.status = "completed"
        saved = [state.last_vectors.get(i) for i in trainer_ids]
        if all(v is not None for v in saved) and saved:
            run.momentum = torch.stack([v.to(self.device, torch.float32) for v in saved])
        elif any(v is not None for v in saved):
            raise ValueError(
                f"{state.out_dir}: the checkpoint holds the momentum of only some workers; "
                "the batched engine resumes runs whose checkpoints hold every worker's (use --engine inproc)"
            )
        return run

    def _pipeline(self, config: RunConfig) -> Any:
        key = (config.pipeline, canonical_json(config.pipeline_params), config.f)
        if key not in self._pipelines:
            self._pipelines[key] = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)
        return self._pipelines[key]

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Advance every run to its last round (or until it diverges); returns their summaries in order.

        Runs resumed at different rounds are aligned first: each step advances the runs at the
        earliest round. On an exception every run's latest rounds are checkpointed before it propagates.
        """
        try:
            while True:
                active = [r for r in self.runs if r.status == "running"]
                if not active:
                    break
                t = min(r.state.round for r in active)
                self._round([r for r in active if r.state.round == t], t)
        except BaseException:
            for r in self.runs:
                if r.status == "running":
                    try:
                        r.state.flush_checkpoint()
                    except Exception as error:  # noqa: BLE001 - keep the original exception
                        log.warning("%s: could not write a checkpoint while stopping: %s", r.state.out_dir, error)
            raise
        for r in self.runs:
            if r.summary is None:
                r.summary = r.state.summary(engine=ENGINE)
        return [r.summary for r in self.runs if r.summary is not None]

    def _round(self, runs: list[_Run], t: int) -> None:
        opened_at = time.perf_counter()
        self._train(runs, t)
        alive = []
        for r in runs:
            assert r.momentum is not None
            honest = r.momentum[: r.config.num_honest]
            if bool(torch.isfinite(honest.sum())) and bool(torch.isfinite(r.state.params.sum())):
                alive.append(r)
            else:
                self._diverge(r, t)
        if not alive:
            return
        vectors, refused = self._byzantine(alive, t)
        aggregations = self._aggregate(alive, vectors, t)
        evaluations = self._evaluate(alive, aggregations, t)
        for r in alive:
            record = r.state.close_round(
                vectors[r.index],
                train_losses=dict(zip(r.trainer_ids, r.losses)),
                opened_at=opened_at,
                refused=refused.get(r.index, 0),
                aggregation=aggregations[r.index],
                evaluation=evaluations.get(r.index),
            )
            if self.on_round is not None:
                self.on_round(r.state, record)
            if r.state.done:  # its folder is finished now, not when the whole group is
                r.status = "completed"
                r.summary = r.state.summary(engine=ENGINE)

    def _diverge(self, r: _Run, t: int) -> None:
        log.warning(
            "%s: diverged at round %d (non-finite vectors or parameters); stopping this run", r.state.out_dir, t
        )
        r.status = DIVERGED
        r.state.flush_checkpoint()
        r.summary = r.state.summary(engine=ENGINE, reason=DIVERGED)

    # --- 1. honest (and data-attack) gradients and momentum -----------------------------------------
    def _batch_indices(self, r: _Run, t: int) -> list[Tensor]:
        """Each trainer's batch, as indices into the training set: HonestWorker._batch_indices's draws."""
        out = []
        for worker_id, shard in zip(r.trainer_ids, r.trainer_shards):
            g = generator(r.config.seed, "batch", t, worker_id)
            out.append(shard[torch.randperm(shard.shape[0], generator=g)[: min(r.config.batch_size, shard.shape[0])]])
        return out

    def _train(self, runs: list[_Run], t: int) -> None:
        # Runs with as many trainers and equal batches share one gradient call.
        calls: dict[tuple[int, int], list[tuple[_Run, list[int], list[Tensor]]]] = {}
        for r in runs:
            batches = self._batch_indices(r, t)
            positions = list(range(r.num_trainers))
            sizes = {b.shape[0] for b in batches}
            if len(sizes) == 1:
                calls.setdefault((r.num_trainers, sizes.pop()), []).append((r, positions, batches))
            else:  # a shard smaller than the batch size: one call per trainer
                parts = [self._gradients([(r, [k], [b])], t) for k, b in zip(positions, batches)]
                self._update_momentum(
                    [r], torch.cat([g for g, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)
                )
                r.crafted_rows = None
        for members in calls.values():
            # Into one of two buffers kept for these runs, alternating by round: the other one holds the
            # momenta of their last round, which their states may still checkpoint. Each run's rows are
            # followed by rows for its crafted vectors (when the runs craft as many).
            runs = [r for r, _, _ in members]
            spare = {_crafted(r) for r in runs}
            extra = spare.pop() if len(spare) == 1 else 0
            key = ("momentum", tuple(r.index for r in runs), t % 2)
            buffer = self._buffer(key, (len(runs), members[0][0].num_trainers + extra))
            grads, losses = self._gradients(members, t, out=buffer[:, : runs[0].num_trainers])
            self._update_momentum(runs, grads, losses)
            for k, r in enumerate(runs):
                r.crafted_rows = buffer[k, r.num_trainers :] if extra else None

    def _buffer(self, key: tuple[Any, ...], rows: tuple[int, int]) -> Tensor:
        shape = (*rows, self.gradients.num_parameters)
        buffer = self._buffers.get(key)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = self._buffers[key] = torch.empty(shape, device=self.device)
        return buffer

    def _gradients(
        self, members: list[tuple[_Run, list[int], list[Tensor]]], t: int, *, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The gradients and losses of the given trainers (positions in each run's trainers) on the
        given batches, (R, W, P) and (R, W), for runs of equal trainer count and batch size."""
        # Each run's own dataset: a seeded task (synthetic) draws another one per seed.
        datasets = [self._dataset(r.config) for r, _, _ in members]
        indices = [torch.stack(batches) for _, _, batches in members]  # (W, b) each
        x = torch.stack([d.train_x[i] for d, i in zip(datasets, indices)])
        y = torch.stack([d.train_y[i] for d, i in zip(datasets, indices)])
        if members[0][0].config.augment == "crop_flip":  # the group's runs share the task, so the flag too
            x = self._augmented(members, datasets, x, t)
        for k, (r, positions, _) in enumerate(members):
            if r.flip is None:
                continue
            for j, position in enumerate(positions):
                if r.trainer_ids[position] >= r.config.num_honest:  # a data attack's Byzantine trainer
                    y[k, j] = r.flip(y[k, j])
        params = torch.stack([r.state.params for r, _, _ in members]).to(self.device)
        return self.gradients(params, x.to(self.device), y.to(self.device), out=out)

    def _augmented(
        self, members: list[tuple[_Run, list[int], list[Tensor]]], datasets: list[Dataset], x: Tensor, t: int
    ) -> Tensor:
        """``x`` (R, W, b, C, H, W) cropped and flipped as each trainer's HonestWorker would: its own draws
        from (seed, "augment", round, worker id), in one gather per distinct dataset (usually one)."""
        shape, size = x.shape[:2], x.shape[2]
        draws = [
            self._crop_flip(d).draws(r.config.seed, t, r.trainer_ids[position], size)
            for (r, positions, _), d in zip(members, datasets)
            for position in positions
        ]
        offsets = torch.stack([o for o, _ in draws]).reshape(*shape, size, 2)
        flips = torch.stack([f for _, f in draws]).reshape(*shape, size)
        if len({id(d) for d in datasets}) == 1:
            return self._crop_flip(datasets[0])(x, offsets, flips)
        return torch.stack([self._crop_flip(d)(x[k], offsets[k], flips[k]) for k, d in enumerate(datasets)])

    def _crop_flip(self, dataset: Dataset) -> CropFlip:
        found = self._crop_flips.get(id(dataset))
        if found is None:
            found = self._crop_flips[id(dataset)] = CropFlip(dataset.train_x)
        return found

    def _update_momentum(self, runs: list[_Run], grads: Tensor, losses: Tensor) -> None:
        """m <- beta m + (1 - beta) g per run, in place of the gradients (one pass: ``g.lerp_(m, beta)``,
        equal to HonestWorker.step's two operations within rounding); the run's momentum becomes its
        rows, so the momenta of a call are rows of one tensor and reach the attacks and the pipelines
        as a view, without a copy."""
        loss_rows = losses.tolist()
        for k, r in enumerate(runs):
            beta = r.config.momentum
            if r.momentum is None:
                grads[k].mul_(1.0 - beta)
            else:
                grads[k].lerp_(r.momentum, beta)
            r.momentum = grads[k]
            r.losses = [float(v) for v in loss_rows[k]]

    # --- 2. Byzantine vectors ---------------------------------------------------------------------
    def _byzantine(self, runs: list[_Run], t: int) -> tuple[dict[int, dict[int, Tensor]], dict[int, int]]:
        """Every run's vectors of the round keyed by worker id, and the count of refused (non-finite)
        Byzantine vectors per run."""
        vectors: dict[int, dict[int, Tensor]] = {}
        refused: dict[int, int] = {}
        crafting: dict[tuple[str, str, str, str, int], list[_Run]] = {}
        for r in runs:
            assert r.momentum is not None
            config = r.config
            vectors[r.index] = {i: r.momentum[k] for k, i in enumerate(r.trainer_ids) if i < config.num_honest}
            if r.flip is not None:  # a data attack's Byzantine trainers: refused when non-finite, as at the edge
                rows = r.momentum[config.num_honest :]
                finite = torch.isfinite(rows).all(dim=-1).tolist()
                for k, worker_id in enumerate(range(config.num_honest, config.num_workers)):
                    if finite[k]:
                        vectors[r.index][worker_id] = rows[k]
                refused[r.index] = finite.count(False)
            if config.num_byzantine and r.flip is None:
                key = (
                    config.attack,
                    canonical_json(config.attack_params),
                    config.pipeline,
                    canonical_json(config.pipeline_params),
                    config.f,
                )
                crafting.setdefault(key, []).append(r)
        for members in crafting.values():
            config = members[0].config
            honest = _rows([r.momentum[: config.num_honest] for r in members if r.momentum is not None])
            pipeline = self._pipeline(config)
            generators = [generator(r.config.seed, "attack", t) for r in members]
            context = {"num_byzantine": config.num_byzantine, "num_workers": config.num_workers, **config.attack_params}
            if host_tuned(honest) and _searches(config.attack):
                # A line search, run by run on a CPU: its candidates as one batch (the runs' vectors copied
                # once per candidate) measured slower there than the 2-D search (docs/benchmarks.md); the
                # same factors either way. On a GPU the batched search is the point.
                crafted = torch.stack(
                    [
                        craft(
                            config.attack,
                            honest[k],
                            aggregate=lambda x: pipeline(x)[0],
                            generator=g,
                            state=members[k].state.attack_state,
                            **context,
                        )
                        for k, g in enumerate(generators)
                    ]
                )
            else:
                states = [r.state.attack_state for r in members]
                crafted = craft(
                    config.attack,
                    honest,
                    aggregate=lambda x: pipeline(x)[0],
                    generator=generators,
                    state=None if states[0] is None else states,
                    **context,
                )
            finite = torch.isfinite(crafted).all(dim=-1).tolist()  # (R, f): refused when not, as at the edge
            for k, r in enumerate(members):
                rows = crafted[k]
                if r.crafted_rows is not None and r.crafted_rows.shape == rows.shape:
                    rows = r.crafted_rows.copy_(rows)  # right after the run's momentum (see _train)
                kept = 0
                for j, worker_id in enumerate(range(config.num_honest, config.num_workers)):
                    if finite[k][j]:
                        vectors[r.index][worker_id] = rows[j]
                        kept += 1
                refused[r.index] = config.num_byzantine - kept
        return vectors, refused

    # --- 3. the pipelines -------------------------------------------------------------------------
    def _aggregate(
        self, runs: list[_Run], vectors: dict[int, dict[int, Tensor]], t: int
    ) -> dict[int, RoundAggregation]:
        batches: dict[tuple[Any, ...], list[_Run]] = {}
        for r in runs:
            ids = tuple(sorted(vectors[r.index]))
            key = (r.config.pipeline, canonical_json(r.config.pipeline_params), r.config.f, ids)
            batches.setdefault(key, []).append(r)
        out: dict[int, RoundAggregation] = {}
        for (_, _, _, ids), members in batches.items():
            config = members[0].config
            pipeline = self._pipeline(config)
            num_honest = sum(1 for i in ids if i < config.num_honest)
            # The vectors in place when every run's n vectors are consecutive rows and the runs' rows
            # equally spaced in one buffer (the momenta followed by the crafted rows, see _train), and
            # every stage is a built-in rule (none modifies its input; a plugin might, and must not
            # reach the momenta); otherwise one copy: the honest and the Byzantine rows each from a
            # view where they are consecutive rows of one tensor (the round's momenta, the crafted matrix).
            builtin = all(RULE_REGISTRY.is_builtin(name) for name in pipeline.stage_names)
            x = _view_rows([_view_rows([vectors[r.index][i] for i in ids]) for r in members]) if builtin else None
            if x is None or x.device != self.device:
                parts = [
                    _rows([_rows([vectors[r.index][i] for i in part]) for r in members])
                    for part in (ids[:num_honest], ids[num_honest:])
                    if part
                ]
                key = ("vectors", tuple(r.index for r in members), ids)
                shape = (len(members), len(ids), parts[0].shape[-1])
                if key not in self._buffers or tuple(self._buffers[key].shape) != shape:
                    self._buffers[key] = torch.empty(shape, dtype=parts[0].dtype, device=self.device)
                x = torch.cat([part.to(self.device) for part in parts], dim=1, out=self._buffers[key])
            # The norms by role feed the vector-norm metric of a watched run (on_round); a sweep skips them.
            row_norms = torch.linalg.vector_norm(x, dim=-1).tolist() if self.on_round is not None else None
            start = time.perf_counter()
            try:
                aggregates, report = pipeline(x, generator=[generator(r.config.seed, "pipeline", t) for r in members])
            except ValueError as error:  # a condition on n and f: the same for every run of the batch
                for k, r in enumerate(members):
                    out[r.index] = RoundAggregation.skipped(str(error), norms=_norms_by_role(ids, row_norms, k, config))
                continue
            seconds = (time.perf_counter() - start) / len(members)
            aggregates = aggregates.to("cpu", torch.float32)
            errors: list[float | None] = [None] * len(members)
            if num_honest:
                honest_mean = x[:, :num_honest].mean(dim=-2).to("cpu")
                errors = torch.linalg.vector_norm(aggregates - honest_mean, dim=-1).tolist()
            agg_norms = torch.linalg.vector_norm(aggregates, dim=-1).tolist()
            for k, r in enumerate(members):
                out[r.index] = r.state.aggregation(
                    list(ids),
                    aggregates[k],
                    report.element(k),
                    aggregate_error=errors[k],
                    aggregate_norm=agg_norms[k],
                    norms=_norms_by_role(ids, row_norms, k, config),
                    seconds=seconds,
                )
        return out

    # --- 4. evaluation ----------------------------------------------------------------------------
    def _evaluate(
        self, runs: list[_Run], aggregations: dict[int, RoundAggregation], t: int
    ) -> dict[int, RoundEvaluation]:
        due = [r for r in runs if (t + 1) % r.config.eval_every == 0 or t + 1 >= r.config.rounds]
        if not due:
            return {}
        start = time.perf_counter()
        params = {r.index: r.state.next_params(aggregations[r.index].aggregate) for r in due}
        tests: dict[int, tuple[float, float]] = {}
        validations: dict[int, tuple[float, float]] = {}
        # Runs on the same test set (a seeded task draws one per seed) with the same batch size together.
        by_set: dict[tuple[int, int], list[_Run]] = {}
        for r in due:
            by_set.setdefault((id(self._dataset(r.config)), r.config.eval_batch_size), []).append(r)
        for (_, batch_size), members in by_set.items():
            dataset = self._dataset(members[0].config)
            tests.update(self._score(members, params, dataset.test_x, dataset.test_y, batch_size))
            held: dict[tuple[Any, ...], list[_Run]] = {}
            for r in members:
                if r.config.validation_fraction > 0.0:
                    held.setdefault((r.config.task, r.config.seed, r.config.validation_fraction), []).append(r)
            for key, group in held.items():
                if key not in self._validation_sets:
                    config = group[0].config
                    data = self._dataset(config)
                    indices = training_split(config, data).validation
                    self._validation_sets[key] = (data.train_x[indices], data.train_y[indices])
                validations.update(self._score(group, params, *self._validation_sets[key], batch_size))
        seconds = (time.perf_counter() - start) / len(due)
        return {
            r.index: RoundEvaluation(*tests[r.index], validation=validations.get(r.index), seconds=seconds) for r in due
        }

    def _score(
        self, runs: list[_Run], params: dict[int, Tensor], inputs: Tensor, labels: Tensor, batch_size: int
    ) -> dict[int, tuple[float, float]]:
        stacked = torch.stack([params[r.index] for r in runs]).to(self.device)
        accuracy, loss = evaluate_runs(
            self.model, self.loss, stacked, inputs, labels, batch_size=batch_size, device=self.device
        )
        return {r.index: (float(a), float(v)) for r, a, v in zip(runs, accuracy.tolist(), loss.tolist())}


def _norms_by_role(
    ids: Sequence[int], norms: list[list[float]] | None, k: int, config: RunConfig
) -> dict[str, list[float]]:
    """Run k's vector norms by role; empty without norms."""
    out: dict[str, list[float]] = {Role.HONEST: [], Role.BYZANTINE: []}
    for i, norm in zip(ids, norms[k] if norms is not None else ()):
        out[role_of(config, i)].append(norm)
    return out


def _crafted(r: _Run) -> int:
    """How many Byzantine vectors run ``r`` crafts each round (a data attack's trainers craft none)."""
    return r.config.num_byzantine if r.flip is None else 0


def _view_rows(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """The tensors stacked along a new first dimension as a view, when they are equally spaced slices
    of one storage with the same shape and strides (rows of one tensor); None otherwise."""
    rows = [t for t in tensors if t is not None]
    if len(rows) < len(tensors):
        return None
    first = rows[0]
    step = rows[1].storage_offset() - first.storage_offset() if len(rows) > 1 else first.numel()
    base = first.untyped_storage().data_ptr()
    if step > 0 and all(
        t.untyped_storage().data_ptr() == base
        and t.shape == first.shape
        and t.stride() == first.stride()
        and t.storage_offset() == first.storage_offset() + k * step
        for k, t in enumerate(rows)
    ):
        return first.as_strided((len(rows), *first.shape), (step, *first.stride()), first.storage_offset())
    return None


def _rows(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors stacked along a new first dimension: a view when they are equally spaced slices of
    one storage with the same shape and strides (rows of one tensor), a copy (``torch.stack``) otherwise."""
    view = _view_rows(tensors)
    return view if view is not None else torch.stack(list(tensors))


def run_batched(
    configs: Sequence[RunConfig],
    out_dirs: Sequence[str | Path],
    *,
    resume: Sequence[bool] | bool = False,
    device: str | torch.device = "cpu",
    checkpoint_seconds: float = 30.0,
    on_round: Callable[[RunState, RoundRecord], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``configs`` (one group: they must share :data:`GROUP_KEYS`) into ``out_dirs``; returns the summaries."""
    from arcsim.engine.inproc import reuse_freed_memory

    reuse_freed_memory()
    group = BatchedGroup(
        configs, out_dirs, resume=resume, device=device, checkpoint_seconds=checkpoint_seconds, on_round=on_round
    )
    return group.run()
