"""docker-compose.yml, checked without a Docker engine: it is a valid compose file, services wait
for healthy (or completed) dependencies, ports stay on 127.0.0.1, credentials come only from
.env, and every command runs the same script or entry point the native tests run, with flags
that vqlog's own parsers accept."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
START_SH = ROOT / "mlflow" / "start.sh"
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.I)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with the .env.example values."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name, "")
        if op == ":-" and not got:
            return arg
        return got or ("set-by-user" if op == ":?" else "")
    return VAR.sub(one, value).replace("$$", "$")


def command(services, name: str) -> list[str]:
    cmd = services[name]["command"]
    assert isinstance(cmd, list), f"{name}: use the exec (list) form of command"
    env = {**env_example(), "POSTGRES_PASSWORD": "x"}
    return [interpolate(part, env) for part in cmd]


def test_it_is_a_valid_compose_file():
    """Against the Compose Specification's JSON schema (vendored by check-jsonschema: offline)."""
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("check-jsonschema is missing: pip install -e '.[dev]'")
    out = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_services(services, compose):
    assert set(services) == {"postgres", "mlflow", "init", "sweep", "table", "dashboard"}
    assert {"postgres-data", "mlflow-artifacts", "results"} <= set(compose["volumes"])
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_dependencies_wait_for_healthy_or_completed_services(services):
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert isinstance(spec, dict), f"{name}: depends_on {dep} needs a condition"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dep}: {condition}"
                assert services[dep].get("restart", "no") == "no", f"{dep} must be one-shot"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["init"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for worker in ("sweep", "table", "dashboard"):  # nothing touches the study before init made it
        assert services[worker]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_healthchecks(services):
    pg = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in pg and "-h 127.0.0.1" in pg  # TCP: false "ready" during first init
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    for svc in services.values():
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")


def test_ports_are_published_on_127_0_0_1_only(services):
    published = [(name, p) for name, svc in services.items() for p in svc.get("ports", [])]
    assert {name for name, _ in published} == {"postgres", "mlflow", "dashboard"}
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
    assert not any("ports" in services[n] for n in ("sweep", "init", "table")), "sweep must scale"


def test_images_are_pinned_and_built_here(services):
    assert re.fullmatch(r"postgres:\d+\.\d+[-\w.]*", services["postgres"]["image"])
    assert services["mlflow"]["build"] == "./mlflow"
    dockerfile = (ROOT / "mlflow" / "Dockerfile").read_text()
    version = importlib.metadata.version("mlflow")  # what the native tests ran
    assert f"ARG MLFLOW_VERSION={version}" in dockerfile and '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile
    assert "psycopg2-binary==" in dockerfile
    project = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", project, re.M)
    assert "--index-url" in project and "download.pytorch.org/whl/cpu" in project
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert 'pip install ".[dashboard]"' in project and any(
        d.startswith("optuna-dashboard") for d in extras["dashboard"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def test_postgres_init_creates_both_databases(services):
    mounts = [v for v in services["postgres"]["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    assert len(mounts) == 1
    script = ROOT / mounts[0].split(":")[0]
    sql = script.read_text()
    assert re.search(r"CREATE DATABASE optuna;", sql) and re.search(r"CREATE DATABASE mlflow;", sql)
    assert services["mlflow"]["environment"]["MLFLOW_DB"] == "mlflow"


def test_mlflow_runs_the_tested_start_script(services):
    assert command(services, "mlflow") == ["/mlflow/start.sh"]
    assert "COPY --chmod=755 start.sh /mlflow/start.sh" in (ROOT / "mlflow" / "Dockerfile").read_text()
    script = START_SH.read_text()
    for key in services["mlflow"]["environment"]:  # every setting given is one start.sh reads
        assert re.search(rf"\${{{key}\b", script), f"start.sh does not read {key}"


def test_commands_use_the_tested_entry_points_with_valid_flags(services):
    from vqlog.cli import Parser, build_parser
    from vqlog.commands.sweep import add_sweep_args

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    init = command(services, "init")
    assert init[:2] == ["vqlog", "init"] and "vqlog" in scripts
    a = build_parser().parse_args(init[1:])
    assert a.command == "init"
    sweep = command(services, "sweep")
    assert sweep[0] == "vqlog-sweep" and "vqlog-sweep" in scripts
    parser = Parser(prog="vqlog-sweep")
    add_sweep_args(parser)
    s = parser.parse_args(sweep[1:])
    assert s.trials == int(env_example()["TRIALS"])
    assert (s.storage, s.tracking_uri, s.config, s.study) == (a.storage, a.tracking_uri, a.config, a.study)
    table = command(services, "table")
    assert table[0] == "vqlog" and "vqlog" in scripts
    t = build_parser().parse_args(table[1:])
    assert t.command == "table" and t.watch
    assert (t.tracking_uri, t.study, t.config) == (a.tracking_uri, a.study, a.config)
    dash = command(services, "dashboard")
    assert dash[0] == "optuna-dashboard" and dash[1] == a.storage
    # One Optuna database on the postgres service, one MLflow server, for every service.
    assert re.fullmatch(r"postgresql\+psycopg2://[^:@/]+@postgres:5432/optuna", a.storage)
    assert a.tracking_uri == "http://mlflow:5000"


def test_no_secret_is_written_into_the_compose_file(services):
    text = COMPOSE.read_text()
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", str(value)), f"{name}.{key}"
                m = VAR.fullmatch(str(value))
                assert not (m.group(2) == ":-" and m.group(3)), f"{name}.{key} has a default secret"
    # The database password goes to libpq as PGPASSWORD: no URL carries it.
    filled = interpolate(text, {**env_example(), "POSTGRES_PASSWORD": "PW-SENTINEL"})
    assert not re.search(r"://\S*PW-SENTINEL", filled), "a URL with the password in it"
    assert not re.search(r"://[^/\s:@$]+:[^/\s@]+@", filled), "a URL with a password in it"


def test_env_example_lists_every_variable_and_no_secret(services):
    used = {m.group(1) for m in VAR.finditer(COMPOSE.read_text())}
    example = env_example()
    assert used == set(example), f"missing: {used - set(example)}, unused: {set(example) - used}"
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example must not hold a value for {key}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_sweeps_mount_exists(services):
    for name in ("init", "sweep"):
        hosts = [v.split(":")[0] for v in services[name]["volumes"] if v.startswith("./")]
        for h in hosts:
            assert (ROOT / h).exists(), f"{name}: {h} is missing"


def test_workers_stop_cleanly_on_docker_compose_stop(services):
    """`docker compose stop` sends SIGTERM, then SIGKILL after the grace period: the workers run
    under an init that passes SIGTERM on, with time to checkpoint (vqlog exits 143 itself)."""
    sweep = services["sweep"]
    assert sweep.get("init") is True
    grace = re.fullmatch(r"(\d+)s", str(sweep.get("stop_grace_period", "")))
    assert grace and int(grace.group(1)) >= 30, sweep.get("stop_grace_period")


def test_the_commands_run_with_the_env_example_values(services, tmp_path, monkeypatch, cli):
    """.env.example leaves STUDY empty, so compose passes `--study ""`: that is the spec's name
    for init, the sweep and the table (which gets the spec as --config), not an error. Run here
    with the storage and tracking URI on SQLite files in place of the stack's services."""
    monkeypatch.chdir(tmp_path)
    local = {"--storage": f"sqlite:///{tmp_path}/optuna.db",
             "--tracking-uri": f"sqlite:///{tmp_path}/mlflow.db"}

    def here(args: list[str]) -> list[str]:
        return [local.get(prev, arg) for prev, arg in zip([None, *args], args)]

    init, table = command(services, "init"), command(services, "table")
    assert init[init.index("--study") + 1] == "" == table[table.index("--study") + 1]
    code, out, err = cli(*here(init[1:]))
    assert code == 0, err
    spec = env_example().get("SPEC") or "seed"
    assert out.startswith(f"study {spec}: Optuna study ready in {local['--storage']} (")
    once = [a for a in here(table[1:]) if a != "--watch"]
    code, out, err = cli(*once)
    assert (code, out, err) == (0, f"table: results/{spec}.md (0 trials)\n", "")


def test_the_closing_lines_give_the_addresses_published_on_the_host(services, monkeypatch):
    """Inside the stack the workers reach http://mlflow:5000 and postgres:5432, which a user on
    the host cannot open: the sweep's closing lines link to the published ports instead
    (VQLOG_UI_URL, VQLOG_DASHBOARD_URL), following PUBLISH_*_PORT."""
    from vqlog.commands.sweep import summary_text
    from vqlog.study.worker import SweepSummary
    from vqlog.tracking.lineage import ui_link

    env = {**env_example(), "POSTGRES_PASSWORD": "x", "PUBLISH_MLFLOW_PORT": "5999",
           "PUBLISH_DASHBOARD_PORT": "8999"}
    sweep = services["sweep"]
    for name in ("VQLOG_UI_URL", "VQLOG_DASHBOARD_URL"):
        monkeypatch.setenv(name, interpolate(sweep["environment"][name], env))
    uri = command(services, "sweep")[command(services, "sweep").index("--tracking-uri") + 1]
    storage = command(services, "sweep")[command(services, "sweep").index("--storage") + 1]
    assert uri == "http://mlflow:5000" and "@postgres:5432/" in storage
    text = summary_text(SweepSummary("seed", 50, 50), 60.0, storage, uri, ui_link(uri, "1"))
    assert "mlflow: http://127.0.0.1:5999/#/experiments/1/runs?workflowType=machine_learning" \
        in text, text
    assert "optuna: http://127.0.0.1:8999\n" in text + "\n", text
    assert "mlflow:5000" not in text and "postgres:5432" not in text, text
