"""Concurrency on the SQLite default (issue 7, item 6): one `vqlog-sweep` worker and
`vqlog table --watch` reading and publishing from the same mlflow.db every 0.1 s, both with the
default relative URIs in one folder, as a user runs them in two terminals. No "database is
locked", the sweep reaches its target, and the table both wrote is the one MLflow's runs give.

The four-worker PostgreSQL case is tests/test_postgres.py.
"""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _sweep_helpers import Worker, finished, study_trials, wait_until, write_spec

pytestmark = pytest.mark.slow

VQLOG = Path(sys.executable).with_name("vqlog")


def test_a_worker_and_table_watch_share_the_sqlite_store(tmp_path):
    spec = write_spec(tmp_path, "watched", budget={"iteration": 40, "eval_every": 10},
                      pruner="none")
    worker = Worker(["--trials", "6", "--config", str(spec)], tmp_path)  # sqlite:///optuna.db, mlflow.db
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    watch_log = tmp_path / "watch.log"
    watch = None
    try:
        # Not by opening mlflow.db meanwhile: a client opening a store that the worker is still
        # creating would run the same schema migrations beside it.
        wait_until(lambda: "Seq1 " in worker.stdout, 120, "the first trial", alive=[worker])
        with open(watch_log, "w") as log:
            watch = subprocess.Popen([str(VQLOG), "table", "--watch", "--interval", "0.1"],
                                     cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        assert worker.wait(300) == 0, worker.output()
        assert watch.poll() is None, watch_log.read_text()  # still watching
    finally:
        worker.kill()
        if watch is not None and watch.poll() is None:
            watch.send_signal(signal.SIGINT)
            try:
                watch.wait(30)
            except subprocess.TimeoutExpired:
                watch.kill()
                watch.wait()

    output = worker.output() + watch_log.read_text()
    assert "database is locked" not in output, output
    assert "Traceback" not in output and "Error" not in output, output
    assert len(finished(study_trials(f"sqlite:///{tmp_path}/optuna.db", "watched"))) == 6
    assert "table: results/watched.md (6 trials)" in watch_log.read_text().splitlines()

    from mlflow.tracking import MlflowClient

    from vqlog.tracking import table
    from vqlog.tracking.rows import fetch_rows

    rows = fetch_rows(MlflowClient(tracking_uri=uri), "watched")
    assert len(rows) == 6
    assert (tmp_path / "results" / "watched.md").read_text() == table.render_table(rows, title="watched")
