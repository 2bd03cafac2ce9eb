"""Benchmark of the in-process engine (``run_inproc``) against its floor, and of sweep parallelism.

``engine``: one process, one torch thread, configs/default.yaml (Fashion-MNIST, the paper's CNN, 10 honest
workers + 3 ALIE, ``arc > nnm > cwtm``, extreme heterogeneity, batch 25). ``run_inproc`` runs the rounds, and
its ``on_round`` callback (called once per round, after the round's checkpoint) runs, between two engine
rounds, one round of each floor, so the measurements interleave: engine, floors, engine, floors, ...

- **engine**: wall time from the end of one callback to the start of the next, i.e. one whole engine round:
  the workers' steps, the ALIE craft, ``RunState.close_round`` (pipeline, model step, rounds.jsonl,
  checkpoint). Round 0 (no previous callback), the warm-up rounds and the last round (it evaluates) are left out.
- **floor, bare**: the least work that gives the same bits: one model, the parameters loaded once, for each
  of the 10 honest workers its batch, ``forward``/``backward``, the flat gradient and the momentum update;
  then the ALIE craft, the same pipeline called directly, and the SGD step.
- **floor, steps**: the same with the engine's own worker objects: 10 ``HonestWorker.step`` calls and a
  ``Crafter``, then the pipeline and the SGD step.

Both floors start from the engine's parameters and momenta after round 0 and compute round t + 1 ahead of the
engine, so the benchmark also checks that the floors' parameters are bit-identical to the engine's.
Stage times inside the engine (worker steps, ``close_round``, ``checkpoint.save``) are taken by wrapping those
functions with timers in the same run. Ratios are medians of per-round times (engine / floor).

``profile``: ``cProfile`` over ``run_inproc`` (same config), the top functions by cumulative and own time.

``sweep``: ``arcsim sweep`` on a grid of ``--runs`` identical-cost runs (the default config with fewer rounds,
seeds 1..runs) with ``--jobs 1`` and ``--jobs 2``, interleaved (1, 2, 1, 2, ...), each into a fresh folder:
rounds per second in aggregate (wall time of the whole ``arcsim sweep`` command, setup and evaluation
included) and the CPU seconds its processes used per wall second (how many cores it kept busy).

    python benchmarks/inproc.py engine --rounds 40
    python benchmarks/inproc.py profile --rounds 20
    python benchmarks/inproc.py sweep --runs 4 --rounds 15 --repeats 2
    python benchmarks/inproc.py engine --quick          # smoke run: 6 rounds, a few seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: every measured process uses one thread

import argparse
import cProfile
import functools
import io
import json
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from arcsim.attacks import craft  # noqa: E402
from arcsim.config import RunConfig, load_config  # noqa: E402
from arcsim.engine import checkpoint  # noqa: E402
from arcsim.engine.byzantine import Crafter  # noqa: E402
from arcsim.engine.honest import HonestWorker, build_task_model, shards  # noqa: E402
from arcsim.engine.inproc import run_inproc  # noqa: E402
from arcsim.engine.rounds import RoundRecord, RunState  # noqa: E402
from arcsim.robust import build_pipeline  # noqa: E402
from arcsim.seeding import generator  # noqa: E402
from arcsim.tasks import load_dataset  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
TARGET_RATIO = 1.15


def bench_config(path: Path, rounds: int) -> RunConfig:
    """The config with ``rounds`` rounds, evaluated only after the last one."""
    return load_config(path, overrides={"rounds": rounds, "eval_every": rounds})


# --- floors ----------------------------------------------------------------------------------------------------
class BareFloor:
    """One round with nothing around it: shared model, fwd/bwd per worker, momentum, ALIE, pipeline, SGD step."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
        shard_list = shards(config, dataset)
        self.xs = [dataset.train_x[s] for s in shard_list]
        self.ys = [dataset.train_y[s] for s in shard_list]
        self.model = build_task_model(config, dataset)
        self.params_list = list(self.model.parameters())
        self.pipeline = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)
        self.last_vectors: list[torch.Tensor] = []
        self.parts: dict[str, list[float]] = {}  # seconds of each part of each round

    def start(self, momenta: dict[int, torch.Tensor]) -> None:
        self.last_vectors = [momenta[i].clone() for i in range(self.config.num_honest)]

    def _part(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.parts.setdefault(name, []).append(now - since)
        return now

    def round(self, params: torch.Tensor, t: int) -> torch.Tensor:
        config = self.config
        beta = config.momentum
        start = time.perf_counter()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(params, self.params_list)
        for i in range(config.num_honest):
            size = self.ys[i].shape[0]
            batch = torch.randperm(size, generator=generator(config.seed, "batch", t, i))[: config.batch_size]
            for p in self.params_list:
                p.grad = None
            F.nll_loss(self.model(self.xs[i][batch]), self.ys[i][batch]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in self.params_list])
            self.last_vectors[i].mul_(beta).add_(grad, alpha=1.0 - beta)
        start = self._part("10 x (batch, forward, backward, flat gradient, momentum)", start)
        honest = torch.stack(self.last_vectors)
        byz = craft(
            config.attack,
            honest,
            num_byzantine=config.num_byzantine,
            num_workers=config.num_workers,
            aggregate=lambda x: self.pipeline(x)[0],
            generator=generator(config.seed, "attack", t),
            **config.attack_params,
        )
        start = self._part("stack + ALIE craft", start)
        aggregate, report = self.pipeline(torch.cat([honest, byz]))
        for stage in report.stages:
            self.parts.setdefault(f"pipeline stage {stage.name}", []).append(stage.seconds)
        start = self._part("cat + pipeline (all stages)", start)
        new = params.sub(aggregate.add(params, alpha=config.weight_decay), alpha=config.lr_at(t))
        self._part("SGD step", start)
        return new


class StepsFloor:
    """One round with the engine's worker objects: HonestWorker.step x h, a Crafter, the pipeline, SGD step."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
        shard_list = shards(config, dataset)
        self.workers = [
            HonestWorker(config, i, dataset=dataset, shard_list=shard_list) for i in range(config.num_honest)
        ]
        self.crafter = Crafter(config)
        self.pipeline = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)

    def start(self, momenta: dict[int, torch.Tensor]) -> None:
        for w in self.workers:
            w.set_momentum(momenta[w.worker_id])

    def round(self, params: torch.Tensor, t: int) -> torch.Tensor:
        config = self.config
        honest = torch.stack([w.step(params, t) for w in self.workers])
        byz = self.crafter.craft_all(honest, t)
        aggregate, _ = self.pipeline(torch.cat([honest, byz]))
        return params.sub(aggregate.add(params, alpha=config.weight_decay), alpha=config.lr_at(t))


# --- timers around engine functions -----------------------------------------------------------------------------
class Timed:
    """Replace ``owner.name`` with a wrapper that appends each call's seconds to ``self.seconds``."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name
        self.original = getattr(owner, name)
        self.calls: list[tuple[float, float]] = []  # (start, seconds) of each call
        original = self.original

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append((start, time.perf_counter() - start))

        setattr(owner, name, wrapper)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.original)

    def per_interval(self, intervals: list[tuple[float, float]]) -> list[float]:
        """Seconds spent in calls that started inside each (start, end) interval."""
        return [sum(s for at, s in self.calls if begin <= at < end) for begin, end in intervals]


def median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values) if values else float("nan")


# --- engine vs floor ----------------------------------------------------------------------------------------------
def time_components(
    state: RunState, folder: Path, out: dict[str, list[float]], save: Callable[..., Any] = checkpoint.save
) -> None:
    """Seconds of the engine's own work besides the floor's, on this round's tensors (same process)."""
    h = state.config.num_honest
    vectors = [state.last_vectors[i] for i in sorted(state.last_vectors)]
    x = torch.stack(vectors)

    def clock(name: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        fn()
        out.setdefault(name, []).append(time.perf_counter() - start)

    values = {"round": state.round, "momentum_ids": sorted(state.last_vectors)}
    tensors = {"params": state.params, **{f"momentum/{i}": m for i, m in sorted(state.last_vectors.items())}}
    clock("checkpoint.save (24 MB: CRC-32, write, fsync)", lambda: save(folder, "c.safetensors", values, tensors))
    clock("finite test, isfinite(v).all() x n", lambda: [bool(torch.isfinite(v).all()) for v in vectors])
    clock("finite test, isfinite(v.sum()) x n", lambda: [bool(torch.isfinite(v.sum())) for v in vectors])
    clock("stack of the n vectors", lambda: torch.stack(vectors))
    clock("row norms", lambda: torch.linalg.vector_norm(x, dim=1).tolist())
    clock("honest mean, stack + mean", lambda: torch.stack(vectors[:h]).mean(dim=0))
    clock("honest mean, x[:h].mean", lambda: x[:h].mean(dim=0))
    record = json.dumps({"round": state.round, "values": list(range(20))})

    def append() -> None:
        with open(folder / "rounds.jsonl", "a") as handle:
            handle.write(record + "\n")

    clock("rounds.jsonl append", append)


def bench_engine(config_path: Path, *, rounds: int, warmup: int, checkpoint_seconds: float | None) -> dict[str, Any]:
    config = bench_config(config_path, rounds)
    components: dict[str, list[float]] = {}
    bare, steps = BareFloor(config), StepsFloor(config)
    engine_s: list[float] = []
    engine_cpu: list[float] = []
    bare_cpu: list[float] = []
    last_end_cpu = [0.0]
    intervals: list[tuple[float, float]] = []  # (start, end) of each measured engine round
    bare_s: list[float] = []
    steps_s: list[float] = []
    mismatches: list[str] = []
    expected: dict[str, torch.Tensor] = {}
    last_end = [0.0]
    timers = [Timed(RunState, "close_round"), Timed(checkpoint, "save"), Timed(HonestWorker, "step")]

    def on_round(state: RunState, record: RoundRecord) -> None:
        begin = time.perf_counter()
        begin_cpu = time.process_time()
        t = record.round
        if t == 0:
            bare.start(state.last_vectors)
            steps.start(state.last_vectors)
        else:
            for name, predicted in expected.items():
                if not torch.equal(predicted, state.params):
                    mismatches.append(f"{name} floor differs from the engine after round {t}")
            if warmup < t < rounds - 1:  # the last round evaluates
                engine_s.append(begin - last_end[0])
                engine_cpu.append(begin_cpu - last_end_cpu[0])
                intervals.append((last_end[0], begin))
        if t + 1 < rounds:  # the floors compute round t + 1 at the engine's parameters after round t
            params = state.params
            start, start_cpu = time.perf_counter(), time.process_time()
            expected["bare"] = bare.round(params, t + 1)
            middle, middle_cpu = time.perf_counter(), time.process_time()
            expected["steps"] = steps.round(params, t + 1)
            end = time.perf_counter()
            if warmup < t + 1 < rounds - 1:
                bare_s.append(middle - start)
                bare_cpu.append(middle_cpu - start_cpu)
                steps_s.append(end - middle)
        if warmup < t < rounds - 1:
            time_components(state, scratch, components, save=timers[1].original)
        last_end[0] = time.perf_counter()
        last_end_cpu[0] = time.process_time()

    torch.manual_seed(0)
    extra = {} if checkpoint_seconds is None else {"checkpoint_seconds": checkpoint_seconds}
    with tempfile.TemporaryDirectory(prefix="arcsim-bench-inproc-") as tmp:
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        try:
            run_inproc(config, Path(tmp) / "run", on_round=on_round, **extra)
        finally:
            for timer in timers:
                timer.restore()
    # close_round, checkpoint.save and worker steps inside the measured engine rounds (the floors' calls
    # happen in the callback, outside these intervals).
    close, save, step = (timer.per_interval(intervals) for timer in timers)
    saves_in_run = len(timers[1].calls)
    result = {
        "config": str(config_path),
        "rounds": rounds,
        "warmup": warmup,
        "measured_rounds": len(engine_s),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "engine_ms": median_ms(engine_s),
        "floor_bare_ms": median_ms(bare_s),
        "floor_steps_ms": median_ms(steps_s),
        "ratio_bare": statistics.median(e / b for e, b in zip(engine_s, bare_s)),
        "ratio_bare_of_medians": statistics.median(engine_s) / statistics.median(bare_s),
        "ratio_bare_of_sums": sum(engine_s) / sum(bare_s),
        "engine_cpu_ms": median_ms(engine_cpu),
        "floor_bare_cpu_ms": median_ms(bare_cpu),
        "ratio_bare_cpu": statistics.median(engine_cpu) / statistics.median(bare_cpu),
        "ratio_steps": statistics.median(e / s for e, s in zip(engine_s, steps_s)),
        "engine_worker_steps_ms": median_ms(step),
        "engine_close_round_ms": median_ms(close),
        "engine_checkpoint_save_ms_mean": 1000.0 * statistics.fmean(save) if save else float("nan"),
        "engine_checkpoints_written": saves_in_run,
        "checkpoint_seconds": "run_inproc default" if checkpoint_seconds is None else checkpoint_seconds,
        "components_ms": {name: median_ms(values) for name, values in components.items()},
        "floor_parts_ms": {name: median_ms(values[warmup + 1 :]) for name, values in bare.parts.items()},
        "bit_identical": not mismatches,
        "mismatches": mismatches[:5],
        "engine_ms_all": [round(1000 * s, 2) for s in engine_s],
        "floor_bare_ms_all": [round(1000 * s, 2) for s in bare_s],
    }
    return result


def print_engine(result: dict[str, Any]) -> None:
    print(
        f"in-process engine vs floor: {result['config']}, {result['measured_rounds']} measured rounds, "
        f"{result['torch_threads']} torch thread(s), torch {result['torch']}"
    )
    print(f"  engine round           {result['engine_ms']:8.1f} ms (median)")
    print(f"    worker steps (10)    {result['engine_worker_steps_ms']:8.1f} ms")
    print(f"    close_round          {result['engine_close_round_ms']:8.1f} ms")
    print(f"      checkpoint.save    {result['engine_checkpoint_save_ms_mean']:8.1f} ms (mean per round)")
    print(f"  floor, bare            {result['floor_bare_ms']:8.1f} ms")
    print(f"  floor, worker steps    {result['floor_steps_ms']:8.1f} ms")
    held = "held" if result["ratio_bare"] <= TARGET_RATIO else "NOT held"
    print(
        f"  engine / bare floor    {result['ratio_bare']:8.3f}x  (median of per-round ratios; target "
        f"<= {TARGET_RATIO}x: {held})"
    )
    print(f"  engine / steps floor   {result['ratio_steps']:8.3f}x")
    print(
        f"  engine / bare floor, ratio of medians {result['ratio_bare_of_medians']:.3f}x, of sums "
        f"{result['ratio_bare_of_sums']:.3f}x"
    )
    print(
        f"  CPU time of this process: engine {result['engine_cpu_ms']:.1f} ms, bare floor "
        f"{result['floor_bare_cpu_ms']:.1f} ms per round: {result['ratio_bare_cpu']:.3f}x"
    )
    print(f"  floors bit-identical to the engine: {result['bit_identical']} {' '.join(result['mismatches'])}")
    print(
        f"  checkpoint_seconds: {result['checkpoint_seconds']}; checkpoints written: "
        f"{result['engine_checkpoints_written']} in {result['rounds']} rounds"
    )
    print("  the bare floor's parts (median ms per round):")
    for name, value in result["floor_parts_ms"].items():
        print(f"    {name:55s} {value:8.2f}")
    print("  the engine's own work besides the floor's, timed in the same rounds (median ms per round):")
    for name, value in result["components_ms"].items():
        print(f"    {name:45s} {value:8.2f}")


# --- profile --------------------------------------------------------------------------------------------------
def profile_engine(config_path: Path, *, rounds: int, top: int) -> str:
    config = bench_config(config_path, rounds)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="arcsim-bench-profile-") as tmp:
        profiler.enable()
        run_inproc(config, Path(tmp) / "run")
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# --- sweep parallelism ------------------------------------------------------------------------------------------
def sweep_text(config_path: Path, *, runs: int, rounds: int) -> str:
    config = bench_config(config_path, rounds).to_dict()
    config["seed"] = list(range(1, runs + 1))
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def time_sweep(sweep_file: Path, out: Path, jobs: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all processes of the sweep) of one ``arcsim sweep`` command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "arcsim", "sweep", str(sweep_file), "--jobs", str(jobs), "--out", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def bench_sweep(config_path: Path, *, runs: int, rounds: int, repeats: int) -> dict[str, Any]:
    results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="arcsim-bench-sweep-") as tmp:
        sweep_file = Path(tmp) / "grid.yaml"
        sweep_file.write_text(sweep_text(config_path, runs=runs, rounds=rounds))
        for repeat in range(repeats):
            for jobs in (1, 2):
                wall, cpu = time_sweep(sweep_file, Path(tmp) / f"out-{repeat}-{jobs}", jobs)
                results[jobs].append((wall, cpu))
                print(
                    f"  repeat {repeat}, --jobs {jobs}: {wall:6.1f} s wall, {cpu:6.1f} CPU s, "
                    f"{runs * rounds / wall:5.2f} rounds/s, {cpu / wall:4.2f} cores busy",
                    flush=True,
                )
    summary: dict[str, Any] = {"runs": runs, "rounds": rounds, "repeats": repeats}
    for jobs, values in results.items():
        walls = [w for w, _ in values]
        summary[f"jobs{jobs}_wall_s"] = statistics.median(walls)
        summary[f"jobs{jobs}_rounds_per_s"] = runs * rounds / statistics.median(walls)
        summary[f"jobs{jobs}_cores_busy"] = statistics.median(c / w for w, c in values)
    summary["speedup"] = statistics.median(w1 / w2 for (w1, _), (w2, _) in zip(results[1], results[2]))
    return summary


def print_sweep(summary: dict[str, Any]) -> None:
    print(
        f"arcsim sweep, {summary['runs']} identical-cost runs x {summary['rounds']} rounds, "
        f"{summary['repeats']} interleaved repeats (medians):"
    )
    for jobs in (1, 2):
        print(
            f"  --jobs {jobs}: {summary[f'jobs{jobs}_wall_s']:6.1f} s wall, "
            f"{summary[f'jobs{jobs}_rounds_per_s']:5.2f} rounds/s, "
            f"{summary[f'jobs{jobs}_cores_busy']:4.2f} cores busy"
        )
    print(f"  speedup --jobs 2 / --jobs 1: {summary['speedup']:.2f}x")


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "loadavg": [round(v, 2) for v in load],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("engine", "profile", "sweep"))
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--rounds", type=int, help="engine: 40, profile: 20, sweep: 15 rounds per run")
    parser.add_argument("--warmup", type=int, default=2, help="engine: rounds left out after round 0")
    parser.add_argument("--runs", type=int, default=4, help="sweep: runs in the grid")
    parser.add_argument("--repeats", type=int, default=2, help="sweep: interleaved repeats of jobs 1 and 2")
    parser.add_argument("--top", type=int, default=25, help="profile: functions listed")
    parser.add_argument(
        "--checkpoint-seconds",
        type=float,
        help="engine: passed to run_inproc (0: a checkpoint after every round; default: its default)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run with few rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {machine()}", flush=True)
    result: dict[str, Any] = {"mode": args.mode, "machine": machine()}
    if args.mode == "engine":
        rounds = args.rounds or (6 if args.quick else 40)
        warmup = min(args.warmup, 1) if args.quick else args.warmup
        result.update(
            bench_engine(args.config, rounds=rounds, warmup=warmup, checkpoint_seconds=args.checkpoint_seconds)
        )
        print_engine(result)
    elif args.mode == "profile":
        text = profile_engine(args.config, rounds=args.rounds or (4 if args.quick else 20), top=args.top)
        print(text)
        result["profile"] = text
    else:
        summary = bench_sweep(
            args.config,
            runs=2 if args.quick else args.runs,
            rounds=args.rounds or (3 if args.quick else 15),
            repeats=1 if args.quick else args.repeats,
        )
        print_sweep(summary)
        result.update(summary)
    result["machine_after"] = machine()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
