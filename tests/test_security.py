"""Security (GitHub issue 7, item 7): no password leaks out of a real sweep, nothing in vqlog/
unpickles what it loads, and no secret is committed.

The rest of the security coverage lives beside the code it guards:
- tests/test_bad_input.py: a `.npy` of Python objects and a pickle named `.npy` are refused
  without running their payload, a YAML `!!python` tag is refused, and no bad-input error prints
  a password (`s3cr3t` in storage and tracking URLs);
- tests/test_sweep.py `test_storage_password_is_never_printed`: the same, in process;
- tests/test_cli_train.py: a `--save` checkpoint loads with `torch.load(weights_only=True)`;
- tests/test_compose.py `test_no_secret_is_written_into_the_compose_file`,
  `test_env_example_lists_every_variable_and_no_secret` (secret-named variables are empty in
  `.env.example`, `.gitignore` names `.env`) and `test_ports_are_published_on_127_0_0_1_only`.
"""

from __future__ import annotations

import ast
import os
import re
import secrets
import shutil
import subprocess

import numpy as np
import pytest
from _sweep_helpers import ROOT, SUBPROCESS_ENV, SWEEP_BIN
from test_bad_input import object_npy, raw_pickle

from vqlog.sources import load_source
from vqlog.errors import DataError

PACKAGE = ROOT / "vqlog"


# ------------------------------------------------------------------- passwords never leak


def text_of(value) -> str:
    return value if isinstance(value, str) else repr(value)


def database_rows(url: str) -> str:
    """Every row of every table of the study's PostgreSQL database, as text."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            tables = [row[0] for row in cur.fetchall()]
            assert "studies" in tables and "trial_user_attributes" in tables, tables
            dump = []
            for table in tables:
                cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
                dump.append(f"{table}: {cur.fetchall()!r}")
            return "\n".join(dump)
    finally:
        conn.close()


@pytest.mark.slow
def test_a_postgresql_sweep_never_writes_its_password_anywhere(pg_storage, tmp_path,
                                                               mlflow_store):
    import optuna
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    from sqlalchemy.engine import make_url

    password = f"pw-{secrets.token_hex(12)}"  # trust auth: PostgreSQL accepts any password
    storage = make_url(pg_storage).set(password=password).render_as_string(hide_password=False)
    folder = tmp_path / "run"
    uri = mlflow_store(folder)  # sqlite:///<folder>/mlflow.db
    proc = subprocess.run(
        [str(SWEEP_BIN), "--trials", "2", "--config", "smoke", "--storage", storage, "--tracking-uri", uri],
        cwd=folder, capture_output=True, text=True, timeout=300, env={**os.environ, **SUBPROCESS_ENV},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    places: dict[str, str] = {"stdout": proc.stdout, "stderr": proc.stderr}
    assert "postgresql://postgres:***@127.0.0.1:5432/" in proc.stdout  # printed, masked

    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments(view_type=ViewType.ALL) if e.name == "smoke"]
    places["experiment"] = text_of([exp.name, exp.tags, exp.artifact_location])
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=100)
    roles = sorted(r.data.tags.get("vqlog.role") for r in runs)
    assert roles == ["study", "trial", "trial"], roles
    for run in runs:
        name = run.info.run_name
        places[f"{name} params"] = text_of(sorted(run.data.params.items()))
        places[f"{name} tags"] = text_of(sorted(run.data.tags.items()))
        places[f"{name} metric names"] = text_of(sorted(run.data.metrics))
        places[f"{name} artifact uri"] = run.info.artifact_uri

    rdb = optuna.storages.RDBStorage(pg_storage.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        study_id = rdb.get_study_id_from_name("smoke")
        places["study attrs"] = text_of([rdb.get_study_user_attrs(study_id),
                                         rdb.get_study_system_attrs(study_id)])
        trials = rdb.get_all_trials(study_id, deepcopy=False)
        assert len(trials) >= 2
        for t in trials:
            places[f"trial {t.number} attrs"] = text_of([t.params, t.user_attrs, t.system_attrs])
    finally:
        rdb.engine.dispose()
    places["PostgreSQL rows"] = database_rows(pg_storage)  # and every other column of the study

    table = folder / "results" / "smoke.md"
    artifacts = [p for p in (folder / "mlartifacts").rglob("*") if p.is_file()]
    assert table.is_file() and any(p.name == "experiment_table.md" for p in artifacts)
    assert any(p.suffix == ".png" for p in artifacts)
    files = [p for p in folder.rglob("*") if p.is_file()]  # table, artifacts, mlflow.db: as bytes
    assert {table, *artifacts} <= set(files)
    for path in files:
        places[str(path.relative_to(folder))] = path.read_bytes().decode("latin-1")

    leaks = [where for where, text in places.items() if password in text]
    assert not leaks, f"the storage password appears in: {leaks}"


# ------------------------------------------------------------------------- unsafe loaders

# Loaders that run code from the file unless told not to: each call must pass the keyword.
REQUIRED = {"numpy.load": ("allow_pickle", False), "torch.load": ("weights_only", True)}
SAFE_YAML = ("yaml.safe_load", "yaml.safe_load_all")
# Loaders that unpickle whatever they read: never.
FORBIDDEN = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
             "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
             "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
             "numpy.lib.format.read_array", "torch.serialization.load"}


def imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as (`np` -> `numpy`, `load` -> `numpy.load`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def qualified(node: ast.AST, names: dict[str, str]) -> str | None:
    """`np.load` -> `numpy.load`; None for anything not reached through an import."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


def is_yaml_load(name: str) -> bool:
    return name.startswith("yaml.") and "load" in name.rsplit(".", 1)[1].lower()


def loader_calls(source: str, filename: str = "<snippet>") -> tuple[list[str], list[str]]:
    """(safe loader calls, problems) in one module's source, each as `file:line: name ...`."""
    tree = ast.parse(source, filename)
    names = imported_names(tree)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    safe, problems = [], []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Attribute, ast.Name, ast.Call)):
            continue
        target = node.func if isinstance(node, ast.Call) else node
        name = qualified(target, names)
        watched = name in REQUIRED or name in FORBIDDEN or (name and is_yaml_load(name))
        if not watched:
            continue
        where = f"{filename}:{node.lineno}: {name}"
        if not isinstance(node, ast.Call):
            if id(node) not in called:  # `load = np.load`: its arguments cannot be checked
                problems.append(f"{where} is referenced, not called")
        elif name in FORBIDDEN:
            problems.append(f"{where} unpickles what it reads")
        elif name in REQUIRED:
            key, value = REQUIRED[name]
            if any(k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is value
                   for k in node.keywords):
                safe.append(where)
            else:
                problems.append(f"{where} without {key}={value} (written out, not through **kwargs)")
        elif name in SAFE_YAML:
            safe.append(where)
        else:
            problems.append(f"{where}: use yaml.safe_load")
    return safe, problems


def test_every_loader_in_vqlog_refuses_pickles():
    """np.load(allow_pickle=False), torch.load(weights_only=True), yaml.safe_load: in every
    module of the package, present and future (vqlog/checkpoint.py included)."""
    safe, problems = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        s, p = loader_calls(path.read_text(), str(path.relative_to(ROOT)))
        safe += s
        problems += p
    assert not problems, "\n".join(problems)
    # The check sees the calls it guards: data.py's np.load and config.py's yaml.safe_load.
    assert any("numpy.load" in s for s in safe) and any("yaml.safe_load" in s for s in safe), safe


@pytest.mark.parametrize("source", [
    "import numpy as np\nnp.load(path)",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import numpy\nnumpy.load(path, allow_pickle=0)",
    "from numpy import load\nload(path)",
    "import numpy as np\nkw = {'allow_pickle': False}\nnp.load(path, **kw)",
    "import numpy as np\nloader = np.load\nloader(path)",
    "import torch\ntorch.load(path)",
    "import torch\ntorch.load(path, map_location='cpu', weights_only=False)",
    "def restore(path):\n    from torch import load as tload\n    return tload(path, map_location='cpu')",
    "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "from yaml import full_load_all\nfull_load_all(text)",
    "import pickle\npickle.loads(blob)",
    "import pandas as pd\npd.read_pickle(path)",
    "import numpy.lib.format\nnumpy.lib.format.read_array(f, allow_pickle=False)",
])
def test_the_loader_check_finds_an_unsafe_call(source):
    safe, problems = loader_calls(source)
    assert problems, f"not flagged:\n{source}"


@pytest.mark.parametrize("source", [
    "import numpy as np\nnp.load(path, allow_pickle=False)",
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load(text)",
    "import json\njson.load(f)",
    "def load(path):\n    return path\nload('x')",  # a local function, not a library loader
])
def test_the_loader_check_passes_a_safe_call(source):
    assert loader_calls(source)[1] == []


def test_a_pickle_in_a_npy_file_is_never_unpickled(tmp_path):
    """Both payloads would create `pwned` if anything unpickled them (see test_bad_input)."""
    for name, write, message in (("objects.npy", object_npy, "holds Python objects"),
                                 ("pickle.npy", raw_pickle, r"is not a \.npy array")):
        write(tmp_path / name)
        with pytest.raises(DataError, match=message):
            load_source(str(tmp_path / name), sample_rate=25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objects.npy", "pickle.npy"]
    payload = np.load(tmp_path / "objects.npy", allow_pickle=True)  # what a careless loader does
    payload[0].close()
    assert (tmp_path / "pwned").exists()  # so the payload is real


# ------------------------------------------------------------------- nothing secret committed

SECRET_FILE = re.compile(r"(^|/)(\.env(\.(?!example$)[^/]+)?|\.pgpass|\.netrc|id_(rsa|dsa|ecdsa|ed25519)"
                         r"|[^/]+\.(pem|key|p12|pfx|jks|keystore))$")
PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----")
# A value that looks generated: 20+ characters of a token alphabet, with letters and digits.
TOKEN = re.compile(r"(?<![\w+/-])(?=[\w+/-]*\d)(?=[\w+/-]*[a-zA-Z])[\w+/-]{20,}")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def git(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (or no git): nothing is committed here")
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def committable_files() -> list[str]:
    """What is committed, and what `git add -A` would add (untracked, not ignored)."""
    proc = git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    assert proc.returncode == 0, proc.stderr
    return [p for p in proc.stdout.split("\0") if p]


def test_no_env_file_or_key_file_is_committed():
    files = committable_files()
    assert ".env.example" in files and "vqlog/data.py" in files  # the listing works
    assert [f for f in files if SECRET_FILE.search(f)] == []


def test_no_private_key_is_committed():
    keys = []
    for name in committable_files():
        path = ROOT / name
        if path.is_file() and not path.is_symlink() and PRIVATE_KEY.search(path.read_bytes()):
            keys.append(name)
    assert keys == []


def test_git_ignores_env_files_wherever_they_are():
    for name in (".env", "mlflow/.env", "docker/.env"):
        assert git("check-ignore", "-q", "--no-index", name).returncode == 0, f"{name} is not ignored"
    assert git("check-ignore", "-q", "--no-index", ".env.example").returncode == 1


def secret_looking(text: str) -> list[str]:
    found = [m.group(0) for m in URL_PASSWORD.finditer(text)]
    return found + [t for t in TOKEN.findall(text) if not re.fullmatch(r"[A-Z0-9_]+", t)]


def test_env_example_holds_nothing_that_looks_like_a_real_secret():
    """Under any variable name and in the comments (test_compose checks the secret-named ones
    are empty): no generated-looking token and no URL with a password."""
    assert secret_looking((ROOT / ".env.example").read_text()) == []
    # The check would see one.
    assert secret_looking(f"MLFLOW_ALLOWED_HOSTS={secrets.token_hex(24)}\n") != []
    assert secret_looking("# e.g. postgresql://vqlog:hunter2@postgres:5432/optuna\n") != []
    assert secret_looking("POSTGRES_USER=vqlog\n# e.g. `openssl rand -hex 24`\n") == []


@pytest.mark.parametrize("args", [
    ["vqlog", "trials", "--storage", "postgresql://u:S3cretPW@127.0.0.1:5432/db"],
    ["vqlog", "table", "--tracking-url", "postgresql://u:S3cretPW@127.0.0.1:5432/db"],
    ["vqlog-sweep", "--tr=postgresql://u:S3cretPW@127.0.0.1:5432/db"],
    ["vqlog", "best", "postgresql://u:S3cretPW@h/db?password=S3cretPW"],
])
def test_a_url_given_to_a_command_that_does_not_take_it_is_echoed_masked(args, tmp_path):
    """argparse echoes the arguments it does not know: `vqlog trials --storage URL` (best and
    export take --storage, trials and table do not) printed the URL's password."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name(args[0])
    done = subprocess.run([str(exe), *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("Error: "), done.stderr
    assert "S3cretPW" not in done.stderr + done.stdout and "u:***@" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
