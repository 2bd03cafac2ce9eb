"""Benchmark of arcsim.robust's batched pipelines: one call on (..., n, d) against the 2-D call looped.

For each pipeline and batch shape it prints the time per element of the batched call and of the 2-D
call looped over the elements (best of ``--repeat`` runs each, interleaved), and their ratio, with 1
thread and with 2 threads (torch.set_num_threads), in one process. The paper's case is n = 13 rows
of d = 431,080 float32 coordinates (the CNN's parameters) and f = 3: R runs in lockstep (R, 13, d),
and a line search over T candidate attacks per run (R, T, 13, d).

    python benchmarks/robust_batched.py                 # the paper's shapes
    python benchmarks/robust_batched.py --d 50000       # smaller, quicker
"""

from __future__ import annotations

import argparse
import time

import torch

from arcsim.robust import build_pipeline

SPECS = ("arc > nnm > cwtm", "nnm > cwmed", "arc > nnm > geometric_median", "arc > nnm > multi_krum")
SHAPES = ((1,), (4,), (8,), (4, 4))


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=13)
    parser.add_argument("--d", type=int, default=431_080)
    parser.add_argument("--f", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument(
        "--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES], help="batch shapes such as 8 or 4x4"
    )
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, n = {args.n}, d = {args.d}, f = {args.f}, float32, best of {args.repeat}")
    print(f"{'threads':>7}  {'pipeline':<30} {'batch':<8} {'batched ms/el':>13} {'loop ms/el':>11} {'ratio':>6}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for spec in args.specs:
            pipeline = build_pipeline(spec, f=args.f)
            for shape in (tuple(int(k) for k in text.split("x")) for text in args.shapes):
                x = torch.randn(*shape, args.n, args.d, generator=generator)
                x[..., : args.f, :] *= 10.0  # the Byzantine rows: larger, so ARC clips them
                elements = x.reshape(-1, args.n, args.d)
                count = elements.shape[0]
                pipeline(x), pipeline(elements[0])  # warm up (allocator, caches)
                batched = loop = float("inf")
                for _ in range(args.repeat):  # interleaved, so that drift hits both alike
                    batched = min(batched, best_of(1, lambda: pipeline(x)))
                    loop = min(loop, best_of(1, lambda: [pipeline(e) for e in elements]))
                print(
                    f"{threads:>7}  {spec:<30} {'x'.join(map(str, shape)):<8} {1e3 * batched / count:>13.1f} "
                    f"{1e3 * loop / count:>11.1f} {loop / batched:>6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
