"""GPU checks and throughput: run on a machine with CUDA (`python benchmarks/gpu.py`).

1. The robust pipelines on CUDA: seconds per call at the benchmark sizes, against a clone floor.
2. The honest workers' gradients for the paper's CNN (10 workers, batch 25): the per-worker loop
   against one vmapped call (arcsim.engine.honest.BatchedWorkers), on CUDA and on one CPU thread.
3. The in-process engine on the default config for a few rounds: seconds per round on CUDA with
   and without batched workers, and on CPU (one thread).
Prints one JSON line per measurement; --json PATH writes them all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from arcsim.config import load_config
from arcsim.engine.honest import BatchedWorkers, HonestWorker, shards
from arcsim.engine.inproc import run_inproc
from arcsim.robust import build_pipeline
from arcsim.tasks import load_dataset

RESULTS: list[dict] = []


def emit(**fields) -> None:
    RESULTS.append(fields)
    print(json.dumps(fields), flush=True)


def timed(fn, *, device: torch.device, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def robust(device: torch.device) -> None:
    for n, d, f in ((13, 431080, 3), (19, 431080, 8), (256, 65536, 64)):
        x = torch.randn(n, d, device=device)
        floor = timed(lambda: x.clone(), device=device)
        for spec in ("arc > nnm > cwtm", "arc > nnm > geometric_median", "arc > nnm > multi_krum", "arc > nnm > cwmed"):
            pipeline = build_pipeline(spec, f=f)
            seconds = timed(lambda: pipeline(x), device=device)
            emit(
                check="robust",
                device=device.type,
                n=n,
                d=d,
                f=f,
                pipeline=spec,
                seconds=seconds,
                clone_seconds=floor,
                ratio_to_clone=seconds / floor,
            )


def workers(device: torch.device, config_path: str) -> None:
    config = load_config(config_path)
    dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
    shard_list = shards(config, dataset)

    def make() -> list[HonestWorker]:
        return [
            HonestWorker(config, i, device=device, dataset=dataset, shard_list=shard_list)
            for i in range(config.num_honest)
        ]

    looped, batched = make(), BatchedWorkers(make())
    params = torch.nn.utils.parameters_to_vector(looped[0].model.parameters()).detach().cpu()
    loop_s = timed(lambda: [w.step(params, 0) for w in looped], device=device)
    vmap_s = timed(lambda: batched.step(params, 0), device=device)
    emit(
        check="worker_gradients",
        device=device.type,
        workers=config.num_honest,
        batch=config.batch_size,
        loop_seconds=loop_s,
        vmap_seconds=vmap_s,
        vmap_speedup=loop_s / vmap_s,
    )


def engine(device: str, config_path: str, rounds: int, batch_workers: bool) -> None:
    config = load_config(config_path).replace(rounds=rounds, eval_every=rounds)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_inproc(config, Path(out), device=device, batch_workers=batch_workers)
        total = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(out) / "rounds.jsonl").read_text().splitlines()]
    per_round = statistics.median(r["round_seconds"] for r in records[1:-1])
    emit(
        check="inproc_engine",
        device=device,
        batch_workers=batch_workers,
        rounds=rounds,
        median_round_seconds=per_round,
        total_seconds=total,
        final_accuracy=summary["final_accuracy"],
        final_params_sha256=summary["final_params_sha256"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    emit(check="environment", torch=torch.__version__, cuda=cuda, gpu=torch.cuda.get_device_name(0) if cuda else None)
    devices = [torch.device("cuda")] if cuda else [torch.device("cpu")]
    for device in devices:
        robust(device)
        workers(device, args.config)
    if cuda:
        workers(torch.device("cpu"), args.config)
        engine("cuda", args.config, args.rounds, batch_workers=False)
        engine("cuda", args.config, args.rounds, batch_workers=True)
    engine("cpu", args.config, args.rounds, batch_workers=False)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
