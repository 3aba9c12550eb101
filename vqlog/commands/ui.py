"""`vqlog ui`: the MLflow UI on the embedded store (or any store), from this environment."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from vqlog.cli import TRACKING_HELP, add_debug


def ui_command_parser(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the local store")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    add_debug(p)
    p.set_defaults(func=ui_command)


def ui_command(args: argparse.Namespace) -> int:
    from vqlog.errors import UserError
    from vqlog.tracking.client import existing_store, open_client
    from vqlog.urls import sqlite_path

    uri = existing_store(args.tracking_uri)
    # A store a sweep is creating right now is waited for (the lock vqlog's processes share):
    # `mlflow ui` would start migrating it too.
    open_client(uri)
    beside = os.path.join(os.path.dirname(sys.executable), "mlflow")  # the same environment's
    mlflow = beside if os.access(beside, os.X_OK) else shutil.which("mlflow")
    if mlflow is None:
        raise UserError("the mlflow command is not on PATH; activate the environment vqlog is installed in")
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    path = sqlite_path(uri)
    if path is not None:  # the embedded store keeps its artifacts beside it
        cmd += ["--default-artifact-root", str(path.resolve().parent / "mlartifacts")]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    os.execv(mlflow, cmd)
    return 0  # pragma: no cover - execv does not return
