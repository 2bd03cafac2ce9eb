"""Checkpoints: safetensors files, atomic and checksummed; a torn or corrupt one falls back to the previous good one."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import tiny_values

from arcsim.config import from_dict
from arcsim.engine import checkpoint
from arcsim.engine.rounds import RunState, params_sha256

VALUES = {"round": 0, "best_accuracy": 0.25, "last_accuracy": None, "momentum_ids": [0], "run_settings": {"q": 3}}


def _name(round_: int) -> str:
    return f"round-{round_:08d}.safetensors"


def _save(folder: Path, round_: int) -> Path:
    tensors = {"params": torch.full((5,), float(round_)), "momentum/0": torch.arange(3, dtype=torch.float64)}
    return checkpoint.save(folder, _name(round_), {**VALUES, "round": round_}, tensors)


def test_round_trip_keeps_values_tensors_and_dtypes(tmp_path: Path) -> None:
    # Prepare / Execute
    _save(tmp_path, 3)
    found, skipped = checkpoint.load_latest(tmp_path)
    # Assert
    assert skipped == [] and found is not None
    assert found.path.name == "round-00000003.safetensors"
    assert found.values == {**VALUES, "round": 3}
    assert torch.equal(found.tensors["params"], torch.full((5,), 3.0))
    assert found.tensors["momentum/0"].dtype == torch.float64


def test_a_checkpoint_is_a_plain_safetensors_file_with_its_crc_and_values_in_the_metadata(tmp_path: Path) -> None:
    # Prepare
    path = _save(tmp_path, 3)
    # Execute: any safetensors reader, no arcsim code
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as opened:
        metadata = opened.metadata()
    # Assert
    assert set(tensors) == {"params", "momentum/0"} and torch.equal(tensors["params"], torch.full((5,), 3.0))
    assert metadata["format"] == checkpoint.FORMAT
    assert json.loads(metadata["values"]) == {**VALUES, "round": 3}
    assert len(metadata["crc32"]) == 8 and int(metadata["crc32"], 16) >= 0
    assert path.read_bytes()[8:9] == b"{"  # a JSON header after its length: no pickle


def test_empty_tensors_and_one_tensor_under_two_names_round_trip(tmp_path: Path) -> None:
    # Prepare: safetensors refuses two names for one memory; e.g. one vector kept as two workers' momenta
    shared = torch.arange(4, dtype=torch.float32)
    tensors = {
        "momentum/1": shared,
        "momentum/2": shared,
        "prefix": shared[:2],
        "empty": torch.empty(0, dtype=torch.float16),
        "row": torch.ones(2, 3)[1],
    }
    # Execute
    checkpoint.save(tmp_path, _name(1), {"round": 1}, tensors)
    found = checkpoint.load(tmp_path / _name(1))
    # Assert
    assert set(found.tensors) == set(tensors)
    assert all(torch.equal(found.tensors[key], tensor) for key, tensor in tensors.items())
    assert found.tensors["empty"].dtype == torch.float16


def test_only_the_newest_checkpoints_are_kept_and_no_temporary_file_remains(tmp_path: Path) -> None:
    for round_ in range(1, 6):
        _save(tmp_path, round_)
    assert sorted(p.name for p in tmp_path.iterdir()) == [_name(4), _name(5)]


def test_a_checkpoint_gets_the_mode_of_any_file_the_process_creates(tmp_path: Path) -> None:
    # safetensors' own temporary file is 0600: results in a shared volume must stay readable like rounds.jsonl
    path = _save(tmp_path, 1)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


@pytest.mark.parametrize("name", ["round-00000001.ckpt", "round-00000001", ".round-00000001.safetensors"])
def test_a_name_of_another_kind_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=f"a checkpoint's name must end with '.safetensors'.*got {name!r}"):
        checkpoint.save(tmp_path, name, {"round": 1}, {"params": torch.zeros(2)})


@pytest.mark.parametrize("keep", [0, -1, True, 1.5])
def test_keep_must_be_a_positive_integer(tmp_path: Path, keep: object) -> None:
    with pytest.raises(ValueError, match=f"keep must be an integer >= 1, got {keep!r}"):
        checkpoint.save(tmp_path, _name(1), {"round": 1}, {"params": torch.zeros(2)}, keep=keep)  # type: ignore[arg-type]


def _header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize(
    "damage", ["truncate", "flip header", "flip payload", "flip crc", "flip values", "empty", "garbage", "appended"]
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage: str) -> None:
    # Prepare
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    data = bytearray(newest.read_bytes())
    header_end = _header_length(data)
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip header":
        data[header_end // 2] ^= 0x40
    elif damage == "flip payload":
        data[header_end + 3] ^= 0x01
    elif damage == "flip crc":  # another valid CRC, or the same one in capitals
        at = bytes(data).index(b'"crc32":"') + len(b'"crc32":"')
        crc = data[at : at + 8].decode()
        data[at : at + 8] = (crc.upper() if crc.upper() != crc else f"{int(crc, 16) ^ 1:08x}").encode()
    elif damage == "flip values":  # still valid JSON, and the same length
        data = bytearray(bytes(data).replace(b'\\"round\\": 2', b'\\"round\\": 3'))
        assert len(data) == len(newest.read_bytes()) and b'\\"round\\": 3' in data
    elif damage == "empty":
        data = bytearray()
    elif damage == "garbage":
        data = bytearray(b"not a checkpoint at all" * 10)
    else:
        data += b"\x00" * 8
    newest.write_bytes(bytes(data))
    # Execute
    found, skipped = checkpoint.load_latest(tmp_path)
    # Assert
    assert found is not None and found.values["round"] == 1
    assert len(skipped) == 1 and _name(2) in skipped[0]


def test_every_single_bit_flip_and_every_truncation_is_detected(tmp_path: Path) -> None:
    # Prepare: a small checkpoint, so that every byte of its header, metadata and payload can be tried
    good = _save(tmp_path, 1).read_bytes()
    damaged = tmp_path / "damaged.safetensors"
    variants = [good[:length] for length in range(len(good))]
    for at in range(len(good)):
        for bit in range(8):
            flipped = bytearray(good)
            flipped[at] ^= 1 << bit
            variants.append(bytes(flipped))
    # Execute / Assert
    accepted = []
    for index, data in enumerate(variants):
        damaged.write_bytes(data)
        try:
            checkpoint.load(damaged)
        except checkpoint.CheckpointError:
            continue
        accepted.append(index)
    assert accepted == []


def test_no_usable_checkpoint_gives_none_and_the_reasons(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / _name(1)).write_bytes(b"\x00" * 100)
    found, skipped = checkpoint.load_latest(tmp_path)
    assert found is None and len(skipped) == 1


def test_a_safetensors_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    safetensors.torch.save_file({"params": torch.zeros(3)}, tmp_path / _name(1), metadata={"format": "pt"})
    with pytest.raises(
        checkpoint.CheckpointError,
        match="not an arcsim checkpoint of format arcsim-checkpoint-3 "
        r"\(format 'pt'\)",
    ):
        checkpoint.load(tmp_path / _name(1))


def _old_format_file(folder: Path, round_: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"round-{round_:08d}.ckpt").write_bytes(b"ARCSIMCK\x02\x00\x00\x00" + b"\x00" * 40)


def test_a_folder_with_only_old_format_checkpoints_is_refused_saying_so(tmp_path: Path) -> None:
    _old_format_file(tmp_path, 3)
    assert checkpoint.any_checkpoint(tmp_path)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=(
            "holds checkpoints of arcsim's earlier format \\(round-00000003.ckpt\\) and no .safetensors one: "
            "this version reads round-XXXXXXXX.safetensors only"
        ),
    ):
        checkpoint.load_latest(tmp_path)


def test_old_format_checkpoints_beside_a_good_one_are_left_alone(tmp_path: Path) -> None:
    _old_format_file(tmp_path, 3)
    _save(tmp_path, 1)
    found, skipped = checkpoint.load_latest(tmp_path)
    assert found is not None and found.values["round"] == 1 and skipped == []


def test_an_empty_or_missing_folder_holds_no_checkpoint(tmp_path: Path) -> None:
    assert not checkpoint.any_checkpoint(tmp_path) and not checkpoint.any_checkpoint(tmp_path / "missing")
    assert checkpoint.load_latest(tmp_path / "missing") == (None, [])


CONFIG = tiny_values(rounds=4, eval_every=2, batch_size=25)


def test_resume_uses_the_last_good_checkpoint_and_ends_as_uninterrupted(tmp_path: Path) -> None:
    # Prepare: an uninterrupted run, and a run whose newest checkpoint is torn
    config = from_dict(CONFIG)
    vectors = [{i: torch.full((650,), 0.01 * (r + 1) * (i + 1)) for i in range(3)} for r in range(4)]
    reference = RunState(config, tmp_path / "a")
    for round_vectors in vectors:
        reference.close_round(round_vectors)
    state = RunState(config, tmp_path / "b")
    for round_vectors in vectors[:3]:
        state.close_round(round_vectors)
    newest = max((tmp_path / "b" / "checkpoints").glob("*.safetensors"))
    newest.write_bytes(newest.read_bytes()[:-10])
    # Execute
    resumed = RunState(config, tmp_path / "b", resume=True)
    for round_vectors in vectors[resumed.round :]:
        resumed.close_round(round_vectors)
    # Assert
    assert resumed.round == 4
    assert params_sha256(resumed.params) == params_sha256(reference.params)
    assert resumed.last_vectors.keys() == reference.last_vectors.keys()
    assert all(torch.equal(resumed.last_vectors[i], reference.last_vectors[i]) for i in reference.last_vectors)


def test_resume_from_a_folder_of_old_format_checkpoints_is_one_clear_error(tmp_path: Path) -> None:
    _old_format_file(tmp_path / "checkpoints", 2)
    with pytest.raises(checkpoint.CheckpointError, match="^--resume: .* holds checkpoints of arcsim's earlier format"):
        RunState(from_dict(CONFIG), tmp_path, resume=True)
