"""A real `mlflow server` stopped under a running `vqlog-sweep` worker (issue 7, item 2).

Down for 20 s and started again on the same port and store: the worker keeps training, buffers
its metrics, and sends them once the server answers; no metric is lost. Down longer than
VQLOG_TRACKING_OUTAGE_LIMIT: the trial fails with the reason, the sweep exits 1 with one `Error:`
line saying how to resume, and rerunning the same command finishes the study.

The retry rules themselves (what counts as transient, the outage clock) are tested in process
against a real server in tests/test_retry.py.
"""

import time

import pytest
from _servers import free_port, mlflow_server
from _sweep_helpers import Worker, finished, states, study_trials, wait_until, write_spec

pytestmark = pytest.mark.slow

ITERATION, EVAL_EVERY, LOG_EVERY = 1200, 100, 4


def outage_spec(tmp_path, name, iteration=ITERATION):
    """One fixed configuration (nothing to sample) whose trial trains for ~30 s."""
    return write_spec(tmp_path, name, budget={"iteration": iteration, "eval_every": EVAL_EVERY},
                      pruner="none", sampler="random",
                      space={"batch": [8], "embedding_num": [16]})


def trial_runs(url: str, study: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`vqlog.role` = 'trial'")


def has_logged_an_evaluation(url: str, study: str) -> bool:
    try:
        return any("val/mse" in r.data.metrics for r in trial_runs(url, study))
    except Exception:  # noqa: BLE001 - the store is still being created
        return False


def worker_past_its_first_evaluation(args, url: str, study: str, tmp_path, env, name="worker"):
    """A `vqlog-sweep` worker tracking to `url`, once MLflow has its trial's first evaluation."""
    worker = Worker([*args, "--tracking-uri", url], tmp_path, name, env=env)
    try:
        wait_until(lambda: has_logged_an_evaluation(url, study), 120,
                   "the first evaluation in MLflow", alive=[worker])
    except BaseException:
        worker.kill()
        raise
    return worker


def test_a_20_s_outage_mid_trial_loses_no_metric(tmp_path):
    spec = outage_spec(tmp_path, "outage")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    port = free_port()
    server_dir = tmp_path / "server"
    args = ["--trials", "1", "--config", str(spec), "--storage", storage]
    env = {"VQLOG_TRACKING_OUTAGE_LIMIT": "120"}
    with mlflow_server(server_dir, port=port) as server:
        worker = worker_past_its_first_evaluation(args, server.url, "outage", tmp_path, env)
    try:
        down = time.monotonic()
        while time.monotonic() - down < 20:  # the server is down: the worker must keep going
            assert worker.proc.poll() is None, worker.output()
            time.sleep(0.5)
        with mlflow_server(server_dir, port=port) as server:
            assert worker.wait(300) == 0, worker.output()
            (run,) = trial_runs(server.url, "outage")
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=server.url)
            history = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                       for key in ("val/mse", "val/perplexity", "train/loss", "train/mse")}
    finally:
        worker.kill()

    # Every evaluation and every train point, before, during and after the outage, exactly once.
    assert history["val/mse"] == list(range(EVAL_EVERY, ITERATION + 1, EVAL_EVERY))
    assert history["val/perplexity"] == history["val/mse"]
    assert history["train/loss"] == list(range(LOG_EVERY, ITERATION + 1, LOG_EVERY))
    assert history["train/mse"] == history["train/loss"]
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
    assert "final_val_mse" in run.data.metrics
    trials = study_trials(storage, "outage")
    assert [t.state.name for t in trials] == ["COMPLETE"]
    assert "1 outage(s)" in worker.stdout and "ridden out" in worker.stdout
    assert "Traceback" not in worker.stderr and "Error" not in worker.stderr, worker.stderr
    assert (tmp_path / "results" / "outage.md").read_text().count("| Seq1") == 1


def test_an_outage_past_the_limit_fails_the_trial_exits_1_and_the_rerun_resumes(tmp_path):
    spec = outage_spec(tmp_path, "longoutage", iteration=600)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    port = free_port()
    server_dir = tmp_path / "server"
    env = {"VQLOG_TRACKING_OUTAGE_LIMIT": "4"}

    args = ["--trials", "1", "--config", str(spec), "--storage", storage]

    with mlflow_server(server_dir, port=port) as server:
        worker = worker_past_its_first_evaluation(args, server.url, "longoutage", tmp_path, env,
                                                  "first")
        url = server.url
    # Down for good: the worker gives up a few seconds after the limit.
    code = worker.wait(120)
    assert code == 1, worker.output()
    errors = worker.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: MLflow tracking at "), worker.stderr
    assert "longer than the limit of 4 s" in errors[0]
    assert "rerun the same command to resume" in errors[0]
    (failed,) = study_trials(storage, "longoutage")
    assert failed.state.name == "FAIL"
    assert "unreachable" in failed.user_attrs["fail_reason"]

    with mlflow_server(server_dir, port=port) as server:
        assert server.url == url
        rerun = Worker([*args, "--tracking-uri", url], tmp_path, "rerun", env=env)
        assert rerun.wait(300) == 0, rerun.output()
        runs = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs(url, "longoutage")}
    trials = study_trials(storage, "longoutage")
    assert len(finished(trials)) == 1 and states(trials) == {"FAIL": 1, "COMPLETE": 1}
    # The run cut off by the outage was closed by the rerun with the state Optuna settled on.
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["optuna.state"] == "FAIL"
    assert runs[1].info.status == "FINISHED"
    assert "RUNNING" not in {r.info.status for r in runs.values()}


def test_workers_that_lose_the_tracking_server_say_how_to_resume(tmp_path):
    """With --workers the outage came out as the workers' joined messages, without the line's
    advice (start the server, rerun), and once per worker."""
    spec = outage_spec(tmp_path, "pooloutage", iteration=600)
    env = {"VQLOG_TRACKING_OUTAGE_LIMIT": "4"}
    args = ["--trials", "2", "--workers", "2", "--config", str(spec),
            "--storage", f"sqlite:///{tmp_path}/optuna.db"]
    with mlflow_server(tmp_path / "server", port=free_port()) as server:
        worker = worker_past_its_first_evaluation(args, server.url, "pooloutage", tmp_path, env)
    try:
        code = worker.wait(180)
    finally:
        worker.kill()
    assert code == 1, worker.output()
    errors = worker.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: MLflow tracking at "), worker.stderr
    assert errors[0].count("longer than the limit of 4 s") == 1, errors[0]
    assert errors[0].endswith("Start the tracking server, then rerun the same command to resume."), \
        errors[0]


def test_a_store_that_stays_away_at_start_up_says_how_to_resume(tmp_path, monkeypatch, cli,
                                                                 mlflow_store):
    """The MLflow store goes away between the sweep's first look at it and its check for a
    deleted experiment (here: another process holds SQLite's write lock past the outage limit):
    one `Error:` line that says to bring the store back and rerun, exit 1, and no study line
    before it (the checks come before that line)."""
    import sqlite3

    from vqlog import api

    monkeypatch.chdir(tmp_path)
    uri = mlflow_store()
    monkeypatch.setenv("VQLOG_TRACKING_OUTAGE_LIMIT", "2")
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    load_data = api.load_data

    def load_then_lock(*args, **kwargs):  # the store goes away once the data is in
        cache = load_data(*args, **kwargs)
        holder.execute("BEGIN EXCLUSIVE")
        return cache

    monkeypatch.setattr(api, "load_data", load_then_lock)
    try:
        code, out, err = cli.sweep("--trials", "1", "--config", "smoke", "--tracking-uri", uri)
    finally:
        holder.close()
    assert code == 1 and out == "", out + err
    (line,) = err.strip().splitlines()
    assert line.startswith("Error: MLflow tracking at ") and "database is locked" in line, line
    assert "Start the tracking server, then rerun the same command to resume" in line
    assert "trial cut short" not in line  # none had started
