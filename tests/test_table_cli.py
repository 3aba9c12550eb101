"""`vqlog table`: the experiment table regenerated from a real SQLite MLflow store.

The store is built once with MlflowClient in vqlog's layout (parent run per study, child run per
trial; see the README, "MLflow layout") and copied for each test, so no test sees another's writes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from vqlog.config import Config

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
BASE = dict(iteration=20, eval_every=10, log_every=5, batch=16, lr=1e-3)  # on the tiny config
SEQ1 = {"final_val_mse": 0.0412, "best_val_mse": 0.0381, "loss_oscillation": 0.004,
        "max_val_perplexity": 12.5, "max_val_perplexity_step": 10, "final_val_perplexity": 11.2,
        "iterations_run": 20}
SEQ2 = {"final_val_mse": 0.09, "best_val_mse": 0.08, "loss_oscillation": 0.03,
        "max_val_perplexity": 3.0, "max_val_perplexity_step": 10, "final_val_perplexity": 3.0,
        "iterations_run": 10}

EXPECTED_EN = """\
# alpha

## Hyper-parameter tuning (trained on train, evaluated on valid)

| run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| Seq1 ★ | 16 | 1e-3 | 8 | 16 | 20 | yes | +relu | s4d-all | 0.0412 (best 0.0381), stable | max 12.5 @ 10, final 11.2 |
| Seq2 | 16 | 3e-3 | 8 | 16 | 10 | yes | +relu | s4d-all | pruned @ 10; 0.09 (best 0.08), mild oscillation | max 3 @ 10, final 3 |

- ★ best of its table by the study's objective: lowest final val MSE among completed trials (a tie goes to the higher perplexity).
- loss: final val MSE (best val MSE), then the train/loss oscillation label (score `loss_oscillation`): stable < 0.01 ≤ mild oscillation < 0.05 ≤ severe oscillation; "early …" and "… worse later" compare the first third of training with the whole; "loss rising" first: its last fifth ends above 1.1x its first fifth (score `loss_rise`).
- perplexity: codebook perplexity on the whole valid set, its maximum @ iteration and the final value.
"""


def add_trial(client, base: Config, exp_id: str, parent_id: str, study: str, number: int,
              state: str, metrics: dict, **params) -> str:
    """A finished child run exactly as the Tracker writes one."""
    run = client.create_run(exp_id, run_name=f"Seq{number + 1}", tags={
        "mlflow.parentRunId": parent_id, "vqlog.role": "trial", "optuna.study": study,
        "optuna.trial_number": str(number), "optuna.state": state})
    cfg = Config.from_mapping(params, base=base).to_params()
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in cfg.items()],
                     metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, STATUS[state])
    return run.info.run_id


def add_study(client, folder: Path, study: str) -> tuple[str, str]:
    exp_id = client.create_experiment(study, artifact_location=(folder / "mlartifacts" / study).as_uri())
    parent = client.create_run(exp_id, run_name=study, tags={"vqlog.role": "study", "optuna.study": study})
    client.set_terminated(parent.info.run_id, "FINISHED")
    return exp_id, parent.info.run_id


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny) -> Path:
    """Two studies: alpha (Seq1 complete, Seq2 pruned) and beta (Seq1 complete)."""
    base = tiny(**BASE)
    folder = tmp_path_factory.mktemp("store")
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    exp, parent = add_study(client, folder, "alpha")
    add_trial(client, base, exp, parent, "alpha", 0, "COMPLETE", SEQ1)
    add_trial(client, base, exp, parent, "alpha", 1, "PRUNED", SEQ2, lr=3e-3)
    exp, parent = add_study(client, folder, "beta")
    add_trial(client, base, exp, parent, "beta", 0, "COMPLETE", SEQ1)
    return folder / "mlflow.db"


@pytest.fixture
def store(template, tmp_path, monkeypatch) -> str:
    """This test's copy of the store, and the test's folder as the working directory."""
    shutil.copy(template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_writes_results_study_md_and_publishes_it(store, tmp_path, cli):
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    assert code == 0
    assert out == "table: results/alpha.md (2 trials)\n"
    text = (tmp_path / "results" / "alpha.md").read_text()
    assert text == EXPECTED_EN
    client = MlflowClient(tracking_uri=store)
    (parent,) = client.search_runs([client.get_experiment_by_name("alpha").experiment_id],
                                   "tags.`vqlog.role` = 'study'")
    assert parent.data.tags["mlflow.note.content"] == text
    artifact = client.download_artifacts(parent.info.run_id, "experiment_table.md", str(tmp_path))
    assert Path(artifact).read_text() == text


def test_out_dash_prints_the_table(store, tmp_path, cli):
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store, "--out", "-")
    assert code == 0
    assert out == EXPECTED_EN  # the file's bytes (print() added a blank line)
    assert not (tmp_path / "results").exists()


def test_out_dev_stdout_is_the_table_alone(store, tmp_path):
    """`vqlog table --out /dev/stdout | tool`: the line `table: /dev/stdout (2 trials)` ran into
    the table; it goes to stderr now."""
    proc = subprocess.run([str(Path(sys.executable).with_name("vqlog")), "table", "--study", "alpha",
                           "--tracking-uri", store, "--out", "/dev/stdout"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == EXPECTED_EN
    assert proc.stderr.endswith("table: /dev/stdout (2 trials)\n"), proc.stderr


def test_ctrl_c_without_watch_is_interrupted_exit_130(tmp_path):
    """One `vqlog table` (no --watch) stopped by Ctrl-C while it read a slow server exited 0
    with no table: `vqlog table && publish` went on. Now `Interrupted.` and 130, as every
    command."""
    import socket

    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen([str(Path(sys.executable).with_name("vqlog")), "table",
                                 "--tracking-uri", uri], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            server.settimeout(120)
            client, _ = server.accept()  # imported, and waiting for the server's answer
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    client.close()
    assert (proc.returncode, out, err) == (130, "", "Interrupted.\n")
    assert list(tmp_path.iterdir()) == []


def test_lang_zh_renders_the_logs_chinese_labels(store, cli):
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store, "--lang", "zh", "--out", "-")
    assert code == 0
    assert "## 超参调整 (based on train，test on valid)" in out
    assert "| Seq1 ★ | 16 | 1e-3 | 8 | 16 | 20 | yes | +relu | s4d-all | 0.0412（最佳 0.0381），平稳 | " \
           "最高12.5 (10轮)，最终11.2 |" in out
    assert "| Seq2 | 16 | 3e-3 | 8 | 16 | 10 | yes | +relu | s4d-all | 提前停止 (10轮)；0.09（最佳 0.08），" \
           "轻微震荡 | 最高3 (10轮)，最终3 |" in out
    # The log keeps the English column names in its Chinese tables.
    assert "| run | batch | lr | embedding_dim | embedding_num | iteration | BN | MLP | En-De | loss | perplexity |" in out


def test_another_lang_than_the_published_one_writes_its_file_and_leaves_the_study_run(store, tmp_path,
                                                                                      cli):
    """The study run keeps the language its table was first published in (the sweep's --lang):
    a `vqlog table --lang zh` beside an English sweep rewrote it in Chinese, and the sweep's next
    refresh in English again, by turns."""
    client = MlflowClient(tracking_uri=store)
    (parent,) = client.search_runs([client.get_experiment_by_name("alpha").experiment_id],
                                   "tags.`vqlog.role` = 'study'")
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    assert (code, err) == (0, "")
    tags = client.get_run(parent.info.run_id).data.tags
    assert "vqlog.lang" not in tags and tags["mlflow.note.content"] == EXPECTED_EN  # a sweep's tag
    client.set_tag(parent.info.run_id, "vqlog.lang", "en")  # as the sweep's first refresh sets it
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store, "--lang", "zh",
                         "--out", "-")
    assert code == 0 and "## 超参调整" in out
    assert err == "table: not published to the study run, whose table is in en (the sweep's --lang)\n"
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["vqlog.lang"] == "en" and tags["mlflow.note.content"] == EXPECTED_EN
    artifact = client.download_artifacts(parent.info.run_id, "experiment_table.md", str(tmp_path))
    assert Path(artifact).read_text() == EXPECTED_EN


def test_without_lang_the_table_is_in_the_language_the_sweep_publishes_it_in(store, tmp_path,
                                                                              cli):
    """A plain `vqlog table` beside a `--lang zh` sweep rewrote the sweep's own results/<study>.md
    in English (and said on stderr that the study run stays Chinese): it follows the sweep's
    language now, the study run's `vqlog.lang` tag, and publishes its table."""
    client = MlflowClient(tracking_uri=store)
    (parent,) = client.search_runs([client.get_experiment_by_name("alpha").experiment_id],
                                   "tags.`vqlog.role` = 'study'")
    client.set_tag(parent.info.run_id, "vqlog.lang", "zh")  # as a --lang zh sweep sets it
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    assert (code, err) == (0, "")
    written = (tmp_path / "results" / "alpha.md").read_text()
    assert "## 超参调整" in written and "最高12.5 (10轮)" in written
    assert client.get_run(parent.info.run_id).data.tags["mlflow.note.content"].startswith(
        written[:200])  # published, in Chinese
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store, "--lang", "en",
                         "--out", "-")
    assert code == 0 and out == EXPECTED_EN  # asked for: English, and the study run stays zh
    assert err == "table: not published to the study run, whose table is in zh (the sweep's --lang)\n"


def test_a_zh_sweeps_table_is_chinese_before_its_first_publish(tmp_path, cli, mlflow_store):
    """The study run's language is set as the sweep makes it, not only at its first publish:
    a plain `vqlog table` in between wrote English."""
    import dataclasses

    from vqlog.study.spec import load_sweep
    from vqlog.study.storage import open_study
    from vqlog.tracking.runs import Tracker

    spec = dataclasses.replace(load_sweep("smoke"), name="zhstudy")
    uri = mlflow_store()
    study, storage = open_study(spec, f"sqlite:///{tmp_path}/optuna.db")
    Tracker(uri, lang="zh", table_dir=tmp_path / "results").start_study(study, spec)
    storage.engine.dispose()
    code, out, err = cli("table", "--study", "zhstudy", "--tracking-uri", uri, "--out", "-")
    assert (code, err) == (0, "") and out == "# zhstudy\n\n暂无已完成的试验。\n", out


def test_two_studies_without_study_is_an_error_listing_them(store, tmp_path, cli):
    code, out, err = cli("table", "--tracking-uri", store)
    assert code == 2
    assert err == f"Error: several studies in {store} (alpha, beta); choose one with --study\n"
    assert not (tmp_path / "results").exists()


def test_the_only_study_is_the_default(store, tmp_path, cli):
    client = MlflowClient(tracking_uri=store)
    client.delete_experiment(client.get_experiment_by_name("beta").experiment_id)
    code, out, err = cli("table", "--tracking-uri", store)
    assert code == 0
    assert (tmp_path / "results" / "alpha.md").read_text() == EXPECTED_EN


def test_unknown_study_is_an_error(store, tmp_path, cli):
    code, out, err = cli("table", "--study", "gamma", "--tracking-uri", store)
    assert code == 2
    assert err.startswith("Error: no MLflow experiment named 'gamma' at ") and err.count("\n") == 1
    assert " (it holds alpha, beta): check the study name" in err, err  # as Optuna's error does
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("out, message", [
    ("isdir", "--out isdir is a folder; give a file name such as isdir/table.md"),
    ("afile/t.md", "cannot write afile/t.md: {tmp}/afile is not a folder"),
    ("afile/sub/t.md", "cannot write afile/sub/t.md: {tmp}/afile is not a folder"),
    ("/proc/t.md", "cannot write /proc/t.md: /proc is not writable"),
])
def test_an_out_that_cannot_be_written_is_one_error_line_before_any_work(store, tmp_path, cli,
                                                                         out, message):
    """It was an IsADirectoryError or FileExistsError from the write, exit 1; a new folder
    (below one that can be written) is still made."""
    (tmp_path / "isdir").mkdir()
    (tmp_path / "afile").write_text("")
    code, _, err = cli("table", "--study", "alpha", "--tracking-uri", store, "--out", out)
    assert (code, err) == (2, f"Error: {message.format(tmp=tmp_path)}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "isdir", "mlflow.db"]
    code, out_, err = cli("table", "--study", "alpha", "--tracking-uri", store, "--out", "a/b/t.md")
    assert (code, out_, err) == (0, "table: a/b/t.md (2 trials)\n", "")


def test_a_default_table_file_that_cannot_be_written_is_one_error_line(store, tmp_path, cli):
    """Without --out the table goes to results/<study>.md, which was not checked: a file named
    `results` gave `Error: FileExistsError: ...`, exit 1, after the store was read."""
    (tmp_path / "results").write_text("")
    code, _, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    assert (code, err) == (2, f"Error: cannot write results/alpha.md: {tmp_path}/results is not "
                              "a folder\n")
    (tmp_path / "results").unlink()
    (tmp_path / "results" / "alpha.md").mkdir(parents=True)
    code, _, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    assert code == 2 and err.startswith("Error: --out results/alpha.md is a folder"), err


def test_missing_sqlite_store_is_an_error_and_stays_missing(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/nope.db"
    code, out, err = cli("table", "--tracking-uri", uri)
    assert code == 2
    assert err == f"Error: no MLflow store at {uri}; check --tracking-uri, or run vqlog-sweep first\n"
    assert list(tmp_path.iterdir()) == []
    # The default store, ./mlflow.db, is looked for in the working directory.
    code, out, err = cli("table")
    assert code == 2
    assert err == (f"Error: no MLflow store at sqlite:///mlflow.db; run vqlog-sweep first (here, in "
                   f"{tmp_path}) or pass --tracking-uri\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # it said "pass --tracking-uri" here too
    code, out, err = cli("table")
    assert err == (f"Error: no MLflow store at {uri}; check $MLFLOW_TRACKING_URI (the default of "
                   "--tracking-uri), or run vqlog-sweep first\n")
    code, out, err = cli("best", "--storage", f"sqlite:///{tmp_path}/other.db")
    assert err == (f"Error: no Optuna storage at sqlite:///{tmp_path}/other.db; check --storage, "
                   "or run vqlog-sweep first\n")
    code, out, err = cli("best", "--storage", "sqlite:///optuna.db")  # the default, typed out
    assert err == ("Error: no Optuna storage at sqlite:///optuna.db; check --storage, or run "
                   "vqlog-sweep first\n")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_study_means_the_only_study(store, tmp_path, cli):
    """compose passes `--study ""` when STUDY is left empty in .env."""
    client = MlflowClient(tracking_uri=store)
    client.delete_experiment(client.get_experiment_by_name("beta").experiment_id)
    code, out, err = cli("table", "--study", "", "--tracking-uri", store)
    assert (code, out, err) == (0, "table: results/alpha.md (2 trials)\n", "")


def test_config_names_the_study_as_the_sweep_does(store, tmp_path, cli):
    """With several studies in one store, --config picks the one `vqlog-sweep --config` made
    (compose's table service gets SPEC): the spec's name, unless --study is given."""
    spec = tmp_path / "beta.yaml"
    spec.write_text((Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml").read_text()
                    .replace("name: smoke", "name: beta"))
    code, out, err = cli("table", "--config", str(spec), "--study", "", "--tracking-uri", store)
    assert (code, out, err) == (0, "table: results/beta.md (1 trial)\n", "")
    code, out, err = cli("table", "--config", str(spec), "--study", "alpha", "--tracking-uri", store)
    assert (code, out) == (0, "table: results/alpha.md (2 trials)\n")
    code, out, err = cli("table", "--config", "nope", "--tracking-uri", store)
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1, err
    # with --study too: a spec that does not load was passed over, exit 0
    code, out, err = cli("table", "--config", "nope", "--study", "alpha", "--tracking-uri", store)
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1, err


def test_watch_waits_for_the_store_and_the_study(template, tmp_path, tiny):
    """--watch started before the sweep (or beside `vqlog init`) waits for the store, then for
    the study's experiment, with a line for each, and writes the table when the study is there; its
    description goes to the study run found then. (Without --watch both are errors: above.)"""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "results" / "gamma.md"
    log = tmp_path / "watch.log"
    cmd = [str(Path(sys.executable).with_name("vqlog")), "table", "--watch", "--interval", "0.2",
           "--study", "gamma", "--tracking-uri", uri]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: "waiting" in log.read_text(), 120, "the waiting line", proc)
        staged = tmp_path / "staged.db"  # the store appears whole, as a first open leaves it
        shutil.copy(template, staged)
        staged.replace(tmp_path / "mlflow.db")
        _wait_for(lambda: "waiting for the study" in log.read_text(), 60, "the store", proc)
        time.sleep(0.5)  # some checks against a store without the study
        assert proc.poll() is None and not out.exists()
        client = MlflowClient(tracking_uri=uri)
        # made whole under another name, then renamed in one step: the watcher never sees the
        # study half made (a run created but not yet logged)
        exp = client.create_experiment("staged", artifact_location=(tmp_path / "a").as_uri())
        parent = client.create_run(exp, run_name="gamma", tags={
            "vqlog.role": "study", "optuna.study": "gamma"}).info.run_id
        client.set_terminated(parent, "FINISHED")
        add_trial(client, tiny(**BASE), exp, parent, "gamma", 0, "COMPLETE", SEQ1)
        client.rename_experiment(exp, "gamma")
        _wait_for(lambda: "(1 trial)" in log.read_text(), 60, "the table", proc)
    finally:
        code = _stop(proc, signal.SIGTERM)
    lines = log.read_text().splitlines()
    assert code == 0, lines
    assert lines[:2] == [
        f"table: waiting for an MLflow store at {uri} (checking every 0.2 s; Ctrl-C to stop)",
        f"table: waiting for the study 'gamma' in {uri} (checking every 0.2 s; Ctrl-C to stop)"]
    assert lines[2:] == ["table: results/gamma.md (1 trial)"]
    assert "| Seq1 ★ | 16 | 1e-3 | 8 | 16 | 20 |" in out.read_text()
    assert client.get_run(parent).data.tags["mlflow.note.content"] == out.read_text()


def test_watch_waits_for_a_server_that_does_not_answer_yet(tmp_path, free_port, cli):
    """A table service started before its tracking server (or during its restart): without
    --watch that is an Error: line, with --watch a waiting line until Ctrl-C or SIGTERM."""
    uri = f"http://127.0.0.1:{free_port()}"
    code, out, err = cli("table", "--tracking-uri", uri)
    assert code == 2 and err.startswith(f"Error: cannot reach the MLflow server {uri}"), err
    cmd = [str(Path(sys.executable).with_name("vqlog")), "table", "--watch", "--interval", "0.2",
           "--tracking-uri", uri]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        time.sleep(3)  # tens of checks
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, output) == (0, f"table: waiting for the MLflow server {uri} "
                                            "(checking every 0.2 s; Ctrl-C to stop)\n")
    assert list(tmp_path.iterdir()) == []


def _stop(proc: subprocess.Popen, sig: int) -> int:
    """Send `sig` and return the exit code (killed, and the timeout raised, after 30 s)."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"vqlog table --watch exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_watch_ends_on_ctrl_c_and_sigterm_even_when_started_with_them_ignored(store, tmp_path, stop):
    """A background job of a script starts with SIGINT ignored, and `docker compose stop` sends
    SIGTERM: --watch ends on either, exit 0, its table whole."""
    out = tmp_path / "results" / "alpha.md"
    cmd = [str(Path(sys.executable).with_name("vqlog")), "table", "--watch", "--interval", "0.3",
           "--study", "alpha", "--tracking-uri", store]

    def ignore_both():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=ignore_both)
    try:
        _wait_for(out.is_file, 120, "the first table", proc)
        proc.send_signal(stop)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, proc.stderr.read()
    assert out.read_text() == EXPECTED_EN


def _watch_alpha(store: str, folder: Path) -> tuple[subprocess.Popen, Path]:
    """`vqlog table --watch` on study alpha, checking every 0.3 s; its output in folder/watch.log."""
    cmd = [str(Path(sys.executable).with_name("vqlog")), "table", "--watch", "--interval", "0.3",
           "--study", "alpha", "--tracking-uri", store]
    log = folder / "watch.log"
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=folder, stdout=fh, stderr=subprocess.STDOUT,
                                text=True), log


@pytest.mark.slow
def test_watch_regenerates_when_a_run_finishes(store, tmp_path, tiny):
    out = tmp_path / "results" / "alpha.md"
    proc, log = _watch_alpha(store, tmp_path)
    try:
        _wait_for(out.is_file, 120, "the first table", proc)
        assert out.read_text() == EXPECTED_EN
        client = MlflowClient(tracking_uri=store)
        exp = client.get_experiment_by_name("alpha")
        (parent,) = client.search_runs([exp.experiment_id], "tags.`vqlog.role` = 'study'")
        add_trial(client, tiny(**BASE), exp.experiment_id, parent.info.run_id, "alpha", 2, "COMPLETE",
                  {**SEQ1, "final_val_mse": 0.0305, "best_val_mse": 0.0299}, embedding_num=32)
        _wait_for(lambda: "| Seq3 ★ |" in out.read_text(), 60, "the new run in the table", proc)
    finally:
        code = _stop(proc, signal.SIGINT)  # Ctrl-C ends --watch
    text = out.read_text()
    assert "| Seq3 ★ | 16 | 1e-3 | 8 | 32 | 20 | yes | +relu | s4d-all | 0.0305 (best 0.0299), stable |" in text
    assert "| Seq1 |" in text  # no longer the best
    lines = log.read_text().splitlines()
    assert "table: results/alpha.md (2 trials)" in lines and "table: results/alpha.md (3 trials)" in lines
    assert code == 0, log.read_text()


def test_the_line_counts_the_rows_the_table_shows(store, tmp_path, cli):
    """A trial run still RUNNING has no row in the table (finished trials only), and the line's
    count leaves it out too."""
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("alpha")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`vqlog.role` = 'study'")
    run = client.create_run(exp.experiment_id, run_name="Seq3", tags={
        "mlflow.parentRunId": parent.info.run_id, "vqlog.role": "trial", "optuna.study": "alpha",
        "optuna.trial_number": "2", "optuna.state": "RUNNING"})
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    assert (code, out, err) == (0, "table: results/alpha.md (2 trials)\n", "")
    assert "| Seq3 |" not in (tmp_path / "results" / "alpha.md").read_text()
    client.set_tag(run.info.run_id, "optuna.state", "FAIL")
    client.set_terminated(run.info.run_id, "FAILED")
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    # the failed one said apart, as the sweep's count of finished trials leaves it out
    assert (code, out, err) == (0, "table: results/alpha.md (3 trials, 1 failed)\n", "")
    assert "| Seq3 |" in (tmp_path / "results" / "alpha.md").read_text()


def test_the_line_counts_a_trial_and_its_retry_as_one_row(store, tmp_path, cli, tiny):
    """A FAIL trial retried (Optuna's RetryFailedTrialCallback) is one row, its latest: the line
    said 3 trials for a table of 2."""
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("alpha")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`vqlog.role` = 'study'")
    base = tiny(**BASE)
    add_trial(client, base, exp.experiment_id, parent.info.run_id, "alpha", 2, "FAIL", {}, lr=5e-3)
    retry = add_trial(client, base, exp.experiment_id, parent.info.run_id, "alpha", 3, "COMPLETE",
                      SEQ2, lr=5e-3)
    client.set_tag(retry, "vqlog.retry_of", "2")
    code, out, err = cli("table", "--study", "alpha", "--tracking-uri", store)
    text = (tmp_path / "results" / "alpha.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| Seq")]
    assert len(rows) == 3 and "| Seq3 |" not in text and "| Seq4 |" in text, text
    assert (code, out, err) == (0, "table: results/alpha.md (3 trials)\n", "")

    # `vqlog trials` gives the retry's original as a trial number, not 2.0 (pandas made the
    # column float, as the other rows have none), and none as null
    import json

    code, out, err = cli("trials", "--study", "alpha", "--tracking-uri", store, "--format", "json")
    assert code == 0, err
    assert [(r["number"], r["retry_of"], r["resumed_at"]) for r in json.loads(out)] == [
        (0, None, None), (1, None, None), (2, None, None), (3, 2, None)]
    code, out, err = cli("trials", "--study", "alpha", "--tracking-uri", store, "--format", "csv")
    assert out.splitlines()[4].startswith("3,Seq4,COMPLETE,") and ",2,," in out.splitlines()[4]
    code, out, err = cli("trials", "--study", "alpha", "--tracking-uri", store)
    assert code == 0 and "Seq4" in out and "2.0" not in out, out + err


@pytest.mark.slow
def test_watch_says_a_line_once_when_only_a_row_changed(store, tmp_path, tiny):
    """A rewrite that leaves the counts as they were (a run's state set again by a reconcile)
    writes the table but does not print the same line twice."""
    out = tmp_path / "results" / "alpha.md"
    proc, log = _watch_alpha(store, tmp_path)
    try:
        _wait_for(out.is_file, 120, "the first table", proc)
        first = out.read_text()
        client = MlflowClient(tracking_uri=store)
        exp = client.get_experiment_by_name("alpha")
        (seq2,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'Seq2'")
        client.log_metric(seq2.info.run_id, "final_val_mse", 0.07)  # 0.09 before; still PRUNED
        client.set_terminated(seq2.info.run_id, "KILLED")  # (a new end time: a changed run)
        _wait_for(lambda: out.read_text() != first, 60, "Seq2's row rewritten", proc)
        (parent,) = client.search_runs([exp.experiment_id], "tags.`vqlog.role` = 'study'")
        add_trial(client, tiny(**BASE), exp.experiment_id, parent.info.run_id, "alpha", 2,
                  "COMPLETE", SEQ1)
        _wait_for(lambda: "| Seq3" in out.read_text(), 60, "the new run in the table", proc)
    finally:
        code = _stop(proc, signal.SIGINT)
    assert code == 0, log.read_text()
    assert log.read_text().splitlines() == ["table: results/alpha.md (2 trials)",
                                            "table: results/alpha.md (3 trials)"]


def test_ctrl_c_during_a_read_finishes_the_read_and_ends_the_watch(store, tmp_path):
    """Checking every 10 ms, --watch is often inside a database call when Ctrl-C comes: the call
    is finished, not broken off, and --watch ends with 0 and its table whole. (Broken off inside
    a fetch, SQLAlchemy printed a traceback for the cursor it could not close; that timing is
    rare, so this guards it at two moments rather than reproducing it. test_a_second_ctrl_c_...
    tests the stop itself.)"""
    out = tmp_path / "results" / "alpha.md"
    cmd = [str(Path(sys.executable).with_name("vqlog")), "table", "--watch", "--interval", "0.01",
           "--study", "alpha", "--tracking-uri", store]
    for attempt in range(2):
        out.unlink(missing_ok=True)  # this process's first table, before the signal
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            _wait_for(out.is_file, 120, "the first table", proc)
            time.sleep(0.5 + 0.37 * attempt)  # some hundred reads in
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, output
        assert "Traceback" not in output and "Interrupted" not in output, output
        assert output == "table: results/alpha.md (2 trials)\n"
        assert out.read_text() == EXPECTED_EN


def test_a_second_ctrl_c_ends_the_wait_at_once():
    """The first stop is kept for the next wait; a second one ends --watch where it is (a
    store being waited out for minutes, say)."""
    from vqlog.commands.table import _Stop

    stop = _Stop()
    start = time.monotonic()
    stop.sleep(0.05)  # no stop asked: a plain wait
    assert time.monotonic() - start >= 0.05
    stop.signal(signal.SIGINT, None)
    assert stop.asked
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stop.sleep(30)
    assert time.monotonic() - start < 5
    with pytest.raises(KeyboardInterrupt):
        stop.signal(signal.SIGINT, None)


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf"])
def test_a_watch_interval_of_zero_or_less_is_refused(store, tmp_path, interval):
    proc = subprocess.run([str(Path(sys.executable).with_name("vqlog")), "table", "--watch",
                           "--interval", interval, "--study", "alpha", "--tracking-uri", store],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: --interval must be a number of seconds above 0")
    assert len(proc.stderr.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]  # no results/
