"""Test-set and validation-set evaluation of a flat parameter vector."""

from __future__ import annotations

import torch
from torch import Tensor

from arcsim.config import RunConfig
from arcsim.engine.honest import training_split
from arcsim.tasks import Dataset, build_model, model_loss

# On the CPU the forward pass of an evaluation batch runs in slices of at most this many samples, so
# that a layer's activations stay in the cache: for the paper's CNN a batch of 1,000 has 46 MB of
# first-layer activations, and slices of 256 took the forward pass from 186 to 166 ms per 1,000
# images (81 to 78 ms channels-last) on the 2-core machine with one thread. The built-in models'
# outputs are bitwise the same for any slicing (each sample's output depends on that sample only;
# measured equal), and the loss is still summed per batch of ``eval_batch_size``, so the scores are
# unchanged (docs/benchmarks.md).
FORWARD_SLICE = 256


def forward_in_slices(model: torch.nn.Module, x: Tensor, *, slice_size: int = FORWARD_SLICE) -> Tensor:
    """``model(x)``, on the CPU computed slice by slice (``slice_size`` samples each) and concatenated."""
    if x.device.type != "cpu" or x.shape[0] <= slice_size:
        return model(x)
    return torch.cat([model(x[start : start + slice_size]) for start in range(0, x.shape[0], slice_size)])


class Evaluator:
    """Accuracy and mean loss of the model at given parameters on the whole test set, and on the validation
    set when the config holds one out (``validation_fraction`` > 0: the training samples no worker sees)."""

    def __init__(self, config: RunConfig, dataset: Dataset, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = build_model(
            config.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=config.seed
        ).to(self.device)
        self.model.eval()
        self.num_classes = dataset.num_classes
        self.loss = model_loss(config.model)  # the model declares it: F.nll_loss for the built-ins
        self._params = list(self.model.parameters())
        self._x = dataset.test_x.to(self.device)
        self._y = dataset.test_y.to(self.device)
        self._validation: tuple[Tensor, Tensor] | None = None
        if config.validation_fraction > 0.0:
            held_out = training_split(config, dataset).validation
            self._validation = (dataset.train_x[held_out].to(self.device), dataset.train_y[held_out].to(self.device))
        self.batch_size = config.eval_batch_size

    @property
    def has_validation(self) -> bool:
        return self._validation is not None

    def initial_parameters(self) -> Tensor:
        return torch.nn.utils.parameters_to_vector(self._params).detach().to("cpu", copy=True)

    @torch.no_grad()
    def state_dict(self, params: Tensor) -> dict[str, Tensor]:
        """The model's named state at the flat vector ``params`` (laid out as ``parameters()``, like
        :meth:`initial_parameters`), on the CPU: what the task's model class loads with
        ``load_state_dict``. Buffers, which no round changes, are the model's own; every entry is a
        copy with memory of its own (tied parameters appear under each of their names)."""
        torch.nn.utils.vector_to_parameters(params.to(self.device), self._params)
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()}

    @torch.no_grad()
    def evaluate(self, params: Tensor) -> tuple[float, float]:
        """Test accuracy and mean test loss at ``params``."""
        torch.nn.utils.vector_to_parameters(params.to(self.device), self._params)
        return self._score(self._x, self._y)

    @torch.no_grad()
    def evaluate_validation(self, params: Tensor) -> tuple[float, float] | None:
        """Validation accuracy and mean validation loss at ``params``; None without a validation split."""
        if self._validation is None:
            return None
        torch.nn.utils.vector_to_parameters(params.to(self.device), self._params)
        return self._score(*self._validation)

    def _score(self, inputs: Tensor, labels: Tensor) -> tuple[float, float]:
        correct = 0
        loss_sum = 0.0
        for start in range(0, labels.shape[0], self.batch_size):
            x, y = inputs[start : start + self.batch_size], labels[start : start + self.batch_size]
            output = forward_in_slices(self.model, x)
            loss_sum += float(self.loss(output, y, reduction="sum"))
            correct += int((output.argmax(dim=1) == y).sum())
        total = labels.shape[0]
        return correct / total, loss_sum / total
