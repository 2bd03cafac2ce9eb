"""arcsim's protocol runs set beside ByzFL's own benchmark on the same cells: accuracy curves and maxima.

The cells are shared with configs/paper/protocol-cpu.yaml: Fashion-MNIST (60,000 training images, 20 %
held out for validation), the paper's CNN, 10 honest workers and f = 7 Byzantine ones, gamma-similarity
with gamma = 0 (ByzFL: ``gamma_similarity_niid`` 0.0), NNM then the coordinate-wise trimmed mean with and
without ARC in front (ByzFL: pre-aggregators ``ARC``, ``NNM``; aggregator ``TrMean``), lr 0.1, momentum 0.9,
weight decay 1e-4, batch 25, 800 steps, evaluation every 50, two seeds, under sign flipping
(``SignFlipping``) and ALIE with tau = 1.5 (``ALittleIsEnough``): four cells. ``--attacks`` adds FOE with
tau = 2 (``InnerProductManipulation``) and label flipping (``LabelFlipping``).

ByzFL 0.0.11 runs unmodified in its own virtual environment (``--byzfl-python``), made with

    python3 -m venv /work/byzfl-venv
    /work/byzfl-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 byzfl==0.0.11

through its benchmark entry point ``run_benchmark(1)`` with a ``config.json`` written here,
on the CPU with one thread; it resumes by itself (it skips trainings whose results exist). arcsim's side
is read from the protocol sweep's run folders (``--arcsim``: ``runs/paper-protocol-cpu``, or a folder
extracted from its archive with ``arcsim archive --extract``); this script runs no arcsim training.

For each cell and side: the test accuracy after rounds 50, 100, ..., 800 averaged over the seeds, and its
maximum (the protocol's per-attack score). ByzFL also evaluates its initial model (step 0), which is
left out. Output: a markdown table on stdout and ``--csv`` (one row per cell, side and evaluation).

    python benchmarks/byzfl_side_by_side.py --csv docs/results/byzfl-side-by-side.csv
    python benchmarks/byzfl_side_by_side.py --steps 4 --eval-every 2 --skip-arcsim   # smoke run of ByzFL

Cost: ByzFL's 8 trainings of 800 steps take about 1.5 hours on one core of the 2-core machine (its four
4-step trainings took 170 s, mostly loading and evaluating the 12,000 validation and 10,000 test images).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import byzfl_compare  # noqa: E402
from byzfl_compare import DEFAULT_BYZFL_PYTHON, prepare_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path("/work/byzfl-bench/side-by-side")
NUM_BYZANTINE, GAMMA = 7, 0.0
LR, MOMENTUM = byzfl_compare.LR, byzfl_compare.MOMENTUM  # 0.1, 0.9; weight decay 1e-4, batch 25 likewise

# arcsim's attack (name, params) -> ByzFL's attack entry
ATTACKS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "sign_flip": ("sign_flip", {}, {"name": "SignFlipping", "parameters": {}}),
    "alie": ("alie", {"tau": 1.5}, {"name": "ALittleIsEnough", "parameters": {"tau": 1.5}}),
    "foe": ("foe", {"tau": 2.0}, {"name": "InnerProductManipulation", "parameters": {"tau": 2.0}}),
    "label_flip": ("label_flip", {}, {"name": "LabelFlipping", "parameters": {}}),
}
PIPELINES = {"nnm > cwtm": ["NNM"], "arc > nnm > cwtm": ["ARC", "NNM"]}


@dataclass(frozen=True)
class Cell:
    attack: str  # a key of ATTACKS
    pipeline: str  # a key of PIPELINES


def byzfl_config(*, attacks: list[str], steps: int, eval_every: int, seeds: int, data: Path, results: Path) -> dict:
    """ByzFL's config.json: byzfl_compare's (the same model, optimiser and data) with every (pipeline,
    attack) cell, f = 7, gamma-similarity 0, a validation split, evaluations, and ``seeds`` training seeds."""
    config = byzfl_compare.byzfl_config(steps=steps, data=data, results=results)
    config["benchmark_config"].update(
        nb_training_seeds=seeds,
        f=[NUM_BYZANTINE],
        data_distribution=[{"name": "gamma_similarity_niid", "distribution_parameter": GAMMA}],
        size_train_set=0.8,
    )
    config["pre_aggregators"] = [[{"name": name, "parameters": {}} for name in names] for names in PIPELINES.values()]
    config["attack"] = [ATTACKS[a][2] for a in attacks]
    config["evaluation_and_results"].update(evaluation_delta=eval_every, evaluate_on_test=True)
    return config


def run_byzfl(python: Path, work: Path, config: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = "import torch; torch.set_num_threads(1); from byzfl.benchmark import run_benchmark; run_benchmark(1)"
    subprocess.run([str(python), "-c", code], cwd=work, env=env, check=True)


def byzfl_curves(results: Path, cell: Cell, *, steps: int, eval_every: int) -> dict[int, dict[int, float]]:
    """{seed: {rounds done: test accuracy}} of one cell, from ByzFL's result files (its step-0 evaluation left out)."""
    names = "_".join(PIPELINES[cell.pipeline])
    attack = ATTACKS[cell.attack][2]["name"]
    folders = [p for p in results.iterdir() if p.is_dir() and f"_TrMean_{names}_{attack}_" in p.name]
    folders = [p for p in folders if p.name.split("_TrMean_")[1].startswith(f"{names}_{attack}_lr")]
    if len(folders) != 1:
        raise SystemExit(f"ByzFL results for {cell}: expected one folder in {results}, found {len(folders)}")
    curves = {}
    for path in sorted(folders[0].glob("test_accuracy_tr_seed_*_dd_seed_0.txt")):
        seed = int(path.name.split("_tr_seed_")[1].split("_")[0])
        values = [float(v) for v in path.read_text().replace(",", " ").split()]  # ByzFL writes them comma-separated
        evaluated = [*range(0, steps, eval_every), steps]  # ByzFL: before steps 0, 50, ..., and after the last
        curves[seed] = {done: v for done, v in zip(evaluated, values) if done > 0}
    return curves


def arcsim_curves(folder: Path, cell: Cell) -> dict[int, dict[int, float]]:
    """{seed: {rounds done: test accuracy}} of one cell from arcsim run folders of the protocol sweep; a run the
    batched engine stopped as diverged counts at chance at every evaluation it did not reach, as reports count it."""
    name, params, _ = ATTACKS[cell.attack]
    curves: dict[int, dict[int, float]] = {}
    for summary_path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        config = summary.get("config", {})
        if not (
            summary.get("status") in ("completed", "diverged")
            and config.get("attack") == name
            and (config.get("attack_params") or {}) == params
            and config.get("pipeline") == cell.pipeline
            and not config.get("pipeline_params")
            and config.get("lr") == LR
            and config.get("momentum") == MOMENTUM
            and config.get("num_byzantine") == NUM_BYZANTINE
        ):
            continue
        records = [json.loads(line) for line in (summary_path.parent / "rounds.jsonl").read_text().splitlines()]
        curve = {r["round"] + 1: r["accuracy"] for r in records if r.get("accuracy") is not None}
        if summary["status"] == "diverged":  # stopped when it turned non-finite: at chance from there (as reports)
            every = config["eval_every"]
            chance = 1.0 / summary["num_classes"]
            curve.update({done: chance for done in range(every, config["rounds"] + 1, every) if done not in curve})
        curves[config["seed"]] = curve
    return curves


def seed_average(curves: dict[int, dict[int, float]]) -> dict[int, float]:
    rounds = set.intersection(*(set(c) for c in curves.values())) if curves else set()
    return {r: sum(c[r] for c in curves.values()) / len(curves) for r in sorted(rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--byzfl-python", type=Path, default=DEFAULT_BYZFL_PYTHON)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="ByzFL's folder (config, data, results)")
    parser.add_argument("--arcsim", type=Path, default=ROOT / "runs" / "paper-protocol-cpu")
    parser.add_argument("--attacks", nargs="+", default=["sign_flip", "alie"], choices=sorted(ATTACKS))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--skip-arcsim", action="store_true", help="ByzFL only (a smoke run)")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    prepare_data(args.work / "data")
    results = args.work / "results"
    config = byzfl_config(
        attacks=args.attacks,
        steps=args.steps,
        eval_every=args.eval_every,
        seeds=args.seeds,
        data=args.work / "data",
        results=results,
    )
    run_byzfl(args.byzfl_python, args.work, config)
    cells = [Cell(a, p) for p in PIPELINES for a in args.attacks]
    rows, lines = [], []
    lines += [
        "| pipeline | attack | arcsim max % | ByzFL max % | arcsim final % | ByzFL final % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for cell in cells:
        sides = {"byzfl": byzfl_curves(results, cell, steps=args.steps, eval_every=args.eval_every)}
        if not args.skip_arcsim:
            sides["arcsim"] = arcsim_curves(args.arcsim, cell)
        averaged = {side: seed_average(curves) for side, curves in sides.items()}
        for side, curve in averaged.items():
            seeds = len(sides[side])
            rows += [
                {
                    "pipeline": cell.pipeline,
                    "attack": cell.attack,
                    "side": side,
                    "seeds": seeds,
                    "round": r,
                    "accuracy": round(v, 6),
                }
                for r, v in curve.items()
            ]

        def cell_text(side: str, pick: Any) -> str:
            curve = averaged.get(side)
            return f"{100 * pick(curve):.1f}" if curve else "–"

        lines.append(
            f"| {cell.pipeline} | {cell.attack} | {cell_text('arcsim', lambda c: max(c.values()))} | "
            f"{cell_text('byzfl', lambda c: max(c.values()))} | {cell_text('arcsim', lambda c: c[max(c)])} | "
            f"{cell_text('byzfl', lambda c: c[max(c)])} |"
        )
    print("\n".join(lines))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["pipeline", "attack", "side", "seeds", "round", "accuracy"])
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
