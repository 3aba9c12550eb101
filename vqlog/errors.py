"""Narrow exceptions. The library raises these; the CLI turns a `UserError` into one `Error:` line, exit 2."""


class VqlogError(Exception):
    """Base class of every error vqlog raises on purpose."""


class UserError(VqlogError):
    """Bad input from the user (config, spec, data, URL, flag). The message says how to fix it."""


class ConfigError(UserError):
    """A configuration or sweep spec is invalid; the message names the key."""


class DataError(UserError):
    """A data source is missing, unreadable or unusable; the message names the source."""


class DivergedError(VqlogError):
    """Training produced NaN or Inf. `iteration` is where it was noticed."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration
