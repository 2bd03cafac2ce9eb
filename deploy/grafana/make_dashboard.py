"""Writes dashboards/arcsim.json, the testbed's Grafana dashboard (run: python deploy/grafana/make_dashboard.py).

Generated rather than hand-edited so every panel's query uses the metric names of
arcsim/coordinator/metrics.py and arcsim/workers/metrics.py; tests/test_deploy.py checks them against those
modules and a real coordinator's /metrics, and checks every query with promtool.

Variables: ``datasource`` (any Prometheus; the provisioned one by default), ``job`` and ``instance``
(which scrape targets; every query selects on both), and ``worker`` (the worker and adversary
instances among them; the per-worker rows repeat over it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATASOURCE_UID = "arcsim-prometheus"  # deploy/grafana/provisioning/datasources/prometheus.yml
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every query selects the chosen jobs and instances; the worker rows narrow to their worker too.
SELECT = 'job=~"$job", instance=~"$instance"'
WORKER = SELECT + ', instance=~"$worker"'
RATE = "$__rate_interval"  # at least four scrape intervals, whatever the zoom

Panel = dict[str, Any]


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(
    pid: int,
    title: str,
    targets: list[tuple[str, str]],
    *,
    x: int,
    y: int,
    w: int = 12,
    h: int = 8,
    kind: str = "timeseries",
    unit: str | None = None,
    description: str = "",
) -> Panel:
    out: Panel = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    if kind == "heatmap":
        out["targets"][0]["format"] = "heatmap"
        out["options"] = {"calculate": False, "yAxis": {"unit": "short"}, "color": {"scheme": "Oranges"}}
    return out


def row(pid: int, title: str, *, y: int, repeat: str | None = None) -> Panel:
    out: Panel = {
        "id": pid,
        "type": "row",
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
    }
    if repeat is not None:
        out["repeat"] = repeat
    return out


def query_variable(name: str, label: str, query: str, *, hide: int = 0) -> dict[str, Any]:
    """A multi-value variable from label values, "All" by default (matching any value, gaps included)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "sort": 1,
        "hide": hide,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
    }


def templating() -> list[dict[str, Any]]:
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": True, "text": "Prometheus", "value": DATASOURCE_UID},
            "hide": 0,
            "options": [],
            "refresh": 1,
            "regex": "",
        },
        # up{} exists for every scraped target, whatever it exports: the coordinator and every worker job.
        query_variable("job", "Job", 'label_values(up{job=~"arcsim-.*"}, job)'),
        query_variable("instance", "Instance", 'label_values(up{job=~"$job"}, instance)'),
        query_variable("worker", "Worker", f"label_values(arcsim_worker_info{{{SELECT}}}, instance)"),
    ]


def hist_quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    """The median and 99th percentile of a histogram over the selected targets (optionally per label)."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        (f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SELECT}}}[{RATE}])))", f"{prefix}{name}")
        for q, name in ((0.5, "median"), (0.99, "p99"))
    ]


def coordinator_panels() -> list[Panel]:
    clipped_per_round = (
        f"sum by (role) (increase(arcsim_clipped_vectors_total{{{SELECT}}}[{RATE}])) / on() "
        f"group_left() clamp_min(sum(increase(arcsim_rounds_completed_total{{{SELECT}}}[{RATE}])), 1)"
    )
    return [
        row(100, "Run", y=0),
        panel(
            1,
            "Experiment",
            [
                (f"arcsim_run_info{{{SELECT}}}", "{{task}}, {{pipeline}}, {{attack}}, n={{n}} f={{f}}"),
                (f"arcsim_build_info{{{SELECT}}}", "arcsim {{version}}"),
            ],
            x=0,
            y=1,
            w=8,
            h=4,
            kind="stat",
            description="arcsim_run_info and arcsim_build_info.",
        ),
        panel(2, "Round", [(f"arcsim_round{{{SELECT}}}", "round")], x=8, y=1, w=3, h=4, kind="stat"),
        panel(
            3,
            "Test accuracy",
            [(f"arcsim_test_accuracy_ratio{{{SELECT}}}", "accuracy")],
            x=11,
            y=1,
            w=3,
            h=4,
            kind="stat",
            unit="percentunit",
        ),
        panel(
            4,
            "Workers connected",
            [(f"sum by (role) (arcsim_workers_connected{{{SELECT}}})", "{{role}}")],
            x=14,
            y=1,
            w=6,
            h=4,
            kind="stat",
        ),
        panel(5, "Clip threshold now", [(f"arcsim_clip_threshold{{{SELECT}}}", "C")], x=20, y=1, w=4, h=4, kind="stat"),
        panel(
            6,
            "Accuracy and loss",
            [
                (f"arcsim_test_accuracy_ratio{{{SELECT}}}", "test accuracy"),
                (f"arcsim_test_loss{{{SELECT}}}", "test loss"),
                (f"arcsim_validation_accuracy_ratio{{{SELECT}}}", "validation accuracy"),
                (f"arcsim_validation_loss{{{SELECT}}}", "validation loss"),
                (f"arcsim_train_loss{{{SELECT}}}", "train loss (honest)"),
            ],
            x=0,
            y=5,
            description=(
                "Test accuracy (0 to 1) and loss at each evaluation (validation too, when the run holds a "
                "validation split out); the honest workers' training loss."
            ),
        ),
        panel(
            7,
            "ARC clip threshold C",
            [(f"arcsim_clip_threshold{{{SELECT}}}", "C")],
            x=12,
            y=5,
            description="The (k+1)-th largest norm of the round's vectors, k = floor(2f(n-f)/n).",
        ),
        panel(
            8,
            "Vectors clipped per round, by role",
            [(clipped_per_round, "{{role}}")],
            x=0,
            y=13,
            description="Clipped vectors over completed rounds (arcsim_rounds_completed_total) in each interval.",
        ),
        panel(
            9,
            "Robustness error ||aggregate - honest mean||",
            [(f"arcsim_aggregate_error{{{SELECT}}}", "error")],
            x=12,
            y=13,
        ),
        panel(
            10,
            "Vector norms, honest (heatmap)",
            [(f'sum by (le) (increase(arcsim_vector_norm_bucket{{role="honest", {SELECT}}}[{RATE}]))', "{{le}}")],
            x=0,
            y=21,
            kind="heatmap",
        ),
        panel(
            11,
            "Vector norms, Byzantine (heatmap)",
            [(f'sum by (le) (increase(arcsim_vector_norm_bucket{{role="byzantine", {SELECT}}}[{RATE}]))', "{{le}}")],
            x=12,
            y=21,
            kind="heatmap",
        ),
        panel(12, "Round duration", hist_quantiles("arcsim_round_duration_seconds"), x=0, y=29, unit="s"),
        panel(
            13,
            "Rounds completed per minute",
            [(f"sum(rate(arcsim_rounds_completed_total{{{SELECT}}}[{RATE}])) * 60", "rounds/min")],
            x=12,
            y=29,
        ),
        panel(
            14,
            "Pipeline time per round, by stage",
            [
                (
                    f"sum by (stage) (rate(arcsim_pipeline_stage_duration_seconds_sum{{{SELECT}}}[{RATE}])) / "
                    f"sum by (stage) (rate(arcsim_pipeline_stage_duration_seconds_count{{{SELECT}}}[{RATE}]))",
                    "{{stage}}",
                )
            ],
            x=0,
            y=37,
            unit="s",
        ),
        panel(
            15,
            "Submissions accepted, by role",
            [(f"sum by (role) (rate(arcsim_submissions_total{{{SELECT}}}[{RATE}]))", "{{role}}")],
            x=12,
            y=37,
            unit="ops",
        ),
        panel(
            16,
            "Submissions rejected, by reason",
            [(f"sum by (reason) (rate(arcsim_submissions_rejected_total{{{SELECT}}}[{RATE}])) > 0", "{{reason}}")],
            x=0,
            y=45,
            unit="ops",
        ),
        panel(
            17,
            "Bytes received",
            [(f"sum(rate(arcsim_received_bytes_total{{{SELECT}}}[{RATE}]))", "received")],
            x=12,
            y=45,
            unit="Bps",
        ),
        panel(
            18,
            "Coordinator CPU",
            [(f"rate(process_cpu_seconds_total{{{SELECT}}}[{RATE}])", "{{instance}}")],
            x=0,
            y=53,
            unit="percentunit",
            description="CPU seconds per second (1 = one core busy).",
        ),
        panel(
            19,
            "Coordinator resident memory",
            [(f"process_resident_memory_bytes{{{SELECT}}}", "{{instance}}")],
            x=12,
            y=53,
            unit="bytes",
        ),
    ]


def async_panels() -> list[Panel]:
    """schedule: async: the windows' staleness, fill time, Byzantine share and stale refusals."""
    return [
        row(103, "Asynchronous updates (schedule: async)", y=61),
        panel(
            40,
            "Staleness of aggregated vectors, by role",
            hist_quantiles("arcsim_staleness_versions", by="role"),
            x=0,
            y=62,
            w=6,
            unit="short",
            description="Versions behind the model when they arrived. Empty for synchronous runs.",
        ),
        panel(
            41,
            "Window fill time",
            hist_quantiles("arcsim_window_fill_seconds"),
            x=6,
            y=62,
            w=6,
            unit="s",
            description="Simulated seconds from one update to the next.",
        ),
        panel(
            42,
            "Byzantine share per window",
            hist_quantiles("arcsim_window_byzantine_share"),
            x=12,
            y=62,
            w=6,
            unit="percentunit",
            description="Above the workers' f / n when the Byzantine workers are faster.",
        ),
        panel(
            43,
            "Stale vectors refused",
            [(f'sum(rate(arcsim_submissions_rejected_total{{{SELECT}, reason="stale"}}[{RATE}]))', "stale")],
            x=18,
            y=62,
            w=6,
            unit="ops",
        ),
    ]


def worker_panels() -> list[Panel]:
    """All workers at a glance, then one row per worker (Grafana repeats the row over $worker)."""
    return [
        row(101, "Workers", y=70),
        panel(
            20,
            "Compute time per round, by role",
            hist_quantiles("arcsim_worker_compute_seconds", by="role"),
            x=0,
            y=71,
            unit="s",
            description="An observing adversary's time includes its wait for the honest vectors.",
        ),
        panel(
            21,
            "Vectors refused, by role and reason",
            [
                (
                    f"sum by (role, reason) (rate(arcsim_worker_vectors_refused_total{{{SELECT}}}[{RATE}])) > 0",
                    "{{role}} {{reason}}",
                )
            ],
            x=12,
            y=71,
            unit="ops",
            description="Submissions the coordinator answered with an error, by gRPC status code.",
        ),
        row(102, "Worker $worker", y=79, repeat="worker"),
        panel(
            22,
            "Compute time per round",
            [
                (
                    f"rate(arcsim_worker_compute_seconds_sum{{{WORKER}}}[{RATE}]) / "
                    f"rate(arcsim_worker_compute_seconds_count{{{WORKER}}}[{RATE}])",
                    "{{role}}",
                )
            ],
            x=0,
            y=80,
            w=6,
            unit="s",
        ),
        panel(
            23,
            "Vectors sent and refused",
            [
                (f"sum by (role) (rate(arcsim_worker_vectors_sent_total{{{WORKER}}}[{RATE}]))", "sent"),
                (
                    f"sum by (reason) (rate(arcsim_worker_vectors_refused_total{{{WORKER}}}[{RATE}])) > 0",
                    "refused: {{reason}}",
                ),
            ],
            x=6,
            y=80,
            w=6,
            unit="ops",
        ),
        panel(
            24,
            "Rounds followed per minute",
            [(f"sum(rate(arcsim_worker_rounds_total{{{WORKER}}}[{RATE}])) * 60", "rounds/min")],
            x=12,
            y=80,
            w=6,
        ),
        panel(
            25,
            "CUDA memory allocated",
            [(f"arcsim_worker_cuda_memory_allocated_bytes{{{WORKER}}}", "allocated")],
            x=18,
            y=80,
            w=6,
            unit="bytes",
            description="0 on CPU workers.",
        ),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": "arcsim-testbed",
        "title": "arcsim testbed",
        "tags": ["arcsim"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "panels": coordinator_panels() + async_panels() + worker_panels(),
        "templating": {"list": templating()},
        "annotations": {"list": []},
    }


def main() -> None:
    path = Path(__file__).parent / "dashboards" / "arcsim.json"
    path.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
