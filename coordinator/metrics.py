"""The coordinator's Prometheus metrics: declared once, here, under the prefix ``arcsim_``.

Labels stay bounded: ``role`` (honest, byzantine), ``stage`` (a pipeline stage name), ``reason``
(a rejection reason from a fixed set). No label ever carries a worker id. Each coordinator owns a
registry, so several can live in one process (tests).
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .rounds import BYZANTINE, HONEST, ROLES, RoundRecord

# Rejection reasons (the `reason` label): bounded, documented in docs/reliability.md.
REJECTION_REASONS = (
    "unauthenticated",
    "permission_denied",
    "unknown_worker",
    "not_joined",
    "no_free_id",
    "stale_round",
    "future_round",
    "duplicate",
    "missing_header",
    "unexpected_header",
    "bad_dtype",
    "bad_shape",
    "size_mismatch",
    "oversized",
    "truncated",
    "checksum",
    "non_finite",
    "cancelled",
    "malformed",
)

# Norms of momentum vectors span many orders of magnitude (attacks send 1e6 or more).
_NORM_BUCKETS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1e3, 1e4, 1e6, float("inf"))
_ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
_STAGE_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, float("inf"))


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http: tuple[Any, threading.Thread] | None = None  # the /metrics server, once started
        r = self.registry
        self.round = Gauge("arcsim_round", "Rounds completed so far (the next round to run).", registry=r)
        self.round_duration = Histogram("arcsim_round_duration_seconds",
                                        "Time from a round's opening to its aggregate being applied.",
                                        buckets=_ROUND_BUCKETS, registry=r)
        self.aggregation_duration = Histogram("arcsim_aggregation_duration_seconds",
                                              "Time spent in each stage of the robust pipeline.", ["stage"],
                                              buckets=_STAGE_BUCKETS, registry=r)
        self.submissions = Counter("arcsim_submissions_total", "Vectors accepted, by role.", ["role"], registry=r)
        self.rejected = Counter("arcsim_submissions_rejected_total", "Submissions rejected, by reason.", ["reason"],
                                registry=r)
        self.connected = Gauge("arcsim_workers_connected", "Workers with an open round stream, by role.", ["role"],
                               registry=r)
        self.clip_threshold = Gauge("arcsim_clip_threshold", "Clip threshold of the last round (ARC's C).",
                                    registry=r)
        self.clipped = Counter("arcsim_clipped_vectors_total", "Vectors changed by clipping, by role.", ["role"],
                               registry=r)
        self.gradient_norm = Histogram("arcsim_gradient_norm", "Norms of the vectors received, by role.", ["role"],
                                       buckets=_NORM_BUCKETS, registry=r)
        self.aggregate_error = Gauge("arcsim_aggregate_error",
                                     "||aggregate - mean of the honest vectors|| of the last round.", registry=r)
        self.test_accuracy = Gauge("arcsim_test_accuracy", "Test accuracy at the last evaluation.", registry=r)
        self.test_loss = Gauge("arcsim_test_loss", "Test loss at the last evaluation.", registry=r)
        self.train_loss = Gauge("arcsim_train_loss", "Mean training loss of the honest workers, last round.",
                                registry=r)
        self.received_bytes = Counter("arcsim_received_bytes_total", "Payload bytes of accepted vectors.",
                                      registry=r)
        for role in ROLES:  # export every series from the start, so dashboards show zeros, not gaps
            self.submissions.labels(role)
            self.connected.labels(role)
            self.clipped.labels(role)
            self.gradient_norm.labels(role)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP on its own port; returns the port bound (useful with port 0).

        Raises ``OSError`` naming the address when it cannot listen there (e.g. the port is taken).
        """
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
        self._http = (server, thread)
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the /metrics server, if one was started, and release its port."""
        http, self._http = self._http, None
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    def observe_round(self, record: RoundRecord) -> None:
        self.round.set(record.round + 1)
        self.round_duration.observe(record.round_seconds)
        for stage, seconds in record.stage_seconds.items():
            self.aggregation_duration.labels(stage).observe(seconds)
        if record.clip_threshold is not None:
            self.clip_threshold.set(record.clip_threshold)
        self.clipped.labels(HONEST).inc(record.clipped_honest)
        self.clipped.labels(BYZANTINE).inc(record.clipped_byzantine)
        for role, norms in record.norms.items():
            for norm in norms:
                self.gradient_norm.labels(role).observe(norm)
        if record.aggregate_error is not None:
            self.aggregate_error.set(record.aggregate_error)
        if record.accuracy is not None:
            self.test_accuracy.set(record.accuracy)
        if record.test_loss is not None:
            self.test_loss.set(record.test_loss)
        if record.train_loss is not None:
            self.train_loss.set(record.train_loss)
