"""Several `vqlog-sweep` workers share one study on the machine's PostgreSQL: together they stop at
exactly --trials finished trials, with unique trial numbers and nothing left RUNNING.

Each test gets a throw-away database. Without a reachable server the tests skip, unless the
environment variable CI is set, where they fail. VQLOG_TEST_POSTGRES overrides the admin URL
(default postgresql://postgres@127.0.0.1:5432/postgres). The four-worker test runs only with
VQLOG_TEST_FOUR_WORKERS=1 (70 s on the shared 2-core test machine).
"""

import os
import secrets

import pytest
from _sweep_helpers import Worker, finished, mlflow_runs, mlflow_uri, states, study_trials, write_spec

ADMIN_URL = os.environ.get("VQLOG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_storage():
    """`postgresql://.../vqlog_test_<random>`, created for the test and dropped after it."""
    import psycopg2
    from sqlalchemy.engine import make_url

    try:
        admin = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        message = f"no PostgreSQL at {make_url(ADMIN_URL).render_as_string(hide_password=True)}: " \
                  f"{' '.join(str(exc).split())}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: the PostgreSQL tests must run)")
        pytest.skip(message)
    admin.autocommit = True
    name = f"vqlog_test_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def start_workers(n: int, trials: int, storage: str, tmp_path, tmp_path_factory) -> list[Worker]:
    """`n` workers started together on a new database (so they also race to create the tables),
    each in its own folder with its own MLflow store, on the smoke spec cut to 6 iterations."""
    spec = write_spec(tmp_path, "smoke", budget={"iteration": 6, "eval_every": 3})
    args = ["--trials", str(trials), "--config", str(spec), "--storage", storage]
    uris = [mlflow_uri(tmp_path / f"w{i}", tmp_path_factory) for i in range(n)]
    return [Worker([*args, "--tracking-uri", uri], tmp_path / f"w{i}", f"w{i}")
            for i, uri in enumerate(uris)]


def check_shared_study(workers: list[Worker], storage: str, trials: int) -> list[list[int]]:
    """Every worker exits 0; the study has exactly `trials` finished ones numbered 0..M, none
    RUNNING. Returns the trial numbers each worker ran (from its MLflow store)."""
    for w in workers:
        assert w.wait(240) == 0, w.output()
    all_trials = study_trials(storage, "smoke")
    assert len(finished(all_trials)) == trials, states(all_trials)
    assert "RUNNING" not in states(all_trials) and "WAITING" not in states(all_trials)
    numbers = [t.number for t in all_trials]
    assert numbers == list(range(len(numbers)))
    ran = [sorted(int(r.data.tags["optuna.trial_number"]) for r in
                  mlflow_runs(f"sqlite:///{w.cwd / 'mlflow.db'}", "smoke")) for w in workers]
    assert sorted(n for r in ran for n in r) == numbers  # each trial ran in exactly one worker
    for w, r in zip(workers, ran):
        assert f"({len(r)} ran here" in w.stdout
        assert f"smoke: {trials}/{trials} trials finished" in w.stdout
    return ran


@pytest.mark.slow
def test_two_workers_share_one_study(pg_storage, tmp_path, tmp_path_factory):
    workers = start_workers(2, 6, pg_storage, tmp_path, tmp_path_factory)
    try:
        ran = check_shared_study(workers, pg_storage, 6)
    finally:
        for w in workers:
            w.kill()
    assert all(ran), f"a worker ran no trial: {ran}"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VQLOG_TEST_FOUR_WORKERS"),
                    reason="four worker processes take 70 s on the shared 2-core test machine; "
                           "set VQLOG_TEST_FOUR_WORKERS=1 to run")
def test_four_workers_stop_together_at_the_target(pg_storage, tmp_path, tmp_path_factory):
    workers = start_workers(4, 6, pg_storage, tmp_path, tmp_path_factory)
    try:
        check_shared_study(workers, pg_storage, 6)
    finally:
        for w in workers:
            w.kill()
