"""The coordinator's round logic, free of any transport.

:class:`RunState` owns the model parameters and everything a run must not lose. The gRPC service
(coordinator/service.py) and the in-process engine (coordinator/inproc.py) both hand it the
vectors of a round, keyed by worker id, and it

1. orders them by worker id (arrival order never changes the result),
2. runs the pipeline built by ``arcsim.robust.build_pipeline`` from the config,
3. steps the model, :math:`\\theta_{t+1} = \\theta_t - \\eta_t (R_t + \\lambda \\theta_t)`,
4. evaluates every ``eval_every`` rounds and after the last one,
5. appends a line to ``rounds.jsonl`` and writes a checkpoint (atomically).

Workers 0 .. num_honest - 1 are honest and the rest Byzantine: the simulator knows the ground
truth, so it can report the robustness error ||R_t - mean of the honest vectors|| and what ARC
did to each role.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arcsim.codec import tensor_to_bytes
from arcsim.config import RunConfig
from arcsim.robust import build_pipeline
from arcsim.tasks import load_dataset

from . import checkpoint
from .evaluation import Evaluator

log = logging.getLogger("arcsim.coordinator")

HONEST = "honest"
BYZANTINE = "byzantine"
ROLES = (HONEST, BYZANTINE)


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
    clipped_honest: int
    clipped_byzantine: int
    aggregate_error: float | None
    aggregate_norm: float | None
    train_loss: float | None
    accuracy: float | None
    test_loss: float | None
    round_seconds: float
    aggregation_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    eval_seconds: float | None = None
    # Norms of the received vectors by role (for the gradient-norm histogram; not written to disk).
    norms: dict[str, list[float]] = field(default_factory=dict, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("norms")
        return json.dumps(data)


def params_sha256(params: Tensor) -> str:
    return hashlib.sha256(tensor_to_bytes(params.contiguous())).hexdigest()


def role_of(config: RunConfig, worker_id: int) -> str:
    return HONEST if worker_id < config.num_honest else BYZANTINE


class RunState:
    """Parameters, round counter and the last vector of every worker, with checkpoints in ``out_dir``."""

    def __init__(self, config: RunConfig, out_dir: Path, *, resume: bool = False, device: str = "cpu") -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.device = torch.device(device)
        dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
        self.evaluator = Evaluator(config, dataset, device=self.device)
        self.pipeline = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)
        self.params = self.evaluator.initial_parameters()
        self.num_parameters = self.params.numel()
        self.round = 0
        self.momenta: dict[int, Tensor] = {}
        self.best_accuracy: float | None = None
        self.last_accuracy: float | None = None
        self.started = time.time()
        self.wall_seconds_before = 0.0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._rounds_path = self.out_dir / "rounds.jsonl"
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
    def close_round(self, vectors: dict[int, Tensor], *, train_losses: dict[int, float] | None = None,
                    opened_at: float | None = None) -> RoundRecord:
        """Aggregate the round's vectors (keyed by worker id), step, evaluate, record, checkpoint."""
        start = time.perf_counter()
        opened_at = start if opened_at is None else opened_at
        config = self.config
        t = self.round
        lr = config.lr_at(t)
        ids = sorted(vectors)
        honest_ids = [i for i in ids if i < config.num_honest]
        byz_ids = [i for i in ids if i >= config.num_honest]
        norms: dict[str, list[float]] = {HONEST: [], BYZANTINE: []}
        aggregated, skip_reason = False, None
        clip_threshold, aggregate_error, aggregate_norm = None, None, None
        clipped = {HONEST: 0, BYZANTINE: 0}
        stage_seconds: dict[str, float] = {}
        if not ids:
            skip_reason = "no vectors received"
        else:
            x = torch.stack([vectors[i] for i in ids]).to(self.device)
            row_norms = torch.linalg.vector_norm(x, dim=1).tolist()
            for i, norm in zip(ids, row_norms):
                norms[self.role(i)].append(norm)
            try:
                aggregate, report = self.pipeline(x)
            except ValueError as error:  # e.g. too few vectors arrived for 2f < n
                skip_reason = str(error)
            else:
                aggregated = True
                clip_threshold = report.clip_threshold
                if report.clipped is not None:
                    for i, was_clipped in zip(ids, report.clipped.tolist()):
                        clipped[self.role(i)] += int(was_clipped)
                stage_seconds = {stage.name: stage.seconds for stage in report.stages}
                aggregate = aggregate.to("cpu", torch.float32)
                aggregate_norm = float(torch.linalg.vector_norm(aggregate))
                if honest_ids:
                    honest_mean = torch.stack([vectors[i] for i in honest_ids]).mean(dim=0)
                    aggregate_error = float(torch.linalg.vector_norm(aggregate - honest_mean))
                # theta <- theta - lr * (R + weight_decay * theta)
                update = aggregate.add(self.params, alpha=config.weight_decay) if config.weight_decay else aggregate
                self.params = self.params.sub(update, alpha=lr)
        aggregation_seconds = time.perf_counter() - start
        for i in ids:
            self.momenta[i] = vectors[i]
        accuracy = test_loss = eval_seconds = None
        last = t + 1 >= config.rounds
        if (t + 1) % config.eval_every == 0 or last:
            eval_start = time.perf_counter()
            accuracy, test_loss = self.evaluator.evaluate(self.params)
            eval_seconds = time.perf_counter() - eval_start
            self.last_accuracy = accuracy
            self.best_accuracy = accuracy if self.best_accuracy is None else max(self.best_accuracy, accuracy)
        losses = [loss for i, loss in (train_losses or {}).items() if i < config.num_honest and loss == loss]
        record = RoundRecord(
            round=t, lr=lr, received_honest=len(honest_ids), received_byzantine=len(byz_ids),
            aggregated=aggregated, skip_reason=skip_reason, clip_threshold=clip_threshold,
            clipped_honest=clipped[HONEST], clipped_byzantine=clipped[BYZANTINE],
            aggregate_error=aggregate_error, aggregate_norm=aggregate_norm,
            train_loss=sum(losses) / len(losses) if losses else None,
            accuracy=accuracy, test_loss=test_loss,
            round_seconds=time.perf_counter() - opened_at, aggregation_seconds=aggregation_seconds,
            stage_seconds=stage_seconds, eval_seconds=eval_seconds, norms=norms,
        )
        if skip_reason:
            log.warning("round %d not aggregated: %s", t, skip_reason)
        self.round = t + 1
        with open(self._rounds_path, "a") as out:
            out.write(record.to_json() + "\n")
        self.save_checkpoint()
        return record

    # --- persistence ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        values = {
            "round": self.round,
            "config_digest": self.config.digest(),
            "best_accuracy": self.best_accuracy,
            "last_accuracy": self.last_accuracy,
            "wall_seconds": self.wall_seconds(),
            "momentum_ids": sorted(self.momenta),
        }
        tensors = {"params": self.params, **{f"momentum/{i}": m for i, m in sorted(self.momenta.items())}}
        checkpoint.save(self.ckpt_dir, f"round-{self.round:08d}.ckpt", values, tensors)

    def _resume(self) -> None:
        found, skipped = checkpoint.load_latest(self.ckpt_dir)
        for message in skipped:
            log.warning("skipping checkpoint: %s", message)
        if found is None:
            raise FileNotFoundError(f"--resume: no usable checkpoint in {self.ckpt_dir}")
        values = found.values
        if values["config_digest"] != self.config.digest():
            raise ValueError(f"--resume: the checkpoint in {self.ckpt_dir} was written by a different config")
        self.round = int(values["round"])
        self.params = found.tensors["params"]
        self.momenta = {int(i): found.tensors[f"momentum/{i}"] for i in values["momentum_ids"]}
        self.best_accuracy = values["best_accuracy"]
        self.last_accuracy = values["last_accuracy"]
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

    def wall_seconds(self) -> float:
        return self.wall_seconds_before + (time.time() - self.started)

    def summary(self, *, engine: str, reason: str = "completed") -> dict[str, Any]:
        summary = {
            "config": self.config.to_dict(),
            "engine": engine,
            "status": reason,
            "rounds_completed": self.round,
            "final_accuracy": self.last_accuracy,
            "max_accuracy": self.best_accuracy,
            "final_params_sha256": params_sha256(self.params),
            "num_parameters": self.num_parameters,
            "wall_seconds": round(self.wall_seconds(), 3),
        }
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.out_dir / "summary.json")
        return summary
