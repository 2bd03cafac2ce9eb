"""The asynchronous schedule's parts, free of any model: worker speeds, the event queue, the buffer.

``schedule: async`` (arcsim/config.py) replaces the synchronous round with buffered, bounded-staleness
updates (the in-process engine runs it: arcsim/engine/asynchronous.py):

* Every worker loops: it takes the current model (version v), computes for a duration drawn from its
  role's speed (:class:`Speeds`), and submits a vector computed on version v; then it takes the model
  again. Time is simulated (an event queue, :class:`EventQueue`), never slept.
* The coordinator keeps a :class:`Buffer` of at most one vector per worker (a worker that submits again
  replaces its own entry) and refuses a vector more than ``staleness_bound`` versions old (counted as
  ``stale``). Once the buffer holds ``buffer_size`` vectors from as many workers it aggregates them (one
  model update, the next version) and empties.

Durations: ``constant`` (``seconds``), ``lognormal`` (``median`` and ``sigma`` of the log), ``zipf``
(``scale`` times a Zipf(``exponent``) integer, a heavy tail of stragglers) or ``trace`` (a text file, one
line per worker of that role in id order, whitespace- or comma-separated seconds used in turn). Draws come
from (seed, "speed", worker id, step), so a run's schedule is the same in every process.

Ties: events at the same time are taken in worker-id order.

The gRPC engine runs the same schedule in real time and writes what happened to ``arrivals.jsonl``
(:class:`ArrivalLog`, read back with :func:`read_arrivals`), which ``arcsim replay`` follows in process.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arcsim.roles import role_of
from arcsim.seeding import derive_seed

__all__ = [
    "ARRIVALS_FILE",
    "ARRIVALS_FORMAT",
    "DISTRIBUTIONS",
    "STALENESS_WEIGHTINGS",
    "ArrivalLog",
    "Buffer",
    "EventQueue",
    "Speeds",
    "check_speed",
    "observation_key",
    "read_arrivals",
    "staleness_scaled",
    "staleness_weight",
    "window_record",
]

DISTRIBUTIONS: tuple[str, ...] = ("constant", "lognormal", "zipf", "trace")
STALENESS_WEIGHTINGS: tuple[str, ...] = ("none", "inverse_sqrt", "polynomial")
_PARAMS = {"constant": {"seconds"}, "lognormal": {"median", "sigma"}, "zipf": {"exponent", "scale"}, "trace": {"file"}}
DEFAULT_SPEED: Mapping[str, Any] = {"distribution": "constant", "seconds": 1.0}


def staleness_weight(staleness: int, *, weighting: str, exponent: float = 0.5) -> float:
    """The factor a vector ``staleness`` versions old is scaled by before the pipeline.

    ``none``: 1; ``inverse_sqrt``: 1 / sqrt(1 + s); ``polynomial``: (1 + s) ** -exponent.

    >>> staleness_weight(3, weighting="inverse_sqrt"), staleness_weight(3, weighting="polynomial", exponent=1.0)
    (0.5, 0.25)
    """
    if weighting == "none":
        return 1.0
    if weighting == "inverse_sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    if weighting == "polynomial":
        return (1.0 + staleness) ** -exponent
    raise ValueError(f"staleness_weighting must be one of {', '.join(STALENESS_WEIGHTINGS)}, got {weighting!r}")


def staleness_scaled(vector: Any, staleness: int, *, weighting: str, exponent: float = 0.5) -> Any:
    """``vector`` scaled by its :func:`staleness_weight` (the vector itself when the weight is 1).

    >>> staleness_scaled(8.0, 3, weighting="inverse_sqrt"), staleness_scaled(8.0, 3, weighting="none")
    (4.0, 8.0)
    """
    weight = staleness_weight(staleness, weighting=weighting, exponent=exponent)
    return vector if weight == 1.0 else vector * weight


def check_speed(role: str, spec: object) -> dict[str, Any]:
    """``spec`` as a checked mapping (ValueError naming what is wrong); a trace's file is read here."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"speeds.{role} must be a mapping with a distribution, got {spec!r}")
    spec = dict(spec)
    distribution = spec.get("distribution")
    if distribution not in _PARAMS:
        raise ValueError(f"speeds.{role}.distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    given = set(spec) - {"distribution"}
    if given != _PARAMS[distribution]:
        raise ValueError(
            f"speeds.{role}: a {distribution} speed takes {', '.join(sorted(_PARAMS[distribution]))}, got "
            f"{', '.join(sorted(given)) or 'nothing'}"
        )
    positive = {"seconds", "median", "scale"} & given
    for key in sorted(positive):
        if not _real(spec[key]) or not spec[key] > 0:
            raise ValueError(f"speeds.{role}.{key} must be a positive number, got {spec[key]!r}")
    if distribution == "lognormal" and (not _real(spec["sigma"]) or spec["sigma"] < 0):
        raise ValueError(f"speeds.{role}.sigma must be a number >= 0, got {spec['sigma']!r}")
    if distribution == "zipf" and (not _real(spec["exponent"]) or not spec["exponent"] > 1):
        raise ValueError(f"speeds.{role}.exponent must be a number > 1, got {spec['exponent']!r}")
    if distribution == "trace":
        _read_trace(role, spec["file"])
    return spec


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_trace(role: str, path: object) -> list[list[float]]:
    if not isinstance(path, str):
        raise ValueError(f"speeds.{role}.file must be a path, got {path!r}")
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"speeds.{role}.file: cannot read {path}: {error.strerror}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            times = [float(v) for v in line.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"speeds.{role}.file {path}, line {number}: not numbers: {line.strip()[:60]!r}") from None
        if not times or not all(math.isfinite(t) and t > 0 for t in times):
            raise ValueError(f"speeds.{role}.file {path}, line {number}: times must be positive seconds")
        rows.append(times)
    if not rows:
        raise ValueError(f"speeds.{role}.file {path}: no line of times")
    return rows


class Speeds:
    """How long each step of each worker takes: ``duration(worker_id, step)`` in simulated seconds."""

    def __init__(self, speeds: Mapping[str, Any], *, seed: int, num_honest: int, num_workers: int) -> None:
        self.seed, self.num_honest, self.num_workers = seed, num_honest, num_workers
        self._specs = {role: check_speed(role, speeds.get(role, DEFAULT_SPEED)) for role in ("honest", "byzantine")}
        self._traces = {
            role: _read_trace(role, spec["file"])
            for role, spec in self._specs.items()
            if spec["distribution"] == "trace"
        }

    def duration(self, worker_id: int, step: int) -> float:
        role = "honest" if worker_id < self.num_honest else "byzantine"
        spec = self._specs[role]
        kind = spec["distribution"]
        if kind == "constant":
            return float(spec["seconds"])
        if kind == "trace":
            rows = self._traces[role]
            index = worker_id if role == "honest" else worker_id - self.num_honest
            times = rows[index % len(rows)]
            return times[step % len(times)]
        draw = random.Random(derive_seed(self.seed, "speed", worker_id, step))
        if kind == "lognormal":
            return float(spec["median"]) * math.exp(float(spec["sigma"]) * draw.gauss(0.0, 1.0))
        return float(spec["scale"]) * _zipf(draw, float(spec["exponent"]))


def _zipf(draw: random.Random, exponent: float) -> int:
    """A Zipf(``exponent``) integer >= 1 (Devroye's rejection method, as numpy's)."""
    am1, b = exponent - 1.0, 2.0 ** (exponent - 1.0)
    while True:
        u, v = 1.0 - draw.random(), draw.random()
        x = math.floor(u ** (-1.0 / am1))
        if x < 1 or x > 2**62:
            continue
        t = (1.0 + 1.0 / x) ** am1
        if v * x * (t - 1.0) / (b - 1.0) <= t / b:
            return int(x)


class EventQueue:
    """Simulated time: each worker's next arrival, taken earliest first (ties by worker id)."""

    def __init__(self, *, now: float = 0.0, events: Sequence[tuple[float, int]] = ()) -> None:
        self._heap: list[tuple[float, int]] = list(events)
        heapq.heapify(self._heap)
        self.now = now
        if any(time < now for time, _ in self._heap):
            raise ValueError(f"an event before the present {now}")

    def next_time(self) -> float:
        """The time of the earliest pending event (infinity when none is pending)."""
        return self._heap[0][0] if self._heap else math.inf

    def events(self) -> list[tuple[float, int]]:
        """The pending events (time, worker id), in no particular order."""
        return list(self._heap)

    def push(self, time: float, worker_id: int) -> None:
        if time < self.now:
            raise ValueError(f"an event at {time} is before the present {self.now}")
        heapq.heappush(self._heap, (time, worker_id))

    def pop(self) -> tuple[float, int]:
        time, worker_id = heapq.heappop(self._heap)
        self.now = time
        return time, worker_id

    def __len__(self) -> int:
        return len(self._heap)


@dataclass(frozen=True)
class Entry:
    worker_id: int
    version: int  # the model version the vector was computed on
    staleness: int  # versions behind the model when it arrived
    payload: Any


class Buffer:
    """At most one entry per worker; full at ``size`` entries; refuses vectors over ``staleness_bound`` old."""

    def __init__(self, *, size: int, staleness_bound: int) -> None:
        if size < 1 or staleness_bound < 0:
            raise ValueError(f"a buffer needs size >= 1 and staleness_bound >= 0, got {size} and {staleness_bound}")
        self.size, self.staleness_bound = size, staleness_bound
        self._entries: dict[int, Entry] = {}

    def offer(self, worker_id: int, *, version: int, current: int, payload: Any) -> str:
        """Take a vector computed on ``version`` while the model is at ``current``: "stale" (refused),
        "replaced" (the worker's earlier entry) or "accepted"."""
        staleness = current - version
        if staleness < 0:
            raise ValueError(f"a vector computed on version {version} cannot arrive at version {current}")
        if staleness > self.staleness_bound:
            return "stale"
        replaced = worker_id in self._entries
        self._entries[worker_id] = Entry(worker_id, version, staleness, payload)
        return "replaced" if replaced else "accepted"

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.size

    def stuck(self, blocked: set[int], num_workers: int) -> bool:
        """Not full, and the workers neither in it nor ``blocked`` (they sent a non-finite vector since the
        last update: a diverged model) are too few to fill it."""
        others = sum(1 for w in range(num_workers) if w not in self._entries and w not in blocked)
        return not self.full and len(self._entries) + others < self.size

    def entries(self) -> list[Entry]:
        return [self._entries[i] for i in sorted(self._entries)]

    def take(self) -> list[Entry]:
        """The window (entries in worker-id order), emptying the buffer."""
        window = self.entries()
        self._entries.clear()
        return window


def window_record(
    window: Sequence[Entry],
    *,
    time: float,
    closed: str,
    stale_refused: int,
    non_finite_refused: int,
    num_honest: int,
) -> dict[str, Any]:
    """An update's ``window`` in rounds.jsonl (both engines): its time, the workers in it (id order) with
    their roles and staleness, the Byzantine share, how it closed (full, deadline, stuck) and the vectors
    refused since the last update."""
    byzantine = sum(1 for e in window if e.worker_id >= num_honest)
    return {
        "time": time,
        "workers": [e.worker_id for e in window],
        "roles": [role_of(e.worker_id, num_honest=num_honest) for e in window],
        "staleness": [e.staleness for e in window],
        "byzantine_share": byzantine / len(window) if window else None,
        "closed": closed,
        "stale_refused": stale_refused,
        "non_finite_refused": non_finite_refused,
    }


def observation_key(version: int, seqs: Sequence[int]) -> int:
    """The crafting key of an omniscient attack that observed the arrivals ``seqs`` at model ``version``
    (gRPC engine and ``arcsim replay``): its attack noise and the Crafter's cache are keyed by it, so that
    colluders who observed the same vectors craft the same matrix, and a replay crafts it again.

    >>> observation_key(3, [0, 4]) == observation_key(3, [0, 4]) != observation_key(3, [0, 5])
    True
    """
    text = json.dumps([int(version), [int(s) for s in seqs]], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


ARRIVALS_FILE = "arrivals.jsonl"
ARRIVALS_FORMAT = 1


class ArrivalLog:
    """The gRPC engine's ``arrivals.jsonl``: what the coordinator received and aggregated, in its order.

    One JSON object per line, ``event`` first:

    * ``start``: ``format``, ``config_digest``, ``num_workers`` (the first line);
    * ``arrival``: ``seq`` (0, 1, 2, ... in the order the coordinator took the vectors), ``worker``,
      ``step`` (the worker's step number, which draws its batch), ``version`` (the model version it was
      computed on), ``at`` (the model version when it arrived), ``outcome`` (``accepted``, ``replaced``:
      the worker's earlier entry of the window, ``stale``, ``non_finite``), ``time`` (seconds since the
      first version was announced) and, for an omniscient attack, ``observed``: the ``version`` and the
      ``seqs`` of the honest vectors it was crafted from;
    * ``update``: ``round`` (the update), ``seqs`` (the window, in worker-id order) and ``window`` (the
      record rounds.jsonl has for it).

    Each line is flushed as it is written; :meth:`truncate` cuts the file back to a checkpoint's size.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run; close() ends it

    def write(self, event: str, **fields: Any) -> None:
        self._handle.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
        self._handle.flush()

    def size(self) -> int:
        return self._handle.tell()

    def truncate(self, size: int) -> None:
        """Drop what was written after ``size`` bytes (a resumed run goes on from its checkpoint)."""
        self._handle.flush()
        if size > os.path.getsize(self.path):
            raise ValueError(f"{self.path} is shorter than its checkpoint says ({size} bytes)")
        self._handle.truncate(size)
        self._handle.seek(size)

    def close(self) -> None:
        self._handle.close()


def read_arrivals(path: Path) -> list[dict[str, Any]]:
    """The events of an ``arrivals.jsonl`` (ValueError naming the line when one is not a whole event; a
    last line cut short by a crash is left out)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # written when the process died
                break
            raise ValueError(f"{path}, line {number}: not a JSON object") from None
        if not isinstance(event, dict) or event.get("event") not in ("start", "arrival", "update"):
            raise ValueError(f"{path}, line {number}: not an arrivals event")
        events.append(event)
    if not events or events[0]["event"] != "start":
        raise ValueError(f"{path} does not start with its start line")
    if events[0].get("format") != ARRIVALS_FORMAT:
        raise ValueError(f"{path} has format {events[0].get('format')!r}; this arcsim reads {ARRIVALS_FORMAT}")
    return events
