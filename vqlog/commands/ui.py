"""`vqlog ui`: the MLflow UI on the embedded store (or any store), from this environment."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import sys

from vqlog.cli import TRACKING_HELP, add_debug


def ui_command_parser(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the local store")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on: 127.0.0.1 "
                   "(default, this machine only) or 0.0.0.0")
    p.add_argument("--port", type=int, default=5000,
                   help="1 to 65535, free on --host (default 5000)")
    add_debug(p)
    p.set_defaults(func=ui_command)


def check_listen(host: str, port: int) -> None:
    """A UserError unless `mlflow ui` could listen on host:port now: `--port` in 1..65535 (uvicorn
    fails 99999 with a traceback and takes 0 as "any port") and the address bindable, tried the
    way uvicorn binds it (IPv6 if the host has a colon, SO_REUSEADDR), then released.

    Checked before anything else, as uvicorn's own failure comes after the store was opened and
    the UI's address printed, and `mlflow ui` exits 0 after it. A port another process takes
    between this check and mlflow's bind still fails there, as before: a window of a second."""
    from vqlog.errors import UserError

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {port}")
    if not host.strip():  # bind() takes "" as every interface
        raise UserError("--host needs an address: 127.0.0.1 (this machine only) or 0.0.0.0 "
                        "(every interface)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror:
        raise UserError(f"--host {host} is not a known host name or address of this machine; "
                        "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    except (UnicodeError, ValueError):  # a name the resolver refuses (an empty label, a NUL byte)
        raise UserError(f"--host {host!r} is not a host name or address") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; "
                            "pick another with --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine; use 127.0.0.1 "
                            "(this machine only) or 0.0.0.0 (every interface)") from None
        if exc.errno == errno.EACCES:
            raise UserError(f"port {port} on {host} needs root (ports below 1024 are privileged); "
                            "pick another with --port") from None
        raise UserError(f"cannot listen on port {port} of {host}: {exc.strerror or exc}") from None


def ui_command(args: argparse.Namespace) -> int:
    from vqlog.errors import UserError
    from vqlog.tracking.client import existing_store, open_client
    from vqlog.urls import sqlite_path

    # Before the store is opened. A small race remains, accepted: a port taken between this
    # check and mlflow's own bind fails there, with uvicorn's line and exit 0, as before.
    check_listen(args.host, args.port)
    uri = existing_store(args.tracking_uri)
    # A store a sweep is creating right now is waited for (the lock vqlog's processes share):
    # `mlflow ui` would start migrating it too.
    open_client(uri)
    beside = os.path.join(os.path.dirname(sys.executable), "mlflow")  # the same environment's
    mlflow = beside if os.access(beside, os.X_OK) else shutil.which("mlflow")
    if mlflow is None:
        raise UserError("the mlflow command is not on PATH; activate the environment vqlog is installed in")
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           # uvicorn's INFO lines (each worker's start and stop, a dozen each time) stay out of the
           # terminal; its warnings and errors do not.
           "--uvicorn-opts", "--log-level warning"]
    # Starlette's deprecation of the WSGI middleware MLflow's server imports, once per worker.
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:mlflow.server.fastapi_app")
        if w)
    path = sqlite_path(uri)
    if path is not None:  # the embedded store keeps its artifacts beside it
        cmd += ["--default-artifact-root", str(path.resolve().parent / "mlartifacts")]
    where = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    print(f"MLflow UI on http://{where}:{args.port} (Ctrl-C to stop)", flush=True)
    os.execv(mlflow, cmd)
    return 0  # pragma: no cover - execv does not return
