"""Crash safety (issue 7, item 1): a `vqlog-sweep` worker killed with SIGKILL five times, at points
chosen at random (mid-training, between metric batches, after MLflow has a result that Optuna
does not, halfway through writing the table), then rerun: exactly the target of finished trials,
nothing left RUNNING in Optuna or MLflow, every MLflow run in the state Optuna settled on, and
the table never half-written.

The kills are real SIGKILLs. Four are placed by `vqlog.failpoints` (VQLOG_FAILPOINT=NAME:N kills
the worker at the N-th pass through a named point); one comes from outside at a random moment of
a running trial. VQLOG_CRASH_SEED=<n> replays one draw.
"""

import os
import random
import signal
import time

import pytest
from _sweep_helpers import (FAST_HEARTBEAT, Worker, finished, mlflow_runs, states,
                            study_trials, wait_until, write_spec)

pytestmark = pytest.mark.slow

TARGET = 8  # finished trials; more than five kills can use up before the last one lands
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def draw_kills(seed: int) -> list[tuple[str, float]]:
    """Five kill points in a random order, each at a random pass (or moment)."""
    rng = random.Random(seed)
    kills = [
        ("outside", rng.uniform(0.0, 1.5)),  # seconds into a running trial: training
        ("trial.eval", rng.randint(1, 5)),  # an evaluation: training
        ("tracking.log", rng.randint(1, 5)),  # before a metric batch goes to MLflow: logging
        ("trial.tell", rng.randint(1, 2)),  # MLflow has the result, Optuna does not yet
        # temp file written, not yet renamed: the table. The first write, after the worker's
        # first trial: the next comes 10 s later (the throttle) or at the study's end, and a
        # worker killed there had used up the study (seed 557358 drew 2 and failed)
        ("table.write", 1),
    ]
    rng.shuffle(kills)
    return kills


def assert_whole_table(path) -> None:
    """What a reader can see at any moment: no file yet, or a whole table (every row as wide as
    its header, the legend's last line, a final newline)."""
    if not path.exists():
        return
    text = path.read_text()
    assert text.startswith("# ") and text.endswith("\n"), text
    lines = text.splitlines()
    assert lines[-1].startswith("- ") or "no finished trials" in lines[-1].lower(), text
    width = None
    for line in lines:
        if line.startswith("| run "):
            width = line.count(" | ")
        elif line.startswith("| Seq"):
            assert width is not None and line.count(" | ") == width, line


def test_five_sigkills_at_random_points_then_a_rerun(tmp_path, mlflow_store):
    seed = int(os.environ.get("VQLOG_CRASH_SEED", time.time_ns() % 1_000_000))
    kills = draw_kills(seed)
    print(f"VQLOG_CRASH_SEED={seed}: {kills}")  # shown by pytest when the test fails
    spec = write_spec(tmp_path, "crash", budget={"iteration": 60, "eval_every": 20}, pruner="none")
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", mlflow_store()
    args = ["--trials", str(TARGET), "--config", str(spec), "--storage", storage,
            "--tracking-uri", uri]
    table = tmp_path / "results" / "crash.md"

    for i, (point, when) in enumerate(kills):
        name = f"kill{i}-{point}"
        if point == "outside":
            worker = Worker(args, tmp_path, name, env=FAST_HEARTBEAT)
            try:
                wait_until(lambda: any(t.state.name == "RUNNING"
                                       for t in study_trials(storage, "crash")), 120,
                           "a RUNNING trial", alive=[worker])
                time.sleep(when)
                worker.signal(signal.SIGKILL)
                code = worker.wait(30)
            finally:
                worker.kill()
        else:
            worker = Worker(args, tmp_path, name,
                            env={**FAST_HEARTBEAT, "VQLOG_FAILPOINT": f"{point}:{when}"})
            code = worker.wait(180)
        assert code == -signal.SIGKILL, f"{name} was not killed (exit {code})\n{worker.output()}"
        assert_whole_table(table)
        if point == "table.write":
            # Killed between writing the temp file and renaming it: the table is the previous
            # whole one, and the orphan is cleaned up once it is old (a live writer's never is).
            (orphan,) = table.parent.glob(".crash.md.*.tmp")
            old = time.time() - 3600
            os.utime(orphan, (old, old))
        time.sleep(3.5)  # past the grace period: the next worker fails the dead one's trial

    rerun = Worker(args, tmp_path, "rerun", env=FAST_HEARTBEAT)
    assert rerun.wait(300) == 0, rerun.output()
    assert f"crash: {TARGET}/{TARGET} trials finished" in rerun.stdout

    trials = study_trials(storage, "crash")
    assert len(finished(trials)) == TARGET
    assert "RUNNING" not in states(trials) and "WAITING" not in states(trials)
    assert [t.number for t in trials] == list(range(len(trials)))  # no duplicate, none lost
    # Each kill before Optuna had the result cost its trial (the table is written after it).
    assert states(trials).get("FAIL", 0) >= 3

    runs = mlflow_runs(uri, "crash")
    numbers = [int(r.data.tags["optuna.trial_number"]) for r in runs]
    assert sorted(numbers) == sorted(set(numbers))  # one run per trial
    by_number = {t.number: t for t in trials}
    for run in runs:
        trial = by_number[int(run.data.tags["optuna.trial_number"])]
        assert run.info.status == STATUS[trial.state.name], (trial.number, run.info.status)
        assert run.data.tags["optuna.state"] == trial.state.name, trial.number

    from mlflow.tracking import MlflowClient

    from vqlog.tracking import table as table_mod
    from vqlog.tracking.rows import fetch_rows

    rows = fetch_rows(MlflowClient(tracking_uri=uri), "crash")
    assert table.read_text() == table_mod.render_table(rows, title="crash")
    assert list(table.parent.glob(".crash.md.*.tmp")) == []
