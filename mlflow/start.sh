#!/bin/sh
# The MLflow tracking server of the vqlog stack: the one start script the image
# (mlflow/Dockerfile, docker-compose.yml) and the tests (tests/test_stack.py, test_auth.py) run.
#
# Environment (defaults in brackets):
#   MLFLOW_BACKEND_STORE_URI   full database URL; when unset it is built from the next five
#   POSTGRES_HOST [postgres]  POSTGRES_PORT [5432]  POSTGRES_USER [vqlog]  MLFLOW_DB [mlflow]
#   POSTGRES_PASSWORD          handed to libpq as PGPASSWORD, so it is in no URL, argument or log
#   MLFLOW_ARTIFACTS_DESTINATION [./mlartifacts]  where --serve-artifacts keeps artifacts
#   MLFLOW_HOST [127.0.0.1]  MLFLOW_PORT [5000]  MLFLOW_WORKERS [2]
#   MLFLOW_ALLOWED_HOSTS [localhost,127.0.0.1,mlflow on any port]  Host headers accepted
#   MLFLOW_AUTH [none]         basic: MLflow's basic-auth app (--app-name basic-auth); it needs
#     MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, used when the admin user is created
#     MLFLOW_FLASK_SERVER_SECRET_KEY  the static key of the app's CSRF protection
#     MLFLOW_AUTH_ADMIN_USERNAME [admin]  MLFLOW_AUTH_DEFAULT_PERMISSION [READ]
#     MLFLOW_AUTH_DATABASE_URI [the backend store]  users and permissions (own alembic table)
set -eu

fail() {
    echo "Error: $*" >&2
    exit 2
}

if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    export PGPASSWORD="$POSTGRES_PASSWORD"
fi
unset POSTGRES_PASSWORD

if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
    # An explicit driver: SQLAlchemy 2.1 made psycopg (3) the default of a bare postgresql://.
    MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${POSTGRES_USER:-vqlog}@${POSTGRES_HOST:-postgres}:${POSTGRES_PORT:-5432}/${MLFLOW_DB:-mlflow}"
fi
# mlflow server reads --backend-store-uri from this variable: a password in it stays off `ps`.
export MLFLOW_BACKEND_STORE_URI
# The URL with any password replaced by ***, for the one line this script prints.
# The password runs to the last @ (an unescaped @ in it is read that way); libpq also takes one
# as a password= (or sslpassword=) parameter.
shown_uri=$(printf '%s' "$MLFLOW_BACKEND_STORE_URI" \
    | sed -E -e 's#^([^:/]+://[^:@/]*):.*@#\1:***@#' -e 's#([?&](ssl)?[Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]=)[^&]*#\1***#g')

command -v mlflow >/dev/null 2>&1 ||
    fail "the mlflow command is not on PATH; activate the environment vqlog is installed in (. .venv/bin/activate)"

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
allowed="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,mlflow,mlflow:*}"
# No usage reports from a lab's server (and none can leave an offline one anyway).
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# The job runner (GenAI scorers, trace archival) and its ~10 huey processes serve nothing vqlog logs.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

set -- server \
    --serve-artifacts --artifacts-destination "$artifacts" \
    --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-2}" \
    --allowed-hosts "$allowed"

case "${MLFLOW_AUTH:-none}" in
none | "") auth="none" ;;
basic)
    missing=""
    [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || missing="MLFLOW_AUTH_ADMIN_PASSWORD"
    [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || missing="${missing:+$missing and }MLFLOW_FLASK_SERVER_SECRET_KEY"
    if [ -n "$missing" ]; then
        fail "MLFLOW_AUTH=basic needs $missing in the environment (set in .env, see .env.example); not starting"
    fi
    if [ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -lt 12 ]; then  # MLflow's own password policy
        fail "MLFLOW_AUTH_ADMIN_PASSWORD must be at least 12 characters; not starting"
    fi
    # MLflow's basic-auth app reads its settings from this file and the admin password from
    # MLFLOW_AUTH_ADMIN_PASSWORD, which takes precedence over the file: the password is written
    # nowhere, nor a PostgreSQL password (above). '%' is doubled: configparser reads the file.
    auth_uri="${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}"
    kept=""
    case "$auth_uri" in
    postgresql*://*:*@* | postgresql*[?\&]password=*)
        # A password in a PostgreSQL URL goes to libpq as PGPASSWORD, not into the file
        # (configparser has no way to read it from the environment). Split by SQLAlchemy,
        # which decodes it; the URL travels in the environment, not on a command line.
        parts=$(VQLOG_AUTH_URI="$auth_uri" python3 -c '
import os, sys
from sqlalchemy.engine import URL, make_url
url = make_url(os.environ["VQLOG_AUTH_URI"])
password = url.password or ""
if "password" in url.query:
    sys.exit(5)
if url.get_driver_name() not in ("psycopg2", "psycopg"):
    sys.exit(3 if password else 0)
if "\n" in password or "\0" in password:
    sys.exit(4)
print(password)
print(URL.create(url.drivername, url.username, None, url.host, url.port, url.database,
                 url.query).render_as_string(hide_password=False))' 2>/dev/null) && split=0 || split=$?
        pw=$(printf '%s\n' "$parts" | sed -n 1p)
        case "$split" in
        0) ;;
        3) kept="its driver does not read PGPASSWORD" ;;
        4) kept="PGPASSWORD cannot hold a password with a line break" ;;
        5) kept="its password is a query parameter" ;;
        127) kept="no python3 on PATH to split it out" ;;
        *) kept="python3 with SQLAlchemy could not read the URL" ;;
        esac
        if [ "$split" != 0 ] || [ -z "$pw" ]; then
            :
        elif [ -n "${PGPASSWORD:-}" ] && [ "$PGPASSWORD" != "$pw" ]; then
            kept="PGPASSWORD (POSTGRES_PASSWORD) holds another password"
        elif [ "$auth_uri" != "$MLFLOW_BACKEND_STORE_URI" ] && [ -z "${PGPASSWORD:-}" ]; then
            # libpq tries PGPASSWORD before ~/.pgpass: the backend store's login would change
            kept="MLFLOW_AUTH_DATABASE_URI is not the backend store's URL"
        else
            export PGPASSWORD="$pw"
            auth_uri=$(printf '%s\n' "$parts" | sed -n '2,$p')
        fi
        ;;
    *://*:*@*) kept="only PostgreSQL's libpq takes a password from the environment" ;;
    esac
    conf_dir="${MLFLOW_AUTH_CONFIG_DIR:-$(mktemp -d)}"
    mkdir -p "$conf_dir"
    conf="$conf_dir/basic_auth.ini"
    esc() { printf '%s' "$1" | sed 's/%/%%/g'; }
    (
        umask 077
        cat >"$conf" <<INI
[mlflow]
default_permission = $(esc "${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}")
database_uri = $(esc "$auth_uri")
admin_username = $(esc "${MLFLOW_AUTH_ADMIN_USERNAME:-admin}")
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    )
    export MLFLOW_AUTH_CONFIG_PATH="$conf"
    if [ -n "$kept" ]; then
        echo "start.sh: the auth database URL keeps its password, in $conf (mode 600): $kept" >&2
    fi
    auth="basic (admin user ${MLFLOW_AUTH_ADMIN_USERNAME:-admin})"
    set -- "$@" --app-name basic-auth
    ;;
*) fail "MLFLOW_AUTH must be none or basic, got '${MLFLOW_AUTH}'" ;;
esac

# Two mistakes MLflow takes badly, checked first (by the python3 on PATH: the environment's, or
# the image's; without one, or without SQLAlchemy, MLflow meets them itself): on a port it cannot
# listen on (taken, out of range, an address not this machine's) its server logs the error and
# exits 0, while a sweep sent to a taken one logs into whatever listens (a `vqlog ui` on its
# default 5000, say); a database, user or password PostgreSQL refuses, it
# retries for two minutes and then prints pages. A server that is not up yet is left to
# MLflow's retries, as compose starts PostgreSQL beside it.
if command -v python3 >/dev/null 2>&1; then
    why=$(VQLOG_HOST="$host" VQLOG_PORT="$port" python3 - 2>/dev/null <<'PY'
import errno, os, socket

host, port = os.environ["VQLOG_HOST"], os.environ["VQLOG_PORT"]
if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
    print(f"MLFLOW_PORT must be a port number from 1 to 65535, got '{port}'")
    raise SystemExit
try:  # as uvicorn binds it: IPv6 for an address with a colon, else IPv4 (localhost too)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), int(port)))
except OSError as exc:
    if exc.errno == errno.EADDRINUSE:
        print(f"port {port} on {host} is in use (another MLflow server, a vqlog ui?); stop it, "
              "or give this one another MLFLOW_PORT")
    elif isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        print(f"MLFLOW_HOST {host} is not an address of this machine; use 0.0.0.0 (every "
              "interface) or 127.0.0.1 (this machine only)")
    else:
        print(f"cannot listen on port {port} of {host}: {exc.strerror or exc}")
    raise SystemExit
except (ValueError, UnicodeError):  # a name the resolver refuses
    print(f"MLFLOW_HOST '{host}' is not a host name or address")
    raise SystemExit
try:
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(os.environ["MLFLOW_BACKEND_STORE_URI"])
    if url.get_backend_name() == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={"connect_timeout": 10})
        engine.connect().close()
except Exception as exc:  # noqa: BLE001
    said = str(getattr(exc, "orig", exc))
    host = url.host or url.query.get("host")  # (libpq's parameters may give them instead)
    user = url.username or url.query.get("user")
    where = f"{host}:{url.port or url.query.get('port') or 5432}" if host else "its default host"
    flags = "".join(f" {flag} {value}" for flag, value in (
        ("-h", host), ("-p", url.port or url.query.get("port")), ("-U", user)) if value)
    if 'database "' in said and '" does not exist' in said:
        print(f"database {url.database} does not exist on {where}; create it first "
              f"(createdb{flags} {url.database})")
    elif 'role "' in said and '" does not exist' in said:
        print(f"the PostgreSQL user {user} does not exist on {where} (POSTGRES_USER)")
    elif "password authentication failed" in said or "no password supplied" in said:
        print(f"PostgreSQL on {where} refused the login of {user}: check "
              "POSTGRES_PASSWORD")
    elif "no pg_hba.conf entry" in said:
        print(f"PostgreSQL on {where} lets no {user} in from this host (pg_hba.conf)")
PY
    ) || why=""
    [ -z "$why" ] || fail "$why; not starting"
fi

echo "mlflow server on $host:$port: backend $shown_uri, artifacts $artifacts, allowed hosts $allowed, auth $auth"
exec mlflow "$@"
