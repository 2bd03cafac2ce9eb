"""The outside checks of ``make e2e-docker`` (deploy/e2e-docker.sh): what a user sees of a compose run.

Two steps, so that the shell script can collect the results between them:

``watch``   while the run goes: scrape the coordinator's published /metrics (every 0.2 s) and ask
            the published Prometheus for the test accuracy (every second), until the coordinator's
            endpoint goes away at the end of the run, or (``--until-round N``) until the
            coordinator has completed N rounds; write what was seen as JSON.
``verify``  after the run: the results copied out of the ``runs`` volume (summary.json), what
            ``watch`` saw, and Prometheus' stored series must agree with the experiment config:
            every round run, accuracy far above chance (1 / classes), every worker connected, and
            (with ``--reference``) the same final parameters as a run of the same config on the host.
            With ``--seen-after-crash`` (the coordinator was killed when the first ``watch`` stopped
            and its container restarted): the crash came between the first and the last round, only
            the coordinator's container restarted, it resumed from its checkpoint rather than from
            round 0, and every worker reconnected to the new process by itself.

Only the standard library and prometheus_client's text parser; no Docker API: the script sees the
testbed the way a user does, through its published loopback ports, plus what the shell script hands
it (``docker inspect`` of the containers, the coordinator's log) for the crash checks.

    python deploy/docker/e2e_check.py watch --metrics http://127.0.0.1:50052/metrics \\
        --prometheus http://127.0.0.1:9090 --out seen.json [--until-round 150]
    python deploy/docker/e2e_check.py verify --config configs/compose-e2e.yaml --seen seen.json \\
        --summary summary.json --prometheus http://127.0.0.1:9090 [--reference local/summary.json] \\
        [--seen-after-crash seen-after.json --containers inspect.json --coordinator-log coordinator.log \\
         --coordinator-exits 137,0]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

# The test accuracy gauge by either of its names: arcsim_test_accuracy_ratio (the naming guide's
# suffix for a 0-1 value) or arcsim_test_accuracy (before that rename), whichever the page exports.
ACCURACY_NAMES = ("arcsim_test_accuracy_ratio", "arcsim_test_accuracy")
ACCURACY_SELECTOR = '__name__=~"arcsim_test_accuracy(_ratio)?"'
COORDINATOR_JOB = "arcsim-coordinator"  # the job name in deploy/prometheus/prometheus.yml


def scrape(url: str, *, timeout: float = 2.0) -> dict[str, float]:
    """One /metrics page as {'name{label="v",...}': value}; raises OSError when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def accuracy_sample(samples: dict[str, float]) -> tuple[str | None, float]:
    """(name, value) of the test accuracy gauge on a scraped page; (None, 0.0) when it has neither name."""
    for name in ACCURACY_NAMES:
        if name in samples:
            return name, samples[name]
    return None, 0.0


def prometheus_query(base: str, query: str, *, timeout: float = 2.0) -> list[dict[str, Any]]:
    """The result vector of an instant query through Prometheus' HTTP API (empty: no series)."""
    url = f"{base.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        answer = json.load(response)
    if answer.get("status") != "success":
        raise OSError(f"prometheus answered {answer!r} to {query!r}")
    return list(answer["data"]["result"])


def watch(
    metrics_url: str, prometheus_url: str, *, timeout: float, gone_after: float = 1.5, until_round: int | None = None
) -> dict[str, Any]:
    """Follow a run from outside until its /metrics endpoint, once seen, stays away ``gone_after`` seconds.

    With ``until_round``, stop as soon as ``arcsim_round`` reaches it instead (``stopped_at_round``
    then holds the round seen); ``stopped_at_round`` stays None when the run ended before that.
    """
    seen: dict[str, Any] = {
        "scrapes": 0,
        "first_round": None,
        "max_round": 0.0,
        "last": {},
        "max_connected": {"honest": 0.0, "byzantine": 0.0},
        "accuracy_metric": None,
        "max_accuracy": None,
        "prometheus_accuracy": None,
        "prometheus_queries": 0,
        "timed_out": False,
        "until_round": until_round,
        "stopped_at_round": None,
    }
    deadline = time.monotonic() + timeout
    last_ok: float | None = None
    next_query = 0.0
    while True:
        now = time.monotonic()
        if now > deadline:
            seen["timed_out"] = True
            break
        try:
            samples = scrape(metrics_url)
        except (OSError, ValueError):  # not up yet, restarting, or gone at the end of the run
            if last_ok is not None and now - last_ok > gone_after:
                break
        else:
            last_ok = now
            seen["scrapes"] += 1
            seen["last"] = samples
            round_ = samples.get("arcsim_round", 0.0)
            if seen["first_round"] is None:  # a resumed coordinator starts at its checkpoint's round
                seen["first_round"] = round_
            seen["max_round"] = max(seen["max_round"], round_)
            for role in ("honest", "byzantine"):
                value = samples.get(f'arcsim_workers_connected{{role="{role}"}}', 0.0)
                seen["max_connected"][role] = max(seen["max_connected"][role], value)
            name, accuracy = accuracy_sample(samples)
            seen["accuracy_metric"] = name or seen["accuracy_metric"]
            if round_ > 0 and accuracy > 0:
                seen["max_accuracy"] = max(seen["max_accuracy"] or 0.0, accuracy)
            if until_round is not None and round_ >= until_round:
                seen["stopped_at_round"] = round_
                break
        if now >= next_query and seen["prometheus_accuracy"] is None:
            next_query = now + 1.0
            try:
                result = prometheus_query(prometheus_url, f"{{{ACCURACY_SELECTOR}}} > 0")
            except (OSError, ValueError):
                pass
            else:
                seen["prometheus_queries"] += 1
                if result:
                    seen["prometheus_accuracy"] = float(result[0]["value"][1])
        time.sleep(0.2)
    return seen


def merge_seen(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What two ``watch`` calls saw of one run (before and after a crash) as if one had watched it all."""

    def most(a: float | None, b: float | None) -> float | None:
        return max(a, b) if a is not None and b is not None else (b if a is None else a)

    return {
        "timed_out": before["timed_out"] or after["timed_out"],
        "scrapes": before["scrapes"] + after["scrapes"],
        "max_round": max(before["max_round"], after["max_round"]),
        "max_accuracy": most(before["max_accuracy"], after["max_accuracy"]),
        "max_connected": {
            role: max(before["max_connected"][role], after["max_connected"][role]) for role in before["max_connected"]
        },
        "prometheus_accuracy": most(before["prometheus_accuracy"], after["prometheus_accuracy"]),
        "accuracy_metric": after.get("accuracy_metric") or before.get("accuracy_metric"),
    }


def crash_checks(
    config: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    containers: list[dict[str, Any]],
    coordinator_log: str,
    coordinator_exits: list[int],
) -> list[tuple[bool, str]]:
    """The coordinator was SIGKILLed when ``before`` stopped: what must hold of its restart and the workers.

    ``coordinator_exits``: the exit codes of the coordinator's container in order (Docker's die events).
    """
    rounds = int(config["rounds"])
    checks: list[tuple[bool, str]] = []
    crashed_at = None if before.get("stopped_at_round") is None else int(before["stopped_at_round"])
    checks.append(
        (
            crashed_at is not None and 0 < crashed_at < rounds,
            f"the coordinator was killed after round {crashed_at} of {rounds} (between the first and the last)",
        )
    )

    by_service: dict[str, list[dict[str, Any]]] = {}
    for container in containers:
        service = container.get("Config", {}).get("Labels", {}).get("com.docker.compose.service", "?")
        by_service.setdefault(service, []).append(container)
    coordinators = by_service.get("coordinator", [])
    restarts = [c.get("RestartCount") for c in coordinators]
    checks.append((restarts == [1], f"compose restarted the coordinator's container once (restart counts {restarts})"))
    # 137 = 128 + SIGKILL: Docker saw a process killed, not a stop it made itself; then the clean end.
    checks.append(
        (
            coordinator_exits == [137, 0],
            f"the coordinator's container exited with 137 (killed) and then "
            f"0 (its restart completed the run): Docker saw {coordinator_exits}",
        )
    )
    for service, key in (("worker", "num_honest"), ("adversary", "num_byzantine")):
        found = by_service.get(service, [])
        states = {
            c.get("Name", "?").lstrip("/"): (c.get("RestartCount"), c.get("State", {}).get("ExitCode")) for c in found
        }
        ok = len(found) == int(config[key]) and all(state == (0, 0) for state in states.values())
        checks.append(
            (
                ok,
                f"{len(found)} {service} containers (of {config[key]}) never restarted and exited "
                f"with 0 ((restarts, exit) {states})",
            )
        )

    # The checkpoint of the round /metrics showed may still have been writing; the one before it was on disk.
    floor = (crashed_at or 0) - 1
    resumed = [int(m.group(1)) for m in re.finditer(r"resumed from \S+ at round (\d+)", coordinator_log)]
    checks.append(
        (
            len(resumed) == 1 and floor <= resumed[0] < rounds,
            f"the coordinator's log says it resumed once, at a round in [{floor}, {rounds}) ({resumed})",
        )
    )
    first = None if after.get("first_round") is None else int(after["first_round"])
    checks.append(
        (
            first is not None and floor <= first < rounds,
            f"after the restart /metrics arcsim_round started at {first} (the checkpoint, not 0; >= {floor})",
        )
    )
    for role, key in (("honest", "num_honest"), ("byzantine", "num_byzantine")):
        want = int(config[key])
        got = after["max_connected"][role]
        checks.append(
            (
                got == want,
                f"the workers reconnected by themselves: after the restart /metrics "
                f'arcsim_workers_connected{{role="{role}"}} reached {got:.0f} == {want}',
            )
        )
    return checks


def _worker_scrape_checks(config: dict[str, Any], prometheus_url: str) -> list[tuple[bool, str]]:
    """Prometheus scraped every worker and adversary instance (arcsim_worker_rounds_total > 0)."""
    try:
        instances = prometheus_query(
            prometheus_url,
            "count by (job) (count by (job, instance) (max_over_time(arcsim_worker_rounds_total[1h]) > 0))",
        )
    except (OSError, ValueError) as error:
        return [(False, f"Prometheus query of the workers' metrics: {error}")]
    scraped = {result["metric"].get("job"): int(float(result["value"][1])) for result in instances}
    checks = []
    for job, key in (("arcsim-worker", "num_honest"), ("arcsim-adversary", "num_byzantine")):
        want, got = int(config[key]), scraped.get(job, 0)
        checks.append(
            (got == want, f"Prometheus scraped arcsim_worker_rounds_total > 0 from {got} {job} instances == {want}")
        )
    return checks


def verify(
    config: dict[str, Any],
    seen: dict[str, Any],
    summary: dict[str, Any],
    prometheus_url: str,
    *,
    reference: dict[str, Any] | None,
    num_classes: int,
    crash: dict[str, Any] | None = None,
    workers_scraped: bool = False,
) -> list[str]:
    """Every check as 'ok ...' or 'FAIL ...'; the run passes when none fails.

    ``crash``: the coordinator was killed when ``seen``'s watch stopped; {"after": what the watch
    after the restart saw, "containers": docker inspect of the project's containers, "log": the
    coordinator container's log, "exits": its exit codes in order}. ``workers_scraped``: the workers and
    adversaries serve /metrics and Prometheus must have found each one (the compose testbed).
    """
    rounds = int(config["rounds"])
    chance = 1.0 / num_classes
    floor = min(0.5, 4 * chance)  # far above chance, well below what the e2e config reaches
    checks: list[tuple[bool, str]] = []

    def check(ok: bool, text: str) -> None:
        checks.append((bool(ok), text))

    before = seen
    if crash is not None:
        seen = merge_seen(before, crash["after"])
    accuracy_name = seen.get("accuracy_metric") or "arcsim_test_accuracy"
    check(not seen["timed_out"], "the run ended before the time limit")
    check(summary.get("status") == "completed", f"summary.json status {summary.get('status')!r} == 'completed'")
    check(
        summary.get("rounds_completed") == rounds,
        f"summary.json rounds_completed {summary.get('rounds_completed')} == rounds {rounds}",
    )
    final = summary.get("final_accuracy") or 0.0
    check(final > floor, f"summary.json final_accuracy {final:.4f} > {floor:.2f} (chance {chance:.2f})")
    # From outside, through the coordinator's published metrics port.
    check(seen["scrapes"] > 0, f"/metrics scraped {seen['scrapes']} times from outside")
    # The endpoint closes right after the last round, so the last scrape may trail by a round or so.
    check(
        seen["max_round"] >= 0.9 * rounds,
        f"/metrics arcsim_round reached {seen['max_round']:.0f} "
        f"(of {rounds}; exact at the end: {seen['max_round'] == rounds})",
    )
    accuracy = seen["max_accuracy"] or 0.0
    check(accuracy > floor, f"/metrics {accuracy_name} {accuracy:.4f} > {floor:.2f}")
    for role, key in (("honest", "num_honest"), ("byzantine", "num_byzantine")):
        want = int(config[key])
        got = seen["max_connected"][role]
        check(got == want, f'/metrics arcsim_workers_connected{{role="{role}"}} reached {got:.0f} == {want}')
    # Through Prometheus: it scraped the coordinator by its service name on the compose network.
    live = seen["prometheus_accuracy"]
    check(live is not None, f"Prometheus answered {accuracy_name} during the run ({live})")
    try:
        stored = prometheus_query(
            prometheus_url, f'max(max_over_time({{{ACCURACY_SELECTOR},job="{COORDINATOR_JOB}"}}[1h]))'
        )
        stored_rounds = prometheus_query(prometheus_url, f'max_over_time(arcsim_round{{job="{COORDINATOR_JOB}"}}[1h])')
    except (OSError, ValueError) as error:
        check(False, f"Prometheus query after the run: {error}")
    else:
        best = float(stored[0]["value"][1]) if stored else math.nan
        check(bool(stored) and best > floor, f"Prometheus max_over_time({accuracy_name}) {best:.4f} > {floor:.2f}")
        last_round = float(stored_rounds[0]["value"][1]) if stored_rounds else math.nan
        check(bool(stored_rounds) and last_round > 0, f"Prometheus max_over_time(arcsim_round) {last_round:.0f} > 0")
    # Prometheus found the scaled workers and adversaries by DNS service discovery, and scraped each one.
    if workers_scraped:
        checks.extend(_worker_scrape_checks(config, prometheus_url))
    if reference is not None:
        ours, theirs = summary.get("final_params_sha256", ""), reference.get("final_params_sha256", "")
        check(
            ours == theirs,
            f"final parameters equal a run of the same config on the host ({ours[:16]} vs {theirs[:16]})",
        )
    if crash is not None:
        checks.extend(crash_checks(config, before, crash["after"], crash["containers"], crash["log"], crash["exits"]))
    return [("ok   " if ok else "FAIL ") + text for ok, text in checks]


def _exit_codes(text: str) -> list[int]:
    """'137,0' -> [137, 0] (an empty string: no exits seen)."""
    try:
        return [int(code) for code in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit codes are integers separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="follow the run from outside until the coordinator's endpoint goes away")
    w.add_argument("--metrics", required=True, help="the coordinator's published /metrics URL")
    w.add_argument("--prometheus", required=True, help="the published Prometheus base URL")
    w.add_argument("--timeout", type=float, default=600.0)
    w.add_argument("--until-round", type=int, help="stop once arcsim_round reaches this (exit 3 if the run ends first)")
    w.add_argument("--out", required=True, help="where to write what was seen (JSON)")
    v = sub.add_parser("verify", help="check the results against the config")
    v.add_argument("--config", required=True)
    v.add_argument("--seen", required=True, help="the output of watch (before the crash, with one)")
    v.add_argument("--summary", required=True, help="summary.json copied out of the runs volume")
    v.add_argument("--prometheus", required=True)
    v.add_argument("--reference", help="summary.json of the same config run on the host")
    v.add_argument("--num-classes", type=int, default=10)
    v.add_argument(
        "--workers-scraped",
        action="store_true",
        help="the workers and adversaries serve /metrics: Prometheus must have scraped each one",
    )
    v.add_argument("--seen-after-crash", help="the output of watch after the coordinator's restart")
    v.add_argument("--containers", help="with --seen-after-crash: `docker inspect` of the project's containers")
    v.add_argument("--coordinator-log", help="with --seen-after-crash: the coordinator container's log")
    v.add_argument(
        "--coordinator-exits",
        type=_exit_codes,
        metavar="CODE,...",
        help="with --seen-after-crash: the coordinator container's exit codes in order (docker events)",
    )
    args = parser.parse_args(argv)

    if args.command == "watch":
        if args.until_round is not None and args.until_round < 1:
            parser.error(f"--until-round must be >= 1, got {args.until_round}")
        seen = watch(args.metrics, args.prometheus, timeout=args.timeout, until_round=args.until_round)
        Path(args.out).write_text(json.dumps(seen, indent=2))
        print(
            f"watched: {seen['scrapes']} scrapes, arcsim_round from {seen['first_round']} up to "
            f"{seen['max_round']:.0f}, Prometheus accuracy {seen['prometheus_accuracy']}",
            file=sys.stderr,
        )
        if args.until_round is not None and seen["stopped_at_round"] is None:
            print(
                f"watch: arcsim_round never reached {args.until_round} (the run ended or timed out first)",
                file=sys.stderr,
            )
            return 3
        return 0
    crash_files = (args.seen_after_crash, args.containers, args.coordinator_log, args.coordinator_exits)
    if any(item is not None for item in crash_files) and not all(item is not None for item in crash_files):
        parser.error("--seen-after-crash, --containers, --coordinator-log and --coordinator-exits go together")
    crash = None
    if args.seen_after_crash:
        crash = {
            "after": json.loads(Path(args.seen_after_crash).read_text()),
            "containers": json.loads(Path(args.containers).read_text()),
            "log": Path(args.coordinator_log).read_text(errors="replace"),
            "exits": args.coordinator_exits,
        }
    config = yaml.safe_load(Path(args.config).read_text())
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    lines = verify(
        config,
        json.loads(Path(args.seen).read_text()),
        json.loads(Path(args.summary).read_text()),
        args.prometheus,
        reference=reference,
        num_classes=args.num_classes,
        crash=crash,
        workers_scraped=args.workers_scraped,
    )
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
