"""vqlog.config: one validated Config, the log's names in and out, clear errors naming the key."""

import dataclasses
import math

import pytest

from vqlog.config import Config, known_keys, load_config_file, parse_overrides
from vqlog.errors import ConfigError, UserError


def test_defaults_build_and_are_consistent():
    cfg = Config()
    assert cfg.window % cfg.downsample == 0
    assert cfg.codes_per_window == cfg.window // cfg.downsample
    assert cfg.d_state % 2 == 0 and cfg.lr > 0


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"En-De": "s4d-all"}, {"en_de": "s4d-all"}),
        ({"en_de": "s4d-all"}, {"en_de": "s4d-all"}),
        ({"BN": "no"}, {"BN": False}),
        ({"BN": "yes"}, {"BN": True}),
        ({"BN": "Off"}, {"BN": False}),
        ({"BN": False}, {"BN": False}),
        ({"lr": "1e-3"}, {"lr": 1e-3}),  # YAML 1.1 reads 1e-3 (no dot) as a string
        ({"lr": 1}, {"lr": 1.0}),
        ({"batch": 16.0}, {"batch": 16}),
        ({"MLP": "linear", "quantizer": "fsq"}, {"MLP": "linear", "quantizer": "fsq"}),
        ({"resample_hz": None}, {"resample_hz": None}),
        ({"window": 64, "downsample": 8}, {"window": 64, "downsample": 8}),
    ],
)
def test_from_mapping_accepts_log_and_field_names(values, expected):
    cfg = Config.from_mapping(values)
    for name, value in expected.items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value)


def test_from_mapping_starts_from_base():
    base = Config(batch=8)
    assert Config.from_mapping({"lr": 1e-4}, base=base) == Config(batch=8, lr=1e-4)


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate'") as exc:
        Config.from_mapping({"learning_rate": 1e-3})
    assert "lr" in str(exc.value) and "En-De" in str(exc.value)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"batch": "x"}, "batch"),
        ({"batch": 1.5}, "batch"),
        ({"batch": True}, "batch"),
        ({"BN": "maybe"}, "BN"),
        ({"BN": 1}, "BN"),
        ({"lr": "fast"}, "lr"),
        ({"lr": None}, "lr"),
        ({"MLP": 3}, "MLP"),
        ({"En-De": None}, "En-De"),
    ],
)
def test_wrong_types_are_errors_that_name_the_key(values, key):
    with pytest.raises(ConfigError) as exc:
        Config.from_mapping(values)
    assert str(exc.value).startswith(key)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"lr": 0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"lr": "nan"}, "lr"),
        ({"batch": 0}, "batch"),
        ({"iteration": -1}, "iteration"),
        ({"d_state": 7}, "d_state"),
        ({"d_state": 0}, "d_state"),
        ({"embedding_num": 1}, "embedding_num"),
        ({"window": 30, "downsample": 4}, "window"),
        ({"downsample": 3}, "downsample"),
        ({"quantizer": "rvq"}, "quantizer"),
        ({"MLP": "gelu"}, "MLP"),
        ({"En-De": "transformer"}, "En-De"),
        ({"standardize": "global"}, "standardize"),
        ({"dropout": 1.0}, "dropout"),
        ({"commitment": -0.1}, "commitment"),
        ({"commitment": "nan"}, "commitment"),
        ({"grad_clip": math.nan}, "grad_clip"),
        ({"weight_decay": math.inf}, "weight_decay"),
        ({"resample_hz": 0}, "resample_hz"),
        ({"resample_hz": math.inf}, "resample_hz"),
        ({"batch": math.inf}, "batch"),
        ({"batch": math.nan}, "batch"),
    ],
)
def test_bad_values_are_config_errors_that_name_the_key(values, key):
    with pytest.raises(ConfigError) as exc:
        Config.from_mapping(values)
    assert key in str(exc.value)
    assert isinstance(exc.value, UserError)  # the CLI turns it into one Error: line, exit 2


def test_to_params_uses_log_names_and_round_trips():
    cfg = Config(batch=8, lr=3e-4, BN=False, MLP="linear", quantizer="fsq", resample_hz=None)
    params = cfg.to_params()
    assert "En-De" in params and "en_de" not in params
    assert set(params) == set(known_keys())
    for key in ("batch", "lr", "embedding_dim", "embedding_num", "iteration", "BN", "MLP", "En-De"):
        assert key in params
    assert Config.from_mapping(params) == cfg


@pytest.mark.parametrize(
    "items, expected",
    [
        ([], {}),
        (["lr=1e-3"], {"lr": "1e-3"}),  # a YAML scalar; from_mapping turns it into a float
        (["lr=0.001", "batch=16"], {"lr": 0.001, "batch": 16}),
        (["BN=no"], {"BN": False}),
        (["En-De=s4d-all"], {"En-De": "s4d-all"}),
        ([" MLP = linear"], {"MLP": "linear"}),
        (["resample_hz=null"], {"resample_hz": None}),
        (["resample_hz="], {"resample_hz": None}),
        (["quantizer=vq", "quantizer=fsq"], {"quantizer": "fsq"}),  # last one wins
        (["name=a=b"], {"name": "a=b"}),
        (["x=[1"], {"x": "[1"}),  # not valid YAML: kept as the raw string
    ],
)
def test_parse_overrides(items, expected):
    assert parse_overrides(items) == expected


def test_parse_overrides_feed_from_mapping():
    cfg = Config.from_mapping(parse_overrides(["lr=1e-3", "BN=no", "batch=4"]))
    assert (cfg.lr, cfg.BN, cfg.batch) == (1e-3, False, 4)


@pytest.mark.parametrize("item", ["lr", "=3", " =3", ""])
def test_parse_overrides_without_key_or_equals_is_an_error(item):
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides([item])


def test_load_config_file_reads_the_logs_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch: 16\nlr: 1e-3\nBN: no\nMLP: linear\nEn-De: s4d-all\n")
    cfg = Config.from_mapping(load_config_file(path))
    assert (cfg.batch, cfg.lr, cfg.BN, cfg.MLP, cfg.en_de) == (16, 1e-3, False, "linear", "s4d-all")


def test_load_config_file_empty_is_no_changes(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config_file(path) == {}


@pytest.mark.parametrize(
    "text, match",
    [
        ("batch: [1, 2\n", "not valid YAML"),
        ("- batch\n- lr\n", "must hold a mapping"),
        ("just a string\n", "must hold a mapping"),
    ],
)
def test_load_config_file_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as exc:
        load_config_file(path)
    assert "bad.yaml" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_load_config_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config_file(tmp_path / "nope.yaml")
