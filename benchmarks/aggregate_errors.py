"""Per run of a sweep folder: status, maximum test accuracy and the mean aggregate error (how far the
aggregate landed from the honest mean: what an optimal attack's search maximises), as a markdown table.

    python benchmarks/aggregate_errors.py runs/paper-search-compare

The mean over the first rounds compares attacks from the same starting point (the runs' parameters
drift apart afterwards); the mean over all rounds includes a diverged run's last, huge, errors.
docs/results.md ("Does the optimal attacks' search matter?") shows this table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--first", type=int, default=20, help="the rounds of the early mean (default 20)")
    args = parser.parse_args()
    print(
        f"| attack | search | pipeline | status (rounds) | max test acc % | mean aggregate error, rounds "
        f"0-{args.first - 1} | mean aggregate error, all rounds |"
    )
    print("|---|---|---|---|---:|---:|---:|")
    for run in sorted(p for p in args.sweep_dir.iterdir() if (p / "summary.json").exists()):
        summary = json.loads((run / "summary.json").read_text())
        config = summary["config"]
        records = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        errors = [r["aggregate_error"] for r in records if r.get("aggregate_error") is not None]
        accuracy = [r["accuracy"] for r in records if r.get("accuracy") is not None]
        early = errors[: args.first]
        search = (config.get("attack_params") or {}).get("search", "grid")
        best = f"{100 * max(accuracy):.1f}" if accuracy else "–"
        early_mean = f"{sum(early) / len(early):.3g}" if early else "–"
        mean = f"{sum(errors) / len(errors):.3g}" if errors else "–"
        print(
            f"| {config['attack']} | {search} | {config['pipeline']} | {summary.get('status')} ({len(records)}) "
            f"| {best} | {early_mean} | {mean} |"
        )


if __name__ == "__main__":
    main()
