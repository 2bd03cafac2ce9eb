"""`arcsim list [rules|attacks|datasets|models|partitioners]`: every name a config may use, and where it comes from.

Built-ins first, then the entry points of installed distributions (loaded, so a broken plugin shows
its one-line error instead of a name that would fail at run time). A ``package.module:callable``
name written in a config is not listed: it exists only where a config names it.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["KINDS", "add_parser", "cmd_list", "listing"]

#: What `arcsim list` can show, in its order.
KINDS = ("rules", "attacks", "datasets", "models", "partitioners")


def _registries() -> dict[str, Any]:
    from arcsim.attacks import ATTACK_REGISTRY
    from arcsim.robust import RULE_REGISTRY
    from arcsim.tasks import DATASET_REGISTRY, MODEL_REGISTRY, PARTITIONER_REGISTRY

    return {
        "rules": RULE_REGISTRY,
        "attacks": ATTACK_REGISTRY,
        "datasets": DATASET_REGISTRY,
        "models": MODEL_REGISTRY,
        "partitioners": PARTITIONER_REGISTRY,
    }


def _describe(kind: str, value: object) -> str:
    """A few words on what the entry is (a rule's kind and condition, a data attack)."""
    if kind == "rules":
        what = "pre-aggregator" if getattr(value, "kind", "") == "pre" else "aggregator"
        condition = getattr(value, "condition", "")
        params = [*getattr(value, "required", ()), *getattr(value, "optional", {})]
        return ", ".join(part for part in (what, condition, f"params: {' '.join(params)}" if params else "") if part)
    if kind == "attacks":
        from arcsim.attacks import DataAttack

        return "data attack (label map)" if isinstance(value, DataAttack) else "vector attack"
    return ""


def listing(kinds: tuple[str, ...] = KINDS) -> list[str]:
    """The lines `arcsim list` prints: one heading per kind, then ``name  origin  description`` rows."""
    from arcsim.registry import PluginError

    registries = _registries()
    lines: list[str] = []
    for kind in kinds:
        registry = registries[kind]
        rows: list[tuple[str, str, str]] = []
        for name in registry.names():
            try:
                entry = registry.resolve(name)
            except PluginError as error:
                rows.append((name, "entry point", f"broken: {error}"))
                continue
            rows.append((name, entry.origin, _describe(kind, entry.value)))
        width = max(len(name) for name, _, _ in rows)
        origin_width = max(len(origin) for _, origin, _ in rows)
        lines.append(f"{kind} (group {registry.group}; package.module:callable also works):")
        lines += [f"  {name:<{width}}  {origin:<{origin_width}}  {about}".rstrip() for name, origin, about in rows]
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    kinds = (args.kind,) if getattr(args, "kind", None) else KINDS
    print("\n".join(listing(kinds)))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `list` command to an argparse subparsers object (arcsim.cli's)."""
    parser = subparsers.add_parser(
        "list",
        help="list the rules, attacks, datasets, models and partitioners a config may name",
        description="List built-in names and the plugins installed as entry points (groups arcsim.rules, "
        "arcsim.attacks, arcsim.datasets, arcsim.models, arcsim.partitioners), with where each "
        "comes from. A config may also name package.module:callable directly.",
        epilog="examples:\n  arcsim list\n  arcsim list rules",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", nargs="?", choices=KINDS, help="only this registry (default: all of them)")
    parser.set_defaults(func=cmd_list)
    return parser
