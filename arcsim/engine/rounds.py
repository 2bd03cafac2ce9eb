"""The coordinator's round logic, free of any transport.

:class:`RunState` owns the model parameters and everything a run must not lose. The gRPC service
(arcsim/coordinator/service.py) and the in-process engine (arcsim/engine/inproc.py) both hand it the
vectors of a round, keyed by worker id, and it

1. orders them by worker id (arrival order never changes the result),
2. runs the pipeline built by ``arcsim.robust.build_pipeline`` from the config,
3. steps the model, :math:`\\theta_{t+1} = \\theta_t - \\eta_t (R_t + \\lambda \\theta_t)`,
4. evaluates every ``eval_every`` rounds and after the last one, on the test set and, when the config
   holds a validation split out (``validation_fraction``), on the validation set,
5. appends a line to ``rounds.jsonl`` and writes a checkpoint (atomically): after every round by
   default (the gRPC coordinator); with ``checkpoint_seconds > 0`` (the in-process engine) only after
   the first round, when that many seconds have passed since the last checkpoint, and after the last
   round, plus :meth:`RunState.flush_checkpoint` when a run is interrupted. A checkpoint
   (``checkpoints/round-XXXXXXXX.safetensors``, see arcsim/engine/checkpoint.py) holds the parameters
   and every worker's momentum (n + 1 vectors of the model's size), a CRC-32 and the scalar state;
   what writing one costs is in docs/benchmarks.md.

When the run ends, :meth:`RunState.summary` writes ``model.safetensors`` (the final parameters as the
task's model's named state dict, which ``load_state_dict`` takes) and ``summary.json``.

Workers 0 .. num_honest - 1 are honest and the rest Byzantine: the simulator knows the ground
truth, so it can report the robustness error ||R_t - mean of the honest vectors|| and what ARC
did to each role. The clipping is credited to roles through the pipeline's report
(``AggregationReport.clipped_inputs``): a worker's vector counts as clipped when the first clipping
stage scaled it, or the mean of its bucket when bucketing came first (every member of a clipped
bucket counts). When a stage before the clipping blends the rows (NNM), no row names a worker:
the record then holds only ``clipped_rows`` and ``clipped_honest``/``clipped_byzantine`` are None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arcsim import roles
from arcsim.attacks import AttackState
from arcsim.config import RunConfig
from arcsim.engine import checkpoint
from arcsim.engine.evaluation import Evaluator
from arcsim.robust import AggregationReport, build_pipeline
from arcsim.roles import Role
from arcsim.seeding import generator
from arcsim.tasks import load_dataset
from arcsim.tensorbytes import tensor_to_bytes

log = logging.getLogger("arcsim.coordinator")

MODEL_FILE = "model.safetensors"  # in out_dir: the final parameters as the model's named state dict

HONEST, BYZANTINE = Role.HONEST, Role.BYZANTINE
_ATTACK_PREFIX = "attack_state/"  # the checkpoint's tensors of the attack's state (RunState's attack_state)
_ENGINE_PREFIX = "engine_state/"  # ... and of the engine's (RunState's engine_state)


@dataclass(frozen=True)
class RoundRecord:
    """One line of rounds.jsonl."""

    round: int
    lr: float
    received_honest: int
    received_byzantine: int
    aggregated: bool
    skip_reason: str | None
    clip_threshold: float | None
    clipped_honest: int | None  # None: the clipping stage's rows name no worker (see the module docstring)
    clipped_byzantine: int | None
    aggregate_error: float | None
    aggregate_norm: float | None
    train_loss: float | None
    accuracy: float | None
    test_loss: float | None
    round_seconds: float
    aggregation_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    eval_seconds: float | None = None
    clipped_rows: int = 0  # rows the first clipping stage changed (bucket means, after bucketing)
    # Set with accuracy/test_loss when the config holds a validation split out, None otherwise.
    validation_accuracy: float | None = None
    validation_loss: float | None = None
    # Norms of the received vectors by role (for the vector-norm histogram; not written to disk).
    norms: dict[str, list[float]] = field(default_factory=dict, compare=False)
    # schedule: async only (written only then): the update's window, see arcsim/engine/asynchronous.py
    window: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        for name in _NOT_RECORDED:
            data.pop(name)
        if data["window"] is None:
            data.pop("window")
        return json.dumps(data)


_NOT_RECORDED = ("norms",)
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RoundRecord) if f.name not in (*_NOT_RECORDED, "window"))
"""The keys of a line of rounds.jsonl, in order (an asynchronous run's lines add ``window``)."""


@dataclass(frozen=True)
class RoundAggregation:
    """What the pipeline made of one round's vectors: :meth:`RunState.aggregate_round` computes it, or
    the batched engine hands it in (computed for many runs at once). ``aggregate`` is None when the
    round was not aggregated (``skip_reason`` says why); ``clipped`` counts clipped vectors by role,
    None when the clipping stage's rows name no worker; ``seconds``: the aggregation's own time (None:
    timed by ``close_round``)."""

    aggregate: Tensor | None
    skip_reason: str | None
    clip_threshold: float | None = None
    clipped_rows: int = 0
    clipped: dict[str, int] | None = None
    aggregate_error: float | None = None
    aggregate_norm: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    norms: dict[str, list[float]] = field(default_factory=dict)
    seconds: float | None = None

    @classmethod
    def skipped(cls, reason: str, *, norms: dict[str, list[float]]) -> RoundAggregation:
        return cls(aggregate=None, skip_reason=reason, clipped={HONEST: 0, BYZANTINE: 0}, norms=norms)


@dataclass(frozen=True)
class RoundEvaluation:
    """An evaluation computed outside :class:`RunState` (the batched engine evaluates many runs at once):
    test accuracy and mean loss, the validation pair when the config holds a split out, and its time."""

    accuracy: float
    test_loss: float
    validation: tuple[float, float] | None = None
    seconds: float | None = None


def params_sha256(params: Tensor) -> str:
    return hashlib.sha256(tensor_to_bytes(params.contiguous())).hexdigest()


def role_of(config: RunConfig, worker_id: int) -> Role:
    return roles.role_of(worker_id, num_honest=config.num_honest)


class RunState:
    """Parameters, round counter and the last vector of every worker, with checkpoints in ``out_dir``."""

    def __init__(
        self,
        config: RunConfig,
        out_dir: Path,
        *,
        resume: bool = False,
        device: str = "cpu",
        checkpoint_seconds: float = 0.0,
        background_checkpoints: bool = False,
        run_settings: Mapping[str, Any] | None = None,
        legacy_run_settings: Mapping[str, Any] | None = None,
        attack_state: AttackState | None = None,
        engine_state: AttackState | None = None,
    ) -> None:
        """``run_settings``: values beyond the config that change results (the gRPC coordinator's quorum
        and observe cutoff), stored in every checkpoint and in summary.json; ``--resume`` refuses a
        checkpoint written with other ones. ``legacy_run_settings``: the settings a checkpoint written
        before they were recorded is taken to have used (their defaults then); such a checkpoint is
        resumed only when ``run_settings`` equal them, or when both are None. ``attack_state``: the
        state the run's attack keeps across rounds (:func:`arcsim.attacks.attack_state`), learned from
        while the engine crafts a round; each checkpoint holds it as of the round boundary, and a resume
        restores it, so a resumed run crafts as an uninterrupted one. ``engine_state``: what an engine holds
        beyond the parameters (the asynchronous engine's event queue and vectors in flight), with the same
        two methods; saved as it is whenever a checkpoint is written (only from within ``close_round`` for
        such an engine, where that state is whole), restored on resume."""
        if not checkpoint_seconds >= 0.0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {checkpoint_seconds!r}")
        self.config = config
        self.run_settings = _json_settings(run_settings, name="run_settings")
        self._legacy_run_settings = _json_settings(legacy_run_settings, name="legacy_run_settings")
        self.checkpoint_seconds = checkpoint_seconds
        # Background checkpoints: the write (CRC-32, fsync) of round t overlaps round t + 1; at most one
        # write is in flight, and a crash in the middle of one leaves the previous checkpoint newest,
        # from which a resume recomputes the same rounds.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if background_checkpoints else None
        self._pending: Future[Path] | None = None
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.device = torch.device(device)
        dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
        self.evaluator = Evaluator(config, dataset, device=self.device)
        self.pipeline = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)
        self.params = self.evaluator.initial_parameters()
        self.num_parameters = self.params.numel()
        self.round = 0
        self.last_vectors: dict[int, Tensor] = {}
        self.best_accuracy: float | None = None
        self.last_accuracy: float | None = None
        self.best_validation_accuracy: float | None = None
        self.last_validation_accuracy: float | None = None
        self.started = time.time()
        self.wall_seconds_before = 0.0
        self.checkpointed_round: int | None = None  # the round the newest checkpoint written by this object covers
        self._checkpointed_at = time.perf_counter()
        self._in_round = False  # True while close_round changes the state (not at a round boundary)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._rounds_path = self.out_dir / "rounds.jsonl"
        self.attack_state = attack_state
        self.engine_state = engine_state
        # The attack state as of the last round boundary: the engine changes it while a round is crafted,
        # before the round closes, and a checkpoint covers only closed rounds.
        self._attack_snapshot = attack_state.state_dict() if attack_state is not None else None
        if resume:
            self._resume()
        else:
            self._rounds_path.write_text("")
            (self.out_dir / "config.yaml").write_text(config.to_yaml())

    @property
    def done(self) -> bool:
        return self.round >= self.config.rounds

    def role(self, worker_id: int) -> str:
        return role_of(self.config, worker_id)

    # --- one round ------------------------------------------------------------------------------
    def aggregate_round(self, vectors: dict[int, Tensor], *, refused: int = 0) -> RoundAggregation:
        """Run the pipeline on the round's vectors (keyed by worker id, aggregated in id order)."""
        config = self.config
        ids = sorted(vectors)
        honest_ids = [i for i in ids if i < config.num_honest]
        norms: dict[str, list[float]] = {HONEST: [], BYZANTINE: []}
        if not ids:
            reason = f"no vectors accepted ({refused} refused)" if refused else "no vectors received"
            return RoundAggregation.skipped(reason, norms=norms)
        x = torch.stack([vectors[i] for i in ids]).to(self.device)
        row_norms = torch.linalg.vector_norm(x, dim=1).tolist()
        for i, norm in zip(ids, row_norms):
            norms[self.role(i)].append(norm)
        start = time.perf_counter()
        try:
            # Bucketing's permutation from the run's seed and the round, like every other draw: torch's
            # global generator starts over in each process, so a resumed run would repeat round 0's.
            aggregate, report = self.pipeline(x, generator=generator(config.seed, "pipeline", self.round))
        except ValueError as error:  # e.g. too few vectors arrived for 2f < n
            return RoundAggregation.skipped(str(error), norms=norms)
        aggregate = aggregate.to("cpu", torch.float32)
        aggregate_error = None
        if honest_ids:  # ids are sorted, so the honest rows come first in x
            honest_mean = x[: len(honest_ids)].mean(dim=0).to("cpu")
            aggregate_error = float(torch.linalg.vector_norm(aggregate - honest_mean))
        return self.aggregation(
            ids,
            aggregate,
            report,
            aggregate_error=aggregate_error,
            aggregate_norm=float(torch.linalg.vector_norm(aggregate)),
            norms=norms,
            seconds=time.perf_counter() - start,
        )

    def aggregation(
        self,
        ids: list[int],
        aggregate: Tensor,
        report: AggregationReport,
        *,
        aggregate_error: float | None,
        aggregate_norm: float,
        norms: dict[str, list[float]],
        seconds: float,
    ) -> RoundAggregation:
        """The round's :class:`RoundAggregation` from the pipeline's report on the vectors of ``ids`` (in
        that order): the clipping credited to roles, the stages' times, and the given measurements."""
        clipped_rows, clipped = 0, {HONEST: 0, BYZANTINE: 0}
        if report.clipped is not None:
            clipped_rows = int(report.clipped.sum())
            clipped = self.clipped_by_role(ids, report.clipped_inputs)
        return RoundAggregation(
            aggregate=aggregate,
            skip_reason=None,
            clip_threshold=report.clip_threshold,
            clipped_rows=clipped_rows,
            clipped=clipped,
            aggregate_error=aggregate_error,
            aggregate_norm=aggregate_norm,
            stage_seconds={stage.name: stage.seconds for stage in report.stages},
            norms=norms,
            seconds=seconds,
        )

    def next_params(self, aggregate: Tensor | None) -> Tensor:
        """The parameters after this round's step with ``aggregate`` (unchanged for None):
        theta - lr * (aggregate + weight_decay * theta), with the round's learning rate."""
        if aggregate is None:
            return self.params
        config = self.config
        update = aggregate.add(self.params, alpha=config.weight_decay) if config.weight_decay else aggregate
        return self.params.sub(update, alpha=config.lr_at(self.round))

    def close_round(
        self,
        vectors: dict[int, Tensor],
        *,
        train_losses: dict[int, float] | None = None,
        opened_at: float | None = None,
        refused: int = 0,
        aggregation: RoundAggregation | None = None,
        evaluation: RoundEvaluation | None = None,
        window: dict[str, Any] | None = None,
    ) -> RoundRecord:
        """Aggregate the round's vectors (keyed by worker id), step, evaluate, record, checkpoint.

        ``window``: an asynchronous update's window, recorded as it is (``RoundRecord.window``).

        ``train_losses``: the workers' training losses; the record averages the finite ones of the honest
        workers whose vectors are in ``vectors`` (the gRPC coordinator receives a loss only with an
        accepted vector, and drops a non-finite one). ``refused``: submissions refused for this round
        (non-finite, malformed, late), named in the reason when no vector was accepted.

        ``aggregation`` and ``evaluation``: what the batched engine computed for this run in its batched
        calls (the pipeline on the vectors, and the evaluation when one is due this round), used instead
        of computing them here; ``evaluation`` is ignored in a round without an evaluation.
        """
        if isinstance(refused, bool) or not isinstance(refused, int) or refused < 0:
            raise ValueError(f"refused must be a non-negative integer, got {refused!r}")
        start = time.perf_counter()
        opened_at = start if opened_at is None else opened_at
        self._in_round = True
        config = self.config
        t = self.round
        lr = config.lr_at(t)
        ids = sorted(vectors)
        handed_in = aggregation is not None
        if aggregation is None:
            aggregation = self.aggregate_round(vectors, refused=refused)
        self.params = self.next_params(aggregation.aggregate)
        aggregation_seconds = time.perf_counter() - start
        if handed_in and aggregation.seconds is not None:
            aggregation_seconds = aggregation.seconds
        for i in ids:
            self.last_vectors[i] = vectors[i]
        accuracy = test_loss = eval_seconds = validation_accuracy = validation_loss = None
        last = t + 1 >= config.rounds
        if (t + 1) % config.eval_every == 0 or last:
            if evaluation is None:
                eval_start = time.perf_counter()
                accuracy, test_loss = self.evaluator.evaluate(self.params)
                validation = self.evaluator.evaluate_validation(self.params)
                eval_seconds = time.perf_counter() - eval_start
            else:
                accuracy, test_loss, eval_seconds = evaluation.accuracy, evaluation.test_loss, evaluation.seconds
                validation = evaluation.validation
            self.last_accuracy = accuracy
            self.best_accuracy = _max(self.best_accuracy, accuracy)
            if validation is not None:
                validation_accuracy, validation_loss = validation
                self.last_validation_accuracy = validation_accuracy
                self.best_validation_accuracy = _max(self.best_validation_accuracy, validation_accuracy)
        # In id order, like the vectors: the gRPC coordinator's dict is in arrival order, and a float sum
        # of three or more losses depends on the order.
        losses = [
            loss
            for i, loss in sorted((train_losses or {}).items())
            if i < config.num_honest and i in vectors and math.isfinite(loss)
        ]
        clipped = aggregation.clipped
        record = RoundRecord(
            round=t,
            lr=lr,
            received_honest=sum(1 for i in ids if i < config.num_honest),
            received_byzantine=sum(1 for i in ids if i >= config.num_honest),
            aggregated=aggregation.aggregate is not None,
            skip_reason=aggregation.skip_reason,
            clip_threshold=aggregation.clip_threshold,
            clipped_honest=None if clipped is None else clipped[HONEST],
            clipped_byzantine=None if clipped is None else clipped[BYZANTINE],
            clipped_rows=aggregation.clipped_rows,
            aggregate_error=aggregation.aggregate_error,
            aggregate_norm=aggregation.aggregate_norm,
            train_loss=sum(losses) / len(losses) if losses else None,
            accuracy=accuracy,
            test_loss=test_loss,
            round_seconds=time.perf_counter() - opened_at,
            aggregation_seconds=aggregation_seconds,
            stage_seconds=aggregation.stage_seconds,
            eval_seconds=eval_seconds,
            validation_accuracy=validation_accuracy,
            validation_loss=validation_loss,
            norms=aggregation.norms,
            window=window,
        )
        if aggregation.skip_reason:
            log.warning("round %d not aggregated: %s", t, aggregation.skip_reason)
        self.round = t + 1
        if self.attack_state is not None:
            self._attack_snapshot = self.attack_state.state_dict()
        with open(self._rounds_path, "a") as out:
            out.write(record.to_json() + "\n")
        self._in_round = False
        if (
            self.checkpoint_seconds == 0.0
            or self.checkpointed_round is None
            or self.done
            or time.perf_counter() - self._checkpointed_at >= self.checkpoint_seconds
        ):
            self.save_checkpoint()
        return record

    def clipped_by_role(self, ids: list[int], clipped_inputs: Tensor | None) -> dict[str, int] | None:
        """Clipped vectors by role, from the mask over the sorted ids' rows; None when not attributable."""
        if clipped_inputs is None:
            return None
        clipped = {HONEST: 0, BYZANTINE: 0}
        # strict: a mask of another length would credit the wrong workers, silently, if zip truncated
        for i, was_clipped in zip(ids, clipped_inputs.tolist(), strict=True):
            clipped[self.role(i)] += int(was_clipped)
        return clipped

    # --- persistence ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        values = {
            "round": self.round,
            "config_digest": self.config.digest(),
            "run_settings": self.run_settings,
            "best_accuracy": self.best_accuracy,
            "last_accuracy": self.last_accuracy,
            "best_validation_accuracy": self.best_validation_accuracy,
            "last_validation_accuracy": self.last_validation_accuracy,
            "wall_seconds": self.wall_seconds(),
            "momentum_ids": sorted(self.last_vectors),
        }
        # The tensors are never modified after they are stored here (params is replaced each round).
        tensors = {"params": self.params, **{f"momentum/{i}": m for i, m in sorted(self.last_vectors.items())}}
        if self._attack_snapshot is not None:
            attack_values, attack_tensors = self._attack_snapshot
            values["attack_state"] = attack_values
            tensors.update({f"{_ATTACK_PREFIX}{name}": tensor for name, tensor in attack_tensors.items()})
        if self.engine_state is not None:
            engine_values, engine_tensors = self.engine_state.state_dict()
            values["engine_state"] = engine_values
            tensors.update({f"{_ENGINE_PREFIX}{name}": tensor for name, tensor in engine_tensors.items()})
        name = f"round-{self.round:08d}{checkpoint.SUFFIX}"
        if self._writer is None:
            checkpoint.save(self.ckpt_dir, name, values, tensors)
        else:
            self.wait_checkpoint()
            self._pending = self._writer.submit(checkpoint.save, self.ckpt_dir, name, values, tensors)
        self.checkpointed_round = self.round
        self._checkpointed_at = time.perf_counter()

    def wait_checkpoint(self) -> None:
        """Wait for a background checkpoint write to finish (and raise its error, if it failed)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def flush_checkpoint(self) -> bool:
        """Checkpoint the rounds closed since the last checkpoint, if any and if at a round boundary.

        For a run that is being interrupted (an exception out of the round loop): with
        ``checkpoint_seconds > 0`` the newest rounds may not be in a checkpoint yet. Returns whether
        it wrote one; a state caught in the middle of ``close_round`` is not saved (the previous
        checkpoint stays the newest).
        """
        if self._in_round or self.round == 0 or self.checkpointed_round == self.round:
            self.wait_checkpoint()
            return False
        self.save_checkpoint()
        self.wait_checkpoint()
        return True

    def _resume(self) -> None:
        try:
            found, skipped = checkpoint.load_latest(self.ckpt_dir)
        except checkpoint.CheckpointError as error:  # only checkpoints of the earlier format
            raise checkpoint.CheckpointError(f"--resume: {error}") from None
        for message in skipped:
            log.warning("skipping checkpoint: %s", message)
        if found is None:
            raise FileNotFoundError(f"--resume: no usable checkpoint in {self.ckpt_dir}")
        values = found.values
        if values["config_digest"] != self.config.digest():
            raise ValueError(f"--resume: the checkpoint in {self.ckpt_dir} was written by a different config")
        self._check_run_settings(values)
        self.round = int(values["round"])
        self.checkpointed_round = self.round
        self.params = found.tensors["params"]
        self.last_vectors = {int(i): found.tensors[f"momentum/{i}"] for i in values["momentum_ids"]}
        if self.attack_state is not None:
            if "attack_state" not in values:
                raise ValueError(f"--resume: the checkpoint in {self.ckpt_dir} holds no state of the run's attack")
            attack_tensors = {
                name[len(_ATTACK_PREFIX) :]: tensor
                for name, tensor in found.tensors.items()
                if name.startswith(_ATTACK_PREFIX)
            }
            try:
                self.attack_state.load_state_dict(values["attack_state"], attack_tensors)
            except ValueError as error:
                raise ValueError(f"--resume: the checkpoint in {self.ckpt_dir}: {error}") from None
            self._attack_snapshot = self.attack_state.state_dict()
        if self.engine_state is not None:
            if "engine_state" not in values:
                raise ValueError(f"--resume: the checkpoint in {self.ckpt_dir} holds no state of the engine")
            self.engine_state.load_state_dict(
                values["engine_state"],
                {n[len(_ENGINE_PREFIX) :]: t for n, t in found.tensors.items() if n.startswith(_ENGINE_PREFIX)},
            )
        self.best_accuracy = values["best_accuracy"]
        self.last_accuracy = values["last_accuracy"]
        # Absent from checkpoints written before the validation split existed: those runs had none.
        self.best_validation_accuracy = values.get("best_validation_accuracy")
        self.last_validation_accuracy = values.get("last_validation_accuracy")
        self.wall_seconds_before = float(values["wall_seconds"])
        self.started = time.time()
        # Keep the records of the rounds the checkpoint covers; drop any written after it, and a
        # torn line (a crash in the middle of writing a record).
        lines = self._rounds_path.read_text().splitlines() if self._rounds_path.exists() else []
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                if line.strip():
                    log.warning("--resume: dropping a torn line of %s: %.60s", self._rounds_path.name, line)
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] < self.round:
                kept.append(line)
        self._rounds_path.write_text("".join(line + "\n" for line in kept))
        log.info("resumed from %s at round %d", found.path.name, self.round)

    def _check_run_settings(self, values: Mapping[str, Any]) -> None:
        """Refuse a checkpoint written with other run settings, naming each differing key and both values."""
        if "run_settings" in values:
            stored = values["run_settings"]
        elif self.run_settings is None or self.run_settings == self._legacy_run_settings:
            return  # written before run settings were recorded, by a run with the settings given now
        else:
            raise ValueError(
                f"--resume: the checkpoint in {self.ckpt_dir} was written before run settings were recorded; "
                + (
                    "it can be resumed only with the default settings "
                    f"{_describe(self._legacy_run_settings)}, got {_describe(self.run_settings)}"
                    if self._legacy_run_settings is not None
                    else f"its settings are unknown, so it cannot be resumed with {_describe(self.run_settings)}"
                )
            )
        if stored == self.run_settings:
            return
        old, new = stored or {}, self.run_settings or {}
        keys = sorted(key for key in {*old, *new} if key not in old or key not in new or old[key] != new[key])
        differences = "; ".join(
            f"{key}: checkpoint {_describe_value(old, key)}, now {_describe_value(new, key)}" for key in keys
        )
        raise ValueError(
            f"--resume: the checkpoint in {self.ckpt_dir} was written with different run settings ({differences})"
        )

    def wall_seconds(self) -> float:
        return self.wall_seconds_before + (time.time() - self.started)

    def summary(self, *, engine: str, reason: str = "completed") -> dict[str, Any]:
        """Write ``model.safetensors`` (the parameters as the task's model's state dict) and then
        ``summary.json``, each atomically, and return the summary. Both hold the state the run ends
        in, also when ``reason`` is not "completed" (a stopped run), so the model file always has
        the summary's ``final_params_sha256``."""
        self.wait_checkpoint()  # the summary is written only once the final state is durable
        params_digest = params_sha256(self.params)
        checkpoint.save_tensors(
            self.out_dir / MODEL_FILE,
            self.evaluator.state_dict(self.params),
            metadata={
                "format": "pt",  # the safetensors convention for torch tensors
                "task": self.config.task,
                "model": self.config.model,
                "rounds_completed": str(self.round),
                "final_params_sha256": params_digest,
            },
        )
        summary = {
            "config": self.config.to_dict(),
            "engine": engine,
            "status": reason,
            "rounds_completed": self.round,
            "final_accuracy": self.last_accuracy,
            "max_accuracy": self.best_accuracy,
            "final_validation_accuracy": self.last_validation_accuracy,
            "max_validation_accuracy": self.best_validation_accuracy,
            "final_params_sha256": params_digest,
            "num_parameters": self.num_parameters,
            "num_classes": self.evaluator.num_classes,  # chance is 1 / num_classes (how reports score a diverged run)
            "run_settings": self.run_settings,
            "wall_seconds": round(self.wall_seconds(), 3),
        }
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.out_dir / "summary.json")
        return summary


def _max(best: float | None, value: float) -> float:
    return value if best is None else max(best, value)


def _json_settings(settings: Mapping[str, Any] | None, *, name: str) -> dict[str, Any] | None:
    """``settings`` as they read back from a checkpoint's JSON header (so that comparisons are like
    for like: a tuple becomes a list); ValueError when they are not JSON data keyed by strings."""
    if settings is None:
        return None
    if not isinstance(settings, Mapping) or not all(isinstance(key, str) for key in settings):
        raise ValueError(f"{name} must be a mapping with string keys or None, got {settings!r}")
    try:
        return json.loads(json.dumps(dict(settings), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must hold JSON values (numbers, strings, lists), got {settings!r}: {error}") from None


def _describe(settings: Mapping[str, Any] | None) -> str:
    return "none" if settings is None else ", ".join(f"{key}={value!r}" for key, value in sorted(settings.items()))


def _describe_value(settings: Mapping[str, Any], key: str) -> str:
    return "unset" if key not in settings else repr(settings[key])
