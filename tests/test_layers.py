"""The package's shape: one top-level name, layers whose imports point down, a light core.

The layer contracts themselves are checked by import-linter (`lint-imports`, configured in
pyproject.toml and run by .ci/run); these tests check what it cannot: what a fresh interpreter
really loads, and what the built distribution really contains.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRANSPORT_AND_METRICS = ("grpc", "google.protobuf", "prometheus_client")


@pytest.mark.parametrize(
    "modules",
    [
        "arcsim.config, arcsim.robust, arcsim.registry",
        "arcsim.engine.inproc, arcsim.tasks",
        "arcsim.attacks, arcsim.tensorbytes",
    ],
)
def test_core_and_engine_load_no_grpc_protobuf_or_prometheus(modules: str) -> None:
    # Execute: a fresh interpreter imports the modules and lists what came with them
    code = (
        f"import sys, {modules}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'prometheus_client')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_code_imports_the_old_top_level_packages() -> None:
    # Prepare: every Python file of the repository but the virtual environment and build outputs
    pattern = re.compile(r"^\s*(from|import) (coordinator|workers|adversaries)\b", re.MULTILINE)
    files = [p for p in REPO.rglob("*.py") if not {".venv", "build", ".git"} & set(p.relative_to(REPO).parts)]

    # Execute
    offenders = [str(p.relative_to(REPO)) for p in files if pattern.search(p.read_text())]

    # Assert
    assert offenders == []


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package_with_its_type_marker(tmp_path: Path) -> None:
    # Prepare: what the build reads, copied (a build writes build/ next to its sources)
    source = tmp_path / "src"
    shutil.copytree(REPO / "arcsim", source / "arcsim", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    # Execute: build the wheel as pip would
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("arcsim-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()

    # Assert
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"arcsim"}
    assert "arcsim/py.typed" in names and "arcsim/v1/coordinator_pb2.pyi" in names
    assert {
        "arcsim/coordinator/service.py",
        "arcsim/workers/service.py",
        "arcsim/adversaries/service.py",
        "arcsim/engine/rounds.py",
        "arcsim/transport/wire.py",
    } <= set(names)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
