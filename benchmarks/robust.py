"""Benchmark of arcsim.robust: every rule and the paper's pipelines, as ratios against baselines.

For every size (n, d) and every rule, in one process, on float32 CPU tensors:

- **arcsim**: the public function (``arc(x, f=f)``, ...) or ``build_pipeline(spec, f=f)``, the median of
  ``--repeats`` timed calls after a warm-up call;
- **floor**: what merely touching the data costs, measured in the same run and interleaved with the
  rule's own calls: ``x.clone()`` for rules that return (n, d) (the pre-aggregators; bucketing returns
  (n/s, d) and is held to the clone too) and ``x.sum(0)`` for rules that return (d,);
- **loop**: a straightforward per-worker Python-loop implementation of the same rule written here, on
  a list of numpy float32 vectors, the way many robust-aggregation libraries are written (norms one
  row at a time, pairwise distances in a double loop over pairs, neighbour averages one worker at a
  time, trimmed mean and median as a numpy sort along the worker axis). When the double loop has more
  pairs than ``--max-pairs``, only the first ``--max-pairs`` pairs are timed and the loop's time is
  extrapolated to all pairs (the output says so); the remaining distances are filled in untimed.
  A loop baseline slower than one second is timed once.

Every figure printed is a ratio or a time from this one process; ``max rel diff`` checks that arcsim
and the loop baseline agree (max |a - b| / max |b|). The script also splits NNM's time into its two
matrix products and the rest, and times the headline pipeline ``arc > nnm > cwtm`` with one thread.
``--before DIR`` also times an earlier copy of the arcsim/robust package, interleaved with the current
one, and reports the speed-up and the largest difference between their outputs.

    python benchmarks/robust.py                       # full run, 5 to 10 minutes on 2 cores
    python benchmarks/robust.py --quick               # smoke run on small sizes, one thread, well under 30 s
    python benchmarks/robust.py --threads 1 --json results.json --markdown tables.md
    git archive 537f257 arcsim/robust | tar -x -C /tmp/before
    python benchmarks/robust.py --before /tmp/before/arcsim/robust
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Sizes (n, d, f). f: 10 honest + 3 Byzantine workers is the paper's headline MNIST setting (d is the
# paper's CNN); 10 honest + 9 is just below the breakdown point 2f < n; n = 256 with a quarter Byzantine.
FULL_SIZES = ((13, 431_080, 3), (19, 431_080, 9), (256, 65_536, 64))
QUICK_SIZES = ((13, 43_108, 3), (19, 43_108, 9), (64, 8_192, 16))
PIPELINES = (
    "arc > nnm > cwtm",
    "arc > nnm > geometric_median",
    "arc > nnm > multi_krum",
    "arc > nnm > cwmed",
    "nnm > cwtm",
)
HEADLINE = "arc > nnm > cwtm"
STATIC_CLIP_C = 2.0
BUCKET_SIZE = 2
CENTERED_CLIP_TAU = 1.0
SEED = 2405_14432


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats: a smoke run")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch (and OpenBLAS) threads; default: torch's default, i.e. all cores "
        "(1 with --quick, which must stay fast on a busy machine)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per rule (default 7, quick 3)")
    parser.add_argument(
        "--max-pairs",
        type=int,
        default=None,
        help="pairs timed in a loop baseline's double loop before extrapolating (default 4096, quick 512)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as markdown to this file")
    parser.add_argument("--no-loop", action="store_true", help="skip the loop baselines")
    parser.add_argument("--device", default="cpu", help="torch device for arcsim (the loop baselines stay on CPU)")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a directory holding an earlier copy of the arcsim/robust package, timed against the "
        "current one in the same process, e.g. after "
        "`git archive 537f257 arcsim/robust | tar -x -C /tmp/before`: "
        "--before /tmp/before/arcsim/robust",
    )
    args = parser.parse_args(argv)
    if args.quick and args.threads is None:
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_pairs is not None and args.max_pairs < 1:
        parser.error(f"--max-pairs must be >= 1, got {args.max_pairs}")
    return args


# The thread count must reach OpenBLAS (numpy) before numpy is imported, so the heavy imports wait for
# the arguments.
ARGS = _parse_args(None) if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads is not None:
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_variable] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import arcsim.robust as robust  # noqa: E402
from arcsim.robust.arc import arc_num_clipped  # noqa: E402
from arcsim.seeding import generator  # noqa: E402

Vectors = list[np.ndarray]


def load_package(directory: Path) -> Any:
    """Import the package in ``directory`` (an arcsim/robust copy) under a name of its own."""
    init = directory / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--before {directory}: no __init__.py there")
    spec = importlib.util.spec_from_file_location(
        "arcsim_robust_before", init, submodule_search_locations=[str(directory)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(calls: dict[str, Callable[[], Any]], *, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each call, the calls taking turns (so that load changes hit all alike), after a warm-up."""
    for call in calls.values():
        call()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


@dataclass
class LoopClock:
    """Time a loop baseline may add for work it extrapolated instead of running (pairs not looped over)."""

    max_pairs: int
    extra_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def time_loop(run: Callable[[LoopClock], Any], *, repeats: int, max_pairs: int) -> tuple[float, Any, str]:
    """Median seconds of a loop baseline (one call if the first takes over a second), its output and notes."""
    samples = []
    output = None
    notes = ""
    for attempt in range(repeats + 1):
        clock = LoopClock(max_pairs=max_pairs)
        start = time.perf_counter()
        output = run(clock)
        seconds = time.perf_counter() - start + clock.extra_seconds
        notes = "; ".join(dict.fromkeys(clock.notes))
        if attempt == 0:
            if seconds > 1.0:
                return seconds, output, notes  # too slow to repeat: the single call is the sample
            continue  # warm-up
        samples.append(seconds)
    return statistics.median(samples), output, notes


# --------------------------------------------------------------------------------------------------
# Loop baselines: plain per-worker Python loops over numpy vectors, written for this benchmark
# --------------------------------------------------------------------------------------------------


def loop_sum(vectors: Vectors) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector
    return total


def loop_mean(vectors: Vectors) -> np.ndarray:
    return loop_sum(vectors) / len(vectors)


def loop_pairwise(vectors: Vectors, clock: LoopClock, *, squared: bool) -> np.ndarray:
    """(n, n) distances from a double loop over the pairs; past clock.max_pairs the loop is extrapolated."""
    n = len(vectors)
    dist = np.zeros((n, n))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    timed = pairs[: clock.max_pairs]
    start = time.perf_counter()
    for i, j in timed:
        diff = vectors[i] - vectors[j]
        value = float(np.dot(diff, diff))
        dist[i, j] = dist[j, i] = value if squared else value**0.5
    looped = time.perf_counter() - start
    if len(timed) < len(pairs):
        start = time.perf_counter()
        wide = np.stack(vectors).astype(np.float64)
        sq = np.einsum("ij,ij->i", wide, wide)
        full = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (wide @ wide.T), 0.0)
        if not squared:
            full = np.sqrt(full)
        mask = np.ones((n, n), dtype=bool)
        for i, j in timed:
            mask[i, j] = mask[j, i] = False
        np.fill_diagonal(mask, False)
        dist[mask] = full[mask]
        fill = time.perf_counter() - start
        clock.extra_seconds += looped * (len(pairs) / len(timed) - 1.0) - fill
        clock.notes.append(f"pair loop timed on {len(timed)} of {len(pairs)} pairs, extrapolated")
    return dist


def loop_clip(vectors: Vectors, threshold: float, norms: list[float]) -> Vectors:
    return [vector * min(1.0, threshold / norm) if norm > 0 else vector.copy() for vector, norm in zip(vectors, norms)]


def loop_arc(vectors: Vectors, f: int, clock: LoopClock) -> Vectors:
    n = len(vectors)
    k = arc_num_clipped(n, f)
    norms = [float(np.linalg.norm(vector)) for vector in vectors]
    if k == 0:
        return [vector.copy() for vector in vectors]
    threshold = sorted(norms, reverse=True)[k]
    return loop_clip(vectors, threshold, norms)


def loop_static_clip(vectors: Vectors, f: int, clock: LoopClock) -> Vectors:
    return loop_clip(vectors, STATIC_CLIP_C, [float(np.linalg.norm(vector)) for vector in vectors])


def loop_nnm(vectors: Vectors, f: int, clock: LoopClock) -> Vectors:
    n = len(vectors)
    dist = loop_pairwise(vectors, clock, squared=False)
    mixed = []
    for i in range(n):
        nearest = np.argsort(dist[i], kind="stable")[: n - f]
        mixed.append(loop_mean([vectors[j] for j in nearest]))
    return mixed


def loop_bucketing(vectors: Vectors, f: int, clock: LoopClock) -> Vectors:
    n = len(vectors)
    permutation = bucketing_permutation(n).tolist()
    return [loop_mean([vectors[j] for j in permutation[b : b + BUCKET_SIZE]]) for b in range(0, n, BUCKET_SIZE)]


def loop_cwtm(vectors: Vectors, f: int, clock: LoopClock) -> np.ndarray:
    n = len(vectors)
    return np.sort(np.stack(vectors), axis=0)[f : n - f].mean(axis=0)


def loop_cwmed(vectors: Vectors, f: int, clock: LoopClock) -> np.ndarray:
    return np.median(np.stack(vectors), axis=0)


def loop_geometric_median(vectors: Vectors, f: int, clock: LoopClock) -> np.ndarray:
    from arcsim.robust.geometric_median import DEFAULT_MAX_ITER, DEFAULT_NU, DEFAULT_TOL

    z = loop_mean(vectors)
    for _ in range(DEFAULT_MAX_ITER):
        weights = [1.0 / max(DEFAULT_NU, float(np.linalg.norm(vector - z))) for vector in vectors]
        total = sum(weights)
        z_next = np.zeros_like(z)
        for weight, vector in zip(weights, vectors):
            z_next += (weight / total) * vector
        step = float(np.linalg.norm(z_next - z))
        z = z_next
        if step <= DEFAULT_TOL * (1.0 + float(np.linalg.norm(z))):
            break
    return z


def loop_krum_scores(vectors: Vectors, f: int, clock: LoopClock) -> list[float]:
    n = len(vectors)
    dist = loop_pairwise(vectors, clock, squared=True).tolist()
    scores = []
    for i in range(n):
        others = sorted(dist[i][j] for j in range(n) if j != i)
        scores.append(sum(others[: n - f - 2]))
    return scores


def loop_krum(vectors: Vectors, f: int, clock: LoopClock) -> np.ndarray:
    scores = loop_krum_scores(vectors, f, clock)
    return vectors[min(range(len(vectors)), key=scores.__getitem__)].copy()


def loop_multi_krum(vectors: Vectors, f: int, clock: LoopClock) -> np.ndarray:
    scores = loop_krum_scores(vectors, f, clock)
    chosen = sorted(range(len(vectors)), key=scores.__getitem__)[: len(vectors) - f]
    return loop_mean([vectors[i] for i in chosen])


def loop_centered_clip(vectors: Vectors, f: int, clock: LoopClock) -> np.ndarray:
    centre = np.zeros_like(vectors[0])
    step = np.zeros_like(centre)
    for vector in vectors:
        diff = vector - centre
        norm = float(np.linalg.norm(diff))
        step += diff * min(1.0, CENTERED_CLIP_TAU / norm) if norm > 0 else diff
    return centre + step / len(vectors)


def loop_bulyan(vectors: Vectors, f: int, clock: LoopClock) -> np.ndarray:
    n = len(vectors)
    dist = loop_pairwise(vectors, clock, squared=True).tolist()
    available = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        remaining = len(available)
        # Same neighbour count as arcsim's Bulyan: remaining - f - 2, at least 2 while that many remain.
        neighbours = min(max(remaining - f - 2, 2), remaining - 1)
        best, best_score = available[0], float("inf")
        for i in available:
            score = sum(sorted(dist[i][j] for j in available if j != i)[:neighbours])
            if score < best_score:
                best, best_score = i, score
        chosen.append(best)
        available.remove(best)
    selected = np.stack([vectors[i] for i in chosen])
    beta = len(chosen) - 2 * f
    median = np.median(selected, axis=0)
    closest = np.argsort(np.abs(selected - median), axis=0, kind="stable")[:beta]
    return np.take_along_axis(selected, closest, axis=0).mean(axis=0)


def bucketing_permutation(n: int) -> torch.Tensor:
    """The permutation arcsim's bucketing draws from the benchmark's generator (shared with the loop)."""
    return torch.randperm(n, generator=generator(SEED, "bucketing"))


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    returns_matrix: bool  # (n, d) -> (m, d): floor is x.clone(); else (d,): floor is x.sum(0)
    run: Callable[[torch.Tensor, int], torch.Tensor]
    loop: Callable[[Vectors, int, LoopClock], Any]
    max_f: Callable[[int], int]  # the largest f the rule accepts for n rows


def _minority(n: int) -> int:
    return (n - 1) // 2


def _krum_max_f(n: int) -> int:
    return (n - 3) // 2


def _bulyan_max_f(n: int) -> int:
    return (n - 3) // 4


def _pipeline_case(spec: str, package: Any) -> Case:
    stages = robust.parse_spec(spec)
    loops = {
        "arc": loop_arc,
        "nnm": loop_nnm,
        "static_clip": loop_static_clip,
        "bucketing": loop_bucketing,
        "cwtm": loop_cwtm,
        "cwmed": loop_cwmed,
        "geometric_median": loop_geometric_median,
        "multi_krum": loop_multi_krum,
        "krum": loop_krum,
        "mean": lambda v, f, c: loop_mean(v),
    }
    pipelines: dict[int, Any] = {}

    def run(x: torch.Tensor, f: int) -> torch.Tensor:
        if f not in pipelines:
            pipelines[f] = package.build_pipeline(spec, f=f)
        return pipelines[f](x)[0]

    def loop(vectors: Vectors, f: int, clock: LoopClock) -> Any:
        for stage in stages:
            vectors = loops[stage](vectors, f, clock)
        return vectors

    krum_like = any(stage in ("krum", "multi_krum") for stage in stages)
    return Case(spec, False, run, loop, _krum_max_f if krum_like else _minority)


def cases(package: Any = robust) -> list[Case]:
    """The rules and pipelines, run by ``package`` (arcsim.robust, or an earlier copy of it: --before)."""
    r = package
    rules = [
        Case("arc", True, lambda x, f: r.arc(x, f=f), loop_arc, _minority),
        Case("static_clip (c=2)", True, lambda x, f: r.static_clip(x, c=STATIC_CLIP_C), loop_static_clip, lambda n: n),
        Case("nnm", True, lambda x, f: r.nnm(x, f=f), loop_nnm, _minority),
        Case(
            "bucketing (s=2)",
            True,
            lambda x, f: r.bucketing(x, s=BUCKET_SIZE, generator=generator(SEED, "bucketing")),
            loop_bucketing,
            lambda n: n,
        ),
        Case("mean", False, lambda x, f: r.mean(x), lambda v, f, c: loop_mean(v), lambda n: n),
        Case("cwtm", False, lambda x, f: r.cwtm(x, f=f), loop_cwtm, _minority),
        Case("cwmed", False, lambda x, f: r.cwmed(x), loop_cwmed, lambda n: n),
        Case("geometric_median", False, lambda x, f: r.geometric_median(x), loop_geometric_median, lambda n: n),
        Case("krum", False, lambda x, f: r.krum(x, f=f), loop_krum, _krum_max_f),
        Case("multi_krum", False, lambda x, f: r.multi_krum(x, f=f), loop_multi_krum, _krum_max_f),
        Case(
            "centered_clip (tau=1)",
            False,
            lambda x, f: r.centered_clip(x, tau=CENTERED_CLIP_TAU),
            loop_centered_clip,
            lambda n: n,
        ),
        Case("bulyan", False, lambda x, f: r.bulyan(x, f=f), loop_bulyan, _bulyan_max_f),
    ]
    return rules + [_pipeline_case(spec, package) for spec in PIPELINES]


def make_inputs(n: int, d: int, f: int) -> torch.Tensor:
    """n - f honest rows around a common mean (norm about 2, spread about 1) and f large Byzantine ones.

    The Byzantine rows point against the honest mean with 5 times its norm plus large noise, so ARC
    clips them; the first rows are Byzantine so that no rule can win by reading only the first rows.
    """
    g = generator(SEED, "inputs", n, d)
    scale = d**-0.5
    honest_mean = 2.0 * scale * torch.randn(d, generator=g)
    honest = honest_mean + scale * torch.randn(n - f, d, generator=g)
    byzantine = -5.0 * honest_mean + 5.0 * scale * torch.randn(f, d, generator=g)
    return torch.cat([byzantine, honest]).to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    rule: str
    f: int
    floor: str
    arcsim_s: float
    floor_s: float
    ratio_to_floor: float
    loop_s: float | None
    speedup_vs_loop: float | None
    max_rel_diff: float | None
    note: str
    before_s: float | None = None
    speedup_vs_before: float | None = None
    before_rel_diff: float | None = None


def _rel_diff(got: Any, want: Any) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def measure_size(
    n: int, d: int, f: int, *, repeats: int, max_pairs: int, loops: bool, device: torch.device, before: Any = None
) -> list[Row]:
    x_cpu = make_inputs(n, d, f)
    x = x_cpu.to(device)
    vectors = [row.copy() for row in x_cpu.numpy()]
    rows = []
    before_cases = cases(before) if before is not None else [None] * len(cases())
    for case, old in zip(cases(), before_cases):
        rule_f = min(f, case.max_f(n))
        floor_name = "x.clone()" if case.returns_matrix else "x.sum(0)"
        calls = {
            "floor": (lambda: x.clone()) if case.returns_matrix else (lambda: x.sum(dim=0)),
            "arcsim": lambda: case.run(x, rule_f),
        }
        if old is not None:
            calls["before"] = lambda: old.run(x, rule_f)
        timed = time_interleaved(calls, repeats=repeats, device=device)
        seconds, floor_seconds = timed["arcsim"], timed["floor"]
        loop_seconds = speedup = rel = None
        note = ""
        if loops:
            loop_seconds, expected, note = time_loop(
                lambda clock: case.loop(vectors, rule_f, clock), repeats=repeats, max_pairs=max_pairs
            )
            speedup = loop_seconds / seconds
            want = np.stack(expected) if isinstance(expected, list) else expected
            rel = _rel_diff(case.run(x, rule_f).cpu().numpy(), want)
        rows.append(
            Row(
                case.name,
                rule_f,
                floor_name,
                seconds,
                floor_seconds,
                seconds / floor_seconds,
                loop_seconds,
                speedup,
                rel,
                note,
            )
        )
        if old is not None:
            rows[-1].before_s = timed["before"]
            rows[-1].speedup_vs_before = timed["before"] / seconds
            rows[-1].before_rel_diff = _rel_diff(case.run(x, rule_f).cpu().numpy(), old.run(x, rule_f).cpu().numpy())
        print(format_row(rows[-1]), flush=True)
    return rows


def nnm_breakdown(n: int, d: int, f: int, *, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of NNM, of its Gram product y y^T (y: the centred rows) and of its mixing product."""
    x = make_inputs(n, d, f).to(device)
    y = x - x[0]
    mix = torch.zeros((n, n), dtype=x.dtype, device=device)
    nearest = torch.argsort(torch.rand((n, n), generator=generator(SEED, "mix")), dim=1)[:, : n - f].to(device)
    mix.scatter_(1, nearest, 1.0 / (n - f))
    timed = time_interleaved(
        {"nnm": lambda: robust.nnm(x, f=f), "gram": lambda: y @ y.T, "mixing": lambda: mix @ x},
        repeats=repeats,
        device=device,
    )
    total, gram, mixing = timed["nnm"], timed["gram"], timed["mixing"]
    return {
        "nnm_s": total,
        "gram_s": gram,
        "mixing_s": mixing,
        "rest_s": max(total - gram - mixing, 0.0),
        "matmul_share": min((gram + mixing) / total, 1.0),
    }


def headline_one_thread(
    sizes: Sequence[tuple[int, int, int]], *, repeats: int, device: torch.device, before: Any = None
) -> dict[str, dict[str, float]]:
    """Seconds of the headline pipeline per size with one torch thread (the thread count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for n, d, f in sizes:
            x = make_inputs(n, d, f).to(device)
            pipeline = robust.build_pipeline(HEADLINE, f=f)
            calls = {"floor": lambda: x.sum(dim=0), "arcsim": lambda: pipeline(x)}
            if before is not None:
                old = before.build_pipeline(HEADLINE, f=f)
                calls["before"] = lambda: old(x)
            timed = time_interleaved(calls, repeats=repeats, device=device)
            results[f"({n}, {d})"] = {
                "f": f,
                "seconds": timed["arcsim"],
                "floor_s": timed["floor"],
                "ratio_to_floor": timed["arcsim"] / timed["floor"],
                "before_s": timed.get("before"),
            }
        return results
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

HEADER = (
    f"{'rule':<30} {'f':>3} {'arcsim s':>9} {'floor':>9} {'floor s':>8} {'/floor':>7} {'loop s':>8} "
    f"{'speed-up':>9} {'rel diff':>8}"
)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _speedup(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def format_row(row: Row) -> str:
    text = (
        f"{row.rule:<30} {row.f:>3} {row.arcsim_s:>9.4f} {row.floor:>9} {row.floor_s:>8.4f} "
        f"{row.ratio_to_floor:>6.1f}x {_num(row.loop_s, '>8.4f')} {_speedup(row.speedup_vs_loop):>9} "
        f"{_num(row.max_rel_diff, '>8.1e')}"
    )
    if row.before_s is not None:
        text += f"  [before {row.before_s:.4f} s, {_speedup(row.speedup_vs_before)}, diff {row.before_rel_diff:.0e}]"
    return text + (f"  ({row.note})" if row.note else "")


def markdown(results: dict[str, Any]) -> str:
    meta = results["machine"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Machine: {meta['cpus']} CPUs ({meta['processor']}), torch {meta['torch']}, numpy {meta['numpy']}, "
        f"{meta['threads']} torch thread(s), {results['device']}, {results['date']}; load average "
        f"{results['load_average_before']:.1f} before and {results['load_average_after']:.1f} after the run.",
        "",
    ]
    for size in results["sizes"]:
        lines += [
            f"#### n = {size['n']}, d = {size['d']} (f = {size['f']} unless the rule needs less)",
            "",
            "| rule | f | arcsim (s) | floor | floor (s) | ratio to floor | loop baseline (s) | speed-up vs loop "
            "| max rel. diff |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for row in size["rows"]:
            loop = _num(row["loop_s"], ".4f") + (" \\*" if row["note"] else "")
            speedup = _speedup(row["speedup_vs_loop"])
            lines.append(
                f"| {row['rule']} | {row['f']} | {row['arcsim_s']:.4f} | `{row['floor']}` | {row['floor_s']:.4f} | "
                f"{row['ratio_to_floor']:.1f}x | {loop} | {speedup} | {_num(row['max_rel_diff'], '.0e')} |"
            )
        notes = sorted({row["note"] for row in size["rows"] if row["note"]})
        if notes:
            lines += ["", "\\* " + "; ".join(notes) + "."]
        lines.append("")
    lines += [
        "#### Where NNM's time goes",
        "",
        "| n, d, threads | NNM (s) | Gram y yᵀ (s) | mixing product (s) | rest (s) | matrix products' share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, value in results["nnm_breakdown"].items():
        lines.append(
            f"| {key} | {value['nnm_s']:.4f} | {value['gram_s']:.4f} | {value['mixing_s']:.4f} | "
            f"{value['rest_s']:.4f} | {100 * value['matmul_share']:.0f}% |"
        )
    with_before = results.get("before") is not None
    lines += [
        "",
        f"#### `{HEADLINE}` with one torch thread",
        "",
        "| n, d | f | seconds | floor `x.sum(0)` (s) | ratio to floor |" + (" before (s) |" if with_before else ""),
        "|---|---:|---:|---:|---:|" + ("---:|" if with_before else ""),
    ]
    for key, value in results["headline_one_thread"].items():
        lines.append(
            f"| {key} | {value['f']} | {value['seconds']:.4f} | {value['floor_s']:.4f} | "
            f"{value['ratio_to_floor']:.1f}x |" + (f" {value['before_s']:.4f} |" if with_before else "")
        )
    if with_before:
        lines += [
            "",
            f"#### Before and after (`--before {results['before']}`)",
            "",
            "| rule | "
            + " | ".join(f"n={size['n']}: before (s) | after (s) | speed-up" for size in results["sizes"])
            + " | max rel. diff |",
            "|---|" + "---:|---:|---:|" * len(results["sizes"]) + "---:|",
        ]
        for index, row in enumerate(results["sizes"][0]["rows"]):
            cells = []
            diff = 0.0
            for size in results["sizes"]:
                other = size["rows"][index]
                speedup = _speedup(other["speedup_vs_before"])
                cells.append(f"{other['before_s']:.4f} | {other['arcsim_s']:.4f} | {speedup}")
                diff = max(diff, other["before_rel_diff"])
            lines.append(f"| {row['rule']} | " + " | ".join(cells) + f" | {diff:.0e} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = args.repeats or (3 if args.quick else 7)
    max_pairs = args.max_pairs or (512 if args.quick else 4096)
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/robust.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "repeats": repeats,
        "max_pairs": max_pairs,
        "sizes": [],
        "load_average_before": os.getloadavg()[0],
    }
    print(
        f"arcsim.robust benchmark: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPUs, device {device}, median of {repeats} calls"
    )
    before = load_package(args.before) if args.before is not None else None
    results["before"] = str(args.before) if before is not None else None
    for n, d, f in sizes:
        print(f"\nn = {n}, d = {d}, f = {f} (a rule that needs less gets its largest valid f)\n{HEADER}", flush=True)
        rows = measure_size(
            n, d, f, repeats=repeats, max_pairs=max_pairs, loops=not args.no_loop, device=device, before=before
        )
        results["sizes"].append({"n": n, "d": d, "f": f, "rows": [asdict(row) for row in rows]})
    print("\nNNM: matrix products vs the rest")
    results["nnm_breakdown"] = {}
    threads = torch.get_num_threads()
    for thread_count in dict.fromkeys((threads, 1)):  # also with one thread, where that differs
        torch.set_num_threads(thread_count)
        for n, d, f in sizes:
            split = nnm_breakdown(n, d, f, repeats=repeats, device=device)
            split["threads"] = thread_count
            results["nnm_breakdown"][f"({n}, {d}), {thread_count} thread(s)"] = split
            print(
                f"  ({n}, {d}) f={f}, {thread_count} thread(s): nnm {split['nnm_s']:.4f} s = Gram "
                f"{split['gram_s']:.4f} + mixing {split['mixing_s']:.4f} + rest {split['rest_s']:.4f} "
                f"({100 * split['matmul_share']:.0f}% matrix products)"
            )
    torch.set_num_threads(threads)
    print(f"\n{HEADLINE} with 1 torch thread")
    results["headline_one_thread"] = headline_one_thread(sizes, repeats=repeats, device=device, before=before)
    for key, value in results["headline_one_thread"].items():
        was = "" if value["before_s"] is None else f"; before: {value['before_s']:.4f} s"
        print(f"  {key} f={value['f']}: {value['seconds']:.4f} s ({value['ratio_to_floor']:.1f}x x.sum(0)){was}")
    results["load_average_after"] = os.getloadavg()[0]
    print(
        f"\n1-minute load average: {results['load_average_before']:.1f} before, "
        f"{results['load_average_after']:.1f} after (other processes make the timings noisy)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown(results))
    return results


if __name__ == "__main__":
    main(ARGS)
