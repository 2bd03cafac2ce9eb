"""Tests of the Byzantine worker (arcsim/engine/byzantine.py): label flipping, collusion, cross-process agreement."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from arcsim.adversaries.service import Collusion
from arcsim.attacks import ATTACKS, craft
from arcsim.config import RunConfig, from_dict
from arcsim.engine.byzantine import ByzantineWorker, Crafter
from arcsim.engine.honest import HonestWorker, build_task_model, shards
from arcsim.robust import build_pipeline
from arcsim.seeding import generator
from arcsim.tasks import load_dataset

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


def _config(**changes: object) -> RunConfig:
    base = {
        "task": "synthetic",
        "model": "logreg",
        "partitioner": "iid",
        "num_honest": 4,
        "num_byzantine": 1,
        "attack": "sign_flip",
        "batch_size": 8,
        "momentum": 0.5,
        "seed": 3,
    }
    return from_dict({**base, **changes})


def _honest(config: RunConfig, d: int, *, seed: int = 0) -> Tensor:
    return torch.randn((config.num_honest, d), generator=torch.Generator().manual_seed(seed))


def _params(config: RunConfig) -> Tensor:
    dataset = load_dataset(config.task, seed=config.seed)
    model = build_task_model(config, dataset)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


# --- label flipping -------------------------------------------------------------------------------
def test_label_flip_trains_on_flipped_labels_of_shard_id_minus_h_mod_h() -> None:
    # Prepare: 3 honest, 4 Byzantine (declared f = 1), so Byzantine ids 3..6 use shards 0, 1, 2, 0.
    config = _config(num_honest=3, num_byzantine=4, declared_f=1, attack="label_flip")
    dataset = load_dataset(config.task, seed=config.seed)
    shard_list = shards(config, dataset)
    # Execute
    workers = [ByzantineWorker(config, i) for i in range(3, 7)]
    # Assert
    for worker, shard_index in zip(workers, (0, 1, 2, 0)):
        shard = shard_list[shard_index]
        assert not worker.needs_observation
        assert worker.trainer is not None
        assert torch.equal(worker.trainer._x, dataset.train_x[shard])
        assert torch.equal(worker.trainer._y, 9 - dataset.train_y[shard])


def test_label_flip_vector_is_the_momentum_of_the_flipped_loss() -> None:
    # Prepare: the same computation written out by hand for worker 4 (shard 0), rounds 0 and 1.
    config = _config(num_honest=4, num_byzantine=1, attack="label_flip")
    dataset = load_dataset(config.task, seed=config.seed)
    shard = shards(config, dataset)[0]
    x, y = dataset.train_x[shard], 9 - dataset.train_y[shard]
    model = build_task_model(config, dataset)
    params = _params(config)
    beta = config.momentum

    def gradient(round_: int, theta: Tensor) -> Tensor:
        batch = torch.randperm(len(shard), generator=generator(config.seed, "batch", round_, 4))[: config.batch_size]
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
        model.zero_grad()
        F.nll_loss(model(x[batch]), y[batch]).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    theta_1 = params - 0.1
    expected_0 = (1 - beta) * gradient(0, params)
    expected_1 = beta * expected_0 + (1 - beta) * gradient(1, theta_1)
    worker = ByzantineWorker(config, 4)
    # Execute
    got_0 = worker.vector(params=params, round_=0, honest=None)
    got_1 = worker.vector(params=theta_1, round_=1, honest=None)
    # Assert
    torch.testing.assert_close(got_0, expected_0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_1, expected_1, rtol=1e-5, atol=1e-7)
    assert worker.last_loss == worker.last_loss  # a number, not NaN


def test_a_data_attack_plugin_is_a_label_map_the_worker_trains_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: label flipping written again as a plugin's data attack, with a parameter of its own
    (tmp_path / "flip_plugin.py").write_text(
        textwrap.dedent("""
        from arcsim.attacks import data_attack

        @data_attack
        def flip(labels, *, num_classes, offset=0):
            return (num_classes - 1 - labels + offset) % num_classes
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    builtin = _config(num_honest=4, num_byzantine=1, attack="label_flip")
    plugin = _config(num_honest=4, num_byzantine=1, attack="flip_plugin:flip", attack_params={"offset": 0})
    shifted = _config(num_honest=4, num_byzantine=1, attack="flip_plugin:flip", attack_params={"offset": 1})
    params = _params(builtin)

    # Execute
    workers = [ByzantineWorker(config, 4) for config in (builtin, plugin, shifted)]
    vectors = [worker.vector(params=params, round_=0, honest=None) for worker in workers]

    # Assert: no observation needed; the same labels give the same bits, other labels another vector
    assert not any(worker.needs_observation for worker in workers)
    assert torch.equal(vectors[0], vectors[1])
    assert torch.equal(workers[2].trainer._y, (workers[0].trainer._y + 1) % 10)
    assert not torch.equal(vectors[0], vectors[2])


def test_label_flip_differs_from_the_honest_worker_of_the_same_shard() -> None:
    config = _config(num_honest=4, num_byzantine=1, attack="label_flip")
    params = _params(config)
    honest = HonestWorker(config, 0).step(params, 0)
    byzantine = ByzantineWorker(config, 4).vector(params=params, round_=0, honest=None)
    assert not torch.allclose(honest, byzantine)


def test_label_flip_momentum_restored_continues_bitwise() -> None:
    # A restarted Byzantine worker that gets its momentum back computes the same next vector.
    config = _config(attack="label_flip")
    params = _params(config)
    uninterrupted = ByzantineWorker(config, 4)
    after_round_0 = uninterrupted.vector(params=params, round_=0, honest=None)
    expected = uninterrupted.vector(params=params * 0.5, round_=1, honest=None)
    restarted = ByzantineWorker(config, 4)
    # Execute
    restarted.set_momentum(after_round_0)
    got = restarted.vector(params=params * 0.5, round_=1, honest=None)
    # Assert
    assert torch.equal(got, expected)


# --- colluding workers ------------------------------------------------------------------------------
def test_colluding_workers_submit_the_rows_of_one_crafted_matrix() -> None:
    # Prepare: Gaussian noise makes every row different, so the row each worker takes is visible.
    config = _config(num_honest=4, num_byzantine=2, attack="gaussian")
    honest = _honest(config, 6)
    crafter = Crafter(config)
    expected = craft("gaussian", honest, num_byzantine=2, num_workers=6, generator=generator(config.seed, "attack", 5))
    # Execute
    got = [
        ByzantineWorker(config, i, crafter=crafter).vector(params=torch.zeros(6), round_=5, honest=honest)
        for i in (4, 5)
    ]
    # Assert
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], got[1])


def test_workers_with_their_own_crafters_agree_with_a_shared_one() -> None:
    # The gRPC engine gives each adversary process its own Crafter; inproc shares one.
    config = _config(num_honest=4, num_byzantine=2, attack="gaussian")
    honest = _honest(config, 6)
    shared = Crafter(config)
    for worker_id in (4, 5):
        own = ByzantineWorker(config, worker_id).vector(params=torch.zeros(6), round_=2, honest=honest)
        together = ByzantineWorker(config, worker_id, crafter=shared).vector(
            params=torch.zeros(6), round_=2, honest=honest
        )
        assert torch.equal(own, together)


def test_optimal_attack_searches_against_the_configured_pipeline() -> None:
    config = _config(num_honest=4, num_byzantine=1, attack="optimal_alie", pipeline="arc > nnm > cwtm")
    honest = _honest(config, 5)
    pipeline = build_pipeline(config.pipeline, f=config.f)
    expected = craft("optimal_alie", honest, num_byzantine=1, num_workers=5, aggregate=lambda x: pipeline(x)[0])
    got = ByzantineWorker(config, 4).vector(params=torch.zeros(5), round_=0, honest=honest)
    assert torch.equal(got, expected[0])


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_crafting_attack_gives_one_vector_of_the_model_size(attack: str) -> None:
    config = _config(num_honest=4, num_byzantine=1, attack=attack)
    honest = _honest(config, 7)
    worker = ByzantineWorker(config, 4)
    got = worker.vector(params=torch.zeros(7), round_=0, honest=honest)
    assert worker.needs_observation
    assert got.shape == (7,) and got.dtype == torch.float32
    assert bool(torch.isfinite(got).all()) == (attack not in ("inf", "nan"))


def test_vector_does_not_expose_the_cached_matrix() -> None:
    config = _config(num_honest=4, num_byzantine=2, attack="sign_flip")
    honest = _honest(config, 3)
    crafter = Crafter(config)
    worker = ByzantineWorker(config, 4, crafter=crafter)
    first = worker.vector(params=torch.zeros(3), round_=0, honest=honest)
    first.fill_(123.0)
    again = ByzantineWorker(config, 5, crafter=crafter).vector(params=torch.zeros(3), round_=0, honest=honest)
    torch.testing.assert_close(again, -honest.mean(dim=0))


def test_honest_input_is_not_modified() -> None:
    config = _config(num_honest=4, num_byzantine=1, attack="alie")
    honest = _honest(config, 4)
    before = honest.clone()
    ByzantineWorker(config, 4).vector(params=torch.zeros(4), round_=0, honest=honest)
    assert torch.equal(honest, before)


# --- determinism across instances and processes -----------------------------------------------------
def test_gaussian_attack_is_identical_across_crafter_instances() -> None:
    # Prepare: two crafters as in two processes, with the global RNG in different states.
    config = _config(num_honest=4, num_byzantine=2, attack="gaussian")
    honest = _honest(config, 50)
    torch.manual_seed(1)
    first = Crafter(config).craft_all(honest, 7)
    torch.manual_seed(2)
    torch.rand(10)
    # Execute
    second = Crafter(config).craft_all(honest, 7)
    # Assert
    assert torch.equal(first, second)


def test_gaussian_attack_changes_with_the_round_and_the_seed() -> None:
    config = _config(num_honest=4, num_byzantine=2, attack="gaussian")
    honest = _honest(config, 50)
    base = Crafter(config).craft_all(honest, 7)
    assert not torch.equal(Crafter(config).craft_all(honest, 8), base)
    assert not torch.equal(Crafter(config.replace(seed=4)).craft_all(honest, 7), base)


def test_crafter_crafts_once_per_round() -> None:
    config = _config(num_honest=4, num_byzantine=2, attack="gaussian")
    crafter = Crafter(config)
    honest = _honest(config, 5)
    first = crafter.craft_all(honest, 0)
    assert crafter.craft_all(honest, 0) is first
    assert crafter.craft_all(honest, 1) is not first


def _matrix_digest(config: RunConfig, honest: Tensor, round_: int) -> str:
    matrix = Crafter(config).craft_all(honest, round_)
    return hashlib.sha256(matrix.numpy().tobytes()).hexdigest()


def test_gaussian_attack_is_identical_in_another_process() -> None:
    # Prepare
    config = _config(num_honest=4, num_byzantine=2, attack="gaussian")
    honest = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64) / 100
    script = textwrap.dedent(f"""
        import hashlib, torch
        from arcsim.engine.byzantine import Crafter
        from arcsim.config import loads_config
        torch.manual_seed(12345)  # a different global RNG state must not matter
        config = loads_config({config.to_yaml()!r})
        honest = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64) / 100
        print(hashlib.sha256(Crafter(config).craft_all(honest, 3).numpy().tobytes()).hexdigest())
    """)
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _matrix_digest(config, honest, 3)


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("worker_id", [0, 3, 5, -1])
def test_worker_id_outside_the_byzantine_range_is_rejected(worker_id: int) -> None:
    config = _config(num_honest=4, num_byzantine=1)
    with pytest.raises(ValueError, match=rf"Byzantine worker ids run from 4 to 4, got {worker_id}"):
        ByzantineWorker(config, worker_id)


def test_crafting_attack_without_honest_vectors_is_rejected() -> None:
    config = _config(attack="alie")
    with pytest.raises(ValueError, match="attack 'alie' needs the honest vectors of round 2"):
        ByzantineWorker(config, 4).vector(params=torch.zeros(3), round_=2, honest=None)


def test_crafting_attack_with_zero_honest_vectors_is_rejected() -> None:
    config = _config(attack="sign_flip")
    with pytest.raises(ValueError, match="needs the honest vectors of round 0"):
        ByzantineWorker(config, 4).vector(params=torch.zeros(3), round_=0, honest=torch.zeros((0, 3)))


# --- the collusion of one adversary process (arcsim/adversaries/service.py) ------------------------------
async def _reported_by_the_loop(body) -> list[dict]:
    """What the running loop's exception handler is given while ``body()`` runs and its garbage is collected."""
    loop = asyncio.get_running_loop()
    reports: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        await body()
        gc.collect()  # a future's unretrieved exception is reported when the future is collected
    finally:
        loop.set_exception_handler(previous)
    return reports


async def test_a_failed_crafting_that_nobody_else_waits_for_reports_nothing_to_the_loop() -> None:
    # Prepare: one id's Observe fails (e.g. the coordinator went away) and no other id waits for the matrix.
    async def fail() -> Tensor:
        raise RuntimeError("observe failed")

    async def body() -> None:
        collusion = Collusion()
        with pytest.raises(RuntimeError, match="observe failed"):
            await collusion.matrix(0, fail)
        del collusion

    # Execute
    reports = await _reported_by_the_loop(body)
    # Assert: the caller got the error; asyncio has no "Future exception was never retrieved" to log
    assert reports == []


async def _two_ids(collusion: Collusion, round_: int, first, second) -> tuple[asyncio.Task, asyncio.Task]:
    """One id producing the round's matrix with ``first``, then a second one asking for it while it runs."""
    started = asyncio.Event()

    async def producing() -> Tensor:
        started.set()
        return await first()

    producer = asyncio.create_task(collusion.matrix(round_, producing))
    await started.wait()
    waiter = asyncio.create_task(collusion.matrix(round_, second))
    await asyncio.sleep(0.01)  # the second id is now waiting for the first one's matrix
    return producer, waiter


async def _sevens() -> Tensor:
    return torch.full((2, 3), 7.0)


async def test_a_failed_crafting_reaches_every_waiting_id_and_the_next_caller_retries() -> None:
    # Prepare
    async def fail() -> Tensor:
        await asyncio.sleep(0.05)
        raise RuntimeError("observe failed")

    results: list[object] = []

    async def body() -> None:
        collusion = Collusion()
        results.extend(await asyncio.gather(*await _two_ids(collusion, 4, fail, _sevens), return_exceptions=True))
        results.append(await collusion.matrix(4, _sevens))

    # Execute
    reports = await _reported_by_the_loop(body)
    # Assert: both ids got the error, the next caller crafted the matrix, and asyncio logged nothing
    assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
    assert torch.equal(results[2], torch.full((2, 3), 7.0))
    assert reports == []


async def test_a_cancelled_crafting_leaves_the_round_to_the_waiting_id() -> None:
    # Prepare: the id producing the matrix is cancelled (its session stops) while another id waits.
    async def stall() -> Tensor:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    producer, waiter = await _two_ids(Collusion(), 1, stall, _sevens)
    # Execute
    producer.cancel()
    outcomes = await asyncio.gather(producer, waiter, return_exceptions=True)
    # Assert: only the cancelled id is cancelled; the waiting one crafted the matrix itself
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert torch.equal(outcomes[1], torch.full((2, 3), 7.0))
