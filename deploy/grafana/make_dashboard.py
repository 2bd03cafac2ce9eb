"""Writes dashboards/arcsim.json, the testbed's Grafana dashboard (run: python deploy/grafana/make_dashboard.py).

Generated rather than hand-edited so every panel's query uses the metric names of
coordinator/metrics.py; tests/test_deploy.py checks them against a real coordinator's /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "arcsim-prometheus"}


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(pid: int, title: str, targets: list[tuple[str, str]], *, x: int, y: int, w: int = 12, h: int = 8,
          kind: str = "timeseries", unit: str | None = None, description: str = "") -> dict:
    out = {
        "id": pid, "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    if kind == "heatmap":
        out["targets"][0]["format"] = "heatmap"
        out["options"] = {"calculate": False, "yAxis": {"unit": "short"}, "color": {"scheme": "Oranges"}}
    return out


def dashboard() -> dict:
    panels = [
        panel(1, "Round", [("arcsim_round", "round")], x=0, y=0, w=4, h=4, kind="stat"),
        panel(2, "Test accuracy", [("arcsim_test_accuracy", "accuracy")], x=4, y=0, w=4, h=4, kind="stat",
              unit="percentunit"),
        panel(3, "Workers connected", [("arcsim_workers_connected", "{{role}}")], x=8, y=0, w=8, h=4, kind="stat"),
        panel(4, "Clip threshold now", [("arcsim_clip_threshold", "C")], x=16, y=0, w=8, h=4, kind="stat"),
        panel(5, "Accuracy and loss", [("arcsim_test_accuracy", "test accuracy"), ("arcsim_test_loss", "test loss"),
                                       ("arcsim_train_loss", "train loss (honest)")], x=0, y=4,
              description="Test accuracy and loss at each evaluation; the honest workers' training loss."),
        panel(6, "ARC clip threshold C", [("arcsim_clip_threshold", "C")], x=12, y=4,
              description="The (k+1)-th largest norm of the round's vectors, k = floor(2f(n-f)/n)."),
        panel(7, "Vectors clipped per round, by role",
              [("sum by (role) (increase(arcsim_clipped_vectors_total[1m])) / "
                "clamp_min(increase(arcsim_round[1m]), 1)", "{{role}}")], x=0, y=12),
        panel(8, "Robustness error ||aggregate - honest mean||", [("arcsim_aggregate_error", "error")], x=12, y=12),
        panel(9, "Gradient norms, honest (heatmap)",
              [("sum by (le) (increase(arcsim_gradient_norm_bucket{role=\"honest\"}[1m]))", "{{le}}")],
              x=0, y=20, kind="heatmap"),
        panel(10, "Gradient norms, Byzantine (heatmap)",
              [("sum by (le) (increase(arcsim_gradient_norm_bucket{role=\"byzantine\"}[1m]))", "{{le}}")],
              x=12, y=20, kind="heatmap"),
        panel(11, "Round duration", [
            ("histogram_quantile(0.5, sum by (le) (rate(arcsim_round_duration_seconds_bucket[1m])))", "median"),
            ("histogram_quantile(0.99, sum by (le) (rate(arcsim_round_duration_seconds_bucket[1m])))", "p99")],
              x=0, y=28, unit="s"),
        panel(12, "Aggregation time by stage", [
            ("sum by (stage) (rate(arcsim_aggregation_duration_seconds_sum[1m])) / "
             "sum by (stage) (rate(arcsim_aggregation_duration_seconds_count[1m]))", "{{stage}}")],
              x=12, y=28, unit="s"),
        panel(13, "Submissions accepted, by role", [("sum by (role) (rate(arcsim_submissions_total[1m]))", "{{role}}")],
              x=0, y=36, unit="ops"),
        panel(14, "Submissions rejected, by reason",
              [("sum by (reason) (rate(arcsim_submissions_rejected_total[1m])) > 0", "{{reason}}")], x=12, y=36,
              unit="ops"),
        panel(15, "Bytes received", [("rate(arcsim_received_bytes_total[1m])", "received")], x=0, y=44, unit="Bps"),
        panel(16, "Workers connected, by role", [("arcsim_workers_connected", "{{role}}")], x=12, y=44),
    ]
    return {
        "uid": "arcsim-testbed", "title": "arcsim testbed", "tags": ["arcsim"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": False, "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"}, "panels": panels, "templating": {"list": []},
        "annotations": {"list": []},
    }


def main() -> None:
    path = Path(__file__).parent / "dashboards" / "arcsim.json"
    path.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
