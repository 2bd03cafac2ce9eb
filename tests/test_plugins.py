"""Plugins for every registry: the example package installed with pip, module:callable names, the contracts.

The example package (examples/plugin) is installed once with pip into a temporary folder put on
PYTHONPATH of the subprocesses, so its real entry points are found; the in-process tests import it
from its source folder by module:callable name instead, and never touch the test environment.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arcsim.attacks import ATTACK_REGISTRY, craft, is_data_attack, label_map
from arcsim.config import ConfigError, from_dict
from arcsim.registry import PluginError
from arcsim.robust import RULE_REGISTRY, build_pipeline, rule
from arcsim.tasks import build_model, load_dataset, model_loss, partition

REPO = Path(__file__).resolve().parent.parent
PLUGIN_SOURCE = REPO / "examples" / "plugin"
ARCSIM = [sys.executable, "-m", "arcsim.cli"]

# A tiny run on the plugin's names: entry points (installed) or module:callable paths.
ENTRY_POINT_CONFIG = """\
task: blobs
model: logreg
num_honest: 4
num_byzantine: 1
attack: scaled_mean
attack_params: {scale: -2.0}
pipeline: arc > meamed
partitioner: iid
rounds: 4
lr: 0.1
batch_size: 10
eval_every: 2
seed: 3
round_deadline: 30
"""
MODULE_PATH_CONFIG = (
    ENTRY_POINT_CONFIG.replace("task: blobs", "task: arcsim_example_plugin:blobs")
    .replace("attack: scaled_mean", "attack: arcsim_example_plugin:scaled_mean")
    .replace("arc > meamed", "arc > arcsim_example_plugin:meamed")
)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed with pip (entry points and all) into a folder of its own."""
    base = tmp_path_factory.mktemp("plugin")
    source = base / "source"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # builds stay here
    target = base / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def _env(plugin_path: Path | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ARCSIM_")}
    paths = [str(REPO)] + ([str(plugin_path)] if plugin_path is not None else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _arcsim(args: list[str], plugin_path: Path | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ARCSIM, *args], env=_env(plugin_path), cwd=cwd, capture_output=True, text=True, timeout=300)


def _run_sha(config_text: str, engine: str, plugin_path: Path, tmp_path: Path) -> str:
    config = tmp_path / f"plugin-{engine}.yaml"
    config.write_text(config_text)
    out = tmp_path / f"out-{engine}"
    result = _arcsim(["run", str(config), "--engine", engine, "--out", str(out)], plugin_path, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())["final_params_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("config_text", [ENTRY_POINT_CONFIG, MODULE_PATH_CONFIG], ids=["entry-points", "module-path"])
def test_plugin_run_gives_equal_final_parameters_on_both_engines(
    config_text: str, plugin_path: Path, tmp_path: Path
) -> None:
    # Execute: the same plugin config through `arcsim run`, gRPC services and in-process
    grpc_sha = _run_sha(config_text, "grpc", plugin_path, tmp_path)
    inproc_sha = _run_sha(config_text, "inproc", plugin_path, tmp_path)

    # Assert
    assert grpc_sha == inproc_sha


def test_list_shows_the_installed_plugins_and_where_they_come_from(plugin_path: Path, tmp_path: Path) -> None:
    # Execute: the listing module directly (the CLI may or may not wire `arcsim list` yet)
    code = "import sys; from arcsim.listing import listing; print('\\n'.join(listing()))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(plugin_path), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    # Assert
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    for name in ("meamed", "scaled_mean", "blobs"):
        assert "entry point of distribution arcsim-example-plugin" in rows[name]
    assert "aggregator, n > 2f" in rows["meamed"]
    assert "built-in" in rows["cwtm"] and "built-in" in rows["label_flip"]


def test_a_host_lacking_the_plugin_fails_at_config_load_with_one_line(tmp_path: Path) -> None:
    # Prepare: the module:callable config on a machine where the plugin is not installed
    config = tmp_path / "plugin.yaml"
    config.write_text(MODULE_PATH_CONFIG)

    # Execute: `arcsim run`, and what a worker does with the coordinator's config at Join
    run = _arcsim(["run", str(config), "--engine", "inproc", "--out", str(tmp_path / "out")], None, tmp_path)
    code = (
        "import sys; from arcsim.config import loads_config\n"
        'try:\n    loads_config(sys.stdin.read(), source="the coordinator\'s config")\n'
        "except ValueError as error:\n    print(error)\n"
    )
    join = subprocess.run(
        [sys.executable, "-c", code],
        input=MODULE_PATH_CONFIG,
        env=_env(None),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert: one line naming the key, the module and the exception; nothing ran
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert (
        "'task': dataset 'arcsim_example_plugin:blobs': cannot import module 'arcsim_example_plugin': "
        "ModuleNotFoundError"
    ) in run.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
    assert join.stdout.count("\n") == 1 and "cannot import module 'arcsim_example_plugin'" in join.stdout


@pytest.mark.slow
def test_a_worker_host_lacking_the_plugin_fails_at_join_with_one_line(plugin_path: Path, tmp_path: Path) -> None:
    # Prepare: a coordinator with the plugin installed, on a free loopback port
    config = tmp_path / "plugin.yaml"
    config.write_text(ENTRY_POINT_CONFIG)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "plugin-test-secret"
    coordinator_env = {**_env(plugin_path), "ARCSIM_SECRET": secret}
    log = (tmp_path / "coordinator.log").open("w")
    coordinator = subprocess.Popen(
        [
            *ARCSIM,
            "coordinator",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "out"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=coordinator_env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Execute: an honest worker on a host without the plugin joins
        worker = subprocess.run(
            [*ARCSIM, "worker", "--coordinator", f"127.0.0.1:{port}", "--worker-id", "0", "--max-retry-seconds", "120"],
            env={**_env(None), "ARCSIM_SECRET": secret},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        coordinator.kill()
        coordinator.wait(timeout=30)
        log.close()

    # Assert: it stops at Join, with one line naming the plugin's name and why; the run never started
    errors = [line for line in worker.stderr.splitlines() if line.startswith("arcsim: error:")]
    assert worker.returncode == 2, worker.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in worker.stderr
    assert "config key 'task': must be one of fashion-mnist" in errors[0] and "got 'blobs'" in errors[0]
    assert not (tmp_path / "out" / "summary.json").exists()


# --- the contracts, in this process ----------------------------------------------------------
@pytest.fixture
def example_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example package importable by module:callable name, without installing it."""
    monkeypatch.syspath_prepend(str(PLUGIN_SOURCE))


def test_module_path_names_resolve_in_every_registry(example_source: None) -> None:
    # Execute
    pipeline = build_pipeline("arc > arcsim_example_plugin:meamed", f=1)
    aggregate, report = pipeline(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [100.0, -100.0]]))
    entry = ATTACK_REGISTRY.resolve("arcsim_example_plugin:scaled_mean")
    vectors = craft("arcsim_example_plugin:scaled_mean", torch.ones(3, 2), num_byzantine=2, num_workers=5, scale=4.0)
    dataset = load_dataset("arcsim_example_plugin:blobs", seed=0)

    # Assert: the stage carries the name the config wrote; the plugin ran
    assert pipeline.stage_names == ("arc", "arcsim_example_plugin:meamed")
    assert report.stages[1].name == "arcsim_example_plugin:meamed"
    assert aggregate.shape == (2,) and bool(aggregate.abs().max() < 3)  # the outlier is clipped, then left out
    assert entry.origin == "module:callable"
    assert torch.equal(vectors, torch.full((2, 2), 4.0))
    assert dataset.input_shape == (1, 4, 4) and dataset.num_classes == 4
    assert (
        from_dict(
            {
                "task": "arcsim_example_plugin:blobs",
                "model": "logreg",
                "num_byzantine": 1,
                "attack": "arcsim_example_plugin:scaled_mean",
                "pipeline": "arc > arcsim_example_plugin:meamed",
            }
        ).task
        == "arcsim_example_plugin:blobs"
    )


def test_a_rule_plugin_condition_on_n_and_f_is_checked_when_called(example_source: None) -> None:
    pipeline = build_pipeline("arcsim_example_plugin:meamed", f=2)
    with pytest.raises(ValueError, match=r"needs n > 2f, got n = 4, f = 2"):
        pipeline(torch.zeros(4, 3))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "nowhere_module:rule",
            "rule 'nowhere_module:rule': cannot import module 'nowhere_module': "
            "ModuleNotFoundError: No module named 'nowhere_module'",
        ),
        ("arcsim_example_plugin:missing", "module 'arcsim_example_plugin' has no attribute 'missing'"),
        ("arcsim_example_plugin:scaled_mean", "a rule plugin must be an arcsim.robust.Rule"),
    ],
)
def test_a_bad_rule_plugin_is_one_line_naming_it(example_source: None, name: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"pipeline": f"arc > {name}", "num_byzantine": 1})
    assert message in str(caught.value)
    assert str(caught.value).startswith("config key 'pipeline': ")
    assert "\n" not in str(caught.value)


def test_an_unimportable_module_reports_its_own_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a module that raises while importing
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('needs a GPU\\nand more')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    # Execute / Assert
    with pytest.raises(
        PluginError,
        match=r"^attack 'broken_plugin:x': cannot import module 'broken_plugin': "
        r"RuntimeError: needs a GPU and more$",
    ):
        ATTACK_REGISTRY.resolve("broken_plugin:x")


# --- per-stage pipeline parameters -----------------------------------------------------------
def test_per_stage_parameters_match_the_flat_form() -> None:
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 10
    flat, _ = build_pipeline("arc > centered_clip", f=1, tau=5.0)(x)
    staged, _ = build_pipeline("arc > centered_clip", f=1, centered_clip={"tau": 5.0})(x)
    assert torch.equal(flat, staged)


def test_per_stage_parameters_win_over_flat_ones_for_their_stage_only() -> None:
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    both = build_pipeline("bucketing > multi_krum", f=1, s=2, m=1, multi_krum={"m": 2})
    alone = build_pipeline("bucketing > multi_krum", f=1, s=2, m=2)
    assert both._params == ({"s": 2}, {"m": 2})
    assert torch.equal(
        both(x, generator=torch.Generator().manual_seed(0))[0], alone(x, generator=torch.Generator().manual_seed(0))[0]
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"centered_clip": {"tau": 1.0, "beta": 2}}, "stage 'centered_clip' got unexpected parameters ['beta']"),
        ({"centered_clip": 5}, "parameters of stage 'centered_clip' must be a mapping"),
        ({"cwtm": {"tau": 1.0}}, "unexpected parameters ['cwtm']"),
        ({"centered_clip": {"iters": 2}}, "centered_clip needs parameter(s) ['tau']"),
    ],
)
def test_bad_per_stage_parameters_name_the_stage(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"pipeline": "arc > centered_clip", "num_byzantine": 1, "pipeline_params": params})
    assert message in str(caught.value)


# --- the other contracts, with plugins written here ------------------------------------------
PLUGIN_MODULE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from arcsim.attacks import data_attack
    from arcsim.tasks import ModelSpec

    class Logits(nn.Module):
        def __init__(self, *, input_shape, num_classes):
            super().__init__()
            self.fc = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(x, 1))

    logits = ModelSpec(Logits, loss=F.cross_entropy)
    no_loss = Logits

    @data_attack
    def shift(labels, *, num_classes, by=1):
        return (labels + by) % num_classes

    def halves(labels, *, num_workers, alpha, seed):
        return list(torch.arange(labels.shape[0]).tensor_split(num_workers))

    def overlap(labels, *, num_workers, alpha, seed):
        return [torch.arange(2)] * num_workers
""")


@pytest.fixture
def local_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "local_plugins.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "local_plugins"


def test_a_model_declares_its_loss_and_builds_the_same_in_every_call(local_plugins: str) -> None:
    name = f"{local_plugins}:logits"
    a = build_model(name, input_shape=(1, 4, 4), num_classes=3, seed=5)
    b = build_model(name, input_shape=(1, 4, 4), num_classes=3, seed=5)
    assert model_loss(name) is F.cross_entropy
    assert model_loss("cnn") is F.nll_loss  # the built-ins keep theirs
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match=r"must be an arcsim.tasks.ModelSpec\(build, loss\) declaring its loss"):
        build_model(f"{local_plugins}:no_loss", input_shape=(4,), num_classes=2)


def test_a_data_attack_is_a_label_map(local_plugins: str) -> None:
    name = f"{local_plugins}:shift"
    assert is_data_attack(name) and is_data_attack("label_flip") and not is_data_attack("alie")
    assert label_map(name, num_classes=4, by=3)(torch.tensor([0, 1, 2, 3])).tolist() == [3, 0, 1, 2]
    with pytest.raises(ConfigError, match=r"'attack_params': attack 'local_plugins:shift' got unexpected parameters"):
        from_dict({"attack": name, "attack_params": {"size": 2}})
    with pytest.raises(ValueError, match="is a data attack"):
        craft(name, torch.ones(2, 2), num_byzantine=1, num_workers=3)


def test_a_partitioner_plugin_gets_alpha_and_its_shards_are_checked(local_plugins: str) -> None:
    shards = partition(torch.arange(10) % 3, num_workers=3, method=f"{local_plugins}:halves", alpha=None)
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert from_dict({"partitioner": f"{local_plugins}:halves", "alpha": 0.5}).alpha == 0.5
    with pytest.raises(ValueError, match="shard 1 is empty or shares indices with another shard"):
        partition(torch.arange(6), num_workers=2, method=f"{local_plugins}:overlap")


def test_a_rule_declares_kind_condition_and_parameters() -> None:
    @rule(kind="pre-aggregator", condition=lambda n, f: n >= f, requires="n >= f")
    def scale(x: torch.Tensor, *, f: int, by: float, floor: float = 0.0) -> torch.Tensor:
        return x * by + floor

    assert (scale.kind, scale.required, dict(scale.optional), scale.condition) == (
        "pre",
        ("by",),
        {"floor": 0.0},
        "n >= f",
    )
    assert RULE_REGISTRY.resolve("cwtm").origin == "built-in"
    with pytest.raises(ValueError, match="rule kind must be 'pre-aggregator' or 'aggregator', got 'agg-ish'"):
        rule(kind="agg-ish")
