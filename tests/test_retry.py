"""vqlog.retry against real MLflow clients: a port nothing listens on, a real SQLite store, and
a real server that comes up while a call is retrying. The end-to-end outage tests (a server
stopped under a running sweep) are in tests/test_tracking_outage.py."""

import threading
import time

import pytest
from _servers import free_port, mlflow_server
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vqlog.errors import TrackingUnavailable
from vqlog.tracking.client import RetryingClient, is_transient, quiet_http_retries


@pytest.fixture(autouse=True)
def one_http_attempt(monkeypatch):
    # What the command line sets: MLflow's own retries would take minutes here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def error_of(call) -> Exception:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_a_refused_connection_is_transient():
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert is_transient(error_of(client.search_experiments))


def test_an_unknown_run_is_not_transient(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exc = error_of(lambda: client.get_run("0" * 32))
    assert isinstance(exc, MlflowException) and not is_transient(exc)


def test_a_non_transient_error_is_raised_at_once_without_retrying(tmp_path):
    sleeps = []
    client = RetryingClient(MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), "store",
                            limit=60, sleep=sleeps.append)
    with pytest.raises(MlflowException):
        client.get_run("0" * 32)
    assert sleeps == [] and client.down_since is None and client.outages == 0


def test_an_outage_past_the_limit_raises_naming_the_store_and_the_limit():
    url = f"http://127.0.0.1:{free_port()}"
    client = RetryingClient(MlflowClient(tracking_uri=url), url, limit=1.0)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=rf"MLflow tracking at {url} has been unreachable "
                                                  r"for \d+ s, longer than the limit of 1 s"):
        client.search_experiments()
    assert 1.0 <= time.monotonic() - start < 10
    # The outage goes on: the next call fails at once instead of waiting the limit again.
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable):
        client.search_experiments()
    assert time.monotonic() - start < 1.0


def test_an_outage_message_masks_the_password_that_mlflows_error_quotes():
    """MLflow's requests error quotes the URL it called, credentials included; the outage's
    message goes on to the FAIL line, Optuna's fail_reason and the run's vqlog.fail_reason."""
    from vqlog.study.trial import describe

    url = f"http://alice:Zq9SecretPW@127.0.0.1:{free_port()}"
    client = RetryingClient(MlflowClient(tracking_uri=url), "masked", limit=0.0)
    with pytest.raises(TrackingUnavailable) as info:
        client.search_experiments()
    assert "alice:***@127.0.0.1" in str(info.value) and "Zq9SecretPW" not in str(info.value)
    raw = error_of(MlflowClient(tracking_uri=url).search_experiments)
    assert "Zq9SecretPW" in str(raw)  # what MLflow says, and what a reason used to quote
    assert "Zq9SecretPW" not in describe(raw) and "alice:***@" in describe(raw)


def test_try_call_is_one_attempt_and_backs_off_only_in_call():
    url = f"http://127.0.0.1:{free_port()}"
    sleeps = []
    client = RetryingClient(MlflowClient(tracking_uri=url), url, limit=3600, sleep=sleeps.append)
    assert client.try_call("search_experiments") == (False, None)
    assert client.outages == 1 and client.down_since is not None and sleeps == []


def test_a_call_waits_for_a_server_that_comes_up(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = RetryingClient(MlflowClient(tracking_uri=url), url, limit=180)
    started, done = threading.Event(), threading.Event()

    def serve():
        with mlflow_server(tmp_path / "server", port=port):
            started.set()
            done.wait(60)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        experiments = client.search_experiments()  # refused until the server answers
        assert started.is_set()
        assert [e.name for e in experiments] == ["Default"]
        assert client.outages == 1 and client.down_since is None  # the outage is over
    finally:
        done.set()
        thread.join(30)


def test_the_command_line_turns_mlflows_own_retries_off_unless_the_user_chose(monkeypatch):
    import os

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)  # restored after the test
    quiet_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # the user's own choice is kept
    quiet_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


class Switchable:
    """A client whose `call` fails with a refused connection while `down` is set; `slow` waits
    for `landed` first, as a request sent before the server came back and failing after."""

    def __init__(self):
        self.down = True
        self.landed = threading.Event()
        self.sent = threading.Event()  # `slow` is under way

    def call(self):
        if self.down:
            raise ConnectionRefusedError("Connection refused")
        return "ok"

    def slow(self):
        self.sent.set()
        self.landed.wait(10)
        raise ConnectionRefusedError("Connection refused")


def test_a_request_under_way_across_the_end_of_an_outage_is_not_a_second_outage(monkeypatch):
    import vqlog.tracking.client as tracking_client

    monkeypatch.setattr(tracking_client, "SETTLE", 0.0)  # the in-flight rule alone
    inner = Switchable()
    client = RetryingClient(inner, "switchable", limit=3600)
    assert client.try_call("call") == (False, None) and client.outages == 1
    results = []
    thread = threading.Thread(target=lambda: results.append(client.try_call("slow")))
    thread.start()  # another thread's request, sent while the server is down
    assert inner.sent.wait(10)
    inner.down = False
    assert client.try_call("call") == (True, "ok") and client.down_since is None
    inner.landed.set()  # ... fails once the server is back
    thread.join(10)
    assert results == [(False, None)]
    assert client.outages == 1 and client.down_since is None
    inner.down = True  # a failure sent after the recovery is a new outage
    assert client.try_call("call") == (False, None) and client.outages == 2


def test_a_failure_just_after_the_server_came_back_is_the_same_outage(monkeypatch):
    import vqlog.tracking.client as tracking_client

    inner = Switchable()
    client = RetryingClient(inner, "switchable", limit=3600)
    assert client.try_call("call") == (False, None) and client.outages == 1
    inner.down = False
    assert client.try_call("call") == (True, "ok")
    inner.down = True  # a restarting server that answers once, then not for a moment
    assert client.try_call("call") == (False, None) and client.down_since is not None
    assert client.outages == 1
    inner.down = False
    assert client.try_call("call") == (True, "ok")
    monkeypatch.setattr(tracking_client, "SETTLE", 0.0)  # settled: the next failure is new
    inner.down = True
    assert client.try_call("call") == (False, None) and client.outages == 2


def test_a_trial_runs_creation_whose_reply_was_lost_is_not_sent_again(tmp_path):
    """A run's creation that the store did but whose reply was lost (a timeout; a proxy's 502)
    was sent again: the trial had two runs, the first an orphan left RUNNING, with no metrics.
    Before sending it again, the tracker looks for the trial's run, and takes the one it finds."""
    import dataclasses

    import optuna
    import requests

    from vqlog.study.spec import load_sweep
    from vqlog.tracking.runs import Tracker

    class LosesItsFirstReply(MlflowClient):  # a real store: each run's first reply is lost
        lost: list[str] = []

        def create_run(self, *args, **kwargs):
            run = super().create_run(*args, **kwargs)
            if kwargs["run_name"] not in self.lost:
                self.lost.append(kwargs["run_name"])
                raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=30)")
            return run

    study = optuna.create_study(study_name="lost")
    spec = dataclasses.replace(load_sweep("smoke"), name="lost")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", table_dir=tmp_path / "results")
    sleeps = []
    store = LosesItsFirstReply(tracking_uri=tracker.uri)
    tracker._client = RetryingClient(store, "test store", limit=60, sleep=sleeps.append)
    tracker.start_study(study, spec)
    trial = study.ask()
    run = tracker.start_trial(trial.number, spec.base_config())
    assert store.lost == ["lost", "Seq1"] and sleeps == [0.5, 0.5]  # each looked for once
    runs = MlflowClient(tracking_uri=tracker.uri).search_runs([tracker.experiment_id])
    assert sorted((r.data.tags["vqlog.role"], r.info.run_id) for r in runs) == [
        ("study", tracker.parent_id), ("trial", run.run_id)]
    assert runs[-1].data.params["objective"]  # the study run found is the one that goes on
    assert runs[0].data.params["lr"]  # and so is the trial run found
    run.finish("COMPLETE", {"best_val_mse": 0.08, "final_val_mse": 0.09, "iterations_run": 10.0})
    assert MlflowClient(tracking_uri=tracker.uri).get_run(run.run_id).info.status == "FINISHED"
