"""Pipelines of robust rules, built from a spec such as ``"arc > nnm > cwtm"``.

A spec is zero or more pre-aggregators ((n, d) -> (m, d)) followed by exactly one aggregator
((m, d) -> (d,)), separated by ``>`` and applied left to right. The pipeline validates the input
once, checks each stage's n-dependent condition when called, and returns the aggregate together
with an :class:`AggregationReport` of what each stage did (clip threshold and clipped rows for
the clipping stages, selected rows for Krum-like stages, time per stage), which the coordinator
turns into metrics by role. A stage's masks and indices refer to the rows it received; after
bucketing those are bucket means, after NNM mixtures of several rows, and
:attr:`AggregationReport.clipped_inputs` maps the clipping back to the pipeline's input rows where
that is possible.

A pipeline also takes (..., n, d) input with leading batch dimensions (many runs, or many candidate
attacks, in lockstep): every stage runs once on the whole batch, vectorised, and the call returns
the (..., d) aggregates with a :class:`BatchedAggregationReport`, whose fields carry the batch
dimensions first. An element holding a NaN or an infinity is flagged in
:attr:`BatchedAggregationReport.invalid` and gets a NaN aggregate; the others are not affected.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from arcsim.registry import Registry, UnknownName

from ._batch import chunks, invalid_elements, nan_elements, take_rows, zero_elements
from ._checks import check_f, check_matrix, check_minority, check_positive, check_shape
from .arc import arc_batched_with_report, arc_with_report
from .bucketing import bucketing_batched_with_groups, bucketing_with_groups, element_generators
from .bulyan import bulyan_batched, bulyan_impl
from .centered_clip import centered_clip_batched, centered_clip_impl, check_center
from .cwmed import cwmed_batched, cwmed_impl
from .cwtm import cwtm_batched, cwtm_impl
from .geometric_median import DEFAULT_MAX_ITER, DEFAULT_NU, DEFAULT_TOL, geometric_median_batched, geometric_median_impl
from .krum import check_krum_n, check_m, multi_krum_selection, multi_krum_selection_batched
from .nnm import nnm_batched, nnm_impl
from .static_clip import static_clip_batched_with_report, static_clip_with_report


@dataclass(frozen=True)
class StageReport:
    """What one stage did. Row indices and masks refer to the rows the stage received."""

    name: str
    seconds: float
    clip_threshold: float | None = None
    clipped: Tensor | None = None  # (n,) bool: rows the clipping changed
    selected: Tensor | None = None  # int64 indices of the rows a Krum-like rule kept
    iterations: int | None = None  # iterations of an iterative rule
    groups: Tensor | None = None  # (n,) int64, bucketing: the output row each received row was averaged into
    mixes_rows: bool = False  # each output row blends several received rows (NNM): no group names its sources


@dataclass(frozen=True)
class AggregationReport:
    stages: tuple[StageReport, ...]

    def _first(self, attribute: str) -> Any:
        return _first_field(self.stages, attribute)

    @property
    def clip_threshold(self) -> float | None:
        """The threshold of the first clipping stage (ARC or static clipping), if any."""
        return self._first("clip_threshold")

    @property
    def clipped(self) -> Tensor | None:
        """The (n,) mask of input rows changed by the first clipping stage, if any."""
        return self._first("clipped")

    @property
    def clipped_inputs(self) -> Tensor | None:
        """For each row of the pipeline's input, whether the first clipping stage scaled it, if known.

        A row counts as clipped when the clipping stage changed the row it reached that stage as:
        itself, when no stage before changed the rows, or the mean of its bucket after bucketing
        (clipping a bucket mean scales each member's share of it by the same factor, so a clipped
        bucket counts all its members, and the mask may have more True entries than the stage's
        own mask). None when there is no clipping stage, or when a stage before it blended rows
        (NNM: each of its rows mixes several input rows, so a clipped one names no input row).
        """
        return _clipped_inputs(self.stages)

    @property
    def selected(self) -> Tensor | None:
        """Indices of the rows kept by the first Krum-like stage, if any."""
        return self._first("selected")


def _first_field(stages: tuple[StageReport, ...] | tuple[BatchedStageReport, ...], attribute: str) -> Any:
    for stage in stages:
        value = getattr(stage, attribute)
        if value is not None:
            return value
    return None


def _clipped_inputs(stages: tuple[StageReport, ...] | tuple[BatchedStageReport, ...]) -> Tensor | None:
    """:attr:`AggregationReport.clipped_inputs`, for 1-D masks or batched (..., n) ones alike."""
    origin: Tensor | None = None  # the row each input row reached the current stage as (None: itself)
    for stage in stages:
        if stage.clipped is not None:
            return stage.clipped if origin is None else stage.clipped.gather(-1, origin)
        if stage.mixes_rows:
            return None
        if stage.groups is not None:
            origin = stage.groups if origin is None else stage.groups.gather(-1, origin)
    return None


@dataclass(frozen=True)
class BatchedStageReport:
    """What one stage did on a batch: :class:`StageReport`'s fields with the batch dimensions first.

    ``seconds`` is the whole batched call's; ``iterations`` the largest count over the elements.
    """

    name: str
    seconds: float
    clip_threshold: Tensor | None = None  # (...,) float64
    clipped: Tensor | None = None  # (..., n) bool
    selected: Tensor | None = None  # (..., m) int64
    iterations: int | None = None
    groups: Tensor | None = None  # (..., n) int64
    mixes_rows: bool = False


@dataclass(frozen=True)
class BatchedAggregationReport:
    """The report of a batched pipeline call: each stage's batched report and the invalid elements.

    ``invalid`` ((...,) bool) marks the elements whose input held a NaN or an infinity: the stages ran
    on zeros in their place and their aggregate is NaN. :meth:`element` gives one element's report in
    the 2-D call's form.
    """

    stages: tuple[BatchedStageReport, ...]
    invalid: Tensor

    def _first(self, attribute: str) -> Any:
        return _first_field(self.stages, attribute)

    @property
    def clip_threshold(self) -> Tensor | None:
        """The (...,) thresholds of the first clipping stage, if any."""
        return self._first("clip_threshold")

    @property
    def clipped(self) -> Tensor | None:
        """The (..., n) masks of input rows changed by the first clipping stage, if any."""
        return self._first("clipped")

    @property
    def clipped_inputs(self) -> Tensor | None:
        """:attr:`AggregationReport.clipped_inputs` of every element, (..., n), or None."""
        return _clipped_inputs(self.stages)

    @property
    def selected(self) -> Tensor | None:
        """The (..., m) indices of the rows kept by the first Krum-like stage, if any."""
        return self._first("selected")

    def element(self, i: int) -> AggregationReport:
        """The report of flat element ``i`` (row-major over the batch dimensions), as a 2-D call's.

        Its seconds are the stage's batched seconds divided by the number of elements.
        """
        count = self.invalid.numel()
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
            raise IndexError(f"element index must be an integer in [0, {count}), got {i!r}")

        def row(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.reshape(count, -1)[i]

        return AggregationReport(
            stages=tuple(
                StageReport(
                    name=stage.name,
                    seconds=stage.seconds / count,
                    clip_threshold=None if stage.clip_threshold is None else float(stage.clip_threshold.reshape(-1)[i]),
                    clipped=row(stage.clipped),
                    selected=row(stage.selected),
                    iterations=stage.iterations,
                    groups=row(stage.groups),
                    mixes_rows=stage.mixes_rows,
                )
                for stage in self.stages
            )
        )


# A stage function takes (x, f, params, generator) and returns (output, report fields).
StageFn = Callable[[Tensor, int, Mapping[str, Any], torch.Generator | None], tuple[Tensor, dict[str, Any]]]
# Its batched form takes a (B, n, d) x and one generator (or None) per element, and returns the (B, ...)
# output and the report fields with a leading B (clip_threshold a (B,) float64 tensor, iterations an int).
BatchedStageFn = Callable[
    [Tensor, int, Mapping[str, Any], Sequence[torch.Generator | None]], tuple[Tensor, dict[str, Any]]
]


@dataclass(frozen=True)
class Rule:
    """A robust rule as a pipeline stage: what it is (``kind``), when it applies (``check_n``), what it takes.

    ``kind`` is ``"pre"`` (a pre-aggregator, (n, d) -> (m, d)) or ``"agg"`` (an aggregator, (n, d) -> (d,));
    ``check_n(n, f, params)`` raises ValueError when the rule cannot run on n rows against f; ``required``
    and ``optional`` (with defaults) name its parameters; ``run_batched``, when set, runs the stage on
    a (B, n, d) batch at once. Plugins make one with :func:`rule`.
    """

    name: str
    kind: str  # "pre" (n, d) -> (m, d) or "agg" (n, d) -> (d,)
    run: StageFn
    check_n: Callable[[int, int, Mapping[str, Any]], None]
    required: tuple[str, ...] = ()
    optional: Mapping[str, Any] = field(default_factory=dict)
    check_params: Callable[[Mapping[str, Any]], None] = lambda params: None
    mixes_rows: bool = False  # a pre-aggregator whose output rows each blend several input rows
    condition: str = ""  # the condition on n and f in words, for `arcsim list` (e.g. "n > 2f")
    # The stage on a (B, n, d) batch at once; None: the pipeline calls ``run`` once per element.
    run_batched: BatchedStageFn | None = None


_KINDS = {"pre-aggregator": "pre", "aggregator": "agg", "pre": "pre", "agg": "agg"}


def rule(
    *,
    kind: str,
    condition: Callable[[int, int], bool] | None = None,
    requires: str = "",
    mixes_rows: bool = False,
    batched: bool = False,
) -> Callable[[Callable[..., Tensor]], Rule]:
    """Make a function a pipeline rule: the public contract of a rule plugin (docs/plugins.md).

    The function is ``fn(x, *, f, **params) -> Tensor``: ``x`` is the (n, d) float tensor of the rows
    it receives (validated: 2-D, floating, finite at the pipeline's input), ``f`` the declared number of
    Byzantine vectors, and its other keyword-only parameters are the rule's parameters (those without
    a default are required; ``pipeline_params`` sets them). ``kind`` is ``"aggregator"`` (returns (d,))
    or ``"pre-aggregator"`` (returns (m, d)); ``condition(n, f)`` says whether the rule applies to n rows
    (None: always), and ``requires`` says it in words for the error message (e.g. ``"n > 2f"``).

    A pipeline called on (..., n, d) input calls the function once per batch element and stacks the
    results, unless it is declared ``batched=True``: it is then called once with the (B, n, d) tensor
    of all elements (the batch dimensions flattened into one) and returns (B, m, d) or (B, d).

    >>> @rule(kind="aggregator", condition=lambda n, f: n > 2 * f, requires="n > 2f")
    ... def middle(x, *, f):
    ...     return x.sort(dim=0).values[f : x.shape[0] - f].mean(dim=0)
    >>> middle.kind, middle.required, middle.condition
    ('agg', (), 'n > 2f')
    """
    if kind not in _KINDS:
        raise ValueError(f"rule kind must be 'pre-aggregator' or 'aggregator', got {kind!r}")
    if condition is not None and not callable(condition):
        raise ValueError(f"rule condition must be a callable (n, f) -> bool, got {condition!r}")

    def make(fn: Callable[..., Tensor]) -> Rule:
        if not callable(fn):
            raise ValueError(f"@rule decorates a function fn(x, *, f, **params), got {fn!r}")
        name = getattr(fn, "__name__", repr(fn))
        parameters = list(inspect.signature(fn).parameters.values())[1:]  # the first one is x
        takes_f = any(p.name == "f" for p in parameters)
        own = [p for p in parameters if p.name != "f" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = tuple(p.name for p in own if p.default is inspect.Parameter.empty)
        optional = {p.name: p.default for p in own if p.default is not inspect.Parameter.empty}

        def run(x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
            out = fn(x, f=f, **p) if takes_f else fn(x, **p)
            if not isinstance(out, Tensor):
                raise ValueError(f"{name}: a rule must return a tensor, got {type(out).__name__}")
            return out, {}

        def check_n(n: int, f: int, params: Mapping[str, Any]) -> None:
            if condition is not None and not condition(n, f):
                raise ValueError(f"{name}: needs {requires or 'its condition on n and f'}, got n = {n}, f = {f}")

        def run_batched(
            x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[torch.Generator | None]
        ) -> tuple[Tensor, dict[str, Any]]:
            out, fields = run(x, f, p, None)
            if out.dim() < 2 or out.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{name}: a batched rule must return one output per element ({x.shape[0]}), got shape "
                    f"{tuple(out.shape)}"
                )
            return out, fields

        return Rule(
            name,
            _KINDS[kind],
            run,
            check_n,
            required=required,
            optional=optional,
            mixes_rows=mixes_rows,
            condition=requires,
            run_batched=run_batched if batched else None,
        )

    return make


def _no_condition(n: int, f: int, params: Mapping[str, Any]) -> None:
    return None


def _minority(rule: str) -> Callable[[int, int, Mapping[str, Any]], None]:
    return lambda n, f, params: check_minority(n, f, rule=rule)


def _krum_condition(rule: str) -> Callable[[int, int, Mapping[str, Any]], None]:
    def check(n: int, f: int, params: Mapping[str, Any]) -> None:
        check_krum_n(n, f, rule=rule)
        check_m(params.get("m"), n, f, rule=rule)

    return check


def _bulyan_condition(n: int, f: int, params: Mapping[str, Any]) -> None:
    if not n >= 4 * f + 3:
        raise ValueError(f"bulyan: needs n >= 4f + 3, got n = {n}, f = {f}")


def _positive_int(rule: str, name: str) -> Callable[[Mapping[str, Any]], None]:
    def check(params: Mapping[str, Any]) -> None:
        value = params[name]
        if value is None and name == "m":
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{rule}: {name} must be a positive integer, got {name} = {value!r}")

    return check


def _positive(rule: str, *names: str) -> Callable[[Mapping[str, Any]], None]:
    def check(params: Mapping[str, Any]) -> None:
        for name in names:
            check_positive(params[name], name=name, rule=rule)

    return check


def _gm_params(params: Mapping[str, Any]) -> None:
    _positive("geometric_median", "tol", "nu")(params)
    _positive_int("geometric_median", "max_iter")(params)


def _cc_params(params: Mapping[str, Any]) -> None:
    _positive("centered_clip", "tau")(params)
    _positive_int("centered_clip", "iters")(params)
    check_center(params["center"], None)  # its length is checked against d when called


def _run_arc(x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    out, threshold, clipped = arc_with_report(x, f=f)
    return out, {"clip_threshold": threshold, "clipped": clipped}


def _run_static_clip(
    x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None
) -> tuple[Tensor, dict[str, Any]]:
    out, threshold, clipped = static_clip_with_report(x, c=p["c"])
    return out, {"clip_threshold": threshold, "clipped": clipped}


def _run_bucketing(x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    out, groups = bucketing_with_groups(x, s=p["s"], generator=g)
    return out, {"groups": groups}


def _run_multi_krum(
    x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None
) -> tuple[Tensor, dict[str, Any]]:
    m = check_m(p.get("m"), x.shape[0], f, rule="multi_krum")
    selected = multi_krum_selection(x, f=f, m=m)
    return x[selected].mean(dim=0), {"selected": selected}


def _run_krum(x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    selected = multi_krum_selection(x, f=f, m=1)
    return x[selected[0]].clone(), {"selected": selected}


def _run_centered_clip(
    x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None
) -> tuple[Tensor, dict[str, Any]]:
    check_center(p["center"], x.shape[1])
    return centered_clip_impl(x, tau=p["tau"], iters=p["iters"], center=p["center"]), {}


def _run_gm(x: Tensor, f: int, p: Mapping[str, Any], g: torch.Generator | None) -> tuple[Tensor, dict[str, Any]]:
    out, iterations = geometric_median_impl(x, tol=p["tol"], max_iter=p["max_iter"], nu=p["nu"])
    return out, {"iterations": iterations}


def _batched_arc(x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[Any]) -> tuple[Tensor, dict[str, Any]]:
    out, threshold, clipped = arc_batched_with_report(x, f=f)
    return out, {"clip_threshold": threshold, "clipped": clipped}


def _batched_static_clip(x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[Any]) -> tuple[Tensor, dict[str, Any]]:
    out, threshold, clipped = static_clip_batched_with_report(x, c=p["c"])
    return out, {"clip_threshold": threshold, "clipped": clipped}


def _batched_bucketing(x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[Any]) -> tuple[Tensor, dict[str, Any]]:
    out, groups = bucketing_batched_with_groups(x, s=p["s"], generators=g)
    return out, {"groups": groups}


def _batched_multi_krum(x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[Any]) -> tuple[Tensor, dict[str, Any]]:
    m = check_m(p.get("m"), x.shape[1], f, rule="multi_krum")
    selected = multi_krum_selection_batched(x, f=f, m=m)
    return take_rows(x, selected).mean(dim=-2), {"selected": selected}


def _batched_krum(x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[Any]) -> tuple[Tensor, dict[str, Any]]:
    selected = multi_krum_selection_batched(x, f=f, m=1)
    return take_rows(x, selected)[:, 0].clone(), {"selected": selected}


def _batched_centered_clip(x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[Any]) -> tuple[Tensor, dict[str, Any]]:
    check_center(p["center"], x.shape[2])
    return centered_clip_batched(x, tau=p["tau"], iters=p["iters"], center=p["center"]), {}


def _batched_gm(x: Tensor, f: int, p: Mapping[str, Any], g: Sequence[Any]) -> tuple[Tensor, dict[str, Any]]:
    out, iterations = geometric_median_batched(x, tol=p["tol"], max_iter=p["max_iter"], nu=p["nu"])
    return out, {"iterations": int(iterations.max()) if iterations.numel() else 0}


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("arc", "pre", _run_arc, _minority("arc"), condition="2f < n", run_batched=_batched_arc),
        Rule(
            "static_clip",
            "pre",
            _run_static_clip,
            _no_condition,
            required=("c",),
            check_params=_positive("static_clip", "c"),
            run_batched=_batched_static_clip,
        ),
        Rule(
            "nnm",
            "pre",
            lambda x, f, p, g: (nnm_impl(x, f=f), {}),
            _minority("nnm"),
            mixes_rows=True,
            condition="2f < n",
            run_batched=lambda x, f, p, g: (nnm_batched(x, f=f), {}),
        ),
        Rule(
            "bucketing",
            "pre",
            _run_bucketing,
            _no_condition,
            required=("s",),
            check_params=_positive_int("bucketing", "s"),
            run_batched=_batched_bucketing,
        ),
        Rule(
            "mean",
            "agg",
            lambda x, f, p, g: (x.mean(dim=0), {}),
            _no_condition,
            run_batched=lambda x, f, p, g: (x.mean(dim=-2), {}),
        ),
        Rule(
            "cwtm",
            "agg",
            lambda x, f, p, g: (cwtm_impl(x, f=f), {}),
            _minority("cwtm"),
            condition="2f < n",
            run_batched=lambda x, f, p, g: (cwtm_batched(x, f=f), {}),
        ),
        Rule(
            "cwmed",
            "agg",
            lambda x, f, p, g: (cwmed_impl(x), {}),
            _no_condition,
            run_batched=lambda x, f, p, g: (cwmed_batched(x), {}),
        ),
        Rule(
            "geometric_median",
            "agg",
            _run_gm,
            _no_condition,
            optional={"tol": DEFAULT_TOL, "max_iter": DEFAULT_MAX_ITER, "nu": DEFAULT_NU},
            check_params=_gm_params,
            run_batched=_batched_gm,
        ),
        Rule("krum", "agg", _run_krum, _krum_condition("krum"), condition="n > 2f + 2", run_batched=_batched_krum),
        Rule(
            "multi_krum",
            "agg",
            _run_multi_krum,
            _krum_condition("multi_krum"),
            optional={"m": None},
            check_params=_positive_int("multi_krum", "m"),
            condition="n > 2f + 2, m <= n",
            run_batched=_batched_multi_krum,
        ),
        Rule(
            "centered_clip",
            "agg",
            _run_centered_clip,
            _no_condition,
            required=("tau",),
            optional={"iters": 1, "center": None},
            check_params=_cc_params,
            run_batched=_batched_centered_clip,
        ),
        Rule(
            "bulyan",
            "agg",
            lambda x, f, p, g: (bulyan_impl(x, f=f), {}),
            _bulyan_condition,
            condition="n >= 4f + 3",
            run_batched=lambda x, f, p, g: (bulyan_batched(x, f=f), {}),
        ),
    )
}
PRE_AGGREGATORS = tuple(name for name, rule in RULES.items() if rule.kind == "pre")
AGGREGATORS = tuple(name for name, rule in RULES.items() if rule.kind == "agg")


def _adapt_rule(name: str, obj: object) -> Rule:
    if not isinstance(obj, Rule):
        raise TypeError(
            f"a rule plugin must be an arcsim.robust.Rule (a function decorated with "
            f"@arcsim.robust.rule(kind=..., condition=...)), got {type(obj).__name__}"
        )
    return dataclasses.replace(obj, name=name)  # stages and metrics carry the name the config wrote


#: Robust rules by name: the built-ins, then entry points (group ``arcsim.rules``), then ``module:callable``.
RULE_REGISTRY: Registry[Rule] = Registry("rule", builtins=RULES, adapt=_adapt_rule)


class Pipeline:
    """A validated chain of robust rules. Call it on an (n, d) tensor: ``aggregate, report = p(x)``."""

    def __init__(self, spec: str, rules: tuple[Rule, ...], f: int, params: tuple[Mapping[str, Any], ...]):
        self.spec = spec
        self.f = f
        self._rules = rules
        self._params = params

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self._rules)

    def __repr__(self) -> str:
        return f"Pipeline({self.spec!r}, f={self.f})"

    def __call__(
        self, x: Tensor, *, generator: torch.Generator | Sequence[torch.Generator | None] | None = None
    ) -> tuple[Tensor, AggregationReport] | tuple[Tensor, BatchedAggregationReport]:
        """Aggregate an (n, d) ``x``: ``(aggregate (d,), AggregationReport)``.

        An (..., n, d) ``x`` gives ``(aggregates (..., d), BatchedAggregationReport)``; ``generator`` is
        then None or one generator per element, in row-major order of the batch dimensions (element i
        draws from generator i exactly what the 2-D call on it would).
        """
        if isinstance(x, Tensor) and x.dim() >= 3:
            return self._call_batched(x, generator)
        check_matrix(x, rule=self.spec)
        reports = []
        sync = x.is_cuda
        for rule, params in zip(self._rules, self._params):
            rule.check_n(x.shape[0], self.f, params)
            start = time.perf_counter()
            x, fields = rule.run(x, self.f, params, generator)
            if sync:
                torch.cuda.synchronize(x.device)
            reports.append(
                StageReport(name=rule.name, seconds=time.perf_counter() - start, mixes_rows=rule.mixes_rows, **fields)
            )
        return x, AggregationReport(stages=tuple(reports))

    def _call_batched(
        self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator | None] | None
    ) -> tuple[Tensor, BatchedAggregationReport]:
        check_shape(x, rule=self.spec, batched=True)
        batch, (n, d) = x.shape[:-2], x.shape[-2:]
        flat = x.reshape(-1, n, d)
        count = flat.shape[0]
        generators = element_generators(generator, count, rule=self.spec)
        if count == 0:  # the shapes of everything from one element of zeros (own generator: no global draw)
            out, report = self._call_batched(x.new_zeros((1, n, d)), [torch.Generator()])
            return out[:0].reshape(*batch, *out.shape[1:]), _slice_report(report, batch)
        invalid = invalid_elements(flat)
        outs, parts = [], []
        for part in chunks(flat):  # on CPU, cache-sized chunks of elements (arcsim.robust._batch)
            out, fields = self._run_stages(zero_elements(flat[part], invalid[part]), generators[part])
            outs.append(nan_elements(out, invalid[part]))
            parts.append(fields)
        reports = []
        for position, rule_ in enumerate(self._rules):
            stage = [fields[position] for fields in parts]
            merged = _join_fields([fields for fields, _ in stage], stack=False, device=x.device)
            merged = {k: v.reshape(*batch, *v.shape[1:]) if isinstance(v, Tensor) else v for k, v in merged.items()}
            seconds = sum(seconds for _, seconds in stage)
            reports.append(BatchedStageReport(name=rule_.name, seconds=seconds, mixes_rows=rule_.mixes_rows, **merged))
        aggregate = outs[0] if len(outs) == 1 else torch.cat(outs)
        aggregate = aggregate.reshape(*batch, *aggregate.shape[1:])
        return aggregate, BatchedAggregationReport(stages=tuple(reports), invalid=invalid.reshape(batch))

    def _run_stages(
        self, x: Tensor, generators: Sequence[torch.Generator | None]
    ) -> tuple[Tensor, list[tuple[dict[str, Any], float]]]:
        """Every stage on a (B, n, d) chunk: the output and each stage's (report fields, seconds)."""
        stages = []
        sync = x.is_cuda
        for rule_, params in zip(self._rules, self._params):
            rule_.check_n(x.shape[1], self.f, params)
            start = time.perf_counter()
            if rule_.run_batched is not None:
                x, fields = rule_.run_batched(x, self.f, params, generators)
            else:
                x, fields = _per_element(rule_, x, self.f, params, generators)
            if sync:
                torch.cuda.synchronize(x.device)
            stages.append((fields, time.perf_counter() - start))
        return x, stages


def _join_fields(parts: list[dict[str, Any]], *, stack: bool, device: torch.device) -> dict[str, Any]:
    """One stage's report fields of several elements (``stack``: 2-D calls' fields) or of consecutive
    chunks of a batch (batched fields, concatenated), as one batched set of fields."""
    joined: dict[str, Any] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key == "iterations":
            joined[key] = max(values)
        elif not isinstance(values[0], Tensor):  # a 2-D call's clip threshold (a float)
            joined[key] = torch.tensor(values, dtype=torch.float64, device=device)
        else:
            joined[key] = torch.stack(values) if stack else torch.cat(values)
    return joined


def _per_element(
    rule_: Rule, x: Tensor, f: int, params: Mapping[str, Any], generators: Sequence[torch.Generator | None]
) -> tuple[Tensor, dict[str, Any]]:
    """A rule without a batched form on a (B, n, d) batch: one call per element, stacked (a fallback)."""
    results = [rule_.run(element, f, params, g) for element, g in zip(x.unbind(0), generators)]
    fields = _join_fields([fields for _, fields in results], stack=True, device=x.device)
    return torch.stack([out for out, _ in results]), fields


def _slice_report(report: BatchedAggregationReport, batch: torch.Size) -> BatchedAggregationReport:
    """A report of one element cut to none, with the (empty) batch dimensions ``batch``."""

    def cut(value: Any) -> Any:
        return value[:0].reshape(*batch, *value.shape[1:]) if isinstance(value, Tensor) else value

    stages = tuple(
        dataclasses.replace(stage, **{k.name: cut(getattr(stage, k.name)) for k in dataclasses.fields(stage)})
        for stage in report.stages
    )
    return BatchedAggregationReport(stages=stages, invalid=cut(report.invalid))


def _resolve_spec(spec: str) -> tuple[Rule, ...]:
    """The rules of ``"arc > nnm > cwtm"``, resolved and checked for order (not for parameters)."""
    valid = f"pre-aggregators: {', '.join(PRE_AGGREGATORS)}; aggregators: {', '.join(AGGREGATORS)}"
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"pipeline spec must be a non-empty string like 'arc > nnm > cwtm', got {spec!r}")
    names = tuple(part.strip() for part in spec.split(">"))
    rules = []
    for position, name in enumerate(names):
        try:
            rule_ = RULE_REGISTRY.get(name)
        except UnknownName:
            raise ValueError(
                f"pipeline {spec!r}: unknown rule {name!r}; valid names are {valid}; plugins: "
                f"{', '.join(RULE_REGISTRY.names()[len(RULES) :]) or 'none installed'} "
                f"(entry points of group 'arcsim.rules'), or package.module:callable"
            ) from None
        except ValueError as error:
            raise ValueError(f"pipeline {spec!r}: {error}") from None
        kind = rule_.kind
        last = position == len(names) - 1
        if last and kind != "agg":
            raise ValueError(f"pipeline {spec!r}: must end with an aggregator ({', '.join(AGGREGATORS)}), got {name!r}")
        if not last and kind != "pre":
            raise ValueError(
                f"pipeline {spec!r}: {name!r} is an aggregator and must come last; "
                f"only pre-aggregators ({', '.join(PRE_AGGREGATORS)}) may precede it"
            )
        rules.append(rule_)
    return tuple(rules)


def parse_spec(spec: str) -> tuple[str, ...]:
    """Split ``"arc > nnm > cwtm"`` into stage names and check the grammar (not the parameters).

    Each name is resolved (built-in, entry point, or ``package.module:callable``), so a plugin that
    cannot be imported fails here, naming its module and the exception.

    >>> parse_spec("arc>nnm > cwtm")
    ('arc', 'nnm', 'cwtm')
    """
    return tuple(rule_.name for rule_ in _resolve_spec(spec))


def _split_params(
    spec: str, names: tuple[str, ...], params: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat parameters, and per-stage ones (a key naming a stage of the pipeline, with a mapping value)."""
    flat: dict[str, Any] = {}
    per_stage: dict[str, Any] = {}
    for key, value in params.items():
        if key in names:
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"pipeline {spec!r}: parameters of stage {key!r} must be a mapping such as "
                    f"{{{key}: {{name: value}}}}, got {value!r}"
                )
            per_stage[key] = dict(value)
        else:
            flat[key] = value
    return flat, per_stage


def build_pipeline(spec: str, *, f: int, **params: Any) -> Pipeline:
    """Build a pipeline from a spec such as ``"arc > nnm > cwtm"``.

    ``f`` is the number of Byzantine vectors the rules defend against (the declared f). Keyword
    ``params`` are handed to every stage that takes them: ``c`` (static_clip), ``s`` (bucketing),
    ``m`` (multi_krum), ``tol``/``max_iter``/``nu`` (geometric_median), ``tau``/``iters``/``center``
    (centered_clip), and a plugin rule's own. A parameter named after a stage of the pipeline holds
    that stage's parameters (``centered_clip={"tau": 5}``), which win over the flat ones. A
    parameter no stage takes, or a missing required one, raises ValueError.

    >>> import torch
    >>> pipeline = build_pipeline("arc > nnm > cwtm", f=1)
    >>> aggregate, report = pipeline(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]]))
    >>> report.clipped.tolist()
    [False, False, True]
    >>> build_pipeline("arc > centered_clip", f=1, centered_clip={"tau": 5.0}).stage_names
    ('arc', 'centered_clip')
    """
    check_f(f, rule="build_pipeline")
    rules = _resolve_spec(spec)
    names = tuple(rule_.name for rule_ in rules)
    flat, per_stage = _split_params(spec, names, params)
    known = {key for rule_ in rules for key in (*rule_.required, *rule_.optional)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(
            f"pipeline {spec!r}: unexpected parameters {unknown}; its stages take {sorted(known) or 'none'}"
        )
    stage_params = []
    for rule_ in rules:
        takes = (*rule_.required, *rule_.optional)
        own = per_stage.get(rule_.name, {})
        unexpected = sorted(set(own) - set(takes))
        if unexpected:
            raise ValueError(
                f"pipeline {spec!r}: stage {rule_.name!r} got unexpected parameters {unexpected}; "
                f"it takes {sorted(takes) or 'none'}"
            )
        given = {**{k: v for k, v in flat.items() if k in takes}, **own}
        missing = [key for key in rule_.required if key not in given]
        if missing:
            raise ValueError(f"pipeline {spec!r}: {rule_.name} needs parameter(s) {missing}")
        chosen = {**rule_.optional, **given}
        rule_.check_params(chosen)
        stage_params.append(chosen)
    return Pipeline(" > ".join(names), rules, f, tuple(stage_params))
