"""Do the batched and the in-process engines agree over whole runs? Accuracies of one grid on both.

    python benchmarks/batched_agreement.py                       # 200 rounds, the grid below
    python benchmarks/batched_agreement.py --rounds 50 --out /tmp/agree

The grid: configs/default.yaml (the paper's CNN on Fashion-MNIST, 10 honest workers under extreme
heterogeneity, 3 Byzantine ones) with three attacks (ALIE, sign flipping, FOE), two pipelines
(``nnm > cwtm`` and ``arc > nnm > cwtm``) and two seeds: 12 runs, run once by ``arcsim sweep
--engine inproc`` and once by ``arcsim sweep --engine batched`` (resumable: a rerun with the same
--out skips what is done). The engines share data, shards, batches and initialisation, and their
vectors differ only by rounding, which training amplifies; "agree within seed noise" is judged per
(attack, pipeline) by comparing |batched - inproc| of the maximum and final test accuracy of each
seed with the spread between the two seeds of the in-process engine. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", default="runs/batched-agreement")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    grid.update(
        {
            "rounds": args.rounds,
            "eval_every": 25,
            "attack": ["alie", "sign_flip", "foe"],
            "pipeline": ["nnm > cwtm", "arc > nnm > cwtm"],
            "seed": [1, 2],
            "sweep": {"name": "batched-agreement"},
        }
    )
    config = out / "grid.yaml"
    config.write_text(yaml.safe_dump(grid, sort_keys=False))
    tables = {}
    for engine in ("inproc", "batched"):
        folder = out / engine
        command = [sys.executable, "-m", "arcsim", "sweep", str(config), "--engine", engine]
        command += ["--out", str(folder), "--jobs", str(args.jobs)]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        with open(folder / "sweep.csv") as handle:
            tables[engine] = {row["run_dir"]: row for row in csv.DictReader(handle)}
    cells: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for name, row in tables["inproc"].items():
        other = tables["batched"][name]
        cells.setdefault((row["attack"], row["pipeline"]), []).append(
            (
                float(row["max_accuracy"]),
                float(other["max_accuracy"]),
                float(row["final_accuracy"]),
                float(other["final_accuracy"]),
            )
        )
    print(f"{args.rounds} rounds; accuracies in %; seeds 1 and 2 per cell")
    header = "| attack | pipeline | max acc inproc | max acc batched | max: engines differ by | max: seeds differ by |"
    print(header + " final: engines differ by | final: seeds differ by |")
    print("|---" * 8 + "|")
    engine_gaps, seed_gaps = [], []
    for (attack, pipeline), values in sorted(cells.items()):
        engines_max = [abs(b - a) for a, b, _, _ in values]
        engines_final = [abs(b - a) for _, _, a, b in values]
        seeds_max = abs(values[0][0] - values[1][0]) if len(values) == 2 else float("nan")
        seeds_final = abs(values[0][2] - values[1][2]) if len(values) == 2 else float("nan")
        engine_gaps += engines_max + engines_final
        seed_gaps += [seeds_max, seeds_final]
        print(
            f"| {attack} | {pipeline} | {' / '.join(f'{100 * a:.1f}' for a, _, _, _ in values)} | "
            f"{' / '.join(f'{100 * b:.1f}' for _, b, _, _ in values)} | "
            f"{' / '.join(f'{100 * g:.1f}' for g in engines_max)} | {100 * seeds_max:.1f} | "
            f"{' / '.join(f'{100 * g:.1f}' for g in engines_final)} | {100 * seeds_final:.1f} |"
        )
    print(
        f"\nmedian |batched - inproc| {100 * statistics.median(engine_gaps):.2f} points; "
        f"median seed-to-seed difference {100 * statistics.median(seed_gaps):.2f} points"
    )


if __name__ == "__main__":
    main()
