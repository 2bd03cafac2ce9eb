"""A quick look at the robust library alone: the robustness error of pipelines with and without ARC.

Honest vectors are drawn around a common mean with heterogeneous offsets (as heterogeneous workers'
gradients are); Byzantine vectors come from real attacks (arcsim.attacks) that see the honest
ones. The table shows ||F(x) - mean of the honest vectors|| for each pipeline and attack (lower is
better), averaged over seeds. Run: ``python -m arcsim.demo`` (``make demo-robust``).
"""

from __future__ import annotations

import argparse

import torch

from arcsim.attacks import craft
from arcsim.robust import build_pipeline
from arcsim.seeding import generator

PIPELINES = (
    "mean",
    "cwtm",
    "nnm > cwtm",
    "arc > nnm > cwtm",
    "nnm > geometric_median",
    "arc > nnm > geometric_median",
    "nnm > multi_krum",
    "arc > nnm > multi_krum",
    "static_clip > nnm > cwtm",
)
DEMO_ATTACKS = ("sign_flip", "foe", "alie", "optimal_alie", "mimic")


def honest_vectors(num_honest: int, dim: int, *, heterogeneity: float, seed: int) -> torch.Tensor:
    g = generator(seed, "demo")
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    offsets = heterogeneity * torch.randn(num_honest, dim, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(num_honest, dim, generator=g, dtype=torch.float64)
    return (common + offsets + noise) / dim**0.5


def table(*, num_honest: int, f: int, dim: int, heterogeneity: float, seeds: int) -> str:
    n = num_honest + f
    rows = []
    for spec in PIPELINES:
        params = {"c": 2.0} if "static_clip" in spec else {}
        pipeline = build_pipeline(spec, f=f, **params)
        errors = []
        for attack in DEMO_ATTACKS:
            total = 0.0
            for seed in range(seeds):
                honest = honest_vectors(num_honest, dim, heterogeneity=heterogeneity, seed=seed)
                byz = craft(
                    attack,
                    honest,
                    num_byzantine=f,
                    num_workers=n,
                    aggregate=lambda x: pipeline(x)[0],
                    generator=generator(seed, "noise"),
                )
                aggregate, _ = pipeline(torch.cat([honest, byz]))
                total += float(torch.linalg.vector_norm(aggregate - honest.mean(dim=0)))
            errors.append(total / seeds)
        rows.append((spec, errors))
    width = max(len(spec) for spec in PIPELINES)
    lines = [
        f"robustness error ||F(x) - honest mean||, {num_honest} honest + {f} Byzantine, d = {dim}, "
        f"heterogeneity {heterogeneity}, mean of {seeds} seeds (lower is better)",
        "",
        f"{'pipeline':<{width}}  " + "  ".join(f"{a:>12}" for a in DEMO_ATTACKS) + f"  {'worst':>8}",
    ]
    for spec, errors in rows:
        lines.append(f"{spec:<{width}}  " + "  ".join(f"{e:>12.4f}" for e in errors) + f"  {max(errors):>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-honest", type=int, default=10)
    parser.add_argument("--f", type=int, default=3)
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--heterogeneity", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for f in sorted({args.f, max((args.num_honest - 1) // 2, 1)}):
        print(table(num_honest=args.num_honest, f=f, dim=args.dim, heterogeneity=args.heterogeneity, seeds=args.seeds))
        print()


if __name__ == "__main__":
    main()
