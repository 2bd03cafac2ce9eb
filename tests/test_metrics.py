"""The coordinator's metrics (arcsim/coordinator/metrics.py) against Prometheus' conventions.

Each test reads the registry through prometheus_client's own text exposition and parser, the page a
real scrape gets; ``promtool check metrics`` lints it where promtool is installed.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from arcsim import __version__
from arcsim.config import RunConfig
from arcsim.coordinator.metrics import (
    DEFAULT_METRICS_PORT,
    REJECTION_REASONS,
    CoordinatorMetrics,
    exported_sample_names,
)
from arcsim.engine.rounds import BYZANTINE, HONEST, RoundRecord

CONFIG = RunConfig(
    task="synthetic", model="mlp", num_honest=4, num_byzantine=2, attack="sign_flip", pipeline="arc > nnm > cwtm"
)


def _record(round_: int, *, accuracy: float | None = 0.75) -> RoundRecord:
    return RoundRecord(
        round=round_,
        lr=0.1,
        received_honest=4,
        received_byzantine=2,
        aggregated=True,
        skip_reason=None,
        clip_threshold=2.5,
        clipped_honest=0,
        clipped_byzantine=2,
        aggregate_error=0.3,
        aggregate_norm=1.0,
        train_loss=0.9,
        accuracy=accuracy,
        test_loss=0.8,
        round_seconds=0.2,
        aggregation_seconds=0.01,
        stage_seconds={"arc": 0.002, "cwtm": 0.004},
        norms={HONEST: [1.0, 1.5, 2.0, 2.5], BYZANTINE: [30.0, 30.0]},
    )


def _samples(metrics: CoordinatorMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The exposition page as {(sample name, labels): value}."""
    page = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


def _names(metrics: CoordinatorMetrics) -> set[str]:
    return {name for name, _ in _samples(metrics)}


def test_default_metrics_port_is_next_to_grpc_and_outside_the_exporter_range() -> None:
    # Assert: 9100-9999 is the exporters' allocated range (9100: node_exporter); 50051 is gRPC's.
    assert DEFAULT_METRICS_PORT == 50052
    assert not 9100 <= DEFAULT_METRICS_PORT <= 9999


def test_completed_rounds_are_a_counter_beside_the_round_gauge() -> None:
    # Prepare: a resumed coordinator starts its gauge at the checkpoint's round, its counter at zero.
    metrics = CoordinatorMetrics()
    metrics.round.set(10)

    # Execute
    for round_ in (10, 11, 12):
        metrics.observe_round(_record(round_))

    # Assert
    samples = _samples(metrics)
    assert samples[("arcsim_rounds_completed_total", frozenset())] == 3
    assert samples[("arcsim_round", frozenset())] == 13
    family = next(f for f in metrics.registry.collect() if f.name == "arcsim_rounds_completed")
    assert family.type == "counter"


def test_run_info_labels_the_experiment_when_given_a_config() -> None:
    # Execute
    metrics = CoordinatorMetrics(config=CONFIG)

    # Assert
    labels = frozenset(
        {"task": "synthetic", "pipeline": "arc > nnm > cwtm", "attack": "sign_flip", "n": "6", "f": "2"}.items()
    )
    assert _samples(metrics)[("arcsim_run_info", labels)] == 1
    assert [k for k in _samples(metrics) if k[0] == "arcsim_run_info"] == [("arcsim_run_info", labels)]


def test_run_info_is_absent_without_a_config_and_replaced_by_set_run() -> None:
    # Prepare
    metrics = CoordinatorMetrics()
    before = _names(metrics)

    # Execute
    metrics.set_run(RunConfig(task="synthetic", num_honest=3, num_byzantine=1))
    metrics.set_run(CONFIG)

    # Assert: no unlabelled 1 before, exactly one series after two runs were set
    assert "arcsim_run_info" not in before
    runs = [dict(labels) for name, labels in _samples(metrics) if name == "arcsim_run_info"]
    assert runs == [{"task": "synthetic", "pipeline": "arc > nnm > cwtm", "attack": "sign_flip", "n": "6", "f": "2"}]


def test_build_info_process_and_platform_collectors_are_exported() -> None:
    # Execute
    samples = _samples(CoordinatorMetrics())

    # Assert
    assert samples[("arcsim_build_info", frozenset({"version": __version__}.items()))] == 1
    assert samples[("process_resident_memory_bytes", frozenset())] > 0  # Linux: /proc is there
    assert ("process_cpu_seconds_total", frozenset()) in samples
    assert any(name == "python_info" for name, _ in samples)


def test_metric_names_follow_the_naming_guide() -> None:
    # Prepare
    metrics = CoordinatorMetrics(config=CONFIG)

    # Execute
    metrics.observe_round(_record(0))
    names = _names(metrics)

    # Assert: the renamed metrics, and none of their old names
    assert {
        "arcsim_test_accuracy_ratio",
        "arcsim_vector_norm_bucket",
        "arcsim_pipeline_stage_duration_seconds_bucket",
    } <= names
    old = {"arcsim_test_accuracy", "arcsim_gradient_norm_bucket", "arcsim_aggregation_duration_seconds_bucket"}
    assert names & old == set()
    assert _samples(metrics)[("arcsim_test_accuracy_ratio", frozenset())] == 0.75
    for family in metrics.registry.collect():
        if family.name.startswith("arcsim_"):
            assert family.documentation, family.name
            assert "gradient" not in family.documentation.lower(), family.name  # the round's vector is "vector"
            if family.type == "counter":
                assert f"{family.name}_total" in names, family.name
            if "seconds" in family.name or "bytes" in family.name:
                assert family.name.endswith(("_seconds", "_bytes")), family.name  # the unit comes last


def test_stage_durations_are_labelled_by_stage() -> None:
    # Prepare
    metrics = CoordinatorMetrics()

    # Execute
    metrics.observe_round(_record(0))

    # Assert
    counts = {
        dict(labels)["stage"]: value
        for (name, labels), value in _samples(metrics).items()
        if name == "arcsim_pipeline_stage_duration_seconds_count"
    }
    assert counts == {"arc": 1, "cwtm": 1}


def test_rejection_reasons_include_the_resource_limits() -> None:
    # Prepare
    metrics = CoordinatorMetrics()

    # Execute
    counted = {
        dict(labels)["reason"] for name, labels in _samples(metrics) if name == "arcsim_submissions_rejected_total"
    }

    # Assert
    assert {"concurrent_submission", "stalled", "subscription_replaced"} <= set(REJECTION_REASONS)
    assert counted == set(REJECTION_REASONS)
    assert len(REJECTION_REASONS) == len(set(REJECTION_REASONS))


def test_exported_sample_names_include_labelled_series_not_yet_created() -> None:
    # Prepare
    registry = CollectorRegistry()
    Histogram("demo_duration_seconds", "d", ["stage"], registry=registry)
    Counter("demo_events_total", "e", ["kind"], registry=registry)

    # Execute
    names = exported_sample_names(registry)

    # Assert
    assert generate_latest(registry).decode().count("\ndemo_") == 0  # nothing on the page yet
    assert names == {
        "demo_duration_seconds_bucket",
        "demo_duration_seconds_sum",
        "demo_duration_seconds_count",
        "demo_duration_seconds_created",
        "demo_events_total",
        "demo_events_created",
    }


def test_exported_sample_names_cover_a_page_after_a_round() -> None:
    # Prepare
    metrics = CoordinatorMetrics(config=CONFIG)
    metrics.observe_round(_record(0))

    # Execute / Assert
    assert _names(metrics) <= exported_sample_names(metrics.registry)


def test_promtool_lints_the_page_clean() -> None:
    # Prepare
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    metrics = CoordinatorMetrics(config=CONFIG)
    metrics.observe_round(_record(0))
    metrics.rejected.labels("stalled").inc()

    # Execute
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(metrics.registry).decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
