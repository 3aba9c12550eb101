"""`vqlog ui`: the MLflow UI on the embedded store (or any store), from this environment."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import socket
import sys

from vqlog.cli import add_debug, url_arg


def ui_command_parser(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the local store")
    p.add_argument("--tracking-uri", default=None, type=url_arg,
                   help="the store to show: sqlite:///FILE (default sqlite:///mlflow.db here, "
                        "or $MLFLOW_TRACKING_URI) or a database URL; an http(s):// tracking "
                        "server serves its own UI, whose address is printed")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on: 127.0.0.1 "
                   "(default, this machine only) or 0.0.0.0 (every interface)")
    p.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                   help="more Host headers for the UI to answer (MLflow's guard against DNS "
                        "rebinding), comma-separated, wildcards allowed: e.g. labbox,labbox:*. "
                        "It always answers localhost and private addresses, and this machine's "
                        "names and addresses when --host is not a loopback address")
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


def loopback(host: str) -> bool:
    """Whether `host` (as given to --host) is reachable from this machine only."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in ("localhost", "localhost.localdomain")


def allowed_hosts(host: str, more: str | None = None) -> str | None:
    """The Host headers a UI listening on `host` answers, for `mlflow ui --allowed-hosts`: MLflow's
    default (localhost and private addresses), and beyond loopback this machine's names and the
    addresses of its interfaces, each with any port (a browser on another machine sends one of
    them, which MLflow's default refused with 403), then `more` (--allowed-hosts: a DNS alias, a
    proxy's name). None: MLflow's default alone, enough for a loopback address. MLflow compares
    Host headers as they come, and browsers send them in lower case."""
    import socket

    import psutil
    from mlflow.server.security_utils import get_default_allowed_hosts

    extra = [h.strip() for h in (more or "").split(",") if h.strip()]
    if loopback(host) and not extra:
        return None
    names = set()
    if not loopback(host):
        names = {socket.gethostname(), socket.getfqdn()}
        names |= {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values()
                  for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}
        if host not in ("0.0.0.0", "::"):
            names.add(host)
    forms = []
    for name in sorted({n.lower() for n in names if n} | {n for n in names if n}):
        bracketed = f"[{name}]" if ":" in name else name  # an IPv6 address in a Host header
        forms += [bracketed, f"{bracketed.replace('[', '[[]', 1)}:*"]  # fnmatch reads [ as a set
    return ",".join(dict.fromkeys(get_default_allowed_hosts() + forms + extra))


def ui_command(args: argparse.Namespace) -> int:
    from vqlog.errors import UserError
    from vqlog.tracking.client import (check_tracking_uri, existing_store, open_client,
                                       resolve_tracking_uri)
    from vqlog.tracking.lineage import ui_base
    from vqlog.urls import sqlite_path

    given = resolve_tracking_uri(args.tracking_uri)
    if given.split(":", 1)[0].lower() in ("http", "https"):
        # A tracking server serves the UI itself: `mlflow ui` cannot open a server as its store.
        check_tracking_uri(given)  # reachable, or one Error line
        print(f"The MLflow server serves its own UI: {ui_base(given)}")
        return 0
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
    # The store goes by the variable `mlflow ui` reads it from: a password in it stays off the
    # command line, which every user of the machine can read (ps).
    os.environ["MLFLOW_BACKEND_STORE_URI"] = uri
    cmd = [mlflow, "ui", "--host", args.host, "--port", str(args.port),
           # One uvicorn worker answers one person's browser (its requests run on a thread pool);
           # MLflow's default of four, each with the whole server loaded, took about 2 GiB beside
           # a sweep that needs the memory.
           "--workers", "1",
           # uvicorn's INFO lines (each worker's start and stop, a dozen each time) stay out of the
           # terminal; its warnings and errors do not.
           "--uvicorn-opts", "--log-level warning"]
    # MLflow's own MLFLOW_SERVER_ALLOWED_HOSTS (which the flag would override) counts as more
    # --allowed-hosts. Without more, MLflow's defaults are given explicitly: left out, MLflow
    # prints that other hosts need --cors-allowed-origins, which `vqlog ui --host 0.0.0.0` does not.
    from mlflow.server.security_utils import get_default_allowed_hosts

    more = ",".join(filter(None, (os.environ.get("MLFLOW_SERVER_ALLOWED_HOSTS", "").strip(),
                                  args.allowed_hosts)))
    cmd += ["--allowed-hosts", allowed_hosts(args.host, more or None)
            or ",".join(get_default_allowed_hosts())]
    os.environ.setdefault("MLFLOW_REGISTRY_STORE_URI", uri)  # as mlflow takes it, unsaid
    # MLflow's job runner (GenAI scorers and evaluations, which a sweep never starts) would start
    # its own consumer processes beside the UI.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Starlette's deprecation of the WSGI middleware MLflow's server imports, once per worker.
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:mlflow.server.fastapi_app")
        if w)
    path = sqlite_path(uri)
    if path is not None:  # the embedded store keeps its artifacts beside it
        cmd += ["--default-artifact-root", str(path.resolve().parent / "mlartifacts")]
    print(f"MLflow UI on {ui_address(args.host, args.port)} (Ctrl-C to stop)", flush=True)
    return _serve(cmd)


def _serve(cmd: list[str]) -> int:
    """Run `mlflow ui` until a Ctrl-C, SIGTERM or SIGHUP here, which it gets once, and its exit.

    `mlflow ui` passes SIGINT and SIGTERM on to its uvicorn server, in the same process group:
    a terminal's Ctrl-C reached uvicorn twice, from the terminal and from mlflow, and uvicorn's
    second signal is a forced exit, which printed the tracebacks of the requests it cut off (an
    open UI polls the server). In a session of its own, it gets each signal once, from here. On
    Linux the kernel also sends it SIGTERM if this process dies (PR_SET_PDEATHSIG)."""
    import signal
    import subprocess

    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, before mlflow starts
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # this process died before that was set: no UI
                raise ChildProcessError("vqlog ui ended before mlflow ui started")

    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent)

    def forward(signum, frame) -> None:  # a second Ctrl-C too: uvicorn's forced exit
        with contextlib.suppress(ProcessLookupError):  # (mlflow passes a SIGHUP on to nobody)
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup vqlog ui &` outlives a logout
            signal.signal(sig, forward)
    code = proc.wait()
    return code if code >= 0 else 128 - code


def ui_address(host: str, port: int) -> str:
    """Where to open the UI: the loopback address for every interface (0.0.0.0 is no address to
    browse to; the server listens on IPv6 alone for ::), with this machine's name for the other
    machines."""
    import socket

    if host in ("0.0.0.0", "::"):
        here = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{here}:{port}, or http://{socket.gethostname()}:{port} from another machine"
    where = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    return f"http://{where}:{port}"
