"""The Optuna side of a study: its storage (URL checks, RDBStorage with heartbeats, riding out a
database restart), the lock its workers share, and opening the study (dead workers' trials are
failed and retried in `vqlog.study.retries`).

Database outages, with public APIs only. A PostgreSQL restart breaks every open connection:
- pooled connections are checked before use (SQLAlchemy's `pool_pre_ping`) and replaced;
- a new connection to a server that is down waits for it (a `do_connect` listener on the engine)
  instead of failing, for up to VQLOG_DB_OUTAGE_LIMIT seconds of outage;
- a request in flight when the server went down fails; vqlog sends its own requests again
  (`retrying`), and every one of them is safe to repeat: reads, upserts, and `study.tell(...,
  skip_if_finished=True)`. A trial created twice by a commit whose reply was lost is RUNNING
  with nobody's claim on it, and `retries.fail_stale_trials` fails and retries it like a dead
  worker's. (Optuna itself tries a trial's creation again after a failed commit: see README.)
Past the limit a call raises StorageOutageError (exit 1; rerunning resumes the study).
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
import zlib
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import URL, make_url

from vqlog.config import grace_period, heartbeat_interval
from vqlog.data import check_same_data
from vqlog.errors import UserError
from vqlog.files import read_only_part
from vqlog.study.space import check_space
from vqlog.study.outage import Outage, is_connection_error, retrying, root_cause
from vqlog.study.retries import retry_killed
from vqlog.tracking.lineage import STUDY_UID
from vqlog.urls import check_at_signs, expand_sqlite_home, mask, missing_store_fix, with_psycopg2

SCHEMES = ("sqlite", "postgresql")
DEFAULT_STORAGE = "sqlite:///optuna.db"
TABLES_LOCK = "<tables>"  # the StudyLock name under which a worker creates Optuna's tables
ENQUEUED = "vqlog.enqueued"  # study user attr: the spec's rows were enqueued
DATA = "vqlog.data"  # study user attr: the data its trials ran on (vqlog.data.DataCache.identity)
# What the objective's values are, for optuna-dashboard's axes (not "Objective 0").
METRIC_NAMES = {"mse": ["final_val_mse"], "pareto": ["final_val_mse", "max_val_perplexity"]}


# ------------------------------------------------------------------------------------ URLs


def resolve_storage(url: str | None) -> str:
    """The storage URL a command uses: the flag, else $OPTUNA_STORAGE, else sqlite:///optuna.db;
    an SQLite path's `~` expanded."""
    return expand_sqlite_home(url or os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE)


def parse_url(url: str, what: str = "--storage") -> URL:
    """An SQLAlchemy URL of a supported scheme, or a UserError that says what to give."""
    check_at_signs(url, what)
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy raises several kinds
        raise UserError(f"{what} is not a database URL: {mask(url)} (e.g. sqlite:///optuna.db "
                        "or postgresql://user@host:5432/optuna)") from None
    backend = parsed.get_backend_name()
    if backend not in SCHEMES:
        raise UserError(f"{what} scheme '{parsed.drivername}' is not supported; use sqlite:/// "
                        "or postgresql://")
    try:  # the driver the URL names (SQLAlchemy would say so only once connecting)
        make_url(with_psycopg2(url)).get_dialect().import_dbapi()
    except sqlalchemy.exc.NoSuchModuleError:
        raise UserError(f"{what}: {parsed.drivername}:// is not a driver SQLAlchemy knows; use "
                        "postgresql:// or sqlite:///") from None
    except ImportError as exc:
        raise UserError(f"{what}: the driver of {parsed.drivername}:// is not installed "
                        f"({exc.name or exc}); use postgresql:// (psycopg2, installed with vqlog) "
                        "or sqlite:///") from None
    if backend == "sqlite":
        if parsed.host or parsed.username or parsed.password or parsed.port:  # sqlite://x/y.db:
            raise UserError(f"{what}: {mask(url)} has a host part; an SQLite URL has three "
                            "slashes before a relative path (sqlite:///x/y.db) and four before "
                            "an absolute one (sqlite:////data/y.db)")
        if parsed.database in (None, "", ":memory:"):
            raise UserError(f"{what}: an in-memory SQLite database cannot be shared; give a file")
        path = Path(parsed.database).expanduser()
        folder = path.resolve().parent
        if not folder.is_dir():
            raise UserError(f"{what}: folder {folder} for the SQLite file does not exist")
        if path.is_dir():
            raise UserError(f"{what}: {path} is a folder; give a file in it, e.g. {path / 'optuna.db'}")
        if path.is_file() and path.stat().st_size and not _is_sqlite(path):
            raise UserError(f"{what}: {path} is not an SQLite database; give a new file name or "
                            "an Optuna database")
    return parsed


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def engine_kwargs(url: URL) -> dict:
    if url.get_backend_name() == "postgresql":
        # pre-ping replaces connections a PostgreSQL restart broke; a short connect timeout makes
        # an unreachable server an error, not a hang; TCP keepalives make a query on a connection
        # whose server vanished without a word (a dropped network) fail in about a minute.
        return {"pool_pre_ping": True, "connect_args": {
            "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
            "keepalives_interval": 10, "keepalives_count": 3}}
    return {"connect_args": {"timeout": 60}}  # SQLite: wait for a writer instead of 'locked'


# --------------------------------------------------------------------------------- storage


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's storage, with heartbeats. Opening does not wait: an unreachable or wrong
    database is one UserError at once; once open, a PostgreSQL storage rides out outages."""
    parsed = parse_url(url)
    try:
        # Workers started together on a new database would all create Optuna's tables at once
        # and collide (optuna#820): one at a time, under the lock every worker shares.
        with StudyLock(url, TABLES_LOCK, wait=False), warnings.catch_warnings():
            # the heartbeat arguments and their callback are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                with_psycopg2(parsed.render_as_string(hide_password=False)),
                engine_kwargs=engine_kwargs(parsed),
                heartbeat_interval=heartbeat_interval(),
                grace_period=grace_period(),
                heartbeat_stale_trial_callback=retry_killed,
            )
    except Exception as exc:  # noqa: BLE001 - connection, auth, missing database ...
        raise UserError(f"cannot open the Optuna storage {mask(url)}: {root_cause(exc)}") from None
    if parsed.get_backend_name() == "postgresql":
        Outage.of(parsed).wait_to_connect(storage.engine)
    return storage


def check_writable(url: str) -> None:
    """An SQLite storage that a sweep can write: the file, or the folder a new one goes in (a
    read-only one failed at the first commit, after the sweep had started)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.query:  # mode=ro, uri=true, ...
        raise UserError(f"--storage {mask(url)}: a sweep's SQLite URL takes no options "
                        f"(?{'&'.join(parsed.query)}); give sqlite:///FILE")
    if parsed.get_backend_name() == "sqlite" and (part := read_only_part(parsed.database)):
        raise UserError(f"--storage {mask(url)}: {part} cannot be written here; a sweep "
                        "writes every trial there")


def check_reachable(url: str) -> None:
    """The storage answers (server, database, credentials) and is not MLflow's, checked with one
    plain connection that creates nothing: a wrong one is found before a sweep loads torch. A
    new SQLite file is left alone (`parse_url` checks its folder)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database).expanduser().is_file():
        return
    engine = sqlalchemy.create_engine(with_psycopg2(parsed.render_as_string(hide_password=False)),
                                      poolclass=sqlalchemy.pool.NullPool, **engine_kwargs(parsed))
    try:
        with engine.connect() as conn:
            tables = set(sqlalchemy.inspect(conn).get_table_names())
    except Exception as exc:  # noqa: BLE001 - connection, auth, missing database ...
        raise UserError(f"cannot open the Optuna storage {mask(url)}: {root_cause(exc)}") from None
    finally:
        engine.dispose()
    if {"experiments", "runs"} <= tables:  # both keep their schema version in alembic_version
        what = ("holds both MLflow's and Optuna's tables" if "studies" in tables
                else "is an MLflow store (it holds MLflow's tables)")
        raise UserError(f"--storage {mask(url)} {what}; give Optuna a database of its own, "
                        "e.g. sqlite:///optuna.db")


def read_only_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage at `url` as it is: no table created, no lock taken."""
    parsed = parse_url(url)
    return optuna.storages.RDBStorage(with_psycopg2(parsed.render_as_string(hide_password=False)),
                                      engine_kwargs=engine_kwargs(parsed),
                                      skip_table_creation=True)


def load_existing_study(given: str | None, name: str | None) -> optuna.Study:
    """The existing study of --storage `given` (or its default), read-only: no file, table or
    study is created; `name` None: the only study. UserError names what is missing."""
    url, fix = resolve_storage(given), missing_store_fix(given, "--storage", "OPTUNA_STORAGE")
    parsed = parse_url(url)
    file = Path(parsed.database).expanduser() if parsed.get_backend_name() == "sqlite" else None
    if file is not None and not file.is_file():
        raise UserError(f"no Optuna storage at {mask(url)}; {fix}")
    try:
        storage = read_only_storage(url)
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - connection, auth, not an Optuna database ...
        # An MLflow store given as --storage says so (asked every time: SQLite's "no such table"
        # is an OperationalError as a lost connection is, and a dead server is waited for twice)
        check_reachable(url)
        if file is not None and file.stat().st_size == 0:
            raise UserError(f"{mask(url)} is an empty SQLite file, not an Optuna storage; "
                            f"{fix}") from None
        raise UserError(f"cannot open the Optuna storage {mask(url)}: {root_cause(exc)}") from None
    if name is None and len(names) == 1:
        name = names[0]
    elif name is None:
        raise UserError(f"several studies in {mask(url)} ({', '.join(sorted(names))}); choose one "
                        "with --study" if names else f"{mask(url)} holds no study; {fix}")
    if name not in names:
        there = f"studies there: {', '.join(sorted(names))}" if names else "it holds no study"
        raise UserError(f"no study '{name}' in {mask(url)} ({there}); check --study and --storage")
    return optuna.load_study(study_name=name, storage=storage)


def check_directions(study: optuna.Study, spec) -> None:
    have = [d.name.lower() for d in study.directions]
    if have != spec.directions:
        raise UserError(
            f"study '{spec.name}' already exists with directions {have}, but this spec's objective "
            f"'{spec.objective}' needs {spec.directions}; use another --study name"
        )


def open_study(spec, url: str, seed: int | None = None, data: dict | None = None
               ) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """The spec's study in the storage at `url`, created or loaded, with the spec's sampler and
    pruner. The spec's rows are enqueued once per study, by whichever worker (or `vqlog init`)
    comes first. The worker and `vqlog init` both open studies here. `data`: the identity of the
    worker's data, which the study records on its first sweep and refuses to mix with another."""
    storage = open_storage(url)
    with StudyLock(url, spec.name):
        study = retrying(storage, lambda: optuna.create_study(
            storage=storage, study_name=spec.name, directions=spec.directions,
            sampler=spec.make_sampler(seed), pruner=spec.make_pruner(), load_if_exists=True))
        check_directions(study, spec)
        retrying(storage, lambda: check_space(storage, spec))
        if not retrying(storage, lambda: study.user_attrs.get(STUDY_UID)):  # new, or older vqlog's
            retrying(storage, lambda: study.set_user_attr(STUDY_UID, uuid.uuid4().hex))
        if data is not None:
            recorded = retrying(storage, lambda: study.user_attrs.get(DATA))
            if check_same_data(recorded, data, spec.name, lambda: has_finished(study)):
                retrying(storage, lambda: study.set_user_attr(DATA, data))
        names = METRIC_NAMES[spec.objective]
        if retrying(storage, lambda: study.metric_names) != names:
            with warnings.catch_warnings():  # set_metric_names is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retrying(storage, lambda: study.set_metric_names(names))
        if spec.enqueue and not retrying(storage, lambda: study.user_attrs.get(ENQUEUED)):
            for row in spec.enqueue:
                retrying(storage, lambda row=row: study.enqueue_trial(row, skip_if_exists=True))
            retrying(storage, lambda: study.set_user_attr(ENQUEUED, True))
    return study, storage


def has_finished(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# ------------------------------------------------------------------------------------ lock


# The server's own TCP keepalives on a lock's session: the lock goes with the session, and a host
# that crashed or was cut off while holding it kept it for the kernel's default 2 hours, every
# other worker blocked. (Set in the session: poolers refuse it as a startup option.)
KEEPALIVES = sqlalchemy.text(
    "SELECT set_config('tcp_keepalives_idle', '30', false), "
    "set_config('tcp_keepalives_interval', '10', false), set_config('tcp_keepalives_count', '3', false)")


class StudyLock:
    """A lock shared by every worker of one study: a PostgreSQL advisory lock, or a file lock
    beside the SQLite file. Release when not held is a no-op.

    The advisory lock lives in its own session. Taking it waits out an outage like the storage
    does, unless `wait` is False (opening the storage). A restart ends the session and the server
    frees the lock with it, so release() after an outage has nothing to undo and does not raise."""

    def __init__(self, url: str, study: str, wait: bool = True, purpose: str = "",
                 label: str = "the Optuna storage"):
        self.url, self.label = parse_url(url), label  # label: what an outage's lines call it
        # advisory locks take a bigint key; `purpose` names another lock of the same study
        self.key = zlib.crc32(f"vqlog:{study}{':' + purpose if purpose else ''}".encode())
        self.file = f"{Path(self.url.database).expanduser()}{'.' + purpose if purpose else ''}.lock" \
            if self.url.get_backend_name() == "sqlite" else None
        self.wait = wait
        self._conn = self._fh = None  # held: the advisory lock's session, or the locked file
        if self.url.get_backend_name() == "postgresql":
            self._engine = sqlalchemy.create_engine(
                with_psycopg2(self.url.render_as_string(hide_password=False)),
                poolclass=sqlalchemy.pool.NullPool, **engine_kwargs(self.url))

    @property
    def _held(self) -> bool:  # set by taking's last step: no Ctrl-C between it and the lock
        return self._conn is not None or self._fh is not None

    def acquire(self) -> None:
        if self._held:
            return
        if self.url.get_backend_name() == "postgresql":
            self._conn = Outage.of(self.url, self.label).retry(self._lock_pg) if self.wait \
                else self._lock_pg()
        else:
            import fcntl

            fh = open(self.file, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except BaseException:  # Ctrl-C while waiting or as it was taken: closing frees it
                fh.close()  # (a notebook's kept traceback would hold it and hang the next take)
                raise
            self._fh = fh

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it, without waiting (one try; in an outage: False)."""
        if self._held:
            return True
        if self.url.get_backend_name() == "postgresql":
            conn = None
            try:
                conn = self._engine.connect()
                conn.execute(KEEPALIVES)
                got = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"),
                                   {"k": self.key}).scalar()
            except BaseException as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                if isinstance(exc, Exception) and is_connection_error(exc):
                    return False
                raise
            if not got:
                conn.close()
                return False
            self._conn = conn
        else:
            import fcntl

            fh = open(self.file, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                return False
            self._fh = fh
        return True

    def _lock_pg(self) -> sqlalchemy.Connection:
        conn = self._engine.connect()
        try:
            conn.execute(KEEPALIVES)
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            return conn
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def lost(self) -> bool:
        """Whether the session of a PostgreSQL lock has died since it was taken (a server
        restart, a cut network): the server freed the lock, and another worker may hold it.
        Such a lock is no longer held here (release() has nothing to undo)."""
        if self._conn is None:
            return False  # a file lock goes only with this process
        try:
            self._conn.execute(sqlalchemy.text("SELECT 1"))
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                conn.close()
            return True
        return False

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                # the session died (a server restart): the server freed the lock with it
            finally:
                with contextlib.suppress(Exception):
                    conn.close()  # closing the session frees the lock even if unlock failed
        fh, self._fh = self._fh, None  # not held from here on, whatever comes next
        if fh is not None:
            fh.close()  # closing the file drops its lock

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
