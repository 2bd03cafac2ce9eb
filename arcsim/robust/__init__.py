"""Robust aggregation: ARC and its peers, as pure functions on (n, d) tensors, and pipelines of them.

Pre-aggregators map (n, d) -> (n, d) (bucketing: (ceil(n/s), d)); aggregators map (n, d) -> (d,).
Every rule validates its input (2-D, floating, finite) and its n-dependent condition on f, never
modifies its input, and is vectorised across workers.

Every rule and :class:`Pipeline` also take (..., n, d) input with leading batch dimensions (many
runs, or many candidate attacks per run, in lockstep): the work is vectorised over the batch (on
CPU in cache-sized chunks of elements, see ``_batch.CHUNK_BYTES``), 2-D input takes the 2-D code
unchanged, and an element holding a NaN or an infinity gives NaN (a pipeline flags it in
:attr:`BatchedAggregationReport.invalid`) instead of raising, leaving the others untouched. Each
element's output matches the 2-D call on it as follows (eps: the dtype's machine epsilon; M: the
element's largest absolute entry as it reaches the rule; n: its rows):

- arc, static_clip, bucketing: bitwise (outputs, clip thresholds, masks, bucket groups; bucketing
  with the element's own generator);
- mean, cwmed: sorted values bitwise; outputs within 4 eps M (a mean may round differently);
- cwtm: sorted values bitwise; outputs within n eps M (on the CPU the kept values are summed in row
  order while they are in cache, not written out first);
- nnm, krum, multi_krum, bulyan, centered_clip: within 16 n eps M (batched Gram matrices and
  products may round differently from the 2-D ones); krum and multi_krum select the same indices
  when the rows are distinct, rows of equal value when a row is duplicated (its twin may stand in).
  On the CPU the distances of every element and NNM's output are computed by the 2-D code (NNM's
  mixing product from an aligned copy of the element), so they are bitwise the 2-D call's on a fresh
  tensor, and a rule that selects rows after NNM (whose rows are often exact copies) breaks their
  ties as the 2-D call does;
- geometric_median: within tol (1 + ||z||) + 16 n eps M of the 2-D result z, its iteration count
  within one of the 2-D count.

Ties are broken as in the 2-D rules (NNM's stable order by index, ARC's top-k threshold, Krum's
lowest index). Rows whose norms overflow the dtype take the 2-D overflow path, element by element.

On the CPU (:func:`host_tuned`) a batch goes through paths tuned for it (cache-sized chunks,
element by element through the 2-D code, sorting networks, numpy's sort); elsewhere through one
batched kernel per step. :func:`device_paths` makes CPU tensors take the latter too, which is how
the tests cover the code a GPU runs on a machine without one.
"""

from ._batch import device_paths, host_tuned
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
    "device_paths",
    "geometric_median",
    "host_tuned",
    "krum",
    "mean",
    "multi_krum",
    "nnm",
    "parse_spec",
    "rule",
    "static_clip",
]
