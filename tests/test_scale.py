"""Scale: several worker processes on one host (`--workers`), a flat cost per trial (the table's
rows fetched incrementally), and a study-run description that always fits MLflow's tag limit."""

import contextlib
import dataclasses
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _sweep_helpers import (SWEEP_BIN, Worker, finished, mlflow_runs, retried_from, states,
                            study_trials, wait_until, write_spec)

from vqlog.bulk import gc_paused
from vqlog.tracking.rows import RowCache, TrialRow, fetch_rows
from vqlog.tracking.table import (DESCRIPTION_LIMIT, RenderCache, render_description, render_table,
                                  table_json, table_records)

# ------------------------------------------------------------------ the description (pure)


def many_rows(n: int) -> list[TrialRow]:
    rows = []
    for i in range(n):
        params = {"batch": "64", "lr": str(1e-3 * (1 + i % 7)), "embedding_dim": "64",
                  "embedding_num": str(128 * (1 + i % 4)), "iteration": "300", "BN": "True",
                  "MLP": "relu", "En-De": "s4d-all"}
        metrics = {"final_val_mse": 0.5 / (1 + (i * 37) % n), "best_val_mse": 0.4 / (1 + i),
                   "max_val_perplexity": 10.0 + i % 50, "iterations_run": 300.0}
        state = "PRUNED" if i % 5 == 4 else "COMPLETE"
        rows.append(TrialRow(i, state, params, metrics, queued=i < 3))
    return rows


def test_a_small_table_is_its_own_description():
    rows = many_rows(5)
    assert render_description(rows, title="s") == render_table(rows, title="s")


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("n", [100, 1000])
def test_the_description_fits_the_limit_in_whole_rows_with_the_logs_rows_and_the_best(n, lang):
    rows = many_rows(n)
    full = render_table(rows, lang, title="big")
    assert len(full) > DESCRIPTION_LIMIT
    text = render_description(rows, lang, title="big", text=full)
    assert len(text) <= DESCRIPTION_LIMIT
    shown = [line for line in text.splitlines() if line.startswith("| Seq")]
    header = next(line for line in text.splitlines() if line.startswith("| run "))
    assert all(line.count(" | ") == header.count(" | ") and line.endswith(" |") for line in shown)
    names = [line.split(" | ")[0][2:].rstrip(" ★") for line in shown]
    assert names[:3] == ["Seq1", "Seq2", "Seq3"]  # the log's own rows
    complete = [r for r in rows if r.state == "COMPLETE" and not r.queued]
    best = sorted(complete, key=lambda r: r.metrics["final_val_mse"])[:len(names) - 3]
    assert sorted(names[3:]) == sorted(f"Seq{r.number + 1}" for r in best)
    star = next(line for line in full.splitlines() if " ★ |" in line)
    assert star in text.splitlines()  # the table's best is shown, starred the same
    more = n - len(names)
    assert (f"and {more} more rows" if lang == "en" else f"另有 {more} 行") in text
    assert text.rstrip().splitlines()[-1].startswith("- ")  # the legend closes it, whole


def test_a_cut_description_stars_the_rows_the_whole_table_stars():
    """A spec with queued rows and a `quantizer: none` table: the ranks run across both tables,
    so a cut left the baseline table's best out and put its ★ on a queued row."""
    params = {"batch": "32", "lr": "0.001", "embedding_dim": "64", "embedding_num": "128",
              "iteration": "300", "BN": "True", "MLP": "relu", "En-De": "s4d-all"}

    def row(number: int, quantizer: str, mse: float, queued: bool = False) -> TrialRow:
        return TrialRow(number, "COMPLETE", {**params, "quantizer": quantizer},
                        {"final_val_mse": mse, "best_val_mse": mse, "iterations_run": 300.0},
                        queued=queued)

    rows = [row(0, "none", 0.9, queued=True), row(1, "none", 0.5)]
    rows += [row(i, "vq", 0.01 + i / 10000) for i in range(2, 200)]
    full = render_table(rows, title="s")
    text = render_description(rows, title="s", text=full)
    assert len(full) > DESCRIPTION_LIMIT >= len(text)
    stars = [line for line in full.splitlines() if " ★ |" in line]
    assert [line[:9] for line in stars] == ["| Seq3 ★ ", "| Seq2 ★ "]
    assert [line for line in text.splitlines() if " ★ |" in line] == stars


def test_a_long_table_reaches_the_study_run_whole_in_its_artifact_and_cut_in_its_description(
        tmp_path, capfd, caplog):
    """300 rows on a real SQLite store: the artifact holds them all, the description fits, and
    MLflow logs nothing (its WARNING for a tag cut at the limit carried the table's first lines)."""
    from mlflow.tracking import MlflowClient

    from vqlog.tracking.table import publish_table

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    # its artifacts in tmp_path: MLflow's default, ./mlruns, is in the checkout
    run = client.create_run(client.create_experiment(
        "long", artifact_location=(tmp_path / "mlartifacts").as_uri()))
    rows = many_rows(300)
    text = render_table(rows, "en", title="long")
    capfd.readouterr()
    caplog.clear()
    publish_table(client, run.info.run_id, rows, "long", "en", text)
    out, err = capfd.readouterr()
    assert "mlflow" not in (out + err).lower() and not caplog.records, (out, err, caplog.text)
    description = client.get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert len(description) <= DESCRIPTION_LIMIT < len(text)
    assert description == render_description(rows, "en", title="long", text=text)
    artifact = client.download_artifacts(run.info.run_id, "experiment_table.md", str(tmp_path))
    assert Path(artifact).read_text() == text
    assert sum(line.startswith("| Seq") for line in text.splitlines()) == 300


# ----------------------------------------------------------------- incremental rows


class CountingClient:
    """An MlflowClient that counts the runs its searches return (it forwards everything)."""

    def __init__(self, client):
        self.client, self.returned = client, []
        self.collector_on: list[bool] = []  # whether Python's collector ran during each search

    def __getattr__(self, name):
        return getattr(self.client, name)

    def search_runs(self, *args, **kwargs):
        self.collector_on.append(gc.isenabled())
        page = self.client.search_runs(*args, **kwargs)
        self.returned.append(len(page))
        return page


class TagCountingClient(CountingClient):
    """A CountingClient that also records the keys of the tags set one by one."""

    def __init__(self, client):
        super().__init__(client)
        self.tags_set: list[str] = []

    def set_tag(self, run_id, key, value, *args, **kwargs):
        self.tags_set.append(key)
        return self.client.set_tag(run_id, key, value, *args, **kwargs)


def test_a_tracker_marks_the_study_run_as_holding_a_table_once(tmp_path):
    """`mlflow.loggedArtifacts` (what makes the JSON a table for `load_table` and the UI) never
    changes: the first refresh sets it, later ones only the table and its description."""
    import optuna
    from mlflow.tracking import MlflowClient

    from vqlog.study.spec import load_sweep
    from vqlog.tracking.client import RetryingClient
    from vqlog.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(study_name="marked")
    spec = dataclasses.replace(load_sweep("smoke"), name="marked")
    tracker = Tracker(uri, table_dir=tmp_path / "results")
    counting = TagCountingClient(MlflowClient(tracking_uri=tracker.uri))
    tracker._client = RetryingClient(counting, "test store")
    tracker.start_study(study, spec)
    trial = study.ask()
    tracker.start_trial(trial.number, spec.base_config()).finish(
        "COMPLETE", {"best_val_mse": 0.08, "final_val_mse": 0.09, "iterations_run": 10.0})
    study.tell(trial, 0.09)
    counting.tags_set.clear()
    for _ in range(3):
        tracker.refresh_table()
    assert counting.tags_set.count("mlflow.loggedArtifacts") == 1
    assert counting.tags_set.count("mlflow.note.content") == 3
    parent = MlflowClient(tracking_uri=uri).get_run(tracker.parent_id)
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "experiment_table.json", "type": "table"}]
    run = MlflowClient(tracking_uri=uri).search_runs(
        [tracker.experiment_id], "tags.`vqlog.role` = 'trial'")[0]
    assert run.data.tags["optuna.state"] == "COMPLETE" and run.info.status == "FINISHED"
    assert run.data.metrics["final_val_mse"] == 0.09  # sent with the state, in one request


def test_a_trial_that_failed_before_logging_anything_shows_0_iterations_not_the_budget(tmp_path):
    """A trial that failed before its first evaluation (out of memory at its first step, say)
    showed the configured budget in the table's iteration column, as if it had trained."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from vqlog.study.spec import load_sweep
    from vqlog.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(study_name="early")
    spec = dataclasses.replace(load_sweep("smoke"), name="early")
    cfg = spec.base_config()
    tracker = Tracker(uri, table_dir=tmp_path / "results")
    tracker.start_study(study, spec)
    trial = study.ask()
    tracker.start_trial(trial.number, cfg).finish("FAIL", reason="RuntimeError: out of memory")
    study.tell(trial, state=TrialState.FAIL)
    tracker.refresh_table()
    (run,) = MlflowClient(tracking_uri=uri).search_runs(
        [tracker.experiment_id], "tags.`vqlog.role` = 'trial'")
    assert run.data.metrics["iterations_run"] == 0
    table = (tmp_path / "results" / "early.md").read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| Seq1 ")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert "0" in cells and str(cfg.iteration) not in cells, row


def test_a_study_run_deleted_in_the_ui_gets_a_new_one_and_the_sweep_goes_on(tmp_path):
    """The table's next refresh found the study run deleted: MLflow refused the write, and the
    worker ended the sweep with exit 1."""
    import optuna
    from mlflow.tracking import MlflowClient

    from vqlog.study.spec import load_sweep
    from vqlog.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(study_name="gone")
    spec = dataclasses.replace(load_sweep("smoke"), name="gone")
    tracker = Tracker(uri, table_dir=tmp_path / "results")
    tracker.start_study(study, spec)
    first = tracker.parent_id
    summary = {"best_val_mse": 0.08, "final_val_mse": 0.09, "iterations_run": 10.0}
    for _ in range(2):
        trial = study.ask()
        tracker.start_trial(trial.number, spec.base_config()).finish("COMPLETE", summary)
        study.tell(trial, 0.09)
        tracker.refresh_table()
        MlflowClient(tracking_uri=uri).delete_run(tracker.parent_id)
    tracker.refresh_table()
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(tracker.parent_id)
    assert tracker.parent_id != first and parent.info.lifecycle_stage == "active"
    assert parent.data.tags["vqlog.role"] == "study" and "| Seq2 |" in parent.data.tags[
        "mlflow.note.content"]
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"])[0]["type"] == "table"
    assert client.get_run(first).info.lifecycle_stage == "deleted"


def test_gc_paused_turns_the_collector_off_for_its_block_and_back_as_it_was():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the inner block leaves it off for the outer one
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed read")
    assert gc.isenabled()  # back on after an exception too
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own choice is kept
    finally:
        gc.enable()


def test_a_workers_start_reads_every_run_once_and_the_table_shows_what_reconcile_changed(
        tmp_path, monkeypatch):
    """A new worker's reconcile reads every trial run, with Python's collector off; the
    table's first look takes its rows from that read and queries only the runs that ended
    since, among them the run reconcile closed (a dead worker's trial), in its new state."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from vqlog.study.spec import load_sweep
    from vqlog.tracking.client import RetryingClient
    from vqlog.tracking.runs import Tracker

    monkeypatch.setattr(RowCache, "SLACK_MS", 1000)  # (30 s by default: other hosts' clocks)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(study_name="seeded", storage=f"sqlite:///{tmp_path}/optuna.db")
    spec = dataclasses.replace(load_sweep("smoke"), name="seeded")
    first = Tracker(uri, table_dir=tmp_path / "first")
    first.start_study(study, spec)
    summary = {"best_val_mse": 0.08, "final_val_mse": 0.09, "iterations_run": 10.0}
    asked = [study.ask() for _ in range(6)]
    runs = [first.start_trial(t.number, spec.base_config()) for t in asked]
    for trial, run in zip(asked[:5], runs[:5]):
        run.finish("COMPLETE", summary)
        study.tell(trial, 0.09)
    study.tell(asked[5], state=TrialState.FAIL)  # its worker died: the run is left RUNNING
    time.sleep(1.5)  # every run ended (or started) before the slack of the next look

    worker = Tracker(uri, table_dir=tmp_path / "results")
    counting = CountingClient(MlflowClient(tracking_uri=worker.uri))
    worker._client = RetryingClient(counting, "test store")
    worker.start_study(study, spec)
    assert counting.returned.count(6) == 1  # every trial run, read once
    read_all = counting.returned.index(6)
    assert counting.collector_on[read_all] is False and gc.isenabled()
    text = Path(worker.refresh_table()).read_text()
    assert counting.returned[-1] == 1  # the table's first look: only the run reconcile closed
    assert counting.returned.count(6) == 1
    lines = [line for line in text.splitlines() if line.startswith("| Seq")]
    assert len(lines) == 6
    assert "failed: worker lost" in lines[-1], lines[-1]  # Seq6 as reconcile left it
    assert [(r.number, r.state) for r in worker._rows.rows()] == \
        [(r.number, r.state) for r in fetch_rows(MlflowClient(tracking_uri=uri), "seeded")]


def test_the_row_cache_fetches_only_runs_that_ended_since_its_last_look(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("inc")

    def trial(number: int, state="COMPLETE", status="FINISHED"):
        run = client.create_run(exp, tags={"vqlog.role": "trial", "optuna.trial_number": str(number),
                                           "optuna.state": state})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    for n in range(30):
        trial(n)
    running = trial(30, "RUNNING", "RUNNING")
    time.sleep(3.5)  # the 30 finished runs end well before the first look
    counting = CountingClient(client)
    cache = RowCache(counting, "inc")
    # (30 s by default: other hosts' clocks); the runs that end before the second look must
    # still be within it at the third, however slow the machine's writes between
    cache.SLACK_MS = 3000
    assert [r.number for r in cache.rows()] == list(range(31))
    assert counting.returned == [0, 31]  # no deleted run; the first look reads everything once
    trial(31)
    client.set_tag(running, "optuna.state", "PRUNED")
    client.set_terminated(running, "KILLED")
    # a run of another kind that ends meanwhile (the study run, a user's own) is no row
    other = client.create_run(exp, tags={"vqlog.role": "study", "optuna.trial_number": "5"})
    client.set_terminated(other.info.run_id, "FINISHED")
    rows = cache.rows()
    assert counting.returned[-1] == 3  # only the three runs that ended since
    assert [(r.number, r.state) for r in rows] == [(r.number, r.state) for r in fetch_rows(client, "inc")]
    assert rows[30].state == "PRUNED" and len(rows) == 32
    assert rows[5].run_id != other.info.run_id
    unchanged = cache.rows()
    # the runs that ended before the slack keep their row objects (what RenderCache keys on);
    # the three that ended within it are read again
    assert all(a is b for a, b in zip(rows[:30], unchanged[:30]))
    assert counting.returned[-1] == 3
    assert [(r.number, r.run_id) for r in unchanged] == [(r.number, r.run_id) for r in rows]


def test_a_run_deleted_in_the_ui_leaves_the_cached_rows_and_comes_back_restored(tmp_path):
    """A deleted (or restored) run keeps its end time, so the incremental look alone never saw
    it go: a sweep's table kept a row the user had deleted, and republished it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("del")
    runs = []
    for n in range(4):
        run = client.create_run(exp, tags={"vqlog.role": "trial", "optuna.trial_number": str(n),
                                           "optuna.state": "COMPLETE"})
        client.set_terminated(run.info.run_id, "FINISHED")
        runs.append(run.info.run_id)
    time.sleep(1.5)
    counting = CountingClient(client)
    cache = RowCache(counting, "del")
    cache.SLACK_MS = 1000
    assert [r.number for r in cache.rows()] == [0, 1, 2, 3]
    assert counting.returned[-1] == 4
    assert [r.number for r in cache.rows()] == [0, 1, 2, 3] and counting.returned[-2:] == [0, 0]
    client.delete_run(runs[2])
    assert [r.number for r in cache.rows()] == [0, 1, 3]
    assert [r.number for r in cache.rows()] == [0, 1, 3] and counting.returned[-1] == 0
    client.restore_run(runs[2])
    assert [r.number for r in cache.rows()] == [0, 1, 2, 3]
    assert [r.run_id for r in cache.rows()] == runs

    seeded = RowCache(client, "del")  # a worker's start: the rows come from reconcile's read
    seeded.seed(client.search_runs([exp]), int(time.time() * 1000))
    client.delete_run(runs[0])
    assert [r.number for r in seeded.rows()] == [1, 2, 3]


def test_a_cached_render_is_the_uncached_one_and_follows_changed_rows():
    rows = many_rows(400)
    cache = RenderCache()
    for lang in ("en", "zh"):
        plain = render_table(rows, lang, "cached")
        assert render_table(rows, lang, "cached", cache=cache) == plain
        assert render_table(rows, lang, "cached", cache=cache) == plain  # from the cache
        assert render_description(rows, lang, "cached", text=plain, cache=cache) == \
            render_description(rows, lang, "cached", text=plain)
        assert json.loads(table_json(rows, lang, cache)) == {
            "columns": ["table", *render_records_columns(rows, lang)],
            "data": [list(r.values()) for r in table_records(rows, lang)]}
    # a trial that changes (a new row object for its run) is rendered anew, the rest are not
    changed = list(rows)
    changed[7] = dataclasses.replace(rows[7], state="FAIL", fail_reason="loss is NaN at iteration 9")
    changed[11] = dataclasses.replace(rows[11], metrics={**rows[11].metrics, "final_val_mse": 1e-9})
    text = render_table(changed, "en", "cached", cache=cache)
    assert text == render_table(changed, "en", "cached")
    assert "| Seq8 |" in text and "failed: diverged @ 9" in text.split("| Seq8 |")[1].split("\n")[0]
    assert "| Seq12 ★ |" in text  # the new best takes the mark from the old one
    cache.keep(changed[:10])  # rows that left the table are forgotten, the rest still render
    assert render_table(changed, "en", "cached", cache=cache) == text


def render_records_columns(rows, lang):
    return list(dict.fromkeys(k for r in table_records(rows, lang) for k in r if k != "table"))


# ---------------------------------------------------------------------- --workers N


def test_workers_split_the_cores_and_take_the_gpus_in_turn():
    from vqlog.study.hosts import WORKER_MEMORY, cores, memory_available, placements, worker_count

    n = cores()
    assert worker_count("auto", "cpu", None) == min(n, max(1, memory_available() // WORKER_MEMORY))
    assert worker_count("auto", "cuda", [0, 1, 3]) == 3
    assert placements(2, "cpu", None) == [("cpu", max(1, n // 2))] * 2
    assert placements(64, "cpu", None) == [("cpu", 1)] * 64  # never 0 threads
    for k in range(1, 9):  # every core taken (6 cores, 4 workers: 2 were left idle), evenly
        threads = [t for _, t in placements(k, "cpu", None)]
        assert sum(threads) == max(n, k) and max(threads) - min(threads) <= 1, (k, threads)
    assert [d for d, _ in placements(5, "cuda", [2, 0])] == \
        ["cuda:2", "cuda:0", "cuda:2", "cuda:0", "cuda:2"]  # several workers on one GPU


def _slow_to_stop(ready, why) -> None:
    """A worker's stop (`WorkerStop` under `stop_on_signals`) around a clean stop that takes
    minutes, as a checkpoint to a slow store does: exit 130 if stopped at once, 143 if it ever
    ends."""
    from vqlog.commands.sweep import stop_on_signals
    from vqlog.study.child import WorkerStop

    stop = WorkerStop(os.getppid(), why)
    with stop_on_signals(stop, quiet=True, restore=False):
        try:
            ready.set()  # (a signal may come while it still returns)
            while not stop.is_set():
                time.sleep(0.05)
            time.sleep(300)  # the clean stop
        except KeyboardInterrupt:
            raise SystemExit(130) from None
    raise SystemExit(143)


@pytest.mark.parametrize("first", [None, signal.SIGINT, signal.SIGTERM])
def test_a_ctrl_c_again_that_the_sweep_alone_got_stops_its_workers_at_once(first):
    """A second Ctrl-C that reached the sweep's process alone (`kill -INT`, a notebook's
    interrupt, `docker run` without -t) sent the workers SIGTERM, which a stopping worker already
    obeys, and waited for each in turn, a minute each, then killed it. They now stop at once
    (their own KeyboardInterrupt, with its clean-up), stopping already for the sweep's first
    Ctrl-C, for a SIGTERM, or not yet."""
    import multiprocessing

    from vqlog.study.pool import _end_workers

    ctx = multiprocessing.get_context("spawn")
    why, procs = ctx.RawValue("i", 0), []
    for _ in range(2):
        ready = ctx.Event()
        procs.append(ctx.Process(target=_slow_to_stop, args=(ready, why)))
        procs[-1].start()
        assert ready.wait(120)
    try:
        if first is not None:  # the parent forwards a stop as SIGTERM, its reason in `why`
            why.value = first
            for p in procs:
                os.kill(p.pid, signal.SIGTERM)
            time.sleep(0.5)
        _end_workers(procs, at_once=True, why=why, reached=False)
    finally:
        for p in procs:
            p.kill()
    assert [p.exitcode for p in procs] == [130, 130]


@pytest.mark.slow
def test_a_worker_killed_mid_sweep_is_replaced_and_the_sweep_ends_well(tmp_path):
    """SIGKILL to one worker of two (as the kernel's out-of-memory killer sends it): the parent
    says so, starts a new worker in its place, the killed trial is retried once its heartbeat is
    stale, and the sweep ends with exactly N finished and exit 0 (before: "Interrupted", 130)."""
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path, "lost", budget={"iteration": 600, "eval_every": 50},
                      pruner="none")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = Worker(["--trials", "5", "--config", str(spec), "--workers", "2"], tmp_path,
                   env={"VQLOG_HEARTBEAT_INTERVAL": "2", "VQLOG_HEARTBEAT_GRACE": "10"})
    try:
        def a_worker_in_its_second_trial():
            """Its pid, while the trial is in its first half: a kill must not come after the
            trial has ended (no trial would fail then)."""
            runs = mlflow_runs(uri, "lost", missing_ok=True)
            ended = {r.data.tags["vqlog.worker"].split(":")[1] for r in runs
                     if r.info.status == "FINISHED"}
            for r in runs:
                pid = r.data.tags["vqlog.worker"].split(":")[1]
                if r.info.status == "RUNNING" and pid in ended:
                    steps = [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(
                        r.info.run_id, "train/loss")]
                    if max(steps, default=0) < 300:
                        return int(pid)
            return None

        victim = wait_until(a_worker_in_its_second_trial, 240, "a worker in its second trial",
                            alive=[sweep])
        before = worker_processes(sweep.proc.pid)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: worker_processes(sweep.proc.pid) - before, 60, "a new worker process",
                   alive=[sweep], interval=0.05)
        assert sweep.wait(600) == 0, sweep.output()
    finally:
        sweep.kill()
    out = sweep.stdout
    assert (f"(pid {victim}) was killed by SIGKILL; perhaps out of memory; a new worker takes "
            "its place") in out, out
    assert "Interrupted" not in out and "1 worker died" in out
    # the dead worker's trials count among those that ran here (its summary never came)
    ran = int(re.search(r"\((\d+) ran here by 2 workers", out).group(1))
    assert ran == sum(line.startswith("Seq") for line in out.splitlines()), out
    trials = study_trials(f"sqlite:///{tmp_path}/optuna.db", "lost")
    assert len(finished(trials)) == 5 and "RUNNING" not in states(trials)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1  # the killed trial, retried with its parameters
    assert any(retried_from(t) == failed[0].number for t in finished(trials))
    assert str(victim) in {r.data.tags["vqlog.worker"].split(":")[1]
                           for r in mlflow_runs(uri, "lost")}


@pytest.mark.slow
def test_workers_killed_as_they_send_a_line_stop_no_other_worker(tmp_path):
    """Every worker process is killed (SIGKILL) as it sends its second message, a trial's line
    or its summary. With one multiprocessing.Queue for all workers, a worker killed while its
    queue's thread held the queue's shared write lock stopped every other worker's lines and hung
    their exits, and the sweep with them. Each worker has a pipe of its own now: the deaths are
    reported and the sweep ends with exactly N. The deaths come once the study has its trials
    (a worker's line follows its trial's end): no new worker takes a place then (a new one was
    started, only to find the study done)."""
    spec = write_spec(tmp_path, "sends", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    sweep = Worker(["--trials", "2", "--config", str(spec), "--workers", "2"], tmp_path,
                   env={"VQLOG_FAILPOINT": "worker.send:2", "VQLOG_HEARTBEAT_INTERVAL": "2",
                        "VQLOG_HEARTBEAT_GRACE": "10"})
    assert sweep.wait(300) == 0, sweep.output()
    out = sweep.stdout
    assert "was killed by SIGKILL; perhaps out of memory; the study has its trials, so no new " \
        "worker takes its place" in out, out
    assert "a new worker takes its place" not in out, out
    trials = study_trials(f"sqlite:///{tmp_path}/optuna.db", "sends")
    assert len(finished(trials)) == 2 and "RUNNING" not in states(trials), sweep.output()
    assert "study sends: 2/2 trials finished" in out, out


def worker_processes(parent: int) -> set[int]:
    """The pids of the worker processes (multiprocessing's spawned children) of a sweep."""
    import psutil

    found = set()
    for child in psutil.Process(parent).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def test_workers_that_die_before_ending_a_trial_are_not_replaced(tmp_path):
    """A worker that dies in its first trial (no memory for its model, a broken device) would
    die again: the others go on without it, and once none is left the sweep ends with one Error
    line and exit 1, keeping what finished."""
    spec = write_spec(tmp_path, "doomed", budget={"iteration": 40, "eval_every": 10},
                      pruner="none")
    # every worker process kills itself with SIGKILL at its first evaluation
    sweep = Worker(["--trials", "3", "--config", str(spec), "--workers", "2"], tmp_path,
                   env={"VQLOG_FAILPOINT": "trial.eval:1"})
    assert sweep.wait(300) == 1, sweep.output()
    out, err = sweep.stdout, sweep.stderr
    assert out.count("was killed by SIGKILL") == 2, out
    assert out.count("it had not ended a trial, so no new worker takes its place") == 2
    assert err.startswith("Error: worker ") and len(err.strip().splitlines()) == 1, err
    assert "no worker is left: 0/3 trials finished" in err and "rerun the same command" in err
    # the workers leave the last table to the sweep's process, which wrote none on this error
    assert (tmp_path / "results" / "doomed.md").read_text().startswith("# doomed")


def test_a_worker_whose_gpu_cannot_be_used_says_why(tmp_path):
    """A worker whose GPU is gone or busy: torch.cuda.set_device raised before the worker's
    handlers were in, and the parent said only "exited with 1 without a word" after a traceback.
    Now the worker's note says why, and it dies as a worker that ended no trial does (the others
    go on: test_workers_that_die_before_ending_a_trial_are_not_replaced). On this CPU build
    torch has no CUDA at all, which fails the same call; on a GPU host, GPU 99 is not there."""
    script = ("import multiprocessing, os, sys\n"
              "from vqlog.study import child, pool\n"
              "pipe, end = multiprocessing.Pipe(duplex=False)\n"
              "try:\n"
              "    child.worker_process(3, {}, 'cuda:99', 1, end, os.getpid(), None)\n"
              "except SystemExit as exc:\n"
              "    print(*pipe.recv(), sep='|')\n"
              "    print(pool._death(exc.code))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    note, death = proc.stdout.splitlines()
    assert note.startswith("note|3|worker 3: cannot use cuda:99: "), proc.stdout
    assert death == "could not use its GPU"


def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path):
    """vqlog.sweep(workers=2) at a script's top level: each worker process imports the script
    again (spawn) and called vqlog.sweep there too, which multiprocessing refused with a long
    RuntimeError per worker; the sweep then said "exited with 1 without a word" and advised
    fewer --workers. Now the one error names the missing guard."""
    spec = write_spec(tmp_path, "guard", budget={"iteration": 6, "eval_every": 3}, pruner="none")
    (tmp_path / "run.py").write_text(
        "import vqlog\n"
        f"vqlog.sweep(trials=2, config={str(spec)!r}, storage='sqlite:///o.db',\n"
        "            tracking_uri='sqlite:///m.db', workers=2, device='cpu')\n")
    proc = subprocess.run([sys.executable, "run.py"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vqlog.errors.UserError: each worker process imports the script") \
        and last.endswith('call it under `if __name__ == "__main__":`'), proc.stderr
    assert "bootstrapping phase" not in proc.stderr and "without a word" not in proc.stdout
    assert "--workers" not in proc.stderr


def started_workers(sweep: Worker, n: int) -> set[int]:
    """The pids of a sweep's `n` worker processes, as soon as all have been spawned."""
    return wait_until(lambda: (found := worker_processes(sweep.proc.pid)) and len(found) == n
                      and found, 60, f"{n} worker processes", alive=[sweep], interval=0.02)


def two_worker_sweep(tmp_path, name: str) -> tuple[list[str], str, str, Worker]:
    """A sweep of 3 trials of 400 iterations by 2 workers on SQLite files in tmp_path, started:
    its arguments, storage URL, tracking URI and process."""
    spec = write_spec(tmp_path, name, budget={"iteration": 400, "eval_every": 50}, pruner="none")
    args = ["--trials", "3", "--config", str(spec), "--workers", "2"]
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    return args, storage, uri, Worker(args, tmp_path, "first")


def two_running(uri: str, study: str, sweep: Worker) -> list:
    """The two trial runs of `two_worker_sweep`'s workers, once both are RUNNING."""
    def both():
        runs = [r for r in mlflow_runs(uri, study, missing_ok=True) if r.info.status == "RUNNING"]
        return len(runs) == 2 and runs

    return wait_until(both, 180, "two trials running", alive=[sweep])


def gone(pids: set[int], timeout: float) -> bool:
    import psutil

    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=timeout)
    return not alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_workers_start_is_a_clean_stop(tmp_path, sig):
    """SIGTERM or Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the
    workers are still importing torch: the workers hold the signal until their handlers are in,
    then stop as they would mid-trial. No worker is reported dead, no traceback is printed, no
    process is left, and nothing is left RUNNING (before: "worker 0 was killed by SIGTERM" and
    KeyboardInterrupt tracebacks from `import torch`)."""
    spec = write_spec(tmp_path, "early", budget={"iteration": 400, "eval_every": 50},
                      pruner="none")
    sweep = Worker(["--trials", "3", "--config", str(spec), "--workers", "2"], tmp_path,
                   start_new_session=True)
    try:
        pids = started_workers(sweep, 2)
        if sig == signal.SIGINT:
            os.killpg(sweep.proc.pid, signal.SIGINT)
        else:
            sweep.signal(sig)
        code = sweep.wait(120)
    finally:
        sweep.kill()
    assert code == 128 + sig, sweep.output()
    assert gone(pids, 30)
    assert "was killed" not in sweep.stdout and "died" not in sweep.stdout, sweep.output()
    assert "Traceback" not in sweep.stderr, sweep.stderr
    assert f"Stopped ({sig.name})" in sweep.stdout, sweep.output()
    trials = study_trials(f"sqlite:///{tmp_path}/optuna.db", "early")
    assert "RUNNING" not in states(trials) and not finished(trials)


@pytest.mark.slow
def test_workers_stop_cleanly_when_the_sweep_process_is_killed(tmp_path):
    """SIGKILL to the sweep's own process (`kill -9`, the out-of-memory killer): its workers do
    not train on unseen, with nobody reading their lines. Each checkpoints its trial, marks it
    FAIL and exits, as on SIGTERM, and the same command run again finishes exactly N."""
    import psutil

    args, storage, uri, first = two_worker_sweep(tmp_path, "orphans")
    try:
        pids = started_workers(first, 2)
        wait_until(lambda: len([r for r in mlflow_runs(uri, "orphans", missing_ok=True)
                                if r.info.status == "RUNNING"]) == 2,
                   180, "two trials running", alive=[first])
        trackers = {p.pid for p in psutil.Process(first.proc.pid).children()
                    if "resource_tracker" in " ".join(p.cmdline())}
        assert trackers, "no resource tracker beside the sweep"
        first.proc.kill()
        first.proc.wait()
        assert gone(pids | trackers, 60), "the workers went on after their sweep process was killed"
    finally:
        first.kill()
    # multiprocessing's resource tracker cleans up the dead sweep's queue and warns of it on its
    # way out ("leaked semaphore objects"), into the sweep's output: filtered there
    assert "Warning" not in first.err_path.read_text(), first.output()
    trials = study_trials(storage, "orphans")
    stopped = [t for t in trials if t.state.name == "FAIL"]
    assert {t.user_attrs["fail_reason"] for t in stopped} == {
        "stopped (the sweep's main process ended); resumes on rerun"}, states(trials)
    assert len(stopped) == 2 and "RUNNING" not in states(trials)
    rerun = Worker(args, tmp_path, "rerun")
    assert rerun.wait(600) == 0, rerun.output()
    assert len(finished(study_trials(storage, "orphans"))) == 3


def test_a_stop_after_the_last_trial_is_not_a_stop(tmp_path, monkeypatch):
    """A Ctrl-C or SIGTERM that comes once the study has its N trials stops nothing: the sweep
    does not say "Stopped ... rerun" (and exits 0), with --workers and with one worker."""
    from vqlog import api
    from vqlog.study import pool
    from vqlog.study.worker import StopRequest

    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, "late", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    spec = api.study_spec(str(path), None, None, None, None)
    storage, tracker = api.prepare(spec, f"sqlite:///{tmp_path}/optuna.db",
                                   f"sqlite:///{tmp_path}/mlflow.db", "en")
    stop, lines = StopRequest(), []

    def out(line: str) -> None:
        lines.append(line)
        if sum(x.startswith("Seq") for x in lines) == 2:
            stop.request("SIGTERM")  # as the handler does, on the last trial's line

    summary = pool.sweep(spec, 2, storage, tracker, 2, "cpu", stop=stop, out=out)
    assert stop.is_set() and summary.finished == 2
    assert summary.stopped is None and not summary.interrupted
    # and one worker: it said "Stopped (SIGTERM) ... Rerun", exit 143, for a finished study
    stop, lines = StopRequest(), []
    summary = api.run_sweep(spec, 4, storage, tracker, 1, "cpu", None, None, None, stop, out)
    assert stop.is_set() and summary.finished == 4
    assert summary.stopped is None and not summary.interrupted


def test_a_worker_of_workers_leaves_the_last_table_and_plots_to_the_sweeps_process(tmp_path,
                                                                                  monkeypatch):
    """Each worker of --workers reconciled the runs, wrote the table and drew Optuna's study
    plots (which read every trial: 5 s at 10,000) as it ended, and then the sweep's process did
    the same: N + 1 times at once, after a SIGTERM too. A worker leaves it to the sweep's process
    now, unless that process is gone, whatever stopped the worker; a worker on its own does it
    as before."""
    from vqlog import api
    from vqlog.study.stop import PARENT_GONE
    from vqlog.study.worker import StopRequest, Worker
    from vqlog.tracking.runs import Tracker

    class Counted(Tracker):  # vqlog's own tracker, on a real store: it counts its last refreshes
        ends = 0

        def finish_study(self, study):
            self.ends += 1
            return super().finish_study(study)

    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, "ends", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    spec = api.study_spec(str(path), None, None, None, None)
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Counted(uri)
    summary = Worker(spec, 1, storage, tracker=tracker, bar=False, out=print).run()
    assert summary.finished == summary.ran_here == 1 and tracker.ends == 0
    assert (tmp_path / "results" / "ends.md").is_file()  # the table after the trial
    gone = StopRequest()
    gone.request(PARENT_GONE)
    # stopped by a SIGTERM, and its sweep's process killed after sending it on (another parent)
    orphaned = StopRequest()
    orphaned.request("SIGTERM")
    orphaned.parent = os.getppid() + 1
    for options in ({"bar": True}, {"bar": False, "stop": gone}, {"bar": False, "stop": orphaned}):
        tracker = Counted(uri)
        summary = Worker(spec, 1, storage, tracker=tracker, out=print, **options).run()
        assert summary.finished == 1 and summary.ran_here == 0 and tracker.ends == 1, options
        assert summary.table_path == str(Path("results") / "ends.md")


def test_a_pool_stopped_at_once_still_writes_the_last_table(tmp_path, monkeypatch):
    """A worker of --workers leaves the last table to the sweep's process; a Ctrl-C again (or a
    worker's error) ends that process with an exception, and then nobody wrote it: a trial
    whose refresh the 10 s throttle had skipped was missing from the table."""
    from vqlog import api
    from vqlog.study import pool
    from vqlog.study.worker import StopRequest

    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, "atonce", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    spec = api.study_spec(str(path), None, None, None, None)
    storage, tracker = api.prepare(spec, f"sqlite:///{tmp_path}/optuna.db",
                                   f"sqlite:///{tmp_path}/mlflow.db", "en")
    lines = []

    def out(line: str) -> None:
        lines.append(line)
        if sum(x.startswith("Seq") for x in lines) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C again lands in the sweep's process

    with pytest.raises(KeyboardInterrupt):
        pool.sweep(spec, 3, storage, tracker, 1, "cpu", stop=StopRequest(), out=out)
    table = (tmp_path / "results" / "atonce.md").read_text()
    assert [line.split()[1] for line in table.splitlines() if line.startswith("| Seq")] == [
        "Seq1", "Seq2"], lines


def test_the_timeout_counts_from_when_the_sweep_began_not_from_a_workers_start(tmp_path,
                                                                               monkeypatch):
    """--timeout with --workers: each worker timed it from its own start, so one that started in
    a dead worker's place ran new trials after the others had stopped for the timeout (a 25 s
    timeout ended after 79 s). A worker now times it from when the sweep began."""
    from datetime import datetime, timedelta

    from vqlog import api
    from vqlog.study.worker import Worker

    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, "timed", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    spec = api.study_spec(str(path), None, None, None, None)
    storage, lines = f"sqlite:///{tmp_path}/optuna.db", []
    late = Worker(spec, 2, storage, timeout=5, began=datetime.now() - timedelta(seconds=10),
                  out=lines.append, bar=False)  # started 10 s into a sweep with a 5 s timeout
    summary = late.run()
    assert summary.timed_out and summary.ran_here == 0 and summary.finished == 0, lines
    on_time = Worker(spec, 1, storage, timeout=600, out=lines.append, bar=False)
    summary = on_time.run()
    assert not summary.timed_out and summary.ran_here == 1 and summary.finished == 1, lines


def test_a_stop_names_each_checkpointed_trial():
    from vqlog.commands.sweep import checkpointed_text
    from vqlog.study.worker import SweepSummary

    one = SweepSummary("s", 1, 3, stopped="SIGTERM", stopped_at=120, stopped_iterations=[120])
    assert checkpointed_text(one) == ("the running trial was checkpointed at iteration 120 and "
                                      "marked FAIL; ")
    three = dataclasses.replace(one, stopped_iterations=[120, 340, 350])
    assert checkpointed_text(three) == ("the 3 running trials were checkpointed at iterations "
                                        "120, 340 and 350 and marked FAIL; ")
    assert checkpointed_text(dataclasses.replace(one, stopped_at=None, stopped_iterations=[])) == ""


@contextlib.contextmanager
def cgroup_limit(controller: str, settings: dict[str, str]):
    """A command prefix that runs a process in a new child cgroup of this machine's cgroup v1
    `controller` hierarchy, with `settings` written to its files, and that sees the group as the
    hierarchy's root, as a process in a container sees its own: the group bind-mounted over the
    root in a mount namespace of the process's own. Skips where that cannot be made: not root,
    no such cgroup v1 hierarchy, no unshare."""
    import shutil

    root = Path("/sys/fs/cgroup") / controller
    first = root / next(iter(settings))
    if os.geteuid() != 0 or not first.is_file() or not shutil.which("unshare"):
        pytest.skip(f"needs root, a cgroup v1 {controller} hierarchy and unshare")
    group = root / f"vqlog-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup: {exc}")
    try:
        for name, value in settings.items():
            (group / name).write_text(value)
        script = f'echo $$ > {group}/cgroup.procs && mount --bind {group} {root} && exec "$@"'
        yield ["unshare", "--mount", "sh", "-c", script, "sh"]
    finally:
        deadline = time.monotonic() + 30
        while True:  # empty once its processes have exited
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def cpu_quota(cpus: float):
    """`cgroup_limit` with a CFS CPU quota of `cpus` (`docker run --cpus`, a Kubernetes CPU
    limit)."""
    return cgroup_limit("cpu", {"cpu.cfs_period_us": "100000",
                                "cpu.cfs_quota_us": str(round(cpus * 100000))})


def test_workers_auto_keeps_to_a_containers_cpu_quota(tmp_path):
    """On this host `auto` means one worker per core; in a container granted one CPU it means
    one worker with one torch thread, not one per core of the machine under it."""
    from _servers import BIN
    from vqlog.study.hosts import cores

    if cores() < 2:
        pytest.skip("needs 2 or more cores to tell the quota from the host")
    spec = write_spec(tmp_path, "quota", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    with cpu_quota(1.0) as prefix:
        done = subprocess.run([*prefix, str(BIN / "vqlog-sweep"), "--trials", "2", "--config",
                               str(spec), "--workers", "auto"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stdout.splitlines()[0].endswith(" workers")  # one worker: no pool
    runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db", "quota")
    assert [r.data.tags["vqlog.torch_threads"] for r in runs] == ["1", "1"]
    assert len({r.data.tags["vqlog.worker"] for r in runs}) == 1


def test_workers_auto_keeps_to_a_containers_memory_limit(tmp_path):
    """In a container with a 3 GiB memory limit, `auto` starts as many workers as 2 GiB each
    fit (one), not one per core, and says why in the sweep's first line."""
    from _servers import BIN
    from vqlog.study.hosts import WORKER_MEMORY, cores, memory_available

    if cores() < 2 or memory_available() < 2 * WORKER_MEMORY:
        pytest.skip("needs 2 or more cores and memory for two workers to tell the limit apart")
    spec = write_spec(tmp_path, "memlimit", budget={"iteration": 20, "eval_every": 10},
                      pruner="none")
    with cgroup_limit("memory", {"memory.limit_in_bytes": str(3 * 1024**3)}) as prefix:
        done = subprocess.run([*prefix, str(BIN / "vqlog-sweep"), "--trials", "2", "--config",
                               str(spec), "--workers", "auto"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert "(auto: 1 worker for " in first, first
    assert f" GiB of free memory at 2 GiB each, fewer than the {cores()} cores)" in first, first
    runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db", "memlimit")
    assert len(runs) == 2 and len({r.data.tags["vqlog.worker"] for r in runs}) == 1


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers must be"),
    (["--workers", "many"], "--workers must be"),
    (["--gpus", "a,b"], "--gpus must be"),
    (["--workers", "99999999999999999999"], "more than the 1024 worker processes"),
    pytest.param(["--gpus", "0"], "--gpus 0 was given, but the sweep runs on the CPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    pytest.param(["--workers", "2", "--device", "cuda"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_workers_or_gpus_are_one_error_line(cli, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli.sweep("--trials", "2", "--config", "smoke", *flags)
    assert code == 2 and err.startswith("Error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing created

def test_device_cuda_k_keeps_every_worker_on_gpu_k():
    # The Python API takes device="cuda:1": its workers all go to GPU 1, and --workers auto counts
    # that one GPU, not every visible one. --gpus, where given, decides.
    from vqlog.api import placed_gpus

    assert placed_gpus("cuda:1", None) == [1]
    assert placed_gpus("cuda:1", [0, 2]) == [0, 2]
    assert placed_gpus("cuda", None) is None and placed_gpus("cuda", [3]) == [3]
    assert placed_gpus("cpu", None) is None and placed_gpus("auto", None) is None


@pytest.mark.slow
def test_workers_share_the_sqlite_default_and_stop_at_exactly_the_target(tmp_path):
    spec = write_spec(tmp_path, "pool", budget={"iteration": 40, "eval_every": 20}, pruner="none")
    worker = Worker(["--trials", "6", "--config", str(spec), "--workers", "2"], tmp_path)
    assert worker.wait(300) == 0, worker.output()
    storage, uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    trials = study_trials(storage, "pool")
    assert len(finished(trials)) == len(trials) == 6 and [t.number for t in trials] == list(range(6))
    runs = mlflow_runs(uri, "pool")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == list(range(6))
    pids = {r.data.tags["vqlog.worker"].split(":")[1] for r in runs}
    assert len(pids) == 2 and str(worker.proc.pid) not in pids  # two worker processes ran them
    assert all(r.data.tags["vqlog.worker"].endswith(":cpu") for r in runs)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {r.data.tags["vqlog.torch_threads"] for r in runs} == {str(threads)}
    lines = [line for line in worker.stdout.splitlines() if line.startswith("Seq")]
    assert sorted(line.split()[0] for line in lines) == [f"Seq{i}" for i in range(1, 7)]
    assert "pool: 6/6 trials finished (6 ran here by 2 workers, 0 failed)" in worker.stdout
    table = (tmp_path / "results" / "pool.md").read_text()
    assert sum(line.startswith("| Seq") for line in table.splitlines()) == 6
    again = Worker(["--trials", "6", "--config", str(spec), "--workers", "2"], tmp_path)
    assert again.wait(300) == 0, again.output()  # at its target: no worker process starts
    assert "pool: 6/6 trials finished (0 ran here, 0 failed)" in again.stdout, again.output()
    assert again.stdout.splitlines()[1] == ("the study has 6 finished trials already (target "
                                            "6): none to run"), again.output()
    assert len(study_trials(storage, "pool")) == 6 and len(mlflow_runs(uri, "pool")) == 6


@pytest.mark.slow
def test_more_workers_than_trials_say_nothing_of_waiting(tmp_path):
    """The worker without a trial said "waiting: 1 trial still RUNNING covers the target (a
    killed worker's trial is failed and retried ...)" in a healthy sweep: that line is for a
    trial a killed sweep left running (tests/test_resume.py checks that it still comes)."""
    spec = write_spec(tmp_path, "spare", budget={"iteration": 200, "eval_every": 50},
                      pruner="none")
    sweep = Worker(["--trials", "1", "--config", str(spec), "--workers", "2"], tmp_path)
    try:
        assert sweep.wait(300) == 0, sweep.output()
    finally:
        sweep.kill()
    assert "waiting" not in sweep.output() and "1/1 trials finished" in sweep.stdout, sweep.output()


def test_the_progress_bar_of_workers_on_a_terminal_shows_the_best_trial(tmp_path):
    """With --workers the parent's bar (on a terminal) never showed the best trial so far, which
    the one worker's bar does."""
    import fcntl
    import pty
    import struct
    import termios

    spec = write_spec(tmp_path, "barred", budget={"iteration": 100, "eval_every": 50},
                      pruner="none")
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm's width
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # CI turns the bar off
    proc = subprocess.Popen([str(SWEEP_BIN), "--trials", "2", "--workers", "2", "--config",
                             str(spec)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=secondary)
    os.close(secondary)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal's other end closed: the sweep has ended
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(300) == 0
    finally:
        proc.kill()
        os.close(primary)
    text = shown.decode(errors="replace")
    best = r"\d[0-9.e+-]* \(Seq\d\)"  # `.4g`: 0.4924, or 0.38
    assert "trials: 100%" in text and re.search(rf"2/2 \[.*{best}\]", text), text


def test_sigterm_to_the_workers_alone_is_a_stop_of_the_sweep(tmp_path):
    """Slurm's scancel signals every process of the job, and a person may `kill` the workers:
    the workers stopped cleanly, yet the sweep ended with exit 0 and no Stopped line, the study
    short of its target."""
    args, storage, uri, first = two_worker_sweep(tmp_path, "workers-stopped")
    try:
        two_running(uri, "workers-stopped", first)
        for pid in worker_processes(first.proc.pid):
            os.kill(pid, signal.SIGTERM)
        rc = first.wait(120)
    finally:
        first.kill()
    assert rc == 143, first.output()
    assert "Stopped (SIGTERM): the 2 running trials were checkpointed" in first.stdout, first.output()
    trials = study_trials(storage, "workers-stopped")
    assert states(trials).get("WAITING") == 2 and len(finished(trials)) < 3


def test_sigint_to_the_sweep_alone_is_a_ctrl_c_in_every_worker(tmp_path):
    """`kill -INT` of the sweep's own process, not its process group as a terminal's Ctrl-C:
    the workers get only the SIGTERM the sweep forwards. Their trials said "stopped (SIGTERM)"
    while the sweep said "Stopped (SIGINT)"; the sweep's reason is theirs now."""
    args, storage, uri, first = two_worker_sweep(tmp_path, "parent-sigint")
    try:
        two_running(uri, "parent-sigint", first)
        first.signal(signal.SIGINT)
        rc = first.wait(120)
    finally:
        first.kill()
    assert rc == 130, first.output()
    assert "Stopped (SIGINT): the 2 running trials were checkpointed" in first.stdout, first.output()
    trials = study_trials(storage, "parent-sigint")
    stopped = [t for t in trials if t.state.name == "FAIL"]
    assert len(stopped) == 2 and {t.user_attrs["fail_reason"] for t in stopped} == {
        "stopped (SIGINT); resumes on rerun"}, first.output()


def test_a_worker_stopped_by_the_sweep_says_the_sweeps_reason():
    """The SIGTERM the sweep forwards stops a worker for the sweep's reason. When the sweep
    stopped because another worker failed, the cut-off trials said "stopped (SIGTERM)", though
    nobody had sent one."""
    from vqlog.study.child import WORKER_ERROR, stop_reason

    assert stop_reason("SIGTERM", WORKER_ERROR) == "another worker's error"
    assert stop_reason("SIGTERM", signal.SIGINT) == "SIGINT"  # `kill -INT` of the sweep alone
    assert stop_reason("SIGTERM", 0) == "SIGTERM"  # to the worker itself, before any stop
    assert stop_reason("SIGINT", WORKER_ERROR) == "SIGINT"  # a terminal's Ctrl-C is its own


def test_sigterm_stops_every_worker_cleanly_and_the_rerun_finishes(tmp_path):
    # Long enough that both first trials are still training when the signal comes, a second
    # after both runs show RUNNING (a few iterations in); the rerun trains what is left of them
    # and the third trial, most of this test's time (3000 iterations took 159 s of CI's 23 min).
    args, storage, uri, first = two_worker_sweep(tmp_path, "pooled")
    try:
        running = two_running(uri, "pooled", first)
        time.sleep(1.0)
        first.preempt()
    finally:
        first.kill()
    for run in running:  # no worker process is left behind
        pid = int(run.data.tags["vqlog.worker"].split(":")[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    trials = study_trials(storage, "pooled")
    stopped = [t for t in trials if t.state.name == "FAIL"]
    assert len(stopped) == 2 and {t.user_attrs["fail_reason"] for t in stopped} == {
        "stopped (SIGTERM); resumes on rerun"}
    assert states(trials).get("WAITING") == 2 and "RUNNING" not in states(trials)
    assert first.stdout.count("Stopped (SIGTERM)") == 1
    # both counted as stopped, each by its worker; not as failed
    assert "(2 ran here by 2 workers, 0 failed, 2 stopped and queued again)" in first.stdout, \
        first.output()
    rerun = Worker(args, tmp_path, "rerun")
    assert rerun.wait(600) == 0, rerun.output()
    trials = study_trials(storage, "pooled")
    assert len(finished(trials)) == 3 and "RUNNING" not in states(trials)
    resumed = [r for r in mlflow_runs(uri, "pooled") if "vqlog.resumed_at" in r.data.tags]
    assert len(resumed) == 2  # both stopped trials continued from their checkpoints


def test_workers_that_need_more_open_files_than_allowed_raise_the_limit_or_are_refused(tmp_path):
    """Each worker holds a pipe and a process sentinel in the sweep's process: at the common
    limit of 1024 open files, `--workers 500` failed with "Too many open files" as the workers
    started. The soft limit is raised toward the hard one; past the hard one it is an Error."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def limited(soft: int, top: int):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, top))

    refused = subprocess.run([str(SWEEP_BIN), "--config", "smoke", "--trials", "1", "--workers",
                              "12"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             preexec_fn=limited(40, 40))
    assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
    assert refused.stderr == ("Error: --workers 12 needs about 100 open files in the sweep's "
                              "process, more than this shell allows (ulimit -n: 40, at most 40); "
                              "use fewer workers, or raise the limit\n")
    assert list(tmp_path.iterdir()) == []
    raised = subprocess.run(
        [sys.executable, "-c", "import resource; from vqlog.study.hosts import worker_count; "
         "worker_count('12', 'cpu', None); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
        capture_output=True, text=True, timeout=120, preexec_fn=limited(40, hard))
    assert raised.returncode == 0 and int(raised.stdout) >= 100, raised.stderr
