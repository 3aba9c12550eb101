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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import optuna

from vqlog.config import ALIASES, Config, coerce, known_keys, load_config_file
from vqlog.errors import ConfigError

OBJECTIVES = ("mse", "pareto")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("hyperband", "median", "none")
TOP_KEYS = ("name", "description", "data", "budget", "objective", "sampler", "pruner", "fixed",
            "space", "enqueue")
BUDGET_KEYS = ("iteration", "eval_every", "checkpoint_every")
DATA_KEYS = ("source", "sample_rate")
# Keys valid only together (window must be a multiple of downsample): checked per combination.
LINKED = ("window", "downsample")
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


@dataclass(frozen=True)
class Param:
    """One searched dimension, under the log's name (`En-De`, `BN`, ...)."""

    name: str
    kind: str  # categorical | int | float
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def grid_values(self) -> list:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int" and self.high - self.low <= 16:
            return list(range(int(self.low), int(self.high) + 1))
        raise ConfigError(
            f"space.{self.name}: the grid sampler needs a list of choices, not a range"
        )


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str = "ppg"
    sample_rate: float | None = None
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

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler == "grid":
            return optuna.samplers.GridSampler(self.grid(), seed=seed)
        if self.objective == "pareto":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        # Enqueued rows and the first random trials seed TPE's density estimates.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(
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
    raise ConfigError(
        f"sweep spec not found: {name_or_path} (give a YAML file or one of: "
        f"{', '.join(bundled_specs())})"
    )


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
    _no_unknown(raw, TOP_KEYS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("name: the study name must be a non-empty string")
    data = _mapping(raw.get("data", {}), "data")
    _no_unknown(data, DATA_KEYS, "data.")
    budget = _mapping(raw.get("budget", {}), "budget")
    _no_unknown(budget, BUDGET_KEYS, "budget.")
    fixed = _mapping(raw.get("fixed", {}), "fixed")
    fixed_cfg = _fixed_values(fixed)
    space = tuple(_param(k, v) for k, v in _mapping(raw.get("space", {}), "space").items())
    spec = SweepSpec(
        name=name.strip(),
        description=str(raw.get("description", "")),
        source=_source(data.get("source", "ppg")),
        sample_rate=_rate(data.get("sample_rate")),
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
    overlap = {p.name for p in space} & {_log_name(k) for k in fixed}
    if overlap:
        raise ConfigError(f"{', '.join(sorted(overlap))} is both fixed and searched; keep one")
    if spec.objective == "pareto" and spec.pruner != "none":
        raise ConfigError("objective pareto is multi-objective and cannot be pruned; set pruner: none")
    if spec.sampler == "grid":
        spec.grid()  # raises for ranges
    _check_combinations(spec)  # also the fixed values' own cross-field checks
    enqueue = raw.get("enqueue", []) or []
    if not isinstance(enqueue, list):
        raise ConfigError("enqueue must be a list of parameter mappings")
    rows = tuple(_enqueue_row(i, row, spec) for i, row in enumerate(enqueue))
    return dataclasses.replace(spec, enqueue=rows)


# ------------------------------------------------------------------------------------ helpers


def _log_name(key: str) -> str:
    field = ALIASES.get(key, key)
    return {v: k for k, v in ALIASES.items()}.get(field, field)


def _no_unknown(mapping: dict, allowed: tuple, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"unknown key '{prefix}{key}' (allowed: {', '.join(allowed)})")


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


def _rate(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"data.sample_rate must be a positive number, got {value!r}")
    return float(value)


def _field(key: str, where: str) -> str:
    name = ALIASES.get(key, key)
    if name not in _FIELD_TYPES:
        raise ConfigError(f"unknown config key '{where}{key}' (known: {', '.join(known_keys())})")
    if name in BUDGET_KEYS:
        raise ConfigError(f"'{where}{key}' belongs under budget:, not {where.rstrip('.')}")
    return name


def _fixed_values(fixed: dict) -> dict:
    out = {}
    for key, value in fixed.items():
        name = _field(key, "fixed.")
        out[name] = coerce(f"fixed.{key}", value, _FIELD_TYPES[name])
        if name not in LINKED:  # window and downsample: by combination, in _check_combinations
            _valid_alone(name, out[name], f"fixed.{key}")
    return out


def _valid_alone(key: str, value: Any, where: str) -> None:
    """Config's own check of one value (lr <= 0, batch 0, an unknown MLP ...), named by `where`."""
    try:
        Config.from_mapping({key: value})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _number(value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return value


def _param(key: str, value: Any) -> Param:
    _field(key, "space.")
    name = _log_name(key)
    where = f"space.{key}"
    typ = _FIELD_TYPES[ALIASES.get(key, key)]
    if isinstance(value, list):
        value = {"type": "categorical", "choices": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a list of choices or a mapping with type/low/high")
    _no_unknown(value, ("type", "choices", "low", "high", "log"), f"{where}.")
    kind = value.get("type", "categorical" if "choices" in value else None)
    if kind not in ("categorical", "int", "float"):
        raise ConfigError(f"{where}.type must be categorical, int or float; got {kind!r}")
    if kind == "categorical":
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        coerced = tuple(coerce(where, c, typ) for c in choices)
        if key not in LINKED:  # window and downsample: by combination, in _check_combinations
            for c in coerced:
                _valid_alone(key, c, where)
        if len(set(coerced)) != len(coerced):
            raise ConfigError(f"{where}: choices repeat a value")
        return Param(name, "categorical", choices=coerced)
    if key in LINKED:
        raise ConfigError(f"{where}: give {key} as a list of choices; window must be a multiple "
                          "of downsample, and vqlog checks every combination before the sweep")
    for bound in ("low", "high"):
        if bound not in value:
            raise ConfigError(f"{where}: a {kind} range needs {bound}")
    low, high = _number(value["low"], f"{where}.low"), _number(value["high"], f"{where}.high")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log must be true or false")
    if low > high:
        raise ConfigError(f"{where}: low ({low}) is above high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range must stay above 0, got low={low}")
    if kind == "int":
        if "int" not in str(typ):
            raise ConfigError(f"{where}: {key} is not an integer key; use type float or choices")
        if int(low) != low or int(high) != high:
            raise ConfigError(f"{where}: int bounds must be integers")
        low, high = int(low), int(high)
    elif "float" not in str(typ):
        raise ConfigError(f"{where}: {key} is not a float key; use choices")
    for bound in (low, high):
        _valid_alone(key, bound, where)
    return Param(name, kind, low=low, high=high, log=log)


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
        name = _log_name(key)
        if name not in params:
            raise ConfigError(
                f"{where}.{key} is not a searched parameter (searched: {', '.join(params)})"
            )
        typ = _FIELD_TYPES[ALIASES.get(name, name)]
        value = coerce(f"{where}.{key}", value, typ)
        if not params[name].contains(value):
            raise ConfigError(f"{where}.{key}={value!r} lies outside the search space")
        out[name] = value
    return out
