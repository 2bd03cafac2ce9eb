"""The in-process engine under ``schedule: async``: buffered, bounded-staleness updates on a simulated clock.

The schedule (arcsim/schedule.py): every worker takes the current model, computes for a duration drawn
from its role's speed, submits, and takes the model again; the coordinator's buffer holds at most one
vector per worker, refuses a vector more than ``async.staleness_bound`` versions old (``stale``), and
once it holds ``async.buffer_size`` (K) vectors it aggregates them: one model update, the next version.
An update is what ``rounds`` counts, ``eval_every`` too, and what rounds.jsonl records, each line with a
``window``: the simulated time of the update, the workers in it (id order) with their roles and
staleness, the Byzantine share of the window, how it closed (``closed``: ``full``; ``deadline``, when
``round_deadline`` simulated seconds passed since the last update with the buffer not full, so that a
straggler cannot hold the run; ``stuck``, see below), and the vectors refused since the last update
(``stale_refused``, ``non_finite_refused``).

What each worker computes:

* An honest worker (and a data attack's Byzantine trainer) computes its momentum at the version it took,
  on the batch of its own step k (the draws of round k of a synchronous run: (seed, "batch", k, id)),
  when it takes the model; the vector arrives after the step's duration with that version's staleness.
* A Byzantine worker of a vector attack is omniscient; ``async.byzantine_timing`` says when it crafts:
  ``arrival`` (default): when it arrives, from the honest vectors in the buffer at that moment (the
  window so far; the last window's when the buffer holds none; it sits the step out before any honest
  vector exists), claiming the current version (staleness 0). ``start``: when it takes the model, from
  what it sees then, and it arrives as stale as an honest vector taken at the same time (a realistic,
  slower-reacting attacker). ``hold``: on arrival it waits until the waiting attackers can fill the
  buffer, and then they all land together, crafted from that window's honest vectors (every window
  they enter holds all of them). Colluding workers craft the same ``(f, d)`` matrix and each submits
  its own row.

Before the pipeline each vector is scaled by its staleness weight (``async.staleness_weighting``: none,
1/sqrt(1+s), or (1+s)^-exponent), and the pipeline is built for ``async.window_f`` Byzantine vectors
per window (``RunConfig.f``), checked against K as f against n in a synchronous run. Non-finite vectors
are refused, as the synchronous engines refuse them.

Determinism: the durations, batches and attack noise derive from the run's seed, and the event queue
breaks ties by worker id, so a config gives the same ``final_params_sha256`` every time, also when it
is stopped and resumed (a checkpoint holds the event queue, the vectors in flight and the momenta). The
gRPC engine runs the same schedule in real time (arcsim/coordinator/asynchronous.py), and
``arcsim replay`` (arcsim/engine/replay.py) re-runs such a run in process from its arrival log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arcsim.config import RunConfig
from arcsim.engine.byzantine import Crafter
from arcsim.engine.honest import HonestWorker
from arcsim.engine.inproc import make_workers
from arcsim.engine.rounds import RoundRecord, RunState
from arcsim.schedule import Buffer, EventQueue, Speeds, staleness_scaled, window_record

__all__ = ["run_async_inproc"]


def _finite(v: Tensor) -> bool:
    return bool(torch.isfinite(v).all())


class _Simulation:
    """What an asynchronous run holds between updates besides RunState's parameters: the event queue, each
    worker's vector in flight and step count, the trainers' momenta, and the last window's honest vectors.
    RunState checkpoints it with each update (``state_dict``: taken right after an update, when the buffer
    is empty and the worker whose arrival closed the window restarts at ``restart``)."""

    def __init__(self, trainers: dict[int, HonestWorker], num_workers: int) -> None:
        self.trainers = trainers
        self.queue = EventQueue()
        self.steps = dict.fromkeys(range(num_workers), 0)
        self.pending: dict[int, tuple[int, Tensor | None, float]] = {}  # worker -> (version, vector, loss)
        self.last_honest: Tensor | None = None  # the last window's honest vectors (for a crafter, buffer empty)
        self.restart: tuple[list[int], float] | None = None  # (workers, time) whose arrival closed the last window
        self.held: list[int] = []  # byzantine_timing hold: Byzantine workers waiting to land together
        self.window_opened = 0.0  # simulated time of the last update: the window closes by round_deadline after

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        values = {
            "now": self.queue.now,
            "queue": sorted(self.queue.events()),
            "steps": [self.steps[w] for w in sorted(self.steps)],
            "pending": {str(w): [v, loss] for w, (v, _, loss) in sorted(self.pending.items())},
            "restart": self.restart,
            "held": list(self.held),
            "window_opened": self.window_opened,
            "momenta": sorted(w for w, t in self.trainers.items() if t.momentum is not None),
        }
        tensors = {f"vector/{w}": vector for w, (_, vector, _) in self.pending.items() if vector is not None}
        tensors.update({f"momentum/{w}": t.momentum for w, t in self.trainers.items() if t.momentum is not None})
        if self.last_honest is not None:
            tensors["last_honest"] = self.last_honest
        return values, {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}

    def load_state_dict(self, values: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        self.queue = EventQueue(now=float(values["now"]), events=[(float(t), int(w)) for t, w in values["queue"]])
        self.steps = dict(enumerate(int(k) for k in values["steps"]))
        self.pending = {
            int(w): (int(version), tensors.get(f"vector/{w}"), float(loss))
            for w, (version, loss) in values["pending"].items()
        }
        restart = values["restart"]
        self.restart = None if restart is None else ([int(w) for w in restart[0]], float(restart[1]))
        self.held = [int(w) for w in values.get("held", [])]
        self.window_opened = float(values.get("window_opened", 0.0))
        for w in values["momenta"]:
            self.trainers[int(w)].set_momentum(tensors[f"momentum/{w}"])
        self.last_honest = tensors.get("last_honest")


def run_async_inproc(
    config: RunConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    on_round: Callable[[RunState, RoundRecord], None] | None = None,
    checkpoint_seconds: float = 10.0,
) -> dict[str, Any]:
    """Run an asynchronous ``config`` to its last update in this process; returns the summary.

    ``resume``: go on from the last checkpoint in ``out_dir`` (written inside an update, with the event
    queue, the vectors in flight and the momenta), ending on the parameters of an uninterrupted run."""
    if config.schedule != "async":
        raise ValueError(f"run_async_inproc runs schedule: async configs, got schedule: {config.schedule}")
    crafter = Crafter(config)
    honest_workers, byzantine_workers = make_workers(config, crafter, device=device)
    byzantine = {w.worker_id: w for w in byzantine_workers}
    trainers = {
        **{w.worker_id: w for w in honest_workers},
        **{i: w.trainer for i, w in byzantine.items() if w.trainer is not None},
    }
    sim = _Simulation(trainers, config.num_workers)
    # A checkpoint after the first update, then every checkpoint_seconds and after the last one, each taken
    # inside an update's close (the simulation's state is whole there); an interrupted run keeps the last one.
    state = RunState(
        config,
        out_dir,
        resume=resume,
        device=device,
        checkpoint_seconds=checkpoint_seconds,
        attack_state=crafter.state,
        engine_state=sim,
    )
    buffer = Buffer(size=config.buffer_size, staleness_bound=config.staleness_bound)
    weighting, exponent, timing = config.staleness_weighting, config.staleness_exponent, config.byzantine_timing
    speeds = Speeds(config.speeds, seed=config.seed, num_honest=config.num_honest, num_workers=config.num_workers)
    stale = non_finite = 0
    blocked: set[int] = set()  # workers whose vector since the last update was non-finite
    opened_at = time.perf_counter()

    def start(worker_id: int, now: float) -> None:
        """The worker takes the current model: a trainer computes now, an omniscient crafter on arrival."""
        step = sim.steps[worker_id]
        sim.steps[worker_id] = step + 1
        trainer = trainers.get(worker_id)
        if trainer is not None:
            vector = trainer.step(state.params, step)
            sim.pending[worker_id] = (state.round, vector, trainer.last_loss)
        elif timing == "start":  # crafted now, from what it sees now, and as stale as an honest vector on arrival
            sim.pending[worker_id] = (state.round, craft(worker_id, now), float("nan"))
        else:
            sim.pending[worker_id] = (state.round, None, float("nan"))
        sim.queue.push(now + speeds.duration(worker_id, step), worker_id)

    def craft(worker_id: int, now: float) -> Tensor | None:
        """Worker ``worker_id``'s crafted row from the honest vectors in the buffer (else the last window's)."""
        rows = [e.payload[0] for e in buffer.entries() if e.worker_id < config.num_honest]
        observed = torch.stack(rows) if rows else sim.last_honest
        if observed is None:
            return None  # no honest vector exists yet: it sits the step out
        key = _craft_key(now, state.round)
        return byzantine[worker_id].vector(params=state.params, round_=key, honest=observed)

    def offer(worker_id: int, version: int, vector: Tensor | None, loss: float) -> None:
        nonlocal stale, non_finite
        if vector is None:
            return
        if not _finite(vector):
            non_finite += 1
            blocked.add(worker_id)
        elif buffer.offer(worker_id, version=version, current=state.round, payload=(vector, loss)) == "stale":
            stale += 1
        else:
            blocked.discard(worker_id)

    def close(now: float, restarting: list[int], reason: str) -> None:
        """One update from the buffer's window; ``restarting``: the workers that take the model after it."""
        nonlocal stale, non_finite, opened_at
        window = buffer.take()
        vectors = {
            e.worker_id: staleness_scaled(e.payload[0], e.staleness, weighting=weighting, exponent=exponent)
            for e in window
        }
        honest_rows = [e.payload[0] for e in window if e.worker_id < config.num_honest]
        if honest_rows:
            sim.last_honest = torch.stack(honest_rows)
        sim.restart, sim.window_opened = (restarting, now), now
        record = state.close_round(
            vectors,
            train_losses={e.worker_id: e.payload[1] for e in window if e.worker_id < config.num_honest},
            opened_at=opened_at,
            window=window_record(
                window,
                time=now,
                closed=reason,
                stale_refused=stale,
                non_finite_refused=non_finite,
                num_honest=config.num_honest,
            ),
            refused=stale + non_finite,
        )
        stale = non_finite = 0
        blocked.clear()
        opened_at = time.perf_counter()
        if on_round is not None:
            on_round(state, record)
        sim.restart = None

    if state.round == 0:
        for worker_id in range(config.num_workers):
            start(worker_id, 0.0)
    elif sim.restart is not None:  # resumed: the workers whose arrival closed the checkpointed window
        workers, now = sim.restart
        for restarted in workers:
            start(restarted, now)
    while not state.done:
        deadline = sim.window_opened + config.round_deadline
        if sim.queue.next_time() > deadline:
            # Nothing arrives before the window's deadline: it closes with what it holds (the pipeline may
            # skip it), as a synchronous round does at its deadline, and a straggler cannot hold the run.
            close(deadline, [], "deadline")
            continue
        now, worker_id = sim.queue.pop()
        version, vector, loss = sim.pending.pop(worker_id)
        released: list[int] = []
        if worker_id >= config.num_honest and worker_id not in trainers and timing == "hold":
            sim.held.append(worker_id)  # it waits to land with the others at the end of a window
        else:
            if vector is None and timing == "arrival":  # omniscient: crafted from what the buffer holds now
                version, vector = state.round, craft(worker_id, now)
            offer(worker_id, version, vector, loss)
        if sim.held and len({e.worker_id for e in buffer.entries()} | set(sim.held)) >= buffer.size:
            # The held workers land together, crafted from the window's honest vectors, filling it.
            released, sim.held = sorted(sim.held), []
            for held_id in released:
                offer(held_id, state.round, craft(held_id, now), float("nan"))
        # A diverged model's vectors are non-finite, so the buffer might never fill: once the workers that
        # sent a non-finite vector since the last update leave too few others to fill it, the update closes
        # with what the buffer holds (the pipeline may skip it, as a synchronous round short of vectors).
        restarting = sorted({worker_id, *released} - set(sim.held))  # take the model again after this arrival
        if buffer.full or buffer.stuck(blocked, config.num_workers):
            close(now, restarting, "full" if buffer.full else "stuck")
        for restarted in restarting:
            start(restarted, now)
    return state.summary(engine="inproc")


def _craft_key(now: float, version: int) -> int:
    """The crafting's key for the Crafter's per-round cache and the attack noise: one per arrival time and
    model version, so colluders arriving together share a matrix, but not across an update between them
    (which a resumed run, its cache empty, could not reproduce)."""
    return int(now * 1e6) * 1_000_003 + version
