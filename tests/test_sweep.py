"""`vqlog-sweep` end to end on real SQLite stores under tmp_path: the exact trial target and resume,
--seed, diverging trials, a killed worker (SIGKILL), Ctrl-C, and bad input that exits 2 before
anything is written."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from _sweep_helpers import (FAST_HEARTBEAT, Worker, finished, mlflow_runs, retried_from, states,
                            study_trials, wait_until, write_spec)

from vqlog.cli import sweep_main


def table_rows(path) -> dict[str, str]:
    """Run name (without the best mark) -> its markdown row."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| Seq"):
            rows[line.split("|")[1].strip().rstrip(" ★")] = line
    return rows


# ------------------------------------------------------------------------------ in process


@pytest.mark.slow
def test_a_rerun_says_a_trial_is_running(tmp_path, mlflow_store, monkeypatch, capsys):
    """Rerun at once after a kill -9, the sweep said nothing of the killed trial, which is still
    RUNNING with a fresh heartbeat (it is queued again later, once stale): the second line now
    says it, as it says queued retries. Here the RUNNING trial is one asked for by hand."""
    import optuna

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")  # the trial asked by hand has no
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "3")  # heartbeat: the target waits out its grace
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ["--config", "smoke", "--storage", storage, "--tracking-uri", mlflow_store()]
    assert sweep_main(["--trials", "1", *args]) == 0
    optuna.load_study(study_name="smoke", storage=storage).ask()
    capsys.readouterr()
    assert sweep_main(["--trials", "2", *args]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "resuming: 1 of 2 trials finished; 1 trial is RUNNING: another worker's, or one cut off "
        "by a kill, which is queued again once its heartbeat is 3 s old")


@pytest.mark.slow
def test_smoke_sweep_stops_at_the_target_and_resumes(tmp_path, mlflow_store, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    uri = mlflow_store()  # sqlite:///<tmp_path>/mlflow.db
    args = ["--config", "smoke", "--storage", storage, "--tracking-uri", uri]

    assert sweep_main(["--trials", "3", *args]) == 0
    trials = study_trials(storage, "smoke")
    assert len(finished(trials)) == len(trials) == 3
    out = capsys.readouterr().out
    assert "smoke: 3/3 trials finished (3 ran here, 0 failed)" in out
    assert "resuming" not in out and "already" not in out  # a new study

    assert sweep_main(["--trials", "5", *args]) == 0  # the same study: only 2 more
    trials = study_trials(storage, "smoke")
    assert len(finished(trials)) == len(trials) == 5
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    out = capsys.readouterr().out
    assert "smoke: 5/5 trials finished (2 ran here, 0 failed)" in out
    # the rerun said only its target; it now says first what the study holds
    assert out.splitlines()[1] == "resuming: 3 of 5 trials finished", out
    assert sweep_main(["--trials", "4", *args]) == 0  # fewer than it holds: not "5/4"
    out = capsys.readouterr().out
    assert "smoke: 5 trials finished, more than the target of 4 (0 ran here, 0 failed)" in out

    assert sorted(table_rows(tmp_path / "results" / "smoke.md")) == [f"Seq{i}" for i in range(1, 6)]
    runs = mlflow_runs(uri, "smoke")
    assert sorted(r.info.run_name for r in runs) == [f"Seq{i}" for i in range(1, 6)]
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    assert len(mlflow_runs(uri, "smoke", role="study")) == 1


def test_a_failure_reason_is_one_line_with_its_passwords_masked():
    """A library's message spans lines (torch's C++ frames: 60 lines of the sweep's output for
    one FAIL) and may quote a URL with its password."""
    from vqlog.study.trial import describe

    exc = RuntimeError("zeros(): bad size\nframe #0: c10::Error\n  at http://al:pw@host:5000/x")
    assert describe(exc) == "RuntimeError: zeros(): bad size frame #0: c10::Error at " \
                            "http://al:***@host:5000/x"


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_grid_sweep_takes_each_point_once_and_ends_with_its_grid(tmp_path, mlflow_store,
                                                                   monkeypatch, capsys, workers):
    """Optuna's GridSampler stops the study at its last point with study.stop(), which raised
    RuntimeError outside study.optimize: every grid sweep that reached its grid's end failed
    there (exit 1, no table). A target past the grid's size ends with the grid, and workers that
    ask together do not take a point twice (each sets its point while it holds the lock)."""
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, "grid", sampler="grid", space={"batch": [8, 16],
                                                               "embedding_num": [16, 32]})
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    args = ["--config", str(spec), "--storage", storage, "--tracking-uri", uri,
            "--workers", workers]
    assert sweep_main(["--trials", "6", *args]) == 0
    trials = study_trials(storage, "grid")
    assert sorted((t.params["batch"], t.params["embedding_num"]) for t in trials) == \
        [(8, 16), (8, 32), (16, 16), (16, 32)]
    assert len(finished(trials)) == len(trials) == 4
    out = capsys.readouterr().out
    assert "grid: 4/6 trials finished (4 ran here" in out and "the grid's 4 points are all taken" in out
    assert len(table_rows(tmp_path / "results" / "grid.md")) == 4
    assert sweep_main(["--trials", "6", *args]) == 0
    assert len(study_trials(storage, "grid")) == 4  # a rerun runs nothing more
    assert "grid: 4/6 trials finished (0 ran here" in capsys.readouterr().out


@pytest.mark.slow
def test_a_grid_point_a_killed_worker_left_running_is_run_again(tmp_path, mlflow_store,
                                                                 monkeypatch, capsys):
    """A grid whose points were all taken, one by a worker since killed: the sweep ended at
    once, a point short, with that trial RUNNING ("grid: 3/6 trials finished"). It waits for
    the trial's heartbeat to go stale, as for the last trials, and runs the point again."""
    import optuna

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")  # the trial asked by hand has no claim:
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "6")  # failed 6 s after the sweep first sees it
    spec = write_spec(tmp_path, "grid", sampler="grid", space={"batch": [8, 16],
                                                               "embedding_num": [16, 32]})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ["--config", str(spec), "--storage", storage, "--tracking-uri", mlflow_store()]
    assert sweep_main(["--trials", "3", *args]) == 0
    points = {(8, 16), (8, 32), (16, 16), (16, 32)}
    study = optuna.load_study(study_name="grid", storage=storage)
    (left,) = points - {(t.params["batch"], t.params["embedding_num"]) for t in study.trials}
    study.enqueue_trial({"batch": left[0], "embedding_num": left[1]})
    trial = study.ask()  # a worker that took the last point, then was killed
    assert (trial.suggest_categorical("batch", [8, 16]),
            trial.suggest_categorical("embedding_num", [16, 32])) == left
    capsys.readouterr()
    assert sweep_main(["--trials", "6", *args]) == 0
    trials = study_trials(storage, "grid")
    assert {(t.params["batch"], t.params["embedding_num"]) for t in finished(trials)} == points
    assert "RUNNING" not in states(trials)
    out = capsys.readouterr().out
    assert "grid: 4/6 trials finished (1 ran here" in out, out
    assert "waiting: 1 trial still RUNNING covers the grid (a killed worker's" in out, out


def test_a_spec_whose_choices_differ_from_the_study_is_one_error(tmp_path, mlflow_store,
                                                                 monkeypatch, capsys):
    """Rerunning a study with other choices for a parameter (Optuna keeps one distribution per
    name in a study) is one Error line and exit 2, the study and the runs as they were; before,
    every trial failed with "CategoricalDistribution does not support dynamic value space". A
    range that only widens is fine."""
    monkeypatch.chdir(tmp_path)
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    base = smoke_space()
    first = write_spec(tmp_path, "respec", space=base)
    assert sweep_main(["--trials", "1", "--config", str(first), "--storage", storage,
                       "--tracking-uri", uri]) == 0
    capsys.readouterr()

    changed = write_spec(folder(tmp_path, "changed"), "respec", space={**base, "batch": [4, 8, 16]})
    code = sweep_main(["--trials", "2", "--config", str(changed), "--storage", storage,
                       "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("Error: study 'respec' already searches batch over the "
                                        "choices [8, 16]; this spec asks for the choices "
                                        "[4, 8, 16]"), err
    assert len(err.strip().splitlines()) == 1
    assert states(study_trials(storage, "respec")) == {"COMPLETE": 1}
    assert len(mlflow_runs(uri, "respec")) == 1

    scale = write_spec(folder(tmp_path, "scale"), "respec",
                       space={**base, "lr": {"type": "float", "low": 1e-3, "high": 1e-2}})
    assert sweep_main(["--trials", "2", "--config", str(scale), "--storage", storage,
                       "--tracking-uri", uri]) == 2
    assert ("already searches lr over a float range [0.001, 0.01] (log); this spec asks for a "
            "float range [0.001, 0.01] (linear)") in capsys.readouterr().err

    wider = write_spec(folder(tmp_path, "wider"), "respec",
                       space={**base, "lr": {"type": "float", "low": 1e-4, "high": 1e-2,
                                             "log": True}})
    assert sweep_main(["--trials", "2", "--config", str(wider), "--storage", storage,
                       "--tracking-uri", uri]) == 0
    assert len(finished(study_trials(storage, "respec"))) == 2


def test_a_spec_whose_choices_do_not_hold_the_studys_queued_rows_is_one_error(
        tmp_path, mlflow_store, monkeypatch, capsys):
    """`vqlog init` queues the seed spec's rows (batch 64, 128); a smoke sweep on that study
    failed each of them as it started ("'64' not in (8, 16)"), with no run in MLflow and exit
    0. The queued trials have no distributions for the study check to read: their values are
    checked against the spec's lists, and the sweep is one Error line before any trial."""
    from vqlog.cli import main

    monkeypatch.chdir(tmp_path)
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    assert main(["init", "--config", "seed", "--storage", storage, "--tracking-uri", uri]) == 0
    capsys.readouterr()
    code = sweep_main(["--trials", "1", "--config", "smoke", "--study", "seed", "--storage",
                       storage, "--tracking-uri", uri])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == ("Error: study 'seed' has a queued trial (Seq1: a spec's row or a retry) with "
                   "batch = 64, which this spec's choices [8, 16] do not hold: use another "
                   "--study name, or the study's own spec\n")
    assert states(study_trials(storage, "seed")) == {"WAITING": 3}


def folder(parent, name: str):
    (parent / name).mkdir()
    return parent / name


def smoke_space() -> dict:
    from _sweep_helpers import smoke_raw

    return smoke_raw()["space"]


@pytest.mark.slow
def test_same_seed_gives_the_same_trials(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, "repro", budget={"iteration": 6, "eval_every": 3}, pruner="none")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    uri = mlflow_store()
    for study in ("first", "second"):
        assert sweep_main(["--trials", "2", "--config", str(spec), "--study", study, "--seed", "11",
                           "--storage", storage, "--tracking-uri", uri]) == 0
    first, second = study_trials(storage, "first"), study_trials(storage, "second")
    assert [t.params for t in first] == [t.params for t in second]
    assert [t.values for t in first] == [t.values for t in second]
    assert len(first) == 2 and first[0].params != first[1].params  # the trials differ


DIVERGE = {"lr": 1.0e6, "warmup": 0, "grad_clip": 1.0e30, "BN": False}  # Adam moves every weight
# by ~lr on its first step, so the loss is inf at iteration 2 (checked for seeds 0-2).


@pytest.mark.slow
def test_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path, mlflow_store,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fixed = {k: v for k, v in DIVERGE.items() if k != "lr"}
    spec = write_spec(tmp_path, "diverge", fixed=fixed, space={"lr": [1.0e6, 1.0e-3]},
                      enqueue=[{"lr": 1.0e6}, {"lr": 1.0e-3}], pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    capsys.readouterr()

    assert sweep_main(["--trials", "1", "--config", str(spec), "--storage", storage,
                       "--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    assert "DivergedError" not in err  # no Optuna warning with a traceback: vqlog's line says it
    bad, good = study_trials(storage, "diverge")
    assert (bad.state.name, bad.params, good.state.name) == ("FAIL", {"lr": 1e6}, "COMPLETE")
    assert bad.user_attrs["fail_reason"].startswith("diverged: loss is ")
    assert "Seq1    FAIL      diverged: loss is" in out
    assert "diverge: 1/1 trials finished (2 ran here, 1 failed)" in out

    runs = {r.info.run_name: r for r in mlflow_runs(uri, "diverge")}
    assert runs["Seq1"].info.status == "FAILED"
    assert runs["Seq1"].data.tags["optuna.state"] == "FAIL"
    assert runs["Seq1"].data.tags["vqlog.fail_reason"] == bad.user_attrs["fail_reason"]
    diverged_at = int(bad.user_attrs["fail_reason"].rsplit(" ", 1)[1])  # "... at iteration N"
    assert runs["Seq1"].data.metrics["iterations_run"] == diverged_at  # not the budget
    assert runs["Seq2"].info.status == "FINISHED"
    assert "diverged" in table_rows(tmp_path / "results" / "diverge.md")["Seq1"]


@pytest.mark.slow
def test_a_spec_whose_trials_all_fail_stops(tmp_path, mlflow_store, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, "allfail", fixed=DIVERGE, space={"batch": [8, 16]}, pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    capsys.readouterr()  # (MLflow's lines, if this test made the session's template store)

    assert sweep_main(["--trials", "2", "--config", str(spec), "--storage", storage,
                       "--tracking-uri", uri]) == 1
    assert states(study_trials(storage, "allfail")) == {"FAIL": 5}
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "DivergedError" not in err, err
    assert "5 trials in a row failed here (last: diverged: loss is" in errors[0]
    assert {r.info.status for r in mlflow_runs(uri, "allfail")} == {"FAILED"}
    # the table is written once more as the sweep ends, as at any other end: it held the first
    # trial alone (each worker's table is throttled)
    rows = table_rows(tmp_path / "results" / "allfail.md")
    assert sorted(rows) == [f"Seq{n}" for n in range(1, 6)], rows


@pytest.mark.slow
def test_a_trial_left_running_without_a_heartbeat_is_failed_and_retried(
        tmp_path, mlflow_store, monkeypatch):
    """A worker killed between creating its trial and the heartbeat's first beat leaves a RUNNING
    trial that Optuna's stale-trial check never sees; the exact target must not wait for it."""
    import optuna


    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "2")  # (longer than the interval)
    spec = write_spec(tmp_path, "orphan", budget={"iteration": 4, "eval_every": 2}, pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    study = optuna.create_study(study_name="orphan", storage=storage)
    orphan = study.ask({"batch": optuna.distributions.CategoricalDistribution([8, 16])})
    time.sleep(3)  # older than the grace period (SQLite keeps whole seconds)

    # --timeout: were the orphan never failed, the sweep would wait for it forever
    assert sweep_main(["--trials", "1", "--config", str(spec), "--storage", storage,
                       "--tracking-uri", uri, "--timeout", "60"]) == 0
    trials = study_trials(storage, "orphan")
    assert trials[orphan.number].state.name == "FAIL"
    assert states(trials) == {"FAIL": 1, "COMPLETE": 1}
    retry = finished(trials)[0]
    assert retried_from(retry) == orphan.number
    assert retry.params["batch"] == orphan.params["batch"]


@pytest.mark.slow
def test_a_live_trial_failed_as_stale_by_another_worker_does_not_stop_this_one(
        tmp_path, mlflow_store, monkeypatch, capsys):
    """A worker whose heartbeat missed the grace period (a long pause, an overloaded machine)
    finds its trial failed by another worker: Optuna refuses its result. It must go on (the
    trial's retry runs) instead of crashing, and mark the trial's MLflow run failed."""
    import threading

    import optuna


    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQLOG_HEARTBEAT_INTERVAL", "30")  # this worker beats once, at the start
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "60")
    # 1000 iterations (5-20 s here): the trial must outlast the other worker's 2 s wait, also
    # with torch warmed up by earlier tests (200 iterations then took 1 s)
    spec = write_spec(tmp_path, "lost", budget={"iteration": 1000, "eval_every": 500}, pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    failed_by_other: list[int] = []

    def other_worker():
        """Another worker's stale-trial check, with a grace period of 1 s."""
        running = wait_until(lambda: [t for t in study_trials(storage, "lost")
                                      if t.state.name == "RUNNING"], 120, "a RUNNING trial")
        time.sleep(2)  # SQLite keeps heartbeats in whole seconds: 2 s is surely > 1 s
        other = optuna.storages.RDBStorage(
            storage, heartbeat_interval=1, grace_period=1,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
        optuna.storages.fail_stale_trials(optuna.load_study(study_name="lost", storage=other))
        failed_by_other.append(running[0].number)

    thread = threading.Thread(target=other_worker, daemon=True)
    thread.start()
    assert sweep_main(["--trials", "1", "--config", str(spec), "--storage", storage,
                       "--tracking-uri", uri]) == 0
    thread.join(1)
    assert failed_by_other == [0]
    lost, retry = study_trials(storage, "lost")
    assert (lost.state.name, retry.state.name) == ("FAIL", "COMPLETE")
    assert retried_from(retry) == 0
    out = capsys.readouterr().out
    assert "Seq1    FAIL      lost: another worker" in out
    assert "lost: 1/1 trials finished (2 ran here, 1 failed)" in out
    runs = {r.info.run_name: r for r in mlflow_runs(uri, "lost")}
    assert (runs["Seq1"].info.status, runs["Seq1"].data.tags["optuna.state"]) == ("FAILED", "FAIL")
    assert runs["Seq1"].data.tags["vqlog.fail_reason"].startswith("lost: ")
    assert runs["Seq2"].info.status == "FINISHED"


# ---------------------------------------------------------------------------- subprocesses


def slow_spec(tmp_path, name):
    """Smoke with 100 iterations: a trial runs 2-3 s, long enough to be caught RUNNING."""
    return write_spec(tmp_path, name, budget={"iteration": 100, "eval_every": 50}, pruner="none")


def running_trial(storage: str, study: str, uri: str):
    """The RUNNING trial once its MLflow run exists too (so its heartbeat has beaten)."""
    running = [t for t in study_trials(storage, study) if t.state.name == "RUNNING"]
    if not running:
        return None
    runs = mlflow_runs(uri, study, missing_ok=True)
    numbers = {int(r.data.tags["optuna.trial_number"]) for r in runs if r.info.status == "RUNNING"}
    return next((t for t in running if t.number in numbers), None)


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_finishes_exactly_the_target(tmp_path, mlflow_store):
    spec = slow_spec(tmp_path, "killed")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    args = ["--trials", "2", "--config", str(spec), "--storage", storage, "--tracking-uri", uri]

    worker = Worker(args, tmp_path, "first", env=FAST_HEARTBEAT)
    try:
        victim = wait_until(lambda: running_trial(storage, "killed", uri), 90, "a RUNNING trial",
                            alive=[worker])
        worker.signal(signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL
    finally:
        worker.kill()
    assert study_trials(storage, "killed")[victim.number].state.name == "RUNNING"

    rerun = Worker(args, tmp_path, "rerun", env=FAST_HEARTBEAT)
    assert rerun.wait(120) == 0, rerun.output()
    trials = study_trials(storage, "killed")
    assert len(finished(trials)) == 2
    assert "RUNNING" not in states(trials) and "WAITING" not in states(trials)
    assert trials[victim.number].state.name == "FAIL"
    retried = [t for t in trials if retried_from(t) == victim.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == trials[victim.number].params
    assert "killed: 2/2 trials finished" in rerun.stdout

    runs = mlflow_runs(uri, "killed")
    assert "RUNNING" not in {r.info.status for r in runs}
    lost = next(r for r in runs if r.data.tags["optuna.trial_number"] == str(victim.number))
    assert (lost.info.status, lost.data.tags["optuna.state"]) == ("FAILED", "FAIL")
    assert "heartbeat stopped" in lost.data.tags["vqlog.fail_reason"]


def _second_trial_mid_training(tmp_path, mlflow_store, name):
    """A worker on a 400-iteration spec, once its second trial is RUNNING (with its run)."""
    spec = write_spec(tmp_path, name, budget={"iteration": 400, "eval_every": 50}, pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    worker = Worker(["--trials", "4", "--config", str(spec), "--storage", storage,
                     "--tracking-uri", uri], tmp_path, env=FAST_HEARTBEAT)

    def second_trial_running():
        t = running_trial(storage, name, uri)
        return t if t is not None and t.number >= 1 else None

    try:
        victim = wait_until(second_trial_running, 120, "a second trial RUNNING", alive=[worker])
    except BaseException:
        worker.kill()
        raise
    return worker, victim, storage, uri


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_queues_the_running_trial_again(tmp_path, mlflow_store):
    """Ctrl-C (SIGINT): the running trial is checkpointed, marked FAIL with its reason and
    queued again; everything finished is kept; exit 130."""
    worker, victim, storage, uri = _second_trial_mid_training(tmp_path, mlflow_store, "interrupted")
    try:
        worker.signal(signal.SIGINT)
        assert worker.wait(60) == 130, worker.output()
    finally:
        worker.kill()
    trials = study_trials(storage, "interrupted")
    assert trials[victim.number].state.name == "FAIL"
    assert trials[victim.number].user_attrs["fail_reason"] == "stopped (SIGINT); resumes on rerun"
    assert all(t.state.name == "COMPLETE" for t in trials[:victim.number])
    (retry,) = trials[victim.number + 1:]  # no new trial, only the queued retry
    assert retry.state.name == "WAITING" and retried_from(retry) == victim.number
    assert "RUNNING" not in states(trials)
    assert "Stopped (SIGINT): the running trial was checkpointed at iteration" in worker.stdout
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in mlflow_runs(uri, "interrupted")}
    assert runs[victim.number].info.status == "FAILED"
    assert "RUNNING" not in {r.info.status for r in runs.values()}


@pytest.mark.slow
def test_a_worker_killed_between_a_stopped_trials_retry_and_its_fail_loses_nothing(
        tmp_path, mlflow_store):
    """SIGTERM, then SIGKILL (a scheduler's grace period over, the pool's kill of a worker that
    did not stop in time) just as the stopped trial's retry is queued: the trial stays RUNNING
    with its retry queued, and the rerun's stale check fails it without a second retry. Killed
    after the FAIL and before the retry, as it was, the trial (a grid point, a spec's queued row)
    was lost for good. The rerun runs the one retry, from the checkpoint, and ends with N."""
    spec = write_spec(tmp_path, "killedstop", budget={"iteration": 400, "eval_every": 50},
                      pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    args = ["--trials", "2", "--config", str(spec), "--storage", storage, "--tracking-uri", uri]
    beats = {"VQLOG_HEARTBEAT_INTERVAL": "2", "VQLOG_HEARTBEAT_GRACE": "6"}
    worker = Worker(args, tmp_path, env={**beats, "VQLOG_FAILPOINT": "trial.requeue:1"})
    try:
        victim = wait_until(lambda: running_trial(storage, "killedstop", uri), 120,
                            "a trial RUNNING", alive=[worker])
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == -signal.SIGKILL, worker.output()
    finally:
        worker.kill()
    trials = study_trials(storage, "killedstop")
    assert trials[victim.number].state.name == "RUNNING", worker.output()
    (retry,) = trials[victim.number + 1:]
    assert retry.state.name == "WAITING" and retried_from(retry) == victim.number
    time.sleep(6)  # the killed worker's heartbeat goes stale
    rerun = Worker(args, tmp_path, "rerun", env=beats)
    assert rerun.wait(300) == 0, rerun.output()
    trials = study_trials(storage, "killedstop")
    assert trials[victim.number].state.name == "FAIL"
    assert [retried_from(t) for t in trials[victim.number + 1:]].count(victim.number) == 1
    assert len(finished(trials)) == 2 and "WAITING" not in states(trials), states(trials)
    assert "vqlog.kills" not in trials[victim.number + 1].user_attrs  # a stop, not a kill


@pytest.mark.slow
def test_a_ctrl_c_between_a_trials_fail_and_its_retry_waits_for_the_retry(tmp_path,
                                                                            mlflow_store):
    """Ctrl-C, then Ctrl-C again just as the stopped trial is marked FAIL (from a failpoint,
    before its retry is queued): the retry is queued all the same, then the sweep stops at once.
    The KeyboardInterrupt came between the two, and the trial was lost for good."""
    spec = write_spec(tmp_path, "between", budget={"iteration": 400, "eval_every": 50},
                      pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    worker = Worker(["--trials", "2", "--config", str(spec), "--storage", storage,
                     "--tracking-uri", uri], tmp_path,
                    env={"VQLOG_FAILPOINT": "trial.requeue:1:SIGINT"})
    try:
        victim = wait_until(lambda: running_trial(storage, "between", uri), 120,
                            "a trial RUNNING", alive=[worker])
        worker.signal(signal.SIGINT)
        assert worker.wait(60) == 130, worker.output()
    finally:
        worker.kill()
    trials = study_trials(storage, "between")
    assert trials[victim.number].state.name == "FAIL", worker.output()
    (retry,) = trials[victim.number + 1:]
    assert retry.state.name == "WAITING" and retried_from(retry) == victim.number
    # the first Ctrl-C's checkpoint is said (it was not, though the rerun resumed from it)
    assert re.search(r"Interrupted: the running trial was checkpointed at iteration \d+, marked "
                     "FAIL and queued again; everything finished is kept", worker.stdout), \
        worker.output()
    assert f"({victim.number + 1} ran here, 0 failed, 1 stopped and queued again)" in \
        worker.stdout, worker.output()


def test_a_ctrl_c_in_a_shield_waits_for_its_end_and_a_third_one_does_not():
    """The handler's part of StopRequest.shield: after the stop, one Ctrl-C inside a shield is
    raised at its end; another one meanwhile at once. A shield left by an exception drops its
    deferred Ctrl-C, so that the next shield does not raise a stale one."""
    import threading

    from vqlog.commands.sweep import stop_on_signals
    from vqlog.study.stop import StopRequest

    assert threading.current_thread() is threading.main_thread()  # where handlers are set
    stop = StopRequest()
    with stop_on_signals(stop, quiet=True):
        signal.raise_signal(signal.SIGINT)  # the first: a clean stop
        assert stop.is_set() and stop.signal == "SIGINT"
        steps = []
        with pytest.raises(KeyboardInterrupt):
            with stop.shield():
                signal.raise_signal(signal.SIGINT)  # deferred
                steps.append("after the second")
        assert steps == ["after the second"]
        with pytest.raises(KeyboardInterrupt):
            with stop.shield():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # a third: at once
                steps.append("not reached")
        assert steps == ["after the second"] and not stop.deferred
        with stop.shield():  # nothing left over
            pass


def test_the_first_ctrl_c_after_a_stop_for_another_reason_is_still_a_clean_stop(capsys):
    """After a SIGTERM, or a worker's error that stops the sweep (`--workers`), the user's
    first Ctrl-C stopped everything at once: no checkpoint, and the worker's error replaced by
    "Interrupted.", exit 130. Only a Ctrl-C after a Ctrl-C is "again"."""
    import threading

    from vqlog.commands.sweep import stop_on_signals
    from vqlog.study.stop import StopRequest

    assert threading.current_thread() is threading.main_thread()  # where handlers are set
    for first in ("SIGTERM", "error"):
        stop = StopRequest()
        with stop_on_signals(stop):
            if first == "SIGTERM":
                signal.raise_signal(signal.SIGTERM)
            else:
                stop.request("error")  # as the parent does on a worker's error
            capsys.readouterr()
            try:
                signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: the clean stop goes on
            except KeyboardInterrupt:  # (not let through: it would end the whole test run)
                pytest.fail(f"the first Ctrl-C after {first} stopped at once")
            assert stop.signal == first and stop.ctrl_c
            assert capsys.readouterr().err == (
                "SIGINT: already stopping after a checkpoint of the running trial (Ctrl-C again "
                "to stop at once)\n")
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # the second: at once


def test_a_second_ctrl_c_that_lands_in_a_finalizer_is_sent_again(capsys):
    """A Ctrl-C again that Python's handler raised inside a garbage collector's callback
    (SQLAlchemy's, during a sweep) was swallowed: "Exception ignored in ... KeyboardInterrupt"
    on stderr, and the stop went on the slow way, through a checkpoint. It is kept quiet now and
    sent again, and raised where the main thread goes on."""
    import gc
    import threading

    from vqlog.commands.sweep import stop_on_signals
    from vqlog.study.stop import StopRequest

    assert threading.current_thread() is threading.main_thread()  # where handlers are set

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # its handler runs here, in the finalizer

    stop = StopRequest()
    with stop_on_signals(stop, quiet=True):
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: a clean stop
        assert stop.is_set() and stop.ctrl_c
        raised = False
        try:
            Finalized()  # dropped at once: the second Ctrl-C lands in its __del__
            gc.collect()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the main thread goes on
                time.sleep(0.01)
        except KeyboardInterrupt:  # (caught here: let through, it would end the test run)
            raised = True
    assert raised, "the second Ctrl-C was lost"
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path, mlflow_store):
    """Ctrl-C twice during a trial: no waiting for a checkpoint; the running trial is marked
    FAIL, exit 130. It is queued again all the same, and the rerun runs it: it was not, and a
    grid point or a spec's queued row was lost for good (a grid's rerun found every point taken).
    The two Ctrl-Cs come from inside (vqlog.failpoints), at the second trial's second evaluation:
    two SIGINTs sent from outside at once arrive as one, which is a single Ctrl-C."""
    spec = write_spec(tmp_path, "twice", budget={"iteration": 100, "eval_every": 25},
                      pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    args = ["--trials", "2", "--config", str(spec), "--storage", storage, "--tracking-uri", uri]
    worker = Worker(args, tmp_path, env={"VQLOG_FAILPOINT": "trial.eval:6:SIGINT+SIGINT"})
    try:
        assert worker.wait(120) == 130, worker.output()
    finally:
        worker.kill()
    trials = study_trials(storage, "twice")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"], worker.output()
    assert trials[1].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    assert retried_from(trials[2]) == 1 and trials[2].params == trials[1].params
    assert "Interrupted: the running trial was marked FAIL and queued again" in worker.stdout
    # it said 1 ran, 0 failed; then "1 failed" for the trial queued again
    assert "1/2 trials finished (2 ran here, 0 failed, 1 stopped and queued again)" in worker.stdout
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in mlflow_runs(uri, "twice")}
    assert "RUNNING" not in {r.info.status for r in runs.values()}

    rerun = Worker(args, tmp_path, name="rerun")
    try:
        assert rerun.wait(120) == 0, rerun.output()
    finally:
        rerun.kill()
    trials = study_trials(storage, "twice")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"], rerun.output()


def test_a_trial_failed_by_another_worker_before_its_claim_is_lost_not_an_error(tmp_path,
                                                                               monkeypatch):
    """A database outage longer than the grace period between a worker's ask and its claim:
    once the database is back, another worker fails the trial as unclaimed and queues its retry.
    The claim then raised Optuna's UpdateFinishedTrialError, which ended the worker with an
    Error line (with --workers, the whole sweep); the trial is now lost here, and the worker
    goes on with the retry."""
    from vqlog import api
    from vqlog.study.retries import fail_stale_trials
    from vqlog.study.worker import Worker as SweepWorker

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQLOG_HEARTBEAT_GRACE", "1")
    path = write_spec(tmp_path, "unclaimed", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    spec = api.study_spec(str(path), None, None, None, None)
    lines = []
    worker = SweepWorker(spec, 1, f"sqlite:///{tmp_path}/optuna.db", out=lines.append, bar=False)
    worker._open()
    trial = worker._ask()  # asked; then the database goes away for longer than the grace period
    trial_id = worker.storage.get_trial_id_from_study_id_trial_number(worker.study_id,
                                                                      trial.number)
    fail_stale_trials(worker.study, worker.storage)  # another worker, which sees it unclaimed
    time.sleep(2.5)  # for longer than the grace period
    fail_stale_trials(worker.study, worker.storage)  # once the database is back
    outcome = worker._run(trial, trial_id)
    assert outcome.lost and outcome.state.name == "FAIL"
    summary = worker.run()  # and the worker goes on: the retry runs
    assert summary.finished == 1, lines
    trials = worker.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert retried_from(trials[1]) == 0


def test_a_stop_that_comes_while_a_worker_waits_for_the_study_lock_starts_no_trial(
        tmp_path, monkeypatch):
    """A stop that came while the worker waited for the study lock (another worker held it)
    still started a trial once the lock was free: its run, a step, a checkpoint, a FAIL line and
    a retry, and a later stop."""
    import threading

    from vqlog import api
    from vqlog.study.progress import TrialProgress
    from vqlog.study.storage import StudyLock
    from vqlog.study.worker import StopRequest, Worker as SweepWorker

    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, "locked", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    spec = api.study_spec(str(path), None, None, None, None)
    storage, lines, stop = f"sqlite:///{tmp_path}/optuna.db", [], StopRequest()
    worker = SweepWorker(spec, 2, storage, out=lines.append, bar=False, stop=stop)
    worker._open()
    worker.progress, worker.said_waiting = TrialProgress(2, lines.append, bar=False), False
    held = StudyLock(storage, spec.name)  # another worker's
    held.acquire()
    asked = []
    waiting = threading.Thread(target=lambda: asked.append(worker._next_trial()))
    waiting.start()
    time.sleep(1.5)  # the worker waits for the lock
    stop.request("SIGTERM")
    held.release()
    waiting.join(60)
    assert asked == [None] and worker.summary.stopped == "SIGTERM"
    assert worker.study.get_trials(deepcopy=False) == []


def test_a_ctrl_c_while_waiting_for_the_study_lock_leaves_nothing_open(tmp_path):
    """A Ctrl-C while a StudyLock waited for another holder left its file open on the object
    (and, one just after the lock was taken, the lock itself held by an object that said it was
    free: a notebook's next sweep in the same process then waited on itself)."""
    import signal

    from vqlog.study.storage import StudyLock

    storage = f"sqlite:///{tmp_path}/optuna.db"
    lock_file = str(tmp_path / "optuna.db.lock")

    def open_on_lock_file() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == lock_file
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    held = StudyLock(storage, "s")  # another worker's
    held.acquire()
    waiting = StudyLock(storage, "s")

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGALRM, ctrl_c)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            waiting.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    assert open_on_lock_file() == 1  # the holder's alone
    waiting.release()  # nothing to release: no error
    held.release()
    assert open_on_lock_file() == 0
    assert waiting.try_acquire()  # free for the same object again, and for others after it
    waiting.release()
    assert StudyLock(storage, "s").try_acquire()


def test_the_last_evaluation_of_a_trial_is_never_pruned(tmp_path, monkeypatch):
    """A trial pruned at its last evaluation had trained to its end: it was kept without its
    weights (nothing to export), with a budget shorter than `eval_every` on every trial that
    Hyperband judged. Earlier evaluations are pruned as the pruner says."""
    import optuna

    from vqlog import api
    from vqlog.study.trial import Objective
    from vqlog.train import EvalRecord

    monkeypatch.chdir(tmp_path)
    spec = api.study_spec(str(write_spec(tmp_path, "lastone")), None, None, None, None)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(storage=storage, study_name="lastone",
                                pruner=optuna.pruners.ThresholdPruner(upper=1e-9))  # prunes all
    trial = study.ask()
    on_eval = Objective(spec, None, None, "cpu", None, storage)._on_eval(trial, None, last=60)
    record = EvalRecord(step=30, val_mse=0.5, val_perplexity=2.0, val_usage=0.5,
                        val_dead_codes=0, train_points=())
    assert on_eval(record) is True
    assert on_eval(dataclasses.replace(record, step=60)) is False


# -------------------------------------------------------------------------------- bad input

BAD_INPUT = {
    "trials 0": (["--trials", "0"], "--trials must be at least 1"),
    "missing spec": (["--config", "missing.yaml"], "sweep spec not found: missing.yaml"),
    "unknown storage scheme": (["--storage", "nonsense://x"], "scheme 'nonsense' is not supported"),
    "mysql storage": (["--storage", "mysql://u:secret@h/db"], "scheme 'mysql' is not supported"),
    "storage not a URL": (["--storage", "optuna.db"], "--storage is not a database URL"),
    "storage folder missing": (["--storage", "sqlite:///no/such/dir/optuna.db"], "does not exist"),
    "missing data file": (["--data", "missing.npy"], "data file not found: missing.npy"),
    "ftp tracking": (["--tracking-uri", "ftp://x"], "--tracking-uri must be sqlite:///FILE"),
    "unknown flag": (["--trails", "3"], "unrecognized arguments: --trails"),
    "abbreviated flag": (["--trial", "3"], "unrecognized arguments: --trial 3"),  # not --trials
}
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(tmp_path, monkeypatch, cli, case):
    argv, expected = BAD_INPUT[case]
    monkeypatch.chdir(tmp_path)  # results/ would go here
    # The defaults' files, but absolute: MLflow caches a store per URI string, so a relative
    # sqlite:///mlflow.db made here would serve later in-process tests in other folders.
    defaults = {"--config": "smoke", "--storage": f"sqlite:///{tmp_path}/optuna.db",
                "--tracking-uri": f"sqlite:///{tmp_path}/mlflow.db"}
    argv = [*argv, *(x for k, v in defaults.items() if k not in argv for x in (k, v))]
    code, out, err = cli.sweep(*argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert expected in lines[0]
    assert "secret" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no optuna.db, mlflow.db, results/


@pytest.mark.parametrize("url", [
    "postgresql://postgres:s3cr3t@127.0.0.1:5432/does_not_exist_db",  # connects, then fails
    "postgresql://postgres:s3cr3t@127.0.0.1:notaport/db",  # not even a URL
])
def test_storage_password_is_never_printed(tmp_path, mlflow_store, monkeypatch, capfd, url):
    monkeypatch.chdir(tmp_path)
    uri = mlflow_store(tmp_path / "mlflow")
    assert sweep_main(["--config", "smoke", "--storage", url, "--tracking-uri", uri]) == 2
    out, err = capfd.readouterr()
    assert "s3cr3t" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "***@127.0.0.1" in errors[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device auto uses it")
def test_a_long_spec_on_a_machine_without_a_gpu_says_it_trains_on_the_cpu(tmp_path, monkeypatch,
                                                                          cli):
    """`--config gpu` (10,000 iterations a trial) without a GPU trained on the CPU for hours,
    and nothing said so. A spec of the log's scale with `--device auto` and no GPU now says it;
    `--device cpu` (meant) does not. Each run is stopped at its first evaluation (SIGTERM)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQLOG_FAILPOINT", "trial.eval:1:SIGTERM")
    spec = write_spec(tmp_path, "long", budget={"iteration": 5000, "eval_every": 10},
                      pruner="none")
    code, out, _ = cli.sweep("--trials", "1", "--config", str(spec))
    assert code == 143, out
    assert ("note: no CUDA GPU is visible, so --device auto trains on the CPU, where trials of "
            "5000 iterations of the seed's model sizes take hours each") in out, out
    # another study; this process's second pass through the failpoint is the next stop
    monkeypatch.setenv("VQLOG_FAILPOINT", "trial.eval:2:SIGTERM")
    spec = write_spec(tmp_path, "meant", budget={"iteration": 5000, "eval_every": 10},
                      pruner="none")
    code, out, _ = cli.sweep("--trials", "1", "--config", str(spec), "--device", "cpu")
    assert code == 143 and "note:" not in out, out


def test_the_closing_lines_give_commands_the_shell_can_run(tmp_path, monkeypatch):
    """Without the environment activated (`make install`, then `.venv/bin/vqlog-sweep`), the
    hints name the environment's own `vqlog` and `optuna-dashboard` by their path."""
    import shlex

    from vqlog.commands.sweep import summary_text
    from vqlog.study.worker import SweepSummary

    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.chdir(tmp_path)
    for path, bare in ((os.defpath, False), (os.pathsep.join([bin_dir, os.defpath]), True)):
        monkeypatch.setenv("PATH", path)
        text = summary_text(SweepSummary("s", 1, 1), 60.0, "sqlite:///optuna.db",
                            "sqlite:///mlflow.db", "http://127.0.0.1:5000")
        ui = next(line for line in text.splitlines() if line.startswith("mlflow: "))
        dashboard = next(line for line in text.splitlines() if line.startswith("optuna: "))
        words = shlex.split(ui)[1:4] + shlex.split(dashboard)[1:2]
        assert words[1:3] == ["ui", "--tracking-uri"], ui
        if bare:
            assert (words[0], words[3]) == ("vqlog", "optuna-dashboard"), text
        else:
            assert words[0] == os.path.join(bin_dir, "vqlog"), text
            assert words[3] == os.path.join(bin_dir, "optuna-dashboard"), text
        for exe in (words[0], words[3]):  # each runs as printed, from this shell's PATH
            done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "PATH": path})
            assert done.returncode == 0, (exe, done.stderr[-500:])


def test_the_closing_dashboard_line_names_a_driver_vqlog_installs(monkeypatch):
    """optuna-dashboard gives the URL to SQLAlchemy as it is, whose bare postgresql:// asks for
    psycopg (3); vqlog installs psycopg2. The password is left out, not masked: a copied line
    with *** in it did not open."""
    from vqlog.commands.sweep import summary_text
    from vqlog.study.worker import SweepSummary

    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable), os.defpath]))

    text = summary_text(SweepSummary("s", 1, 1), 60.0, "postgresql://vq:secret@db:5432/optuna",
                        "sqlite:///mlflow.db", "http://127.0.0.1:5000")
    assert ("optuna: optuna-dashboard postgresql+psycopg2://vq@db:5432/optuna   (with the "
            "password in $PGPASSWORD)") in text, text
    assert "secret" not in text
    text = summary_text(SweepSummary("s", 1, 1), 60.0, "sqlite:///optuna.db",
                        "sqlite:///mlflow.db", "http://127.0.0.1:5000")
    assert "optuna: optuna-dashboard sqlite:///optuna.db" in text
    assert "PGPASSWORD" not in text
    # the best's value with four significant digits: a diverged 3e9 read 2957148160.0000
    best = {"number": 2, "values": [2957148160.0], "params": {"lr": 30.0}}
    text = summary_text(SweepSummary("s", 1, 1, best=best), 60.0, "sqlite:///optuna.db",
                        "sqlite:///mlflow.db", "http://127.0.0.1:5000")
    assert "best: Seq3  val mse 2.957e+09\n  lr=30\n" in text, text
    # the vqlog ui line of a database tracking store: copied, it opens (no *** in it)
    text = summary_text(SweepSummary("s", 1, 1), 60.0, "sqlite:///optuna.db",
                        "postgresql://vq:secret@db:5432/mlflow", "http://127.0.0.1:5000")
    assert ("mlflow: vqlog ui --tracking-uri postgresql://vq@db:5432/mlflow   then open "
            "http://127.0.0.1:5000   (with the password in $PGPASSWORD)") in text, text
    assert "secret" not in text
    # a path with a space, a URL with a shell's &: quoted, the copied line is one argument
    text = summary_text(SweepSummary("s", 1, 1), 60.0, "sqlite:///sub/o p.db",
                        "postgresql://vq@db/mlflow?sslmode=require&connect_timeout=5",
                        "http://127.0.0.1:5000")
    assert ("mlflow: vqlog ui --tracking-uri "
            "'postgresql://vq@db/mlflow?sslmode=require&connect_timeout=5'   then") in text, text
    assert "optuna: optuna-dashboard 'sqlite:///sub/o p.db'" in text, text


def test_the_closing_line_counts_stopped_trials_apart_from_failed_ones():
    """A trial stopped by a signal is marked FAIL to be queued again, and the closing line
    counted it as failed: `0/3 trials finished (2 ran here by 2 workers, 2 failed)` after a
    SIGTERM read as a broken sweep."""
    from vqlog.commands.sweep import summary_text
    from vqlog.study.worker import SweepSummary

    def first_line(**counts) -> str:
        summary = SweepSummary("s", 1, 3, **counts)
        return summary_text(summary, 60.0, "sqlite:///optuna.db", "sqlite:///mlflow.db",
                            "http://127.0.0.1:5000").splitlines()[1]

    assert first_line(ran_here=3, failed_here=3, stopped_iterations=[52, 60], stopped_at=52,
                      stopped_here=2, workers=2) == (
        "study s: 1/3 trials finished (3 ran here by 2 workers, 1 failed, 2 stopped and queued "
        "again) in 1.0 min")
    assert "(2 ran here, 0 failed, 1 stopped and queued again)" in first_line(
        ran_here=2, failed_here=1, interrupted_trial=True)  # a second Ctrl-C: no checkpoint
    assert "(2 ran here, 1 failed) in" in first_line(ran_here=2, failed_here=1)
    # two workers cut off by a second Ctrl-C, one of them after its checkpoint: two stopped
    assert "(4 ran here by 2 workers, 0 failed, 2 stopped and queued again)" in first_line(
        ran_here=4, failed_here=2, interrupted_trial=True, stopped_at=10, stopped_here=2,
        workers=2)
