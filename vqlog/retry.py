"""Riding out a tracking outage: an MlflowClient whose calls retry while the server is away.

A sweep runs for hours; an MLflow server restarted meanwhile (an upgrade, a crashed container, a
network blip) must not cost a trial or a metric. Every call through `RetryingClient` retries a
transient failure (connection refused or reset, timeout, HTTP 502/503/504, SQLite's "database is
locked") with backoff, for as long as the outage is shorter than `OUTAGE_LIMIT` seconds, counted
from the first failure of the outage. Past it, `TrackingUnavailable` ends the trial and the sweep
(exit 1): the user restarts the server and reruns the same command.

Metrics are not sent through a blocking retry: `TrialRun` buffers them and `try_call`s the send,
so training goes on during an outage and the buffer is flushed once the server answers again.

MLflow's own HTTP retries (7 with exponential backoff, minutes in all) would hide the outage
from this clock, so `RetryingClient` turns them off for http(s) URIs unless the user has set
MLFLOW_HTTP_REQUEST_MAX_RETRIES.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from vqlog.errors import VqlogError

OUTAGE_LIMIT = float(os.environ.get("VQLOG_TRACKING_OUTAGE_LIMIT", "120"))
BACKOFF_MAX = 5.0  # seconds between two attempts, at most
REQUEST_TIMEOUT = "30"  # seconds per HTTP request (MLflow's default is 120)
TRANSIENT_TEXT = (
    "failed with exception",  # rest_utils: the request itself failed (refused, reset, DNS)
    "Max retries exceeded",
    "Connection refused",
    "Connection aborted",
    "timed out",
    "database is locked",  # SQLite store: another process holds the write lock past its timeout
    "Bad Gateway",
    "Service Unavailable",
    "Gateway Timeout",
)


class TrackingUnavailable(VqlogError):
    """The tracking store stayed unreachable longer than OUTAGE_LIMIT seconds."""


def is_transient(exc: BaseException) -> bool:
    """A failure that a later attempt may not see: the server or the store is briefly away.
    A refused request (bad parameter, unknown run, 401) is not: it would fail again."""
    try:
        import requests

        network = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:  # pragma: no cover - mlflow depends on requests
        network = ()
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain: MlflowException <- requests <- urllib3
        if seen is None:
            break
        if isinstance(seen, (ConnectionError, TimeoutError, *network)):
            return True
        seen = seen.__cause__ or seen.__context__
    status = getattr(exc, "get_http_status_code", lambda: None)()
    if status in (502, 503, 504):
        return True
    text = str(exc)
    return any(t in text for t in TRANSIENT_TEXT)


class RetryingClient:
    """Wraps an MlflowClient; `client.any_method(...)` retries transient failures (see module doc)."""

    def __init__(self, client, describe: str, limit: float | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self._client = client
        self.describe = describe  # the masked URI, for messages
        self.limit = OUTAGE_LIMIT if limit is None else limit
        self._sleep = sleep
        self.down_since: float | None = None  # monotonic time of the outage's first failure
        self.outages = 0  # outages ridden out, for the sweep's closing line

    @property
    def tracking_uri(self) -> str:
        return self._client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        if not callable(getattr(self._client, name)):
            return getattr(self._client, name)

        def call(*args, **kwargs):
            return self.call(name, *args, **kwargs)

        return call

    def call(self, method: str, *args, **kwargs):
        """`client.method(*args, **kwargs)`, retried until it succeeds or the outage passes the
        limit."""
        delay = 0.5
        while True:
            ok, value = self.try_call(method, *args, **kwargs)
            if ok:
                return value
            self._sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX)

    def try_call(self, method: str, *args, **kwargs) -> tuple[bool, Any]:
        """One attempt: (True, result), or (False, None) on a transient failure within the limit.
        Raises TrackingUnavailable past the limit and any non-transient error as it is."""
        try:
            value = getattr(self._client, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sorted below
            if not is_transient(exc):
                raise
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = now
                self.outages += 1
            if now - self.down_since > self.limit:
                raise TrackingUnavailable(
                    f"MLflow tracking at {self.describe} has been unreachable for "
                    f"{now - self.down_since:.0f} s, longer than the limit of {self.limit:.0f} s "
                    f"(VQLOG_TRACKING_OUTAGE_LIMIT); last error: {_short(exc)}"
                ) from None
            return False, None
        self.down_since = None
        return True, value


def quiet_http_retries(uri: str) -> None:
    """One attempt per MLflow HTTP request; RetryingClient does the retrying on its own clock."""
    if uri.split(":", 1)[0].lower() in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
