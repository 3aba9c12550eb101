"""The MLflow client vqlog uses: tracking URIs checked before anything is created, and calls that
ride out a tracking outage.

URIs: `check_tracking_uri` runs before any study or run exists, so a wrong one is one `Error:`
line (exit 2) instead of minutes of MLflow retries after the Optuna study was created.

Outages: a sweep runs for hours; an MLflow server restarted meanwhile (an upgrade, a crashed
container, a network blip) must not cost a trial or a metric. Every call through `RetryingClient`
retries a transient failure (connection refused or reset, timeout, HTTP 502/503/504, SQLite's
"database is locked") with backoff, for as long as the outage is shorter than
VQLOG_TRACKING_OUTAGE_LIMIT seconds (120), counted from the first failure of the outage. Past
it, `TrackingUnavailable` ends the trial and the sweep (exit 1): the user restarts the server
and reruns the same command.

Metrics are not sent through a blocking retry: `TrialRun` buffers them and `try_call`s the send,
so training goes on during an outage and the buffer is flushed once the server answers again.

MLflow's own HTTP retries (7 with exponential backoff, minutes in all) would hide the outage
from this clock, so the command line turns them off (`quiet_http_retries`) unless the user has
set MLFLOW_HTTP_REQUEST_MAX_RETRIES; a library caller may do the same.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from vqlog.config import env_number
from vqlog.errors import TrackingUnavailable, UserError, find_cause, one_line
from vqlog.urls import (absolute_sqlite, check_at_signs, mask, mask_urls, missing_store_fix, password, sqlite_path,
                        with_psycopg2)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
BACKOFF_MAX = 5.0  # seconds between two attempts, at most
SETTLE = 10.0  # seconds after an outage in which a new failure counts as the same outage
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


def is_transient(exc: BaseException) -> bool:
    """A failure that a later attempt may not see: the server or the store is briefly away.
    A refused request (bad parameter, unknown run, 401) is not: it would fail again."""
    try:
        import requests

        network = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:  # pragma: no cover - mlflow depends on requests
        network = ()
    if find_cause(exc, (ConnectionError, TimeoutError, *network)) is not None:
        return True  # MlflowException <- requests <- urllib3
    status = getattr(exc, "get_http_status_code", lambda: None)()
    if status in (502, 503, 504):
        return True
    text = str(exc)
    if "readonly database" in text:  # SQLite's "attempt to write a readonly database"
        return False
    return any(t in text for t in TRANSIENT_TEXT)


class RetryingClient:
    """Wraps an MlflowClient; `client.any_method(...)` retries transient failures (see module doc)."""

    def __init__(self, client, describe: str, limit: float | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self._client = client
        self.describe = describe  # the masked URI, for messages
        if limit is None:  # read when a client starts: a bad value is an Error line (exit 2)
            limit = env_number("VQLOG_TRACKING_OUTAGE_LIMIT", 120.0)
        self.limit = limit
        self._sleep = sleep
        self.down_since: float | None = None  # monotonic time of the outage's first failure
        self.outages = 0  # outages ridden out, for the sweep's closing line
        self._up_at = float("-inf")  # when the last call that succeeded was sent
        self._back_at = float("-inf")  # when the last outage ended
        self._lock = threading.Lock()  # the bookkeeping above: a run's sender thread shares it

    @property
    def tracking_uri(self) -> str:
        return self._client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        if not callable(getattr(self._client, name)):
            return getattr(self._client, name)

        def call(*args, **kwargs):
            return self.call(name, *args, **kwargs)

        return call

    def call(self, method: str, *args, found: Callable[[Any], Any] | None = None, **kwargs):
        """`client.method(*args, **kwargs)`, retried until it succeeds or the outage passes the
        limit. A call that must not be done twice (a run's creation: a failure can come after
        the server did it, a reply lost to a timeout) gives `found(client)`, which looks for what
        it would have made (None if nothing), before each resend: a run created twice was an
        orphan run of its trial, left RUNNING."""
        delay = 0.5
        while True:
            ok, value = self.try_call(method, *args, **kwargs)
            if ok:
                return value
            self._sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX)
            while found is not None:  # resent only after a look that got through
                ok, value = self._try(lambda: found(self._client))
                if ok:
                    break
                self._sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX)
            if value is not None:
                return value

    def try_call(self, method: str, *args, **kwargs) -> tuple[bool, Any]:
        """One attempt: (True, result), or (False, None) on a transient failure within the limit.
        Raises TrackingUnavailable past the limit and any non-transient error as it is."""
        return self._try(lambda: getattr(self._client, method)(*args, **kwargs))

    def _try(self, attempt: Callable[[], Any]) -> tuple[bool, Any]:
        sent = time.monotonic()
        try:
            value = attempt()
        except Exception as exc:  # noqa: BLE001 - sorted below
            if not is_transient(exc):
                raise
            with self._lock:
                now = time.monotonic()
                if self.down_since is None:
                    if sent < self._up_at:
                        # Sent before a call (another thread's) that got through: it was under
                        # way across the end of the outage, not the start of a new one.
                        return False, None
                    self.down_since = now
                    if now - self._back_at > SETTLE:  # else the same restart, flapping
                        self.outages += 1
                down = now - self.down_since
            if down > self.limit:
                raise TrackingUnavailable(
                    f"MLflow tracking at {self.describe} has been unreachable for {down:.0f} s, "
                    f"longer than the limit of {self.limit:.0f} s (VQLOG_TRACKING_OUTAGE_LIMIT); "
                    f"last error: {mask_urls(one_line(exc, 200))}") from None
            return False, None
        with self._lock:
            if self.down_since is not None:
                self._back_at = time.monotonic()
            self.down_since = None
            self._up_at = max(self._up_at, sent)
        return True, value


def quiet_http_retries() -> None:
    """One attempt per MLflow HTTP request; RetryingClient does the retrying on its own clock.
    Process-wide (environment variables MLflow reads): the command line calls it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT)


STORE_LOCK = "<mlflow store>"  # the PostgreSQL advisory lock under which a store is opened


def open_client(uri: str, sleep: Callable[[float], None] = time.sleep) -> RetryingClient:
    """A RetryingClient on a URI that `store_uri` or `existing_store` returned; `sleep` waits
    between its retries.

    A database store is opened under a lock that every vqlog process on it takes: MLflow creates
    a new store's tables and runs its schema migrations in the first process that opens it, and
    two processes doing that at once break it ("Online migration expected to match one row",
    "table ... already exists"; an SQLite store can be left half migrated for good)."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    def store() -> MlflowClient:
        from vqlog.failpoints import failpoint
        from vqlog.study.stop import signals_deferred

        new = _may_be_new(uri)
        with _store_lock(uri), signals_deferred() if new else contextlib.nullcontext():
            failpoint("store.open")  # a Ctrl-C there waits for a whole new store
            return MlflowClient(tracking_uri=uri)  # opens the store: creates and migrates a new one

    # Opening it rides out an outage as every later call does (a database store restarting, an
    # SQLite file another process holds locked): retried, then TrackingUnavailable past the limit.
    client = RetryingClient(SimpleNamespace(open=store), mask(uri), sleep=sleep).call("open")
    return RetryingClient(client, mask(uri), sleep=sleep)


def _may_be_new(uri: str) -> bool:
    """Whether opening the store may create it: a database store, other than an SQLite file that
    holds something already (a server made its own when it started)."""
    if uri.lower().startswith(("http://", "https://")):
        return False
    path = sqlite_path(uri)
    return path is None or not path.is_file() or path.stat().st_size == 0


def _store_lock(uri: str):
    """The lock `open_client` holds while MLflow opens a database store: an advisory lock on
    PostgreSQL, a passing lock file beside an SQLite file. None for a server (it made its store
    when it started)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "postgresql":
        from vqlog.study.storage import StudyLock

        return StudyLock(uri, STORE_LOCK, label="the MLflow store")
    path = sqlite_path(uri) if scheme == "sqlite" else None
    if path is None:
        return contextlib.nullcontext()
    return PassingLock(path.with_name(path.name + ".store.lock"))


class PassingLock:
    """An exclusive file lock whose file exists only while it is held: taken around a moment
    (opening a store), it leaves nothing in the user's folder. The holder unlinks the file before
    it lets go; a waiter that then gets the lock of the unlinked file sees that the path no
    longer names it and tries again on a new file. A folder this process cannot write in gets no
    lock: a store there is only read."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def __enter__(self) -> PassingLock:
        import fcntl

        while True:
            try:
                fh = open(self.path, "a")
            except OSError:
                return self
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fh = fh
                return self
            fh.close()  # the holder before us unlinked it: the lock is on a new file now

    def __exit__(self, *exc) -> None:
        if self._fh is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:  # pragma: no cover - only a holder unlinks it
            pass
        self._fh.close()  # releases the flock
        self._fh = None


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI a command uses: the flag, else $MLFLOW_TRACKING_URI, else the embedded
    store sqlite:///mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def store_uri(uri: str | None) -> str:
    """The tracking URI to hand MLflow: checked (UserError if it cannot work), SQLite paths made
    absolute, a bare postgresql:// given the psycopg2 driver. None: `resolve_tracking_uri`."""
    uri = absolute_sqlite(resolve_tracking_uri(uri))
    check_tracking_uri(uri)
    return with_psycopg2(uri)


class MissingStore(UserError):
    """An SQLite tracking store that does not exist (yet)."""


class StoreUnreachable(UserError):
    """A tracking server or database store that does not answer (yet): down, starting, or a
    wrong address."""


def existing_store(uri: str | None) -> str:
    """`store_uri` for commands that only read: an SQLite file that does not exist is an error,
    MissingStore (MLflow would silently create an empty store there)."""
    given = resolve_tracking_uri(uri)
    checked = store_uri(given)
    path = sqlite_path(checked)
    if path is not None and not path.is_file():
        raise MissingStore(f"no MLflow store at {given}; "
                           + missing_store_fix(uri, "--tracking-uri", "MLFLOW_TRACKING_URI"))
    if path is None:
        return checked
    with _store_lock(checked):  # a store a sweep is creating now is waited for
        tables = sqlite_tables(path)
    if not tables - {"sqlite_sequence"}:  # MLflow would make it a store: a reader leaves it be
        raise MissingStore(f"{given} is an empty SQLite file, not an MLflow store; run "
                           "vqlog-sweep first or pass the store it wrote with --tracking-uri")
    if "experiments" not in tables and "studies" not in tables:
        raise MissingStore(f"{given} is not an MLflow store (its tables are not MLflow's); pass "
                           "the store vqlog-sweep wrote with --tracking-uri")
    return checked


def sqlite_tables(path: Path) -> set[str]:
    """The table names of an SQLite file, read without changing it. A file that cannot be read
    (not SQLite, locked) passes as MLflow's: MLflow then says what is wrong with it."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as conn:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error:
        return {"?", "experiments"}


def check_writable_store(uri: str) -> None:
    """An SQLite tracking store that a sweep can write (a read-only one was taken for an outage
    and waited out, with MLflow's errors in the output)."""
    from vqlog.files import read_only_part

    path = sqlite_path(uri)
    if path is not None and (part := read_only_part(path)):
        raise UserError(f"--tracking-uri {mask(uri)}: {part} cannot be written here; a "
                        "sweep writes every trial's run there")


def check_tracking_uri(uri: str) -> None:
    """Fail before the first trial when the tracking URI cannot work (exit 2, password masked)."""
    check_at_signs(uri, "--tracking-uri")
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        from vqlog.tracking.server import check_server

        check_server(uri)
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not path:
            raise UserError(f"--tracking-uri {uri} needs a file, e.g. sqlite:///mlflow.db")
        if path.split("?", 1)[0] == ":memory:":  # MLflow's own processes would each see another
            raise UserError("--tracking-uri: an in-memory SQLite store keeps nothing and cannot "
                            "be shared; give a file, e.g. sqlite:///mlflow.db")
        folder = Path(path).expanduser().resolve().parent
        if not folder.is_dir():
            raise UserError(f"--tracking-uri: folder {folder} for the SQLite file does not exist")
        if Path(path.split("?", 1)[0]).expanduser().exists():  # a new file is created later
            _check_database(uri)
    elif scheme in DB_SCHEMES:
        _check_database(uri)
    else:
        raise UserError(
            f"--tracking-uri must be sqlite:///FILE, a database URL or http(s)://HOST:PORT; "
            f"got {mask(uri)}"
        )


def _check_database(uri: str) -> None:
    """Connect once before any study exists: a missing database or a file that is not one is
    bad input (MLflow would retry for minutes, then fail after the Optuna study was created)."""
    import sqlalchemy

    engine = None
    try:
        postgres = uri.startswith("postgresql")
        engine = sqlalchemy.create_engine(
            with_psycopg2(uri), poolclass=sqlalchemy.pool.NullPool,
            connect_args={"connect_timeout": 10} if postgres else {},
        )
        with engine.connect() as conn:
            tables = set(sqlalchemy.inspect(conn).get_table_names())  # an SQLite file: read
    except Exception as exc:  # noqa: BLE001 - driver, auth, missing database, not a database
        reason = one_line(getattr(exc, "orig", None) or exc, 200)
        secret = password(uri)
        if secret:
            reason = reason.replace(secret, "***")
        if is_transient(exc):  # a server that is down or restarting, a file held locked
            raise StoreUnreachable(f"cannot reach the MLflow store {mask(uri)}: {reason}; start "
                                   "it or pass another --tracking-uri") from None
        raise UserError(
            f"cannot open the MLflow store {mask(uri)}: {reason}; create it or pass another "
            "--tracking-uri"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()
    if {"studies", "version_info"} <= tables:  # both keep their schema version in alembic_version
        what = ("holds both Optuna's and MLflow's tables" if "experiments" in tables
                else "is an Optuna storage (it holds Optuna's tables)")
        raise UserError(f"--tracking-uri {mask(uri)} {what}; give MLflow a database of its own, "
                        "e.g. sqlite:///mlflow.db")
