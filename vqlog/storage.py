"""Optuna storage: URL checks, password masking, RDBStorage with heartbeats (riding out a
database outage: vqlog/outage.py), and the study lock."""

from __future__ import annotations

import contextlib
import os
import zlib
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages._rdb import models  # optuna pinned to 5.0.x (pyproject.toml)
from optuna.trial import TrialState
from sqlalchemy.engine import URL, make_url

from vqlog.errors import UserError
from vqlog.outage import OutageTolerantStorage, StorageOutageError, _Outage, is_connection_error

__all__ = ["StorageOutageError", "StudyLock", "engine_url", "fail_stale_trials", "mask",
           "open_storage", "parse_url"]

SCHEMES = ("sqlite", "postgresql")
# A worker beats every HEARTBEAT seconds; a RUNNING trial silent for GRACE seconds belonged to a
# killed worker: it is failed and retried (up to MAX_RETRY times). Environment overrides exist
# for tests and for clusters with long GC pauses.
HEARTBEAT = int(os.environ.get("VQLOG_HEARTBEAT_INTERVAL", "5"))
GRACE = int(os.environ.get("VQLOG_HEARTBEAT_GRACE", "20"))
MAX_RETRY = 3
TABLES_LOCK = "<tables>"  # the StudyLock name under which a worker creates the tables



def parse_url(url: str, what: str = "--storage") -> URL:
    """An SQLAlchemy URL of a supported scheme, or a UserError that says what to give."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy raises several kinds
        raise UserError(
            f"{what} is not a database URL: {mask(url)} (e.g. sqlite:///optuna.db or "
            "postgresql://user@host:5432/optuna)"
        ) from None
    if parsed.get_backend_name() not in SCHEMES:
        raise UserError(
            f"{what} scheme '{parsed.drivername}' is not supported; use sqlite:/// or postgresql://"
        )
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).expanduser()
        folder = path.resolve().parent
        if not folder.is_dir():
            raise UserError(f"{what}: folder {folder} for the SQLite file does not exist")
        if path.is_dir():
            raise UserError(f"{what}: {path} is a folder; give a file in it, e.g. {path / 'optuna.db'}")
        if path.is_file() and path.stat().st_size and not _is_sqlite(path):
            raise UserError(f"{what}: {path} is not an SQLite database; give a new file name or "
                            "an Optuna database")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError(f"{what}: an in-memory SQLite database cannot be shared; give a file")
    return parsed


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def engine_url(url: URL) -> URL:
    """The URL SQLAlchemy should connect with. SQLAlchemy 2.1 made psycopg (3) the default driver
    of a bare `postgresql://`, but vqlog ships psycopg2-binary: without this, every PostgreSQL URL
    failed with "Failed to import DB access module". An explicit `postgresql+driver://` is kept."""
    if url.drivername == "postgresql":
        return url.set(drivername="postgresql+psycopg2")
    return url


def mask(url: str) -> str:
    """The URL with any password replaced by ***; never print a storage URL any other way."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        # Not parseable: strip everything between '://' and '@', which is where a secret sits.
        head, sep, rest = url.partition("://")
        if sep and "@" in rest:
            return f"{head}://***@{rest.split('@', 1)[1]}"
        return url


def _engine_kwargs(url: URL) -> dict:
    if url.get_backend_name() == "postgresql":
        # pre-ping replaces connections a PostgreSQL restart broke; short connect timeout so an
        # unreachable server is an error, not a hang; TCP keepalives so a query on a connection
        # whose server vanished without a word (a dropped network) fails in about a minute
        # instead of waiting forever.
        return {"pool_pre_ping": True, "connect_args": {
            "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
            "keepalives_interval": 10, "keepalives_count": 3}}
    return {"connect_args": {"timeout": 60}}  # SQLite: wait for a writer instead of 'locked'


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's storage. A PostgreSQL one rides out outages of up to OUTAGE_LIMIT seconds
    (OutageTolerantStorage); opening it does not retry: an unreachable or wrong database is one
    UserError at once."""
    parsed = parse_url(url)
    cls = OutageTolerantStorage if parsed.get_backend_name() == "postgresql" else \
        optuna.storages.RDBStorage
    try:
        # Workers started together on a new database would all create Optuna's tables at once
        # and collide (optuna#820): one at a time, under the lock every worker shares.
        with StudyLock(url, TABLES_LOCK, retry=False):
            return cls(
                engine_url(parsed).render_as_string(hide_password=False),
                engine_kwargs=_engine_kwargs(parsed),
                heartbeat_interval=HEARTBEAT,
                grace_period=GRACE,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY
                ),
            )
    except Exception as exc:  # noqa: BLE001 - connection, auth, missing database ...
        raise UserError(
            f"cannot open the Optuna storage {mask(url)}: {_short(exc)}"
        ) from None


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and retry) the RUNNING trials of killed workers.

    Optuna's own check only sees trials with a heartbeat row. A worker killed between creating
    its trial (`study.ask`) and its heartbeat thread's first beat leaves a RUNNING trial without
    one, which nothing would ever fail, and the exact trial target would wait for it forever.
    Such a trial, started longer than the grace period ago (by the clock of the worker that
    started it), is failed and retried like a stale one.
    """
    optuna.storages.fail_stale_trials(study)
    storage = study._storage  # Optuna's cache in front of the RDBStorage: writes go through it
    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, optuna.storages.RDBStorage) or rdb.heartbeat_interval is None:
        return
    grace = rdb.grace_period or 2 * rdb.heartbeat_interval
    cutoff = datetime.now() - timedelta(seconds=grace)
    old = {t._trial_id: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and t.datetime_start < cutoff}
    if not old:
        return
    beats = models.TrialHeartbeatModel.__table__

    def beating_ids(_: bool = False) -> set[int]:
        with rdb.engine.connect() as conn:
            return set(conn.execute(
                sqlalchemy.select(beats.c.trial_id).where(beats.c.trial_id.in_(list(old)))
            ).scalars())

    beating = rdb._retry(beating_ids) if isinstance(rdb, OutageTolerantStorage) else beating_ids()
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in set(old) - beating:
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile, or another worker failed it first
        if retry is not None:
            retry(study, storage.get_trial(trial_id))


def _short(exc: Exception) -> str:
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return text[:300]


class StudyLock:
    """A lock shared by every worker of one study: PostgreSQL advisory lock, or a file lock
    beside the SQLite file. Re-entrant release: release() when not held is a no-op.

    With `retry`, taking the PostgreSQL lock rides out an outage like the storage does
    (OUTAGE_LIMIT). The advisory lock lives in its own session: a restart ends it and the server
    frees the lock, so release() after an outage has nothing to undo and does not raise."""

    def __init__(self, url: str, study: str, retry: bool = True):
        self.url = parse_url(url)
        self.key = zlib.crc32(f"vqlog:{study}".encode())  # advisory locks take a bigint key
        self.retry = retry
        self._held = False
        self._conn = None
        self._fh = None
        if self.url.get_backend_name() == "postgresql":
            self._engine = sqlalchemy.create_engine(
                engine_url(self.url), poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(self.url)
            )

    def acquire(self) -> None:
        if self._held:
            return
        if self.url.get_backend_name() == "postgresql":
            if self.retry:
                self._conn = _Outage.of(self.url).retry(self._lock_pg)
            else:
                self._conn = self._lock_pg(False)
        else:
            import fcntl

            self._fh = open(f"{Path(self.url.database).expanduser()}.lock", "a+")
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        self._held = True

    def _lock_pg(self, _: bool = False) -> sqlalchemy.Connection:
        conn = self._engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn

    def intact(self) -> bool:
        """Whether the lock is still held: a PostgreSQL restart ends the lock's session, and
        with it the lock, which another worker may then take."""
        if self.url.get_backend_name() != "postgresql":
            return self._held
        if self._conn is None:
            return False
        try:
            self._conn.execute(sqlalchemy.text("SELECT 1"))
        except sqlalchemy.exc.DBAPIError as exc:
            if not is_connection_error(exc):
                raise
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None  # release() has nothing to undo
            return False
        return True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                # the session died (server restart): the server freed the lock with it
            finally:
                with contextlib.suppress(Exception):
                    conn.close()  # closing the session frees the lock even if unlock failed
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
