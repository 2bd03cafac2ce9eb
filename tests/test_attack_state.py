"""An attack's state across rounds (Mimic's learned target): kept in checkpoints, restored on resume, by
the in-process and the batched engines; the gRPC engine's bitwise equality is in tests/test_run.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from arcsim.engine import checkpoint
from arcsim.engine.batched import run_batched
from arcsim.engine.inproc import run_inproc
from arcsim.engine.rounds import RunState

LEARNED = {
    "model": "mlp",
    "num_honest": 4,
    "num_byzantine": 2,
    "attack": "mimic",
    "attack_params": {"learn_steps": 4},
    "rounds": 8,
    "eval_every": 4,
}


def _stop_at(round_: int, *, before_closing: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raise KeyboardInterrupt at ``round_``: when it closes, or after it was crafted but before it closes."""
    close = RunState.close_round

    def close_round(self: RunState, *args: Any, **kwargs: Any) -> Any:
        if before_closing and self.round == round_:
            raise KeyboardInterrupt
        record = close(self, *args, **kwargs)
        if not before_closing and record.round == round_:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(RunState, "close_round", close_round)


def _saved_attack_state(out: Path) -> tuple[int, dict[str, Any], set[str]]:
    found, _ = checkpoint.load_latest(out / "checkpoints")
    assert found is not None
    names = {name for name in found.tensors if name.startswith("attack_state/")}
    return found.values["round"], found.values["attack_state"], names


@pytest.mark.parametrize("before_closing", [False, True], ids=["at-a-round-boundary", "mid-round"])
def test_an_inproc_run_stopped_while_mimic_learns_resumes_as_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before_closing: bool
) -> None:
    # Prepare
    config = tiny_config(**LEARNED)
    expected = run_inproc(config, tmp_path / "whole")
    # Execute: stopped in round 2 of the 4 it learns over, then resumed
    with monkeypatch.context() as patch:
        _stop_at(2, before_closing=before_closing, monkeypatch=patch)
        with pytest.raises(KeyboardInterrupt):  # the checkpoint is the one written on the way out
            run_inproc(config, tmp_path / "stopped", checkpoint_seconds=1000.0)
    round_, state, tensors = _saved_attack_state(tmp_path / "stopped")
    resumed = run_inproc(config, tmp_path / "stopped", resume=True)
    # Assert: the checkpoint holds the state as of its own round (not one crafted after it), and the
    # resumed run ends on the uninterrupted run's parameters
    assert state == {"learn_steps": 4, "rounds_seen": round_, "index": None}
    assert round_ == (2 if before_closing else 3) and tensors == {"attack_state/running_mean", "attack_state/direction"}
    assert resumed["final_params_sha256"] == expected["final_params_sha256"]


def test_a_checkpoint_after_mimic_learned_holds_only_its_target(tmp_path: Path) -> None:
    # Execute
    run_inproc(tiny_config(**LEARNED), tmp_path / "run", checkpoint_seconds=0.0)
    # Assert
    round_, state, tensors = _saved_attack_state(tmp_path / "run")
    assert round_ == LEARNED["rounds"] and tensors == set()
    assert state["rounds_seen"] == 4 and 0 <= state["index"] < LEARNED["num_honest"]


def test_a_checkpoint_without_the_attack_state_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a run's checkpoints written without its attack's state (as by a build that did not keep it)
    config = tiny_config(**LEARNED)
    with monkeypatch.context() as patch:
        patch.setattr(RunState, "attack_state", None, raising=False)
        _stop_at(2, before_closing=False, monkeypatch=patch)
        original = RunState.__init__

        def without_state(self: RunState, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **{**kwargs, "attack_state": None})

        patch.setattr(RunState, "__init__", without_state)
        with pytest.raises(KeyboardInterrupt):
            run_inproc(config, tmp_path / "run", checkpoint_seconds=0.0)
    # Execute / Assert
    with pytest.raises(ValueError, match="holds no state of the run's attack"):
        run_inproc(config, tmp_path / "run", resume=True)


def test_a_batched_run_stopped_while_mimic_learns_resumes_as_uninterrupted(tmp_path: Path) -> None:
    # Prepare: two runs learning their own targets in one group, and a stateless one beside them
    configs = [
        tiny_config(**LEARNED),
        tiny_config(**{**LEARNED, "seed": 2}),
        tiny_config(**{**LEARNED, "attack_params": {}}),
    ]
    outs = [tmp_path / f"whole{k}" for k in range(3)]
    straight = run_batched(configs, outs)
    calls: list[int] = []

    def stop(state: Any, record: Any) -> None:
        calls.append(record.round)
        if len(calls) == 3 * 2:  # every run has closed rounds 0 and 1
            raise KeyboardInterrupt

    stopped = [tmp_path / f"stopped{k}" for k in range(3)]
    # Execute
    with pytest.raises(KeyboardInterrupt):
        run_batched(configs, stopped, on_round=stop)
    saved = [_saved_attack_state(out) for out in stopped[:2]]
    resumed = run_batched(configs, stopped, resume=True)
    # Assert
    assert [(round_, state["rounds_seen"]) for round_, state, _ in saved] == [(2, 2), (2, 2)]
    assert [s["final_params_sha256"] for s in resumed] == [s["final_params_sha256"] for s in straight]


def test_the_batched_engine_crafts_each_runs_learned_mimic_as_the_inproc_engine_does_at_round_zero(
    tmp_path: Path,
) -> None:
    # Prepare: one round, so both engines craft from the same honest vectors up to rounding
    config = tiny_config(**{**LEARNED, "rounds": 1, "eval_every": 1})
    # Execute
    inproc = run_inproc(config, tmp_path / "inproc", checkpoint_seconds=0.0)
    (batched,) = run_batched([config], [tmp_path / "batched"], checkpoint_seconds=0.0)
    # Assert: the same state learned (one round of four) and close parameters
    assert _saved_attack_state(tmp_path / "inproc")[1] == _saved_attack_state(tmp_path / "batched")[1]
    assert inproc["max_accuracy"] == pytest.approx(batched["max_accuracy"], abs=1e-3)


def test_an_adversary_that_missed_rounds_of_learning_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: the adversary service's crafter, first asked for round 3 (it restarted mid-run)
    import torch

    from arcsim.engine.byzantine import Crafter

    crafter = Crafter(tiny_config(**LEARNED))
    honest = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    # Execute
    with caplog.at_level("WARNING", logger="arcsim.adversary"):
        crafter.craft_all(honest, 3)
        crafter.craft_all(honest, 4)
    # Assert: one warning naming what it saw; it goes on learning from there
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "has seen 0 rounds before round 3" in warnings[0]
    assert crafter.state is not None and crafter.state.rounds_seen == 2


def test_an_adversary_that_learned_every_round_warns_nothing(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from arcsim.engine.byzantine import Crafter

    crafter = Crafter(tiny_config(**LEARNED))
    honest = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="arcsim.adversary"):
        for round_ in range(6):
            crafter.craft_all(honest, round_)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
