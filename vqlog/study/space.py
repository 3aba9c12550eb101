"""The searched dimensions of a sweep spec (`space:`), and the checks a key of the training
configuration passes wherever a spec names one (space, fixed, enqueue)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vqlog.config import ALIASES, Config, coerce, known_keys
from vqlog.errors import ConfigError

if TYPE_CHECKING:
    import optuna

BUDGET_KEYS = ("iteration", "eval_every", "checkpoint_every")
# Keys valid only together (window must be a multiple of downsample): checked per combination.
LINKED = ("window", "downsample")
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


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

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution `suggest` asks for."""
        import optuna

        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def text(self) -> str:
        """What the study run's `space.<name>` param says: the choices, or the range."""
        if self.kind == "categorical":
            return str(list(self.choices))
        return f"{self.kind} [{self.low}, {self.high}]" + (" log" if self.log else "")

    def grid_values(self) -> list:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int" and self.high - self.low <= 16:
            return list(range(int(self.low), int(self.high) + 1))
        size = (f"an int range of {int(self.high - self.low) + 1} values (one of up to 17 is "
                "taken as its list)" if self.kind == "int" else "a float range")
        raise ConfigError(
            f"space.{self.name}: the grid sampler needs a list of choices, not {size}"
        )



def log_name(key: str) -> str:
    field = ALIASES.get(key, key)
    return {v: k for k, v in ALIASES.items()}.get(field, field)



def no_unknown(mapping: dict, allowed: tuple, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"unknown key '{prefix}{key}' (allowed: {', '.join(allowed)})")



def field_name(key: str, where: str) -> str:
    name = ALIASES.get(key, key)
    if name not in FIELD_TYPES:
        raise ConfigError(f"unknown config key '{where}{key}' (known: {', '.join(known_keys())})")
    if name in BUDGET_KEYS:
        raise ConfigError(f"'{where}{key}' belongs under budget:, not {where.rstrip('.')}")
    return name



def valid_alone(key: str, value: Any, where: str) -> None:
    """Config's own check of one value (lr <= 0, batch 0, an unknown MLP ...), named by `where`."""
    try:
        Config.from_mapping({key: value})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None



def number(value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return value



def parse_param(key: str, value: Any) -> Param:
    field_name(key, "space.")
    name = log_name(key)
    where = f"space.{key}"
    typ = FIELD_TYPES[ALIASES.get(key, key)]
    if isinstance(value, list):
        value = {"type": "categorical", "choices": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a list of choices or a mapping with type/low/high")
    no_unknown(value, ("type", "choices", "low", "high", "log"), f"{where}.")
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
                valid_alone(key, c, where)
        if len(set(coerced)) != len(coerced):
            raise ConfigError(f"{where}: choices repeat a value")
        return Param(name, "categorical", choices=coerced)
    if key in LINKED:
        raise ConfigError(f"{where}: give {key} as a list of choices; window must be a multiple "
                          "of downsample, and vqlog checks every combination before the sweep")
    for bound in ("low", "high"):
        if bound not in value:
            raise ConfigError(f"{where}: a {kind} range needs {bound}")
    low, high = number(value["low"], f"{where}.low"), number(value["high"], f"{where}.high")
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
        valid_alone(key, bound, where)
    return Param(name, kind, low=low, high=high, log=log)


# Trials read one by one, newest first, to find the distributions a study uses; past these, the
# rest are read in one go (a parameter the spec searches that the latest trials do not have).
SPACE_LOOKBACK = 50


def check_space(storage: optuna.storages.BaseStorage, spec) -> None:
    """The spec searches each parameter in a way the study's trials can share. Optuna keeps one
    distribution per name within a study and fails every trial that asks a list parameter for
    other choices, or asks for another kind (int, float, list) or scale (log or not); a range
    may widen or narrow. Optuna's rule makes every trial's distribution of a name compatible
    with every other's, so the newest trial that has it tells: most often one trial is read.
    The queued trials (a spec's rows, retries) have no distributions yet: a value of theirs
    that a list of this spec does not hold would fail that trial as it starts."""
    import optuna

    from vqlog.bulk import gc_paused

    wanted = {p.name: p.distribution() for p in spec.space}
    study_id = storage.get_study_id_from_name(spec.name)
    seen: dict[str, optuna.distributions.BaseDistribution] = {}

    def note(trial: optuna.trial.FrozenTrial) -> None:
        for name, dist in trial.distributions.items():
            if name in wanted:
                seen.setdefault(name, dist)

    total = storage.get_n_trials(study_id)
    number = total
    while number > max(0, total - SPACE_LOOKBACK) and len(seen) < len(wanted):
        number -= 1
        note(storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number)))
    if number > 0 and len(seen) < len(wanted):
        with gc_paused():
            for trial in storage.get_all_trials(study_id, deepcopy=False):
                note(trial)
    waiting = (optuna.trial.TrialState.WAITING,)
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=waiting):
        for name, value in trial.system_attrs.get("fixed_params", {}).items():
            new = wanted.get(name)
            if isinstance(new, optuna.distributions.CategoricalDistribution) and \
                    value not in new.choices:
                raise ConfigError(
                    f"study '{spec.name}' has a queued trial (Seq{trial.number + 1}: a spec's row "
                    f"or a retry) with {name} = {value!r}, which this spec's choices "
                    f"{list(new.choices)} do not hold: use another --study name, or the study's "
                    "own spec")
    for name, old in seen.items():
        new = wanted[name]
        if not same_kind(old, new):
            raise ConfigError(
                f"study '{spec.name}' already searches {name} over {describe_distribution(old)}; "
                f"this spec asks for {describe_distribution(new)}, which Optuna cannot mix in "
                "one study: use another --study name, or the study's own spec"
            )


def same_kind(old: optuna.distributions.BaseDistribution,
              new: optuna.distributions.BaseDistribution) -> bool:
    """Whether one study's trials may ask for both: the same class, and the same choices (a
    list) or the same scale (a range)."""
    import optuna

    if type(old) is not type(new):
        return False
    if isinstance(old, optuna.distributions.CategoricalDistribution):
        return tuple(old.choices) == tuple(new.choices)
    return old.log == new.log


def describe_distribution(dist: optuna.distributions.BaseDistribution) -> str:
    import optuna

    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return "the choices [" + ", ".join(map(str, dist.choices)) + "]"
    scale = " (log)" if getattr(dist, "log", False) else " (linear)"  # the two that cannot mix
    kind = "an int" if isinstance(dist, optuna.distributions.IntDistribution) else "a float"
    return f"{kind} range [{dist.low:g}, {dist.high:g}]{scale}"
