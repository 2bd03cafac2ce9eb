"""The crash checks of ``make e2e-docker`` (deploy/docker/e2e_check.py), on recorded facts.

``make e2e-docker`` kills the coordinator's process in the middle of a compose run and checks
that compose restarted it, that it resumed from its checkpoint and that the workers reconnected by
themselves. The run itself needs root and minutes; these tests hold the checks to what they claim
on the facts a run hands them: what the two ``watch`` calls saw, ``docker inspect`` of the
containers and the coordinator's log. Each bad fact must fail exactly its own check.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

# deploy/docker is a folder of scripts, not a package: import the script by its file name.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "docker"))
import e2e_check  # noqa: E402

CONFIG = {"rounds": 600, "num_honest": 3, "num_byzantine": 1}
BEFORE = {
    "timed_out": False,
    "scrapes": 40,
    "first_round": 0.0,
    "max_round": 152.0,
    "stopped_at_round": 152.0,
    "max_accuracy": 0.9,
    "max_connected": {"honest": 3.0, "byzantine": 1.0},
    "prometheus_accuracy": None,
    "accuracy_metric": "arcsim_test_accuracy",
}
AFTER = {
    "timed_out": False,
    "scrapes": 200,
    "first_round": 152.0,
    "max_round": 600.0,
    "stopped_at_round": None,
    "max_accuracy": 0.98,
    "max_connected": {"honest": 3.0, "byzantine": 1.0},
    "prometheus_accuracy": 0.97,
    "accuracy_metric": "arcsim_test_accuracy_ratio",
}
LOG = (
    '{"level": "info", "logger": "arcsim.coordinator", "event": "serving"}\n'
    '{"level": "info", "logger": "arcsim.rounds", "message": "resumed from round-00000152.safetensors at round 152"}\n'
)


def _container(service: str, index: int, restarts: int = 0, exit_code: int = 0) -> dict[str, Any]:
    """The part of one `docker inspect` entry that the checks read."""
    return {
        "Name": f"/arcsim-e2e-{service}-{index}",
        "RestartCount": restarts,
        "State": {"ExitCode": exit_code},
        "Config": {"Labels": {"com.docker.compose.service": service}},
    }


CONTAINERS = [
    _container("coordinator", 1, restarts=1),
    _container("prometheus", 1),
    *(_container("worker", i) for i in (1, 2, 3)),
    _container("adversary", 1),
]


def _checks(before=BEFORE, after=AFTER, containers=CONTAINERS, log=LOG, exits=(137, 0)) -> list[tuple[bool, str]]:
    return e2e_check.crash_checks(CONFIG, before, after, containers, log, list(exits))


def test_crash_checks_pass_on_a_good_crash() -> None:
    # Execute
    checks = _checks()

    # Assert
    assert [text for ok, text in checks if not ok] == []
    assert len(checks) == 9


def _with(record: Any, path: tuple, value: Any) -> Any:
    changed = copy.deepcopy(record)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        ({"before": (("stopped_at_round",), None)}, "killed after round None of 600"),
        ({"containers": ((0, "RestartCount"), 0)}, "restarted the coordinator's container once (restart counts [0])"),
        ({"containers": ((3, "RestartCount"), 1)}, "3 worker containers (of 3) never restarted"),
        ({"containers": ((5, "State", "ExitCode"), 1)}, "1 adversary containers (of 1) never restarted"),
        ({"after": (("first_round",), 0.0)}, "after the restart /metrics arcsim_round started at 0 "),
        ({"after": (("max_connected", "honest"), 2.0)}, 'arcsim_workers_connected{role="honest"} reached 2 == 3'),
        ({"after": (("max_connected", "byzantine"), 0.0)}, 'arcsim_workers_connected{role="byzantine"} reached 0 == 1'),
    ],
)
def test_crash_checks_fail_on_a_bad_crash(changes: dict[str, tuple], failed: str) -> None:
    # Arrange
    facts = {"before": BEFORE, "after": AFTER, "containers": CONTAINERS}
    for name, (path, value) in changes.items():
        facts[name] = _with(facts[name], path, value)

    # Execute
    checks = _checks(**facts)

    # Assert
    failures = [text for ok, text in checks if not ok]
    assert len(failures) == 1, failures
    assert failed in failures[0]


@pytest.mark.parametrize(
    "log",
    [
        "",  # it started over instead of resuming
        LOG.replace("at round 152", "at round 40"),  # resumed from a checkpoint older than the crash
        LOG + LOG,  # restarted twice
    ],
    ids=["no-resume", "old-checkpoint", "resumed-twice"],
)
def test_crash_checks_want_one_resume_from_the_crash_round(log: str) -> None:
    # Execute
    failures = [text for ok, text in _checks(log=log) if not ok]

    # Assert
    assert len(failures) == 1
    assert "the coordinator's log says it resumed once" in failures[0]


@pytest.mark.parametrize(
    "exits",
    [
        (0,),  # it ended by itself: no crash happened
        (0, 0),  # two clean ends: something restarted it, but no kill
        (137,),  # killed and never brought back
        (137, 1),  # the restart failed
        (137, 137, 0),  # restarted twice
    ],
)
def test_crash_checks_want_one_kill_then_a_clean_end(exits: tuple[int, ...]) -> None:
    # Execute
    failures = [text for ok, text in _checks(exits=exits) if not ok]

    # Assert
    assert len(failures) == 1
    assert f"Docker saw {list(exits)}" in failures[0]


def test_a_crash_after_the_last_round_fails() -> None:
    # Arrange: the kill came too late, during the coordinator's linger; it "resumed" a finished run.
    before = {**BEFORE, "stopped_at_round": 600.0}
    after = {**AFTER, "first_round": 600.0}
    log = LOG.replace("at round 152", "at round 600")

    # Execute
    failures = [text for ok, text in _checks(before=before, after=after, log=log) if not ok]

    # Assert
    assert len(failures) == 3
    assert "killed after round 600 of 600" in failures[0]
    assert "resumed once, at a round in [599, 600) ([600])" in failures[1]
    assert "arcsim_round started at 600 " in failures[2]


def test_a_missing_worker_container_fails() -> None:
    # Execute
    failures = [text for ok, text in _checks(containers=CONTAINERS[:-2]) if not ok]

    # Assert
    assert len(failures) == 2
    assert "2 worker containers (of 3)" in failures[0]
    assert "0 adversary containers (of 1)" in failures[1]


def test_merge_seen_adds_up_both_watches() -> None:
    # Execute
    merged = e2e_check.merge_seen(BEFORE, AFTER)

    # Assert
    assert merged["scrapes"] == 240
    assert merged["max_round"] == 600.0
    assert merged["max_accuracy"] == 0.98
    assert merged["prometheus_accuracy"] == 0.97  # only the watch after the crash saw it
    assert merged["accuracy_metric"] == "arcsim_test_accuracy_ratio"
    assert merged["timed_out"] is False
    assert e2e_check.merge_seen(BEFORE, {**AFTER, "timed_out": True})["timed_out"] is True


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ({"arcsim_test_accuracy": 0.5}, ("arcsim_test_accuracy", 0.5)),
        ({"arcsim_test_accuracy_ratio": 0.7}, ("arcsim_test_accuracy_ratio", 0.7)),
        ({"arcsim_round": 3.0}, (None, 0.0)),
    ],
)
def test_accuracy_is_read_by_either_name(page: dict[str, float], expected: tuple) -> None:
    assert e2e_check.accuracy_sample(page) == expected
