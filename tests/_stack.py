"""The compose stack's topology, run natively: throw-away PostgreSQL databases on the machine's
server, the MLflow server started by the image's own `mlflow/start.sh`, `python -m vqlog.stackinit`
(the compose `init` service) and `vqlog-sweep` worker processes.

    with mlflow_via_start_sh(folder, mlflow_db) as server: ...      # one server
    stack = shared_stack.acquire(tmp_path_factory) ... release()    # the populated stack

The populated stack is expensive (a server and two sweep workers), so test_stack.py and
test_browser.py share one per session: `acquire` starts it on first use, the last `release` stops it.
Every process runs in its own session (process group); only those groups are signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
START_SH = ROOT / "mlflow" / "start.sh"
BIN = Path(sys.executable).parent  # the venv's bin: mlflow, vqlog, vqlog-sweep, optuna-dashboard
# The admin URL of the machine's PostgreSQL, as in test_postgres.py (VQLOG_TEST_POSTGRES overrides).
ADMIN_URL = os.environ.get("VQLOG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
START_TIMEOUT = 150.0  # seconds for /health; 20-25 s measured on a loaded 2-core machine
SWEEP_TIMEOUT = 300.0
STACK_TRIALS = 3


def skip_or_fail(reason: str) -> None:
    """Skip where the machine lacks a service; in CI (env CI set) the same is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg() -> dict:
    from sqlalchemy.engine import make_url

    url = make_url(ADMIN_URL)
    return {"host": url.host or "127.0.0.1", "port": url.port or 5432,
            "user": url.username or "postgres", "password": url.password}


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment with the venv's scripts first on PATH (and, as in the
    compose file, any database password for libpq in PGPASSWORD rather than in URLs)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if _pg()["password"]:
        env["PGPASSWORD"] = _pg()["password"]
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_AUTH", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        env.pop(key, None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ PostgreSQL


def _admin_connect():
    import psycopg2

    return psycopg2.connect(ADMIN_URL, connect_timeout=5)


def require_postgres() -> None:
    try:
        _admin_connect().close()
    except Exception as exc:  # noqa: BLE001 - any connection problem means "no server here"
        pg = _pg()
        skip_or_fail(f"no PostgreSQL at {pg['user']}@{pg['host']}:{pg['port']} "
                     f"({' '.join(str(exc).split())[:200]})")


@contextlib.contextmanager
def throwaway_databases(*roles: str) -> Iterator[dict[str, str]]:
    """Fresh databases, one per role (e.g. 'mlflow', 'optuna'); dropped afterwards."""
    require_postgres()
    tag = uuid.uuid4().hex[:10]
    names = {role: f"vqlog_test_{tag}_{role}" for role in roles}
    conn = _admin_connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f'CREATE DATABASE "{name}"')
        yield names
    finally:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def pg_url(database: str) -> str:
    """A password-free URL, as in the compose file: libpq takes the password from PGPASSWORD."""
    pg = _pg()
    return f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/{database}"


# ------------------------------------------------------------------------------ processes


def stop_group(proc: subprocess.Popen, timeout: float = 8) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # uvicorn workers, if the parent went first
        os.killpg(proc.pid, signal.SIGKILL)


def http_status(url: str, timeout: float = 3) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str,
              timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up after {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


@dataclass
class Server:
    url: str
    port: int
    log: Path
    proc: subprocess.Popen
    artifacts: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_sh_env(mlflow_db: str, port: int, artifacts: Path, **extra: str) -> dict[str, str]:
    """The environment the compose file gives the mlflow service, pointed at this machine."""
    pg = _pg()
    env = base_env(POSTGRES_HOST=pg["host"], POSTGRES_PORT=str(pg["port"]),
                   POSTGRES_USER=pg["user"], MLFLOW_DB=mlflow_db, MLFLOW_HOST="127.0.0.1",
                   MLFLOW_PORT=str(port), MLFLOW_ARTIFACTS_DESTINATION=str(artifacts), **extra)
    env.pop("PGPASSWORD", None)  # start.sh takes POSTGRES_PASSWORD, as the compose file gives it
    if pg["password"]:
        env["POSTGRES_PASSWORD"] = pg["password"]
    return env


@contextlib.contextmanager
def mlflow_via_start_sh(folder: Path, mlflow_db: str, **extra_env: str) -> Iterator[Server]:
    """`mlflow/start.sh` on a free port; yields once /health answers; stops its process group."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = folder / "artifacts"
    log = folder / f"mlflow-{port}.log"
    env = start_sh_env(mlflow_db, port, artifacts, **extra_env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", str(START_SH)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=folder, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, "mlflow/start.sh")
        yield Server(url, port, log, proc, artifacts)
    finally:
        stop_group(proc)


# ------------------------------------------------------------------------ the populated stack


@dataclass
class Stack:
    server: Server
    storage: str  # Optuna storage URL
    study: str
    folder: Path
    init_output: str
    worker_outputs: list[str] = field(default_factory=list)
    worker_codes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url


class _Shared:
    """One populated stack per session, shared by the modules that need it."""

    def __init__(self) -> None:
        self.stack: Stack | None = None
        self.users = 0
        self._exit: contextlib.ExitStack | None = None

    def acquire(self, tmp_path_factory) -> Stack:
        if self.stack is None:
            require_postgres()
            if _pg()["password"]:  # the tests' own clients use the same password-free URLs
                os.environ.setdefault("PGPASSWORD", _pg()["password"])
            folder = tmp_path_factory.mktemp("stack")
            exit_stack = contextlib.ExitStack()
            try:
                dbs = exit_stack.enter_context(throwaway_databases("mlflow", "optuna"))
                server = exit_stack.enter_context(mlflow_via_start_sh(folder / "mlflow", dbs["mlflow"]))
                self.stack = _populate(server, pg_url(dbs["optuna"]), folder)
            except BaseException:
                exit_stack.close()
                raise
            self._exit = exit_stack
        self.users += 1
        return self.stack

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self._exit is not None:
            self._exit.close()
            self._exit, self.stack = None, None


shared_stack = _Shared()


def _populate(server: Server, storage: str, folder: Path) -> Stack:
    """The compose stack's order: init once, then two workers at the same time."""
    study = f"stack-{uuid.uuid4().hex[:6]}"
    common = ["--config", "smoke", "--study", study, "--storage", storage,
              "--tracking-uri", server.url]
    env = base_env()
    init = subprocess.run([sys.executable, "-m", "vqlog.stackinit", *common], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=180)
    if init.returncode != 0:
        raise RuntimeError(f"vqlog.stackinit failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
    stack = Stack(server, storage, study, folder, init.stdout + init.stderr)
    procs, logs = [], []
    for i in range(2):
        wdir = folder / f"worker{i}"  # each worker writes its own results/<study>.md
        wdir.mkdir()
        log = wdir / "out.log"
        logs.append(log)
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [str(BIN / "vqlog-sweep"), "--trials", str(STACK_TRIALS), *common, "--seed", str(i)],
                cwd=wdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + SWEEP_TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            stop_group(proc, timeout=10)
        raise RuntimeError("sweep workers did not finish in time:\n"
                           + "\n".join(log.read_text()[-2000:] for log in logs)) from None
    stack.worker_codes = [p.returncode for p in procs]
    stack.worker_outputs = [log.read_text(errors="replace") for log in logs]
    return stack


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None
