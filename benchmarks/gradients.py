"""The batched engine's gradient strategies and batched evaluation, timed: `python benchmarks/gradients.py`.

1. GradientPass (arcsim/engine/gradients.py) on the paper's CNN and Fashion-MNIST, batch 25: seconds per
   run of each strategy ("loop", "vmap", and "grouped" with and without channels-last, with the conv
   weight gradients per worker slice or in channel groups) for W workers and R runs at each thread
   count, the ratio to "loop", and the largest absolute difference from "loop".
2. evaluate_runs on the 10,000 test images in batches of 1,000 (and one batch of all): seconds per run
   of a loop over the runs and of a vmap over the runs, each with a plain and a channels-last model.

Needs Fashion-MNIST (`arcsim data download fashion-mnist`). Prints one JSON line per measurement;
--json PATH writes them all. Gradients go into one reused buffer (``out=``), so the figures hold the
computation, not the allocation of the (R, W, P) result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from arcsim.engine.gradients import GradientPass, evaluate_runs
from arcsim.tasks import build_model, load_dataset, model_loss

RESULTS: list[dict] = []

VARIANTS: tuple[tuple[str, str, dict], ...] = (
    ("loop", "loop", {}),
    ("vmap", "vmap", {}),
    ("grouped", "grouped", {"channels_last": False, "conv_weights": "slices"}),
    ("grouped+groups", "grouped", {"channels_last": False, "conv_weights": "groups"}),
    ("grouped+cl", "grouped", {"channels_last": True, "conv_weights": "slices"}),
    ("grouped+cl+groups", "grouped", {"channels_last": True, "conv_weights": "groups"}),
)


def emit(**fields) -> None:
    RESULTS.append(fields)
    print(json.dumps(fields), flush=True)


def interleaved(calls: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each call, timed in turns (one of each per round) so that a load that comes and
    goes on a shared machine weighs on every variant alike."""
    times: dict = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def gradients(dataset, *, threads: int, workers: int, runs: int, batch: int, repeat: int) -> None:
    torch.set_num_threads(threads)
    model = build_model("cnn", input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=0)
    loss = model_loss("cnn")
    gen = torch.Generator().manual_seed(runs * 100 + workers)
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    params = base + 0.01 * torch.randn(runs, base.numel(), generator=gen)
    picks = torch.randint(0, dataset.train_y.shape[0], (runs, workers, batch), generator=gen)
    x, y = dataset.train_x[picks], dataset.train_y[picks]
    out = torch.empty(runs, workers, base.numel())
    passes = {name: GradientPass(model, loss, "cpu", strategy, **options) for name, strategy, options in VARIANTS}
    results = {}
    for name, gp in passes.items():  # first calls (each checks itself once against the loop), kept
        gp(params, x, y, out=out)
        results[name] = out.clone()
    seconds = interleaved({name: (lambda gp=gp: gp(params, x, y, out=out)) for name, gp in passes.items()}, repeat)
    setting = {"threads": threads, "workers": workers, "runs": runs, "batch": batch}
    for name in passes:
        ratio, difference = seconds[name] / seconds["loop"], (results[name] - results["loop"]).abs().max()
        fields = {"check": "gradients", "variant": name, **setting, "seconds_per_run": round(seconds[name] / runs, 4)}
        emit(**fields, ratio_to_loop=round(ratio, 3), max_abs_diff=float(difference))


def evaluation(dataset, *, threads: int, runs: int, repeat: int) -> None:
    torch.set_num_threads(threads)
    model = build_model("cnn", input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=0)
    loss = model_loss("cnn")
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    params = base + 0.01 * torch.randn(runs, base.numel(), generator=torch.Generator().manual_seed(1))
    variants = [
        (method, channels_last, batch_size)
        for method in ("loop", "vmap")
        for channels_last in (False, True)
        for batch_size in (1000, dataset.test_y.shape[0])
    ]
    results = {}

    def score(variant) -> None:
        method, channels_last, batch_size = variant
        results[variant] = evaluate_runs(
            model,
            loss,
            params,
            dataset.test_x,
            dataset.test_y,
            batch_size=batch_size,
            device="cpu",
            method=method,
            channels_last=channels_last,
        )

    seconds = interleaved({variant: (lambda v=variant: score(v)) for variant in variants}, repeat)
    accuracy_0, loss_0 = results[variants[0]]
    for variant in variants:
        accuracy, mean_loss = results[variant]
        emit(
            check="evaluation",
            method=variant[0],
            channels_last=variant[1],
            batch_size=variant[2],
            threads=threads,
            runs=runs,
            seconds_per_run=round(seconds[variant] / runs, 3),
            max_accuracy_diff=float((accuracy - accuracy_0).abs().max()),
            max_loss_rel_diff=float(((mean_loss - loss_0) / loss_0).abs().max()),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 13])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--eval-runs", type=int, default=2)
    parser.add_argument("--skip", choices=["gradients", "evaluation"], nargs="*", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dataset = load_dataset("fashion-mnist")
    if "gradients" not in args.skip:
        for threads in args.threads:
            for workers in args.workers:
                for runs in args.runs:
                    gradients(
                        dataset, threads=threads, workers=workers, runs=runs, batch=args.batch, repeat=args.repeat
                    )
    if "evaluation" not in args.skip:
        for threads in args.threads:
            evaluation(dataset, threads=threads, runs=args.eval_runs, repeat=3)
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
