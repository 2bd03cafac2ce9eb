"""Per run of a sweep folder with synchronous and asynchronous runs: the schedule, the accuracy, and what
the windows held (Byzantine share, staleness, stale refusals, simulated time), as a markdown table.

    python benchmarks/async_windows.py runs/async-fashion

The windows' numbers come from rounds.jsonl (``window``, arcsim/engine/asynchronous.py): the Byzantine
share and the staleness are averaged over every update's window and every vector in it; the clock is the
last update's time (simulated seconds on the inproc engine, real ones on the grpc engine). docs/async.md
shows this table; its runs are in docs/results/async-fashion.jsonl.gz, archived with ``--all-rounds`` so
that ``arcsim archive --extract docs/results/async-fashion.jsonl.gz runs/async-fashion`` gives this
script every window back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _schedule(config: dict) -> str:
    if config["schedule"] == "sync":
        return "sync"
    settings, speeds = config["async"], config["speeds"]
    byzantine = speeds.get("byzantine", {"distribution": "constant", "seconds": 1.0})
    speed = "fast (0.2 s)" if byzantine == {"distribution": "constant", "seconds": 0.2} else "as honest"
    weighting = settings.get("staleness_weighting", "none")
    timing = settings.get("byzantine_timing", "arrival")
    return (
        f"async K={settings.get('buffer_size')}, Byzantine {speed}"
        + (f", {weighting} weights" if weighting != "none" else "")
        + (f", timing {timing}" if timing != "arrival" else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    rows = []
    for run in sorted(p for p in args.sweep_dir.iterdir() if (p / "summary.json").exists()):
        summary = json.loads((run / "summary.json").read_text())
        config = summary["config"]
        records = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        windows = [r["window"] for r in records if r.get("window")]
        share = staleness = refused = clock = "–"
        if windows:
            share = f"{sum(w['byzantine_share'] or 0 for w in windows) / len(windows):.2f}"
            ages = [s for w in windows for s in w["staleness"]]
            staleness = f"{sum(ages) / len(ages):.2f}"
            refused = str(sum(w["stale_refused"] for w in windows))
            clock = f"{windows[-1]['time']:.0f}"
        rows.append(
            (
                config["pipeline"],
                _schedule(config),
                f"{100 * summary['max_accuracy']:.1f}",
                f"{100 * summary['final_accuracy']:.1f}",
                share,
                staleness,
                refused,
                clock,
            )
        )
    print(
        "| pipeline | schedule | max test acc % | final test acc % | Byzantine share per window | "
        "mean staleness | stale refused | clock s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in sorted(rows, key=lambda r: (r[1] != "sync", r[1], r[0])):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
