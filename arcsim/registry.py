"""One way to name a rule, an attack, a dataset, a model or a partitioner: built-in, entry point, or module path.

A :class:`Registry` resolves a name in this order:

1. a built-in (``"cwtm"``, ``"alie"``, ``"fashion-mnist"``, ...);
2. an entry point of that name in the registry's group (``arcsim.rules``, ``arcsim.attacks``,
   ``arcsim.datasets``, ``arcsim.models``, ``arcsim.partitioners``), declared by any installed
   distribution in its ``pyproject.toml`` (``[project.entry-points."arcsim.rules"]``);
3. ``package.module:callable`` written directly in the config (``pipeline: "arc > mylab.rules:trimmed_median"``),
   imported on the spot.

Every failure is a :class:`PluginError` (a ``ValueError``) of one line: an unknown name lists the
valid ones, an unimportable plugin names its module and the exception it raised. Nothing is cached
between calls: every process (coordinator, worker, adversary) resolves the names of the config it
receives, and a host that lacks a plugin fails there, with that line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BUILT_IN", "GROUPS", "Entry", "PluginError", "Registry", "UnknownName"]

T = TypeVar("T")

#: The entry-point group of each registry, by the kind of thing it names.
GROUPS: Mapping[str, str] = {
    "rule": "arcsim.rules",
    "attack": "arcsim.attacks",
    "dataset": "arcsim.datasets",
    "model": "arcsim.models",
    "partitioner": "arcsim.partitioners",
}

#: The origin of a built-in entry.
BUILT_IN = "built-in"


class PluginError(ValueError):
    """A name that resolves to nothing usable; the message is one line saying which name and why."""


class UnknownName(PluginError):
    """A name that is no built-in, no entry point and no ``module:callable`` path."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A resolved name: what it names (``value``) and where that comes from (``origin``).

    ``origin`` is ``"built-in"``, ``"entry point of distribution X"`` or ``"module:callable"``.
    """

    name: str
    value: T
    origin: str


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Registry(Generic[T]):
    """Names of one kind (``"rule"``, ``"attack"``, ...): built-ins first, then plugins.

    ``adapt(name, obj)`` turns what a plugin's entry point or ``module:callable`` points at into a
    ``T`` and raises ``TypeError`` or ``ValueError`` (reported as a PluginError) when it breaks the
    contract. Built-ins are taken as they are.
    """

    def __init__(self, kind: str, *, builtins: Mapping[str, T], adapt: Callable[[str, object], T]) -> None:
        if kind not in GROUPS:
            raise ValueError(f"registry kind must be one of {', '.join(GROUPS)}, got {kind!r}")
        self.kind = kind
        self.group = GROUPS[kind]
        self._builtins = dict(builtins)
        self._adapt = adapt

    @property
    def builtins(self) -> tuple[str, ...]:
        return tuple(self._builtins)

    def _entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return sorted(importlib.metadata.entry_points(group=self.group), key=lambda ep: ep.name)

    def names(self) -> tuple[str, ...]:
        """Built-in names, then the entry points' names (not loaded), without duplicates."""
        plugins = [ep.name for ep in self._entry_points() if ep.name not in self._builtins]
        return (*self._builtins, *dict.fromkeys(plugins))

    def is_builtin(self, name: str) -> bool:
        return name in self._builtins

    def resolve(self, name: str) -> Entry[T]:
        """The entry ``name`` stands for (see the module docstring for the order)."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownName(f"unknown {self.kind} {name!r}: a name must be a non-empty string")
        if name in self._builtins:
            return Entry(name, self._builtins[name], BUILT_IN)
        for ep in self._entry_points():
            if ep.name == name:
                distribution = ep.dist.name if ep.dist is not None else "unknown"
                try:
                    loaded = ep.load()
                except Exception as error:  # noqa: BLE001 - any import failure of a plugin is reported the same way
                    raise PluginError(
                        f"{self.kind} {name!r} (entry point {ep.value!r} of distribution {distribution}): "
                        f"cannot import module {ep.module!r}: {_one_line(error)}"
                    ) from None
                return Entry(name, self._checked(name, loaded), f"entry point of distribution {distribution}")
        if ":" in name:
            return Entry(name, self._checked(name, self._import(name)), "module:callable")
        raise UnknownName(
            f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())} "
            f"(or an entry point in group {self.group!r}, or package.module:callable)"
        )

    def get(self, name: str) -> T:
        return self.resolve(name).value

    def entries(self) -> list[Entry[T]]:
        """Every built-in and every entry point, loaded (for ``arcsim list``)."""
        found = [Entry(name, value, BUILT_IN) for name, value in self._builtins.items()]
        found += [self.resolve(name) for name in self.names() if name not in self._builtins]
        return found

    def _import(self, name: str) -> object:
        module_name, _, attribute = name.partition(":")
        if not module_name or not attribute:
            raise PluginError(f"{self.kind} {name!r}: a plugin path must read package.module:callable")
        try:
            target: object = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - any import failure of a plugin is reported the same way
            raise PluginError(
                f"{self.kind} {name!r}: cannot import module {module_name!r}: {_one_line(error)}"
            ) from None
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise PluginError(
                    f"{self.kind} {name!r}: module {module_name!r} has no attribute {attribute!r}"
                ) from None
        return target

    def _checked(self, name: str, obj: object) -> T:
        try:
            return self._adapt(name, obj)
        except (TypeError, ValueError) as error:
            raise PluginError(f"{self.kind} {name!r}: {' '.join(str(error).split())}") from None
