"""Unit tests for arcsim.robust: hand-computed cases for every rule, one test per ``raise``, edge cases.

Properties over random inputs (permutation invariance, translation equivariance, ARC's clipping
count, robustness of the paper's pipelines) are in test_robust_properties.py; pipelines in
test_pipeline.py.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import pkgutil
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import arcsim.robust as robust
from arcsim.robust import (
    arc,
    arc_num_clipped,
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
    static_clip,
)
from arcsim.robust.arc import arc_with_report
from arcsim.seeding import generator

# The package re-exports each rule under its module's name (arcsim.robust.arc is the function), so
# the modules themselves are fetched from importlib.
ROBUST_MODULES = [importlib.import_module(f"arcsim.robust.{m.name}") for m in pkgutil.iter_modules(robust.__path__)]

# name -> (call on (x, f), does (n, f) satisfy the rule's condition). Hyperparameters that are not f
# get fixed values.
RULES: dict[str, tuple[Callable[[Tensor, int], Tensor], Callable[[int, int], bool]]] = {
    "arc": (lambda x, f: arc(x, f=f), lambda n, f: 2 * f < n),
    "static_clip": (lambda x, f: static_clip(x, c=1.5), lambda n, f: True),
    "nnm": (lambda x, f: nnm(x, f=f), lambda n, f: 2 * f < n),
    "bucketing": (lambda x, f: bucketing(x, s=2, generator=torch.Generator().manual_seed(3)), lambda n, f: True),
    "mean": (lambda x, f: mean(x), lambda n, f: True),
    "cwtm": (lambda x, f: cwtm(x, f=f), lambda n, f: 2 * f < n),
    "cwmed": (lambda x, f: cwmed(x), lambda n, f: True),
    "geometric_median": (lambda x, f: geometric_median(x), lambda n, f: True),
    "krum": (lambda x, f: krum(x, f=f), lambda n, f: n > 2 * f + 2),
    "multi_krum": (lambda x, f: multi_krum(x, f=f), lambda n, f: n > 2 * f + 2),
    "centered_clip": (lambda x, f: centered_clip(x, tau=1.0, iters=3), lambda n, f: True),
    "bulyan": (lambda x, f: bulyan(x, f=f), lambda n, f: n >= 4 * f + 3),
}
PRE_AGGREGATORS = ("arc", "static_clip", "nnm", "bucketing")
RULES_WITH_F = ("arc", "nnm", "cwtm", "krum", "multi_krum", "bulyan")


def randn(n: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(n, d, generator=generator(seed, "test_robust", n, d), dtype=dtype)


def t(rows: list[list[float]], dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.tensor(rows, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Docstrings: every example runs, every public function has one.


@pytest.mark.parametrize("module", ROBUST_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples_pass(module):
    # Execute
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)

    # Assert
    assert result.failed == 0


@pytest.mark.parametrize("name", [n for n in robust.__all__ if inspect.isfunction(getattr(robust, n))])
def test_every_public_function_has_an_example(name):
    assert ">>>" in (inspect.getdoc(getattr(robust, name)) or "")


# --------------------------------------------------------------------------------------------------
# ARC


def test_arc_paper_example():
    # Prepare: norms sqrt(14) < sqrt(77) < sqrt(194); n = 3, f = 1 gives k = floor(2*1*2/3) = 1 and
    # C = sqrt(77), so only [7, 8, 9] changes, to [7, 8, 9] * sqrt(77/194) = [4.4100, 5.0400, 5.6701].
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], torch.float32)

    # Execute
    out = arc(x, f=1)

    # Assert
    assert torch.equal(out[:2], x[:2])
    torch.testing.assert_close(out[2], torch.tensor([4.4100, 5.0400, 5.6701]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[2], x[2] * math.sqrt(77 / 194))


@pytest.mark.parametrize(
    ("n", "f", "k"),
    [
        (242, 33, 57),  # 2*33*209 = 13794 = 57 * 242 exactly; the float product truncates to 56
        (3, 1, 1),
        (5, 2, 2),  # 12 // 5
        (13, 3, 4),  # 60 // 13
        (10, 0, 0),
        (1, 0, 0),
        (7, 3, 3),  # 24 // 7: at the breakdown point n = 2f + 1, k = f
        (100, 49, 49),  # 2*49*51 = 4998 -> 49.98 -> 49
    ],
)
def test_arc_num_clipped_table(n, f, k):
    assert arc_num_clipped(n, f) == k


def test_arc_num_clipped_is_integer_arithmetic_where_floats_fail():
    # Prepare: the (n, f) where float formulas truncate to a different k, e.g. 2 * (f / n) * (n - f)
    # (the reference code's pitfall: 56 for n = 242, f = 33) or 2 * f * (1 - f / n).
    pairs = [(n, f) for n in range(1, 400) for f in range((n + 1) // 2)]
    wrong_with_floats = [
        (n, f)
        for n, f in pairs
        if int(2 * (f / n) * (n - f)) != 2 * f * (n - f) // n or int(2 * f * (1 - f / n)) != 2 * f * (n - f) // n
    ]

    # Assert: such pairs exist (the pitfall is real) and the library is exact on all of them.
    assert (242, 33) in wrong_with_floats and len(wrong_with_floats) > 10
    assert all(arc_num_clipped(n, f) == 2 * f * (n - f) // n for n, f in wrong_with_floats)


def test_arc_clips_the_k_largest_to_the_next_norm():
    # Prepare: n = 5, f = 2 -> k = 2; norms 1, 2, 3, 4, 5 -> C = 3 (the 3rd largest); signs kept.
    x = t([[1.0], [-2.0], [3.0], [-4.0], [5.0]])

    # Execute
    out = arc(x, f=2)

    # Assert
    assert out.flatten().tolist() == [1.0, -2.0, 3.0, -3.0, 3.0]


def test_arc_with_f_zero_is_the_identity():
    # Prepare
    x = randn(6, 4)

    # Execute
    out = arc(x, f=0)

    # Assert: bitwise equal, but a new tensor
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()


def test_arc_all_rows_identical_clips_nothing():
    # Prepare: every norm equals C, and ARC only clips norms strictly above C.
    x = torch.ones(7, 3)

    # Execute
    out = arc(x, f=3)

    # Assert
    assert torch.equal(out, x)


def test_arc_with_zero_threshold_zeroes_the_larger_rows():
    # Prepare: n = 3, f = 1 -> k = 1; norms 0, 0, 5 -> C = 0, so [3, 4] becomes 0 * [3, 4] / 5.
    x = t([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])

    # Execute
    out = arc(x, f=1)
    _, report = build_pipeline("arc > mean", f=1)(x)

    # Assert
    assert torch.equal(out, torch.zeros(3, 2, dtype=torch.float64))
    assert report.clip_threshold == 0.0
    assert report.clipped.tolist() == [False, False, True]


def test_arc_all_zero_rows():
    x = torch.zeros(5, 3)
    assert torch.equal(arc(x, f=2), x)


def test_arc_single_row():
    x = t([[3.0, -4.0]])
    assert torch.equal(arc(x, f=0), x)


def test_arc_clips_rows_with_overflowing_norms_to_the_threshold():
    # Prepare: float32 squares of 1e30 overflow (1e60 > 3.4e38), so ||[1e30, 1e30]|| is inf in float32.
    # n = 3, f = 1 -> k = 1, C = ||[3, 4]|| = 5, so the huge row becomes 5 * [1, 1] / sqrt(2).
    x = t([[1e30, 1e30], [1.0, 2.0], [3.0, 4.0]], torch.float32)
    assert torch.isinf(torch.linalg.vector_norm(x[0]))

    # Execute
    out = arc(x, f=1)

    # Assert
    torch.testing.assert_close(out[0], torch.full((2,), 5 / math.sqrt(2)))
    assert torch.equal(out[1:], x[1:])


def test_arc_report_threshold_with_overflowing_norms():
    # Prepare: f = 0 -> k = 0: nothing clipped; the reported threshold is the largest norm,
    # sqrt(2) * 1e30, which float32 cannot hold but the report (a Python float) can.
    x = t([[1e30, 1e30], [1.0, 2.0]], torch.float32)

    # Execute
    out, report = build_pipeline("arc > mean", f=0)(x)

    # Assert
    assert report.clip_threshold == pytest.approx(math.sqrt(2) * 1e30, rel=1e-6)
    assert torch.isfinite(out).all()


def test_arc_float64_huge_rows():
    # Prepare: float64 squares of 1e200 overflow as well.
    x = t([[1e200, -1e200], [1.0, 2.0], [3.0, 4.0]])

    # Execute
    out = arc(x, f=1)

    # Assert
    torch.testing.assert_close(out[0], t([[5 / math.sqrt(2), -5 / math.sqrt(2)]])[0])


def test_arc_near_float32_max():
    # Prepare: entries near float32's largest value; norms overflow and x - y would too.
    big = 3.0e38
    x = t([[big, big], [big, -big], [-big, big], [1.0, 0.0], [0.0, 1.0]], torch.float32)

    # Execute: n = 5, f = 2 -> k = 2, C = the 3rd largest norm = sqrt(2) * 3e38 (three equal norms).
    out = arc(x, f=2)

    # Assert: nothing is strictly above C, so nothing changes.
    assert torch.equal(out, x)


# Entries from 2**1023 up to float64's largest value: a power of two near them is 2**1024 = inf, and
# norms of rows with two such entries exceed float64's range.
F64_MAX = torch.finfo(torch.float64).max
F32_MAX = torch.finfo(torch.float32).max


def test_arc_clips_rows_at_float64_max_to_the_threshold():
    # Prepare: n = 5, f = 2 -> k = 2: the two huge rows are clipped to C = ||[3, 4]|| = 5.
    x = t([[F64_MAX, F64_MAX], [F64_MAX, -F64_MAX], [1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])

    # Execute
    out, threshold, clipped = arc_with_report(x, f=2)

    # Assert
    assert threshold == 5.0
    assert clipped.tolist() == [True, True, False, False, False]
    torch.testing.assert_close(out[:2], t([[1.0, 1.0], [1.0, -1.0]]) * (5 / math.sqrt(2)), rtol=1e-15, atol=0)
    assert torch.equal(out[2:], x[2:])


def test_arc_orders_norms_beyond_float64_range():
    # Prepare: n = 3, f = 1 -> k = 1. ||row 0|| = sqrt(3) M and ||row 1|| = sqrt(2) M are both beyond
    # float64's range; C = sqrt(2) M, so row 0 becomes sqrt(2/3) M in every entry and row 1 stays.
    x = t([[F64_MAX, F64_MAX, F64_MAX], [F64_MAX, F64_MAX, 0.0], [1.0, 2.0, 3.0]])

    # Execute
    out, threshold, clipped = arc_with_report(x, f=1)

    # Assert: the threshold is reported as inf (no float holds it); the largest row is clipped.
    assert threshold == math.inf
    assert clipped.tolist() == [True, False, False]
    torch.testing.assert_close(
        out[0], torch.full((3,), math.sqrt(2 / 3) * F64_MAX, dtype=torch.float64), rtol=1e-15, atol=0
    )
    assert torch.equal(out[1:], x[1:])


def test_arc_mixed_float32_and_float64_maxima():
    # Prepare: float64 rows holding float64's and float32's largest values among ordinary rows.
    # n = 7, f = 2 -> k = floor(20 / 7) = 2: C is the norm of the float32-max row.
    x = torch.cat([t([[F64_MAX, 0.0, -F64_MAX], [F64_MAX, 1.0, 1.0], [F32_MAX, F32_MAX, 0.0]]), randn(4, 3)])

    # Execute
    out, threshold, clipped = arc_with_report(x, f=2)

    # Assert
    assert threshold == pytest.approx(math.sqrt(2) * F32_MAX, rel=1e-15)
    assert clipped.tolist() == [True, True, False, False, False, False, False]
    norms = torch.linalg.vector_norm(out[:2], dim=1)
    torch.testing.assert_close(norms, torch.full((2,), threshold, dtype=torch.float64), rtol=1e-15, atol=0)
    assert torch.equal(out[2:], x[2:])


def test_arc_at_float32_max_in_float32():
    x = torch.cat(
        [
            torch.tensor([[F32_MAX, F32_MAX], [-F32_MAX, F32_MAX]]),
            t([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]], torch.float32),
        ]
    )
    out, threshold, clipped = arc_with_report(x, f=2)
    assert threshold == 5.0
    torch.testing.assert_close(out[:2], torch.tensor([[1.0, 1.0], [-1.0, 1.0]]) * (5 / math.sqrt(2)))
    assert torch.equal(out[2:], x[2:])


# --------------------------------------------------------------------------------------------------
# Static clipping


def test_static_clip_example():
    # Prepare: ||[3, 4]|| = 5 > 1 -> [3, 4] / 5; ||[0.3, 0.4]|| = 0.5 <= 1 -> unchanged.
    x = t([[3.0, 4.0], [0.3, 0.4]])

    # Execute
    out = static_clip(x, c=1.0)

    # Assert
    torch.testing.assert_close(out[0], t([[0.6, 0.8]])[0])
    assert torch.equal(out[1], x[1])


def test_static_clip_row_at_threshold_is_unchanged():
    x = t([[2.0, 0.0], [0.0, 3.0]])
    out = static_clip(x, c=2)  # an int threshold is fine
    assert torch.equal(out[0], x[0])
    assert out[1].tolist() == [0.0, 2.0]


def test_static_clip_overflowing_norm():
    x = t([[1e30, 0.0, 1e30], [0.1, 0.0, 0.0]], torch.float32)
    out = static_clip(x, c=2.0)
    torch.testing.assert_close(out[0], torch.tensor([math.sqrt(2), 0.0, math.sqrt(2)]))
    assert torch.equal(out[1], x[1])


@pytest.mark.parametrize(
    ("big", "dtype"), [(F64_MAX, torch.float64), (F32_MAX, torch.float64), (F32_MAX, torch.float32)]
)
def test_static_clip_at_the_largest_values(big, dtype):
    # Prepare: several huge rows, one with a norm beyond its dtype's range, and an ordinary row.
    x = t([[big, 0.0, big], [0.0, -big, 0.0], [0.1, 0.0, 0.0]], dtype)

    # Execute
    out = static_clip(x, c=2.0)

    # Assert
    expected = t([[math.sqrt(2), 0.0, math.sqrt(2)], [0.0, -2.0, 0.0]], dtype)
    torch.testing.assert_close(out[:2], expected)
    assert torch.equal(out[2], x[2])


# --------------------------------------------------------------------------------------------------
# NNM


def test_nnm_example():
    # Prepare: f = 1 -> each row averages its 2 nearest rows (itself included):
    # 0 -> {0, 1}: 0.5;  1 -> {1, 0} (1 < 9): 0.5;  10 -> {10, 1} (9 < 10): 5.5.
    x = t([[0.0], [1.0], [10.0]])

    # Execute
    out = nnm(x, f=1)

    # Assert
    assert out.flatten().tolist() == [0.5, 0.5, 5.5]


def test_nnm_ties_go_to_the_lower_index():
    # Prepare: row [1] is equally far from [0] and [2]; the lower index, [0], is taken.
    # 0 -> {0, 1}: 0.5;  1 -> {1, 0}: 0.5;  2 -> {2, 1}: 1.5.
    x = t([[0.0], [1.0], [2.0]])

    # Execute
    out = nnm(x, f=1)

    # Assert
    assert out.flatten().tolist() == [0.5, 0.5, 1.5]


def test_nnm_with_f_zero_is_the_mean_everywhere():
    x = randn(5, 3)
    out = nnm(x, f=0)
    torch.testing.assert_close(out, x.mean(dim=0).expand(5, 3))


def test_nnm_two_dimensional_hand_case():
    # Prepare: n = 4, f = 1 -> 3 nearest. Squared distances: a=(0,0), b=(1,0), c=(0,2), e=(5,5):
    # a: b 1, c 4, e 50 -> {a, b, c};  b: a 1, c 5, e 41 -> {b, a, c};  c: a 4, b 5, e 34 -> {c, a, b};
    # e: c 34, b 41, a 50 -> {e, c, b}.
    x = t([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])

    # Execute
    out = nnm(x, f=1)

    # Assert
    abc = t([[1 / 3, 2 / 3]])[0]
    torch.testing.assert_close(out[:3], abc.expand(3, 2))
    torch.testing.assert_close(out[3], t([[6 / 3, 7 / 3]])[0])


def test_nnm_honest_rows_exact_with_huge_byzantine_rows():
    # Prepare: float32 rows of 1e30 overflow squared distances; the honest rows' 5 nearest are still
    # the 5 honest rows, so each becomes their mean.
    honest = randn(5, 3, dtype=torch.float32)
    x = torch.cat([torch.full((2, 3), 1e30), honest])

    # Execute
    out = nnm(x, f=2)

    # Assert
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2:], honest.mean(dim=0).expand(5, 3))


# --------------------------------------------------------------------------------------------------
# Bucketing


def test_bucketing_averages_buckets_of_a_permutation():
    # Prepare: n = 5, s = 2 -> ceil(5/2) = 3 buckets of sizes 2, 2, 1.
    x = t([[1.0], [2.0], [4.0], [8.0], [16.0]])

    # Execute
    out = bucketing(x, s=2, generator=torch.Generator().manual_seed(0))

    # Assert: with powers of two, each bucket's mean identifies its members; together they are a
    # partition of the rows, and the weighted sum of the bucket means is the sum of the rows.
    assert out.shape == (3, 1)
    assert 2 * out[0, 0] + 2 * out[1, 0] + out[2, 0] == 31.0
    pair_means = {(a + b) / 2 for i, a in enumerate([1, 2, 4, 8, 16]) for b in [1, 2, 4, 8, 16][i + 1 :]}
    assert {float(out[0, 0]), float(out[1, 0])} <= pair_means
    assert float(out[2, 0]) in {1.0, 2.0, 4.0, 8.0, 16.0}


def test_bucketing_is_deterministic_for_a_seed_and_varies_with_it():
    # Prepare
    x = randn(12, 3)

    # Execute
    outs = [bucketing(x, s=3, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]

    # Assert
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_bucketing_with_s_one_permutes_rows():
    x = randn(6, 2)
    out = bucketing(x, s=1, generator=torch.Generator().manual_seed(5))
    assert sorted(out[:, 0].tolist()) == sorted(x[:, 0].tolist())


def test_bucketing_with_s_at_least_n_is_the_mean():
    x = randn(4, 3)
    torch.testing.assert_close(bucketing(x, s=10), x.mean(dim=0, keepdim=True))


def test_bucketing_without_generator():
    assert bucketing(randn(7, 2), s=3).shape == (3, 2)


# --------------------------------------------------------------------------------------------------
# Mean, CWTM, CWMed


def test_mean_example():
    assert mean(t([[1.0, 2.0], [3.0, 6.0]])).tolist() == [2.0, 4.0]


def test_cwtm_example():
    # Prepare: column 0 sorted 1, 2, 3, 100 -> drop 1 and 100 -> 2.5; column 1: 0, 4, 5, 9 -> 4.5.
    x = t([[1.0, 9.0], [2.0, 0.0], [3.0, 5.0], [100.0, 4.0]])

    # Execute / Assert
    assert cwtm(x, f=1).tolist() == [2.5, 4.5]


def test_cwtm_f_zero_is_the_mean():
    x = randn(5, 3)
    torch.testing.assert_close(cwtm(x, f=0), x.mean(dim=0))


def test_cwtm_at_breakdown_is_the_median():
    # n = 2f + 1: only the middle value of each coordinate survives.
    x = t([[1.0, -7.0], [5.0, 0.0], [2.0, 3.0], [9.0, 1.0], [-3.0, 2.0]])
    assert cwtm(x, f=2).tolist() == [2.0, 1.0]


def test_cwtm_keeps_honest_values_next_to_huge_ones_in_float32():
    # A "sum minus extremes" shortcut would cancel the 0.1s against the 1e9s in float32.
    x = torch.tensor([[1e9], [0.1], [0.1], [0.1], [-1e9]])
    assert cwtm(x, f=1).item() == pytest.approx(0.1, rel=1e-6)


def test_cwmed_even_n_averages_the_two_middle_values():
    # column 0: 1, 2, 3, 100 -> (2 + 3) / 2; column 1: 0, 4, 5, 9 -> (4 + 5) / 2.
    x = t([[1.0, 9.0], [2.0, 0.0], [3.0, 5.0], [100.0, 4.0]])
    assert cwmed(x).tolist() == [2.5, 4.5]


def test_cwmed_two_rows():
    # torch.median alone would return the lower value, 0.
    assert cwmed(t([[0.0], [1.0]])).tolist() == [0.5]


def test_cwmed_odd_n():
    assert cwmed(t([[1.0, 5.0], [100.0, -1.0], [2.0, 0.0]])).tolist() == [2.0, 0.0]


def test_cwmed_single_row():
    x = t([[1.5, -2.0]])
    assert torch.equal(cwmed(x), x[0])


# --------------------------------------------------------------------------------------------------
# Geometric median


def test_geometric_median_symmetric_example():
    # Prepare: on the diagonal (s, s) the pulls of (0, 0) and (100, 100) cancel, and those of (1, 0)
    # and (0, 1) cancel at s = 1/2: the geometric median is (1/2, 1/2).
    x = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])

    # Execute
    out = geometric_median(x, tol=1e-10)

    # Assert
    torch.testing.assert_close(out, t([[0.5, 0.5]])[0], atol=1e-8, rtol=0)


def test_geometric_median_collinear_is_the_median():
    assert geometric_median(t([[0.0], [1.0], [10.0]])).item() == pytest.approx(1.0, abs=1e-6)


def test_geometric_median_at_a_vertex_with_a_wide_angle():
    # Prepare: the angle at (0, 0) between (1, 0) and (-1, 0.1) is about 174 degrees >= 120, so the
    # Fermat point (the geometric median of three points) is (0, 0).
    x = t([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.1]])

    # Execute
    out = geometric_median(x, tol=1e-12, max_iter=10_000)

    # Assert
    torch.testing.assert_close(out, torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_geometric_median_equilateral_triangle_is_its_centre():
    h = math.sqrt(3) / 2
    out = geometric_median(t([[0.0, 0.0], [1.0, 0.0], [0.5, h]]))
    torch.testing.assert_close(out, t([[0.5, h / 3]])[0])


def test_geometric_median_max_iter_one_is_one_weiszfeld_step():
    # Prepare: z0 = mean = 11/3; distances 11/3, 8/3, 19/3; weights are their inverses.
    x = t([[0.0], [1.0], [10.0]])
    z0 = 11 / 3
    w = [1 / z0, 1 / (z0 - 1), 1 / (10 - z0)]
    expected = (w[1] * 1 + w[2] * 10) / sum(w)

    # Execute
    out = geometric_median(x, max_iter=1)

    # Assert
    assert out.item() == pytest.approx(expected, rel=1e-12)


def test_geometric_median_huge_rows_float32_matches_float64():
    # Prepare: 1e30 overflows float32 squared distances; the float32 result must match float64.
    # The angle at (3, 4) between (1, 2) and the far point is 180 degrees, so the median is (3, 4).
    x = t([[1e30, 1e30], [1.0, 2.0], [3.0, 4.0]])

    # Execute
    out32 = geometric_median(x.float())
    out64 = geometric_median(x)

    # Assert
    torch.testing.assert_close(out32, torch.tensor([3.0, 4.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out64, t([[3.0, 4.0]])[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("big", [F64_MAX, 2.0**1023, F32_MAX])
def test_geometric_median_float64_huge_rows(big):
    # Prepare: as above, one far row among (1, 2) and (3, 4): the median is (3, 4).
    x = t([[big, big], [1.0, 2.0], [3.0, 4.0]])

    # Execute
    out = geometric_median(x)

    # Assert
    torch.testing.assert_close(out, t([[3.0, 4.0]])[0], atol=1e-4, rtol=0)


def test_geometric_median_several_rows_at_float64_max_is_finite():
    x = t([[F64_MAX, F64_MAX], [F64_MAX, -F64_MAX], [-F64_MAX, F64_MAX]])
    out = geometric_median(x)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= F64_MAX


def test_geometric_median_near_float32_max_is_finite():
    big = 3.0e38
    x = torch.tensor([[big, big], [big, -big], [-big, big]])
    out = geometric_median(x)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= big


# --------------------------------------------------------------------------------------------------
# Krum and Multi-Krum


def test_krum_example_and_tie_breaking_by_index():
    # Prepare: n = 5, f = 1 -> n - f - 2 = 2 neighbours. Scores (sums of squared distances):
    # 0: 1 + 4 = 5;  1: 1 + 1 = 2;  2: 1 + 1 = 2;  3: 1 + 4 = 5;  50: 47^2 + 48^2 = 4513.
    # Rows [1] and [2] tie at 2: the lower index wins.
    x = t([[0.0], [1.0], [2.0], [3.0], [50.0]])
    swapped = x[[0, 2, 1, 3, 4]]

    # Execute / Assert
    assert krum(x, f=1).tolist() == [1.0]
    assert krum(swapped, f=1).tolist() == [2.0]


def test_multi_krum_default_m_is_n_minus_f():
    # Same scores as above: the n - f = 4 lowest are rows 1, 2 (2), 0, 3 (5) -> mean 1.5.
    x = t([[0.0], [1.0], [2.0], [3.0], [50.0]])
    assert multi_krum(x, f=1).tolist() == [1.5]


@pytest.mark.parametrize(("m", "expected"), [(1, 1.0), (2, 1.5), (3, 1.0), (4, 1.5), (5, 56 / 5)])
def test_multi_krum_m(m, expected):
    # Score order (stable): rows 1, 2, 0, 3, 4 -> values 1, 2, 0, 3, 50.
    x = t([[0.0], [1.0], [2.0], [3.0], [50.0]])
    assert multi_krum(x, f=1, m=m).item() == pytest.approx(expected)


def test_multi_krum_m_one_is_krum():
    x = randn(9, 4)
    assert torch.equal(multi_krum(x, f=2, m=1), krum(x, f=2))


def test_krum_returns_a_copy():
    x = randn(5, 2)
    out = krum(x, f=0)
    out += 1.0
    assert torch.equal(x, randn(5, 2))


def test_krum_ignores_huge_rows():
    # The 1e30 rows overflow float32 distances; an honest row must still win.
    honest = randn(7, 3, dtype=torch.float32)
    x = torch.cat([torch.full((2, 3), 1e30), honest])
    out = krum(x, f=2)
    assert any(torch.equal(out, row) for row in honest)


# --------------------------------------------------------------------------------------------------
# Centered clipping


def test_centered_clip_example():
    # Prepare: from v0 = 0, ||[30, 40]|| = 50 > tau = 5 -> [3, 4]; the others are within tau.
    # v1 = ([1, 0] + [0, 1] + [3, 4]) / 3 = [4/3, 5/3].
    x = t([[1.0, 0.0], [0.0, 1.0], [30.0, 40.0]])

    # Execute / Assert
    torch.testing.assert_close(centered_clip(x, tau=5.0), t([[4 / 3, 5 / 3]])[0])


def test_centered_clip_two_iterations():
    # Prepare: second step from v1 = (4/3, 5/3): differences (-1/3, -5/3), (-4/3, -2/3) are within
    # tau = 5; (86/3, 115/3) has norm sqrt(20621)/3 > 5 and is scaled to 5 / that norm.
    x = t([[1.0, 0.0], [0.0, 1.0], [30.0, 40.0]])
    norm = math.sqrt(86**2 + 115**2) / 3
    step = [(-1 / 3 - 4 / 3 + 5 * (86 / 3) / norm) / 3, (-5 / 3 - 2 / 3 + 5 * (115 / 3) / norm) / 3]
    expected = t([[4 / 3 + step[0], 5 / 3 + step[1]]])[0]

    # Execute / Assert
    torch.testing.assert_close(centered_clip(x, tau=5.0, iters=2), expected)


def test_centered_clip_with_center_and_large_tau_is_the_mean():
    x = t([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    out = centered_clip(x, tau=100.0, center=torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out, t([[4 / 3, 4 / 3]])[0])


def test_centered_clip_center_of_another_dtype_is_converted():
    x = t([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    out = centered_clip(x, tau=100.0, center=torch.tensor([1.0, 1.0], dtype=torch.float32))
    assert out.dtype == torch.float64


def test_centered_clip_does_not_modify_center():
    x = randn(5, 3)
    center = torch.ones(3, dtype=torch.float64)
    centered_clip(x, tau=0.5, iters=3, center=center)
    assert torch.equal(center, torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Bulyan


def test_bulyan_example():
    # Prepare: n = 7, f = 1: theta = 5 selections, beta = 3. Neighbour counts: remaining - f - 2 but at
    # least 2 -> 4, 3, 2, 2, 2 (sums of squared distances; ties to the lower index).
    #  r=7 (4 nb): 0:30 1:15 2:10 3:10 4:15 5:30 100:huge      -> [2]
    #  r=6 (3 nb): 0:1+9+16=26 1:1+4+9=14 3:1+4+4=9 4:1+1+9=11 5:1+4+16=21 -> [3]
    #  r=5 (2 nb): 0:1+16=17 1:1+9=10 4:1+9=10 5:1+16=17       -> [1]
    #  r=4 (2 nb): 0:16+25=41 4:1+16=17 5:1+25=26              -> [4]
    #  r=3 (2 nb): 0:25+100^2 5:25+95^2 100:...                 -> [5]
    # S = {2, 3, 1, 4, 5}: median 3; the 3 values closest to it: 3, 2, 4 -> mean 3.
    x = t([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0]])

    # Execute / Assert
    assert bulyan(x, f=1).tolist() == [3.0]


def test_bulyan_f_zero_is_the_mean():
    # theta = n, beta = n: every row is selected and kept.
    x = randn(5, 3)
    torch.testing.assert_close(bulyan(x, f=0), x.mean(dim=0))


def test_bulyan_two_dimensional_outlier():
    # Prepare: 6 honest rows near the origin and 1 far away, f = 1. The far row is never selected
    # (its score is the largest at every step), so S is 5 of the honest rows and each coordinate
    # keeps the 3 values closest to S's median: the result lies within the honest range.
    x = t([[0.1, -0.2], [0.0, 0.3], [-0.2, 0.1], [0.2, 0.0], [-0.1, -0.1], [0.05, 0.2], [1e6, -1e6]])

    # Execute
    out = bulyan(x, f=1)

    # Assert
    assert (out >= x[:6].min(dim=0).values).all() and (out <= x[:6].max(dim=0).values).all()


# --------------------------------------------------------------------------------------------------
# Shared behaviour of every rule


def valid_f(name: str, n: int) -> int:
    """The largest f the rule accepts for n rows (0 for rules without f)."""
    if name not in RULES_WITH_F:
        return 0
    ok = RULES[name][1]
    return max(f for f in range(n) if ok(n, f))


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_and_dtype(name, dtype):
    # Prepare
    x = randn(11, 5, dtype=dtype)
    call, _ = RULES[name]

    # Execute
    out = call(x, valid_f(name, 11))

    # Assert
    expected = (6, 5) if name == "bucketing" else (11, 5) if name in PRE_AGGREGATORS else (5,)
    assert out.shape == expected
    assert out.dtype == dtype


@pytest.mark.parametrize("name", RULES)
def test_input_is_not_modified(name):
    # Prepare
    x = randn(11, 4)
    before = x.clone()
    call, _ = RULES[name]

    # Execute
    call(x, valid_f(name, 11))

    # Assert
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", RULES)
def test_output_does_not_alias_input(name):
    # Writing into a rule's output must never change the caller's tensor.
    x = randn(11, 4)
    before = x.clone()
    out = RULES[name][0](x, 0 if RULES[name][1](11, 0) else valid_f(name, 11))
    out.add_(1.0)
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", RULES)
def test_single_row_with_f_zero(name):
    # Prepare
    x = t([[1.5, -2.0, 0.25]])
    call, ok = RULES[name]
    if not ok(1, 0):
        pytest.skip(f"{name} needs more than one row for f = 0")

    # Execute
    out = call(x, 0)

    # Assert: one vector is its own aggregate. Centered clipping (tau = 1, 3 steps) gets there too:
    # ||x|| = 2.51, so it moves 1, then 1, then the remaining 0.51 along x.
    if name == "static_clip":
        torch.testing.assert_close(out, x * min(1.0, 1.5 / float(x[0].norm())))
    elif name in PRE_AGGREGATORS:
        torch.testing.assert_close(out, x)
    else:
        torch.testing.assert_close(out, x[0])


@pytest.mark.parametrize("name", ["krum", "multi_krum", "bulyan"])
def test_single_row_rejected_where_n_is_too_small(name):
    with pytest.raises(ValueError, match="n = 1, f = 0"):
        RULES[name][0](t([[1.0]]), 0)


@pytest.mark.parametrize("name", RULES)
def test_identical_rows(name):
    # Prepare: every rule maps n copies of v to v (pre-aggregators: to copies of v, except static
    # clipping, which clips them). Centered clipping (tau = 1, 3 steps) moves from 0 along v by 1,
    # 1, then the remaining ||v|| - 2 = 0.29.
    v = t([[0.5, -1.0, 2.0]])[0]
    x = v.expand(9, 3).clone()
    call, _ = RULES[name]

    # Execute
    out = call(x, valid_f(name, 9))

    # Assert
    if name == "static_clip":
        torch.testing.assert_close(out, (v * 1.5 / v.norm()).expand(9, 3))
    elif name in PRE_AGGREGATORS:
        torch.testing.assert_close(out, x[: out.shape[0]])
    else:
        torch.testing.assert_close(out, v)


@pytest.mark.parametrize("name", RULES)
def test_zero_rows(name):
    x = torch.zeros(9, 3)
    out = RULES[name][0](x, valid_f(name, 9))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", RULES)
def test_float32_agrees_with_float64(name):
    # Prepare: continuous data, so no selection sits on a tie.
    x = randn(13, 6, seed=7)
    call, _ = RULES[name]
    f = valid_f(name, 13)

    # Execute
    out64 = call(x, f)
    out32 = call(x.float(), f)

    # Assert
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", RULES)
def test_huge_finite_byzantine_rows_float32(name):
    # Prepare: f rows of 1e30 (squared norms overflow float32) among honest standard normals.
    honest = randn(9, 4, seed=3, dtype=torch.float32)
    f = 2
    x = torch.cat([torch.full((f, 4), 1e30), honest])
    call, ok = RULES[name]
    if not ok(11, f):
        pytest.skip(f"{name} does not accept n = 11, f = 2")

    # Execute
    out = call(x, f)

    # Assert: the output is finite; the robust aggregators stay within the honest range.
    assert torch.isfinite(out).all()
    if name in ("cwtm", "cwmed", "geometric_median", "krum", "multi_krum", "bulyan"):
        lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
        assert ((out >= lo - 1e-5) & (out <= hi + 1e-5)).all()


# --------------------------------------------------------------------------------------------------
# One test per `raise`: input checks shared by every rule (_checks.check_matrix / check_finite).


@pytest.mark.parametrize("name", RULES)
def test_rejects_non_tensor(name):
    with pytest.raises(ValueError, match=r"expected a torch\.Tensor, got list"):
        RULES[name][0]([[1.0, 2.0]], 0)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("shape", [(3,), ()])  # (..., n, d) with leading batch dims is valid (test_robust_batched)
def test_rejects_wrong_dims(name, shape):
    with pytest.raises(ValueError, match=re.escape(f"got shape {shape}")):
        RULES[name][0](torch.zeros(shape), 0)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_rejects_non_floating_dtype(name, dtype):
    with pytest.raises(ValueError, match=re.escape(f"got {dtype}")):
        RULES[name][0](torch.zeros(3, 2, dtype=dtype), 0)


@pytest.mark.parametrize("name", RULES)
def test_rejects_zero_rows(name):
    with pytest.raises(ValueError, match="n = 0"):
        RULES[name][0](torch.zeros(0, 3), 0)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_values(name, bad):
    # Prepare: the bad value sits in row 4; every other value is ordinary.
    x = randn(9, 3)
    x[4, 1] = bad

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape("non-finite values (NaN or Inf) in rows [4]")):
        RULES[name][0](x, 1 if RULES[name][1](9, 1) else 0)


def test_non_finite_message_lists_the_rows():
    x = randn(20, 2)
    x[[3, 11, 12], 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape("rows [3, 11, 12]")):
        mean(x)


def test_finite_values_whose_sum_overflows_are_accepted():
    # The finiteness check first sums x; 3e38 + 3e38 overflows in float32 although every value is finite.
    x = torch.tensor([[3e38], [3e38], [1.0]])
    assert torch.equal(arc(x, f=0), x)


def test_nan_in_rows_that_sum_to_inf_is_still_found():
    x = torch.tensor([[3e38], [3e38], [float("nan")]])
    with pytest.raises(ValueError, match=re.escape("rows [2]")):
        cwmed(x)


# _checks.check_f


@pytest.mark.parametrize("name", RULES_WITH_F)
@pytest.mark.parametrize("bad", [-1, True, False, 1.0, 0.5, "1", None])
def test_rejects_bad_f(name, bad):
    with pytest.raises(ValueError, match=re.escape(f"f must be a non-negative integer, got f = {bad!r}")):
        RULES[name][0](randn(11, 2), bad)


# _checks.check_minority


@pytest.mark.parametrize("name", ["arc", "nnm", "cwtm"])
@pytest.mark.parametrize(("n", "f"), [(4, 2), (3, 2), (1, 1), (10, 7)])
def test_rejects_f_without_honest_majority(name, n, f):
    with pytest.raises(ValueError, match=re.escape(f"needs 2f < n, got n = {n}, f = {f}")):
        RULES[name][0](randn(n, 2), f)


def test_arc_num_clipped_rejects_bad_n_and_f():
    with pytest.raises(ValueError, match=re.escape("got n = 0, f = 0")):
        arc_num_clipped(0, 0)
    with pytest.raises(ValueError, match=re.escape("got f = -1")):
        arc_num_clipped(5, -1)


# krum.check_krum_n


@pytest.mark.parametrize("name", ["krum", "multi_krum"])
@pytest.mark.parametrize(("n", "f"), [(4, 1), (3, 1), (2, 0), (6, 2)])
def test_krum_rejects_n_at_most_2f_plus_2(name, n, f):
    with pytest.raises(ValueError, match=re.escape(f"{name}: needs n > 2f + 2, got n = {n}, f = {f}")):
        RULES[name][0](randn(n, 2), f)


@pytest.mark.parametrize(("n", "f"), [(5, 1), (3, 0), (7, 1)])
def test_krum_accepts_n_above_2f_plus_2(n, f):
    assert krum(randn(n, 2), f=f).shape == (2,)


# krum.check_m


@pytest.mark.parametrize("bad", [0, -1, 8, 1.5, True, "2"])
def test_multi_krum_rejects_bad_m(bad):
    with pytest.raises(ValueError, match=re.escape(f"m must be an integer in [1, n], got m = {bad!r}, n = 7")):
        multi_krum(randn(7, 2), f=1, m=bad)


# Bulyan's n >= 4f + 3


@pytest.mark.parametrize(("n", "f"), [(6, 1), (10, 2), (2, 0)])
def test_bulyan_rejects_n_below_4f_plus_3(n, f):
    with pytest.raises(ValueError, match=re.escape(f"bulyan: needs n >= 4f + 3, got n = {n}, f = {f}")):
        bulyan(randn(n, 2), f=f)


def test_bulyan_accepts_n_equal_4f_plus_3():
    assert bulyan(randn(11, 2), f=2).shape == (2,)


# _checks.check_positive: c, tau, tol, nu


POSITIVE_PARAMETERS: dict[str, Callable[[float], Tensor]] = {
    "c": lambda v: static_clip(randn(3, 2), c=v),
    "tau": lambda v: centered_clip(randn(3, 2), tau=v),
    "tol": lambda v: geometric_median(randn(3, 2), tol=v),
    "nu": lambda v: geometric_median(randn(3, 2), nu=v),
}


@pytest.mark.parametrize("param", POSITIVE_PARAMETERS)
@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), True, "1", None])
def test_rejects_non_positive_hyperparameter(param, bad):
    with pytest.raises(ValueError, match=re.escape(f"{param} must be a positive number, got {param} = {bad!r}")):
        POSITIVE_PARAMETERS[param](bad)


@pytest.mark.parametrize("param", POSITIVE_PARAMETERS)
def test_rejects_infinite_hyperparameter(param):
    with pytest.raises(ValueError, match=re.escape(f"{param} must be finite, got {param} = inf")):
        POSITIVE_PARAMETERS[param](float("inf"))


@pytest.mark.parametrize("param", POSITIVE_PARAMETERS)
def test_hyperparameter_checked_before_the_input(param):
    # A bad hyperparameter is reported even when x is also bad.
    call = {
        "c": lambda: static_clip(torch.zeros(3), c=-1.0),
        "tau": lambda: centered_clip(torch.zeros(3), tau=-1.0),
        "tol": lambda: geometric_median(torch.zeros(3), tol=-1.0),
        "nu": lambda: geometric_median(torch.zeros(3), nu=-1.0),
    }[param]
    with pytest.raises(ValueError, match=f"{param} must be a positive number"):
        call()


# bucketing's s, geometric_median's max_iter, centered_clip's iters


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_bucketing_rejects_bad_s(bad):
    with pytest.raises(ValueError, match=re.escape(f"bucketing: s must be a positive integer, got s = {bad!r}")):
        bucketing(randn(4, 2), s=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_geometric_median_rejects_bad_max_iter(bad):
    with pytest.raises(ValueError, match=re.escape(f"max_iter must be a positive integer, got max_iter = {bad!r}")):
        geometric_median(randn(4, 2), max_iter=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_centered_clip_rejects_bad_iters(bad):
    with pytest.raises(ValueError, match=re.escape(f"iters must be a positive integer, got iters = {bad!r}")):
        centered_clip(randn(4, 2), tau=1.0, iters=bad)


# centered_clip's center


@pytest.mark.parametrize("shape", [(3,), (2, 2), (1,), ()])
def test_centered_clip_rejects_center_of_wrong_shape(shape):
    with pytest.raises(ValueError, match=re.escape(f"center must have shape (2,), got {shape}")):
        centered_clip(randn(4, 2), tau=1.0, center=torch.zeros(shape, dtype=torch.float64))


def test_centered_clip_rejects_center_that_is_not_a_tensor():
    with pytest.raises(ValueError, match="center must be a tensor or None, got list"):
        centered_clip(randn(4, 2), tau=1.0, center=[0.0, 0.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_centered_clip_rejects_non_finite_center(bad):
    with pytest.raises(ValueError, match="center has non-finite values"):
        centered_clip(randn(4, 2), tau=1.0, center=torch.tensor([0.0, bad], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# CUDA: every rule on a cuda tensor returns a cuda tensor equal to the CPU result.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(name, dtype):
    # Prepare
    x = randn(23, 37, seed=11, dtype=dtype)
    call, _ = RULES[name]
    f = valid_f(name, 23)

    # Execute
    cpu = call(x, f)
    gpu = call(x.cuda(), f)

    # Assert
    assert gpu.is_cuda
    assert gpu.dtype == dtype
    # (bucketing draws its permutation from a CPU generator, so the buckets are the same)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "spec",
    [
        "arc > nnm > cwtm",
        "arc > nnm > geometric_median",
        "arc > nnm > multi_krum",
        "arc > nnm > cwmed",
        "static_clip > bulyan",
    ],
)
def test_cuda_pipeline_matches_cpu(spec):
    # Prepare: f rows of 1e6 among honest rows.
    x = randn(15, 33, seed=5, dtype=torch.float32)
    x[:3] = 1e6
    pipeline = build_pipeline(spec, f=3, **({"c": 2.0} if "static_clip" in spec else {}))

    # Execute
    cpu, cpu_report = pipeline(x)
    gpu, gpu_report = pipeline(x.cuda())

    # Assert
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(gpu_report.clipped.cpu(), cpu_report.clipped)


@pytest.mark.cuda
@needs_cuda
def test_cuda_huge_rows():
    x = torch.cat([torch.full((2, 4), 1e30), randn(7, 4, dtype=torch.float32)]).cuda()
    for name in ("arc", "static_clip", "geometric_median", "nnm", "krum", "cwtm"):
        out = RULES[name][0](x, 2)
        assert out.is_cuda and torch.isfinite(out).all(), name


# --- the sorting behind CWTM and CWMed --------------------------------------------------------------

from arcsim.robust._sorting import _NETWORK_MIN_COLUMNS, sorted_columns, sorting_network  # noqa: E402


@pytest.mark.parametrize("n", range(1, 17))
def test_the_sorting_network_sorts_every_zero_one_input(n: int) -> None:
    # The 0-1 principle: a comparator network sorts every input iff it sorts every 0/1 input.
    codes = torch.arange(2**n)
    bits = ((codes.unsqueeze(0) >> torch.arange(n).unsqueeze(1)) & 1).to(torch.int8)
    rows = list(bits.unbind(0))
    for i, j in sorting_network(n):
        assert i < j < n
        rows[i], rows[j] = torch.minimum(rows[i], rows[j]), torch.maximum(rows[i], rows[j])
    assert torch.equal(torch.stack(rows), torch.sort(bits, dim=0).values)


@pytest.mark.parametrize("n", [2, 3, 7, 13, 17, 31, 32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sorted_columns_matches_a_plain_sort_with_ties_infinities_and_nan(n: int, dtype: torch.dtype) -> None:
    g = generator(n)
    d = _NETWORK_MIN_COLUMNS + 37  # not a multiple of any block width
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x[:, :100] = torch.randint(0, 3, (n, 100), generator=g).to(dtype)  # ties
    x[0, 200], x[n - 1, 201], x[n // 2, 202] = math.inf, -math.inf, math.inf
    x[:, 300] = 1e30 * torch.randn(n, generator=g, dtype=dtype)
    before = x.clone()
    got = sorted_columns(x)
    assert torch.equal(got, torch.sort(x, dim=0).values) and torch.equal(x, before)
    with_nan = x.clone()
    with_nan[n - 1, 5] = math.nan  # goes to numpy, which sorts NaN last, like torch.sort
    assert torch.equal(sorted_columns(with_nan).isnan(), torch.sort(with_nan, dim=0).values.isnan())
    assert torch.equal(sorted_columns(with_nan).nan_to_num(), torch.sort(with_nan, dim=0).values.nan_to_num())
