"""Tests of the run config (arcsim/config.py): loading, every validation error, learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest

from arcsim.config import ConfigError, RunConfig, from_dict, load_config, loads_config, with_late_defaults
from arcsim.tasks import PARTITIONER_REGISTRY

REPO = Path(__file__).resolve().parent.parent
# The run configs shipped in configs/ (sweep configs, with a top-level `sweep:` key, are arcsim.sweep's).
CONFIG_FILES = sorted(
    path
    for path in (REPO / "configs").glob("*.yaml")
    if not re.search(r"^sweep:", path.read_text(), flags=re.MULTILINE)
)

# A small valid base (the defaults plus nothing) is RunConfig(); the cases below change one thing.


# --- loading ----------------------------------------------------------------------------------
def test_defaults_load_from_an_empty_mapping_and_an_empty_file() -> None:
    # Prepare / Execute
    from_mapping = from_dict({})
    from_text = loads_config("")
    # Assert
    assert from_mapping == RunConfig()
    assert from_text == RunConfig()
    assert from_mapping.f == from_mapping.num_byzantine == 3
    assert from_mapping.num_workers == 13


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES])
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RunConfig)


def test_the_shipped_configs_include_small() -> None:
    assert REPO / "configs" / "small.yaml" in CONFIG_FILES


def test_load_config_applies_overrides_after_reading(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "c.yaml"
    path.write_text("task: synthetic\nmodel: mlp\nrounds: 7\n")
    # Execute
    config = load_config(path, {"rounds": 3, "seed": 9})
    # Assert
    assert (config.task, config.model, config.rounds, config.seed) == ("synthetic", "mlp", 3, 9)


def test_numbers_are_normalised_to_float() -> None:
    config = from_dict({"lr": 1, "momentum": 0, "alpha": 2, "partitioner": "dirichlet"})
    assert isinstance(config.lr, float) and isinstance(config.momentum, float) and isinstance(config.alpha, float)
    assert config.digest() == from_dict({"lr": 1.0, "momentum": 0.0, "alpha": 2.0, "partitioner": "dirichlet"}).digest()


def test_yaml_round_trip_keeps_the_config_and_its_digest() -> None:
    # Prepare
    config = from_dict(
        {
            "task": "synthetic",
            "model": "logreg",
            "attack": "alie",
            "attack_params": {"tau": 1.5},
            "lr_schedule": "step",
            "lr_milestones": [3, 5],
            "partitioner": "dirichlet",
            "alpha": 0.5,
        }
    )
    # Execute
    again = loads_config(config.to_yaml())
    # Assert
    assert again == config
    assert again.digest() == config.digest()


def test_config_doctests() -> None:
    import doctest

    import arcsim.config

    result = doctest.testmod(arcsim.config)
    assert result.attempted > 0 and result.failed == 0


def test_a_config_recorded_before_keys_were_added_reads_as_today_with_them_at_their_defaults() -> None:
    # Prepare: today's record of a config, and the same run as recorded before augment, schedule, async
    # and speeds existed
    today = from_dict({"task": "synthetic", "model": "mlp", "gamma": 0.5, "partitioner": "gamma_similarity"}).to_dict()
    older = {key: value for key, value in today.items() if key not in ("augment", "schedule", "async", "speeds")}
    # Execute
    completed = with_late_defaults(older)
    # Assert: equal to today's record, the recorded keys first in their order; recorded values are kept, a
    # mutable default is a fresh copy each time, and the record itself is not modified
    assert completed == today and list(completed)[: len(older)] == list(older)
    assert with_late_defaults({**older, "augment": "crop_flip"})["augment"] == "crop_flip"
    assert with_late_defaults(older)["async"] is not with_late_defaults(older)["async"]
    assert "augment" not in older
    assert from_dict(completed).digest() == from_dict(today).digest()


def test_digest_changes_with_any_key() -> None:
    base = RunConfig()
    assert base.digest() == RunConfig().digest()
    assert base.replace(seed=2).digest() != base.digest()
    assert base.replace(lr=0.05).digest() != base.digest()


def test_config_is_frozen() -> None:
    config = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rounds = 5  # type: ignore[misc]


def test_replace_validates() -> None:
    with pytest.raises(ConfigError, match="'rounds'"):
        RunConfig().replace(rounds=0)


def test_declared_f_overrides_num_byzantine() -> None:
    config = from_dict({"num_honest": 5, "num_byzantine": 1, "declared_f": 2})
    assert (config.f, config.num_byzantine, config.num_workers) == (2, 1, 6)


def test_declared_f_may_be_zero_with_byzantine_workers() -> None:
    # An undefended baseline: the pipeline is built with f = 0 (ARC is then the identity).
    config = from_dict({"num_honest": 4, "num_byzantine": 1, "declared_f": 0, "pipeline": "mean"})
    assert config.f == 0


def test_no_byzantine_with_attack_none() -> None:
    config = from_dict({"num_byzantine": 0, "attack": "none"})
    assert (config.num_byzantine, config.f, config.attack) == (0, 0, "none")


# --- unknown keys -----------------------------------------------------------------------------
def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"rouns": 5})
    message = str(caught.value)
    assert "'rouns'" in message
    assert "did you mean 'rounds'" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config("zzzzzz: 1\n")
    message = str(caught.value)
    assert "'zzzzzz'" in message and "did you mean" not in message
    assert "num_byzantine" in message


def test_unknown_key_in_overrides_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 3\n")
    with pytest.raises(ConfigError, match="'sed'.*did you mean 'seed'"):
        load_config(path, {"sed": 1})


# --- types ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_honest", "4"),
        ("num_honest", 4.0),
        ("num_honest", True),
        ("num_byzantine", None),
        ("declared_f", 1.5),
        ("rounds", "ten"),
        ("batch_size", [25]),
        ("eval_every", False),
        ("eval_batch_size", 10.5),
        ("seed", "1"),
    ],
)
def test_integer_keys_reject_other_types(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}': must be an integer"):
        from_dict({key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", "0.1"),
        ("lr", True),
        ("lr", None),
        ("lr", math.nan),
        ("momentum", [0.9]),
        ("weight_decay", "none"),
        ("lr_gamma", {}),
        ("round_deadline", "60s"),
    ],
)
def test_number_keys_reject_other_types(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}': must be a number"):
        from_dict({key: value})


@pytest.mark.parametrize("value", [math.inf, -math.inf])
@pytest.mark.parametrize("key", ["lr", "weight_decay", "lr_gamma", "round_deadline", "momentum"])
def test_number_keys_reject_infinity(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}': must be a finite number"):
        from_dict({key: value})


def test_alpha_rejects_a_string() -> None:
    with pytest.raises(ConfigError, match="'alpha': must be a number"):
        from_dict({"partitioner": "dirichlet", "alpha": "x"})


@pytest.mark.parametrize("key", ["attack_params", "pipeline_params"])
def test_params_must_be_a_mapping(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}': must be a mapping"):
        from_dict({key: [1, 2]})


@pytest.mark.parametrize("value", [5, "0, 10", [1, -1], [True], [1.5]])
def test_lr_milestones_must_be_a_list_of_rounds(value: Any) -> None:
    with pytest.raises(ConfigError, match="'lr_milestones'"):
        from_dict({"lr_milestones": value})


def test_data_root_must_be_a_string() -> None:
    with pytest.raises(ConfigError, match="'data_root': must be a path string"):
        from_dict({"data_root": 5})


# --- ranges -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("num_honest", 0, ">= 1"),
        ("num_byzantine", -1, ">= 0"),
        ("declared_f", -1, ">= 0"),
        ("rounds", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("eval_every", 0, ">= 1"),
        ("eval_batch_size", 0, ">= 1"),
        ("seed", -1, ">= 0"),
        ("lr", 0.0, "> 0.0"),
        ("lr", -0.1, "> 0.0"),
        ("lr_gamma", 0, "> 0.0"),
        ("momentum", -0.1, ">= 0.0"),
        ("momentum", 1.0, "< 1.0"),
        ("weight_decay", -1e-4, ">= 0.0"),
        ("round_deadline", 0, "> 0.0"),
    ],
)
def test_out_of_range_values_are_rejected(key: str, value: float, bound: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({key: value})
    assert str(caught.value) == f"config key {key!r}: must be {bound}, got {value}"


def test_momentum_zero_is_allowed() -> None:
    assert from_dict({"momentum": 0}).momentum == 0.0


# --- choices ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "listed"),
    [
        ("task", "cifar10", "fashion-mnist"),
        ("model", "resnet", "cnn"),
        ("partitioner", "random", "dirichlet"),
        ("attack", "flip", "sign_flip"),
        ("lr_schedule", "linear", "cosine"),
    ],
)
def test_unknown_choice_lists_the_valid_ones(key: str, value: str, listed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({key: value})
    message = str(caught.value)
    assert f"'{key}'" in message and repr(value) in message and listed in message


# --- conditions between keys ------------------------------------------------------------------
def test_dirichlet_needs_alpha() -> None:
    with pytest.raises(ConfigError, match="'alpha': the dirichlet partitioner needs alpha"):
        from_dict({"partitioner": "dirichlet"})


@pytest.mark.parametrize("alpha", [0, -1.0])
def test_dirichlet_alpha_must_be_positive(alpha: float) -> None:
    with pytest.raises(ConfigError, match="'alpha': must be > 0.0"):
        from_dict({"partitioner": "dirichlet", "alpha": alpha})


@pytest.mark.parametrize("partitioner", ["iid", "extreme"])
def test_alpha_is_rejected_without_dirichlet(partitioner: str) -> None:
    with pytest.raises(ConfigError, match=f"'alpha': is only used by the dirichlet partitioner, not '{partitioner}'"):
        from_dict({"partitioner": partitioner, "alpha": 1.0})


@pytest.mark.parametrize("partitioner", ["iid", "extreme", "dirichlet"])
def test_gamma_is_rejected_without_gamma_similarity(partitioner: str) -> None:
    raw: dict[str, Any] = {"partitioner": partitioner, "gamma": 0.5}
    if partitioner == "dirichlet":
        raw["alpha"] = 1.0
    with pytest.raises(
        ConfigError, match=f"'gamma': is only used by the gamma_similarity partitioner, not '{partitioner}'"
    ):
        from_dict(raw)


_HAS_GAMMA_SIMILARITY = "gamma_similarity" in PARTITIONER_REGISTRY.builtins


@pytest.mark.skipif(not _HAS_GAMMA_SIMILARITY, reason="the gamma_similarity partitioner is not registered yet")
def test_gamma_similarity_needs_gamma_in_the_unit_interval() -> None:
    with pytest.raises(ConfigError, match="'gamma': the gamma_similarity partitioner needs gamma"):
        from_dict({"partitioner": "gamma_similarity"})
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=f"'gamma': must be (>= 0.0|<= 1.0), got {bad}"):
            from_dict({"partitioner": "gamma_similarity", "gamma": bad})
    assert from_dict({"partitioner": "gamma_similarity", "gamma": 0}).gamma == 0.0
    assert from_dict({"partitioner": "gamma_similarity", "gamma": 1}).gamma == 1.0


@pytest.mark.parametrize("fraction", [-0.1, 1, 1.5, "x"])
def test_validation_fraction_must_be_in_zero_one(fraction: Any) -> None:
    with pytest.raises(ConfigError, match="'validation_fraction': must be"):
        from_dict({"validation_fraction": fraction})


def test_validation_fraction_is_a_float_in_zero_one() -> None:
    assert from_dict({"validation_fraction": 0}).validation_fraction == 0.0
    assert from_dict({"validation_fraction": 0.2}).validation_fraction == 0.2


def test_new_keys_at_their_defaults_keep_the_digest_of_existing_configs() -> None:
    # The digests below were computed before gamma and validation_fraction existed: run ids and resume checks of
    # recorded run folders must not change when the new keys keep their defaults.
    assert RunConfig().digest() == "9ad06fca7a96a448"
    assert from_dict({"partitioner": "dirichlet", "alpha": 0.5, "seed": 3}).digest() == "41f61c80dbcdf2b1"
    assert from_dict({"validation_fraction": 0.2}).digest() != RunConfig().digest()
    assert loads_config(from_dict({"validation_fraction": 0.2}).to_yaml()).validation_fraction == 0.2


def test_attack_none_with_byzantine_workers_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'attack': num_byzantine = 2 needs an attack other than 'none'"):
        from_dict({"num_byzantine": 2, "attack": "none"})


@pytest.mark.parametrize(
    ("raw", "f", "n"),
    [
        ({"num_honest": 2, "num_byzantine": 2}, 2, 4),
        ({"num_honest": 3, "num_byzantine": 4}, 4, 7),
        ({"num_honest": 5, "num_byzantine": 1, "declared_f": 3}, 3, 6),
    ],
)
def test_f_must_be_below_half_of_the_workers(raw: dict[str, Any], f: int, n: int) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({**raw, "pipeline": "mean"})
    assert f"f = {f} must be below half of the {n} workers (2f < n)" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Multi-Krum at the protocol's f = 9 beside 10 honest workers: n = 19 is not > 2f + 2 = 20
        ({"num_honest": 10, "num_byzantine": 9, "pipeline": "arc > nnm > multi_krum"}, "needs n > 2f + 2"),
        ({"num_honest": 3, "num_byzantine": 2, "pipeline": "krum"}, "needs n > 2f + 2"),
        # Bucketing leaves ceil(5 / 2) = 3 rows, too few for CWTM against f = 2
        ({"num_honest": 3, "num_byzantine": 2, "pipeline": "bucketing > cwtm", "pipeline_params": {"s": 2}}, "2f < n"),
    ],
)
def test_a_pipeline_that_cannot_aggregate_every_workers_vectors_is_rejected(raw: dict[str, Any], expected: str) -> None:
    # Such a run would skip every round: the config is refused at load time, naming the reason
    with pytest.raises(ConfigError) as caught:
        from_dict({**raw, "attack": "sign_flip"})
    assert str(caught.value).startswith("config key 'pipeline': cannot aggregate the vectors of all")
    assert expected in str(caught.value)


def test_the_same_pipeline_passes_where_n_allows_it() -> None:
    assert from_dict({"num_honest": 10, "num_byzantine": 7, "pipeline": "arc > nnm > multi_krum"}).f == 7


@pytest.mark.parametrize(
    ("pipeline", "params", "expected"),
    [
        ("arc > nope", {}, "unknown rule 'nope'"),
        ("", {}, "non-empty string"),
        (5, {}, "non-empty string"),
        ("arc > nnm", {}, "'pipeline'"),
        ("arc > nnm > cwtm", {"bogus": 1}, "unexpected parameters ['bogus']"),
    ],
)
def test_bad_pipeline_spec_is_rejected(pipeline: Any, params: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"pipeline": pipeline, "pipeline_params": params})
    message = str(caught.value)
    assert message.startswith("config key 'pipeline':")
    assert expected in message


@pytest.mark.parametrize(
    ("attack", "params", "expected"),
    [
        ("alie", {"bogus": 1.0}, "unexpected parameters ['bogus']"),
        ("sign_flip", {"tau": 1.0}, "unexpected parameters ['tau']"),
        ("foe", {"tau": "big"}, "tau"),
        ("mimic", {"index": 10}, "index"),
        ("label_flip", {"tau": 1.0}, "takes no attack_params"),
    ],
)
def test_bad_attack_params_are_rejected_when_loading(attack: str, params: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"attack": attack, "attack_params": params})
    message = str(caught.value)
    assert message.startswith("config key 'attack_params':")
    assert expected in message


def test_attack_none_takes_no_attack_params() -> None:
    with pytest.raises(ConfigError, match="'attack_params': .*takes no attack_params"):
        from_dict({"num_byzantine": 0, "attack": "none", "attack_params": {"tau": 1.0}})


def test_good_attack_params_are_kept() -> None:
    config = from_dict({"attack": "foe", "attack_params": {"tau": 0.5}})
    assert config.attack_params == {"tau": 0.5}


# --- files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["- rounds\n- 5\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match="my.yaml: a config must be a mapping of keys to values"):
        loads_config(text, source="my.yaml")


def test_from_dict_rejects_a_non_mapping() -> None:
    with pytest.raises(ConfigError, match="a config must be a mapping of keys to values, got list"):
        from_dict([("rounds", 5)])  # type: ignore[arg-type]


def test_invalid_yaml_is_rejected() -> None:
    with pytest.raises(ConfigError, match="my.yaml: not valid YAML"):
        loads_config("rounds: [1, 2\n", source="my.yaml")


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)


def test_unreadable_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read config file {tmp_path}"):
        load_config(tmp_path)  # a directory


# --- learning-rate schedules --------------------------------------------------------------------
def test_constant_schedule() -> None:
    config = from_dict({"lr": 0.2, "rounds": 10})
    assert [config.lr_at(t) for t in (0, 5, 9)] == [0.2, 0.2, 0.2]


def test_step_schedule_multiplies_at_each_milestone() -> None:
    # Prepare: lr 0.4, gamma 0.5, milestones 2 and 4 -> 0.4, 0.4, 0.2, 0.2, 0.1, 0.1
    config = from_dict({"lr": 0.4, "lr_schedule": "step", "lr_milestones": [4, 2], "lr_gamma": 0.5, "rounds": 6})
    # Execute
    rates = [config.lr_at(t) for t in range(6)]
    # Assert
    assert rates == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1, 0.1])


def test_step_schedule_without_milestones_is_constant() -> None:
    config = from_dict({"lr": 0.3, "lr_schedule": "step"})
    assert config.lr_at(0) == config.lr_at(150) == 0.3


def test_cosine_schedule() -> None:
    # lr_t = lr / 2 * (1 + cos(pi t / T)), T = 8: t = 0 -> lr, t = 4 -> lr / 2, t = 2 -> lr (2 + sqrt 2) / 4
    config = from_dict({"lr": 0.8, "lr_schedule": "cosine", "rounds": 8})
    assert config.lr_at(0) == pytest.approx(0.8)
    assert config.lr_at(4) == pytest.approx(0.4)
    assert config.lr_at(2) == pytest.approx(0.8 * (2 + math.sqrt(2)) / 4)
    assert config.lr_at(7) > 0.0


# --- plugins and per-stage pipeline parameters ------------------------------------------------
def test_pipeline_params_take_per_stage_mappings_beside_flat_ones() -> None:
    config = from_dict(
        {
            "pipeline": "bucketing > centered_clip",
            "num_byzantine": 1,
            "pipeline_params": {"s": 2, "centered_clip": {"tau": 5, "iters": 2}},
        }
    )
    assert config.pipeline_params == {"s": 2, "centered_clip": {"tau": 5, "iters": 2}}
    assert loads_config(config.to_yaml()) == config


def test_a_per_stage_parameter_the_stage_does_not_take_names_the_stage() -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict(
            {
                "pipeline": "bucketing > centered_clip",
                "num_byzantine": 1,
                "pipeline_params": {"s": 2, "centered_clip": {"tau": 5, "s": 3}},
            }
        )
    assert str(caught.value).startswith("config key 'pipeline': ")
    assert "stage 'centered_clip' got unexpected parameters ['s']" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("task", "no_such_lab.data:blobs", "dataset 'no_such_lab.data:blobs': cannot import module 'no_such_lab.data'"),
        ("model", "no_such_lab:net", "model 'no_such_lab:net': cannot import module 'no_such_lab'"),
        ("attack", "no_such_lab:evil", "attack 'no_such_lab:evil': cannot import module 'no_such_lab'"),
        ("partitioner", "no_such_lab:split", "partitioner 'no_such_lab:split': cannot import module 'no_such_lab'"),
        ("pipeline", "arc > no_such_lab:rule", "rule 'no_such_lab:rule': cannot import module 'no_such_lab'"),
    ],
)
def test_an_unimportable_plugin_is_one_line_naming_the_key_the_module_and_the_exception(
    key: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({key: value, "num_byzantine": 1})
    text = str(caught.value)
    assert text.startswith(f"config key {key!r}: ") and message in text
    assert "ModuleNotFoundError: No module named 'no_such_lab" in text and "\n" not in text


def test_plugin_names_are_listed_as_an_alternative_to_the_built_ins() -> None:
    with pytest.raises(ConfigError, match=r"must be one of none, sign_flip, .*label_flip or package.module:callable"):
        from_dict({"attack": "flip"})
