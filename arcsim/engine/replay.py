"""``arcsim replay``: an asynchronous gRPC run again, in process, following its ``arrivals.jsonl``.

The gRPC engine's schedule is real time, so it is not a function of the seed; what it did is in its
arrival log (arcsim/schedule.py, :class:`~arcsim.schedule.ArrivalLog`): every vector the coordinator took
or refused, computed by which worker at which step on which model version, crafted from which honest
vectors, and the window of each update. The replay goes through the log in its order and computes each
vector again:

* a worker that trains (honest, or a data attack's) computes step ``step`` on version ``version``'s
  parameters, continuing from its momentum: its last finite vector the coordinator received, which is
  what the gRPC worker continues from too (it fetches it again after any refused submission);
* an omniscient attacker crafts from the honest vectors of the arrivals it observed, with that
  observation's key (:func:`arcsim.schedule.observation_key`), and takes its row;
* each update aggregates the vectors of its window, scaled by their staleness weight, with RunState,
  which records the window as the gRPC run's rounds.jsonl did.

Without overrides it ends on the gRPC run's ``final_params_sha256`` (the same kernels in the same order:
one torch thread, the same device). With overrides (``--set pipeline=...``, another attack, learning rate,
staleness weighting, ...) the same schedule runs under them: the same stragglers, the same windows, the
same refusals as stale; a vector that turns non-finite under them is left out of its window, as the
coordinator would have refused it. What fixes the schedule cannot change (:data:`SCHEDULE_KEYS`).

A stateful attack (Mimic with ``learn_steps``) learns in the order it crafts: the replay crafts in the
order the vectors arrived, which is the adversary's order unless two of its ids crafted and then
arrived in the opposite order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arcsim.config import RunConfig
from arcsim.engine.byzantine import Crafter
from arcsim.engine.inproc import make_workers
from arcsim.engine.rounds import RoundRecord, RunState
from arcsim.schedule import observation_key, staleness_scaled

__all__ = ["SCHEDULE_KEYS", "ReplayError", "replay_arrivals", "schedule_changes"]

SCHEDULE_KEYS: tuple[str, ...] = (
    "schedule",
    "num_honest",
    "num_byzantine",
    "rounds",
    "round_deadline",
    "speeds",
    "async.buffer_size",
    "async.staleness_bound",
    "async.byzantine_timing",
)
"""The config keys that decide the schedule itself, which a replay takes from the log and cannot change."""


class ReplayError(ValueError):
    """The log cannot be replayed (it names the line's arrival or update and why)."""


def schedule_changes(original: RunConfig, replayed: RunConfig) -> list[str]:
    """The :data:`SCHEDULE_KEYS` whose values differ between the two configs."""
    a, b = original.to_dict(), replayed.to_dict()
    changed = []
    for key in SCHEDULE_KEYS:
        section, _, name = key.partition(".")
        left, right = a.get(section), b.get(section)
        if name:
            left = (left or {}).get(name)
            right = (right or {}).get(name)
        if left != right:
            changed.append(key)
    return changed


def replay_arrivals(
    config: RunConfig,
    events: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    device: str = "cpu",
    on_round: Callable[[RunState, RoundRecord], None] | None = None,
) -> dict[str, Any]:
    """Run ``config`` in process following ``events`` (:func:`arcsim.schedule.read_arrivals`); the summary.

    The summary's status is ``completed`` when the log holds every update of the run, else ``replayed``
    (a run that stopped early: the replay ends where its log does)."""
    if config.schedule != "async":
        raise ReplayError(f"a replay follows an asynchronous run's arrivals, not a schedule: {config.schedule} run")
    start, body = events[0], list(events[1:])
    if start.get("num_workers") != config.num_workers:
        raise ReplayError(f"the log is of {start.get('num_workers')} workers; the config has {config.num_workers}")
    crafter = Crafter(config)
    honest_workers, byzantine_workers = make_workers(config, crafter, device=device)
    byzantine = {w.worker_id: w for w in byzantine_workers}
    trainers = {
        **{w.worker_id: w for w in honest_workers},
        **{i: w.trainer for i, w in byzantine.items() if w.trainer is not None},
    }
    weighting, exponent = config.staleness_weighting, config.staleness_exponent

    # Where each version's parameters and each arrival's vector are last needed, to keep no more of them;
    # and whether every crafted vector can be crafted again (checked before anything is written).
    last_use_version: dict[int, int] = {}
    last_use_seq: dict[int, int] = {}
    for index, event in enumerate(body):
        if event["event"] == "arrival":
            crafted = event["worker"] not in trainers and event["outcome"] != "non_finite"
            if crafted and not event.get("observed"):
                raise ReplayError(
                    f"arrival {event['seq']}: worker {event['worker']} crafts its vector from observed honest ones, "
                    "and the log has no observation for it (the run's attack trained on data, e.g. label_flip, "
                    "or its adversary was not arcsim's): a replay cannot craft it"
                )
            if event["worker"] in trainers and event["outcome"] != "non_finite":
                last_use_version[int(event["version"])] = index
            for seq in (event.get("observed") or {}).get("seqs", ()):
                last_use_seq[int(seq)] = index
        else:
            for seq in event["seqs"]:
                last_use_seq[int(seq)] = index
    state = RunState(config, out_dir, device=device, attack_state=crafter.state)
    params: dict[int, Tensor] = {state.round: state.params}
    vectors: dict[int, tuple[int, Tensor | None, float]] = {}  # seq -> (worker, vector or None if left out, loss)
    momenta: dict[int, Tensor] = {}  # a trainer's last finite vector received

    for index, event in enumerate(body):
        if state.done:
            break
        if event["event"] == "arrival":
            seq, worker_id = int(event["seq"]), int(event["worker"])
            if event["outcome"] == "non_finite":
                continue  # refused, and the worker went on from its last finite vector: nothing to compute
            if worker_id in trainers:
                trainer = trainers[worker_id]
                version = int(event["version"])
                if version not in params:
                    raise ReplayError(f"arrival {seq}: computed on version {version}, which the log never reached")
                trainer.set_momentum(momenta.get(worker_id))
                vector, loss = trainer.step(params[version], int(event["step"])), trainer.last_loss
            else:
                observed = event["observed"]
                missing = [s for s in observed["seqs"] if int(s) not in vectors]
                if missing:
                    raise ReplayError(f"arrival {seq}: observed arrival {missing[0]} is not in the log before it")
                # Under overrides an observed vector may have turned non-finite: the coordinator would not have
                # held it, so the attacker sees the others (and sits the step out when none is left).
                rows = [vectors[int(s)][1] for s in observed["seqs"] if vectors[int(s)][1] is not None]
                if not rows:
                    vectors[seq] = (worker_id, None, math.nan)
                    continue
                key = observation_key(int(observed["version"]), observed["seqs"])
                vector = crafter.craft_all(torch.stack(rows), key)[byzantine[worker_id].index].clone()
                loss = math.nan
            finite = bool(torch.isfinite(vector).all())
            if finite and worker_id in trainers:
                momenta[worker_id] = vector
            if seq in last_use_seq:
                vectors[seq] = (worker_id, vector if finite else None, loss)
        else:
            window = event["window"]
            if int(event["round"]) != state.round:
                raise ReplayError(f"update {event['round']} comes where update {state.round} was due")
            taken = {}
            losses = {}
            left_out = 0
            for seq, staleness in zip(event["seqs"], window["staleness"]):
                if int(seq) not in vectors:
                    raise ReplayError(f"update {state.round}: arrival {seq} is not in the log before it")
                worker_id, vector, loss = vectors[int(seq)]
                if vector is None:
                    left_out += 1
                    continue
                taken[worker_id] = staleness_scaled(vector, int(staleness), weighting=weighting, exponent=exponent)
                losses[worker_id] = loss
            record = state.close_round(
                taken,
                train_losses=losses,
                window=dict(window),
                refused=int(window["stale_refused"]) + int(window["non_finite_refused"]) + left_out,
            )
            if on_round is not None:
                on_round(state, record)
            if state.round in last_use_version:
                params[state.round] = state.params
        for version in [v for v in params if last_use_version.get(v, -1) <= index and v != state.round]:
            del params[version]
        for seq in [s for s in vectors if last_use_seq[s] <= index]:
            del vectors[seq]
    return state.summary(engine="replay", reason="completed" if state.done else "replayed")
