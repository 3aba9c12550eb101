"""Checks of an MLflow tracking server before a command uses it: it answers (/health), and its
API answers this client (a login it accepts, a host name it allows). Each failure is one
`Error:` line, exit 2, with the password masked; StoreUnreachable for a server that is down."""

from __future__ import annotations

import os

from vqlog.errors import UserError, one_line
from vqlog.urls import mask, password


def check_server(uri: str) -> None:
    """The http(s) branch of `check_tracking_uri`."""
    import http.client
    import urllib.error
    import urllib.request

    from vqlog.tracking.client import StoreUnreachable

    try:
        health = health_request(uri)
        with urllib.request.urlopen(health, timeout=5) as resp:  # noqa: S310 - user's server
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        if exc.code != 401:  # basic-auth servers guard /health too; the server is up
            error = StoreUnreachable if exc.code in (502, 503, 504) else UserError  # a proxy
            raise error(f"MLflow server {mask(uri)} answered HTTP {exc.code} on /health") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        reason = one_line(getattr(exc, "reason", None) or exc, 200)
        secret = password(uri)
        if secret and not isinstance(exc, OSError):
            # urllib's message on a malformed URI can quote a piece of the password
            # ("nonnumeric port: 'pa'" for user:pa/ss@host): say what is wrong instead.
            reason = "malformed URL; percent-encode / ? # @ : in the user name and password"
        elif secret:
            reason = reason.replace(secret, "***")
        raise (StoreUnreachable if isinstance(exc, OSError) else UserError)(
            f"cannot reach the MLflow server {mask(uri)} ({reason}); start it or pass "
            "another --tracking-uri"
        ) from None
    check_answers(uri)


def check_answers(uri: str) -> None:
    """One read through MLflow's client, with the credentials it will send (the URL's, or
    MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN): /health answers without a login and whatever
    the Host header, the API does not. A refusal is bad input here, where it was MLflow's
    exception on the first call, exit 1, and in a sweep after its `study ...` line."""
    from urllib.parse import urlsplit

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    probe = {key: value for key, value in probe.items() if key not in os.environ}  # the user's
    before = {key: os.environ.get(key) for key in probe}
    os.environ.update(probe)  # a server whose store is down answers 5xx: no minutes of retries
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if status == 401:
            raise UserError(f"the MLflow server {mask(uri)} needs a login it accepts: set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a wrong "
                            "one gets the same answer)") from None
        if status == 403 and "host header" in str(exc).lower():
            host = urlsplit(uri).netloc.rpartition("@")[2]
            raise UserError(f"the MLflow server {mask(uri)} refuses the host name {host} "
                            "(HTTP 403, its guard against DNS rebinding): add it to the server's "
                            "allowed hosts (MLFLOW_ALLOWED_HOSTS in .env, --allowed-hosts) or use "
                            "a name it allows") from None
        if status == 403:
            raise UserError(f"the MLflow server {mask(uri)} does not let this user read "
                            "experiments (HTTP 403); ask its admin for a permission") from None
        # anything else (a store error behind the server): the calls that follow report it
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def health_request(uri: str):
    """GET <uri>/health. Credentials in the URI (http://user:password@host) go in a Basic auth
    header, as MLflow's client (requests) sends them; urllib would take `user:password@host` for
    the host name and fail with 'Name or service not known'."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    path = parts.path.rstrip("/") + "/health"
    request = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, host, path, "", "")))
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        secret = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request
