"""Benchmark of the batched optimal ALIE: one search over R runs against the 2-D search looped over them.

Optimal ALIE with the default grid of 41 factors against ARC then NNM then CWTM (``build_pipeline("arc
> nnm > cwtm", f=3)``) on honest vectors of shape (R, 10, d) float32, with one torch thread. The
batched search stacks the candidates of all runs into (R, T, 13, d) calls of the batched pipeline
(``max_elements`` decides T per call); the 2-D search makes 41 calls of the 2-D pipeline per run. It
prints, per R, the seconds per run of each (best of ``--repeat``, interleaved) and the 2-D time over
the batched time, and checks that both chose the same factors.

    python benchmarks/attacks_batched.py                     # the paper's CNN: d = 431,080
    python benchmarks/attacks_batched.py --d 50000 --runs 1 4
"""

from __future__ import annotations

import argparse
import time

import torch

from arcsim.attacks import DEFAULT_MAX_ELEMENTS, optimal_alie_tau
from arcsim.robust import build_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h", type=int, default=10)
    parser.add_argument("--f", type=int, default=3)
    parser.add_argument("--d", type=int, default=431_080)
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipeline = build_pipeline("arc > nnm > cwtm", f=args.f)
    n = args.h + args.f

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        return pipeline(x)[0]

    def batched(honest: torch.Tensor) -> torch.Tensor:
        return optimal_alie_tau(
            honest, num_byzantine=args.f, num_workers=n, aggregate=aggregate, max_elements=args.max_elements
        )

    def looped(honest: torch.Tensor) -> list[float]:
        return [optimal_alie_tau(run, num_byzantine=args.f, num_workers=n, aggregate=aggregate) for run in honest]

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), h = {args.h}, f = {args.f}, d = {args.d}, "
        f"float32, grid of 41, max_elements = {args.max_elements}, best of {args.repeat}"
    )
    print(f"{'R':>3} {'batched s/run':>14} {'2-D loop s/run':>15} {'loop / batched':>15}  same factors")
    generator = torch.Generator().manual_seed(0)
    for runs in args.runs:
        honest = torch.randn(runs, args.h, args.d, generator=generator)
        best_batched = best_loop = float("inf")
        for _ in range(args.repeat):  # interleaved, so that drift hits both alike
            start = time.perf_counter()
            chosen = batched(honest)
            best_batched = min(best_batched, time.perf_counter() - start)
            start = time.perf_counter()
            expected = looped(honest)
            best_loop = min(best_loop, time.perf_counter() - start)
        same = chosen.tolist() == expected
        ratio = best_loop / best_batched
        print(f"{runs:>3} {best_batched / runs:>14.3f} {best_loop / runs:>15.3f} {ratio:>15.2f}  {same}")


if __name__ == "__main__":
    main()
