"""The run config: one validated, frozen object built from YAML.

Unknown keys are rejected with a message naming the key; every value is type- and range-checked
when the config is loaded, so a bad config fails before any process starts. Names of rules, attacks,
datasets, models and partitioners are resolved here too (built-in, entry point or ``module:callable``,
see arcsim.registry): every process that loads a config, a worker at Join included, imports the
plugins it names or fails with one line naming the module and the exception.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import arcsim.attacks as _attacks
from arcsim.registry import PluginError, Registry, UnknownName
from arcsim.robust import RULE_REGISTRY, build_pipeline
from arcsim.tasks import DATASET_REGISTRY, MODEL_REGISTRY, PARTITIONER_REGISTRY
from arcsim.tasks.augment import AUGMENTATIONS


class ConfigError(ValueError):
    """A config that cannot be run; the message says which key and why."""


# The built-in names come from the libraries that implement them: one concept, one list (plugins add to them).
ATTACKS = ("none", *_attacks.ATTACKS, *_attacks.DATA_ATTACKS)
LR_SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Two runs with equal configs give the same final parameters."""

    task: str = "fashion-mnist"
    model: str = "cnn"
    num_honest: int = 10
    num_byzantine: int = 3
    declared_f: int | None = None  # f the pipeline defends against; defaults to num_byzantine
    attack: str = "alie"
    attack_params: dict[str, Any] = field(default_factory=dict)
    pipeline: str = "arc > nnm > cwtm"
    pipeline_params: dict[str, Any] = field(default_factory=dict)
    partitioner: str = "extreme"
    alpha: float | None = None  # Dirichlet concentration (partitioner: dirichlet)
    gamma: float | None = None  # share of the data dealt uniformly (partitioner: gamma_similarity)
    validation_fraction: float = 0.0  # share of the training set held out for validation, before partitioning
    augment: str = "none"  # training-batch augmentation (arcsim/tasks/augment.py): none or crop_flip
    rounds: int = 200
    lr: float = 0.1
    lr_schedule: str = "constant"
    lr_milestones: list[int] = field(default_factory=list)  # rounds where a step schedule multiplies lr
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 25
    eval_every: int = 20
    eval_batch_size: int = 1000
    seed: int = 1
    round_deadline: float = 60.0  # seconds a round stays open for submissions
    data_root: str | None = None
    # sync: rounds (every vector on the current model); async: buffered, bounded-staleness updates, with
    # its settings in the YAML key "async" (a Python keyword cannot name a field: async_ here) and the
    # workers' compute times in "speeds" (arcsim/schedule.py)
    schedule: str = "sync"
    async_: dict[str, Any] = field(default_factory=dict)
    speeds: dict[str, Any] = field(default_factory=dict)

    @property
    def f(self) -> int:
        """The f the pipeline is built with: declared_f, or num_byzantine when unset; under ``schedule:
        async`` the Byzantine vectors it must tolerate per window (``async.window_f``, default that f)."""
        declared = self.num_byzantine if self.declared_f is None else self.declared_f
        if self.schedule == "async":
            return int(self.async_.get("window_f", declared))
        return declared

    @property
    def buffer_size(self) -> int:
        """``schedule: async``: the vectors (from as many workers) an update aggregates; default num_honest."""
        return int(self.async_.get("buffer_size", self.num_honest))

    @property
    def staleness_bound(self) -> int:
        """``schedule: async``: a vector more versions behind the model than this is refused; default 0."""
        return int(self.async_.get("staleness_bound", 0))

    @property
    def staleness_weighting(self) -> str:
        """``schedule: async``: none, inverse_sqrt or polynomial (arcsim.schedule.staleness_weight); default none."""
        return str(self.async_.get("staleness_weighting", "none"))

    @property
    def staleness_exponent(self) -> float:
        """``schedule: async``: the exponent of ``staleness_weighting: polynomial``; default 0.5."""
        return float(self.async_.get("staleness_exponent", 0.5))

    @property
    def byzantine_timing(self) -> str:
        """``schedule: async``: when omniscient attackers craft and land (arrival, start, hold); default arrival."""
        return str(self.async_.get("byzantine_timing", "arrival"))

    @property
    def num_workers(self) -> int:
        return self.num_honest + self.num_byzantine

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML keys (``async_`` as ``async``)."""
        return {_YAML_KEYS.get(key, key): value for key, value in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short stable id of the config (used as the run id).

        Keys added after run folders existed are left out while they hold their defaults, so a config
        that does not use them keeps the digest (run id, resume check) it had before they were added.
        """
        data = {key: value for key, value in self.to_dict().items() if _LATE_DEFAULTS.get(key, _UNSET) != value}
        text = canonical_json(data)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def lr_at(self, round_: int) -> float:
        """The learning rate of round ``round_`` (0-based) under the configured schedule."""
        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** sum(1 for m in self.lr_milestones if round_ >= m)
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * round_ / self.rounds))
        return self.lr

    def replace(self, **changes: Any) -> RunConfig:
        return from_dict({**self.to_dict(), **changes})


_YAML_KEYS = {"async_": "async"}  # field name -> the config key that names it
_FIELDS = {_YAML_KEYS.get(f.name, f.name): f for f in dataclasses.fields(RunConfig)}  # by config key
CONFIG_KEYS: tuple[str, ...] = tuple(_FIELDS)
"""The config's keys, in order (as YAML and to_dict name them)."""
ASYNC_KEYS = (
    "buffer_size",
    "staleness_bound",
    "staleness_weighting",
    "staleness_exponent",
    "window_f",
    "byzantine_timing",
)
BYZANTINE_TIMINGS = ("arrival", "start", "hold")  # when an asynchronous run's omniscient attackers craft and land
SCHEDULES = ("sync", "async")
# Keys added to RunConfig after run folders were recorded, with the defaults that digest() leaves out.
_LATE_DEFAULTS: dict[str, Any] = {
    "gamma": None,
    "validation_fraction": 0.0,
    "augment": "none",
    "schedule": "sync",
    "async": {},
    "speeds": {},
}
_UNSET = object()


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: {message}")


def _int(data: dict[str, Any], key: str, *, minimum: int) -> None:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise _fail(key, f"must be >= {minimum}, got {value}")


def _number(
    data: dict[str, Any],
    key: str,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _fail(key, f"must be a number, got {value!r}")
    if not math.isfinite(value):  # e.g. YAML .inf: an infinite lr or deadline breaks the run later
        raise _fail(key, f"must be a finite number, got {value!r}")
    data[key] = float(value)
    if value < low or (low_open and value == low):
        raise _fail(key, f"must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise _fail(key, f"must be {'<' if high_open else '<='} {high}, got {value}")


def _choice(data: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
    value = data[key]
    if value not in choices:
        raise _fail(key, f"must be one of {', '.join(choices)}; got {value!r}")


def _resolve(data: dict[str, Any], key: str, registry: Registry[Any], *, extra: tuple[str, ...] = ()) -> None:
    """Resolve the name under ``key`` (importing a plugin), or fail naming the key and the valid names."""
    value = data[key]
    if value in extra:
        return
    try:
        registry.resolve(value)
    except UnknownName:
        plugins = registry.names()[len(registry.builtins) :]
        raise _fail(
            key,
            f"must be one of {', '.join((*extra, *registry.builtins))}"
            f"{', plugins ' + ', '.join(plugins) if plugins else ''} or package.module:callable; "
            f"got {value!r}",
        ) from None
    except PluginError as error:
        raise _fail(key, str(error)) from None


def _check_attack_params(config: RunConfig) -> None:
    """Fail at load time, not in round 0, on attack_params the attack does not take or accept.

    The attack is crafted once on a tiny stand-in ``(num_honest, 2)`` matrix of honest vectors
    with the run's worker counts, so its own checks (names and values, e.g. a negative ``tau``,
    a ``mimic`` index outside the honest workers) run here and give the attack's message.
    """
    attack, params = config.attack, config.attack_params
    key = (attack, canonical_json(params), config.num_honest, config.num_byzantine)
    if key in _ATTACK_CHECKED:
        return
    _check_attack_params_once(config)
    if attack == "none" or _attacks.ATTACK_REGISTRY.is_builtin(attack):  # a plugin may change
        _ATTACK_CHECKED.add(key)


def _check_attack_params_once(config: RunConfig) -> None:
    attack, params = config.attack, config.attack_params
    if attack == "none":
        if params:
            raise _fail("attack_params", f"attack {attack!r} takes no attack_params, got {sorted(params)}")
        return
    if _attacks.is_data_attack(attack):
        try:
            _attacks.label_map(attack, num_classes=2, **params)
        except ValueError as error:
            raise _fail("attack_params", str(error)) from None
        return
    honest = torch.arange(2.0 * config.num_honest).reshape(config.num_honest, 2)
    try:
        _attacks.craft(
            attack,
            honest,
            num_byzantine=config.num_byzantine,
            num_workers=config.num_workers,
            aggregate=lambda x: x.mean(dim=0),
            generator=torch.Generator().manual_seed(0),
            state=_attacks.attack_state(attack, **params),
            **params,
        )
    except (ValueError, TypeError) as error:
        raise _fail("attack_params", str(error)) from None


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a mapping and build a RunConfig; raises ConfigError naming the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    for key in raw:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(_FIELDS)}")
    data = {**RunConfig().to_dict(), **raw}
    _resolve(data, "task", DATASET_REGISTRY)
    _resolve(data, "model", MODEL_REGISTRY)
    _int(data, "num_honest", minimum=1)
    _int(data, "num_byzantine", minimum=0)
    if data["declared_f"] is not None:
        _int(data, "declared_f", minimum=0)
    _resolve(data, "attack", _attacks.ATTACK_REGISTRY, extra=("none",))
    for key in ("attack_params", "pipeline_params"):
        if not isinstance(data[key], dict):
            raise _fail(key, f"must be a mapping, got {data[key]!r}")
        data[key] = dict(data[key])
    if data["num_byzantine"] > 0 and data["attack"] == "none":
        raise _fail("attack", f"num_byzantine = {data['num_byzantine']} needs an attack other than 'none'")
    _resolve(data, "partitioner", PARTITIONER_REGISTRY)
    if data["partitioner"] == "dirichlet":
        if data["alpha"] is None:
            raise _fail("alpha", "the dirichlet partitioner needs alpha > 0")
        _number(data, "alpha", low=0.0, low_open=True)
    elif not PARTITIONER_REGISTRY.is_builtin(data["partitioner"]):
        if data["alpha"] is not None:  # a plugin partitioner receives alpha as it is given
            _number(data, "alpha", low=0.0, low_open=True)
    elif data["alpha"] is not None:
        raise _fail("alpha", f"is only used by the dirichlet partitioner, not {data['partitioner']!r}")
    if data["partitioner"] == "gamma_similarity":
        if data["gamma"] is None:
            raise _fail("gamma", "the gamma_similarity partitioner needs gamma in [0, 1]")
        _number(data, "gamma", low=0.0, high=1.0)
    elif not PARTITIONER_REGISTRY.is_builtin(data["partitioner"]):
        if data["gamma"] is not None:  # a plugin partitioner receives gamma as it is given
            _number(data, "gamma", low=0.0, high=1.0)
    elif data["gamma"] is not None:
        raise _fail("gamma", f"is only used by the gamma_similarity partitioner, not {data['partitioner']!r}")
    _number(data, "validation_fraction", low=0.0, high=1.0, high_open=True)
    _int(data, "rounds", minimum=1)
    _number(data, "lr", low=0.0, low_open=True)
    _choice(data, "lr_schedule", LR_SCHEDULES)
    _choice(data, "augment", AUGMENTATIONS)
    if not isinstance(data["lr_milestones"], list) or not all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in data["lr_milestones"]
    ):
        raise _fail("lr_milestones", f"must be a list of non-negative round numbers, got {data['lr_milestones']!r}")
    _number(data, "lr_gamma", low=0.0, low_open=True)
    _number(data, "momentum", low=0.0, high=1.0, high_open=True)
    _number(data, "weight_decay", low=0.0)
    _int(data, "batch_size", minimum=1)
    _int(data, "eval_every", minimum=1)
    _int(data, "eval_batch_size", minimum=1)
    _int(data, "seed", minimum=0)
    _number(data, "round_deadline", low=0.0, low_open=True)
    if data["data_root"] is not None and not isinstance(data["data_root"], str):
        raise _fail("data_root", f"must be a path string, got {data['data_root']!r}")
    _check_schedule(data)
    config = RunConfig(**{_FIELD_NAMES.get(key, key): value for key, value in data.items()})
    n = config.num_workers
    try:
        pipeline = build_pipeline(config.pipeline, f=config.f, **config.pipeline_params)
    except ValueError as error:
        raise _fail("pipeline", str(error)) from None
    if config.schedule == "async":
        n = config.buffer_size  # the pipeline sees one window of vectors
        if 2 * config.f >= n:
            raise _fail("async", f"window_f = {config.f} must be below half of the buffer's {n} vectors (2f < K)")
    elif 2 * config.f >= n:
        raise _fail("declared_f", f"f = {config.f} must be below half of the {n} workers (2f < n)")
    _check_pipeline_applies(config, pipeline)
    _check_attack_params(config)
    return config


_FIELD_NAMES = {key: name for name, key in _YAML_KEYS.items()}


def _check_schedule(data: dict[str, Any]) -> None:
    """``schedule``, its ``async`` settings and the ``speeds`` (only with ``schedule: async``)."""
    from arcsim.schedule import STALENESS_WEIGHTINGS, check_speed

    _choice(data, "schedule", SCHEDULES)
    for key in ("async", "speeds"):
        if not isinstance(data[key], dict):
            raise _fail(key, f"must be a mapping, got {data[key]!r}")
        if data[key] and data["schedule"] != "async":
            raise _fail(key, "is only used with schedule: async")
        data[key] = dict(data[key])  # the caller's mapping is never changed
    settings, speeds = data["async"], data["speeds"]
    unknown = sorted(set(settings) - set(ASYNC_KEYS))
    if unknown:
        raise _fail("async", f"unknown keys {unknown}; valid: {', '.join(ASYNC_KEYS)}")
    num_workers = data["num_honest"] + data["num_byzantine"]
    if "buffer_size" in settings:
        value = settings["buffer_size"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_workers:
            raise _fail("async", f"buffer_size must be an int in [1, {num_workers}] (the workers), got {value!r}")
    for key in ("staleness_bound", "window_f"):
        value = settings.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail("async", f"{key} must be an int >= 0, got {value!r}")
    weighting = settings.get("staleness_weighting", "none")
    if weighting not in STALENESS_WEIGHTINGS:
        raise _fail("async", f"staleness_weighting must be one of {', '.join(STALENESS_WEIGHTINGS)}, got {weighting!r}")
    if "staleness_exponent" in settings:
        value = settings["staleness_exponent"]
        if weighting != "polynomial":
            raise _fail("async", "staleness_exponent is only used by staleness_weighting: polynomial")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise _fail("async", f"staleness_exponent must be a positive number, got {value!r}")
    timing = settings.get("byzantine_timing", "arrival")
    if timing not in BYZANTINE_TIMINGS:
        raise _fail("async", f"byzantine_timing must be one of {', '.join(BYZANTINE_TIMINGS)}, got {timing!r}")
    unknown = sorted(set(speeds) - {"honest", "byzantine"})
    if unknown:
        raise _fail("speeds", f"unknown roles {unknown}; valid: honest, byzantine")
    for role, spec in speeds.items():
        try:
            speeds[role] = check_speed(role, spec)
        except ValueError as error:
            raise _fail("speeds", str(error)) from None


def _check_pipeline_applies(config: RunConfig, pipeline: Any) -> None:
    """Fail at load time when the pipeline cannot run on the vectors of all the run's workers (e.g.
    Multi-Krum needs n > 2f + 2): such a run would skip every round. A tiny (n, 2) stand-in goes
    through the pipeline, so every stage's condition on its own n is checked (under ``schedule: async``,
    the n of a window: buffer_size)."""
    n = config.buffer_size if config.schedule == "async" else config.num_workers
    key = (config.pipeline, canonical_json(config.pipeline_params), config.f, n)
    if key in _APPLIES:
        return
    try:
        pipeline(torch.arange(2.0 * n).reshape(n, 2), generator=torch.Generator().manual_seed(0))
    except ValueError as error:
        raise _fail("pipeline", f"cannot aggregate the vectors of all {n} workers: {error}") from None
    if all(RULE_REGISTRY.is_builtin(name) for name in pipeline.stage_names):  # a plugin may change
        _APPLIES.add(key)


def with_late_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded config (a run's summary.json or config.yaml) with the keys added to RunConfig since it was
    written at their defaults, so that it compares, groups and reports like the same config written today.

    >>> sorted(set(with_late_defaults({"task": "synthetic"})) - {"task"}) == sorted(_LATE_DEFAULTS)
    True
    """
    missing = {key: copy.deepcopy(value) for key, value in _LATE_DEFAULTS.items() if key not in recorded}
    return {**recorded, **missing}


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys: equal parameter dicts give equal strings, usable as keys."""
    return json.dumps(value, sort_keys=True, default=str)


# Validations already passed, by what they depend on: a sweep validates thousands of configs that
# share a few pipelines and attacks (the optimal attacks' check runs a whole line search).
_APPLIES: set[tuple[Any, ...]] = set()
_ATTACK_CHECKED: set[tuple[Any, ...]] = set()


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config file; ``overrides`` replace keys after reading."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    return loads_config(text, source=str(path), overrides=overrides)


def loads_config(text: str, *, source: str = "<string>", overrides: dict[str, Any] | None = None) -> RunConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys to values")
    return from_dict({**raw, **(overrides or {})})
