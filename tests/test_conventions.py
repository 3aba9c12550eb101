"""What MLflow, Optuna and W&B users take for granted: seeds that never repeat a parameter set,
safe study names, one "best" everywhere, the usual environment variables, `vqlog best` and
`vqlog trials`, the run context and lineage on every trial run, and a notebook API that leaves
the process as it found it."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from _sweep_helpers import SWEEP_BIN, Worker, mlflow_runs, study_trials, write_spec

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def searched(trials) -> list[tuple]:
    """The sampled parameter sets (a retry or an enqueued row is exempt: neither is sampled)."""
    return [tuple(sorted(t.params.items())) for t in trials
            if "fixed_params" not in t.system_attrs]


# --------------------------------------------------------------------------------- seeds


def test_a_resumed_seeded_study_draws_new_parameters(tmp_path, monkeypatch, mlflow_store, cli):
    """Resumed with the same --seed, the smoke study used to run its first trials' parameters
    again (its sampler restarted from the same seed)."""
    monkeypatch.chdir(tmp_path)  # results/seeded.md goes here, not into the checkout
    spec = write_spec(tmp_path, "seeded", budget={"iteration": 4, "eval_every": 2}, pruner="none")
    common = ["--config", str(spec), "--seed", "7", "--storage", f"sqlite:///{tmp_path}/o.db",
              "--tracking-uri", mlflow_store()]
    for trials in ("3", "6"):
        code, _, err = cli.sweep("--trials", trials, *common)
        assert code == 0, err
    sets = searched(study_trials(f"sqlite:///{tmp_path}/o.db", "seeded"))
    assert len(sets) == 6 and len(set(sets)) == 6, sets


def test_two_workers_given_one_seed_draw_different_parameters(tmp_path, pg_storage, mlflow_store):
    spec = write_spec(tmp_path, "twins", budget={"iteration": 4, "eval_every": 2}, pruner="none")
    uri = mlflow_store()
    args = ["--trials", "6", "--config", str(spec), "--seed", "5", "--storage", pg_storage,
            "--tracking-uri", uri]
    workers = [Worker(args, tmp_path / f"w{i}", f"w{i}") for i in range(2)]
    try:
        for w in workers:
            assert w.wait(240) == 0, w.output()
    finally:
        for w in workers:
            w.kill()
    sets = searched(study_trials(pg_storage, "twins"))
    assert len(sets) >= 6 and len(set(sets)) == len(sets), sets


# --------------------------------------------------------------------------- study names


# (an empty --study is the spec's name: compose passes it for an empty STUDY; test_compose.py)
@pytest.mark.parametrize("name", ["../../tmp/x", "line\nbreak", "a" * 65, "sp ace", ".", "..", "..x",
                                  ".x"])  # results/x.md, the table of study x's
def test_a_bad_study_name_is_one_error_and_nothing_is_created(tmp_path, monkeypatch, cli, name):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli.sweep("--config", "smoke", "--trials", "1", "--study", name,
                               "--storage", f"sqlite:///{tmp_path}/o.db",
                               "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is not a study name" in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_the_table_of_any_name_in_a_shared_store_stays_in_its_folder(tmp_path, monkeypatch, cli):
    """A study another tool named `../../escaped` in a shared store: `vqlog table` writes
    inside results/ all the same."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("../../escaped")
    client.create_run(exp, tags={"vqlog.role": "study", "optuna.study": "../../escaped"})
    code, out, err = cli("table", "--study", "../../escaped", "--tracking-uri", uri)
    assert code == 0, err
    written = list((tmp_path / "results").iterdir())
    assert len(written) == 1 and written[0].name.endswith("escaped.md"), written
    assert not (tmp_path.parent / "escaped.md").exists()
    assert not list(tmp_path.parent.parent.glob("escaped*"))


# ------------------------------------------------------------ conventions, on one sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep run as a user runs it: in a git checkout, with MLFLOW_TRACKING_URI and
    OPTUNA_STORAGE set instead of flags, and system metrics sampled every second."""
    folder = tmp_path_factory.mktemp("checkout")
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    subprocess.run(["git", "-C", str(folder), "-c", "user.email=t@t", "-c", "user.name=t",
                    "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    spec = write_spec(folder, "conv", budget={"iteration": 300, "eval_every": 100},
                      pruner="none")
    uri, storage = f"sqlite:///{folder}/elsewhere.db", f"sqlite:///{folder}/study.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OPTUNA_STORAGE": storage,
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(SWEEP_BIN), "--trials", "2", "--config", str(spec)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return SimpleNamespace(folder=folder, uri=uri, storage=storage, commit=commit,
                           out=proc.stdout, env=env)


def test_the_usual_environment_variables_choose_the_stores(swept):
    assert (swept.folder / "elsewhere.db").is_file() and (swept.folder / "study.db").is_file()
    assert not (swept.folder / "mlflow.db").exists() and not (swept.folder / "optuna.db").exists()
    assert f"storage {swept.storage}, tracking {swept.uri}" in swept.out


def test_the_experiment_opens_in_the_training_view_and_the_link_says_so(swept):
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=swept.uri).get_experiment_by_name("conv")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert f"then open {link}" in swept.out


def test_every_trial_run_carries_its_lineage(swept, monkeypatch):
    from importlib import metadata

    import optuna
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=swept.uri)
    trials = {t.number: t for t in optuna.load_study(study_name="conv", storage=swept.storage).trials}
    runs = mlflow_runs(swept.uri, "conv")
    assert len(runs) == 2
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == swept.commit
        assert tags["mlflow.user"] and tags["mlflow.source.name"].endswith("vqlog-sweep")
        for package in ("vqlog", "torch", "optuna", "mlflow"):
            assert tags[f"vqlog.version.{package}"] == metadata.version(package)
        (data,) = run.inputs.dataset_inputs
        assert data.dataset.name == "synthetic" and len(data.dataset.digest) >= 8
        assert json.loads(data.dataset.profile)["features_shape"][1] == 64  # the window
        assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
        assert any(k.startswith("system/system_memory") for k in run.data.metrics)
        number = int(tags["optuna.trial_number"])
        assert trials[number].user_attrs["mlflow.run_id"] == run.info.run_id
    study = optuna.load_study(study_name="conv", storage=swept.storage)
    assert study.metric_names == ["final_val_mse"]
    (parent,) = mlflow_runs(swept.uri, "conv", role="study")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", swept.uri)  # load_table searches the default store
    grid = client.load_table(experiment_id=parent.info.experiment_id,
                             artifact_file="experiment_table.json", run_ids=[parent.info.run_id])
    assert sorted(grid["run"].str.rstrip(" ★")) == ["Seq1", "Seq2"]
    assert {"loss", "perplexity", "lr"} <= set(grid.columns)


def test_best_and_trials_agree_with_the_study_and_the_table(swept, monkeypatch, cli):
    import optuna

    from vqlog.cli import command_name

    monkeypatch.setenv("MLFLOW_TRACKING_URI", swept.uri)
    monkeypatch.setenv("OPTUNA_STORAGE", swept.storage)
    study = optuna.load_study(study_name="conv", storage=swept.storage)
    best = min(study.trials, key=lambda t: t.value)
    code, out, err = cli("best", "--study", "conv")
    assert code == 0, err
    assert out.startswith(f"best: Seq{best.number + 1} (trial {best.number})  "
                          f"final_val_mse {best.value:.4g}")
    # every digit of a float (it printed 4): pasted into --set, the trial's own configuration
    assert f"  lr = {best.params['lr']!r}\n" in out
    assert float(out.split("  lr = ")[1].split()[0]) == best.params["lr"]
    # a local store's page opens once `vqlog ui` serves it: the line says so (it did not)
    run_line = next(line for line in out.splitlines() if line.startswith("run:  "))
    assert run_line.startswith("run:  http://127.0.0.1:5000/#/experiments/")
    assert run_line.endswith(f"/runs/{best.user_attrs['mlflow.run_id']}?workflowType="
                             "machine_learning   (once "
                             f"`{command_name('vqlog')} ui --tracking-uri {swept.uri}` serves "
                             "it)"), run_line
    table = (swept.folder / "results" / "conv.md").read_text()
    assert f"| Seq{best.number + 1} ★ |" in table  # the same best

    code, out, err = cli("trials", "--study", "conv", "--format", "json")
    assert code == 0, err
    records = json.loads(out)
    assert [r["number"] for r in records] == [0, 1]
    assert [r["metrics.final_val_mse"] for r in records] == pytest.approx(
        [t.value for t in study.trials])
    code, out, _ = cli("trials", "--study", "conv", "--format", "csv")
    assert out.splitlines()[0].startswith("number,run,state,run_id,")
    code, out, _ = cli("trials", "--study", "conv")
    assert out.splitlines()[0].split()[:4] == ["number", "run", "state", "final_val_mse"]
    # every param is in the table or on its last line, none silently left out
    varying = {k for k in study.trials[0].params
               if len({t.params[k] for t in study.trials}) > 1}
    assert set(out.splitlines()[0].split()) >= varying
    same = out.splitlines()[-1]
    assert same.startswith("same in every trial: "), out
    named = {item.split("=")[0] for item in same.removeprefix("same in every trial: ").split(", ")}
    logged = {c.removeprefix("params.") for c in records[0] if c.startswith("params.")}
    assert named == logged - varying and named, out
    # BN as a spec, --set and the table write it (--set BN=False is refused)
    items = same.removeprefix("same in every trial: ").split(", ")
    assert "BN=yes" in items or "BN=no" in items, same


def test_best_trials_and_export_take_the_only_study_without_study(swept, monkeypatch, cli,
                                                                  tmp_path, mlflow_store):
    """As `vqlog table` does; they required --study even where the storage holds one."""
    import shutil

    import optuna

    monkeypatch.setenv("MLFLOW_TRACKING_URI", swept.uri)
    monkeypatch.setenv("OPTUNA_STORAGE", swept.storage)
    assert cli("best") == cli("best", "--study", "conv")
    assert cli("trials", "--format", "json") == cli("trials", "--study", "conv", "--format", "json")
    code, out, err = cli("export", "--out", str(tmp_path / "m.pt"))
    assert code == 0 and "of study 'conv'" in out and (tmp_path / "m.pt").is_file(), err
    two = tmp_path / "two.db"
    shutil.copyfile(swept.storage.removeprefix("sqlite:///"), two)
    optuna.create_study(study_name="other", storage=f"sqlite:///{two}")
    code, out, err = cli("best", "--storage", f"sqlite:///{two}")
    assert (code, out) == (2, "") and err == (f"Error: several studies in sqlite:///{two} "
                                              "(conv, other); choose one with --study\n"), err
    empty = mlflow_store(tmp_path / "empty")
    code, out, err = cli("trials", "--tracking-uri", empty)
    assert (code, out) == (2, "") and err == (f"Error: no vqlog study in the MLflow store {empty}; "
                                              "run vqlog-sweep first\n"), err


def test_vqlog_ui_url_is_where_the_links_point(swept, monkeypatch, cli):
    """VQLOG_UI_URL: the UI's address as users open it (a published port, a proxy, a tunnel),
    for the links vqlog prints, in place of the tracking URI's."""
    import optuna
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=swept.uri).get_experiment_by_name("conv")
    best = min(optuna.load_study(study_name="conv", storage=swept.storage).trials,
               key=lambda t: t.value)
    monkeypatch.setenv("VQLOG_UI_URL", "http://lab.example:5999/")
    code, out, err = cli("best", "--study", "conv", "--storage", swept.storage,
                         "--tracking-uri", swept.uri)
    assert code == 0, err
    run_id = best.user_attrs["mlflow.run_id"]
    assert (f"run:  http://lab.example:5999/#/experiments/{exp.experiment_id}/runs/{run_id}"
            "?workflowType=machine_learning\n") in out


def test_best_answers_without_its_tracking_store(swept, tmp_path, cli):
    """The study holds the answer; a tracking store that is not there costs only the link (the
    answer used to be printed, then an Error line and exit 2)."""
    gone = f"sqlite:///{tmp_path}/nope.db"
    code, out, err = cli("best", "--study", "conv", "--storage", swept.storage, "--tracking-uri", gone)
    assert code == 0 and err == "", err
    assert out.startswith("best: Seq") and f"(no MLflow store at {gone})\n" in out, out
    assert not (tmp_path / "nope.db").exists()
    down = "http://127.0.0.1:9"  # the discard port: nothing answers
    code, out, err = cli("best", "--study", "conv", "--storage", swept.storage, "--tracking-uri", down)
    assert code == 0 and err == "", err
    assert f"(MLflow at {down} does not answer)\n" in out, out


def test_best_gives_no_link_to_a_deleted_run_or_experiment(swept, cli):
    """The best trial's run, then the study's experiment, deleted in the MLflow UI: `best` gave
    a link that opens on an error page. It says how to restore them instead, with a command that
    does it (run here, as a user pastes it: the mlflow command finds the store only through
    MLFLOW_TRACKING_URI)."""
    import shlex

    from mlflow import MlflowClient

    client = MlflowClient(swept.uri)
    exp = client.get_experiment_by_name("conv")
    best = ["best", "--study", "conv", "--storage", swept.storage, "--tracking-uri", swept.uri]
    code, out, _ = cli(*best)
    run_id = out.split("/runs/")[1].split("?")[0]
    assert code == 0 and f"#/experiments/{exp.experiment_id}/runs/{run_id}?" in out, out
    mlflow_bin = str(SWEEP_BIN.parent / "mlflow")

    def paste(line: str) -> None:  # the advice's command, run as given
        env_var, *command = shlex.split(line.split("`")[1])
        name, value = env_var.split("=", 1)
        proc = subprocess.run([mlflow_bin, *command[1:]], env={**os.environ, name: value},
                              capture_output=True, text=True, timeout=120, cwd=swept.folder)
        assert proc.returncode == 0, proc.stderr

    client.delete_run(run_id)
    try:
        code, out, err = cli(*best)
        assert code == 0 and err == "", err
        assert f"run:  {run_id} (deleted in MLflow; restore it with `MLFLOW_TRACKING_URI=" \
               f"{swept.uri} mlflow runs restore --run-id {run_id}`)\n" in out, out
        paste(out.split("run:  ")[1])
        assert client.get_run(run_id).info.lifecycle_stage == "active"
        client.delete_experiment(exp.experiment_id)
        try:
            code, out, err = cli(*best)
            assert code == 0 and err == "", err
            assert f"(the MLflow experiment 'conv' is deleted; restore it with `MLFLOW_TRACKING_URI=" \
                   f"{swept.uri} mlflow experiments restore --experiment-id {exp.experiment_id}`)\n" \
                   in out, out
            assert "http" not in out
            paste(out.split("run:  ")[1])
            assert client.get_experiment(exp.experiment_id).lifecycle_stage == "active"
        finally:
            if client.get_experiment(exp.experiment_id).lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
    finally:
        if client.get_run(run_id).info.lifecycle_stage == "deleted":
            client.restore_run(run_id)


def test_the_restore_line_for_a_store_with_a_password_runs_as_pasted(pg_database, tmp_path):
    """The line printed `MLFLOW_TRACKING_URI=postgresql://postgres:***@...`: pasted, mlflow
    took *** for the password, and SQLAlchemy's default driver for a bare `postgresql://` is
    not installed. It now leaves the password to $PGPASSWORD, names psycopg2 and is quoted."""
    import shlex

    from mlflow.tracking import MlflowClient

    from vqlog.commands.best import _run_link
    from vqlog.urls import password

    uri = pg_database().replace("postgresql+psycopg2://", "postgresql://")
    if not password(uri):  # the CI server trusts its users: any password is taken
        head, _, rest = uri.partition("://")
        user, _, host = rest.partition("@")
        uri = f"{head}://{user.partition(':')[0]}:s3cr3t@{host}"
    client = MlflowClient(tracking_uri=uri.replace("postgresql://", "postgresql+psycopg2://"))
    exp_id = client.create_experiment("pw")
    run_id = client.create_run(exp_id).info.run_id
    client.delete_run(run_id)
    line = _run_link(uri, "pw", run_id)
    assert password(uri) not in line and "***" not in line, line
    assert line.endswith("` (with the password in $PGPASSWORD))"), line
    env_var, *command = shlex.split(line.split("`")[1])
    name, value = env_var.split("=", 1)
    proc = subprocess.run([str(BIN / "mlflow"), *command[1:]],
                          env={**os.environ, name: value, "PGPASSWORD": password(uri)},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert client.get_run(run_id).info.lifecycle_stage == "active"


def test_a_reader_that_goes_away_ends_the_command_quietly(swept, tmp_path):
    """`vqlog best | head -3`: the pipe closed before vqlog's last lines, and the command said
    `Error: BrokenPipeError: [Errno 32] Broken pipe` with exit 1. Unix tools end quietly there;
    vqlog exits 141, as a shell reports a tool that SIGPIPE ended."""
    proc = subprocess.Popen([str(SWEEP_BIN.parent / "vqlog"), "best", "--study", "conv",
                             "--storage", swept.storage, "--tracking-uri",
                             f"sqlite:///{tmp_path}/nope.db"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141 and err == "", err


@pytest.mark.parametrize("given, base", [
    ("http://127.0.0.1:5999/#/", "http://127.0.0.1:5999"),  # pasted from the address bar
    ("https://proxy.lab/mlflow/?token=abc#/experiments/3", "https://proxy.lab/mlflow"),
    ("alice:s3cr3t@lab:5000", "http://lab:5000"),  # no scheme; no credentials in a link
    ("  ", "http://mlflow:5000"),  # blank: the tracking URI's
])
def test_vqlog_ui_url_as_users_paste_it(given, base, monkeypatch):
    from vqlog.tracking.lineage import ui_link

    monkeypatch.setenv("VQLOG_UI_URL", given)
    assert ui_link("http://mlflow:5000", "7") == \
        f"{base}/#/experiments/7/runs?workflowType=machine_learning"


def test_the_link_to_a_server_with_credentials_leaves_them_out(monkeypatch):
    """It was `http://alice:***@host:5000/#/...`, which no browser opens (the browser asks for
    them, as the server's basic auth does)."""
    from vqlog.tracking.lineage import ui_link

    monkeypatch.delenv("VQLOG_UI_URL", raising=False)
    assert ui_link("http://alice:TopSecret9@lab:5000/", "3") == \
        "http://lab:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_a_server_written_in_capitals_is_linked_as_a_server(monkeypatch):
    """`HTTP://LAB:5000` is a server's address as much as `http://lab:5000` (`vqlog best` took it
    so): its link was the local store's `http://127.0.0.1:5000`."""
    from vqlog.tracking.lineage import ui_link

    monkeypatch.delenv("VQLOG_UI_URL", raising=False)
    assert ui_link("HTTPS://bob:pw@Lab:5000", "3") == \
        "https://Lab:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_flags_beat_the_environment(swept, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{tmp_path}/no/such/folder/o.db")
    code, out, err = cli("best", "--study", "conv", "--storage", swept.storage,
                         "--tracking-uri", swept.uri)
    assert code == 0, err
    code, _, err = cli("best", "--study", "conv", "--tracking-uri", swept.uri)
    assert code == 2 and "does not exist" in err  # the environment's, when no flag is given


# ------------------------------------------------------------------------- notebook API


def test_the_notebook_api_returns_results_and_leaves_the_process_as_it_was(tmp_path):
    """vqlog.sweep and vqlog.results in a fresh interpreter: a summary and a DataFrame, and the
    log levels, warning filters, environment, signal handlers, torch RNG and plot backend
    (chosen by the caller, as a notebook has) unchanged."""
    spec = write_spec(tmp_path, "nb", budget={"iteration": 6, "eval_every": 3}, pruner="none")
    script = f"""
import json, logging, os, signal, warnings
import matplotlib.pyplot, optuna, torch, mlflow   # what a notebook has loaded already
import scipy.special, sympy   # (their imports add warning filters of their own when first used)
# Imports that set variables in os.environ themselves: einx (under vector_quantize_pytorch)
# imports torch._dynamo (TORCHINDUCTOR_CACHE_DIR); sklearn (under Optuna's importances) sets KMP_*
import vector_quantize_pytorch, sklearn

def state():
    return {{
        "filters": [repr(f) for f in warnings.filters], "environ": dict(os.environ),
        "levels": {{n: logging.getLogger(n).level for n in ("optuna", "mlflow", "alembic")}},
        "verbosity": optuna.logging.get_verbosity(),
        "signals": [repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)],
        "rng": torch.get_rng_state().tolist()[:64], "backend": matplotlib.get_backend(),
    }}

before = state()
import vqlog
import numpy   # a notebook's numbers are often NumPy's: torch's generators refused its seed
summary = vqlog.sweep(trials=numpy.int64(2), seed=numpy.int64(7), config={str(spec)!r},
                      storage="sqlite:///{tmp_path}/o.db",
                      tracking_uri="sqlite:///{tmp_path}/m.db", out=lambda line: None)
df = vqlog.results("nb", tracking_uri="sqlite:///{tmp_path}/m.db")
print(json.dumps([before, state(), summary.finished, df["number"].tolist(),
                  sorted(c for c in df.columns if c.startswith("metrics."))]))
"""
    # a notebook's environment: not what an earlier in-process command line of this test run
    # set in os.environ (configure_process: MLflow's log level, retries, progress bar), which
    # MLflow would act on in the child
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                        "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    before, after, finished, numbers, metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in before:
        assert after[key] == before[key], key
    assert finished == 2 and numbers == [0, 1]
    assert {"metrics.best_val_mse", "metrics.final_val_mse"} <= set(metrics)


@pytest.mark.parametrize("kwargs, expect", [
    ({"trials": 0}, "trials must be at least 1, got 0"),
    ({"trials": 2.5}, "trials must be a whole number, got 2.5"),
    ({"trials": 2, "timeout": "60"}, "timeout must be a number of seconds, got '60'"),
    ({"trials": 2, "seed": -1}, "seed must be from 0 to 4294967295 (2**32 - 1), got -1"),
    ({"trials": 2, "lang": "de"}, "unknown language 'de'"),  # found after a whole trial before
    ({"trials": None}, "trials must be a whole number, got None"),
    ({"trials": 2, "gpus": [0]}, "gpus=0 was given, but the sweep runs on the CPU: add device cuda"),
    ({"trials": 2, "study": "a b"}, "study: 'a b' is not a study name"),
    ({"trials": 2, "workers": 0}, "workers"),
])
def test_the_notebook_apis_errors_name_its_arguments(tmp_path, monkeypatch, kwargs, expect):
    """vqlog.sweep's errors spoke of the command's flags (`--trials must be ...`) to a caller
    that passed none; a list of GPUs and NumPy's integers, a notebook's values, are taken."""
    import numpy as np

    import vqlog
    from vqlog.api import check_options, gpu_list
    from vqlog.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        vqlog.sweep(**{"config": "smoke", "storage": f"sqlite:///{tmp_path}/o.db",
                       "tracking_uri": f"sqlite:///{tmp_path}/m.db", "device": "cpu", **kwargs})
    assert expect in str(caught.value) and "--" not in str(caught.value), caught.value
    assert list(tmp_path.iterdir()) == []
    check_options(np.int64(3), np.float32(60), np.uint32(7))  # no error
    assert gpu_list([0, np.int64(1)]) == gpu_list("0,1") == [0, 1]


@pytest.mark.parametrize("message, expect", [
    ("pass --sample-rate HZ, or give it", "pass sample_rate=HZ, or give it"),
    ("e.g. --storage sqlite:///o.db --tracking-uri sqlite:///m.db",
     "e.g. storage=sqlite:///o.db tracking_uri=sqlite:///m.db"),
    ("use another --study name", "use another study name"),
    ("/home/u/exp--data/x.npy is missing", "/home/u/exp--data/x.npy is missing"),  # a path's
    ("run `vqlog init --study x --storage sqlite:///o.db` first",  # a command to run, as it is
     "run `vqlog init --study x --storage sqlite:///o.db` first"),
])
def test_the_notebook_api_words_the_commands_messages_as_arguments(message, expect):
    from vqlog.api import in_arguments

    assert in_arguments(message) == expect


def test_a_data_file_in_the_home_folder_is_linked_where_it_was_read(tmp_path, monkeypatch):
    """`~/x.npy` in a spec is read from the home folder; the run's dataset input named the
    current folder's `~/x.npy`, a path that does not exist."""
    import numpy as np

    from vqlog.data import Splits
    from vqlog.tracking.lineage import dataset_input

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    windows = np.zeros((4, 64), np.float32)
    given = dataset_input(Splits(windows, windows, windows, 25.0, {}), "~/x.npy")
    assert json.loads(given.dataset.source) == {"uri": str(tmp_path / "x.npy")}
    assert given.dataset.name == "x.npy"
