"""A PostgreSQL restart in the middle of a sweep: workers reconnect and go on, with Optuna's public
API and SQLAlchemy's only (vqlog/study/storage.py). The server is a private cluster (tests/_pg_cluster.py) that the tests restart and stop; the
machine's own PostgreSQL is never touched. Without PostgreSQL's server binaries the tests skip,
unless the environment variable CI is set, where they fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest
from _pg_cluster import private_cluster
from _sweep_helpers import (Worker, checkpointed_runs, finished, mlflow_runs, retried_from,
                            states, stopped, study_trials, wait_until, write_spec)


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


def _trial_id(storage, study_name: str, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), number)


def test_storage_calls_heartbeat_and_lock_ride_out_a_restart(pg, db, monkeypatch):
    """vqlog's storage calls in a loop (through `retrying`), its heartbeat thread and the study
    lock across two restarts: no call fails, the heartbeat beats again afterwards, releasing a
    lock whose session the restart ended does not raise, and the lock can be taken again."""
    import optuna

    from vqlog.study import storage as storage_mod
    from vqlog.study.outage import retrying
    from vqlog.study.trial import Heartbeat

    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    storage = storage_mod.open_storage(db)
    study = optuna.create_study(study_name="loop", storage=storage)
    trial = study.ask()
    trial_id = _trial_id(storage, "loop", trial.number)
    lock = storage_mod.StudyLock(db, "loop")
    lock.acquire()
    errors: list[BaseException] = []
    stop = threading.Event()

    def calls():
        step = 0
        while not stop.is_set():
            try:
                retrying(storage, lambda: trial.report(float(step), step))
                retrying(storage, lambda: trial.set_user_attr("step", step))
                got = retrying(storage, lambda: study.get_trials(deepcopy=False))
                assert len(got) == 1
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)
                return
            step += 1

    with Heartbeat(storage, trial_id):
        worker = threading.Thread(target=calls)
        worker.start()
        try:
            wait_until(lambda: _heartbeat(db, trial_id), 10, "the first heartbeat")
            time.sleep(0.5)
            pg.restart()
            time.sleep(0.3)
            pg.restart()  # a second one while the calls reconnect
            after = _server_now(db)
            wait_until(lambda: errors or _heartbeat(db, trial_id) > after, 15,
                       "a heartbeat after the restarts")
            steps = storage.get_trial(trial_id).user_attrs.get("step")
            # the calls go on (waited for: after two restarts close together, the calls' pause
            # between tries may have grown to seconds)
            wait_until(lambda: errors or storage.get_trial(trial_id).user_attrs.get("step")
                       != steps, 30, "calls after the restarts")
        finally:
            stop.set()
            worker.join(30)
    assert not errors, repr(errors[0])
    lock.release()  # its session ended with the server, and the lock with it: nothing to undo
    with storage_mod.StudyLock(db, "loop"):
        pass
    study.tell(trial, 1.0)
    assert study.trials[0].state.name == "COMPLETE"


def test_an_outage_longer_than_the_grace_period_fails_no_live_trial(pg, db, monkeypatch):
    """Nobody can beat while the database is down: after an outage longer than the grace
    period every running trial looked dead, and the first worker to check for stale trials
    failed them all, each counted as a kill, their work since the last checkpoint lost. The
    check now waits a grace period (and two beats) after the outage this process saw end: a
    live trial beats again meanwhile and is kept, a dead one is still failed and retried."""
    import optuna

    from vqlog.study import storage as storage_mod
    from vqlog.study.outage import MAX_PAUSE, Outage, retrying
    from vqlog.study.retries import CLAIM, KILLS, fail_stale_trials, original_number

    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "3")
    storage = storage_mod.open_storage(db)
    study = optuna.create_study(study_name="long", storage=storage)
    live, dead = study.ask(), study.ask()
    ids = {t.number: _trial_id(storage, "long", t.number) for t in (live, dead)}
    for trial in (live, dead):
        trial.set_user_attr(CLAIM, trial.number)
        storage.record_heartbeat(ids[trial.number])  # then the dead one's worker is killed
    # a process that will see no outage (a worker on another host, a rerun): it imports now, and
    # checks when told to
    elsewhere = subprocess.Popen([sys.executable, "-c", STALE_CHECK, db, "long"], text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env={**os.environ})
    try:
        pg.stop()
        # this process's calls wait the outage out, as a worker's heartbeat thread does
        waiting = threading.Thread(target=retrying, args=(storage, lambda: storage.get_trial(
            ids[live.number])))
        waiting.start()
        time.sleep(5)  # longer than the grace period
        pg.start()
        waiting.join(30)
        assert Outage.of(db).since is None and Outage.of(db).may_look_dead()  # ended, and held
        fail_stale_trials(study, storage)  # as another worker's check does, before a live beat
        assert [t.state.name for t in study.get_trials()] == ["RUNNING", "RUNNING"]
        # The process that saw no outage holds too: the server's restart is the database's own
        # record.
        out, err = elsewhere.communicate("check\n", timeout=120)
    finally:
        if elsewhere.poll() is None:
            elsewhere.kill()
            elsewhere.communicate()
    assert elsewhere.returncode == 0, err
    assert out.split() == ["False", "RUNNING", "RUNNING"], out
    storage.record_heartbeat(ids[live.number])  # the live worker beats again; the dead one not
    # the grace period, two beats and the longest pause between tries after the restart
    time.sleep(3 + 2 * 1 + MAX_PAUSE + 0.5)
    storage.record_heartbeat(ids[live.number])
    fail_stale_trials(study, storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials[:2]] == ["RUNNING", "FAIL"]
    (retry,) = trials[2:]
    assert retry.state.name == "WAITING" and original_number(retry) == dead.number
    assert retry.user_attrs[KILLS] == 1
    storage.engine.dispose()


STALE_CHECK = """
import sys
import optuna
from vqlog.study.outage import Outage
from vqlog.study.retries import fail_stale_trials
from vqlog.study.storage import open_storage
sys.stdin.readline()
storage = open_storage(sys.argv[1])
study = optuna.load_study(study_name=sys.argv[2], storage=storage)
fail_stale_trials(study, storage)
print(Outage.of(sys.argv[1]).may_look_dead(), *(t.state.name for t in study.get_trials()))
"""


def test_a_short_outage_after_a_long_one_keeps_the_long_ones_hold(monkeypatch):
    """Only the latest outage was kept: a lost reply just after a long outage ended its hold on
    the check for dead workers' trials, while live workers had not beaten again yet."""
    from vqlog.study.outage import Outage

    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "7")  # an outage of 1 s or more holds it
    outage = Outage("postgresql://nowhere/held")
    assert not outage.may_look_dead()
    outage.seconds_down(ConnectionError("down"))
    assert outage.may_look_dead()  # under way
    time.sleep(1.2)
    outage.ended()
    assert outage.may_look_dead()  # long enough: held for 7 s and two beats
    outage.seconds_down(ConnectionError("a lost reply"))
    outage.ended()
    assert outage.may_look_dead()  # a moment's outage does not end the hold
    short = Outage("postgresql://nowhere/short")
    short.seconds_down(ConnectionError("a lost reply"))
    short.ended()
    assert not short.may_look_dead()  # and holds nothing by itself


class _LostReplies:
    """Connections whose next `n` transactions that write reach COMMIT on the server, and then
    die before the client hears back (a read's lost commit would prove nothing); with `only`,
    the next `n` whose statements match that pattern."""

    def __init__(self, storage, monkeypatch):
        import functools

        import psycopg2
        import psycopg2.extensions
        import sqlalchemy

        lost = self
        self.n, self.tables, self.only = 0, [], None

        class LosesTheReply(psycopg2.extensions.connection):
            wrote: frozenset = frozenset()
            matched = False

            def commit(self):
                wrote, self.wrote = self.wrote, frozenset()
                matched, self.matched = self.matched, False
                super().commit()
                if wrote and lost.n and (lost.only is None or matched):
                    lost.n -= 1
                    lost.tables.append(set(wrote))
                    self.close()
                    raise psycopg2.OperationalError("server closed the connection unexpectedly")

        def note_writes(conn, cursor, statement, *_):
            write = re.match(r"\s*(?:INSERT INTO|UPDATE)\s+(\w+)", statement, re.IGNORECASE)
            if write:
                cursor.connection.wrote = cursor.connection.wrote | {write.group(1)}
            if lost.only is not None and re.search(lost.only, statement):
                cursor.connection.matched = True

        # The driver's own connect, with this factory: vqlog's connect listener calls it.
        monkeypatch.setattr(psycopg2, "connect", functools.partial(
            psycopg2.connect, connection_factory=LosesTheReply))
        sqlalchemy.event.listen(storage.engine, "before_cursor_execute", note_writes)
        storage.engine.dispose()  # pooled connections are plain ones

    def next(self, n: int = 1, only: str | None = None) -> None:
        self.n, self.only = n, only


def _past_a_restarts_hold(storage) -> None:
    """Wait until the check for dead workers' trials no longer holds for the server's last
    start (the module's cluster may have just started, or been restarted by a test before)."""
    from vqlog.study.outage import restarted_lately

    wait_until(lambda: not restarted_lately(storage), 60, "the restart's hold to pass")


def test_a_crash_restart_of_the_server_holds_the_check_for_dead_workers_trials(pg, db,
                                                                             monkeypatch):
    """A server process killed (the out-of-memory killer's usual victim) makes PostgreSQL end
    every session and start again, after recovery, with the postmaster's start time kept: a
    hold counted from that time missed it, and every live trial could look dead after it."""
    import os
    import signal

    import psycopg2

    from vqlog.study import storage as storage_mod
    from vqlog.study.outage import restarted_lately

    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "3")
    storage = storage_mod.open_storage(db)
    _past_a_restarts_hold(storage)
    victim = psycopg2.connect(db, connect_timeout=5)
    with victim.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        os.kill(cur.fetchone()[0], signal.SIGKILL)
    victim.close()

    def ready() -> bool:
        try:
            psycopg2.connect(db, connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    time.sleep(0.5)
    wait_until(ready, 60, "the server back from its crash restart")
    assert restarted_lately(storage)
    storage.engine.dispose()


def test_a_lost_commit_is_never_done_twice_nor_left_behind(pg, db, monkeypatch):
    """A write the server committed but whose reply was lost (the connection died right after
    COMMIT) and that is sent again. Telling a result again finds it told (skip_if_finished), so
    the trial is finished once, with its value. Asking again after a lost reply takes the next
    trial; the one the lost attempt took is RUNNING with nobody's claim on it, and
    `fail_stale_trials` fails it after the grace period and queues its retry, same params."""
    import optuna
    from optuna.trial import TrialState

    from vqlog.study import storage as storage_mod
    from vqlog.study.outage import retrying
    from vqlog.study.retries import CLAIM, fail_stale_trials

    # A lost reply is an outage of a moment: too short to hold up the check for dead workers'
    # trials (its length, a beat and the longest pause between tries stay under the grace).
    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "8")
    storage = storage_mod.open_storage(db)
    lose = _LostReplies(storage, monkeypatch)
    study = optuna.create_study(study_name="lost", storage=storage)
    study.enqueue_trial({"x": 1.0})
    study.enqueue_trial({"x": 2.0})

    lose.next()
    first = retrying(storage, study.ask)  # WAITING -> RUNNING, reply lost: again
    assert first.suggest_float("x", 0.0, 3.0) == 2.0  # the second queued trial
    retrying(storage, lambda: first.set_user_attr(CLAIM, first.number))
    lose.next()
    frozen = retrying(storage, lambda: study.tell(first, 0.5, skip_if_finished=True))
    assert frozen.state == TrialState.COMPLETE and frozen.value == 0.5
    assert len(lose.tables) == 2 and all("trials" in t for t in lose.tables), lose.tables

    _past_a_restarts_hold(storage)
    fail_stale_trials(study, storage)  # sees the trial the lost ask took, unclaimed
    assert [t.state.name for t in study_trials(db, "lost")] == ["RUNNING", "COMPLETE"]
    time.sleep(8.5)  # past the grace period
    fail_stale_trials(study, storage)  # the trial the lost ask took: failed, retried
    trials = study_trials(db, "lost")
    assert [(t.number, t.state.name) for t in trials] == [
        (0, "FAIL"), (1, "COMPLETE"), (2, "WAITING")]
    assert retried_from(trials[2]) == 0
    fail_stale_trials(study, storage)  # again: nothing more to fail or retry
    assert len(study_trials(db, "lost")) == 3
    retry = study.ask()  # the queued retry, with the lost trial's parameters
    assert retry.number == 2 and retry.suggest_float("x", 0.0, 3.0) == 1.0


def test_a_dead_workers_unclaimed_trial_keeps_its_retry_when_the_fails_reply_is_lost(
        pg, db, monkeypatch):
    """The check for dead workers' trials failed a RUNNING trial nobody had claimed, then queued
    its retry. A FAIL whose reply was lost, sent again, found the trial failed and queued no
    retry, and a check killed between the two lost it too. The retry is queued first now: the
    FAIL sent again finds the trial failed, and its retry is there, once."""
    import optuna

    from vqlog.study import storage as storage_mod
    from vqlog.study.retries import fail_stale_trials, retry_history

    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "2")
    storage = storage_mod.open_storage(db)
    lose = _LostReplies(storage, monkeypatch)
    study = optuna.create_study(study_name="unclaimed", storage=storage)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})  # then killed
    _past_a_restarts_hold(storage)
    fail_stale_trials(study, storage)  # sees it unclaimed
    time.sleep(2.5)  # past the grace period
    lose.next(only=r"SET state=\S+, datetime_complete")  # the FAIL's commit, whose reply is lost
    fail_stale_trials(study, storage)
    assert lose.tables == [{"trials"}] and lose.n == 0  # it was lost, and sent again
    trials = study_trials(db, "unclaimed")
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "WAITING")]
    assert retry_history(trials[1]) == [trial.number]
    assert trials[1].params == trials[0].params
    storage.engine.dispose()


def test_a_dead_workers_stale_trial_keeps_its_retry_when_the_fails_reply_is_lost(
        pg, db, monkeypatch):
    """Optuna's check for stale trials commits FAIL for each, then calls the retry callback.
    A FAIL whose reply was lost ended that check; sent again, it found no stale trial, and the
    dead worker's trial was left FAILed without its retry. The check now queues it, once."""
    import optuna

    from vqlog.study import storage as storage_mod
    from vqlog.study.retries import CLAIM, KILLS, fail_stale_trials, retry_history

    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "2")
    storage = storage_mod.open_storage(db)
    lose = _LostReplies(storage, monkeypatch)
    study = optuna.create_study(study_name="stale", storage=storage)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    trial.set_user_attr(CLAIM, trial.number)  # as its worker claims it
    storage.record_heartbeat(_trial_id(storage, "stale", trial.number))  # then it is killed
    _past_a_restarts_hold(storage)
    time.sleep(2.5)  # past the grace period
    lose.next(only=r"SET state=\S+, datetime_complete")  # Optuna's FAIL, whose reply is lost
    fail_stale_trials(study, storage)
    assert lose.tables == [{"trials"}] and lose.n == 0  # it was lost, and sent again
    fail_stale_trials(study, storage)  # again: nothing more to retry
    trials = study_trials(db, "stale")
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "WAITING")]
    assert retry_history(trials[1]) == [trial.number] and trials[1].user_attrs[KILLS] == 1
    storage.engine.dispose()


def test_an_outage_past_the_limit_is_one_clear_error(pg, db, monkeypatch):
    """Past VQLOG_DB_OUTAGE_LIMIT a call gives up with an error naming the (masked) URL and the
    limit; the next call after the limit fails at once instead of waiting the limit again."""
    import optuna

    from vqlog.errors import StorageOutageError, VqlogError
    from vqlog.study import storage as storage_mod
    from vqlog.study.outage import retrying

    monkeypatch.setenv("VQLOG_DB_OUTAGE_LIMIT", "2")
    storage = storage_mod.open_storage(db.replace("postgres@", "postgres:s3cret@"))
    study = optuna.create_study(study_name="down", storage=storage)
    pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageOutageError) as caught:
            retrying(storage, lambda: study.get_trials(deepcopy=False))
        assert 2.0 <= time.monotonic() - started < 10
        assert isinstance(caught.value, VqlogError)
        message = str(caught.value)
        assert "s3cret" not in message and "postgres:***@127.0.0.1" in message
        assert "2 s" in message and "VQLOG_DB_OUTAGE_LIMIT" in message
        started = time.monotonic()
        with pytest.raises(StorageOutageError):
            study.set_user_attr("k", 1)  # not even through `retrying`: connecting waits too
        assert time.monotonic() - started < 2
    finally:
        pg.start()
    study.set_user_attr("k", 2)  # the server is back: the storage works again
    assert study.user_attrs["k"] == 2


def test_a_stopped_trials_retry_is_not_queued_again_when_optuna_gives_up(pg, db, monkeypatch):
    """A stopping worker queues its trial's retry through Optuna's `add_trial`. Optuna itself
    tries a trial's creation again after a failed commit, up to five times, even when the
    commit went through and only its reply was lost: each such try is a copy of the retry,
    which vqlog cannot prevent through Optuna's public API (said in the README). When all five
    fail, vqlog sends the call again (`retrying`): that resend finds the copies and adds none."""
    import optuna

    from vqlog.study import storage as storage_mod
    from vqlog.study.outage import retrying
    from vqlog.study.retries import mark_stopped, original_number, queue_again, queue_once

    storage = storage_mod.open_storage(db)
    lose = _LostReplies(storage, monkeypatch)
    for name, queue, copies in (("once", queue_once, 5), ("again", queue_again, 6)):
        study = optuna.create_study(study_name=name, storage=storage)
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
        mark_stopped(trial)
        frozen = storage.get_trial(_trial_id(storage, name, trial.number))
        lose.next(5)  # every one of Optuna's five tries commits, and loses its reply
        retrying(storage, lambda: queue(study, frozen))
        waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
        assert [original_number(t) for t in waiting] == [trial.number] * copies, name
    storage.engine.dispose()


def test_an_unreachable_database_at_start_up_fails_at_once(pg):
    """Waiting applies only to a storage that was opened: a wrong database is one UserError, now."""
    from vqlog.errors import UserError
    from vqlog.study import storage as storage_mod

    started = time.monotonic()
    with pytest.raises(UserError, match="cannot open the Optuna storage"):
        storage_mod.open_storage(pg.url("no_such_database"))
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------------- a real worker


@pytest.mark.slow
def test_a_worker_goes_on_through_postgresql_restarts(pg, db, tmp_path, mlflow_store):
    """`vqlog-sweep --trials 4` while the server restarts twice (fast shutdown: every session is
    terminated): mid-training of the first trial, down for 3 s, and as the second trial finishes,
    down for 2 s. The worker never exits early and prints no traceback; it ends with exactly 4
    finished trials, nothing RUNNING, unique numbers, and every MLflow run in its trial's state.
    A trial the restart cost may be failed, and then its retry is one of the 4: one that was
    running, or one whose creation committed while its reply was lost, which nobody ran (it has
    no MLflow run) and which is failed and retried after the grace period (25-40 s here)."""
    spec = write_spec(tmp_path, "outage", budget={"iteration": 200, "eval_every": 50},
                      pruner="none")
    uri = mlflow_store()
    # --debug: an unexpected error's traceback is in the failure's output (it failed once in
    # CI with a StorageInternalError after the second restart, not reproduced alone)
    worker = Worker(["--trials", "4", "--config", str(spec), "--storage", db,
                     "--tracking-uri", uri, "--debug"], tmp_path,
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
    print(states(trials), worker.output())  # shown when the test fails
    assert len(finished(trials)) == 4 and set(states(trials)) <= {"COMPLETE", "FAIL"}
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # unique, none lost
    failed = [t.number for t in trials if t.state.name == "FAIL"]
    assert sorted(n for t in trials if (n := retried_from(t)) is not None) == failed
    assert trials[victim.number].state.name == "COMPLETE" or victim.number in failed
    run_numbers = [int(r.data.tags["optuna.trial_number"]) for r in mlflow_runs(uri, "outage")]
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in mlflow_runs(uri, "outage")}
    assert sorted(run_numbers) == sorted(runs)  # at most one run per trial
    # Every trial that ran has its run; one that a lost reply created and nobody ran has none.
    assert {t.number for t in finished(trials)} <= set(runs) <= set(numbers)
    for number, run in runs.items():
        state = trials[number].state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "FAIL": "FAILED"}[state]
    assert "Traceback" not in worker.stderr, worker.stderr
    ran = len(runs)
    assert f"outage: 4/4 trials finished ({ran} ran here, {ran - 4} failed)" in worker.stdout
    assert "lost the connection to the Optuna storage" in worker.stderr
    assert "lost the connection to the Optuna storage" in worker.stderr


def test_a_restart_that_frees_the_study_lock_before_an_ask_runs_no_trial_over_the_target(
        pg, db, tmp_path, mlflow_store):
    """The study lock (an advisory lock) goes with its session when the server restarts. A
    worker that had counted the trials under it, 0 of 1, then asked for the one trial after
    another worker had taken the lock and asked for it too: two trials ran for `--trials 1`.
    The worker finds its lock gone after the ask, counts again under the lock, and fails the
    trial it asked for when it is one too many, unrun; a queued row is queued again."""
    import signal

    from vqlog.study.retries import SET_ASIDE

    rows = [{"batch": 8, "lr": 1e-3, "embedding_dim": 8, "embedding_num": 16},
            {"batch": 16, "lr": 2e-3, "embedding_dim": 16, "embedding_num": 32}]
    spec = write_spec(tmp_path, "unlocked", budget={"iteration": 6, "eval_every": 3},
                      pruner="none", enqueue=rows)
    uri = mlflow_store()
    args = ["--trials", "1", "--config", str(spec), "--storage", db, "--tracking-uri", uri]
    first = Worker(args, tmp_path / "first", "first",
                   env={"VQLOG_FAILPOINT": "worker.ask:1:SIGSTOP"})
    try:
        wait_until(lambda: stopped(first.proc.pid), 120, "the first worker to stop at its ask",
                   alive=[first])
        pg.restart()  # ends every session: the first worker's lock is free
        second = Worker(args, tmp_path / "second", "second")
        assert second.wait(240) == 0, second.output()
        os.kill(first.proc.pid, signal.SIGCONT)
        assert first.wait(240) == 0, first.output()
    finally:
        first.kill()
    trials = study_trials(db, "unlocked")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"], first.output()
    assert trials[0].params == rows[0] and trials[1].user_attrs["fail_reason"] == SET_ASIDE
    assert retried_from(trials[2]) == 1 and trials[2].system_attrs["fixed_params"] == rows[1]
    assert [r.data.tags["optuna.trial_number"] for r in mlflow_runs(uri, "unlocked")] == ["0"]
    assert "unlocked: 1/1 trials finished (0 ran here" in first.stdout, first.output()
    assert "Traceback" not in first.stderr


def test_the_workers_parent_passes_a_stop_on_while_the_database_is_down(pg, db, tmp_path,
                                                                         mlflow_store):
    """`vqlog-sweep --workers 2`, SIGTERM (docker compose stop, Slurm) while PostgreSQL is down:
    the parent passes the stop on at once, and both workers checkpoint their trials before the
    server is back. Before, the parent's progress read waited out the outage in its connect
    (up to VQLOG_DB_OUTAGE_LIMIT) and only then passed the stop on: a grace period shorter
    than the outage (docker stop's default 10 s, compose's 60 s here) ran out with the trials
    unsaved. Once the server is back, the trials are queued again and
    the sweep exits 143."""
    import signal

    spec = write_spec(tmp_path, "downstop", pruner="none",
                      budget={"iteration": 100000, "eval_every": 100000, "checkpoint_every": 0})
    uri = mlflow_store()
    worker = Worker(["--trials", "4", "--workers", "2", "--config", str(spec), "--storage", db,
                     "--tracking-uri", uri, "--debug"], tmp_path,
                    env={"VQLOG_DB_OUTAGE_LIMIT": "300"})
    down = False
    try:
        def training():  # both trials have their run: past every database call before fit's
            trials = [t for t in study_trials(db, "downstop") if t.state.name == "RUNNING"]
            return len(trials) == 2 and all("mlflow.run_id" in t.user_attrs for t in trials)

        wait_until(training, 240, "two trials training", alive=[worker])
        time.sleep(2)
        pg.stop()
        down = True
        time.sleep(3)  # the parent's next progress reads find the server gone
        worker.signal(signal.SIGTERM)

        wait_until(lambda: checkpointed_runs(uri, "downstop") == 2, 60, "both trials checkpointed, server down",
                   alive=[worker])
        assert not pg.running()
        pg.start()
        down = False
        assert worker.wait(120) == 143, worker.output()
    finally:
        if down:
            pg.start()
        worker.kill()
    trials = study_trials(db, "downstop")
    assert "RUNNING" not in states(trials) and not finished(trials), states(trials)
    assert states(trials).get("WAITING") == 2  # each stopped trial queued again, to resume
    assert "Traceback" not in worker.stderr, worker.stderr
    assert "Stopped" in worker.stdout, worker.output()


class _BreaksReads:
    """The storage's connection dies just before its next `n` reads of the `trials` table: the
    server ends the session (`pg_terminate_backend`) and the statement fails in flight, as in a
    restart that comes between a connection's check-out and its query."""

    def __init__(self, storage, url: str):
        import psycopg2
        import sqlalchemy

        self.n = self.broken = 0
        self.url = url

        def before(conn, cursor, statement, *_):
            if self.n and re.match(r"\s*SELECT\b.*\bFROM trials\b", statement, re.I | re.S):
                self.n -= 1
                self.broken += 1
                pid = cursor.connection.get_backend_pid()
                admin = psycopg2.connect(self.url, connect_timeout=5)
                try:
                    admin.autocommit = True
                    with admin.cursor() as cur:
                        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
                finally:
                    admin.close()

        sqlalchemy.event.listen(storage.engine, "before_cursor_execute", before)


def test_the_trackers_reads_of_the_study_ride_out_a_dropped_connection(pg, db, tmp_path):
    """The tracker reads the Optuna study after every trial (reconcile, the study plots, and at
    the end both). A connection that dies under such a read is sent again through the worker's
    `retrying`, like the worker's own calls: before, the StorageInternalError ended the sweep
    (exit 1, seen once in CI after a restart)."""
    import dataclasses

    import optuna

    from vqlog.study.outage import retrying
    from vqlog.study.spec import load_sweep
    from vqlog.study.storage import open_storage
    from vqlog.tracking.runs import Tracker

    storage = open_storage(db)
    study = optuna.create_study(study_name="reads", storage=storage)
    for lr in (1e-3, 2e-3, 3e-3):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        study.tell(trial, lr * 10)
    spec = dataclasses.replace(load_sweep("smoke"), name="reads")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", table_dir=tmp_path / "results")
    breaks = _BreaksReads(storage, db)
    # Without the worker's retrying the read fails: the break is real.
    tracker.start_study(study, spec)
    breaks.n = 1
    with pytest.raises(optuna.exceptions.StorageInternalError):
        tracker.reconcile(study)
    assert breaks.broken == 1
    tracker.start_study(study, spec, db=lambda call: retrying(storage, call))
    breaks.n = 1
    tracker.reconcile(study)
    breaks.n = 1
    tracker.refresh_study_plots(study)
    breaks.n = 1
    assert tracker.finish_study(study).endswith("reads.md")
    assert breaks.broken == 4 and breaks.n == 0
    names = {a.path for a in tracker.client.list_artifacts(tracker.parent_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png"} <= names


def test_the_table_waits_for_a_database_store_that_is_down(pg, tmp_path):
    """An MLflow store on PostgreSQL whose server is down is not bad input: `vqlog table` says
    to start it (before: "create it"), and `--watch` waits for it, then for a study in it."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    uri = pg.create_database("t_table_store_down")
    vqlog = str(Path(sys.executable).with_name("vqlog"))
    log = tmp_path / "watch.log"
    pg.stop()
    try:
        once = subprocess.run([vqlog, "table", "--study", "s", "--tracking-uri", uri],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert once.returncode == 2 and once.stdout == "", once.stdout + once.stderr
        (line,) = once.stderr.splitlines()
        assert line.startswith(f"Error: cannot reach the MLflow store {uri}") and "start it" in line
        with open(log, "w") as fh:
            watch = subprocess.Popen([vqlog, "table", "--watch", "--interval", "0.5",
                                      "--tracking-uri", uri], cwd=tmp_path, stdout=fh,
                                     stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: f"waiting for the MLflow store {uri}" in log.read_text(), 120,
                       "the wait for the store")
            pg.start()
            wait_until(lambda: "waiting for a vqlog study in" in log.read_text(), 120,
                       "the wait for a study, once the store is up")
            watch.send_signal(signal.SIGINT)
            assert watch.wait(60) == 0, log.read_text()
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
    finally:
        if not pg.running():
            pg.start()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_an_outage_of_the_mlflow_stores_database_is_called_so(pg, caplog):
    """Opening an MLflow store on PostgreSQL takes a lock that waits out an outage. Its lines
    said "lost the connection to the Optuna storage", naming the wrong database."""
    import logging

    from vqlog.tracking.client import open_client, store_uri

    uri = pg.create_database("t_mlflow_store_outage")
    given = store_uri(uri)  # checked while the server is up
    pg.stop()
    later = threading.Timer(3.0, pg.start)
    later.start()
    try:
        with caplog.at_level(logging.WARNING, logger="vqlog"):
            client = open_client(given)  # waits for the server
        assert client.search_experiments()  # MLflow's Default experiment: the store was made
    finally:
        later.join()
        if not pg.running():
            pg.start()
    assert f"lost the connection to the MLflow store {uri}" in caplog.text, caplog.text
    assert f"reconnected to the MLflow store {uri}" in caplog.text
    assert "Optuna" not in caplog.text
