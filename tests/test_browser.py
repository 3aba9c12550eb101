"""What a person sees: a real headless Chromium opens the stack's MLflow UI (the server that
`mlflow/start.sh` started, populated by two sweep workers), and optuna-dashboard serves the study
from the shared PostgreSQL storage. Screenshots stay in each test's temp folder."""

import json
import re
import subprocess
import urllib.request

import pytest

from _browser import Chromium
from _servers import BIN, free_port, stop_group, wait_http
from _stack import STACK_TRIALS, base_env, chromium

pytestmark = pytest.mark.slow
# The expander of a parent run in the runs table (MLflow 3.17's run-name cell renderer).
EXPAND_PARENT = '.ag-row button[data-component-id*="runnamecellrenderer"]'


@pytest.fixture(scope="module")
def ids(stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.url)
    exp = client.get_experiment_by_name(stack.study)
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`vqlog.role` = 'study'")[0]
    return exp.experiment_id, parent.info.run_id


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium()
    if binary is None:
        from _stack import skip_or_fail

        skip_or_fail("no chromium on PATH (Debian: apt-get install chromium; `make test` installs "
                     "it when run as root)")
    with Chromium(binary, tmp_path_factory.mktemp("chromium") / "profile") as b:
        yield b


def test_mlflow_ui_shows_the_experiment_and_its_trial_runs(stack, ids, browser, tmp_path):
    exp_id, _ = ids
    page = browser.new_page()
    # MLflow 3 opens experiments in its GenAI view; vqlog's runs are under "Model training".
    page.goto(f"{stack.url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    page.wait_for_text([stack.study, f"{STACK_TRIALS + 1} matching runs"])
    page.click(EXPAND_PARENT)  # trials are child runs of the study run
    text = page.wait_for_text([f"Seq{i}" for i in range(1, STACK_TRIALS + 1)])
    page.screenshot(tmp_path / "mlflow-runs.png")
    assert stack.study in text
    assert (tmp_path / "mlflow-runs.png").stat().st_size > 10_000


def test_mlflow_ui_shows_the_table_on_the_study_run(stack, ids, browser, tmp_path):
    exp_id, parent_id = ids
    page = browser.new_page()
    page.goto(f"{stack.url}/#/experiments/{exp_id}/runs/{parent_id}?workflowType=machine_learning")
    # The description is the markdown table, rendered: header cells and a row per trial.
    header = ["run", "batch", "lr", "embedding_dim", "embedding_num", "iteration", "BN", "MLP",
              "En-De", "loss", "perplexity"]
    text = page.wait_for_text(["Hyper-parameter tuning", "\t".join(header)]
                              + [f"Seq{i}" for i in range(1, STACK_TRIALS + 1)])
    page.click_text("Show more")  # the description starts folded; show the whole table
    page.wait_until("!Array.from(document.querySelectorAll('button'))"
                    ".some(e => e.innerText.trim() === 'Show more')", "unfolded description")
    page.screenshot(tmp_path / "mlflow-study-run.png")
    rows = [line for line in text.splitlines() if re.match(r"Seq\d+( ★)?\t", line)]  # table rows
    assert len(rows) == STACK_TRIALS, text[:3000]
    assert all(len(r.split("\t")) >= len(header) for r in rows), rows


def test_the_run_link_vqlog_best_prints_opens_in_the_training_view(stack, browser, tmp_path):
    """`vqlog best`'s link to the best trial's run had no `?workflowType=machine_learning`:
    MLflow 3.17 opened the run under its GenAI view's "Evaluations"."""
    proc = subprocess.run([str(BIN / "vqlog"), "best", "--study", stack.study, "--storage",
                           stack.storage, "--tracking-uri", stack.url], capture_output=True,
                          text=True, timeout=120, env=base_env())
    assert proc.returncode == 0, proc.stderr
    link = re.search(r"^run:\s+(\S+)", proc.stdout, re.M).group(1)
    page = browser.new_page()
    page.goto(link)
    text = page.wait_for_text(["Model metrics", "Model registry", "final_val_mse"])
    page.screenshot(tmp_path / "mlflow-best-run.png")
    assert "Evaluation runs" not in text, text[:2000]  # the GenAI view's menu


@pytest.fixture(scope="module")
def dashboard(stack, tmp_path_factory):
    """optuna-dashboard on the stack's Optuna storage, as the compose `dashboard` service runs it."""
    folder = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    log = folder / "dashboard.log"
    # SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql://; the stack ships psycopg2.
    storage = stack.storage.replace("postgresql://", "postgresql+psycopg2://", 1)
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "optuna-dashboard"), storage, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=folder, env=base_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/meta", proc, log, "optuna-dashboard", timeout=60)
        yield url
    finally:
        stop_group(proc)


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def test_optuna_dashboard_serves_the_study(stack, dashboard, browser, tmp_path):
    studies = _get_json(f"{dashboard}/api/studies")["study_summaries"]
    mine = [s for s in studies if s["study_name"] == stack.study]
    assert len(mine) == 1, studies
    detail = _get_json(f"{dashboard}/api/studies/{mine[0]['study_id']}")
    states = [t["state"] for t in detail["trials"]]
    assert states.count("Complete") + states.count("Pruned") == STACK_TRIALS, states
    page = browser.new_page()
    page.goto(f"{dashboard}/dashboard")
    page.wait_for_text([stack.study])
    page.screenshot(tmp_path / "optuna-dashboard.png")
