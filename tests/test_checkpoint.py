"""Checkpoints: atomic, checksummed, and a torn or corrupt one falls back to the previous good one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arcsim.config import from_dict
from coordinator import checkpoint
from coordinator.rounds import RunState, params_sha256


def _save(folder: Path, round_: int) -> None:
    tensors = {"params": torch.full((5,), float(round_)), "momentum/0": torch.arange(3, dtype=torch.float64)}
    checkpoint.save(folder, f"round-{round_:08d}.ckpt", {"round": round_}, tensors)


def test_round_trip_keeps_values_tensors_and_dtypes(tmp_path: Path) -> None:
    # Prepare / Execute
    _save(tmp_path, 3)
    found, skipped = checkpoint.load_latest(tmp_path)
    # Assert
    assert skipped == [] and found is not None
    assert found.values == {"round": 3}
    assert torch.equal(found.tensors["params"], torch.full((5,), 3.0))
    assert found.tensors["momentum/0"].dtype == torch.float64
    assert found.path.read_bytes().startswith(checkpoint.MAGIC)  # raw bytes, not a pickle


def test_only_the_newest_checkpoints_are_kept_and_no_temporary_file_remains(tmp_path: Path) -> None:
    for round_ in range(1, 6):
        _save(tmp_path, round_)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00000004.ckpt", "round-00000005.ckpt"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage: str) -> None:
    # Prepare
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest = tmp_path / "round-00000002.ckpt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 3] ^= 0x40
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint at all" * 10)
    newest.write_bytes(bytes(data))
    # Execute
    found, skipped = checkpoint.load_latest(tmp_path)
    # Assert
    assert found is not None and found.values == {"round": 1}
    assert len(skipped) == 1 and "round-00000002.ckpt" in skipped[0]


def test_no_usable_checkpoint_gives_none_and_the_reasons(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / "round-00000001.ckpt").write_bytes(b"\x00" * 100)
    found, skipped = checkpoint.load_latest(tmp_path)
    assert found is None and len(skipped) == 1


def test_resume_uses_the_last_good_checkpoint_and_ends_as_uninterrupted(tmp_path: Path) -> None:
    # Prepare: an uninterrupted run, and a run whose newest checkpoint is torn
    config = from_dict({"task": "synthetic", "model": "logreg", "num_honest": 3, "num_byzantine": 0,
                        "attack": "none", "partitioner": "iid", "rounds": 4, "eval_every": 2})
    vectors = [{i: torch.full((650,), 0.01 * (r + 1) * (i + 1)) for i in range(3)} for r in range(4)]
    reference = RunState(config, tmp_path / "a")
    for round_vectors in vectors:
        reference.close_round(round_vectors)
    state = RunState(config, tmp_path / "b")
    for round_vectors in vectors[:3]:
        state.close_round(round_vectors)
    newest = max((tmp_path / "b" / "checkpoints").glob("*.ckpt"))
    newest.write_bytes(newest.read_bytes()[:-10])
    # Execute
    resumed = RunState(config, tmp_path / "b", resume=True)
    for round_vectors in vectors[resumed.round :]:
        resumed.close_round(round_vectors)
    # Assert
    assert resumed.round == 4
    assert params_sha256(resumed.params) == params_sha256(reference.params)
