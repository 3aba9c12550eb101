"""`vqlog ui` with a port it cannot listen on: the real command, as a user runs it, stops before
`mlflow ui` starts with one `Error:` line on stderr and exit 2, and touches nothing: no store is
created, an existing one is left as it was. (It used to print the UI's address, then uvicorn's
traceback or "ERROR: [Errno 98] Address already in use", and exit 0.)

No server starts here; tests/test_ui_command.py starts one on a free port."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

VQLOG = Path(sys.executable).parent / "vqlog"


def ui(folder: Path, *flags: str) -> subprocess.CompletedProcess:
    """`vqlog ui` on the embedded store in `folder` (which may not exist yet). It should fail in
    its first second; a UI that starts after all is stopped with its whole process group (the
    uvicorn workers and job consumers `mlflow ui` spawns), and the test fails."""
    argv = [str(VQLOG), "ui", "--tracking-uri", f"sqlite:///{folder}/mlflow.db", *flags]
    proc = subprocess.Popen(argv, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"vqlog ui {' '.join(flags)} was still running after 60 s:\n{stdout}{stderr}")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "MLflow UI on" not in proc.stdout, proc.stdout  # no address of a UI that never starts
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1"])
def test_a_port_out_of_range_is_one_error_line_and_leaves_the_store_as_it_was(tmp_path, mlflow_store, port):
    mlflow_store(tmp_path)  # a real store: the port is what fails, not a missing store
    before = snapshot(tmp_path)
    line = one_error_line(ui(tmp_path, "--port", port))
    assert line == f"Error: --port must be from 1 to 65535, got {port}"
    assert snapshot(tmp_path) == before  # the store untouched, no mlartifacts/ beside it


def test_a_port_out_of_range_without_a_store_creates_none(tmp_path):
    line = one_error_line(ui(tmp_path, "--port", "99999"))
    assert line == "Error: --port must be from 1 to 65535, got 99999"
    assert list(tmp_path.iterdir()) == []


def test_a_port_in_use_is_one_error_line_and_leaves_the_store_as_it_was(tmp_path, mlflow_store):
    mlflow_store(tmp_path)  # a real store: the port is what fails, not a missing store
    before = snapshot(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(ui(tmp_path, "--port", str(port)))
    assert line == f"Error: port {port} on 127.0.0.1 is already in use; pick another with --port"
    assert snapshot(tmp_path) == before


def test_a_host_that_is_not_this_machines_is_one_error_line(tmp_path, mlflow_store):
    mlflow_store(tmp_path)
    before = snapshot(tmp_path)
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): documentation only, never a machine's address
    line = one_error_line(ui(tmp_path, "--host", "192.0.2.1", "--port", "5000"))
    assert line.startswith("Error: --host 192.0.2.1 is not an address of this machine"), line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("host", ["", "  "])
def test_an_empty_host_is_one_error_line_not_every_interface(tmp_path, mlflow_store, host):
    """bind() takes "" as every interface: `--host ""` served the UI to the network, and printed
    http://:5000."""
    mlflow_store(tmp_path)
    line = one_error_line(ui(tmp_path, "--host", host, "--port", "5000"))
    assert line == ("Error: --host needs an address: 127.0.0.1 (this machine only) or 0.0.0.0 "
                    "(every interface)")


def test_every_ipv6_interface_is_opened_at_the_ipv6_loopback():
    """`--host ::` listens on IPv6 alone (uvicorn's socket): the printed http://127.0.0.1:PORT
    got no connection, while http://[::1]:PORT answers."""
    from vqlog.commands.ui import ui_address

    assert ui_address("::", 5397).startswith("http://[::1]:5397, or http://")
    assert ui_address("0.0.0.0", 5397).startswith("http://127.0.0.1:5397, or http://")
    assert ui_address("::1", 5397) == "http://[::1]:5397"
