"""`mlflow/start.sh` with MLFLOW_AUTH=basic: MLflow's basic-auth app, which refuses to start without
an admin password and a secret key, answers 401 to anonymous reads and writes, and serves the
clients vqlog uses when they carry credentials. The password reaches no argument, file or log."""

import base64
import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from _servers import START_SH, mlflow_via_start_sh
from _stack import ADMIN_URL, base_env, throwaway_databases

pytestmark = pytest.mark.slow
PASSWORD = "pw-" + secrets.token_urlsafe(18)
DB_PASSWORD = "db@pw%" + secrets.token_urlsafe(12)  # an @ and a % that the URL must encode
SECRET_KEY = secrets.token_hex(16)
AUTH = {"MLFLOW_AUTH": "basic", "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": SECRET_KEY}


def _start_sh(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """start.sh with a backend nobody listens on: a refusal must come before MLflow starts."""
    return subprocess.run(["sh", str(START_SH)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=base_env(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT="1",
                                                   MLFLOW_PORT="1", **env))


@pytest.mark.parametrize("drop, named", [
    (("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"),
     "MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY"),
    (("MLFLOW_FLASK_SERVER_SECRET_KEY",), "needs MLFLOW_FLASK_SERVER_SECRET_KEY in"),
    (("MLFLOW_AUTH_ADMIN_PASSWORD",), "needs MLFLOW_AUTH_ADMIN_PASSWORD in"),
])
def test_basic_auth_refuses_to_start_without_its_secrets(drop, named, tmp_path):
    env = {k: v for k, v in AUTH.items() if k not in drop}
    out = _start_sh(env, tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("Error: MLFLOW_AUTH=basic needs ") and named in out.stderr
    assert out.stdout == ""  # nothing started
    assert PASSWORD not in out.stdout + out.stderr


def test_an_empty_secret_counts_as_missing(tmp_path):
    out = _start_sh({**AUTH, "MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, tmp_path)
    assert out.returncode == 2 and "MLFLOW_FLASK_SERVER_SECRET_KEY" in out.stderr


def test_a_short_admin_password_is_refused(tmp_path):
    out = _start_sh({**AUTH, "MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw"}, tmp_path)
    assert out.returncode == 2
    assert "at least 12 characters" in out.stderr and "short-pw" not in out.stderr


def test_without_the_environments_mlflow_it_says_to_activate_it(tmp_path):
    """Run from a shell without the environment, it ended in `exec: mlflow: not found`, 127."""
    out = subprocess.run(["sh", str(START_SH)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**base_env(), "PATH": "/usr/bin:/bin"})
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("Error: the mlflow command is not on PATH; activate the environment "
                          "vqlog is installed in (. .venv/bin/activate)\n")


def test_an_unknown_auth_mode_is_refused(tmp_path):
    out = _start_sh({"MLFLOW_AUTH": "digest"}, tmp_path)
    assert out.returncode == 2
    assert out.stderr == "Error: MLFLOW_AUTH must be none or basic, got 'digest'\n"


# ------------------------------------------------------------------------ a running auth server


def backend_uri_with_password(database: str) -> tuple[str, str]:
    """A full MLFLOW_BACKEND_STORE_URI with a password in it (percent-encoded), and the
    password: the server's own where it needs one, else one it takes (trust auth)."""
    from sqlalchemy.engine import make_url

    admin = make_url(ADMIN_URL)
    password = admin.password or DB_PASSWORD
    return (f"postgresql+psycopg2://{admin.username or 'postgres'}:{quote(password, safe='')}@"
            f"{admin.host or '127.0.0.1'}:{admin.port or 5432}/{database}", password)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """start.sh with a full backend URL that holds a password (the users and permissions go to
    the same database)."""
    folder = tmp_path_factory.mktemp("auth")
    with throwaway_databases("mlflow") as dbs:
        uri, password = backend_uri_with_password(dbs["mlflow"])
        env = base_env(MLFLOW_BACKEND_STORE_URI=uri, MLFLOW_AUTH_CONFIG_DIR=str(folder / "conf"),
                       **AUTH)
        env.pop("PGPASSWORD", None)
        with mlflow_via_start_sh(folder, env) as srv:
            srv.db_password = password
            yield srv


def _call(server, method: str, path: str, body: dict | None = None, user: str | None = None,
          password: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{server.url}/api/2.0/mlflow/{path}", data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


READS = [("GET", "experiments/search?max_results=10", None),
         ("GET", "experiments/get-by-name?experiment_name=Default", None),
         ("GET", "runs/get?run_id=0123456789abcdef", None)]
WRITES = [("POST", "experiments/create", {"name": "anonymous"}),
          ("POST", "runs/create", {"experiment_id": "0"}),
          ("POST", "runs/log-batch", {"run_id": "0123456789abcdef", "metrics": []})]


def test_health_stays_open_for_the_healthcheck(server):
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("method, path, body", READS + WRITES)
def test_anonymous_reads_and_writes_get_401(server, method, path, body):
    assert _call(server, method, path, body)[0] == 401


@pytest.mark.parametrize("method, path, body", READS[:1] + WRITES[:1])
def test_a_wrong_password_gets_401(server, method, path, body):
    assert _call(server, method, path, body, user="admin", password=PASSWORD + "x")[0] == 401


def test_the_admin_reads_and_writes(server):
    code, created = _call(server, "POST", "experiments/create", {"name": "with-auth"},
                          user="admin", password=PASSWORD)
    assert code == 200
    code, found = _call(server, "GET", "experiments/search?max_results=100", user="admin",
                        password=PASSWORD)
    assert code == 200
    assert created["experiment_id"] in [e["experiment_id"] for e in found["experiments"]]


def test_init_and_the_tracker_work_with_credentials_from_the_environment(server, monkeypatch,
                                                                        tmp_path, cli):
    """What the compose services do: MLFLOW_TRACKING_USERNAME/PASSWORD in their environment."""
    from mlflow.tracking import MlflowClient

    from vqlog.tracking.runs import study_run

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    rc, out, err = cli("init", "--config", "smoke", "--storage",
                       f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", server.url)
    assert rc == 0, err
    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(study_run(client, "smoke"))
    assert run.data.tags["vqlog.role"] == "study" and run.info.status == "FINISHED"
    assert f"study run {run.info.run_id}" in out
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(Exception, match="401|nauthorized|credentials"):
        MlflowClient(tracking_uri=server.url).search_experiments()


@pytest.mark.parametrize("login, says", [
    (None, "needs a login it accepts: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ("wrong", "needs a login it accepts"),
    ("host", "refuses the host name 127.1:"),
])
def test_a_refused_login_or_host_is_one_error_line_before_the_study(server, monkeypatch, tmp_path,
                                                                    cli, login, says):
    """/health answers without a login and whatever the Host header; the API does not. A sweep
    without credentials, with a wrong password, or through a host name the server does not allow
    (its DNS-rebinding guard) ended in MLflow's exception, exit 1, after creating the study."""
    url = server.url
    if login == "wrong":
        url = url.replace("http://", f"http://admin:{PASSWORD}x@")
    if login == "host":
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        url = url.replace("127.0.0.1", "127.1")  # the same address, a name start.sh does not allow
    monkeypatch.chdir(tmp_path)
    code, out, err = cli.sweep("--config", "smoke", "--trials", "1", "--study", f"refused-{login}",
                               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                               "--tracking-uri", url)
    assert (code, out) == (2, ""), err
    assert err.startswith("Error: the MLflow server ") and says in err and err.count("\n") == 1, err
    assert PASSWORD not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no study, no lock, no table


def test_a_sweep_through_basic_auth_deletes_its_finished_checkpoints(server, monkeypatch,
                                                                    tmp_path, cli):
    """The compose workers' setting: a COMPLETE trial's checkpoint goes by an authenticated
    DELETE through the server's proxied artifacts; its weights stay, and nothing is warned."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli.sweep("--config", "smoke", "--trials", "1", "--study", "auth-ckpt",
                               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                               "--tracking-uri", server.url)
    assert code == 0, err
    assert "checkpoint" not in err, err
    client = MlflowClient(tracking_uri=server.url)
    exp = client.get_experiment_by_name("auth-ckpt")
    (run,) = client.search_runs([exp.experiment_id], "tags.`vqlog.role` = 'trial'")
    assert run.data.tags["optuna.state"] == "COMPLETE"
    assert run.data.metrics["iterations_run"] >= 10  # it took checkpoints on the way
    assert client.list_artifacts(run.info.run_id, "checkpoint") == []
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]


def test_a_url_password_that_pgpassword_cannot_take_stays_in_the_private_file(tmp_path):
    """PGPASSWORD already holds another password (the backend's, from POSTGRES_PASSWORD): the
    auth database's URL keeps its own, in the file only the server's user reads, and the script
    says so without the URL."""
    import configparser

    with throwaway_databases("mlflow") as dbs:
        uri, password = backend_uri_with_password(dbs["mlflow"])
        env = base_env(MLFLOW_BACKEND_STORE_URI=uri, MLFLOW_AUTH_CONFIG_DIR=str(tmp_path / "conf"),
                       PGPASSWORD=password + "-other", **AUTH)
        with mlflow_via_start_sh(tmp_path, env) as srv:
            assert _call(srv, "GET", READS[0][1], user="admin", password=PASSWORD)[0] == 200
            log = srv.log_text()
    conf = tmp_path / "conf" / "basic_auth.ini"
    assert (conf.stat().st_mode & 0o777) == 0o600
    ini = configparser.ConfigParser()
    ini.read(conf)
    assert ini["mlflow"]["database_uri"] == uri
    assert (f"start.sh: the auth database URL keeps its password, in {conf} (mode 600): "
            "PGPASSWORD (POSTGRES_PASSWORD) holds another password") in log
    assert password not in log and quote(password, safe="") not in log


def test_the_password_is_in_no_argument_file_or_log(server):
    conf = Path(server.log).parent / "conf" / "basic_auth.ini"
    assert conf.is_file() and (conf.stat().st_mode & 0o777) == 0o600
    assert "admin_username = admin" in conf.read_text()
    assert PASSWORD not in conf.read_text()
    # nor the database's: libpq takes it from PGPASSWORD (configparser reads no environment)
    import configparser

    ini = configparser.ConfigParser()  # as MLflow reads it ('%%' is '%')
    ini.read(conf)
    database_uri = ini["mlflow"]["database_uri"]
    encoded = quote(server.db_password, safe="")
    assert database_uri.startswith("postgresql+psycopg2://") and "@127.0.0.1" in database_uri
    assert server.db_password not in database_uri and encoded not in database_uri
    assert ":" not in database_uri.split("//")[1].split("@")[0], database_uri  # no password
    assert PASSWORD not in server.log_text() and SECRET_KEY not in server.log_text()
    pgid = os.getpgid(server.proc.pid)
    seen = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        seen += 1
        assert PASSWORD not in cmdline and SECRET_KEY not in cmdline
        assert server.db_password not in cmdline and encoded not in cmdline
    assert seen >= 2  # mlflow server and its uvicorn workers
    environ = (Path("/proc") / str(server.proc.pid) / "environ").read_bytes().split(b"\0")
    assert f"PGPASSWORD={server.db_password}".encode() in environ


@pytest.mark.parametrize("uri, shown", [
    ("postgresql+psycopg2://someone:db-secret-pw@127.0.0.1:1/nowhere",
     "postgresql+psycopg2://someone:***@127.0.0.1:1/nowhere,"),
    # an unescaped @ in the password: libpq reads up to the last @, and so does the mask
    ("postgresql+psycopg2://someone:db@secret-pw@127.0.0.1:1/nowhere",
     "postgresql+psycopg2://someone:***@127.0.0.1:1/nowhere,"),
    ("postgresql+psycopg2://someone@127.0.0.1:1/nowhere?password=db-secret-pw&sslmode=disable",
     "postgresql+psycopg2://someone@127.0.0.1:1/nowhere?password=***&sslmode=disable,"),
], ids=["userinfo", "at-sign", "query"])
def test_start_sh_never_prints_a_database_password(tmp_path, uri, shown):
    """A full backend URI with a password is shown masked (it stays in the environment)."""
    proc = subprocess.Popen(["sh", str(START_SH)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=base_env(MLFLOW_BACKEND_STORE_URI=uri, MLFLOW_PORT="1"))
    try:
        first = proc.stdout.readline()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    assert first.startswith("mlflow server on 127.0.0.1:1: backend " + shown), first
    assert "secret-pw" not in first


def test_a_reader_gets_the_table_file_and_a_line_that_it_was_not_published(server, monkeypatch,
                                                                           tmp_path, cli):
    """A user the server lets read, not edit (MLflow's default permission for a new user): the
    table used to be written, then `vqlog table` ended with MLflow's 403 as an Error, exit 1."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    rc, _, err = cli("init", "--config", "smoke", "--study", "read-only", "--storage",
                     f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", server.url)
    assert rc == 0, err
    reader_pw = "rd-" + secrets.token_urlsafe(12)
    code, _ = _call(server, "POST", "users/create", {"username": "reader", "password": reader_pw},
                    user="admin", password=PASSWORD)
    assert code == 200
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader_pw)
    out_file = tmp_path / "table.md"
    rc, out, err = cli("table", "--study", "read-only", "--tracking-uri", server.url,
                       "--out", str(out_file))
    assert rc == 0, out + err
    assert "read-only" in out_file.read_text()  # the table, titled with the study
    assert f"table: {out_file} (0 trials)" in out
    assert "not published to the study run" in err and "may not edit" in err, err
    assert reader_pw not in out + err and PASSWORD not in out + err

    # A sweep as the reader: its first trial failed on creating its run (a FAIL trial in the
    # study) and it ended with MLflow's 403, exit 1.
    import optuna

    (tmp_path / "sweep").mkdir()
    monkeypatch.chdir(tmp_path / "sweep")
    code, out, err = cli.sweep("--config", "smoke", "--trials", "1", "--study", "read-only",
                               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                               "--tracking-uri", server.url)
    assert (code, out) == (2, ""), err
    assert err.startswith("Error: this user may read MLflow experiment 'read-only' on ") \
        and "ask the server's admin for EDIT permission" in err and err.count("\n") == 1, err
    study = optuna.load_study(study_name="read-only", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.trials == []
    assert list((tmp_path / "sweep").iterdir()) == []

    # A user with no permission on the experiment: reading it was MLflow's 403, exit 1.
    stranger_pw = "st-" + secrets.token_urlsafe(12)
    code, _ = _call(server, "POST", "users/create", {"username": "stranger", "password": stranger_pw},
                    user="admin", password=PASSWORD)
    assert code == 200
    code, found = _call(server, "GET", "experiments/get-by-name?experiment_name=read-only",
                        user="admin", password=PASSWORD)
    grant = urllib.request.Request(
        f"{server.url}/api/3.0/mlflow/users/permissions/grant", method="POST",
        data=json.dumps({"username": "stranger", "resource_type": "experiment",
                         "resource_id": found["experiment"]["experiment_id"],
                         "permission": "DENY"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(
            f"admin:{PASSWORD}".encode()).decode()})
    with urllib.request.urlopen(grant, timeout=30) as resp:
        assert resp.status == 200
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "stranger")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stranger_pw)
    code, out, err = cli.sweep("--config", "smoke", "--trials", "1", "--study", "read-only",
                               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                               "--tracking-uri", server.url)
    assert (code, out) == (2, ""), err
    assert err.startswith("Error: this user may not read MLflow experiment 'read-only' on "), err
    assert err.count("\n") == 1 and stranger_pw not in err
    assert optuna.load_study(study_name="read-only",
                             storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials == []
