"""The coordinator's Prometheus metrics: declared once, here, under the prefix ``arcsim_``.

Names follow Prometheus' naming guide: base units in the name (``_seconds``, ``_bytes``), ``_total`` on
counters, ``_ratio`` on 0-1 values, ``_info`` on constant-1 gauges whose labels carry the information.
"Vector" is the one name of what a worker sends each round (a momentum vector, not a raw gradient).

Labels stay bounded: ``role`` (honest, byzantine), ``stage`` (a pipeline stage name), ``reason``
(a rejection reason from a fixed set), and the run's own settings on ``arcsim_run_info``. No label
ever carries a worker id. Each coordinator owns a registry, so several can live in one process (tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from arcsim import __version__
from arcsim.engine.rounds import RoundRecord
from arcsim.roles import ROLES, Role
from arcsim.transport.metrics_http import MetricsServer

if TYPE_CHECKING:
    from arcsim.config import RunConfig

# /metrics listens next to the gRPC port (50051), outside 9100-9999: that range is Prometheus'
# registry of exporter ports, where 9100 is node_exporter's.
DEFAULT_METRICS_PORT: Final = 50052

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
    "concurrent_submission",  # a second SubmitGradient stream of a worker while its first one is open
    "missing_header",
    "unexpected_header",
    "bad_dtype",
    "bad_shape",
    "size_mismatch",
    "oversized",
    "truncated",
    "checksum",
    "non_finite",
    "stalled",  # a submission that stopped sending past its stall timeout
    "cancelled",
    "malformed",
    "subscription_replaced",  # a Rounds/Observe stream superseded by a newer one of the same identity
    "stale",  # schedule: async: computed on a model more than staleness_bound versions old
)

# Norms of the workers' vectors span many orders of magnitude (attacks send 1e6 or more).
_NORM_BUCKETS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1e3, 1e4, 1e6, float("inf"))
_ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
_STAGE_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, float("inf"))
_STALENESS_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, float("inf"))
_SHARE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, float("inf"))
_RUN_LABELS: Final = ("task", "pipeline", "attack", "n", "f")

# The sample names each metric type exports besides the family's own (prometheus_client's text format).
_SAMPLE_SUFFIXES: Final = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported_sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` exports or will export, without label values.

    A labelled metric exports nothing until a child is created, so the names come from each family's
    type as well as from its current samples: a query may name a series that appears later in the run.
    """
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, config: RunConfig | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http = MetricsServer(self.registry)  # the /metrics page, once served
        r = self.registry
        # CPU seconds, resident memory and open file descriptors of this process (Linux only), and the
        # Python version: what an operator compares first between runs and machines.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Info("arcsim_build", "The arcsim version serving these metrics.", registry=r)
        self.build_info.info({"version": __version__})
        # A gauge rather than an Info, so that it exports nothing until a run is set (no unlabelled 1).
        self.run_info = Gauge(
            "arcsim_run_info",
            "The run's experiment: task, pipeline, attack, n workers, f Byzantine ones.",
            list(_RUN_LABELS),
            registry=r,
        )
        if config is not None:
            self.set_run(config)
        self.round = Gauge(
            "arcsim_round", "The next round to run: rounds completed in this run, resumes included.", registry=r
        )
        # A counter beside the gauge, so that rates and increases are well defined across restarts.
        self.rounds_completed = Counter(
            "arcsim_rounds_completed_total", "Rounds completed by this coordinator process.", registry=r
        )
        self.round_duration = Histogram(
            "arcsim_round_duration_seconds",
            "Time from a round's opening to its aggregate being applied.",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "arcsim_pipeline_stage_duration_seconds",
            "Time spent in each stage of the robust pipeline, per round.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.submissions = Counter("arcsim_submissions_total", "Vectors accepted, by role.", ["role"], registry=r)
        self.rejected = Counter(
            "arcsim_submissions_rejected_total", "Submissions rejected, by reason.", ["reason"], registry=r
        )
        self.connected = Gauge(
            "arcsim_workers_connected", "Workers with an open round stream, by role.", ["role"], registry=r
        )
        self.clip_threshold = Gauge(
            "arcsim_clip_threshold", "Clip threshold of the last round (ARC's C), a vector norm.", registry=r
        )
        self.clipped = Counter(
            "arcsim_clipped_vectors_total", "Vectors changed by clipping, by role.", ["role"], registry=r
        )
        self.vector_norm = Histogram(
            "arcsim_vector_norm", "Norms of the vectors received, by role.", ["role"], buckets=_NORM_BUCKETS, registry=r
        )
        self.aggregate_error = Gauge(
            "arcsim_aggregate_error", "||aggregate - mean of the honest vectors|| of the last round.", registry=r
        )
        self.test_accuracy = Gauge(
            "arcsim_test_accuracy_ratio", "Test accuracy (0 to 1) at the last evaluation.", registry=r
        )
        self.test_loss = Gauge("arcsim_test_loss", "Test loss at the last evaluation.", registry=r)
        # Set only by runs that hold a validation split out (validation_fraction > 0).
        self.validation_accuracy = Gauge(
            "arcsim_validation_accuracy_ratio", "Validation accuracy (0 to 1) at the last evaluation.", registry=r
        )
        self.validation_loss = Gauge("arcsim_validation_loss", "Validation loss at the last evaluation.", registry=r)
        self.train_loss = Gauge(
            "arcsim_train_loss", "Mean training loss of the honest workers, last round.", registry=r
        )
        self.received_bytes = Counter(
            "arcsim_received_bytes_total", "Payload bytes of the vectors accepted.", registry=r
        )
        # schedule: async (each update's window, arcsim/engine/asynchronous.py); empty for synchronous runs.
        self.staleness = Histogram(
            "arcsim_staleness_versions",
            "Staleness of the vectors an asynchronous update aggregated (versions behind the model), by role.",
            ["role"],
            buckets=_STALENESS_BUCKETS,
            registry=r,
        )
        self.window_fill = Histogram(
            "arcsim_window_fill_seconds",
            "Seconds (simulated) from one asynchronous update to the next: the time its window took to fill.",
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.window_byzantine_share = Histogram(
            "arcsim_window_byzantine_share",
            "Share of Byzantine vectors in an asynchronous update's window (0 to 1).",
            buckets=_SHARE_BUCKETS,
            registry=r,
        )
        self._last_window_time: float | None = None
        for role in ROLES:  # export every series from the start, so dashboards show zeros, not gaps
            self.submissions.labels(role)
            self.connected.labels(role)
            self.clipped.labels(role)
            self.vector_norm.labels(role)
            self.staleness.labels(role)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)

    def set_run(self, config: RunConfig) -> None:
        """Label ``arcsim_run_info`` with the run's experiment (n counts every worker, f the Byzantine ones)."""
        self.run_info.clear()  # one run per coordinator: a second call replaces the first, never adds to it
        self.run_info.labels(
            task=config.task,
            pipeline=config.pipeline,
            attack=config.attack,
            n=str(config.num_workers),
            f=str(config.num_byzantine),
        ).set(1)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP on its own port; returns the port bound (useful with port 0).

        Raises ``OSError`` naming the address when it cannot listen there (e.g. the port is taken).
        """
        return self._http.serve(port, host)

    def close(self) -> None:
        """Stop the /metrics server, if one was started, and release its port."""
        self._http.close()

    def observe_round(self, record: RoundRecord) -> None:
        self.round.set(record.round + 1)
        self.rounds_completed.inc()
        self.round_duration.observe(record.round_seconds)
        for stage, seconds in record.stage_seconds.items():
            self.stage_duration.labels(stage).observe(seconds)
        if record.clip_threshold is not None:
            self.clip_threshold.set(record.clip_threshold)
        if record.clipped_honest is not None:  # None: the clipping cannot be attributed to workers (after NNM)
            self.clipped.labels(Role.HONEST).inc(record.clipped_honest)
            self.clipped.labels(Role.BYZANTINE).inc(record.clipped_byzantine)
        for role, norms in record.norms.items():
            for norm in norms:
                self.vector_norm.labels(role).observe(norm)
        if record.aggregate_error is not None:
            self.aggregate_error.set(record.aggregate_error)
        if record.accuracy is not None:
            self.test_accuracy.set(record.accuracy)
        if record.test_loss is not None:
            self.test_loss.set(record.test_loss)
        if record.validation_accuracy is not None:
            self.validation_accuracy.set(record.validation_accuracy)
        if record.validation_loss is not None:
            self.validation_loss.set(record.validation_loss)
        if record.train_loss is not None:
            self.train_loss.set(record.train_loss)
        if record.window is not None:
            self._observe_window(record.window)

    def _observe_window(self, window: dict) -> None:
        for role, staleness in zip(window["roles"], window["staleness"]):
            self.staleness.labels(role).observe(staleness)
        if window["byzantine_share"] is not None:
            self.window_byzantine_share.observe(window["byzantine_share"])
        self.rejected.labels("stale").inc(window["stale_refused"])
        self.rejected.labels("non_finite").inc(window["non_finite_refused"])
        if self._last_window_time is not None:
            self.window_fill.observe(window["time"] - self._last_window_time)
        self._last_window_time = window["time"]
