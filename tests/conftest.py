"""Shared test setup: one torch thread, the tiny config, worker tokens, and the ``unit`` marker.

One torch thread: on a 2-core machine shared with other processes two threads oversubscribe the cores
and slow training down several times (docs/benchmarks.md, "Reading the tables").

Test modules import the helpers by name (``from conftest import tiny_config``): pytest puts this folder
on ``sys.path`` (rootdir-relative "prepend" imports, as for ``netns``), so that is this very module.

``pytest -m unit`` runs the pure tests: no child processes, no sockets, no sleeps. The modules named in
:data:`UNIT_MODULES` are marked whole, minus the tests in :data:`NOT_UNIT` that start a process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import pytest
import torch

if TYPE_CHECKING:
    from arcsim.config import RunConfig

torch.set_num_threads(1)

# The helpers import arcsim when called, not here: a module that fails to import then fails its own
# tests only, and the pure tests do not load the transport.

# --- the tiny config --------------------------------------------------------------------------------
TINY: Final[dict[str, Any]] = {
    "task": "synthetic",
    "model": "logreg",
    "partitioner": "iid",
    "num_honest": 3,
    "num_byzantine": 0,
    "attack": "none",
    "pipeline": "arc > nnm > cwtm",
    "rounds": 2,
    "eval_every": 1,
    "batch_size": 16,
    "round_deadline": 60.0,
}
"""A run of a few milliseconds: the synthetic task, a linear model, three honest workers, two rounds."""


def tiny_values(**changes: Any) -> dict[str, Any]:
    """:data:`TINY` with ``changes``, as the plain mapping a YAML file or ``--set`` would hold.

    Byzantine workers need an attack: when ``changes`` adds some and names none, they flip signs.
    """
    values = {**TINY, **changes}
    if values["num_byzantine"] and "attack" not in changes:
        values["attack"] = "sign_flip"
    return values


def tiny_config(**changes: Any) -> RunConfig:
    """The loaded and validated :func:`tiny_values`."""
    from arcsim.config import from_dict

    return from_dict(tiny_values(**changes))


# --- the largest f a rule allows for n rows (negative: n too small) -----------------------------------
def max_f_minority(n: int) -> int:
    """2f < n (ARC, NNM, CWTM)."""
    return (n - 1) // 2


def max_f_krum(n: int) -> int:
    """n > 2f + 2 (Krum, Multi-Krum)."""
    return (n - 3) // 2


def max_f_bulyan(n: int) -> int:
    """n >= 4f + 3."""
    return (n - 3) // 4


def no_f(n: int) -> int:
    """Rules without a condition on f (mean, CWMed, ...): tested at f = 0."""
    return 0


# --- worker credentials -------------------------------------------------------------------------------
TEST_SECRET: Final[str] = "test-secret"
"""The coordinator's secret in every test that starts one."""


def token(worker_id: int, role: str = "honest", *, secret: str = TEST_SECRET) -> str:
    """The bearer token the coordinator issues to ``worker_id`` (``ANY_ID``: the role's join token)."""
    from arcsim.transport.auth import worker_token

    return worker_token(secret, role, worker_id)


def auth(worker_id: int, role: str = "honest", *, secret: str = TEST_SECRET) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying :func:`token`, as a remote worker sends it."""
    from arcsim.transport.auth import bearer

    return bearer(token(worker_id, role, secret=secret))


# --- the unit marker -------------------------------------------------------------------------------------
UNIT_MODULES: Final[frozenset[str]] = frozenset(
    {
        "test_attacks",
        "test_attacks_batched",
        "test_checkpoint",
        "test_codec",
        "test_config",
        "test_docs",
        "test_e2e_crash_checks",
        "test_engine_batched",
        "test_gradients",
        "test_partition",
        "test_pipeline",
        "test_result_files",
        "test_robust",
        "test_robust_batched",
        "test_robust_properties",
        "test_rounds",
        "test_tasks",
    }
)
"""Modules whose tests are pure computation on in-memory data or files in ``tmp_path`` (the in-process
engine included: it runs in the test's own thread)."""

NOT_UNIT: Final[frozenset[str]] = frozenset(
    {
        # Starts a second interpreter to compare the parameters across processes.
        "test_tasks.py::test_same_seed_gives_identical_parameters_in_another_process",
    }
)


UNIT_MARKER: Final[str] = "unit: pure tests (no processes, network or sleeps), marked by tests/conftest.py"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker here too, so ``--strict-markers`` accepts it wherever pytest is configured."""
    config.addinivalue_line("markers", UNIT_MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the pure tests ``unit``; by module so that new tests in those modules are included."""
    for item in items:
        module = item.path.stem
        test_id = f"{item.path.name}::{item.originalname if isinstance(item, pytest.Function) else item.name}"
        if module in UNIT_MODULES and test_id not in NOT_UNIT:
            item.add_marker(pytest.mark.unit)
