"""Sweep specs (`sweeps/*.yaml`): search space, fixed values, budget, data, objective, sampler,
pruner and rows to enqueue, validated where they enter. `SweepSpec.suggest` is the only code that
asks Optuna for parameters.

    name: seed                       # the study name (and MLflow experiment)
    data: {source: ppg}              # or {source: my.npy, sample_rate: 125}
    budget: {iteration: 400, eval_every: 50}   # checkpoint_every: default eval_every, 0: none
    objective: mse                   # mse (minimise val MSE, pruned) | pareto (MSE down, perplexity up)
    sampler: tpe                     # tpe | random | grid
    pruner: hyperband                # hyperband | median | none
    fixed: {d_model: 64}             # any Config key
    space:
      batch: [32, 64, 128]                              # a list is categorical
      lr: {type: float, low: 1e-5, high: 1e-2, log: true}
      n_layers: {type: int, low: 1, high: 4}
    enqueue:                         # tried first, once per study
      - {batch: 64, lr: 1e-3, ...}
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import optuna

from vqlog.config import ALIASES, Config, coerce, load_config_file
from vqlog.study.space import (BUDGET_KEYS, FIELD_TYPES, LINKED, Param, field_name, log_name,
                               no_unknown, parse_param, valid_alone)
from vqlog.errors import ConfigError

STUDY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
OBJECTIVES = ("mse", "pareto")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("hyperband", "median", "none")
TOP_KEYS = ("name", "description", "data", "budget", "objective", "sampler", "pruner", "fixed",
            "space", "enqueue")
DATA_KEYS = ("source", "sample_rate", "channel")
@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str = "ppg"
    sample_rate: float | None = None
    channel: str | None = None  # one signal of a multi-channel file (name or 0-based index)
    space: tuple[Param, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()  # (Config field, value), validated
    iteration: int = Config.iteration
    eval_every: int = Config.eval_every
    checkpoint_every: int = Config.eval_every  # steps between a trial's checkpoints; 0: none
    objective: str = "mse"
    sampler: str = "tpe"
    pruner: str = "hyperband"
    enqueue: tuple[dict, ...] = ()
    description: str = ""  # the MLflow experiment's description
    path: str = ""  # the YAML file it was read from

    @property
    def directions(self) -> list[str]:
        return ["minimize", "maximize"] if self.objective == "pareto" else ["minimize"]

    def base_config(self, seed: int | None = None) -> Config:
        """Every fixed value and the budget, before the searched ones. A searched window or
        downsample takes its first choice here, so that a fixed partner need not suit Config's
        default (fixed window 90 with downsample searched in [1, 2])."""
        return _config(self, {p.name: p.choices[0] for p in self.space if p.name in LINKED}, seed)

    def suggest(self, trial, seed: int | None = None) -> Config:
        """Ask the trial for every searched parameter and build the trial's Config."""
        values = {p.name: p.suggest(trial) for p in self.space}
        return Config.from_mapping(values, base=self.base_config(seed))

    def grid(self) -> dict[str, list]:
        return {p.name: p.grid_values() for p in self.space}

    def grid_left(self, trials: list[optuna.trial.FrozenTrial]) -> int:
        """How many of the grid's points no trial has taken yet (a queued trial has not)."""
        grid = {name: set(values) for name, values in self.grid().items()}
        taken = {tuple(t.params.get(name) for name in grid) for t in trials
                 if t.state != optuna.trial.TrialState.WAITING}
        on_grid = sum(all(v in grid[n] for n, v in zip(grid, point)) for point in taken)
        return math.prod(len(values) for values in grid.values()) - on_grid

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler == "grid":
            return GridSampler(self.grid(), seed=seed)
        if self.objective == "pareto":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        # Enqueued rows and the first random trials seed TPE's density estimates.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner == "hyperband":
            from vqlog.study.retries import HyperbandPruner  # a retry judged as its original

            return HyperbandPruner(
                min_resource=self.eval_every, max_resource=self.iteration, reduction_factor=3
            )
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=self.eval_every)
        return optuna.pruners.NopPruner()


def bundled_specs() -> list[str]:
    """Names of the specs shipped with vqlog (the repository's `sweeps/` folder)."""
    root = resources.files("vqlog.sweeps")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_spec_path(name_or_path: str) -> Path:
    """A file path, or the name of a bundled spec (`seed`, `quantizers`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if "/" not in stem and stem in bundled_specs():
        return Path(str(resources.files("vqlog.sweeps").joinpath(f"{stem}.yaml")))
    if path.is_dir():
        raise ConfigError(f"sweep spec {name_or_path} is a folder; give a YAML file in it or one "
                          f"of: {', '.join(bundled_specs())}")
    raise ConfigError(
        f"sweep spec not found: {name_or_path} (give a YAML file or one of: "
        f"{', '.join(bundled_specs())})"
    )


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, whose end the worker notices itself (`SweepSpec.grid_left`): its
    own after_trial calls study.stop() at the grid's last point, which works only inside
    study.optimize, and vqlog's workers ask and tell (it raised RuntimeError there)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def load_sweep(name_or_path: str) -> SweepSpec:
    """Read and validate a sweep spec; every problem is a ConfigError naming the key."""
    path = resolve_spec_path(name_or_path)
    raw = load_config_file(path)
    try:
        return parse_sweep(raw, path=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _config(spec: SweepSpec, searched: dict, seed: int | None = None) -> Config:
    """The fixed values, the budget and `searched` (log names) in one step, so Config's
    cross-field checks see the final combination only."""
    values = dict(spec.fixed)
    values.update(iteration=spec.iteration, eval_every=spec.eval_every)
    if seed is not None:
        values["seed"] = seed
    values.update({ALIASES.get(k, k): v for k, v in searched.items()})
    return dataclasses.replace(Config(), **values)


def parse_sweep(raw: dict, path: str = "") -> SweepSpec:
    """A validated SweepSpec from a spec's mapping; `path` is the file it came from."""
    no_unknown(raw, TOP_KEYS, "")
    name = raw.get("name")
    if not raw:  # an empty file
        raise ConfigError("the spec is empty; it needs at least a `name:` (the bundled specs, "
                          "vqlog/sweeps/*.yaml, show the rest)")
    if not isinstance(name, str):
        raise ConfigError(f"name: the study name must be a string, got {name!r}")
    check_study_name(name.strip(), "name")
    data = _mapping(raw.get("data", {}), "data")
    no_unknown(data, DATA_KEYS, "data.")
    budget = _mapping(raw.get("budget", {}), "budget")
    no_unknown(budget, BUDGET_KEYS, "budget.")
    fixed = _mapping(raw.get("fixed", {}), "fixed")
    fixed_cfg = _fixed_values(fixed)
    space = tuple(parse_param(k, v) for k, v in _mapping(raw.get("space", {}), "space").items())
    spec = SweepSpec(
        name=name.strip(),
        description=_description(raw.get("description", "")),
        source=_source(data.get("source", "ppg")),
        sample_rate=_rate(data.get("sample_rate")),
        channel=_channel(data.get("channel")),
        space=space,
        fixed=tuple(fixed_cfg.items()),
        iteration=_positive_int(budget.get("iteration", Config.iteration), "budget.iteration"),
        eval_every=_positive_int(budget.get("eval_every", Config.eval_every), "budget.eval_every"),
        checkpoint_every=_checkpoint_every(budget),
        objective=_choice(raw.get("objective", "mse"), OBJECTIVES, "objective"),
        sampler=_choice(raw.get("sampler", "tpe"), SAMPLERS, "sampler"),
        pruner=_choice(raw.get("pruner", "hyperband"), PRUNERS, "pruner"),
        path=path,
    )
    overlap = {p.name for p in space} & {log_name(k) for k in fixed}
    if overlap:
        raise ConfigError(f"{', '.join(sorted(overlap))} is both fixed and searched; keep one")
    if spec.objective == "pareto" and spec.pruner != "none":
        raise ConfigError("objective pareto is multi-objective and cannot be pruned; set pruner: none")
    if spec.sampler == "grid":
        if not spec.space:
            raise ConfigError("sampler: grid needs a space to search; add one under space "
                              "(or use sampler: random)")
        spec.grid()  # raises for ranges
    _check_combinations(spec)  # also the fixed values' own cross-field checks
    enqueue = raw.get("enqueue", []) or []
    if not isinstance(enqueue, list):
        raise ConfigError("enqueue must be a list of parameter mappings")
    rows = tuple(_enqueue_row(i, row, spec) for i, row in enumerate(enqueue))
    return dataclasses.replace(spec, enqueue=rows)


def check_study_name(name: str, where: str = "--study") -> str:
    """A study name is 1 to 64 letters, digits, '.', '_' or '-', not beginning with '.': it names
    the MLflow experiment, the registered model, its artifact folder and the table's file, so it
    must be safe in all of them."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise ConfigError(f"{where}: {name!r} is not a study name; use 1 to 64 letters, digits, "
                          "'.', '_' or '-'")
    if name.startswith("."):  # '..': a path out of its folder (MLflow refuses it as a model's
        # name, after the first trial ran); '.x': a hidden table file, or x's (`table_path`)
        raise ConfigError(f"{where}: {name!r} is not a study name: it may not begin with '.'")
    return name


# ------------------------------------------------------------------------------------ helpers


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
    return value


def _choice(value: Any, choices: tuple, key: str) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _channel(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise ConfigError(f"data.channel must be a channel name or a 0-based index, got {value!r}")
    return str(value)


def _checkpoint_every(budget: dict) -> int:
    """budget.checkpoint_every: a count of steps, 0 for none; by default eval_every's."""
    value = budget.get("checkpoint_every", budget.get("eval_every", Config.eval_every))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"budget.checkpoint_every must be 0 (no checkpoints) or a positive "
                          f"integer, got {value!r}")
    return value


def _source(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"data.source must be ppg, synthetic or a file path, got {value!r}")
    return value


DESCRIPTION_LIMIT = 20000  # characters of an MLflow experiment tag, where the description goes


def _description(value) -> str:
    text = "" if value is None else str(value)
    if len(text) > DESCRIPTION_LIMIT:
        raise ConfigError(f"description is {len(text):,} characters; the MLflow experiment that "
                        f"shows it takes at most {DESCRIPTION_LIMIT:,}")
    return text


def _rate(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"data.sample_rate must be a positive number, got {value!r}")
    return float(value)


def _fixed_values(fixed: dict) -> dict:
    out = {}
    for key, value in fixed.items():
        name = field_name(key, "fixed.")
        out[name] = coerce(f"fixed.{key}", value, FIELD_TYPES[name])
        if name not in LINKED:  # window and downsample: by combination, in _check_combinations
            valid_alone(name, out[name], f"fixed.{key}")
    return out


def _check_combinations(spec: SweepSpec) -> None:
    """The fixed values with every combination of the searched linked keys (window, downsample:
    always categorical) must make a valid Config."""
    linked = [p for p in spec.space if p.name in LINKED]
    for combo in itertools.product(*(p.choices for p in linked)):
        values = {p.name: v for p, v in zip(linked, combo)}
        try:
            _config(spec, values)
        except ConfigError as exc:
            where = " with ".join(f"space.{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def _enqueue_row(i: int, row: Any, spec: SweepSpec) -> dict:
    where = f"enqueue[{i}]"
    if not isinstance(row, dict) or not row:
        raise ConfigError(f"{where} must be a non-empty mapping of searched parameters")
    params = {p.name: p for p in spec.space}
    out = {}
    for key, value in row.items():
        name = log_name(key)
        if name not in params:
            raise ConfigError(f"{where}.{key} is not a searched parameter " + (
                f"(searched: {', '.join(params)})" if params else
                "(the spec searches none: enqueue rows are points of its space)"))
        typ = FIELD_TYPES[ALIASES.get(name, name)]
        value = coerce(f"{where}.{key}", value, typ)
        if not params[name].contains(value):
            raise ConfigError(f"{where}.{key}={value!r} lies outside the search space")
        out[name] = value
    return out
