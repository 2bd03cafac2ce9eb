"""Run-steps per second of the batched engine against a sweep of the in-process engine, on the same runs.

    python benchmarks/batched.py                      # ALIE (fixed factor), 8 runs x 50 rounds
    python benchmarks/batched.py --attack optimal_alie --rounds 10
    python benchmarks/batched.py --runs 16 --rounds 100 --repeats 2

Both sides are the command line a user types, each sweep in a fresh folder:
``arcsim sweep GRID --engine inproc --jobs J`` (J = the CPU cores: a process per run, one thread each)
and ``arcsim sweep GRID --engine batched --jobs J`` (the runs cut into J groups, a process per group,
one thread each), and with ``--one-process`` ``--jobs 1`` for the batched engine (one group on
every core; slower on 2 cores, docs/benchmarks.md). The grid is
configs/default.yaml (the paper's CNN on Fashion-MNIST, 10 honest workers and 3 Byzantine ones,
``arc > nnm > cwtm``) with ``--runs`` seeds and learning rates, so a group mixes seeds and learning
rates as a protocol grid does. The wall time includes each process's start and data loading, which a
sweep pays too. Sides alternate within each repeat; the ratio is computed from the medians, in this
one process, so a noisy machine moves both sides alike. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def grid(runs: int, rounds: int, attack: str, eval_every: int) -> dict:
    base = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    seeds = list(range(1, (runs + 1) // 2 + 1))
    lrs = [0.1, 0.25][: 1 if runs == 1 else 2]
    base.update({"rounds": rounds, "eval_every": eval_every, "attack": attack, "seed": seeds, "lr": lrs})
    base["sweep"] = {"name": "bench-batched"}
    return base


def sweep_seconds(config: Path, engine: str, jobs: int, extra: list[str]) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{engine}-"))
    try:
        command = [sys.executable, "-m", "arcsim", "sweep", str(config), "--out", str(out), "--jobs", str(jobs)]
        command += ["--engine", engine, *extra]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--attack", default="alie")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--one-process", action="store_true", help="also the batched engine as one group on every core (--jobs 1)"
    )
    args = parser.parse_args()
    values = grid(args.runs, args.rounds, args.attack, args.eval_every)
    runs = len(values["seed"]) * len(values["lr"])
    steps = runs * args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "grid.yaml"
        config.write_text(yaml.safe_dump(values, sort_keys=False))
        sides = {
            f"inproc --jobs {args.jobs}": ("inproc", args.jobs, []),
            f"batched --jobs {args.jobs}": ("batched", args.jobs, []),
        }
        if args.one_process:
            sides["batched --jobs 1"] = ("batched", 1, [])
        times: dict[str, list[float]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, (engine, jobs, extra) in sides.items():
                seconds = sweep_seconds(config, engine, jobs, extra)
                times[name].append(seconds)
                print(f"repeat {repeat + 1}: {name}: {seconds:.1f} s ({steps / seconds:.2f} run-steps/s)", flush=True)
    baseline = statistics.median(times[f"inproc --jobs {args.jobs}"])
    print(
        f"\n{runs} runs x {args.rounds} rounds ({steps} run-steps), attack {args.attack}, "
        f"eval every {args.eval_every}, {os.cpu_count()} cores"
    )
    print(f"{'side':<22} {'median s':>9} {'run-steps/s':>12} {'vs inproc':>10}")
    for name, values_ in times.items():
        median = statistics.median(values_)
        print(f"{name:<22} {median:9.1f} {steps / median:12.2f} {baseline / median:9.2f}x")


if __name__ == "__main__":
    main()
