"""A new MLflow store is created once, however many vqlog processes open it at the same moment.

MLflow creates a store's tables and runs its ~40 schema migrations the first time a process opens
it. Two processes doing that together break it: one fails with "Online migration expected to
match one row" or "table ... already exists", and an SQLite store can be left with a half-done
migration that every later open fails on. That happens when `vqlog-sweep` and `vqlog table
--watch` (or two sweeps, or a sweep and a script) start together in a fresh folder.

Real components: fresh SQLite files and fresh databases on the machine's PostgreSQL, opened by
separate processes released by one barrier.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy

from _sweep_helpers import finished, mlflow_runs, race, study_trials, write_spec

pytestmark = pytest.mark.slow

ROUNDS, RACERS = 3, 4


def _open(uri: str, barrier, errors) -> None:
    """A child process: open the store as every vqlog command does, all children at once."""
    from vqlog.tracking.client import open_client

    barrier.wait(timeout=120)
    try:
        client = open_client(uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        errors.put(f"{type(exc).__name__}: {exc}"[:300])


def assert_store_is_whole(uri: str) -> None:
    """A process that comes later opens it (MLflow checks the schema is at its newest) and finds
    no table a migration left behind."""
    from mlflow.tracking import MlflowClient

    assert "Default" in [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()]
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        tables = sqlalchemy.inspect(engine).get_table_names()
        with engine.connect() as conn:
            versions = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).all()
    finally:
        engine.dispose()
    assert not [t for t in tables if t.startswith("_alembic_tmp")], tables
    assert len(versions) == 1


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_processes_opening_a_new_store_at_once_create_it_once(store, tmp_path, pg_database):
    from vqlog.tracking.client import store_uri

    for i in range(ROUNDS):
        uri = store_uri(f"sqlite:///{tmp_path}/round-{i}.db" if store == "sqlite" else pg_database())
        failures = race(_open, [(uri,)] * RACERS)
        assert not failures, f"round {i}: {failures}"
        assert_store_is_whole(uri)


def test_two_sweeps_started_together_in_a_new_folder_share_one_study(tmp_path):
    """The user's case: `vqlog-sweep` started twice at once in a new folder (two terminals, two
    jobs of a scheduler) on the SQLite defaults, without `vqlog init` first: the Optuna tables,
    the study, the MLflow store and its experiment are each created once, and the two sweeps
    finish the target between them."""
    spec = write_spec(tmp_path, "together", budget={"iteration": 40, "eval_every": 20},
                      pruner="none")
    cmd = [f"{sys.prefix}/bin/vqlog-sweep", "--trials", "3", "--config", str(spec)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trials = study_trials(f"sqlite:///{tmp_path}/optuna.db", "together")
    assert len(finished(trials)) == len(trials) == 3
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in mlflow_runs(uri, "together")) \
        == [0, 1, 2]
    assert len(mlflow_runs(uri, "together", role="study")) == 1
    assert_store_is_whole(uri)


def test_the_sweeps_early_study_check_writes_nothing_to_a_storage_being_created(tmp_path):
    """`vqlog-sweep` checks an existing study before its first line (`check_study`), without the
    lock under which a new storage's tables are created. Caught between another process's
    tables and their version rows, it must not write those rows itself: the other process's
    insert would then fail ("UNIQUE constraint failed: alembic_version.version_num")."""
    import optuna

    from vqlog.study.spec import load_sweep
    from vqlog.study.existing import check_study

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="smoke", storage=url, direction="maximize")
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # the moment between the tables and their version rows
        for table in ("version_info", "alembic_version"):
            conn.execute(sqlalchemy.text(f"DELETE FROM {table}"))
    check_study(load_sweep("smoke"), url)  # the study's directions are not read either
    with engine.connect() as conn:
        for table in ("version_info", "alembic_version"):
            assert conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar() == 0
    engine.dispose()
    # Once stamped, the same study is refused: the check does run on a storage that is whole.
    optuna.storages.RDBStorage(url).engine.dispose()  # writes the version rows back
    with pytest.raises(Exception, match="already exists with directions"):
        check_study(load_sweep("smoke"), url)


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_while_a_new_store_is_made_waits_for_the_whole_store(tmp_path, signal_name, code):
    """Ctrl-C (or SIGTERM) during `vqlog init`'s first open of a new mlflow.db cut MLflow's
    migrations in two: every command after failed on the half-made store ("duplicate column
    name: step", "table ... already exists") until the file was deleted by hand. The signal
    now comes as the store's migrations start (a failpoint); it is held until the store is
    whole, then ends the command as it would have, and the rerun goes on."""
    import os

    from _sweep_helpers import SUBPROCESS_ENV

    def init(**env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vqlog.cli", "init", "--config", "smoke"],
            cwd=tmp_path, env={**os.environ, **SUBPROCESS_ENV, **env}, capture_output=True, text=True,
            timeout=300)

    stopped = init(VQLOG_FAILPOINT=f"store.open:1:{signal_name}")
    # SIGTERM's default action ends the process (-15); Ctrl-C says "Interrupted.", exit 130
    assert stopped.returncode in (code, -15 if code == 143 else code), stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (tmp_path / "mlflow.db").is_file()
    assert_store_is_whole(f"sqlite:///{tmp_path}/mlflow.db")
    again = init()
    assert again.returncode == 0, again.stderr
    assert "Optuna study ready" in again.stdout


def test_held_signals_come_after_the_step_also_when_it_fails_and_a_second_ctrl_c_at_once():
    """`signals_deferred`, which holds Ctrl-C while MLflow makes a new store: the held one is
    raised when the step ends, also when the step fails (it was lost); a second Ctrl-C is raised
    at once ("Ctrl-C again to stop at once"); the handlers before are back after."""
    import signal

    from vqlog.study.stop import signals_deferred

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        steps = []
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                steps.append("the step went on")
        assert steps == ["the step went on"]
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                steps.append("not reached")
        assert steps == ["the step went on"]
        with pytest.raises(KeyboardInterrupt) as raised:
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                raise ConnectionError("the database went away")
        assert isinstance(raised.value.__context__, ConnectionError)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_two_ctrl_cs_while_a_new_store_is_made_are_two_for_the_sweeps_handler(capsys):
    """The sweep's handler stops cleanly on a first Ctrl-C and raises on a second. Both held
    while MLflow made a new store, only one was sent on: the handler took it for a first, and
    the "Ctrl-C again to stop at once" the user had pressed did nothing."""
    import signal

    from vqlog.commands.sweep import stop_on_signals
    from vqlog.study.stop import StopRequest, signals_deferred

    stop, steps = StopRequest(), []
    with stop_on_signals(stop):
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                steps.append("held")
                signal.raise_signal(signal.SIGINT)
                steps.append("not reached")
    assert steps == ["held"] and stop.is_set() and stop.signal == "SIGINT"
    assert "SIGINT: stopping after a checkpoint" in capsys.readouterr().err
