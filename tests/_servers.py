"""Real server processes for tests and benchmarks: `mlflow server` (started directly, or by the
image's own `mlflow/start.sh`), and what starting and stopping any of them takes.

    with mlflow_server(tmp) as server:          # waits for /health
        MlflowClient(tracking_uri=server.url)
        server.requests("POST", "/runs/log-batch")   # REST calls seen in uvicorn's access log

Every server runs in its own session (process group), so stopping it also stops the uvicorn
workers that `mlflow server` spawns; nothing but that group is signalled. The benchmarks import
this module too (benchmarks/_common.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
START_SH = ROOT / "mlflow" / "start.sh"
BIN = Path(sys.executable).parent  # the venv's bin: mlflow, vqlog, vqlog-sweep, optuna-dashboard
START_TIMEOUT = 150.0  # seconds for /health; a loaded 2-core machine takes 5-25 s to migrate


_PORTS = {"next": None}


def free_port() -> int:
    """A port nothing listens on right now (bound then released), from a range of this pytest
    worker's own below the kernel's ephemeral ports (32768 and up): a server that binds it
    seconds later does not find it taken by the other worker's server, nor by the local end of
    a client's connection, which the kernel takes from the ephemeral range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0 too: a benchmark, pytest -n 0
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = 12000 // max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    first = 20000 + index * size
    if _PORTS["next"] is None:  # each process of a worker (a benchmark too) at its own offset
        _PORTS["next"] = os.getpid() % size
    for _ in range(size):
        port = first + _PORTS["next"] % size
        _PORTS["next"] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + size - 1}")


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
    """Until `url` answers 200; RuntimeError with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up after {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)


def stop_group(proc: subprocess.Popen, timeout: float = 8) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)  # uvicorn waits on clients' keep-alive connections
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # uvicorn workers, if the parent went first
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Server:
    url: str
    port: int
    log: Path
    proc: subprocess.Popen
    artifacts: Path | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def requests(self, method: str, path_suffix: str) -> int:
        """How many `METHOD .../path_suffix` requests the server has answered (its access log)."""
        pattern = re.compile(rf'"{method} \S*{re.escape(path_suffix)}(\?\S*)? HTTP/1\.[01]"')
        return len(pattern.findall(self.log_text()))


@contextlib.contextmanager
def serve(cmd: Sequence[str], folder: Path, port: int, env: dict | None = None,
          cwd: Path | None = None, artifacts: Path | None = None) -> Iterator[Server]:
    """Start `cmd` (a server that will listen on 127.0.0.1:`port`) in its own process group,
    yield once its /health answers, stop the group afterwards. Its output goes to a log in
    `folder`, appended to when the same port is started again. `env` replaces the environment."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"server-{port}.log"
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd or folder, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, " ".join(map(str, cmd[:2])))
        yield Server(url, port, log, proc, artifacts)
    finally:
        stop_group(proc)


@contextlib.contextmanager
def mlflow_server(folder: Path, backend_uri: str | None = None, extra: Sequence[str] = (),
                  cwd: Path | None = None, port: int | None = None) -> Iterator[Server]:
    """`mlflow server` on a free 127.0.0.1 port.

    Default: `--backend-store-uri sqlite:///<folder>/mlflow.db --artifacts-destination
    <folder>/artifacts --serve-artifacts`. `backend_uri` replaces all of that (e.g. the embedded
    store `sqlite:///mlflow.db` with `cwd` the sweep's folder, as a user's `mlflow ui` would run).
    `port`: a given port, e.g. to start the same server again after stopping it.
    """
    port = port or free_port()
    if backend_uri is None:
        store = ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"]
    else:
        store = ["--backend-store-uri", backend_uri]
    cmd = [str(BIN / "mlflow"), "server", *store, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", *extra]
    with serve(cmd, folder, port, cwd=cwd, artifacts=folder / "artifacts") as server:
        yield server


@contextlib.contextmanager
def mlflow_via_start_sh(folder: Path, env: dict[str, str]) -> Iterator[Server]:
    """`mlflow/start.sh` on a free port, with `env` as the compose file would give it (the
    database settings); MLFLOW_HOST, MLFLOW_PORT and MLFLOW_ARTIFACTS_DESTINATION are set here."""
    port = free_port()
    artifacts = folder / "artifacts"
    env = {**env, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts)}
    with serve(["sh", str(START_SH)], folder, port, env=env, artifacts=artifacts) as server:
        yield server
