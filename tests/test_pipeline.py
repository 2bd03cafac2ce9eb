"""Tests for arcsim.robust pipelines: build_pipeline, parse_spec, Pipeline and AggregationReport."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import Tensor

from arcsim.robust import (
    AGGREGATORS,
    PRE_AGGREGATORS,
    AggregationReport,
    Pipeline,
    arc,
    bucketing,
    build_pipeline,
    bulyan,
    centered_clip,
    cwmed,
    cwtm,
    geometric_median,
    krum,
    mean,
    multi_krum,
    nnm,
    parse_spec,
    static_clip,
)
from arcsim.seeding import generator

PAPER_PIPELINES = ("arc > nnm > cwtm", "arc > nnm > geometric_median", "arc > nnm > multi_krum", "arc > nnm > cwmed")


def randn(n: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(n, d, generator=generator(seed, "test_pipeline", n, d), dtype=dtype)


def paper_example(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Registry and grammar


def test_registry_names():
    assert PRE_AGGREGATORS == ("arc", "static_clip", "nnm", "bucketing")
    assert AGGREGATORS == ("mean", "cwtm", "cwmed", "geometric_median", "krum", "multi_krum", "centered_clip", "bulyan")


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("arc > nnm > cwtm", ("arc", "nnm", "cwtm")),
        ("arc>nnm>cwtm", ("arc", "nnm", "cwtm")),
        ("  arc  >\tnnm >cwtm ", ("arc", "nnm", "cwtm")),
        ("mean", ("mean",)),
        ("bucketing > arc > static_clip > nnm > bulyan", ("bucketing", "arc", "static_clip", "nnm", "bulyan")),
        ("arc > arc > mean", ("arc", "arc", "mean")),
    ],
)
def test_parse_spec(spec, names):
    assert parse_spec(spec) == names


def test_pipeline_normalises_its_spec():
    # Execute
    pipeline = build_pipeline(" arc>nnm >  cwtm", f=1)

    # Assert
    assert isinstance(pipeline, Pipeline)
    assert pipeline.spec == "arc > nnm > cwtm"
    assert pipeline.stage_names == ("arc", "nnm", "cwtm")
    assert pipeline.f == 1
    assert repr(pipeline) == "Pipeline('arc > nnm > cwtm', f=1)"


# --------------------------------------------------------------------------------------------------
# A pipeline computes the composition of the public functions.


def test_paper_example_through_the_paper_pipeline():
    # Prepare: ARC (f = 1) clips [7, 8, 9] to [4.4100, 5.0400, 5.6701] (docs/paper.md). NNM (2 nearest):
    # squared distances a-b 27, b-c' ~ 0.28, a-c' ~ 28.0: a -> {a, b}; b -> {b, c'}; c' -> {c', b}.
    # CWTM (f = 1, n = 3) keeps the middle value of each coordinate.
    x = paper_example()
    c = x[2] * math.sqrt(77 / 194)
    mixed = torch.stack([(x[0] + x[1]) / 2, (x[1] + c) / 2, (c + x[1]) / 2])

    # Execute
    out, report = build_pipeline("arc > nnm > cwtm", f=1)(x)

    # Assert
    torch.testing.assert_close(out, mixed.median(dim=0).values)
    assert report.clip_threshold == pytest.approx(math.sqrt(77), rel=1e-6)
    assert report.clipped.tolist() == [False, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("spec", "compose"),
    [
        ("arc > nnm > cwtm", lambda x, f: cwtm(nnm(arc(x, f=f), f=f), f=f)),
        ("arc > nnm > geometric_median", lambda x, f: geometric_median(nnm(arc(x, f=f), f=f))),
        ("arc > nnm > multi_krum", lambda x, f: multi_krum(nnm(arc(x, f=f), f=f), f=f)),
        ("arc > nnm > cwmed", lambda x, f: cwmed(nnm(arc(x, f=f), f=f))),
        ("static_clip > nnm > krum", lambda x, f: krum(nnm(static_clip(x, c=0.5), f=f), f=f)),
        ("arc > bulyan", lambda x, f: bulyan(arc(x, f=f), f=f)),
        ("nnm > centered_clip", lambda x, f: centered_clip(nnm(x, f=f), tau=0.5)),
        ("arc > mean", lambda x, f: mean(arc(x, f=f))),
    ],
)
def test_pipeline_equals_composition(spec, compose, dtype):
    # Prepare: 11 rows, 2 of them large.
    x = randn(11, 6, dtype=dtype)
    x[[3, 8]] *= 1e4
    params = {"c": 0.5} if "static_clip" in spec else {"tau": 0.5} if "centered_clip" in spec else {}

    # Execute
    out, _ = build_pipeline(spec, f=2, **params)(x)

    # Assert: the same kernels in the same order, so bitwise equal.
    assert torch.equal(out, compose(x, 2))


def test_bucketing_pipeline_equals_composition_with_the_same_generator():
    # Prepare
    x = randn(12, 4)

    # Execute
    out, _ = build_pipeline("bucketing > arc > cwtm", f=1, s=2)(x, generator=torch.Generator().manual_seed(9))
    expected = cwtm(arc(bucketing(x, s=2, generator=torch.Generator().manual_seed(9)), f=1), f=1)

    # Assert
    assert torch.equal(out, expected)


def test_bucketing_pipeline_is_deterministic_for_a_seed():
    pipeline = build_pipeline("bucketing > cwmed", f=1, s=3)
    x = randn(12, 4)
    first, _ = pipeline(x, generator=generator(1, "bucketing"))
    second, _ = pipeline(x, generator=generator(1, "bucketing"))
    other, _ = pipeline(x, generator=generator(2, "bucketing"))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_bucketing_pipeline_without_generator():
    out, _ = build_pipeline("bucketing > cwmed", f=0, s=4)(randn(10, 3))
    assert out.shape == (3,) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "params", "direct"),
    [
        ("mean", {}, lambda x: mean(x)),
        ("cwtm", {}, lambda x: cwtm(x, f=2)),
        ("cwmed", {}, lambda x: cwmed(x)),
        ("geometric_median", {}, lambda x: geometric_median(x)),
        (
            "geometric_median",
            {"tol": 1e-9, "max_iter": 7, "nu": 1e-3},
            lambda x: geometric_median(x, tol=1e-9, max_iter=7, nu=1e-3),
        ),
        ("krum", {}, lambda x: krum(x, f=2)),
        ("multi_krum", {}, lambda x: multi_krum(x, f=2)),
        ("multi_krum", {"m": 3}, lambda x: multi_krum(x, f=2, m=3)),
        ("centered_clip", {"tau": 0.3}, lambda x: centered_clip(x, tau=0.3)),
        ("centered_clip", {"tau": 0.3, "iters": 4}, lambda x: centered_clip(x, tau=0.3, iters=4)),
        (
            "centered_clip",
            {"tau": 0.3, "center": torch.full((5,), 0.1, dtype=torch.float64)},
            lambda x: centered_clip(x, tau=0.3, center=torch.full((5,), 0.1, dtype=torch.float64)),
        ),
        ("bulyan", {}, lambda x: bulyan(x, f=2)),
    ],
)
def test_single_aggregator_pipeline_equals_the_function(name, params, direct):
    x = randn(11, 5)
    out, report = build_pipeline(name, f=2, **params)(x)
    assert torch.equal(out, direct(x))
    assert [stage.name for stage in report.stages] == [name]


@pytest.mark.parametrize(
    ("name", "params", "direct"),
    [
        ("arc", {}, lambda x: arc(x, f=2)),
        ("static_clip", {"c": 1.0}, lambda x: static_clip(x, c=1.0)),
        ("nnm", {}, lambda x: nnm(x, f=2)),
    ],
)
def test_pre_aggregator_then_mean_equals_the_functions(name, params, direct):
    x = randn(11, 5)
    out, _ = build_pipeline(f"{name} > mean", f=2, **params)(x)
    assert torch.equal(out, mean(direct(x)))


def test_parameters_reach_every_stage_that_takes_them():
    # Prepare: c goes to static_clip, m to multi_krum.
    x = randn(11, 3)

    # Execute
    out, report = build_pipeline("static_clip > nnm > multi_krum", f=2, c=0.7, m=4)(x)

    # Assert
    assert torch.equal(out, multi_krum(nnm(static_clip(x, c=0.7), f=2), f=2, m=4))
    assert report.clip_threshold == 0.7
    assert len(report.selected) == 4


@pytest.mark.parametrize("spec", PAPER_PIPELINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pipeline_keeps_dtype_and_does_not_modify_input(spec, dtype):
    x = randn(10, 4, dtype=dtype)
    x[0] = 1e6
    before = x.clone()
    out, _ = build_pipeline(spec, f=3)(x)
    assert out.dtype == dtype and out.shape == (4,)
    assert torch.equal(x, before)


def test_pipeline_is_reusable():
    pipeline = build_pipeline("arc > nnm > geometric_median", f=1)
    first, _ = pipeline(randn(6, 3))
    other, _ = pipeline(randn(9, 2, seed=1))
    again, _ = pipeline(randn(6, 3))
    assert torch.equal(first, again)
    assert other.shape == (2,)


# --------------------------------------------------------------------------------------------------
# The report


def test_report_of_the_paper_pipeline():
    # Execute
    _, report = build_pipeline("arc > nnm > cwtm", f=1)(paper_example())

    # Assert
    assert isinstance(report, AggregationReport)
    assert [stage.name for stage in report.stages] == ["arc", "nnm", "cwtm"]
    assert all(stage.seconds >= 0.0 for stage in report.stages)
    arc_stage = report.stages[0]
    assert arc_stage.clip_threshold == report.clip_threshold
    assert torch.equal(arc_stage.clipped, report.clipped)
    assert report.clipped.dtype == torch.bool
    assert report.selected is None
    assert all(stage.clipped is None and stage.clip_threshold is None for stage in report.stages[1:])


def test_report_with_f_zero():
    # k = 0: nothing clipped; the threshold is the largest norm (sqrt(194)).
    _, report = build_pipeline("arc > mean", f=0)(paper_example(torch.float64))
    assert report.clipped.tolist() == [False, False, False]
    assert report.clip_threshold == pytest.approx(math.sqrt(194))


def test_report_of_static_clip():
    # Norms sqrt(14), sqrt(77), sqrt(194) against c = 5: the last two are clipped.
    _, report = build_pipeline("static_clip > cwmed", f=1, c=5.0)(paper_example())
    assert report.clip_threshold == 5.0
    assert report.clipped.tolist() == [False, True, True]


def test_report_of_multi_krum_selection():
    # Krum scores (f = 1, 2 neighbours): 0:5 1:2 2:2 3:5 50:4513 -> stable order 1, 2, 0, 3.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [50.0]])
    _, report = build_pipeline("multi_krum", f=1)(x)
    assert report.selected.tolist() == [1, 2, 0, 3]
    _, report = build_pipeline("multi_krum", f=1, m=2)(x)
    assert report.selected.tolist() == [1, 2]


def test_report_of_krum_selection():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [50.0]])
    out, report = build_pipeline("krum", f=1)(x)
    assert report.selected.tolist() == [1]
    assert out.tolist() == [1.0]


def test_report_of_geometric_median_iterations():
    _, report = build_pipeline("geometric_median", f=0, max_iter=3, tol=1e-300)(randn(5, 2))
    assert report.stages[0].iterations == 3


def test_report_takes_the_first_clipping_stage():
    # Static clipping with c = 100 clips nothing; the ARC stage after it clips the largest row.
    _, report = build_pipeline("static_clip > arc > mean", f=1, c=100.0)(paper_example())
    assert report.clip_threshold == 100.0
    assert report.clipped.tolist() == [False, False, False]
    assert report.stages[1].clipped.tolist() == [False, False, True]


def test_report_masks_refer_to_the_rows_a_stage_received():
    pipeline = build_pipeline("bucketing > arc > mean", f=1, s=2)
    _, report = pipeline(randn(10, 3), generator=torch.Generator().manual_seed(0))
    assert report.clipped.shape == (5,)


def test_clipped_inputs_credit_each_member_of_a_clipped_bucket():
    # Prepare: rows 7 and 9 are huge; buckets of 2 -> 5 means, ARC with f = 1 clips k = 1 of them.
    x = randn(10, 3)
    x[[7, 9]] *= 1e3
    g = torch.Generator().manual_seed(0)

    # Execute
    _, report = build_pipeline("bucketing > arc > mean", f=1, s=2)(x, generator=g)

    # Assert: the input rows of the clipped bucket, found from the bucket assignment, are the clipped ones.
    groups = report.stages[0].groups
    assert groups.shape == (10,) and torch.bincount(groups).tolist() == [2] * 5
    assert torch.equal(report.clipped_inputs, report.clipped[groups])
    assert int(report.clipped_inputs.sum()) == 2 and bool(report.clipped_inputs[[7, 9]].any())


def test_clipped_inputs_follow_buckets_of_buckets():
    _, report = build_pipeline("bucketing > bucketing > arc > mean", f=1, s=2)(
        randn(12, 3), generator=torch.Generator().manual_seed(1)
    )
    first, second = report.stages[0].groups, report.stages[1].groups
    assert torch.equal(report.clipped_inputs, report.clipped[second[first]])


def test_clipped_inputs_are_the_mask_when_the_rows_are_the_inputs():
    _, report = build_pipeline("static_clip > nnm > arc > mean", f=1, c=100.0)(paper_example())
    assert report.clipped_inputs is report.clipped


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("nnm > arc > mean", {}),
        ("nnm > cwtm", {}),
        ("mean", {}),
        ("nnm > bucketing > static_clip > mean", {"s": 2, "c": 1.0}),
    ],
)
def test_clipped_inputs_are_unknown_after_mixing_or_without_clipping(spec, params):
    _, report = build_pipeline(spec, f=1, **params)(randn(7, 3))
    assert report.clipped_inputs is None
    assert report.stages[0].mixes_rows == spec.startswith("nnm")


def test_reports_are_frozen():
    _, report = build_pipeline("arc > mean", f=1)(paper_example())
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.stages = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.stages[0].name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# One test per raise: the spec


@pytest.mark.parametrize("spec", ["", "   ", None, 5, ["arc", "cwtm"]])
def test_rejects_empty_or_non_string_spec(spec):
    with pytest.raises(ValueError, match=re.escape(f"non-empty string like 'arc > nnm > cwtm', got {spec!r}")):
        build_pipeline(spec, f=1)


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("arc > nnm > trimmed_mean", "trimmed_mean"),
        ("ARC > cwtm", "ARC"),
        ("arc > > cwtm", ""),
        ("arc >", ""),
        ("median", "median"),
    ],
)
def test_rejects_unknown_rule_and_lists_the_valid_names(spec, bad):
    # Execute
    with pytest.raises(ValueError) as error:
        build_pipeline(spec, f=1)

    # Assert
    message = str(error.value)
    assert f"unknown rule {bad!r}" in message
    assert repr(spec) in message
    for name in (*PRE_AGGREGATORS, *AGGREGATORS):
        assert name in message


@pytest.mark.parametrize("spec", ["arc > nnm", "arc", "bucketing", "nnm > static_clip"])
def test_rejects_pre_aggregator_last(spec):
    last = spec.split(">")[-1].strip()
    message = f"must end with an aggregator ({', '.join(AGGREGATORS)}), got {last!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_pipeline(spec, f=1, **({"s": 2} if "bucketing" in spec else {"c": 1.0} if "static" in spec else {}))


@pytest.mark.parametrize(
    ("spec", "first_aggregator"),
    [("cwtm > arc > mean", "cwtm"), ("mean > cwtm", "mean"), ("arc > krum > nnm > mean", "krum")],
)
def test_rejects_aggregator_before_the_end(spec, first_aggregator):
    with pytest.raises(ValueError, match=re.escape(f"{first_aggregator!r} is an aggregator and must come last")):
        build_pipeline(spec, f=1)


def test_parse_spec_rejects_like_build_pipeline():
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        parse_spec("arc > nope")


# The parameters


@pytest.mark.parametrize(
    ("spec", "params", "unexpected", "known"),
    [
        ("arc > nnm > cwtm", {"c": 2.0}, "['c']", "none"),
        ("static_clip > cwtm", {"c": 2.0, "tau": 1.0, "zeta": 3}, "['tau', 'zeta']", "['c']"),
        ("multi_krum", {"M": 3}, "['M']", "['m']"),
        ("geometric_median", {"tau": 1.0}, "['tau']", "['max_iter', 'nu', 'tol']"),
    ],
)
def test_rejects_unexpected_parameters(spec, params, unexpected, known):
    with pytest.raises(ValueError, match=re.escape(f"unexpected parameters {unexpected}; its stages take {known}")):
        build_pipeline(spec, f=1, **params)


@pytest.mark.parametrize(
    ("spec", "rule", "missing"),
    [
        ("static_clip > cwtm", "static_clip", "['c']"),
        ("centered_clip", "centered_clip", "['tau']"),
        ("bucketing > cwtm", "bucketing", "['s']"),
        ("arc > static_clip > nnm > centered_clip", "static_clip", "['c']"),
    ],
)
def test_rejects_missing_required_parameters(spec, rule, missing):
    with pytest.raises(ValueError, match=re.escape(f"{rule} needs parameter(s) {missing}")):
        other_params = {"tau": 1.0} if "centered_clip" in spec and rule != "centered_clip" else {}
        build_pipeline(spec, f=1, **other_params)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
def test_rejects_bad_f_when_built(bad):
    message = f"build_pipeline: f must be a non-negative integer, got f = {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_pipeline("arc > nnm > cwtm", f=bad)


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("static_clip > mean", {"c": 0.0}, "static_clip: c must be a positive number, got c = 0.0"),
        ("static_clip > mean", {"c": -2}, "static_clip: c must be a positive number, got c = -2"),
        ("static_clip > mean", {"c": float("nan")}, "static_clip: c must be a positive number, got c = nan"),
        ("static_clip > mean", {"c": float("inf")}, "static_clip: c must be finite, got c = inf"),
        ("static_clip > mean", {"c": True}, "static_clip: c must be a positive number, got c = True"),
        ("static_clip > mean", {"c": None}, "static_clip: c must be a positive number, got c = None"),
        ("bucketing > mean", {"s": 0}, "bucketing: s must be a positive integer, got s = 0"),
        ("bucketing > mean", {"s": 1.5}, "bucketing: s must be a positive integer, got s = 1.5"),
        ("bucketing > mean", {"s": True}, "bucketing: s must be a positive integer, got s = True"),
        ("bucketing > mean", {"s": None}, "bucketing: s must be a positive integer, got s = None"),
        ("multi_krum", {"m": 0}, "multi_krum: m must be a positive integer, got m = 0"),
        ("multi_krum", {"m": -3}, "multi_krum: m must be a positive integer, got m = -3"),
        ("multi_krum", {"m": 2.0}, "multi_krum: m must be a positive integer, got m = 2.0"),
        ("multi_krum", {"m": True}, "multi_krum: m must be a positive integer, got m = True"),
        ("centered_clip", {"tau": 0}, "centered_clip: tau must be a positive number, got tau = 0"),
        ("centered_clip", {"tau": float("inf")}, "centered_clip: tau must be finite, got tau = inf"),
        ("centered_clip", {"tau": 1.0, "iters": 0}, "centered_clip: iters must be a positive integer, got iters = 0"),
        (
            "centered_clip",
            {"tau": 1.0, "iters": 1.0},
            "centered_clip: iters must be a positive integer, got iters = 1.0",
        ),
        ("geometric_median", {"tol": 0.0}, "geometric_median: tol must be a positive number, got tol = 0.0"),
        ("geometric_median", {"tol": float("inf")}, "geometric_median: tol must be finite, got tol = inf"),
        ("geometric_median", {"nu": -1e-8}, "geometric_median: nu must be a positive number, got nu = -1e-08"),
        (
            "geometric_median",
            {"max_iter": 0},
            "geometric_median: max_iter must be a positive integer, got max_iter = 0",
        ),
        (
            "geometric_median",
            {"max_iter": False},
            "geometric_median: max_iter must be a positive integer, got max_iter = False",
        ),
        (
            "centered_clip",
            {"tau": 1.0, "center": [0.0, 1.0]},
            "centered_clip: center must be a tensor or None, got list",
        ),
        (
            "centered_clip",
            {"tau": 1.0, "center": torch.zeros(2, 2)},
            "centered_clip: center must have shape (d,), got (2, 2)",
        ),
        (
            "centered_clip",
            {"tau": 1.0, "center": torch.tensor([0.0, float("nan")])},
            "centered_clip: center has non-finite values",
        ),
    ],
)
def test_rejects_bad_parameter_values_when_built(spec, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_pipeline(spec, f=1, **params)


# Call-time checks: the input and the n-dependent conditions


@pytest.mark.parametrize(
    ("x", "message"),
    [
        ([[1.0, 2.0]], "expected a torch.Tensor, got list"),
        (torch.zeros(3), "expected an (n, d) tensor, got shape (3,)"),
        (torch.zeros(3, 2, dtype=torch.int64), "expected a floating tensor (float32 or float64), got torch.int64"),
        (torch.zeros(0, 2), "expected at least one row (n >= 1), got n = 0"),
        (torch.tensor([[0.0], [float("nan")], [1.0]]), "input has non-finite values (NaN or Inf) in rows [1]"),
        (torch.tensor([[0.0], [1.0], [float("-inf")]]), "input has non-finite values (NaN or Inf) in rows [2]"),
    ],
)
def test_call_rejects_bad_input_with_the_spec_in_the_message(x, message):
    with pytest.raises(ValueError, match=re.escape(f"arc > nnm > cwtm: {message}")):
        build_pipeline("arc > nnm > cwtm", f=1)(x)


@pytest.mark.parametrize(
    ("spec", "f", "n", "message"),
    [
        ("arc > nnm > cwtm", 2, 4, "arc: needs 2f < n, got n = 4, f = 2"),
        ("nnm > mean", 3, 6, "nnm: needs 2f < n, got n = 6, f = 3"),
        ("cwtm", 1, 2, "cwtm: needs 2f < n, got n = 2, f = 1"),
        ("arc > nnm > multi_krum", 2, 6, "multi_krum: needs n > 2f + 2, got n = 6, f = 2"),
        ("krum", 0, 2, "krum: needs n > 2f + 2, got n = 2, f = 0"),
        ("arc > bulyan", 2, 10, "bulyan: needs n >= 4f + 3, got n = 10, f = 2"),
        # Bucketing shrinks n before the next stage checks it: 8 rows in buckets of 2 -> 4 rows.
        ("bucketing > nnm > cwtm", 2, 8, "nnm: needs 2f < n, got n = 4, f = 2"),
    ],
)
def test_call_checks_each_stage_condition(spec, f, n, message):
    pipeline = build_pipeline(spec, f=f, **({"s": 2} if "bucketing" in spec else {}))
    with pytest.raises(ValueError, match=re.escape(message)):
        pipeline(randn(n, 2))


def test_call_rejects_m_larger_than_n():
    pipeline = build_pipeline("nnm > multi_krum", f=1, m=9)
    with pytest.raises(ValueError, match=re.escape("multi_krum: m must be an integer in [1, n], got m = 9, n = 5")):
        pipeline(randn(5, 2))


def test_call_rejects_center_of_the_wrong_length():
    pipeline = build_pipeline("arc > centered_clip", f=1, tau=1.0, center=torch.zeros(3))
    assert pipeline(randn(5, 3))[0].shape == (3,)
    with pytest.raises(ValueError, match=re.escape("centered_clip: center must have shape (2,), got (3,)")):
        pipeline(randn(5, 2))


# --------------------------------------------------------------------------------------------------
# Huge but finite Byzantine vectors (float32 squared norms overflow from about 1e19 / sqrt(d))


@pytest.mark.parametrize("spec", PAPER_PIPELINES)
@pytest.mark.parametrize("magnitude", [1e20, 1e30, 3e38])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paper_pipelines_with_huge_byzantine_rows(spec, magnitude, dtype):
    # Prepare: 3 Byzantine rows (two equal, one opposite) among 8 honest standard normal rows.
    honest = randn(8, 5, seed=4, dtype=dtype)
    byzantine = torch.full((3, 5), magnitude, dtype=dtype)
    byzantine[2] *= -1
    x = torch.cat([byzantine, honest])

    # Execute
    out, report = build_pipeline(spec, f=3)(x)

    # Assert: every Byzantine row is clipped to the threshold (a norm of an honest row) and the
    # aggregate stays within the honest rows' range widened by their diameter.
    assert report.clipped[:3].all()
    assert report.clip_threshold <= float(torch.linalg.vector_norm(honest.double(), dim=1).max()) * (1 + 1e-6)
    diameter = float(torch.cdist(honest.double(), honest.double()).max())
    lo, hi = honest.min(dim=0).values - diameter, honest.max(dim=0).values + diameter
    assert torch.isfinite(out).all()
    assert bool(((out >= lo) & (out <= hi)).all())


@pytest.mark.parametrize(
    "spec", ["nnm > cwtm", "nnm > geometric_median", "nnm > multi_krum", "geometric_median", "krum", "bulyan"]
)
def test_pipelines_without_clipping_survive_huge_float32_rows(spec):
    # Without ARC in front, the rules themselves must cope with overflowing distances.
    honest = randn(8, 5, seed=4, dtype=torch.float32)
    x = torch.cat([torch.full((3, 5), 1e30), honest])
    out, _ = build_pipeline(spec, f=2 if spec == "bulyan" else 3)(x)
    assert torch.isfinite(out).all()
    assert float(out.abs().max()) < 10.0
