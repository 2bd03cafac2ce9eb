"""schedule: async: the schedule's parts, the in-process engine's invariants and determinism, and the config."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arcsim import schedule
from arcsim.cli import main
from arcsim.config import ConfigError, from_dict
from arcsim.engine.batched import run_batched
from arcsim.engine.inproc import run_inproc
from arcsim.schedule import Buffer, EventQueue, Speeds, check_speed, staleness_weight

ASYNC = tiny_values(
    model="logreg",
    num_honest=6,
    num_byzantine=2,
    attack="alie",
    pipeline="arc > nnm > cwtm",
    rounds=12,
    eval_every=6,
    schedule="async",
    **{"async": {"buffer_size": 5, "staleness_bound": 2}},
    speeds={
        "honest": {"distribution": "lognormal", "median": 1.0, "sigma": 0.8},
        "byzantine": {"distribution": "constant", "seconds": 0.3},
    },
)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_schedule_doctests() -> None:
    result = doctest.testmod(schedule)
    assert result.attempted > 0 and result.failed == 0


# --- the parts ---------------------------------------------------------------------------------------
def test_the_buffer_keeps_one_entry_per_worker_and_refuses_stale_vectors() -> None:
    buffer = Buffer(size=3, staleness_bound=1)
    assert buffer.offer(0, version=5, current=5, payload="a") == "accepted"
    assert buffer.offer(0, version=5, current=5, payload="b") == "replaced"
    assert buffer.offer(1, version=3, current=5, payload="c") == "stale"
    assert buffer.offer(2, version=4, current=5, payload="d") == "accepted"
    assert not buffer.full
    assert buffer.offer(1, version=5, current=5, payload="e") == "accepted" and buffer.full
    window = buffer.take()
    assert [(e.worker_id, e.staleness, e.payload) for e in window] == [(0, 0, "b"), (1, 0, "e"), (2, 1, "d")]
    assert buffer.entries() == []
    with pytest.raises(ValueError, match="cannot arrive"):
        buffer.offer(0, version=6, current=5, payload=None)


def test_the_event_queue_is_earliest_first_ties_by_worker_and_never_goes_back() -> None:
    queue = EventQueue()
    for time, worker in ((2.0, 1), (1.0, 3), (1.0, 0), (5.0, 2)):
        queue.push(time, worker)
    assert [queue.pop() for _ in range(3)] == [(1.0, 0), (1.0, 3), (2.0, 1)]
    with pytest.raises(ValueError, match="before the present"):
        queue.push(1.5, 4)


def test_speeds_are_seeded_per_worker_and_step() -> None:
    spec = {"honest": {"distribution": "lognormal", "median": 2.0, "sigma": 1.0}}
    one = Speeds(spec, seed=1, num_honest=3, num_workers=4)
    two = Speeds(spec, seed=1, num_honest=3, num_workers=4)
    draws = [one.duration(w, k) for w in range(3) for k in range(20)]
    assert draws == [two.duration(w, k) for w in range(3) for k in range(20)]
    assert len(set(draws)) == len(draws) and all(d > 0 for d in draws)
    assert one.duration(3, 0) == 1.0  # the Byzantine role's default: one second each step


def test_zipf_speeds_are_whole_multiples_of_the_scale_with_a_heavy_tail() -> None:
    speeds = Speeds(
        {"honest": {"distribution": "zipf", "exponent": 2.0, "scale": 0.5}}, seed=0, num_honest=1, num_workers=1
    )
    draws = [speeds.duration(0, k) / 0.5 for k in range(4000)]
    assert all(d == int(d) and d >= 1 for d in draws)
    assert 0.55 < draws.count(1.0) / len(draws) < 0.67  # P(1) = 6 / pi^2 = 0.61 for exponent 2
    assert max(draws) >= 50


def test_a_trace_gives_each_worker_its_line_in_turn(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text("# seconds per step, one line per honest worker\n1.0, 2.0\n3.0\n")
    speeds = Speeds({"honest": {"distribution": "trace", "file": str(trace)}}, seed=0, num_honest=3, num_workers=3)
    assert [speeds.duration(0, k) for k in range(3)] == [1.0, 2.0, 1.0]
    assert [speeds.duration(1, k) for k in range(2)] == [3.0, 3.0]
    assert speeds.duration(2, 1) == 2.0  # more workers than lines: the lines repeat
    trace.write_text("1.0 -2\n")
    with pytest.raises(ValueError, match="positive seconds"):
        check_speed("honest", {"distribution": "trace", "file": str(trace)})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"distribution": "normal"}, "must be one of constant, lognormal, zipf, trace"),
        ({"distribution": "constant"}, "takes seconds, got nothing"),
        ({"distribution": "constant", "seconds": 0}, "seconds must be a positive number"),
        ({"distribution": "lognormal", "median": 1, "sigma": -1}, "sigma must be a number >= 0"),
        ({"distribution": "zipf", "exponent": 1.0, "scale": 1}, "exponent must be a number > 1"),
        ({"distribution": "trace", "file": "/no/such/trace"}, "cannot read"),
    ],
)
def test_bad_speeds_are_refused_by_name(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_speed("honest", spec)


def test_staleness_weights() -> None:
    assert staleness_weight(0, weighting="inverse_sqrt") == 1.0
    assert staleness_weight(8, weighting="inverse_sqrt") == pytest.approx(1 / 3)
    assert staleness_weight(1, weighting="polynomial", exponent=2.0) == 0.25
    assert staleness_weight(5, weighting="none") == 1.0


# --- the config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"async": {"buffer_size": 4}}, "window_f = 2 must be below half of the buffer's 4 vectors"),
        ({"async": {"buffer_size": 9}}, r"buffer_size must be an int in \[1, 8\]"),
        ({"async": {"staleness_bound": -1}}, "staleness_bound must be an int >= 0"),
        ({"async": {"buffer_size": 5, "window": 1}}, "unknown keys"),
        ({"async": {"buffer_size": 5, "staleness_exponent": 1.0}}, "only used by staleness_weighting: polynomial"),
        ({"schedule": "sync"}, "is only used with schedule: async"),
        ({"speeds": {"fast": {"distribution": "constant", "seconds": 1}}}, "unknown roles"),
        ({"schedule": "eventually"}, "must be one of sync, async"),
    ],
)
def test_bad_async_configs_are_refused_by_name(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict({**ASYNC, **changes})


def test_a_config_without_the_async_keys_keeps_its_digest() -> None:
    plain = from_dict(tiny_values())
    assert plain.schedule == "sync" and "schedule" not in json.dumps(plain.to_dict()).split('"async"')[0][-1:]
    assert from_dict({**tiny_values(), "schedule": "sync", "async": {}, "speeds": {}}).digest() == plain.digest()
    assert from_dict(ASYNC).to_dict()["async"] == {"buffer_size": 5, "staleness_bound": 2}


def test_window_f_is_the_pipelines_f() -> None:
    config = from_dict({**ASYNC, "async": {"buffer_size": 5, "window_f": 1}})
    assert config.f == 1 and config.buffer_size == 5


# --- the engine --------------------------------------------------------------------------------------
def test_an_async_run_is_deterministic_and_records_its_windows(tmp_path: Path) -> None:
    config = from_dict(ASYNC)
    first = run_inproc(config, tmp_path / "one")
    second = run_inproc(config, tmp_path / "two")
    other = run_inproc(from_dict({**ASYNC, "seed": 2}), tmp_path / "three")
    assert first["final_params_sha256"] == second["final_params_sha256"] != other["final_params_sha256"]
    records = _records(tmp_path / "one")
    assert len(records) == ASYNC["rounds"] and all(r["window"]["closed"] == "full" for r in records)
    assert [r["accuracy"] is not None for r in records] == [(t + 1) % 6 == 0 for t in range(12)]
    # The two Byzantine workers, three times faster than the honest median, are in every window: 2 of 5
    assert {r["window"]["byzantine_share"] for r in records} == {0.4}


def _check_windows(records: list[dict[str, Any]], *, size: int, bound: int, num_honest: int) -> None:
    times = [r["window"]["time"] for r in records]
    assert times == sorted(times)
    for record in records:
        window = record["window"]
        workers = window["workers"]
        assert workers == sorted(set(workers)), "a worker twice in a window"
        assert max(window["staleness"], default=0) <= bound, "a vector older than the bound aggregated"
        assert len(workers) == size or window["closed"] != "full"
        assert window["roles"] == ["honest" if w < num_honest else "byzantine" for w in workers]
        assert (record["received_honest"], record["received_byzantine"]) == (
            window["roles"].count("honest"),
            window["roles"].count("byzantine"),
        )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(3, 8),
    bound=st.integers(0, 3),
    sigma=st.floats(0.0, 2.0),
    byzantine_seconds=st.floats(0.01, 5.0),
    seed=st.integers(0, 1000),
)
def test_random_speeds_keep_the_windows_invariants(
    tmp_path_factory: pytest.TempPathFactory, size: int, bound: int, sigma: float, byzantine_seconds: float, seed: int
) -> None:
    # Prepare: window_f 1 so that every size from 3 on is valid
    values = {
        **ASYNC,
        "seed": seed,
        "rounds": 10,
        "async": {"buffer_size": size, "staleness_bound": bound, "window_f": 1},
        "speeds": {
            "honest": {"distribution": "lognormal", "median": 1.0, "sigma": sigma},
            "byzantine": {"distribution": "constant", "seconds": byzantine_seconds},
        },
    }
    out = tmp_path_factory.mktemp("async")
    # Execute
    summary = run_inproc(from_dict(values), out)
    # Assert
    assert summary["rounds_completed"] == 10
    _check_windows(_records(out), size=size, bound=bound, num_honest=6)


def test_a_very_slow_worker_never_holds_the_run_and_its_stale_vectors_are_refused(tmp_path: Path) -> None:
    # Prepare: worker 0 takes 100 times the others' time per step, and the bound is one version
    trace = tmp_path / "trace.txt"
    trace.write_text("100\n" + "1\n" * 5)
    values = {
        **ASYNC,
        "rounds": 30,
        "async": {"buffer_size": 5, "staleness_bound": 1},
        "speeds": {"honest": {"distribution": "trace", "file": str(trace)}},
    }
    # Execute
    summary = run_inproc(from_dict(values), tmp_path / "run")
    # Assert: the run ended; worker 0's vectors, computed 30 or more versions back, never entered a window
    records = _records(tmp_path / "run")
    assert summary["rounds_completed"] == 30
    assert all(0 not in r["window"]["workers"] for r in records)
    assert sum(r["window"]["stale_refused"] for r in records) >= 1
    _check_windows(records, size=5, bound=1, num_honest=6)


def test_a_diverging_async_run_still_ends(tmp_path: Path) -> None:
    values = {**ASYNC, "lr": 1e30, "rounds": 8}
    summary = run_inproc(from_dict(values), tmp_path / "run")
    records = _records(tmp_path / "run")
    assert summary["rounds_completed"] == 8
    assert any(r["window"]["non_finite_refused"] for r in records)


def test_staleness_weighting_changes_the_run(tmp_path: Path) -> None:
    plain = run_inproc(from_dict(ASYNC), tmp_path / "plain")
    weighted = run_inproc(
        from_dict({**ASYNC, "async": {**ASYNC["async"], "staleness_weighting": "inverse_sqrt"}}), tmp_path / "weighted"
    )
    assert plain["final_params_sha256"] != weighted["final_params_sha256"]


def test_the_batched_engine_refuses_an_async_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = from_dict(ASYNC)
    with pytest.raises(ValueError, match="batched engine runs schedule: sync only"):
        run_batched([config], [tmp_path / "b"])
    path = tmp_path / "async.yaml"
    path.write_text(config.to_yaml())
    assert main(["run", str(path), "--out", str(tmp_path / "g"), "--engine", "batched", "--no-progress"]) == 2
    assert "runs on the inproc and grpc engines" in capsys.readouterr().err


def test_a_sweep_takes_a_list_of_async_settings_as_a_grid_axis() -> None:
    from arcsim.sweep import plan_sweep

    grid = {**ASYNC, "async": [{"buffer_size": 5}, {"buffer_size": 6, "staleness_bound": 1}], "seed": [1, 2]}
    plan = plan_sweep(grid)
    assert len(plan.runs) == 4 and set(plan.varied) == {"async", "seed"}
    assert {run.config.buffer_size for run in plan.runs} == {5, 6}


def test_the_coordinator_metrics_observe_each_window(tmp_path: Path) -> None:
    # Prepare: an async run's records through the metrics the in-process engine serves (arcsim run --metrics-port)
    from arcsim.coordinator.metrics import CoordinatorMetrics
    from arcsim.engine.rounds import RoundRecord

    metrics = CoordinatorMetrics(config=from_dict(ASYNC))
    records: list[RoundRecord] = []
    run_inproc(from_dict(ASYNC), tmp_path / "run", on_round=lambda state, record: records.append(record))
    # Execute
    for record in records:
        metrics.observe_round(record)
    # Assert
    sample = metrics.registry.get_sample_value
    windows = [r.window for r in records]
    honest = sum(role == "honest" for w in windows for role in w["roles"])
    assert sample("arcsim_staleness_versions_count", {"role": "honest"}) == honest
    assert sample("arcsim_staleness_versions_sum", {"role": "byzantine"}) == 0.0  # they claim the current version
    assert sample("arcsim_window_byzantine_share_count") == len(windows)
    assert sample("arcsim_window_fill_seconds_count") == len(windows) - 1
    assert sample("arcsim_window_fill_seconds_sum") == pytest.approx(windows[-1]["time"] - windows[0]["time"])
    assert sample("arcsim_submissions_rejected_total", {"reason": "stale"}) == sum(w["stale_refused"] for w in windows)


@pytest.mark.parametrize(
    ("where", "byzantine_speed"),
    [
        ("after-an-update", {"distribution": "lognormal", "median": 1.0, "sigma": 0.8}),
        ("between-updates", {"distribution": "lognormal", "median": 1.0, "sigma": 0.8}),
        # colluders arriving together, one of them closing a window: the others craft after the update
        ("after-an-update", {"distribution": "constant", "seconds": 0.3}),
        # attackers held until they fill a window together (some may be waiting at a checkpoint)
        ("between-updates", {"distribution": "constant", "seconds": 0.4, "timing": "hold"}),
    ],
    ids=["after-an-update", "between-updates", "colluders-together", "held-attackers"],
)
def test_an_async_run_stopped_and_resumed_ends_as_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, byzantine_speed: dict
) -> None:
    # Prepare: Mimic learning its target (an attack state too)
    from arcsim.engine.honest import HonestWorker

    speed = {k: v for k, v in byzantine_speed.items() if k != "timing"}
    timing = {"byzantine_timing": byzantine_speed["timing"]} if "timing" in byzantine_speed else {}
    values = {
        **ASYNC,
        "attack": "mimic",
        "attack_params": {"learn_steps": 6},
        "async": {**ASYNC["async"], **timing},
        "speeds": {"byzantine": speed},
    }
    config = from_dict(values)
    expected = run_inproc(config, tmp_path / "whole")
    calls: list[int] = []

    def stop_after_update(state: Any, record: Any) -> None:
        if record.round == 4:
            raise KeyboardInterrupt

    step = HonestWorker.step

    def stop_between_updates(self: HonestWorker, params: Any, round_: int) -> Any:
        calls.append(round_)
        if len(calls) == 40:  # some 40 gradients in: inside the window of an update after the first
            raise KeyboardInterrupt
        return step(self, params, round_)

    # Execute
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        if where == "after-an-update":
            run_inproc(config, tmp_path / "stopped", on_round=stop_after_update, checkpoint_seconds=0.0)
        else:
            patch.setattr(HonestWorker, "step", stop_between_updates)
            run_inproc(config, tmp_path / "stopped", checkpoint_seconds=0.0)
    done = len(_records(tmp_path / "stopped"))
    resumed = run_inproc(config, tmp_path / "stopped", resume=True)
    # Assert: stopped part-way, resumed from its checkpoint, and on the uninterrupted run's parameters
    assert 0 < done < ASYNC["rounds"]
    assert resumed["final_params_sha256"] == expected["final_params_sha256"]
    assert [(r["window"], r["accuracy"]) for r in _records(tmp_path / "stopped")] == [
        (r["window"], r["accuracy"]) for r in _records(tmp_path / "whole")
    ]


def test_the_committed_async_grid_expands_into_its_sixteen_runs() -> None:
    from arcsim import sweep

    path = Path(__file__).resolve().parent.parent / "configs" / "async" / "fashion-async.yaml"
    plan = sweep.load_sweep(path)
    assert len(plan.runs) == 16 and {run.config.schedule for run in plan.runs} == {"sync", "async"}
    assert "arcsim sweep configs/async/fashion-async.yaml" in path.read_text()


def test_held_attackers_land_together_and_start_crafted_ones_arrive_stale(tmp_path: Path) -> None:
    # Prepare: slow attackers (3 s a step against the honest median of 1 s), three timings
    def run(timing: str) -> list[dict[str, Any]]:
        values = {
            **ASYNC,
            "rounds": 20,
            "async": {"buffer_size": 5, "staleness_bound": 3, "byzantine_timing": timing},
            "speeds": {
                "honest": {"distribution": "lognormal", "median": 1.0, "sigma": 0.5},
                "byzantine": {"distribution": "constant", "seconds": 3.0},
            },
        }
        run_inproc(from_dict(values), tmp_path / timing)
        return [r["window"] for r in _records(tmp_path / timing)]

    # Execute
    arrival, start, hold = run("arrival"), run("start"), run("hold")
    # Assert: held attackers enter a window both or neither, and fill its end; start-crafted ones can be
    # stale; attackers on arrival are never stale
    counts = [w["roles"].count("byzantine") for w in hold]
    assert set(counts) <= {0, 2} and 2 in counts
    assert any(s > 0 for w in start for s, r in zip(w["staleness"], w["roles"]) if r == "byzantine")
    assert all(s == 0 for w in arrival for s, r in zip(w["staleness"], w["roles"]) if r == "byzantine")
    assert from_dict({**ASYNC, "async": {"buffer_size": 5, "byzantine_timing": "hold"}}).async_["byzantine_timing"]
    with pytest.raises(ConfigError, match="byzantine_timing must be one of arrival, start, hold"):
        from_dict({**ASYNC, "async": {"buffer_size": 5, "byzantine_timing": "late"}})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_valid_async_config_completes_with_its_windows_invariants(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    # Prepare: worker counts from one honest worker and no attacker up, buffers from the smallest the
    # window's f allows to every worker, every timing and every speed distribution
    num_honest = data.draw(st.integers(1, 5), label="num_honest")
    num_byzantine = data.draw(st.integers(0, 3), label="num_byzantine")
    n = num_honest + num_byzantine
    window_f = data.draw(st.integers(0, min(num_byzantine, (n - 1) // 2)), label="window_f")
    size = data.draw(st.integers(2 * window_f + 1, n), label="buffer_size")
    speed = st.sampled_from(
        [
            {"distribution": "constant", "seconds": 0.5},
            {"distribution": "lognormal", "median": 1.0, "sigma": 1.5},
            {"distribution": "zipf", "exponent": 1.5, "scale": 0.1},
        ]
    )
    values = {
        **tiny_values(model="logreg", num_honest=num_honest, num_byzantine=num_byzantine),
        "attack": data.draw(st.sampled_from(["foe", "sign_flip", "label_flip", "mimic"])) if num_byzantine else "none",
        "pipeline": "arc > cwtm" if window_f else "cwtm",
        "rounds": 8,
        "eval_every": 4,
        "seed": data.draw(st.integers(0, 50)),
        "schedule": "async",
        "async": {
            "buffer_size": size,
            "staleness_bound": data.draw(st.integers(0, 3)),
            "window_f": window_f,
            "byzantine_timing": data.draw(st.sampled_from(["arrival", "start", "hold"])),
        },
        "speeds": {"honest": data.draw(speed), "byzantine": data.draw(speed)},
    }
    out = tmp_path_factory.mktemp("any")
    # Execute
    summary = run_inproc(from_dict(values), out)
    # Assert
    assert summary["rounds_completed"] == 8
    _check_windows(_records(out), size=size, bound=values["async"]["staleness_bound"], num_honest=num_honest)


def test_a_window_waiting_for_a_straggler_closes_at_the_round_deadline(tmp_path: Path) -> None:
    # Prepare: the buffer wants every worker, and worker 0 takes 1,000 s a step; the deadline is 20 s
    trace = tmp_path / "trace.txt"
    trace.write_text("1000\n" + "1\n" * 5)
    values = {
        **ASYNC,
        "rounds": 6,
        "round_deadline": 20.0,
        "async": {"buffer_size": 8, "staleness_bound": 2},
        "speeds": {"honest": {"distribution": "trace", "file": str(trace)}},
    }
    # Execute
    summary = run_inproc(from_dict(values), tmp_path / "run")
    # Assert: every window closed at its deadline, 20 s apart, without worker 0, and was aggregated
    windows = [r["window"] for r in _records(tmp_path / "run")]
    assert summary["rounds_completed"] == 6
    assert [w["closed"] for w in windows] == ["deadline"] * 6
    assert [w["time"] for w in windows] == [20.0 * (k + 1) for k in range(6)]
    assert all(0 not in w["workers"] and len(w["workers"]) == 7 for w in windows)
    assert all(r["aggregated"] for r in _records(tmp_path / "run"))
