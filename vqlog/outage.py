"""Riding out a PostgreSQL outage (a restart, a failover, a network blip) once the storage is
open: Optuna's storage calls, the heartbeat and the study lock retry with backoff for up to
OUTAGE_LIMIT seconds, then give up with StorageOutageError (exit 1; rerun to resume)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import secrets
import threading
import time
from datetime import datetime
from typing import Callable, TypeVar

import optuna
import sqlalchemy
from optuna.storages._rdb import models  # optuna pinned to 5.0.x (pyproject.toml)
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import URL, make_url

from vqlog.errors import VqlogError

# How long an opened PostgreSQL storage may stay unreachable before a worker gives up.
OUTAGE_LIMIT = float(os.environ.get("VQLOG_DB_OUTAGE_LIMIT", "120"))
WRITE_TOKEN = "vqlog:write_token"  # trial system attr: which write last changed the trial

log = logging.getLogger(__name__)
T = TypeVar("T")


def _short(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]


class StorageOutageError(VqlogError):
    """The database stayed unreachable longer than the outage limit (not bad input: exit 1)."""


def _dbapi_error(exc: BaseException | None) -> sqlalchemy.exc.DBAPIError | None:
    """The driver's error behind an Optuna or SQLAlchemy one: Optuna wraps SQLAlchemy's errors
    in StorageInternalError (`__cause__`); an error SQLAlchemy raised while cleaning up after a
    dead connection (PendingRollbackError) has the failure as `__context__`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlalchemy.exc.DBAPIError):
            return exc
        nxt = exc.__cause__
        if nxt is None and isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
            nxt = exc.__context__
        exc = nxt
    return None


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the connection failed (server down or restarting, session terminated,
    network) rather than the request, so that the request may be sent again. OperationalError
    covers refused connections, "the database system is starting up", terminated sessions, and
    deadlocks and serialization failures (rolled back: also safe to send again)."""
    err = _dbapi_error(exc)
    return err is not None and (err.connection_invalidated
                                or isinstance(err, sqlalchemy.exc.OperationalError))


def _root(exc: BaseException) -> str:
    return _short(_dbapi_error(exc) or exc)


class _Outage:
    """Since when one database has been unreachable, shared by everything that uses it (storage
    calls, the heartbeat thread, the study lock): an outage is timed once, and reported with
    one line when it begins and one when it ends."""

    _all: dict[str, _Outage] = {}
    _all_lock = threading.Lock()

    def __init__(self, what: str):
        self.what, self.since = what, None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, url: URL) -> _Outage:
        what = url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)
        with cls._all_lock:
            return cls._all.setdefault(what, cls(what))

    def failed(self, exc: BaseException) -> float:
        """Seconds since the outage began (0 if it begins now)."""
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                log.warning("vqlog: lost the connection to the Optuna storage %s (%s); retrying "
                            "for up to %g s (VQLOG_DB_OUTAGE_LIMIT)", self.what, _root(exc),
                            OUTAGE_LIMIT)
            return time.monotonic() - self.since

    def ended(self) -> None:
        if self.since is not None:
            with self._lock:
                if self.since is not None:
                    log.warning("vqlog: reconnected to the Optuna storage %s after %.1f s",
                                self.what, time.monotonic() - self.since)
                    self.since = None

    def retry(self, attempt: Callable[[bool], T], on_error: Callable[[], None] = lambda: None) -> T:
        """`attempt(retrying)` until it gets through. After a connection error: `on_error()`, a
        pause (0.25 s, doubling up to 4 s) and again with retrying=True, until OUTAGE_LIMIT
        seconds since the outage began; then StorageOutageError. Past the limit every call
        makes one attempt, so a worker that gives up does not wait the limit once per call."""
        delay, retrying = 0.25, False
        while True:
            try:
                result = attempt(retrying)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                on_error()
                down = self.failed(exc)
                if down >= OUTAGE_LIMIT:
                    raise StorageOutageError(
                        f"the Optuna storage {self.what} has been unreachable for {down:.0f} s, "
                        f"longer than the outage limit of {OUTAGE_LIMIT:g} s "
                        "(VQLOG_DB_OUTAGE_LIMIT). The study is safe in the database: once it is "
                        f"back, rerun the same command. Last error: {_root(exc)}"
                    ) from exc
                time.sleep(min(delay, OUTAGE_LIMIT - down + 0.05))
                delay, retrying = min(2 * delay, 4.0), True
                continue
            self.ended()
            return result


class OutageTolerantStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage that rides out a database outage once it was opened.

    `pool_pre_ping` only replaces pooled connections that a restart broke; a query in flight when
    the server went down, or one sent while it is still down, fails. Here such a call is sent
    again (_Outage.retry) for up to OUTAGE_LIMIT seconds.

    A connection can also die after the server committed a write and before its reply arrived,
    so a retried write may already have taken effect. Reads and Optuna's upserts are harmless to
    repeat. The two writes that are not, creating a trial and changing a trial's state, stamp a
    random token (trial system attr WRITE_TOKEN) in their transaction, and a retry first looks
    for it: found, the first attempt committed. Without it a retry would create a second trial
    (RUNNING, run by nobody), call a trial this worker just finished "already finished", or
    take a waiting trial this worker just took for someone else's.

    The heartbeat does not wait: a beat that fails is skipped and the thread beats again an
    interval later. An outage longer than the grace period can cost the running trials: another
    worker fails them as stale, and their retries run later.
    """

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self._outage = _Outage.of(make_url(url))

    def _retry(self, attempt: Callable[[bool], T]) -> T:
        return self._outage.retry(attempt, on_error=self._drop_session)

    def _drop_session(self) -> None:
        """A new session, and so a new pooled connection, for this thread's next attempt."""
        with contextlib.suppress(Exception):
            self.scoped_session.remove()

    def _write_once(self, write: Callable[..., T], committed: Callable[[int], T]) -> T:
        """`write(session, token)` in one transaction, sent again after a connection error
        unless the token shows the first attempt committed: then `committed(trial_id)`."""
        token = secrets.token_hex(8)
        attrs = models.TrialSystemAttributeModel.__table__

        def attempt(retrying: bool) -> T:
            if retrying:
                with self.engine.connect() as conn:
                    trial_id = conn.execute(sqlalchemy.select(attrs.c.trial_id).where(
                        attrs.c.key == WRITE_TOKEN, attrs.c.value_json == json.dumps(token))
                    ).scalar()
                if trial_id is not None:
                    return committed(trial_id)
            with _create_scoped_session(self.scoped_session) as session:
                return write(session, token)

        return self._retry(attempt)

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None
                          ) -> FrozenTrial:
        """Optuna 5.0's, stamped, and without its own retry loop, which would create the trial
        again after a lost commit. Returns the trial as it was created."""

        def write(session, token: str) -> FrozenTrial:
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            frozen = copy.deepcopy(template_trial) if template_trial else FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                datetime_complete=None, params={}, distributions={}, user_attrs={},
                system_attrs={}, intermediate_values={}, trial_id=-1)  # what Optuna makes
            frozen.system_attrs = {**frozen.system_attrs, WRITE_TOKEN: token}
            row = self._get_prepared_new_trial(study_id, frozen, session)
            frozen.number, frozen.datetime_start, frozen._trial_id = \
                row.number, row.datetime_start, row.trial_id
            return frozen

        return self._write_once(write, super().get_trial)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        """Optuna 5.0's, stamped when it changes the state."""

        def write(session, token: str) -> bool:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            self.check_trial_is_updatable(trial_id, trial.state)
            for objective, v in enumerate(values or ()):
                self._set_trial_value_without_commit(session, trial, objective, v)
            if state == TrialState.RUNNING and trial.state != TrialState.WAITING:
                return False  # another worker took this waiting trial
            self._set_trial_attr_without_commit(
                session, models.TrialSystemAttributeModel, trial_id, WRITE_TOKEN, token)
            trial.state = state
            if state == TrialState.RUNNING:
                trial.datetime_start = datetime.now()
            if state.is_finished():
                trial.datetime_complete = datetime.now()
            return True

        try:
            return self._write_once(write, lambda _: True)
        except sqlalchemy.exc.IntegrityError:
            return False

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self._drop_session()
            self._outage.failed(exc)  # skip this beat; the thread beats again an interval later
        else:
            self._outage.ended()


def _retried(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return self._retry(lambda _: method(self, *args, **kwargs))

    return call


# The calls harmless to send again. The public methods built on them (get_all_trials,
# set_trial_param, get_best_trial, ...) are covered through them. create_new_study sent again
# after a lost commit raises DuplicatedStudyError: create_study(load_if_exists=True) then loads it.
for _name in ("create_new_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
              "_set_trial_param", "get_trial_param", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial_user_attrs",
              "get_trial_system_attrs", "get_trial_id_from_study_id_trial_number", "get_trial",
              "_get_trials", "_get_best_trial_id", "_get_stale_trial_ids"):
    setattr(OutageTolerantStorage, _name, _retried(getattr(optuna.storages.RDBStorage, _name)))
