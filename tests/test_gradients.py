"""The batched engine's gradient pass (every strategy against the per-worker loop) and batched evaluation
(against Evaluator), from arcsim.engine.gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from arcsim.engine.evaluation import Evaluator
from arcsim.engine.gradients import GradientPass, evaluate_runs, grouped_unsupported
from arcsim.engine.honest import HonestWorker, shards
from arcsim.tasks import Dataset, build_model, load_dataset, model_loss

pytestmark = pytest.mark.unit

STRATEGIES = ("grouped", "vmap", "auto")


def _synthetic() -> Dataset:
    return load_dataset("synthetic", seed=0)


def _fashion() -> Dataset:
    try:
        return load_dataset("fashion-mnist")
    except Exception as error:  # noqa: BLE001 - no data here: say so
        pytest.skip(f"fashion-mnist not available: {error}")


def _model(name: str, dataset: Dataset) -> nn.Module:
    return build_model(name, input_shape=tuple(dataset.train_x.shape[1:]), num_classes=dataset.num_classes, seed=0)


def _batches(model: nn.Module, dataset: Dataset, *, runs: int, workers: int, batch: int, seed: int = 0):
    """Params (R, P) that differ per run, and each worker's own batch of the training set."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    params = base + 0.05 * torch.randn(runs, base.numel(), generator=gen)
    picks = torch.randint(0, dataset.train_y.shape[0], (runs, workers, batch), generator=gen)
    return params, dataset.train_x[picks], dataset.train_y[picks]


def _assert_per_worker_close(got, want, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    (grads, losses), (want_grads, want_losses) = got, want
    assert grads.shape == want_grads.shape and grads.dtype == torch.float32
    assert losses.shape == want_losses.shape and losses.dtype == torch.float32
    for r in range(want_grads.shape[0]):
        for w in range(want_grads.shape[1]):
            torch.testing.assert_close(grads[r, w], want_grads[r, w], rtol=rtol, atol=atol, msg=f"run {r} worker {w}")
    torch.testing.assert_close(losses, want_losses, rtol=rtol, atol=atol)


# --- every strategy gives the loop's numbers ---------------------------------------------------------------
@pytest.mark.parametrize("runs", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_strategies_match_the_loop_on_the_synthetic_task(name: str, strategy: str, runs: int) -> None:
    # Prepare
    dataset = _synthetic()
    model = _model(name, dataset)
    params, x, y = _batches(model, dataset, runs=runs, workers=5, batch=16)
    # Execute
    want = GradientPass(model, model_loss(name), "cpu", "loop")(params, x, y)
    gp = GradientPass(model, model_loss(name), "cpu", strategy)
    got = gp(params, x, y)
    again = gp(params, x, y)  # after the first call's check
    # Assert
    assert gp.strategy == ("grouped" if strategy == "auto" else strategy) and gp.fallback_reason is None
    _assert_per_worker_close(got, want)
    _assert_per_worker_close(again, want)
    assert not torch.equal(want[0][0, 0], want[0][0, 1])  # the workers' batches differ, so do their gradients


@pytest.mark.parametrize("runs", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_the_loop_for_the_cnn(strategy: str, runs: int) -> None:
    # Prepare: Fashion-MNIST's zero background gives max-pool windows exact ties, which another kernel's
    # rounding breaks the other way (a different gradient, not a rounding error): a little noise leaves none
    dataset = _fashion()
    model = _model("cnn", dataset)
    params, x, y = _batches(model, dataset, runs=runs, workers=4, batch=6)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    # Execute
    want = GradientPass(model, model_loss("cnn"), "cpu", "loop")(params, x, y)
    gp = GradientPass(model, model_loss("cnn"), "cpu", strategy)
    got = gp(params, x, y)
    # Assert: a channels-last pass (the CPU's default for conv models) sums conv1's weight gradient, thousands
    # of terms that largely cancel, in another order: differences reach about 1e-5 absolute on gradients
    # of order 0.1 to 1, still rounding (the tolerance's own test is test_grouped_cnn_layouts_match_the_loop)
    assert gp.fallback_reason is None
    _assert_per_worker_close(got, want, atol=5e-5 if gp.channels_last else 1e-6)


@pytest.mark.parametrize("conv_weights", ["slices", "groups"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_cnn_layouts_match_the_loop(channels_last: bool, conv_weights: str) -> None:
    # Prepare: the images as the engine feeds them, max-pool ties included; channels-last rounds otherwise
    # than the loop's layout and may break a tie the other way, so it gets the noise that leaves none
    dataset = _fashion()
    model = _model("cnn", dataset)
    params, x, y = _batches(model, dataset, runs=2, workers=3, batch=5, seed=2)
    if channels_last:
        x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    # Execute
    want = GradientPass(model, model_loss("cnn"), "cpu", "loop")(params, x, y)
    got = GradientPass(
        model, model_loss("cnn"), "cpu", "grouped", channels_last=channels_last, conv_weights=conv_weights
    )(params, x, y)
    # Assert: channels-last sums the conv weight gradients in another order (see the test above)
    _assert_per_worker_close(got, want, atol=5e-5 if channels_last else 1e-6)


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_the_loop_is_the_honest_workers_arithmetic(name: str) -> None:
    # Prepare: momentum 0 makes HonestWorker.step return the gradient itself
    config = tiny_config(model=name, batch_size=12, momentum=0.0)
    dataset = _synthetic()
    shard_list = shards(config, dataset)
    workers = [HonestWorker(config, i, dataset=dataset, shard_list=shard_list) for i in range(3)]
    params = torch.nn.utils.parameters_to_vector(workers[0].model.parameters()).detach().clone()
    batches = [w._batch_indices(0) for w in workers]
    x = torch.stack([w._x[b] for w, b in zip(workers, batches)])[None]
    y = torch.stack([w._y[b] for w, b in zip(workers, batches)])[None]
    # Execute
    expected = [w.step(params, 0) for w in workers]
    loop = GradientPass(workers[0].model, workers[0].loss, "cpu", "loop")(params[None], x, y)
    auto = GradientPass(workers[0].model, workers[0].loss, "cpu")(params[None], x, y)
    # Assert
    for i, worker in enumerate(workers):
        torch.testing.assert_close(loop[0][0, i], expected[i], rtol=0, atol=0)
        assert float(loop[1][0, i]) == worker.last_loss
        torch.testing.assert_close(auto[0][0, i], expected[i], rtol=1e-5, atol=1e-6)


# --- non-finite runs stay alone -----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["loop", *STRATEGIES])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_a_non_finite_run_gives_non_finite_outputs_for_that_run_only(name: str, strategy: str) -> None:
    # Prepare: run 1's parameters hold a NaN, run 2's data an infinity
    dataset = _fashion() if name == "cnn" else _synthetic()
    model = _model(name, dataset)
    params, x, y = _batches(model, dataset, runs=4, workers=3, batch=4)
    want = GradientPass(model, model_loss(name), "cpu", "loop")(params, x, y)
    params[1, 7] = float("nan")
    x[2, 1, 0] = float("inf")
    gp = GradientPass(model, model_loss(name), "cpu", strategy)
    # Execute
    grads, losses = gp(params, x, y)
    # Assert
    assert not torch.isfinite(grads[1]).all() and not torch.isfinite(losses[1]).all()
    assert not torch.isfinite(grads[2, 1]).all() and not torch.isfinite(losses[2, 1])
    keep = [0, 3]
    _assert_per_worker_close((grads[keep], losses[keep]), (want[0][keep], want[1][keep]))
    torch.testing.assert_close(grads[2, [0, 2]], want[0][2, [0, 2]], rtol=1e-5, atol=1e-6)


# --- models the grouped pass cannot follow -------------------------------------------------------------------
class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.norm = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.norm(self.fc1(x.flatten(1))))), dim=1)


class _Scaled(nn.Module):
    """A custom module holding its own parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, -1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.repeat(x.shape[1] // 4)


class _CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.scaled = _Scaled()
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(torch.tanh(self.scaled(self.fc1(x.flatten(1))))), dim=1)


@pytest.mark.parametrize("net", [_BatchNormNet, _CustomNet])
def test_models_with_batch_norm_or_custom_modules_fall_back_from_grouped(net) -> None:
    # Prepare
    dataset = _synthetic()
    torch.manual_seed(0)
    model = net()
    params, x, y = _batches(model, dataset, runs=3, workers=4, batch=8)
    want = GradientPass(model, F.nll_loss, "cpu", "loop")(params, x, y)
    # Execute
    reason = grouped_unsupported(model)
    auto = GradientPass(model, F.nll_loss, "cpu")
    vmapped = GradientPass(model, F.nll_loss, "cpu", "vmap")
    # Assert
    assert reason is not None and ("norm" in reason or "scaled" in reason)
    with pytest.raises(ValueError, match="grouped strategy does not apply"):
        GradientPass(model, F.nll_loss, "cpu", "grouped")
    assert auto.strategy == "loop"
    _assert_per_worker_close(auto(params, x, y), want)
    _assert_per_worker_close(vmapped(params, x, y), want)


class _ConvZoo(nn.Module):
    """Conv options (stride, padding, dilation, reflect padding, channel groups, no bias) and a Linear
    called twice whose weight another Linear shares."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.conv3 = nn.Conv2d(6, 4, 3, padding="same")
        self.fc = nn.Linear(64, 64)
        self.tied = nn.Linear(64, 64, bias=False)
        self.tied.weight = self.fc.weight
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))).flatten(1)
        h = torch.tanh(self.fc(torch.tanh(self.fc(h))))
        return F.log_softmax(self.out(torch.tanh(self.tied(h))), dim=1)


@pytest.mark.parametrize("conv_weights", ["slices", "groups"])
def test_grouped_follows_conv_options_and_reused_and_shared_layers(conv_weights: str) -> None:
    # Prepare
    dataset = _synthetic()  # 1x8x8 inputs
    torch.manual_seed(0)
    model = _ConvZoo()
    params, x, y = _batches(model, dataset, runs=2, workers=3, batch=5)
    gp = GradientPass(model, F.nll_loss, "cpu", "grouped", conv_weights=conv_weights)
    # Execute
    got = gp(params, x, y)
    # Assert
    _assert_per_worker_close(got, GradientPass(model, F.nll_loss, "cpu", "loop")(params, x, y))


class _ReadsAWeightOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(h) + F.linear(h, self.fc2.weight), dim=1)


def test_the_first_call_check_catches_a_weight_read_outside_its_layer() -> None:
    # Prepare: every parameterised module is a Linear, so the hooks look applicable
    dataset = _synthetic()
    torch.manual_seed(0)
    model = _ReadsAWeightOutside()
    params, x, y = _batches(model, dataset, runs=2, workers=3, batch=6)
    want = GradientPass(model, F.nll_loss, "cpu", "loop")(params, x, y)
    assert grouped_unsupported(model) is None
    # Execute
    auto = GradientPass(model, F.nll_loss, "cpu")
    got = auto(params, x, y)
    # Assert
    assert auto.strategy == "loop" and "disagrees" in auto.fallback_reason
    _assert_per_worker_close(got, want)
    with pytest.raises(RuntimeError, match="disagrees with the loop"):
        GradientPass(model, F.nll_loss, "cpu", "grouped")(params, x, y)


def test_shapes_that_do_not_line_up_are_refused() -> None:
    # Prepare
    dataset = _synthetic()
    model = _model("logreg", dataset)
    params, x, y = _batches(model, dataset, runs=2, workers=3, batch=4)
    gp = GradientPass(model, model_loss("logreg"), "cpu")
    # Execute / Assert
    with pytest.raises(ValueError, match=r"got x \(2, 3, 4, 1, 8, 8\), y \(2, 3, 5\)"):
        gp(params, x, torch.zeros(2, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"params must be \(R, 650\)"):
        gp(params[:, :-1], x, y)
    with pytest.raises(ValueError, match="R = params' 1 runs"):
        gp(params[:1], x, y)
    with pytest.raises(ValueError, match="strategy must be one of"):
        GradientPass(model, model_loss("logreg"), "cpu", "fast")
    with pytest.raises(ValueError, match="out must be float32"):
        gp(params, x, y, out=torch.empty(2, 3, 649))


def test_out_receives_the_gradients() -> None:
    # Prepare
    dataset = _synthetic()
    model = _model("mlp", dataset)
    params, x, y = _batches(model, dataset, runs=2, workers=3, batch=4)
    gp = GradientPass(model, model_loss("mlp"), "cpu")
    out = torch.full((2, 3, params.shape[1]), float("nan"))
    # Execute
    grads, _ = gp(params, x, y, out=out)
    # Assert
    assert grads.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, GradientPass(model, model_loss("mlp"), "cpu", "loop")(params, x, y)[0])


# --- evaluation -----------------------------------------------------------------------------------------------
def _evaluator_scores(name: str, dataset: Dataset, params: torch.Tensor, batch_size: int) -> list[tuple[float, float]]:
    config = tiny_config(task=dataset.name, model=name, eval_batch_size=batch_size)
    evaluator = Evaluator(config, dataset)
    return [evaluator.evaluate(row) for row in params]


@pytest.mark.parametrize(
    ("name", "method", "channels_last"),
    [
        ("mlp", "auto", None),
        ("logreg", "vmap", None),
        ("cnn", "auto", None),
        ("cnn", "vmap", True),
        ("cnn", "loop", False),
    ],
)
def test_evaluate_runs_gives_the_evaluators_numbers(name: str, method: str, channels_last) -> None:
    # Prepare: a test set of 700 images in batches of 300 (a short last batch)
    dataset = _fashion() if name == "cnn" else _synthetic()
    dataset = dataclasses.replace(dataset, test_x=dataset.test_x[:700], test_y=dataset.test_y[:700])
    model = _model(name, dataset)
    params, _, _ = _batches(model, dataset, runs=3, workers=1, batch=1)
    params[1] = 0.1 * params[1]
    want = _evaluator_scores(name, dataset, params, 300)
    # Execute
    accuracy, mean_loss = evaluate_runs(
        model,
        model_loss(name),
        params,
        dataset.test_x,
        dataset.test_y,
        batch_size=300,
        device="cpu",
        method=method,
        channels_last=channels_last,
    )
    # Assert
    assert accuracy.dtype == mean_loss.dtype == torch.float64 and accuracy.shape == mean_loss.shape == (3,)
    assert len({round(loss, 6) for _, loss in want}) == 3  # the runs differ
    for r, (want_accuracy, want_loss) in enumerate(want):
        assert float(accuracy[r]) == want_accuracy
        assert float(mean_loss[r]) == pytest.approx(want_loss, rel=1e-6)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_evaluate_runs_gives_a_nan_loss_for_non_finite_params(method: str) -> None:
    # Prepare
    dataset = _synthetic()
    model = _model("mlp", dataset)
    params, _, _ = _batches(model, dataset, runs=2, workers=1, batch=1)
    params[0, 3] = float("inf")
    want = _evaluator_scores("mlp", dataset, params[1:], 128)[0]
    # Execute
    accuracy, mean_loss = evaluate_runs(
        model, model_loss("mlp"), params, dataset.test_x, dataset.test_y, batch_size=128, device="cpu", method=method
    )
    # Assert
    assert torch.isnan(mean_loss[0]) and 0.0 <= float(accuracy[0]) <= 1.0
    assert float(accuracy[1]) == want[0] and float(mean_loss[1]) == pytest.approx(want[1], rel=1e-6)


# --- CUDA ---------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_vmap_on_cuda_matches_the_cpu_loop(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: full-precision convolutions (no TF32), noisy images (no max-pool ties)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dataset = _fashion() if name == "cnn" else _synthetic()
    model = _model(name, dataset)
    params, x, y = _batches(model, dataset, runs=3, workers=4, batch=8)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    want = GradientPass(model, model_loss(name), "cpu", "loop")(params, x, y)
    gp = GradientPass(model, model_loss(name), "cuda")
    # Execute
    grads, losses = gp(params, x, y)
    # Assert
    assert gp.strategy == "vmap" and grads.device.type == "cuda"
    _assert_per_worker_close((grads.cpu(), losses.cpu()), want, rtol=1e-4, atol=1e-4)
    accuracy, mean_loss = evaluate_runs(
        model, model_loss(name), params, dataset.test_x[:500], dataset.test_y[:500], batch_size=200, device="cuda"
    )
    cpu_accuracy, cpu_loss = evaluate_runs(
        model, model_loss(name), params, dataset.test_x[:500], dataset.test_y[:500], batch_size=200, device="cpu"
    )
    torch.testing.assert_close(mean_loss, cpu_loss, rtol=1e-4, atol=0)
    assert (accuracy - cpu_accuracy).abs().max() <= 2 / 500  # an argmax tie may flip
