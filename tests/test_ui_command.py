"""`vqlog ui`: the README's way to look at a sweep. A real `mlflow ui` process, started by the
command in the sweep's folder on its embedded store, answers with the study's experiment, its
runs' curves and their artifacts."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from _servers import BIN, free_port, serve

pytestmark = pytest.mark.slow


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - the test's own server
        return resp.read()


def test_vqlog_ui_serves_the_folders_store_its_curves_and_artifacts(tmp_path, mlflow_store):
    uri = mlflow_store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "demo", artifact_location=(tmp_path / "mlartifacts" / "demo").as_uri())
    run = client.create_run(experiment).info.run_id
    for step, value in enumerate((0.5, 0.25, 0.125), start=1):
        client.log_metric(run, "val/mse", value, step=step)
    (tmp_path / "notes.txt").write_text("peaks and troughs\n")
    client.log_artifact(run, str(tmp_path / "notes.txt"))
    client.set_terminated(run)

    port = free_port()
    # MLflow's own variable for the hosts it answers: more hosts, as --allowed-hosts adds
    env = {**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": "proxy.example"}
    with serve([str(BIN / "vqlog"), "ui", "--port", str(port)], tmp_path / "ui", port,
               cwd=tmp_path, env=env) as server:
        api = f"{server.url}/api/2.0/mlflow"
        hosts = [status_with_host(f"{api}/experiments/search?max_results=1", host)
                 for host in (f"127.0.0.1:{port}", "proxy.example", "elsewhere.example")]
        found = json.loads(get(f"{api}/experiments/get-by-name?experiment_name=demo"))
        history = json.loads(get(f"{api}/metrics/get-history?"
                                 + urllib.parse.urlencode({"run_id": run, "metric_key": "val/mse"})))
        artifact = get(f"{server.url}/get-artifact?"
                       + urllib.parse.urlencode({"path": "notes.txt", "run_uuid": run}))
        page = get(server.url + "/")
        log = server.log_text()
    assert hosts == [200, 200, 403]
    assert found["experiment"]["experiment_id"] == experiment
    assert [(m["step"], m["value"]) for m in history["metrics"]] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert artifact == b"peaks and troughs\n"
    assert b"<html" in page.lower()
    assert f"MLflow UI on http://127.0.0.1:{port}" in log
    # nor a line per uvicorn worker's start, nor Starlette's deprecation warning once per worker
    assert "INFO:" not in log and "DeprecationWarning" not in log, log
    # nor MLflow's lines on the registry store and on --cors-allowed-origins, a flag vqlog ui has
    # no need of
    assert "Registry store URI" not in log and "cors" not in log.lower(), log
    # the embedded store was opened where the user stands, and nothing was created beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "mlflow.db", "notes.txt", "ui"]


def status_with_host(url: str, host: str) -> int:
    """The HTTP status of GET `url` sent with the Host header a browser on another machine sends."""
    import urllib.error

    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - the test's own
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def interface_addresses() -> list[str]:
    import socket

    import psutil

    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def test_every_interface_answers_this_machines_name_and_allowed_hosts_adds_more(tmp_path, mlflow_store):
    """`--host 0.0.0.0` is for other machines, whose browsers send this machine's name or one of
    its addresses as the Host header: MLflow's default guard refused them with 403.
    `--allowed-hosts` adds a name it cannot know (a DNS alias) to those, not in their place.
    One UI serves every check: each start of one takes a good part of a minute here."""
    import socket

    mlflow_store(tmp_path)
    name = socket.gethostname()
    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    port = free_port()
    with serve([str(BIN / "vqlog"), "ui", "--host", "0.0.0.0", "--port", str(port),
                "--allowed-hosts", "labbox.example:*"], tmp_path / "ui", port, cwd=tmp_path) as server:
        by_name = status_with_host(server.url + api, f"{name}:{port}")
        lower = status_with_host(server.url + api, f"{name.lower()}:{port}")  # as browsers send it
        # an address of one of this machine's interfaces, public ones too (not only private)
        by_address = [status_with_host(server.url + api, f"{address}:{port}")
                      for address in interface_addresses()]
        local = status_with_host(server.url + api, f"127.0.0.1:{port}")
        alias = status_with_host(server.url + api, f"labbox.example:{port}")
        other = status_with_host(server.url + api, f"elsewhere.example:{port}")
        log = server.log_text()
    assert (by_name, lower, local, alias, other) == (200, 200, 200, 200, 403)
    assert set(by_address) <= {200}
    assert f"MLflow UI on http://127.0.0.1:{port}, or http://{name}:{port} from another machine" in log


def test_a_tracking_server_is_pointed_to_not_opened_as_a_store(tmp_path, mlflow_server):
    """`mlflow ui` cannot take a server as its store (it ended in a 28-line traceback, exit 1):
    the server serves its own UI, and `vqlog ui` says where, without the password."""
    import subprocess

    with mlflow_server(tmp_path / "server") as server:
        uri = server.url.replace("http://", "http://alice:s3cret@")
        proc = subprocess.run([str(BIN / "vqlog"), "ui", "--tracking-uri", uri], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"The MLflow server serves its own UI: {server.url}\n"
    assert proc.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server"]  # no store was created here


def test_a_database_stores_password_stays_off_the_command_lines(tmp_path, monkeypatch):
    """`ps` shows every user the command lines: the store's URI, password and all, went there as
    `mlflow ui --backend-store-uri ...`, even when it came from $MLFLOW_TRACKING_URI."""
    from pathlib import Path

    import psutil

    from _stack import pg_url, throwaway_databases

    secret = "ui-secret-pw"  # the machine's PostgreSQL trusts 127.0.0.1: any password opens it
    with throwaway_databases("mlflow") as dbs:
        uri = pg_url(dbs["mlflow"]).replace("@", f":{secret}@", 1)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        port = free_port()
        with serve([str(BIN / "vqlog"), "ui", "--port", str(port)], tmp_path / "ui", port,
                   cwd=tmp_path) as server:
            found = json.loads(get(f"{server.url}/api/2.0/mlflow/experiments/get-by-name?"
                                   "experiment_name=Default"))
            top = psutil.Process(server.proc.pid)  # vqlog ui, mlflow ui and uvicorn under it
            lines = []
            for proc in [top, *top.children(recursive=True)]:
                try:
                    lines.append((Path("/proc") / str(proc.pid) / "cmdline").read_bytes()
                                 .replace(b"\0", b" ").decode())
                except OSError:
                    pass  # ended meanwhile
            log = server.log_text()
    assert found["experiment"]["name"] == "Default"  # the UI opened that store
    assert len(lines) >= 2 and any("mlflow" in line for line in lines), lines
    assert not [line for line in lines if secret in line], lines
    assert secret not in log


def test_a_ctrl_c_stops_the_ui_once_with_no_traceback_and_leaves_no_process(tmp_path,
                                                                           mlflow_store):
    """Ctrl-C, as a terminal sends it to the whole foreground process group, while an open UI's
    requests are in flight: `mlflow ui` passes the SIGINT on to its uvicorn server, which then
    got it twice, and its second signal, a forced exit, printed the tracebacks of the requests
    it cut off (CancelledError, "Exception in ASGI application"). Now the UI gets it once and
    stops cleanly, exit 0; nothing of it is left. Killed outright (SIGKILL, which leaves no word
    to pass on), `vqlog ui` takes the server with it."""
    import signal
    import threading
    import urllib.error

    import psutil

    mlflow_store(tmp_path)
    for how in ("ctrl-c", "kill"):
        port = free_port()
        with serve([str(BIN / "vqlog"), "ui", "--port", str(port)], tmp_path / how, port,
                   cwd=tmp_path) as server:
            spawned = psutil.Process(server.proc.pid).children(recursive=True)
            assert spawned, "no mlflow process under vqlog ui"
            done = threading.Event()

            def poll() -> None:  # as an open UI does, several requests at a time
                while not done.is_set():
                    try:
                        get(f"{server.url}/ajax-api/2.0/mlflow/experiments/search?max_results=5")
                    except (urllib.error.URLError, OSError):
                        return

            pollers = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
            for t in pollers:
                t.start()
            try:
                if how == "ctrl-c":
                    os.killpg(server.proc.pid, signal.SIGINT)
                    assert server.proc.wait(60) == 0, server.log_text()
                else:
                    server.proc.kill()
                    server.proc.wait(60)
            finally:
                done.set()
            _, alive = psutil.wait_procs(spawned, timeout=60)
            assert not alive, f"left running: {alive}"
            log = server.log_text()
        assert "Traceback" not in log and "ERROR" not in log, log


def test_a_ui_started_with_nohup_outlives_a_hangup(tmp_path, mlflow_store):
    """`nohup vqlog ui &`: SIGHUP is ignored, and stays so (vqlog ui's own handler for it
    stopped the UI at a logout); SIGTERM still stops it."""
    import signal
    import subprocess

    mlflow_store(tmp_path)
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "vqlog"), "ui", "--port", str(port)], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        from _servers import wait_http

        wait_http(f"http://127.0.0.1:{port}/health", proc, log, "vqlog ui")
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(3)
        assert get(f"http://127.0.0.1:{port}/health") == b"OK"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
