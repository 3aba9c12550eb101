"""The training configuration: one frozen dataclass, the log's names, defaults in exactly one place.

Keys follow the research log's table (`batch`, `lr`, `embedding_dim`, `embedding_num`, `iteration`,
`BN`, `MLP`, `En-De`); `En-De` is spelled `en_de` in Python and accepted under either name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from vqlog.errors import ConfigError, one_line

QUANTIZERS = ("vq", "vq_ema", "fsq", "none")
MLPS = ("relu", "linear")
EN_DES = ("s4d-all",)
DOWNSAMPLES = (1, 2, 4, 8)
STANDARDIZE = ("window", "dataset")

# Log name -> Python field name, where they differ.
ALIASES = {"En-De": "en_de"}
LOG_NAMES = {v: k for k, v in ALIASES.items()}


INT_MAX = 2**31 - 1  # the largest size, count or step a config key may hold
SEED_MAX = 2**32 - 1  # numpy's seeds (torch's go further)


@dataclass(frozen=True)
class Config:
    # --- the log's columns ---
    batch: int = 32  # windows per training step
    lr: float = 2e-3  # AdamW peak learning rate (the log settled on 1e-3..1e-4 at its scale)
    embedding_dim: int = 64  # width of a code vector
    embedding_num: int = 256  # codebook size K
    iteration: int = 1000  # training steps
    BN: bool = True  # BatchNorm in the "BN + MLP" blocks after encoder and decoder
    MLP: str = "relu"  # "relu": Linear-ReLU-Linear; "linear": one Linear
    en_de: str = "s4d-all"  # S4D in both encoder and decoder (the log's only value so far)
    # --- the log's open questions ---
    # vq | vq_ema | fsq | none (none = the S4D-only baseline). vq_ema by default: on ppg the
    # classic vq used ~3% of its codes (perplexity ~6), vq_ema ~70% (perplexity ~100).
    quantizer: str = "vq_ema"
    commitment: float = 0.25  # commitment-loss weight beta (van den Oord et al. 2017)
    downsample: int = 4  # samples per code: 1 = one code per sample
    # --- the S4D stacks ---
    d_model: int = 64  # channels H inside encoder and decoder
    d_state: int = 64  # state size N of each S4D layer (N/2 complex pairs)
    n_layers: int = 2  # S4D blocks in the encoder, and again in the decoder
    dropout: float = 0.0
    # --- data shaping ---
    window: int = 256  # samples per training window (after resampling)
    stride: int = 64  # hop between windows
    resample_hz: float | None = 50.0  # resample every recording to this rate; None keeps the native rate
    standardize: str = "window"  # window: z-score each window (the log); dataset: one mean/std from train
    # --- optimisation ---
    weight_decay: float = 0.01
    warmup: int = 100  # linear warm-up steps before the cosine decay
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_every: int = 100  # evaluate on the whole valid split every k steps (and at the end)
    log_every: int = 10  # average train metrics over this many steps per logged point
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):  # NaN passes every < and > check below, and inf means nothing here
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{LOG_NAMES.get(f.name, f.name)} must be a finite number, "
                                  f"got {value}")
        _check_choice("MLP", self.MLP, MLPS)
        _check_choice("En-De", self.en_de, EN_DES)
        _check_choice("quantizer", self.quantizer, QUANTIZERS)
        _check_choice("downsample", self.downsample, DOWNSAMPLES)
        _check_choice("standardize", self.standardize, STANDARDIZE)
        for key in ("batch", "embedding_dim", "embedding_num", "iteration", "d_model", "window",
                    "stride", "eval_every", "log_every", "n_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
            if getattr(self, key) > INT_MAX:  # (a tensor size past it overflows in torch)
                raise ConfigError(f"{key} must be at most {INT_MAX}, got {getattr(self, key)}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed must be from 0 to {SEED_MAX} (2**32 - 1), got {self.seed}")
        if self.d_state < 2 or self.d_state % 2:
            raise ConfigError(f"d_state must be an even number >= 2, got {self.d_state}")
        if self.embedding_num < 2:
            raise ConfigError(f"embedding_num must be at least 2, got {self.embedding_num}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for key in ("commitment", "weight_decay", "grad_clip", "dropout", "warmup"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.dropout >= 1:
            raise ConfigError(f"dropout must be below 1, got {self.dropout}")
        if self.window % self.downsample:
            raise ConfigError(
                f"window ({self.window}) must be a multiple of downsample ({self.downsample})"
            )
        if self.resample_hz is not None and not self.resample_hz > 0:
            raise ConfigError(f"resample_hz must be > 0 or null, got {self.resample_hz}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Config | None = None) -> Config:
        """Build a Config from user values (log names or field names), checking keys and types."""
        base = base or cls()
        types = {f.name: f.type for f in fields(cls)}
        changes = {}
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if name not in types:
                raise ConfigError(f"unknown config key '{key}' (known: {', '.join(known_keys())})")
            changes[name] = coerce(key, value, types[name])
        return dataclasses.replace(base, **changes)

    def to_params(self) -> dict[str, Any]:
        """Every value under its log name: what MLflow records and the table reads."""
        return {LOG_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}

    @property
    def codes_per_window(self) -> int:
        return self.window // self.downsample


def known_keys() -> list[str]:
    return [LOG_NAMES.get(f.name, f.name) for f in fields(Config)]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings from `--set` into a mapping; values are parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys (a training config, not a sweep spec)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {path} ({one_line(exc)}); save it as UTF-8 text") from None
    except OSError as exc:  # permission denied, an I/O error
        raise ConfigError(f"cannot read {path}: {exc.strerror or one_line(exc)}") from None
    try:
        data = yaml.safe_load(text)
        _check_unique_keys(yaml.compose(text))  # nodes only: compose constructs no object
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _check_unique_keys(node, visited: set | None = None) -> None:
    """A YAMLError at the second of two equal keys in one mapping (PyYAML keeps the last one
    silently: a second `name:` at the end of a spec renamed the study). Merge keys (`<<`)
    are left to PyYAML, which lets the mapping's own keys override the merged ones."""
    import yaml

    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias of a node already walked (or of one that holds it)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key.value!r} is given twice in one mapping",
                        key.start_mark)
                seen.add((key.tag, key.value))
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        for child in node.value:
            for sub in (child if isinstance(child, tuple) else (child,)):
                _check_unique_keys(sub, visited)


def _yaml_problem(exc: Exception) -> str:
    """Where and what, from PyYAML's marks: its own text spans several lines, draws a caret under
    a quoted snippet and calls the file "<unicode string>"."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return one_line(exc)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        text += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    return one_line(text)


_YES = {"yes", "true", "on", "1"}
_NO = {"no", "false", "off", "0"}


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Coerce a user value to the field's type; bool accepts the log's yes/no."""
    typ = str(typ)
    if value is None:
        if "None" in typ:
            return None
        raise ConfigError(f"{key} must not be empty")
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YES | _NO:
            return value.lower() in _YES
        raise ConfigError(f"{key} must be yes or no, got {value!r}")
    if typ == "int":
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or int(value) != value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if typ.startswith("float"):
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if typ == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover - fields are fixed


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def env_number(name: str, default: float, integer: bool = False) -> float:
    """A number above 0 from the environment variable `name` (`default` when unset or empty): the
    tuning knobs VQLOG_HEARTBEAT_INTERVAL, VQLOG_HEARTBEAT_GRACE, VQLOG_DB_OUTAGE_LIMIT and
    VQLOG_TRACKING_OUTAGE_LIMIT. Anything else is a ConfigError naming the variable: "abc" was
    a ValueError blamed on the storage, and -5 was taken as it was."""
    import os

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        kind = "a whole number of seconds" if integer else "a number of seconds"
        raise ConfigError(f"${name} must be {kind} above 0, got {text!r}")
    return value


def heartbeat_interval() -> int:
    """Seconds between two heartbeats of a running trial (VQLOG_HEARTBEAT_INTERVAL)."""
    return int(env_number("VQLOG_HEARTBEAT_INTERVAL", 5, integer=True))


def grace_period() -> int:
    """Seconds of silence after which a RUNNING trial belonged to a dead worker
    (VQLOG_HEARTBEAT_GRACE)."""
    return int(env_number("VQLOG_HEARTBEAT_GRACE", 20, integer=True))
