"""Tests of the attack library: hand-computed cases, invariants, and one test per raise."""

from __future__ import annotations

import doctest
import json
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import arcsim.attacks as attacks
from arcsim.attacks import (
    ATTACKS,
    DATA_ATTACKS,
    DEFAULT_ALIE_TAUS,
    MimicState,
    alie,
    alie_z_max,
    attack_state,
    craft,
    foe,
    gaussian,
    inf,
    label_flip,
    mimic,
    mimic_index,
    nan,
    optimal_alie,
    optimal_alie_tau,
    optimal_foe,
    optimal_foe_tau,
    sign_flip,
)

torch.set_num_threads(1)

DTYPES = (torch.float32, torch.float64)


def _honest(dtype: torch.dtype = torch.float32) -> Tensor:
    """4 x 3: mean [1, 2, 2], sample std [sqrt(4/3), sqrt(4/3), 0]."""
    rows = [[0.0, 1.0, 2.0], [2.0, 1.0, 2.0], [0.0, 3.0, 2.0], [2.0, 3.0, 2.0]]
    return torch.tensor(rows, dtype=dtype)


def _mean(x: Tensor) -> Tensor:
    return x.mean(dim=0)


def _median(x: Tensor) -> Tensor:
    return x.quantile(0.5, dim=0)


def _filtered_mean(x: Tensor) -> Tensor:
    """Mean of the rows within (sup-)distance 1 of the coordinate-wise median."""
    keep = (x - x.quantile(0.5, dim=0)).abs().amax(dim=1) <= 1
    return x[keep].mean(dim=0)


# The context each registered attack needs when called through craft().
def _craft_all(name: str, honest: Tensor, num_byzantine: int) -> Tensor:
    return craft(
        name,
        honest,
        num_byzantine=num_byzantine,
        num_workers=honest.shape[0] + num_byzantine,
        aggregate=_mean,
        generator=torch.Generator().manual_seed(3),
    )


# ---------------------------------------------------------------------------------------------
# Docstring examples
# ---------------------------------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    # Execute
    results = doctest.testmod(attacks)

    # Assert
    assert results.attempted > 0
    assert results.failed == 0


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_flip_sends_minus_the_mean(dtype: torch.dtype) -> None:
    # Prepare
    honest = _honest(dtype)

    # Execute
    byzantine = sign_flip(honest, num_byzantine=2)

    # Assert
    assert torch.equal(byzantine, torch.tensor([[-1.0, -2.0, -2.0]] * 2, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_foe_default_tau_sends_minus_two_means(dtype: torch.dtype) -> None:
    # Prepare
    honest = _honest(dtype)

    # Execute
    byzantine = foe(honest, num_byzantine=3)

    # Assert
    assert torch.equal(byzantine, torch.tensor([[-2.0, -4.0, -4.0]] * 3, dtype=dtype))


def test_foe_small_tau() -> None:
    # Prepare
    honest = _honest(torch.float64)

    # Execute
    byzantine = foe(honest, num_byzantine=1, tau=0.1)

    # Assert
    torch.testing.assert_close(byzantine, torch.tensor([[-0.1, -0.2, -0.2]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_alie_with_explicit_tau(dtype: torch.dtype) -> None:
    # Prepare
    honest = _honest(dtype)
    std = math.sqrt(4 / 3)

    # Execute
    byzantine = alie(honest, num_byzantine=2, num_workers=6, tau=1.5)

    # Assert
    expected = torch.tensor([[1 + 1.5 * std, 2 + 1.5 * std, 2.0]] * 2, dtype=dtype)
    torch.testing.assert_close(byzantine, expected)


def test_alie_negative_tau_is_the_minus_form() -> None:
    # Prepare
    honest = _honest(torch.float64)
    std = math.sqrt(4 / 3)

    # Execute
    byzantine = alie(honest, num_byzantine=1, num_workers=5, tau=-1.0)

    # Assert
    torch.testing.assert_close(byzantine, torch.tensor([[1 - std, 2 - std, 2.0]], dtype=torch.float64))


def test_alie_z_max_for_13_workers_3_byzantine() -> None:
    # Prepare: s = floor(13/2 + 1) - 3 = 4, z = Phi^-1((13 - 4)/13) = Phi^-1(9/13)
    expected = float(torch.special.ndtri(torch.tensor(9 / 13, dtype=torch.float64)))

    # Execute
    z = alie_z_max(num_workers=13, num_byzantine=3)

    # Assert
    assert z == pytest.approx(0.5024022233733554, abs=1e-12)
    assert z == pytest.approx(expected, abs=1e-12)


def test_alie_z_max_with_f_half_of_n() -> None:
    # Prepare: n = 10, f = 5 gives s = 1 and z = Phi^-1(0.9)

    # Execute
    z = alie_z_max(num_workers=10, num_byzantine=5)

    # Assert
    assert z == pytest.approx(1.2815515655446004, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alie_default_tau_is_z_max(dtype: torch.dtype) -> None:
    # Prepare: n = 13, f = 3 (10 honest rows), coordinate 0 alternates 0/2, coordinate 1 is 1
    honest = torch.tensor([[0.0, 1.0], [2.0, 1.0]] * 5, dtype=dtype)
    std0 = math.sqrt(10 / 9)  # sum of squares 10 over h - 1 = 9
    z = 0.5024022233733554

    # Execute
    byzantine = alie(honest, num_byzantine=3, num_workers=13)

    # Assert
    torch.testing.assert_close(byzantine, torch.tensor([[1 + z * std0, 1.0]] * 3, dtype=dtype))


def test_alie_with_one_honest_vector_copies_it() -> None:
    # Prepare
    honest = torch.tensor([[1.0, -2.0]])

    # Execute
    byzantine = alie(honest, num_byzantine=2, num_workers=3, tau=5.0)

    # Assert
    assert torch.equal(byzantine, torch.tensor([[1.0, -2.0], [1.0, -2.0]]))


def test_alie_without_byzantine_needs_no_z_max() -> None:
    # Prepare: n = 2, f = 0 has no finite z_max
    honest = torch.tensor([[1.0, 2.0], [3.0, 4.0]])

    # Execute
    byzantine = alie(honest, num_byzantine=0, num_workers=2)

    # Assert
    assert byzantine.shape == (0, 2)


def test_mimic_index_picks_the_extreme_along_the_top_direction() -> None:
    # Prepare: the e_1 spread (sum of squares 28.08) beats the e_2 one (24.5); row 0 is the
    # farthest along e_1 although rows 4 and 5 are longer.
    honest = torch.tensor([[3.2, 0.0], [-3.0, 0.0], [2.0, 0.0], [-2.2, 0.0], [0.0, 3.5], [0.0, -3.5]])

    # Execute
    index = mimic_index(honest)

    # Assert
    assert index == 0


def test_mimic_index_centres_before_projecting() -> None:
    # Prepare: mean [1, 1]; centred projections on (1, 1)/sqrt(2) are -1, 3, 0, -2 (x sqrt 2)
    honest = torch.tensor([[0.0, 0.0], [4.0, 4.0], [1.0, 1.0], [-1.0, -1.0]])

    # Execute
    index = mimic_index(honest)

    # Assert
    assert index == 1


@pytest.mark.parametrize(
    "honest",
    [torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])],
    ids=["one-row", "all-equal"],
)
def test_mimic_index_without_spread_is_zero(honest: Tensor) -> None:
    # Execute
    index = mimic_index(honest)

    # Assert
    assert index == 0


def test_mimic_copies_the_chosen_worker() -> None:
    # Prepare
    honest = torch.tensor([[0.0, 1.0], [4.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])

    # Execute
    chosen = mimic(honest, num_byzantine=2)
    given = mimic(honest, num_byzantine=1, index=3)

    # Assert
    assert torch.equal(chosen, torch.tensor([[4.0, 1.0], [4.0, 1.0]]))
    assert torch.equal(given, torch.tensor([[-1.0, 1.0]]))


def test_mimic_state_learns_then_freezes() -> None:
    # Prepare: round 1 direction e_1 (index 2); round 2 running mean [1, 5/6] and one power
    # step give z = +-(0.9403, -0.3404), centred projections |.| = 0.657, 2.018, 0.997.
    state = MimicState(learn_steps=2)
    round_1 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    round_2 = torch.tensor([[0.0, 0.0], [0.0, 4.0], [0.0, 1.0]])
    round_3 = torch.tensor([[9.0, 9.0], [8.0, 8.0], [7.0, 7.0]])

    longer = MimicState(learn_steps=3)  # learns the same two rounds, and is still learning after them

    # Execute
    first = state(round_1, num_byzantine=1)
    index_after_1 = state.index
    second = state(round_2, num_byzantine=1)
    third = state(round_3, num_byzantine=2)
    longer(round_1, num_byzantine=1)
    longer(round_2, num_byzantine=1)

    # Assert
    assert torch.equal(first, torch.tensor([[5.0, 0.0]]))
    assert index_after_1 is None
    assert torch.equal(second, torch.tensor([[0.0, 4.0]]))
    assert state.index == 1
    assert state.running_mean is None and state.direction is None  # learned: only the index is kept
    assert longer.running_mean is not None and longer.direction is not None
    torch.testing.assert_close(longer.running_mean, torch.tensor([1.0, 5 / 6]))
    torch.testing.assert_close(longer.direction.abs(), torch.tensor([0.9403, 0.3404]), atol=1e-4, rtol=0)
    assert torch.equal(third, torch.tensor([[8.0, 8.0], [8.0, 8.0]]))


def test_mimic_state_restarts_a_zero_direction() -> None:
    # Prepare: round 1 has no spread, so the direction is zero until round 2 has some
    state = MimicState(learn_steps=2)
    round_1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    round_2 = torch.tensor([[1.0, 1.0], [1.0, 7.0]])

    # Execute
    state(round_1, num_byzantine=1)
    second = state(round_2, num_byzantine=1)

    # Assert
    assert torch.equal(second, torch.tensor([[1.0, 7.0]]))
    assert state.index == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_adds_independent_noise_to_the_mean(dtype: torch.dtype) -> None:
    # Prepare
    honest = _honest(dtype)
    noise = torch.randn((2, 3), generator=torch.Generator().manual_seed(11), dtype=dtype)

    # Execute
    byzantine = gaussian(honest, num_byzantine=2, std=0.5, generator=torch.Generator().manual_seed(11))

    # Assert
    torch.testing.assert_close(byzantine, torch.tensor([1.0, 2.0, 2.0], dtype=dtype) + 0.5 * noise)
    assert not torch.equal(byzantine[0], byzantine[1])


def test_gaussian_moments() -> None:
    # Prepare
    honest = torch.tensor([[1.0, -1.0], [3.0, 1.0]])  # mean [2, 0]

    # Execute
    byzantine = gaussian(honest, num_byzantine=20000, std=3.0, generator=torch.Generator().manual_seed(0))

    # Assert
    torch.testing.assert_close(byzantine.mean(dim=0), torch.tensor([2.0, 0.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(byzantine.std(dim=0), torch.tensor([3.0, 3.0]), atol=0.1, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inf_and_nan_fill_every_coordinate(dtype: torch.dtype) -> None:
    # Prepare
    honest = _honest(dtype)

    # Execute
    infinite = inf(honest, num_byzantine=2)
    missing = nan(honest, num_byzantine=2)

    # Assert
    assert infinite.shape == missing.shape == (2, 3)
    assert bool((infinite == math.inf).all())
    assert bool(missing.isnan().all())


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.uint8))
def test_label_flip_maps_y_to_nine_minus_y(dtype: torch.dtype) -> None:
    # Prepare
    labels = torch.arange(10, dtype=dtype)

    # Execute
    flipped = label_flip(labels, num_classes=10)

    # Assert
    assert torch.equal(flipped, torch.arange(9, -1, -1).to(dtype))
    assert flipped.dtype == dtype
    assert torch.equal(labels, torch.arange(10, dtype=dtype))


def test_label_flip_of_no_labels() -> None:
    # Execute
    flipped = label_flip(torch.empty(0, dtype=torch.int64), num_classes=10)

    # Assert
    assert flipped.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Optimal (line-searched) attacks
# ---------------------------------------------------------------------------------------------

# Honest [0, 1, 2] (mean 1, sample std 1), one Byzantine value, aggregate _filtered_mean:
# ALIE sends 1 + tau; the error is (1 + tau)/3 for 0 < tau <= 1.5 and 1/2 after (the
# Byzantine value is filtered out), so the maximum 5/6 is at tau = 1.5.
# FOE sends -tau; the error is (2 + tau)/3 for 0 <= tau <= 0.5 and 1/2 after: maximum at 0.5.
LINE = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)


def test_optimal_alie_tau_finds_the_interior_maximum() -> None:
    # Execute
    tau = optimal_alie_tau(LINE, num_byzantine=1, num_workers=4, aggregate=_filtered_mean)

    # Assert
    assert tau == 1.5


def test_optimal_foe_tau_finds_the_interior_maximum() -> None:
    # Execute
    tau = optimal_foe_tau(LINE, num_byzantine=1, aggregate=_filtered_mean)

    # Assert
    assert tau == 0.5


def test_optimal_alie_tau_against_the_mean_takes_the_largest_factor() -> None:
    # Prepare: the error of the mean is f/n * tau * ||sigma||, increasing in tau

    # Execute
    tau = optimal_alie_tau(_honest(), num_byzantine=2, num_workers=6, aggregate=_mean)

    # Assert
    assert tau == max(DEFAULT_ALIE_TAUS) == 10.0


def test_optimal_alie_tau_ties_go_to_the_smallest_factor() -> None:
    # Prepare: the median error is tau/2 up to tau = 1, then 1/2 for every larger tau

    # Execute
    tau = optimal_alie_tau(LINE, num_byzantine=1, num_workers=4, aggregate=_median)

    # Assert
    assert tau == 1.0


@pytest.mark.parametrize(("refinements", "expected"), [(0, 2.0), (1, 1.4), (2, 1.48)])
def test_optimal_alie_tau_refinement_closes_in(refinements: int, expected: float) -> None:
    # Prepare: grid {0, 2}: error 0 and 1/2; refining [0, 2] in steps of 0.2 finds 1.4 (0.8),
    # refining [1.2, 1.6] in steps of 0.04 finds 1.48 (0.827)

    # Execute
    tau = optimal_alie_tau(
        LINE,
        num_byzantine=1,
        num_workers=4,
        aggregate=_filtered_mean,
        taus=[0.0, 2.0],
        refinements=refinements,
    )

    # Assert
    assert tau == pytest.approx(expected, abs=1e-9)


def test_optimal_attacks_send_the_chosen_vectors() -> None:
    # Execute
    alie_vectors = optimal_alie(LINE, num_byzantine=2, num_workers=5, aggregate=_median)
    foe_vectors = optimal_foe(LINE, num_byzantine=1, aggregate=_filtered_mean)

    # Assert: two Byzantine values 1 + tau in [0, 1, 2, b, b]: the median is min(b, 2) - 1 away
    # from the mean, so the smallest maximiser is tau = 1
    assert torch.equal(alie_vectors, torch.tensor([[2.0], [2.0]], dtype=torch.float64))
    assert torch.equal(foe_vectors, torch.tensor([[-0.5]], dtype=torch.float64))


def test_optimal_attacks_without_byzantine_skip_the_search() -> None:
    # Prepare
    calls: list[Tensor] = []

    def aggregate(x: Tensor) -> Tensor:
        calls.append(x)
        return x.mean(dim=0)

    # Execute
    alie_vectors = optimal_alie(LINE, num_byzantine=0, num_workers=3, aggregate=aggregate)
    foe_vectors = optimal_foe(LINE, num_byzantine=0, aggregate=aggregate)

    # Assert
    assert alie_vectors.shape == foe_vectors.shape == (0, 1)
    assert calls == []


def test_optimal_search_gives_the_aggregate_honest_rows_first() -> None:
    # Prepare
    seen: list[Tensor] = []

    def aggregate(x: Tensor) -> Tensor:
        seen.append(x.clone())
        return x.mean(dim=0)

    # Execute
    optimal_foe_tau(LINE, num_byzantine=2, aggregate=aggregate, taus=[3.0])

    # Assert
    assert len(seen) == 1
    expected = torch.tensor([[0.0], [1.0], [2.0], [-3.0], [-3.0]], dtype=torch.float64)
    assert torch.equal(seen[0], expected)


# ---------------------------------------------------------------------------------------------
# Invariants of every registered attack
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_keeps_shape_dtype_device_and_input(name: str, dtype: torch.dtype) -> None:
    # Prepare
    honest = _honest(dtype)
    before = honest.clone()

    # Execute
    byzantine = _craft_all(name, honest, num_byzantine=3)

    # Assert
    assert byzantine.shape == (3, 3)
    assert byzantine.dtype == dtype
    assert byzantine.device == honest.device
    assert byzantine.is_contiguous()
    assert torch.equal(honest, before)
    assert byzantine.data_ptr() != honest.data_ptr()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_with_no_byzantine_is_empty(name: str) -> None:
    # Execute
    byzantine = _craft_all(name, _honest(), num_byzantine=0)

    # Assert
    assert byzantine.shape == (0, 3)


def test_rows_are_independent_copies() -> None:
    # Prepare
    byzantine = sign_flip(_honest(), num_byzantine=2)

    # Execute
    byzantine[0, 0] = 100.0

    # Assert
    assert byzantine[1, 0] == -1.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_stays_on_cuda(name: str) -> None:
    # Prepare
    honest = _honest().cuda()

    # Execute
    byzantine = _craft_all(name, honest, num_byzantine=2)

    # Assert
    assert byzantine.device == honest.device
    assert byzantine.shape == (2, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gaussian_draws_the_same_noise_for_cpu_and_cuda_inputs() -> None:
    # Prepare
    honest = _honest()

    # Execute
    on_cpu = gaussian(honest, num_byzantine=2, generator=torch.Generator().manual_seed(5))
    on_cuda = gaussian(honest.cuda(), num_byzantine=2, generator=torch.Generator().manual_seed(5))

    # Assert
    torch.testing.assert_close(on_cuda.cpu(), on_cpu)


# ---------------------------------------------------------------------------------------------
# craft() dispatch
# ---------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    # Assert
    assert set(ATTACKS) == {
        "sign_flip",
        "foe",
        "alie",
        "mimic",
        "gaussian",
        "inf",
        "nan",
        "optimal_alie",
        "optimal_foe",
    }
    assert DATA_ATTACKS == ("label_flip",)


@pytest.mark.parametrize(
    ("name", "params", "direct"),
    [
        ("sign_flip", {}, lambda x: sign_flip(x, num_byzantine=2)),
        ("foe", {"tau": 0.5}, lambda x: foe(x, num_byzantine=2, tau=0.5)),
        ("alie", {}, lambda x: alie(x, num_byzantine=2, num_workers=6)),
        ("mimic", {"index": 2}, lambda x: mimic(x, num_byzantine=2, index=2)),
        (
            "gaussian",
            {"std": 2.0},
            lambda x: gaussian(x, num_byzantine=2, std=2.0, generator=torch.Generator().manual_seed(3)),
        ),
        (
            "optimal_alie",
            {"taus": [0.0, 1.0]},
            lambda x: optimal_alie(x, num_byzantine=2, num_workers=6, aggregate=_mean, taus=[0.0, 1.0]),
        ),
        (
            "optimal_foe",
            {"refinements": 1},
            lambda x: optimal_foe(x, num_byzantine=2, aggregate=_mean, refinements=1),
        ),
    ],
)
def test_craft_dispatches_with_context_and_params(
    name: str, params: dict[str, object], direct: Callable[[Tensor], Tensor]
) -> None:
    # Prepare
    honest = _honest()

    # Execute
    crafted = craft(
        name,
        honest,
        num_byzantine=2,
        num_workers=6,
        aggregate=_mean,
        generator=torch.Generator().manual_seed(3),
        **params,
    )

    # Assert
    torch.testing.assert_close(crafted, direct(honest))


def test_craft_ignores_context_an_attack_does_not_use() -> None:
    # Execute
    crafted = craft("inf", _honest(), num_byzantine=1, num_workers=5, aggregate=None)

    # Assert
    assert crafted.shape == (1, 3)


# ---------------------------------------------------------------------------------------------
# One test per raise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "honest",
    [
        torch.tensor([1.0, 2.0]),
        torch.tensor([[1, 2], [3, 4]]),
        torch.empty(0, 3),
        torch.empty(2, 0),
        [[1.0, 2.0]],
    ],
    ids=["1-D", "integer", "no-rows", "no-columns", "list"],
)
def test_honest_must_be_a_2d_floating_tensor(honest: object) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="honest must be a 2-D floating tensor"):
        sign_flip(honest, num_byzantine=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_honest_must_be_finite(bad: float) -> None:
    # Prepare
    honest = torch.tensor([[1.0, bad], [2.0, 3.0]])

    # Execute / Assert
    with pytest.raises(ValueError, match="honest must be finite, got 1 non-finite"):
        foe(honest, num_byzantine=1)


@pytest.mark.parametrize("value", [-1, 1.0, True])
def test_num_byzantine_must_be_a_non_negative_int(value: object) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"num_byzantine must be an int >= 0, got"):
        sign_flip(_honest(), num_byzantine=value)  # type: ignore[arg-type]


def test_num_workers_must_be_positive() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"num_workers must be an int >= 1, got 0"):
        alie(_honest(), num_byzantine=0, num_workers=0, tau=1.0)


def test_num_workers_must_cover_honest_and_byzantine() -> None:
    # Execute / Assert
    message = r"num_workers=5 is less than the 4 honest .* num_byzantine=2"
    with pytest.raises(ValueError, match=message):
        alie(_honest(), num_byzantine=2, num_workers=5, tau=1.0)


@pytest.mark.parametrize("tau", [math.nan, math.inf, True, "1"])
def test_tau_must_be_finite_real(tau: object) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"tau must be a finite real number, got"):
        foe(_honest(), num_byzantine=1, tau=tau)  # type: ignore[arg-type]


def test_std_must_be_non_negative() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"std must be a finite real number >= 0.0, got -1.0"):
        gaussian(_honest(), num_byzantine=1, std=-1.0, generator=torch.Generator())


def test_gaussian_needs_a_generator() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"generator must be a torch.Generator, got 0"):
        gaussian(_honest(), num_byzantine=1, generator=0)  # type: ignore[arg-type]


def test_alie_z_max_must_be_finite() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"num_workers=10, num_byzantine=6: s = .* = 0"):
        alie(_honest(), num_byzantine=6, num_workers=10)


@pytest.mark.parametrize("index", [-1, 4, 1.0])
def test_mimic_index_must_be_a_row(index: object) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 3\]"):
        mimic(_honest(), num_byzantine=1, index=index)  # type: ignore[arg-type]


def test_mimic_state_learn_steps_must_be_positive() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"learn_steps must be an int >= 1, got 0"):
        MimicState(learn_steps=0)


def test_mimic_state_dimension_must_not_change() -> None:
    # Prepare
    state = MimicState(learn_steps=3)
    state(_honest(), num_byzantine=1)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"d=2 coordinates but earlier rounds had d=3"):
        state(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), num_byzantine=1)


def test_aggregate_must_be_callable() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"aggregate must be a callable"):
        optimal_foe_tau(LINE, num_byzantine=1, aggregate=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("taus", [[], [[0.0, 1.0]], [0.0, math.nan], "abc"], ids=["empty", "2-D", "nan", "text"])
def test_taus_must_be_a_finite_grid(taus: object) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"taus must be a non-empty 1-D sequence"):
        optimal_alie_tau(
            LINE,
            num_byzantine=1,
            num_workers=4,
            aggregate=_mean,
            taus=taus,  # type: ignore[arg-type]
        )


def test_refinements_must_be_non_negative() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"refinements must be an int >= 0, got -1"):
        optimal_foe_tau(LINE, num_byzantine=1, aggregate=_mean, refinements=-1)


def test_aggregate_must_return_a_vector() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"aggregate must return a \(1,\) tensor, got \(4, 1\)"):
        optimal_foe_tau(LINE, num_byzantine=1, aggregate=lambda x: x, taus=[1.0])


def test_aggregate_must_return_finite_values() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"non-finite vector at tau=2.0"):
        optimal_foe_tau(
            LINE,
            num_byzantine=1,
            aggregate=lambda x: torch.full((1,), math.nan, dtype=x.dtype),
            taus=[2.0],
        )


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0.0, 1.0]), torch.tensor([True, False]), [0, 1]],
    ids=["float", "bool", "list"],
)
def test_label_flip_needs_integer_labels(labels: object) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"labels must be an integer tensor"):
        label_flip(labels, num_classes=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("labels", [torch.tensor([0, 10]), torch.tensor([-1, 3])])
def test_label_flip_labels_must_be_classes(labels: Tensor) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\] for num_classes=10"):
        label_flip(labels, num_classes=10)


def test_label_flip_num_classes_must_be_positive() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 1, got 0"):
        label_flip(torch.tensor([0]), num_classes=0)


def test_craft_unknown_attack_lists_valid_ones() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"unknown attack 'ipm'; valid attacks: alie, foe, "):
        craft("ipm", _honest(), num_byzantine=1, num_workers=5)


def test_craft_points_data_attacks_to_the_worker() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"'label_flip' is a data attack"):
        craft("label_flip", _honest(), num_byzantine=1, num_workers=5)


def test_craft_rejects_unexpected_params() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"attack 'foe' got unexpected parameters \['std', 'z'\]"):
        craft("foe", _honest(), num_byzantine=1, num_workers=5, std=1.0, z=2.0)


@pytest.mark.parametrize(
    ("name", "missing"),
    [("optimal_alie", "aggregate"), ("optimal_foe", "aggregate"), ("gaussian", "generator")],
)
def test_craft_needs_the_context_the_attack_needs(name: str, missing: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"attack '{name}' needs {missing}, got None"):
        craft(name, _honest(), num_byzantine=1, num_workers=5)


def test_mimic_state_saved_and_restored_mid_learning_crafts_as_if_never_stopped() -> None:
    # Prepare: five rounds of random honest vectors; one state runs through, another is saved after round 2
    g = torch.Generator().manual_seed(3)
    rounds = [torch.randn(4, 6, generator=g) for _ in range(5)]
    through = MimicState(learn_steps=3)
    expected = [through(x, num_byzantine=2) for x in rounds]
    first = MimicState(learn_steps=3)
    for x in rounds[:2]:
        first(x, num_byzantine=2)
    values, tensors = first.state_dict()
    # Execute
    restored = MimicState(learn_steps=3)
    restored.load_state_dict(json.loads(json.dumps(values)), tensors)  # as a checkpoint's JSON holds them
    rest = [restored(x, num_byzantine=2) for x in rounds[2:]]
    # Assert
    assert values == {"learn_steps": 3, "rounds_seen": 2, "index": None} and set(tensors) == {
        "running_mean",
        "direction",
    }
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[2:]))
    assert restored.index == through.index is not None
    assert through.state_dict() == ({"learn_steps": 3, "rounds_seen": 3, "index": through.index}, {})


@pytest.mark.parametrize(
    ("values", "tensors", "message"),
    [
        ({"learn_steps": 4, "rounds_seen": 0, "index": None}, {}, "learn_steps=4 rounds cannot continue"),
        ({"learn_steps": 3, "rounds_seen": 5, "index": None}, {}, r"rounds_seen must be an int in \[0, 3\]"),
        ({"learn_steps": 3, "rounds_seen": 3, "index": None}, {}, "cannot have index=None"),
        ({"learn_steps": 3, "rounds_seen": 1, "index": 0}, {}, "cannot have index=0"),
        ({"learn_steps": 3, "rounds_seen": 1, "index": None}, {}, "cannot have the tensors"),
        (
            {"learn_steps": 3, "rounds_seen": 1, "index": None},
            {"running_mean": torch.zeros(3), "direction": torch.zeros(4)},
            "floating vectors of one length",
        ),
    ],
    ids=["other-learn-steps", "rounds-seen", "frozen-without-index", "index-while-learning", "no-tensors", "shapes"],
)
def test_mimic_state_refuses_a_state_it_cannot_continue(values: dict, tensors: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MimicState(learn_steps=3).load_state_dict(values, tensors)


def test_mimic_with_learn_steps_takes_its_state_and_refuses_to_run_without_it() -> None:
    # Prepare
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    state = attack_state("mimic", learn_steps=1)
    # Execute
    crafted = craft("mimic", x, num_byzantine=2, num_workers=5, learn_steps=1, state=state)
    # Assert: the state learned (its index is now fixed) and every call needs one
    assert torch.equal(crafted, torch.tensor([[5.0, 0.0], [5.0, 0.0]])) and state.index == 2
    with pytest.raises(ValueError, match=r"needs the run's state: a MimicState\(learn_steps=1\)"):
        mimic(x, num_byzantine=1, learn_steps=1)
    with pytest.raises(ValueError, match="index .* or learn_steps .*, not both"):
        mimic(x, num_byzantine=1, learn_steps=1, index=0, state=MimicState(learn_steps=1))
    with pytest.raises(ValueError, match="a state only with learn_steps"):
        mimic(x, num_byzantine=1, state=MimicState(learn_steps=1))


def test_a_learned_target_beyond_a_short_round_copies_its_last_row() -> None:
    # Prepare: the target learned is row 2; a later round has only two honest vectors
    state = MimicState(learn_steps=1)
    state(torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]), num_byzantine=1)
    # Execute
    crafted = state(torch.tensor([[1.0, 1.0], [2.0, 2.0]]), num_byzantine=1)
    # Assert
    assert state.index == 2 and torch.equal(crafted, torch.tensor([[2.0, 2.0]]))
