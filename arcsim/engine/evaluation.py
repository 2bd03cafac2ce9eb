"""Test-set evaluation of a flat parameter vector."""

from __future__ import annotations

import torch
from torch import Tensor

from arcsim.config import RunConfig
from arcsim.tasks import Dataset, build_model, model_loss


class Evaluator:
    """Accuracy and mean loss of the model at given parameters on the whole test set."""

    def __init__(self, config: RunConfig, dataset: Dataset, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = build_model(
            config.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=config.seed
        ).to(self.device)
        self.model.eval()
        self.loss = model_loss(config.model)  # the model declares it: F.nll_loss for the built-ins
        self._params = list(self.model.parameters())
        self._x = dataset.test_x.to(self.device)
        self._y = dataset.test_y.to(self.device)
        self.batch_size = config.eval_batch_size

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
        torch.nn.utils.vector_to_parameters(params.to(self.device), self._params)
        correct = 0
        loss_sum = 0.0
        for start in range(0, self._y.shape[0], self.batch_size):
            x, y = self._x[start : start + self.batch_size], self._y[start : start + self.batch_size]
            output = self.model(x)
            loss_sum += float(self.loss(output, y, reduction="sum"))
            correct += int((output.argmax(dim=1) == y).sum())
        total = self._y.shape[0]
        return correct / total, loss_sum / total
