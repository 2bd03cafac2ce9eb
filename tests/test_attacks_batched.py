"""Batched attacks: honest vectors of many runs at once, (..., h, d) -> (..., f, d).

Every batch element must get what the 2-D call gives on it (bitwise: the module docstring of
arcsim.attacks says why no tolerance is needed on CPU), the optimal searches must choose per element
the 2-D search's factor while calling the aggregate once per grid (chunk), per refinement or per
expand/contract step, and the expand/contract schedule must evaluate ByzFL's sequence of factors.
Data are drawn from a seed through torch.randn (or small integers, for ties), as in
tests/test_robust_properties.py.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from arcsim.attacks import (
    REFINE_POINTS,
    alie_z_max,
    craft,
    gaussian,
    mimic_index,
    optimal_alie,
    optimal_alie_tau,
    optimal_foe,
    optimal_foe_tau,
    sign_flip,
)

# ARCSIM_HYPOTHESIS_EXAMPLES=2000 runs a thorough search.
SETTINGS = settings(deadline=None, max_examples=int(os.environ.get("ARCSIM_HYPOTHESIS_EXAMPLES", "40")))
SEEDS = st.integers(0, 2**63 - 1)
DTYPES = st.sampled_from([torch.float32, torch.float64])
BATCH_SHAPES = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and bit patterns (NaN payloads included, -0.0 told from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))


def draw_honest(data: st.DataObject, *, max_h: int = 6, max_d: int = 6) -> Tensor:
    """A (*batch, h, d) tensor; with ``ties``, small integers so that rows and coordinates repeat."""
    batch = data.draw(BATCH_SHAPES, label="batch")
    h = data.draw(st.integers(1, max_h), label="h")
    d = data.draw(st.integers(1, max_d), label="d")
    dtype = data.draw(DTYPES, label="dtype")
    g = torch.Generator().manual_seed(data.draw(SEEDS, label="seed"))
    if data.draw(st.booleans(), label="ties"):
        return torch.randint(-2, 3, (*batch, h, d), generator=g).to(dtype)
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e3]), label="scale")
    return (torch.randn(*batch, h, d, generator=g, dtype=torch.float64) * scale).to(dtype)


def per_element(fn: Callable[[Tensor], object], honest: Tensor) -> list[object]:
    """``fn`` on each (h, d) element of ``honest``, in row-major order (one element for 2-D input)."""
    flat = honest.reshape(-1, *honest.shape[-2:])
    return [fn(flat[r]) for r in range(flat.shape[0])]


def stacked(fn: Callable[[Tensor], Tensor], honest: Tensor) -> Tensor:
    """The 2-D calls of ``fn`` on each element, stacked back to ``honest``'s batch shape."""
    outputs = per_element(fn, honest)
    return torch.stack(outputs).reshape(*honest.shape[:-2], *outputs[0].shape)  # type: ignore[misc]


# Torch-native aggregators that take any leading dimensions: (..., n, d) -> (..., d).
def agg_mean(x: Tensor) -> Tensor:
    return x.mean(dim=-2)


def agg_median(x: Tensor) -> Tensor:
    return x.median(dim=-2).values


def agg_cwtm(x: Tensor, trim: int = 1) -> Tensor:
    n = x.shape[-2]
    trim = min(trim, (n - 1) // 2)
    return x.sort(dim=-2).values[..., trim : n - trim, :].mean(dim=-2)


AGGREGATORS = {"mean": agg_mean, "median": agg_median, "cwtm": agg_cwtm}


# --------------------------------------------------------------------------------------------
# Vector attacks
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_every_vector_attack_matches_its_2d_call_per_element(data: st.DataObject) -> None:
    # Prepare
    honest = draw_honest(data)
    h = honest.shape[-2]
    f = data.draw(st.integers(0, 3), label="f")
    n = h + f + data.draw(st.integers(0, 2), label="extra workers")
    tau = data.draw(st.floats(-5, 5, allow_nan=False), label="tau")
    cases: list[tuple[str, dict[str, object]]] = [
        ("sign_flip", {}),
        ("foe", {}),
        ("foe", {"tau": tau}),
        ("alie", {"tau": tau}),
        ("mimic", {}),
        ("mimic", {"index": data.draw(st.integers(0, h - 1), label="index")}),
        ("inf", {}),
        ("nan", {}),
    ]
    if f == 0 or 1 <= n // 2 + 1 - f <= n - 1:  # alie's default factor z_max(n, f) is defined
        cases.append(("alie", {}))
    before = honest.clone()

    for name, params in cases:
        # Execute
        batched = craft(name, honest, num_byzantine=f, num_workers=n, **params)
        expected = stacked(
            lambda x, name=name, params=params: craft(name, x, num_byzantine=f, num_workers=n, **params), honest
        )

        # Assert
        assert batched.shape == (*honest.shape[:-2], f, honest.shape[-1]), name
        assert same_bits(batched, expected), (name, params)
        assert batched.data_ptr() != honest.data_ptr() or batched.numel() == 0
    assert same_bits(honest, before)  # inputs are never modified


@SETTINGS
@given(data=st.data())
def test_gaussian_draws_each_element_from_its_own_generator(data: st.DataObject) -> None:
    # Prepare
    honest = draw_honest(data)
    f = data.draw(st.integers(0, 3), label="f")
    std = data.draw(st.sampled_from([0.0, 0.5, 2.0]), label="std")
    seeds = [data.draw(SEEDS, label="generator seed") for _ in range(math.prod(honest.shape[:-2]))]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    # Execute
    if honest.ndim == 2:
        batched = gaussian(honest, num_byzantine=f, generator=torch.Generator().manual_seed(seeds[0]), std=std)
    else:
        batched = craft(
            "gaussian", honest, num_byzantine=f, num_workers=honest.shape[-2] + f, generator=generators, std=std
        )
    flat = honest.reshape(-1, *honest.shape[-2:])
    expected = [
        gaussian(flat[r], num_byzantine=f, generator=torch.Generator().manual_seed(seed), std=std)
        for r, seed in enumerate(seeds)
    ]

    # Assert
    assert same_bits(batched, torch.stack(expected).reshape(*honest.shape[:-2], f, honest.shape[-1]))


def test_gaussian_elements_differ_with_different_generators() -> None:
    # Prepare: the same honest matrix twice, two seeds
    honest = torch.zeros(2, 3, 4)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]

    # Execute
    out = gaussian(honest, num_byzantine=2, generator=generators)

    # Assert
    assert out.shape == (2, 2, 4)
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    "generator", [torch.Generator(), [torch.Generator()], "x"], ids=["one-generator", "too-few", "not-a-sequence"]
)
def test_batched_gaussian_needs_one_generator_per_element(generator: object) -> None:
    with pytest.raises(ValueError, match=r"generator must be a sequence of 2 torch.Generator for a batch of 2 runs"):
        gaussian(torch.zeros(2, 3, 4), num_byzantine=1, generator=generator)  # type: ignore[arg-type]


@SETTINGS
@given(data=st.data())
def test_mimic_index_is_the_2d_index_per_element(data: st.DataObject) -> None:
    # Prepare
    honest = draw_honest(data)

    # Execute
    index = mimic_index(honest)

    # Assert
    expected = per_element(mimic_index, honest)
    if honest.ndim == 2:
        assert index == expected[0]
    else:
        assert isinstance(index, Tensor) and index.dtype == torch.long and index.shape == honest.shape[:-2]
        assert index.flatten().tolist() == expected


def test_batched_honest_must_be_finite_and_names_the_elements() -> None:
    # Prepare: elements 1 and 4 (flat, row-major over (2, 3)) hold a NaN and an infinity
    honest = torch.zeros(2, 3, 4, 5)
    honest[0, 1, 2, 3] = math.nan
    honest[1, 1, 0, 0] = math.inf

    # Execute / Assert
    with pytest.raises(ValueError, match=r"2 non-finite entries in batch elements \[1, 4\] .* \(2, 3\)"):
        sign_flip(honest, num_byzantine=1)


def test_mimic_state_stays_2d() -> None:
    from arcsim.attacks import MimicState

    with pytest.raises(ValueError, match=r"honest must be a 2-D floating tensor \(h, d\) with"):
        MimicState(learn_steps=1)(torch.zeros(2, 3, 4), num_byzantine=1)


def test_learned_mimic_on_a_batch_advances_each_elements_own_state() -> None:
    # Prepare: a (2, 3) batch over three rounds; one state per element, and the same states 2-D
    from arcsim.attacks import MimicState

    g = torch.Generator().manual_seed(5)
    rounds = [torch.randn(2, 3, 4, 6, generator=g) for _ in range(3)]
    batched = [MimicState(learn_steps=2) for _ in range(6)]
    alone = [MimicState(learn_steps=2) for _ in range(6)]
    # Execute
    out = [craft("mimic", x, num_byzantine=2, num_workers=6, learn_steps=2, state=batched) for x in rounds]
    expected = [
        torch.stack([s(x.reshape(6, 4, 6)[r], num_byzantine=2) for r, s in enumerate(alone)]).reshape(2, 3, 2, 6)
        for x in rounds
    ]
    # Assert
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert [s.index for s in batched] == [s.index for s in alone] and None not in [s.index for s in batched]
    with pytest.raises(ValueError, match="a sequence of 6, one per batch element"):
        craft("mimic", rounds[0], num_byzantine=1, num_workers=5, learn_steps=2, state=batched[:5])


# --------------------------------------------------------------------------------------------
# The optimal attacks: grid
# --------------------------------------------------------------------------------------------


class Recorder:
    """An aggregator that records the shape of every call."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.shapes.append(tuple(x.shape))
        return self.fn(x)


def draw_search(data: st.DataObject) -> dict[str, object]:
    if data.draw(st.booleans(), label="grid"):
        search: dict[str, object] = {"refinements": data.draw(st.integers(0, 2), label="refinements")}
        if data.draw(st.booleans(), label="own taus"):
            taus = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 3.5, 8.0]), min_size=1, max_size=6))
            search["taus"] = taus
        return search
    return {
        "search": "expand_contract",
        "evals": data.draw(st.integers(1, 10), label="evals"),
        "start": data.draw(st.sampled_from([0.0, -1.0, 2.5]), label="start"),
        "delta": data.draw(st.sampled_from([10.0, 1.0, 0.3, -2.0]), label="delta"),
        "ratio": data.draw(st.sampled_from([0.8, 0.51, 0.99]), label="ratio"),
    }


@SETTINGS
@given(data=st.data())
def test_optimal_attacks_choose_the_2d_factor_per_element(data: st.DataObject) -> None:
    # Prepare
    honest = draw_honest(data, max_h=5, max_d=4)
    h = honest.shape[-2]
    f = data.draw(st.integers(0, 3), label="f")
    aggregate = AGGREGATORS[data.draw(st.sampled_from(sorted(AGGREGATORS)), label="aggregator")]
    search = draw_search(data)
    search["max_elements"] = data.draw(st.sampled_from([1, 100, 1 << 27]), label="max_elements")
    attack = data.draw(st.sampled_from(["alie", "foe"]), label="attack")
    if attack == "alie":
        tau_fn, vector_fn = optimal_alie_tau, optimal_alie
        context: dict[str, object] = {"num_byzantine": f, "num_workers": h + f, "aggregate": aggregate, **search}
    else:
        tau_fn, vector_fn = optimal_foe_tau, optimal_foe
        context = {"num_byzantine": f, "aggregate": aggregate, **search}

    # Execute
    tau = tau_fn(honest, **context)  # type: ignore[operator]
    vectors = vector_fn(honest, **context)  # type: ignore[operator]

    # Assert
    expected_taus = per_element(lambda x: tau_fn(x, **context), honest)  # type: ignore[operator]
    expected_vectors = stacked(lambda x: vector_fn(x, **context), honest)  # type: ignore[operator]
    if honest.ndim == 2:
        assert tau == expected_taus[0]
    else:
        assert isinstance(tau, Tensor) and tau.dtype == torch.float64 and tau.shape == honest.shape[:-2]
        assert tau.flatten().tolist() == expected_taus
    assert same_bits(vectors, expected_vectors)


def test_the_grid_is_one_aggregate_call_and_each_refinement_another() -> None:
    # Prepare: 2 x 3 runs, 4 honest rows of 5 coordinates, 2 Byzantine rows
    honest = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    record = Recorder(agg_cwtm)

    # Execute
    optimal_alie_tau(honest, num_byzantine=2, num_workers=6, aggregate=record, refinements=2)

    # Assert: the 41 factors of the default grid in one call, then 11 per refinement
    assert record.shapes == [(2, 3, 41, 6, 5), (2, 3, REFINE_POINTS, 6, 5), (2, 3, REFINE_POINTS, 6, 5)]


def test_max_elements_splits_the_candidates_into_chunks() -> None:
    # Prepare: one candidate of all 6 runs is 6 * 6 * 5 = 180 elements; 1000 allow 5 candidates a call
    honest = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    record = Recorder(agg_median)

    # Execute
    chunked = optimal_foe_tau(honest, num_byzantine=2, aggregate=record, max_elements=1000)
    whole = optimal_foe_tau(honest, num_byzantine=2, aggregate=agg_median)

    # Assert
    assert [shape[2] for shape in record.shapes] == [5] * 8 + [1]
    assert torch.equal(chunked, whole)  # type: ignore[arg-type]


def test_a_non_finite_batched_error_only_rules_out_its_candidate() -> None:
    # Prepare: the mean aggregate grows with tau; element 1 returns NaN at tau = 3 (the largest)
    honest = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    taus = [0.0, 1.0, 2.0, 3.0]

    def poisoned(x: Tensor) -> Tensor:
        out = agg_mean(x)
        out[1, 3] = math.nan
        return out

    # Execute
    chosen = optimal_foe_tau(honest, num_byzantine=1, aggregate=poisoned, taus=taus)

    # Assert: elements 0 and 2 take 3.0; element 1 the best of the others, as a 2-D search without 3.0
    assert chosen.tolist() == [3.0, 2.0, 3.0]  # type: ignore[union-attr]
    assert optimal_foe_tau(honest[1], num_byzantine=1, aggregate=agg_mean, taus=taus[:3]) == 2.0
    calls: list[Tensor] = []

    def poisoned_2d(x: Tensor) -> Tensor:  # the 2-D search's 4th call is tau = 3
        calls.append(x)
        return agg_mean(x) * (math.nan if len(calls) == 4 else 1.0)

    with pytest.raises(ValueError, match=r"non-finite vector at tau=3.0"):
        optimal_foe_tau(honest[1], num_byzantine=1, aggregate=poisoned_2d, taus=taus)


def test_batched_aggregate_must_return_one_vector_per_candidate() -> None:
    with pytest.raises(ValueError, match=r"aggregate must return a \(2, 41, 3\) tensor for its \(2, 41, 5, 3\) input"):
        optimal_alie_tau(torch.ones(2, 4, 3), num_byzantine=1, num_workers=5, aggregate=lambda x: x.mean(dim=0))


# --------------------------------------------------------------------------------------------
# The optimal attacks: ByzFL's expand/contract schedule
# --------------------------------------------------------------------------------------------

# The factors ByzFL 0.0.11's Optimal_InnerProductManipulation evaluates (its _expansion_phase then
# _contraction_phase, run on these error profiles), in double precision.
PEAK = [0.0, 10.0, 30.0, 70.0, 62.0, 55.6, 50.480000000000004, 46.384, 43.107200000000006, 53.59296000000001,
        51.49580800000001, 49.81808640000001, 48.47590912000001, 47.40216729600001, 46.54317383680001,
        45.85597906944001, 45.306223255552005, 44.866418604441606, 44.51457488355329, 44.23309990684263]  # fmt: skip
SCHEDULES = [
    # error 50 - |tau - 37| with ByzFL's defaults: expand 0, 10, 30, fail at 70, contract from 30
    (lambda t: 50 - abs(t - 37), {}, PEAK, 43.107200000000006),
    # a plateau from 5 on: 15 does no better than 7 (equal errors keep the earlier point)
    (
        lambda t: min(t, 5.0),
        {"evals": 8, "start": 1.0, "delta": 2.0, "ratio": 0.75},
        [1.0, 3.0, 7.0, 15.0, 13.0, 11.5, 10.375, 9.53125],
        7.0,
    ),  # fmt: skip
    # a negative step that never improves: contraction only
    (
        lambda t: abs(t + 4.0),
        {"evals": 9, "delta": -1.0, "ratio": 0.6},
        [0.0, -1.0, -0.6, -0.36, -0.216, -0.1296, -0.07776, -0.046655999999999996, -0.027993599999999997],
        0.0,
    ),  # fmt: skip
    # all errors equal: nothing improves on the start
    (lambda t: 3.0, {"evals": 5}, [0.0, 10.0, 8.0, 6.4, 5.120000000000001], 0.0),
]


@pytest.mark.parametrize("profile, params, expected, best", SCHEDULES, ids=["peak", "plateau", "negative", "flat"])
def test_expand_contract_evaluates_byzfls_sequence(
    profile: Callable[[float], float], params: dict[str, float], expected: list[float], best: float
) -> None:
    # Prepare: honest mean -1, so that FOE's vector -tau * mu is tau exactly; the aggregate reports the
    # factor it sees and returns a vector whose distance to the mean is profile(tau)
    honest = torch.tensor([[-2.0], [-1.0], [0.0]], dtype=torch.float64)
    seen: list[float] = []
    seen_batched: list[list[float]] = []

    def aggregate(x: Tensor) -> Tensor:
        tau = float(x[-1, 0])
        seen.append(tau)
        return torch.tensor([-1.0 + profile(tau)], dtype=x.dtype)

    def batched(x: Tensor) -> Tensor:  # (2, 1, 4, 1): one candidate per element and step
        assert x.shape == (2, 1, 4, 1)
        seen_batched.append(x[:, 0, -1, 0].tolist())
        return torch.stack([aggregate(x[r, 0]) for r in range(2)]).unsqueeze(1)

    # Execute
    chosen = optimal_foe_tau(honest, num_byzantine=1, aggregate=aggregate, search="expand_contract", **params)
    seen_2d = list(seen)
    chosen_batched = optimal_foe_tau(
        torch.stack([honest, honest]), num_byzantine=1, aggregate=batched, search="expand_contract", **params
    )

    # Assert
    assert seen_2d == expected
    assert chosen == best
    assert seen_batched == [[tau, tau] for tau in expected]  # lockstep: one call per step
    assert chosen_batched.tolist() == [best, best]  # type: ignore[union-attr]


def test_expand_contract_elements_keep_their_own_state() -> None:
    # Prepare: element 0's error grows without bound, element 1's peaks at 12
    honest = torch.tensor([[-2.0], [-1.0], [0.0]], dtype=torch.float64).expand(2, 3, 1).clone()
    profiles = [lambda t: t, lambda t: 50 - abs(t - 12)]

    def aggregate(x: Tensor) -> Tensor:
        taus = x[:, 0, -1, 0].tolist()
        return torch.tensor([[[-1.0 + profiles[r](tau)]] for r, tau in enumerate(taus)], dtype=x.dtype)

    # Execute
    chosen = optimal_foe_tau(honest, num_byzantine=1, aggregate=aggregate, search="expand_contract", evals=6)

    # Assert: 0, 10, 30, 70, 150, 310 for element 0; 0, 10, 30 (worse), then 10 + 16, 10 + 12.8, 10 + 10.24
    assert chosen.tolist() == [310.0, 10.0]  # type: ignore[union-attr]
    for r in range(2):
        alone = optimal_foe_tau(
            honest[r],
            num_byzantine=1,
            aggregate=lambda x, r=r: torch.tensor([-1.0 + profiles[r](float(x[-1, 0]))], dtype=x.dtype),
            search="expand_contract",
            evals=6,
        )
        assert alone == chosen[r].item()  # type: ignore[index]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"search": "line"}, r"search must be one of 'grid', 'expand_contract', got 'line'"),
        ({"search": "expand_contract", "taus": [1.0]}, r"\['taus'\] are parameters of search='grid'"),
        ({"search": "expand_contract", "refinements": 1}, r"\['refinements'\] are parameters of search='grid'"),
        ({"evals": 5, "ratio": 0.7}, r"\['evals', 'ratio'\] are parameters of search='expand_contract'"),
        ({"search": "expand_contract", "evals": 0}, r"evals must be an int >= 1, got 0"),
        ({"search": "expand_contract", "delta": 0}, r"delta must be a non-zero finite real number"),
        ({"search": "expand_contract", "start": math.inf}, r"start must be a finite real number, got inf"),
        ({"search": "expand_contract", "ratio": 0.5}, r"ratio must be a real number in \(0.5, 1\)"),
        ({"search": "expand_contract", "ratio": 1}, r"ratio must be a real number in \(0.5, 1\)"),
        ({"max_elements": 0}, r"max_elements must be an int >= 1, got 0"),
    ],
)
def test_search_settings_are_validated(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimal_alie(torch.ones(4, 2), num_byzantine=1, num_workers=5, aggregate=agg_mean, **params)  # type: ignore[arg-type]


def test_expand_contract_params_pass_config_validation() -> None:
    from conftest import tiny_config

    from arcsim.config import ConfigError

    # Execute
    config = tiny_config(
        num_byzantine=1,
        attack="optimal_alie",
        attack_params={"search": "expand_contract", "evals": 20, "start": 0, "delta": 10, "ratio": 0.8},
    )

    # Assert
    assert config.attack_params["search"] == "expand_contract"
    with pytest.raises(ConfigError, match=r"ratio must be a real number in \(0.5, 1\)"):
        tiny_config(num_byzantine=1, attack="optimal_foe", attack_params={"search": "expand_contract", "ratio": 2})


# --------------------------------------------------------------------------------------------
# The robust pipeline as the aggregate
# --------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=int(os.environ.get("ARCSIM_HYPOTHESIS_EXAMPLES", "40")) // 3)
@given(data=st.data())
def test_optimal_attacks_against_the_batched_pipeline(data: st.DataObject) -> None:
    from arcsim.robust import build_pipeline

    # Prepare: 2 or 3 runs of 7 honest workers, f = 1..3, ARC then NNM then CWTM
    f = data.draw(st.integers(1, 3), label="f")
    runs = data.draw(st.integers(2, 3), label="runs")
    g = torch.Generator().manual_seed(data.draw(SEEDS, label="seed"))
    honest = torch.randn(runs, 7, 6, generator=g, dtype=torch.float64).to(data.draw(DTYPES, label="dtype"))
    pipeline = build_pipeline("arc > nnm > cwtm", f=f)
    search = draw_search(data)

    def aggregate(x: Tensor) -> Tensor:
        return pipeline(x)[0]

    # Execute
    chosen = optimal_alie_tau(honest, num_byzantine=f, num_workers=7 + f, aggregate=aggregate, **search)

    # Assert
    expected = [
        optimal_alie_tau(honest[r], num_byzantine=f, num_workers=7 + f, aggregate=aggregate, **search)
        for r in range(runs)
    ]
    assert chosen.tolist() == expected  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# craft and plugins
# --------------------------------------------------------------------------------------------

PLUGIN = """
import torch

calls = []


def per_run(honest, *, num_byzantine, generator, scale=1.0):
    calls.append(tuple(honest.shape))
    noise = torch.randn((num_byzantine, honest.shape[1]), generator=generator, dtype=honest.dtype)
    return honest.mean(dim=0) * scale + noise


def whole(honest, *, num_byzantine, scale=1.0):
    calls.append(tuple(honest.shape))
    return (honest.mean(dim=-2, keepdim=True) * scale).repeat(*([1] * (honest.ndim - 2)), num_byzantine, 1)


whole.batched = True
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    (tmp_path / "batched_attack_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "batched_attack_plugin", raising=False)
    import batched_attack_plugin  # type: ignore[import-not-found]

    return batched_attack_plugin


def test_craft_calls_an_undeclared_plugin_once_per_element(plugin: object) -> None:
    # Prepare
    honest = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(seed) for seed in range(6)]

    # Execute
    out = craft(
        "batched_attack_plugin:per_run", honest, num_byzantine=2, num_workers=6, generator=generators, scale=2.0
    )

    # Assert
    assert plugin.calls == [(4, 5)] * 6  # type: ignore[attr-defined]
    flat = honest.reshape(6, 4, 5)
    expected = torch.stack(
        [
            plugin.per_run(flat[r], num_byzantine=2, generator=torch.Generator().manual_seed(r), scale=2.0)
            for r in range(6)
        ]  # type: ignore[attr-defined]
    ).reshape(2, 3, 2, 5)
    assert same_bits(out, expected)


def test_craft_passes_a_batch_to_a_declared_plugin(plugin: object) -> None:
    # Prepare
    honest = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))

    # Execute
    out = craft("batched_attack_plugin:whole", honest, num_byzantine=2, num_workers=6, scale=-1.0)

    # Assert
    assert plugin.calls == [(2, 3, 4, 5)]  # type: ignore[attr-defined]
    assert same_bits(out, stacked(lambda x: sign_flip(x, num_byzantine=2), honest))


def test_craft_alie_default_factor_matches_z_max() -> None:
    # Prepare
    honest = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))

    # Execute
    out = craft("alie", honest, num_byzantine=2, num_workers=9)

    # Assert
    z = alie_z_max(num_workers=9, num_byzantine=2)
    assert same_bits(out, stacked(lambda x: craft("alie", x, num_byzantine=2, num_workers=9, tau=z), honest))
