"""Split a train set among honest workers: iid, Dirichlet label skew, gamma-similarity, extreme heterogeneity.

Every worker rebuilds the same partition from ``(labels, num_workers, method, alpha, gamma, seed)``
and takes its own shard, so only the config crosses the network.

Methods (``PARTITIONERS``):

* ``"iid"``: a seeded permutation of all indices cut into ``K = num_workers`` shards whose sizes
  differ by at most one.
* ``"dirichlet"``: label skew (Hsu et al., 2019, arXiv:1909.06335). For each class ``c`` with
  ``N_c`` samples, draw proportions over the workers

  .. math:: p_c \\sim \\operatorname{Dir}(\\alpha \\mathbf{1}_K), \\qquad
            n_{c,k} = \\operatorname{round}\\big(N_c \\textstyle\\sum_{j \\le k} p_{c,j}\\big)
                    - \\operatorname{round}\\big(N_c \\textstyle\\sum_{j < k} p_{c,j}\\big)

  and deal the class's shuffled indices out in those counts. Small ``alpha`` gives each worker
  few labels; large ``alpha`` approaches iid. No worker is left empty: while some worker has no
  sample, the worker with the most samples (lowest id on ties) hands one sample of its largest
  class (lowest label on ties) to the empty worker with the lowest id. This moves at most
  ``K - 1`` samples and needs ``N >= K``.
* ``"extreme"``: the paper's extreme heterogeneity: indices sorted by label (stable, so ties keep
  their order) and cut into ``K`` contiguous shards of ``floor(N / K)`` samples each; the last
  ``N mod K`` indices of the sorted order (from the largest label) are dropped so that all shards
  are equal. With ``K >= num_classes`` and balanced classes each worker holds one or two labels.
* ``"gamma_similarity"``: the heterogeneity scale of the authors' pipeline (see docs/paper.md),
  between iid and extreme. The ``floor(gamma * N)`` first indices of the iid split's seeded
  permutation are dealt uniformly: cut in order into ``K`` parts as ``"iid"`` cuts. The other
  indices, in ascending order, are sorted by label (stable) and cut into ``K`` contiguous parts.
  Worker ``k`` gets the ``k``-th part of each. Every index is used once, and the parts' sizes are
  chosen so that each part's sizes, and the shards' totals, differ by at most one: the sorted
  part's ``S mod K`` larger pieces go to the workers after the uniform part's ``U mod K`` larger
  ones (cyclically). ``gamma = 1`` is ``"iid"`` itself (same seed, same shards); ``gamma = 0`` is
  ``"extreme"`` when ``K`` divides ``N`` (and otherwise keeps the remainder that it drops).

A plugin partitioner (an entry point of group ``arcsim.partitioners`` or ``package.module:callable``)
is a function ``fn(labels, *, num_workers, alpha, seed) -> list[Tensor]`` (``alpha`` is the config's,
possibly None) whose result is checked like the built-ins'. When the config sets ``gamma``, the plugin
is also called with ``gamma=`` (so plugins written before that key need no change; one that takes
no ``gamma`` is refused when the config sets it).

Each shard is an int64 tensor of indices into the train set, sorted ascending; shards are
pairwise disjoint and (except for ``extreme``'s dropped remainder) cover every index.

Example:

>>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
>>> [s.tolist() for s in partition(labels, num_workers=3, method="extreme")]
[[0, 1], [2, 3], [4, 5]]
>>> [len(s) for s in partition(labels, num_workers=3, method="iid", seed=0)]
[3, 2, 2]
>>> [len(s) for s in partition(labels, num_workers=3, method="gamma_similarity", gamma=0.5, seed=0)]
[3, 2, 2]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from arcsim.registry import Registry, UnknownName
from arcsim.seeding import derive_seed, generator

__all__ = ["PARTITIONERS", "PARTITIONER_REGISTRY", "partition"]

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "gamma_similarity", "extreme")


def partition(
    labels: Tensor,
    *,
    num_workers: int,
    method: str,
    alpha: float | None = None,
    gamma: float | None = None,
    seed: int = 0,
) -> list[Tensor]:
    """Return ``num_workers`` disjoint int64 index tensors into ``labels`` (see the module docstring).

    ``alpha`` is the Dirichlet concentration: required (> 0) for ``"dirichlet"`` and must be
    ``None`` for the other built-ins. ``gamma`` is the share dealt uniformly: required (in [0, 1])
    for ``"gamma_similarity"`` and must be ``None`` for the other built-ins. ``labels`` is a 1-D
    integer tensor and is not modified.
    """
    try:
        split = PARTITIONER_REGISTRY.get(method)
    except UnknownName:
        raise ValueError(
            f"unknown partition method {method!r}; valid methods: {', '.join(PARTITIONERS)} "
            f"(or an entry point of group 'arcsim.partitioners', or package.module:callable)"
        ) from None
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    if labels.dim() != 1 or not integer:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    num_samples = labels.shape[0]
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not 1 <= num_workers <= num_samples:
        raise ValueError(
            f"num_workers must be an int in [1, {num_samples}] (the number of samples), got {num_workers!r}"
        )
    builtin = PARTITIONER_REGISTRY.is_builtin(method)  # a plugin checks its own alpha
    if builtin and method == "dirichlet":
        if alpha is None or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"the dirichlet partition needs a finite alpha > 0, got alpha={alpha}")
    elif builtin and alpha is not None:
        raise ValueError(f"alpha applies only to the dirichlet partition; got alpha={alpha} with method {method!r}")
    if builtin and method == "gamma_similarity":
        if gamma is None or not 0.0 <= gamma <= 1.0:  # NaN fails the comparison too
            raise ValueError(f"the gamma_similarity partition needs gamma in [0, 1], got gamma={gamma}")
    elif builtin and gamma is not None:
        raise ValueError(
            f"gamma applies only to the gamma_similarity partition; got gamma={gamma} with method {method!r}"
        )

    labels = labels.detach().to(device="cpu", dtype=torch.int64)
    if not builtin:
        # gamma only when set, so that a plugin written for fn(labels, *, num_workers, alpha, seed) keeps working
        extra = {} if gamma is None else {"gamma": gamma}
        if extra and not _takes_keyword(split, "gamma"):
            raise ValueError(f"partitioner {method!r} takes no gamma parameter; got gamma={gamma}")
        shards = split(labels, num_workers=num_workers, alpha=alpha, seed=seed, **extra)
        return _checked_plugin(method, shards, num_samples, num_workers)
    shards = split(labels, num_workers=num_workers, alpha=alpha, gamma=gamma, seed=seed)
    return [torch.sort(shard).values for shard in shards]


def _iid_permutation(num_samples: int, seed: int) -> Tensor:
    return torch.randperm(num_samples, generator=generator(seed, "partition", "iid"))


def _iid(labels: Tensor, *, num_workers: int, alpha: float | None, gamma: float | None, seed: int) -> list[Tensor]:
    return list(torch.tensor_split(_iid_permutation(labels.shape[0], seed), num_workers))


def _extreme(labels: Tensor, *, num_workers: int, alpha: float | None, gamma: float | None, seed: int) -> list[Tensor]:
    order = torch.sort(labels, stable=True).indices
    size = labels.shape[0] // num_workers
    return list(order[: size * num_workers].reshape(num_workers, size))


def _gamma_similarity(
    labels: Tensor, *, num_workers: int, alpha: float | None, gamma: float | None, seed: int
) -> list[Tensor]:
    assert gamma is not None  # checked by partition()
    num_samples = labels.shape[0]
    # The iid permutation, so that gamma = 1 reproduces the iid shards exactly.
    perm = _iid_permutation(num_samples, seed)
    uniform = perm[: math.floor(gamma * num_samples)]
    rest = torch.sort(perm[uniform.numel() :]).values  # index order, so that gamma = 0 is extreme's sort
    rest = rest[torch.sort(labels[rest], stable=True).indices]
    uniform_parts = torch.tensor_split(uniform, num_workers)  # the first U mod K parts are one larger
    # The sorted part's S mod K larger pieces start where the uniform part's larger ones stop, so the
    # totals differ by at most one as well.
    first_larger = uniform.numel() % num_workers
    base, larger = divmod(rest.numel(), num_workers)
    sizes = [base + int((k - first_larger) % num_workers < larger) for k in range(num_workers)]
    sorted_parts = torch.split(rest, sizes)
    return [torch.cat(pair) for pair in zip(uniform_parts, sorted_parts, strict=True)]


def _dirichlet_split(
    labels: Tensor, *, num_workers: int, alpha: float | None, gamma: float | None, seed: int
) -> list[Tensor]:
    assert alpha is not None  # checked by partition()
    return _dirichlet(labels, num_workers=num_workers, alpha=float(alpha), seed=seed)


def _dirichlet(labels: Tensor, *, num_workers: int, alpha: float, seed: int) -> list[Tensor]:
    classes = torch.unique(labels)  # sorted
    # torch's Dirichlet cannot take a generator; numpy's Generator.dirichlet is seeded and handles
    # tiny alpha (it switches to a beta-based construction instead of returning NaN).
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "partition", "dirichlet", "proportions")))
    shuffle_gen = generator(seed, "partition", "dirichlet", "shuffle")
    members = []
    counts = np.zeros((classes.numel(), num_workers), dtype=np.int64)
    for row, cls in enumerate(classes.tolist()):  # setup time: one pass per class
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=shuffle_gen)]
        members.append(idx)
        proportions = rng.dirichlet(np.full(num_workers, alpha))
        cuts = np.rint(np.cumsum(proportions) * idx.numel()).astype(np.int64)
        cuts[-1] = idx.numel()  # guard against the cumulative sum ending at 1 - eps
        counts[row] = np.diff(cuts, prepend=0)

    totals = counts.sum(axis=0)
    while (totals == 0).any():  # at most K - 1 passes; N >= K guarantees a donor with >= 2
        empty = int(np.flatnonzero(totals == 0)[0])
        donor = int(np.argmax(totals))
        row = int(np.argmax(counts[:, donor]))
        counts[row, donor] -= 1
        counts[row, empty] += 1
        totals = counts.sum(axis=0)

    pieces = [torch.split(idx, counts[row].tolist()) for row, idx in enumerate(members)]
    return [torch.cat([per_class[worker] for per_class in pieces]) for worker in range(num_workers)]


def _takes_keyword(fn: Callable[..., object], name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call decide
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _checked_plugin(method: str, shards: object, num_samples: int, num_workers: int) -> list[Tensor]:
    """A plugin's shards, as the built-ins give them: num_workers disjoint sorted int64 index tensors."""
    if not isinstance(shards, (list, tuple)) or len(shards) != num_workers:
        raise ValueError(
            f"partitioner {method!r} must return a list of {num_workers} index tensors, got {type(shards).__name__}"
        )
    out = []
    seen = torch.zeros(num_samples, dtype=torch.bool)
    for k, shard in enumerate(shards):
        integer = isinstance(shard, Tensor) and not (shard.dtype.is_floating_point or shard.dtype == torch.bool)
        if not integer or shard.dim() != 1:
            raise ValueError(f"partitioner {method!r}: shard {k} must be a 1-D integer tensor, got {shard!r:.80}")
        shard = torch.sort(shard.to(torch.int64)).values
        if shard.numel() and (int(shard[0]) < 0 or int(shard[-1]) >= num_samples):
            raise ValueError(f"partitioner {method!r}: shard {k} has indices outside [0, {num_samples})")
        if shard.numel() == 0 or bool(seen[shard].any()) or bool((shard[1:] == shard[:-1]).any()):
            raise ValueError(f"partitioner {method!r}: shard {k} is empty or shares indices with another shard")
        seen[shard] = True
        out.append(shard)
    return out


def _adapt_partitioner(name: str, obj: object) -> Callable[..., list[Tensor]]:
    if isinstance(obj, type) or not callable(obj):
        raise TypeError(f"a partitioner plugin must be a function fn(labels, *, num_workers, alpha, seed), got {obj!r}")
    return obj  # type: ignore[return-value]  # its result is checked by partition()


#: Partitioners by name: the built-ins, then entry points (group ``arcsim.partitioners``), then ``module:callable``.
PARTITIONER_REGISTRY: Registry[Callable[..., list[Tensor]]] = Registry(
    "partitioner",
    builtins={"iid": _iid, "dirichlet": _dirichlet_split, "gamma_similarity": _gamma_similarity, "extreme": _extreme},
    adapt=_adapt_partitioner,
)
