"""Sweep specs: every bundled spec validates and suggests on a real Optuna trial; seed.yaml holds the
log's Seq1-Seq3; every kind of bad spec is a ConfigError whose message names the key."""

import textwrap

import optuna
import pytest

from vqlog.config import Config
from vqlog.errors import ConfigError
from vqlog.study.spec import bundled_specs, load_sweep, resolve_spec_path

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The research log's table (seed/VQ-log.en.md), under the log's names; iteration is the budget's.
LOG_SEQ = [
    {"batch": 64, "lr": 1e-3, "embedding_dim": 512, "embedding_num": 256, "BN": False, "MLP": "relu",
     "En-De": "s4d-all"},
    {"batch": 64, "lr": 1e-3, "embedding_dim": 512, "embedding_num": 512, "BN": False, "MLP": "relu",
     "En-De": "s4d-all"},
    {"batch": 128, "lr": 1e-3, "embedding_dim": 512, "embedding_num": 256, "BN": True, "MLP": "linear",
     "En-De": "s4d-all"},
]


def field(cfg: Config, log_name: str):
    return cfg.to_params()[log_name]


# ----------------------------------------------------------------------------- bundled specs


def test_bundled_specs_are_the_shipped_files():
    assert bundled_specs() == ["baseline", "gpu", "quantizers", "seed", "smoke"]


@pytest.mark.parametrize("name", bundled_specs())
def test_bundled_spec_validates_and_suggests(name):
    spec = load_sweep(name)
    assert spec.name == name
    assert resolve_spec_path(f"{name}.yaml") == resolve_spec_path(name)
    study = optuna.create_study(directions=spec.directions, sampler=spec.make_sampler(seed=0),
                                pruner=spec.make_pruner())
    for _ in range(3):
        trial = study.ask()
        cfg = spec.suggest(trial, seed=7)
        assert set(trial.params) == {p.name for p in spec.space}
        for p in spec.space:
            value = trial.params[p.name]
            assert p.contains(value)
            assert field(cfg, p.name) == value
        for key, value in spec.fixed:
            assert getattr(cfg, key) == value
        assert (cfg.iteration, cfg.eval_every, cfg.seed) == (spec.iteration, spec.eval_every, 7)
        study.tell(trial, [1.0] * len(spec.directions))


@pytest.mark.parametrize("name", [n for n in bundled_specs() if load_sweep(n).enqueue])
def test_enqueued_rows_come_back_from_suggest(name):
    spec = load_sweep(name)
    study = optuna.create_study(directions=spec.directions, sampler=spec.make_sampler(seed=0))
    for row in spec.enqueue:
        study.enqueue_trial(row)
    for row in spec.enqueue:
        cfg = spec.suggest(study.ask())
        assert {k: field(cfg, k) for k in row} == row


@pytest.mark.parametrize("name", ["seed", "gpu"])
def test_enqueued_rows_are_the_logs_seq1_to_seq3(name):
    assert list(load_sweep(name).enqueue) == LOG_SEQ


# -------------------------------------------------------------------------------- bad specs

GOOD = """\
name: t
data: {source: synthetic}
budget: {iteration: 20, eval_every: 10}
fixed: {d_model: 8, window: 64}
space:
  batch: [8, 16]
  lr: {type: float, low: 1e-4, high: 1e-2, log: true}   # 1e-4 without a dot: a YAML string
  BN: [yes, no]
enqueue:
  - {batch: 8, lr: 1.0e-3, BN: no}
"""


def write(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_spec_loads(tmp_path):
    spec = load_sweep(str(write(tmp_path, GOOD)))
    assert [p.name for p in spec.space] == ["batch", "lr", "BN"]
    lr = spec.space[1]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-4, 1e-2, True)
    assert spec.enqueue == ({"batch": 8, "lr": 1e-3, "BN": False},)
    assert dict(spec.fixed) == {"d_model": 8, "window": 64}


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new)


def search(lines: str, text: str = GOOD) -> str:
    """`text` with more `space:` entries."""
    return edit("  BN: [yes, no]\n", "  BN: [yes, no]\n" + lines, text)


BAD = {
    # case: (spec text, words the message must contain)
    "yaml syntax": ("name: [t\nspace: {", ["not valid YAML"]),
    "top level list": ("- name: t\n- space: {}\n", ["mapping", "list"]),
    "top level scalar": ("just a string\n", ["mapping", "str"]),
    "unknown top key": (GOOD + "trails: 3\n", ["unknown key 'trails'"]),
    "unknown space key": (edit("  batch:", "  btach:"), ["space.btach"]),
    "unknown fixed key": (edit("d_model: 8", "d_modle: 8"), ["fixed.d_modle"]),
    "unknown budget key": (edit("iteration: 20", "iterations: 20"), ["budget.iterations"]),
    "unknown data key": (edit("{source: synthetic}", "{src: synthetic}"), ["data.src"]),
    "unknown range key": (edit("log: true}", "log: true, scale: log}"), ["space.lr.scale"]),
    "budget key under fixed": (edit("d_model: 8", "iteration: 8"), ["fixed.iteration", "budget"]),
    "name not a string": (edit("name: t", "name: 3"), ["name"]),
    "space not a mapping": (GOOD.split("space:")[0] + "space: [batch, lr]\n", ["space", "mapping"]),
    "budget not a mapping": (edit("budget: {iteration: 20, eval_every: 10}", "budget: 20"),
                             ["budget", "mapping"]),
    "budget iteration text": (edit("iteration: 20", "iteration: many"), ["budget.iteration"]),
    "budget eval_every zero": (edit("eval_every: 10", "eval_every: 0"), ["budget.eval_every"]),
    "fixed int as text": (edit("d_model: 8", "d_model: eight"), ["fixed.d_model"]),
    "fixed int as float": (edit("d_model: 8", "d_model: 8.5"), ["fixed.d_model"]),
    "fixed bool": (edit("d_model: 8", "BN: maybe"), ["fixed.BN"]),
    "fixed bad choice": (edit("d_model: 8", "MLP: gelu"), ["fixed.MLP", "relu"]),
    "fixed negative": (edit("d_model: 8", "commitment: -1"), ["fixed.commitment"]),
    "sample_rate text": (edit("{source: synthetic}", "{source: synthetic, sample_rate: fast}"),
                         ["data.sample_rate"]),
    "choice of wrong type": (edit("[8, 16]", "[8, sixteen]"), ["space.batch"]),
    "choice not allowed": (edit("BN: [yes, no]", "MLP: [relu, gelu]"), ["space.MLP", "gelu"]),
    "choices repeat": (edit("[8, 16]", "[8, 8]"), ["space.batch", "repeat"]),
    "param a scalar": (edit("[8, 16]", "8"), ["space.batch"]),
    "range bound text": (edit("low: 1e-4", "low: small"), ["space.lr.low"]),
    "range without high": (edit(", high: 1e-2", ""), ["space.lr", "high"]),
    "range log not bool": (edit("log: true", "log: sometimes"), ["space.lr.log"]),
    "unknown range type": (edit("type: float", "type: real"), ["space.lr.type"]),
    "int range on float key": (edit("type: float, low: 1e-4, high: 1e-2",
                                    "type: int, low: 1, high: 2"), ["space.lr", "integer"]),
    "float range on bool key": (edit("BN: [yes, no]", "BN: {type: float, low: 0, high: 1}"),
                                ["space.BN"]),
    "int range with float bounds": (edit("batch: [8, 16]", "batch: {type: int, low: 8.5, high: 16}"),
                                    ["space.batch"]),
    "empty choices": (edit("[8, 16]", "[]"), ["space.batch", "non-empty"]),
    "empty choices mapping": (edit("[8, 16]", "{choices: []}"), ["space.batch", "non-empty"]),
    "low above high": (edit("low: 1e-4, high: 1e-2", "low: 1e-2, high: 1e-4"), ["space.lr", "low"]),
    "lr log range at 0": (edit("low: 1e-4", "low: 0"), ["space.lr", "above 0"]),
    "lr log range below 0": (edit("low: 1e-4", "low: -1.0e-3"), ["space.lr", "above 0"]),
    "lr linear range at 0": (edit("low: 1e-4, high: 1e-2, log: true", "low: 0, high: 1e-2"),
                             ["space.lr", "lr must be > 0"]),
    "log range touching 0": (search("  commitment: {type: float, low: 0, high: 1, log: true}\n"),
                             ["space.commitment", "above 0"]),
    "batch 0 in choices": (edit("[8, 16]", "[0, 8, 16]"), ["space.batch", "at least 1"]),
    "batch 0 as range bound": (edit("batch: [8, 16]", "batch: {type: int, low: 0, high: 16}"),
                               ["space.batch", "at least 1"]),
    "fixed and searched": (edit("d_model: 8", "batch: 8"), ["batch", "both fixed and searched"]),
    "fixed and searched alias": (search("  En-De: [s4d-all]\n", edit("d_model: 8", "en_de: s4d-all")),
                                 ["En-De", "both fixed and searched"]),
    "pareto with pruner": (GOOD + "objective: pareto\npruner: median\n", ["pruner", "none"]),
    "pareto with default pruner": (GOOD + "objective: pareto\n", ["pruner", "none"]),
    "unknown objective": (GOOD + "objective: best\n", ["objective", "mse"]),
    "unknown sampler": (GOOD + "sampler: cmaes\n", ["sampler", "tpe"]),
    "unknown pruner": (GOOD + "pruner: asha\n", ["pruner", "hyperband"]),
    "grid with float range": (GOOD + "sampler: grid\n", ["space.lr", "grid", "not a float range"]),
    # 8..24 is a grid's list; 8..25 said only "not a range"
    "grid with a long int range": (edit("batch: [8, 16]", "batch: {type: int, low: 8, high: 25}")
                                   .replace("lr: {type: float, low: 1e-4, high: 1e-2, log: true}",
                                            "lr: [1.0e-3]") + "sampler: grid\n",
                                   ["space.batch", "not an int range of 18 values (one of up to "
                                                   "17 is taken as its list)"]),
    "grid without a space": ("name: g\nsampler: grid\n", ["sampler: grid needs a space"]),
    "enqueue not a list": (GOOD.split("enqueue:")[0] + "enqueue: {batch: 8}\n", ["enqueue", "list"]),
    "enqueue row empty": (GOOD.split("enqueue:")[0] + "enqueue: [{}]\n", ["enqueue[0]"]),
    "enqueue choice outside": (edit("{batch: 8,", "{batch: 64,"), ["enqueue[0].batch", "outside"]),
    "enqueue range outside": (edit("lr: 1.0e-3, BN", "lr: 0.5, BN"), ["enqueue[0].lr", "outside"]),
    "enqueue wrong type": (edit("{batch: 8,", "{batch: eight,"), ["enqueue[0].batch"]),
    "enqueue unsearched key": (edit("BN: no}", "BN: no, d_model: 8}"),
                               ["enqueue[0].d_model", "not a searched parameter"]),
    "enqueue unknown key": (edit("BN: no}", "BN: no, colour: red}"), ["enqueue[0].colour"]),
    "enqueue without a space": (GOOD.split("space:")[0] + "enqueue: [{batch: 8}]\n",
                                ["enqueue[0].batch", "the spec searches none"]),  # "(searched: )"
    "fixed window vs downsample": (edit("window: 64", "window: 66"), ["window (66)", "downsample (4)"]),
    "searched window vs fixed downsample": (search("  window: [64, 100]\n",
                                                   edit("window: 64}", "downsample: 8}")),
                                            ["space.window=100", "downsample (8)"]),
    "searched window and downsample": (search("  window: [64, 100]\n  downsample: [4, 8]\n",
                                              edit("window: 64}", "stride: 8}")),
                                       ["space.window=100 with space.downsample=8", "window (100)"]),
    "downsample not allowed": (edit("window: 64", "downsample: 3"), ["downsample", "1, 2, 4, 8"]),
    "window as a range": (search("  window: {type: int, low: 60, high: 64}\n",
                                 edit("window: 64}", "stride: 8}")),
                          ["space.window", "list of choices"]),
    "missing name": (GOOD.replace("name: t\n", ""), ["name"]),
    "empty name": (edit("name: t", "name: '  '"), ["name"]),
    "empty file": ("", ["name"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_is_a_config_error_naming_the_key(tmp_path, case):
    text, words = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_sweep(str(path))
    message = str(info.value)
    assert str(path) in message  # which file
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert "\n" not in message  # one line, for the CLI's `Error:`


def test_missing_spec_names_the_bundled_ones(tmp_path):
    with pytest.raises(ConfigError, match="sweep spec not found: nope.yaml .*seed, smoke"):
        load_sweep("nope.yaml")


# ------------------------------------------------------------------ linked keys, done right


def test_fixed_downsample_decides_which_windows_are_valid(tmp_path):
    """A window only needs to suit the spec's downsample, not Config's default of 4."""
    text = search("  window: [66, 130]\n", edit("window: 64}", "downsample: 2}"))
    spec = load_sweep(str(write(tmp_path, text)))
    study = optuna.create_study()
    windows = {spec.suggest(study.ask()).window for _ in range(8)}
    assert windows <= {66, 130}
    assert spec.base_config().downsample == 2


def test_searched_downsample_suits_a_fixed_window(tmp_path):
    """Fixed window 90 is invalid with the default downsample 4 but fine with the searched 1 and 2."""
    text = search("  downsample: [1, 2]\n", edit("window: 64", "window: 90"))
    spec = load_sweep(str(write(tmp_path, text)))
    assert spec.base_config().window == 90
    study = optuna.create_study()
    for _ in range(4):
        cfg = spec.suggest(study.ask())
        assert cfg.window == 90 and cfg.downsample in (1, 2)


def test_data_given_again_keeps_the_specs_rate_and_channel(tmp_path, monkeypatch):
    """`vqlog-sweep --config my.yaml --data sig.npy`, where my.yaml says `data: {source: sig.npy,
    sample_rate: 125}`: the spec's rate was dropped with its source, and the sweep stopped on
    "sample rate unknown; ... or give it in the spec". The spec's own source given again keeps
    its rate and channel (flags over them); another source takes neither."""
    import numpy as np
    import yaml

    from vqlog.api import study_spec

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "sig.npy", np.zeros(10))
    np.save(tmp_path / "other.npy", np.zeros(10))
    raw = yaml.safe_load(resolve_spec_path("smoke").read_text())
    raw["data"] = {"source": "sig.npy", "sample_rate": 125, "channel": "ppg"}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(raw))
    for given in ("sig.npy", str(tmp_path / "sig.npy"), "./sig.npy"):
        spec = study_spec("my.yaml", data=given)
        assert (spec.source, spec.sample_rate, spec.channel) == ("sig.npy", 125, "ppg"), given
    spec = study_spec("my.yaml", data="sig.npy", sample_rate=100, channel="1")
    assert (spec.sample_rate, spec.channel) == (100, "1")
    spec = study_spec("my.yaml", data="other.npy")
    assert (spec.source, spec.sample_rate, spec.channel) == ("other.npy", None, None)
    # a WFDB record's path names no file of its own (rec/100.hea, rec/100.dat)
    raw["data"] = {"source": "rec/100", "channel": "PLETH"}
    (tmp_path / "rec.yaml").write_text(yaml.safe_dump(raw))
    for given in ("./rec/100", str(tmp_path / "rec" / "100"), "rec/../rec/100"):
        assert study_spec("rec.yaml", data=given).channel == "PLETH", given
