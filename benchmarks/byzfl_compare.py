"""arcsim's in-process engine against ByzFL's own benchmark, same configuration, same machine, interleaved.

The configuration (the paper's headline setting): Fashion-MNIST (all 60,000 training images), the paper's
CNN (ByzFL: ``cnn_mnist``), 10 honest workers under extreme heterogeneity (sorted by label, split in 10
contiguous shards), 3 Byzantine workers running ALIE, ARC then NNM then the coordinate-wise trimmed mean
(ByzFL: pre-aggregators ``ARC``, ``NNM``, aggregator ``TrMean``), D-SGD with lr 0.1, momentum 0.9, weight decay
1e-4, batch 25, one torch thread (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``), on the CPU.

ByzFL runs in its own virtual environment (PyPI ``byzfl==0.0.11`` needs torchvision; ``--byzfl-python``,
default /work/byzfl-venv/bin/python) through its own benchmark entry point, ``byzfl.benchmark.run_benchmark``
with a ``config.json`` (one training, ``nb_jobs=1``), with every evaluation switched off
(``evaluate_on_test: false``, ``size_train_set: 1.0`` so there is no validation set, no per-client metrics,
no stored models). Its Fashion-MNIST comes from the Debian IDX files, decompressed under
``DATA/FashionMNIST/raw/`` where torchvision looks for them, so nothing is downloaded. ByzFL's per-step times
are read by wrapping ``Server.get_dict_parameters`` (called once before the loop and once at the end of each
step to send the new model to the clients) with a timestamp; ByzFL's own ``train_time`` file (the whole
training loop) is read as a check.

arcsim runs ``run_inproc`` (its own venv, ``sys.executable``) on the same configuration; its per-round times
are the intervals between ``on_round`` calls (checkpoints and rounds.jsonl included). For both, the first
step (warm-up) and arcsim's last round (it evaluates) are left out.

The two run in turn as separate processes, ``--repeats`` times (ByzFL, arcsim, ByzFL, arcsim, ...); the
figures are medians over all measured steps, and the ratio is ByzFL's median seconds per step over
arcsim's (arcsim's steps per second over ByzFL's).

    python benchmarks/byzfl_compare.py --steps 30 --repeats 3
    python benchmarks/byzfl_compare.py --steps 4 --repeats 1     # smoke run

Modes ``byzfl-child`` and ``arcsim-child`` are the two measured processes (internal).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BYZFL_PYTHON = Path("/work/byzfl-venv/bin/python")
DEFAULT_DATA = Path("/work/byzfl-bench/data")
IDX_SOURCE = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TARGET = 3.0

NUM_HONEST = 10
NUM_BYZANTINE = 3
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.1, 0.9, 1e-4, 25
ALIE_TAU = 0.502402  # arcsim's default ALIE factor z_max(n=13, f=3) = Phi^-1(9/13); passed to ByzFL too


def byzfl_config(*, steps: int, data: Path, results: Path) -> dict[str, Any]:
    """ByzFL's benchmark config.json for the configuration above."""
    return {
        "benchmark_config": {
            "training_algorithm": {"name": "DSGD", "parameters": {}},
            "nb_steps": steps,
            "device": "cpu",
            "training_seed": 0,
            "nb_training_seeds": 1,
            "nb_honest_clients": NUM_HONEST,
            "f": [NUM_BYZANTINE],
            "data_distribution_seed": 0,
            "nb_data_distribution_seeds": 1,
            "data_distribution": [{"name": "extreme_niid", "distribution_parameter": 1.0}],
            "size_train_set": 1.0,
        },
        "model": {
            "name": "cnn_mnist",
            "dataset_name": "fashionmnist",
            "nb_labels": 10,
            "loss": "NLLLoss",
            "learning_rate": LR,
            "learning_rate_decay": 1.0,
            "milestones": [],
        },
        "aggregator": [{"name": "TrMean", "parameters": {}}],
        "pre_aggregators": [{"name": "ARC", "parameters": {}}, {"name": "NNM", "parameters": {}}],
        "honest_clients": {"momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "batch_size": BATCH},
        "attack": [{"name": "ALittleIsEnough", "parameters": {"tau": ALIE_TAU}}],
        "evaluation_and_results": {
            "evaluation_delta": steps + 1,
            "batch_size_evaluation": 128,
            "evaluate_on_test": False,
            "store_per_client_metrics": False,
            "store_models": False,
            "data_folder": str(data),
            "results_directory": str(results),
        },
    }


def prepare_data(data: Path) -> None:
    """Fashion-MNIST's IDX files, uncompressed, where torchvision's FashionMNIST looks (no download)."""
    raw = data / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        target = raw / name
        if not target.exists():
            with gzip.open(IDX_SOURCE / f"{name}.gz") as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)


# --- the measured processes ----------------------------------------------------------------------------------
def byzfl_child(steps: int, data: Path, out: Path) -> None:
    """Run ByzFL's run_benchmark on one training; write per-step times to ``out`` (JSON)."""
    import torch

    torch.set_num_threads(1)
    import byzfl
    from byzfl.benchmark import run_benchmark
    from byzfl.fed_framework.server import Server

    stamps_path = out.with_suffix(".stamps")
    original = Server.get_dict_parameters

    def stamped(self: Any) -> Any:  # noqa: ANN401
        result = original(self)
        with open(stamps_path, "a") as handle:  # the training runs in run_benchmark's pool process
            handle.write(f"{time.perf_counter()} {time.process_time()} {torch.get_num_threads()}\n")
        return result

    Server.get_dict_parameters = stamped
    parts_path = out.with_suffix(".parts")
    for owner, name in byzfl_parts():
        wrap_part(owner, name, parts_path)
    with tempfile.TemporaryDirectory(prefix="byzfl-bench-") as tmp:
        work = Path(tmp)
        (work / "config.json").write_text(json.dumps(byzfl_config(steps=steps, data=data, results=work / "results")))
        cwd = os.getcwd()
        os.chdir(work)
        try:
            run_benchmark(nb_jobs=1)
        finally:
            os.chdir(cwd)
        train_time = [
            float((p.read_text().split() or ["nan"])[0]) for p in (work / "results").rglob("train_time_*.txt")
        ]
    lines = [line.split() for line in stamps_path.read_text().splitlines()]
    stamps_path.unlink()
    parts: dict[str, float] = {}
    for line in parts_path.read_text().splitlines():
        name, seconds = line.rsplit(" ", 1)
        parts[name] = parts.get(name, 0.0) + float(seconds)
    parts_path.unlink()
    stamps = [float(t) for t, _, _ in lines]
    cpu = [float(c) for _, c, _ in lines]
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    step_cpu_seconds = [b - a for a, b in zip(cpu, cpu[1:])]
    out.write_text(
        json.dumps(
            {
                "engine": "byzfl",
                "byzfl": getattr(byzfl, "__version__", "0.0.11"),
                "torch": torch.__version__,
                "torch_threads": sorted({int(n) for _, _, n in lines}),
                "step_seconds": step_seconds,
                "step_cpu_seconds": step_cpu_seconds,
                "train_time_seconds": train_time[0] if train_time else None,
                "parts_seconds_per_step": {name: total / steps for name, total in parts.items()},
            }
        )
    )


def byzfl_parts() -> list[tuple[Any, str]]:
    """The ByzFL functions whose time per step is reported (wrapped with a timer, work unchanged)."""
    from byzfl.aggregators import aggregators, preaggregators
    from byzfl.attacks import attacks
    from byzfl.fed_framework.byzantine_client import ByzantineClient
    from byzfl.fed_framework.client import Client
    from byzfl.fed_framework.server import Server

    return [
        (Client, "compute_gradients"),
        (Client, "get_flat_gradients_with_momentum"),
        (Client, "set_model_state"),
        (ByzantineClient, "apply_attack"),
        (attacks.ALittleIsEnough, "__call__"),
        (Server, "update_model_with_gradients"),
        (preaggregators.ARC, "__call__"),
        (preaggregators.NNM, "__call__"),
        (aggregators.TrMean, "__call__"),
    ]


def wrap_part(owner: Any, name: str, path: Path) -> None:
    original = getattr(owner, name)
    label = f"{owner.__name__}.{name}"

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            with open(path, "a") as handle:
                handle.write(f"{label} {seconds}\n")

    setattr(owner, name, timed)


def arcsim_child(steps: int, out: Path) -> None:
    """Run arcsim's run_inproc on the same configuration; write per-round times to ``out`` (JSON)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from arcsim.config import from_dict
    from arcsim.engine.inproc import run_inproc

    config = from_dict(
        {
            "task": "fashion-mnist",
            "model": "cnn",
            "num_honest": NUM_HONEST,
            "num_byzantine": NUM_BYZANTINE,
            "attack": "alie",
            "attack_params": {"tau": ALIE_TAU},
            "pipeline": "arc > nnm > cwtm",
            "partitioner": "extreme",
            "rounds": steps,
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "batch_size": BATCH,
            "eval_every": steps,
            "seed": 0,
        }
    )
    stamps: list[float] = []
    cpu: list[float] = []
    evals: list[float] = []
    with tempfile.TemporaryDirectory(prefix="arcsim-byzfl-bench-") as tmp:
        run_inproc(
            config,
            Path(tmp) / "run",
            on_round=lambda state, record: (
                stamps.append(time.perf_counter()),
                cpu.append(time.process_time()),
                evals.append(record.eval_seconds or 0.0),
            ),
        )
    # Round t (t >= 1) lasts from round t - 1's callback to its own (the last one evaluates: left out later).
    step_seconds = [b - a - e for a, b, e in zip(stamps, stamps[1:], evals[1:])]
    step_cpu_seconds = [b - a for a, b in zip(cpu, cpu[1:])]
    out.write_text(
        json.dumps(
            {
                "engine": "arcsim",
                "torch": torch.__version__,
                "torch_threads": [torch.get_num_threads()],
                "step_seconds": step_seconds,
                "step_cpu_seconds": step_cpu_seconds,
            }
        )
    )


# --- the comparison -----------------------------------------------------------------------------------------
def run_child(python: str, mode: str, steps: int, data: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [
        python,
        str(Path(__file__).resolve()),
        mode,
        "--steps",
        str(steps),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def compare(*, steps: int, repeats: int, byzfl_python: str, data: Path, same_torch: bool) -> dict[str, Any]:
    prepare_data(data)
    runs = [("byzfl", byzfl_python, "byzfl-child"), ("arcsim", sys.executable, "arcsim-child")]
    if same_torch:  # arcsim again, on the ByzFL venv's torch (needs pyyaml, grpcio and protobuf there)
        runs.append(("arcsim_byzfl_torch", byzfl_python, "arcsim-child"))
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="byzfl-compare-") as tmp:
        for repeat in range(repeats):
            for name, python, mode in runs:
                result = run_child(python, mode, steps, data, Path(tmp) / f"{name}-{repeat}.json")
                # Step 0 is the warm-up; arcsim's last round evaluates (subtracted from its wall time in the
                # child, but not from its CPU time): leave both out.
                last = -1 if mode == "arcsim-child" else None
                measured = result["step_seconds"][1:last]
                times[name].extend(measured)
                cpu_times[name].extend(result["step_cpu_seconds"][1:last])
                meta[name] = {k: v for k, v in result.items() if k not in ("step_seconds", "step_cpu_seconds")}
                print(
                    f"  repeat {repeat}, {name:18s}: median {statistics.median(measured):.3f} s/step "
                    f"({statistics.median(result['step_cpu_seconds'][1:last]):.3f} CPU s) over "
                    f"{len(measured)} steps (torch {result['torch']}, threads {result['torch_threads']})"
                    + (
                        f", train_time {result['train_time_seconds']:.1f} s for {steps} steps"
                        if result.get("train_time_seconds")
                        else ""
                    ),
                    flush=True,
                )
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    result: dict[str, Any] = {
        "steps": steps,
        "repeats": repeats,
        "meta": meta,
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
    }
    for name, median in medians.items():
        result[f"{name}_s_per_step"] = median
        result[f"{name}_cpu_s_per_step"] = cpu_medians[name]
        result[f"{name}_steps_per_s"] = 1 / median
    result["speedup"] = medians["byzfl"] / medians["arcsim"]
    result["speedup_cpu"] = cpu_medians["byzfl"] / cpu_medians["arcsim"]
    if same_torch:
        result["speedup_same_torch"] = medians["byzfl"] / medians["arcsim_byzfl_torch"]
        result["speedup_same_torch_cpu"] = cpu_medians["byzfl"] / cpu_medians["arcsim_byzfl_torch"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="compare", choices=("compare", "byzfl-child", "arcsim-child"))
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each (default 3)")
    parser.add_argument("--byzfl-python", default=str(DEFAULT_BYZFL_PYTHON), help="python of the ByzFL venv")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ByzFL's data folder (DATA/FashionMNIST/raw)")
    parser.add_argument(
        "--same-torch",
        action="store_true",
        help="also run arcsim on the ByzFL venv's torch (a control; needs pyyaml, grpcio and protobuf there)",
    )
    parser.add_argument("--out", type=Path, help="children: where to write the result; compare: JSON of the results")
    args = parser.parse_args(argv)
    if args.mode == "byzfl-child":
        byzfl_child(args.steps, args.data, args.out)
        return 0
    if args.mode == "arcsim-child":
        arcsim_child(args.steps, args.out)
        return 0
    if args.steps < 4:
        parser.error(f"--steps must be at least 4 (the first and last are left out), got {args.steps}")
    if not Path(args.byzfl_python).exists():
        parser.error(
            f"no ByzFL python at {args.byzfl_python}: python3 -m venv /work/byzfl-venv && "
            "/work/byzfl-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 byzfl==0.0.11"
        )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}, {platform.platform()}", flush=True)
    result = compare(
        steps=args.steps,
        repeats=args.repeats,
        byzfl_python=args.byzfl_python,
        data=args.data,
        same_torch=args.same_torch,
    )
    result["loadavg_after"] = os.getloadavg()
    held = "held" if result["speedup"] >= TARGET else "NOT held"
    print(
        f"ByzFL  {result['byzfl_s_per_step']:.3f} s/step ({result['byzfl_steps_per_s']:.2f} steps/s), "
        f"{result['byzfl_cpu_s_per_step']:.3f} CPU s/step"
    )
    print(
        f"arcsim {result['arcsim_s_per_step']:.3f} s/step ({result['arcsim_steps_per_s']:.2f} steps/s), "
        f"{result['arcsim_cpu_s_per_step']:.3f} CPU s/step"
    )
    print(
        f"arcsim / ByzFL steps per second: {result['speedup']:.2f}x wall, {result['speedup_cpu']:.2f}x CPU time "
        f"(target >= {TARGET}x: {held})"
    )
    if "speedup_same_torch" in result:
        print(
            f"arcsim on ByzFL's torch {result['arcsim_byzfl_torch_s_per_step']:.3f} s/step, "
            f"{result['arcsim_byzfl_torch_cpu_s_per_step']:.3f} CPU s/step: "
            f"{result['speedup_same_torch']:.2f}x wall, "
            f"{result['speedup_same_torch_cpu']:.2f}x CPU time ByzFL's steps per second"
        )
    print("ByzFL's time per step by function (last repeat; nested calls count in both):")
    for name, seconds in (result["meta"]["byzfl"].get("parts_seconds_per_step") or {}).items():
        print(f"  {name:45s} {1000 * seconds:8.1f} ms")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
