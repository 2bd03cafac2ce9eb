"""The in-process engine: the coordinator's round logic with the workers as objects in one process.

It runs exactly the computations of the gRPC engine (same worker and coordinator code, same seeds,
same dtype and thread count), without the transport, and is meant for sweeps. For the same config
and seed it ends with the same ``final_params_sha256`` as ``arcsim run --engine grpc``.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arcsim.config import RunConfig
from arcsim.engine.byzantine import ByzantineWorker, Crafter
from arcsim.engine.honest import BatchedWorkers, HonestWorker, shards
from arcsim.engine.rounds import RoundRecord, RunState
from arcsim.tasks import load_dataset

log = logging.getLogger("arcsim.inproc")


def run_inproc(
    config: RunConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    on_round: Callable[[RunState, RoundRecord], None] | None = None,
    batch_workers: bool = False,
    checkpoint_seconds: float = 10.0,
) -> dict[str, Any]:
    """Run ``config`` to the end in this process; returns the summary (also in ``out_dir/summary.json``).

    ``batch_workers`` computes the honest gradients in one vmapped call (arcsim.engine.honest.BatchedWorkers):
    faster on a GPU, equal to the per-worker loop only up to rounding, so off by default.

    ``checkpoint_seconds``: a checkpoint is written after the first round, then after the first round
    that ends at least this many seconds after the previous checkpoint, after the last round, and when
    the loop is left by an exception (``on_round`` raising, KeyboardInterrupt); 0 writes one after
    every round. Results do not depend on it: a run killed outright (SIGKILL) and resumed redoes at
    most this many seconds of rounds and ends with the same parameters.
    """
    if config.schedule == "async":  # buffered, bounded-staleness updates on a simulated clock
        from arcsim.engine.asynchronous import run_async_inproc

        return run_async_inproc(
            config, out_dir, resume=resume, device=device, on_round=on_round, checkpoint_seconds=checkpoint_seconds
        )
    reuse_freed_memory()
    crafter = Crafter(config)  # the Byzantine workers collude: one crafted matrix per round
    state = RunState(
        config,
        out_dir,
        resume=resume,
        device=device,
        checkpoint_seconds=checkpoint_seconds,
        attack_state=crafter.state,  # checkpointed with the run, restored on --resume
    )
    honest, byzantine = make_workers(config, crafter, device=device)
    for worker in (*honest, *byzantine):
        worker.set_momentum(state.last_vectors.get(worker.worker_id))
    batched = BatchedWorkers(honest) if batch_workers else None
    try:
        _loop(state, honest, byzantine, batched, on_round)
    except BaseException:
        try:
            state.flush_checkpoint()
        except Exception as error:  # noqa: BLE001 - keep the original exception; the previous checkpoint stays
            log.warning("could not write a checkpoint while stopping: %s", error)
        raise
    return state.summary(engine="inproc")


def make_workers(
    config: RunConfig, crafter: Crafter, *, device: str = "cpu"
) -> tuple[list[HonestWorker], list[ByzantineWorker]]:
    """The run's honest workers and its Byzantine workers (colluding through ``crafter``), in id order,
    sharing one loaded dataset and one partition."""
    dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
    shard_list = shards(config, dataset)
    honest = [
        HonestWorker(config, i, device=device, dataset=dataset, shard_list=shard_list) for i in range(config.num_honest)
    ]
    byzantine = [
        ByzantineWorker(config, i, device=device, dataset=dataset, shard_list=shard_list, crafter=crafter)
        for i in range(config.num_honest, config.num_workers)
    ]
    return honest, byzantine


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory(*, mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Have glibc's malloc keep freed blocks up to ``mmap_threshold`` bytes for reuse (this process).

    Every round allocates and frees buffers of the same sizes: the (n, d) matrix of the vectors (22 MB
    for the paper's CNN with 10 + 3 workers) and the pipeline's and the attack's intermediates. glibc
    serves blocks that large with ``mmap`` and unmaps them when freed, so each round pays page faults
    and the zeroing of fresh pages again. With ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's largest default
    threshold) and ``M_TRIM_THRESHOLD`` = 256 MiB they come from the heap and are reused, and a round
    of configs/default.yaml costs less CPU time (docs/benchmarks.md, "In-process engine"). Only where
    the memory comes from changes, never a computed bit (torch aligns its buffers itself). Returns
    False, changing nothing, where the C library is not glibc.

    >>> reuse_freed_memory() in (True, False)
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


def _all_finite(v: Tensor) -> bool:
    """Whether ``v`` has no NaN or infinity: a finite sum implies it (NaN and infinities propagate
    through a sum), and only a non-finite sum, which overflow can also cause, takes the exact test."""
    return bool(torch.isfinite(v.sum())) or bool(torch.isfinite(v).all())


def _loop(
    state: RunState,
    honest: list[HonestWorker],
    byzantine: list[ByzantineWorker],
    batched: BatchedWorkers | None,
    on_round: Callable[[RunState, RoundRecord], None] | None,
) -> None:
    while not state.done:
        t = state.round
        opened_at = time.perf_counter()
        if batched is not None:
            vectors = dict(zip((w.worker_id for w in honest), batched.step(state.params, t)))
        else:
            vectors = {w.worker_id: w.step(state.params, t) for w in honest}
        # The gRPC coordinator refuses non-finite vectors at its edge (reason non_finite), so they never
        # enter a round there, nor reach an adversary through Observe; drop them here too, so that both
        # engines aggregate the same vectors. Honest vectors turn non-finite when the model diverged.
        computed = len(vectors)
        vectors = {i: v for i, v in vectors.items() if _all_finite(v)}
        refused = computed - len(vectors)  # counted like the gRPC coordinator's refusals, for the skip reason
        observed = [vectors[w.worker_id] for w in honest if w.worker_id in vectors]
        matrix = torch.stack(observed) if observed and any(w.needs_observation for w in byzantine) else None
        for w in byzantine:
            if w.needs_observation and matrix is None:
                continue  # nothing to observe: the adversary service sits the round out too
            vector = w.vector(params=state.params, round_=t, honest=matrix)
            if _all_finite(vector):
                vectors[w.worker_id] = vector
            else:
                refused += 1
        # Only the losses that came with a kept vector: the gRPC coordinator receives a loss with each
        # submission and keeps neither from a refused one (nor a non-finite loss; close_round drops those).
        losses = {w.worker_id: w.last_loss for w in honest if w.worker_id in vectors}
        record = state.close_round(vectors, train_losses=losses, opened_at=opened_at, refused=refused)
        if on_round is not None:
            on_round(state, record)
