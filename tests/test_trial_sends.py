"""A trial's sends while it trains (metric batches, checkpoint uploads) go from a thread of its
run's own: the training loop does not wait on the tracking store, nothing is lost or reordered,
the run ends only after them, and a send's error still reaches the trial.

Real components: an `mlflow server` process that the test freezes with SIGSTOP (it accepts
connections and answers nothing, as a server stuck behind a slow disk or network would), and an
embedded SQLite store.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from _sweep_helpers import race

from vqlog.checkpoint import read_state
from vqlog.data import prepare
from vqlog.tracking.client import open_client
from vqlog.tracking.trial_run import TrialRun
from vqlog.train import fit

pytestmark = pytest.mark.slow

ITERATION, EVERY = 30, 10


def new_run(uri: str, cfg) -> TrialRun:
    client = open_client(uri)
    experiment = client.create_experiment(f"sends-{time.monotonic_ns()}")
    return TrialRun(client, client.create_run(experiment).info.run_id, cfg)


def test_a_frozen_server_does_not_hold_up_training_and_loses_nothing(tmp_path, tiny,
                                                                      mlflow_server):
    cfg = tiny(iteration=ITERATION, eval_every=EVERY)
    data = prepare("synthetic", cfg)
    with mlflow_server(tmp_path / "server") as server:
        run = new_run(server.url, cfg)
        os.killpg(server.proc.pid, signal.SIGSTOP)
        try:
            results = []
            training = threading.Thread(target=lambda: results.append(fit(
                cfg, data, on_eval=run.log_eval, checkpoint_every=EVERY,
                on_checkpoint=run.log_checkpoint)))
            training.start()
            # In line, the first evaluation's request would wait for the frozen server until
            # MLflow's request timeout (120 s); from the run's thread, training goes on.
            training.join(timeout=90)
            assert not training.is_alive() and results, "training waited for the frozen server"
        finally:
            os.killpg(server.proc.pid, signal.SIGCONT)
        run.finish("COMPLETE", results[0].summary())

        client = MlflowClient(tracking_uri=server.url)
        logged = client.get_run(run.run_id)
        steps = {key: [m.step for m in client.get_metric_history(run.run_id, key)]
                 for key in ("val/mse", "train/loss")}
        folder = tmp_path / "download"
        folder.mkdir()
        state = read_state(client.download_artifacts(run.run_id, "checkpoint/latest.pt",
                                                     str(folder)))
    assert logged.info.status == "FINISHED"
    assert steps["val/mse"] == list(range(EVERY, ITERATION + 1, EVERY))  # each once, in order
    assert steps["train/loss"] == [p.step for p in results[0].train_points]
    assert "final_val_mse" in logged.data.metrics
    # checkpoints at 10 and 20 (none at the last step): the run keeps the latest
    assert state["step"] == ITERATION - EVERY


def test_an_error_of_a_background_send_reaches_the_training_loop(tmp_path, tiny, mlflow_store):
    cfg = tiny(iteration=ITERATION, eval_every=EVERY)
    run = new_run(mlflow_store(), cfg)
    records = []
    fit(cfg, prepare("synthetic", cfg), on_eval=records.append)
    run.client.delete_run(run.run_id)  # MLflow refuses metrics for a deleted run: not transient
    run.log_eval(records[0])  # its send fails on the run's thread ...
    deadline = time.monotonic() + 60
    with pytest.raises(MlflowException, match="active"):
        while time.monotonic() < deadline:  # ... and a later call of the trial raises it
            run.log_eval(records[1])
            time.sleep(0.05)


def test_a_trial_given_up_on_leaves_no_thread_or_checkpoint_file(tmp_path, tiny, monkeypatch):
    """The store unreachable past the limit: the trial ends without `finish` (its run stays
    RUNNING for the rerun); `abandon` drops the queued sends, and neither the sender thread nor
    a checkpoint file outlives them."""
    import tempfile

    from _servers import free_port
    from vqlog.errors import TrackingUnavailable
    from vqlog.tracking.client import RetryingClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, as vqlog sets
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the checkpoint files go
    before = {t for t in threading.enumerate() if t.name.startswith("vqlog-send")}
    nowhere = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens
    cfg = tiny(iteration=ITERATION, eval_every=EVERY)
    run = TrialRun(RetryingClient(nowhere, "nowhere", limit=0), "0" * 32, cfg)
    records, states = [], []
    fit(cfg, prepare("synthetic", cfg), on_eval=records.append, checkpoint_every=EVERY,
        on_checkpoint=states.append)
    deadline = time.monotonic() + 60
    with pytest.raises(TrackingUnavailable):
        while time.monotonic() < deadline:
            run.log_checkpoint(states[-1])
            run.log_eval(records[0])
            time.sleep(0.05)
    run.abandon()
    while time.monotonic() < deadline and any(
            t.name.startswith("vqlog-send") and t not in before for t in threading.enumerate()):
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("vqlog-send") and t not in before]
    assert not list(tmp_path.glob("vqlog-ckpt-*"))


ROUNDS, RACERS = 12, 4


def _log_datasets(uri: str, run_id: str, barrier, errors) -> None:
    """A child process: one trial run logging a new dataset each round, all children at once."""
    from types import SimpleNamespace

    import numpy as np

    run = TrialRun(open_client(uri), run_id, cfg=None)
    for i in range(ROUNDS):
        data = SimpleNamespace(train=np.full((4, 8), i, dtype=np.float32))  # what lineage reads
        barrier.wait(timeout=60)
        try:
            run.log_dataset(data, f"/data/round-{i}.npy")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.put(f"round {i}: {type(exc).__name__}: {exc}"[:300])


@pytest.mark.parametrize("store", ["sqlite", "postgresql", "server on postgresql"])
def test_workers_starting_trials_on_the_same_data_at_once_all_log_it(
        store, tmp_path, mlflow_store, pg_database, mlflow_server):
    """MLflow looks a dataset up before it inserts it: trials starting together on the same data
    race to insert it, and one got a unique-key error (a FAIL at the start of `--workers auto`)."""
    import contextlib

    from vqlog.tracking.client import store_uri

    with contextlib.ExitStack() as stack:
        if store == "sqlite":
            uri = store_uri(mlflow_store())
        elif store == "postgresql":
            uri = store_uri(pg_database())
        else:
            server = stack.enter_context(mlflow_server(
                tmp_path / "server", backend_uri=store_uri(pg_database()),
                extra=["--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"]))
            uri = server.url
        race_to_log_datasets(uri)


def race_to_log_datasets(uri: str) -> None:
    """RACERS processes, each with a run of its own, log the same new dataset each round at once;
    none may fail, and every run must link every dataset."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("race")
    runs = [client.create_run(experiment).info.run_id for _ in range(RACERS)]
    failures = race(_log_datasets, [(uri, run_id) for run_id in runs])
    assert not failures, failures
    for run_id in runs:  # every run links all its datasets, each stored once per experiment
        names = sorted(d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs)
        assert names == sorted(f"round-{i}.npy" for i in range(ROUNDS))
