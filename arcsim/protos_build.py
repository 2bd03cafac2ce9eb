"""Regenerate, or check, the Python gRPC stubs built from ``protos/``.

The stubs live in the tree (``arcsim/v1/coordinator_pb2.py``, ``coordinator_pb2.pyi``,
``coordinator_pb2_grpc.py``) so that installing arcsim needs no protoc. They are exactly what

    python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. \\
        protos/arcsim/v1/coordinator.proto

writes when run from the repository root; this module runs the same compiler as a library
(``grpc_tools.protoc.main``, no shell) for every ``.proto`` under ``protos/``.

Usage::

    python -m arcsim.protos_build            # regenerate the stubs in the tree
    python -m arcsim.protos_build --check    # exit 1, with a diff summary, if they are stale

The generated code embeds the versions of the generator: ``*_pb2.py`` calls
``ValidateProtobufRuntimeVersion`` (the protobuf runtime must be at least the protobuf version
that grpcio-tools bundles) and ``*_pb2_grpc.py`` refuses grpcio older than the grpcio-tools that
generated it. A different grpcio-tools version therefore produces different stubs, and ``--check``
reports them as stale: regenerate with the pinned grpcio-tools. The stubs in the tree come from
grpcio-tools 1.84.0 (protobuf gencode 7.35.1), so they need grpcio >= 1.84.0 and protobuf >= 7.35.1
(< 8), the oldest versions among the machines this project runs on.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.resources
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: ``protos/`` and the ``arcsim`` package are below it."""

PROTO_DIR = "protos"
"""Where the ``.proto`` sources live, relative to the repository root (the ``-I`` path)."""

STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
"""What protoc writes for ``x.proto``: ``x_pb2.py``, ``x_pb2.pyi`` and ``x_pb2_grpc.py``."""

_MAX_DIFF_LINES = 20


def proto_sources(repo_root: Path = REPO_ROOT) -> list[Path]:
    """The ``.proto`` files under ``protos/``, relative to it, sorted.

    >>> [str(p) for p in proto_sources()]
    ['arcsim/v1/coordinator.proto']
    """
    proto_root = repo_root / PROTO_DIR
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def expected_stubs(sources: Sequence[Path]) -> list[Path]:
    """The stub paths (relative to the output root) that protoc writes for ``sources``.

    >>> [str(p) for p in expected_stubs([Path("arcsim/v1/coordinator.proto")])]
    ['arcsim/v1/coordinator_pb2.py', 'arcsim/v1/coordinator_pb2.pyi', 'arcsim/v1/coordinator_pb2_grpc.py']
    """
    return sorted(src.with_name(src.stem + suffix) for src in sources for suffix in STUB_SUFFIXES)


def generate(out_dir: Path, *, repo_root: Path = REPO_ROOT) -> list[Path]:
    """Compile every ``.proto`` under ``repo_root/protos`` into ``out_dir``.

    Returns the generated stub paths, relative to ``out_dir``. Raises ``RuntimeError`` if protoc
    fails (its messages go to stderr) and ``ValueError`` if there is no ``.proto`` file.
    """
    from grpc_tools import protoc  # imported here: the stubs' users need no grpcio-tools

    sources = proto_sources(repo_root)
    if not sources:
        raise ValueError(f"no .proto files under {repo_root / PROTO_DIR}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{repo_root / PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(repo_root / PROTO_DIR / src) for src in sources),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args[1:])}")
    return expected_stubs(sources)


def _stale_stubs(tree_root: Path, expected: Sequence[Path]) -> list[Path]:
    """Stub-like files in the stub folders of ``tree_root`` that protoc no longer writes."""
    wanted = set(expected)
    folders = sorted({p.parent for p in expected})
    found = {
        (folder / f.name)
        for folder in folders
        if (tree_root / folder).is_dir()
        for f in (tree_root / folder).iterdir()
        if f.is_file() and f.name.endswith(STUB_SUFFIXES)
    }
    return sorted(found - wanted)


def _diff_summary(path: Path, old: bytes, new: bytes) -> list[str]:
    old_lines = old.decode("utf-8", "replace").splitlines()
    new_lines = new.decode("utf-8", "replace").splitlines()
    diff = list(difflib.unified_diff(old_lines, new_lines, f"tree/{path}", f"generated/{path}", lineterm="", n=1))
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    lines = [f"differs: {path} (+{added} -{removed} lines)"]
    lines += [f"    {line}" for line in diff[:_MAX_DIFF_LINES]]
    if len(diff) > _MAX_DIFF_LINES:
        lines.append(f"    ... {len(diff) - _MAX_DIFF_LINES} more diff lines")
    return lines


def check(*, repo_root: Path = REPO_ROOT) -> list[str]:
    """Regenerate into a temporary folder and compare with the stubs in the tree.

    Returns a human-readable list of differences: empty when the tree is up to date.
    """
    with tempfile.TemporaryDirectory(prefix="arcsim-protos-") as tmp:
        generated = generate(Path(tmp), repo_root=repo_root)
        problems: list[str] = []
        for rel in generated:
            fresh = (Path(tmp) / rel).read_bytes()
            in_tree = repo_root / rel
            if not in_tree.is_file():
                problems.append(f"missing: {rel}")
            elif (current := in_tree.read_bytes()) != fresh:
                problems += _diff_summary(rel, current, fresh)
        problems += [f"stale (no .proto generates it): {rel}" for rel in _stale_stubs(repo_root, generated)]
        return problems


def regenerate(*, repo_root: Path = REPO_ROOT) -> list[str]:
    """Write fresh stubs into the tree, and delete stale ones. Returns what changed."""
    changes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="arcsim-protos-") as tmp:
        generated = generate(Path(tmp), repo_root=repo_root)
        for rel in generated:
            fresh = (Path(tmp) / rel).read_bytes()
            target = repo_root / rel
            if target.is_file() and target.read_bytes() == fresh:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, target)
            changes.append(f"wrote: {rel}")
        for rel in _stale_stubs(repo_root, generated):
            (repo_root / rel).unlink()
            changes.append(f"deleted stale: {rel}")
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m arcsim.protos_build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the stubs in the tree are not up to date")
    parser.add_argument("--repo-root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(repo_root=args.repo_root)
        if problems:
            print("generated stubs are out of date; run `python -m arcsim.protos_build`:", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
            print(f"(compared with grpcio-tools {importlib.metadata.version('grpcio-tools')})", file=sys.stderr)
            return 1
        print("generated stubs are up to date")
        return 0
    changes = regenerate(repo_root=args.repo_root)
    print("\n".join(changes) if changes else "generated stubs were already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
