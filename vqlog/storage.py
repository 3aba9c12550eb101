"""Optuna storage: URL checks, password masking, RDBStorage with heartbeats, and the study lock."""

from __future__ import annotations

import os
import zlib
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import URL, make_url

from vqlog.errors import UserError

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
            "postgresql://user:password@host:5432/optuna)"
        ) from None
    if parsed.get_backend_name() not in SCHEMES:
        raise UserError(
            f"{what} scheme '{parsed.drivername}' is not supported; use sqlite:/// or postgresql://"
        )
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise UserError(f"{what}: folder {folder} for the SQLite file does not exist")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError(f"{what}: an in-memory SQLite database cannot be shared; give a file")
    return parsed


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
        # unreachable server is an error, not a hang.
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {"connect_args": {"timeout": 60}}  # SQLite: wait for a writer instead of 'locked'


def open_storage(url: str) -> optuna.storages.RDBStorage:
    parsed = parse_url(url)
    try:
        # Workers started together on a new database would all create Optuna's tables at once
        # and collide (optuna#820): one at a time, under the lock every worker shares.
        with StudyLock(url, TABLES_LOCK):
            return optuna.storages.RDBStorage(
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
    from optuna.storages._rdb.models import TrialHeartbeatModel  # optuna pinned to 5.0.x

    grace = rdb.grace_period or 2 * rdb.heartbeat_interval
    cutoff = datetime.now() - timedelta(seconds=grace)
    old = {t._trial_id: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and t.datetime_start < cutoff}
    if not old:
        return
    beats = TrialHeartbeatModel.__table__
    with rdb.engine.connect() as conn:
        beating = set(conn.execute(
            sqlalchemy.select(beats.c.trial_id).where(beats.c.trial_id.in_(list(old)))
        ).scalars())
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
    beside the SQLite file. Re-entrant release: release() when not held is a no-op."""

    def __init__(self, url: str, study: str):
        self.url = parse_url(url)
        self.key = zlib.crc32(f"vqlog:{study}".encode())  # advisory locks take a bigint key
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
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        else:
            import fcntl

            self._fh = open(f"{Path(self.url.database).expanduser()}.lock", "a+")
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._conn is not None:
            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            finally:
                self._conn.close()  # closing the session frees the lock even if unlock failed
                self._conn = None
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
