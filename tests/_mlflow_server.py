"""A real `mlflow server` process for tests: SQLite backend and proxied artifacts under a folder.

    with mlflow_server(tmp) as server:      # waits for /health
        MlflowClient(tracking_uri=server.url)
        server.requests("POST", "/runs/log-batch")   # REST calls seen in uvicorn's access log

The server runs in its own session (process group), so stopping it also stops the uvicorn worker
that `mlflow server` spawns; nothing but that group is signalled.
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
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT = 120.0  # seconds; a loaded 2-core CI box takes 5-20 s to import and migrate


def free_port() -> int:
    """A port nothing listens on right now (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    log: Path
    proc: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def requests(self, method: str, path_suffix: str) -> int:
        """How many `METHOD .../path_suffix` requests the server has answered (its access log)."""
        pattern = re.compile(rf'"{method} \S*{re.escape(path_suffix)}(\?\S*)? HTTP/1\.[01]"')
        return len(pattern.findall(self.log_text()))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(folder: Path, backend_uri: str | None = None, extra: Sequence[str] = (),
                  cwd: Path | None = None, port: int | None = None) -> Iterator[Server]:
    """Start `mlflow server` on a free 127.0.0.1 port, yield it once /health answers, stop it.

    Default: `--backend-store-uri sqlite:///<folder>/mlflow.db --artifacts-destination
    <folder>/artifacts --serve-artifacts`. `backend_uri` replaces all of that (e.g. the embedded
    store `sqlite:///mlflow.db` with `cwd` the sweep's folder, as a user's `mlflow ui` would run).
    `port`: a given port, e.g. to start the same server again after stopping it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    if backend_uri is None:
        store = ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"]
    else:
        store = ["--backend-store-uri", backend_uri]
    cmd = [str(MLFLOW), "server", *store, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", *extra]
    log = folder / f"mlflow-server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:  # a restart on the same port appends
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or folder,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {START_TIMEOUT:.0f} s:\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Server(url, log, proc)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group, SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # uvicorn waits on clients' keep-alive connections
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # the uvicorn child, if the parent went first
        os.killpg(proc.pid, signal.SIGKILL)
