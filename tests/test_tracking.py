"""MLflow tracking end to end, against a real `mlflow server` process (SQLite backend in a temp dir).

One module-scoped server and one smoke sweep (4 trials) serve most tests; each other scenario uses
its own study name in the same store. Nothing is mocked: the sweep trains real models, Optuna
uses a real SQLite storage, and every check reads back through `MlflowClient` over REST.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from _servers import free_port, mlflow_server
from vqlog.cli import sweep_main
from vqlog.config import Config
from vqlog.oscillation import MIN_POINTS
from vqlog.study.spec import load_sweep, resolve_spec_path
from vqlog.tracking.client import check_tracking_uri
from vqlog.tracking.runs import Tracker

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # the MLflow layout contract
TRAIN_KEYS = ("train/loss", "train/mse", "train/commitment")
VAL_KEYS = ("val/mse", "val/perplexity", "val/usage")
SUMMARY_KEYS = ("best_val_mse", "final_val_mse", "max_val_perplexity", "loss_oscillation")


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def smoke(server, tmp_path_factory):
    """`vqlog-sweep --config smoke --trials 4` in a temp folder, tracked on the server."""
    folder = tmp_path_factory.mktemp("smoke")
    storage = f"sqlite:///{folder}/optuna.db"
    batches_before = server.requests("POST", "/runs/log-batch")
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(folder)
        code = sweep_main(["--config", "smoke", "--trials", "4", "--storage", storage,
                           "--tracking-uri", server.url])
    assert code == 0, out.getvalue() + err.getvalue()
    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name("smoke")
    return SimpleNamespace(
        folder=folder, client=client, experiment=exp, output=out.getvalue(),
        seconds=time.perf_counter() - started,
        study=optuna.load_study(study_name="smoke", storage=storage),
        spec=load_sweep("smoke"),
        runs=client.search_runs([exp.experiment_id], max_results=1000),
        log_batches=server.requests("POST", "/runs/log-batch") - batches_before,
    )


def trial_runs(runs) -> dict[int, list]:
    by_number = defaultdict(list)
    for run in runs:
        if run.data.tags.get("vqlog.role") == "trial":
            by_number[int(run.data.tags["optuna.trial_number"])].append(run)
    return by_number


def finished_runs(runs) -> dict[int, object]:
    """Trial runs that trained to the end or were pruned: those have curves, summary, plots."""
    return {n: rs[0] for n, rs in trial_runs(runs).items()
            if rs[0].data.tags["optuna.state"] in ("COMPLETE", "PRUNED")}


def expected_steps(last: int, every: int, iteration: int) -> list[int]:
    """Steps that `fit` logs at: every `every` iterations and at the configured last one."""
    return [s for s in range(1, last + 1) if s % every == 0 or s == iteration]


# ------------------------------------------------------------------------ 1. the smoke sweep


def test_one_experiment_and_a_finished_parent_run_with_table_and_plots(smoke):
    client = smoke.client
    assert [e.name for e in client.search_experiments() if e.name == "smoke"] == ["smoke"]
    parents = [r for r in smoke.runs if r.data.tags.get("vqlog.role") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study"] == "smoke"
    assert parent.data.params["budget.iteration"] == "20"

    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"experiment_table.md", "optuna"} <= top
    plots = [a.path for a in client.list_artifacts(parent.info.run_id, "optuna")]
    assert "optuna/optimization_history.png" in plots
    assert plots and all(p.endswith(".png") for p in plots)

    artifact = Path(client.download_artifacts(parent.info.run_id, "experiment_table.md",
                                              str(smoke.folder))).read_text()
    results = (smoke.folder / "results" / "smoke.md").read_text()
    assert artifact == results
    assert parent.data.tags["mlflow.note.content"] == results
    assert results.startswith("# smoke\n")
    assert parent.data.tags["vqlog.lang"] == "en"  # the sweep's --lang, which vqlog table keeps


def test_each_trial_has_exactly_one_child_run_with_its_state_name_and_params(smoke):
    parent_id = next(r.info.run_id for r in smoke.runs if r.data.tags.get("vqlog.role") == "study")
    by_number = trial_runs(smoke.runs)
    trials = smoke.study.get_trials()
    assert len(trials) >= 4 and sorted(by_number) == [t.number for t in trials]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    for t in trials:
        (run,) = by_number[t.number]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["optuna.study"] == "smoke"
        assert tags["optuna.trial_number"] == str(t.number)
        assert tags["optuna.state"] == t.state.name
        assert run.info.run_name == f"Seq{t.number + 1}"
        assert run.info.status == STATUS[t.state.name]
        # Every Config value under the log's name: the trial's params over the spec's fixed values.
        expected = Config.from_mapping(t.params, base=smoke.spec.base_config()).to_params()
        assert run.data.params == {k: str(v) for k, v in expected.items()}
        assert {k: run.data.params[k] for k in t.params} == {k: str(v) for k, v in t.params.items()}
        assert run.data.params["d_model"] == "8" and run.data.params["En-De"] == "s4d-all"


def test_full_metric_histories_and_summary_metrics(smoke):
    client = smoke.client
    for number, run in finished_runs(smoke.runs).items():
        p, m = run.data.params, run.data.metrics
        ran = int(m["iterations_run"])
        iteration = int(p["iteration"])
        train_steps = expected_steps(ran, int(p["log_every"]), iteration)
        val_steps = expected_steps(ran, int(p["eval_every"]), iteration)
        assert train_steps and val_steps
        # loss_oscillation is NaN, so not logged, for a curve too short to judge (the smoke
        # spec's 20 iterations at log_every 5 give 4 points).
        summary = set(SUMMARY_KEYS) - ({"loss_oscillation"} if len(train_steps) < MIN_POINTS else set())
        assert summary <= set(m), f"Seq{number + 1} lacks summary metrics"
        for key in TRAIN_KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(h.step for h in history) == train_steps, key
        for key in VAL_KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(h.step for h in history) == val_steps, key
        val = [h.value for h in sorted(client.get_metric_history(run.info.run_id, "val/mse"),
                                       key=lambda h: h.step)]
        assert m["final_val_mse"] == pytest.approx(val[-1])
        assert m["best_val_mse"] == pytest.approx(min(val))
        assert m["val/mse"] == pytest.approx(val[-1])  # the latest value is the last step's


def test_every_trial_logs_curves_and_reconstruction(smoke):
    for number, run in finished_runs(smoke.runs).items():
        paths = {a.path for a in smoke.client.list_artifacts(run.info.run_id)}
        assert {"curves.png", "reconstruction.png"} <= paths, f"Seq{number + 1}: {paths}"
    run = next(iter(finished_runs(smoke.runs).values()))
    png = Path(smoke.client.download_artifacts(run.info.run_id, "curves.png", str(smoke.folder)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The table's number format is pinned by exact strings in test_table.py; here it only renders
# MLflow's values for comparison with the table's cells.
from vqlog.tracking.cells import ppl as _ppl, sig as _sig  # noqa: E402 - beside its use


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """Rows of the first markdown table, keyed by run name (without the best-run star)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split(" | "))))
        rows[cells["run"].replace("★", "").strip()] = cells
    return rows


def test_table_numbers_equal_mlflow_metrics(smoke):
    text = (smoke.folder / "results" / "smoke.md").read_text()
    rows = table_rows(text)
    assert set(rows) == {f"Seq{n + 1}" for n in trial_runs(smoke.runs)}
    runs = finished_runs(smoke.runs)
    for number, run in runs.items():
        row, m, p = rows[f"Seq{number + 1}"], run.data.metrics, run.data.params
        assert f"{_sig(m['final_val_mse'])} (best {_sig(m['best_val_mse'])})" in row["loss"]
        assert row["iteration"] == str(int(m["iterations_run"]))
        assert row["batch"] == p["batch"]
        assert row["embedding_dim"] == p["embedding_dim"]
        assert row["embedding_num"] == p["embedding_num"]
        assert float(row["lr"]) == pytest.approx(float(p["lr"]), rel=0.05)  # 2 significant digits
        ppl = (f"max {_ppl(m['max_val_perplexity'])} @ {round(m['max_val_perplexity_step'])}, "
               f"final {_ppl(m['final_val_perplexity'])}")
        assert row["perplexity"] == ppl
    best = min((r for r in runs.values() if r.data.tags["optuna.state"] == "COMPLETE"),
               key=lambda r: r.data.metrics["best_val_mse"])
    assert f"| {best.info.run_name} ★ |" in text


# ------------------------------------------------------------------------------ 2. batching


def test_one_log_batch_request_per_evaluation(smoke):
    """Counted on the server: uvicorn's access log has one `POST .../runs/log-batch` line per
    request. Per-value logging would need one request per metric value (12 per evaluation here)."""
    runs = trial_runs(smoke.runs)
    evals = values = 0
    expected = 1  # the parent run's params
    for (run,) in runs.values():
        n_evals = len(smoke.client.get_metric_history(run.info.run_id, "val/mse"))
        evals += n_evals
        values += sum(len(smoke.client.get_metric_history(run.info.run_id, k))
                      for k in run.data.metrics if "/" in k)
        # params, one batch per evaluation, and the last: the summary metrics (none for a
        # failed trial) with the Optuna state
        expected += 1 + n_evals + 1
    assert smoke.log_batches == expected
    assert values >= 10 * evals  # so the count above could not come from per-value requests


def test_one_evaluations_metrics_share_one_timestamp(smoke):
    """The client-side view of the same fact: each batch is stamped once, so an evaluation's val
    metrics and the train points logged since the previous evaluation share one timestamp."""
    for run in finished_runs(smoke.runs).values():
        stamps = defaultdict(set)  # eval step -> timestamps
        val_steps = sorted(h.step for h in smoke.client.get_metric_history(run.info.run_id, "val/mse"))
        for key in TRAIN_KEYS + VAL_KEYS:
            for h in smoke.client.get_metric_history(run.info.run_id, key):
                eval_step = next(s for s in val_steps if s >= h.step)
                stamps[eval_step].add(h.timestamp)
        assert sorted(stamps) == val_steps
        assert all(len(ts) == 1 for ts in stamps.values()), dict(stamps)


# ------------------------------------------------------- run status for every Optuna state


def test_trial_run_status_follows_optuna_state_and_reconcile(server, tmp_path):
    """Tracker alone (no training): PRUNED -> KILLED, FAIL -> FAILED, COMPLETE -> FINISHED; a run
    left RUNNING by a dead worker gets the state Optuna settled on, a live one stays RUNNING."""
    study = optuna.create_study(study_name="states")  # in memory: Optuna's state is all we need
    spec = dataclasses.replace(load_sweep("smoke"), name="states")
    tracker = Tracker(server.url, table_dir=tmp_path / "results")
    tracker.start_study(study, spec)
    cfg = spec.base_config()
    summary = {"best_val_mse": 0.08, "final_val_mse": 0.09, "loss_oscillation": 0.004,
               "iterations_run": 10.0, "max_val_perplexity": math.nan}
    asked = [study.ask() for _ in range(5)]
    runs = [tracker.start_trial(t.number, cfg) for t in asked]
    runs[0].finish("PRUNED", summary)
    runs[1].finish("FAIL", reason="diverged: loss is nan at iteration 7")
    runs[2].finish("COMPLETE", summary)
    # runs[3]: its worker died; runs[4]: its worker is still training.
    # A user's own RUNNING run in the experiment, with a trial's number: not reconciled.
    client = MlflowClient(tracking_uri=server.url)
    foreign = client.create_run(tracker.experiment_id, tags={"optuna.trial_number": "3"})
    study.tell(asked[0], state=TrialState.PRUNED)
    study.tell(asked[1], state=TrialState.FAIL)
    study.tell(asked[2], 0.09)
    study.tell(asked[3], state=TrialState.FAIL)
    path = tracker.after_trial(study)

    assert client.get_run(foreign.info.run_id).info.status == "RUNNING"
    assert "optuna.state" not in client.get_run(foreign.info.run_id).data.tags
    got = {r.info.run_name: r for r in client.search_runs(
        [tracker.experiment_id], filter_string="tags.`vqlog.role` = 'trial'")}
    status = {name: (r.info.status, r.data.tags["optuna.state"]) for name, r in got.items()}
    assert status == {"Seq1": ("KILLED", "PRUNED"), "Seq2": ("FAILED", "FAIL"),
                      "Seq3": ("FINISHED", "COMPLETE"), "Seq4": ("FAILED", "FAIL"),
                      "Seq5": ("RUNNING", "RUNNING")}
    assert "heartbeat" in got["Seq4"].data.tags["vqlog.fail_reason"]
    assert "max_val_perplexity" not in got["Seq1"].data.metrics  # NaN is not sent
    text = Path(path).read_text()
    assert "pruned @ 10" in text and "failed: diverged @ 7" in text and "Seq5" not in text
    parent = client.get_run(tracker.parent_id)
    assert parent.data.tags["mlflow.note.content"] == text and parent.info.status == "FINISHED"
    runs[4].finish("COMPLETE", summary)  # leave nothing RUNNING behind
    client.set_terminated(foreign.info.run_id)


# ------------------------------------------------------------ 3. a killed worker, reconciled


def _slow_spec(folder: Path) -> Path:
    spec = yaml.safe_load(resolve_spec_path("smoke").read_text())
    spec["name"] = "killed"
    spec["budget"] = {"iteration": 100, "eval_every": 10}  # seconds of training: time to kill it
    path = folder / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_killed_worker_run_is_reconciled_on_rerun(server, tmp_path):
    spec = _slow_spec(tmp_path)
    cmd = [str(BIN / "vqlog-sweep"), "--config", str(spec), "--trials", "1",
           "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", server.url]
    env = {**os.environ, "VQLOG_HEARTBEAT_INTERVAL": "1", "VQLOG_HEARTBEAT_GRACE": "3"}
    client = MlflowClient(tracking_uri=server.url)

    def running_with_a_checkpoint():
        # An evaluation is logged before the checkpoint of the same step is uploaded: kill only
        # once the checkpoint is there, or the retry has nothing to resume from.
        exp = client.get_experiment_by_name("killed")
        if exp is None:
            return None
        for run in client.search_runs([exp.experiment_id],
                                      "tags.`vqlog.role` = 'trial' and attributes.status = 'RUNNING'"):
            saved = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
            if "checkpoint/latest.pt" in saved and client.get_metric_history(run.info.run_id, "val/mse"):
                return run
        return None

    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        victim = _wait(running_with_a_checkpoint, 240, "a RUNNING trial run with a checkpoint", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert client.get_run(victim.info.run_id).info.status == "RUNNING"  # a real orphan

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    exp = client.get_experiment_by_name("killed")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status in ("KILLED", "FAILED")
    assert killed.data.tags["optuna.state"] == "FAIL"
    assert "heartbeat" in killed.data.tags["vqlog.fail_reason"]
    # what it trained before the kill, not the budget (nothing said it before)
    ran = max(m.step for m in client.get_metric_history(victim.info.run_id, "train/loss"))
    assert killed.data.metrics["iterations_run"] == ran > 0
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path}/optuna.db")
    number = int(victim.data.tags["optuna.trial_number"])
    assert study.trials[number].state == TrialState.FAIL
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 1  # the retry of the killed trial
    (retry_run,) = trial_runs(runs)[done[0].number]
    assert retry_run.info.status == STATUS[done[0].state.name]
    assert retry_run.data.tags["vqlog.retry_of"] == str(number)
    # The killed trial and its retry are one row, the retry's (resumed from its checkpoint).
    table = (tmp_path / "results" / "killed.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| Seq")]
    assert len(rows) == 1 and rows[0].startswith(f"| Seq{done[0].number + 1} ★ |"), table
    assert f"resumed @ {retry_run.data.tags['vqlog.resumed_at']}; " in rows[0]


# --------------------------------------------------------------- 4. an unreachable server


@pytest.mark.parametrize("userinfo", ["", "vqlog:s3cret-pw@"])
def test_unreachable_server_is_one_error_line_before_any_file(tmp_path, monkeypatch, capsys, userinfo):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    uri = f"http://{userinfo}127.0.0.1:{port}"
    code = sweep_main(["--config", "smoke", "--trials", "1", "--storage",
                       f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", uri])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    shown = uri.replace("s3cret-pw", "***")
    assert shown in lines[0]
    assert "s3cret" not in out + err
    assert list(tmp_path.iterdir()) == []  # no optuna.db, lock file, mlflow.db or results/


def test_credentials_in_the_uri_reach_a_live_server(server):
    """http://user:password@host works (MLflow's client sends them as Basic auth), so the
    pre-flight check must not turn `user:password@host` into a host name."""
    uri = server.url.replace("http://", "http://vqlog:s3cret-pw@")
    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("Default") is not None


def test_a_sweep_never_prints_the_password_of_a_reachable_server(server, tmp_path, monkeypatch, capsys):
    """Past the server check the sweep stops on its data (a missing file): nothing it printed on
    the way shows the password."""
    monkeypatch.chdir(tmp_path)
    uri = server.url.replace("http://", "http://vqlog:s3cret-pw@")
    code = sweep_main(["--config", "smoke", "--trials", "1", "--tracking-uri", uri,
                       "--data", str(tmp_path / "missing.npy")])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("Error: ") and "missing.npy" in err, out + err
    assert "s3cret" not in out + err
    assert "s3cret" not in "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())


def test_the_default_store_follows_the_working_directory(tmp_path, monkeypatch):
    """MLflow caches stores by URI text: a relative sqlite:///mlflow.db used from a second folder
    in the same process kept writing runs to the first folder's database, while vqlog put their
    artifacts in the second folder's mlartifacts/. The Tracker resolves the path when it starts."""
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        tracker = Tracker()  # the default, sqlite:///mlflow.db
        assert tracker.uri == f"sqlite:///{folder}/mlflow.db"
        exp = tracker.client.get_experiment(tracker._experiment(f"study-{name}", ""))
        assert exp.artifact_location == (folder / "mlartifacts" / f"study-{name}").as_uri()
        names = {e.name for e in MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()}
        assert names == {"Default", f"study-{name}"}


# ------------------------------------------- 6. the embedded default store, seen by a server


def test_embedded_default_store_is_found_by_a_server_in_its_folder(server):
    """`vqlog-sweep` with no --tracking-uri writes ./mlflow.db and ./mlartifacts/<study>/...

    The module's server was started in its folder on `<folder>/mlflow.db` — the very file a sweep
    run in that folder with the default `sqlite:///mlflow.db` writes — so it plays the part of
    `mlflow ui` / `mlflow server` started there afterwards (and spares a second server start)."""
    folder = Path(server.log).parent
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.chdir(folder)
        assert sweep_main(["--config", "smoke", "--study", "embedded", "--trials", "1"]) == 0
    assert (folder / "mlflow.db").is_file() and (folder / "optuna.db").is_file()
    assert list((folder / "mlartifacts" / "embedded").glob("*/artifacts/curves.png"))

    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name("embedded")
    assert exp.artifact_location == (folder / "mlartifacts" / "embedded").as_uri()
    (run,) = client.search_runs([exp.experiment_id], "tags.`vqlog.role` = 'trial'")
    assert {"curves.png", "reconstruction.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    png = Path(client.download_artifacts(run.info.run_id, "curves.png", str(folder)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What the UI itself asks: the server lists and serves the file from ./mlartifacts.
    query = urllib.parse.urlencode({"run_uuid": run.info.run_id})
    with urllib.request.urlopen(f"{server.url}/ajax-api/2.0/mlflow/artifacts/list?{query}") as resp:
        listed = {f["path"] for f in json.load(resp).get("files", [])}
    assert "curves.png" in listed
    query = urllib.parse.urlencode({"run_uuid": run.info.run_id, "path": "curves.png"})
    with urllib.request.urlopen(f"{server.url}/get-artifact?{query}") as resp:
        assert resp.read()[:8] == b"\x89PNG\r\n\x1a\n"
