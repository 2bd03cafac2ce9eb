"""Many runs' per-worker gradients in one call, and many runs' test scores in one call.

The batched engine (arcsim/engine/batched.py) advances R runs in lockstep. Every run has W workers that
compute, at the run's parameters theta_r, the gradient of the mean loss on their own batch of b samples;
the workers of a run share theta_r, the runs do not. :class:`GradientPass` computes all R x W gradients
(and the W mean losses of each run) in one call, by one of three strategies:

* ``"grouped"``: one forward pass per run over all its W*b samples, then one backward pass that asks
  autograd only for the gradient of the summed per-worker mean losses with respect to each layer's
  *output*. Forward hooks keep every layer's input; each worker's weight gradient is then its own
  samples' outer product: for ``nn.Linear`` a batched matrix product over the workers (bias: the sum of
  the output gradients), for ``nn.Conv2d`` ``conv2d_weight`` on each worker's slice of the batch (or
  one call with the workers folded into channel groups). It applies when every module that holds
  parameters is an ``nn.Linear`` or ``nn.Conv2d`` and the model changes no buffer in forward (no batch
  norm); a layer may be called several times and share its weights (the contributions add up). The
  first call checks it once against ``"loop"`` on one run, which catches a model that reads a layer's
  weight outside the layer; ``"auto"`` then falls back, an explicit ``"grouped"`` raises.
* ``"vmap"``: ``torch.func``: a vmap over the runs (parameters batched) of a vmap over the workers
  (parameters shared) of ``grad_and_value`` of the loss through ``functional_call``. Generic (batch
  norm runs without tracking statistics, which changes nothing in train mode); the kernels a GPU wants.
  Runs are processed in chunks of at most ``max_chunk_samples`` samples.
* ``"loop"``: per run, per worker, a forward and backward pass of the worker's batch alone: the
  arithmetic of ``HonestWorker.step``. The reference, and the last fallback.

``"auto"`` picks ``"vmap"`` on CUDA; on the CPU ``"grouped"`` where it applies, else ``"loop"``: on the
CPU a vmap over the runs was no faster than the loop (benchmarks/gradients.py measures the choice).

The contract: every strategy gives the loop's numbers *within rounding* (the batched kernels sum in
another order), not bit for bit; the tests hold them to rtol 1e-5 / atol 1e-6 per worker. One
exception: where values tie exactly (a max-pool window of equal values, which an image's uniform
background gives), another kernel's rounding may break the tie the other way and route that worker's
gradient through another position: a larger difference, as legitimate as the loop's. The grouped
pass on the CPU runs the loop's own per-sample kernels and breaks ties alike; a vmap over the runs
may not. Runs are independent: a run whose parameters or data hold a NaN or an infinity gets
non-finite gradients and losses, never an exception, and the other runs' numbers are unchanged (the
engine marks it diverged).

:func:`evaluate_runs` scores R parameter vectors on a whole test set: per run the accuracy and mean
loss that ``Evaluator`` computes (same batches, same sums), by a loop over the runs with a channels-last
model and input on the CPU and a vmap over the runs per batch on CUDA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from arcsim.engine.evaluation import forward_in_slices

__all__ = ["STRATEGIES", "GradientPass", "evaluate_runs", "grouped_unsupported"]

STRATEGIES: tuple[str, ...] = ("auto", "grouped", "vmap", "loop")

Loss = Callable[..., Tensor]


class _NotGroupable(Exception):
    """Raised inside a grouped pass when the model does something the hooks cannot follow."""


def grouped_unsupported(model: nn.Module) -> str | None:
    """Why the ``"grouped"`` strategy cannot compute ``model``'s per-worker gradients, or None when it can."""
    layers = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            return f"{name or 'the model'} ({type(module).__name__}) changes its statistics in forward"
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if type(module) not in (nn.Linear, nn.Conv2d):
            return f"{name or 'the model'} ({type(module).__name__}) holds parameters and is no Linear or Conv2d"
        if (
            isinstance(module, nn.Conv2d)
            and module.padding == "same"
            and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size))
        ):
            return f"{name} pads 'same' unevenly"
        layers += 1
    return None if layers else "the model has no parameters"


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _to_channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


class GradientPass:
    """Per-worker gradients and mean losses of R runs of W workers (see the module docstring).

    ``model`` is a template (``arcsim.tasks.build_model``): the pass works on its own copy, on ``device``,
    in train mode, so the template is neither moved nor changed. ``loss`` is the task's mean-reduction
    loss (``arcsim.tasks.model_loss``). ``strategy``: ``"auto"``, ``"grouped"``, ``"vmap"`` or ``"loop"``;
    an explicit ``"grouped"`` that does not apply raises ValueError here (:func:`grouped_unsupported`).

    Tuning (benchmarks/gradients.py measures the choices): ``channels_last`` lays the grouped pass's
    activations and conv weights out channels-last (default None: on for a model with convolutions on
    the CPU, where it makes the pass markedly faster once the run's parameters are copied into the
    model's own channels-last weights; its other rounding may break a max-pool tie the other way than
    the loop does, see the module docstring); ``conv_weights`` computes the
    grouped pass's conv weight gradients per worker's slice of the batch (``"slices"``) or in one call
    with the workers as channel groups (``"groups"``); ``max_chunk_samples`` bounds the samples
    (runs x W x b) of one vmapped call.

    After a call, ``strategy`` is the strategy in use and ``fallback_reason`` says why ``"auto"`` left
    ``"grouped"`` or ``"vmap"`` for the loop (None when it did not).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        device: torch.device | str = "cpu",
        strategy: str = "auto",
        *,
        channels_last: bool | None = None,
        max_chunk_samples: int = 65536,
        conv_weights: str = "slices",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if conv_weights not in ("slices", "groups"):
            raise ValueError(f"conv_weights must be slices or groups, got {conv_weights!r}")
        self.device = torch.device(device)
        self.loss = loss
        self.max_chunk_samples = max_chunk_samples
        self._model = copy.deepcopy(model).to(self.device).train()
        self._model.requires_grad_(False)
        if channels_last is None:
            channels_last = self.device.type == "cpu" and _has_conv(self._model)
        if channels_last:
            self._model.to(memory_format=torch.channels_last)
        self._own = list(self._model.parameters())
        named = list(self._model.named_parameters())
        self._names = [name for name, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._sizes = [p.numel() for _, p in named]
        self.num_parameters = sum(self._sizes)
        self._offsets = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        slot = {id(p): (off, p.shape) for (_, p), off in zip(named, self._offsets)}
        self._slots = {
            module: tuple(slot[id(p)] if p is not None else None for p in (module.weight, module.bias))
            for module in self._model.modules()
            if type(module) in (nn.Linear, nn.Conv2d)
        }
        self.grouped_unsupported = grouped_unsupported(self._model)
        if strategy == "grouped" and self.grouped_unsupported is not None:
            raise ValueError(f"the grouped strategy does not apply: {self.grouped_unsupported}")
        self._explicit = strategy
        if strategy == "auto":
            if self.device.type == "cuda":
                strategy = "vmap"
            else:
                strategy = "grouped" if self.grouped_unsupported is None else "loop"
        self.strategy = strategy
        self.fallback_reason: str | None = None
        self._checked = strategy == "loop"
        self.channels_last = channels_last
        self.conv_weights = conv_weights
        self._recording = False
        self._calls: list[tuple[nn.Module, Tensor, Tensor]] = []
        self._vmapped: Callable | None = None
        if self.grouped_unsupported is None:
            for module in self._slots:
                module.register_forward_hook(self._hook)

    # --- the call ---------------------------------------------------------------------------------------
    def __call__(self, params: Tensor, x: Tensor, y: Tensor, *, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``params`` (R, P), ``x`` (R, W, b, *input_shape), ``y`` (R, W, b) -> grads (R, W, P), losses (R, W).

        ``out``: a float32 (R, W, P) tensor on the device to write the gradients into (and return), instead of
        a new one: a caller that consumes the gradients before the next call saves allocating them."""
        if params.dim() != 2 or params.shape[1] != self.num_parameters:
            raise ValueError(f"params must be (R, {self.num_parameters}), got {tuple(params.shape)}")
        if x.dim() < 3 or y.dim() != 3 or tuple(x.shape[:3]) != tuple(y.shape) or x.shape[0] != params.shape[0]:
            raise ValueError(
                f"x must be (R, W, b, *input_shape) and y (R, W, b) with R = params' {params.shape[0]} runs, "
                f"got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        params = params.to(self.device, torch.float32)
        x = x.to(self.device, torch.float32)
        y = y.to(self.device)
        shape = (*y.shape[:2], self.num_parameters)
        if out is None:
            out = torch.empty(shape, device=self.device)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != self.device:
            raise ValueError(f"out must be float32 {shape} on {self.device}, got {out.dtype} {tuple(out.shape)}")
        if not self._checked:
            return self._first_call(params, x, y, out)
        return self._compute(self.strategy, params, x, y, out)

    def _compute(self, strategy: str, params: Tensor, x: Tensor, y: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            if strategy == "grouped":
                return self._grouped(params, x, y, out)
            if strategy == "vmap":
                return self._vmap(params, x, y, out)
            return self._loop(params, x, y, out)

    def _first_call(self, params: Tensor, x: Tensor, y: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """The chosen strategy, checked once against the loop on a finite run; ``auto`` falls back on failure."""
        try:
            grads, losses = self._compute(self.strategy, params, x, y, out)
        except (_NotGroupable, RuntimeError) as error:
            if isinstance(error, torch.cuda.OutOfMemoryError) or self._explicit != "auto":
                raise
            return self._fall_back(f"{self.strategy} failed: {error}", params, x, y, out)
        finite = [
            r
            for r in range(params.shape[0])
            if bool(torch.isfinite(grads[r]).all() and torch.isfinite(losses[r]).all() and torch.isfinite(x[r]).all())
        ]
        if not finite:
            return grads, losses  # nothing to compare yet: check on a later call
        r = finite[0]
        want_g, want_l = self._loop(params[r : r + 1], x[r : r + 1], y[r : r + 1], torch.empty_like(out[:1]))
        bad = _mismatch(grads[r], losses[r], want_g[0], want_l[0])
        if bad is None:
            self._checked = True
            return grads, losses
        reason = f"{self.strategy} disagrees with the loop ({bad})"
        if self._explicit != "auto":
            raise RuntimeError(f"the {reason}; this model needs another strategy")
        return self._fall_back(reason, params, x, y, out)

    def _fall_back(self, reason: str, params: Tensor, x: Tensor, y: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        self.fallback_reason = reason
        self.strategy = "loop"
        self._checked = True
        return self._compute("loop", params, x, y, out)

    # --- loop -------------------------------------------------------------------------------------------
    def _views(self, flat: Tensor, channels_last: bool = False) -> dict[str, Tensor]:
        views = (v.view(s) for v, s in zip(flat.split(self._sizes), self._shapes))
        if channels_last:
            views = (_to_channels_last(v) for v in views)
        return dict(zip(self._names, views))

    def _loop(self, params: Tensor, x: Tensor, y: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        runs, workers = y.shape[:2]
        losses = torch.empty(runs, workers, device=self.device)
        for r in range(runs):
            for w in range(workers):
                flat = params[r].detach().clone().requires_grad_()
                loss = self.loss(functional_call(self._model, self._views(flat), (x[r, w],)), y[r, w])
                (grads[r, w],) = torch.autograd.grad(loss, flat, allow_unused=True, materialize_grads=True)
                losses[r, w] = loss.detach()
        return grads, losses

    # --- vmap -------------------------------------------------------------------------------------------
    def _vmap(self, params: Tensor, x: Tensor, y: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        if self._vmapped is None:
            torch.func.replace_all_batch_norm_modules_(self._model)

            def loss(flat: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
                return self.loss(functional_call(self._model, self._views(flat), (xs,)), ys)

            per_worker = vmap(grad_and_value(loss), in_dims=(None, 0, 0), randomness="different")
            self._vmapped = vmap(per_worker, in_dims=(0, 0, 0), randomness="different")
        runs, workers, batch = y.shape
        chunk = max(1, self.max_chunk_samples // max(1, workers * batch))
        losses = torch.empty(runs, workers, device=self.device)
        for s in range(0, runs, chunk):
            part, values = self._vmapped(params[s : s + chunk], x[s : s + chunk], y[s : s + chunk])
            grads[s : s + chunk] = part
            losses[s : s + chunk] = values.detach()
        return grads, losses

    # --- grouped ----------------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._recording:
            return
        if len(args) != 1 or not isinstance(output, Tensor):
            raise _NotGroupable(f"{type(module).__name__} called with {len(args)} positional arguments")
        if not output.requires_grad:
            output.requires_grad_()  # a leaf (nothing before it needs a gradient): autograd starts here
        self._calls.append((module, args[0].detach(), output))

    def _grouped(self, params: Tensor, x: Tensor, y: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        runs, workers, batch = y.shape
        samples = workers * batch
        losses = torch.empty(runs, workers, device=self.device)
        for r in range(runs):
            inputs = x[r].reshape(samples, *x.shape[3:])
            if self.channels_last:
                inputs = _to_channels_last(inputs)
            self._calls = []
            self._recording = True
            try:
                # The run's parameters copied into the model's own (copy_ keeps their memory format)
                # rather than handed to functional_call: the convolutions then run on weights laid out
                # like the model's, which measured faster.
                with torch.no_grad():
                    for param, view in zip(self._own, self._views(params[r]).values()):
                        param.copy_(view)
                output = self._model(inputs)
            finally:
                self._recording = False
            calls, self._calls = self._calls, []
            per_worker = torch.stack([self.loss(output[w * batch : (w + 1) * batch], y[r, w]) for w in range(workers)])
            losses[r] = per_worker.detach()
            outs = (
                torch.autograd.grad(per_worker.sum(), [out for _, _, out in calls], allow_unused=True) if calls else ()
            )
            written: set[int] = set()
            for (module, inp, _), grad_out in zip(calls, outs):
                if grad_out is not None:
                    self._accumulate(grads[r], written, module, inp, grad_out, workers, batch)
            for offset, size in zip(self._offsets, self._sizes):
                if offset not in written:  # a parameter the loss does not reach
                    grads[r, :, offset : offset + size].zero_()
        return grads, losses

    def _accumulate(
        self,
        into: Tensor,
        written: set[int],
        module: nn.Module,
        inp: Tensor,
        grad_out: Tensor,
        workers: int,
        batch: int,
    ) -> None:
        """Add each worker's gradient of ``module``'s weight and bias for one call to ``into`` (W, P)."""
        samples = workers * batch
        if inp.shape[0] != samples or grad_out.shape[0] != samples:
            raise _NotGroupable(f"{type(module).__name__} saw a batch of {inp.shape[0]}, not the {samples} samples")
        weight_slot, bias_slot = self._slots[module]
        if isinstance(module, nn.Linear):
            g = grad_out.reshape(workers, -1, grad_out.shape[-1])
            factors = (g.transpose(1, 2), inp.reshape(workers, -1, inp.shape[-1]))
            target = _target(into, weight_slot, workers)
            if weight_slot[0] in written:  # the layer ran twice, or shares its weight with another
                target.baddbmm_(*factors)
            else:
                torch.bmm(*factors, out=target)  # straight into the (W, P) rows: no temporary
                written.add(weight_slot[0])
            bias = g.sum(1) if bias_slot is not None else None
        else:
            weight, bias = _conv_weight_grads(module, inp, grad_out, workers, batch, self.conv_weights)
            _write(into, written, weight_slot, workers, weight)
        if bias_slot is not None and bias is not None:
            _write(into, written, bias_slot, workers, bias)


def _target(into: Tensor, slot: tuple[int, torch.Size], workers: int) -> Tensor:
    offset, shape = slot
    return into[:, offset : offset + math.prod(shape)].view(workers, *shape)


def _write(into: Tensor, written: set[int], slot: tuple[int, torch.Size], workers: int, value: Tensor) -> None:
    """Copy ``value`` (W, *shape) into the parameter's place in ``into``, or add it there after the first time."""
    target = _target(into, slot, workers)
    if slot[0] in written:
        target.add_(value)
    else:
        target.copy_(value)
        written.add(slot[0])


def _conv_weight_grads(
    module: nn.Conv2d, inp: Tensor, grad_out: Tensor, workers: int, batch: int, mode: str
) -> tuple[Tensor, Tensor | None]:
    """Per-worker weight (W, C_out, C_in/groups, kh, kw) and bias (W, C_out) gradients of one conv call.

    ``mode`` ``"slices"``: one ``conv2d_weight`` per worker on its slice of the batch; ``"groups"``: one
    ``conv2d_weight`` with the workers folded into channel groups (sample j of worker w becomes sample j,
    channels w*C .. (w+1)*C - 1)."""
    if inp.dim() != 4:
        raise _NotGroupable(f"Conv2d input of {inp.dim()} dimensions")
    padding = module.padding
    if module.padding_mode != "zeros":
        inp = F.pad(inp, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0, 0)
    elif padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    c_in, c_out = inp.shape[1], grad_out.shape[1]
    shape = module.weight.shape
    options = {"stride": module.stride, "padding": padding, "dilation": module.dilation}
    if mode == "slices":
        parts = [
            torch.nn.grad.conv2d_weight(
                inp[w * batch : (w + 1) * batch],
                shape,
                grad_out[w * batch : (w + 1) * batch],
                groups=module.groups,
                **options,
            )
            for w in range(workers)
        ]
        weight = torch.stack(parts)
    else:
        folded_in = inp.reshape(workers, batch, *inp.shape[1:]).transpose(0, 1)
        folded_out = grad_out.reshape(workers, batch, *grad_out.shape[1:]).transpose(0, 1)
        weight = torch.nn.grad.conv2d_weight(
            folded_in.reshape(batch, workers * c_in, *inp.shape[2:]),
            (workers * c_out, *shape[1:]),
            folded_out.reshape(batch, workers * c_out, *grad_out.shape[2:]),
            groups=workers * module.groups,
            **options,
        ).view(workers, *shape)
    bias = grad_out.reshape(workers, batch, c_out, -1).sum((1, 3)) if module.bias is not None else None
    return weight, bias


def _mismatch(grads: Tensor, losses: Tensor, want_grads: Tensor, want_losses: Tensor) -> str | None:
    """None when (W, P) ``grads`` and (W,) ``losses`` equal the reference up to rounding, else what differs."""
    scale = want_grads.norm(dim=1)
    error = (grads - want_grads).norm(dim=1)
    worst = int(torch.argmax(error - 1e-2 * scale))
    if bool((error > 1e-2 * scale + 1e-5).any()):
        return f"worker {worst}: gradient off by {float(error[worst]):.3g} at norm {float(scale[worst]):.3g}"
    if not torch.allclose(losses, want_losses, rtol=1e-4, atol=1e-6):
        return "the losses differ"
    return None


# --- evaluation -------------------------------------------------------------------------------------------
def evaluate_runs(
    model: nn.Module,
    loss: Loss,
    params: Tensor,
    inputs: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    device: torch.device | str,
    method: str = "auto",
    channels_last: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Accuracy and mean loss, (R,) float64 each, of ``model`` at each row of ``params`` (R, P) on the set.

    The numbers of ``Evaluator._score`` per run: batches of ``batch_size`` in order, the loss summed
    (``reduction="sum"``) per batch and over batches divided by the set's size, accuracy the argmax's
    hits over the size. ``model`` (the task's template) is copied, not changed; a run with non-finite
    parameters gets a NaN loss and whatever accuracy its outputs give.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if method not in ("auto", "loop", "vmap"):
        raise ValueError(f"method must be auto, loop or vmap, got {method!r}")
    device = torch.device(device)
    net = copy.deepcopy(model).to(device).eval()
    net.requires_grad_(False)
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    if params.dim() != 2 or params.shape[1] != sum(sizes):
        raise ValueError(f"params must be (R, {sum(sizes)}), got {tuple(params.shape)}")
    if labels.dim() != 1 or inputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"inputs (N, ...) and labels (N,) must agree, got {tuple(inputs.shape)}, {tuple(labels.shape)}"
        )
    params = params.to(device, torch.float32)
    labels = labels.to(device)
    total = labels.shape[0]
    runs = params.shape[0]

    def views(flat: Tensor, channels_last: bool) -> dict[str, Tensor]:
        parts = (v.view(s) for v, s in zip(flat.split(sizes), shapes))
        return dict(zip(names, (_to_channels_last(v) if channels_last else v for v in parts)))

    if method == "auto":
        method = "vmap" if device.type == "cuda" else "loop"
    if channels_last is None:
        channels_last = device.type == "cpu" and _has_conv(net)
    inputs = inputs.to(device)
    if channels_last:
        inputs = _to_channels_last(inputs)
    correct = torch.zeros(runs, dtype=torch.float64)
    loss_sum = torch.zeros(runs, dtype=torch.float64)
    if method == "vmap":

        def scores(flat: Tensor, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
            output = functional_call(net, views(flat, False), (xb,))  # a vmapped weight has no channels-last
            return loss(output, yb, reduction="sum"), (output.argmax(dim=1) == yb).sum()

        batched = vmap(scores, in_dims=(0, None, None))
        with torch.no_grad():
            for start in range(0, total, batch_size):
                sums, hits = batched(params, inputs[start : start + batch_size], labels[start : start + batch_size])
                loss_sum += sums.double().cpu()
                correct += hits.double().cpu()
        return correct / total, loss_sum / total
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    own = list(net.parameters())
    with torch.inference_mode():
        for r in range(runs):
            # The run's parameters copied into the model's own (copy_ keeps their memory format): the
            # convolutions then run on channels-last weights prepared like the model's, which measured
            # faster than handing converted views to functional_call.
            for param, view in zip(own, views(params[r], False).values()):
                param.copy_(view)
            hits, sums = 0, 0.0
            for start in range(0, total, batch_size):
                xb, yb = inputs[start : start + batch_size], labels[start : start + batch_size]
                output = forward_in_slices(net, xb)
                sums += float(loss(output, yb, reduction="sum"))
                hits += int((output.argmax(dim=1) == yb).sum())
            correct[r], loss_sum[r] = hits, sums
    return correct / total, loss_sum / total
