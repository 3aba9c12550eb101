"""A PostgreSQL restart in the middle of a sweep (GitHub issue 7, item 3): workers reconnect and go
on. The server is a private cluster (tests/_pg_cluster.py) that the tests restart and stop; the
machine's own PostgreSQL is never touched. Without PostgreSQL's server binaries the tests skip,
unless the environment variable CI is set, where they fail.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from _pg_cluster import private_cluster
from _sweep_helpers import (Worker, finished, mlflow_runs, mlflow_uri, states, study_trials,
                            wait_until, write_spec)


@pytest.fixture(scope="module")
def pg():
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def db(pg, request):
    """A fresh database on the private cluster, for one test."""
    return pg.create_database(f"t_{request.node.name[:40].lower()}")


def _heartbeat(url: str, trial_id: int):
    """The trial's last heartbeat, by the server's clock (None before its first beat)."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT heartbeat FROM trial_heartbeats WHERE trial_id = %s", (trial_id,))
            row = cur.fetchone()
        return row and row[0]
    finally:
        conn.close()


def _server_now(url: str):
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT now()::timestamp")
            return cur.fetchone()[0]
    finally:
        conn.close()


# ------------------------------------------------------------------- the storage, in-process


def test_storage_calls_heartbeat_and_lock_ride_out_a_restart(pg, db, monkeypatch):
    """Storage calls in a loop, Optuna's heartbeat thread and the study lock across two restarts:
    no call fails, the heartbeat beats again afterwards, releasing a lock whose session the
    restart ended does not raise, and the lock can be taken again."""
    import optuna
    from optuna.storages._heartbeat import HeartbeatThread

    from vqlog import storage as storage_mod

    monkeypatch.setattr(storage_mod, "HEARTBEAT", 1)
    storage = storage_mod.open_storage(db)
    study = optuna.create_study(study_name="loop", storage=storage)
    trial = study.ask()
    lock = storage_mod.StudyLock(db, "loop")
    lock.acquire()
    errors: list[BaseException] = []
    stop = threading.Event()

    def calls():
        step = 0
        while not stop.is_set():
            try:
                trial.report(float(step), step)
                trial.set_user_attr("step", step)
                assert len(study.get_trials(deepcopy=False)) == 1
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)
                return
            step += 1

    with HeartbeatThread(trial._trial_id, study._storage):
        worker = threading.Thread(target=calls)
        worker.start()
        try:
            wait_until(lambda: _heartbeat(db, trial._trial_id), 10, "the first heartbeat")
            time.sleep(0.5)
            pg.restart()
            time.sleep(0.3)
            pg.restart()  # a second one while the calls reconnect
            after = _server_now(db)
            wait_until(lambda: errors or _heartbeat(db, trial._trial_id) > after, 15,
                       "a heartbeat after the restarts")
            steps = trial.user_attrs.get("step")  # cached: read the storage again below
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join(30)
    assert not errors, repr(errors[0])
    assert study._storage.get_trial(trial._trial_id).user_attrs["step"] != steps
    assert not lock.intact()  # its session ended with the server, and the lock with it
    lock.release()  # nothing to undo: no error
    with storage_mod.StudyLock(db, "loop") as again:
        assert again.intact()
    study.tell(trial, 1.0)
    assert study.trials[0].state.name == "COMPLETE"


def test_a_lost_commit_is_not_repeated(pg, db):
    """A write the server committed but whose reply was lost (the connection died right after
    COMMIT) is retried without being done twice: a waiting trial this worker took stays its own,
    a created trial exists once, and finishing a trial is not answered "already finished"."""
    import optuna
    import psycopg2
    import psycopg2.extensions
    import sqlalchemy

    from vqlog import storage as storage_mod

    lose = {"commits": 0}
    lost: list[set[str]] = []  # the tables each transaction that lost its reply wrote to

    class LosesTheReply(psycopg2.extensions.connection):
        """A transaction that wrote reaches COMMIT on the server; then the connection dies
        before the client hears back (a read's lost commit would prove nothing)."""

        wrote: set[str] = frozenset()

        def commit(self):
            wrote, self.wrote = self.wrote, frozenset()
            super().commit()
            if wrote and lose["commits"]:
                lose["commits"] -= 1
                lost.append(set(wrote))
                self.close()
                raise psycopg2.OperationalError("server closed the connection unexpectedly")

    def note_writes(conn, cursor, statement, *_):
        write = re.match(r"\s*(?:INSERT INTO|UPDATE)\s+(\w+)", statement, re.IGNORECASE)
        if write:
            cursor.connection.wrote = cursor.connection.wrote | {write.group(1)}

    storage = storage_mod.open_storage(db)
    sqlalchemy.event.listen(storage.engine, "do_connect",
                            lambda dialect, rec, cargs, cparams:
                            cparams.update(connection_factory=LosesTheReply))
    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", note_writes)
    storage.engine.dispose()  # pooled connections are plain ones
    study = optuna.create_study(study_name="lost", storage=storage)
    study.enqueue_trial({"x": 1.0})
    lose["commits"] = 1
    queued = study.ask()  # WAITING -> RUNNING; a retry that took this for another's would skip it
    assert queued.number == 0 and queued.suggest_float("x", 0.0, 2.0) == 1.0
    lose["commits"] = 1
    fresh = study.ask()  # creates a trial
    lose["commits"] = 1
    study.tell(queued, 0.5)  # RUNNING -> COMPLETE
    lose["commits"] = 1
    study.tell(fresh, state=optuna.trial.TrialState.PRUNED)
    assert len(lost) == 4 and all("trials" in tables for tables in lost), lost
    trials = study_trials(db, "lost")
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "PRUNED")]
    assert trials[0].value == 0.5


def test_an_outage_past_the_limit_is_one_clear_error(pg, db, monkeypatch):
    """Past VQLOG_DB_OUTAGE_LIMIT a call gives up with an error naming the (masked) URL and the
    limit; the next call after the limit fails at once instead of waiting the limit again."""
    import optuna

    from vqlog import outage
    from vqlog import storage as storage_mod
    from vqlog.errors import VqlogError

    monkeypatch.setattr(outage, "OUTAGE_LIMIT", 2.0)
    storage = storage_mod.open_storage(db.replace("postgres@", "postgres:s3cret@"))
    study = optuna.create_study(study_name="down", storage=storage)
    pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(storage_mod.StorageOutageError) as caught:
            study.get_trials(deepcopy=False)
        assert 2.0 <= time.monotonic() - started < 10
        assert isinstance(caught.value, VqlogError)
        message = str(caught.value)
        assert "s3cret" not in message and "postgres:***@127.0.0.1" in message
        assert "2 s" in message and "VQLOG_DB_OUTAGE_LIMIT" in message
        started = time.monotonic()
        with pytest.raises(storage_mod.StorageOutageError):
            study.set_user_attr("k", 1)
        assert time.monotonic() - started < 2
    finally:
        pg.start()
    study.set_user_attr("k", 2)  # the server is back: the storage works again
    assert study.user_attrs["k"] == 2


def test_an_unreachable_database_at_start_up_fails_at_once(pg):
    """Retries apply only to a storage that was opened: a wrong database is one UserError, now."""
    from vqlog import storage as storage_mod
    from vqlog.errors import UserError

    started = time.monotonic()
    with pytest.raises(UserError, match="cannot open the Optuna storage"):
        storage_mod.open_storage(pg.url("no_such_database"))
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------------- a real worker


@pytest.mark.slow
def test_a_worker_goes_on_through_postgresql_restarts(pg, db, tmp_path, tmp_path_factory):
    """`vqlog-sweep --trials 4` while the server restarts twice (fast shutdown: every session is
    terminated): mid-training of the first trial, down for 3 s, and as the second trial finishes,
    down for 2 s. The worker exits 0 with exactly 4 finished trials, nothing RUNNING, unique
    numbers, every MLflow run FINISHED and no traceback (25-40 s on the shared test machine)."""
    spec = write_spec(tmp_path, "outage", budget={"iteration": 200, "eval_every": 50},
                      pruner="none")
    uri = mlflow_uri(tmp_path, tmp_path_factory)
    worker = Worker(["--trials", "4", "--config", str(spec), "--storage", db,
                     "--tracking-uri", uri], tmp_path,
                    env={"VQLOG_HEARTBEAT_INTERVAL": "1", "VQLOG_HEARTBEAT_GRACE": "20"})
    try:
        def mid_training():
            running = [t for t in study_trials(db, "outage") if t.state.name == "RUNNING"]
            return running and running[0].intermediate_values and running[0]

        victim = wait_until(mid_training, 90, "a trial RUNNING mid-training", alive=[worker])
        pg.restart(downtime=3)  # > the heartbeat interval, and an evaluation's report falls in it
        wait_until(lambda: len(finished(study_trials(db, "outage"))) >= 2, 90,
                   "two finished trials", alive=[worker], interval=0.1)
        pg.restart(downtime=2)  # likely over the study lock and the next trial's creation
        assert worker.wait(120) == 0, worker.output()
    finally:
        worker.kill()
    trials = study_trials(db, "outage")
    assert len(finished(trials)) == 4, states(trials)
    assert states(trials) == {"COMPLETE": 4}, states(trials)  # pruner none: nothing failed
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert trials[victim.number].state.name == "COMPLETE"
    runs = mlflow_runs(uri, "outage")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [0, 1, 2, 3]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert "Traceback" not in worker.stderr, worker.stderr
    assert "outage: 4/4 trials finished (4 ran here, 0 failed)" in worker.stdout
    assert "lost the connection to the Optuna storage" in worker.stderr
