"""The in-process engine: the coordinator's round logic with the workers as objects in one process.

It runs exactly the computations of the gRPC engine (same worker and coordinator code, same seeds,
same dtype and thread count), without the transport, and is meant for sweeps. For the same config
and seed it ends with the same ``final_params_sha256`` as ``arcsim run --engine grpc``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adversaries.byzantine import ByzantineWorker, Crafter
from arcsim.config import RunConfig
from arcsim.tasks import load_dataset
from workers.honest import BatchedWorkers, GradientWorker, shards

from .rounds import RoundRecord, RunState


def run_inproc(
    config: RunConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    on_round: Callable[[RunState, RoundRecord], None] | None = None,
    batch_workers: bool = False,
) -> dict[str, Any]:
    """Run ``config`` to the end in this process; returns the summary (also in ``out_dir/summary.json``).

    ``batch_workers`` computes the honest gradients in one vmapped call (workers.honest.BatchedWorkers):
    faster on a GPU, equal to the per-worker loop only up to rounding, so off by default.
    """
    state = RunState(config, out_dir, resume=resume, device=device)
    dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
    shard_list = shards(config, dataset)
    honest = [GradientWorker(config, i, device=device, dataset=dataset, shard_list=shard_list)
              for i in range(config.num_honest)]
    crafter = Crafter(config)  # the Byzantine workers collude: one crafted matrix per round
    byzantine = [ByzantineWorker(config, i, device=device, dataset=dataset, shard_list=shard_list, crafter=crafter)
                 for i in range(config.num_honest, config.num_workers)]
    for worker in (*honest, *byzantine):
        worker.set_momentum(state.momenta.get(worker.worker_id))
    batched = BatchedWorkers(honest) if batch_workers else None
    while not state.done:
        t = state.round
        opened_at = time.perf_counter()
        if batched is not None:
            vectors = dict(zip((w.worker_id for w in honest), batched.step(state.params, t)))
        else:
            vectors = {w.worker_id: w.step(state.params, t) for w in honest}
        observed = torch.stack([vectors[w.worker_id] for w in honest]) if byzantine else None
        for w in byzantine:
            vectors[w.worker_id] = w.vector(params=state.params, round_=t, honest=observed)
        # The gRPC coordinator refuses non-finite vectors at its edge (reason non_finite), so they never
        # enter a round there; drop them here too, so that both engines aggregate the same vectors.
        vectors = {i: v for i, v in vectors.items() if bool(torch.isfinite(v).all())}
        losses = {w.worker_id: w.last_loss for w in honest}
        record = state.close_round(vectors, train_losses=losses, opened_at=opened_at)
        if on_round is not None:
            on_round(state, record)
    return state.summary(engine="inproc")
