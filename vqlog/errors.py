"""Every exception vqlog raises on purpose, and the two helpers that turn exceptions into messages.

The library raises these; the CLI turns a `UserError` into one `Error:` line and exit 2, any other
`VqlogError` into one `Error:` line and exit 1.
"""

from __future__ import annotations


class VqlogError(Exception):
    """Base class of every error vqlog raises on purpose."""


class UserError(VqlogError):
    """Bad input from the user (config, spec, data, URL, flag). The message says how to fix it."""


class ConfigError(UserError):
    """A configuration or sweep spec is invalid; the message names the key."""


class DataError(UserError):
    """A data source is missing, unreadable or unusable; the message names the source."""


class RateError(DataError):
    """The data's sample rate cannot be used as given: `what` is the problem, `advice` the fix
    when training (which sets resample_hz). `kind`: "given" (--sample-rate for data that carries
    its own rate), "resample" (no rational ratio reaches the target) or "unknown" (a file that does
    not say, and none given). `vqlog encode`, where the model fixes the rate, gives its own
    advice."""

    def __init__(self, what: str, advice: str, kind: str):
        super().__init__(f"{what}; {advice}")
        self.what, self.advice, self.kind = what, advice, kind


class DivergedError(VqlogError):
    """Training produced NaN or Inf. `iteration` is where it was noticed."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


class TrainingStopped(VqlogError):
    """`fit` was asked to stop (SIGTERM, Ctrl-C): its state was checkpointed at `iteration`."""

    def __init__(self, iteration: int):
        super().__init__(f"stopped at iteration {iteration}")
        self.iteration = iteration


class SweepError(VqlogError):
    """The sweep cannot go on, though the input was fine (five failed trials in a row): exit 1."""


class StorageOutageError(VqlogError):
    """The Optuna database stayed unreachable longer than VQLOG_DB_OUTAGE_LIMIT: exit 1."""


class TrackingUnavailable(VqlogError):
    """The MLflow tracking store stayed unreachable longer than VQLOG_TRACKING_OUTAGE_LIMIT."""


def one_line(text: object, limit: int | None = None) -> str:
    """`text` (an exception or any object) as one line: whitespace runs become one space, cut to
    `limit` characters. Library messages span lines; an `Error:` line and a table cell do not."""
    line = " ".join(str(text).split())
    return line if limit is None else line[:limit]


def find_cause(exc: BaseException | None, kinds: type | tuple[type, ...]) -> BaseException | None:
    """`exc`, or the first exception of `kinds` in its chain of causes and contexts, else None.

    Libraries wrap what went wrong: Optuna puts SQLAlchemy's error in `__cause__`, SQLAlchemy an
    error met while cleaning up in `__context__`, MLflow the requests error in both."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def out_of_memory(exc: BaseException) -> str | None:
    """A short reason for an allocation torch could not make (its CPU allocator, a GPU's), with
    its size where the message gives it; None for any other exception. Torch's own message is a
    paragraph naming its C++ source file."""
    import re

    text = str(exc)
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text):
        return None
    size = None
    if m := re.search(r"allocate (\d+) bytes", text):  # torch's CPU allocator
        size = f"{int(m.group(1)) / 2**30:.1f} GiB"
    elif m := re.search(r"allocate ([0-9.]+ [KMGT]?i?B)", text):  # CUDA's, numpy's
        size = m.group(1)
    return "out of memory" + (f" (one allocation of {size})" if size else "")
