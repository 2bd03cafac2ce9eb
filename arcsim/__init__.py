"""arcsim: a Byzantine-robust distributed learning testbed built around Adaptive Robust Clipping.

From Python: ``arcsim.run(config, ...)``, ``arcsim.sweep(config, ...)`` and ``arcsim.load(path)``
(arcsim.api). They are loaded on first use, so that ``import arcsim.config`` (the core) stays free of
the app layer and of grpc, protobuf and prometheus_client.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["RunResult", "SweepResult", "load", "run", "sweep"]

_API = frozenset({"run", "load", "RunResult", "SweepResult"})


def __getattr__(name: str) -> Any:
    # PEP 562: the API's names come from arcsim.api when first asked for. The import is by name
    # (importlib), not an import statement: every layer imports this package (for __version__), and
    # the layer contracts (import-linter) read import statements, so the package root must not name
    # the app layer. ``arcsim.sweep`` is the module arcsim.sweep (a submodule, once imported, is an
    # attribute of the package whatever this returns), made callable: calling it is arcsim.api.sweep.
    if name in _API:
        return getattr(importlib.import_module("arcsim.api"), name)
    if name == "sweep":
        return importlib.import_module("arcsim.sweep")
    raise AttributeError(f"module 'arcsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
