"""Property tests (hypothesis) for arcsim.robust on (..., n, d) input with leading batch dimensions.

Every built-in rule and several pipelines, called once on a batch, must give for each element what
the 2-D call on that element gives: bitwise for the clipping rules, bucketing and the selections,
within the tolerances of arcsim.robust's module docstring otherwise (:func:`tolerance` is that list).
Elements holding a NaN or an infinity must come out NaN (flagged invalid by a pipeline) without
touching the others. Data mix continuous values with the awkward cases: duplicated rows, values on a
coarse grid (ties within columns and between distances), rows of huge norm, non-finite entries.
"""

from __future__ import annotations

import math
import os
import sys
import types
from collections.abc import Callable

import pytest
import torch
from conftest import max_f_bulyan, max_f_krum, max_f_minority, no_f
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from arcsim.robust import (
    BatchedAggregationReport,
    BatchedStageReport,
    arc,
    bucketing,
    build_pipeline,
    bulyan,
    centered_clip,
    cwmed,
    cwtm,
    device_paths,
    geometric_median,
    host_tuned,
    krum,
    mean,
    multi_krum,
    nnm,
    rule,
    static_clip,
)
from arcsim.robust._sorting import middle_means_batched, sorted_columns, sorted_columns_batched
from arcsim.robust.geometric_median import DEFAULT_TOL, geometric_median_batched, geometric_median_impl
from arcsim.robust.krum import multi_krum_selection, multi_krum_selection_batched

SETTINGS = settings(deadline=None, max_examples=int(os.environ.get("ARCSIM_HYPOTHESIS_EXAMPLES", "20")))
DTYPES = st.sampled_from([torch.float32, torch.float64])
# d = 1030 takes the sorting-network path of cwtm and cwmed (n <= 31, d >= 1024).
WIDTHS = st.sampled_from([1, 3, 7, 1030])


# name -> (call on (x, f, generator), largest valid f for n rows (negative: n too small)).
RULES: dict[str, tuple[Callable[..., Tensor], Callable[[int], int]]] = {
    "arc": (lambda x, f, g: arc(x, f=f), max_f_minority),
    "static_clip": (lambda x, f, g: static_clip(x, c=2.0), no_f),
    "nnm": (lambda x, f, g: nnm(x, f=f), max_f_minority),
    "bucketing": (lambda x, f, g: bucketing(x, s=2, generator=g), no_f),
    "mean": (lambda x, f, g: mean(x), no_f),
    "cwtm": (lambda x, f, g: cwtm(x, f=f), max_f_minority),
    "cwmed": (lambda x, f, g: cwmed(x), no_f),
    "geometric_median": (lambda x, f, g: geometric_median(x), no_f),
    "krum": (lambda x, f, g: krum(x, f=f), max_f_krum),
    "multi_krum": (lambda x, f, g: multi_krum(x, f=f), max_f_krum),
    "centered_clip": (lambda x, f, g: centered_clip(x, tau=1.0, iters=2), no_f),
    "bulyan": (lambda x, f, g: bulyan(x, f=f), max_f_bulyan),
}
# spec -> (build parameters, largest valid f, the exact (bitwise) leading stage whose output scales
# the tolerance of the rest).
PIPELINES: dict[str, tuple[dict, Callable[[int], int], Callable[..., Tensor] | None]] = {
    "arc > nnm > cwtm": ({}, max_f_minority, lambda x, f: arc(x, f=f)),
    "static_clip > nnm > cwmed": ({"c": 2.0}, max_f_minority, lambda x, f: static_clip(x, c=2.0)),
    "bucketing > cwtm": ({"s": 2}, lambda n: max_f_minority(-(-n // 2)), None),
    "arc > nnm > multi_krum": ({}, max_f_krum, lambda x, f: arc(x, f=f)),
    "nnm > geometric_median": ({}, max_f_minority, None),
}


def tolerance(name: str, element: Tensor, expected: Tensor) -> float:
    """The documented tolerance (arcsim.robust's module docstring) of rule ``name`` on one element."""
    eps = torch.finfo(element.dtype).eps
    n = element.shape[0]
    big = float(element.abs().max()) if element.numel() else 0.0
    if name in ("arc", "static_clip", "bucketing"):
        return 0.0
    if name in ("mean", "cwmed"):
        return 4 * eps * big
    if name == "cwtm":
        return n * eps * big
    if name == "geometric_median":
        return DEFAULT_TOL * (1 + float(torch.linalg.vector_norm(expected.double()))) + 16 * n * eps * big
    return 16 * n * eps * big  # nnm, krum, multi_krum, bulyan, centered_clip


@st.composite
def batches(draw: st.DrawFn, max_f: Callable[[int], int], *, min_n: int | None = None) -> dict:
    """A batch shape, n, d, f, a dtype and an (..., n, d) tensor with the awkward cases planted."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2), label="batch"))
    low = min_n if min_n is not None else next(n for n in range(1, 20) if max_f(n) >= 0)
    n = draw(st.integers(low, 13), label="n")
    f = draw(st.integers(0, max(0, max_f(n))), label="f")
    d = draw(WIDTHS, label="d")
    dtype = draw(DTYPES, label="dtype")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    count = math.prod(shape)
    x = torch.randn(count, n, d, generator=g, dtype=torch.float64)
    if draw(st.booleans(), label="grid"):  # repeated values: ties within columns and between distances
        x = torch.round(x * 2) / 2
    x = x * draw(st.sampled_from([1e-3, 1.0, 1e3]), label="scale")
    for b in range(count):
        kind = draw(st.sampled_from(["plain", "plain", "duplicate", "huge", "nan", "inf"]), label="kind")
        row = draw(st.integers(0, n - 1), label="row")
        if kind == "duplicate" and n > 1:
            x[b, row] = x[b, (row + 1) % n]
        elif kind == "huge":  # squared norms overflow the dtype (float32: 1e30, float64: 1e200)
            x[b, row] = 1e30 if dtype == torch.float32 else 1e200
        elif kind in ("nan", "inf") and shape:  # 2-D input still raises: only batched input gets them
            x[b, row, draw(st.integers(0, d - 1), label="column")] = math.nan if kind == "nan" else -math.inf
    x = x.to(dtype).reshape(*shape, n, d)
    return {"x": x, "f": f, "seed": seed, "count": count, "n": n, "d": d}


def flat_elements(x: Tensor) -> Tensor:
    return x.reshape(-1, *x.shape[-2:])


def invalid_mask(x: Tensor) -> Tensor:
    return ~torch.isfinite(flat_elements(x)).flatten(1).all(dim=1)


def generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def assert_element_close(name: str, actual: Tensor, expected: Tensor, element: Tensor) -> None:
    atol = tolerance(name, element, expected)
    if atol == 0.0:
        assert torch.equal(actual, expected), f"{name}: not bitwise equal"
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol, equal_nan=True)


# --------------------------------------------------------------------------------------------------
# Every rule: each element equals the 2-D call; non-finite elements are NaN and disturb nothing.


@pytest.mark.parametrize("name", RULES)
@SETTINGS
@given(data=st.data())
def test_every_rule_matches_the_2d_call_per_element(name, data):
    # Prepare
    call, max_f = RULES[name]
    case = data.draw(batches(max_f))
    x, f, count = case["x"], case["f"], case["count"]
    batched_generator = generators(case["seed"], count) if x.dim() > 2 else torch.Generator().manual_seed(case["seed"])

    # Execute
    out = call(x, f, batched_generator)

    # Assert: the shape, and each element against its 2-D call (with the same generator).
    elements = flat_elements(x)
    flat_out = out.reshape(count, *out.shape[x.dim() - 2 :])
    assert out.shape[: x.dim() - 2] == x.shape[:-2]
    bad = invalid_mask(x)
    for i, g in enumerate(generators(case["seed"], count)):
        if bad[i]:
            assert flat_out[i].isnan().all()
            continue
        expected = call(elements[i], f, g)
        assert_element_close(name, flat_out[i], expected, elements[i])


@pytest.mark.parametrize("name", RULES)
def test_2d_input_with_a_non_finite_value_still_raises(name):
    x = torch.randn(9, 3, dtype=torch.float64)
    x[4, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite values"):
        RULES[name][0](x, 1 if RULES[name][1](9) >= 1 else 0, torch.Generator())


@pytest.mark.parametrize("name", RULES)
def test_a_batch_checks_the_rules_condition_on_n_and_the_shape(name):
    call, max_f = RULES[name]
    too_small = next((n for n in range(1, 10) if max_f(n) < 1), None)
    if name in ("arc", "nnm", "cwtm", "krum", "multi_krum", "bulyan"):
        with pytest.raises(ValueError, match=r"needs .*got n = \d+, f = 1"):
            call(torch.zeros(2, too_small, 3), 1, None)
    with pytest.raises(ValueError, match=r"expected at least one row \(n >= 1\), got n = 0"):
        call(torch.zeros(2, 0, 3), 0, None)
    with pytest.raises(ValueError, match="expected a floating tensor"):
        call(torch.zeros(2, 5, 3, dtype=torch.int64), 0, None)


def test_sorted_values_of_a_batch_are_bitwise_those_of_each_element():
    # Ties (a coarse grid) and the sorting-network width; every row and a middle slice.
    g = torch.Generator().manual_seed(5)
    for n, d in [(13, 1030), (7, 5), (33, 4), (2, 2048)]:
        x = torch.round(torch.randn(6, n, d, generator=g) * 2) / 2
        whole = sorted_columns_batched(x)
        middle = sorted_columns_batched(x, 1, n - 1)
        for b in range(6):
            expected = sorted_columns(x[b])
            assert torch.equal(whole[b], expected)
            assert torch.equal(middle[b], expected[1 : n - 1])


def test_sorted_values_of_a_batch_with_a_nan_element_are_each_elements_own():
    # The network's width: the clean elements through the network, the NaN one through numpy (NaN last)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 13, 1030, generator=g)
    x[1, 4, 9] = math.nan
    out = sorted_columns_batched(x, 2, 13)
    for b in range(3):
        torch.testing.assert_close(out[b], sorted_columns(x[b])[2:13], rtol=0, atol=0, equal_nan=True)
    assert out[1, -1, 9].isnan() and not out[[0, 2]].isnan().any()


def test_middle_means_of_a_batch_are_the_sorted_values_means_within_the_tolerance():
    # The network path (d >= 1024, several column tiles at 70,000 columns), small widths (numpy),
    # huge values next to small ones, and a NaN element that takes the sorted values' mean.
    g = torch.Generator().manual_seed(6)
    for n, d, start, stop in [(13, 1030, 3, 10), (13, 70_000, 3, 10), (7, 5, 1, 6), (19, 2048, 0, 19), (5, 1500, 2, 3)]:
        x = torch.randn(4, n, d, generator=g) * torch.logspace(-3, 6, d)
        x[1, 0] = 1e30
        x[3, 2, d // 2] = math.nan
        out = middle_means_batched(x, start, stop)
        assert out.shape == (4, d)
        for b in range(4):
            expected = sorted_columns(x[b])[start:stop].mean(dim=0)
            # Per column, within (stop - start) eps times the column's largest kept value (which is
            # at most the tolerance's M); for the NaN element (numpy's sort puts the NaN last) too.
            kept = sorted_columns(x[b])[start:stop]
            assert torch.equal(out[b].isnan(), expected.isnan())
            finite = ~expected.isnan()
            bound = (stop - start) * torch.finfo(x.dtype).eps * kept.abs().amax(dim=0)
            assert bool(((out[b] - expected).abs()[finite] <= bound[finite]).all())


@SETTINGS
@given(data=st.data())
def test_krum_selections_are_bitwise_those_of_the_2d_call(data):
    case = data.draw(batches(max_f_krum, min_n=3))
    x, f, n = case["x"], case["f"], case["n"]
    elements = flat_elements(x)
    keep = ~invalid_mask(x)
    elements = elements[keep]
    if not elements.shape[0]:
        return
    m = data.draw(st.integers(1, n), label="m")
    selected = multi_krum_selection_batched(elements, f=f, m=m)
    for b in range(elements.shape[0]):
        expected = multi_krum_selection(elements[b], f=f, m=m)
        if torch.unique(elements[b], dim=0).shape[0] == n:  # distinct rows: the very indices
            assert torch.equal(selected[b], expected)
        else:  # a duplicated row may stand in for its twin: the same rows' values
            assert torch.equal(elements[b][selected[b]], elements[b][expected])


def test_geometric_median_iterations_differ_by_at_most_one():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 9, 40, generator=g, dtype=torch.float64)
    x[2, 0] = 1e200  # the overflow path: this element runs the 2-D code
    out, iterations = geometric_median_batched(x)
    for b in range(5):
        expected, count = geometric_median_impl(x[b])
        assert abs(int(iterations[b]) - count) <= 1
        torch.testing.assert_close(out[b], expected, rtol=0, atol=tolerance("geometric_median", x[b], expected))
    assert int(iterations[2]) == geometric_median_impl(x[2])[1]


# --------------------------------------------------------------------------------------------------
# Pipelines: aggregates and reports element by element


@pytest.mark.parametrize("spec", PIPELINES)
@SETTINGS
@given(data=st.data())
def test_pipelines_match_the_2d_call_per_element(spec, data):
    # Prepare
    params, max_f, exact_prefix = PIPELINES[spec]
    case = data.draw(batches(max_f, min_n=3))
    x, f, count = case["x"], case["f"], case["count"]
    if x.dim() == 2:
        x = x[None]  # a pipeline's batched form needs a batch dimension
        count = 1
    pipeline = build_pipeline(spec, f=f, **params)

    # Execute
    out, report = pipeline(x, generator=generators(case["seed"], count))

    # Assert
    assert isinstance(report, BatchedAggregationReport)
    assert all(isinstance(stage, BatchedStageReport) for stage in report.stages)
    assert out.shape == (*x.shape[:-2], x.shape[-1])
    assert report.invalid.shape == x.shape[:-2]
    bad = invalid_mask(x)
    assert torch.equal(report.invalid.reshape(-1), bad)
    elements, flat_out = flat_elements(x), out.reshape(count, -1)
    for i, g in enumerate(generators(case["seed"], count)):
        if bad[i]:
            assert flat_out[i].isnan().all()
            continue
        expected, expected_report = pipeline(elements[i], generator=g)
        # The tolerance is the last stage's, scaled by what reaches the inexact stages.
        reaching = elements[i] if exact_prefix is None else exact_prefix(elements[i], f)
        name = spec.rsplit("> ", 1)[-1] if "nnm" not in spec else "nnm"
        atol = tolerance(name, reaching, expected)
        if spec.endswith("geometric_median"):
            atol += tolerance("geometric_median", reaching, expected)
        torch.testing.assert_close(flat_out[i], expected, rtol=0, atol=atol, equal_nan=True)
        assert_reports_equal(report, i, expected_report, elements[i])


def assert_reports_equal(report: BatchedAggregationReport, i: int, expected, element: Tensor) -> None:
    one = report.element(i)
    assert [s.name for s in one.stages] == [s.name for s in expected.stages]
    if expected.clip_threshold is None:
        assert report.clip_threshold is None and one.clip_threshold is None
    else:
        assert one.clip_threshold == expected.clip_threshold
        assert float(report.clip_threshold.reshape(-1)[i]) == expected.clip_threshold
        assert report.clip_threshold.dtype == torch.float64
    for field in ("clipped", "clipped_inputs"):
        want, got = getattr(expected, field), getattr(one, field)
        assert (want is None) == (got is None) == (getattr(report, field) is None)
        if want is not None:
            assert torch.equal(got, want)
            assert torch.equal(getattr(report, field).reshape(-1, want.shape[0])[i], want)
    if expected.selected is None:
        assert report.selected is None
    else:  # after NNM the rows are mixtures: distinct unless the inputs were close to it
        assert one.selected.dtype == torch.int64 and one.selected.shape == expected.selected.shape
    for batched_stage, stage in zip(report.stages, expected.stages):
        if stage.groups is not None:
            assert torch.equal(batched_stage.groups.reshape(-1, stage.groups.shape[0])[i], stage.groups)


def test_multi_krum_pipeline_selects_the_2d_calls_rows():
    # Distinct continuous rows (no near ties): the selected indices are the 2-D call's exactly.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 11, 6, generator=g)
    x[0, 1, 4] = 1e30
    pipeline = build_pipeline("arc > nnm > multi_krum", f=3)
    _, report = pipeline(x)
    for i, element in enumerate(flat_elements(x)):
        assert torch.equal(report.element(i).selected, pipeline(element)[1].selected)
        assert torch.equal(report.selected.reshape(6, -1)[i], pipeline(element)[1].selected)


def test_pipeline_invalid_elements_are_nan_and_the_others_untouched():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 1030, generator=g)
    x[0, 2, 5, 17] = math.nan
    x[1, 0, 0, 0] = math.inf
    pipeline = build_pipeline("arc > nnm > cwtm", f=2)
    out, report = pipeline(x)
    assert report.invalid.tolist() == [[False, False, True], [True, False, False]]
    assert out[0, 2].isnan().all() and out[1, 0].isnan().all()
    clean = x.clone()
    clean[0, 2] = 0.0
    clean[1, 0] = 0.0
    again, _ = pipeline(clean)
    for b, t in [(0, 0), (0, 1), (1, 1), (1, 2)]:
        assert torch.equal(out[b, t], again[b, t])
        # cwtm's documented tolerance on what reaches it (arc's output: bitwise; nnm's: within its own)
        reaching = arc(x[b, t], f=2)
        atol = tolerance("nnm", reaching, out[b, t]) + tolerance("cwtm", reaching, out[b, t])
        torch.testing.assert_close(out[b, t], pipeline(x[b, t])[0], rtol=0, atol=atol)


def test_pipeline_takes_one_generator_per_element_or_none():
    x = torch.randn(2, 3, 8, 4)
    pipeline = build_pipeline("bucketing > cwtm", f=1, s=2)
    with pytest.raises(ValueError, match=r"expected one generator per batch element \(6\), got 2"):
        pipeline(x, generator=[torch.Generator(), torch.Generator()])
    out, report = pipeline(x)  # the global generator, element after element
    assert out.shape == (2, 3, 4) and report.stages[0].groups.shape == (2, 3, 8)


def test_report_element_divides_the_seconds_and_rejects_bad_indices():
    _, report = build_pipeline("arc > cwtm", f=1)(torch.randn(4, 5, 3))
    assert report.element(3).stages[0].seconds == pytest.approx(report.stages[0].seconds / 4)
    with pytest.raises(IndexError, match=r"in \[0, 4\), got 4"):
        report.element(4)


def test_an_empty_batch_gives_empty_aggregates_and_reports():
    out, report = build_pipeline("arc > nnm > multi_krum", f=1)(torch.zeros(0, 3, 7, 2))
    assert out.shape == (0, 3, 2)
    assert report.invalid.shape == (0, 3)
    assert report.clip_threshold.shape == (0, 3) and report.clipped.shape == (0, 3, 7)
    assert report.selected.shape == (0, 3, 6)  # m = n - f


# --------------------------------------------------------------------------------------------------
# Plugin rules: per-element fallback, or one call with batched=True


@pytest.fixture
def plugin_rules(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("batched_test_rules")
    calls: list[tuple[int, ...]] = []

    @rule(kind="aggregator", condition=lambda n, f: n > 2 * f, requires="n > 2f")
    def middle(x: Tensor, *, f: int) -> Tensor:
        calls.append(tuple(x.shape))
        return x.sort(dim=0).values[f : x.shape[0] - f].mean(dim=0)

    @rule(kind="aggregator", batched=True)
    def plain_mean(x: Tensor, *, f: int) -> Tensor:
        calls.append(tuple(x.shape))
        return x.mean(dim=-2)

    module.middle, module.plain_mean, module.calls = middle, plain_mean, calls
    monkeypatch.setitem(sys.modules, "batched_test_rules", module)
    return "batched_test_rules"


def test_a_plugin_rule_runs_once_per_element_unless_batched(plugin_rules):
    calls = sys.modules[plugin_rules].calls
    x = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    x[1, 1, 0, 0] = math.nan

    pipeline = build_pipeline(f"arc > {plugin_rules}:middle", f=2)
    out, report = pipeline(x)
    assert calls == [(7, 4)] * 6  # the fallback: one 2-D call per element
    for i, element in enumerate(flat_elements(x)):
        if i == 4:
            assert out.reshape(6, 4)[i].isnan().all()
        else:
            assert torch.equal(out.reshape(6, 4)[i], pipeline(element)[0])
    assert report.invalid.reshape(-1).tolist() == [False] * 4 + [True, False]

    calls.clear()
    out, _ = build_pipeline(f"arc > {plugin_rules}:plain_mean", f=2)(x)
    assert calls == [(6, 7, 4)]  # batched: once, with the flattened batch
    assert out.shape == (2, 3, 4)


def test_a_batched_plugin_must_return_one_output_per_element(plugin_rules):
    @rule(kind="aggregator", batched=True)
    def collapse(x: Tensor, *, f: int) -> Tensor:
        return x.mean(dim=(0, 1))

    sys.modules[plugin_rules].collapse = collapse
    with pytest.raises(ValueError, match=r"collapse: a batched rule must return one output per element \(2\)"):
        build_pipeline(f"{plugin_rules}:collapse", f=0)(torch.randn(2, 3, 4))


# --------------------------------------------------------------------------------------------------
# The paper's pipeline in both dtypes, and on CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paper_pipeline_in_both_dtypes(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 13, 1500, generator=g, dtype=torch.float64).to(dtype)
    x[:, :, :3] *= 100.0  # three Byzantine rows per element
    pipeline = build_pipeline("arc > nnm > cwtm", f=3)
    out, report = pipeline(x)
    assert out.dtype == dtype
    for i, element in enumerate(flat_elements(x)):
        expected, expected_report = pipeline(element)
        clipped = arc(element, f=3)
        torch.testing.assert_close(out.reshape(4, -1)[i], expected, rtol=0, atol=tolerance("nnm", clipped, expected))
        assert report.element(i).clip_threshold == expected_report.clip_threshold
        assert torch.equal(report.element(i).clipped, expected_report.clipped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["arc > nnm > cwtm", "arc > nnm > multi_krum", "nnm > cwmed"])
def test_batched_pipeline_on_cuda_matches_the_2d_calls(spec):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 13, 2000, generator=g).cuda()
    x[1, 4, 7] = math.nan
    pipeline = build_pipeline(spec, f=3)
    out, report = pipeline(x)
    assert report.invalid.tolist() == [False, True, False]
    assert out[1].isnan().all()
    for i in (0, 2):
        expected, expected_report = pipeline(x[i])
        clipped = arc(x[i], f=3)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=tolerance("nnm", clipped, expected))
        assert report.element(i).clip_threshold == expected_report.clip_threshold


@pytest.mark.parametrize(
    "spec", ["arc > nnm > cwtm", "arc > nnm > multi_krum", "nnm > cwmed", "static_clip > nnm > krum", "bulyan"]
)
def test_the_accelerator_paths_match_the_2d_calls_on_the_cpu(spec):
    # What a GPU runs (one batched Gram matrix, batched mixing products, torch.sort, the whole batch
    # at once), on CPU tensors: the CUDA path covered where no GPU is.
    import arcsim.robust._batch as batch_module

    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 13, 2000, generator=g)
    x[0, 2] = x[0, 5]  # a duplicate row: ties in the distances
    x[1, 4, 7] = math.nan
    pipeline = build_pipeline(spec, f=2, **({"c": 2.0} if spec.startswith("static_clip") else {}))
    large = torch.zeros(1).expand(40, 13, 431_080)  # 22 MB elements, no memory
    assert len(batch_module.chunks(large)) == 40  # on the CPU: one element per chunk
    with device_paths():
        assert not host_tuned(x) and batch_module.chunks(large) == [slice(0, 40)]
        out, report = pipeline(x)
    assert host_tuned(x)
    assert report.invalid.tolist() == [False, True, False]
    assert out[1].isnan().all()
    for i in (0, 2):
        expected, expected_report = pipeline(x[i])
        reaching = arc(x[i], f=2) if spec.startswith("arc") else x[i]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=tolerance("nnm", reaching, expected))
        assert report.element(i).clip_threshold == expected_report.clip_threshold


# --------------------------------------------------------------------------------------------------
# Chunks: on CPU a large batch runs in cache-sized chunks of elements; the results must not change.


@pytest.mark.parametrize("spec", PIPELINES)
def test_a_batch_split_into_chunks_gives_each_elements_2d_result(spec, monkeypatch):
    import arcsim.robust._batch as batch_module

    params, _, exact_prefix = PIPELINES[spec]
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 9, 1030, generator=g, dtype=torch.float64)
    x[1, 0, 2, 5] = math.nan
    monkeypatch.setattr(batch_module, "CHUNK_BYTES", 2 * 9 * 1030 * 8)  # two elements per chunk
    pipeline = build_pipeline(spec, f=2, **params)
    out, report = pipeline(x, generator=generators(4, 6))
    direct = bucketing(x, s=2, generator=generators(4, 6))
    for i, (element, g_i) in enumerate(zip(flat_elements(x), generators(4, 6))):
        if i == 3:
            assert out.reshape(6, -1)[i].isnan().all() and report.invalid.reshape(-1)[i]
            assert direct.reshape(6, 5, -1)[i].isnan().all()
            continue
        expected, expected_report = pipeline(element, generator=g_i)
        reaching = element if exact_prefix is None else exact_prefix(element, 2)
        atol = tolerance("nnm", reaching, expected) + tolerance("geometric_median", reaching, expected)
        torch.testing.assert_close(out.reshape(6, -1)[i], expected, rtol=0, atol=atol)
        assert_reports_equal(report, i, expected_report, element)
        assert torch.equal(direct.reshape(6, 5, -1)[i], bucketing(element, s=2, generator=generators(4, 6)[i]))
