"""Robust aggregation: ARC and its peers, as pure functions on (n, d) tensors, and pipelines of them.

Pre-aggregators map (n, d) -> (n, d) (bucketing: (ceil(n/s), d)); aggregators map (n, d) -> (d,).
Every rule validates its input (2-D, floating, finite) and its n-dependent condition on f, never
modifies its input, and is vectorised across workers.
"""

from .arc import arc, arc_num_clipped
from .bucketing import bucketing
from .bulyan import bulyan
from .centered_clip import centered_clip
from .cwmed import cwmed
from .cwtm import cwtm
from .geometric_median import geometric_median
from .krum import krum, multi_krum
from .mean import mean
from .nnm import nnm
from .pipeline import (
    AGGREGATORS,
    PRE_AGGREGATORS,
    RULE_REGISTRY,
    AggregationReport,
    BatchedAggregationReport,
    BatchedStageReport,
    Pipeline,
    Rule,
    StageReport,
    build_pipeline,
    parse_spec,
    rule,
)
from .static_clip import static_clip

__all__ = [
    "AGGREGATORS",
    "PRE_AGGREGATORS",
    "RULE_REGISTRY",
    "AggregationReport",
    "BatchedAggregationReport",
    "BatchedStageReport",
    "Pipeline",
    "Rule",
    "StageReport",
    "arc",
    "arc_num_clipped",
    "bucketing",
    "build_pipeline",
    "bulyan",
    "centered_clip",
    "cwmed",
    "cwtm",
    "geometric_median",
    "krum",
    "mean",
    "multi_krum",
    "nnm",
    "parse_spec",
    "rule",
    "static_clip",
]
