"""The Prometheus metrics of a worker or an adversary process: declared once, here, under ``arcsim_worker_``.

Labels stay bounded: ``role`` (honest, byzantine), ``reason`` (the gRPC status code of a refused
submission, lowercased like the coordinator's reasons: one of the 16 non-OK codes) and ``device``
(cpu, cuda). No label ever carries a worker id: Prometheus' ``instance`` label tells the workers
apart. Each process owns a registry, so several can live in one process (tests); colluding Byzantine
ids in one adversary process share one (arcsim/adversaries/service.py).
"""

from __future__ import annotations

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from arcsim.roles import ROLES, Role
from arcsim.transport.metrics_http import MetricsServer

HONEST, BYZANTINE = Role.HONEST, Role.BYZANTINE

# The refusal reasons: every gRPC status code but OK, so the set is bounded whatever the coordinator answers.
REFUSAL_REASONS = tuple(code.name.lower() for code in grpc.StatusCode if code != grpc.StatusCode.OK)

# A round's vector takes from milliseconds (a linear model on a GPU) to minutes (a large model on a CPU).
_COMPUTE_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    float("inf"),
)


def refusal_reason(code: grpc.StatusCode) -> str:
    """The ``reason`` label of a submission refused with ``code``."""
    if code == grpc.StatusCode.OK:
        raise ValueError("a refusal has a status code other than OK")
    return code.name.lower()


class WorkerMetrics:
    """The metrics of one worker process, for one role; ``serve`` exposes them on /metrics."""

    def __init__(self, *, role: str, device: torch.device, registry: CollectorRegistry | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.device = device
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http = MetricsServer(self.registry, what="worker metrics")
        r = self.registry
        self.compute_seconds = Histogram(
            "arcsim_worker_compute_seconds",
            "Time to compute one round's vector (an observing adversary: including its wait for the honest ones; "
            "schedule: async: the whole step, its drawn duration included).",
            ["role"],
            buckets=_COMPUTE_BUCKETS,
            registry=r,
        )
        self.vectors_sent = Counter(
            "arcsim_worker_vectors_sent_total",
            "Vectors submitted, whatever the answer (accepted = sent - refused).",
            ["role"],
            registry=r,
        )
        self.vectors_refused = Counter(
            "arcsim_worker_vectors_refused_total",
            "Submissions that failed, by the gRPC status code of the answer.",
            ["role", "reason"],
            registry=r,
        )
        self.rounds = Counter(
            "arcsim_worker_rounds_total", "Rounds followed (whose parameters arrived).", ["role"], registry=r
        )
        self.cuda_memory = Gauge(
            "arcsim_worker_cuda_memory_allocated_bytes",
            "CUDA memory held by tensors after the last round's computation (0 off CUDA).",
            registry=r,
        )
        self.info = Info("arcsim_worker", "What this worker process is: its role and its device.", registry=r)
        # Export every series from the start, so dashboards show zeros, not gaps.
        self.compute_seconds.labels(role)
        self.vectors_sent.labels(role)
        self.rounds.labels(role)
        for reason in REFUSAL_REASONS:
            self.vectors_refused.labels(role, reason)
        self.info.info({"role": role, "device": device.type})

    def computed(self, seconds: float) -> None:
        """One round's vector took ``seconds``."""
        self.compute_seconds.labels(self.role).observe(seconds)
        if self.device.type == "cuda":
            self.cuda_memory.set(torch.cuda.memory_allocated(self.device))

    def sent(self) -> None:
        self.vectors_sent.labels(self.role).inc()

    def refused(self, code: grpc.StatusCode) -> None:
        self.vectors_refused.labels(self.role, refusal_reason(code)).inc()

    def round_followed(self) -> None:
        self.rounds.labels(self.role).inc()

    @property
    def port(self) -> int | None:
        """The /metrics port, once served."""
        return self._http.port

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP; returns the port bound (useful with port 0).

        Raises ``OSError`` naming the address when it cannot listen there (e.g. the port is taken).
        """
        return self._http.serve(port, host)

    def close(self) -> None:
        """Stop the /metrics server, if one was started, and release its port."""
        self._http.close()
