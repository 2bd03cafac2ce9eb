"""The run's final model file: ``model.safetensors``, a named state dict the task's model class loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from conftest import tiny_values

from arcsim.config import RunConfig, from_dict
from arcsim.engine.evaluation import Evaluator
from arcsim.engine.inproc import run_inproc
from arcsim.engine.rounds import MODEL_FILE, RunState, params_sha256
from arcsim.tasks import Dataset, build_model, load_dataset
from arcsim.tensorbytes import tensor_to_bytes

CONFIG = tiny_values(model="mlp", num_byzantine=1, attack="sign_flip", rounds=3, eval_every=2)


def _load_into_model(config: RunConfig, path: Path) -> torch.nn.Module:
    """The task's model class, built afresh, with ``path`` loaded strictly (every name, no extra)."""
    dataset = load_dataset(config.task, root=config.data_root, seed=config.seed)
    model = build_model(
        config.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=config.seed + 1
    )  # another seed: the loaded values must replace the drawn ones
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)
    return model


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def test_a_run_ends_with_model_safetensors_holding_its_final_parameters(tmp_path: Path) -> None:
    # Prepare
    config = from_dict(CONFIG)
    # Execute
    summary = run_inproc(config, tmp_path, checkpoint_seconds=0.0)
    # Assert: the model class loads it, and its parameters are the run's final ones
    path = tmp_path / MODEL_FILE
    model = _load_into_model(config, path)
    assert set(safetensors.torch.load_file(path)) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    flat = _flat(model)
    assert hashlib.sha256(tensor_to_bytes(flat)).hexdigest() == summary["final_params_sha256"]
    assert json.loads((tmp_path / "summary.json").read_text())["final_params_sha256"] == summary["final_params_sha256"]
    with safetensors.safe_open(path, framework="pt") as opened:
        metadata = opened.metadata()
    assert metadata == {
        "format": "pt",
        "task": "synthetic",
        "model": "mlp",
        "rounds_completed": "3",
        "final_params_sha256": summary["final_params_sha256"],
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_stopped_run_writes_the_model_it_stopped_at(tmp_path: Path) -> None:
    # Prepare: one round of three, then the gRPC coordinator's summary for a stopped run
    config = from_dict(CONFIG)
    state = RunState(config, tmp_path)
    state.close_round({i: torch.full((state.num_parameters,), 0.01 * (i + 1)) for i in range(4)})
    # Execute
    summary = state.summary(engine="grpc", reason="stopped")
    # Assert
    flat = _flat(_load_into_model(config, tmp_path / MODEL_FILE))
    assert torch.equal(flat, state.params)
    assert summary["final_params_sha256"] == params_sha256(flat)


def test_state_dict_names_the_cnn_parameters_in_their_shapes() -> None:
    # Prepare: the paper's CNN needs 28 x 28 inputs; a few random ones stand in for the images
    images = Dataset(
        name="images",
        train_x=torch.randn(4, 1, 28, 28),
        train_y=torch.arange(4),
        test_x=torch.randn(4, 1, 28, 28),
        test_y=torch.arange(4),
        num_classes=10,
    )
    evaluator = Evaluator(from_dict({**CONFIG, "model": "cnn"}), images)
    params = torch.randn(evaluator.initial_parameters().numel())
    # Execute
    state = evaluator.state_dict(params)
    # Assert
    model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=5)
    model.load_state_dict(state, strict=True)
    assert list(state) == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    assert torch.equal(_flat(model), params)
    params.zero_()  # the state dict holds copies, not views of the vector
    assert state["conv1.weight"].abs().sum() > 0
