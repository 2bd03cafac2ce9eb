"""Classification models with seeded, process-independent initialisation.

All models map a batch ``(B, *input_shape)`` to log-probabilities ``(B, num_classes)``
(train with ``F.nll_loss``). Names (``MODELS``):

* ``"cnn"``: the paper's MNIST/Fashion-MNIST CNN (Allouah et al., arXiv:2405.14432):
  Conv(C->20, 5x5)-ReLU-MaxPool(2) -> Conv(20->50, 5x5)-ReLU-MaxPool(2) -> Linear(F->500)-ReLU
  -> Linear(500->num_classes) -> log-softmax, where ``F = 50 * h * w`` with
  ``h = ((H - 4) // 2 - 4) // 2`` (and ``w`` likewise). For ``(1, 28, 28)`` and 10 classes
  ``F = 800`` and the model has 431,080 parameters. Inputs smaller than 16x16 are rejected.
* ``"cnn_cifar"``: the CIFAR CNN of the authors' library (ByzFL's ``cnn_cifar``; the paper does not name
  its CIFAR-10 model): three Conv(5x5, padding 2)-ReLU-MaxPool(2) blocks with 20, 100 and 200 channels
  -> Linear(200 * H/8 * W/8 -> 512)-ReLU -> Linear(512->256)-ReLU -> Linear(256->num_classes) ->
  log-softmax. For ``(3, 32, 32)`` and 10 classes it has 2,324,630 parameters. Height and width must
  be multiples of 8.
* ``"mlp"``: flatten -> Linear(D->200)-ReLU -> Linear(200->num_classes) -> log-softmax,
  ``D = prod(input_shape)``.
* ``"logreg"``: flatten -> Linear(D->num_classes) -> log-softmax.

Each model declares its loss (:class:`ModelSpec`): the built-ins return log-probabilities and
train and evaluate with ``F.nll_loss``. A plugin model (an entry point of group ``arcsim.models`` or
``package.module:callable``) is a ``ModelSpec(build, loss)``: ``build(*, input_shape, num_classes)``
returns the module, ``loss(output, target, reduction="mean"|"sum")`` has ``F.cross_entropy``'s
signature, and accuracy is the argmax of the output. A plugin model is built with torch's global
generator seeded from ``(seed, "model", name)`` inside ``torch.random.fork_rng`` (restored after),
so its initialisation is the same in every process.

Initialisation of the built-ins is PyTorch's default for Linear/Conv2d layers (weights and biases
``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), but drawn from ``arcsim.seeding.generator(seed,
"model", name)`` in layer order, after building the layers on the ``meta`` device. The global RNG
is neither read nor advanced, so the same seed gives bitwise identical parameters in any process
or thread.

Example:

>>> model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
>>> num_parameters(model)
431080
>>> tuple(model(torch.zeros(2, 1, 28, 28)).shape)
(2, 10)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arcsim.registry import Registry, UnknownName
from arcsim.seeding import derive_seed, generator

__all__ = [
    "CNN",
    "CifarCNN",
    "MLP",
    "MODELS",
    "MODEL_REGISTRY",
    "LogisticRegression",
    "ModelSpec",
    "build_model",
    "model_loss",
    "num_parameters",
]

MODELS: tuple[str, ...] = ("cnn", "cnn_cifar", "mlp", "logreg")

_META = torch.device("meta")


class CNN(nn.Module):
    """The paper's two-conv CNN (see the module docstring)."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        out_h, out_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if (height - 4) // 2 < 6 or (width - 4) // 2 < 6:  # the second conv+pool needs >= 6
            raise ValueError(f"the cnn needs inputs of at least 16x16 pixels, got input_shape={input_shape}")
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=5, device=_META)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5, device=_META)
        self.fc1 = nn.Linear(50 * out_h * out_w, 500, device=_META)
        self.fc2 = nn.Linear(500, num_classes, device=_META)

    def forward(self, x: Tensor) -> Tensor:
        # Max-pooling before the ReLU: relu(maxpool(a)) is maxpool(relu(a)) bit for bit (ReLU is
        # monotone), and so are the gradients (a window's gradient goes to its first maximum when
        # that is positive, and is zero otherwise, either way); the ReLU then runs on a quarter of
        # the values, which made a training step about 5% faster on the CPU (docs/benchmarks.md).
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.fc2(x), dim=1)


class CifarCNN(nn.Module):
    """The authors' library's CIFAR CNN (see the module docstring)."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[1] % 8 or input_shape[2] % 8:
            raise ValueError(
                f"the cnn_cifar needs input_shape=(channels, height, width) with height and width multiples of 8, "
                f"got {input_shape}"
            )
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=5, padding=2, device=_META)
        self.conv2 = nn.Conv2d(20, 100, kernel_size=5, padding=2, device=_META)
        self.conv3 = nn.Conv2d(100, 200, kernel_size=5, padding=2, device=_META)
        self.fc1 = nn.Linear(200 * (height // 8) * (width // 8), 512, device=_META)
        self.fc2 = nn.Linear(512, 256, device=_META)
        self.fc3 = nn.Linear(256, num_classes, device=_META)

    def forward(self, x: Tensor) -> Tensor:
        # Pooling before the ReLU, as in CNN: the same outputs and gradients, a quarter of the ReLUs.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(F.max_pool2d(self.conv3(x), 2))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class MLP(nn.Module):
    """One hidden layer of 200 ReLU units."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), 200, device=_META)
        self.fc2 = nn.Linear(200, num_classes, device=_META)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))), dim=1)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on the flattened input."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes, device=_META)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)


@dataclass(frozen=True)
class ModelSpec:
    """A model as a registry holds it: how to build it and the loss it trains and evaluates with.

    ``build(*, input_shape, num_classes) -> nn.Module``; ``loss(output, target, reduction="mean")``
    with ``F.cross_entropy``'s signature (``F.nll_loss`` for models that return log-probabilities).
    """

    build: Callable[..., nn.Module]
    loss: Callable[..., Tensor] = F.nll_loss


def _adapt_model(name: str, obj: object) -> ModelSpec:
    if not isinstance(obj, ModelSpec):
        raise TypeError(
            f"a model plugin must be an arcsim.tasks.ModelSpec(build, loss) declaring its loss, "
            f"got {type(obj).__name__}"
        )
    return obj


#: Models by name: the built-ins, then entry points (group ``arcsim.models``), then ``module:callable``.
MODEL_REGISTRY: Registry[ModelSpec] = Registry(
    "model",
    builtins={
        "cnn": ModelSpec(CNN),
        "cnn_cifar": ModelSpec(CifarCNN),
        "mlp": ModelSpec(MLP),
        "logreg": ModelSpec(LogisticRegression),
    },
    adapt=_adapt_model,
)


def _spec(name: str) -> ModelSpec:
    try:
        return MODEL_REGISTRY.get(name)
    except UnknownName:
        raise ValueError(
            f"unknown model {name!r}; valid models: {', '.join(MODELS)} "
            f"(or an entry point of group 'arcsim.models', or package.module:callable)"
        ) from None


def model_loss(name: str) -> Callable[..., Tensor]:
    """The loss model ``name`` declares, ``loss(output, target, reduction="mean")``; ``F.nll_loss`` for built-ins."""
    return _spec(name).loss


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """Build model ``name`` (one of ``MODELS``, or a plugin) on the CPU with parameters drawn from ``seed``.

    ``input_shape`` excludes the batch dimension (``(C, H, W)`` for the CNN); ``num_classes >= 2``.
    Move the model to another device with ``.to(device)`` afterwards.
    """
    spec = _spec(name)
    input_shape = tuple(input_shape)
    if not input_shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape}")
    if name == "cnn" and len(input_shape) != 3:
        raise ValueError(f"the cnn needs input_shape=(channels, height, width), got {input_shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not MODEL_REGISTRY.is_builtin(name):
        # A plugin's layers draw from torch's global generator: seed it for this build only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "model", name))
            model = spec.build(input_shape=input_shape, num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r} must build a torch.nn.Module, got {type(model).__name__}")
        return model.to("cpu")
    model = spec.build(input_shape=input_shape, num_classes=num_classes)
    model.to_empty(device="cpu")
    gen = generator(seed, "model", name)
    with torch.no_grad():
        for module in model.modules():  # registration order: deterministic
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=gen)
                module.bias.uniform_(-bound, bound, generator=gen)
    return model


def num_parameters(model: nn.Module) -> int:
    """Total number of scalar parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())
