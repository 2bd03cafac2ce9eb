"""The outside checks of ``make e2e-docker`` (deploy/e2e-docker.sh): what a user sees of a compose run.

Two steps, so that the shell script can collect the results between them:

``watch``   while the run goes: scrape the coordinator's published /metrics (every 0.2 s) and ask
            the published Prometheus for ``arcsim_test_accuracy`` (every second), until the
            coordinator's endpoint goes away at the end of the run; write what was seen as JSON.
``verify``  after the run: the results copied out of the ``runs`` volume (summary.json), what
            ``watch`` saw, and Prometheus' stored series must agree with the experiment config:
            every round run, accuracy far above chance (1 / classes), every worker connected, and
            (with ``--reference``) the same final parameters as a run of the same config on the host.

Only the standard library and prometheus_client's text parser; no Docker API: the script sees the
testbed the way a user does, through its published loopback ports.

    python deploy/docker/e2e_check.py watch --metrics http://127.0.0.1:9100/metrics \\
        --prometheus http://127.0.0.1:9090 --out seen.json
    python deploy/docker/e2e_check.py verify --config configs/compose-e2e.yaml --seen seen.json \\
        --summary summary.json --prometheus http://127.0.0.1:9090 [--reference local/summary.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families


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


def prometheus_query(base: str, query: str, *, timeout: float = 2.0) -> list[dict[str, Any]]:
    """The result vector of an instant query through Prometheus' HTTP API (empty: no series)."""
    url = f"{base.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        answer = json.load(response)
    if answer.get("status") != "success":
        raise OSError(f"prometheus answered {answer!r} to {query!r}")
    return list(answer["data"]["result"])


def watch(metrics_url: str, prometheus_url: str, *, timeout: float, gone_after: float = 1.5) -> dict[str, Any]:
    """Follow a run from outside until its /metrics endpoint, once seen, stays away ``gone_after`` seconds."""
    seen: dict[str, Any] = {
        "scrapes": 0, "max_round": 0.0, "last": {}, "max_connected": {"honest": 0.0, "byzantine": 0.0},
        "max_accuracy": None, "prometheus_accuracy": None, "prometheus_queries": 0, "timed_out": False,
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
        except (OSError, ValueError):  # not up yet, or gone at the end of the run
            if last_ok is not None and now - last_ok > gone_after:
                break
        else:
            last_ok = now
            seen["scrapes"] += 1
            seen["last"] = samples
            seen["max_round"] = max(seen["max_round"], samples.get("arcsim_round", 0.0))
            for role in ("honest", "byzantine"):
                value = samples.get(f'arcsim_workers_connected{{role="{role}"}}', 0.0)
                seen["max_connected"][role] = max(seen["max_connected"][role], value)
            accuracy = samples.get("arcsim_test_accuracy", 0.0)
            if samples.get("arcsim_round", 0.0) > 0 and accuracy > 0:
                seen["max_accuracy"] = max(seen["max_accuracy"] or 0.0, accuracy)
        if now >= next_query and seen["prometheus_accuracy"] is None:
            next_query = now + 1.0
            try:
                result = prometheus_query(prometheus_url, "arcsim_test_accuracy > 0")
            except (OSError, ValueError):
                pass
            else:
                seen["prometheus_queries"] += 1
                if result:
                    seen["prometheus_accuracy"] = float(result[0]["value"][1])
        time.sleep(0.2)
    return seen


def verify(config: dict[str, Any], seen: dict[str, Any], summary: dict[str, Any], prometheus_url: str, *,
           reference: dict[str, Any] | None, num_classes: int) -> list[str]:
    """Every check as 'ok ...' or 'FAIL ...'; the run passes when none fails."""
    rounds = int(config["rounds"])
    chance = 1.0 / num_classes
    floor = min(0.5, 4 * chance)  # far above chance, well below what the e2e config reaches
    checks: list[tuple[bool, str]] = []

    def check(ok: bool, text: str) -> None:
        checks.append((bool(ok), text))

    check(not seen["timed_out"], "the run ended before the time limit")
    check(summary.get("status") == "completed", f"summary.json status {summary.get('status')!r} == 'completed'")
    check(summary.get("rounds_completed") == rounds, f"summary.json rounds_completed {summary.get('rounds_completed')}"
          f" == rounds {rounds}")
    final = summary.get("final_accuracy") or 0.0
    check(final > floor, f"summary.json final_accuracy {final:.4f} > {floor:.2f} (chance {chance:.2f})")
    # From outside, through the coordinator's published metrics port.
    check(seen["scrapes"] > 0, f"/metrics scraped {seen['scrapes']} times from outside")
    # The endpoint closes right after the last round, so the last scrape may trail by a round or so.
    check(seen["max_round"] >= 0.9 * rounds, f"/metrics arcsim_round reached {seen['max_round']:.0f} "
          f"(of {rounds}; exact at the end: {seen['max_round'] == rounds})")
    accuracy = seen["max_accuracy"] or 0.0
    check(accuracy > floor, f"/metrics arcsim_test_accuracy {accuracy:.4f} > {floor:.2f}")
    for role, key in (("honest", "num_honest"), ("byzantine", "num_byzantine")):
        want = int(config[key])
        got = seen["max_connected"][role]
        check(got == want, f"/metrics arcsim_workers_connected{{role=\"{role}\"}} reached {got:.0f} == {want}")
    # Through Prometheus: it scraped the coordinator by its service name on the compose network.
    live = seen["prometheus_accuracy"]
    check(live is not None, f"Prometheus answered arcsim_test_accuracy during the run ({live})")
    try:
        stored = prometheus_query(prometheus_url, 'max_over_time(arcsim_test_accuracy{job="arcsim-coordinator"}[1h])')
        stored_rounds = prometheus_query(prometheus_url, 'max_over_time(arcsim_round{job="arcsim-coordinator"}[1h])')
    except (OSError, ValueError) as error:
        check(False, f"Prometheus query after the run: {error}")
    else:
        best = float(stored[0]["value"][1]) if stored else math.nan
        check(bool(stored) and best > floor, f"Prometheus max_over_time(arcsim_test_accuracy) {best:.4f} > {floor:.2f}")
        last_round = float(stored_rounds[0]["value"][1]) if stored_rounds else math.nan
        check(bool(stored_rounds) and last_round > 0, f"Prometheus max_over_time(arcsim_round) {last_round:.0f} > 0")
    if reference is not None:
        ours, theirs = summary.get("final_params_sha256", ""), reference.get("final_params_sha256", "")
        check(ours == theirs, f"final parameters equal a run of the same config on the host "
                              f"({ours[:16]} vs {theirs[:16]})")
    return [("ok   " if ok else "FAIL ") + text for ok, text in checks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="follow the run from outside until the coordinator's endpoint goes away")
    w.add_argument("--metrics", required=True, help="the coordinator's published /metrics URL")
    w.add_argument("--prometheus", required=True, help="the published Prometheus base URL")
    w.add_argument("--timeout", type=float, default=600.0)
    w.add_argument("--out", required=True, help="where to write what was seen (JSON)")
    v = sub.add_parser("verify", help="check the results against the config")
    v.add_argument("--config", required=True)
    v.add_argument("--seen", required=True, help="the output of watch")
    v.add_argument("--summary", required=True, help="summary.json copied out of the runs volume")
    v.add_argument("--prometheus", required=True)
    v.add_argument("--reference", help="summary.json of the same config run on the host")
    v.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args(argv)

    if args.command == "watch":
        seen = watch(args.metrics, args.prometheus, timeout=args.timeout)
        Path(args.out).write_text(json.dumps(seen, indent=2))
        print(f"watched: {seen['scrapes']} scrapes, arcsim_round up to {seen['max_round']:.0f}, "
              f"Prometheus accuracy {seen['prometheus_accuracy']}", file=sys.stderr)
        return 0
    config = yaml.safe_load(Path(args.config).read_text())
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    lines = verify(config, json.loads(Path(args.seen).read_text()), json.loads(Path(args.summary).read_text()),
                   args.prometheus, reference=reference, num_classes=args.num_classes)
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
