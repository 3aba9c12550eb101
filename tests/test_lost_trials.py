"""Trials another worker took for dead: the worker that ran one goes on, and none of them is
left without its retry.

Real components: `vqlog-sweep` processes, the machine's PostgreSQL (whose row locks line up a
race that timing alone would hit once in thousands of runs), SQLite files and MLflow's SQLite
store. The failpoints of vqlog/failpoints.py stop or kill a worker at a named point.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import sqlalchemy
from _sweep_helpers import (FAST_HEARTBEAT, Worker, mlflow_runs, retried_from, stopped,
                            study_trials, wait_until, write_spec)

from vqlog.study.retries import KILLS
from vqlog.urls import with_psycopg2


def waits_for_a_row_lock(engine: sqlalchemy.Engine) -> bool:
    """Whether a session of the database waits for a lock another one holds."""
    with engine.connect() as conn:
        return bool(conn.execute(sqlalchemy.text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'")).scalar())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states in /proc")
def test_a_trial_failed_between_the_tells_read_and_its_write_is_lost_not_a_crash(
        tmp_path, pg_database):
    """`study.tell(..., skip_if_finished=True)` reads the trial, then writes its state. Another
    worker that fails the trial as stale in between (a long network cut) made the tell raise
    UpdateFinishedTrialError: the worker exited 1 with a traceback, its finished run's result
    was not counted, and the sweep on this host ended. The trial is lost, as when the tell finds
    it failed: the worker says so and goes on to the target.

    The test holds the trial's row lock while the stopped worker goes on to its tell, waits
    until the tell's write waits for that lock (after its read), then fails the trial and lets
    the write go."""
    storage = pg_database()
    spec = write_spec(tmp_path, "raced", budget={"iteration": 6, "eval_every": 3})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    worker = Worker(["--trials", "1", "--config", str(spec), "--storage", storage,
                     "--tracking-uri", uri], tmp_path / "w",
                    env={"VQLOG_FAILPOINT": "trial.tell:1:SIGSTOP"})
    try:
        wait_until(lambda: stopped(worker.proc.pid), 240, "the worker to stop before its tell",
                   [worker])
        engine = sqlalchemy.create_engine(with_psycopg2(storage),
                                          poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(
                "SELECT trial_id FROM trials WHERE number = 0 FOR NO KEY UPDATE"))
            os.kill(worker.proc.pid, signal.SIGCONT)
            wait_until(lambda: waits_for_a_row_lock(engine), 60,
                       "the tell's write to wait for the trial's row", [worker])
            conn.execute(sqlalchemy.text(  # as another worker's stale check fails it
                "UPDATE trials SET state = 'FAIL', datetime_complete = now() WHERE number = 0"))
            conn.commit()
        engine.dispose()
        assert worker.wait(240) == 0, worker.output()
    finally:
        worker.kill()
    assert "Traceback" not in worker.stderr, worker.output()
    assert re.search(r"^Seq1\s+FAIL\s+lost: another worker", worker.stdout, re.M), worker.output()
    assert "1/1 trials finished (2 ran here, 1 failed)" in worker.stdout
    trials = study_trials(storage, "raced")
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert retried_from(trials[1]) == 0  # failed as a dead worker's trial is: retried
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in mlflow_runs(uri, "raced")}
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["vqlog.fail_reason"].startswith("lost: another worker")
    assert runs[1].info.status == "FINISHED"


def test_a_stale_trial_whose_retry_the_check_did_not_queue_is_retried_by_the_next_check(tmp_path):
    """Optuna's stale check commits FAIL for the stale trials, then calls the retry callback.
    A worker killed in between (or whose FAIL's reply was lost) left the dead worker's trial
    FAILed without a retry: the next worker started a new trial in its place, and the trial,
    its checkpoint and its parameters were never run again. The next check queues the retry."""
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    spec = write_spec(tmp_path, "orphan", budget={"iteration": 6, "eval_every": 3})
    args = ["--trials", "1", "--config", str(spec), "--storage", storage, "--tracking-uri", uri]

    def run(name: str, failpoint: str | None) -> Worker:
        env = dict(FAST_HEARTBEAT)
        if failpoint:
            env["VQLOG_FAILPOINT"] = failpoint
        return Worker(args, tmp_path / name, name, env=env)

    # killed with its trial RUNNING (claimed, beating), its result in MLflow only
    assert run("first", "trial.tell").wait(240) == -signal.SIGKILL
    # killed by its stale check after the FAIL, before the retry
    assert run("checker", "stale.retry").wait(240) == -signal.SIGKILL
    assert [t.state.name for t in study_trials(storage, "orphan")] == ["FAIL"]
    last = run("last", None)
    assert last.wait(240) == 0, last.output()
    trials = study_trials(storage, "orphan")
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert retried_from(trials[1]) == 0 and trials[1].params == trials[0].params
    assert trials[1].user_attrs[KILLS] == 1  # a kill, as the callback would have counted it
    assert "1 cut-off trial is queued again" in last.stdout, last.output()
    assert re.search(r"^Seq2\s+COMPLETE .*resumed @ 3", last.stdout, re.M)  # its checkpoint
