"""The soak test, small: 50 lightweight workers, 159,010-float vectors, 20 rounds, one real coordinator.

``benchmarks/soak.py`` (``make soak``) runs the same measurement with 10, 200 and 1,000 workers.
Here it runs at a size that takes about 15 s on a loaded 2-core machine: the real coordinator
(``arcsim coordinator`` in a child process, default settings) and the lightweight clients of
``benchmarks/testbed.py`` (the real protocol and codec) in two processes. The helpers that turn a
run into checks are tested on hand-made inputs, so a check that could never fail would be caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # soak.py imports testbed.py

import soak  # noqa: E402

from arcsim.tasks import DatasetUnavailable  # noqa: E402

MLP_ON_FASHION_MNIST = 784 * 200 + 200 + 200 * 10 + 10  # 159,010: the model nearest 100,000 parameters
M_TRIM_THRESHOLD = 256 << 20  # freed heap glibc may keep in the coordinator (arcsim.engine.inproc.reuse_freed_memory)


def _fashion_mnist_mlp_size() -> int:
    try:
        return soak.parameter_count("fashion-mnist", "mlp")
    except DatasetUnavailable as error:
        pytest.skip(f"fashion-mnist not available: {error}")


def test_soak_50_workers_no_lost_or_double_counted_submission_and_bounded_memory() -> None:
    """Every vector of every round is counted once, and the coordinator's memory stays within a bound.

    The bound on the peak RSS of any round over the RSS before round 0: in a round the coordinator
    holds at most five copies of one round's vectors (N x d x 4 bytes): the vectors received, the
    (N, d) matrix stacked for the pipeline, the previous round's vectors (kept as momenta, and held
    by the checkpoint written in the background), the parameters copied into each of the N streams'
    send buffers, and gRPC's buffers of vectors on their way in; plus up to 256 MiB of freed heap
    that glibc keeps for reuse (M_TRIM_THRESHOLD) and three more copies for the allocator's
    fragmentation: 8 N d 4 bytes + 256 MiB, 523 MB for 50 workers (measured: about 230 MB). A
    coordinator that kept one round's vectors per round would pass it by round 10, and would fail
    the trend check: the rounds' peaks grow by less than a quarter of N d 4 per round (measured:
    0.06 to 0.08 of it on 20 rounds; keeping every round's vectors gives 1).
    """
    # Prepare
    d = _fashion_mnist_mlp_size()
    settings = soak.SoakSettings(
        num_workers=50, rounds=20, task="fashion-mnist", model="mlp", pipeline="mean", client_processes=2
    )
    vectors_bytes = settings.num_workers * d * 4

    # Execute
    run = soak.run_soak(settings)

    # Assert
    assert d == MLP_ON_FASHION_MNIST == run["settings"]["num_parameters"]
    assert run["checks"] == dict.fromkeys(run["checks"], True), run["failures"]
    assert run["passed"] and not run["failures"]
    memory = run["memory"]
    assert memory["vectors_bytes"] == vectors_bytes
    assert all(memory["round_peak_rss_bytes"]), "every round was sampled"
    assert memory["rounds_peak_rss_bytes"] - memory["base_rss_bytes"] <= 8 * vectors_bytes + M_TRIM_THRESHOLD
    assert memory["trend_bytes_per_round"] < 0.25 * vectors_bytes
    assert run["checkpoint"]["writes"] == settings.rounds  # the coordinator's default: one checkpoint a round
    assert run["checkpoint"]["bytes_median"] > (settings.num_workers + 1) * d * 4  # momenta and parameters
    assert len(run["round_seconds"]["values"]) == settings.rounds
    assert len(run["round_interval"]["values"]) == settings.rounds - 1


def _inputs(n: int = 3, rounds: int = 2, d: int = 5) -> dict:
    """What a correct run of ``n`` workers and ``rounds`` rounds of ``d``-float vectors reports."""
    records = [{"received_honest": n, "received_byzantine": 0, "aggregated": True} for _ in range(rounds)]
    reports = [{"got": {r: n for r in range(rounds)}, "answered": {r: n for r in range(rounds)}, "failed": 0}]
    metrics = {
        'arcsim_submissions_total{role="honest"}': rounds * n,
        'arcsim_submissions_total{role="byzantine"}': 0.0,
        'arcsim_submissions_rejected_total{reason="duplicate"}': 0.0,
        "arcsim_received_bytes_total": rounds * n * d * 4,
    }
    return {"num_parameters": d, "records": records, "reports": reports, "metrics": metrics, "rounds_completed": rounds}


@pytest.mark.parametrize(
    "break_it, failing",
    [
        (lambda i: i["records"][1].update(received_honest=2), "every_round_N_vectors"),
        (lambda i: i["metrics"].update({'arcsim_submissions_total{role="honest"}': 7}), "submissions_total_honest"),
        (lambda i: i["metrics"].update({'arcsim_submissions_rejected_total{reason="duplicate"}': 1}), "no_rejection"),
        (lambda i: i["metrics"].update(arcsim_received_bytes_total=0), "received_bytes_total"),
        (lambda i: i["reports"][0]["answered"].update({1: 2}), "every_client_every_round"),
        (lambda i: i["reports"][0].update(failed=1), "no_client_failed"),
        (lambda i: i.update(rounds_completed=1), "rounds_completed"),
    ],
)
def test_checks_catch_a_lost_or_double_counted_submission(break_it, failing) -> None:
    # Prepare
    settings = soak.SoakSettings(num_workers=3, rounds=2)
    inputs = _inputs()
    assert all(soak._checks(settings, **inputs).values())

    # Execute
    break_it(inputs)
    checks = soak._checks(settings, **inputs)

    # Assert
    assert [name for name, ok in checks.items() if not ok] == [failing]


def test_round_peaks_and_growth() -> None:
    # Prepare: RSS of 100 before round 0, then rounds 0..4 peaking at 300, 300, 400, (no sample), 600:
    # a leak of 100 a round (the trend starts at round 5 // 4 = 1).
    samples = [
        soak.Sample(0.0, 0, 100, 100),
        soak.Sample(0.1, 0, 300, 300),
        soak.Sample(0.2, 1, 300, 300),
        soak.Sample(0.3, 2, 350, 350),
        soak.Sample(0.4, 2, 400, 400),
        soak.Sample(0.5, 4, 600, 600),
        soak.Sample(0.6, 5, 200, 600),
    ]

    # Execute
    memory = soak._memory(samples, rounds=5, vectors_bytes=100)

    # Assert
    assert memory["round_peak_rss_bytes"] == [300, 300, 400, 0, 600]  # the sample after the last round is left out
    assert memory["base_rss_bytes"] == 100 and memory["peak_rss_bytes"] == 600
    assert memory["trend_bytes_per_round"] == pytest.approx(100.0)  # (1, 300), (2, 400), (4, 600)
    assert memory["rounds_peak_over_base_in_vectors"] == 5.0


def test_percentile_is_nearest_rank() -> None:
    assert soak.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert soak.percentile(list(range(1, 101)), 99) == 99
    assert soak.percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError, match="no values"):
        soak.percentile([], 99)


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        soak.SoakSettings(num_workers=0, rounds=1)
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        soak.SoakSettings(num_workers=1, rounds=0)
    with pytest.raises(ValueError, match=r"client_processes \(3\) must not exceed num_workers \(2\)"):
        soak.SoakSettings(num_workers=2, rounds=1, client_processes=3)
    with pytest.raises(ValueError, match="numel must be >= 1, got 0"):
        soak.model_for(0)


def test_model_for_picks_the_nearest_parameter_count() -> None:
    _fashion_mnist_mlp_size()  # skips without the data
    assert soak.model_for(100_000) == ("fashion-mnist", "mlp", MLP_ON_FASHION_MNIST)
    assert soak.model_for(15_000) == ("synthetic", "mlp", 64 * 200 + 200 + 200 * 10 + 10)
