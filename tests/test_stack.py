"""The compose stack's topology on this machine: PostgreSQL, the MLflow server started by
`mlflow/start.sh`, `vqlog init`, then two `vqlog-sweep` workers at once on the
smoke spec. Optuna (the search state), MLflow (runs) and the experiment table must agree."""

import re
import subprocess
import urllib.error
import urllib.request

import optuna
import pytest
from optuna.trial import TrialState

from _servers import START_SH
from _stack import STACK_TRIALS, require_postgres, start_sh_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack.url)


@pytest.fixture(scope="module")
def study(stack):
    from vqlog.study.storage import open_storage

    return optuna.load_study(study_name=stack.study, storage=open_storage(stack.storage))


def _runs(client, stack, role):
    exp = client.get_experiment_by_name(stack.study)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`vqlog.role` = '{role}'",
                              max_results=1000)


def test_init_then_two_workers_reach_exactly_the_target(stack, study):
    assert "Optuna study ready" in stack.init_output, stack.init_output
    for code, out in zip(stack.worker_codes, stack.worker_outputs):
        assert code == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == STACK_TRIALS  # counted across both workers, not per worker
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    ran = [int(m.group(1)) for out in stack.worker_outputs
           for m in [re.search(r"\((\d+) ran here, (\d+) failed\)", out)] if m]
    assert len(ran) == 2 and sum(ran) == len(study.trials), stack.worker_outputs


def test_workers_print_only_their_own_lines(stack, study):
    """Against a server MLflow would print two "View run ... / View experiment ..." lines each
    time a run ends; a worker's output is its own lines: one per trial and its summary."""
    for out in [stack.init_output, *stack.worker_outputs]:
        assert "View run" not in out and "View experiment" not in out, out[-3000:]
    trial_lines = [line for out in stack.worker_outputs for line in out.splitlines()
                   if re.match(r"Seq\d+ +(COMPLETE|PRUNED|FAIL) ", line)]
    assert len(trial_lines) == len(study.trials), stack.worker_outputs


def test_every_trial_is_one_child_run_of_the_study_run(stack, study, client):
    exp = client.get_experiment_by_name(stack.study)
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    parents = _runs(client, stack, "study")
    assert len(parents) == 1, "one study run, made once by vqlog init"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = {int(r.data.tags["optuna.trial_number"]): r for r in _runs(client, stack, "trial")}
    assert set(children) == {t.number for t in study.trials}
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for t in study.trials:
        run = children[t.number]
        assert run.info.run_name == f"Seq{t.number + 1}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == status[t.state.name]
        assert run.data.params["batch"] == str(t.params["batch"])
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["final_val_mse"] == pytest.approx(t.value, rel=1e-6)


def test_artifacts_are_served_by_the_server(stack, study, client, tmp_path):
    t = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    run = next(r for r in _runs(client, stack, "trial")
               if r.data.tags["optuna.trial_number"] == str(t.number))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    path = client.download_artifacts(run.info.run_id, "curves.png", str(tmp_path))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # ... from the destination start.sh gave --artifacts-destination
    assert list(stack.server.artifacts.rglob("curves.png"))


def test_table_agrees_with_runs_and_the_study_run(stack, study, client, cli):
    from vqlog.tracking.rows import fetch_rows
    from vqlog.tracking.table import render_table

    code, out, err = cli("table", "--study", stack.study, "--tracking-uri", stack.url, "--out", "-")
    assert code == 0, err
    text = out.rstrip("\n")
    assert text == render_table(fetch_rows(client, stack.study), title=stack.study).rstrip("\n")
    for t in study.trials:
        assert re.search(rf"^\| Seq{t.number + 1}( ★)? \| {t.params['batch']} \|", text, re.M), text
    parent = _runs(client, stack, "study")[0]
    assert client.get_run(parent.info.run_id).data.tags["mlflow.note.content"].rstrip("\n") == text
    artifact = client.download_artifacts(parent.info.run_id, "experiment_table.md")
    with open(artifact) as fh:
        assert fh.read().rstrip("\n") == text


@pytest.mark.parametrize("host, allowed", [("mlflow:5000", True), ("localhost:5000", True),
                                           ("attacker.example", False), ("10.0.0.7:5000", False)])
def test_allowed_hosts_from_start_sh(stack, host, allowed):
    """Workers reach the server as http://mlflow:5000 in compose; other Host headers are refused
    (MLflow's own default would refuse `mlflow` and accept any private IP)."""
    req = urllib.request.Request(f"{stack.url}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            code = resp.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    assert code == (200 if allowed else 403)


def _start_sh(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(START_SH)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=start_sh_env(**env))


def test_start_sh_on_a_port_in_use_refuses_to_start(stack, tmp_path):
    """MLflow's server logged `[Errno 98] Address already in use` and exited 0, and a sweep sent
    to that port logged into whatever held it (a `vqlog ui` on the same default 5000)."""
    port = stack.url.rsplit(":", 1)[1]
    out = _start_sh(tmp_path, mlflow_db="vqlog_no_such_db", MLFLOW_PORT=port)
    assert (out.returncode, out.stdout) == (2, ""), out.stdout + out.stderr
    assert out.stderr == (f"Error: port {port} on 127.0.0.1 is in use (another MLflow server, a "
                          "vqlog ui?); stop it, or give this one another MLFLOW_PORT; not "
                          "starting\n")
    assert list(tmp_path.iterdir()) == []  # no mlartifacts/


@pytest.mark.parametrize("env, said", [
    ({"MLFLOW_PORT": "99999"}, "MLFLOW_PORT must be a port number from 1 to 65535, got '99999'"),
    ({"MLFLOW_HOST": "10.99.99.99"}, "MLFLOW_HOST 10.99.99.99 is not an address of this "
                                     "machine; use 0.0.0.0 (every interface) or 127.0.0.1"),
])
def test_start_sh_that_cannot_listen_refuses_to_start(tmp_path, env, said):
    """MLflow's server logged the bind error (a uvicorn traceback for port 99999), exited 0,
    and had created its tables first."""
    require_postgres()
    out = _start_sh(tmp_path, mlflow_db="vqlog_no_such_db", **env)
    assert (out.returncode, out.stdout) == (2, ""), out.stdout + out.stderr
    assert out.stderr.startswith(f"Error: {said}") and out.stderr.endswith("; not starting\n")
    assert len(out.stderr.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_start_sh_without_its_database_says_so_at_once(tmp_path):
    """It retried for about two minutes, printed some 50 lines of tracebacks, then exited 1."""
    from _servers import free_port

    require_postgres()
    out = _start_sh(tmp_path, mlflow_db="vqlog_no_such_db", MLFLOW_PORT=str(free_port()))
    lines = out.stderr.splitlines()
    assert (out.returncode, out.stdout, len(lines)) == (2, "", 1), out.stdout + out.stderr
    assert re.fullmatch(r"Error: database vqlog_no_such_db does not exist on [\w.]+:\d+; create "
                        r"it first \(createdb -h \S+ -p \d+ -U \S+ vqlog_no_such_db\); not starting",
                        lines[0]), lines[0]


def test_init_again_is_harmless(stack, study, client, cli):
    code, out, err = cli("init", "--config", "smoke", "--study", stack.study, "--storage",
                         stack.storage, "--tracking-uri", stack.url)
    assert code == 0, err
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert f"({done} finished trial{'s' * (done != 1)} so far" in out
    assert len(_runs(client, stack, "study")) == 1


def test_init_refuses_a_study_with_other_directions(stack, cli):
    """A study created for the mse objective cannot be re-used by a pareto spec."""
    import yaml

    from vqlog.study.spec import resolve_spec_path

    raw = yaml.safe_load(resolve_spec_path("smoke").read_text())
    raw.update(objective="pareto", pruner="none", name=stack.study)
    spec = stack.folder / "pareto.yaml"
    spec.write_text(yaml.safe_dump(raw))
    code, _, err = cli("init", "--config", str(spec), "--storage", stack.storage,
                       "--tracking-uri", stack.url)
    assert code == 2
    assert err.startswith("Error: study ") and "use another --study name" in err


def test_init_counts_a_specs_queued_rows_apart(tmp_path, cli):
    """`vqlog init` on a new study of the seed spec said "(3 trials so far)", while `vqlog
    trials` showed none: the three were the spec's queued rows."""
    code, out, err = cli("init", "--config", "seed", "--storage", f"sqlite:///{tmp_path}/o.db",
                         "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert code == 0, err
    assert "(0 finished trials so far, 3 queued)" in out
    code, out, err = cli("trials", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert code == 0 and out == "" and err == "no trial runs yet in study 'seed'\n", (out, err)
