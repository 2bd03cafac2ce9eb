"""The honest worker's computation, free of any transport.

Each round, worker i draws a batch from its own shard with a generator seeded by
(seed, "batch", round, i), computes the gradient g_i of the loss at the announced parameters
theta_t, and updates its Polyak momentum

.. math:: m_i \\leftarrow \\beta m_i + (1 - \\beta) g_i, \\qquad m_i = 0 \\text{ before round } 0,

which is the vector it sends (Robust D-SGD, docs/paper.md). The service (arcsim/workers/service.py) and the
in-process engine (arcsim/engine/inproc.py) both use this class, so they compute the same bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from arcsim.config import RunConfig
from arcsim.seeding import generator
from arcsim.tasks import Dataset, build_model, load_dataset, model_loss, partition
from arcsim.tasks.augment import CropFlip
from arcsim.tasks.validation import ValidationSplit, validation_split


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def build_task_model(config: RunConfig, dataset: Dataset) -> torch.nn.Module:
    return build_model(config.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=config.seed)


def training_split(config: RunConfig, dataset: Dataset) -> ValidationSplit:
    """The training set's indices left to the workers and those held out for validation (``validation_fraction``)."""
    return validation_split(dataset.train_y.shape[0], fraction=config.validation_fraction, seed=config.seed)


def shards(config: RunConfig, dataset: Dataset) -> list[Tensor]:
    """The honest workers' shards, as indices into ``dataset.train_y``: every process derives the same ones
    from (dataset, validation split, partitioner, seed). The partitioner deals only the samples the
    validation split leaves to training, so no validation sample reaches a worker."""
    train = training_split(config, dataset).train  # all indices, in order, without a split
    local = partition(
        dataset.train_y[train],
        num_workers=config.num_honest,
        method=config.partitioner,
        alpha=config.alpha,
        gamma=config.gamma,
        seed=config.seed,
    )
    return [train[indices] for indices in local]


class HonestWorker:
    """Computes momentum vectors on one shard of the training set.

    ``shard_index`` picks the shard (an honest worker uses its own id); ``label_map`` rewrites
    labels before the loss (a data attack's label map: the label-flipping adversary passes ``9 - y``).
    """

    def __init__(
        self,
        config: RunConfig,
        worker_id: int,
        *,
        shard_index: int | None = None,
        label_map: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | str = "cpu",
        dataset: Dataset | None = None,
        shard_list: list[Tensor] | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.device = torch.device(device)
        dataset = dataset if dataset is not None else load_dataset(config.task, root=config.data_root, seed=config.seed)
        shard = (shard_list if shard_list is not None else shards(config, dataset))[
            worker_id if shard_index is None else shard_index
        ]
        labels = dataset.train_y[shard]
        if label_map is not None:
            labels = label_map(labels)
        self._x = dataset.train_x[shard].to(self.device)
        self._y = labels.to(self.device)
        self._augment = CropFlip(dataset.train_x) if config.augment == "crop_flip" else None
        self.model = build_task_model(config, dataset).to(self.device)
        self.loss = model_loss(config.model)  # the model declares it: F.nll_loss for the built-ins
        self._params = list(self.model.parameters())
        self.num_parameters = sum(p.numel() for p in self._params)
        self.momentum: Tensor | None = None
        self.last_loss = float("nan")

    def set_momentum(self, momentum: Tensor | None) -> None:
        """Restore the momentum (after a restart, from the coordinator's checkpoint)."""
        self.momentum = None if momentum is None else momentum.to(self.device, torch.float32).clone()

    def step(self, params: Tensor, round_: int) -> Tensor:
        """Compute this round's momentum at ``params`` (flat float32) and return it (on the CPU)."""
        batch = self._batch_indices(round_)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(params.to(self.device), self._params)
        for p in self._params:
            p.grad = None
        loss = self.loss(self.model(self._inputs(batch, round_)), self._y[batch])
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in self._params])
        beta = self.config.momentum
        if self.momentum is None:
            self.momentum = grad.mul_(1.0 - beta)
        else:
            self.momentum.mul_(beta).add_(grad, alpha=1.0 - beta)
        self.last_loss = float(loss.detach())
        return self.momentum.detach().to("cpu", copy=True)

    def _inputs(self, batch: Tensor, round_: int) -> Tensor:
        """The round's training inputs: the batch's images, augmented when the config says so."""
        x = self._x[batch]
        if self._augment is None:
            return x
        offsets, flips = self._augment.draws(self.config.seed, round_, self.worker_id, x.shape[0])
        return self._augment(x, offsets, flips)

    def _batch_indices(self, round_: int) -> Tensor:
        size = self._y.shape[0]
        g = generator(self.config.seed, "batch", round_, self.worker_id)
        batch = torch.randperm(size, generator=g)[: min(self.config.batch_size, size)]
        return batch.to(self.device)


class BatchedWorkers:
    """Several workers' gradients at the same parameters in one vectorised call (torch.func.vmap).

    Every honest worker computes its gradient at the same announced theta_t, on its own batch, so
    the per-worker gradients are one ``vmap`` of ``grad(loss)`` over the stacked batches, with the
    parameters shared (``in_dims=(None, 0, 0)``). It gives the same vectors as calling
    :meth:`HonestWorker.step` on each worker, up to floating-point rounding (the batched kernels
    sum in another order), so the in-process engine uses it only when asked (``batch_workers``):
    measured on 2 CPU cores it was slower than the loop for the paper's CNN; on a GPU it batches h
    small kernels into one (docs/benchmarks.md).
    """

    def __init__(self, workers: list[HonestWorker]) -> None:
        from torch.func import functional_call, grad_and_value, vmap

        if not workers:
            raise ValueError("BatchedWorkers needs at least one worker")
        self.workers = workers
        first = workers[0]
        self.model = first.model
        loss_fn = first.loss
        names = [name for name, _ in self.model.named_parameters()]
        self._names = names
        self._shapes = [p.shape for p in self.model.parameters()]
        self._sizes = [p.numel() for p in self.model.parameters()]

        def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(functional_call(self.model, params, (x,)), y)

        self._grad_fn = vmap(grad_and_value(loss), in_dims=(None, 0, 0))

    def step(self, params: Tensor, round_: int) -> list[Tensor]:
        """Every worker's momentum for the round (CPU tensors), updating each worker as ``step`` would."""
        device = self.workers[0].device
        batches = [w._batch_indices(round_) for w in self.workers]
        if len({b.numel() for b in batches}) != 1:  # unequal batches (a tiny shard): no common shape
            return [w.step(params, round_) for w in self.workers]
        x = torch.stack([w._inputs(b, round_) for w, b in zip(self.workers, batches)])
        y = torch.stack([w._y[b] for w, b in zip(self.workers, batches)])
        flat = params.to(device)
        views = dict(zip(self._names, (v.view(s) for v, s in zip(flat.split(self._sizes), self._shapes))))
        grads, losses = self._grad_fn(views, x, y)
        g = torch.cat([grads[name].reshape(len(self.workers), -1) for name in self._names], dim=1)
        out = []
        for row, worker, loss in zip(g, self.workers, losses.tolist()):
            beta = worker.config.momentum
            if worker.momentum is None:
                worker.momentum = row.mul(1.0 - beta)
            else:
                worker.momentum.mul_(beta).add_(row, alpha=1.0 - beta)
            worker.last_loss = loss
            out.append(worker.momentum.detach().to("cpu", copy=True))
        return out
