"""Soak test of the coordinator: many lightweight workers, vectors of about 100,000 float32, bounded rounds.

For each worker count N, one real coordinator (``arcsim coordinator``, the CLI's own entry point, in
a child process, with its default settings: a checkpoint after every round written in the
background, /metrics on its own port) runs ``--rounds`` rounds with N honest workers and no
Byzantine one. The workers are the lightweight asyncio clients of ``benchmarks/testbed.py``
(``_arcsim_client``: the calls of ``arcsim.workers.service.Session`` with the real codec, one gRPC channel
and so one TCP connection each, as N machines would have), spread over ``--client-processes``
processes; each answers every round at once with a constant vector, so the coordinator's own costs
are what is measured.

The vector length is the model's parameter count, so ``--numel`` picks the (task, model) whose count
is nearest (the models have fixed shapes): for 100,000 that is the MLP on Fashion-MNIST, 159,010
float32 (636 kB) per vector, 1.59 times the target.

Measured per worker count:

- **round latency**: ``round_seconds`` of rounds.jsonl (the round's opening to its aggregate being
  applied, what ``arcsim_round_duration_seconds`` observes), and the **round interval**, the time
  between consecutive rounds' parameters reaching the first client (it adds what happens between
  two rounds: the record, the wait for the previous round's background checkpoint, the next
  round's broadcast). Median and p99 (nearest rank; with fewer than 100 rounds p99 is the maximum).
- **memory**: the coordinator's RSS (``/proc/PID/status``, sampled every 50 ms from this process)
  before round 0, the peak of every round, and the peak of the run (``VmHWM``, which includes the
  start-up's). Bounded means no growth from round to round: the trend (least-squares slope) of the
  rounds' peaks after the first quarter of the rounds, next to one round's vectors (N x 4 d bytes),
  the slope a coordinator that kept every round's vectors would show.
- **checkpoints**: bytes and seconds of every write (the real ``arcsim.engine.checkpoint.save``,
  timed by a wrapper in the coordinator's process).
- **correctness**: every round received exactly N vectors (rounds.jsonl ``received_honest``), the
  coordinator's ``arcsim_submissions_total{role="honest"}`` is rounds x N and ``{role="byzantine"}``
  0, ``arcsim_submissions_rejected_total`` is 0 for every reason, ``arcsim_received_bytes_total`` is
  rounds x N x 4 d, and every client received every round's parameters, had every submission
  accepted and saw the run's end.

    python benchmarks/soak.py --workers 10 200 1000 --numel 100000 --rounds 30   # make soak: about 5 minutes
    python benchmarks/soak.py --workers 50 --rounds 3 --json soak.json --markdown soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from testbed import RoundClock, _arcsim_client, _one_torch_thread, _receive, _run_async, _spawn, _stop, machine

# Models whose parameter count --numel chooses from: (task, model), every pairing the config allows
# that is not a duplicate count (mnist-5k and digits give the counts of fashion-mnist and synthetic).
MODEL_CHOICES: tuple[tuple[str, str], ...] = (
    ("synthetic", "logreg"),
    ("synthetic", "mlp"),
    ("fashion-mnist", "logreg"),
    ("fashion-mnist", "mlp"),
    ("fashion-mnist", "cnn"),
)
SAMPLE_SECONDS = 0.05  # RSS sampling period
LINGER_SECONDS = 600.0  # the coordinator keeps /metrics up until this process has read it (then SIGTERM)


# --------------------------------------------------------------------------------------------
# The run's settings


def parameter_count(task: str, model: str) -> int:
    """Parameters of ``model`` on ``task``'s inputs: the length of every vector of such a run."""
    from arcsim.tasks import build_model, load_dataset, num_parameters

    dataset = load_dataset(task)
    return num_parameters(build_model(model, input_shape=dataset.input_shape, num_classes=dataset.num_classes))


def model_for(numel: int) -> tuple[str, str, int]:
    """The (task, model, parameter count) of ``MODEL_CHOICES`` whose count is nearest ``numel`` in ratio."""
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    counts = [(task, model, parameter_count(task, model)) for task, model in MODEL_CHOICES]
    return min(counts, key=lambda choice: abs(math.log(choice[2] / numel)))


@dataclass(frozen=True)
class SoakSettings:
    """One soak run: ``num_workers`` honest workers, ``rounds`` rounds, the model of ``task``/``model``."""

    num_workers: int
    rounds: int
    task: str = "fashion-mnist"
    model: str = "mlp"
    pipeline: str = "mean"
    client_processes: int = 2
    round_deadline: float = 60.0  # the config's default
    timeout: float = 1800.0  # seconds the whole run may take

    def __post_init__(self) -> None:
        for name, low in (("num_workers", 1), ("rounds", 1), ("client_processes", 1)):
            value = getattr(self, name)
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.client_processes > self.num_workers:
            raise ValueError(
                f"client_processes ({self.client_processes}) must not exceed num_workers ({self.num_workers})"
            )

    def config(self) -> Any:
        """The run config: all workers honest, evaluation after the last round only."""
        from arcsim.config import from_dict

        return from_dict(
            {
                "task": self.task,
                "model": self.model,
                "num_honest": self.num_workers,
                "num_byzantine": 0,
                "attack": "none",
                "pipeline": self.pipeline,
                "partitioner": "iid",
                "rounds": self.rounds,
                "eval_every": self.rounds,
                "round_deadline": self.round_deadline,
            }
        )


# --------------------------------------------------------------------------------------------
# The coordinator: the CLI's entry point in a child process, its checkpoint writes timed


def _coordinator_main(conn: Any, argv: list[str]) -> None:
    """``arcsim coordinator ARGV``; sends its exit code and the duration and size of each checkpoint write."""
    try:
        from arcsim import cli
        from arcsim.engine import checkpoint

        writes: list[dict[str, float]] = []
        save = checkpoint.save

        def timed_save(folder: Path, name: str, values: dict[str, Any], tensors: dict[str, Any], **kw: Any) -> Path:
            start = time.perf_counter()
            path = save(folder, name, values, tensors, **kw)
            writes.append(
                {"round": values["round"], "seconds": time.perf_counter() - start, "bytes": path.stat().st_size}
            )
            return path

        checkpoint.save = timed_save  # RunState calls checkpoint.save through the module
        code = cli.main(argv)
        conn.send({"exit_code": code, "checkpoint_writes": writes})
    except BaseException as error:  # reported to the parent, which raises
        conn.send({"error": repr(error)})
        raise


def _wait_for_endpoint(out: Path, process: Any, *, timeout: float) -> dict[str, Any]:
    """The coordinator's coordinator.json (its ports), once written."""
    path = out / "coordinator.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not process.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not start within {timeout:.0f}s (exit code {process.exitcode})")
        time.sleep(0.02)
    return json.loads(path.read_text())


class Sample(NamedTuple):
    """The coordinator at one moment: ``closed`` rounds done (lines of rounds.jsonl), RSS and peak RSS."""

    time: float  # time.perf_counter()
    closed: int
    rss_bytes: int  # VmRSS
    peak_rss_bytes: int  # VmHWM


class CoordinatorSampler(threading.Thread):
    """Samples the coordinator every ``SAMPLE_SECONDS`` (a :class:`Sample`), from this process."""

    def __init__(self, pid: int, rounds_path: Path) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.rounds_path = pid, rounds_path
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def _read(self) -> Sample | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            closed = self.rounds_path.read_bytes().count(b"\n") if self.rounds_path.exists() else 0
        except OSError:
            return None
        kib = {
            key: int(rest.split()[0])
            for key, _, rest in (line.partition(":") for line in status.splitlines())
            if key in ("VmRSS", "VmHWM")
        }
        return Sample(time.perf_counter(), closed, kib["VmRSS"] * 1024, kib["VmHWM"] * 1024)

    def run(self) -> None:
        while not self._halt.is_set():
            sample = self._read()
            if sample is not None:
                self.samples.append(sample)
            self._halt.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        """Take a last sample (the coordinator is still up) and stop sampling."""
        self._halt.set()
        self.join()
        sample = self._read()
        if sample is not None:
            self.samples.append(sample)


def scrape_metrics(port: int) -> dict[str, float]:
    """The coordinator's /metrics as ``{'name{label="value"}': value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


# --------------------------------------------------------------------------------------------
# The workers: many lightweight asyncio clients per process


@dataclass
class SoakClock(RoundClock):
    """:class:`RoundClock` that also counts, per round, the clients that got the parameters and were answered."""

    got: Counter[int] = field(default_factory=Counter)
    answered: Counter[int] = field(default_factory=Counter)

    def mark_arrived(self, round_: int) -> None:
        super().mark_arrived(round_)
        self.got[round_] += 1

    def mark_uploaded(self, round_: int) -> None:
        super().mark_uploaded(round_)
        self.answered[round_] += 1


async def _run_clients(
    address: str, *, secret: str, worker_ids: Sequence[int], num_honest: int, coordinator_pid: int, timeout: float
) -> dict[str, Any]:
    """Run the clients of ``worker_ids`` to the end of the run; what each saw, and this process's CPU time."""
    started = time.perf_counter()
    clock = SoakClock(server_pid=coordinator_pid)
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *[
                _arcsim_client(address, worker_id=i, secret=secret, num_honest=num_honest, barrier=None, clock=clock)
                for i in worker_ids
            ],
            return_exceptions=True,
        ),
        timeout,
    )
    failed = [f"worker {i}: {outcome!r}" for i, outcome in zip(worker_ids, outcomes) if outcome is not None]
    return {
        "clients": len(worker_ids),
        "failed": len(failed),
        "errors": failed[:5],
        "got": dict(clock.got),
        "answered": dict(clock.answered),
        "started": started,
        "arrived": clock.arrived,
        "cpu_per_round": clock.cpu_per_round(warmup=0) if clock.cpu else {},
    }


def _clients_main(
    conn: Any, address: str, secret: str, worker_ids: list[int], num_honest: int, coordinator_pid: int, timeout: float
) -> None:
    """One client process: a lightweight client per id in ``worker_ids``, all on one event loop."""
    try:
        _one_torch_thread()
        conn.send(
            _run_async(
                _run_clients(
                    address,
                    secret=secret,
                    worker_ids=worker_ids,
                    num_honest=num_honest,
                    coordinator_pid=coordinator_pid,
                    timeout=timeout,
                )
            )
        )
    except BaseException as error:
        conn.send({"error": repr(error)})
        raise


# --------------------------------------------------------------------------------------------
# One run


def run_soak(settings: SoakSettings) -> dict[str, Any]:
    """One coordinator and ``settings.num_workers`` clients to the end of the run; the measurements."""
    from arcsim.transport.auth import new_secret

    config = settings.config()
    secret = new_secret()
    n = settings.num_workers
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="arcsim-soak-") as tmp:
        out = Path(tmp) / "run"
        (Path(tmp) / "config.yaml").write_text(config.to_yaml())
        (Path(tmp) / "secret").write_text(secret)
        argv = [
            "coordinator",
            "--config",
            str(Path(tmp) / "config.yaml"),
            "--out",
            str(out),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--secret-file",
            str(Path(tmp) / "secret"),
            "--linger",
            str(LINGER_SECONDS),
            "--log-level",
            "error",
        ]
        coordinator, coordinator_conn = _spawn(_coordinator_main, argv)
        clients: list[tuple[Any, Any]] = []
        try:
            endpoint = _wait_for_endpoint(out, coordinator, timeout=120)
            sampler = CoordinatorSampler(coordinator.pid, out / "rounds.jsonl")
            sampler.start()
            address = f"127.0.0.1:{endpoint['port']}"
            share = [list(range(n))[k :: settings.client_processes] for k in range(settings.client_processes)]
            clients = [
                _spawn(_clients_main, address, secret, ids, n, coordinator.pid, settings.timeout) for ids in share
            ]
            reports = [
                _receive(process, conn, timeout=settings.timeout + 60, what=f"client process {k}")
                for k, (process, conn) in enumerate(clients)
            ]
            metrics = scrape_metrics(endpoint["metrics_port"])
            sampler.stop()
            coordinator.terminate()  # SIGTERM ends the linger; the run itself has completed
            result = _receive(coordinator, coordinator_conn, timeout=120, what="coordinator")
            if result["exit_code"] != 0:
                raise RuntimeError(f"the coordinator exited with code {result['exit_code']}")
            records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line]
            summary = json.loads((out / "summary.json").read_text())
        finally:
            for process, _ in clients:
                _stop(process, timeout=5)
            _stop(coordinator, timeout=30)
    return {
        "settings": {**settings.__dict__, "num_parameters": summary["num_parameters"]},
        "seconds": round(time.monotonic() - started, 1),
        **analyse(
            settings,
            num_parameters=summary["num_parameters"],
            records=records,
            reports=reports,
            metrics=metrics,
            samples=sampler.samples,
            checkpoint_writes=result["checkpoint_writes"],
            rounds_completed=summary["rounds_completed"],
        ),
    }


# --------------------------------------------------------------------------------------------
# What the run shows


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100): the smallest value at or above q % of them."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def _latency(values: Sequence[float]) -> dict[str, Any]:
    return (
        {
            "median_s": statistics.median(values),
            "p99_s": percentile(values, 99),
            "max_s": max(values),
            "values": [round(v, 4) for v in values],
        }
        if values
        else {"values": []}
    )


def round_peaks(samples: Sequence[Sample], rounds: int) -> list[int]:
    """Peak RSS (bytes) of each round, 0 where no sample fell in it: while round r was open or closing."""
    peaks = [0] * rounds
    for sample in samples:
        if sample.closed < rounds:
            peaks[sample.closed] = max(peaks[sample.closed], sample.rss_bytes)
    return peaks


def _checks(
    settings: SoakSettings,
    *,
    num_parameters: int,
    records: Sequence[dict[str, Any]],
    reports: Sequence[dict[str, Any]],
    metrics: dict[str, float],
    rounds_completed: int,
) -> dict[str, bool]:
    """No lost or double-counted submission, by rounds.jsonl, the /metrics page and the clients (name -> passed)."""
    n, rounds = settings.num_workers, settings.rounds
    got, answered = Counter(), Counter()
    for report in reports:
        got.update(report["got"])
        answered.update(report["answered"])
    rejected = sum(v for k, v in metrics.items() if k.startswith("arcsim_submissions_rejected_total{"))
    return {
        "rounds_completed": rounds_completed == rounds and len(records) == rounds,
        "every_round_N_vectors": all(
            r["received_honest"] == n and r["received_byzantine"] == 0 and r["aggregated"] for r in records
        ),
        "submissions_total_honest": metrics.get('arcsim_submissions_total{role="honest"}') == rounds * n,
        "submissions_total_byzantine": metrics.get('arcsim_submissions_total{role="byzantine"}') == 0,
        "no_rejection": rejected == 0,
        "received_bytes_total": metrics.get("arcsim_received_bytes_total") == rounds * n * num_parameters * 4,
        "no_client_failed": all(report["failed"] == 0 for report in reports),
        "every_client_every_round": all(got[r] == n and answered[r] == n for r in range(rounds)),
    }


def _memory(samples: Sequence[Sample], *, rounds: int, vectors_bytes: int) -> dict[str, Any]:
    """The coordinator's RSS before round 0, in every round, at its peak, and its trend over the rounds.

    The trend is the least-squares slope of the rounds' peak RSS against the round number, from the
    end of the first quarter of the rounds (the first rounds grow the allocator's heaps to their
    working size); None with fewer than three rounds sampled there. A coordinator that kept
    something of every round would grow by that much per round: one round's vectors is a slope of
    ``vectors_bytes``.
    """
    peaks = round_peaks(samples, rounds)
    points = [(r, p) for r, p in enumerate(peaks) if r >= rounds // 4 and p]
    trend = statistics.linear_regression(*zip(*points)).slope if len(points) >= 3 else None
    base = samples[0].rss_bytes if samples else 0  # the model, the dataset, the server
    return {
        "vectors_bytes": vectors_bytes,  # one round's vectors: N x d x 4
        "base_rss_bytes": base,
        "round_peak_rss_bytes": peaks,
        "rounds_peak_rss_bytes": max(peaks),
        "rounds_peak_over_base_in_vectors": (max(peaks) - base) / vectors_bytes,
        "peak_rss_bytes": max(s.peak_rss_bytes for s in samples) if samples else 0,  # VmHWM: start-up included
        "trend_bytes_per_round": trend,
    }


def analyse(
    settings: SoakSettings,
    *,
    num_parameters: int,
    records: Sequence[dict[str, Any]],
    reports: Sequence[dict[str, Any]],
    metrics: dict[str, float],
    samples: Sequence[Sample],
    checkpoint_writes: Sequence[dict[str, float]],
    rounds_completed: int,
) -> dict[str, Any]:
    """The checks, latency, CPU, memory and checkpoint figures of a run."""
    checks = _checks(
        settings,
        num_parameters=num_parameters,
        records=records,
        reports=reports,
        metrics=metrics,
        rounds_completed=rounds_completed,
    )
    first_arrival: dict[int, float] = {}
    for report in reports:
        for r, t in report["arrived"].items():
            first_arrival[r] = min(t, first_arrival.get(r, math.inf))
    arrivals = [first_arrival[r] for r in sorted(first_arrival)]
    cpu = [report["cpu_per_round"] for report in reports if report["cpu_per_round"]]
    write_seconds = [w["seconds"] for w in checkpoint_writes]
    return {
        "checks": checks,
        "passed": all(checks.values()),
        # From the clients' start to round 0's parameters at the first client: connect, Join, subscribe.
        "join_s": first_arrival[0] - min(report["started"] for report in reports) if 0 in first_arrival else None,
        "round_seconds": _latency([r["round_seconds"] for r in records]),
        "round_interval": _latency([b - a for a, b in zip(arrivals, arrivals[1:])]),
        "aggregation_s_median": statistics.median(r["aggregation_seconds"] for r in records) if records else None,
        # CPU seconds per round from round 0's parameters to the last round's (from /proc, as testbed.py).
        "cpu_s_per_round": {
            "coordinator": cpu[0].get("server_cpu_s") if cpu else None,
            "clients": sum(c["client_cpu_s"] for c in cpu) if cpu else None,
        },
        "memory": _memory(samples, rounds=settings.rounds, vectors_bytes=settings.num_workers * num_parameters * 4),
        "checkpoint": {
            "writes": len(checkpoint_writes),
            "bytes_median": statistics.median(w["bytes"] for w in checkpoint_writes) if checkpoint_writes else None,
            "seconds_median": statistics.median(write_seconds) if write_seconds else None,
            "seconds_max": max(write_seconds) if write_seconds else None,
        },
        "failures": [e for report in reports for e in report["errors"]],
    }


# --------------------------------------------------------------------------------------------
# Reporting


def _cell(value: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    """``value / scale`` formatted with ``spec``; '-' where there is none."""
    return "-" if value is None else format(value / scale, spec)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict[str, Any], command: str) -> str:
    """The runs as two tables (rounds; memory and checkpoints), with the machine and the command."""
    m = results["machine"]
    runs = results["runs"]
    d = runs[0]["settings"]["num_parameters"] if runs else 0
    rounds_header = [
        "workers",
        "rounds",
        "join s",
        "round s, median",
        "p99",
        "round interval s, median",
        "p99",
        "aggregation s, median",
        "coordinator CPU s/round",
        "clients CPU s/round",
        "checks",
    ]
    memory_header = [
        "workers",
        "one round's vectors, MB",
        "RSS before round 0, MB",
        "peak RSS in rounds, MB",
        "(peak - before) / vectors",
        "VmHWM, MB",
        "RSS trend, MB/round",
        "checkpoint, MB",
        "checkpoint write s, median",
        "max",
    ]
    lines = [
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']},"
        f" grpcio {m['grpcio']}; load average {m['loadavg_start']} at the start, {m.get('loadavg_end')} at the end.",
        f"Command: `{command}`; vectors of {d:,} float32 ({d * 4 / 1e3:.0f} kB).",
        "",
        _row(rounds_header),
        "|" + "---|" * len(rounds_header),
    ]
    for run in runs:
        s, cpu = run["settings"], run["cpu_s_per_round"]
        failed = [name for name, ok in run["checks"].items() if not ok]
        lines.append(
            _row(
                [
                    s["num_workers"],
                    s["rounds"],
                    _cell(run["join_s"], ".1f"),
                    _cell(run["round_seconds"].get("median_s")),
                    _cell(run["round_seconds"].get("p99_s")),
                    _cell(run["round_interval"].get("median_s")),
                    _cell(run["round_interval"].get("p99_s")),
                    _cell(run["aggregation_s_median"], ".3f"),
                    _cell(cpu["coordinator"]),
                    _cell(cpu["clients"]),
                    "all passed" if not failed else "FAILED: " + ", ".join(failed),
                ]
            )
        )
    lines += ["", _row(memory_header), "|" + "---|" * len(memory_header)]
    for run in runs:
        mem, ckpt = run["memory"], run["checkpoint"]
        lines.append(
            _row(
                [
                    run["settings"]["num_workers"],
                    _cell(mem["vectors_bytes"], ".0f", 1e6),
                    _cell(mem["base_rss_bytes"], ".0f", 1e6),
                    _cell(mem["rounds_peak_rss_bytes"], ".0f", 1e6),
                    _cell(mem["rounds_peak_over_base_in_vectors"], ".1f"),
                    _cell(mem["peak_rss_bytes"], ".0f", 1e6),
                    _cell(mem["trend_bytes_per_round"], "+.1f", 1e6),
                    _cell(ckpt["bytes_median"], ".0f", 1e6),
                    _cell(ckpt["seconds_median"]),
                    _cell(ckpt["seconds_max"]),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _print_run(run: dict[str, Any]) -> None:
    s, mem = run["settings"], run["memory"]
    print(
        f"{s['num_workers']} workers x {s['num_parameters']:,} floats x {s['rounds']} rounds:"
        f" round {run['round_seconds'].get('median_s', math.nan):.2f} s median,"
        f" {run['round_seconds'].get('p99_s', math.nan):.2f} s p99;"
        f" peak RSS {mem['peak_rss_bytes'] / 1e6:.0f} MB (base {mem['base_rss_bytes'] / 1e6:.0f} MB);"
        f" checks {'passed' if run['passed'] else 'FAILED'} in {run['seconds']:.0f}s"
    )
    for failure in run["failures"]:
        print(f"  {failure}")
    sys.stdout.flush()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 200, 1000], help="worker counts, one run each")
    parser.add_argument(
        "--numel",
        type=int,
        default=100_000,
        help="vector length wanted: the model whose parameter count is nearest is used",
    )
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    parser.add_argument("--pipeline", default="mean", help="the coordinator's pipeline (default: mean)")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=2,
        help="processes the clients are spread over (default 2; fewer where there are fewer workers)",
    )
    parser.add_argument("--round-deadline", type=float, default=60.0, help="seconds a round stays open (default 60)")
    parser.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table to this file")
    args = parser.parse_args(argv)
    for name in ("rounds", "numel", "client_processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.workers):
        parser.error(f"--workers must all be >= 1, got {args.workers}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    _one_torch_thread()
    task, model, numel = model_for(args.numel)
    print(f"vectors: {numel:,} float32 (model {model!r} on {task!r}, the nearest to --numel {args.numel:,})")
    results: dict[str, Any] = {"machine": machine(), "runs": []}
    for n in args.workers:
        settings = SoakSettings(
            num_workers=n,
            rounds=args.rounds,
            task=task,
            model=model,
            pipeline=args.pipeline,
            client_processes=min(args.client_processes, n),
            round_deadline=args.round_deadline,
        )
        run = run_soak(settings)
        results["runs"].append(run)
        _print_run(run)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(results, command.strip())
    print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(table)
    return 0 if all(run["passed"] for run in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
