"""RunState.close_round's record and RunState's resume checks, on a tiny synthetic config (650 parameters).

Clipping is credited to the workers whose vectors the clipping scaled (through the bucket assignment
after bucketing, not by truncating the mask), the training loss and the skip reason follow the gRPC
coordinator's rules, and --resume refuses a checkpoint written with other run settings.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config
from torch import Tensor

from arcsim.config import RunConfig
from arcsim.engine import checkpoint
from arcsim.engine.inproc import run_inproc
from arcsim.engine.rounds import RunState, params_sha256

D = 650  # parameters of the synthetic task's logreg model

SETTINGS = {"quorum": 3, "observe_cutoff": 0.5}


def _config(**changes: Any) -> RunConfig:
    # The attack does not matter here (close_round is handed the vectors): tiny_config's sign flipping.
    return tiny_config(**{"rounds": 4, "eval_every": 2, "batch_size": 25, **changes})


def _vectors(num_honest: int, num_byzantine: int, *, byzantine_scale: float = 1e3) -> dict[int, Tensor]:
    """Honest vectors of norm about 0.3 (distinct), Byzantine ones about ``byzantine_scale`` times larger."""
    g = torch.Generator().manual_seed(7)
    honest = {i: 0.01 * torch.randn(D, generator=g) for i in range(num_honest)}
    byzantine = {
        i: byzantine_scale * torch.randn(D, generator=g) for i in range(num_honest, num_honest + num_byzantine)
    }
    return {**honest, **byzantine}


def _records(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


# --- clipping credited to roles ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_bucketing_before_arc_credits_the_members_of_clipped_buckets(tmp_path: Path, seed: int) -> None:
    # Prepare: 8 honest + 2 huge Byzantine vectors, buckets of 2 -> 5 rows, ARC with f = 2 clips
    # k = floor(2 * 2 * 3 / 5) = 2 of them. Whether the Byzantine vectors share a bucket (then that one
    # and the largest honest bucket are clipped) or not (their two buckets), 2 Byzantine and 2 honest
    # vectors are in clipped buckets. Truncating the 5-entry mask to the 10 ids credited workers 0..4.
    config = _config(num_honest=8, num_byzantine=2, pipeline="bucketing > arc > cwtm", pipeline_params={"s": 2})
    state = RunState(config, tmp_path)
    torch.manual_seed(seed)  # the bucket permutation

    # Execute
    record = state.close_round(_vectors(8, 2))

    # Assert
    assert (record.clipped_byzantine, record.clipped_honest, record.clipped_rows) == (2, 2, 2)
    written = _records(tmp_path)[0]
    assert (written["clipped_byzantine"], written["clipped_honest"], written["clipped_rows"]) == (2, 2, 2)


@pytest.mark.parametrize("seed", range(4))
def test_bucketing_of_one_credits_the_shuffled_rows_to_their_workers(tmp_path: Path, seed: int) -> None:
    # Prepare: s = 1 shuffles the rows (same count, so nothing was truncated, but the mask is in the
    # shuffled order). ARC with n = 10, f = 2 clips k = 3: both Byzantine vectors and one honest.
    config = _config(num_honest=8, num_byzantine=2, pipeline="bucketing > arc > cwtm", pipeline_params={"s": 1})
    state = RunState(config, tmp_path)
    torch.manual_seed(seed)

    # Execute
    record = state.close_round(_vectors(8, 2))

    # Assert
    assert (record.clipped_byzantine, record.clipped_honest, record.clipped_rows) == (2, 1, 3)


def test_arc_first_credits_by_worker(tmp_path: Path) -> None:
    config = _config(num_honest=8, num_byzantine=2, pipeline="arc > nnm > cwtm")
    record = RunState(config, tmp_path).close_round(_vectors(8, 2))
    assert (record.clipped_byzantine, record.clipped_honest, record.clipped_rows) == (2, 1, 3)


def test_nnm_before_arc_records_the_count_without_a_role_split(tmp_path: Path) -> None:
    # Each row after NNM mixes 8 vectors: a clipped row is no worker's, so no role is credited. The 8
    # honest rows all become the mean of the honest vectors (tied norms), so of k = 3 only the two rows
    # mixed around the Byzantine vectors are strictly above the threshold.
    config = _config(num_honest=8, num_byzantine=2, pipeline="nnm > arc > cwtm")
    record = RunState(config, tmp_path).close_round(_vectors(8, 2))
    assert (record.clipped_byzantine, record.clipped_honest, record.clipped_rows) == (None, None, 2)
    written = _records(tmp_path)[0]
    assert (written["clipped_byzantine"], written["clipped_honest"], written["clipped_rows"]) == (None, None, 2)


def test_a_pipeline_without_clipping_clips_nothing(tmp_path: Path) -> None:
    record = RunState(_config(num_honest=8, num_byzantine=2, pipeline="cwtm"), tmp_path).close_round(_vectors(8, 2))
    assert (record.clipped_byzantine, record.clipped_honest, record.clipped_rows) == (0, 0, 0)


def test_bucketing_draws_from_the_run_seed_so_a_resumed_run_ends_as_uninterrupted(tmp_path: Path) -> None:
    # Prepare: every process starts torch's global generator from the same seed; here each RunState
    # stands for a fresh coordinator process. 4 rounds straight, and 2 rounds then a resume for 2 more.
    config = _config(num_honest=8, num_byzantine=2, pipeline="bucketing > arc > cwtm", pipeline_params={"s": 2})
    rounds = [{i: v * (r + 1) for i, v in _vectors(8, 2, byzantine_scale=0.05).items()} for r in range(4)]
    torch.manual_seed(0)
    reference = RunState(config, tmp_path / "a")
    for vectors in rounds:
        reference.close_round(vectors)
    torch.manual_seed(0)
    interrupted = RunState(config, tmp_path / "b")
    for vectors in rounds[:2]:
        interrupted.close_round(vectors)

    # Execute
    torch.manual_seed(0)
    resumed = RunState(config, tmp_path / "b", resume=True)
    for vectors in rounds[2:]:
        resumed.close_round(vectors)

    # Assert
    assert params_sha256(resumed.params) == params_sha256(reference.params)
    assert all(r["aggregated"] for r in _records(tmp_path / "a"))
    assert _without_timings(_records(tmp_path / "b")) == _without_timings(_records(tmp_path / "a"))


def _without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in record.items() if "seconds" not in key} for record in records]


# --- training loss and skip reason --------------------------------------------------------------------------
def test_train_loss_averages_the_finite_losses_of_accepted_honest_vectors(tmp_path: Path) -> None:
    # Prepare: worker 1's vector was refused (its loss, inf, came with it); worker 2's loss is inf
    # although its vector was accepted; worker 3 is Byzantine. The gRPC coordinator keeps a loss only
    # with an accepted vector and drops a non-finite one: the mean is over worker 0 alone.
    config = _config(num_honest=3, num_byzantine=1)
    vectors = {i: v for i, v in _vectors(3, 1, byzantine_scale=0.01).items() if i != 1}

    # Execute
    record = RunState(config, tmp_path).close_round(vectors, train_losses={0: 1.5, 1: math.inf, 2: math.inf, 3: 9.0})

    # Assert
    assert record.train_loss == 1.5
    assert _records(tmp_path)[0]["train_loss"] == 1.5


def test_train_loss_does_not_depend_on_the_arrival_order(tmp_path: Path) -> None:
    # Prepare: summed in arrival order 2, 1, 0 the losses give 0.6, in id order 0.6000000000000001.
    assert (0.3 + 0.2) + 0.1 != (0.1 + 0.2) + 0.3
    arrived = {2: 0.3, 1: 0.2, 0: 0.1}

    # Execute
    record = RunState(_config(), tmp_path).close_round(_vectors(3, 0), train_losses=arrived)

    # Assert
    assert record.train_loss == ((0.1 + 0.2) + 0.3) / 3


def test_train_loss_is_none_without_a_usable_loss(tmp_path: Path) -> None:
    record = RunState(_config(), tmp_path).close_round(_vectors(3, 0), train_losses={0: math.nan, 1: -math.inf})
    assert record.train_loss is None


@pytest.mark.parametrize(("refused", "reason"), [(0, "no vectors received"), (4, "no vectors accepted (4 refused)")])
def test_skip_reason_tells_refused_vectors_from_none(tmp_path: Path, refused: int, reason: str) -> None:
    record = RunState(_config(), tmp_path).close_round({}, refused=refused)
    assert not record.aggregated and record.skip_reason == reason


@pytest.mark.parametrize("refused", [-1, 1.0, True, None])
def test_refused_must_be_a_count(tmp_path: Path, refused: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f"refused must be a non-negative integer, got {refused!r}")):
        RunState(_config(), tmp_path).close_round({}, refused=refused)


def test_inproc_rounds_whose_vectors_were_all_refused_say_so(tmp_path: Path) -> None:
    # Prepare: lr = 1e8 makes the model diverge within a few rounds; from then on every vector, the two
    # honest ones and the label-flipping worker's, is non-finite and dropped (refused by the gRPC edge).
    config = _config(
        model="mlp",
        num_honest=2,
        num_byzantine=1,
        attack="label_flip",
        lr=1e8,
        rounds=6,
        eval_every=6,
        pipeline="arc > nnm > cwtm",
    )

    # Execute
    run_inproc(config, tmp_path, checkpoint_seconds=0.0)

    # Assert
    skipped = [r for r in _records(tmp_path) if not r["aggregated"]]
    assert skipped, "the model did not diverge"
    assert {r["skip_reason"] for r in skipped} == {"no vectors accepted (3 refused)"}
    assert all(r["train_loss"] is None for r in skipped)


# --- run settings and --resume --------------------------------------------------------------------------------
def _one_round(out_dir: Path, **kwargs: Any) -> RunState:
    state = RunState(_config(), out_dir, **kwargs)
    state.close_round(_vectors(3, 0))
    return state


def test_run_settings_are_in_checkpoints_and_the_summary(tmp_path: Path) -> None:
    state = _one_round(tmp_path, run_settings=SETTINGS)
    found, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert found is not None and found.values["run_settings"] == SETTINGS
    assert state.summary(engine="grpc")["run_settings"] == SETTINGS
    assert json.loads((tmp_path / "summary.json").read_text())["run_settings"] == SETTINGS


def test_resume_with_the_same_run_settings(tmp_path: Path) -> None:
    _one_round(tmp_path, run_settings=SETTINGS)
    resumed = RunState(_config(), tmp_path, resume=True, run_settings=dict(SETTINGS))
    assert resumed.round == 1


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"quorum": 2, "observe_cutoff": 0.5}, "(quorum: checkpoint 3, now 2)"),
        ({"quorum": 3, "observe_cutoff": 0.25}, "(observe_cutoff: checkpoint 0.5, now 0.25)"),
        (
            {"quorum": 2, "observe_cutoff": 0.25},
            "(observe_cutoff: checkpoint 0.5, now 0.25; quorum: checkpoint 3, now 2)",
        ),
        ({"quorum": 3}, "(observe_cutoff: checkpoint 0.5, now unset)"),
        (None, "(observe_cutoff: checkpoint 0.5, now unset; quorum: checkpoint 3, now unset)"),
    ],
)
def test_resume_refuses_other_run_settings(tmp_path: Path, given: dict[str, Any] | None, message: str) -> None:
    _one_round(tmp_path, run_settings=SETTINGS)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"--resume: the checkpoint in {tmp_path / 'checkpoints'} was written with different run settings {message}"
        ),
    ):
        RunState(_config(), tmp_path, resume=True, run_settings=given)


def test_resume_refuses_run_settings_where_the_checkpoint_had_none(tmp_path: Path) -> None:
    _one_round(tmp_path)  # e.g. the in-process engine
    with pytest.raises(ValueError, match=re.escape("(quorum: checkpoint unset, now 3)")):
        RunState(_config(), tmp_path, resume=True, run_settings={"quorum": 3})


def _strip_run_settings(out_dir: Path) -> None:
    """Rewrite the newest checkpoint as one written before run settings were recorded."""
    found, _ = checkpoint.load_latest(out_dir / "checkpoints")
    assert found is not None
    values = {key: value for key, value in found.values.items() if key != "run_settings"}
    checkpoint.save(out_dir / "checkpoints", found.path.name, values, found.tensors)


@pytest.mark.parametrize(("given", "legacy"), [(None, None), (None, SETTINGS), (SETTINGS, SETTINGS)])
def test_resume_accepts_an_older_checkpoint_with_the_default_settings(
    tmp_path: Path, given: dict[str, Any] | None, legacy: dict[str, Any] | None
) -> None:
    _one_round(tmp_path, run_settings=SETTINGS)
    _strip_run_settings(tmp_path)
    resumed = RunState(_config(), tmp_path, resume=True, run_settings=given, legacy_run_settings=legacy)
    assert resumed.round == 1


def test_resume_refuses_an_older_checkpoint_with_other_than_the_default_settings(tmp_path: Path) -> None:
    _one_round(tmp_path, run_settings=SETTINGS)
    _strip_run_settings(tmp_path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "was written before run settings were recorded; it can be resumed only with the default settings "
            "observe_cutoff=0.5, quorum=3, got observe_cutoff=0.5, quorum=2"
        ),
    ):
        RunState(
            _config(),
            tmp_path,
            resume=True,
            run_settings={"quorum": 2, "observe_cutoff": 0.5},
            legacy_run_settings=SETTINGS,
        )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "was written before run settings were recorded; its settings are unknown, so it cannot be resumed "
            "with observe_cutoff=0.5, quorum=3"
        ),
    ):
        RunState(_config(), tmp_path, resume=True, run_settings=SETTINGS)


@pytest.mark.parametrize("settings", [{"quorum": object()}, {1: 2}, {"cutoff": math.nan}, [("quorum", 3)]])
def test_run_settings_must_be_json_data(tmp_path: Path, settings: Any) -> None:
    with pytest.raises(ValueError, match="^run_settings must "):
        RunState(_config(), tmp_path, run_settings=settings)
