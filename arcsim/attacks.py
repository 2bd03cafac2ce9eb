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

import torch
from torch import Tensor

from arcsim.registry import Registry, UnknownName

__all__ = [
    "ATTACKS",
    "ATTACK_REGISTRY",
    "DATA_ATTACKS",
    "DEFAULT_ALIE_TAUS",
    "DEFAULT_FOE_TAU",
    "DEFAULT_FOE_TAUS",
    "DEFAULT_GAUSSIAN_STD",
    "REFINE_POINTS",
    "DataAttack",
    "MimicState",
    "alie",
    "alie_z_max",
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


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_honest(honest: object) -> None:
    if not (
        isinstance(honest, Tensor)
        and honest.ndim == 2
        and honest.is_floating_point()
        and honest.shape[0] >= 1
        and honest.shape[1] >= 1
    ):
        described = (
            f"a tensor of shape {tuple(honest.shape)} and dtype {honest.dtype}"
            if isinstance(honest, Tensor)
            else f"a {type(honest).__name__}"
        )
        raise ValueError(f"honest must be a 2-D floating tensor (h, d) with h >= 1 and d >= 1, got {described}")
    # A finite sum proves every entry finite (NaN and infinities propagate through a sum) in one read;
    # only a non-finite sum, which overflow can also cause, pays for the element-wise count.
    if bool(torch.isfinite(honest.sum())):
        return
    bad = int((~torch.isfinite(honest)).sum().item())
    if bad:
        raise ValueError(f"honest must be finite, got {bad} non-finite entries")


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
    """``num_byzantine`` fresh, contiguous copies of the (d,) vector ``row``."""
    return row.unsqueeze(0).repeat(num_byzantine, 1)


def _std(honest: Tensor) -> Tensor:
    """Coordinate-wise sample standard deviation (Bessel); zeros when there is one row.

    Written as element-wise ops plus a sum over rows: ``Tensor.std(dim=0)`` reduces along the
    strided dimension of a row-major (h, d) matrix, which is much slower on CPU.
    """
    h = honest.shape[0]
    centred = honest - honest.mean(dim=0)
    return centred.square_().sum(dim=0).div_(max(h - 1, 1)).sqrt_()


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
    return _repeat_row(-honest.mean(dim=0), num_byzantine)


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
    return _repeat_row(honest.mean(dim=0) * -tau, num_byzantine)


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
    _check_num_workers(num_workers, num_honest=honest.shape[0], num_byzantine=num_byzantine)
    if tau is None:
        if num_byzantine == 0:  # nothing to craft; z_max may be undefined for f = 0
            return honest.new_empty((0, honest.shape[1]))
        tau = alie_z_max(num_workers=num_workers, num_byzantine=num_byzantine)
    else:
        tau = _check_real("tau", tau)
    return _repeat_row(honest.mean(dim=0) + tau * _std(honest), num_byzantine)


def mimic_index(honest: Tensor) -> int:
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

    >>> mimic_index(torch.tensor([[0., 0.], [1., 0.], [5., 0.]]))  # |x_i - mu| = 2, 1, 3 along e_1
    2
    """
    _check_honest(honest)
    centred = honest - honest.mean(dim=0)
    gram = (centred @ centred.T).to(torch.float64)
    # gram @ u_1 = s_1^2 u_1: the projections up to a positive factor, and exactly 0 when C = 0.
    projections = gram @ torch.linalg.eigh(gram).eigenvectors[:, -1]
    return int(projections.abs().argmax().item())


def mimic(honest: Tensor, *, num_byzantine: int, index: int | None = None) -> Tensor:
    r"""Mimic: every Byzantine vector copies one honest worker's vector.

    .. math::

        b_j = x_{i^\star}, \qquad j = 1, \dots, f

    where :math:`i^\star` is ``index`` (0-based row of ``honest``) when given, and otherwise
    ``mimic_index(honest)``, the worker farthest along the top principal direction of this
    round's honest vectors (maximising the apparent heterogeneity). This stateless rule picks
    :math:`i^\star` afresh every round; ``MimicState`` is the online variant of Karimireddy et al.
    that learns the direction over warm-up rounds and then sticks to one worker.

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
    if index is None:
        index = mimic_index(honest)
    elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < honest.shape[0]:
        raise ValueError(f"index must be an int in [0, {honest.shape[0] - 1}] (a row of honest), got {index!r}")
    return _repeat_row(honest[index], num_byzantine)


class MimicState:
    r"""Online Mimic (Karimireddy et al. 2022): learn the direction during warm-up, then stick.

    For the first ``warmup_rounds`` calls it refines a running mean :math:`\mu_t` and a unit
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

    This is deliberately small: the state lives in memory (``rounds_seen``, ``running_mean``,
    ``direction``, ``index``), so an adversary that restarts must restore these fields itself to
    reproduce a run. The stateless per-round rule is ``mimic``.

    >>> state = MimicState(warmup_rounds=1)
    >>> state(torch.tensor([[0., 0.], [1., 0.], [5., 0.]]), num_byzantine=1)
    tensor([[5., 0.]])
    >>> state.index
    2
    >>> state(torch.tensor([[9., 9.], [8., 8.], [7., 7.]]), num_byzantine=1)  # frozen
    tensor([[7., 7.]])
    """

    def __init__(self, *, warmup_rounds: int) -> None:
        self.warmup_rounds = _check_count("warmup_rounds", warmup_rounds, minimum=1)
        self.rounds_seen = 0
        self.running_mean: Tensor | None = None
        self.direction: Tensor | None = None
        self.index: int | None = None

    def __call__(self, honest: Tensor, *, num_byzantine: int) -> Tensor:
        _check_honest(honest)
        _check_count("num_byzantine", num_byzantine, minimum=0)
        if self.index is not None:
            return mimic(honest, num_byzantine=num_byzantine, index=self.index)
        chosen = self._learn(honest)
        if self.rounds_seen == self.warmup_rounds:
            self.index = chosen
        return mimic(honest, num_byzantine=num_byzantine, index=chosen)

    def _learn(self, honest: Tensor) -> int:
        if self.running_mean is not None and self.running_mean.shape[0] != honest.shape[1]:
            raise ValueError(
                f"honest has d={honest.shape[1]} coordinates but earlier rounds had d={self.running_mean.shape[0]}"
            )
        t = self.rounds_seen + 1
        round_mean = honest.mean(dim=0)
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
    generator: torch.Generator,
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
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {generator!r}")
    noise = torch.randn(
        (num_byzantine, honest.shape[1]),
        generator=generator,
        dtype=honest.dtype,
        device=generator.device,
    ).to(honest.device)
    return honest.mean(dim=0) + std * noise


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
    return torch.full((num_byzantine, honest.shape[1]), math.inf, dtype=honest.dtype, device=honest.device)


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
    return torch.full((num_byzantine, honest.shape[1]), math.nan, dtype=honest.dtype, device=honest.device)


# --------------------------------------------------------------------------------------------
# Optimal (line-searched) attacks
# --------------------------------------------------------------------------------------------


def _line_search(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    vector_for: Callable[[float], Tensor],
    taus: Sequence[float] | Tensor,
    refinements: int,
) -> float:
    """A grid search, then ``refinements`` finer grids around the best tau."""
    if not callable(aggregate):
        raise ValueError(f"aggregate must be a callable (n, d) -> (d,), got {aggregate!r}")
    grid = _check_taus(taus)
    _check_count("refinements", refinements, minimum=0)
    honest_mean = honest.mean(dim=0)
    d = honest.shape[1]
    errors: dict[float, float] = {}

    def evaluate(tau: float) -> None:
        if tau in errors:
            return
        byzantine = _repeat_row(vector_for(tau), num_byzantine)
        output = aggregate(torch.cat([honest, byzantine], dim=0))
        if not isinstance(output, Tensor) or tuple(output.shape) != (d,):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"aggregate must return a ({d},) tensor, got {shape} at tau={tau}")
        error = float(torch.linalg.vector_norm(output - honest_mean).item())
        if not math.isfinite(error):
            raise ValueError(f"aggregate returned a non-finite vector at tau={tau}")
        errors[tau] = error

    def best() -> float:  # largest error; the smallest tau among equals
        return min(errors, key=lambda tau: (-errors[tau], tau))

    for tau in grid:
        evaluate(tau)
    for _ in range(refinements):
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


def optimal_alie_tau(
    honest: Tensor,
    *,
    num_byzantine: int,
    num_workers: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
) -> float:
    r"""The ALIE factor that pushes ``aggregate`` farthest from the honest mean (a line search).

    .. math::

        \tau^\star = \arg\max_{\tau \in T}
            \big\| F(x_1, \dots, x_h, b(\tau), \dots, b(\tau)) - \mu \big\|_2,
        \qquad b(\tau) = \mu + \tau\sigma

    where :math:`F` is ``aggregate`` (it receives the ``(h + f, d)`` stack, honest rows first,
    and returns a ``(d,)`` vector; it should be the coordinator's whole pipeline, e.g. ARC then
    NNM then CWTM) and :math:`T` is ``taus`` (default ``DEFAULT_ALIE_TAUS``: 0, 0.25, ..., 10).
    Each of the ``refinements`` extra rounds evaluates ``REFINE_POINTS`` evenly spaced factors
    between the evaluated neighbours of the current best (an end point of the grid is its own
    neighbour on the open side). Ties go to the smallest :math:`\tau`. ``num_workers`` is only
    checked (:math:`n \ge h + f`), for a signature that matches ``alie``.

    Reference: the "optimal" ALIE/FOE of the paper (docs/paper.md; Allouah et al., arXiv:2405.14432, whose
    experiments use ByzFL). ByzFL's ``LineMaximize`` explores upwards from 0 with growing then
    shrinking steps; this is a plain grid plus optional refinement, so the chosen factor is
    easy to reproduce and to reason about.

    >>> x = torch.tensor([[0.], [1.], [2.]])  # mu = 1, sigma = 1, byzantine = 1 + tau
    >>> median = lambda v: v.quantile(0.5, dim=0)  # 1 + tau/2 up to tau = 1, then 1.5
    >>> optimal_alie_tau(x, num_byzantine=1, num_workers=4, aggregate=median)
    1.0
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    _check_num_workers(num_workers, num_honest=honest.shape[0], num_byzantine=num_byzantine)
    mean, std = honest.mean(dim=0), _std(honest)
    return _line_search(
        honest,
        num_byzantine=num_byzantine,
        aggregate=aggregate,
        vector_for=lambda tau: mean + tau * std,
        taus=DEFAULT_ALIE_TAUS if taus is None else taus,
        refinements=refinements,
    )


def optimal_alie(
    honest: Tensor,
    *,
    num_byzantine: int,
    num_workers: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
) -> Tensor:
    r"""ALIE with the factor chosen by ``optimal_alie_tau``: :math:`b_j = \mu + \tau^\star\sigma`.

    With ``num_byzantine = 0`` it returns an empty ``(0, d)`` tensor without calling
    ``aggregate``. Call ``optimal_alie_tau`` to know the factor.

    Reference: see ``optimal_alie_tau`` and ``alie``.

    >>> x = torch.tensor([[0.], [1.], [2.]])
    >>> median = lambda v: v.quantile(0.5, dim=0)
    >>> optimal_alie(x, num_byzantine=1, num_workers=4, aggregate=median)
    tensor([[2.]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    _check_num_workers(num_workers, num_honest=honest.shape[0], num_byzantine=num_byzantine)
    if num_byzantine == 0:
        return honest.new_empty((0, honest.shape[1]))
    tau = optimal_alie_tau(
        honest,
        num_byzantine=num_byzantine,
        num_workers=num_workers,
        aggregate=aggregate,
        taus=taus,
        refinements=refinements,
    )
    return alie(honest, num_byzantine=num_byzantine, num_workers=num_workers, tau=tau)


def optimal_foe_tau(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
) -> float:
    r"""The FOE factor that pushes ``aggregate`` farthest from the honest mean (a line search).

    .. math::

        \tau^\star = \arg\max_{\tau \in T}
            \big\| F(x_1, \dots, x_h, b(\tau), \dots, b(\tau)) - \mu \big\|_2,
        \qquad b(\tau) = -\tau\mu

    with :math:`F` = ``aggregate``, :math:`T` = ``taus`` (default ``DEFAULT_FOE_TAUS``: 0, 0.25,
    ..., 10), refinements and ties as in ``optimal_alie_tau``.

    Reference: Xie, Koyejo and Gupta, UAI 2019 (FOE); the line search as in
    ``optimal_alie_tau``.

    >>> x = torch.tensor([[1.], [2.], [3.]])  # mu = 2, byzantine = -2 tau
    >>> mean = lambda v: v.mean(dim=0)  # error (2 + 2 tau) / 4 grows with tau
    >>> optimal_foe_tau(x, num_byzantine=1, aggregate=mean, taus=[0.0, 1.0, 3.0])
    3.0
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    mean = honest.mean(dim=0)
    return _line_search(
        honest,
        num_byzantine=num_byzantine,
        aggregate=aggregate,
        vector_for=lambda tau: mean * -tau,
        taus=DEFAULT_FOE_TAUS if taus is None else taus,
        refinements=refinements,
    )


def optimal_foe(
    honest: Tensor,
    *,
    num_byzantine: int,
    aggregate: Aggregate,
    taus: Sequence[float] | Tensor | None = None,
    refinements: int = 0,
) -> Tensor:
    r"""FOE with the factor chosen by ``optimal_foe_tau``: :math:`b_j = -\tau^\star\mu`.

    With ``num_byzantine = 0`` it returns an empty ``(0, d)`` tensor without calling
    ``aggregate``. Call ``optimal_foe_tau`` to know the factor.

    Reference: see ``optimal_foe_tau`` and ``foe``.

    >>> x = torch.tensor([[1.], [2.], [3.]])
    >>> optimal_foe(x, num_byzantine=1, aggregate=lambda v: v.mean(dim=0), taus=[0.0, 3.0])
    tensor([[-6.]])
    """
    _check_honest(honest)
    _check_count("num_byzantine", num_byzantine, minimum=0)
    if num_byzantine == 0:
        return honest.new_empty((0, honest.shape[1]))
    tau = optimal_foe_tau(
        honest,
        num_byzantine=num_byzantine,
        aggregate=aggregate,
        taus=taus,
        refinements=refinements,
    )
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

#: Attacks on the data rather than on the vectors: the Byzantine worker trains on altered data.
DATA_ATTACKS: tuple[str, ...] = ("label_flip",)

# Arguments that ``craft`` supplies from its own keywords when the attack takes them.
_CONTEXT = ("num_workers", "aggregate", "generator")


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


def craft(
    name: str,
    honest: Tensor,
    *,
    num_byzantine: int,
    num_workers: int,
    aggregate: Aggregate | None = None,
    generator: torch.Generator | None = None,
    **params: object,
) -> Tensor:
    r"""Craft the ``(num_byzantine, d)`` Byzantine vectors of attack ``name``.

    The round's context (``num_workers``, ``aggregate``, ``generator``) is passed to the attacks
    that take it and ignored by the others, so a caller can always pass all of it; ``params``
    are the attack's own hyperparameters (e.g. ``tau``, ``index``, ``std``, ``taus``). Errors:
    an unknown name (the message lists the valid ones; data attacks such as ``label_flip`` are
    not crafted here), a missing ``aggregate``/``generator`` that the attack needs, and
    hyperparameters the attack does not take (named).

    >>> x = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])
    >>> craft("foe", x, num_byzantine=1, num_workers=4, tau=1.0)
    tensor([[-3., -4.]])
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
    return attack(honest, num_byzantine=num_byzantine, **kwargs)
