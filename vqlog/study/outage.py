"""Riding out a restart of the study's database with public APIs only (see `vqlog.study.storage`):
an outage clock per database, new connections that wait for the server, and vqlog's own calls
sent again after a connection error. Past VQLOG_DB_OUTAGE_LIMIT: StorageOutageError.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from vqlog.config import env_number, grace_period, heartbeat_interval
from vqlog.errors import StorageOutageError, find_cause, one_line

T = TypeVar("T")
MAX_PAUSE = 4.0  # seconds: the longest pause between two tries to reach the database
log = logging.getLogger("vqlog")


def outage_limit() -> float:
    """Seconds an opened PostgreSQL storage may stay unreachable (VQLOG_DB_OUTAGE_LIMIT)."""
    return env_number("VQLOG_DB_OUTAGE_LIMIT", 120.0)


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the connection failed (server down or restarting, session
    terminated, network) rather than the request, so the request may be sent again.
    OperationalError also covers deadlocks and serialization failures: rolled back, and as safe
    to send again."""
    err = find_cause(exc, sqlalchemy.exc.DBAPIError)
    if err is not None:
        return err.connection_invalidated or isinstance(err, sqlalchemy.exc.OperationalError)
    try:  # raised by the driver itself, before SQLAlchemy could wrap it (connecting)
        import psycopg2
    except ImportError:  # pragma: no cover - a dependency
        return False
    return find_cause(exc, psycopg2.OperationalError) is not None


class Outage:
    """Since when one database has been unreachable, shared by everything that talks to it (the
    storage, the heartbeat thread, the study lock): an outage is timed once and reported with
    one line when it begins and one when it ends."""

    _all: dict[str, Outage] = {}
    _all_lock = threading.Lock()

    def __init__(self, what: str, label: str = "the Optuna storage"):
        self.what, self.label, self.since = what, label, None
        self.hold_until = float("-inf")  # time.monotonic() until which a trial may look dead
        self._lock = threading.Lock()

    @classmethod
    def of(cls, url: str | URL, label: str = "the Optuna storage") -> Outage:
        """The outage clock of the database at `url`; `label`: what its lines call it."""
        url = make_url(url)
        what = url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)
        with cls._all_lock:
            return cls._all.setdefault(what, cls(what, label))

    def seconds_down(self, exc: BaseException) -> float:
        """Note a failed attempt; the seconds since the outage began (0 if it begins now)."""
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                log.warning("vqlog: lost the connection to %s %s (%s); retrying for up to %g s "
                            "(VQLOG_DB_OUTAGE_LIMIT)", self.label, self.what, root_cause(exc),
                            outage_limit())
            return time.monotonic() - self.since

    def ended(self) -> None:
        with self._lock:
            if self.since is not None:
                now = time.monotonic()
                log.warning("vqlog: reconnected to %s %s after %.1f s", self.label, self.what,
                            now - self.since)
                # No worker could beat meanwhile. Its last beat came up to a beat before this
                # process saw the outage begin (which may itself be a beat late), and it may
                # reconnect up to the longest pause after this one: an outage that long held
                # against the grace period can make a live trial look dead, until a grace period
                # and two beats from now. (The latest end of any such outage counts.)
                grace, interval = grace_period(), heartbeat_interval()
                if now - self.since + 2 * interval + MAX_PAUSE >= grace:
                    self.hold_until = max(self.hold_until, now + grace + 2 * interval)
                self.since = None

    def may_look_dead(self) -> bool:
        """Whether a live worker's trial may look dead (no beat for the grace period) because
        of an outage of this database: one is under way, or one long enough for it ended less
        than a grace period and two beats ago. A lost reply's moment is not one."""
        with self._lock:
            return self.since is not None or time.monotonic() < self.hold_until

    def retry(self, attempt: Callable[[], T], on_error: Callable[[], None] = lambda: None) -> T:
        """`attempt()` until it gets through. After a connection error: `on_error()`, a pause
        (0.25 s, doubling up to 4 s) and again, until the outage is older than the limit; then
        StorageOutageError. Past the limit every call makes one attempt, so a worker that gives
        up does not wait the limit once per call."""
        delay, limit = 0.25, outage_limit()
        while True:
            try:
                result = attempt()
            except StorageOutageError:
                raise
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                on_error()
                down = self.seconds_down(exc)
                if down >= limit:
                    raise StorageOutageError(
                        f"{self.label} {self.what} has been unreachable for {down:.0f} s, "
                        f"longer than the outage limit of {limit:g} s (VQLOG_DB_OUTAGE_LIMIT). "
                        "The study is safe in the database: once it is back, rerun the same "
                        f"command. Last error: {root_cause(exc)}"
                    ) from exc
                time.sleep(min(delay, limit - down + 0.05))
                delay = min(2 * delay, MAX_PAUSE)
                continue
            self.ended()
            return result

    def wait_to_connect(self, engine: sqlalchemy.Engine) -> None:
        """Make every new connection of `engine` wait for the server during an outage."""

        def connect(dialect, _record, cargs, cparams):
            return self.retry(lambda: dialect.connect(*cargs, **cparams))

        sqlalchemy.event.listen(engine, "do_connect", connect)


def restarted_lately(storage: optuna.storages.RDBStorage) -> bool:
    """Whether the PostgreSQL server of `storage` started so lately, by its own clock, that a
    live worker may not have beaten since: nobody could beat while it was down, however long,
    and a worker reconnects up to the longest pause after it is back. Unlike `Outage`, which
    knows the outages this process saw, this holds for every process: a worker on another host,
    one started in a dead one's place, a rerun. (A failover to a standby that was already up, or
    a cut network, is seen only by the processes it cut off.)"""
    try:
        with storage.engine.connect() as conn:
            uptime = conn.execute(READY_SINCE).scalar()
    except sqlalchemy.exc.DBAPIError as exc:
        if is_connection_error(exc):
            raise  # sent again by the caller's `retrying`
        if not UNKNOWN_START:  # a server that does not say (a PostgreSQL-like one): no hold
            log.warning("vqlog: cannot read when %s started (%s); the check for dead workers' "
                        "trials does not wait after its restarts", Outage.of(storage.url).what,
                        root_cause(exc))
        UNKNOWN_START.append(True)
        return False
    return float(uptime) < grace_period() + 2 * heartbeat_interval() + MAX_PAUSE


# Seconds since the server was last ready: its launchers start once recovery is over, and again
# after a crash of any of its processes (which ends every session, yet keeps the postmaster's
# start time); their start times are hidden from a user without pg_read_all_stats, who gets the
# postmaster's.
READY_SINCE = sqlalchemy.text(
    "SELECT EXTRACT(EPOCH FROM now() - COALESCE((SELECT max(backend_start) FROM pg_stat_activity "
    "WHERE backend_type IN ('autovacuum launcher', 'logical replication launcher')), "
    "pg_postmaster_start_time()))")
UNKNOWN_START: list[bool] = []  # said once per process


def root_cause(exc: BaseException) -> str:
    """The driver's message behind `exc`, on one line."""
    err = find_cause(exc, sqlalchemy.exc.DBAPIError)
    return one_line(getattr(err, "orig", None) or exc, 300)


def retrying(storage: optuna.storages.BaseStorage, call: Callable[[], T]) -> T:
    """`call()`, sent again after a connection error for as long as the database's outage is
    shorter than the limit. Only for calls that are safe to repeat (see the module doc)."""
    if not isinstance(storage, optuna.storages.RDBStorage) or storage.engine.name != "postgresql":
        return call()
    return Outage.of(storage.url).retry(call, on_error=storage.remove_session)
