r"""Byzantine attacks: pure functions that craft the vectors the Byzantine workers submit.

The Byzantine workers are omniscient and collude. In round :math:`t` they see the honest vectors
``honest``, an ``(h, d)`` floating tensor with one row per honest worker :math:`x_1, \dots, x_h`,
and every vector-crafting attack here returns the ``(f, d)`` tensor of the vectors that the
:math:`f` = ``num_byzantine`` Byzantine workers submit (all rows equal unless the attack says
otherwise; ``num_byzantine = 0`` gives an empty ``(0, d)`` tensor).

Symbols used in every docstring:

- :math:`h` honest vectors :math:`x_1, \dots, x_h \in \mathbb{R}^d` (the rows of ``honest``);
- :math:`\mu = \frac{1}{h} \sum_i x_i`, the honest mean;
- :math:`\sigma`, the coordinate-wise *sample* standard deviation
  :math:`\sigma_k = \sqrt{\frac{1}{h-1} \sum_i ([x_i]_k - \mu_k)^2}` (Bessel's correction, as in
  ByzFL's ALIE), defined as :math:`0` when :math:`h = 1` so that every attack is well defined for
  a single honest vector;
- :math:`f` = ``num_byzantine`` and :math:`n` = ``num_workers`` (honest and Byzantine together).

Conventions: inputs are never modified; outputs are freshly allocated (never views of the input)
with the dtype and device of ``honest``; ``honest`` must be a finite 2-D floating tensor with at
least one row and one column; bad arguments raise ``ValueError`` naming the offending values.

Batches of runs: every vector-crafting attack (and ``craft``) also takes ``honest`` of shape
``(..., h, d)``, one ``(h, d)`` matrix per run along any number of leading batch dimensions, and
returns ``(..., f, d)``; batch element :math:`r` of the output is what the 2-D call returns on
element :math:`r` of the input. The work is vectorised over the batch, except the Gaussian noise
(one draw per element from its own generator: ``generator`` is then a sequence of
``torch.Generator``, one per element in row-major order of the flattened batch dimensions) and
``mimic_index`` (one small eigendecomposition per element). A batched ``honest`` must be finite
too; the error names the offending batch elements by flat (row-major) index. Agreement with the
2-D call is bitwise on CPU: each element goes through the same element-wise operations, the
factors are cast to the dtype exactly as a Python scalar is, and torch reduces each row of a
batch (means over the honest rows, norms of the search errors) in the same order as a lone
matrix; no tolerance is needed there. On other devices reductions of differently shaped tensors
may associate differently, so outputs agree to rounding and a searched factor can differ only
between candidates whose errors agree to rounding. Likewise a searched factor is the 2-D search's
when the batched ``aggregate`` returns for each element what the 2-D one does; one that agrees only
to rounding (``arcsim.robust`` states its rules' tolerances) can tip a choice only between
candidates whose errors agree to that rounding. The batched line searches are described in
``optimal_alie_tau``; ``MimicState`` is 2-D only.

``ATTACKS`` maps names to the vector-crafting attacks and ``craft`` dispatches to them by name;
``label_flip`` is a data attack (``DATA_ATTACKS``): it maps labels, and the Byzantine worker
trains on its own data with the flipped labels. ``ATTACK_REGISTRY`` resolves every attack name,
built-in or plugin (an entry point of group ``arcsim.attacks`` or ``package.module:callable``): a
vector attack is a function with ``craft``'s signature, a data attack a :class:`DataAttack` label map.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from arcsim.registry import Registry, UnknownName

__all__ = [
    "ATTACKS",
    "AttackState",
    "ATTACK_REGISTRY",
    "DATA_ATTACKS",
    "DEFAULT_ALIE_TAUS",
    "DEFAULT_FOE_TAU",
    "DEFAULT_FOE_TAUS",
    "DEFAULT_GAUSSIAN_STD",
    "DEFAULT_MAX_ELEMENTS",
    "EXPAND_CONTRACT_DEFAULTS",
    "REFINE_POINTS",
    "SEARCHES",
    "DataAttack",
    "MimicState",
    "alie",
    "alie_z_max",
    "attack_state",
    "craft",
    "data_attack",
    "foe",
    "gaussian",
    "inf",
    "is_data_attack",
    "label_flip",
    "label_map",
    "mimic",
    "mimic_index",
    "nan",
    "optimal_alie",
    "optimal_alie_tau",
    "optimal_foe",
    "optimal_foe_tau",
    "sign_flip",
]

Aggregate = Callable[[Tensor], Tensor]

#: FOE's default factor. ByzFL's ``FallOfEmpires`` sends :math:`(1 - \tau_{\mathrm{ByzFL}})\mu` with
#: :math:`\tau_{\mathrm{ByzFL}} = 3` by default, i.e. :math:`-2\mu`; in this module's convention
#: (:math:`-\tau\mu`, Xie et al.) that is :math:`\tau = 2`. Xie et al.'s small-:math:`\epsilon`
#: regime (e.g. 0.1, aimed at Krum-like rules) is one keyword away.
DEFAULT_FOE_TAU = 2.0

#: The Gaussian attack's default noise standard deviation (unit noise per coordinate).
DEFAULT_GAUSSIAN_STD = 1.0

#: Default line-search grids: 0, 0.25, ..., 10 (41 aggregator calls). Non-negative factors only,
#: as in ByzFL's line search, which starts at 0 and explores upwards.
DEFAULT_ALIE_TAUS: tuple[float, ...] = tuple(0.25 * i for i in range(41))
DEFAULT_FOE_TAUS: tuple[float, ...] = DEFAULT_ALIE_TAUS

#: Points of each refinement grid of the line search (``refinements`` > 0), end points included.
REFINE_POINTS = 11

#: The line searches of ``optimal_alie`` and ``optimal_foe``: a grid (the default) or ByzFL's schedule.
SEARCHES: tuple[str, ...] = ("grid", "expand_contract")

#: ByzFL 0.0.11's defaults for its expand/contract ("line maximize") schedule.
EXPAND_CONTRACT_DEFAULTS: Mapping[str, float] = MappingProxyType(
    {"evals": 20, "start": 0.0, "delta": 10.0, "ratio": 0.8}
)

#: Default bound on the elements (batch x candidates x n x d) of one batched aggregate call.
DEFAULT_MAX_ELEMENTS = 1 << 27


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_honest(honest: object, *, batched: bool = True) -> None:
    """Check ``honest``: a finite floating ``(h, d)`` tensor, or ``(..., h, d)`` when ``batched``."""
    if not (
        isinstance(honest, Tensor)
        and (honest.ndim == 2 or (batched and honest.ndim > 2))
        and honest.is_floating_point()
        and honest.shape[-2] >= 1
        and honest.shape[-1] >= 1
    ):
        described = (
            f"a tensor of shape {tuple(honest.shape)} and dtype {honest.dtype}"
            if isinstance(honest, Tensor)
            else f"a {type(honest).__name__}"
        )
        shapes = "(h, d), or (..., h, d) for a batch of runs," if batched else "(h, d)"
        raise ValueError(f"honest must be a 2-D floating tensor {shapes} with h >= 1 and d >= 1, got {described}")
    # A finite sum proves every entry finite (NaN and infinities propagate through a sum) in one read;
    # only a non-finite sum, which overflow can also cause, pays for the element-wise count.
    if bool(torch.isfinite(honest.sum())):
        return
    bad = int((~torch.isfinite(honest)).sum().item())
    if not bad:
        return
    if honest.ndim == 2:
        raise ValueError(f"honest must be finite, got {bad} non-finite entries")
    elements = (~torch.isfinite(honest)).flatten(-2).any(dim=-1).flatten().nonzero().flatten().tolist()
    raise ValueError(
        f"honest must be finite, got {bad} non-finite entries in batch elements {elements} "
        f"(flat row-major indices over the batch shape {tuple(honest.shape[:-2])})"
    )


def _num_elements(honest: Tensor) -> int:
    """How many runs a batched ``honest`` holds (the product of its leading dimensions)."""
    return math.prod(honest.shape[:-2])


def _check_count(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_real(name: str, value: float, *, minimum: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        bound = "" if minimum == -math.inf else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite real number{bound}, got {value!r}")
    return float(value)


def _check_num_workers(num_workers: int, *, num_honest: int, num_byzantine: int) -> int:
    _check_count("num_workers", num_workers, minimum=1)
    if num_workers < num_honest + num_byzantine:
        raise ValueError(
            f"num_workers={num_workers} is less than the {num_honest} honest vectors plus num_byzantine={num_byzantine}"
        )
    return num_workers


def _check_taus(taus: Sequence[float] | Tensor) -> list[float]:
    try:
        grid: Tensor | None = torch.as_tensor(taus, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        grid = None
    if grid is None or grid.ndim != 1 or grid.numel() == 0 or not bool(grid.isfinite().all()):
        raise ValueError(f"taus must be a non-empty 1-D sequence of finite numbers, got {taus!r}")
    return grid.tolist()


def _repeat_row(row: Tensor, num_byzantine: int) -> Tensor:
    """``num_byzantine`` fresh, contiguous copies of the (..., d) vector ``row``: (..., f, d)."""
    return row.unsqueeze(-2).repeat(*([1] * (row.ndim - 1)), num_byzantine, 1)


def _std(honest: Tensor) -> Tensor:
    """Coordinate-wise sample standard deviation (Bessel) over dim -2; zeros when there is one row.

    Written as element-wise ops plus a sum over rows: ``Tensor.std(dim=0)`` reduces along the
    strided dimension of a row-major (h, d) matrix, which is much slower on CPU.
    """
    h = honest.shape[-2]
    if honest.dim() > 2 and honest.device.type == "cpu" and honest[..., 0, :, :].nbytes > _CACHE_BYTES:
        # Large elements one at a time (the same operations, so the same bits): a batch-sized temporary
        # misses the cache and pays for fresh pages, which made the batched call several times slower.
        elements = honest.reshape(-1, *honest.shape[-2:])
        return torch.stack([_std(element) for element in elements]).reshape(*honest.shape[:-2], honest.shape[-1])
    centred = honest - honest.mean(dim=-2, keepdim=True)
    return centred.square_().sum(dim=-2).div_(max(h - 1, 1)).sqrt_()


# On the CPU, batched elements larger than this go through _std one at a time.
_CACHE_BYTES = 4 << 20


def _scaled(vector: Tensor, factors: Tensor) -> Tensor:
    """``factors[..., t] * vector[...]`` as (..., T, d), rounded as ``vector * float(factor)`` is.

    torch multiplies a tensor by a Python scalar after casting the scalar to the tensor's dtype,
    or, for float16 and bfloat16, in float32 before rounding the product back; doing the same here
    keeps a batched factor bitwise equal to the 2-D call's Python float.
    """
    dtype = vector.dtype
    opmath = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    product = factors.to(device=vector.device, dtype=opmath).unsqueeze(-1) * vector.to(opmath).unsqueeze(-2)
    return product.to(dtype)


def _alie_rows(mean: Tensor, std: Tensor, taus: Tensor) -> Tensor:
    """ALIE's vector for each factor of ``taus`` (..., T): (..., T, d)."""
    return mean.unsqueeze(-2) + _scaled(std, taus)


def _foe_rows(mean: Tensor, taus: Tensor) -> Tensor:
    """FOE's vector for each factor of ``taus`` (..., T): (..., T, d)."""
    return _scaled(mean, -taus)


# --------------------------------------------------------------------------------------------
# Vector-crafting attacks
# --------------------------------------------------------------------------------------------


def sign_flip(honest: Tensor, *, num_byzantine: int) -> Tensor:
    r"""Sign flipping (SF): every Byzantine vector is minus the honest mean.

    .. math::

        b_j = -\mu = -\frac{1}{h} \sum_{i=1}^{h} x_i, \qquad j = 1, \dots, f

    Reference: Allen-Zhu, Ebrahimianghazani, Li and Alistarh, "Byzantine-resilient non-convex
    stochastic gradient descent", ICLR 2021 (arXiv 2020); docs/paper.md, "The attacks".

    >>> sign_flip(torch.tensor([[1., 2.], [3., 4.], [5., 6.]]), num_byzantine=2)
    tensor([[-3., -4.],
            [-3., -4.]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    return _repeat_row(-honest.mean(dim=-2), num_byzantine)


def foe(honest: Tensor, *, num_byzantine: int, tau: float = DEFAULT_FOE_TAU) -> Tensor:
    r"""Fall of empires / inner-product manipulation (FOE, IPM): minus ``tau`` times the mean.

    .. math::

        b_j = -\tau \mu, \qquad j = 1, \dots, f

    where :math:`\tau` is the attack factor (any finite real; :math:`\tau > 0` makes the inner
    product of the aggregate with :math:`\mu` negative when the Byzantine vectors dominate).
    The default :math:`\tau = 2` equals ByzFL's ``FallOfEmpires()`` default, which is written
    :math:`(1 - \tau')\mu` with :math:`\tau' = 3` (see ``DEFAULT_FOE_TAU``); Xie et al. use small
    factors such as 0.1 against Krum-like rules. ``tau = 1`` is sign flipping.

    Reference: Xie, Koyejo and Gupta, "Fall of empires: breaking Byzantine-tolerant SGD by inner
    product manipulation", UAI 2019, PMLR 115 (2020).

    >>> foe(torch.tensor([[1., 2.], [3., 4.], [5., 6.]]), num_byzantine=1, tau=0.5)
    tensor([[-1.5000, -2.0000]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    tau = _check_real("tau", tau)
    return _repeat_row(honest.mean(dim=-2) * -tau, num_byzantine)


def alie_z_max(*, num_workers: int, num_byzantine: int) -> float:
    r"""ALIE's factor :math:`z_{\max}` derived from :math:`n` and :math:`f` (Baruch et al. 2019).

    .. math::

        s = \left\lfloor \frac{n}{2} + 1 \right\rfloor - f, \qquad
        z_{\max} = \Phi^{-1}\!\left(\frac{n - s}{n}\right)

    where :math:`\Phi` is the standard normal CDF and :math:`s` is the number of honest workers
    the attackers need "on their side" for a majority. :math:`s` is computed with integer
    arithmetic (:math:`n // 2 + 1 - f`), and :math:`1 \le s \le n - 1` is required for a finite
    :math:`z_{\max}` (so :math:`f \le \lfloor n/2 \rfloor`, and :math:`n \ge 3` when
    :math:`f = 0`). Some implementations use :math:`\Phi^{-1}((n - f - s)/(n - f))` instead;
    this function follows the paper's formula.

    Reference: Baruch, Baruch and Goldberg, "A little is enough: circumventing defenses for
    distributed learning", NeurIPS 2019.

    >>> round(alie_z_max(num_workers=13, num_byzantine=3), 6)  # s = 4, Phi^-1(9/13)
    0.502402
    """
    n = _check_count("num_workers", num_workers, minimum=1)
    f = _check_count("num_byzantine", num_byzantine, minimum=0)
    s = n // 2 + 1 - f
    if not 1 <= s <= n - 1:
        raise ValueError(
            f"ALIE's z_max is infinite for num_workers={n}, num_byzantine={f}: "
            f"s = n // 2 + 1 - f = {s} is outside [1, n - 1]; pass tau explicitly"
        )
    return NormalDist().inv_cdf((n - s) / n)


def alie(honest: Tensor, *, num_byzantine: int, num_workers: int, tau: float | None = None) -> Tensor:
    r"""A little is enough (ALIE): the mean shifted by ``tau`` coordinate-wise standard deviations.

    .. math::

        b_j = \mu + \tau \sigma, \qquad j = 1, \dots, f

    where :math:`\sigma` is the coordinate-wise sample standard deviation (zero for
    :math:`h = 1`, see the module docstring) and :math:`\tau` is the attack factor;
    ``tau=None`` takes :math:`\tau = z_{\max}(n, f)` from ``alie_z_max``.

    Sign convention: :math:`\mu + \tau\sigma`, as in the paper (docs/paper.md) and ByzFL's ``ALittleIsEnough``, so
    that :math:`\tau` means the same here as in the reference code. Baruch et al. write the shift
    as :math:`\mu - z\sigma`; that is ``tau=-z``. The two are mirror images around
    :math:`\mu` and, for a coordinate-wise rule, neither is stronger a priori; the optimal
    variant (``optimal_alie``) searches the factor against the actual aggregator.

    Reference: Baruch, Baruch and Goldberg, "A little is enough: circumventing defenses for
    distributed learning", NeurIPS 2019.

    >>> x = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])  # mu = [3, 4], sigma = [2, 2]
    >>> alie(x, num_byzantine=1, num_workers=4, tau=1.0)
    tensor([[5., 6.]])
    >>> alie(x, num_byzantine=2, num_workers=5)  # s = 1, z_max = Phi^-1(4/5) = 0.8416
    tensor([[4.6832, 5.6832],
            [4.6832, 5.6832]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    _check_num_workers(num_workers, num_honest=honest.shape[-2], num_byzantine=num_byzantine)
    if tau is None:
        if num_byzantine == 0:  # nothing to craft; z_max may be undefined for f = 0
            return honest.new_empty((*honest.shape[:-2], 0, honest.shape[-1]))
        tau = alie_z_max(num_workers=num_workers, num_byzantine=num_byzantine)
    else:
        tau = _check_real("tau", tau)
    return _repeat_row(honest.mean(dim=-2) + tau * _std(honest), num_byzantine)


def mimic_index(honest: Tensor) -> int | Tensor:
    r"""The honest worker Mimic copies: the one farthest along the top principal direction.

    .. math::

        C = X - \mathbf{1}\mu^\top, \qquad
        v = \arg\max_{\|v\| = 1} \|C v\|, \qquad
        i^\star = \arg\max_{i} |\langle x_i - \mu, v \rangle|

    where :math:`X` is ``honest`` and :math:`v` is the top eigenvector of the honest covariance
    (the top right singular vector of :math:`C`). Since :math:`C v = s_1 u_1`, with
    :math:`u_1` the top eigenvector of the :math:`h \times h` Gram matrix :math:`C C^\top`,
    :math:`i^\star = \arg\max_i |[C C^\top u_1]_i|`; that Gram matrix is what is computed
    (one :math:`O(h^2 d)` product, far cheaper than an SVD of the :math:`(h, d)` matrix when
    :math:`h \ll d`; no :math:`d \times d` matrix is formed). Ties, including
    the all-equal case where :math:`C = 0`, go to the lowest index.

    Reference: Karimireddy, He and Jaggi, "Byzantine-robust learning on heterogeneous datasets
    via bucketing", ICLR 2022 (the Mimic attack; they learn :math:`v` online, see
    ``MimicState``).

    For a batch ``(..., h, d)`` it returns a ``torch.long`` tensor of shape ``(...,)`` on
    ``honest``'s device, element :math:`r` being the 2-D call's index on element :math:`r`
    (computed element by element: the eigendecomposition is of an :math:`h \times h` matrix).

    >>> mimic_index(torch.tensor([[0., 0.], [1., 0.], [5., 0.]]))  # |x_i - mu| = 2, 1, 3 along e_1
    2
    >>> mimic_index(torch.tensor([[[0.], [1.], [5.]], [[0.], [4.], [5.]]]))
    tensor([2, 0])
    """
    _check_honest(honest)
    if honest.ndim > 2:
        flat = honest.reshape(-1, *honest.shape[-2:])
        indices = [_mimic_index(flat[r]) for r in range(flat.shape[0])]
        return torch.tensor(indices, dtype=torch.long, device=honest.device).reshape(honest.shape[:-2])
    return _mimic_index(honest)


def _mimic_index(honest: Tensor) -> int:
    centred = honest - honest.mean(dim=0)
    gram = (centred @ centred.T).to(torch.float64)
    # gram @ u_1 = s_1^2 u_1: the projections up to a positive factor, and exactly 0 when C = 0.
    projections = gram @ torch.linalg.eigh(gram).eigenvectors[:, -1]
    return int(projections.abs().argmax().item())


def mimic(
    honest: Tensor,
    *,
    num_byzantine: int,
    index: int | None = None,
    learn_steps: int | None = None,
    state: MimicState | Sequence[MimicState] | None = None,
) -> Tensor:
    r"""Mimic: every Byzantine vector copies one honest worker's vector.

    .. math::

        b_j = x_{i^\star}, \qquad j = 1, \dots, f

    where :math:`i^\star` is ``index`` (0-based row of ``honest``) when given, and otherwise
    ``mimic_index(honest)``, the worker farthest along the top principal direction of this
    round's honest vectors (maximising the apparent heterogeneity). This stateless rule picks
    :math:`i^\star` afresh every round; ``MimicState`` is the online variant of Karimireddy et al.
    that learns the direction over warm-up rounds and then sticks to one worker: with
    ``learn_steps=T`` (the paper's protocol learns over the first 200 steps), ``state`` is the run's
    ``MimicState(learn_steps=T)``, kept by the caller from round to round (``attack_state`` makes
    it), and row :math:`i_t` of that state is copied. For a batch, ``index`` (an int) names the same
    row in every element, ``index=None`` takes each element's own ``mimic_index``, and ``state`` is
    a sequence of states, one per element in row-major order.

    Reference: Karimireddy, He and Jaggi, "Byzantine-robust learning on heterogeneous datasets
    via bucketing", ICLR 2022.

    >>> mimic(torch.tensor([[0., 0.], [1., 0.], [5., 0.]]), num_byzantine=2)
    tensor([[5., 0.],
            [5., 0.]])
    >>> mimic(torch.tensor([[0., 0.], [1., 0.], [5., 0.]]), num_byzantine=1, index=1)
    tensor([[1., 0.]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    h = honest.shape[-2]
    if learn_steps is not None:
        return _learned_mimic(honest, num_byzantine=num_byzantine, index=index, learn_steps=learn_steps, state=state)
    if state is not None:
        raise ValueError("mimic takes a state only with learn_steps (the rounds over which it learns its target)")
    if index is None and honest.ndim > 2:
        chosen = mimic_index(honest)
        assert isinstance(chosen, Tensor)
        gather = chosen[..., None, None].expand(*chosen.shape, 1, honest.shape[-1])
        return _repeat_row(torch.take_along_dim(honest, gather, dim=-2).squeeze(-2), num_byzantine)
    if index is None:
        index = mimic_index(honest)
    elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < h:
        raise ValueError(f"index must be an int in [0, {h - 1}] (a row of honest), got {index!r}")
    return _repeat_row(honest[..., index, :], num_byzantine)


@runtime_checkable
class AttackState(Protocol):
    """What an attack keeps across the rounds of one run (:func:`attack_state`): the engines pass it to
    :func:`craft` as ``state`` and keep :meth:`state_dict` in the run's checkpoints."""

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON values and CPU tensors that :meth:`load_state_dict` restores."""
        ...

    def load_state_dict(self, values: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        """Restore a :meth:`state_dict`; ValueError when it cannot be this state's."""
        ...


def _learned_mimic(
    honest: Tensor,
    *,
    num_byzantine: int,
    index: int | None,
    learn_steps: int,
    state: MimicState | Sequence[MimicState] | None,
) -> Tensor:
    _check_count("learn_steps", learn_steps, minimum=1)
    if index is not None:
        raise ValueError("mimic takes index (a fixed target) or learn_steps (a learned one), not both")
    states = [state] if isinstance(state, MimicState) else list(state) if isinstance(state, Sequence) else None
    count = _num_elements(honest) if honest.ndim > 2 else 1
    if states is None or len(states) != count or not all(isinstance(s, MimicState) for s in states):
        raise ValueError(
            f"mimic with learn_steps needs the run's state: a MimicState(learn_steps={learn_steps})"
            + (f", or a sequence of {count}, one per batch element" if honest.ndim > 2 else "")
            + f" (arcsim.attacks.attack_state makes it), got {state!r}"
        )
    if any(s.learn_steps != learn_steps for s in states):
        raise ValueError(f"mimic: a state learns over {states[0].learn_steps} rounds, not learn_steps={learn_steps}")
    if honest.ndim == 2:
        return states[0](honest, num_byzantine=num_byzantine)
    flat = honest.reshape(count, *honest.shape[-2:])
    out = torch.stack([s(flat[r], num_byzantine=num_byzantine) for r, s in enumerate(states)])
    return out.reshape(*honest.shape[:-2], num_byzantine, honest.shape[-1])


class MimicState:
    r"""Online Mimic (Karimireddy et al. 2022): learn the direction during warm-up, then stick.

    For the first ``learn_steps`` calls (rounds) it refines a running mean :math:`\mu_t` and a unit
    direction :math:`z_t` (one power-iteration step per round on the running covariance),

    .. math::

        \mu_t = \tfrac{t-1}{t}\mu_{t-1} + \tfrac{1}{t}\bar{x}^{(t)}, \qquad
        g_t = \sum_i \langle x_i - \mu_t, z_{t-1} \rangle (x_i - \mu_t), \qquad
        z_t = \mathrm{normalize}\!\left(\tfrac{t-1}{t} z_{t-1}
              + \tfrac{1}{t}\,\mathrm{normalize}(g_t)\right)

    and copies :math:`i_t = \arg\max_i |\langle x_i - \mu_t, z_t \rangle|` (lowest index on
    ties). :math:`\bar{x}^{(t)}` is round :math:`t`'s honest mean, :math:`t = 1, 2, \dots` counts
    warm-up rounds, and :math:`z_1` is the first round's top principal direction (instead of a
    random start, so no generator is needed; a zero :math:`z`, after rounds where all honest
    vectors coincide, restarts the same way). After warm-up the index
    :math:`i^\star = i_{T}` is frozen and every later call copies row :math:`i^\star`.

    The state is ``rounds_seen``, ``running_mean``, ``direction`` and ``index``; :meth:`state_dict`
    and :meth:`load_state_dict` save and restore it (the engines keep it in each run's checkpoint,
    so a resumed run goes on learning where it stopped). ``mimic(..., learn_steps=T, state=...)``
    is how a run uses it (``attack_params: {learn_steps: T}``; :func:`attack_state` makes the
    state); the stateless per-round rule is ``mimic`` without ``learn_steps``. It takes 2-D
    ``(h, d)`` input only (one run's state): a batch of runs needs one ``MimicState`` per run.

    >>> state = MimicState(learn_steps=1)
    >>> state(torch.tensor([[0., 0.], [1., 0.], [5., 0.]]), num_byzantine=1)
    tensor([[5., 0.]])
    >>> state.index
    2
    >>> state(torch.tensor([[9., 9.], [8., 8.], [7., 7.]]), num_byzantine=1)  # frozen
    tensor([[7., 7.]])
    """

    def __init__(self, *, learn_steps: int) -> None:
        self.learn_steps = _check_count("learn_steps", learn_steps, minimum=1)
        self.rounds_seen = 0
        self.running_mean: Tensor | None = None
        self.direction: Tensor | None = None
        self.index: int | None = None

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The state as JSON values (``learn_steps``, ``rounds_seen``, ``index``) and tensors (``running_mean``
        and ``direction`` while it learns: after its first round and until its index is fixed)."""
        values = {"learn_steps": self.learn_steps, "rounds_seen": self.rounds_seen, "index": self.index}
        tensors = {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in (("running_mean", self.running_mean), ("direction", self.direction))
            if tensor is not None
        }
        return values, tensors

    def load_state_dict(self, values: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
        """Restore a :meth:`state_dict`; ValueError when it is another ``learn_steps``' or inconsistent."""
        if values.get("learn_steps") != self.learn_steps:
            raise ValueError(
                f"a Mimic state learned over learn_steps={values.get('learn_steps')!r} rounds cannot continue "
                f"one of learn_steps={self.learn_steps}"
            )
        rounds_seen, index = values.get("rounds_seen"), values.get("index")
        learn_steps = self.learn_steps
        if isinstance(rounds_seen, bool) or not isinstance(rounds_seen, int) or not 0 <= rounds_seen <= learn_steps:
            raise ValueError(f"a Mimic state's rounds_seen must be an int in [0, {learn_steps}], got {rounds_seen!r}")
        if (index is None) != (rounds_seen < self.learn_steps) or (
            index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0)
        ):
            raise ValueError(f"a Mimic state with rounds_seen={rounds_seen} cannot have index={index!r}")
        if set(tensors) != ({"running_mean", "direction"} if 0 < rounds_seen < self.learn_steps else set()):
            raise ValueError(f"a Mimic state with rounds_seen={rounds_seen} cannot have the tensors {sorted(tensors)}")
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) > 1 or any(t.ndim != 1 or not t.is_floating_point() for t in tensors.values()):
            raise ValueError(
                f"a Mimic state's running_mean and direction must be floating vectors of one length, got {shapes}"
            )
        self.rounds_seen, self.index = rounds_seen, index
        self.running_mean = tensors.get("running_mean")
        self.direction = tensors.get("direction")

    def __call__(self, honest: Tensor, *, num_byzantine: int) -> Tensor:
        _check_honest(honest, batched=False)
        _check_count("num_byzantine", num_byzantine, minimum=0)
        if self.index is not None:
            # Rows are the round's honest vectors in worker order; a round short of some (refused, late)
            # has fewer rows, and then the last one stands in for a target beyond them.
            return mimic(honest, num_byzantine=num_byzantine, index=min(self.index, honest.shape[0] - 1))
        chosen = self._learn(honest)
        if self.rounds_seen == self.learn_steps:
            self.index = chosen
            self.running_mean = self.direction = None  # learned: only the index matters from now on
        return mimic(honest, num_byzantine=num_byzantine, index=chosen)

    def _learn(self, honest: Tensor) -> int:
        if self.running_mean is not None and self.running_mean.shape[0] != honest.shape[1]:
            raise ValueError(
                f"honest has d={honest.shape[1]} coordinates but earlier rounds had d={self.running_mean.shape[0]}"
            )
        t = self.rounds_seen + 1
        round_mean = honest.mean(dim=0)
        if self.running_mean is not None:  # restored from a checkpoint: on the CPU, in its dtype
            self.running_mean = self.running_mean.to(honest.device, honest.dtype)
        if self.direction is not None:
            self.direction = self.direction.to(honest.device, honest.dtype)
        if self.running_mean is None:
            self.running_mean = round_mean
        else:
            self.running_mean = self.running_mean * ((t - 1) / t) + round_mean / t
        centred = honest - self.running_mean
        if self.direction is None or not bool(self.direction.any()):
            # Start (or restart, after rounds with no spread) from this round's top direction.
            gram = (centred @ centred.T).to(torch.float64)
            top = torch.linalg.eigh(gram).eigenvectors[:, -1].to(centred.dtype)
            self.direction = torch.nn.functional.normalize(centred.T @ top, dim=0)
        else:
            step = centred.T @ (centred @ self.direction)
            step = torch.nn.functional.normalize(step, dim=0)
            self.direction = torch.nn.functional.normalize(self.direction * ((t - 1) / t) + step / t, dim=0)
        self.rounds_seen = t
        return int((centred @ self.direction).abs().argmax().item())


def gaussian(
    honest: Tensor,
    *,
    num_byzantine: int,
    generator: torch.Generator | Sequence[torch.Generator],
    std: float = DEFAULT_GAUSSIAN_STD,
) -> Tensor:
    r"""Gaussian: the honest mean plus independent Gaussian noise in every Byzantine vector.

    .. math::

        b_j = \mu + \xi_j, \qquad \xi_j \sim \mathcal{N}(0, \mathrm{std}^2 I_d)
        \text{ independent}, \qquad j = 1, \dots, f

    The noise is drawn from ``generator`` on the generator's device, in ``honest``'s dtype, as
    one ``(f, d)`` block (row :math:`j` is Byzantine worker :math:`j`'s), then moved to
    ``honest``'s device: the same generator state gives the same vectors whatever the device of
    ``honest``. Seed the generator with ``arcsim.seeding.generator(seed, "attack", round)``.

    For a batch ``(..., h, d)``, ``generator`` is a sequence of ``torch.Generator``, one per batch
    element in row-major order of the flattened batch dimensions; element :math:`r` draws its
    ``(f, d)`` block from ``generator[r]`` exactly as the 2-D call with that generator does.

    Reference: Gaussian Byzantine values as in Xie, Koyejo and Gupta, "Generalized
    Byzantine-tolerant SGD", arXiv:1802.10116 (2018), here centred at the honest mean.

    >>> x = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])
    >>> gaussian(x, num_byzantine=2, generator=torch.Generator().manual_seed(0), std=0.0)
    tensor([[3., 4.],
            [3., 4.]])
    >>> gaussian(x, num_byzantine=3, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 2])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    std = _check_real("std", std, minimum=0.0)
    if honest.ndim > 2:
        generators = _check_generators(generator, _num_elements(honest))
        shape = (num_byzantine, honest.shape[-1])
        noise = torch.stack(
            [_draw_noise(g, shape, honest) for g in generators] if generators else [honest.new_empty((0, *shape))]
        ).reshape(*honest.shape[:-2], *shape)
        return honest.mean(dim=-2, keepdim=True) + std * noise
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {generator!r}")
    noise = _draw_noise(generator, (num_byzantine, honest.shape[1]), honest)
    return honest.mean(dim=0) + std * noise


def _draw_noise(generator: torch.Generator, shape: tuple[int, int], honest: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` drawn on the generator's device, moved to ``honest``'s."""
    return torch.randn(shape, generator=generator, dtype=honest.dtype, device=generator.device).to(honest.device)


def _check_generators(generator: object, count: int) -> list[torch.Generator]:
    """A batched call's generators: a sequence of ``count`` torch.Generator, one per batch element."""
    if (
        isinstance(generator, torch.Generator)
        or not isinstance(generator, Sequence)
        or len(generator) != count
        or not all(isinstance(g, torch.Generator) for g in generator)
    ):
        raise ValueError(
            f"generator must be a sequence of {count} torch.Generator for a batch of {count} runs "
            f"(one per batch element, row-major), got {generator!r}"
        )
    return list(generator)


def inf(honest: Tensor, *, num_byzantine: int) -> Tensor:
    r"""Infinity: vectors full of :math:`+\infty` (a malformed submission to reject at the edge).

    .. math::

        b_j = (+\infty, \dots, +\infty) \in \mathbb{R}^d, \qquad j = 1, \dots, f

    Reference: ByzFL's ``Inf`` attack (Allouah et al., "Boosting robustness by clipping
    gradients in distributed learning", arXiv:2405.14432, use ByzFL's attack suite).

    >>> inf(torch.tensor([[1., 2.], [3., 4.]]), num_byzantine=1)
    tensor([[inf, inf]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    shape = (*honest.shape[:-2], num_byzantine, honest.shape[-1])
    return torch.full(shape, math.inf, dtype=honest.dtype, device=honest.device)


def nan(honest: Tensor, *, num_byzantine: int) -> Tensor:
    r"""NaN: vectors full of NaN (a malformed submission to reject at the edge).

    .. math::

        b_j = (\mathrm{NaN}, \dots, \mathrm{NaN}) \in \mathbb{R}^d, \qquad j = 1, \dots, f

    Reference: the bad-value counterpart of ByzFL's ``Inf`` attack (see ``inf``).

    >>> nan(torch.tensor([[1., 2.], [3., 4.]]), num_byzantine=1)
    tensor([[nan, nan]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    shape = (*honest.shape[:-2], num_byzantine, honest.shape[-1])
    return torch.full(shape, math.nan, dtype=honest.dtype, device=honest.device)


# --------------------------------------------------------------------------------------------
# Optimal (line-searched) attacks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Search:
    """Validated settings of a line search (``kind`` is one of ``SEARCHES``)."""

    kind: str
    taus: tuple[float, ...] = ()
    refinements: int = 0
    evals: int = 0
    start: float = 0.0
    delta: float = 0.0
    ratio: float = 0.0
    max_elements: int = DEFAULT_MAX_ELEMENTS


def _check_search(
    default_taus: Sequence[float],
    search: str,
    taus: Sequence[float] | Tensor | None,
    refinements: int,
    evals: int | None,
    start: float | None,
    delta: float | None,
    ratio: float | None,
    max_elements: int,
) -> _Search:
    """The public functions' search keywords, validated (positional: they forward them in this order)."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(map(repr, SEARCHES))}, got {search!r}")
    _check_count("max_elements", max_elements, minimum=1)
    if search == "grid":
        schedule = {"evals": evals, "start": start, "delta": delta, "ratio": ratio}
        given = [name for name, value in schedule.items() if value is not None]
        if given:
            raise ValueError(
                f"{given} are parameters of search='expand_contract'; search='grid' takes taus and refinements"
            )
        grid = _check_taus(default_taus if taus is None else taus)
        _check_count("refinements", refinements, minimum=0)
        return _Search("grid", taus=tuple(grid), refinements=refinements, max_elements=max_elements)
    given = [name for name, unset in (("taus", taus is None), ("refinements", refinements == 0)) if not unset]
    if given:
        raise ValueError(
            f"{given} are parameters of search='grid'; search='expand_contract' takes evals, start, delta and ratio"
        )
    defaults = EXPAND_CONTRACT_DEFAULTS
    delta = _check_real("delta", defaults["delta"] if delta is None else delta)
    if delta == 0:
        raise ValueError("delta must be a non-zero finite real number (the first step), got 0.0")
    ratio = defaults["ratio"] if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.5 < ratio < 1:
        raise ValueError(f"ratio must be a real number in (0.5, 1), as in ByzFL, got {ratio!r}")
    return _Search(
        "expand_contract",
        evals=_check_count("evals", defaults["evals"] if evals is None else evals, minimum=1),
        start=_check_real("start", defaults["start"] if start is None else start),
        delta=delta,
        ratio=float(ratio),
        max_elements=max_elements,
    )


def _expand_contract(error_at: Callable[[float], float], settings: _Search) -> float:
    """ByzFL's line-maximize schedule, one evaluation at a time (see ``optimal_alie_tau``)."""
    best = settings.start
    best_error = error_at(best)
    step = settings.delta
    expanding = True
    for _ in range(settings.evals - 1):
        point = best + step
        error = error_at(point)
        improved = error > best_error
        if improved:
            best, best_error = point, error
        step = step * 2.0 if expanding and improved else step * settings.ratio
        expanding = expanding and improved
    return best


def _line_search(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    vector_for: Callable[[float], Tensor],
    settings: _Search,
) -> float:
    """The 2-D search: one aggregate call per candidate factor."""
    honest_mean = honest.mean(dim=0)
    d = honest.shape[1]

    def error_at(tau: float) -> float:
        byzantine = _repeat_row(vector_for(tau), num_byzantine)
        output = aggregate(torch.cat([honest, byzantine], dim=0))
        if not isinstance(output, Tensor) or tuple(output.shape) != (d,):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"aggregate must return a ({d},) tensor, got {shape} at tau={tau}")
        error = float(torch.linalg.vector_norm(output - honest_mean).item())
        if not math.isfinite(error):
            raise ValueError(f"aggregate returned a non-finite vector at tau={tau}")
        return error

    if settings.kind == "expand_contract":
        return _expand_contract(error_at, settings)

    errors: dict[float, float] = {}

    def evaluate(tau: float) -> None:
        if tau not in errors:
            errors[tau] = error_at(tau)

    def best() -> float:  # largest error; the smallest tau among equals
        return min(errors, key=lambda tau: (-errors[tau], tau))

    for tau in settings.taus:
        evaluate(tau)
    for _ in range(settings.refinements):
        centre = best()
        below = [tau for tau in errors if tau < centre]
        above = [tau for tau in errors if tau > centre]
        low = max(below) if below else centre
        high = min(above) if above else centre
        if low == high:
            break
        for tau in torch.linspace(low, high, REFINE_POINTS, dtype=torch.float64).tolist():
            evaluate(tau)
    return best()


def _best(taus: Tensor, errors: Tensor) -> Tensor:
    """Per element, the factor of largest error, the smallest among equals: (..., K) -> (...,)."""
    top = errors.amax(dim=-1, keepdim=True)
    return torch.where(errors == top, taus, math.inf).amin(dim=-1)


def _batched_line_search(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    rows_for: Callable[[Tensor], Tensor],
    settings: _Search,
) -> Tensor:
    """The batched search: ``rows_for`` maps factors (..., T) to Byzantine vectors (..., T, d)."""
    batch = honest.shape[:-2]
    h, d = honest.shape[-2:]
    device = honest.device
    if _num_elements(honest) == 0:
        return torch.empty(batch, dtype=torch.float64, device=device)
    honest_mean = honest.mean(dim=-2).unsqueeze(-2)
    chunk = max(1, settings.max_elements // (_num_elements(honest) * (h + num_byzantine) * d))

    def errors_at(taus: Tensor) -> Tensor:  # (..., T) float64 -> (..., T) float64, -inf where non-finite
        parts = []
        for first in range(0, taus.shape[-1], chunk):
            part = taus[..., first : first + chunk]
            count = part.shape[-1]
            stacked = torch.cat(
                [
                    honest.unsqueeze(-3).expand(*batch, count, h, d),
                    rows_for(part).unsqueeze(-2).expand(*batch, count, num_byzantine, d),
                ],
                dim=-2,
            )
            output = aggregate(stacked)
            expected = (*batch, count, d)
            if not isinstance(output, Tensor) or tuple(output.shape) != expected:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(
                    f"aggregate must return a {expected} tensor for its {tuple(stacked.shape)} input, got {shape}"
                )
            error = torch.linalg.vector_norm(output - honest_mean, dim=-1).to(torch.float64)
            parts.append(torch.where(error.isfinite(), error, -math.inf))
        return torch.cat(parts, dim=-1)

    if settings.kind == "expand_contract":
        best = torch.full(batch, settings.start, dtype=torch.float64, device=device)
        best_error = errors_at(best.unsqueeze(-1)).squeeze(-1)
        step = torch.full(batch, settings.delta, dtype=torch.float64, device=device)
        expanding = torch.ones(batch, dtype=torch.bool, device=device)
        for _ in range(settings.evals - 1):
            point = best + step
            error = errors_at(point.unsqueeze(-1)).squeeze(-1)
            improved = error > best_error
            best = torch.where(improved, point, best)
            best_error = torch.where(improved, error, best_error)
            step = torch.where(expanding & improved, step * 2.0, step * settings.ratio)
            expanding = expanding & improved
        return best

    # The 2-D search evaluates each distinct factor once, the first spelling winning (as a dict key).
    grid = torch.tensor(list(dict.fromkeys(settings.taus)), dtype=torch.float64, device=device)
    taus = grid.expand(*batch, grid.numel())
    errors = errors_at(taus)
    earlier = torch.ones(REFINE_POINTS, REFINE_POINTS, dtype=torch.bool, device=device).tril(-1)
    for _ in range(settings.refinements):
        centre = _best(taus, errors).unsqueeze(-1)
        below = torch.where(taus < centre, taus, -math.inf).amax(dim=-1, keepdim=True)
        above = torch.where(taus > centre, taus, math.inf).amin(dim=-1, keepdim=True)
        low = torch.where(below.isfinite(), below, centre)
        high = torch.where(above.isfinite(), above, centre)
        if bool((low == high).all()):
            break
        # torch.linspace's rounding (which depends on the CPU's vector width) is reproduced by calling it
        # per element: REFINE_POINTS scalars each; the aggregate call below stays one batched call.
        ends = zip(low.flatten().tolist(), high.flatten().tolist(), strict=True)
        points = torch.stack([torch.linspace(a, b, REFINE_POINTS, dtype=torch.float64) for a, b in ends])
        points = points.reshape(*batch, REFINE_POINTS).to(device)
        new_errors = errors_at(points)
        # A factor evaluated before keeps its first error (the 2-D search skips it), and an element whose
        # neighbours coincide (the 2-D search stops refining) only meets its centre again.
        seen = (points.unsqueeze(-1) == taus.unsqueeze(-2)).any(dim=-1)
        seen |= ((points.unsqueeze(-1) == points.unsqueeze(-2)) & earlier).any(dim=-1)
        taus = torch.cat([taus, points], dim=-1)
        errors = torch.cat([errors, torch.where(seen, -math.inf, new_errors)], dim=-1)
    return _best(taus, errors)


def _optimal_search(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    attack: str,
    settings: _Search,
) -> float | Tensor:
    """Run the search for ALIE (``mu + tau sigma``) or FOE (``-tau mu``) on 2-D or batched ``honest``."""
    if honest.ndim == 2:
        mean = honest.mean(dim=0)
        if attack == "alie":
            std = _std(honest)
            return _line_search(
                honest,
                num_byzantine=num_byzantine,
                aggregate=aggregate,
                vector_for=lambda tau: mean + tau * std,
                settings=settings,
            )
        return _line_search(
            honest,
            num_byzantine=num_byzantine,
            aggregate=aggregate,
            vector_for=lambda tau: mean * -tau,
            settings=settings,
        )
    mean = honest.mean(dim=-2)
    if attack == "alie":
        std = _std(honest)
        rows_for: Callable[[Tensor], Tensor] = lambda taus: _alie_rows(mean, std, taus)  # noqa: E731
    else:
        rows_for = lambda taus: _foe_rows(mean, taus)  # noqa: E731
    return _batched_line_search(
        honest, num_byzantine=num_byzantine, aggregate=aggregate, rows_for=rows_for, settings=settings
    )


def _check_aggregate(aggregate: object) -> None:
    if not callable(aggregate):
        raise ValueError(
            "aggregate must be a callable (n, d) -> (d,), or (..., T, n, d) -> (..., T, d) for a batch, "
            f"got {aggregate!r}"
        )


def optimal_alie_tau(
    honest: Tensor,
    *,
    num_byzantine: int,
    num_workers: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
    search: str = "grid",
    evals: int | None = None,
    start: float | None = None,
    delta: float | None = None,
    ratio: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> float | Tensor:
    r"""The ALIE factor that pushes ``aggregate`` farthest from the honest mean (a line search).

    .. math::

        \tau^\star = \arg\max_{\tau \in T}
            \big\| F(x_1, \dots, x_h, b(\tau), \dots, b(\tau)) - \mu \big\|_2,
        \qquad b(\tau) = \mu + \tau\sigma

    where :math:`F` is ``aggregate`` (it receives the ``(h + f, d)`` stack, honest rows first,
    and returns a ``(d,)`` vector; it should be the coordinator's whole pipeline, e.g. ARC then
    NNM then CWTM) and :math:`T` is the set of candidates the search evaluates. ``num_workers``
    is only checked (:math:`n \ge h + f`), for a signature that matches ``alie``.

    ``search="grid"`` (the default): :math:`T` is ``taus`` (default ``DEFAULT_ALIE_TAUS``: 0,
    0.25, ..., 10). Each of the ``refinements`` extra rounds evaluates ``REFINE_POINTS`` evenly
    spaced factors between the evaluated neighbours of the current best (an end point of the grid
    is its own neighbour on the open side); a factor already evaluated keeps its first error.
    Ties go to the smallest :math:`\tau`.

    ``search="expand_contract"``: ByzFL 0.0.11's line-maximize schedule (the ``Optimal_ALittleIsEnough``
    and ``Optimal_InnerProductManipulation`` attacks the paper's experiments use), with its defaults
    ``evals=20``, ``start=0.0``, ``delta=10.0``, ``ratio=0.8`` (``EXPAND_CONTRACT_DEFAULTS``; None
    takes the default). Exactly ``evals`` candidates are evaluated, in this order:

    1. :math:`p_0` = ``start``; it becomes the best point :math:`b` with error :math:`e_b`; the
       step is :math:`s` = ``delta`` and the phase is *expanding*.
    2. For :math:`k = 1, \dots,` ``evals`` :math:`- 1`: evaluate :math:`p_k = b + s` (with
       :math:`b` and :math:`s` as they are before step :math:`k`). It *improves* when its error is
       strictly larger than :math:`e_b` (an equal error keeps the earlier point, as ByzFL's
       ``>``); then :math:`b = p_k`. While expanding, an improvement doubles :math:`s`, and the
       first non-improvement multiplies :math:`s` by ``ratio`` and switches to *contracting* for
       good; while contracting, :math:`s` is multiplied by ``ratio`` after every evaluation.
    3. The result is :math:`b`.

    So candidates always lie on ``delta``'s side of the current best (the schedule never looks
    back), a factor may be evaluated twice (as in ByzFL), and the defaults give
    :math:`0, 10, 30, 70, \dots` while the error keeps growing. ``evals`` is an int >= 1,
    ``start`` a finite real, ``delta`` a non-zero finite real and ``ratio`` a real in
    :math:`(0.5, 1)` (ByzFL's range); ``taus`` and ``refinements`` belong to the grid and are
    refused here, as ``evals``/``start``/``delta``/``ratio`` are with the grid.

    Batches: for ``honest`` of shape ``(..., h, d)``, ``aggregate`` takes ``(..., T, n, d)`` (the
    candidates as a dimension just before the :math:`n = h + f` rows, honest rows first) and
    returns ``(..., T, d)``, and the result is a float64 tensor of shape ``(...,)``, element
    :math:`r` being the 2-D search's choice on element :math:`r`. The grid is evaluated for every
    element in one aggregate call (split along the candidates only where ``batch × T × n × d``
    would exceed ``max_elements`` elements; at least one candidate per call), each refinement is
    one call over its ``REFINE_POINTS`` candidates per element (the intervals differ per
    element), and the expand/contract schedule advances all elements in lockstep, one call per
    step with each element's own candidate. A non-finite error raises ``ValueError`` in the 2-D
    search; in a batched one it counts as :math:`-\infty` for that candidate of that element only
    (never chosen unless all of the element's errors are; never an improvement). ``max_elements``
    (an int >= 1) does not affect 2-D input, which evaluates one candidate per call.

    Reference: the "optimal" ALIE/FOE of the paper (docs/paper.md; Allouah et al., arXiv:2405.14432,
    whose experiments use ByzFL). The grid is easy to reproduce and to reason about; the
    expand/contract schedule reproduces the authors' choice.

    >>> x = torch.tensor([[0.], [1.], [2.]])  # mu = 1, sigma = 1, byzantine = 1 + tau
    >>> median = lambda v: v.quantile(0.5, dim=0)  # 1 + tau/2 up to tau = 1, then 1.5
    >>> optimal_alie_tau(x, num_byzantine=1, num_workers=4, aggregate=median)
    1.0
    >>> optimal_alie_tau(x, num_byzantine=1, num_workers=4, aggregate=median, search="expand_contract", evals=3)
    10.0
    >>> batch = torch.stack([x, 2 * x])  # (2, 3, 1); the batched median: dim -2
    >>> optimal_alie_tau(batch, num_byzantine=1, num_workers=4, aggregate=lambda v: v.quantile(0.5, dim=-2))
    tensor([1., 1.], dtype=torch.float64)
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    _check_num_workers(num_workers, num_honest=honest.shape[-2], num_byzantine=num_byzantine)
    _check_aggregate(aggregate)
    settings = _check_search(DEFAULT_ALIE_TAUS, search, taus, refinements, evals, start, delta, ratio, max_elements)
    return _optimal_search(honest, num_byzantine=num_byzantine, aggregate=aggregate, attack="alie", settings=settings)


def optimal_alie(
    honest: Tensor,
    *,
    num_byzantine: int,
    num_workers: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
    search: str = "grid",
    evals: int | None = None,
    start: float | None = None,
    delta: float | None = None,
    ratio: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    r"""ALIE with the factor chosen by ``optimal_alie_tau``: :math:`b_j = \mu + \tau^\star\sigma`.

    The keywords are ``optimal_alie_tau``'s (the search and its settings); for a batch each
    element gets its own factor. With ``num_byzantine = 0`` it returns an empty ``(..., 0, d)``
    tensor without calling ``aggregate``. Call ``optimal_alie_tau`` to know the factor.

    Reference: see ``optimal_alie_tau`` and ``alie``.

    >>> x = torch.tensor([[0.], [1.], [2.]])
    >>> median = lambda v: v.quantile(0.5, dim=0)
    >>> optimal_alie(x, num_byzantine=1, num_workers=4, aggregate=median)
    tensor([[2.]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    _check_num_workers(num_workers, num_honest=honest.shape[-2], num_byzantine=num_byzantine)
    if num_byzantine == 0:
        return honest.new_empty((*honest.shape[:-2], 0, honest.shape[-1]))
    _check_aggregate(aggregate)
    settings = _check_search(DEFAULT_ALIE_TAUS, search, taus, refinements, evals, start, delta, ratio, max_elements)
    tau = _optimal_search(honest, num_byzantine=num_byzantine, aggregate=aggregate, attack="alie", settings=settings)
    if isinstance(tau, Tensor):
        rows = _alie_rows(honest.mean(dim=-2), _std(honest), tau.unsqueeze(-1)).squeeze(-2)
        return _repeat_row(rows, num_byzantine)
    return alie(honest, num_byzantine=num_byzantine, num_workers=num_workers, tau=tau)


def optimal_foe_tau(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
    search: str = "grid",
    evals: int | None = None,
    start: float | None = None,
    delta: float | None = None,
    ratio: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> float | Tensor:
    r"""The FOE factor that pushes ``aggregate`` farthest from the honest mean (a line search).

    .. math::

        \tau^\star = \arg\max_{\tau \in T}
            \big\| F(x_1, \dots, x_h, b(\tau), \dots, b(\tau)) - \mu \big\|_2,
        \qquad b(\tau) = -\tau\mu

    with :math:`F` = ``aggregate``; the searches (``search="grid"`` over ``taus``, default
    ``DEFAULT_FOE_TAUS``: 0, 0.25, ..., 10, with ``refinements``; or ByzFL's
    ``search="expand_contract"``), ties, batches and ``max_elements`` as in ``optimal_alie_tau``.

    Reference: Xie, Koyejo and Gupta, UAI 2019 (FOE); the line search as in
    ``optimal_alie_tau``.

    >>> x = torch.tensor([[1.], [2.], [3.]])  # mu = 2, byzantine = -2 tau
    >>> mean = lambda v: v.mean(dim=0)  # error (2 + 2 tau) / 4 grows with tau
    >>> optimal_foe_tau(x, num_byzantine=1, aggregate=mean, taus=[0.0, 1.0, 3.0])
    3.0
    >>> optimal_foe_tau(x, num_byzantine=1, aggregate=mean, search="expand_contract", evals=4, delta=1.0)
    7.0
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    _check_aggregate(aggregate)
    settings = _check_search(DEFAULT_FOE_TAUS, search, taus, refinements, evals, start, delta, ratio, max_elements)
    return _optimal_search(honest, num_byzantine=num_byzantine, aggregate=aggregate, attack="foe", settings=settings)


def optimal_foe(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
    search: str = "grid",
    evals: int | None = None,
    start: float | None = None,
    delta: float | None = None,
    ratio: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    r"""FOE with the factor chosen by ``optimal_foe_tau``: :math:`b_j = -\tau^\star\mu`.

    The keywords are ``optimal_foe_tau``'s; for a batch each element gets its own factor. With
    ``num_byzantine = 0`` it returns an empty ``(..., 0, d)`` tensor without calling
    ``aggregate``. Call ``optimal_foe_tau`` to know the factor.

    Reference: see ``optimal_foe_tau`` and ``foe``.

    >>> x = torch.tensor([[1.], [2.], [3.]])
    >>> optimal_foe(x, num_byzantine=1, aggregate=lambda v: v.mean(dim=0), taus=[0.0, 3.0])
    tensor([[-6.]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    if num_byzantine == 0:
        return honest.new_empty((*honest.shape[:-2], 0, honest.shape[-1]))
    _check_aggregate(aggregate)
    settings = _check_search(DEFAULT_FOE_TAUS, search, taus, refinements, evals, start, delta, ratio, max_elements)
    tau = _optimal_search(honest, num_byzantine=num_byzantine, aggregate=aggregate, attack="foe", settings=settings)
    if isinstance(tau, Tensor):
        return _repeat_row(_foe_rows(honest.mean(dim=-2), tau.unsqueeze(-1)).squeeze(-2), num_byzantine)
    return foe(honest, num_byzantine=num_byzantine, tau=tau)


# --------------------------------------------------------------------------------------------
# Data attack
# --------------------------------------------------------------------------------------------


def label_flip(labels: Tensor, *, num_classes: int) -> Tensor:
    r"""Label flipping (LF): the labels a Byzantine worker trains on instead of its true ones.

    .. math::

        \tilde{y} = (K - 1) - y

    where :math:`K` is ``num_classes`` and :math:`y \in \{0, \dots, K-1\}` (for 10 classes,
    :math:`9 - y`). The result has ``labels``' dtype and device.

    Reference: the LF attack of Allouah et al., arXiv:2405.14432 (docs/paper.md, "LF"), trained on
    :math:`9 - y` for the 10-class datasets.

    >>> label_flip(torch.tensor([0, 3, 9]), num_classes=10)
    tensor([9, 6, 0])
    """
    _check_count("num_classes", num_classes, minimum=1)
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or (labels.dtype == torch.bool)
    ):
        described = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor, got {described}")
    if labels.numel() and not bool(((labels >= 0) & (labels < num_classes)).all()):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, got "
            f"min={int(labels.min())}, max={int(labels.max())}"
        )
    return (num_classes - 1) - labels


# --------------------------------------------------------------------------------------------
# Registry and dispatch
# --------------------------------------------------------------------------------------------

#: The vector-crafting attacks by name (read-only).
ATTACKS: Mapping[str, Callable[..., Tensor]] = MappingProxyType(
    {
        "sign_flip": sign_flip,
        "foe": foe,
        "alie": alie,
        "mimic": mimic,
        "gaussian": gaussian,
        "inf": inf,
        "nan": nan,
        "optimal_alie": optimal_alie,
        "optimal_foe": optimal_foe,
    }
)

# The built-in vector attacks, which all take a batch of runs whole.
_BATCHED = frozenset(ATTACKS.values())

#: Attacks on the data rather than on the vectors: the Byzantine worker trains on altered data.
DATA_ATTACKS: tuple[str, ...] = ("label_flip",)

# Arguments that ``craft`` supplies from its own keywords when the attack takes them.
_CONTEXT = ("num_workers", "aggregate", "generator", "state")


@dataclass(frozen=True)
class DataAttack:
    """A data attack: a label map ``fn(labels, *, num_classes, **params) -> labels`` (the public contract).

    The Byzantine worker trains honestly on a honest worker's shard with the labels this returns
    (same shape, integer classes in ``[0, num_classes)``); ``params`` come from ``attack_params``.
    """

    label_map: Callable[..., Tensor]

    @property
    def params(self) -> tuple[str, ...]:
        """The label map's own parameters (those ``attack_params`` may set)."""
        names = list(inspect.signature(self.label_map).parameters)[1:]
        return tuple(name for name in names if name != "num_classes")


def data_attack(fn: Callable[..., Tensor]) -> DataAttack:
    """Declare ``fn(labels, *, num_classes, **params) -> labels`` a data attack (a decorator for plugins)."""
    if not callable(fn):
        raise ValueError(f"data_attack wraps a label map fn(labels, *, num_classes), got {fn!r}")
    return DataAttack(fn)


def _adapt_attack(name: str, obj: object) -> Callable[..., Tensor] | DataAttack:
    if isinstance(obj, DataAttack):
        return obj
    if not callable(obj):
        raise TypeError(
            f"an attack plugin must be a function or an arcsim.attacks.DataAttack, got {type(obj).__name__}"
        )
    parameters = inspect.signature(obj).parameters
    if "num_byzantine" not in parameters or not parameters or next(iter(parameters)) == "num_byzantine":
        raise TypeError(
            "a vector attack must have craft's signature fn(honest, *, num_byzantine, "
            "[num_workers], [aggregate], [generator], **params) -> (num_byzantine, d) tensor"
        )
    return obj


#: Every attack by name: the built-ins (vector attacks and ``label_flip``), then plugins.
ATTACK_REGISTRY: Registry[Callable[..., Tensor] | DataAttack] = Registry(
    "attack", builtins={**ATTACKS, "label_flip": DataAttack(label_flip)}, adapt=_adapt_attack
)


def is_data_attack(name: str) -> bool:
    """Whether attack ``name`` alters the Byzantine worker's data (a label map) rather than crafting vectors."""
    return name != "none" and isinstance(ATTACK_REGISTRY.get(name), DataAttack)


def label_map(name: str, *, num_classes: int, **params: object) -> Callable[[Tensor], Tensor]:
    """The labels map of data attack ``name`` for a task of ``num_classes`` classes, with its ``params``."""
    attack = ATTACK_REGISTRY.get(name)
    if not isinstance(attack, DataAttack):
        raise ValueError(f"attack {name!r} crafts vectors; it is not a data attack (a label map)")
    unexpected = sorted(set(params) - set(attack.params))
    if unexpected:
        raise ValueError(
            f"attack {name!r} takes no attack_params, got {unexpected}"
            if not attack.params
            else f"attack {name!r} got unexpected parameters {unexpected}; it takes {sorted(attack.params)}"
        )
    fn = attack.label_map
    return lambda labels: fn(labels, num_classes=num_classes, **params)


def attack_state(name: str, **params: object) -> MimicState | None:
    """The state that attack ``name`` with ``params`` keeps across the rounds of one run, or None for an
    attack that keeps none (every attack but ``mimic`` with ``learn_steps``). The engines make one per
    run, pass it to :func:`craft` as ``state`` every round, and keep it in the run's checkpoint.

    >>> attack_state("mimic", learn_steps=200).learn_steps, attack_state("mimic"), attack_state("alie", tau=1.5)
    (200, None, None)
    """
    if name == "mimic" and params.get("learn_steps") is not None:
        return MimicState(learn_steps=params["learn_steps"])  # type: ignore[arg-type]
    return None


def craft(
    name: str,
    honest: Tensor,
    *,
    num_byzantine: int,
    num_workers: int,
    aggregate: Aggregate | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    state: object = None,
    **params: object,
) -> Tensor:
    r"""Craft the ``(num_byzantine, d)`` Byzantine vectors of attack ``name``.

    The round's context (``num_workers``, ``aggregate``, ``generator``, and ``state``: the run's
    :func:`attack_state`, or a sequence of them for a batch) is passed to the attacks that take it
    and ignored by the others, so a caller can always pass all of it; ``params
    are the attack's own hyperparameters (e.g. ``tau``, ``index``, ``std``, ``taus``). Errors:
    an unknown name (the message lists the valid ones; data attacks such as ``label_flip`` are
    not crafted here), a missing ``aggregate``/``generator`` that the attack needs, and
    hyperparameters the attack does not take (named).

    Batches: ``honest`` of shape ``(..., h, d)`` gives ``(..., num_byzantine, d)``; then
    ``aggregate`` takes ``(..., T, n, d)`` and returns ``(..., T, d)`` (see ``optimal_alie_tau``)
    and ``generator`` is a sequence of ``torch.Generator``, one per batch element in row-major
    order (see ``gaussian``). The built-in attacks take the batch whole. A plugin attack does
    when it declares it with the attribute ``batched = True`` on the function (``fn.batched =
    True``; it then receives the batched ``honest``, ``aggregate`` and generator sequence as
    they are); otherwise ``craft`` calls it once per batch element, in row-major order, with
    that element's ``(h, d)`` matrix, its own generator and the same ``aggregate`` (called by
    the plugin on 2-D input), and stacks the ``(num_byzantine, d)`` results.

    >>> x = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])
    >>> craft("foe", x, num_byzantine=1, num_workers=4, tau=1.0)
    tensor([[-3., -4.]])
    >>> craft("foe", torch.stack([x, -x]), num_byzantine=1, num_workers=4, tau=1.0)
    tensor([[[-3., -4.]],
    <BLANKLINE>
            [[ 3.,  4.]]])
    """
    try:
        attack = ATTACK_REGISTRY.get(name)
    except UnknownName:
        plugins = ", ".join(ATTACK_REGISTRY.names()[len(ATTACK_REGISTRY.builtins) :])
        raise ValueError(
            f"unknown attack {name!r}; valid attacks: {', '.join(sorted(ATTACKS))}"
            f"{'; plugins: ' + plugins if plugins else ''} (or package.module:callable)"
        ) from None
    if isinstance(attack, DataAttack):
        raise ValueError(
            f"unknown attack {name!r} for craft; {name!r} is a data attack, applied by the Byzantine worker "
            f"to its labels"
        )
    parameters = inspect.signature(attack).parameters
    own = set(parameters) - {"honest", "num_byzantine", *_CONTEXT}
    unexpected = sorted(set(params) - own)
    if unexpected:
        raise ValueError(
            f"attack {name!r} got unexpected parameters {unexpected}; it takes {sorted(own) if own else 'none'}"
        )
    context: dict[str, object] = {
        "num_workers": num_workers,
        "aggregate": aggregate,
        "generator": generator,
        "state": state,
    }
    kwargs = dict(params)
    for key, value in context.items():
        if key not in parameters:
            continue
        if value is None:
            if parameters[key].default is inspect.Parameter.empty:
                raise ValueError(f"attack {name!r} needs {key}, got None")
            continue
        kwargs[key] = value
    if not (isinstance(honest, Tensor) and honest.ndim > 2) or attack in _BATCHED or getattr(attack, "batched", False):
        return attack(honest, num_byzantine=num_byzantine, **kwargs)
    return _craft_each(attack, honest, num_byzantine=num_byzantine, **kwargs)


def _craft_each(attack: Callable[..., Tensor], honest: Tensor, *, num_byzantine: int, **kwargs: object) -> Tensor:
    """A plugin that does not declare ``batched``: one 2-D call per batch element, stacked."""
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    count = _num_elements(honest)
    generators = _check_generators(kwargs.pop("generator"), count) if "generator" in kwargs else None
    flat = honest.reshape(count, *honest.shape[-2:])
    outputs = []
    for r in range(count):
        if generators is not None:
            kwargs["generator"] = generators[r]
        outputs.append(attack(flat[r], num_byzantine=num_byzantine, **kwargs))
    if not outputs:
        return honest.new_empty((*honest.shape[:-2], num_byzantine, honest.shape[-1]))
    return torch.stack(outputs).reshape(*honest.shape[:-2], *outputs[0].shape)
